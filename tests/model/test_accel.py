"""Device, bf16 autocast and compiled blocks (engram.model.accel) and their training options.

Tolerances: torch.compile's "eager" and "aot_eager" backends run the graphs dynamo captures (the
second with their traced backward) on the same ATen ops, so they must match eager to 1e-6 (the
default suite checks training losses with "eager", the slow tests logits and gradients). The
"inductor" backend (what ``train.compile`` uses) generates fused kernels that reorder float sums:
logits and gradients must match to 1e-4 absolute (probes on the tiny preset measured under 5e-7
on logits and 2e-7 on gradients).
bf16 autocast is judged by training: its loss must fall.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path

import pytest
import torch

from engram.cli.main import main
from engram.config import ConfigError, Precision, TrainConfig, preset
from engram.model import accel
from engram.model.lm import EngramLM
from engram.training.trainer import train

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _cfg(**kw) -> TrainConfig:
    base = dict(steps=12, batch_size=4, seq_len=32, lr=1e-2, warmup_steps=2, eval_every=12,
                eval_batches=1, save_every=12, log_every=1, seed=7)
    return TrainConfig(**{**base, **kw})


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def _step(model: EngramLM, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(x, targets=y)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _mixed(tiny) -> EngramLM:
    """The tiny model with a dense FFN in layer 0 and a DeepSeekMoE in layer 1 (Engram at 1)."""
    torch.manual_seed(0)
    return EngramLM(dataclasses.replace(preset("tiny", tiny.VOCAB), first_k_dense=1), tiny.compression())


def _compiled_vs_eager(tiny, backend: str) -> tuple[float, float]:
    model = _mixed(tiny).train()
    g = torch.Generator().manual_seed(1)
    x, y = (torch.randint(0, tiny.VOCAB, (2, 24), generator=g) for _ in range(2))
    ref_logits, ref_grads = _step(model, x, y)
    assert accel.compile_backbone(model, backend=backend) == 3  # 2 attention steps, 1 dense FFN
    logits, grads = _step(model, x, y)
    assert grads.keys() == ref_grads.keys()
    return ((logits - ref_logits).abs().max().item(),
            max((grads[k] - ref_grads[k]).abs().max().item() for k in grads))


# ----------------------------------------------------------------------------- compile
@pytest.mark.slow
def test_aot_compiled_blocks_trace_the_eager_ops(tiny, one_thread) -> None:
    d_logits, d_grads = _compiled_vs_eager(tiny, "aot_eager")  # and their traced backward
    assert d_logits <= 1e-6 and d_grads <= 1e-6


@pytest.mark.slow
def test_inductor_compiled_blocks_agree_with_eager(tiny, one_thread) -> None:
    d_logits, d_grads = _compiled_vs_eager(tiny, "inductor")
    assert d_logits <= 1e-4 and d_grads <= 1e-4


def test_compile_leaves_engram_and_moe_eager_and_is_undone(tiny) -> None:
    model = _mixed(tiny)
    accel.compile_backbone(model, backend="eager")
    dense, moe = model.layers
    assert dense.compiled_attention is not None and dense.compiled_ffn is not None
    assert moe.compiled_attention is not None and moe.compiled_ffn is None
    assert all(not hasattr(e, "compiled_attention") for e in model.engram_layers)
    accel.uncompile_backbone(model)
    assert all(b.compiled_attention is None and b.compiled_ffn is None for b in model.layers)
    with pytest.raises(accel.EngramError, match="neither an EngramLM"):
        accel.compile_backbone(torch.nn.Linear(2, 2))


def test_train_compile_matches_eager_training(dataset_vocab, dataset, tmp_path, monkeypatch, one_thread) -> None:
    # The eager backend: the trainer's compiled path, without minutes of kernel generation.
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    cfg = _cfg(steps=3, eval_every=3, save_every=3)
    eager = train(preset("tiny", dataset_vocab), cfg, dataset, tmp_path / "eager", progress=False)
    compiled = train(preset("tiny", dataset_vocab), TrainConfig.from_dict({**cfg.to_dict(), "compile": True}),
                     dataset, tmp_path / "compiled", progress=False)
    assert _losses(tmp_path / "compiled") == pytest.approx(_losses(tmp_path / "eager"), abs=1e-5)
    assert compiled["final_val_loss"] == pytest.approx(eager["final_val_loss"], abs=1e-5)
    recorded = json.loads((tmp_path / "compiled" / "config.json").read_text())
    assert recorded["train"]["compile"] is True


# ----------------------------------------------------------------------------- bf16
def test_bf16_autocast_computes_in_bf16_with_float32_weights(tiny) -> None:
    model = tiny.model().train()
    x = torch.randint(0, tiny.VOCAB, (2, 16))
    with accel.autocast("bf16", "cpu"):
        out = model(x, targets=x)
    assert out.logits.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    out.loss.backward()
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32
               for p in model.parameters() if p.grad is not None)
    with accel.autocast(Precision.FP32, "cpu"):
        assert model(x).logits.dtype == torch.float32


@pytest.mark.parametrize("fast", [True, False])
def test_bf16_on_a_cpu_that_emulates_it_warns_once_with_the_fix(monkeypatch, fast) -> None:
    import warnings

    monkeypatch.setattr(accel, "cpu_has_fast_bf16", lambda: fast)
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        with accel.autocast("bf16", "cpu"):
            pass
        with accel.autocast("fp32", "cpu"):
            pass
    said = [str(w.message) for w in got if issubclass(w.category, RuntimeWarning)]
    assert said == ([] if fast else [said[0]])
    assert fast or ("--dtype bf16: this CPU" in said[0] and "leave --dtype bf16 out" in said[0])
    assert isinstance(accel.cpu_has_fast_bf16(), bool)


def test_bf16_trains(dataset_vocab, dataset, tmp_path, one_thread) -> None:
    run = tmp_path / "bf16"
    summary = train(preset("tiny", dataset_vocab), _cfg(dtype="bf16"), dataset, run, progress=False)
    losses = _losses(run)
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5, losses  # falls well below the first step
    assert math.isfinite(summary["final_val_loss"]) and summary["final_val_loss"] < math.log(dataset_vocab)
    assert json.loads((run / "config.json").read_text())["train"]["dtype"] == "bf16"


# ----------------------------------------------------------------------------- bad values
def test_bad_values_are_one_line_errors(dataset, tmp_path, capsys) -> None:
    with pytest.raises(ConfigError, match=r"dtype='fp16'; choose one of \['fp32', 'bf16'\]"):
        TrainConfig(dtype="fp16")
    with pytest.raises(accel.DeviceError, match="not a device"):
        accel.resolve_device("banana")
    with pytest.raises(accel.DeviceError, match="cpu or cuda"):
        accel.resolve_device("meta")
    with pytest.raises(accel.DeviceError, match="dtype='int8'"):
        accel.autocast("int8", "cpu")
    assert accel.resolve_device("cpu") == torch.device("cpu")
    base = ["train", "--data", str(dataset), "--out", str(tmp_path / "r"), "--preset", "tiny", "--quiet"]
    assert main([*base, "--set", "train.dtype=fp16"]) == 2
    assert "dtype='fp16'" in capsys.readouterr().err
    assert main([*base, "--set", "train.compile=maybe"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("engram: error: ") and "compile" in err and "\n" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
def test_cuda_asked_without_cuda_is_one_line(dataset, tmp_path, capsys) -> None:
    with pytest.raises(accel.DeviceError, match="--device cuda: .*use --device cpu"):
        accel.resolve_device("cuda")
    argv = ["train", "--data", str(dataset), "--out", str(tmp_path / "r"), "--preset", "tiny", "--quiet",
            "--device", "cuda"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("engram: error: --device cuda: ") and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


def test_eval_and_generate_take_device_and_dtype(dataset, tmp_path, capsys, tiny, one_thread) -> None:
    run = tmp_path / "run"
    tiny.save_run(run, dataset)
    assert main(["eval", "--ckpt", str(run), "--data", str(dataset), "--max-batches", "2"]) == 0
    fp32 = json.loads(capsys.readouterr().out)
    assert main(["eval", "--ckpt", str(run), "--data", str(dataset), "--max-batches", "2", "--dtype", "bf16",
                 "--device", "cpu"]) == 0
    bf16 = json.loads(capsys.readouterr().out)
    assert (fp32["dtype"], bf16["dtype"]) == ("fp32", "bf16")
    assert bf16["loss"] != fp32["loss"] and bf16["loss"] == pytest.approx(fp32["loss"], rel=0.05)
    assert main(["generate", "--ckpt", str(run), "--prompt", "the cat", "--max-new-tokens", "4",
                 "--temperature", "0", "--dtype", "bf16"]) == 0
    assert capsys.readouterr().out.startswith("the cat")
    assert main(["generate", "--ckpt", str(run), "--prompt", "the cat", "--draft", "ngram:2",
                 "--dtype", "bf16"]) == 2
    assert "--draft runs on the CPU in fp32" in capsys.readouterr().err


# ----------------------------------------------------------------------------- CUDA (skipped here)
@CUDA
@pytest.mark.parametrize("options", [{}, {"dtype": "bf16"}, {"compile": True}])
def test_cuda_training_learns(dataset_vocab, dataset, tmp_path, options) -> None:
    run = tmp_path / "cuda"
    summary = train(preset("tiny", dataset_vocab), _cfg(**options), dataset, run, progress=False,
                    device="cuda")
    losses = _losses(run)
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5, losses
    assert math.isfinite(summary["final_val_loss"])


@CUDA
def test_cuda_forward_matches_cpu(tiny) -> None:
    model = tiny.model()
    x = torch.randint(0, tiny.VOCAB, (2, 24))
    cpu = model(x).logits
    gpu = model.to("cuda")(x.cuda()).logits.cpu()
    assert (gpu - cpu).abs().max().item() <= 1e-4


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
def test_benchmarks_refuse_cuda_without_it_in_one_line(capsys) -> None:
    assert main(["bench", "hash", "--device", "cuda", "--repeats", "1", "--batch-size", "1", "--seq-len", "8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("engram: error: --device cuda: ") and err.count("\n") == 1


@pytest.mark.slow
def test_bench_accel_measures_both_sides_and_renders_its_page(dataset, tmp_path, capsys) -> None:
    out, page = tmp_path / "accel.json", tmp_path / "accel.md"
    assert main(["bench", "accel", "--data", str(dataset), "--preset", "tiny", "--bf16-preset", "tiny",
                 "--steps", "1", "--repeats", "2", "--warmup-steps", "1", "--bf16-steps", "10", "--eval-batches", "1",
                 "--out", str(out), "--page", str(page), "--page-command", "engram bench accel ..."]) == 0
    r = json.loads(out.read_text())
    (c,) = r["compile"]
    assert len(c["compiled_over_eager"]) == 2 and all(v > 0 for v in c["compiled_over_eager"])
    b = r["bf16"]
    assert len(b["train_loss"]["bf16"]) == 10 and b["train_loss"]["bf16"][-1] < b["train_loss"]["bf16"][0]
    assert f"{c['ratio_median']:.3f}" in page.read_text() and f"{b['val_loss']['bf16']:.4f}" in page.read_text()
    again = tmp_path / "again.md"  # the page is a function of the JSON alone
    assert main(["bench", "accel", "--from-json", str(out), "--page", str(again),
                 "--page-command", "engram bench accel ..."]) == 0
    assert again.read_text() == page.read_text()
