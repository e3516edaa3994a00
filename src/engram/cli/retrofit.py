"""``engram retrofit ...``: Engram on a pretrained Hugging Face model.

    engram retrofit data --base smollm2-135m --out DIR     the corpus in the base's own tokens
    engram retrofit train --base B --data DIR --layers 1 --out ADAPTER [--steps N] [--resume]
    engram retrofit eval --ckpt ADAPTER --data DIR         loss with the adapter and without it
    engram retrofit generate --ckpt ADAPTER --prompt TEXT  text from base + adapter
    engram retrofit compare --data DIR --out DIR          base / Engram / LoRA / both, seeds, p-values
    engram retrofit facts --ckpt ADAPTER --data DIR --out DIR   new facts: patch / LoRA / prompt / N-gram

An adapter directory also works as ``--ckpt`` of ``engram eval``, ``generate``, ``inspect``,
``serve`` and ``analyze gates``. Handlers import the library lazily (``engram --help`` stays
torch-free).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from engram.cli.flags import (
    add_common,
    add_config_flags,
    add_device_args,
    add_prompt_args,
    config_from_args,
    encode_prompts,
    int_list,
    print_generations,
    prompts_from_args,
)
from engram.cli.table import storage_for
from engram.config import RetrofitCompareConfig, RetrofitConfig, RetrofitFactsConfig, SamplingConfig, TrainConfig

_RETROFIT_FLAGS = ("base", "rows_per_head", "max_ngram_size", "n_head_per_ngram", "n_embed_per_ngram", "hash_seed",
                   "lora_rank", "lora_alpha", "lora_targets")
_TRAIN_FLAGS = ("steps", "batch_size", "seq_len", "lr", "min_lr_ratio", "warmup_steps", "weight_decay",
                "table_lr_mult", "grad_clip", "eval_every", "eval_batches", "save_every", "log_every", "seed",
                "prefetch", "dtype", "compile")


# ----------------------------------------------------------------------------- handlers
def cmd_data(args: argparse.Namespace) -> int:
    from engram.retrofit.base import load_base
    from engram.retrofit.trainer import compression_report, prepare_retrofit_data

    base = load_base(args.base, progress=not args.quiet)
    meta = prepare_retrofit_data(base, args.out, files=args.files or None, builtin=not args.no_builtin,
                                 sources=args.sources or None, val_fraction=args.val_fraction,
                                 progress=not args.quiet)
    comp = compression_report(base)
    print(f"wrote {args.out}: {base.name} tokenizer ({meta['vocab_size']:,} ids), train "
          f"{meta['tokens']['train']:,} / val {meta['tokens']['val']:,} tokens; hashing compression "
          f"{comp['vocab_size']:,} -> {comp['compressed_size']:,} ids ({comp['reduction']:.1%} merged)")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import sys

    from engram.retrofit.trainer import DEFAULT_TRAIN, resume_configs, retrofit_train

    layers = None
    if args.layers is not None:
        layers = () if args.layers.strip().lower() == "none" else tuple(int_list(args.layers, "--layers"))
    if args.resume:  # the adapter's recorded configs; only what this command line gives changes them
        given = {k: getattr(args, k) for k in _RETROFIT_FLAGS if getattr(args, k, None) is not None}
        if layers is not None:
            given["layers"] = layers
        cfg, tcfg, changes = resume_configs(args.out, given, {k: getattr(args, k) for k in _TRAIN_FLAGS
                                                              if getattr(args, k, None) is not None})
        if changes:
            shown = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items())
            why = " (the cosine schedule now ends at the new step count)" if "train.steps" in changes else ""
            print(f"engram: resuming {args.out} with its recorded config, changed: {shown}{why}; "
                  f"adapter_config.json will record the new values", file=sys.stderr)
    else:
        cfg = config_from_args(args, RetrofitConfig, **({} if layers is None else {"layers": layers}))
        defaults = {k: getattr(DEFAULT_TRAIN, k) for k in _TRAIN_FLAGS}
        tcfg = config_from_args(args, TrainConfig, **{k: v for k, v in defaults.items()
                                                      if getattr(args, k, None) is None},
                                table_optimizer="sparse_adam")
    summary = retrofit_train(cfg, tcfg, args.data, args.out, resume=args.resume, overwrite=args.overwrite,
                             progress=not args.quiet, max_seconds=args.max_seconds, device=args.device)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from engram.retrofit.evaluation import evaluate_adapter

    result = evaluate_adapter(args.ckpt, args.data, args.split, batch_size=args.batch_size, seq_len=args.seq_len,
                              max_batches=args.max_batches, storage=storage_for(args, args.ckpt),
                              base=getattr(args, "base", None), compare_base=not getattr(args, "no_base", False),
                              progress=not getattr(args, "quiet", False))
    print(json.dumps(result, indent=2))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from engram.cli.table import report_generation
    from engram.model.generation import left_pad, strip_padding
    from engram.retrofit.adapter import load_adapter

    sampling = config_from_args(args, SamplingConfig)
    texts = prompts_from_args(args)
    model = load_adapter(args.ckpt, args.base, storage=storage_for(args, args.ckpt), progress=not args.quiet)
    tok = model.base_model.tokenizer
    prompts = encode_prompts(tok, texts)
    eos = model.base.config.eos_token_id
    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    pad = model.hasher.cfg.pad_id if model.hasher is not None else 0  # any id: the mask hides it
    ids, mask = left_pad(prompts, pad)  # several prompts: one batch, each row as if alone
    t0 = time.perf_counter()
    if getattr(args, "hf_generate", False):  # transformers' own generate(), through the same hooks
        kw: dict[str, Any] = {"max_new_tokens": sampling.max_new_tokens, "do_sample": sampling.temperature > 0,
                              "pad_token_id": pad}
        if sampling.temperature > 0:
            torch.manual_seed(sampling.seed)
            kw.update(temperature=sampling.temperature, top_k=sampling.top_k or None, top_p=sampling.top_p)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, **kw)
    else:
        out = model.generate(ids, sampling, eos_id=eos, attention_mask=mask)
    out = strip_padding(out, mask, ids.shape[1], eos_id=eos)
    report_generation(model, sum(len(o) - len(p) for o, p in zip(out, prompts)), time.perf_counter() - t0)
    print_generations([tok.decode(o) for o in out])
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from engram.science.retrofit import run_compare, summary_markdown

    cfg = config_from_args(args, RetrofitCompareConfig)
    summary = run_compare(cfg, args.data, args.out, progress=not args.quiet)
    print(summary_markdown(summary), end="")
    print(f"wrote {Path(args.out) / 'summary.md'}, summary.json and results.jsonl (rerun to resume)")
    return 0


def cmd_facts(args: argparse.Namespace) -> int:
    from engram.science.retrofit_facts import result_markdown, run_facts

    cfg = config_from_args(args, RetrofitFactsConfig)
    res = run_facts(args.ckpt, args.data, args.out, cfg, progress=not args.quiet,
                    log=(lambda m: None) if args.quiet else print)
    print(result_markdown(res), end="")
    print(f"wrote {Path(args.out) / 'result.json'} and facts.jsonl")
    return 0


# ----------------------------------------------------------------------------- parser
def _add_base(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--base", metavar="NAME|DIR", help=help)


def register(sub: Any) -> None:
    from engram.cli.table import add_storage_arguments

    r = sub.add_parser("retrofit", help="Engram on a pretrained Hugging Face model (docs/retrofit.md)"
                       ).add_subparsers(dest="sub", required=True)

    d = r.add_parser("data", help="tokenize the built-in corpus and/or files with the base's tokenizer")
    d.add_argument("--base", default="smollm2-135m", metavar="NAME|DIR", help="smollm2-135m or a model directory")
    add_common(d, "--out", required=True, help="output directory")
    d.add_argument("--files", nargs="*", help=".txt or .jsonl (field 'text') files to add")
    d.add_argument("--no-builtin", action="store_true", help="use only --files")
    d.add_argument("--sources", nargs="*", help="only these built-in sources (e.g. shakespeare bible)")
    d.add_argument("--val-fraction", type=float, default=0.05)
    add_common(d, "--quiet")
    d.set_defaults(fn=cmd_data)

    t = r.add_parser("train", help="add Engram layers to a base and train them (the base stays frozen)")
    add_common(t, "--data", required=True, help="a dataset from `engram retrofit data`")
    add_common(t, "--out", required=True, help="adapter directory")
    # None = not given: a new adapter takes RetrofitConfig's default, --resume the recorded value
    add_config_flags(t, RetrofitConfig, only=_RETROFIT_FLAGS, defaults=dict.fromkeys(_RETROFIT_FLAGS))
    t.add_argument("--layers", metavar="L[,L...]",
                   help="decoder layers that get an Engram layer before them (default 1; 'none' with "
                        "--lora-rank for LoRA alone)")
    g = t.add_argument_group("training (defaults suit SmolLM2-135M on a CPU)")
    add_config_flags(g, TrainConfig, only=_TRAIN_FLAGS, defaults={k: None for k in _TRAIN_FLAGS})
    t.add_argument("--resume", action="store_true",
                   help="continue the adapter in --out with the configs it recorded; flags change only the "
                        "train values a resume may change (--steps, --eval-every, ...)")
    t.add_argument("--overwrite", action="store_true", help="start over even if --out holds an adapter")
    t.add_argument("--max-seconds", type=float, help="stop (and save) after this wall-clock budget")
    add_device_args(t, dtype=False)  # --dtype and --compile are train settings, above
    add_common(t, "--quiet")
    t.set_defaults(fn=cmd_train)

    e = r.add_parser("eval", help="loss with the adapter and of the base alone, on the same batches")
    add_common(e, "--ckpt", required=True, help="adapter directory")
    add_common(e, "--data", required=True)
    _add_base(e, "load on this base (default: the one recorded in the adapter)")
    e.add_argument("--split", default="val", choices=["train", "val"])
    e.add_argument("--batch-size", type=int)
    e.add_argument("--seq-len", type=int)
    e.add_argument("--max-batches", type=int)
    e.add_argument("--no-base", action="store_true", help="skip the base-only pass")
    add_common(e, "--quiet")
    add_storage_arguments(e)
    e.set_defaults(fn=cmd_eval)

    gen = r.add_parser("generate", help="text from base + adapter")
    add_common(gen, "--ckpt", required=True, help="adapter directory")
    add_prompt_args(gen)
    _add_base(gen, "load on this base (default: the one recorded in the adapter)")
    gen.add_argument("--hf-generate", action="store_true", help="use transformers' generate() (same hooks)")
    add_config_flags(gen, SamplingConfig, defaults={"temperature": 0.0, "max_new_tokens": 40})
    add_common(gen, "--quiet")
    add_storage_arguments(gen)
    gen.set_defaults(fn=cmd_generate)

    c = r.add_parser("compare", help="base / Engram / LoRA / LoRA + Engram at equal tokens, seeds, p-values "
                     "(resumable)")
    add_common(c, "--data", required=True, help="a dataset from `engram retrofit data` (its val split is cut "
               "into dev and test)")
    add_common(c, "--out", required=True, help="directory for runs, results.jsonl and summary.md")
    add_config_flags(c, RetrofitCompareConfig)
    add_common(c, "--quiet")
    c.set_defaults(fn=cmd_compare)

    f = r.add_parser("facts", help="invented facts taught four ways (Engram patch, LoRA, prompt, N-gram), "
                     "asked verbatim and in other words")
    add_common(f, "--ckpt", required=True, help="an adapter with Engram layers")
    add_common(f, "--data", required=True, help="its domain dataset (names are checked absent from it; its "
               "training split is indexed)")
    add_common(f, "--out", required=True)
    add_config_flags(f, RetrofitFactsConfig)
    add_common(f, "--quiet")
    f.set_defaults(fn=cmd_facts)
