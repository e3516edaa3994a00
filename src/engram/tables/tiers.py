"""Storage tiers for Engram tables: one ``lookup(rows, out)`` over RAM, a mapped file, or a cache.

Row ids depend only on the input tokens, so a table does not have to sit in fast memory: rows
can be fetched from slower storage ahead of time (see ``engram.tables.runtime``). Every tier
implements the same interface and returns exactly the stored values (bit for bit; a bf16/fp16
file yields its stored values widened to ``out.dtype``; an fp8 file its dequantised rows,
value * per-row scale, which are exact in fp32):

    ========  ============================================================================
    MEMORY    a tensor in RAM, e.g. the model's trainable ``nn.Embedding`` weight (default)
    MMAP      a table file mapped read-only (``MADV_RANDOM``: no readahead of neighbours);
              reads are spread over ``io_threads`` threads so several page faults are in
              flight at once (one thread manages ~16k cold rows/s, 16 threads ~90k)
    CACHED    a fixed pool of hot rows (LRU or LFU, ``capacity`` rows) in front of another
              tier; misses are read from the backing tier and admitted, evicting the coldest.
              In front of an fp8 file the pool keeps the fp8 records (Dh + 4 bytes a row) and
              decodes hits, so it holds 4x the rows of an fp32 pool in the same RAM
    ========  ============================================================================

``open_layer_storage`` runs file-backed tiers in a helper process by default
(``engram.tables.process.ProcessStorage``, same interface) so that their bookkeeping does not
compete with the model for this process's GIL.

Each tier counts :class:`TierStats`: lookups (rows requested, duplicates included), unique rows,
hits / misses (unique rows served from this tier's fast memory / read from behind it), bytes
read from the slower side, time inside lookups, and time a consumer stalled waiting for rows
(charged by ``engram.tables.runtime``). ``MmapStorage(cold=True)`` drops the file's pages from the
page cache after every lookup, so benchmarks measure the disk and not RAM.

Shape legend
    R table rows    Dh row width    N rows requested    U distinct rows requested
"""

from __future__ import annotations

import mmap
import os
import threading
import time
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

from engram.config import CachePolicy, StorageConfig, StorageError, TableLocation
from engram.tables.rowindex import RowIndex
from engram.tables.tablefile import FP8, TableHeader, decode_records, map_layer, row_nbytes


@dataclass
class TierStats:
    """Counters of one tier (see the module docstring); ``stall_s`` is charged by consumers."""

    lookups: int = 0
    unique_rows: int = 0
    hits: int = 0
    misses: int = 0
    bytes_read: int = 0
    lookup_s: float = 0.0
    stall_s: float = 0.0
    calls: int = 0

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0

    def reset(self) -> None:
        for f in self.__dataclass_fields__:
            setattr(self, f, type(getattr(self, f))())

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hit_rate"] = self.hit_rate
        return d


def _set_threads(n: int) -> None:
    torch.get_num_threads()  # finish torch's lazy per-thread set-up, or it would undo the next line
    torch.set_num_threads(n)


def single_thread_worker(default: int) -> None:
    """``ThreadPoolExecutor`` initializer: torch ops on this worker thread use one core.

    Prefetch and I/O workers run small gathers next to the model's own parallel ops; giving
    each worker its own OpenMP team oversubscribes the cores (on a busy 2-core machine the
    cache bookkeeping ran 40x slower with two threads than with one). ``set_num_threads``
    also changes the count that threads created later start with, so ``default`` (the
    creating thread's count) is put back from a short-lived helper thread.
    """
    _set_threads(1)
    helper = threading.Thread(target=_set_threads, args=(default,))
    helper.start()
    helper.join()


def worker_pool(n: int, name: str) -> ThreadPoolExecutor:
    """A pool of ``n`` single-torch-thread workers (see :func:`single_thread_worker`)."""
    return ThreadPoolExecutor(n, thread_name_prefix=name, initializer=single_thread_worker,
                              initargs=(torch.get_num_threads(),))


def _check_rows(rows: torch.Tensor, num_rows: int, out: torch.Tensor, dim: int) -> torch.Tensor:
    if rows.dtype != torch.int64 or rows.dim() != 1:
        raise StorageError(f"rows must be a 1-D int64 tensor, got {rows.dtype} {tuple(rows.shape)}")
    if out.dim() != 2 or out.shape[0] != rows.shape[0] or out.shape[1] != dim:
        raise StorageError(f"out must be [{rows.shape[0]}, {dim}], got {tuple(out.shape)}")
    if not out.dtype.is_floating_point:
        raise StorageError(f"out must be a float tensor, got {out.dtype}")
    if rows.numel():
        lo, hi = torch.aminmax(rows)
        if int(lo) < 0 or int(hi) >= num_rows:
            raise StorageError(f"row ids span [{int(lo)}, {int(hi)}] but the table has rows [0, {num_rows}); "
                               f"were the ids hashed for another table?")
    return rows


class TableStorage(ABC):
    """One table (one Engram layer) behind ``lookup``. Thread-safe: one lookup at a time."""

    kind: TableLocation

    def __init__(self, num_rows: int, dim: int, dtype: torch.dtype) -> None:
        self.num_rows, self.dim, self.dtype = int(num_rows), int(dim), dtype
        self.row_bytes = self.dim * torch.empty((), dtype=dtype).element_size()
        self.stats = TierStats()
        self._lock = threading.Lock()

    def lookup(self, rows: torch.Tensor, out: torch.Tensor, *, unique: bool = False) -> torch.Tensor:
        """Fill ``out`` [N, Dh] with rows [N] (int64, any order, repeats allowed); returns ``out``.

        ``unique=True`` promises the ids are distinct (lets tiers skip deduplication).
        """
        rows = _check_rows(rows, self.num_rows, out, self.dim)
        self._served(rows, lambda: self._lookup(rows, out, unique))
        return out

    def _served(self, rows: torch.Tensor, serve: Callable[[], None]) -> None:
        """Run ``serve`` (which fills the lookup's output) under the lock, counting the call."""
        t0 = time.perf_counter()
        with self._lock:
            serve()
            self.stats.calls += 1
            self.stats.lookups += rows.numel()
            self.stats.lookup_s += time.perf_counter() - t0

    @abstractmethod
    def _lookup(self, rows: torch.Tensor, out: torch.Tensor, unique: bool) -> None: ...

    def tiers(self) -> list[tuple[str, TierStats]]:
        """(name, stats) of this tier and every tier behind it, fastest first."""
        return [(self.kind.value, self.stats)]

    def close(self) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "rows": self.num_rows, "dim": self.dim,
                "dtype": str(self.dtype).replace("torch.", "")}


def _count_unique(rows: torch.Tensor, unique: bool) -> int:
    return rows.numel() if unique else int(torch.unique(rows).numel())


class MemoryStorage(TableStorage):
    """A [R, Dh] tensor in RAM (shared, not copied: a model's live, trainable table works)."""

    kind = TableLocation.MEMORY

    def __init__(self, table: torch.Tensor) -> None:
        if table.dim() != 2:
            raise StorageError(f"table must be [rows, dim], got {tuple(table.shape)}")
        super().__init__(table.shape[0], table.shape[1], table.dtype)
        self.table = table.detach()

    def _lookup(self, rows: torch.Tensor, out: torch.Tensor, unique: bool) -> None:
        rows = rows.to(self.table.device)
        if out.dtype == self.table.dtype and out.device == self.table.device:
            torch.index_select(self.table, 0, rows, out=out)
        else:
            out.copy_(self.table.index_select(0, rows))
        u = _count_unique(rows, unique)
        self.stats.unique_rows += u
        self.stats.hits += u


class MmapStorage(TableStorage):
    """One layer of a table file, memory-mapped; reads fan out over ``io_threads`` threads.

    ``cold=True`` drops the layer's pages from this mapping and from the page cache after every
    lookup, so every read goes to the disk (benchmarks). Without it the kernel's page cache
    keeps recently read pages, as it would in normal use.
    """

    kind = TableLocation.MMAP
    _PARALLEL_MIN = 512  # below this many rows a thread hand-off costs more than it hides

    def __init__(self, header: TableHeader, layer_id: int, io_threads: int = 8, cold: bool = False) -> None:
        info = header.layer(layer_id)
        super().__init__(info.rows, info.dim, header.torch_dtype)
        self.path, self.layer_id, self.cold = Path(header.path), layer_id, cold
        self.storage_dtype = header.dtype
        # fp8 files: the view holds records uint8 [R, Dh + 4]; lookups decode what they gather
        self.row_bytes = row_nbytes(header.dtype, info.dim)
        self.record_bytes = self.row_bytes if header.dtype == FP8 else None
        self._offset, self._nbytes = info.offset, info.nbytes
        self._mm, self.view = map_layer(header, layer_id)  # view: [R, Dh] storage dtype, or fp8 records
        self._mm.madvise(mmap.MADV_RANDOM)  # rows are scattered: readahead would waste I/O
        self._fd = os.open(self.path, os.O_RDONLY)
        self.io_threads = io_threads
        self._pool: Optional[ThreadPoolExecutor] = None
        if cold:
            self.drop_page_cache()

    def drop_page_cache(self) -> None:
        """Unmap resident pages and ask the kernel to forget the layer's cached file pages.

        The file range is widened to whole pages: the kernel drops only the pages that lie
        entirely inside the range, so the pages a layer shares with its neighbours (or the
        header) would otherwise stay cached and serve their rows warm.
        """
        self._mm.madvise(mmap.MADV_DONTNEED)
        page = mmap.PAGESIZE
        start = self._offset - self._offset % page
        end = -(-(self._offset + self._nbytes) // page) * page
        os.posix_fadvise(self._fd, start, end - start, os.POSIX_FADV_DONTNEED)

    def _gather(self, rows: torch.Tensor, out: torch.Tensor) -> None:
        """out [N, Dh] (storage dtype) <- view[rows]; page faults in parallel threads."""
        n = rows.numel()
        k = min(self.io_threads, max(1, n // self._PARALLEL_MIN))
        if k <= 1:
            torch.index_select(self.view, 0, rows, out=out)
            return
        if self._pool is None:
            self._pool = worker_pool(self.io_threads, "engram-io")
        bounds = [n * i // k for i in range(k + 1)]

        def part(i: int) -> None:
            a, b = bounds[i], bounds[i + 1]
            torch.index_select(self.view, 0, rows[a:b], out=out[a:b])

        for f in [self._pool.submit(part, i) for i in range(k)]:
            f.result()

    def lookup_records(self, rows: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """fp8 files: distinct rows [N] -> their stored records ``out`` uint8 [N, Dh + 4], undecoded
        (the cached tier keeps records in its pool)."""
        if self.record_bytes is None:
            raise StorageError("lookup_records serves fp8 table files; use lookup")

        def serve() -> None:
            self._gather(rows, out)
            self._count(rows, True)

        self._served(rows, serve)
        return out

    def _count(self, rows: torch.Tensor, unique: bool) -> None:
        u = _count_unique(rows, unique)
        self.stats.unique_rows += u
        self.stats.misses += u
        self.stats.bytes_read += u * self.row_bytes
        if self.cold:
            self.drop_page_cache()

    def _lookup(self, rows: torch.Tensor, out: torch.Tensor, unique: bool) -> None:
        if self.record_bytes is not None:
            rec = torch.empty(rows.numel(), self.record_bytes, dtype=torch.uint8)
            self._gather(rows, rec)
            out.copy_(decode_records(rec, self.storage_dtype, self.dim))
        elif out.dtype == self.dtype and out.is_contiguous():
            self._gather(rows, out)
        else:
            tmp = torch.empty(rows.numel(), self.dim, dtype=self.dtype)
            self._gather(rows, tmp)
            out.copy_(tmp)
        self._count(rows, unique)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.view = None  # type: ignore[assignment]  # release the buffer export before closing
        try:
            self._mm.close()
        except BufferError:  # a tensor still views the mapping; it closes when collected
            pass

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "path": str(self.path), "storage_dtype": self.storage_dtype,
                "io_threads": self.io_threads, "cold": self.cold}


class CachedStorage(TableStorage):
    """A pool of ``capacity`` hot rows in RAM in front of a slower ``backing`` tier.

    Per lookup: deduplicate, find each row in the pool (:class:`RowIndex`), read the misses
    from ``backing`` in one batched call, and admit them, evicting

    - ``lru``: the rows whose last use is oldest (lookup granularity). The order is kept as a
      log of (slot, tick) touches, oldest first; an entry goes stale when its slot is touched
      again and is skipped. Evicting k rows reads O(k) log entries, so a lookup costs O(rows
      it touches), not O(capacity); the log is compacted when it fills (amortised O(1)).
    - ``lfu``: the rows used least often since admission, the older first on ties. Needs a
      top-k over the pool: O(capacity) per lookup that evicts.

    A lookup never evicts a row it uses itself; when one lookup misses more rows than the pool
    can free, only that many misses are admitted.
    """

    kind = TableLocation.CACHED
    _LOG_SLACK = 2  # log entries per pool slot before compaction (>= 2: one lookup adds <= capacity)
    _LOG_MIN = 1024

    def __init__(self, backing: TableStorage, capacity: int, policy: Union[str, CachePolicy] = CachePolicy.LRU
                 ) -> None:
        if capacity < 1:
            raise StorageError(f"capacity={capacity} must be >= 1 rows")
        policy = CachePolicy.parse(policy, "policy", error=StorageError)
        super().__init__(backing.num_rows, backing.dim, backing.dtype)
        self.backing, self.policy = backing, policy
        self.capacity = int(min(capacity, backing.num_rows))
        # In front of an fp8 file the pool holds its records [C, Dh + 4] (decoded per lookup)
        self.record_bytes: Optional[int] = getattr(backing, "record_bytes", None)
        self.row_bytes = backing.row_bytes
        self.pool = (torch.empty(self.capacity, self.dim, dtype=self.dtype) if self.record_bytes is None
                     else torch.empty(self.capacity, self.record_bytes, dtype=torch.uint8))  # hot rows
        self.slot_row = torch.full((self.capacity,), -1, dtype=torch.int64)  # row held by each slot
        self.last_used = torch.zeros(self.capacity, dtype=torch.int64)  # tick of last use
        self.freq = torch.zeros(self.capacity, dtype=torch.int32)  # uses since admission (lfu)
        self.index = RowIndex(self.capacity)
        self.used = 0  # slots filled so far (they fill in order, then stay full)
        self.tick = 0
        n_log = self._LOG_SLACK * self.capacity + self._LOG_MIN if policy == CachePolicy.LRU else 0
        self._log_slot = torch.empty(n_log, dtype=torch.int32)  # lru: touched slots, oldest first
        self._log_tick = torch.empty(n_log, dtype=torch.int32)  # ... and the tick of each touch
        self._head = self._tail = 0

    def _lookup(self, rows: torch.Tensor, out: torch.Tensor, unique: bool) -> None:
        if unique:
            uniq, inv = rows, None
        else:
            uniq, inv = torch.unique(rows, return_inverse=True)  # [U], [N]
        self.tick += 1
        slots, _ = self.index.find(uniq)
        hit = slots >= 0
        hit_slots = slots[hit]
        self.last_used[hit_slots] = self.tick
        self.freq[hit_slots] += 1
        self._log(hit_slots)
        rec = self.record_bytes
        if rec is not None:  # pool rows are fp8 records: gather records, decode once at the end
            vals = torch.empty(uniq.numel(), rec, dtype=torch.uint8)
        else:
            vals = out if inv is None and out.dtype == self.dtype else torch.empty(uniq.numel(), self.dim,
                                                                                     dtype=self.dtype)
        n_hit = int(hit_slots.numel())
        miss = ~hit
        if n_hit:
            vals[hit] = self.pool[hit_slots]
        if n_hit < uniq.numel():
            miss_rows = uniq[miss]
            miss_vals = torch.empty(miss_rows.numel(), *self.pool.shape[1:], dtype=self.pool.dtype)
            if rec is not None:
                self.backing.lookup_records(miss_rows, miss_vals)  # type: ignore[attr-defined]
            else:
                self.backing.lookup(miss_rows, miss_vals, unique=True)
            vals[miss] = miss_vals
            self._admit(miss_rows, miss_vals, n_hit)
        if rec is not None:
            vals = decode_records(vals, FP8, self.dim)
        if vals is not out:
            out.copy_(vals if inv is None else vals[inv])
        st = self.stats
        st.unique_rows += uniq.numel()
        st.hits += n_hit
        st.misses += uniq.numel() - n_hit
        st.bytes_read += (uniq.numel() - n_hit) * self.row_bytes

    def _admit(self, rows: torch.Tensor, vals: torch.Tensor, n_hit: int) -> None:
        old_used = self.used
        free = min(rows.numel(), self.capacity - old_used)
        slots = [torch.arange(old_used, old_used + free)]
        self.used += free
        evictable = old_used - n_hit  # filled slots this lookup did not use
        need = min(rows.numel() - free, evictable)
        rows, vals = rows[:free + need], vals[:free + need]
        if need:
            victims = self._lru_victims(need) if self.policy == CachePolicy.LRU else self._lfu_victims(need, old_used)
            rows, vals = rows[:free + victims.numel()], vals[:free + victims.numel()]
            _, where = self.index.find(self.slot_row[victims])
            self.index.remove_at(where)
            slots.append(victims)
        slots_t = torch.cat(slots)
        self.index.insert(rows, slots_t)
        self.pool[slots_t] = vals
        self.slot_row[slots_t] = rows
        self.last_used[slots_t] = self.tick
        self.freq[slots_t] = 1
        self._log(slots_t)

    def _lfu_victims(self, need: int, used: int) -> torch.Tensor:
        score = self.freq[:used].to(torch.int64) * (1 << 32) + self.last_used[:used]  # frequency, then age
        score[self.last_used[:used] == self.tick] = torch.iinfo(torch.int64).max
        return torch.topk(score, need, largest=False, sorted=False).indices

    # ------------------------------------------------------------------ lru touch log
    def _log(self, slots: torch.Tensor) -> None:
        if self.policy != CachePolicy.LRU or slots.numel() == 0:
            return
        n = slots.numel()
        if self._tail + n > self._log_slot.numel():
            self._compact_log()
        self._log_slot[self._tail:self._tail + n] = slots
        self._log_tick[self._tail:self._tail + n] = self.tick
        self._tail += n

    def _compact_log(self) -> None:
        """Keep only live entries (one per filled slot: its last touch), in order."""
        s = self._log_slot[self._head:self._tail]
        t = self._log_tick[self._head:self._tail]
        live = self.last_used[s] == t
        s, t = s[live], t[live]
        n = s.numel()
        self._log_slot[:n] = s
        self._log_tick[:n] = t
        self._head, self._tail = 0, n

    def _lru_victims(self, need: int) -> torch.Tensor:
        """The ``need`` least recently used slots, read off the front of the touch log."""
        out, got = [], 0
        while got < need and self._head < self._tail:
            n = min(self._tail - self._head, max(2 * (need - got), 4096))
            s = self._log_slot[self._head:self._head + n]
            t = self._log_tick[self._head:self._head + n]
            # Live and older than this lookup. This lookup's own touches are all at the tail.
            ok = torch.nonzero((self.last_used[s] == t) & (t != self.tick)).reshape(-1)
            k = need - got
            if ok.numel() >= k:
                out.append(s[ok[:k]].long())
                got = need
                self._head += int(ok[k - 1]) + 1
            else:
                out.append(s[ok].long())
                got += ok.numel()
                current = torch.nonzero(t == self.tick).reshape(-1)
                if current.numel():  # reached this lookup's touches: nothing older is left
                    self._head += int(current[0])
                    break
                self._head += n
        return torch.cat(out) if out else torch.empty(0, dtype=torch.int64)

    def clear(self) -> None:
        """Empty the pool (stats are kept; see ``stats.reset``)."""
        with self._lock:
            self.index.clear()
            self.slot_row.fill_(-1)
            self.last_used.zero_()
            self.freq.zero_()
            self.used = 0
            self._head = self._tail = 0

    def copy_state_from(self, other: "CachedStorage") -> None:
        """Take over another pool's rows and policy state (same table, capacity and policy):
        benchmarks warm one pool and give two runtimes identical starting points."""
        if (other.num_rows, other.dim, other.capacity, other.policy, other.dtype) != \
                (self.num_rows, self.dim, self.capacity, self.policy, self.dtype):
            raise StorageError("copy_state_from needs a pool of the same table, capacity and policy")
        with self._lock:
            self.pool.copy_(other.pool)
            self.slot_row.copy_(other.slot_row)
            self.last_used.copy_(other.last_used)
            self.freq.copy_(other.freq)
            self.used, self.tick = other.used, other.tick
            self._log_slot.copy_(other._log_slot)
            self._log_tick.copy_(other._log_tick)
            self._head, self._tail = other._head, other._tail
            self.index = RowIndex(self.capacity)
            rows, slots = other.index.items()
            self.index.insert(rows, slots)

    @property
    def resident_rows(self) -> int:
        return len(self.index)

    @property
    def nbytes(self) -> int:
        """RAM of the fast tier: rows, per-slot bookkeeping, index and LRU log."""
        return self.ram_bytes(self.capacity, self.pool.shape[1], self.pool.element_size(), self.policy)

    @classmethod
    def ram_bytes(cls, capacity: int, dim: int, itemsize: int,
                  policy: Union[str, CachePolicy] = CachePolicy.LRU) -> int:
        """RAM a pool of ``capacity`` rows needs: rows + 20 B/slot + index + (lru) touch log.
        (fp8 pools: ``dim`` = Dh + 4 record bytes, ``itemsize`` = 1.)"""
        log = (cls._LOG_SLACK * capacity + cls._LOG_MIN) * 8 if policy == CachePolicy.LRU else 0
        return capacity * dim * itemsize + capacity * 20 + RowIndex.nbytes_for(capacity) + log

    def tiers(self) -> list[tuple[str, TierStats]]:
        return [(self.kind.value, self.stats), *self.backing.tiers()]

    def close(self) -> None:
        self.backing.close()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "capacity": self.capacity, "policy": self.policy.value,
                "pool_bytes": self.nbytes, "backing": self.backing.describe()}


def open_local_tier(cfg: StorageConfig, header: Optional[TableHeader], layer_id: int,
                    memory_table: Optional[torch.Tensor] = None) -> TableStorage:
    """The tier ``cfg`` asks for, for one Engram layer, in this process (``cfg.process`` is not
    looked at: ``engram.tables.process.open_layer_storage`` is the entry point that honours it)."""
    if cfg.kind == TableLocation.MEMORY:
        if memory_table is None:
            raise StorageError("memory storage needs the table tensor")
        return MemoryStorage(memory_table)
    if header is None:
        raise StorageError(f"storage={cfg.kind.value!r} needs a table file (--table FILE)")
    backing = MmapStorage(header, layer_id, io_threads=cfg.io_threads, cold=cfg.cold)
    if cfg.kind == TableLocation.MMAP:
        return backing
    return CachedStorage(backing, cfg.cache_rows, cfg.cache_policy)
