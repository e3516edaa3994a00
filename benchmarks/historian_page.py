"""Render the historian results page from the ``historian`` sweep's summary JSON.

    engram sweep run --name historian --data DATA --out OUT --runs RUNS --seeds 0,1,2 --threads 1
    python benchmarks/historian_page.py OUT/historian_summary.json PAGE.md [--commit SHA]

Every number on the page comes from the summary (``engram.science.sweep.collect``): test loss
per seed, paired t-tests (``engram.stats``) of each arm against ``moe`` and ``engram``, the
accounts, and the routing statistics each historian run wrote (``engram.science.routing``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional

from engram.config import TrainConfig
from engram.fsutil import atomic_write
from engram.stats import format_p, mean_std, paired_t

MACHINE = ("2-core x86-64 CPU, 24 GiB, no GPU; measured while other jobs ran, so absolute speeds "
           "are not quiet-machine figures (only losses and routing are compared here)")
ALPHA = 0.05
CLASS_ORDER = (("word piece", ("single", "first", "middle", "last", "other")),
               ("case", ("capitalised", "sentence-initial capitalised", "lower-case word")),
               ("train frequency", ("frequent", "mid", "rare")))


def _by_seed(row: dict[str, Any], key: str = "test_loss") -> dict[int, float]:
    return dict(zip(row["seeds"], row[key]))


def compare(a: dict[str, Any], b: dict[str, Any]) -> Optional[dict[str, float]]:
    """Paired t-test of a's test loss minus b's over their common seeds (None with < 2)."""
    la, lb = _by_seed(a), _by_seed(b)
    common = sorted(set(la) & set(lb))
    if len(common) < 2:
        return None
    return paired_t([la[s] for s in common], [lb[s] for s in common])


def verdict(t: Optional[dict[str, float]]) -> str:
    """helps / hurts (p < ALPHA) or ties, with the numbers."""
    if t is None:
        return "not enough paired seeds"
    d, p = t["mean_diff"], t["p"]
    if p == p and p < ALPHA:
        return f"{'helps' if d < 0 else 'hurts'} ({d:+.4f} nats, p = {format_p(p)})"
    return f"ties (a {d:+.4f} nats difference, p = {format_p(p)}: not significant at {ALPHA})"


def _pm(xs: list[float], fmt: str = ".4f") -> str:
    m, s = mean_std(xs)
    return f"{m:{fmt}} ± {s:{fmt}}"


def _diff(t: Optional[dict[str, float]]) -> str:
    return "—" if t is None else f"{t['mean_diff']:+.4f} ({format_p(t['p'])})"


def chosen_historian(rows: dict[str, dict[str, Any]]) -> Optional[dict[str, Any]]:
    """The historian setting chosen on dev (the group's ``chosen``), else the 5x one."""
    group = [r for r in rows.values() if r["group"] == "historian" and r["test_loss"]]
    picked = [r for r in group if r.get("chosen")]
    return picked[0] if picked else rows.get("historian")


def lr_choice(summary: dict[str, Any]) -> str:
    """What the page says about the historian's table lr: the dev choice, or why there is none."""
    group = [r for r in summary["rows"] if r["group"] == "historian"]
    n = len(summary["spec"]["seeds"])
    if len(group) >= 2 and all(len(r["dev_loss"]) == n for r in group):
        best = next(r for r in group if r.get("chosen"))
        devs = ", ".join(f"{r['config']} {mean_std(r['dev_loss'])[0]:.4f}" for r in group)
        return f"the historian's table lr was chosen on dev (mean dev loss: {devs}): **{best['config']}**"
    ran = [r["config"] for r in group if r["test_loss"]]
    return (f"the historian's table lr was not chosen on dev: only {', '.join(ran) or 'none'} has all its runs, "
            f"so it runs at the engram arm's table lr ({TrainConfig().table_lr_mult:g}x, that arm's dev choice "
            f"in the 2026-12-02 baselines sweep)")


def arms_table(summary: dict[str, Any]) -> list[str]:
    rows = {r["config"]: r for r in summary["rows"]}
    out = ["| arm | table lr | total params | activated/token (account) | activated/token (measured routing) | "
           "dev loss (mean) | **test loss** (mean ± std) | test loss per seed | Δ vs moe (p) | Δ vs engram (p) |",
           "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in summary["rows"]:
        if not r["test_loss"]:
            continue
        a = r["account"]
        lr = summary["spec"]["train"].get("table_lr_mult")
        lr = next((c["train"].get("table_lr_mult") for c in summary["spec"]["configs"]
                   if c["name"] == r["config"] and "table_lr_mult" in c["train"]), lr)
        lr_s = "—" if not a["table_params"] else f"{lr if lr is not None else TrainConfig().table_lr_mult:g}x"
        routed = [v["expected_activated_per_token"] for v in r.get("routing", {}).values()
                  if "expected_activated_per_token" in v]
        meas = f"{mean_std(routed)[0]:,.0f}" if routed else "—"
        per_seed = ", ".join(f"{s}: {x:.4f}" for s, x in zip(r["seeds"], r["test_loss"]))
        peers = [q for q in summary["rows"] if r["group"] and q["group"] == r["group"]]
        name = r["config"] + (" (chosen on dev)" if r.get("chosen") and len(peers) >= 2 else "")  # a choice needs two
        vs_moe = "ref" if r["config"] == "moe" else _diff(compare(r, rows["moe"]))
        vs_eng = "ref" if r["config"] == "engram" else _diff(compare(r, rows["engram"])) if "engram" in rows else "—"
        dev = f"{mean_std(r['dev_loss'])[0]:.4f}" if r["dev_loss"] else "—"
        out.append(f"| {name} | {lr_s} | {a['total']:,} | {a['activated_per_token']:,} | {meas} | {dev} | "
                   f"{_pm(r['test_loss'])} | {per_seed} | {vs_moe} | {vs_eng} |")
    return out


def routing_tables(row: dict[str, Any]) -> list[str]:
    """Pick rate of the historian (mean ± std over seeds) overall, per layer and per token class."""
    runs = [row["routing"][k] for k in sorted(row["routing"], key=int)]
    if not runs:
        return ["(no routing statistics in these runs)"]
    uni = runs[0]["uniform"]
    out = [f"Seeds {', '.join(sorted(row['routing'], key=int))}; test windows; top-{runs[0]['top_k']} of "
           f"{runs[0]['n_routed_experts']} routed slots, so a content-blind, balanced router picks the "
           f"historian for {uni:.1%} of tokens (uniform).", "",
           "| tokens | layer | share of tokens (mean ± std) | × uniform | router weight when picked | "
           "tokens per seed |",
           "|---|---|---:|---:|---:|---:|"]

    def line(label: str, layer: str, stats: list[dict[str, Any]]) -> str:
        rates = [s["pick_rate"] for s in stats]
        weights = [s["weight"] for s in stats if s["weight"] == s["weight"]]
        w = f"{mean_std(weights)[0]:.3f}" if weights else "—"
        return (f"| {label} | {layer} | {_pm(rates, '.2%')} | {mean_std(rates)[0] / uni:.2f} | {w} | "
                f"{mean_std([s['tokens'] for s in stats])[0]:,.0f} |")

    out.append(line("**all**", "all", [r["overall"] for r in runs]))
    for lid in sorted(runs[0]["per_layer"], key=int):
        out.append(line("all", lid, [r["per_layer"][lid]["overall"] for r in runs]))
    for title, names in CLASS_ORDER:
        for c in names:
            out.append(line(f"{title}: {c}", "all", [r["by_class"][c] for r in runs]))
    bias = [(r["per_layer"][lid]["expert_bias"], r["per_layer"][lid]["expert_bias_others_mean"])
            for r in runs for lid in r["per_layer"]]
    out += ["", f"Balancing bias at the end of training (mean over seeds and layers): historian "
                f"{mean_std([b[0] for b in bias])[0]:+.4f}, the other routed experts "
                f"{mean_std([b[1] for b in bias])[0]:+.4f} on average."]
    return out


def render(summary: dict[str, Any], commands: str, commit: str = "") -> str:
    rows = {r["config"]: r for r in summary["rows"]}
    hist = chosen_historian(rows)
    spec = summary["spec"]
    moe_acc = rows["moe"]["account"]
    lines = ["# The historian: Engram as a routed MoE expert, against the MoE and the Engram layer (2026-12-07)", "",
             "With `engram.placement = \"expert\"` the Engram memory of layer 1 is not a gated layer before "
             "attention but the last of 12 routed-expert slots of that layer's DeepSeekMoE: the router "
             "scores it per token like any expert; when picked, its output (the token's hashed 2/3-gram "
             "rows, projected to the hidden size, no gate, no conv) is weighted by the router weight. "
             "Tables are filled so every arm has the `moe` total.", "",
             f"- **Machine**: {MACHINE}.",
             f"- **Code**: commit {commit or 'see git log'}; torch CPU, one thread per run, one run at a time.",
             f"- **Scale**: the science backbone (hidden 128, 3 layers, 1 shared + routed experts of width 64, "
             f"top-2), {spec['train'].get('steps')} steps of {spec['train'].get('batch_size')} x "
             f"{spec['train'].get('seq_len')} tokens, built-in corpus, BPE {spec['vocab_size']:,}; seeds "
             f"{', '.join(str(s) for s in spec['seeds'])} (same seed: same initialisation and batches; p = "
             f"two-sided paired t-test over seeds). Test loss is the second half of the validation windows "
             f"(dev, the first half, is for choices); {lr_choice(summary)}.",
             f"- **Runs**: {summary['runs_done']} of {summary['runs_total']} finished"
             + (f"; missing: {', '.join(summary['missing'])}" if summary["missing"] else "") + ".",
             "", "## Reproduce", "", "```bash", commands.strip(), "```", "",
             "## Test loss (nats/token)", ""]
    lines += arms_table(summary)
    lines += ["", "Activated/token (account) counts k SwiGLU experts per MoE layer and, for the historian, its "
                  "rows for every token (an upper bound: the historian is smaller than a SwiGLU expert and is "
                  "read only when picked); the measured column replaces that with the routing measured on test.",
              f"The `moe` total is {moe_acc['total']:,}; every other arm is within 0.5% of it.", ""]
    if hist is not None:
        lines += ["## Verdict", "",
                  f"- **{hist['config']} vs moe**: {verdict(compare(hist, rows['moe']))}.",
                  f"- **{hist['config']} vs engram**: {verdict(compare(hist, rows['engram']))}."
                  if "engram" in rows else "",
                  f"- engram vs moe (same runs, for reference): {verdict(compare(rows['engram'], rows['moe']))}."
                  if "engram" in rows else "", ""]
        for r in (hist, *[r for r in rows.values() if r["group"] == "historian" and r is not hist]):
            if r.get("routing"):
                lines += [f"## Routing: how often the router picks the historian ({r['config']})", ""]
                lines += routing_tables(r)
                lines.append("")
    lines += ["Raw: the sweep summary JSON beside this page (every seed's losses, accounts and routing "
              "statistics).", ""]
    return "\n".join(x for x in lines if x is not None) + "\n"


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("summary", help="historian_summary.json from `engram sweep run/summary --name historian`")
    ap.add_argument("page", help="markdown page to write")
    ap.add_argument("--commands", help="file with the commands that produced the runs (shown on the page)")
    ap.add_argument("--commit", default="", help="the commit the runs used")
    args = ap.parse_args(argv)
    summary = json.loads(Path(args.summary).read_text())
    commands = Path(args.commands).read_text() if args.commands else "# (commands not given)"
    text = render(summary, commands, args.commit)
    atomic_write(Path(args.page), lambda f: f.write(text.encode("utf-8")))


if __name__ == "__main__":
    main()
