#!/usr/bin/env python3
"""One-step set-up and entry point for a fresh machine that has only python3.

    python3 bootstrap.py demo     # create .venv, install engram-lm, run the main job
    python3 bootstrap.py test     # create .venv, install engram-lm, run the test suite
    python3 bootstrap.py lint     # ruff, and import-linter's layer contracts (pyproject.toml)

Anything after the command is passed on (``python3 bootstrap.py test -m slow``). The
virtual environment is rebuilt only when pyproject.toml or setup.py change.
"""

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
# The CPU build; an unpinned torch pulls a multi-GB CUDA build. Override with ENGRAM_TORCH.
TORCH = os.environ.get("ENGRAM_TORCH", "torch==2.13.0")


def _run(*cmd: str) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def ensure_env() -> None:
    stamp = VENV / ".engram-install"
    want = hashlib.sha256(b"".join((ROOT / f).read_bytes() for f in ("pyproject.toml", "setup.py")
                                   if (ROOT / f).exists()) + TORCH.encode()).hexdigest()
    if stamp.exists() and stamp.read_text() == want:
        return
    if not (BIN / "python").exists():
        venv.EnvBuilder(with_pip=True).create(VENV)
    py = str(BIN / "python")
    _run(py, "-m", "pip", "install", "-q", "--upgrade", "pip")
    _run(py, "-m", "pip", "install", "-q", TORCH)
    _run(py, "-m", "pip", "install", "-q", "-e", ".[dev]")
    stamp.write_text(want)


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in ("demo", "test", "lint", "install"):
        print(__doc__)
        return 2
    ensure_env()
    cmd, rest = sys.argv[1], sys.argv[2:]
    if cmd == "demo":
        return subprocess.call([str(BIN / "engram"), "demo", *rest], cwd=ROOT)
    if cmd == "test":
        return subprocess.call([str(BIN / "python"), "-m", "pytest", "-q", *rest], cwd=ROOT)
    if cmd == "lint":
        ruff = subprocess.call([str(BIN / "ruff"), "check", "src", "tests", "benchmarks", *rest], cwd=ROOT)
        layers = subprocess.call([str(BIN / "lint-imports")], cwd=ROOT)
        return ruff or layers
    return 0


if __name__ == "__main__":
    sys.exit(main())
