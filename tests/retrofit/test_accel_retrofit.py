"""Retrofit training with --dtype / --compile / --device, and compiled decoder layers of a base.

Compiled runs here use torch.compile's "eager" backend (the graphs dynamo captures, run as they
are: agreement to 1e-6) so that they take seconds; the device check runs the real compiler.
"""

import functools
import json

import pytest
import torch

from engram.cli.main import main
from engram.config import RetrofitConfig
from engram.hashing.compression import build_compression
from engram.model import accel
from engram.retrofit.base import load_base, weights_digest
from engram.retrofit.model import RetrofitLM

SMALL = ["--rows-per-head", "997", "--n-embed-per-ngram", "32", "--n-head-per-ngram", "2"]


def _train_argv(tiny_base, out, *extra):
    return ["retrofit", "train", "--base", str(tiny_base["base"]), "--data", str(tiny_base["data"]),
            "--layers", "1", "--out", str(out), *SMALL, "--steps", "6", "--batch-size", "2", "--seq-len", "32",
            "--lr", "3e-2", "--warmup-steps", "1", "--eval-every", "6", "--eval-batches", "1", "--log-every", "1",
            "--quiet", *extra]


def _losses(out):
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_compiled_decoder_layers_keep_the_engram_hook(tiny_base, one_thread):
    base = load_base(str(tiny_base["base"]))
    cfg = RetrofitConfig(base=base.name, layers=(1,), rows_per_head=997, n_embed_per_ngram=32, n_head_per_ngram=2)
    model = RetrofitLM(base.model, cfg, build_compression(base.tokenizer).lookup, base.pad_id)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # Engram changes the logits (it adds exact zeros at init)
        for p in model.engram_layers[0].parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    ids = torch.randint(3, 300, (1, 20), generator=g)
    with torch.no_grad():
        eager = model(ids).logits
        with model.without_engram():
            plain = model(ids).logits
        assert accel.compile_backbone(model, backend="eager") == 3  # the tiny Llama's 3 decoder layers
        compiled = model(ids).logits
    assert (compiled - eager).abs().max().item() <= 1e-6
    assert not torch.allclose(compiled, plain)  # the pre-hook ran outside the compiled forward
    accel.uncompile_backbone(model)
    assert all("forward" not in layer.__dict__ for layer in base.model.model.layers)
    model.remove_hooks()


def test_retrofit_train_bf16_compiled(tiny_base, tmp_path, monkeypatch, one_thread):
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    digest = weights_digest(load_base(str(tiny_base["base"])).model)
    out = tmp_path / "a"
    assert main(_train_argv(tiny_base, out, "--dtype", "bf16", "--compile", "--device", "cpu")) == 0
    losses = _losses(out)
    assert len(losses) == 6 and all(map(torch.isfinite, torch.tensor(losses)))
    assert min(losses[-2:]) < losses[0], losses  # bf16 training moves the loss down
    recorded = json.loads((out / "adapter_config.json").read_text())["train"]
    assert (recorded["dtype"], recorded["compile"]) == ("bf16", True)
    assert weights_digest(load_base(str(tiny_base["base"])).model) == digest


def test_retrofit_bad_device_and_dtype_are_one_line(tiny_base, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:  # argparse refuses the choice
        main(_train_argv(tiny_base, tmp_path / "a", "--dtype", "fp16"))
    assert exc.value.code == 2 and "--dtype: invalid choice: 'fp16'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(_train_argv(tiny_base, tmp_path / "b", "--device", "cuda")) == 2
        err = capsys.readouterr().err
        assert err.startswith("engram: error: --device cuda: ") and err.count("\n") == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("extra", [[], ["--dtype", "bf16"]])
def test_cuda_retrofit_train(tiny_base, tmp_path, extra):
    out = tmp_path / "cuda"
    assert main(_train_argv(tiny_base, out, "--device", "cuda", *extra)) == 0
    losses = _losses(out)
    assert min(losses[-2:]) < losses[0], losses
    assert main(["eval", "--ckpt", str(out), "--data", str(tiny_base["data"]), "--max-batches", "1",
                 "--device", "cuda", *extra]) == 0
