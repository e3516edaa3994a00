"""Rolling a decoding cache back (``new_cache(rollback=k)``, ``EngramLM.truncate_cache``): after
dropping the newest positions, decoding continues exactly as if they had never been fed."""

from __future__ import annotations

import pytest
import torch

from engram.config import InputNgramConfig, preset
from engram.errors import EngramError
from engram.model.lm import EngramLM

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tiny):
    m = tiny.model(seed=1)
    with torch.no_grad():
        for e in m.engram_layers:  # rows and a non-zero conv, so that both show in the output
            e.table.weight.normal_()
            e.short_conv.conv.weight.normal_(std=0.5)
    return m


def _ids(seed: int, n: int, vocab: int = 300) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _decode_with_rollback(model: EngramLM, prompt, kept, rejected, then, k: int = 8):
    """prompt, then kept + rejected in one call, drop the rejected, then ``then`` one at a time."""
    cache = model.new_cache(1, 64, rollback=k)
    model(prompt, cache=cache)
    model(torch.cat([kept, rejected], dim=1), cache=cache)
    n = prompt.shape[1] + kept.shape[1]
    model.truncate_cache(cache, n, torch.cat([prompt, kept], dim=1))
    assert cache.pos == n
    return [model(then[:, i:i + 1], cache=cache).logits for i in range(then.shape[1])], cache


@pytest.mark.parametrize("n_kept,n_rejected", [(0, 1), (1, 3), (3, 5), (0, 8), (5, 2)])
def test_rolled_back_cache_forgets_the_rejected_tokens_bit_for_bit(model, n_kept, n_rejected):
    prompt, block, then = _ids(0, 7), _ids(1, n_kept + n_rejected), _ids(2, 4)
    kept = block[:, :n_kept]
    a, cache_a = _decode_with_rollback(model, prompt, kept, block[:, n_kept:], then)
    b, cache_b = _decode_with_rollback(model, prompt, kept, (block[:, n_kept:] + 17) % 300, then)
    for x, y in zip(a, b):  # what was rejected leaves no trace at all
        assert torch.equal(x, y)
    with torch.no_grad():  # and the states equal those of a cache that never saw the rejected tokens
        ref = model.new_cache(1, 64, rollback=8)
        model(prompt, cache=ref)
        if n_kept:
            model(kept, cache=ref)
        want = [model(then[:, i:i + 1], cache=ref).logits for i in range(then.shape[1])]
    assert torch.equal(cache_a.hash_state, ref.hash_state)
    for lid, st in ref.conv.items():  # the rows the conv reads
        torch.testing.assert_close(cache_a.conv[lid][:, -9:], st[:, -9:], rtol=0, atol=0 if n_kept == 0 else 1e-5)
    for x, y in zip(a, want):
        if n_kept == 0:  # the whole call was dropped: exactly the cache of the prompt alone
            assert torch.equal(x, y)
        else:  # the kept tokens were scored in a longer matmul than one by one: last bits only
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
            assert torch.equal(x.argmax(-1), y.argmax(-1))


def test_rollback_keeps_plain_decoding_unchanged(model):
    """Keeping extra conv rows changes nothing the model computes."""
    prompt, steps = _ids(3, 9), _ids(4, 6)
    outs = []
    with torch.no_grad():
        for k in (0, 8):
            cache = model.new_cache(1, 64, rollback=k)
            first = model(prompt, cache=cache).logits
            outs.append([first] + [model(steps[:, i:i + 1], cache=cache).logits for i in range(6)])
    for x, y in zip(*outs):
        assert torch.equal(x, y)


def test_rollback_with_the_input_ngram_baseline(tiny):
    cfg = preset("tiny", tiny.VOCAB)
    cfg.input_ngram = InputNgramConfig(kind="overencoding", max_ngram_size=3, rows_per_head=101)
    torch.manual_seed(0)
    m = EngramLM(cfg, tiny.compression()).eval()
    prompt, block, then = _ids(5, 6), _ids(6, 4), _ids(7, 2)
    a, _ = _decode_with_rollback(m, prompt, block[:, :1], block[:, 1:], then, k=4)
    b, _ = _decode_with_rollback(m, prompt, block[:, :1], (block[:, 1:] + 5) % 300, then, k=4)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_truncate_refuses_what_it_cannot_undo(model):
    cache = model.new_cache(1, 64, rollback=2)
    with torch.no_grad():
        model(_ids(8, 5), cache=cache)
        model(_ids(9, 3), cache=cache)
    seq = torch.cat([_ids(8, 5), _ids(9, 3)], dim=1)
    with pytest.raises(EngramError, match="rollback=2"):
        model.truncate_cache(cache, 5, seq[:, :5])  # three positions, only two may be dropped
    with pytest.raises(EngramError, match="kept tokens"):
        model.truncate_cache(cache, 6, seq[:, :5])
    with pytest.raises(EngramError, match="rollback=-1"):
        model.new_cache(1, 8, rollback=-1)
    model.truncate_cache(cache, 6, seq[:, :6])
    assert cache.pos == 6
