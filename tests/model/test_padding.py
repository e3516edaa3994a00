"""Left-padded batches give what each prompt gives alone: hashing, short conv, attention, RoPE."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from engram.config import InputNgramConfig, SamplingConfig, preset
from engram.errors import EngramError
from engram.model.generation import generate, left_pad, strip_padding
from engram.model.lm import EngramLM

VOCAB = 300
LENGTHS = (3, 17, 1, 12)  # differences beyond the short conv's window (3 taps x dilation 3)


def _model(hc_mult: int = 1, input_ngram: bool = False) -> EngramLM:
    cfg = preset("tiny", VOCAB)
    cfg = dataclasses.replace(cfg, hc_mult=hc_mult,
                              engram=dataclasses.replace(cfg.engram, conv_zero_init=False),
                              input_ngram=InputNgramConfig(kind="overencoding", max_ngram_size=3, rows_per_head=97)
                              if input_ngram else None)
    torch.manual_seed(0)
    model = EngramLM(cfg, np.arange(VOCAB) // 2).eval()
    with torch.no_grad():  # the conv starts at zero in real runs; here it must matter
        for e in model.engram_layers:
            e.short_conv.conv.weight.normal_(0, 0.5)
    return model


def _prompts(seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in LENGTHS]


@torch.no_grad()
def _greedy_uncached(model: EngramLM, ids: torch.Tensor, mask, steps: int) -> torch.Tensor:
    """The slow path: the whole sequence through the model for every new token, no cache."""
    for _ in range(steps):
        kw = {} if mask is None else {"attention_mask": mask}
        nxt = model(ids, **kw).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
    return ids


@pytest.mark.parametrize("hc_mult,input_ngram", [(1, False), (2, True)])
def test_batched_greedy_equals_one_at_a_time(hc_mult, input_ngram, one_thread):
    model, prompts = _model(hc_mult, input_ngram), _prompts()
    ids, mask = left_pad(prompts, pad_id=7)
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=10)
    cached = strip_padding(generate(model, ids, sampling, attention_mask=mask), mask, ids.shape[1])
    uncached = strip_padding(_greedy_uncached(model, ids, mask, 10), mask, ids.shape[1])
    for b, p in enumerate(prompts):
        alone = generate(model, torch.tensor([p]), sampling)[0].tolist()
        assert cached[b] == alone, b
        assert uncached[b] == _greedy_uncached(model, torch.tensor([p]), None, 10)[0].tolist() == alone, b


@torch.no_grad()
def test_padded_logits_match_and_padding_is_invisible(one_thread):
    model, prompts = _model(2), _prompts(2)
    ids, mask = left_pad(prompts, pad_id=7)
    T = ids.shape[1]
    logits = model(ids, attention_mask=mask).logits
    other_pad = model(ids.masked_fill(mask == 0, 123), attention_mask=mask).logits
    for b, p in enumerate(prompts):
        alone = model(torch.tensor([p])).logits[0]
        torch.testing.assert_close(logits[b, T - len(p):], alone, rtol=0, atol=1e-5)
        assert torch.equal(other_pad[b, T - len(p):], logits[b, T - len(p):])  # pad tokens never read
    # RoPE is relative, so shifted positions would pass the checks above within rounding;
    # each row's positions must be its own: 0 at its first real token.
    positions = model._padding(mask, ids, None).positions
    for b, p in enumerate(prompts):
        assert positions[b, T - len(p):].tolist() == list(range(len(p)))
    unmasked = model(ids).logits  # without the mask the pads leak in: the test can fail
    assert not torch.allclose(unmasked[0, T - len(prompts[0]):], logits[0, T - len(prompts[0]):], atol=1e-3)


@torch.no_grad()
def test_all_ones_mask_is_bit_identical(one_thread):
    model = _model(2, input_ngram=True)
    ids = torch.tensor(_prompts(3)[1:2] * 2)
    ones = torch.ones_like(ids)
    assert torch.equal(model(ids, attention_mask=ones).logits, model(ids).logits)
    c1, c2 = model.new_cache(2), model.new_cache(2)
    a = [model(ids[:, :5], cache=c1).logits] + [model(ids[:, t:t + 1], cache=c1).logits for t in range(5, 9)]
    b = [model(ids[:, :5], cache=c2, attention_mask=ones[:, :5]).logits] + [
        model(ids[:, t:t + 1], cache=c2, attention_mask=ones[:, t:t + 1]).logits for t in range(5, 9)]
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and c2.key_mask is None


@torch.no_grad()
def test_cache_prefill_in_chunks_and_rollback_keep_padding(one_thread):
    model, prompts = _model(1), _prompts(4)
    ids, mask = left_pad(prompts, pad_id=7)
    full = model(ids, attention_mask=mask).logits
    cache = model.new_cache(len(prompts), rollback=4)
    parts = [model(ids[:, :4], cache=cache, attention_mask=mask[:, :4]).logits]
    parts += [model(ids[:, t:t + 3], cache=cache, attention_mask=mask[:, t:t + 3]).logits for t in range(4, 13, 3)]
    model.truncate_cache(cache, 10, ids[:, :10])  # drop 3 again, then feed the rest
    parts = [torch.cat(parts, dim=1)[:, :10], model(ids[:, 10:], cache=cache, attention_mask=mask[:, 10:]).logits]
    got = torch.cat(parts, dim=1)
    for b, p in enumerate(prompts):
        real = mask[b].bool()
        torch.testing.assert_close(got[b, real], full[b, real], rtol=0, atol=1e-5)


def test_left_pad_and_misuse():
    ids, mask = left_pad([[5, 6], [7]], pad_id=0)
    assert ids.tolist() == [[5, 6], [0, 7]] and mask.tolist() == [[1, 1], [0, 1]]
    assert strip_padding(torch.tensor([[5, 6, 9, 2, 4], [0, 7, 2, 9, 9]]), mask, 2, eos_id=2) == [[5, 6, 9, 2], [7, 2]]
    with pytest.raises(EngramError, match="prompt 1 is empty"):
        left_pad([[1], []])
    model = _model()
    with pytest.raises(EngramError, match="pad prompts on the left"):
        generate(model, torch.tensor([[5, 6]]), SamplingConfig(max_new_tokens=1), attention_mask=torch.tensor([[1, 0]]))
    with pytest.raises(EngramError, match="attention_mask has shape"):
        model(torch.tensor([[5, 6]]), attention_mask=torch.tensor([[1, 0, 1]]))
