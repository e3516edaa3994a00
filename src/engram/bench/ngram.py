"""Benchmarks and experiments of the N-gram memory, written to ``benchmarks/results``.

``bench_vs_infinigram``
    The same tokenized training split indexed by this package and by the PyPI package
    ``infini-gram`` (its Rust indexer fed our token stream directly: documents split at eos and
    written in its ``tokenized.0``/``offset.0`` layout, so its tokenizer step — which would
    download a Hugging Face tokenizer — is skipped). Build time, index size, and per-query
    latency of count / ntd / infgram_ntd on n-grams sampled from the *validation* split, with
    answers cross-checked between the two.

``mixture_experiment``
    Held-out perplexity of the model alone, the N-gram alone, the best fixed lambda and the
    learned gate (val split: even windows fit, odd windows report), for an EngramLM and for a
    plain callable LM; then instant knowledge updates with invented facts (top-1 of the answer
    before ``add``, after it, after ``remove``), model weights checked bit-identical.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from engram.bench.accel import cpu_name
from engram.bench.config import NgramBenchConfig, NgramMixBenchConfig
from engram.data.shards import load_dataset
from engram.errors import EngramError
from engram.fsutil import PathLike, atomic_write
from engram.model.checkpoint import load_model
from engram.ngram import suffix_array as sam
from engram.ngram.facts import facts_documents, invented_facts, model_digest, paraphrase, recall, tokenize_cases
from engram.ngram.index import NgramIndex, UnseenContextError
from engram.ngram.mixture import (
    GateConfig,
    LMAdapter,
    NgramMixture,
    best_fixed,
    collect,
    fixed_lambda_sweep,
    gate_nll,
    gate_weights,
    mixture_nll,
    save_gate,
    train_gate,
)


def _machine() -> str:
    """The CPU model, its cores and the memory, as the pages state them."""
    mem = ""
    try:
        kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal"))
        mem = f", {kib / 2**20:.0f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    return f"{os.cpu_count()}-core {cpu_name()}{mem}, no GPU used"


def _write_results(out_dir: PathLike, stem: str, record: dict[str, Any], markdown: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(record, indent=2, default=float) + "\n"
    atomic_write(out / f"{stem}.json", lambda f: f.write(text.encode("utf-8")))
    atomic_write(out / f"{stem}.md", lambda f: f.write(markdown.encode("utf-8")))


def _env() -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"date": time.strftime("%Y-%m-%d"), "machine": _machine(), "python": platform.python_version(),
            "torch": torch.__version__, "numpy": np.__version__, "cpus": os.cpu_count(),
            "load_average": load}


def _lat(samples_ns: list[int]) -> dict[str, float]:
    a = np.asarray(samples_ns, dtype=np.float64) / 1e3
    return {"median_us": float(np.median(a)), "p90_us": float(np.percentile(a, 90)),
            "mean_us": float(a.mean()), "n": int(a.size)}


def _time_calls(fn: Callable[[Any], Any], queries: list, repeats: int, before_pass: Optional[Callable] = None) -> dict[str, float]:
    samples = []
    for _ in range(repeats):
        if before_pass:
            before_pass()
        for q in queries:
            t0 = time.perf_counter_ns()
            fn(q)
            samples.append(time.perf_counter_ns() - t0)
    return _lat(samples)


def _dir_bytes(path: Path, names: Optional[list[str]] = None) -> int:
    files = [path / n for n in names] if names else [p for p in path.rglob("*") if p.is_file()]
    return int(sum(p.stat().st_size for p in files))


# ----------------------------------------------------------------------------- vs infini-gram
def _write_infinigram_input(tokens: np.ndarray, eos: int, out: Path) -> int:
    """infini-gram v4 layout: each document = b'\\xff\\xff' + its uint16 ids; offsets as uint64."""
    if int(tokens.max()) >= 65535:
        raise EngramError("the comparison writes uint16 ids and needs every id < 65535")
    t = tokens.astype("<u2")
    cuts = np.flatnonzero(t == eos)
    starts = np.r_[0, cuts + 1]
    ends = np.r_[cuts, t.size]  # the last document may lack its eos
    if starts[-1] == ends[-1]:
        starts, ends = starts[:-1], ends[:-1]
    out.mkdir(parents=True, exist_ok=True)
    offsets, off = [], 0
    with open(out / "tokenized.0", "wb") as f:
        for s, e in zip(starts, ends):
            chunk = b"\xff\xff" + t[s:e].tobytes()
            f.write(chunk)
            offsets.append(off)
            off += len(chunk)
    np.asarray(offsets, dtype="<u8").tofile(out / "offset.0")
    return len(offsets)


def _sample_queries(val: np.ndarray, eos: int, lengths: tuple[int, ...], per_len: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    ceos = np.r_[0, np.cumsum(val == eos)]
    out = []
    for n in lengths:
        starts = np.arange(0, val.size - n)
        starts = starts[(ceos[starts + n] - ceos[starts]) == 0]
        pick = rng.choice(starts, size=min(per_len, starts.size), replace=False)
        out += [val[p:p + n].tolist() for p in pick]
    return out


def bench_vs_infinigram(data_dir: PathLike, workdir: PathLike = NgramBenchConfig.workdir,
                        queries: int = NgramBenchConfig.queries, repeats: int = NgramBenchConfig.repeats,
                        out_dir: Optional[PathLike] = NgramBenchConfig.out_dir, progress: bool = True,
                        seed: int = 0, build_repeats: int = NgramBenchConfig.build_repeats) -> dict[str, Any]:
    """Our index against infini-gram on the same training split (the module docstring); writes
    ``ngram_vs_infinigram.json``/``.md`` to ``out_dir`` (unless None) and returns the record."""
    ds = load_dataset(data_dir)
    train = np.asarray(ds.train.tokens, dtype=np.int64)
    val = np.asarray(ds.val.tokens, dtype=np.int64)
    eos, V = ds.eos_id, ds.vocab_size
    work = Path(workdir)
    # Build times first, while nothing else of this bench has run (infini-gram's query engine
    # starts helper threads): both builds, alternating, then our index for the queries.
    builds, builds_error = None, None
    if build_repeats > 0:
        try:
            builds = _interleaved_builds(train, eos, data_dir, work / "builds", build_repeats)
        except Exception as e:  # infini-gram missing or failing: the rest of the bench still runs
            builds_error = f"{type(e).__name__}: {e}"
    index, ours = _build_our_index(work / "index-bench", data_dir, progress)
    count_q, ctx_q, inf_q = _vs_queries(index, val, eos, queries, seed)
    ours.update(_time_our_queries(index, val, count_q, ctx_q, inf_q, repeats))

    record: dict[str, Any] = {"env": _env(), "data": str(data_dir), "train_tokens": int(train.size),
                              "vocab_size": V, "queries": {"count": len(count_q), "ntd": len(ctx_q),
                                                           "infgram": len(inf_q)}, "repeats": repeats,
                              "ours": ours}
    record["env"]["load_average_before_infinigram"] = record["env"].pop("load_average")
    try:
        record["infini_gram"] = _bench_infinigram(train, eos, V, work / "infini-gram", count_q, ctx_q, inf_q,
                                                  repeats, index)
    except Exception as e:  # report precisely why the comparison could not run
        record["infini_gram"] = {"error": f"{type(e).__name__}: {e}"}
    record["env"]["load_average_after_infinigram"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    if builds is not None:
        record["builds"] = builds
    if builds_error:
        record["builds_error"] = builds_error
    record["summary"] = _summary(record)
    if out_dir:
        _write_results(out_dir, "ngram_vs_infinigram", record, _markdown_vs(record))
    return record


def _build_our_index(ours_dir: Path, data_dir: PathLike, progress: bool) -> tuple[NgramIndex, dict[str, Any]]:
    """Index the training split afresh in ``ours_dir``, then time the suffix array alone once more.
    Returns the index and its build seconds and sizes."""
    shutil.rmtree(ours_dir, ignore_errors=True)
    t0 = time.perf_counter()
    index = NgramIndex.from_dataset(ours_dir, data_dir, progress=progress)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    sam.build_suffix_array(np.asarray(index.segments[0].tokens))
    sa_only_s = time.perf_counter() - t0
    segment_bytes = index.segments[0].nbytes
    return index, {"build_s": build_s, "suffix_array_only_s": sa_only_s, "index_bytes": _dir_bytes(ours_dir),
                   "segment_bytes": segment_bytes, "bytes_per_token": segment_bytes / index.num_tokens}


def _vs_queries(index: NgramIndex, val: np.ndarray, eos: int, queries: int,
                seed: int) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """N-grams of the validation split to query: for count (n = 1, 2, 3, 5, 8), for ntd
    (contexts of n = 1, 2, 3, 5 that the index has seen) and for infgram (16-token contexts)."""
    count_q = _sample_queries(val, eos, (1, 2, 3, 5, 8), max(1, queries // 5), seed)
    ctx_q = [q for q in _sample_queries(val, eos, (1, 2, 3, 5), max(1, queries // 4), seed + 1) if index.count(q) > 0]
    inf_q = _sample_queries(val, eos, (16,), queries, seed + 2)
    return count_q, ctx_q, inf_q


def _time_our_queries(index: NgramIndex, val: np.ndarray, count_q: list, ctx_q: list, inf_q: list,
                      repeats: int) -> dict[str, Any]:
    """Latency of our count / ntd / infgram_ntd (caches cleared before every pass) and the
    positions/s of batched infinity-gram + KN-5 distributions over validation windows."""
    clear = lambda: [s._cache.clear() for s in index.segments]  # noqa: E731  cold caches every pass

    def ours_ntd(q):
        try:
            return index.ntd(q)
        except UnseenContextError:
            return None

    out = {
        "count": _time_calls(index.count, count_q, repeats, clear),
        "ntd_full_vocab": _time_calls(ours_ntd, ctx_q, repeats, clear),
        "infgram_ntd_full_vocab": _time_calls(index.infgram_ntd, inf_q, repeats, clear),
        "native_kernel": sam.NATIVE_KERNEL_AVAILABLE,
    }
    # Batched: full-vocabulary distributions for every position of 64 validation windows of 128.
    x = val[: (val.size - 1) // 128 * 128][: 64 * 128].reshape(-1, 128)
    t0 = time.perf_counter()
    index.batch(x[:16], kn_order=5)
    for b in range(16, x.shape[0], 16):
        index.batch(x[b:b + 16], kn_order=5)
    out["batch_infgram_kn5_positions_per_s"] = x.size / (time.perf_counter() - t0)
    return out


def _infinigram_build(train: np.ndarray, eos: int, work: Path) -> tuple[Path, int, float, float]:
    """infini-gram's indexer over our stream in ``work``: (index dir, documents, seconds writing
    its input, seconds of its indexer process)."""
    shutil.rmtree(work, ignore_errors=True)
    idx_dir, raw = work / "index", work / "raw"
    raw.mkdir(parents=True)
    t0 = time.perf_counter()
    docs = _write_infinigram_input(train, eos, idx_dir)
    prep = time.perf_counter() - t0
    cmd = [sys.executable, "-m", "infini_gram.indexing", "--data_dir", str(raw), "--save_dir", str(idx_dir),
           "--token_dtype", "u16", "--cpus", str(os.cpu_count() or 1), "--mem", "4", "--ulimit", "1024"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    build = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"infini_gram.indexing exited {r.returncode}: {r.stderr[-500:]}")
    return idx_dir, docs, prep, build


def _interleaved_builds(train: np.ndarray, eos: int, data_dir: PathLike, work: Path, repeats: int) -> dict[str, Any]:
    """Both builds ``repeats`` times, alternating (ours first in even rounds, theirs in odd), so
    that drift in the machine's speed falls on both: seconds per run and the per-round ratio."""
    ours, theirs = [], []
    for r in range(repeats):
        for side in ((0, 1) if r % 2 == 0 else (1, 0)):
            if side == 0:
                shutil.rmtree(work / "ours", ignore_errors=True)
                t0 = time.perf_counter()
                NgramIndex.from_dataset(work / "ours", data_dir, progress=False)
                ours.append(time.perf_counter() - t0)
            else:
                theirs.append(_infinigram_build(train, eos, work / "infini-gram")[3])
    shutil.rmtree(work, ignore_errors=True)
    return {"ours_s": ours, "infini_gram_s": theirs, "ratio": [a / b for a, b in zip(ours, theirs)]}


def _bench_infinigram(train, eos, V, work: Path, count_q, ctx_q, inf_q, repeats, index) -> dict[str, Any]:
    import importlib.metadata

    from infini_gram.engine import InfiniGramEngine  # local: the optional `ngram-bench` extra

    idx_dir, docs, prep, build = _infinigram_build(train, eos, work)
    res: dict[str, Any] = {
        "version": importlib.metadata.version("infini-gram"), "documents": docs, "prepare_input_s": prep,
        "build_s": build, "index_bytes": _dir_bytes(idx_dir, ["tokenized.0", "table.0", "offset.0"]),
        "configs": {},
    }
    # Its defaults prefetch on helper threads (thousands per second here, which saturate two cores);
    # with prefetching off it is faster on this machine. Both are timed; the summary uses the best.
    for name, kw in (("no_prefetch", dict(ds_prefetch_depth=0, sa_prefetch_depth=0, od_prefetch_depth=0)),
                     ("default", {})):
        e = InfiniGramEngine(index_dir=str(idx_dir), eos_token_id=eos, vocab_size=V, token_dtype="u16", **kw)
        res["configs"][name] = {
            "engine_kwargs": kw,
            "count": _time_calls(e.count, count_q, repeats),
            "ntd_default_max_support_1000": _time_calls(e.ntd, ctx_q, repeats),
            "ntd_exact": _time_calls(lambda q: e.ntd(q, max_support=10**9), ctx_q, repeats),
            "infgram_ntd_default": _time_calls(e.infgram_ntd, inf_q, repeats),
        }
    for key in ("count", "ntd_default_max_support_1000", "ntd_exact", "infgram_ntd_default"):
        best = min(res["configs"].values(), key=lambda c: c[key]["median_us"])
        res[key] = dict(best[key], config=next(k for k, c in res["configs"].items() if c is best))
    eng = InfiniGramEngine(index_dir=str(idx_dir), eos_token_id=eos, vocab_size=V, token_dtype="u16",
                           ds_prefetch_depth=0, sa_prefetch_depth=0, od_prefetch_depth=0)
    res["bytes_per_token"] = res["index_bytes"] / int(train.size)
    # Cross-checks: counts must agree exactly; exact ntd agrees on every token but eos (their
    # documents end in a separator, ours in eos); infgram suffix lengths agree.
    res["count_mismatches"] = sum(int(index.count(q) != eng.count(q)["count"]) for q in count_q)
    diffs, approx = [], 0
    for q in ctx_q[:300]:
        theirs = eng.ntd(q, max_support=10**9)
        approx += int(eng.ntd(q)["approx"])
        mine = index._context_counts(index._cut(np.asarray(q)))
        for tok, v in theirs["result_by_token_id"].items():
            if tok != eos and tok < V:
                diffs.append(abs(int(mine[tok]) - int(v["cont_cnt"])))
    res["ntd_exact_max_count_diff_excl_eos"] = int(max(diffs) if diffs else 0)
    res["ntd_default_approx_fraction"] = approx / max(1, min(300, len(ctx_q)))
    same_len = [int(index.infgram_ntd(q).suffix_len == eng.infgram_ntd(q)["suffix_len"]) for q in inf_q[:300]]
    res["infgram_suffix_len_agreement"] = float(np.mean(same_len)) if same_len else None
    return res


def _summary(rec: dict[str, Any]) -> dict[str, Any]:
    o, t = rec["ours"], rec.get("infini_gram", {})
    s = {"ours_build_s": o["build_s"], "ours_index_mib": o["index_bytes"] / 2**20,
         "ours_count_median_us": o["count"]["median_us"], "ours_ntd_median_us": o["ntd_full_vocab"]["median_us"],
         "ours_infgram_median_us": o["infgram_ntd_full_vocab"]["median_us"],
         "ours_batch_positions_per_s": o["batch_infgram_kn5_positions_per_s"]}
    if "error" in t:
        s["infini_gram"] = t["error"]
    else:
        s.update({"ig_build_s": t["build_s"], "ig_index_mib": t["index_bytes"] / 2**20,
                  "ig_count_median_us": t["count"]["median_us"],
                  "ig_ntd_median_us": t["ntd_default_max_support_1000"]["median_us"],
                  "ig_ntd_exact_median_us": t["ntd_exact"]["median_us"],
                  "ig_infgram_median_us": t["infgram_ntd_default"]["median_us"],
                  "count_mismatches": t["count_mismatches"]})
    if rec.get("builds"):
        b = rec["builds"]
        s.update(ours_build_median_s=float(np.median(b["ours_s"])), ig_build_median_s=float(np.median(b["infini_gram_s"])),
                 build_ratio_range=[min(b["ratio"]), max(b["ratio"])])
    return s


def _fmt_load(load) -> str:
    return "/".join(f"{v:.1f}" for v in load) if load else "n/a"


def _markdown_vs(rec: dict[str, Any]) -> str:
    o, t = rec["ours"], rec.get("infini_gram", {})
    env = rec["env"]
    lines = [f"# N-gram index vs infini-gram — {env['date']}", "",
             f"Machine: {env['machine']}. Load average (1/5/15 min) before the infini-gram part: "
             f"{_fmt_load(env.get('load_average_before_infinigram'))}, after it: "
             f"{_fmt_load(env.get('load_average_after_infinigram'))} — with its default settings infini-gram "
             "starts helper threads per query (thousands per second here), which is what drives the load "
             "average up (ps showed no other CPU-heavy process during these runs). "
             f"Python {env['python']}, torch {env['torch']}, numpy {env['numpy']}.", "",
             f"Corpus: the built-in corpus's train split, {rec['train_tokens']:,} tokens, vocab {rec['vocab_size']:,}. "
             f"Queries sampled from the val split: {rec['queries']['count']} count (n = 1, 2, 3, 5, 8), "
             f"{rec['queries']['ntd']} ntd contexts (n = 1, 2, 3, 5; seen in train), {rec['queries']['infgram']} "
             f"infgram contexts (16 tokens); {rec['repeats']} passes, our caches cleared before each pass.", "",
             f"Command: `{rec.get('command', 'engram bench ngram --data DATA --workdir WORK')}`", ""]
    if "error" in t:
        lines += [f"infini-gram could not run: `{t['error']}`", ""]
        t = {}
    def row(name, a, b=""):
        lines.append(f"| {name} | {a} | {b} |")
    lines += ["| | engram-lm (this package) | infini-gram " + (t.get("version", "") if t else "")
              + (" (best of: prefetch off / default; see below)" if t else "") + " |", "|---|---|---|"]
    row("build (s)", f"{o['build_s']:.2f} (suffix array alone {o['suffix_array_only_s']:.2f})",
        f"{t['build_s']:.2f} (Rust, {rec['env']['cpus']} threads)" if t else "-")
    if rec.get("builds"):
        b = rec["builds"]
        row(f"build (s), {len(b['ours_s'])} runs alternating, before anything else",
            ", ".join(f"{x:.2f}" for x in b["ours_s"]) + f" (median {np.median(b['ours_s']):.2f}; ours / theirs "
            + ", ".join(f"{x:.2f}" for x in b["ratio"]) + ")",
            ", ".join(f"{x:.2f}" for x in b["infini_gram_s"]) + f" (median {np.median(b['infini_gram_s']):.2f})")
    row("index size (MiB)", f"{o['index_bytes'] / 2**20:.1f} ({o['bytes_per_token']:.1f} B/token)",
        f"{t['index_bytes'] / 2**20:.1f} ({t['bytes_per_token']:.1f} B/token)" if t else "-")
    row("count, median / p90 (µs)", f"{o['count']['median_us']:.1f} / {o['count']['p90_us']:.1f}",
        f"{t['count']['median_us']:.1f} / {t['count']['p90_us']:.1f}" if t else "-")
    if t:
        d = t["configs"]["default"]
        row("… infini-gram with its default prefetch threads", "",
            f"count {d['count']['median_us']:.1f}, ntd {d['ntd_default_max_support_1000']['median_us']:.0f}, "
            f"infgram {d['infgram_ntd_default']['median_us']:.0f} (medians, µs)")
    row("ntd, median / p90 (µs)", f"{o['ntd_full_vocab']['median_us']:.1f} / {o['ntd_full_vocab']['p90_us']:.1f} "
        "(exact, dense [V] tensor)",
        (f"{t['ntd_default_max_support_1000']['median_us']:.1f} / {t['ntd_default_max_support_1000']['p90_us']:.1f} "
         f"(max_support=1000: sampled for {t['ntd_default_approx_fraction']:.0%} of contexts, sparse dict); exact: "
         f"{t['ntd_exact']['median_us']:.1f} / {t['ntd_exact']['p90_us']:.1f}") if t else "-")
    row("infgram_ntd, median / p90 (µs)",
        f"{o['infgram_ntd_full_vocab']['median_us']:.1f} / {o['infgram_ntd_full_vocab']['p90_us']:.1f} (dense [V])",
        f"{t['infgram_ntd_default']['median_us']:.1f} / {t['infgram_ntd_default']['p90_us']:.1f} (sparse dict)" if t else "-")
    row("batched ∞-gram + KN-5, every position (positions/s)", f"{o['batch_infgram_kn5_positions_per_s']:,.0f}", "no batch API")
    if t:
        lines += ["", f"Cross-checks: count mismatches {t['count_mismatches']} / {rec['queries']['count']}; exact ntd "
                  f"max count difference (all tokens but eos) {t['ntd_exact_max_count_diff_excl_eos']}; infgram "
                  f"suffix length agreement {t['infgram_suffix_len_agreement']:.1%}."]
    lines += ["", "infini-gram's indexer was fed our token stream (documents split at eos, each written as "
              "`\\xff\\xff` + uint16 ids), so its own tokenizer step, which downloads a Hugging Face tokenizer, "
              "was skipped; its build time excludes writing that input "
              f"({t.get('prepare_input_s', 0):.2f} s) and includes starting its indexer process; ours is timed "
              "in process (NgramIndex.from_dataset: suffix array, statistics, checksums, files).", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- mixture + facts
ESTIMATORS = ("both", "kn", "infgram")
GATE_KINDS = ("features", "hidden_bounded", "hidden")
HIDDEN_BOUND = 0.5


def mixture_experiment(ckpt: PathLike, data_dir: PathLike, workdir: PathLike = NgramMixBenchConfig.workdir,
                       out_dir: Optional[PathLike] = NgramMixBenchConfig.out_dir,
                       max_windows: Optional[int] = NgramMixBenchConfig.max_windows,
                       n_countries: int = NgramMixBenchConfig.n_countries, baseline_ckpt: Optional[PathLike] = None,
                       progress: bool = True) -> dict[str, Any]:
    """Perplexity of the mixtures and instant updates with invented facts (the module docstring);
    writes ``ngram_mixture.json``/``.md`` to ``out_dir`` (unless None) and returns the record.

    ``max_windows`` caps the validation windows scored; ``baseline_ckpt`` adds a second LM,
    wrapped as a plain callable; ``n_countries`` invented countries supply the facts.
    """
    torch.manual_seed(0)  # the gates' initialisation
    ds = load_dataset(data_dir)
    val = np.asarray(ds.val.tokens, dtype=np.int64)
    idx_dir = Path(workdir) / "index"
    t0 = time.perf_counter()
    index = NgramIndex.from_dataset(idx_dir, data_dir, overwrite=True, progress=progress)
    build_s = time.perf_counter() - t0
    model, _ = load_model(ckpt)
    digest0 = model_digest(model)

    runs: dict[str, Any] = {}
    runs["engram-moe"], gates = _evaluate_lm(LMAdapter(model, name=str(ckpt)), index, val,
                                             {"both": GATE_KINDS, "kn": ("features",), "infgram": ("features",)},
                                             max_windows, progress)
    if baseline_ckpt is not None:
        runs["callable:" + Path(baseline_ckpt).name], _ = _evaluate_lm(
            _callable_lm(baseline_ckpt), index, val,
            {"both": ("features",), "kn": ("features",), "infgram": ("features",)}, max_windows, progress)
    _save_gate(gates[("both", "features")], idx_dir / "gates" / Path(ckpt).resolve().name, ds, val, ckpt)
    facts_rec = _instant_update(model, index, gates, runs["engram-moe"]["both"], ds.eos_id, n_countries, digest0)

    record = {"env": _env(), "ckpt": str(ckpt), "baseline_ckpt": str(baseline_ckpt) if baseline_ckpt else None,
              "data": str(data_dir), "index_build_s": build_s, "index_tokens": index.num_tokens,
              "max_windows": max_windows, "kn_order": 5, "runs": runs, "facts": facts_rec}
    record["summary"] = _mix_summary(record)
    if out_dir:
        _write_results(out_dir, "ngram_mixture", record, _markdown_mix(record))
    return record


def _callable_lm(ckpt: PathLike) -> LMAdapter:
    """The run's model behind a plain callable (ids -> logits): the adapter sees no hidden state."""
    base, _ = load_model(ckpt)
    fn = lambda ids: base(ids).logits  # noqa: E731
    return LMAdapter(fn, vocab_size=base.cfg.vocab_size, max_seq_len=base.cfg.max_seq_len)


def _evaluate_lm(lm: LMAdapter, index: NgramIndex, val: np.ndarray, variants: dict[str, tuple[str, ...]],
                 max_windows: Optional[int], progress: bool) -> tuple[dict[str, Any], dict[tuple[str, str], Any]]:
    """Score ``lm`` mixed with ``index`` on the validation split: even windows fit, odd windows report.

    For each estimator of ``variants`` (estimator -> gate kinds to train: "features",
    "hidden_bounded", "hidden"): the N-gram alone, the best fixed lambda (chosen on fit, and the
    oracle one chosen on test) and each learned gate. Returns (the results, the trained gates by
    (estimator, kind)).
    """
    kw = dict(seq_len=128, batch_size=16, max_windows=max_windows, progress=progress, what="val split")
    t0 = time.perf_counter()
    fit = collect(lm, index, val, parity="even", **kw)
    test = collect(lm, index, val, parity="odd", **kw)
    res: dict[str, Any] = {"fit_tokens": len(fit), "test_tokens": len(test),
                           "collect_s": time.perf_counter() - t0, "seconds": test.seconds,
                           "model_loss": float(-test.lm_logp.mean())}
    gates: dict[tuple[str, str], Any] = {}
    for est, kinds in variants.items():
        lam_f, mu_f, _ = best_fixed(fit, est)
        lam_o, mu_o, loss_o = best_fixed(test, est)
        p = test.ngram_p(est, mu_f)
        e: dict[str, Any] = {
            "ngram_alone_loss": float(-p.log().mean()) if bool((p > 0).all()) else float("inf"),
            "ngram_zero_prob_fraction": float((p == 0).float().mean()),
            "fixed_lambda": lam_f, "fixed_mu": mu_f,
            "fixed_loss": float(mixture_nll(test, est, lam_f, mu_f).mean()),
            "oracle_fixed_lambda": lam_o, "oracle_fixed_mu": mu_o, "oracle_fixed_loss": loss_o,
            "fixed_sweep_test_at_fit_mu": fixed_lambda_sweep(test, est, mu=mu_f),
        }
        for kind in kinds:
            cfg = GateConfig(estimator=est, hidden_size=(lm.hidden_size or 0) if kind != "features" else 0,
                             hidden_bound=HIDDEN_BOUND if kind == "hidden_bounded" else 0.0)
            t1 = time.perf_counter()
            gate, info = train_gate(fit, cfg, progress=progress)
            lam, mu = gate_weights(gate, test)
            q = torch.tensor([0.1, 0.5, 0.9])
            e[f"gate_{kind}"] = {"loss": float(gate_nll(gate, test).mean()), "mean_lambda": float(lam.mean()),
                                 "mean_mu": float(mu.mean()),
                                 "lambda_p10_p50_p90": [float(v) for v in torch.quantile(lam, q)],
                                 "train_s": time.perf_counter() - t1, "best_step": info["best_step"]}
            gates[(est, kind)] = gate
        res[est] = e
    return res, gates


def _save_gate(gate: Any, gate_dir: Path, ds: Any, val: np.ndarray, ckpt: PathLike) -> None:
    """Save the default gate next to the index, with what it was fitted on."""
    save_gate(gate, gate_dir, {"fit": {"data_fingerprint": ds.meta["tokenizer_fingerprint"], "split": "val",
                                       "parity": "even", "data_tokens": int(val.size)},
                               "run_dir": str(Path(ckpt).resolve())})


def _instant_update(model: Any, index: NgramIndex, gates: dict[tuple[str, str], Any], fixed: dict[str, Any],
                    eos: int, n_countries: int, digest0: str) -> dict[str, Any]:
    """Facts about ``n_countries`` invented countries: recall (``_recall_all``) before they are
    indexed, after ``add`` and after ``remove``; whether ``remove`` restored every prediction;
    whether the model's weights (``digest0``: before the experiment) stayed untouched. ``fixed``
    holds the fixed mixture's lambda and mu. Returns the record's "facts" part."""
    lm = LMAdapter(model)
    mixtures = {
        "gate": NgramMixture(lm, index, gates[("both", "features")]),
        **{f"gate_{k}": NgramMixture(lm, index, gates[("both", k)]) for k in GATE_KINDS[1:]},
        "fixed": NgramMixture(lm, index, fixed["fixed_lambda"], GateConfig(estimator="both"), mu=fixed["fixed_mu"]),
    }
    facts = invented_facts(n_countries, seed=0, index=index)
    cases = {"same_phrasing": tokenize_cases(facts, index.tokenizer, 0),
             "paraphrase": tokenize_cases(paraphrase(facts, 1), index.tokenizer, 1)}

    before = _recall_all(cases, mixtures, eos)
    t0 = time.perf_counter()
    info = index.add_texts(facts_documents(facts), name="invented-facts", source="invented facts (bench)")
    add_s = time.perf_counter() - t0
    after = _recall_all(cases, mixtures, eos)
    t0 = time.perf_counter()
    index.remove("invented-facts")
    remove_s = time.perf_counter() - t0
    removed = _recall_all(cases, mixtures, eos)
    digest1 = model_digest(model)
    restored = all(before[c][m]["per_fact_top1"] == removed[c][m]["per_fact_top1"]
                   and abs(before[c][m]["mean_p_first"] - removed[c][m]["mean_p_first"]) < 1e-9
                   for c in before for m in before[c])
    for d in (before, after, removed):  # the per-fact lists served the check; the record keeps the rates
        for c in d.values():
            for m in c.values():
                m.pop("per_fact_top1")
    return {"countries": n_countries, "facts": len(facts), "cases": {k: len(v) for k, v in cases.items()},
            "delta_tokens": info.tokens, "add_s": add_s, "remove_s": remove_s,
            "before": before, "after_add": after, "after_remove": removed,
            "restored_exactly_after_remove": restored,
            "model_sha256_before": digest0, "model_sha256_after": digest1,
            "model_untouched": digest0 == digest1,
            "example": {"indexed": facts[0].sentence, "paraphrase_query": paraphrase(facts[:1])[0].sentence}}


def _recall_all(cases: dict[str, list[Any]], mixtures: dict[str, NgramMixture], eos: int) -> dict[str, Any]:
    """Recall of each case set by every predictor: the LM, KN and infgram alone, then the fixed
    and the gated mixtures (``mixtures``: "gate", "fixed", "gate_<kind>")."""
    gate = mixtures["gate"]  # its LM and index also serve the single-predictor modes
    out = {}
    for cname, cs in cases.items():
        out[cname] = {
            "lm": recall(cs, gate, eos, mode="lm"),
            "kn": recall(cs, gate, eos, mode="kn"),
            "infgram": recall(cs, gate, eos, mode="infgram"),
            "mixture_fixed": recall(cs, mixtures["fixed"], eos, mode="mixture"),
            "mixture_gate": recall(cs, gate, eos, mode="mixture"),
            **{f"mixture_{k}": recall(cs, m, eos, mode="mixture") for k, m in mixtures.items()
               if k.startswith("gate_")},
        }
    return out


def _mu(est: str, mu: float) -> str:
    return f", μ={mu:.1f}" if est == "both" else ""


def _gate_cell(g: Optional[dict[str, Any]]) -> str:
    if not g:
        return "-"
    return f"{_ppl(g['loss']):.2f} (mean λ {g['mean_lambda']:.2f}, μ {g['mean_mu']:.2f})"


def _ppl(loss: float) -> float:
    return float(np.exp(loss)) if np.isfinite(loss) else float("inf")


def _mix_summary(rec: dict[str, Any]) -> dict[str, Any]:
    r = rec["runs"]["engram-moe"]
    k = r["both"]
    f = rec["facts"]
    return {"model_ppl": _ppl(r["model_loss"]), "kn5_alone_ppl": _ppl(r["kn"]["ngram_alone_loss"]),
            "fixed_lambda": k["fixed_lambda"], "fixed_mu": k["fixed_mu"], "fixed_ppl": _ppl(k["fixed_loss"]),
            "oracle_fixed_ppl": _ppl(k["oracle_fixed_loss"]), "gate_ppl": _ppl(k["gate_features"]["loss"]),
            "gate_hidden_bounded_ppl": _ppl(k["gate_hidden_bounded"]["loss"]),
            "gate_hidden_ppl": _ppl(k["gate_hidden"]["loss"]),
            "facts_top1_before": f["before"]["same_phrasing"]["mixture_gate"]["top1"],
            "facts_top1_after": f["after_add"]["same_phrasing"]["mixture_gate"]["top1"],
            "facts_top1_after_hidden_bounded": f["after_add"]["same_phrasing"]["mixture_gate_hidden_bounded"]["top1"],
            "facts_top1_after_hidden": f["after_add"]["same_phrasing"]["mixture_gate_hidden"]["top1"],
            "facts_top1_after_remove": f["after_remove"]["same_phrasing"]["mixture_gate"]["top1"],
            "add_s": f["add_s"], "model_untouched": f["model_untouched"],
            "restored_exactly": f["restored_exactly_after_remove"]}


def _markdown_mix(rec: dict[str, Any]) -> str:
    env = rec["env"]
    L = [f"# N-gram memory mixed with the model — {env['date']}", "",
         f"Machine: {env['machine']} (load average 1/5/15 min at the end: "
         f"{_fmt_load(env.get('load_average') or env.get('load_average_at_end'))}). "
         f"Python {env['python']}, torch {env['torch']}.", "",
         f"Model `{rec['ckpt']}`; index = the train split ({rec['index_tokens']:,} tokens, built in "
         f"{rec['index_build_s']:.1f} s). Held-out text = the val split in 128-token windows: even windows fit "
         "the gate and choose the fixed lambda, odd windows report. KN order 5. N-gram side \"both\" = "
         "μ·P_∞gram + (1-μ)·P_KN (μ gated, or fixed and tuned on the fit windows); \"kn\" and \"infgram\" alone.", "",
         f"Command: `{rec.get('command', 'engram bench ngram-mix --ckpt RUN --data DATA --workdir WORK')}`", "",
         "## Held-out perplexity (odd val windows)", "",
         "| LM | N-gram side | model alone | N-gram alone | fixed λ (tuned on fit) | best fixed λ on test (oracle) | learned gate: features (default) | + hidden state, bounded ±0.5 | + hidden state, unbounded |",
         "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rec["runs"].items():
        for est in ESTIMATORS:
            e = r[est]
            gf, gb, gh = (e.get(f"gate_{k}") for k in GATE_KINDS)
            L.append(f"| {name} | {est} | {_ppl(r['model_loss']):.2f} | {_ppl(e['ngram_alone_loss']):.2f}"
                     f"{' (%.0f%% zeros)' % (100 * e['ngram_zero_prob_fraction']) if e['ngram_zero_prob_fraction'] else ''} "
                     f"| {_ppl(e['fixed_loss']):.2f} (λ={e['fixed_lambda']:.2f}{_mu(est, e['fixed_mu'])}) "
                     f"| {_ppl(e['oracle_fixed_loss']):.2f} (λ={e['oracle_fixed_lambda']:.2f}{_mu(est, e['oracle_fixed_mu'])}) "
                     f"| {_gate_cell(gf)} | {_gate_cell(gb)} | {_gate_cell(gh)} |")
    f = rec["facts"]
    L += ["", "## Instant update: invented facts", "",
          f"{f['facts']} facts about {f['countries']} invented countries (capital, currency, language, continent), "
          f"written with the corpus's own templates and indexed with `ngram add` as one delta of "
          f"{f['delta_tokens']:,} tokens in {f['add_s'] * 1000:.0f} ms (removal: {f['remove_s'] * 1000:.0f} ms). "
          f"Example indexed sentence: \"{f['example']['indexed']}\"; its paraphrase query: "
          f"\"{f['example']['paraphrase_query']}\". Score: top-1 of the answer's first token after the prompt "
          "(teacher-forced exact match of the whole answer in brackets).", "",
          "| query | predictor | before add | after add | after remove |", "|---|---|---|---|---|"]
    for cname in ("same_phrasing", "paraphrase"):
        for m in ("lm", "kn", "infgram", "mixture_fixed", "mixture_gate", "mixture_gate_hidden_bounded",
                  "mixture_gate_hidden"):
            cells = []
            for stage in ("before", "after_add", "after_remove"):
                x = f[stage][cname][m]
                cells.append(f"{x['top1']:.1%} ({x['exact_match']:.1%})")
            L.append(f"| {cname} ({f['cases'][cname]}) | {m} | " + " | ".join(cells) + " |")
    L += ["", f"Model weights untouched: {f['model_untouched']} (sha256 of every tensor before and after). "
          f"Every prediction after `remove` equals the one before `add`: {f['restored_exactly_after_remove']}.", ""]
    return "\n".join(L)
