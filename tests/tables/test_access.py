"""Access statistics: Zipf fit, cache simulation, and ``engram table stats``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engram.cli.main import main
from engram.tables.access import (
    ZIPF_EXPONENT_DEFINITION,
    rank_frequency,
    simulate_cache,
    simulate_static,
    zipf_exponent,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_zipf_exponent_is_recovered():
    ranks = np.arange(1, 20001)
    counts = np.round(1e6 * ranks ** -1.1).astype(np.int64) + 1
    rf = rank_frequency(counts)
    assert abs(rf["zipf_exponent"] - 1.1) < 0.05
    assert rf["distinct_rows"] == 20000 and rf["curve"][0] == [1, int(counts[0])]
    assert rf["traffic_share"]["top_0.01"] > 0.5


def test_zipf_exponent_fits_ranks_10_to_a_tenth_of_the_distinct_rows():
    ranks = np.arange(1, 3001)
    counts = np.round(1e5 * ranks ** -0.8).astype(np.int64) + 1
    counts[:9] = 10 ** 7  # the head outside the fitted range does not move the exponent
    counts[300:] = 1  # nor does the tail past U // 10 = 300
    assert zipf_exponent(counts) == pytest.approx(0.8, abs=0.01)
    shuffled = np.random.default_rng(0).permutation(np.concatenate([counts, np.zeros(500, np.int64)]))
    assert zipf_exponent(shuffled) == zipf_exponent(counts)  # any order; unread rows are ignored
    assert rank_frequency(counts)["zipf_exponent"] == zipf_exponent(counts)
    assert zipf_exponent(counts[:199]) is None and zipf_exponent(counts[:200]) is not None
    assert "10 .. U // 10" in ZIPF_EXPONENT_DEFINITION


def test_cache_simulation_bounds():
    g = torch.Generator().manual_seed(0)
    # A Zipf-ish stream: small ids are frequent.
    batches = [torch.minimum((torch.rand(500, generator=g) ** 4 * 5000).long(), torch.tensor(4999))
               for _ in range(20)]
    allrows = torch.cat(batches).numpy()
    rows, counts = np.unique(allrows, return_counts=True)
    distinct = len(counts)
    big = simulate_cache(batches, 5000, distinct, "lru")
    # A pool holding everything misses each distinct row exactly once.
    assert big["access_hit_rate"] == pytest.approx(1 - distinct / allrows.size)
    small = {p: simulate_cache(batches, 5000, 100, p) for p in ("lru", "lfu")}
    assert all(r["access_hit_rate"] < big["access_hit_rate"] for r in small.values())
    static = simulate_static(batches, rows, counts, 100)
    assert static["hit_rate"] >= max(r["hit_rate"] for r in small.values())  # i.i.d.: hindsight wins
    assert simulate_static(batches, rows, counts, distinct)["hit_rate"] == 1.0


def test_cli_stats(tmp_path, capsys, tiny):
    data_dir = tiny.dataset(tmp_path / "data", vocab_size=tiny.VOCAB)
    out = tmp_path / "stats.json"
    rc = main(["table", "stats", "--data", str(data_dir), "--preset", "tiny", "--tokens", "2000",
               "--batch-size", "2", "--seq-len", "32", "--cache-rows", "50,500", "--out", str(out), "--json"])
    assert rc == 0
    rep = json.loads(capsys.readouterr().out)
    layer = rep["layers"]["1"]
    assert layer["accesses"] == rep["tokens"] * rep["heads_per_layer"]
    caches = {(c["policy"], c["capacity"]): c for c in layer["caches"]}
    assert set(caches) == {(p, c) for p in ("static", "lru", "lfu") for c in (50, 500)}
    assert caches[("lru", 500)]["hit_rate"] >= caches[("lru", 50)]["hit_rate"]
    assert json.loads(out.read_text()) == rep
    assert rep["zipf_exponent_definition"] == ZIPF_EXPONENT_DEFINITION
