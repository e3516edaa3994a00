"""The fact-edit study's bookkeeping with a stand-in for the edit: the lr grid is extended while
its best sits at an edge, a choice among zeros is refused, runs resume, the summary is computed."""

import dataclasses
import json
from dataclasses import replace

import pytest
import torch

import engram.science.fact_edit as study
from engram.knowledge.editor import FactEditConfig


def _fake(score_of_lr):
    calls = []

    def measure_edit(model, tok, facts, cfg, neutral, neutral_before, pad_id, *, progress=False, old_answers=None,
                     on_eval=None, train_forms_questions=0):
        calls.append(cfg.lr)
        acc = score_of_lr(cfg.lr)
        rec = {"test_exact": acc, "test_top1": acc, "test_median_first_rank": 1.0, "train_forms_exact": 1.0,
               "dev_exact": acc, "base_test_exact": 0.0, "base_train_forms_exact": 0.0,
               "neutral": {"kl": 0.01, "kl_max": 0.1, "loss_change": 0.001},
               "coverage": {"questions_all": 1.0, "questions_any": 1.0, "rows": 1.0},
               "reverted_bit_exact": True, "seconds": 1.0, "patch_bytes": 100, "bytes_per_fact": 10.0,
               "report": {"steps_run": 10, "answer_loss_first": 5.0, "answer_loss_last": 1.0,
                          "stopped": "time" if cfg.max_seconds else "steps",
                          # runs at the default cap keep their last step (still improving at the cap),
                          # runs given more steps stop early
                          "best_step": cfg.steps if cfg.steps <= FactEditConfig().steps else 5}}
        if old_answers is not None:
            rec["old_answer_test_exact"] = 0.0
        rec.update(train_forms_questions=train_forms_questions or 10, train_forms_given=10)
        return rec

    return measure_edit, calls


def _fake_favouring(setting, favoured):
    """A stand-in whose dev score is higher by 0.1 where ``setting`` of the edit config equals
    ``favoured``; returns it and the list of that setting's values it was called with."""
    fake, _ = _fake(lambda lr: {0.3: 0.5}.get(lr, 0.2))
    seen = []

    def measure_edit(model, tok, facts, cfg, *a, **k):
        seen.append(getattr(cfg, setting))
        rec = fake(model, tok, facts, cfg, *a, **k)
        rec["dev_exact"] += 0.1 * (getattr(cfg, setting) == favoured)
        return rec

    return measure_edit, seen


def tok(data):
    from engram.data.tokenizer import load_tokenizer

    return load_tokenizer(data / "tokenizer.json")


@pytest.fixture
def patched(monkeypatch, tiny, tmp_path):
    data = tiny.dataset(tmp_path / "data")
    monkeypatch.setattr(study, "neutral_windows", lambda tok, part, n, length: torch.zeros(n, length, dtype=torch.long))
    monkeypatch.setattr(study, "logprobs", lambda model, windows: torch.zeros(1))
    monkeypatch.setattr(study, "edit_facts", lambda *a, **k: type("R", (), {"patch": None})())
    monkeypatch.setattr(study, "apply_to_model", lambda *a: None)
    monkeypatch.setattr(study, "revert_from_model", lambda *a: None)
    return data


def test_grid_extends_at_its_edge_then_reports(patched, tmp_path, monkeypatch):
    fake, calls = _fake(lambda lr: min(lr, 1.0) * (1.0 if lr <= 1.0 else 0.5))  # peaks at lr = 1.0
    monkeypatch.setattr(study, "measure_edit", fake)
    cfg = study.FactEditStudyConfig(facts=4, dev_facts=2, seeds=(0, 1, 2), lrs=(0.03, 0.1), capacity=(2,),
                                    update_facts=2, edit=FactEditConfig())
    out = tmp_path / "study"
    s = study.run_study({"a": object()}, tok(patched), 0, patched, out, cfg, log=lambda m: None)
    assert json.loads((out / "chosen.json").read_text())["lr"] == pytest.approx(0.9)  # 0.03, 0.1, 0.3, 0.9, 2.7
    assert sorted(calls[:5]) == pytest.approx([0.03, 0.1, 0.3, 0.9, 2.7])
    assert s["test"]["test_exact"]["runs"] == pytest.approx([0.9] * 3) and s["test"]["p_vs_base"] != 1.0
    assert "control" in s and "update" in s and [c["facts"] for c in s["capacity"]] == [2, 4]
    assert len(s["update"]) == 1 and s["update"][0]["facts"] == [2] and s["update"][0]["seeds"] == [0, 1, 2]
    assert "2 facts, seeds [0, 1, 2])" in (out / "summary.md").read_text()
    assert "Tables-only fact edit" in (out / "summary.md").read_text()
    n = len(calls)
    study.run_study({"a": object()}, tok(patched), 0, patched, out, cfg, log=lambda m: None)  # resumes: nothing reruns
    assert len(calls) == n


def test_a_dev_grid_alone_is_summarised(patched, tmp_path, monkeypatch):
    fake, _ = _fake(lambda lr: 0.1)
    monkeypatch.setattr(study, "measure_edit", fake)
    cfg = study.FactEditStudyConfig(facts=2, dev_facts=2, lrs=(0.1,), edit=FactEditConfig())
    out = tmp_path / "s"
    study.run_study({"a": object()}, tok(patched), 0, patched, out, cfg, phases=("grid",), extend=False,
                    log=lambda m: None)
    s = study.run_study({}, tok(patched), 0, patched, out, cfg, phases=("summary",), log=lambda m: None)
    # the key names each setting that differs from the fixed key base (rows all, five kinds, 16 windows)
    assert [r["key"] for r in s["dev"]] == ["dev-a-lr0.1-rowssubject-nw512-statement+question+cloze+paraphrase+chat+usage+document"]
    assert "test" not in s
    assert "only the dev grid has run" in (out / "summary.md").read_text()


def test_a_choice_among_zeros_is_refused(patched, tmp_path, monkeypatch):
    fake, _ = _fake(lambda lr: 0.0)
    monkeypatch.setattr(study, "measure_edit", fake)
    cfg = study.FactEditStudyConfig(facts=2, dev_facts=2, lrs=(0.1, 0.3), edit=FactEditConfig())
    with pytest.raises(study.StudyError, match="scored 0 on dev"):
        study.run_study({"a": object()}, tok(patched), 0, patched, tmp_path / "s", cfg, log=lambda m: None)


def test_the_command_line_offers_the_study_phases():
    from engram.cli.knowledge import PHASES

    assert PHASES == study.PHASES  # the CLI keeps a torch-free copy for its --phases choices


def test_rows_are_a_dev_choice_and_forms_may_go_uncompared(patched, tmp_path, monkeypatch):
    # "subject" rows score higher at every lr: the choice takes them, with the lr edge checked within them
    fake, calls = _fake(lambda lr: 0.2)
    rows_seen = []

    def by_rows(model, tok, facts, cfg, *a, **k):
        rows_seen.append(cfg.rows)
        rec = fake(model, tok, facts, cfg, *a, **k)
        if cfg.rows == "subject":
            rec["dev_exact"] = {0.1: 0.3, 0.3: 0.5, 1.0: 0.4}.get(cfg.lr, 0.0)
        return rec

    monkeypatch.setattr(study, "measure_edit", by_rows)
    out = tmp_path / "s"
    for rows in ("all", "subject"):
        cfg = study.FactEditStudyConfig(facts=2, dev_facts=2, lrs=(0.1, 0.3, 1.0), edit=FactEditConfig(rows=rows))
        study.run_study({"a": object()}, tok(patched), 0, patched, out, cfg, phases=("grid",), extend=False,
                        log=lambda m: None)
    study.run_study({"a": object()}, tok(patched), 0, patched, out, cfg, phases=("forms",), compare_forms=False,
                    log=lambda m: None)
    chosen = json.loads((out / "chosen.json").read_text())
    assert (chosen["rows"], chosen["lr"], chosen["forms_compared"]) == ("subject", 0.3, False)
    assert len(rows_seen) == 6  # no forms runs
    s = study.run_study({"a": object()}, tok(patched), 0, patched, out, cfg, phases=("test", "summary"),
                        log=lambda m: None)
    assert rows_seen[-1] == "subject"
    assert sorted(r["rows"] for r in s["dev"]) == ["all"] * 3 + ["subject"] * 3
    assert "fewer forms were not compared" in (out / "summary.md").read_text()


def test_a_new_test_recipe_keeps_the_earlier_runs_and_reports_both(patched, tmp_path, monkeypatch):
    fake, calls = _fake(lambda lr: {0.3: 0.5}.get(lr, 0.2))  # peaks inside the grid
    monkeypatch.setattr(study, "measure_edit", fake)
    out = tmp_path / "s"
    cfg = study.FactEditStudyConfig(facts=2, dev_facts=2, lrs=(0.1, 0.3, 1.0), capacity=(1,),
                                    edit=FactEditConfig(rows="subject"))
    study.run_study({"a": object()}, tok(patched), 0, patched, out, cfg, phases=("grid", "forms", "test", "capacity"),
                    extend=False, compare_forms=False, log=lambda m: None)
    n = len(calls)
    more = replace(cfg, edit=replace(cfg.edit, steps=cfg.edit.steps + 200))
    s = study.run_study({"a": object()}, tok(patched), 0, patched, out, more, phases=("test", "summary"),
                        log=lambda m: None)
    assert len(calls) == n + len(cfg.seeds)  # the new recipe's test runs are new runs
    # the earlier capacity run differs from the new test runs in its step cap alone: still the current recipe
    assert [(c["facts"], c["max_steps"], c["current_recipe"]) for c in s["capacity"]] == [
        (1, cfg.edit.steps, True), (2, more.edit.steps, True)]
    assert len(list((out / "runs").glob(f"test-2-seed*-steps{more.edit.steps}*"))) == len(cfg.seeds)
    assert len(s["test"]["test_exact"]["runs"]) == len(cfg.seeds)
    assert [e["recipe"]["steps"] for e in s["earlier"]] == [cfg.edit.steps] and "p_current_vs_this" in s["earlier"][0]
    md = (out / "summary.md").read_text()
    assert "Other recipe" in md and f"| 1 | {cfg.edit.steps} ({cfg.edit.steps}) | - |" in md
    # a capacity run of another setting than the step cap (keyed entries) is marked as another recipe's
    keyed = replace(cfg, edit=replace(cfg.edit, keyed=True))
    study.run_study({"a": object()}, tok(patched), 0, patched, out, keyed, phases=("capacity",), log=lambda m: None)
    s2 = study.run_study({"a": object()}, tok(patched), 0, patched, out, more, phases=("summary",), log=lambda m: None)
    assert sorted((c["facts"], c["current_recipe"]) for c in s2["capacity"]) == [(1, False), (1, True), (2, True)]
    assert f"| 1 | {cfg.edit.steps} ({cfg.edit.steps}) (other recipe) | - |" in (out / "summary.md").read_text()
    # a large capacity run may score a sample of its dev questions: its own key, still the current recipe
    sampled = replace(more, capacity=(3,), edit=replace(more.edit, dev_questions=5))
    study.run_study({"a": object()}, tok(patched), 0, patched, out, sampled, phases=("capacity",), log=lambda m: None)
    assert len(list((out / "runs").glob("capacity-3-seed0-*-devq5*"))) == 1
    s3 = study.run_study({"a": object()}, tok(patched), 0, patched, out, more, phases=("summary",), log=lambda m: None)
    assert [c["current_recipe"] for c in s3["capacity"] if c["facts"] == 3] == [True]
    # a time budget: its own key, still the current recipe, and the page says where it stopped the run
    timed = replace(more, capacity=(4,), train_forms_questions=5, edit=replace(more.edit, max_seconds=60))
    study.run_study({"a": object()}, tok(patched), 0, patched, out, timed, phases=("capacity",), log=lambda m: None)
    assert len(list((out / "runs").glob("capacity-4-seed0-*-maxs60*"))) == 1
    s4 = study.run_study({"a": object()}, tok(patched), 0, patched, out, more, phases=("summary",), log=lambda m: None)
    assert [(c["current_recipe"], c["stopped"], c["steps_run"]) for c in s4["capacity"] if c["facts"] == 4] == [
        (True, "time", 10)]
    md4 = (out / "summary.md").read_text()
    assert f"| 4 | {more.edit.steps}, time at 10 (5) |" in md4 and "| 100.0% (a sample of 5) |" in md4
    assert "| 100.0% | 0.0100 |" in md4  # runs that scored every training form say nothing more
    assert f"of at most {cfg.edit.steps} | {cfg.edit.steps}, " in md and "(3 of 3 still improving at the cap)" in md
    assert f"of at most {more.edit.steps} | 5, 5, 5 (0 of 3 still improving at the cap)" in md
    reach = [{"facts": 2, "trained_rows": 10, "table_rows": 1000, "trained_share": 0.01, "neutral_tokens": 50,
              "tokens_reading_a_trained_row": 0.2, "reads_of_trained_rows": 0.03}]
    (out / "reach.json").write_text(json.dumps(reach))
    page = study.write_results_page(out, tmp_path / "page.md", "engram knowledge study ...", "m").read_text()
    assert "| goal | target | measured | met |" in page and "| 2 | 10 | 1.00% | 20.0% | - | 3.00% |" in page


def test_the_neutral_text_is_a_dev_choice_after_the_forms(patched, tmp_path, monkeypatch):
    # 64 neutral windows score higher on dev than the default 16: the choice takes them and the test
    # runs' keys say so, beside the runs of the default
    by_windows, windows = _fake_favouring("neutral_windows", 64)
    monkeypatch.setattr(study, "measure_edit", by_windows)
    out = tmp_path / "s"
    cfg = study.FactEditStudyConfig(facts=2, dev_facts=2, seeds=(0,), lrs=(0.1, 0.3, 1.0),
                                    edit=FactEditConfig(rows="subject", neutral_windows=16))  # the CLI's start
    study.run_study({"a": object()}, tok(patched), 0, patched, out, cfg, phases=("grid", "forms", "test"),
                    extend=False, compare_forms=False, log=lambda m: None)
    assert json.loads((out / "chosen.json").read_text())["neutral_windows"] == 16  # nothing compared yet
    with_sets = replace(cfg, neutral_sets=(16, 64, 256))
    s = study.run_study({"a": object()}, tok(patched), 0, patched, out, with_sets, phases=("forms", "test", "summary"),
                        compare_forms=False, log=lambda m: None)
    chosen = json.loads((out / "chosen.json").read_text())
    assert (chosen["neutral_windows"], chosen["neutral_compared"]) == (64, [16, 64, 256])
    assert windows[-3:] == [64, 256, 64]  # two dev runs (16 is the forms' run), then the test run
    assert (out / "runs" / "dev-a-lr0.3-rowssubject-nw64-statement+question+cloze+paraphrase+chat+usage+document.json").is_file()
    assert list((out / "runs").glob("test-2-seed0*-nw64-*")) and s["earlier"][0]["recipe"]["neutral_windows"] == 16
    md = (out / "summary.md").read_text()
    assert "neutral text: 256 windows" in md and "**64 windows** of 64 tokens (compared: [16, 64, 256])" in md


def test_keyed_entries_are_a_dev_choice_against_the_chosen_recipe(patched, tmp_path, monkeypatch):
    # keyed entries score higher on dev: the keyed phase runs one dev run beside the chosen one,
    # records the choice, and the test runs (and the summary's main block) are then keyed
    by_keyed, seen = _fake_favouring("keyed", True)
    monkeypatch.setattr(study, "measure_edit", by_keyed)
    out = tmp_path / "s"
    cfg = study.FactEditStudyConfig(facts=2, dev_facts=2, seeds=(0,), lrs=(0.1, 0.3, 1.0),
                                    edit=FactEditConfig(rows="subject", neutral_windows=16))
    study.run_study({"a": object()}, tok(patched), 0, patched, out, cfg, phases=("grid", "forms", "test"),
                    extend=False, compare_forms=False, log=lambda m: None)
    with pytest.raises(study.StudyError, match="no dev run of the chosen recipe"):  # other steps: nothing to compare
        study.run_study({"a": object()}, tok(patched), 0, patched, out, replace(cfg, edit=replace(cfg.edit, steps=7)),
                        phases=("keyed",), log=lambda m: None)
    s = study.run_study({"a": object()}, tok(patched), 0, patched, out, replace(cfg, update_facts=2),
                        phases=("keyed", "test", "update", "summary"), log=lambda m: None)
    chosen = json.loads((out / "chosen.json").read_text())
    assert chosen["keyed"] is True and chosen["keyed_compared"] is True
    # grid x3, the unkeyed test run, keyed dev, keyed test, the keyed update's rewrite and stack
    assert seen == [False, False, False, False, True, True, True, True]
    assert [u["keyed"] for u in s["update"]] == [True] and (out / "runs" / "update-2-seed0-keyed.json").is_file()
    assert (out / "runs" / "dev-a-lr0.3-rowssubject-keyed-statement+question+cloze+paraphrase+chat+usage+document.json").is_file()
    assert s["test"]["keyed"] and not s["earlier"][0].get("keyed")
    md = (out / "summary.md").read_text()
    assert "entries: **keyed by N-gram**" in md and "entries keyed by N-gram" in md
    assert "recipe (N-gram-keyed entries)" in md


def test_the_keyed_lr_grid_is_extended_at_its_edge(patched, tmp_path, monkeypatch):
    fake, _ = _fake(lambda lr: {0.3: 0.5}.get(lr, 0.2))
    lrs = []

    def by_lr(model, tok, facts, cfg, *a, **k):
        rec = fake(model, tok, facts, cfg, *a, **k)
        if cfg.keyed:
            lrs.append(cfg.lr)
            rec["dev_exact"] = min(cfg.lr, 2.7) / 2.7  # keyed entries peak at lr 2.7
        return rec

    monkeypatch.setattr(study, "measure_edit", by_lr)
    out = tmp_path / "s"
    cfg = study.FactEditStudyConfig(facts=2, dev_facts=2, seeds=(0,), lrs=(0.1, 0.3, 1.0), keyed_lrs=(0.9,),
                                    edit=FactEditConfig(rows="subject", neutral_windows=16))
    study.run_study({"a": object()}, tok(patched), 0, patched, out, cfg, phases=("grid", "forms"),
                    extend=False, compare_forms=False, log=lambda m: None)
    notes = []
    study.run_study({"a": object()}, tok(patched), 0, patched, out, cfg, phases=("keyed",), extend=False, log=notes.append)
    assert lrs == [0.3, 0.9] and "no choice made" in notes[-1] and "keyed" not in json.loads((out / "chosen.json").read_text())
    study.run_study({"a": object()}, tok(patched), 0, patched, out, cfg, phases=("keyed",), log=lambda m: None)
    assert lrs == pytest.approx([0.3, 0.9, 2.7, 8.1])  # extended past the edge until the best lies inside
    chosen = json.loads((out / "chosen.json").read_text())
    assert chosen["keyed"] is True and chosen["lr"] == pytest.approx(2.7)
    assert chosen["keyed_lrs"] == pytest.approx([0.3, 0.9, 2.7, 8.1])


def test_keyed_test_runs_are_paired_with_their_hashed_twin():
    """A keyed recipe's test runs are compared, seed by seed, with the same recipe's hashed-row runs."""
    def run(seed, keyed, exact, kl):
        cfg = json.loads(json.dumps(dataclasses.asdict(FactEditConfig(steps=600, keyed=keyed, seed=seed))))
        return {"key": f"test-4-seed{seed}-steps600" + ("-keyed" if keyed else ""), "phase": "test", "seed": seed,
                "facts": 4, "config": cfg, "test_exact": exact, "train_forms_exact": 1.0, "test_top1": exact,
                "base_test_exact": 0.0, "neutral": {"kl": kl, "loss_change": kl}, "bytes_per_fact": 1.0,
                "seconds": 1.0, "coverage": {"questions_all": 1.0, "rows": 1.0}, "reverted_bit_exact": True,
                "report": {"best_step": 100}}

    rows = [run(s, False, 0.5 + 0.1 * s, 0.1 + 0.01 * s) for s in range(3)]
    rows += [run(s, True, 0.45 + 0.1 * s + 0.01 * (s == 1), 0.001) for s in range(3)]
    s = study.summarize(rows, {}, study.FactEditStudyConfig(facts=4))
    keyed = [e for e in s["earlier"] if e["keyed"]]
    assert len(keyed) == 1 and keyed[0]["vs_hashed"]["seeds"] == [0, 1, 2]
    assert keyed[0]["vs_hashed"]["p_exact"] < 0.05 and keyed[0]["vs_hashed"]["p_kl"] < 0.05
    assert "keyed entries vs the same recipe with hashed rows" in study.summary_markdown(s)


def test_a_setting_missing_from_an_older_run_file_reads_as_the_trainer_then_ran():
    """Older run files lack later settings; each stands for what the trainer did before it existed,
    which for rows and the cached top-k is not today's default."""
    assert study._setting({}, "rows") == "all" != FactEditConfig().rows
    assert study._setting({}, "kl_topk") == 0 != FactEditConfig().kl_topk
    assert (study._setting({}, "keyed"), study._setting({}, "autocast"), study._setting({}, "dev_questions")) == (False, "off", 0)
    assert study._setting({}, "lr") == FactEditConfig().lr and study._setting({"rows": "subject"}, "rows") == "subject"
