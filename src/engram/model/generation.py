"""Autoregressive sampling with a KV cache and incremental N-gram hashing.

The prompt is processed in one call (batch hashing); each new token then costs one forward of
one position: attention reads the cache, and Engram hashes the token from a tiny rolling state
of the last (max_ngram_size - 1) compressed ids.
"""

from __future__ import annotations

from typing import Optional

import torch

from engram.config import SamplingConfig
from engram.errors import EngramError, RequestTooLargeError
from engram.model.lm import EngramLM


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


@torch.no_grad()
def generate(model: EngramLM, prompt_ids: torch.Tensor, sampling: SamplingConfig,
             eos_id: Optional[int] = None) -> torch.Tensor:
    """prompt_ids [B,T0] -> [B, T0 + n] (stops early once every row has produced ``eos_id``)."""
    prompt_ids, total = check_prompt(prompt_ids, sampling.max_new_tokens, model.cfg.max_seq_len)
    B, T0 = prompt_ids.shape
    model.eval()
    gen = torch.Generator(device=prompt_ids.device).manual_seed(sampling.seed)
    cache = model.new_cache(B, total)
    logits = model(prompt_ids, cache=cache).logits[:, -1]
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
        logits = model(nxt.unsqueeze(1), cache=cache).logits[:, -1]
    return torch.cat(out, dim=1)
