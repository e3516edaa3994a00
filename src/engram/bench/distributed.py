"""``engram bench distributed``: table traffic and step time of row-sharded training on 1 vs W ranks.

Each repeat trains the same model for the same steps under torchrun on 1 and on W processes
(alternating, so that a busy machine slows both alike) through ``engram train``, and reads
from the run:

- ``step_s``: the median training step time after ``warmup`` steps (``metrics.jsonl``'s
  ``train_s``, which excludes evaluation and saving);
- ``bytes_per_step``: what the table exchanges sent between processes in a training step,
  summed over the ranks (row ids to their owners, rows back, row gradients back to the owners;
  a rank's own rows never leave it). Lookups are deduplicated per rank first.

Against it, ``bytes_per_step_analytic`` is the figure without deduplication::

    tokens x Engram layers x heads x (2 x row bytes + 8 bytes of row id) x (W - 1) / W

(every token's row of every head goes to its owner, a rank away with probability (W-1)/W, and
its gradient comes back). ``projection`` puts the same formula at DeepSeek-scale geometry on
8 and 64 GPUs: see docs/distributed.md for the assumptions.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from engram.bench.config import DistributedBenchConfig
from engram.config import preset
from engram.data.shards import load_dataset, prepare_builtin
from engram.errors import EngramError

# DeepSeek-scale geometry for the projection (docs/distributed.md says where each figure comes from).
PROJECTION = {
    "rows_per_head": 16 * 2**20,  # 16M rows per head
    "heads_per_layer": 16,  # N = 3: orders 2 and 3, 8 heads each (DeepSeek's reference config)
    "engram_layers": 2,  # layers 1 and 15 in the reference config
    "row_bytes": 64 * 2,  # head_dim 64 (512 per order / 8 heads), bf16
    "tokens_per_gpu": 16384,  # e.g. 4 sequences of 4096 per GPU per step
    "active_params": 37e9,  # a DeepSeek-V3-class backbone
    "gpu_flops": 989e12 * 0.4,  # H800 dense bf16 peak at 40% utilisation
    "intra_node_bytes_s": 150e9,  # NVLink all-to-all, per GPU, effective
    "inter_node_bytes_s": 40e9,  # one 400 Gb/s InfiniBand NIC per GPU, effective
    "gpus_per_node": 8,
}


def analytic_bytes(tokens: int, layers: int, heads: int, row_bytes: int, world: int) -> float:
    """Bytes crossing between ranks per step without deduplication (see the module docstring)."""
    return tokens * layers * heads * (2 * row_bytes + 8) * (world - 1) / world


def project(gpus: int, dedup: float = 1.0, geometry: Optional[dict[str, float]] = None) -> dict[str, float]:
    """Communication time and share of a step at ``gpus`` GPUs, on paper (no overlap assumed).

    ``dedup``: measured bytes / analytic bytes (1.0 = no deduplication, the upper bound).
    """
    g = {**PROJECTION, **(geometry or {})}
    per_gpu = analytic_bytes(int(g["tokens_per_gpu"]), int(g["engram_layers"]), int(g["heads_per_layer"]),
                             int(g["row_bytes"]), gpus) * dedup  # what one GPU's lookups move
    node = int(g["gpus_per_node"])
    off_node = max(0, gpus - node) / max(1, gpus - 1)  # share of the peers in other nodes
    comm_s = per_gpu * (1 - off_node) / g["intra_node_bytes_s"] + per_gpu * off_node / g["inter_node_bytes_s"]
    compute_s = 6 * g["active_params"] * g["tokens_per_gpu"] / g["gpu_flops"]
    table_gib = g["rows_per_head"] * g["heads_per_layer"] * g["engram_layers"] * g["row_bytes"] / 2**30
    return {"gpus": gpus, "bytes_per_gpu_per_step": per_gpu, "comm_s": comm_s, "compute_s": compute_s,
            "comm_share": comm_s / (comm_s + compute_s), "table_gib_total": table_gib,
            "table_gib_per_gpu": table_gib / gpus}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2])  # this engram, also when run from a checkout
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


def _train(world: int, data: Path, run: Path, preset_name: str, sets: dict[str, Any]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
           "-m", "engram", "train", "--preset", preset_name, "--data", str(data), "--out", str(run),
           "--overwrite", "--quiet"]
    for k, v in sets.items():
        cmd += ["--set", f"train.{k}={v}"]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    if res.returncode != 0:
        raise EngramError(f"the {world}-rank benchmark run failed (exit {res.returncode}): "
                          f"{res.stderr.strip().splitlines()[-1] if res.stderr.strip() else 'no output'}")
    summary = json.loads(res.stdout[res.stdout.index("{"):])
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_s = [r["train_s"] for r in recs if "loss" in r]
    return {"step_s": [b - a for a, b in zip(train_s, train_s[1:])], "summary": summary,
            "loss": [r["loss"] for r in recs if "loss" in r]}


def bench_distributed(data_dir: Optional[str] = None, *, world: int = DistributedBenchConfig.world,
                      preset_name: str = DistributedBenchConfig.preset_name, steps: int = DistributedBenchConfig.steps,
                      warmup: int = DistributedBenchConfig.warmup, batch_size: int = DistributedBenchConfig.batch_size,
                      seq_len: int = DistributedBenchConfig.seq_len, repeats: int = DistributedBenchConfig.repeats,
                      table_optimizer: str = DistributedBenchConfig.table_optimizer, workdir: Optional[str] = None,
                      progress: bool = False) -> dict[str, Any]:
    """Step time and table bytes on 1 vs ``world`` ranks (see the module docstring)."""
    if world < 2 or repeats < 1 or steps <= warmup + 1 or batch_size % world:
        raise EngramError(f"need world >= 2, repeats >= 1, steps > warmup + 1 and a batch size divisible by "
                          f"the world size (got world={world}, repeats={repeats}, steps={steps}, "
                          f"warmup={warmup}, batch_size={batch_size})")
    tmp = Path(tempfile.mkdtemp(prefix="engram-bench-dist-", dir=workdir))
    try:
        if data_dir is None:
            data = tmp / "data"
            prepare_builtin(str(data), tokenizer="bpe", vocab_size=4096, progress=progress)
        else:
            data = Path(data_dir)
        cfg = preset(preset_name, int(load_dataset(data).meta["vocab_size"]))
        if cfg.engram is None:
            raise EngramError(f"preset {preset_name!r} has no Engram layers: nothing is sharded")
        sets = {"steps": steps, "batch_size": batch_size, "seq_len": seq_len, "warmup_steps": 1, "log_every": 1,
                "eval_every": 10 * steps, "eval_batches": 1, "save_every": 10 * steps,
                "table_optimizer": table_optimizer}
        runs: dict[int, list[dict[str, Any]]] = {1: [], world: []}
        t0 = time.perf_counter()
        for i in range(repeats):
            for w in (1, world):  # alternating: drifting load hits both sides
                runs[w].append(_train(w, data, tmp / f"run-{w}-{i}", preset_name, sets))
        elapsed = time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def medians(w: int) -> list[float]:
        return [statistics.median(r["step_s"][warmup:]) for r in runs[w]]

    e = cfg.engram
    heads = (e.max_ngram_size - 1) * e.n_head_per_ngram
    sent = [b for r in runs[world] for b in r["summary"]["table_bytes_per_step"]]
    analytic = analytic_bytes(batch_size * seq_len, len(e.layer_ids), heads, e.head_dim * 4, world)
    one, many = medians(1), medians(world)
    measured = statistics.mean(sent)
    return {
        "benchmark": "distributed", "preset": preset_name, "world": world, "steps": steps, "warmup": warmup,
        "batch_size": batch_size, "seq_len": seq_len, "repeats": repeats, "table_optimizer": table_optimizer,
        "engram_layers": len(e.layer_ids), "heads_per_layer": heads, "row_bytes": e.head_dim * 4,
        "bytes_per_step": measured, "bytes_per_step_min": min(sent), "bytes_per_step_max": max(sent),
        "bytes_per_step_analytic": analytic, "bytes_ratio": measured / analytic,
        "step_s_1rank": statistics.median(one), "step_s_2ranks" if world == 2 else f"step_s_{world}ranks":
            statistics.median(many),
        "step_s_1rank_per_repeat": one, f"step_s_{world}ranks_per_repeat": many,
        "time_ratio": statistics.median(many) / statistics.median(one),
        "time_ratio_per_repeat": [b / a for a, b in zip(one, many)],
        "loss_1rank_last": runs[1][0]["loss"][-1], f"loss_{world}ranks_last": runs[world][0]["loss"][-1],
        "projection": [project(8, measured / analytic), project(64, measured / analytic),
                       project(8), project(64)],
        "projection_geometry": PROJECTION,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "elapsed_s": elapsed,
    }
