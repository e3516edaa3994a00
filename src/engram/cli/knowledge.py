"""``engram knowledge ...``: facts written into the Engram tables, asked in other words.

    engram knowledge ask --ckpt ADAPTER --facts facts.jsonl [--patch P.engp]   score the held-out questions
    engram knowledge study --adapters L1=DIR L10=DIR --data DIR --out OUT     the measured study

Teaching itself is ``engram patch train --ckpt ADAPTER --facts facts.jsonl --out facts.engp``
(:mod:`engram.cli.patch`). Handlers import the library lazily, inside the function, so that
``engram --help`` does not load torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from engram.cli.flags import add_common
from engram.errors import EngramError

PHASES = ("grid", "forms", "test", "control", "update", "capacity", "summary")  # engram.science.fact_edit's


def _load(ckpt: str, quiet: bool) -> tuple[Any, Any, int]:
    """(model, tokenizer, pad id) of a training run or a retrofit adapter (engram.load), tables in
    memory. Padding only ever sits after the last scored token, so any id serves: end-of-text."""
    from engram.auto.loader import load
    from engram.data.tokenizer import tokenizer_info

    model = load(ckpt, progress=not quiet)
    tok = model.loaded_from.require_tokenizer()
    return model.eval(), tok, int(tokenizer_info(tok).eos_id)


def cmd_ask(args: argparse.Namespace) -> int:
    from engram.knowledge.facts import read_facts
    from engram.knowledge.scoring import fact_cases, score
    from engram.knowledge.templates import chat_format, templates
    from engram.patches.apply import apply_to_model

    model, tok, pad = _load(args.ckpt, args.quiet)
    for p in args.patch or ():
        apply_to_model(model, p)
    facts, _ = read_facts(args.facts)
    chat = chat_format(tok)
    res = {}
    for split in ("train", "dev", "test"):
        cases = fact_cases(tok, facts, lambda f: templates(f.relation, split), chat)
        res[split] = {k: v for k, v in score(model, cases, pad).items() if k != "per_case_exact"}
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        for split, r in res.items():
            name = {"train": "training forms", "dev": "dev questions", "test": "held-out questions"}[split]
            print(f"{name:<20} exact {100 * r['exact']:5.1f}%  first-token top-1 {100 * r['top1']:5.1f}%  ({r['n']} asked)")
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from engram.knowledge.editor import FactEditConfig
    from engram.science.fact_edit import FactEditStudyConfig, run_study

    form_sets = (tuple(tuple(f.split("+")) for f in args.form_sets) if args.form_sets
                 else FactEditStudyConfig.form_sets)
    for kinds in form_sets:  # a misspelt kind fails now, not after the grid
        FactEditConfig(kinds=kinds)
    adapters, tok, pad = {}, None, 0
    for spec in args.adapters if args.phases != ["summary"] else ():  # a summary reads only the run files
        name, _, path = spec.partition("=")
        if not path:
            raise EngramError(f"--adapters {spec!r}: write NAME=DIR (e.g. L1=runs/adapter-l1)")
        adapters[name], tok, pad = _load(path, args.quiet)
    edit = FactEditConfig(steps=args.steps, eval_every=args.eval_every, batch_size=args.batch_size,
                          kl_weight=args.kl_weight, neutral_kl_weight=args.neutral_kl_weight, layer_lr=args.layer_lr,
                          rows=args.rows)
    cfg = FactEditStudyConfig(form_sets=form_sets, facts=args.facts, dev_facts=args.dev_facts, seeds=tuple(args.seeds),
                              lrs=tuple(args.lrs), capacity=tuple(args.capacity), update_facts=args.update_facts,
                              edit=edit)
    summary = run_study(adapters, tok, pad, args.data, args.out, cfg, phases=args.phases, extend=not args.no_extend,
                        compare_forms=not args.all_forms)
    if "summary" in args.phases:
        if args.page:
            from engram.science.fact_edit import write_results_page

            write_results_page(args.out, args.page, args.page_command or " ".join(sys.argv), args.page_machine)
        print(json.dumps(summary, indent=1, default=float) if args.json else
              (Path(args.out) / "summary.md").read_text())
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("knowledge", help="facts in the Engram tables: ask them, measure the edits"
                       ).add_subparsers(dest="sub", required=True)
    a = p.add_parser("ask", help="score a facts file's training forms, dev and held-out questions")
    add_common(a, "--ckpt", required=True, help="a retrofit adapter or a training run")
    a.add_argument("--facts", required=True, help="JSON lines: subject / relation / answer")
    a.add_argument("--patch", nargs="*", help="patches to apply first, in order (the table file is not written)")
    add_common(a, "--quiet")
    add_common(a, "--json")
    a.set_defaults(fn=cmd_ask)

    s = p.add_parser("study", help="fact edits on invented facts: dev choices, test seeds, control, updates")
    s.add_argument("--adapters", nargs="+", required=True, metavar="NAME=DIR",
                   help="adapters of one base to choose from on dev (e.g. L1=DIR L10=DIR)")
    add_common(s, "--data", required=True, help="the adapters' dataset (invented names are checked absent)")
    add_common(s, "--out", required=True, help="study directory (resumable)")
    s.add_argument("--facts", type=int, default=100)
    s.add_argument("--dev-facts", type=int, default=40)
    s.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    s.add_argument("--lrs", type=float, nargs="+", default=[0.03, 0.1, 0.3])
    s.add_argument("--capacity", type=int, nargs="*", default=[25, 300])
    s.add_argument("--update-facts", type=int, default=25)
    s.add_argument("--steps", type=int, default=300)
    s.add_argument("--eval-every", type=int, default=25)
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--kl-weight", type=float, default=1.0, help="grid only: a diagnostic without the KL terms")
    s.add_argument("--neutral-kl-weight", type=float, default=1.0)
    s.add_argument("--layer-lr", type=float, default=0.0,
                   help="grid only: the positive control (the Engram layer's own weights train too)")
    s.add_argument("--rows", default="subject", choices=["all", "subject"],
                   help="grid only: which rows the recipe trains (both are recipe choices, made on dev)")
    s.add_argument("--page", help="with the summary phase: also write a results page here")
    s.add_argument("--page-command", help="the commands that made the runs, shown on the page")
    s.add_argument("--page-machine", default="2-core CPU", help="the machine, shown on the page")
    s.add_argument("--phases", nargs="+", default=list(PHASES), choices=list(PHASES),
                   help="what to run (each is resumable; grids of several adapters may run in separate processes)")
    s.add_argument("--form-sets", nargs="+", metavar="KIND+KIND",
                   help="forms phase: the sets of training forms to compare with the default ones (default: every "
                        "kind but usage, and statement+question)")
    s.add_argument("--all-forms", action="store_true",
                   help="forms phase: choose adapter x rows x lr only, and train on every form without comparing "
                        "fewer (recorded as not compared on the page)")
    s.add_argument("--no-extend", action="store_true",
                   help="run exactly --lrs (to split a grid over processes); the forms phase then refuses a "
                   "choice at the grid's edge")
    add_common(s, "--quiet")
    add_common(s, "--json")
    s.set_defaults(fn=cmd_study)
