"""Instant knowledge updates: invented facts, indexed with no weight update, then recalled.

Shape legend
    B facts   T tokens per padded sequence   V vocabulary

:func:`invented_facts` makes countries that do not exist (names checked to be absent from the
index) with a capital, currency, main language and continent, rendered with the built-in
corpus's own templates (:data:`engram.data.corpus.COUNTRY_TEMPLATES`): phrasing 0 is what gets
indexed, phrasing 1 is a paraphrase used only as a query. :func:`recall` measures, for each fact,
whether the first answer token is the top-1 prediction after the prompt, its probability, and
whether every answer token is top-1 given the gold prefix (teacher-forced exact match).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch

from engram.data.corpus import COUNTRY_TEMPLATES, Fact
from engram.data.names import COUNTRY_SYLLABLES, NameGenerator, NamesError
from engram.errors import EngramError
from engram.ngram.index import NgramIndex
from engram.ngram.mixture import NgramMixture

CONTINENTS = ("Africa", "Asia", "Europe", "North America", "South America", "Oceania")
RELATIONS = ("capital", "currency", "language", "continent")
MODES = ("mixture", "lm", "kn", "infgram")


class FactsError(EngramError):
    """Bad settings for the invented-facts experiment; the message names the value."""


@dataclass(frozen=True)
class FactCase:
    """One fact, tokenised: ``prompt_ids`` then ``answer_ids`` (the phrasing ``phrasing``)."""

    fact: Fact
    phrasing: int
    prompt_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]


def invented_facts(n_countries: int = 40, seed: int = 0, index: Optional[NgramIndex] = None,
                   phrasing: int = 0) -> list[Fact]:
    """Facts about ``n_countries`` invented countries; names never seen by ``index`` (if given)."""
    if n_countries < 1:
        raise FactsError(f"n_countries={n_countries} must be >= 1")
    rng = random.Random(seed)
    # the name must be new to the index
    names = NameGenerator(rng, COUNTRY_SYLLABLES, is_new=lambda w: index is None or
                          index.count(index.tokenizer.encode(" " + w).ids) == 0)
    facts: list[Fact] = []
    for _ in range(n_countries):
        try:
            country = names.fresh(3)
            answers = {"capital": names.fresh(2), "currency": names.fresh(2).lower(),
                       "language": names.fresh(2, "ic"), "continent": rng.choice(CONTINENTS)}
        except NamesError:
            raise FactsError(f"could not invent enough unseen names for n_countries={n_countries}; "
                             f"lower n_countries") from None
        for rel in RELATIONS:
            tmpl = COUNTRY_TEMPLATES[rel][phrasing]
            sentence = tmpl.format(s=country, S=country, a=answers[rel])
            facts.append(Fact(country, rel, answers[rel], sentence))
    return facts


def facts_documents(facts: Sequence[Fact]) -> list[str]:
    """One document per invented country: a title line and its fact sentences (as in the corpus)."""
    by_subject: dict[str, list[str]] = {}
    for f in facts:
        by_subject.setdefault(f.subject, []).append(f.sentence)
    return [f"{s}\n\n" + " ".join(sents) + "\n" for s, sents in by_subject.items()]


def tokenize_cases(facts: Sequence[Fact], tokenizer, phrasing: int) -> list[FactCase]:
    """Prompt/answer ids per fact; facts whose answer boundary is not a token boundary are dropped."""
    cases = []
    for f in facts:
        prompt = f.prompt.rstrip()
        full = tokenizer.encode(f.sentence[: f.answer_start + len(f.answer)], add_special_tokens=False).ids
        p_ids = tokenizer.encode(prompt, add_special_tokens=False).ids
        if full[: len(p_ids)] != p_ids or len(full) == len(p_ids):
            continue
        cases.append(FactCase(f, phrasing, tuple(p_ids), tuple(full[len(p_ids):])))
    return cases


def paraphrase(facts: Sequence[Fact], phrasing: int = 1) -> list[Fact]:
    """The same facts rendered with another template of the corpus."""
    out = []
    for f in facts:
        tmpl = COUNTRY_TEMPLATES[f.relation][phrasing]
        out.append(Fact(f.subject, f.relation, f.answer, tmpl.format(s=f.subject, S=f.subject, a=f.answer)))
    return out


def _batch(cases: Sequence[FactCase], eos_id: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """[B,T] ids = eos + prompt + answer, right-padded with eos; (first, last) answer target index."""
    seqs = [[eos_id, *c.prompt_ids, *c.answer_ids] for c in cases]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), eos_id, dtype=torch.int64)
    spans = []
    for i, (s, c) in enumerate(zip(seqs, cases)):
        ids[i, : len(s)] = torch.tensor(s)
        first = 1 + len(c.prompt_ids)  # index in ids of the first answer token
        spans.append((first, first + len(c.answer_ids)))
    return ids, spans


@torch.no_grad()
def recall(cases: Sequence[FactCase], mix: NgramMixture, eos_id: int, mode: str = "mixture") -> dict[str, Any]:
    """Top-1 / probability of the answer's first token and teacher-forced exact match.

    ``mode``: "mixture" (the mixture as configured), "lm" (the LM alone), "kn" or "infgram" (one
    N-gram estimate alone, of the mixture's KN order).
    """
    if mode not in MODES:
        raise FactsError(f"mode={mode!r}; choose one of {MODES}")
    if not cases:
        raise FactsError("no fact cases to score")
    ids, spans = _batch(cases, eos_id)
    out = mix.lm(ids.to(mix.lm.device))
    if mode == "lm":
        logp = torch.log_softmax(out.logits.float().cpu(), -1)
        lam = None
    elif mode in ("kn", "infgram"):
        nb = mix.index.batch(ids.numpy(), kn_order=mix.cfg.kn_order)
        p = nb.infgram if mode == "infgram" else nb.kn
        logp = torch.log(p.clamp_min(1e-30))
        lam = None
    else:
        logp, lam = mix.step(ids, out)
    top1, exact, probs, lams = [], [], [], []
    for i, (a, b) in enumerate(spans):
        pred = logp[i, a - 1: b - 1].argmax(-1)  # position t predicts token t+1
        gold = ids[i, a:b]
        top1.append(bool(pred[0] == gold[0]))
        exact.append(bool((pred == gold).all()))
        probs.append(float(logp[i, a - 1, gold[0]].exp()))
        if lam is not None:
            lams.append(float(lam[i, a - 1]))
    res = {"facts": len(cases), "top1": float(np.mean(top1)), "exact_match": float(np.mean(exact)),
           "mean_p_first": float(np.mean(probs)), "per_fact_top1": top1, "per_fact_exact": exact}
    if lams:
        res["mean_lambda_at_answer"] = float(np.mean(lams))
    return res


def model_digest(model: Optional[torch.nn.Module]) -> Optional[str]:
    """sha256 over every parameter and buffer: proves the model was not touched."""
    if model is None:
        return None
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
