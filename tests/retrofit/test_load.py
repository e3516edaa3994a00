"""engram.load / engram.save on a retrofit adapter: the same call as for a run gives base +
adapter, round-trips through save, and satisfies the same model protocol."""

from __future__ import annotations

import pytest
import torch

import engram
from engram.auto.loader import LoadError, ModelKind
from engram.config import RetrofitConfig, SamplingConfig, StorageConfig
from engram.hashing.compression import build_compression
from engram.model.generation import generate
from engram.model.protocol import LanguageModel
from engram.retrofit.adapter import save_adapter
from engram.retrofit.base import load_base
from engram.retrofit.model import RetrofitLM
from engram.tables.runtime import table_runtime

pytestmark = pytest.mark.usefixtures("one_thread")
GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=6)


@pytest.fixture(scope="module")
def saved(tiny_base, tmp_path_factory):
    """(adapter dir, the model it was saved from, ids): Engram weights random, so they matter."""
    base = load_base(str(tiny_base["base"]))
    cfg = RetrofitConfig(base=str(tiny_base["base"]), layers=(0, 2), rows_per_head=997, n_embed_per_ngram=32,
                         n_head_per_ngram=2)
    model = RetrofitLM(base.model, cfg, build_compression(base.tokenizer).lookup, base.pad_id)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for e in model.engram_layers:
            for p in e.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    out = save_adapter(tmp_path_factory.mktemp("adapter") / "a", model, base)
    ids = torch.randint(3, model.cfg.vocab_size, (2, 10), generator=g)
    with torch.no_grad():
        want = model(ids).logits
    model.remove_hooks()  # the base object is shared by every load below: give it back clean
    return out, want, ids


def test_an_adapter_opens_through_the_same_call_as_a_run(saved):
    out, want, ids = saved
    model = engram.load(out)
    try:
        assert isinstance(model, RetrofitLM) and isinstance(model, LanguageModel)
        assert model.loaded_from.kind == ModelKind.ADAPTER and model.loaded_from.tokenizer is not None
        with torch.no_grad():
            assert torch.equal(model(ids).logits, want)
        prompt = ids[:1, :4]
        assert torch.equal(model.generate(prompt, GREEDY), generate(model, prompt, GREEDY))
        hf = model.generate(prompt, max_new_tokens=6, do_sample=False)  # transformers' generate, same hooks
        assert torch.equal(hf, model.generate(prompt, GREEDY))
    finally:
        model.remove_hooks()


def test_an_adapter_round_trips_through_save(saved, tmp_path):
    out, want, ids = saved
    model = engram.load(out)
    try:
        copy = engram.save(model, tmp_path / "b")
    finally:
        model.remove_hooks()
    again = engram.load(copy, storage=StorageConfig(kind="mmap", path=str(copy / "tables.engt"), prefetch=False))
    try:
        assert again.loaded_from.kind == ModelKind.ADAPTER
        with torch.no_grad():
            assert torch.equal(again(ids).logits, want)
        assert (copy / "tables.engt").read_bytes() == (out / "tables.engt").read_bytes()
        with pytest.raises(LoadError, match="served from a file"):
            engram.save(again, tmp_path / "c")
    finally:
        table_runtime(again).close()
        again.remove_hooks()
