"""Every table backend behind the one interface (``engram.model.table.EngramTable``).

The same model is given each backend through ``convert_tables`` (in RAM, served from a file by
the mmap / cached tiers in this process or a helper process, trainable working files); each must
return the rows of the in-memory table, apply an overlay as if its rows were written into the
table without writing them, and give back its full table. The sharded backend is checked the
same way on several ranks in tests/distributed.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import pytest
import torch

from engram.config import StorageConfig, TableLocation, preset
from engram.model.lm import EngramLM
from engram.model.table import EngramTable, MemoryTable, RowOverlay, TableError, convert_tables, engram_tables
from engram.tables.process import open_layer_storage
from engram.tables.runtime import OffloadedEmbedding, attach_tables, table_runtime
from engram.tables.tablefile import open_table, save_model_tables
from engram.tables.tiers import MemoryStorage
from engram.tables.trainable import TieredEmbedding, place_tables

BACKENDS = ["memory", "served-memory", "served-mmap", "served-cached", "process-mmap", "process-cached",
            "working-mmap", "working-cached"]
LOCATIONS = {"memory": TableLocation.MEMORY, "served-memory": TableLocation.MEMORY,
             "served-mmap": TableLocation.MMAP, "served-cached": TableLocation.CACHED,
             "process-mmap": TableLocation.PROCESS, "process-cached": TableLocation.PROCESS,
             "working-mmap": TableLocation.MMAP, "working-cached": TableLocation.CACHED}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[EngramLM, Path]:
    torch.manual_seed(0)
    model = EngramLM(preset("tiny", 300)).eval()
    with torch.no_grad():
        for t in engram_tables(model).values():
            t.weight.normal_()  # distinct rows, so that a wrong row shows
    path = tmp_path_factory.mktemp("iface") / "t.engt"
    save_model_tables(model, path)
    return model, path


@pytest.fixture
def make(reference, tmp_path: Path):
    """backend name -> a copy of the reference model whose tables that backend holds."""
    ref, path = reference
    made: list[EngramLM] = []

    def build(name: str) -> EngramLM:
        m = copy.deepcopy(ref)
        made.append(m)
        if name == "memory":
            return m
        if name.startswith("working-"):
            place_tables(m, name.split("-")[1], tmp_path / "work", cache_rows=16)
            return m
        where, kind = name.split("-")
        header = open_table(path, m.hasher, m.cfg.engram.head_dim)
        cfg = StorageConfig(path=str(path), kind=kind, cache_rows=16, process=where == "process", io_threads=2)
        attach_tables(m, {lid: (MemoryStorage(t.weight) if kind == "memory" else open_layer_storage(cfg, header, lid))
                          for lid, t in engram_tables(m).items()}, prefetch=False)
        return m

    yield build
    for m in made:
        rt = table_runtime(m)
        if rt is not None:
            rt.close()
        for t in engram_tables(m).values():
            if isinstance(t, TieredEmbedding):
                t.close()


def _rows_and_overlay(table: EngramTable, seed: int) -> tuple[torch.Tensor, RowOverlay]:
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, table.num_embeddings, (2, 7, 4), generator=g)
    rows[0, 0, 0] = rows[1, 3, 2]  # a repeated row
    ids = torch.cat([rows.reshape(-1)[::3], torch.tensor([table.num_embeddings - 1])]).unique()
    return rows, RowOverlay.of(ids.flip(0), torch.randn(ids.numel(), table.embedding_dim, generator=g))


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_gives_the_rows_the_overlay_and_the_full_table(make, reference, backend: str) -> None:
    ref, _ = reference
    model = make(backend)
    for lid, table in engram_tables(model).items():
        assert isinstance(table, EngramTable) and table.location == LOCATIONS[backend]
        full = engram_tables(ref)[lid].full()
        rows, overlay = _rows_and_overlay(table, lid)
        with torch.no_grad():
            assert torch.equal(table(rows), MemoryTable.wrap(full)(rows))
            written = full.clone()
            written[overlay.rows] = overlay.values
            got = table(rows, overlay)
            assert torch.equal(got, MemoryTable.wrap(written)(rows))
            assert not torch.equal(got, table(rows))  # the overlay did replace some rows
            assert torch.equal(table.full(), full)  # ... without writing them into the table
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


@pytest.mark.parametrize("backend", ["memory", "working-mmap", "working-cached"])
def test_writable_backends_load_a_full_table(make, backend: str) -> None:
    model = make(backend)
    for table in engram_tables(model).values():
        new = torch.randn(table.num_embeddings, table.embedding_dim)
        table.load_full(new)
        assert torch.equal(table.full(), new)
        with pytest.raises(TableError, match="cannot load one of shape"):
            table.load_full(new[:-1])


@pytest.mark.parametrize("backend", ["served-mmap", "process-cached"])
def test_served_tables_are_read_only(make, backend: str) -> None:
    table = next(iter(engram_tables(make(backend)).values()))
    assert isinstance(table, OffloadedEmbedding)
    with pytest.raises(TableError, match="read-only"):
        table.load_full(table.full())


def test_overlay_at_the_layer_equals_writing_the_rows(reference) -> None:
    """``EngramLayer(..., table_overlay=)`` reads the overlay's rows, with gradients for its
    values, and leaves the table and its gradient alone at those rows."""
    ref, _ = reference
    model = copy.deepcopy(ref)
    layer = model.engram_layers[0]
    hash_ids = model.hasher.hash(torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(2)))
    rows = layer.multi_head_embedding.rows(hash_ids[layer.layer_id])
    h = torch.randn(2, 9, layer.hc_mult, layer.hidden_size)
    ov_rows = rows.reshape(-1).unique()[:5]
    values = torch.randn(5, layer.table.embedding_dim, requires_grad=True)
    out = layer(h, hash_ids[layer.layer_id], table_overlay=RowOverlay.of(ov_rows, values)).output
    written = copy.deepcopy(layer)
    with torch.no_grad():
        written.table.weight[ov_rows] = values
    assert torch.equal(out, written(h, hash_ids[layer.layer_id]).output)
    out.square().sum().backward()
    assert values.grad is not None and bool(values.grad.ne(0).any())
    assert not bool(layer.table.weight.grad[ov_rows].ne(0).any())  # overlaid rows take no table gradient
    assert torch.equal(layer.table.weight, ref.engram_layers[0].table.weight)


def test_row_overlay_is_sorted_and_refuses_repeats() -> None:
    ov = RowOverlay.of(torch.tensor([9, 2, 5]), torch.arange(6.0).reshape(3, 2))
    assert ov.rows.tolist() == [2, 5, 9] and ov.values[:, 0].tolist() == [2.0, 4.0, 0.0]
    with pytest.raises(TableError, match="repeat"):
        RowOverlay.of(torch.tensor([1, 1]), torch.zeros(2, 2))
    with pytest.raises(TableError, match=r"must be \[2, Dh\]"):
        RowOverlay.of(torch.tensor([1, 2]), torch.zeros(3, 2))


def test_convert_tables_checks_what_it_installs(reference) -> None:
    model = copy.deepcopy(reference[0])
    bad: list[Callable] = [lambda lid, t: torch.nn.Embedding(t.num_embeddings, t.embedding_dim),
                           lambda lid, t: MemoryTable(t.num_embeddings + 1, t.embedding_dim)]
    for fn, msg in zip(bad, ["not an EngramTable", "the layer needs"]):
        with pytest.raises(TableError, match=msg):
            convert_tables(model, fn)
    old = engram_tables(model)
    assert convert_tables(model, lambda lid, t: t) == old  # a converter may keep a table
    state = model.state_dict()
    new = convert_tables(model, lambda lid, t: MemoryTable(t.num_embeddings, t.embedding_dim, t.full().clone()))
    assert all(new[lid] is not old[lid] for lid in old)
    assert model.state_dict().keys() == state.keys()  # checkpoints keep their keys
