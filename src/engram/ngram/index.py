"""An exact, updatable N-gram index: a base segment plus delta segments merged at query time.

Shape legend
    B batch rows   T positions per row   V vocabulary   R = B*T scored positions   N KN order

Layout on disk (a directory)::

    INDEX/manifest.json      format, version, vocab_size, eos_id, tokenizer fingerprint,
                             generation, and the segments (file, tokens, documents, sha256 of
                             the source, KN count-of-counts); written atomically, *last*
    INDEX/tokenizer.json     the tokenizer the ids come from (optional; needed for text input)
    INDEX/*.ngs              segment files (see :mod:`engram.ngram.segment`)

Updates never rewrite a segment: ``add`` writes a new delta segment and then the manifest,
``remove`` writes the manifest and then deletes the delta, ``compact`` merges everything into a
new base. A crash leaves either the old or the new manifest, both consistent (an orphan segment
file at worst). Single writer: concurrent writers must be serialised by the caller.

Query semantics (all counts exact, summed over segments; documents never straddle segments):

- ``count(q)``: occurrences of the id sequence ``q`` in the indexed streams.
- Conditional verbs obey the document rule of :mod:`engram.ngram.suffix_array`: the context is
  cut after its last eos (kept as a start-of-document marker) and only occurrences followed by a
  token count. ``prob``/``ntd``: maximum likelihood given the whole (cut) context.
- ``infgram_ntd``: the "infinity-gram" — the MLE for the longest suffix of the context that
  occurs with a continuation, and that suffix's length.
- ``kn_ntd``: interpolated modified Kneser-Ney of order N down to a uniform floor
  (:mod:`engram.ngram.kn`); the highest available level uses raw counts, lower levels
  continuation counts, except contexts starting with eos (no left neighbour), which use raw ones.

Every distribution is a dense [V] (or [B,T,V]) tensor that sums to one; the MLE ``ntd`` of an
unseen context raises :class:`UnseenContextError` instead (use infgram or KN). Discounts of an
index with deltas come from summed per-segment statistics; ``compact`` re-estimates them exactly.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch

from engram import __version__
from engram.config import DEFAULT_KN_ORDER
from engram.data.shards import load_dataset
from engram.data.tokenizer import load_tokenizer, save_tokenizer, tokenizer_fingerprint
from engram.fsutil import PathLike, atomic_write
from engram.ngram import kn as kn_mod
from engram.ngram.segment import (
    BIG_RANGE,
    NgramIndexError,
    Segment,
    count_of_counts,
    normalise_stream,
    open_segment,
    unique_counts,
    write_segment,
)

FORMAT_NAME = "engram-ngram-index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
DEFAULT_STATS_ORDER = 6
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_ROWS_PER_CHUNK = 1024  # dense [rows, V] work is done in chunks of this many positions

class UnseenContextError(NgramIndexError):
    """An MLE query on a context that never occurs (with a continuation) in the index."""


class LeakageError(NgramIndexError):
    """Scoring text that is itself indexed: the N-gram side would see the answers."""


@dataclass(frozen=True)
class InfgramResult:
    """``dist`` [V] next-token distribution of the longest matching suffix, its length and count."""

    dist: torch.Tensor
    suffix_len: int
    count: int


@dataclass
class NgramBatch:
    """N-gram estimates for every position of x [B,T] (position t predicts token t+1)."""

    suffix_len: torch.Tensor  # [B,T] int64, infinity-gram suffix length
    count: torch.Tensor  # [B,T] float32, occurrences of that suffix with a continuation
    distinct: torch.Tensor  # [B,T] float32, distinct tokens following it
    infgram: Optional[torch.Tensor] = None  # [B,T,V] probabilities
    kn: Optional[torch.Tensor] = None  # [B,T,V] probabilities


@dataclass
class SegmentInfo:
    name: str
    file: str
    kind: str  # "base" or "delta"
    tokens: int
    documents: int
    source: str
    source_sha256: Optional[str]
    created: str
    coc: dict[str, list[list[int]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in ("base", "delta"):
            raise NgramIndexError(f"segment kind {self.kind!r} must be 'base' or 'delta'")
        if not _NAME_RE.match(self.name):
            raise NgramIndexError(f"segment name {self.name!r} must be 1-64 of [A-Za-z0-9_.-], "
                                  "starting with a letter or digit")

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def stream_sha256(tokens: np.ndarray) -> str:
    """sha256 of a token array's values (as little-endian int64, so dtype does not matter)."""
    return hashlib.sha256(np.ascontiguousarray(tokens, dtype="<i8").tobytes()).hexdigest()


class NgramIndex:
    """A base segment plus deltas; see the module docstring. Open with :meth:`open`."""

    def __init__(self, path: Path, manifest: dict[str, Any], segments: list[Segment]):
        self.path = path
        self.manifest = manifest
        self.segments = segments
        self.vocab_size = int(manifest["vocab_size"])
        self.eos_id = int(manifest["eos_id"])
        self.fingerprint = str(manifest["tokenizer_fingerprint"])
        self._cont_unigram: Optional[np.ndarray] = None
        self._tokenizer = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(cls, path: PathLike, tokens: Any, *, vocab_size: int, eos_id: int, fingerprint: str,
              tokenizer=None, stats_order: int = DEFAULT_STATS_ORDER, source: str = "",
              overwrite: bool = False, progress: bool = True) -> "NgramIndex":
        """Index a token stream (documents separated by ``eos_id``) into the directory ``path``."""
        path = Path(path)
        if (path / MANIFEST).exists() and not overwrite:
            raise NgramIndexError(f"{path} already holds an N-gram index; pass overwrite=True "
                                  "(CLI: --force) or use `engram ngram add` to extend it")
        if stats_order < 1:
            raise NgramIndexError(f"stats_order={stats_order} must be >= 1 (the highest KN order)")
        if tokenizer is not None and tokenizer_fingerprint(tokenizer) != fingerprint:
            raise NgramIndexError("the tokenizer given does not have the fingerprint given")
        path.mkdir(parents=True, exist_ok=True)
        old = _read_manifest(path) if (path / MANIFEST).exists() else None
        generation = (int(old["generation"]) + 1) if old else 1
        info = _write_new_segment(path, f"base-g{generation}", "base", tokens, vocab_size, eos_id,
                                  fingerprint, stats_order, source, progress)
        if tokenizer is not None:
            save_tokenizer(tokenizer, path / TOKENIZER_FILE)
        manifest = {
            "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "vocab_size": int(vocab_size),
            "eos_id": int(eos_id), "tokenizer_fingerprint": fingerprint, "stats_order": stats_order,
            "generation": generation, "created": _now(), "engram_lm_version": __version__,
            "segments": [info.to_dict()],
        }
        _write_manifest(path, manifest)
        if old:
            _remove_orphans(path, manifest, old)
        return cls.open(path, verify=False)

    @classmethod
    def from_dataset(cls, path: PathLike, data_dir: PathLike, split: str = "train", **kw) -> "NgramIndex":
        """Index one split of a prepared dataset (``engram data prepare``), tokenizer included."""
        if split not in ("train", "val"):
            raise NgramIndexError(f"split={split!r}; choose 'train' or 'val'")
        ds = load_dataset(data_dir)
        shard = getattr(ds, split)
        return cls.build(path, np.asarray(shard.tokens), vocab_size=shard.vocab_size, eos_id=ds.eos_id,
                         fingerprint=shard.fingerprint, tokenizer=ds.tokenizer,
                         source=f"{Path(data_dir).resolve()}:{split}", **kw)

    @classmethod
    def open(cls, path: PathLike, verify: bool = True) -> "NgramIndex":
        """Open an index directory; ``verify`` re-checks every segment's payload checksum."""
        path = Path(path)
        manifest = _read_manifest(path)
        segs = [open_segment(path / s["file"], verify=verify, expected_fingerprint=manifest["tokenizer_fingerprint"],
                             expected_vocab_size=int(manifest["vocab_size"]))
                for s in manifest["segments"]]
        for s, info in zip(segs, manifest["segments"]):
            if s.n != int(info["tokens"]) or s.eos_id != int(manifest["eos_id"]):
                raise NgramIndexError(f"{s.path} does not match {path / MANIFEST} (tokens {s.n} vs "
                                      f"{info['tokens']}); rebuild the index")
        return cls(path, manifest, segs)

    # ------------------------------------------------------------------ updates
    @property
    def segment_infos(self) -> list[SegmentInfo]:
        return [SegmentInfo(**s) for s in self.manifest["segments"]]

    @property
    def deltas(self) -> list[str]:
        return [s["name"] for s in self.manifest["segments"] if s["kind"] == "delta"]

    @property
    def num_tokens(self) -> int:
        return sum(s.n for s in self.segments)

    def add(self, tokens: Any, name: Optional[str] = None, source: str = "",
            progress: bool = False) -> SegmentInfo:
        """Index new documents (eos-separated ids) as a delta; visible to queries at once."""
        names = {s["name"] for s in self.manifest["segments"]}
        if name is None:
            k = len(names)
            while f"delta-{k:04d}" in names:
                k += 1
            name = f"delta-{k:04d}"
        if name in names:
            raise NgramIndexError(f"{self.path} already has a segment named {name!r}; pick another "
                                  f"--name or remove it first (`engram ngram remove {self.path} {name}`)")
        generation = int(self.manifest["generation"]) + 1
        info = _write_new_segment(self.path, name, "delta", tokens, self.vocab_size, self.eos_id,
                                  self.fingerprint, int(self.manifest["stats_order"]), source, progress,
                                  file_name=f"delta-g{generation}-{name}.ngs")
        manifest = dict(self.manifest, generation=generation,
                        segments=self.manifest["segments"] + [info.to_dict()])
        _write_manifest(self.path, manifest)
        self.manifest = manifest
        self.segments.append(open_segment(self.path / info.file, verify=False))
        self._invalidate()
        return info

    def add_texts(self, texts: Iterable[str], name: Optional[str] = None, source: str = "") -> SegmentInfo:
        """Encode documents with the index's tokenizer (eos after each) and :meth:`add` them."""
        tok = self.tokenizer
        ids: list[int] = []
        for text in texts:
            ids += tok.encode(text, add_special_tokens=False).ids + [self.eos_id]
        if not ids:
            raise NgramIndexError("no text to add; give at least one non-empty document")
        return self.add(np.asarray(ids, dtype=np.int64), name=name, source=source)

    def remove(self, name: str) -> SegmentInfo:
        """Drop a delta: queries immediately behave as if it had never been added."""
        infos = self.manifest["segments"]
        hit = [i for i, s in enumerate(infos) if s["name"] == name]
        if not hit:
            raise NgramIndexError(f"{self.path} has no segment {name!r}; deltas: {self.deltas or 'none'}")
        i = hit[0]
        if infos[i]["kind"] == "base":
            raise NgramIndexError(f"{name!r} is the base segment; rebuild the index instead of removing it")
        manifest = dict(self.manifest, generation=int(self.manifest["generation"]) + 1,
                        segments=infos[:i] + infos[i + 1:])
        _write_manifest(self.path, manifest)
        self.manifest = manifest
        self.segments.pop(i)
        (self.path / infos[i]["file"]).unlink(missing_ok=True)
        self._invalidate()
        return SegmentInfo(**infos[i])

    def compact(self, progress: bool = True) -> SegmentInfo:
        """Merge base and deltas into one new base (one suffix-array build of the whole stream).

        Conditional estimates are unchanged (up to re-estimated KN discounts); raw counts of
        queries that contain eos can drop by one per merged boundary (the shared eos).
        """
        parts = [np.asarray(self.segments[0].tokens)]
        parts += [np.asarray(s.tokens)[1:] for s in self.segments[1:]]  # one shared eos per junction
        stream = np.concatenate(parts)
        sources = "; ".join(s["source"] or s["name"] for s in self.manifest["segments"])
        old = self.manifest
        generation = int(old["generation"]) + 1
        info = _write_new_segment(self.path, f"base-g{generation}", "base", stream, self.vocab_size,
                                  self.eos_id, self.fingerprint, int(old["stats_order"]), sources, progress)
        manifest = dict(old, generation=generation, segments=[info.to_dict()])
        _write_manifest(self.path, manifest)
        _remove_orphans(self.path, manifest, old)
        self.manifest = manifest
        self.segments = [open_segment(self.path / info.file, verify=False)]
        self._invalidate()
        return info

    def _invalidate(self) -> None:
        self._cont_unigram = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            p = self.path / TOKENIZER_FILE
            if not p.is_file():
                raise NgramIndexError(f"{self.path} has no {TOKENIZER_FILE}; pass token ids, or rebuild "
                                      "the index from a prepared dataset (it copies the tokenizer)")
            tok = load_tokenizer(p)
            if tokenizer_fingerprint(tok) != self.fingerprint:
                raise NgramIndexError(f"{p} does not match the index's tokenizer fingerprint; rebuild the index")
            self._tokenizer = tok
        return self._tokenizer

    # ------------------------------------------------------------------ statistics
    def discounts(self, order: int, kind: str) -> kn_mod.Discounts:
        """Modified-KN discounts for ``order`` (1-based) and kind "raw" or "cont"."""
        stats_order = int(self.manifest["stats_order"])
        if not 1 <= order <= stats_order:
            raise NgramIndexError(f"KN order {order} exceeds the statistics kept by this index "
                                  f"(stats_order={stats_order}); rebuild with a larger --stats-order")
        total = np.zeros(4, dtype=np.int64)
        for s in self.manifest["segments"]:
            total += np.asarray(s["coc"][kind][order - 1], dtype=np.int64)
        return kn_mod.Discounts.from_count_of_counts(total.tolist())

    def unigram(self) -> np.ndarray:
        """[V] counts of every token that follows something (the empty context's continuations)."""
        total = np.zeros(self.vocab_size, dtype=np.int64)
        for s in self.segments:
            total += s.unigram()
            total[int(s.tokens[0])] -= 1  # the leading eos is a stream start, not a target
        return total

    def cont_unigram(self) -> np.ndarray:
        """[V] continuation counts N1+(. w): distinct tokens seen immediately before w."""
        if self._cont_unigram is None:
            keys = unique_sorted(np.concatenate([s.bigram_keys() for s in self.segments]))
            self._cont_unigram = np.bincount(keys % self.vocab_size, minlength=self.vocab_size).astype(np.int64)
        return self._cont_unigram

    def stats(self) -> dict[str, Any]:
        segs = []
        for s, info in zip(self.segments, self.manifest["segments"]):
            segs.append({"name": info["name"], "kind": info["kind"], "tokens": s.n,
                         "documents": info["documents"], "bytes": s.nbytes, "source": info["source"],
                         "created": info["created"]})
        return {"path": str(self.path), "vocab_size": self.vocab_size, "eos_id": self.eos_id,
                "tokenizer_fingerprint": self.fingerprint, "generation": self.manifest["generation"],
                "stats_order": self.manifest["stats_order"], "tokens": self.num_tokens,
                "bytes": sum(x["bytes"] for x in segs) + (self.path / MANIFEST).stat().st_size,
                "segments": segs}

    # ------------------------------------------------------------------ single queries
    def _ids(self, ids: Any, what: str) -> np.ndarray:
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= self.vocab_size):
            bad = arr[(arr < 0) | (arr >= self.vocab_size)][0]
            raise NgramIndexError(f"{what} id {int(bad)} is outside the index vocabulary [0, {self.vocab_size})")
        return arr

    def _cut(self, context: Any) -> np.ndarray:
        ctx = self._ids(context, "context")
        where = np.flatnonzero(ctx == self.eos_id)
        return ctx[where[-1]:] if where.size else ctx

    def count(self, query: Any) -> int:
        """Occurrences of the id sequence ``query`` (any ids, eos included) in all segments."""
        q = self._ids(query, "query")
        if q.size == 0:
            return self.num_tokens
        return sum(s.count(q) for s in self.segments)

    def _context_ranges(self, ctx: np.ndarray) -> list[tuple[int, int]]:
        """Per segment, the sa range of the (cut) context's occurrences that have a next token."""
        out = []
        for s in self.segments:
            lo, hi = s.find(ctx)
            if ctx.size and lo < hi and int(s.sa[lo]) + ctx.size == s.n:
                lo += 1  # the stream's last suffix equals the context: nothing follows it
            out.append((lo, hi))
        return out

    def _context_counts(self, ctx: np.ndarray) -> np.ndarray:
        """[V] next-token counts after the (already cut) context, summed over segments."""
        if ctx.size == 0:
            return self.unigram()
        out = np.zeros(self.vocab_size, dtype=np.int64)
        for s, (lo, hi) in zip(self.segments, self._context_ranges(ctx)):
            if lo < hi:
                ids, counts = s.raw_sparse(lo, hi, ctx.size)  # cached when the range is big
                out[ids] += counts.astype(np.int64)
        return out

    def next_counts(self, context: Any) -> np.ndarray:
        """[V] int64 counts of the tokens that follow the (cut) context, summed over segments."""
        return self._context_counts(self._cut(context))

    def ntd(self, context: Any, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """[V] maximum-likelihood next-token distribution after the (cut) context."""
        counts = self._context_counts(self._cut(context))
        total = int(counts.sum())
        if total == 0:
            raise UnseenContextError(f"context {list(self._cut(context))} never occurs with a continuation; "
                                     "use infgram_ntd or kn_ntd, which back off")
        return torch.from_numpy(counts).to(dtype) / total

    def prob(self, context: Any, token: int) -> tuple[float, int, int]:
        """(P_MLE(token | context), count(context + token), count(context)) with the cut context."""
        tok = int(self._ids([token], "token")[0])
        counts = self._context_counts(self._cut(context))
        total = int(counts.sum())
        if total == 0:
            raise UnseenContextError(f"context {list(self._cut(context))} never occurs with a continuation")
        return int(counts[tok]) / total, int(counts[tok]), total

    def infgram_ntd(self, context: Any, dtype: torch.dtype = torch.float64) -> InfgramResult:
        """The infinity-gram estimate: MLE of the longest context suffix that occurs.

        A binary search on the suffix length (occurrence is monotone: if a suffix occurs, so
        do its own suffixes), O(log L) range searches of O(L log n) each.
        """
        ctx = self._cut(context)
        lo_k, hi_k = 0, int(ctx.size)
        while lo_k < hi_k:
            mid = (lo_k + hi_k + 1) // 2
            if any(lo < hi for lo, hi in self._context_ranges(ctx[ctx.size - mid:])):
                lo_k = mid
            else:
                hi_k = mid - 1
        counts = self._context_counts(ctx[ctx.size - lo_k:])
        total = int(counts.sum())
        if total == 0:  # an index with no tokens to predict at all: nothing but uniform
            return InfgramResult(torch.full((self.vocab_size,), 1.0 / self.vocab_size, dtype=dtype), 0, 0)
        return InfgramResult(torch.from_numpy(counts).to(dtype) / total, lo_k, total)

    def kn_ntd(self, context: Any, order: int = DEFAULT_KN_ORDER, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """[V] interpolated modified Kneser-Ney distribution of the given order."""
        ctx = self._cut(context)
        if ctx.size == 0:
            return self._kn_empty(order, dtype)
        ctx = ctx[max(0, ctx.size - (order - 1)):] if order > 1 else ctx[-1:]  # KN reads no further back
        b = self.batch(ctx[None, :], kn_order=order, want_infgram=False, dtype=dtype, last_only=True)
        return b.kn[0, -1]

    def _kn_empty(self, order: int, dtype: torch.dtype) -> torch.Tensor:
        if order < 1:
            raise NgramIndexError(f"KN order {order} must be >= 1")
        a = torch.from_numpy(self.unigram()).to(dtype)[None]
        d = torch.tensor([self.discounts(1, "raw").as_tuple()], dtype=dtype)
        p = kn_mod.kn_step(kn_mod.uniform(1, self.vocab_size, dtype), a, d, torch.ones(1, dtype=torch.bool))
        return p[0]

    # ------------------------------------------------------------------ batched estimates
    def batch(self, x: Any, kn_order: Optional[int] = DEFAULT_KN_ORDER, want_infgram: bool = True,
              dtype: torch.dtype = torch.float32, last_only: bool = False,
              last_n: Optional[int] = None) -> NgramBatch:
        """Estimates for every position of ``x`` [B,T] (ids); position t predicts token t+1.

        The estimate at (b, t) reads only x[b, :t+1] (cut at its last eos): no token at or after
        the target ever enters it. ``last_only`` returns only the last position ([B,1,...]),
        ``last_n`` the last n ([B,n,...]; speculative decoding verifies n positions at once).
        Counting is sparse (next tokens actually seen); each row chunk is written densely once.
        """
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
        x = np.ascontiguousarray(np.asarray(x, dtype=np.int64))
        self._ids(x, "x")
        if x.ndim != 2 or x.shape[1] == 0:
            raise NgramIndexError(f"x must be [batch, time] with time >= 1, got shape {x.shape}")
        if kn_order is not None and kn_order < 1:
            raise NgramIndexError(f"kn_order={kn_order} must be >= 1 (or None to skip KN)")
        if kn_order is not None:
            self.discounts(kn_order, "raw")  # fail early if the statistics do not go that high
        B, T = x.shape
        V = self.vocab_size
        if V_limit_exceeded(V, min(B * T, _ROWS_PER_CHUNK)):
            raise NgramIndexError(f"vocab_size={V} is too large for batched continuation counts "
                                  "(rows * V^2 must fit in int64); use a vocabulary <= 2**21")
        kmax = (kn_order - 1) if kn_order is not None else 0
        if last_only:
            last_n = 1
        if last_n is not None and not 1 <= last_n <= T:
            raise NgramIndexError(f"last_n={last_n} must be in 1..{T} (the positions of x)")
        Tn = last_n or T
        t_sel = slice(T - Tn, T)
        R = B * Tn
        out = NgramBatch(suffix_len=torch.zeros(R, dtype=torch.int64), count=torch.zeros(R),
                         distinct=torch.zeros(R))
        if want_infgram:
            inf_all = np.stack([s.window_infgram(x)[:, t_sel].reshape(R, 3) for s in self.segments])  # [S,R,3]
            out.infgram = torch.empty((R, V), dtype=dtype)
        if kn_order is not None:
            rng_all = np.stack([s.window_ranges(x, kmax)[:, t_sel].reshape(R, kmax + 1, 2)
                                for s in self.segments])  # [S,R,K+1,2]
            first = _context_first_tokens(x, kmax)[:, t_sel].reshape(R, kmax + 1)
            out.kn = torch.empty((R, V), dtype=dtype)
        for c0 in range(0, R, _ROWS_PER_CHUNK):
            c = slice(c0, min(R, c0 + _ROWS_PER_CHUNK))
            if want_infgram:
                p, L, tot, nd = self._infgram_rows(inf_all[:, c], dtype)
                out.infgram[c] = p
                out.suffix_len[c] = torch.from_numpy(L)
                out.count[c] = torch.from_numpy(tot).float()
                out.distinct[c] = torch.from_numpy(nd).float()
            if kn_order is not None:
                out.kn[c] = self._kn_rows(rng_all[:, c], first[c], kmax, dtype)
        shape = (B, Tn)
        out.suffix_len, out.count, out.distinct = (v.reshape(shape) for v in (out.suffix_len, out.count, out.distinct))
        if out.infgram is not None:
            out.infgram = out.infgram.reshape(*shape, V)
        if out.kn is not None:
            out.kn = out.kn.reshape(*shape, V)
        return out

    def _infgram_rows(self, inf: np.ndarray, dtype: torch.dtype):
        """inf [S,R,3] per-segment (L, lo, hi) -> (dist [R,V], L [R], count [R], distinct [R])."""
        R = inf.shape[1]
        V = self.vocab_size
        L = inf[:, :, 0].max(axis=0)
        parts = []
        for si, s in enumerate(self.segments):
            live = (inf[si, :, 0] == L) & (L > 0)
            lo = np.where(live, inf[si, :, 1], 0)
            hi = np.where(live, inf[si, :, 2], 0)
            parts.append(_raw_sparse(s, lo, hi, L))
        rows, w, cnt = _merge_sparse(parts, V)
        total = np.bincount(rows, weights=cnt, minlength=R)
        distinct = np.bincount(rows, minlength=R).astype(np.float64)
        p = torch.zeros((R, V), dtype=dtype)
        zero = np.flatnonzero(L == 0)
        if zero.size:
            u = self.unigram()
            uni = torch.from_numpy(u) / u.sum() if u.sum() else torch.full((V,), 1.0 / V, dtype=torch.float64)
            p[torch.from_numpy(zero)] = uni.to(dtype)
            total[zero] = u.sum()
            distinct[zero] = (u > 0).sum()
        if rows.size:
            p[torch.from_numpy(rows), torch.from_numpy(w)] = torch.from_numpy(cnt / total[rows]).to(dtype)
        return p, L, total, distinct

    def _kn_rows(self, rng: np.ndarray, first: np.ndarray, kmax: int, dtype: torch.dtype) -> torch.Tensor:
        """KN for rows: rng [S,R,K+1,2] context ranges per segment, first [R,K+1] first context token.

        Unrolled recursion: P = sum_k coef_k * term_k + coef_0 * gamma_0 / V with
        coef_k = prod_{j>k} gamma_j, so only sparse terms (levels >= 1) and two outer products
        (level 0: raw or continuation unigram) touch the dense [R,V] output.
        """
        R = rng.shape[1]
        V = self.vocab_size
        avail = rng[0, :, :, 0] >= 0  # [R,K+1]; availability depends on the context only
        top = avail.sum(axis=1) - 1  # the longest available level of each row
        gamma = np.ones((kmax + 1, R))
        level_terms: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []
        dense0: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # kind -> (row mask, term vector)
        for k in range(kmax + 1):
            raw_kind = (top == k) | ((first[:, k] == self.eos_id) & (k > 0))
            d_raw = np.asarray(self.discounts(k + 1, "raw").as_tuple())
            d_cont = np.asarray(self.discounts(k + 1, "cont").as_tuple())
            if k == 0:
                for kind, mask, vec, d in (("raw", raw_kind, self.unigram(), d_raw),
                                           ("cont", ~raw_kind, self.cont_unigram(), d_cont)):
                    if not mask.any():
                        continue
                    a = vec.astype(np.float64)
                    dv = _discount(a, d)
                    total = a.sum()
                    if total > 0:
                        gamma[0, mask] = dv.sum() / total
                        dense0[kind] = (mask, (a - dv) / total)
                continue
            av = avail[:, k]
            if not av.any():
                continue
            raw_rows, cont_rows = av & raw_kind, av & ~raw_kind
            parts = []
            for si, s in enumerate(self.segments):
                lo = np.where(raw_rows, rng[si, :, k, 0], 0)
                hi = np.where(raw_rows, rng[si, :, k, 1], 0)
                parts.append(_raw_sparse(s, lo, hi, np.full(R, k, dtype=np.int64)))
            if cont_rows.any():
                lo = np.where(cont_rows[None], rng[:, :, k, 0], 0)
                hi = np.where(cont_rows[None], rng[:, :, k, 1], 0)
                parts.append(_cont_sparse(self.segments, lo, hi, k, V))
            rows, w, a = _merge_sparse(parts, V)
            if rows.size == 0:
                continue
            d = np.where(raw_kind[:, None], d_raw[None], d_cont[None])  # [R,3]
            dv = np.where(a == 1, d[rows, 0], np.where(a == 2, d[rows, 1], d[rows, 2]))
            total = np.bincount(rows, weights=a, minlength=R)
            dsum = np.bincount(rows, weights=dv, minlength=R)
            used = total > 0
            gamma[k, used] = dsum[used] / total[used]
            level_terms.append((k, rows, w, (a - dv) / total[rows]))
        coef = np.ones((kmax + 1, R))
        for k in range(kmax - 1, -1, -1):
            coef[k] = coef[k + 1] * gamma[k + 1]
        p = torch.from_numpy(coef[0] * gamma[0] / V).to(dtype)[:, None].expand(R, V).clone()
        for kind, (mask, term) in dense0.items():
            p += torch.outer(torch.from_numpy(np.where(mask, coef[0], 0.0)).to(dtype), torch.from_numpy(term).to(dtype))
        for k, rows, w, val in level_terms:
            flat = torch.from_numpy(rows * V + w)
            p.view(-1).index_add_(0, flat, torch.from_numpy(val * coef[k, rows]).to(dtype))
        return p

    # ------------------------------------------------------------------ leakage guard
    def indexed_fraction(self, tokens: Any, k: int = 32, samples: int = 2000, seed: int = 0) -> float:
        """Fraction of sampled eos-free k-grams of ``tokens`` that occur verbatim in the index.

        Near 0 for held-out text, near 1 for text that was indexed (whatever its document
        boundaries); :func:`check_not_indexed` turns a high value into a :class:`LeakageError`.
        """
        t = np.asarray(tokens, dtype=np.int64)
        if t.size < k:
            k = max(1, t.size)
        if t.size == 0:
            return 0.0
        ceos = np.r_[0, np.cumsum(t == self.eos_id)]
        starts = np.arange(0, t.size - k + 1)
        starts = starts[(ceos[starts + k] - ceos[starts]) == 0]
        if starts.size == 0:
            return 0.0
        rng = np.random.default_rng(seed)
        pick = rng.choice(starts, size=min(samples, starts.size), replace=False)
        hits = sum(1 for p in pick if self.count(t[p:p + k]) > 0)
        return hits / pick.size

    def longest_match(self, tokens: Any) -> tuple[int, int]:
        """(length, start) of the longest run of ``tokens`` that occurs in the index, every window
        of every length considered. The longest match ending at a position is at most one longer
        than the one ending before it, so a shrinking scan finds each in amortised O(1) counts."""
        t = self._ids(tokens, "tokens")
        best, best_start, cur = 0, 0, 0
        for end in range(1, int(t.size) + 1):
            cur += 1
            while cur and self.count(t[end - cur:end]) == 0:
                cur -= 1
            if cur > best:
                best, best_start = cur, end - cur
        return best, best_start

    def check_not_indexed(self, tokens: Any, what: str, threshold: float = 0.5) -> float:
        """Raise :class:`LeakageError` when ``tokens`` look indexed; returns the indexed fraction."""
        digest = stream_sha256(normalise_stream(np.asarray(tokens), self.vocab_size, self.eos_id))
        exact = [s["name"] for s in self.manifest["segments"] if s.get("source_sha256") == digest]
        frac = self.indexed_fraction(tokens)
        if exact or frac > threshold:
            where = f"segment {exact[0]!r}" if exact else f"{frac:.0%} of its sampled 32-grams"
            raise LeakageError(
                f"{what} is indexed in {self.path} ({where}): the N-gram side would read the tokens it "
                "is asked to predict. Score held-out text (e.g. --split val), or remove the text from "
                "the index (`engram ngram remove`); pass allow_indexed=True / --allow-indexed-text "
                "only to measure memorisation on purpose")
        return frac


# ----------------------------------------------------------------------------- sparse counting
def V_limit_exceeded(vocab_size: int, rows: int) -> bool:
    return rows * vocab_size * vocab_size >= 2**63


def unique_sorted(a: np.ndarray) -> np.ndarray:
    return unique_counts(a)[0]


def _merge_sparse(parts: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], V: int):
    """Sum sparse (rows, w, value) parts that may share (row, w) -> one entry per (row, w)."""
    parts = [p for p in parts if p[0].size]
    if not parts:
        z = np.zeros(0, dtype=np.int64)
        return z, z, np.zeros(0)
    if len(parts) == 1:
        return parts[0]
    keys = np.concatenate([r * V + w for r, w, _ in parts])
    vals = np.concatenate([v for _, _, v in parts])
    order = np.argsort(keys, kind="stable")
    keys, vals = keys[order], vals[order]
    heads = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    sums = np.add.reduceat(vals, heads)
    keys = keys[heads]
    return keys // V, keys % V, sums


def _discount(a: np.ndarray, d: np.ndarray) -> np.ndarray:
    return np.where(a == 1, d[0], np.where(a == 2, d[1], np.where(a >= 3, d[2], 0.0)))


def _context_first_tokens(x: np.ndarray, kmax: int) -> np.ndarray:
    """[B,T,K+1]: the first token of the level-k context at each position (-1 where k = 0 / n.a.)."""
    B, T = x.shape
    out = np.full((B, T, kmax + 1), -1, dtype=np.int64)
    for k in range(1, kmax + 1):
        if k <= T:
            out[:, k - 1:, k] = x[:, : T - k + 1]
    return out


def _expand(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row of each element, sa index of each element) for the concatenation of sa[lo:hi] ranges."""
    sizes = hi - lo
    total = int(sizes.sum())
    rows = np.repeat(np.arange(lo.size), sizes)
    starts = np.cumsum(sizes) - sizes
    idx = np.arange(total, dtype=np.int64) - np.repeat(starts, sizes) + np.repeat(lo, sizes)
    return rows, idx


def _raw_sparse(seg: Segment, lo: np.ndarray, hi: np.ndarray, depth: np.ndarray):
    """(rows, w, count): next-token counts of sa[lo:hi] at ``depth`` for every row with lo < hi."""
    V = seg.vocab_size
    size = np.maximum(hi - lo, 0)
    small = np.flatnonzero((size > 0) & (size <= BIG_RANGE))
    keys = []
    vals = []
    if small.size:
        rows, idx = _expand(lo[small], lo[small] + size[small])
        pos = seg.sa[idx].astype(np.int64) + depth[small][rows]
        w = np.asarray(seg.tokens[pos], dtype=np.int64)
        k, c = unique_counts(small[rows] * V + w)
        keys.append(k)
        vals.append(c.astype(np.float64))
    for r in np.flatnonzero(size > BIG_RANGE):
        ids, counts = seg.raw_sparse(int(lo[r]), int(hi[r]), int(depth[r]))
        keys.append(r * V + ids)
        vals.append(counts.astype(np.float64))
    if not keys:
        z = np.zeros(0, dtype=np.int64)
        return z, z, np.zeros(0)
    keys_a, vals_a = np.concatenate(keys), np.concatenate(vals)
    return keys_a // V, keys_a % V, vals_a


def _cont_sparse(segs: Sequence[Segment], lo: np.ndarray, hi: np.ndarray, depth: int, V: int):
    """(rows, w, continuation count): distinct left neighbours, as a union over segments.

    lo, hi: [S,R] ranges per segment (rows to skip have lo >= hi); contexts at ``depth`` >= 1.
    """
    size = np.maximum(hi - lo, 0)  # [S,R]
    big = (size > BIG_RANGE).any(axis=0)
    small = np.flatnonzero(~big & (size.sum(axis=0) > 0))
    keys_out, vals_out = [], []
    if small.size:
        keys = []
        for si, s in enumerate(segs):
            rows, idx = _expand(lo[si, small], lo[si, small] + size[si, small])
            if rows.size == 0:
                continue
            pos = s.sa[idx].astype(np.int64)
            u = np.asarray(s.tokens[pos - 1], dtype=np.int64)
            w = np.asarray(s.tokens[pos + depth], dtype=np.int64)
            keys.append((rows * V + w) * V + u)  # (row, w, u) triples; fits int64 for V <= 2**21
        if keys:
            rw, c = unique_counts(unique_sorted(np.concatenate(keys)) // V)
            keys_out.append(small[rw // V] * V + rw % V)
            vals_out.append(c.astype(np.float64))
    for r in np.flatnonzero(big):
        live = [si for si in range(len(segs)) if size[si, r] > 0]
        if len(live) == 1:
            si = live[0]
            ids, counts = segs[si].cont_sparse(int(lo[si, r]), int(hi[si, r]), depth)
        else:
            keys = unique_sorted(np.concatenate([segs[si].pair_keys(int(lo[si, r]), int(hi[si, r]), depth)
                                                 for si in live]))
            ids, counts = unique_counts(keys // V)
        keys_out.append(r * V + ids)
        vals_out.append(np.asarray(counts, dtype=np.float64))
    if not keys_out:
        z = np.zeros(0, dtype=np.int64)
        return z, z, np.zeros(0)
    k = np.concatenate(keys_out)
    return k // V, k % V, np.concatenate(vals_out)


# ----------------------------------------------------------------------------- files
def _write_new_segment(path: Path, name: str, kind: str, tokens: Any, vocab_size: int, eos_id: int,
                       fingerprint: str, stats_order: int, source: str, progress: bool,
                       file_name: Optional[str] = None) -> SegmentInfo:
    stream = normalise_stream(tokens, vocab_size, eos_id)
    file_name = file_name or f"{name}.ngs"
    sa = write_segment(path / file_name, stream, vocab_size, eos_id, fingerprint, progress=progress)
    coc = count_of_counts(stream, sa, eos_id, stats_order, progress=progress)
    docs = int((stream == eos_id).sum()) - 1
    return SegmentInfo(name=name, file=file_name, kind=kind, tokens=int(stream.size), documents=docs,
                       source=source, source_sha256=stream_sha256(stream), created=_now(), coc=coc)


def _read_manifest(path: Path) -> dict[str, Any]:
    mp = path / MANIFEST
    if not mp.is_file():
        raise NgramIndexError(f"no N-gram index at {path} ({MANIFEST} missing); build one with "
                              f"`engram ngram build --data DIR --out {path}`")
    try:
        m = json.loads(mp.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NgramIndexError(f"{mp} is not valid JSON ({e}); rebuild the index") from e
    if m.get("format") != FORMAT_NAME:
        raise NgramIndexError(f"{mp} is not an engram N-gram index manifest (format {m.get('format')!r})")
    if m.get("format_version") != FORMAT_VERSION:
        raise NgramIndexError(f"{mp} has format version {m.get('format_version')}; this engram-lm reads "
                              f"{FORMAT_VERSION}; rebuild the index")
    missing = [k for k in ("vocab_size", "eos_id", "tokenizer_fingerprint", "segments", "generation",
                           "stats_order") if k not in m]
    if missing:
        raise NgramIndexError(f"{mp} lacks {missing}; rebuild the index")
    if not m["segments"] or m["segments"][0].get("kind") != "base":
        raise NgramIndexError(f"{mp}: the first segment must be the base; rebuild the index")
    return m


def _write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
    atomic_write(path / MANIFEST, lambda f: f.write(text.encode("utf-8")))


def _remove_orphans(path: Path, new: dict[str, Any], old: dict[str, Any]) -> None:
    keep = {s["file"] for s in new["segments"]}
    for s in old["segments"]:
        if s["file"] not in keep:
            try:
                os.unlink(path / s["file"])
            except FileNotFoundError:
                pass
