"""How much neutral text reads the rows an edit trains: counted the same way as a direct check,
and growing with the number of facts."""

import pytest
import torch

from engram.data.tokenizer import load_tokenizer
from engram.knowledge.collisions import reach, rows_per_token
from engram.knowledge.editor import rows_read


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny):
    data = tiny.dataset(tmp_path_factory.mktemp("kc") / "data")
    tok = load_tokenizer(data / "tokenizer.json")
    torch.manual_seed(0)
    return tiny.model(vocab=tok.get_vocab_size()), tok


def test_rows_per_token_are_the_rows_the_sequence_reads(world):
    model, tok = world
    ids = torch.tensor(tok.encode("The capital of the old kingdom is a city by the sea.").ids)
    per = rows_per_token(model, ids)
    direct = rows_read(model, ids[None])
    for lid, r in per.items():
        assert r.shape[0] == ids.numel() and torch.equal(r.reshape(-1).unique(), direct[lid])


def test_reach_grows_with_the_facts(world, one_thread):
    model, tok = world
    rows = reach(model, tok, [1, 8], kinds=("statement", "cloze"), neutral_tokens=2000)
    small, big = rows
    assert 0 < small["trained_rows"] < big["trained_rows"] <= big["table_rows"]
    assert big["trained_share"] == big["trained_rows"] / big["table_rows"]
    assert 0 < small["tokens_reading_a_trained_row"] <= big["tokens_reading_a_trained_row"] <= 1
    assert 0 < big["reads_of_trained_rows"] <= big["tokens_reading_a_trained_row"]
    for r in rows:  # reading the facts' own N-gram implies reading a trained row
        assert 0 <= r["tokens_reading_a_trained_ngram"] <= r["tokens_reading_a_trained_row"]


def test_text_that_repeats_the_facts_sentences_reads_their_ngrams(world, monkeypatch, one_thread):
    import engram.knowledge.collisions as collisions
    from engram.knowledge.facts import invent_facts
    from engram.knowledge.templates import templates

    model, tok = world
    fact = invent_facts(1, 0)[0]
    sentence = "".join(templates(fact.relation, "train", ("statement",))[0].render(fact.subject, " " + fact.answer))
    monkeypatch.setattr(collisions, "neutral_text", lambda part: (sentence + " ") * 50)
    (r,) = reach(model, tok, [1], kinds=("statement",), neutral_tokens=2000)
    assert r["tokens_reading_a_trained_ngram"] > 0.2  # the subject's and answer's N-grams, every repeat


def test_reach_command(tiny, tmp_path, capsys, one_thread):
    import json

    from engram.cli.main import main

    data = tiny.dataset(tmp_path / "data")
    tiny.save_run(tmp_path / "run", data)
    out = tmp_path / "reach.json"
    assert main(["knowledge", "reach", "--ckpt", str(tmp_path / "run"), "--facts", "1", "4", "--tokens", "500",
                 "--kinds", "statement", "--out", str(out), "--quiet"]) == 0
    assert "| facts | trained rows |" in capsys.readouterr().out
    assert [r["facts"] for r in json.loads(out.read_text())] == [1, 4]
    assert main(["knowledge", "reach", "--ckpt", str(tmp_path / "run"), "--kinds", "poems", "--quiet"]) == 2
    assert "choose one or more of" in capsys.readouterr().err
