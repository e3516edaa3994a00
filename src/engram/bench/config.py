"""Settings of the benchmarks, each default written once.

``engram bench`` builds its flags from these dataclasses (``engram.cli.bench``), and the
benchmark functions take their keyword defaults from them, so the command line and the library
cannot drift apart. Torch-free: the command line imports this module to build its parser.
``PatchBenchConfig`` (``engram bench patch``) lives with the patch configs in ``engram.config``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from engram.config import setting

TABLE_OPTIMIZERS = ("adam", "sparse_adam")


@dataclass
class HashBenchConfig:
    """``engram bench hash``: hashing throughput against the reference algorithm."""

    batch_size: int = setting(8)
    seq_len: int = setting(4096)
    repeats: int = setting(5)
    threads: int = setting(1)


@dataclass
class StepBenchConfig:
    """``engram bench step``: one training step of ``engram-moe`` against ``moe``, by phase."""

    rounds: int = setting(5, "timed rounds (plus one warm-up)")
    steps: int = setting(6, "steps of each model per round")
    threads: Optional[int] = setting(1)
    table_optimizer: str = setting("adam", choices=TABLE_OPTIMIZERS)
    fused_adam: bool = setting(True, "one-pass Adam kernels; --no-fused-adam: torch's for-loop Adam "
                                     "(train.fused_adam=false)")


@dataclass
class TableOptimizerBenchConfig:
    """``engram bench table-optimizer``: training steps/s and table state, dense vs row-sparse Adam."""

    steps: int = setting(12, "steps per round and optimizer")
    rounds: int = setting(3, "timed rounds (plus one warm-up)")
    rows_per_head: Optional[int] = setting(None, "rows per hash head (default: the preset's; --table-rows "
                                           "is the old name)", aliases=("--table-rows",))
    batch_size: int = setting(16)
    seq_len: int = setting(128)
    threads: Optional[int] = setting(1, "torch intra-op threads (default 1)")


@dataclass
class TrainTiersBenchConfig:
    """``engram bench train-tiers``: training with the tables in memory, mmap and cached."""

    steps: int = setting(8, "steps per round and tier")
    rounds: int = setting(3, "timed rounds (plus one warm-up)")
    cache_rows: int = setting(16384, "cached tier: pool rows per table")
    rows_per_head: Optional[int] = setting(None, "rows per hash head (default: the preset's; --table-rows "
                                           "is the old name)", aliases=("--table-rows",))
    batch_size: int = setting(16)
    seq_len: int = setting(128)
    threads: Optional[int] = setting(1, "torch intra-op threads (default 1)")


@dataclass
class DistributedBenchConfig:
    """``engram bench distributed``: row-sharded training on 1 vs ``world`` processes."""

    world: int = setting(2, "processes to compare with one (default 2)")
    preset_name: str = setting("engram-moe", "model preset (default engram-moe, the demo's)", flag="--preset")
    steps: int = setting(12)
    warmup: int = setting(3, "steps left out of the step time")
    batch_size: int = setting(8, "the global batch (split over the ranks)")
    seq_len: int = setting(64)
    repeats: int = setting(3)
    table_optimizer: str = setting("sparse_adam", choices=TABLE_OPTIMIZERS)
