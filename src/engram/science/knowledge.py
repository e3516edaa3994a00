"""Synthetic-knowledge benchmark: real facts from the built-in corpus, recalled by a trained model.

The facts (countries: capital, currency, population, area, continent, languages, ...; cities:
country and population) are rendered into the training corpus by ``engram.data.corpus``; this module
asks a trained model to complete each fact's prompt.

Exact-answer accuracy
    The greedy continuation of ``fact.prompt`` must reproduce the answer's tokens exactly. Greedy
    decoding matches token by token iff, with the answer teacher-forced, the argmax at every
    answer position is the answer token, so one batched forward pass scores it (no sampling loop).

Bits of knowledge (an estimate, defined here; cf. Allen-Zhu & Li, "Physics of Language Models:
Part 3.3, Knowledge Capacity Scaling Laws", 2024, who measure ~2 bits per parameter at capacity)
    For fact f with relation r and answer a, the knowledge-free prior is the empirical answer
    distribution of r over all facts, q_r (what a model that knows the answer *format* and
    frequencies but not the subject can do). The bits the model holds about f are
        b_f = max(0, -log2 q_r(a) - (-log2 p_model(answer tokens | prompt)))
    i.e. how many bits better than the prior the model encodes the answer. Summed over the
    sampled facts and scaled to every fact of the same split, this is a *lower-bound-style*
    estimate: the model also pays to spell multi-token answers, which the prior does not.
    Dividing by parameters gives bits/parameter to set against the ~2 bits/parameter capacity.

Only facts whose document is in the training split count as "stored"; facts whose documents
went to validation are reported separately (their other phrasing may still be in training).
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from engram.data.corpus import Fact, fact_documents, fact_records
from engram.data.shards import split_documents
from engram.errors import EngramError


class KnowledgeError(EngramError):
    """A knowledge-benchmark setting is invalid; the message names the value and the fix."""


@dataclass(frozen=True)
class FactItem:
    relation: str
    prompt_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]
    prior_bits: float  # -log2 q_r(answer)
    in_train: bool


@dataclass
class FactSet:
    items: list[FactItem]
    population: dict[str, int]  # facts per split ("train"/"val") in the whole corpus
    skipped: int  # facts whose prompt does not tokenize as a prefix of prompt + answer

    def __post_init__(self) -> None:
        if not self.items:
            raise KnowledgeError("the fact set is empty; raise per_relation or check the tokenizer")

    def to_dict(self) -> dict[str, Any]:
        return {"items": [[i.relation, list(i.prompt_ids), list(i.answer_ids), i.prior_bits, i.in_train]
                          for i in self.items], "population": self.population, "skipped": self.skipped}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FactSet":
        return cls([FactItem(r, tuple(p), tuple(a), float(b), bool(t)) for r, p, a, b, t in d["items"]],
                   dict(d["population"]), int(d["skipped"]))


def _stable_key(f: Fact) -> str:
    return hashlib.sha256(f"{f.relation}\x1f{f.subject}\x1f{f.doc_title}".encode()).hexdigest()


def build_fact_set(tokenizer, val_fraction: float = 0.05, split_seed: int = 0,
                   per_relation: int = 40, facts: Optional[Sequence[Fact]] = None,
                   sources: Optional[Sequence[str]] = None) -> FactSet:
    """A fixed, stratified sample (``per_relation`` per relation, deterministic) of tokenized facts.

    ``val_fraction``/``split_seed`` must be the dataset's (meta.json) so that ``in_train`` is exact.
    ``sources`` keeps only facts from documents of those corpus sources (e.g. ``["countries"]``
    for a dataset prepared from that source alone).
    """
    if per_relation < 1:
        raise KnowledgeError(f"per_relation={per_relation} must be >= 1")

    facts = list(facts) if facts is not None else fact_records()
    fdocs = fact_documents()
    _, val_docs = split_documents(fdocs, val_fraction, split_seed)
    val_titles = {d.title for d in val_docs}
    if sources is not None:
        keep = {d.title for d in fdocs if d.source in set(sources)}
        facts = [f for f in facts if f.doc_title in keep]
        if not facts:
            raise KnowledgeError(f"no facts come from sources {list(sources)}; the built-in fact "
                                 f"sources are 'countries' and 'cities'")
    counts: dict[str, Counter] = defaultdict(Counter)
    for f in facts:
        counts[f.relation][f.answer] += 1
    population = Counter("val" if f.doc_title in val_titles else "train" for f in facts)
    by_rel: dict[str, list[Fact]] = defaultdict(list)
    for f in sorted(facts, key=_stable_key):
        by_rel[f.relation].append(f)
    items, skipped = [], 0
    for rel in sorted(by_rel):
        taken = 0
        for f in by_rel[rel]:
            if taken >= per_relation:
                break
            prompt = f.prompt.rstrip(" ")
            p_ids = tokenizer.encode(prompt).ids
            full = tokenizer.encode(f.sentence[: f.answer_start + len(f.answer)]).ids
            if not p_ids or full[: len(p_ids)] != p_ids or len(full) == len(p_ids):
                skipped += 1
                continue
            total = sum(counts[rel].values())
            prior = -math.log2(counts[rel][f.answer] / total)
            items.append(FactItem(rel, tuple(p_ids), tuple(full[len(p_ids):]), prior,
                                  f.doc_title not in val_titles))
            taken += 1
    return FactSet(items, dict(population), skipped)


@torch.no_grad()
def evaluate_facts(model, fact_set: FactSet, batch_size: int = 64) -> dict[str, Any]:
    """Exact-answer accuracy and estimated bits of knowledge (see the module docstring)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    max_len = model.cfg.max_seq_len
    per_item: list[tuple[FactItem, bool, float]] = []
    try:
        items = sorted(fact_set.items, key=lambda i: len(i.prompt_ids) + len(i.answer_ids))
        for b in range(0, len(items), batch_size):
            chunk = items[b: b + batch_size]
            seqs = [list(i.prompt_ids + i.answer_ids)[-max_len - 1:] for i in chunk]
            T = max(len(s) for s in seqs) - 1
            x = torch.zeros(len(chunk), T, dtype=torch.long)
            for r, s in enumerate(seqs):
                x[r, : len(s) - 1] = torch.tensor(s[:-1])
            logp = F.log_softmax(model(x.to(device)).logits.float(), dim=-1).cpu()
            for r, (it, s) in enumerate(zip(chunk, seqs)):
                n_ans = len(it.answer_ids)
                pos = torch.arange(len(s) - 1 - n_ans, len(s) - 1)  # predicting the answer tokens
                tgt = torch.tensor(s[-n_ans:])
                lp = logp[r, pos]
                correct = bool((lp.argmax(-1) == tgt).all())
                nats = float(-lp.gather(-1, tgt[:, None]).sum())
                per_item.append((it, correct, nats / math.log(2)))
    finally:
        model.train(was_training)
    out: dict[str, Any] = {}
    for split, want in (("train", True), ("val", False)):
        rows = [(c, bits, it) for it, c, bits in per_item if it.in_train == want]
        if not rows:
            continue
        stored = [max(0.0, it.prior_bits - bits) for _, bits, it in rows]
        pop = fact_set.population.get(split, 0)
        out[split] = {"n": len(rows), "accuracy": sum(c for c, _, _ in rows) / len(rows),
                      "answer_bits": sum(b for _, b, _ in rows) / len(rows),
                      "prior_bits": sum(it.prior_bits for _, _, it in rows) / len(rows),
                      "stored_bits_per_fact": sum(stored) / len(rows),
                      "stored_bits_total_est": sum(stored) / len(rows) * pop}
    rel_acc: dict[str, list[int]] = defaultdict(list)
    for it, c, _ in per_item:
        if it.in_train:
            rel_acc[it.relation].append(int(c))
    out["accuracy_by_relation"] = {r: sum(v) / len(v) for r, v in sorted(rel_acc.items())}
    out["accuracy"] = out.get("train", {}).get("accuracy", float("nan"))
    out["stored_bits_est"] = out.get("train", {}).get("stored_bits_total_est", 0.0)
    return out
