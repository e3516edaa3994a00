"""The dev / test halves of a dataset's validation windows, one definition for every score of a
sweep run (``engram.science.sweep.dev_test_losses``, ``engram.science.routing``).

The windows are the trainer's final evaluation's (``eval_batches`` of ``batch_size`` x
``seq_len``; a small validation split gives fewer). ``iter_eval_batches`` spreads them evenly over
the split, in order, so the first half of the batches reads the first half of the validation
text: **dev** (for choices between configs), and the second half **test** (what tables report).

Shape legend
    B batch_size    T seq_len
"""

from __future__ import annotations

from typing import Any, Iterator

import torch

from engram.config import TrainConfig
from engram.data import shards as data


def eval_batch_count(val: Any, tcfg: TrainConfig) -> int:
    """Batches actually drawn from the validation shard ``val``."""
    windows = min(data.num_eval_windows(val, tcfg.seq_len), tcfg.eval_batches * tcfg.batch_size)
    return -(-windows // tcfg.batch_size)


def dev_test_batches(val: Any, tcfg: TrainConfig) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """("dev" | "test", x [B,T], y [B,T]) over the validation windows, dev first."""
    n = eval_batch_count(val, tcfg)
    for i, (x, y) in enumerate(data.iter_eval_batches(val, tcfg.batch_size, tcfg.seq_len, n)):
        yield ("dev" if i < n // 2 else "test"), x, y
