"""``engram bench ...``: every benchmark's subcommand, registered here in one place.

    engram bench hash                    hashing throughput against the reference algorithm
    engram bench step                    training step time of engram-moe vs moe, by phase
    engram bench offload [--json]        in-memory vs offloaded tables (+/- prefetch)
    engram bench table-optimizer         dense vs row-sparse table Adam: steps/s, state
    engram bench train-tiers             training with the tables in memory, mmap, cached
    engram bench large-table             a table larger than RAM, eval + generate
    engram bench ngram / ngram-mix       N-gram index vs infini-gram / mixture + instant update
    engram bench draft                   generation drafted from memory vs plain decoding
    engram bench patch                   the held-out-facts experiment (docs/patches.md)
    engram bench retrofit                tokens/s of a retrofitted model vs its base (and LoRA)
    engram bench distributed             row-sharded training on 1 vs W processes

The benchmarks themselves live in ``engram.bench``; ``engram bench patch`` takes its flags from
``PatchBenchConfig``. Handlers import the library lazily, inside the function, so that
``engram --help`` does not load torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from engram.bench.config import (
    DistributedBenchConfig,
    HashBenchConfig,
    StepBenchConfig,
    TableOptimizerBenchConfig,
    TrainTiersBenchConfig,
)
from engram.cli.flags import add_common, add_config_flags, config_from_args, int_list
from engram.config import CACHE_POLICIES, DraftConfig, PatchBenchConfig


# ----------------------------------------------------------------------------- handlers
def _settings(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The benchmark's keyword arguments from the flags ``add_config_flags(p, cls)`` added."""
    return dataclasses.asdict(config_from_args(args, cls))


def cmd_bench_hash(args) -> int:
    from engram.bench.hash import bench_hash

    result = bench_hash(**_settings(args, HashBenchConfig))
    if args.json:
        print(json.dumps(result))
    else:
        print(f"hash: {result['tokens_per_s']:,.0f} tokens/s vs reference "
              f"{result['baseline_tokens_per_s']:,.0f} tokens/s -> ratio {result['ratio']:.2f}x; "
              f"{result['ns_per_token']:.1f} ns and {result['bytes_written_per_token']:.0f} bytes written "
              f"per token, {result['bandwidth_fraction']:.0%} of one thread's write bandwidth")
    return 0


def cmd_bench_step(args) -> int:
    from engram.bench.step import bench_step

    r = bench_step(args.data, **_settings(args, StepBenchConfig), progress=not args.json)
    if args.json:
        print(json.dumps(r))
    else:
        print(f"step: moe {r['moe_step_ms']:.1f} ms, engram-moe {r['engram_moe_step_ms']:.1f} ms -> "
              f"overhead {r['overhead']:+.1%} (rounds {r['overhead_spread'][0]:+.1%} .. "
              f"{r['overhead_spread'][1]:+.1%}); CPU time {r['overhead_cpu']:+.1%}")
        for phase, extra in r["phase_extra_ms"].items():
            print(f"  {phase:<13} {r['phase_median_ms']['moe'][phase]:8.1f} ms {r['phase_median_ms']['engram-moe'][phase]:8.1f} ms "
                  f"({extra:+.1f})")
    return 0


def cmd_bench_offload(args: argparse.Namespace) -> int:
    from engram.bench.offload import bench_offload

    res = bench_offload(args.data, batch_size=args.batch_size, seq_len=args.seq_len, rounds=args.rounds,
                        batches_per_round=args.batches, warm_batches=args.warm_batches,
                        cache_rows=args.cache_rows,
                        rows_per_head=args.rows_per_head, policy=args.policy,
                        io_threads=args.io_threads, dtype=args.dtype, cold=not args.warm,
                        workdir=args.workdir, threads=args.threads, process=args.fetch_process,
                        pin=args.pin, progress=not args.json, repeats=args.repeats,
                        capacity_batches=args.capacity_batches, standin_batches=args.standin_batches,
                        standin_tokens_per_s=(None if args.standin_tps is None
                                              else [float(v) for v in int_list(args.standin_tps, "--standin-tps")]))
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"in memory   {res['in_memory_tokens_per_s']:>10,.0f} tokens/s")
    print(f"offload     {res['offload_tokens_per_s']:>10,.0f} tokens/s  (prefetch; overhead "
          f"{res['overhead']:+.1%}, hit rate {res['hit_rate']:.1%})")
    print(f"no prefetch {res['no_prefetch_tokens_per_s']:>10,.0f} tokens/s  (overhead "
          f"{res['no_prefetch_overhead']:+.1%}); prefetch speed-up {res['prefetch_speedup']:.2f}x")
    lo, hi = res["overhead_vs_in_memory_prefetch_spread"]
    print(f"vs in-memory prefetch runtime: overhead {res['overhead_vs_in_memory_prefetch']:+.1%} "
          f"({len(res['repeats'])} repeats: {lo:+.1%} .. {hi:+.1%})")
    cap = res["capacity"]
    print(f"tier capacity {cap['distinct_rows_per_s']:,.0f} distinct rows/s = {res['capacity_tokens_per_s']:,.0f} "
          f"tokens/s of this model ({cap['distinct_rows_per_token']:.1f} distinct rows per token)")
    for f in res["fast_forward"]:
        print(f"  stand-in forward at {f['standin_tokens_per_s']:>9,.0f} tokens/s: offload "
              f"{f['offload_tokens_per_s']:>9,.0f} tokens/s, overhead {f['overhead_vs_in_memory_prefetch']:+.1%}")
    t = res["table"]
    print(f"table {t['file_bytes'] / 2**20:,.0f} MiB on disk, pool {t['pool_bytes'] / 2**20:,.0f} MiB "
          f"({t['file_to_pool']:.1f}x smaller); storage: {res['cold_storage']}")
    return 0


def cmd_bench_large(args: argparse.Namespace) -> int:
    from engram.bench.offload import bench_large_table

    res = bench_large_table(args.data, size_gib=args.size_gib, cache_rows=args.cache_rows, policy=args.policy,
                            io_threads=args.io_threads, eval_batches=args.eval_batches,
                            gen_tokens=args.gen_tokens, workdir=args.workdir, keep=args.keep,
                            threads=args.threads, progress=not args.json)
    print(json.dumps(res, indent=None if args.json else 2))
    return 0


def cmd_bench_table_optimizer(args: argparse.Namespace) -> int:
    from engram.bench.offload import bench_table_optimizer

    res = bench_table_optimizer(args.data, **_settings(args, TableOptimizerBenchConfig), progress=not args.json)
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"adam        {res['adam_steps_per_s']:.2f} steps/s, table state "
          f"{res['adam_table_state_bytes'] / 2**20:,.1f} MiB")
    print(f"sparse_adam {res['sparse_adam_steps_per_s']:.2f} steps/s, table state "
          f"{res['sparse_adam_table_state_bytes'] / 2**20:,.1f} MiB ({res['speedup']:.2f}x)")
    return 0


def cmd_bench_train_tiers(args: argparse.Namespace) -> int:
    from engram.bench.train_tiers import TIERS, bench_train_tiers

    res = bench_train_tiers(args.data, **_settings(args, TrainTiersBenchConfig), progress=not args.json)
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"tables: {res['table_rows']:,} rows, {res['table_bytes'] / 2**20:,.1f} MiB; "
          f"losses identical: {res['losses_identical']}")
    for name in TIERS:
        r = res[name]
        print(f"{name:7s} {r['step_s'] * 1e3:8.1f} ms/step, tables hold {r['anon_bytes'] / 2**20:8.1f} MiB; "
              f"file pages mapped {r['files_rss_bytes'] / 2**20:8.1f} MiB (in a step "
              f"{r['files_rss_in_step_bytes'] / 2**20:.1f})")
    return 0


def cmd_bench_ngram(args) -> int:
    from engram.bench.ngram import bench_vs_infinigram

    res = bench_vs_infinigram(args.data, args.workdir, queries=args.queries, repeats=args.repeats,
                              out_dir=args.results, progress=not args.quiet)
    print(json.dumps(res["summary"], indent=2))
    return 0


def cmd_bench_draft(args) -> int:
    from engram.bench.draft import bench_draft

    res = bench_draft(args.ckpt, args.data, args.index, ks=tuple(int_list(args.ks, "--ks")), prompts=args.prompts,
                      prompt_len=args.prompt_len, max_new_tokens=args.max_new_tokens, repeats=args.repeats,
                      min_match=args.min_match, threads=args.threads, seed=args.seed,
                      temperature=args.temperature, progress=not args.quiet)
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    for name, m in res["methods"].items():
        extra = (f", acceptance {m['acceptance']:.1%}, mean accepted {m['mean_accepted']:.2f}"
                 if "acceptance" in m else "")
        print(f"{name:>8}: {m['tokens_per_s']['median']:8.1f} tokens/s, x{m['speedup']['median']:.2f} "
              f"(x{m['speedup']['min']:.2f}-{m['speedup']['max']:.2f}), identical {m['identical']}{extra}")
    print(f"best K={res['best_k']}: speedup x{res['speedup']:.2f}, outputs identical: {res['identical']}")
    return 0


def cmd_bench_ngram_mix(args) -> int:
    from engram.bench.ngram import mixture_experiment

    res = mixture_experiment(args.ckpt, args.data, args.workdir, out_dir=args.results,
                             max_windows=args.max_windows, n_countries=args.countries,
                             baseline_ckpt=args.baseline_ckpt, progress=not args.quiet)
    print(json.dumps(res["summary"], indent=2))
    return 0


def cmd_bench_patch(args: argparse.Namespace) -> int:
    from engram.bench.patch import run_bench

    cfg = config_from_args(args, PatchBenchConfig)
    res = run_bench(cfg, progress=not args.json)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=None if args.json else 2))
    return 0


def cmd_bench_retrofit(args: argparse.Namespace) -> int:
    from engram.bench.retrofit import bench_retrofit

    res = bench_retrofit(base=args.base, layers=tuple(int_list(args.layers, "--layers")),
                         batch_size=args.batch_size, seq_len=args.seq_len, repeats=args.repeats,
                         train_steps=args.train_steps, rows_per_head=args.rows_per_head, threads=args.threads,
                         lora_rank=args.lora_rank, progress=not args.json)
    if args.json:
        print(json.dumps(res))
    else:
        print(f"{res['base']}, Engram before layers {res['layers']}, batch {res['batch_size']} x {res['seq_len']}: "
              f"base {res['base_tokens_per_s']:,.0f} tokens/s, retrofit {res['retrofit_tokens_per_s']:,.0f} "
              f"tokens/s, overhead {res['overhead']:+.1%} (median of {res['repeats']}; range "
              f"{res['overhead_spread']['min']:+.1%}..{res['overhead_spread']['max']:+.1%}); Engram alone "
              f"{res['engram_ms']['median']:.0f} ms = {res['engram_share_of_base_forward']:.1%} of a base forward; training "
              f"{res['train_tokens_per_s']:,.0f} tokens/s")
        if "lora_tokens_per_s" in res:
            print(f"LoRA r{res['lora_rank']}: {res['lora_tokens_per_s']:,.0f} tokens/s ({res['lora_overhead']:+.1%}), "
                  f"training {res['lora_train_tokens_per_s']:,.0f}; LoRA + Engram: {res['both_tokens_per_s']:,.0f} "
                  f"tokens/s ({res['both_overhead']:+.1%}), training {res['both_train_tokens_per_s']:,.0f}")
    return 0


def cmd_bench_distributed(args) -> int:
    from engram.bench.distributed import bench_distributed

    res = bench_distributed(args.data, **_settings(args, DistributedBenchConfig), progress=not args.quiet)
    if args.json:
        print(json.dumps(res))
        return 0
    w = res["world"]
    print(f"table bytes per step on {w} ranks: {res['bytes_per_step']:,.0f} measured vs "
          f"{res['bytes_per_step_analytic']:,.0f} analytic (ratio {res['bytes_ratio']:.2f})")
    print(f"step time: {res['step_s_1rank']:.3f} s on 1 rank, {res[f'step_s_{w}ranks']:.3f} s on {w} "
          f"(ratio {res['time_ratio']:.2f}; per repeat {[round(r, 2) for r in res['time_ratio_per_repeat']]})")
    for p in res["projection"]:
        print(f"  on paper, {p['gpus']} GPUs: {p['bytes_per_gpu_per_step'] / 2**20:,.0f} MiB/GPU/step, "
              f"comm {p['comm_s'] * 1e3:.1f} ms vs compute {p['compute_s']:.2f} s -> {p['comm_share']:.3%}")
    return 0


# ----------------------------------------------------------------------------- registration
def register(sub: Any) -> None:
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="sub", required=True)
    bh = bench.add_parser("hash", help="N-gram hashing throughput vs the reference algorithm")
    add_common(bh, "--json")
    add_config_flags(bh, HashBenchConfig)
    bh.set_defaults(fn=cmd_bench_hash)

    bs = bench.add_parser("step", help="training step time of engram-moe vs moe at the demo's settings, by phase")
    add_common(bs, "--json")
    add_common(bs, "--data", help="prepared dataset (default: build the built-in one, ~15 s)")
    add_config_flags(bs, StepBenchConfig)
    bs.set_defaults(fn=cmd_bench_step)

    o = bench.add_parser("offload", help="tokens/s with the tables in RAM vs in a file behind a cache, "
                         "with and without prefetch")
    add_common(o, "--json")
    add_common(o, "--data", help="prepared dataset (default: build the built-in one, ~15 s)")
    o.add_argument("--batch-size", type=int, default=8)
    o.add_argument("--seq-len", type=int, default=256)
    o.add_argument("--rounds", type=int, default=12, help="timed rounds (plus one warm-up)")
    o.add_argument("--batches", type=int, default=8, help="batches per round and mode")
    o.add_argument("--warm-batches", type=int, default=200,
                   help="batches of the stream replayed into the pools first (steady state)")
    o.add_argument("--cache-rows", type=int, default=1 << 20, help="pool rows per layer")
    o.add_argument("--rows-per-head", "--table-rows", type=int, default=409_600,
                   help="rows per hash head (--table-rows is the old name)")
    o.add_argument("--policy", choices=CACHE_POLICIES, default="lru")
    o.add_argument("--io-threads", type=int, default=16)
    o.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    o.add_argument("--warm", action="store_true", help="keep the page cache (default: cold reads)")
    o.add_argument("--fetch-process", action=argparse.BooleanOptionalAction, default=True,
                   help="run the cached tier in a helper process (default) or on a thread")
    o.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads for the model (default 1: the other core serves I/O)")
    o.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True,
                   help="pin the model's thread to the first CPU and all row serving to the others "
                        "(default on with 2+ CPUs)")
    o.add_argument("--workdir", help="where the temporary table file goes (default: $TMPDIR)")
    o.add_argument("--repeats", type=int, default=3, help="blocks the timed rounds are split into (the spread)")
    o.add_argument("--capacity-batches", type=int, default=16, help="batches of the serving-capacity run")
    o.add_argument("--standin-batches", type=int, default=16, help="batches per stand-in forward speed")
    o.add_argument("--standin-tps", metavar="N,N", help="stand-in forward speeds in tokens/s (default: "
                   "9031, the paper's, and 0.5x, 1x, 2x the tier's measured capacity)")
    o.set_defaults(fn=cmd_bench_offload)

    to = bench.add_parser("table-optimizer", help="training steps/s and table state: dense Adam vs "
                          "row-sparse Adam (train.table_optimizer)")
    add_common(to, "--json")
    add_common(to, "--data", help="prepared dataset (default: build the built-in one)")
    add_config_flags(to, TableOptimizerBenchConfig)
    to.set_defaults(fn=cmd_bench_table_optimizer)

    tt = bench.add_parser("train-tiers", help="training step time and table RAM with the tables in memory, "
                          "mmap and cached (train.table_storage), side by side in one process")
    add_common(tt, "--json")
    add_common(tt, "--data", help="prepared dataset (default: build the built-in one)")
    add_config_flags(tt, TrainTiersBenchConfig)
    tt.set_defaults(fn=cmd_bench_train_tiers)

    lt = bench.add_parser("large-table", help="a table larger than RAM (default 32 GiB, deleted after): "
                          "eval and generation tokens/s and hit rates")
    add_common(lt, "--json")
    add_common(lt, "--data", help="prepared dataset (default: build the built-in one)")
    lt.add_argument("--size-gib", type=float, default=32.0)
    lt.add_argument("--cache-rows", type=int, default=1 << 21, help="pool rows per layer")
    lt.add_argument("--policy", choices=CACHE_POLICIES, default="lru")
    lt.add_argument("--io-threads", type=int, default=16)
    lt.add_argument("--eval-batches", type=int, default=20)
    lt.add_argument("--gen-tokens", type=int, default=128)
    lt.add_argument("--workdir", help="where the table goes (default: $TMPDIR)")
    lt.add_argument("--keep", action="store_true", help="keep the table file afterwards (a later run reuses it)")
    lt.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    lt.set_defaults(fn=cmd_bench_large)

    bn = bench.add_parser("ngram", help="N-gram index vs the infini-gram package (build, size, latency)")
    add_common(bn, "--data", required=True)
    bn.add_argument("--workdir", default="ngram-bench")
    bn.add_argument("--results", default="benchmarks/results")
    bn.add_argument("--queries", type=int, default=2000)
    bn.add_argument("--repeats", type=int, default=3)
    add_common(bn, "--quiet")
    bn.set_defaults(fn=cmd_bench_ngram)

    bd = bench.add_parser("draft", help="speculative decoding with drafts from memory vs plain decoding")
    add_common(bd, "--ckpt", required=True)
    add_common(bd, "--data", required=True)
    add_common(bd, "--json")
    bd.add_argument("--index", help="N-gram index of the train split to draft from (default: text-only drafts)")
    bd.add_argument("--ks", default="2,4,8", help="draft lengths K to compare (default 2,4,8)")
    bd.add_argument("--prompts", type=int, default=8, help="held-out prompts from the val split (default 8)")
    bd.add_argument("--prompt-len", type=int, default=32)
    bd.add_argument("--max-new-tokens", type=int, default=64)
    bd.add_argument("--repeats", type=int, default=3, help="timed rounds (default 3)")
    bd.add_argument("--min-match", type=int, default=DraftConfig.min_match)
    bd.add_argument("--threads", type=int, default=1)
    bd.add_argument("--seed", type=int, default=0)
    bd.add_argument("--temperature", type=float, default=0.0,
                    help="0 = greedy (default; outputs compared token for token), > 0 samples")
    add_common(bd, "--quiet")
    bd.set_defaults(fn=cmd_bench_draft)

    bm = bench.add_parser("ngram-mix", help="mixture perplexity (fixed vs learned lambda) + instant fact update")
    add_common(bm, "--ckpt", required=True)
    add_common(bm, "--data", required=True)
    bm.add_argument("--workdir", default="ngram-bench")
    bm.add_argument("--results", default="benchmarks/results")
    bm.add_argument("--max-windows", type=int, help="windows per half of val (default: all)")
    bm.add_argument("--countries", type=int, default=40, help="invented countries (4 facts each)")
    bm.add_argument("--baseline-ckpt", help="a second run, mixed through the plain-callable LM interface")
    add_common(bm, "--quiet")
    bm.set_defaults(fn=cmd_bench_ngram_mix)

    bp = bench.add_parser("patch", help="held-out facts: patch vs facts-in-prompt vs N-gram memory "
                          "(trains a small model once, ~8 min on 2 cores; reruns reuse it)")
    add_config_flags(bp, PatchBenchConfig)
    add_common(bp, "--out", help="also write the JSON result here")
    add_common(bp, "--json")
    bp.set_defaults(fn=cmd_bench_patch)

    br = bench.add_parser("retrofit", help="inference and training tokens/s of a retrofitted model vs its base")
    br.add_argument("--base", default="smollm2-135m", metavar="NAME|DIR")
    br.add_argument("--layers", default="1", help="Engram before these decoder layers (default 1)")
    br.add_argument("--batch-size", type=int, default=4)
    br.add_argument("--seq-len", type=int, default=256)
    br.add_argument("--repeats", type=int, default=5)
    br.add_argument("--train-steps", type=int, default=3)
    br.add_argument("--rows-per-head", "--table-size", type=int, default=131_072,
                    help="Engram rows per hash head (--table-size is the old name)")
    br.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    br.add_argument("--lora-rank", type=int, default=0,
                    help="also time LoRA of this rank (Engram off) and LoRA + Engram against the base")
    add_common(br, "--json")
    br.set_defaults(fn=cmd_bench_retrofit)

    bdi = bench.add_parser("distributed", help="table bytes per step and step time of sharded training, "
                                               "1 vs W processes (torchrun, gloo on CPU)")
    add_common(bdi, "--json")
    add_common(bdi, "--quiet")
    bdi.add_argument("--data", help="a prepared dataset (default: the built-in corpus, prepared in a temp dir)")
    add_config_flags(bdi, DistributedBenchConfig)
    bdi.set_defaults(fn=cmd_bench_distributed)
