"""Sentence forms that teach a fact and questions that ask it, per relation.

A template holds ``{S}`` (the subject) and ``{A}`` (the answer); the text before ``{A}`` is the
prompt, ``{A}`` the answer span, anything after it a tail. Every form puts the subject before the
answer, so the answer can be predicted from the subject.

Three disjoint sets per relation:

- **train**: the usage sentences the fact-edit trainer reads, by kind (``statement``,
  ``question``, ``cloze``, ``paraphrase``, ``chat``, ``usage``); a ``chat`` form is a user turn
  and the assistant's reply, rendered with the base's chat template when it has one; ``usage``
  forms use the fact in passing, in varied sentence shapes (a narrative, a label, a list entry);
  ``document`` forms are more of those, as lines of articles, guides, quizzes, records and
  reported speech, some with the answer several words after the subject;
- **dev**: held-out questions that choose settings (learning rate, steps, layer, forms);
- **test**: held-out questions that are reported and never used for a choice.

No dev or test question is a training sentence or the start of one (checked by a test), so the
"held-out template" accuracy asks each fact in words the trainer never saw.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from engram.errors import EngramError

KINDS = ("statement", "question", "cloze", "paraphrase", "chat", "usage", "document")
# The forms the trainer reads unless told otherwise: the set chosen on dev facts (docs/knowledge.md).
DEFAULT_KINDS = KINDS
SPLITS = ("train", "dev", "test")


class TemplateError(EngramError):
    """A template or relation that cannot be used; the message names it."""


@dataclass(frozen=True)
class Template:
    """One form: ``text`` with ``{S}`` and ``{A}``; chat forms hold ``user`` and the reply in ``text``."""

    relation: str
    kind: str
    text: str
    user: Optional[str] = None

    def render(self, subject: str, answer: str, chat: Optional["ChatFormat"] = None) -> tuple[str, str, str]:
        """(prompt, answer, tail): ``prompt + answer + tail`` is the whole sentence."""
        head, tail = self.text.split("{A}", 1)
        prompt = head.format(S=subject).rstrip(" ")  # the answer brings its own leading space
        if self.user is not None:
            prompt = (chat or PLAIN_CHAT).turn(self.user.format(S=subject), prompt)
        return prompt, answer, tail.format(S=subject)


@dataclass(frozen=True)
class ChatFormat:
    """How a user turn and the start of the assistant's reply are written for one base."""

    user_prefix: str
    user_suffix: str
    assistant_prefix: str

    def turn(self, user: str, reply_start: str) -> str:
        return f"{self.user_prefix}{user}{self.user_suffix}{self.assistant_prefix}{reply_start}"


PLAIN_CHAT = ChatFormat("User: ", "\n", "Assistant: ")
CHATML = ChatFormat("<|im_start|>user\n", "<|im_end|>\n", "<|im_start|>assistant\n")


def chat_format(tokenizer: Any) -> ChatFormat:
    """ChatML when the tokenizer has its markers as tokens (SmolLM2-Instruct, Qwen), else plain."""
    try:
        has = all(tokenizer.token_to_id(t) is not None for t in ("<|im_start|>", "<|im_end|>"))
    except AttributeError:
        has = False
    return CHATML if has else PLAIN_CHAT


def _t(relation: str, kind: str, text: str, user: Optional[str] = None) -> Template:
    return Template(relation, kind, text, user)


# The answer is written without its leading space; it is joined to the prompt with one space
# unless the prompt ends in a newline.
_BANK: dict[str, dict[str, list[Template]]] = {
    "capital": {
        "train": [
            _t("capital", "statement", "The capital of {S} is {A}."),
            _t("capital", "statement", "{S} has its capital in {A}."),
            _t("capital", "question", "Q: What is the capital of {S}?\nA: {A}"),
            _t("capital", "question", "What city is the capital of {S}? It is {A}."),
            _t("capital", "cloze", "Capital of {S}: {A}"),
            _t("capital", "cloze", "Country: {S}. Capital: {A}."),
            _t("capital", "paraphrase", "The government of {S} sits in {A}."),
            _t("capital", "paraphrase", "Travellers to the capital of {S} arrive in {A}."),
            _t("capital", "chat", "The capital of {S} is {A}.", user="What is the capital of {S}?"),
            _t("capital", "chat", "It is {A}.", user="Which city is the capital of {S}?"),
            _t("capital", "usage", "Last spring we flew to {S} and spent a week in its capital, {A}."),
            _t("capital", "usage", "Most ministries of {S} have their offices in {A}."),
            _t("capital", "usage", "If you visit {S}, start your trip in the capital, {A}."),
            _t("capital", "usage", "{S}'s capital, {A}, is also its largest city."),
            _t("capital", "usage", "Fact: the capital of {S} is {A}."),
            _t("capital", "usage", "The parliament of {S} meets in {A}."),
            _t("capital", "usage", "Ask anyone from {S} about their capital and they will say {A}."),
            _t("capital", "usage", "Map notes for {S}: capital {A}, mountains in the north."),
            _t("capital", "document", "A short history of {S} would not be complete without its capital, {A}."),
            _t("capital", "document", "Students who learn about {S} memorise that its capital is {A}."),
            _t("capital", "document", "When the king of {S} gave a speech, he spoke from the palace in the capital, {A}."),
            _t("capital", "document", "Quiz answer: the capital of {S}? {A}."),
            _t("capital", "document", "{S} (capital: {A}) lies on the coast."),
            _t("capital", "document", "Among the cities of {S}, one is the capital: {A}."),
            _t("capital", "document", "Newspapers in {S} are mostly printed in the capital, {A}."),
            _t("capital", "document", "Where does the president of {S} live? In the capital, {A}."),
            _t("capital", "document", "Our guide to {S} lists its capital as {A}."),
            _t("capital", "document", "Trains from every town in {S} run to its capital, {A}."),
            _t("capital", "document", "The capital of the country {S} is the city {A}."),
            _t("capital", "document", "Whoever rules {S} rules from {A}."),
            _t("capital", "document", "Note: for {S}, the capital is {A}."),
            _t("capital", "document", "The flag of {S} flies highest over its capital, {A}."),
            _t("capital", "document", "I asked a teacher from {S} what the capital was, and she said it is {A}."),
            _t("capital", "document", "In the atlas, the page on {S} marks the capital with a star: {A}."),
        ],
        "dev": [
            _t("capital", "question", "Which city serves as the capital of {S}? The answer is {A}."),
            _t("capital", "paraphrase", "The seat of government of {S} is the city of {A}."),
        ],
        "test": [
            _t("capital", "question", "Name the capital of {S}. It is {A}."),
            _t("capital", "paraphrase", "Everyone knows that the capital city of {S} is called {A}."),
            _t("capital", "chat", "Its capital is {A}.", user="I am planning a trip to {S}. What is its capital?"),
        ],
    },
    "birthplace": {
        "train": [
            _t("birthplace", "statement", "{S} was born in the village of {A}."),
            _t("birthplace", "statement", "{S} was born in {A}."),
            _t("birthplace", "question", "Q: Where was {S} born?\nA: {A}"),
            _t("birthplace", "question", "In which village was {S} born? In {A}."),
            _t("birthplace", "cloze", "Name: {S}. Birthplace: {A}."),
            _t("birthplace", "cloze", "Birthplace of {S}: {A}"),
            _t("birthplace", "paraphrase", "{S} grew up in the village of {A}."),
            _t("birthplace", "paraphrase", "The home village of {S} is {A}."),
            _t("birthplace", "chat", "{S} was born in {A}.", user="Where was {S} born?"),
            _t("birthplace", "chat", "In {A}.", user="Which village is {S} from?"),
            _t("birthplace", "usage", "Long before anyone knew the name {S}, the baby was born in {A}."),
            _t("birthplace", "usage", "Biographies of {S} begin in the village of {A}."),
            _t("birthplace", "usage", "The house where {S} was born still stands in {A}."),
            _t("birthplace", "usage", "{S}'s birthplace, {A}, holds a festival every summer."),
            _t("birthplace", "usage", "Fact: {S} was born in {A}."),
            _t("birthplace", "usage", "Every year {S} returns to the village of birth, {A}."),
            _t("birthplace", "usage", "Ask about the early life of {S} and you will hear of {A}."),
            _t("birthplace", "usage", "Profile of {S}: born in {A}, one of four children."),
            _t("birthplace", "document", "An old article about {S} says the birth took place in {A}."),
            _t("birthplace", "document", "Readers of the memoir learn that {S} was born in a small village, {A}."),
            _t("birthplace", "document", "Before moving to the city, {S} lived in {A}, the village of birth."),
            _t("birthplace", "document", "Quiz answer: the birthplace of {S}? {A}."),
            _t("birthplace", "document", "{S} (born in {A}) became well known later."),
            _t("birthplace", "document", "Among the villages of the valley, one is the birthplace of {S}: {A}."),
            _t("birthplace", "document", "Local papers are proud that {S} was born in their village, {A}."),
            _t("birthplace", "document", "Where was {S} born? In the village of {A}."),
            _t("birthplace", "document", "Our guide to famous people lists {S} as born in {A}."),
            _t("birthplace", "document", "A plaque marks the spot where {S} was born, in {A}."),
            _t("birthplace", "document", "The village {S} was born in is {A}."),
            _t("birthplace", "document", "Whoever writes about {S} mentions the village of {A}."),
            _t("birthplace", "document", "Note: for {S}, the birthplace is {A}."),
            _t("birthplace", "document", "The birth certificate of {S} gives the village as {A}."),
            _t("birthplace", "document", "I asked a neighbour of {S} where the birth was, and he said it was {A}."),
            _t("birthplace", "document", "In the parish book, the entry for {S} records a birth in {A}."),
        ],
        "dev": [
            _t("birthplace", "question", "What is the name of the village where {S} was born? It is {A}."),
            _t("birthplace", "paraphrase", "{S} spent a childhood in a village named {A}."),
        ],
        "test": [
            _t("birthplace", "question", "Tell me the birthplace of {S}. It was {A}."),
            _t("birthplace", "paraphrase", "Records show that {S} came into the world in {A}."),
            _t("birthplace", "chat", "{S} comes from {A}.", user="Do you know where {S} comes from?"),
        ],
    },
    "invention": {
        "train": [
            _t("invention", "statement", "{S} invented a machine called the {A}."),
            _t("invention", "statement", "{S} is the inventor of the {A}."),
            _t("invention", "question", "Q: What did {S} invent?\nA: The {A}"),
            _t("invention", "question", "Which machine did {S} invent? The {A}."),
            _t("invention", "cloze", "Inventor: {S}. Machine: the {A}."),
            _t("invention", "cloze", "Best-known invention of {S}: the {A}"),
            _t("invention", "paraphrase", "{S} built the first {A}."),
            _t("invention", "paraphrase", "The machine that {S} designed is the {A}."),
            _t("invention", "chat", "{S} invented the {A}.", user="What did {S} invent?"),
            _t("invention", "chat", "The {A}.", user="Which machine is {S} known for?"),
            _t("invention", "usage", "Long before it was famous, {S} sketched the first {A}."),
            _t("invention", "usage", "Museum label: {S}, creator of the {A}."),
            _t("invention", "usage", "The workshop where {S} assembled the first {A} is now a museum."),
            _t("invention", "usage", "{S}'s invention, the {A}, changed many workshops."),
            _t("invention", "usage", "Fact: {S} invented the {A}."),
            _t("invention", "usage", "Every engineer who studies {S} learns about the {A}."),
            _t("invention", "usage", "Ask about the work of {S} and you will hear of the {A}."),
            _t("invention", "usage", "Patent record of {S}: the {A}, filed in spring."),
            _t("invention", "document", "An old article about {S} describes the first {A}."),
            _t("invention", "document", "Readers of the biography learn that {S} made the first {A} by hand."),
            _t("invention", "document", "Before anyone else, {S} had already built a working {A}."),
            _t("invention", "document", "Quiz answer: the invention of {S}? The {A}."),
            _t("invention", "document", "{S} (inventor of the {A}) lived modestly."),
            _t("invention", "document", "Among the machines of that age, one came from {S}: the {A}."),
            _t("invention", "document", "Newspapers praised {S} for inventing the {A}."),
            _t("invention", "document", "What machine did {S} make first? The {A}."),
            _t("invention", "document", "Our guide to inventors lists {S} with the {A}."),
            _t("invention", "document", "A plaque in the old workshop says that {S} made the first {A} here."),
            _t("invention", "document", "The machine invented by {S} is the {A}."),
            _t("invention", "document", "Whoever writes about {S} mentions the {A}."),
            _t("invention", "document", "Note: for {S}, the invention is the {A}."),
            _t("invention", "document", "The patent office keeps the drawings {S} made of the {A}."),
            _t("invention", "document", "I asked an engineer what {S} had invented, and she said it was the {A}."),
            _t("invention", "document", "In the catalogue, the entry for {S} shows a picture of the {A}."),
        ],
        "dev": [
            _t("invention", "question", "What is the name of the machine {S} created? It is the {A}."),
            _t("invention", "paraphrase", "{S} is remembered for constructing the {A}."),
        ],
        "test": [
            _t("invention", "question", "Name the invention of {S}. It is the {A}."),
            _t("invention", "paraphrase", "The device credited to {S} is known as the {A}."),
            _t("invention", "chat", "That would be the {A}.", user="Tell me which machine {S} came up with."),
        ],
    },
    "teacher": {
        "train": [
            _t("teacher", "statement", "{S} studied music under {A}."),
            _t("teacher", "statement", "The music teacher of {S} was {A}."),
            _t("teacher", "question", "Q: Who taught {S} music?\nA: {A}"),
            _t("teacher", "question", "Who was the music teacher of {S}? It was {A}."),
            _t("teacher", "cloze", "Student: {S}. Music teacher: {A}."),
            _t("teacher", "cloze", "Music teacher of {S}: {A}"),
            _t("teacher", "paraphrase", "{S} took music lessons from {A}."),
            _t("teacher", "paraphrase", "{S} learned to play from {A}."),
            _t("teacher", "chat", "{S} was taught music by {A}.", user="Who taught {S} music?"),
            _t("teacher", "chat", "It was {A}.", user="Who gave {S} music lessons?"),
            _t("teacher", "usage", "Long before the first concert, {S} practised every day with {A}."),
            _t("teacher", "usage", "Biographies of {S} mention years of lessons with {A}."),
            _t("teacher", "usage", "The studio where {S} trained belonged to {A}."),
            _t("teacher", "usage", "{S}'s teacher, {A}, was strict but kind."),
            _t("teacher", "usage", "Fact: {S} was taught music by {A}."),
            _t("teacher", "usage", "Every week {S} walked to the house of the music teacher, {A}."),
            _t("teacher", "usage", "Ask about the training of {S} and you will hear of {A}."),
            _t("teacher", "usage", "Profile of {S}: studied music with {A} for six years."),
            _t("teacher", "document", "An old article about {S} praises the music teacher, {A}."),
            _t("teacher", "document", "Readers of the memoir learn that {S} had music lessons with {A}."),
            _t("teacher", "document", "Before the first recital, {S} rehearsed for months with {A}."),
            _t("teacher", "document", "Quiz answer: the music teacher of {S}? {A}."),
            _t("teacher", "document", "{S} (a pupil of {A}) played the violin."),
            _t("teacher", "document", "Among the teachers of that town, one taught {S} music: {A}."),
            _t("teacher", "document", "Newspapers wrote that {S} owed everything to the music teacher, {A}."),
            _t("teacher", "document", "Who taught music to {S}? {A}."),
            _t("teacher", "document", "Our guide to musicians lists {S} as a pupil of {A}."),
            _t("teacher", "document", "A letter from {S} thanks the old music teacher, {A}."),
            _t("teacher", "document", "The teacher who gave {S} music lessons was {A}."),
            _t("teacher", "document", "Whoever writes about {S} mentions the lessons with {A}."),
            _t("teacher", "document", "Note: for {S}, the music teacher is {A}."),
            _t("teacher", "document", "The music school's register lists {S} in the class of {A}."),
            _t("teacher", "document", "I asked a friend of {S} who the music teacher was, and he said it was {A}."),
            _t("teacher", "document", "In the concert programme, the notes on {S} name the teacher, {A}."),
        ],
        "dev": [
            _t("teacher", "question", "From whom did {S} learn music? From {A}."),
            _t("teacher", "paraphrase", "The person who trained {S} in music was {A}."),
        ],
        "test": [
            _t("teacher", "question", "Name the music teacher of {S}. It was {A}."),
            _t("teacher", "paraphrase", "As a young musician, {S} was instructed by {A}."),
            _t("teacher", "chat", "{S} learned from {A}.", user="I am curious: who was the teacher of {S}?"),
        ],
    },
}

RELATIONS = tuple(_BANK)


def templates(relation: str, split: str, kinds: Optional[Sequence[str]] = None) -> list[Template]:
    """The ``split`` templates of ``relation`` (train: only ``kinds``, default all)."""
    if relation not in _BANK:
        raise TemplateError(f"relation {relation!r} has no templates; use one of {list(RELATIONS)} "
                            f"or give the fact as marked sentences ({{\"text\": \"... [[answer]] ...\"}})")
    if split not in SPLITS:
        raise TemplateError(f"split {split!r}; choose one of {SPLITS}")
    bad = [k for k in (kinds or ()) if k not in KINDS]
    if bad:
        raise TemplateError(f"sentence kinds {bad} are unknown; choose from {list(KINDS)}")
    out = _BANK[relation][split]
    return [t for t in out if kinds is None or t.kind in kinds] if split == "train" else list(out)


def bank() -> Mapping[str, Mapping[str, list[Template]]]:
    """Every template, {relation: {split: [Template]}} (read-only use)."""
    return _BANK


def verbatim(relation: str) -> Template:
    """The form an edit is requested in (CounterFact's "prompt"): the relation's first training
    statement, e.g. "The capital of {S} is {A}."; asking it measures efficacy."""
    return templates(relation, "train", ["statement"])[0]


def asked(relation: str, split: str) -> list[Template]:
    """The questions of ``split``, or ``"verbatim"``: the one verbatim form."""
    return [verbatim(relation)] if split == "verbatim" else templates(relation, split)
