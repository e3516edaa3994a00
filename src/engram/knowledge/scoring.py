"""Tokenised questions and what a model answers to them.

Shape legend
    N cases   T tokens of the longest case (right-padded)   V vocabulary

A :class:`Case` is a prompt and its answer in token ids, with the prompt positions that belong to
the subject. ``exact`` means every answer token is the model's top-1 prediction given the gold
prefix; that is the same as greedy decoding writing the whole answer (each greedy step then sees
the gold prefix), at the cost of one forward. ``first_rank`` is the gold first token's rank (1 =
top-1). Neutral text is English the edits never train on: the first half of the Python reference
topics that ship with CPython (``pydoc_data.topics``) feeds the trainer's KL, the second half is
only ever used to measure.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from engram.errors import EngramError
from engram.knowledge.facts import Fact, MarkedSentence
from engram.knowledge.templates import ChatFormat, Template


@dataclass(frozen=True)
class Case:
    """``prompt_ids`` + ``answer_ids`` (+ ``tail_ids`` when training); ``subject_pos``: prompt
    positions whose token overlaps the subject's characters."""

    prompt_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]
    tail_ids: tuple[int, ...] = ()
    subject_pos: tuple[int, ...] = ()
    fact: int = -1  # index of the fact it asks (-1 for a free sentence)
    kind: str = ""

    @property
    def ids(self) -> tuple[int, ...]:
        return self.prompt_ids + self.answer_ids + self.tail_ids


def _join(prompt: str, answer: str) -> str:
    return prompt + answer if prompt.endswith("\n") else prompt + " " + answer


def encode_case(tokenizer: Any, prompt: str, answer: str, tail: str = "", subject: Optional[str] = None,
                fact: int = -1, kind: str = "") -> Optional[Case]:
    """The tokenised case, or None when the answer does not start on a token boundary."""
    p = tokenizer.encode(prompt, add_special_tokens=False)
    full_text = _join(prompt, answer)
    full = tokenizer.encode(full_text, add_special_tokens=False).ids
    whole = tokenizer.encode(full_text + tail, add_special_tokens=False).ids if tail else full
    n = len(p.ids)
    if full[:n] != p.ids or len(full) == n or whole[:len(full)] != full:
        return None
    pos: tuple[int, ...] = ()
    if subject:
        spans, start = [], prompt.find(subject)
        while start >= 0:
            spans.append((start, start + len(subject)))
            start = prompt.find(subject, start + 1)
        pos = tuple(i for i, (a, b) in enumerate(p.offsets) if any(a < e and b > s for s, e in spans))
    return Case(tuple(p.ids), tuple(full[n:]), tuple(whole[len(full):]), pos, fact, kind)


def fact_cases(tokenizer: Any, facts: Sequence[Fact], forms: Callable[[Fact], Sequence[Template]],
               chat: ChatFormat, with_tail: bool = False, answer_of: Optional[Callable[[Fact], str]] = None
               ) -> list[Case]:
    """Every (fact, form) case that tokenises cleanly; ``answer_of`` overrides the answer asked."""
    out = []
    for i, f in enumerate(facts):
        for t in forms(f):
            prompt, answer, tail = t.render(f.subject, answer_of(f) if answer_of else f.answer, chat)
            c = encode_case(tokenizer, prompt, answer, tail if with_tail else "", f.subject, i, t.kind)
            if c is not None:
                out.append(c)
    return out


def marked_cases(tokenizer: Any, sentences: Sequence[MarkedSentence]) -> list[Case]:
    out = []
    for s in sentences:
        c = encode_case(tokenizer, s.prompt, s.answer, s.tail, s.subject, -1, "marked")
        if c is not None:
            out.append(c)
    return out


def pad_batch(cases: Sequence[Case], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [N,T] and the answer mask [N,T] (True where a position predicts an answer
    token, i.e. at the position before it). Right padding never changes a causal model's earlier
    positions, Engram's hashing included (an N-gram only reads tokens before it)."""
    T = max(len(c.ids) for c in cases)
    ids = torch.full((len(cases), T), pad_id, dtype=torch.long)
    ans = torch.zeros(len(cases), T, dtype=torch.bool)
    for i, c in enumerate(cases):
        ids[i, :len(c.ids)] = torch.tensor(c.ids)
        a = len(c.prompt_ids)
        ans[i, a - 1:a - 1 + len(c.answer_ids)] = True
    return ids, ans


def fixed_sample(cases: Sequence[Case], k: int, seed: int, stream: int) -> list[Case]:
    """At most ``k`` of ``cases`` (all of them when ``k`` is 0 or not below their count): a fixed
    sample from its own generator (``seed``, ``stream``), so drawing it moves no other random
    state, kept in the given order."""
    if not 0 < k < len(cases):
        return list(cases)
    pick = np.sort(np.random.default_rng([seed, stream]).choice(len(cases), k, replace=False))
    return [cases[i] for i in pick]


def pad_states(states: Sequence[torch.Tensor], idx: Sequence[int], ids: torch.Tensor,
               dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The captured streams [len,D] of cases ``idx``, right-padded like their ``ids`` [B,T] into
    [B,T,D] (zeros at the padding, which is never scored); in ``dtype``, else the streams' own."""
    out = torch.zeros(*ids.shape, states[idx[0]].shape[-1], dtype=dtype or states[idx[0]].dtype)
    for j, i in enumerate(idx):
        out[j, :states[i].shape[0]] = states[i]
    return out


def logits_at(model: Any, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``model``'s logits [M,V] at the positions of ``mask`` [B,T], row by row: through the
    model's own ``logits_at`` where it takes one (its output head then runs there alone), else
    taken from the full logits (e.g. a plain Hugging Face model)."""
    call = getattr(model, "forward", None) or model.__call__
    try:
        takes = "logits_at" in inspect.signature(call).parameters
    except (TypeError, ValueError):
        takes = False
    return model(ids, logits_at=mask).logits if takes else model(ids).logits[mask]


@torch.no_grad()
def score(model: Any, cases: Sequence[Case], pad_id: int, batch_size: int = 32,
          prefix: Optional[tuple[int, Sequence[torch.Tensor]]] = None) -> dict[str, Any]:
    """Exact whole answers, first-token top-1 and rank, the answer tokens' mean negative
    log-likelihood, per case and in the mean (questions longer
    than the model's positions are left out and counted in ``too_long``).

    ``prefix`` (layer, streams): each case's stream entering decoder ``layer`` [len, D], captured
    once (``RetrofitLM.capturing_input_of``) while the layers below it cannot change; the
    forwards then start there (``RetrofitLM.starting_at``)."""
    limit = getattr(getattr(model, "cfg", None), "max_seq_len", None)
    n_asked = len(cases)
    if prefix is not None and len(prefix[1]) != len(cases):
        raise EngramError(f"score: {len(prefix[1])} captured streams for {len(cases)} questions")
    if limit:  # questions longer than the model's positions are left out, and counted
        keep = [i for i, c in enumerate(cases) if len(c.ids) <= limit]
        cases = [cases[i] for i in keep]
        if prefix is not None:
            prefix = (prefix[0], [prefix[1][i] for i in keep])
    n_cases = len(cases)
    exact, top1 = [False] * n_cases, [False] * n_cases
    rank, nll = [0] * n_cases, [0.0] * n_cases
    # batches of similar length pad little; results go back to the cases' own order
    order = sorted(range(n_cases), key=lambda i: len(cases[i].ids))
    was = model.training
    model.eval()
    try:
        for s in range(0, n_cases, batch_size):
            idx = order[s:s + batch_size]
            ids, ans = pad_batch([cases[i] for i in idx], pad_id)
            given = contextlib.nullcontext()
            if prefix is not None:  # the captured streams, padded like the ids (padding is never scored)
                given = model.starting_at(prefix[0], pad_states(prefix[1], idx, ids))
            # only the positions that predict an answer token are scored: the output head runs there alone
            with given:
                logits = logits_at(model, ids, ans).float()  # [M,V], the rows' answer positions in order
            at = 0
            for i in idx:
                c = cases[i]
                n = len(c.answer_ids)
                lg = logits[at:at + n]
                at += n
                gold = torch.tensor(c.answer_ids)
                exact[i] = bool((lg.argmax(-1) == gold).all())
                nll[i] = float(F.cross_entropy(lg, gold))
                rank[i] = int((lg[0] > lg[0, gold[0]]).sum()) + 1
                top1[i] = rank[i] == 1
    finally:
        model.train(was)
    n = max(1, len(cases))
    return {"n": len(cases), "too_long": n_asked - len(cases), "exact": sum(exact) / n, "top1": sum(top1) / n,
            "median_first_rank": float(np.median(rank)) if rank else float("nan"),
            "answer_nll": float(np.mean(nll)) if nll else float("nan"),
            "per_case_exact": exact}


def neutral_text(part: str) -> str:
    """English prose no edit trains on: ``part`` "train" (for the KL term) or "eval" (to measure)."""
    from pydoc_data.topics import topics  # stdlib; imported here because it is large

    keys = sorted(topics)
    half = keys[: len(keys) // 2] if part == "train" else keys[len(keys) // 2:]
    return "\n\n".join(topics[k] for k in half)


def neutral_windows(tokenizer: Any, part: str, n: int, length: int) -> torch.Tensor:
    """``n`` consecutive windows [n, length] of the neutral text's tokens."""
    toks = tokenizer.encode(neutral_text(part), add_special_tokens=False).ids
    if n * length > len(toks):  # repeating the text would weigh some of it twice, unsaid
        raise EngramError(f"{n} neutral windows of {length} tokens: the {part!r} neutral text has {len(toks)} "
                          f"tokens; ask for at most {len(toks) // length} windows")
    return torch.tensor(toks[:n * length], dtype=torch.long).view(n, length)


class ScoredAs:
    """``call(ids) -> output with .logits`` scored as ``model`` is: the scorers' ``eval()`` /
    ``train()`` and ``cfg`` go to ``model``; ``call`` takes the place of ``model(ids)`` (e.g. the
    model reading patches per call, or mixed with the N-gram memory)."""

    def __init__(self, model: Any, call: Callable[[torch.Tensor], Any]) -> None:
        self.model, self.call = model, call
        self.cfg = getattr(model, "cfg", None)

    @property
    def training(self) -> bool:
        return self.model.training

    def eval(self) -> "ScoredAs":
        self.model.eval()
        return self

    def train(self, mode: bool = True) -> "ScoredAs":
        self.model.train(mode)
        return self

    def __call__(self, ids: torch.Tensor, logits_at: Optional[torch.Tensor] = None) -> Any:
        out = self.call(ids)
        return out if logits_at is None else SimpleNamespace(logits=out.logits[logits_at])


@torch.no_grad()
def logprobs(model: Any, windows: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """log p [n, length, V] of every next token (float32)."""
    was = model.training
    model.eval()
    try:
        return torch.cat([F.log_softmax(model(windows[s:s + batch_size]).logits.float(), -1)
                          for s in range(0, len(windows), batch_size)])
    finally:
        model.train(was)


@torch.no_grad()
def neutral_change(model: Any, windows: torch.Tensor, before: torch.Tensor) -> dict[str, float]:
    """Mean KL(before || now) per token and the loss change on ``windows`` against ``before``."""
    now = logprobs(model, windows)
    kl = (before.exp() * (before - now)).sum(-1)
    tgt = windows[:, 1:]
    loss_b = -before[:, :-1].gather(-1, tgt.unsqueeze(-1)).mean()
    loss_n = -now[:, :-1].gather(-1, tgt.unsqueeze(-1)).mean()
    return {"kl": float(kl.mean()), "kl_max": float(kl.max()), "loss_change": float(loss_n - loss_b)}
