"""Engram table patches: the rows a knowledge update changed, in a small self-checking file.

A patch (``.engp``) is a safetensors file (never pickle) holding, for every Engram layer it
touches, the row ids, the new values and the *old* values of those rows, so that applying it
and reverting it need no other file and revert is bit-exact. Tensors::

    layer{L}.rows    int64 [n]        row ids into layer L's table (sorted, unique)
    layer{L}.new     [n, Dh]          new values: the table dtype, or bf16 / int8 (quantised)
    layer{L}.scale   fp32 [n]         only with int8: per-row scale, new = int8 * scale
    layer{L}.old     [n, Dh]          old values, always exact: the table's storage dtype, and for
                                      an fp8 table its dequantised rows in fp32 (fp8 encoding is a
                                      fixed point, so they re-encode to the very bytes of the file)
    layer{L}.keys    int64 [n]        keyed patches only (format version 2): the N-gram key of each
                                      entry (``engram.model.table.ngram_keys``; sorted, unique);
                                      ``rows`` is then the row each entry stands in for (may repeat)

Keyed patches
    A keyed patch's entries replace a head's row only at the positions whose whole N-gram is the
    one the entry was trained on, so text that merely hashes to the same row reads the table as
    before. Its tables are never written: it is served as an overlay (``model(ids,
    patches=[...])``, ``engram generate --patch``) or installed on a loaded model
    (``apply_to_model``); a table *file* cannot take it. Its result fingerprint is its base's.

The safetensors metadata holds one key, ``engram_patch``: JSON with ``format``
("engram-table-patch"), ``version``, ``patch_id`` (first 16 hex digits of ``checksum``),
``parent`` (the patch id this one was made on top of, or null: the version chain), ``name``,
``dtype`` (the table storage dtype it was made for), ``quantization`` ("none" | "bf16" |
"int8"), ``hash_fingerprint`` and ``hasher`` (the hash configuration of the table),
``base_fingerprint`` (the table *content* it applies to) and ``result_fingerprint`` (the
content after applying it), ``layers`` (``{L: {rows, dim, changed}}``), ``created_at``,
``provenance`` (free JSON: steps, data, losses) and ``checksum``: sha256 over every tensor
(name, dtype, shape, bytes, in name order) and the metadata without ``checksum``. Writes are
atomic (temp file, fsync, ``os.replace``, directory fsync); loading validates everything and
raises a :class:`PatchFileError` (a ``ValueError``) that names the file, the value and the fix.

Content fingerprint
    ``sha256(json{hash fingerprint, dtype, per layer (rows, dim, CRC-32 of its bytes in the
    storage dtype; fp8: of its records, values and scales)})``. A table file's header already carries each layer's CRC-32 (written
    sequentially by :class:`~engram.tables.tablefile.TableWriter`), so checking a patch's base costs
    no data read; an in-memory model's tables are CRC'd in the patch's dtype. Because the
    dtype is part of it, a patch made from fp32 tables is refused by a bf16 copy of the table
    (its content differs), instead of being applied to rows it was not made for.

Patches for fp8 tables
    ``dtype`` "fp8": the new values are kept at full precision (fp32, or the chosen
    quantisation), so an overlay (``model(ids, patches=...)``) serves them unrounded over the
    fp8 base rows, which are never re-quantised. Applying the patch to the fp8 *file* encodes
    the changed rows into fp8 (the file holds fp8 rows only; ``result_fingerprint`` is of that
    content); reverting writes the old records back bit for bit.

Shape legend
    n rows changed in one layer    Dh row width (head_dim)    R rows of one layer
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from engram import __version__
from engram.config import QUANTIZATIONS, PatchError
from engram.fsutil import PathLike, atomic_write
from engram.model.table import KeyedOverlay, RowOverlay
from engram.tables.tablefile import (
    DTYPE_NAMES,
    FP8,
    STORAGE_DTYPES,
    as_bytes,
    fp8_decode,
    fp8_encode,
    storage_bytes,
    value_dtype,
)

FORMAT_NAME = "engram-table-patch"
FORMAT_VERSION = 2  # 2: keyed patches (row patches are still written as version 1)
SUFFIX = ".engp"
_META_KEY = "engram_patch"
_META_KEYS = {"format", "version", "patch_id", "parent", "name", "dtype", "quantization",
              "hash_fingerprint", "hasher", "base_fingerprint", "result_fingerprint", "layers",
              "created_at", "created_by", "provenance", "checksum"}


class PatchFileError(PatchError):
    """A patch file is missing, not a patch, corrupt or truncated."""


class PatchMismatchError(PatchError):
    """A patch was made for another table (content, hash configuration, shape or dtype)."""


class PatchChainError(PatchError):
    """The version chain forbids this apply or revert (already applied, blocked by a later patch)."""


# ----------------------------------------------------------------------------- fingerprints
def content_fingerprint(hash_fingerprint: str, dtype: str,
                        layers: Mapping[int, tuple[int, int, int]]) -> str:
    """sha256 hex of (hash config, dtype, per layer (rows, dim, crc32)): what a table holds."""
    rec = {"hash": hash_fingerprint, "dtype": dtype,
           "layers": {str(lid): list(map(int, v)) for lid, v in sorted(layers.items())}}
    return hashlib.sha256(json.dumps(rec, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def tensor_crc(t: torch.Tensor, dtype: str) -> int:
    """CRC-32 of ``t``'s bytes in storage dtype ``dtype`` (as a table file would hold them)."""
    return zlib.crc32(storage_bytes(t, dtype))


def as_stored(t: torch.Tensor, dtype: str) -> torch.Tensor:
    """``t`` [R, Dh] as a ``dtype`` table holds it, in that table's value dtype (fp8: encoded and
    decoded, fp32; otherwise cast)."""
    t = t.detach().cpu()
    if dtype == FP8:
        return fp8_decode(fp8_encode(t), t.shape[1])
    return t.to(value_dtype(dtype))


def tables_fingerprint(tables: Mapping[int, torch.Tensor], dtype: str, hash_fingerprint: str) -> str:
    """Content fingerprint of in-memory tables ``{layer_id: [R, Dh]}`` stored as ``dtype``."""
    return content_fingerprint(hash_fingerprint, dtype, {
        lid: (int(t.shape[0]), int(t.shape[1]), tensor_crc(t, dtype)) for lid, t in tables.items()})


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (``torch.equal`` would call NaN != NaN and -0.0 == 0.0)."""
    return a.dtype == b.dtype and a.shape == b.shape and bytes(as_bytes(a)) == bytes(as_bytes(b))


def rows_changed(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Ids of the rows whose bits differ: old, new [R, Dh] of one dtype -> int64 [n]."""
    w = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[old.element_size()]
    diff = (old.contiguous().view(w) != new.contiguous().view(w)).any(dim=1)
    return torch.nonzero(diff).flatten().to(torch.int64)


# ----------------------------------------------------------------------------- compact row sets
def encode_rows(rows: Union[torch.Tensor, np.ndarray]) -> str:
    """Sorted row ids -> short text (base64 of zlib'd uint32 deltas), for a table header's meta."""
    r = np.unique(np.asarray(rows, dtype=np.int64))
    deltas = np.diff(r, prepend=0).astype("<u4")
    return base64.b64encode(zlib.compress(deltas.tobytes(), 9)).decode("ascii")


def decode_rows(text: str) -> np.ndarray:
    """Inverse of :func:`encode_rows`."""
    try:
        deltas = np.frombuffer(zlib.decompress(base64.b64decode(text)), dtype="<u4")
    except (ValueError, zlib.error) as e:
        raise PatchError(f"a recorded row set is damaged ({e}); the table header's meta was edited") from e
    return np.cumsum(deltas.astype(np.int64))


# ----------------------------------------------------------------------------- the patch
@dataclass
class LayerPatch:
    """One layer's changed rows: ids [n], new values [n, Dh] (maybe quantised), old [n, Dh]."""

    rows: torch.Tensor
    new: torch.Tensor
    old: torch.Tensor
    scale: Optional[torch.Tensor] = None  # int8 only: [n] fp32
    keys: Optional[torch.Tensor] = None  # keyed patches only: int64 [n] N-gram keys, sorted, unique

    def __post_init__(self) -> None:
        n = int(self.rows.numel())
        if self.rows.dtype != torch.int64 or self.rows.dim() != 1:
            raise PatchError(f"rows must be int64 [n], got {self.rows.dtype} {tuple(self.rows.shape)}")
        if self.new.shape[0] != n or self.old.shape[0] != n or self.new.shape != self.old.shape:
            raise PatchError(f"new {tuple(self.new.shape)} and old {tuple(self.old.shape)} values "
                             f"must both be [{n}, Dh] for {n} row ids")
        if (self.new.dtype == torch.int8) != (self.scale is not None):
            raise PatchError("int8 values need a per-row scale, and only int8 values have one")
        ids, what = (self.rows, "row ids") if self.keys is None else (self.keys, "keys")
        if self.keys is not None and (self.keys.dtype != torch.int64 or tuple(self.keys.shape) != (n,)):
            raise PatchError(f"keys must be int64 [{n}], got {self.keys.dtype} {tuple(self.keys.shape)}")
        if n > 1 and not bool((ids[1:] > ids[:-1]).all()):
            raise PatchError(f"{what} must be sorted and unique")

    @property
    def dim(self) -> int:
        return int(self.old.shape[1])

    def new_values(self, dtype: torch.dtype) -> torch.Tensor:
        """The new rows dequantised and cast to ``dtype`` (what an apply writes)."""
        if self.scale is not None:
            return (self.new.float() * self.scale[:, None]).to(dtype)
        return self.new.to(dtype)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.rows, self.new, self.old)
                   ) + (0 if self.scale is None else self.scale.numel() * 4) + (
                       0 if self.keys is None else self.keys.numel() * 8)


@dataclass
class TablePatch:
    """A loaded or freshly made patch: per-layer rows and its metadata (see the module docstring)."""

    layers: dict[int, LayerPatch]
    meta: dict[str, Any] = field(default_factory=dict)
    path: Optional[Path] = None
    _overlays: Optional[dict[int, RowOverlay]] = field(default=None, init=False, repr=False, compare=False)

    @property
    def patch_id(self) -> str:
        return str(self.meta["patch_id"])

    @property
    def parent(self) -> Optional[str]:
        return self.meta.get("parent")

    @property
    def name(self) -> str:
        return str(self.meta.get("name") or "")

    @property
    def dtype(self) -> str:
        return str(self.meta["dtype"])

    @property
    def changed_rows(self) -> int:
        """Entries of the patch (rows it writes; for a keyed patch, N-gram keys)."""
        return sum(int(lp.rows.numel()) for lp in self.layers.values())

    @property
    def keyed(self) -> bool:
        """Whether the entries are keyed by N-gram (see the module docstring), not by row."""
        return any(lp.keys is not None for lp in self.layers.values())

    def label(self) -> str:
        return f"{self.patch_id}" + (f" ({self.name})" if self.name else "")

    def row_overlays(self, model: Any) -> dict[int, RowOverlay]:
        """This patch's new rows as overlays for ``model`` ({layer_id: RowOverlay}, values in the
        patch's table dtype): what ``model(ids, patches=[patch])`` reads. Checks the hash
        configuration and the layer shapes (cheap); that the patch was made for this table's
        content is checked by ``engram.patches.overlay.stack_patches`` (it needs the tables'
        fingerprint)."""
        hasher = getattr(model, "hasher", None)
        if hasher is None:
            raise PatchMismatchError(f"patch {self.label()}: the model has no Engram layers, so there is "
                                     f"no table to read it over")
        if hasher.fingerprint() != self.meta["hash_fingerprint"]:
            raise PatchMismatchError(
                f"patch {self.label()} was made for hash configuration {self.meta['hash_fingerprint'][:16]}... "
                f"but the model hashes with {hasher.fingerprint()[:16]}...; its row ids mean other N-grams "
                f"there. Use it with the model it was trained from, or retrain it with `engram patch train`")
        tables = {e.layer_id: e.table for e in model.engram_layers}
        for key, info in self.meta["layers"].items():
            t = tables.get(int(key))
            if t is None or (t.num_embeddings, t.embedding_dim) != (int(info["rows"]), int(info["dim"])):
                raise PatchMismatchError(
                    f"patch {self.label()}: layer {key} is {info['rows']} x {info['dim']} in the patch but "
                    + (f"{t.num_embeddings} x {t.embedding_dim} in the model" if t is not None
                       else f"the model has Engram layers {sorted(tables)}") + "; it belongs to another model")
        return self.overlays()

    def overlays(self) -> dict[int, RowOverlay]:
        """The new rows per layer as overlays, unchecked (``row_overlays`` checks them against a model)."""
        if self._overlays is None:  # dequantised once; rows are already sorted and unique
            dt = value_dtype(self.dtype)
            self._overlays = {lid: RowOverlay(lp.rows, lp.new_values(dt)) if lp.keys is None
                              else KeyedOverlay(lp.keys, lp.new_values(dt)) for lid, lp in self.layers.items()}
        return self._overlays

    def overlay_nbytes(self) -> int:
        """Bytes the overlay of this patch holds (row ids and new values in the table dtype)."""
        size = value_dtype(self.dtype).itemsize
        return sum(lp.rows.numel() * 8 + lp.rows.numel() * lp.dim * size for lp in self.layers.values())

    def summary(self) -> dict[str, Any]:
        m = self.meta
        return {"patch_id": self.patch_id, "name": self.name, "parent": self.parent, "dtype": self.dtype,
                "quantization": m["quantization"], "changed_rows": self.changed_rows, "keyed": self.keyed,
                "layers": m["layers"], "base_fingerprint": m["base_fingerprint"],
                "result_fingerprint": m["result_fingerprint"], "hash_fingerprint": m["hash_fingerprint"],
                "created_at": m["created_at"], "provenance": m.get("provenance") or {},
                "payload_bytes": sum(lp.nbytes() for lp in self.layers.values()),
                **({"file": str(self.path), "file_bytes": self.path.stat().st_size}
                   if self.path is not None and self.path.is_file() else {})}


def _tensors(layers: Mapping[int, LayerPatch]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for lid, lp in sorted(layers.items()):
        out[f"layer{lid}.rows"] = lp.rows.contiguous()
        out[f"layer{lid}.new"] = lp.new.contiguous()
        out[f"layer{lid}.old"] = lp.old.contiguous()
        if lp.scale is not None:
            out[f"layer{lid}.scale"] = lp.scale.contiguous()
        if lp.keys is not None:
            out[f"layer{lid}.keys"] = lp.keys.contiguous()
    return out


def _checksum(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}\x1f{t.dtype}\x1f{tuple(t.shape)}\x1f".encode())
        h.update(as_bytes(t))
    body = {k: v for k, v in meta.items() if k not in ("checksum", "patch_id")}
    h.update(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    return h.hexdigest()


def _quantize(values: torch.Tensor, how: str, dtype: torch.dtype
              ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    if how == "none":
        return values.to(dtype), None
    if how == "bf16":
        return values.to(torch.bfloat16), None
    # int8, symmetric per row: new ~= q * scale with |q| <= 127 (a zero row keeps scale 1)
    v = values.float()
    amax = v.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(v / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale.to(torch.float32)


def make_patch(base: Mapping[int, torch.Tensor], new: Mapping[int, torch.Tensor], *,
               hash_fingerprint: str, hasher: Optional[Mapping[str, Any]] = None, dtype: str = "fp32",
               quantization: str = "none", parent: Optional[str] = None, name: str = "",
               provenance: Optional[Mapping[str, Any]] = None) -> TablePatch:
    """The patch turning tables ``base`` into ``new`` ({layer_id: [R, Dh]}), for a ``dtype`` table.

    Only rows whose bits differ in ``dtype`` are kept. ``quantization`` compresses the new
    values ("bf16", or "int8" with a per-row scale); the old values are kept exactly, so a
    revert is bit-exact either way. ``result_fingerprint`` is computed from what an apply will
    really write (the dequantised values in ``dtype``), so an apply can check its own result.
    """
    if dtype not in STORAGE_DTYPES:
        raise PatchError(f"dtype={dtype!r} is not a table storage dtype; choose one of {sorted(STORAGE_DTYPES)}")
    if quantization not in QUANTIZATIONS:
        raise PatchError(f"quantization={quantization!r}; choose one of {list(QUANTIZATIONS)}")
    if set(base) != set(new):
        raise PatchError(f"base layers {sorted(base)} and new layers {sorted(new)} differ")
    tdt = value_dtype(dtype)
    layers: dict[int, LayerPatch] = {}
    result: dict[int, torch.Tensor] = {}
    for lid in sorted(base):
        b = as_stored(base[lid], dtype)  # the rows the table holds (old values are exact)
        n = new[lid].detach().cpu().to(tdt)  # fp8: new rows stay fp32, never re-quantised here
        if b.shape != n.shape or b.dim() != 2:
            raise PatchError(f"layer {lid}: base {tuple(b.shape)} and new {tuple(n.shape)} must be one [R, Dh]")
        rows = rows_changed(b, n)
        q, scale = _quantize(n[rows], quantization, tdt)
        lp = LayerPatch(rows, q, b[rows].clone(), scale)
        after = b.clone()
        after[rows] = lp.new_values(tdt)
        result[lid] = after
        layers[lid] = lp
    return _finish(layers, base, result, dtype=dtype, quantization=quantization, hash_fingerprint=hash_fingerprint,
                   hasher=hasher, parent=parent, name=name, provenance=provenance, version=1)


def _finish(layers: dict[int, LayerPatch], base: Mapping[int, torch.Tensor], result: Mapping[int, torch.Tensor], *,
            dtype: str, quantization: str, hash_fingerprint: str, hasher: Optional[Mapping[str, Any]],
            parent: Optional[str], name: str, provenance: Optional[Mapping[str, Any]], version: int) -> TablePatch:
    """The patch's metadata, checksum and id around its ``layers``."""
    meta: dict[str, Any] = {
        "format": FORMAT_NAME, "version": version, "parent": parent, "name": str(name),
        "dtype": dtype, "quantization": quantization, "hash_fingerprint": hash_fingerprint,
        "hasher": dict(hasher) if hasher is not None else None,
        "base_fingerprint": tables_fingerprint(base, dtype, hash_fingerprint),
        "result_fingerprint": tables_fingerprint(result, dtype, hash_fingerprint),
        "layers": {str(lid): {"rows": int(base[lid].shape[0]), "dim": int(base[lid].shape[1]),
                              "changed": int(lp.rows.numel())} for lid, lp in layers.items()},
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "created_by": f"engram-lm {__version__}", "provenance": dict(provenance or {}),
    }
    meta["checksum"] = _checksum(_tensors(layers), meta)
    meta["patch_id"] = meta["checksum"][:16]
    return TablePatch(layers, meta)


def make_keyed_patch(base: Mapping[int, torch.Tensor], entries: Mapping[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                     *, hash_fingerprint: str, hasher: Optional[Mapping[str, Any]] = None, dtype: str = "fp32",
                     quantization: str = "none", parent: Optional[str] = None, name: str = "",
                     provenance: Optional[Mapping[str, Any]] = None) -> TablePatch:
    """A keyed patch over tables ``base`` ({layer_id: [R, Dh]}, left as they are): per layer
    ``(keys [n], rows [n], values [n, Dh])``, each entry the value head-row ``rows[i]`` takes at
    positions whose N-gram key is ``keys[i]`` (see the module docstring). Entries whose value
    equals the row's own (in ``dtype``) are dropped: they change nothing."""
    if dtype not in STORAGE_DTYPES:
        raise PatchError(f"dtype={dtype!r} is not a table storage dtype; choose one of {sorted(STORAGE_DTYPES)}")
    if quantization not in QUANTIZATIONS:
        raise PatchError(f"quantization={quantization!r}; choose one of {list(QUANTIZATIONS)}")
    bad = sorted(set(entries) - set(base))
    if bad:
        raise PatchError(f"keyed entries for layers {bad} that the tables {sorted(base)} do not have")
    tdt = value_dtype(dtype)
    layers: dict[int, LayerPatch] = {}
    for lid in sorted(entries):
        keys, rows, values = entries[lid]
        keys, order = torch.sort(torch.as_tensor(keys, dtype=torch.int64).reshape(-1))
        if keys.numel() > 1 and bool((keys[1:] == keys[:-1]).any()):
            raise PatchError(f"layer {lid}: keyed entries repeat a key; give each key once")
        rows = torch.as_tensor(rows, dtype=torch.int64).reshape(-1)[order]
        b = as_stored(base[lid], dtype)
        old = b[rows]
        n = values.detach().cpu().to(tdt)[order]
        if n.shape != old.shape:
            raise PatchError(f"layer {lid}: values {tuple(n.shape)} must be [{rows.numel()}, {b.shape[1]}]")
        keep = rows_changed(old, n)
        q, scale = _quantize(n[keep], quantization, tdt)
        layers[lid] = LayerPatch(rows[keep], q, old[keep].clone(), scale, keys[keep])
    return _finish(layers, base, base, dtype=dtype, quantization=quantization, hash_fingerprint=hash_fingerprint,
                   hasher=hasher, parent=parent, name=name, provenance=provenance, version=2)


# ----------------------------------------------------------------------------- file I/O
def save_patch(patch: TablePatch, path: PathLike) -> Path:
    """Write ``patch`` atomically (:func:`engram.fsutil.atomic_write`)."""
    p = Path(path)
    try:
        text = json.dumps(patch.meta, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise PatchError(f"cannot write {p}: the patch metadata is not plain JSON ({e}); "
                         f"pass JSON-able provenance") from e
    blob = st_save(_tensors(patch.layers), metadata={_META_KEY: text})
    try:
        atomic_write(p, lambda f: f.write(blob))
    except OSError as e:
        raise PatchFileError(f"cannot write {p}: {e}; the previous {p.name} (if any) is untouched") from e
    patch.path = p
    return p


def load_patch(path: PathLike) -> TablePatch:
    """Read and validate a patch file: structure, metadata, shapes and the sha256 checksum."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"patch file {p} not found; make one with `engram patch train`")
    return patch_from_bytes(p.read_bytes(), p)


def peek_checksum(fd: int, limit: int = 1 << 20) -> Optional[str]:
    """The checksum a patch file's header states (its content's identity), read from open file
    ``fd`` without reading the tensors; None when the header cannot be read (load it to find out why)."""
    try:
        head = os.pread(fd, 8, 0)
        (hlen,) = struct.unpack("<Q", head) if len(head) == 8 else (0,)
        if not 0 < hlen <= limit:
            return None
        header = json.loads(os.pread(fd, hlen, 8).decode("utf-8"))
        return str(json.loads(header["__metadata__"][_META_KEY])["checksum"])
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return None


def patch_from_bytes(data: bytes, p: Path) -> TablePatch:
    """A patch from the bytes of file ``p`` (read once by the caller), validated as :func:`load_patch`."""

    def bad(msg: str) -> PatchFileError:
        return PatchFileError(f"{p}: {msg}")

    if len(data) < 8:
        raise bad(f"only {len(data)} bytes: not an Engram patch (truncated?); re-copy or re-make it")
    (hlen,) = struct.unpack("<Q", data[:8])
    if hlen > len(data) - 8:
        raise bad(f"header of {hlen:,} bytes in a {len(data):,}-byte file: the file is truncated "
                  f"(an interrupted copy?); re-copy it or re-make the patch")
    try:
        header = json.loads(data[8:8 + hlen].decode("utf-8"))
        meta = json.loads(header["__metadata__"][_META_KEY])
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise bad(f"not an Engram patch (no valid {_META_KEY!r} metadata: {e!r}); pass a file "
                  f"written by `engram patch train`") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise bad(f"format is {meta.get('format') if isinstance(meta, dict) else meta!r}, not "
                  f"{FORMAT_NAME!r}; pass a file written by `engram patch train`")
    if not isinstance(meta.get("version"), int) or not 1 <= meta["version"] <= FORMAT_VERSION:
        raise bad(f"patch format version {meta.get('version')!r}; this engram-lm reads versions "
                  f"1..{FORMAT_VERSION}, upgrade engram-lm")
    missing = sorted(_META_KEYS - set(meta))
    if missing:
        raise bad(f"metadata lacks {missing}; the file is damaged, re-make the patch")
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError, RuntimeError, OSError) as e:
        raise bad(f"not a complete safetensors file ({e}); it is truncated or damaged, re-copy it "
                  f"or re-make the patch") from e
    got = _checksum(tensors, meta)
    if got != meta["checksum"] or meta["patch_id"] != meta["checksum"][:16]:
        raise bad(f"checksum mismatch (stored {str(meta['checksum'])[:16]}..., computed {got[:16]}...): "
                  f"the file is corrupted; re-copy it or re-make the patch")
    if meta["dtype"] not in STORAGE_DTYPES or meta["quantization"] not in QUANTIZATIONS:
        raise bad(f"dtype {meta['dtype']!r} / quantization {meta['quantization']!r} unknown")
    layers: dict[int, LayerPatch] = {}
    for key, info in meta["layers"].items():
        lid = int(key)
        try:
            lp = LayerPatch(tensors[f"layer{lid}.rows"], tensors[f"layer{lid}.new"],
                            tensors[f"layer{lid}.old"], tensors.get(f"layer{lid}.scale"),
                            tensors.get(f"layer{lid}.keys"))
        except KeyError as e:
            raise bad(f"layer {lid} lacks tensor {e}; re-make the patch") from None
        except PatchError as e:
            raise bad(f"layer {lid}: {e}") from None
        if lp.old.dtype != value_dtype(meta["dtype"]) or lp.dim != int(info["dim"]) or \
                lp.rows.numel() != int(info["changed"]) or \
                (lp.rows.numel() and (int(lp.rows.min()) < 0 or int(lp.rows.max()) >= int(info["rows"]))) or \
                (lp.keys is not None and meta["version"] < 2):
            raise bad(f"layer {lid}: tensors disagree with the metadata (dtype {DTYPE_NAMES.get(lp.old.dtype)}, "
                      f"dim {lp.dim}, {lp.rows.numel()} rows); re-make the patch")
        layers[lid] = lp
    extra = sorted(set(tensors) - set(_tensors(layers)))
    if extra:
        raise bad(f"unexpected tensors {extra[:5]}; re-make the patch")
    return TablePatch(layers, meta, p)
