"""The counterfactual fact set: real capitals from the corpus data, edits drawn by seed, the
neighbourhood disjoint from the edits, "known" measured with the held-out questions, files that
read_facts reads."""

import json

import pytest

from engram.data.tokenizer import train_bpe
from engram.knowledge.counterfact import (
    CounterfactError,
    capital_facts,
    known_facts,
    known_fractions,
    make_counterfacts,
    neighbours_path,
    read_counterfacts,
    redraw_answers,
    write_counterfacts,
)
from engram.knowledge.facts import Fact, FactsFileError, read_facts


def test_capital_facts_are_real_unique_and_do_not_repeat_the_country():
    facts = capital_facts()
    assert len(facts) > 150
    by = {f.subject: f.answer for f in facts}
    assert by["France"] == "Paris" and by["Germany"] == "Berlin" and by["the United Kingdom"] == "London"
    assert "Kuwait" not in by and "Singapore" not in by  # the answer repeats the country
    answers = [f.answer for f in facts]
    assert len(set(answers)) == len(answers) and "Kingston" not in answers  # shared by two countries
    assert {f.relation for f in facts} == {"capital"}


def test_counterfacts_are_seeded_other_capitals_with_a_disjoint_neighbourhood():
    known = capital_facts()[:40]
    edits, neigh = make_counterfacts(known, 10, seed=3, n_neighbours=20)
    assert (edits, neigh) == make_counterfacts(known, 10, seed=3, n_neighbours=20)
    assert edits != make_counterfacts(known, 10, seed=4, n_neighbours=20)[0]
    real = {f.answer for f in capital_facts()}
    truth = {f.subject: f.answer for f in known}
    for e in edits:
        assert e.new_answer in real and e.new_answer != e.old_answer and truth[e.subject] == e.old_answer
    assert len(neigh) == 20 and not {f.subject for f in neigh} & {e.subject for e in edits}
    assert set(neigh) <= set(known)
    rest = make_counterfacts(known, 10, seed=3)[1]  # by default every other known fact
    assert len(rest) == 30 and rest[:20] == neigh
    with pytest.raises(CounterfactError, match="n=40 edits of 40 known facts"):
        make_counterfacts(known, 40, seed=0, n_neighbours=5)


def test_later_seeds_redraw_the_answers_of_the_same_subjects():
    known = capital_facts()[:40]
    edits, _ = make_counterfacts(known, 10, seed=3)
    assert redraw_answers(edits, 0) == edits  # seed 0: the file's edits as they are
    one, two = redraw_answers(edits, 1), redraw_answers(edits, 2)
    assert one == redraw_answers(edits, 1) and one != two and one != edits
    real = {f.answer for f in capital_facts()}
    for a, b in zip(edits, one):
        assert (b.subject, b.old_answer) == (a.subject, a.old_answer)
        assert b.new_answer in real and b.new_answer != b.old_answer
    with pytest.raises(CounterfactError, match="no other capital to give"):
        redraw_answers(edits, 1, answers=[edits[0].old_answer])


def test_files_read_as_facts_and_as_counterfacts(tmp_path):
    edits, neigh = make_counterfacts(capital_facts()[:12], 4, seed=0, n_neighbours=5)
    out = tmp_path / "cf.jsonl"
    npath = write_counterfacts(out, edits, neigh)
    assert npath == neighbours_path(out) == tmp_path / "cf.neighbours.jsonl"
    facts, _ = read_facts(out)
    assert facts == [e.edit for e in edits]
    assert read_facts(npath)[0] == neigh
    assert read_counterfacts(out) == edits
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"subject": "France", "relation": "capital", "answer": "Rome"}) + "\n")
    with pytest.raises(FactsFileError, match="old_answer"):
        read_counterfacts(bad)


def test_known_is_measured_on_the_held_out_questions(stand_in):
    facts = [Fact("France", "capital", "Paris"), Fact("Germany", "capital", "Berlin"),
             Fact("Spain", "capital", "Madrid")]
    tok = train_bpe(["The capital of France is Paris. Germany Berlin Spain Madrid city seat name"] * 5, 300)
    model = stand_in(tok, lambda text: any(s in text for s in ("France", "Spain")))
    assert known_fractions(model, tok, facts, pad_id=0) == [1.0, 0.0, 1.0]
    assert known_facts(model, tok, facts, pad_id=0) == [facts[0], facts[2]]
    with pytest.raises(CounterfactError, match="min_fraction=0"):
        known_facts(model, tok, facts, pad_id=0, min_fraction=0)
