"""Causal self-attention with rotary position embeddings (RoPE) and a key/value cache.

Shape legend
    B batch   T new positions   S cached + new positions   D hidden   Hq heads   Dh head dim
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from engram.errors import RequestTooLargeError


def rope_tables(head_dim: int, max_len: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [max_len, Dh/2] for rotating pairs (x[2i], x[2i+1])."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B,Hq,T,Dh], cos/sin [T,Dh/2] (or [B,1,T,Dh/2]: positions per row) -> rotated x."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2)


class KVCache:
    """Preallocated keys/values for one attention layer: [B, Hq, max_len, Dh]."""

    def __init__(self, batch_size: int, num_heads: int, max_len: int, head_dim: int,
                 device=None, dtype=torch.float32):
        self.k = torch.zeros(batch_size, num_heads, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.max_len = max_len

    def update(self, pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = k.shape[2]
        if pos + T > self.max_len:
            raise RequestTooLargeError(
                f"KV cache holds {self.max_len} positions but {pos + T} are needed; "
                f"generate fewer tokens or raise max_seq_len"
            )
        self.k[:, :, pos:pos + T] = k
        self.v[:, :, pos:pos + T] = v
        return self.k[:, :, :pos + T], self.v[:, :, :pos + T]


class CausalSelfAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, hidden_size // num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: Optional[KVCache] = None, pos: int = 0,
                attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [B,T,D]; cos/sin for positions pos..pos+T-1; returns [B,T,D]. ``attn_mask``
        [B,1,T,S] bool (padded rows: which keys each query reads) replaces the causal mask."""
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if attn_mask is not None:
            if cache is not None:
                k, v = cache.update(pos, k, v)  # [B,Hq,S,Dh]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        elif cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            k, v = cache.update(pos, k, v)  # [B,Hq,S,Dh]
            if T == 1:
                y = F.scaled_dot_product_attention(q, k, v)  # one query sees the whole prefix
            else:
                S = k.shape[2]
                # query i sits at absolute position pos + i and may see keys 0..pos + i
                mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=pos)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, D))
