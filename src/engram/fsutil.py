"""Durability helpers shared by every writer of files that matter (checkpoints, tables,
tokenizers, patches): each writes a temp file, fsyncs it, ``os.replace``s it over the target,
then fsyncs the directory so that the rename itself survives a crash."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union


def fsync_dir(path: Union[str, Path]) -> None:
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
