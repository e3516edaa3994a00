"""The historian: an Engram memory as one routed expert of a DeepSeekMoE.

Shape legend
    N  tokens routed to this expert     H  hash heads of the layer     Dh head_dim
    E  engram_hidden_size = H * Dh      D  backbone hidden size

With ``EngramConfig.placement = "expert"`` a layer of ``layer_ids`` gets no Engram layer before
attention; instead the last routed-expert slot of its DeepSeekMoE is this module. For a token the
router sends here, the output is the Engram read of that token:

    e   = concat_h table[offset_h + hash_h]        [N,E]   (the token's suffix 2..max_n-grams)
    out = W_V e + b                                [N,D]

and the MoE scales it by the token's router weight, as for any expert. The table, its hashing
and its state-dict name (``multi_head_embedding.embedding.weight``) are the Engram layer's, so
the trainer treats the rows as table rows (sparse Adam, ``table_lr_mult``) and checkpoints,
table files and table tiers handle them as any Engram table.

What is left out of the Engram layer, and why:
- the context gate (key/query dot product): the router already is a context-aware, per-token
  gate on this output (its sigmoid affinity, normalised over the chosen experts), and it also
  decides whether the memory is read at all;
- the short causal conv over time: an expert sees only the tokens routed to it, so the values
  of the neighbouring positions the conv mixes in are not there (they would depend on other
  tokens' routing), and decoding would need conv state per expert. Without it the expert is a
  pure function of the token's hash ids, like every other expert is of its hidden state.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from engram.config import EngramConfig
from engram.errors import EngramError
from engram.model.layer import MultiHeadEmbedding
from engram.model.table import EngramTable, RowOverlay


class HistorianExpert(nn.Module):
    """Hash ids of the routed tokens -> their memory read projected to the hidden size."""

    def __init__(self, cfg: EngramConfig, layer_id: int, hidden_size: int, head_sizes: list[int]):
        super().__init__()
        if len(head_sizes) != cfg.num_heads_total:
            raise EngramError(f"HistorianExpert(layer_id={layer_id}) got {len(head_sizes)} head sizes but the "
                              f"config has {cfg.num_heads_total} heads ((max_ngram_size-1) * n_head_per_ngram)")
        self.cfg, self.layer_id = cfg, layer_id
        self.multi_head_embedding = MultiHeadEmbedding(head_sizes, cfg.head_dim, group_size=cfg.n_head_per_ngram)
        self.value_proj = nn.Linear(cfg.engram_hidden_size, hidden_size)

    @property
    def table(self) -> EngramTable:
        return self.multi_head_embedding.embedding

    def read(self, hash_ids: torch.Tensor, overlay: Optional[RowOverlay] = None) -> torch.Tensor:
        """hash_ids [..., H] -> e [..., E] (the concatenated rows, before the projection)."""
        return self.multi_head_embedding(hash_ids, overlay).flatten(start_dim=-2)

    def forward(self, hash_ids: torch.Tensor, overlay: Optional[RowOverlay] = None) -> torch.Tensor:
        """hash_ids [N,H] -> [N,D]."""
        return self.value_proj(self.read(hash_ids, overlay))
