"""Durability helpers shared by every writer of files that matter (checkpoints, tables,
tokenizers, patches): each writes a temp file, fsyncs it, ``os.replace``s it over the target,
then fsyncs the directory so that the rename itself survives a crash."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Optional, Union

PathLike = Union[str, Path]
"""What every function that takes a file or directory accepts."""


def fsync_dir(path: PathLike) -> None:
    """Make the renames inside ``path`` durable. Best effort: some platforms (Windows) and file
    systems cannot open or fsync a directory, and there the rename is as durable as it gets."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def file_sha256(path: PathLike) -> str:
    """sha256 hex digest of a file's bytes, read in 1 MiB blocks (no whole-file copy in memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write(path: PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Create/replace ``path`` atomically: write a temp file in the same directory, fsync it,
    then rename over ``path``. Readers see the old file or the complete new one, never a
    partial write; on any error the temp file is removed and ``path`` is left untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class RunFiles:
    """A folder of finished runs, one JSON file per run key, each written atomically; a resumed
    study asks ``get`` first and skips what is on disk."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def get(self, key: str) -> Optional[dict[str, Any]]:
        p = self.root / f"{key}.json"
        return json.loads(p.read_text()) if p.is_file() else None

    def put(self, key: str, rec: dict[str, Any]) -> dict[str, Any]:
        data = (json.dumps(rec, indent=1, default=float) + "\n").encode()
        atomic_write(self.root / f"{key}.json", lambda f: f.write(data))
        return rec

    def all(self) -> list[dict[str, Any]]:
        return [json.loads(p.read_text()) for p in sorted(self.root.glob("*.json"))]
