"""How Engram tables are accessed on a real token stream: Zipf curve and cache hit rates.

N-gram frequencies are heavy-tailed, so a few table rows take most lookups. This module
replays a token stream (a prepared dataset shard) through the model's hasher and reports, per
Engram layer:

- the rank-frequency curve of row accesses (points at log-spaced ranks), the Zipf exponent
  (:func:`zipf_exponent`, the one fit every command reports), and how much of the traffic the
  top 0.1% / 1% / 10% of rows take;
- the hit rate a cache of C rows would get: ``static`` pins the C most frequent rows of this
  very stream (hindsight: the best a fixed pool could do), ``lru`` / ``lfu`` replay the
  stream batch by batch through the real :class:`~engram.tables.tiers.CachedStorage` policy code
  (only the bookkeeping; no row data), so the numbers are what ``--storage cached`` would see.
  ``hit_rate`` counts distinct rows per batch (what the tier's stats count: a batch fetches each
  row once); ``access_hit_rate`` counts every access (repeats within a batch are hits).

Shape legend
    N accesses (tokens x heads)    U distinct rows
"""

from __future__ import annotations

import math
import time
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from engram.config import CachePolicy, TableLocation
from engram.data import shards as data
from engram.errors import EngramError
from engram.hashing.hasher import NgramHasher
from engram.model.lm import EngramLM
from engram.tables.tiers import CachedStorage, TableStorage


class _NullStorage(TableStorage):
    """A backing tier that holds nothing: lets the cache bookkeeping run without row data."""

    kind = TableLocation.MMAP

    def __init__(self, num_rows: int) -> None:
        super().__init__(num_rows, 1, torch.float32)

    def _lookup(self, rows: torch.Tensor, out: torch.Tensor, unique: bool) -> None:
        out.zero_()
        self.stats.misses += rows.numel()


def iter_row_batches(hasher: NgramHasher, shard: "data.Shard", batch_size: int, seq_len: int,
                     max_tokens: Optional[int] = None, order: str = "sequential", seed: int = 0
                     ) -> Iterator[dict[int, torch.Tensor]]:
    """{layer_id: global rows [B*T*H]} per batch of the shard.

    ``order="sequential"``: consecutive windows from the start (reading order, like
    evaluation or serving a document). ``"random"``: training batches (``data.get_batch``).
    """
    if order not in ("sequential", "random"):
        raise EngramError(f"order={order!r}; choose 'sequential' or 'random'")
    offsets = {lid: torch.tensor(hasher.head_offsets(lid), dtype=torch.int64) for lid in hasher.cfg.layer_ids}
    per_batch = batch_size * seq_len
    n_batches = max(1, (max_tokens or shard.num_tokens) // per_batch)
    if order == "sequential":
        batches = (x for x, _ in data.iter_eval_batches(shard, batch_size, seq_len))
    else:
        batches = (data.get_batch(shard, batch_size, seq_len, s, seed)[0] for s in range(n_batches))
    for i, x in enumerate(batches):
        if i >= n_batches:
            break
        hashed = hasher.hash(x)
        yield {lid: (ids + offsets[lid]).reshape(-1) for lid, ids in hashed.items()}


def table_rows(model: EngramLM, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """The global table rows each Engram layer reads for ``ids`` [B, T]: {layer_id: int64 [B, T, H]}
    (per-head hash ids plus the head offsets, as the layer's lookup computes them)."""
    hashed = model.hasher.hash(ids)
    return {l.layer_id: l.multi_head_embedding.rows(hashed[l.layer_id].to(l.multi_head_embedding.offsets.device))
            for l in model.engram_layers}


def row_access_counts(model: EngramLM, tokens: np.ndarray, chunk: int = 1 << 18) -> dict[int, np.ndarray]:
    """How often each table row is read over ``tokens`` (1-D ids): {layer_id: int64 [R]}.

    The stream is hashed in chunks (each chunk's first N-1 positions see the pad prefix, as at
    the start of a window).
    """
    tokens = np.asarray(tokens, dtype=np.int64).ravel()
    counts = {l.layer_id: np.zeros(l.multi_head_embedding.num_rows, dtype=np.int64) for l in model.engram_layers}
    for a in range(0, tokens.size, chunk):
        for lid, rows in table_rows(model, torch.from_numpy(tokens[a:a + chunk])[None]).items():
            counts[lid] += np.bincount(rows.reshape(-1).cpu().numpy(), minlength=counts[lid].size)
    return counts


ZIPF_EXPONENT_DEFINITION = (
    "s in count ~ rank^-s: least-squares slope of log(count) against log(rank) over ranks "
    "10 .. U // 10 of the nonzero counts sorted descending (U = number of nonzero counts); "
    "null when that range has fewer than 11 ranks (U < 200)")


def zipf_exponent(counts: np.ndarray) -> Optional[float]:
    """The Zipf exponent ``s`` of ``count ~ rank^-s`` fitted to access or occurrence counts.

    ``counts`` (any order; zeros, i.e. rows never read, are dropped) are sorted descending and
    ``log count`` is fitted against ``log rank`` by least squares over ranks 10 .. U // 10,
    where U is the number of nonzero counts. None when that range has fewer than 11 ranks
    (U < 200). Every command that prints a Zipf exponent (``engram table stats``, ``engram
    analyze zipf``) uses this function; JSON outputs carry :data:`ZIPF_EXPONENT_DEFINITION`.
    """
    c = np.asarray(counts, dtype=np.int64).ravel()
    c = np.sort(c[c > 0])[::-1]
    # Ranks below 10: the head bends away from a power law. Beyond U // 10: the tail flattens
    # into rows seen once or twice, which would drag the slope towards 0.
    lo, hi = 10, c.size // 10
    if hi - lo < 10:
        return None
    r = np.arange(lo, hi + 1)
    slope, _ = np.polyfit(np.log(r), np.log(c[lo - 1:hi]), 1)
    return float(-slope)


def rank_frequency(counts: np.ndarray, points: int = 40) -> dict[str, Any]:
    """Summary of access counts per distinct row (any order)."""
    c = np.sort(np.asarray(counts, dtype=np.int64))[::-1]
    total, u = int(c.sum()), len(c)
    ranks = np.unique(np.geomspace(1, max(u, 1), num=min(points, max(u, 1))).astype(np.int64))
    curve = [[int(r), int(c[r - 1])] for r in ranks] if u else []
    s = zipf_exponent(c)
    cum = np.cumsum(c)
    share = {}
    for frac in (0.001, 0.01, 0.1):
        k = max(1, int(math.ceil(u * frac)))
        share[f"top_{frac:g}"] = float(cum[k - 1] / total) if u else 0.0
    return {"accesses": total, "distinct_rows": u, "singletons": int((c == 1).sum()),
            "zipf_exponent": s, "traffic_share": share, "curve": curve}


def simulate_static(batches: Sequence[torch.Tensor], rows: np.ndarray, counts: np.ndarray,
                    capacity: int) -> dict[str, Any]:
    """A pool pinned to the ``capacity`` most frequent rows of the stream (``rows``/``counts``
    from ``np.unique``): the best any static cache could do. Counted like ``simulate_cache``."""
    top = torch.from_numpy(rows[np.argsort(-counts, kind="stable")[:capacity]])
    hits = distinct = hits_all = total = 0
    for b in batches:
        uniq = torch.unique(b)
        h = int(torch.isin(uniq, top).sum())
        hits, distinct = hits + h, distinct + uniq.numel()
        hits_all += h + (b.numel() - uniq.numel())
        total += b.numel()
    return {"policy": "static", "capacity": capacity, "hit_rate": hits / distinct if distinct else 0.0,
            "access_hit_rate": hits_all / total if total else 0.0}


def simulate_cache(batches: Sequence[torch.Tensor], num_rows: int, capacity: int, policy: str) -> dict[str, Any]:
    """Replay batches of rows through ``CachedStorage``'s policy; hit rates over distinct rows
    per batch (what the tier counts) and over all accesses (each repeat in a batch is a hit)."""
    cache = CachedStorage(_NullStorage(num_rows), capacity, policy)
    out = torch.empty(0, 1)
    hits_all = 0
    total_all = 0
    t0 = time.perf_counter()
    for rows in batches:
        uniq = torch.unique(rows)
        if out.shape[0] < uniq.numel():
            out = torch.empty(uniq.numel(), 1)
        before = cache.stats.hits
        cache.lookup(uniq, out[:uniq.numel()], unique=True)
        # Repeats within a batch are served by the same fetch: count them as hits too.
        hits_all += (cache.stats.hits - before) + (rows.numel() - uniq.numel())
        total_all += rows.numel()
    st = cache.stats
    return {"policy": policy, "capacity": capacity, "hit_rate": st.hit_rate,
            "access_hit_rate": hits_all / total_all if total_all else 0.0,
            "seconds": time.perf_counter() - t0}


def access_report(hasher: NgramHasher, shard: "data.Shard", *, batch_size: int = 16, seq_len: int = 128,
                  max_tokens: Optional[int] = 1_000_000, order: str = "sequential",
                  capacities: Sequence[int] = (1_000, 10_000, 100_000),
                  policies: Sequence[str] = CachePolicy.values(), progress: bool = False,
                  seed: int = 0) -> dict[str, Any]:
    """Rank-frequency and cache hit rates for every Engram layer on ``shard`` (see module docstring)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops per batch: one thread is faster, and immune to busy cores
    try:
        return _access_report(hasher, shard, batch_size, seq_len, max_tokens, order, capacities,
                              policies, progress, seed)
    finally:
        torch.set_num_threads(prev)


def _access_report(hasher: NgramHasher, shard: "data.Shard", batch_size: int, seq_len: int,
                   max_tokens: Optional[int], order: str, capacities: Sequence[int],
                   policies: Sequence[str], progress: bool, seed: int) -> dict[str, Any]:
    bad = [p for p in policies if p not in CachePolicy.values()]
    if bad:
        raise EngramError(f"policies {bad} unknown; choose from {CachePolicy.values()}")
    if not capacities or any(c < 1 for c in capacities):
        raise EngramError(f"capacities={list(capacities)} must be positive row counts")
    stream: dict[int, list[torch.Tensor]] = {lid: [] for lid in hasher.cfg.layer_ids}
    tokens = 0
    for batch in tqdm(iter_row_batches(hasher, shard, batch_size, seq_len, max_tokens, order, seed),
                      desc="hash stream", disable=not progress, leave=False):
        for lid, rows in batch.items():
            stream[lid].append(rows)
        tokens += batch_size * seq_len
    layers = {}
    for lid, batches in stream.items():
        num_rows = sum(hasher.head_sizes(lid))
        allrows = torch.cat(batches).numpy()
        rows, counts = np.unique(allrows, return_counts=True)
        rf = rank_frequency(counts)
        caches = []
        jobs = [(c, p) for c in capacities for p in ("static", *policies)]
        for cap, pol in tqdm(jobs, desc=f"simulate layer {lid}", disable=not progress, leave=False):
            if pol == "static":
                caches.append(simulate_static(batches, rows, counts, cap))
            else:
                caches.append(simulate_cache(batches, num_rows, cap, pol))
        layers[str(lid)] = {"table_rows": num_rows, **rf, "caches": caches}
    return {"tokens": tokens, "batch_size": batch_size, "seq_len": seq_len, "order": order,
            "heads_per_layer": hasher.num_heads, "layers": layers,
            "zipf_exponent_definition": ZIPF_EXPONENT_DEFINITION}
