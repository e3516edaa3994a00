"""Drafts from memory: the next few tokens as they continued the longest matching context before.

Speculative decoding (``engram.ngram.speculative``) needs a cheap guess of the next K tokens;
the model then checks them all in one forward pass. The guess comes from two memories:

- the N-gram index of a corpus (``NgramIndex``): the longest suffix of the context that occurs
  in the corpus (the infinity-gram match, cut at the last eos like every index query), and its
  most frequent continuation there;
- the text of this generation so far (prompt + output, "prompt lookup"): the longest suffix of
  the context that occurred earlier in it, and the token that followed its latest occurrence.

Each draft token is chosen separately, from the context extended by the tokens drafted before
it. Rules (deterministic, so that a draft is a function of the context alone):

- the longer match wins; at equal length the generation's own text wins (it is about this very
  text); within the index, ties between equally frequent continuations go to the smaller id;
  within the text, the latest occurrence wins;
- depth: drafting stops after ``max_len`` tokens, or as soon as the longest match is shorter
  than ``min_match`` tokens, or the index's continuation has a share below ``min_prob`` (a weak
  match is not worth a verified position);
- matches are looked up over the last ``context`` tokens (a longer match continues the same way
  almost always, and the lookup stays O(context log n)).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from engram.config import DraftConfig
from engram.ngram.index import NgramIndex


def text_match(seq: np.ndarray, max_len: int) -> tuple[int, int]:
    """(length, next token) of the longest suffix of ``seq`` (up to ``max_len`` tokens) that
    also ends earlier in ``seq`` with a token after it; the latest such occurrence. (0, -1)
    when even the last token never occurred before."""
    n = int(seq.size)
    if n < 2:
        return 0, -1
    ends = np.flatnonzero(seq[:n - 1] == seq[n - 1])  # earlier positions ending the 1-token suffix
    if ends.size == 0:
        return 0, -1
    length = 1
    while length < max_len and length < n:  # extend the match backwards while any occurrence keeps up
        ok = ends[ends >= length]
        ok = ok[seq[ok - length] == seq[n - 1 - length]]
        if ok.size == 0:
            break
        ends, length = ok, length + 1
    return length, int(seq[int(ends.max()) + 1])


class NgramDrafter:
    """Proposes up to ``cfg.max_len`` tokens continuing a context; ``index`` None: text only."""

    def __init__(self, index: Optional[NgramIndex], cfg: DraftConfig):
        self.index, self.cfg = index, cfg
        self.use_index = index is not None and cfg.source in ("both", "index")
        self.use_text = cfg.source in ("both", "text")
        # index lookups by context: a generation meets the same contexts again (its drafts are
        # re-derived after every rejection, and weak models repeat themselves); dropped when the
        # index changes (add / remove / compact bump its generation)
        self._memo: dict[tuple[int, ...], tuple[int, int]] = {}
        self._memo_generation: Optional[int] = None

    MEMO_SIZE = 1 << 16

    def index_match(self, ctx: np.ndarray, bound: Optional[int] = None) -> tuple[int, int]:
        """(length, most frequent continuation) of the longest suffix of ``ctx`` (cut at its last
        eos) seen at least ``min_count`` times in the index; (0, -1) when there is none, (length,
        -1) when that continuation's share is below ``min_prob``. Occurrence counts only fall as the
        suffix grows, so the length is a binary search of O(log context) counts. ``bound``: a
        known upper bound on the length, tried first (``propose`` passes the last length + 1:
        a longer match now would have been a longer match one token ago)."""
        ctx = ctx[-self.cfg.context:]
        eos = np.flatnonzero(ctx == self.index.eos_id)
        if eos.size:
            ctx = ctx[eos[-1]:]
        generation = int(self.index.manifest["generation"])
        if generation != self._memo_generation or len(self._memo) >= self.MEMO_SIZE:
            self._memo, self._memo_generation = {}, generation
        key = tuple(ctx.tolist())
        hit = self._memo.get(key)
        if hit is None:
            hit = self._memo[key] = self._index_lookup(ctx, bound)
        return hit

    def _index_lookup(self, ctx: np.ndarray, bound: Optional[int]) -> tuple[int, int]:
        lo, hi = 0, int(ctx.size) if bound is None else min(bound, int(ctx.size))
        if hi and self.index.count(ctx[ctx.size - hi:]) >= self.cfg.min_count:
            lo = hi
        else:
            hi -= 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.index.count(ctx[ctx.size - mid:]) >= self.cfg.min_count:
                lo = mid
            else:
                hi = mid - 1
        if lo == 0:
            return 0, -1
        counts = self.index.next_counts(ctx[ctx.size - lo:])
        total = int(counts.sum())
        if total == 0:  # seen, but never followed by a token (the document rule)
            return lo, -1
        best = int(counts.argmax())  # argmax: the first (smallest) id among ties
        if counts[best] < self.cfg.min_prob * total:
            return lo, -1  # the length still bounds the next lookup
        return lo, best

    def propose(self, seq: Sequence[int], k: Optional[int] = None) -> list[int]:
        """Up to ``k`` (default ``cfg.max_len``) draft tokens continuing ``seq``."""
        k = self.cfg.max_len if k is None else min(k, self.cfg.max_len)
        ctx = np.asarray(seq, dtype=np.int64)
        draft: list[int] = []
        bound = None  # upper bound on the index match length (see index_match)
        while len(draft) < k:
            best_len, best_tok = 0, -1
            if self.use_text:
                best_len, best_tok = text_match(ctx, self.cfg.context)
            if self.use_index:
                n, tok = self.index_match(ctx, bound)
                bound = n + 1
                if tok >= 0 and n > best_len:  # equal length: the generation's own text keeps priority
                    best_len, best_tok = n, tok
            if best_len < self.cfg.min_match:
                break
            draft.append(best_tok)
            ctx = np.append(ctx, best_tok)
        return draft
