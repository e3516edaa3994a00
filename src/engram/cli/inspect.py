"""``engram inspect``, ``engram serve`` and ``engram analyze {gates,zipf,ablate}``.

    engram inspect --ckpt RUN --text "the Prince of Wales" [--html out.html] [--json out.json]
    engram serve   --ckpt RUN [--host 127.0.0.1] [--port 8765]
    engram serve   --ckpt RUN --patches DIR [--keys keys.json] [--table FILE]   (tenants, engram.serve)
    engram analyze gates  --ckpt RUN [--n 300] [--json out.json]
    engram analyze zipf   --ckpt RUN --data DATA [--split train] [--plot zipf.png] [--json out.json]
    engram analyze ablate --ckpt RUN --data DATA [--max-tokens 40000] [--json out.json]
    engram analyze table-use --ckpt RUN --data DATA [--windows 64] [--json out.json] [--page page.md]
    engram analyze table-use --from-json a.json [b.json ...] --page page.md

The server's limits are flags generated from ``ServeLimits`` (``engram.config``). Handlers import
the library (numpy included) lazily, inside the function, so that ``engram --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path
from typing import Any, Optional

from engram.cli.flags import add_common, add_config_flags, add_json_file, config_from_args
from engram.cli.table import add_storage_arguments
from engram.config import PatchServeConfig, ServeLimits, StateCacheConfig
from engram.errors import EngramError
from engram.inspect.settings import COLOR_MODES, SCALES, TABLE_USE_CONTROLS  # torch-free, like engram.config


def _load(ckpt: str):
    """(model, tokenizer, meta) of the model in ``ckpt``, a run or a retrofit adapter (engram.load)."""
    from engram.auto.loader import load

    model = load(ckpt)
    return model, model.loaded_from.require_tokenizer(), model.loaded_from.meta


def _dataset_for(model: Any, meta: Any, args: argparse.Namespace):
    """The dataset of ``--data``, after checking it was tokenized for the run of ``--ckpt``."""
    from engram.data.shards import load_dataset
    from engram.training.evaluation import check_dataset_for_model

    ds = load_dataset(args.data)
    check_dataset_for_model(model.cfg.vocab_size, meta.tokenizer_fingerprint, ds, args.data, f"run {args.ckpt}")
    return ds


def _write_json(path: Optional[str], obj: Any) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _fmt(v: float, digits: int = 4) -> str:
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


# ----------------------------------------------------------------------------- inspect
def cmd_inspect(args: argparse.Namespace) -> int:
    from engram.inspect.heatmap import inspect_text, print_inspection, write_outputs

    if (args.text is None) == (args.file is None):
        raise EngramError("give the text with exactly one of --text TEXT or --file PATH")
    text = args.text if args.text is not None else Path(args.file).read_text(encoding="utf-8")
    model, tok, _ = _load(args.ckpt)
    ins = inspect_text(model, tok, text)
    write_outputs(ins, args.html, args.json)
    if not args.quiet:
        print_inspection(ins, color=args.color, scale=args.scale, top_k=args.top_k)
        for what, path in (("HTML", args.html), ("JSON", args.json)):
            if path:
                print(f"wrote {what} to {path}", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------- serve
def _patch_server(args: argparse.Namespace, limits: ServeLimits):
    """``--patches DIR``: the tenant server (engram.serve): patches by id, read per request."""
    from engram.cli.table import load_from_args, storage_for
    from engram.serve.keys import KeyRing
    from engram.serve.server import make_patch_server
    from engram.serve.service import TenantService
    from engram.serve.store import PatchStore

    cfg = config_from_args(args, PatchServeConfig)
    keys = KeyRing.load(args.keys) if args.keys else None
    model = load_from_args(args)  # a run or an adapter; tables per --table/--storage
    storage = storage_for(args, args.ckpt)
    table_file = storage.path if storage is not None else None
    states = None
    if args.state_cache or args.state_storage == "memory":  # prompts from their prefix's stored state
        from engram.serve.state_cache import PromptStates

        states = PromptStates.from_config(model, config_from_args(args, StateCacheConfig), table_file=table_file)
    service = TenantService(model, model.loaded_from.tokenizer, PatchStore(args.patches, model, cfg.cache_bytes),
                            keys, cfg, limits, table_file=table_file, states=states)
    return make_patch_server(service, args.host, args.port, quiet=args.quiet), keys is not None


def cmd_serve(args: argparse.Namespace) -> int:
    from engram.inspect.server import InspectService, is_loopback, make_server

    limits = config_from_args(args, ServeLimits)
    if args.keys and not args.patches:
        raise EngramError("--keys goes with --patches DIR (the keys say which patches each key may use)")
    if (args.state_cache or args.state_storage == "memory") and not args.patches:
        raise EngramError("--state-cache goes with --patches DIR (the JSON API's /v1/generate reads it)")
    if args.patches:
        server, authenticated = _patch_server(args, limits)
    else:
        model, tok, _ = _load(args.ckpt)
        server, authenticated = make_server(InspectService(model, tok, limits), args.host, args.port,
                                            quiet=args.quiet), False
    host, port = server.server_address[:2]
    if not is_loopback(args.host):
        print(f"engram serve: warning: listening on {host}, reachable from other machines; "
              f"{'requests need an API key' if authenticated else 'there is no authentication'}",
              file=sys.stderr)
    what = (f"patches from {args.patches} (POST /v1/generate, /v1/logits)" if args.patches else "")
    print(f"engram serve: http://{host}:{port}/ {what} (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


# ----------------------------------------------------------------------------- analyze
def cmd_analyze_gates(args: argparse.Namespace) -> int:
    import numpy as np

    from engram.data.tokenizer import special_ids
    from engram.inspect.analysis import (
        facts_vs_random,
        gate_categories,
        gate_statistics,
        memory_swap_contrast,
        token_matched_contrast,
    )

    model, tok, meta = _load(args.ckpt)
    ds = _dataset_for(model, meta, args) if args.data else None
    unigram = (np.bincount(np.asarray(ds.train.tokens, dtype=np.int64), minlength=model.cfg.vocab_size)
               if ds is not None else None)
    cats = gate_categories(tok, n=args.n, seed=args.seed, unigram=unigram)
    pad_id = special_ids(tok)[0]
    rows = gate_statistics(model, cats, pad_id=pad_id)
    print(f"{'category':<24} {'layer':>5} {'branch':>6} {'tokens':>7} {'mean gate':>10} "
          f"{'std':>7} {'s.e.m.':>7}")
    for r in rows:
        print(f"{r['category']:<24} {r['layer_id']:>5} {r['branch']:>6} {r['count']:>7} "
              f"{_fmt(r['mean']):>10} {_fmt(r['std'], 3):>7} {_fmt(r['sem'], 4):>7}")
    result: dict[str, Any] = {"ckpt": args.ckpt, "n": args.n, "seed": args.seed, "rows": rows}
    # Same token ids, different context: fact sentences against the random-token controls.
    contrasts = []
    print("\ntoken-matched: mean gate of a token in fact sentences minus the same token's mean gate in")
    print(f"{'control':<24} {'layer':>5} {'branch':>6} {'ids':>7} {'difference':>10} {'s.e.m.':>7} {'ids > 0':>7}")
    for control in ("random tokens", "unigram random tokens", "shuffled fact tokens"):
        if control not in cats:
            continue
        for r in token_matched_contrast(model, cats["fact sentences"], cats[control]):
            contrasts.append({"a": "fact sentences", "b": control, **r})
            print(f"{control:<24} {r['layer_id']:>5} {r['branch']:>6} {r['tokens']:>7} "
                  f"{r['mean_diff']:>+10.4f} {_fmt(r['sem'], 4):>7} {r['positive_fraction']:>7.0%}")
    result["token_matched"] = contrasts
    # Same hidden state, different memory: does the key recognise the memory of its own context?
    swaps = []
    print("\nmemory swap: gate with the position's own N-gram memory minus the gate with the memory of a")
    print("random other position of the same category (same hidden state, so same token and context);")
    print("e = 0: the gate with no memory at all (the key is its bias), the level the hidden state sets")
    print(f"{'category':<24} {'layer':>5} {'branch':>6} {'tokens':>7} {'own':>7} {'swapped':>7} "
          f"{'difference':>10} {'s.e.m.':>7} {'> 0':>5} {'e = 0':>7}")
    for name in ("fact sentences", "name last tokens", "narrative", "shuffled fact tokens",
                 "random tokens", "unigram random tokens"):
        if name not in cats:
            continue
        for r in memory_swap_contrast(model, cats[name], pad_id=pad_id, seed=args.seed):
            swaps.append({"category": name, **r})
            print(f"{name:<24} {r['layer_id']:>5} {r['branch']:>6} {r['tokens']:>7} {_fmt(r['gate']):>7} "
                  f"{_fmt(r['gate_swapped']):>7} {r['mean_diff']:>+10.4f} {_fmt(r['sem'], 4):>7} "
                  f"{r['positive_fraction']:>5.0%} {_fmt(r['gate_no_memory']):>7}")
    result["memory_swap"] = swaps
    if ds is not None:
        from engram.inspect.analysis import gate_by_frequency

        window = min(128, model.cfg.max_seq_len - 1)
        freq = gate_by_frequency(model, ds.val.tokens[: args.freq_tokens], ds.train.tokens,
                                 window=window)
        print(f"\nmean gate by training count of the {freq[0]['n']}-gram ending at the token "
              f"(val split, {args.freq_tokens:,} tokens)")
        print(f"{'count in train':<15} {'layer':>5} {'branch':>6} {'tokens':>7} {'mean gate':>10} {'s.e.m.':>7}")
        for r in freq:
            print(f"{r['bin']:<15} {r['layer_id']:>5} {r['branch']:>6} {r['count']:>7} "
                  f"{_fmt(r['mean']):>10} {_fmt(r['sem']):>7}")
        result.update(data=args.data, freq_tokens=args.freq_tokens, by_frequency=freq)
    verdicts = facts_vs_random(rows, contrasts, swaps)
    print("\nfact sentences against random-token text (higher / lower: beyond 2 standard errors)")
    print(f"{'control':<24} {'layer':>5} {'branch':>6} {'measure':<14} {'difference':>10} {'s.e.':>7}  verdict")
    for r in verdicts:
        print(f"{r['control']:<24} {r['layer_id']:>5} {r['branch']:>6} {r['measure']:<14} "
              f"{r['difference']:>+10.4f} {_fmt(r['se'], 4):>7}  {r['verdict']}")
    result["facts_vs_random"] = verdicts
    _write_json(args.json, result)
    return 0


def cmd_analyze_zipf(args: argparse.Namespace) -> int:
    from engram.inspect.analysis import plot_zipf, zipf_statistics

    model, _, meta = _load(args.ckpt)
    ds = _dataset_for(model, meta, args)
    shard = getattr(ds, args.split)
    if args.max_tokens is not None and args.max_tokens < 1:
        raise EngramError(f"--max-tokens {args.max_tokens} must be >= 1")
    tokens = shard.tokens[: args.max_tokens] if args.max_tokens else shard.tokens
    res = zipf_statistics(model, tokens, top_percents=tuple(args.top_percent))
    if args.plot:
        plot_zipf(res, args.plot, f"{args.split} split, {res.tokens:,} tokens - {Path(args.ckpt).name}")
    s = res.summary
    print(f"{res.tokens:,} tokens of the {args.split} split")
    for n, d in s["ngrams"].items():
        shares = ", ".join(f"top {k}: {v:.1%}" for k, v in d["top_share"].items())
        print(f"  {n}-grams: {d['distinct']:,} distinct, Zipf s = {_fmt(d['zipf_exponent'], 2)}; {shares}")
    for lid, orders in s["rows"].items():
        for n, d in orders.items():
            shares = ", ".join(f"top {k} rows: {v:.1%}" for k, v in d["top_share"].items())
            print(f"  layer {lid} n={n}: {d['rows_touched']:,}/{d['table_rows']:,} rows hit "
                  f"({d['fraction_touched']:.1%}), s = {_fmt(d['zipf_exponent'], 2)}; {shares}")
    if args.plot:
        print(f"plot: {args.plot}")
    _write_json(args.json, {"ckpt": args.ckpt, "data": args.data, "split": args.split, **s})
    return 0


def cmd_analyze_ablate(args: argparse.Namespace) -> int:
    from engram.data.tokenizer import special_ids
    from engram.inspect.analysis import ablation, ablation_categories, unigram_logprobs

    model, tok, meta = _load(args.ckpt)
    ds = _dataset_for(model, meta, args)
    window = args.seq_len or (meta.train_config.seq_len if meta.train_config else 128)
    window = min(window, model.cfg.max_seq_len)
    cats = ablation_categories(tok, ds.meta.get("val_titles", []), window, args.max_tokens,
                               max_facts=args.max_facts)
    rows = ablation(model, cats, unigram_logprobs(ds.train.tokens, model.cfg.vocab_size),
                    pad_id=special_ids(tok)[0])
    print(f"{'category':<32} {'tokens':>7} {'unigram':>8} {'loss on':>8} {'loss off':>8} "
          f"{'acc on':>7} {'acc off':>7} {'ret.loss':>8} {'ret.acc':>8}")
    for r in rows:
        print(f"{r['category']:<32} {r['tokens']:>7} {r['unigram_loss']:>8.3f} {r['loss_full']:>8.3f} "
              f"{r['loss_ablated']:>8.3f} {r['accuracy_full']:>7.3f} {r['accuracy_ablated']:>7.3f} "
              f"{_fmt(r['retained_loss'], 3):>8} {_fmt(r['retained_accuracy'], 3):>8}")
    print("retained loss = (unigram - loss off) / (unigram - loss on); "
          "retained acc = acc off / acc on")
    _write_json(args.json, {"ckpt": args.ckpt, "data": args.data, "window": window,
                            "max_tokens": args.max_tokens, "rows": rows})
    return 0


def cmd_analyze_table_use(args: argparse.Namespace) -> int:
    from engram.fsutil import atomic_write
    from engram.inspect.table_use import table_use_page

    if args.from_json:  # the page of results already measured
        if args.ckpt or args.data:
            raise EngramError("--from-json renders results already measured; drop --ckpt/--data, or drop "
                              "--from-json to measure")
        results = []
        for path in args.from_json:
            try:
                results.append(json.loads(Path(path).read_text(encoding="utf-8")))
            except (OSError, ValueError) as e:
                raise EngramError(f"--from-json {path}: cannot read a JSON result ({e}); give a file written "
                                  f"by engram analyze table-use --json") from None
    else:
        if not (args.ckpt and args.data):
            raise EngramError("engram analyze table-use needs --ckpt RUN and --data DIR (or --from-json FILE "
                              "... to render a page)")
        results = [_measure_table_use(args)]
    if args.page:
        page = table_use_page(results, args.page_command or shlex.join(["engram", *sys.argv[1:]])).encode()
        atomic_write(args.page, lambda f: f.write(page))
    for r in results:
        print(f"{r['ckpt']}: {r['windows']} windows x {r['seq_len']} tokens of {r['data']} ({r['split']}); "
              f"trained loss {r['loss_trained']:.4f}")
        print(f"  {'control':<15} {'loss':>8} {'change':>8} {'kept':>7}  (fraction of Engram's gain kept)")
        for c in r["controls"]:
            print(f"  {c['control']:<15} {c['loss']:>8.4f} {c['delta_loss']:>+8.4f} "
                  f"{_fmt(c['fraction_kept'], 3):>7}")
    return 0


def _measure_table_use(args: argparse.Namespace) -> dict[str, Any]:
    import time

    from engram.data.tokenizer import special_ids
    from engram.fsutil import atomic_write
    from engram.inspect.table_use import as_json, eval_windows, machine, table_use, today

    model, tok, meta = _load(args.ckpt)
    ds = _dataset_for(model, meta, args)
    seq_len = args.seq_len or (meta.train_config.seq_len if meta.train_config else 128)
    if not 1 <= seq_len <= model.cfg.max_seq_len:
        raise EngramError(f"--seq-len {seq_len} must be in 1..{model.cfg.max_seq_len} (the model's max_seq_len)")
    samples = eval_windows(getattr(ds, args.split), seq_len, args.windows)
    t0 = time.perf_counter()
    res = table_use(model, samples, pad_id=special_ids(tok)[0], controls=args.controls or TABLE_USE_CONTROLS,
                    seed=args.seed, batch_size=args.batch_size, progress=not args.quiet)
    res = as_json({"ckpt": args.ckpt, "kind": model.loaded_from.kind.value, "step": meta.step, "label": args.label,
                   "note": args.note, "data": args.data, "split": args.split, "seq_len": seq_len, **res,
                   "seconds": time.perf_counter() - t0, "date": today(), "machine": machine(),
                   "command": shlex.join(["engram", *sys.argv[1:]])})
    if args.json:
        data = (json.dumps(res, indent=2, ensure_ascii=False) + "\n").encode()
        atomic_write(args.json, lambda f: f.write(data))
    return res


# ----------------------------------------------------------------------------- parsers
def register(sub: Any) -> None:
    i = sub.add_parser("inspect", help="per-token Engram gates as a terminal heatmap, HTML and JSON")
    add_common(i, "--ckpt", required=True, help="a run or a retrofit adapter directory")
    i.add_argument("--text", help="text to inspect")
    i.add_argument("--file", help="read the text from this file instead")
    i.add_argument("--html", help="also write a standalone HTML heatmap here")
    add_json_file(i, help="also write the full inspection as JSON here")
    i.add_argument("--top-k", type=int, default=3, help="heads listed per position (0: none)")
    i.add_argument("--color", default="auto", choices=COLOR_MODES,
                   help="auto: 24-bit if COLORTERM says so, else 256; none when not a terminal")
    i.add_argument("--scale", default="rank", choices=SCALES,
                   help="rank: by rank within this text (default); relative: min..max of this "
                        "text; absolute: 0..1")
    add_common(i, "--quiet", help="only write --html/--json")
    i.set_defaults(fn=cmd_inspect)

    s = sub.add_parser("serve", help="local web page: tokens shaded by gate as you type; with --patches, "
                       "a JSON API answering each request with its own patches")
    add_common(s, "--ckpt", required=True)
    s.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    s.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    add_config_flags(s, ServeLimits)
    t = s.add_argument_group("patches per request (docs/patches.md)")
    t.add_argument("--patches", metavar="DIR", help="serve the JSON API instead of the page: each request "
                   "names patches by id (DIR/ID.engp), read over the shared tables for that request only")
    t.add_argument("--keys", metavar="FILE", help='JSON {"keys": {"KEY": ["patch-id", ...]}}: the patches '
                   "each API key may use (403 outside them)")
    add_config_flags(t, PatchServeConfig)
    add_config_flags(t, StateCacheConfig)  # --state-cache DIR: /v1/generate from stored prefix states
    add_storage_arguments(s)
    add_common(s, "--quiet", help="no request log")
    s.set_defaults(fn=cmd_serve)

    a = sub.add_parser("analyze", help="gate statistics, Zipf statistics, Engram ablation, table use"
                       ).add_subparsers(dest="sub", required=True)
    g = a.add_parser("gates", help="mean gate on fact sentences, entities, narrative, shuffled, random tokens")
    add_common(g, "--ckpt", required=True)
    g.add_argument("--n", type=int, default=300, help="samples per category")
    g.add_argument("--seed", type=int, default=0)
    add_common(g, "--data", help="also bin gates by n-gram training count on this dataset's val split")
    g.add_argument("--freq-tokens", type=int, default=60_000, help="val tokens for --data")
    add_json_file(g)
    g.set_defaults(fn=cmd_analyze_gates)

    z = a.add_parser("zipf", help="rank-frequency of n-grams and table-row accesses over a shard")
    add_common(z, "--ckpt", required=True)
    add_common(z, "--data", required=True, help="dataset directory (the run's tokenizer)")
    z.add_argument("--split", default="train", choices=["train", "val"])
    z.add_argument("--max-tokens", type=int, default=1_000_000, help="first N tokens of the split")
    z.add_argument("--top-percent", type=float, nargs="+", default=[0.1, 1.0, 10.0],
                   help="report the share of accesses of the top k%% rows")
    z.add_argument("--plot", help="write a log-log PNG here")
    add_json_file(z)
    z.set_defaults(fn=cmd_analyze_zipf)

    b = a.add_parser("ablate", help="loss/accuracy with Engram zeroed, per kind of held-out text")
    add_common(b, "--ckpt", required=True)
    add_common(b, "--data", required=True, help="dataset the run was trained on (val titles, unigram)")
    b.add_argument("--max-tokens", type=int, default=40_000, help="tokens per category")
    b.add_argument("--max-facts", type=int, default=500, help="fact sentences for 'fact answers only'")
    b.add_argument("--seq-len", type=int, help="window length (default: the run's training seq_len)")
    add_json_file(b)
    b.set_defaults(fn=cmd_analyze_ablate)

    u = a.add_parser("table-use", help="is the table used? loss under controls that destroy what the "
                     "tables store (mean row, shuffled, re-drawn rows, re-seeded hash)")
    add_common(u, "--ckpt", help="a run or a retrofit adapter directory (tables in memory)")
    add_common(u, "--data", help="dataset the model reads (its tokenizer); windows of its --split")
    u.add_argument("--split", default="val", choices=["train", "val"])
    u.add_argument("--windows", type=int, default=64, help="windows scored, spread evenly over the split")
    u.add_argument("--seq-len", type=int, help="window length (default: the run's training seq_len)")
    u.add_argument("--batch-size", type=int, default=16, help="windows per forward pass")
    u.add_argument("--seed", type=int, default=0, help="seed of the shuffle, the re-drawn rows and the new hash")
    u.add_argument("--controls", nargs="+", choices=TABLE_USE_CONTROLS,
                   help="controls to score (default: all; 'removed' is always scored)")
    u.add_argument("--label", help="the model's name on the page")
    u.add_argument("--note", help="how the model was made, shown on the page under its name")
    add_json_file(u)
    u.add_argument("--page", help="write a results page (markdown) here, every number from the JSON")
    u.add_argument("--page-command", help="the command shown on the page (default: this one)")
    u.add_argument("--from-json", nargs="+", metavar="FILE",
                   help="do not measure: render --page from these results of --json (one section each)")
    add_common(u, "--quiet", help="no progress bar")
    u.set_defaults(fn=cmd_analyze_table_use)
