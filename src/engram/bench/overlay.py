"""``engram bench overlay``: what serving each request with its own patches costs.

One model (a preset with random weights: the shape is what costs), its tables in memory, and
``tenants`` patches of ``patch_rows`` rows per Engram layer in a patch directory. Requests go
through the tenant server's request path (``engram.serve``: key-less patch resolution, the
patch cache, the stack check and merge, the model under its lock, greedy generation of
``max_new_tokens`` after a ``prompt_len``-token prompt), without the HTTP layer, one after the
other. Modes:

    none    no ``patches`` field: the plain model
    0       ``patches: []``: the overlay path with an empty stack
    1       every request names the same tenant's patch
    N       requests cycle over N tenants' patches (all in the cache: a hit after the first round)

Within a repeat the modes take turns request by request (request i in every mode, in an order
rotated per request), so that a slow moment of a shared machine hits all modes alike; a mode's
requests/s is its requests over the seconds its own requests took, and throughput ratios are
taken within a repeat against that repeat's ``none``. Every run is reported, with medians; p50
and p99 in the summary pool the latencies of every repeat.
Memory: the bytes the patch cache holds per tenant, against the patch file's size.
"""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from engram.bench.config import OverlayBenchConfig as _O
from engram.config import PatchServeConfig, ServeLimits, preset
from engram.model.lm import EngramLM
from engram.patches.patchfile import make_patch, save_patch
from engram.serve.service import TenantService
from engram.serve.store import PatchStore


def _percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def _model(preset_name: str, vocab: int, seed: int) -> EngramLM:
    torch.manual_seed(seed)
    model = EngramLM(preset(preset_name, vocab), np.arange(vocab, dtype=np.int64)).eval()
    with torch.no_grad():
        for e in model.engram_layers:
            e.table.weight.normal_()
        for p in model.parameters():  # the Engram value projection starts at zero: make it count
            if p.dim() >= 2 and not bool(p.any()):
                p.normal_(std=0.02)
    return model


def _patches(model: EngramLM, directory: Path, tenants: int, rows: int, seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    base = {e.layer_id: e.table.weight.detach() for e in model.engram_layers}
    ids = []
    for t in range(tenants):
        new = {}
        for lid, w in base.items():
            pick = torch.randperm(w.shape[0], generator=g)[:rows]
            new[lid] = w.clone()
            new[lid][pick] += torch.randn(pick.numel(), w.shape[1], generator=g)
        p = make_patch(base, new, hash_fingerprint=model.hasher.fingerprint(), hasher=model.hasher.describe(),
                       name=f"tenant {t}")
        save_patch(p, directory / f"tenant{t}.engp")
        ids.append(f"tenant{t}")
    return ids


def bench_overlay(preset: str = _O.preset, vocab_size: int = _O.vocab_size, tenants: int = _O.tenants,
                  patch_rows: int = _O.patch_rows, requests: int = _O.requests, prompt_len: int = _O.prompt_len,
                  max_new_tokens: int = _O.max_new_tokens, repeats: int = _O.repeats,
                  threads: Optional[int] = _O.threads, seed: int = _O.seed) -> dict[str, Any]:
    prev_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run(preset, vocab_size, tenants, patch_rows, requests, prompt_len, max_new_tokens, repeats,
                    threads, seed)
    finally:
        torch.set_num_threads(prev_threads)


def _run(preset_name: str, vocab: int, tenants: int, patch_rows: int, requests: int, prompt_len: int,
         max_new_tokens: int, repeats: int, threads: Optional[int], seed: int) -> dict[str, Any]:
    model = _model(preset_name, vocab, seed)
    g = torch.Generator().manual_seed(seed + 1)
    prompts = [torch.randint(0, vocab, (prompt_len,), generator=g).tolist() for _ in range(requests)]
    modes = {"none": None, "0": [], "1": "one", str(tenants): "many"}
    with tempfile.TemporaryDirectory(prefix="engram-bench-overlay-") as tmp:
        directory = Path(tmp)
        ids = _patches(model, directory, tenants, patch_rows, seed)
        store = PatchStore(directory, model, PatchServeConfig().cache_bytes)
        service = TenantService(model, None, store, None, PatchServeConfig(max_new_tokens=max(1, max_new_tokens)),
                                ServeLimits())

        def payload(mode: str, i: int) -> dict[str, Any]:
            p: dict[str, Any] = {"ids": prompts[i], "max_new_tokens": max_new_tokens, "temperature": 0.0}
            kind = modes[mode]
            if kind == "one":
                p["patches"] = [ids[0]]
            elif kind == "many":
                p["patches"] = [ids[i % tenants]]
            elif kind is not None:
                p["patches"] = []
            return p

        for mode in modes:  # warm-up: loads every patch, fills caches, first-call costs
            for i in range(min(requests, tenants)):
                service.generate(None, payload(mode, i))
        runs = []
        names = list(modes)
        for r in range(repeats):
            lat: dict[str, list[float]] = {m: [] for m in names}
            for i in range(requests):  # the modes take turns request by request, in a rotating order
                k = (r * requests + i) % len(names)
                for mode in names[k:] + names[:k]:
                    t = time.perf_counter()
                    service.generate(None, payload(mode, i))
                    lat[mode].append(time.perf_counter() - t)
            for mode in names:
                busy = sum(lat[mode])
                runs.append({"repeat": r, "mode": mode, "requests": requests, "seconds": busy,
                             "requests_per_s": requests / busy, "p50_ms": 1e3 * _percentile(lat[mode], 50),
                             "p99_ms": 1e3 * _percentile(lat[mode], 99),
                             "latencies_ms": [1e3 * x for x in lat[mode]]})
        stats = store.stats()
        file_bytes = [os.path.getsize(directory / f"{pid}.engp") for pid in ids]
        payload_bytes = [store.cached(pid).patch.summary()["payload_bytes"] for pid in ids if store.cached(pid)]
    summary = {}
    for mode in names:
        mine = [x for x in runs if x["mode"] == mode]
        base = {x["repeat"]: x for x in runs if x["mode"] == "none"}
        lat = [v for x in mine for v in x["latencies_ms"]]
        ratios = [x["requests_per_s"] / base[x["repeat"]]["requests_per_s"] for x in mine]
        summary[mode] = {"requests_per_s_median": statistics.median(x["requests_per_s"] for x in mine),
                         "p50_ms": _percentile(lat, 50), "p99_ms": _percentile(lat, 99),
                         "throughput_vs_none": ratios, "throughput_vs_none_median": statistics.median(ratios)}
    for x in runs:
        del x["latencies_ms"]
    per_tenant = stats["bytes"] / max(1, stats["entries"])
    return {
        "benchmark": "overlay", "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "threads": threads},
        "config": {"preset": preset_name, "vocab_size": vocab, "tenants": tenants, "patch_rows": patch_rows,
                   "requests": requests, "prompt_len": prompt_len, "max_new_tokens": max_new_tokens,
                   "repeats": repeats, "seed": seed,
                   "engram_layers": [e.layer_id for e in model.engram_layers],
                   "table_rows": {e.layer_id: e.table.num_embeddings for e in model.engram_layers},
                   "row_bytes": model.engram_layers[0].table.embedding_dim * 4},
        "runs": runs, "summary": summary,
        "memory": {"patch_file_bytes": statistics.median(file_bytes),
                   "patch_payload_bytes": statistics.median(payload_bytes) if payload_bytes else None,
                   "cache_bytes_per_tenant": per_tenant,
                   "cache_bytes_per_tenant_vs_file": per_tenant / statistics.median(file_bytes),
                   "overlay_bytes_per_tenant": _overlay_bytes(store, ids),
                   "patch_cache": stats},
    }


def _overlay_bytes(store: PatchStore, ids: list[str]) -> Optional[float]:
    """Bytes of the overlay alone (row ids and new values), the part a request reads."""
    sizes = [sum(o[0].numel() * 8 + o.values.numel() * o.values.element_size()
                 for o in store.cached(pid).patch.overlays().values()) for pid in ids if store.cached(pid)]
    return statistics.median(sizes) if sizes else None


_MODE_NAMES = {"none": "no patches (`none`)", "0": "`patches: []` (0 tenants)", "1": "1 tenant's patch"}


def overlay_page(r: dict[str, Any], command: str) -> str:
    """The results page of one ``bench_overlay`` result: every number below is read from ``r``."""
    c, m, mach = r["config"], r["memory"], r["machine"]
    rows = ["| mode | req/s per repeat | vs none, per repeat | median vs none | p50 ms | p99 ms |",
            "|---|---|---|---:|---:|---:|"]
    for mode, s in r["summary"].items():
        rps = " / ".join(f"{x['requests_per_s']:.3f}" for x in r["runs"] if x["mode"] == mode)
        ratios = " / ".join(f"{v:.3f}" for v in s["throughput_vs_none"])
        name = _MODE_NAMES.get(mode, f"{mode} tenants' patches, round robin")
        rows.append(f"| {name} | {rps} | {ratios} | **{s['throughput_vs_none_median']:.3f}** | "
                    f"{s['p50_ms']:.1f} | {s['p99_ms']:.1f} |")
    return "\n".join([
        f"# Patches per request: what the tenant server pays for them ({r['date']})", "",
        "Command:", "", "```bash", command, "```", "",
        f"Machine: {mach['cpus']} CPUs ({mach['platform']}), Python {mach['python']}, torch {mach['torch']}, "
        f"{mach['threads']} torch thread(s).", "",
        f"Setup: the `{c['preset']}` preset with random weights (vocabulary {c['vocab_size']:,}), tables in memory; "
        f"{c['tenants']} tenants, one patch each of {c['patch_rows']:,} changed rows; a request is a "
        f"{c['prompt_len']}-token prompt and {c['max_new_tokens']} greedy tokens through the tenant server's request "
        f"path without HTTP. {c['requests']} requests per mode and repeat, {c['repeats']} repeats, the modes taking "
        f"turns request by request.", "", *rows, "",
        f"Memory per tenant: the patch cache holds {m['cache_bytes_per_tenant']:,.0f} bytes for a "
        f"{m['patch_file_bytes']:,.0f}-byte patch file ({m['cache_bytes_per_tenant_vs_file']:.2f}x); the overlay a "
        f"request reads is {m['overlay_bytes_per_tenant']:,.0f} bytes "
        f"({m['overlay_bytes_per_tenant'] / m['patch_file_bytes']:.2f}x).", ""])
