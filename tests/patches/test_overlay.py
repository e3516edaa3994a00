"""Patches read per call over a shared table (``model(ids, patches=[...])``): on every storage tier
and on retrofit adapters the logits are bit for bit those of a copy of the table with the patches
applied (``patch apply a b``), no patches give the base exactly, and the shared table is never
written."""

from __future__ import annotations

import copy
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from engram.config import SamplingConfig, StorageConfig, preset
from engram.model.generation import generate as library_generate
from engram.model.lm import EngramLM
from engram.model.table import RowOverlay, TableError, engram_tables, merge_overlays
from engram.patches.apply import apply_patch, apply_to_model, model_fingerprint, revert_from_model
from engram.patches.overlay import stack_patches, table_content_fingerprint
from engram.patches.patchfile import PatchChainError, PatchMismatchError, load_patch, make_patch, save_patch
from engram.tables.process import open_layer_storage
from engram.tables.runtime import attach_tables, table_runtime
from engram.tables.tablefile import open_table, read_layer, save_model_tables
from engram.tables.tiers import MemoryStorage
from engram.tables.trainable import TieredEmbedding, place_tables

pytestmark = pytest.mark.usefixtures("one_thread")

LAYER = 1  # the tiny preset's Engram layer


def _model(seed: int = 0) -> EngramLM:
    torch.manual_seed(seed)
    model = EngramLM(preset("tiny", 300), np.arange(300, dtype=np.int64) // 2).eval()
    with torch.no_grad():
        for t in engram_tables(model).values():
            t.weight.normal_()  # distinct rows, so that a wrong row shows in the logits
    return model


def _ids(model: EngramLM, n: int = 40, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.cfg.vocab_size, (2, n), generator=g)


def _read_rows(model, ids: torch.Tensor) -> torch.Tensor:
    """Rows of the Engram layer that ``ids`` read (so that patches change what the model computes)."""
    e = model.engram_layers[0]
    return torch.unique(e.multi_head_embedding.rows(model.compute_hash_ids(ids)[e.layer_id]))


def _tables(model) -> dict[int, torch.Tensor]:
    return {e.layer_id: e.table.full().clone() for e in model.engram_layers}


def _patch(model, base, rows, delta, dtype="fp32", **kw):
    new = {k: v.clone() for k, v in base.items()}
    new[LAYER][rows] += delta
    if dtype == "bf16":  # a bf16 table holds bf16 values: the patch's new rows are bf16 too
        base = {k: v.to(torch.bfloat16) for k, v in base.items()}
        new = {k: v.to(torch.bfloat16) for k, v in new.items()}
    return make_patch(base, new, hash_fingerprint=model.hasher.fingerprint(), hasher=model.hasher.describe(),
                      dtype=dtype, **kw), new


def _chain(model, ids, dtype="fp32"):
    """(a, b, c): b made on top of a (rows overlapping a's), c made on the base independently
    (also overlapping a's rows)."""
    rows = _read_rows(model, ids)
    base = _tables(model)
    a, after_a = _patch(model, base, rows[::3], 0.75, dtype, name="a")
    b, _ = _patch(model, {k: v.float() for k, v in after_a.items()}, rows[::5], -1.5, dtype, name="b",
                  parent=a.patch_id)
    c, _ = _patch(model, base, rows[1::4], 2.0, dtype, name="c")
    return a, b, c


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- in memory (EngramLM)
def test_memory_tables_patches_equal_applying_them_to_a_copy() -> None:
    model = _model()
    ids = _ids(model)
    a, b, c = _chain(model, ids)
    before = model_fingerprint(model)
    base_logits = model(ids).logits
    assert torch.equal(model(ids, patches=[]).logits, base_logits)  # no patches: the base exactly
    got_ab = model(ids, patches=[a, b]).logits
    got_a = model(ids, patches=[a]).logits
    assert model_fingerprint(model) == before  # the shared table was not written
    assert not torch.equal(got_a, base_logits) and not torch.equal(got_ab, got_a)

    ref = copy.deepcopy(model)
    apply_to_model(ref, a)
    assert torch.equal(ref(ids).logits, got_a)
    apply_to_model(ref, b)  # what `patch apply a b` leaves
    assert torch.equal(ref(ids).logits, got_ab)
    # the checked, merged stack gives the same, and so does generation, step by step
    stack = stack_patches(model, [a, b])
    assert torch.equal(model(ids, patches=[stack]).logits, got_ab)
    sampling = SamplingConfig(max_new_tokens=8, temperature=0.0)
    assert torch.equal(model.generate(ids, sampling, patches=[a, b]), ref.generate(ids, sampling))
    assert torch.equal(model.generate(ids, sampling, patches=[]), model.generate(ids, sampling))
    assert model_fingerprint(model) == before


def test_later_patch_wins_on_rows_both_touch() -> None:
    """c was made on the base, independently of a: stacked after a it supersedes a on the rows
    both changed; a's other rows still apply (the documented update rule)."""
    model = _model()
    ids = _ids(model)
    a, _, c = _chain(model, ids)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        w = ref.engram_layers[0].table.weight
        w[a.layers[LAYER].rows] = a.layers[LAYER].new
        w[c.layers[LAYER].rows] = c.layers[LAYER].new
    assert torch.equal(model(ids, patches=[a, c]).logits, ref(ids).logits)
    assert not torch.equal(model(ids, patches=[c, a]).logits, ref(ids).logits)  # the order matters
    stack = stack_patches(model, [a, c])  # allowed by the stacking rule: both were made on the base
    assert torch.equal(model(ids, patches=[stack]).logits, ref(ids).logits)


def test_merge_overlays_keeps_the_last_value_of_each_row() -> None:
    one = RowOverlay.of(torch.tensor([5, 1, 9]), torch.tensor([[1.0], [2.0], [3.0]]))
    two = RowOverlay.of(torch.tensor([9, 0]), torch.tensor([[30.0], [40.0]]))
    m = merge_overlays([one, two])
    assert m.rows.tolist() == [0, 1, 5, 9] and m.values.flatten().tolist() == [40.0, 2.0, 1.0, 30.0]


def test_stack_rule_refuses_what_apply_could_not_give() -> None:
    model = _model()
    ids = _ids(model)
    a, b, c = _chain(model, ids)
    with pytest.raises(PatchMismatchError, match=r"list its parent patch .* before it"):
        stack_patches(model, [b])
    with pytest.raises(PatchChainError, match="listed twice"):
        stack_patches(model, [a, a])
    other = _model(seed=1)  # same hash configuration, other table content
    with pytest.raises(PatchMismatchError, match="retrain it on this table"):
        stack_patches(other, [a])
    with pytest.raises(TableError, match="not a loaded patch"):
        model(ids, patches=["a.engp"])


# ----------------------------------------------------------------------------- served from a file, working files
def _served(model: EngramLM, path: Path, kind: str, process: bool = False) -> EngramLM:
    m = copy.deepcopy(model)
    header = open_table(path, m.hasher, m.cfg.engram.head_dim)
    cfg = StorageConfig(path=str(path), kind=kind, cache_rows=16, process=process, io_threads=2)
    attach_tables(m, {lid: (MemoryStorage(read_layer(header, lid)) if kind == "memory"
                            else open_layer_storage(cfg, header, lid)) for lid in engram_tables(m)}, prefetch=True)
    return m


@pytest.mark.parametrize("kind,dtype,process", [("mmap", "fp32", False), ("cached", "fp32", False),
                                                ("mmap", "bf16", False), ("cached", "bf16", True),
                                                ("memory", "bf16", False)])
def test_served_tables_patches_equal_patch_apply_on_a_copy(tmp_path, kind, dtype, process) -> None:
    model = _model()
    ids = _ids(model)
    table = tmp_path / "t.engt"
    save_model_tables(model, table, dtype)
    a, b, _ = _chain(model, ids, dtype)
    patched = tmp_path / "patched.engt"
    shutil.copyfile(table, patched)
    apply_patch(patched, a)
    apply_patch(patched, b)  # `engram patch apply patched.engt a b`
    before = _digest(table)
    served, ref = _served(model, table, kind, process), _served(model, patched, kind, process)
    try:
        base = served(ids).logits
        assert torch.equal(served(ids, patches=[]).logits, base)
        stack = stack_patches(served, [a, b], table_file=table)  # the base fingerprint from the header
        assert stack.base_fingerprint == table_content_fingerprint(served, dtype)  # ... = the rows' CRCs
        got = served(ids, patches=[a, b]).logits
        assert torch.equal(got, ref(ids).logits) and not torch.equal(got, base)
        assert torch.equal(served(ids, patches=[stack]).logits, got)
        sampling = SamplingConfig(max_new_tokens=6, temperature=0.0)
        assert torch.equal(served.generate(ids, sampling, patches=[stack]), ref.generate(ids, sampling))
        assert torch.equal(served(ids).logits, base)  # nothing of the patches stayed behind
    finally:
        for m in (served, ref):
            table_runtime(m).close()
    assert _digest(table) == before  # the shared file was not written


@pytest.mark.parametrize("kind", ["mmap", "cached"])
def test_working_tier_patches_equal_applying_them(tmp_path, kind) -> None:
    model = _model()
    ids = _ids(model)
    a, b, _ = _chain(model, ids)
    ref = copy.deepcopy(model)
    apply_to_model(ref, a)
    apply_to_model(ref, b)
    m = copy.deepcopy(model)
    place_tables(m, kind, tmp_path / "work", cache_rows=16)
    try:
        before = table_content_fingerprint(m)
        assert torch.equal(m(ids, patches=[]).logits, model(ids).logits)
        assert torch.equal(m(ids, patches=[stack_patches(m, [a, b])]).logits, ref(ids).logits)
        assert table_content_fingerprint(m) == before
    finally:
        for t in engram_tables(m).values():
            if isinstance(t, TieredEmbedding):
                t.close()


# ----------------------------------------------------------------------------- retrofit adapters
def test_retrofit_patches_equal_applying_them() -> None:
    transformers = pytest.importorskip("transformers")
    from engram.config import RetrofitConfig
    from engram.retrofit.model import RetrofitLM

    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   pad_token_id=0, eos_token_id=1, bos_token_id=1)
    torch.manual_seed(0)
    rcfg = RetrofitConfig(base="tiny-llama", layers=(1,), rows_per_head=997, n_embed_per_ngram=32,
                          n_head_per_ngram=2)
    model = RetrofitLM(transformers.LlamaForCausalLM(cfg), rcfg, np.arange(300, dtype=np.int64) // 2, 0).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # Engram adds exactly zero at init: random weights make it count
        for e in model.engram_layers:
            for p in e.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    ids = _ids(model, 24)
    rows = _read_rows(model, ids)
    base_tables = _tables(model)
    new = {k: v.clone() for k, v in base_tables.items()}
    new[1][rows[::2]] += 1.0
    a = make_patch(base_tables, new, hash_fingerprint=model.hasher.fingerprint(), hasher=model.hasher.describe())
    before = model_fingerprint(model)
    base = model(ids).logits
    assert torch.equal(model(ids, patches=[]).logits, base)
    got = model(ids, patches=[a]).logits
    sampling = SamplingConfig(max_new_tokens=5, temperature=0.0)
    got_gen = model.generate(ids, sampling, patches=[stack_patches(model, [a])])
    assert model_fingerprint(model) == before and not torch.equal(got, base)
    apply_to_model(model, a)
    try:
        assert torch.equal(model(ids).logits, got)
        assert torch.equal(model.generate(ids, sampling), got_gen)
    finally:
        revert_from_model(model, a)
    assert model_fingerprint(model) == before


# ----------------------------------------------------------------------------- the command line
def test_generate_patch_flag_equals_generating_from_a_patched_copy(tmp_path, inspect_run, capsys) -> None:
    from engram.auto.loader import load
    from engram.cli.main import main

    run, _ = inspect_run
    table = tmp_path / "t.engt"
    assert main(["table", "convert", str(run), str(table)]) == 0
    model = load(str(run))
    base = _tables(model)
    prompt = "the prince of wales rode with the king"
    tok = model.loaded_from.require_tokenizer()
    ids = torch.tensor([tok.encode(prompt).ids])
    new = {k: v * 50.0 for k, v in base.items()}  # every row, loud: this barely trained model must notice
    p = save_patch(make_patch(base, new, hash_fingerprint=model.hasher.fingerprint(),
                              hasher=model.hasher.describe()), tmp_path / "a.engp")
    patched = tmp_path / "patched.engt"
    shutil.copyfile(table, patched)
    apply_patch(patched, p)
    before = _digest(table)
    # sampled (fixed seed), so that any difference in the probabilities shows in the text
    gen = ["generate", "--ckpt", str(run), "--prompt", prompt, "--temperature", "1.0", "--seed", "5",
           "--max-new-tokens", "16", "--top-p", "1.0"]
    capsys.readouterr()
    outs = {}
    for name, extra in (("overlay", ["--table", str(table), "--storage", "mmap", "--patch", str(p)]),
                        ("applied", ["--table", str(patched), "--storage", "mmap"]),
                        ("overlay-ckpt", ["--patch", str(p)])):  # the checkpoint's own tables, in memory
        assert main(gen + extra) == 0
        outs[name] = capsys.readouterr().out
    assert outs["overlay"] == outs["applied"] == outs["overlay-ckpt"]
    sampling = SamplingConfig(max_new_tokens=16, temperature=1.0, top_p=1.0, seed=5)
    base_text = tok.decode(library_generate(model, ids, sampling)[0].tolist())
    assert outs["overlay"].strip() != base_text.strip()  # the patch changed what was sampled
    assert outs["overlay"].strip() == tok.decode(library_generate(model, ids, sampling, patches=[load_patch(p)])[0]
                                                 .tolist()).strip()
    assert _digest(table) == before
    other = save_patch(make_patch(base, new, hash_fingerprint="0" * 64), tmp_path / "other.engp")
    assert main(gen + ["--patch", str(other)]) == 2  # refused before generating
    assert "hash configuration" in capsys.readouterr().err



# ----------------------------------------------------------------------------- keyed patches
def _keyed_patch(model, ids, delta, pick=slice(None, None, 3), name="k", parent=None):
    """A keyed patch over the N-grams of ``ids``' first sequence: every ``pick``-th (head, N-gram)
    entry takes its row's value + ``delta``."""
    from engram.patches.patchfile import make_keyed_patch

    e = model.engram_layers[0]
    hid = model.compute_hash_ids(ids[:1])[e.layer_id].reshape(-1, len(e.multi_head_embedding.head_sizes))  # [T, H]
    keys, first = torch.unique(e.multi_head_embedding.keys(hid).reshape(-1), return_inverse=True)
    rows_all = e.multi_head_embedding.rows(hid).reshape(-1)
    rows = torch.zeros_like(keys)
    rows[first] = rows_all
    keys, rows = keys[pick], rows[pick]
    base = _tables(model)
    return make_keyed_patch(base, {LAYER: (keys, rows, base[LAYER][rows] + delta)},
                            hash_fingerprint=model.hasher.fingerprint(), hasher=model.hasher.describe(),
                            name=name, parent=parent)


def _reference_keyed(model, ids, patch) -> torch.Tensor:
    """What a keyed patch should give, computed the slow way: each position's head reads the
    entry whose key equals its own, looked up one by one in a dict."""
    e = model.engram_layers[0]
    lp = patch.layers[LAYER]
    table = dict(zip(lp.keys.tolist(), lp.new))
    mhe = e.multi_head_embedding
    orig = mhe.forward

    def slow(hash_ids, overlay=None):
        out = orig(hash_ids, overlay).clone()
        keys = mhe.keys(hash_ids)
        for idx in np.ndindex(*keys.shape):
            v = table.get(int(keys[idx]))
            if v is not None:
                out[idx] = v
        return out

    mhe.forward = slow
    try:
        return model(ids).logits
    finally:
        del mhe.forward


def test_keyed_patch_reads_only_its_ngrams_and_serves_like_installing_it(tmp_path) -> None:
    model = _model()
    ids = _ids(model, n=24)
    k = _keyed_patch(model, ids, 0.75)
    k = load_patch(save_patch(k, tmp_path / "k.engp"))
    assert k.keyed and k.meta["version"] == 2 and k.meta["result_fingerprint"] == k.meta["base_fingerprint"]
    base_logits = model(ids).logits
    got = model(ids, patches=[k]).logits
    assert not torch.equal(got, base_logits)
    assert torch.equal(got, _reference_keyed(model, ids, k))  # the fast path against the slow one
    # other text: the second sequence's N-grams are not the patch's, so it reads the table as before
    assert torch.equal(got[1], base_logits[1])
    before = model_fingerprint(model)
    ref = copy.deepcopy(model)
    apply_to_model(ref, k)
    assert model_fingerprint(ref) == before  # installing writes no row
    assert torch.equal(ref(ids).logits, got)
    sampling = SamplingConfig(max_new_tokens=6, temperature=0.0)
    assert torch.equal(model.generate(ids, sampling, patches=[k]), ref.generate(ids, sampling))
    with pytest.raises(PatchChainError, match="already applied"):
        apply_to_model(ref, k)
    revert_from_model(ref, k)
    assert torch.equal(ref(ids).logits, base_logits)


def test_keyed_and_row_patches_stack_and_a_table_file_refuses_a_keyed_one(tmp_path) -> None:
    model = _model()
    ids = _ids(model, n=24)
    a, _, _ = _chain(model, ids)
    k = _keyed_patch(model, ids, -1.0)
    ref = copy.deepcopy(model)
    apply_to_model(ref, k)  # keyed entries installed; the tables keep their content ...
    apply_to_model(ref, a)  # ... so a patch made on them applies on top (its rows are written)
    stack = stack_patches(model, [k, a])
    assert torch.equal(model(ids, patches=[k, a]).logits, ref(ids).logits)  # keyed entries win where both apply
    assert torch.equal(model(ids, patches=[stack]).logits, ref(ids).logits)
    assert not torch.equal(ref(ids).logits, model(ids, patches=[a]).logits)
    revert_from_model(ref, k)  # a keyed patch writes no row: its revert is never blocked, nor blocks
    revert_from_model(ref, a)
    assert torch.equal(ref(ids).logits, model(ids).logits)
    table = tmp_path / "t.engt"
    save_model_tables(model, table)
    from engram.config import PatchError
    with pytest.raises(PatchError, match="keyed"):
        apply_patch(table, k)


def test_ngram_keys_depend_on_every_head_of_the_order_and_only_on_it() -> None:
    from engram.model.table import ngram_keys

    g = torch.Generator().manual_seed(0)
    hid = torch.randint(0, 1 << 20, (64, 8), generator=g)
    keys = ngram_keys(hid, 4)
    assert torch.equal(keys, ngram_keys(hid.clone(), 4)) and bool((keys >= 0).all())
    assert torch.unique(keys).numel() == keys.numel()  # distinct heads and N-grams: distinct keys
    moved = hid.clone()
    moved[:, 5] += 1  # one head of the second order
    changed = ngram_keys(moved, 4) != keys
    assert bool(changed[:, 4:].all()) and not bool(changed[:, :4].any())
