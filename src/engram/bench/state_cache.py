"""``engram bench state-cache``: time to first token with and without stored prompt states.

One model (a preset with random weights: the shape is what costs), one thread. For each prefix
length L a random prefix is fixed; every prompt is that prefix and ``suffix_len`` new random
tokens. Three ways to reach the first token of a prompt take turns, in an order rotated per
prompt, so that a slow moment of a shared machine hits all of them alike:

    plain   ``model(prompt, cache=...)`` in one call, what ``engram generate`` does without
            ``--state-cache`` (no states read or written)
    cold    ``--state-cache`` with an empty store: the prompt read block by block, every whole
            block's state written (the first prompt of a prefix pays this)
    warm    ``--state-cache`` after one earlier prompt with the same prefix: the prefix's states
            loaded, only the suffix read

Time to first token (TTFT) is from the prompt's ids to the first greedy token: a fresh cache,
the prompt read (and states loaded / stored), the argmax. The model, tables and weights
fingerprint are computed before timing (once per process; ``fingerprint_s`` says how long).
Ratios are taken per prompt (plain / warm, plain / cold); every run is reported.

Checked on the way: the warm first-token logits equal the cold ones bit for bit (the same block
schedule), and how far the one-call logits are from them (another order of sums).
Bytes: the store's bytes after the prefix's states were written, over the tokens they cover.
"""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from engram.bench.config import StateCacheBenchConfig as _S
from engram.config import preset
from engram.model.lm import EngramLM
from engram.serve.state_cache import PromptStates
from engram.serve.state_store import StateStore

MODES = ("plain", "cold", "warm")


def _model(preset_name: str, vocab: int, max_len: int, seed: int) -> EngramLM:
    torch.manual_seed(seed)
    cfg = preset(preset_name, vocab)
    cfg.max_seq_len = max(cfg.max_seq_len, max_len)
    model = EngramLM(cfg, np.arange(vocab, dtype=np.int64)).eval()
    with torch.no_grad():
        for e in model.engram_layers:
            e.table.weight.normal_()
        for p in model.parameters():  # the Engram value projection and short conv start at zero
            if p.dim() >= 2 and not bool(p.any()):
                p.normal_(std=0.02)
    return model


def bench_state_cache(preset: str = _S.preset, vocab_size: int = _S.vocab_size,
                      prefix_lens: tuple[int, ...] = _S.prefix_lens, suffix_len: int = _S.suffix_len,
                      block_tokens: int = _S.block_tokens, storage: str = _S.storage, repeats: int = _S.repeats,
                      threads: Optional[int] = _S.threads, seed: int = _S.seed) -> dict[str, Any]:
    prev_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run(preset, vocab_size, tuple(prefix_lens), suffix_len, block_tokens, storage, repeats, threads,
                    seed)
    finally:
        torch.set_num_threads(prev_threads)


def _store(storage: str, root: Path, name: str) -> StateStore:
    return StateStore(None if storage == "memory" else root / name, storage, max_bytes=1 << 40, memory_bytes=1 << 40)


@torch.no_grad()
def _run(preset_name: str, vocab: int, prefix_lens: tuple[int, ...], suffix_len: int, block: int, storage: str,
         repeats: int, threads: Optional[int], seed: int) -> dict[str, Any]:
    model = _model(preset_name, vocab, max(prefix_lens) + suffix_len + 1, seed)
    g = torch.Generator().manual_seed(seed + 1)
    runs: list[dict[str, Any]] = []
    checks: dict[str, Any] = {}
    sizes: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="engram-bench-state-cache-") as tmp:
        root = Path(tmp)
        states = PromptStates(model, _store(storage, root, "warm"), block, warn=False)
        t = time.perf_counter()
        states.context()  # the weights and tables fingerprint, once per process
        fingerprint_s = time.perf_counter() - t

        def ttft(mode: str, ids: torch.Tensor, r: int) -> tuple[float, torch.Tensor, Any]:
            t = time.perf_counter()
            cache = model.new_cache(1, ids.shape[1] + 1)
            report = None
            if mode == "plain":
                logits = model(ids, cache=cache).logits[:, -1]
            else:
                if mode == "cold":  # an empty store of its own for every prompt
                    states.store = _store(storage, root, f"cold-{ids.shape[1]}-{r}")
                _, logits, report = states.prefill(ids, cache)
                if mode == "cold":
                    states.store = warm_store
            int(logits.argmax(-1))
            seconds = time.perf_counter() - t
            if mode == "cold" and storage != "memory":
                shutil.rmtree(root / f"cold-{ids.shape[1]}-{r}")  # keep the disk small; not timed
            return seconds, logits, report

        for L in prefix_lens:
            prefix = torch.randint(0, vocab, (1, L), generator=g)
            warm_store = _store(storage, root, f"warm-{L}")
            states.store = warm_store
            first = torch.cat([prefix, torch.randint(0, vocab, (1, suffix_len), generator=g)], dim=1)
            states.prefill(first, model.new_cache(1, first.shape[1] + 1))  # the prefix's states, stored
            st = warm_store.stats()
            stored_tokens = (first.shape[1] // block) * block
            sizes[str(L)] = {"stored_tokens": stored_tokens,
                             "store_bytes": st["disk_bytes"] if storage != "memory" else st["ram_bytes"],
                             "bytes_per_token": (st["disk_bytes"] if storage != "memory" else st["ram_bytes"])
                             / max(1, stored_tokens)}
            equal, diffs, same_token = True, [], True
            for r in range(repeats):
                ids = torch.cat([prefix, torch.randint(0, vocab, (1, suffix_len), generator=g)], dim=1)
                got: dict[str, torch.Tensor] = {}
                order = MODES[r % 3:] + MODES[:r % 3]
                for mode in order:
                    seconds, logits, report = ttft(mode, ids, r)
                    got[mode] = logits
                    runs.append({"prefix_len": L, "repeat": r, "mode": mode, "order": order.index(mode),
                                 "ttft_s": seconds,
                                 "cached_tokens": report.cached_tokens if report is not None else 0,
                                 "read_tokens": report.read_tokens if report is not None else ids.shape[1]})
                equal &= bool(torch.equal(got["warm"], got["cold"]))
                diffs.append(float((got["plain"] - got["warm"]).abs().max()))
                same_token &= int(got["plain"].argmax()) == int(got["warm"].argmax())
            checks[str(L)] = {"warm_equals_cold": equal, "one_call_max_abs_diff": max(diffs),
                              "one_call_same_first_token": same_token}
    summary = {}
    for L in prefix_lens:
        by = {(x["repeat"], x["mode"]): x["ttft_s"] for x in runs if x["prefix_len"] == L}
        med = {m: statistics.median(by[(r, m)] for r in range(repeats)) for m in MODES}
        summary[str(L)] = {
            "median_ttft_s": med,
            "plain_over_warm": [by[(r, "plain")] / by[(r, "warm")] for r in range(repeats)],
            "cold_over_plain": [by[(r, "cold")] / by[(r, "plain")] for r in range(repeats)],
        }
        for k in ("plain_over_warm", "cold_over_plain"):
            summary[str(L)][k + "_median"] = statistics.median(summary[str(L)][k])
    cfg = model.cfg
    kv_bytes = 2 * cfg.num_layers * cfg.hidden_size * 4  # keys and values of every layer, fp32
    return {
        "benchmark": "state-cache", "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "threads": threads},
        "config": {"preset": preset_name, "vocab_size": vocab, "prefix_lens": list(prefix_lens),
                   "suffix_len": suffix_len, "block_tokens": block, "storage": storage, "repeats": repeats,
                   "seed": seed, "hidden_size": cfg.hidden_size, "num_layers": cfg.num_layers,
                   "engram_layers": [e.layer_id for e in model.engram_layers]},
        "fingerprint_s": fingerprint_s, "kv_bytes_per_token": kv_bytes,
        "runs": runs, "summary": summary, "exactness": checks, "bytes": sizes,
    }


def state_cache_page(r: dict[str, Any], command: str) -> str:
    """The results page of one ``bench_state_cache`` result: every number below is read from ``r``."""
    c, mach = r["config"], r["machine"]
    rows = ["| shared prefix | prompt tokens | plain TTFT ms (each prompt) | cold ms | warm ms | plain / warm, "
            "each prompt | median plain / warm | median cold / plain |",
            "|---:|---:|---|---|---|---|---:|---:|"]
    for L, s in r["summary"].items():
        ms = {m: " / ".join(f"{1e3 * x['ttft_s']:.1f}" for x in r["runs"]
                            if str(x["prefix_len"]) == L and x["mode"] == m) for m in MODES}
        ratios = " / ".join(f"{v:.1f}" for v in s["plain_over_warm"])
        rows.append(f"| {int(L):,} | {int(L) + c['suffix_len']:,} | {ms['plain']} | {ms['cold']} | {ms['warm']} | "
                    f"{ratios} | **{s['plain_over_warm_median']:.1f}x** | {s['cold_over_plain_median']:.2f} |")
    exact = ["| shared prefix | warm logits == cold logits (bit for bit) | one call vs blocks: max abs diff | "
             "same first token |", "|---:|---|---:|---|"]
    for L, x in r["exactness"].items():
        exact.append(f"| {int(L):,} | {'yes' if x['warm_equals_cold'] else '**no**'} | "
                     f"{x['one_call_max_abs_diff']:.2e} | {'yes' if x['one_call_same_first_token'] else 'no'} |")
    size = ["| shared prefix | tokens stored | store bytes | bytes per cached token |", "|---:|---:|---:|---:|"]
    for L, x in r["bytes"].items():
        size.append(f"| {int(L):,} | {x['stored_tokens']:,} | {x['store_bytes']:,} | {x['bytes_per_token']:,.0f} |")
    return "\n".join([
        f"# Stored prompt states: time to first token ({r['date']})", "",
        "Command:", "", "```bash", command, "```", "",
        f"Machine: {mach['cpus']} CPUs ({mach['platform']}), Python {mach['python']}, torch {mach['torch']}, "
        f"{mach['threads']} torch thread(s). The machine was shared with other jobs while this ran, so single "
        f"timings move; the modes took turns prompt by prompt, in a rotating order, and the ratios are taken "
        f"per prompt.", "",
        f"Setup: the `{c['preset']}` preset with random weights (hidden {c['hidden_size']}, {c['num_layers']} "
        f"layers, Engram at layer(s) {c['engram_layers']}, vocabulary {c['vocab_size']:,}); states of "
        f"{c['block_tokens']}-token blocks in `{c['storage']}` storage. Every prompt is a fixed random prefix and "
        f"{c['suffix_len']} new random tokens; {c['repeats']} prompts per prefix length. TTFT: from the prompt's ids "
        f"to the first greedy token. *plain*: the prompt in one call, no state cache; *cold*: `--state-cache` "
        f"with an empty store (read block by block, every block's state written); *warm*: the prefix's states "
        f"stored by an earlier prompt, loaded, the suffix read. The weights and tables fingerprint took "
        f"{1e3 * r['fingerprint_s']:.0f} ms once per process (not in the TTFTs).", "",
        *rows, "",
        "Exactness (the tests check it on tiny models; here on the benchmark's prompts): a warm prompt's "
        "first-token logits against the cold read of the same prompt, and the one-call read against the block "
        "schedule.", "", *exact, "",
        f"Bytes: keys and values alone are {r['kv_bytes_per_token']:,} bytes per token (fp32, "
        f"{c['num_layers']} layers x 2 x {c['hidden_size']}); each entry adds its block's ids, the Engram "
        f"state after it and the file's header.", "", *size, ""])
