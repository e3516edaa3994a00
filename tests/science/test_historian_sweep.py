"""The historian arm of the sweeps and its routing statistics (engram.science.routing)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from engram.config import ModelConfig, TrainConfig, preset
from engram.data.shards import load_dataset
from engram.model.lm import EngramLM
from engram.science.routing import frequency_bands, historian_routing, token_classes
from engram.science.sweep import BUDGET_TOL, SweepSpec, builtin_sweep, plan, resolve


def _only(spec: SweepSpec, names: set[str]) -> SweepSpec:
    return dataclasses.replace(spec, configs=[c for c in spec.configs if c.name in names])


def test_historian_sweep_fills_the_arm_to_the_moe_budget():
    spec = builtin_sweep("historian", 4096)
    assert [c.name for c in spec.configs] == ["moe", "engram", "historian", "historian-lr1"]
    lr1 = next(c for c in spec.configs if c.name == "historian-lr1")
    assert lr1.train == {"table_lr_mult": 1.0} and lr1.group == "historian" and lr1.model == spec.configs[2].model
    res = {r.name: r for r in resolve(_only(spec, {"moe", "historian"}))}
    ref, h = res["moe"].account, res["historian"]
    assert abs(h.account["total"] - ref["total"]) <= BUDGET_TOL * ref["total"]
    cfg = ModelConfig.from_dict(h.model)
    assert cfg.engram.placement == "expert" and cfg.n_routed_experts == 12 and h.account["table_params"] > 0
    # activated: the MoE's within 1% (k SwiGLU experts per layer, the memory's rows counted)
    assert abs(h.account["activated_per_token"] / ref["activated_per_token"] - 1) < 0.01


def test_moe_and_engram_arms_share_their_runs_with_the_baselines_sweep(tmp_path):
    both = {"moe", "engram"}
    _, hist = plan(_only(builtin_sweep("historian"), both), tmp_path)
    _, base = plan(_only(builtin_sweep("baselines"), both), tmp_path)
    assert sorted((p.config, p.seed, p.run_dir) for p in hist) == sorted((p.config, p.seed, p.run_dir) for p in base)


def test_token_classes_split_words_case_and_pieces():
    texts = ["<pad>", " The", " cat", " Lon", "don", ".", " is", "ing", " big", "\n", " Paris", " went"]
    # ". The cat Lon don. The big \n Paris went" (ids), next tokens shifted by one
    x = np.array([[5, 1, 2, 3, 4, 5, 1, 8, 9, 10, 11]])
    y = np.array([[1, 2, 3, 4, 5, 1, 8, 9, 10, 11, 0]])
    c = token_classes(x, y, texts)
    at = lambda name: list(np.nonzero(c[name][0])[0])
    assert at("first") == [3] and at("last") == [4]  # " Lon" + "don"
    assert at("single") == [1, 2, 6, 7, 9, 10] and at("other") == [5, 8]
    assert at("capitalised") == [3, 4]  # London, mid-sentence; position 0 is never classed
    assert at("sentence-initial capitalised") == [1, 6, 9]  # " The" after ".", " Paris" after a line break
    assert at("lower-case word") == [2, 7, 10]


def test_frequency_bands_split_the_training_mass():
    tokens = np.array([0] * 60 + [1] * 30 + [2] * 6 + [3] * 4)
    assert list(frequency_bands(tokens, 5)) == [0, 1, 2, 2, 2]  # 60% | next 30% | the last 10%


def test_routing_statistics_on_the_test_windows(tiny, tmp_path):
    data_dir = tiny.training_dataset(tmp_path / "data", vocab_size=300, n_docs=30)
    vocab = int(load_dataset(data_dir).meta["vocab_size"])
    cfg = preset("tiny", vocab)
    cfg = dataclasses.replace(cfg, engram=dataclasses.replace(cfg.engram, placement="expert"))
    torch.manual_seed(0)
    model = EngramLM(cfg)
    tcfg = TrainConfig(batch_size=4, seq_len=32, eval_batches=4)
    assert historian_routing(EngramLM(preset("tiny", vocab)), data_dir, tcfg) is None  # no historian
    moe = model.layers[1].ffn
    with torch.no_grad():
        moe.expert_bias[moe.historian_index] = 50.0  # every token picks it
    r = historian_routing(model, data_dir, tcfg, {"activated_per_token": 1000})
    assert r["split"] == "test" and r["uniform"] == pytest.approx(2 / 4)
    assert r["overall"]["pick_rate"] == 1.0 and r["overall"]["ratio"] == pytest.approx(2.0)
    assert r["overall"]["tokens"] == 2 * 4 * 32  # the test half: 2 of the 4 batches
    assert r["per_layer"]["1"]["expert_bias"] == 50.0
    assert sum(r["by_class"][k]["tokens"] for k in ("frequent", "mid", "rare")) == r["overall"]["tokens"]
    # every token read the memory: the expected activated count swaps one SwiGLU for it everywhere
    h = model.historian_experts[0]
    swap = 3 * 64 * 32 - sum(p.numel() for p in h.value_proj.parameters())
    assert r["expected_activated_per_token"] == pytest.approx(1000 - swap)
    with torch.no_grad():
        moe.expert_bias[moe.historian_index] = -50.0  # never picked
    r = historian_routing(model, data_dir, tcfg)
    assert r["overall"]["pick_rate"] == 0.0 and "expected_activated_per_token" not in r


def test_results_page_is_rendered_from_the_summary(tmp_path, benchmark_script):
    page = benchmark_script("historian_page")
    acc = {"total": 1000, "activated_per_token": 500, "table_params": 0}
    stats = lambda rate, n: {"tokens": n, "pick_rate": rate, "ratio": rate / 0.25, "weight": 0.4}
    routing = {"uniform": 0.25, "top_k": 2, "n_routed_experts": 8, "expected_activated_per_token": 480.0,
               "overall": stats(0.5, 100),
               "per_layer": {"1": {"overall": stats(0.5, 100), "expert_bias": -0.01, "expert_bias_others_mean": 0.0}},
               "by_class": {c: stats(0.6, 10) for _, cs in page.CLASS_ORDER for c in cs}}

    def row(name, losses, group="", chosen=None, table=0, rt=False):
        return {"config": name, "seeds": [0, 1, 2], "test_loss": losses, "dev_loss": [x + 0.5 for x in losses],
                "group": group, "chosen": chosen, "account": {**acc, "table_params": table},
                "routing": {str(s): routing for s in (0, 1, 2)} if rt else {}}

    summary = {"spec": {"train": {"steps": 5, "batch_size": 2, "seq_len": 8}, "vocab_size": 300, "seeds": [0, 1, 2],
                        "configs": [{"name": "historian-lr1", "train": {"table_lr_mult": 1.0}}]},
               "runs_done": 12, "runs_total": 12, "missing": [],
               "rows": [row("moe", [4.60, 4.62, 4.61]), row("engram", [4.50, 4.53, 4.52], table=9),
                        row("historian", [4.55, 4.58, 4.56], "historian", True, 9, True),
                        row("historian-lr1", [4.70, 4.50, 4.62], "historian", False, 9, True)]}
    text = page.render(summary, "engram sweep run --name historian", "abc1234")
    assert "helps (-0.0467 nats, p = " in text  # historian vs moe: lower in every seed
    assert "**historian vs engram**: hurts (+0.0467" in text
    assert "historian (chosen on dev) | 5x" in text and "historian-lr1 | 1x" in text
    assert "| **all** | all | 50.00% ± 0.00% | 2.00 |" in text and "| 480 |" in text
    assert "0: 4.5500, 1: 4.5800, 2: 4.5600" in text and "abc1234" in text
    assert "chosen on dev (mean dev loss: historian 5.0633, historian-lr1 5.1067): **historian**" in text
    partial = {**summary, "rows": summary["rows"][:3]}  # the 1x setting never ran: no choice is claimed
    assert "was not chosen on dev: only historian has all its runs" in page.render(partial, "", "")
    out = tmp_path / "page.md"
    (tmp_path / "s.json").write_text(json.dumps(summary))
    page.main([str(tmp_path / "s.json"), str(out), "--commit", "abc1234"])
    assert out.read_text() == text.replace("engram sweep run --name historian", "# (commands not given)")
