"""Train the Engram layers of a retrofitted model; the base model stays frozen, bit for bit.

The recipe is the library's own (``engram.training.trainer.TrainLoop``: warmup + cosine, joint
gradient clipping, exact resume), applied to the Engram parameters only: the tables with the
row-sparse Adam (``SparseRowAdam``) at ``lr * table_lr_mult`` (5x by default, as in the paper),
gates, projections, norms and the short conv with AdamW. The base's weights are digested before
and after training; a change is an error, never a silently different base.

Data must be tokenized with the base's tokenizer (``prepare_retrofit_data`` /
``engram retrofit data``); the hashing uses a compression of that tokenizer built by DeepSeek's
recipe (``engram.hashing.compression``).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch

from engram.config import RetrofitConfig, RetrofitError, TrainConfig, resume_changes
from engram.data import shards as data
from engram.data.tokenizer import tokenizer_fingerprint
from engram.fsutil import PathLike
from engram.hashing.compression import build_compression
from engram.model import accel
from engram.retrofit.adapter import (
    CONFIG_FILE,
    load_adapter_into,
    load_training_state,
    read_adapter_config,
    save_adapter,
)
from engram.retrofit.base import BaseModel, load_base, weights_digest
from engram.retrofit.model import RetrofitLM
from engram.training.trainer import METRICS_FILE, RESUME_MUTABLE, MetricsLog, TrainLoop, build_optimizers

# Sized for SmolLM2-135M on a CPU (batch 4 x 256 tokens, about 3 s a step). lr 1e-3 is a cautious
# start: on Shakespeare at 24 steps of 4 x 128, 3e-3 was better on the dev split
# (benchmarks/results/2026-12-02-retrofit-vs-lora.md); `engram retrofit compare --lrs` chooses.
DEFAULT_TRAIN = TrainConfig(steps=200, batch_size=4, seq_len=256, lr=1e-3, warmup_steps=20, eval_every=50,
                            eval_batches=10, save_every=50, log_every=10, table_optimizer="sparse_adam")


def prepare_retrofit_data(base: BaseModel, out_dir: PathLike, files: Optional[Sequence[PathLike]] = None,
                          builtin: bool = True, sources: Optional[Sequence[str]] = None,
                          val_fraction: float = 0.05, progress: bool = True) -> dict[str, Any]:
    """The built-in corpus (and/or ``files``) tokenized with the base's own tokenizer."""
    return data.prepare_builtin(out_dir, tokenizer=base.tokenizer, files=files, builtin=builtin,
                                sources=sources, val_fraction=val_fraction, progress=progress)


def check_data_tokenizer(ds: "data.Dataset", base: BaseModel, data_dir: PathLike) -> None:
    got, want = ds.meta["tokenizer_fingerprint"], tokenizer_fingerprint(base.tokenizer)
    if got != want:
        raise RetrofitError(f"{data_dir} was tokenized with tokenizer {got[:12]}, not base {base.name!r}'s "
                            f"({want[:12]}); prepare it with `engram retrofit data --base {base.name} --out DIR`")


def compression_report(base: BaseModel) -> dict[str, Any]:
    """The base tokenizer's compression (DeepSeek's recipe): sizes and the fraction of ids merged."""
    cmap = build_compression(base.tokenizer)
    return {"vocab_size": cmap.vocab_size, "compressed_size": cmap.num_compressed, "reduction": cmap.reduction}


def retrofit_train(cfg: RetrofitConfig, train_cfg: TrainConfig, data_dir: PathLike, out_dir: PathLike, *,
                   base: Optional[BaseModel] = None, resume: bool = False, overwrite: bool = False,
                   progress: bool = True, max_seconds: Optional[float] = None,
                   device: Union[str, torch.device] = "cpu") -> dict[str, Any]:
    """Train (or resume) an adapter; returns a JSON-able summary (as ``engram.training.train``).

    ``device``: where the base and the Engram layers train (``cuda`` needs a GPU); the base is
    moved back to the CPU afterwards, so the caller's base object is where it was."""
    t_start = time.perf_counter()
    device = accel.resolve_device(device)
    out = Path(out_dir)
    if not resume and not overwrite and (out / CONFIG_FILE).is_file():
        raise RetrofitError(f"{out} already holds an adapter; pass --resume to continue it or --overwrite "
                            f"to start over")
    if resume:
        _check_resume(out, cfg, train_cfg)
    if train_cfg.table_optimizer != "sparse_adam":  # the tables always train row-sparse
        train_cfg = dataclasses.replace(train_cfg, table_optimizer="sparse_adam")
    ds = data.load_dataset(data_dir)
    base = base or load_base(cfg.base, progress=progress)
    check_data_tokenizer(ds, base, data_dir)
    if train_cfg.seq_len > int(getattr(base.config, "max_position_embeddings", train_cfg.seq_len)):
        raise RetrofitError(f"seq_len={train_cfg.seq_len} exceeds the base's max_position_embeddings="
                            f"{base.config.max_position_embeddings}; lower --seq-len")
    digest_before = weights_digest(base.model)
    cmap = build_compression(base.tokenizer)
    torch.manual_seed(train_cfg.seed)  # LoRA's A and the Engram tables are drawn from it
    model = RetrofitLM(base.model, cfg, cmap.lookup, base.pad_id)
    home = next(base.model.parameters()).device
    try:
        model.to(device)
        optimizers = build_optimizers(model, train_cfg)
        state: dict[str, Any] = {"step": 0, "best_val_loss": None, "data_seed": train_cfg.seed,
                                 "log_loss_sum": 0.0, "log_loss_count": 0, "train_s": 0.0, "tokens_seen": 0}
        if resume:
            load_adapter_into(model, out, progress=progress)
            state.update(load_training_state(out, optimizers))
        out.mkdir(parents=True, exist_ok=True)
        metrics = MetricsLog(out / METRICS_FILE, fresh=not resume)
        if resume:
            metrics.keep_until(state["step"])
        loop = TrainLoop(model, optimizers, train_cfg, ds, metrics, state, device, progress)
        resumed_from = state["step"] if resume else None

        def save() -> None:
            save_adapter(out, model, base, optimizers=optimizers, trainer_state=loop.trainer_state(),
                         train_cfg=train_cfg, base_digest=digest_before)

        stopped_early, final = loop.run_and_evaluate(save, t_start, max_seconds)
        digest_after = weights_digest(base.model)
        if digest_after != digest_before:
            raise RetrofitError(f"the base's weights changed during training ({digest_before[:12]} -> "
                                f"{digest_after[:12]}); the adapter was not saved")
        save()
    finally:
        accel.uncompile_backbone(model)
        model.remove_hooks()  # the caller's base object is the plain base again
        base.model.to(home)
    return {
        "steps": loop.step, "target_steps": train_cfg.steps,
        "final_val_loss": final["loss"], "final_val_ppl": final["perplexity"], "best_val_loss": loop.best_val,
        "tokens_per_s": loop.session_tokens / max(loop.session_train_s, 1e-9), "tokens_seen": loop.tokens_seen,
        "train_s": loop.train_s, "elapsed_s": time.perf_counter() - t_start, "stopped_early": stopped_early,
        "resumed_from": resumed_from, "param_counts": model.param_counts(),
        "backbone_unchanged": True, "base_weights_sha256": digest_after,
        "compression": {"vocab_size": cmap.vocab_size, "compressed_size": cmap.num_compressed,
                        "reduction": cmap.reduction},
        "adapter": str(out),
    }


def resume_configs(out_dir: PathLike, retrofit_given: Mapping[str, Any], train_given: Mapping[str, Any]
                   ) -> tuple[RetrofitConfig, TrainConfig, dict[str, tuple[Any, Any]]]:
    """The configs to resume the adapter in ``out_dir`` with: the retrofit and train configs it
    recorded, changed only by the values given explicitly, and of those only the train keys in
    ``RESUME_MUTABLE`` (anything else is a one-line error naming the key). Returns (retrofit
    config, train config, {key: (recorded, new)})."""
    rec = read_adapter_config(out_dir)
    cfg_rec = rec["retrofit"].to_dict()
    train_rec = TrainConfig.from_dict(rec["train"]).to_dict() if rec.get("train") else DEFAULT_TRAIN.to_dict()
    cfg = RetrofitConfig.from_dict({**cfg_rec, **retrofit_given}, "the command line")
    train_cfg = TrainConfig.from_dict({**train_rec, **train_given})
    changes = resume_changes((cfg_rec, train_rec), (cfg.to_dict(), train_cfg.to_dict()), RESUME_MUTABLE,
                             str(out_dir), model_section="retrofit")
    return cfg, train_cfg, changes


def _check_resume(out: Path, cfg: RetrofitConfig, train_cfg: TrainConfig) -> None:
    rec = read_adapter_config(out)
    if rec["retrofit"].to_dict() != cfg.to_dict():
        diff = {k: (v, cfg.to_dict()[k]) for k, v in rec["retrofit"].to_dict().items() if cfg.to_dict()[k] != v}
        raise RetrofitError(f"cannot resume {out}: retrofit settings differ from the adapter's "
                            f"(recorded, given: {diff}); pass the recorded values or use a new --out")
    old, new = rec.get("train") or {}, train_cfg.to_dict()
    changed = sorted(k for k in old if k != "table_optimizer" and old[k] != new.get(k) and k not in RESUME_MUTABLE)
    if changed:
        raise RetrofitError(f"cannot resume {out} exactly: train settings {changed} differ from the adapter's "
                            f"({', '.join(f'{k}: {old[k]!r} vs {new.get(k)!r}' for k in changed[:4])}); only "
                            f"{sorted(RESUME_MUTABLE)} may change on resume")
