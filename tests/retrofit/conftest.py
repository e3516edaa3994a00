"""A tiny randomly initialised Llama saved as a Hugging Face directory, with a dataset of its tokenizer."""

import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="the retrofit tests need the hf extra: pip install 'engram-lm[hf]'")


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, tiny) -> dict:
    """{"base": DIR, "data": DIR}: a 3-layer Llama (hidden 64) over the tiny dataset's BPE tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("retrofit")
    data_dir = tiny.training_dataset(root / "data")
    base = root / "base"
    vocab = tiny.VOCAB  # the BPE of training_dataset() has exactly this many ids
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(base)
    shutil.copyfile(data_dir / "tokenizer.json", base / "tokenizer.json")
    return {"base": Path(base), "data": Path(data_dir)}


@pytest.fixture(scope="session")
def random_retrofit(tiny_base):
    """make(layers=(0, 2)) -> (RetrofitLM, BaseModel): the tiny base with Engram before ``layers``
    and every Engram weight drawn at random (at init Engram adds exact zeros, so nothing it reads
    would show); a fresh model per call."""
    return lambda layers=(0, 2), seed=1, scale=0.3: _random_retrofit(tiny_base["base"], layers, seed, scale)


def _random_retrofit(base_dir, layers, seed: int, scale: float):
    from engram.config import RetrofitConfig
    from engram.hashing.compression import build_compression
    from engram.retrofit.base import load_base
    from engram.retrofit.model import RetrofitLM

    base = load_base(str(base_dir))
    cfg = RetrofitConfig(base=base.name, layers=tuple(layers), rows_per_head=997, n_embed_per_ngram=32,
                         n_head_per_ngram=2)
    model = RetrofitLM(base.model, cfg, build_compression(base.tokenizer).lookup, base.pad_id)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for e in model.engram_layers:
            for p in e.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model, base
