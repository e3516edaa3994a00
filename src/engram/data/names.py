"""Invented names for fact experiments: words from random syllables, each new and unique.

The fact studies teach a model facts it cannot have seen, so subjects and answers are made-up
words ("Zourythsys", "Vroxlun"). One generator serves them all; each study keeps its own
syllable inventory (``Syllables``) because its recorded results were made with it, and a
``NameGenerator`` shares the caller's ``random.Random`` so that the caller's other draws (a
continent, a relation) interleave with the names exactly as before.

Pure Python: no torch, no numpy.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Sequence, Union

from engram.errors import EngramError


class NamesError(EngramError):
    """No new name could be found; the message names the fix."""


@dataclass(frozen=True)
class Syllables:
    """A syllable is one onset, one vowel and one coda, each drawn uniformly (repeats weigh more)."""

    onsets: tuple[str, ...]
    vowels: tuple[str, ...]
    codas: tuple[str, ...]


# The invented countries of the N-gram memory study (engram.ngram.facts).
COUNTRY_SYLLABLES = Syllables(
    onsets=("b", "d", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st", "tr", "vr",
            "zh"),
    vowels=("a", "e", "i", "o", "u", "ae", "ou", "y"),
    codas=("", "", "n", "r", "l", "s", "th", "m", "x"))
# The invented people, villages and machines of the retrofit facts study (engram.science.retrofit_facts).
PERSON_SYLLABLES = Syllables(
    onsets=("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gl", "kr", "st",
            "th"),
    vowels=("a", "e", "i", "o", "u", "ae", "ei", "ou"),
    codas=("", "", "n", "r", "l", "s", "m", "th"))


def invented_word(rng: random.Random, syllables: Syllables, count: Union[int, Sequence[int]]) -> str:
    """A capitalised word of ``count`` syllables (or of ``rng.choice(count)`` for a sequence)."""
    n = count if isinstance(count, int) else rng.choice(tuple(count))
    return "".join(rng.choice(syllables.onsets) + rng.choice(syllables.vowels) + rng.choice(syllables.codas)
                   for _ in range(n)).capitalize()


class NameGenerator:
    """Names never given before by this generator and accepted by ``is_new`` (e.g. "absent from
    the corpus"); draws from ``rng``, which the caller may keep using between names."""

    def __init__(self, rng: random.Random, syllables: Syllables,
                 is_new: Callable[[str], bool] = lambda name: True, max_tries: int = 1000) -> None:
        self.rng, self.syllables, self.is_new, self.max_tries = rng, syllables, is_new, max_tries
        self.used: set[str] = set()

    def fresh(self, count: Union[int, Sequence[int]], suffix: str = "") -> str:
        """A new name of ``count`` syllables (see ``invented_word``) followed by ``suffix``."""
        for _ in range(self.max_tries):
            name = invented_word(self.rng, self.syllables, count) + suffix
            if name in self.used or not self.is_new(name):
                continue
            self.used.add(name)
            return name
        raise NamesError(f"no new {count}-syllable name in {self.max_tries} tries ({len(self.used)} given); "
                         f"ask for fewer names or allow longer ones")
