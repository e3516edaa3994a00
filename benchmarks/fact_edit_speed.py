"""Seconds per fact-edit step: float32 vs bfloat16 forwards, every decoder layer vs starting at the
first Engram layer, side by side in one process.

    python benchmarks/fact_edit_speed.py --ckpt ADAPTER [--facts 20 --steps 12 --rounds 3] --out R.json --page R.md

Each round runs the four variants once, in an order rotated per round, on the same invented facts
and the same settings (keyed entries, no dev questions, so every step trains): its seconds per
step (training only) and its set-up (the unedited model's cached distributions, where the
prefix variants also capture the stream entering the first Engram layer). Ratios are taken
within a round, against float32 with every layer; every round is reported.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import replace

import torch

from engram.auto.loader import load
from engram.bench.accel import cpu_name
from engram.data.tokenizer import tokenizer_info
from engram.fsutil import atomic_write
from engram.knowledge.edit_config import FactEditConfig
from engram.knowledge.editor import edit_facts
from engram.knowledge.facts import invent_facts
from engram.knowledge.scoring import fact_cases
from engram.knowledge.templates import chat_format, templates

VARIANTS = (("float32, every layer", "off", False), ("float32, from the first Engram layer", "off", True),
            ("bfloat16, every layer", "bf16", False), ("bfloat16, from the first Engram layer", "bf16", True))


def measure(ckpt: str, n_facts: int, steps: int, rounds: int, threads: int, neutral_windows: int) -> dict:
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
        for name, autocast, prefix in order:
            t0 = time.perf_counter()
            res = edit_facts(model, tok, train, replace(cfg, autocast=autocast), pad_id=pad, progress=False,
                             skip_prefix=prefix)
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
    return {"date": time.strftime("%Y-%m-%d"), "machine": {"cpu": cpu_name(), "python": platform.python_version(),
                                                           "torch": torch.__version__, "threads": threads},
            "config": {"ckpt": ckpt, "facts": n_facts, "train_sentences": len(train), "steps": steps, "rounds": rounds,
                       "neutral_windows": neutral_windows, "batch_size": cfg.batch_size, "keyed": True,
                       "first_engram_layer": model.first_engram_layer() if hasattr(model, "first_engram_layer") else None,
                       "decoder_layers": getattr(model.cfg, "num_layers", None)},
            "runs": runs, "speedup_per_round": ratio}


def page(r: dict, command: str) -> str:
    c, m = r["config"], r["machine"]
    lines = [f"# Fact-edit step time: precision and the frozen layers below Engram ({r['date']})", "",
             f"Machine: {m['cpu']}; Python {m['python']}, torch {m['torch']}, {m['threads']} torch thread(s). "
             "Command:", "", "```", command, "```", "",
             f"{c['facts']} invented facts ({c['train_sentences']} training sentences), keyed entries, batches of "
             f"{c['batch_size']} plus two neutral windows a step (cycling over {c['neutral_windows']}), {c['steps']} steps per run, "
             f"{c['rounds']} rounds, the variants in a rotated order each round. Engram before decoder layer "
             f"{c['first_engram_layer']} of {c['decoder_layers']}: the prefix variants skip the layers below it in "
             "every step.", "",
             "| variant | seconds per step, per round | speed-up vs float32 every layer, per round (median) | "
             "set-up seconds, per round |", "|---|---|---|---|"]
    for name, _, _ in VARIANTS:
        rs = [x for x in r["runs"] if x["variant"] == name]
        sp = r["speedup_per_round"][name]
        per_step = ", ".join(f"{x['seconds_per_step']:.3f}" for x in rs)
        setup = ", ".join(f"{x['setup_seconds']:.1f}" for x in rs)
        ratios = ", ".join(f"{v:.2f}" for v in sp)
        lines.append(f"| {name} | {per_step} | {ratios} ({statistics.median(sp):.2f}x) | {setup} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", help="the adapter (required unless --from-json)")
    p.add_argument("--from-json", help="do not measure: write --page from this earlier --out")
    p.add_argument("--page-command", help="the command shown on the page (default: this one)")
    p.add_argument("--facts", type=int, default=20)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--neutral-windows", type=int, default=64)
    p.add_argument("--out")
    p.add_argument("--page")
    a = p.parse_args()
    if a.from_json:
        r = json.loads(open(a.from_json, encoding="utf-8").read())
    elif not (a.ckpt and a.out):
        p.error("give --ckpt and --out (or --from-json to render a page)")
    else:
        r = measure(a.ckpt, a.facts, a.steps, a.rounds, a.threads, a.neutral_windows)
        data = (json.dumps(r, indent=1) + "\n").encode()
        atomic_write(a.out, lambda f: f.write(data))
    if a.page:
        text = page(r, a.page_command or "python benchmarks/fact_edit_speed.py " + " ".join(sys.argv[1:])).encode()
        atomic_write(a.page, lambda f: f.write(text))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
