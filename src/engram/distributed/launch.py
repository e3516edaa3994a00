"""``engram train --nproc N``: run the same command on N local processes under torchrun.

The command line is handed to ``python -m torch.distributed.run --standalone
--nproc-per-node N -m engram train ...`` without ``--nproc``; every worker then finds torchrun's
environment and trains its rank (:func:`engram.distributed.parallel.train_distributed`).
``--standalone`` runs the rendezvous on this machine on a free port. For several machines run
torchrun yourself (docs/distributed.md).
"""

from __future__ import annotations

import subprocess
import sys
from typing import Sequence

NPROC_FLAG = "--nproc"


def strip_nproc(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--nproc=N``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == NPROC_FLAG:
            skip = True
        elif not a.startswith(NPROC_FLAG + "="):
            out.append(a)
    return out


def torchrun_command(nproc: int, argv: Sequence[str]) -> list[str]:
    """The torchrun command line for ``engram <argv>`` on ``nproc`` local processes."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "engram", *strip_nproc(argv)]


def launch(nproc: int, argv: Sequence[str]) -> int:
    """Run torchrun in the foreground; returns its exit status (non-zero when any rank failed)."""
    return subprocess.call(torchrun_command(nproc, argv))
