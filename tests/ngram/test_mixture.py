"""N-gram mixture: normalisation, the lambda gate (train/save/load), generation, instant updates, CLI."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engram.cli import main as cli
from engram.config import TrainConfig, preset
from engram.data.corpus import Document
from engram.data.shards import load_dataset, prepare_dataset
from engram.data.tokenizer import train_bpe
from engram.model.generation import SamplingConfig
from engram.model.lm import EngramLM
from engram.ngram import LeakageError, NgramIndex
from engram.ngram.facts import facts_documents, invented_facts, model_digest, paraphrase, recall, tokenize_cases
from engram.ngram.mixture import (
    FEATURES,
    Collected,
    GateConfig,
    LMAdapter,
    MixtureError,
    NgramMixture,
    collect,
    fixed_lambda_sweep,
    gate_lambda,
    generate_mixed,
    load_gate,
    mix_logprobs,
    mixture_nll,
    save_gate,
    train_gate,
)
from engram.training.trainer import train

WORDS = ("the cat sat on a mat while the dog ran far away from the big red house near an old "
         "tree and the bird sang").split()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny prepared dataset, an index of its train split and a 4-step tiny model run."""
    root = tmp_path_factory.mktemp("ngmix")
    rng = random.Random(0)
    docs = []
    for i in range(40):
        w = [rng.choice(WORDS)]
        for _ in range(150):
            j = WORDS.index(w[-1])
            w.append(WORDS[(j + 1) % len(WORDS)] if rng.random() < 0.7 else rng.choice(WORDS))
        docs.append(Document("synthetic", f"doc{i}", " ".join(w)))
    tok = train_bpe([d.text for d in docs], 300)
    data = root / "data"
    prepare_dataset(data, docs, tok, val_fraction=0.2, seed=0, progress=False)
    ds = load_dataset(data)
    index = NgramIndex.from_dataset(root / "index", data, progress=False, stats_order=4)
    cfg = TrainConfig(steps=4, batch_size=4, seq_len=32, warmup_steps=1, eval_every=4, eval_batches=1,
                      save_every=4, log_every=1, seed=0)
    run = root / "run"
    train(preset("tiny", ds.vocab_size), cfg, data, run, progress=False)
    return {"root": root, "data": data, "ds": ds, "index": index, "run": run}


def _model(world) -> EngramLM:
    from engram.model.checkpoint import load_model

    return load_model(world["run"])[0]


@given(st.integers(2, 40), st.floats(0.0, 0.999), st.integers(0, 10_000))
@settings(max_examples=50, deadline=None)
def test_mixture_is_a_distribution(V, lam, seed):
    g = torch.Generator().manual_seed(seed)
    lm_logp = torch.log_softmax(torch.randn(3, V, generator=g) * 3, -1)
    p = torch.rand(3, V, generator=g) * (torch.rand(3, V, generator=g) < 0.3)  # sparse, maybe all-zero
    p = torch.where(p.sum(-1, keepdim=True) > 0, p / p.sum(-1, keepdim=True).clamp_min(1e-12), torch.full_like(p, 1 / V))
    for l in (lam, torch.full((3,), lam)):
        mixed = mix_logprobs(lm_logp, p, l).exp()
        assert torch.allclose(mixed.sum(-1), torch.ones(3), atol=1e-5)


def test_mixture_log_probs_and_gate_roundtrip(world, tmp_path):
    model = _model(world)
    index = world["index"]
    lm = LMAdapter(model)
    ids = torch.as_tensor(np.asarray(world["ds"].val.tokens[:40], dtype=np.int64))[None]
    for est in ("both", "kn", "infgram"):
        mix = NgramMixture(lm, index, 0.3, GateConfig(estimator=est, kn_order=3))
        lp = mix.log_probs(ids)
        assert lp.shape == (1, 40, index.vocab_size)
        assert torch.allclose(lp.exp().sum(-1), torch.ones(1, 40), atol=1e-5)
    gate = train_gate(collect(lm, index, world["ds"].val.tokens, seq_len=32, kn_order=3, progress=False),
                      GateConfig(kn_order=3, hidden_size=model.cfg.hidden_size, hidden_bound=0.5),
                      steps=20, progress=False)[0]
    f = torch.randn(64, len(gate.cfg.features))
    with torch.no_grad():
        shift = gate.logits(f, 50 * torch.randn(64, model.cfg.hidden_size)) - gate.logits(f, torch.zeros(64, model.cfg.hidden_size))
    assert float(shift.abs().max()) <= 2 * 0.5 + 1e-6  # the hidden state moves a logit by at most the bound
    save_gate(gate, tmp_path / "g", {"note": "test"})
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == ["gate.json", "gate.safetensors"]
    loaded, meta = load_gate(tmp_path / "g")
    assert meta == {"note": "test"}
    mix = NgramMixture(lm, index, loaded)
    lp, lam = mix.step(ids, lm(ids))
    assert torch.allclose(lp.exp().sum(-1), torch.ones(1, 40), atol=1e-5)
    assert bool(((lam > 0) & (lam < 1)).all())
    # a gate for another hidden size, or a damaged file, is refused with a message
    rec = json.loads((tmp_path / "g" / "gate.json").read_text())
    rec["config"]["width"] = 7
    (tmp_path / "g" / "gate.json").write_text(json.dumps(rec))
    with pytest.raises(MixtureError, match="do not match"):
        load_gate(tmp_path / "g")
    with pytest.raises(MixtureError, match="hidden size"):
        NgramMixture(LMAdapter(lambda i: model(i).logits, vocab_size=index.vocab_size), index, loaded)


def test_gate_beats_fixed_lambda_on_synthetic_data():
    """When the N-gram is right exactly where a feature says so, the gate must find it."""
    g = torch.Generator().manual_seed(0)
    N = 4000
    feats = torch.randn(N, len(FEATURES), generator=g)
    good = feats[:, FEATURES.index("log_count")] > 0
    lm_logp = torch.full((N,), float(np.log(0.2)))
    kn_p = torch.where(good, torch.tensor(0.9), torch.tensor(0.01))
    c = Collected(features=feats, hidden=None, lm_logp=lm_logp, inf_p=kn_p, kn_p=kn_p,
                  lm_top1=torch.zeros(N, dtype=torch.bool), window=torch.arange(N) // 20)
    gate, info = train_gate(c, GateConfig(estimator="kn"), steps=150, progress=False)
    assert gate.outputs == 1
    sweep = fixed_lambda_sweep(c, "kn")
    gate_loss = float(mixture_nll(c, "kn", gate_lambda(gate, c)).mean())
    assert gate_loss < min(sweep.values()) - 0.2
    lam = gate_lambda(gate, c)
    assert float(lam[good].mean()) > 0.7 > 0.3 > float(lam[~good].mean())


def test_collect_refuses_indexed_text_and_accepts_callables(world):
    model = _model(world)
    index = world["index"]
    with pytest.raises(LeakageError):
        collect(LMAdapter(model), index, world["ds"].train.tokens, seq_len=32, max_windows=4, progress=False)
    fn = LMAdapter(lambda ids: model(ids).logits, vocab_size=index.vocab_size, max_seq_len=model.cfg.max_seq_len)
    a = collect(fn, index, world["ds"].val.tokens, seq_len=32, max_windows=4, kn_order=3, progress=False)
    b = collect(LMAdapter(model), index, world["ds"].val.tokens, seq_len=32, max_windows=4, kn_order=3,
                progress=False)
    assert a.hidden is None and b.hidden is not None and b.hidden.shape[-1] == model.cfg.hidden_size
    assert torch.allclose(a.lm_logp, b.lm_logp, atol=1e-5) and torch.equal(a.kn_p, b.kn_p)


def test_generation_cached_equals_uncached(world):
    """Greedy mixture decoding: KV-cached EngramLM == the same model as a plain callable."""
    model = _model(world)
    index = world["index"]
    prompt = torch.as_tensor(np.asarray(world["ds"].val.tokens[:6], dtype=np.int64))[None]
    s = SamplingConfig(max_new_tokens=8, temperature=0.0)
    cfg = GateConfig(kn_order=3)
    a, lam_a = generate_mixed(NgramMixture(LMAdapter(model), index, 0.5, cfg), prompt, s, return_lambdas=True)
    fn = LMAdapter(lambda ids: model(ids).logits, vocab_size=index.vocab_size, max_seq_len=model.cfg.max_seq_len)
    b = generate_mixed(NgramMixture(fn, index, 0.5, cfg), prompt, s)
    assert torch.equal(a, b) and a.shape == (1, 14) and torch.allclose(lam_a, torch.full((1, 8), 0.5))
    sampled = generate_mixed(NgramMixture(LMAdapter(model), index, 0.5, cfg), prompt,
                             SamplingConfig(max_new_tokens=5, temperature=1.0, top_p=0.9, seed=3))
    assert sampled.shape == (1, 11)


def test_instant_update_with_invented_facts(world, tmp_path):
    """Adding facts makes the N-gram side answer them at once; removing restores everything."""
    model = _model(world)
    index = NgramIndex.from_dataset(tmp_path / "idx", world["data"], progress=False, stats_order=4)
    facts = invented_facts(3, seed=1, index=index)
    cases = tokenize_cases(facts, index.tokenizer, 0)
    assert len(cases) >= 8
    mix = NgramMixture(LMAdapter(model), index, 0.9, GateConfig(estimator="both", kn_order=4), mu=0.8)
    eos = world["ds"].eos_id
    digest = model_digest(model)
    modes = ("infgram", "kn", "mixture")
    before = {m: recall(cases, mix, eos, mode=m) for m in modes}
    index.add_texts(facts_documents(facts), name="facts")
    after = {m: recall(cases, mix, eos, mode=m) for m in modes}
    assert after["infgram"]["top1"] == 1.0 and after["mixture"]["top1"] == 1.0
    assert before["infgram"]["top1"] < 0.5 and before["mixture"]["top1"] < 0.5
    assert after["kn"]["mean_p_first"] > before["kn"]["mean_p_first"]
    index.remove("facts")
    assert {m: recall(cases, mix, eos, mode=m) for m in modes} == before
    assert model_digest(model) == digest
    assert len(tokenize_cases(paraphrase(facts, 1), index.tokenizer, 1)) >= 8


def test_cli_ngram_commands(world, tmp_path, capsys):
    data, run = world["data"], world["run"]
    idx = tmp_path / "idx"
    assert cli.main(["ngram", "build", "--data", str(data), "--out", str(idx), "--quiet"]) == 0
    assert cli.main(["ngram", "query", str(idx), "--text", "the cat", "--verb", "count", "--json"]) == 0
    count = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["count"]
    assert count > 0
    (tmp_path / "new.txt").write_text("the zebra flew over the moon")
    assert cli.main(["ngram", "add", str(idx), "--text", str(tmp_path / "new.txt"), "--name", "zebra"]) == 0
    for verb in ("infgram", "kn", "ntd"):
        assert cli.main(["ngram", "query", str(idx), "--text", "the zebra", "--verb", verb, "--json"]) == 0
        res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert res["top"] and abs(sum(r["p"] for r in res["top"]) - 1) < 1e-6 or verb == "kn"
    assert cli.main(["ngram", "query", str(idx), "--text", "the cat", "--verb", "prob", "--next", " sat",
                     "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 < res["prob"] <= 1 and res["prob"] == res["count"] / res["context_count"]
    assert cli.main(["ngram", "stats", str(idx), "--verify", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["segments"]) == 2
    assert cli.main(["ngram", "remove", str(idx), "zebra"]) == 0
    assert cli.main(["ngram", "compact", str(idx), "--quiet"]) == 0
    assert cli.main(["ngram", "remove", str(idx), "zebra"]) == 2  # a clear error, no traceback
    assert "no segment 'zebra'" in capsys.readouterr().err
    capsys.readouterr()
    assert cli.main(["ngram", "train-gate", "--ckpt", str(run), "--data", str(data), "--index", str(idx),
                     "--steps", "10", "--max-windows", "3", "--seq-len", "32", "--kn-order", "4", "--quiet"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert Path(rep["gate"]).is_dir() and rep["test_tokens"] == 3 * 32
    assert cli.main(["eval", "--ckpt", str(run), "--data", str(data), "--ngram", str(idx), "--max-batches", "1",
                     "--seq-len", "32", "--batch-size", "4"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["windows"] == "odd" and res["mixture"]["loss"] < res["model"]["loss"] + 1.0
    assert cli.main(["eval", "--ckpt", str(run), "--data", str(data), "--ngram", str(idx), "--split", "train",
                     "--ngram-lambda", "0.3", "--max-batches", "1", "--seq-len", "32"]) == 2
    assert "indexed" in capsys.readouterr().err
    assert cli.main(["generate", "--ckpt", str(run), "--prompt", "the cat", "--ngram", str(idx),
                     "--max-new-tokens", "5", "--ngram-lambda", "0.5"]) == 0
    assert "mean lambda" in capsys.readouterr().out
