"""``engram retrofit facts`` on the tiny Llama: invented facts, four methods, revert checks."""

import json

from engram.cli.main import main
from engram.science.retrofit_facts import RELATIONS, make_facts


def test_invented_facts_are_new_unique_and_asked_in_other_words():
    facts = make_facts(40, seed=3, forbidden="the village of Brathor and Gleimun")
    names = [f.subject for f in facts] + [f.answer for f in facts]
    assert len(set(names)) == len(names) and "Brathor" not in names
    assert {f.relation for f in facts} == set(RELATIONS)
    for f in facts:
        a, b = f.sentences()
        q = f.prompts()
        assert f.answer in a and f.answer in b and q["paraphrase"] not in a + b and a.startswith(q["verbatim"])


def test_facts_command_end_to_end(tiny_base, tmp_path, capsys, one_thread):
    adapter = tmp_path / "a"
    assert main(["retrofit", "train", "--base", str(tiny_base["base"]), "--data", str(tiny_base["data"]),
                 "--layers", "1", "--out", str(adapter), "--table-size", "997", "--n-embed-per-ngram", "32",
                 "--n-head-per-ngram", "2", "--steps", "2", "--batch-size", "2", "--seq-len", "32", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["retrofit", "facts", "--ckpt", str(adapter), "--data", str(tiny_base["data"]), "--out",
                 str(tmp_path / "f"), "--facts", "12", "--steps", "3", "--batch-size", "2", "--seq-len", "16",
                 "--lora-rank", "2", "--general-windows", "2", "--quiet"]) == 0
    res = json.loads((tmp_path / "f" / "result.json").read_text())
    for m in ("engram_patch", "lora", "prompt", "ngram"):
        assert set(res[m]["accuracy"]) == {"paraphrase", "verbatim"}
        assert res[m]["reverts_exactly"] is True, m
    assert res["engram_patch"]["bytes"] > 0 and res["lora"]["bytes"] > 0 and res["prompt"]["kl"] == 0.0
    assert "| Engram patch" in capsys.readouterr().out
