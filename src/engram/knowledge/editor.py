"""The fact-edit trainer: write facts into Engram table rows so the model answers them in other words.

    engram patch train --ckpt ADAPTER --facts facts.jsonl --out facts.engp

What it does, and why (the recipe that made table edits generalise to new phrasings):

1. **A varied usage corpus.** Every fact becomes its relation's training forms (statements,
   questions, cloze forms, paraphrases, chat turns in the base's chat template;
   :mod:`engram.knowledge.templates`), plus any marked sentences given.
2. **Every row those sentences read is trained**, at every position: the subject's own N-grams
   (the rows any later question about the subject reads again) as well as the ones before the
   answer (``rows="all"``); or only the rows read at the subject's and the answer's own positions
   (``rows="subject"``), so that the edit cannot key the answer on the words of one phrasing. Nothing else moves. The rows are held as a compact ``delta`` [rows, Dh] per layer
   and written into the table for each forward, so the shared table is never grown or copied.
   With ``keyed`` the trained entries are keyed by N-gram instead (one per head and distinct
   N-gram the sentences read there, ``engram.model.table.KeyedOverlay``): read only where that
   N-gram recurs, so neutral text that merely hashes to a trained row is not changed; they are
   passed to each forward as the call's ``patches=`` and the patch is a keyed ``.engp``.
3. **The loss** is the cross-entropy of the answer tokens, plus ``kl_weight`` x the KL from the
   unedited model's next-token distribution on the sentences' other tokens, plus
   ``neutral_kl_weight`` x the same KL on neutral text (English no fact is in). Gradients flow
   through the frozen model to the rows; the unedited model's distribution is the same model
   with the rows put back. Its distribution on the sentences and on the neutral text is computed
   once, before training, and kept as its top ``kl_topk`` tokens plus the rest's mass, so a large
   neutral set costs little memory (``kl_topk=0``: the sentences' recomputed in full at every
   step and the neutral text's kept in full, the slow reference).
4. **Stopping on dev accuracy**: every ``eval_every`` steps the dev questions (held-out
   templates, never trained on) are scored; the best rows so far are kept (most exact answers,
   ties broken by the answers' likelihood), and training stops after ``patience`` evaluations
   without a gain, at ``steps``, or once ``max_seconds`` have passed (after one more evaluation).

The decoder layers below the first Engram layer are frozen and read no table, so their output
is captured once (with the unedited model's distributions) and every step starts above them
(a retrofitted model; ``skip_prefix=False`` is the reference that computes them every step).

With ``autocast="bf16"`` the training forwards, and the unedited model's cached distributions
they are compared with, run in bfloat16 (about 1.4x faster on a CPU with AVX-512 BF16); the
rows, the optimiser and the dev scoring stay float32.

The result is an ordinary ``.engp`` patch over the tables the model had (apply, revert, stack,
list); the model is left as it was.

Batches are drawn by length (:func:`epoch_batches`), so that padding costs little.

Shape legend
    M masked positions   k kept tokens of the base
    B sequences per step   T tokens   V vocabulary   R rows of one table   n trained rows   Dh row width
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import record_function
from tqdm.auto import tqdm

from engram.config import TableLocation
from engram.knowledge.edit_config import FactEditConfig, FactEditError
from engram.knowledge.scoring import (
    Case,
    fact_cases,
    fixed_sample,
    logits_at,
    logprobs,
    marked_cases,
    neutral_windows,
    pad_batch,
    pad_states,
    score,
)
from engram.knowledge.templates import chat_format, templates
from engram.model.accel import warn_if_cpu_bf16_is_slow
from engram.model.table import KeyedOverlay
from engram.patches.apply import apply_to_model, model_fingerprint, revert_from_model
from engram.patches.patchfile import TablePatch, make_keyed_patch, make_patch


def _tables(model: Any) -> dict[int, torch.nn.Parameter]:
    """The in-memory table weights {layer_id: [R, Dh]} of an editable model."""
    layers = list(getattr(model, "engram_layers", []) or [])
    if not layers:
        raise FactEditError("the model has no Engram layers; edit an engram-* run or a retrofit adapter")
    if any(e.table.location != TableLocation.MEMORY for e in layers):
        where = sorted({e.table.location.value for e in layers})
        raise FactEditError(f"the model's tables live in {where}; load them into memory to edit facts")
    return {e.layer_id: e.table.weight for e in layers}


def _check_value_path(model: Any) -> None:
    """A fresh retrofit adapter has a zero value projection: its tables cannot change the output."""
    for e in model.engram_layers:
        w = getattr(getattr(e, "value_proj", None), "weight", None)
        if w is not None and not bool(w.detach().abs().sum() > 0):
            raise FactEditError(
                f"Engram layer {e.layer_id}'s value projection is all zero (a freshly retrofitted adapter), so its "
                f"tables cannot change what the model says; first train the adapter on general text "
                f"(engram retrofit train --data DIR --steps 120 ...) and edit that")


def rows_read(model: Any, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """{layer_id: sorted unique global rows} that the sequences ``ids`` [B,T] read."""
    hash_ids = model.compute_hash_ids(ids)
    return {e.layer_id: e.multi_head_embedding.rows(hash_ids[e.layer_id]).reshape(-1).unique()
            for e in model.engram_layers}


def subject_rows(model: Any, cases: Sequence[Case], keyed: bool = False) -> list[dict[int, torch.Tensor]]:
    """Per case, {layer_id: the rows (``keyed``: the N-gram keys) read at its subject positions}
    (empty without a subject)."""
    out = []
    for c in cases:
        ids = torch.tensor([c.prompt_ids])
        hash_ids = model.compute_hash_ids(ids)
        pos = torch.tensor(c.subject_pos, dtype=torch.long)
        out.append({e.layer_id: (e.multi_head_embedding.keys if keyed else e.multi_head_embedding.rows)(
            hash_ids[e.layer_id])[0, pos].reshape(-1) for e in model.engram_layers})
    return out


def coverage(model: Any, cases: Sequence[Case], trained: dict[int, torch.Tensor], keyed: bool = False) -> dict[str, float]:
    """How many questions read, at their subject's positions, rows the edit trained (``keyed``:
    ``trained`` holds N-gram keys, and a position's key must be among them).

    ``questions_all``: fraction of questions whose every subject-position row was trained;
    ``questions_any``: with at least one; ``rows``: fraction of all subject-position rows."""
    full, anyc, hit, tot = 0, 0, 0, 0
    for per in subject_rows(model, cases, keyed):
        inside = torch.cat([torch.isin(r, trained[lid]) for lid, r in per.items()]) if per else torch.zeros(0)
        if inside.numel() == 0:
            continue
        full += bool(inside.all())
        anyc += bool(inside.any())
        hit += int(inside.sum())
        tot += inside.numel()
    n = max(1, len(cases))
    return {"questions_all": full / n, "questions_any": anyc / n, "rows": hit / max(1, tot)}


class _Rows:
    """The trained rows of one table: global ids [n], their unedited values and the delta [n, Dh]."""

    def __init__(self, weight: torch.nn.Parameter, rows: torch.Tensor) -> None:
        self.weight, self.rows = weight, rows
        self.base = weight.detach()[rows].clone()
        self.delta = torch.zeros_like(self.base, requires_grad=True)

    @torch.no_grad()
    def write(self, edited: bool) -> None:
        self.weight.data[self.rows] = self.base + self.delta if edited else self.base

    def take_grad(self) -> None:
        """The table's (sparse) gradient at the trained rows, into ``delta.grad``; other rows drop."""
        g = self.weight.grad
        self.weight.grad = None
        if g is None:
            return
        g = g.coalesce()
        idx, val = g.indices()[0], g.values()
        pos = torch.searchsorted(self.rows, idx).clamp_max(self.rows.numel() - 1)
        keep = self.rows[pos] == idx
        grad = torch.zeros_like(self.base)
        grad.index_add_(0, pos[keep], val[keep])
        self.delta.grad = grad


class _Keyed:
    """The trained entries of one keyed layer: N-gram keys [n], the rows they stand in for, their
    unedited values and the delta [n, Dh]; read through the call's ``patches=`` while training,
    installed on the layer (``write``) while the dev questions are scored."""

    def __init__(self, mhe: Any, weight: torch.nn.Parameter, keys: torch.Tensor, rows: torch.Tensor) -> None:
        self.mhe, self.keys, self.rows = mhe, keys, rows
        self.base = weight.detach()[rows].clone()
        self.delta = torch.zeros_like(self.base, requires_grad=True)
        self._before: Optional[list[Any]] = None

    def overlay(self) -> KeyedOverlay:
        return KeyedOverlay(self.keys, self.base + self.delta)

    @torch.no_grad()
    def write(self, edited: bool) -> None:
        if self._before is not None:
            self.mhe.set_installed(self._before)
            self._before = None
        if edited:
            self._before = list(self.mhe.installed)
            self.mhe.set_installed(self._before + [("fact-edit", KeyedOverlay(self.keys, self.base + self.delta))])

    def take_grad(self) -> None:
        """The delta's gradient came straight from autograd (the tables do not train)."""


def keys_to_train(model: Any, cases: Sequence[Case], which: str) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{layer_id: (sorted unique N-gram keys, the row of each)} read at the positions that
    :func:`rows_to_train` takes rows from (every real token, or the subject's and answer's)."""
    read: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {e.layer_id: [] for e in model.engram_layers}
    for c in cases:
        ids = torch.tensor([c.ids])
        hash_ids = model.compute_hash_ids(ids)
        if which == "subject" and c.subject_pos:
            start = len(c.prompt_ids)
            pos = torch.tensor(list(c.subject_pos) + list(range(start, start + len(c.answer_ids))), dtype=torch.long)
        else:
            pos = torch.arange(len(c.ids))
        for e in model.engram_layers:
            h = hash_ids[e.layer_id][0, pos]  # [P, H]
            read[e.layer_id].append((e.multi_head_embedding.keys(h).reshape(-1), e.multi_head_embedding.rows(h).reshape(-1)))
    out = {}
    for lid, parts in read.items():
        keys = torch.cat([k for k, _ in parts])
        rows = torch.cat([r for _, r in parts])
        keys, first = _unique_first(keys)
        out[lid] = (keys, rows[first])
    return out


def _neutral_kl(fwd: Callable[..., torch.Tensor], neutral: torch.Tensor, sel: torch.Tensor,
                neutral_top: Optional[tuple[torch.Tensor, torch.Tensor]], neutral_lp: Optional[torch.Tensor],
                reads: Optional[torch.Tensor], states: Optional[dict[int, torch.Tensor]] = None,
                first: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """Mean KL(unedited || edited) over every position of the neutral windows ``sel`` [m] (the
    unedited model as its cached top-k, or in full); with ``reads`` the windows that read no
    trained entry are not computed (their KL is 0, their positions still count). None when
    every window is skipped. ``states``: the windows' captured streams, passed to ``fwd``.
    ``first`` [n] (with the cached top-k): each window's first position that reads the edit
    (:func:`_first_reads`); the output head runs from there on only, as the positions before
    it compute as unedited (KL 0, no gradient; they still count in the mean)."""
    m = sel.numel()
    if reads is not None:
        sel = sel[reads[sel]]
    if first is not None:
        sel = sel[first[sel] < neutral.shape[1]]
    if not sel.numel():
        return None
    nb = neutral[sel]
    st = None if states is None else torch.stack([states[int(w)] for w in sel])
    if first is not None and neutral_top is not None:
        at = torch.arange(nb.shape[1])[None, :] >= first[sel][:, None]  # [m', L]
        rows = fwd(nb, st, at)  # [M, V]
        kl = _kl_topk_rows(rows, neutral_top[0][sel][at], neutral_top[1][sel][at]).sum()
        return kl / (m * nb.shape[1])
    logits = fwd(nb) if st is None else fwd(nb, st)
    everywhere = torch.ones(nb.shape, dtype=torch.bool)
    if neutral_top is not None:
        kl = _kl_topk(logits, everywhere, neutral_top[0][sel].flatten(0, 1), neutral_top[1][sel].flatten(0, 1))
    else:
        kl = _kl(logits, neutral_lp[sel], everywhere)
    return kl * (sel.numel() / m)  # windows are equally long: the mean over all m windows' positions


def _windows_reading(model: Any, windows: torch.Tensor, held: dict[int, Any]) -> torch.Tensor:
    """[n] bool: which of ``windows`` [n, L] read, at some position and head, a trained keyed entry."""
    return _first_reads(model, windows, held, keyed=True) < windows.shape[1]


@torch.no_grad()
def _first_reads(model: Any, ids: torch.Tensor, held: dict[int, Any], keyed: bool,
                 chunk: int = 512) -> torch.Tensor:
    """[N] the first position of each row of ``ids`` [N,T] that reads, at some head, a trained
    keyed entry (``keyed``) or a trained row; T where none does. A position sees only itself and
    earlier ones, so every position before that computes exactly as in the unedited model."""
    N, T = ids.shape
    out = torch.full((N,), T, dtype=torch.long)
    for s in range(0, N, chunk):
        part = ids[s:s + chunk]
        hash_ids = model.compute_hash_ids(part)
        hit = torch.zeros(part.shape, dtype=torch.bool)
        for e in model.engram_layers:
            if e.layer_id in held:
                h, mhe = hash_ids[e.layer_id], e.multi_head_embedding
                read, trained = (mhe.keys(h), held[e.layer_id].keys) if keyed else (mhe.rows(h), held[e.layer_id].rows)
                hit |= torch.isin(read, trained).any(-1)
        out[s:s + chunk] = torch.where(hit.any(1), hit.long().argmax(1), torch.tensor(T))
    return out


@torch.no_grad()
def _capture(model: Any, cases: Sequence[Case], pad_id: int, layer: int,
             batch_size: int = 32) -> Optional[list[torch.Tensor]]:
    """Each case's stream entering decoder ``layer`` [len, D], in float32 as dev questions are
    scored (the output head runs on no position); None when the model could not capture it."""
    out: list[torch.Tensor] = [torch.empty(0)] * len(cases)
    order = sorted(range(len(cases)), key=lambda i: len(cases[i].ids))
    was = model.training
    model.eval()
    try:
        with model.capturing_input_of(layer) as got:
            for s in range(0, len(order), batch_size):
                idx = order[s:s + batch_size]
                ids, _ = pad_batch([cases[i] for i in idx], pad_id)
                got.clear()
                model(ids, logits_at=torch.zeros(ids.shape, dtype=torch.bool))
                if len(got) != 1 or got[0] is None:
                    return None
                for j, i in enumerate(idx):
                    out[i] = got[0][j, :len(cases[i].ids)].clone()
    finally:
        model.train(was)
    return out


def _prefix_layer(model: Any) -> Optional[int]:
    """The decoder layer a step can start at (the first Engram layer, when the model can capture
    and stand in for the frozen layers below it: ``RetrofitLM``), else None."""
    if not (hasattr(model, "starting_at") and hasattr(model, "first_engram_layer")):
        return None
    first = model.first_engram_layer()
    return first if first and first >= 1 else None


class _Bf16Weights:
    """bfloat16 copies of the model's frozen float32 ``nn.Linear`` weights and biases, swapped in
    inside :meth:`active`. bfloat16 autocast casts a float32 weight again at every call (it keeps
    the casts only of weights that train), about a tenth of a step here; a copy holds the values
    that cast gives, so a step's results are the same bit for bit. ``training``: ids of the
    parameters that train (LoRA's, a control's layer weights), left as they are."""

    def __init__(self, model: Any, training: set[int]) -> None:
        self.swaps: list[tuple[nn.Module, str, torch.Tensor, nn.Parameter]] = []
        for m in model.modules():
            if type(m) is not nn.Linear or m.weight.dtype != torch.float32:
                continue
            held = [(n, p) for n, p in (("weight", m.weight), ("bias", m.bias)) if p is not None]
            if any(id(p) in training for _, p in held):
                continue
            for n, p in held:
                self.swaps.append((m, n, p, nn.Parameter(p.detach().to(torch.bfloat16), requires_grad=False)))

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        for m, n, _, b in self.swaps:
            setattr(m, n, b)
        try:
            yield
        finally:
            for m, n, p, _ in self.swaps:
                setattr(m, n, p)


@contextlib.contextmanager
def _autocast(cfg: FactEditConfig, weights: Optional[_Bf16Weights] = None) -> Iterator[None]:
    """The training forwards' precision: bfloat16 autocast with ``autocast="bf16"`` (reading the
    frozen weights' bfloat16 ``weights`` when given), else a no-op. torch warns once per norm
    that float32 weights meet bfloat16 inputs: expected here, so muted."""
    on = cfg.autocast == "bf16"
    with warnings.catch_warnings(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=on), \
            (weights.active() if on and weights is not None else contextlib.nullcontext()):
        warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight")
        yield


def _unique_first(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted unique values of ``x`` [n] and the index of one occurrence of each."""
    u, inv = torch.unique(x, return_inverse=True)
    idx = torch.full((u.numel(),), x.numel(), dtype=torch.long)
    idx.scatter_reduce_(0, inv, torch.arange(x.numel()), reduce="amin")
    return u, idx


def _kl(edited_logits: torch.Tensor, base_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over ``mask`` positions of KL(base || edited); logits [B,T,V], mask [B,T]."""
    if not bool(mask.any()):
        return edited_logits.sum() * 0
    lp = F.log_softmax(edited_logits[mask].float(), -1)
    bp = base_logp[mask]
    return (bp.exp() * (bp - lp)).sum(-1).mean()


def _kl_topk(edited_logits: torch.Tensor, mask: torch.Tensor, top_ids: torch.Tensor,
             top_logp: torch.Tensor) -> torch.Tensor:
    """Mean over ``mask`` positions of KL(base || edited) between the distributions coarsened to
    the base's top-k tokens plus one bucket for the rest (a lower bound of the full KL, equal to it
    when the rest is empty); ``top_ids`` / ``top_logp`` [M, k] for the M masked positions in order."""
    if not bool(mask.any()):
        return edited_logits.sum() * 0
    return _kl_topk_rows(edited_logits[mask], top_ids, top_logp).mean()


def _kl_topk_rows(edited_logits: torch.Tensor, top_ids: torch.Tensor, top_logp: torch.Tensor) -> torch.Tensor:
    """:func:`_kl_topk` per position: edited logits [M,V], the base's ``top_ids`` / ``top_logp``
    [M,k] -> KL [M]."""
    lq = F.log_softmax(edited_logits.float(), -1)
    q_k = lq.gather(-1, top_ids)
    p_k = top_logp.exp()
    p_rest = (1 - p_k.sum(-1)).clamp_min(1e-12)
    q_rest = (1 - q_k.exp().sum(-1)).clamp_min(1e-12)
    return (p_k * (top_logp - q_k)).sum(-1) + p_rest * (p_rest.log() - q_rest.log())


def _other_mask(batch: Sequence[Case], ids: torch.Tensor, ans: torch.Tensor) -> torch.Tensor:
    """[B,T] positions that have a next token of the sentence and do not predict the answer."""
    lengths = torch.tensor([len(c.ids) for c in batch])
    real = torch.arange(ids.shape[1])[None, :] < (lengths[:, None] - 1)
    return real & ~ans


def epoch_batches(lengths: Sequence[int], batch_size: int, gen: np.random.Generator) -> list[list[int]]:
    """One pass over the sentences in batches: shuffled, then sorted by length within windows of
    eight batches so that a batch pads little (padding is most of the compute otherwise); the
    batches' order is shuffled again."""
    order = gen.permutation(len(lengths))
    window = 8 * batch_size
    batches = []
    for s in range(0, len(order), window):
        chunk = sorted(order[s:s + window].tolist(), key=lambda i: lengths[i])
        batches += [chunk[b:b + batch_size] for b in range(0, len(chunk), batch_size)]
    return [batches[i] for i in gen.permutation(len(batches))]


def _logprobs_capturing(model: Any, ids: torch.Tensor, batch_size: int, start: Optional[int],
                        at: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``logprobs(model, ids)`` [B,T,V], or with ``at`` [B,T] the float32 log-probs [M,V] at those
    positions only (the output head runs there alone); with ``start`` also the stream entering
    decoder layer ``start`` [B,T,D] captured on the way (None without ``start``, or when the
    model could not capture it)."""
    def run() -> torch.Tensor:
        if at is None:
            return logprobs(model, ids, batch_size)
        was = model.training
        model.eval()
        try:
            return F.log_softmax(logits_at(model, ids, at).float(), -1)
        finally:
            model.train(was)

    if start is None:
        return run(), None
    with model.capturing_input_of(start) as got:
        lp = run()
    return lp, (torch.cat(got) if got and all(g is not None for g in got) else None)


@torch.no_grad()
def base_topk(model: Any, cases: Sequence[Case], pad_id: int, k: int, batch_size: int = 32,
              states: Optional[list[Optional[torch.Tensor]]] = None,
              start: int = 0, first: Optional[torch.Tensor] = None,
              progress: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per case, the unedited model's top-``k`` next tokens and their log-probs at the case's
    other (non-answer) positions: ([m, k] int64, [m, k] float32). With ``states`` (a list, filled
    in case order) and ``start``, also each case's stream entering decoder layer ``start``
    [len, D], captured on the way (see :func:`_prefix_layer`). ``first`` [n]: only the other
    positions from each case's ``first[i]`` on (the output head runs there alone)."""
    out: list[tuple[torch.Tensor, torch.Tensor]] = [(torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k))] * len(cases)
    if states is not None:
        states[:] = [None] * len(cases)
    order = sorted(range(len(cases)), key=lambda i: len(cases[i].ids))
    for s in tqdm(range(0, len(order), batch_size), desc="unedited model on the sentences", unit="batch",
                  disable=not progress, leave=False, dynamic_ncols=True):
        idx = order[s:s + batch_size]
        batch = [cases[i] for i in idx]
        ids, ans = pad_batch(batch, pad_id)
        other = _other_mask(batch, ids, ans)
        if first is not None:
            at = other & (torch.arange(ids.shape[1])[None, :] >= first[idx][:, None])
            lp, h = _logprobs_capturing(model, ids, batch_size, start if states is not None else None, at)
            top = lp.topk(min(k, lp.shape[-1]), -1)
            parts = zip(top.indices.split(at.sum(1).tolist()), top.values.split(at.sum(1).tolist()))
            for j, (i, (ti, tv)) in enumerate(zip(idx, parts)):
                out[i] = (ti.clone(), tv.clone())
                if h is not None:
                    states[i] = h[j, :len(cases[i].ids)].clone()
            continue
        lp, h = _logprobs_capturing(model, ids, batch_size, start if states is not None else None)
        top = lp.topk(min(k, lp.shape[-1]), -1)
        for j, i in enumerate(idx):
            out[i] = (top.indices[j][other[j]].clone(), top.values[j][other[j]].clone())
            if h is not None:
                states[i] = h[j, :len(cases[i].ids)].clone()
    return out


@torch.no_grad()
def windows_topk(model: Any, windows: torch.Tensor, k: int, batch_size: int = 8,
                 only: Optional[torch.Tensor] = None, states: Optional[dict[int, torch.Tensor]] = None,
                 start: int = 0, first: Optional[torch.Tensor] = None,
                 progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The unedited model's top-``k`` next tokens and their log-probs at every position of
    ``windows`` [n, L]: ([n, L, k] int64, [n, L, k] float32); a batch at a time, so the full
    [n, L, V] log-probs are never held. ``only`` [n] bool: compute those windows alone (the
    others' entries are left 0: the caller never reads them). With ``states`` (a dict, filled)
    and ``start``: each computed window's stream entering decoder layer ``start`` [L, D].
    ``first`` [n]: only the positions from each window's ``first[w]`` on (the others are left 0)."""
    n, L = windows.shape
    sel = torch.arange(n) if only is None else only.nonzero().flatten()
    ids = lps = None
    for s in tqdm(range(0, len(sel), batch_size), desc="unedited model on neutral text", unit="batch",
                  disable=not progress, leave=False, dynamic_ncols=True):
        part = sel[s:s + batch_size]
        at = None if first is None else torch.arange(L)[None, :] >= first[part][:, None]  # [b, L]
        lp, h = _logprobs_capturing(model, windows[part], batch_size, start if states is not None else None, at)
        if h is not None:
            states.update({int(w): h[j].clone() for j, w in enumerate(part)})
        top = lp.topk(min(k, lp.shape[-1]), -1)
        if ids is None:
            ids = torch.zeros(n, L, top.indices.shape[-1], dtype=torch.long)
            lps = torch.zeros(n, L, top.indices.shape[-1])
        if at is None:
            ids[part], lps[part] = top.indices, top.values
        else:
            got_i, got_v = ids[part], lps[part]
            got_i[at], got_v[at] = top.indices, top.values
            ids[part], lps[part] = got_i, got_v
    if ids is None:  # no window to compute
        return torch.zeros(n, L, k, dtype=torch.long), torch.zeros(n, L, k)
    return ids, lps


def rows_to_train(model: Any, cases: Sequence[Case], which: str) -> dict[int, torch.Tensor]:
    """{layer_id: sorted unique rows} the edit trains: every row the sentences' real tokens read
    (``all``), or only those read at the subject's and the answer's own positions (``subject``:
    the subject's N-grams, and the answer's, which continue the answer in any phrasing; a sentence
    without a marked subject gives all its rows)."""
    read: dict[int, list[torch.Tensor]] = {e.layer_id: [] for e in model.engram_layers}
    for c in cases:
        ids = torch.tensor([c.ids])
        if which == "subject" and c.subject_pos:
            hash_ids = model.compute_hash_ids(ids)
            start = len(c.prompt_ids)
            pos = torch.tensor(list(c.subject_pos) + list(range(start, start + len(c.answer_ids))), dtype=torch.long)
            for e in model.engram_layers:
                read[e.layer_id].append(e.multi_head_embedding.rows(hash_ids[e.layer_id])[0, pos].reshape(-1))
        else:
            for lid, r in rows_read(model, ids).items():
                read[lid].append(r)
    return {lid: torch.cat(r).unique() for lid, r in read.items()}


@dataclass
class EditResult:
    patch: Optional[TablePatch]  # None when only extra weights trained (train_tables=False)
    report: dict[str, Any]
    # With ``layer_lr`` > 0 (the control), or ``extra`` weights (e.g. LoRA): those weights at the
    # best dev step, {parameter name: tensor}; the model keeps its own until these are loaded.
    layer_state: Optional[dict[str, torch.Tensor]] = None


def layer_parameters(model: Any) -> dict[str, torch.nn.Parameter]:
    """The Engram layers' non-table parameters, by name (gates, projections, norms, conv)."""
    tables = {id(w) for w in _tables(model).values()}
    return {f"{e.layer_id}.{n}": p for e in model.engram_layers for n, p in e.named_parameters()
            if id(p) not in tables}


def edit_facts(model: Any, tokenizer: Any, train_cases: Sequence[Case], cfg: FactEditConfig, *,
               dev_cases: Sequence[Case] = (), pad_id: int = 0, name: str = "facts", dtype: str = "fp32",
               parent: Optional[str] = None,
               provenance: Optional[dict[str, Any]] = None, progress: bool = True,
               on_eval: Optional[Callable[[int, dict[str, Any]], None]] = None,
               extra: Optional[dict[str, torch.nn.Parameter]] = None, extra_lr: float = 0.0,
               train_tables: bool = True, skip_unread_neutral: bool = True, skip_prefix: bool = True,
               bf16_copies: bool = True, skip_unaffected: bool = True) -> EditResult:
    """Train the rows ``train_cases`` read (see the module docstring) and return the patch.

    ``dev_cases`` (held-out questions) drive the stopping; without them training runs ``steps``.
    The model's tables are restored before returning: apply the patch to use the edit.

    ``extra`` weights (e.g. LoRA's, for a baseline with the same data and loss) train too, at
    ``extra_lr``; ``train_tables=False`` trains them alone (the patch is then empty). They are
    put back as they were before returning; ``EditResult.layer_state`` holds their best values.

    ``skip_unread_neutral=False`` computes every neutral window of a keyed edit, also those that
    read no trained entry (the slow reference of the skip; the result is the same).
    ``skip_prefix=False`` computes every decoder layer at every step, also those below the first
    Engram layer, whose output never changes (the slow reference; the result is the same up to
    rounding).
    ``bf16_copies=False`` lets bfloat16 autocast cast the frozen weights at every forward (the
    slow reference of the copies of :class:`_Bf16Weights`; the result is the same).
    ``skip_unaffected=False`` runs the output head at every position, also before a row's first
    position that reads the edit, where the model computes as unedited (the slow reference of
    that skip, with the cached top-k; the result is the same up to rounding).
    """
    if extra is not None and not (extra and extra_lr > 0 and cfg.kl_topk > 0 and cfg.layer_lr == 0):
        raise FactEditError("extra weights need a non-empty set, extra_lr > 0, kl_topk > 0 (the unedited model "
                            "is kept as its cached top-k) and layer_lr = 0")
    limit = getattr(getattr(model, "cfg", None), "max_seq_len", None)
    if limit:  # a sentence longer than the model's positions cannot be trained on; say how many
        n_all = len(train_cases)
        train_cases = [c for c in train_cases if len(c.ids) <= limit]
        dev_cases = [c for c in dev_cases if len(c.ids) <= limit]
        too_long = n_all - len(train_cases)
    else:
        too_long = 0
    dev_all = len(dev_cases)
    # a fixed sample, from its own generator (the batches' order must not depend on it)
    dev_cases = fixed_sample(dev_cases, cfg.dev_questions, cfg.seed, stream=1)
    if not train_cases:
        raise FactEditError("no training sentences: every fact's forms failed to tokenise, none were given, or "
                            f"all are longer than the model's {limit} positions")
    if train_tables:
        _check_value_path(model)
    tables = _tables(model) if train_tables else {}
    torch.manual_seed(cfg.seed)
    gen = np.random.default_rng(cfg.seed)
    keyed = train_tables and cfg.keyed
    mhes = {e.layer_id: e.multi_head_embedding for e in model.engram_layers}
    if keyed:
        held: dict[int, Any] = {lid: _Keyed(mhes[lid], tables[lid], k, r)
                                for lid, (k, r) in keys_to_train(model, train_cases, cfg.rows).items()}
    else:
        held = ({lid: _Rows(tables[lid], r) for lid, r in rows_to_train(model, train_cases, cfg.rows).items()}
                if train_tables else {})

    def fwd(x: torch.Tensor, states: Optional[torch.Tensor] = None, at: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The edited model's logits [B,T,V] (keyed: entries read per call), or [M,V] at the
        positions of ``at`` [B,T]; with ``states`` [B,T,D] the layers below ``start`` are not
        computed (see :func:`_prefix_layer`)."""
        kw = {} if at is None else {"logits_at": at}
        with model.starting_at(start, states) if states is not None else contextlib.nullcontext():
            if keyed:
                return model(x, patches=[{lid: h.overlay() for lid, h in held.items()}], **kw).logits
            return model(x, **kw).logits

    fingerprint = model_fingerprint(model) if train_tables else None
    base_tables = {lid: w.detach().clone() for lid, w in tables.items()}

    neutral = neutral_windows(tokenizer, "train", cfg.neutral_windows, cfg.neutral_len)
    neutral_lp = neutral_top = None
    # The decoder layers below the first Engram layer are frozen and read no table: their output
    # is captured once, with the unedited model's distributions, and each step starts above them.
    start = (_prefix_layer(model) if skip_prefix and train_tables and extra is None and cfg.layer_lr == 0
             and cfg.kl_weight > 0 and cfg.kl_topk else None)
    sent_states: Optional[list[Optional[torch.Tensor]]] = [] if start else None
    win_states: Optional[dict[int, torch.Tensor]] = {} if start else None
    layer = dict(extra) if extra is not None else layer_parameters(model) if cfg.layer_lr > 0 else {}
    if cfg.autocast == "bf16":
        warn_if_cpu_bf16_is_slow("--edit-autocast bf16")
    bf16 = (_Bf16Weights(model, {id(p) for p in layer.values()}) if cfg.autocast == "bf16" and bf16_copies
            else None)
    # Before a sentence's (or window's) first position that reads a trained entry or row, the
    # model computes as unedited: no KL, no gradient. The output head (and the KL) runs from
    # there on only, and the unedited model's top-k is cached for those positions alone; the
    # batch's count of other positions stays the mean's denominator. Only while the tables alone
    # train (extra or layer weights change every position), with the cached top-k.
    first = first_win = None
    if skip_unaffected and train_tables and not layer and held and cfg.kl_topk:
        if cfg.kl_weight > 0:
            first = _first_reads(model, pad_batch(train_cases, pad_id)[0], held, keyed)
        if cfg.neutral_kl_weight > 0:
            first_win = _first_reads(model, neutral, held, keyed)
    # Keyed entries are read only where their own N-gram recurs: a neutral window none of whose
    # positions reads one is computed exactly as by the unedited model, so its KL is 0 and its
    # forward is skipped (the mean still counts its positions), and so is its cached top-k.
    # ``reads`` [n] bool, or None (from the first reads when they are known).
    reads = None
    if keyed and cfg.neutral_kl_weight > 0 and skip_unread_neutral:
        reads = _windows_reading(model, neutral, held) if first_win is None else first_win < neutral.shape[1]
    # the neutral windows whose top-k is needed: those that read the edit somewhere (all without a skip)
    win_only = reads if first_win is None else first_win < neutral.shape[1]
    # The unedited model's distributions are computed at the training forwards' precision, so
    # that rounding alone gives a KL of exactly 0 (dev questions are scored in float32).
    with _autocast(cfg, bf16):
        if cfg.neutral_kl_weight > 0:
            if cfg.kl_topk:
                neutral_top = windows_topk(model, neutral, cfg.kl_topk, only=win_only, states=win_states,
                                           start=start or 0, first=first_win, progress=progress)
            else:  # the reference: the full distribution
                neutral_lp = logprobs(model, neutral)
        # The unedited model's answers on the sentences never change: computed once, kept as top-k.
        cached = (base_topk(model, train_cases, pad_id, cfg.kl_topk, states=sent_states, start=start or 0,
                            first=first, progress=progress)
                  if cfg.kl_weight > 0 and cfg.kl_topk else None)
    if start:
        need = ([] if neutral_top is None else range(len(neutral)) if win_only is None
                else win_only.nonzero().flatten().tolist())
        if any(h is None for h in sent_states) or any(int(w) not in win_states for w in need):
            start = None  # a layer returned no plain tensor: every step computes every layer
    # Dev questions are scored from the same layer on, from their streams captured once.
    dev_prefix = None
    if start and dev_cases:
        captured = _capture(model, dev_cases, pad_id, start)
        dev_prefix = (start, captured) if captured is not None else None
    opt = torch.optim.Adam([h.delta for h in held.values()], lr=cfg.lr, betas=(0.9, 0.98)) if held else None
    layer_before = {n: p.detach().clone() for n, p in layer.items()}
    layer_opt = torch.optim.Adam(list(layer.values()), lr=extra_lr if extra is not None else cfg.layer_lr) if layer else None

    saved = {id(p): p.requires_grad for p in model.parameters()}
    # A gradient left on a parameter by earlier use of the model would be added to the edit's
    # first step (and a dense one to the tables' sparse gradient): held aside, put back after.
    params = {id(p): p for p in [*model.parameters(), *layer.values()]}
    grads = {k: p.grad for k, p in params.items()}
    sparse = {e.layer_id: e.table.sparse for e in model.engram_layers}
    for p in params.values():
        p.grad = None
    for p in model.parameters():
        p.requires_grad_(False)
    for e in model.engram_layers:
        e.table.sparse = True
        e.table.weight.requires_grad_(train_tables and not keyed)
    for p in layer.values():
        p.requires_grad_(True)
    was = model.training
    model.eval()
    def snapshot(dev_exact: Optional[float], dev_nll: float = float("inf")) -> dict[str, Any]:
        return {"dev_exact": dev_exact, "dev_nll": dev_nll, "step": step, "delta": {lid: h.delta.detach().clone() for lid, h in held.items()},
                "layer": {n: p.detach().clone() for n, p in layer.items()}}

    step = 0
    best = snapshot(-1.0)
    history: list[dict[str, Any]] = []
    losses: list[float] = []
    batches: list[list[int]] = []
    lengths = [len(c.ids) for c in train_cases]
    bad_evals = 0
    stopped = "steps"  # why training ended: steps, patience, all dev questions exact, or time
    t0 = time.perf_counter()
    try:
        bar = tqdm(range(1, cfg.steps + 1), desc="fact edit", disable=not progress, dynamic_ncols=True)
        for step in bar:
            if not batches:
                batches = epoch_batches(lengths, cfg.batch_size, gen)
            chosen = batches.pop()
            batch = [train_cases[i] for i in chosen]
            ids, ans = pad_batch(batch, pad_id)
            other = _other_mask(batch, ids, ans)
            base_lp = None
            if cfg.kl_weight > 0 and cached is None:  # the reference: the unedited model in full, each step
                for h in held.values():
                    h.write(edited=False)
                with _autocast(cfg, bf16):
                    base_lp = logprobs(model, ids)
            if not keyed:
                for h in held.values():
                    h.write(edited=True)
            batch_states = None
            if start:  # the batch's captured streams, padded like the ids
                batch_states = pad_states(sent_states, chosen, ids, torch.float32)
            # The phases are labelled for torch.profiler (benchmarks/fact_edit_profile.py).
            with _autocast(cfg, bf16), record_function("fact_edit.forward"):
                tgt = torch.roll(ids, -1, dims=1)
                if first is not None:  # the output head where the edit can act: answers, and others from the first read on
                    kl_at = other & (torch.arange(ids.shape[1])[None, :] >= first[chosen][:, None])
                    need = ans | kl_at
                    rows = fwd(ids, batch_states, need)  # [M,V]
                    loss = F.cross_entropy(rows[ans[need]].float(), tgt[ans])
                    top_ids = torch.cat([cached[i][0] for i in chosen])
                    top_lp = torch.cat([cached[i][1] for i in chosen])
                    kl = _kl_topk_rows(rows[kl_at[need]], top_ids, top_lp).sum() / max(1, int(other.sum()))
                    total = loss + cfg.kl_weight * kl
                else:
                    logits = fwd(ids, batch_states)
                    loss = F.cross_entropy(logits[ans].float(), tgt[ans])
                    total = loss
                    if base_lp is not None:
                        total = total + cfg.kl_weight * _kl(logits, base_lp, other)
                    elif cached is not None:
                        top_ids = torch.cat([cached[i][0] for i in chosen])
                        top_lp = torch.cat([cached[i][1] for i in chosen])
                        total = total + cfg.kl_weight * _kl_topk(logits, other, top_ids, top_lp)
                if cfg.neutral_kl_weight > 0:
                    k = (2 * step) % len(neutral)
                    with record_function("fact_edit.neutral_forward"):
                        kl_n = _neutral_kl(fwd, neutral, torch.arange(k, min(k + 2, len(neutral))), neutral_top,
                                           neutral_lp, reads, win_states if start else None, first_win)
                    if kl_n is not None:
                        total = total + cfg.neutral_kl_weight * kl_n
            if not torch.isfinite(total):
                raise FactEditError(f"the edit's loss is {float(total)} at step {step}; lower lr (now {cfg.lr})")
            with record_function("fact_edit.backward"):
                total.backward()
            with record_function("fact_edit.update"):
                for h in held.values():
                    h.take_grad()
                if opt is not None:
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                if layer_opt is not None:
                    layer_opt.step()
                    layer_opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            bar.set_postfix(answer_loss=f"{losses[-1]:.3f}")
            out_of_time = cfg.max_seconds > 0 and time.perf_counter() - t0 >= cfg.max_seconds
            if out_of_time:
                stopped = "time"
            if dev_cases and (step % cfg.eval_every == 0 or step == cfg.steps or out_of_time):
                for h in held.values():
                    h.write(edited=True)
                with record_function("fact_edit.dev_eval"):
                    dev = score(model, dev_cases, pad_id, prefix=dev_prefix)
                if keyed:
                    for h in held.values():
                        h.write(edited=False)
                rec = {"step": step, "dev_exact": dev["exact"], "dev_top1": dev["top1"], "dev_nll": dev["answer_nll"],
                       "answer_loss": float(np.mean(losses[-cfg.eval_every:])), "seconds": time.perf_counter() - t0}
                history.append(rec)
                if on_eval is not None:
                    on_eval(step, rec)
                # A gain: more exact answers, or as many with likelier answers (while no answer is
                # exact yet the likelihood is what moves; stopping on exact alone stops at the start).
                if (dev["exact"], -dev["answer_nll"]) > (best["dev_exact"], -best["dev_nll"]):
                    best = snapshot(dev["exact"], dev["answer_nll"])
                    bad_evals = 0
                else:
                    bad_evals += 1
                if dev["exact"] >= 1.0:
                    stopped = "all dev questions exact"
                elif bad_evals >= cfg.patience:
                    stopped = "patience"
                if stopped != "steps":
                    break
            if out_of_time:
                break
        if not dev_cases:
            best = snapshot(None)
    finally:
        train_s = time.perf_counter() - t0
        for h in held.values():
            h.write(edited=False)
        with torch.no_grad():
            for n, p in layer.items():
                p.copy_(layer_before[n])
        for p in model.parameters():
            p.requires_grad_(saved[id(p)])
        for k, p in params.items():
            p.grad = grads[k]
        for e in model.engram_layers:
            e.table.sparse = sparse[e.layer_id]
        model.train(was)
    patch = None
    meta = dict(hash_fingerprint=model.hasher.fingerprint(), hasher=model.hasher.describe(), dtype=dtype,
                parent=parent, name=name, provenance={"trainer": "fact-edit", "config": asdict(cfg), **(provenance or {})})
    if keyed:
        patch = make_keyed_patch(base_tables, {lid: (h.keys, h.rows, h.base + best["delta"][lid])
                                               for lid, h in held.items()}, **meta)
    elif train_tables:
        new = dict(base_tables)  # a layer without trained rows stays as it is
        for lid, h in held.items():
            t = base_tables[lid].clone()
            t[h.rows] = h.base + best["delta"][lid]
            new[lid] = t
        patch = make_patch(base_tables, new, **meta)
    report = {"config": asdict(cfg), "train_sentences": len(train_cases), "too_long_sentences": too_long,
              "trained_rows": {lid: int(h.rows.numel()) for lid, h in held.items()},
              "neutral_windows_reading_edit": None if reads is None else int(reads.sum()),
              "dev_questions_scored": len(dev_cases), "dev_questions_given": dev_all,
              "steps_run": step, "stopped": stopped, "best_step": best["step"], "best_dev_exact": best["dev_exact"],
              "train_seconds": train_s, "history": history,
              "answer_loss_first": losses[0] if losses else None,
              "answer_loss_last": float(np.mean(losses[-10:])) if losses else None,
              "tables_fingerprint_before": fingerprint, "patch_id": patch.meta.get("patch_id") if patch else None,
              "patch_rows": sum(int(lp.rows.numel()) for lp in patch.layers.values()) if patch else 0}
    return EditResult(patch, report, best["layer"] if layer else None)


def trained_rows(patch: TablePatch) -> dict[int, torch.Tensor]:
    """{layer_id: sorted rows a patch writes (a keyed patch: its N-gram keys)}, for :func:`coverage`."""
    return {lid: torch.as_tensor(lp.rows if lp.keys is None else lp.keys).long().sort().values
            for lid, lp in patch.layers.items()}


def teach(model: Any, tokenizer: Any, facts: Sequence[Any], marked: Sequence[Any], cfg: FactEditConfig, *,
          pad_id: int, name: str = "facts", dtype: str = "fp32", parent: Optional[str] = None,
          provenance: Optional[dict[str, Any]] = None, progress: bool = True) -> EditResult:
    """``engram patch train --facts``: the training forms of ``facts`` (triples) and the ``marked``
    sentences, stopping on the triples' dev questions; the report adds the coverage of the
    held-out (test) questions' subject rows and their score with the edit applied."""
    chat = chat_format(tokenizer)
    train = fact_cases(tokenizer, facts, lambda f: templates(f.relation, "train", cfg.kinds), chat, True)
    train += marked_cases(tokenizer, marked)
    dev = fact_cases(tokenizer, facts, lambda f: templates(f.relation, "dev"), chat)
    test = fact_cases(tokenizer, facts, lambda f: templates(f.relation, "test"), chat)
    res = edit_facts(model, tokenizer, train, cfg, dev_cases=dev, pad_id=pad_id, name=name, dtype=dtype,
                     parent=parent, provenance=provenance, progress=progress)
    if test:
        res.report["coverage_test"] = coverage(model, test, trained_rows(res.patch), keyed=res.patch.keyed)
        apply_to_model(model, res.patch)
        res.report["test_exact"] = score(model, test, pad_id)["exact"]
        revert_from_model(model, res.patch)
    return res
