"""``engram bench step``: the time of one training step of ``engram-moe`` against ``moe``, by phase.

Both presets share the backbone (same layers, experts and activated FLOPs); ``engram-moe`` adds
Engram at layer 1. They are trained with the demo's settings (``DEMO_TRAIN``: 16 x 128 tokens,
the trainer's optimizers, clipping and MoE bias update) on the same batches, one step of each
in turn (which one goes first alternates), in one process, so machine noise hits both alike.
Every step is split into phases with wall-clock timers:

    hash        N-gram hash ids of the batch (zero for ``moe``)
    forward     the model's forward and loss (Engram's gather, gate and conv included)
    backward    ``loss.backward()`` (the tables' gradient included)
    clip        the joint gradient-norm clip
    opt_backbone / opt_tables   each optimizer's step and zero_grad
    moe_bias    the routing-bias update

``overhead`` = median over rounds of (engram-moe round time / moe round time) - 1; a round is
``steps`` steps of each model, and round 0 is a warm-up that is not timed. ``overhead_cpu`` is
the same ratio of the main thread's CPU time (``time.thread_time``): with one torch thread all
of a step's work runs on that thread, and its CPU time is far less disturbed than wall time
when other processes share the cores (it still moves with cache and memory contention).
"""

from __future__ import annotations

import statistics
import time
from contextlib import ExitStack
from typing import Any, Optional

import torch

from engram.bench.config import StepBenchConfig
from engram.bench.offload import _bench_workspace, load_average
from engram.config import TrainConfig, preset
from engram.data.shards import get_batch
from engram.errors import EngramError
from engram.model.lm import EngramLM
from engram.training.optimization import optimizer_params, set_lr
from engram.training.sparse_adam import clip_grad_norm_
from engram.training.trainer import _dataset_compression, build_optimizers

PHASES = ("hash", "forward", "backward", "clip", "opt_backbone", "opt_tables", "moe_bias")
MODELS = ("moe", "engram-moe")
DEMO_STEP = dict(batch_size=16, seq_len=128, lr=3e-3, warmup_steps=30)  # the demo's (cli/demo.py)


def _step(model: EngramLM, opts: dict[str, Any], params: list[torch.nn.Parameter], tc: TrainConfig,
          x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """One training step as the trainer takes it (``optimizer_step`` split per optimizer);
    returns the seconds of each phase, (wall clock, this thread's CPU time)."""
    t = [(time.perf_counter(), time.thread_time())]
    hash_ids = model.compute_hash_ids(x)
    t.append((time.perf_counter(), time.thread_time()))
    loss = model(x, y, hash_ids=hash_ids).loss
    t.append((time.perf_counter(), time.thread_time()))
    loss.backward()
    t.append((time.perf_counter(), time.thread_time()))
    if tc.grad_clip > 0:
        clip_grad_norm_(params, tc.grad_clip)
    t.append((time.perf_counter(), time.thread_time()))
    for name in ("backbone", "tables"):
        if name in opts:
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)
        t.append((time.perf_counter(), time.thread_time()))
    model.update_moe_bias()
    t.append((time.perf_counter(), time.thread_time()))
    wall = {p: b[0] - a[0] for p, a, b in zip(PHASES, t, t[1:])}
    cpu = {p: b[1] - a[1] for p, a, b in zip(PHASES, t, t[1:])}
    for name in ("backbone", "tables"):  # nothing to step: 0, not the timer's own noise
        if name not in opts:
            wall["opt_" + name] = cpu["opt_" + name] = 0.0
    return wall, cpu


def bench_step(data_dir: Optional[str] = None, *, rounds: int = StepBenchConfig.rounds,
               steps: int = StepBenchConfig.steps, threads: Optional[int] = StepBenchConfig.threads,
               table_optimizer: str = StepBenchConfig.table_optimizer, fused_adam: bool = StepBenchConfig.fused_adam,
               batch_size: int = DEMO_STEP["batch_size"], seq_len: int = DEMO_STEP["seq_len"],
               workdir: Optional[str] = None, progress: bool = False) -> dict[str, Any]:
    """Seconds per training step of both presets, by phase, and Engram's overhead.

    ``threads``: torch intra-op threads (restored afterwards; None = torch's default, one per
    core); the default 1 keeps the figure stable on a shared machine. ``table_optimizer`` and
    ``fused_adam`` are the ``TrainConfig`` fields of the same names.
    """
    if min(rounds, steps, batch_size) < 1 or seq_len < 2:
        raise EngramError(f"rounds={rounds}, steps={steps}, batch_size={batch_size} must be >= 1 "
                         f"and seq_len={seq_len} >= 2")
    with ExitStack() as closing:
        _, data_path, ds = _bench_workspace(closing, workdir, threads, data_dir, progress)
        vocab = int(ds.meta["vocab_size"])
        tc = TrainConfig(steps=(rounds + 1) * steps, table_optimizer=table_optimizer, fused_adam=fused_adam,
                         **{**DEMO_STEP, "batch_size": batch_size, "seq_len": seq_len})
        runs = {}
        for name in MODELS:
            cfg = preset(name, vocab)
            torch.manual_seed(tc.seed)
            model = EngramLM(cfg, _dataset_compression(cfg, ds, data_path)).train()
            opts = build_optimizers(model, tc)
            set_lr(opts, tc.lr)
            runs[name] = (model, opts, optimizer_params(opts))
        phases: dict[str, dict[str, list[float]]] = {n: {p: [] for p in PHASES} for n in MODELS}
        cpu_phases: dict[str, dict[str, list[float]]] = {n: {p: [] for p in PHASES} for n in MODELS}
        round_s: dict[str, list[float]] = {n: [] for n in MODELS}
        round_cpu: dict[str, list[float]] = {n: [] for n in MODELS}
        load_before = load_average()
        for r in range(rounds + 1):
            acc = {n: 0.0 for n in MODELS}
            acc_cpu = {n: 0.0 for n in MODELS}
            for s in range(steps):
                step = r * steps + s
                x, y = (torch.as_tensor(a, dtype=torch.long)
                        for a in get_batch(ds.train, tc.batch_size, tc.seq_len, step, tc.seed))
                for name in (MODELS if step % 2 == 0 else MODELS[::-1]):
                    wall, cpu = _step(*runs[name], tc, x, y)
                    acc[name] += sum(wall.values())
                    acc_cpu[name] += sum(cpu.values())
                    if r > 0:
                        for p in PHASES:
                            phases[name][p].append(wall[p])
                            cpu_phases[name][p].append(cpu[p])
            if r > 0:
                for n in MODELS:
                    round_s[n].append(acc[n])
                    round_cpu[n].append(acc_cpu[n])
            if progress:
                print(f"bench step: round {r}/{rounds}", flush=True)
        per_round = [e / m - 1 for m, e in zip(round_s["moe"], round_s["engram-moe"])]
        per_round_cpu = [e / m - 1 for m, e in zip(round_cpu["moe"], round_cpu["engram-moe"])]
        ms = {n: {p: 1e3 * statistics.median(v) for p, v in phases[n].items()} for n in MODELS}
        cpu_ms = {n: {p: 1e3 * statistics.median(v) for p, v in cpu_phases[n].items()} for n in MODELS}
        step_ms = {n: 1e3 * sum(round_s[n]) / (rounds * steps) for n in MODELS}
        return {
            "bench": "step",
            "overhead": statistics.median(per_round),
            "overhead_per_round": per_round,
            "overhead_spread": [min(per_round), max(per_round)],
            "overhead_summed": step_ms["engram-moe"] / step_ms["moe"] - 1,
            "overhead_cpu": statistics.median(per_round_cpu),
            "overhead_cpu_per_round": per_round_cpu,
            "overhead_cpu_spread": [min(per_round_cpu), max(per_round_cpu)],
            "moe_step_ms": step_ms["moe"],
            "engram_moe_step_ms": step_ms["engram-moe"],
            "phase_median_ms": ms,
            "phase_extra_ms": {p: ms["engram-moe"][p] - ms["moe"][p] for p in PHASES},
            "phase_median_cpu_ms": cpu_ms,
            "phase_extra_cpu_ms": {p: cpu_ms["engram-moe"][p] - cpu_ms["moe"][p] for p in PHASES},
            "table_optimizer": table_optimizer, "fused_adam": fused_adam,
            "batch_size": tc.batch_size, "seq_len": tc.seq_len, "rounds": rounds, "steps_per_round": steps,
            "warmup_rounds": 1, "params": {n: runs[n][0].param_counts() for n in MODELS},
            "torch_threads": torch.get_num_threads(), "loadavg_before": load_before,
            "loadavg_after": load_average(),
            "timing": "wall clock per phase; one step of each model in turn, same batches, alternating order",
        }
