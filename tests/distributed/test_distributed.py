"""Row-sharded training on several gloo processes against the one-process reference.

The multi-process runs go through torchrun (``engram train --nproc N`` or ``worker.py``), on
this CPU, with the tiny model: a few seconds each. Tolerance of the 1-rank vs W-rank losses:
the math is the same, but sums are taken in another order (each rank reduces its half of the
batch, then DDP and the table owners add the halves; the logged loss is the mean of the ranks'
means). In float32 that moves a loss by a few units in the last place (~2.4e-7 at loss 4); over
20 Adam steps the drift we see stays below 1e-6, so ``rtol=1e-5`` has a margin of 10 and still
fails on any real difference (a wrong row, a missing 1/W, a rank's share counted twice move the
loss by >1e-3 within a step or two).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engram.cli.main import main
from engram.distributed.sharding import reshard
from engram.model import checkpoint as ckpt
from engram.model.checkpoint import load_model, read_config
from engram.training.trainer import train

WORKER = Path(__file__).with_name("worker.py")
RTOL = 1e-5
SETS = {"steps": 20, "batch_size": 6, "seq_len": 32, "warmup_steps": 2, "log_every": 1, "eval_every": 20,
        "eval_batches": 1, "save_every": 10, "seed": 7}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    src = str(Path(ckpt.__file__).resolve().parents[2])  # the engram package under test
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


def _sets(**over) -> list[str]:
    out = []
    for k, v in {**SETS, **over}.items():
        out += ["--set", f"train.{k}={v}"]
    return out


def _cli_train(data: Path, run: Path, nproc: int, *extra: str, **over) -> None:
    """`engram train --nproc N` in a subprocess (it relaunches itself under torchrun)."""
    cmd = [sys.executable, "-m", "engram", "train", "--preset", "tiny", "--data", str(data), "--out", str(run),
           "--quiet", "--nproc", str(nproc), *_sets(**over), *extra]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


def _one_process(data: Path, run: Path, resume: bool = False, **over) -> None:
    from engram.config import TrainConfig, preset
    from engram.data.shards import load_dataset

    vocab = int(load_dataset(data).meta["vocab_size"])
    train(preset("tiny", vocab), TrainConfig(**{**SETS, **over}), data, run, resume=resume, progress=False)


def _losses(run: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def _worker(mode: str, nproc: int, out: Path, *args: str, timeout: float = 120,
            **env: str) -> tuple[int, list[dict]]:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(WORKER), mode, str(out), *args]
    res = subprocess.run(cmd, env={**_env(), **env}, capture_output=True, text=True, timeout=timeout)
    results = [json.loads((out / f"rank{r}.json").read_text()) if (out / f"rank{r}.json").is_file() else None
               for r in range(nproc)]
    return res.returncode, results


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny) -> dict[str, Path]:
    """The same 20 steps on 1 and on 2 processes, with dense and with row-sparse table Adam."""
    root = tmp_path_factory.mktemp("distributed")
    data = tiny.training_dataset(root / "data")
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _one_process(data, root / "dense1")
        _one_process(data, root / "sparse1", table_optimizer="sparse_adam")
    finally:
        torch.set_num_threads(prev)
    _cli_train(data, root / "dense2", 2)
    _cli_train(data, root / "sparse2", 2, table_optimizer="sparse_adam")
    return {"data": data, "root": root, **{k: root / k for k in ("dense1", "dense2", "sparse1", "sparse2")}}


# ----------------------------------------------------------------------------- lookups
@pytest.mark.parametrize("nproc", [2, 3])
def test_sharded_lookup_equals_one_process_lookup_bit_for_bit(tmp_path: Path, nproc: int) -> None:
    rc, results = _worker("lookup", nproc, tmp_path)
    assert rc == 0
    for r, res in enumerate(results):
        assert res["equal"], f"rank {r}: sharded rows differ from the in-memory table"
        assert res["overlay_equal"] and res["full_equal"], r
        assert res["shape"] == [3, 5, 4, 8]
        assert res["grad_close"] and res["grad_nonzero"] > 0  # gradients reach the owners' rows
        assert res["sent_bytes"] > 0
    assert sum(res["local_rows"] for res in results) == 1009 + 997  # every row has one owner


# ----------------------------------------------------------------------------- training
@pytest.mark.parametrize("opt", ["dense", "sparse"])
def test_two_ranks_train_like_one(runs, opt: str) -> None:
    one, two = _losses(runs[f"{opt}1"]), _losses(runs[f"{opt}2"])
    assert sorted(one) == sorted(two) == list(range(1, 21))
    np.testing.assert_allclose([two[s] for s in one], [one[s] for s in one], rtol=RTOL, atol=0)
    assert one[20] < one[1] - 1.0  # it learned: the comparison is not between two flat lines
    meta = read_config(runs[f"{opt}2"])
    assert meta.sharded == {"world_size": 2, "dir": meta.sharded["dir"]} and meta.step == 20
    shards = sorted(p.name for p in (runs[f"{opt}2"] / meta.sharded["dir"]).iterdir())
    assert shards == ["model.safetensors", "optimizer.safetensors", "tables-00000-of-00002.safetensors",
                      "tables-00001-of-00002.safetensors", "trainer_state.json"]
    assert len([p for p in runs[f"{opt}2"].iterdir() if p.name.startswith("shards-")]) == 1  # older ones removed


def test_resume_on_two_ranks_is_exact(runs, tmp_path: Path) -> None:
    """Stopped after step 1 and resumed, with the next batch and its row ids built ahead on a
    background thread (--prefetch): the uninterrupted run's losses, bit for bit."""
    run = tmp_path / "run"
    _cli_train(runs["data"], run, 2, "--max-seconds", "0", "--prefetch", table_optimizer="sparse_adam")
    assert read_config(run).step == 1
    _cli_train(runs["data"], run, 2, "--resume", "--prefetch", table_optimizer="sparse_adam")
    assert _losses(run) == _losses(runs["sparse2"])  # same world size: the same sums in the same order


def _shard_state(run: Path, rank: int, world: int) -> dict[str, torch.Tensor]:
    """A rank's table rows and their optimizer state (sorted by row) from a sharded checkpoint."""
    from safetensors.torch import load_file

    meta = read_config(run)
    got = load_file(str(run / meta.sharded["dir"] / ckpt.shard_file(rank, world)))
    order = torch.argsort(got["tables.state.0.rows"])
    return {k: v[order] if k.startswith("tables.state.0.") else v for k, v in got.items()}


@pytest.mark.parametrize("tier", ["mmap", "cached"])
def test_shards_on_a_file_tier_train_like_memory(runs, tmp_path: Path, tier: str) -> None:
    """Each rank's shard in a working file (mmap), or behind a 64-row pool (cached; a rank's
    shard has ~2,000 rows), with the next step's rows read ahead (--prefetch): the in-memory
    run's losses, rows and optimizer state, bit for bit."""
    run = tmp_path / tier
    _cli_train(runs["data"], run, 2, "--table-storage", tier, "--table-cache-rows", "64", "--prefetch",
               table_optimizer="sparse_adam")
    assert _losses(run) == _losses(runs["sparse2"])
    for r in range(2):
        a, b = _shard_state(runs["sparse2"], r, 2), _shard_state(run, r, 2)
        assert sorted(a) == sorted(b) and a["tables.state.0.rows"].numel() > 64
        for k in a:
            assert torch.equal(a[k], b[k]), (r, k)
    assert not (run / "table-work").exists()  # the working files are scratch
    if tier == "mmap":  # the checkpoint loads anywhere: 2 ranks -> 1 process, here on the cached tier
        ref = tmp_path / "ref"
        subprocess.run(["cp", "-r", str(runs["sparse2"]), str(ref)], check=True)
        _one_process(runs["data"], ref, resume=True, table_optimizer="sparse_adam", steps=24)
        _one_process(runs["data"], run, resume=True, table_optimizer="sparse_adam", steps=24,
                     table_storage="cached", table_cache_rows=64)
        assert _losses(run) == _losses(ref) and read_config(run).step == 24


# ----------------------------------------------------------------------------- checkpoints
def test_reshard_round_trip_keeps_every_row_and_its_state() -> None:
    g = torch.Generator().manual_seed(0)
    rows, dim, key = 11, 3, "layers.1.engram.multi_head_embedding.embedding.weight"
    full = torch.randn(rows, dim, generator=g)
    touched = torch.tensor([0, 3, 4, 7, 10])
    m, v, steps = torch.randn(5, dim, generator=g), torch.rand(5, dim, generator=g), torch.tensor([1, 2, 3, 4, 5])
    dense_m = torch.randn(rows, dim, generator=g)

    def shards(n: int) -> list[dict[str, torch.Tensor]]:
        out = []
        for r in range(n):
            keep = touched % n == r
            out.append({key: full[r::n], "tables.state.0.rows": touched[keep], "tables.state.0.exp_avg": m[keep],
                        "tables.state.0.exp_avg_sq": v[keep], "tables.state.0.steps": steps[keep],
                        "tables.state.1.exp_avg": dense_m[r::n], "tables.state.1.step": torch.tensor(9.0)})
        return out

    for n, world in [(2, 3), (3, 2), (1, 2), (2, 1)]:
        parts = [reshard(shards(n), r, world) for r in range(world)]
        for r, part in enumerate(parts):
            assert torch.equal(part[key], full[r::world])
            assert torch.equal(part["tables.state.1.exp_avg"], dense_m[r::world])
            assert float(part["tables.state.1.step"]) == 9.0
            local = part["tables.state.0.rows"]
            assert torch.equal(torch.sort(local * world + r).values, touched[touched % world == r])
            order = torch.argsort(local)
            sel = touched % world == r
            assert torch.equal(part["tables.state.0.exp_avg"][order], m[sel])
            assert torch.equal(part["tables.state.0.steps"][order], steps[sel])
        # and back to one process: the global rows come back in place
        back = reshard([{k: v for k, v in p.items() if not k.endswith(".rows")} | {
            "tables.state.0.rows": p["tables.state.0.rows"] * world + r} for r, p in enumerate(parts)], 0, 1)
        assert torch.equal(back[key], full)


def test_checkpoint_loads_on_another_number_of_ranks(runs, tmp_path: Path) -> None:
    """2 -> 1, 2 -> 3 and 1 -> 2: four more steps from step 20 agree with each other."""
    continued = {}
    for name, src, nproc in [("2to1", "sparse2", 1), ("2to3", "sparse2", 3), ("1to2", "sparse1", 2)]:
        run = tmp_path / name
        run.mkdir()
        for f in (runs[src]).iterdir():  # a copy of the run, so the shared fixture stays intact
            (subprocess.run(["cp", "-r", str(f), str(run)], check=True))
        if nproc == 1:
            _one_process(runs["data"], run, resume=True, table_optimizer="sparse_adam", steps=24)
        else:
            _cli_train(runs["data"], run, nproc, "--resume", table_optimizer="sparse_adam", steps=24)
        continued[name] = _losses(run)
        assert read_config(run).step == 24
    ref = continued["2to1"]
    for name, got in continued.items():
        np.testing.assert_allclose([got[s] for s in range(21, 25)], [ref[s] for s in range(21, 25)],
                                   rtol=RTOL, err_msg=name)
    assert read_config(tmp_path / "2to3").sharded["world_size"] == 3
    one = tmp_path / "2to1"  # saved by one process: an ordinary checkpoint, the shard directory gone
    assert read_config(one).sharded is None and (one / ckpt.MODEL_FILE).is_file()
    assert not list(one.glob(ckpt.SHARD_DIR_PREFIX + "*"))


def test_sharded_checkpoint_works_in_one_process_tools(runs, tmp_path: Path, capsys) -> None:
    one, _ = load_model(runs["dense1"])
    two, meta = load_model(runs["dense2"])
    assert meta.sharded and meta.raw["param_counts"] == read_config(runs["dense1"]).raw["param_counts"]
    for (k, a), (k2, b) in zip(one.state_dict().items(), two.state_dict().items()):
        assert k == k2
        if k.endswith(ckpt.TABLE_KEY_SUFFIX):
            # Adam divides by sqrt(v): a table entry whose gradient is a near-cancelling sum can
            # move by up to lr when the summation order changes (5 of 64,608 entries here, by
            # <1e-4); every other entry agrees to 1e-5.
            off = (a - b).abs()
            assert float(off.max()) < 1e-3 and int((off > 1e-5).sum()) < 1e-3 * off.numel(), k
        else:
            torch.testing.assert_close(b, a, rtol=1e-4, atol=2e-5, msg=k)
    run, data = str(runs["dense2"]), str(runs["data"])
    assert main(["eval", "--ckpt", run, "--data", data, "--max-batches", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] > 0
    assert main(["generate", "--ckpt", run, "--prompt", "the cat", "--max-new-tokens", "4"]) == 0
    table = tmp_path / "t.engt"
    assert main(["table", "convert", run, str(table), "--quiet"]) == 0
    assert main(["eval", "--ckpt", run, "--data", data, "--max-batches", "1", "--table", str(table),
                 "--storage", "mmap"]) == 0
    text = tmp_path / "new.txt"
    text.write_text("the red bird sang near the old house while the cat sat on a mat\n" * 20)
    assert main(["patch", "train", "--ckpt", run, "--data", str(text), "--out", str(tmp_path / "p.engp"),
                 "--steps", "2", "--batch-size", "2", "--seq-len", "16", "--quiet"]) == 0


def test_rank_killed_mid_save_leaves_the_previous_checkpoint(runs, tmp_path: Path) -> None:
    run = tmp_path / "run"
    rc, results = _worker("die-in-save", 2, tmp_path / "out", str(runs["data"]), str(run))
    assert rc != 0 and results[1] is None  # rank 1 died
    # rank 0 either reports the failure itself or is stopped by torchrun first (a race): never hangs
    assert results[0]["type"] in ("RankFailure", "Terminated"), results[0]
    if results[0]["type"] == "RankFailure":
        assert "--dist-timeout" in results[0]["error"]
    meta = read_config(run)
    assert meta.step == 2  # the first save (step 2) is the committed one; step 4 never committed
    model, _ = load_model(run)
    assert model.cfg.engram is not None


# ----------------------------------------------------------------------------- misuse and failures
def test_ranks_with_different_configs_are_refused_at_start(runs, tmp_path: Path) -> None:
    rc, results = _worker("mismatch", 2, tmp_path / "out", str(runs["data"]), str(tmp_path / "run"))
    for res in results:
        assert res["type"] == "EngramError"
        assert "rank 1 runs with train.lr=0.001 but rank 0 with train.lr=0.003" in res["error"]
    assert not (tmp_path / "run" / "config.json").exists()


def test_dead_rank_stops_the_others_with_a_clear_error(runs, tmp_path: Path) -> None:
    rc, results = _worker("die-in-step", 2, tmp_path / "out", str(runs["data"]), str(tmp_path / "run"))
    assert rc != 0 and results[1] is None
    assert results[0]["type"] in ("RankFailure", "Terminated"), results[0]  # reported, or stopped by torchrun
    assert results[0]["seconds"] < 30  # the worker's --dist-timeout: it did not hang


def test_batch_that_does_not_split_evenly_is_refused() -> None:
    from engram.config import TrainConfig, preset
    from engram.distributed.parallel import DistributedParallel
    from engram.distributed.world import World
    from engram.errors import EngramError

    world = World(rank=0, size=2, local_rank=0, backend="gloo", device=torch.device("cpu"), tables=None,
                  timeout_s=30.0)
    with pytest.raises(EngramError, match="train.batch_size=5 is not a multiple of the 2 processes"):
        DistributedParallel(world, preset("tiny", 300), TrainConfig(batch_size=5))


def test_silent_rank_is_detected_within_the_timeout(runs, tmp_path: Path) -> None:
    """Rank 1 stays alive with its sockets open but stops at step 3: rank 0's next collective
    gives up after --dist-timeout (5 s here), and torchrun stops rank 1."""
    rc, results = _worker("die-in-hang", 2, tmp_path / "out", str(runs["data"]), str(tmp_path / "run"),
                          timeout=90, ENGRAM_TEST_TIMEOUT="5")
    assert rc != 0
    assert results[0]["type"] == "RankFailure" and "--dist-timeout=5s" in results[0]["error"]
    assert 5 <= results[0]["seconds"] < 30


# ----------------------------------------------------------------------------- benchmark arithmetic
def test_bench_analytic_bytes_and_projection() -> None:
    from engram.bench.distributed import PROJECTION, analytic_bytes, bench_distributed, project
    from engram.errors import EngramError

    # 512 tokens, 1 layer, 8 heads, 128-byte rows on 2 ranks: half the rows are remote, each
    # moves its row, its gradient and its 8-byte id once
    assert analytic_bytes(512, 1, 8, 128, 2) == 512 * 8 * (2 * 128 + 8) / 2
    assert analytic_bytes(512, 1, 8, 128, 1) == 0
    p8, p64 = project(8), project(64)
    assert p8["table_gib_total"] == 16 * 2**20 * 16 * 2 * 128 / 2**30 == 64.0
    assert p64["table_gib_per_gpu"] == 1.0
    # more GPUs: slightly more bytes per GPU ((W-1)/W), and most of them over the slower links
    assert p64["bytes_per_gpu_per_step"] > p8["bytes_per_gpu_per_step"] and p64["comm_s"] > 3 * p8["comm_s"]
    assert 0 < p8["comm_share"] < p64["comm_share"] < 1
    assert project(8, dedup=0.5)["bytes_per_gpu_per_step"] == 0.5 * p8["bytes_per_gpu_per_step"]
    assert PROJECTION["gpus_per_node"] == 8
    with pytest.raises(EngramError, match="batch size divisible"):
        bench_distributed(world=2, batch_size=5)
