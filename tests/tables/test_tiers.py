"""Storage tiers: every tier returns the in-memory reference bit for bit; cache policy and stats."""

from __future__ import annotations

import os
import random
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engram.tables.process import ProcessStorage, open_layer_storage
from engram.tables.rowindex import RowIndex
from engram.tables.tablefile import write_table
from engram.tables.tiers import CachedStorage, MemoryStorage, MmapStorage, StorageConfig, StorageError, TableLocation

pytestmark = pytest.mark.usefixtures("one_thread")

ROWS, DIM = 700, 6


@pytest.fixture(scope="module")
def table() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(ROWS, DIM, generator=g)


@pytest.fixture(scope="module")
def files(tmp_path_factory, table):
    d = tmp_path_factory.mktemp("tables")
    out = {}
    for dtype in ("fp32", "bf16", "fp16"):
        out[dtype] = write_table(d / f"{dtype}.engt", {3: table}, fingerprint="fp",
                                 head_sizes={3: (300, 400)}, dtype=dtype)
    return out


def _ref(table: torch.Tensor, dtype: str) -> torch.Tensor:
    want = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    return table.to(want).float()


requests = st.lists(st.lists(st.integers(0, ROWS - 1), min_size=0, max_size=120), min_size=1, max_size=12)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=requests, dtype=st.sampled_from(["fp32", "bf16", "fp16"]),
       capacity=st.integers(1, 200), policy=st.sampled_from(["lru", "lfu"]), threads=st.sampled_from([1, 4]))
def test_every_tier_equals_memory(table, files, batches, dtype, capacity, policy, threads):
    ref_table = _ref(table, dtype)
    memory = MemoryStorage(ref_table)
    mmap_tier = MmapStorage(files[dtype], 3, io_threads=threads)
    cached = CachedStorage(MmapStorage(files[dtype], 3), capacity, policy)
    try:
        for rows in batches:
            r = torch.tensor(rows, dtype=torch.int64)
            want = ref_table[r]
            for tier in (memory, mmap_tier, cached):
                out = torch.full((len(rows), DIM), float("nan"))
                tier.lookup(r, out)
                assert torch.equal(out, want), tier.kind
            assert cached.resident_rows <= cached.capacity
        s = cached.stats
        assert s.hits + s.misses == s.unique_rows
        assert s.lookups == sum(len(b) for b in batches)
        assert s.bytes_read == s.misses * cached.row_bytes
        assert cached.backing.stats.unique_rows == s.misses  # only misses reach the file
    finally:
        mmap_tier.close()
        cached.close()


def _resident_pages(path, offset: int, nbytes: int) -> list[bool]:
    """Which pages of ``path``'s byte range are in the page cache, by ``mincore`` on a fresh
    mapping: for a file the caller owns it reports the page cache, not only this mapping."""
    import ctypes
    import mmap

    page = mmap.PAGESIZE
    start = offset - offset % page
    length = offset + nbytes - start
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, start)
        assert addr not in (None, ctypes.c_void_p(-1).value), f"mmap failed: errno {ctypes.get_errno()}"
        try:
            vec = ctypes.create_string_buffer(-(-length // page))
            assert libc.mincore(addr, length, vec) == 0, f"mincore failed: errno {ctypes.get_errno()}"
            return [bool(b & 1) for b in vec.raw]
        finally:
            libc.munmap(addr, length)
    finally:
        os.close(fd)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore and fadvise semantics are Linux's")
def test_parallel_reads_and_cold_pages(files, table):
    info = files["fp32"].layer(3)
    span = (files["fp32"].path, info.offset, info.nbytes)
    rows = torch.randint(0, ROWS, (5000,), generator=torch.Generator().manual_seed(1))
    out = torch.empty(5000, DIM)
    # Warm (cold=False): the pages just read stay in the page cache, so the check below can see them.
    warm = MmapStorage(files["fp32"], 3, io_threads=8, cold=False)
    warm.lookup(rows, out)
    assert torch.equal(out, table[rows]) and all(_resident_pages(*span))
    warm.close()
    # Cold: after the same reads (in 8 threads) every page of the layer, the ones it shares
    # with its neighbours included, is gone from the page cache: the next read is a disk read.
    tier = MmapStorage(files["fp32"], 3, io_threads=8, cold=True)
    out.zero_()
    tier.lookup(rows, out)
    assert torch.equal(out, table[rows])
    assert tier.stats.bytes_read == tier.stats.unique_rows * DIM * 4
    assert not any(_resident_pages(*span)), _resident_pages(*span)
    tier.close()


def test_lru_and_lfu_evict_differently(files, table):
    def run(policy):
        c = CachedStorage(MmapStorage(files["fp32"], 3), 2, policy)
        out = torch.empty(1, DIM)
        for r in (1, 1, 1, 2, 3, 1):  # 1 is frequent but 2 and 3 are more recent before the end
            c.lookup(torch.tensor([r]), out)
        return c.stats.hits, set(c.slot_row.tolist())
    # lru: [1] miss, hit, hit, [2] miss, [3] miss evicts 1 (least recent), [1] miss -> 2 hits
    assert run("lru") == (2, {3, 1})
    # lfu: [3] evicts 2 (freq 1) instead of 1 (freq 3), so the last [1] hits -> 3 hits
    assert run("lfu") == (3, {1, 3})


def _reference_lru(batches, capacity):
    """Exact LRU at lookup granularity with an OrderedDict; same tie-breaking as the tier."""
    from collections import OrderedDict

    cache, hits = OrderedDict(), 0
    for rows in batches:
        uniq = sorted(set(rows))
        hit = [r for r in uniq if r in cache]
        miss = [r for r in uniq if r not in cache]
        hits += len(hit)
        for r in hit:
            cache.move_to_end(r)
        free = capacity - len(cache)
        evictable = len(cache) - len(hit)
        admit = miss[:free + min(len(miss) - min(len(miss), free), evictable)]
        for _ in range(max(0, len(admit) - free)):
            cache.popitem(last=False)
        for r in admit:
            cache[r] = True
    return hits


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=st.lists(st.lists(st.integers(0, 80), max_size=40), min_size=1, max_size=30),
       capacity=st.integers(1, 60))
def test_lru_is_exact(files, batches, capacity):
    class Tight(CachedStorage):  # the smallest touch log: compacts often
        _LOG_SLACK, _LOG_MIN = 2, 0

    c = Tight(MmapStorage(files["fp32"], 3), capacity, "lru")
    for rows in batches:
        c.lookup(torch.tensor(rows, dtype=torch.int64), torch.empty(len(rows), DIM))
    assert c.stats.hits == _reference_lru(batches, capacity)
    c.close()


def test_a_lookup_never_evicts_its_own_rows(files, table):
    c = CachedStorage(MmapStorage(files["fp32"], 3), 4, "lru")
    rows = torch.arange(10)
    out = torch.empty(10, DIM)
    c.lookup(rows, out)  # more misses than the pool holds: only the first 4 are admitted
    assert torch.equal(out, table[rows]) and c.resident_rows == 4
    c.lookup(torch.tensor([0, 1, 2, 3, 50, 51]), torch.empty(6, DIM))
    assert set(c.slot_row.tolist()) == {0, 1, 2, 3}  # all four in use by the lookup: none evicted
    c.clear()
    assert c.resident_rows == 0


def test_memory_tier_shares_the_weight(table):
    w = table.clone()
    tier = MemoryStorage(w)
    w[5] = 42.0  # a trainable table changes in place; the tier sees it
    out = torch.empty(1, DIM)
    tier.lookup(torch.tensor([5]), out)
    assert torch.equal(out, torch.full((1, DIM), 42.0))
    assert tier.stats.hits == 1 and tier.stats.hit_rate == 1.0


def test_bad_requests_are_named(files):
    tier = MmapStorage(files["fp32"], 3)
    with pytest.raises(StorageError, match=r"rows \[0, 700\)"):
        tier.lookup(torch.tensor([0, 700]), torch.empty(2, DIM))
    with pytest.raises(StorageError, match="int64"):
        tier.lookup(torch.tensor([0], dtype=torch.int32), torch.empty(1, DIM))
    with pytest.raises(StorageError, match=r"out must be \[1, 6\]"):
        tier.lookup(torch.tensor([0]), torch.empty(1, 5))
    tier.close()


def test_storage_config_validation(files):
    with pytest.raises(StorageError, match="storage='disk'"):
        StorageConfig(kind="disk")
    with pytest.raises(StorageError, match="--table FILE"):
        StorageConfig(kind="cached")
    with pytest.raises(StorageError, match="cache_rows=0"):
        StorageConfig(path="x", kind="cached", cache_rows=0)
    with pytest.raises(StorageError, match="cache_policy"):
        StorageConfig(path="x", kind="cached", cache_policy="fifo")
    cfg = StorageConfig(path=str(files["fp32"].path), kind="cached", cache_rows=10, process=False)
    assert cfg.kind is TableLocation.CACHED and not cfg.is_default and StorageConfig(prefetch=False).is_default
    tier = open_layer_storage(cfg, files["fp32"], 3)
    assert isinstance(tier, CachedStorage) and [n for n, _ in tier.tiers()] == ["cached", "mmap"]
    tier.close()


def test_process_tier_equals_memory_and_reports_stats(files, table):
    cfg = StorageConfig(path=str(files["bf16"].path), kind="cached", cache_rows=50, io_threads=2)
    tier = open_layer_storage(cfg, files["bf16"], 3)
    assert isinstance(tier, ProcessStorage)
    ref = _ref(table, "bf16")
    g = torch.Generator().manual_seed(3)
    try:
        for n in (10, 300, 70_000):  # the last one outgrows the first shared buffer
            rows = torch.randint(0, ROWS, (n,), generator=g)
            out = torch.empty(n, DIM)
            tier.lookup(rows, out)
            assert torch.equal(out, ref[rows])
        names = [n for n, _ in tier.tiers()]
        assert names == ["cached", "mmap"] and tier.stats.hits + tier.stats.misses == tier.stats.unique_rows
        assert tier.stats.misses == dict(tier.tiers())["mmap"].unique_rows > 0
        tier.reset_stats()
        assert tier.stats.unique_rows == 0
        with pytest.raises(StorageError, match=r"rows \[0, 700\)"):
            tier.lookup(torch.tensor([700]), torch.empty(1, DIM))
    finally:
        tier.close()
    assert tier._proc.poll() is not None  # the helper exited


def test_process_tier_reports_a_dead_helper(files):
    tier = ProcessStorage(StorageConfig(path=str(files["fp32"].path), kind="mmap"), files["fp32"], 3)
    tier._proc.kill()
    tier._proc.wait()
    with pytest.raises(StorageError, match="died"):
        tier.lookup(torch.tensor([1]), torch.empty(1, DIM))
    tier.close()


@settings(max_examples=30, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["ins", "del", "find"]),
                              st.lists(st.integers(0, 10**12), max_size=40)), max_size=40),
       grow=st.booleans())
def test_row_index_matches_a_dict(ops, grow):
    cap = 64
    idx, ref = RowIndex(cap, grow=grow), {}
    next_val = 0
    for op, rows in ops:
        rows = list(dict.fromkeys(rows))  # distinct, order kept
        if op == "ins":
            new = [r for r in rows if r not in ref]
            if not grow:
                new = new[:cap - len(ref)]
            vals = list(range(next_val, next_val + len(new)))
            next_val += len(new)
            idx.insert(torch.tensor(new, dtype=torch.int64), torch.tensor(vals, dtype=torch.int64))
            ref.update(zip(new, vals))
        elif op == "del":
            idx.remove(torch.tensor(rows, dtype=torch.int64))
            for r in rows:
                ref.pop(r, None)
        q = torch.tensor(rows + list(ref)[:20], dtype=torch.int64)
        got, _ = idx.find(q)
        assert got.tolist() == [ref.get(r, -1) for r in q.tolist()]
        assert len(idx) == len(ref)
    if not grow:
        with pytest.raises(ValueError, match="full"):
            idx.insert(torch.arange(10**13, 10**13 + cap + 1), torch.zeros(cap + 1, dtype=torch.int64))


def test_row_index_survives_heavy_churn():
    idx, ref = RowIndex(100), {}
    rng = random.Random(0)
    for step in range(200):  # constant eviction: tombstones must be recycled by rebuilds
        if len(ref) > 80:
            gone = rng.sample(list(ref), 30)
            idx.remove(torch.tensor(gone))
            for g in gone:
                del ref[g]
        new = [r for r in rng.sample(range(10**6), 20) if r not in ref]
        idx.insert(torch.tensor(new), torch.tensor(new) * 3)
        ref.update({r: r * 3 for r in new})
    got, _ = idx.find(torch.tensor(list(ref)))
    assert got.tolist() == [v for v in ref.values()]
    assert idx.tombs + len(idx) <= (3 * idx.keys.numel()) // 4 + 20
