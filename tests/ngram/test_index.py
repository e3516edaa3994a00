"""N-gram index: suffix arrays, exact counts and estimates vs brute force, deltas, files, leakage."""

from __future__ import annotations

import json
import random
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engram.ngram import LeakageError, NgramIndex, NgramIndexError, SegmentError, UnseenContextError, build_suffix_array
from engram.ngram import suffix_array as sam
from engram.ngram.segment import HEADER_SIZE, open_segment

FP = "ab" * 32
EOS = 1
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def streams(max_len: int = 40, vocab: int = 6):
    """Token lists over a small alphabet (many repeats) with eos sprinkled in."""
    return st.lists(st.integers(1, vocab - 1), min_size=1, max_size=max_len)


def _build(tmp: Path, tokens, vocab: int = 6, **kw) -> NgramIndex:
    return NgramIndex.build(tmp, np.asarray(tokens), vocab_size=vocab, eos_id=EOS, fingerprint=FP,
                            stats_order=4, progress=False, overwrite=True, **kw)


def _fresh(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("idx")


# ----------------------------------------------------------------------------- suffix arrays
@given(st.lists(st.integers(0, 4), max_size=80))
@settings(max_examples=150, deadline=None)
def test_suffix_array_matches_sorted_suffixes(tokens):
    t = np.asarray(tokens, dtype=np.uint16)
    expected = sorted(range(len(tokens)), key=lambda i: tokens[i:])
    assert build_suffix_array(t).tolist() == expected


@given(st.lists(st.integers(0, 300), max_size=60))
@settings(max_examples=100, deadline=None)
def test_suffix_array_methods_agree(tokens):
    """divsufsort over the ids' big-endian bytes gives the reference (prefix doubling) order."""
    t = np.asarray(tokens, dtype=np.uint16)
    ref = build_suffix_array(t, method="doubling")
    assert ref.tolist() == sorted(range(len(tokens)), key=lambda i: tokens[i:])
    if sam._divsufsort is not None:
        got = build_suffix_array(t, method="divsufsort")
        assert got.dtype == ref.dtype and got.tolist() == ref.tolist()


@pytest.mark.parametrize("method", ["auto", "doubling"])
def test_suffix_array_large_vocab_and_long_repeats(method):
    rng = np.random.default_rng(0)
    t = rng.integers(0, 70_000, 3000).astype(np.uint32)  # ids above 65535: 4 bytes per id for divsufsort
    t[1000:2000] = t[0:1000]  # a 1000-token repeat forces many doubling rounds
    sa = build_suffix_array(t, method=method)
    s = [tuple(t[i:].tolist()) for i in sa[:: 50]]
    assert s == sorted(s)
    assert sorted(sa.tolist()) == list(range(t.size))
    if method == "auto":
        assert sa.tolist() == build_suffix_array(t, method="doubling").tolist()


def test_suffix_array_method_is_checked():
    with pytest.raises(sam.SuffixArrayError, match="method='quick'"):
        build_suffix_array(np.arange(4), method="quick")


@pytest.mark.skipif(not sam.NATIVE_KERNEL_AVAILABLE, reason="native kernel not built")
@given(streams(80, vocab=5), st.integers(1, 7))
@settings(max_examples=120, deadline=None)
def test_count_of_counts_native_matches_reference(ref, tokens, order):
    from engram.ngram.segment import count_of_counts, count_of_counts_py

    t = np.asarray(ref.normalise(tokens, EOS), dtype=np.uint16)
    sa = build_suffix_array(t)
    assert count_of_counts(t, sa, EOS, order, native=True) == count_of_counts_py(t, sa, EOS, order)


@pytest.mark.skipif(not sam.NATIVE_KERNEL_AVAILABLE, reason="native kernel not built")
@given(streams(50), st.lists(st.integers(0, 5), min_size=1, max_size=24), st.integers(0, 5))
@settings(max_examples=120, deadline=None)
def test_native_kernel_matches_reference(tokens, row, kmax):
    t = np.asarray(tokens, dtype=np.uint16)
    sa = build_suffix_array(t)
    x = np.asarray([row], dtype=np.int64)
    for q in (row[:1], row[:2], row[:3], []):
        assert sam.find(t, sa, q, native=True) == sam.find_py(t, sa, q)
    assert (sam.window_ranges(t, sa, x, EOS, kmax, native=True) == sam.window_ranges_py(t, sa, x, EOS, kmax)).all()
    assert (sam.window_infgram(t, sa, x, EOS, native=True) == sam.window_infgram_py(t, sa, x, EOS)).all()


@given(streams(60), st.integers(0, 6))
@settings(max_examples=80, deadline=None)
def test_capped_lcp_native_matches_reference(tokens, cap):
    t = np.asarray(tokens, dtype=np.uint16)
    sa = build_suffix_array(t)
    want = [min(cap, next((j for j in range(len(tokens)) if tokens[a + j:a + j + 1] != tokens[b + j:b + j + 1]
                           or a + j >= len(tokens) or b + j >= len(tokens)), len(tokens)))
            for a, b in zip(sa[:-1], sa[1:])]
    assert sam.lcp_capped_py(t, sa, cap).tolist() == want
    assert sam.lcp_capped(t, sa, cap).tolist() == want


@given(streams(60, vocab=5))
@settings(max_examples=80, deadline=None)
def test_kn_statistics_match_brute_force(ref, tokens):
    """Count-of-counts (raw and continuation) feeding the discounts, vs a direct count."""
    from collections import Counter

    from engram.ngram.segment import count_of_counts

    t = ref.normalise(tokens, EOS)
    got = count_of_counts(np.asarray(t, dtype=np.uint16), build_suffix_array(np.asarray(t)), EOS, 4)
    n = len(t)
    for k in range(1, 5):
        raw = Counter(tuple(t[p:p + k]) for p in range(n - k + 1) if EOS not in t[p + 1:p + k - 1])
        pairs = {(tuple(t[p + 1:p + k + 1]), t[p]) for p in range(n - k) if EOS not in t[p + 1:p + k]}
        cont = Counter(g for g, _ in pairs)
        assert got["raw"][k - 1] == [list(raw.values()).count(c) for c in (1, 2, 3, 4)]
        assert got["cont"][k - 1] == [list(cont.values()).count(c) for c in (1, 2, 3, 4)]


# ----------------------------------------------------------------------------- exactness vs brute force
@given(a=streams(), b=streams(25), data=st.data())
@settings(max_examples=60, **SETTINGS)
def test_counts_and_estimates_match_brute_force(ref, tmp_path_factory, a, b, data):
    """count, ntd, infgram and KN (every order) of base + delta equal a brute-force rescan."""
    V = 6
    idx = _build(_fresh(tmp_path_factory), a, V)
    idx.add(np.asarray(b), name="d")
    S = [ref.normalise(a, EOS), ref.normalise(b, EOS)]
    disc = lambda o, k: idx.discounts(o, k).as_tuple()  # noqa: E731
    for _ in range(4):
        ctx = data.draw(st.lists(st.integers(0, V - 1), max_size=6))
        if ctx:
            assert idx.count(ctx) == ref.count(S, ctx)  # raw counts: eos and all
        r = idx.infgram_ntd(ctx)
        p, L = ref.infgram(S, ctx, EOS, V)
        assert r.suffix_len == L and torch.allclose(r.dist, torch.from_numpy(p))
        assert abs(float(r.dist.sum()) - 1) < 1e-12
        cut = ref.cut(ctx, EOS)
        expected = ref.next_counts(S, cut)
        if sum(expected.values()):
            assert torch.allclose(idx.ntd(ctx), torch.from_numpy(ref.dense(expected, V) / sum(expected.values())))
        else:
            with pytest.raises(UnseenContextError):
                idx.ntd(ctx)
        for order in (1, 2, 3, 4):
            got = idx.kn_ntd(ctx, order=order)
            want = ref.kn(S, ctx, EOS, V, order, disc)
            assert torch.allclose(got, torch.from_numpy(want), atol=1e-9)
            assert abs(float(got.sum()) - 1) < 1e-9 and bool((got > 0).all())


@given(a=streams(60), rows=st.lists(st.lists(st.integers(0, 5), min_size=6, max_size=6), min_size=1, max_size=3))
@settings(max_examples=40, **SETTINGS)
def test_batch_matches_single_queries_and_sums_to_one(tmp_path_factory, a, rows):
    idx = _build(_fresh(tmp_path_factory), a)
    x = np.asarray(rows)
    b = idx.batch(x, kn_order=3, dtype=torch.float64)
    assert torch.allclose(b.infgram.sum(-1), torch.ones(x.shape, dtype=torch.float64))
    assert torch.allclose(b.kn.sum(-1), torch.ones(x.shape, dtype=torch.float64))
    for i in range(x.shape[0]):
        for t in range(x.shape[1]):
            r = idx.infgram_ntd(x[i, : t + 1])
            assert int(b.suffix_len[i, t]) == r.suffix_len and int(b.count[i, t]) == r.count
            assert torch.allclose(b.infgram[i, t], r.dist)
            assert torch.allclose(b.kn[i, t], idx.kn_ntd(x[i, : t + 1], order=3), atol=1e-9)


@given(a=streams(60), row=st.lists(st.integers(0, 5), min_size=4, max_size=12), data=st.data())
@settings(max_examples=40, **SETTINGS)
def test_no_leakage_estimate_ignores_the_target_and_everything_after(tmp_path_factory, a, row, data):
    """The estimate for target x[t+1] is a function of x[:t+1] only."""
    idx = _build(_fresh(tmp_path_factory), a)
    x = np.asarray([row])
    t = data.draw(st.integers(0, len(row) - 2))
    y = x.copy()
    y[0, t + 1:] = data.draw(st.lists(st.integers(0, 5), min_size=len(row) - t - 1, max_size=len(row) - t - 1))
    bx, by = idx.batch(x, kn_order=4), idx.batch(y, kn_order=4)
    assert torch.equal(bx.infgram[0, : t + 1], by.infgram[0, : t + 1])
    assert torch.equal(bx.kn[0, : t + 1], by.kn[0, : t + 1])
    assert torch.equal(bx.suffix_len[0, : t + 1], by.suffix_len[0, : t + 1])


def test_large_vocabulary_uint32_ids(tmp_path, ref):
    V = 70_000
    rng = np.random.default_rng(1)
    toks = rng.choice([2, 3, 65_536, 69_999, EOS], size=400)
    idx = NgramIndex.build(tmp_path, toks, vocab_size=V, eos_id=EOS, fingerprint=FP, stats_order=3, progress=False)
    assert idx.segments[0].tokens.dtype == np.dtype("<u4")
    S = [ref.normalise(toks.tolist(), EOS)]
    for q in ([65_536], [69_999, 65_536], [2, 69_999, 3]):
        assert idx.count(q) == ref.count(S, q)
    p = idx.kn_ntd([3, 69_999], order=3)
    assert p.shape == (V,) and abs(float(p.sum()) - 1) < 1e-9
    assert torch.allclose(idx.infgram_ntd([3, 69_999]).dist, torch.from_numpy(ref.infgram(S, [3, 69_999], EOS, V)[0]))


# ----------------------------------------------------------------------------- updates
def _snapshot(idx: NgramIndex, ctxs) -> list:
    return [(idx.infgram_ntd(c).dist, idx.kn_ntd(c, order=3), idx.count(c)) for c in ctxs]


def test_add_remove_compact(tmp_path, ref):
    rng = random.Random(0)
    a = [rng.choice([2, 3, 4, 5, EOS]) for _ in range(300)] + [2]  # ends inside a document
    b = [5, 5, 4, 3, 2, 2, EOS, 4, 4, 4, 4, 5, 2]
    idx = _build(tmp_path, a)
    ctxs = [[2, 3], [5, 5, 4], [4, 4, 4], [3], [2, 2, 2, 2, 2]]
    before = _snapshot(idx, ctxs)
    info = idx.add(np.asarray(b), name="news")
    assert idx.deltas == ["news"] and info.documents == 2
    assert idx.count([5, 5, 4, 3]) == ref.count([ref.normalise(a, EOS), ref.normalise(b, EOS)], [5, 5, 4, 3])
    # a reopened index sees the delta (the manifest is on disk)
    assert NgramIndex.open(tmp_path).count([5, 5, 4, 3]) == idx.count([5, 5, 4, 3])
    with pytest.raises(NgramIndexError, match="already has a segment"):
        idx.add(np.asarray(b), name="news")
    # delta merged at query time == one index over both streams (discounts aside, so not KN)
    joined = _build(tmp_path / "joined", a + [EOS] + b)  # one stream, same documents
    for c in ctxs:
        assert torch.equal(idx.infgram_ntd(c).dist, joined.infgram_ntd(c).dist)
    idx.remove("news")
    assert not (tmp_path / info.file).exists()
    after = _snapshot(idx, ctxs)
    for (p0, k0, c0), (p1, k1, c1) in zip(before, after):  # removal restores exactly
        assert torch.equal(p0, p1) and torch.equal(k0, k1) and c0 == c1
    with pytest.raises(NgramIndexError, match="no segment"):
        idx.remove("news")
    idx.add(np.asarray(b), name="news")
    merged = _snapshot(idx, ctxs)
    idx.compact(progress=False)
    assert len(idx.segments) == 1 and idx.deltas == []
    for (p0, _, c0), (p1, _, c1) in zip(merged, _snapshot(idx, ctxs)):
        assert torch.equal(p0, p1) and c0 == c1  # eos-free counts and estimates are unchanged
    assert sorted(p.name for p in tmp_path.glob("*.ngs")) == [idx.manifest["segments"][0]["file"]]


def test_add_texts_uses_the_index_tokenizer(tmp_path):
    from engram.data.tokenizer import tokenizer_fingerprint, train_bpe

    texts = ["the cat sat on the mat"] * 20 + ["a dog ran far away"] * 20
    tok = train_bpe(texts, 300)
    eos = tok.token_to_id("<|eos|>")
    ids = [i for t in texts for i in tok.encode(t).ids + [eos]]
    idx = NgramIndex.build(tmp_path, ids, vocab_size=tok.get_vocab_size(), eos_id=eos,
                           fingerprint=tokenizer_fingerprint(tok), tokenizer=tok, progress=False)
    q = tok.encode(" zebra").ids
    assert idx.count(q) == 0
    idx.add_texts(["a zebra sat on the mat"], name="z")
    assert idx.count(q) == 1


# ----------------------------------------------------------------------------- files
def test_segment_file_integrity(tmp_path):
    idx = _build(tmp_path, [2, 3, 4, 2, 3, EOS, 4, 4])
    path = idx.segments[0].path
    raw = bytearray(path.read_bytes())
    assert raw[:8] == b"ENGRAMNG" and struct.unpack_from("<I", raw, 124)[0] == zlib.crc32(bytes(raw[:124]))
    assert not list(tmp_path.glob(".*tmp"))  # atomic writes leave no temp files
    bad = tmp_path / "bad.ngs"
    for offset, what in ((30, "corrupt header"), (HEADER_SIZE + 2, "payload checksum")):
        b = bytearray(raw)
        b[offset] ^= 0xFF
        bad.write_bytes(bytes(b))
        with pytest.raises(SegmentError, match=what):
            open_segment(bad)
    bad.write_bytes(bytes(raw[:-3]))
    with pytest.raises(SegmentError, match="truncated"):
        open_segment(bad)
    bad.write_bytes(b"NOTANIDX" + bytes(raw[8:]))
    with pytest.raises(SegmentError, match="not an engram N-gram segment"):
        open_segment(bad)
    with pytest.raises(SegmentError, match="tokenizer"):
        open_segment(path, expected_fingerprint="cd" * 32)
    m = json.loads((tmp_path / "manifest.json").read_text())
    m["format_version"] = 99
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(NgramIndexError, match="format version 99"):
        NgramIndex.open(tmp_path)
    with pytest.raises(NgramIndexError, match="manifest.json missing"):
        NgramIndex.open(tmp_path / "nowhere")


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(SegmentError, match="outside"):
        _build(tmp_path, [2, 9])
    idx = _build(tmp_path, [2, 3, 4])
    with pytest.raises(NgramIndexError, match="outside the index vocabulary"):
        idx.count([7])
    with pytest.raises(NgramIndexError, match="stats_order"):
        idx.kn_ntd([2], order=9)
    with pytest.raises(NgramIndexError, match="already holds"):
        NgramIndex.build(tmp_path, [2], vocab_size=6, eos_id=EOS, fingerprint=FP, progress=False)


# ----------------------------------------------------------------------------- leakage guard
def test_leakage_guard_refuses_indexed_text(tmp_path):
    rng = np.random.default_rng(0)
    train = rng.integers(2, 50, 5000)
    held = rng.integers(2, 50, 2000)
    idx = NgramIndex.build(tmp_path, train, vocab_size=50, eos_id=EOS, fingerprint=FP, stats_order=2, progress=False)
    assert idx.check_not_indexed(held, "held-out") < 0.05
    with pytest.raises(LeakageError, match="segment 'base-g1'"):
        idx.check_not_indexed(train, "train")
    # indexing the held-out text (with other document boundaries) makes it leak too
    idx.add(np.concatenate([held[:700], [EOS], held[700:]]), name="oops")
    with pytest.raises(LeakageError, match="sampled 32-grams"):
        idx.check_not_indexed(held, "held-out")


@given(train=streams(60, 4), query=streams(20, 4))
@settings(max_examples=40, **SETTINGS)
def test_longest_match_is_the_longest_window_found_in_the_index(tmp_path_factory, train, query):
    idx = _build(_fresh(tmp_path_factory), train, vocab=4)
    found = [(j - i, i) for i in range(len(query)) for j in range(i + 1, len(query) + 1)
             if idx.count(query[i:j]) > 0]
    length, start = idx.longest_match(query)
    assert length == max((n for n, _ in found), default=0)
    if length:
        assert idx.count(query[start:start + length]) > 0


@pytest.mark.slow
def test_counts_and_ntd_match_the_infinigram_package(tmp_path):
    """Same token stream through the PyPI infini-gram engine: identical counts and continuations."""
    pytest.importorskip("infini_gram")
    import subprocess
    import sys

    from infini_gram.engine import InfiniGramEngine

    from engram.bench.ngram import _write_infinigram_input

    rng = np.random.default_rng(0)
    toks = rng.choice(np.arange(2, 40), size=20_000, p=np.r_[[0.3], np.full(37, 0.7 / 37)])
    toks[rng.random(toks.size) < 0.01] = EOS
    idx = NgramIndex.build(tmp_path / "ours", toks, vocab_size=40, eos_id=EOS, fingerprint=FP, progress=False)
    _write_infinigram_input(toks, EOS, tmp_path / "ig")
    (tmp_path / "raw").mkdir()
    subprocess.run([sys.executable, "-m", "infini_gram.indexing", "--data_dir", str(tmp_path / "raw"),
                    "--save_dir", str(tmp_path / "ig"), "--token_dtype", "u16", "--cpus", "1", "--mem", "1",
                    "--ulimit", "1024"], check=True, capture_output=True)
    eng = InfiniGramEngine(index_dir=str(tmp_path / "ig"), eos_token_id=EOS, vocab_size=40, token_dtype="u16")
    for _ in range(300):
        q = rng.choice(np.arange(2, 40), size=rng.integers(1, 5)).tolist()
        assert idx.count(q) == eng.count(q)["count"]
        if idx.count(q):
            theirs = eng.ntd(q, max_support=10**9)["result_by_token_id"]
            mine = idx.ntd(q) * idx.prob(q, 2)[2]  # back to counts
            for tok, v in theirs.items():
                if tok != EOS and tok < 40:
                    assert round(float(mine[tok])) == v["cont_cnt"]
