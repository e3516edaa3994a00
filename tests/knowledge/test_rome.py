"""ROME on a tiny Llama: the rank-one update maps the key to the value and spares keys orthogonal
to it in the covariance metric; an edit makes the model say the new answer; edits revert bit for bit."""

import pytest
import torch

from engram.data.tokenizer import train_bpe
from engram.knowledge.facts import Fact
from engram.knowledge.rome import RomeConfig, RomeEditor, RomeError, down_proj, key_covariance, rank_one_update
from engram.knowledge.scoring import encode_case, score

pytest.importorskip("transformers", reason="ROME's tests build a tiny Llama with transformers")

WORDS = "the capital of france is paris rome berlin germany spain madrid city a land river old new".split()


def test_rank_one_update_writes_the_key_and_spares_c_orthogonal_keys():
    g = torch.Generator().manual_seed(0)
    D, Fd = 6, 10
    w = torch.randn(D, Fd, generator=g)
    a = torch.randn(Fd, 3 * Fd, generator=g)
    cov = (a @ a.T / (3 * Fd)).double()
    key, value = torch.randn(Fd, generator=g), torch.randn(D, generator=g)
    right, left = rank_one_update(w, key, value, cov)
    new = w + torch.outer(right, left)
    assert torch.allclose(new @ key, value, atol=1e-4)
    other = torch.randn(Fd, generator=g).double()
    cinv_k = torch.linalg.solve(cov, key.double())
    other = (other - (other @ cinv_k) / (cinv_k @ cinv_k) * cinv_k).float()  # other . C^-1 k* = 0
    assert abs(float(other.double() @ cinv_k)) < 1e-5
    assert torch.allclose(new @ other, w @ other, atol=1e-4)
    assert not torch.allclose(new @ torch.randn(Fd, generator=g), w @ torch.randn(Fd, generator=g), atol=1e-3)


@pytest.fixture(scope="module")
def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = train_bpe([" ".join(WORDS)] * 20, 300)
    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=1,
                      initializer_range=0.3)  # large enough weights that one MLP output can move the logits
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval().requires_grad_(False)
    windows = torch.randint(2, tok.get_vocab_size(), (8, 32), generator=torch.Generator().manual_seed(1))
    return model, tok, windows


def test_key_covariance_is_the_keys_second_moment(llama):
    model, _, windows = llama
    keys = []
    h = down_proj(model, 1).register_forward_pre_hook(lambda m, a: keys.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(windows)  # the slow reference: every key of a full forward
    h.remove()
    k = torch.cat(keys).double()
    assert torch.allclose(key_covariance(model, 1, windows), k.T @ k / k.shape[0], atol=1e-8)


def test_edit_says_the_new_answer_and_reverts_bit_for_bit(llama, one_thread):
    model, tok, windows = llama
    cfg = RomeConfig(layer=1, steps=40, prefix_tokens=2, weight_decay=0.0, clamp=1e3)
    ed = RomeEditor(model, tok, cfg, cov_windows=windows)
    w0 = down_proj(model, 1).weight.clone()
    rome, madrid = Fact("france", "capital", "rome"), Fact("germany", "capital", "madrid")
    # the prompt ends in the subject: in a random tiny model the edit's own position carries it best
    case = encode_case(tok, "The capital of france", "rome")
    before = score(model, [case], 0)["exact"]
    e1 = ed.edit(rome, prompt="The capital of france")
    assert e1.stats["nll_optimised"] < e1.stats["nll_before"]
    assert score(model, [case], 0)["exact"] == 1.0 and before == 0.0
    assert e1.nbytes == (32 + 64) * 4
    w1 = down_proj(model, 1).weight.clone()
    ed.edit(madrid, prompt="The capital of germany")
    assert not torch.equal(down_proj(model, 1).weight, w1)
    ed.revert()
    assert torch.equal(down_proj(model, 1).weight, w1)
    ed.revert_all()
    assert torch.equal(down_proj(model, 1).weight, w0)
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(RomeError, match="cannot revert"):
        ed.revert()


def test_bad_layer_and_missing_text_are_one_line_errors(llama, one_thread):
    model, tok, windows = llama
    with pytest.raises(RomeError, match="layer=7 out of range"):
        RomeEditor(model, tok, RomeConfig(layer=7), cov_windows=windows)
    with pytest.raises(RomeError, match="cov_windows"):
        RomeEditor(model, tok, RomeConfig(layer=0))
    ed = RomeEditor(model, tok, RomeConfig(layer=0, prefix_tokens=0), cov_windows=windows)
    with pytest.raises(RomeError, match="subject must occur"):
        ed.compute(Fact("france", "capital", "rome"), prompt="The capital city is")


def test_bench_runs_rome_per_layer_with_its_accumulation_curve(llama, one_thread, tmp_path):
    """One run per layer in --rome-layers; each measures the edits so far after 1, 2 and all 3
    edits, answers dev questions for the layer choice, and reverts bit for bit."""
    from types import SimpleNamespace

    from engram.knowledge.bench import Bench, BenchConfig, page_markdown
    from engram.knowledge.retrieval import RetrievalConfig

    model, tok, _ = llama
    edits = [Fact("france", "capital", "rome"), Fact("germany", "capital", "madrid"), Fact("spain", "capital", "berlin")]
    cfg = BenchConfig(methods=("rome",), sets=("counterfactual",), facts=3, neighbours=1, rome_layers=(0, 2),
                      rome=RomeConfig(steps=3, prefix_tokens=0, cov_windows=2, cov_window_len=16),
                      rome_curve=(1, 2), retrieval=RetrievalConfig(distractors=10), neutral_windows=2, neutral_len=16)
    w0 = [down_proj(model, i).weight.clone() for i in (0, 2)]
    bench = Bench(model, tok, 0, cfg, [SimpleNamespace(edit=f) for f in edits], [Fact("italy", "capital", "rome")])
    recs = bench.run_all(tmp_path)
    assert [r["layer"] for r in recs] == [0, 2]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["counterfactual-rome-L0-s0.json",
                                                                    "counterfactual-rome-L2-s0.json"]
    for r in recs:
        assert [c["edits"] for c in r["curve"]] == [1, 2, 3] and r["reverted_bit_for_bit"] is True
        assert r["efficacy"] == r["curve"][-1]["efficacy"] and 0 <= r["dev_exact"] <= 1
    assert all(torch.equal(down_proj(model, i).weight, w) for i, w in zip((0, 2), w0))
    page = page_markdown(recs)
    assert "ROME at layer 0 (seed 0), as edits accumulate" in page and "| 3 |" in page
    assert "ROME dev questions answered (the layer choice)" in page


def test_rome_layer_choice_is_the_best_dev_layer_and_none_when_all_answer_nothing():
    from engram.knowledge.bench import _dev_choices

    def run(layer, dev, kl=0.1):
        return {"method": "rome", "layer": layer, "seed": 0, "dev_exact": dev, "neutral": {"kl": kl}}

    assert _dev_choices([run(2, 0.1), run(4, 0.3), run(6, 0.2)]) == {"rome L4"}
    assert _dev_choices([run(2, 0.3, kl=0.5), run(4, 0.3, kl=0.2)]) == {"rome L4"}  # a tie goes to the lower KL
    assert _dev_choices([run(2, 0.0), run(4, 0.0, kl=0.01)]) == set()  # zeros everywhere: no choice


def test_lora_lr_choice_is_per_rank_and_none_when_all_answer_nothing():
    from engram.knowledge.bench import _dev_choices

    def run(rank, lr, dev):
        return {"method": "lora", "lora_rank": rank, "lora_lr": lr, "seed": 0, "best_dev_exact": dev,
                "neutral": {"kl": 0.1}}

    assert _dev_choices([run(8, 1e-3, 0.5), run(8, 1e-2, 0.7), run(2, 1e-3, 0.2)]) == {"lora r8 lr 0.01",
                                                                                      "lora r2 lr 0.001"}
    assert _dev_choices([run(8, 1e-3, 0.0), run(8, 1e-2, 0.0)]) == set()


def test_page_pairs_the_patch_with_the_dev_chosen_lora_and_retrieval_by_seed():
    from engram.knowledge.bench import page_markdown

    def run(method, seed, held, **kw):
        return {"set": "new", "method": method, "seed": seed, "facts": 2, "neighbours": 1, "specificity_before": 1.0,
                "efficacy": 1.0, "generalisation": held, "specificity": 1.0, "neutral": {"kl": 0.01 * (seed + 1)}, **kw}

    lora = dict(lora_rank=8, best_dev_exact=0.9)
    recs = [run("keyed-patch", s, h) for s, h in ((0, 0.5), (1, 0.6), (2, 0.8))]
    recs += [run("lora", s, h, lora_lr=1e-3, **lora) for s, h in ((0, 0.9), (1, 0.95), (2, 0.9))]
    recs += [run("lora", 0, 0.1, lora_lr=1e-2, **{**lora, "best_dev_exact": 0.2})]  # not chosen: never paired
    recs += [run("retrieval", 0, 0.5)]  # one shared seed: no test
    recs += [run("patch", s, h) for s, h in ((0, 0.3), (1, 0.4), (2, 0.5))]  # the hashed patch: keyed against it
    for i, r in enumerate(recs[:7]):  # the retrieval run (index 7) records no wall time
        r["wall_seconds"] = 600.0 * (i + 1)
    for r in recs[8:]:
        r["wall_seconds"] = 0.0
    page = page_markdown(recs)
    assert "Wall time of the runs on this page: 4.67 hours in all, the sum of each of 10 runs' own seconds (new facts " \
           "4.67 h;" in page and "; 1 runs recorded no wall time." in page
    line = next(x for x in page.splitlines() if x.startswith("- keyed-patch against lora r8 lr 0.001"))
    assert "seeds 0, 1, 2: held-out 63.3% against 91.7% (p = " in line and "neutral KL 0.0200 against 0.0200" in line
    assert "against lora r8 lr 0.01" not in page and "against retrieval" not in page
    line = next(x for x in page.splitlines() if x.startswith("- keyed-patch against patch,"))
    assert "held-out 63.3% against 40.0% (p = " in line and "neutral KL" in line
    assert "- patch against lora r8 lr 0.001" in page and "against patch+retrieval" not in page


def test_dev_choice_compares_the_grid_seeds_and_pairs_the_chosen_rome():
    """A candidate later run on more seeds is compared on the seeds every candidate ran (here its
    seed-1 dev answers would pull its mean below the others'); equal fractions tie exactly, the
    lower KL breaks the tie, and the chosen ROME layer is paired with the patch by seed."""
    from engram.knowledge.bench import _dev_choices, page_markdown

    def run(method, seed, dev, kl, held=0.0, **kw):
        return {"set": "new", "method": method, "seed": seed, "facts": 2, "neighbours": 1, "specificity_before": 1.0,
                "efficacy": 1.0, "generalisation": held, "specificity": 1.0, "dev_exact": dev, "neutral": {"kl": kl},
                **kw}

    rs = {"settings": {"rome": {"steps": 20}}}
    rome = [run("rome", 0, 1 / 44, 0.013, layer=1, **rs), run("rome", 0, 1 / 44, 0.010, layer=2, **rs),
            run("rome", 1, 0.0, 0.012, layer=2, **rs), run("rome", 2, 0.0, 0.015, layer=2, **rs)]
    assert _dev_choices(rome) == {"rome L2"}  # on seed 0: a tie at 1 of 44, L2's KL is lower
    patch = [run("keyed-patch", s, 0.0, 0.004, held=h) for s, h in ((0, 0.7), (1, 0.8), (2, 0.75))]
    page = page_markdown(rome + patch)
    assert "| rome L2 (layer chosen on dev) |" in page
    assert "- keyed-patch against rome L2, seeds 0, 1, 2: held-out 75.0% against 0.0% (p = " in page
