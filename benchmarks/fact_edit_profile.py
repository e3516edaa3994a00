"""Where a fact-edit step's time goes: the trainer's phases and the torch ops inside them.

    python benchmarks/fact_edit_profile.py --ckpt ADAPTER [--facts 5 --steps 10 --rounds 3 --threads 2
        --autocast off] --out R.json --page R.md

Each round runs one keyed edit as ``engram patch train --edit-keyed`` runs it (every cut on, no
dev questions, so every step trains) under ``torch.profiler``. The trainer labels its phases
(``fact_edit.forward``, ``.neutral_forward`` inside it, ``.backward``, ``.update``); every op's
own CPU time is given to the innermost phase it ran in, so the phases do not overlap, and ops
outside them (the set-up) are left out. Times are per training step; the profiler's own cost
inflates them, so the shares are the figure to read. Every round is reported.
"""

from __future__ import annotations

import platform
import sys
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from engram.auto.loader import load
from engram.bench.accel import cpu_name
from engram.bench.script import run_script, script_parser
from engram.data.tokenizer import tokenizer_info
from engram.knowledge.edit_config import FactEditConfig
from engram.knowledge.editor import edit_facts
from engram.knowledge.facts import invent_facts
from engram.knowledge.scoring import fact_cases
from engram.knowledge.templates import chat_format, templates

PREFIX = "fact_edit."


def _phase_of(event) -> str | None:
    """The innermost trainer phase an event ran in (itself, for a phase label), else None."""
    e = event
    while e is not None:
        if e.name.startswith(PREFIX):
            return e.name[len(PREFIX):]
        e = e.cpu_parent
    return None


def one_round(model, tok, pad: int, train, cfg: FactEditConfig) -> dict:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        res = edit_facts(model, tok, train, cfg, pad_id=pad, progress=False)
        wall = time.perf_counter() - t0
    steps = res.report["steps_run"]
    phase_s: dict[str, float] = defaultdict(float)
    op_s: dict[tuple[str, str], float] = defaultdict(float)
    for e in prof.events():
        phase = _phase_of(e)
        if phase is None:
            continue
        sec = e.self_cpu_time_total / 1e6 / steps  # microseconds over the run -> seconds per step
        phase_s[phase] += sec
        if not e.name.startswith(PREFIX):
            op_s[(phase, e.name)] += sec
    top = sorted(op_s.items(), key=lambda kv: -kv[1])[:15]
    return {"steps": steps, "wall_seconds": wall, "train_seconds_per_step": res.report["train_seconds"] / steps,
            "phase_seconds_per_step": dict(phase_s),
            "top_ops": [{"phase": p, "op": o, "seconds_per_step": s} for (p, o), s in top]}


def measure(ckpt: str, n_facts: int, steps: int, rounds: int, threads: int, neutral_windows: int,
            autocast: str) -> dict:
    torch.set_num_threads(threads)
    model = load(ckpt, progress=False).eval()
    tok = model.loaded_from.require_tokenizer()
    pad = int(tokenizer_info(tok).eos_id)
    cfg = FactEditConfig(steps=steps, keyed=True, neutral_windows=neutral_windows, autocast=autocast)
    facts = invent_facts(n_facts, seed=7)
    train = fact_cases(tok, facts, lambda f: templates(f.relation, "train", cfg.kinds), chat_format(tok), True)
    runs = []
    for r in range(rounds):
        runs.append(one_round(model, tok, pad, train, cfg))
        print(f"round {r}: {runs[-1]['train_seconds_per_step']:.3f} s/step profiled", file=sys.stderr, flush=True)
    return {"date": time.strftime("%Y-%m-%d"),
            "machine": {"cpu": cpu_name(), "capability": torch.backends.cpu.get_cpu_capability(),
                        "python": platform.python_version(), "torch": torch.__version__,
                        "threads": threads},
            "config": {"ckpt": ckpt, "facts": n_facts, "train_sentences": len(train), "steps": steps,
                       "rounds": rounds, "neutral_windows": neutral_windows, "batch_size": cfg.batch_size,
                       "autocast": autocast, "keyed": True,
                       "first_engram_layer": getattr(model, "first_engram_layer", lambda: None)()},
            "runs": runs}


def page(r: dict, command: str) -> str:
    c, m = r["config"], r["machine"]
    runs = r["runs"]
    lines = [f"# Where a fact-edit step's time goes ({r['date']})", "",
             f"Machine: {m['cpu']}{' (' + m['capability'] + ')' if m.get('capability') else ''}; Python {m['python']}, torch {m['torch']}, {m['threads']} torch thread(s). "
             "Command:", "", "```", command, "```", "",
             f"{c['facts']} invented facts ({c['train_sentences']} training sentences), keyed entries, autocast "
             f"{c['autocast']}, batches of {c['batch_size']} plus two neutral windows a step (of "
             f"{c['neutral_windows']}), {c['steps']} steps per round, {c['rounds']} rounds, each under "
             f"torch.profiler; Engram before decoder layer {c['first_engram_layer']}. Each op's own CPU time "
             "goes to the innermost trainer phase it ran in; the set-up is left out. Seconds per training step "
             "as profiled (the profiler adds its own cost; the trainer's own clock, under the profiler, per round: "
             + ", ".join(f"{x['train_seconds_per_step']:.2f}" for x in runs) + " s/step).", "",
             "| phase | seconds per step, per round | share of the step, per round |", "|---|---|---|"]
    phases = sorted({p for x in runs for p in x["phase_seconds_per_step"]},
                    key=lambda p: -runs[0]["phase_seconds_per_step"].get(p, 0.0))
    totals = [sum(x["phase_seconds_per_step"].values()) for x in runs]
    for p in phases:
        secs = [x["phase_seconds_per_step"].get(p, 0.0) for x in runs]
        lines.append(f"| {p} | {', '.join(f'{s:.3f}' for s in secs)} | "
                     f"{', '.join(f'{s / t:.1%}' for s, t in zip(secs, totals))} |")
    lines += ["", "The ops with the most own time in the first round, and their share of its step:", "",
              "| phase | op | seconds per step | share |", "|---|---|---|---|"]
    for o in runs[0]["top_ops"]:
        lines.append(f"| {o['phase']} | `{o['op']}` | {o['seconds_per_step']:.3f} | "
                     f"{o['seconds_per_step'] / totals[0]:.1%} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = script_parser(__doc__)
    p.add_argument("--facts", type=int, default=5)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--neutral-windows", type=int, default=64)
    p.add_argument("--autocast", choices=["off", "bf16"], default="off")
    run = lambda a: measure(a.ckpt, a.facts, a.steps, a.rounds, a.threads, a.neutral_windows, a.autocast)  # noqa: E731
    return run_script(p, run, page, "benchmarks/fact_edit_profile.py")


if __name__ == "__main__":
    raise SystemExit(main())
