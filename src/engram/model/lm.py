"""Decoder-only language model with Engram conditional memory at chosen layers.

Shape legend
    B batch   T positions   M hc_mult residual branches   D hidden   V vocab   H hash heads

Residual stream: [B,T,M,D]. With M = 1 it is the ordinary residual stream. With M > 1 it is a
static hyper-connection stream: each sublayer reads a learned mix of the branches
(``alpha`` [M]), and its output is written back to every branch with learned weights
(``beta`` [M]) while branches mix through ``A`` [M,M] (identity at init). Engram reads all
branches (one gate per branch) and adds its [B,T,M,D] output directly, as in the paper.

Block order (as in DeepSeek's reference): Engram (if this layer has one) -> attention -> FFN.
With ``engram.placement = "expert"`` a layer of ``layer_ids`` has no Engram layer: its memory is
the last routed expert of its DeepSeekMoE (the historian, ``engram.model.historian``), which
reads the layer's hash ids [B,T,H] for the tokens the router sends to it.

``model(ids, output_gates=True)`` also returns every Engram layer's gate alpha [B,T,M] in
``ModelOutput.gates`` ({layer_id: tensor}, as Hugging Face models return router logits with
``output_router_logits``); ``output_gate_inputs=True`` the gate's inputs (h [B,T,M,D], e [B,T,E]).
With a cache, T is the new positions of this call.

Padding: ``model(ids, attention_mask=mask)`` (mask [B,T], 1 real, 0 padding) runs a batch of
left-padded prompts as if each row were alone: padded positions are hashed as the pad id and
enter the short conv as zeros (``engram.model.layer``), attention never reads them, and the
positions of RoPE count real tokens only (a row's first real token is position 0). A cache
remembers which of its positions were padding. Without a mask (or with one of all ones) the
model runs exactly as before, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from engram.config import ModelConfig, SamplingConfig
from engram.errors import EngramError, RequestTooLargeError
from engram.hashing.hasher import NgramHasher, padding_mask
from engram.model import generation
from engram.model.attention import CausalSelfAttention, KVCache, rope_tables
from engram.model.historian import HistorianExpert
from engram.model.input_ngram import InputNgramEmbedding
from engram.model.layer import EngramLayer, EngramLayerOutput, GateInputs
from engram.model.moe import DeepSeekMoE, SwiGLU
from engram.model.protocol import ModelOutput
from engram.model.table import TABLE_KEY_SUFFIX, EngramTable, RowOverlay, engram_tables, stack_overlays


class HyperConnection(nn.Module):
    """Static hyper-connection around one sublayer (only used when M > 1)."""

    def __init__(self, hc_mult: int, layer_index: int):
        super().__init__()
        alpha = torch.zeros(hc_mult)
        alpha[layer_index % hc_mult] = 1.0  # each sublayer starts by reading one branch
        self.alpha = nn.Parameter(alpha)
        self.beta = nn.Parameter(torch.ones(hc_mult))
        self.A = nn.Parameter(torch.eye(hc_mult))

    def read(self, h: torch.Tensor) -> torch.Tensor:  # [B,T,M,D] -> [B,T,D]
        return torch.einsum("btmd,m->btd", h, self.alpha)

    def write(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # -> [B,T,M,D]
        return torch.einsum("btmd,mn->btnd", h, self.A) + self.beta[:, None] * y.unsqueeze(2)


@dataclass
class InferenceCache:
    """Everything incremental decoding carries between calls."""

    pos: int
    kv: list[KVCache]
    conv: dict[int, Optional[torch.Tensor]] = field(default_factory=dict)  # engram layer -> conv state
    hash_state: Optional[torch.Tensor] = None  # [B, max_n - 1] compressed token history
    ngram_hist: Optional[torch.Tensor] = None  # input N-gram baseline: last ids [B, n - 1]
    # [B, pos] bool, False at padded positions (left-padded prompts); None while all are real.
    key_mask: Optional[torch.Tensor] = None
    # How many of the newest positions ``EngramLM.truncate_cache`` may drop again (speculative
    # decoding scores a draft, then forgets its rejected tail); the conv states keep as many
    # extra rows. 0: plain decoding, nothing kept.
    rollback: int = 0


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, hasher: Optional[NgramHasher]):
        super().__init__()
        self.layer_id = layer_id
        D, M = cfg.hidden_size, cfg.hc_mult
        self.engram = None
        historian = None
        if cfg.engram is not None and layer_id in cfg.engram.layer_ids:
            assert hasher is not None
            if cfg.engram.placement == "expert":  # ModelConfig checked that this layer is an MoE
                historian = HistorianExpert(cfg.engram, layer_id, D, hasher.head_sizes(layer_id))
            else:
                self.engram = EngramLayer(cfg.engram, layer_id, D, M, hasher.head_sizes(layer_id))
        self.attn_norm = nn.RMSNorm(D, eps=cfg.norm_eps)
        self.attn = CausalSelfAttention(D, cfg.num_heads)
        self.ffn_norm = nn.RMSNorm(D, eps=cfg.norm_eps)
        if cfg.ffn == "moe" and layer_id >= cfg.first_k_dense:
            self.ffn = DeepSeekMoE(D, cfg.moe_intermediate_size, cfg.n_routed_experts,
                                   cfg.num_experts_per_tok, cfg.n_shared_experts,
                                   cfg.bias_update_speed, cfg.routed_scaling_factor, historian=historian)
        else:
            self.ffn = SwiGLU(D, cfg.intermediate_size)
        self.has_historian = historian is not None  # a plain flag: the expert is registered in the MoE only
        self.hc_attn = HyperConnection(M, 2 * layer_id) if M > 1 else None
        self.hc_ffn = HyperConnection(M, 2 * layer_id + 1) if M > 1 else None
        # torch.compile'd attention_step / ffn_step (engram.model.accel.compile_backbone); None: eager
        self.compiled_attention: Optional[Any] = None
        self.compiled_ffn: Optional[Any] = None

    @property
    def historian(self) -> Optional[HistorianExpert]:
        """This layer's memory expert (``engram.placement = "expert"``), or None."""
        return self.ffn.historian if self.has_historian else None

    @property
    def reads_hash_ids(self) -> bool:
        return self.engram is not None or self.has_historian

    def _sublayer(self, h, hc, fn):
        if hc is None:  # plain residual: h is [B,T,1,D]
            return h + fn(h[:, :, 0]).unsqueeze(2)
        return hc.write(h, fn(hc.read(h)))

    def forward(self, h: torch.Tensor, cos, sin, hash_ids: Optional[torch.Tensor],
                cache: Optional[InferenceCache], *, output_gates: bool = False,
                output_gate_inputs: bool = False, ablate_engram: bool = False,
                padding: Optional["_Padding"] = None, table_overlay: Optional[RowOverlay] = None
                ) -> tuple[torch.Tensor, Optional[EngramLayerOutput]]:
        """h [B,T,M,D] -> (new h, the Engram layer's output or None in a block without one)."""
        engram_out = None
        if self.engram is not None:
            conv_state = cache.conv.get(self.layer_id) if cache is not None else None
            engram_out = self.engram(h, hash_ids, conv_state, output_gates=output_gates,
                                     output_gate_inputs=output_gate_inputs, zero_output=ablate_engram,
                                     conv_keep=cache.rollback if cache is not None else 0,
                                     attention_mask=padding.engram if padding is not None else None,
                                     table_overlay=table_overlay)
            if cache is not None:
                cache.conv[self.layer_id] = engram_out.conv_state
            h = h + engram_out.output
        kv = cache.kv[self.layer_id] if cache is not None else None
        pos = cache.pos if cache is not None else 0
        attn_mask = padding.attn if padding is not None else None
        h = (self.compiled_attention or self.attention_step)(h, cos, sin, kv, pos, attn_mask)
        if self.has_historian:  # a DeepSeekMoE: never compiled
            return self.historian_ffn_step(h, hash_ids, table_overlay, ablate_engram), engram_out
        return (self.compiled_ffn or self.ffn_step)(h), engram_out

    # The two steps below are what engram.model.accel.compile_backbone compiles (the Engram layer
    # stays eager; so does a DeepSeekMoE FFN, whose routing is data-dependent).
    def attention_step(self, h: torch.Tensor, cos, sin, kv: Optional[KVCache], pos: int,
                       attn_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """h [B,T,M,D] -> h + attention(norm(h)) (through the hyper-connection when M > 1)."""
        return self._sublayer(h, self.hc_attn, lambda x: self.attn(self.attn_norm(x), cos, sin, kv, pos, attn_mask))

    def ffn_step(self, h: torch.Tensor) -> torch.Tensor:
        """h [B,T,M,D] -> h + FFN(norm(h))."""
        return self._sublayer(h, self.hc_ffn, lambda x: self.ffn(self.ffn_norm(x)))

    def historian_ffn_step(self, h: torch.Tensor, hash_ids: torch.Tensor, table_overlay: Optional[RowOverlay],
                           zero_historian: bool) -> torch.Tensor:
        """``ffn_step`` of a layer whose DeepSeekMoE has a historian: it also reads the hash ids [B,T,H]."""
        return self._sublayer(h, self.hc_ffn, lambda x: self.ffn(self.ffn_norm(x), hash_ids, overlay=table_overlay,
                                                                 zero_historian=zero_historian))


@dataclass
class _Padding:
    """What one forward over padded rows needs (``EngramLM._padding``)."""

    attn: torch.Tensor  # [B,1,T,S] bool: query i may read key j
    engram: Optional[torch.Tensor]  # [B,T] bool, False at this call's padded positions; None: all real
    positions: torch.Tensor  # [B,T] RoPE positions, counting real tokens only


class EngramLM(nn.Module):
    """The whole model. ``compression`` is the tokenizer's old->new id map (saved with the model)."""

    def __init__(self, cfg: ModelConfig, compression: Optional[np.ndarray] = None):
        super().__init__()
        self.cfg = cfg
        self.hasher: Optional[NgramHasher] = None
        if cfg.engram is not None:
            self.hasher = NgramHasher(cfg.engram, cfg.vocab_size,
                                      compression if cfg.engram.use_compression else None)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.input_ngram = None  # bigram-hash / OverEncoding baselines (engram.model.input_ngram)
        if cfg.input_ngram is not None:
            self.input_ngram = InputNgramEmbedding(cfg.input_ngram, cfg.hidden_size, cfg.vocab_size,
                                                   cfg.num_layers)
        self.layers = nn.ModuleList(Block(cfg, i, self.hasher) for i in range(cfg.num_layers))
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._init_weights()

    # ------------------------------------------------------------------ parameters
    def _init_weights(self) -> None:
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name.endswith(TABLE_KEY_SUFFIX):
                nn.init.normal_(p, std=self.cfg.engram.table_init_std)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=std / (2 * self.cfg.num_layers) ** 0.5)  # residual outputs
            elif p.dim() == 2 and "hc_" not in name and not name.endswith(".A"):
                nn.init.normal_(p, std=std)
            elif name.endswith((".bias",)) and "engram" in name:
                nn.init.zeros_(p)
        for e in self.engram_layers:  # the generic 2-D init above must not undo the zero conv
            if e.short_conv is not None:
                e.short_conv.reset_parameters()
        if self.input_ngram is not None:
            self.input_ngram.reset_parameters()
        for x in self.historian_experts:  # as the Engram layer's value projection
            nn.init.zeros_(x.value_proj.bias)

    @property
    def engram_layers(self) -> list[EngramLayer]:
        return [b.engram for b in self.layers if b.engram is not None]

    @property
    def historian_experts(self) -> list[HistorianExpert]:
        """The Engram memories that are routed experts (``engram.placement = "expert"``)."""
        return [b.historian for b in self.layers if b.historian is not None]

    def engram_tables(self) -> dict[int, EngramTable]:
        """Every Engram layer's table (``engram.model.table``), by layer id."""
        return engram_tables(self)

    def table_parameters(self) -> list[nn.Parameter]:
        """The Engram embedding tables (sparse, large; trained with their own Adam settings),
        the historian experts' included (``engram_tables``)."""
        tables = [t.weight for t in self.engram_tables().values()]
        if self.input_ngram is not None:
            tables.append(self.input_ngram.embedding.weight)
        return tables

    def param_counts(self) -> dict[str, int]:
        tables = sum(p.numel() for p in self.table_parameters())
        total = sum(p.numel() for p in self.parameters())
        return {"total": total, "tables": tables, "backbone": total - tables}

    @torch.no_grad()
    def update_moe_bias(self) -> None:
        """Auxiliary-loss-free balancing: call once after every optimizer step."""
        for b in self.layers:
            if isinstance(b.ffn, DeepSeekMoE):
                b.ffn.update_bias()

    # ------------------------------------------------------------------ forward
    def compute_hash_ids(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None
                         ) -> Optional[dict[int, torch.Tensor]]:
        """Row ids depend only on tokens, so they can be computed (and prefetched) ahead of time."""
        return self.hasher.hash(input_ids, attention_mask=attention_mask) if self.hasher is not None else None

    def new_cache(self, batch_size: int, max_len: Optional[int] = None, rollback: int = 0) -> InferenceCache:
        """An empty cache for ``max_len`` positions; ``rollback`` > 0 lets ``truncate_cache``
        drop up to that many of the positions added by the latest call."""
        if rollback < 0:
            raise EngramError(f"rollback={rollback} must be >= 0")
        max_len = max_len or self.cfg.max_seq_len
        dev = self.embed.weight.device
        kv = [KVCache(batch_size, self.cfg.num_heads, max_len, self.cfg.head_dim, device=dev)
              for _ in range(self.cfg.num_layers)]
        return InferenceCache(pos=0, kv=kv, rollback=rollback)

    def truncate_cache(self, cache: InferenceCache, n: int, input_ids: torch.Tensor) -> None:
        """Forget every position from ``n`` on, as if the cache had only ever seen the first n.

        ``input_ids`` [B, n] are the tokens the cache keeps (the token-history states are
        rebuilt from their tail). At most ``cache.rollback`` positions, all from the latest
        call, can be dropped. Exact: the KV entries past ``n`` are never read again (attention
        reads ``[:pos]`` and the next call overwrites them), the conv states are cut back to
        the rows of the kept prefix, and the hash / input N-gram histories are recomputed.
        """
        drop = cache.pos - n
        if drop == 0:
            return
        if drop < 0 or drop > cache.rollback:
            raise EngramError(f"cannot truncate a cache of {cache.pos} positions to {n}: at most "
                              f"rollback={cache.rollback} of the newest can be dropped; create the "
                              f"cache with new_cache(..., rollback=k) for a larger k")
        if input_ids.dim() != 2 or input_ids.shape[1] != n:
            raise EngramError(f"input_ids must be the [B, {n}] kept tokens, got shape {tuple(input_ids.shape)}")
        for lid, state in cache.conv.items():
            if state is None:
                continue
            receptive = self.layers[lid].engram.short_conv.receptive
            if state.shape[1] - drop < receptive:
                raise EngramError(f"cannot drop {drop} positions: the latest call added fewer; "
                                  f"truncate only positions of the latest call")
            cache.conv[lid] = state[:, :state.shape[1] - drop]
        if cache.key_mask is not None:
            cache.key_mask = cache.key_mask[:, :n]
        if self.hasher is not None and cache.hash_state is not None:
            start = max(0, n - (self.hasher.max_ngram_size - 1))
            cache.hash_state = self.hasher.state_from_ids(
                input_ids[:, start:], None if cache.key_mask is None else cache.key_mask[:, start:])
        if self.input_ngram is not None and cache.ngram_hist is not None:
            k = self.input_ngram.history
            kept = input_ids if cache.key_mask is None else input_ids.masked_fill(~cache.key_mask,
                                                                                   self.input_ngram.cfg.pad_id)
            pad = input_ids.new_full((input_ids.shape[0], k), self.input_ngram.cfg.pad_id)
            cache.ngram_hist = torch.cat([pad, kept[:, max(0, n - k):]], dim=1)[:, -k:]
        cache.pos = n

    def generate(self, prompt_ids: torch.Tensor, sampling: Optional[SamplingConfig] = None,
                 eos_id: Optional[int] = None, attention_mask: Optional[torch.Tensor] = None,
                 patches: Optional[Sequence[Any]] = None) -> torch.Tensor:
        """prompt_ids [B,T0] -> [B, T0 + n]: ``engram.model.generation.generate`` on this model
        (``attention_mask`` [B,T0] for left-padded prompts, ``patches`` as in ``forward``)."""
        return generation.generate(self, prompt_ids, sampling or SamplingConfig(), eos_id, attention_mask,
                                   patches=patches)

    def _hash_for_cache(self, input_ids: torch.Tensor, cache: InferenceCache,
                        attention_mask: Optional[torch.Tensor] = None) -> dict[int, torch.Tensor]:
        """Hash new tokens given the history in the cache, advancing it (``attention_mask`` [B,T]:
        0 at this call's padded positions)."""
        assert self.hasher is not None
        if cache.pos == 0 or cache.hash_state is None:
            hash_ids = self.hasher.hash(input_ids, attention_mask=attention_mask)
            cache.hash_state = self.hasher.state_from_ids(input_ids, attention_mask)
            return hash_ids
        steps = []
        for t in range(input_ids.shape[1]):  # incremental: O(1) per token from a tiny state
            ids_t, cache.hash_state = self.hasher.hash_step(
                cache.hash_state, input_ids[:, t],
                attention_mask=None if attention_mask is None else attention_mask[:, t])
            steps.append(ids_t)
        return {lid: torch.stack([s[lid] for s in steps], dim=1) for lid in steps[0]}

    def _padding(self, attention_mask: Optional[torch.Tensor], input_ids: torch.Tensor,
                 cache: Optional[InferenceCache]) -> Optional[_Padding]:
        """The masks and positions of a call with padding; None when every position so far is
        real (then the forward is the unpadded one, bit for bit). Records the call's mask in
        ``cache``."""
        B, T = input_ids.shape
        pos = cache.pos if cache is not None else 0
        mask = None
        if attention_mask is not None:
            mask = padding_mask(attention_mask, input_ids.shape, input_ids.device)  # [B,T]
            if bool(mask.all()):
                mask = None
        past = cache.key_mask if cache is not None else None
        if mask is None and past is None:
            return None
        if past is None:  # the first padded call: every earlier position of the cache was real
            past = input_ids.new_ones(B, pos, dtype=torch.bool)
        new = mask if mask is not None else input_ids.new_ones(B, T, dtype=torch.bool)
        keys = torch.cat([past, new], dim=1)  # [B,S]
        if cache is not None:
            cache.key_mask = keys
        S = pos + T
        query_at = torch.arange(pos, S, device=input_ids.device)[:, None]  # [T,1]
        key_at = torch.arange(S, device=input_ids.device)[None, :]  # [1,S]
        # Causal and real, plus the query itself: a padded query then reads only itself (no row
        # of the attention is empty, so nothing is NaN), and no real query reads a padded key.
        attn = (key_at <= query_at) & (keys[:, None, :] | (key_at == query_at))  # [B,T,S]
        positions = (keys.cumsum(dim=1) - 1).clamp_min(0)[:, pos:]  # [B,T]
        return _Padding(attn=attn.unsqueeze(1), engram=mask, positions=positions)

    def forward(self, input_ids: torch.Tensor, targets: Optional[torch.Tensor] = None, *,
                hash_ids: Optional[dict[int, torch.Tensor]] = None,
                cache: Optional[InferenceCache] = None, output_gates: bool = False,
                output_gate_inputs: bool = False, ablate_engram: bool = False,
                attention_mask: Optional[torch.Tensor] = None,
                patches: Optional[Sequence[Any]] = None, logits_at: Optional[torch.Tensor] = None) -> ModelOutput:
        """input_ids [B,T] -> logits [B,T,V] (and mean cross-entropy if targets are given).

        ``output_gates`` / ``output_gate_inputs``: also return every Engram layer's gates /
        gate inputs ({} for a model without Engram layers; None when not asked for).
        ``ablate_engram``: every Engram layer adds zeros instead of its output (ablations).
        ``attention_mask`` [B,T] (1 real, 0 padding) for this call's tokens; with a cache, the
        cache remembers the earlier calls' padding. Rows left-padded to one length give what
        each gives alone (module docstring); the logits at padded positions mean nothing.
        ``patches``: a stack of loaded patches (or ``{layer_id: RowOverlay}`` mappings) read for
        this call only, as if applied in order to a copy of the tables; the tables are not
        written (``engram.model.table.stack_overlays``). None or [] reads the tables alone.
        ``logits_at`` [B,T] bool: the logits [M,V] at those positions only, row by row (the output
        head runs on them alone; not with ``targets``).
        """
        if input_ids.dim() != 2:
            raise EngramError(f"input_ids must be [batch, time], got shape {tuple(input_ids.shape)}")
        if logits_at is not None and (targets is not None or logits_at.shape != input_ids.shape):
            raise EngramError(f"logits_at must be a [batch, time] mask of the input's shape {tuple(input_ids.shape)} "
                              f"(got {tuple(logits_at.shape)}), and cannot be combined with targets")
        B, T = input_ids.shape
        V = self.cfg.vocab_size
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= V):
            bad = input_ids[(input_ids < 0) | (input_ids >= V)][0].item()
            raise EngramError(f"token id {bad} is outside the model vocabulary [0, {V}); "
                             f"was the data tokenized with another tokenizer?")
        pos = cache.pos if cache is not None else 0
        if pos + T > self.cfg.max_seq_len:
            raise RequestTooLargeError(f"sequence of {pos + T} positions exceeds max_seq_len={self.cfg.max_seq_len}")
        overlays = stack_overlays(self, patches) if patches is not None else {}
        padding = self._padding(attention_mask, input_ids, cache)
        mask = padding.engram if padding is not None else None
        if self.hasher is not None and hash_ids is None:
            hash_ids = (self._hash_for_cache(input_ids, cache, mask) if cache is not None
                        else self.hasher.hash(input_ids, attention_mask=mask))
        if padding is None:
            cos, sin = self.rope_cos[pos:pos + T], self.rope_sin[pos:pos + T]
        else:  # one row of positions per sequence: [B,1,T,Dh/2], broadcast over the heads
            cos, sin = self.rope_cos[padding.positions][:, None], self.rope_sin[padding.positions][:, None]
        x = self.embed(input_ids)
        ngram_rows = None
        if self.input_ngram is not None:
            ngram_ids = input_ids if mask is None else input_ids.masked_fill(~mask, self.input_ngram.cfg.pad_id)
            x, hist, ngram_rows = self.input_ngram(ngram_ids, x,
                                                   cache.ngram_hist if cache is not None and cache.pos else None)
            if cache is not None:
                cache.ngram_hist = hist
        h = x.unsqueeze(2).expand(-1, -1, self.cfg.hc_mult, -1)  # [B,T,M,D]
        gates: Optional[dict[int, torch.Tensor]] = {} if output_gates else None
        gate_inputs: Optional[dict[int, GateInputs]] = {} if output_gate_inputs else None
        for i, block in enumerate(self.layers):
            if ngram_rows is not None:  # the every-layer bigram baseline: its row before every block
                h = h + self.input_ngram.layer_rows(ngram_rows, i)
            ids = hash_ids[block.layer_id] if block.reads_hash_ids else None
            h, engram_out = block(h, cos, sin, ids, cache, output_gates=output_gates,
                                  output_gate_inputs=output_gate_inputs, ablate_engram=ablate_engram,
                                  padding=padding, table_overlay=overlays.get(block.layer_id))
            if engram_out is not None and gates is not None:
                gates[block.layer_id] = engram_out.gates
            if engram_out is not None and gate_inputs is not None:
                gate_inputs[block.layer_id] = engram_out.gate_inputs
        if cache is not None:
            cache.pos += T
        hidden = self.norm(h.sum(dim=2))  # branches are summed back into one stream
        logits = self.lm_head(hidden if logits_at is None else hidden[logits_at])
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1))
        return ModelOutput(logits=logits, loss=loss, gates=gates, gate_inputs=gate_inputs)
