"""Input-side N-gram embedding baselines that share Engram's code path but not its design.

Two published alternatives to gated, mid-network memory, both added at the *input* embedding:

- ``bigram``: modded-nanogpt style. A hash of (previous token, current token) picks a row of one
  table; the row is added to the token embedding (no gate, no projection, no conv). At small
  scale this was reported to beat the full Engram design, so it is the baseline to beat.
- ``overencoding``: Over-Tokenized Transformer style ("OverEncoding", Huang et al., 2025). One
  table per order n = 2..max_ngram_size is hashed by the n-gram ending at the current token,
  and the token embedding and the n-gram rows are *averaged* into the input embedding.

With ``every_layer`` (bigram only) the row is not added to the input embedding but to the
residual stream before every block, block i scaling it by its own learned ``layer_scales[i]``
(init 1): ``h <- h + layer_scales[i] * row`` (the modded-nanogpt form).

Rows are D wide (the backbone hidden size), so a table of ``rows_per_head`` rows has
``rows_per_head * D`` parameters; they are trained like Engram tables (Adam at ``table_lr_mult``,
no weight decay) because ``EngramLM.table_parameters()`` includes them.

Hashing is a multiply-xor over the last n token ids modulo a prime table size (odd per-order
multipliers from a seeded generator); position t < n-1 uses ``pad_id`` for missing tokens, as
Engram does. Decoding with a cache carries the last ``max_ngram_size - 1`` ids.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from engram.config import InputNgramConfig
from engram.hashing.hasher import head_offsets
from engram.hashing.primes import next_prime


class InputNgramEmbedding(nn.Module):
    """[B,T] token ids (+ history) -> [B,T,D] embedding to combine with the token embedding."""

    def __init__(self, cfg: InputNgramConfig, hidden_size: int, vocab_size: int, num_layers: int = 1):
        super().__init__()
        self.cfg = cfg
        # every_layer: one scale per block for the row added before it (not a table parameter)
        self.layer_scales = nn.Parameter(torch.ones(num_layers)) if cfg.every_layer else None
        self.sizes = [next_prime(cfg.rows_per_head)] * len(cfg.orders)
        rng = np.random.default_rng([cfg.seed, 0x6E6772])
        # Odd multipliers below 2^20 keep every product of a token id (< 2^20) in int64.
        mults = rng.integers(1, 1 << 19, size=(len(cfg.orders), cfg.max_ngram_size)) * 2 + 1
        self.register_buffer("mults", torch.as_tensor(mults, dtype=torch.long), persistent=False)
        self.register_buffer("offsets", torch.tensor(head_offsets(self.sizes), dtype=torch.long),
                             persistent=False)
        self.embedding = nn.Embedding(sum(self.sizes), hidden_size)
        self.vocab_size = vocab_size

    @property
    def history(self) -> int:
        return self.cfg.max_ngram_size - 1

    def reset_parameters(self) -> None:
        if self.cfg.kind == "bigram" and self.cfg.zero_init:
            nn.init.zeros_(self.embedding.weight)
        else:
            nn.init.normal_(self.embedding.weight, std=self.cfg.init_std)

    def row_ids(self, input_ids: torch.Tensor, hist: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[B,T] (+ [B,history] previous ids) -> global table rows [B,T,orders]."""
        B, T = input_ids.shape
        k = self.history
        if hist is None:
            hist = input_ids.new_full((B, k), self.cfg.pad_id)
        seq = torch.cat([hist, input_ids], dim=1)  # [B, k + T]
        out = []
        for oi, n in enumerate(self.cfg.orders):
            h = torch.zeros_like(input_ids)
            for j in range(n):  # token t - j sits at seq index k + t - j
                h = h ^ (seq[:, k - j: k - j + T] * self.mults[oi, j])
            out.append(h % self.sizes[oi] + self.offsets[oi])
        return torch.stack(out, dim=-1)

    def forward(self, input_ids: torch.Tensor, tok_emb: torch.Tensor, hist: Optional[torch.Tensor] = None
                ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Returns (new input embedding [B,T,D], new history [B,history], and with
        ``every_layer`` the row sum [B,T,D] the blocks add (the input embedding is then
        ``tok_emb`` itself; see :meth:`layer_rows`), else None)."""
        rows = self.embedding(self.row_ids(input_ids, hist))  # [B,T,orders,D]
        every = rows.sum(dim=2) if self.cfg.every_layer else None
        if every is not None:
            x = tok_emb
        elif self.cfg.kind == "bigram":
            x = tok_emb + rows.sum(dim=2)
        else:  # overencoding: mean of the token embedding and every order's row
            x = (tok_emb + rows.sum(dim=2)) / (1 + rows.shape[2])
        prev = hist if hist is not None else input_ids.new_full((input_ids.shape[0], self.history),
                                                                 self.cfg.pad_id)
        new_hist = torch.cat([prev, input_ids], dim=1)[:, -self.history:]
        return x, new_hist, every

    def layer_rows(self, rows: torch.Tensor, layer_index: int) -> torch.Tensor:
        """every_layer: what block ``layer_index`` adds to each residual branch, [B,T,1,D], from
        the row sum [B,T,D] that ``forward`` returned."""
        assert self.layer_scales is not None, "layer_rows is for every_layer"
        return (self.layer_scales[layer_index] * rows).unsqueeze(2)
