"""Facts to teach: subject / relation / answer triples, or sentences with the answer marked.

A facts file is JSON lines, one fact or sentence a line::

    {"subject": "Zorvia", "relation": "capital", "answer": "Blenmar"}
    {"text": "The flag of Zorvia is [[green and gold]].", "subject": "Zorvia"}

A triple is taught with the relation's training forms (:mod:`engram.knowledge.templates`) and can
be asked with its held-out questions. A marked sentence is taught as written: the span inside
``[[...]]`` is the answer, the text before it the prompt (``subject`` is optional and only used
for the coverage report).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from engram.data.names import PERSON_SYLLABLES, NameGenerator
from engram.errors import EngramError
from engram.fsutil import PathLike, atomic_write
from engram.knowledge.templates import RELATIONS


class FactsFileError(EngramError):
    """A facts file or fact that cannot be used; the message names the line and the fix."""


@dataclass(frozen=True)
class Fact:
    """``subject`` -- ``relation`` -> ``answer``; ``relation`` is one of the template bank's."""

    subject: str
    relation: str
    answer: str


@dataclass(frozen=True)
class MarkedSentence:
    """A training sentence: ``prompt`` + ``answer`` + ``tail``; ``subject`` only for reports."""

    prompt: str
    answer: str
    tail: str = ""
    subject: Optional[str] = None


def parse_marked(text: str, subject: Optional[str] = None, where: str = "sentence") -> MarkedSentence:
    """``"... [[answer]] ..."`` -> a :class:`MarkedSentence`; exactly one non-empty span."""
    if text.count("[[") != 1 or text.count("]]") != 1 or text.index("[[") > text.index("]]"):
        raise FactsFileError(f"{where}: {text!r} must mark the answer once, as [[answer]]")
    head, rest = text.split("[[", 1)
    answer, tail = rest.split("]]", 1)
    if not answer.strip() or not head.strip():
        raise FactsFileError(f"{where}: {text!r} needs text before the answer and a non-empty [[answer]]")
    return MarkedSentence(head.rstrip(" "), answer.strip(), tail, subject)


def read_facts(path: PathLike) -> tuple[list[Fact], list[MarkedSentence]]:
    """The facts and marked sentences of a JSON-lines file (blank lines skipped)."""
    p = Path(path)
    if not p.is_file():
        raise FactsFileError(f"--facts {p}: no such file; give a JSON-lines file of facts")
    facts: list[Fact] = []
    marked: list[MarkedSentence] = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{p}:{n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise FactsFileError(f"{where}: not JSON ({e.msg}); write one JSON object a line") from None
        if not isinstance(rec, dict):
            raise FactsFileError(f"{where}: expected an object like "
                                 f'{{"subject": ..., "relation": ..., "answer": ...}}, got {type(rec).__name__}')
        if "text" in rec:
            marked.append(parse_marked(str(rec["text"]), rec.get("subject"), where))
            continue
        missing = [k for k in ("subject", "relation", "answer") if not str(rec.get(k, "")).strip()]
        if missing:
            raise FactsFileError(f"{where}: missing {missing}; a line is a subject/relation/answer triple "
                                 f'or {{"text": "... [[answer]] ..."}}')
        if rec["relation"] not in RELATIONS:
            raise FactsFileError(f"{where}: relation {rec['relation']!r} has no templates; use one of "
                                 f"{list(RELATIONS)} or write the fact as {{\"text\": \"... [[answer]] ...\"}}")
        facts.append(Fact(str(rec["subject"]).strip(), rec["relation"], str(rec["answer"]).strip()))
    if not facts and not marked:
        raise FactsFileError(f"--facts {p} holds no facts; write one JSON object a line")
    return facts, marked


def write_facts(path: PathLike, facts: Sequence[Fact]) -> None:
    """Facts as the JSON lines :func:`read_facts` reads (written atomically)."""
    data = "".join(json.dumps({"subject": f.subject, "relation": f.relation, "answer": f.answer}) + "\n"
                   for f in facts).encode("utf-8")
    atomic_write(path, lambda f: f.write(data))


def invent_facts(n: int, seed: int, forbidden: str = "", relations: Sequence[str] = RELATIONS) -> list[Fact]:
    """``n`` facts about invented names (unique, absent from ``forbidden``), relations in turn."""
    if n < 1:
        raise FactsFileError(f"n={n} facts; ask for at least 1")
    low = forbidden.lower()
    names = NameGenerator(random.Random(seed), PERSON_SYLLABLES, lambda w: w.lower() not in low)
    return [Fact(names.fresh((2, 3)), relations[i % len(relations)], names.fresh((2, 3))) for i in range(n)]
