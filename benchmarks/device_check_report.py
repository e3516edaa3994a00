"""The device check's JSON and page, from what benchmarks/device_check.sh left in its directory.

    python benchmarks/device_check_report.py DIR [--budget-s S] [--elapsed-s S]   collect, write both
    python benchmarks/device_check_report.py --render DIR/device-check.json     the page again

Collects DIR/steps.jsonl (one line per step: status, exit code, seconds), each step's output in
DIR/steps/ (the JSON the engram command printed, the CUDA tests' junit XML) into
DIR/device-check.json, then renders DIR/device-check.md from that JSON only, so every number on
the page comes from the JSON. Uses the standard library only: it must run even when the set-up
step failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Optional

JSON_NAME, PAGE_NAME = "device-check.json", "device-check.md"


def _write(path: Path, text: str) -> None:
    """Atomically: a temporary file beside it, then rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _last_json(path: Path) -> Optional[Any]:
    """The last line of ``path`` that parses as a JSON object or array (commands print one)."""
    if not path.is_file():
        return None
    for line in reversed(path.read_text(encoding="utf-8", errors="replace").splitlines()):
        line = line.strip()
        if line.startswith(("{", "[")):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    text = path.read_text(encoding="utf-8", errors="replace").strip()  # an indented summary (train)
    try:
        return json.loads(text[text.index("{"):]) if "{" in text else None
    except json.JSONDecodeError:
        return None


def _junit(path: Path) -> Optional[dict[str, Any]]:
    if not path.is_file():
        return None
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    cases = []
    for case in root.iter("testcase"):
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            if case.find(tag) is not None:
                outcome = tag
        cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": float(case.get("time", 0))})
    return {**counts, "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "cases": cases}


# What each step's page row shows from its result (key, label, format).
_FIGURES = {
    "demo": [("final_val_loss", "val loss", "{:.4f}"), ("tokens_per_s", "tokens/s", "{:,.0f}"),
             ("train_s", "train s", "{:.1f}")],
    "bench_hash": [("cuda_tokens_per_s", "GPU torch path tokens/s", "{:,.0f}"),
                   ("tokens_per_s", "CPU kernel tokens/s", "{:,.0f}"), ("cuda_ratio", "GPU / reference", "{:.1f}x")],
    "bench_offload": [("in_memory_tokens_per_s", "tables on GPU tokens/s", "{:,.0f}"),
                      ("in_memory_prefetch_tokens_per_s", "host tables + side-stream prefetch tokens/s", "{:,.0f}"),
                      ("offload_tokens_per_s", "file tier tokens/s", "{:,.0f}"), ("outputs_equal", "outputs equal", "{}")],
    "retrofit_train": [("final_val_loss", "val loss", "{:.4f}"), ("tokens_per_s", "tokens/s", "{:,.1f}"),
                       ("backbone_unchanged", "base unchanged", "{}")],
    "dist": [("final_val_loss", "val loss", "{:.4f}"), ("tokens_per_s", "tokens/s", "{:,.0f}")],
}


def _kind(step: str) -> str:
    return "demo" if step.startswith("demo_") else "dist" if step.startswith("dist_") else step


def collect(out: Path, budget_s: Optional[float], elapsed_s: Optional[float]) -> dict[str, Any]:
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text(encoding="utf-8").splitlines()
             if line.strip()]
    env = None
    for s in steps:
        res = _last_json(out / "steps" / f"{s['step']}.out")
        if s["step"] == "env":
            env = res
        elif s["step"] == "cuda_tests":
            s["result"] = _junit(out / "steps" / "cuda_tests.xml")
        elif res is not None:
            s["result"] = res
    return {"check": "device", "env": env, "budget_s": budget_s, "elapsed_s": elapsed_s,
            "passed": sum(s["status"] == "passed" for s in steps),
            "failed": sum(s["status"] in ("failed", "timeout") for s in steps),
            "skipped": sum(s["status"] == "skipped" for s in steps),
            "steps": steps,
            "command": "bash benchmarks/device_check.sh DIR (page: python benchmarks/device_check_report.py "
                       "--render DIR/device-check.json)"}


def _figures(step: dict[str, Any]) -> str:
    res = step.get("result")
    if step["step"] == "cuda_tests" and res:
        return f"{res['passed']} passed, {res['failures'] + res['errors']} failed, {res['skipped']} skipped"
    if not isinstance(res, dict):
        return ""
    parts = []
    for key, label, fmt in _FIGURES.get(_kind(step["step"]), []):
        if res.get(key) is not None:
            parts.append(f"{label} {fmt.format(res[key])}")
    return "; ".join(parts)


def render(report: dict[str, Any]) -> str:
    env = report.get("env") or {}
    device = env.get("gpu") or "no GPU"
    lines = [
        "# Device check",
        "",
        f"Device: **{device}** (torch {env.get('torch', '?')}, CUDA build {env.get('cuda_build')}, "
        f"{env.get('cpus', '?')} CPUs, Python {env.get('python', '?')}). "
        f"{report['passed']} steps passed, {report['failed']} failed or timed out, {report['skipped']} skipped; "
        f"{report.get('elapsed_s')} s of a {report.get('budget_s')} s budget.",
        "",
        f"Command: `{report['command']}`.",
        "",
        "| step | status | seconds | figures / note |",
        "|---|---|---:|---|",
    ]
    for s in report["steps"]:
        shown = _figures(s) or (s.get("note") or "").replace("|", "\\|")
        lines.append(f"| {s['step']} | {s['status']} | {s['seconds'] if s['seconds'] else ''} | {shown} |")
    tests = next((s.get("result") for s in report["steps"] if s["step"] == "cuda_tests"), None)
    if tests and tests.get("cases"):
        lines += ["", "CUDA tests:", "", "| test | outcome | seconds |", "|---|---|---:|"]
        lines += [f"| `{c['test']}` | {c['outcome']} | {c['seconds']:.2f} |" for c in tests["cases"]]
    lines += ["", "Each step's log is in `logs/`, its printed result in `steps/`. What the steps are and what "
              "has never run: `docs/gpu.md`.", ""]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dir", nargs="?", help="the device check's output directory")
    p.add_argument("--render", metavar="JSON", help="render the page of an existing device-check.json")
    p.add_argument("--budget-s", type=float)
    p.add_argument("--elapsed-s", type=float)
    args = p.parse_args(argv)
    if args.render:
        src = Path(args.render)
        report = json.loads(src.read_text(encoding="utf-8"))
        out = src.parent
    elif args.dir:
        out = Path(args.dir)
        report = collect(out, args.budget_s, args.elapsed_s)
        _write(out / JSON_NAME, json.dumps(report, indent=1) + "\n")
    else:
        p.error("give the output directory or --render JSON")
    _write(out / PAGE_NAME, render(report))
    print(f"wrote {out / JSON_NAME} and {out / PAGE_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
