"""Table files: round trips, validation, and failures that must leave the old table intact."""

from __future__ import annotations

import dataclasses
import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from engram.hashing.hasher import NgramHasher
from engram.tables.tablefile import (
    ALIGN,
    TableFileError,
    TableMismatchError,
    TableWriteError,
    TableWriter,
    check_compatible,
    open_table,
    read_header,
    read_layer,
    save_model_tables,
    verify_checksums,
    write_table,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def model(tiny):
    return tiny.model()


def _tables(model) -> dict[int, torch.Tensor]:
    return {e.layer_id: e.table.weight.detach() for e in model.engram_layers}


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_round_trip_each_dtype(tmp_path, model, dtype):
    path = tmp_path / "t.engt"
    h = save_model_tables(model, path, dtype=dtype)
    want = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    assert h.dtype == dtype and h.fingerprint == model.hasher.fingerprint()
    for lid, t in _tables(model).items():
        info = h.layer(lid)
        assert info.offset % ALIGN == 0 and info.rows == t.shape[0] and info.dim == t.shape[1]
        assert torch.equal(read_layer(h, lid), t.to(want).float())  # stored values, exactly
    assert all(verify_checksums(h).values())
    check_compatible(h, model.hasher, model.cfg.engram.head_dim)
    assert path.stat().st_size == h.file_bytes


def test_header_records_shape_and_hash(tmp_path, model):
    h = save_model_tables(model, tmp_path / "t.engt")
    s = h.summary()
    assert s["rows"] == sum(sum(model.hasher.head_sizes(l)) for l in model.cfg.engram.layer_ids)
    assert s["dim"] == model.cfg.engram.head_dim
    assert h.hasher["config"]["seed"] == model.cfg.engram.seed
    assert h.layer(1).head_sizes == tuple(model.hasher.head_sizes(1))


def test_wrong_hash_config_is_refused_and_named(tmp_path, model, tiny):
    h = save_model_tables(model, tmp_path / "t.engt")
    other = NgramHasher(dataclasses.replace(model.cfg.engram, seed=5), tiny.VOCAB, tiny.compression())
    with pytest.raises(TableMismatchError, match=r"seed: table 0, model 5"):
        check_compatible(h, other)
    no_compression = NgramHasher(model.cfg.engram, tiny.VOCAB, None)
    with pytest.raises(TableMismatchError, match="compression"):
        open_table(h.path, no_compression)


def test_missing_layer_is_refused(tmp_path, model):
    t = _tables(model)
    h = write_table(tmp_path / "t.engt", t, fingerprint=model.hasher.fingerprint(),
                    head_sizes={l: model.hasher.head_sizes(l) for l in t}, hasher=model.hasher.describe())
    with pytest.raises(TableMismatchError, match="no table for Engram layer 0"):
        h.layer(0)


def test_not_a_table(tmp_path):
    p = tmp_path / "x.engt"
    p.write_bytes(b"hello world, not a table" * 10)
    with pytest.raises(TableFileError, match="not an Engram table file"):
        read_header(p)
    with pytest.raises(FileNotFoundError, match="engram table convert"):
        read_header(tmp_path / "missing.engt")


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


def test_corrupt_header_truncation_and_data(tmp_path, model):
    path = tmp_path / "t.engt"
    h = save_model_tables(model, path)
    good = path.read_bytes()

    _flip(path, 40)  # inside the JSON header
    with pytest.raises(TableFileError, match="header checksum mismatch"):
        read_header(path)

    path.write_bytes(good[:-100])
    with pytest.raises(TableFileError, match="truncated"):
        read_header(path)

    path.write_bytes(good)
    _flip(path, h.layer(1).offset + 123)  # table data: only the CRC catches it
    with pytest.raises(TableFileError, match="layer 1 data checksum mismatch"):
        verify_checksums(read_header(path))

    bad_version = bytearray(good)
    bad_version[8:12] = (99).to_bytes(4, "little")
    path.write_bytes(bytes(bad_version))
    with pytest.raises(TableFileError, match="version 99"):
        read_header(path)


def _intact(path: Path, model) -> None:
    h = read_header(path)
    for lid, t in _tables(model).items():
        assert torch.equal(read_layer(h, lid), t)
    assert all(verify_checksums(h).values())


def _no_tmp(d: Path) -> None:
    assert not [p for p in d.iterdir() if ".tmp-" in p.name]


def test_full_disk_during_write_keeps_previous(tmp_path, model, monkeypatch, tiny):
    path = tmp_path / "t.engt"
    save_model_tables(model, path)
    other = tiny.model(seed=3)
    calls = {"n": 0}
    real = os.pwrite

    def full(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(TableWriteError, match="no space left on device"):
        save_model_tables(other, path)
    monkeypatch.undo()
    _intact(path, model)
    _no_tmp(tmp_path)


def test_full_disk_at_reservation_keeps_previous(tmp_path, model, monkeypatch, tiny):
    path = tmp_path / "t.engt"
    save_model_tables(model, path)

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with pytest.raises(TableWriteError, match=r"bytes needed"):
        save_model_tables(tiny.model(seed=3), path)
    monkeypatch.undo()
    _intact(path, model)
    _no_tmp(tmp_path)


def test_exception_inside_writer_aborts(tmp_path, model):
    path = tmp_path / "t.engt"
    save_model_tables(model, path)
    with pytest.raises(RuntimeError, match="boom"):
        with TableWriter(path, [(1, 10, ())], 4, fingerprint="f"):
            raise RuntimeError("boom")
    _intact(path, model)
    _no_tmp(tmp_path)


_SLOW_WRITER = textwrap.dedent("""
    import sys, time, torch
    from engram.tables.tablefile import TableWriter
    path = sys.argv[1]
    with TableWriter(path, [(1, 4096, ())], 64, fingerprint="new") as w:
        for i in range(4096 // 64):
            w.write(1, i * 64, torch.full((64, 64), 7.0))
            if i == 2:
                print("started", flush=True)
            time.sleep(0.05)
""")


def test_killed_mid_write_keeps_previous(tmp_path, model, tiny):
    path = tmp_path / "t.engt"
    save_model_tables(model, path)
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "started"
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    _intact(path, model)
    leftovers = [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert leftovers, "the killed writer's temp file should be there"
    with pytest.raises(TableFileError, match="interrupted write"):
        read_header(leftovers[0])  # never a valid table: its header is written last
    save_model_tables(tiny.model(seed=4), path)  # the next writer sweeps dead writers' temp files
    _no_tmp(tmp_path)


def test_sparse_rows_and_no_checksum(tmp_path):
    path = tmp_path / "s.engt"
    with TableWriter(path, [(2, 1000, (400, 600))], 8, "bf16", fingerprint="fp", preallocate=False) as w:
        w.write_rows(2, torch.tensor([5, 900, 6, 7]), torch.arange(32, dtype=torch.float32).view(4, 8))
    h = read_header(path)
    assert h.layer(2).crc32 is None and verify_checksums(h) == {2: None}
    t = read_layer(h, 2)
    assert torch.equal(t[[5, 6, 7, 900]], torch.arange(32, dtype=torch.float32).view(4, 8)[[0, 2, 3, 1]])
    assert int(t.abs().sum(dim=1).ne(0).sum()) == 4  # rows never written read as zeros


def test_writer_validation(tmp_path):
    with pytest.raises(TableFileError, match="dtype='int8'"):
        TableWriter(tmp_path / "a", [(1, 4, ())], 4, "int8", fingerprint="f")
    with pytest.raises(TableFileError, match="sum of head_sizes"):
        TableWriter(tmp_path / "a", [(1, 4, (1, 2))], 4, fingerprint="f")
    with TableWriter(tmp_path / "a", [(1, 4, ())], 4, fingerprint="f") as w:
        with pytest.raises(TableFileError, match="outside"):
            w.write(1, 2, torch.zeros(3, 4))
        with pytest.raises(TableFileError, match=r"\[n, 4\]"):
            w.write(1, 0, torch.zeros(3, 5))
        w.write(1, 0, torch.ones(4, 4))
    assert torch.equal(read_layer(read_header(tmp_path / "a"), 1), torch.ones(4, 4))
