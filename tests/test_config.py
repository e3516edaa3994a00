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
    ({"rows_per_head": (100,)}, "needs 2"),
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


@pytest.mark.parametrize("cls,data,msg", [
    (TrainConfig, {"steps": "abc"}, "TrainConfig.steps='abc': expected an integer"),
    (TrainConfig, {"steps": 5.5}, "TrainConfig.steps=5.5: expected an integer"),
    (TrainConfig, {"steps": True}, "TrainConfig.steps=True: expected an integer"),
    (TrainConfig, {"prefetch": 1}, "TrainConfig.prefetch=1: expected true or false"),
    (TrainConfig, {"lr": "0.1"}, "TrainConfig.lr='0.1': expected a number"),
    (TrainConfig, {"betas": [0.9]}, r"TrainConfig.betas=\[0.9\]: expected a list of 2 numbers"),
    (ModelConfig, {"engram": {"layer_ids": [1, "2"]}},
     r"ModelConfig.engram.layer_ids=\[1, '2'\]: expected a list of integers"),
    (ModelConfig, {"engram": 3}, "ModelConfig.engram=3: expected a JSON object or null"),
    (ModelConfig, {"input_ngram": {"rows_per_head": 1.5}}, "ModelConfig.input_ngram.rows_per_head=1.5: expected an integer"),
])
def test_from_dict_refuses_wrong_types(cls, data, msg):
    with pytest.raises(ConfigError, match=msg):
        cls.from_dict(data)


def test_from_dict_accepts_what_json_gives():
    t = TrainConfig.from_dict({"lr": 1, "betas": [0.8, 0.9], "prefetch": True})  # int as float, list as tuple
    assert t.lr == 1 and t.betas == (0.8, 0.9) and t.prefetch is True
    m = ModelConfig.from_dict({"engram": None, "input_ngram": {"kind": "bigram"}, "rope_theta": 10000})
    assert m.engram is None and m.input_ngram.kind == "bigram"


def test_config_file_and_set_values_are_type_checked(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"train": {"steps": 5.5}}))
    with pytest.raises(ConfigError, match=rf"^{f}: train.steps=5.5: expected an integer$"):
        build_configs("tiny", 100, str(f), [])
    f.write_text(json.dumps({"model": {"engram": {"use_gate": 0}}}))
    with pytest.raises(ConfigError, match="model.engram.use_gate=0: expected true or false"):
        build_configs("tiny", 100, str(f), [])
    f.write_text(json.dumps({"train": [1]}))
    with pytest.raises(ConfigError, match="section 'train' must be a JSON object"):
        build_configs("tiny", 100, str(f), [])
    with pytest.raises(ConfigError, match=r"^engram.layer_ids=1: expected a list of integers$"):
        build_configs("tiny", 100, None, ["engram.layer_ids=1"])
    with pytest.raises(ConfigError, match=r"^train.steps='abc': expected an integer$"):
        build_configs("tiny", 100, None, ["train.steps=abc"])
    m, t = build_configs("tiny", 100, None, ["train.lr=1", "engram.layer_ids=[0]", "model.ffn=dense"])
    assert t.lr == 1 and m.engram.layer_ids == (0,) and m.ffn == "dense"


# ----------------------------------------------------------------------------- old key names
def test_old_names_of_rows_per_head_still_load(tmp_path):
    old = {"engram_vocab_size": [101, 103], "max_ngram_size": 3, "layer_ids": [0]}
    assert EngramConfig.from_dict(old).rows_per_head == (101, 103)
    assert ModelConfig.from_dict({"input_ngram": {"table_size": 61}}).input_ngram.rows_per_head == 61
    with pytest.raises(ConfigError, match="'engram_vocab_size' is the old name of 'rows_per_head'"):
        EngramConfig.from_dict({**old, "rows_per_head": [101, 103]})
    with pytest.raises(ConfigError, match=r"EngramConfig.rows_per_head='x': expected a list of integers"):
        EngramConfig.from_dict({**old, "engram_vocab_size": "x"})
    m, _ = build_configs("tiny", 100, None, ["engram.engram_vocab_size=[211,223]"])
    assert m.engram.rows_per_head == (211, 223) and "engram_vocab_size" not in m.engram.to_dict()
    f = tmp_path / "c.json"
    eng = preset("tiny", 100).engram.to_dict()
    eng["engram_vocab_size"] = [307, 311]
    del eng["rows_per_head"]
    f.write_text(json.dumps({"model": {"engram": eng}}))
    assert build_configs("tiny", 100, str(f), [])[0].engram.rows_per_head == (307, 311)


def test_old_retrofit_key_and_flags_still_work():
    from engram.cli.main import build_parser
    from engram.config import RetrofitConfig

    assert RetrofitConfig.from_dict({"table_size": 997}).rows_per_head == 997
    p = build_parser()
    for flag in ("--rows-per-head", "--table-size"):
        args = p.parse_args(["retrofit", "train", "--data", "d", "--out", "o", flag, "997"])
        assert args.rows_per_head == 997
    for flag in ("--rows-per-head", "--table-rows"):
        assert p.parse_args(["bench", "offload", flag, "4099"]).rows_per_head == 4099
