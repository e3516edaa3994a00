"""``engram bench distributed``: row-sharded training on 1 vs W processes (docs/distributed.md).

Training itself on several processes is ``engram train --nproc N`` (or torchrun, see
``engram.cli.main``). The handler imports the library lazily so that ``engram --help`` stays light.
"""

from __future__ import annotations

import json

from engram.cli.flags import add_common


def cmd_bench_distributed(args) -> int:
    from engram.bench.distributed import bench_distributed

    res = bench_distributed(args.data, world=args.world, preset_name=args.preset, steps=args.steps,
                            warmup=args.warmup, batch_size=args.batch_size, seq_len=args.seq_len,
                            repeats=args.repeats, table_optimizer=args.table_optimizer,
                            progress=not args.quiet)
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


def register(sub, bench) -> None:  # noqa: ARG001 - the group adds no top-level command
    b = bench.add_parser("distributed", help="table bytes per step and step time of sharded training, "
                                             "1 vs W processes (torchrun, gloo on CPU)")
    add_common(b, "--json")
    add_common(b, "--quiet")
    b.add_argument("--data", help="a prepared dataset (default: the built-in corpus, prepared in a temp dir)")
    b.add_argument("--world", type=int, default=2, help="processes to compare with one (default 2)")
    b.add_argument("--preset", default="engram-moe", help="model preset (default engram-moe, the demo's)")
    b.add_argument("--steps", type=int, default=12)
    b.add_argument("--warmup", type=int, default=3, help="steps left out of the step time")
    b.add_argument("--batch-size", type=int, default=8, help="the global batch (split over the ranks)")
    b.add_argument("--seq-len", type=int, default=64)
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--table-optimizer", default="sparse_adam", choices=["adam", "sparse_adam"])
    b.set_defaults(fn=cmd_bench_distributed)
