"""Fixtures shared by the whole suite.

- ``conformance_dir``: DeepSeek-reference conformance vectors kept in the repository
  (``tests/conformance/README.md`` says where they come from).
- ``one_thread``: run a test on one intra-op thread (tiny models gain nothing from two).
- ``tiny``: factories for the tiny models, datasets and weights-only runs of the table, storage
  and patch tests (``tiny.VOCAB``, ``tiny.model()``, ``tiny.compression()``, ``tiny.dataset()``,
  ``tiny.save_run()``).
- ``dataset`` and ``dataset_vocab``: the training tests' tiny dataset, built once per test
  module, and its vocabulary size.
- ``inspect_run``: one tiny *trained* run with two Engram layers and two hyper-connection
  branches, built once per session, for the inspection, server and browser tests.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from engram.config import TrainConfig, preset
from engram.data.corpus import Document
from engram.data.shards import load_dataset, prepare_dataset
from engram.data.tokenizer import train_bpe
from engram.model.checkpoint import save_checkpoint
from engram.model.lm import EngramLM
from engram.model.table import engram_tables
from engram.training.trainer import _dataset_compression, train

CONFORMANCE = Path(__file__).resolve().parent / "conformance"


@pytest.fixture(scope="session")
def conformance_dir() -> Path:
    assert CONFORMANCE.is_dir(), f"conformance data missing at {CONFORMANCE}; restore tests/conformance from git"
    return CONFORMANCE


@pytest.fixture(scope="session")
def benchmark_script():
    """``benchmark_script(name)``: the module of ``benchmarks/NAME.py`` (scripts, not a package)."""
    import importlib.util

    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    return load


@pytest.fixture
def page_from_runs(tmp_path):
    """render(bench, runs, command) -> the text `engram bench BENCH --from-json ... --page` writes
    for these results (each written as one run's JSON file first), on machine "M"."""
    import json

    from engram.cli.main import main

    def render(bench: str, runs: list, command: str) -> str:
        files = []
        for i, r in enumerate(runs):
            files.append(tmp_path / f"{bench}-run{i}.json")
            files[-1].write_text(json.dumps(r))
        page = tmp_path / f"{bench}.md"
        assert main(["bench", bench, "--from-json", *map(str, files), "--page", str(page), "--page-machine", "M",
                     "--page-command", command]) == 0
        assert main(["bench", bench, "--from-json", str(files[0])]) == 2  # a page needs --page
        return page.read_text()
    return render


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from a second intra-op thread, and on a busy machine two
    OpenMP threads per op can be many times slower; restored afterwards."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


# ----------------------------------------------------------------------------- tiny models and data
class TinyWorld:
    """Factories for a tiny Engram model over a 300-id vocabulary and a matching dataset."""

    VOCAB = 300
    WORDS = ("the cat sat on a mat while the dog ran far away from the big red house near an old "
             "tree and the bird sang").split()

    @staticmethod
    def compression(vocab: int = VOCAB) -> np.ndarray:
        return np.arange(vocab, dtype=np.int64) // 2  # pairs of ids share a compressed id

    def model(self, seed: int = 0, vocab: int = VOCAB, random_rows: bool = False) -> EngramLM:
        """``random_rows``: every table row drawn from N(0, 1), distinct and non-trivial, so that a
        wrong lookup or a lost patch row shows."""
        torch.manual_seed(seed)
        model = EngramLM(preset("tiny", vocab), self.compression(vocab)).eval()
        if random_rows:
            with torch.no_grad():
                for table in engram_tables(model).values():
                    table.weight.normal_()
        return model

    def dataset(self, out: Path, seed: int = 0, vocab_size: int = 300, n_docs: int = 30,
                doc_words: int = 150, val_fraction: float = 0.15) -> Path:
        """A tiny dataset through the real pipeline (BPE tokenizer, shards, meta.json) from a
        repetitive Markov-ish text, so there is something to learn in a few dozen steps."""
        rng = random.Random(seed)
        docs = []
        for i in range(n_docs):
            w = [rng.choice(self.WORDS)]
            for _ in range(doc_words):
                j = self.WORDS.index(w[-1])
                w.append(self.WORDS[(j + 1) % len(self.WORDS)] if rng.random() < 0.7 else rng.choice(self.WORDS))
            docs.append(Document("synthetic", f"doc{i}", " ".join(w)))
        tok = train_bpe([d.text for d in docs], vocab_size)
        prepare_dataset(out, docs, tok, val_fraction=val_fraction, seed=seed, progress=False)
        return out

    def training_dataset(self, out: Path, seed: int = 0, vocab_size: int = 300, n_docs: int = 40) -> Path:
        """The training tests' dataset: longer documents, 10% validation."""
        return self.dataset(out, seed, vocab_size, n_docs, doc_words=200, val_fraction=0.1)

    @staticmethod
    def save_run(run: Path, data_dir: Path, seed: int = 0) -> EngramLM:
        """A weights-only checkpoint of an untrained tiny model for the dataset's tokenizer."""
        ds = load_dataset(data_dir)
        cfg = preset("tiny", int(ds.meta["vocab_size"]))
        torch.manual_seed(seed)
        model = EngramLM(cfg, _dataset_compression(cfg, ds, data_dir)).eval()
        with torch.no_grad():  # distinct, non-trivial rows so that a wrong lookup shows
            for e in model.engram_layers:
                e.table.weight.normal_()
        save_checkpoint(run, model, None, None, TrainConfig(batch_size=4, seq_len=32),
                        data_dir / "tokenizer.json", tokenizer_fingerprint=ds.meta["tokenizer_fingerprint"])
        return model


@pytest.fixture(scope="session")
def tiny() -> TinyWorld:
    return TinyWorld()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tiny) -> Path:
    """The training tests' dataset (``tiny.training_dataset``), built once per test module."""
    return tiny.training_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def dataset_vocab(dataset) -> int:
    return int(json.loads((dataset / "meta.json").read_text())["vocab_size"])


# ----------------------------------------------------------------------------- a tiny trained run
INSPECT_WORDS = ("the prince of wales rode with the king of france to the tower of london while the "
                 "queen sang").split()
INSPECT_PHRASES = ("the Prince of Wales", "the Milky Way", "Alexander the Great", "by the way")


def _inspect_documents(n_docs: int = 24, seed: int = 0) -> list[Document]:
    rng = random.Random(seed)
    docs = []
    for i in range(n_docs):
        parts = [rng.choice(INSPECT_PHRASES) if rng.random() < 0.3 else rng.choice(INSPECT_WORDS)
                 for _ in range(60)]
        docs.append(Document("synthetic", f"doc{i}", " ".join(parts) + "."))
    return docs


@pytest.fixture(scope="session")
def inspect_run(tmp_path_factory) -> tuple[Path, Path]:
    """(run_dir, data_dir): two Engram layers (0 and 1), two branches, three optimizer steps so
    that gates, tables and projections are not at their init."""
    root = tmp_path_factory.mktemp("engram-inspect-run")
    run, data = root / "run", root / "data"
    docs = _inspect_documents()
    tok = train_bpe([d.text for d in docs], 320)
    prepare_dataset(data, docs, tok, val_fraction=0.1, seed=0, progress=False)
    cfg = preset("tiny", tok.get_vocab_size())
    cfg.hc_mult = 2
    cfg.engram.layer_ids = (0, 1)
    tcfg = TrainConfig(steps=3, batch_size=2, seq_len=32, warmup_steps=1, eval_every=3,
                       eval_batches=1, save_every=3, log_every=1, seed=0)
    train(cfg, tcfg, data, run, progress=False)
    return run, data
