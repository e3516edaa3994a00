"""engram analyze table-use on a retrofitted model (tiny Llama): the controls act on the adapter's
tables and hash, the model comes back bit for bit, an adapter directory works as --ckpt, and a
table served from its file is refused."""

import json

import pytest
import torch

from engram.auto.loader import load
from engram.cli.main import main
from engram.config import StorageConfig
from engram.data.shards import load_dataset
from engram.inspect.table_use import CONTROLS, TableUseError, eval_windows, table_control, table_use
from engram.retrofit.adapter import save_adapter


@pytest.fixture(scope="module")
def retrofitted(random_retrofit):
    """A RetrofitLM with Engram before decoder layers 0 and 2 and random Engram weights (at init its
    output is exactly zero, so no control could change anything), and its base."""
    model, base = random_retrofit()
    yield model, base
    model.remove_hooks()


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, snap) -> bool:
    now = model.state_dict()
    return now.keys() == snap.keys() and all(torch.equal(now[k], v) for k, v in snap.items())


@pytest.mark.parametrize("control", CONTROLS)
def test_controls_change_the_adapter_and_restore_it(retrofitted, tiny_base, control, one_thread) -> None:
    model, _ = retrofitted
    ids = torch.as_tensor(load_dataset(tiny_base["data"]).val.tokens[:24].astype("int64"))[None]
    snap, hasher = _snapshot(model), model.hasher
    with torch.no_grad():
        want = model(ids).logits
    with table_control(model, control, seed=1) as ablate:
        with torch.no_grad():
            got = model(ids, ablate_engram=ablate).logits
        if control == "mean_row":  # every lookup of a head returns the same row
            for e in model.engram_layers:
                v = e.multi_head_embedding(model.compute_hash_ids(ids)[e.layer_id]).flatten(-2)
                assert torch.equal(v, v[:, :1].expand_as(v))
        if control == "reseeded_hash":
            assert _same(model, snap)  # only the hash changed
            assert not torch.equal(model.compute_hash_ids(ids)[0], hasher.hash(ids)[0])
    assert not torch.equal(got, want)
    assert _same(model, snap) and model.hasher is hasher
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)


def test_adapter_as_ckpt_and_served_tables_refused(retrofitted, tiny_base, tmp_path, capsys, one_thread) -> None:
    model, base = retrofitted
    save_adapter(tmp_path / "a", model, base)
    j = tmp_path / "r.json"
    assert main(["analyze", "table-use", "--ckpt", str(tmp_path / "a"), "--data", str(tiny_base["data"]),
                 "--windows", "3", "--seq-len", "16", "--json", str(j), "--quiet"]) == 0
    r = json.loads(j.read_text())
    assert r["kind"] == "adapter" and r["engram"]["layers"] == [0, 2] and r["tokens"] == 48
    # the same numbers from the library on the loaded adapter
    loaded = load(tmp_path / "a")
    try:
        samples = eval_windows(load_dataset(tiny_base["data"]).val, 16, 3)
        again = table_use(loaded, samples, pad_id=base.pad_id)
        assert [c["loss"] for c in again["controls"]] == [c["loss"] for c in r["controls"]]
    finally:
        loaded.remove_hooks()
    served = load(tmp_path / "a", storage=StorageConfig(kind="mmap", path=tmp_path / "a" / "tables.engt",
                                                         process=False, prefetch=False))
    try:
        with pytest.raises(TableUseError, match="layer 0's table is served from location 'mmap'"):
            with table_control(served, "shuffled_rows"):
                pass
    finally:
        served.remove_hooks()
