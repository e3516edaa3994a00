"""The main job runs end to end (a few steps) and reports both models."""

import json

from engram.cli.demo import run_demo


def test_demo_smoke(tmp_path, capsys):
    report = run_demo(workdir=str(tmp_path), steps=2, quiet=True)
    out = capsys.readouterr().out
    assert set(report["results"]) == {"moe", "engram-moe"}
    assert "engram-moe minus moe" in out and "sample:" in out
    assert report["results"]["engram-moe"]["param_counts"]["tables"] > 0
    assert report["results"]["moe"]["param_counts"]["tables"] == 0
    assert json.loads((tmp_path / "demo_result.json").read_text())["sample"] == report["sample"]
