"""The tiny Engram model the knowledge tests edit: random tables of a readable scale."""

import pytest
import torch

from engram.data.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny):
    """(model, tokenizer): the tiny model over the tiny dataset's tokenizer, tables ~ N(0, 0.5)."""
    data = tiny.dataset(tmp_path_factory.mktemp("kn") / "data")
    tok = load_tokenizer(data / "tokenizer.json")
    torch.manual_seed(0)
    model = tiny.model(vocab=tok.get_vocab_size())
    with torch.no_grad():
        for e in model.engram_layers:
            e.table.weight.normal_(std=0.5)
    return model, tok
