"""``engram patch ...``: pluggable knowledge for the Engram tables.

    engram patch train --ckpt RUN --data NEW.txt --out P.engp [--table T.engt]   train a patch
    engram patch apply T.engt P.engp [P2.engp ...]      apply in order, each one atomically
    engram patch revert T.engt P.engp                   write the patch's old rows back
    engram patch list T.engt                            the applied chain, bottom first
    engram patch info P.engp                            a patch file's metadata

The training flags are generated from ``PatchTrainConfig`` (``engram.config``); ``engram bench
patch`` is registered with the other benchmarks (``engram.cli.bench``). Handlers import the library lazily, inside the function, so that
``engram --help`` does not load torch.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from engram.cli.flags import add_common, add_config_flags, config_from_args
from engram.cli.table import load_from_args
from engram.config import PatchTrainConfig
from engram.errors import EngramError
from engram.knowledge.edit_config import FactEditConfig


class PatchCommandError(EngramError):
    """Bad ``engram patch`` arguments."""


def _print(res: Any, as_json: bool, text: str) -> None:
    print(json.dumps(res, indent=2, default=str) if as_json else text)


def cmd_train_facts(args: argparse.Namespace) -> int:
    """``--facts``: the fact-edit trainer (engram.knowledge.editor) instead of next-token training."""
    from engram.cli.knowledge import _load
    from engram.knowledge.editor import teach
    from engram.knowledge.facts import read_facts
    from engram.patches.apply import model_patches
    from engram.patches.patchfile import save_patch

    facts, marked = read_facts(args.facts)
    cfg = config_from_args(args, FactEditConfig)
    model, tok, pad = _load(args.ckpt, args.quiet or args.json)
    chain = model_patches(model)
    res = teach(model, tok, facts, marked, cfg, pad_id=pad, name=args.name or "facts", dtype=args.dtype or "fp32",
                parent=chain[-1]["patch_id"] if chain else None,
                provenance={"ckpt": str(args.ckpt), "facts": str(args.facts)}, progress=not (args.quiet or args.json))
    path = save_patch(res.patch, args.out)
    r = {**res.report, "patch": str(path), "patch_bytes": path.stat().st_size, "facts": len(facts),
         "marked_sentences": len(marked)}
    text = (f"wrote {path} (patch {r['patch_id']}): {len(facts)} facts + {len(marked)} sentences, "
            f"{r['train_sentences']} training sentences, {r['patch_rows']:,} {'keyed entries' if res.patch.keyed else 'rows'}, "
            f"{r['patch_bytes']:,} bytes; "
            f"answer loss {r['answer_loss_first']:.3f} -> {r['answer_loss_last']:.3f} in {r['steps_run']} steps "
            f"({r['train_seconds']:.0f} s{', stopped by the time budget' if r.get('stopped') == 'time' else ''})")
    if r.get("best_dev_exact") is not None:
        text += f"; kept step {r['best_step']}: dev questions {100 * r['best_dev_exact']:.1f}% exact"
    if "test_exact" in r:
        text += (f"; held-out questions {100 * r['test_exact']:.1f}% exact, subject rows trained for "
                 f"{100 * r['coverage_test']['questions_all']:.0f}% of them")
    use = (f"engram generate --ckpt {args.ckpt} --patch {path} --prompt ... (keyed: served per request, never "
           f"written into a table file)" if res.patch.keyed else f"engram patch apply TABLE {path}")
    _print(r, args.json, text + f". Use it: {use}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from engram.patches.trainer import train_patch_from_run

    if (args.facts is None) == (args.data is None):
        raise PatchCommandError("give exactly one of --data (text to learn) and --facts (a JSON-lines facts file)")
    if args.facts is not None:
        return cmd_train_facts(args)
    cfg = config_from_args(args, PatchTrainConfig)
    model = load_from_args(argparse.Namespace(ckpt=args.ckpt, quiet=args.quiet or args.json))  # run or adapter
    src = model.loaded_from
    res = train_patch_from_run(args.ckpt, args.data, args.out, cfg, table=args.table, name=args.name or "",
                               dtype=args.dtype, original_data=args.original_data,
                               loaded=(model, src.require_tokenizer(), src.tokenizer_fingerprint),
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
        f"  {s['changed_rows']:,} {'N-gram-keyed entries (served per request, not written into a table file)' if s['keyed'] else 'rows'}, "
        f"{s['dtype']} table, new values {s['quantization']}, "
        f"{s['file_bytes']:,} bytes; made {s['created_at']}",
        f"  applies to content {s['base_fingerprint'][:16]}... -> {s['result_fingerprint'][:16]}..., "
        f"hash config {s['hash_fingerprint'][:16]}...",
    ]))
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("patch", help="knowledge patches for the Engram tables: train, apply, revert, list"
                       ).add_subparsers(dest="sub", required=True)
    t = p.add_parser("train", help="train only the Engram tables on new text; write the changed rows")
    add_common(t, "--ckpt", required=True, help="the run or retrofit adapter whose Engram tables learn (its backbone stays frozen)")
    add_common(t, "--data", nargs="+", help=".txt / .jsonl files (or directories) of new text")
    t.add_argument("--facts", help="a JSON-lines facts file (subject/relation/answer, or marked sentences): "
                   "taught with varied sentence forms so that questions in other words get the answer "
                   "(docs/knowledge.md); the --edit-* flags set it")
    add_common(t, "--out", required=True, help="the patch file to write (e.g. facts.engp)")
    t.add_argument("--table", help="start from this table file (stacks on the patches applied to it)")
    t.add_argument("--name", help="a label shown by `engram patch list`")
    t.add_argument("--original-data", metavar="DIR",
                   help="the base run's prepared dataset (engram data prepare): the original corpus, replayed "
                   "during training (--rehearsal) so that its loss stays put")
    t.add_argument("--dtype", choices=["fp32", "bf16", "fp16", "fp8"],
                   help="storage dtype of the table the patch is for (default: --table's, else fp32)")
    add_config_flags(t, PatchTrainConfig)
    add_config_flags(t, FactEditConfig)
    add_common(t, "--quiet")
    add_common(t, "--json")
    t.set_defaults(fn=cmd_train)

    a = p.add_parser("apply", help="apply patches to a table file, in order, each atomically")
    a.add_argument("table")
    a.add_argument("patches", nargs="+")
    add_common(a, "--json")
    a.set_defaults(fn=cmd_apply)

    r = p.add_parser("revert", help="revert a patch (the top one, or one no later patch overlaps)")
    r.add_argument("table")
    r.add_argument("patch")
    add_common(r, "--json")
    r.set_defaults(fn=cmd_revert)

    ls = p.add_parser("list", help="the patches applied to a table file")
    ls.add_argument("table")
    add_common(ls, "--json")
    ls.set_defaults(fn=cmd_list)

    i = p.add_parser("info", help="metadata of a patch file (validated)")
    i.add_argument("patch")
    add_common(i, "--json")
    i.set_defaults(fn=cmd_info)
