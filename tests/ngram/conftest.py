"""Fixtures of the N-gram tests: ``ref``, brute-force N-gram estimates over plain Python lists,
the specification the index must match.

Streams are lists of ids that start and end with eos (what a segment stores). Nothing here is
clever: every estimate rescans every stream.
"""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest


def normalise(tokens: list[int], eos: int) -> list[int]:
    t = list(tokens)
    if not t or t[0] != eos:
        t = [eos] + t
    if t[-1] != eos:
        t = t + [eos]
    return t


def cut(ctx: list[int], eos: int) -> list[int]:
    last = max((i for i, v in enumerate(ctx) if v == eos), default=None)
    return ctx if last is None else ctx[last:]


def count(streams: list[list[int]], q: list[int]) -> int:
    m = len(q)
    return sum(1 for s in streams for p in range(len(s) - m + 1) if s[p:p + m] == q)


def next_counts(streams: list[list[int]], ctx: list[int]) -> Counter:
    """Next-token counts after ``ctx`` (already cut); empty ctx: every token but the leading eos."""
    c: Counter = Counter()
    m = len(ctx)
    for s in streams:
        for p in range(0 if m else 1, len(s) - m):
            if s[p:p + m] == ctx:
                c[s[p + m]] += 1
    return c


def cont_counts(streams: list[list[int]], ctx: list[int]) -> Counter:
    """For each w: distinct u such that u + ctx + w occurs (ctx may be empty)."""
    pairs: set = set()
    m = len(ctx)
    for s in streams:
        for p in range(1, len(s) - m):
            if s[p:p + m] == ctx:
                pairs.add((s[p - 1], s[p + m]))
    return Counter(w for _, w in pairs)


def dense(counter: Counter, V: int) -> np.ndarray:
    out = np.zeros(V)
    for w, c in counter.items():
        out[w] = c
    return out


def infgram(streams, ctx: list[int], eos: int, V: int) -> tuple[np.ndarray, int]:
    c = cut(ctx, eos)
    for L in range(len(c), -1, -1):
        counts = next_counts(streams, c[len(c) - L:])
        if sum(counts.values()):
            a = dense(counts, V)
            return a / a.sum(), L
    return np.full(V, 1.0 / V), 0  # nothing indexed to predict: uniform


def kn(streams, ctx: list[int], eos: int, V: int, order: int, discounts) -> np.ndarray:
    """``discounts(order, kind) -> (D1, D2, D3)``."""
    c = cut(ctx, eos)
    top = min(order - 1, len(c))
    p = np.full(V, 1.0 / V)
    for k in range(0, top + 1):
        sub = c[len(c) - k:] if k else []
        raw = k == top or (k > 0 and sub[0] == eos)
        a = dense(next_counts(streams, sub) if raw else cont_counts(streams, sub), V)
        total = a.sum()
        if total == 0:
            continue
        d1, d2, d3 = discounts(k + 1, "raw" if raw else "cont")
        d = np.where(a == 1, d1, np.where(a == 2, d2, np.where(a >= 3, d3, 0.0)))
        p = (a - d) / total + d.sum() / total * p
    return p


@pytest.fixture(scope="session")
def ref() -> SimpleNamespace:
    """The brute-force reference: ``ref.count``, ``ref.infgram``, ``ref.kn``, ..."""
    return SimpleNamespace(normalise=normalise, cut=cut, count=count, next_counts=next_counts,
                           cont_counts=cont_counts, dense=dense, infgram=infgram, kn=kn)
