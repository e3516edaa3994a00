"""``engram ngram ...``: the count-based N-gram memory, and the ``--ngram`` mixture of eval/generate.

    engram ngram build --data DIR --out INDEX        suffix-array index of a dataset split
    engram ngram add INDEX --text FILE [--name N]    index new documents as a delta (instant)
    engram ngram remove INDEX NAME                   drop a delta (instant)
    engram ngram compact INDEX                       merge the deltas into a new base
    engram ngram query INDEX --text "..." --verb V   count | prob | ntd | infgram | kn
    engram ngram stats INDEX [--verify]              segments, sizes, checksums
    engram ngram train-gate --ckpt RUN --data DIR --index INDEX      the lambda gate
    engram eval/generate ... --ngram INDEX [--gate DIR | --ngram-lambda X]
    engram generate ... --draft ngram[:K] [--index INDEX]    speculative decoding, drafts from memory

The gate's flags are generated from ``GateConfig`` (``engram.config``). Handlers import the library
lazily, inside the function, so that ``engram --help`` does not load torch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from engram.cli.flags import (
    add_common,
    add_config_flags,
    config_from_args,
    encode_prompts,
    int_list,
    print_generations,
    prompts_from_args,
)
from engram.cli.table import load_from_args
from engram.config import DEFAULT_KN_ORDER, DRAFT_SOURCES, ESTIMATORS, DraftConfig, GateConfig, SamplingConfig
from engram.errors import EngramError

GATES_DIR = "gates"


# ----------------------------------------------------------------------------- helpers
def _index(path: str, verify: bool = False):
    from engram.ngram import NgramIndex

    return NgramIndex.open(path, verify=verify)


def _query_ids(index, args) -> list[int]:
    if args.ids is not None:
        return int_list(args.ids, "--ids")
    if args.text is None:
        raise EngramError("give the query as --text \"...\" or --ids 1,2,3")
    return index.tokenizer.encode(args.text, add_special_tokens=False).ids


def _decode(index, ids) -> str:
    try:
        return index.tokenizer.decode([int(i) for i in ids])
    except ValueError:
        return " ".join(str(int(i)) for i in ids)


def _top(index, dist, k: int) -> list[dict[str, Any]]:
    import torch

    vals, ids = torch.topk(dist, min(k, dist.numel()))
    return [{"id": int(i), "token": _decode(index, [int(i)]), "p": float(v)} for v, i in zip(vals, ids) if v > 0]


def default_gate_dir(index_path: str, ckpt: str) -> Path:
    return Path(index_path) / GATES_DIR / Path(ckpt).resolve().name


def load_mixture(args, lm_adapter, index):
    """An NgramMixture from --gate / --ngram-lambda (default: the index's gate for this run)."""
    from engram.ngram.mixture import NgramMixture, load_gate

    lam = getattr(args, "ngram_lambda", None)
    gate_dir = getattr(args, "gate", None)
    if lam is not None and gate_dir is not None:
        raise EngramError("pass either --gate or --ngram-lambda, not both")
    if lam is not None:
        cfg = GateConfig(estimator=args.ngram_estimator, kn_order=args.ngram_order)
        mix = NgramMixture(lm_adapter, index, float(lam), cfg, mu=args.ngram_mu)
        return mix, {"lambda": float(lam), "mu": mix.mu}
    gate_dir = Path(gate_dir) if gate_dir else default_gate_dir(args.ngram, args.ckpt)
    if not (gate_dir / "gate.json").is_file():
        raise EngramError(f"no gate at {gate_dir}; train one with `engram ngram train-gate --ckpt {args.ckpt} "
                         f"--data DATA --index {args.ngram}`, or pass a fixed --ngram-lambda 0.5")
    gate, meta = load_gate(gate_dir)
    return NgramMixture(lm_adapter, index, gate), {"gate": str(gate_dir), "gate_meta": meta}


def add_mixture_args(p, scoring: bool) -> None:
    """The --ngram flags shared by `engram eval` and `engram generate`."""
    g = p.add_argument_group("N-gram memory (docs/ngram.md)")
    g.add_argument("--ngram", metavar="INDEX", help="mix the model with this N-gram index")
    g.add_argument("--gate", metavar="DIR", help="trained lambda gate (default: INDEX/gates/<run name>)")
    g.add_argument("--ngram-lambda", type=float, metavar="X", help="fixed lambda instead of a gate")
    g.add_argument("--ngram-estimator", default="both", choices=ESTIMATORS,
                   help="N-gram side with a fixed lambda: both = mu*infgram + (1-mu)*KN (a gate records its own)")
    g.add_argument("--ngram-mu", type=float, default=0.5, help="fixed infinity-gram share for 'both' (default 0.5)")
    g.add_argument("--ngram-order", type=int, default=DEFAULT_KN_ORDER,
                   help=f"KN order with a fixed lambda (default {DEFAULT_KN_ORDER})")
    if scoring:
        g.add_argument("--windows", default="auto", choices=["auto", "all", "even", "odd"],
                       help="which eval windows to score; auto = odd when the gate was fitted on the even "
                            "windows of this split, else all")
        g.add_argument("--allow-indexed-text", action="store_true",
                       help="score text that is in the index (measures memorisation, not prediction)")


def add_draft_args(p) -> None:
    """The --draft flags of `engram generate` (speculative decoding, docs/speculative.md)."""
    g = p.add_argument_group("speculative decoding (docs/speculative.md)")
    g.add_argument("--draft", metavar="ngram[:K]",
                   help="draft up to K tokens (default 4) from memory and verify them in one forward")
    g.add_argument("--index", metavar="INDEX",
                   help="N-gram index to draft from (default: the --ngram index; none: the generation's own text)")
    g.add_argument("--draft-min-match", type=int, default=DraftConfig.min_match,
                   help=f"shortest suffix match that may propose a token (default {DraftConfig.min_match})")
    g.add_argument("--draft-min-count", type=int, default=DraftConfig.min_count,
                   help=f"index matches: the longest suffix seen at least this often (default {DraftConfig.min_count})")
    g.add_argument("--draft-min-prob", type=float, default=DraftConfig.min_prob,
                   help=f"index matches: the continuation's smallest share (default {DraftConfig.min_prob})")
    g.add_argument("--draft-source", default="both", choices=DRAFT_SOURCES,
                   help="look matches up in the index, the generation's own text, or both (default)")
    g.add_argument("--draft-fixed", action="store_true",
                   help="always draft up to K tokens (default: shorter drafts after rejections, none for a "
                        "few steps after repeated first-token misses)")


def drafter_from_args(args, fingerprint, index=None):
    """An NgramDrafter per --draft / --index (None without --draft). ``index``: the --ngram
    index already open, reused when --index names no other."""
    from engram.ngram.draft import NgramDrafter

    if not getattr(args, "draft", None):
        if getattr(args, "index", None):
            raise EngramError("--index is read only with --draft ngram[:K]; add --draft ngram:4")
        return None
    cfg = DraftConfig.parse(args.draft, min_match=args.draft_min_match, min_count=args.draft_min_count,
                            min_prob=args.draft_min_prob, source=args.draft_source,
                            adaptive=not getattr(args, "draft_fixed", False))
    path = args.index or getattr(args, "ngram", None)
    if path and (index is None or args.index):
        index = _index(path)
    if index is not None and fingerprint is not None and index.fingerprint != fingerprint:
        raise EngramError(f"index {path} was built with another tokenizer than run {args.ckpt}; "
                          "build it from this run's data (`engram ngram build`)")
    if index is None and cfg.source == "index":
        raise EngramError("--draft-source index needs an index; pass --index INDEX")
    return NgramDrafter(index, cfg)


def generate_drafted(target, drafter, ids: list[int], sampling, eos_id=None):
    """Speculative generation for the CLI; prints one stderr line of draft statistics."""
    import sys
    import time

    import torch

    from engram.ngram.speculative import generate_speculative

    t0 = time.perf_counter()
    res = generate_speculative(target, drafter, torch.tensor([ids]), sampling, eos_id=eos_id)
    dt = time.perf_counter() - t0
    st = res.stats()
    print(f"engram: draft {drafter.cfg.method}:{drafter.cfg.max_len}: {st['new_tokens']} new tokens in "
          f"{dt:.2f} s ({st['new_tokens'] / max(dt, 1e-9):,.1f} tokens/s), {st['forwards']} forwards, "
          f"acceptance {st['acceptance']:.1%}, mean accepted length {st['mean_accepted']:.2f}", file=sys.stderr)
    return res.ids


# ----------------------------------------------------------------------------- eval / generate
def cmd_eval_ngram(args) -> int:
    from engram.data.shards import load_dataset
    from engram.ngram.mixture import LambdaGate, LMAdapter, collect, gate_weights, mixture_nll
    from engram.training.evaluation import check_dataset_for_model, perplexity

    model = load_from_args(args)  # a run or an adapter; tables per --table/--storage
    meta = model.loaded_from.meta
    ds = load_dataset(args.data)
    check_dataset_for_model(model.cfg.vocab_size, meta.tokenizer_fingerprint, ds, args.data, f"run {args.ckpt}")
    index = _index(args.ngram)
    if index.fingerprint != ds.meta["tokenizer_fingerprint"]:
        raise EngramError(f"index {args.ngram} was built with another tokenizer than dataset {args.data}")
    lm = LMAdapter(model)
    mix, info = load_mixture(args, lm, index)
    tcfg = meta.train_config
    seq_len = args.seq_len or (tcfg.seq_len if tcfg else model.cfg.max_seq_len)
    batch_size = args.batch_size or (tcfg.batch_size if tcfg else 8)
    parity = args.windows
    if parity == "auto":
        fit = (info.get("gate_meta") or {}).get("fit", {})
        same = fit.get("data_fingerprint") == ds.meta["tokenizer_fingerprint"] and fit.get("split") == args.split \
            and fit.get("data_tokens") == int(getattr(ds, args.split).num_tokens)
        parity = "odd" if same else "all"
    max_windows = args.max_batches * batch_size if args.max_batches else None
    c = collect(lm, index, getattr(ds, args.split).tokens, seq_len=seq_len, batch_size=batch_size, parity=parity,
                max_windows=max_windows, kn_order=mix.cfg.kn_order, allow_indexed=args.allow_indexed_text,
                progress=True, what=f"{args.data}:{args.split}")
    lam, mu = gate_weights(mix.lam, c) if isinstance(mix.lam, LambdaGate) else (mix.lam, mix.mu)
    mix_loss = float(mixture_nll(c, mix.cfg.estimator, lam, mu).mean())
    lm_loss = float(-c.lm_logp.mean())
    ng_p = c.ngram_p(mix.cfg.estimator, mu)
    ng_loss = float(-ng_p.clamp_min(1e-30).log().mean()) if bool((ng_p > 0).all()) else math.inf
    result = {
        "split": args.split, "windows": parity, "tokens": len(c), "step": meta.step, "run_dir": str(args.ckpt),
        "index": str(args.ngram), "estimator": mix.cfg.estimator, "kn_order": mix.cfg.kn_order, **info,
        "model": {"loss": lm_loss, "perplexity": perplexity(lm_loss)},
        "ngram_alone": {"loss": ng_loss, "perplexity": perplexity(ng_loss)},
        "mixture": {"loss": mix_loss, "perplexity": perplexity(mix_loss),
                    "mean_lambda": torch_mean(lam), "mean_mu": torch_mean(mu)},
        "seconds": c.seconds,
    }
    result.pop("gate_meta", None)
    print(json.dumps(result, indent=2))
    return 0


def torch_mean(lam) -> float:
    import torch

    return float(torch.as_tensor(lam, dtype=torch.float32).mean())


def cmd_generate_ngram(args) -> int:
    import torch

    from engram.data.tokenizer import special_ids
    from engram.ngram.mixture import LMAdapter, generate_mixed

    sampling = config_from_args(args, SamplingConfig)
    texts = prompts_from_args(args)
    model = load_from_args(args)
    meta, tok = model.loaded_from.meta, model.loaded_from.require_tokenizer()
    index = _index(args.ngram)
    if index.fingerprint != meta.tokenizer_fingerprint and meta.tokenizer_fingerprint is not None:
        raise EngramError(f"index {args.ngram} was built with another tokenizer than run {args.ckpt}")
    mix, info = load_mixture(args, LMAdapter(model), index)
    drafter = drafter_from_args(args, meta.tokenizer_fingerprint, index)
    prompts = encode_prompts(tok, texts)  # the mixture generates one prompt at a time
    if drafter is not None:  # the verified distribution is the mixture's
        from engram.ngram.speculative import MixtureTarget

        print_generations([tok.decode(generate_drafted(MixtureTarget(mix), drafter, ids, sampling,
                                                       eos_id=special_ids(tok)[1])[0].tolist()) for ids in prompts])
        return 0
    texts, lams = [], []
    for ids in prompts:
        out, lam = generate_mixed(mix, torch.tensor([ids]), sampling, eos_id=special_ids(tok)[1],
                                  return_lambdas=True)
        texts.append(tok.decode(out[0].tolist()))
        lams.append(lam.reshape(-1))
    print_generations(texts)
    lam = torch.cat(lams)
    if lam.numel():
        print(f"[ngram] mean lambda over {lam.numel()} new tokens: {float(lam.mean()):.3f}")
    return 0


# ----------------------------------------------------------------------------- ngram commands
def cmd_build(args) -> int:
    import numpy as np

    from engram.ngram import NgramIndex

    kw = dict(stats_order=args.stats_order, overwrite=args.force, progress=not args.quiet)
    if args.data:
        index = NgramIndex.from_dataset(args.out, args.data, split=args.split, **kw)
    else:
        from engram.data.shards import open_shard
        from engram.data.tokenizer import load_tokenizer, special_ids

        if not args.shard:
            raise EngramError("give --data DIR (a prepared dataset) or --shard PATH")
        shard = open_shard(args.shard)
        tok = load_tokenizer(args.tokenizer) if args.tokenizer else None
        eos = args.eos_id if args.eos_id is not None else (special_ids(tok)[1] if tok else None)
        if eos is None:
            raise EngramError("--shard needs --eos-id N or --tokenizer PATH (to find the eos id)")
        index = NgramIndex.build(args.out, np.asarray(shard.tokens), vocab_size=shard.vocab_size, eos_id=eos,
                                 fingerprint=shard.fingerprint, tokenizer=tok, source=str(args.shard), **kw)
    st = index.stats()
    print(f"indexed {st['tokens']:,} tokens into {args.out} ({st['bytes'] / 2**20:.1f} MiB, "
          f"vocab {st['vocab_size']:,}, KN statistics up to order {st['stats_order']})")
    return 0


def cmd_add(args) -> int:
    import numpy as np

    from engram.data.corpus import read_user_files
    from engram.data.shards import open_shard

    index = _index(args.index)
    if args.shard:
        shard = open_shard(args.shard, expected_fingerprint=index.fingerprint, expected_vocab_size=index.vocab_size)
        info = index.add(np.asarray(shard.tokens), name=args.name, source=str(args.shard))
    elif args.text:
        docs = read_user_files(args.text)
        info = index.add_texts([d.text for d in docs], name=args.name, source=", ".join(args.text))
    else:
        raise EngramError("give --text FILE... (.txt/.jsonl) or --shard PATH")
    print(f"added delta {info.name!r}: {info.documents} documents, {info.tokens:,} tokens "
          f"(index now {index.num_tokens:,} tokens in {len(index.segments)} segments)")
    return 0


def cmd_remove(args) -> int:
    index = _index(args.index)
    info = index.remove(args.name)
    print(f"removed delta {info.name!r} ({info.tokens:,} tokens); {len(index.deltas)} deltas left")
    return 0


def cmd_compact(args) -> int:
    index = _index(args.index)
    n = len(index.segments)
    info = index.compact(progress=not args.quiet)
    print(f"compacted {n} segments into {info.file} ({info.tokens:,} tokens)")
    return 0


def cmd_query(args) -> int:
    index = _index(args.index)
    ids = _query_ids(index, args)
    res: dict[str, Any] = {"verb": args.verb, "ids": ids}
    if args.verb == "count":
        res["count"] = index.count(ids)
    elif args.verb == "prob":
        if args.next is None:
            raise EngramError("prob needs --next TOKEN_TEXT (or --next-id N)")
        nxt = index.tokenizer.encode(args.next, add_special_tokens=False).ids if isinstance(args.next, str) else []
        if len(nxt) != 1:
            raise EngramError(f"--next {args.next!r} is {len(nxt)} tokens; give exactly one token")
        p, c_full, c_ctx = index.prob(ids, nxt[0])
        res.update(next_id=nxt[0], prob=p, count=c_full, context_count=c_ctx)
    elif args.verb == "ntd":
        res["top"] = _top(index, index.ntd(ids), args.top)
    elif args.verb == "infgram":
        r = index.infgram_ntd(ids)
        res.update(suffix_len=r.suffix_len, count=r.count, top=_top(index, r.dist, args.top))
    else:
        res.update(order=args.order, top=_top(index, index.kn_ntd(ids, order=args.order), args.top))
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"{args.verb} of {_decode(index, ids)!r} ({len(ids)} tokens)")
    for k in ("count", "context_count", "prob", "suffix_len", "order"):
        if k in res:
            print(f"  {k}: {res[k]}")
    for row in res.get("top", []):
        print(f"  {row['p']:.4f}  {row['token']!r}  (id {row['id']})")
    return 0


def cmd_stats(args) -> int:
    index = _index(args.index, verify=args.verify)
    st = index.stats()
    if args.verify:
        st["verified"] = True
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    print(f"{st['path']}: {st['tokens']:,} tokens, {st['bytes'] / 2**20:.1f} MiB, vocab {st['vocab_size']:,}, "
          f"generation {st['generation']}{', checksums ok' if args.verify else ''}")
    for s in st["segments"]:
        print(f"  {s['kind']:5} {s['name']:24} {s['tokens']:>12,} tokens {s['documents']:>7,} docs "
              f"{s['bytes'] / 2**20:8.1f} MiB  {s['source']}")
    return 0


def cmd_train_gate(args) -> int:
    from engram.data.shards import load_dataset
    from engram.ngram.mixture import (
        LMAdapter,
        best_fixed,
        collect,
        gate_nll,
        gate_weights,
        mixture_nll,
        save_gate,
        train_gate,
    )
    from engram.training.evaluation import check_dataset_for_model

    model = load_from_args(args)
    meta = model.loaded_from.meta
    ds = load_dataset(args.data)
    check_dataset_for_model(model.cfg.vocab_size, meta.tokenizer_fingerprint, ds, args.data, f"run {args.ckpt}")
    index = _index(args.index)
    lm = LMAdapter(model)
    tcfg = meta.train_config
    seq_len = args.seq_len or (tcfg.seq_len if tcfg else model.cfg.max_seq_len)
    tokens = getattr(ds, args.split).tokens
    kw = dict(seq_len=seq_len, batch_size=args.batch_size, max_windows=args.max_windows,
              kn_order=args.kn_order, progress=not args.quiet, what=f"{args.data}:{args.split}")
    fit = collect(lm, index, tokens, parity="even", **kw)
    test = collect(lm, index, tokens, parity="odd", **kw)
    cfg = config_from_args(args, GateConfig, hidden_size=model.cfg.hidden_size if args.hidden else 0)
    gate, info = train_gate(fit, cfg, steps=args.steps, seed=args.seed, progress=not args.quiet)
    lam_f, mu_f, _ = best_fixed(fit, args.estimator)
    lam_o, mu_o, loss_o = best_fixed(test, args.estimator)
    lam, mu = gate_weights(gate, test)
    report = {
        "estimator": args.estimator, "test_tokens": len(test), "fit_tokens": len(fit),
        "model_loss": float(-test.lm_logp.mean()),
        "fixed_lambda": lam_f, "fixed_mu": mu_f, "fixed_loss": float(mixture_nll(test, args.estimator, lam_f, mu_f).mean()),
        "oracle_fixed_lambda": lam_o, "oracle_fixed_mu": mu_o, "oracle_fixed_loss": loss_o,
        "gate_loss": float(gate_nll(gate, test).mean()),
        "gate_mean_lambda": float(lam.mean()), "gate_mean_mu": float(mu.mean()),
    }
    out = Path(args.out) if args.out else default_gate_dir(args.index, args.ckpt)
    fit_meta = {"data_fingerprint": ds.meta["tokenizer_fingerprint"], "split": args.split, "parity": "even",
                "data_tokens": int(getattr(ds, args.split).num_tokens), "data_dir": str(Path(args.data).resolve())}
    save_gate(gate, out, {"fit": fit_meta, "run_dir": str(Path(args.ckpt).resolve()), "step": meta.step,
                          "index": str(Path(args.index).resolve()), "index_generation": index.manifest["generation"],
                          "train": {k: v for k, v in info.items() if k != "history"}, "report": report})
    print(json.dumps({"gate": str(out), **report}, indent=2))
    return 0


# ----------------------------------------------------------------------------- registration
def register(sub) -> None:
    ng = sub.add_parser("ngram", help="count-based N-gram memory: build, add/remove, query, gate "
                                      "(docs/ngram.md)").add_subparsers(dest="sub", required=True)

    b = ng.add_parser("build", help="suffix-array index of a dataset split or a token shard")
    add_common(b, "--data", help="prepared dataset directory (`engram data prepare`)")
    b.add_argument("--split", default="train", choices=["train", "val"])
    b.add_argument("--shard", help="a token shard instead of --data")
    b.add_argument("--tokenizer", help="tokenizer.json for --shard (copied into the index)")
    b.add_argument("--eos-id", type=int, help="document separator id for --shard")
    add_common(b, "--out", required=True, help="index directory")
    b.add_argument("--stats-order", type=int, default=6, help="highest KN order to keep statistics for")
    b.add_argument("--force", action="store_true", help="replace an existing index")
    add_common(b, "--quiet")
    b.set_defaults(fn=cmd_build)

    a = ng.add_parser("add", help="index new documents as a delta (no rebuild, visible at once)")
    a.add_argument("index")
    a.add_argument("--text", nargs="+", help=".txt (one document) / .jsonl (field 'text') files or dirs")
    a.add_argument("--shard", help="a token shard (same tokenizer) instead of --text")
    a.add_argument("--name", help="delta name (default delta-NNNN)")
    a.set_defaults(fn=cmd_add)

    r = ng.add_parser("remove", help="drop a delta: queries behave as before it was added")
    r.add_argument("index")
    r.add_argument("name")
    r.set_defaults(fn=cmd_remove)

    c = ng.add_parser("compact", help="merge base and deltas into one new base segment")
    c.add_argument("index")
    add_common(c, "--quiet")
    c.set_defaults(fn=cmd_compact)

    q = ng.add_parser("query", help="count / prob / ntd / infgram / kn of a context")
    q.add_argument("index")
    q.add_argument("--text", help="context text (encoded with the index's tokenizer)")
    q.add_argument("--ids", help="context as ids, e.g. 12,7,99")
    q.add_argument("--verb", default="infgram", choices=["count", "prob", "ntd", "infgram", "kn"])
    q.add_argument("--next", help="prob: the next token, as text")
    q.add_argument("--order", type=int, default=5, help="kn: the order (default 5)")
    q.add_argument("--top", type=int, default=10)
    add_common(q, "--json")
    q.set_defaults(fn=cmd_query)

    s = ng.add_parser("stats", help="segments, sizes; --verify re-checks every checksum")
    s.add_argument("index")
    s.add_argument("--verify", action="store_true")
    add_common(s, "--json")
    s.set_defaults(fn=cmd_stats)

    g = ng.add_parser("train-gate", help="fit the lambda gate on held-out text (model frozen)")
    add_common(g, "--ckpt", required=True)
    add_common(g, "--data", required=True)
    g.add_argument("--index", required=True)
    add_common(g, "--out", help="gate directory (default: INDEX/gates/<run name>)")
    g.add_argument("--split", default="val", choices=["train", "val"],
                   help="held-out split: even windows fit the gate, odd windows report")
    # the command line bounds the hidden state's pull by default (the library leaves it free)
    add_config_flags(g, GateConfig, defaults={"hidden_bound": 0.5})
    g.add_argument("--steps", type=int, default=400)
    g.add_argument("--seq-len", type=int)
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--max-windows", type=int, help="windows per half (default: all)")
    g.add_argument("--seed", type=int, default=0)
    add_common(g, "--quiet")
    g.set_defaults(fn=cmd_train_gate)
