"""Hashing with an attention mask: a left-padded row hashes exactly as its unpadded prompt."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engram.config import EngramConfig
from engram.errors import EngramError
from engram.hashing import hasher as hashing
from engram.hashing.hasher import NgramHasher

BACKENDS = ["torch"] + (["native"] if hashing.NATIVE_KERNEL_AVAILABLE else [])
VOCAB = 500


def _hasher(max_n: int, compressed: bool, pad_id: int = 3) -> NgramHasher:
    cfg = EngramConfig(rows_per_head=(211, 307, 401)[:max_n - 1], max_ngram_size=max_n,
                       n_embed_per_ngram=8, n_head_per_ngram=2, layer_ids=(0, 2), pad_id=pad_id,
                       use_compression=compressed)
    return NgramHasher(cfg, VOCAB, np.arange(VOCAB) // 3 if compressed else None)


def _left_padded(lengths, fill: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g) for n in lengths]
    T = max(lengths)
    ids = torch.full((len(lengths), T), fill, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):], mask[b, T - len(p):] = p, 1
    return prompts, ids, mask


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("max_n,compressed", [(2, False), (3, True), (4, True), (4, False)])
def test_left_padded_rows_hash_as_their_unpadded_prompts(backend, max_n, compressed):
    hasher = _hasher(max_n, compressed)
    prompts, ids, mask = _left_padded([1, 7, 3, 12], fill=VOCAB - 1)  # a pad token that is not pad_id
    got = hasher.hash(ids, backend=backend, attention_mask=mask)
    unmasked = hasher.hash(ids, backend=backend)
    T = ids.shape[1]
    for b, p in enumerate(prompts):
        want = hasher.hash_reference(p[None].numpy())
        for lid in got:
            assert got[lid][b, T - len(p):].tolist() == want[lid][0].tolist(), (b, lid)
    short = 0  # the unmasked ids of a padded row differ: the test can fail
    assert any(not torch.equal(got[lid][short], unmasked[lid][short]) for lid in got)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_steps_match_the_masked_batch(backend):
    hasher = _hasher(4, True)
    _, ids, mask = _left_padded([2, 9, 5], fill=0)
    full = hasher.hash(ids, attention_mask=mask)
    for start in (0, 1, 4):  # a prompt of `start` tokens, then one token at a time
        state = hasher.state_from_ids(ids[:, :start], mask[:, :start])
        for t in range(start, ids.shape[1]):
            step, state = hasher.hash_step(state, ids[:, t], backend=backend, attention_mask=mask[:, t])
            for lid in full:
                assert torch.equal(step[lid], full[lid][:, t]), (start, t)
        assert torch.equal(state, hasher.state_from_ids(ids, mask))


def test_all_ones_mask_changes_nothing():
    hasher = _hasher(3, True)
    _, ids, _ = _left_padded([6, 6], fill=0)
    plain = hasher.hash(ids)
    for ones in (torch.ones_like(ids), torch.ones(ids.shape, dtype=torch.bool), np.ones(ids.shape, np.int64)):
        got = hasher.hash(ids, attention_mask=ones)
        assert all(torch.equal(got[lid], plain[lid]) for lid in plain)
    assert torch.equal(hasher.state_from_ids(ids, torch.ones_like(ids)), hasher.state_from_ids(ids))


@pytest.mark.parametrize("mask,match", [
    (torch.ones(2, 5), "dtype"),
    (torch.ones(2, 4, dtype=torch.long), "shape"),
    (torch.full((2, 5), 2), "other than 0 and 1"),
])
def test_bad_masks_are_refused_by_name(mask, match):
    hasher = _hasher(3, False)
    with pytest.raises(EngramError, match=match):
        hasher.hash(torch.zeros(2, 5, dtype=torch.long), attention_mask=mask)
