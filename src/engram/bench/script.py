"""The shared frame of the measuring scripts in ``benchmarks/``: measure (the result written to
``--out`` atomically) or read an earlier ``--from-json``, then render ``--page`` from the result,
so that every number on a page comes from a JSON file the script wrote."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable

from engram.fsutil import atomic_write


def script_parser(doc: str) -> argparse.ArgumentParser:
    """A parser with the flags every measuring script shares; the script adds its own."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--ckpt", help="the model or adapter (required unless --from-json)")
    p.add_argument("--from-json", help="do not measure: write --page from this earlier --out")
    p.add_argument("--page-command", help="the command shown on the page (default: this one)")
    p.add_argument("--out", help="the result as JSON")
    p.add_argument("--page", help="the results page (markdown) rendered from the result")
    return p


def run_script(p: argparse.ArgumentParser, measure: Callable[[argparse.Namespace], dict[str, Any]],
               page: Callable[[dict[str, Any], str], str], script: str) -> int:
    """Parse the flags, measure or load, write ``--out`` and ``--page``; returns the exit code."""
    a = p.parse_args()
    if a.from_json:
        r = json.loads(open(a.from_json, encoding="utf-8").read())
    elif not (a.ckpt and a.out):
        p.error("give --ckpt and --out (or --from-json to render a page)")
    else:
        r = measure(a)
        data = (json.dumps(r, indent=1) + "\n").encode()
        atomic_write(a.out, lambda f: f.write(data))
    if a.page:
        text = page(r, a.page_command or f"python {script} " + " ".join(sys.argv[1:])).encode()
        atomic_write(a.page, lambda f: f.write(text))
    return 0
