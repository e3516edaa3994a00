"""Train a knowledge patch: only the Engram tables learn new text, the backbone stays frozen.

    engram patch train --ckpt RUN --data new_facts.txt --out facts.engp [--table TABLE]

The model is loaded from ``RUN`` (and, with ``--table``, its tables from a table file, so the
patch stacks on the patches already applied there). Every parameter is frozen except the
Engram table weights; with ``train_gates`` the Engram gate/value projections (key and value
projections, their norms, the short conv) train too, but they are *not* part of the patch:
their count is reported separately and the patch alone does not reproduce them. The steps use
``engram train``'s learning-rate schedule, joint gradient clipping and optimizer step
(:mod:`engram.training.optimization`).

Why only the touched rows change
    The table gradient is sparse: a row receives gradient only where the new text's N-grams
    hash to it. The tables use Adam (the project's convention: lr x ``table_lr_mult``, no
    weight decay) started from zero moments, so a row whose gradient was zero at every step
    gets an update of exactly 0 (m = v = 0); rows are compared bit for bit afterwards and
    exactly the changed ones go into the patch. The original corpus is affected only through
    rows it shares with the new text (the same N-grams, or hash collisions).

Keeping the original corpus's loss: rehearsal
    Given the original corpus (the base run's dataset), every step also takes a batch of it and
    adds ``rehearsal * loss_orig`` (default 1.0 whenever the corpus is given). The table
    gradient stays masked to rows the new text has touched, so the patch holds no row the new
    text does not read; the original text only decides how the shared rows may move. Measured
    on held-out facts (docs/patches.md): 1000 steps without rehearsal raise the original
    validation loss by 2.95%, with rehearsal 1.0 by 0.34%, at 83% of the recall.
    Two cruder knobs remain, both off by default because they lost to rehearsal there:
    ``anchor`` adds ``anchor * ||W - W0||^2``, and ``protect_min_count`` freezes rows the
    original corpus reads at least that often (in a small table nearly every row the new text
    reads is also busy, so protection freezes what the patch needs: 0% recall at 64).

The model runs in eval mode while training: the MoE routers would otherwise accumulate expert
loads (a buffer) and the routing bias is never updated, so the backbone is bit-identical
afterwards (checked and reported as ``backbone_unchanged``).

Shape legend
    B batch   T sequence length   R rows of one table   Dh row width
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from engram.config import (
    DEFAULT_REHEARSAL,
    PatchTrainConfig,
)
from engram.data.corpus import read_user_files
from engram.data.shards import DataError, load_dataset
from engram.data.tokenizer import load_tokenizer, tokenizer_info
from engram.fsutil import PathLike
from engram.model import checkpoint as ckpt_mod
from engram.patches.apply import table_chain, table_fingerprint
from engram.patches.patchfile import PatchError, TablePatch, make_patch, save_patch, tables_fingerprint
from engram.tables.access import row_access_counts
from engram.tables.runtime import load_tables_into
from engram.tables.tablefile import row_nbytes
from engram.training.optimization import lr_at, optimizer_params, optimizer_step, set_lr


# ----------------------------------------------------------------------------- data
def read_patch_texts(paths: Sequence[PathLike]) -> list[str]:
    """Texts of .txt / .jsonl files (or directories of them), one per document."""
    if not paths:
        raise PatchError("no --data given; pass the new text as .txt or .jsonl files")
    docs = read_user_files(paths)
    texts = [d.text for d in docs if d.text.strip()]
    if not texts:
        raise PatchError(f"{[str(p) for p in paths]} hold no text; pass files with the new facts")
    return texts


def encode_texts(texts: Iterable[str], tokenizer: Any, eos_id: int) -> np.ndarray:
    """Documents encoded and joined, each followed by eos (as ``engram data prepare`` does)."""
    pieces = []
    for enc in tokenizer.encode_batch(list(texts), add_special_tokens=False):
        pieces += [np.asarray(enc.ids, dtype=np.int64), np.array([eos_id], dtype=np.int64)]
    tokens = np.concatenate(pieces) if pieces else np.empty(0, dtype=np.int64)
    if tokens.size < 2:
        raise PatchError("the new text encodes to fewer than 2 tokens; give more text")
    return tokens


def _batch(tokens: np.ndarray, cfg: PatchTrainConfig, gen: torch.Generator,
           batch_size: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows [B, T+1] of the stream -> (x, y) [B, T]; a short stream is tiled first."""
    T = cfg.seq_len
    if tokens.size < T + 1:
        tokens = np.tile(tokens, -(-(T + 1) // tokens.size))
    starts = torch.randint(0, tokens.size - T, (batch_size or cfg.batch_size,), generator=gen).numpy()
    w = torch.from_numpy(np.stack([tokens[s:s + T + 1] for s in starts]).astype(np.int64))
    return w[:, :-1], w[:, 1:]


def load_original_tokens(data_dir: PathLike, tokenizer_fingerprint: Optional[str] = None) -> np.ndarray:
    """The training split of a prepared dataset (``engram data prepare``), checked against the run."""
    try:
        ds = load_dataset(data_dir)
    except (DataError, FileNotFoundError) as e:
        raise PatchError(f"--original-data {data_dir}: {e}; pass the base run's dataset directory") from e
    fp = ds.meta.get("tokenizer_fingerprint")
    if tokenizer_fingerprint is not None and fp != tokenizer_fingerprint:
        raise PatchError(f"--original-data {data_dir} was tokenized with tokenizer {str(fp)[:16]}..., the run "
                         f"with {tokenizer_fingerprint[:16]}...; pass the dataset the run was trained on")
    return np.asarray(ds.train.tokens)


def protected_masks(counts: dict[int, np.ndarray], min_count: int) -> dict[int, torch.Tensor]:
    """{layer_id: bool [R]}: rows read at least ``min_count`` times (none when ``min_count`` is 0)."""
    return {lid: torch.from_numpy(c >= min_count) if min_count > 0 else torch.zeros(c.size, dtype=torch.bool)
            for lid, c in counts.items()}


def _touched(model: Any, hash_ids: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """{layer_id: int64 rows} read by a batch, from its hash ids {layer_id: [B, T, H]}."""
    return {l.layer_id: l.multi_head_embedding.rows(hash_ids[l.layer_id]).reshape(-1).unique()
            for l in model.engram_layers}


# ----------------------------------------------------------------------------- training
def gate_parameters(model: Any) -> list[torch.nn.Parameter]:
    """The Engram layers' non-table parameters (key/value projections, norms, short conv)."""
    out = []
    for e in model.engram_layers:
        table = e.table.weight
        out += [p for p in e.parameters() if p is not table]
    return out


def _digest(model: Any, skip: set[int]) -> str:
    h = hashlib.sha256()
    params = {id(p) for p in model.parameters()}
    for name, t in sorted(model.state_dict(keep_vars=True).items()):
        if id(t) in skip and id(t) in params:
            continue
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass
class _RowMasks:
    """Which table rows may change, per layer (bool [R]; see the module docstring)."""

    protected: dict[int, torch.Tensor]  # read by the original corpus >= protect_min_count times
    touched: dict[int, torch.Tensor]  # read by the new text so far (filled in while training)
    protect_on: bool  # row protection is active
    use_mask: bool  # gradients are masked to touched, unprotected rows (protection or rehearsal)


@dataclass
class _StepLog:
    losses: list[float]  # loss on the new text, per step
    losses_orig: list[float]  # rehearsal loss on the original corpus, per step (empty without)
    train_s: float


def train_patch(model: Any, tokens: np.ndarray, cfg: PatchTrainConfig, *, dtype: str = "fp32",
                parent: Optional[str] = None, name: str = "", provenance: Optional[dict[str, Any]] = None,
                original_tokens: Optional[np.ndarray] = None,
                row_counts: Optional[dict[int, np.ndarray]] = None,
                progress: bool = True) -> tuple[TablePatch, dict[str, Any]]:
    """Train ``model``'s tables on ``tokens`` in place; returns (the patch, a report).

    ``dtype`` is the storage dtype of the table the patch will be applied to (its base
    fingerprint and old values are taken in that dtype); ``parent`` the top patch of that table.
    ``original_tokens`` (1-D ids of the original training corpus) enables row protection
    (``cfg.protect_min_count``) and rehearsal (``cfg.rehearsal``); ``row_counts`` (from
    :func:`row_access_counts` of those tokens) skips recounting them.
    """
    tables = _check_model(model, cfg)
    if cfg.rehearsal is None:  # automatic: rehearse whenever the original corpus is there
        cfg = replace(cfg, rehearsal=DEFAULT_REHEARSAL if original_tokens is not None else 0.0)
    if cfg.rehearsal > 0 and original_tokens is None:
        raise PatchError(f"rehearsal={cfg.rehearsal} needs the original corpus: pass --original-data DIR "
                         f"(the base run's dataset directory) or set --rehearsal 0")
    masks = _select_rows(model, tables, cfg, original_tokens, row_counts)
    gates = gate_parameters(model) if cfg.train_gates else []
    trainable = {id(p) for p in [*tables.values(), *gates]}
    frozen_digest = _digest(model, trainable)
    base = {lid: w.detach().clone() for lid, w in tables.items()}
    optimizers = _build_optimizers(tables, gates, cfg)
    log = _run_steps(model, tokens, cfg, tables, trainable, base, masks, optimizers, original_tokens, progress)
    patch = _make_patch(model, cfg, base, tables, masks, log, tokens.size, dtype=dtype, parent=parent,
                        name=name, provenance=provenance)
    return patch, _report(cfg, tables, gates, masks, log, patch,
                          backbone_unchanged=_digest(model, trainable) == frozen_digest)


def _check_model(model: Any, cfg: PatchTrainConfig) -> dict[int, torch.nn.Parameter]:
    """The Engram table weights {layer_id: [R, Dh]}, once the model is known to be patchable."""
    if getattr(model, "hasher", None) is None:
        raise PatchError("the model has no Engram layers; a patch trains Engram tables, use an engram-* run")
    tables = {e.layer_id: e.table.weight for e in model.engram_layers}
    if any(w.is_meta for w in tables.values()):
        raise PatchError("the model's tables are offloaded; load them into memory to train a patch")
    if cfg.seq_len > model.cfg.max_seq_len:
        raise PatchError(f"seq_len={cfg.seq_len} exceeds the model's max_seq_len={model.cfg.max_seq_len}; "
                         f"pass --seq-len {model.cfg.max_seq_len} or less")
    return tables


def _select_rows(model: Any, tables: dict[int, torch.nn.Parameter], cfg: PatchTrainConfig,
                 original_tokens: Optional[np.ndarray],
                 row_counts: Optional[dict[int, np.ndarray]]) -> _RowMasks:
    """Rows protected by the original corpus's counts, and an empty record of touched rows."""
    protect_on = cfg.protect_min_count > 0 and (original_tokens is not None or row_counts is not None)
    if protect_on and row_counts is None:
        row_counts = row_access_counts(model, original_tokens)
    if row_counts is not None and set(row_counts) != set(tables):
        raise PatchError(f"row_counts cover layers {sorted(row_counts)}, the model's tables {sorted(tables)}; "
                         f"count them with row_access_counts(model, tokens) of this model")
    if row_counts is not None:
        protected = {lid: m.to(tables[lid].device) for lid, m in
                     protected_masks(row_counts, cfg.protect_min_count if protect_on else 0).items()}
    else:
        protected = {lid: torch.zeros(w.shape[0], dtype=torch.bool, device=w.device) for lid, w in tables.items()}
    touched = {lid: torch.zeros(w.shape[0], dtype=torch.bool, device=w.device) for lid, w in tables.items()}
    return _RowMasks(protected, touched, protect_on, use_mask=protect_on or cfg.rehearsal > 0)


def _build_optimizers(tables: dict[int, torch.nn.Parameter], gates: list[torch.nn.Parameter],
                      cfg: PatchTrainConfig) -> dict[str, torch.optim.Optimizer]:
    """Adam from zero moments (an untouched row's update is exactly 0): the tables at
    ``lr * table_lr_mult`` without weight decay, the gate parameters (``train_gates``) at ``lr``."""
    optimizers: dict[str, torch.optim.Optimizer] = {"tables": torch.optim.Adam(
        [{"params": list(tables.values()), "lr_mult": cfg.table_lr_mult}],
        lr=cfg.lr * cfg.table_lr_mult, betas=(0.9, 0.95), weight_decay=0.0)}
    if gates:
        optimizers["gates"] = torch.optim.Adam([{"params": gates, "lr_mult": 1.0}], lr=cfg.lr, betas=(0.9, 0.95))
    return optimizers


def _run_steps(model: Any, tokens: np.ndarray, cfg: PatchTrainConfig, tables: dict[int, torch.nn.Parameter],
               trainable: set[int], base: dict[int, torch.Tensor], masks: _RowMasks,
               optimizers: dict[str, torch.optim.Optimizer], original_tokens: Optional[np.ndarray],
               progress: bool) -> _StepLog:
    """``cfg.steps`` optimizer steps with the main loop's schedule, clipping and step
    (:mod:`engram.training.optimization`); only ``trainable`` parameters get gradients."""
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    params = optimizer_params(optimizers)
    gen = torch.Generator().manual_seed(cfg.seed)
    gen_orig = torch.Generator().manual_seed(cfg.seed + 1)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # see the module docstring: no MoE load accumulation, nothing but rows moves
    log = _StepLog([], [], 0.0)
    t0 = time.perf_counter()
    try:
        for step in tqdm(range(cfg.steps), desc="patch train", disable=not progress, dynamic_ncols=True):
            set_lr(optimizers, lr_at(step, lr=cfg.lr, warmup_steps=cfg.warmup_steps, steps=cfg.steps,
                                     min_lr_ratio=cfg.min_lr_ratio))
            x, y = _batch(tokens, cfg, gen)
            x = x.to(device)
            hash_ids = model.hasher.hash(x)  # once: the forward and the touched rows both read them
            loss = model(x, y.to(device), hash_ids=hash_ids).loss
            total = loss
            if masks.use_mask:  # the rows the new text has touched so far (see the module docstring)
                for lid, rows in _touched(model, hash_ids).items():
                    masks.touched[lid][rows] = True
            if cfg.rehearsal > 0:
                xo, yo = _batch(original_tokens, cfg, gen_orig, cfg.rehearsal_batch_size or cfg.batch_size)
                loss_orig = model(xo.to(device), yo.to(device)).loss
                total = total + cfg.rehearsal * loss_orig
                log.losses_orig.append(float(loss_orig.detach()))
            if cfg.anchor > 0:
                total = total + cfg.anchor * sum(((w - base[lid].to(w.device)) ** 2).sum()
                                                 for lid, w in tables.items())
            if not torch.isfinite(total):
                raise FloatingPointError(f"patch training loss is {float(total)} at step {step}; lower --lr")
            total.backward()
            if masks.use_mask:  # protected rows and rows the new text never touched get no update
                for lid, w in tables.items():
                    if w.grad is not None:
                        allowed = masks.touched[lid] & ~masks.protected[lid]
                        w.grad.mul_(allowed.unsqueeze(1).to(w.grad.dtype))
            optimizer_step(optimizers, params, cfg.grad_clip)
            log.losses.append(float(loss.detach()))
    finally:
        model.train(was_training)
        for p in model.parameters():
            p.requires_grad_(True)
    log.train_s = time.perf_counter() - t0
    return log


def _tail_mean(values: list[float], steps: int) -> float:
    """Mean over the last 10% of the steps (at least one): the loss a patch ends at."""
    return float(np.mean(values[-max(1, steps // 10):]))


def _make_patch(model: Any, cfg: PatchTrainConfig, base: dict[int, torch.Tensor],
                tables: dict[int, torch.nn.Parameter], masks: _RowMasks, log: _StepLog, num_tokens: int, *,
                dtype: str, parent: Optional[str], name: str,
                provenance: Optional[dict[str, Any]]) -> TablePatch:
    """The rows that differ from ``base`` bit for bit, with the training's provenance."""
    new = {lid: w.detach() for lid, w in tables.items()}
    prov = {**(provenance or {}), "config": asdict(cfg), "tokens": int(num_tokens),
            "loss_first": log.losses[0], "loss_last": _tail_mean(log.losses, cfg.steps),
            "train_s": round(log.train_s, 3),
            "protected_rows": {str(lid): int(m.sum()) for lid, m in masks.protected.items()},
            **({"loss_orig_first": log.losses_orig[0], "loss_orig_last": _tail_mean(log.losses_orig, cfg.steps)}
               if log.losses_orig else {})}
    return make_patch(base, new, hash_fingerprint=model.hasher.fingerprint(), hasher=model.hasher.describe(),
                      dtype=dtype, quantization=cfg.quantization, parent=parent, name=name, provenance=prov)


def _report(cfg: PatchTrainConfig, tables: dict[int, torch.nn.Parameter], gates: list[torch.nn.Parameter],
            masks: _RowMasks, log: _StepLog, patch: TablePatch, *, backbone_unchanged: bool) -> dict[str, Any]:
    prov = patch.meta["provenance"]
    return {"steps": cfg.steps, "tokens": prov["tokens"], "loss_first": prov["loss_first"],
            "loss_last": prov["loss_last"], "train_s": log.train_s,
            "trainable_table_params": sum(w.numel() for w in tables.values()),
            "trainable_gate_params": sum(p.numel() for p in gates),
            "gate_params_in_patch": False,
            "changed_rows": {str(lid): int(lp.rows.numel()) for lid, lp in patch.layers.items()},
            "table_rows": {str(lid): int(w.shape[0]) for lid, w in tables.items()},
            "backbone_unchanged": backbone_unchanged,
            "protect_min_count": cfg.protect_min_count if masks.protect_on else 0,
            "protected_rows": prov["protected_rows"],
            "rehearsal": cfg.rehearsal,
            **({"touched_rows": {str(lid): int(a.sum()) for lid, a in masks.touched.items()},
                "touched_protected_rows": {str(lid): int((a & masks.protected[lid]).sum())
                                           for lid, a in masks.touched.items()}}
               if masks.use_mask else {}),
            **({k: prov[k] for k in ("loss_orig_first", "loss_orig_last")} if log.losses_orig else {})}


def train_patch_from_run(ckpt: PathLike, data: Sequence[PathLike], out: PathLike, cfg: PatchTrainConfig, *,
                         table: Optional[PathLike] = None, name: str = "", dtype: Optional[str] = None,
                         original_data: Optional[PathLike] = None,
                         row_counts: Optional[dict[int, np.ndarray]] = None,
                         loaded: Optional[tuple[Any, Any, str]] = None,
                         progress: bool = True) -> dict[str, Any]:
    """``engram patch train``: load RUN (tables from ``table`` if given), train, write the patch.

    ``original_data``: the base run's prepared dataset; its training split is the original corpus
    for row protection and rehearsal (``row_counts`` may give its row counts, precomputed).
    ``loaded``: (model, tokenizer, tokenizer fingerprint) already loaded from ``ckpt`` by the
    caller (a retrofitted Hugging Face model with its adapter); RUN is then not read."""
    if loaded is not None:
        model, tok, tok_fp = loaded
    else:
        model, meta = ckpt_mod.load_model(ckpt)
        tok_path = Path(ckpt) / ckpt_mod.TOKENIZER_FILE
        if not tok_path.is_file():
            raise PatchError(f"{ckpt} has no {ckpt_mod.TOKENIZER_FILE}; the new text cannot be tokenized "
                             f"like the training data. Re-save the run with its dataset's tokenizer")
        tok, tok_fp = load_tokenizer(tok_path), meta.tokenizer_fingerprint
    tokens = encode_texts(read_patch_texts(data), tok, tokenizer_info(tok).eos_id)
    original = None
    if original_data is not None:
        original = load_original_tokens(original_data, tok_fp)
    parent = None
    if table is not None:
        header = load_tables_into(model, table, progress=progress)
        chain = table_chain(header)
        parent = chain[-1]["patch_id"] if chain else None
        if dtype is not None and dtype != header.dtype:
            raise PatchError(f"--dtype {dtype} differs from {table}'s storage dtype {header.dtype}; "
                             f"drop --dtype (a patch is made for the table it stacks on)")
        dtype = header.dtype
        tabs = {e.layer_id: e.table.weight.detach() for e in model.engram_layers}
        if tables_fingerprint(tabs, dtype, model.hasher.fingerprint()) != table_fingerprint(header):
            raise PatchError(f"{table}'s rows did not survive loading into the model exactly; "
                             f"re-export it with `engram table convert {ckpt} TABLE`")
    dtype = dtype or "fp32"
    prov = {"ckpt": str(ckpt), "data": [str(p) for p in data], "table": str(table) if table else None,
            "original_data": str(original_data) if original_data is not None else None}
    patch, report = train_patch(model, tokens, cfg, dtype=dtype, parent=parent, name=name,
                                provenance=prov, original_tokens=original, row_counts=row_counts,
                                progress=progress)
    path = save_patch(patch, out)
    table_bytes = sum(int(r) for r in report["table_rows"].values()) * row_nbytes(dtype, model.cfg.engram.head_dim)
    return {**report, "patch": str(path), "patch_id": patch.patch_id, "parent": parent, "dtype": dtype,
            "patch_bytes": path.stat().st_size, "table_bytes": table_bytes,
            "size_ratio": path.stat().st_size / max(table_bytes, 1)}


