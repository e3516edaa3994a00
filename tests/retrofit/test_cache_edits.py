"""transformers' decoding modes that edit the KV cache, through a retrofitted model: Engram's state
(token history, short-conv rows) follows every crop and reorder, so the output is plain greedy's."""

import copy

import pytest
import torch

from engram.config import RetrofitConfig, RetrofitError
from engram.data.shards import load_dataset
from engram.hashing.compression import build_compression
from engram.retrofit.base import load_base
from engram.retrofit.model import RetrofitLM

SMALL = dict(rows_per_head=997, n_embed_per_ngram=32, n_head_per_ngram=2)


def _model(tiny_base, seed: int = 1, layers=(0, 2)) -> RetrofitLM:
    """A retrofit with random Engram weights (exactly zero at init, which would hide a wrong state)."""
    base = load_base(str(tiny_base["base"]))
    cfg = RetrofitConfig(base=base.name, layers=layers, **SMALL)
    model = RetrofitLM(base.model, cfg, build_compression(base.tokenizer).lookup, base.pad_id)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for e in model.engram_layers:
            for p in e.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def _prompts(tiny_base, n=2, length=12):
    toks = load_dataset(tiny_base["data"]).val.tokens
    return [torch.as_tensor(toks[r * 40:r * 40 + length].astype("int64"))[None] for r in range(n)]


def _greedy(model, prompt, **kw):
    with torch.no_grad():
        return model.generate(prompt, max_new_tokens=24, do_sample=False, **kw)


def test_prompt_lookup_decoding_equals_plain_greedy(tiny_base, one_thread):
    model = _model(tiny_base)
    for prompt in _prompts(tiny_base):
        want = _greedy(model, prompt)
        for k in (2, 10):
            assert torch.equal(_greedy(model, prompt, prompt_lookup_num_tokens=k), want)


def test_prompt_lookup_rejects_drafts_and_crops_the_cache(tiny_base, one_thread, monkeypatch):
    """The test above is only worth something if drafts were both accepted and cut back."""
    from transformers import DynamicCache

    crops = []
    real = DynamicCache.crop

    def crop(self, n):
        crops.append(-n if n < 0 else self.get_seq_length() - n)  # positions dropped
        return real(self, n)

    monkeypatch.setattr(DynamicCache, "crop", crop)
    model = _model(tiny_base)
    prompt = _prompts(tiny_base)[0]
    assert torch.equal(_greedy(model, prompt, prompt_lookup_num_tokens=10), _greedy(model, prompt))
    assert any(c > 0 for c in crops)


def test_assisted_generation_with_a_draft_model_equals_plain_greedy(tiny_base, one_thread):
    target = _model(tiny_base, seed=1)
    # the draft model is another retrofit (its own cache is cropped too) and the plain base
    draft_retrofit = _model(tiny_base, seed=2, layers=(1,))
    plain_base = load_base(str(tiny_base["base"])).model
    for prompt in _prompts(tiny_base):
        want = _greedy(target, prompt)
        for assistant in (draft_retrofit.base, plain_base):
            assert torch.equal(_greedy(target, prompt, assistant_model=assistant), want)
        # and the retrofit as the assistant of its own base
        assert torch.equal(_greedy(plain_base, prompt, assistant_model=draft_retrofit.base),
                           _greedy(plain_base, prompt))


def test_beam_search_equals_beam_search_without_a_cache(tiny_base, one_thread):
    """With a cache the beams are reordered each step and Engram's state must follow them; without
    one every step recomputes Engram from the whole sequence (the reference)."""
    model = _model(tiny_base)
    for prompt in _prompts(tiny_base):
        for beams in (2, 4):
            kw = dict(num_beams=beams, num_return_sequences=beams)
            assert torch.equal(_greedy(model, prompt, **kw), _greedy(model, prompt, use_cache=False, **kw))


def _logits(model, ids, cache):
    with torch.no_grad():
        return model.base(input_ids=ids, use_cache=True, **{model._cache_kwarg: cache}).logits


def test_cache_crop_to_any_length_continues_like_a_fresh_cache(tiny_base, one_thread):
    from transformers import DynamicCache

    model = _model(tiny_base)
    ids = _prompts(tiny_base, n=1, length=30)[0]
    for keep in (3, 10, 14, 17):  # inside the first call, at its end, inside the later ones
        cache = DynamicCache(config=model.base.config)
        _logits(model, ids[:, :10], cache)
        for t in range(10, 18):  # one at a time; from ``keep`` on, other tokens that are cropped away
            _logits(model, ids[:, t:t + 1] if t < keep else torch.tensor([[7 + t]]), cache)
        cache.crop(keep - cache.get_seq_length())  # transformers 5 crops by a negative count
        got = _logits(model, ids[:, keep:], cache)
        want = model(ids).logits[:, keep:]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # a negative crop (drop the newest n) and a deep copy of a cache follow as well
    cache = DynamicCache(config=model.base.config)
    _logits(model, ids[:, :20], cache)
    twin = copy.deepcopy(cache)
    cache.crop(-8)
    torch.testing.assert_close(_logits(model, ids[:, 12:], cache), model(ids).logits[:, 12:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_logits(model, ids[:, 20:], twin), model(ids).logits[:, 20:], rtol=1e-5, atol=1e-5)


def test_reordered_and_repeated_batches_follow(tiny_base, one_thread):
    from transformers import DynamicCache

    model = _model(tiny_base)
    a, b = _prompts(tiny_base, n=2, length=16)
    both = torch.cat([a, b])
    for edit, rows in (("reorder_cache", [1, 0, 1]), ("batch_select_indices", [1])):
        cache = DynamicCache(config=model.base.config)
        _logits(model, both[:, :10], cache)
        getattr(cache, edit)(torch.tensor(rows))
        got = _logits(model, both[rows, 10:], cache)
        torch.testing.assert_close(got, model(both[rows]).logits[:, 10:], rtol=1e-5, atol=1e-5)
    cache = DynamicCache(config=model.base.config)
    _logits(model, both[:, :10], cache)
    cache.batch_repeat_interleave(2)
    rows = [0, 0, 1, 1]
    torch.testing.assert_close(_logits(model, both[rows, 10:], cache), model(both[rows]).logits[:, 10:],
                               rtol=1e-5, atol=1e-5)


def test_a_cache_longer_than_engrams_state_is_refused(tiny_base, one_thread):
    from transformers import DynamicCache

    model = _model(tiny_base)
    ids = _prompts(tiny_base, n=1)[0]
    cache = DynamicCache(config=model.base.config)
    model.remove_hooks()  # filled by the plain base: Engram never saw these positions
    with torch.no_grad():
        model.base(input_ids=ids, use_cache=True, **{model._cache_kwarg: cache})
    model2 = _model(tiny_base)
    with pytest.raises(RetrofitError, match="holds 12 positions"):
        _logits(model2, ids[:, :1], cache)


def test_fact_edit_starting_above_the_frozen_layers_gives_the_reference_patch(random_retrofit, one_thread):
    """A step that starts at the first Engram layer from the captured stream (the frozen layers
    below it skipped) trains the same rows to the same values as computing every layer, for
    hashed rows and keyed entries; the layers are put back after the edit."""
    from engram.knowledge.editor import FactEditConfig, edit_facts
    from engram.knowledge.facts import invent_facts
    from engram.knowledge.scoring import fact_cases
    from engram.knowledge.templates import chat_format, templates
    from engram.retrofit.model import decoder_layers

    model, base = random_retrofit(layers=(2,))
    tok = base.tokenizer
    facts = invent_facts(2, seed=3, relations=("capital",))
    train = fact_cases(tok, facts, lambda f: templates(f.relation, "train", ("statement", "question")),
                       chat_format(tok), True)
    assert len({len(c.ids) for c in train}) > 1  # batches pad
    dev = fact_cases(tok, facts, lambda f: templates(f.relation, "train", ("cloze",)), chat_format(tok))
    layers_before = list(decoder_layers(model.base))
    calls = []
    hook = layers_before[0].register_forward_hook(lambda *a: calls.append(1))
    for keyed in (False, True):
        cfg = FactEditConfig(lr=0.05, steps=3, batch_size=4, neutral_windows=4, neutral_len=16, keyed=keyed,
                             eval_every=1, patience=10)
        calls.clear()  # dev questions scored at every step, from their captured streams too
        fast = edit_facts(model, tok, train, cfg, pad_id=base.pad_id, progress=False, dev_cases=dev)
        fast_calls = len(calls)
        calls.clear()
        edit_facts(model, tok, train, cfg, pad_id=base.pad_id, progress=False)
        assert fast_calls == len(calls) + 1  # dev questions: layer 0 ran once, to capture them in one batch
        calls.clear()
        ref = edit_facts(model, tok, train, cfg, pad_id=base.pad_id, progress=False, skip_prefix=False,
                         skip_unaffected=False, dev_cases=dev)  # the reference: every layer, the head everywhere
        assert [h["dev_nll"] for h in fast.report["history"]] == pytest.approx(
            [h["dev_nll"] for h in ref.report["history"]], rel=1e-5)
        assert len(fast.report["history"]) == 3
        assert fast_calls < len(calls)  # the fast path ran layer 0 only to capture, never in a step
        for lid, lp in ref.patch.layers.items():
            got = fast.patch.layers[lid]
            assert torch.equal(lp.rows, got.rows) and (lp.keys is None or torch.equal(lp.keys, got.keys))
            assert torch.allclose(lp.new.float(), got.new.float(), atol=1e-5)
    hook.remove()
    assert list(decoder_layers(model.base)) == layers_before
