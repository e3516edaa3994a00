"""``engram bench table-dtype``: fp8 table files against bf16 and fp32 - eval loss, bytes, rows/s.

Three measurements, all from the same table files (an fp32 export converted to bf16 and fp8 with
``engram.tables.convert``):

- **loss**: an Engram run (``--ckpt``) and/or a retrofit adapter (``--adapter``) evaluated on the
  same validation batches with each variant's rows (read back from its file, dequantised), batch
  by batch in one process: per batch, each variant's tables are swapped in (a reference swap,
  no copy) and the batch is run, so the per-batch differences are paired. Variant ``fp8-amax``
  is not a file format: the rows quantised with the plain scale amax / 448 per row instead of the
  power of two the file stores, to show what the exact-round-trip scale costs.
- **bytes**: bytes per stored row and whole files, per dtype.
- **rows/s**: random distinct rows read through each storage tier (memory, mmap with the page
  cache warm, mmap cold, cached, cached in a helper process), bf16 and fp8 taking turns in one
  process, ``repeats`` times each.

Shape legend
    R table rows    Dh row width    B batch    T positions
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from engram.config import StorageConfig
from engram.data import shards as data
from engram.errors import EngramError
from engram.fsutil import PathLike
from engram.tables.convert import convert_table, export_checkpoint_tables
from engram.tables.process import ProcessStorage
from engram.tables.tablefile import FP8_MAX, TableHeader, read_header, read_layer
from engram.tables.tiers import CachedStorage, MemoryStorage, MmapStorage, TableStorage

RESULTS_DATE = "2026-12-07"
MACHINE = ("2-core x86-64 CPU, 24 GiB, no GPU; measured while other jobs ran, so absolute speeds are not "
           "quiet-machine figures")
FILE_DTYPES = ("fp32", "bf16", "fp8")
VARIANTS = ("fp32", "bf16", "fp8", "fp8-amax")
TIERS = ("memory", "mmap", "mmap-cold", "cached", "cached-process")


# ----------------------------------------------------------------------------- table files
def table_files(src: PathLike, workdir: Path) -> dict[str, TableHeader]:
    """The fp32 table file ``src`` (or a checkpoint / adapter directory's tables) and its bf16 and
    fp8 conversions under ``workdir``."""
    workdir.mkdir(parents=True, exist_ok=True)
    src = Path(src)
    fp32 = workdir / "fp32.engt"
    if src.is_dir() and (src / "tables.engt").is_file():
        src = src / "tables.engt"  # a retrofit adapter's own table file
    done = [workdir / f"{dt}.engt" for dt in FILE_DTYPES]
    if not src.is_dir() and all(f.is_file() for f in done) and \
            [l.crc32 for l in read_header(src).layers.values()] == [l.crc32 for l in read_header(fp32).layers.values()]:
        return {dt: read_header(f) for dt, f in zip(FILE_DTYPES, done)}  # converted by an earlier run
    if src.is_dir():
        export_checkpoint_tables(src, fp32, "fp32")
    elif read_header(src).dtype == "fp32":
        shutil.copyfile(src, fp32)
    else:
        convert_table(src, fp32, "fp32")
    out = {"fp32": read_header(fp32)}
    for dt in FILE_DTYPES[1:]:
        out[dt] = convert_table(fp32, workdir / f"{dt}.engt", dt)
    return out


def amax_scale_rows(values: torch.Tensor) -> torch.Tensor:
    """Rows [R, Dh] quantised to e4m3 with the plain per-row scale amax / 448, dequantised (fp32)."""
    v = values.float()
    amax = v.abs().amax(dim=1, keepdim=True)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return (v / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * scale


def variant_tables(files: dict[str, TableHeader], variants: Sequence[str]) -> dict[str, dict[int, torch.Tensor]]:
    """{variant: {layer_id: rows [R, Dh] fp32}} as a model reads them from each file."""
    out: dict[str, dict[int, torch.Tensor]] = {}
    for v in variants:
        if v == "fp8-amax":
            out[v] = {lid: amax_scale_rows(read_layer(files["fp32"], lid)) for lid in files["fp32"].layers}
        elif v in files:
            out[v] = {lid: read_layer(files[v], lid) for lid in files[v].layers}
        else:
            raise EngramError(f"variant {v!r} is not one of {list(VARIANTS)}")
    return out


def quantisation_error(files: dict[str, TableHeader]) -> dict[str, float]:
    """Relative RMS error of the rows against fp32: bf16, fp8 as stored, fp8 with amax/448 scales."""
    num = {"bf16": 0.0, "fp8": 0.0, "fp8-amax": 0.0}
    den = 0.0
    for lid in files["fp32"].layers:
        ref = read_layer(files["fp32"], lid).double()
        den += float(ref.pow(2).sum())
        num["bf16"] += float((read_layer(files["bf16"], lid).double() - ref).pow(2).sum())
        num["fp8"] += float((read_layer(files["fp8"], lid).double() - ref).pow(2).sum())
        num["fp8-amax"] += float((amax_scale_rows(ref.float()).double() - ref).pow(2).sum())
    return {k: math.sqrt(v / den) if den else 0.0 for k, v in num.items()}


def bytes_report(files: dict[str, TableHeader]) -> dict[str, Any]:
    rows, dim = files["fp32"].rows, files["fp32"].dim
    per = {dt: {"row_bytes": h.row_bytes, "data_bytes": h.data_bytes, "file_bytes": h.file_bytes}
           for dt, h in files.items()}
    return {"rows": rows, "dim": dim, "dtypes": per,
            "fp8_over_bf16": per["fp8"]["data_bytes"] / per["bf16"]["data_bytes"],
            "fp8_over_fp32": per["fp8"]["data_bytes"] / per["fp32"]["data_bytes"]}


# ----------------------------------------------------------------------------- paired losses
def _swap_tables(model: Any, tables: dict[int, torch.Tensor]) -> None:
    with torch.no_grad():
        for e in model.engram_layers:
            e.table.weight.data = tables[e.layer_id]


@torch.no_grad()
def paired_losses(model: Any, shard: Any, tables: dict[str, dict[int, torch.Tensor]], batch_size: int,
                  seq_len: int, batches: int, progress: Optional[Callable[[str], None]] = None
                  ) -> dict[str, list[float]]:
    """Per batch, the loss with each variant's tables: {variant: [loss of batch i]}."""
    model.eval()
    out: dict[str, list[float]] = {v: [] for v in tables}
    for i, (x, y) in enumerate(data.iter_eval_batches(shard, batch_size, seq_len, batches)):
        for v, t in tables.items():
            _swap_tables(model, t)
            out[v].append(float(model(x, y).loss))
        if progress is not None and (i + 1) % 10 == 0:
            progress(f"batch {i + 1}: " + ", ".join(f"{v} {out[v][-1]:.4f}" for v in out))
    return out


def loss_summary(losses: dict[str, list[float]], reference: str = "bf16") -> dict[str, Any]:
    """Mean loss per variant and, against ``reference`` and fp32, the per-batch paired differences'
    mean, standard deviation and standard error."""
    n = len(next(iter(losses.values())))
    summary: dict[str, Any] = {"batches": n, "mean": {v: statistics.fmean(x) for v, x in losses.items()}}
    for ref in dict.fromkeys((reference, "fp32")):
        if ref not in losses:
            continue
        diffs = {}
        for v, x in losses.items():
            if v == ref:
                continue
            d = [a - b for a, b in zip(x, losses[ref])]
            sd = statistics.stdev(d) if n > 1 else 0.0
            diffs[v] = {"mean": statistics.fmean(d), "std": sd, "se": sd / math.sqrt(n) if n else 0.0,
                        "min": min(d), "max": max(d)}
        summary[f"minus_{ref}"] = diffs
    return summary


def _loss_block(model: Any, shard: Any, files: dict[str, TableHeader], variants: Sequence[str],
                batch_size: int, seq_len: int, batches: int, log: Callable[[str], None]) -> dict[str, Any]:
    tables = variant_tables(files, variants)
    t0 = time.perf_counter()
    losses = paired_losses(model, shard, tables, batch_size, seq_len, batches, log)
    return {"batch_size": batch_size, "seq_len": seq_len, "tokens_per_variant": batch_size * seq_len * len(
        next(iter(losses.values()))), "eval_s": time.perf_counter() - t0, "losses": losses,
        "summary": loss_summary(losses), "quantisation_error": quantisation_error(files),
        "bytes": bytes_report(files)}


def demo_losses(run_dir: PathLike, data_dir: PathLike, workdir: Path, variants: Sequence[str],
                batch_size: int, seq_len: int, batches: int, log: Callable[[str], None]) -> dict[str, Any]:
    from engram.model.checkpoint import load_model

    files = table_files(run_dir, workdir)
    model, meta = load_model(run_dir)
    shard = data.load_dataset(data_dir).val
    res = _loss_block(model, shard, files, variants, batch_size, seq_len, batches, log)
    return {"ckpt": str(run_dir), "data": str(data_dir), "step": meta.step,
            "preset_engram_layers": [e.layer_id for e in model.engram_layers], **res}


def adapter_losses(adapter_dir: PathLike, data_dir: PathLike, files: dict[str, TableHeader],
                   variants: Sequence[str], batch_size: int, seq_len: int, batches: int,
                   log: Callable[[str], None]) -> dict[str, Any]:
    from engram.retrofit.adapter import load_adapter, read_adapter_meta

    # the retrofit eval path (engram retrofit eval): the adapter on its base, tables from a file in memory
    model = load_adapter(adapter_dir, storage=StorageConfig(path=str(files["fp32"].path), prefetch=False))
    try:
        shard = data.load_dataset(data_dir).val
        res = _loss_block(model, shard, files, variants, batch_size, seq_len, batches, log)
    finally:
        model.remove_hooks()
    return {"adapter": str(adapter_dir), "data": str(data_dir), "step": read_adapter_meta(adapter_dir).step,
            "base": model.base_model.name, "engram_layers": [e.layer_id for e in model.engram_layers], **res}


# ----------------------------------------------------------------------------- tier throughput
def _open_tier(kind: str, header: TableHeader, layer_id: int, cache_rows: int) -> TableStorage:
    if kind == "memory":
        return MemoryStorage(read_layer(header, layer_id))  # what --storage memory holds: fp32 rows
    if kind == "cached-process":
        return ProcessStorage(StorageConfig(path=str(header.path), kind="cached", cache_rows=cache_rows,
                                            io_threads=1), header, layer_id)
    backing = MmapStorage(header, layer_id, io_threads=1, cold=kind == "mmap-cold")
    return CachedStorage(backing, cache_rows, "lru") if kind == "cached" else backing


def tier_rows_per_s(files: dict[str, TableHeader], tiers: Sequence[str], lookups: int, rows_per_lookup: int,
                    repeats: int, cache_fraction: float, seed: int) -> dict[str, Any]:
    """Random distinct rows read through each tier, bf16 and fp8 taking turns (ABBA) per repeat."""
    h = files["fp8"]
    lid = next(iter(h.layers))
    n_rows = h.layer(lid).rows
    cache_rows = max(1, int(n_rows * cache_fraction))
    g = torch.Generator().manual_seed(seed)
    requests = [torch.randperm(n_rows, generator=g)[:rows_per_lookup] for _ in range(lookups)]
    runs = []
    memory = {}  # the decoded rows of the memory tier, read once per dtype
    for kind in tiers:
        for r in range(repeats):
            order = ("bf16", "fp8") if r % 2 == 0 else ("fp8", "bf16")
            for dt in order:
                if kind == "memory":
                    if dt not in memory:
                        memory[dt] = read_layer(files[dt], lid)
                    tier: TableStorage = MemoryStorage(memory[dt])
                else:
                    tier = _open_tier(kind, files[dt], lid, cache_rows)
                try:
                    out = torch.empty(rows_per_lookup, h.dim)
                    if kind.startswith("cached"):  # warm the pool with the same stream once
                        for rows in requests:
                            tier.lookup(rows, out, unique=True)
                    t0, c0 = time.perf_counter(), time.process_time()
                    for rows in requests:
                        tier.lookup(rows, out, unique=True)
                    dt_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
                finally:
                    tier.close()
                n = lookups * rows_per_lookup
                # CPU time of this process: on a machine shared with other jobs the wall time is
                # mostly waiting for a core (the helper process's own CPU is not in it)
                runs.append({"tier": kind, "dtype": dt, "repeat": r, "seconds": dt_s, "cpu_s": cpu_s,
                             "rows_per_s": n / dt_s, "rows_per_cpu_s": n / max(cpu_s, 1e-9)})
    summary = {}
    for kind in tiers:
        mine = [x for x in runs if x["tier"] == kind]
        by = {dt: {x["repeat"]: x["rows_per_s"] for x in mine if x["dtype"] == dt} for dt in ("bf16", "fp8")}
        ratios = [by["fp8"][r] / by["bf16"][r] for r in range(repeats)]
        summary[kind] = {"bf16_rows_per_s": [by["bf16"][r] for r in range(repeats)],
                         "fp8_rows_per_s": [by["fp8"][r] for r in range(repeats)],
                         "fp8_over_bf16": ratios, "fp8_over_bf16_median": statistics.median(ratios)}
        cpu = {dt: {x["repeat"]: x.get("rows_per_cpu_s") for x in mine if x["dtype"] == dt} for dt in ("bf16", "fp8")}
        cratios = [cpu["fp8"][r] / cpu["bf16"][r] for r in range(repeats)]
        summary[kind].update(bf16_rows_per_cpu_s=[cpu["bf16"][r] for r in range(repeats)],
                             fp8_rows_per_cpu_s=[cpu["fp8"][r] for r in range(repeats)],
                             fp8_over_bf16_cpu=cratios, fp8_over_bf16_cpu_median=statistics.median(cratios))
    return {"table": str(h.path), "layer": lid, "rows": n_rows, "dim": h.dim, "lookups": lookups, "repeats": repeats,
            "rows_per_lookup": rows_per_lookup, "cache_rows": cache_rows, "runs": runs, "summary": summary}


# ----------------------------------------------------------------------------- the benchmark
def bench_table_dtype(*, ckpt: Optional[str] = None, data_dir: Optional[str] = None,
                      adapter: Optional[str] = None, adapter_data: Optional[str] = None,
                      workdir: str = "table-dtype-work",
                      variants: Sequence[str] = VARIANTS,
                      adapter_variants: Sequence[str] = ("fp32", "bf16", "fp8"), demo_batches: int = 40, demo_batch_size: int = 8,
                      demo_seq_len: int = 128, adapter_batches: int = 40, adapter_batch_size: int = 2,
                      adapter_seq_len: int = 256, tiers: Sequence[str] = TIERS, lookups: int = 20,
                      rows_per_lookup: int = 4096, repeats: int = 3, cache_fraction: float = 0.25,
                      threads: int = 1, seed: int = 0, progress: bool = True,
                      earlier: Optional[Sequence[dict[str, Any]]] = None) -> dict[str, Any]:
    """The result dict (see the module docstring); ``workdir`` receives the converted table files.

    ``earlier``: results of earlier runs (later ones win) whose parts (``demo``, ``retrofit``, ``tiers``) are
    kept where this run does not measure them (an empty ``tiers`` skips the tier timing), so
    slow parts can be measured in separate processes and rendered on one page.
    """
    tiers = tuple(t for t in tiers if t)
    if ckpt is None and adapter is None and not tiers and earlier is None:
        raise EngramError("bench table-dtype needs --ckpt RUN --data DIR and/or --adapter DIR --adapter-data DIR")
    if (ckpt is None) != (data_dir is None) or (adapter is None) != (adapter_data is None):
        raise EngramError("give --ckpt with --data, and --adapter with --adapter-data")
    torch.set_num_threads(threads)
    log: Callable[[str], None] = (lambda s: print(f"table-dtype: {s}", flush=True)) if progress else (lambda s: None)
    work = Path(workdir)
    result: dict[str, Any] = {
        "benchmark": "table-dtype", "date": RESULTS_DATE, "machine": MACHINE,
        "platform": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                     "torch": torch.__version__, "threads": threads},
        "config": {"variants": list(variants), "adapter_variants": list(adapter_variants), "demo_batches": demo_batches, "demo_batch_size": demo_batch_size,
                   "demo_seq_len": demo_seq_len, "adapter_batches": adapter_batches,
                   "adapter_batch_size": adapter_batch_size, "adapter_seq_len": adapter_seq_len,
                   "tiers": list(tiers), "lookups": lookups, "rows_per_lookup": rows_per_lookup,
                   "repeats": repeats, "cache_fraction": cache_fraction, "seed": seed}}
    for e in earlier or []:  # later results win
        result.setdefault("earlier", {}).update({k: e["config"] for k in ("demo", "retrofit", "tiers") if k in e})
        result.update({k: e[k] for k in ("demo", "retrofit", "tiers") if k in e})
    partial = work / "partial.json"  # what is measured so far, should a later stage fail
    if ckpt is not None:
        log(f"demo model {ckpt}")
        result["demo"] = demo_losses(ckpt, data_dir, work / "demo", variants, demo_batch_size, demo_seq_len,
                                     demo_batches, log)
        partial.write_text(json.dumps(result))
    if ckpt is None and adapter is None and not tiers:
        return result  # only merging earlier results
    largest = "retrofit" if adapter is not None or (work / "adapter" / "fp8.engt").is_file() else "demo"
    files = (table_files(adapter, work / "adapter") if adapter is not None else
             {dt: read_header(work / ("adapter" if largest == "retrofit" else "demo") / f"{dt}.engt")
              for dt in FILE_DTYPES})
    if tiers:
        log(f"tier throughput on the {largest} table")
        result["tiers"] = tier_rows_per_s(files, tiers, lookups, rows_per_lookup, repeats, cache_fraction, seed)
        result["tiers"]["source"] = largest
        partial.write_text(json.dumps(result))
    if adapter is not None:
        log(f"retrofit adapter {adapter}")
        result["retrofit"] = adapter_losses(adapter, adapter_data, files, adapter_variants,
                                            adapter_batch_size, adapter_seq_len, adapter_batches, log)
    return result


# ----------------------------------------------------------------------------- the page
def _fmt_bytes(n: float) -> str:
    for unit, k in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= k:
            return f"{n / k:,.1f} {unit}"
    return f"{n:,.0f} B"


def _loss_section(title: str, r: dict[str, Any], who: str) -> list[str]:
    s = r["summary"]
    variants = list(s["mean"])
    lines = [f"## {title}", "", who, "",
             f"{s['batches']} validation batches of {r['batch_size']} x {r['seq_len']} tokens "
             f"({r['tokens_per_variant']:,} tokens per variant), the same batches for every variant, "
             f"{r['eval_s'] / 60:.1f} min in all.", "",
             "| tables | mean eval loss | minus bf16: mean | std | std error | minus fp32: mean | std | "
             "bytes per row | relative RMS error of the rows vs fp32 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    rb = {dt: v["row_bytes"] for dt, v in r["bytes"]["dtypes"].items()}
    qe = r["quantisation_error"]
    for v in variants:
        b = s.get("minus_bf16", {}).get(v)
        f = s.get("minus_fp32", {}).get(v)
        bcell = f"{b['mean']:+.6f} | {b['std']:.6f} | {b['se']:.6f}" if b else "0 | - | -"
        fcell = f"{f['mean']:+.6f} | {f['std']:.6f}" if f else "0 | -"
        row_b = rb.get(v, rb["fp8"] if v.startswith("fp8") else None)
        err = qe.get(v)
        lines.append(f"| {v} | {s['mean'][v]:.5f} | {bcell} | {fcell} | {row_b} | "
                     f"{'0' if v == 'fp32' else f'{err:.4f}' if err is not None else '-'} |")
    lines += ["", "Per-batch paired differences fp8 minus bf16 (nats): " + ", ".join(
        f"{a - b:+.6f}" for a, b in zip(r["losses"]["fp8"], r["losses"]["bf16"])) if "fp8" in r["losses"]
        and "bf16" in r["losses"] else "", ""]
    return lines


def table_dtype_page(r: dict[str, Any], command: str) -> str:
    """The results page of one ``bench_table_dtype`` result; every number below is read from ``r``."""
    c, p = r["config"], r["platform"]
    kept = sorted(r.get("earlier", {}))  # parts measured by an earlier run (--merge)
    out = [f"# fp8 Engram tables against bf16 and fp32 ({r['date']})", "",
           "Command:", "", "```bash", command, "```", "",
           f"Machine: {r['machine']}. {p['cpus']} CPUs seen ({p['platform']}), Python {p['python']}, "
           f"torch {p['torch']}, {p['threads']} torch thread(s), run under `nice -n 19`.", "",
           *(["Measured in separate runs of the command (above, in order), each later one keeping the parts of "
              "the earlier results it did not measure (`--merge`); each part's settings are in the JSON.", ""]
             if kept else []),
           "The fp32 table of each model is exported to a table file and converted with "
           "`engram table convert SRC DST --dtype bf16|fp8`; each variant's rows are read back from its "
           "file (fp8: dequantised, value x per-row scale). `fp8` is the stored format (per-row power-of-two "
           "scale, see docs/storage.md); `fp8-amax` is *not* a file format: the same rows quantised with the "
           "plain scale amax / 448, to show what the power-of-two scale costs.", ""]
    goal = []
    for key, title in (("demo", "Demo model (engram-moe)"), ("retrofit", "SmolLM2-135M retrofit adapter")):
        if key not in r:
            continue
        x = r[key]
        who = (f"Run `{x['ckpt']}` (step {x['step']}), data `{x['data']}`." if key == "demo" else
               f"Adapter `{x['adapter']}` (step {x['step']}, Engram at base layer(s) {x['engram_layers']}) on "
               f"`{x['base']}`, data `{x['data']}`; loaded as `engram retrofit eval` loads it.")
        out += _loss_section(title, x, who)
        d = x["summary"].get("minus_bf16", {}).get("fp8")
        if d is not None:
            goal.append(f"| {title} | {d['mean']:+.6f} +- {d['se']:.6f} | "
                        f"{'yes' if d['mean'] + 2 * d['se'] <= 0.01 else 'no'} | "
                        f"{x['bytes']['fp8_over_bf16']:.3f} | {x['bytes']['fp8_over_fp32']:.3f} |")
    if goal:
        out += ["## Against the goal: at most +0.01 nats vs bf16 at about half its bytes", "",
                "| model | fp8 minus bf16 (mean +- std error, nats) | within +0.01 (mean + 2 SE) | "
                "fp8 / bf16 bytes | fp8 / fp32 bytes |", "|---|---:|---|---:|---:|", *goal, ""]
    byts = ["## Bytes", "", "| table | dtype | bytes per row | table data | file |", "|---|---|---:|---:|---:|"]
    for key in ("demo", "retrofit"):
        if key in r:
            b = r[key]["bytes"]
            for dt, v in b["dtypes"].items():
                byts.append(f"| {key} ({b['rows']:,} rows x {b['dim']}) | {dt} | {v['row_bytes']} | "
                            f"{_fmt_bytes(v['data_bytes'])} | {_fmt_bytes(v['file_bytes'])} |")
    out += byts + [""]
    t = r.get("tiers")
    if t is None:
        return "\n".join(out)
    out += ["## Tier throughput (rows/s)", "",
            f"Table: the {t['source']} table's layer {t['layer']} ({t['rows']:,} rows x {t['dim']}). Each run reads "
            f"{t['lookups']} lookups of {t['rows_per_lookup']:,} distinct random rows into fp32; cached tiers hold "
            f"{t['cache_rows']:,} rows and are warmed with the same lookups once first. bf16 and fp8 take turns "
            f"(ABBA) in one process, {t.get('repeats', c['repeats'])} repeats each; one I/O thread. `memory` holds the decoded fp32 "
            f"rows for both (what `--storage memory` loads), `mmap-cold` drops the page cache after every lookup.",
            "", "Wall-clock rows/s:", "",
            "| tier | bf16 rows/s (each run) | fp8 rows/s (each run) | fp8 / bf16 (each run) | median ratio |",
            "|---|---|---|---|---:|"]
    for kind, s in t["summary"].items():
        out.append(f"| {kind} | {' / '.join(f'{v:,.0f}' for v in s['bf16_rows_per_s'])} | "
                   f"{' / '.join(f'{v:,.0f}' for v in s['fp8_rows_per_s'])} | "
                   f"{' / '.join(f'{v:.2f}' for v in s['fp8_over_bf16'])} | {s['fp8_over_bf16_median']:.2f} |")
    if all("fp8_over_bf16_cpu" in s for s in t["summary"].values()):
        out += ["", "Rows per CPU-second of the benchmark's process (its lookups' own cost: on the shared machine "
                "the wall time was mostly waiting for a core; `cached-process` does its work in a helper process, "
                "which this does not count):", "",
                "| tier | bf16 rows/CPU-s (each run) | fp8 rows/CPU-s (each run) | fp8 / bf16 (each run) | median ratio |",
                "|---|---|---|---|---:|"]
        for kind, s in t["summary"].items():
            out.append(f"| {kind} | {' / '.join(f'{v:,.0f}' for v in s['bf16_rows_per_cpu_s'])} | "
                       f"{' / '.join(f'{v:,.0f}' for v in s['fp8_rows_per_cpu_s'])} | "
                       f"{' / '.join(f'{v:.2f}' for v in s['fp8_over_bf16_cpu'])} | "
                       f"{s['fp8_over_bf16_cpu_median']:.2f} |")
    out.append("")
    return "\n".join(out)
