"""Parameter and FLOP accounting: what a model holds, and what one token touches.

``account(cfg)`` builds the model on PyTorch's ``meta`` device (no memory, no init cost) and
classifies every parameter by name, so the totals always equal ``EngramLM.param_counts()``:

- ``embedding``   token embedding (tied with the LM head unless ``tie_embeddings=False``)
- ``routed``      routed MoE experts (the sparse FFN budget)
- ``tables``      Engram tables + input N-gram baseline tables (the sparse memory budget)
- ``dense``       everything else: attention, norms, shared experts, routers, dense FFNs,
                  Engram projections / gate / conv, hyper-connection weights

Activated parameters per token (what one token's forward pass reads):
    dense + top-k routed experts per MoE layer (k * one expert) + the table rows it hashes to
    (one row per hash head per Engram layer; one row per order for input N-grams)
    + the LM head (V x D; with tied embeddings this is the embedding matrix, counted once).
The token's own embedding row is part of the head's V x D and is not counted again.
A historian expert (``engram.placement = "expert"``) is one of the routed slots: its table is
counted under ``tables``, its projection under ``routed``. Activated counts are then an upper
bound: k SwiGLU experts per MoE layer (the historian is smaller than one) plus the historian's
rows for every token (read only when it is chosen); ``historian_routing`` in
``engram.science.routing`` gives the expected count from the measured routing.

FLOPs per token (forward, multiply-add = 2): 2 x (activated matmul weights, i.e. activated minus
table rows and minus norm / bias / gain vectors) + attention scores and values,
4 x D x L_ctx per layer with L_ctx = the mean causal context ``seq_len / 2``. Lookups and
element-wise work are not counted. Training is ~3x these.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from engram.config import ModelConfig
from engram.errors import EngramError
from engram.model.lm import EngramLM
from engram.model.table import table_holders


class AccountingError(EngramError):
    """A budget does not hold; the message names the numbers and the fix."""


@dataclass(frozen=True)
class Account:
    total: int
    embedding: int
    routed: int
    tables: int
    dense: int
    activated_per_token: int
    flops_per_token: int
    table_rows_per_token: int
    routed_per_expert: int
    n_moe_layers: int

    @property
    def backbone(self) -> int:
        """Everything but the tables (the MoE model a table model is compared against)."""
        return self.total - self.tables

    @property
    def sparse(self) -> int:
        """The sparse budget of the allocation law: routed experts + tables."""
        return self.routed + self.tables

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total, "activated_per_token": self.activated_per_token,
                "table_params": self.tables, "backbone_params": self.backbone,
                "routed_params": self.routed, "sparse_params": self.sparse,
                "embedding_params": self.embedding, "dense_params": self.dense,
                "flops_per_token": self.flops_per_token}


def _build_meta(cfg: ModelConfig):
    with torch.device("meta"):
        return EngramLM(cfg)


def account_model(cfg: ModelConfig, seq_len: Optional[int] = None) -> Account:
    """The full breakdown (see the module docstring for the definitions)."""
    model = _build_meta(cfg)
    seq_len = seq_len or cfg.max_seq_len
    table_ids = {id(p) for p in model.table_parameters()}
    emb = model.embed.weight
    embedding = routed = tables = dense = 0
    dense_matmul = 0  # 2-D weights outside experts/tables/embedding: each costs 2 FLOPs per token
    per_expert = 0
    moe_layers = 0
    for name, p in model.named_parameters():
        n = p.numel()
        if p is emb:
            embedding += n
        elif id(p) in table_ids:
            tables += n
        elif ".ffn.experts." in name:
            routed += n
        else:
            dense += n
            if p.dim() >= 2 and not name.endswith(".A"):
                dense_matmul += n  # conv kernels [C,1,k] are k MACs per channel: counted too
    if not cfg.tie_embeddings:
        embedding += model.lm_head.weight.numel()
    for b in model.layers:
        experts = getattr(b.ffn, "experts", None)
        if experts is not None:
            moe_layers += 1
            per_expert = sum(p.numel() for p in experts[0].parameters())  # a SwiGLU (a historian is last)
    rows = 0
    for e in table_holders(model):  # Engram layers and historian experts
        rows += e.cfg.num_heads_total * e.cfg.head_dim
    if model.input_ngram is not None:
        rows += len(model.input_ngram.cfg.orders) * cfg.hidden_size
    head = cfg.vocab_size * cfg.hidden_size
    active_routed = moe_layers * cfg.num_experts_per_tok * per_expert
    activated = dense + active_routed + rows + head
    attn_flops = cfg.num_layers * 4 * cfg.hidden_size * (seq_len // 2)
    flops = 2 * (dense_matmul + active_routed + head) + attn_flops
    return Account(total=embedding + routed + tables + dense, embedding=embedding, routed=routed,
                   tables=tables, dense=dense, activated_per_token=activated,
                   flops_per_token=flops, table_rows_per_token=rows,
                   routed_per_expert=per_expert, n_moe_layers=moe_layers)


def account(cfg: ModelConfig, seq_len: Optional[int] = None) -> dict[str, Any]:
    """dict(total, activated_per_token, table_params, backbone_params, flops_per_token, ...)."""
    return account_model(cfg, seq_len).to_dict()


def check_budget(name: str, value: int, target: int, rel_tol: float) -> None:
    """Raise AccountingError when ``value`` is not within ``rel_tol`` of ``target``."""
    if target <= 0 or abs(value - target) > rel_tol * target:
        raise AccountingError(
            f"{name}={value:,} is not within {rel_tol:.2%} of the budget {target:,} "
            f"(off by {value - target:+,}); adjust the table size or expert count of this config")


def format_account(acc: dict[str, Any]) -> str:
    return (f"total {acc['total'] / 1e6:.3f}M | activated/token {acc['activated_per_token'] / 1e6:.3f}M | "
            f"sparse {acc['sparse_params'] / 1e6:.3f}M (routed {acc['routed_params'] / 1e6:.3f}M + "
            f"tables {acc['table_params'] / 1e6:.3f}M) | {acc['flops_per_token'] / 1e6:.2f} MFLOP/token")
