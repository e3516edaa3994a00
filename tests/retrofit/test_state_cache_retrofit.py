"""Prompt states stored per block (``engram.serve.state_cache``) on a retrofitted tiny Llama: the
base's keys and values and Engram's short-conv state load back bit for bit."""

from __future__ import annotations

import pytest
import torch

from engram.config import SamplingConfig
from engram.serve.state_cache import PromptStates, generate_with_states
from engram.serve.state_store import StateStore

pytestmark = pytest.mark.usefixtures("one_thread")

BLOCK = 8
GREEDY = SamplingConfig(temperature=0, max_new_tokens=6)


def _prompt(n: int, vocab: int, seed: int = 3) -> torch.Tensor:
    return torch.randint(2, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("storage", ["mmap", "memory"])
def test_a_loaded_retrofit_state_continues_bit_for_bit(random_retrofit, tmp_path, storage):
    model, _ = random_retrofit(layers=(0, 2))
    ids = _prompt(45, model.cfg.vocab_size)
    ref = PromptStates(model, StateStore(None, "memory", max_bytes=1), BLOCK)  # nothing is ever stored
    _, ref_logits, _ = ref.prefill(ids, model.new_cache(1))
    ref_out, _ = generate_with_states(model, ids, GREEDY, ref)
    states = PromptStates(model, StateStore(None if storage == "memory" else tmp_path, storage), BLOCK)
    _, cold, first = states.prefill(ids, model.new_cache(1))
    _, warm, second = states.prefill(ids, model.new_cache(1))
    assert (first.stored_blocks, second.cached_tokens, second.read_tokens) == (5, 40, 5)
    assert torch.equal(cold, ref_logits) and torch.equal(warm, ref_logits)
    out, report = generate_with_states(model, ids, GREEDY, states)
    assert report.cached_tokens == 40 and torch.equal(out, ref_out)
    assert torch.equal(model.generate(ids, GREEDY), ref_out)  # one-call reading: the same greedy tokens


def test_retrofit_states_of_other_engram_weights_miss(random_retrofit, tmp_path):
    model, _ = random_retrofit(layers=(0, 2), seed=1)
    other, _ = random_retrofit(layers=(0, 2), seed=2)  # same base, other Engram weights and tables
    ids = _prompt(20, model.cfg.vocab_size)
    PromptStates(model, StateStore(tmp_path), BLOCK).prefill(ids, model.new_cache(1))
    assert PromptStates(model, StateStore(tmp_path), BLOCK).prefill(ids, model.new_cache(1))[2].cached_tokens == 16
    assert PromptStates(other, StateStore(tmp_path), BLOCK).prefill(ids, other.new_cache(1))[2].cached_tokens == 0


@pytest.mark.slow
def test_smollm2_state_cache_is_exact(tmp_path):
    """The real SmolLM2-135M with Engram before layers 1 and 10 (random weights, so Engram counts)."""
    from engram.config import RetrofitConfig
    from engram.hashing.compression import build_compression
    from engram.retrofit.base import load_base
    from engram.retrofit.model import RetrofitLM

    base = load_base("smollm2-135m")
    cfg = RetrofitConfig(base="smollm2-135m", layers=(1, 10), rows_per_head=4099)
    model = RetrofitLM(base.model, cfg, build_compression(base.tokenizer).lookup, base.pad_id)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for e in model.engram_layers:
            for p in e.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    ids = _prompt(150, model.cfg.vocab_size)
    ref = PromptStates(model, StateStore(None, "memory", max_bytes=1), 32)
    ref_out, _ = generate_with_states(model, ids, GREEDY, ref)
    states = PromptStates(model, StateStore(tmp_path), 32)
    generate_with_states(model, ids, GREEDY, states)
    _, warm, rep = states.prefill(ids, model.new_cache(1))
    assert rep.cached_tokens == 128 and torch.equal(warm, ref.prefill(ids, model.new_cache(1))[1])
    assert torch.equal(generate_with_states(model, ids, GREEDY, states)[0], ref_out)
