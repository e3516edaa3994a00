"""The rows of one Engram layer's tables, whatever holds them: the one interface every backend implements.

An Engram layer owns one flat table of ``R = sum(head sizes)`` rows of width ``Dh``; it asks
for rows by global row id and never cares where they live. :class:`EngramTable` is that
contract. The backends:

    =====================  =========================  ==============================================
    class                  where                      location
    =====================  =========================  ==============================================
    MemoryTable            here                       in RAM (or on the model's device), trainable
    OffloadedEmbedding     engram.tables.runtime      a storage tier (mmap / cached file, helper
                                                      process), read-only, rows fetched ahead
    TieredEmbedding        engram.tables.trainable    a writable working file (mmap / cached pool)
    ShardedEmbedding       engram.distributed         rows ``r::W`` on each of W ranks
    =====================  =========================  ==============================================

The model holds one per Engram layer (``layer.table``; ``engram_tables(model)`` gives all of
them by layer id). The module sits at the state-dict path ``...multi_head_embedding.embedding``
and keeps its rows in ``weight`` (:data:`TABLE_KEY_SUFFIX`), so checkpoints are the same whatever
the backend. Backends are swapped after the model is built by one function,
:func:`convert_tables` (a module rewrite, as torchtitan's ``ModelConverter.convert``), never by
setting attributes elsewhere.

How to add a backend (``tests/model/test_table_backend.py`` does it for a dict of rows):

1. Subclass :class:`EngramTable`, call ``super().__init__(num_embeddings, embedding_dim)`` and
   register ``self.weight``: the ``nn.Parameter`` this process holds (the full table, a shard,
   or a meta-device placeholder of the full shape when the rows live elsewhere).
2. Implement :meth:`EngramTable.lookup`: global rows ``[...]`` int64 -> ``[..., Dh]``, with a
   gradient reaching ``weight`` if the table trains (``self.sparse`` asks for a sparse one).
3. Implement :meth:`EngramTable.full` (every row as one ``[R, Dh]`` tensor) and
   :meth:`EngramTable.load_full` (replace every row), or raise :class:`TableError` saying why not.
4. Optionally :meth:`EngramTable.prefetch` (a hint: these rows are needed soon) and
   :meth:`EngramTable.close`; set ``location``.
5. Install it: ``convert_tables(model, lambda layer_id, old: MyTable(old.full()))``.

Overlays are handled here for every backend: a lookup given a :class:`RowOverlay` returns the
overlay's values for the rows it lists and the table's for the others, without writing the
table (copy-on-write at gather time). Patches served per request use it: a model call takes
``patches=[...]``, a stack of overlay sources (a ``{layer_id: RowOverlay}`` mapping, or an object
with ``row_overlays(model)`` such as a loaded ``.engp`` patch), merged by :func:`stack_overlays`
with the later source winning on rows several of them list.

Keyed overlays (:class:`KeyedOverlay`) are the collision-free kind: an entry replaces a head's
row only where the position's whole N-gram is the one the entry was made for. A hashed row is
shared by every N-gram that lands on it (with 1M rows and 100 edited facts, a quarter of ordinary
tokens read some edited row); the *key* of a position's head is a 62-bit hash of the hash ids of
all heads of its N-gram order (:func:`ngram_keys`), so another N-gram matches it only if it
collides on every head of the order at once. Patches trained as keyed (``engram patch train
--edit-keyed``) use them; they are served per request like row overlays, or installed on a
loaded model (:func:`install_keyed`).

Shape legend
    R rows of the table    Dh row width    K overlay rows or keys    G heads per N-gram order
    ... any leading shape ([B,T,H])
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from engram.config import TableLocation
from engram.errors import EngramError

TABLE_MODULE_PATH = "multi_head_embedding.embedding"  # where a layer's table sits in the state dict
TABLE_KEY_SUFFIX = TABLE_MODULE_PATH + ".weight"  # state-dict key suffix of a table's rows


class TableError(EngramError):
    """A table cannot do what was asked (read-only, wrong shape); the message names the fix."""


class RowOverlay(NamedTuple):
    """Rows that replace a table's own values in a lookup, without touching the table.

    ``rows`` [K] int64, sorted ascending, distinct, global row ids; ``values`` [K, Dh].
    """

    rows: torch.Tensor
    values: torch.Tensor

    @classmethod
    def of(cls, rows: torch.Tensor, values: torch.Tensor) -> "RowOverlay":
        """An overlay from rows in any order (sorted here; a repeated row is refused)."""
        return cls(*_sorted_distinct(rows, values, "overlay", "rows", "a row id"))


def _sorted_distinct(ids: torch.Tensor, values: torch.Tensor, what: str, unit: str, one: str
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``ids`` [K] (any order) and ``values`` [K, Dh] sorted by id; a repeated id is refused."""
    ids = torch.as_tensor(ids, dtype=torch.int64).reshape(-1)
    if values.dim() != 2 or values.shape[0] != ids.numel():
        raise TableError(f"{what} values must be [{ids.numel()}, Dh] for {ids.numel()} {unit}, "
                         f"got {tuple(values.shape)}")
    ids, order = torch.sort(ids)
    if ids.numel() > 1 and bool((ids[1:] == ids[:-1]).any()):
        raise TableError(f"{what} {unit} repeat {one}; give each once")
    return ids, values[order]


def _substitute(ids: torch.Tensor, sub: torch.Tensor, query: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``values`` [..., Dh] at ``query`` ids [...], with ``sub`` [K, Dh] put in where a query id
    is among the sorted ``ids`` [K] (a new tensor; gradients reach ``sub``)."""
    k = ids.numel()
    if k == 0:
        return values
    ids = ids.to(query.device)
    at = torch.searchsorted(ids, query).clamp_max(k - 1)  # [...] candidate index
    hit = ids[at] == query
    return torch.where(hit.unsqueeze(-1), sub.to(device=values.device, dtype=values.dtype)[at], values)


class KeyedOverlay(NamedTuple):
    """Values that replace a head's row at the positions whose N-gram key matches (see the module
    docstring): ``keys`` [K] int64 sorted, distinct (:func:`ngram_keys`); ``values`` [K, Dh]."""

    keys: torch.Tensor
    values: torch.Tensor

    @classmethod
    def of(cls, keys: torch.Tensor, values: torch.Tensor) -> "KeyedOverlay":
        """A keyed overlay from keys in any order (sorted here; a repeated key is refused)."""
        return cls(*_sorted_distinct(keys, values, "keyed overlay", "keys", "a key"))


class LayerOverlay(NamedTuple):
    """What one layer reads over its table in a call: rows first, then keyed entries (the more
    specific, so they win where both apply). Either may be None."""

    rows: Optional[RowOverlay]
    keyed: Optional[KeyedOverlay]


# Two Mersenne-free primes below 2**31 and their bases: each running hash stays < 2**31, so a
# product stays < 2**62 and int64 arithmetic never overflows.
_Q1, _B1 = 2147483629, 1000003
_Q2, _B2 = 2147483587, 998244353 % 2147483587


def ngram_keys(hash_ids: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per-head N-gram keys: hash ids [..., H] (heads grouped by order, ``group_size`` heads each)
    -> [..., H] int64. Head j of a group gets a 62-bit hash of (j, the group's G hash ids), so two
    positions share a key only if their N-grams of that order hash alike on every head."""
    H = hash_ids.shape[-1]
    if group_size < 1 or H % group_size:
        raise TableError(f"{H} heads cannot be split into N-gram orders of {group_size} heads each")
    ids = hash_ids.to(torch.int64).unflatten(-1, (H // group_size, group_size))  # [..., H/G, G]
    a = torch.zeros(ids.shape[:-1], dtype=torch.int64, device=ids.device)  # [..., H/G]
    b = torch.zeros_like(a)
    for g in range(group_size):
        a = (a * _B1 + ids[..., g] + 1) % _Q1
        b = (b * _B2 + ids[..., g] + 1) % _Q2
    j = torch.arange(group_size, dtype=torch.int64, device=ids.device)  # the head within the group
    a = (a.unsqueeze(-1) * _B1 + j + 1) % _Q1  # [..., H/G, G]
    return (a * _Q2 + b.unsqueeze(-1)).flatten(-2)


def apply_keyed(keys: torch.Tensor, values: torch.Tensor, overlay: KeyedOverlay) -> torch.Tensor:
    """``values`` [..., Dh] of positions with ``keys`` [...], the keyed overlay's values put in
    where a key matches (a new tensor; gradients reach ``overlay.values``)."""
    return _substitute(overlay.keys, overlay.values, keys, values)


class EngramTable(nn.Module):
    """The rows of one Engram layer's table; see the module docstring for the contract."""

    location: TableLocation = TableLocation.MEMORY

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = int(num_embeddings), int(embedding_dim)
        self.sparse = False  # sparse gradients for the row-sparse optimizer (as nn.Embedding.sparse)

    # ------------------------------------------------------------------ what a backend implements
    def lookup(self, rows: torch.Tensor) -> torch.Tensor:
        """Global rows [...] int64 -> their values [..., Dh] (with gradients where trainable)."""
        raise NotImplementedError

    def full(self) -> torch.Tensor:
        """Every row, [R, Dh] (a copy or a read-only view; do not write into it)."""
        raise NotImplementedError

    def load_full(self, table: torch.Tensor) -> None:
        """Replace every row by ``table`` [R, Dh]."""
        raise NotImplementedError

    def prefetch(self, rows: torch.Tensor) -> None:
        """A hint that global ``rows`` will be looked up soon (may run on another thread)."""

    def close(self) -> None:
        """Release files, pools or workers the backend holds."""

    # ------------------------------------------------------------------ shared by every backend
    def forward(self, rows: torch.Tensor, overlay: Optional[RowOverlay] = None) -> torch.Tensor:
        """Global rows [...] -> [..., Dh]; with ``overlay`` its rows take the overlay's values."""
        out = self.lookup(rows)
        return out if overlay is None else apply_overlay(rows, out, overlay)

    def _check_full(self, table: torch.Tensor) -> None:
        if tuple(table.shape) != (self.num_embeddings, self.embedding_dim):
            raise TableError(f"a table of {self.num_embeddings} x {self.embedding_dim} rows cannot load "
                             f"one of shape {tuple(table.shape)}; was it made for another hash configuration?")

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.location.value}"


def apply_overlay(rows: torch.Tensor, values: torch.Tensor, overlay: RowOverlay) -> torch.Tensor:
    """``values`` [..., Dh] of ``rows`` [...] with the overlay's rows substituted (a new tensor)."""
    return _substitute(overlay.rows, overlay.values, rows, values)


LayerOverlays = Mapping[int, RowOverlay]  # {layer_id: the rows that layer reads from the overlay}


def merge_overlays(stack: Sequence[Any]) -> Any:
    """One overlay from several of one layer and one kind (all :class:`RowOverlay` or all
    :class:`KeyedOverlay`): a row (key) listed more than once takes the value of the last overlay
    that lists it (the rule of applying them in order)."""
    kind = type(stack[0]) if stack else RowOverlay
    stack = [o for o in stack if o[0].numel()]
    if len(stack) <= 1:
        return stack[0] if stack else kind(torch.empty(0, dtype=torch.int64), torch.empty(0, 0))
    dtype = stack[-1].values.dtype
    rows = torch.cat([o[0] for o in stack])  # [K1+K2+...]
    values = torch.cat([o.values.to(dtype) for o in stack])  # [K1+K2+..., Dh]
    rows, order = torch.sort(rows, stable=True)  # equal rows keep the stack's order
    last = torch.ones_like(rows, dtype=torch.bool)
    last[:-1] = rows[1:] != rows[:-1]  # the last of each run of equal rows is the latest overlay's
    return kind(rows[last], values[order[last]])


def stack_overlays(model: nn.Module, patches: Sequence[Any]) -> dict[int, Any]:
    """A model call's ``patches=`` -> one merged overlay per Engram layer they touch.

    Each item is a ``{layer_id: overlay}`` mapping (a :class:`RowOverlay`, :class:`KeyedOverlay`
    or :class:`LayerOverlay` per layer) or an object whose ``row_overlays(model)`` returns one (a
    loaded patch checks there that it fits the model). Later items win on rows (keys) that
    several items list. A layer gets a :class:`RowOverlay` when only row overlays touch it, else a
    :class:`LayerOverlay`. An empty stack gives ``{}``: every layer reads its table.
    """
    if isinstance(patches, (str, bytes)) or not isinstance(patches, Sequence):
        raise TableError(f"patches must be a list of loaded patches or overlays, got {type(patches).__name__}; "
                         f"load patch files with engram.patches.patchfile.load_patch")
    layers = engram_tables(model)
    per_layer: dict[int, list[RowOverlay]] = {}
    keyed: dict[int, list[KeyedOverlay]] = {}
    for i, item in enumerate(patches):
        if isinstance(item, Mapping):
            overlays = item
        elif hasattr(item, "row_overlays"):
            overlays = item.row_overlays(model)
        else:
            raise TableError(f"patches[{i}] is a {type(item).__name__}, not a loaded patch or a "
                             f"{{layer_id: RowOverlay}} mapping; load .engp files with load_patch first")
        for lid, ov in overlays.items():
            if lid not in layers:
                raise TableError(f"patches[{i}] changes Engram layer {lid} but the model has layers "
                                 f"{sorted(layers)}; it belongs to another model")
            t = layers[lid]
            parts = [p for p in ov if p is not None] if isinstance(ov, LayerOverlay) else [ov]
            for part in parts:
                is_keyed = isinstance(part, KeyedOverlay)
                if part.values.dim() != 2 or part.values.shape[1] != t.embedding_dim or (
                        not is_keyed and part.rows.numel() and (
                            int(part.rows[0]) < 0 or int(part.rows[-1]) >= t.num_embeddings)):
                    raise TableError(f"patches[{i}]: layer {lid} overlay of {part[0].numel()} "
                                     f"{'keys' if is_keyed else 'rows'} x {tuple(part.values.shape)[1:]} does not fit "
                                     f"the table of {t.num_embeddings} x {t.embedding_dim} rows; it belongs to another model")
                (keyed if is_keyed else per_layer).setdefault(lid, []).append(part)
    return {lid: merge_layer_overlays(per_layer.get(lid, []) + keyed.get(lid, []))
            for lid in sorted(set(per_layer) | set(keyed))}


def merge_layer_overlays(stack: Sequence[Any]) -> Any:
    """One layer's overlays of either kind, in stack order -> a :class:`RowOverlay` when all are
    row overlays, else a :class:`LayerOverlay` (rows merged, keyed entries merged)."""
    rows = [o for o in stack if isinstance(o, RowOverlay)]
    keyed = [o for o in stack if isinstance(o, KeyedOverlay)]
    merged = merge_overlays(rows) if rows or not keyed else None
    return merged if not keyed else LayerOverlay(merged, merge_overlays(keyed))


def overlay_nbytes(overlay: Any) -> int:
    """Bytes a layer's overlay holds (ids and values), whatever its kind."""
    parts = [p for p in overlay if p is not None] if isinstance(overlay, LayerOverlay) else [overlay]
    return sum(p[0].numel() * p[0].element_size() + p.values.numel() * p.values.element_size() for p in parts)


def split_overlay(overlay: Any) -> tuple[Optional[RowOverlay], Optional[KeyedOverlay]]:
    """A layer's overlay argument (None, a RowOverlay, a KeyedOverlay or a LayerOverlay) -> (rows, keyed)."""
    if overlay is None:
        return None, None
    if isinstance(overlay, LayerOverlay):
        return overlay.rows, overlay.keyed
    if isinstance(overlay, KeyedOverlay):
        return None, overlay
    return overlay, None


# ----------------------------------------------------------------------------- the in-memory table
def _storage_refs(t: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


class _GradBuffer:
    """The memory of a table's last gradient, zeroed and handed out again once nothing else holds it.

    A fresh table-sized zero tensor every step costs its page faults (on CPU several times the
    fill itself). The buffer is kept as a tensor that shares the gradient's storage without being
    a view of it, so autograd still moves the gradient into ``weight.grad`` without a copy. It is
    reused only when that storage has no other holder (``weight.grad`` set to None, no reference
    kept anywhere): the storage's reference count equals a lone tensor's. Peak memory is the same
    as before (the gradient existed during every backward); it is now also held between steps.
    """

    def __init__(self) -> None:
        self.buf: Optional[torch.Tensor] = None  # flat [R*Dh]

    @staticmethod
    def _alias(storage: torch.UntypedStorage, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        stride = (shape[1], 1) if len(shape) == 2 else (1,)
        return torch.empty(0, dtype=dtype, device=storage.device).set_(storage, 0, shape, stride)

    def _free(self, buf: torch.Tensor) -> bool:
        try:
            return _storage_refs(buf) == _storage_refs(torch.empty(1, dtype=buf.dtype))
        except (AttributeError, RuntimeError):  # no such private API in this torch: never reuse
            return False

    def zeros(self, like: torch.Tensor, rows: int, dim: int) -> torch.Tensor:
        buf = self.buf
        if (buf is not None and buf.numel() == rows * dim and buf.dtype == like.dtype
                and buf.device == like.device and self._free(buf)):
            return self._alias(buf.untyped_storage(), buf.dtype, (rows, dim)).zero_()
        grad = like.new_zeros(rows, dim)
        self.buf = self._alias(grad.untyped_storage(), grad.dtype, (rows * dim,))
        return grad


class _TableGather(torch.autograd.Function):
    """``weight[rows]`` whose backward is one ``index_add_`` into a zero table.

    It gives the dense gradient ``F.embedding``'s backward gives, with the same sums in the same
    order (duplicate rows added in index order, from zero; checked bit for bit in
    tests/model/test_model.py), about 5x faster on CPU for Engram's many-rows, narrow-row tables.
    CPU only: on CUDA ``index_add_`` uses atomics, so the order of the sums would vary.
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, rows: torch.Tensor, buffer: _GradBuffer
                ) -> torch.Tensor:  # [R,Dh], [...] -> [...,Dh]
        ctx.save_for_backward(rows)
        ctx.num_rows, ctx.buffer = weight.shape[0], buffer
        return F.embedding(rows, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (rows,) = ctx.saved_tensors
        dh = grad.shape[-1]
        grad_weight = ctx.buffer.zeros(grad, ctx.num_rows, dh)
        grad_weight.index_add_(0, rows.reshape(-1), grad.reshape(-1, dh))
        return grad_weight, None, None


class MemoryTable(EngramTable):
    """The table as one ordinary parameter ``weight`` [R, Dh], trained like ``nn.Embedding``.

    Built from scratch it draws N(0, 1) rows as ``nn.Embedding`` does (the model re-initialises
    them; drawing them keeps the random stream, hence every later weight, what it was).
    """

    location = TableLocation.MEMORY

    def __init__(self, num_embeddings: int, embedding_dim: int, weight: Optional[torch.Tensor] = None) -> None:
        super().__init__(num_embeddings, embedding_dim)
        if weight is None:
            self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim))
            nn.init.normal_(self.weight)
        else:
            self._check_full(weight)
            self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)
        self._grad_buffer = _GradBuffer()  # training on CPU: the table gradient's memory, reused

    @classmethod
    def wrap(cls, weight: torch.Tensor) -> "MemoryTable":
        """A table on ``weight`` [R, Dh] itself (no copy)."""
        return cls(weight.shape[0], weight.shape[1], weight)

    def lookup(self, rows: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (not self.sparse and w.requires_grad and w.device.type == "cpu" and torch.is_grad_enabled()):
            return _TableGather.apply(w, rows, self._grad_buffer)
        return F.embedding(rows, w, sparse=self.sparse)  # sparse gradients, no gradient, another device

    def full(self) -> torch.Tensor:
        return self.weight.detach()

    @torch.no_grad()
    def load_full(self, table: torch.Tensor) -> None:
        self._check_full(table)
        self.weight.copy_(table.to(self.weight.device))


# ----------------------------------------------------------------------------- model-wide helpers
def table_holders(model: nn.Module) -> list[nn.Module]:
    """The modules holding ``model``'s Engram tables, in layer order: its Engram layers and its
    historian experts (``engram.model.historian``; at most one of the two per layer). Each has
    ``layer_id``, ``table`` and ``multi_head_embedding``."""
    holders = list(model.engram_layers) + list(getattr(model, "historian_experts", []))  # type: ignore[attr-defined]
    return sorted(holders, key=lambda e: e.layer_id)


def engram_tables(model: nn.Module) -> dict[int, EngramTable]:
    """Every Engram table (of an Engram layer or a historian expert), by layer id (in layer order)."""
    return {e.layer_id: e.table for e in table_holders(model)}


def convert_tables(model: nn.Module, convert: Callable[[int, EngramTable], EngramTable]
                   ) -> dict[int, EngramTable]:
    """Give every Engram layer the table ``convert(layer_id, current table)`` returns.

    The one place a layer's table is replaced (after the model is built): serving from a file,
    training from a working file, sharding over ranks and reloading all go through here. A
    converter may return the table it was given. Returns the new tables by layer id.
    """
    out = {}
    for e in table_holders(model):
        new = convert(e.layer_id, e.table)
        if not isinstance(new, EngramTable):
            raise TableError(f"layer {e.layer_id}: a table converter returned {type(new).__name__}, "
                             f"not an EngramTable")
        if (new.num_embeddings, new.embedding_dim) != (e.table.num_embeddings, e.table.embedding_dim):
            raise TableError(f"layer {e.layer_id}: the new table is {new.num_embeddings} x {new.embedding_dim} "
                             f"but the layer needs {e.table.num_embeddings} x {e.table.embedding_dim}")
        e.multi_head_embedding.embedding = new
        out[e.layer_id] = new
    return out
