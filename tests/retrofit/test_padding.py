"""Left-padded batches on a retrofitted tiny Llama: what each prompt gives alone, through
transformers' generate(**tokenizer(prompts, padding=True)) and through engram's generate()."""

import pytest
import torch

from engram.config import RetrofitConfig, SamplingConfig
from engram.hashing.compression import build_compression
from engram.model.generation import generate, left_pad, strip_padding
from engram.retrofit.base import load_base
from engram.retrofit.model import RetrofitLM

PROMPTS = ["the cat", "the big red house near an old tree and the bird", "dog",
           "a mat while the dog ran far away"]
NEW = 12


def _retrofit(tiny_base) -> RetrofitLM:
    base = load_base(str(tiny_base["base"]))
    cfg = RetrofitConfig(base=base.name, layers=(0, 2), rows_per_head=997, n_embed_per_ngram=32, n_head_per_ngram=2)
    model = RetrofitLM(base.model, cfg, build_compression(base.tokenizer).lookup, base.pad_id)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # random Engram weights (zero output at init), conv included
        for e in model.engram_layers:
            for p in e.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def _hf_tokenizer(tiny_base):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(tiny_base["base"] / "tokenizer.json"), padding_side="left")
    tok.pad_token = tok.convert_ids_to_tokens(5)  # not the hashing pad id (0): padding must be masked
    return tok


@pytest.mark.parametrize("use_cache", [True, False])
def test_hf_generate_of_a_padded_batch_equals_one_at_a_time(tiny_base, use_cache, one_thread):
    model, tok = _retrofit(tiny_base), _hf_tokenizer(tiny_base)
    batch = tok(PROMPTS, padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any()  # really padded
    kw = dict(max_new_tokens=NEW, do_sample=False, use_cache=use_cache, pad_token_id=5)
    with torch.no_grad():
        out = model.generate(**batch, **kw)
        T = batch["input_ids"].shape[1]
        for b, text in enumerate(PROMPTS):
            alone = model.generate(**tok([text], return_tensors="pt"), **kw)[0]
            n = int(batch["attention_mask"][b].sum())
            assert out[b, T - n:].tolist() == alone.tolist(), text


@torch.no_grad()
def test_padded_forward_through_the_hooks_matches_each_prompt(tiny_base, one_thread):
    model, tok = _retrofit(tiny_base), _hf_tokenizer(tiny_base)
    batch = tok(PROMPTS, padding=True, return_tensors="pt")
    logits = model.base(**batch).logits  # the hooks read the mask transformers' forward gets
    T = logits.shape[1]
    for b, text in enumerate(PROMPTS):
        alone = model.base(**tok([text], return_tensors="pt")).logits[0]
        torch.testing.assert_close(logits[b, T - alone.shape[0]:], alone, rtol=0, atol=1e-5)


def test_engram_generate_of_a_padded_batch_equals_one_at_a_time(tiny_base, one_thread):
    model, tok = _retrofit(tiny_base), _hf_tokenizer(tiny_base)
    prompts = [tok(t)["input_ids"] for t in PROMPTS]
    ids, mask = left_pad(prompts, pad_id=0)
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=NEW)
    rows = strip_padding(generate(model, ids, sampling, attention_mask=mask), mask, ids.shape[1])
    for p, row in zip(prompts, rows):
        assert row == generate(model, torch.tensor([p]), sampling)[0].tolist()
    with torch.no_grad():  # and the hooks really see the padding: without the mask rows change
        T = ids.shape[1]
        masked = model(ids, attention_mask=mask).logits
        unmasked = model(ids).logits
        assert not torch.allclose(masked[0, T - len(prompts[0]):], unmasked[0, T - len(prompts[0]):], atol=1e-3)
