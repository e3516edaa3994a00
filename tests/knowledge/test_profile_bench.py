"""benchmarks/fact_edit_profile.py on the tiny model: every op's own time lands in exactly one
trainer phase, the set-up in none, and the page reports every round."""

from engram.knowledge.edit_config import FactEditConfig
from engram.knowledge.facts import invent_facts
from engram.knowledge.scoring import fact_cases
from engram.knowledge.templates import chat_format, templates


def test_profile_attributes_each_op_to_one_phase_and_renders(world, one_thread, benchmark_script):
    bench = benchmark_script("fact_edit_profile")
    model, tok = world
    facts = invent_facts(2, seed=0, relations=("capital",))
    train = fact_cases(tok, facts, lambda f: templates(f.relation, "train", ("statement",)), chat_format(tok), True)
    cfg = FactEditConfig(lr=0.3, steps=3, batch_size=4, neutral_windows=2, neutral_len=16, keyed=True)
    r = bench.one_round(model, tok, 0, train, cfg)
    phases = r["phase_seconds_per_step"]
    assert {"forward", "neutral_forward", "backward", "update"} <= set(phases) and "dev_eval" not in phases
    assert all(v >= 0 for v in phases.values()) and sum(phases.values()) > 0
    # the top ops are inside the phases: their times never exceed their phase's
    for o in r["top_ops"]:
        assert o["phase"] in phases and 0 <= o["seconds_per_step"] <= phases[o["phase"]] + 1e-9
    result = {"date": "2026-12-07", "machine": {"cpu": "cpu", "python": "3.11", "torch": "2", "threads": 1},
              "config": {"facts": 2, "train_sentences": len(train), "steps": 3, "rounds": 2, "neutral_windows": 2,
                         "batch_size": 4, "autocast": "off", "keyed": True, "first_engram_layer": None},
              "runs": [r, r]}
    page = bench.page(result, "python benchmarks/fact_edit_profile.py ...")
    assert "| forward |" in page and "| backward |" in page and page.count("%") >= 2 * len(phases)


def test_script_frame_measures_or_renders_and_refuses_half_flags(tmp_path, monkeypatch, capsys):
    import json

    import pytest

    from engram.bench.script import run_script, script_parser

    def measure(a):
        return {"x": 3}

    def page(r, command):
        return f"x = {r['x']}; {command}\n"

    monkeypatch.setattr("sys.argv", ["s.py", "--ckpt", "m", "--out", str(tmp_path / "r.json"),
                                     "--page", str(tmp_path / "p.md")])
    assert run_script(script_parser("doc"), measure, page, "s.py") == 0
    assert json.loads((tmp_path / "r.json").read_text()) == {"x": 3}
    assert (tmp_path / "p.md").read_text().startswith("x = 3; python s.py --ckpt m")
    monkeypatch.setattr("sys.argv", ["s.py", "--from-json", str(tmp_path / "r.json"), "--page", str(tmp_path / "q.md"),
                                     "--page-command", "C"])
    assert run_script(script_parser("doc"), lambda a: pytest.fail("measured"), page, "s.py") == 0
    assert (tmp_path / "q.md").read_text() == "x = 3; C\n"
    monkeypatch.setattr("sys.argv", ["s.py", "--ckpt", "m"])
    with pytest.raises(SystemExit):
        run_script(script_parser("doc"), measure, page, "s.py")
    assert "give --ckpt and --out" in capsys.readouterr().err
