"""Speculative decoding with drafts from memory: the drafter's rules, greedy output identical to
plain decoding (model, mixture, offloaded tables), the sampling rule's distribution, the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from engram.cli import main as cli
from engram.config import DraftConfig, GateConfig, SamplingConfig
from engram.data.shards import load_dataset
from engram.errors import ConfigError, EngramError
from engram.model.generation import generate
from engram.ngram import NgramIndex
from engram.ngram.draft import NgramDrafter, text_match
from engram.ngram.mixture import LMAdapter, NgramMixture, generate_mixed
from engram.ngram.speculative import EngramTarget, MixtureTarget, generate_speculative
from engram.tables.runtime import attach_tables, build_model_without_tables, table_runtime
from engram.tables.tablefile import save_model_tables
from engram.tables.tiers import CachedStorage, MmapStorage

pytestmark = pytest.mark.usefixtures("one_thread")
GREEDY = SamplingConfig(max_new_tokens=24, temperature=0.0)


@pytest.fixture(scope="module")
def world(tiny, tmp_path_factory):
    """A tiny dataset, an index of its train split, a tiny model with non-trivial table rows."""
    root = tmp_path_factory.mktemp("spec")
    data = tiny.dataset(root / "data", n_docs=30, doc_words=120)
    index = NgramIndex.from_dataset(root / "index", data, progress=False, stats_order=4)
    model = tiny.model(seed=2)
    with torch.no_grad():
        for e in model.engram_layers:
            e.table.weight.normal_()
    ds = load_dataset(data)
    val = np.asarray(ds.val.tokens, dtype=np.int64)
    prompts = [torch.as_tensor(val[s:s + 8])[None] for s in (1, 40, 90, 150)]
    return {"root": root, "data": data, "index": index, "model": model, "prompts": prompts, "eos": ds.eos_id}


class OracleDrafter:
    """Drafts the reference output itself (all accepted), or with its last token changed every
    ``spoil``-th step (a rejection in mid-draft): the accept and rollback paths, on purpose."""

    def __init__(self, reference: list[int], k: int, spoil: int = 0):
        self.ref, self.cfg, self.spoil, self.calls = reference, DraftConfig(max_len=k), spoil, 0

    def propose(self, seq, k=None):
        self.calls += 1
        d = list(self.ref[len(seq):len(seq) + (k or self.cfg.max_len)])
        if self.spoil and d and self.calls % self.spoil == 0:
            d[-1] = (d[-1] + 1) % 300
        return d


# ----------------------------------------------------------------------------- the drafter
def test_text_match_takes_the_longest_and_latest_occurrence():
    seq = np.array([5, 1, 2, 3, 9, 1, 2, 7, 8, 1, 2])  # suffix [1,2]: seen at 1-2 (then 3), 5-6 (then 7)
    assert text_match(seq, 8) == (2, 7)  # latest of the two
    seq = np.array([0, 1, 2, 3, 4, 1, 2, 5, 0, 1, 2])  # [0,1,2] only at 0-2: the longer match wins
    assert text_match(seq, 8) == (3, 3)
    assert text_match(seq, 2) == (2, 5)  # capped length: the latest 2-token match
    assert text_match(np.array([4, 5, 6]), 8) == (0, -1)
    assert text_match(np.array([4]), 8) == (0, -1)


def test_drafter_rules(tmp_path):
    # index: after [1,2] comes 3 (twice) or 4 (twice) -> tie -> the smaller id, 3; [7,1,2] -> 5
    stream = np.array([0, 1, 2, 3, 0, 1, 2, 4, 0, 1, 2, 3, 0, 1, 2, 4, 0, 7, 1, 2, 5, 6, 0], dtype=np.int64)
    index = NgramIndex.build(tmp_path / "i", stream, vocab_size=10, eos_id=0, fingerprint="f" * 64, progress=False,
                             stats_order=2)
    d = NgramDrafter(index, DraftConfig(max_len=4, min_match=2, min_count=1, min_prob=0, source="index"))
    assert d.propose([9, 1, 2], 1) == [3]
    assert d.propose([7, 1, 2]) == [5, 6, 0]  # stops at the document's end: [..., 6, 0] ends the match
    both = NgramDrafter(index, DraftConfig(max_len=1, min_match=2, min_count=1, min_prob=0))
    assert both.propose([1, 2, 8, 9, 1, 2]) == [8]  # text and index match 2 tokens: the text wins
    assert both.propose([1, 2, 8, 7, 1, 2]) == [5]  # the index matches 3 tokens ([7,1,2]): the index wins
    assert NgramDrafter(index, DraftConfig(max_len=3, min_match=3, min_count=1, source="index")).propose([9, 1, 2]) == []
    assert NgramDrafter(None, DraftConfig(max_len=3, min_match=1)).propose([4, 5, 6, 4]) == [5, 6, 4]
    # [7,1,2] occurs once, [1,2] five times (3, 4, 3, 4, 5 after it): with min_count 3 the shorter
    # suffix speaks, 3 and 4 tie and 3 wins; its share 2/5 is below min_prob 0.5: no draft
    frequent = NgramDrafter(index, DraftConfig(max_len=1, min_match=2, min_count=3, min_prob=0.4, source="index"))
    assert frequent.propose([7, 1, 2]) == [3]
    assert NgramDrafter(index, DraftConfig(max_len=1, min_count=3, min_prob=0.5, source="index")).propose([7, 1, 2]) == []
    assert d.propose([7, 1, 2], 1) == [5]
    index.add(np.array([0, 7, 1, 2, 3, 0, 7, 1, 2, 3, 0]), name="more")  # now 3 follows [7,1,2] twice
    assert d.propose([7, 1, 2], 1) == [3]  # the drafter's lookup memo follows the index


def test_the_prompts_own_text_is_drafted_from_without_an_index():
    prompt = [3, 8, 5, 6, 7, 9, 2, 8, 5]  # [8, 5] ended earlier in the prompt, followed by 6, 7, 9
    assert NgramDrafter(None, DraftConfig(max_len=3)).propose(prompt) == [6, 7, 9]


def test_draft_length_shrinks_after_rejections_backs_off_and_grows_back():
    from engram.ngram.speculative import DraftLength

    d = DraftLength(8, max_skip=4)
    lengths = []
    for drafted_accepted in [(8, 8), (8, 3), (4, 4), (8, 0), None, (1, 0), None, None, (1, 0), None, None, None,
                             None, (1, 0), None, None, None, None, (1, 1), (2, 2)]:
        k = d.next()
        lengths.append(k)
        if drafted_accepted is not None:
            assert k == drafted_accepted[0]
            d.update(*drafted_accepted)
    # full: stays 8; 3 of 8: 4; full: 8; a first-token miss: 1, and 1, 2, 4, 4 (max_skip) steps
    # without drafts; an accepted token resets the run and doubles the length again
    assert lengths == [8, 8, 4, 8, 0, 1, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 2]
    assert d.next() == 4
    fixed = DraftLength(8, adaptive=False)
    fixed.update(8, 0)
    assert fixed.next() == 8


def test_draft_spec_parsing():
    assert DraftConfig.parse("ngram").max_len == 4 and DraftConfig.parse("ngram:8").max_len == 8
    for bad in ("ngram:0", "ngram:x", "lookahead:3", "ngram:-1"):
        with pytest.raises(ConfigError, match="ngram"):
            DraftConfig.parse(bad)


# ----------------------------------------------------------------------------- greedy exactness
@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_greedy_output_is_identical_with_and_without_drafts(world, k):
    model = world["model"]
    for prompt in world["prompts"]:
        ref = generate(model, prompt, GREEDY)
        full = ref[0].tolist()
        drafters = [OracleDrafter(full, k), OracleDrafter(full, k, spoil=2),
                    NgramDrafter(world["index"], DraftConfig(max_len=k, min_match=1, min_count=1, min_prob=0))]
        for drafter in drafters:
            res = generate_speculative(EngramTarget(model), drafter, prompt, GREEDY)
            assert torch.equal(res.ids, ref), (k, type(drafter).__name__)
            assert res.new_tokens == GREEDY.max_new_tokens
        oracle = generate_speculative(EngramTarget(model), OracleDrafter(full, k), prompt, GREEDY)
        assert oracle.acceptance == 1.0 and oracle.forwards == 1 + math.ceil((GREEDY.max_new_tokens - 1) / (k + 1))


def test_eos_ends_the_generation_inside_a_draft(world):
    model, prompt = world["model"], world["prompts"][0]
    ref = generate(model, prompt, GREEDY)[0].tolist()
    eos = ref[prompt.shape[1] + 5]  # pretend the 6th new token is the end of the document
    want = generate(model, prompt, GREEDY, eos_id=eos)
    res = generate_speculative(EngramTarget(model), OracleDrafter(ref, 8), prompt, GREEDY, eos_id=eos)
    assert torch.equal(res.ids, want) and res.ids[0, -1] == eos


def test_greedy_mixture_is_identical_with_and_without_drafts(world):
    model, index = world["model"], world["index"]
    mix = NgramMixture(LMAdapter(model), index, 0.5, GateConfig(kn_order=3))
    for prompt in world["prompts"][:2]:
        ref = generate_mixed(mix, prompt, GREEDY)
        for k in (2, 4):
            res = generate_speculative(MixtureTarget(mix), NgramDrafter(index, DraftConfig(max_len=k, min_match=1, min_count=1, min_prob=0)),
                                       prompt, GREEDY)
            assert torch.equal(res.ids, ref)
            assert res.accepted > 0  # the mixture follows the index, so its drafts get accepted
    fn = LMAdapter(lambda ids: model(ids).logits, vocab_size=index.vocab_size, max_seq_len=model.cfg.max_seq_len)
    mix_fn = NgramMixture(fn, index, 0.5, GateConfig(kn_order=3))  # a plain callable LM, re-run each step
    prompt = world["prompts"][0]
    res = generate_speculative(MixtureTarget(mix_fn), NgramDrafter(index, DraftConfig(max_len=4, min_match=1, min_count=1, min_prob=0)),
                               prompt, GREEDY)
    assert torch.equal(res.ids, generate_mixed(mix, prompt, GREEDY))


@pytest.mark.parametrize("kind", ["mmap", "cached"])
def test_greedy_identical_with_tables_in_a_storage_tier(world, tiny, kind):
    model = world["model"]
    header = save_model_tables(model, world["root"] / f"{kind}.engt")
    m = build_model_without_tables(model.cfg, tiny.compression())
    m.load_state_dict({k: v for k, v in model.state_dict().items() if "multi_head_embedding.embedding" not in k},
                      strict=False)
    storages = {}
    for lid in header.layers:
        base = MmapStorage(header, lid, io_threads=1)
        storages[lid] = base if kind == "mmap" else CachedStorage(base, 64, "lru")
    attach_tables(m, storages, prefetch=True)
    m.eval()
    try:
        for prompt in world["prompts"][:2]:
            ref = generate(model, prompt, GREEDY)
            res = generate_speculative(EngramTarget(m), OracleDrafter(ref[0].tolist(), 4, spoil=2), prompt, GREEDY)
            assert torch.equal(res.ids, ref)
            res = generate_speculative(EngramTarget(m), NgramDrafter(world["index"], DraftConfig(min_match=1, min_count=1, min_prob=0)),
                                       prompt, GREEDY)
            assert torch.equal(res.ids, ref)
    finally:
        table_runtime(m).close()


# ----------------------------------------------------------------------------- sampling
def test_without_drafts_sampling_equals_generate(world):
    """The loop draws from the same generator in the same order as ``generate``."""
    s = SamplingConfig(max_new_tokens=12, temperature=0.9, top_k=40, top_p=0.95, seed=5)
    for prompt in world["prompts"][:2]:
        res = generate_speculative(EngramTarget(world["model"]), None, prompt, s)
        assert torch.equal(res.ids, generate(world["model"], prompt, s))


class MarkovTarget:
    """A 4-token Markov chain as a scoring target: rows are log P(next | this token)."""

    P = torch.tensor([[0.40, 0.30, 0.18, 0.12], [0.12, 0.45, 0.25, 0.18],
                      [0.25, 0.13, 0.50, 0.12], [0.30, 0.20, 0.15, 0.35]], dtype=torch.float64)
    vocab_size, max_seq_len = 4, None

    def begin(self, max_len, max_draft):
        self.n, self.max_draft = 0, max_draft

    def score(self, ids):
        self.n += len(ids)
        return self.P[list(ids)].log().float()

    def truncate(self, n):
        assert 0 <= self.n - n <= self.max_draft
        self.n = n


class RotatingDrafter:
    """Drafts k tokens that depend on the context only: last+1, last+2, ... (mod 4)."""

    cfg = DraftConfig(max_len=3)

    def propose(self, seq, k=None):
        return [(seq[-1] + 1 + i) % 4 for i in range(k or 3)][: (len(seq) % 3) + 1]


def _drafted_samples_p_value(n: int = 5000) -> tuple[float, float]:
    """(p-value of a chi-square test of n drafted 3-token samples, 64 cells, against the exact
    joint distribution; acceptance rate of the drafts)."""
    P = MarkovTarget.P
    counts = np.zeros((4, 4, 4))
    drafted = accepted = 0
    for seed in range(n):
        res = generate_speculative(MarkovTarget(), RotatingDrafter(), torch.tensor([0]),
                                   SamplingConfig(max_new_tokens=3, temperature=1.0, seed=seed))
        a, b, c = res.ids[0, 1:].tolist()
        counts[a, b, c] += 1
        drafted, accepted = drafted + res.drafted, accepted + res.accepted
    exact = np.einsum("a,ab,bc->abc", P[0].numpy(), P.numpy(), P.numpy())
    chi2 = float(((counts - n * exact) ** 2 / (n * exact)).sum())
    p_value = float(torch.special.gammaincc(torch.tensor(63 / 2, dtype=torch.float64),
                                            torch.tensor(chi2 / 2, dtype=torch.float64)))
    return p_value, accepted / drafted


def test_speculative_sampling_keeps_the_distribution():
    """Drafted sampling against the exact distribution, at significance 0.001: an exact sampler
    fails with probability 0.1%; the seeds are fixed, so the test is deterministic."""
    p_value, acceptance = _drafted_samples_p_value()
    assert p_value > 1e-3, p_value
    assert 0.1 < acceptance < 0.9  # both the accept and the reject path ran


def test_the_distribution_test_catches_a_subtly_wrong_rule(monkeypatch):
    """Resampling a rejected position from p itself (not p without the draft token) biases the
    output towards the draft; the same test must see it."""
    from engram.ngram import speculative

    def biased(self, logits, draft):
        p = self.probs(logits)
        if float(torch.rand((), generator=self.gen)) < float(p[draft]):
            return True, draft
        return False, int(torch.multinomial(p, 1, generator=self.gen))

    monkeypatch.setattr(speculative._Chooser, "verify", biased)
    assert _drafted_samples_p_value()[0] < 1e-3


class ArgmaxDrafter:
    """Drafts the most likely next token of a fixed table (a deterministic function of the
    context), so that about half of the drafts are accepted by the sampler."""

    cfg = DraftConfig(max_len=2)

    def __init__(self, table: dict[int, int]):
        self.table = table

    def propose(self, seq, k=None):
        return [self.table[seq[-1]]] if seq[-1] in self.table else []


@pytest.mark.slow  # ~9 s: 1,200 generations
def test_speculative_sampling_with_the_model_keeps_its_distribution(world):
    """The real model on its rollback cache, top-k 3 sampling: the first two new tokens (the
    second one drafted and verified) against the model's exact joint distribution, chi-square
    over 9 cells at significance 0.001 (fixed seeds: deterministic)."""
    model, prompt = world["model"], world["prompts"][1]
    s = dict(max_new_tokens=3, temperature=1.0, top_k=3)
    with torch.no_grad():
        l1 = model(prompt).logits[0, -1]
        top1 = torch.topk(l1, 3).indices.tolist()
        p1 = torch.softmax(l1[top1].double(), -1)
        exact, table = {}, {}
        for a, pa in zip(top1, p1.tolist()):
            l2 = model(torch.cat([prompt, torch.tensor([[a]])], 1)).logits[0, -1]
            top2 = torch.topk(l2, 3).indices.tolist()
            table[a] = top2[0]
            for b, pb in zip(top2, torch.softmax(l2[top2].double(), -1).tolist()):
                exact[(a, b)] = pa * pb
    n, counts, drafted, accepted = 1200, {c: 0 for c in exact}, 0, 0
    for seed in range(n):
        res = generate_speculative(EngramTarget(model), ArgmaxDrafter(table), prompt,
                                   SamplingConfig(**s, seed=seed))
        a, b = res.ids[0, prompt.shape[1]:prompt.shape[1] + 2].tolist()
        counts[(a, b)] += 1
        drafted, accepted = drafted + res.drafted, accepted + res.accepted
    chi2 = sum((counts[c] - n * q) ** 2 / (n * q) for c, q in exact.items())
    p_value = float(torch.special.gammaincc(torch.tensor(8 / 2, dtype=torch.float64),
                                            torch.tensor(chi2 / 2, dtype=torch.float64)))
    assert p_value > 1e-3, (chi2, p_value, counts)
    assert 0.1 < accepted / drafted < 0.9


# ----------------------------------------------------------------------------- command line
def test_cli_generate_with_drafts_and_the_bench(world, tiny, tmp_path, capsys):
    run = tmp_path / "run"
    tiny.save_run(run, world["data"])
    idx = str(world["root"] / "index")
    base = ["generate", "--ckpt", str(run), "--prompt", "the cat sat on", "--max-new-tokens", "12",
            "--temperature", "0"]
    assert cli.main(base) == 0
    plain = capsys.readouterr().out
    assert cli.main(base + ["--draft", "ngram:4", "--index", idx]) == 0
    out = capsys.readouterr()
    assert out.out == plain and "acceptance" in out.err
    assert cli.main(base + ["--draft", "ngram:3", "--ngram", idx, "--ngram-lambda", "0.5",
                            "--ngram-order", "3"]) == 0
    drafted_mix = capsys.readouterr().out
    assert cli.main(base + ["--ngram", idx, "--ngram-lambda", "0.5", "--ngram-order", "3"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == drafted_mix.splitlines()[0]
    table = tmp_path / "tiny.engt"  # tables served from a file by the cached tier (helper process)
    assert cli.main(["table", "convert", str(run), str(table), "--quiet"]) == 0
    capsys.readouterr()
    assert cli.main(base + ["--draft", "ngram:4", "--index", idx, "--table", str(table), "--cache-rows", "50"]) == 0
    out = capsys.readouterr()
    assert out.out == plain and "hit rate" in out.err and "acceptance" in out.err
    assert cli.main(base + ["--draft", "ngram:0"]) == 2
    assert "ngram:K" in capsys.readouterr().err
    assert cli.main(base + ["--index", idx]) == 2
    assert "--draft" in capsys.readouterr().err
    assert cli.main(["bench", "draft", "--ckpt", str(run), "--data", str(world["data"]), "--index", idx,
                     "--json", "--quiet", "--prompts", "2", "--prompt-len", "8", "--max-new-tokens", "10",
                     "--repeats", "1", "--ks", "2,4"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["identical"] is True and rec["best"] in ("ngram:2", "ngram:4") and rec["speedup"] > 0
    assert list(rec["methods"]) == ["plain", "ngram:2", "ngram:4"]  # no transformers methods: not a HF model
    assert rec["leakage"]["max"] < 32 and len(rec["leakage"]["longest_match"]) == 2
    assert cli.main(["bench", "draft", "--ckpt", str(run), "--data", str(world["data"]), "--json", "--quiet",
                     "--prompts", "2", "--prompt-len", "8", "--max-new-tokens", "10", "--repeats", "1",
                     "--ks", "0,2", "--temperature", "0.9"]) == 0  # sampling, text-only drafts
    rec = json.loads(capsys.readouterr().out)
    assert rec["identical"] is None and rec["methods"]["ngram:0"]["prompts_identical"] == 2  # same draws


def test_batch_prompts_are_refused(world):
    with pytest.raises(EngramError, match="one prompt at a time"):
        generate_speculative(EngramTarget(world["model"]), None, torch.zeros(2, 3, dtype=torch.long), GREEDY)
