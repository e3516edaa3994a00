"""Shards, dataset preparation, batching, user files, BPE training and the built-in corpus."""

from __future__ import annotations

import json
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engram.data import shards as data_mod
from engram.data.corpus import (
    SOURCES,
    CorpusError,
    Document,
    Fact,
    builtin_documents,
    corpus_stats,
    fact_records,
    read_user_files,
)
from engram.data.shards import (
    HEADER_SIZE,
    DataError,
    Shard,
    get_batch,
    iter_eval_batches,
    load_dataset,
    open_shard,
    prepare_dataset,
    split_documents,
    unigram_entropy,
    write_shard,
)
from engram.data.tokenizer import (
    TokenizerError,
    load_deepseek_tokenizer,
    load_tokenizer,
    save_tokenizer,
    special_ids,
    tokenizer_fingerprint,
    train_bpe,
)

FP = "ab" * 32
OTHER_FP = "cd" * 32


def _write(path: Path, tokens, vocab_size: int = 1000, fp: str = FP) -> Path:
    write_shard(path, np.asarray(tokens), vocab_size, fp)
    return path


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


# --------------------------------------------------------------------------- shards


@pytest.mark.parametrize("vocab_size, dtype", [(1000, np.uint16), (65536, np.uint16), (129_280, np.uint32)])
def test_shard_roundtrip(tmp_path: Path, vocab_size: int, dtype) -> None:
    tokens = np.random.default_rng(0).integers(0, vocab_size, size=5000)
    path = _write(tmp_path / "s.bin", tokens, vocab_size)
    shard = open_shard(path, expected_fingerprint=FP, expected_vocab_size=vocab_size)
    assert shard.tokens.dtype == dtype and len(shard) == 5000
    assert shard.vocab_size == vocab_size and shard.fingerprint == FP
    np.testing.assert_array_equal(shard.tokens, tokens)
    assert path.stat().st_size == HEADER_SIZE + 5000 * np.dtype(dtype).itemsize
    assert _leftovers(tmp_path) == []


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 299), max_size=200))
def test_shard_roundtrip_property(tmp_path_factory, tokens: list[int]) -> None:
    path = _write(tmp_path_factory.mktemp("p") / "s.bin", np.array(tokens, dtype=np.int64), 300)
    assert open_shard(path).tokens.tolist() == tokens


def test_bad_magic(tmp_path: Path) -> None:
    path = tmp_path / "s.bin"
    path.write_bytes(b"NOTASHARD" + bytes(200))
    with pytest.raises(DataError, match="bad magic"):
        open_shard(path)


def test_unknown_version(tmp_path: Path) -> None:
    path = _write(tmp_path / "s.bin", [1, 2, 3])
    raw = bytearray(path.read_bytes())
    struct.pack_into("<I", raw, 8, 99)
    struct.pack_into("<I", raw, 124, zlib.crc32(bytes(raw[:124])))
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="format version 99"):
        open_shard(path)


def test_corrupt_header(tmp_path: Path) -> None:
    path = _write(tmp_path / "s.bin", [1, 2, 3])
    raw = bytearray(path.read_bytes())
    raw[20] ^= 0xFF  # flips a vocab_size byte
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="checksum"):
        open_shard(path)


def test_truncated(tmp_path: Path) -> None:
    path = _write(tmp_path / "s.bin", np.arange(100))
    path.write_bytes(path.read_bytes()[:-3])
    expected, found = HEADER_SIZE + 200, HEADER_SIZE + 197
    with pytest.raises(DataError, match=f"truncated: expected {expected} bytes .* found {found}"):
        open_shard(path)
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(DataError, match="header needs 128 bytes, found 50"):
        open_shard(path)
    path.write_bytes(b"")
    with pytest.raises(DataError, match="truncated"):
        open_shard(path)


def test_fingerprint_and_vocab_mismatch(tmp_path: Path) -> None:
    path = _write(tmp_path / "s.bin", [1, 2, 3])
    with pytest.raises(DataError, match=f"different tokenizer: fingerprint {FP}, expected {OTHER_FP}.*engram data prepare"):
        open_shard(path, expected_fingerprint=OTHER_FP)
    with pytest.raises(DataError, match="vocab_size is 1000 but 4096"):
        open_shard(path, expected_vocab_size=4096)


def test_missing_shard(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no token shard"):
        open_shard(tmp_path / "nope.bin")


@pytest.mark.parametrize("bad, pos", [([1, 2, 1000, 3], 2), ([1, -5, 2], 1)])
def test_out_of_range_ids_refused(tmp_path: Path, bad: list[int], pos: int) -> None:
    path = tmp_path / "s.bin"
    with pytest.raises(DataError, match=f"token id {bad[pos]} at position {pos}"):
        _write(path, bad)
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_old_file_and_no_temp(tmp_path: Path, monkeypatch) -> None:
    path = _write(tmp_path / "s.bin", [1, 2, 3])
    before = path.read_bytes()

    def boom(*_args, **_kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        _write(path, np.arange(500))
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert _leftovers(tmp_path) == []


def test_bad_fingerprint_string(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="64 lowercase hex"):
        _write(tmp_path / "s.bin", [1], fp="xyz")


def test_empty_shard(tmp_path: Path) -> None:
    shard = open_shard(_write(tmp_path / "s.bin", np.array([], dtype=np.int64)))
    assert len(shard) == 0


# --------------------------------------------------------------------------- batching


@pytest.fixture()
def arange_shard(tmp_path: Path) -> Shard:
    return open_shard(_write(tmp_path / "s.bin", np.arange(10_000), vocab_size=10_000))


def test_get_batch_shapes_and_shift(arange_shard: Shard) -> None:
    x, y = get_batch(arange_shard, 8, 32, step=0, seed=1)
    assert x.shape == y.shape == (8, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1)  # tokens are 0..n-1, so the next token is x + 1
    assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(8, 31, dtype=torch.int64))
    assert int(y.max()) < 10_000


def test_get_batch_is_a_function_of_seed_and_step(arange_shard: Shard) -> None:
    run = [get_batch(arange_shard, 4, 16, step=s, seed=7)[0] for s in range(5)]
    resumed = [get_batch(arange_shard, 4, 16, step=s, seed=7)[0] for s in (3, 4)]
    assert torch.equal(run[3], resumed[0]) and torch.equal(run[4], resumed[1])
    assert not torch.equal(run[0], run[1])
    assert not torch.equal(run[0], get_batch(arange_shard, 4, 16, step=0, seed=8)[0])


def test_get_batch_too_short(tmp_path: Path) -> None:
    shard = open_shard(_write(tmp_path / "s.bin", np.arange(10)))
    with pytest.raises(DataError, match="fewer than seq_len"):
        get_batch(shard, 1, 10, 0, 0)
    x, _ = get_batch(shard, 3, 9, 0, 0)  # the tightest fit: one possible window
    assert x[0].tolist() == list(range(9))


def test_eval_batches_cover_all_windows(arange_shard: Shard) -> None:
    batches = list(iter_eval_batches(arange_shard, 16, 100))
    xs = torch.cat([x for x, _ in batches])
    assert xs.shape == (99, 100)  # (10_000 - 1) // 100 windows
    assert torch.equal(xs.flatten(), torch.arange(9900))  # contiguous, no overlap, no gap
    assert all(torch.equal(y, x + 1) for x, y in batches)
    assert [b[0].shape[0] for b in batches][-1] == 99 - 6 * 16  # last batch is partial


def test_eval_batches_limited_are_spread_and_deterministic(arange_shard: Shard) -> None:
    a = list(iter_eval_batches(arange_shard, 4, 100, max_batches=2))
    b = list(iter_eval_batches(arange_shard, 4, 100, max_batches=2))
    assert len(a) == 2 and all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, b))
    starts = torch.cat([x[:, 0] for x, _ in a]).tolist()
    assert starts == sorted(set(starts)) and all(s % 100 == 0 for s in starts)
    assert starts[0] == 0 and starts[-1] > 8000  # reaches the end of the shard


# --------------------------------------------------------------------------- statistics, split


def test_unigram_entropy() -> None:
    assert unigram_entropy(np.array([0, 1, 2, 3] * 10), 8) == pytest.approx(math.log(4))
    assert unigram_entropy(np.array([5, 5, 5]), 8) == 0.0
    with pytest.raises(DataError):
        unigram_entropy(np.array([9]), 8)


def _docs(n: int, source: str = "s") -> list[Document]:
    return [Document(source, f"{source}-{i}", f"document number {i} of {source}. " * 3) for i in range(n)]


def test_split_is_deterministic_and_covers_sources() -> None:
    docs = _docs(40, "a") + _docs(3, "b") + _docs(1, "c")
    train, val = split_documents(docs, 0.05, seed=0)
    assert (train, val) == split_documents(docs, 0.05, seed=0)
    assert len(train) + len(val) == len(docs) and set(train).isdisjoint(val)
    for source in ("a", "b"):
        assert any(d.source == source for d in val) and any(d.source == source for d in train)
    assert split_documents(docs, 0.05, seed=1) != (train, val)
    t2, v2 = split_documents(_docs(2), 0.01, seed=0)
    assert len(t2) == len(v2) == 1
    with pytest.raises(DataError, match="at least 2 documents"):
        split_documents(_docs(1), 0.05)


# --------------------------------------------------------------------------- tokenizers


@pytest.fixture(scope="module")
def small_texts() -> list[str]:
    words = "the quick brown fox jumps over the lazy dog while seven wizards hex jolly quails".split()
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(words, size=60)) + "." for _ in range(60)] + ["Ünïcødé ✓ 東京"]


@pytest.fixture(scope="module")
def small_bpe(small_texts: list[str]):
    return train_bpe(small_texts, 300)


def test_bpe_deterministic_and_specials(small_texts: list[str], small_bpe) -> None:
    again = train_bpe(small_texts, 300)
    assert again.to_str() == small_bpe.to_str()
    assert tokenizer_fingerprint(again) == tokenizer_fingerprint(small_bpe)
    assert special_ids(small_bpe) == (0, 1)
    assert small_bpe.get_vocab_size() == 300
    text = "A brand-new sentence, with ünseen bytes: 🙂"
    assert small_bpe.decode(small_bpe.encode(text).ids) == text  # byte-level: nothing is unknown


def test_bpe_vocab_too_small(small_texts: list[str]) -> None:
    with pytest.raises(TokenizerError, match="too small"):
        train_bpe(small_texts, 100)


def test_tokenizer_save_load(tmp_path: Path, small_bpe) -> None:
    path = tmp_path / "tok" / "tokenizer.json"
    save_tokenizer(small_bpe, path)
    assert tokenizer_fingerprint(load_tokenizer(path)) == tokenizer_fingerprint(small_bpe)
    assert tokenizer_fingerprint(load_tokenizer(path.parent)) == tokenizer_fingerprint(small_bpe)
    with pytest.raises(TokenizerError, match="no tokenizer at"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(TokenizerError, match="not valid JSON"):
        load_tokenizer(tmp_path / "bad.json")


def test_deepseek_special_ids() -> None:
    tok = load_deepseek_tokenizer()
    assert special_ids(tok) == (2, 1)  # pad "<｜▁pad▁｜>" (Engram reference pad_id), eos


# --------------------------------------------------------------------------- prepare / load


def test_prepare_and_load_dataset(tmp_path: Path, small_bpe) -> None:
    docs = _docs(30, "a") + _docs(5, "b")
    meta = prepare_dataset(tmp_path / "ds", docs, small_bpe, val_fraction=0.2, seed=3, progress=False)
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == [
        "meta.json", "tokenizer.json", "train.bin", "val.bin",
    ]
    ds = load_dataset(tmp_path / "ds")
    assert ds.meta == json.loads((tmp_path / "ds" / "meta.json").read_text()) == meta
    assert ds.pad_id == 0 and ds.eos_id == 1 and ds.vocab_size == 300
    n_train, n_val = meta["documents"]["train"], meta["documents"]["val"]
    assert n_train + n_val == 35 and n_val > 0
    assert int((ds.train.tokens == 1).sum()) == n_train  # one eos after every document
    assert int((ds.val.tokens == 1).sum()) == n_val
    assert meta["tokens"] == {"train": len(ds.train), "val": len(ds.val)}
    assert sum(meta["tokens_per_source"]["train"].values()) == len(ds.train)
    h = meta["train_unigram_entropy"]
    assert h["bits_per_token"] == pytest.approx(h["nats_per_token"] / math.log(2))
    text = ds.tokenizer.decode([int(t) for t in ds.val.tokens[:20]])
    assert "document number" in text


def test_load_dataset_detects_tokenizer_swap(tmp_path: Path, small_bpe, small_texts) -> None:
    prepare_dataset(tmp_path / "ds", _docs(10), small_bpe, progress=False)
    save_tokenizer(train_bpe(small_texts, 280), tmp_path / "ds" / "tokenizer.json")
    with pytest.raises(DataError, match="fingerprint"):
        load_dataset(tmp_path / "ds")
    with pytest.raises(DataError, match="engram data prepare"):
        load_dataset(tmp_path / "empty")


def test_prepare_builtin_user_files_only(tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps({"text": f"line {i} " * 20}) for i in range(12)))
    meta = data_mod.prepare_builtin(
        tmp_path / "ds", tokenizer="bpe", files=[tmp_path / "in.jsonl"], builtin=False, progress=False
    )
    assert meta["sources"] == ["user"] and meta["tokenizer_kind"] == "bpe"
    ds = load_dataset(tmp_path / "ds")
    # a tiny corpus runs out of merges: the vocabulary is smaller than asked for
    assert meta["vocab_size"] == ds.tokenizer.get_vocab_size() < 4096
    assert ds.val.num_tokens > 0


# --------------------------------------------------------------------------- user files


def test_read_user_files(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("hello world\n")
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "title": "T"}\n')
    docs = read_user_files([tmp_path / "a.txt", tmp_path / "b.jsonl"])
    assert [d.text for d in docs] == ["hello world\n", "one", "two"]
    assert docs[1].title == f"{tmp_path / 'b.jsonl'}:1" and docs[2].title == "T"
    assert [d.text for d in read_user_files([tmp_path])] == ["hello world\n", "one", "two"]


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"text": "ok"}\n{"text": oops}\n', r"bad\.jsonl:2: invalid JSON"),
        ('{"text": "ok"}\n{"body": "x"}\n', r'bad\.jsonl:2: expected an object with a "text" field'),
        ('{"text": 5}\n', r'bad\.jsonl:1: field "text" must be a string'),
        ('[1, 2]\n', r"bad\.jsonl:1: expected an object"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(CorpusError, match=message):
        read_user_files([tmp_path / "bad.jsonl"])


def test_user_file_errors(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="does not exist"):
        read_user_files([tmp_path / "missing.txt"])
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(CorpusError, match="unsupported file type"):
        read_user_files([tmp_path / "x.csv"])


# --------------------------------------------------------------------------- built-in corpus


@pytest.fixture(scope="module")
def corpus() -> list[Document]:
    return builtin_documents()


def test_builtin_corpus(corpus: list[Document]) -> None:
    stats = corpus_stats(corpus)
    assert set(stats) == set(SOURCES)
    assert all(s["documents"] > 0 and s["chars"] > 10_000 for s in stats.values())
    assert 5e6 < sum(s["bytes"] for s in stats.values()) < 15e6
    titles = [d.title for d in corpus]
    assert "Measure for Measure" in titles and not any(t.startswith("ACT") for t in titles)
    assert len(set(titles)) == len(titles)
    assert any("To be, or not to be" in d.text for d in corpus if d.source == "shakespeare")
    assert corpus[0].source == "shakespeare" and corpus[-1].source == "cities"
    genesis = next(d for d in corpus if d.source == "bible")
    assert "In the beginning God created the heaven and the earth." in genesis.text
    assert not any("**" in d.text or "\\[" in d.text for d in corpus if d.source == "shakespeare")


def test_builtin_corpus_is_deterministic(corpus: list[Document]) -> None:
    assert builtin_documents(["shakespeare", "countries"]) == [
        d for d in corpus if d.source in ("shakespeare", "countries")
    ]


def test_facts(corpus: list[Document]) -> None:
    facts = fact_records()
    relations = {f.relation for f in facts}
    assert {"capital", "continent", "population", "currency", "language", "area", "neighbours",
            "city_country", "city_population"} <= relations
    texts = {d.title: d.text for d in corpus}
    for f in facts:
        assert f.sentence[f.answer_start:].startswith(f.answer)
        assert f.subject in f.prompt and f.prompt.strip()
        assert f.sentence in texts[f.doc_title]
    france = {f.relation: f.answer for f in facts if f.subject == "France"}
    assert france["capital"] == "Paris" and france["continent"] == "Europe"
    # each country fact appears in two different phrasings
    capitals = [f.sentence for f in facts if f.subject == "France" and f.relation == "capital"]
    assert len(capitals) == 2 and capitals[0] != capitals[1]


def test_fact_validation() -> None:
    assert Fact("X", "r", "Y", "X is Y.").prompt == "X is "
    with pytest.raises(ValueError, match="not found"):
        Fact("X", "r", "Z", "X is Y.")
