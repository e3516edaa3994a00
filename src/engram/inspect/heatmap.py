"""Seeing inside an Engram model: per-token gates, the n-grams each hash head read, the rows hit.

:func:`inspect_text` runs one forward pass with ``output_gates=True`` and returns an
:class:`Inspection`: for every Engram layer the gate ``alpha[t, m]`` of every token ``t`` and
residual branch ``m``, and for every hash head ``h`` of that token the n-gram it hashed (the
``n`` tokens ending at ``t``, oldest first; positions before the text are the pad id), the
head's hash id, the global table row, the row's L2 norm and the norm of the head's share of
the (ungated) value ``W_V e_t``:

    contribution[t, h] = || W_V[:, h*Dh:(h+1)*Dh] @ table[row[t, h]] ||

Heads sorted by contribution are "the n-grams that mattered" at that position. The same
object renders as an ANSI heatmap (:func:`render_terminal`), a standalone HTML page
(:func:`render_html`, no network needed) or JSON (:meth:`Inspection.to_dict`), which is also
what ``engram serve`` answers.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, TextIO

import torch
from tokenizers import Tokenizer

from engram.errors import EngramError, RequestTooLargeError
from engram.inspect.page import PAGE
from engram.inspect.settings import COLOR_MODES, SCALES
from engram.model.lm import EngramLM

FORMAT = "engram.inspect/1"
PAD_TOKEN_ID = -1  # marks an n-gram slot before the start of the text (hashed as the pad id)

# Low -> high gate. Shared with the page's JavaScript (render_html injects it), so the
# terminal, the exported HTML and the live page shade identically.
RAMP: tuple[tuple[float, tuple[int, int, int]], ...] = (
    (0.00, (232, 237, 245)),
    (0.30, (254, 230, 150)),
    (0.55, (253, 174, 97)),
    (0.80, (231, 84, 56)),
    (1.00, (165, 0, 38)),
)


class InspectError(EngramError):
    """Text or model that cannot be inspected; the message names the value and the fix."""


class TextTooLongError(InspectError, RequestTooLargeError):
    """The text encodes to more tokens than the model's max_seq_len (HTTP 413 when served)."""


# ----------------------------------------------------------------------------- data model
@dataclass(frozen=True)
class Token:
    index: int
    id: int
    piece: str  # the token on its own (bytes of a split character shown as <e6>)
    start: int  # character offsets into the inspected text
    end: int
    display: str  # text[start:end], or "" when an earlier token already showed that character

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "id": self.id, "piece": self.piece, "start": self.start,
                "end": self.end, "display": self.display}


@dataclass(frozen=True)
class HeadHit:
    """What one hash head read and hit at one position."""

    head: int  # index within the layer, order-major (all n=2 heads, then n=3, ...)
    n: int  # n-gram order
    ngram: tuple[int, ...]  # token ids t-n+1..t, PAD_TOKEN_ID before the text
    hash_id: int  # row within this head's table
    row: int  # global row of the layer's flat table
    row_norm: float
    contribution: float

    def __post_init__(self) -> None:
        if len(self.ngram) != self.n:
            raise InspectError(f"HeadHit(head={self.head}) has an n-gram of {len(self.ngram)} ids "
                               f"for order n={self.n}; pass exactly n ids")

    def to_dict(self) -> dict[str, Any]:
        return {"head": self.head, "n": self.n, "ngram": list(self.ngram), "hash_id": self.hash_id,
                "row": self.row, "row_norm": self.row_norm, "contribution": self.contribution}


@dataclass
class LayerInspection:
    layer_id: int
    num_branches: int
    head_orders: list[int]  # n of each head
    head_sizes: list[int]  # prime table size of each head
    gates: list[list[float]]  # [T][M]
    value_norm: list[float]  # ||W_V e_t + b|| before the gate, [T]
    heads: list[list[HeadHit]]  # [T][H]

    def __post_init__(self) -> None:
        if len(self.gates) != len(self.heads) or len(self.gates) != len(self.value_norm):
            raise InspectError(f"layer {self.layer_id}: {len(self.gates)} gate rows, "
                               f"{len(self.value_norm)} value norms and {len(self.heads)} head rows; "
                               f"all must have one entry per token")
        if any(len(g) != self.num_branches for g in self.gates):
            raise InspectError(f"layer {self.layer_id}: every gate row needs num_branches="
                               f"{self.num_branches} values")

    def branch_gates(self, branch: int) -> list[float]:
        if not 0 <= branch < self.num_branches:
            raise InspectError(f"branch={branch} is outside layer {self.layer_id}'s branches "
                               f"0..{self.num_branches - 1}")
        return [g[branch] for g in self.gates]

    def top_heads(self, t: int, k: int) -> list[HeadHit]:
        """The k heads of token t with the largest contribution to the value."""
        return sorted(self.heads[t], key=lambda h: -h.contribution)[:k]

    def to_dict(self) -> dict[str, Any]:
        return {"layer_id": self.layer_id, "num_branches": self.num_branches,
                "head_orders": self.head_orders, "head_sizes": self.head_sizes,
                "gates": self.gates, "value_norm": self.value_norm,
                "heads": [[h.to_dict() for h in row] for row in self.heads]}


@dataclass
class Inspection:
    text: str
    tokens: list[Token]
    layers: list[LayerInspection]
    model: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for layer in self.layers:
            if len(layer.gates) != len(self.tokens):
                raise InspectError(f"layer {layer.layer_id} has {len(layer.gates)} positions but the "
                                   f"text has {len(self.tokens)} tokens")

    def layer(self, layer_id: int) -> LayerInspection:
        for layer in self.layers:
            if layer.layer_id == layer_id:
                return layer
        raise InspectError(f"layer {layer_id} has no Engram; Engram layers are "
                           f"{[l.layer_id for l in self.layers]}")

    def summary(self) -> list[dict[str, Any]]:
        """Mean / min / max gate per layer and branch."""
        out = []
        for layer in self.layers:
            for m in range(layer.num_branches):
                g = layer.branch_gates(m)
                out.append({"layer_id": layer.layer_id, "branch": m, "count": len(g),
                            "mean": sum(g) / len(g) if g else None,
                            "min": min(g) if g else None, "max": max(g) if g else None})
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "text": self.text, "model": self.model,
                "tokens": [t.to_dict() for t in self.tokens],
                "layers": [l.to_dict() for l in self.layers], "summary": self.summary()}


# ----------------------------------------------------------------------------- tokens
def _byte_decoder() -> dict[str, int]:
    """Inverse of the byte-level BPE alphabet: printable bytes map to themselves, the others
    (controls, space, 0x7f-0xa0, 0xad) to U+0100 upwards in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTES = _byte_decoder()


def _piece(tok: Tokenizer, token_id: int, token_str: str) -> str:
    text = tok.decode([token_id])
    if "\ufffd" not in text:
        return text
    if all(c in _BYTES for c in token_str):  # a byte-level token holding part of a character
        return "".join(f"<{_BYTES[c]:02x}>" for c in token_str)
    return text


def tokenize(tok: Tokenizer, text: str) -> list[Token]:
    """Tokens of ``text`` with offsets; ``display`` pieces concatenate back to ``text``."""
    enc = tok.encode(text, add_special_tokens=False)
    tokens, shown = [], 0
    for i, (tid, (a, b), s) in enumerate(zip(enc.ids, enc.offsets, enc.tokens)):
        start = max(a, shown)  # several tokens can share one multi-byte character
        display = text[start:b] if b > start else ""
        shown = max(shown, b)
        tokens.append(Token(i, int(tid), _piece(tok, int(tid), s), a, b, display))
    if tokens and shown < len(text):  # trailing text the tokenizer dropped (rare): keep it visible
        last = tokens[-1]
        tokens[-1] = Token(last.index, last.id, last.piece, last.start, last.end,
                           last.display + text[shown:])
    return tokens


# ----------------------------------------------------------------------------- the pass
def model_info(model: EngramLM) -> dict[str, Any]:
    cfg = model.cfg
    return {"engram_layers": [l.layer_id for l in model.engram_layers], "hc_mult": cfg.hc_mult,
            "max_ngram_size": cfg.engram.max_ngram_size if cfg.engram else None,
            "heads_per_layer": cfg.engram.num_heads_total if cfg.engram else 0,
            "max_seq_len": cfg.max_seq_len, "vocab_size": cfg.vocab_size,
            "use_gate": cfg.engram.use_gate if cfg.engram else None}


@torch.no_grad()
def inspect_ids(model: EngramLM, ids: Sequence[int]) -> list[LayerInspection]:
    """One forward pass over ``ids`` (no batch dim) -> what every Engram layer did."""
    if not model.engram_layers:
        raise InspectError("the model has no Engram layers; inspect a run trained with an "
                           "engram-* preset")
    T = len(ids)
    if T == 0:
        raise InspectError("the text encodes to no tokens; give some text")
    if T > model.cfg.max_seq_len:
        raise TextTooLongError(f"the text encodes to {T} tokens but the model's max_seq_len is "
                           f"{model.cfg.max_seq_len}; shorten the text")
    device = model.embed.weight.device
    x = torch.tensor([list(ids)], dtype=torch.long, device=device)
    hash_ids = model.compute_hash_ids(x)
    layers = model.engram_layers
    was_training = model.training
    model.eval()
    try:
        gates = model(x, hash_ids=hash_ids, output_gates=True).gates
    finally:
        model.train(was_training)
    gates = {lid: g[0].float().cpu() for lid, g in gates.items()}  # [T,M]
    out = []
    for layer in layers:
        out.append(_layer_detail(model, layer, hash_ids[layer.layer_id][0], gates[layer.layer_id],
                                 list(ids)))
    return out


def _layer_detail(model: EngramLM, layer, hid: torch.Tensor, gates: torch.Tensor,
                  ids: list[int]) -> LayerInspection:
    cfg = model.cfg.engram
    mhe = layer.multi_head_embedding
    rows = mhe.rows(hid)  # [T,H]
    emb = mhe.embedding.weight[rows].float()  # [T,H,Dh]
    T, H, Dh = emb.shape
    w = layer.value_proj.weight.float().reshape(-1, H, Dh)  # [D,H,Dh]: W_V split by head
    contrib = torch.einsum("thd,Dhd->thD", emb, w).norm(dim=-1)  # [T,H]
    value = layer.value_proj(emb.reshape(T, H * Dh).to(layer.value_proj.weight.dtype))
    orders = [n for n in range(2, cfg.max_ngram_size + 1) for _ in range(cfg.n_head_per_ngram)]
    rows_l, hid_l = rows.cpu().tolist(), hid.cpu().tolist()
    norms_l, contrib_l = emb.norm(dim=-1).cpu().tolist(), contrib.cpu().tolist()
    heads = []
    for t in range(T):
        heads.append([
            HeadHit(head=h, n=n,
                    ngram=tuple(ids[s] if s >= 0 else PAD_TOKEN_ID for s in range(t - n + 1, t + 1)),
                    hash_id=hid_l[t][h], row=rows_l[t][h], row_norm=norms_l[t][h],
                    contribution=contrib_l[t][h])
            for h, n in enumerate(orders)
        ])
    return LayerInspection(layer_id=layer.layer_id, num_branches=gates.shape[1],
                           head_orders=orders, head_sizes=list(mhe.head_sizes),
                           gates=gates.tolist(), value_norm=value.norm(dim=-1).cpu().tolist(),
                           heads=heads)


def inspect_text(model: EngramLM, tok: Tokenizer, text: str) -> Inspection:
    """Tokenize ``text`` with the run's tokenizer and inspect every Engram layer."""
    if not isinstance(text, str):
        raise InspectError(f"text must be a string, got {type(text).__name__}")
    tokens = tokenize(tok, text)
    layers = inspect_ids(model, [t.id for t in tokens])
    return Inspection(text=text, tokens=tokens, layers=layers, model=model_info(model))


# ----------------------------------------------------------------------------- colours
def gate_rgb(x: float) -> tuple[int, int, int]:
    """Colour of a value in [0, 1] on :data:`RAMP` (clamped)."""
    x = min(max(float(x), 0.0), 1.0)
    for (a, ca), (b, cb) in zip(RAMP, RAMP[1:]):
        if x <= b:
            f = (x - a) / (b - a) if b > a else 0.0
            # floor(x + .5) is JavaScript's Math.round: the page computes the same colours
            return tuple(math.floor(p + (q - p) * f + 0.5) for p, q in zip(ca, cb))  # type: ignore[return-value]
    return RAMP[-1][1]


def ink_for(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white text, whichever reads better on ``rgb``."""
    r, g, b = rgb
    return (20, 20, 20) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)


def _xterm256(rgb: tuple[int, int, int]) -> int:
    r, g, b = (round(c / 255 * 5) for c in rgb)
    return 16 + 36 * r + 6 * g + b


def scale_values(values: Sequence[float], scale: str) -> list[float]:
    """Map gates to [0, 1] for shading.

    ``absolute`` keeps them (they are sigmoid outputs); ``relative`` stretches this text's
    min..max; ``rank`` uses each value's rank among this text's values (ties share the mean
    rank). Trained gates often crowd a narrow band near 1 with a few low outliers, which
    squeeze a min..max scale: ranks spread the colours evenly whatever the distribution.
    """
    if scale not in SCALES:
        raise InspectError(f"scale={scale!r}; choose one of {SCALES}")
    if scale == "absolute" or not values:
        return list(values)
    if scale == "relative":
        lo, hi = min(values), max(values)
        return [(v - lo) / (hi - lo) if hi > lo else 0.5 for v in values]
    if len(values) == 1:
        return [0.5]
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):  # groups of equal values get their mean rank
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 / (len(values) - 1)
        i = j + 1
    return ranks


def resolve_color(mode: str, stream: TextIO) -> str:
    if mode not in COLOR_MODES:
        raise InspectError(f"color={mode!r}; choose one of {COLOR_MODES}")
    if mode != "auto":
        return mode
    if os.environ.get("NO_COLOR") or not getattr(stream, "isatty", lambda: False)():
        return "none"
    return "truecolor" if os.environ.get("COLORTERM", "") in ("truecolor", "24bit") else "256"


def _paint(s: str, rgb: tuple[int, int, int], color: str) -> str:
    fg = ink_for(rgb)
    if color == "truecolor":
        return f"\x1b[48;2;{rgb[0]};{rgb[1]};{rgb[2]}m\x1b[38;2;{fg[0]};{fg[1]};{fg[2]}m{s}\x1b[0m"
    return f"\x1b[48;5;{_xterm256(rgb)}m\x1b[38;5;{_xterm256(fg)}m{s}\x1b[0m"


def _visible(s: str) -> str:
    return s.replace("\n", "\u21b5").replace("\t", "\u21e5").replace("\r", "")


def ngram_text(tokens: Sequence[Token], hit: HeadHit, t: int) -> str:
    parts = []
    for k, tid in enumerate(hit.ngram):
        pos = t - hit.n + 1 + k
        parts.append("<pad>" if tid == PAD_TOKEN_ID else tokens[pos].piece)
    return " | ".join(repr(p)[1:-1] for p in parts)


def render_terminal(ins: Inspection, color: str = "truecolor", scale: str = "rank",
                    top_k: int = 3, width: int = 100) -> str:
    """Heatmap lines per layer/branch, then the top-k heads of every position."""
    if color not in COLOR_MODES[1:]:
        raise InspectError(f"color={color!r}; resolve 'auto' first or choose one of {COLOR_MODES[1:]}")
    if top_k < 0:
        raise InspectError(f"top_k={top_k} must be >= 0")
    lines: list[str] = []
    for layer in ins.layers:
        for m in range(layer.num_branches):
            g = layer.branch_gates(m)
            shade = scale_values(g, scale)
            lines.append(f"layer {layer.layer_id} branch {m}: gate mean {sum(g) / len(g):.3f} "
                         f"min {min(g):.3f} max {max(g):.3f} ({scale} shading)")
            if color == "none":  # plain text: value after every token
                cells = [f"{_visible(t.display or t.piece)}[{v:.2f}]" for t, v in zip(ins.tokens, g)]
            else:
                cells = [_paint(_visible(t.display) or "\u00b7", gate_rgb(s), color)
                         for t, s in zip(ins.tokens, shade)]
            lines.extend(_wrap(cells, ins.tokens, width, color))
            lines.append("")
        if color != "none":
            legend = "".join(_paint("  ", gate_rgb(i / 10), color) for i in range(11))
            lines.append(f"legend: low {legend} high")
            lines.append("")
        if top_k:
            lines.append(f"layer {layer.layer_id}: top {top_k} heads per position by ||W_V e_h|| "
                         f"(n, head, table row, row norm, contribution)")
            for t, tokn in enumerate(ins.tokens):
                gates = " ".join(f"{v:.3f}" for v in layer.gates[t])
                hits = "; ".join(
                    f"n={h.n} h{h.head} [{ngram_text(ins.tokens, h, t)}] row {h.row} "
                    f"|r|={h.row_norm:.3f} c={h.contribution:.3f}"
                    for h in layer.top_heads(t, top_k))
                lines.append(f"  {t:>4} {repr(tokn.piece)[1:-1]:<14.14} gate {gates}  {hits}")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _wrap(cells: list[str], tokens: Sequence[Token], width: int, color: str) -> list[str]:
    out, line, used = [], "", 0
    for cell, tokn in zip(cells, tokens):
        n = len(_visible(tokn.display or tokn.piece)) + (6 if color == "none" else 0)
        if used and used + n > width:
            out.append(line)
            line, used = "", 0
        line += cell
        used += n
        if "\n" in tokn.display:  # keep the text's own line breaks
            out.append(line)
            line, used = "", 0
    if line:
        out.append(line)
    return out


# ----------------------------------------------------------------------------- HTML
def page_template() -> str:
    """The single-file page shared by the HTML export and ``engram serve`` (inline CSS/JS)."""
    return PAGE


def _script_json(obj: Any) -> str:
    # "</" would end the <script> element early; "<\/" is the same JSON string.
    return json.dumps(obj, ensure_ascii=False).replace("</", "<\\/")


def render_page(data: Optional[dict[str, Any]], live: bool, title: str = "Engram gates") -> str:
    """The page with ``data`` (an ``Inspection.to_dict()``) embedded, or empty for the live app."""
    html = page_template()
    config = {"live": live, "ramp": [[a, list(c)] for a, c in RAMP]}
    return (html.replace("__TITLE__", title)
                .replace("__CONFIG__", _script_json(config))
                .replace("__DATA__", _script_json(data)))


def render_html(ins: Inspection) -> str:
    """A standalone HTML heatmap of one inspection (works offline, no external resources)."""
    return render_page(ins.to_dict(), live=False)


def write_outputs(ins: Inspection, html_path: Optional[str], json_path: Optional[str]) -> None:
    """Write the standalone HTML page and/or the JSON document (either path may be None)."""
    if html_path:
        Path(html_path).parent.mkdir(parents=True, exist_ok=True)
        Path(html_path).write_text(render_html(ins), encoding="utf-8")
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(ins.to_dict(), ensure_ascii=False) + "\n",
                                   encoding="utf-8")


def print_inspection(ins: Inspection, color: str = "auto", scale: str = "rank",
                     top_k: int = 3, stream: Optional[TextIO] = None) -> None:
    stream = stream or sys.stdout  # looked up at call time (tests and redirects swap it)
    stream.write(render_terminal(ins, resolve_color(color, stream), scale, top_k))
