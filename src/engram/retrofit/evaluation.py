"""Evaluate an adapter on a prepared dataset, next to its own base (the same pass without Engram)."""

from __future__ import annotations

from typing import Any, Optional

from engram.config import StorageConfig
from engram.data import shards as data
from engram.errors import EngramError
from engram.fsutil import PathLike
from engram.retrofit.adapter import load_adapter, read_adapter_meta
from engram.retrofit.base import BaseModel
from engram.retrofit.trainer import check_data_tokenizer
from engram.tables.runtime import table_runtime
from engram.training.evaluation import evaluate, unigram_entropy_nats


def evaluate_adapter(adapter_dir: PathLike, data_dir: PathLike, split: str = "val", *,
                     batch_size: Optional[int] = None, seq_len: Optional[int] = None,
                     max_batches: Optional[int] = None, storage: Optional[StorageConfig] = None,
                     base: Optional[BaseModel] = None, compare_base: bool = True,
                     progress: bool = False) -> dict[str, Any]:
    """Loss of base + adapter on ``split``; with ``compare_base`` also the base's own loss on the
    same batches (Engram and LoRA switched off) and the difference. Batch size and sequence length
    default to the adapter's training config."""
    if split not in ("train", "val"):
        raise EngramError(f"split={split!r}; choose 'train' or 'val'")
    meta = read_adapter_meta(adapter_dir)
    model = load_adapter(adapter_dir, base, storage=storage, progress=progress)
    try:
        ds = data.load_dataset(data_dir)
        check_data_tokenizer(ds, model.base_model, data_dir)
        tcfg = meta.train_config
        batch_size = batch_size or (tcfg.batch_size if tcfg else 4)
        seq_len = seq_len or (tcfg.seq_len if tcfg else 256)
        shard = getattr(ds, split)
        result: dict[str, Any] = evaluate(model, shard, batch_size, seq_len, max_batches, progress)
        runtime = table_runtime(model)
        if runtime is not None:
            result["tables"] = runtime.stats()
        if compare_base:
            with model.base_only():
                base_res = evaluate(model, shard, batch_size, seq_len, max_batches, progress)
            result["base_loss"] = base_res["loss"]
            result["base_tokens_per_s"] = base_res["tokens_per_s"]
            result["delta_loss"] = result["loss"] - base_res["loss"]
        result.update(split=split, step=meta.step, adapter=str(adapter_dir), base=model.base_model.name,
                      batch_size=batch_size, seq_len=seq_len, param_counts=model.param_counts())
        unigram = unigram_entropy_nats(ds.meta)
        if unigram is not None:
            result["unigram_entropy_nats"] = unigram
        return result
    finally:
        runtime = table_runtime(model)
        if runtime is not None:
            runtime.close()
        model.remove_hooks()
