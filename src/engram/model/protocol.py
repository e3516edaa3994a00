"""What every language model of this library offers, whatever network it is built on.

Shape legend
    B batch   T positions of a call   M residual branches   V vocab   E one Engram row (heads x Dh)

Two classes satisfy :class:`LanguageModel`: ``EngramLM`` (a model trained here, saved as a run
directory) and ``RetrofitLM`` (Engram layers inside a pretrained Hugging Face model, saved as an
adapter directory). ``engram.load`` returns either; the tools that take a loaded model
(evaluation, generation, speculative decoding, the N-gram mixture, gate inspection, patch
training) use only what is declared here, so they never ask which one they were given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol, Sequence, runtime_checkable

import torch
import torch.nn as nn

from engram.config import SamplingConfig
from engram.hashing.hasher import NgramHasher
from engram.model.layer import EngramLayer, GateInputs


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [B,T,V]; [M,V] at the M positions of a forward's ``logits_at`` mask
    loss: Optional[torch.Tensor] = None  # mean cross-entropy, when targets are given
    gates: Optional[dict[int, torch.Tensor]] = None  # output_gates: {layer_id: alpha [B,T,M]}
    gate_inputs: Optional[dict[int, GateInputs]] = None  # output_gate_inputs: {layer_id: (h, e)}


@runtime_checkable
class LanguageModel(Protocol):
    """A causal LM with Engram layers: forward with hash ids, a KV cache that can roll back,
    sampling, and its tables.

    ``cfg`` has at least ``vocab_size``, ``max_seq_len``, ``hidden_size``, ``num_layers``,
    ``hc_mult`` and ``engram`` (an ``EngramConfig``, or None without Engram layers). ``hasher``
    maps token ids to table rows (None without Engram layers).
    """

    cfg: Any
    hasher: Optional[NgramHasher]

    @property
    def engram_layers(self) -> list[EngramLayer]:
        """The Engram layers in depth order; each holds one layer's tables."""

    def table_parameters(self) -> list[nn.Parameter]:
        """The table weights that training updates (empty when the rows are served from a file)."""

    def param_counts(self) -> dict[str, int]:
        """Parameter counts: at least ``total`` and ``tables``."""

    def compute_hash_ids(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None
                         ) -> Optional[dict[int, torch.Tensor]]:
        """input_ids [B,T] -> {layer_id: hash ids [B,T,H]} (None without Engram layers)."""

    def __call__(self, input_ids: torch.Tensor, targets: Optional[torch.Tensor] = None, *,
                 hash_ids: Optional[dict[int, torch.Tensor]] = None, cache: Any = None,
                 output_gates: bool = False, output_gate_inputs: bool = False,
                 ablate_engram: bool = False, attention_mask: Optional[torch.Tensor] = None,
                 patches: Optional[Sequence[Any]] = None, logits_at: Optional[torch.Tensor] = None) -> ModelOutput:
        """input_ids [B,T] -> logits [B,T,V]; with ``cache`` T is the new positions of this call;
        ``attention_mask`` [B,T] (1 real, 0 padding) runs left-padded rows as if each were alone;
        ``patches`` a stack of patches read for this call only (``engram.model.table.stack_overlays``);
        ``logits_at`` [B,T] bool: logits [M,V] at those positions only (the output head skips the rest)."""

    def new_cache(self, batch_size: int, max_len: Optional[int] = None, rollback: int = 0) -> Any:
        """An empty cache; ``rollback`` > 0 lets ``truncate_cache`` drop that many newest positions."""

    def truncate_cache(self, cache: Any, n: int, input_ids: torch.Tensor) -> None:
        """Forget every position from ``n`` on; ``input_ids`` [B,n] are the tokens the cache keeps."""

    def generate(self, prompt_ids: torch.Tensor, sampling: Optional[SamplingConfig] = None,
                 eos_id: Optional[int] = None, attention_mask: Optional[torch.Tensor] = None,
                 patches: Optional[Sequence[Any]] = None) -> torch.Tensor:
        """prompt_ids [B,T0] -> [B, T0 + n] with the KV cache and incremental hashing
        (``attention_mask`` [B,T0] for prompts left-padded to one length; ``patches`` for every step)."""
