"""Training with the tables in a file-backed tier (mmap, cached) against the in-memory reference.

The tiers only move rows between RAM and a working file, so the comparison is exact: the same
losses and the same final rows and optimizer state, bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engram.config import ConfigError, TrainConfig, preset
from engram.model import checkpoint as ckpt
from engram.tables.trainable import CachedTrainableTier, RowFile, TrainableTier
from engram.training.trainer import TABLE_WORK_DIR, train


# ----------------------------------------------------------------------------- the tiers alone
@pytest.mark.parametrize("capacity", [1, 7, 40, 500])
def test_cached_tier_reads_what_was_written(tmp_path: Path, capacity: int) -> None:
    """Random reads (repeats included) and writes against a plain tensor, through a pool that
    is smaller than one call (1, 7), smaller than the table (40) and larger (500)."""
    g = torch.Generator().manual_seed(capacity)
    ref = torch.randn(100, 5, generator=g)
    tier = CachedTrainableTier(tmp_path, "t", ref.clone(), capacity)
    try:
        for i in range(60):
            rows = torch.randint(0, 100, (int(torch.randint(1, 30, (1,), generator=g)),), generator=g)
            if i % 3 == 2:
                rows = torch.unique(rows)
                vals = torch.randn(rows.numel(), 5, generator=g)
                tier.write(rows, vals)
                ref[rows] = vals
            elif i % 3 == 1:
                tier.warm(rows)
            else:
                assert torch.equal(tier.read(rows), ref[rows])
            if i % 10 == 9:
                tier.end_step()  # pages dropped: the file still holds every written row
            assert tier.resident_rows <= min(capacity, 100)
        tier.flush()
        assert torch.equal(tier.table, ref)
        assert torch.equal(RowFile(tmp_path / "copy", 100, 5, init=tier.table).tensor, ref)
    finally:
        tier.close()
    assert not list(tmp_path.glob("t.*"))  # working files removed


def test_mmap_tier_is_the_file(tmp_path: Path) -> None:
    init = torch.randn(10, 3)
    tier = TrainableTier(tmp_path, "m", init)
    tier.write(torch.tensor([2, 5]), torch.ones(2, 3))
    on_disk = torch.frombuffer(bytearray((tmp_path / "m.rows").read_bytes()), dtype=torch.float32).view(10, 3)
    assert torch.equal(on_disk[2], torch.ones(3)) and torch.equal(on_disk[0], init[0])
    m = tier.row_file("exp_avg", 3, torch.float32)
    assert m.shape == (10, 3) and not m.any()
    tier.close()
    assert not list(tmp_path.iterdir())


def test_file_tiers_need_the_row_sparse_optimizer() -> None:
    with pytest.raises(ConfigError, match=r"table_storage='cached' trains with the row-sparse optimizer only.*"
                                          r"table_optimizer=sparse_adam"):
        TrainConfig(table_storage="cached")
    with pytest.raises(ConfigError, match="table_storage='disk'; choose one of"):
        TrainConfig(table_storage="disk", table_optimizer="sparse_adam")
    with pytest.raises(ConfigError, match="table_cache_rows=0 must be >= 1"):
        TrainConfig(table_cache_rows=0)


# ----------------------------------------------------------------------------- training
SETS = dict(steps=8, batch_size=4, seq_len=32, warmup_steps=2, eval_every=4, eval_batches=1, save_every=4,
            log_every=1, seed=7, table_optimizer="sparse_adam")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny) -> dict[str, Path]:
    """The same 8 steps with the tables in memory, mmap, and cached with a 64-row pool (the
    table has 4,038 rows; one step touches a few hundred), the latter two with prefetch."""
    root = tmp_path_factory.mktemp("tiers")
    data = tiny.training_dataset(root / "data")
    vocab = int(json.loads((data / "meta.json").read_text())["vocab_size"])
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, over in [("memory", {}), ("mmap", dict(table_storage="mmap", prefetch=True)),
                           ("cached", dict(table_storage="cached", table_cache_rows=64, prefetch=True))]:
            train(preset("tiny", vocab), TrainConfig(**{**SETS, **over}), data, root / name, progress=False)
    finally:
        torch.set_num_threads(prev)
    return {"data": data, "root": root, "vocab": vocab}  # type: ignore[dict-item]


def _losses(run: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def _tables(run: Path) -> dict[str, torch.Tensor]:
    """Table rows and the tables' optimizer state (sorted by row) of a one-process checkpoint."""
    model = load_file(str(run / ckpt.MODEL_FILE))
    opt = load_file(str(run / ckpt.OPTIMIZER_FILE))
    out = {k: v for k, v in model.items() if k.endswith(ckpt.TABLE_KEY_SUFFIX)}
    rows = opt["tables.state.0.rows"]
    order = torch.argsort(rows)
    for k in ("rows", "exp_avg", "exp_avg_sq", "steps"):
        out[k] = opt[f"tables.state.0.{k}"][order]
    return out


@pytest.mark.parametrize("tier", ["mmap", "cached"])
def test_training_on_a_file_tier_equals_memory_bit_for_bit(runs, tier: str) -> None:
    ref, got = runs["root"] / "memory", runs["root"] / tier
    assert _losses(got) == _losses(ref) and len(_losses(ref)) == 8
    a, b = _tables(ref), _tables(got)
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert a["rows"].numel() > 64  # more rows were trained than the cached pool holds
    assert not (got / TABLE_WORK_DIR).exists()  # working files are scratch, removed at the end


def test_resume_may_change_the_tier(runs, tmp_path: Path, one_thread) -> None:
    """A memory checkpoint stopped after step 1 resumed on the cached tier, and a cached one
    resumed in memory: both continue the uninterrupted in-memory run exactly."""
    data, vocab = runs["data"], runs["vocab"]
    for first, then in [("memory", "cached"), ("cached", "memory")]:
        run = tmp_path / f"{first}-{then}"
        cfg = dict(SETS, table_storage=first, table_cache_rows=64)
        train(preset("tiny", vocab), TrainConfig(**cfg), data, run, max_seconds=0, progress=False)
        assert ckpt.read_config(run).step == 1
        cfg["table_storage"] = then
        train(preset("tiny", vocab), TrainConfig(**cfg), data, run, resume=True, progress=False)
        assert _losses(run) == _losses(runs["root"] / "memory"), (first, then)
        a, b = _tables(runs["root"] / "memory"), _tables(run)
        assert all(torch.equal(a[k], b[k]) for k in a), (first, then)


def test_bench_train_tiers_reports_identical_losses_and_table_ram(runs) -> None:
    from engram.bench.train_tiers import bench_train_tiers

    res = bench_train_tiers(str(runs["data"]), steps=2, rounds=1, batch_size=2, seq_len=16, cache_rows=32,
                            preset_name="tiny")
    assert res["losses_identical"] and res["table_rows"] == 4038
    assert res["memory"]["anon_bytes"] >= res["table_bytes"] and res["mmap"]["anon_bytes"] == 0
    assert res["cached"]["resident_rows"] <= 32 and res["cached"]["files_rss_bytes"] == 0  # pages dropped
    assert 0 < res["cached"]["anon_bytes"] < res["table_bytes"] / 10
    assert 0 < res["mmap"]["files_rss_bytes"] <= 4 * res["table_bytes"]  # table, 2 moments, step counts
    assert 0 < res["cached"]["files_rss_in_step_bytes"]
    assert all(res[k]["step_s"] > 0 for k in ("memory", "mmap", "cached"))
