"""The ``engram`` command line.

    engram demo                          the main job: data, two small models, comparison, sample
    engram tokenizer report              compression statistics of a tokenizer
    engram data prepare                  token shards from the built-in corpus and/or your files
    engram train / eval / generate       the model life cycle (generate --draft ngram:K: speculative)
    engram bench ...                     every benchmark (engram.cli.bench)

Errors that come from bad input (``EngramError``, a missing file, a flag argparse refuses) are
printed as one line ``engram: error: ...`` with exit status 2; anything else is a bug and keeps
its traceback. Handlers import the library lazily, inside the function, so that ``engram --help``
does not load torch.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Optional, Sequence

from engram.cli import bench as bench_commands
from engram.cli import inspect as inspect_commands
from engram.cli import knowledge as knowledge_commands
from engram.cli import ngram as ngram_commands
from engram.cli import patch as patch_commands
from engram.cli import retrofit as retrofit_commands
from engram.cli import sweep as sweep_commands
from engram.cli import table as table_commands
from engram.cli.demo import run_demo
from engram.cli.flags import (
    ArgumentParser,
    add_common,
    add_config_flags,
    add_device_args,
    add_prompt_args,
    config_from_args,
    encode_prompts,
    print_generations,
    prompts_from_args,
)
from engram.cli.ngram import (
    add_draft_args,
    add_mixture_args,
    cmd_eval_ngram,
    cmd_generate_ngram,
    drafter_from_args,
    generate_drafted,
)
from engram.cli.table import (
    TRAIN_TABLE_FLAGS,
    add_storage_arguments,
    add_train_table_arguments,
    load_from_args,
    report_generation,
)
from engram.config import (
    PRESETS,
    DistributedConfig,
    SamplingConfig,
    StateCacheConfig,
    TrainConfig,
    build_configs,
)
from engram.errors import EngramError

# Command groups of the feature packages: each module's register(sub) adds its subcommands to the
# top-level parser; a handler is stored with set_defaults(fn=...). Every benchmark, whatever its
# feature, is registered by engram.cli.bench.
COMMAND_GROUPS = (
    inspect_commands,  # inspect, serve, analyze {gates,zipf,ablate}
    table_commands,  # table {inspect,convert,stats}
    sweep_commands,  # sweep {run,plan,summary,account}
    ngram_commands,  # ngram {build,add,remove,compact,query,stats,train-gate}
    patch_commands,  # patch {train,apply,revert,list,info}
    knowledge_commands,  # knowledge {ask,study}
    retrofit_commands,  # retrofit {data,train,eval,generate,compare,facts}
)

DEFAULT_PRESET = "engram-moe"  # `engram train` without --preset (a new run)

# `engram generate` samples shorter and from the nucleus; the library default is plain sampling
GENERATE_DEFAULTS = {"max_new_tokens": 60, "top_p": 0.95}


# ----------------------------------------------------------------------------- commands
def cmd_tokenizer_report(args) -> int:
    from engram.data.tokenizer import load_deepseek_tokenizer, load_tokenizer
    from engram.hashing.compression import report

    tok = load_deepseek_tokenizer() if args.tokenizer == "deepseek" else load_tokenizer(args.tokenizer)
    rep = report(tok)
    if args.json:
        print(json.dumps(rep))
        return 0
    print(f"vocab size      {rep['vocab_size']:,}")
    print(f"compressed size {rep['compressed_size']:,}")
    print(f"reduction       {rep['reduction']:.2%}")
    print("largest merge groups (normalised key: ids merged):")
    for key, n in rep["largest_groups"]:
        print(f"  {key!r:>12}: {n}")
    return 0


def cmd_data_prepare(args) -> int:
    from engram.data.shards import prepare_builtin

    meta = prepare_builtin(args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                           files=args.files or None, builtin=not args.no_builtin,
                           val_fraction=args.val_fraction)
    ent = meta["train_unigram_entropy"]
    print(f"wrote {args.out}: vocab {meta['vocab_size']:,}, "
          f"train {meta['tokens']['train']:,} tokens / val {meta['tokens']['val']:,} tokens "
          f"({meta['documents']['train']} / {meta['documents']['val']} documents)")
    print(f"sources: {', '.join(meta['sources']) or '-'}; user files: {len(meta['user_files'])}")
    print(f"unigram entropy of train: {ent['nats_per_token']:.3f} nats/token "
          f"({ent['bits_per_token']:.2f} bits)")
    return 0


def _dataset_vocab(data_dir: str) -> int:
    from engram.data.shards import load_dataset

    return int(load_dataset(data_dir).meta["vocab_size"])


def cmd_train(args) -> int:
    import os

    dist_cfg = config_from_args(args, DistributedConfig)
    under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if args.device != "cpu" and (dist_cfg.nproc > 1 or under_torchrun):
        raise EngramError(f"--device {args.device} places a one-process run; with several processes each rank's "
                          f"device follows --dist-backend (nccl: GPU r for rank r; gloo: cpu), drop --device")
    if dist_cfg.nproc > 1 and not under_torchrun:  # relaunch this command on nproc processes
        from engram.distributed.launch import launch

        return launch(dist_cfg.nproc, args.argv)
    given = {k: getattr(args, k) for k in TRAIN_TABLE_FLAGS if getattr(args, k) is not None}
    if args.resume:  # the run's recorded configs; only what this command line gives changes them
        from engram.training.trainer import resume_configs

        model_cfg, train_cfg, changes = resume_configs(args.out, args.config, args.set, given, args.preset)
        if changes and (not under_torchrun or os.environ["RANK"] == "0"):
            shown = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items())
            why = " (the cosine schedule now ends at the new step count)" if "train.steps" in changes else ""
            print(f"engram: resuming {args.out} with its recorded config, changed: {shown}{why}; "
                  f"config.json will record the new values", file=sys.stderr)
    else:
        model_cfg, train_cfg = build_configs(args.preset or DEFAULT_PRESET, _dataset_vocab(args.data),
                                             args.config, args.set)
        if given:  # --prefetch, --table-storage, ... override train.* (and are validated with it)
            train_cfg = TrainConfig.from_dict({**train_cfg.to_dict(), **given})
    kwargs = dict(resume=args.resume, progress=not args.quiet, max_seconds=args.max_seconds,
                  overwrite=args.overwrite, tables_from=args.table)
    if under_torchrun:  # one rank of torchrun's processes: row-sharded tables, DDP backbone
        from engram.distributed.parallel import train_distributed

        summary = train_distributed(model_cfg, train_cfg, args.data, args.out, dist_cfg, **kwargs)
        if int(os.environ["RANK"]) != 0:
            return 0
    else:
        from engram.training.trainer import train

        summary = train(model_cfg, train_cfg, args.data, args.out, device=args.device, **kwargs)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_eval(args) -> int:
    if getattr(args, "ngram", None):  # mixture with the N-gram memory (cli/ngram.py)
        _cpu_only(args, "--ngram")
        return cmd_eval_ngram(args)
    from engram.model.accel import autocast
    from engram.training.evaluation import evaluate_saved

    model = load_from_args(args)  # a run or an adapter; tables per --table/--storage, on --device
    with autocast(args.dtype, args.device):
        result = evaluate_saved(model, model.loaded_from.meta, args.data, split=args.split,
                                batch_size=args.batch_size, seq_len=args.seq_len, max_batches=args.max_batches)
    result.update(device=args.device, dtype=args.dtype)
    print(json.dumps(result, indent=2))
    return 0


def _patch_stack(args, model):
    """``--patch P`` (repeatable): the patches read over the shared tables for this command only,
    checked against the tables' content (their file's header, or one pass over them in memory)."""
    from engram.cli.table import storage_for
    from engram.patches.overlay import stack_patches
    from engram.patches.patchfile import load_patch

    storage = storage_for(args, args.ckpt)
    return stack_patches(model, [load_patch(p) for p in args.patch],
                         table_file=storage.path if storage is not None else None)


def cmd_generate(args) -> int:
    if args.patch and (getattr(args, "ngram", None) or getattr(args, "draft", None)):
        raise EngramError("--patch works with plain generation; drop --ngram / --draft, or apply the "
                          "patches to a copy of the table (`engram patch apply`) and pass --table")
    if args.state_cache and (getattr(args, "ngram", None) or getattr(args, "draft", None)):
        raise EngramError("--state-cache works with plain generation; drop --ngram / --draft")
    if getattr(args, "ngram", None):  # mixture with the N-gram memory (cli/ngram.py)
        _cpu_only(args, "--ngram")
        return cmd_generate_ngram(args)
    if getattr(args, "draft", None):
        _cpu_only(args, "--draft")

    from engram.model.accel import autocast
    from engram.model.generation import left_pad, strip_padding

    sampling = config_from_args(args, SamplingConfig)
    texts = prompts_from_args(args)
    model = load_from_args(args)  # a run or an adapter; tables per --table/--storage
    drafter = drafter_from_args(args, model.loaded_from.tokenizer_fingerprint)
    tok = model.loaded_from.require_tokenizer()
    prompts = encode_prompts(tok, texts)
    if drafter is not None:  # speculative decoding (cli/ngram.py, docs/speculative.md)
        from engram.ngram.speculative import EngramTarget

        target = EngramTarget(model)
        t0 = time.perf_counter()
        outs = [generate_drafted(target, drafter, ids, sampling)[0].tolist() for ids in prompts]  # one at a time
        report_generation(model, sum(len(o) - len(p) for o, p in zip(outs, prompts)),
                          time.perf_counter() - t0)  # offloaded tables
        print_generations([tok.decode(o) for o in outs])
        return 0
    patches = [_patch_stack(args, model)] if args.patch else None
    if args.state_cache:
        return _generate_with_states(args, model, tok, prompts, sampling, patches)
    t0 = time.perf_counter()
    ids, mask = left_pad(prompts)  # several prompts: one batch, each row as if alone
    ids, mask = ids.to(args.device), mask.to(args.device)
    with autocast(args.dtype, args.device):
        gen = model.generate(ids, sampling, attention_mask=mask, patches=patches)
    out = strip_padding(gen.cpu(), mask.cpu(), ids.shape[1])
    report_generation(model, sum(len(o) - len(p) for o, p in zip(out, prompts)),
                      time.perf_counter() - t0)  # tokens/s, hit rate
    print_generations([tok.decode(o) for o in out])
    return 0


def _generate_with_states(args, model, tok, prompts, sampling, patches) -> int:
    """``generate --state-cache DIR``: each prompt alone, from the deepest stored state of its
    prefix (engram.serve.state_cache); one stderr line per prompt says how much was loaded."""
    import torch

    from engram.cli.table import storage_for
    from engram.model.accel import autocast
    from engram.serve.state_cache import PromptStates, generate_with_states

    storage = storage_for(args, args.ckpt)
    states = PromptStates.from_config(model, config_from_args(args, StateCacheConfig),
                                      table_file=storage.path if storage is not None else None)
    t0 = time.perf_counter()
    out = []
    for p in prompts:
        ids = torch.tensor([p], dtype=torch.long, device=args.device)
        with autocast(args.dtype, args.device):
            gen, report = generate_with_states(model, ids, sampling, states, patches=patches)
        out.append(gen[0].tolist())
        print(f"engram: state cache: {report.cached_tokens} of {report.prompt_tokens} prompt tokens loaded, "
              f"{report.read_tokens} read in {report.seconds:.3f} s, {report.stored_blocks} blocks stored",
              file=sys.stderr)
    report_generation(model, sum(len(o) - len(p) for o, p in zip(out, prompts)), time.perf_counter() - t0)
    print_generations([tok.decode(o) for o in out])
    return 0


def _cpu_only(args, flag: str) -> None:
    if args.device != "cpu" or args.dtype != "fp32":
        raise EngramError(f"{flag} runs on the CPU in fp32; drop --device {args.device} / --dtype {args.dtype}")


def cmd_demo(args) -> int:
    run_demo(workdir=args.workdir, steps=args.steps, quiet=args.quiet)
    return 0


# ----------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="engram", description="Engram conditional memory for language models")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="the main job: prepare data, train Engram and a same-size baseline, sample")
    d.add_argument("--workdir", default="engram-demo", help="where data and runs go (default: ./engram-demo)")
    d.add_argument("--steps", type=int, default=540,
                   help="optimizer steps per model (default 540: 4-6 min each on 2 CPU cores)")
    add_common(d, "--quiet", help="no progress bars")
    d.set_defaults(fn=cmd_demo)

    t = sub.add_parser("tokenizer", help="tokenizer tools").add_subparsers(dest="sub", required=True)
    r = t.add_parser("report", help="vocab size, compressed size, reduction, largest merge groups")
    r.add_argument("--tokenizer", default="deepseek", help="'deepseek' or a tokenizer.json path")
    add_common(r, "--json")
    r.set_defaults(fn=cmd_tokenizer_report)

    dp = sub.add_parser("data", help="datasets").add_subparsers(dest="sub", required=True)
    pr = dp.add_parser("prepare", help="tokenize the built-in corpus and/or files into shards")
    add_common(pr, "--out", required=True, help="output directory")
    pr.add_argument("--files", nargs="*", help=".txt or .jsonl (field 'text') files to add")
    pr.add_argument("--no-builtin", action="store_true", help="use only --files")
    pr.add_argument("--tokenizer", default="bpe", help="'bpe' (trained here), 'deepseek', or a tokenizer.json path")
    pr.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size (default 4096)")
    pr.add_argument("--val-fraction", type=float, default=0.05)
    pr.set_defaults(fn=cmd_data_prepare)

    tr = sub.add_parser("train", help="train a model")
    add_common(tr, "--data", required=True)
    add_common(tr, "--out", required=True, help="run directory (checkpoints, metrics.jsonl)")
    tr.add_argument("--preset", choices=sorted(PRESETS),
                    help=f"model preset of a new run (default {DEFAULT_PRESET}; --resume uses the run's own)")
    tr.add_argument("--config", help="JSON file with optional 'model' and 'train' sections")
    tr.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override one value, e.g. --set train.steps=500 --set engram.layer_ids=[1,2]")
    tr.add_argument("--resume", action="store_true",
                    help="continue the run in --out with the configs it recorded; --set / --config change "
                         "only the train values a resume may change (steps, eval_every, ...)")
    tr.add_argument("--overwrite", action="store_true", help="start over even if --out holds a run")
    tr.add_argument("--max-seconds", type=float, help="stop (and save) after this wall-clock budget")
    add_common(tr, "--quiet")
    add_train_table_arguments(tr)
    add_config_flags(tr, DistributedConfig)  # --nproc, --dist-backend, --dist-timeout
    add_device_args(tr, dtype=False)  # precision and compile: --set train.dtype=bf16 / train.compile=true
    tr.set_defaults(fn=cmd_train)

    ev = sub.add_parser("eval", help="loss, perplexity and tokens/s of a checkpoint")
    add_common(ev, "--ckpt", required=True)
    add_common(ev, "--data", required=True)
    ev.add_argument("--split", default="val", choices=["train", "val"])
    ev.add_argument("--batch-size", type=int, help="default: the run's training batch size")
    ev.add_argument("--seq-len", type=int, help="default: the run's training sequence length")
    ev.add_argument("--max-batches", type=int)
    add_storage_arguments(ev)
    add_device_args(ev)
    add_mixture_args(ev, scoring=True)
    ev.set_defaults(fn=cmd_eval)

    g = sub.add_parser("generate", help="sample text from a checkpoint")
    add_common(g, "--ckpt", required=True)
    add_prompt_args(g)
    add_config_flags(g, SamplingConfig, defaults=GENERATE_DEFAULTS)
    add_storage_arguments(g)
    add_device_args(g)
    add_mixture_args(g, scoring=False)
    add_draft_args(g)
    g.add_argument("--patch", action="append", default=[], metavar="P.engp",
                   help="read this patch over the tables for this command only (repeatable: stacked in "
                        "order, a later patch wins on rows both change; the table is not written)")
    add_config_flags(g, StateCacheConfig)  # --state-cache DIR, --state-block, --state-storage, ...
    g.set_defaults(fn=cmd_generate)

    bench_commands.register(sub)  # engram bench ... (every benchmark)
    for group in COMMAND_GROUPS:
        group.register(sub)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)  # a usage error exits here: one line, status 2
    args.argv = list(sys.argv[1:] if argv is None else argv)  # `train --nproc` relaunches it
    try:
        return args.fn(args)
    except (EngramError, FileNotFoundError) as e:  # bad input: one clear line, no traceback
        print(f"engram: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("engram: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
