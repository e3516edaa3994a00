"""The tiny Engram model the knowledge tests edit: random tables of a readable scale."""

from types import SimpleNamespace

import pytest
import torch

from engram.data.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def world_data(tmp_path_factory, tiny):
    """The tiny dataset the ``world`` model's tokenizer comes from (its text is what the model
    would have been trained on)."""
    return tiny.dataset(tmp_path_factory.mktemp("kn") / "data")


@pytest.fixture(scope="module")
def world(world_data, tiny):
    """(model, tokenizer): the tiny model over the tiny dataset's tokenizer, tables ~ N(0, 0.5)."""
    data = world_data
    tok = load_tokenizer(data / "tokenizer.json")
    torch.manual_seed(0)
    model = tiny.model(vocab=tok.get_vocab_size())
    with torch.no_grad():
        for e in model.engram_layers:
            e.table.weight.normal_(std=0.5)
    return model, tok


class _StandIn:
    """A stand-in model: every next token right for a sequence whose decoded text ``answers``
    accepts, token 0 everywhere otherwise."""

    def __init__(self, tok, answers):
        self.tok, self.answers, self.training = tok, answers, False

    def eval(self):
        return self

    def train(self, mode=True):
        return self

    def __call__(self, ids, logits_at=None):
        B, T = ids.shape
        logits = torch.zeros(B, T, self.tok.get_vocab_size())
        for b in range(B):
            right = self.answers(self.tok.decode(ids[b].tolist()))
            nxt = torch.cat([ids[b, 1:], ids[b, -1:]]) if right else torch.zeros(T, dtype=torch.long)
            logits[b, torch.arange(T), nxt] = 1.0
        return SimpleNamespace(logits=logits if logits_at is None else logits[logits_at])


@pytest.fixture
def stand_in():
    """make(tok, answers: text -> bool): a :class:`_StandIn` model."""
    return _StandIn
