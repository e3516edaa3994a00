"""Training loop: AdamW for the backbone, Adam for the Engram tables, exact resume.

Optimisation
    - ``backbone`` (AdamW): weight decay on >= 2-D weights (embedding, projections, experts,
      the Engram conv kernel); none on norms, biases and hyper-connection mixing weights.
    - ``tables`` (Adam): the Engram tables at ``lr * table_lr_mult`` with
      ``weight_decay=table_weight_decay`` (0 by default, as in the paper: rows that are rarely
      hit should not be decayed towards zero between their updates).
    Every param group carries ``lr_mult``; the schedule (linear warmup, cosine decay to
    ``lr * min_lr_ratio``) sets ``lr = schedule(step) * lr_mult``. Gradients are clipped jointly,
    and the MoE routing biases are nudged after every optimizer step.

Determinism
    Batch ``s`` is ``data.get_batch(train, B, T, s, seed)``, a pure function of (seed, s), and
    the checkpoint holds everything else that evolves (weights, MoE bias buffers, optimizer
    moments, RNG states, the partial log-interval loss sum). Resuming from step k therefore
    reproduces the uninterrupted run bit for bit on CPU.

Outputs in the run directory: the checkpoint files (see ``checkpoint``) and ``metrics.jsonl``,
one JSON object per logged step (``step``, ``loss``, ``lr``, ``grad_norm``, ``tokens_per_s``,
``time``, ``train_s`` and ``val_loss``/``val_ppl`` when evaluated). On resume, records after
the checkpoint's step are dropped so the curve has no duplicated or orphaned steps.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from engram.config import (
    ConfigError,
    ModelConfig,
    Precision,
    TableLocation,
    TableOptimizer,
    TrainConfig,
    apply_config_sources,
    build_configs,
    resume_changes,
)
from engram.data import shards as data
from engram.errors import EngramError
from engram.fsutil import PathLike
from engram.hashing.compression import CompressionMap, build_compression
from engram.model import accel
from engram.model import checkpoint as ckpt
from engram.model.checkpoint import CheckpointError
from engram.model.lm import EngramLM
from engram.model.table import engram_tables
from engram.tables.runtime import BatchPrefetcher, load_tables_into
from engram.tables.trainable import TrainableTier, place_tables
from engram.training.evaluation import check_dataset_for_model, dataset_identity, evaluate
from engram.training.optimization import lr_at, optimizer_params, optimizer_step, set_lr
from engram.training.parallel import Parallel
from engram.training.sparse_adam import SparseRowAdam, use_sparse_table_grads

METRICS_FILE = "metrics.jsonl"
# Train-config fields that may change on resume: they do not alter the trajectory up to the
# resumed step (``steps`` reshapes the cosine tail, which is what extending a run means).
RESUME_MUTABLE = {"steps", "eval_every", "eval_batches", "save_every", "log_every", "prefetch",
                  "table_storage", "table_cache_rows", "table_dir", "compile"}
TABLE_WORK_DIR = "table-work"  # RUN/table-work: working files of mmap/cached tables (TrainConfig.table_dir)


# ----------------------------------------------------------------------------- optimizers
def _no_decay(name: str, p: torch.nn.Parameter) -> bool:
    # Hyper-connection weights (alpha, beta and the [M,M] mixing matrix A) are gains, not
    # projections: decaying A towards 0 would erase the residual identity.
    return p.dim() < 2 or ".hc_" in name


def _adam_impl(params: list[torch.nn.Parameter], cfg: TrainConfig) -> dict[str, bool]:
    """``fused=True`` where torch has a one-pass kernel for every parameter (CPU or CUDA floats)."""
    ok = cfg.fused_adam and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return {"fused": True} if ok else {}


def build_optimizers(model: EngramLM, cfg: TrainConfig) -> dict[str, torch.optim.Optimizer]:
    """{"backbone": AdamW, "tables": Adam (only when the model has Engram tables)}; fused kernels
    unless ``cfg.fused_adam`` is False (then torch's for-loop implementation)."""
    table_ids = {id(p) for p in model.table_parameters()}
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # named_parameters() yields a tied weight once
        if not p.requires_grad or id(p) in table_ids:
            continue
        (no_decay if _no_decay(name, p) else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay, "lr_mult": 1.0},
              {"params": no_decay, "weight_decay": 0.0, "lr_mult": 1.0}]
    opts: dict[str, torch.optim.Optimizer] = {
        "backbone": torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas,
                                      **_adam_impl(decay + no_decay, cfg)),
    }
    tables = model.table_parameters()
    if tables and cfg.table_optimizer == TableOptimizer.SPARSE_ADAM:
        # Row-wise lazy Adam on sparse gradients: no table-sized gradient or moments.

        use_sparse_table_grads(model)
        # tables in a file-backed tier (place_tables): rows and moments go through the tier
        tiers = {t.weight: t.tier for t in engram_tables(model).values() if getattr(t, "tier", None) is not None}
        opts["tables"] = SparseRowAdam(
            [{"params": tables, "lr_mult": cfg.table_lr_mult}],
            lr=cfg.lr * cfg.table_lr_mult, betas=cfg.betas, weight_decay=cfg.table_weight_decay, tiers=tiers)
    elif tables:
        opts["tables"] = torch.optim.Adam(
            [{"params": tables, "lr_mult": cfg.table_lr_mult}],
            lr=cfg.lr * cfg.table_lr_mult, betas=cfg.betas, weight_decay=cfg.table_weight_decay,
            **_adam_impl(tables, cfg))
    return opts


def check_precision(cfg: TrainConfig, device: torch.device) -> None:
    """bf16 on a GPU without bfloat16 support is a one-line error, not a slow emulation."""
    if cfg.dtype == Precision.BF16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise accel.DeviceError(f"train.dtype=bf16: {torch.cuda.get_device_name(device)} has no bfloat16 "
                                f"support; use train.dtype=fp32")


# ----------------------------------------------------------------------------- metrics
class MetricsLog:
    """Append-only JSONL; ``keep_until(step)`` drops records after ``step`` (for resume)."""

    def __init__(self, path: Path, fresh: bool):
        self.path = path
        if fresh and path.exists():
            path.unlink()

    def keep_until(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a crash mid-write
            if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step:
                kept.append(line)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, self.path)

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------- set-up helpers
def _dataset_compression(model_cfg: ModelConfig, ds: "data.Dataset", data_dir: Path) -> Optional[np.ndarray]:
    """The tokenizer compression the hasher needs (None when Engram or compression is off)."""
    if model_cfg.engram is None or not model_cfg.engram.use_compression:
        return None
    saved = data_dir / ckpt.COMPRESSION_FILE
    if saved.is_file():  # prepared alongside the shards: skip rebuilding it
        return CompressionMap.load(saved).lookup
    return build_compression(ds.tokenizer).lookup


def _check_resume_config(meta: ckpt.CheckpointMeta, model_cfg: ModelConfig, train_cfg: TrainConfig) -> None:
    if meta.model_config.to_dict() != model_cfg.to_dict():
        diff = ckpt._dict_diff(meta.model_config.to_dict(), model_cfg.to_dict())
        raise CheckpointError(f"cannot resume {meta.run_dir}: the model config differs from the "
                              f"checkpoint's ({diff}); pass the recorded config or use a new run dir")
    if meta.train_config is None:
        return
    old, new = meta.train_config.to_dict(), train_cfg.to_dict()
    changed = sorted(k for k in old if old[k] != new[k] and k not in RESUME_MUTABLE)
    if changed:
        raise CheckpointError(
            f"cannot resume {meta.run_dir} exactly: train config {changed} differ from the "
            f"checkpoint's ({ckpt._dict_diff({k: old[k] for k in changed}, {k: new[k] for k in changed})}); "
            f"only {sorted(RESUME_MUTABLE)} may change on resume. Pass the recorded values or "
            f"start a new run dir")


def resume_configs(run_dir: PathLike, config_file: Optional[str] = None, overrides: Sequence[str] = (),
                   given: Optional[Mapping[str, Any]] = None, preset_name: Optional[str] = None
                   ) -> tuple[ModelConfig, TrainConfig, dict[str, tuple[Any, Any]]]:
    """The configs to resume ``run_dir`` with: the model and train configs it recorded, changed
    only by what is given explicitly (a JSON ``config_file``, ``--set`` ``overrides``, ``given``
    train values such as ``--prefetch``), and of that only the train keys in ``RESUME_MUTABLE``;
    anything else is a one-line ConfigError naming the key. ``preset_name``: a ``--preset`` given
    again, which must describe the recorded model. Returns (model, train, {key: (recorded, new)})."""
    run = Path(run_dir)
    if not (run / ckpt.CONFIG_FILE).is_file():
        raise CheckpointError(f"resume=True but {run} holds no checkpoint ({ckpt.CONFIG_FILE} is "
                              f"missing); train without resume or point at an existing run")
    meta = ckpt.read_config(run)
    model_rec = meta.model_config.to_dict()
    train_rec = (meta.train_config or TrainConfig()).to_dict()
    model, train = copy.deepcopy(model_rec), dict(train_rec)
    apply_config_sources(model, train, config_file, overrides, f"run {run}")
    train.update(given or {})
    changes = resume_changes((model_rec, train_rec), (model, train), RESUME_MUTABLE, str(run))
    if preset_name is not None:
        preset_model = build_configs(preset_name, meta.model_config.vocab_size, config_file, overrides)[0]
        if preset_model.to_dict() != model:
            raise ConfigError(f"--preset {preset_name} does not describe the model of {run} "
                              f"({ckpt._dict_diff(model, preset_model.to_dict())}); drop --preset, "
                              f"--resume continues the recorded model")
    return ModelConfig.from_dict(model), TrainConfig.from_dict(train), changes


def _to_tensor(batch: Iterable[Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = batch
    return (torch.as_tensor(x, dtype=torch.long).to(device),
            torch.as_tensor(y, dtype=torch.long).to(device))


# ----------------------------------------------------------------------------- train
def train(model_cfg: ModelConfig, train_cfg: TrainConfig, data_dir: PathLike, run_dir: PathLike,
          resume: bool = False, progress: bool = True, max_seconds: Optional[float] = None,
          *, device: Union[str, torch.device] = "cpu", overwrite: bool = False,
          tables_from: Optional[PathLike] = None, parallel: Optional[Parallel] = None) -> dict[str, Any]:
    """Train (or resume) a model on a prepared dataset; returns a JSON-able summary.

    ``resume=False`` starts from scratch; a ``run_dir`` that already holds a checkpoint is
    refused unless ``overwrite=True`` (then its checkpoint and metrics.jsonl are replaced). ``max_seconds`` caps the wall-clock time: when it runs out the
    loop stops after the current step, evaluates, and saves, so the run can be resumed.
    ``tables_from``: a table file (``engram table convert``) whose rows initialise the Engram
    tables of a fresh run (its hash fingerprint must match the model config).
    ``parallel``: how the run spreads over processes (``engram.distributed``); None is one process.
    Summary keys: steps, target_steps, final_val_loss, final_val_ppl, best_val_loss,
    tokens_per_s, tokens_seen, train_s, elapsed_s, stopped_early, resumed_from, param_counts,
    run_dir.
    """
    t_start = time.perf_counter()
    data_dir, run = Path(data_dir), Path(run_dir)
    device = accel.resolve_device(device)
    par = parallel or Parallel()
    progress = progress and par.is_main
    ds = data.load_dataset(data_dir)
    tok_fp, _ = dataset_identity(ds)
    check_dataset_for_model(model_cfg.vocab_size, None, ds, data_dir, "the model config")
    if train_cfg.seq_len > model_cfg.max_seq_len:
        raise EngramError(f"train seq_len={train_cfg.seq_len} exceeds max_seq_len={model_cfg.max_seq_len}; "
                         f"lower TrainConfig.seq_len or raise ModelConfig.max_seq_len")

    if not resume and not overwrite and (run / ckpt.CONFIG_FILE).is_file():
        raise CheckpointError(f"{run} already holds a checkpoint; pass resume=True (--resume) to "
                              f"continue it or overwrite=True (--overwrite) to start over")
    if resume:
        if not (run / ckpt.CONFIG_FILE).is_file():
            raise CheckpointError(f"resume=True but {run} holds no checkpoint ({ckpt.CONFIG_FILE} is "
                                  f"missing); train without resume or point at an existing run")
        meta = ckpt.read_config(run)
        check_dataset_for_model(model_cfg.vocab_size, meta.tokenizer_fingerprint, ds, data_dir,
                                f"run {run}")
        _check_resume_config(meta, model_cfg, train_cfg)

    torch.manual_seed(train_cfg.seed)  # deterministic initialisation
    model = EngramLM(model_cfg, _dataset_compression(model_cfg, ds, data_dir)).to(device)
    if tables_from is not None:
        if resume:
            raise EngramError("tables_from (--table) initialises a fresh run; a resumed run already "
                             "has its tables in the checkpoint, drop one of the two")

        load_tables_into(model, tables_from, progress=progress)
    par.prepare(model)
    tiers: list[TrainableTier] = []
    if train_cfg.table_storage != TableLocation.MEMORY and model.historian_experts:
        raise EngramError(f"table_storage={train_cfg.table_storage.value!r} is not supported with "
                          f"engram.placement='expert' (historian experts); use --table-storage memory")
    if train_cfg.table_storage != TableLocation.MEMORY and model.engram_layers:
        if device.type != "cpu":
            raise EngramError(f"table_storage={train_cfg.table_storage.value!r} keeps the table rows in host "
                              f"files, but the model trains on {device}; use --table-storage memory there")
        work = Path(train_cfg.table_dir) if train_cfg.table_dir else run / TABLE_WORK_DIR
        tiers = place_tables(model, train_cfg.table_storage, work, train_cfg.table_cache_rows,
                             tag=f"rank{par.rank}-of-{par.world_size}")
    try:
        return _train_placed(model, train_cfg, ds, data_dir, run, resume, progress, max_seconds,
                             par, tiers, tok_fp, device, t_start)
    finally:
        for t in tiers:  # scratch: the checkpoint is the durable copy
            t.close()
        if tiers:
            try:
                tiers[0].directory.rmdir()
            except OSError:  # another rank's files are still there, or it removed the directory first
                pass


def _train_placed(model: EngramLM, train_cfg: TrainConfig, ds: "data.Dataset",
                  data_dir: Path, run: Path, resume: bool, progress: bool, max_seconds: Optional[float],
                  par: Parallel, tiers: list[TrainableTier], tok_fp: Optional[str], device: torch.device,
                  t_start: float) -> dict[str, Any]:
    """The rest of :func:`train`, once the tables are where they train."""
    optimizers = build_optimizers(model, train_cfg)
    state: dict[str, Any] = {"step": 0, "best_val_loss": None, "data_seed": train_cfg.seed,
                             "log_loss_sum": 0.0, "log_loss_count": 0, "train_s": 0.0,
                             "tokens_seen": 0}
    if resume:
        state.update(par.load_for_resume(run, model, optimizers))
    run.mkdir(parents=True, exist_ok=True)
    metrics = MetricsLog(run / METRICS_FILE, fresh=not resume) if par.is_main else None
    if resume and metrics is not None:
        metrics.keep_until(state["step"])

    tokenizer_path = data_dir / ckpt.TOKENIZER_FILE
    loop = TrainLoop(model, optimizers, train_cfg, ds, metrics, state, device, progress, par, tiers)
    resumed_from = state["step"] if resume else None

    def save() -> None:
        for t in tiers:  # a cached tier's dirty rows reach the file the checkpoint reads
            t.flush()
        par.save_checkpoint(run, model, optimizers, loop.trainer_state(), train_cfg,
                            tokenizer_path if tokenizer_path.is_file() else None, tok_fp)

    stopped_early, final = loop.run_and_evaluate(save, t_start, max_seconds)
    save()
    return {
        "steps": loop.step,
        "target_steps": train_cfg.steps,
        "final_val_loss": final["loss"],
        "final_val_ppl": final["perplexity"],
        "best_val_loss": loop.best_val,
        "tokens_per_s": loop.session_tokens / max(loop.session_train_s, 1e-9),
        "tokens_seen": loop.tokens_seen,
        "train_s": loop.train_s,
        "elapsed_s": time.perf_counter() - t_start,
        "stopped_early": stopped_early,
        "resumed_from": resumed_from,
        "param_counts": model.param_counts(),
        "run_dir": str(run),
    }


class TrainLoop:
    """The mutable training state and one method per phase (step, log, eval)."""

    def __init__(self, model: EngramLM, optimizers: dict[str, torch.optim.Optimizer],
                 cfg: TrainConfig, ds: "data.Dataset", metrics: Optional[MetricsLog], state: dict[str, Any],
                 device: torch.device, progress: bool, par: Optional[Parallel] = None,
                 tiers: Iterable[TrainableTier] = ()):
        self.model, self.optimizers, self.cfg, self.ds = model, optimizers, cfg, ds
        par = par or Parallel()  # one process unless the distributed package passes its own
        self.par, self.forward = par, par.train_module(model)
        self.metrics, self.device, self.progress = metrics, device, progress
        check_precision(cfg, device)
        if cfg.compile:  # each block's attention + FFN; the Engram layer stays eager
            accel.compile_backbone(model)
        self.extra = {k: v for k, v in state.items() if k not in TrainLoop.STATE_KEYS and k != "rng"}
        self.step = int(state["step"])
        self.best_val: Optional[float] = state.get("best_val_loss")
        self.loss_sum = float(state.get("log_loss_sum", 0.0))
        self.loss_count = int(state.get("log_loss_count", 0))
        self.train_s = float(state.get("train_s", 0.0))
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.session_tokens, self.session_train_s = 0, 0.0
        self.last_val: Optional[dict[str, float]] = None
        self.last_val_step = -1
        self.grad_norm = float("nan")
        self.params = optimizer_params(optimizers)
        self.tiers = list(tiers)
        self._interval_tokens, self._interval_s = 0, 0.0
        self.batches = None  # TrainConfig.prefetch: next batch and row ids built in the background
        if cfg.prefetch:
            self.batches = BatchPrefetcher(
                lambda s: data.get_batch(ds.train, cfg.batch_size, cfg.seq_len, s, cfg.seed,
                                         part=par.batch_part),
                model.hasher, device, warm=self._warm_rows if self.tiers else None)

    def _warm_rows(self, step: int, hash_ids: Optional[dict[int, torch.Tensor]]) -> None:
        """On the prefetch thread: read the rows step ``step`` will use from the file tiers ahead.

        One process warms its batch's rows. With several, a rank owns rows that every rank's
        part asks for; the batch is a pure function of the step, so the rank hashes the whole
        global batch itself and warms the rows it owns (``g % W == rank``, local ``g // W``),
        with no communication.
        """
        if self.par.world_size > 1 or hash_ids is None:
            x, _ = data.get_batch(self.ds.train, self.cfg.batch_size, self.cfg.seq_len, step, self.cfg.seed)
            hash_ids = self.model.hasher.hash(x)
        for e in self.model.engram_layers:
            e.table.prefetch(e.multi_head_embedding.rows(hash_ids[e.layer_id].cpu()))

    STATE_KEYS = ("step", "best_val_loss", "data_seed", "log_loss_sum", "log_loss_count",
                  "train_s", "tokens_seen")

    def trainer_state(self) -> dict[str, Any]:
        return {**self.extra, "step": self.step, "best_val_loss": self.best_val,
                "data_seed": self.cfg.seed, "log_loss_sum": self.loss_sum,
                "log_loss_count": self.loss_count, "train_s": self.train_s,
                "tokens_seen": self.tokens_seen}

    def run_and_evaluate(self, save, t_start: float, max_seconds: Optional[float]
                         ) -> tuple[bool, dict[str, float]]:
        """:meth:`run`, then stop the batch prefetcher and evaluate at the final step:
        (stopped by the budget, the final validation result)."""
        try:
            stopped = self.run(save, t_start, max_seconds)
        finally:
            if self.batches is not None:
                self.batches.close()
        return stopped, self.final_eval()

    def run(self, save, t_start: float, max_seconds: Optional[float]) -> bool:
        """Steps until cfg.steps or the time budget; returns True when stopped by the budget."""
        cfg = self.cfg
        bar = tqdm(total=cfg.steps, initial=min(self.step, cfg.steps), desc="train",
                   disable=not self.progress, dynamic_ncols=True)
        try:
            while self.step < cfg.steps:
                lr = self.train_step()
                bar.update(1)
                done = self.step == cfg.steps
                stop = not done and max_seconds is not None and time.perf_counter() - t_start >= max_seconds
                stop = self.par.any(stop)  # every process stops after the same step
                record: dict[str, Any] = {}
                if self.step % cfg.log_every == 0 or done or stop:
                    # On a budget stop the partial interval is shown but kept (it is saved), so
                    # the resumed run logs the same full-interval mean as an uninterrupted one;
                    # an interval that ends at the stop is complete and starts afresh.
                    record.update(self.log_fields(lr, reset=not stop or self.step % cfg.log_every == 0))
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}")
                if self.step % cfg.eval_every == 0 or done or stop:
                    record.update(self.eval_fields())
                if record:
                    self.write(record)
                if stop:
                    return True
                if self.step % cfg.save_every == 0 and not done:
                    save()
        finally:
            bar.close()
        return False

    def train_step(self) -> float:
        """One optimizer step on batch ``self.step``; returns the learning rate used."""
        cfg, model = self.cfg, self.model
        t0 = time.perf_counter()
        lr = lr_at(self.step, lr=cfg.lr, warmup_steps=cfg.warmup_steps, steps=cfg.steps,
                   min_lr_ratio=cfg.min_lr_ratio)
        set_lr(self.optimizers, lr)
        if self.batches is not None:  # built (and hashed) on a background thread during the last step
            x, y, hash_ids = self.batches.get(self.step)
        else:
            x, y = _to_tensor(data.get_batch(self.ds.train, cfg.batch_size, cfg.seq_len, self.step,
                                             cfg.seed, part=self.par.batch_part), self.device)
            hash_ids = None
        model.train()
        # Each process's loss is the mean over its equal part of the batch; averaging the
        # gradients over processes (DDP) gives the gradient of the mean over the global batch.
        with accel.autocast(cfg.dtype, self.device):  # bf16: the loss is float32 (autocast's policy)
            loss = self.forward(x, y, hash_ids=hash_ids).loss
        mean_loss = self.par.mean(loss.detach())
        if not math.isfinite(mean_loss):  # the mean is the same on every process: all stop
            raise FloatingPointError(f"training loss is {mean_loss} at step {self.step}; lower "
                                     f"TrainConfig.lr (now {cfg.lr}) or enable grad_clip")
        loss.backward()
        self.grad_norm = optimizer_step(self.optimizers, self.params, cfg.grad_clip, self.par.clip_grad_norm)
        self.par.end_step(model)
        for t in self.tiers:
            t.end_step()
        model.update_moe_bias()
        self.step += 1
        self.loss_sum += mean_loss
        self.loss_count += 1
        dt = time.perf_counter() - t0
        n = x.numel() * self.par.world_size
        self.train_s += dt
        self.session_train_s += dt
        self.tokens_seen += n
        self.session_tokens += n
        self._interval_tokens += n
        self._interval_s += dt
        return lr

    def log_fields(self, lr: float, reset: bool = True) -> dict[str, Any]:
        """Mean loss since the last log line (the partial sum survives resume)."""
        out = {"loss": self.loss_sum / max(self.loss_count, 1), "lr": lr}
        if self.cfg.grad_clip > 0:
            out["grad_norm"] = self.grad_norm
        out["tokens_per_s"] = self._interval_tokens / max(self._interval_s, 1e-9)
        if reset:
            self.loss_sum, self.loss_count = 0.0, 0
            self._interval_tokens, self._interval_s = 0, 0.0
        return out

    def eval_fields(self) -> dict[str, Any]:
        with accel.autocast(self.cfg.dtype, self.device):
            res = evaluate(self.model, self.ds.val, self.cfg.batch_size, self.cfg.seq_len,
                           self.cfg.eval_batches)
        self.last_val, self.last_val_step = res, self.step
        if math.isfinite(res["loss"]) and (self.best_val is None or res["loss"] < self.best_val):
            self.best_val = res["loss"]
        return {"val_loss": res["loss"], "val_ppl": res["perplexity"]}

    def final_eval(self) -> dict[str, float]:
        """Validation at the current step (reused when the loop just evaluated there)."""
        if self.last_val is None or self.last_val_step != self.step:
            self.write(self.eval_fields())
        assert self.last_val is not None
        return self.last_val

    def write(self, record: dict[str, Any]) -> None:
        if self.metrics is None:  # not the main process
            return
        self.metrics.write({"step": self.step, **record, "time": time.time(), "train_s": self.train_s})
