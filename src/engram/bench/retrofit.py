"""``engram bench retrofit``: inference and training speed of a retrofitted model against its base.

Every variant runs in one process on the same batch, interleaved round by round (base,
Engram, and with ``lora_rank`` LoRA and LoRA + Engram), so machine load affects all alike, and
every variant's overhead is its time over *the same round's* base time: one base timing for the
whole figure, reported beside it (``base_tokens_per_s``). The retrofit is the base object itself with Engram's
hooks on: ``without_engram()`` switches them off for the base's turn, so both share weights,
threads and memory layout. Inference is a full forward of [B,T] without gradients (what
evaluation and prefill do); training is forward + backward + optimizer step of the Engram
parameters with the backbone frozen. Engram's weights are randomised first: at init its value
projection is zero but the work is the same either way. ``engram_ms`` times the hashing and the
Engram layers alone on the batch's shape; on a loaded machine it is the steadier estimate of
what Engram adds (``engram_share_of_base_forward``).

With ``lora_rank`` it also times LoRA of that rank on the same base (Engram off) and LoRA +
Engram: inference in the loop above, and training tokens/s with only the adapter's parameters
trained (LoRA: AdamW; both: the retrofit trainer's optimizers).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Any, Callable, Optional

import torch

from engram.bench.config import RetrofitBenchConfig as _R
from engram.config import RetrofitConfig, TrainConfig
from engram.errors import EngramError
from engram.hashing.compression import build_compression
from engram.retrofit.base import BaseModel, load_base
from engram.retrofit.model import RetrofitLM
from engram.training.optimization import optimizer_params, optimizer_step
from engram.training.trainer import build_optimizers


def _spread(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def _time_train_steps(model: RetrofitLM, x: torch.Tensor, y: torch.Tensor,
                      opts: dict[str, torch.optim.Optimizer], steps: int) -> list[float]:
    """Seconds of each of ``steps`` training steps (forward, backward, ``opts`` step) after one
    untimed step that warms the optimizer state up."""
    params = optimizer_params(opts)
    out = []
    model.train()
    for i in range(steps + 1):
        t0 = time.perf_counter()
        model(x, y).loss.backward()
        optimizer_step(opts, params, 1.0)
        if i:
            out.append(time.perf_counter() - t0)
    model.eval()
    return out


def _add_lora(model: RetrofitLM, rank: int) -> None:
    """LoRA of ``rank`` with a random B: it starts at zero, and a zero B is no less work but reads
    as a no-op."""
    model.add_lora(rank)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.lora_state().items():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def _interleaved(model: RetrofitLM, x: torch.Tensor, modes: dict[str, Callable[[], Any]],
                 repeats: int) -> dict[str, list[float]]:
    """Seconds of one no-grad forward of ``x`` per mode (a context manager factory), ``repeats``
    rounds of every mode in turn after one untimed round; the order rotates each round so no mode
    always follows another."""
    names = list(modes)
    times: dict[str, list[float]] = {m: [] for m in names}
    for i in range(repeats + 1):
        for m in names[i % len(names):] + names[:i % len(names)]:
            with modes[m](), torch.no_grad():
                t0 = time.perf_counter()
                model(x)
                s = time.perf_counter() - t0
            if i:
                times[m].append(s)
    return times


def bench_retrofit(base: str = _R.base, layers: tuple[int, ...] = _R.layers, batch_size: int = _R.batch_size,
                   seq_len: int = _R.seq_len, repeats: int = _R.repeats, train_steps: int = _R.train_steps,
                   rows_per_head: int = _R.rows_per_head, threads: Optional[int] = _R.threads,
                   loaded: Optional[BaseModel] = None, lora_rank: int = _R.lora_rank, progress: bool = False) -> dict[str, Any]:
    """Tokens/s of base and retrofit at the same batch (see the module docstring)."""
    if threads:
        torch.set_num_threads(threads)
    b = loaded or load_base(base, progress=progress)
    cfg = RetrofitConfig(base=b.name, layers=layers, rows_per_head=rows_per_head)
    model = RetrofitLM(b.model, cfg, build_compression(b.tokenizer).lookup, b.pad_id)
    try:
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for e in model.engram_layers:
                e.value_proj.weight.copy_(torch.randn(e.value_proj.weight.shape, generator=g) * 0.02)
        V = model.cfg.vocab_size
        x = torch.randint(0, V, (batch_size, seq_len), generator=g)
        n = x.numel()

        # Engram's own training steps first, before any LoRA weights exist
        tcfg = TrainConfig(steps=max(train_steps, 1), batch_size=batch_size, seq_len=seq_len, lr=1e-3,
                           table_optimizer="sparse_adam")
        y = torch.randint(0, V, (batch_size, seq_len), generator=g)
        train_s = _time_train_steps(model, x, y, build_optimizers(model, tcfg), train_steps)
        counts = model.param_counts()
        modes: dict[str, Callable[[], Any]] = {"base": model.base_only, "engram": model.without_lora}
        if lora_rank:
            _add_lora(model, lora_rank)
            modes.update(lora=model.without_engram, both=contextlib.nullcontext)
        times = _interleaved(model, x, modes, repeats)
        base_s, retro_s = times["base"], times["engram"]
        # Engram alone (hash + every Engram layer on hidden states of the batch's shape): what the
        # overhead would be on a quiet machine, since it cannot hide behind other work on a CPU.
        h = torch.randn(batch_size, seq_len, 1, model.cfg.hidden_size, generator=g)
        engram_s = []
        with torch.no_grad():
            for _ in range(repeats):
                t0 = time.perf_counter()
                hid = model.compute_hash_ids(x)
                for e in model.engram_layers:
                    e(h, hid[e.layer_id])
                engram_s.append(time.perf_counter() - t0)
        base_tps = [n / s for s in base_s]
        retro_tps = [n / s for s in retro_s]
        ratios = [r / bb for r, bb in zip(retro_s, base_s)]

        lora: dict[str, Any] = {}
        if lora_rank:
            lora_params = list(model.lora_state().values())
            lora = {"lora_rank": lora_rank, "lora_params": sum(p.numel() for p in lora_params)}
            for m in ("lora", "both"):
                ratios_m = [a / b for a, b in zip(times[m], base_s)]
                lora[f"{m}_tokens_per_s"] = statistics.median(n / s for s in times[m])
                lora[f"{m}_overhead"] = statistics.median(ratios_m) - 1.0
                lora[f"{m}_overhead_spread"] = {k: v - 1.0 for k, v in _spread(ratios_m).items()}
            with model.without_engram():
                lora_train = _time_train_steps(model, x, y, {"lora": torch.optim.AdamW(lora_params, lr=1e-4)},
                                               train_steps)
            both_train = _time_train_steps(model, x, y, build_optimizers(model, tcfg), train_steps)
            lora["lora_train_tokens_per_s"] = n / statistics.median(lora_train) if lora_train else None
            lora["both_train_tokens_per_s"] = n / statistics.median(both_train) if both_train else None
    finally:
        model.remove_hooks()
    return {**lora,
        "base": b.name, "layers": list(layers), "batch_size": batch_size, "seq_len": seq_len,
        "repeats": repeats, "threads": torch.get_num_threads(),
        "timing": "one loop, rounds rotating over " + ", ".join(modes) + "; each overhead against the same round's base",
        "base_tokens_per_s": statistics.median(base_tps),
        "retrofit_tokens_per_s": statistics.median(retro_tps),
        "overhead": statistics.median(ratios) - 1.0,
        "overhead_spread": {k: v - 1.0 for k, v in _spread(ratios).items()},
        "base_tokens_per_s_spread": _spread(base_tps), "retrofit_tokens_per_s_spread": _spread(retro_tps),
        "engram_ms": _spread([1e3 * s for s in engram_s]),
        "engram_share_of_base_forward": statistics.median(engram_s) / statistics.median(base_s),
        "train_tokens_per_s": n / statistics.median(train_s) if train_s else None,
        "train_step_s": _spread(train_s) if train_s else None,
        "param_counts": counts,
    }


def _pct(x: float) -> str:
    return f"{100 * x:+.1f}%"


def retrofit_page(runs: list[dict[str, Any]], command: str, machine: str, date: str) -> str:
    """A results page for several ``bench retrofit`` results (one per run), every number from
    them: per run, the one base timing and every variant's tokens/s and overhead against it."""
    if not runs:
        raise EngramError("retrofit_page needs at least one result")
    r0 = runs[0]
    lora = all("lora_tokens_per_s" in r for r in runs)
    lines = [f"# A retrofitted model against its base, {date}", "",
             f"Machine: {machine}. {r0['base']}, Engram before layers {r0['layers']}, batch {r0['batch_size']} x "
             f"{r0['seq_len']}, {r0['threads']} threads, {r0['repeats']} timed rounds per run.", "",
             f"Command: `{command}`", "",
             f"Timing: {r0['timing']}. Each overhead is the median, over the rounds, of the variant's time over the "
             "same round's base time (range in brackets); every variant's tokens/s is a median of its rounds.", "",
             "| run | base tokens/s | Engram tokens/s (overhead) | "
             + (f"LoRA r{r0['lora_rank']} tokens/s (overhead) | LoRA + Engram tokens/s (overhead) | " if lora else "")
             + "Engram alone ms (share of a base forward) | training tokens/s: Engram"
             + (" / LoRA / both |" if lora else " |"),
             "|---|---:|---:|" + ("---:|---:|" if lora else "") + "---:|---:|"]

    def cell(r: dict[str, Any], tps: str, over: str) -> str:
        sp = r[over + "_spread"]
        return f"{r[tps]:,.0f} ({_pct(r[over])}; {_pct(sp['min'])} to {_pct(sp['max'])})"

    for i, r in enumerate(runs, 1):
        row = f"| {i} | {r['base_tokens_per_s']:,.0f} | {cell(r, 'retrofit_tokens_per_s', 'overhead')} | "
        if lora:
            row += f"{cell(r, 'lora_tokens_per_s', 'lora_overhead')} | {cell(r, 'both_tokens_per_s', 'both_overhead')} | "
        row += f"{r['engram_ms']['median']:.1f} ({r['engram_share_of_base_forward']:.1%}) | "
        train = [r["train_tokens_per_s"]] + ([r["lora_train_tokens_per_s"], r["both_train_tokens_per_s"]] if lora else [])
        row += " / ".join("-" if t is None else f"{t:,.0f}" for t in train) + " |"
        lines.append(row)
    lines.append("")
    names = [("overhead", "Engram")] + ([("lora_overhead", f"LoRA r{r0['lora_rank']}"),
                                        ("both_overhead", "LoRA + Engram")] if lora else [])
    for key, name in names:
        xs = [r[key] for r in runs]
        lines.append(f"- {name}: overhead medians {', '.join(_pct(x) for x in xs)} over {len(runs)} runs "
                     f"(every round from {_pct(min(r[key + '_spread']['min'] for r in runs))} to "
                     f"{_pct(max(r[key + '_spread']['max'] for r in runs))}).")
    return "\n".join(lines) + "\n"
