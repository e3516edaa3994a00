"""Autoregressive sampling with a KV cache and incremental N-gram hashing.

The prompt is processed in one call (batch hashing); each new token then costs one forward of
one position: attention reads the cache, and Engram hashes the token from a tiny rolling state
of the last (max_ngram_size - 1) compressed ids.

Several prompts of different lengths run as one batch, left-padded to one length
(``left_pad``) with an attention mask: greedy output equals generating each prompt alone, token
for token (the model keeps padding out of hashing, the short conv, attention and positions).
Sampled output is drawn from the same distributions, but with other random numbers than alone.

Shape legend
    B prompts   T0 padded prompt length   V vocab
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from engram.config import SamplingConfig
from engram.errors import EngramError, RequestTooLargeError
from engram.model.protocol import LanguageModel
from engram.model.table import stack_overlays


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits [B,V] -> logits with the tokens outside top-k / the top-p nucleus set to -inf."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def check_prompt(prompt_ids: torch.Tensor, max_new_tokens: int,
                 max_seq_len: Optional[int]) -> tuple[torch.Tensor, int]:
    """prompt_ids [T0] or [B,T0] -> ([B,T0], T0 + max_new_tokens), refusing an empty prompt and a
    total longer than ``max_seq_len`` (None: no limit) before any work is done."""
    if prompt_ids.dim() == 1:
        prompt_ids = prompt_ids.unsqueeze(0)
    T0 = prompt_ids.shape[1]
    if T0 == 0:
        raise EngramError("the prompt is empty; give at least one token")
    total = T0 + max_new_tokens
    if max_seq_len is not None and total > max_seq_len:
        raise RequestTooLargeError(
            f"prompt ({T0} tokens) + max_new_tokens ({max_new_tokens}) = {total} exceeds "
            f"the model's max_seq_len={max_seq_len}; shorten one of them"
        )
    return prompt_ids, total


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> (ids [B,T0] left-padded with ``pad_id``, attention mask [B,T0] of 0/1
    int64, 0 at the padding), T0 the longest prompt. An empty prompt is refused."""
    if not prompts:
        raise EngramError("no prompts given; give at least one")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise EngramError(f"prompt {i} is empty; give at least one token")
    T0 = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T0), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(prompts), T0), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T0 - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, T0 - len(p):] = 1
    return ids, mask


def strip_padding(out: torch.Tensor, attention_mask: Optional[torch.Tensor], prompt_len: int,
                  eos_id: Optional[int] = None) -> list[list[int]]:
    """Rows of ``generate``'s output [B, T0 + n] -> each row's own tokens: its padding dropped and,
    with ``eos_id``, everything after its first generated ``eos_id``."""
    rows = []
    for b in range(out.shape[0]):
        start = 0 if attention_mask is None else int(prompt_len - int(attention_mask[b].sum()))
        row = out[b].tolist()
        end = len(row)
        if eos_id is not None and eos_id in row[prompt_len:]:
            end = prompt_len + row[prompt_len:].index(eos_id) + 1
        rows.append(row[start:end])
    return rows


@torch.no_grad()
def generate(model: LanguageModel, prompt_ids: torch.Tensor, sampling: SamplingConfig,
             eos_id: Optional[int] = None, attention_mask: Optional[torch.Tensor] = None,
             patches: Optional[Sequence[Any]] = None) -> torch.Tensor:
    """prompt_ids [B,T0] -> [B, T0 + n] (stops early once every row has produced ``eos_id``).

    ``attention_mask`` [B,T0] (1 real, 0 padding) for prompts left-padded to one length
    (``left_pad``); the rows are then generated as if each were alone. ``patches``: read for
    every step of this generation only (``stack_overlays``; merged once here)."""
    prompt_ids, total = check_prompt(prompt_ids, sampling.max_new_tokens, model.cfg.max_seq_len)
    B, T0 = prompt_ids.shape
    if attention_mask is not None:
        if attention_mask.dim() == 1:
            attention_mask = attention_mask.unsqueeze(0)
        if attention_mask.shape != prompt_ids.shape:
            raise EngramError(f"attention_mask has shape {tuple(attention_mask.shape)} but the prompts "
                              f"{tuple(prompt_ids.shape)}; give one 0/1 per prompt token")
        if not bool(attention_mask[:, -1].bool().all()):
            raise EngramError("attention_mask ends in padding; pad prompts on the left (left_pad), "
                              "so that every row's next token follows its last real one")
    model.eval()
    cache = model.new_cache(B, total)
    # the stack merged once for the whole generation; passed on as one {layer_id: RowOverlay}
    step_kw = {} if patches is None else {"patches": [stack_overlays(model, patches)]}
    kw = step_kw if attention_mask is None else {"attention_mask": attention_mask, **step_kw}
    logits = model(prompt_ids, cache=cache, **kw).logits[:, -1]
    return sample(model, prompt_ids, logits, cache, sampling, eos_id, step_kw)


@torch.no_grad()
def sample(model: LanguageModel, prompt_ids: torch.Tensor, logits: torch.Tensor, cache: Any,
           sampling: SamplingConfig, eos_id: Optional[int] = None,
           step_kw: Optional[dict[str, Any]] = None) -> torch.Tensor:
    """The decoding loop after the prompt: ``logits`` [B,V] after prompt_ids [B,T0], ``cache``
    holding the prompt; -> [B, T0 + n]. ``step_kw``: keywords of every one-token call
    (``patches``). Shared by ``generate`` and generation from stored prompt states
    (``engram.serve.state_cache``)."""
    step_kw = step_kw or {}
    B = prompt_ids.shape[0]
    gen = torch.Generator(device=prompt_ids.device).manual_seed(sampling.seed)
    out = [prompt_ids]
    done = torch.zeros(B, dtype=torch.bool, device=prompt_ids.device)
    for _ in range(sampling.max_new_tokens):
        if sampling.temperature == 0:
            nxt = logits.argmax(-1)
        else:
            probs = filter_logits(logits / sampling.temperature, sampling.top_k, sampling.top_p).softmax(-1)
            nxt = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
        out.append(nxt.unsqueeze(1))
        if eos_id is not None:
            done |= nxt == eos_id
            if bool(done.all()):
                break
        logits = model(nxt.unsqueeze(1), cache=cache, **step_kw).logits[:, -1]
    return torch.cat(out, dim=1)
