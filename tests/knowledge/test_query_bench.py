"""``engram bench query``: the patch, the retriever and the model alone answer the same held-out
questions in turn; the result and its page carry every round."""

import json

from engram.knowledge.facts import invent_facts


def test_query_bench_times_base_patch_and_retrieval_on_the_same_questions(tiny, tmp_path, capsys, one_thread):
    from engram.cli.main import main

    data = tiny.dataset(tmp_path / "data")
    run = tmp_path / "run"
    tiny.save_run(run, data)
    facts = tmp_path / "facts.jsonl"
    facts.write_text("\n".join(json.dumps({"subject": f.subject, "relation": f.relation, "answer": f.answer})
                               for f in invent_facts(3, seed=1)) + "\n")
    patch = tmp_path / "k.engp"
    assert main(["patch", "train", "--ckpt", str(run), "--facts", str(facts), "--out", str(patch),
                 "--edit-steps", "2", "--edit-eval-every", "2", "--edit-neutral-windows", "2",
                 "--edit-neutral-len", "16", "--edit-keyed", "--quiet"]) == 0
    capsys.readouterr()
    out, page = tmp_path / "q.json", tmp_path / "q.md"
    assert main(["bench", "query", "--ckpt", str(run), "--facts", str(facts), "--patch", str(patch),
                 "--questions", "5", "--repeats", "2", "--distractors", "40", "--max-new-tokens", "2",
                 "--out", str(out), "--page", str(page), "--json"]) == 0
    r = json.loads(out.read_text())
    s = r["summary"]
    assert set(s) == {"base", "patch", "retrieval"} and r["config"]["questions"] == 5
    assert all(len(rd[m]) == 5 for rd in r["rounds_ms"] for m in s) and len(r["rounds_ms"]) == 2
    assert s["base"]["over_base_per_round"] == [1.0, 1.0] and s["base"]["extra_prompt_tokens"] == 0
    assert s["patch"]["extra_prompt_tokens"] == 0 < s["retrieval"]["extra_prompt_tokens"]
    assert all(0 <= x["exact"] <= 1 for x in s.values()) and r["add"]["patch_keyed"]
    text = page.read_text()
    assert "| retrieval |" in text and f"{r['add']['patch_bytes']:,} bytes" in text
    # a missing input is named in one line
    assert main(["bench", "query", "--ckpt", str(run), "--facts", str(facts)]) != 0
    err = capsys.readouterr().err
    assert "--patch" in err and "Traceback" not in err
