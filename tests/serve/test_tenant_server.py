"""``engram serve --patches DIR``: many tenants' patches over one shared table.

The load test sends 256 requests from 8 tenants with different patch stacks, 32 at a time, in
random order, while one tenant's patch file is replaced again and again: every answer must be
the one the same request gets from a copy of the table with its patches written in (the slow
reference path), the replaced file must be seen wholly old or wholly new, and the patch cache
must stay within its byte budget.
"""

from __future__ import annotations

import copy
import json
import random
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from engram.config import PatchServeConfig, ServeLimits
from engram.inspect.server import serve_in_thread
from engram.patches.apply import model_fingerprint
from engram.patches.patchfile import TablePatch, make_patch, save_patch
from engram.serve.keys import KeyRing
from engram.serve.server import make_patch_server
from engram.serve.service import TenantService, logits_digest
from engram.serve.store import PatchStore

pytestmark = pytest.mark.usefixtures("one_thread")

TENANTS = 8
LAYER = 1



def _prompts(model, n: int = 4) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(2, model.cfg.vocab_size, (12 + 3 * i,), generator=g).tolist() for i in range(n)]


def _read_rows(model, prompts) -> torch.Tensor:
    e = model.engram_layers[0]
    rows = [e.multi_head_embedding.rows(model.compute_hash_ids(torch.tensor([p]))[e.layer_id]).flatten()
            for p in prompts]
    return torch.unique(torch.cat(rows))


def _make(model, rows, seed: int, name: str) -> TablePatch:
    """A patch made on the base table: a random half of ``rows`` moved by a tenant-specific amount."""
    g = torch.Generator().manual_seed(seed)
    base = {e.layer_id: e.table.weight.detach().clone() for e in model.engram_layers}
    new = {k: v.clone() for k, v in base.items()}
    pick = rows[torch.rand(rows.numel(), generator=g) < 0.5]
    new[LAYER][pick] += torch.randn(pick.numel(), new[LAYER].shape[1], generator=g)
    return make_patch(base, new, hash_fingerprint=model.hasher.fingerprint(), hasher=model.hasher.describe(),
                      name=name)


def _reference(model, stack: list[TablePatch], prompt: list[int]) -> str:
    """The slow reference: a copy of the tables with the stack's new rows written in order."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for p in stack:
            for lid, lp in p.layers.items():
                ref.engram_layers[0].table.weight[lp.rows] = lp.new
        return logits_digest(ref(torch.tensor([prompt])).logits[0])


def _post(port: int, route: str, body: dict, key: str | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{route}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(req, timeout=600) as r:  # 32 queued behind one model on a busy machine
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture
def world(tmp_path, tiny):
    model = tiny.model(random_rows=True)
    prompts = _prompts(model)
    rows = _read_rows(model, prompts)
    pdir = tmp_path / "patches"
    pdir.mkdir()
    patches: dict[str, TablePatch] = {}
    for i in range(TENANTS):
        patches[f"t{i}"] = _make(model, rows, 100 + i, f"tenant {i}")
        if i < 4:  # a newer patch of the same tenant, made on the base too: supersedes t{i} where both change
            patches[f"t{i}-v2"] = _make(model, rows, 200 + i, f"tenant {i}, newer")
    for pid, p in patches.items():
        save_patch(p, pdir / f"{pid}.engp")
    keys = {f"key{i}": [f"t{i}", f"t{i}-v2"] for i in range(TENANTS)}
    (tmp_path / "keys.json").write_text(json.dumps({"keys": keys}))
    return model, prompts, rows, pdir, patches, tmp_path / "keys.json"


def _start(model, pdir, keys_file, cache_bytes: int):
    store = PatchStore(pdir, model, cache_bytes)
    service = TenantService(model, None, store, KeyRing.load(keys_file) if keys_file else None,
                            PatchServeConfig(), ServeLimits(max_inflight=64, queue_wait_s=30.0))
    server = make_patch_server(service, "127.0.0.1", 0, quiet=True)
    serve_in_thread(server)
    return server, service, server.server_address[1]


def test_isolation_under_load_with_a_patch_replaced_mid_run(world) -> None:
    model, prompts, rows, pdir, patches, keys_file = world
    before = model_fingerprint(model)
    # the replaced tenant's second version, and every stack's expected answer per prompt
    t7_new = _make(model, rows, 777, "tenant 7, replaced")
    versions = {"t7": {patches["t7"].patch_id: patches["t7"], t7_new.patch_id: t7_new}}
    stacks = {i: [[f"t{i}"]] + ([[f"t{i}", f"t{i}-v2"], [f"t{i}-v2"]] if i < 4 else []) for i in range(TENANTS)}
    expected: dict[tuple, str] = {}
    for ids in [s for ss in stacks.values() for s in ss]:
        options = [[versions.get(pid, {patches[pid].patch_id: patches[pid]})[v] for pid, v in zip(ids, combo)]
                   for combo in _combos(ids, versions, patches)]
        for stack in options:
            for k, prompt in enumerate(prompts):
                expected[(tuple(p.patch_id for p in stack), k)] = _reference(model, stack, prompt)
    base_digests = [_reference(model, [], p) for p in prompts]
    budget = int(3.5 * max(p.layers[LAYER].nbytes() for p in patches.values()))  # ~3 of 12 patches fit
    server, service, port = _start(model, pdir, keys_file, budget)
    rng = random.Random(0)
    requests = [(i, rng.choice(stacks[i]), rng.randrange(len(prompts))) for i in range(TENANTS) for _ in range(32)]
    rng.shuffle(requests)  # 256 requests, tenants interleaved at random
    done = []
    replaced_at: list[float] = []
    stop = threading.Event()

    def replace_t7() -> None:  # flips t7 between its versions with os.replace, ending on the new one
        while len(done) < 64:
            time.sleep(0.005)
        for k in range(12):
            save_patch(t7_new if k % 2 == 0 else patches["t7"], pdir / "t7.engp")
            time.sleep(0.01)
        save_patch(t7_new, pdir / "t7.engp")
        replaced_at.append(time.monotonic())
        stop.set()

    def one(req):
        tenant, ids, k = req
        t0 = time.monotonic()
        status, body = _post(port, "/v1/logits", {"ids": prompts[k], "patches": ids}, key=f"key{tenant}")
        done.append(1)
        return req, t0, status, body

    writer = threading.Thread(target=replace_t7)
    writer.start()
    try:
        with ThreadPoolExecutor(32) as pool:
            results = list(pool.map(one, requests))
        writer.join(timeout=60)
        assert stop.is_set()
        # after the replacement has settled every request sees the new version
        late = [_post(port, "/v1/logits", {"ids": prompts[0], "patches": ["t7"]}, key="key7") for _ in range(3)]
    finally:
        server.shutdown()
        server.server_close()
    assert len(results) == 256
    seen_t7 = set()
    for (tenant, ids, k), t0, status, body in results:
        assert status == 200, body
        used = tuple(p["patch_id"] for p in body["patches"])
        assert [p["id"] for p in body["patches"]] == ids
        # the answer is exactly the reference for the versions it says it used (so no other tenant's
        # rows, and no mix of two versions of t7)
        assert body["digest"] == expected[(used, k)], (tenant, ids, k)
        assert body["digest"] != base_digests[k]
        if "t7" in ids:
            seen_t7.add(used[0])
            if replaced_at and t0 > replaced_at[0]:
                assert used[0] == t7_new.patch_id
    assert patches["t7"].patch_id in seen_t7  # the old version served before the swap ...
    assert all(s == 200 and b["patches"][0]["patch_id"] == t7_new.patch_id for s, b in late)  # ... the new after
    assert late[0][1]["digest"] == expected[((t7_new.patch_id,), 0)]
    stats = service.store.stats()
    # (a changed t7 may be reloaded in place or, if it was evicted meanwhile, loaded afresh)
    assert stats["peak_bytes"] <= budget and stats["evictions"] > 0 and stats["loads"] > len(patches)
    assert model_fingerprint(model) == before  # the shared table was never written


def _combos(ids, versions, patches):
    """Every choice of version per id in ``ids`` (only t7 has two)."""
    out = [[]]
    for pid in ids:
        vs = list(versions.get(pid, {patches[pid].patch_id: None}))
        out = [o + [v] for o in out for v in vs]
    return out


def test_keys_ids_and_damaged_files_give_their_statuses(world, tiny) -> None:
    model, prompts, rows, pdir, patches, keys_file = world
    other = tiny.model(random_rows=True)
    with torch.no_grad():
        other.engram_layers[0].table.weight.add_(1.0)  # same hashing, other content
    save_patch(_make(other, rows, 5, "for another table"), pdir / "foreign.engp")
    (pdir / "torn.engp").write_bytes((pdir / "t1.engp").read_bytes()[:-100])  # caught mid-write
    keys = json.loads(keys_file.read_text())
    keys["keys"]["admin"] = ["*"]
    keys_file.write_text(json.dumps(keys))
    server, service, port = _start(model, pdir, keys_file, 1 << 24)
    try:
        ask = lambda ids, key: _post(port, "/v1/logits", {"ids": prompts[0], "patches": ids}, key)  # noqa: E731
        assert ask(["t0"], None)[0] == 401
        assert ask(["t0"], "nope")[0] == 401
        assert ask(["t1"], "key0")[0] == 403  # another tenant's patch
        assert ask(["t9"], "key0")[0] == 403  # not in the key's set: 403 whether or not it exists
        assert ask(["t9"], "admin")[0] == 404
        assert ask(["../t0"], "admin")[0] == 400
        status, body = ask(["foreign"], "admin")
        assert status == 409 and "table content" in body["error"]
        status, body = ask(["torn"], "admin")
        assert status == 503 and "retry" in body["error"]
        assert ask(["t0-v2", "t0"], "key0")[0] == 200  # both made on the base: allowed, the later wins
        s0, b0 = ask([], "key0")
        assert s0 == 200 and b0["digest"] == _reference(model, [], prompts[0])  # no patches: the base
        listed = urllib.request.Request(f"http://127.0.0.1:{port}/v1/patches",
                                        headers={"Authorization": "Bearer key3"})
        with urllib.request.urlopen(listed, timeout=10) as r:
            assert json.loads(r.read())["patches"] == ["t3", "t3-v2"]
        status, body = _post(port, "/v1/generate", {"ids": prompts[1], "patches": ["t2"], "max_new_tokens": 5},
                             "key2")
        assert status == 200 and len(body["ids"]) == 5
        ref = copy.deepcopy(model)
        with torch.no_grad():
            ref.engram_layers[0].table.weight[patches["t2"].layers[LAYER].rows] = patches["t2"].layers[LAYER].new
        from engram.config import SamplingConfig

        want = ref.generate(torch.tensor([prompts[1]]), SamplingConfig(max_new_tokens=5, temperature=0.0))
        assert body["ids"] == want[0, len(prompts[1]):].tolist()
    finally:
        server.shutdown()
        server.server_close()


def test_patch_larger_than_the_cache_is_refused(world) -> None:
    model, prompts, _, pdir, patches, _ = world
    server, service, port = _start(model, pdir, None, 1024)
    try:
        status, body = _post(port, "/v1/logits", {"ids": prompts[0], "patches": ["t0"]})
        assert status == 507 and "--patch-cache-mb" in body["error"]
        assert service.store.stats()["bytes"] == 0
    finally:
        server.shutdown()
        server.server_close()
    assert Path(pdir / "t0.engp").is_file()


def test_bench_overlay_reports_every_run_and_ratios_within_a_repeat(capsys) -> None:
    from engram.cli.main import main

    assert main(["bench", "overlay", "--preset", "tiny", "--vocab-size", "300", "--requests", "3", "--repeats", "2",
                 "--tenants", "2", "--patch-rows", "16", "--prompt-len", "16", "--max-new-tokens", "2", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert [(x["repeat"], x["mode"]) for x in r["runs"]] == [(k, m) for k in (0, 1) for m in ("none", "0", "1", "2")]
    assert all(x["requests"] == 3 and x["seconds"] > 0 for x in r["runs"])
    for mode, s in r["summary"].items():
        mine = [x for x in r["runs"] if x["mode"] == mode]
        none = {x["repeat"]: x["requests_per_s"] for x in r["runs"] if x["mode"] == "none"}
        assert s["throughput_vs_none"] == [x["requests_per_s"] / none[x["repeat"]] for x in mine]
    m = r["memory"]
    assert m["patch_cache"]["entries"] == 2 and m["overlay_bytes_per_tenant"] < m["patch_file_bytes"]
    c = r["config"]  # the overlay holds each changed row's id (8 bytes) and its new values
    assert m["overlay_bytes_per_tenant"] == len(c["engram_layers"]) * 16 * (8 + c["row_bytes"])


def test_overlay_page_writes_every_number_from_the_result(tmp_path):
    import json

    from engram.cli.main import main

    runs = [{"repeat": i, "mode": m, "requests": 4, "seconds": 1.0, "requests_per_s": rps, "p50_ms": 10.0,
             "p99_ms": 20.0} for i in range(3) for m, rps in (("none", 2.0 + i), ("1", 1.5 + i))]
    r = {"benchmark": "overlay", "date": "2031-01-02",
         "machine": {"cpus": 2, "platform": "p", "python": "3", "torch": "t", "threads": 1},
         "config": {"preset": "engram-moe", "vocab_size": 4096, "tenants": 1, "patch_rows": 7, "requests": 4,
                    "prompt_len": 8, "max_new_tokens": 2, "repeats": 3},
         "runs": runs,
         "summary": {"none": {"requests_per_s_median": 3.0, "p50_ms": 10.0, "p99_ms": 20.0,
                              "throughput_vs_none": [1.0, 1.0, 1.0], "throughput_vs_none_median": 1.0},
                     "1": {"requests_per_s_median": 2.5, "p50_ms": 11.25, "p99_ms": 21.5,
                           "throughput_vs_none": [0.75, 0.8, 0.8333], "throughput_vs_none_median": 0.8}},
         "memory": {"patch_file_bytes": 1000.0, "cache_bytes_per_tenant": 990.0, "cache_bytes_per_tenant_vs_file": 0.99,
                    "overlay_bytes_per_tenant": 500.0}}
    (tmp_path / "r.json").write_text(json.dumps(r))
    page = tmp_path / "p.md"
    assert main(["bench", "overlay", "--from-json", str(tmp_path / "r.json"), "--page", str(page),
                 "--page-command", "CMD"]) == 0
    text = page.read_text()
    assert "(2031-01-02)" in text and "CMD" in text
    assert "| 1 tenant's patch | 1.500 / 2.500 / 3.500 | 0.750 / 0.800 / 0.833 | **0.800** | 11.2 | 21.5 |" in text
    assert "990 bytes for a 1,000-byte patch file (0.99x)" in text and "500 bytes (0.50x)" in text


def test_a_keyed_patch_is_served_per_request_and_kept_to_its_tenant(world) -> None:
    """A keyed patch file (entries matched by N-gram, the fact-edit trainer's --edit-keyed) in the
    patch directory: the tenant whose key lists it gets what the model gives with the patch
    installed; another tenant, and the same tenant without it, get the base."""
    from engram.patches.apply import apply_to_model, revert_from_model
    from engram.patches.patchfile import make_keyed_patch

    model, prompts, _, pdir, _, keys_file = world
    e = model.engram_layers[0]
    mhe = e.multi_head_embedding
    hid = model.compute_hash_ids(torch.tensor([prompts[0]]))[e.layer_id].reshape(-1, len(mhe.head_sizes))
    keys, first = torch.unique(mhe.keys(hid).reshape(-1), return_inverse=True)
    rows = torch.zeros_like(keys)
    rows[first] = mhe.rows(hid).reshape(-1)
    base = {x.layer_id: x.table.weight.detach().clone() for x in model.engram_layers}
    g = torch.Generator().manual_seed(3)
    patch = make_keyed_patch(base, {LAYER: (keys, rows, base[LAYER][rows] + torch.randn(rows.numel(), base[LAYER].shape[1],
                                                                                        generator=g))},
                             hash_fingerprint=model.hasher.fingerprint(), hasher=model.hasher.describe(), name="keyed")
    save_patch(patch, pdir / "k0.engp")
    keys_json = json.loads(keys_file.read_text())
    keys_json["keys"]["key0"].append("k0")
    keys_file.write_text(json.dumps(keys_json))
    want_base = _reference(model, [], prompts[0])
    apply_to_model(model, patch)  # the installed path: an independent way to the same answer
    try:
        want = logits_digest(model(torch.tensor([prompts[0]])).logits[0])
    finally:
        revert_from_model(model, patch)
    assert want != want_base and not mhe.installed
    server, service, port = _start(model, pdir, keys_file, 1 << 24)
    try:
        status, body = _post(port, "/v1/logits", {"ids": prompts[0], "patches": ["k0"]}, "key0")
        assert status == 200 and body["digest"] == want
        assert _post(port, "/v1/logits", {"ids": prompts[0], "patches": []}, "key0")[1]["digest"] == want_base
        assert _post(port, "/v1/logits", {"ids": prompts[0], "patches": ["k0"]}, "key1")[0] == 403
        assert _post(port, "/v1/logits", {"ids": prompts[0], "patches": ["t1"]}, "key1")[0] == 200
    finally:
        server.shutdown()
        server.server_close()
    assert not mhe.installed  # serving never installs a patch on the shared model
