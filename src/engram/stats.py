"""Paired statistics over seeds: mean and sample std, the paired t-test, and how p is printed.

Pure Python (no torch, no numpy), so every layer and the scripts in ``benchmarks/`` may use it.
The sweeps (``engram.science``), the retrofit studies and the benchmark reports all compare runs
that share a seed (same data order), so the test is the paired one: the differences of the two
runs per seed against zero, with Student's t on n - 1 degrees of freedom.
"""

from __future__ import annotations

import math
from typing import Sequence

from engram.errors import EngramError


class StatisticsError(EngramError):
    """A statistic asked of data that cannot give it; the message names the value and the fix."""


def t_sf_two_sided(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's t with integer ``df`` (exact closed-form series)."""
    if df < 1:
        raise StatisticsError(f"df={df} must be >= 1 (a paired test needs >= 2 seeds)")
    if math.isinf(t):
        return 0.0
    if math.isnan(t):
        return float("nan")
    theta = math.atan(abs(t) / math.sqrt(df))
    c, s = math.cos(theta), math.sin(theta)
    # A(t|df) = P(|T| < |t|), Abramowitz & Stegun 26.7.3 (odd df) / 26.7.4 (even df).
    if df % 2 == 1:
        acc, term = 0.0, c
        if df > 1:
            acc = term
            for k in range(3, df - 1, 2):
                term *= c * c * (k - 1) / k
                acc += term
        a = (2 / math.pi) * (theta + s * acc) if df > 1 else 2 * theta / math.pi
    else:
        acc, term = 1.0, 1.0
        for k in range(2, df - 1, 2):
            term *= c * c * (k - 1) / k
            acc += term
        a = s * acc
    return max(0.0, min(1.0, 1.0 - a))


def paired_t(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Paired t-test of a - b over seeds: {"n", "mean_diff", "se", "t", "p" (two-sided)}.

    With fewer than two pairs, se, t and p are NaN; when every pair differs by the same amount
    t is undefined (p is 1.0 if that amount is 0, else NaN)."""
    if len(a) != len(b):
        raise StatisticsError(f"paired test needs equal lengths, got {len(a)} and {len(b)}; "
                              f"pair the runs by seed")
    n = len(a)
    d = [x - y for x, y in zip(a, b)]
    mean = sum(d) / n if n else float("nan")
    if n < 2:
        return {"n": n, "mean_diff": mean, "se": float("nan"), "t": float("nan"), "p": float("nan")}
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    se = sd / math.sqrt(n)
    if se <= 1e-12 * max(1.0, abs(mean)):  # every seed moved by the same amount: t is undefined
        return {"n": n, "mean_diff": mean, "se": 0.0, "t": float("nan"),
                "p": 1.0 if mean == 0 else float("nan")}
    t = mean / se
    return {"n": n, "mean_diff": mean, "se": se, "t": t, "p": t_sf_two_sided(t, n - 1)}


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    """(mean, sample std with n - 1); (NaN, NaN) for no values, std 0.0 for one."""
    n = len(xs)
    if n == 0:
        return float("nan"), float("nan")
    m = sum(xs) / n
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0)


def format_p(p: float) -> str:
    """A p-value for a table: 3 decimals, scientific below 0.001, "n/a" for NaN."""
    return "n/a" if p != p else (f"{p:.3f}" if p >= 0.001 else f"{p:.1e}")
