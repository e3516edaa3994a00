"""`engram knowledge counterfactual` and `engram knowledge rome` on the tiny Llama base."""

import json

from engram.cli.main import main


def test_counterfactual_needs_a_model_that_knows_capitals(tiny_base, tmp_path, capsys, one_thread):
    out = tmp_path / "cf.jsonl"
    assert main(["knowledge", "counterfactual", "--base", str(tiny_base["base"]), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "knows 0 of" in err and "Traceback" not in err and not out.exists()
    assert main(["knowledge", "counterfactual", "--out", str(out)]) == 2
    assert "exactly one of --base" in capsys.readouterr().err


def test_rome_edits_measures_and_reverts(tiny_base, tmp_path, capsys, one_thread):
    out = tmp_path / "rome.json"
    assert main(["knowledge", "rome", "--base", str(tiny_base["base"]), "--subject", "the cat", "--answer", "dog",
                 "--neighbour", "the bird=tree", "--layer", "1", "--steps", "3", "--cov-windows", "2",
                 "--out", str(out), "--quiet"]) == 0
    res = json.loads(out.read_text())
    assert res["reverted_bit_for_bit"] is True and res["bytes"] == (64 + 128) * 4
    assert res["optimisation"]["steps"] >= 1 and res["after"]["neutral"]["kl"] >= 0
    assert len(res["before"]["neighbours"]) == 1 and res["before"]["edit"]["prompt"] == "The capital of the cat is"
    assert "reverted bit for bit: True" in capsys.readouterr().out
    assert main(["knowledge", "rome", "--base", str(tiny_base["base"]), "--subject", "the cat", "--answer", "dog",
                 "--neighbour", "oops", "--quiet"]) == 2
    assert "SUBJECT=ANSWER" in capsys.readouterr().err
