"""``engram bench ...``: every benchmark's subcommand, registered here in one place.

    engram bench hash                    hashing throughput against the reference algorithm
    engram bench step                    training step time of engram-moe vs moe, by phase
    engram bench offload [--json]        in-memory vs offloaded tables (+/- prefetch)
    engram bench table-optimizer         dense vs row-sparse table Adam: steps/s, state
    engram bench train-tiers             training with the tables in memory, mmap, cached
    engram bench large-table             a table larger than RAM, eval + generate
    engram bench ngram / ngram-mix       N-gram index vs infini-gram / mixture + instant update
    engram bench draft                   drafted generation vs plain decoding and prompt lookup
    engram bench patch                   the held-out-facts experiment (docs/patches.md)
    engram bench retrofit                tokens/s of a retrofitted model vs its base (and LoRA)
    engram bench distributed             row-sharded training on 1 vs W processes
    engram bench overlay [--json]        tenant server with 0, 1, N tenants' patches vs none
    engram bench state-cache [--json]    time to first token with and without stored prompt states
    engram bench table-dtype [--json]    fp8 tables vs bf16 / fp32: eval loss, bytes, tier rows/s

The benchmarks themselves live in ``engram.bench``; every subcommand's settings are a dataclass of
``engram.bench.config`` (``engram bench patch``: ``PatchBenchConfig``), its flags generated from
it; inputs (``--data``, ``--ckpt``, ``--index``) and output switches stay plain flags. Handlers import the library lazily, inside the function, so that
``engram --help`` does not load torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

from engram.bench.config import (
    AccelBenchConfig,
    DistributedBenchConfig,
    DraftBenchConfig,
    HashBenchConfig,
    LargeTableBenchConfig,
    NgramBenchConfig,
    NgramMixBenchConfig,
    OffloadBenchConfig,
    OverlayBenchConfig,
    QueryBenchConfig,
    RetrofitBenchConfig,
    StateCacheBenchConfig,
    StepBenchConfig,
    TableDtypeBenchConfig,
    TableOptimizerBenchConfig,
    TrainTiersBenchConfig,
)
from engram.cli.flags import add_common, add_config_flags, add_page_flags, config_from_args
from engram.config import PatchBenchConfig
from engram.errors import EngramError
from engram.fsutil import atomic_write


# ----------------------------------------------------------------------------- handlers
def _settings(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The benchmark's keyword arguments from the flags ``add_config_flags(p, cls)`` added."""
    return dataclasses.asdict(config_from_args(args, cls))


def _write_text(path: str, text: str, make_parent: bool = False) -> None:
    """``text`` into ``path`` atomically (a result JSON or a results page)."""
    if make_parent:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    data = text.encode()
    atomic_write(path, lambda f: f.write(data))


def _page_from_json(args: argparse.Namespace, render: Callable[..., str]) -> int:
    """``--page`` rendered from results already measured (``--from-json``, one JSON per run)."""
    if not args.page:
        raise EngramError("--from-json writes a page: give --page FILE")
    runs = [json.loads(Path(f).read_text(encoding="utf-8")) for f in args.from_json]
    _write_text(args.page, render(runs, args.page_command or " ".join(["engram", *sys.argv[1:]]),
                                  args.page_machine, time.strftime("%Y-%m-%d")))
    return 0


def cmd_bench_hash(args) -> int:
    from engram.bench.hash import bench_hash, hash_page

    if args.from_json:
        return _page_from_json(args, hash_page)
    result = bench_hash(**_settings(args, HashBenchConfig))
    if args.json:
        print(json.dumps(result))
    else:
        lo, hi = result["ratio_spread"]
        warm = ", ".join(f"{r:.1f}x" for r in result["warmup_ratio_per_repeat"]) or "none"
        print(f"hash, steady state: {result['tokens_per_s']:,.0f} tokens/s vs reference "
              f"{result['baseline_tokens_per_s']:,.0f} tokens/s -> ratio {result['ratio']:.2f}x "
              f"({result['repeats']} repeats: {lo:.2f}x .. {hi:.2f}x; warm-up repeats apart: {warm}); "
              f"{result['ns_per_token']:.1f} ns and {result['bytes_written_per_token']:.0f} bytes written "
              f"per token, {result['bandwidth_fraction']:.0%} of one thread's write bandwidth; into a reused "
              f"buffer (out=) {result['reused_tokens_per_s']:,.0f} tokens/s, "
              f"{result['reused_bandwidth_fraction']:.0%} of filling a reused buffer")
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

    res = bench_offload(args.data, **_settings(args, OffloadBenchConfig), progress=not args.json)
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"in memory   {res['in_memory_tokens_per_s']:>10,.0f} tokens/s")
    lo, hi = res["overhead_spread"]
    print(f"offload     {res['offload_tokens_per_s']:>10,.0f} tokens/s  (prefetch; overhead vs plain in-RAM tables "
          f"{res['overhead']:+.1%}, {len(res['repeats'])} repeats: {lo:+.1%} .. {hi:+.1%}; hit rate {res['hit_rate']:.1%})")
    print(f"no prefetch {res['no_prefetch_tokens_per_s']:>10,.0f} tokens/s  (overhead "
          f"{res['no_prefetch_overhead']:+.1%}); prefetch speed-up {res['prefetch_speedup']:.2f}x")
    lo, hi = res["overhead_vs_in_memory_prefetch_spread"]
    print(f"beside it, vs in-RAM tables through the prefetch runtime: overhead {res['overhead_vs_in_memory_prefetch']:+.1%} "
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

    res = bench_large_table(args.data, **_settings(args, LargeTableBenchConfig), progress=not args.json)
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

    res = bench_vs_infinigram(args.data, **_settings(args, NgramBenchConfig), progress=not args.quiet)
    print(json.dumps(res["summary"], indent=2))
    return 0


def cmd_bench_draft(args) -> int:
    from engram.bench.draft import bench_draft, draft_page

    if args.from_json:  # a page of results already measured (several: one section each)
        records = [json.loads(Path(p).read_text(encoding="utf-8")) for p in args.from_json]
    else:
        if args.ckpt is None:
            raise EngramError("bench draft needs --ckpt (or --from-json to render results already measured)")
        records = [bench_draft(args.ckpt, args.data, args.index, **_settings(args, DraftBenchConfig),
                               progress=not args.quiet)]
        records[0]["command"] = " ".join(["engram", *sys.argv[1:]])  # what measured it, for the page
        if args.out:
            _write_text(args.out, json.dumps(records[0], indent=2) + "\n", make_parent=True)
    if args.page:
        _write_text(args.page, draft_page(records, args.page_command or " ".join(sys.argv)))
    if args.json:
        print(json.dumps(records[0] if len(records) == 1 else records, indent=2))
        return 0
    for res in records:
        for name, m in res["methods"].items():
            extra = (f", acceptance {m['acceptance']:.1%}, mean accepted {m['mean_accepted']:.2f}"
                     if m.get("acceptance") is not None else "")
            print(f"{name:>16}: {m['tokens_per_s']['median']:8.1f} tokens/s, x{m['speedup']['median']:.2f} "
                  f"(x{m['speedup']['min']:.2f}-{m['speedup']['max']:.2f}), identical {m['identical']}{extra}")
        print(f"best {res['best']}: speedup x{res['speedup']:.2f}, outputs identical: {res['identical']}")
    return 0


def cmd_bench_ngram_mix(args) -> int:
    from engram.bench.ngram import mixture_experiment

    res = mixture_experiment(args.ckpt, args.data, **_settings(args, NgramMixBenchConfig),
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
    from engram.bench.retrofit import bench_retrofit, retrofit_page

    if args.from_json:
        return _page_from_json(args, retrofit_page)
    res = bench_retrofit(**_settings(args, RetrofitBenchConfig), progress=not args.json)
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
            print(f"against the same base timing, LoRA r{res['lora_rank']}: {res['lora_tokens_per_s']:,.0f} tokens/s "
                  f"({res['lora_overhead']:+.1%}), "
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


def _add_result_flags(p: argparse.ArgumentParser) -> None:
    """The flags :func:`_result_and_files` reads."""
    add_common(p, "--out", help="also write the JSON result here")
    p.add_argument("--page", help="also write a results page (markdown) here, every number from the result")
    p.add_argument("--page-command", help="the command shown on the page (default: this one)")
    p.add_argument("--from-json", help="do not measure: read this result (from --out) and write --page / print it")
    add_common(p, "--json")


def _result_and_files(args, measure: Callable[[], dict[str, Any]], page: Callable[[dict[str, Any], str], str],
                      indent: int = 2) -> dict[str, Any]:
    """A result: measured, or read back with ``--from-json``; written to ``--out`` and rendered as
    ``--page`` (with ``--page-command``, or the command line that ran)."""
    if args.from_json:  # the page of a result already measured
        r = json.loads(Path(args.from_json).read_text(encoding="utf-8"))
    else:
        r = measure()
    if args.out:
        _write_text(args.out, json.dumps(r, indent=indent) + "\n", make_parent=True)
    if args.page:
        _write_text(args.page, page(r, args.page_command or " ".join(["engram", *sys.argv[1:]])))
    return r


def cmd_bench_accel(args) -> int:
    from engram.bench.accel import accel_page, bench_accel

    def measure() -> dict[str, Any]:
        if not args.data:
            raise EngramError("bench accel needs --data DIR (a dataset from `engram data prepare`) unless "
                              "--from-json renders a result already measured")
        return bench_accel(args.data, **_settings(args, AccelBenchConfig), progress=not args.json)

    r = _result_and_files(args, measure, accel_page, indent=1)
    if args.json:
        print(json.dumps(r))
        return 0
    for c in r["compile"]:
        print(f"compile, {c['model']}: compiled / eager steps/s {c['ratio_median']:.3f} (repeats "
              f"{c['ratio_spread'][0]:.3f} .. {c['ratio_spread'][1]:.3f}), compile {c['compile_s']:.1f} s")
    b = r["bf16"]
    print(f"bf16 vs fp32, {b['model']}, {b['steps']} steps: val loss {b['val_loss']['bf16']:.4f} vs "
          f"{b['val_loss']['fp32']:.4f}; {b['bf16_over_fp32_time']:.2f}x the time per step")
    return 0


def cmd_bench_overlay(args) -> int:
    from engram.bench.overlay import bench_overlay, overlay_page

    r = _result_and_files(args, lambda: bench_overlay(**_settings(args, OverlayBenchConfig)), overlay_page)
    if args.json:
        print(json.dumps(r))
        return 0
    c, m = r["config"], r["memory"]
    print(f"overlay: {c['preset']}, {c['requests']} requests x {c['repeats']} repeats per mode, "
          f"{c['prompt_len']}-token prompts + {c['max_new_tokens']} greedy tokens, {c['patch_rows']} rows "
          f"per layer per patch")
    for mode, x in r["summary"].items():
        ratios = ", ".join(f"{v:.3f}" for v in x["throughput_vs_none"])
        print(f"  {mode:>4} tenants' patches: {x['requests_per_s_median']:7.2f} req/s, p50 {x['p50_ms']:7.1f} ms, "
              f"p99 {x['p99_ms']:7.1f} ms; throughput vs none {x['throughput_vs_none_median']:.3f} ({ratios})")
    print(f"  memory per tenant: {m['cache_bytes_per_tenant']:,.0f} bytes cached for a {m['patch_file_bytes']:,.0f}-byte "
          f"patch file ({m['cache_bytes_per_tenant_vs_file']:.2f}x); the overlay alone {m['overlay_bytes_per_tenant']:,.0f}")
    return 0


def cmd_bench_table_dtype(args) -> int:
    from engram.bench.table_dtype import bench_table_dtype, table_dtype_page

    def measure() -> dict[str, Any]:
        earlier = [json.loads(Path(f).read_text(encoding="utf-8")) for f in args.merge or []]
        return bench_table_dtype(ckpt=args.ckpt, data_dir=args.data, adapter=args.adapter,
                                 adapter_data=args.adapter_data, **_settings(args, TableDtypeBenchConfig),
                                 progress=not args.json, earlier=earlier)

    r = _result_and_files(args, measure, table_dtype_page)
    if args.json:
        print(json.dumps(r))
        return 0
    for key in ("demo", "retrofit"):
        if key in r:
            s = r[key]["summary"]
            diffs = ", ".join(f"{v} {d['mean']:+.5f} (std {d['std']:.5f})" for v, d in s["minus_bf16"].items())
            print(f"{key}: mean loss " + ", ".join(f"{v} {m:.5f}" for v, m in s["mean"].items())
                  + f"; minus bf16 per batch: {diffs}")
    for kind, s in r.get("tiers", {}).get("summary", {}).items():
        print(f"{kind}: fp8 / bf16 rows/s " + " / ".join(f"{x:.2f}" for x in s["fp8_over_bf16"]))
    return 0


def cmd_bench_query(args) -> int:
    from engram.bench.query import METHODS, bench_query, query_page

    def measure() -> dict[str, Any]:
        missing = [f for f in ("ckpt", "facts", "patch") if not getattr(args, f)]
        if missing:
            raise EngramError(f"bench query needs {', '.join('--' + f for f in missing)} (an adapter or run, a "
                              "facts file, a patch trained on it) unless --from-json renders a result")
        return bench_query(args.ckpt, args.facts, args.patch, **_settings(args, QueryBenchConfig),
                           progress=not args.json)

    r = _result_and_files(args, measure, query_page)
    if args.json:
        print(json.dumps(r))
        return 0
    for m in METHODS:
        x = r["summary"][m]
        print(f"{m:>10}: median {', '.join(f'{v:.1f}' for v in x['median_ms_per_round'])} ms per round "
              f"({', '.join(f'{v:.2f}' for v in x['over_base_per_round'])}x base), exact {100 * x['exact']:.1f}%, "
              f"{x['extra_prompt_tokens']:+.1f} prompt tokens")
    return 0


def cmd_bench_state_cache(args) -> int:
    from engram.bench.state_cache import bench_state_cache, state_cache_page

    r = _result_and_files(args, lambda: bench_state_cache(**_settings(args, StateCacheBenchConfig)), state_cache_page)
    if args.json:
        print(json.dumps(r))
        return 0
    c = r["config"]
    print(f"state-cache: {c['preset']}, {c['repeats']} prompts per prefix, +{c['suffix_len']} new tokens each, "
          f"blocks of {c['block_tokens']} in {c['storage']}")
    for L, s in r["summary"].items():
        med, x, b = s["median_ttft_s"], r["exactness"][L], r["bytes"][L]
        ratios = ", ".join(f"{v:.1f}" for v in s["plain_over_warm"])
        print(f"  prefix {int(L):>5}: TTFT plain {1e3 * med['plain']:8.1f} ms, cold {1e3 * med['cold']:8.1f} ms, "
              f"warm {1e3 * med['warm']:7.1f} ms; plain/warm {s['plain_over_warm_median']:.1f}x ({ratios}); "
              f"warm == cold: {x['warm_equals_cold']}; {b['bytes_per_token']:,.0f} bytes per cached token")
    return 0


# ----------------------------------------------------------------------------- registration
def _add_from_json_page_flags(p: argparse.ArgumentParser, name: str) -> None:
    """``--from-json`` results rendered as ``--page``, for benchmarks whose runs are repeated."""
    p.add_argument("--from-json", nargs="+", metavar="JSON", help="do not measure: write --page from these "
                   f"results (each from one `engram {name} --json` run)")
    add_page_flags(p, "with --from-json: the results page to write", machine="this machine")


def register(sub: Any) -> None:
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="sub", required=True)
    bh = bench.add_parser("hash", help="N-gram hashing throughput vs the reference algorithm")
    add_common(bh, "--json")
    add_config_flags(bh, HashBenchConfig)
    _add_from_json_page_flags(bh, "bench hash")
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
    add_config_flags(o, OffloadBenchConfig)
    o.add_argument("--warm", dest="cold", action="store_false", default=argparse.SUPPRESS,
                   help="keep the page cache (the same as --no-cold)")
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
    add_config_flags(lt, LargeTableBenchConfig)
    lt.set_defaults(fn=cmd_bench_large)

    bn = bench.add_parser("ngram", help="N-gram index vs the infini-gram package (build, size, latency)")
    add_common(bn, "--data", required=True)
    add_config_flags(bn, NgramBenchConfig)
    add_common(bn, "--quiet")
    bn.set_defaults(fn=cmd_bench_ngram)

    bd = bench.add_parser("draft", help="speculative decoding with drafts from memory vs plain decoding "
                                        "and transformers' prompt lookup")
    add_common(bd, "--ckpt")
    add_common(bd, "--data", help="prepared dataset: held-out prompts from its val split (or --prompts-file)")
    add_common(bd, "--json")
    bd.add_argument("--index", help="N-gram index of the train split to draft from (default: text-only drafts)")
    add_config_flags(bd, DraftBenchConfig)
    bd.add_argument("--out", help="also write the result (JSON) here")
    bd.add_argument("--page", help="also write a results page (markdown) here, every number from the result(s)")
    bd.add_argument("--page-command", help="the command shown on the page (default: this one)")
    bd.add_argument("--from-json", nargs="+", metavar="JSON",
                    help="do not measure: read these results (from --out) and write --page / print them")
    add_common(bd, "--quiet")
    bd.set_defaults(fn=cmd_bench_draft)

    bm = bench.add_parser("ngram-mix", help="mixture perplexity (fixed vs learned lambda) + instant fact update")
    add_common(bm, "--ckpt", required=True)
    add_common(bm, "--data", required=True)
    add_config_flags(bm, NgramMixBenchConfig)
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
    add_config_flags(br, RetrofitBenchConfig)
    add_common(br, "--json")
    _add_from_json_page_flags(br, "bench retrofit")
    br.set_defaults(fn=cmd_bench_retrofit)

    bdi = bench.add_parser("distributed", help="table bytes per step and step time of sharded training, "
                                               "1 vs W processes (torchrun, gloo on CPU)")
    add_common(bdi, "--json")
    add_common(bdi, "--quiet")
    bdi.add_argument("--data", help="a prepared dataset (default: the built-in corpus, prepared in a temp dir)")
    add_config_flags(bdi, DistributedBenchConfig)
    bdi.set_defaults(fn=cmd_bench_distributed)

    ba = bench.add_parser("accel", help="training steps/s with and without train.compile (demo preset, SmolLM2 "
                          "retrofit) and bf16 against fp32 (loss, time), on the CPU")
    add_common(ba, "--data", help="a dataset from `engram data prepare` (the demo's)")
    add_config_flags(ba, AccelBenchConfig)
    _add_result_flags(ba)
    ba.set_defaults(fn=cmd_bench_accel)

    bo = bench.add_parser("overlay", help="requests/s and latency of the tenant server (engram serve --patches) "
                          "with 0, 1 and N tenants' patches vs none; memory per tenant")
    add_config_flags(bo, OverlayBenchConfig)
    _add_result_flags(bo)
    bo.set_defaults(fn=cmd_bench_overlay)

    bq = bench.add_parser("query", help="latency per question with facts in a patch (read per request) vs in a "
                          "BM25 retriever vs the model alone; exact answers, extra prompt tokens")
    add_common(bq, "--ckpt", help="a retrofit adapter or an Engram run")
    bq.add_argument("--facts", help="the facts file the patch was trained on (engram patch train --facts)")
    bq.add_argument("--patch", help="the .engp patch (keyed or hashed), read per request")
    add_config_flags(bq, QueryBenchConfig)
    _add_result_flags(bq)
    bq.set_defaults(fn=cmd_bench_query)

    bs = bench.add_parser("state-cache", help="time to first token with and without stored prompt states "
                          "(generate --state-cache) for prompts sharing a long prefix; bytes per cached token")
    add_config_flags(bs, StateCacheBenchConfig)
    _add_result_flags(bs)
    bs.set_defaults(fn=cmd_bench_state_cache)

    bt = bench.add_parser("table-dtype", help="fp8 table files against bf16 and fp32: paired eval loss "
                          "(a run and/or a retrofit adapter), bytes per row, rows/s per storage tier")
    add_common(bt, "--ckpt", help="an Engram run (engram train / engram demo)")
    add_common(bt, "--data", help="the run's dataset (its val split is evaluated)")
    bt.add_argument("--adapter", help="a retrofit adapter directory (engram retrofit train)")
    bt.add_argument("--adapter-data", help="the adapter's dataset (engram retrofit data)")
    bt.add_argument("--merge", metavar="JSON", action="append", help="keep the parts of this earlier result "
                    "(--out) that this run does not measure (repeatable, later files win); with --tiers '' the "
                    "tier timing is skipped")
    add_config_flags(bt, TableDtypeBenchConfig)
    _add_result_flags(bt)
    bt.set_defaults(fn=cmd_bench_table_dtype)
