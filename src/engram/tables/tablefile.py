"""Engram table files: the N-gram embedding tables of a model, on disk, ready for ``mmap``.

One file holds every Engram layer of a model (a per-layer directory in the header), so one
``--table PATH`` names the whole memory. Layout (all integers little-endian)::

    offset 0    8 bytes   magic b"ENGRAMTB"
    offset 8    u32       format version (1; 2 for fp8 files)
    offset 12   u32       header length L (bytes of UTF-8 JSON)
    offset 16   u32       CRC-32 of the JSON bytes
    offset 20   u32       reserved (0)
    offset 24   L bytes   JSON header (below)
    ...         zero padding up to the first layer's data offset
    data        per layer, starting on a 4096-byte boundary: one record per row, row-major and
                contiguous (row r starts at offset + r * row_bytes). fp32 / bf16 / fp16: the
                row's dim values (row_bytes = dim * itemsize). fp8: the row's dim float8 e4m3
                values (``torch.float8_e4m3fn``) followed by its fp32 scale (row_bytes = dim + 4);
                the row is value * scale, computed in fp32 (see "fp8 rows" below)

JSON header keys: ``format`` ("engram-table"), ``version``, ``dtype`` ("fp32" | "bf16" |
"fp16" | "fp8"), ``byteorder`` ("little"), ``rows`` and ``dim`` (totals: rows summed over layers, the
common row width), ``fingerprint`` (``NgramHasher.fingerprint()``: seeds, orders, heads,
prime sizes, compression map), ``hasher`` (``NgramHasher.describe()``, used to name what
differs on a mismatch), ``file_bytes`` (the exact file size: a torn or truncated file is
caught on open), ``layers`` (a list of ``{layer_id, rows, dim, head_sizes, offset, nbytes,
crc32}``; ``crc32`` is the CRC-32 of the layer's data bytes, or null when the writer did not
see every byte in order, e.g. a sparsely written file), ``created_by`` and free-form ``meta``.
An fp8 file also has ``row_layout`` (:data:`FP8_LAYOUT`: value encoding, scale dtype and
place, bytes per row), checked on open, so that another scale layout is refused rather than
misread.

fp8 rows
    Each row has one fp32 scale, a power of two: the smallest 2^k with amax / 2^k <= 448
    (448 is e4m3's largest finite value), then moved down one step when rounding left the
    largest value at 224, so that the largest stored value is always in (224, 448]. Values
    are ``round_to_e4m3(v / scale)``. A power of two makes ``value * scale`` exact in fp32
    and makes the encoding a fixed point: encoding the decoded rows gives back the same bytes.
    That is what lets a patch be reverted bit for bit, a re-export reproduce the file, and an
    in-memory copy of the rows be fingerprinted as the file is. fp8 files are written with
    format version 2, so a reader that predates them refuses them ("upgrade engram-lm")
    instead of misreading the records; fp32/bf16/fp16 files stay version 1.

Writes are atomic: data goes to ``.NAME.tmp-PID`` beside the target (space reserved up front
with ``posix_fallocate`` so a full disk fails before anything is written), the header is
written last, the file is fsynced and then ``os.replace``-d over the target, and the directory
is fsynced. A crash, a kill or a full disk at any point leaves the previous table untouched.
Opening validates magic, version, header checksum, structure and size, and
:func:`check_compatible` refuses a table whose hash fingerprint or layer shapes differ from a
model's. Every problem is a :class:`TableFileError` (a ``ValueError``) naming the file and the fix.

Shape legend
    R rows of one layer (sum of its heads' prime sizes)    Dh row width (head_dim)
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import struct
import sys
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from engram import __version__
from engram.errors import EngramError
from engram.fsutil import PathLike, fsync_dir

MAGIC = b"ENGRAMTB"
FORMAT_NAME = "engram-table"
FORMAT_VERSION = 2  # the newest version read and written; plain dtypes are still written as 1
_PLAIN_VERSION = 1  # fp32 / bf16 / fp16 files: readable by every engram-lm
FP8_VERSION = 2  # fp8 files: older readers must refuse them
ALIGN = 4096  # data offsets are page-aligned so mmap and O_DIRECT can address them
_PREFIX = struct.Struct("<8sIIII")  # magic, version, header length, header crc32, reserved
_MAX_HEADER = 64 << 20  # a sane bound: a header is a few KiB per layer

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
FP8 = "fp8"
STORAGE_DTYPES = (*DTYPES, FP8)  # what a table file can store; DTYPES are the plain-tensor ones
FP8_MAX = 448.0  # largest finite float8 e4m3fn value
_SCALE_BYTES = 4
FP8_LAYOUT = {"values": "float8_e4m3fn", "scale": "fp32", "scale_per": "row", "scale_at": "end",
              "scale_kind": "power-of-two"}
_HEADER_KEYS = {"format", "version", "dtype", "byteorder", "rows", "dim", "fingerprint", "hasher",
                "file_bytes", "layers", "created_by", "meta"}
_LAYER_KEYS = {"layer_id", "rows", "dim", "head_sizes", "offset", "nbytes", "crc32"}


class TableFileError(EngramError):
    """A table file is missing, not a table, corrupt or truncated; the message names the fix."""


class TableMismatchError(TableFileError):
    """A table file was written for another hash configuration or model shape."""


class TableWriteError(TableFileError):
    """Writing a table failed (e.g. disk full); the previous file at the target is untouched."""


def dtype_from_name(name: str) -> torch.dtype:
    """The torch dtype a table of storage dtype ``name`` is read into exactly (fp8 -> fp32)."""
    if name not in STORAGE_DTYPES:
        raise TableFileError(f"dtype={name!r} is not a table storage dtype; choose one of {sorted(STORAGE_DTYPES)}")
    return torch.float32 if name == FP8 else DTYPES[name]


def value_dtype(name: str) -> torch.dtype:
    """Alias of :func:`dtype_from_name`: the dtype whose values are a table's rows bit for bit."""
    return dtype_from_name(name)


def row_nbytes(name: str, dim: int) -> int:
    """Bytes of one stored row of width ``dim``."""
    if name == FP8:
        return dim + _SCALE_BYTES
    return dim * dtype_from_name(name).itemsize


# ----------------------------------------------------------------------------- fp8 rows
def fp8_encode(values: torch.Tensor) -> torch.Tensor:
    """Rows [n, Dh] (any float dtype) -> fp8 records uint8 [n, Dh + 4] (values, then fp32 scale).

    Power-of-two scale per row (module docstring): decoding is exact and
    ``fp8_encode(fp8_decode(r)) == r`` bit for bit.
    """
    v = values.detach().to("cpu", torch.float32)
    n, dim = v.shape
    amax = v.abs().amax(dim=1) if dim else torch.zeros(n)  # [n]
    if not bool(torch.isfinite(amax).all()):
        bad = int(torch.nonzero(~torch.isfinite(amax))[0])
        raise TableFileError(f"row {bad} holds inf or NaN, which fp8 cannot store; fix the table "
                             f"or keep it as fp32/bf16")
    # smallest 2^k >= amax / 448: frexp gives amax/448 = m * 2^e with m in [0.5, 1)
    m, e = torch.frexp(amax / FP8_MAX)
    k = torch.where(m == 0.5, e - 1, e)
    scale = torch.where(amax > 0, torch.ldexp(torch.ones(n), k.to(torch.float32)), torch.ones(n))
    q = (v / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)  # [n, Dh]
    # Rounding can leave the largest value at 224 (e.g. 225 -> 224); re-encoding the decoded row
    # would then pick scale / 2. Take that form now (doubling an e4m3 value is exact).
    low = (q.float().abs().amax(dim=1) == FP8_MAX / 2) if dim else torch.zeros(n, dtype=torch.bool)
    if bool(low.any()):
        q[low] = (q[low].float() * 2).to(torch.float8_e4m3fn)
        scale[low] = scale[low] / 2
    out = torch.empty(n, dim + _SCALE_BYTES, dtype=torch.uint8)
    out[:, :dim] = q.view(torch.uint8)
    out[:, dim:] = scale.view(torch.uint8).view(n, _SCALE_BYTES)
    return out


def fp8_decode(records: torch.Tensor, dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """fp8 records uint8 [n, Dh + 4] -> rows [n, Dh] in ``dtype`` (exact in fp32)."""
    n = records.shape[0]
    q = records[:, :dim].contiguous()  # [n, Dh] e4m3 bits
    scale = torch.empty(n, _SCALE_BYTES, dtype=torch.uint8).copy_(records[:, dim:]).view(torch.float32)  # [n, 1]
    out = _e4m3_to_fp32(q).mul_(scale)
    return out if dtype == torch.float32 else out.to(dtype)


_SIGN_AND_LOW7 = -2013265921  # 0x87FFFFFF as an int32: the sign bit and the 27 bits below the exponent's top 4


def _e4m3_to_fp32(q: torch.Tensor) -> torch.Tensor:
    """e4m3 bit patterns uint8 [...] -> their values as fp32 (exact; no NaN patterns expected).

    The 7 bits below the sign (eeee mmm) are moved to the bottom of fp32's exponent and the top
    of its mantissa, the sign to fp32's sign: that is the e4m3 value times 2^-120 (subnormals
    included), and one exact multiply restores it. torch's own float8 conversion is scalar on
    CPUs and about 6x slower; it is the cost of every fp8 row a tier serves.
    """
    bits = (q.view(torch.int8).to(torch.int32) << 20).bitwise_and_(_SIGN_AND_LOW7)
    return bits.view(torch.float32).mul_(2.0 ** 120)


def encode_records(values: torch.Tensor, name: str) -> torch.Tensor:
    """Rows [n, Dh] -> their stored records uint8 [n, row_bytes] in storage dtype ``name``."""
    if name == FP8:
        return fp8_encode(values)
    t = values.detach().to("cpu", dtype_from_name(name)).contiguous()
    return t.view(torch.uint8).view(t.shape[0], -1)


def decode_records(records: torch.Tensor, name: str, dim: int, dtype: Optional[torch.dtype] = None
                ) -> torch.Tensor:
    """Stored records uint8 [n, row_bytes] -> rows [n, Dh] in ``dtype`` (default: the table's
    value dtype, in which they are exact; a view of ``records`` for plain dtypes when possible)."""
    vdt = dtype_from_name(name)
    if name == FP8:
        return fp8_decode(records, dim, dtype or vdt)
    t = records.contiguous().view(vdt).view(records.shape[0], dim)
    return t if dtype is None or dtype == vdt else t.to(dtype)


def storage_bytes(values: torch.Tensor, name: str) -> memoryview:
    """Rows as the bytes a ``name`` table file stores them (what its CRC-32 is taken over)."""
    if name == FP8:
        return memoryview(fp8_encode(values).numpy()).cast("B")
    return as_bytes(values, dtype_from_name(name))


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


# ----------------------------------------------------------------------------- header model
@dataclass(frozen=True)
class LayerInfo:
    """Where one Engram layer's rows live in the file."""

    layer_id: int
    rows: int
    dim: int
    head_sizes: tuple[int, ...]
    offset: int
    nbytes: int
    crc32: Optional[int] = None

    def to_dict(self) -> dict[str, Any]:
        return {"layer_id": self.layer_id, "rows": self.rows, "dim": self.dim,
                "head_sizes": list(self.head_sizes), "offset": self.offset, "nbytes": self.nbytes,
                "crc32": self.crc32}


@dataclass
class TableHeader:
    """The parsed JSON header of a table file (see the module docstring)."""

    path: Path
    version: int
    dtype: str
    fingerprint: str
    layers: dict[int, LayerInfo]
    file_bytes: int
    hasher: Optional[dict[str, Any]] = None
    created_by: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def torch_dtype(self) -> torch.dtype:
        """The dtype rows are read into exactly (fp8 files: fp32, the dequantised rows)."""
        return dtype_from_name(self.dtype)

    @property
    def itemsize(self) -> int:
        """Bytes per stored value (fp8: 1; its per-row scale is in ``row_bytes``)."""
        return 1 if self.dtype == FP8 else self.torch_dtype.itemsize

    @property
    def row_bytes(self) -> int:
        """Bytes of one stored row (fp8: values and scale)."""
        return row_nbytes(self.dtype, self.dim)

    @property
    def rows(self) -> int:
        return sum(l.rows for l in self.layers.values())

    @property
    def dim(self) -> int:
        return next(iter(self.layers.values())).dim

    @property
    def data_bytes(self) -> int:
        return sum(l.nbytes for l in self.layers.values())

    def layer(self, layer_id: int) -> LayerInfo:
        if layer_id not in self.layers:
            raise TableMismatchError(f"{self.path} has no table for Engram layer {layer_id} (it holds "
                                     f"layers {sorted(self.layers)}); export the table from the model "
                                     f"you are using")
        return self.layers[layer_id]

    def summary(self) -> dict[str, Any]:
        """JSON-able description for ``engram table inspect``."""
        return {
            "path": str(self.path), "format": FORMAT_NAME, "version": self.version, "dtype": self.dtype,
            "rows": self.rows, "dim": self.dim, "file_bytes": self.file_bytes,
            "data_bytes": self.data_bytes, "fingerprint": self.fingerprint,
            "created_by": self.created_by, "meta": self.meta,
            "layers": [l.to_dict() for l in self.layers.values()],
        }


def layer_specs_for(hasher: Any) -> list[tuple[int, int, tuple[int, ...]]]:
    """(layer_id, rows, head_sizes) of every Engram layer of ``hasher`` (an ``NgramHasher``)."""
    out = []
    for lid in hasher.cfg.layer_ids:
        sizes = tuple(int(s) for s in hasher.head_sizes(lid))
        out.append((int(lid), sum(sizes), sizes))
    return out


def _plan_layers(specs: Iterable[tuple[int, int, tuple[int, ...]]], dim: int, row_bytes: int,
                 header_room: int) -> list[LayerInfo]:
    layers, offset = [], _align(header_room)
    for lid, rows, sizes in specs:
        nbytes = int(rows) * row_bytes
        layers.append(LayerInfo(int(lid), int(rows), dim, tuple(sizes), offset, nbytes))
        offset = _align(offset + nbytes)
    return layers


def _header_json(dtype: str, fingerprint: str, hasher: Optional[Mapping[str, Any]],
                 layers: list[LayerInfo], file_bytes: int, meta: Mapping[str, Any]) -> bytes:
    rec = {
        "format": FORMAT_NAME, "version": _version_for(dtype), "dtype": dtype, "byteorder": "little",
        "rows": sum(l.rows for l in layers), "dim": layers[0].dim if layers else 0,
        "fingerprint": fingerprint, "hasher": dict(hasher) if hasher is not None else None,
        "file_bytes": file_bytes, "layers": [l.to_dict() for l in layers],
        "created_by": f"engram-lm {__version__}", "meta": dict(meta),
    }
    if dtype == FP8:
        rec["row_layout"] = {**FP8_LAYOUT, "row_bytes": row_nbytes(dtype, rec["dim"])}
    return json.dumps(rec, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _version_for(dtype: str) -> int:
    return FP8_VERSION if dtype == FP8 else _PLAIN_VERSION


# ----------------------------------------------------------------------------- writing
def _tmp_name(path: Path, pid: Optional[int] = None) -> Path:
    return path.with_name(f".{path.name}.tmp-{pid if pid is not None else os.getpid()}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _remove_stale_tmp(path: Path) -> None:
    """Temp files of writers that died (killed mid-write) would otherwise pile up."""
    prefix = f".{path.name}.tmp-"
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return
    for p in entries:
        if p.name.startswith(prefix) and p.name[len(prefix):].isdigit():
            pid = int(p.name[len(prefix):])
            if pid == os.getpid() or not _pid_alive(pid):
                try:
                    p.unlink()
                except OSError:
                    pass


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, offset)
        if n <= 0:  # pragma: no cover - the kernel raises instead
            raise OSError(errno.EIO, "short write")
        data, offset = data[n:], offset + n


def as_bytes(values: torch.Tensor, dtype: Optional[torch.dtype] = None) -> memoryview:
    """A tensor as raw little-endian bytes, in ``dtype`` (default: its own); no copy when it is
    already a contiguous CPU tensor of that dtype."""
    t = values.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.to(dtype or t.dtype).contiguous()
    return memoryview(t.view(torch.uint8).numpy()).cast("B")


class TableWriter:
    """Writes a table file atomically; use as a context manager or call :meth:`commit`.

    ``specs``: (layer_id, rows, head_sizes) per layer, in file order. Rows are written with
    :meth:`write` (any order; sequential writes from row 0 also compute each layer's CRC-32) or
    :meth:`write_rows` (scattered rows, for sparse files: unwritten rows read as zeros).
    ``preallocate=True`` reserves the whole file first so that a full disk fails immediately;
    pass False for a sparse file. ``drop_cache=True`` evicts written pages from the page cache
    as it goes (large files would otherwise push everything else out of RAM).
    """

    def __init__(self, path: PathLike, specs: Iterable[tuple[int, int, Iterable[int]]], dim: int,
                 dtype: str = "fp32", *, fingerprint: str, hasher: Optional[Mapping[str, Any]] = None,
                 meta: Optional[Mapping[str, Any]] = None, preallocate: bool = True,
                 drop_cache: bool = False) -> None:
        self.path = Path(path)
        self.dtype_name = dtype
        self.dtype = dtype_from_name(dtype)  # the dtype rows are exact in (fp8: fp32)
        if dim < 1:
            raise TableFileError(f"dim={dim} must be >= 1")
        self.row_bytes = row_nbytes(dtype, dim)
        if not isinstance(fingerprint, str) or not fingerprint:
            raise TableFileError("fingerprint must be the hasher's fingerprint (a non-empty string); "
                                 "pass model.hasher.fingerprint()")
        specs = [(int(l), int(r), tuple(int(s) for s in h)) for l, r, h in specs]
        if not specs:
            raise TableFileError("a table file needs at least one Engram layer")
        for lid, rows, sizes in specs:
            if rows < 1 or (sizes and sum(sizes) != rows):
                raise TableFileError(f"layer {lid}: rows={rows} must be >= 1 and equal the sum of "
                                     f"head_sizes ({sum(sizes)})")
        if len({s[0] for s in specs}) != len(specs):
            raise TableFileError(f"duplicate layer ids in {[s[0] for s in specs]}")
        self.fingerprint, self.hasher, self.meta = fingerprint, hasher, dict(meta or {})
        # Plan with a generous header reservation, then fix it: the header size depends on offsets.
        probe = _header_json(dtype, fingerprint, hasher, _plan_layers(specs, dim, self.row_bytes, 0),
                             0, self.meta)
        room = _PREFIX.size + len(probe) + 256 + 64 * len(specs)  # digits grow when offsets are filled
        self.layers = _plan_layers(specs, dim, self.row_bytes, room)
        self._room = room
        last = self.layers[-1]
        self.file_bytes = last.offset + last.nbytes
        self._by_id = {l.layer_id: i for i, l in enumerate(self.layers)}
        self._crc = [0] * len(self.layers)
        self._next_row = [0] * len(self.layers)  # sequential-write cursor for the CRC
        self._crc_valid = [True] * len(self.layers)
        self._drop_cache = drop_cache
        self._dirty = 0
        self._fd: Optional[int] = None
        self._done = False

        self.path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_tmp(self.path)
        self.tmp = _tmp_name(self.path)
        try:
            self._fd = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            if preallocate and hasattr(os, "posix_fallocate"):
                os.posix_fallocate(self._fd, 0, self.file_bytes)
            else:
                os.ftruncate(self._fd, self.file_bytes)
        except OSError as e:
            self.abort()
            raise self._write_error(e) from e

    # ------------------------------------------------------------------ errors
    def _write_error(self, e: OSError) -> TableWriteError:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return TableWriteError(
                f"cannot write {self.path}: no space left on device ({self.file_bytes:,} bytes needed "
                f"in {self.path.parent}); free some space or write elsewhere. The previous "
                f"{self.path.name} (if any) is untouched")
        return TableWriteError(f"cannot write {self.path}: {e}; the previous {self.path.name} "
                               f"(if any) is untouched")

    # ------------------------------------------------------------------ data
    def write(self, layer_id: int, start_row: int, values: torch.Tensor) -> None:
        """Rows ``start_row .. start_row + len(values)`` of a layer: values [n, Dh], any float dtype
        (encoded into the file's storage dtype: rounded, or fp8-quantised with per-row scales)."""
        _, info = self._layer(layer_id)
        self._check_values(info, values)
        self.write_records(layer_id, start_row, encode_records(values, self.dtype_name))

    def write_records(self, layer_id: int, start_row: int, records: torch.Tensor) -> None:
        """Rows already encoded for this file: uint8 [n, row_bytes] (from :func:`iter_layer_records`
        of a file of the same dtype, or :func:`encode_records`); written as they are."""
        i, info = self._layer(layer_id)
        if records.dtype != torch.uint8 or records.dim() != 2 or records.shape[1] != self.row_bytes:
            raise TableFileError(f"layer {layer_id}: records must be uint8 [n, {self.row_bytes}], got "
                                 f"{records.dtype} {tuple(records.shape)}")
        n = records.shape[0]
        if not 0 <= start_row <= info.rows - n:
            raise TableFileError(f"layer {layer_id}: rows [{start_row}, {start_row + n}) fall outside "
                                 f"[0, {info.rows})")
        data = memoryview(records.contiguous().numpy()).cast("B")
        if self._crc_valid[i] and start_row == self._next_row[i]:
            self._crc[i] = zlib.crc32(data, self._crc[i])
            self._next_row[i] += n
        else:
            self._crc_valid[i] = False
        self._pwrite(data, info.offset + start_row * self.row_bytes)

    def write_rows(self, layer_id: int, rows: torch.Tensor, values: torch.Tensor) -> None:
        """Scattered rows (e.g. only the rows a corpus touches): rows [n] int, values [n, Dh].

        The layer's checksum is then unknown (``crc32: null``); unwritten rows read as zeros.
        """
        i, info = self._layer(layer_id)
        self._check_values(info, values)
        rows = torch.as_tensor(rows, dtype=torch.int64).reshape(-1)
        if rows.numel() != values.shape[0]:
            raise TableFileError(f"write_rows: {rows.numel()} row ids but {values.shape[0]} value rows")
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= info.rows):
            raise TableFileError(f"layer {layer_id}: row ids must be in [0, {info.rows})")
        self._crc_valid[i] = False
        order = torch.argsort(rows)
        rows, values = rows[order], values[order]
        data = memoryview(encode_records(values, self.dtype_name).numpy()).cast("B")
        row_bytes = self.row_bytes
        # Coalesce runs of consecutive rows into one write each.
        r = rows.numpy()
        breaks = np.flatnonzero(np.diff(r) != 1) + 1
        starts = np.concatenate([[0], breaks])
        ends = np.concatenate([breaks, [len(r)]])
        for s, e in zip(starts.tolist(), ends.tolist()):
            self._pwrite(data[s * row_bytes:e * row_bytes], info.offset + int(r[s]) * row_bytes)

    def _layer(self, layer_id: int) -> tuple[int, LayerInfo]:
        if layer_id not in self._by_id:
            raise TableFileError(f"layer {layer_id} is not in this table (layers {sorted(self._by_id)})")
        if self._fd is None:
            raise TableFileError(f"the writer for {self.path} is closed")
        i = self._by_id[layer_id]
        return i, self.layers[i]

    @staticmethod
    def _check_values(info: LayerInfo, values: torch.Tensor) -> None:
        if values.dim() != 2 or values.shape[1] != info.dim or not values.dtype.is_floating_point:
            raise TableFileError(f"layer {info.layer_id}: values must be a float tensor [n, {info.dim}], "
                                 f"got {values.dtype} {tuple(values.shape)}")

    def _pwrite(self, data: memoryview, offset: int) -> None:
        assert self._fd is not None
        try:
            _pwrite_all(self._fd, data, offset)
            self._dirty += len(data)
            if self._drop_cache and self._dirty >= (256 << 20):
                os.fdatasync(self._fd)  # written pages must be clean before they can be dropped
                os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)
                self._dirty = 0
        except OSError as e:
            self.abort()
            raise self._write_error(e) from e

    # ------------------------------------------------------------------ commit / abort
    def commit(self) -> TableHeader:
        """Write the header, fsync, and atomically move the file into place."""
        if self._done:
            raise TableFileError(f"the writer for {self.path} was already committed or aborted")
        layers = [LayerInfo(l.layer_id, l.rows, l.dim, l.head_sizes, l.offset, l.nbytes,
                            self._crc[i] if self._crc_valid[i] and self._next_row[i] == l.rows else None)
                  for i, l in enumerate(self.layers)]
        blob = _header_json(self.dtype_name, self.fingerprint, self.hasher, layers, self.file_bytes,
                            self.meta)
        if _PREFIX.size + len(blob) > self._room:  # pragma: no cover - the room has slack
            self.abort()
            raise TableWriteError(f"internal error: header of {len(blob)} bytes overflows its reservation")
        prefix = _PREFIX.pack(MAGIC, _version_for(self.dtype_name), len(blob), zlib.crc32(blob), 0)
        self._pwrite(memoryview(prefix + blob), 0)
        assert self._fd is not None
        try:
            os.fsync(self._fd)
            if self._drop_cache:
                os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(self._fd)
            self._fd = None
            os.replace(self.tmp, self.path)
        except OSError as e:
            self.abort()
            raise self._write_error(e) from e
        fsync_dir(self.path.parent)
        self._done = True
        return read_header(self.path)

    def abort(self) -> None:
        """Drop the temp file; the target is untouched."""
        self._done = True
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None
        try:
            self.tmp.unlink()
        except (OSError, AttributeError):
            pass

    def __enter__(self) -> "TableWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            if not self._done:
                self.commit()
        else:
            self.abort()


def write_table(path: PathLike, tables: Mapping[int, torch.Tensor], *, fingerprint: str,
                head_sizes: Mapping[int, Iterable[int]], dtype: str = "fp32",
                hasher: Optional[Mapping[str, Any]] = None, meta: Optional[Mapping[str, Any]] = None,
                chunk_rows: int = 1 << 18, progress: bool = False) -> TableHeader:
    """Write in-memory tables ``{layer_id: [R, Dh]}`` (e.g. a model's) atomically; returns the header."""
    if not tables:
        raise TableFileError("no tables to write; is this an Engram model?")
    dims = {int(t.shape[1]) for t in tables.values()}
    if len(dims) != 1:
        raise TableFileError(f"all layers must share one row width, got {sorted(dims)}")
    dim = dims.pop()
    specs = [(lid, int(t.shape[0]), tuple(head_sizes[lid])) for lid, t in tables.items()]
    total = sum(int(t.shape[0]) for t in tables.values())
    with TableWriter(path, specs, dim, dtype, fingerprint=fingerprint, hasher=hasher, meta=meta) as w, \
            tqdm(total=total, desc=f"write {Path(path).name}", unit="row", unit_scale=True,
                 disable=not progress, leave=False) as bar:
        for lid, t in tables.items():
            for start in range(0, t.shape[0], chunk_rows):
                chunk = t[start:start + chunk_rows]
                w.write(lid, start, chunk)
                bar.update(chunk.shape[0])
    return read_header(path)


def model_tables(model: Any) -> dict[int, torch.Tensor]:
    """{layer_id: table weight [R, Dh]} of an ``EngramLM`` with in-memory tables."""
    return {e.layer_id: e.table.weight.detach() for e in model.engram_layers}


def save_model_tables(model: Any, path: PathLike, dtype: str = "fp32", *,
                      meta: Optional[Mapping[str, Any]] = None, progress: bool = False) -> TableHeader:
    """Write the Engram tables of ``model`` (an ``EngramLM``) to a table file."""
    if model.hasher is None:
        raise TableFileError("the model has no Engram layers, so it has no tables to save")
    tables = model_tables(model)
    return write_table(path, tables, fingerprint=model.hasher.fingerprint(), dtype=dtype,
                       head_sizes={lid: model.hasher.head_sizes(lid) for lid in tables},
                       hasher=model.hasher.describe(), meta=meta, progress=progress)


# ----------------------------------------------------------------------------- reading
def read_header(path: PathLike) -> TableHeader:
    """Parse and validate a table file's header (no table data is read)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"table file {p} not found; create one with `engram table convert RUN {p}`")
    size = p.stat().st_size
    with open(p, "rb") as f:
        prefix = f.read(_PREFIX.size)
        if len(prefix) < _PREFIX.size or prefix[:8] != MAGIC:
            hint = (" (it is a temp file of an interrupted write; delete it)" if ".tmp-" in p.name else "")
            raise TableFileError(f"{p} is not an Engram table file (bad magic {prefix[:8]!r}){hint}; "
                                 f"pass a file written by `engram table convert`")
        _, version, hlen, hcrc, _ = _PREFIX.unpack(prefix)
        if version < 1 or version > FORMAT_VERSION:
            raise TableFileError(f"{p}: table format version {version}; this engram-lm reads versions "
                                 f"1..{FORMAT_VERSION}, upgrade engram-lm or re-export the table")
        if hlen < 2 or hlen > _MAX_HEADER or _PREFIX.size + hlen > size:
            raise TableFileError(f"{p}: header length {hlen} is impossible for a {size}-byte file; "
                                 f"the file is truncated or damaged, re-export it")
        blob = f.read(hlen)
    if zlib.crc32(blob) != hcrc:
        raise TableFileError(f"{p}: header checksum mismatch (stored {hcrc:#010x}, computed "
                             f"{zlib.crc32(blob):#010x}); the file is damaged, re-export it")
    try:
        raw = json.loads(blob.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TableFileError(f"{p}: header is not valid JSON ({e}); re-export the table") from e
    return _parse_header(p, raw, size)


def _parse_header(p: Path, raw: Any, size: int) -> TableHeader:
    def bad(msg: str) -> TableFileError:
        return TableFileError(f"{p}: {msg}; the header is inconsistent, re-export the table")

    if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
        raise bad(f"format is {raw.get('format') if isinstance(raw, dict) else raw!r}, not {FORMAT_NAME!r}")
    missing = sorted(_HEADER_KEYS - set(raw))
    if missing:
        raise bad(f"missing header keys {missing}")
    if raw["dtype"] not in STORAGE_DTYPES:
        raise bad(f"dtype {raw['dtype']!r} is not one of {sorted(STORAGE_DTYPES)}")
    if raw["dtype"] == FP8:
        if raw["version"] < FP8_VERSION:
            raise bad(f"dtype fp8 in a version-{raw['version']} header (fp8 needs version {FP8_VERSION})")
        layout = raw.get("row_layout")
        want = {**FP8_LAYOUT, "row_bytes": row_nbytes(FP8, int(raw["dim"]))}
        if layout != want:
            raise TableFileError(f"{p}: fp8 row layout {layout!r} is not the one this engram-lm reads "
                                 f"({want!r}); upgrade engram-lm or re-convert the table")
    if raw["byteorder"] != "little" or sys.byteorder != "little":
        raise TableFileError(f"{p}: stored {raw['byteorder']}-endian, this machine is {sys.byteorder}-"
                             f"endian; convert the table on a little-endian machine")
    if not isinstance(raw["fingerprint"], str) or not raw["fingerprint"]:
        raise bad("fingerprint is missing")
    if raw["file_bytes"] != size:
        raise TableFileError(
            f"{p} is {size:,} bytes but its header records {raw['file_bytes']:,}: the file is "
            f"{'truncated (an interrupted copy or write?)' if size < raw['file_bytes'] else 'padded or overwritten'}"
            f"; restore it or re-export the table")
    layers: dict[int, LayerInfo] = {}
    if not isinstance(raw["layers"], list) or not raw["layers"]:
        raise bad("no layers")
    for entry in raw["layers"]:
        if not isinstance(entry, dict) or _LAYER_KEYS - set(entry):
            raise bad(f"layer entry {entry!r} lacks {sorted(_LAYER_KEYS - set(entry or {}))}")
        info = LayerInfo(int(entry["layer_id"]), int(entry["rows"]), int(entry["dim"]),
                         tuple(int(s) for s in entry["head_sizes"]), int(entry["offset"]),
                         int(entry["nbytes"]), entry["crc32"])
        if info.rows < 1 or info.dim < 1 or info.nbytes != info.rows * row_nbytes(raw["dtype"], info.dim):
            raise bad(f"layer {info.layer_id}: {info.nbytes} bytes for {info.rows} x {info.dim} {raw['dtype']}")
        if info.head_sizes and sum(info.head_sizes) != info.rows:
            raise bad(f"layer {info.layer_id}: head sizes sum to {sum(info.head_sizes)}, rows={info.rows}")
        if info.offset % ALIGN or info.offset + info.nbytes > size or info.offset < _PREFIX.size:
            raise bad(f"layer {info.layer_id}: data [{info.offset}, {info.offset + info.nbytes}) is "
                      f"misaligned or outside the {size}-byte file")
        if info.layer_id in layers:
            raise bad(f"layer {info.layer_id} appears twice")
        layers[info.layer_id] = info
    spans = sorted((l.offset, l.offset + l.nbytes) for l in layers.values())
    if any(a_end > b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:])):
        raise bad("layer data regions overlap")
    dims = {l.dim for l in layers.values()}
    if len(dims) != 1 or raw["dim"] != dims.pop() or raw["rows"] != sum(l.rows for l in layers.values()):
        raise bad("rows/dim totals disagree with the layers")
    return TableHeader(path=p, version=int(raw["version"]), dtype=raw["dtype"],
                       fingerprint=raw["fingerprint"], layers=layers, file_bytes=size,
                       hasher=raw.get("hasher"), created_by=str(raw.get("created_by", "")),
                       meta=dict(raw.get("meta") or {}))


def _hasher_diff(table: Optional[Mapping[str, Any]], model: Optional[Mapping[str, Any]]) -> str:
    if not table or not model:
        return ""
    diffs = []
    keys = sorted(set(table) | set(model))
    for k in keys:
        a, b = table.get(k), model.get(k)
        if k == "fingerprint" or a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            for sk in sorted(set(a) | set(b)):
                if a.get(sk) != b.get(sk):
                    diffs.append(f"{k}.{sk}: table {_short(a.get(sk))}, model {_short(b.get(sk))}")
        else:
            diffs.append(f"{k}: table {_short(a)}, model {_short(b)}")
    return "; ".join(diffs[:6])


def _short(v: Any) -> str:
    s = json.dumps(v) if not isinstance(v, str) else repr(v)
    return s if len(s) <= 40 else s[:37] + "..."


def check_compatible(header: TableHeader, hasher: Any, dim: Optional[int] = None) -> None:
    """Refuse a table indexed by another hash (fingerprint) or shaped for another model."""
    fp = hasher.fingerprint()
    if header.fingerprint != fp:
        diff = _hasher_diff(header.hasher, hasher.describe())
        raise TableMismatchError(
            f"{header.path} was written for hash configuration {header.fingerprint[:16]}... but the "
            f"model hashes with {fp[:16]}...{' (' + diff + ')' if diff else ''}. Its rows would be "
            f"looked up at the wrong places: use the table exported from this model "
            f"(`engram table convert RUN TABLE`) or the model the table came from")
    for lid, rows, sizes in layer_specs_for(hasher):
        info = header.layer(lid)
        if info.rows != rows or info.head_sizes != sizes:
            raise TableMismatchError(f"{header.path}: layer {lid} has {info.rows} rows (heads "
                                     f"{list(info.head_sizes)[:4]}...) but the model needs {rows}; "
                                     f"re-export the table from this model")
        if dim is not None and info.dim != dim:
            raise TableMismatchError(f"{header.path}: layer {lid} rows are {info.dim} wide but the model's "
                                     f"head_dim is {dim}; re-export the table from this model")
    extra = sorted(set(header.layers) - set(int(l) for l in hasher.cfg.layer_ids))
    if extra:
        raise TableMismatchError(f"{header.path} holds layers {extra} the model does not have; "
                                 f"re-export the table from this model")


def open_table(path: PathLike, hasher: Any = None, dim: Optional[int] = None) -> TableHeader:
    """Read and validate the header; with ``hasher`` also check it belongs to that hash config."""
    header = read_header(path)
    if hasher is not None:
        check_compatible(header, hasher, dim)
    return header


def iter_layer_chunks(header: TableHeader, layer_id: int, chunk_rows: int = 1 << 18
                      ) -> Iterator[tuple[int, torch.Tensor]]:
    """(start_row, rows [n, Dh] in ``header.torch_dtype``) over one layer: the stored values
    (fp8 files: dequantised, exact in fp32), read with plain reads."""
    dim = header.layer(layer_id).dim
    for start, rec in iter_layer_records(header, layer_id, chunk_rows):
        yield start, decode_records(rec, header.dtype, dim)


def iter_layer_records(header: TableHeader, layer_id: int, chunk_rows: int = 1 << 18
                       ) -> Iterator[tuple[int, torch.Tensor]]:
    """(start_row, stored rows uint8 [n, row_bytes]) over one layer: the file's bytes as they are."""
    info = header.layer(layer_id)
    row_bytes = row_nbytes(header.dtype, info.dim)
    with open(header.path, "rb", buffering=0) as f:
        for start in range(0, info.rows, chunk_rows):
            n = min(chunk_rows, info.rows - start)
            buf = bytearray(n * row_bytes)
            f.seek(info.offset + start * row_bytes)
            got = f.readinto(buf)
            if got != len(buf):
                raise TableFileError(f"{header.path}: short read in layer {layer_id}; the file is truncated")
            yield start, torch.frombuffer(buf, dtype=torch.uint8).view(n, row_bytes)


def read_layer(header: TableHeader, layer_id: int, dtype: torch.dtype = torch.float32,
               progress: bool = False) -> torch.Tensor:
    """One layer's whole table in memory as ``dtype`` [R, Dh]."""
    info = header.layer(layer_id)
    out = torch.empty(info.rows, info.dim, dtype=dtype)
    with tqdm(total=info.rows, desc=f"read layer {layer_id}", unit="row", unit_scale=True,
              disable=not progress, leave=False) as bar:
        for start, chunk in iter_layer_chunks(header, layer_id):
            out[start:start + chunk.shape[0]].copy_(chunk)
            bar.update(chunk.shape[0])
    return out


def layer_crc32(header: TableHeader, layer_id: int,
                on_bytes: Optional[Callable[[int], Any]] = None) -> int:
    """CRC-32 of one layer's data as stored, streamed in chunks; ``on_bytes(n)`` after each."""
    crc = 0
    for _, chunk in iter_layer_records(header, layer_id):
        data = as_bytes(chunk)
        crc = zlib.crc32(data, crc)
        if on_bytes is not None:
            on_bytes(len(data))
    return crc


def verify_checksums(header: TableHeader, progress: bool = False) -> dict[int, Optional[bool]]:
    """Re-read every layer and compare its CRC-32: {layer_id: True, or None when none was stored}.

    Raises :class:`TableFileError` naming the first damaged layer.
    """
    result: dict[int, Optional[bool]] = {}
    with tqdm(total=header.data_bytes, desc="verify", unit="B", unit_scale=True,
              disable=not progress, leave=False) as bar:
        for lid, info in header.layers.items():
            if info.crc32 is None:
                result[lid] = None
                bar.update(info.nbytes)
                continue
            crc = layer_crc32(header, lid, on_bytes=bar.update)
            if crc != info.crc32:
                raise TableFileError(f"{header.path}: layer {lid} data checksum mismatch (stored "
                                     f"{info.crc32:#010x}, computed {crc:#010x}); the file is damaged, "
                                     f"restore it or re-export the table")
            result[lid] = True
    return result


def map_layer(header: TableHeader, layer_id: int) -> tuple[mmap.mmap, torch.Tensor]:
    """(the mmap, a tensor view of the layer's stored rows). Never write to it.

    The view is [R, Dh] in the storage dtype for fp32/bf16/fp16 files, and the raw records
    uint8 [R, Dh + 4] for fp8 files (decode gathered rows with :func:`decode_records`).

    The mapping is read-only and shared (``ACCESS_READ``): a private writable mapping would be
    charged against the commit limit, so a table larger than RAM could not be mapped at all
    (ENOMEM), and a write to the view faults instead of silently copying pages.
    """
    info = header.layer(layer_id)
    gran = mmap.ALLOCATIONGRANULARITY
    start = info.offset - info.offset % gran
    delta = info.offset - start
    with open(header.path, "rb") as f:
        mm = mmap.mmap(f.fileno(), delta + info.nbytes, access=mmap.ACCESS_READ, offset=start)
    with warnings.catch_warnings():  # torch warns that the buffer is read-only: that is the point
        warnings.simplefilter("ignore", UserWarning)
        if header.dtype == FP8:
            rb = row_nbytes(FP8, info.dim)
            view = torch.frombuffer(mm, dtype=torch.uint8, count=info.rows * rb, offset=delta).view(info.rows, rb)
        else:
            view = torch.frombuffer(mm, dtype=header.torch_dtype, count=info.rows * info.dim,
                                    offset=delta).view(info.rows, info.dim)
    return mm, view
