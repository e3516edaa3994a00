"""engram-lm: conditional memory (hashed N-gram tables) for language models.

The public API is importable from here; the names resolve on first use so that ``import engram``
(and the ``engram`` command's start-up) does not load torch::

    from engram import EngramConfig, ModelConfig, EngramLM, NgramHasher, load, save

Layout (lower layers never import higher ones; ``docs/architecture.md``)::

    cli
    bench
    inspect | science
    auto
    patches | ngram | retrofit | distributed
    training
    tables
    model
    hashing | data
    config, errors, fsutil
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "EngramConfig": "engram.config",
    "ModelConfig": "engram.config",
    "TrainConfig": "engram.config",
    "InputNgramConfig": "engram.config",
    "preset": "engram.config",
    "PRESETS": "engram.config",
    "EngramError": "engram.errors",
    "ConfigError": "engram.errors",
    "NgramHasher": "engram.hashing.hasher",
    "CompressionMap": "engram.hashing.compression",
    "build_compression": "engram.hashing.compression",
    "EngramLayer": "engram.model.layer",
    "EngramLM": "engram.model.lm",
    "ModelOutput": "engram.model.lm",
    "SamplingConfig": "engram.config",
    "generate": "engram.model.generation",
    "load": "engram.auto.loader",
    "save": "engram.auto.loader",
    "LanguageModel": "engram.model.protocol",
    "load_model": "engram.model.checkpoint",
    "save_checkpoint": "engram.model.checkpoint",
    "train": "engram.training.trainer",
    "evaluate": "engram.training.evaluation",
    "StorageConfig": "engram.config",
    "StorageKind": "engram.config",
    "TableLocation": "engram.config",
    "CachePolicy": "engram.config",
    "TableOptimizer": "engram.config",
    "EngramTable": "engram.model.table",
    "RowOverlay": "engram.model.table",
    "load_model_with_tables": "engram.tables.runtime",
    "NgramIndex": "engram.ngram.index",
    "RetrofitConfig": "engram.config",
    "RetrofitLM": "engram.retrofit.model",
    "load_base": "engram.retrofit.base",
    "load_adapter": "engram.retrofit.adapter",
    "save_adapter": "engram.retrofit.adapter",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'engram' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cache: the next access is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
