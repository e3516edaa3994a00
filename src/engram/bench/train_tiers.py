"""``engram bench train-tiers``: training step time and table RAM with the tables in memory, mmap, cached.

Three copies of the same model (same seed, row-sparse Adam) train side by side in one process,
one per ``TrainConfig.table_storage``, each through the trainer's own loop (``TrainLoop``, with
``prefetch``: the next batch, its row ids and, for the file tiers, its rows are read ahead on a
background thread). Steps alternate between the copies in rounds, so machine noise hits all
three alike, and all three see the same batches: their losses must agree bit for bit, which the
result reports.

RAM of the tables, measured per copy at the end (one process, so not its whole RSS):

- ``anon_bytes``, memory only this process can free: for memory the table tensors plus the
  optimizer's row state (``SparseRowAdam.state_nbytes``), for cached the pool (rows and per-slot
  bookkeeping), for mmap nothing;
- ``files_rss_bytes``: the working files' pages mapped into the process (``Rss`` of their
  mappings in ``/proc/self/smaps``: table, moments and step counts). They are page cache: the
  kernel may reclaim them under pressure (writing dirty ones back first), and a fault maps the
  neighbouring cached pages too, so this counts far more than the rows touched.
  ``files_rss_in_step_bytes``: the same during one more step, just before it ends (a cached tier
  drops its mappings then).
"""

from __future__ import annotations

import re
import statistics
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Optional

import torch

from engram.bench.config import TrainTiersBenchConfig
from engram.bench.offload import _bench_workspace, _preset_config, load_average
from engram.config import TrainConfig
from engram.errors import EngramError
from engram.model.lm import EngramLM
from engram.tables.trainable import TrainableTier, place_tables
from engram.training.parallel import Parallel
from engram.training.trainer import TrainLoop, _dataset_compression, build_optimizers

TIERS = ("memory", "mmap", "cached")
_MAPPING = re.compile(r"^[0-9a-f]+-[0-9a-f]+ ")


def mapped_rss(directory: Path) -> int:
    """Bytes of this process's resident pages in mappings of files under ``directory``."""
    prefix, total, inside = str(Path(directory).resolve()), 0, False
    with open("/proc/self/smaps", encoding="utf-8") as f:
        for line in f:
            head = _MAPPING.match(line)
            if head:  # a mapping's header line: address range, perms, offset, dev, inode, path
                inside = line.split(None, 5)[5:6] != [] and line.split(None, 5)[5].strip().startswith(prefix)
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1]) * 1024
    return total


def _table_ram(tier_name: str, model: EngramLM, opt: Any, tiers: list[TrainableTier], work: Path) -> dict[str, int]:
    """``anon_bytes``: RAM the tables hold in this process that only it can free (tensors and row
    state in memory; the pool when cached). ``files_rss_bytes``: page-cache pages of the working
    files mapped into the process, which the kernel may reclaim (dirty ones after writing them)."""
    if tier_name == "memory":
        tables = sum(p.numel() * p.element_size() for p in model.table_parameters())
        return {"anon_bytes": tables + opt.state_nbytes(), "files_rss_bytes": 0}
    pool = sum(t.pool.numel() * 4 + t.capacity * 17 + t.index.nbytes for t in tiers if hasattr(t, "pool"))
    return {"anon_bytes": pool, "files_rss_bytes": mapped_rss(work)}


def bench_train_tiers(data_dir: Optional[str] = None, *, steps: int = TrainTiersBenchConfig.steps,
                      rounds: int = TrainTiersBenchConfig.rounds, batch_size: int = TrainTiersBenchConfig.batch_size,
                      seq_len: int = TrainTiersBenchConfig.seq_len, cache_rows: int = TrainTiersBenchConfig.cache_rows,
                      preset_name: str = "engram-moe", rows_per_head: Optional[int] = TrainTiersBenchConfig.rows_per_head,
                      threads: Optional[int] = TrainTiersBenchConfig.threads,
                      workdir: Optional[str] = None, progress: bool = False) -> dict[str, Any]:
    """Step time and table RAM for each ``table_storage`` (see the module docstring).

    ``cache_rows``: the cached tier's pool per Engram table. ``rows_per_head`` enlarges
    the ``engram-moe`` tables. ``rounds`` timed rounds of ``steps`` steps per tier follow one
    warm-up round.
    """
    with ExitStack() as closing:
        tmp, data_path, ds = _bench_workspace(closing, workdir, threads, data_dir, progress,
                                              prefix="engram-bench-tiers-")
        cfg = _preset_config(preset_name, int(ds.meta["vocab_size"]), rows_per_head)
        if cfg.engram is None:
            raise EngramError(f"preset {preset_name!r} has no Engram tables to place; use engram-moe")
        compression = _dataset_compression(cfg, ds, data_path)
        loops: dict[str, tuple[TrainLoop, list[TrainableTier], Path]] = {}
        for name in TIERS:
            tc = TrainConfig(batch_size=batch_size, seq_len=seq_len, steps=(rounds + 1) * steps,
                             table_optimizer="sparse_adam", table_storage=name, table_cache_rows=cache_rows,
                             prefetch=True)
            torch.manual_seed(0)
            model = EngramLM(cfg, compression).train()
            work = tmp / f"work-{name}"
            tiers = [] if name == "memory" else place_tables(model, name, work, cache_rows)
            for t in tiers:
                closing.callback(t.close)
            opts = build_optimizers(model, tc)
            state = {"step": 0}
            loop = TrainLoop(model, opts, tc, ds, None, state, torch.device("cpu"), False, Parallel(), tiers)
            if loop.batches is not None:
                closing.callback(loop.batches.close)
            loops[name] = (loop, tiers, work)
        times: dict[str, list[float]] = {k: [] for k in TIERS}
        losses: dict[str, list[float]] = {k: [] for k in TIERS}
        for r in range(rounds + 1):
            order = list(TIERS)[r % 3:] + list(TIERS)[:r % 3]  # each tier goes first in turn
            for name in order:
                loop = loops[name][0]
                t0 = time.perf_counter()
                for _ in range(steps):
                    loop.train_step()
                    losses[name].append(loop.loss_sum)
                    loop.loss_sum, loop.loss_count = 0.0, 0
                if r > 0:  # round 0 warms up allocators, the pool and the page cache
                    times[name].append((time.perf_counter() - t0) / steps)
        peak = {}
        for name in TIERS[1:]:  # one more step: the files' pages held just before end_step drops them
            loop, tiers, work = loops[name]
            seen: list[int] = []
            real = tiers[0].end_step
            tiers[0].end_step = lambda real=real, work=work, seen=seen: (seen.append(mapped_rss(work)), real())
            loop.train_step()
            tiers[0].end_step = real
            peak[name] = seen[0]
        out: dict[str, Any] = {"bench": "train_tiers", "preset": preset_name, "batch_size": batch_size,
                               "seq_len": seq_len, "cache_rows": cache_rows, "steps_timed": rounds * steps}
        first = loops["memory"][0].model
        out["table_rows"] = sum(p.shape[0] for p in first.table_parameters())
        out["table_bytes"] = sum(p.numel() * p.element_size() for p in first.table_parameters())
        for name in TIERS:
            loop, tiers, work = loops[name]
            ram = _table_ram(name, loop.model, loop.optimizers["tables"], tiers, work)
            out[name] = {"step_s": statistics.median(times[name]), "step_s_rounds": times[name], **ram,
                         "files_rss_in_step_bytes": peak.get(name, 0),
                         "rows_with_state": sum(loop.optimizers["tables"].state_rows(p)
                                                for p in loop.model.table_parameters())}
            if name == "cached":
                out[name]["resident_rows"] = sum(t.resident_rows for t in tiers)
                out[name]["hit_rate"] = sum(t.hits for t in tiers) / max(1, sum(t.hits + t.misses for t in tiers))
        out["losses_identical"] = losses["memory"] == losses["mmap"] == losses["cached"]
        out["torch_threads"], out["loadavg"] = torch.get_num_threads(), load_average()
        return out
