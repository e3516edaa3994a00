"""Interpolated modified Kneser-Ney (Chen & Goodman, 1998) over dense vocabulary rows.

Shape legend
    R rows (scored positions)   V vocabulary

For one row, level k uses the context's last k tokens (order k + 1). With counts ``a[w]`` at that
level (raw counts, or continuation counts = number of distinct left neighbours), total ``A`` and
per-count discounts ``D(a)`` = 0, D1, D2, D3+ for a = 0, 1, 2, >= 3:

    P_k(w) = (a[w] - D(a[w])) / A  +  gamma * P_{k-1}(w),     gamma = sum_w D(a[w]) / A

and P_{-1} = 1 / V (uniform), so every token of the vocabulary keeps some mass and every row sums
to one. A level whose context is unseen (A = 0) or unavailable passes P_{k-1} through unchanged.
Discounts come from count-of-counts n1..n4 of the same kind and order:
Y = n1 / (n1 + 2 n2), D1 = 1 - 2Y n2/n1, D2 = 2 - 3Y n3/n2, D3+ = 3 - 4Y n4/n3.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from engram.errors import EngramError

DEFAULT_DISCOUNTS = (0.5, 1.0, 1.5)  # used when the count-of-counts are too thin to estimate
MIN_DISCOUNT = 0.01


class DiscountError(EngramError):
    """Discounts outside their valid range; the message names the value."""


@dataclass(frozen=True)
class Discounts:
    """Modified-KN discounts for counts 1, 2 and >= 3 (each 0 <= D_c <= c keeps mass >= 0)."""

    d1: float
    d2: float
    d3: float

    def __post_init__(self) -> None:
        for c, d in ((1, self.d1), (2, self.d2), (3, self.d3)):
            if not 0.0 <= d <= c:
                raise DiscountError(f"discount D{c}={d} must be in [0, {c}]; estimate it with "
                                    "Discounts.from_count_of_counts or pick a value in range")

    @classmethod
    def from_count_of_counts(cls, n: Sequence[int]) -> "Discounts":
        """Chen & Goodman's estimates from (n1, n2, n3, n4), clamped to the valid range."""
        n1, n2, n3, n4 = (float(v) for v in n)
        if min(n1, n2, n3) <= 0:
            return cls(*DEFAULT_DISCOUNTS)
        y = n1 / (n1 + 2 * n2)
        raw = (1 - 2 * y * n2 / n1, 2 - 3 * y * n3 / n2, 3 - 4 * y * n4 / n3)
        # A zero discount would leave no mass for unseen tokens: keep a small floor.
        return cls(*(min(max(d, MIN_DISCOUNT), float(c)) for c, d in zip((1, 2, 3), raw)))

    def as_tuple(self) -> tuple[float, float, float]:
        return (self.d1, self.d2, self.d3)


def discount_matrix(a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """a [R,V] counts, d [R,3] per-row (D1, D2, D3+) -> [R,V] per-entry discount."""
    out = torch.zeros_like(a)
    out = torch.where(a == 1, d[:, 0:1], out)
    out = torch.where(a == 2, d[:, 1:2], out)
    return torch.where(a >= 3, d[:, 2:3], out)


def kn_step(p_lower: torch.Tensor, a: torch.Tensor, d: torch.Tensor, use: torch.Tensor) -> torch.Tensor:
    """One interpolation level: p_lower [R,V], counts a [R,V], discounts d [R,3], use [R] bool."""
    total = a.sum(-1, keepdim=True)
    use = use & (total.squeeze(-1) > 0)
    safe = total.clamp_min(1e-30)
    disc = discount_matrix(a, d)
    gamma = disc.sum(-1, keepdim=True) / safe
    p = (a - disc).clamp_min(0) / safe + gamma * p_lower
    return torch.where(use[:, None], p, p_lower)


def uniform(rows: int, vocab_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.full((rows, vocab_size), 1.0 / vocab_size, dtype=dtype)
