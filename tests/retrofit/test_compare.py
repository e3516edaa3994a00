"""``engram retrofit compare`` on the tiny Llama: protocol, lr choice on dev, resume, summary."""

import dataclasses
import json

import pytest

from engram.config import RetrofitCompareConfig, RetrofitError
from engram.science.retrofit import run_compare, splits, summary_markdown


def _cfg(base, **kw):
    return RetrofitCompareConfig(base=str(base), seeds=(0, 1), steps=2, batch_size=2, seq_len=16,
                                 lrs=(1e-2, 3e-2), layers=(1,), rows_per_head=997, lora_rank=2, eval_batches=1, **kw)


def test_compare_runs_every_variant_chooses_lr_on_dev_and_resumes(tiny_base, tmp_path, one_thread):
    cfg = _cfg(tiny_base["base"])
    summary = run_compare(cfg, tiny_base["data"], tmp_path / "cmp", progress=False)
    rows = [json.loads(x) for x in (tmp_path / "cmp" / "results.jsonl").read_text().splitlines()]
    # base once; each trained variant: 2 lrs at seed 0, then seed 1 at the chosen lr
    assert len(rows) == 1 + 3 * 3
    for v in ("engram", "lora", "both"):
        seed0 = {r["lr"]: r["dev_loss"] for r in rows if r["variant"] == v and r["seed"] == 0}
        assert summary["chosen_lr"][v] == min(seed0, key=seed0.get)
        t = summary["table"][v]
        assert t["seeds"] == [0, 1] and t["test_loss"]["n"] == 2 and "forgetting" in t
    assert summary["table"]["lora"]["adapter_bytes"]["mean"] < summary["table"]["engram"]["adapter_bytes"]["mean"]
    assert "engram - lora: test_loss" in summary["tests"] and "both - base: test_loss" in summary["tests"]
    assert "| engram |" in summary_markdown(summary)
    again = run_compare(cfg, tiny_base["data"], tmp_path / "cmp", progress=False)  # nothing left to run
    assert (tmp_path / "cmp" / "results.jsonl").read_text().count("\n") == len(rows)
    assert again["table"] == summary["table"]
    # A third seed extends the comparison (only the new seed's runs train); other settings are refused.
    more = run_compare(dataclasses.replace(cfg, seeds=(0, 1, 2)), tiny_base["data"], tmp_path / "cmp", progress=False)
    assert (tmp_path / "cmp" / "results.jsonl").read_text().count("\n") == len(rows) + 3
    assert more["table"]["engram"]["seeds"] == [0, 1, 2]
    with pytest.raises(RetrofitError, match="only --seeds may change"):
        run_compare(dataclasses.replace(cfg, steps=3), tiny_base["data"], tmp_path / "cmp", progress=False)


def test_splits_are_disjoint_and_general_text_is_not_the_domain(tiny_base):
    from engram.data.shards import load_dataset
    from engram.retrofit.base import load_base

    s = splits(load_dataset(tiny_base["data"]), load_base(str(tiny_base["base"])))
    val = load_dataset(tiny_base["data"]).val
    assert s["dev"].num_tokens + s["test"].num_tokens == val.num_tokens
    assert s["general"].num_tokens > 10_000
