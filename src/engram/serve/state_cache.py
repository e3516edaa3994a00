"""A prompt's generation state saved per block of tokens, so that a prompt that starts like an
earlier one loads the state instead of reading those tokens again ("a save-game file").

Shape legend
    T0 prompt tokens   Bt tokens per block (``block_tokens``)   L decoder layers
    H key/value heads   Dh head dim   R short-conv rows   C conv channels   V vocab

How a prompt is read (``PromptStates.prefill``): its tokens are cut into blocks of ``Bt`` at
positions 0, Bt, 2 Bt, ...; block j's key is a chained hash, ``key_j = sha256(key_{j-1} || ids of
block j)``, whose root ``key_0`` is the *context*: a digest of everything else the state depends
on (the model's weights, the tables' content, the hash configuration, the patches read in the
call, the block size, and the numerics: torch version, device, autocast dtype, thread count).
The deepest block d whose entries 1..d are all stored (and at least one token short of the
prompt's end) is loaded; blocks d+1, ... are read, one call each, and their states stored; the
rest of the prompt (fewer than Bt tokens) is read in one call. A model whose weights, tables or
patches differ has another root, so all its keys differ: its states miss, they are never used.

Exactness: a prompt is always read in this same block schedule, cache or not, so continuing from
a loaded state runs the very same operations on the very same numbers as reading the whole
prompt from its tokens: the logits and every generated token are bit-identical (tests). Reading
the prompt in one call instead of in blocks is another order of floating-point sums, and may
differ from both in the last bits.

What one entry (block j of a prompt) holds: the keys and values of its own Bt positions,
[1,H,Bt,Dh] per layer (a state at depth d is the concatenation of entries 1..d, so the bytes per
cached token do not grow with depth), the block's ids (checked on load), and what decoding needs
after it besides the KV cache:

- ``EngramLM`` (``InferenceCache``): each Engram layer's short-conv state [1,R,C] (the last
  normed inputs), the hash history [1, max_n - 1] (compressed ids of the last tokens) and, for
  the input N-gram baselines, their id history;
- ``RetrofitLM`` (``RetrofitCache``): each Engram layer's short-conv state [1,R,D]; its token
  history is the prompt's own ids, rebuilt on load.

Entries live in an ``engram.serve.state_store.StateStore`` (memory / mmap files / cached),
bounded in bytes with least-recently-used eviction; the blocks of a prompt are marked used from
the deepest to the first, so the first block of a shared prefix is evicted last. One prompt at a
time (batch 1, no padding).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch

from engram.config import SamplingConfig, StateCacheConfig, StateCacheError
from engram.fsutil import PathLike
from engram.model import generation
from engram.model.lm import EngramLM, InferenceCache
from engram.model.table import TABLE_KEY_SUFFIX, LayerOverlay, stack_overlays
from engram.patches.overlay import table_content_fingerprint
from engram.retrofit.model import RetrofitLM
from engram.serve.state_store import StateEntry, StateEntryError, StateStore

KIND_ENGRAM, KIND_RETROFIT = "engram-lm", "retrofit"


def _bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@dataclass
class PrefillReport:
    """How one prompt was read."""

    prompt_tokens: int
    cached_tokens: int = 0  # loaded from stored states
    read_tokens: int = 0  # run through the model
    stored_blocks: int = 0
    refused: list[str] = field(default_factory=list)  # entries that could not be used (messages)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens, "cached_tokens": self.cached_tokens,
                "read_tokens": self.read_tokens, "stored_blocks": self.stored_blocks,
                "refused": list(self.refused), "seconds": self.seconds}


# ----------------------------------------------------------------------------- one model kind each
class _EngramLMStates:
    """Blocks of an ``EngramLM`` ``InferenceCache``."""

    kind = KIND_ENGRAM

    def __init__(self, model: EngramLM) -> None:
        self.model = model

    def block(self, cache: InferenceCache, start: int, end: int) -> dict[str, torch.Tensor]:
        if cache.key_mask is not None or cache.rollback:
            raise StateCacheError("a state can be stored only from a plain cache (no padding, no rollback)")
        out = {}
        for i, kv in enumerate(cache.kv):
            out[f"k.{i}"] = kv.k[:, :, start:end].clone()  # [1,H,Bt,Dh]
            out[f"v.{i}"] = kv.v[:, :, start:end].clone()
        for lid, st in cache.conv.items():
            if st is not None:
                out[f"conv.{lid}"] = st.clone()  # [1,R,C]
        if cache.hash_state is not None:
            out["hash_state"] = cache.hash_state.clone()  # [1, max_n - 1]
        if cache.ngram_hist is not None:
            out["ngram_hist"] = cache.ngram_hist.clone()
        return out

    def restore(self, cache: InferenceCache, entries: Sequence[StateEntry], ids: torch.Tensor) -> None:
        """Fill the fresh ``cache`` with the state after ``ids`` [1,S] from its blocks' entries."""
        S = ids.shape[1]
        dev = cache.kv[0].k.device
        last = {k: v.to(dev, copy=True) for k, v in entries[-1].tensors.items() if not k.startswith(("k.", "v."))}
        for i, kv in enumerate(cache.kv):
            kv.k[:, :, :S] = torch.cat([e.tensors[f"k.{i}"] for e in entries], dim=2).to(dev)
            kv.v[:, :, :S] = torch.cat([e.tensors[f"v.{i}"] for e in entries], dim=2).to(dev)
        for e in self.model.engram_layers:
            cache.conv[e.layer_id] = last.get(f"conv.{e.layer_id}")
        cache.hash_state = last.get("hash_state")
        cache.ngram_hist = last.get("ngram_hist")
        cache.pos = S


class _RetrofitStates:
    """Blocks of a ``RetrofitLM`` cache (the base's ``DynamicCache`` and Engram's state)."""

    kind = KIND_RETROFIT

    def __init__(self, model: RetrofitLM) -> None:
        self.model = model

    def block(self, cache: Any, start: int, end: int) -> dict[str, torch.Tensor]:
        if cache.key_mask is not None:
            raise StateCacheError("a state can be stored only from a plain cache (no padding)")
        layers, state = self.model.cache_tensors(cache)
        out = {}
        for i, (k, v) in enumerate(layers):
            out[f"k.{i}"] = k[:, :, start:end].clone()  # [1,H,Bt,Dh]
            out[f"v.{i}"] = v[:, :, start:end].clone()
        if state is not None:
            for lid, st in state.conv.items():
                if st is not None:
                    out[f"conv.{lid}"] = st.clone()  # [1,R,D]
        return out

    def restore(self, cache: Any, entries: Sequence[StateEntry], ids: torch.Tensor) -> Any:
        dev = ids.device
        n = sum(1 for k in entries[0].tensors if k.startswith("k."))
        layers = [(torch.cat([e.tensors[f"k.{i}"] for e in entries], dim=2).to(dev),
                   torch.cat([e.tensors[f"v.{i}"] for e in entries], dim=2).to(dev)) for i in range(n)]
        last = entries[-1].tensors
        conv = {e.layer_id: (last[f"conv.{e.layer_id}"].to(dev, copy=True) if f"conv.{e.layer_id}" in last else None)
                for e in self.model.engram_layers}
        return self.model.restored_cache(layers, ids.clone(), conv)


def _states_of(model: Any):
    if isinstance(model, EngramLM):
        return _EngramLMStates(model)
    if isinstance(model, RetrofitLM):
        return _RetrofitStates(model)
    raise StateCacheError(f"a state cache works with EngramLM and RetrofitLM models, not {type(model).__name__}")


# ----------------------------------------------------------------------------- fingerprints
def model_weights_digest(model: Any) -> str:
    """sha256 over every tensor of the model's state dict except the Engram tables (name, dtype,
    shape, bytes; offloaded tables are placeholders and skipped too). Unlike the base's digest of
    a retrofit (``engram.retrofit.base.weights_digest``) it covers Engram's and LoRA's weights:
    everything but the tables that changes what the model computes."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if name.endswith(TABLE_KEY_SUFFIX) or t.is_meta:
            continue
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(_bytes(t))
    return h.hexdigest()


def overlays_digest(overlays: dict[int, Any]) -> Optional[str]:
    """Digest of the merged patch overlays a call reads ({layer_id: RowOverlay}); None without."""
    if not overlays:
        return None
    h = hashlib.sha256()
    for lid in sorted(overlays):
        ov = overlays[lid]
        for kind, part in (zip(("rows", "keyed"), ov) if isinstance(ov, LayerOverlay) else [(type(ov).__name__, ov)]):
            if part is None:
                continue
            h.update(f"{lid}:{kind}:{part.values.dtype}:{tuple(part.values.shape)}\n".encode())
            h.update(_bytes(part[0]))
            h.update(_bytes(part.values))
    return h.hexdigest()


def _version_key(model: Any) -> tuple:
    """Changes whenever a tensor of the model is replaced or written in place (a patch applied,
    a training step): then the weights and tables are fingerprinted again."""
    return tuple((n, t.data_ptr(), t._version) for n, t in model.state_dict(keep_vars=True).items() if not t.is_meta)


def block_key(previous: str, block: Sequence[int]) -> str:
    """The chained key of a block: sha256 of the previous key and the block's ids (int64 LE)."""
    return hashlib.sha256(previous.encode() + np.asarray(block, dtype="<i8").tobytes()).hexdigest()


# ----------------------------------------------------------------------------- the cache
class PromptStates:
    """Generation states of prompt prefixes for one model, in ``store`` (see the module docstring).

    ``table_file``: the table file the model's tables are served from, if any (its header gives
    their content fingerprint without reading them)."""

    def __init__(self, model: Any, store: StateStore, block_tokens: int = 64,
                 table_file: Optional[PathLike] = None, warn: bool = True) -> None:
        if block_tokens < 1:
            raise StateCacheError(f"block_tokens={block_tokens} must be >= 1")
        self.model, self.store, self.block_tokens = model, store, int(block_tokens)
        self.table_file, self.warn = table_file, warn
        self.states = _states_of(model)
        self._fingerprint: Optional[tuple[tuple, dict[str, Any]]] = None

    @classmethod
    def from_config(cls, model: Any, cfg: StateCacheConfig, table_file: Optional[PathLike] = None) -> "PromptStates":
        store = StateStore(cfg.path, cfg.storage, cfg.max_bytes, cfg.memory_bytes)
        return cls(model, store, cfg.block_tokens, table_file)

    def _model_fingerprint(self) -> dict[str, Any]:
        version = _version_key(self.model)
        if self._fingerprint is None or self._fingerprint[0] != version:
            hasher = getattr(self.model, "hasher", None)
            fp = {"weights": model_weights_digest(self.model),
                  "tables": (table_content_fingerprint(self.model, "fp32", self.table_file)
                             if hasher is not None else None),
                  "hasher": hasher.fingerprint() if hasher is not None else None}
            self._fingerprint = (version, fp)
        return self._fingerprint[1]

    def context(self, overlays: Optional[dict[int, Any]] = None, device: Optional[torch.device] = None) -> str:
        """The root key for prompts read now with ``overlays`` (see the module docstring)."""
        dev = device or next(self.model.parameters()).device
        autocast = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else None
        installed = {str(e.layer_id): [pid for pid, _ in e.multi_head_embedding.installed]
                     for e in getattr(self.model, "engram_layers", [])}  # keyed patches applied to the model
        record = {"kind": self.states.kind, **self._model_fingerprint(), "patches": overlays_digest(overlays or {}),
                  "installed": installed,
                  "block_tokens": self.block_tokens, "torch": torch.__version__, "device": str(dev),
                  "autocast": str(autocast) if autocast is not None else None, "threads": torch.get_num_threads()}
        return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()

    def keys(self, context: str, ids: Sequence[int]) -> list[str]:
        """Keys of the prompt's whole blocks, first to last."""
        out, prev, B = [], context, self.block_tokens
        for j in range(len(ids) // B):
            prev = block_key(prev, ids[j * B:(j + 1) * B])
            out.append(prev)
        return out

    def _refuse(self, report: PrefillReport, err: StateEntryError) -> None:
        report.refused.append(str(err))
        if self.warn:
            print(f"engram: warning: {err}; reading those tokens instead", file=sys.stderr)

    def _load(self, keys: list[str], usable: int, context: str, ids: list[int],
              report: PrefillReport) -> list[StateEntry]:
        """The entries of the deepest run of stored blocks 1..d (d <= usable), checked."""
        B, entries = self.block_tokens, []
        for j in range(usable):
            try:
                e = self.store.get(keys[j])
                if e is not None:
                    m = e.meta
                    block = ids[j * B:(j + 1) * B]
                    if (m.get("context") != context or m.get("depth") != j + 1 or m.get("kind") != self.states.kind
                            or e.tensors.get("ids") is None or e.tensors["ids"].tolist() != block):
                        self.store.discard(keys[j])
                        raise StateEntryError(f"state cache entry {keys[j][:16]}... was written for another "
                                              f"model, prompt or block size; it was dropped")
            except StateEntryError as err:
                self._refuse(report, err)
                break
            if e is None:
                break
            entries.append(e)
        return entries

    @torch.no_grad()
    def prefill(self, prompt_ids: torch.Tensor, cache: Any, patches: Optional[Sequence[Any]] = None) -> tuple:
        """Read ``prompt_ids`` [1,T0] into ``cache`` (fresh, from ``model.new_cache``), loading the
        deepest stored prefix state and storing the new blocks' states. ``patches``: what the
        model's calls get as ``patches=`` (read by every call, part of the context).

        Returns (the cache, which is ``cache`` unless the model kind rebuilds it; the logits [1,V]
        after the last prompt token; a :class:`PrefillReport`)."""
        t0 = time.perf_counter()
        if prompt_ids.dim() != 2 or prompt_ids.shape[0] != 1:
            raise StateCacheError(f"the state cache reads one prompt at a time ([1, T]), got shape "
                                  f"{tuple(prompt_ids.shape)}; generate the prompts one by one")
        T0, B = int(prompt_ids.shape[1]), self.block_tokens
        if T0 == 0:
            raise StateCacheError("the prompt is empty; give at least one token")
        if cache.pos != 0:
            raise StateCacheError(f"prefill needs a fresh cache, this one holds {cache.pos} positions")
        ids = prompt_ids[0].tolist()
        kw = {} if patches is None else {"patches": patches}
        overlays = stack_overlays(self.model, patches) if patches else {}
        context = self.context(overlays, prompt_ids.device)
        keys = self.keys(context, ids)
        report = PrefillReport(prompt_tokens=T0)
        entries = self._load(keys, (T0 - 1) // B, context, ids, report)
        d = len(entries)
        if d:
            restored = self.states.restore(cache, entries, prompt_ids[:, :d * B])
            cache = restored if restored is not None else cache
        report.cached_tokens = d * B
        logits = None
        for j in range(d, len(keys)):
            logits = self.model(prompt_ids[:, j * B:(j + 1) * B], cache=cache, **kw).logits[:, -1]
            if not self.store.contains(keys[j]):
                tensors = self.states.block(cache, j * B, (j + 1) * B)
                tensors["ids"] = prompt_ids[0, j * B:(j + 1) * B].to(torch.int64).cpu()
                meta = {"context": context, "depth": j + 1, "kind": self.states.kind, "block_tokens": B}
                report.stored_blocks += int(self.store.put(keys[j], {k: v.cpu() for k, v in tensors.items()}, meta,
                                                           newer=keys[j - 1::-1] if j else ()))
        if T0 > len(keys) * B:
            logits = self.model(prompt_ids[:, len(keys) * B:], cache=cache, **kw).logits[:, -1]
        self.store.touch(reversed(keys))  # the first block of a shared prefix is evicted last
        report.read_tokens = T0 - report.cached_tokens
        report.seconds = time.perf_counter() - t0
        return cache, logits, report

    def stats(self) -> dict[str, Any]:
        return {"block_tokens": self.block_tokens, **self.store.stats()}


@torch.no_grad()
def generate_with_states(model: Any, prompt_ids: torch.Tensor, sampling: SamplingConfig, states: PromptStates,
                         eos_id: Optional[int] = None, patches: Optional[Sequence[Any]] = None
                         ) -> tuple[torch.Tensor, PrefillReport]:
    """``engram.model.generation.generate`` for one prompt [1,T0] whose prefix states come from
    (and go to) ``states``; -> ([1, T0 + n], how the prompt was read)."""
    prompt_ids, total = generation.check_prompt(prompt_ids, sampling.max_new_tokens, model.cfg.max_seq_len)
    model.eval()
    step_kw = {} if patches is None else {"patches": [stack_overlays(model, patches)]}
    cache = model.new_cache(prompt_ids.shape[0], total)
    cache, logits, report = states.prefill(prompt_ids, cache, step_kw.get("patches"))
    return generation.sample(model, prompt_ids, logits, cache, sampling, eos_id, step_kw), report
