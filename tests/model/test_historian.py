"""The historian: an Engram memory as one routed expert of DeepSeekMoE (engram.placement = "expert")."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from engram.config import ConfigError, EngramConfig, ModelConfig, SamplingConfig, TrainConfig, preset
from engram.errors import EngramError
from engram.model.checkpoint import load_model, save_checkpoint
from engram.model.historian import HistorianExpert
from engram.model.lm import EngramLM
from engram.model.moe import DeepSeekMoE
from engram.training.trainer import build_optimizers

VOCAB = 300


def _cfg(**over) -> ModelConfig:
    cfg = preset("tiny", VOCAB)
    return dataclasses.replace(cfg, engram=dataclasses.replace(cfg.engram, placement="expert"), **over)


def _model(seed: int = 0, **over) -> EngramLM:
    torch.manual_seed(seed)
    model = EngramLM(_cfg(**over)).eval()
    with torch.no_grad():  # distinct rows and a non-zero bias, so a wrong read shows
        for x in model.historian_experts:
            x.table.weight.normal_()
            x.value_proj.bias.normal_()
    return model


# ----------------------------------------------------------------------------- config
def test_placement_is_validated_with_the_fix_named():
    with pytest.raises(ConfigError, match=r"placement='nowhere'.*'layer', 'expert'"):
        EngramConfig(placement="nowhere")
    with pytest.raises(ConfigError, match=r"ffn='dense' has no experts"):
        _cfg(ffn="dense")
    with pytest.raises(ConfigError, match=r"layer_ids \[1\] are dense layers \(first_k_dense=2\)"):
        _cfg(first_k_dense=2)
    with pytest.raises(ConfigError, match="n_routed_experts >= 2"):
        _cfg(n_routed_experts=1, num_experts_per_tok=1)
    with pytest.raises(ConfigError, match="expected a string"):
        ModelConfig.from_dict({**_cfg().to_dict(), "engram": {**_cfg().engram.to_dict(), "placement": 1}})


def test_config_dicts_round_trip_and_the_default_is_not_written():
    cfg = _cfg()
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg and cfg.to_dict()["engram"]["placement"] == "expert"
    # Left at "layer", the key is not written: config files and sweep run keys stay as they were.
    assert "placement" not in preset("tiny", VOCAB).to_dict()["engram"]
    assert ModelConfig.from_dict(preset("tiny", VOCAB).to_dict()).engram.placement == "layer"


# ----------------------------------------------------------------------------- structure and forward
def test_the_memory_takes_the_last_routed_slot_and_no_engram_layer_is_built():
    model = _model()
    moe = model.layers[1].ffn
    assert isinstance(moe, DeepSeekMoE) and moe.n_experts == 4 and len(moe.experts) == 4
    assert isinstance(moe.experts[3], HistorianExpert) and moe.historian_index == 3
    assert model.engram_layers == [] and model.historian_experts == [moe.experts[3]]
    assert model.layers[0].ffn.historian is None  # layer 0 is not in layer_ids
    # its table is an Engram table: counted, and trained in the table optimizer
    table = moe.experts[3].table.weight
    assert model.engram_tables()[1].weight is table
    assert any(p is table for p in model.table_parameters())
    assert model.param_counts()["tables"] == table.numel()
    opts = build_optimizers(model, TrainConfig(table_lr_mult=5.0))
    tab = opts["tables"].param_groups[0]
    assert any(p is table for p in tab["params"]) and tab["lr"] == pytest.approx(5 * TrainConfig().lr)
    assert all(p is not table for g in opts["backbone"].param_groups for p in g["params"])


def test_forward_shapes_and_gradients_reach_the_table():
    model = _model().train()
    ids = torch.randint(0, VOCAB, (2, 17))
    out = model(ids, ids)
    assert out.logits.shape == (2, 17, VOCAB)
    out.loss.backward()
    x = model.historian_experts[0]
    assert x.table.weight.grad is not None and x.table.weight.grad.abs().sum() > 0
    assert x.value_proj.weight.grad.abs().sum() > 0


def test_a_token_routed_to_the_historian_gets_its_engram_read():
    model = _model()
    moe = model.layers[1].ffn
    with torch.no_grad():  # force every token to pick the historian (and one SwiGLU, expert 0)
        moe.expert_bias.copy_(torch.tensor([50.0, -50.0, -50.0, 50.0]))
    ids = torch.randint(0, VOCAB, (2, 11))
    hash_ids = model.compute_hash_ids(ids)[1]  # [B,T,H]
    x = torch.randn(2, 11, 64)
    with torch.no_grad():
        got = moe(x, hash_ids)
        idx, w = moe.route(x.reshape(-1, 64))
        hist = moe.experts[3]
        e = hist.multi_head_embedding(hash_ids).flatten(-2)  # the Engram read [B,T,E]
        read = hist.value_proj(e).reshape(-1, 64)
        assert bool((idx == 3).any(-1).all())
        w_h = (w * (idx == 3)).sum(-1, keepdim=True)
        w_0 = (w * (idx == 0)).sum(-1, keepdim=True)
        want = w_h * read + w_0 * moe.experts[0](x.reshape(-1, 64)) + moe.shared(x.reshape(-1, 64))
        torch.testing.assert_close(got.reshape(-1, 64), want, atol=1e-5, rtol=1e-5)
        # the ablation zeroes the historian's share only
        off = moe(x, hash_ids, zero_historian=True).reshape(-1, 64)
        torch.testing.assert_close(off, want - w_h * read, atol=1e-5, rtol=1e-5)
        # the model wires the layer's hash ids in: its logits follow the table rows
        base, ablated = model(ids).logits, model(ids, ablate_engram=True).logits
        hist.table.weight.add_(1.0)
        assert not torch.allclose(model(ids).logits, base)
        assert torch.equal(model(ids, ablate_engram=True).logits, ablated)  # ablated: no row is read
    with pytest.raises(EngramError, match="hash ids"):
        moe(x)


def test_balancing_counts_and_nudges_the_historian_like_any_expert():
    model = _model().train()
    moe = model.layers[1].ffn
    with torch.no_grad():  # the historian is picked by every token: overloaded
        moe.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 50.0]))
    ids = torch.randint(0, VOCAB, (2, 9))
    model(ids)
    assert moe.load_accum[3] == 18  # every token once
    before = moe.expert_bias.clone()
    model.update_moe_bias()
    assert moe.expert_bias[3] == before[3] - moe.bias_update_speed  # pushed down, as any overloaded one
    assert bool((moe.expert_bias[:3] >= before[:3]).all())


@pytest.mark.parametrize("hc", [1, 2])
def test_incremental_decoding_matches_the_full_forward(hc):
    model = _model(hc_mult=hc)
    ids = torch.randint(0, VOCAB, (2, 23))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(2)
        parts = [model(ids[:, :9], cache=cache).logits]
        parts += [model(ids[:, t:t + 1], cache=cache).logits for t in range(9, 17)]
        parts.append(model(ids[:, 17:], cache=cache).logits)
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # generation with the cache (greedy) equals argmax of full forwards
        out = model.generate(ids[:, :5], SamplingConfig(max_new_tokens=6, temperature=0.0))
        for t in range(5, out.shape[1]):
            assert torch.equal(out[:, t], model(out[:, :t]).logits[:, -1].argmax(-1))


def test_checkpoint_round_trip_keeps_the_option_and_the_logits(tmp_path: Path):
    model = _model()
    save_checkpoint(tmp_path / "run", model, None, None, TrainConfig(batch_size=2, seq_len=16))
    loaded, _ = load_model(tmp_path / "run")
    assert loaded.cfg.engram.placement == "expert" and len(loaded.historian_experts) == 1
    ids = torch.randint(0, VOCAB, (2, 13))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert torch.equal(loaded.layers[1].ffn.expert_bias, model.layers[1].ffn.expert_bias)


def test_file_backed_table_tiers_are_refused_with_the_fix_named(tiny, tmp_path: Path):
    from engram.training.trainer import train

    data_dir = tiny.training_dataset(tmp_path / "data", vocab_size=VOCAB, n_docs=10)
    cfg = preset("tiny", int(json.loads((data_dir / "meta.json").read_text())["vocab_size"]))
    cfg = dataclasses.replace(cfg, engram=dataclasses.replace(cfg.engram, placement="expert"))
    with pytest.raises(EngramError, match="table_storage='mmap' is not supported with engram.placement='expert'"):
        train(cfg, TrainConfig(steps=1, batch_size=2, seq_len=16, table_storage="mmap", table_optimizer="sparse_adam"),
              data_dir, tmp_path / "run", progress=False)
