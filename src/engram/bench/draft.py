"""``engram bench draft``: speculative decoding with drafts from memory vs plain decoding and vs
transformers' prompt-lookup decoding.

Same model, same prompts, one process, one torch thread. Prompts are held-out windows of the
validation split (``--data``), or the first ``prompts`` texts of ``--prompts-file FILE``: one prompt per line, as
``engram generate`` reads it, or for a ``.jsonl`` file one JSON object per line with the prompt
under ``"text"`` (the format ``engram retrofit data --files`` reads; prompts may span lines).
Before anything is timed, every prompt is checked against the index: the longest run of its
tokens found there (every window of every length, ``NgramIndex.longest_match``) is reported, and
a run of ``leak_tokens`` or more is refused (the drafter would be copying the prompt's own source).

Each round runs every prompt through every method back to back, the methods in a rotating order,
so that each method's time on a prompt is paired in time with the others' and a slow moment of
a shared machine does not always hit the same one:

- ``plain``: ``engram.model.generation.generate``, one token per forward (what ``engram generate``
  runs without ``--draft``): the baseline of every ratio;
- ``ngram:K``: the speculative loop with ``NgramDrafter`` (index + the generation's own text,
  prompt included), for each K of ``ks`` (K = 0: the loop without a drafter, its own overhead),
  and ``ngram:K fixed`` for each K of ``fixed_ks`` (always drafting up to K, not adapting);
- for a retrofitted Hugging Face model, also transformers' own ``generate()`` of the base with
  Engram in it: ``hf`` (plain greedy; ``hf_plain``) and ``prompt-lookup:K`` (``prompt_lookup_num_tokens=K``),
  for each K of ``prompt_lookup`` (greedy only).

Reported per method: tokens/s (median over rounds, min-max spread), the speedup over ``plain``
(ratio of tokens/s within each round; every round's ratio kept), acceptance rate (accepted /
drafted tokens), mean accepted length and tokens per forward (the prompt's forward included;
for transformers' methods counted from the base's forward calls); ``identical``: every greedy
output equals ``plain``'s.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from engram.bench.config import DraftBenchConfig as _D
from engram.config import DraftConfig, SamplingConfig
from engram.data.shards import load_dataset
from engram.errors import EngramError
from engram.fsutil import PathLike
from engram.model.generation import generate
from engram.ngram.draft import NgramDrafter
from engram.ngram.index import LeakageError, NgramIndex
from engram.ngram.speculative import EngramTarget, generate_speculative

PLAIN = "plain"


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


def read_prompts_file(path: PathLike) -> list[str]:
    """The prompts of a file: one per line (blank lines skipped), as ``engram generate
    --prompts-file`` reads them, or, for a ``.jsonl`` file, one JSON object per line with the
    prompt under ``"text"`` (prompts with line breaks)."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise EngramError(f"--prompts-file {p}: cannot read it ({e}); give a UTF-8 text file with one prompt "
                          f"per line, or a .jsonl file with one {{\"text\": ...}} object per line") from None
    jsonl = p.suffix == ".jsonl"
    texts = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if not jsonl:
            texts.append(line)
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise EngramError(f"{p}:{i}: not JSON ({e.msg}); write one {{\"text\": ...}} object per line") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str) or not obj["text"]:
            raise EngramError(f"{p}:{i}: expected an object with a non-empty \"text\" string, got {line[:60]!r}")
        texts.append(obj["text"])
    if not texts:
        raise EngramError(f"--prompts-file {p} holds no prompts")
    return texts


def leakage(index: NgramIndex, prompts: list[list[int]], leak_tokens: int) -> dict[str, Any]:
    """The longest run of each prompt's tokens found in ``index``; LeakageError when one reaches
    ``leak_tokens``."""
    longest = [index.longest_match(p)[0] for p in prompts]
    worst = int(np.argmax(longest))
    if longest[worst] >= leak_tokens:
        raise LeakageError(f"prompt {worst} has a run of {longest[worst]} tokens (of {len(prompts[worst])}) that "
                           f"occurs in the index {index.path} (limit --leak-tokens {leak_tokens}): the drafter "
                           f"would copy its source. Use prompts held out from the indexed text")
    return {"longest_match": longest, "max": longest[worst], "prompt_tokens": [len(p) for p in prompts],
            "limit": leak_tokens}


def _stats(values: list[float]) -> dict[str, Any]:
    a = np.asarray(values, dtype=np.float64)
    return {"median": float(np.median(a)), "min": float(a.min()), "max": float(a.max()),
            "all": [float(v) for v in a]}


class _ForwardCounter:
    """Counts the base's forward calls and their new positions while transformers generates."""

    def __init__(self, module: torch.nn.Module):
        self.calls: list[int] = []
        self.handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.calls.append(int(ids.shape[1]))

    def close(self) -> None:
        self.handle.remove()


def _hf_runner(model: Any, max_new_tokens: int, eos: int, lookup: Optional[int]
               ) -> Callable[[torch.Tensor], tuple[list[int], dict]]:
    """transformers' greedy ``generate()`` of a retrofitted model (prompt lookup with ``lookup``)."""
    from transformers import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=eos,
                           prompt_lookup_num_tokens=lookup)

    def run(x: torch.Tensor) -> tuple[list[int], dict]:
        counter = _ForwardCounter(model.base)
        try:
            out = model.generate(x, generation_config=cfg)[0].tolist()
        finally:
            counter.close()
        new, forwards = len(out) - x.shape[1], len(counter.calls)
        drafted = sum(t - 1 for t in counter.calls[1:])  # each later call: the last token + candidates
        accepted = max(new - forwards, 0)  # each call emits its accepted candidates + one token
        return out, {"new_tokens": new, "forwards": forwards, "drafted": drafted, "accepted": accepted,
                     "draft_steps": sum(t > 1 for t in counter.calls[1:])}

    return run


def bench_draft(ckpt: PathLike, data_dir: Optional[PathLike] = None, index_path: Optional[PathLike] = None, *,
                prompts_file: Optional[str] = _D.prompts_file, ks: tuple[int, ...] = _D.ks,
                fixed_ks: tuple[int, ...] = _D.fixed_ks, hf_plain: bool = _D.hf_plain,
                prompt_lookup: tuple[int, ...] = _D.prompt_lookup, prompts: int = _D.prompts,
                prompt_len: int = _D.prompt_len, max_new_tokens: int = _D.max_new_tokens, repeats: int = _D.repeats,
                min_match: int = _D.min_match, leak_tokens: int = _D.leak_tokens, threads: int = _D.threads,
                seed: int = _D.seed, temperature: float = _D.temperature, progress: bool = True) -> dict[str, Any]:
    """The benchmark record (see the module docstring); ``index_path`` None: text-only drafts.

    ``temperature`` > 0 samples (seed per prompt): outputs then differ from the baseline's by
    design (same distribution, other draws), so ``identical`` is None, only speed and acceptance
    are compared, and transformers' methods are left out."""
    from engram.auto.loader import load
    from engram.retrofit.model import RetrofitLM

    if repeats < 1 or prompts < 1 or max_new_tokens < 1:
        raise EngramError(f"repeats={repeats}, prompts={prompts} and max_new_tokens={max_new_tokens} must be >= 1")
    if data_dir is None and prompts_file is None:
        raise EngramError("bench draft needs prompts: --data (held-out windows of its val split) or --prompts-file FILE")
    torch.set_num_threads(threads)
    model = load(ckpt)
    model.eval()
    source = model.loaded_from
    index = NgramIndex.open(index_path) if index_path else None
    ds = load_dataset(data_dir) if data_dir is not None else None
    if ds is not None and source.tokenizer_fingerprint and source.tokenizer_fingerprint != ds.meta["tokenizer_fingerprint"]:
        raise EngramError(f"model {ckpt} was trained with another tokenizer than dataset {data_dir}")
    if index is not None and source.tokenizer_fingerprint and index.fingerprint != source.tokenizer_fingerprint:
        raise EngramError(f"index {index_path} was built with another tokenizer than model {ckpt}")
    eos = ds.eos_id if ds is not None else index.eos_id if index is not None else _model_eos(model)
    if prompts_file is not None:
        tok = source.require_tokenizer()
        ps = [tok.encode(t).ids for t in read_prompts_file(prompts_file)[:prompts]]
    else:
        ps = heldout_prompts(np.asarray(ds.val.tokens, dtype=np.int64), eos, prompts, prompt_len, seed)
    leak = leakage(index, ps, leak_tokens) if index is not None else None
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    greedy = temperature == 0
    target = EngramTarget(model)
    drafts = {f"ngram:{k}": DraftConfig(max_len=k, min_match=min_match) if k else None for k in ks}
    drafts.update({f"ngram:{k} fixed": DraftConfig(max_len=k, min_match=min_match, adaptive=False) for k in fixed_ks})
    hf: dict[str, Callable] = {}
    if greedy and isinstance(model, RetrofitLM):
        if hf_plain:
            hf["hf"] = _hf_runner(model, max_new_tokens, eos, None)
        hf.update({f"prompt-lookup:{k}": _hf_runner(model, max_new_tokens, eos, k) for k in prompt_lookup})

    def run(method: str, prompt: list[int]) -> tuple[list[int], Optional[dict]]:
        x = torch.tensor([prompt])
        if method == PLAIN:
            return generate(model, x, sampling, eos_id=eos)[0].tolist(), None
        if method in hf:
            with torch.no_grad():
                return hf[method](x)
        # a fresh drafter per generation: its lookup memo must not carry over between runs
        cfg = drafts[method]
        drafter = NgramDrafter(index, cfg) if cfg is not None else None
        r = generate_speculative(target, drafter, x, sampling, eos_id=eos, progress=False)
        return r.ids[0].tolist(), r.stats()

    methods = [PLAIN, *hf, *drafts]
    for m in methods:  # warm-up: first-call allocations, lazily built index caches
        run(m, ps[0])
    seconds = {m: [0.0] * repeats for m in methods}
    tokens = {m: [0] * repeats for m in methods}
    outputs: dict[str, list[list[int]]] = {m: [] for m in methods}
    draft_stats: dict[str, list[dict]] = {m: [] for m in methods}
    bar = tqdm(total=repeats * len(ps), desc="bench draft", unit="prompt", disable=not progress)
    for r in range(repeats):
        for i, p in enumerate(ps):  # every method on this prompt back to back: paired in time
            turn = (r * len(ps) + i) % len(methods)
            for m in methods[turn:] + methods[:turn]:
                t0 = time.perf_counter()
                ids, s = run(m, p)
                seconds[m][r] += time.perf_counter() - t0
                tokens[m][r] += len(ids) - len(p)
                if r == 0:
                    outputs[m].append(ids)
                    if s is not None:
                        draft_stats[m].append(s)
            bar.update(1)
    bar.close()
    base = outputs[PLAIN]
    base_tps = [n / s for n, s in zip(tokens[PLAIN], seconds[PLAIN])]
    rec_methods: dict[str, Any] = {}
    for m in methods:
        tps = [n / s for n, s in zip(tokens[m], seconds[m])]
        ratio = [a / b for a, b in zip(tps, base_tps)]  # within a round: same machine state
        entry: dict[str, Any] = {"tokens_per_s": _stats(tps), "speedup": _stats(ratio),
                                 "identical": outputs[m] == base if greedy else None,
                                 "prompts_identical": sum(a == b for a, b in zip(outputs[m], base))}
        st = draft_stats[m]
        if st:
            drafted, accepted = sum(s["drafted"] for s in st), sum(s["accepted"] for s in st)
            entry.update({
                "acceptance": accepted / drafted if drafted else None,
                "mean_accepted": accepted / max(sum(s["draft_steps"] for s in st), 1),
                "tokens_per_forward": sum(s["new_tokens"] for s in st) / max(sum(s["forwards"] for s in st), 1),
                "drafted": drafted, "accepted": accepted,
            })
        rec_methods[m] = entry
    ours = [m for m in methods if drafts.get(m) is not None] or [PLAIN]
    best = max(ours, key=lambda m: rec_methods[m]["speedup"]["median"])
    meta = source.meta
    return {
        "bench": "draft",
        "command": "engram bench draft --json",
        "env": {"date": time.strftime("%Y-%m-%d"), "python": platform.python_version(),
                "torch": torch.__version__, "cpus": os.cpu_count(), "threads": threads,
                "machine": platform.machine(),
                "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None},
        "setup": {"ckpt": str(ckpt), "model": type(model).__name__, "step": getattr(meta, "step", None),
                  "params": model.param_counts(), "data": str(data_dir) if data_dir is not None else None,
                  "prompts_file": str(prompts_file) if prompts_file is not None else None,
                  "index": str(index_path) if index_path else None,
                  "index_tokens": index.num_tokens if index is not None else 0,
                  "prompts": len(ps), "prompt_tokens": [len(p) for p in ps], "max_new_tokens": max_new_tokens,
                  "repeats": repeats, "min_match": min_match, "ks": list(ks), "fixed_ks": list(fixed_ks),
                  "prompt_lookup": list(prompt_lookup) if hf else [],
                  "decoding": "greedy" if greedy else f"sampling, temperature {temperature}"},
        "leakage": leak,
        "methods": rec_methods,
        "best": best,
        "speedup": rec_methods[best]["speedup"]["median"],
        "identical": all(rec_methods[m]["identical"] for m in methods) if greedy else None,
        "acceptance": {m: rec_methods[m].get("acceptance") for m in methods if m != PLAIN},
    }


def _model_eos(model: Any) -> int:
    """The eos id of a model without a dataset or index to read it from."""
    base = getattr(model, "base", None)
    eos = getattr(getattr(base, "config", None), "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    if eos is None:
        from engram.data.tokenizer import special_ids

        eos = special_ids(model.loaded_from.require_tokenizer())[1]
    return int(eos)


def _machine_state(records: list[dict], cpus: int, threads: int) -> str:
    """How busy the machine was, from the 1-minute load average each record took at its end: at
    most the benchmark's own threads (+ 0.5 of slack for short system tasks) reads as alone."""
    loads = [(r["env"].get("load_average") or [float("inf")])[0] for r in records]
    if max(loads) <= threads + 0.5:
        return f"alone on a {cpus}-CPU machine (nothing else running; load averages below)"
    return f"on a shared {cpus}-CPU machine (other jobs running; load averages below)"


def draft_page(records: list[dict], command: str) -> str:
    """A results page (markdown) of one or more bench records (e.g. one per prompt set), every
    number read from them."""
    lines = ["# Drafting from memory vs transformers' prompt lookup", ""]
    envs = {(r["env"]["date"], r["env"]["cpus"], r["env"]["threads"], r["env"]["torch"]) for r in records}
    for date, cpus, threads, torch_v in sorted(envs):
        mine = [r for r in records if r["env"]["date"] == date and r["env"]["threads"] == threads]
        lines.append(f"Measured {date} {_machine_state(mine, cpus, threads)}, {threads} torch thread, "
                     f"torch {torch_v}. This page: `{command}`.")
    lines += ["",
              "Every method runs every prompt back to back, in a rotating order, each round; the speedup "
              "is the ratio of tokens/s to `plain` (the library's one-token-per-forward loop) within a "
              "round, the median over rounds with every round's ratio listed. `hf` is transformers' own "
              "greedy `generate()` of the retrofitted model; `prompt-lookup:K` is it with "
              "`prompt_lookup_num_tokens=K`; `ngram:K` is `engram generate --draft ngram:K` (the N-gram "
              "index and the generation's own text, prompt included; the draft length adapts to "
              "rejections) and `ngram:K fixed` the same with `--draft-fixed`. Identical: every greedy output "
              "equals `plain`'s token for token.", ""]
    for r in records:
        s = r["setup"]
        where = s["prompts_file"] or f"{s['prompts']} held-out windows of {s['data']}'s val split"
        leak = r.get("leakage")
        params = s["params"]
        lines += [f"## {s['ckpt']} ({s['model']}), prompts: {where}", "",
                  f"Model: {params['total'] / 1e6:.1f}M parameters ({params['engram'] / 1e6:.1f}M of them Engram's), "
                  f"trained {s['step']} steps. "
                  f"{s['prompts']} prompts of {min(s['prompt_tokens'])}-{max(s['prompt_tokens'])} tokens, "
                  f"{s['max_new_tokens']} new tokens, greedy, {s['repeats']} rounds; index "
                  f"{s['index']} ({s['index_tokens']:,} tokens). Load average at the end: "
                  f"{', '.join(f'{x:.2f}' for x in r['env']['load_average'] or [])}. Measured with:", "",
                  "```", r["command"], "```", ""]
        if leak is not None:
            lines.append(f"Leakage check: the longest run of a prompt's tokens found in the index is "
                         f"{leak['max']} tokens (per prompt: {', '.join(map(str, leak['longest_match']))}; "
                         f"limit {leak['limit']}).")
        lines += ["", "| method | tokens/s (median, min-max) | speedup vs plain (median; each round) | "
                  "acceptance | tokens per forward | identical |", "|---|---|---|---|---|---|"]
        for name, m in r["methods"].items():
            t, x = m["tokens_per_s"], m["speedup"]
            acc = f"{m['acceptance']:.1%}" if m.get("acceptance") is not None else "-"
            tpf = f"{m['tokens_per_forward']:.2f}" if "tokens_per_forward" in m else "1.00"
            ident = {True: "yes", False: f"no ({m['prompts_identical']}/{s['prompts']})", None: "-"}[m["identical"]]
            lines.append(f"| `{name}` | {t['median']:.1f} ({t['min']:.1f}-{t['max']:.1f}) | "
                         f"{x['median']:.2f}x ({', '.join(f'{v:.2f}' for v in x['all'])}) | {acc} | {tpf} | {ident} |")
        lines.append("")
    return "\n".join(lines)
