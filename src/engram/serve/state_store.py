"""Stored generation states by key: safetensors + JSON files, checked when read, bounded in bytes (LRU).

An entry is a set of named tensors and a JSON record (``meta``); ``engram.serve.state_cache``
decides what goes in them (one block of a prompt's generation state) and what its key is (a
chained hash of the prompt's blocks). This module only keeps them:

    ========  ===========================================================================
    MEMORY    entries in RAM, this process only; at most ``max_bytes`` of tensors
    MMAP      one file per entry in ``directory`` (``KEY.safetensors``), read through a
              read-only mapping (``safetensors.safe_open``); at most ``max_bytes`` of files
    CACHED    MMAP with a RAM pool of at most ``memory_bytes`` in front of it
    ========  ===========================================================================

The three are the tables' storage locations (``engram.config.TableLocation``, what
``--storage`` picks from), with the same meaning: RAM, a mapped file, a RAM pool in front of
the file. The tables' tier classes themselves (``engram.tables.tiers``) do not fit: they serve
fixed-width rows of one preallocated table by row id, while a state is a variable set of
tensors found by a content key, added and dropped while serving; so the storage is this small
store, and only the vocabulary is shared.

Files are written atomically (``engram.fsutil.atomic_write``: a reader sees no file or the whole
file) and never unpickled. Each record carries a CRC-32 of its tensors' bytes and its own JSON,
checked on every read from disk: a truncated, damaged or foreign file raises
:class:`StateEntryError` naming the file and the fix, and is never used.

Eviction is least-recently-used, in bytes. The disk order survives restarts through the files'
modification times (a read touches its file). Several processes may share one directory: each
keeps its own count of the bytes, and a file another process removed is a miss.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_save

from engram.config import SERVING_LOCATIONS, StateCacheError, TableLocation
from engram.fsutil import PathLike, atomic_write

FORMAT = "engram-state"
VERSION = 1
SUFFIX = ".safetensors"
_META_KEY = "engram_state"
KEY = re.compile(r"^[0-9a-f]{64}$")


class StateEntryError(StateCacheError):
    """A stored state that cannot be used: truncated, damaged, or written for something else."""


@dataclass(frozen=True)
class StateEntry:
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def _crc(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> int:
    crc = zlib.crc32(json.dumps(meta, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().reshape(-1)
        crc = zlib.crc32(f"{name}:{t.dtype}:{tuple(tensors[name].shape)}".encode(), crc)
        crc = zlib.crc32(t.view(torch.uint8).numpy().tobytes(), crc)
    return crc


def entry_bytes(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> bytes:
    """An entry as the bytes of its file: safetensors with the record (and its CRC) as metadata."""
    record = {"format": FORMAT, "version": VERSION, **meta}
    record["crc32"] = _crc(tensors, record)
    return safetensors_save({k: v.detach().contiguous() for k, v in tensors.items()},
                            metadata={_META_KEY: json.dumps(record, sort_keys=True)})


def read_entry(path: PathLike) -> StateEntry:
    """Read and check one entry file (:class:`StateEntryError` if it cannot be used)."""
    path = Path(path)
    fix = f"delete {path} (it is recomputed on the next prompt that needs it)"
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(_META_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise StateEntryError(f"state cache entry {path} cannot be read ({str(e).splitlines()[0]}); "
                              f"it is truncated or damaged: {fix}") from None
    try:
        record = json.loads(raw) if raw is not None else None
    except json.JSONDecodeError:
        record = None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise StateEntryError(f"{path} is not an engram state cache entry (no {FORMAT!r} record); {fix}")
    if record.get("version") != VERSION:
        raise StateEntryError(f"state cache entry {path} has format version {record.get('version')!r}, this "
                              f"library reads {VERSION}; {fix}")
    stored = record.pop("crc32", None)
    if stored != _crc(tensors, record):
        raise StateEntryError(f"state cache entry {path} fails its checksum (stored {stored!r}); it is "
                              f"damaged: {fix}")
    for k in ("format", "version"):
        record.pop(k)
    return StateEntry(tensors, record)


class StateStore:
    """Entries by key (64 hex digits) in one of the three locations (module docstring)."""

    def __init__(self, directory: Optional[PathLike] = None,
                 location: Union[str, TableLocation] = TableLocation.MMAP,
                 max_bytes: int = 1 << 30, memory_bytes: int = 1 << 28) -> None:
        self.location = TableLocation.parse(location, "state storage", SERVING_LOCATIONS, StateCacheError)
        if max_bytes < 1 or memory_bytes < 1:
            raise StateCacheError(f"max_bytes={max_bytes} and memory_bytes={memory_bytes} must be >= 1")
        self.max_bytes, self.memory_bytes = int(max_bytes), int(memory_bytes)
        self.directory = None if directory is None else Path(directory)
        if self.location != TableLocation.MEMORY:
            if self.directory is None:
                raise StateCacheError(f"state storage {self.location.value!r} keeps states in a directory; "
                                      f"give one (--state-cache DIR)")
            if self.directory.exists() and not self.directory.is_dir():
                raise StateCacheError(f"--state-cache {self.directory} is a file; give a directory")
            self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._ram: OrderedDict[str, StateEntry] = OrderedDict()
        self.ram_bytes = 0
        self._disk: OrderedDict[str, int] = OrderedDict()  # key -> file bytes, least recent first
        self.disk_bytes = 0
        if self.location != TableLocation.MEMORY:
            self._scan()
        self.hits = self.misses = self.puts = self.evictions = self.refused = 0

    # ------------------------------------------------------------------ layout
    def path(self, key: str) -> Path:
        if not KEY.match(key):
            raise StateCacheError(f"state key {key!r} is not 64 hex digits")
        assert self.directory is not None
        return self.directory / (key + SUFFIX)

    def _scan(self) -> None:
        files = []
        for p in self.directory.glob("*" + SUFFIX):
            key = p.name[:-len(SUFFIX)]
            if KEY.match(key):
                try:
                    st = p.stat()
                except FileNotFoundError:
                    continue
                files.append((st.st_mtime_ns, key, st.st_size))
        for _, key, size in sorted(files):
            self._disk[key] = size
            self.disk_bytes += size

    @property
    def _ram_budget(self) -> int:
        return self.max_bytes if self.location == TableLocation.MEMORY else self.memory_bytes

    # ------------------------------------------------------------------ reads
    def contains(self, key: str) -> bool:
        with self._lock:
            return key in self._ram or key in self._disk

    def get(self, key: str) -> Optional[StateEntry]:
        """The entry stored under ``key``, or None; :class:`StateEntryError` for one that cannot
        be used (it is dropped from the store first)."""
        with self._lock:
            hit = self._ram.get(key)
            if hit is not None:
                self._ram.move_to_end(key)
                if key in self._disk:
                    self._disk.move_to_end(key)
                self.hits += 1
                return hit
            if key not in self._disk:
                self.misses += 1
                return None
        path = self.path(key)
        try:
            entry = read_entry(path)
            if entry.meta.get("key") != key:
                raise StateEntryError(f"state cache entry {path} holds key {str(entry.meta.get('key'))[:16]}..., "
                                      f"not its file name's; it was renamed or copied: delete {path}")
            os.utime(path)  # most recently used, also for the next process
        except FileNotFoundError:  # removed by another process sharing the directory
            with self._lock:
                self._forget_file(key)
                self.misses += 1
            return None
        except StateEntryError:
            self.discard(key)
            with self._lock:
                self.refused += 1
            raise
        with self._lock:
            if key in self._disk:
                self._disk.move_to_end(key)
            if self.location == TableLocation.CACHED:
                self._admit(key, entry)
            self.hits += 1
        return entry

    def touch(self, keys: Iterable[str], persist: bool = True) -> None:
        """Mark ``keys`` used now, in order (the last most recent); ``persist``: in the files'
        modification times too (one nanosecond apart, so that a later scan sees the same order)."""
        with self._lock:
            self._touch(keys, persist)

    def _touch(self, keys: Iterable[str], persist: bool) -> None:
        now = time.time_ns()
        for i, key in enumerate(keys):
            if key in self._ram:
                self._ram.move_to_end(key)
            if key in self._disk:
                self._disk.move_to_end(key)
                if persist:
                    try:
                        os.utime(self.path(key), ns=(now + i, now + i))
                    except FileNotFoundError:
                        self._forget_file(key)

    # ------------------------------------------------------------------ writes
    def put(self, key: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
            newer: Sequence[str] = ()) -> bool:
        """Store an entry (``meta`` gets ``key``); False when it alone exceeds the byte bound.
        ``newer``: keys to mark more recently used than this one before anything is evicted (a
        block's parents: when the store is full, a prompt's deepest block goes first)."""
        meta = {**meta, "key": key}
        if self.location == TableLocation.MEMORY:
            entry = StateEntry({k: v.detach().clone() for k, v in tensors.items()}, meta)
            if entry.nbytes > self.max_bytes:
                return False
            with self._lock:
                self._admit(key, entry, newer)
                self.puts += 1
                return key in self._ram
        data = entry_bytes(tensors, meta)
        if len(data) > self.max_bytes:
            return False
        path = self.path(key)
        atomic_write(path, lambda f: f.write(data))
        with self._lock:
            self._forget_file(key)
            self._disk[key] = len(data)
            self.disk_bytes += len(data)
            self.puts += 1
            self._touch(newer, persist=False)
            while self.disk_bytes > self.max_bytes and len(self._disk) > 1:
                old, _ = next(iter(self._disk.items()))
                self._remove_file(old)
                self.evictions += 1
            return key in self._disk  # False when it was itself the one to go

    def discard(self, key: str) -> None:
        """Drop ``key`` from every location of this store."""
        with self._lock:
            self._drop_ram(key)
            if key in self._disk:
                self._remove_file(key)

    def _admit(self, key: str, entry: StateEntry, newer: Sequence[str] = ()) -> None:
        self._drop_ram(key)
        if entry.nbytes > self._ram_budget:
            return
        self._ram[key] = entry
        self.ram_bytes += entry.nbytes
        self._touch(newer, persist=False)
        while self.ram_bytes > self._ram_budget:
            _, old = self._ram.popitem(last=False)
            self.ram_bytes -= old.nbytes
            if self.location == TableLocation.MEMORY:
                self.evictions += 1

    def _drop_ram(self, key: str) -> None:
        old = self._ram.pop(key, None)
        if old is not None:
            self.ram_bytes -= old.nbytes

    def _forget_file(self, key: str) -> None:
        size = self._disk.pop(key, None)
        if size is not None:
            self.disk_bytes -= size

    def _remove_file(self, key: str) -> None:
        self._forget_file(key)
        self._drop_ram(key)
        try:
            os.unlink(self.path(key))
        except FileNotFoundError:
            pass

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"location": self.location.value, "entries": len(self._disk) or len(self._ram),
                    "disk_bytes": self.disk_bytes, "ram_bytes": self.ram_bytes, "max_bytes": self.max_bytes,
                    "hits": self.hits, "misses": self.misses, "puts": self.puts,
                    "evictions": self.evictions, "refused": self.refused}
