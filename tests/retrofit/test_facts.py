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
    args = ["retrofit", "facts", "--ckpt", str(adapter), "--data", str(tiny_base["data"]), "--out",
            str(tmp_path / "f"), "--facts", "12", "--dev-facts", "4", "--steps", "3", "--batch-size", "2",
            "--seq-len", "16", "--lora-rank", "2", "--general-windows", "2", "--patch-lrs", "1e-3", "1e-1",
            "--lora-lrs", "1e-4", "1e-2", "--lora-targets", "q_proj", "down_proj", "--seeds", "0", "1", "--quiet"]
    assert main(args) == 0
    res = json.loads((tmp_path / "f" / "result.json").read_text())
    for m in ("before", "engram_patch", "lora", "both", "prompt", "ngram"):
        row = res["methods"][m]
        assert len(row["paraphrase"]["per_seed"]) == 2 and 0 <= row["verbatim"]["mean"] <= 1
        assert row["reverts_exactly"] is True, m
    # The first seed tried every lr of each grid; the choice is one of them and the later seed
    # ran only the choice (lrs are chosen on the dev facts, so the test facts never decide).
    runs = tmp_path / "f" / "runs"
    for method, grid in (("engram_patch", (1e-3, 1e-1)), ("lora", (1e-4, 1e-2))):
        assert res["chosen_lr"][method] in grid and len(res["grid"][method]) == 2
        assert len(list(runs.glob(f"{method}-lr*-s1.json"))) == 1
    both = json.loads((runs / "both-s0.json").read_text())
    assert both["targets"] == ["q_proj", "down_proj"]  # LoRA on an attention and an MLP projection
    assert both["patch_lr"] == res["chosen_lr"]["engram_patch"] and both["lr"] == res["chosen_lr"]["lora"]
    assert res["methods"]["engram_patch"]["bytes"] > 0 and res["methods"]["lora"]["bytes"] > 0
    assert res["methods"]["both"]["bytes"] > res["methods"]["lora"]["bytes"]
    assert res["methods"]["prompt"]["kl"] == 0.0 and "engram_patch - lora" in res["paired"]
    assert "| LoRA + Engram patch" in capsys.readouterr().out
    # A rerun reads every measurement back instead of training again.
    stamps = {p: p.stat().st_mtime_ns for p in runs.glob("*.json")}
    assert main(args) == 0
    assert {p: p.stat().st_mtime_ns for p in runs.glob("*.json")} == stamps
    # Other settings in the same directory are refused in one line.
    capsys.readouterr()
    assert main([*args[:-1], "--steps", "4", "--quiet"]) == 2
    assert "other settings" in capsys.readouterr().err


def test_lora_in_the_facts_study_learns_from_the_facts_text(tiny_base, one_thread):
    """The study's LoRA loop trains what it should: the loss on the facts text falls, the LoRA
    weights move, and removing LoRA gives the base's logits back bit for bit."""
    import torch

    from engram.config import RetrofitConfig, RetrofitFactsConfig
    from engram.data.shards import load_dataset
    from engram.patches.trainer import encode_texts
    from engram.retrofit.base import load_base
    from engram.retrofit.model import RetrofitLM
    from engram.science.retrofit_facts import _train_lora, training_texts

    base = load_base(str(tiny_base["base"]), progress=False)
    eos = int(load_dataset(tiny_base["data"]).eos_id)
    facts = make_facts(6, seed=0, forbidden="")
    tokens = torch.as_tensor(encode_texts(training_texts(facts, 0), base.tokenizer, eos))
    x, y = tokens[None, :-1], tokens[None, 1:]
    with torch.no_grad():
        ref = base.model(input_ids=x).logits
    torch.manual_seed(0)
    model = RetrofitLM(base.model, RetrofitConfig(base=base.name, layers=(), lora_rank=8), None, base.pad_id)

    def loss() -> float:
        with torch.no_grad():
            return float(model(x, y).loss)

    before = loss()
    _train_lora(model, tokens.numpy(), RetrofitFactsConfig(facts=6, dev_facts=1, steps=60, batch_size=8, seq_len=32),
                lr=1e-2, seed=0)
    assert loss() < before - 0.1
    assert all(p.abs().sum() > 0 for n, p in model.lora_state().items() if "lora_B" in n)
    model.remove_lora()
    with torch.no_grad():
        assert torch.equal(base.model(input_ids=x).logits, ref)
    model.remove_hooks()
