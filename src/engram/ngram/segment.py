"""One immutable piece of an N-gram index: a token stream and its suffix array, in one file.

Shape legend
    n tokens in the segment   R rows (queries) of a batch   V vocabulary

File format (little-endian), version 1 — a 128-byte header, the tokens, then the suffix array::

    offset size  field
    0      8     magic b"ENGRAMNG"
    8      4     format version (uint32)
    12     4     bytes per token: 2 (uint16, vocab_size <= 65536) or 4 (uint32)
    16     4     bytes per suffix-array entry: 4 (uint32, n < 2**32) or 8 (int64)
    20     4     reserved (zero)
    24     8     vocab_size (uint64)
    32     8     num_tokens n (uint64)
    40     8     eos_id (uint64)
    48     64    tokenizer fingerprint (sha256 hex, ASCII)
    112    4     CRC-32 of the payload (tokens, padding and suffix array)
    116    8     reserved (zero)
    124    4     CRC-32 of bytes 0..123
    128    ...   n tokens, zero-padded to a multiple of 8 bytes, then n suffix-array entries

Files are written atomically (temp file, fsync, rename) and opened with ``numpy.memmap``: opening
costs nothing but the header check (plus one sequential CRC pass with ``verify=True``), and the
OS pages in only what queries touch.

The stream invariant: a segment's stream starts and ends with ``eos`` (added on build when
missing), so every document is delimited by eos on both sides (see the document rule in
:mod:`engram.ngram.suffix_array`).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
from tqdm.auto import tqdm

from engram.errors import EngramError
from engram.fsutil import PathLike, atomic_write
from engram.ngram import suffix_array as sa_mod

MAGIC = b"ENGRAMNG"
FORMAT_VERSION = 1
HEADER_SIZE = 128
_HEADER = struct.Struct("<8sIIII QQQ64s I8x")  # everything before the header CRC
_CRC = struct.Struct("<I")
assert _HEADER.size + _CRC.size == HEADER_SIZE
_TOKEN_DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}
_SA_DTYPES = {4: np.dtype("<u4"), 8: np.dtype("<i8")}
BIG_RANGE = 4096  # ranges above this are counted one by one and cached; below, in one batch
_CACHE_ENTRIES = 65536

class NgramIndexError(EngramError):
    """An N-gram index is missing, corrupt, or does not match what it is used with."""


class SegmentError(NgramIndexError):
    """A segment file is missing, corrupt or inconsistent; the message names the file and fix."""


def unique_counts(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique values and their counts, by sorting (numpy 2's hash-based unique is slower)."""
    a = np.asarray(a)
    if a.size == 0:
        return a, np.zeros(0, dtype=np.int64)
    s = np.sort(a)
    heads = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    return s[heads], np.diff(np.r_[heads, s.size])


def _pad8(nbytes: int) -> int:
    return (-nbytes) % 8


def token_dtype(vocab_size: int) -> np.dtype:
    if not 1 <= vocab_size <= 2**32:
        raise SegmentError(f"vocab_size={vocab_size} must be in [1, 2**32]")
    return _TOKEN_DTYPES[2] if vocab_size <= 2**16 else _TOKEN_DTYPES[4]


def normalise_stream(tokens: Any, vocab_size: int, eos_id: int) -> np.ndarray:
    """Check ids and enforce the stream invariant (starts and ends with eos); returns a copy."""
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise SegmentError(f"tokens must be a 1-D array, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise SegmentError(f"tokens must be integers, got dtype {arr.dtype}")
    if not 0 <= eos_id < vocab_size:
        raise SegmentError(f"eos_id={eos_id} is outside the vocabulary [0, {vocab_size})")
    if arr.size:
        bad = np.flatnonzero((arr < 0) | (arr >= vocab_size))
        if bad.size:
            raise SegmentError(f"token id {int(arr[bad[0]])} at position {int(bad[0])} is outside "
                               f"[0, {vocab_size}); was the text encoded with another tokenizer?")
    dtype = token_dtype(vocab_size)
    parts = []
    if arr.size == 0 or int(arr[0]) != eos_id:
        parts.append(np.array([eos_id], dtype=dtype))
    parts.append(arr.astype(dtype, copy=False))
    if arr.size == 0 or int(arr[-1]) != eos_id:
        parts.append(np.array([eos_id], dtype=dtype))
    return np.ascontiguousarray(np.concatenate(parts))


# ----------------------------------------------------------------------------- statistics
def count_of_counts(tokens: np.ndarray, sa: np.ndarray, eos_id: int, max_order: int,
                    progress: bool = False, native: Optional[bool] = None) -> dict[str, list[list[int]]]:
    """:func:`count_of_counts_py`, by the native kernel when it was built (one pass per order, no
    sorting; the same numbers). ``native=None`` uses the kernel when available."""
    use = sa_mod.NATIVE_KERNEL_AVAILABLE if native is None else native
    native_fn = getattr(sa_mod._native, "count_of_counts", None)
    if not use or native_fn is None or int(tokens.shape[0]) == 0:
        return count_of_counts_py(tokens, sa, eos_id, max_order, progress)
    out = np.zeros((2, max_order, 4), dtype=np.int64)
    native_fn(tokens, sa, int(eos_id), int(max_order), out)
    return {"raw": out[0].tolist(), "cont": out[1].tolist()}


def count_of_counts_py(tokens: np.ndarray, sa: np.ndarray, eos_id: int, max_order: int,
                       progress: bool = False) -> dict[str, list[list[int]]]:
    """The reference: n1..n4 (how many distinct n-grams occur exactly 1, 2, 3, 4 times) for orders 1..max_order.

    "raw": counts of k-grams; "cont": continuation counts (distinct left neighbours u of u·g) of
    k-grams g whose first k-1 tokens hold no eos (the contexts that use continuation counts).
    Only n-grams obeying the document rule are counted (eos only first or last). These feed
    the modified Kneser-Ney discounts.

    No sorting: at depth d, suffixes adjacent in sa whose common prefix (capped LCP, one native
    pass) is >= d form the groups of equal d-grams (O(n) per depth); a continuation count of g is the number of distinct
    (k+1)-grams u·g, i.e. of depth-(k+1) groups whose suffix from the second token lies in g's
    depth-k group. Time O(n * max_order), memory ~5 int64 per token.
    """
    n = int(tokens.shape[0])
    t = np.asarray(tokens, dtype=np.int64)
    p = np.asarray(sa, dtype=np.int64)
    ceos = np.r_[0, np.cumsum(t == eos_id)]  # eos count in tokens[:i]
    raw: list[list[int]] = []
    cont: list[list[int]] = []
    if n == 0:
        return {"raw": [[0, 0, 0, 0]] * max_order, "cont": [[0, 0, 0, 0]] * max_order}
    lcp = sa_mod.lcp_capped(np.asarray(tokens), np.asarray(sa), max_order + 1)
    prev_rank: Optional[np.ndarray] = None
    for d in tqdm(range(1, max_order + 2), desc="n-gram statistics", disable=not progress, leave=False):
        heads = np.r_[True, lcp < d]  # sa[i-1], sa[i] differ within their first d tokens
        gid = np.cumsum(heads) - 1
        if d <= max_order:
            valid = p + d <= n
            if d > 2:  # eos strictly inside the d-gram breaks the document rule
                valid &= (ceos[np.minimum(p + d - 1, n)] - ceos[np.minimum(p + 1, n)]) == 0
            sizes = np.bincount(gid[valid], minlength=int(gid[-1]) + 1)
            raw.append(_n1234(sizes[sizes > 0]))
        if prev_rank is not None:  # continuation counts of order k = d - 1
            k = d - 1
            hp = p[heads]  # one start position per distinct d-gram u·g
            ok = hp + d <= n
            hp = hp[ok]
            ok = (ceos[hp + k] - ceos[hp + 1]) == 0  # no eos in g[:-1]
            per_g = np.bincount(prev_rank[hp[ok] + 1])
            cont.append(_n1234(per_g[per_g > 0]))
        if d <= max_order:
            prev_rank = np.empty(n, dtype=np.int64)
            prev_rank[p] = gid
    return {"raw": raw, "cont": cont}


def _n1234(sizes: np.ndarray) -> list[int]:
    return [int((sizes == c).sum()) for c in (1, 2, 3, 4)]


# ----------------------------------------------------------------------------- writing
def write_segment(path: PathLike, stream: np.ndarray, vocab_size: int, eos_id: int,
                  fingerprint: str, sa: Optional[np.ndarray] = None, progress: bool = False) -> np.ndarray:
    """Build the suffix array of ``stream`` (already normalised) and write the segment file.

    Returns the suffix array (reused by the caller for statistics).
    """
    stream = np.ascontiguousarray(stream, dtype=token_dtype(vocab_size))
    n = int(stream.size)
    if sa is None:
        rounds = tqdm(desc="suffix array (doubling rounds)", unit="round", disable=not progress, leave=False)
        with rounds:
            sa = sa_mod.build_suffix_array(stream, progress=rounds)
    sa = np.ascontiguousarray(sa, dtype=sa_mod.sa_dtype(n))
    pad = b"\0" * _pad8(stream.nbytes)
    crc = zlib.crc32(memoryview(stream).cast("B"))
    crc = zlib.crc32(pad, crc)
    crc = zlib.crc32(memoryview(sa).cast("B"), crc)
    fp = fingerprint.encode("ascii")
    if len(fp) != 64:
        raise SegmentError(f"fingerprint {fingerprint!r} must be 64 hex characters (a tokenizer sha256)")
    body = _HEADER.pack(MAGIC, FORMAT_VERSION, stream.dtype.itemsize, sa.dtype.itemsize, 0,
                        vocab_size, n, eos_id, fp, crc)
    header = body + _CRC.pack(zlib.crc32(body))

    def write(f) -> None:
        f.write(header)
        f.write(memoryview(stream).cast("B"))
        f.write(pad)
        f.write(memoryview(sa).cast("B"))

    atomic_write(path, write)
    return sa


# ----------------------------------------------------------------------------- reading
@dataclass
class Segment:
    """A segment opened read-only: ``tokens`` [n] and ``sa`` [n] are memory maps."""

    path: Path
    tokens: np.ndarray
    sa: np.ndarray
    vocab_size: int
    eos_id: int
    fingerprint: str
    _cache: dict = field(default_factory=dict, repr=False)
    _unigram: Optional[np.ndarray] = field(default=None, repr=False)

    @property
    def n(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self.path.stat().st_size)

    # -- searches ------------------------------------------------------------------------------
    def find(self, query) -> tuple[int, int]:
        return sa_mod.find(self.tokens, self.sa, query)

    def count(self, query) -> int:
        lo, hi = self.find(query)
        return hi - lo

    def window_ranges(self, x: np.ndarray, kmax: int) -> np.ndarray:
        return sa_mod.window_ranges(self.tokens, self.sa, x, self.eos_id, kmax)

    def window_infgram(self, x: np.ndarray) -> np.ndarray:
        return sa_mod.window_infgram(self.tokens, self.sa, x, self.eos_id)

    # -- whole-stream statistics ------------------------------------------------------------------
    def unigram(self) -> np.ndarray:
        """[V] int64 token counts (the empty context's next-token counts)."""
        if self._unigram is None:
            self._unigram = np.bincount(np.asarray(self.tokens), minlength=self.vocab_size).astype(np.int64)
        return self._unigram

    def bigram_keys(self) -> np.ndarray:
        """Sorted unique ``u * V + w`` of every adjacent pair (u, w): continuation unigram input."""
        t = np.asarray(self.tokens, dtype=np.int64)
        return unique_counts(t[:-1] * self.vocab_size + t[1:])[0]

    # -- next-token counts of sa ranges -----------------------------------------------------------
    def next_tokens(self, lo: int, hi: int, depth: int) -> np.ndarray:
        return np.asarray(self.tokens[self.sa[lo:hi].astype(np.int64) + depth], dtype=np.int64)

    def raw_sparse(self, lo: int, hi: int, depth: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, counts) of the tokens following the occurrences sa[lo:hi] of a depth-long context."""
        key = (lo, hi, depth, "raw")
        hit = self._cache.get(key)
        if hit is None:
            ids, counts = unique_counts(self.next_tokens(lo, hi, depth))
            hit = (ids, counts.astype(np.float32))
            self._remember(key, hit, hi - lo)
        return hit

    def pair_keys(self, lo: int, hi: int, depth: int) -> np.ndarray:
        """Sorted unique ``w * V + u``: (left neighbour u, next token w) pairs of sa[lo:hi]."""
        key = (lo, hi, depth, "pairs")
        hit = self._cache.get(key)
        if hit is None:
            pos = self.sa[lo:hi].astype(np.int64)
            u = np.asarray(self.tokens[pos - 1], dtype=np.int64)
            w = np.asarray(self.tokens[pos + depth], dtype=np.int64)
            hit = unique_counts(w * self.vocab_size + u)[0]
            self._remember(key, hit, hi - lo)
        return hit

    def cont_sparse(self, lo: int, hi: int, depth: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, continuation counts): for each next token w, how many distinct left neighbours."""
        key = (lo, hi, depth, "cont")
        hit = self._cache.get(key)
        if hit is None:
            ids, counts = unique_counts(self.pair_keys(lo, hi, depth) // self.vocab_size)
            hit = (ids, counts.astype(np.float32))
            self._remember(key, hit, hi - lo)
        return hit

    def _remember(self, key, value, size: int) -> None:
        if size < BIG_RANGE // 4:
            return  # cheap to recompute; keep the cache for the expensive ones
        if len(self._cache) >= _CACHE_ENTRIES:
            self._cache.clear()  # crude but bounded; big ranges are few, they come back quickly
        self._cache[key] = value

    def verify(self) -> None:
        """Recompute the payload CRC (one sequential read of the file)."""
        _verify_payload(self.path)


def _read_header(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SegmentError(f"no N-gram segment at {path}; rebuild the index with `engram ngram build`")
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(HEADER_SIZE)
    if raw[: len(MAGIC)] != MAGIC[: len(raw)] or len(raw) < HEADER_SIZE:
        what = "truncated" if raw == MAGIC[: len(raw)] else f"not an engram N-gram segment (magic {raw[:8]!r})"
        raise SegmentError(f"{path} is {what}; rebuild it with `engram ngram build` / `compact`")
    body, (crc,) = raw[: _HEADER.size], _CRC.unpack_from(raw, _HEADER.size)
    magic, version, tw, sw, _, vocab, n, eos, fp, payload_crc = _HEADER.unpack(body)
    if version != FORMAT_VERSION:
        raise SegmentError(f"{path} has segment format version {version}; this engram-lm reads "
                           f"version {FORMAT_VERSION}; rebuild the index with `engram ngram build`")
    if zlib.crc32(body) != crc:
        raise SegmentError(f"{path} has a corrupt header (checksum mismatch); rebuild the index")
    if tw not in _TOKEN_DTYPES or sw not in _SA_DTYPES:
        raise SegmentError(f"{path}: unknown widths token={tw} sa={sw} bytes; rebuild the index")
    tok_bytes = n * tw
    expected = HEADER_SIZE + tok_bytes + _pad8(tok_bytes) + n * sw
    if size != expected:
        what = "truncated" if size < expected else "longer than its header says"
        raise SegmentError(f"{path} is {what}: expected {expected} bytes for {n} tokens, found {size}; "
                           "rebuild the index")
    return dict(tw=tw, sw=sw, vocab=vocab, n=n, eos=eos, fp=fp.decode("ascii"), crc=payload_crc)


def _verify_payload(path: Path) -> None:
    h = _read_header(path)
    crc = 0
    with path.open("rb") as f:
        f.seek(HEADER_SIZE)
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    if crc != h["crc"]:
        raise SegmentError(f"{path}: payload checksum mismatch (file corrupt); rebuild the index "
                           "with `engram ngram build` or `engram ngram compact`")


def open_segment(path: PathLike, verify: bool = True, expected_fingerprint: Optional[str] = None,
                 expected_vocab_size: Optional[int] = None) -> Segment:
    """Memory-map a segment after checking its header, size and (``verify``) payload checksum."""
    path = Path(path)
    h = _read_header(path)
    if verify:
        _verify_payload(path)
    if expected_fingerprint is not None and h["fp"] != expected_fingerprint:
        raise SegmentError(f"{path} was built with tokenizer {h['fp'][:16]}..., expected "
                           f"{expected_fingerprint[:16]}...; rebuild it with the index's tokenizer")
    if expected_vocab_size is not None and h["vocab"] != expected_vocab_size:
        raise SegmentError(f"{path} has vocab_size {h['vocab']}, expected {expected_vocab_size}")
    n, tw, sw = h["n"], h["tw"], h["sw"]
    if n == 0:
        tokens = np.empty(0, _TOKEN_DTYPES[tw])
        sa = np.empty(0, _SA_DTYPES[sw])
    else:
        tokens = np.memmap(path, dtype=_TOKEN_DTYPES[tw], mode="r", offset=HEADER_SIZE, shape=(n,))
        off = HEADER_SIZE + n * tw + _pad8(n * tw)
        sa = np.memmap(path, dtype=_SA_DTYPES[sw], mode="r", offset=off, shape=(n,))
    return Segment(path=path, tokens=tokens, sa=sa, vocab_size=int(h["vocab"]), eos_id=int(h["eos"]),
                   fingerprint=h["fp"])
