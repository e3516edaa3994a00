"""Training on several processes: the trainer's hooks for a row-sharded, data-parallel run.

What runs where (W processes, rank r):

- data: every rank reads its contiguous part ``B/W`` of the same global batch
  (``data.get_batch(..., part=(r, W))``), so a batch is the same on any W;
- backbone: replicated and wrapped in ``DistributedDataParallel``, which averages its gradients.
  Each rank's loss is the mean over its equal share of the tokens, so the averaged gradient is
  the gradient of the mean over the global batch: the one-process loss;
- tables: each Engram layer's table becomes a
  :class:`~engram.distributed.sharded_table.ShardedEmbedding` holding rows ``r::W``; the table
  optimizer (row-sparse or dense Adam) is built over those rows only, so its state lives on the
  owner. A row's gradient arrives at its owner as the sum over ranks of local-mean gradients and
  is divided by W there, which matches DDP's average;
- gradient clipping: the global norm combines the backbone norm (equal on all ranks after DDP)
  with each table's norm, all-reduced from the ranks' disjoint rows;
- MoE balancing: expert loads are all-reduced before the bias update, so every rank takes the
  same step as one process would;
- checkpoints: :func:`engram.distributed.checkpoint.save_sharded`, resumed on any number of ranks.

Why DDP and not FSDP2 for the backbone: the tables are what outgrows a device, and they are
sharded here by rows; the backbones engram-lm trains fit on one device, where DDP keeps one
full copy and the exact one-process math (FSDP2 would add an all-gather per layer per step to
save memory that is not short).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from engram.config import DistributedConfig, ModelConfig, TrainConfig
from engram.data.shards import load_dataset
from engram.distributed.checkpoint import save_sharded
from engram.distributed.sharded_table import ShardedEmbedding
from engram.distributed.sharding import split_table_state
from engram.distributed.world import RankFailure, World, check_agreement, close_world, init_world, is_rank_failure
from engram.errors import EngramError
from engram.fsutil import PathLike
from engram.model.lm import EngramLM
from engram.model.moe import DeepSeekMoE
from engram.model.table import EngramTable, convert_tables
from engram.training.checkpointing import load_for_resume
from engram.training.parallel import Parallel
from engram.training.sparse_adam import scale_grads_
from engram.training.trainer import train


class DistributedParallel(Parallel):
    """The trainer's hooks for rank ``world.rank`` of ``world.size`` (see the module docstring)."""

    def __init__(self, world: World, model_cfg: ModelConfig, train_cfg: TrainConfig,
                 agree: Optional[Mapping[str, Any]] = None):
        self.world = world
        self.rank, self.world_size = world.rank, world.size
        self.model_cfg, self.train_cfg = model_cfg, train_cfg
        self.agree = dict(agree or {})
        self.tables: list[ShardedEmbedding] = []
        self.step_bytes: list[int] = []  # per training step: bytes this rank sent to other ranks
        if train_cfg.batch_size % world.size:
            raise EngramError(f"train.batch_size={train_cfg.batch_size} is not a multiple of the "
                              f"{world.size} processes; every rank needs an equal share of the global "
                              f"batch: pick a batch size divisible by {world.size}")
        if model_cfg.input_ngram is not None:
            raise EngramError("input_ngram baselines are not sharded; train them on one process "
                              "(drop --nproc / torchrun) or remove model.input_ngram")

    # ------------------------------------------------------------------ set-up
    def prepare(self, model: EngramLM) -> None:
        check_agreement({"model": self.model_cfg.to_dict(), "train": self.train_cfg.to_dict(),
                         "hash_fingerprint": model.hasher.fingerprint() if model.hasher is not None else None,
                         **self.agree}, self.world)
        scale = 1.0 / self.world_size

        def shard(layer_id: int, table: EngramTable) -> EngramTable:
            out = ShardedEmbedding.from_table(table, self.rank, self.world_size, self.world.tables)
            out.grad_scale = scale
            self.tables.append(out)
            return out

        convert_tables(model, shard)

    def train_module(self, model: EngramLM) -> torch.nn.Module:
        names = {id(p): n for n, p in model.named_parameters()}
        ignore = [names[id(t.weight)] for t in self.tables]
        # DDP's documented-by-use hook (torchrec relies on it too) for parameters that another
        # mechanism synchronises: here the table shards, whose gradients go to their owners.
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)
        has_moe = any(isinstance(m, DeepSeekMoE) for m in model.modules())
        # Buffers (offsets, MoE biases) are equal at start and kept equal by construction
        # (end_step): synced once at init, never per step. An expert may receive no token on
        # one rank: DDP must then look for unused parameters.
        return DistributedDataParallel(model, forward_sync_buffers=False, find_unused_parameters=has_moe,
                                       device_ids=[self.world.device.index] if self.world.device.type == "cuda" else None)

    # ------------------------------------------------------------------ per step
    def mean(self, value: torch.Tensor) -> float:
        t = value.detach().reshape(1).to(torch.float64)
        if self.world.backend == "nccl":
            t = t.to(self.world.device)
        dist.all_reduce(t)
        return float(t) / self.world_size

    def any(self, flag: bool) -> bool:
        t = torch.tensor([1 if flag else 0], device=self.world.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def clip_grad_norm(self, params: Iterable[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
        params = [p for p in params if p.grad is not None]
        shard_ids = {id(t.weight) for t in self.tables}
        norms = []
        for p in params:
            if p.grad.is_sparse:
                p.grad = p.grad.coalesce()
                g = p.grad._values()
            else:
                g = p.grad
            if id(p) in shard_ids:  # this rank holds part of the rows: sum the squares over ranks
                sq = torch.linalg.vector_norm(g, 2.0).pow(2).reshape(1)
                dist.all_reduce(sq)
                norms.append(sq.sqrt()[0])
            else:
                norms.append(torch.linalg.vector_norm(g, 2.0))
        # Tables that no rank's batch touched have no gradient on any rank: same list everywhere.
        total = torch.linalg.vector_norm(torch.stack(norms), 2.0)
        scale_grads_(params, torch.clamp(max_norm / (total + 1e-6), max=1.0))
        return total

    def end_step(self, model: EngramLM) -> None:
        for m in model.modules():
            if isinstance(m, DeepSeekMoE):
                dist.all_reduce(m.load_accum)
        # the bytes this step's exchanges sent to other ranks (evaluation lookups are not counted)
        self.step_bytes.append(sum(t.stats.total for t in self.tables))
        for t in self.tables:
            t.stats.reset()

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, run: Path, model: EngramLM, optimizers: Mapping[str, torch.optim.Optimizer],
                        trainer_state: Mapping[str, Any], train_cfg: Any, tokenizer_path: Optional[Path],
                        tokenizer_fingerprint: Optional[str]) -> None:
        save_sharded(run, model, optimizers, trainer_state, train_cfg, tokenizer_path,
                     tokenizer_fingerprint, self.rank, self.world_size)

    def load_for_resume(self, run: Path, model: EngramLM,
                        optimizers: Mapping[str, torch.optim.Optimizer]) -> dict[str, Any]:
        rows = functools.partial(split_table_state, rank=self.rank, world=self.world_size)
        state, _ = load_for_resume(run, model, optimizers, select_rows=rows)
        return state


def train_distributed(model_cfg: ModelConfig, train_cfg: TrainConfig, data_dir: PathLike,
                      run_dir: PathLike, dist_cfg: Optional[DistributedConfig] = None,
                      **kwargs: Any) -> dict[str, Any]:
    """:func:`engram.training.trainer.train` on the ranks torchrun started (call it on every
    rank). Extra keyword arguments go to ``train``. Returns its summary on every rank."""
    world = init_world(dist_cfg or DistributedConfig())
    try:
        meta = load_dataset(data_dir).meta  # paths may differ between nodes; the data may not
        agree = {"dataset": {k: meta.get(k) for k in ("tokenizer_fingerprint", "vocab_size")},
                 **{k: str(v) for k, v in kwargs.items() if k in ("resume", "overwrite", "tables_from")}}
        par = DistributedParallel(world, model_cfg, train_cfg, agree)
        try:
            out = train(model_cfg, train_cfg, data_dir, run_dir, parallel=par, device=world.device, **kwargs)
        except RuntimeError as e:
            if not is_rank_failure(e):
                raise
            first = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
            raise RankFailure(f"rank {world.rank}: another rank stopped answering ({first}); one of the "
                              f"{world.size} ranks died or hung for more than --dist-timeout="
                              f"{world.timeout_s:g}s: read its log for the cause") from e
        sent = torch.tensor(par.step_bytes, dtype=torch.float64, device=world.device)  # NCCL: on the GPU
        dist.all_reduce(sent)  # summed over the ranks: the bytes that crossed between processes
        out["world_size"] = world.size
        out["table_bytes_per_step"] = sent.cpu().tolist()
        tables = sum(t.num_embeddings * t.embedding_dim for t in par.tables)  # all shards, not this rank's
        counts = out["param_counts"]
        out["param_counts"] = {"total": counts["backbone"] + tables, "tables": tables, "backbone": counts["backbone"]}
        return out
    finally:
        close_world()
