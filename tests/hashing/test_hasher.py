"""N-gram hashing: conformance with DeepSeek's reference, agreement of the three paths,
incremental hashing, input errors and the fingerprint."""

from __future__ import annotations

import ctypes
import ctypes.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engram.bench.hash import bench_hash
from engram.config import EngramConfig
from engram.errors import EngramError
from engram.hashing import hasher as hashing
from engram.hashing.hasher import NgramHasher
from engram.hashing.primes import find_table_sizes, is_prime

needs_native = pytest.mark.skipif(not hashing.NATIVE_KERNEL_AVAILABLE,
                                  reason="native kernel not built (no C compiler at install time)")
BACKENDS = ["torch"] + (["native"] if hashing.NATIVE_KERNEL_AVAILABLE else [])


def make_cfg(**kw) -> EngramConfig:
    """EngramConfig whose embedding width always divides by the head count (irrelevant to hashing).
    Read like a config file, so the conformance cases' DeepSeek key ``engram_vocab_size`` works."""
    kw.setdefault("n_embed_per_ngram", 16 * kw.get("n_head_per_ngram", 8))
    return EngramConfig.from_dict(kw)


def as_lists(out: dict) -> dict[str, list]:
    return {str(k): (v.cpu().numpy() if isinstance(v, torch.Tensor) else v).tolist()
            for k, v in out.items()}


# ----------------------------------------------------------------------------- conformance
def _case_hasher(case: dict, conformance_dir: Path) -> NgramHasher:
    c = dict(case["config"])
    vocab = c.pop("tokenizer_vocab_size")
    c.pop("compressed_vocab_size")
    if "compression_lookup" in case:
        lookup = np.asarray(case["compression_lookup"], dtype=np.int64)
    elif case.get("compression_lookup_note", "identity") != "identity":
        lookup = np.load(conformance_dir / case["compression_lookup_note"], allow_pickle=False)
    else:
        lookup = None
    return NgramHasher(make_cfg(**c), vocab, lookup)


@pytest.fixture(scope="module")
def cases(conformance_dir) -> list[dict]:
    return json.loads((conformance_dir / "hash_vectors.json").read_text())["cases"]


@pytest.mark.parametrize("index", [0, 1, 2])
def test_conformance_case(cases, index, conformance_dir):
    case = cases[index]
    hasher = _case_hasher(case, conformance_dir)
    assert hasher.compressed_vocab_size == case["config"]["compressed_vocab_size"]
    assert hasher.compressed_pad_id == case["compressed_pad_id"]
    assert as_lists(hasher.layer_multipliers) == case["layer_multipliers"]
    assert {str(k): v for k, v in hasher.table_sizes.items()} == case["table_sizes"]
    assert {str(k): v for k, v in find_table_sizes(hasher.cfg).items()} == case["table_sizes"]

    ids = np.asarray(case["input_ids"], dtype=np.int64)
    assert hasher.compress(ids).tolist() == case["compressed_ids"]
    assert hasher.compress(torch.from_numpy(ids)).tolist() == case["compressed_ids"]
    assert as_lists(hasher.hash_reference(ids)) == case["hash_ids"]
    for backend in BACKENDS:
        assert as_lists(hasher.hash(torch.from_numpy(ids), backend=backend)) == case["hash_ids"], backend
    assert as_lists(hasher.hash(ids)) == case["hash_ids"]  # numpy input, auto backend


def test_conformance_has_three_cases(cases):
    assert len(cases) == 3


# ----------------------------------------------------------------------------- primes
def test_is_prime_matches_sieve():
    n = 20000
    sieve = np.ones(n, dtype=bool)
    sieve[:2] = False
    for i in range(2, int(n ** 0.5) + 1):
        if sieve[i]:
            sieve[i * i::i] = False
    assert [i for i in range(n) if is_prime(i)] == np.flatnonzero(sieve).tolist()


def test_is_prime_large():
    assert is_prime(2 ** 61 - 1) and is_prime(2 ** 64 - 59) and is_prime(646403)
    # Carmichael numbers and a strong pseudoprime to several bases
    for composite in (561, 41041, 3215031751, 2 ** 64 - 1, 3825123056546413051):
        assert not is_prime(composite)


def test_table_sizes_distinct_and_above_targets():
    cfg = make_cfg(rows_per_head=(211, 211, 212), max_ngram_size=4, n_head_per_ngram=5,
                   layer_ids=(0, 2, 9))
    sizes = find_table_sizes(cfg)
    flat = [p for layer in sizes.values() for order in layer for p in order]
    assert len(flat) == len(set(flat)) == 3 * 3 * 5
    assert all(is_prime(p) for p in flat)
    # the search starts at target - 1 (a prime target is taken) and skips primes already used
    assert sizes[0] == [[211, 223, 227, 229, 233], [239, 241, 251, 257, 263],
                        [269, 271, 277, 281, 283]]
    assert sizes[2][0][0] == 293


def test_head_sizes_order_major():
    h = NgramHasher(make_cfg(rows_per_head=(100, 200), n_head_per_ngram=2, layer_ids=(3,)), 50)
    assert h.head_sizes(3) == [101, 103, 211, 223]
    with pytest.raises(ValueError, match="layer_id=4"):
        h.head_sizes(4)


def test_head_offsets_are_where_each_head_starts_everywhere():
    from types import SimpleNamespace

    from engram.config import preset
    from engram.model.lm import EngramLM
    from engram.tables.access import iter_row_batches, table_rows

    h = NgramHasher(make_cfg(rows_per_head=(100, 200), n_head_per_ngram=2, layer_ids=(3,)), 50)
    assert h.head_offsets(3) == [0, 101, 204, 415] and hashing.head_offsets([]) == []
    model = EngramLM(preset("tiny", 300))
    ids = torch.randint(0, 300, (1, 12))
    shard = SimpleNamespace(tokens=np.append(ids[0].numpy(), 0), num_tokens=13)  # one window + target
    streamed = next(iter_row_batches(model.hasher, shard, 1, 12))
    for layer in model.engram_layers:  # the layer's lookup and the access statistics agree
        offs = model.hasher.head_offsets(layer.layer_id)
        assert layer.multi_head_embedding.offsets.tolist() == offs
        want = model.hasher.hash(ids)[layer.layer_id] + torch.tensor(offs)
        assert torch.equal(table_rows(model, ids)[layer.layer_id], want)
        assert torch.equal(streamed[layer.layer_id], want.reshape(-1))


# ----------------------------------------------------------------------------- agreement
@needs_native
@given(x=st.lists(st.integers(0, 2 ** 63 - 1), min_size=1, max_size=16),
       p=st.lists(st.one_of(st.sampled_from([1, 2, 3, 211, 646403, 2 ** 31 - 1, 2 ** 62 + 1,
                                             2 ** 63 - 1]),
                            st.integers(1, 2 ** 63 - 1)), min_size=1, max_size=4))
@settings(max_examples=200, deadline=None)
def test_native_modulo_exact(x, p):
    # One position per row with a 1-token history h: mix = id * 2 ^ h * 1. With id = x >> 1 and
    # h = x & 1 the mix is x itself, so the kernel's Barrett reduction is checked against
    # Python's % on any 63-bit value.
    xs = np.array(x, dtype=np.int64)
    out = np.empty((1, len(x), 1, len(p)), dtype=np.int64)
    bad = hashing._native.hash_ids((xs >> 1)[:, None], None, 2 ** 62, 0, (xs & 1)[:, None],
                                   np.array([[2, 1]], np.int64), np.array([[p]], np.int64), out)
    assert bad == -1
    assert out[0, :, 0].tolist() == [[v % q for q in p] for v in x]


@st.composite
def hasher_and_ids(draw):
    max_n = draw(st.integers(2, 5))
    sizes = tuple(draw(st.one_of(st.sampled_from([2, 3, 211, 307, 646400]), st.integers(2, 5000)))
                  for _ in range(max_n - 1))
    layers = draw(st.lists(st.integers(0, 30), min_size=1, max_size=3, unique=True))
    vocab = draw(st.one_of(st.integers(1, 3000), st.sampled_from([129280, 2 ** 31, 2 ** 62])))
    pad = draw(st.integers(0, vocab - 1))
    compression = None
    if vocab <= 3000 and draw(st.booleans()):
        # a small compressed vocab means huge multipliers: mixes close to 2^63
        n_new = draw(st.integers(1, vocab))
        compression = np.random.default_rng(draw(st.integers(0, 2 ** 32))).integers(0, n_new, vocab)
    cfg = make_cfg(rows_per_head=sizes, max_ngram_size=max_n,
                   n_head_per_ngram=draw(st.integers(1, 4)), layer_ids=tuple(layers), pad_id=pad,
                   seed=draw(st.integers(0, 2 ** 20)), use_compression=compression is not None)
    B, T = draw(st.integers(1, 3)), draw(st.integers(0, 24))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32)))
    ids = rng.integers(0, vocab, size=(B, T), dtype=np.int64)
    if T:  # the edges of the vocabulary
        ids[0, 0], ids[-1, -1] = vocab - 1, 0
    return NgramHasher(cfg, vocab, compression), ids


@given(hasher_and_ids())
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_paths_agree(case):
    hasher, ids = case
    want = as_lists(hasher.hash_reference(ids))
    assert hasher.id_dtype == torch.int32  # every table here is far below 2^31 rows
    for backend in BACKENDS:
        for dtype in (None, torch.int64):  # default int32 ids and the wide form: same values
            got = hasher.hash(torch.from_numpy(ids), backend=backend, dtype=dtype)
            for layer_id, t in got.items():
                assert t.dtype == (dtype or torch.int32) and t.shape == (*ids.shape, hasher.num_heads)
                assert (t >= 0).all() and (t < torch.tensor(hasher.head_sizes(layer_id))).all()
            assert as_lists(got) == want, (backend, dtype)
            # into a caller's buffer (filled with junk first): the same ids, as views of that buffer
            out = hasher.empty_output(*ids.shape, dtype=dtype).fill_(-7)
            into = hasher.hash(torch.from_numpy(ids), backend=backend, out=out)
            assert as_lists(into) == want, (backend, dtype, "out=")
            for i, layer_id in enumerate(hasher.cfg.layer_ids):
                assert into[layer_id].data_ptr() == out[i].data_ptr()


@given(hasher_and_ids())
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_hash_step_matches_batch(case):
    hasher, ids = case
    full = hasher.hash(torch.from_numpy(ids), backend="torch")
    ids_t = torch.from_numpy(ids)
    for backend in BACKENDS:
        state = hasher.init_state(ids.shape[0])
        for t in range(ids.shape[1]):
            step, state = hasher.hash_step(state, ids_t[:, t], backend=backend)
            for layer_id, v in step.items():
                assert torch.equal(v, full[layer_id][:, t]), (backend, t)
            assert torch.equal(state, hasher.state_from_ids(ids_t[:, :t + 1]))


def test_prompt_then_steps_matches_full():
    hasher = NgramHasher(make_cfg(rows_per_head=(211, 307, 401), max_ngram_size=4,
                                  n_head_per_ngram=2, layer_ids=(0, 1), pad_id=1), 500,
                         np.arange(500) // 3)
    ids = torch.randint(0, 500, (3, 12), generator=torch.Generator().manual_seed(0))
    full = hasher.hash(ids)
    state = hasher.state_from_ids(ids[:, :5])
    assert state.shape == (3, 3)
    for t in range(5, 12):
        step, state = hasher.hash_step(state, ids[:, t])
        for layer_id in full:
            assert torch.equal(step[layer_id], full[layer_id][:, t])
    # a prompt shorter than the history keeps pad in front
    short = hasher.state_from_ids(ids[:, :1])
    assert short[:, :2].eq(hasher.compressed_pad_id).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    hasher = NgramHasher(make_cfg(), 129280, np.arange(129280) // 2)
    ids = torch.randint(0, 129280, (4, 300))
    cpu = hasher.hash(ids)
    gpu = hasher.hash(ids.cuda())
    for layer_id in cpu:
        assert gpu[layer_id].is_cuda and torch.equal(gpu[layer_id].cpu(), cpu[layer_id])
    state = hasher.init_state(4, device="cuda")
    step, state = hasher.hash_step(state, ids[:, 0].cuda())
    assert state.is_cuda and torch.equal(step[1].cpu(), cpu[1][:, 0])


def test_numpy_input_and_dtypes():
    hasher = NgramHasher(make_cfg(rows_per_head=(211, 307), n_head_per_ngram=2), 1000)
    ids = np.random.default_rng(0).integers(0, 1000, (2, 9))
    want = hasher.hash(torch.from_numpy(ids))
    for variant in (ids.astype(np.int32), ids.astype(np.uint16), ids.T.copy().T, ids.tolist()):
        got = hasher.hash(variant)
        assert all(torch.equal(got[k], want[k]) for k in want)
    readonly = ids.copy()
    readonly.setflags(write=False)
    assert torch.equal(hasher.hash(readonly)[1], want[1])
    assert torch.equal(hasher.hash(torch.from_numpy(ids).int())[15], want[15])


@needs_native
@given(x=st.lists(st.integers(0, 2 ** 63 - 1), min_size=1, max_size=16),
       p=st.lists(st.one_of(st.sampled_from([1, 2, 211, 646403, 2 ** 31 - 1]), st.integers(1, 2 ** 31 - 1)),
                  min_size=1, max_size=4))
@settings(max_examples=100, deadline=None)
def test_native_int32_output_exact(x, p):
    # As test_native_modulo_exact, written as int32: the narrow store must not truncate.
    xs = np.array(x, dtype=np.int64)
    out = np.full((1, len(x), 1, len(p)), -1, dtype=np.int32)
    bad = hashing._native.hash_ids((xs >> 1)[:, None], None, 2 ** 62, 0, (xs & 1)[:, None],
                                   np.array([[2, 1]], np.int64), np.array([[p]], np.int64), out)
    assert bad == -1
    assert out[0, :, 0].tolist() == [[v % q for q in p] for v in x]


@needs_native
@given(ids=st.lists(st.integers(0, 2 ** 62 - 1), min_size=1, max_size=16), hist=st.integers(0, 1),
       p=st.lists(st.one_of(st.sampled_from([65536 + 3, 646403, 2 ** 31 - 1]), st.integers(2 ** 16, 2 ** 31 - 1)),
                  min_size=8, max_size=8))
@settings(max_examples=150, deadline=None)
def test_native_vector_path_exact(ids, hist, p):
    # Eight heads of int32 ids with every table >= 2^16 rows take the AVX-512 path where the CPU
    # has it (hashing._native.AVX512); simd=2 takes the AVX2 one on any CPU with it (hashing._native.AVX2).
    # mix = 4 id ^ h spans all of [0, 2^64): the whole range of the double-precision quotient must
    # give x mod p exactly, as the scalar path does.
    xs = np.array(ids, dtype=np.int64)[:, None]
    prefix = np.full((len(ids), 1), hist, dtype=np.int64)
    args = (xs, None, 2 ** 62, 0, prefix, np.array([[4, 1]], np.int64), np.array([[p]], np.int64))
    want = [[((4 * i) % 2 ** 64 ^ hist) % q for q in p] for i in ids]
    for simd in (1, 2, 0):
        out = np.full((1, len(ids), 1, 8), -1, dtype=np.int32)
        assert hashing._native.hash_ids(*args, out, simd) == -1
        assert out[0, :, 0].tolist() == want, simd
    with pytest.raises(ValueError, match="simd=3"):
        hashing._native.hash_ids(*args, np.empty((1, len(ids), 1, 8), dtype=np.int32), 3)


# The x86 rounding-mode values of fesetround (glibc): to nearest, down, up, toward zero.
_ROUNDING = {"nearest": 0x000, "down": 0x400, "up": 0x800, "zero": 0xC00}


@needs_native
@given(ids=st.lists(st.integers(0, 2 ** 62 - 1), min_size=1, max_size=16), hist=st.integers(0, 1),
       p=st.lists(st.one_of(st.sampled_from([65536 + 3, 646403, 2 ** 30 - 1, 2 ** 30 - 35]),
                            st.integers(2 ** 16, 2 ** 30 - 1)), min_size=8, max_size=8),
       mode=st.sampled_from(sorted(_ROUNDING)))
@settings(max_examples=150, deadline=None)
def test_native_avx2_path_exact_under_every_rounding_mode(ids, hist, p, mode):
    # Tables below 2^30 rows take the AVX2 path (simd=2, or the default on a CPU without
    # AVX-512), whose quotient is rounded by the CPU's current mode: any mode must give x mod p.
    libm = ctypes.CDLL(ctypes.util.find_library("m"))
    xs = np.array(ids, dtype=np.int64)[:, None]
    prefix = np.full((len(ids), 1), hist, dtype=np.int64)
    want = [[((4 * i) % 2 ** 64 ^ hist) % q for q in p] for i in ids]
    out = np.full((1, len(ids), 1, 8), -1, dtype=np.int32)
    assert libm.fesetround(_ROUNDING[mode]) == 0
    try:
        bad = hashing._native.hash_ids(xs, None, 2 ** 62, 0, prefix, np.array([[4, 1]], np.int64),
                                       np.array([[p]], np.int64), out, 2)
    finally:
        libm.fesetround(_ROUNDING["nearest"])
    assert bad == -1 and out[0, :, 0].tolist() == want, mode


@needs_native
def test_native_int32_output_refuses_wide_tables():
    xs = np.zeros((1, 1), dtype=np.int64)
    out = np.empty((1, 1, 1, 1), dtype=np.int32)
    with pytest.raises(ValueError, match="int64 out array"):
        hashing._native.hash_ids(xs, None, 10, 0, None, np.array([[1, 1]], np.int64),
                                 np.array([[[2 ** 31 + 11]]], np.int64), out)
    with pytest.raises(ValueError, match="int64 or int32"):  # other widths are refused, not cast
        hashing._native.hash_ids(xs, None, 10, 0, None, np.array([[1, 1]], np.int64),
                                 np.array([[[7]]], np.int64), np.empty((1, 1, 1, 1), dtype=np.int16))


def test_int64_ids_for_tables_of_2_31_rows(monkeypatch):
    # A table of 2^31 rows or more needs int64 ids; the hasher switches by itself and refuses int32.
    hasher = NgramHasher(make_cfg(rows_per_head=(211,), n_head_per_ngram=1, max_ngram_size=2,
                                  layer_ids=(0,)), 1000)
    assert hasher.id_dtype == torch.int32
    big = dict(hasher.table_sizes)
    big[0] = [[2 ** 31 + 11]]  # stand-in for a huge prime: the dtype rule only reads sizes
    monkeypatch.setattr(hashing, "find_table_sizes", lambda cfg: big)
    wide = NgramHasher(hasher.cfg, 1000)
    assert wide.id_dtype == torch.int64
    ids = torch.arange(12).reshape(2, 6) * 77
    for backend in BACKENDS:
        got = wide.hash(ids, backend=backend)[0]
        assert got.dtype == torch.int64
        assert got.tolist() == wide.hash_reference(ids.numpy())[0].tolist()
    with pytest.raises(EngramError, match="2\\^31 rows or more"):
        wide.hash(ids, dtype=torch.int32)
    with pytest.raises(EngramError, match="int32 or torch.int64"):
        hasher.hash(ids, dtype=torch.int16)


# ----------------------------------------------------------------------------- errors
@pytest.fixture(scope="module")
def small_hasher() -> NgramHasher:
    return NgramHasher(make_cfg(rows_per_head=(211, 307), n_head_per_ngram=2, layer_ids=(0,),
                                pad_id=0), 100, np.arange(100) // 2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [-1, 100, 10 ** 12])
def test_out_of_range_ids(small_hasher, backend, bad):
    ids = torch.zeros((2, 5), dtype=torch.int64)
    ids[1, 3] = bad
    with pytest.raises(ValueError, match=rf"input_ids\[1, 3\] = {bad} .*\[0, 100\)"):
        small_hasher.hash(ids, backend=backend)
    with pytest.raises(ValueError, match=rf"new_ids\[1\] = {bad} "):
        small_hasher.hash_step(small_hasher.init_state(2), ids[:, 3], backend=backend)


def test_out_of_range_reference_and_compress(small_hasher):
    ids = np.zeros((1, 4), dtype=np.int64)
    ids[0, 2] = 100
    with pytest.raises(ValueError, match=r"\[0, 2\] = 100 "):
        small_hasher.hash_reference(ids)
    with pytest.raises(ValueError, match="= 100 "):
        small_hasher.compress(ids)
    with pytest.raises(ValueError, match="= 100 "):
        small_hasher.compress(torch.from_numpy(ids))


def test_bad_inputs(small_hasher):
    with pytest.raises(ValueError, match="backend"):
        small_hasher.hash(torch.zeros((1, 2), dtype=torch.int64), backend="cuda")
    with pytest.raises(ValueError, match=r"\[batch, time\]"):
        small_hasher.hash(torch.zeros(5, dtype=torch.int64))
    with pytest.raises(TypeError, match="integer"):
        small_hasher.hash(torch.zeros((1, 2)))
    with pytest.raises(ValueError, match="state"):
        small_hasher.hash_step(torch.zeros((2, 3), dtype=torch.int64), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="state holds"):
        small_hasher.hash_step(torch.full((2, 2), 50), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="B=2"):
        small_hasher.hash_step(small_hasher.init_state(2), torch.zeros(3, dtype=torch.int64))


def test_out_buffer_is_reused_and_checked(small_hasher):
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(1))
    out = small_hasher.empty_output(2, 6)
    assert out.shape == (1, 2, 6, 4) and out.dtype == torch.int32
    for backend in BACKENDS:
        for batch in (ids, ids.flip(1)):  # a second call overwrites the first one's ids
            got = small_hasher.hash(batch, backend=backend, out=out)
            assert torch.equal(got[0], small_hasher.hash(batch)[0]) and torch.equal(out[0], got[0])
    mask = torch.ones(2, 6, dtype=torch.int64)
    mask[0, :2] = 0
    assert torch.equal(small_hasher.hash(ids, attention_mask=mask, out=out)[0],
                       small_hasher.hash(ids, attention_mask=mask)[0])
    wide = small_hasher.hash(ids, out=small_hasher.empty_output(2, 6, dtype=torch.int64))
    assert wide[0].dtype == torch.int64 and torch.equal(wide[0], small_hasher.hash(ids)[0].long())
    bad = [(torch.empty(1, 2, 5, 4, dtype=torch.int32), r"shape \(1, 2, 5, 4\) .*empty_output\(2, 6\)"),
           (torch.empty(1, 2, 6, 4), "dtype torch.float32"),
           (torch.empty(1, 2, 6, 8, dtype=torch.int32)[..., ::2], "not contiguous"),
           (out.numpy(), "not a torch.Tensor")]
    for buf, msg in bad:
        with pytest.raises(ValueError, match=msg):
            small_hasher.hash(ids, out=buf)
    with pytest.raises(ValueError, match="dtype=torch.int64 was asked for"):
        small_hasher.hash(ids, dtype=torch.int64, out=out)
    with pytest.raises(ValueError, match="batch_size=-1"):
        small_hasher.empty_output(-1, 6)


def test_empty_input(small_hasher):
    for backend in BACKENDS:
        for shape in ((0, 4), (2, 0)):
            out = small_hasher.hash(torch.zeros(shape, dtype=torch.int64), backend=backend)
            assert out[0].shape == (*shape, 4)


def test_native_backend_forced():
    cfg = make_cfg(rows_per_head=(211, 307), n_head_per_ngram=2)
    hasher = NgramHasher(cfg, 100)
    if not hashing.NATIVE_KERNEL_AVAILABLE:
        with pytest.raises(ValueError, match="not built"):
            hasher.hash(torch.zeros((1, 2), dtype=torch.int64), backend="native")
    elif torch.cuda.is_available():
        with pytest.raises(ValueError, match="CPU-only"):
            hasher.hash(torch.zeros((1, 2), dtype=torch.int64, device="cuda"), backend="native")


def test_constructor_validation():
    cfg = make_cfg(rows_per_head=(211, 307), n_head_per_ngram=2, pad_id=5)
    with pytest.raises(ValueError, match=r"pad_id=5 .*\[0, 5\)"):
        NgramHasher(cfg, 5)
    with pytest.raises(ValueError, match=r"shape \(9,\), expected \(10,\)"):
        NgramHasher(cfg, 10, np.zeros(9, dtype=np.int64))
    with pytest.raises(ValueError, match=r"lookup\[3\] = 10 "):
        NgramHasher(cfg, 10, np.array([0, 1, 2, 10, 0, 0, 0, 0, 0, 0]))
    with pytest.raises(ValueError, match=r"lookup\[0\] = -1 "):
        NgramHasher(cfg, 10, np.array([-1] + [0] * 9))
    with pytest.raises(ValueError, match="dtype float64"):
        NgramHasher(cfg, 10, np.zeros(10))
    with pytest.raises(ValueError, match="tokenizer_vocab_size=0"):
        NgramHasher(cfg, 0)


def test_compression_disabled_is_ignored():
    lookup = np.arange(300) // 2
    on = NgramHasher(make_cfg(n_head_per_ngram=2, pad_id=3), 300, lookup)
    off = NgramHasher(make_cfg(n_head_per_ngram=2, pad_id=3, use_compression=False), 300, lookup)
    assert on.compressed_vocab_size == 150 and on.compressed_pad_id == 1
    assert off.compressed_vocab_size == 300 and off.compressed_pad_id == 3 and off.lookup is None


# ----------------------------------------------------------------------------- fingerprint
def test_fingerprint():
    cfg = make_cfg(rows_per_head=(211, 307), n_head_per_ngram=2)
    lookup = np.arange(400) // 2
    base = NgramHasher(cfg, 400, lookup)
    fp = base.fingerprint()
    assert len(fp) == 64 and fp == NgramHasher(cfg, 400, lookup.copy()).fingerprint()
    other_lookup = lookup.copy()
    other_lookup[7] = 0
    changed = [
        NgramHasher(make_cfg(rows_per_head=(211, 307), n_head_per_ngram=2, seed=1), 400, lookup),
        NgramHasher(cfg, 400, other_lookup),
        NgramHasher(cfg, 400),
        NgramHasher(cfg, 401, np.arange(401) // 2),
        NgramHasher(make_cfg(rows_per_head=(211, 307), n_head_per_ngram=2, layer_ids=(1,)), 400, lookup),
    ]
    fps = [h.fingerprint() for h in changed]
    assert fp not in fps and len(set(fps)) == len(fps)
    # an explicit identity lookup hashes like no lookup, so it fingerprints the same
    assert NgramHasher(cfg, 400, np.arange(400)).fingerprint() == NgramHasher(cfg, 400).fingerprint()
    desc = base.describe()
    assert json.loads(json.dumps(desc)) == desc and desc["fingerprint"] == fp
    assert desc["compressed_vocab_size"] == 200 and desc["config"]["seed"] == 0


def test_bench_hash_smoke():
    r = bench_hash(batch_size=1, seq_len=64, repeats=2, warmup=1)
    assert {"bench", "tokens_per_s", "baseline_tokens_per_s", "ratio"} <= set(r)
    # the warm-up repeat is reported apart and kept out of the steady-state headline
    assert len(r["warmup_ratio_per_repeat"]) == 1 and len(r["ratio_per_repeat"]) == 2
    assert r["bench"] == "hash" and r["tokens_per_s"] > 0 and r["ratio"] > 0
    # int32 ids: 2 layers x 16 heads x 4 bytes per token, half of the int64 form
    assert r["id_dtype"] == "int32" and r["bytes_written_per_token"] == 128
    assert r["int64_ids_bytes_written_per_token"] == 256
    assert r["ns_per_token"] > 0 and 0 < r["bandwidth_fraction"] and r["write_bandwidth_bytes_per_s"] > 0
    # the reused-buffer path is timed against its own like-for-like fill
    assert r["reused_tokens_per_s"] > 0 and r["reused_bandwidth_fraction"] > 0 and len(r["reused_ratio_per_repeat"]) == 2
    assert r["reused_over_fresh"] == pytest.approx(r["reused_tokens_per_s"] / r["tokens_per_s"])
    # where a vector path runs, the scalar one is timed too
    assert (r["vector_path"] is not None) == ("scalar_kernel_tokens_per_s" in r)
    native = hashing._native
    widest = None if native is None else "AVX-512" if native.AVX512 else "AVX2" if native.AVX2 else None
    assert r["avx512"] == (r["vector_path"] == "AVX-512") and r["vector_path"] == widest
    # the AVX2 path is timed apart only where it is not the default
    assert ("avx2_over_default" in r) == bool(widest == "AVX-512" and native.AVX2)
    json.dumps(r)


def test_bench_hash_page_from_runs(page_from_runs):
    runs = [bench_hash(batch_size=1, seq_len=32, repeats=2, warmup=1) for _ in range(2)]
    text = page_from_runs("hash", runs, "engram bench hash --json")
    assert "Machine: M." in text and "`engram bench hash --json`" in text
    assert f"**{min(r['ratio'] for r in runs):.1f}x to {max(r['ratio'] for r in runs):.1f}x** over 2 runs" in text
    assert text.count("\n| ") == 1 + 2  # the header, then one row per run
    lo, hi = (f"{f(r['reused_bandwidth_fraction'] for r in runs):.0%}" for f in (min, max))
    assert f"write {lo} to {hi} of what one thread reaches filling a reused tensor" in text
    # pages from runs written before the reused-buffer path still render, with dashes there
    old = [{k: v for k, v in r.items() if not k.startswith("reused")} for r in runs]
    assert "- | - | - |" in page_from_runs("hash", old, "c") and "reused tensor" not in page_from_runs("hash", old, "c")


def test_fallback_without_native(monkeypatch, small_hasher):
    # what an install without a C compiler sees: auto silently uses torch, native is refused
    monkeypatch.setattr(hashing, "NATIVE_KERNEL_AVAILABLE", False)
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    got = small_hasher.hash(ids)
    assert as_lists(got) == as_lists(small_hasher.hash_reference(ids.numpy()))
    step, _ = small_hasher.hash_step(small_hasher.init_state(2), ids[:, 0])
    assert torch.equal(step[0], got[0][:, 0])
    with pytest.raises(ValueError, match="not built"):
        small_hasher.hash(ids, backend="native")
