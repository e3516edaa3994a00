"""Training: loss goes down, resume is exact, mismatched data and configs are refused."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import engram.data.shards as data
from engram.config import TrainConfig, preset
from engram.data.shards import load_dataset
from engram.model.checkpoint import CheckpointError, load_model
from engram.model.lm import EngramLM
from engram.training.evaluation import DatasetMismatchError, evaluate, evaluate_run
from engram.training.optimization import lr_at
from engram.training.trainer import build_optimizers, train


def _cfg(**kw) -> TrainConfig:
    base = dict(steps=12, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=3, eval_every=4,
                eval_batches=2, save_every=4, log_every=1, seed=7)
    return TrainConfig(**{**base, **kw})


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _curve(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in _records(run) if "loss" in r]


# ----------------------------------------------------------------------------- learning
def test_loss_decreases_and_outputs(dataset_vocab, dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = _cfg(steps=40, eval_every=20, save_every=20, log_every=5, lr=1e-2)
    summary = train(preset("tiny", dataset_vocab), cfg, dataset, run, progress=False)
    curve = _curve(run)
    assert [s for s, _ in curve] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert curve[-1][1] < curve[0][1] - 1.0, curve
    assert summary["steps"] == 40 and not summary["stopped_early"]
    assert summary["final_val_loss"] < math.log(dataset_vocab) - 1.0  # well below uniform
    assert summary["final_val_ppl"] == pytest.approx(math.exp(summary["final_val_loss"]))
    assert summary["best_val_loss"] <= summary["final_val_loss"]
    assert summary["param_counts"]["tables"] > 0 and summary["tokens_per_s"] > 0
    vals = [r for r in _records(run) if "val_loss" in r]
    assert [r["step"] for r in vals] == [20, 40]  # the end coincides with an eval: no duplicate
    for name in ("config.json", "model.safetensors", "optimizer.safetensors",
                 "trainer_state.json", "compression.npy", "tokenizer.json"):
        assert (run / name).is_file(), name
    # The saved model reproduces the reported validation loss.
    model, meta = load_model(run)
    res = evaluate(model, load_dataset(dataset).val, cfg.batch_size, cfg.seq_len, cfg.eval_batches)
    assert res["loss"] == pytest.approx(summary["final_val_loss"], abs=1e-6)
    assert meta.step == 40
    again = evaluate_run(run, dataset)  # defaults from the run's train config, whole split
    assert again["tokens"] >= res["tokens"] and again["step"] == 40
    assert "unigram_entropy_nats" in again


def test_evaluate_restores_mode_and_counts_tokens(dataset: Path) -> None:
    ds = load_dataset(dataset)
    model = EngramLM(preset("tiny-dense", ds.vocab_size))
    model.train()
    res = evaluate(model, ds.val, batch_size=3, seq_len=16, max_batches=2)
    assert model.training
    assert res["tokens"] == 2 * 3 * 16
    assert res["perplexity"] == pytest.approx(math.exp(res["loss"]))


# ----------------------------------------------------------------------------- exact resume
def _straight(dataset: Path, tmp_path: Path, cfg: TrainConfig, name: str = "tiny") -> Path:
    run = tmp_path / "straight"
    train(preset(name, int(load_dataset(dataset).meta["vocab_size"])), cfg, dataset, run, progress=False)
    return run


def _assert_same_run(a: Path, b: Path) -> None:
    assert _curve(a) == _curve(b)  # bit-for-bit: floats compared exactly
    va = [(r["step"], r["val_loss"]) for r in _records(a) if "val_loss" in r]
    vb = [(r["step"], r["val_loss"]) for r in _records(b) if "val_loss" in r]
    assert va == vb
    ma, mb = load_model(a)[0].state_dict(), load_model(b)[0].state_dict()
    for k in ma:
        assert torch.equal(ma[k], mb[k]), k


def test_resume_after_crash_is_exact(dataset_vocab, dataset: Path, tmp_path: Path, monkeypatch) -> None:
    cfg = _cfg()
    straight = _straight(dataset, tmp_path, cfg)

    run = tmp_path / "crashed"
    real_get_batch = data.get_batch

    def crash_in_step_10(shard, batch_size, seq_len, step, seed, *a, **kw):
        if step == 9:  # batch 9 feeds step 10: step 8 was saved, step 9 logged, then we die
            raise KeyboardInterrupt
        return real_get_batch(shard, batch_size, seq_len, step, seed, *a, **kw)

    monkeypatch.setattr(data, "get_batch", crash_in_step_10)
    with pytest.raises(KeyboardInterrupt):
        train(preset("tiny", dataset_vocab), cfg, dataset, run, progress=False)
    monkeypatch.setattr(data, "get_batch", real_get_batch)
    assert _curve(run)[-1][0] == 9
    assert json.loads((run / "trainer_state.json").read_text())["step"] == 8

    torch.manual_seed(12345)  # scribble on the global RNG: resume must restore it
    summary = train(preset("tiny", dataset_vocab), cfg, dataset, run, resume=True, progress=False)
    assert summary["resumed_from"] == 8 and summary["steps"] == 12
    steps = [r["step"] for r in _records(run)]
    assert steps == sorted(steps) and len(steps) == len(set(steps))  # step 9 was not duplicated
    _assert_same_run(straight, run)


def test_time_budget_stops_saves_and_resumes_exactly(dataset_vocab, dataset: Path, tmp_path: Path) -> None:
    cfg = _cfg(steps=8, log_every=2, eval_every=4, save_every=4)
    straight = _straight(dataset, tmp_path, cfg)
    run = tmp_path / "budget"
    first = train(preset("tiny", dataset_vocab), cfg, dataset, run, progress=False, max_seconds=0)
    assert first["stopped_early"] and first["steps"] == 1  # one step, then the budget is gone
    assert json.loads((run / "trainer_state.json").read_text())["step"] == 1
    # Step 1 is logged as a partial interval; its sum is saved, so step 2 logs the full mean.
    train(preset("tiny", dataset_vocab), cfg, dataset, run, resume=True, progress=False)
    assert [s for s, _ in _curve(run)] == [1, 2, 4, 6, 8]
    assert [c for c in _curve(run) if c[0] != 1] == _curve(straight)
    ma, mb = load_model(straight)[0].state_dict(), load_model(run)[0].state_dict()
    assert all(torch.equal(ma[k], mb[k]) for k in ma)


def test_resume_can_extend_steps(dataset_vocab, dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = _cfg(steps=4, eval_every=4, save_every=4)
    train(preset("tiny-dense", dataset_vocab), cfg, dataset, run, progress=False)
    summary = train(preset("tiny-dense", dataset_vocab), replace(cfg, steps=6), dataset, run,
                    resume=True, progress=False)
    assert summary["steps"] == 6 and [s for s, _ in _curve(run)] == [1, 2, 3, 4, 5, 6]


# ----------------------------------------------------------------------------- refusals
def test_resume_refuses_changed_recipe(dataset_vocab, dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = _cfg(steps=2, save_every=2, eval_every=2)
    model_cfg = preset("tiny-dense", dataset_vocab)
    train(model_cfg, cfg, dataset, run, progress=False)
    with pytest.raises(CheckpointError, match=r"train config \['lr'\] differ.*recorded 0.003"):
        train(model_cfg, replace(cfg, lr=1e-3), dataset, run, resume=True, progress=False)
    with pytest.raises(CheckpointError, match=r"model config differs.*hidden_size"):
        train(preset("tiny-dense", dataset_vocab).__class__(
            **{**model_cfg.__dict__, "hidden_size": 32, "num_heads": 2}), cfg, dataset, run,
            resume=True, progress=False)
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        train(model_cfg, cfg, dataset, tmp_path / "empty", resume=True, progress=False)


def test_dataset_from_another_tokenizer_is_refused(dataset_vocab, dataset: Path, tmp_path: Path, tiny) -> None:
    other = tiny.training_dataset(tmp_path / "other", seed=1)  # same vocab size, different merges
    assert int(load_dataset(other).meta["vocab_size"]) == dataset_vocab
    run = tmp_path / "run"
    cfg = _cfg(steps=2, save_every=2, eval_every=2)
    model_cfg = preset("tiny", dataset_vocab)
    train(model_cfg, cfg, dataset, run, progress=False)
    with pytest.raises(DatasetMismatchError, match=r"tokenized with tokenizer .* but run .* was "
                                                   r"trained with tokenizer .*prepare the data with "
                                                   r"the run's tokenizer.json"):
        train(model_cfg, replace(cfg, steps=4), other, run, resume=True, progress=False)
    with pytest.raises(DatasetMismatchError, match="tokenized with tokenizer"):
        evaluate_run(run, other)


def test_vocab_mismatch_is_refused(dataset_vocab, dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetMismatchError, match=rf"vocab_size={dataset_vocab} but the model "
                                                   rf"config has vocab_size=512; set ModelConfig"):
        train(preset("tiny", 512), _cfg(), dataset, tmp_path / "run", progress=False)


def test_seq_len_beyond_model_is_refused(dataset_vocab, dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="seq_len=128 exceeds max_seq_len=64"):
        train(preset("tiny", dataset_vocab), _cfg(seq_len=128), dataset, tmp_path / "run",
              progress=False)


# ----------------------------------------------------------------------------- recipe
def test_param_groups() -> None:
    model = EngramLM(preset("tiny", 300))
    cfg = TrainConfig(lr=1e-3, table_lr_mult=5.0, weight_decay=0.1)
    opts = build_optimizers(model, cfg)
    tables = opts["tables"]
    assert type(tables) is torch.optim.Adam and type(opts["backbone"]) is torch.optim.AdamW
    (tg,) = tables.param_groups
    assert tg["lr_mult"] == 5.0 and tg["weight_decay"] == 0.0 and tg["lr"] == pytest.approx(5e-3)
    assert {id(p) for p in tg["params"]} == {id(p) for p in model.table_parameters()}
    decay, no_decay = opts["backbone"].param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    seen = [id(p) for o in opts.values() for g in o.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())  # each exactly once


def test_fused_adam_is_the_same_update_up_to_rounding() -> None:
    # fused_adam (the default) picks torch's one-pass kernels; False the for-loop implementation.
    # Both must take the same step, apart from float rounding (one step: after that the rounding
    # differences feed back through the forward and grow, as any two builds' would).
    models, opts = {}, {}
    for fused in (True, False):
        torch.manual_seed(0)
        models[fused] = EngramLM(preset("tiny", 300)).train()
        opts[fused] = build_optimizers(models[fused], TrainConfig(lr=1e-2, fused_adam=fused))
        assert all(bool(o.defaults.get("fused")) is fused for o in opts[fused].values())
    x = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    before = [p.detach().clone() for p in models[True].parameters()]
    for fused, m in models.items():
        m(x, x).loss.backward()
        for o in opts[fused].values():
            o.step()
            o.zero_grad(set_to_none=True)
    stepped, differ = set(), 0
    for (name, a), b, a0 in zip(models[True].named_parameters(), models[False].parameters(), before):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7, msg=name)  # steps are about lr = 1e-2
        if not torch.equal(a, a0):
            stepped.add(name)
        differ += int(not torch.equal(a, b))
    assert any("multi_head_embedding" in n for n in stepped) and len(stepped) > 20
    assert differ  # the two implementations really ran (they round differently somewhere)


def test_param_groups_hyper_connections_not_decayed() -> None:
    cfg = preset("tiny-dense", 300)
    cfg.hc_mult = 2
    model = EngramLM(cfg)
    decay = build_optimizers(model, TrainConfig())["backbone"].param_groups[0]["params"]
    hc = {id(p) for n, p in model.named_parameters() if ".hc_" in n}
    assert hc and not hc & {id(p) for p in decay}


def test_lr_schedule() -> None:
    sched = dict(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, **sched) == pytest.approx(0.1)
    assert lr_at(9, **sched) == pytest.approx(1.0)
    assert lr_at(10, **sched) == pytest.approx(1.0)
    assert lr_at(55, **sched) == pytest.approx(0.55)
    assert lr_at(100, **sched) == pytest.approx(0.1)
    lrs = [lr_at(s, **sched) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_bench_step_reports_both_models_by_phase(dataset: Path, one_thread) -> None:
    from engram.bench.step import PHASES, bench_step

    r = bench_step(str(dataset), rounds=2, steps=1, batch_size=2, seq_len=16)
    assert r["bench"] == "step" and len(r["overhead_per_round"]) == 2
    assert min(r["overhead_per_round"]) <= r["overhead"] <= max(r["overhead_per_round"])
    assert r["overhead_spread"] == [min(r["overhead_per_round"]), max(r["overhead_per_round"])]
    ms = r["phase_median_ms"]
    assert set(ms["moe"]) == set(PHASES) and ms["engram-moe"]["hash"] > 0
    assert ms["moe"]["opt_tables"] == 0.0 < ms["engram-moe"]["opt_tables"]  # moe has no tables to step
    assert r["params"]["engram-moe"]["tables"] > 0 == r["params"]["moe"]["tables"]
    json.dumps(r)
