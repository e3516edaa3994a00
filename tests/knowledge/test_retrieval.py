"""Retrieval-augmented prompting: BM25 finds the asked fact's sentences among distractors, the
passages go before the question, and hits, answers and the oracle are counted as they should be."""


import pytest

from engram.data.tokenizer import train_bpe
from engram.knowledge.facts import Fact
from engram.knowledge.retrieval import FactStore, RetrievalError, ask, distractor_sentences, fact_sentences

pytest.importorskip("bm25s", reason="retrieval needs bm25s: pip install 'engram-lm[retrieval]'")

FACTS = [Fact("France", "capital", "Rome"), Fact("Peru", "capital", "Oslo"), Fact("Chad", "capital", "Lima")]
DISTRACTORS = [f"The old king of the land said word {i} to the people of the city." for i in range(40)]


@pytest.fixture(scope="module")
def world():
    text = " ".join(fact_sentences(FACTS[0]) + fact_sentences(FACTS[1]) + DISTRACTORS)
    tok = train_bpe([text] * 3, 400)
    return tok, FactStore(FACTS[:2], DISTRACTORS)  # Chad is not in the store


def test_store_holds_the_facts_sentences_then_the_distractors(world):
    _, store = world
    n = len(fact_sentences(FACTS[0]))
    assert store.owner[:2 * n] == [0] * n + [1] * n and store.owner[2 * n:] == [-1] * len(DISTRACTORS)
    assert all("Rome" in s and "France" in s for s in store.passages[:n])
    top = store.search(["Name the capital of Peru. It is"], k=3)[0]
    assert all(store.owner[j] == 1 for j in top)
    with pytest.raises(RetrievalError, match="k=0"):
        store.search(["x"], k=0)


def test_hits_answers_and_the_oracle(world, stand_in):
    tok, store = world
    # it reads and knows nothing: it answers only when the answer of the fact its question (after
    # the blank line) names is already written in a passage
    model = stand_in(tok, lambda text: any(f.subject in text.split("\n\n")[-1] and text.count(f.answer) >= 2
                                           for f in FACTS))
    none = ask(model, tok, FACTS[:2], 0, store, "test", mode="none")
    assert none["exact"] == 0.0 and none["extra_prompt_tokens"] == 0.0 and none["hit_rate"] is None
    got = ask(model, tok, FACTS[:2], 0, store, "test", mode="retrieval", k=2)
    assert got["hit_rate"] == 1.0 and got["exact"] == 1.0 and got["extra_prompt_tokens"] > 10
    oracle = ask(model, tok, FACTS[:2], 0, store, "dev", mode="oracle")
    assert oracle["exact"] == 1.0 and 0 < oracle["extra_prompt_tokens"] < got["extra_prompt_tokens"]
    outside = ask(model, tok, FACTS[2:], 0, store, "test", mode="retrieval", k=2)  # a fact not stored
    assert outside["hit_rate"] is None and outside["exact"] == 0.0
    with pytest.raises(RetrievalError, match="mode 'rag'"):
        ask(model, tok, FACTS, 0, store, "test", mode="rag")


def test_distractors_are_seeded_sentences_of_the_built_in_text():
    a = distractor_sentences(30, ("bible",), seed=1)
    assert a == distractor_sentences(30, ("bible",), seed=1) != distractor_sentences(30, ("bible",), seed=2)
    assert all(6 <= len(s.split()) <= 60 for s in a)
    with pytest.raises(RetrievalError, match="give only"):
        distractor_sentences(10 ** 7, ("bible",))
