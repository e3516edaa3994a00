"""The insertion-layer and table-size sweeps of the retrofit study, as tables with paired tests.

    python benchmarks/retrofit_sweeps.py RUNS OUT.json

RUNS holds the `engram retrofit compare` directories: `compare-shakespeare` (Engram before
layer 1 with 131,072 rows per head: the shared point of both sweeps), `sweep-layer-L` and
`sweep-table-S` (see benchmarks/results/2026-12-02-retrofit-vs-lora.md for the commands).
Prints markdown; writes every seed's numbers and the tests to OUT.json.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from engram.stats import format_p, mean_std, paired_t

LAYERS = (1, 8, 15, 29)
TABLES = (16_384, 65_536, 131_072, 262_144)
SHARED = "compare-shakespeare"  # layer 1, 131,072 rows: part 1's Engram runs


def _engram_runs(path: Path) -> dict[int, dict]:
    """seed -> the Engram result row at the directory's chosen lr."""
    summary = json.loads((path / "summary.json").read_text())
    lr = summary["chosen_lr"]["engram"]
    rows = [json.loads(line) for line in (path / "results.jsonl").read_text().splitlines() if line.strip()]
    return {r["seed"]: r for r in rows if r["variant"] == "engram" and r["lr"] == lr}


def _base(path: Path) -> dict:
    rows = [json.loads(line) for line in (path / "results.jsonl").read_text().splitlines() if line.strip()]
    return next(r for r in rows if r["variant"] == "base")


def main(root: str, out: str) -> None:
    base = Path(root)
    b = _base(base / SHARED)
    points = {("layer", L): base / (SHARED if L == 1 else f"sweep-layer-{L}") for L in LAYERS}
    points.update({("table", S): base / (SHARED if S == 131_072 else f"sweep-table-{S}") for S in TABLES})
    runs = {k: _engram_runs(p) for k, p in points.items()}
    res: dict = {"base": {"test_loss": b["test_loss"], "general_loss": b["general_loss"]}, "points": {}, "tests": {}}
    for (kind, x), r in runs.items():
        seeds = sorted(r)
        res["points"][f"{kind}={x}"] = {
            "seeds": seeds, "test_loss": [r[s]["test_loss"] for s in seeds],
            "general_loss": [r[s]["general_loss"] for s in seeds],
            "adapter_bytes": r[seeds[0]]["adapter_bytes"] if seeds else None,
            "runs": [r[s] for s in seeds]}

    def row(kind: str, x: int) -> str:
        p = res["points"][f"{kind}={x}"]
        m, s = mean_std(p["test_loss"])
        g, _ = mean_std(p["general_loss"])
        return f"{m:.4f} ± {s:.4f} ({len(p['seeds'])})", f"{g:.4f}", m

    print(f"base: test {b['test_loss']:.4f}, general {b['general_loss']:.4f}\n")
    print("| Engram before decoder layer | test loss (seeds) | vs base | general-text loss | vs layer 1 (p) |")
    print("|---|---:|---:|---:|---:|")
    ref = runs[("layer", 1)]
    for L in LAYERS:
        t, g, m = row("layer", L)
        cmp = ""
        if L != 1:
            common = sorted(set(runs[("layer", L)]) & set(ref))
            if len(common) >= 2:
                pt = paired_t([runs[("layer", L)][s]["test_loss"] for s in common], [ref[s]["test_loss"] for s in common])
                res["tests"][f"layer {L} - layer 1"] = pt
                cmp = f"{pt['mean_diff']:+.4f} ({format_p(pt['p'])})"
        print(f"| {L} | {t} | {m - b['test_loss']:+.4f} | {g} | {cmp} |")
    print("\n| rows per hash head | test loss (seeds) | vs base | general-text loss | bytes shipped |")
    print("|---|---:|---:|---:|---:|")
    xs, ys = [], []
    for S in TABLES:
        t, g, m = row("table", S)
        p = res["points"][f"table={S}"]
        xs += [math.log2(S)] * len(p["test_loss"])
        ys += p["test_loss"]
        print(f"| {S:,} | {t} | {m - b['test_loss']:+.4f} | {g} | {p['adapter_bytes'] / 1e6:,.0f} MB |")
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    resid = [y - (my + slope * (x - mx)) for x, y in zip(xs, ys)]
    se = math.sqrt(sum(e * e for e in resid) / (n - 2) / sxx) if n > 2 else float("nan")
    res["tests"]["slope_per_doubling"] = {"slope": slope, "se": se, "n": n}
    lo, hi = runs[("table", TABLES[0])], runs[("table", TABLES[-1])]
    common = sorted(set(lo) & set(hi))
    if len(common) >= 2:
        res["tests"][f"table {TABLES[-1]} - table {TABLES[0]}"] = paired_t(
            [hi[s]["test_loss"] for s in common], [lo[s]["test_loss"] for s in common])
    print(f"\nleast-squares slope over {n} runs: {slope:+.4f} nats per doubling of rows (s.e. {se:.4f})")
    for k, v in res["tests"].items():
        if "mean_diff" in v:
            print(f"{k}: {v['mean_diff']:+.4f}, p = {format_p(v['p'])}")
    Path(out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
