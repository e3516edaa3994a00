"""``engram bench query``: what one question costs when knowledge lives in a patch, or in a retriever.

    engram bench query --ckpt ADAPTER --facts F.jsonl --patch P.engp [--questions 60 --repeats 3]

A query is one held-out (test-template) question about a fact of ``F``, answered from its text to
``max_new_tokens`` greedy tokens, batch 1, as a server answers a request. Three ways to answer
take turns on every question, in an order rotated per question, so that a slow moment of a
shared machine hits all of them alike:

    base        the model alone (it knows none of the facts: the floor of the cost)
    patch       the model reading the patch for this request only (``generate(patches=[P])``:
                keyed entries or hashed rows as an overlay; the shared tables are not written)
    retrieval   BM25 (``bm25s``) over the facts' sentences and the distractor sentences, the
                top ``k`` passages put before the question, then the model alone

A prompt longer than the model's positions loses its first tokens (the passages' start), as a
server would cut it. Latency includes everything after the question's text: tokenising, the search (retrieval), the
prompt's forward and the decoding loop. Per round the median latency of each method and its
ratio to base's median in the same round; every round is reported. Also: exact answers (the
greedy continuation starts with the answer), extra prompt tokens, and what adding the facts
costs the retriever (its index build, timed here; the patch's training is timed by the trainer).

Shape legend: T prompt tokens   n new tokens
"""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path
from typing import Any, Optional

import torch

from engram.bench.accel import cpu_name
from engram.bench.config import QueryBenchConfig as _Q
from engram.bench.offload import load_average
from engram.config import SamplingConfig
from engram.errors import EngramError

METHODS = ("base", "patch", "retrieval")


class QueryBenchError(EngramError):
    """Bad ``engram bench query`` input; the message names the fix."""


def _questions(tok: Any, facts: list, n: int) -> list[tuple[int, str, str, str]]:
    """(fact index, question text, answer, subject) of the facts' test templates, round robin over
    the facts so that ``n`` questions cover as many facts as they can."""
    from engram.knowledge.templates import asked, chat_format

    chat = chat_format(tok)
    per_fact = []
    for i, f in enumerate(facts):
        qs = []
        for t in asked(f.relation, "test"):
            prompt, answer, _ = t.render(f.subject, f.answer, chat)
            qs.append((i, prompt, answer, f.subject))
        per_fact.append(qs)
    out: list[tuple[int, str, str, str]] = []
    depth = 0
    while len(out) < n and any(depth < len(q) for q in per_fact):
        out += [q[depth] for q in per_fact if depth < len(q)]
        depth += 1
    return out[:n]


def bench_query(ckpt: str, facts_file: str, patch_file: str, questions: int = _Q.questions,
                max_new_tokens: int = _Q.max_new_tokens, k: int = _Q.k, distractors: int = _Q.distractors,
                repeats: int = _Q.repeats, threads: Optional[int] = _Q.threads,
                progress: bool = True) -> dict[str, Any]:
    from engram.auto.loader import load
    from engram.data.tokenizer import tokenizer_info
    from engram.knowledge.facts import read_facts
    from engram.knowledge.retrieval import FactStore, RetrievalConfig, distractor_sentences
    from engram.patches.patchfile import load_patch

    for name, v, low in (("questions", questions, 1), ("max_new_tokens", max_new_tokens, 1), ("k", k, 1),
                         ("repeats", repeats, 1), ("distractors", distractors, 0)):
        if v < low:
            raise QueryBenchError(f"{name}={v} must be >= {low}")
    if threads:
        torch.set_num_threads(threads)
    model = load(ckpt, progress=progress).eval()
    tok = model.loaded_from.require_tokenizer()
    eos = int(tokenizer_info(tok).eos_id)
    facts, _ = read_facts(facts_file)
    if not facts:
        raise QueryBenchError(f"{facts_file} holds no subject/relation/answer triples; the questions are asked "
                              "about triples")
    patch = load_patch(patch_file)
    stack = [patch]
    model(torch.tensor([[eos]]), patches=stack)  # checks that the patch fits the model, before any timing
    rc = RetrievalConfig(k=k, distractors=distractors)
    t0 = time.perf_counter()
    store = FactStore(facts, distractor_sentences(rc.distractors, rc.sources, rc.seed))
    store_s = time.perf_counter() - t0
    qs = _questions(tok, facts, questions)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)
    limit = getattr(getattr(model, "cfg", None), "max_seq_len", None)

    def answer(method: str, question: str) -> tuple[str, int]:
        """The greedy continuation's text and the prompt's length in tokens."""
        prompt = question
        if method == "retrieval":
            top = store.search([question], k)[0]
            prompt = "\n".join(store.passages[j] for j in top) + "\n\n" + question
        ids = torch.tensor([tok.encode(prompt, add_special_tokens=False).ids])  # [1, T]
        if limit and ids.shape[1] + max_new_tokens > limit:  # passages cut from the front to fit the positions
            ids = ids[:, ids.shape[1] + max_new_tokens - limit:]
        out = model.generate(ids, sampling, eos_id=eos, patches=stack if method == "patch" else None)  # [1, T + n]
        return tok.decode(out[0, ids.shape[1]:].tolist()), int(ids.shape[1])

    with torch.no_grad():
        for m in METHODS:  # warm-up: one question each, untimed
            answer(m, qs[0][1])
        rounds: list[dict[str, list[float]]] = []
        exact = {m: [False] * len(qs) for m in METHODS}
        plen = {m: [0] * len(qs) for m in METHODS}
        from tqdm.auto import tqdm

        bar = tqdm(total=repeats * len(qs) * len(METHODS), desc="queries", disable=not progress, dynamic_ncols=True)
        for r in range(repeats):
            lat: dict[str, list[float]] = {m: [] for m in METHODS}
            for j, (_, question, ans, _) in enumerate(qs):
                shift = (r * len(qs) + j) % len(METHODS)
                for m in METHODS[shift:] + METHODS[:shift]:
                    t = time.perf_counter()
                    text, n_prompt = answer(m, question)
                    lat[m].append(time.perf_counter() - t)
                    exact[m][j] = text.lstrip().startswith(ans.strip())
                    plen[m][j] = n_prompt
                    bar.update()
            rounds.append(lat)
        bar.close()
    med = [{m: statistics.median(lat[m]) for m in METHODS} for lat in rounds]
    summary = {m: {"median_ms_per_round": [1e3 * x[m] for x in med],
                   "p90_ms_per_round": [1e3 * sorted(lat[m])[int(0.9 * (len(lat[m]) - 1))] for lat in rounds],
                   "over_base_per_round": [x[m] / x["base"] for x in med],
                   "exact": sum(exact[m]) / len(qs),
                   "prompt_tokens": sum(plen[m]) / len(qs),
                   "extra_prompt_tokens": (sum(plen[m]) - sum(plen["base"])) / len(qs)} for m in METHODS}
    return {"config": {"ckpt": str(ckpt), "facts_file": str(facts_file), "patch_file": str(patch_file),
                       "questions": len(qs), "facts": len(facts), "max_new_tokens": max_new_tokens, "k": k,
                       "distractors": distractors, "repeats": repeats, "threads": torch.get_num_threads()},
            "machine": {"cpu": cpu_name(), "cores": _cores(), "python": platform.python_version(),
                        "torch": torch.__version__, "load_average_at_end": load_average()},
            "date": time.strftime("%Y-%m-%d"),
            "summary": summary,
            "rounds_ms": [{m: [1e3 * x for x in lat[m]] for m in METHODS} for lat in rounds],
            "add": {"store_build_s": store_s, "store_passages": len(store.passages),
                    "store_fact_bytes": sum(len(p.encode()) for p, o in zip(store.passages, store.owner) if o >= 0),
                    "patch_bytes": Path(patch_file).stat().st_size, "patch_keyed": bool(patch.keyed)}}


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def query_page(r: dict[str, Any], command: str) -> str:
    """The results page of one ``bench_query`` result: every number below is read from ``r``."""
    c, mach, s, add = r["config"], r["machine"], r["summary"], r["add"]
    f = lambda xs, d=1: ", ".join(f"{x:.{d}f}" for x in xs)  # noqa: E731
    lines = [f"# Cost per query: knowledge in a patch vs in a retriever ({r['date']})", "",
             f"Machine: {mach['cpu']}, {mach['cores']} cores; Python {mach['python']}, torch {mach['torch']}, "
             f"{c['threads']} torch thread(s)"
             + (f"; load average at the end {', '.join(map(str, mach['load_average_at_end']))}"
                if mach.get("load_average_at_end") else "") + ". Command:", "", "```", command, "```", "",
             f"{c['questions']} held-out questions about {c['facts']} facts (`{c['facts_file']}`), batch 1, "
             f"{c['max_new_tokens']} greedy new tokens each, {c['repeats']} rounds; the methods take turns on every "
             f"question in a rotating order. Model: `{c['ckpt']}`; patch: `{c['patch_file']}` "
             f"({'keyed entries' if add['patch_keyed'] else 'hashed rows'}, {add['patch_bytes']:,} bytes, read per "
             f"request); retrieval: BM25 over {add['store_passages']:,} passages ({c['distractors']:,} distractor "
             f"sentences), top {c['k']} before the question.", "",
             "| method | median latency per round (ms) | p90 per round (ms) | over base, per round | "
             "answers exact | prompt tokens (extra) |",
             "|---|---|---|---|---|---|"]
    for m in METHODS:
        x = s[m]
        lines.append(f"| {m} | {f(x['median_ms_per_round'])} | {f(x['p90_ms_per_round'])} | "
                     f"{f(x['over_base_per_round'], 2)} | {100 * x['exact']:.1f}% | "
                     f"{x['prompt_tokens']:.1f} ({x['extra_prompt_tokens']:+.1f}) |")
    lines += ["", f"Adding the facts: the BM25 store indexes in {add['store_build_s']:.2f} s "
              f"({add['store_fact_bytes']:,} bytes of the facts' sentences); the patch is trained once, "
              "in minutes (its time is on the fact-edit pages, not measured here).",
              "", "Latency is from the question's text to the answer's last token: tokenising, the search "
              "(retrieval only), the prompt's forward and the decoding loop."]
    return "\n".join(lines) + "\n"
