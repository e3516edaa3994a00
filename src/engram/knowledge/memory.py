"""The N-gram memory as a way to add facts: the facts' sentences indexed as a delta of an N-gram
index over the model's training text, and the model's next-token distribution mixed with the
index's, ``P = (1 - lambda) P_model + lambda P_ngram`` (:mod:`engram.ngram.mixture`), with a
fixed ``lambda`` chosen on dev questions.

Shape legend
    B batch   T positions   V vocabulary

Nothing in the model changes: adding facts is ``NgramIndex.add_texts`` (seconds), removing them
is ``NgramIndex.remove``, after which every mixed distribution is the one before the add.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Optional, Sequence

from engram.errors import EngramError
from engram.knowledge.facts import Fact
from engram.knowledge.retrieval import fact_sentences
from engram.knowledge.scoring import ScoredAs
from engram.ngram.index import NgramIndex
from engram.ngram.mixture import LMAdapter, NgramMixture


class FactMemoryError(EngramError):
    """The N-gram memory cannot be set up as asked; the message names the value and the fix."""


@dataclass(frozen=True)
class MemoryConfig:
    data: Optional[str] = None  # a dataset directory (`engram data prepare`) with the model's tokenizer
    lambdas: tuple[float, ...] = field(default=(0.1, 0.3, 0.5, 0.7, 0.9))  # chosen on dev questions


class FactMemory:
    """An N-gram index over ``cfg.data``'s training split, built once in a private directory,
    to which sets of facts are added and from which they are removed."""

    def __init__(self, model: Any, cfg: MemoryConfig) -> None:
        if not cfg.data:
            raise FactMemoryError("the ngram method needs the model's training text: give --ngram-data DIR "
                               "(a dataset from `engram data prepare` or `engram retrofit data`)")
        if not cfg.lambdas or not all(0 <= x < 1 for x in cfg.lambdas):
            raise FactMemoryError(f"lambdas={list(cfg.lambdas)}; give values in [0, 1)")
        self.model, self.cfg = model, cfg
        self._dir = tempfile.TemporaryDirectory(prefix="engram-fact-memory-")
        t0 = time.time()
        self.index = NgramIndex.from_dataset(Path(self._dir.name) / "index", cfg.data, progress=False)
        self.build_seconds = time.time() - t0
        self.lm = LMAdapter(model, vocab_size=self.index.vocab_size,
                            max_seq_len=getattr(getattr(model, "cfg", None), "max_seq_len", None))

    def mixed(self, lam: float) -> ScoredAs:
        """The model mixed with the memory at ``lam``: ``(...)(ids).logits`` are the mixture's
        log-probabilities [B,T,V], so anything that scores a model by its logits scores it."""
        mixture = NgramMixture(self.lm, self.index, float(lam))
        return ScoredAs(self.model, lambda ids: SimpleNamespace(logits=mixture.log_probs(ids)))

    def add(self, facts: Sequence[Fact], name: str) -> dict[str, Any]:
        """Index the facts' sentences as the delta ``name``: its bytes and seconds."""
        t0 = time.time()
        info = self.index.add_texts([s for f in facts for s in fact_sentences(f)], name=name)
        secs = time.time() - t0
        return {"add_seconds": secs, "bytes": (Path(self.index.path) / info.file).stat().st_size}

    def remove(self, name: str) -> None:
        self.index.remove(name)

    def choose_lambda(self, dev_exact: Callable[[ScoredAs], float]) -> tuple[Optional[float], dict[str, float]]:
        """The lambda whose mixture answers most dev questions (ties: the smaller lambda, which
        moves the model least), and every lambda's dev score; None when all answer nothing."""
        scores = {f"{lam:g}": dev_exact(self.mixed(lam)) for lam in self.cfg.lambdas}
        if max(scores.values()) == 0:
            return None, scores
        best = max(self.cfg.lambdas, key=lambda lam: (scores[f"{lam:g}"], -lam))
        return best, scores

    def close(self) -> None:
        self._dir.cleanup()

