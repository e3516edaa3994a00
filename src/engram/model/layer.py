"""The Engram layer: hashed N-gram memory fused into the residual stream by a context-aware gate.

Shape legend
    B  batch            T  sequence positions (new positions when decoding with a cache)
    M  hc_mult branches (hyper-connections; 1 = plain residual stream)
    D  backbone hidden size
    H  hash heads per layer = (max_ngram_size - 1) * n_head_per_ngram
    Dh head_dim = n_embed_per_ngram / n_head_per_ngram
    E  engram_hidden_size = H * Dh (the concatenated memory vector e_t)

Forward, per branch m (paper Sec. 2, DeepSeek's reference demo):
    e      = concat_h table[offset_h + hash_h]                      [B,T,E]
    k_m    = RMSNorm_m(W_K^m e + b)       q_m = RMSNorm'_m(h_m)       [B,T,D]
    g_m    = <k_m, q_m> / sqrt(D);  g_m = sign(g_m) sqrt(|g_m|);  alpha_m = sigmoid(g_m)
    v_m    = alpha_m * (W_V e + b)                                    (W_V shared by branches)
    out_m  = v_m + SiLU(CausalDepthwiseConv(RMSNorm''_m(v)))          kernel 4, dilation max_n
The caller adds ``out`` to the residual stream. Parameter names match the reference so its
weights load directly. ``output_gates`` / ``output_gate_inputs`` return alpha [B,T,M] and the
gate's inputs (h [B,T,M,D], e [B,T,E]) with the output; nothing is kept on the module.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import torch
import torch.nn as nn

from engram.config import EngramConfig
from engram.errors import EngramError
from engram.hashing.hasher import head_offsets
from engram.model.ops import causal_conv_silu, rms_norm
from engram.model.table import (
    EngramTable,
    KeyedOverlay,
    MemoryTable,
    RowOverlay,
    apply_keyed,
    merge_overlays,
    ngram_keys,
    split_overlay,
)


class GateInputs(NamedTuple):
    """What the gate of one layer reads: the residual stream and the retrieved memory."""

    hidden_states: torch.Tensor  # h [B,T,M,D]
    memory: torch.Tensor  # e [B,T,E]


class EngramLayerOutput(NamedTuple):
    """``output`` is added to the residual stream; the rest is None unless asked for."""

    output: torch.Tensor  # [B,T,M,D]
    conv_state: Optional[torch.Tensor] = None  # short conv state for decoding [B, receptive, M*D]
    gates: Optional[torch.Tensor] = None  # alpha [B,T,M] (output_gates)
    gate_inputs: Optional[GateInputs] = None  # (output_gate_inputs)


def _branches(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """[B,T,M,D] -> M tensors [B,T,D]. Not ``x[:, :, m]``: the backward of each such slice
    writes its gradient into a zero tensor of x's full shape, one zero fill and copy per branch."""
    return (x.squeeze(2),) if x.shape[2] == 1 else x.unbind(2)


class MultiHeadEmbedding(nn.Module):
    """All hash heads of one layer in one flat table; head h owns rows [offset_h, offset_h + N_h).

    ``embedding`` is the table (an :class:`~engram.model.table.EngramTable`; in memory unless
    ``table`` names another backend); the name keeps the state-dict keys of every checkpoint.
    ``group_size`` heads hash each N-gram order (the heads whose ids make one N-gram's key,
    :func:`~engram.model.table.ngram_keys`). ``installed``: keyed patches applied to this loaded
    model, ``[(patch_id, KeyedOverlay)]`` in order (``engram.patches.apply.apply_to_model``);
    they are read at every call, under the call's own ``patches=``.
    """

    def __init__(self, head_sizes: list[int], head_dim: int, table: Optional[EngramTable] = None,
                 group_size: Optional[int] = None):
        super().__init__()
        self.head_sizes = list(head_sizes)
        self.group_size = int(group_size or len(head_sizes))
        self.register_buffer("offsets", torch.tensor(head_offsets(head_sizes), dtype=torch.long))
        self.embedding = table if table is not None else MemoryTable(sum(head_sizes), head_dim)
        self.installed: list[tuple[str, KeyedOverlay]] = []
        self._installed_merged: Optional[KeyedOverlay] = None

    @property
    def num_rows(self) -> int:
        return self.embedding.num_embeddings

    def rows(self, hash_ids: torch.Tensor) -> torch.Tensor:
        """Global table rows for per-head hash ids: [..., H] (int32 or int64) -> [..., H] int64
        (the offsets are int64, so the sum is too: callers index tiers and masks with it)."""
        return hash_ids + self.offsets

    def keys(self, hash_ids: torch.Tensor) -> torch.Tensor:
        """Per-head N-gram keys of hash ids [..., H] -> [..., H] int64 (what keyed overlays match)."""
        return ngram_keys(hash_ids, self.group_size)

    def set_installed(self, installed: list[tuple[str, KeyedOverlay]]) -> None:
        """Replace the installed keyed patches (merged once here, not at every call)."""
        self.installed = list(installed)
        self._installed_merged = merge_overlays([ov for _, ov in self.installed]) if self.installed else None

    def forward(self, hash_ids: torch.Tensor, overlay: Any = None
                ) -> torch.Tensor:  # [B,T,H] -> [B,T,H,Dh]
        rows_ov, keyed = split_overlay(overlay)
        out = self.embedding(self.rows(hash_ids), rows_ov)
        stack = [ov for ov in (self._installed_merged, keyed) if ov is not None and ov.keys.numel()]
        if stack:
            out = apply_keyed(self.keys(hash_ids), out, stack[0] if len(stack) == 1 else merge_overlays(stack))
        return out


class ShortConv(nn.Module):
    """Per-branch RMSNorm, then a causal depthwise conv over time across all M*D channels, then SiLU.

    ``state`` (for decoding) holds the last ``(kernel_size - 1) * dilation`` normed inputs.
    """

    def __init__(self, hidden_size: int, hc_mult: int, kernel_size: int, dilation: int,
                 norm_eps: float, zero_init: bool):
        super().__init__()
        self.hc_mult, self.hidden_size = hc_mult, hidden_size
        self.kernel_size, self.dilation = kernel_size, dilation
        channels = hidden_size * hc_mult
        # Holds the weight under the reference's name; forward computes the conv in ops.causal_conv_silu.
        self.conv = nn.Conv1d(channels, channels, kernel_size, groups=channels, bias=False,
                              dilation=dilation, padding=0)
        self.norms = nn.ModuleList(nn.RMSNorm(hidden_size, eps=norm_eps) for _ in range(hc_mult))
        self.zero_init = zero_init
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.zero_init:
            nn.init.zeros_(self.conv.weight)

    @property
    def receptive(self) -> int:
        return (self.kernel_size - 1) * self.dilation

    def forward(self, x: torch.Tensor, state: Optional[torch.Tensor] = None, keep: int = 0,
                mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B,T,M,D] -> (y [B,T,M,D], new state [B, <= receptive + keep, M*D]).

        ``keep`` > 0 keeps that many extra rows of history in the state, so that a decoder can
        drop up to ``keep`` of the newest positions again (speculative decoding): the state of a
        prefix is the state with its last rows cut off. Only the last ``receptive`` rows of a
        state are ever read, so the output does not depend on ``keep``.

        ``mask`` [B,T] bool (False: padding): padded positions enter the conv (and the state) as
        zeros, the value the positions before a sequence's start have, so a left-padded row gets
        the outputs of its unpadded self (the zero terms add exact zeros).
        """
        B, T, M, D = x.shape
        R = self.receptive
        normed = [rms_norm(xm, n.weight, n.eps) for xm, n in zip(_branches(x), self.norms)]
        normed = normed[0] if M == 1 else torch.cat(normed, dim=-1)  # [B,T,M*D]
        if mask is not None:
            normed = normed.masked_fill(~mask.unsqueeze(-1), 0.0)
        if state is None:  # causal zero padding: the conv skips the zero rows
            history = None
            if T >= R + keep:
                new_state = normed[:, T - (R + keep):]
            else:
                new_state = torch.cat([normed.new_zeros(B, R, M * D), normed], dim=1)[:, max(0, T - keep):]
        else:
            history = state[:, state.shape[1] - R:]  # exactly receptive rows of history
            seq = torch.cat([state, normed], dim=1)  # [B, len(state) + T, M*D]
            new_state = seq[:, max(0, seq.shape[1] - (R + keep)):]
        y = causal_conv_silu(normed, self.conv.weight, self.dilation, history)  # [B,T,M*D]
        return y.reshape(B, T, M, D), new_state


class EngramLayer(nn.Module):
    """One Engram module. ``head_sizes`` are the prime table sizes of this layer's hash heads."""

    def __init__(self, cfg: EngramConfig, layer_id: int, hidden_size: int, hc_mult: int,
                 head_sizes: list[int]):
        super().__init__()
        if len(head_sizes) != cfg.num_heads_total:
            raise EngramError(
                f"EngramLayer(layer_id={layer_id}) got {len(head_sizes)} head sizes but the config "
                f"has {cfg.num_heads_total} heads ((max_ngram_size-1) * n_head_per_ngram)"
            )
        self.cfg, self.layer_id = cfg, layer_id
        self.hidden_size, self.hc_mult = hidden_size, hc_mult
        self.multi_head_embedding = MultiHeadEmbedding(head_sizes, cfg.head_dim, group_size=cfg.n_head_per_ngram)
        E = cfg.engram_hidden_size
        self.value_proj = nn.Linear(E, hidden_size)
        self.key_projs = nn.ModuleList(nn.Linear(E, hidden_size) for _ in range(hc_mult))
        # eps=None: torch's float32 machine epsilon, as in the reference.
        self.norm1 = nn.ModuleList(nn.RMSNorm(hidden_size) for _ in range(hc_mult))  # keys
        self.norm2 = nn.ModuleList(nn.RMSNorm(hidden_size) for _ in range(hc_mult))  # queries
        self.short_conv = (
            ShortConv(hidden_size, hc_mult, cfg.kernel_size, cfg.max_ngram_size,
                      cfg.conv_norm_eps, cfg.conv_zero_init)
            if cfg.use_short_conv else None
        )

    @property
    def table(self) -> EngramTable:
        """This layer's table rows, whatever holds them (``engram.model.table``)."""
        return self.multi_head_embedding.embedding

    def gates(self, hidden_states: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """hidden_states [B,T,M,D], e [B,T,E] -> alpha [B,T,M]."""
        B, T, M, _ = hidden_states.shape
        if not self.cfg.use_gate:
            return hidden_states.new_ones(B, T, M)
        out = []
        for m, h in enumerate(_branches(hidden_states)):
            k = rms_norm(self.key_projs[m](e), self.norm1[m].weight, self.norm1[m].eps)
            q = rms_norm(h, self.norm2[m].weight, self.norm2[m].eps)
            g = (k * q).sum(dim=-1) / math.sqrt(self.hidden_size)
            g = g.abs().clamp_min(1e-6).sqrt() * g.sign()  # signed sqrt keeps gradients tame
            out.append(g.sigmoid())
        return torch.stack(out, dim=-1)

    def forward(self, hidden_states: torch.Tensor, hash_ids: torch.Tensor,
                conv_state: Optional[torch.Tensor] = None, *, output_gates: bool = False,
                output_gate_inputs: bool = False, zero_output: bool = False,
                conv_keep: int = 0, attention_mask: Optional[torch.Tensor] = None,
                table_overlay: Optional[RowOverlay] = None) -> EngramLayerOutput:
        """hidden_states [B,T,M,D], hash_ids [B,T,H] -> out [B,T,M,D], new conv state (None
        without the short conv), and with ``output_gates`` alpha [B,T,M], with
        ``output_gate_inputs`` (h, e). They stay in the autograd graph when grad is enabled.
        ``zero_output`` replaces the output by zeros (the ablation of ``engram analyze ablate``);
        gates and conv state are still computed, so a cached generation stays consistent.
        ``conv_keep``: extra rows of conv history to keep for rolling back (``ShortConv``).
        ``attention_mask`` [B,T] bool (False: padding; None: all real) keeps padded positions out
        of the short conv; the hash ids must come from the same mask (``NgramHasher.hash``).
        ``table_overlay``: rows read from the overlay instead of the table (``RowOverlay``)."""
        if hidden_states.dim() != 4 or hidden_states.shape[2] != self.hc_mult:
            raise EngramError(
                f"EngramLayer expects hidden_states [B,T,{self.hc_mult},{self.hidden_size}], "
                f"got {tuple(hidden_states.shape)}"
            )
        e = self.multi_head_embedding(hash_ids, table_overlay).flatten(start_dim=-2)  # [B,T,E]
        alpha = self.gates(hidden_states, e)  # [B,T,M]
        value = alpha.unsqueeze(-1) * self.value_proj(e).unsqueeze(2)  # [B,T,M,D]
        new_state = None
        if self.short_conv is not None:
            y, new_state = self.short_conv(value, conv_state, keep=conv_keep, mask=attention_mask)
            value = value + y
        if zero_output:
            value = torch.zeros_like(value)
        return EngramLayerOutput(value, new_state, alpha if output_gates else None,
                                 GateInputs(hidden_states, e) if output_gate_inputs else None)
