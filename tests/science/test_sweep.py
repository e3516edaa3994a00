"""Sweeps: accounting, budgets held by construction, baselines, paired statistics, resumable runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engram.config import InputNgramConfig, InputNgramError, ModelConfig, preset
from engram.model.lm import EngramLM
from engram.science.accounting import AccountingError, account, check_budget
from engram.science.knowledge import FactItem, FactSet, evaluate_facts
from engram.science.sweep import (
    SweepError,
    SweepSpec,
    builtin_sweep,
    plan,
    resolve,
    run_sweep,
    summary_table,
    write_summary,
)


# ----------------------------------------------------------------------------- accounting
@pytest.mark.parametrize("name", ["dense", "moe", "engram-moe", "tiny", "tiny-dense"])
def test_account_total_matches_model(name):
    cfg = preset(name, 512)
    acc = account(cfg, 64)
    counts = EngramLM(cfg).param_counts()
    assert acc["total"] == counts["total"]
    assert acc["table_params"] == counts["tables"]
    assert acc["backbone_params"] == counts["backbone"]
    assert 0 < acc["activated_per_token"] <= acc["total"]
    assert acc["flops_per_token"] > 0


def test_account_activated_counts_topk_experts_and_rows():
    moe = preset("moe", 512)
    acc = account(moe)
    per_expert = 3 * moe.hidden_size * moe.moe_intermediate_size
    moe_layers = moe.num_layers - moe.first_k_dense
    unused = moe_layers * (moe.n_routed_experts - moe.num_experts_per_tok) * per_expert
    assert acc["total"] - acc["activated_per_token"] == unused
    eng = preset("engram-moe", 512)
    acc_e = account(eng)
    rows = eng.engram.engram_hidden_size * len(eng.engram.layer_ids)
    assert acc_e["total"] - acc_e["activated_per_token"] == unused + acc_e["table_params"] - rows


def test_check_budget_names_numbers():
    check_budget("x", 1000, 1003, 0.005)
    with pytest.raises(AccountingError, match="not within"):
        check_budget("x", 1100, 1000, 0.005)


# ----------------------------------------------------------------------------- budgets
def test_rho_sweep_holds_total_and_routed_activation():
    res = resolve(builtin_sweep("rho", 4096))
    assert len(res) >= 5 and res[0].x == 1.0
    ref = res[0].account
    for r in res:
        assert abs(r.account["total"] - ref["total"]) <= 0.005 * ref["total"]
        m = r.model
        assert m["num_experts_per_tok"] == 2 and m["moe_intermediate_size"] == 64  # same routed FLOPs
    xs = [r.x for r in res]
    assert xs == sorted(xs, reverse=True) and min(xs) <= 0.5
    # the sparse budget (routed + tables) stays within Engram's projection overhead of the reference
    for r in res[1:]:
        assert r.account["table_params"] > 0


def test_baselines_share_the_budget():
    res = {r.name: r for r in resolve(builtin_sweep("baselines", 4096))}
    total = res["moe"].account["total"]
    for name in ("engram", "bigram-hash", "overencoding", "engram-no-gate", "engram-hc4", "engram-4gram"):
        assert abs(res[name].account["total"] - total) <= 0.005 * total, name
    assert res["bigram-hash"].model["input_ngram"]["kind"] == "bigram"
    # per-config train overrides reach the run's TrainConfig and give it its own run key
    _, plans = plan(builtin_sweep("baselines", 4096), "/nonexistent")
    lr = {(q.config, q.seed): q for q in plans}
    assert lr[("bigram-hash-lr1", 0)].train["table_lr_mult"] == 1.0
    assert lr[("bigram-hash", 0)].train["table_lr_mult"] == 5.0
    assert lr[("bigram-hash-lr1", 0)].run_dir != lr[("bigram-hash", 0)].run_dir


def test_spec_validation_and_json_roundtrip(tmp_path):
    with pytest.raises(SweepError, match="duplicate"):
        SweepSpec("x", [{"name": "a"}, {"name": "a"}])
    with pytest.raises(SweepError, match="reference"):
        SweepSpec("x", [{"name": "a"}], reference="b")
    with pytest.raises(SweepError, match="unknown key"):
        SweepSpec.from_dict({"name": "x", "configs": [{"name": "a"}], "colour": 1})
    spec = builtin_sweep("smoke", 300)
    again = SweepSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert [r.model for r in resolve(again)] == [r.model for r in resolve(spec)]


# ----------------------------------------------------------------------------- baselines
def test_input_ngram_config_validation():
    with pytest.raises(InputNgramError, match="kind"):
        InputNgramConfig(kind="trigram")
    with pytest.raises(InputNgramError, match="overencoding"):
        InputNgramConfig(kind="bigram", max_ngram_size=3)
    with pytest.raises(InputNgramError, match="every_layer"):
        InputNgramConfig(kind="overencoding", max_ngram_size=3, every_layer=True)


@pytest.mark.parametrize("kind,n,every_layer", [("bigram", 2, False), ("overencoding", 3, False),
                                                ("bigram", 2, True)])
def test_input_ngram_model_trains_and_decodes_incrementally(kind, n, every_layer):
    cfg = preset("tiny-dense", 97)
    cfg.input_ngram = InputNgramConfig(kind=kind, rows_per_head=61, max_ngram_size=n, zero_init=False,
                                       every_layer=every_layer)
    cfg = ModelConfig.from_dict(cfg.to_dict())  # dict round trip (checkpoints)
    torch.manual_seed(0)
    model = EngramLM(cfg).eval()
    assert model.param_counts()["tables"] == 61 * cfg.hidden_size * (n - 1)
    x = torch.randint(0, 97, (2, 9))
    full = model(x).logits
    cache = model.new_cache(2)
    parts = [model(x[:, :4], cache=cache).logits]
    for t in range(4, 9):
        parts.append(model(x[:, t:t + 1], cache=cache).logits)
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
    out = model(x, targets=x)
    out.loss.backward()
    assert model.input_ngram.embedding.weight.grad.abs().sum() > 0
    if every_layer:  # one learned scale per block, each of which the loss depends on
        scales = model.input_ngram.layer_scales
        assert scales.shape == (cfg.num_layers,) and (scales.grad != 0).all()


def test_every_layer_bigram_adds_the_row_before_every_block():
    # With all scales but block i's at zero, the model equals one that adds the row only
    # before block i; with every scale at zero, the plain backbone.
    cfg = preset("tiny-dense", 97)
    cfg.input_ngram = InputNgramConfig(rows_per_head=61, zero_init=False, every_layer=True)
    torch.manual_seed(0)
    model = EngramLM(cfg).eval()
    plain_cfg = preset("tiny-dense", 97)
    torch.manual_seed(0)
    plain = EngramLM(plain_cfg).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("input_ngram.")})
    x = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        model.input_ngram.layer_scales.zero_()
        torch.testing.assert_close(model(x).logits, plain(x).logits, atol=0, rtol=0)
        model.input_ngram.layer_scales[1] = 1.0
        row = model.input_ngram.embedding(model.input_ngram.row_ids(x)).sum(dim=2)  # [B,T,D]
        h = plain.embed(x)
        cos, sin = plain.rope_cos[:9], plain.rope_sin[:9]
        hh = h.unsqueeze(2)
        for i, block in enumerate(plain.layers):
            if i == 1:
                hh = hh + row.unsqueeze(2)
            hh, _ = block(hh, cos, sin, None, None)
        want = plain.lm_head(plain.norm(hh.sum(dim=2)))
        torch.testing.assert_close(model(x).logits, want, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- knowledge
def test_fact_accuracy_matches_greedy_decoding():
    torch.manual_seed(3)
    cfg = preset("tiny-dense", 50)
    model = EngramLM(cfg).eval()
    items = []
    for i in range(6):
        prompt = torch.randint(0, 50, (1, 5))
        seq = prompt
        for _ in range(3):  # the model's own greedy continuation
            nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
        ans = seq[0, 5:].tolist()
        if i % 2:  # corrupt the last answer token: greedy can no longer match
            ans[-1] = (ans[-1] + 1) % 50
        items.append(FactItem("r", tuple(prompt[0].tolist()), tuple(ans), 5.0, True))
    res = evaluate_facts(model, FactSet(items, {"train": 6}, 0), batch_size=4)
    assert res["train"]["accuracy"] == pytest.approx(0.5)
    assert res["train"]["stored_bits_per_fact"] >= 0


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory, tiny) -> Path:

    return tiny.training_dataset(tmp_path_factory.mktemp("sweepdata"), vocab_size=300, n_docs=30)


def test_smoke_sweep_is_resumable_and_exact(tiny_data, tmp_path):
    from engram.science.sweep import _execute

    spec = builtin_sweep("smoke", 300, steps=6)
    runs = tmp_path / "runs"
    _, plans = plan(spec, runs)
    # Interrupt one run after its first step (as a killed sweep would leave it).
    p = next(p for p in plans if p.config == "engram")
    d = {"config": p.config, "seed": p.seed, "model": p.model, "train": p.train, "run_dir": str(p.run_dir)}
    res = _execute(d, str(tiny_data), None, 1, 1e-9)
    assert res["finished"] is False and p.started and not p.done
    logs: list[str] = []
    run_sweep(spec, tiny_data, runs, progress=False, log=logs.append)
    assert all(q.done for q in plans)
    assert any("1 to resume" in line for line in logs)
    resumed = json.loads((p.run_dir / "result.json").read_text())
    assert resumed["resumed_from"] == 1
    # A second call finds everything finished and trains nothing.
    logs.clear()
    run_sweep(spec, tiny_data, runs, progress=False, log=logs.append)
    assert any(f"{len(plans)} runs finished" in line for line in logs)
    # Resume is exact: the same run uninterrupted gives the same loss.
    fresh = tmp_path / "fresh"
    _, plans2 = plan(spec, fresh)
    q = next(q for q in plans2 if q.config == "engram" and q.seed == p.seed)
    d2 = {**d, "run_dir": str(q.run_dir)}
    res2 = _execute(d2, str(tiny_data), None, 1, None)
    assert res2["final_val_loss"] == pytest.approx(resumed["final_val_loss"], abs=1e-6)
    # dev and test are the two halves of the trainer's final evaluation windows: different
    # numbers whose token-weighted mean is the whole validation loss.
    n = spec.train["eval_batches"]
    assert resumed["dev_loss"] != resumed["test_loss"]
    whole = (resumed["dev_loss"] * (n // 2) + resumed["test_loss"] * (n - n // 2)) / n
    assert whole == pytest.approx(resumed["final_val_loss"], abs=1e-5)

    s = write_summary(spec, runs, tmp_path / "out")
    assert s["runs_done"] == len(plans)
    table = summary_table(s)
    assert "engram" in table and "ref" in table
    row = next(r for r in s["rows"] if r["config"] == "engram")
    assert 0 <= row["vs_ref_loss"]["p"] <= 1
    assert {Path(f).name for f in s["plots"]} == {"smoke_loss.png", "smoke_curves.png"}


def test_dev_test_split_uses_the_batches_a_small_validation_split_has(tiny_data):
    """eval_batches far above what the split holds: dev and test are still its two halves (the
    whole validation loss lies between them), not an error or an empty test half."""
    from engram.config import TrainConfig
    from engram.data.shards import load_dataset, num_eval_windows
    from engram.science.sweep import dev_test_losses
    from engram.training.evaluation import evaluate

    torch.manual_seed(0)
    model = EngramLM(ModelConfig.from_dict(resolve(builtin_sweep("smoke", 300))[0].model))
    ds = load_dataset(tiny_data)
    assert 2 <= -(-num_eval_windows(ds.val, 16) // 4) < 10_000
    res = dev_test_losses(model, tiny_data, TrainConfig(batch_size=4, seq_len=16, eval_batches=10_000))
    whole = evaluate(model, ds.val, 4, 16, max_batches=10_000)["loss"]
    assert res["dev_loss"] != res["test_loss"]
    assert min(res.values()) < whole < max(res.values())


def test_group_choice_uses_dev_loss_not_test():
    from engram.science.sweep import _choose_in_groups

    def row(name, group, dev, test):
        return {"config": name, "group": group, "dev_loss": dev, "dev_loss_mean": sum(dev) / len(dev),
                "test_loss": test}

    # b is best on dev, a is best on test: the choice must be b.
    rows = [row("a", "g", [2.0, 2.0], [1.0, 1.0]), row("b", "g", [1.5, 1.5], [3.0, 3.0]),
            row("c", "", [0.1, 0.1], [0.1, 0.1])]
    _choose_in_groups(rows, n_seeds=2)
    assert [r["chosen"] for r in rows] == [False, True, None]
    # A member missing a seed leaves the group undecided.
    rows = [row("a", "g", [2.0, 2.0], [1.0, 1.0]), row("b", "g", [1.5], [3.0])]
    _choose_in_groups(rows, n_seeds=2)
    assert [r["chosen"] for r in rows] == [None, None]


def test_bigram_sweep_is_the_modded_nanogpt_form_at_equal_engram_total():
    spec = builtin_sweep("bigram", 4096)
    res = {r.name: r for r in resolve(spec)}
    lrs = sorted(r.train["table_lr_mult"] for r in res.values() if r.group == "bigram-5v")
    assert len(lrs) >= 3 and lrs[-1] / lrs[0] >= 10
    big = res["bigram-5v-lr1"]
    assert big.model["input_ngram"]["every_layer"] is True
    assert big.model["input_ngram"]["rows_per_head"] == 5 * 4096
    assert big.model["n_routed_experts"] == res["moe"].model["n_routed_experts"]
    for r in res.values():
        if r.group == "engram-iso":
            assert abs(r.account["total"] / big.account["total"] - 1) <= 0.005
            assert r.model["n_routed_experts"] == big.model["n_routed_experts"]


def test_cli_sweep_plan_and_account(capsys):
    from engram.cli.main import main

    assert main(["sweep", "plan", "--name", "rho"]) == 0
    out = capsys.readouterr().out
    assert "rho=0.5" in out and "25 runs" not in out and "15 runs" in out
    assert main(["sweep", "account", "--preset", "moe"]) == 0
    acc = json.loads(capsys.readouterr().out)
    assert acc["total"] == EngramLM(preset("moe", 4096)).param_counts()["total"]


def test_every_builtin_sweep_is_named_in_the_cli_help_and_errors(capsys):
    """The --name help is spelt out (importing the tuple would load torch at --help): it must list
    every built-in sweep, and a wrong name's error lists them from the tuple itself."""
    from engram.cli.main import main
    from engram.science.sweep import BUILTIN_SWEEPS, builtin_sweep

    with pytest.raises(SystemExit):
        main(["sweep", "run", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"built-in sweep: {', '.join(BUILTIN_SWEEPS)}" in help_text
    with pytest.raises(SweepError, match=", ".join(BUILTIN_SWEEPS)):
        builtin_sweep("nope")
