"""Serving Engram tables from a storage tier, with rows fetched ahead of the layer that needs them.

Row ids depend only on tokens, so they are known before the backbone runs. ``attach_tables``
gives each Engram layer an :class:`OffloadedEmbedding` table (``engram.model.table``) that takes its
rows from a :class:`TableRuntime`; the runtime fetches them from the layer's storage tier
(``engram.tables.tiers``) on one background thread:

- per forward (prefill and every decode step): a forward pre-hook hashes the new tokens (with
  the incremental hash state when decoding) and submits every Engram layer's rows at once, so
  the fetch overlaps the token embedding and the blocks before the first Engram layer;
- per batch (evaluation): :meth:`TableRuntime.prefetch_batches` hashes and fetches batch k+1
  (and k+2) while batch k runs, so the fetch overlaps a whole forward.

A fetch deduplicates the rows of a layer, reads the distinct rows with one ``lookup``, and
expands them back to [B,T,H,Dh] on the worker. The layer waits only if its rows are late, and
that wait is charged to the tier's ``stall_s``. On a GPU the worker expands into pinned host
memory and copies to the device on a side CUDA stream; the layer's stream waits on an event.

Training uses :class:`BatchPrefetcher`: it builds the next batch and its row ids on a background
thread while the current step runs and, when the tables train in a working file (mmap or
cached, ``engram.tables.trainable``), reads that step's rows ahead on the same thread.

Models whose tables do not fit in RAM are built by :func:`build_model_without_tables` (table
modules on the meta device, nothing allocated) and loaded by :func:`load_model_with_tables`.

Shape legend
    B batch    T positions    H hash heads per layer    Dh head_dim    U distinct rows of a fetch
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import numpy as np
import torch
import torch.nn as nn
from safetensors import safe_open

from engram.config import ModelConfig
from engram.errors import EngramError
from engram.fsutil import PathLike
from engram.hashing.hasher import NgramHasher
from engram.model import checkpoint as ckpt
from engram.model.layer import MultiHeadEmbedding
from engram.model.lm import EngramLM
from engram.model.table import EngramTable, MemoryTable, TableError, convert_tables, engram_tables
from engram.tables.process import ProcessStorage, open_layer_storage
from engram.tables.tablefile import TableHeader, open_table, read_layer
from engram.tables.tiers import MemoryStorage, StorageConfig, StorageError, TableLocation, TableStorage, worker_pool

_RUNTIME_ATTR = "_engram_table_runtime"


class OffloadedEmbedding(EngramTable):
    """An Engram layer's table whose rows live in a storage tier, served by a :class:`TableRuntime`.

    Read-only: lookups have no gradient and ``load_full`` is refused (write a new table file
    instead). ``weight`` is a meta-device parameter of the table's shape: it allocates nothing,
    keeps ``param_counts`` honest, and is never moved (``_apply`` skips it). Prefetching is the
    runtime's own (a forward pre-hook fetches every layer's rows before the first block).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, layer_id: int) -> None:
        super().__init__(num_embeddings, embedding_dim)
        self.layer_id = layer_id
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim, device="meta"),
                                   requires_grad=False)
        self.runtime: Optional["TableRuntime"] = None

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - torch's signature
        return self  # the table is not in this module; moving the model must not touch it

    def _runtime(self) -> "TableRuntime":
        if self.runtime is None:
            raise StorageError(f"Engram layer {self.layer_id}: its table is not loaded; load the model "
                               f"with engram.tables.runtime.load_model_with_tables (CLI: --table FILE)")
        return self.runtime

    @property
    def location(self) -> TableLocation:  # type: ignore[override]
        if self.runtime is None:
            return TableLocation.MMAP
        st = self.runtime.storages[self.layer_id]
        return TableLocation.PROCESS if isinstance(st, ProcessStorage) else st.kind

    def lookup(self, rows: torch.Tensor) -> torch.Tensor:  # [B,T,H] global rows -> [B,T,H,Dh]
        return self._runtime().embed(self.layer_id, rows)

    def full(self, chunk_rows: int = 1 << 16) -> torch.Tensor:
        rt = self._runtime()
        out = torch.empty(self.num_embeddings, self.embedding_dim, dtype=rt.out_dtype)
        for start in range(0, self.num_embeddings, chunk_rows):
            rows = torch.arange(start, min(start + chunk_rows, self.num_embeddings))
            out[start:start + rows.numel()] = rt._finish(rt._fetch_rows(self.layer_id, rows)).cpu()
        return out

    def load_full(self, table: torch.Tensor) -> None:
        raise TableError(f"Engram layer {self.layer_id}: its rows are served read-only from a table file; "
                         f"write a new file (`engram table convert`, `engram patch apply`) or load the "
                         f"model with --storage memory")

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, offloaded"


# ----------------------------------------------------------------------------- tickets
class _Ticket:
    """One submitted fetch: the batch (if any), its hash ids, one future per Engram layer."""

    __slots__ = ("input_ids", "targets", "hash_future", "futures", "hash_ids")

    def __init__(self) -> None:
        self.input_ids: Optional[torch.Tensor] = None
        self.targets: Optional[torch.Tensor] = None
        self.hash_future: Optional[Future] = None
        self.hash_ids: Optional[dict[int, torch.Tensor]] = None
        self.futures: dict[int, Future] = {}

    def get_hash_ids(self) -> dict[int, torch.Tensor]:
        if self.hash_ids is None:
            assert self.hash_future is not None
            self.hash_ids = self.hash_future.result()
        return self.hash_ids


class TableRuntime:
    """Serves every Engram layer's rows from its storage tier (see the module docstring)."""

    def __init__(self, model: nn.Module, storages: dict[int, TableStorage], prefetch: bool = True,
                 device: Union[str, torch.device, None] = None) -> None:
        layers = {e.layer_id: e for e in model.engram_layers}
        if set(storages) != set(layers):
            raise StorageError(f"storages for layers {sorted(storages)} but the model's Engram layers "
                               f"are {sorted(layers)}")
        self.model, self.storages, self.prefetch = model, storages, prefetch
        self.hasher: NgramHasher = model.hasher
        self.device = torch.device(device) if device is not None else model.embed.weight.device
        self.out_dtype = next(iter(layers.values())).value_proj.weight.dtype
        self.offsets = {lid: e.multi_head_embedding.offsets.detach().to("cpu") for lid, e in layers.items()}
        self.dims = {lid: e.table.embedding_dim for lid, e in layers.items()}
        for lid, st in storages.items():
            rows = int(sum(layers[lid].multi_head_embedding.head_sizes))
            if st.num_rows != rows or st.dim != self.dims[lid]:
                raise StorageError(f"layer {lid}: storage holds [{st.num_rows}, {st.dim}] but the layer "
                                   f"needs [{rows}, {self.dims[lid]}]")
        self._pool = worker_pool(1, "engram-prefetch") if prefetch else None
        self._pending: deque[_Ticket] = deque(maxlen=8)  # submitted by prefetch_batches
        self._current: Optional[_Ticket] = None  # the ticket of the forward now running
        self._hook = None
        self._lock = threading.Lock()
        self.stall_s = 0.0
        self.fetches = 0
        self._cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if self._cuda else None

    # ------------------------------------------------------------------ fetching (worker side)
    def _fetch(self, layer_id: int, hash_ids: torch.Tensor) -> Any:
        """Per-head hash ids [B,T,H] -> rows [B,T,H,Dh] (on the GPU: (tensor, event))."""
        ids = hash_ids if hash_ids.device.type == "cpu" else hash_ids.to("cpu")
        return self._fetch_rows(layer_id, ids + self.offsets[layer_id])

    def _fetch_rows(self, layer_id: int, rows: torch.Tensor) -> Any:
        """Global table rows [B,T,H] (CPU) -> [B,T,H,Dh]: dedupe, one lookup, expand."""
        ids = rows
        dim = self.dims[layer_id]
        shape = (*ids.shape, dim)
        storage = self.storages[layer_id]
        if getattr(storage, "dedupes", False):  # a helper process dedupes and expands itself
            vals = torch.empty(rows.numel(), dim, dtype=self.out_dtype)
            storage.lookup(rows.reshape(-1), vals)
            inv = None
        else:
            uniq, inv = torch.unique(rows.reshape(-1), return_inverse=True)  # [U], [B*T*H]
            vals = torch.empty(uniq.numel(), dim, dtype=self.out_dtype)
            storage.lookup(uniq, vals, unique=True)
        if not self._cuda:
            return (vals if inv is None else vals[inv]).view(shape)
        host = torch.empty(rows.numel(), dim, dtype=self.out_dtype, pin_memory=True)
        if inv is None:
            host.copy_(vals)
        else:
            torch.index_select(vals, 0, inv, out=host)
        with torch.cuda.stream(self._stream):
            dev = host.view(shape).to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._stream)
        return dev, event

    def _finish(self, result: Any) -> torch.Tensor:
        """Make a fetched result usable on the caller's stream."""
        if not self._cuda:
            return result
        dev, event = result
        stream = torch.cuda.current_stream(self.device)
        stream.wait_event(event)
        dev.record_stream(stream)  # the side stream allocated it; keep it alive for this stream
        return dev

    def submit(self, input_ids: Optional[torch.Tensor] = None,
               hash_ids: Optional[dict[int, torch.Tensor]] = None,
               targets: Optional[torch.Tensor] = None) -> _Ticket:
        """Start fetching every layer's rows for ``hash_ids`` (or for ``input_ids``, hashed on the worker)."""
        t = _Ticket()
        t.input_ids, t.targets = input_ids, targets
        if self._pool is None:
            raise StorageError("this runtime was built with prefetch=False; there is no worker to submit to")
        if hash_ids is not None:
            t.hash_ids = hash_ids
            for lid in self.storages:
                t.futures[lid] = self._pool.submit(self._fetch, lid, hash_ids[lid])
        else:
            if input_ids is None:
                raise EngramError("submit needs input_ids or hash_ids")
            t.hash_future = self._pool.submit(self.hasher.hash, input_ids)
            for lid in self.storages:
                t.futures[lid] = self._pool.submit(lambda l=lid: self._fetch(l, t.hash_future.result()[l]))
        self.fetches += 1
        return t

    # ------------------------------------------------------------------ model side
    def _pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Forward pre-hook: hash (unless given), then start the fetch before any block runs."""
        input_ids = args[0] if args else kwargs.get("input_ids")
        hash_ids, cache = kwargs.get("hash_ids"), kwargs.get("cache")
        mask = kwargs.get("attention_mask")  # padded positions hash as the pad id
        ticket = None
        if hash_ids is None and cache is None and mask is None and input_ids is not None:
            ticket = self._claim(input_ids)
            if ticket is not None:
                hash_ids = ticket.get_hash_ids()
        if hash_ids is None and input_ids is not None:
            hash_ids = (module._hash_for_cache(input_ids, cache, mask) if cache is not None
                        else self.hasher.hash(input_ids, attention_mask=mask))
        kwargs = {**kwargs, "hash_ids": hash_ids}
        if ticket is None and hash_ids is not None:
            ticket = self.submit(hash_ids=hash_ids)
        self._current = ticket
        return args, kwargs

    def _claim(self, input_ids: torch.Tensor) -> Optional[_Ticket]:
        """The prefetched ticket for this exact batch tensor (older unclaimed ones are dropped)."""
        with self._lock:
            for i, t in enumerate(self._pending):
                if t.input_ids is input_ids:
                    for _ in range(i + 1):
                        self._pending.popleft()
                    return t
        return None

    def embed(self, layer_id: int, rows: torch.Tensor) -> torch.Tensor:
        """Global rows [B,T,H] -> [B,T,H,Dh] for one layer; waits for the prefetch if it is late."""
        t0 = time.perf_counter()
        t = self._current
        fut = t.futures.pop(layer_id, None) if t is not None else None
        if fut is not None and not self._same_rows(t, layer_id, rows):
            fut = None  # the layer was called with other ids than the forward hashed
        if fut is not None:
            out = self._finish(fut.result())
        else:  # no prefetch (or a direct layer call): fetch synchronously, all of it is a stall
            out = self._finish(self._fetch_rows(layer_id, rows.to("cpu")))
        stall = time.perf_counter() - t0
        self.stall_s += stall
        self.storages[layer_id].stats.stall_s += stall
        return out

    def _same_rows(self, t: _Ticket, layer_id: int, rows: torch.Tensor) -> bool:
        ids = t.get_hash_ids()[layer_id]
        if ids.shape != rows.shape:
            return False
        if rows.device.type != "cpu":
            return True  # comparing would sync the GPU; the pre-hook produced both from one hash
        return torch.equal(ids + self.offsets[layer_id], rows)

    def prefetch_batches(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], depth: int = 2
                         ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield the (x, y) batches unchanged while the next ``depth`` are hashed and fetched.

        Batches are moved to the runtime's device as they are submitted, so ``x.to(device)`` in
        the loop is a no-op and the forward finds its prefetched rows (matched by identity).
        """
        if self._pool is None:
            yield from batches
            return
        it = iter(batches)
        queue: deque[_Ticket] = deque()

        def push() -> None:
            try:
                x, y = next(it)
            except StopIteration:
                return
            if self.device.type != "cpu":
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            queue.append(self.submit(input_ids=x, targets=y))

        for _ in range(max(1, depth)):
            push()
        while queue:
            t = queue.popleft()
            push()
            with self._lock:
                self._pending.append(t)
            yield t.input_ids, t.targets  # type: ignore[misc]

    # ------------------------------------------------------------------ reporting / lifetime
    def stats(self) -> dict[str, Any]:
        """Per layer and tier counters, plus totals over layers for the top tier."""
        layers = {}
        hits = misses = lookups = 0
        for lid, st in self.storages.items():
            layers[str(lid)] = {name: s.as_dict() for name, s in st.tiers()}
            hits += st.stats.hits
            misses += st.stats.misses
            lookups += st.stats.lookups
        return {"storage": next(iter(self.storages.values())).kind.value, "prefetch": self.prefetch,
                "lookups": lookups, "hits": hits, "misses": misses,
                "hit_rate": hits / (hits + misses) if hits + misses else 0.0,
                "stall_s": self.stall_s, "fetches": self.fetches, "layers": layers}

    def reset_stats(self) -> None:
        self.stall_s, self.fetches = 0.0, 0
        for st in self.storages.values():
            if hasattr(st, "reset_stats"):  # a helper process keeps the real counters
                st.reset_stats()
            for _, s in st.tiers():
                s.reset()
            st.stats.reset()

    def close(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        for st in self.storages.values():
            st.close()


def attach_tables(model: nn.Module, storages: dict[int, TableStorage], prefetch: bool = True,
                  device: Union[str, torch.device, None] = None) -> TableRuntime:
    """Serve ``model``'s Engram tables from ``storages`` ({layer_id: tier}); returns the runtime.

    The layers' tables become :class:`OffloadedEmbedding` (through ``convert_tables``; an
    in-memory tier may wrap the old weight: ``MemoryStorage(table.weight)``). With ``prefetch`` a
    forward pre-hook starts each forward's fetch before the first block.
    """
    if getattr(model, "hasher", None) is None:
        raise StorageError("the model has no Engram layers; there are no tables to attach")
    old = table_runtime(model)
    if old is not None:
        old.close()
    runtime = TableRuntime(model, storages, prefetch, device)

    def offload(layer_id: int, table: EngramTable) -> EngramTable:
        if not isinstance(table, OffloadedEmbedding):
            table = OffloadedEmbedding(table.num_embeddings, runtime.dims[layer_id], layer_id)
        table.runtime = runtime
        return table

    convert_tables(model, offload)
    if prefetch:
        runtime._hook = model.register_forward_pre_hook(runtime._pre_forward, with_kwargs=True)
    setattr(model, _RUNTIME_ATTR, runtime)
    return runtime


def table_runtime(model: nn.Module) -> Optional[TableRuntime]:
    """The runtime serving ``model``'s tables, or None for ordinary in-memory tables."""
    return getattr(model, _RUNTIME_ATTR, None)


# ----------------------------------------------------------------------------- building models
def build_model_without_tables(cfg: ModelConfig, compression: Optional[np.ndarray] = None) -> nn.Module:
    """An ``EngramLM`` whose Engram tables are :class:`OffloadedEmbedding` placeholders (no memory).

    Everything else is built (and initialised) normally: the model is first built with
    two-row-per-head tables, then each layer's ``MultiHeadEmbedding`` is rebuilt for the real
    prime sizes around a placeholder table. Nothing depends on the table size except that module.
    """
    if cfg.engram is None:
        raise StorageError("the model config has no Engram layers, so there are no tables to offload")
    tiny = dataclasses.replace(cfg.engram, rows_per_head=tuple(2 for _ in cfg.engram.rows_per_head))
    model = EngramLM(dataclasses.replace(cfg, engram=tiny), compression)
    model.cfg = cfg
    model.hasher = NgramHasher(cfg.engram, cfg.vocab_size, compression if cfg.engram.use_compression else None)
    for block in model.layers:
        if block.engram is None:
            continue
        layer = block.engram
        layer.cfg = cfg.engram
        sizes = model.hasher.head_sizes(block.layer_id)
        layer.multi_head_embedding = MultiHeadEmbedding(
            sizes, cfg.engram.head_dim, table=OffloadedEmbedding(sum(sizes), cfg.engram.head_dim, block.layer_id),
            group_size=cfg.engram.n_head_per_ngram)
    return model


def _table_keys(model: nn.Module) -> dict[str, int]:
    """{state-dict key of a table weight: layer_id}."""
    names = {id(m): n for n, m in model.named_modules()}
    return {f"{names[id(table)]}.weight": lid for lid, table in engram_tables(model).items()}


def load_backbone(model: nn.Module, meta: Any) -> None:
    """Load every tensor of a checkpoint except the Engram tables (which may not fit in RAM)."""
    path = meta.path(ckpt.MODEL_FILE)  # a sharded checkpoint's backbone file has no tables at all
    ckpt._verify_file(path, meta.files)
    tables = _table_keys(model)
    tied = dict(meta.raw.get("tied_keys") or {})
    expected = set(model.state_dict()) - set(tables)
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                if key not in tables:
                    tensors[key] = f.get_tensor(key)
    except Exception as e:  # safetensors raises its own error types
        raise ckpt.CheckpointError(f"{path} cannot be read ({e}); restore it or re-save the checkpoint") from e
    for alias, kept in tied.items():
        if alias not in tensors and kept in tensors:
            tensors[alias] = tensors[kept]
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise ckpt.CheckpointError(f"{path} does not match the model built from config.json: missing "
                                   f"{missing[:8]}, unexpected {unexpected[:8]}; re-save the checkpoint")
    result = model.load_state_dict(tensors, strict=False)
    left = sorted(set(result.missing_keys) - set(tables))
    if left:
        raise ckpt.CheckpointError(f"{path}: keys {left[:8]} were not loaded; re-save the checkpoint")


def _check_fits_in_ram(header: TableHeader, path: PathLike) -> None:
    need = header.rows * header.dim * 4  # materialised as fp32 parameters
    try:
        avail = int(next(l.split()[1] for l in open("/proc/meminfo") if l.startswith("MemAvailable"))) * 1024
    except (OSError, StopIteration, ValueError):
        return
    if need > 0.9 * avail:
        raise StorageError(f"{path}: the tables need {need / 2**30:.1f} GiB as fp32 but only "
                           f"{avail / 2**30:.1f} GiB of RAM is available; use --storage cached "
                           f"(or mmap) to serve them from the file")


def load_model_with_tables(run_dir: PathLike, storage: StorageConfig,
                           device: Union[str, torch.device] = "cpu") -> tuple[nn.Module, Any]:
    """Load a checkpoint with its Engram tables served as ``storage`` says; returns (model, meta).

    - no ``storage.path``: the checkpoint's own tables (in memory; ``prefetch`` adds a runtime).
    - ``path`` + ``memory``: the tables are read from the file into ordinary trainable weights.
    - ``path`` + ``mmap`` / ``cached``: the tables stay in the file; nothing table-sized is
      allocated, so tables larger than RAM work.
    The table's hash fingerprint and shapes are checked against the checkpoint's first.
    The runtime (if any) is ``table_runtime(model)``; close it when done.
    """
    if storage.path is None:
        model, meta = ckpt.load_model(run_dir, device)
        if storage.prefetch and model.hasher is not None:
            attach_tables(model, {lid: MemoryStorage(t.weight) for lid, t in engram_tables(model).items()},
                          prefetch=True)
        return model, meta
    meta = ckpt.read_config(run_dir)
    if meta.model_config.engram is None:
        raise StorageError(f"{run_dir} has no Engram layers; --table does not apply to it")
    model = build_model_without_tables(meta.model_config, ckpt.load_compression_file(meta.run_dir, meta))
    ckpt.check_hash_fingerprint(model, meta)
    header = open_table(storage.path, model.hasher, meta.model_config.engram.head_dim)
    load_backbone(model, meta)
    if storage.kind == TableLocation.MEMORY:
        _check_fits_in_ram(header, storage.path)
        convert_tables(model, lambda lid, _: MemoryTable.wrap(read_layer(header, lid, torch.float32)))
        model = model.to(device).eval()
        if storage.prefetch:
            attach_tables(model, {lid: MemoryStorage(t.weight) for lid, t in engram_tables(model).items()},
                          prefetch=True)
        return model, meta
    model = model.to(device).eval()
    storages = {e.layer_id: open_layer_storage(storage, header, e.layer_id) for e in model.engram_layers}
    attach_tables(model, storages, prefetch=storage.prefetch, device=device)
    return model, meta


def load_tables_into(model: nn.Module, path: PathLike, progress: bool = False) -> TableHeader:
    """Copy a table file's rows into ``model``'s in-memory (trainable) tables, after checking it fits."""
    if getattr(model, "hasher", None) is None:
        raise StorageError("the model has no Engram layers; there are no tables to load")
    header = open_table(path, model.hasher, model.cfg.engram.head_dim)
    for lid, table in engram_tables(model).items():
        if table.weight.is_meta:
            raise StorageError("the model's tables are offloaded; load a table into an in-memory model")
        table.load_full(read_layer(header, lid, table.weight.dtype, progress=progress))
    return header


# ----------------------------------------------------------------------------- training
class BatchPrefetcher:
    """Builds batch ``s + 1`` (tokens and Engram row ids) on a background thread while step ``s`` runs.

    ``make_batch(step) -> (x, y)`` must be a pure function of the step (``data.get_batch`` is),
    so prefetching changes nothing but timing. ``get(step)`` returns (x, y, hash_ids or None).
    ``warm(step, hash_ids)``, when given, runs on the same thread after hashing: training with
    file-backed tables reads the next step's rows ahead (``engram.tables.trainable``).
    """

    def __init__(self, make_batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
                 hasher: Optional[NgramHasher], device: Union[str, torch.device] = "cpu",
                 warm: Optional[Callable[[int, Optional[dict[int, torch.Tensor]]], None]] = None) -> None:
        self.make_batch, self.hasher, self.device = make_batch, hasher, torch.device(device)
        self.warm = warm
        self._pool = worker_pool(1, "engram-batches")
        self._next: Optional[tuple[int, Future]] = None
        self.wait_s = 0.0

    def _build(self, step: int) -> tuple[torch.Tensor, torch.Tensor, Optional[dict[int, torch.Tensor]]]:
        x, y = self.make_batch(step)
        hash_ids = self.hasher.hash(x) if self.hasher is not None else None
        if self.warm is not None:
            self.warm(step, hash_ids)
        if self.device.type != "cpu":
            x, y = x.to(self.device), y.to(self.device)
            if hash_ids is not None:
                hash_ids = {k: v.to(self.device) for k, v in hash_ids.items()}
        return x, y, hash_ids

    def get(self, step: int) -> tuple[torch.Tensor, torch.Tensor, Optional[dict[int, torch.Tensor]]]:
        t0 = time.perf_counter()
        if self._next is not None and self._next[0] == step:
            batch = self._next[1].result()
        else:
            batch = self._build(step)
        self.wait_s += time.perf_counter() - t0
        self._next = (step + 1, self._pool.submit(self._build, step + 1))
        return batch

    def close(self) -> None:
        self._pool.shutdown(wait=True)
