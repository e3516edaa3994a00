"""Sharded checkpoints: every rank writes its table rows, rank 0 the rest, one rename commits.

Layout (the format and its loaders live in :mod:`engram.model.checkpoint`)::

    RUN/config.json                              the commit: configs, hash, "sharded" and the
                                                 manifest (size + sha256) of every file below
    RUN/compression.npy, RUN/tokenizer.json      as in a one-process checkpoint
    RUN/shards-<step>-<tag>/model.safetensors    the backbone (rank 0)
    RUN/shards-<step>-<tag>/optimizer.safetensors  the backbone's optimizer (rank 0)
    RUN/shards-<step>-<tag>/trainer_state.json   step, RNG, optimizer scalars (rank 0)
    RUN/shards-<step>-<tag>/tables-<r>-of-<W>.safetensors   rank r's rows r::W of every table
                                                 and their optimizer state (row-sparse Adam's
                                                 under global row ids)

The save is one protocol on all ranks: rank 0 picks a new directory name, every rank writes and
fsyncs its files there, the digests are gathered on rank 0, which writes ``config.json`` to a
temp file and renames it over the old one. Until that rename the previous ``config.json`` and
the directory it names are untouched, so a rank killed mid-save (or a failed collective) leaves
the previous checkpoint loadable; directories no ``config.json`` names are removed after the
next successful commit.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from engram.config import TrainConfig
from engram.fsutil import PathLike, fsync_dir
from engram.model import checkpoint as ckpt
from engram.model.lm import EngramLM
from engram.model.table import engram_tables
from engram.training.checkpointing import capture_rng_state, flatten_optimizers

SHARD_DIR_PREFIX = ckpt.SHARD_DIR_PREFIX
# Files of a one-process checkpoint that a sharded commit makes stale at the run root.
_ROOT_STALE = (ckpt.MODEL_FILE, ckpt.OPTIMIZER_FILE, ckpt.STATE_FILE)


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file(tensors, str(path), metadata={"format": ckpt.FORMAT_NAME})
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _split_optimizer_tensors(tensors: dict[str, torch.Tensor], rank: int, world: int
                             ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(backbone optimizer tensors, table optimizer tensors with global row ids)."""
    prefix = ckpt.TABLE_OPTIMIZER + "."
    backbone = {k: v for k, v in tensors.items() if not k.startswith(prefix)}
    tables = {}
    for k, v in tensors.items():
        if k.startswith(prefix):
            tables[k] = v * world + rank if k.endswith(".rows") else v  # local -> global row ids
    return backbone, tables


def save_sharded(run_dir: PathLike, model: EngramLM, optimizers: Mapping[str, torch.optim.Optimizer],
                 trainer_state: Mapping[str, Any], train_cfg: Optional[TrainConfig],
                 tokenizer_path: Optional[PathLike], tokenizer_fingerprint: Optional[str],
                 rank: int, world: int) -> Path:
    """Collective: every rank calls it with its own model shard and optimizers."""
    run = Path(run_dir)
    name = [f"{SHARD_DIR_PREFIX}{int(trainer_state['step']):08d}-{secrets.token_hex(4)}" if rank == 0 else None]
    dist.broadcast_object_list(name, src=0)  # one directory name for all ranks
    shard_dir = run / name[0]
    if rank == 0:
        shard_dir.mkdir(parents=True, exist_ok=False)
    dist.barrier()

    tensors, tied = ckpt.model_tensors(model)
    opt_tensors, opt_meta = flatten_optimizers(optimizers)
    opt_backbone, opt_tables = _split_optimizer_tensors(opt_tensors, rank, world)
    mine = ckpt.shard_file(rank, world)
    _save_tensors({**{k: v for k, v in tensors.items() if k.endswith(ckpt.TABLE_KEY_SUFFIX)}, **opt_tables},
                  shard_dir / mine)
    written = {mine: ckpt._file_digest(shard_dir / mine)}

    if rank == 0:
        backbone = {k: v for k, v in tensors.items() if not k.endswith(ckpt.TABLE_KEY_SUFFIX)}
        save_file(backbone, str(shard_dir / ckpt.MODEL_FILE),
                  metadata={"format": ckpt.FORMAT_NAME, "tied": json.dumps(tied)})
        _save_tensors(opt_backbone, shard_dir / ckpt.OPTIMIZER_FILE)
        state = dict(trainer_state)
        state["optimizers"] = opt_meta
        state.setdefault("rng", capture_rng_state())
        ckpt._write_json(shard_dir / ckpt.STATE_FILE, state, indent=None)
        for f in (ckpt.MODEL_FILE, ckpt.OPTIMIZER_FILE, ckpt.STATE_FILE):
            written[f] = ckpt._file_digest(shard_dir / f)
        written.update(_write_root_extras(run, model, tokenizer_path))

    gathered: list[Optional[dict[str, Any]]] = [None] * world
    dist.all_gather_object(gathered, written)  # every rank has written and fsynced its files
    if rank == 0:
        fsync_dir(shard_dir)
        manifest = {k: v for part in gathered for k, v in (part or {}).items()}
        record = ckpt._config_record(model, train_cfg, tokenizer_fingerprint, manifest)
        record["sharded"] = {"world_size": world, "dir": shard_dir.name}
        tables = sum(t.num_embeddings * t.embedding_dim for t in engram_tables(model).values())
        counts = record["param_counts"]
        counts["total"] += tables - counts["tables"]
        counts["tables"] = tables
        tmp = run / f".{ckpt.CONFIG_FILE}.{os.getpid()}.tmp"
        ckpt._write_json(tmp, record)
        os.replace(tmp, run / ckpt.CONFIG_FILE)  # the commit
        fsync_dir(run)
        _remove_stale(run, keep=shard_dir.name)
    dist.barrier()  # nobody reads or saves again before the commit
    return run


def _write_root_extras(run: Path, model: EngramLM, tokenizer_path: Optional[PathLike]) -> dict[str, Any]:
    """compression.npy and tokenizer.json at the run root (same bytes at every save of a run)."""
    stage = run / f".tmp-{os.getpid()}"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir()
    try:
        names = ckpt._stage_extras(stage, model, tokenizer_path)
        digests = {n: ckpt._file_digest(stage / n) for n in names}
        for n in names:
            os.replace(stage / n, run / n)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return digests


def _remove_stale(run: Path, keep: str) -> None:
    for p in run.iterdir():
        if p.is_dir() and p.name.startswith(SHARD_DIR_PREFIX) and p.name != keep:
            shutil.rmtree(p, ignore_errors=True)  # an older checkpoint, or a save that never committed
    for name in _ROOT_STALE:
        if (run / name).is_file():
            (run / name).unlink()
