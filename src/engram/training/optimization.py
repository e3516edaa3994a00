"""The pieces every training loop shares: learning-rate schedule, clipping and the optimizer step.

``engram train`` (:mod:`engram.training.trainer`) and patch training
(:mod:`engram.patches.trainer`) both use them, so a patch trains with exactly the schedule,
clipping and step order of the main loop:

    lr = lr_at(step, lr=..., warmup_steps=..., steps=..., min_lr_ratio=...)
    set_lr(optimizers, lr)                 # each param group at lr * its lr_mult
    loss.backward()
    grad_norm = optimizer_step(optimizers, params, grad_clip)   # clip, step, zero_grad
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

from engram.training.sparse_adam import clip_grad_norm_  # torch's own unless the tables have sparse gradients


def lr_at(step: int, *, lr: float, warmup_steps: int, steps: int, min_lr_ratio: float) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup over ``warmup_steps``,
    then cosine decay to ``lr * min_lr_ratio`` at ``steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = max(1, steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    floor = lr * min_lr_ratio
    return floor + (lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizers: dict[str, torch.optim.Optimizer], lr: float) -> None:
    """Every param group trains at ``lr * group["lr_mult"]`` (the tables' ``table_lr_mult``)."""
    for opt in optimizers.values():
        for group in opt.param_groups:
            group["lr"] = lr * group["lr_mult"]


def optimizer_params(optimizers: dict[str, torch.optim.Optimizer]) -> list[torch.nn.Parameter]:
    """All parameters the optimizers update, in optimizer and group order (clipped jointly)."""
    return [p for opt in optimizers.values() for g in opt.param_groups for p in g["params"]]


def optimizer_step(optimizers: dict[str, torch.optim.Optimizer], params: Iterable[torch.nn.Parameter],
                   grad_clip: float, clip: Callable[..., torch.Tensor] = clip_grad_norm_) -> float:
    """Clip the gradients of ``params`` jointly to norm ``grad_clip`` (0 disables), step every
    optimizer and drop the gradients. Returns the norm before clipping (NaN when not clipped).
    ``clip(params, max_norm)`` computes the norm (across processes when the tables are sharded)."""
    grad_norm = float(clip(params, grad_clip)) if grad_clip > 0 else float("nan")
    for opt in optimizers.values():
        opt.step()
        opt.zero_grad(set_to_none=True)
    return grad_norm
