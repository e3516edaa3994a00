"""A retrofitted model as the target of speculative decoding (``engram.ngram.speculative``).

The verify loop needs three methods (its ``ScoringTarget`` protocol): ``begin`` an empty
sequence, ``score`` new ids after everything fed so far (one forward over all of them, the
rows are next-token logits), ``truncate`` back to ``n`` positions. Here they run on the base's
KV cache with Engram's state, which :meth:`RetrofitLM.truncate_cache` rolls back exactly.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from engram.retrofit.model import RetrofitCache, RetrofitLM


class RetrofitTarget:
    """``RetrofitLM`` on a cache that can drop its newest positions again."""

    def __init__(self, model: RetrofitLM):
        self.model = model
        self.vocab_size, self.max_seq_len = model.cfg.vocab_size, model.cfg.max_seq_len
        self.device = model.embed.weight.device
        self.cache: Optional[RetrofitCache] = None

    def begin(self, max_len: int, max_draft: int) -> None:
        self.model.eval()
        self.cache = self.model.new_cache(1, max_len, rollback=max_draft)

    @torch.no_grad()
    def score(self, ids: Sequence[int]) -> torch.Tensor:
        x = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        return self.model(x, cache=self.cache).logits[0].float()

    def truncate(self, n: int) -> None:
        self.model.truncate_cache(self.cache, n)
