"""Offloaded tables in the model: same numbers as in memory, prefetch, loading, CLI switches."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from engram.cli.main import main
from engram.config import TrainConfig
from engram.data.shards import load_dataset
from engram.model.checkpoint import load_model
from engram.model.generation import SamplingConfig, generate
from engram.tables.runtime import (
    OffloadedEmbedding,
    attach_tables,
    build_model_without_tables,
    load_model_with_tables,
    table_runtime,
)
from engram.tables.tablefile import TableMismatchError, read_header, read_layer, save_model_tables
from engram.tables.tiers import CachedStorage, MemoryStorage, MmapStorage, StorageConfig, StorageError
from engram.training.evaluation import evaluate
from engram.training.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tiny):
    m = tiny.model()
    with torch.no_grad():
        for e in m.engram_layers:
            e.table.weight.normal_()  # make rows matter for the output
    return m


@pytest.fixture(scope="module")
def table_file(tmp_path_factory, model):
    return save_model_tables(model, tmp_path_factory.mktemp("t") / "tiny.engt")


def _offloaded(tiny, model, header, kind: str, prefetch: bool, capacity: int = 64):
    m = build_model_without_tables(model.cfg, tiny.compression())
    m.load_state_dict({k: v for k, v in model.state_dict().items()
                       if "multi_head_embedding.embedding" not in k}, strict=False)
    storages = {}
    for lid in header.layers:
        base = MmapStorage(header, lid, io_threads=2)
        storages[lid] = base if kind == "mmap" else CachedStorage(base, capacity, "lru")
    attach_tables(m, storages, prefetch=prefetch)
    return m.eval()


@pytest.mark.parametrize("kind", ["mmap", "cached"])
@pytest.mark.parametrize("prefetch", [True, False])
def test_offloaded_model_is_bit_identical(model, table_file, kind, prefetch, tiny):
    m = _offloaded(tiny, model, table_file, kind, prefetch)
    rt = table_runtime(m)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(2):
            x = torch.randint(0, tiny.VOCAB, (2, 24), generator=gen)
            assert torch.equal(m(x).logits, model(x).logits)
        if kind == "cached":
            prompt = torch.randint(0, tiny.VOCAB, (2, 5), generator=gen)
            s = SamplingConfig(max_new_tokens=6, temperature=0.9, seed=3)
            assert torch.equal(generate(m, prompt, s), generate(model, prompt, s))  # incremental hash
    st = rt.stats()
    assert st["lookups"] > 0 and st["stall_s"] > 0 and st["prefetch"] is prefetch
    assert (st["fetches"] > 0) is prefetch  # without prefetch every fetch is synchronous
    rt.close()


def test_prefetch_batches_run_ahead(model, table_file, tiny):
    m = _offloaded(tiny, model, table_file, "cached", True)
    rt = table_runtime(m)
    batches = [(torch.randint(0, tiny.VOCAB, (2, 16)), torch.randint(0, tiny.VOCAB, (2, 16))) for _ in range(4)]
    seen = []
    with torch.no_grad():
        for (x, y), (bx, by) in zip(rt.prefetch_batches(batches), batches):
            assert x is bx and y is by  # yielded unchanged, so the forward finds its ticket
            seen.append(m(x, y).loss)
            assert not rt._current.futures  # every layer took its prefetched rows
    want = [model(x, y).loss for x, y in batches]
    assert all(torch.equal(a, b) for a, b in zip(seen, want))
    assert rt.fetches == 4  # one per batch: nothing fetched twice
    rt.close()


def test_evaluate_uses_prefetch_and_matches(tmp_path, model, table_file, tiny):
    data_dir = tiny.dataset(tmp_path / "data", vocab_size=tiny.VOCAB)
    shard = load_dataset(data_dir).val
    m = _offloaded(tiny, model, table_file, "cached", True)
    a = evaluate(model, shard, 2, 16, 4)
    b = evaluate(m, shard, 2, 16, 4)
    assert a["loss"] == b["loss"]
    assert table_runtime(m).fetches == 4
    table_runtime(m).close()


def test_placeholder_model_allocates_no_table(model, tiny):
    m = build_model_without_tables(model.cfg, tiny.compression())
    emb = m.engram_layers[0].table
    assert isinstance(emb, OffloadedEmbedding) and emb.weight.is_meta
    assert m.param_counts() == model.param_counts()
    assert m.hasher.fingerprint() == model.hasher.fingerprint()
    with pytest.raises(StorageError, match="--table FILE"):
        m(torch.zeros(1, 4, dtype=torch.long))


def test_runtime_refuses_wrong_storage_shapes(model, table_file, tiny):
    m = build_model_without_tables(model.cfg, tiny.compression())
    with pytest.raises(ValueError, match="storages for layers"):
        attach_tables(m, {}, prefetch=False)
    with pytest.raises(ValueError, match="needs"):
        attach_tables(m, {1: MemoryStorage(torch.zeros(3, model.cfg.engram.head_dim))}, prefetch=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_side_stream_prefetch(model, table_file, tiny):
    m = _offloaded(tiny, model, table_file, "cached", True).to("cuda")
    rt = attach_tables(m, {l: CachedStorage(MmapStorage(table_file, l), 64) for l in table_file.layers},
                       prefetch=True, device="cuda")
    x = torch.randint(0, tiny.VOCAB, (2, 24))
    with torch.no_grad():
        ref = model(x).logits
        out = m(x.cuda()).logits.cpu()
        batches = [(x, x)]
        for bx, by in rt.prefetch_batches(batches):
            assert bx.is_cuda
            m(bx, by)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    rt.close()


# ----------------------------------------------------------------------------- checkpoints + CLI
@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny):
    d = tmp_path_factory.mktemp("cli")
    data_dir = tiny.dataset(d / "data", vocab_size=tiny.VOCAB)
    run_dir = d / "run"
    tiny.save_run(run_dir, data_dir)
    return d, data_dir, run_dir


def test_cli_convert_inspect_eval_generate(run, capsys):
    d, data_dir, run_dir = run
    table = d / "tiny.engt"
    assert main(["table", "convert", str(run_dir), str(table), "--quiet"]) == 0
    assert main(["table", "inspect", str(table), "--verify", "--json"]) == 0
    info = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert info["verified"] == {"1": True} and info["dtype"] == "fp32"

    base = ["eval", "--ckpt", str(run_dir), "--data", str(data_dir), "--max-batches", "2"]
    assert main(base) == 0
    plain = json.loads(capsys.readouterr().out)
    for extra in (["--table", str(table)],  # cached tier in a helper process, prefetch on
                  ["--table", str(table), "--storage", "mmap", "--no-prefetch", "--no-fetch-process"],
                  ["--table", str(table), "--storage", "memory"], ["--prefetch"]):
        assert main(base + extra + ["--cache-rows", "100"]) == 0
        res = json.loads(capsys.readouterr().out)
        assert res["loss"] == plain["loss"], extra
    assert res["tables"]["storage"] == "memory"

    gen = ["generate", "--ckpt", str(run_dir), "--prompt", "the cat", "--max-new-tokens", "8",
           "--temperature", "0"]
    assert main(gen) == 0
    text = capsys.readouterr().out
    assert main(gen + ["--table", str(table), "--cache-rows", "50"]) == 0
    out = capsys.readouterr()
    assert out.out == text and "hit rate" in out.err and "tokens/s" in out.err


def test_cli_table_round_trips(run, capsys):
    d, data_dir, run_dir = run
    table, half = d / "rt.engt", d / "rt-bf16.engt"
    assert main(["table", "convert", str(run_dir), str(table), "--quiet"]) == 0
    assert main(["table", "convert", str(table), str(half), "--dtype", "bf16", "--quiet"]) == 0
    h, hb = read_header(table), read_header(half)
    assert hb.dtype == "bf16" and hb.fingerprint == h.fingerprint
    assert hb.file_bytes < 0.6 * h.file_bytes
    assert torch.equal(read_layer(hb, 1), read_layer(h, 1).bfloat16().float())
    out_run = d / "from-bf16"
    assert main(["table", "convert", str(half), str(out_run), "--base", str(run_dir), "--quiet"]) == 0
    m, _ = load_model(out_run)
    assert torch.equal(m.engram_layers[0].table.weight, read_layer(hb, 1))
    assert main(["table", "convert", str(half), str(out_run), "--base", str(run_dir), "--quiet"]) == 2
    assert "already holds a checkpoint" in capsys.readouterr().err


def test_mismatched_table_is_refused(run, tmp_path, capsys, tiny):
    d, data_dir, run_dir = run
    other = tiny.model(seed=1)  # same shapes, other hash (its compression differs from the dataset's)
    bad = save_model_tables(other, tmp_path / "other.engt")
    with pytest.raises(TableMismatchError, match="hash configuration"):
        load_model_with_tables(run_dir, StorageConfig(path=str(bad.path), kind="cached"))
    rc = main(["eval", "--ckpt", str(run_dir), "--data", str(data_dir), "--table", str(bad.path)])
    assert rc == 2 and "wrong places" in capsys.readouterr().err


def test_train_prefetch_and_table_init(run, tmp_path, tiny):
    d, data_dir, run_dir = run
    from engram.config import preset

    cfg = preset("tiny", tiny.VOCAB)
    tc = dict(steps=3, batch_size=2, seq_len=16, warmup_steps=1, eval_every=3, eval_batches=1,
              save_every=3, log_every=1, seed=3)
    a = train(cfg, TrainConfig(**tc), data_dir, tmp_path / "a", progress=False)
    b = train(cfg, TrainConfig(**tc, prefetch=True), data_dir, tmp_path / "b", progress=False)
    la = [json.loads(l)["loss"] for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    lb = [json.loads(l)["loss"] for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert la == lb and a["final_val_loss"] == b["final_val_loss"]  # prefetch changes only timing

    table = d / "init.engt"
    main(["table", "convert", str(run_dir), str(table), "--quiet"])
    c = train(cfg, TrainConfig(**{**tc, "steps": 1}), data_dir, tmp_path / "c", progress=False,
              tables_from=table)
    assert c["steps"] == 1
    with pytest.raises(ValueError, match="fresh run"):
        train(cfg, TrainConfig(**tc), data_dir, tmp_path / "c", progress=False, resume=True, tables_from=table)


def test_bench_offload_runs_end_to_end_on_tiny_sizes(tmp_path, tiny):
    """The benchmark's four modes agree bit for bit and it reports what the docs say it does."""
    from engram.bench.offload import bench_offload

    data = tiny.dataset(tmp_path / "data")
    before = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    res = bench_offload(str(data), batch_size=2, seq_len=32, rounds=3, batches_per_round=2,
                        warm_batches=2, cache_rows=64, rows_per_head=256, io_threads=2,
                        workdir=str(tmp_path), process=True, capacity_batches=3, standin_batches=3)
    assert res["outputs_equal"] is True
    assert len(res["repeats"]) == 3 and [r["rounds"] for r in res["repeats"]] == [[1, 1], [2, 2], [3, 3]]
    lo, hi = res["overhead_vs_in_memory_prefetch_spread"]
    assert lo <= hi and lo == min(r["overhead_vs_in_memory_prefetch"] for r in res["repeats"])
    cap = res["capacity"]
    assert res["capacity_tokens_per_s"] == cap["tokens_per_s"] > 0 and cap["tokens"] == 3 * 2 * 32
    assert 0 < cap["distinct_rows_per_token"] <= 8  # one Engram layer of 8 heads
    # the paper's speed and 0.5x, 1x, 2x the capacity, slowest first; a stand-in is never faster than its speed
    speeds = [f["standin_tokens_per_s"] for f in res["fast_forward"]]
    assert speeds == sorted(speeds) and 9031 in speeds and len(speeds) == 4
    for f in res["fast_forward"]:
        assert f["offload_tokens_per_s"] <= f["standin_tokens_per_s"] * 1.01
        assert f["in_memory_prefetch_tokens_per_s"] <= f["standin_tokens_per_s"] * 1.01
    assert res["table"]["file_to_pool"] >= 2  # the file is bigger than the pool
    assert 0 <= res["hit_rate"] <= 1 and res["in_memory_tokens_per_s"] > 0
    assert res["overhead"] == pytest.approx(1 - res["offload_tokens_per_s"] / res["in_memory_tokens_per_s"])
    if before is not None:
        assert os.sched_getaffinity(0) == before  # the pinning is undone
        assert (res["cpu_pinning"] is None) == (len(before) < 2)
    assert not list(tmp_path.glob("engram-bench-*"))  # the temporary table is gone


def test_bench_offload_text_leads_with_plain_in_ram_tables(monkeypatch, capsys):
    """The printed headline is the overhead against plain in-RAM tables, the prefetch runtime's beside it."""
    import engram.bench.offload as offload
    from engram.cli.main import main

    res = {"in_memory_tokens_per_s": 1000.0, "offload_tokens_per_s": 980.0, "overhead": 0.02, "hit_rate": 0.8,
           "no_prefetch_tokens_per_s": 800.0, "no_prefetch_overhead": 0.2, "prefetch_speedup": 1.22,
           "repeats": [{}, {}, {}], "overhead_spread": [0.01, 0.03], "overhead_vs_in_memory_prefetch": 0.005,
           "overhead_vs_in_memory_prefetch_spread": [-0.01, 0.02], "capacity_tokens_per_s": 5000.0,
           "capacity": {"distinct_rows_per_s": 4e4, "distinct_rows_per_token": 8.0}, "fast_forward": [],
           "table": {"file_bytes": 2**30, "pool_bytes": 2**28, "file_to_pool": 4.0}, "cold_storage": "cold"}
    monkeypatch.setattr(offload, "bench_offload", lambda *a, **k: res)
    assert main(["bench", "offload", "--data", "unused"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "overhead vs plain in-RAM tables +2.0%, 3 repeats: +1.0% .. +3.0%" in out[1]
    assert "prefetch runtime: overhead +0.5%" in out[3]


def _child_pids() -> set[int]:
    """This process's children, zombies included, read from /proc (no psutil)."""
    me, out = os.getpid(), set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:  # it ended meanwhile
                continue
            # "pid (comm) state ppid ...": comm may contain spaces or ')', so split after the last ')'
            if int(stat.rsplit(")", 1)[1].split()[1]) == me:
                out.add(int(d.name))
    return out


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads /proc")
@pytest.mark.parametrize("failing", ["_pin_cpus", "attach_tables"])
def test_bench_offload_ends_its_helper_processes_when_a_stage_fails(tmp_path, monkeypatch, failing, tiny):
    """A stage failing after fetch helpers started - right before the timed rounds, or while the
    last offloaded model is being built (its storages open, not yet attached): the error
    propagates and nothing is left behind."""
    import engram.bench.offload as offload

    data = tiny.dataset(tmp_path / "data")
    before = _child_pids()
    at_failure = {}
    calls = []
    real = getattr(offload, failing)

    def fail_on_last_call(*args, **kwargs):
        calls.append(1)
        if failing == "attach_tables" and len(calls) < 3:  # the third call builds the last model
            return real(*args, **kwargs)
        at_failure["helpers"] = _child_pids() - before
        raise RuntimeError("stage failed")

    monkeypatch.setattr(offload, failing, fail_on_last_call)
    with pytest.raises(RuntimeError, match="stage failed"):
        offload.bench_offload(str(data), batch_size=2, seq_len=32, rounds=1, batches_per_round=2,
                              warm_batches=2, cache_rows=64, rows_per_head=256, io_threads=2,
                              workdir=str(tmp_path), process=True, pin=True, threads=2,
                              capacity_batches=2, standin_batches=2)
    assert at_failure["helpers"]  # helpers were running when the stage failed...
    assert _child_pids() - before == set()  # ...and all of them have ended and been reaped
    assert torch.get_num_threads() == 1  # one_thread's setting is back
    assert not list(tmp_path.glob("engram-bench-*"))  # the temporary table is gone
