"""``engram bench draft``: speculative decoding with drafts from memory vs plain decoding.

Same model, same held-out prompts (windows of the validation split, which the index does not
hold), one process, one torch thread. Each round runs every prompt through every method back
to back, the methods in a rotating order, so that each method's time on a prompt is paired in
time with the others' and a slow moment of a shared machine does not always hit the same one:

- ``baseline``: ``engram.model.generation.generate``, one token per forward (the real default);
- ``k0``: the speculative loop with no drafter (its own overhead, one token per forward);
- ``k2`` / ``k4`` / ``k8``: the loop with ``NgramDrafter`` (index + generation text), K = 2/4/8.

Reported per method: tokens/s (median over rounds, min-max spread), the speedup over the
baseline (ratio of tokens/s within each round, then the median and spread), acceptance rate
(accepted / drafted tokens), mean accepted length (accepted draft tokens per step that had a
draft) and tokens per forward (the prompt's forward included); ``identical``: every greedy
output equals the baseline's. Top-level ``speedup`` is the best K's median.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from engram.bench.config import DraftBenchConfig as _D
from engram.config import DraftConfig, SamplingConfig
from engram.data.shards import load_dataset
from engram.data.tokenizer import load_tokenizer, special_ids
from engram.errors import EngramError
from engram.fsutil import PathLike
from engram.model.checkpoint import load_model
from engram.model.generation import generate
from engram.ngram.draft import NgramDrafter
from engram.ngram.index import NgramIndex
from engram.ngram.speculative import EngramTarget, generate_speculative


def heldout_prompts(val: np.ndarray, eos: int, n: int, length: int, seed: int = 0) -> list[list[int]]:
    """``n`` windows of ``length`` tokens from the validation stream, none crossing a document
    boundary (no eos inside), at seeded random offsets."""
    rng = np.random.default_rng(seed)
    out: list[list[int]] = []
    for start in rng.permutation(max(len(val) - length, 0)):
        w = val[start:start + length]
        if len(w) == length and not (w == eos).any():
            out.append([int(t) for t in w])
            if len(out) == n:
                return out
    raise EngramError(f"the validation split has fewer than {n} eos-free windows of {length} tokens; "
                      "lower --prompts or --prompt-len")


def _stats(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {"median": float(np.median(a)), "min": float(a.min()), "max": float(a.max())}


def bench_draft(ckpt: PathLike, data_dir: PathLike, index_path: Optional[PathLike] = None, *,
                ks: tuple[int, ...] = _D.ks, prompts: int = _D.prompts, prompt_len: int = _D.prompt_len,
                max_new_tokens: int = _D.max_new_tokens, repeats: int = _D.repeats, min_match: int = _D.min_match,
                threads: int = _D.threads, seed: int = _D.seed, temperature: float = _D.temperature, progress: bool = True) -> dict[str, Any]:
    """The benchmark record (see the module docstring); ``index_path`` None: text-only drafts.

    ``temperature`` > 0 samples (seed per prompt): outputs then differ from the baseline's by
    design (same distribution, other draws), so ``identical`` is None and only speed and
    acceptance are compared."""
    if repeats < 1 or prompts < 1 or max_new_tokens < 1:
        raise EngramError(f"repeats={repeats}, prompts={prompts} and max_new_tokens={max_new_tokens} must be >= 1")
    torch.set_num_threads(threads)
    model, meta = load_model(ckpt)
    model.eval()
    ds = load_dataset(data_dir)
    if meta.tokenizer_fingerprint and meta.tokenizer_fingerprint != ds.meta["tokenizer_fingerprint"]:
        raise EngramError(f"run {ckpt} was trained with another tokenizer than dataset {data_dir}")
    eos = special_ids(load_tokenizer(Path(data_dir) / "tokenizer.json"))[1]
    index = NgramIndex.open(index_path) if index_path else None
    ps = heldout_prompts(np.asarray(ds.val.tokens, dtype=np.int64), eos, prompts, prompt_len, seed)
    if index is not None:
        index.check_not_indexed(np.concatenate(ps), "the benchmark prompts")
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    greedy = temperature == 0
    target = EngramTarget(model)
    drafts = {f"k{k}": DraftConfig(max_len=k, min_match=min_match) for k in ks}

    def run(method: str, prompt: list[int]) -> tuple[list[int], Optional[dict]]:
        x = torch.tensor([prompt])
        if method == "baseline":
            return generate(model, x, sampling, eos_id=eos)[0].tolist(), None
        # a fresh drafter per generation: its lookup memo must not carry over between runs
        drafter = NgramDrafter(index, drafts[method]) if method in drafts else None
        r = generate_speculative(target, drafter, x, sampling, eos_id=eos, progress=False)
        return r.ids[0].tolist(), r.stats()

    methods = ["baseline", "k0", *drafts]
    for m in methods:  # warm-up: first-call allocations, lazily built index caches
        run(m, ps[0])
    seconds = {m: [] for m in methods}
    tokens = {m: [] for m in methods}
    outputs: dict[str, list[list[int]]] = {}
    draft_stats: dict[str, list[dict]] = {m: [] for m in methods}
    bar = tqdm(total=repeats * len(ps), desc="bench draft", unit="prompt", disable=not progress)
    for r in range(repeats):
        for i, p in enumerate(ps):  # every method on this prompt back to back: paired in time
            turn = (r * len(ps) + i) % len(methods)
            for m in methods[turn:] + methods[:turn]:
                t0 = time.perf_counter()
                ids, s = run(m, p)
                dt = time.perf_counter() - t0
                if i == 0:
                    seconds[m].append(0.0)
                    tokens[m].append(0)
                seconds[m][-1] += dt
                tokens[m][-1] += len(ids) - len(p)
                if r == 0:
                    outputs.setdefault(m, []).append(ids)
                    if s is not None:
                        draft_stats[m].append(s)
            bar.update(1)
    bar.close()
    base = outputs["baseline"]
    rec_methods: dict[str, Any] = {}
    for m in methods:
        tps = [n / s for n, s in zip(tokens[m], seconds[m])]
        base_tps = [n / s for n, s in zip(tokens["baseline"], seconds["baseline"])]
        ratio = [a / b for a, b in zip(tps, base_tps)]  # within a round: same machine state
        entry: dict[str, Any] = {"tokens_per_s": _stats(tps), "speedup": _stats(ratio),
                                 "identical": outputs[m] == base if greedy else None,
                                 "prompts_identical": sum(a == b for a, b in zip(outputs[m], base))}
        st = draft_stats[m]
        if st:
            drafted, accepted = sum(s["drafted"] for s in st), sum(s["accepted"] for s in st)
            entry.update({
                "acceptance": accepted / drafted if drafted else 0.0,
                "mean_accepted": accepted / max(sum(s["draft_steps"] for s in st), 1),
                "tokens_per_forward": sum(s["new_tokens"] for s in st) / max(sum(s["forwards"] for s in st), 1),
                "drafted": drafted, "accepted": accepted,
            })
        rec_methods[m] = entry
    best = max((f"k{k}" for k in ks), key=lambda m: rec_methods[m]["speedup"]["median"])
    return {
        "bench": "draft",
        "command": "engram bench draft --json",
        "env": {"date": time.strftime("%Y-%m-%d"), "python": platform.python_version(),
                "torch": torch.__version__, "cpus": os.cpu_count(), "threads": threads,
                "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None},
        "setup": {"ckpt": str(ckpt), "step": meta.step, "params": model.param_counts(),
                  "data": str(data_dir), "index": str(index_path) if index_path else None,
                  "index_tokens": index.num_tokens if index is not None else 0,
                  "prompts": prompts, "prompt_len": prompt_len, "max_new_tokens": max_new_tokens,
                  "repeats": repeats, "min_match": min_match, "ks": list(ks),
                  "decoding": "greedy" if greedy else f"sampling, temperature {temperature}"},
        "methods": rec_methods,
        "best_k": int(best[1:]),
        "speedup": rec_methods[best]["speedup"]["median"],
        "identical": all(rec_methods[m]["identical"] for m in methods) if greedy else None,
        "acceptance": {m: rec_methods[m]["acceptance"] for m in drafts},
        "mean_accepted": {m: rec_methods[m]["mean_accepted"] for m in drafts},
    }
