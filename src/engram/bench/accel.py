"""``engram bench accel``: what ``train.compile`` and ``train.dtype=bf16`` do to training speed and loss.

Three measurements, each in one process with both sides interleaved, so that machine noise hits
them alike (on a shared machine read the ratios, not the absolute rates):

- compile, demo preset: one model trained by ``TrainLoop`` at the demo's settings; its blocks are
  compiled (``engram.model.accel.compile_backbone``) and uncompiled in turn, ``steps`` training
  steps per side and repeat, the side that goes first alternating. The first compiled steps
  (``warmup_steps``) are timed apart: compile time is their time minus as many eager steps.
- compile, retrofit: the same on SmolLM2-135M with one Engram layer (the retrofit trainer's
  defaults: batch 4 x 256, row-sparse Adam for the tables), its decoder layers compiled.
- bf16 against fp32: two copies of one initialised model (the demo's Engram preset) trained on
  the same batches, one step each in turn, for ``bf16_steps`` steps; training loss along the way,
  validation loss at the end (``eval_batches`` batches, each in its own precision), seconds per step.

``accel_page`` renders the results page from the JSON result alone.
"""

from __future__ import annotations

import contextlib
import copy
import os
import platform
import statistics
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from engram.bench.config import AccelBenchConfig as _A
from engram.bench.offload import _bench_workspace
from engram.bench.step import DEMO_STEP
from engram.config import RetrofitConfig, TrainConfig, preset
from engram.data import shards as data
from engram.errors import EngramError
from engram.model import accel
from engram.model.lm import EngramLM
from engram.training.trainer import TrainLoop, _dataset_compression, build_optimizers


def _loop(model: torch.nn.Module, cfg: TrainConfig, ds: "data.Dataset") -> TrainLoop:
    state = {"step": 0, "best_val_loss": None, "data_seed": cfg.seed, "log_loss_sum": 0.0, "log_loss_count": 0,
             "train_s": 0.0, "tokens_seen": 0}
    return TrainLoop(model, build_optimizers(model, cfg), cfg, ds, None, state, torch.device("cpu"), False)


def _timed_steps(loop: TrainLoop, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        loop.train_step()
        out.append(time.perf_counter() - t0)
    return out


def _compile_sides(model: torch.nn.Module, loop: TrainLoop, steps: int, repeats: int, warmup_steps: int,
                   log: Callable[[str], None]) -> dict[str, Any]:
    """Eager and compiled steps of one model in turn (see the module docstring)."""
    eager_warm = _timed_steps(loop, warmup_steps)  # first steps of the eager side (allocator, caches)
    accel.compile_backbone(model)
    compiled_warm = _timed_steps(loop, warmup_steps)
    log(f"compiled in {sum(compiled_warm) - sum(eager_warm):.1f} s")
    per: dict[str, list[float]] = {"eager": [], "compiled": []}
    for r in range(repeats):
        for side in (("eager", "compiled") if r % 2 == 0 else ("compiled", "eager")):
            if side == "compiled":
                accel.compile_backbone(model)
            else:
                accel.uncompile_backbone(model)
            per[side].append(steps / sum(_timed_steps(loop, steps)))
        log(f"repeat {r + 1}/{repeats}: eager {per['eager'][-1]:.3f}, compiled {per['compiled'][-1]:.3f} steps/s")
    accel.uncompile_backbone(model)
    ratios = [c / e for c, e in zip(per["compiled"], per["eager"])]
    return {"steps_per_s": per, "compiled_over_eager": ratios, "ratio_median": statistics.median(ratios),
            "ratio_spread": [min(ratios), max(ratios)],
            "compile_s": sum(compiled_warm) - sum(eager_warm),
            "warmup_step_s": {"eager": eager_warm, "compiled": compiled_warm}}


def _demo_step(cfg: Any) -> dict[str, Any]:
    """The demo's batch shape and lr, its sequences cut to what the preset can read (tiny: 64)."""
    return {**DEMO_STEP, "seq_len": min(DEMO_STEP["seq_len"], cfg.max_seq_len)}


def _compile_preset(name: str, ds: "data.Dataset", data_path: Path, s: dict[str, Any], log) -> dict[str, Any]:
    cfg = preset(name, int(ds.meta["vocab_size"]))
    tc = TrainConfig(steps=10_000, seed=s["seed"], **_demo_step(cfg))
    torch.manual_seed(tc.seed)
    model = EngramLM(cfg, _dataset_compression(cfg, ds, data_path)).train()
    res = _compile_sides(model, _loop(model, tc, ds), s["steps"], s["repeats"], s["warmup_steps"],
                         lambda m: log(f"{name}: {m}"))
    return {"model": name, "batch": [tc.batch_size, tc.seq_len], **res}


def _compile_retrofit(retrofit_data: str, s: dict[str, Any], log) -> dict[str, Any]:
    from engram.hashing.compression import build_compression
    from engram.retrofit.base import load_base
    from engram.retrofit.model import RetrofitLM
    from engram.retrofit.trainer import DEFAULT_TRAIN, check_data_tokenizer

    ds = data.load_dataset(retrofit_data)
    base = load_base("smollm2-135m")
    check_data_tokenizer(ds, base, retrofit_data)
    cfg = RetrofitConfig()
    torch.manual_seed(s["seed"])
    model = RetrofitLM(base.model, cfg, build_compression(base.tokenizer).lookup, base.pad_id)
    try:
        tc = TrainConfig.from_dict({**DEFAULT_TRAIN.to_dict(), "steps": 10_000, "seed": s["seed"]})
        res = _compile_sides(model, _loop(model, tc, ds), s["retrofit_steps"], s["repeats"], s["warmup_steps"],
                             lambda m: log(f"smollm2 retrofit: {m}"))
    finally:
        accel.uncompile_backbone(model)
        model.remove_hooks()
    return {"model": f"smollm2-135m + Engram at layer {list(cfg.layers)}", "batch": [tc.batch_size, tc.seq_len],
            **res}


def _bf16_vs_fp32(ds: "data.Dataset", data_path: Path, s: dict[str, Any], log) -> dict[str, Any]:
    cfg = preset(s["bf16_preset"], int(ds.meta["vocab_size"]))
    base = dict(steps=s["bf16_steps"], seed=s["seed"], eval_batches=s["eval_batches"], **_demo_step(cfg))
    torch.manual_seed(s["seed"])
    fp32_model = EngramLM(cfg, _dataset_compression(cfg, ds, data_path)).train()
    models = {"fp32": fp32_model, "bf16": copy.deepcopy(fp32_model)}
    loops = {k: _loop(m, TrainConfig(dtype=k, **base), ds) for k, m in models.items()}
    losses: dict[str, list[float]] = {k: [] for k in loops}
    step_s: dict[str, list[float]] = {k: [] for k in loops}
    for i in range(s["bf16_steps"]):
        for k in (("fp32", "bf16") if i % 2 == 0 else ("bf16", "fp32")):
            loop = loops[k]
            before = loop.loss_sum
            step_s[k].append(_timed_steps(loop, 1)[0])
            losses[k].append(loop.loss_sum - before)
        if (i + 1) % 10 == 0:
            log(f"bf16 vs fp32: step {i + 1}/{s['bf16_steps']}: loss fp32 {losses['fp32'][-1]:.4f}, "
                f"bf16 {losses['bf16'][-1]:.4f}")
    val = {k: loop.eval_fields()["val_loss"] for k, loop in loops.items()}
    tail = max(1, min(10, s["bf16_steps"]))
    return {"model": s["bf16_preset"], "steps": s["bf16_steps"], "batch": [base["batch_size"], base["seq_len"]],
            "train_loss": losses, "last_train_loss_mean": {k: statistics.fmean(v[-tail:]) for k, v in losses.items()},
            "tail_steps": tail, "val_loss": val, "val_loss_bf16_minus_fp32": val["bf16"] - val["fp32"],
            "eval_batches": s["eval_batches"], "step_s_median": {k: statistics.median(v) for k, v in step_s.items()},
            "bf16_over_fp32_time": statistics.median(step_s["bf16"]) / statistics.median(step_s["fp32"]),
            "step_s": step_s}


def bench_accel(data_dir: str, *, preset: str = _A.preset, steps: int = _A.steps, repeats: int = _A.repeats,
                warmup_steps: int = _A.warmup_steps, retrofit_data: Optional[str] = _A.retrofit_data,
                retrofit_steps: int = _A.retrofit_steps, bf16_preset: str = _A.bf16_preset,
                bf16_steps: int = _A.bf16_steps, eval_batches: int = _A.eval_batches, threads: int = _A.threads,
                seed: int = _A.seed, progress: bool = False) -> dict[str, Any]:
    """The three measurements of the module docstring on the CPU; a JSON-able result."""
    if min(steps, repeats, warmup_steps, retrofit_steps, bf16_steps, eval_batches, threads) < 1:
        raise EngramError("steps, repeats, warmup_steps, retrofit_steps, bf16_steps, eval_batches and threads "
                          "must be >= 1")
    s = dict(steps=steps, repeats=repeats, warmup_steps=warmup_steps, retrofit_steps=retrofit_steps,
             bf16_preset=bf16_preset, bf16_steps=bf16_steps, eval_batches=eval_batches, seed=seed)
    log = print if progress else (lambda m: None)
    t0 = time.perf_counter()
    with ExitStack() as closing:
        tmp, data_path, ds = _bench_workspace(closing, None, threads, data_dir, progress, prefix="engram-accel-")
        closing.enter_context(_fresh_compile_cache(tmp / "inductor"))
        result: dict[str, Any] = {
            "bench": "accel", "date": time.strftime("%Y-%m-%d", time.gmtime()),
            "machine": {"cpus": _cpus(), "platform": platform.platform(), "processor": cpu_name(),
                        "python": platform.python_version(), "torch": torch.__version__, "threads": threads},
            "settings": s}
        result["compile"] = [_compile_preset(preset, ds, data_path, s, log)]
        if retrofit_data is not None:
            result["compile"].append(_compile_retrofit(retrofit_data, s, log))
        result["bf16"] = _bf16_vs_fp32(ds, data_path, s, log)
    result["elapsed_s"] = time.perf_counter() - t0
    return result


@contextlib.contextmanager
def _fresh_compile_cache(path: Path) -> Iterator[None]:
    """Inductor's on-disk cache in an empty directory for this run: compile time is a cold
    compile's, not a read of kernels an earlier run left behind."""
    old = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    try:
        yield
    finally:
        if old is None:
            del os.environ["TORCHINDUCTOR_CACHE_DIR"]
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = old


def _cpus() -> int:
    return os.cpu_count() or 0


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (else the platform module's guess)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def accel_page(r: dict[str, Any], command: str) -> str:
    """The results page of one ``bench_accel`` result: every number below is read from ``r``."""
    m, s, b = r["machine"], r["settings"], r["bf16"]
    rows = ["| model (batch) | eager steps/s per repeat | compiled steps/s per repeat | compiled / eager per repeat "
            "| median | compile time |", "|---|---|---|---|---:|---:|"]
    for c in r["compile"]:
        e = " / ".join(f"{v:.3f}" for v in c["steps_per_s"]["eager"])
        k = " / ".join(f"{v:.3f}" for v in c["steps_per_s"]["compiled"])
        q = " / ".join(f"{v:.3f}" for v in c["compiled_over_eager"])
        rows.append(f"| {c['model']} ({c['batch'][0]} x {c['batch'][1]}) | {e} | {k} | {q} | "
                    f"**{c['ratio_median']:.3f}** | {c['compile_s']:.1f} s |")
    curve = ["| step | fp32 train loss | bf16 train loss |", "|---:|---:|---:|"]
    n = b["steps"]
    for i in sorted({*range(9, n, max(1, n // 5)), n - 1}):
        curve.append(f"| {i + 1} | {b['train_loss']['fp32'][i]:.4f} | {b['train_loss']['bf16'][i]:.4f} |")
    return "\n".join([
        f"# bf16 autocast and torch.compile on the CPU ({r['date']})", "",
        "Command:", "", "```bash", command, "```", "",
        f"Machine: {m['cpus']} CPUs ({m['processor']}; {m['platform']}), Python {m['python']}, torch {m['torch']}, "
        f"{m['threads']} torch thread(s). The machine was shared with other jobs: compare the sides of each "
        f"measurement (they ran interleaved in one process), not the absolute rates. No GPU was used; "
        f"nothing here says how either option behaves on one (docs/gpu.md).", "",
        "## torch.compile (`train.compile`)", "",
        f"Training steps (`TrainLoop.train_step`: forward, backward, clip, optimizer) of one model, its blocks "
        f"compiled and uncompiled in turn: {s['steps']} steps per side and repeat for the demo preset, "
        f"{s['retrofit_steps']} for the retrofit, {s['repeats']} repeats, the side going first alternating. Compiled: "
        f"attention and dense FFNs of `EngramLM` blocks (DeepSeekMoE FFNs and the Engram layer stay eager), or "
        f"every decoder layer of the retrofit's base (Engram runs in its pre-hook, eager). Compile time: the first "
        f"{s['warmup_steps']} compiled step(s) minus the first {s['warmup_steps']} eager step(s), with inductor's on-disk "
        f"cache empty at the start (a cold compile; the retrofit row compiles after the demo preset's).", "",
        *rows, "",
        "## bf16 autocast (`train.dtype=bf16`) against fp32", "",
        f"`{b['model']}` at the demo's settings ({b['batch'][0]} x {b['batch'][1]} tokens per step, its learning "
        f"rate and warmup, a {b['steps']}-step cosine schedule), two copies of one initialisation trained on the same "
        f"batches, one step each in turn. One run from one initialisation: the difference between them is "
        f"not tested against run-to-run variation.", "",
        f"- validation loss after {b['steps']} steps ({b['eval_batches']} batches, each model in its own precision): "
        f"fp32 **{b['val_loss']['fp32']:.4f}**, bf16 **{b['val_loss']['bf16']:.4f}** "
        f"(bf16 - fp32 = {b['val_loss_bf16_minus_fp32']:+.4f});",
        f"- mean training loss of the last {b['tail_steps']} steps: fp32 {b['last_train_loss_mean']['fp32']:.4f}, "
        f"bf16 {b['last_train_loss_mean']['bf16']:.4f};",
        f"- median seconds per step: fp32 {b['step_s_median']['fp32']:.3f}, bf16 {b['step_s_median']['bf16']:.3f} "
        f"(bf16 takes **{b['bf16_over_fp32_time']:.2f}x** the time of fp32 on this CPU; not tuned).", "",
        *curve, "",
        f"Whole run: {r['elapsed_s']:.0f} s.", ""])
