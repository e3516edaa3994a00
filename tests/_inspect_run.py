"""A tiny trained Engram run shared by the inspection, server and browser tests.

Two Engram layers (0 and 1) and two hyper-connection branches, so layer/branch selection is
exercised; three optimizer steps so gates, tables and projections are not at their init.
Built once per test session under pytest's base temp directory.
"""

from __future__ import annotations

import random
from pathlib import Path

from engram.config import TrainConfig, preset
from engram.data.corpus import Document
from engram.data.shards import prepare_dataset
from engram.data.tokenizer import train_bpe
from engram.training.trainer import train

WORDS = ("the prince of wales rode with the king of france to the tower of london while the "
         "queen sang").split()
PHRASES = ("the Prince of Wales", "the Milky Way", "Alexander the Great", "by the way")


def _documents(n_docs: int = 24, seed: int = 0) -> list[Document]:
    rng = random.Random(seed)
    docs = []
    for i in range(n_docs):
        parts = []
        for _ in range(60):
            parts.append(rng.choice(PHRASES) if rng.random() < 0.3 else rng.choice(WORDS))
        docs.append(Document("synthetic", f"doc{i}", " ".join(parts) + "."))
    return docs


def build_tiny_run(root: Path) -> tuple[Path, Path]:
    """(run_dir, data_dir) under ``root``; reused when already built."""
    run, data = root / "run", root / "data"
    if (run / "config.json").is_file():
        return run, data
    docs = _documents()
    tok = train_bpe([d.text for d in docs], 320)
    prepare_dataset(data, docs, tok, val_fraction=0.1, seed=0, progress=False)
    cfg = preset("tiny", tok.get_vocab_size())
    cfg.hc_mult = 2
    cfg.engram.layer_ids = (0, 1)
    tcfg = TrainConfig(steps=3, batch_size=2, seq_len=32, warmup_steps=1, eval_every=3,
                       eval_batches=1, save_every=3, log_every=1, seed=0)
    train(cfg, tcfg, data, run, progress=False)
    return run, data


def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    return build_tiny_run(tmp_path_factory.getbasetemp() / "engram-inspect-run")
