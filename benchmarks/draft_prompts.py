"""Write the out-of-domain prompt set of ``engram bench draft``: English prose from CPython's own
documentation (``pydoc_data.topics``, the text ``help('topic')`` shows), which no corpus or index
of this repository contains.

    python benchmarks/draft_prompts.py --out benchmarks/prompts/pydoc-topics.jsonl

Every tenth topic in sorted order (8 of them); from each, the prose paragraphs after its title
(code blocks, indented, are skipped) up to about ``--chars`` characters, cut after a sentence.
One ``{"text": ..., "topic": ..., "python": ...}`` object per line (``--prompts-file`` reads
``.jsonl`` files this way).
"""

from __future__ import annotations

import argparse
import json
import platform
from pydoc_data.topics import topics

from engram.fsutil import atomic_write


def prose(text: str, chars: int) -> str:
    """The first prose paragraphs of a topic (title and indented code skipped), about ``chars`` long."""
    paragraphs = [p for p in text.split("\n\n")[1:] if p.strip() and not p.startswith(" ") and "***" not in p]
    out = ""
    for p in paragraphs:
        out = f"{out}\n\n{p}" if out else p
        if len(out) >= chars:
            break
    if len(out) > chars:
        cut = out.rfind(". ", 0, chars)
        out = out[:cut + 1] if cut > chars // 2 else out[:chars]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--chars", type=int, default=400)
    ap.add_argument("--every", type=int, default=10)
    args = ap.parse_args()
    names = sorted(topics)[1::args.every]
    lines = [json.dumps({"text": prose(topics[n], args.chars), "topic": n, "python": platform.python_version()})
             for n in names]
    data = ("\n".join(lines) + "\n").encode()
    atomic_write(args.out, lambda f: f.write(data))
    print(f"wrote {len(lines)} prompts to {args.out}")


if __name__ == "__main__":
    main()
