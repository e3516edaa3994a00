"""The process group of a many-process run, and the start-up check that all ranks agree.

torchrun (``python -m torch.distributed.run``) starts the processes and sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_world` reads
them through ``init_process_group``'s ``env://`` rendezvous. Two groups are made:

- the default group, used by DDP for the backbone gradients and by the loop's small agreements;
- ``tables``, a second group over the same ranks for the row exchanges of the sharded tables.
  DDP reduces gradient buckets asynchronously while backward runs, and the tables' all-to-all
  runs inside backward too; on separate groups the two streams of collectives can never be
  matched against each other in a different order on different ranks.

A rank that dies: its peers' next collective fails (gloo notices the closed connection at once;
otherwise after ``DistributedConfig.timeout_s``) and torchrun stops the remaining workers, so the
run ends with an error instead of hanging. :class:`RankFailure` carries that one-line message.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
import torch.distributed as dist

from engram.config import DistributedConfig
from engram.errors import EngramError


class RankFailure(EngramError):
    """Another rank failed or stopped answering; the message says which step and what to check."""


@dataclass
class World:
    rank: int
    size: int
    local_rank: int
    backend: str
    device: torch.device
    tables: Any  # the process group of the table exchanges
    timeout_s: float


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_world(cfg: DistributedConfig) -> World:
    """Join the process group torchrun's environment describes (or reuse an initialised one)."""
    if not dist.is_available():
        raise EngramError("this torch build has no torch.distributed; install a standard torch wheel")
    backend = cfg.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise EngramError("backend='nccl' needs CUDA GPUs; use --dist-backend gloo on CPU")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl" and local_rank >= torch.cuda.device_count():
        raise EngramError(f"backend='nccl' puts rank {local_rank} on GPU {local_rank}, but {torch.cuda.device_count()} "
                          f"GPU(s) are visible; launch at most that many processes, or use --dist-backend gloo")
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=cfg.timeout_s)
    if not dist.is_initialized():
        if not under_torchrun():
            raise EngramError("no torchrun environment (RANK, WORLD_SIZE unset); launch with "
                              "`torchrun --nproc-per-node N -m engram train ...` or `engram train --nproc N`")
        dist.init_process_group(backend, timeout=timeout)
    tables = dist.new_group(backend=backend, timeout=timeout)
    return World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=local_rank,
                 backend=backend, device=device, tables=tables, timeout_s=cfg.timeout_s)


def close_world() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def check_agreement(items: Mapping[str, Any], world: World) -> None:
    """Every rank must run with the same configs and hash: compare each rank's ``items`` with
    rank 0's and fail on every rank with one line naming the first difference."""
    gathered: list[Optional[dict[str, Any]]] = [None] * world.size
    dist.all_gather_object(gathered, dict(items))
    ref = gathered[0] or {}
    for r, got in enumerate(gathered[1:], 1):
        got = got or {}
        for key in sorted(set(ref) | set(got)):
            a, b = ref.get(key), got.get(key)
            if a == b:
                continue
            if isinstance(a, dict) and isinstance(b, dict):
                sub = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))[0]
                key, a, b = f"{key}.{sub}", a.get(sub), b.get(sub)
            raise EngramError(f"rank {r} runs with {key}={b!r} but rank 0 with {key}={a!r}; every rank "
                              f"must get the same configs, data and hash settings (check the command "
                              f"lines and files of all nodes)")


_TRANSPORT_WORDS = ("gloo", "nccl", "connection", "timed out", "timeout", "socket", "peer")


def is_rank_failure(e: BaseException) -> bool:
    """Whether an exception from a collective means that another rank is gone or silent."""
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(w in text for w in _TRANSPORT_WORDS)
