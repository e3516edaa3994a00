"""``engram knowledge ...``: facts written into the Engram tables, asked in other words.

    engram knowledge ask --ckpt ADAPTER --facts facts.jsonl [--patch P.engp]   score the held-out questions
    engram knowledge study --adapters L1=DIR L10=DIR --data DIR --out OUT     the measured study
    engram knowledge counterfactual --base smollm2-135m --out cf.jsonl         capitals it knows, edited
    engram knowledge rome --base smollm2-135m --subject France --answer Rome    one ROME edit, before/after
    engram knowledge bench --base smollm2-135m --counterfactual cf.jsonl --out OUT   methods side by side

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

from engram.cli.flags import add_common, add_config_flags, add_page_flags, config_from_args
from engram.errors import EngramError
from engram.knowledge.edit_config import FactEditConfig

# torch-free copies for the flags' choices (tests check they match the modules' own)
PHASES = ("grid", "forms", "keyed", "test", "control", "update", "capacity", "summary")  # engram.science.fact_edit's
BENCH_METHODS = ("none", "oracle", "retrieval", "rome", "patch", "patch+retrieval", "keyed-patch", "lora", "ngram",
                 "patch-composed", "keyed-patch-composed")  # engram.knowledge.bench's
BENCH_SETS = ("counterfactual", "new")


def _load(ckpt: str, quiet: bool) -> tuple[Any, Any, int]:
    """(model, tokenizer, pad id) of a training run or a retrofit adapter (engram.load), tables in
    memory. Padding only ever sits after the last scored token, so any id serves: end-of-text."""
    from engram.auto.loader import load
    from engram.data.tokenizer import tokenizer_info

    model = load(ckpt, progress=not quiet)
    tok = model.loaded_from.require_tokenizer()
    return model.eval(), tok, int(tokenizer_info(tok).eos_id)


def _emit_json(args: argparse.Namespace, obj: Any) -> bool:
    """Write ``obj`` as JSON to ``--out`` (atomically) when given, and print it with ``--json``;
    True when it was printed (the caller prints its table otherwise)."""
    if args.out:
        from engram.fsutil import atomic_write

        data = (json.dumps(obj, indent=1) + "\n").encode()
        atomic_write(args.out, lambda f: f.write(data))
    if args.json:
        print(json.dumps(obj, indent=1))
    return bool(args.json)


def _load_model(args: argparse.Namespace) -> tuple[Any, Any, int]:
    """--base NAME (the pretrained base alone) or --ckpt DIR (a run or an adapter), exactly one."""
    if bool(args.base) == bool(args.ckpt):
        raise EngramError("give exactly one of --base NAME (e.g. smollm2-135m) or --ckpt DIR")
    if args.ckpt:
        return _load(args.ckpt, args.quiet)
    from engram.retrofit.base import load_base

    base = load_base(args.base, progress=not args.quiet)
    return base.model, base.tokenizer, base.pad_id


def cmd_counterfactual(args: argparse.Namespace) -> int:
    from engram.knowledge.counterfact import (
        CounterfactError,
        capital_facts,
        known_fractions,
        make_counterfacts,
        write_counterfacts,
    )

    if not 0.0 < args.min_fraction <= 1.0:
        raise CounterfactError(f"--min-fraction {args.min_fraction}; give a fraction in (0, 1]")
    model, tok, pad = _load_model(args)
    facts = capital_facts()
    fractions = known_fractions(model, tok, facts, pad)
    known = [f for f, x in zip(facts, fractions) if x >= args.min_fraction - 1e-9]
    if len(known) < 2:
        raise CounterfactError(f"the model knows {len(known)} of {len(facts)} capitals (held-out questions "
                               f"answered >= {args.min_fraction:g}); an edit set needs at least 2: lower "
                               f"--min-fraction or use a model that knows more")
    edits, neighbours = make_counterfacts(known, args.n or len(known) // 2, args.seed, args.neighbours or None)
    npath = write_counterfacts(args.out, edits, neighbours)
    res = {"capital_facts": len(facts), "known": len(known), "min_fraction": args.min_fraction,
           "known_at": {f"{t:g}": sum(x >= t - 1e-9 for x in fractions) for t in (1.0, 0.8, 0.6, 0.4, 0.2)},
           "edits": len(edits), "neighbours": len(neighbours), "out": str(args.out), "neighbours_out": str(npath)}
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"{len(known)} of {len(facts)} capitals known (held-out questions answered: "
              f">= {args.min_fraction:g}); {len(edits)} edits -> {args.out}, {len(neighbours)} neighbours -> {npath}")
    return 0


def _top(model: Any, tok: Any, prompt: str, answer: str) -> dict[str, Any]:
    """The greedy next token after ``prompt`` and the probability of ``answer``'s first token."""
    import torch

    from engram.knowledge.scoring import encode_case

    case = encode_case(tok, prompt, answer)
    with torch.no_grad():
        p = torch.softmax(model(torch.tensor([case.prompt_ids])).logits[0, -1].float(), -1)
    return {"prompt": prompt, "top1": tok.decode([int(p.argmax())]), "p_answer": float(p[case.answer_ids[0]])}


def cmd_rome(args: argparse.Namespace) -> int:
    import time

    import torch

    from engram.knowledge.facts import Fact
    from engram.knowledge.rome import RomeConfig, RomeEditor, down_proj
    from engram.knowledge.scoring import fact_cases, logprobs, neutral_change, neutral_windows, score
    from engram.knowledge.templates import chat_format, templates
    from engram.knowledge.templates import verbatim as templates_verbatim

    model, tok, pad = _load_model(args)
    fact = Fact(args.subject, args.relation, args.answer)
    neighbours = []
    for spec in args.neighbour or ():
        subject, _, answer = spec.partition("=")
        if not answer:
            raise EngramError(f"--neighbour {spec!r}: write SUBJECT=ANSWER (e.g. Germany=Berlin)")
        neighbours.append(Fact(subject, args.relation, answer))
    verbatim = templates_verbatim(args.relation)
    chat = chat_format(tok)
    held_out = lambda facts: fact_cases(tok, facts, lambda f: templates(f.relation, "test"), chat)

    def measure() -> dict[str, Any]:
        out = {"edit": _top(model, tok, verbatim.render(fact.subject, fact.answer)[0], fact.answer),
               "paraphrases_exact": score(model, held_out([fact]), pad)["exact"],
               "paraphrases": [_top(model, tok, t.render(fact.subject, fact.answer, chat)[0], fact.answer)
                               for t in templates(args.relation, "test")]}
        if neighbours:
            out["neighbours"] = [_top(model, tok, verbatim.render(f.subject, f.answer)[0], f.answer)
                                 for f in neighbours]
            out["neighbours_exact"] = score(model, held_out(neighbours), pad)["exact"]
        return out

    cfg = RomeConfig(layer=args.layer, steps=args.steps, lr=args.lr, kl_weight=args.kl_weight,
                     cov_windows=args.cov_windows)
    t0 = time.time()
    editor = RomeEditor(model, tok, cfg, cov_windows=neutral_windows(tok, "train", cfg.cov_windows,
                                                                     cfg.cov_window_len))
    cov_s = time.time() - t0
    windows = neutral_windows(tok, "eval", 8, 128)
    before_lp = logprobs(model, windows)
    before = measure()
    w0 = down_proj(model, cfg.layer).weight.detach().clone()
    t0 = time.time()
    edit = editor.edit(fact)
    edit_s = time.time() - t0
    after = measure()
    after["neutral"] = neutral_change(model, windows, before_lp)
    editor.revert_all()
    res = {"fact": {"subject": fact.subject, "relation": fact.relation, "answer": fact.answer},
           "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
           "before": before, "after": after, "optimisation": edit.stats, "bytes": edit.nbytes,
           "covariance_seconds": cov_s, "edit_seconds": edit_s,
           "reverted_bit_for_bit": bool(torch.equal(down_proj(model, cfg.layer).weight, w0))}
    if not _emit_json(args, res):
        for name, r in (("before", before), ("after", after)):
            e = r["edit"]
            line = f"{name:<7} {e['prompt']!r} -> {e['top1']!r} (p({fact.answer})={e['p_answer']:.3f}); " \
                   f"held-out exact {100 * r['paraphrases_exact']:.0f}%"
            if neighbours:
                line += f"; neighbours exact {100 * r['neighbours_exact']:.0f}% " + \
                        ", ".join(f"{n['prompt'].split()[-2]}->{n['top1']!r}" for n in r["neighbours"])
            print(line)
        print(f"neutral-text KL {after['neutral']['kl']:.4f}; reverted bit for bit: {res['reverted_bit_for_bit']}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from engram.fsutil import atomic_write
    from engram.knowledge.bench import Bench, BenchConfig, table
    from engram.knowledge.counterfact import neighbours_path, read_counterfacts
    from engram.knowledge.facts import read_facts
    from engram.knowledge.memory import MemoryConfig
    from engram.knowledge.retrieval import RetrievalConfig
    from engram.knowledge.rome import RomeConfig

    if args.page_only:  # the page from the run files on disk; no model is loaded, nothing runs
        from engram.knowledge.bench import write_page

        if not args.page:
            raise EngramError("--page-only needs --page FILE")
        print(write_page(args.out, args.page, args.page_command or " ".join(sys.argv), args.page_machine))
        return 0
    if not args.counterfactual:
        raise EngramError("give --counterfactual FILE (from `engram knowledge counterfactual`), or --page-only")
    counterfacts = read_counterfacts(args.counterfactual)
    neighbours, _ = read_facts(neighbours_path(args.counterfactual))
    cfg = BenchConfig(methods=tuple(args.methods), sets=tuple(args.sets), seeds=tuple(args.seeds), facts=args.facts,
                      neighbours=args.neighbours, retrieval=RetrievalConfig(k=args.k, distractors=args.distractors),
                      rome=RomeConfig(layer=args.rome_layers[0], steps=args.rome_steps),
                      rome_layers=tuple(args.rome_layers),
                      memory=MemoryConfig(data=args.ngram_data, lambdas=tuple(args.ngram_lambdas)),
                      edit=config_from_args(args, FactEditConfig), lora_ranks=tuple(args.lora_ranks),
                      lora_lrs=tuple(args.lora_lrs))
    model, tok, pad = _load_model(args)
    recs = Bench(model, tok, pad, cfg, counterfacts, neighbours).run_all(args.out, progress=not args.quiet)
    if args.page:
        from engram.knowledge.bench import write_page

        write_page(args.out, args.page, args.page_command or " ".join(sys.argv), args.page_machine)
    md = table(recs)
    data = md.encode()
    atomic_write(Path(args.out) / "summary.md", lambda f: f.write(data))
    print(json.dumps(recs, indent=1, default=float) if args.json else md)
    return 0


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
                          rows=args.rows, neutral_windows=args.neutral_windows, keyed=args.keyed,
                          autocast=args.autocast, dev_questions=args.dev_questions, max_seconds=args.max_seconds)
    cfg = FactEditStudyConfig(form_sets=form_sets, neutral_sets=tuple(args.neutral_sets), facts=args.facts, dev_facts=args.dev_facts, seeds=tuple(args.seeds),
                              lrs=tuple(args.lrs), keyed_lrs=tuple(args.keyed_lrs), capacity=tuple(args.capacity), update_facts=args.update_facts,
                              train_forms_questions=args.train_forms_questions, edit=edit)
    summary = run_study(adapters, tok, pad, args.data, args.out, cfg, phases=args.phases, extend=not args.no_extend,
                        compare_forms=not args.all_forms)
    if "summary" in args.phases:
        if args.page:
            from engram.science.fact_edit import write_results_page

            write_results_page(args.out, args.page, args.page_command or " ".join(sys.argv), args.page_machine)
        print(json.dumps(summary, indent=1, default=float) if args.json else
              (Path(args.out) / "summary.md").read_text())
    return 0


def cmd_reach(args: argparse.Namespace) -> int:
    from engram.knowledge.collisions import reach, reach_table

    model, tok, _ = _load(args.ckpt, args.quiet)
    kinds = tuple(args.kinds) if args.kinds else FactEditConfig().kinds
    FactEditConfig(kinds=kinds, rows=args.rows)  # a misspelt kind or rows fails with its one-line message
    rows = reach(model, tok, args.facts, kinds=kinds, rows=args.rows, seed=args.seed, neutral_tokens=args.tokens)
    if not _emit_json(args, rows):
        print(reach_table(rows))
    return 0


def _add_model_flags(parser: Any) -> None:
    """``--ckpt`` or ``--base``: the model :func:`_load_model` loads."""
    add_common(parser, "--ckpt", help="a retrofit adapter or a training run (or give --base)")
    parser.add_argument("--base", help="a pretrained base alone, e.g. smollm2-135m (or give --ckpt)")


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

    c = p.add_parser("counterfactual", help="CounterFact-style edits of the capitals a model knows, with a "
                     "neighbourhood of known capitals that must stay right")
    _add_model_flags(c)
    add_common(c, "--out", required=True, help="the edits, JSON lines (the neighbourhood goes next to it)")
    c.add_argument("--n", type=int, default=0, help="edits (default: half the known facts; at most all but one)")
    c.add_argument("--neighbours", type=int, default=0,
                   help="known, unedited facts kept as the neighbourhood (default: all the others)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--min-fraction", type=float, default=0.5,
                   help="a fact is known when the model answers at least this fraction of its held-out questions")
    add_common(c, "--quiet")
    add_common(c, "--json")
    c.set_defaults(fn=cmd_counterfactual)

    r = p.add_parser("rome", help="one ROME edit (rank-one MLP update) measured before and after, then reverted")
    _add_model_flags(r)
    r.add_argument("--subject", required=True)
    r.add_argument("--answer", required=True, help="the new answer, e.g. Rome")
    r.add_argument("--relation", default="capital", help="whose templates ask it (default capital)")
    r.add_argument("--neighbour", action="append", metavar="SUBJECT=ANSWER",
                   help="a fact that must stay right (repeatable), e.g. Germany=Berlin")
    r.add_argument("--layer", type=int, default=4, help="decoder layer whose MLP is edited")
    r.add_argument("--steps", type=int, default=20)
    r.add_argument("--lr", type=float, default=0.5)
    r.add_argument("--kl-weight", type=float, default=0.0625, help="the essence KL (0: off)")
    r.add_argument("--cov-windows", type=int, default=64, help="128-token windows of neutral text for C")
    add_common(r, "--out", help="also write the numbers here as JSON")
    add_common(r, "--quiet")
    add_common(r, "--json")
    r.set_defaults(fn=cmd_rome)

    b = p.add_parser("bench", help="the knowledge benchmark: methods side by side on counterfactual and new facts "
                     "(one JSON per run, resumable)")
    _add_model_flags(b)
    b.add_argument("--counterfactual",
                   help="edits from `engram knowledge counterfactual` (its .neighbours.jsonl next to it)")
    add_common(b, "--out", required=True, help="benchmark directory (runs/*.json, summary.md)")
    b.add_argument("--methods", nargs="+", default=["none", "oracle", "retrieval", "rome"],
                   choices=BENCH_METHODS)
    b.add_argument("--sets", nargs="+", default=list(BENCH_SETS), choices=BENCH_SETS)
    b.add_argument("--seeds", type=int, nargs="+", default=[0], help="one fact set per seed: new facts drawn "
                   "again; counterfactual: seed 0 the file's edits, later seeds new answers for its subjects")
    b.add_argument("--facts", type=int, default=100, help="facts per run")
    b.add_argument("--neighbours", type=int, default=100)
    b.add_argument("--k", type=int, default=3, help="retrieval: passages before each question")
    b.add_argument("--distractors", type=int, default=10_000, help="retrieval: built-in sentences in the store")
    b.add_argument("--rome-layers", type=int, nargs="+", default=[4],
                   help="rome: one run per decoder layer; the page chooses one on dev questions")
    b.add_argument("--rome-steps", type=int, default=20)
    b.add_argument("--ngram-data", help="ngram: the dataset directory of the model's training text (from "
                   "`engram retrofit data` or `engram data prepare`), indexed once; the facts are a delta")
    b.add_argument("--ngram-lambdas", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9],
                   help="ngram: the fixed mixture weights to choose from on dev questions")
    b.add_argument("--lora-ranks", type=int, nargs="+", default=[8], help="lora: one run per rank (alpha 2 x rank)")
    b.add_argument("--lora-lrs", type=float, nargs="+", default=[1e-3],
                   help="lora: Adam learning rates of the LoRA weights, one run each (the page marks the dev choice)")
    add_page_flags(b, "also write a results page here, from every run in --out", machine="2-core CPU")
    b.add_argument("--page-only", action="store_true", help="only write --page from the run files in --out")
    add_config_flags(b, FactEditConfig)  # the patch methods' trainer: --edit-lr, --edit-steps, ...
    add_common(b, "--quiet")
    add_common(b, "--json")
    b.set_defaults(fn=cmd_bench)

    h = p.add_parser("reach", help="the rows an edit of N facts trains, and how much neutral text reads them "
                     "through the hash (before any training)")
    add_common(h, "--ckpt", required=True, help="a retrofit adapter or a training run")
    h.add_argument("--facts", type=int, nargs="+", default=[25, 100, 300, 1000], help="fact counts to measure")
    h.add_argument("--kinds", nargs="+", help="training forms (default: the trainer's)")
    h.add_argument("--rows", default="subject", choices=["all", "subject"])
    h.add_argument("--seed", type=int, default=0, help="seed of the invented facts")
    h.add_argument("--tokens", type=int, default=50_000, help="tokens of neutral text to read")
    add_common(h, "--out", help="also write the rows as JSON here")
    add_common(h, "--quiet")
    add_common(h, "--json")
    h.set_defaults(fn=cmd_reach)

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
    s.add_argument("--dev-questions", type=int, default=0,
                   help="score at most this many dev questions per evaluation, a fixed sample (0: all; for large "
                        "capacity runs; such runs get a '-devqN' key suffix)")
    s.add_argument("--train-forms-questions", type=int, default=0, metavar="N",
                   help="score at most N training-form questions per edit, a fixed sample (0: all; at 1,000 facts "
                        "all 34,000 take longer to score, before and after, than hundreds of training steps)")
    s.add_argument("--max-seconds", type=float, default=0.0,
                   help="stop each edit's training after this budget (0: none; such runs get a '-maxsN' key suffix, "
                        "and the page marks where the budget stopped them)")
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--kl-weight", type=float, default=1.0, help="grid only: a diagnostic without the KL terms")
    s.add_argument("--neutral-kl-weight", type=float, default=1.0)
    s.add_argument("--layer-lr", type=float, default=0.0,
                   help="grid only: the positive control (the Engram layer's own weights train too)")
    s.add_argument("--rows", default="subject", choices=["all", "subject"],
                   help="grid only: which rows the recipe trains (both are recipe choices, made on dev)")
    s.add_argument("--keyed", action="store_true",
                   help="train N-gram-keyed entries whatever the keyed phase chose (runs keyed so get a '-keyed' key "
                        "suffix; the summary reports them under their own recipe unless dev chose keyed)")
    s.add_argument("--autocast", default="off", choices=["off", "bf16"],
                   help="the edits' training forwards in bfloat16 (runs so get a '-bf16' key suffix; scoring stays "
                        "float32)")
    s.add_argument("--keyed-lrs", type=float, nargs="*", default=[], metavar="LR",
                   help="keyed phase: learning rates of keyed entries tried beside the chosen one (the grid is extended "
                        "at its edge unless --no-extend)")
    add_page_flags(s, "with the summary phase: also write a results page here", machine="2-core CPU")
    s.add_argument("--phases", nargs="+", default=list(PHASES), choices=list(PHASES),
                   help="what to run (each is resumable; grids of several adapters may run in separate processes)")
    s.add_argument("--form-sets", nargs="+", metavar="KIND+KIND",
                   help="forms phase: the sets of training forms to compare with the default ones (default: every "
                        "kind, and statement+question)")
    s.add_argument("--neutral-windows", type=int, default=16,
                   help="neutral-text windows of the KL term until the forms phase chooses (the study's runs on "
                        "disk were keyed from 16)")
    s.add_argument("--neutral-sets", type=int, nargs="+", default=[], metavar="N",
                   help="forms phase: after the forms, compare these neutral-text window counts (of 64 tokens) "
                        "for the KL term")
    s.add_argument("--all-forms", action="store_true",
                   help="forms phase: choose adapter x rows x lr only, and train on every form without comparing "
                        "fewer (recorded as not compared on the page)")
    s.add_argument("--no-extend", action="store_true",
                   help="run exactly --lrs (to split a grid over processes); the forms phase then refuses a "
                   "choice at the grid's edge")
    add_common(s, "--quiet")
    add_common(s, "--json")
    s.set_defaults(fn=cmd_study)
