"""Retrieval-augmented prompting: BM25 over the facts' sentences and distractor text; the top-k
passages are written before the question.

The store holds every stored fact's training sentences (its relation's training forms, chat turns
left out, written out whole with the answer) and ``distractors`` sentences of built-in text
(default: Shakespeare and the King James Bible, text that states none of the facts; the
corpus's country documents would state the true capitals that counterfactual edits contradict).
The retriever is ``bm25s`` (BM25, English stop words removed); a question's prompt is its query.

Three ways to ask (:func:`ask`):

- ``"none"``: the plain question, the model alone;
- ``"retrieval"``: the top-``k`` passages, best first, one a line, then a blank line and the question;
- ``"oracle"``: the fact's own first training statement as the one passage, the upper bound of any
  retriever (a question about a fact not in the store gets no passage).

A question's *hit* means one of its top-``k`` passages is a sentence of the fact it asks; the hit
rate is reported beside the answers' accuracy, which is scored as every other method
(:func:`engram.knowledge.scoring.score`).
"""

from __future__ import annotations

import importlib.util
import random
import re
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from engram.data.corpus import builtin_documents
from engram.errors import EngramError
from engram.knowledge.facts import Fact
from engram.knowledge.scoring import encode_case, score
from engram.knowledge.templates import asked, chat_format, templates

MODES = ("none", "retrieval", "oracle")
INSTALL = "pip install 'engram-lm[retrieval]'"


class RetrievalError(EngramError):
    """A retrieval setting or store that cannot be used; the message names the value and the fix."""


@dataclass(frozen=True)
class RetrievalConfig:
    k: int = 3  # passages put before a question
    distractors: int = 10_000  # sentences of built-in text in the store
    sources: tuple[str, ...] = ("shakespeare", "bible")  # where the distractors come from
    seed: int = 0  # which distractor sentences


def require_bm25s() -> Any:
    if importlib.util.find_spec("bm25s") is None:
        raise RetrievalError(f"retrieval needs the bm25s package; install it with {INSTALL}")
    import bm25s

    return bm25s


def _sentence(prompt: str, answer: str, tail: str) -> str:
    return (prompt + answer if prompt.endswith("\n") else prompt + " " + answer) + tail


def fact_sentences(fact: Fact) -> list[str]:
    """The fact's training sentences, written out whole (chat turns left out)."""
    return [_sentence(*t.render(fact.subject, fact.answer)).replace("\n", " ")
            for t in templates(fact.relation, "train") if t.kind != "chat"]


def distractor_sentences(n: int, sources: Sequence[str] = ("shakespeare", "bible"), seed: int = 0) -> list[str]:
    """``n`` sentences (6 to 60 words) of the built-in ``sources``, drawn by ``seed``, in corpus order."""
    pool = []
    for d in builtin_documents(sources):
        for s in re.split(r"(?<=[.!?])\s+", d.text):
            s = " ".join(s.split())
            if 6 <= len(s.split()) <= 60:
                pool.append(s)
    if len(pool) < n:
        raise RetrievalError(f"distractors={n}, but {list(sources)} give only {len(pool)} sentences; ask for "
                             f"fewer or add sources")
    return [pool[i] for i in sorted(random.Random(seed).sample(range(len(pool)), n))]


class FactStore:
    """The passages (facts' sentences, then distractors) and a BM25 index over them."""

    def __init__(self, facts: Sequence[Fact], distractors: Sequence[str]) -> None:
        bm25s = require_bm25s()
        self.facts = list(facts)
        self.passages: list[str] = []
        self.owner: list[int] = []  # the fact a passage states, -1 for a distractor
        for i, f in enumerate(self.facts):
            for s in fact_sentences(f):
                self.passages.append(s)
                self.owner.append(i)
        self.passages += list(distractors)
        self.owner += [-1] * len(distractors)
        self._index = {f: i for i, f in enumerate(self.facts)}
        self._bm25s = bm25s
        self._bm25 = bm25s.BM25()
        self._bm25.index(bm25s.tokenize(self.passages, stopwords="en", show_progress=False), show_progress=False)

    @classmethod
    def build(cls, facts: Sequence[Fact], cfg: RetrievalConfig = RetrievalConfig()) -> "FactStore":
        return cls(facts, distractor_sentences(cfg.distractors, cfg.sources, cfg.seed))

    def fact_index(self, fact: Fact) -> Optional[int]:
        return self._index.get(fact)

    def search(self, queries: Sequence[str], k: int) -> list[list[int]]:
        """The top-``k`` passage indices of each query, best first."""
        if not 1 <= k <= len(self.passages):
            raise RetrievalError(f"k={k}; choose 1 to {len(self.passages)} passages")
        toks = self._bm25s.tokenize(list(queries), stopwords="en", show_progress=False)
        docs, _ = self._bm25.retrieve(toks, k=k, show_progress=False, n_threads=1)
        return [[int(j) for j in row] for row in np.asarray(docs)]


def ask(model: Any, tokenizer: Any, facts: Sequence[Fact], pad_id: int, store: FactStore, split: str,
        mode: str = "retrieval", k: int = 3, batch_size: int = 8) -> dict[str, Any]:
    """Ask ``facts`` with the relation's ``split`` questions (or ``"verbatim"``), passages before
    each as ``mode`` says.

    Returns ``score``'s numbers plus ``hit_rate`` (retrieval: of the questions whose fact is in the
    store) and ``extra_prompt_tokens`` (mean tokens the passages add)."""
    if mode not in MODES:
        raise RetrievalError(f"mode {mode!r}; choose one of {MODES}")
    chat = chat_format(tokenizer)
    questions = []  # (fact index, prompt, answer, subject, kind)
    for i, f in enumerate(facts):
        for t in asked(f.relation, split):
            prompt, answer, _ = t.render(f.subject, f.answer, chat)
            questions.append((i, prompt, answer, f.subject, t.kind))
    tops = store.search([q[1] for q in questions], k) if mode == "retrieval" else [[] for _ in questions]
    cases, hits, extra = [], [], []
    for (i, prompt, answer, subject, kind), top in zip(questions, tops):
        owner = store.fact_index(facts[i])
        if mode == "retrieval":
            passages = [store.passages[j] for j in top]
            if owner is not None:
                hits.append(any(store.owner[j] == owner for j in top))
        elif mode == "oracle" and owner is not None:
            passages = [fact_sentences(facts[i])[0]]
        else:
            passages = []
        context = "\n".join(passages) + "\n\n" if passages else ""
        c = encode_case(tokenizer, context + prompt, answer, subject=subject, fact=i, kind=kind)
        plain = encode_case(tokenizer, prompt, answer, subject=subject, fact=i, kind=kind)
        if c is None or plain is None:
            continue
        cases.append(c)
        extra.append(len(c.prompt_ids) - len(plain.prompt_ids))
    res = {k_: v for k_, v in score(model, cases, pad_id, batch_size).items() if k_ != "per_case_exact"}
    res.update(mode=mode, split=split, k=k if mode == "retrieval" else None,
               hit_rate=float(np.mean(hits)) if hits else None,
               extra_prompt_tokens=float(np.mean(extra)) if extra else 0.0)
    return res
