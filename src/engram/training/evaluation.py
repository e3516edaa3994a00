"""Held-out loss and perplexity of a model, or of a saved run on a prepared dataset.

The loss is the mean next-token cross-entropy in nats over every evaluated token (batches are
weighted by their token count), and ``perplexity = exp(loss)``.
"""

from __future__ import annotations

import math
import time
from typing import Any, Optional

import torch
from tqdm.auto import tqdm

from engram.data import shards as data
from engram.errors import EngramError
from engram.fsutil import PathLike
from engram.model.checkpoint import load_model
from engram.model.lm import EngramLM
from engram.tables.runtime import load_model_with_tables, table_runtime
from engram.tables.tiers import StorageConfig


class DatasetMismatchError(EngramError):
    """A dataset was tokenized differently from what a model or checkpoint expects."""


def perplexity(loss: float) -> float:
    """exp(loss), saturating to inf instead of raising OverflowError."""
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


@torch.no_grad()
def evaluate(model: EngramLM, shard: "data.Shard", batch_size: int, seq_len: int,
             max_batches: Optional[int] = None, progress: bool = False) -> dict[str, float]:
    """Mean loss over ``iter_eval_batches(shard, ...)``: dict(loss, perplexity, tokens, tokens_per_s).

    Runs in eval mode without gradients and restores the model's previous train/eval mode.
    """
    if seq_len > model.cfg.max_seq_len:
        raise EngramError(f"seq_len={seq_len} exceeds the model's max_seq_len={model.cfg.max_seq_len}; "
                         f"evaluate with seq_len <= {model.cfg.max_seq_len}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_loss, total_tokens = 0.0, 0
    t0 = time.perf_counter()
    try:
        batches = data.iter_eval_batches(shard, batch_size, seq_len, max_batches)
        runtime = table_runtime(model)
        if runtime is not None:  # offloaded tables: fetch the next batches' rows during this one
            batches = runtime.prefetch_batches(batches)
        n_batches = -(-data.num_eval_windows(shard, seq_len) // batch_size)
        if max_batches is not None:
            n_batches = min(n_batches, max_batches)
        for x, y in tqdm(batches, total=n_batches, desc="eval", disable=not progress, leave=False):
            x, y = x.to(device), y.to(device)
            out = model(x, y)
            n = y.numel()
            total_loss += float(out.loss) * n  # the model returns the mean over the batch's tokens
            total_tokens += n
    finally:
        model.train(was_training)
    elapsed = max(time.perf_counter() - t0, 1e-9)
    if total_tokens == 0:
        raise EngramError(f"the shard yielded no evaluation batches of {batch_size} x {seq_len} tokens; "
                         f"use a smaller batch_size or seq_len")
    loss = total_loss / total_tokens
    return {"loss": loss, "perplexity": perplexity(loss), "tokens": total_tokens,
            "tokens_per_s": total_tokens / elapsed}


def unigram_entropy_nats(meta: dict[str, Any]) -> Optional[float]:
    """Train-split unigram entropy from meta.json, if recorded."""
    if "unigram_entropy_nats" in meta:
        return float(meta["unigram_entropy_nats"])
    entry = meta.get("train_unigram_entropy")
    if isinstance(entry, dict) and "nats_per_token" in entry:
        return float(entry["nats_per_token"])
    return None


def dataset_identity(ds: "data.Dataset") -> tuple[Optional[str], int]:
    """(tokenizer fingerprint, vocab size) of a prepared dataset."""
    fp = getattr(ds.train, "fingerprint", None) or ds.meta.get("tokenizer_fingerprint")
    vocab = getattr(ds.train, "vocab_size", None) or ds.meta.get("vocab_size")
    return fp, int(vocab)


def check_dataset_for_model(vocab_size: int, recorded_fingerprint: Optional[str],
                            ds: "data.Dataset", data_dir: PathLike, what: str) -> None:
    """Refuse data from another tokenizer: ids would index the wrong embeddings and hash rows."""
    fp, vocab = dataset_identity(ds)
    if recorded_fingerprint is not None and fp is not None and fp != recorded_fingerprint:
        raise DatasetMismatchError(
            f"dataset {data_dir} was tokenized with tokenizer {fp[:16]}... but {what} was trained "
            f"with tokenizer {recorded_fingerprint[:16]}...; prepare the data with the run's "
            f"tokenizer.json (or use the dataset the run was trained on)")
    if vocab != vocab_size:
        raise DatasetMismatchError(
            f"dataset {data_dir} has vocab_size={vocab} but {what} has vocab_size={vocab_size}; "
            f"set ModelConfig.vocab_size={vocab} or use a dataset prepared with the matching tokenizer")


def evaluate_run(run_dir: PathLike, data_dir: PathLike, split: str = "val",
                 batch_size: Optional[int] = None, seq_len: Optional[int] = None,
                 max_batches: Optional[int] = None, progress: bool = False,
                 device: str = "cpu", storage: Optional["StorageConfig"] = None) -> dict[str, Any]:
    """Evaluate a saved run on a prepared dataset's ``split`` ("train" or "val").

    Batch size and sequence length default to the run's training config; ``max_batches=None``
    evaluates the whole split. ``storage`` (``engram.config.StorageConfig``) serves the Engram
    tables from a table file / storage tier with prefetch; the result then has a ``tables``
    entry with the tiers' hit rates, bytes read and stall time.
    """
    if split not in ("train", "val"):
        raise EngramError(f"split={split!r}; choose 'train' or 'val'")
    if storage is not None and not storage.is_default:  # --table / --storage / --prefetch
        model, meta = load_model_with_tables(run_dir, storage, device=device)
    else:
        model, meta = load_model(run_dir, device=device)
    return evaluate_saved(model, meta, data_dir, split, batch_size, seq_len, max_batches, progress)


def evaluate_saved(model: Any, meta: Any, data_dir: PathLike, split: str = "val",
                   batch_size: Optional[int] = None, seq_len: Optional[int] = None,
                   max_batches: Optional[int] = None, progress: bool = False) -> dict[str, Any]:
    """``evaluate_run`` on a model already loaded (any ``LanguageModel``) with the ``meta`` of its
    directory (``run_dir``, ``train_config``, ``tokenizer_fingerprint``, ``step``); closes the
    model's table runtime, if it has one."""
    if split not in ("train", "val"):
        raise EngramError(f"split={split!r}; choose 'train' or 'val'")
    ds = data.load_dataset(data_dir)
    check_dataset_for_model(model.cfg.vocab_size, meta.tokenizer_fingerprint, ds, data_dir,
                            f"run {meta.run_dir}")
    tcfg = meta.train_config
    batch_size = batch_size or (tcfg.batch_size if tcfg else 8)
    seq_len = seq_len or (tcfg.seq_len if tcfg else model.cfg.max_seq_len)
    result: dict[str, Any] = evaluate(model, getattr(ds, split), batch_size, seq_len, max_batches, progress)
    runtime = table_runtime(model)
    if runtime is not None:
        result["tables"] = runtime.stats()
        runtime.close()
    result.update(split=split, step=meta.step, run_dir=str(meta.run_dir), batch_size=batch_size,
                  seq_len=seq_len, param_counts=model.param_counts())
    unigram = unigram_entropy_nats(ds.meta)
    if unigram is not None:  # the loss a context-free model would reach
        result["unigram_entropy_nats"] = unigram
    return result
