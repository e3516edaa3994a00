"""Shared fixtures for the table-storage tests: a tiny model, its table file, a tiny dataset."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from engram.config import TrainConfig, preset
from engram.data.corpus import Document
from engram.data.shards import prepare_dataset
from engram.data.tokenizer import train_bpe
from engram.model.checkpoint import save_checkpoint
from engram.model.lm import EngramLM

VOCAB = 300
WORDS = ("the cat sat on a mat while the dog ran far away from the big red house near an old "
         "tree and the bird sang").split()


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from a second intra-op thread, and on a busy machine two
    OpenMP threads per op can be many times slower; restored afterwards."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def compression(vocab: int = VOCAB) -> np.ndarray:
    lookup = np.arange(vocab, dtype=np.int64) // 2  # pairs of ids share a compressed id
    return lookup


def tiny_model(seed: int = 0, vocab: int = VOCAB) -> EngramLM:
    torch.manual_seed(seed)
    return EngramLM(preset("tiny", vocab), compression(vocab)).eval()


def prepare_tiny_dataset(out: Path, seed: int = 0, vocab_size: int = 300, n_docs: int = 30) -> Path:
    rng = random.Random(seed)
    docs = []
    for i in range(n_docs):
        w = [rng.choice(WORDS)]
        for _ in range(150):
            j = WORDS.index(w[-1])
            w.append(WORDS[(j + 1) % len(WORDS)] if rng.random() < 0.7 else rng.choice(WORDS))
        docs.append(Document("synthetic", f"doc{i}", " ".join(w)))
    tok = train_bpe([d.text for d in docs], vocab_size)
    prepare_dataset(out, docs, tok, val_fraction=0.15, seed=seed, progress=False)
    return out


def save_tiny_run(run: Path, data_dir: Path, seed: int = 0) -> EngramLM:
    """A weights-only checkpoint of an untrained tiny model for the dataset's tokenizer."""
    from engram.data.shards import load_dataset
    from engram.training.trainer import _dataset_compression

    ds = load_dataset(data_dir)
    vocab = int(ds.meta["vocab_size"])
    cfg = preset("tiny", vocab)
    torch.manual_seed(seed)
    model = EngramLM(cfg, _dataset_compression(cfg, ds, data_dir)).eval()
    with torch.no_grad():  # distinct, non-trivial rows so that a wrong lookup shows
        for e in model.engram_layers:
            e.multi_head_embedding.embedding.weight.normal_()
    save_checkpoint(run, model, None, None, TrainConfig(batch_size=4, seq_len=32),
                    data_dir / "tokenizer.json", tokenizer_fingerprint=ds.meta["tokenizer_fingerprint"])
    return model
