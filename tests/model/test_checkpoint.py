"""Checkpoints: round trips, refusal of damaged or inconsistent runs, atomic saves."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import engram.model.checkpoint as ckpt
from engram.config import TrainConfig, preset
from engram.model.checkpoint import CheckpointError, load_model, save_checkpoint
from engram.model.lm import EngramLM
from engram.training import checkpointing
from engram.training.checkpointing import load_for_resume, save_training_checkpoint
from engram.training.trainer import build_optimizers

VOCAB = 300


def _compression() -> np.ndarray:
    lookup = np.arange(VOCAB, dtype=np.int64) // 2  # pairs of ids share a compressed id
    lookup[0] = 0
    return lookup


def _model(name: str = "tiny", seed: int = 0) -> EngramLM:
    torch.manual_seed(seed)
    return EngramLM(preset(name, VOCAB), _compression() if name == "tiny" else None)


def _trained(model: EngramLM, steps: int = 2) -> dict[str, torch.optim.Optimizer]:
    """A couple of optimizer steps so that weights and moments are non-trivial."""
    opts = build_optimizers(model, TrainConfig())
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randint(0, VOCAB, (2, 16), generator=gen)
        model(x, x).loss.backward()
        for o in opts.values():
            o.step()
            o.zero_grad()
        model.update_moe_bias()
    return opts


def _logits(model: EngramLM) -> torch.Tensor:
    x = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(7))
    model.eval()
    with torch.no_grad():
        return model(x).logits


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, EngramLM, dict]:
    model = _model()
    opts = _trained(model)
    run = tmp_path / "run"
    save_training_checkpoint(run, model, opts, {"step": 2, "best_val_loss": None}, TrainConfig())
    return run, model, opts


def _revouch(run: Path, name: str) -> None:
    """Record a hand-replaced file in the manifest, so only its content is under test."""
    _edit_config(run, lambda d: d["files"].update({name: ckpt._file_digest(run / name)}))


def _edit_config(run: Path, fn) -> None:
    path = run / "config.json"
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("name", ["tiny", "tiny-dense"])
def test_roundtrip_gives_identical_logits(tmp_path: Path, name: str) -> None:
    model = _model(name)
    _trained(model)
    save_checkpoint(tmp_path / "run", model, None, None, None)
    loaded, meta = load_model(tmp_path / "run")
    assert torch.equal(_logits(model), _logits(loaded))
    assert loaded.lm_head.weight is loaded.embed.weight  # tie restored, not two copies
    assert meta.model_config.to_dict() == model.cfg.to_dict()
    if name == "tiny":
        assert meta.hash_fingerprint == model.hasher.fingerprint()
        np.testing.assert_array_equal(loaded.hasher.lookup, model.hasher.lookup)
        # MoE balancing buffers are state, not parameters: they must survive too
        assert torch.equal(loaded.layers[1].ffn.expert_bias, model.layers[1].ffn.expert_bias)
    else:
        assert meta.hash_fingerprint is None and not (tmp_path / "run" / "compression.npy").exists()


def test_no_pickle_anywhere(saved) -> None:
    run, _, _ = saved
    names = sorted(p.name for p in run.iterdir())
    assert names == ["compression.npy", "config.json", "model.safetensors",
                     "optimizer.safetensors", "trainer_state.json"]
    np.load(run / "compression.npy", allow_pickle=False)  # plain int64 array


def test_optimizer_state_roundtrip(saved) -> None:
    run, model, opts = saved
    fresh = _model(seed=99)
    fresh_opts = build_optimizers(fresh, TrainConfig())
    state, meta = load_for_resume(run, fresh, fresh_opts)
    assert state["step"] == 2 and meta.step == 2 and "optimizers" not in state
    assert set(fresh_opts) == {"backbone", "tables"}
    for name, opt in opts.items():
        want, got = opt.state_dict(), fresh_opts[name].state_dict()
        assert want["param_groups"] == got["param_groups"]
        assert want["state"].keys() == got["state"].keys()
        for idx, entry in want["state"].items():
            for key, value in entry.items():
                assert torch.equal(value, got["state"][idx][key]), (name, idx, key)
    assert torch.equal(_logits(model), _logits(fresh))


def test_rng_state_roundtrip() -> None:
    torch.manual_seed(3)
    np.random.seed(3)
    state = json.loads(json.dumps(checkpointing.capture_rng_state()))  # must survive JSON
    a = (torch.rand(3), np.random.rand(3))
    torch.manual_seed(0)
    np.random.seed(0)
    checkpointing.restore_rng_state(state)
    b = (torch.rand(3), np.random.rand(3))
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1])


# ----------------------------------------------------------------------------- refusals
def test_truncated_weights_are_named(saved) -> None:
    run, _, _ = saved
    path = run / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated"):
        load_model(run)


def test_truncated_weights_without_manifest_entry(saved) -> None:
    """Even when config.json cannot vouch for the file, a cut file is a clear error."""
    run, _, _ = saved
    _edit_config(run, lambda d: d["files"]["model.safetensors"].clear())
    path = run / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is not a complete safetensors file"):
        load_model(run)


def test_corrupted_bytes_same_size(saved) -> None:
    run, _, _ = saved
    path = run / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors has sha256 .* damaged"):
        load_model(run)


def test_unknown_model_config_key(saved) -> None:
    run, _, _ = saved
    _edit_config(run, lambda d: d["model"].update(hiden_size=64))
    with pytest.raises(CheckpointError, match=r"config\.json.*unknown config key\(s\) \['hiden_size'\]"):
        load_model(run)


def test_unknown_engram_and_top_level_keys(saved) -> None:
    run, _, _ = saved
    _edit_config(run, lambda d: d["model"]["engram"].update(sead=1))
    with pytest.raises(CheckpointError, match=r"\['sead'\]"):
        load_model(run)
    _edit_config(run, lambda d: (d["model"]["engram"].pop("sead"), d.update(extra=1)))
    with pytest.raises(CheckpointError, match=r"unknown key\(s\) \['extra'\]"):
        load_model(run)


def test_invalid_json(saved) -> None:
    run, _, _ = saved
    (run / "config.json").write_text('{"format": ')
    with pytest.raises(CheckpointError, match=r"config\.json is not valid JSON"):
        load_model(run)


def test_hash_fingerprint_mismatch_from_edited_seed(saved) -> None:
    run, model, _ = saved
    _edit_config(run, lambda d: d["model"]["engram"].update(seed=5))
    with pytest.raises(CheckpointError) as err:
        load_model(run)
    msg = str(err.value)
    assert msg.startswith("checkpoint hash config differs from the model's: recorded "
                          f"{model.hasher.fingerprint()}, rebuilt ")
    assert "restore the original engram settings" in msg


def test_hash_fingerprint_mismatch_from_other_compression(saved) -> None:
    run, _, _ = saved
    other = np.arange(VOCAB, dtype=np.int64) // 3
    np.save(run / "compression.npy", other, allow_pickle=False)
    _revouch(run, "compression.npy")
    with pytest.raises(CheckpointError, match="checkpoint hash config differs"):
        load_model(run)


def test_pickled_compression_refused(saved) -> None:
    run, _, _ = saved
    np.save(run / "compression.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    _revouch(run, "compression.npy")
    with pytest.raises(CheckpointError, match=r"compression\.npy is not a valid \.npy"):
        load_model(run)


def test_missing_and_unexpected_keys_named(saved) -> None:
    run, _, _ = saved
    path = run / "model.safetensors"
    tensors = load_file(str(path))
    tensors.pop("norm.weight")
    tensors["bogus.weight"] = torch.zeros(2)
    save_file(tensors, str(path))
    _revouch(run, "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing keys \['norm.weight'\].*unexpected keys \['bogus.weight'\]"):
        load_model(run)


def test_weights_only_checkpoint_cannot_resume(tmp_path: Path) -> None:
    model = _model()
    save_checkpoint(tmp_path / "run", model, None, None, None)
    assert not (tmp_path / "run" / "trainer_state.json").exists()
    with pytest.raises(CheckpointError, match="holds weights only .* cannot be resumed"):
        load_for_resume(tmp_path / "run", _model(), build_optimizers(_model(), TrainConfig()))
    save_checkpoint(tmp_path / "run", model, None, {"step": 5}, None)
    with pytest.raises(CheckpointError, match="no optimizer.safetensors"):
        load_for_resume(tmp_path / "run", _model(), build_optimizers(_model(), TrainConfig()))


def test_resume_into_other_model_refused(saved) -> None:
    run, _, _ = saved
    other = EngramLM(preset("tiny-dense", VOCAB))
    with pytest.raises(CheckpointError, match="model config differs.*engram"):
        load_for_resume(run, other, build_optimizers(other, TrainConfig()))


def test_not_a_run_dir(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="config.json not found"):
        load_model(tmp_path)


# ----------------------------------------------------------------------------- atomicity
def test_failed_save_keeps_previous_checkpoint(saved, monkeypatch) -> None:
    run, model, opts = saved
    before = _logits(load_model(run)[0])
    files_before = {p.name: p.read_bytes() for p in run.iterdir()}
    _trained(model, steps=1)  # the next save would hold different weights

    real_save_file = ckpt.save_file

    def failing_save_file(tensors, filename, metadata=None):
        if str(filename).endswith("optimizer.safetensors"):
            Path(filename).write_bytes(b"half a file")  # a partial write, then the crash
            raise OSError("disk full")
        return real_save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ckpt, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_training_checkpoint(run, model, opts, {"step": 3}, TrainConfig())
    assert {p.name: p.read_bytes() for p in run.iterdir()} == files_before  # untouched, no temp dir
    assert torch.equal(_logits(load_model(run)[0]), before)


def test_crash_between_renames_is_detected(saved, monkeypatch) -> None:
    """A crash after model.safetensors moved in but before config.json did: no silent mix."""
    run, model, opts = saved
    _trained(model, steps=1)
    real_replace = os.replace
    calls = []

    def crash_after_first(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies mid-commit
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        save_training_checkpoint(run, model, opts, {"step": 3}, TrainConfig())
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    assert not any(p.name.startswith(".tmp-") for p in run.iterdir())
    with pytest.raises(CheckpointError, match=r"model\.safetensors has sha256 .*another save"):
        load_model(run)
    save_training_checkpoint(run, model, opts, {"step": 3}, TrainConfig())  # a later save repairs the run
    assert torch.equal(_logits(load_model(run)[0]), _logits(model))


def test_save_removes_stale_files(saved) -> None:
    run, model, _ = saved
    save_checkpoint(run, model, None, None, None)  # weights only now
    assert not (run / "optimizer.safetensors").exists()
    load_model(run)


def test_checkpoint_with_the_old_table_size_key_loads_and_resumes(saved) -> None:
    """Runs saved before ``rows_per_head`` was named so spell it ``engram_vocab_size``."""
    run, model, _ = saved
    _edit_config(run, lambda d: d["model"]["engram"].update(
        engram_vocab_size=d["model"]["engram"].pop("rows_per_head")))
    loaded, meta = load_model(run)
    assert meta.model_config.engram.rows_per_head == model.cfg.engram.rows_per_head
    assert torch.equal(_logits(loaded), _logits(model))
    fresh = _model(seed=3)
    state, _ = load_for_resume(run, fresh, build_optimizers(fresh, TrainConfig()))
    assert state["step"] == 2
