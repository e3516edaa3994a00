"""Run by the distributed tests under torchrun (one process per rank); not a test module.

    python -m torch.distributed.run --standalone --nproc-per-node W worker.py MODE OUT [ARGS]

MODE lookup: a sharded lookup (and its gradient, an overlay, the gathered full table) against the
             one-process in-memory table.
MODE mismatch: rank 1 trains with another learning rate (start-up must refuse).
MODE die-in-save DATA RUN: rank 1 dies half-way through writing its shard at the second save.
MODE die-in-step DATA RUN: rank 1 dies at step 3.
MODE die-in-hang DATA RUN: rank 1 stops answering at step 3 (sleeps; ENGRAM_TEST_TIMEOUT applies).
Results go to OUT/rank<r>.json.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist


def lookup(out: Path) -> None:
    from engram.distributed.sharded_table import ShardedEmbedding
    from engram.model.table import MemoryTable, RowOverlay

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    full = MemoryTable(1009 + 997, 8)  # the same table on every rank
    rows = torch.randint(0, full.num_embeddings, (3, 5, 4), generator=torch.Generator().manual_seed(rank))
    shard = ShardedEmbedding.from_table(full, rank, world)
    got = shard(rows)
    ref = full(rows)
    # an overlay (each rank its own) gives the rows written into a copy; the shards stay as they were
    overlay = RowOverlay.of(rows.reshape(-1)[::4].unique(), torch.randn(rows.reshape(-1)[::4].unique().numel(), 8))
    written = full.weight.detach().clone()
    written[overlay.rows] = overlay.values
    with torch.no_grad():
        overlay_equal = torch.equal(shard(rows, overlay), MemoryTable.wrap(written)(rows))
    full_equal = torch.equal(shard.full(), full.weight.detach())
    # gradient: d/dW of sum(out * c) on every rank; the owner's rows must receive the sum over ranks
    coef = torch.randn(got.shape, generator=torch.Generator().manual_seed(100 + rank))
    (got * coef).sum().backward()
    total = torch.zeros_like(full.weight)
    for r in range(world):  # the one-process gradient of all ranks' lookups, rebuilt locally
        rr = torch.randint(0, full.num_embeddings, (3, 5, 4), generator=torch.Generator().manual_seed(r))
        cc = torch.randn(got.shape, generator=torch.Generator().manual_seed(100 + r))
        total.index_add_(0, rr.reshape(-1), cc.reshape(-1, 8))
    res = {"equal": bool(torch.equal(got, ref)), "shape": list(got.shape), "overlay_equal": overlay_equal,
           "full_equal": full_equal,
           "local_rows": shard.weight.shape[0],
           "grad_close": bool(torch.allclose(shard.weight.grad, total[rank::world], atol=1e-6)),
           "grad_nonzero": int(shard.weight.grad.ne(0).any(1).sum()),
           "sent_bytes": shard.stats.total}
    (out / f"rank{rank}.json").write_text(json.dumps(res))
    dist.destroy_process_group()


def train_args(data: str, run: str, **sets: object) -> tuple:
    from engram.config import TrainConfig, preset
    from engram.data.shards import load_dataset

    vocab = int(load_dataset(data).meta["vocab_size"])
    tcfg = TrainConfig(steps=8, batch_size=4, seq_len=32, warmup_steps=2, log_every=1, eval_every=100,
                       eval_batches=1, save_every=2, **sets)
    return preset("tiny", vocab), tcfg


def mismatch(out: Path, data: str, run: str) -> None:
    from engram.distributed.parallel import train_distributed

    rank = int(os.environ["RANK"])
    model_cfg, tcfg = train_args(data, run, lr=3e-3 if rank == 0 else 1e-3)
    try:
        train_distributed(model_cfg, tcfg, data, run, progress=False)
        res = {"error": None}
    except Exception as e:  # noqa: BLE001 - the test inspects the message
        res = {"error": str(e), "type": type(e).__name__}
    (out / f"rank{rank}.json").write_text(json.dumps(res))


def die(out: Path, data: str, run: str, where: str) -> None:
    from engram.distributed import checkpoint as dckpt
    from engram.distributed.parallel import train_distributed
    from engram.training import trainer

    rank = int(os.environ["RANK"])
    if rank == 1 and where == "save":
        real, calls = dckpt._save_tensors, []

        def half_then_die(tensors, path):  # noqa: ANN001
            calls.append(path)
            if len(calls) == 2:  # the second checkpoint: a truncated shard, then the process is gone
                path.write_bytes(b"\0" * 100)
                os._exit(3)
            real(tensors, path)
        dckpt._save_tensors = half_then_die
    if rank == 1 and where in ("step", "hang"):
        real_step = trainer.TrainLoop.train_step

        def step_then_die(self):  # noqa: ANN001
            if self.step == 3 and where == "step":
                os._exit(3)
            if self.step == 3:  # alive, sockets open, but silent
                time.sleep(120)
            return real_step(self)
        trainer.TrainLoop.train_step = step_then_die
    model_cfg, tcfg = train_args(data, run)
    t0 = time.perf_counter()

    def stopped_by_torchrun(signum, frame):  # noqa: ANN001
        # torchrun stops the surviving ranks as soon as one fails; whether a survivor reports
        # the failure itself first is a race, so being stopped counts as not hanging too.
        res = {"error": "stopped by torchrun after another rank failed", "type": "Terminated",
               "seconds": time.perf_counter() - t0}
        (out / f"rank{rank}.json").write_text(json.dumps(res))
        os._exit(1)

    signal.signal(signal.SIGTERM, stopped_by_torchrun)
    try:
        train_distributed(model_cfg, tcfg, data, run, progress=False,
                          dist_cfg=_dist_cfg(float(os.environ.get("ENGRAM_TEST_TIMEOUT", "30"))))
        res = {"error": None}
    except Exception as e:  # noqa: BLE001 - the test inspects the message
        res = {"error": str(e), "type": type(e).__name__}
    res["seconds"] = time.perf_counter() - t0
    (out / f"rank{rank}.json").write_text(json.dumps(res))
    if res["error"]:
        sys.exit(1)  # as `engram train` does: torchrun then stops the other ranks


def _dist_cfg(timeout: float):  # noqa: ANN202
    from engram.config import DistributedConfig

    return DistributedConfig(timeout_s=timeout)


if __name__ == "__main__":
    torch.set_num_threads(1)
    mode, out = sys.argv[1], Path(sys.argv[2])
    if mode == "lookup":
        lookup(out)
    elif mode == "mismatch":
        mismatch(out, *sys.argv[3:5])
    elif mode in ("die-in-save", "die-in-step", "die-in-hang"):
        die(out, *sys.argv[3:5], where=mode.split("-")[-1])
    else:
        raise SystemExit(f"unknown mode {mode}")
