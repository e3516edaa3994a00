"""A new table backend in one file: a dict of rows, trained, evaluated and generated from.

Everything the backend needs is here: an ``EngramTable`` subclass and a training hook
(``Parallel.prepare``) that installs it with ``convert_tables``. The rows come out of a Python
dict, yet training, evaluation and generation give exactly what the in-memory table gives.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from engram.config import SamplingConfig, TableLocation, TrainConfig, preset
from engram.data.shards import load_dataset
from engram.model.checkpoint import load_model
from engram.model.generation import generate
from engram.model.table import EngramTable, MemoryTable, RowOverlay, convert_tables, engram_tables
from engram.training.evaluation import evaluate
from engram.training.parallel import Parallel
from engram.training.trainer import train


class _DictGather(torch.autograd.Function):
    """Rows read one by one from the dict; the dense gradient of ``weight[rows]``."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, rows: torch.Tensor, store: dict) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(rows)
        ctx.shape = weight.shape
        flat = rows.reshape(-1).tolist()
        out = torch.stack([store[r] for r in flat]) if flat else weight.new_empty(0, weight.shape[1])
        return out.reshape(*rows.shape, weight.shape[1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001
        (rows,) = ctx.saved_tensors
        g = grad.new_zeros(ctx.shape)
        g.index_add_(0, rows.reshape(-1), grad.reshape(-1, ctx.shape[1]))
        return g, None, None


class DictTable(EngramTable):
    """Rows in a dict {row id: row}. The rows are views of ``weight`` (the parameter the
    optimizer updates in place and checkpoints save), so the dict always reads current values."""

    location = TableLocation.MEMORY
    lookups = 0  # over all instances: shows the runs below really read through the dict

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__(*table.shape)
        self.weight = nn.Parameter(table.detach().clone())
        self.store = dict(enumerate(self.weight.detach().unbind(0)))

    def lookup(self, rows: torch.Tensor) -> torch.Tensor:
        DictTable.lookups += 1
        return _DictGather.apply(self.weight, rows, self.store)

    def full(self) -> torch.Tensor:
        return torch.stack([self.store[r] for r in range(self.num_embeddings)])

    @torch.no_grad()
    def load_full(self, table: torch.Tensor) -> None:
        self._check_full(table)
        self.weight.copy_(table)


def use_dict_tables(model: nn.Module) -> None:
    convert_tables(model, lambda layer_id, table: DictTable(table.full()))


class DictTablesParallel(Parallel):
    """One process, with the tables moved into dicts before training starts."""

    def prepare(self, model) -> None:  # noqa: ANN001
        super().prepare(model)
        use_dict_tables(model)


SETS = dict(steps=3, batch_size=4, seq_len=32, warmup_steps=1, eval_every=3, eval_batches=1, save_every=3,
            log_every=1, seed=5)


def _losses(run: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dict-tables")
    data = tiny.training_dataset(root / "data")
    vocab = int(load_dataset(data).meta["vocab_size"])
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(preset("tiny", vocab), TrainConfig(**SETS), data, root / "memory", progress=False)
        before = DictTable.lookups
        train(preset("tiny", vocab), TrainConfig(**SETS), data, root / "dict", progress=False,
              parallel=DictTablesParallel())
        assert DictTable.lookups >= before + 3  # every training step looked up through the dict
    finally:
        torch.set_num_threads(prev)
    return {"data": data, "memory": root / "memory", "dict": root / "dict"}


def test_training_through_a_dict_backend_equals_memory(runs, one_thread) -> None:
    assert len(_losses(runs["dict"])) == 3
    assert _losses(runs["dict"]) == _losses(runs["memory"])
    a, _ = load_model(runs["memory"])
    b, _ = load_model(runs["dict"])  # the checkpoint keys are those of any other backend
    for (lid, ta), tb in zip(engram_tables(a).items(), engram_tables(b).values()):
        assert torch.equal(ta.full(), tb.full()), lid


def test_eval_and_generate_through_a_dict_backend(runs, one_thread) -> None:
    ref, _ = load_model(runs["dict"])
    model, _ = load_model(runs["dict"])
    use_dict_tables(model)
    assert all(isinstance(t, DictTable) for t in model.engram_tables().values())
    before = DictTable.lookups
    val = load_dataset(runs["data"]).val
    assert evaluate(model, val, 4, 32, max_batches=2)["loss"] == evaluate(ref, val, 4, 32, max_batches=2)["loss"]
    prompt = torch.tensor([[5, 9, 17, 3, 9, 17]])
    sampling = SamplingConfig(max_new_tokens=12, temperature=0.8, seed=3)
    assert torch.equal(generate(model, prompt, sampling), generate(ref, prompt, sampling))
    assert DictTable.lookups >= before + 2 + 12  # two eval batches, prefill and every new token


def test_overlay_through_a_dict_backend(runs) -> None:
    model, _ = load_model(runs["dict"])
    use_dict_tables(model)
    table = next(iter(model.engram_tables().values()))
    before = table.full().clone()
    rows = torch.tensor([[3, 7, 7, 100], [0, 3, 11, 4000]])
    overlay = RowOverlay.of(torch.tensor([7, 4000, 12]), torch.randn(3, table.embedding_dim))
    written = before.clone()
    written[overlay.rows] = overlay.values
    assert torch.equal(table(rows, overlay), MemoryTable.wrap(written)(rows))
    assert torch.equal(table.full(), before)  # the shared rows were not written
