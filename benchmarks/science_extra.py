"""Extra paired comparisons and per-run details for the science report (reads sweep summaries).

    python benchmarks/science_extra.py benchmarks/results/science

Prints markdown: every pair of configs named below that both have finished seeds, with the
paired t-test over common seeds, plus gate statistics and fact-benchmark details per config.
"""

from __future__ import annotations

import json
import sys
from itertools import combinations
from pathlib import Path

from engram.stats import format_p, mean_std, paired_t


def _loss(row: dict) -> list[float]:
    """Test loss per seed (summaries before the dev/test split have the whole validation loss)."""
    return row["test_loss"] if "test_loss" in row else row["val_loss"]


def pairs(summary: dict, names: list[str]) -> list[str]:
    rows = {r["config"]: r for r in summary["rows"]}
    out = ["| A | B | seeds | mean(A − B) loss (test; val before 2026-12-02) | p | mean(A − B) fact acc | p |", "|---|---|---|---|---|---|---|"]
    for a, b in combinations([n for n in names if n in rows], 2):
        ra, rb = rows[a], rows[b]
        common = sorted(set(ra["seeds"]) & set(rb["seeds"]))
        if len(common) < 2:
            continue
        la = dict(zip(ra["seeds"], _loss(ra)))
        lb = dict(zip(rb["seeds"], _loss(rb)))
        t = paired_t([la[s] for s in common], [lb[s] for s in common])
        fa = dict(zip(ra["seeds"], ra["fact_acc"]))
        fb = dict(zip(rb["seeds"], rb["fact_acc"]))
        if all(s in fa and s in fb for s in common):
            tf = paired_t([fa[s] for s in common], [fb[s] for s in common])
            facts = f"{tf['mean_diff']:+.4f} | {format_p(tf['p'])}"
        else:
            facts = "— | —"
        out.append(f"| {a} | {b} | {len(common)} | {t['mean_diff']:+.4f} | {format_p(t['p'])} | {facts} |")
    return out


def details(summary: dict) -> list[str]:
    out = ["| config | gate mean | gates < 0.05 | gates > 0.95 | est. stored bits | bits / param | tokens/s |",
           "|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        if not _loss(r):
            continue
        g = r["gates"]
        gm = f"{mean_std([x['mean'] for x in g])[0]:.3f}" if g else "—"
        lo = f"{mean_std([x['saturated_low'] for x in g])[0]:.2%}" if g else "—"
        hi = f"{mean_std([x['saturated_high'] for x in g])[0]:.2%}" if g else "—"
        bits = mean_std(r["stored_bits"])[0] if r["stored_bits"] else float("nan")
        out.append(f"| {r['config']} | {gm} | {lo} | {hi} | {bits:,.0f} | {r['bits_per_param']:.2e} | "
                   f"{mean_std(r['tokens_per_s'])[0]:,.0f} |")
    return out


def main(root: str) -> None:
    base = Path(root)
    for name, cmp in (("rho", ["rho=1.00", "rho=0.875", "rho=0.75", "rho=0.625", "rho=0.5"]),
                      ("baselines", ["engram", "bigram-hash", "bigram-hash-lr1", "overencoding", "moe", "engram-no-gate", "engram-no-conv", "engram-lr1"]),
                      ("table-size", ["moe", "slots=2^9", "slots=2^11", "slots=2^13", "slots=2^15"]),
                      ("bigram", ["moe", "bigram-5v-lr1", "bigram-5v-lr5", "bigram-5v-lr25", "engram-iso-lr5",
                                  "engram-iso-lr25"])):
        for sub in ("", "knowledge"):
            f = base / sub / f"{name}_summary.json"
            if not f.is_file():
                continue
            s = json.loads(f.read_text())
            print(f"\n### {name}{' (countries-only data)' if sub else ''}: pairwise\n")
            print("\n".join(pairs(s, cmp)))
            print(f"\n### {name}{' (countries-only data)' if sub else ''}: gates and knowledge\n")
            print("\n".join(details(s)))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/science")
