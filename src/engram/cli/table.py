"""``engram table ...``, plus the storage switches of
``engram train / eval / generate`` (``--table``, ``--storage``, ``--cache-rows``, ``--prefetch``).

    engram table inspect FILE [--verify] [--json]       header, layers, fingerprint; --verify CRCs
    engram table convert SRC DST [--dtype bf16|fp8]     checkpoint -> file, file -> file
    engram table convert FILE OUT_RUN --base RUN        file -> new checkpoint (base run's model)
    engram table stats --data DIR (--ckpt RUN | --preset P)   Zipf curve + simulated hit rates

Handlers import the library lazily, inside the function, so that ``engram --help`` does not load torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Optional

from engram.cli.flags import add_common, add_config_flags, config_from_args, int_list
from engram.config import CachePolicy, StorageConfig, TrainConfig, preset
from engram.errors import EngramError


# ----------------------------------------------------------------------------- shared switches
def add_storage_arguments(p: argparse.ArgumentParser) -> None:
    """Switches of ``eval`` and ``generate``: where the Engram tables come from (StorageConfig).

    ``--storage`` and ``--prefetch`` default to None, "not given": ``storage_from_args`` picks the
    tier and turns prefetch on when a table file is given."""
    g = p.add_argument_group("Engram table storage (docs/storage.md)")
    add_config_flags(g, StorageConfig, defaults={"kind": None, "prefetch": None})


# TrainConfig fields that are also flags of ``engram train`` (--prefetch, --table-storage, ...)
TRAIN_TABLE_FLAGS = ("prefetch", "table_storage", "table_cache_rows", "table_dir")


def add_train_table_arguments(p: argparse.ArgumentParser) -> None:
    """Switches of ``train``: initial tables from a file, background batch prefetch, and where
    the tables live while they train (memory, mmap, cached)."""
    g = p.add_argument_group("Engram tables (docs/storage.md)")
    g.add_argument("--table", metavar="FILE", help="initialise the Engram tables of a fresh run from "
                   "this table file (its hash fingerprint must match the config)")
    # None = not given: keeps train.* from the preset, --config and --set
    add_config_flags(g, TrainConfig, only=TRAIN_TABLE_FLAGS, defaults=dict.fromkeys(TRAIN_TABLE_FLAGS))


def storage_from_args(args: argparse.Namespace) -> Optional[StorageConfig]:
    """The StorageConfig the switches ask for, or None for the plain in-memory model."""
    table, kind = getattr(args, "table", None), getattr(args, "storage", None)
    prefetch = getattr(args, "prefetch", None)
    if table is None and kind in (None, "memory") and not prefetch and not getattr(args, "cold", False):
        return None
    if kind is None:
        kind = "cached" if table is not None else "memory"
    return config_from_args(args, StorageConfig, kind=kind, prefetch=True if prefetch is None else prefetch)


def storage_for(args: argparse.Namespace, ckpt: str) -> Optional[StorageConfig]:
    """``storage_from_args`` for the model in ``ckpt``: ``--storage mmap|cached`` without
    ``--table`` serves the directory's own table file, when it has one (an adapter's)."""
    from engram.auto.loader import table_file

    if getattr(args, "table", None) is None and getattr(args, "storage", None) in ("mmap", "cached"):
        own = table_file(ckpt)
        if own is not None:
            args = argparse.Namespace(**{**vars(args), "table": str(own)})
    return storage_from_args(args)


def load_from_args(args: argparse.Namespace, ckpt: Optional[str] = None) -> Any:
    """The model saved in ``ckpt`` (default ``--ckpt``), whatever its kind, through ``engram.load``:
    tables as the storage switches say, an adapter on ``--base`` (default: its own). What was
    read about the directory (meta, tokenizer) is ``model.loaded_from``."""
    from engram.auto.loader import load
    from engram.model.accel import resolve_device

    ckpt = ckpt or args.ckpt
    return load(ckpt, storage=storage_for(args, ckpt), base=getattr(args, "base", None),
                progress=not getattr(args, "quiet", False),
                device=resolve_device(getattr(args, "device", None) or "cpu"))


def report_generation(model: Any, tokens: int, seconds: float) -> None:
    """One stderr line with tokens/s and the tables' hit rate when they are offloaded."""
    from engram.tables.runtime import table_runtime

    rt = table_runtime(model)
    if rt is None:
        return
    st = rt.stats()
    print(f"engram: {tokens} new tokens in {seconds:.2f} s ({tokens / max(seconds, 1e-9):,.1f} tokens/s); "
          f"tables: {st['storage']}, prefetch {'on' if st['prefetch'] else 'off'}, hit rate "
          f"{st['hit_rate']:.1%}, stalled {st['stall_s']:.3f} s", file=sys.stderr)
    rt.close()


# ----------------------------------------------------------------------------- table commands
def cmd_inspect(args: argparse.Namespace) -> int:
    from engram.tables.tablefile import read_header, verify_checksums

    h = read_header(args.file)
    info = h.summary()
    if args.verify:
        info["verified"] = {str(k): v for k, v in verify_checksums(h, progress=not args.json).items()}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{h.path}: engram table v{h.version}, {h.dtype}, {h.rows:,} rows x {h.dim} "
          f"({h.file_bytes / 2**20:,.1f} MiB)")
    print(f"hash fingerprint {h.fingerprint}")
    for l in h.layers.values():
        crc = "none" if l.crc32 is None else f"{l.crc32:#010x}"
        print(f"  layer {l.layer_id}: {l.rows:,} rows, {len(l.head_sizes)} heads, offset {l.offset:,}, "
              f"{l.nbytes / 2**20:,.1f} MiB, crc32 {crc}")
    if args.verify:
        ok = [k for k, v in info["verified"].items() if v]
        skipped = [k for k, v in info["verified"].items() if v is None]
        print(f"verified layers {ok}" + (f"; no checksum stored for {skipped}" if skipped else ""))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from engram.tables.convert import convert_table, export_checkpoint_tables, import_table_into_checkpoint

    src = Path(args.src)
    if src.is_dir():
        if args.base:
            raise EngramError("--base is for importing a table file into a checkpoint; SRC is a run directory")
        h = export_checkpoint_tables(src, args.dst, dtype=args.dtype or "fp32", progress=not args.quiet)
        print(f"wrote {h.path}: {h.rows:,} rows x {h.dim} {h.dtype} ({h.file_bytes / 2**20:,.1f} MiB) "
              f"from {src}")
    elif args.base:
        if args.dtype:
            raise EngramError(f"--dtype {args.dtype} does not apply when writing a checkpoint (its tables are "
                              f"fp32; an fp8 table is dequantised into them); drop --dtype")
        res = import_table_into_checkpoint(src, args.base, args.dst, progress=not args.quiet)
        print(f"wrote checkpoint {res['checkpoint']}: {args.base}'s model with tables from {src}")
    else:
        h = convert_table(src, args.dst, dtype=args.dtype, progress=not args.quiet)
        print(f"wrote {h.path}: {h.rows:,} rows x {h.dim} {h.dtype} ({h.file_bytes / 2**20:,.1f} MiB)")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from engram.data.shards import load_dataset
    from engram.tables.access import access_report

    ds = load_dataset(args.data)
    hasher = _hasher_for(args, ds)
    caps, policies = _cache_rows_list(args.cache_rows), _policy_list(args.policy)
    rep = access_report(hasher, getattr(ds, args.split), batch_size=args.batch_size, seq_len=args.seq_len,
                        max_tokens=args.tokens, order=args.order, capacities=caps, policies=policies,
                        progress=not args.json)
    if args.out:
        Path(args.out).write_text(json.dumps(rep, indent=2))
    if args.plot:
        _plot(rep, args.plot)
    if args.json:
        print(json.dumps(rep))
        return 0
    print(f"{rep['tokens']:,} tokens ({args.split}, {args.order}), {rep['heads_per_layer']} heads per layer")
    for lid, l in rep["layers"].items():
        share = ", ".join(f"{k.replace('top_', 'top ')}: {v:.1%}" for k, v in l["traffic_share"].items())
        z = l["zipf_exponent"]
        print(f"layer {lid}: {l['accesses']:,} accesses, {l['distinct_rows']:,} distinct of "
              f"{l['table_rows']:,} rows ({l['singletons']:,} seen once); Zipf s = "
              f"{'n/a' if z is None else f'{z:.2f}'}; traffic share {share}")
        print(f"  {'cache rows':>12} {'policy':>7} {'hit rate':>9} {'per access':>11}")
        for c in l["caches"]:
            hr = "" if "hit_rate" not in c else f"{c['hit_rate']:.1%}"
            print(f"  {c['capacity']:>12,} {c['policy']:>7} {hr:>9} {c['access_hit_rate']:>11.1%}")
    return 0


def _cache_rows_list(text: str) -> list[int]:
    caps = int_list(text, "--cache-rows")
    if not caps or any(c < 1 for c in caps):
        raise EngramError(f"--cache-rows {text!r}: every pool size must be >= 1")
    return caps


def _policy_list(text: str) -> list[str]:
    policies = [p for p in str(text).split(",") if p]
    if not policies or any(p not in CachePolicy.values() for p in policies):
        raise EngramError(f"--policy {text!r}: expected comma-separated names from "
                          f"{', '.join(CachePolicy.values())}")
    return policies


def _hasher_for(args: argparse.Namespace, ds: Any):
    from engram.hashing.hasher import NgramHasher

    if args.ckpt:
        from engram.model import checkpoint as ckpt

        meta = ckpt.read_config(args.ckpt)
        cfg = meta.model_config
        compression = ckpt.load_compression_file(meta.run_dir, meta)
    else:
        from engram.training.trainer import _dataset_compression

        cfg = preset(args.preset, int(ds.meta["vocab_size"]))
        if args.rows_per_head and cfg.engram is not None:  # e.g. the offload benchmark's bigger tables
            eng = dataclasses.replace(cfg.engram, rows_per_head=(args.rows_per_head,) * len(
                cfg.engram.rows_per_head))
            cfg = dataclasses.replace(cfg, engram=eng)
        compression = _dataset_compression(cfg, ds, Path(args.data))
    if cfg.engram is None:
        raise EngramError(f"{args.ckpt or args.preset} has no Engram layers; pick an engram-* preset or run")
    return NgramHasher(cfg.engram, cfg.vocab_size, compression if cfg.engram.use_compression else None)


def _plot(rep: dict[str, Any], path: str) -> None:
    try:  # matplotlib is an optional extra: only --plot needs it
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise EngramError("--plot needs matplotlib (pip install matplotlib); use --out for the JSON") from None
    fig, ax = plt.subplots(figsize=(5, 4))
    for lid, l in rep["layers"].items():
        r, c = zip(*l["curve"])
        ax.loglog(r, c, marker=".", label=f"layer {lid} (s = {l['zipf_exponent'] or float('nan'):.2f})")
    ax.set_xlabel("rank")
    ax.set_ylabel("accesses")
    ax.set_title(f"Engram row accesses, {rep['tokens']:,} tokens")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ----------------------------------------------------------------------------- registration
def register(sub: Any) -> None:
    t = sub.add_parser("table", help="Engram table files: inspect, convert, access statistics"
                       ).add_subparsers(dest="sub", required=True)
    i = t.add_parser("inspect", help="header, layers and fingerprint of a table file")
    i.add_argument("file")
    i.add_argument("--verify", action="store_true", help="re-read all data and check the CRC-32s")
    add_common(i, "--json")
    i.set_defaults(fn=cmd_inspect)

    c = t.add_parser("convert", help="checkpoint -> table file, table file -> table file, or "
                     "table file -> checkpoint (with --base)")
    c.add_argument("src", help="a run directory or a table file")
    c.add_argument("dst", help="a table file, or with --base a new run directory")
    c.add_argument("--dtype", choices=["fp32", "bf16", "fp16", "fp8"],
                   help="storage dtype of the written table (fp8: float8 e4m3 values and a scale per row; "
                        "from an fp8 table, fp32/bf16/fp16 dequantise)")
    c.add_argument("--base", metavar="RUN", help="write a checkpoint: RUN's model with SRC's tables")
    add_common(c, "--quiet")
    c.set_defaults(fn=cmd_convert)

    s = t.add_parser("stats", help="rank-frequency (Zipf) of row accesses and simulated cache hit rates")
    add_common(s, "--data", required=True)
    src = s.add_mutually_exclusive_group()
    add_common(src, "--ckpt", help="use this run's hashing configuration")
    src.add_argument("--preset", default="engram-moe", help="or a preset's (default engram-moe)")
    s.add_argument("--rows-per-head", "--table-rows", type=int,
                   help="with --preset: rows per hash head (bigger tables; --table-rows is the old name)")
    s.add_argument("--split", choices=["train", "val"], default="train")
    s.add_argument("--tokens", type=int, default=1_000_000, help="tokens of the stream (default 1M)")
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--seq-len", type=int, default=128)
    s.add_argument("--order", choices=["sequential", "random"], default="sequential")
    s.add_argument("--cache-rows", default="1000,10000,100000", help="comma-separated pool sizes")
    s.add_argument("--policy", default="lru,lfu", help="comma-separated: lru, lfu")
    add_common(s, "--out", help="also write the JSON report here")
    s.add_argument("--plot", help="write the rank-frequency curve as a PNG (needs matplotlib)")
    add_common(s, "--json")
    s.set_defaults(fn=cmd_stats)
