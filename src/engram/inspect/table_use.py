"""Is the table used? The model's loss with its trained tables against controls that destroy what
the tables store while keeping everything else.

A trained Engram model could get its gain from the extra projections, the gate and the short
conv alone, with tables whose content does not matter ("would a table of capacity 1 do as
well?"). Each control below rewrites one thing, scores the same held-out windows, and puts
the model back bit for bit:

    removed          every Engram layer adds zeros (``model(ids, ablate_engram=True)``, the
                     ablation of ``engram analyze ablate``)
    mean_row         every row of a hash head's table replaced by that head's mean row: a table of
                     capacity 1 per head (every lookup of a head returns the same vector)
    shuffled_rows    the rows of each head's table permuted among themselves (seeded): the same
                     set of vectors, each N-gram reading another N-gram's row
    redrawn_rows     each row replaced by a random direction at the row's trained L2 norm (seeded):
                     the norms (hence the scale the projections saw) kept, the content gone
    reseeded_hash    the hash multipliers drawn from another seed (same prime table sizes): the
                     table untouched, but each N-gram hashed to another N-gram's row

Controls act on every Engram layer at once. The measure, per control ``c``:

    delta_loss(c)    = loss_c - loss_trained
    fraction_kept(c) = (loss_removed - loss_c) / (loss_removed - loss_trained)

the share of Engram's gain over "Engram removed" that survives the control: 1 = the tables'
content does not matter, 0 = as bad as no Engram, below 0 = worse than no Engram. It is
undefined (None) when removing Engram does not raise the loss.

The rows are rewritten in place through the table interface (``EngramTable.full`` /
``load_full``), so only tables held in memory are accepted; a table served from a file is
refused with a one-line error. :func:`table_use_page` renders the markdown results page from
the JSON :func:`table_use` returns (no number on the page is typed by hand).

Shape legend
    R rows of one layer's table (all heads)   Dh row width   N_h rows of head h   W windows   T window
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import platform
from contextlib import contextmanager
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from engram.config import TableLocation
from engram.data import shards
from engram.hashing.hasher import NgramHasher
from engram.inspect.analysis import AnalysisError, Sample, score_samples
from engram.inspect.settings import TABLE_USE_CONTROLS
from engram.model.protocol import LanguageModel

FORMAT = "engram.table-use/1"
CONTROLS = TABLE_USE_CONTROLS
DESCRIPTIONS = {
    "removed": "Engram removed (every Engram layer adds zeros)",
    "mean_row": "every row replaced by its hash head's mean row (capacity 1)",
    "shuffled_rows": "rows shuffled among themselves within each head (seeded)",
    "redrawn_rows": "rows re-drawn: random directions at each row's trained norm (seeded)",
    "reseeded_hash": "hashes re-seeded: each N-gram reads another N-gram's row",
}
RESEED_OFFSET = 1  # the control's hash seed is the model's seed + RESEED_OFFSET + the control seed


class TableUseError(AnalysisError):
    """A model or setting the table-use controls cannot take; the message names the fix."""


# ----------------------------------------------------------------------------- the row transforms
def _head_slices(head_sizes: Sequence[int]) -> list[slice]:
    out, start = [], 0
    for n in head_sizes:
        out.append(slice(start, start + int(n)))
        start += int(n)
    return out


def mean_rows(table: torch.Tensor, head_sizes: Sequence[int]) -> torch.Tensor:
    """[R, Dh] -> [R, Dh]: every row of head h is head h's mean row (summed in float64)."""
    out = torch.empty_like(table)
    for s in _head_slices(head_sizes):
        out[s] = table[s].double().mean(dim=0).to(table.dtype)
    return out


def shuffled_rows(table: torch.Tensor, head_sizes: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    """[R, Dh] -> [R, Dh]: the rows of each head permuted among themselves."""
    out = torch.empty_like(table)
    for s in _head_slices(head_sizes):
        perm = torch.randperm(s.stop - s.start, generator=generator) + s.start
        out[s] = table[perm]
    return out


def redrawn_rows(table: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """[R, Dh] -> [R, Dh]: each row a uniformly random direction scaled to the row's L2 norm
    (computed in float64; a zero row stays zero)."""
    t = table.double()
    norms = t.norm(dim=1, keepdim=True)  # [R, 1]
    d = torch.randn(t.shape, generator=generator, dtype=torch.float64)
    d = d / d.norm(dim=1, keepdim=True).clamp_min(1e-300)
    return (d * norms).to(table.dtype)


def reseeded_hasher(hasher: NgramHasher, seed: int) -> NgramHasher:
    """The same hasher (config, vocabulary, compression, prime table sizes) with hash seed ``seed``."""
    new = NgramHasher(dataclasses.replace(hasher.cfg, seed=int(seed)), hasher.tokenizer_vocab_size, hasher.lookup)
    if new.table_sizes != hasher.table_sizes:  # sizes depend on the rows per head only; checked anyway
        raise TableUseError(f"hash seed {seed} gives other table sizes; this model cannot take the "
                            f"reseeded_hash control")
    return new


# ----------------------------------------------------------------------------- applying a control
def check_tables_in_memory(model: LanguageModel) -> None:
    """Refuse models without Engram layers and tables that are not held in memory."""
    if not model.engram_layers or model.hasher is None:
        raise TableUseError("the model has no Engram layers, so there is no table to test; give a run "
                            "trained with an engram-* preset or a retrofit adapter with --layers")
    for layer in model.engram_layers:
        loc = layer.table.location
        if loc is not TableLocation.MEMORY:
            raise TableUseError(f"layer {layer.layer_id}'s table is served from location {loc.value!r}; the "
                                f"table-use controls rewrite rows in memory: load the model without "
                                f"--table/--storage (engram.load(path) keeps the tables in memory)")


def check_control(control: str) -> None:
    if control not in CONTROLS:
        raise TableUseError(f"unknown control {control!r}; choose from {', '.join(CONTROLS)}")


@contextmanager
def table_control(model: LanguageModel, control: str, seed: int = 0) -> Iterator[bool]:
    """Apply ``control`` to every Engram layer of ``model`` inside the block; yields whether the
    forward must ablate Engram (the ``removed`` control). On exit, also on error, the tables and
    the hasher are exactly those of before (the saved rows are copied back; the hasher object
    is put back)."""
    check_control(control)
    check_tables_in_memory(model)
    if control == "removed":
        yield True
        return
    if control == "reseeded_hash":
        hasher = model.hasher
        model.hasher = reseeded_hasher(hasher, hasher.cfg.seed + RESEED_OFFSET + int(seed))
        try:
            yield False
        finally:
            model.hasher = hasher
        return
    gen = torch.Generator().manual_seed(int(seed))
    saved: list[tuple[Any, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for layer in model.engram_layers:  # in depth order: the generator's draws are fixed
                table = layer.table
                trained = table.full().detach().clone()
                saved.append((table, trained))
                sizes = layer.multi_head_embedding.head_sizes
                w = trained.cpu()
                if control == "mean_row":
                    new = mean_rows(w, sizes)
                elif control == "shuffled_rows":
                    new = shuffled_rows(w, sizes, gen)
                else:
                    new = redrawn_rows(w, gen)
                table.load_full(new)
        yield False
    finally:
        with torch.no_grad():
            for table, trained in saved:
                table.load_full(trained)


# ----------------------------------------------------------------------------- scoring
def fraction_of_gain_kept(loss_removed: float, loss_trained: float, loss_control: float) -> Optional[float]:
    """(loss_removed - loss_control) / (loss_removed - loss_trained); None when removing Engram does
    not raise the loss (no gain to keep)."""
    gain = loss_removed - loss_trained
    if not gain > 0:
        return None
    return (loss_removed - loss_control) / gain


def eval_windows(shard: "shards.Shard", seq_len: int, windows: int) -> list[Sample]:
    """``windows`` windows of ``seq_len`` targets spread evenly over ``shard``: the windows
    ``engram eval --max-batches 1 --batch-size W`` scores (every target counts)."""
    if windows < 1:
        raise TableUseError(f"windows={windows} must be >= 1")
    x, y = next(shards.iter_eval_batches(shard, windows, seq_len, max_batches=1))  # [W, T] each
    ids = torch.cat([x, y[:, -1:]], dim=1).tolist()
    return [Sample(tuple(r), (False,) + (True,) * seq_len) for r in ids]


def table_use(model: LanguageModel, samples: Sequence[Sample], pad_id: int = 0,
              controls: Sequence[str] = CONTROLS, seed: int = 0, batch_size: int = 16,
              progress: bool = False) -> dict[str, Any]:
    """Loss and accuracy of ``model`` on ``samples`` as trained and under each control (``removed``
    is always scored: the fraction kept needs it). Returns the JSON body (see the module docstring)."""
    for c in controls:
        check_control(c)
    check_tables_in_memory(model)
    if batch_size < 1:
        raise TableUseError(f"batch_size={batch_size} must be >= 1")
    if not samples:
        raise TableUseError("no windows to score; give a split with at least seq_len + 1 tokens")
    order = ["removed"] + [c for c in CONTROLS if c in controls and c != "removed"]
    passes = ["trained"] + order
    scored = {}
    for name in tqdm(passes, desc="table-use", disable=not progress, leave=False):
        if name == "trained":
            scored[name] = score_samples(model, samples, pad_id, batch_size)
            continue
        with table_control(model, name, seed) as ablate:
            scored[name] = score_samples(model, samples, pad_id, batch_size, ablate_engram=ablate)
    trained, removed = scored["trained"], scored["removed"]
    rows = []
    for name in order:
        s = scored[name]
        rows.append({"control": name, "description": DESCRIPTIONS[name], "loss": s.loss, "accuracy": s.accuracy,
                     "delta_loss": s.loss - trained.loss,
                     "fraction_kept": fraction_of_gain_kept(removed.loss, trained.loss, s.loss)})
    hasher = model.hasher
    return {
        "format": FORMAT, "tokens": trained.tokens, "windows": len(samples), "seed": seed,
        "loss_trained": trained.loss, "accuracy_trained": trained.accuracy,
        "gain_nats": removed.loss - trained.loss, "controls": rows,
        "hash_seed": hasher.cfg.seed, "reseeded_hash_seed": hasher.cfg.seed + RESEED_OFFSET + int(seed),
        "engram": {"layers": [l.layer_id for l in model.engram_layers],
                   "heads_per_layer": hasher.num_heads, "max_ngram_size": hasher.max_ngram_size,
                   "rows": {str(l.layer_id): int(l.table.num_embeddings) for l in model.engram_layers},
                   "row_dim": int(model.engram_layers[0].table.embedding_dim)},
        "param_counts": model.param_counts(),
    }


def machine() -> dict[str, Any]:
    """Where a result was measured (for its page)."""
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def today() -> str:
    return datetime.datetime.now(datetime.timezone.utc).date().isoformat()


# ----------------------------------------------------------------------------- the page
def _num(v: Optional[float], fmt: str) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def _model_section(r: dict[str, Any]) -> list[str]:
    e, p = r["engram"], r["param_counts"]
    rows = sum(e["rows"].values())
    step = f", step {r['step']:,}" if r.get("step") is not None else ""
    lines = [f"## {r.get('label') or r['ckpt']}", ""]
    if r.get("note"):
        lines += [r["note"], ""]
    lines += [
        f"`{r['ckpt']}` ({r.get('kind', 'model')}{step}), data `{r['data']}` ({r['split']} split). Engram at layer(s) "
        f"{', '.join(str(l) for l in e['layers'])}: {e['heads_per_layer']} hash heads per layer "
        f"(N-grams up to {e['max_ngram_size']}), {rows:,} rows of {e['row_dim']} in all; "
        f"{p['tables']:,} table parameters of {p['total']:,}.",
        "",
        f"Scored on {r['windows']} windows of {r['seq_len']} tokens ({r['tokens']:,} targets) spread evenly over "
        f"the split; control seed {r['seed']} (re-seeded hash: seed {r['hash_seed']} -> {r['reseeded_hash_seed']}). "
        f"Measured {r['date']} in {r['seconds']:.0f} s.",
        "",
        "| model | loss (nats/token) | change vs trained | fraction of Engram's gain kept | top-1 accuracy |",
        "|---|---:|---:|---:|---:|",
        f"| trained | {r['loss_trained']:.4f} | | 1 | {r['accuracy_trained']:.4f} |",
    ]
    for c in r["controls"]:
        lines.append(f"| {c['description']} | {c['loss']:.4f} | {c['delta_loss']:+.4f} | "
                     f"{_num(c['fraction_kept'], '.3f')} | {c['accuracy']:.4f} |")
    kept = [c["fraction_kept"] for c in r["controls"] if c["control"] != "removed" and c["fraction_kept"] is not None]
    if kept:
        lines += ["", f"Removing Engram costs {r['gain_nats']:.4f} nats/token; the controls that keep Engram but "
                      f"destroy what its tables store keep between {min(kept):.3f} and {max(kept):.3f} of that gain."]
    elif r["gain_nats"] <= 0:
        lines += ["", f"Removing Engram does not raise the loss here ({r['gain_nats']:+.4f} nats/token): there is "
                      f"no gain to keep."]
    lines += ["", "Command:", "", "```bash", r["command"], "```", ""]
    return lines


def table_use_page(results: Sequence[dict[str, Any]], command: str, title: str = "") -> str:
    """The markdown results page of one or more :func:`table_use` results (as the CLI writes them:
    with ``ckpt``, ``data``, ``split``, ``seq_len``, ``date``, ``seconds``, ``machine`` and
    ``command``); every number is read from ``results``."""
    if not results:
        raise TableUseError("no results to render; give at least one JSON file from engram analyze table-use")
    for r in results:
        if r.get("format") != FORMAT:
            raise TableUseError(f"a result has format {r.get('format')!r}, not {FORMAT!r}; give JSON written by "
                                f"engram analyze table-use --json")
    dates = sorted({r["date"] for r in results})
    machines = []
    for r in results:
        m = r["machine"]
        line = (f"{m['cpus']} CPUs ({m['platform']}), Python {m['python']}, torch {m['torch']}, "
                f"{m['threads']} torch thread(s)")
        if line not in machines:
            machines.append(line)
    lines = [
        f"# {title or 'Is the table used?'} ({', '.join(dates)})", "",
        "Each control rewrites what the Engram tables hold, scores the same held-out windows, and puts the "
        "model back bit for bit (`engram analyze table-use`, docs/inspect.md). Fraction of Engram's gain kept "
        "= (loss with Engram removed - loss under the control) / (loss with Engram removed - trained loss): "
        "1 = the tables' content does not matter, 0 = as bad as no Engram, below 0 = worse than no Engram. "
        "Controls act on every Engram layer at once.", "",
        "Machine: " + "; ".join(machines) + " (shared with other work: the seconds below are wall-clock "
        "under load; the losses do not depend on it).", "",
        "Page rendered from the JSON results by:", "", "```bash", command, "```", "",
    ]
    for r in results:
        lines += _model_section(r)
    return "\n".join(lines)


def as_json(obj: Any) -> Any:
    """``obj`` with numpy scalars made plain and NaN made None, ready for ``json.dumps``."""
    if isinstance(obj, dict):
        return {str(k): as_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [as_json(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
