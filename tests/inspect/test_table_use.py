"""engram analyze table-use: each control does what it says, the model comes back bit for bit,
the fraction of gain kept, the page from the JSON, bad input (tiny trained run, two Engram layers)."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from engram.auto.loader import load
from engram.cli.main import main
from engram.config import StorageConfig
from engram.data.shards import load_dataset
from engram.inspect.analysis import score_samples
from engram.inspect.table_use import (
    CONTROLS,
    TableUseError,
    eval_windows,
    fraction_of_gain_kept,
    mean_rows,
    redrawn_rows,
    shuffled_rows,
    table_control,
    table_use,
    table_use_page,
)
from engram.model.lm import EngramLM
from engram.tables.convert import export_checkpoint_tables
from engram.training.evaluation import evaluate


@pytest.fixture
def model(inspect_run):
    return load(inspect_run[0])


def _ids(model, n=2, t=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.cfg.vocab_size, (n, t), generator=g)


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same(model, snap):
    now = model.state_dict()
    assert now.keys() == snap.keys()
    for k, v in snap.items():
        assert now[k].dtype == v.dtype and torch.equal(now[k], v), k


def _heads(layer):
    start = 0
    for n in layer.multi_head_embedding.head_sizes:
        yield slice(start, start + n)
        start += n


def _sorted_rows(a: torch.Tensor) -> np.ndarray:
    a = a.numpy()
    return a[np.lexsort(a.T[::-1])]


def test_mean_row_makes_every_lookup_equal(model, one_thread) -> None:
    trained = {l.layer_id: l.table.full().clone() for l in model.engram_layers}
    hash_ids = model.compute_hash_ids(_ids(model))
    with table_control(model, "mean_row") as ablate:
        assert ablate is False
        for layer in model.engram_layers:
            w = layer.table.full()
            for s in _heads(layer):
                want = trained[layer.layer_id][s].double().mean(0).float()
                assert torch.equal(w[s], want.expand_as(w[s]))
            # the memory vector e of every position of every sequence is the same
            e = layer.multi_head_embedding(hash_ids[layer.layer_id]).flatten(-2)  # [B,T,E]
            assert torch.equal(e, e[:1, :1].expand_as(e))
            assert len(set(hash_ids[layer.layer_id].flatten().tolist())) > 1  # ... though the ids differ


def test_shuffle_is_a_seeded_permutation_within_each_head(model, one_thread) -> None:
    trained = {l.layer_id: l.table.full().clone() for l in model.engram_layers}
    tables = []
    for seed in (0, 0, 1):
        with table_control(model, "shuffled_rows", seed=seed):
            tables.append({l.layer_id: l.table.full().clone() for l in model.engram_layers})
    for layer in model.engram_layers:
        lid = layer.layer_id
        new, old = tables[0][lid], trained[lid]
        for s in _heads(layer):
            np.testing.assert_array_equal(_sorted_rows(new[s]), _sorted_rows(old[s]))  # same rows, same head
        assert not torch.equal(new, old)  # rows moved
        assert torch.equal(tables[1][lid], new) and not torch.equal(tables[2][lid], new)  # seeded


def test_redrawn_rows_keep_their_norms_not_their_directions(model, one_thread) -> None:
    trained = {l.layer_id: l.table.full().clone() for l in model.engram_layers}
    tables = []
    for seed in (3, 3):
        with table_control(model, "redrawn_rows", seed=seed):
            tables.append({l.layer_id: l.table.full().clone() for l in model.engram_layers})
    for lid, old in trained.items():
        new = tables[0][lid]
        torch.testing.assert_close(new.norm(dim=1), old.norm(dim=1), rtol=1e-5, atol=1e-7)
        cos = torch.nn.functional.cosine_similarity(new, old, dim=1)
        assert cos.abs().mean() < 0.5  # random directions (|cos| ~ 1/sqrt(Dh) on average)
        assert torch.equal(tables[1][lid], new)


def test_row_transforms_on_a_hand_made_table() -> None:
    t = torch.tensor([[1.0, 0.0], [3.0, 4.0], [0.0, 0.0], [5.0, 5.0], [1.0, 1.0]])
    np.testing.assert_array_equal(mean_rows(t, [2, 3]).numpy(),
                                  [[2, 2], [2, 2], [2, 2], [2, 2], [2, 2]])
    p = shuffled_rows(t, [2, 3], torch.Generator().manual_seed(0))
    assert sorted(map(tuple, p[:2].tolist())) == [(1, 0), (3, 4)]
    assert sorted(map(tuple, p[2:].tolist())) == [(0, 0), (1, 1), (5, 5)]
    r = redrawn_rows(t, torch.Generator().manual_seed(0))
    torch.testing.assert_close(r.norm(dim=1), t.norm(dim=1))
    assert torch.equal(r[2], torch.zeros(2))  # a zero row stays zero


def test_reseeded_hash_changes_the_ids_and_nothing_else(model, one_thread) -> None:
    ids = _ids(model, t=16)
    before = model.compute_hash_ids(ids)
    snap, hasher = _snapshot(model), model.hasher
    with table_control(model, "reseeded_hash", seed=0):
        assert model.hasher is not hasher
        assert model.hasher.table_sizes == hasher.table_sizes
        assert model.hasher.cfg.seed == hasher.cfg.seed + 1
        during = model.compute_hash_ids(ids)
        _assert_same(model, snap)  # no weight changed: only the rows the N-grams read
        with torch.no_grad():
            via_new_ids = model(ids).logits
            assert torch.equal(via_new_ids, model(ids, hash_ids=during).logits)
    for lid, h in before.items():
        assert (during[lid] != h).float().mean() > 0.9
    assert model.hasher is hasher
    with torch.no_grad():  # the same model, given the new ids by hand, gives the control's logits
        assert torch.equal(model(ids, hash_ids=during).logits, via_new_ids)
        assert not torch.equal(model(ids).logits, via_new_ids)


@pytest.mark.parametrize("control", CONTROLS)
def test_every_control_leaves_the_model_bit_for_bit(model, control, one_thread) -> None:
    ids = _ids(model)
    snap, hasher = _snapshot(model), model.hasher
    with torch.no_grad():
        want = model(ids).logits
    with table_control(model, control, seed=5) as ablate:
        with torch.no_grad():
            changed = model(ids, ablate_engram=ablate).logits
    assert not torch.equal(changed, want)  # the control did something
    _assert_same(model, snap)
    assert model.hasher is hasher
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)
    with pytest.raises(RuntimeError, match="boom"):  # restored on error too
        with table_control(model, control, seed=5):
            raise RuntimeError("boom")
    _assert_same(model, snap)
    assert model.hasher is hasher


def test_fraction_of_gain_kept() -> None:
    assert fraction_of_gain_kept(5.0, 4.0, 4.0) == 1.0
    assert fraction_of_gain_kept(5.0, 4.0, 5.0) == 0.0
    assert fraction_of_gain_kept(5.0, 4.0, 4.75) == pytest.approx(0.25)
    assert fraction_of_gain_kept(5.0, 4.0, 5.5) == pytest.approx(-0.5)
    assert fraction_of_gain_kept(4.0, 4.0, 4.1) is None  # no gain to keep
    assert fraction_of_gain_kept(3.9, 4.0, 4.1) is None


def test_table_use_scores_each_control_on_the_eval_windows(model, inspect_run, one_thread) -> None:
    shard = load_dataset(inspect_run[1]).val
    samples = eval_windows(shard, 16, 6)
    assert len(samples) == 6 and all(len(s.ids) == 17 for s in samples)
    res = table_use(model, samples, controls=("mean_row", "reseeded_hash"), seed=2, batch_size=4)
    # the trained loss is engram eval's on the same windows
    ev = evaluate(model, shard, batch_size=6, seq_len=16, max_batches=1)
    assert res["loss_trained"] == pytest.approx(ev["loss"], rel=1e-5) and res["tokens"] == ev["tokens"] == 96
    names = [c["control"] for c in res["controls"]]
    assert names == ["removed", "mean_row", "reseeded_hash"]  # removed is always scored, first
    removed = res["controls"][0]
    assert removed["loss"] == pytest.approx(score_samples(model, samples, ablate_engram=True).loss, abs=1e-6)
    assert removed["fraction_kept"] == 0.0
    for c in res["controls"]:
        assert c["delta_loss"] == pytest.approx(c["loss"] - res["loss_trained"])
        assert c["fraction_kept"] == pytest.approx(
            (removed["loss"] - c["loss"]) / (removed["loss"] - res["loss_trained"]))
        with table_control(model, c["control"], seed=2) as ablate:
            assert c["loss"] == score_samples(model, samples, batch_size=4, ablate_engram=ablate).loss
    assert res["engram"]["layers"] == [0, 1]


def test_cli_json_page_and_from_json(inspect_run, tmp_path, capsys, one_thread) -> None:
    run, data = inspect_run
    j, page = tmp_path / "r.json", tmp_path / "page.md"
    cmd = "engram analyze table-use --ckpt RUN --data DATA --windows 4"
    assert main(["analyze", "table-use", "--ckpt", str(run), "--data", str(data), "--windows", "4",
                 "--seq-len", "16", "--label", "tiny", "--note", "made by the fixture", "--json", str(j), "--page", str(page),
                 "--page-command", cmd, "--quiet"]) == 0
    out = capsys.readouterr().out
    r = json.loads(j.read_text())
    assert r["format"] == "engram.table-use/1" and r["kind"] == "run" and r["windows"] == 4 and r["seq_len"] == 16
    assert [c["control"] for c in r["controls"]] == list(CONTROLS)
    text = page.read_text()
    assert text == table_use_page([r], cmd)
    assert f"| trained | {r['loss_trained']:.4f} |" in text and "## tiny\n\nmade by the fixture\n" in text
    assert r["step"] == 3 and "(run, step 3)" in text
    for c in r["controls"]:
        assert f"| {c['loss']:.4f} | {c['delta_loss']:+.4f} |" in text
        assert f"{c['loss']:.4f}" in out
    page2 = tmp_path / "again.md"
    assert main(["analyze", "table-use", "--from-json", str(j), "--page", str(page2), "--page-command", cmd]) == 0
    assert page2.read_text() == text


def _one_line_error(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and match in err, err


def test_bad_input_is_one_line(inspect_run, tmp_path, capsys, one_thread) -> None:
    run, data = inspect_run
    _one_line_error(capsys, ["analyze", "table-use", "--ckpt", str(run)], "needs --ckpt RUN and --data DIR")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    _one_line_error(capsys, ["analyze", "table-use", "--from-json", str(bad), "--page", str(tmp_path / "p.md")],
                    "cannot read a JSON result")
    bad.write_text('{"format": "engram.inspect/1"}')
    _one_line_error(capsys, ["analyze", "table-use", "--from-json", str(bad), "--page", str(tmp_path / "p.md")],
                    "not 'engram.table-use/1'")
    _one_line_error(capsys, ["analyze", "table-use", "--ckpt", str(run), "--data", str(data), "--seq-len", "9999"],
                    "--seq-len 9999 must be in 1..")
    _one_line_error(capsys, ["analyze", "table-use", "--ckpt", str(run), "--data", str(data), "--windows", "0"],
                    "windows=0 must be >= 1")


def test_refuses_models_it_cannot_control(model, inspect_run, tmp_path, one_thread) -> None:
    with pytest.raises(TableUseError, match="unknown control 'zero'; choose from removed"):
        with table_control(model, "zero"):
            pass
    dense = EngramLM(dataclasses.replace(model.cfg, engram=None))
    with pytest.raises(TableUseError, match="no Engram layers"):
        table_use(dense, [])
    export_checkpoint_tables(inspect_run[0], tmp_path / "t.engt")
    served = load(inspect_run[0], storage=StorageConfig(kind="mmap", path=tmp_path / "t.engt", process=False,
                                                     prefetch=False))
    try:
        for control in CONTROLS:
            with pytest.raises(TableUseError, match="served from location 'mmap'.*without --table/--storage"):
                with table_control(served, control):
                    pass
    finally:
        for t in served.engram_tables().values():
            t.close()
