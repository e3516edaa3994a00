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
