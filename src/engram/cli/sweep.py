"""``engram sweep``: iso-parameter experiment grids (see ``engram.science.sweep`` and docs/science.md).

    engram sweep run  --data D --out DIR (--name rho|table-size|baselines|bigram|historian|smoke | --spec S.json)
    engram sweep plan (--name ... | --spec ...)            budgets of every config, no training
    engram sweep summary --out DIR (--name ... | --spec ...)  table, paired tests, PNG plots
    engram sweep account --preset P [--set ...]            parameter / FLOP accounting of one config

Handlers import the library lazily, inside the function, so that ``engram --help`` does not load torch.
"""

from __future__ import annotations

import json
from pathlib import Path

from engram.cli.flags import add_common, int_list
from engram.config import PRESETS, build_configs


def _spec(args):
    from engram.science.sweep import BUILTIN_SWEEPS, SweepError, builtin_sweep, load_spec

    if bool(args.name) == bool(args.spec):
        raise SweepError(f"give exactly one of --name ({', '.join(BUILTIN_SWEEPS)}) or --spec FILE.json")
    seeds = int_list(args.seeds, "--seeds") if args.seeds else None
    if args.spec:
        spec = load_spec(args.spec)
        if seeds:
            spec.seeds = tuple(seeds)
        if args.steps:
            spec.train = {**spec.train, "steps": args.steps}
        return spec
    return builtin_sweep(args.name, args.vocab_size, seeds, args.steps)


def _vocab_from_data(args) -> None:
    if getattr(args, "data", None):
        meta = Path(args.data) / "meta.json"
        if meta.is_file():
            args.vocab_size = int(json.loads(meta.read_text())["vocab_size"])


def cmd_run(args) -> int:
    from engram.science.sweep import run_sweep, write_summary

    _vocab_from_data(args)
    spec = _spec(args)
    out = Path(args.out)
    runs = Path(args.runs) if args.runs else out / "runs"
    only = args.only.split(",") if args.only else None
    run_sweep(spec, args.data, runs, workers=args.workers, threads=args.threads,
              max_seconds=args.max_seconds, progress=not args.quiet, only=only)
    s = write_summary(spec, runs, out, plots=not args.no_plots)
    _print_summary(s)
    return 0


def _print_summary(s) -> None:
    from engram.science.sweep import summary_table

    print(summary_table(s))
    print(f"{s['runs_done']}/{s['runs_total']} runs finished" +
          (f"; missing: {', '.join(s['missing'])}" if s["missing"] else ""))
    for p in s.get("plots", []):
        print(f"plot: {p}")


def cmd_plan(args) -> int:
    from engram.science.accounting import format_account
    from engram.science.sweep import resolve

    spec = _spec(args)
    for r in resolve(spec):
        print(f"{r.name:<24} {format_account(r.account)}  {r.note}")
    print(f"{len(spec.configs)} configs x {len(spec.seeds)} seeds = {len(spec.configs) * len(spec.seeds)} runs")
    return 0


def cmd_summary(args) -> int:
    from engram.science.sweep import SweepSpec, write_summary

    spec = _spec(args)
    if args.only:  # summarise a subset (the reference is always kept: it anchors the paired tests)
        keep = set(args.only.split(",")) | {spec.reference}
        d = spec.to_dict()
        d["configs"] = [c for c in d["configs"] if c["name"] in keep]
        spec = SweepSpec.from_dict(d)
    out = Path(args.out)
    s = write_summary(spec, Path(args.runs) if args.runs else out / "runs", out, plots=not args.no_plots)
    _print_summary(s)
    return 0


def cmd_account(args) -> int:
    from engram.science.accounting import account

    mcfg, tcfg = build_configs(args.preset, args.vocab_size, args.config, args.set)
    print(json.dumps(account(mcfg, tcfg.seq_len), indent=2))
    return 0


def register(sub) -> None:
    sw = sub.add_parser("sweep", help="iso-parameter experiment grids with seeds, paired tests and plots")
    ss = sw.add_subparsers(dest="sweep_cmd", required=True)

    def spec_args(p) -> None:
        # spelt out: the names' tuple (engram.science.sweep.BUILTIN_SWEEPS) would import torch at --help
        p.add_argument("--name", help="built-in sweep: rho, table-size, baselines, bigram, historian, smoke")
        p.add_argument("--spec", help="JSON sweep spec (see docs/science.md)")
        p.add_argument("--seeds", help="comma-separated seeds (default: the sweep's)")
        p.add_argument("--steps", type=int, help="override train.steps")
        p.add_argument("--vocab-size", type=int, default=4096, help="for --name without --data")

    r = ss.add_parser("run", help="run (or resume) every unfinished run, then summarise")
    spec_args(r)
    add_common(r, "--data", required=True)
    add_common(r, "--out", required=True, help="summary/plots directory")
    r.add_argument("--runs", help="run directories (default OUT/runs; share it between sweeps)")
    r.add_argument("--workers", type=int, default=1, help="runs in parallel (processes)")
    r.add_argument("--threads", type=int, default=1, help="torch threads per run")
    r.add_argument("--max-seconds", type=float, help="stop (and save) after this wall-clock budget")
    r.add_argument("--only", help="comma-separated config names to run")
    r.add_argument("--no-plots", action="store_true")
    add_common(r, "--quiet")
    r.set_defaults(fn=cmd_run)

    p = ss.add_parser("plan", help="print the configs and their parameter/FLOP budgets")
    spec_args(p)
    p.set_defaults(fn=cmd_plan)

    s = ss.add_parser("summary", help="summary table, paired t-tests and plots of finished runs")
    spec_args(s)
    add_common(s, "--out", required=True, help="summary/plots directory")
    s.add_argument("--runs")
    s.add_argument("--only", help="comma-separated config names to summarise (plus the reference)")
    s.add_argument("--no-plots", action="store_true")
    s.set_defaults(fn=cmd_summary)

    a = ss.add_parser("account", help="parameter and FLOP accounting of a preset")
    a.add_argument("--preset", default="engram-moe", choices=sorted(PRESETS))
    a.add_argument("--config")
    a.add_argument("--set", action="append", default=[])
    a.add_argument("--vocab-size", type=int, default=4096)
    a.set_defaults(fn=cmd_account)
