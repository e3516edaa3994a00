"""Patch files by id from one directory, checked once, cached in an LRU bounded in bytes, reloaded on change.

A patch's id is its file name without ``.engp`` (``acme.engp`` is ``acme``): it stays the same
when the file is replaced by a newer version, which is how a tenant's knowledge is updated while
the server runs. Ids are ``[A-Za-z0-9][A-Za-z0-9._-]*`` (no path can be named).

Each request opens the file once and reads everything it needs through that descriptor, so a
file replaced by ``os.replace`` (every writer of this library, e.g. ``engram patch train``) is
read wholly old or wholly new, never a mix. It first reads only the header's checksum (the
content's identity): the cached version is used while the checksum is the same, and a changed
file is loaded in full and replaces the cached version for every later request. A file rewritten
in place and caught half-written fails its checksum and the request gets 503 (retry); the last
good version is not served as if it were current. A request holds the versions it resolved until
it ends.

Checked at load: the hash configuration and the layer shapes (a sound patch made for another
model is 409). Which table content (and dtype) each patch was made for, its base fingerprint, is
checked per request against the stack it is in (``engram.patches.overlay.check_stack``): made on
the served table, or on a patch listed before it (else 409).

Memory: the cache holds at most ``cache_bytes`` of loaded patches (their tensors: rows, new and
old values, and the overlay's values where they are not the new values themselves);
least-recently-used patches are dropped first. A patch larger than the whole budget is refused
(507). Patches in use by requests in flight stay alive until those requests end, so the bound
on the process is ``cache_bytes`` plus the stacks of the requests in flight.
"""

from __future__ import annotations

import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from engram.errors import EngramError, NotFoundError
from engram.fsutil import PathLike
from engram.patches.patchfile import SUFFIX, PatchError, PatchFileError, TablePatch, patch_from_bytes, peek_checksum

PATCH_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class PatchUnavailableError(EngramError):
    """A patch file that exists but cannot be read now (being rewritten in place, damaged)."""

    http_status = 503


class PatchConflictError(EngramError):
    """A patch (or a stack of them) made for another table than the one served."""

    http_status = 409


class PatchTooLargeError(EngramError):
    """A patch larger than the whole cache budget."""

    http_status = 507


class BadPatchIdError(EngramError):
    """A patch id that is not a plain name."""


@dataclass(frozen=True)
class LoadedPatch:
    """One version of one patch file, checked against the served model."""

    id: str  # the file name without .engp
    patch: TablePatch
    nbytes: int  # tensors held: payload plus overlay values that are not the new values themselves


def _nbytes(patch: TablePatch) -> int:
    seen: set[int] = set()
    total = 0
    tensors = [t for lp in patch.layers.values() for t in (lp.rows, lp.new, lp.old, lp.scale) if t is not None]
    tensors += [t for ov in patch.overlays().values() for t in ov]
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


class PatchStore:
    """Patches of ``directory`` by id for ``model`` (see the module docstring)."""

    def __init__(self, directory: PathLike, model: Any, cache_bytes: int) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise NotFoundError(f"patch directory {self.directory} does not exist; create it and put "
                                f".engp files in it (`engram patch train --out DIR/NAME.engp`)")
        if cache_bytes < 1:
            raise EngramError(f"cache_bytes={cache_bytes} must be >= 1")
        self.model, self.cache_bytes = model, int(cache_bytes)
        self._cache: OrderedDict[str, LoadedPatch] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.peak_bytes = 0
        self.loads = self.hits = self.reloads = self.evictions = 0

    def path(self, patch_id: str) -> Path:
        if not isinstance(patch_id, str) or not PATCH_ID.match(patch_id):
            raise BadPatchIdError(f"patch id {patch_id!r} is not a plain name ([A-Za-z0-9._-], not starting "
                                  f"with '.' or '-'); ids are the .engp file names in the patch directory")
        return self.directory / (patch_id + SUFFIX)

    def ids(self) -> list[str]:
        """The ids of the patch files in the directory now."""
        return sorted(p.name[:-len(SUFFIX)] for p in self.directory.glob("*" + SUFFIX)
                      if PATCH_ID.match(p.name[:-len(SUFFIX)]))

    def get(self, patch_id: str) -> LoadedPatch:
        """The current version of patch ``patch_id``: from the cache while its file states the same
        checksum, else loaded (and cached in place of the older version)."""
        path = self.path(patch_id)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            with self._lock:
                self._drop(patch_id)
            raise NotFoundError(f"no patch {patch_id!r} in {self.directory}") from None
        try:  # everything below reads this one open file: one version, even if the name is replaced
            checksum = peek_checksum(fd)
            with self._lock:
                hit = self._cache.get(patch_id)
                if hit is not None and checksum is not None and hit.patch.meta["checksum"] == checksum:
                    self._cache.move_to_end(patch_id)
                    self.hits += 1
                    return hit
            loaded = self._load(patch_id, path, fd)
        finally:
            os.close(fd)
        with self._lock:
            old = self._cache.get(patch_id)
            if old is not None:
                self.reloads += 1
            self._drop(patch_id)
            self._insert(loaded)
        return loaded

    def _load(self, patch_id: str, path: Path, fd: int) -> LoadedPatch:
        size = os.fstat(fd).st_size
        chunks, offset = [], 0
        while offset < size:
            b = os.pread(fd, min(1 << 22, size - offset), offset)
            if not b:
                break
            chunks.append(b)
            offset += len(b)
        try:
            patch = patch_from_bytes(b"".join(chunks), path)
            patch.row_overlays(self.model)  # hash configuration and layer shapes fit the served model
        except PatchFileError as e:  # truncated, checksum: caught mid-write, or damaged
            raise PatchUnavailableError(f"patch {patch_id!r} cannot be read now ({e}); if it is being "
                                        f"rewritten, retry (write patch files with os.replace)") from None
        except PatchError as e:  # a sound file that does not fit the served model
            raise PatchConflictError(f"patch {patch_id!r} does not fit the served model: {e}") from None
        with self._lock:
            self.loads += 1
        return LoadedPatch(patch_id, patch, _nbytes(patch))

    def _insert(self, loaded: LoadedPatch) -> None:
        if loaded.nbytes > self.cache_bytes:
            raise PatchTooLargeError(f"patch {loaded.id!r} holds {loaded.nbytes:,} bytes but the patch cache "
                                     f"holds at most {self.cache_bytes:,}; raise --patch-cache-mb")
        while self._cache and self.bytes + loaded.nbytes > self.cache_bytes:
            _, old = self._cache.popitem(last=False)
            self.bytes -= old.nbytes
            self.evictions += 1
        self._cache[loaded.id] = loaded
        self.bytes += loaded.nbytes
        self.peak_bytes = max(self.peak_bytes, self.bytes)

    def _drop(self, patch_id: str) -> None:
        old = self._cache.pop(patch_id, None)
        if old is not None:
            self.bytes -= old.nbytes

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"entries": len(self._cache), "bytes": self.bytes, "peak_bytes": self.peak_bytes,
                    "cache_bytes": self.cache_bytes, "loads": self.loads, "reloads": self.reloads,
                    "hits": self.hits, "evictions": self.evictions}

    def cached(self, patch_id: str) -> Optional[LoadedPatch]:
        with self._lock:
            return self._cache.get(patch_id)
