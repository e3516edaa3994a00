"""What Engram adds to a pretrained model: base / Engram / LoRA / LoRA + Engram, seeds, p-values.

Protocol (``engram retrofit compare``):

- splits: the domain dataset's validation tokens are cut in two halves, **dev** (first half,
  used to choose the learning rate of each variant) and **test** (second half, reported, never
  used for a choice); **general** text is English the model was never trained on here, the
  Python reference's prose that ships with CPython (``pydoc_data.topics``), to measure
  forgetting;
- every trained variant sees the same steps x batch x seq_len tokens in the same order per
  seed; ``base`` is evaluated once (it has no seed);
- with several learning rates, the first seed of each variant runs at every rate and the one
  with the lowest dev loss is used for all seeds;
- per run: test loss, general-text loss and its change against the base (forgetting), training
  tokens/s, inference tokens/s (the test evaluation), trainable parameters, bytes shipped
  (adapter weights + table file);
- paired t-tests over seeds between variants (same seed = same data order), and against the
  base's single value.

Every finished run appends one line to ``OUT/results.jsonl``; a rerun skips finished runs and
resumes an unfinished one from its last save. ``OUT/summary.json`` and ``OUT/summary.md`` are
rewritten at the end.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from engram.config import RetrofitCompareConfig, RetrofitConfig, RetrofitError, TrainConfig
from engram.data import shards as data
from engram.data.tokenizer import tokenizer_fingerprint
from engram.fsutil import PathLike, atomic_write
from engram.model.lm import ModelOutput
from engram.retrofit.adapter import CONFIG_FILE, TABLES_FILE, WEIGHTS_FILE, load_adapter
from engram.retrofit.base import BaseModel, load_base
from engram.retrofit.trainer import check_data_tokenizer, retrofit_train
from engram.stats import mean_std, paired_t
from engram.training.evaluation import evaluate

RESULTS_FILE = "results.jsonl"


# ----------------------------------------------------------------------------- data
def general_text() -> str:
    """English prose never in the training data: the Python reference topics shipped with CPython."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def text_shard(tokens: np.ndarray, vocab_size: int, fingerprint: str, name: str) -> data.Shard:
    return data.Shard(path=Path(name), tokens=np.asarray(tokens, dtype=data.token_dtype(vocab_size)),
                      vocab_size=vocab_size, fingerprint=fingerprint)


def splits(ds: data.Dataset, base: BaseModel) -> dict[str, data.Shard]:
    """{"dev", "test", "general"} shards (see the module docstring)."""
    val = ds.val
    half = val.num_tokens // 2
    fp = tokenizer_fingerprint(base.tokenizer)
    general = base.tokenizer.encode(general_text()).ids
    return {"dev": dataclasses.replace(val, tokens=val.tokens[:half]),
            "test": dataclasses.replace(val, tokens=val.tokens[half:]),
            "general": text_shard(np.array(general), val.vocab_size, fp, "pydoc_data.topics")}


# ----------------------------------------------------------------------------- models
class _PlainBase(nn.Module):
    """The base as ``evaluate`` expects a model (``forward(x, y) -> ModelOutput``, ``cfg``)."""

    def __init__(self, base: BaseModel):
        super().__init__()
        self.model = base.model
        self.cfg = type("Shape", (), {"max_seq_len": int(getattr(base.config, "max_position_embeddings", 1 << 30)),
                                      "vocab_size": int(base.config.vocab_size)})()

    def forward(self, x: torch.Tensor, targets: Optional[torch.Tensor] = None) -> ModelOutput:
        logits = self.model(input_ids=x).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)) if targets is not None else None
        return ModelOutput(logits=logits, loss=loss)


def variant_config(cfg: RetrofitCompareConfig, variant: str) -> RetrofitConfig:
    engram, lora = variant in ("engram", "both"), variant in ("lora", "both")
    return RetrofitConfig(base=cfg.base, layers=cfg.layers if engram else (), rows_per_head=cfg.rows_per_head,
                          lora_rank=cfg.lora_rank if lora else 0)


def _evaluate_all(model: nn.Module, shards: dict[str, data.Shard], cfg: RetrofitCompareConfig) -> dict[str, Any]:
    out = {}
    for name, shard in shards.items():
        res = evaluate(model, shard, cfg.batch_size, cfg.seq_len, cfg.eval_batches)
        out[f"{name}_loss"] = res["loss"]
        if name == "test":
            out["infer_tokens_per_s"] = res["tokens_per_s"]
    return out


# ----------------------------------------------------------------------------- runs
def _read_results(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _append(path: Path, record: dict[str, Any]) -> None:
    rows = _read_results(path) + [record]
    data_bytes = "".join(json.dumps(r) + "\n" for r in rows).encode()
    atomic_write(path, lambda f: f.write(data_bytes))


def _run(cfg: RetrofitCompareConfig, variant: str, seed: int, lr: float, base: BaseModel, data_dir: PathLike,
         shards: dict[str, data.Shard], out: Path, progress: bool) -> dict[str, Any]:
    run_dir = out / "runs" / f"{variant}-lr{lr:g}-s{seed}"
    tcfg = TrainConfig(steps=cfg.steps, batch_size=cfg.batch_size, seq_len=cfg.seq_len, lr=lr,
                       warmup_steps=max(1, cfg.steps // 10), eval_every=cfg.steps, eval_batches=2,
                       save_every=max(1, cfg.steps // 4), log_every=max(1, cfg.steps // 10), seed=seed,
                       table_optimizer="sparse_adam")
    resume = (run_dir / CONFIG_FILE).is_file()
    summary = retrofit_train(variant_config(cfg, variant), tcfg, data_dir, run_dir, base=base, resume=resume,
                             progress=progress)
    model = load_adapter(run_dir, base)
    try:
        res = _evaluate_all(model, shards, cfg)
        counts = model.param_counts()
    finally:
        model.remove_hooks()
    shipped = sum((run_dir / f).stat().st_size for f in (WEIGHTS_FILE, TABLES_FILE) if (run_dir / f).is_file())
    return {"variant": variant, "seed": seed, "lr": lr, **res, "train_tokens_per_s": summary["tokens_per_s"],
            "train_tokens": cfg.steps * cfg.batch_size * cfg.seq_len, "trainable_params": counts["trainable"],
            "adapter_bytes": shipped, "run_dir": str(run_dir)}


def claim_out_dir(out: Path, spec: dict[str, Any], what: str) -> None:
    """Write ``OUT/spec.json`` for a study, or check the one a previous run left there: more (or
    other) seeds extend a study; any other changed setting needs a new directory."""
    path = out / "spec.json"
    spec = json.loads(json.dumps(spec))  # tuples -> lists, as read back from the file
    if path.is_file():
        old = {k: v for k, v in json.loads(path.read_text()).items() if k != "seeds"}
        if old != {k: v for k, v in spec.items() if k != "seeds"}:
            raise RetrofitError(f"{out} holds a {what} with other settings ({path}); use a new --out "
                                f"(only --seeds may change between reruns)")
    atomic_write(path, lambda f: f.write(json.dumps(spec, indent=2).encode()))


def run_compare(cfg: RetrofitCompareConfig, data_dir: PathLike, out_dir: PathLike, *,
                progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the comparison; returns the summary (also written to ``out_dir``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    claim_out_dir(out, dataclasses.asdict(cfg), "comparison")
    base = load_base(cfg.base, progress=progress)
    ds = data.load_dataset(data_dir)
    check_data_tokenizer(ds, base, data_dir)
    shards = splits(ds, base)
    results_path = out / RESULTS_FILE
    done = {(r["variant"], r["seed"], r["lr"]) for r in _read_results(results_path)}
    if "base" in cfg.variants and ("base", -1, 0.0) not in done:
        res = _evaluate_all(_PlainBase(base), shards, cfg)
        _append(results_path, {"variant": "base", "seed": -1, "lr": 0.0, **res, "trainable_params": 0,
                               "adapter_bytes": 0, "train_tokens": 0})
    trained = [v for v in cfg.variants if v != "base"]
    for variant in trained:  # learning rate chosen on dev with the first seed
        for lr in (cfg.lrs if len(cfg.lrs) > 1 else ()):
            if (variant, cfg.seeds[0], lr) not in done:
                _append(results_path, _run(cfg, variant, cfg.seeds[0], lr, base, data_dir, shards, out, progress))
                done.add((variant, cfg.seeds[0], lr))
    chosen = choose_lrs(_read_results(results_path), cfg)
    for seed in cfg.seeds:
        for variant in trained:
            if (variant, seed, chosen[variant]) not in done:
                _append(results_path, _run(cfg, variant, seed, chosen[variant], base, data_dir, shards, out,
                                           progress))
                done.add((variant, seed, chosen[variant]))
    summary = summarize(_read_results(results_path), cfg)
    write_summary(summary, out)
    return summary


def choose_lrs(rows: list[dict[str, Any]], cfg: RetrofitCompareConfig) -> dict[str, float]:
    """Each variant's learning rate: the lowest dev loss at the first seed (the only one if one)."""
    chosen = {}
    for variant in cfg.variants:
        if variant == "base":
            continue
        if len(cfg.lrs) == 1:
            chosen[variant] = cfg.lrs[0]
            continue
        cands = [r for r in rows if r["variant"] == variant and r["seed"] == cfg.seeds[0] and r["lr"] in cfg.lrs]
        chosen[variant] = min(cands, key=lambda r: r["dev_loss"])["lr"] if cands else cfg.lrs[0]
    return chosen


# ----------------------------------------------------------------------------- summary
_METRICS = ("test_loss", "general_loss", "forgetting", "train_tokens_per_s", "infer_tokens_per_s",
            "trainable_params", "adapter_bytes")


def summarize(rows: list[dict[str, Any]], cfg: RetrofitCompareConfig) -> dict[str, Any]:
    chosen = choose_lrs(rows, cfg)
    base = next((r for r in rows if r["variant"] == "base"), None)
    per: dict[str, list[dict[str, Any]]] = {}
    for v in cfg.variants:
        if v == "base":
            per[v] = [base] if base else []
        else:
            per[v] = sorted((r for r in rows if r["variant"] == v and r["lr"] == chosen[v] and r["seed"] in cfg.seeds),
                            key=lambda r: r["seed"])
    for v, rs in per.items():
        for r in rs:
            if base is not None:
                r["forgetting"] = r["general_loss"] - base["general_loss"]
    table = {}
    for v, rs in per.items():
        stats = {}
        for m in _METRICS:
            xs = [r[m] for r in rs if r.get(m) is not None]
            if xs:
                mean, std = mean_std(xs)
                stats[m] = {"mean": mean, "std": std, "n": len(xs)}
        table[v] = {"lr": chosen.get(v), "seeds": [r["seed"] for r in rs], **stats}
    tests = {}
    names = [v for v in cfg.variants if v != "base"]
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            ra, rb = {r["seed"]: r for r in per[a]}, {r["seed"]: r for r in per[b]}
            seeds = sorted(set(ra) & set(rb))
            for m in ("test_loss", "forgetting"):
                if seeds and all(m in ra[s] and m in rb[s] for s in seeds):
                    tests[f"{a} - {b}: {m}"] = paired_t([ra[s][m] for s in seeds], [rb[s][m] for s in seeds])
        if base is not None and per[a]:
            xs = [r["test_loss"] for r in per[a]]
            tests[f"{a} - base: test_loss"] = paired_t(xs, [base["test_loss"]] * len(xs))
    return {"config": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()},
            "chosen_lr": chosen, "table": table, "tests": tests, "runs": rows}


def _fmt(stat: Optional[dict[str, float]], digits: int = 4, scale: float = 1.0) -> str:
    if not stat:
        return "-"
    m, s = stat["mean"] / scale, stat["std"] / scale
    return f"{m:.{digits}f} ± {s:.{digits}f}" if stat["n"] > 1 else f"{m:.{digits}f}"


def summary_markdown(summary: dict[str, Any]) -> str:
    lines = ["| variant | lr | seeds | test loss | general loss | forgetting | train tok/s | infer tok/s | "
             "trainable params | bytes shipped |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for v, t in summary["table"].items():
        lines.append(f"| {v} | {t['lr'] if t['lr'] is not None else '-'} | {len(t['seeds'])} | "
                     f"{_fmt(t.get('test_loss'))} | {_fmt(t.get('general_loss'))} | {_fmt(t.get('forgetting'))} | "
                     f"{_fmt(t.get('train_tokens_per_s'), 1)} | {_fmt(t.get('infer_tokens_per_s'), 1)} | "
                     f"{_fmt(t.get('trainable_params'), 0)} | {_fmt(t.get('adapter_bytes'), 1, 2**20)} MiB |")
    lines += ["", "| paired test (over seeds) | mean difference | s.e. | p |", "|---|---:|---:|---:|"]
    for name, t in summary["tests"].items():
        p = t["p"]
        lines.append(f"| {name} | {t['mean_diff']:+.4f} | {t['se']:.4f} | "
                     f"{'-' if p is None or (isinstance(p, float) and math.isnan(p)) else f'{p:.3g}'} |")
    return "\n".join(lines) + "\n"


def write_summary(summary: dict[str, Any], out_dir: PathLike) -> None:
    out = Path(out_dir)
    js = json.dumps(summary, indent=2, default=float).encode()
    atomic_write(out / "summary.json", lambda f: f.write(js))
    md = summary_markdown(summary).encode()
    atomic_write(out / "summary.md", lambda f: f.write(md))
