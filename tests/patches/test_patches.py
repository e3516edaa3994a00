"""Knowledge patches: the file format, apply/revert/list on table files and models, the chain
rule, crash safety, patch training and the CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from engram.cli.main import main
from engram.hashing.hasher import NgramHasher
from engram.patches.apply import (
    PAUSE_ENV,
    apply_patch,
    apply_to_model,
    list_patches,
    model_patches,
    revert_from_model,
    revert_patch,
)
from engram.patches.patchfile import (
    PatchChainError,
    PatchFileError,
    PatchMismatchError,
    load_patch,
    make_patch,
    save_patch,
)
from engram.patches.trainer import PatchTrainConfig, encode_texts, train_patch
from engram.tables.tablefile import read_header, read_layer, save_model_tables, write_table

pytestmark = pytest.mark.usefixtures("one_thread")


def _tables(model) -> dict[int, torch.Tensor]:
    return {e.layer_id: e.table.weight.detach().clone() for e in model.engram_layers}


def _edit(base: dict[int, torch.Tensor], rows, delta: float = 0.5) -> dict[int, torch.Tensor]:
    new = {k: v.clone() for k, v in base.items()}
    new[1][list(rows)] += delta
    return new


def _patch(model, base, new, **kw):
    return make_patch(base, new, hash_fingerprint=model.hasher.fingerprint(), hasher=model.hasher.describe(), **kw)


@pytest.fixture
def setup(tmp_path, tiny):
    model = tiny.model()
    table = tmp_path / "t.engt"
    save_model_tables(model, table)
    return model, table, _tables(model)


# ----------------------------------------------------------------------------- format
@pytest.mark.parametrize("quant", ["none", "bf16", "int8"])
def test_round_trip_and_quantisation(tmp_path, setup, quant):
    model, _, base = setup
    new = _edit(base, [3, 50, 700, 4000])
    p = _patch(model, base, new, quantization=quant, name="q", provenance={"steps": 7})
    path = save_patch(p, tmp_path / "a.engp")
    q = load_patch(path)
    assert q.patch_id == p.patch_id and q.meta == p.meta and q.name == "q"
    assert q.layers[1].rows.tolist() == [3, 50, 700, 4000] and q.changed_rows == 4
    assert torch.equal(q.layers[1].old, base[1][[3, 50, 700, 4000]])  # old values exact, always
    got = q.layers[1].new_values(torch.float32)
    want = new[1][[3, 50, 700, 4000]]
    if quant == "none":
        assert torch.equal(got, want)
    else:
        assert (got - want).abs().max() < 0.02 and not torch.equal(got, want)
    assert q.meta["provenance"]["steps"] == 7 and q.meta["base_fingerprint"] != q.meta["result_fingerprint"]
    assert path.stat().st_size < read_header(setup[1]).file_bytes / 10  # small next to the table


def test_corrupt_truncated_and_foreign_files_are_refused(tmp_path, setup):
    model, _, base = setup
    path = save_patch(_patch(model, base, _edit(base, [9, 10])), tmp_path / "a.engp")
    good = path.read_bytes()
    bad = bytearray(good)
    bad[-5] ^= 0x40  # inside the tensor data
    path.write_bytes(bytes(bad))
    with pytest.raises(PatchFileError, match=r"a\.engp: checksum mismatch.*corrupted"):
        load_patch(path)
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(PatchFileError, match="truncated"):
        load_patch(path)
    path.write_bytes(b"\x03\x00")
    with pytest.raises(PatchFileError, match="truncated"):
        load_patch(path)
    other = tmp_path / "x.engp"
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(PatchFileError, match="not an Engram patch"):
        load_patch(other)
    with pytest.raises(FileNotFoundError, match="engram patch train"):
        load_patch(tmp_path / "missing.engp")


# ----------------------------------------------------------------------------- apply / revert
def test_apply_revert_bit_exact_on_table_file(tmp_path, setup):
    model, table, base = setup
    original = table.read_bytes()
    new = _edit(base, [0, 1, 2, 777, 4037], delta=-1.25)
    path = save_patch(_patch(model, base, new, name="facts"), tmp_path / "a.engp")
    res = apply_patch(table, path)
    assert res["changed_rows"] == 5 and res["seconds"] > 0
    assert torch.equal(read_layer(read_header(table), 1), new[1])
    listed = list_patches(table)
    assert [e["patch_id"] for e in listed["patches"]] == [load_patch(path).patch_id]
    assert listed["patches"][0]["name"] == "facts"
    with pytest.raises(PatchChainError, match="already applied"):
        apply_patch(table, path)
    revert_patch(table, path)
    assert table.read_bytes() == original  # bit for bit, header included
    assert list_patches(table)["patches"] == []


def test_apply_revert_on_loaded_model(tmp_path, setup, tiny):
    model, _, base = setup
    new = _edit(base, [5, 6, 1000])
    path = save_patch(_patch(model, base, new), tmp_path / "a.engp")
    x = torch.randint(0, tiny.VOCAB, (2, 16))
    before = model(x).logits
    apply_to_model(model, path)
    assert torch.equal(model.engram_layers[0].table.weight, new[1])
    assert [e["patch_id"] for e in model_patches(model)] == [load_patch(path).patch_id]
    revert_from_model(model, path)
    assert torch.equal(model.engram_layers[0].table.weight, base[1])
    assert torch.equal(model(x).logits, before) and model_patches(model) == []


def test_refuses_other_base_hash_config_and_dtype(tmp_path, setup, tiny):
    model, table, base = setup
    path = save_patch(_patch(model, base, _edit(base, [1])), tmp_path / "a.engp")
    other = tmp_path / "other.engt"  # same hash config, other content (another training run)
    save_model_tables(tiny.model(seed=7), other)
    with pytest.raises(PatchMismatchError, match=r"made for table content .* but .*other\.engt holds"):
        apply_patch(other, path)
    rehashed = NgramHasher(dataclasses.replace(model.cfg.engram, seed=5), tiny.VOCAB, tiny.compression())
    t = _tables(model)
    foreign = tmp_path / "foreign.engt"
    write_table(foreign, t, fingerprint=rehashed.fingerprint(), head_sizes={1: rehashed.head_sizes(1)},
                hasher=rehashed.describe())
    with pytest.raises(PatchMismatchError, match=r"hash configuration.*seed: patch 0, target 5"):
        apply_patch(foreign, path)
    bf16 = tmp_path / "b.engt"
    save_model_tables(model, bf16, dtype="bf16")
    with pytest.raises(PatchMismatchError, match="made for a fp32 table but .* stores bf16"):
        apply_patch(bf16, path)
    assert read_header(other).meta.get("patches") is None  # nothing was written
    trained_elsewhere = tiny.model(seed=7)
    with pytest.raises(PatchMismatchError, match="made for table content"):
        apply_to_model(trained_elsewhere, path)


def test_stacking_and_the_chain_rule(tmp_path, setup):
    model, table, base = setup
    original = table.read_bytes()
    s1 = _edit(base, [10, 11])
    s2 = _edit(s1, [20, 21])
    s3 = _edit(s2, [21, 30])  # overlaps p2 on row 21
    p1 = save_patch(_patch(model, base, s1, name="w1"), tmp_path / "p1.engp")
    p2 = save_patch(_patch(model, s1, s2, name="w2", parent=load_patch(p1).patch_id), tmp_path / "p2.engp")
    p3 = save_patch(_patch(model, s2, s3, name="w3", parent=load_patch(p2).patch_id), tmp_path / "p3.engp")
    with pytest.raises(PatchMismatchError, match=f"apply its parent patch {load_patch(p1).patch_id} first"):
        apply_patch(table, p2)
    assert main(["patch", "apply", str(table), str(p1), str(p2), str(p3)]) == 0
    assert [e["name"] for e in list_patches(table)["patches"]] == ["w1", "w2", "w3"]
    assert torch.equal(read_layer(read_header(table), 1), s3[1])
    with pytest.raises(PatchChainError, match=f"patch {load_patch(p3).patch_id} \\(w3\\).*revert "
                                              f"{load_patch(p3).patch_id} first"):
        revert_patch(table, p2)  # p3 changed row 21 after it
    res = revert_patch(table, p1)  # no later patch touched rows 10, 11: allowed out of order
    assert res["out_of_order"]
    layer = read_layer(read_header(table), 1)
    assert torch.equal(layer[[10, 11]], base[1][[10, 11]]) and torch.equal(layer[[20, 21, 30]], s3[1][[20, 21, 30]])
    revert_patch(table, p3)
    revert_patch(table, p2)
    assert table.read_bytes() == original
    with pytest.raises(PatchChainError, match="not applied"):
        revert_patch(table, p2)


# ----------------------------------------------------------------------------- crash safety
_SLOW_APPLY = textwrap.dedent("""
    import sys
    from engram.patches.apply import apply_patch
    apply_patch(sys.argv[1], sys.argv[2], chunk_rows=64)
""")


def test_killed_mid_apply_leaves_the_old_table(tmp_path, setup):
    model, table, base = setup
    original = table.read_bytes()
    path = save_patch(_patch(model, base, _edit(base, range(0, 4000, 7))), tmp_path / "a.engp")
    env = {**os.environ, PAUSE_ENV: "60", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_APPLY, str(table), str(path)], env=env,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert "engram-patch: paused" in line, line + proc.stderr.read()
        # a reader mid-apply sees the old table, complete and valid
        assert torch.equal(read_layer(read_header(table), 1), base[1])
        assert [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # the new table is being written aside
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert table.read_bytes() == original
    h = read_header(table)
    assert torch.equal(read_layer(h, 1), base[1]) and list_patches(table)["patches"] == []
    apply_patch(table, path)  # the next writer succeeds and sweeps the dead one's temp file
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    revert_patch(table, path)
    assert table.read_bytes() == original


# ----------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny):
    root = tmp_path_factory.mktemp("patchrun")
    data = tiny.dataset(root / "data")
    torch.manual_seed(0)
    model = tiny.save_run(root / "run", data)
    return root, data, model


NEW_TEXT = "Zorbia is a country whose capital is Quexa and whose currency is the florp. " * 3


def test_patch_train_changes_only_rows_the_new_text_hits(tiny_run):
    from engram.data.tokenizer import load_tokenizer, tokenizer_info
    from engram.model.checkpoint import load_model

    root, data, _ = tiny_run
    model, _ = load_model(root / "run")
    tok = load_tokenizer(root / "run" / "tokenizer.json")
    tokens = encode_texts([NEW_TEXT], tok, tokenizer_info(tok).eos_id)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cfg = PatchTrainConfig(steps=6, batch_size=2, seq_len=32, warmup_steps=1)
    patch, rep = train_patch(model, tokens, cfg, progress=False)
    after = model.state_dict()
    table_key = "layers.1.engram.multi_head_embedding.embedding.weight"
    changed_keys = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed_keys == [table_key] and rep["backbone_unchanged"]
    diff = torch.nonzero((before[table_key] != after[table_key]).any(dim=1)).flatten()
    assert torch.equal(patch.layers[1].rows, diff)  # exactly the changed rows are recorded
    # rows any training window can reach (a window's first tokens hash with a truncated context)
    windows = torch.from_numpy(np.stack([tokens[s:s + 32] for s in range(tokens.size - 32)]))
    emb = model.engram_layers[0].multi_head_embedding
    hit = set(emb.rows(model.hasher.hash(windows)[1]).flatten().tolist())
    assert set(diff.tolist()) <= hit and 0 < len(diff) < before[table_key].shape[0]
    assert rep["trainable_table_params"] == before[table_key].numel() and rep["trainable_gate_params"] == 0
    # the patch turns a fresh copy of the base model into the trained one
    fresh, _ = load_model(root / "run")
    apply_to_model(fresh, patch)
    assert torch.equal(fresh.state_dict()[table_key], after[table_key])


def test_patch_train_with_gates_reports_them_separately(tiny_run):
    from engram.data.tokenizer import load_tokenizer
    from engram.model.checkpoint import load_model

    root, _, _ = tiny_run
    model, _ = load_model(root / "run")
    tok = load_tokenizer(root / "run" / "tokenizer.json")
    patch, rep = train_patch(model, encode_texts([NEW_TEXT], tok, 0),
                             PatchTrainConfig(steps=2, batch_size=2, seq_len=32, train_gates=True), progress=False)
    assert rep["trainable_gate_params"] > 0 and rep["gate_params_in_patch"] is False
    assert set(patch.layers) == {1}
    with pytest.raises(ValueError, match="quantization='int4'"):
        PatchTrainConfig(quantization="int4")


def test_patch_train_uses_the_main_loops_schedule_and_step(tiny_run, monkeypatch):
    from engram.data.tokenizer import load_tokenizer
    from engram.model.checkpoint import load_model
    from engram.patches import trainer as patch_trainer
    from engram.training.optimization import lr_at, optimizer_step

    root, _, _ = tiny_run
    model, _ = load_model(root / "run")
    tok = load_tokenizer(root / "run" / "tokenizer.json")
    seen = []

    def spy(optimizers, params, grad_clip):
        seen.append(({k: [g["lr"] for g in o.param_groups] for k, o in optimizers.items()}, grad_clip))
        return optimizer_step(optimizers, params, grad_clip)

    monkeypatch.setattr(patch_trainer, "optimizer_step", spy)
    cfg = PatchTrainConfig(steps=4, batch_size=2, seq_len=32, warmup_steps=2, lr=1e-2, table_lr_mult=3.0,
                           min_lr_ratio=0.2, grad_clip=0.5, train_gates=True)
    train_patch(model, encode_texts([NEW_TEXT], tok, 0), cfg, progress=False)
    assert len(seen) == 4
    for step, (lrs, clip) in enumerate(seen):
        lr = lr_at(step, lr=1e-2, warmup_steps=2, steps=4, min_lr_ratio=0.2)
        assert lrs == {"tables": [lr * 3.0], "gates": [lr]} and clip == 0.5


def test_cli_end_to_end(tiny_run, tmp_path, capsys):
    root, data, _ = tiny_run
    run = root / "run"
    table = tmp_path / "t.engt"
    assert main(["table", "convert", str(run), str(table), "--quiet"]) == 0
    original = table.read_bytes()
    (tmp_path / "new.txt").write_text(NEW_TEXT)
    capsys.readouterr()
    assert main(["patch", "train", "--ckpt", str(run), "--data", str(tmp_path / "new.txt"), "--out",
                 str(tmp_path / "p.engp"), "--table", str(table), "--steps", "4", "--batch-size", "2",
                 "--seq-len", "32", "--name", "zorbia", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["backbone_unchanged"] and rep["patch_bytes"] < rep["table_bytes"] and rep["parent"] is None
    assert main(["patch", "info", str(tmp_path / "p.engp"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "zorbia"
    assert main(["patch", "apply", str(table), str(tmp_path / "p.engp")]) == 0
    assert "applied" in capsys.readouterr().out
    assert main(["patch", "list", str(table), "--json"]) == 0
    assert [e["name"] for e in json.loads(capsys.readouterr().out)["patches"]] == ["zorbia"]
    # a second patch trained on the patched table stacks on the first
    assert main(["patch", "train", "--ckpt", str(run), "--data", str(tmp_path / "new.txt"), "--out",
                 str(tmp_path / "p2.engp"), "--table", str(table), "--steps", "2", "--batch-size", "2",
                 "--seq-len", "32", "--seed", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["parent"] == rep["patch_id"]
    assert main(["eval", "--ckpt", str(run), "--data", str(data), "--table", str(table),
                 "--storage", "memory", "--max-batches", "1"]) == 0
    capsys.readouterr()
    assert main(["patch", "revert", str(table), str(tmp_path / "p.engp")]) == 0
    assert table.read_bytes() == original
    assert main(["patch", "revert", str(table), str(tmp_path / "p.engp")]) == 2
    err = capsys.readouterr().err
    assert "engram: error:" in err and "is not applied" in err
    assert main(["patch", "apply", str(table), str(tmp_path / "p2.engp")]) == 2
    assert "apply its parent patch" in capsys.readouterr().err


# ----------------------------------------------------------------------------- protection / rehearsal
def _new_text_setup(tiny_run):
    from engram.data.shards import load_dataset
    from engram.data.tokenizer import load_tokenizer, tokenizer_info
    from engram.model.checkpoint import load_model
    from engram.tables.access import row_access_counts

    root, data, _ = tiny_run
    model, _ = load_model(root / "run")
    tok = load_tokenizer(root / "run" / "tokenizer.json")
    tokens = encode_texts([NEW_TEXT], tok, tokenizer_info(tok).eos_id)
    original = np.asarray(load_dataset(data).train.tokens)
    counts = row_access_counts(model, original)
    windows = torch.from_numpy(np.stack([tokens[s:s + 32] for s in range(tokens.size - 32)]))
    emb = model.engram_layers[0].multi_head_embedding
    hit = torch.zeros(emb.num_rows, dtype=torch.bool)
    hit[emb.rows(model.hasher.hash(windows)[1]).flatten()] = True
    # a threshold that protects some of the rows the new text reads and leaves others free
    min_count = int(np.median(counts[1][hit.numpy() & (counts[1] > 0)]))
    return model, tokens, original, counts, hit, max(min_count, 1)


def test_row_access_counts_match_the_layer_lookup(tiny_run):
    from engram.tables.access import row_access_counts

    model, tokens, _, _, _, _ = _new_text_setup(tiny_run)
    counts = row_access_counts(model, tokens, chunk=50)  # chunking restarts the pad prefix
    emb = model.engram_layers[0].multi_head_embedding
    want = np.zeros(emb.num_rows, dtype=np.int64)
    for a in range(0, tokens.size, 50):
        rows = emb.rows(model.hasher.hash(torch.from_numpy(tokens[a:a + 50])[None])[1])
        np.add.at(want, rows.flatten().numpy(), 1)
    assert np.array_equal(counts[1], want) and counts[1].sum() == tokens.size * model.cfg.engram.num_heads_total


def test_protected_rows_never_change(tiny_run):
    model, tokens, original, counts, hit, min_count = _new_text_setup(tiny_run)
    key = "layers.1.engram.multi_head_embedding.embedding.weight"
    w0 = model.state_dict()[key].clone()
    cfg = PatchTrainConfig(steps=6, batch_size=2, seq_len=32, warmup_steps=1, lr=3e-2, protect_min_count=min_count)
    patch, rep = train_patch(model, tokens, cfg, original_tokens=original, progress=False)
    protected = torch.from_numpy(counts[1] >= min_count)
    w1 = model.state_dict()[key]
    assert torch.equal(w1[protected], w0[protected])  # bit for bit
    changed = set(patch.layers[1].rows.tolist())
    assert changed and not changed & set(torch.nonzero(protected).flatten().tolist())
    assert changed <= set(torch.nonzero(hit & ~protected).flatten().tolist())
    assert rep["protected_rows"] == {"1": int(protected.sum())} and rep["protect_min_count"] == min_count
    assert 0 < rep["touched_protected_rows"]["1"] < rep["touched_rows"]["1"] and rep["backbone_unchanged"]
    # precomputed counts give the same patch; protect_min_count=0 disables protection
    model2 = _new_text_setup(tiny_run)[0]
    patch2, _ = train_patch(model2, tokens, cfg, original_tokens=original, row_counts=counts, progress=False)
    assert torch.equal(patch2.layers[1].rows, patch.layers[1].rows)
    assert torch.equal(patch2.layers[1].new, patch.layers[1].new)
    model3 = _new_text_setup(tiny_run)[0]
    patch3, rep3 = train_patch(model3, tokens, dataclasses.replace(cfg, protect_min_count=0),
                               original_tokens=original, progress=False)
    assert rep3["protect_min_count"] == 0 and patch3.changed_rows > patch.changed_rows


def test_rehearsal_keeps_the_patch_to_allowed_rows(tiny_run):
    model, tokens, original, counts, hit, min_count = _new_text_setup(tiny_run)
    key = "layers.1.engram.multi_head_embedding.embedding.weight"
    w0 = model.state_dict()[key].clone()
    cfg = PatchTrainConfig(steps=5, batch_size=2, seq_len=32, warmup_steps=1, lr=3e-2,
                           protect_min_count=min_count, rehearsal=1.0, rehearsal_batch_size=3)
    patch, rep = train_patch(model, tokens, cfg, original_tokens=original, row_counts=counts, progress=False)
    allowed = hit & torch.from_numpy(counts[1] < min_count)
    changed = torch.nonzero((model.state_dict()[key] != w0).any(dim=1)).flatten()
    assert torch.equal(changed, patch.layers[1].rows) and len(changed) > 0
    assert bool(allowed[changed].all())  # only rows the new text reads, none of them protected
    assert rep["rehearsal"] == 1.0 and np.isfinite(rep["loss_orig_last"]) and rep["backbone_unchanged"]
    # the original-corpus batches alone reach far more rows than the patch may change
    emb = model.engram_layers[0].multi_head_embedding
    orig_rows = emb.rows(model.hasher.hash(torch.from_numpy(np.array(original[:2000], dtype=np.int64))[None])[1]).unique()
    assert len(set(orig_rows.tolist()) - set(torch.nonzero(allowed).flatten().tolist())) > 0


def _loss_on(model, tokens: np.ndarray, n: int = 8, T: int = 32) -> float:
    starts = np.linspace(0, tokens.size - T - 1, n).astype(int)
    w = torch.from_numpy(np.stack([tokens[s:s + T + 1] for s in starts]).astype(np.int64))
    model.eval()
    with torch.no_grad():
        return float(model(w[:, :-1], w[:, 1:]).loss)


def test_rehearsal_is_automatic_and_holds_the_original_loss(tiny_run):
    model, tokens, original, counts, _, _ = _new_text_setup(tiny_run)
    before = _loss_on(model, original)
    cfg = PatchTrainConfig(steps=30, batch_size=4, seq_len=32, warmup_steps=1, lr=5e-2)
    assert cfg.rehearsal is None and cfg.protect_min_count == 0  # the defaults
    _, rep = train_patch(model, tokens, cfg, original_tokens=original, row_counts=counts, progress=False)
    assert rep["rehearsal"] == 1.0 and rep["protect_min_count"] == 0  # original corpus given: rehearse
    with_rehearsal = _loss_on(model, original)
    plain, _ = _new_text_setup(tiny_run)[:2]
    _, rep0 = train_patch(plain, tokens, cfg, progress=False)
    assert rep0["rehearsal"] == 0.0 and "loss_orig_last" not in rep0  # no corpus: nothing to rehearse
    without = _loss_on(plain, original)
    # the same steps on the new text leave the original corpus better off when it is rehearsed
    assert with_rehearsal < without - 0.01, (before, with_rehearsal, without)


def test_protection_and_rehearsal_config_errors(tiny_run, tmp_path, capsys):
    from engram.cli.flags import config_from_args
    from engram.cli.main import build_parser
    from engram.config import PatchBenchConfig, parse_variant
    from engram.patches.patchfile import PatchError

    # the flags of `engram patch train` are generated from PatchTrainConfig: same defaults, one place
    args = build_parser().parse_args(["patch", "train", "--ckpt", "r", "--data", "t.txt", "--out", "p.engp"])
    assert config_from_args(args, PatchTrainConfig) == PatchTrainConfig()
    with pytest.raises(PatchError, match=r"protect_min_count=-1 must be an integer >= 0 \(0 disables"):
        PatchTrainConfig(protect_min_count=-1)
    with pytest.raises(PatchError, match=r"rehearsal=-0.5 must be >= 0 \(0 disables"):
        PatchTrainConfig(rehearsal=-0.5)
    with pytest.raises(PatchError, match=r"rehearsal_batch_size=-2 must be >= 0"):
        PatchTrainConfig(rehearsal_batch_size=-2)
    model, tokens, _, _, _, _ = _new_text_setup(tiny_run)
    with pytest.raises(PatchError, match=r"rehearsal=1.0 needs the original corpus: pass --original-data DIR"):
        train_patch(model, tokens, PatchTrainConfig(steps=1, seq_len=32, rehearsal=1.0), progress=False)
    assert parse_variant("steps=600, rehearsal=1") == {"steps": 600, "rehearsal": 1.0}
    with pytest.raises(PatchError, match=r"'bogus=1' is not KEY=VALUE with KEY one of"):
        PatchBenchConfig(variants=("bogus=1",))
    with pytest.raises(PatchError, match=r"steps='many' must be an integer"):
        parse_variant("steps=many")
    with pytest.raises(PatchError, match="protect_min_count=-3"):
        PatchBenchConfig(protect_min_count=-3)
    root, data, _ = tiny_run
    (tmp_path / "new.txt").write_text(NEW_TEXT)
    args = ["patch", "train", "--ckpt", str(root / "run"), "--data", str(tmp_path / "new.txt"), "--out",
            str(tmp_path / "p.engp"), "--steps", "2", "--batch-size", "2", "--seq-len", "32"]
    capsys.readouterr()
    assert main(args + ["--rehearsal", "0.5"]) == 2
    assert "rehearsal=0.5 needs the original corpus: pass --original-data DIR" in capsys.readouterr().err
    assert main(args + ["--original-data", str(tmp_path / "nowhere")]) == 2
    assert "--original-data" in capsys.readouterr().err
    assert main(args + ["--original-data", str(data), "--protect-min-count", "2", "--rehearsal", "0.5", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["protected_rows"]["1"] > 0 and rep["protect_min_count"] == 2 and rep["rehearsal"] == 0.5
    assert load_patch(tmp_path / "p.engp").meta["provenance"]["original_data"] == str(data)
    assert main(args + ["--original-data", str(data), "--json"]) == 0  # rehearsal by default
    rep = json.loads(capsys.readouterr().out)
    assert rep["rehearsal"] == 1.0 and rep["protect_min_count"] == 0
    assert main(args + ["--quiet"]) == 0
    assert "the original corpus was not given" in capsys.readouterr().out
