"""The training loop's hooks for running on several processes; this base class is one process.

:func:`engram.training.trainer.train` takes a ``parallel`` object and calls these hooks at fixed
points, so the loop stays one piece of code for any number of processes. The base class is the
single-process reference: every hook is the identity or the plain call. The many-process
implementation (row-sharded tables, data-parallel backbone) lives in
:mod:`engram.distributed.parallel`, above training in the layers, and subclasses this one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import torch

from engram.model.lm import EngramLM
from engram.training.checkpointing import load_for_resume, save_training_checkpoint
from engram.training.sparse_adam import clip_grad_norm_


class Parallel:
    """One process (rank 0 of 1). Subclasses override what changes with several."""

    rank = 0
    world_size = 1

    @property
    def is_main(self) -> bool:
        """The rank that logs, shows progress and writes metrics."""
        return self.rank == 0

    def prepare(self, model: EngramLM) -> None:
        """Called once the model is built (and its tables initialised), before the optimizers."""

    def train_module(self, model: EngramLM) -> torch.nn.Module:
        """The module the training forward runs through (DDP wraps the model)."""
        return model

    @property
    def batch_part(self) -> tuple[int, int]:
        """(rank, world): which contiguous part of every global batch this process reads."""
        return self.rank, self.world_size

    def mean(self, value: torch.Tensor) -> float:
        """The mean over processes of a per-process scalar (the loss of the local batch)."""
        return float(value)

    def any(self, flag: bool) -> bool:
        """True on every process when it is True on any (stop decisions must agree)."""
        return flag

    def clip_grad_norm(self, params: Iterable[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
        """Clip all gradients jointly to ``max_norm``; returns the norm before clipping."""
        return clip_grad_norm_(params, max_norm)

    def end_step(self, model: EngramLM) -> None:
        """Called after the optimizer step, before the MoE balancing step (expert loads are
        counted per process)."""

    def save_checkpoint(self, run: Path, model: EngramLM, optimizers: Mapping[str, torch.optim.Optimizer],
                        trainer_state: Mapping[str, Any], train_cfg: Any, tokenizer_path: Optional[Path],
                        tokenizer_fingerprint: Optional[str]) -> None:
        save_training_checkpoint(run, model, optimizers, trainer_state, train_cfg, tokenizer_path,
                                 tokenizer_fingerprint=tokenizer_fingerprint)

    def load_for_resume(self, run: Path, model: EngramLM,
                        optimizers: Mapping[str, torch.optim.Optimizer]) -> dict[str, Any]:
        state, _ = load_for_resume(run, model, optimizers)
        return state
