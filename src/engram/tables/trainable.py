"""Trainable table rows in a file-backed tier: a process needs RAM for its working set only.

The serving tiers (:mod:`engram.tables.tiers`) read a finished table file. Training also writes
rows, so this module keeps each table (or each rank's shard of it) in a **working file** of its
own, ``[R, Dh]`` float32 mapped writable and shared (``MAP_SHARED``): writes go to the page cache
and from there to the file, and the kernel may drop any page again, clean or dirty, because the
file holds its contents. Two kinds, chosen by ``TrainConfig.table_storage``:

    ======  ===================================================================================
    mmap    the model's table parameter *is* the mapped file: every read and write is an
            ordinary tensor op on it; the kernel decides which pages stay resident
    cached  a pool of ``capacity`` hot rows in RAM in front of the mapped file (LRU). Reads
            admit rows (misses read from the file), writes update a resident row and mark it
            dirty (or go straight to the file when it is not resident), an evicted dirty row is
            written back, ``flush()`` writes back every dirty row (before a checkpoint), and
            ``end_step()`` drops the file's pages from this process so its memory stays bounded
    ======  ===================================================================================

Both return exactly the stored float32 values, so training on them is bit for bit the
in-memory run (``tests/tables/test_trainable.py``, ``tests/distributed``). The working files
are scratch: the checkpoint stays the durable copy (a resumed run rebuilds them from it), they
are made afresh at start and removed at the end. The row-sparse optimizer keeps its moments in
working files of the same tier (``row_file``), indexed by row.

Who reads and writes rows through a tier: the lookup (:class:`TieredEmbedding` on one process,
``engram.distributed.sharded_table.ShardedEmbedding`` on several), ``SparseRowAdam`` (gathers the
touched rows, updates, scatters back), and ``warm`` on the prefetch thread, which reads the next
step's rows ahead (page faults or pool admissions overlap the current step).

Shape legend
    R rows    Dh row width    k rows in one call    C pool capacity
"""

from __future__ import annotations

import mmap
import os
import threading
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn

from engram.config import StorageError, TableLocation
from engram.model.table import EngramTable, MemoryTable, convert_tables
from engram.tables.rowindex import RowIndex


class RowFile:
    """A writable ``[rows, dim]`` array in a file, mapped shared; ``tensor`` is the view.

    Created empty (a sparse file: it reads as zeros and takes disk only where written) or
    filled from ``init``. The mapping is shared, so writes reach the file through the page cache
    and ``drop_pages`` can release this process's pages without losing a byte.
    """

    def __init__(self, path: Path, rows: int, dim: int, dtype: torch.dtype = torch.float32,
                 init: Optional[torch.Tensor] = None) -> None:
        self.path, self.rows, self.dim, self.dtype = Path(path), int(rows), int(dim), dtype
        itemsize = torch.empty((), dtype=dtype).element_size()
        self.nbytes = self.rows * self.dim * itemsize
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, max(self.nbytes, 1))  # mmap refuses an empty file
            self._mm = mmap.mmap(fd, max(self.nbytes, 1), flags=mmap.MAP_SHARED,
                                 prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.tensor = torch.frombuffer(self._mm, dtype=dtype, count=self.rows * self.dim).view(self.rows, self.dim)
        if init is not None:
            if tuple(init.shape) != (self.rows, self.dim):
                raise StorageError(f"{self.path}: init has shape {tuple(init.shape)}, the file holds "
                                   f"{self.rows} x {self.dim}")
            self.tensor.copy_(init)

    def drop_pages(self) -> None:
        """Release this process's pages of the file (the data stays in the file / page cache)."""
        if self.nbytes:
            self._mm.madvise(mmap.MADV_DONTNEED)

    def close(self, remove: bool = True) -> None:
        self.tensor = None  # type: ignore[assignment]  # the buffer export, before closing the map
        try:
            self._mm.close()
        except BufferError:  # a tensor still views the mapping: it closes when collected
            pass
        if remove:
            self.path.unlink(missing_ok=True)


class TrainableTier:
    """``mmap``: the rows are the mapped file itself (see the module docstring).

    ``read(rows)`` -> [k, Dh] (repeats allowed), ``write(rows, values)`` (distinct rows),
    ``warm(rows)`` (read ahead; may run on another thread), ``flush()`` (every write reaches
    ``table``), ``end_step()`` (after the optimizer step). ``table`` is the [R, Dh] file view:
    what the model's parameter, checkpoints and resume see (after ``flush``).
    """

    kind = TableLocation.MMAP

    def __init__(self, directory: Path, name: str, init: torch.Tensor) -> None:
        if init.dim() != 2 or init.dtype != torch.float32 or init.device.type != "cpu":
            raise StorageError(f"a {self.kind} table tier holds float32 CPU rows; got {init.dtype} "
                               f"{tuple(init.shape)} on {init.device}: use table_storage='memory'")
        self.directory, self.name = Path(directory), name
        self.num_rows, self.dim = init.shape
        self.file = RowFile(self.directory / f"{name}.rows", self.num_rows, self.dim, init=init.detach())
        self.table = self.file.tensor
        self._files = [self.file]
        self._lock = threading.Lock()
        self.file.drop_pages()  # the initial copy is in the file; none of it needs to stay mapped

    def row_file(self, suffix: str, dim: int, dtype: torch.dtype) -> torch.Tensor:
        """A zero [R, dim] working file beside the table (optimizer moments); closed with it."""
        f = RowFile(self.directory / f"{self.name}.{suffix}", self.num_rows, dim, dtype)
        self._files.append(f)
        return f.tensor

    def read(self, rows: torch.Tensor) -> torch.Tensor:
        return self.table.index_select(0, rows)

    def write(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        self.table.index_copy_(0, rows, values)

    def warm(self, rows: torch.Tensor) -> None:
        """Fault the pages of ``rows`` in ahead of the step that needs them (values unused: a
        read that races with a write of the same row is harmless)."""
        self.table.index_select(0, rows)

    def flush(self) -> None:
        pass

    def end_step(self) -> None:
        pass

    @property
    def resident_rows(self) -> Optional[int]:
        """Rows held in this tier's own RAM pool (None: the kernel decides, as for ``mmap``)."""
        return None

    def close(self) -> None:
        for f in self._files:
            f.close()
        self._files = []


class CachedTrainableTier(TrainableTier):
    """``cached``: a write-back pool of ``capacity`` rows (LRU) in front of the mapped file.

    A row is either resident (its pool copy is the current value; ``dirty`` when it differs from
    the file) or not (the file holds it). A call that needs more rows than the pool can free
    serves the rest straight from the file, so any capacity >= 1 is correct; a pool that holds a
    step's rows is fast.
    """

    kind = TableLocation.CACHED

    def __init__(self, directory: Path, name: str, init: torch.Tensor, capacity: int) -> None:
        super().__init__(directory, name, init)
        if capacity < 1:
            raise StorageError(f"table_cache_rows={capacity} must be >= 1")
        self.capacity = int(min(capacity, self.num_rows))
        self.pool = torch.empty(self.capacity, self.dim)  # [C, Dh]
        self.slot_row = torch.full((self.capacity,), -1, dtype=torch.int64)
        self.dirty = torch.zeros(self.capacity, dtype=torch.bool)
        self.last_used = torch.zeros(self.capacity, dtype=torch.int64)
        self.index = RowIndex(self.capacity)
        self.used, self.tick = 0, 0
        self.hits = self.misses = self.writebacks = 0

    def _admit(self, rows: torch.Tensor) -> torch.Tensor:
        """Slots of distinct ``rows`` [k] (-1 where the pool had no room); admits misses."""
        self.tick += 1
        slots, _ = self.index.find(rows)
        hit = slots >= 0
        self.last_used[slots[hit]] = self.tick
        self.hits += int(hit.sum())
        miss = torch.nonzero(~hit).reshape(-1)
        if miss.numel() == 0:
            return slots
        self.misses += miss.numel()
        old_used = self.used
        free = min(miss.numel(), self.capacity - old_used)
        new = [torch.arange(old_used, old_used + free)]
        self.used += free
        need = miss.numel() - free
        if need:  # least recently used filled slots that this call does not use
            older = torch.nonzero(self.last_used[:old_used] < self.tick).reshape(-1)
            if older.numel() > need:
                older = older[torch.topk(self.last_used[older], need, largest=False).indices]
            self._evict(older)
            new.append(older)
        got = torch.cat(new)
        take = miss[:got.numel()]
        new_rows = rows[take]
        self.pool[got] = self.table.index_select(0, new_rows)
        self.slot_row[got] = new_rows
        self.dirty[got] = False
        self.last_used[got] = self.tick
        self.index.insert(new_rows, got)
        slots[take] = got
        return slots

    def _evict(self, victims: torch.Tensor) -> None:
        if victims.numel() == 0:
            return
        d = victims[self.dirty[victims]]
        if d.numel():
            self.table.index_copy_(0, self.slot_row[d], self.pool[d])
            self.writebacks += d.numel()
        _, where = self.index.find(self.slot_row[victims])
        self.index.remove_at(where)
        self.slot_row[victims] = -1
        self.dirty[victims] = False

    def read(self, rows: torch.Tensor) -> torch.Tensor:
        uniq, inv = torch.unique(rows, return_inverse=True)
        with self._lock:
            slots = self._admit(uniq)
            vals = torch.empty(uniq.numel(), self.dim)
            ok = slots >= 0
            vals[ok] = self.pool[slots[ok]]
            if not bool(ok.all()):
                vals[~ok] = self.table.index_select(0, uniq[~ok])
        return vals[inv]

    def write(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        with self._lock:
            slots, _ = self.index.find(rows)
            ok = slots >= 0
            self.pool[slots[ok]] = values[ok]
            self.dirty[slots[ok]] = True
            if not bool(ok.all()):  # not resident: the file holds the row
                self.table.index_copy_(0, rows[~ok], values[~ok])

    def warm(self, rows: torch.Tensor) -> None:
        with self._lock:
            self._admit(torch.unique(rows)[:self.capacity])

    def flush(self) -> None:
        with self._lock:
            d = torch.nonzero(self.dirty[:self.used]).reshape(-1)
            if d.numel():
                self.table.index_copy_(0, self.slot_row[d], self.pool[d])
                self.writebacks += d.numel()
                self.dirty[d] = False

    def end_step(self) -> None:
        with self._lock:
            for f in self._files:  # misses, write-backs and moments touched pages: release them
                f.drop_pages()

    @property
    def resident_rows(self) -> int:
        return len(self.index)


def open_trainable_tier(kind: Union[str, TableLocation], directory: Path, name: str, init: torch.Tensor,
                        cache_rows: int) -> TrainableTier:
    """The ``mmap`` or ``cached`` working tier of one table, filled with ``init`` [R, Dh]."""
    kind = TableLocation.parse(kind, "table_storage", (TableLocation.MMAP, TableLocation.CACHED), StorageError)
    if kind == TableLocation.MMAP:
        return TrainableTier(directory, name, init)
    return CachedTrainableTier(directory, name, init, cache_rows)


class _TierLookup(torch.autograd.Function):
    """Rows from the tier; the gradient is the sparse one ``nn.Embedding(sparse=True)`` gives."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, rows: torch.Tensor, tier: TrainableTier):  # noqa: ANN001
        ctx.rows, ctx.shape = rows, weight.shape
        flat = rows.reshape(-1)
        return tier.read(flat).reshape(*rows.shape, weight.shape[1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001
        dh = ctx.shape[1]
        # the same indices and values (no summing yet) as embedding's sparse backward
        g = torch.sparse_coo_tensor(ctx.rows.reshape(1, -1), grad.reshape(-1, dh), ctx.shape,
                                    check_invariants=False)
        return g, None, None


class TieredEmbedding(EngramTable):
    """An Engram layer's trainable table (sparse gradients) whose rows live in a
    :class:`TrainableTier`. ``weight`` is the tier's file view, so state dicts, checkpoints and
    parameter counts are those of the in-memory table it replaces."""

    def __init__(self, tier: TrainableTier) -> None:
        super().__init__(tier.num_rows, tier.dim)
        self.tier = tier
        self.weight = nn.Parameter(tier.table)
        self.sparse = True

    @property
    def location(self) -> TableLocation:  # type: ignore[override]
        return self.tier.kind

    def lookup(self, rows: torch.Tensor) -> torch.Tensor:  # [B,T,H] -> [B,T,H,Dh]
        return _TierLookup.apply(self.weight, rows, self.tier)

    def full(self) -> torch.Tensor:
        self.tier.flush()
        return self.tier.table

    @torch.no_grad()
    def load_full(self, table: torch.Tensor) -> None:
        self._check_full(table)
        self.tier.write(torch.arange(self.num_embeddings), table.to(torch.float32))

    def prefetch(self, rows: torch.Tensor) -> None:
        self.tier.warm(torch.unique(rows.reshape(-1)))

    def close(self) -> None:
        self.tier.close()

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, tier={self.tier.kind}"


def place_tables(model: nn.Module, kind: Union[str, TableLocation], directory: Path, cache_rows: int,
                 tag: str = "rank0") -> list[TrainableTier]:
    """Move every Engram layer's table (its current values) into a working tier of ``kind``.

    An in-memory table becomes a :class:`TieredEmbedding`; a table that takes a tier itself
    (``use_tier``: the sharded table) keeps its place and puts its rows in the tier. Returns the
    tiers, in layer order. Call before the optimizers are built.
    """
    tiers = []

    def place(layer_id: int, table: EngramTable) -> EngramTable:
        if not (isinstance(table, MemoryTable) or hasattr(table, "use_tier")):
            raise StorageError(f"layer {layer_id}: a {type(table).__name__} table cannot move into a "
                               f"working file; train it with --table-storage memory")
        tier = open_trainable_tier(kind, directory, f"{tag}-layer{layer_id}", table.weight.detach(), cache_rows)
        tiers.append(tier)
        if hasattr(table, "use_tier"):
            table.use_tier(tier)
            return table
        return TieredEmbedding(tier)

    convert_tables(model, place)
    return tiers
