"""Seconds per fact-edit step, side by side in one process, in one of two comparisons:

``--compare precision`` (the default): float32 vs bfloat16 forwards, every decoder layer vs
starting at the first Engram layer. ``--compare precision-now``: float32 vs bfloat16 with every
later cut on, as ``engram patch train`` runs (for CPUs that emulate bfloat16).
``--compare step``: bfloat16 from the first Engram layer as it was (autocast casting the frozen
weights at every call, the output head at every position), then with bfloat16 copies of the
frozen weights, then also with the output head only from each sentence's first position that
reads the edit; and the dev questions' scoring (every position's logits, the answer positions'
only, and those from the streams captured at the first Engram layer).

    python benchmarks/fact_edit_speed.py --ckpt ADAPTER [--compare step --facts 20 --steps 12 --rounds 3] --out R.json --page R.md

Each round runs the variants once, in an order rotated per round, on the same invented facts and
the same settings (keyed entries, no dev questions during training, so every step trains): its
seconds per step (training only) and its set-up (the unedited model's cached distributions,
where the prefix variants also capture the stream entering the first Engram layer). Ratios are
taken within a round, against the first variant; every round is reported.
"""

from __future__ import annotations

import platform
import statistics
import sys
import time
from dataclasses import replace

import torch

from engram.auto.loader import load
from engram.bench.accel import cpu_name
from engram.bench.script import run_script, script_parser
from engram.data.tokenizer import tokenizer_info
from engram.knowledge.edit_config import FactEditConfig
from engram.knowledge.editor import edit_facts
from engram.knowledge.facts import invent_facts
from engram.knowledge.scoring import fact_cases
from engram.knowledge.templates import chat_format, templates

_OLD = {"bf16_copies": False, "skip_unaffected": False}  # the step as the precision comparison measured it
COMPARISONS = {
    "precision": (("float32, every layer", "off", {**_OLD, "skip_prefix": False}),
                  ("float32, from the first Engram layer", "off", _OLD),
                  ("bfloat16, every layer", "bf16", {**_OLD, "skip_prefix": False}),
                  ("bfloat16, from the first Engram layer", "bf16", _OLD)),
    # float32 against bfloat16 as `engram patch train` runs them now (every cut on): on a CPU
    # without AVX-512 or AMX, where torch emulates bfloat16
    "precision-now": (("float32", "off", {}), ("bfloat16", "bf16", {})),
    "step": (("bfloat16 from the first Engram layer (autocast casts, head everywhere)", "bf16", _OLD),
             ("+ bfloat16 copies of the frozen weights", "bf16", {"skip_unaffected": False}),
             ("+ output head from the first read on", "bf16", {})),
}
TITLES = {"precision": "precision and the frozen layers below Engram",
          "precision-now": "float32 against bfloat16, every cut on",
          "step": "bfloat16 weight copies, the output head where the edit acts, dev scoring"}


def dev_scoring(model, tok, pad: int, facts, train, rounds: int) -> list[dict]:
    """Seconds to score the facts' dev questions: every position's logits (as scoring did), the
    answer positions' only, and those from the streams captured at the first Engram layer."""
    from engram.knowledge.editor import _capture
    from engram.knowledge.scoring import ScoredAs, score

    dev = fact_cases(tok, facts, lambda f: templates(f.relation, "dev"), chat_format(tok))
    layer = model.first_engram_layer()
    t0 = time.perf_counter()
    streams = _capture(model, dev, pad, layer)
    capture_s = time.perf_counter() - t0
    ways = (("every position", lambda: score(ScoredAs(model, lambda ids: model(ids)), dev, pad)),
            ("answer positions", lambda: score(model, dev, pad)),
            ("answer positions, from the first Engram layer", lambda: score(model, dev, pad, prefix=(layer, streams))))
    out = []
    for r in range(rounds):
        order = ways[r % len(ways):] + ways[:r % len(ways)]
        for name, fn in order:
            t0 = time.perf_counter()
            res = fn()
            out.append({"round": r, "way": name, "seconds": time.perf_counter() - t0, "questions": len(dev),
                        "capture_seconds": capture_s, "answer_nll": res["answer_nll"], "exact": res["exact"]})
            print(f"round {r}: dev scoring, {name}: {out[-1]['seconds']:.2f} s", file=sys.stderr, flush=True)
    return out


def measure(ckpt: str, n_facts: int, steps: int, rounds: int, threads: int, neutral_windows: int,
            compare: str = "precision") -> dict:
    VARIANTS = COMPARISONS[compare]
    torch.set_num_threads(threads)
    model = load(ckpt, progress=False).eval()
    tok = model.loaded_from.require_tokenizer()
    pad = int(tokenizer_info(tok).eos_id)
    cfg = FactEditConfig(steps=steps, keyed=True, neutral_windows=neutral_windows)
    facts = invent_facts(n_facts, seed=7)
    train = fact_cases(tok, facts, lambda f: templates(f.relation, "train", cfg.kinds), chat_format(tok), True)
    runs = []
    for r in range(rounds):
        order = VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]
        for name, autocast, kwargs in order:
            t0 = time.perf_counter()
            res = edit_facts(model, tok, train, replace(cfg, autocast=autocast), pad_id=pad, progress=False,
                             **kwargs)
            total = time.perf_counter() - t0
            train_s = res.report["train_seconds"]
            runs.append({"round": r, "variant": name, "seconds_per_step": train_s / res.report["steps_run"],
                         "setup_seconds": total - train_s, "answer_loss_last": res.report["answer_loss_last"]})
            print(f"round {r}: {name}: {runs[-1]['seconds_per_step']:.3f} s/step, set-up {total - train_s:.1f} s",
                  file=sys.stderr, flush=True)
    base = VARIANTS[0][0]
    ratio = {name: [next(x for x in runs if x["round"] == r and x["variant"] == base)["seconds_per_step"]
                    / next(x for x in runs if x["round"] == r and x["variant"] == name)["seconds_per_step"]
                    for r in range(rounds)] for name, _, _ in VARIANTS}
    scoring = dev_scoring(model, tok, pad, facts, train, rounds) if compare == "step" else None
    return {"compare": compare, "dev_scoring": scoring, "date": time.strftime("%Y-%m-%d"), "machine": {"cpu": cpu_name(), "capability": torch.backends.cpu.get_cpu_capability(),
                        "python": platform.python_version(),
                                                           "torch": torch.__version__, "threads": threads},
            "config": {"ckpt": ckpt, "facts": n_facts, "train_sentences": len(train), "steps": steps, "rounds": rounds,
                       "neutral_windows": neutral_windows, "batch_size": cfg.batch_size, "keyed": True,
                       "first_engram_layer": model.first_engram_layer() if hasattr(model, "first_engram_layer") else None,
                       "decoder_layers": getattr(model.cfg, "num_layers", None)},
            "runs": runs, "speedup_per_round": ratio}


def page(r: dict, command: str) -> str:
    c, m = r["config"], r["machine"]
    compare = r.get("compare", "precision")
    VARIANTS = COMPARISONS[compare]
    lines = [f"# Fact-edit step time: {TITLES[compare]} ({r['date']})", "",
             f"Machine: {m['cpu']}{' (' + m['capability'] + ')' if m.get('capability') else ''}; Python {m['python']}, torch {m['torch']}, {m['threads']} torch thread(s). "
             "Command:", "", "```", command, "```", "",
             f"{c['facts']} invented facts ({c['train_sentences']} training sentences), keyed entries, batches of "
             f"{c['batch_size']} plus two neutral windows a step (cycling over {c['neutral_windows']}), {c['steps']} steps per run, "
             f"{c['rounds']} rounds, the variants in a rotated order each round. Engram before decoder layer "
             f"{c['first_engram_layer']} of {c['decoder_layers']}: the prefix variants skip the layers below it in "
             "every step.", "",
             f"| variant | seconds per step, per round | speed-up vs {VARIANTS[0][0]}, per round (median) | "
             "set-up seconds, per round |", "|---|---|---|---|"]
    for name, _, _ in VARIANTS:
        rs = [x for x in r["runs"] if x["variant"] == name]
        sp = r["speedup_per_round"][name]
        per_step = ", ".join(f"{x['seconds_per_step']:.3f}" for x in rs)
        setup = ", ".join(f"{x['setup_seconds']:.1f}" for x in rs)
        ratios = ", ".join(f"{v:.2f}" for v in sp)
        lines.append(f"| {name} | {per_step} | {ratios} ({statistics.median(sp):.2f}x) | {setup} |")
    losses = sorted({x["answer_loss_last"] for x in r["runs"]})
    same = ("one value: every run trained the same entries to the same loss" if len(losses) == 1
            else f"{len(losses)} values, spread {losses[-1] - losses[0]:.2e}")
    lines += ["", f"Answer loss after the last step, over every run: {', '.join(f'{v:.6f}' for v in losses)} ({same})."]
    if r.get("dev_scoring"):
        sc = r["dev_scoring"]
        ways = list(dict.fromkeys(x["way"] for x in sc))
        lines += ["", f"Scoring the facts' {sc[0]['questions']} dev questions in float32 (capturing their streams "
                  f"at the first Engram layer, once: {sc[0]['capture_seconds']:.2f} s):", "",
                  f"| scoring | seconds, per round | speed-up vs {ways[0]}, per round | answer NLL | exact |",
                  "|---|---|---|---|---|"]
        for w in ways:
            rs = [x for x in sc if x["way"] == w]
            base = [next(x for x in sc if x["round"] == q["round"] and x["way"] == ways[0])["seconds"] for q in rs]
            secs = ", ".join(f"{x['seconds']:.2f}" for x in rs)
            ratios = ", ".join(f"{b / x['seconds']:.2f}" for b, x in zip(base, rs))
            lines.append(f"| {w} | {secs} | {ratios} | {rs[0]['answer_nll']:.6f} | {rs[0]['exact']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = script_parser(__doc__)
    p.add_argument("--facts", type=int, default=20)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--neutral-windows", type=int, default=64)
    p.add_argument("--compare", choices=sorted(COMPARISONS), default="precision")
    run = lambda a: measure(a.ckpt, a.facts, a.steps, a.rounds, a.threads, a.neutral_windows, a.compare)  # noqa: E731
    return run_script(p, run, page, "benchmarks/fact_edit_speed.py")


if __name__ == "__main__":
    raise SystemExit(main())
