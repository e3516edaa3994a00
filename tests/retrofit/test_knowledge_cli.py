"""`engram knowledge counterfactual`, `rome` and `bench` on the tiny Llama base."""

import json

import pytest

from engram.cli.main import main
from engram.knowledge.counterfact import Counterfact, write_counterfacts
from engram.knowledge.facts import Fact


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


def test_bench_runs_every_method_once_and_resumes(tiny_base, tmp_path, capsys, one_thread):
    pytest.importorskip("bm25s")
    cf = tmp_path / "cf.jsonl"
    write_counterfacts(cf, [Counterfact("France", "Paris", "Rome"), Counterfact("Peru", "Lima", "Oslo")],
                       [Fact("Spain", "capital", "Madrid")])
    out = tmp_path / "bench"
    args = ["knowledge", "bench", "--base", str(tiny_base["base"]), "--counterfactual", str(cf), "--out", str(out),
            "--facts", "2", "--distractors", "50", "--rome-layers", "1", "--rome-steps", "2", "--quiet", "--json"]
    assert main(args) == 0
    recs = json.loads(capsys.readouterr().out)
    assert {(r["set"], r["method"]) for r in recs} == {(s, m) for s in ("counterfactual", "new")
                                                      for m in ("none", "oracle", "retrieval", "rome")}
    for r in recs:
        assert r["reverted_bit_for_bit"] is True and r["facts"] == 2 and 0 <= r["generalisation"] <= 1
        assert r["specificity_before"] == next(x for x in recs if x["method"] == "none")["specificity_before"]
    rome = next(r for r in recs if r["method"] == "rome" and r["set"] == "counterfactual")
    assert rome["bytes_per_fact"] == (64 + 128) * 4 and rome["neutral"]["kl"] >= 0
    retr = next(r for r in recs if r["method"] == "retrieval" and r["set"] == "counterfactual")
    assert 0 <= retr["hit_rate"] <= 1 and retr["extra_prompt_tokens"] > 0
    stamp = {p.name: p.stat().st_mtime_ns for p in (out / "runs").iterdir()}
    assert main(args) == 0  # a rerun reads the run files and runs nothing
    assert {p.name: p.stat().st_mtime_ns for p in (out / "runs").iterdir()} == stamp
    assert "| counterfactual | rome L1 |" in (out / "summary.md").read_text()
    assert main([*args[:-2], "--facts", "1", "--methods", "none", "--quiet"]) == 2  # other settings, same --out
    assert "other settings" in capsys.readouterr().err


def test_bench_lora_trains_with_the_patch_recipe_and_is_removed(tiny_base, tmp_path, capsys, one_thread):
    cf = tmp_path / "cf.jsonl"
    write_counterfacts(cf, [Counterfact("France", "Paris", "Rome"), Counterfact("Peru", "Lima", "Oslo")],
                       [Fact("Spain", "capital", "Madrid")])
    adapter = tmp_path / "adapter"
    assert main(["retrofit", "train", "--base", str(tiny_base["base"]), "--data", str(tiny_base["data"]),
                 "--layers", "1", "--out", str(adapter), "--rows-per-head", "997", "--n-embed-per-ngram", "32",
                 "--n-head-per-ngram", "2", "--steps", "2", "--batch-size", "2", "--seq-len", "32", "--quiet"]) == 0
    capsys.readouterr()
    out = tmp_path / "bench"
    assert main(["knowledge", "bench", "--ckpt", str(adapter), "--counterfactual", str(cf), "--out", str(out),
                 "--facts", "2", "--distractors", "50", "--methods", "none", "lora", "--sets", "counterfactual",
                 "--lora-ranks", "2", "4", "--lora-lrs", "0.05", "--edit-steps", "60", "--edit-eval-every", "20",
                 "--edit-patience", "100",
                 "--edit-kinds", "statement", "cloze", "--edit-neutral-windows", "2", "--edit-neutral-len", "16",
                 "--quiet", "--json"]) == 0
    recs = json.loads(capsys.readouterr().out)
    lora = {r["lora_rank"]: r for r in recs if r["method"] == "lora"}
    none = next(r for r in recs if r["method"] == "none")
    assert sorted(lora) == [2, 4] and lora[4]["bytes_per_fact"] == 2 * lora[2]["bytes_per_fact"]
    for r in lora.values():  # trained on the answers, measured, removed bit for bit
        assert r["reverted_bit_for_bit"] is True and r["efficacy"] >= none["efficacy"]
        assert r["answer_loss_last"] < 0.95 * r["answer_loss_first"] and r["neutral"]["kl"] >= 0
    assert "| counterfactual | lora r2 lr 0.05 |" in (out / "summary.md").read_text()
    page_file = tmp_path / "page.md"
    assert main(["knowledge", "bench", "--out", str(out), "--page", str(page_file), "--page-only",
                 "--page-command", "engram knowledge bench ...", "--page-machine", "test machine"]) == 0
    page = page_file.read_text()
    # a rank's lr is chosen only where some lr answers a dev question (zeros everywhere choose nothing)
    assert ("| lora r4 lr 0.05 (lr chosen on dev) | 0 |" in page) == (lora[4]["best_dev_exact"] > 0)
    assert ("none answers any, so no lr is chosen" in page) == (max(r["best_dev_exact"] for r in lora.values()) == 0)
    assert "Machine: test machine" in page
    assert "LoRA dev questions answered" in page and "lora: weights trained on forms statement+cloze" in page
    assert "LoRA's lr is chosen here on the edited facts' dev questions" in page
