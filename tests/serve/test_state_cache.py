"""Prompt states stored per block (``engram.serve.state_cache``) on a tiny ``EngramLM``: a
continuation from a loaded state is bit-identical to reading the whole prompt, states of another
model, table or patch stack are never used, and damaged entries are refused."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from engram.cli.main import main
from engram.config import SamplingConfig, StateCacheConfig, StateCacheError, preset
from engram.model.lm import EngramLM
from engram.model.table import KeyedOverlay, RowOverlay
from engram.serve.state_cache import PromptStates, generate_with_states
from engram.serve.state_store import StateEntryError, StateStore, read_entry

pytestmark = pytest.mark.usefixtures("one_thread")

BLOCK = 8
GREEDY = SamplingConfig(temperature=0, max_new_tokens=6)


def _model(seed: int = 0, hc_mult: int = 1) -> EngramLM:
    """The tiny preset with every Engram weight drawn at random (the zero-initialised short conv
    and value projection would hide a wrong conv state or hash history)."""
    torch.manual_seed(seed)
    cfg = preset("tiny", 300)
    cfg.hc_mult = hc_mult
    model = EngramLM(cfg, np.arange(300, dtype=np.int64) // 2).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for e in model.engram_layers:
            for p in e.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def _prompt(n: int, seed: int = 3) -> torch.Tensor:
    return torch.randint(2, 300, (1, n), generator=torch.Generator().manual_seed(seed))


def _reference(model, ids, sampling=GREEDY, patches=None):
    """Read from the tokens alone: a store too small to hold anything (nothing is ever loaded)."""
    states = PromptStates(model, StateStore(None, "memory", max_bytes=1), BLOCK)
    cache = model.new_cache(1, ids.shape[1] + sampling.max_new_tokens)
    _, logits, report = states.prefill(ids, cache, patches)
    assert report.cached_tokens == 0 and report.stored_blocks == 0
    out, _ = generate_with_states(model, ids, sampling, states, patches=patches)
    return logits, out


def _prefill(states, ids, max_new=GREEDY.max_new_tokens, patches=None):
    return states.prefill(ids, states.model.new_cache(1, ids.shape[1] + max_new), patches)


@pytest.mark.parametrize("storage", ["memory", "mmap", "cached"])
@pytest.mark.parametrize("hc_mult", [1, 2])
def test_a_loaded_state_continues_bit_for_bit(tmp_path, storage, hc_mult):
    model = _model(hc_mult=hc_mult)
    ids = _prompt(45)  # 5 whole blocks and 5 tokens
    ref_logits, ref_out = _reference(model, ids)
    states = PromptStates(model, StateStore(None if storage == "memory" else tmp_path, storage), BLOCK)
    _, cold, first = _prefill(states, ids)
    assert (first.cached_tokens, first.read_tokens, first.stored_blocks) == (0, 45, 5)
    _, warm, second = _prefill(states, ids)
    assert (second.cached_tokens, second.read_tokens, second.stored_blocks) == (40, 5, 0)
    assert torch.equal(cold, ref_logits) and torch.equal(warm, ref_logits)
    out, report = generate_with_states(model, ids, GREEDY, states)
    assert report.cached_tokens == 40 and torch.equal(out, ref_out)
    # sampled text too: the same distributions, the same random numbers
    hot = SamplingConfig(temperature=0.9, top_p=0.9, max_new_tokens=6, seed=5)
    assert torch.equal(generate_with_states(model, ids, hot, states)[0], _reference(model, ids, hot)[1])
    # and the plain one-call generation agrees on the greedy tokens of this prompt
    assert torch.equal(model.generate(ids, GREEDY), ref_out)


def test_a_shared_prefix_loads_its_blocks_and_a_whole_prompt_reads_its_last_block(tmp_path):
    model = _model()
    states = PromptStates(model, StateStore(tmp_path), BLOCK)
    a = _prompt(40)
    b = torch.cat([a[:, :27], _prompt(20, seed=9)], dim=1)  # shares 3 whole blocks and 3 tokens
    _prefill(states, a)
    _, logits, rep = _prefill(states, b)
    assert rep.cached_tokens == 24 and rep.stored_blocks == 2
    assert torch.equal(logits, _reference(model, b)[0])
    _, logits, rep = _prefill(states, a)  # 40 = 5 blocks: the 5th is read again for its logits
    assert (rep.cached_tokens, rep.read_tokens) == (32, 8)
    assert torch.equal(logits, _reference(model, a)[0])
    short = a[:, :5]  # shorter than a block: nothing to load or store
    _, logits, rep = _prefill(states, short)
    assert (rep.cached_tokens, rep.stored_blocks) == (0, 0) and torch.equal(logits, _reference(model, short)[0])


def test_states_of_another_model_table_or_patch_stack_miss(tmp_path):
    model = _model()
    ids = _prompt(33)
    states = PromptStates(model, StateStore(tmp_path), BLOCK)
    _prefill(states, ids)
    assert _prefill(states, ids)[2].cached_tokens == 32
    other = PromptStates(_model(seed=1), StateStore(tmp_path), BLOCK)  # other weights, same directory
    assert _prefill(other, ids)[2].cached_tokens == 0
    assert _prefill(PromptStates(model, StateStore(tmp_path), 4), ids)[2].cached_tokens == 0  # other blocks
    # a patch stack read per call: another context; the same stack again hits
    e = model.engram_layers[0]
    overlay = {e.layer_id: RowOverlay.of(torch.tensor([3, 70]), torch.randn(2, e.table.embedding_dim))}
    assert _prefill(states, ids, patches=[overlay])[2].cached_tokens == 0
    _, logits, rep = _prefill(states, ids, patches=[overlay])
    assert rep.cached_tokens == 32 and torch.equal(logits, _reference(model, ids, patches=[overlay])[0])
    # a table patched in place (one row): the same PromptStates notices and misses
    row = e.table.weight[5].clone()
    with torch.no_grad():
        e.table.weight[5] += 1.0
    _, logits, rep = _prefill(states, ids)
    assert rep.cached_tokens == 0 and torch.equal(logits, _reference(model, ids)[0])
    with torch.no_grad():
        e.table.weight[5] = row  # the same bits again: the first states are valid again
    assert _prefill(states, ids)[2].cached_tokens == 32
    # keyed entries read per call, and the same installed on the model (no row written): each its own context
    hid = model.compute_hash_ids(ids)[e.layer_id]
    key = e.multi_head_embedding.keys(hid)[0, 3, :1]  # one (head, N-gram) the prompt reads
    keyed = {e.layer_id: KeyedOverlay.of(key, torch.randn(1, e.table.embedding_dim))}
    assert _prefill(states, ids, patches=[keyed])[2].cached_tokens == 0
    _, logits, rep = _prefill(states, ids, patches=[keyed])
    assert rep.cached_tokens == 32 and torch.equal(logits, _reference(model, ids, patches=[keyed])[0])
    e.multi_head_embedding.set_installed([("k", keyed[e.layer_id])])
    try:
        _, logits, rep = _prefill(states, ids)
        assert rep.cached_tokens == 0 and torch.equal(logits, _reference(model, ids, patches=[keyed])[0])
    finally:
        e.multi_head_embedding.set_installed([])
    assert _prefill(states, ids)[2].cached_tokens == 32


def _entry_files(d):
    return sorted(d.glob("*.safetensors"), key=lambda p: p.stat().st_mtime_ns)


@pytest.mark.parametrize("damage", ["truncate", "flip", "foreign"])
def test_a_damaged_or_foreign_entry_is_refused_and_the_tokens_are_read(tmp_path, damage, capsys):
    model = _model()
    ids = _prompt(33)
    states = PromptStates(model, StateStore(tmp_path / "a"), BLOCK)
    _prefill(states, ids)
    files = {p.name: p for p in (tmp_path / "a").glob("*.safetensors")}
    first = states.keys(states.context(), ids[0].tolist())[0] + ".safetensors"
    target = files[first]
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:-100])
    elif damage == "flip":
        data = bytearray(target.read_bytes())
        data[-10] ^= 0xFF  # inside the tensors: only the checksum can tell
        target.write_bytes(bytes(data))
    else:  # a sound entry of another model, put under this key's name
        other = PromptStates(_model(seed=1), StateStore(tmp_path / "b"), BLOCK)
        _prefill(other, ids)
        src = (tmp_path / "b") / (other.keys(other.context(), ids[0].tolist())[0] + ".safetensors")
        target.write_bytes(src.read_bytes())
    with pytest.raises(StateEntryError, match="delete"):
        read_entry(target) if damage != "foreign" else StateStore(tmp_path / "a").get(first[:-12])
    if damage == "foreign":  # that get dropped it; put the foreign file back for the prefill
        target.write_bytes(src.read_bytes())
    states = PromptStates(model, StateStore(tmp_path / "a"), BLOCK)
    capsys.readouterr()
    _, logits, rep = _prefill(states, ids)
    assert rep.cached_tokens == 0 and len(rep.refused) == 1 and torch.equal(logits, _reference(model, ids)[0])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "engram: warning: state cache entry" in err
    assert rep.stored_blocks == 1 and read_entry(target).meta["depth"] == 1  # rewritten, sound
    assert _prefill(states, ids)[2].cached_tokens == 32


def test_the_store_keeps_its_byte_bound_and_evicts_the_deepest_blocks_first(tmp_path):
    model = _model()
    probe = StateStore(tmp_path / "probe")
    PromptStates(model, probe, BLOCK).prefill(_prompt(9), model.new_cache(1, 9))
    one = probe.disk_bytes  # one block's entry
    store = StateStore(tmp_path / "s", max_bytes=int(3.5 * one))
    states = PromptStates(model, store, BLOCK)
    a = _prompt(41)
    _prefill(states, a)  # 5 blocks, room for 3
    assert store.disk_bytes <= store.max_bytes and store.evictions == 2
    keys = states.keys(states.context(), a[0].tolist())
    assert [store.contains(k) for k in keys] == [True, True, True, False, False]
    _, logits, rep = _prefill(states, a)
    assert rep.cached_tokens == 24 and torch.equal(logits, _reference(model, a)[0])
    # a new process sees the same files and the same order
    again = StateStore(tmp_path / "s", max_bytes=int(3.5 * one))
    assert again.disk_bytes == store.disk_bytes and [again.contains(k) for k in keys[:3]] == [True] * 3


def test_bad_settings_and_batches_are_one_line_errors(tmp_path):
    with pytest.raises(StateCacheError, match="block_tokens=0"):
        StateCacheConfig(path=str(tmp_path), block_tokens=0)
    with pytest.raises(StateCacheError, match="--state-cache DIR"):
        StateCacheConfig(storage="mmap")
    with pytest.raises(StateCacheError, match="state_storage='disk'"):
        StateCacheConfig(path=str(tmp_path), storage="disk")
    (tmp_path / "f").write_text("x")
    with pytest.raises(StateCacheError, match="is a file"):
        StateStore(tmp_path / "f")
    model = _model()
    states = PromptStates(model, StateStore(tmp_path / "d"), BLOCK)
    with pytest.raises(StateCacheError, match="one prompt at a time"):
        states.prefill(torch.randint(2, 300, (2, 10)), model.new_cache(2, 20))


def test_generate_state_cache_on_the_command_line(tiny, tmp_path, capsys):
    data = tiny.dataset(tmp_path / "data")
    run = tmp_path / "run"
    tiny.save_run(run, data)
    cache = tmp_path / "states"
    cmd = ["generate", "--ckpt", str(run), "--prompt", "the cat sat on a mat while the dog ran far away from the "
           "big red house", "--temperature", "0", "--max-new-tokens", "5"]
    assert main(cmd) == 0
    plain = capsys.readouterr().out
    outs = []
    for _ in range(2):
        assert main([*cmd, "--state-cache", str(cache), "--state-block", "4"]) == 0
        res = capsys.readouterr()
        outs.append((res.out, res.err))
    assert outs[0][0] == outs[1][0] == plain
    assert " 0 of " in outs[0][1] and "blocks stored" in outs[0][1]
    assert " 0 of " not in outs[1][1] and os.listdir(cache)
    assert main([*cmd, "--state-block", "0", "--state-cache", str(cache)]) == 2
    assert "block_tokens=0" in capsys.readouterr().err


def test_bench_state_cache_measures_every_mode_and_renders_its_page(tmp_path):
    from engram.bench.state_cache import bench_state_cache, state_cache_page

    r = bench_state_cache(preset="tiny", vocab_size=300, prefix_lens=(16, 32), suffix_len=5, block_tokens=8,
                          storage="mmap", repeats=2, threads=1)
    assert {(x["prefix_len"], x["mode"]) for x in r["runs"]} == {(L, m) for L in (16, 32)
                                                                 for m in ("plain", "cold", "warm")}
    warm = [x for x in r["runs"] if x["mode"] == "warm"]
    assert all(x["cached_tokens"] == x["prefix_len"] and x["read_tokens"] == 5 for x in warm)
    assert all(x["warm_equals_cold"] for x in r["exactness"].values())
    b = r["bytes"]["32"]
    assert b["stored_tokens"] == 32 and b["bytes_per_token"] > r["kv_bytes_per_token"]
    page = state_cache_page(r, "engram bench state-cache")
    s = r["summary"]["32"]
    assert f"**{s['plain_over_warm_median']:.1f}x**" in page and "shared with other jobs" in page


def test_the_tenant_service_generates_from_stored_states_per_patch_stack(tmp_path):
    from engram.config import PatchServeConfig
    from engram.patches.apply import apply_to_model, revert_from_model
    from engram.patches.patchfile import make_patch, save_patch
    from engram.serve.service import TenantService
    from engram.serve.store import PatchStore

    model = _model()
    base = {e.layer_id: e.table.weight.detach() for e in model.engram_layers}
    new = {lid: w.clone() for lid, w in base.items()}
    for w in new.values():
        w[:300] += 1.0  # rows a prompt surely reads
    patch = make_patch(base, new, hash_fingerprint=model.hasher.fingerprint(), hasher=model.hasher.describe())
    save_patch(patch, tmp_path / "t.engp")
    states = PromptStates(model, StateStore(tmp_path / "states"), BLOCK)
    service = TenantService(model, None, PatchStore(tmp_path, model, 1 << 24), None, PatchServeConfig(),
                            states=states)
    ids = _prompt(30)[0].tolist()
    req = {"ids": ids, "max_new_tokens": 4}
    ref = {}
    for name, patches in (("none", None), ("t", ["t"])):
        stack = service.resolve(None, patches)[1]
        ref[name] = _reference(model, torch.tensor([ids]), SamplingConfig(temperature=0, max_new_tokens=4),
                               patches=stack)[1][0, 30:].tolist()
    first = service.generate(None, req)
    second = service.generate(None, req)
    assert first["state_cache"]["cached_tokens"] == 0 and second["state_cache"]["cached_tokens"] == 24
    assert first["ids"] == second["ids"] == ref["none"]
    patched = service.generate(None, {**req, "patches": ["t"]})  # another stack: its own states
    assert patched["state_cache"]["cached_tokens"] == 0 and patched["ids"] == ref["t"] != ref["none"]
    assert service.generate(None, {**req, "patches": ["t"]})["state_cache"]["cached_tokens"] == 24
    assert service.health()["state_cache"]["puts"] == 6
    apply_to_model(model, patch)  # the served table itself patched: its states are not the old table's
    applied = service.generate(None, req)
    assert applied["state_cache"]["cached_tokens"] == 0 and applied["ids"] == ref["t"]
    revert_from_model(model, patch)  # the same bits as before: the first states serve again
    assert service.generate(None, req)["state_cache"]["cached_tokens"] == 24
