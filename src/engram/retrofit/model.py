"""Engram layers inside a pretrained Hugging Face causal LM, without copying or editing it.

Shape legend
    B batch   T new positions of a call   D the base's hidden size   H hash heads   V vocab

The base model object stays what it was (its class, weights and ``generate()``); two kinds of
forward pre-hooks put Engram into it:

- on the base causal LM: hash the call's ``input_ids`` (from the history kept with the KV cache
  when earlier positions are cached) and open the call's context;
- on each chosen decoder layer: add Engram's output to the hidden states entering that layer,
  ``h <- h + Engram(h, hash ids)``, the residual stream viewed as [B,T,1,D] (one branch).

Engram's value projection starts at zero, so every Engram layer outputs exact zeros and the
retrofitted model's logits equal the base's bit for bit until the first optimizer step; the
value projection gets gradients from the first step on, like LoRA's zero-initialised B.

Incremental decoding: the KV cache object of the base (a ``transformers`` ``Cache``) carries an
:class:`EngramState` (the tokens seen, for hashing, and each layer's short-conv state) as an
attribute, so ``generate()`` of ``transformers`` works unmodified, with or without a cache.
The state follows every edit ``transformers`` makes to the cache: a crop (prompt-lookup and
assisted decoding drop rejected drafts; ``cache.crop``) is matched at the start of the next call
from the cache's length, which is why a cache created by ``transformers`` keeps the short-conv
rows of every position (about as many floats per Engram layer as one layer's keys and values);
a batch edit (beam search's ``reorder_cache``, ``batch_select_indices``,
``batch_repeat_interleave``) is applied to the state by the cache itself, whose three methods
are wrapped when the state is attached.

Padding: the base hook reads the call's 2-D ``attention_mask`` (what ``generate()`` passes, for
``tokenizer(prompts, padding=True)`` left-padded batches): padded positions are hashed as the pad
id (the token history keeps them so) and enter the short conv as zeros, so every row gets what
it gets alone; ``transformers`` keeps them out of attention and positions. An all-ones mask, or
none, changes nothing.
:class:`RetrofitLM` also offers the interface of ``EngramLM`` (``forward(ids, targets,
hash_ids=, cache=, output_gates=...)`` -> ``ModelOutput``, ``new_cache``, ``engram_layers``,
``hasher``), so the library's tools (evaluation, table tiers, patches, gate heatmaps) take it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import types
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from engram.config import EngramConfig, RetrofitConfig, RetrofitError, SamplingConfig
from engram.errors import EngramError
from engram.hashing.hasher import NgramHasher, padding_mask
from engram.model import generation
from engram.model.layer import EngramLayer, GateInputs, MultiHeadEmbedding
from engram.model.lm import ModelOutput
from engram.model.table import EngramTable, RowOverlay, engram_tables, stack_overlays
from engram.tables.runtime import OffloadedEmbedding

_STATE_ATTR = "engram_state"  # attribute of the base's KV cache object
_ROLLBACK_ATTR = "engram_rollback"  # positions a cache may drop again (new_cache(rollback=k))


@dataclass(frozen=True)
class RetrofitShape:
    """What tools read from ``model.cfg`` (the part of ``ModelConfig`` a retrofit has)."""

    engram: Optional[EngramConfig]  # None for a LoRA-only retrofit
    vocab_size: int
    hidden_size: int
    num_layers: int
    max_seq_len: int
    hc_mult: int = 1
    tie_embeddings: bool = False


# ``EngramState.keep`` of a cache created by transformers: every short-conv row is kept, so that
# any crop can be followed (ShortConv keeps min(all, receptive + keep) rows)
KEEP_ALL = 1 << 62


@dataclass
class EngramState:
    """Carried by a KV cache between calls: tokens seen [B, n] (padded positions replaced by the
    pad id, as hashing reads them) and short-conv states per layer [B, rows, D], the newest
    ``rows`` normed inputs (the first ``receptive`` of them zeros while n is short)."""

    ids: torch.Tensor
    conv: dict[int, Optional[torch.Tensor]] = field(default_factory=dict)
    keep: int = 0  # extra short-conv rows kept so that the newest ``keep`` positions can be dropped

    @property
    def length(self) -> int:
        return int(self.ids.shape[1])

    def crop(self, n: int, receptive: dict[int, int]) -> None:
        """Forget every position from ``n`` on, as if never fed; ``receptive``: rows each
        layer's short conv reads. Refused (state unchanged) when too few rows were kept."""
        drop = self.length - n
        if drop <= 0:
            return
        for lid, st in self.conv.items():
            if st is not None and st.shape[1] - drop < receptive[lid]:
                raise RetrofitError(f"cannot drop the newest {drop} positions of Engram's state: it keeps "
                                    f"the short-conv rows of only the newest {st.shape[1] - receptive[lid]}; "
                                    f"create the cache with new_cache(..., rollback={drop}) or larger")
        self.conv = {lid: None if st is None else st[:, :st.shape[1] - drop] for lid, st in self.conv.items()}
        self.ids = self.ids[:, :n]

    def select(self, rows: torch.Tensor) -> None:
        """Keep batch rows ``rows`` [B'] in that order (beam search's reorder; repeats allowed)."""
        rows = rows.to(self.ids.device)
        self.ids = self.ids.index_select(0, rows)
        self.conv = {lid: None if st is None else st.index_select(0, rows.to(st.device))
                     for lid, st in self.conv.items()}


def _reorder_cache(kv: Any, beam_idx: torch.Tensor) -> None:
    type(kv).reorder_cache(kv, beam_idx)
    state = getattr(kv, _STATE_ATTR, None)
    if state is not None:
        state.select(beam_idx)


def _batch_select_indices(kv: Any, indices: torch.Tensor) -> None:
    type(kv).batch_select_indices(kv, indices)
    state = getattr(kv, _STATE_ATTR, None)
    if state is not None:
        state.select(torch.as_tensor(indices, dtype=torch.long).reshape(-1))


def _batch_repeat_interleave(kv: Any, repeats: int) -> None:
    type(kv).batch_repeat_interleave(kv, repeats)
    state = getattr(kv, _STATE_ATTR, None)
    if state is not None:
        state.select(torch.arange(state.ids.shape[0]).repeat_interleave(repeats))


_BATCH_EDITS = {"reorder_cache": _reorder_cache, "batch_select_indices": _batch_select_indices,
                "batch_repeat_interleave": _batch_repeat_interleave}


def _follow_batch_edits(kv: Any) -> None:
    """Wrap the cache object's batch edits so that they apply to its Engram state too. Bound to
    the instance (a deep copy of the cache rebinds them to the copy); its class is untouched."""
    for name, fn in _BATCH_EDITS.items():
        if callable(getattr(type(kv), name, None)):
            setattr(kv, name, types.MethodType(fn, kv))


@dataclass
class RetrofitCache:
    """The ``cache=`` of :meth:`RetrofitLM.forward`: the base's own KV cache (``kv``)."""

    kv: Any
    # [B, pos] bool, False at padded positions (``forward``'s attention_mask); None while all are real.
    key_mask: Optional[torch.Tensor] = None

    @property
    def pos(self) -> int:
        return int(self.kv.get_seq_length())


@dataclass
class _Call:
    """One forward of the base: its hash ids, state and what to report."""

    hash_ids: dict[int, torch.Tensor]
    state: Optional[EngramState]
    output_gates: bool = False
    output_gate_inputs: bool = False
    ablate: bool = False
    mask: Optional[torch.Tensor] = None  # [B,T] bool, False at the call's padded positions; None: all real
    overlays: dict[int, RowOverlay] = field(default_factory=dict)  # patches= of the call, per layer
    gates: dict[int, torch.Tensor] = field(default_factory=dict)
    gate_inputs: dict[int, GateInputs] = field(default_factory=dict)


def _cache_argument(module: nn.Module, args: tuple, kwargs: dict) -> Any:
    """The KV cache a base forward got: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    for name in ("cache", "past_key_values"):
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def _call_mask(kwargs: dict, input_ids: torch.Tensor) -> Optional[torch.Tensor]:
    """The padding of a base call's new positions: [B,T] bool from its 2-D ``attention_mask``
    (which covers the cached positions too), or None when they are all real."""
    am = kwargs.get("attention_mask")
    if am is None:
        return None
    if am.dim() != 2:
        raise RetrofitError(f"a retrofitted model reads 2-D attention masks [batch, positions] (1 real, "
                            f"0 padding), got shape {tuple(am.shape)}; pass the tokenizer's attention_mask")
    T = input_ids.shape[1]
    if am.shape[0] != input_ids.shape[0] or am.shape[1] < T:
        raise RetrofitError(f"attention_mask has shape {tuple(am.shape)} but input_ids {tuple(input_ids.shape)}; "
                            f"it must cover at least the call's tokens")
    mask = am[:, am.shape[1] - T:].to(input_ids.device) != 0
    return None if bool(mask.all()) else mask


def decoder_layers(hf_model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a supported causal LM (``model.model.layers``)."""
    layers = getattr(getattr(hf_model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise RetrofitError(f"{type(hf_model).__name__} has no model.layers; only Llama-style decoders "
                            f"(llama, mistral, qwen2, qwen3) can be retrofitted")
    return layers


class _Given(nn.Module):
    """Stands in for the first decoder layers: returns the stream they would (see ``starting_at``)."""

    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__()
        self.hidden = hidden

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if hidden_states.shape != self.hidden.shape:
            raise RetrofitError(f"starting_at got states of shape {tuple(self.hidden.shape)} for a call of "
                                f"{tuple(hidden_states.shape)}; capture them for the same ids")
        return self.hidden


class _Pass(nn.Module):
    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


class RetrofitLM(nn.Module):
    """A frozen Hugging Face causal LM (``self.base``) with Engram layers before chosen decoder layers."""

    def __init__(self, hf_model: nn.Module, cfg: RetrofitConfig, compression: Optional[np.ndarray],
                 pad_id: int, *, allocate_tables: bool = True) -> None:
        """``allocate_tables=False`` leaves the tables on the meta device (nothing allocated), for
        tables served from a file by a storage tier (``engram.tables.runtime.attach_tables``)."""
        super().__init__()
        hc = hf_model.config
        n_layers = int(hc.num_hidden_layers)
        bad = [i for i in cfg.layers if i >= n_layers]
        if bad:
            raise RetrofitError(f"layers={list(cfg.layers)}: {bad} out of range; the base has {n_layers} "
                                f"decoder layers (0..{n_layers - 1})")
        self.retrofit_config = cfg
        vocab = int(hc.vocab_size)
        ecfg = cfg.engram_config(pad_id) if cfg.layers else None
        self.cfg = RetrofitShape(engram=ecfg, vocab_size=vocab, hidden_size=int(hc.hidden_size),
                                 num_layers=n_layers,
                                 max_seq_len=int(getattr(hc, "max_position_embeddings", 1 << 30)),
                                 tie_embeddings=bool(getattr(hc, "tie_word_embeddings", False)))
        self.hasher = NgramHasher(ecfg, vocab, compression) if ecfg is not None else None
        self.base = hf_model.eval().requires_grad_(False)
        if cfg.lora_rank:
            _inject_lora(hf_model, cfg)
        self.engram = nn.ModuleDict({str(i): self._new_layer(i, allocate_tables) for i in cfg.layers})
        self._call: Optional[_Call] = None
        self._engram_off = False  # without_engram(): the hooks pass the hidden states through
        # transformers renamed the forward's past_key_values to cache; pass whichever it takes.
        params = inspect.signature(type(hf_model).forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._last_call: Optional[_Call] = None
        self._pending: Optional[dict[str, Any]] = None
        layers = decoder_layers(hf_model)
        self._hooks = [self.base.register_forward_pre_hook(self._begin_call, with_kwargs=True),
                       self.base.register_forward_hook(self._end_call, always_call=True)]
        self._hooks += [layers[i].register_forward_pre_hook(self._layer_hook(i), with_kwargs=True)
                        for i in cfg.layers]

    # ------------------------------------------------------------------ parameters
    @torch.no_grad()
    def _new_layer(self, layer_id: int, allocate_tables: bool) -> EngramLayer:
        ecfg, sizes = self.cfg.engram, self.hasher.head_sizes(layer_id)
        e = EngramLayer(ecfg, layer_id, self.cfg.hidden_size, 1, sizes if allocate_tables else [2] * len(sizes))
        if allocate_tables:
            nn.init.normal_(e.table.weight, std=ecfg.table_init_std)
        else:  # the real sizes around a placeholder table: a storage tier will serve the rows
            e.multi_head_embedding = MultiHeadEmbedding(
                sizes, ecfg.head_dim, table=OffloadedEmbedding(sum(sizes), ecfg.head_dim, layer_id),
                group_size=ecfg.n_head_per_ngram)
        nn.init.zeros_(e.value_proj.weight)  # output exactly zero: logits equal the base's
        nn.init.zeros_(e.value_proj.bias)
        for k in e.key_projs:
            nn.init.normal_(k.weight, std=self.cfg.hidden_size ** -0.5)
            nn.init.zeros_(k.bias)
        if e.short_conv is not None:
            e.short_conv.reset_parameters()
        return e

    @property
    def engram_layers(self) -> list[EngramLayer]:
        return [self.engram[str(i)] for i in self.retrofit_config.layers]

    @property
    def embed(self) -> nn.Module:
        """The base's token embedding (``EngramLM``'s name for it, read by the table runtime)."""
        return self.base.get_input_embeddings()

    def engram_tables(self) -> dict[int, EngramTable]:
        """Every Engram layer's table (``engram.model.table``), by layer id."""
        return engram_tables(self)

    def table_parameters(self) -> list[nn.Parameter]:
        return [t.weight for t in self.engram_tables().values()]

    def lora_state(self) -> dict[str, torch.Tensor]:
        """The LoRA weights injected into the base, by module name (empty without LoRA)."""
        return {n: p for n, p in self.base.named_parameters() if "lora_" in n}

    def add_lora(self, rank: int, alpha: Optional[float] = None, targets: Optional[Sequence[str]] = None) -> None:
        """Inject fresh LoRA weights beside Engram: rank ``rank``, ``alpha`` (default 2 x rank, the
        scaling of the config's default 16 at rank 8) and ``targets`` (default the config's
        ``lora_targets``); ``remove_lora()`` takes them off again, leaving the base as it was."""
        if self.lora_state():
            raise RetrofitError("this model already has LoRA weights; call remove_lora() first")
        c = self.retrofit_config
        _inject_lora(self.base, dataclasses.replace(c, lora_rank=rank, lora_alpha=alpha or 2 * rank,
                                                    lora_targets=tuple(targets or c.lora_targets)))

    def remove_lora(self) -> None:
        """Put the base's original layers back where LoRA wrapped them (Engram stays)."""
        _remove_lora(self.base)

    def param_counts(self) -> dict[str, int]:
        tables = sum(p.numel() for p in self.table_parameters())
        engram = sum(p.numel() for p in self.engram.parameters())
        lora = sum(p.numel() for p in self.lora_state().values())
        base = sum(p.numel() for p in self.base.parameters()) - lora
        return {"total": base + engram + lora, "tables": tables, "engram": engram, "lora": lora, "base": base,
                "trainable": sum(p.numel() for p in self.parameters() if p.requires_grad)}

    def train(self, mode: bool = True) -> "RetrofitLM":
        """Train mode for the Engram layers only: the frozen base stays in eval mode (no dropout)."""
        super().train(mode)
        self.base.eval()
        return self

    def update_moe_bias(self) -> None:
        """Nothing to balance (the training loop calls it for DeepSeekMoE backbones)."""

    # ------------------------------------------------------------------ hashing
    def compute_hash_ids(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None
                         ) -> Optional[dict[int, torch.Tensor]]:
        return self.hasher.hash(input_ids, attention_mask=attention_mask) if self.hasher is not None else None

    def _hash_after(self, history: torch.Tensor, input_ids: torch.Tensor) -> dict[int, torch.Tensor]:
        """Hash ids of ``input_ids`` [B,T] following ``history`` [B,n] (only its last N-1 matter)."""
        keep = min(history.shape[1], self.hasher.max_ngram_size - 1)
        window = torch.cat([history[:, history.shape[1] - keep:], input_ids], dim=1)
        return {k: v[:, keep:] for k, v in self.hasher.hash(window).items()}

    def _hash_for_cache(self, input_ids: torch.Tensor, cache: RetrofitCache,
                        attention_mask: Optional[torch.Tensor] = None) -> dict[int, torch.Tensor]:
        """Hash ids of the next call with ``cache`` (for prefetching; the state is not advanced)."""
        input_ids = self.hasher.mask_ids(input_ids, attention_mask)
        past = cache.pos
        if past == 0:
            return self.hasher.hash(input_ids)
        return self._hash_after(self._state_of(cache.kv, past).ids[:, :past], input_ids)

    def _receptive(self) -> dict[int, int]:
        return {i: 0 if self.engram[str(i)].short_conv is None else self.engram[str(i)].short_conv.receptive
                for i in self.retrofit_config.layers}

    def _state_of(self, kv: Any, past: int) -> EngramState:
        """The Engram state of a KV cache holding ``past`` > 0 positions, cut back to them if the
        cache was cropped since the state last saw it."""
        state = getattr(kv, _STATE_ATTR, None)
        if state is None or state.length < past:
            raise RetrofitError(f"the KV cache holds {past} positions but Engram's state has "
                                f"{0 if state is None else state.length} (the cache was filled without "
                                f"this retrofit's hooks); start from a fresh cache")
        state.crop(past, self._receptive())
        return state

    def new_cache(self, batch_size: int, max_len: Optional[int] = None, rollback: int = 0) -> RetrofitCache:
        """An empty KV cache of the base; ``rollback`` > 0 lets :meth:`truncate_cache` drop up to
        that many of the newest positions (speculative decoding)."""
        from transformers import DynamicCache

        kv = DynamicCache(config=self.base.config)
        setattr(kv, _ROLLBACK_ATTR, int(rollback))
        return RetrofitCache(kv=kv)

    def cache_tensors(self, cache: RetrofitCache) -> tuple[list[tuple[torch.Tensor, torch.Tensor]],
                                                           Optional[EngramState]]:
        """What ``cache`` holds: the base's keys and values per decoder layer ([B,Hkv,S,Dh] each)
        and Engram's state (None without Engram layers). For saving a state (engram.serve.state_cache)."""
        kv = cache.kv
        if hasattr(kv, "layers"):  # transformers 5.x: one object per layer
            layers = [(layer.keys, layer.values) for layer in kv.layers]
            if any(getattr(layer, "is_sliding", False) for layer in kv.layers):
                raise RetrofitError("the base's cache has sliding-window layers, whose keys cannot be "
                                    "saved and restored as a prefix; use a base without sliding windows")
        else:  # transformers 4.x
            layers = list(zip(kv.key_cache, kv.value_cache))
        past = cache.pos
        return layers, self._state_of(kv, past) if self.hasher is not None and past else None

    def restored_cache(self, layers: Sequence[tuple[torch.Tensor, torch.Tensor]], ids: torch.Tensor,
                       conv: dict[int, Optional[torch.Tensor]]) -> RetrofitCache:
        """A fresh cache (no rollback) holding ``layers`` (keys, values [B,Hkv,S,Dh] per decoder
        layer) and Engram's state after the tokens ``ids`` [B,S] (no padding) with short-conv
        states ``conv``: the inverse of :meth:`cache_tensors`."""
        cache = self.new_cache(int(ids.shape[0]))
        for i, (k, v) in enumerate(layers):
            cache.kv.update(k, v, i)
        if cache.pos != ids.shape[1]:
            raise RetrofitError(f"restored keys hold {cache.pos} positions but {ids.shape[1]} tokens were given")
        if self.hasher is not None:
            setattr(cache.kv, _STATE_ATTR, EngramState(ids=ids, conv=dict(conv), keep=0))
            _follow_batch_edits(cache.kv)
        return cache

    def truncate_cache(self, cache: RetrofitCache, n: int, input_ids: Optional[torch.Tensor] = None) -> None:
        """Forget every position from ``n`` on (at most the cache's ``rollback`` newest, all from
        the latest call): the base's KV cache is cropped, the token history cut, and each short
        conv state loses its newest rows, exactly as if the dropped tokens had never been fed.
        ``input_ids`` (the kept tokens, as ``EngramLM`` needs them) is not needed: the cache
        keeps its own token history."""
        drop = cache.pos - n
        if drop == 0:
            return
        rollback = int(getattr(cache.kv, _ROLLBACK_ATTR, 0))
        if drop < 0 or drop > rollback:
            raise EngramError(f"cannot truncate a cache of {cache.pos} positions to {n}: at most rollback="
                              f"{rollback} of the newest can be dropped; create it with new_cache(..., rollback=k)")
        state = getattr(cache.kv, _STATE_ATTR, None)
        if state is not None:
            state.crop(n, self._receptive())
        if cache.key_mask is not None:
            cache.key_mask = cache.key_mask[:, :n]
        cache.kv.crop(-drop)  # negative: drop that many (transformers 4.x and 5.x agree on this form)

    # ------------------------------------------------------------------ hooks
    def _begin_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        pending, self._pending = self._pending or {}, None
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise RetrofitError("a retrofitted model needs input_ids (Engram hashes tokens); "
                                "inputs_embeds alone cannot be hashed")
        hash_ids = pending.get("hash_ids")
        flags = (bool(pending.get("output_gates")), bool(pending.get("output_gate_inputs")), bool(pending.get("ablate")))
        if self.hasher is None:  # LoRA only: nothing to hash or carry
            self._call = _Call({}, None, *flags)
            return
        mask = _call_mask(kwargs, input_ids)
        input_ids = self.hasher.mask_ids(input_ids, mask)  # padding hashes (and is kept) as the pad id
        kv = _cache_argument(module, args, kwargs)
        state = None
        if kv is not None and kwargs.get("use_cache", True) is not False:
            past = int(kv.get_seq_length())
            if past == 0:  # new_cache(rollback=k) keeps k rows to drop; transformers' caches keep all
                state = EngramState(ids=input_ids[:, :0], keep=int(getattr(kv, _ROLLBACK_ATTR, KEEP_ALL)))
                setattr(kv, _STATE_ATTR, state)
                _follow_batch_edits(kv)
            else:
                state = self._state_of(kv, past)  # follows a crop since the last call
            if hash_ids is None:
                hash_ids = self._hash_after(state.ids, input_ids) if past else self.hasher.hash(input_ids)
            state.ids = torch.cat([state.ids, input_ids], dim=1)
        elif hash_ids is None:
            hash_ids = self.hasher.hash(input_ids)
        self._call = _Call(hash_ids, state, *flags, mask=mask, overlays=pending.get("overlays") or {})

    def _end_call(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._last_call, self._call = self._call, None

    def _layer_hook(self, layer_id: int):
        engram = self.engram[str(layer_id)]

        def hook(module: nn.Module, args: tuple, kwargs: dict):
            call = self._call
            if call is None or self._engram_off:  # called outside the base's forward, or switched off
                return None
            h = args[0] if args else kwargs["hidden_states"]  # [B,T,D]
            conv = call.state.conv.get(layer_id) if call.state is not None else None
            out = engram(h.unsqueeze(2), call.hash_ids[layer_id], conv, output_gates=call.output_gates,
                         output_gate_inputs=call.output_gate_inputs, zero_output=call.ablate,
                         conv_keep=call.state.keep if call.state is not None else 0,
                         attention_mask=call.mask, table_overlay=call.overlays.get(layer_id))
            if call.state is not None:
                call.state.conv[layer_id] = out.conv_state
            if call.output_gates:
                call.gates[layer_id] = out.gates
            if call.output_gate_inputs:
                call.gate_inputs[layer_id] = out.gate_inputs
            h = h + out.output.squeeze(2)
            if args:
                return (h, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": h}

        return hook

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, targets: Optional[torch.Tensor] = None, *,
                hash_ids: Optional[dict[int, torch.Tensor]] = None, cache: Optional[RetrofitCache] = None,
                output_gates: bool = False, output_gate_inputs: bool = False,
                ablate_engram: bool = False, attention_mask: Optional[torch.Tensor] = None,
                patches: Optional[Sequence[Any]] = None, logits_at: Optional[torch.Tensor] = None) -> ModelOutput:
        """input_ids [B,T] -> logits [B,T,V] (and mean cross-entropy with targets), as ``EngramLM``.
        ``patches``: read for this call only, as ``EngramLM``'s (the tables are not written).
        ``logits_at`` [B,T] bool: logits [M,V] at those positions only, row by row, as ``EngramLM``'s
        (the output head, a large share of a small model's work, runs on those positions alone).

        ``attention_mask`` [B,T] (1 real, 0 padding) for this call's tokens, as ``EngramLM``'s:
        the cache remembers earlier calls' padding, and the base gets the whole mask and the
        positions of the real tokens, the way ``generate()`` of ``transformers`` calls it."""
        if input_ids.dim() != 2:
            raise EngramError(f"input_ids must be [batch, time], got shape {tuple(input_ids.shape)}")
        V = self.cfg.vocab_size
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= V):
            bad = input_ids[(input_ids < 0) | (input_ids >= V)][0].item()
            raise EngramError(f"token id {bad} is outside the base vocabulary [0, {V}); was the data "
                              f"tokenized with the base's tokenizer (engram retrofit data)?")
        overlays = stack_overlays(self, patches) if patches is not None else {}
        self._pending = {"hash_ids": hash_ids, "output_gates": output_gates,
                         "output_gate_inputs": output_gate_inputs, "ablate": ablate_engram,
                         "overlays": overlays}
        kv = cache.kv if cache is not None else None
        padded = self._padding_kwargs(input_ids, attention_mask, cache)
        if logits_at is not None and (targets is not None or logits_at.shape != input_ids.shape):
            raise EngramError(f"logits_at must be a [batch, time] mask of the input's shape {tuple(input_ids.shape)} "
                              f"(got {tuple(logits_at.shape)}), and cannot be combined with targets")
        head = self._plain_head() if logits_at is not None else None
        try:
            if head is not None:  # the base returns its final hidden states; the head runs below
                self.base.set_output_embeddings(nn.Identity())
            out = self.base(input_ids=input_ids, use_cache=cache is not None, **{self._cache_kwarg: kv}, **padded)
        finally:
            self._pending = None
            if head is not None:
                self.base.set_output_embeddings(head)
        call = self._last_call
        logits = out.logits
        if logits_at is not None:
            logits = head(logits[logits_at]) if head is not None else logits[logits_at]
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, V).float(), targets.reshape(-1))
        return ModelOutput(logits=logits, loss=loss, gates=call.gates if output_gates else None,
                           gate_inputs=call.gate_inputs if output_gate_inputs else None)

    def _plain_head(self) -> Optional[nn.Module]:
        """The base's output head when its logits are that head applied to the final hidden states
        and nothing after (so it can run on chosen positions alone), else None (e.g. softcapped
        logits): ``logits_at`` then takes the positions from the full logits."""
        head = self.base.get_output_embeddings()
        cfg = getattr(self.base, "config", None)
        if not isinstance(head, nn.Linear) or getattr(cfg, "final_logit_softcapping", None):
            return None
        return head

    def _padding_kwargs(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                        cache: Optional[RetrofitCache]) -> dict[str, torch.Tensor]:
        """{} while every position is real (the base computes its positions as before); otherwise
        the base's ``attention_mask`` [B,S] over cached and new positions and ``position_ids``
        [B,T] counting real tokens only, the values ``generate()`` of ``transformers`` passes."""
        B, T = input_ids.shape
        mask = None
        if attention_mask is not None:
            mask = padding_mask(attention_mask, input_ids.shape, input_ids.device)
            if bool(mask.all()):
                mask = None
        past = cache.key_mask[:, :cache.pos] if cache is not None and cache.key_mask is not None else None
        if mask is None and past is None:
            return {}
        if past is None:  # the first padded call: every earlier position was real
            past = input_ids.new_ones(B, cache.pos if cache is not None else 0, dtype=torch.bool)
        keys = torch.cat([past, mask if mask is not None else input_ids.new_ones(B, T, dtype=torch.bool)], dim=1)
        if cache is not None:
            cache.key_mask = keys
        positions = (keys.long().cumsum(dim=1) - 1).clamp_min(0)[:, keys.shape[1] - T:]
        return {"attention_mask": keys.long(), "position_ids": positions}

    # ------------------------------------------------------------------ a frozen prefix, computed once
    def first_engram_layer(self) -> Optional[int]:
        """The lowest decoder layer Engram reads before (None without Engram layers): the layers
        below it compute the same states whatever the tables hold."""
        return min(self.retrofit_config.layers) if self.retrofit_config.layers else None

    @contextlib.contextmanager
    def capturing_input_of(self, layer: int) -> Iterator[list[Optional[torch.Tensor]]]:
        """Inside, every forward appends the residual stream entering decoder ``layer`` (before
        Engram's hook there adds to it) [B,T,D] to the yielded list; None where the layer below
        returns something else than a tensor (older transformers), so :meth:`starting_at` cannot
        stand in for it."""
        if layer < 1:
            raise RetrofitError(f"layer={layer}: no decoder layer below it to capture")
        got: list[Optional[torch.Tensor]] = []
        hook = decoder_layers(self.base)[layer - 1].register_forward_hook(
            lambda m, a, out: got.append(out.detach() if isinstance(out, torch.Tensor) else None))
        try:
            yield got
        finally:
            hook.remove()

    @contextlib.contextmanager
    def starting_at(self, layer: int, hidden: torch.Tensor) -> Iterator[None]:
        """Inside, a forward skips decoder layers ``0..layer-1``: ``hidden`` [B,T,D], the stream
        :meth:`capturing_input_of` captured for the same ids, stands in for their output. Only
        valid while those layers' weights do not change (a table edit: they are frozen)."""
        layers = decoder_layers(self.base)
        saved = [layers[i] for i in range(layer)]
        layers[0] = _Given(hidden)
        for i in range(1, layer):
            layers[i] = _Pass()
        try:
            yield
        finally:
            for i, m in enumerate(saved):
                layers[i] = m

    @contextlib.contextmanager
    def without_engram(self) -> Iterator[None]:
        """Run as the plain base inside this block (the Engram layers are skipped, not zeroed)."""
        prev, self._engram_off = self._engram_off, True
        try:
            yield
        finally:
            self._engram_off = prev

    @contextlib.contextmanager
    def without_lora(self) -> Iterator[None]:
        """Run with LoRA's weights switched off inside this block (Engram stays on)."""
        loras = _lora_layers(self.base)
        for m in loras:
            m.enable_adapters(False)
        try:
            yield
        finally:
            for m in loras:
                m.enable_adapters(True)

    @contextlib.contextmanager
    def base_only(self) -> Iterator[None]:
        """Run as the untouched base inside this block: Engram skipped and LoRA switched off."""
        with self.without_lora(), self.without_engram():
            yield

    def generate(self, prompt_ids: Optional[torch.Tensor] = None, sampling: Optional[SamplingConfig] = None,
                 eos_id: Optional[int] = None, attention_mask: Optional[torch.Tensor] = None,
                 patches: Optional[Sequence[Any]] = None, **hf_kwargs: Any) -> Any:
        """Sample as every model of the library does (``LanguageModel.generate``: ``sampling``,
        ``eos_id``, ``attention_mask`` for left-padded prompts), or, given any of ``transformers``'
        keywords (``max_new_tokens=``, ``do_sample=``, ``input_ids=``, ...), its own
        ``generate()`` of the base with Engram in it (KV cache included)."""
        hf_config = sampling is not None and not isinstance(sampling, SamplingConfig)  # a GenerationConfig
        if hf_kwargs or hf_config:
            if (sampling is not None and not hf_config) or eos_id is not None:
                raise EngramError("generate() takes either sampling=/eos_id= or transformers' keywords "
                                  f"({sorted(hf_kwargs)}), not both")
            if patches is not None:
                raise EngramError("patches= works with the library's sampling (sampling=SamplingConfig(...)), "
                                  "not with transformers' generate keywords; drop one of them")
            if attention_mask is not None:
                hf_kwargs["attention_mask"] = attention_mask
            args = (prompt_ids, sampling) if hf_config else (prompt_ids,) if prompt_ids is not None else ()
            return self.base.generate(*args, **hf_kwargs)
        if prompt_ids is None:
            raise EngramError("generate() needs prompt_ids [batch, time]")
        return generation.generate(self, prompt_ids, sampling or SamplingConfig(), eos_id, attention_mask,
                                   patches=patches)

    def remove_hooks(self) -> None:
        """Detach Engram (and LoRA) from the base model object: it is the unmodified base again."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        _remove_lora(self.base)


def _lora_layers(model: nn.Module) -> list[nn.Module]:
    if not any("lora_" in n for n, _ in model.named_parameters()):
        return []
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def _inject_lora(model: nn.Module, cfg: RetrofitConfig) -> None:
    """LoRA on ``cfg.lora_targets`` of the (frozen) base, in place; B starts at zero, so the
    logits are still the base's exactly."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise RetrofitError("lora_rank > 0 needs peft; install it with pip install peft") from None
    try:
        inject_adapter_in_model(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                                           target_modules=list(cfg.lora_targets)), model)
    except ValueError as e:
        raise RetrofitError(f"lora_targets={list(cfg.lora_targets)}: {str(e).splitlines()[0]}") from None


def _remove_lora(model: nn.Module) -> None:
    """Put every LoRA-wrapped module's original layer back (what ``inject_adapter_in_model`` replaced)."""
    for name, module in list(model.named_modules()):
        base_layer = getattr(module, "base_layer", None)
        if base_layer is None or not any("lora_" in n for n, _ in module.named_parameters()):
            continue
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, base_layer)
    if "peft_config" in vars(model):  # set by inject_adapter_in_model
        del model.peft_config
