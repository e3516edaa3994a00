"""Speculative decoding on a retrofitted model: exact rollback, greedy output identical with drafts."""

import torch

from engram.config import DraftConfig, SamplingConfig
from engram.data.shards import load_dataset
from engram.model.generation import generate
from engram.ngram.draft import NgramDrafter
from engram.ngram.index import NgramIndex
from engram.ngram.speculative import EngramTarget, generate_speculative


def test_rolled_back_cache_continues_like_one_that_never_saw_the_dropped_tokens(tiny_base, random_retrofit, one_thread):
    model = random_retrofit()[0]
    ids = torch.as_tensor(load_dataset(tiny_base["data"]).val.tokens[:20].astype("int64"))[None]
    with torch.no_grad():
        a = model.new_cache(1, rollback=4)
        model(ids[:, :10], cache=a)
        model(torch.tensor([[5, 6, 7, 8]]), cache=a)  # rejected draft
        model.truncate_cache(a, 10)
        got = model(ids[:, 10:], cache=a).logits
        b = model.new_cache(1)
        model(ids[:, :10], cache=b)
        want = model(ids[:, 10:], cache=b).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


class _OracleDrafter:
    """Proposes the true greedy continuation (known in advance) at even lengths and the same
    tokens shifted by one at odd lengths: drafts that are accepted and drafts that are rejected."""

    def __init__(self, outputs, k):
        self.outputs, self.cfg = [o[0].tolist() for o in outputs], DraftConfig(max_len=k)

    def propose(self, seq, k=None):
        k = k or self.cfg.max_len
        for out in self.outputs:
            if out[:len(seq)] == list(seq):
                nxt = out[len(seq):len(seq) + k]
                return nxt if len(seq) % 2 == 0 else [(t + 1) % 300 for t in nxt]
        return []


def test_greedy_output_identical_with_and_without_drafts(tiny_base, tmp_path, random_retrofit, one_thread):
    model = random_retrofit()[0]
    ds = load_dataset(tiny_base["data"])
    greedy = SamplingConfig(max_new_tokens=24, temperature=0)
    prompts = [torch.as_tensor(ds.val.tokens[r * 40: r * 40 + 12].astype("int64"))[None] for r in range(3)]
    plain = [generate(model, p, greedy) for p in prompts]
    accepted = rejected = 0
    for k in (2, 4):
        for prompt, want in zip(prompts, plain):
            res = generate_speculative(EngramTarget(model), _OracleDrafter(plain, k), prompt, greedy, progress=False)
            assert torch.equal(res.ids, want)
            accepted += res.accepted
            rejected += res.drafted - res.accepted
    assert accepted > 0 and rejected > 0  # both paths ran
    # and with the real drafter over an index of the corpus
    index = NgramIndex.from_dataset(tmp_path / "idx", tiny_base["data"], progress=False)
    drafter = NgramDrafter(index, DraftConfig(max_len=4, min_count=1, min_prob=0.0))
    for prompt, want in zip(prompts, plain):
        assert torch.equal(generate_speculative(EngramTarget(model), drafter, prompt, greedy, progress=False).ids, want)
