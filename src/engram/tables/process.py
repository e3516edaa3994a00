"""A storage tier served from a helper process, so its bookkeeping never holds this process's GIL.

The cached tier's lookup is a few hundred small torch ops (hash-map probes, eviction, the
pool gather) plus I/O threads finishing page faults. Run on a thread beside the model, each
of those ops hands the GIL back and forth with the model's own Python-level dispatch. Measured
on the offload benchmark with the page cache warm (no I/O at all): the same lookups cost 4%
run synchronously on the main thread but 18% run on the prefetch thread. :class:`ProcessStorage`
moves the tier into a helper process (``python -m engram.tables.process``, a fresh interpreter: no
fork of the model, no re-import of the caller's ``__main__``): a lookup copies the requested
rows into a shared buffer, sends one message over a socket pair, and copies the answer back. The model process
does three tensor ops per lookup; deduplication, the pool, eviction and the file reads all
happen in the helper, on another core.

Buffers are files in ``/dev/shm`` (or the temp dir), mapped by both processes and unlinked
as soon as both have them open, so nothing is left behind even if a process is killed.

Shape legend
    N rows requested    Dh row width
"""

from __future__ import annotations

import mmap
import os
import socket
import subprocess
import sys
import tempfile
import threading
from multiprocessing.connection import Connection
from typing import Any, Optional

import torch

from engram.tables.tablefile import TableHeader, read_header
from engram.tables.tiers import (
    MmapStorage,
    StorageConfig,
    StorageError,
    TableLocation,
    TableStorage,
    TierStats,
    open_local_tier,
)

_SHM_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def _map(path: str, nbytes: int, create: bool) -> mmap.mmap:
    fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0), 0o600)
    try:
        if create:
            os.ftruncate(fd, nbytes)
        return mmap.mmap(fd, nbytes, access=mmap.ACCESS_WRITE)
    finally:
        os.close(fd)


class _Buffers:
    """Request rows int64 [cap] and answer rows float32 [cap, Dh], shared by both processes."""

    def __init__(self, cap: int, dim: int, path: Optional[str] = None) -> None:
        self.cap, self.dim = cap, dim
        create = path is None
        if create:
            path = os.path.join(_SHM_DIR, f"engram-fetch-{os.getpid()}-{id(self):x}-{cap}")
        self.path = path
        self.nbytes = cap * 8 + cap * dim * 4
        self.mm = _map(path, self.nbytes, create)
        self.rows = torch.frombuffer(self.mm, dtype=torch.int64, count=cap)
        self.out = torch.frombuffer(self.mm, dtype=torch.float32, count=cap * dim, offset=cap * 8).view(cap, dim)

    def unlink(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def close(self) -> None:
        self.rows = self.out = None  # type: ignore[assignment]
        try:
            self.mm.close()
        except BufferError:  # a view is still alive somewhere; freed with it
            pass


def _chain(tier: TableStorage) -> list[TableStorage]:
    out = [tier]
    while hasattr(out[-1], "backing"):
        out.append(out[-1].backing)
    return out


def _serve(conn: Any, table_path: str, layer_id: int, cfg: dict[str, Any]) -> None:
    """Helper process: own the tier, answer lookups until told to stop."""
    torch.set_num_threads(1)
    try:
        scfg = StorageConfig(**{**cfg, "process": False})
        tier = open_local_tier(scfg, read_header(table_path), layer_id)
    except Exception as e:  # report, do not hang the parent
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", [(name, s.as_dict()) for name, s in tier.tiers()]))
    buf: Optional[_Buffers] = None
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            break
        op = msg[0]
        try:
            if op == "buffers":
                if buf is not None:
                    buf.close()
                buf = _Buffers(msg[1], tier.dim, path=msg[2])
                conn.send(("ok", None))
            elif op == "lookup":
                n, unique = msg[1], msg[2]
                assert buf is not None
                tier.lookup(buf.rows[:n], buf.out[:n], unique=unique)
                conn.send(("ok", [(name, s.as_dict()) for name, s in tier.tiers()]))
            elif op == "reset":
                for _, s in tier.tiers():
                    s.reset()
                conn.send(("ok", None))
            elif op == "cold":  # benchmarks: warm through the page cache, then measure cold
                for t in _chain(tier):
                    if isinstance(t, MmapStorage):
                        t.cold = msg[1]
                        if msg[1]:
                            t.drop_page_cache()
                conn.send(("ok", None))
            elif op == "stop":
                break
        except Exception as e:
            conn.send(("error", f"{type(e).__name__}: {e}"))
    tier.close()
    if buf is not None:
        buf.close()
    conn.close()


class ProcessStorage(TableStorage):
    """An ``mmap`` or ``cached`` tier (``cfg``) for one layer, living in a helper process.

    Same ``lookup`` contract as every tier; rows may repeat (the helper deduplicates).
    ``stats`` mirrors the helper's top tier (plus this side's ``stall_s``); ``tiers()`` lists
    all of the helper's tiers.
    """

    dedupes = True  # the runtime can hand over all rows of a batch; the helper dedupes and expands

    def __init__(self, cfg: StorageConfig, header: Any, layer_id: int, start_timeout: float = 120.0) -> None:
        if cfg.kind not in (TableLocation.MMAP, TableLocation.CACHED):
            raise StorageError(f"a helper process serves file-backed tiers (mmap, cached), not {cfg.kind.value!r}")
        info = header.layer(layer_id)
        super().__init__(info.rows, info.dim, header.torch_dtype)
        self.kind = cfg.kind
        self.layer_id = layer_id
        ours, theirs = socket.socketpair()
        self._proc = subprocess.Popen([sys.executable, "-m", "engram.tables.process", str(theirs.fileno())],
                                      pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        theirs.close()
        self._conn = Connection(ours.detach())
        self._conn.send((str(header.path), layer_id, cfg.to_dict()))
        if not self._conn.poll(start_timeout):
            self._proc.kill()
            raise StorageError(f"the fetch process for layer {layer_id} did not start within "
                               f"{start_timeout:.0f} s; use --no-fetch-process")
        status, payload = self._recv()
        if status != "ready":
            self._proc.wait(5)
            raise StorageError(f"the fetch process for layer {layer_id} failed: {payload}")
        self._mirror: dict[str, TierStats] = {}
        self._update(payload)
        self._buf: Optional[_Buffers] = None
        self._io_lock = threading.Lock()

    def _recv(self) -> tuple[str, Any]:
        try:
            return self._conn.recv()
        except (EOFError, OSError):
            code = self._proc.poll()
            raise StorageError(f"the fetch process for layer {self.layer_id} died (exit code {code}); "
                               f"rerun, or use --no-fetch-process to fetch on a thread") from None

    def _call(self, *msg: Any) -> Any:
        try:
            self._conn.send(msg)
        except OSError:  # broken pipe: the helper is gone; _recv names its exit code
            pass
        status, payload = self._recv()
        if status == "error":
            raise StorageError(f"fetch process, layer {self.layer_id}: {payload}")
        return payload

    def _update(self, tiers: list[tuple[str, dict[str, Any]]]) -> None:
        for i, (name, d) in enumerate(tiers):
            key = f"{i}:{name}"
            st = self._mirror.setdefault(key, TierStats())
            for f in TierStats.__dataclass_fields__:
                if f != "stall_s":
                    setattr(st, f, d[f])
        top = tiers[0][1]
        for f in TierStats.__dataclass_fields__:
            if f not in ("stall_s", "lookup_s", "calls", "lookups"):
                setattr(self.stats, f, top[f])

    def _ensure(self, n: int) -> _Buffers:
        if self._buf is None or self._buf.cap < n:
            cap = max(n, 1 << 16, 2 * (self._buf.cap if self._buf else 0))
            if self._buf is not None:
                self._buf.close()
            buf = _Buffers(cap, self.dim)
            try:
                self._call("buffers", cap, buf.path)
            finally:
                buf.unlink()  # both sides have it mapped: the name is no longer needed
            self._buf = buf
        return self._buf

    def _lookup(self, rows: torch.Tensor, out: torch.Tensor, unique: bool) -> None:
        n = rows.numel()
        with self._io_lock:
            buf = self._ensure(n)
            buf.rows[:n].copy_(rows)
            tiers = self._call("lookup", n, unique)
            out.copy_(buf.out[:n])
        self._update(tiers)

    def tiers(self) -> list[tuple[str, TierStats]]:
        out = [(k.split(":", 1)[1], s) for k, s in self._mirror.items()]
        if out:
            out[0][1].stall_s = self.stats.stall_s
        return out

    def set_cold(self, cold: bool) -> None:
        """Switch the helper's file reads between cold (pages dropped after reads) and cached."""
        self._call("cold", cold)

    def reset_stats(self) -> None:
        self._call("reset")
        self.stats.reset()
        for s in self._mirror.values():
            s.reset()

    def close(self) -> None:
        if self._conn.closed:
            return
        if self._proc.poll() is None:
            try:
                self._conn.send(("stop",))
                self._proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait()
        self._conn.close()
        if self._buf is not None:
            self._buf.close()
            self._buf = None

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "process": True, "pid": self._proc.pid}


def open_layer_storage(cfg: StorageConfig, header: Optional[TableHeader], layer_id: int,
                       memory_table: Optional[torch.Tensor] = None) -> TableStorage:
    """The tier ``cfg`` asks for, for one Engram layer: in a helper process when ``cfg.process``
    is set and the tier is file-backed, else in this process (``open_local_tier``)."""
    if cfg.process and cfg.kind != TableLocation.MEMORY and header is not None:
        return ProcessStorage(cfg, header, layer_id)
    return open_local_tier(cfg, header, layer_id, memory_table)


def main() -> None:
    """Entry point of the helper: ``python -m engram.tables.process FD`` (FD: its end of the socket pair)."""
    conn = Connection(int(sys.argv[1]))
    try:
        table_path, layer_id, cfg = conn.recv()
    except (EOFError, OSError):
        return
    _serve(conn, table_path, layer_id, cfg)


if __name__ == "__main__":
    main()
