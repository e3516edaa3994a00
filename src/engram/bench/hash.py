"""``engram bench hash``: throughput of ``NgramHasher.hash`` against the plain numpy reference.

Both paths hash the same random ids with DeepSeek's demo defaults (``EngramConfig()``: layers
[1, 15], orders 2..3, 8 heads per order, tables just above 646,400; tokenizer vocab 129,280,
identity compression). Outputs are checked equal first; then the two are timed interleaved in
the same process (so machine noise hits both alike) and the medians are compared.
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Any, Callable

import numpy as np
import torch

from engram.config import EngramConfig
from engram.errors import EngramError
from engram.hashing.hasher import NATIVE_KERNEL_AVAILABLE, NgramHasher

DEEPSEEK_VOCAB = 129280  # DeepSeek-V3 tokenizer


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_hash(batch_size: int = 8, seq_len: int = 4096, repeats: int = 5,
               threads: int = 1) -> dict[str, Any]:
    """Tokens/s of ``hash`` (all layers) vs ``hash_reference``; ratio = fast / reference.

    ``threads`` sets torch's intra-op threads for the run (restored afterwards); the native
    kernel and numpy are single-threaded either way.
    """
    if batch_size < 1 or seq_len < 1 or repeats < 1 or threads < 1:
        raise EngramError(f"batch_size={batch_size}, seq_len={seq_len}, repeats={repeats}, "
                         f"threads={threads}: all must be >= 1")
    cfg = EngramConfig()
    hasher = NgramHasher(cfg, DEEPSEEK_VOCAB, np.arange(DEEPSEEK_VOCAB, dtype=np.int64))
    ids_np = np.random.default_rng(0).integers(0, DEEPSEEK_VOCAB, size=(batch_size, seq_len),
                                               dtype=np.int64)
    ids = torch.from_numpy(ids_np)
    backend = "native" if NATIVE_KERNEL_AVAILABLE else "torch"

    prev_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # Correctness first (doubles as warm-up): every layer must match the reference exactly.
        ref = hasher.hash_reference(ids_np)
        for path in dict.fromkeys((backend, "torch")):
            got = hasher.hash(ids, backend=path)
            for layer_id, want in ref.items():
                if not np.array_equal(got[layer_id].numpy(), want):
                    raise AssertionError(f"bench hash: {path} path disagrees with the reference "
                                         f"on layer {layer_id}")
        fast_t, ref_t, torch_t = [], [], []
        for _ in range(repeats):
            ref_t.append(_timed(lambda: hasher.hash_reference(ids_np)))
            fast_t.append(_timed(lambda: hasher.hash(ids, backend=backend)))
            torch_t.append(_timed(lambda: hasher.hash(ids, backend="torch")))
    finally:
        torch.set_num_threads(prev_threads)

    tokens = batch_size * seq_len
    fast, base, tpath = (tokens / statistics.median(t) for t in (fast_t, ref_t, torch_t))
    return {
        "bench": "hash",
        "tokens_per_s": fast,
        "baseline_tokens_per_s": base,
        "ratio": fast / base,
        "backend": backend,
        "torch_tokens_per_s": tpath,
        "torch_ratio": tpath / base,
        "threads": threads,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "repeats": repeats,
        "timing": "median of interleaved repeats, all layers per call",
        "config": {"layer_ids": list(cfg.layer_ids), "max_ngram_size": cfg.max_ngram_size,
                   "n_head_per_ngram": cfg.n_head_per_ngram,
                   "engram_vocab_size": list(cfg.engram_vocab_size),
                   "tokenizer_vocab_size": DEEPSEEK_VOCAB, "compression": "identity"},
    }


if __name__ == "__main__":  # pragma: no cover

    print(json.dumps(bench_hash(), indent=2))
