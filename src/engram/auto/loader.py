"""``load`` and ``save``: one way in and out for every kind of saved model.

Two kinds of directory hold a model, told apart by the file that commits them:

    RUN/config.json               a training run (``engram train``, ``save_checkpoint``): EngramLM
    ADAPTER/adapter_config.json   a retrofit adapter (``engram retrofit train``, ``save_adapter``):
                                  RetrofitLM, the adapter on its pretrained base

``load`` looks at the directory, opens it with its own loader (every check of that loader
applies: manifests, checksums, hash fingerprints, the base's weights) and returns a
:class:`~engram.model.protocol.LanguageModel`. What was read travels with the model as
``model.loaded_from`` (:class:`LoadedFrom`: kind, directory, meta, tokenizer), so ``save(model,
path)`` writes the same kind back without being told which. Saving writes weights only: the
training state (optimizer, trainer step) stays in the directory training writes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from tokenizers import Tokenizer

from engram.config import StorageConfig, TrainConfig
from engram.data.tokenizer import load_tokenizer, tokenizer_fingerprint
from engram.errors import EngramError, NotFoundError
from engram.fsutil import PathLike
from engram.model import checkpoint as ckpt
from engram.model.lm import EngramLM
from engram.model.protocol import LanguageModel
from engram.retrofit import adapter as adapter_mod
from engram.retrofit.base import BaseModel
from engram.retrofit.model import RetrofitLM
from engram.tables.runtime import load_model_with_tables


class LoadError(EngramError):
    """A path that holds no model this library can open, or a request that does not fit it."""


class ModelKind(str, enum.Enum):
    RUN = "run"  # a training run directory: EngramLM
    ADAPTER = "adapter"  # a retrofit adapter directory: RetrofitLM on its base


# the file whose presence tells each kind; an adapter is checked first (a base model
# directory of Hugging Face also has a config.json, an adapter never does)
MARKERS = ((ModelKind.ADAPTER, adapter_mod.CONFIG_FILE), (ModelKind.RUN, ckpt.CONFIG_FILE))


@dataclass(frozen=True)
class LoadedFrom:
    """Where a loaded model came from: what tools read besides the model itself."""

    kind: ModelKind
    path: Path
    meta: Any  # CheckpointMeta (run) or AdapterMeta (adapter): train_config, tokenizer_fingerprint, step
    tokenizer: Optional[Tokenizer]  # None for a run saved without its tokenizer.json

    @property
    def train_config(self) -> Optional[TrainConfig]:
        return self.meta.train_config

    @property
    def tokenizer_fingerprint(self) -> Optional[str]:
        return self.meta.tokenizer_fingerprint

    def require_tokenizer(self) -> Tokenizer:
        """The tokenizer, or a one-line error when the directory has none."""
        if self.tokenizer is None:
            raise LoadError(f"{self.path} has no {ckpt.TOKENIZER_FILE}, so text cannot be encoded for it; "
                            f"re-save the run with its dataset's tokenizer")
        return self.tokenizer


def model_kind(path: PathLike) -> ModelKind:
    """The kind of model directory ``path`` is (only the marker files are looked at)."""
    p = Path(path)
    if not p.exists():
        raise NotFoundError(f"{p} does not exist; pass a run directory (engram train --out) or a retrofit "
                            f"adapter directory (engram retrofit train --out)")
    if not p.is_dir():
        raise LoadError(f"{p} is a file, not a model directory; pass the directory that holds "
                        f"{ckpt.CONFIG_FILE} (a run) or {adapter_mod.CONFIG_FILE} (a retrofit adapter)")
    for kind, marker in MARKERS:
        if (p / marker).is_file():
            return kind
    raise LoadError(f"{p} holds neither {ckpt.CONFIG_FILE} (a training run) nor {adapter_mod.CONFIG_FILE} "
                    f"(a retrofit adapter); pass a directory written by `engram train` or "
                    f"`engram retrofit train`")


def table_file(path: PathLike) -> Optional[Path]:
    """The table file a model directory serves its tables from by default (an adapter's
    ``tables.engt``), or None when its tables live in its weights file (a run)."""
    if model_kind(path) == ModelKind.ADAPTER:
        return Path(path) / adapter_mod.TABLES_FILE
    return None


def load(path: PathLike, *, storage: Optional[StorageConfig] = None, device: Union[str, torch.device] = "cpu",
         base: Union[BaseModel, str, None] = None, progress: bool = False) -> LanguageModel:
    """Open the model saved in ``path``, whatever its kind; returns it in eval mode.

    ``storage``: where the table rows come from (``StorageConfig``; default: the directory's own
    tables, in memory). ``device``: where the model runs. ``base``: for an adapter, the base to
    load it on (a loaded ``BaseModel``, a name or a directory; default the one it records).
    ``model.loaded_from`` tells what was read (:class:`LoadedFrom`). A table runtime, when
    ``storage`` asks for one, is ``engram.tables.runtime.table_runtime(model)``; close it when done.
    """
    p = Path(path)
    kind = model_kind(p)
    if kind == ModelKind.RUN:
        if base is not None:
            raise LoadError(f"base={str(getattr(base, 'name', base))!r} applies to retrofit adapters; {p} is a "
                            f"training run, which carries its whole model: drop the base")
        if storage is None or storage.is_default:
            model, meta = ckpt.load_model(p, device)
        else:
            model, meta = load_model_with_tables(p, storage, device)
        tok_path = p / ckpt.TOKENIZER_FILE
        tok = load_tokenizer(tok_path) if tok_path.is_file() else None
    else:
        model = adapter_mod.load_adapter(p, base, storage=storage, device=device, progress=progress)
        meta = adapter_mod.read_adapter_meta(p)
        tok = model.base_model.tokenizer
    model.loaded_from = LoadedFrom(kind=kind, path=p, meta=meta, tokenizer=tok)
    return model


def save(model: LanguageModel, path: PathLike, *, train_config: Optional[TrainConfig] = None,
         tokenizer_path: Optional[PathLike] = None, progress: bool = False) -> Path:
    """Write ``model``'s weights to ``path`` as the kind of directory it loads from (a run for
    ``EngramLM``, an adapter for ``RetrofitLM``); ``load(path)`` gives the same model back.

    ``train_config`` and the tokenizer default to those of ``model.loaded_from`` (when the model
    came from ``load``). ``tokenizer_path``: a ``tokenizer.json`` to store with a run. The
    tables must be in memory: a model whose rows are served from a file is refused."""
    out = Path(path)
    source: Optional[LoadedFrom] = getattr(model, "loaded_from", None)
    if any(t.is_meta for t in model.table_parameters()):
        raise LoadError(f"cannot save to {out}: the model's tables are served from a file, not held in "
                        f"memory; load it without storage= (or with kind memory) to save it")
    if source is not None and out.resolve() == source.path.resolve():
        raise LoadError(f"cannot save over {out}, the directory the model was loaded from (its training "
                        f"state would be dropped); save to another directory")
    train_config = train_config or (source.train_config if source is not None else None)
    if isinstance(model, RetrofitLM):
        base = getattr(model, "base_model", None)
        if base is None:
            raise LoadError("this RetrofitLM has no base_model (set by load_adapter / engram.load); save it "
                            "with engram.retrofit.adapter.save_adapter(path, model, base)")
        if tokenizer_path is not None:
            raise LoadError("tokenizer_path applies to runs; an adapter stores its base's tokenizer")
        return adapter_mod.save_adapter(out, model, base, train_cfg=train_config, progress=progress)
    if isinstance(model, EngramLM):
        tok_fp = source.tokenizer_fingerprint if source is not None else None
        if tokenizer_path is None and source is not None and (source.path / ckpt.TOKENIZER_FILE).is_file():
            tokenizer_path = source.path / ckpt.TOKENIZER_FILE
        elif tokenizer_path is not None:
            tok_fp = tokenizer_fingerprint(load_tokenizer(tokenizer_path))
        return ckpt.save_checkpoint(out, model, None, None, train_config, tokenizer_path,
                                    tokenizer_fingerprint=tok_fp)
    raise LoadError(f"save() takes an EngramLM or a RetrofitLM, got {type(model).__name__}")
