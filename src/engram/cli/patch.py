"""``engram patch ...`` and ``engram bench patch``: pluggable knowledge for the Engram tables.

    engram patch train --ckpt RUN --data NEW.txt --out P.engp [--table T.engt]   train a patch
    engram patch apply T.engt P.engp [P2.engp ...]      apply in order, each one atomically
    engram patch revert T.engt P.engp                   write the patch's old rows back
    engram patch list T.engt                            the applied chain, bottom first
    engram patch info P.engp                            a patch file's metadata
    engram bench patch                                  the held-out-facts experiment (docs/patches.md)
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def _print(res: Any, as_json: bool, text: str) -> None:
    print(json.dumps(res, indent=2, default=str) if as_json else text)


def cmd_train(args: argparse.Namespace) -> int:
    from engram.patches.trainer import PatchTrainConfig, train_patch_from_run

    cfg = PatchTrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                           table_lr_mult=args.table_lr_mult, warmup_steps=args.warmup_steps,
                           train_gates=args.train_gates, anchor=args.anchor,
                           protect_min_count=args.protect_min_count, rehearsal=args.rehearsal,
                           rehearsal_batch_size=args.rehearsal_batch_size,
                           quantization=args.quantize, seed=args.seed)
    res = train_patch_from_run(args.ckpt, args.data, args.out, cfg, table=args.table, name=args.name or "",
                               dtype=args.dtype, original_data=args.original_data,
                               progress=not (args.quiet or args.json))
    rows = sum(res["changed_rows"].values())
    text = (f"wrote {res['patch']} (patch {res['patch_id']}, parent {res['parent'] or '-'}): {rows:,} rows "
            f"changed of {sum(res['table_rows'].values()):,}, {res['patch_bytes']:,} bytes "
            f"({res['size_ratio']:.2%} of the {res['table_bytes']:,}-byte table); loss "
            f"{res['loss_first']:.3f} -> {res['loss_last']:.3f} in {res['steps']} steps, "
            f"{res['train_s']:.1f} s; trained {res['trainable_table_params']:,} table parameters")
    if res["protect_min_count"]:
        text += (f"; {sum(res['protected_rows'].values()):,} rows protected (read >= {res['protect_min_count']} "
                 f"times by the original corpus), {sum(res['touched_protected_rows'].values()):,} of the "
                 f"{sum(res['touched_rows'].values()):,} rows the new text touched kept frozen")
    if res["rehearsal"]:
        text += f"; rehearsal {res['rehearsal']} (original-corpus loss {res['loss_orig_first']:.3f} -> {res['loss_orig_last']:.3f})"
    elif args.original_data is None:
        text += ("; the original corpus was not given, so nothing held its loss: pass --original-data DIR "
                 "(the base run's dataset) to rehearse it")
    if res["trainable_gate_params"]:
        text += (f" and {res['trainable_gate_params']:,} gate/projection parameters (NOT in the patch: "
                 f"the patch alone does not reproduce them)")
    _print(res, args.json, text)
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    from engram.patches.apply import apply_patch

    out = []
    for p in args.patches:
        res = apply_patch(args.table, p, progress=not args.json)
        out.append(res)
        if not args.json:
            print(f"applied {res['patch_id']} to {res['table']}: {res['changed_rows']:,} rows in "
                  f"{res['seconds'] * 1000:.0f} ms; chain {' -> '.join(res['chain'])}")
    if args.json:
        print(json.dumps(out, indent=2))
    return 0


def cmd_revert(args: argparse.Namespace) -> int:
    from engram.patches.apply import revert_patch

    res = revert_patch(args.table, args.patch, progress=not args.json)
    _print(res, args.json, f"reverted {res['patch_id']} from {res['table']}: {res['changed_rows']:,} rows "
           f"restored in {res['seconds'] * 1000:.0f} ms; chain {' -> '.join(res['chain']) or 'empty'}"
           + (" (out of order: patches made on top of it no longer match this table)"
              if res["out_of_order"] else ""))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from engram.patches.apply import list_patches

    res = list_patches(args.table)
    lines = [f"{res['table']}: {res['dtype']}, content {res['fingerprint'][:16]}..., "
             f"{len(res['patches'])} patch(es) applied (bottom first)"]
    for e in res["patches"]:
        lines.append(f"  {e['patch_id']}  {e.get('name') or '-':<16} parent {e.get('parent') or '-':<16} "
                     f"{e['changed_rows']:>8,} rows  applied {e['applied_at']}")
    _print(res, args.json, "\n".join(lines))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from engram.patches.patchfile import load_patch

    s = load_patch(args.patch).summary()
    _print(s, args.json, "\n".join([
        f"{s['file']}: patch {s['patch_id']} ({s['name'] or 'unnamed'}), parent {s['parent'] or '-'}",
        f"  {s['changed_rows']:,} rows, {s['dtype']} table, new values {s['quantization']}, "
        f"{s['file_bytes']:,} bytes; made {s['created_at']}",
        f"  applies to content {s['base_fingerprint'][:16]}... -> {s['result_fingerprint'][:16]}..., "
        f"hash config {s['hash_fingerprint'][:16]}...",
    ]))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from engram.bench.patch import BenchConfig, run_bench

    cfg = BenchConfig(workdir=args.workdir, held_out=args.held_out, base_steps=args.base_steps,
                      patch_steps=args.patch_steps, patch_lr=args.patch_lr, table_lr_mult=args.table_lr_mult,
                      anchor=args.anchor, protect_min_count=args.protect_min_count, rehearsal=args.rehearsal,
                      variants=tuple(args.variant or ()), ngram_lambda=args.ngram_lambda, threads=args.threads)
    res = run_bench(cfg, progress=not args.json)
    if args.out:
        from pathlib import Path

        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=None if args.json else 2))
    return 0


# = patch_train.DEFAULT_PROTECT_MIN_COUNT / DEFAULT_REHEARSAL (not imported: keeps the CLI start light)
DEFAULT_PROTECT_MIN_COUNT = 0
DEFAULT_REHEARSAL = 1.0


def register(sub: Any, bench: Any) -> None:
    p = sub.add_parser("patch", help="knowledge patches for the Engram tables: train, apply, revert, list"
                       ).add_subparsers(dest="sub", required=True)
    t = p.add_parser("train", help="train only the Engram tables on new text; write the changed rows")
    t.add_argument("--ckpt", required=True, help="the run whose model learns (its backbone is frozen)")
    t.add_argument("--data", required=True, nargs="+", help=".txt / .jsonl files (or directories) of new text")
    t.add_argument("--out", required=True, help="the patch file to write (e.g. facts.engp)")
    t.add_argument("--table", help="start from this table file (stacks on the patches applied to it)")
    t.add_argument("--name", help="a label shown by `engram patch list`")
    t.add_argument("--steps", type=int, default=1000)
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--seq-len", type=int, default=128)
    t.add_argument("--lr", type=float, default=3e-3, help="base lr; tables train at lr x --table-lr-mult")
    t.add_argument("--table-lr-mult", type=float, default=5.0)
    t.add_argument("--warmup-steps", type=int, default=10)
    t.add_argument("--anchor", type=float, default=0.0, help="L2 pull of changed rows towards their old values")
    t.add_argument("--original-data", metavar="DIR",
                   help="the base run's prepared dataset (engram data prepare): the original corpus, replayed "
                   "during training (--rehearsal) so that its loss stays put")
    t.add_argument("--protect-min-count", type=int, default=DEFAULT_PROTECT_MIN_COUNT,
                   help="with --original-data: freeze rows the original corpus reads at least this often "
                   f"(0 disables; default {DEFAULT_PROTECT_MIN_COUNT}; rehearsal works better, docs/patches.md)")
    t.add_argument("--rehearsal", type=float, default=None,
                   help="add BETA x the loss on original-corpus batches (only rows the new text touches still "
                   f"move); default {DEFAULT_REHEARSAL} with --original-data, else 0; 0 disables")
    t.add_argument("--rehearsal-batch-size", type=int, default=0, help="original-corpus windows per step (0 = --batch-size)")
    t.add_argument("--train-gates", action="store_true",
                   help="also train the Engram gate/value projections (reported; not in the patch)")
    t.add_argument("--quantize", choices=["none", "bf16", "int8"], default="none",
                   help="store the new values quantised (old values stay exact)")
    t.add_argument("--dtype", choices=["fp32", "bf16", "fp16"],
                   help="storage dtype of the table the patch is for (default: --table's, else fp32)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--quiet", action="store_true")
    t.add_argument("--json", action="store_true")
    t.set_defaults(fn=cmd_train)

    a = p.add_parser("apply", help="apply patches to a table file, in order, each atomically")
    a.add_argument("table")
    a.add_argument("patches", nargs="+")
    a.add_argument("--json", action="store_true")
    a.set_defaults(fn=cmd_apply)

    r = p.add_parser("revert", help="revert a patch (the top one, or one no later patch overlaps)")
    r.add_argument("table")
    r.add_argument("patch")
    r.add_argument("--json", action="store_true")
    r.set_defaults(fn=cmd_revert)

    ls = p.add_parser("list", help="the patches applied to a table file")
    ls.add_argument("table")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(fn=cmd_list)

    i = p.add_parser("info", help="metadata of a patch file (validated)")
    i.add_argument("patch")
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=cmd_info)

    b = bench.add_parser("patch", help="held-out facts: patch vs facts-in-prompt vs N-gram memory "
                         "(trains a small model once, ~8 min on 2 cores; reruns reuse it)")
    b.add_argument("--workdir", default="patch-bench", help="data, run, table and patch go here")
    b.add_argument("--held-out", type=int, default=40, help="countries whose documents are held out")
    b.add_argument("--base-steps", type=int, default=400)
    b.add_argument("--patch-steps", type=int, default=1000)
    b.add_argument("--patch-lr", type=float, default=3e-3)
    b.add_argument("--table-lr-mult", type=float, default=5.0)
    b.add_argument("--anchor", type=float, default=0.0)
    b.add_argument("--protect-min-count", type=int, default=DEFAULT_PROTECT_MIN_COUNT,
                   help="freeze rows the original corpus (the bench's training split) reads this often; 0 disables")
    b.add_argument("--rehearsal", type=float, default=DEFAULT_REHEARSAL,
                   help="beta x original-corpus loss during patch training (0 disables)")
    b.add_argument("--variant", action="append", metavar="K=V,...",
                   help="also train and measure a patch with these settings (e.g. steps=600,rehearsal=1); repeatable")
    b.add_argument("--ngram-lambda", type=float, default=0.5)
    b.add_argument("--threads", type=int, default=1)
    b.add_argument("--out", help="also write the JSON result here")
    b.add_argument("--json", action="store_true")
    b.set_defaults(fn=cmd_bench)
