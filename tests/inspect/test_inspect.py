"""`engram inspect` and the analyses: gates, n-grams and rows are the model's own, renders are clean."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from engram.cli.main import main
from engram.config import preset
from engram.data.tokenizer import load_tokenizer
from engram.inspect.analysis import (
    AnalysisError,
    Sample,
    ablation,
    ablation_categories,
    facts_vs_random,
    gate_statistics,
    memory_swap_contrast,
    plot_zipf,
    sample_gates,
    score_samples,
    token_matched_contrast,
    unigram_logprobs,
    zipf_statistics,
)
from engram.inspect.heatmap import (
    PAD_TOKEN_ID,
    InspectError,
    gate_rgb,
    inspect_text,
    render_html,
    render_terminal,
    scale_values,
    tokenize,
)
from engram.model.checkpoint import load_model
from engram.model.lm import EngramLM
from engram.tables.access import ZIPF_EXPONENT_DEFINITION, rank_frequency

TEXT = "the Prince of Wales rode to the Tower of London."


@pytest.fixture(scope="module")
def run(inspect_run) -> tuple[Path, Path]:
    return inspect_run


@pytest.fixture(scope="module")
def loaded(run):
    model, _ = load_model(run[0])
    return model, load_tokenizer(run[0])


def test_gates_rows_and_ngrams_are_the_models(loaded) -> None:
    model, tok = loaded
    ins = inspect_text(model, tok, TEXT)
    ids = tok.encode(TEXT).ids
    assert [t.id for t in ins.tokens] == ids
    assert "".join(t.display for t in ins.tokens) == TEXT
    assert [l.layer_id for l in ins.layers] == [0, 1]

    x = torch.tensor([ids])
    hashes = model.hasher.hash(x)
    with torch.no_grad():
        gates = model(x, output_gates=True).gates
        _check_layers(model, ins, ids, hashes, gates)


def _check_layers(model, ins, ids, hashes, gates) -> None:
    for layer, li in zip(model.engram_layers, ins.layers):
        assert li.num_branches == 2 and len(li.gates) == len(ids)
        assert torch.equal(torch.tensor(li.gates), gates[layer.layer_id][0])  # exact, same pass
        rows = layer.multi_head_embedding.rows(hashes[layer.layer_id])[0]
        assert [[h.row for h in r] for r in li.heads] == rows.tolist()
        assert li.head_orders == [2, 2, 3, 3]
        # contributions: per-head slices of W_V add up to W_V e (bias aside)
        t = 5
        e = layer.table.weight[rows[t]]  # [H, Dh]
        w = layer.value_proj.weight.reshape(-1, 4, e.shape[1])
        per_head = torch.einsum("hd,Dhd->hD", e, w)
        assert [h.contribution for h in li.heads[t]] == pytest.approx(per_head.norm(dim=-1).tolist(), rel=1e-5)
        torch.testing.assert_close(per_head.sum(0) + layer.value_proj.bias,
                                   layer.value_proj(e.reshape(-1)), atol=1e-5, rtol=0)
        assert li.value_norm[t] == pytest.approx(float(layer.value_proj(e.reshape(-1)).norm()), rel=1e-5)
        # n-grams end at t and are padded before the text
        h3 = li.heads[1][3]
        assert h3.n == 3 and h3.ngram == (PAD_TOKEN_ID, ids[0], ids[1])
        assert li.heads[t][0].ngram == (ids[t - 1], ids[t])


def test_inspect_leaves_the_model_as_it_was(loaded) -> None:
    model, tok = loaded
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    try:
        inspect_text(model, tok, "the king")
        assert model.training
    finally:
        model.eval()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_bad_texts_and_models_are_refused(loaded) -> None:
    model, tok = loaded
    with pytest.raises(InspectError, match="no tokens"):
        inspect_text(model, tok, "")
    with pytest.raises(InspectError, match="max_seq_len is 64; shorten"):
        inspect_text(model, tok, "the king " * 80)
    with pytest.raises(InspectError, match="no Engram layers"):
        inspect_text(EngramLM(preset("tiny-dense", tok.get_vocab_size())), tok, "the king")


def test_multibyte_characters_are_shown_once(loaded) -> None:
    _, tok = loaded
    text = "Éire 日本 🙂 end"
    tokens = tokenize(tok, text)
    assert "".join(t.display for t in tokens) == text
    assert any(t.display == "" and re.fullmatch(r"(<[0-9a-f]{2}>)+", t.piece) for t in tokens)


def test_colour_helpers() -> None:
    assert gate_rgb(0.0) == (232, 237, 245) and gate_rgb(1.0) == (165, 0, 38)
    assert gate_rgb(-3) == gate_rgb(0) and gate_rgb(7) == gate_rgb(1)
    assert scale_values([0.2, 0.4, 0.3], "relative") == pytest.approx([0.0, 1.0, 0.5])
    assert scale_values([0.2, 0.4], "absolute") == [0.2, 0.4]
    assert scale_values([0.9, 0.1, 0.5, 0.5], "rank") == [1.0, 0.0, 0.5, 0.5]  # ties: mean rank
    assert scale_values([0.3], "rank") == [0.5]
    with pytest.raises(InspectError, match="scale="):
        scale_values([0.1], "log")


def test_cli_inspect_writes_terminal_html_and_json(run, loaded, tmp_path, capsys) -> None:
    model, tok = loaded
    html, js = tmp_path / "g.html", tmp_path / "g.json"
    assert main(["inspect", "--ckpt", str(run[0]), "--text", TEXT, "--html", str(html),
                 "--json", str(js), "--color", "truecolor", "--top-k", "2"]) == 0
    out = capsys.readouterr().out
    assert "\x1b[48;2;" in out and "layer 1 branch 1" in out and "row " in out
    data = json.loads(js.read_text())
    assert data == json.loads(json.dumps(inspect_text(model, tok, TEXT).to_dict()))
    assert data["format"] == "engram.inspect/1" and len(data["summary"]) == 4
    page = html.read_text()
    assert '"live": false' in page and "Prince" in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)  # nothing external
    assert "@import" not in page and "url(" not in page

    assert main(["inspect", "--ckpt", str(run[0]), "--text", "the king", "--color", "256"]) == 0
    assert "\x1b[48;5;" in capsys.readouterr().out
    assert main(["inspect", "--ckpt", str(run[0]), "--text", "the king", "--color", "none"]) == 0
    plain = capsys.readouterr().out
    assert "\x1b[" not in plain and re.search(r"king\[0\.\d\d\]", plain)
    assert main(["inspect", "--ckpt", str(run[0])]) == 2  # neither --text nor --file
    assert "exactly one of --text" in capsys.readouterr().err


def test_html_escapes_script_breakers(loaded) -> None:
    model, tok = loaded
    page = render_html(inspect_text(model, tok, "a </script><b>x"))
    assert page.count("</script>") == 1  # only the real one closes the element


def test_terminal_render_validates(loaded) -> None:
    model, tok = loaded
    ins = inspect_text(model, tok, "the king")
    with pytest.raises(InspectError, match="resolve 'auto'"):
        render_terminal(ins, "auto")
    with pytest.raises(InspectError, match="top_k"):
        render_terminal(ins, "none", top_k=-1)


# ----------------------------------------------------------------------------- analyses
def test_gate_statistics_counts_only_masked_positions(loaded) -> None:
    model, tok = loaded
    ids = tuple(tok.encode("the prince of wales").ids)
    cats = {"a": [Sample((1, *ids), (False,) + (True,) * len(ids))],
            "b": [Sample((1, *ids), (False, True) + (False,) * (len(ids) - 1))]}
    rows = gate_statistics(model, cats)
    assert {(r["category"], r["layer_id"], r["branch"]) for r in rows} == {
        (c, l, m) for c in "ab" for l in (0, 1) for m in (0, 1)}
    a = [r for r in rows if r["category"] == "a"]
    assert all(r["count"] == len(ids) and 0 < r["mean"] < 1 for r in a)
    direct = inspect_text(model, tok, "the prince of wales")  # no eos before it: compare b's token 1
    b00 = next(r for r in rows if r["category"] == "b" and r["layer_id"] == 0 and r["branch"] == 0)
    assert b00["count"] == 1 and 0 < b00["mean"] < 1
    assert len(direct.tokens) == len(ids)


def test_gate_passes_run_without_autograd_and_restore_the_model(loaded) -> None:
    model, tok = loaded
    ids = tuple(tok.encode("the prince of wales").ids)
    samples = [Sample((1, *ids), (False,) + (True,) * len(ids))] * 2
    grad_on: list[bool] = []
    hook = model.engram_layers[0].register_forward_hook(lambda *_: grad_on.append(torch.is_grad_enabled()))
    model.train()
    try:
        sample_gates(model, samples)
        memory_swap_contrast(model, samples)
        assert model.training and torch.is_grad_enabled()  # both restored afterwards
    finally:
        hook.remove()
        model.eval()
    assert grad_on and not any(grad_on)  # no autograd graph is built for a read-only pass


def test_token_matched_contrast_pairs_the_same_ids(loaded) -> None:
    model, tok = loaded
    ids = tuple(tok.encode("the prince of wales").ids)
    a = [Sample((1, *ids), (False,) + (True,) * len(ids))]
    shifted = [Sample((1, 7, *ids), (False, False) + (True,) * len(ids))]  # same ids, other context
    other = [Sample((1, *ids[::-1]), (False, True) + (False,) * (len(ids) - 1))]  # only ids[-1]
    ga, gs = sample_gates(model, a), sample_gates(model, shifted)
    for r in token_matched_contrast(model, a, shifted):
        assert r["tokens"] == len(set(ids))
        want = np.mean([ga[r["layer_id"]][np.array(ids) == t, r["branch"]].mean()
                        - gs[r["layer_id"]][np.array(ids) == t, r["branch"]].mean() for t in set(ids)])
        assert r["mean_diff"] == pytest.approx(want, abs=1e-6)
    for r in token_matched_contrast(model, a, a):  # against itself: every difference is 0
        assert r["mean_diff"] == 0.0 and r["positive_fraction"] == 0.0
    one = token_matched_contrast(model, a, other)
    assert all(r["tokens"] == 1 and np.isnan(r["sem"]) for r in one)  # only ids[-1] is shared


def test_memory_swap_contrast_isolates_the_memory(loaded) -> None:
    model, tok = loaded
    ids = tuple(tok.encode("the prince of wales rode to the tower of london").ids)
    samples = [Sample((1, *ids), (False,) + (True,) * len(ids)),
               Sample((1, *ids[::-1]), (False, False) + (True,) * (len(ids) - 1))]
    n = 2 * len(ids) - 1
    stats = gate_statistics(model, {"a": samples})
    rows = memory_swap_contrast(model, samples, seed=3)
    assert {(r["layer_id"], r["branch"]) for r in rows} == {(l, m) for l in (0, 1) for m in (0, 1)}
    for r in rows:  # the own-memory gate is the model's gate at the same positions
        s = next(x for x in stats if (x["layer_id"], x["branch"]) == (r["layer_id"], r["branch"]))
        assert r["tokens"] == n and r["gate"] == pytest.approx(s["mean"], abs=1e-6)
        assert r["mean_diff"] == pytest.approx(r["gate"] - r["gate_swapped"], abs=1e-9)
    assert any(abs(r["mean_diff"]) > 1e-4 for r in rows)  # a trained key reads the memory
    assert memory_swap_contrast(model, samples, seed=3) == rows  # the derangement is seeded
    layer = model.engram_layers[0]
    saved = [k.weight.detach().clone() for k in layer.key_projs]
    try:  # a key that ignores the memory (W_K = 0, bias only): swapping changes nothing
        with torch.no_grad():
            for k in layer.key_projs:
                k.weight.zero_()
        blind = [r for r in memory_swap_contrast(model, samples) if r["layer_id"] == layer.layer_id]
        assert blind and all(r["mean_diff"] == 0.0 for r in blind)
        assert all(r["gate_no_memory"] == pytest.approx(r["gate"], abs=1e-6) for r in blind)
    finally:
        with torch.no_grad():
            for k, w in zip(layer.key_projs, saved):
                k.weight.copy_(w)
    with pytest.raises(AnalysisError, match="at least 2"):
        memory_swap_contrast(model, [Sample((1, ids[0]), (False, True))])


def test_zipf_counts_every_access(run, loaded, tmp_path) -> None:
    model, _ = loaded
    from engram.data.shards import load_dataset

    tokens = np.asarray(load_dataset(run[1]).train.tokens[:3000])
    res = zipf_statistics(model, tokens, chunk=1000)
    for lid, orders in res.row_counts.items():
        for n, c in orders.items():
            assert c.sum() == tokens.size * 2  # 2 heads per order
            assert np.all(np.diff(c) <= 0)
    assert res.ngram_counts[2].sum() == tokens.size - 1
    s = res.summary["rows"]["0"]["2"]
    assert 0 < s["top_share"]["1%"] <= s["top_share"]["10%"] <= 1
    # the exponent `engram table stats` reports for the same counts (its rows are the touched ones)
    touched = res.row_counts[0][2][res.row_counts[0][2] > 0]
    assert s["zipf_exponent"] is not None and s["zipf_exponent"] == rank_frequency(touched)["zipf_exponent"]
    assert res.summary["ngrams"]["3"]["zipf_exponent"] == rank_frequency(res.ngram_counts[3])["zipf_exponent"]
    assert res.summary["zipf_exponent_definition"] == ZIPF_EXPONENT_DEFINITION
    png = tmp_path / "z.png"
    plot_zipf(res, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(AnalysisError, match="top_percents"):
        zipf_statistics(model, tokens, top_percents=(0,))


def test_ablation_zeroes_engram_in_the_call(loaded) -> None:
    model, tok = loaded
    ids = tuple(tok.encode("the prince of wales rode with the king of france").ids)
    cats = {"x": [Sample((1, *ids), (False,) + (True,) * len(ids))]}
    logp = np.full(model.cfg.vocab_size, -20.0)  # a baseline far worse than the model
    assert unigram_logprobs(np.array(ids), model.cfg.vocab_size).shape == logp.shape
    before = score_samples(model, cats["x"])
    [row] = ablation(model, cats, logp)
    assert score_samples(model, cats["x"]).loss == before.loss  # nothing left switched off
    assert score_samples(model, cats["x"], ablate_engram=True).loss == pytest.approx(row["loss_ablated"])
    assert row["loss_full"] == pytest.approx(before.loss)
    assert row["loss_ablated"] != pytest.approx(row["loss_full"], abs=1e-6)  # Engram did something
    u = row["unigram_loss"]
    assert row["retained_loss"] == pytest.approx((u - row["loss_ablated"]) / (u - row["loss_full"]))


def test_ablation_needs_builtin_validation_documents(loaded) -> None:
    _, tok = loaded
    with pytest.raises(AnalysisError, match="built-in corpus"):
        ablation_categories(tok, ["doc3"], window=32, max_tokens=100)


def test_cli_analyze_zipf(run, tmp_path, capsys) -> None:
    out = tmp_path / "z.json"
    assert main(["analyze", "zipf", "--ckpt", str(run[0]), "--data", str(run[1]), "--max-tokens",
                 "2000", "--plot", str(tmp_path / "z.png"), "--json", str(out)]) == 0
    assert "layer 1 n=3" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["tokens"] == 2000 and set(data["rows"]) == {"0", "1"}
    assert data["zipf_exponent_definition"] == ZIPF_EXPONENT_DEFINITION  # as `engram table stats`
    assert (tmp_path / "z.png").is_file()


def test_gate_categories_and_frequency_bins(run, loaded) -> None:
    from engram.data.corpus import Fact
    from engram.data.shards import load_dataset
    from engram.inspect.analysis import gate_by_frequency, gate_categories

    model, tok = loaded
    facts = [Fact("Prince of Wales", "title", "the king", "The Prince of Wales rode with the king."),
             Fact("Tower of London", "place", "the queen", "The Tower of London held the queen.")]
    cats = gate_categories(tok, n=2, facts=facts, narrative=["the bird sang near an old tree"])
    assert set(cats) >= {"fact sentences", "name last tokens", "shuffled fact tokens", "random tokens"}
    sent, shuffled = cats["fact sentences"][0], cats["shuffled fact tokens"][0]
    assert sorted(sent.ids) == sorted(shuffled.ids) and sent.ids[0] == shuffled.ids[0] == 1  # eos first
    enc = tok.encode(facts[0].sentence)
    name_tokens = [i for i, (a, b) in enumerate(enc.offsets) if a < 19 and b > 4]  # "Prince of Wales"
    last = gate_categories(tok, n=1, facts=facts[:1], narrative=[])["name last tokens"][0].mask
    assert sum(last) == 1 and last[1 + name_tokens[-1]]  # + 1: the eos in front
    assert "unigram random tokens" not in cats
    counts = np.zeros(tok.get_vocab_size())
    counts[[5, 9]] = [3, 1]  # only two ids can be drawn
    uni = gate_categories(tok, n=2, facts=facts, narrative=[], unigram=counts)["unigram random tokens"]
    assert [len(u.ids) for u in uni] == [len(s.ids) for s in cats["fact sentences"]]
    assert all(u.ids[0] == 1 and set(u.ids[1:]) <= {5, 9} for u in uni)
    with pytest.raises(AnalysisError, match="non-negative counts"):
        gate_categories(tok, n=1, facts=facts, narrative=[], unigram=np.ones(3))
    assert sum(cats["word last pieces"][0].mask) == sum(cats["word first pieces"][0].mask)
    assert len(cats["random tokens"][0].ids) == len(sent.ids)
    rows = gate_statistics(model, {k: cats[k] for k in ("word last pieces", "random tokens")})
    assert all(0 < r["mean"] < 1 for r in rows if r["count"])

    tokens = np.asarray(load_dataset(run[1]).train.tokens[:400])
    freq = gate_by_frequency(model, tokens, tokens, window=32)
    l0 = [r for r in freq if r["layer_id"] == 0 and r["branch"] == 0]
    assert sum(r["count"] for r in l0) == (400 - 1) // 32 * 31  # positions 2..32 of each window
    assert next(r for r in l0 if r["bin"] == "0")["count"] == 0  # every evaluated 3-gram is in train


def test_cli_analyze_gates_with_controls(run, tmp_path, capsys) -> None:
    out = tmp_path / "g.json"
    assert main(["analyze", "gates", "--ckpt", str(run[0]), "--n", "4", "--data", str(run[1]),
                 "--freq-tokens", "600", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "token-matched" in text and "unigram random tokens" in text
    data = json.loads(out.read_text())
    assert {r["category"] for r in data["rows"]} >= {"fact sentences", "random tokens", "unigram random tokens"}
    assert {c["b"] for c in data["token_matched"]} == {"random tokens", "unigram random tokens",
                                                      "shuffled fact tokens"}
    assert "memory swap" in text
    assert {r["category"] for r in data["memory_swap"]} >= {"fact sentences", "random tokens",
                                                           "unigram random tokens"}
    assert data["by_frequency"] and all(0 <= r["mean"] <= 1 for r in data["by_frequency"] if r["count"])
    verdicts = data["facts_vs_random"]
    assert {(r["control"], r["measure"]) for r in verdicts} == {
        (c, m) for c in ("random tokens", "unigram random tokens")
        for m in ("raw", "token-matched", "memory swap")}
    raw = next(r for r in verdicts if r["control"] == "random tokens" and r["measure"] == "raw"
               and r["branch"] == 0)
    means = {r["category"]: r["mean"] for r in data["rows"] if r["branch"] == 0
             and r["layer_id"] == raw["layer_id"]}
    assert raw["difference"] == pytest.approx(means["fact sentences"] - means["random tokens"])
    assert "fact sentences against random-token text" in text


def test_facts_vs_random_verdicts() -> None:
    def row(cat, mean, sem):
        return {"category": cat, "layer_id": 1, "branch": 0, "mean": mean, "sem": sem}

    rows = [row("fact sentences", 0.80, 0.003), row("random tokens", 0.70, 0.004),
            row("unigram random tokens", 0.795, 0.004), row("narrative", 0.1, 0.01)]
    matched = [{"a": "fact sentences", "b": "random tokens", "layer_id": 1, "branch": 0,
                "mean_diff": -0.05, "sem": 0.01},
               {"a": "narrative", "b": "unigram random tokens", "layer_id": 1, "branch": 0,
                "mean_diff": 9.0, "sem": 0.01}]  # not about facts: ignored
    swaps = [{"category": "fact sentences", "layer_id": 1, "branch": 0, "mean_diff": 0.03, "sem": 0.003},
             {"category": "random tokens", "layer_id": 1, "branch": 0, "mean_diff": 0.0, "sem": 0.004}]
    got = {(r["control"], r["measure"]): r for r in facts_vs_random(rows, matched, swaps)}
    assert set(got) == {("random tokens", "raw"), ("random tokens", "token-matched"),
                        ("random tokens", "memory swap"), ("unigram random tokens", "raw")}
    assert got[("random tokens", "raw")]["verdict"] == "higher"
    assert got[("random tokens", "raw")]["se"] == pytest.approx(0.005)
    assert got[("random tokens", "token-matched")]["verdict"] == "lower"
    assert got[("random tokens", "memory swap")]["difference"] == pytest.approx(0.03)
    assert got[("random tokens", "memory swap")]["verdict"] == "higher"
    assert got[("unigram random tokens", "raw")]["verdict"] == "no difference"  # 0.005 < 2 * 0.005
    assert facts_vs_random(rows[1:]) == []  # no fact rows: nothing to compare
    with pytest.raises(AnalysisError, match="z=0"):
        facts_vs_random(rows, z=0)
