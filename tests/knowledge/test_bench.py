"""The knowledge benchmark's patch methods on the tiny Engram model: the patch is trained on the
facts' training forms, measured applied, and reverted bit for bit; the floor is what the unedited
model answers."""

import pytest
import torch

from engram.knowledge.bench import Bench, BenchConfig, BenchError
from engram.knowledge.edit_config import FactEditConfig
from engram.knowledge.facts import Fact
from engram.knowledge.retrieval import RetrievalConfig

NEIGHBOURS = [Fact("Peru", "capital", "Lima"), Fact("Chad", "capital", "Ndjamena")]


def test_patch_method_teaches_measures_and_reverts(world, one_thread):
    model, tok = world
    edit = FactEditConfig(lr=0.5, steps=30, batch_size=8, eval_every=10, patience=100, neutral_windows=2,
                          neutral_len=16, kl_weight=0.1, neutral_kl_weight=0.1, kinds=("statement", "cloze"))
    cfg = BenchConfig(methods=("none", "patch"), sets=("new",), facts=3, neighbours=2,
                      retrieval=RetrievalConfig(distractors=50), edit=edit,
                      neutral_windows=2, neutral_len=32)
    bench = Bench(model, tok, 0, cfg, [], NEIGHBOURS)
    tables = {e.layer_id: e.table.weight.detach().clone() for e in model.engram_layers}
    floor = bench.run("new", "none", 0)
    rec = bench.run("new", "patch", 0)
    for e in model.engram_layers:  # measured with the patch applied, then reverted
        assert torch.equal(e.table.weight, tables[e.layer_id])
    assert rec["reverted_bit_for_bit"] is True
    assert rec["efficacy"] > floor["efficacy"]  # the verbatim form is a training form: it is learnt
    assert rec["bytes_per_fact"] > 0 and rec["add_seconds"] > 0 and rec["extra_prompt_tokens"] == 0
    assert 0 <= rec["generalisation"] <= 1 and rec["neutral"]["kl"] >= 0
    assert rec["edit"]["kinds"] == ["statement", "cloze"] and rec["edit"]["keyed"] is False
    keyed = bench.run("new", "keyed-patch", 0)  # the same trainer with entries keyed by N-gram
    assert keyed["edit"]["keyed"] is True and keyed["reverted_bit_for_bit"] is True
    assert keyed["efficacy"] > floor["efficacy"] and keyed["add_seconds"] != rec["add_seconds"]
    for e in model.engram_layers:
        assert torch.equal(e.table.weight, tables[e.layer_id]) and not e.multi_head_embedding.installed
    pytest.importorskip("bm25s", reason="retrieval needs bm25s: pip install 'engram-lm[retrieval]'")
    both = bench.run("new", "patch+retrieval", 0)  # the same patch, passages in the prompt too
    assert both["add_seconds"] == rec["add_seconds"] and both["extra_prompt_tokens"] > 0
    assert 0 <= both["hit_rate"] <= 1 and both["reverted_bit_for_bit"] is True


def test_counterfactual_seeds_are_new_answers_for_the_same_subjects(world, tmp_path):
    from engram.knowledge.counterfact import Counterfact

    model, tok = world
    cfs = [Counterfact("France", "Paris", "Rome"), Counterfact("Spain", "Madrid", "Oslo")]
    cfg = BenchConfig(methods=("none",), sets=("counterfactual",), seeds=(0, 1), facts=2, neighbours=2,
                      neutral_windows=2, neutral_len=32)
    bench = Bench(model, tok, 0, cfg, cfs, NEIGHBOURS)
    assert bench.facts("counterfactual", 0) == [c.edit for c in cfs]  # seed 0: the file's edits
    one = bench.facts("counterfactual", 1)
    assert [f.subject for f in one] == ["France", "Spain"] and one != bench.facts("counterfactual", 0)
    assert one == bench.facts("counterfactual", 1)
    recs = bench.run_all(tmp_path)  # every seed runs, on both fact sets alike
    assert [(r["set"], r["seed"]) for r in recs] == [("counterfactual", 0), ("counterfactual", 1)]


def test_unknown_method_is_refused(world):
    model, tok = world
    with pytest.raises(BenchError, match="unknown"):
        Bench(model, tok, 0, BenchConfig(methods=("lora-ish",)), [], NEIGHBOURS)


def test_the_command_line_offers_the_bench_methods_and_sets():
    from engram.cli.knowledge import BENCH_METHODS, BENCH_SETS
    from engram.knowledge.bench import METHODS, SETS

    assert (BENCH_METHODS, BENCH_SETS) == (METHODS, SETS)  # the CLI keeps torch-free copies for its choices


def test_ngram_memory_method_adds_measures_and_removes(world, world_data, one_thread):
    """The facts' sentences go into an N-gram index over the training text; lambda is chosen on
    dev questions; the verbatim form, which the index now holds, is answered; removing the delta
    gives back the mixture as it was, bit for bit."""
    from engram.knowledge.memory import FactMemoryError, MemoryConfig

    model, tok = world
    cfg = BenchConfig(methods=("none", "ngram"), sets=("new",), facts=3, neighbours=2,
                      retrieval=RetrievalConfig(distractors=50), neutral_windows=2, neutral_len=32,
                      memory=MemoryConfig(data=str(world_data), lambdas=(0.5, 0.9)))
    bench = Bench(model, tok, 0, cfg, [], NEIGHBOURS)
    floor = bench.run("new", "none", 0)
    rec = bench.run("new", "ngram", 0)
    assert set(rec["lambda_dev_exact"]) == {"0.5", "0.9"} and rec["reverted_bit_for_bit"] is True
    assert rec["lambda"] in (None, 0.5, 0.9) and rec["bytes_per_fact"] > 0 and rec["extra_prompt_tokens"] == 0
    assert rec["efficacy"] > floor["efficacy"] and rec["neutral"]["kl"] > 0  # the mixture moves all text a little
    assert rec["index_tokens"] > 1000 and bench._memory.index.deltas == []
    bench._memory.close()
    with pytest.raises(FactMemoryError, match="--ngram-data"):
        Bench(model, tok, 0, BenchConfig(methods=("ngram",), sets=("new",), facts=3, neighbours=2,
                                         retrieval=RetrievalConfig(distractors=50)), [], NEIGHBOURS).run("new", "ngram", 0)


@pytest.mark.parametrize("method", ["patch-composed", "keyed-patch-composed"])
def test_composed_patches_are_read_together_per_call(world, one_thread, method):
    """Two patches, each trained alone on half of the facts, asked together through the serving
    path (nothing written to the tables); each half is also asked with its own patch alone."""
    from engram.knowledge.bench import page_markdown

    model, tok = world
    edit = FactEditConfig(lr=0.5, steps=20, batch_size=8, eval_every=10, patience=100, neutral_windows=2,
                          neutral_len=16, kl_weight=0.1, neutral_kl_weight=0.1, kinds=("statement", "cloze"))
    cfg = BenchConfig(methods=(method,), sets=("new",), facts=4, neighbours=2, retrieval=RetrievalConfig(distractors=50),
                      edit=edit, neutral_windows=2, neutral_len=32)
    tables = {e.layer_id: e.table.weight.detach().clone() for e in model.engram_layers}
    rec = Bench(model, tok, 0, cfg, [], NEIGHBOURS).run("new", method, 0)
    assert len(rec["generalisation_each_alone"]) == 2 and len(rec["best_steps"]) == 2
    assert rec["reverted_bit_for_bit"] is True and rec["edit"]["keyed"] is (method == "keyed-patch-composed")
    assert rec["shared_entries"] >= 0 and rec["bytes_per_fact"] > 0 and 0 <= rec["generalisation"] <= 1
    for e in model.engram_layers:
        assert torch.equal(e.table.weight, tables[e.layer_id]) and not e.multi_head_embedding.installed
    rec.update(set="new", method=method, seed=0)
    assert f"{method} seed 0: held-out" in page_markdown([rec])
