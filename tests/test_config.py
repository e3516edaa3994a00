"""Configs refuse bad values and unknown keys with messages that name them."""

import json

import pytest

from engram.cli.main import main
from engram.config import PRESETS, ConfigError, EngramConfig, ModelConfig, TrainConfig, build_configs, preset


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_roundtrip_through_json(name):
    cfg = preset(name, 512)
    again = ModelConfig.from_dict(json.loads(cfg.to_json()))
    assert again == cfg


def test_unknown_key_is_refused():
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['hiden_size'\]"):
        ModelConfig.from_dict({"hiden_size": 3})
    with pytest.raises(ConfigError, match="EngramConfig"):
        ModelConfig.from_dict({"engram": {"layer_ids": [0], "nope": 1}})


@pytest.mark.parametrize("kwargs,msg", [
    ({"max_ngram_size": 1}, "max_ngram_size=1"),
    ({"engram_vocab_size": (100,)}, "needs 2"),
    ({"n_embed_per_ngram": 30, "n_head_per_ngram": 4}, "divisible"),
    ({"layer_ids": (1, 1)}, "distinct"),
])
def test_engram_config_validation(kwargs, msg):
    with pytest.raises(ConfigError, match=msg):
        EngramConfig(**kwargs)


def test_model_config_validation():
    with pytest.raises(ConfigError, match="outside the 2 layers"):
        ModelConfig(num_layers=2, engram=EngramConfig(layer_ids=(5,)))
    with pytest.raises(ConfigError, match="num_experts_per_tok=9"):
        ModelConfig(ffn="moe", n_routed_experts=8, num_experts_per_tok=9)
    with pytest.raises(ConfigError, match="ffn='mlp'"):
        ModelConfig(ffn="mlp")
    with pytest.raises(ConfigError, match="lr=0"):
        TrainConfig(lr=0)


def test_cli_overrides(tmp_path):
    m, t = build_configs("engram-moe", 1000, None, ["train.steps=7", "engram.layer_ids=[0,2]", "model.ffn=dense"])
    assert t.steps == 7 and m.engram.layer_ids == (0, 2) and m.ffn == "dense" and m.vocab_size == 1000
    with pytest.raises(ConfigError, match="unknown train key 'stepz'"):
        build_configs("tiny", 100, None, ["train.stepz=3"])
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"model": {"hidden_size": 96}, "bogus": {}}))
    with pytest.raises(ConfigError, match="unknown section"):
        build_configs("tiny", 100, str(f), [])


def test_cli_reports_bad_input_without_traceback(tmp_path, capsys):
    rc = main(["eval", "--ckpt", str(tmp_path / "missing"), "--data", str(tmp_path)])
    assert rc == 2
    assert capsys.readouterr().err.startswith("engram: error:")
