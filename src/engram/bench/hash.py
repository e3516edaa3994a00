"""``engram bench hash``: throughput of ``NgramHasher.hash`` against the plain numpy reference.

All paths hash the same random ids with DeepSeek's demo defaults (``EngramConfig()``: layers
[1, 15], orders 2..3, 8 heads per order, tables just above 646,400; tokenizer vocab 129,280,
identity compression). Outputs are checked equal first; then the paths are timed interleaved in
the same process (so machine noise hits all alike) and the medians are compared.

The kernel reads one id per token and writes ``L * H`` ids (32 here), so its floor is the
bytes it writes: the report gives the bytes written per token, the time per token, and the
fraction of this machine's single-thread write bandwidth that the kernel reaches. That
bandwidth is measured in the same loop, one thread, by doing only what the kernel must do
with its output: allocate a fresh tensor of one call's output size and fill it
(``write_bandwidth_bytes_per_s``; ``bandwidth_fraction`` = the kernel's bytes/s over it).
Filling a 256 MiB buffer gives main memory's figure alongside.

A caller that hashes batch after batch can pass one buffer (``hash(..., out=)``) instead of
allocating a fresh output per call; that path is timed too, against its own like-for-like
bandwidth: filling one reused output-sized tensor (``reused_bandwidth_fraction``).
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Any, Callable

import numpy as np
import torch

from engram.bench.config import HashBenchConfig
from engram.config import EngramConfig
from engram.errors import EngramError
from engram.hashing import hasher as hasher_mod
from engram.hashing.hasher import NATIVE_KERNEL_AVAILABLE, NgramHasher
from engram.model.accel import resolve_device

DEEPSEEK_VOCAB = 129280  # DeepSeek-V3 tokenizer
_BIG_FILL_BYTES = 256 << 20  # larger than any last-level cache here


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _spread(times: list[float], work: float) -> dict[str, float]:
    """Rate (work / s) at the median, the fastest and the slowest repeat."""
    return {"median": work / statistics.median(times), "min": work / max(times), "max": work / min(times)}


def bench_hash(batch_size: int = HashBenchConfig.batch_size, seq_len: int = HashBenchConfig.seq_len,
               repeats: int = HashBenchConfig.repeats, threads: int = HashBenchConfig.threads,
               device: str = HashBenchConfig.device, warmup: int = HashBenchConfig.warmup) -> dict[str, Any]:
    """Tokens/s of ``hash`` (all layers) vs ``hash_reference``; ratio = fast / reference.

    The fast path is the native kernel with the hasher's default ids (int32 for these
    tables); the same kernel writing int64 ids and the torch path are timed alongside.
    ``threads`` sets torch's intra-op threads for the run (restored afterwards); the native
    kernel and numpy are single-threaded either way. ``device="cuda"`` adds the torch path on the
    GPU (``cuda``: ids on the device, output compared with the reference, each call synchronized).

    Both sides warm up first: ``warmup`` rounds of every path, interleaved like the timed ones,
    are kept out of the headline (their ratios are reported apart, ``warmup_ratio_per_repeat``),
    so the headline is steady state; a first repeat can differ several-fold from the rest.
    """
    dev = resolve_device(device)
    if batch_size < 1 or seq_len < 1 or repeats < 1 or threads < 1 or warmup < 0:
        raise EngramError(f"batch_size={batch_size}, seq_len={seq_len}, repeats={repeats}, "
                         f"threads={threads}, warmup={warmup}: all must be >= 1 (warmup >= 0)")
    cfg = EngramConfig()
    hasher = NgramHasher(cfg, DEEPSEEK_VOCAB, np.arange(DEEPSEEK_VOCAB, dtype=np.int64))
    ids_np = np.random.default_rng(0).integers(0, DEEPSEEK_VOCAB, size=(batch_size, seq_len),
                                               dtype=np.int64)
    ids = torch.from_numpy(ids_np)
    backend = "native" if NATIVE_KERNEL_AVAILABLE else "torch"
    tokens = batch_size * seq_len
    ids_per_token = len(cfg.layer_ids) * hasher.num_heads
    out_bytes = {d: tokens * ids_per_token * torch.empty((), dtype=d).element_size()
                 for d in (hasher.id_dtype, torch.int64)}
    out_shape = (len(cfg.layer_ids), batch_size, seq_len, hasher.num_heads)
    fill_big = np.empty(_BIG_FILL_BYTES // 8, dtype=np.int64)
    out_reused = hasher.empty_output(batch_size, seq_len)
    fill_reused = torch.empty(out_shape, dtype=hasher.id_dtype)

    prev_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # Correctness first (doubles as warm-up): every layer must match the reference exactly.
        ref = hasher.hash_reference(ids_np)
        for path in dict.fromkeys((backend, "torch")):
            for dtype in (None, torch.int64):
                got = hasher.hash(ids, backend=path, dtype=dtype)
                for layer_id, want in ref.items():
                    if not np.array_equal(got[layer_id].numpy(), want):
                        raise AssertionError(f"bench hash: {path} path ({dtype or hasher.id_dtype}) "
                                             f"disagrees with the reference on layer {layer_id}")
        if dev.type == "cuda":
            ids_dev = ids.to(dev)
            got = hasher.hash(ids_dev, backend="torch")
            if any(not np.array_equal(got[k].cpu().numpy(), want) for k, want in ref.items()):
                raise AssertionError(f"bench hash: the torch path on {dev} disagrees with the reference")
        got = hasher.hash(ids, backend=backend, out=out_reused)
        if any(not np.array_equal(got[k].numpy(), want) for k, want in ref.items()):
            raise AssertionError("bench hash: the fast path into a reused buffer disagrees with the reference")
        fill_big.fill(1)  # first touch: page faults are not bandwidth
        fill_reused.fill_(1)
        paths: dict[str, Callable[[], Any]] = {
            "reference": lambda: hasher.hash_reference(ids_np),
            "fast": lambda: hasher.hash(ids, backend=backend),
            "fast_int64": lambda: hasher.hash(ids, backend=backend, dtype=torch.int64),
            "torch": lambda: hasher.hash(ids, backend="torch"),
            "fast_reused": lambda: hasher.hash(ids, backend=backend, out=out_reused),
            "fill_output": lambda: torch.empty(out_shape, dtype=hasher.id_dtype).fill_(2),
            "fill_reused": lambda: fill_reused.fill_(2),
            "fill_256mib": lambda: fill_big.fill(2),
        }
        native = hasher_mod._native if NATIVE_KERNEL_AVAILABLE else None
        vector = getattr(native, "VECTOR", "") or None  # the default path's vector unit, as the kernel picks it

        def kernel(simd: int, name: str) -> Callable[[], Any]:
            """The kernel kept to one path (``simd``), checked against the reference before it is timed."""
            def run() -> Any:
                out = torch.empty(out_shape, dtype=hasher.id_dtype)
                native.hash_ids(ids_np, hasher.lookup, hasher.tokenizer_vocab_size, hasher.compressed_pad_id, None,
                                hasher._mult_np, hasher._primes_np, out.numpy(), simd)
                return out
            got = run()
            if any(not np.array_equal(got[i].numpy(), ref[k]) for i, k in enumerate(cfg.layer_ids)):
                raise AssertionError(f"bench hash: the kernel's {name} path disagrees with the reference")
            return run

        if vector == "AVX-512" and getattr(native, "AVX2", 0):  # the narrower path, kept to on request (simd=2)
            paths["fast_avx2"] = kernel(2, "AVX2")
        if vector:  # the same kernel kept to its scalar path: what the vector path adds
            paths["fast_scalar"] = kernel(0, "scalar")
        if dev.type == "cuda":
            def on_gpu() -> None:
                hasher.hash(ids_dev, backend="torch")
                torch.cuda.synchronize(dev)
            paths["cuda"] = on_gpu
        t: dict[str, list[float]] = {k: [] for k in paths}
        warm: dict[str, list[float]] = {k: [] for k in paths}
        for i in range(warmup + repeats):
            for name, fn in paths.items():
                (warm if i < warmup else t)[name].append(_timed(fn))
    finally:
        torch.set_num_threads(prev_threads)

    med = {k: statistics.median(v) for k, v in t.items()}
    fast, base, tpath, wide = (tokens / med[k] for k in ("fast", "reference", "torch", "fast_int64"))
    bw_small = out_bytes[hasher.id_dtype] / med["fill_output"]
    bw_big = fill_big.nbytes / med["fill_256mib"]
    bw_reused = out_bytes[hasher.id_dtype] / med["fill_reused"]
    reused = tokens / med["fast_reused"]
    bytes_per_token = out_bytes[hasher.id_dtype] / tokens
    written = fast * bytes_per_token  # bytes/s the fast path writes
    per_repeat_ratio = [r / f for r, f in zip(t["reference"], t["fast"])]
    gpu = {}
    if dev.type == "cuda":
        gpu = {"cuda_tokens_per_s": tokens / med["cuda"], "cuda_ratio": tokens / med["cuda"] / base,
               "cuda_device": torch.cuda.get_device_name(dev),
               "cuda_spread_tokens_per_s": _spread(t["cuda"], tokens)}
    scalar = {}
    if "fast_scalar" in med:
        scalar = {"scalar_kernel_tokens_per_s": tokens / med["fast_scalar"],
                  "scalar_kernel_ratio": tokens / med["fast_scalar"] / base,
                  "vector_over_scalar": fast / (tokens / med["fast_scalar"])}
    return {
        "bench": "hash",
        **gpu,
        **scalar,
        "avx512": vector == "AVX-512",
        "vector_path": vector,
        **({"avx2_tokens_per_s": tokens / med["fast_avx2"], "avx2_over_default": tokens / med["fast_avx2"] / fast}
           if "fast_avx2" in med else {}),
        "tokens_per_s": fast,
        "baseline_tokens_per_s": base,
        "ratio": fast / base,
        "ratio_per_repeat": per_repeat_ratio,
        "ratio_spread": [min(per_repeat_ratio), max(per_repeat_ratio)],
        "warmup": warmup,
        "warmup_ratio_per_repeat": [r / f for r, f in zip(warm["reference"], warm["fast"])],
        "backend": backend,
        "id_dtype": str(hasher.id_dtype).replace("torch.", ""),
        "ns_per_token": 1e9 / fast,
        "bytes_written_per_token": bytes_per_token,
        "bytes_read_per_token": 8.0,  # one int64 token id (tables of multipliers and primes stay in cache)
        "write_bytes_per_s": written,
        "write_bandwidth_bytes_per_s": bw_small,
        "bandwidth_fraction": written / bw_small,
        "reused_tokens_per_s": reused,
        "reused_ratio": reused / base,
        "reused_over_fresh": reused / fast,
        "reused_ratio_per_repeat": [r / f for r, f in zip(t["reference"], t["fast_reused"])],
        "write_bandwidth_reused_bytes_per_s": bw_reused,
        "reused_bandwidth_fraction": reused * bytes_per_token / bw_reused,
        "write_bandwidth_256mib_bytes_per_s": bw_big,
        "bandwidth_fraction_256mib": written / bw_big,
        "int64_ids_tokens_per_s": wide,
        "int64_ids_ratio": wide / base,
        "int32_over_int64": fast / wide,
        "int64_ids_bytes_written_per_token": out_bytes[torch.int64] / tokens,
        "torch_tokens_per_s": tpath,
        "torch_ratio": tpath / base,
        "spread_tokens_per_s": {k: _spread(t[k], tokens) for k in ("fast", "fast_reused", "fast_int64", "reference",
                                                                   "torch", "fast_scalar") if k in t},
        "threads": threads,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "repeats": repeats,
        "timing": "median of interleaved repeats after the warm-up repeats (steady state), all layers per call; "
                  "bandwidth: allocate + fill a fresh output-sized tensor (and numpy fill of 256 MiB), one thread, "
                  "same loop; the reused-buffer path against filling one reused output-sized tensor",
        "config": {"layer_ids": list(cfg.layer_ids), "max_ngram_size": cfg.max_ngram_size,
                   "n_head_per_ngram": cfg.n_head_per_ngram,
                   "rows_per_head": list(cfg.rows_per_head),
                   "tokenizer_vocab_size": DEEPSEEK_VOCAB, "compression": "identity"},
    }


if __name__ == "__main__":  # pragma: no cover

    print(json.dumps(bench_hash(), indent=2))


def hash_page(runs: list[dict[str, Any]], command: str, machine: str, date: str) -> str:
    """A results page for several ``bench hash`` results (one per run), every number from them."""
    if not runs:
        raise EngramError("hash_page needs at least one result")
    r0 = runs[0]
    lines = [f"# N-gram hashing throughput, {date}", "",
             f"Machine: {machine}. One thread; {r0['batch_size']} x {r0['seq_len']} tokens per call, DeepSeek's "
             f"demo configuration (layers {r0['config']['layer_ids']}, orders 2-{r0['config']['max_ngram_size']}, "
             f"{r0['config']['n_head_per_ngram']} heads per order, tokenizer vocab {r0['config']['tokenizer_vocab_size']:,}).",
             "", f"Command: `{command}`", "",
             f"Every path is checked equal to the numpy reference first; then {r0['warmup']} warm-up and "
             f"{r0['repeats']} timed repeats of every path run interleaved in one process. The headline is the "
             "median of the timed repeats (steady state); the warm-up repeats' ratios are shown apart.", "",
             "| run | kernel tokens/s | reference tokens/s | **ratio** (timed repeats) | warm-up repeats | "
             "scalar kernel tokens/s | vector / scalar | ns / token | write-bandwidth fraction | "
             "into a reused buffer: tokens/s | its ratio | its write-bandwidth fraction |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for i, r in enumerate(runs, 1):
        per = ", ".join(f"{x:.1f}" for x in r["ratio_per_repeat"])
        warm = ", ".join(f"{x:.1f}x" for x in r["warmup_ratio_per_repeat"]) or "-"
        scalar = r.get("scalar_kernel_tokens_per_s")
        lines.append(f"| {i} | {r['tokens_per_s'] / 1e6:.1f}M | {r['baseline_tokens_per_s'] / 1e6:.2f}M | "
                     f"**{r['ratio']:.1f}x** ({per}) | {warm} | "
                     + (f"{scalar / 1e6:.1f}M | {r['vector_over_scalar']:.2f}x" if scalar else "- | -")
                     + f" | {r['ns_per_token']:.1f} | {r['bandwidth_fraction']:.0%} | "
                     + (f"{r['reused_tokens_per_s'] / 1e6:.1f}M | {r['reused_ratio']:.1f}x | "
                        f"{r['reused_bandwidth_fraction']:.0%} |" if "reused_tokens_per_s" in r else "- | - | - |"))
    ratios = [r["ratio"] for r in runs]
    lines += ["", f"Steady-state ratio over the reference: **{min(ratios):.1f}x to {max(ratios):.1f}x** over "
              f"{len(runs)} runs (medians); every timed repeat's ratio is in the table."]
    if all(r.get("scalar_kernel_tokens_per_s") for r in runs):
        vs = [r["vector_over_scalar"] for r in runs]
        sc = [r["scalar_kernel_ratio"] for r in runs]
        path = r0.get("vector_path") or "AVX-512"  # runs written before the AVX2 path had only AVX-512
        lines.append(f"The kernel's {path} path is {min(vs):.2f}x to {max(vs):.2f}x its scalar path; the scalar "
                     f"path alone is {min(sc):.1f}x to {max(sc):.1f}x the reference.")
    if all(r.get("avx2_over_default") for r in runs):
        a2 = [r["avx2_over_default"] for r in runs]
        lines.append(f"The kernel's AVX2 path (`simd=2`) runs at {min(a2):.2f}x to {max(a2):.2f}x "
                     "the speed of the default path above.")
    fr = [r["bandwidth_fraction"] for r in runs]
    bw = [r["write_bandwidth_bytes_per_s"] / 1e9 for r in runs]
    lines.append(f"The kernel writes {r0['bytes_written_per_token']:.0f} bytes per token, "
                 f"{min(fr):.0%} to {max(fr):.0%} of what one thread reaches allocating and filling an output of "
                 f"the same size in the same loop ({min(bw):.1f} to {max(bw):.1f} GB/s).")
    if all("reused_tokens_per_s" in r for r in runs):
        rf = [r["reused_bandwidth_fraction"] for r in runs]
        ro = [r["reused_over_fresh"] for r in runs]
        bw2 = [r["write_bandwidth_reused_bytes_per_s"] / 1e9 for r in runs]
        lines.append(f"Into one reused buffer (`hash(..., out=)`), the same calls run at {min(ro):.2f}x to "
                     f"{max(ro):.2f}x the speed with a fresh output each, and write {min(rf):.0%} to {max(rf):.0%} of "
                     "what one thread reaches filling a reused tensor of the same size in the same loop "
                     f"({min(bw2):.1f} to {max(bw2):.1f} GB/s).")
    return "\n".join(lines) + "\n"
