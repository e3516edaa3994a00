"""The one-file gate page used by ``engram inspect --html`` and ``engram serve``.

Everything is inline (CSS, JavaScript, data): the page works offline and loads nothing from
elsewhere. ``__CONFIG__`` (live mode flag, colour ramp) and ``__DATA__`` (an inspection as JSON,
or null) are filled in by :func:`engram.inspect.heatmap.render_page`. In live mode the page posts the
text box to ``/api/inspect`` as the user types.

Every shaded token is a ``span.tok`` whose ``data-gate`` holds the exact gate of the selected
layer/branch (JavaScript prints a float64 with the same shortest round-trip digits as Python's
``repr``), so tests can compare the page with ``engram inspect --json``.
"""

PAGE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>
  :root { --fg:#1d2430; --muted:#6b7483; --line:#e3e7ee; --bg:#f7f8fb; --card:#fff; --accent:#b3261e; }
  * { box-sizing: border-box; }
  body { margin:0; background:var(--bg); color:var(--fg);
         font:15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
  header { padding:14px 28px; background:#1d2430; color:#fff; display:flex; align-items:baseline; gap:16px; }
  header h1 { font-size:18px; margin:0; font-weight:600; letter-spacing:.2px; }
  header .meta { color:#aab3c2; font-size:13px; }
  main { max-width:1100px; margin:0 auto; padding:20px 28px 40px; }
  .card { background:var(--card); border:1px solid var(--line); border-radius:10px; padding:16px 18px; margin-bottom:16px; }
  textarea { width:100%; min-height:84px; resize:vertical; border:1px solid #cfd5df; border-radius:8px;
             padding:10px 12px; font:15px/1.5 ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; color:var(--fg); }
  textarea:focus { outline:2px solid #9db4e8; border-color:#9db4e8; }
  .row { display:flex; flex-wrap:wrap; align-items:center; gap:10px 18px; }
  .examples button { border:1px solid #cfd5df; background:#fff; border-radius:999px; padding:3px 11px;
                     font-size:13px; color:#394150; cursor:pointer; }
  .examples button:hover { background:#eef2f8; }
  label { font-size:13px; color:var(--muted); }
  select { font-size:14px; padding:3px 6px; border-radius:6px; border:1px solid #cfd5df; background:#fff; }
  #status { font-size:13px; color:var(--muted); min-height:20px; }
  #status.error { color:var(--accent); font-weight:600; }
  #tokens { font:17px/2.15 ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; white-space:pre-wrap;
            word-break:break-word; min-height:40px; }
  .tok { border-radius:3px; padding:2px 0; cursor:default; transition:background-color .12s;
         box-shadow:inset -1px 0 0 rgba(255,255,255,.7); }  /* token boundaries inside same-colour runs */
  .tok:hover, .tok.pinned { outline:2px solid #1d2430; outline-offset:0; }
  .tok.partial { display:inline-block; min-width:7px; text-align:center; }
  .nl { color:#8a93a3; }
  .legend { display:flex; align-items:center; gap:8px; font-size:12px; color:var(--muted); }
  .bar { width:180px; height:12px; border-radius:3px; border:1px solid var(--line); }
  table { border-collapse:collapse; font-size:13px; }
  th, td { padding:3px 10px; text-align:right; border-bottom:1px solid var(--line); }
  th { color:var(--muted); font-weight:600; }
  td.l, th.l { text-align:left; }
  #tip { position:fixed; z-index:10; display:none; max-width:560px; background:#1d2430; color:#eef1f6;
         border-radius:8px; padding:10px 12px; font-size:12.5px; box-shadow:0 6px 24px rgba(0,0,0,.25); pointer-events:none; }
  #tip table { font-size:12px; }
  #tip th { color:#9aa5b8; border-color:#39414f; }
  #tip td { border-color:#39414f; }
  #tip .big { font-size:14px; font-weight:600; }
  #tip code { background:#2c3442; border-radius:3px; padding:0 3px; }
  .hint { font-size:12px; color:var(--muted); margin-top:8px; }
  h2 { font-size:14px; margin:0 0 10px; color:#394150; font-weight:600; }
</style>
</head>
<body>
<header><h1>Engram gates</h1><span class="meta" id="meta"></span></header>
<main>
  <div class="card" id="input-card">
    <textarea id="text" placeholder="Type text: tokens are shaded by how strongly the model reaches for its N-gram memory" spellcheck="false"></textarea>
    <div class="row examples" style="margin-top:8px">
      <label>Examples</label>
      <button data-text="the Prince of Wales">the Prince of Wales</button>
      <button data-text="In the beginning God created the heaven and the earth.">In the beginning God created</button>
      <button data-text="The capital of France is Paris. The currency of Japan is the yen.">capital of France</button>
      <button data-text="ROMEO. But soft, what light through yonder window breaks?">ROMEO. But soft</button>
    </div>
  </div>
  <div class="card">
    <div class="row" style="margin-bottom:10px">
      <label for="view">Layer / branch</label> <select id="view"></select>
      <label for="scale">Shading</label>
      <select id="scale"><option value="rank">rank within this text</option><option value="relative">min..max of this text</option><option value="absolute">absolute (0..1)</option></select>
      <span class="legend"><span id="lo">0</span><span class="bar" id="bar"></span><span id="hi">1</span></span>
      <span id="status"></span>
    </div>
    <div id="tokens"></div>
    <div class="hint">Hover a token for its gate, the n-gram each hash head read, the table rows hit and each head's share of the value; click to pin.</div>
  </div>
  <div class="card"><h2>Gate per layer and branch</h2><table id="summary"></table></div>
</main>
<div id="tip"></div>
<script>
"use strict";
const CONFIG = __CONFIG__;
let DATA = __DATA__;
const $ = (id) => document.getElementById(id);
let pinned = null, seq = 0, shown = 0, timer = null;

function rgb(x) {
  x = Math.min(Math.max(x, 0), 1);
  const r = CONFIG.ramp;
  for (let i = 1; i < r.length; i++) {
    if (x <= r[i][0]) {
      const f = r[i][0] > r[i-1][0] ? (x - r[i-1][0]) / (r[i][0] - r[i-1][0]) : 0;
      return r[i-1][1].map((p, k) => Math.round(p + (r[i][1][k] - p) * f));
    }
  }
  return r[r.length - 1][1];
}
const ink = (c) => (0.299*c[0] + 0.587*c[1] + 0.114*c[2] > 140 ? "#141414" : "#fff");
const css = (c) => `rgb(${c[0]},${c[1]},${c[2]})`;
const esc = (s) => String(s).replace(/[&<>"]/g, (c) => ({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;"}[c]));
const vis = (s) => JSON.stringify(s).slice(1, -1);

// Same mapping as engram.inspect.heatmap.scale_values (rank ties share their mean rank).
function shadeValues(g, scale) {
  if (scale === "absolute") return g.slice();
  const lo = Math.min(...g), hi = Math.max(...g);
  if (scale === "relative") return g.map((v) => hi > lo ? (v - lo) / (hi - lo) : 0.5);
  if (g.length === 1) return [0.5];
  const order = g.map((_, i) => i).sort((a, b) => g[a] - g[b]);
  const out = new Array(g.length);
  for (let i = 0; i < order.length;) {
    let j = i;
    while (j + 1 < order.length && g[order[j + 1]] === g[order[i]]) j++;
    for (let k = i; k <= j; k++) out[order[k]] = (i + j) / 2 / (g.length - 1);
    i = j + 1;
  }
  return out;
}

function view() {
  const [li, m] = ($("view").value || "0:0").split(":").map(Number);
  return {layer: DATA.layers[li], li, m};
}

function fillViews() {
  const sel = $("view"), old = sel.value;
  sel.innerHTML = "";
  DATA.layers.forEach((L, li) => { for (let m = 0; m < L.num_branches; m++) {
    const o = document.createElement("option");
    o.value = `${li}:${m}`; o.textContent = `layer ${L.layer_id} \u00b7 branch ${m}`; sel.appendChild(o);
  }});
  if ([...sel.options].some((o) => o.value === old)) sel.value = old;
  const md = DATA.model || {};
  $("meta").textContent = `Engram layers ${JSON.stringify(md.engram_layers)} \u00b7 ${md.hc_mult} branch(es) \u00b7 ` +
    `${md.heads_per_layer} hash heads/layer \u00b7 n \u2264 ${md.max_ngram_size} \u00b7 max ${md.max_seq_len} tokens`;
}

function render() {
  const box = $("tokens");
  box.innerHTML = "";
  hideTip();
  if (!DATA || !DATA.tokens.length) { $("summary").innerHTML = ""; return; }
  const {layer, m} = view();
  const g = layer.gates.map((row) => row[m]);
  const lo = Math.min(...g), hi = Math.max(...g), scale = $("scale").value;
  const shades = shadeValues(g, scale);
  $("lo").textContent = scale === "absolute" ? "0" : lo.toFixed(3);
  $("hi").textContent = scale === "absolute" ? "1" : hi.toFixed(3);
  $("bar").style.background = "linear-gradient(90deg," +
    CONFIG.ramp.map(([a, c]) => `${css(c)} ${a * 100}%`).join(",") + ")";
  const frag = document.createDocumentFragment();
  DATA.tokens.forEach((t, i) => {
    const s = document.createElement("span");
    const c = rgb(shades[i]);
    s.className = "tok" + (t.display ? "" : " partial");
    s.dataset.index = i;
    s.dataset.gate = String(g[i]);
    s.style.background = css(c); s.style.color = ink(c);
    const text = t.display || "\u00b7";
    if (text.includes("\n")) {
      const parts = text.split("\n");
      parts.forEach((p, k) => {
        if (p) s.appendChild(document.createTextNode(p));
        if (k < parts.length - 1) { const n = document.createElement("span"); n.className = "nl"; n.textContent = "\u21b5\n"; s.appendChild(n); }
      });
    } else s.textContent = text;
    s.addEventListener("mouseenter", (e) => { if (pinned === null) showTip(i, e); });
    s.addEventListener("mousemove", (e) => { if (pinned === null) place(e); });
    s.addEventListener("mouseleave", () => { if (pinned === null) hideTip(); });
    s.addEventListener("click", (e) => {
      document.querySelectorAll(".tok.pinned").forEach((x) => x.classList.remove("pinned"));
      if (pinned === i) { pinned = null; hideTip(); return; }
      pinned = i; s.classList.add("pinned"); showTip(i, e);
    });
    frag.appendChild(s);
  });
  box.appendChild(frag);
  summary();
}

function summary() {
  let h = "<tr><th class='l'>layer</th><th>branch</th><th>tokens</th><th>mean</th><th>min</th><th>max</th></tr>";
  for (const r of DATA.summary) h += `<tr><td class='l'>${r.layer_id}</td><td>${r.branch}</td><td>${r.count}</td>` +
    `<td>${r.mean.toFixed(4)}</td><td>${r.min.toFixed(4)}</td><td>${r.max.toFixed(4)}</td></tr>`;
  $("summary").innerHTML = h;
}

function ngram(h, t) {
  return h.ngram.map((id, k) => id < 0 ? "&lt;pad&gt;" : esc(vis(DATA.tokens[t - h.n + 1 + k].piece)))
    .map((p) => `<code>${p}</code>`).join(" ");
}

function showTip(i, e) {
  const {layer, m} = view(), t = DATA.tokens[i];
  const heads = [...layer.heads[i]].sort((a, b) => b.contribution - a.contribution);
  let h = `<div class="big"><code>${esc(vis(t.piece))}</code> &nbsp;token ${i} \u00b7 id ${t.id}</div>`;
  h += `<div>gate (layer ${layer.layer_id}): ` + layer.gates[i].map((v, k) =>
        k === m ? `<b>branch ${k}: ${v.toFixed(4)}</b>` : `branch ${k}: ${v.toFixed(4)}`).join(" \u00b7 ") +
       ` &nbsp; |value| ${layer.value_norm[i].toFixed(3)}</div>`;
  h += "<table style='margin-top:6px'><tr><th>n</th><th>head</th><th class='l'>n-gram</th><th>hash</th><th>row</th><th>|row|</th><th>contrib.</th></tr>";
  for (const x of heads) h += `<tr><td>${x.n}</td><td>${x.head}</td><td class='l'>${ngram(x, i)}</td><td>${x.hash_id}</td>` +
    `<td>${x.row}</td><td>${x.row_norm.toFixed(3)}</td><td>${x.contribution.toFixed(3)}</td></tr>`;
  h += "</table>";
  const tip = $("tip");
  tip.innerHTML = h; tip.style.display = "block"; place(e);
}
function place(e) {
  const tip = $("tip"), pad = 14;
  let x = e.clientX + pad, y = e.clientY + pad;
  const w = tip.offsetWidth, hh = tip.offsetHeight;
  if (x + w > innerWidth - 8) x = Math.max(8, e.clientX - w - pad);
  if (y + hh > innerHeight - 8) y = Math.max(8, e.clientY - hh - pad);
  tip.style.left = x + "px"; tip.style.top = y + "px";
}
function hideTip() { $("tip").style.display = "none"; }

function setStatus(msg, error) { const s = $("status"); s.textContent = msg; s.className = error ? "error" : ""; }

async function ask(text) {
  const my = ++seq;
  if (!text) { DATA = null; pinned = null; render(); setStatus(""); return; }
  const t0 = performance.now();
  try {
    const r = await fetch("/api/inspect", {method: "POST", headers: {"Content-Type": "application/json"},
                                           body: JSON.stringify({text})});
    const body = await r.json();
    if (my < shown) return;  // an older request answered after a newer one
    shown = my;
    if (!r.ok) { setStatus(body.error || `HTTP ${r.status}`, true); return; }
    DATA = body; pinned = null; fillViews(); render();
    setStatus(`${DATA.tokens.length} tokens \u00b7 ${Math.round(performance.now() - t0)} ms`);
  } catch (err) { if (my >= shown) setStatus("server unreachable: " + err, true); }
}

$("view").addEventListener("change", render);
$("scale").addEventListener("change", render);
document.addEventListener("keydown", (e) => { if (e.key === "Escape") { pinned = null; hideTip();
  document.querySelectorAll(".tok.pinned").forEach((x) => x.classList.remove("pinned")); } });

if (CONFIG.live) {
  $("text").addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(() => ask($("text").value), 120); });
  document.querySelectorAll(".examples button").forEach((b) => b.addEventListener("click", () => {
    $("text").value = b.dataset.text; ask(b.dataset.text); }));
  fetch("/api/info").then((r) => r.json()).then((info) => { if (!DATA) { DATA = {layers: info.layers, model: info.model, tokens: [], summary: []}; fillViews(); } });
  $("text").focus();
} else {
  $("input-card").style.display = "none";
  fillViews(); render();
  setStatus(`${DATA.tokens.length} tokens`);
}
</script>
</body>
</html>
"""
