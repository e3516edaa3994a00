"""Suffix-array construction and search over a token stream.

Shape legend
    n tokens in the stream   B batch rows   T positions per row   K max suffix length

Order: the suffix starting at ``p`` is ``tokens[p:]``; suffixes compare lexicographically by
token id, and a suffix that is a proper prefix of another is smaller (no sentinel is stored).
Every occurrence of a query ``q`` is then one contiguous range ``sa[lo:hi]``.

Construction (:func:`build_suffix_array`) uses libdivsufsort (the ``pydivsufsort`` package) when it
is installed: the tokens are sorted as the bytes of their big-endian values, and the suffixes
that start mid-token are dropped, which gives the same order. The reference, always available
and the fallback, is prefix doubling with numpy sorts (Manber & Myers,
with Larsson-Sadakane's "only re-sort unfinished groups"): the first round sorts keys that pack
as many tokens as fit in 62 bits (5 tokens of a 4,096-id vocabulary), and each further round
doubles the compared length ``h`` while sorting only the suffixes whose rank is still shared.
Time O(n log n) for the first sort plus O(u log u) per round for ``u`` unfinished suffixes, over
at most ceil(log2(LRS / tokens_per_key)) + 1 rounds (LRS = longest repeated substring); memory
about 6 int64 words per token during the build (3.6 M tokens: ~170 MB, ~3 s on one core). The
result is stored as uint32 when n < 2**32.

Searches (:func:`find`, :func:`window_ranges`, :func:`window_infgram`) dispatch to the native
kernel ``engram._ngramkernel`` when it was built, else to the pure-Python reference versions in
this module, which define the semantics (the kernel must match them exactly; tests check it).

The document rule
    The stream holds documents each followed by ``eos`` and starts with an ``eos``. A *context*
    for scoring position ``t`` of a row starts at the last ``eos`` at or before ``t`` (that eos
    included: it marks "start of document") or at the row start, so no estimate ever looks
    across a document boundary. Context ranges count only occurrences that have a next token.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from engram.errors import EngramError

try:  # built by setup.py when a C compiler is available; optional by design
    from engram.ngram import _ngramkernel as _native
except ImportError:  # pragma: no cover - depends on the build environment
    _native = None

try:  # a wheel bundling libdivsufsort; the numpy reference below is the fallback
    import pydivsufsort as _divsufsort
except ImportError:  # pragma: no cover - depends on the environment
    _divsufsort = None

SA_METHODS = ("auto", "divsufsort", "doubling")
"""``build_suffix_array(method=...)``: auto picks divsufsort when installed, else doubling."""

NATIVE_KERNEL_AVAILABLE: bool = _native is not None
"""True when the native search kernel was built and imported."""


class SuffixArrayError(EngramError):
    """Bad input to suffix-array construction or search; the message names the value."""


# ----------------------------------------------------------------------------- construction
def sa_dtype(n: int) -> np.dtype:
    """uint32 while every position fits, else int64."""
    return np.dtype("<u4") if n < 2**32 else np.dtype("<i8")


def build_suffix_array(tokens: np.ndarray, progress: Optional[object] = None, method: str = "auto") -> np.ndarray:
    """Suffix array of a 1-D array of non-negative integer ids (see the module docstring).

    ``progress``: an optional tqdm-like object; ``update(1)`` is called once per doubling round
    (divsufsort reports one step). ``method``: one of :data:`SA_METHODS`; every method gives the
    same array.
    """
    if method not in SA_METHODS:
        raise SuffixArrayError(f"method={method!r}; choose one of {list(SA_METHODS)}")
    if method == "divsufsort" and _divsufsort is None:
        raise SuffixArrayError("method='divsufsort' needs the pydivsufsort package: pip install pydivsufsort")
    t = np.asarray(tokens)
    if t.ndim != 1:
        raise SuffixArrayError(f"tokens must be 1-D, got shape {t.shape}")
    n = int(t.size)
    if n == 0:
        return np.empty(0, dtype=sa_dtype(0))
    if not np.issubdtype(t.dtype, np.integer) or int(t.min()) < 0:
        raise SuffixArrayError("tokens must be non-negative integers")
    if method != "doubling" and _divsufsort is not None and int(t.max()) < 2**32:
        sa = _by_divsufsort(t)
        if progress is not None:
            progress.update(1)
        return sa
    return _by_doubling(t, progress)


def _by_divsufsort(t: np.ndarray) -> np.ndarray:
    """Suffix-sort the big-endian bytes of the ids (2 bytes each when they fit, else 4) and keep
    the suffixes that start on a token: byte order equals token order, shorter first."""
    width = 2 if int(t.max()) < 2**16 else 4
    raw = np.ascontiguousarray(t, dtype=np.dtype(f">u{width}")).view(np.uint8)
    sa = _divsufsort.divsufsort(raw)  # int32, or int64 past 2**31 bytes
    sa = sa[(sa & (width - 1)) == 0]
    sa //= width
    return sa.astype(sa_dtype(int(t.size)))


def _by_doubling(t: np.ndarray, progress: Optional[object]) -> np.ndarray:
    """The reference construction: prefix doubling with numpy sorts."""
    n = int(t.size)
    if n >= 2**62:
        raise SuffixArrayError(f"{n} tokens is too many for int64 keys")
    t64 = t.astype(np.int64) + 1  # 0 stands for "past the end", smaller than every token
    bits = max(1, int(t64.max()).bit_length())
    per = max(1, 62 // bits)
    key = np.zeros(n, dtype=np.int64)
    for j in range(per):
        shifted = np.zeros(n, dtype=np.int64)
        if j < n:
            shifted[: n - j] = t64[j:]
        key = (key << bits) | shifted
    del t64, shifted
    sa = np.argsort(key, kind="stable").astype(np.int64)
    skey = key[sa]
    del key
    # rank[p] = index in sa of the first suffix of p's group (groups = equal first h tokens).
    rank = np.empty(n, dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, skey[1:] != skey[:-1]])
    sizes = np.diff(np.r_[starts, n])
    rank[sa] = np.repeat(starts, sizes)
    del skey
    h = per
    # Indices of sa inside groups of size > 1 (unfinished), group by group in sa order.
    active = np.repeat(sizes > 1, sizes)
    if progress is not None:
        progress.update(1)
    while active.any():
        idx = np.flatnonzero(active)
        pos = sa[idx]
        group = rank[pos]  # equal to the group's start index; ascending along idx
        nxt = pos + h
        second = np.full(pos.size, -1, dtype=np.int64)
        inside = nxt < n
        second[inside] = rank[nxt[inside]]
        # Sort each group by the rank h tokens further on (old ranks: read before any update).
        order = np.lexsort((second, group))
        pos, group, second = pos[order], group[order], second[order]
        sa[idx] = pos  # a group keeps its block of sa, since blocks are contiguous and sorted
        new = np.r_[True, (group[1:] != group[:-1]) | (second[1:] != second[:-1])]
        heads = np.flatnonzero(new)
        sub_sizes = np.diff(np.r_[heads, pos.size])
        rank[pos] = np.repeat(idx[heads], sub_sizes)
        still = np.repeat(sub_sizes > 1, sub_sizes)
        active[:] = False
        active[idx[still]] = True
        h *= 2
        if progress is not None:
            progress.update(1)
    return sa.astype(sa_dtype(n))


# ----------------------------------------------------------------------------- reference search
def _cmp(tokens: np.ndarray, p: int, q: list[int], j0: int) -> tuple[int, int]:
    """(sign of suffix(p) vs q prefix-wise, lcp) with the first j0 tokens known equal."""
    n = tokens.shape[0]
    for j in range(j0, len(q)):
        if p + j >= n:
            return -1, j
        v = int(tokens[p + j])
        if v != q[j]:
            return (-1 if v < q[j] else 1), j
    return 0, len(q)


def _bound(tokens, sa, q: list[int], lo: int, hi: int, strict: bool) -> int:
    llcp = rlcp = 0
    while lo < hi:
        mid = (lo + hi) // 2
        c, lcp = _cmp(tokens, int(sa[mid]), q, min(llcp, rlcp))
        if c < 0 or (strict and c == 0):
            lo, llcp = mid + 1, lcp
        else:
            hi, rlcp = mid, lcp
    return lo


def find_py(tokens: np.ndarray, sa: np.ndarray, query, lo: int = 0, hi: Optional[int] = None) -> tuple[int, int]:
    """Reference :func:`find`."""
    n = tokens.shape[0]
    hi = n if hi is None else min(hi, n)
    lo = max(lo, 0)
    if lo >= hi:
        return lo, lo
    q = [int(v) for v in query]
    a = _bound(tokens, sa, q, lo, hi, False)
    b = hi if not q else _bound(tokens, sa, q, a, hi, True)
    return a, b


def _context_range_py(tokens, sa, q: list[int]) -> tuple[int, int]:
    n = tokens.shape[0]
    lo, hi = find_py(tokens, sa, q)
    if q and lo < hi and int(sa[lo]) + len(q) == n:  # the stream's end: no next token
        lo += 1
    return (lo, hi) if lo < hi else (0, 0)


def _context_starts(row: np.ndarray, eos: int) -> np.ndarray:
    """For each position of a row, where its context starts (last eos at or before it, else 0)."""
    T = row.shape[0]
    marks = np.where(row == eos, np.arange(T), 0)
    return np.maximum.accumulate(marks) if T else marks


def window_ranges_py(tokens, sa, x: np.ndarray, eos: int, kmax: int) -> np.ndarray:
    """Reference :func:`window_ranges`."""
    B, T = x.shape
    n = tokens.shape[0]
    out = np.empty((B, T, kmax + 1, 2), dtype=np.int64)
    for b in range(B):
        row = [int(v) for v in x[b]]
        starts = _context_starts(x[b], eos)
        for t in range(T):
            avail = t - int(starts[t]) + 1
            out[b, t, 0] = (0, n)
            empty = n == 0
            for k in range(1, kmax + 1):
                if k > avail:
                    out[b, t, k] = (-1, -1)
                elif empty:
                    out[b, t, k] = (0, 0)
                else:
                    lo, hi = _context_range_py(tokens, sa, row[t - k + 1: t + 1])
                    out[b, t, k] = (lo, hi)
                    empty = lo >= hi
    return out


def window_infgram_py(tokens, sa, x: np.ndarray, eos: int) -> np.ndarray:
    """Reference :func:`window_infgram` (a direct longest-first scan, no matching statistics)."""
    B, T = x.shape
    n = tokens.shape[0]
    out = np.empty((B, T, 3), dtype=np.int64)
    for b in range(B):
        row = [int(v) for v in x[b]]
        starts = _context_starts(x[b], eos)
        for t in range(T):
            avail = t - int(starts[t]) + 1
            found = (0, 0, n)
            for k in range(avail, 0, -1):
                lo, hi = _context_range_py(tokens, sa, row[t - k + 1: t + 1])
                if lo < hi:
                    found = (k, lo, hi)
                    break
            out[b, t] = found
    return out


def lcp_capped_py(tokens: np.ndarray, sa: np.ndarray, cap: int) -> np.ndarray:
    """Reference :func:`lcp_capped`: one gather per depth (vectorised)."""
    n = int(tokens.shape[0])
    out = np.zeros(max(n - 1, 0), dtype=np.uint8)
    if n < 2:
        return out
    t = np.asarray(tokens, dtype=np.int64)
    p = np.asarray(sa, dtype=np.int64)
    alive = np.ones(n - 1, dtype=bool)
    for d in range(cap):
        at = p + d
        td = np.where(at < n, t[np.minimum(at, n - 1)], -1)
        alive &= (td[1:] == td[:-1]) & (td[1:] >= 0)
        out += alive
    return out


# ----------------------------------------------------------------------------- dispatch
def lcp_capped(tokens: np.ndarray, sa: np.ndarray, cap: int, native: Optional[bool] = None) -> np.ndarray:
    """uint8 [n-1]: min(cap, longest common prefix of suffixes sa[i-1] and sa[i]); cap <= 255."""
    if not 0 <= cap <= 255:
        raise SuffixArrayError(f"cap={cap} must be in [0, 255]")
    use = NATIVE_KERNEL_AVAILABLE if native is None else native
    if use and hasattr(_native, "lcp_capped"):
        out = np.zeros(max(int(tokens.shape[0]) - 1, 0), dtype=np.uint8)
        _native.lcp_capped(tokens, sa, int(cap), out)
        return out
    return lcp_capped_py(tokens, sa, cap)


def _as_query(query) -> np.ndarray:
    q = np.ascontiguousarray(np.asarray(query, dtype=np.int64).reshape(-1))
    return q


def _as_windows(x) -> np.ndarray:
    arr = np.ascontiguousarray(np.asarray(x, dtype=np.int64))
    if arr.ndim != 2:
        raise SuffixArrayError(f"x must be [batch, time], got shape {arr.shape}")
    return arr


def find(tokens: np.ndarray, sa: np.ndarray, query, lo: int = 0, hi: Optional[int] = None,
         native: Optional[bool] = None) -> tuple[int, int]:
    """The ``sa`` range ``[lo, hi)`` of suffixes starting with ``query`` (all occurrences).

    O(|query| log n). ``native=None`` uses the kernel when available.
    """
    use = NATIVE_KERNEL_AVAILABLE if native is None else native
    n = int(tokens.shape[0])
    hi = n if hi is None else hi
    if use:
        return _native.find(tokens, sa, _as_query(query), int(lo), int(hi))
    return find_py(tokens, sa, query, lo, hi)


def window_ranges(tokens: np.ndarray, sa: np.ndarray, x, eos: int, kmax: int,
                  native: Optional[bool] = None) -> np.ndarray:
    """[B,T,kmax+1,2] context ranges (lo, hi) of the suffixes of length 0..kmax of every position.

    (-1, -1) marks a suffix longer than the position's context; (0, 0) an unseen context.
    """
    x = _as_windows(x)
    if kmax < 0:
        raise SuffixArrayError(f"kmax={kmax} must be >= 0")
    use = NATIVE_KERNEL_AVAILABLE if native is None else native
    if use:
        out = np.empty((x.shape[0], x.shape[1], kmax + 1, 2), dtype=np.int64)
        _native.window_ranges(tokens, sa, x, int(eos), int(kmax), out)
        return out
    return window_ranges_py(tokens, sa, x, eos, kmax)


def window_infgram(tokens: np.ndarray, sa: np.ndarray, x, eos: int,
                   native: Optional[bool] = None) -> np.ndarray:
    """[B,T,3] (L, lo, hi): the longest context suffix of every position that has a continuation.

    L = 0 means no suffix matched and (lo, hi) = (0, n) is the empty context (all tokens).
    """
    x = _as_windows(x)
    use = NATIVE_KERNEL_AVAILABLE if native is None else native
    if use:
        out = np.empty((x.shape[0], x.shape[1], 3), dtype=np.int64)
        _native.window_infgram(tokens, sa, x, int(eos), out)
        return out
    return window_infgram_py(tokens, sa, x, eos)
