"""Retrofit adapters: what was trained on a base model, as files that ship without it.

An adapter directory::

    ADAPTER/adapter_config.json    format, RetrofitConfig, the base's fingerprint (architecture
                                   + weights sha256), the tokenizer's and the hash fingerprint,
                                   train config, and a manifest (size + sha256) of the files
    ADAPTER/adapter.safetensors    Engram gates, projections, norms, short conv
                                   (``engram.<layer>.<param>``) and the compression lookup
    ADAPTER/tables.engt            the Engram tables as a table file: every storage tier,
                                   ``engram table ...`` and ``engram patch ...`` read it
    ADAPTER/tokenizer.json         the base's tokenizer (for text in and out, N-gram indexes)
    ADAPTER/optimizer.safetensors  } training state for ``--resume``; not needed to use the
    ADAPTER/trainer_state.json     } adapter and safe to delete before shipping it

The base model's weights are never written. Saving stages every file in ``ADAPTER/.tmp-<pid>/``
and moves them into place with ``adapter_config.json`` last, so a crash leaves the previous
adapter loadable; loading checks the manifest, refuses another base or tokenizer naming both
fingerprints, and never unpickles.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from engram import __version__
from engram.config import RetrofitConfig, RetrofitError, StorageConfig, TableLocation, TrainConfig
from engram.data.tokenizer import save_tokenizer, tokenizer_fingerprint
from engram.fsutil import PathLike, file_sha256, fsync_dir
from engram.retrofit.base import BaseModel, architecture, load_base, weights_digest
from engram.retrofit.model import RetrofitLM
from engram.tables.process import open_layer_storage
from engram.tables.runtime import attach_tables
from engram.tables.tablefile import open_table, read_layer, save_model_tables
from engram.tables.tiers import MemoryStorage
from engram.training.checkpointing import (
    capture_rng_state,
    flatten_optimizers,
    restore_rng_state,
    unflatten_optimizers,
)

FORMAT_NAME = "engram-retrofit-adapter"
FORMAT_VERSION = 1
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter.safetensors"
TABLES_FILE = "tables.engt"
TOKENIZER_FILE = "tokenizer.json"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
_COMPRESSION_KEY = "compression.lookup"
_REQUIRED = {"format", "format_version", "retrofit", "pad_id", "base", "tokenizer_sha256",
             "hash_fingerprint", "files"}
_OPTIONAL = {"train", "param_counts", "engram_lm_version", "compression"}


@dataclass
class AdapterMeta:
    """What tools read about a saved model (the fields they use of ``CheckpointMeta``)."""

    run_dir: Path
    record: dict[str, Any]
    train_config: Optional[TrainConfig]
    tokenizer_fingerprint: str
    step: Optional[int]


def read_adapter_meta(adapter_dir: PathLike) -> AdapterMeta:
    d = Path(adapter_dir)
    rec = read_adapter_config(d)
    step = None
    if STATE_FILE in rec["files"]:
        try:
            step = int(json.loads((d / STATE_FILE).read_text())["step"])
        except (OSError, ValueError, KeyError, TypeError):
            step = None
    train = TrainConfig.from_dict(rec["train"]) if rec.get("train") else None
    return AdapterMeta(run_dir=d, record=rec, train_config=train, tokenizer_fingerprint=rec["tokenizer_sha256"],
                       step=step)


# ----------------------------------------------------------------------------- saving
def _fsync(path: Path) -> None:
    """Flush a staged file to disk, with the usual permissions (safetensors writes 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def engram_state(model: RetrofitLM) -> dict[str, torch.Tensor]:
    """Every trained tensor except the tables (those go to the table file): the Engram layers'
    (``engram.<layer>.<param>``) and LoRA's (``lora.<module>.<param>``)."""
    out = {}
    for lid, layer in model.engram.items():
        for name, t in layer.state_dict().items():
            if not name.startswith("multi_head_embedding."):
                out[f"engram.{lid}.{name}"] = t.detach().contiguous().cpu()
    for name, p in model.lora_state().items():
        out[f"lora.{name}"] = p.detach().contiguous().cpu()
    return out


def save_adapter(out_dir: PathLike, model: RetrofitLM, base: BaseModel, *,
                 optimizers: Optional[Mapping[str, torch.optim.Optimizer]] = None,
                 trainer_state: Optional[Mapping[str, Any]] = None,
                 train_cfg: Optional[TrainConfig] = None, base_digest: Optional[str] = None,
                 progress: bool = False) -> Path:
    """Write ``model``'s adapter into ``out_dir`` atomically (see the module docstring).

    ``base_digest``: the base's weights sha256 when the caller already has it (training computes
    it once, to check that the backbone stayed frozen)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stage = out / f".tmp-{os.getpid()}"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir()
    try:
        tensors = engram_state(model)
        if model.hasher is not None and model.hasher.lookup is not None:
            tensors[_COMPRESSION_KEY] = torch.from_numpy(np.array(model.hasher.lookup, dtype=np.int64))
        save_file(tensors, str(stage / WEIGHTS_FILE), metadata={"format": FORMAT_NAME})
        _fsync(stage / WEIGHTS_FILE)
        written = [WEIGHTS_FILE, TOKENIZER_FILE]
        save_tokenizer(base.tokenizer, stage / TOKENIZER_FILE)
        if model.hasher is not None:  # a LoRA-only adapter has no tables
            save_model_tables(model, stage / TABLES_FILE, progress=progress)
            written.append(TABLES_FILE)
        if optimizers or trainer_state is not None:
            state = dict(trainer_state or {})
            if optimizers:
                opt_tensors, opt_meta = flatten_optimizers(optimizers)
                save_file(opt_tensors, str(stage / OPTIMIZER_FILE), metadata={"format": FORMAT_NAME})
                _fsync(stage / OPTIMIZER_FILE)
                written.append(OPTIMIZER_FILE)
                state["optimizers"] = opt_meta
            state.setdefault("rng", capture_rng_state())
            (stage / STATE_FILE).write_text(json.dumps(state))
            _fsync(stage / STATE_FILE)
            written.append(STATE_FILE)
        record = {
            "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "engram_lm_version": __version__,
            "retrofit": model.retrofit_config.to_dict(),
            "pad_id": model.cfg.engram.pad_id if model.cfg.engram is not None else base.pad_id,
            "base": {"name": base.name, "architecture": architecture(base.config),
                     "weights_sha256": base_digest or weights_digest(base.model)},
            "tokenizer_sha256": tokenizer_fingerprint(base.tokenizer),
            "hash_fingerprint": model.hasher.fingerprint() if model.hasher is not None else None,
            "compression": ({"vocab_size": model.cfg.vocab_size,
                             "compressed_size": model.hasher.compressed_vocab_size}
                            if model.hasher is not None else None),
            "param_counts": model.param_counts(),
            "files": {n: {"bytes": (stage / n).stat().st_size, "sha256": file_sha256(stage / n)} for n in written},
        }
        if train_cfg is not None:
            record["train"] = train_cfg.to_dict()
        (stage / CONFIG_FILE).write_text(json.dumps(record, indent=2))
        _fsync(stage / CONFIG_FILE)
        for name in [*written, CONFIG_FILE]:  # the config last: it commits the manifest
            os.replace(stage / name, out / name)
        fsync_dir(out)
        for name in (OPTIMIZER_FILE, STATE_FILE):  # an older adapter's training state would contradict this one
            if name not in written and (out / name).exists():
                (out / name).unlink()
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------- loading
def read_adapter_config(adapter_dir: PathLike) -> dict[str, Any]:
    """The validated ``adapter_config.json`` of ``adapter_dir``."""
    d = Path(adapter_dir)
    path = d / CONFIG_FILE
    if not path.is_file():
        raise RetrofitError(f"{d} is not a retrofit adapter ({CONFIG_FILE} is missing); train one with "
                            f"`engram retrofit train --out {d}`")
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RetrofitError(f"{path} is not valid JSON ({e}); the adapter is corrupt, re-save it") from None
    if not isinstance(rec, dict) or rec.get("format") != FORMAT_NAME:
        raise RetrofitError(f"{path} is not an engram-lm retrofit adapter (format "
                            f"{rec.get('format') if isinstance(rec, dict) else None!r})")
    missing, unknown = sorted(_REQUIRED - set(rec)), sorted(set(rec) - _REQUIRED - _OPTIONAL)
    if missing or unknown:
        raise RetrofitError(f"{path}: missing keys {missing}, unknown keys {unknown}; the adapter is corrupt "
                            f"or from another version")
    if rec["format_version"] != FORMAT_VERSION:
        raise RetrofitError(f"{path}: format_version {rec['format_version']} is not {FORMAT_VERSION}; use the "
                            f"engram-lm version that wrote it")
    rec["retrofit"] = RetrofitConfig.from_dict(rec["retrofit"], f"{path}: retrofit")
    for name, info in rec["files"].items():
        f = d / name
        if not f.is_file() or f.stat().st_size != info.get("bytes"):
            raise RetrofitError(f"{f} is missing or has {f.stat().st_size if f.is_file() else 0} bytes, the "
                                f"manifest says {info.get('bytes')}; the adapter is incomplete or corrupt")
    return rec


def _verify(d: Path, rec: Mapping[str, Any], name: str) -> Path:
    path = d / name
    if name not in rec["files"]:
        raise RetrofitError(f"{d}: the manifest has no {name}; the adapter is incomplete")
    if file_sha256(path) != rec["files"][name]["sha256"]:
        raise RetrofitError(f"{path}: sha256 differs from the manifest; the file is corrupt, re-save the adapter")
    return path


def check_base(rec: Mapping[str, Any], base: BaseModel, where: str, digest: Optional[str] = None) -> str:
    """Refuse a base or tokenizer other than the adapter's; returns the base's weights digest."""
    want = rec["base"]
    arch = architecture(base.config)
    if arch != want["architecture"]:
        rec_arch = want["architecture"]
        diff = sorted(k for k in set(arch) | set(rec_arch) if arch.get(k) != rec_arch.get(k))
        shown = ", ".join(f"{k}: {rec_arch.get(k)!r} vs {arch.get(k)!r}" for k in diff[:4])
        raise RetrofitError(f"{where} was trained on base {want['name']!r} but base {base.name!r} has another "
                            f"architecture ({shown}); load it on {want['name']!r}")
    tok = tokenizer_fingerprint(base.tokenizer)
    if tok != rec["tokenizer_sha256"]:
        raise RetrofitError(f"{where} was trained with tokenizer {rec['tokenizer_sha256'][:12]} (base "
                            f"{want['name']!r}) but base {base.name!r} has tokenizer {tok[:12]}; load it on "
                            f"{want['name']!r}")
    digest = digest or weights_digest(base.model)
    if digest != want["weights_sha256"]:
        raise RetrofitError(f"{where} was trained on base {want['name']!r} (weights {want['weights_sha256'][:12]}) "
                            f"but base {base.name!r} has weights {digest[:12]}; load it on the base it was "
                            f"trained on")
    return digest


def load_adapter(adapter_dir: PathLike, base: Union[BaseModel, str, None] = None, *,
                 storage: Optional[StorageConfig] = None, device: Union[str, torch.device] = "cpu",
                 progress: bool = False) -> RetrofitLM:
    """Base + adapter as one :class:`RetrofitLM` (``model.base_model`` is the :class:`BaseModel`).

    ``base``: a loaded base, a base name/directory, or None for the one recorded in the adapter.
    ``storage``: where the table rows come from (default: the adapter's table file, read into
    memory); ``mmap`` / ``cached`` serve them from the file, with ``prefetch`` as in ``EngramLM``.
    """
    d = Path(adapter_dir)
    rec = read_adapter_config(d)
    cfg: RetrofitConfig = rec["retrofit"]
    if base is None or isinstance(base, str):
        base = load_base(base or cfg.base, progress=progress)
    check_base(rec, base, f"adapter {d}")
    tensors = _load_tensors(_verify(d, rec, WEIGHTS_FILE))
    lookup = tensors.pop(_COMPRESSION_KEY, None)
    storage = storage or StorageConfig(prefetch=False)  # plain trainable in-memory tables, no runtime
    table_path = Path(storage.path) if storage.path is not None else d / TABLES_FILE
    in_memory = storage.kind == TableLocation.MEMORY
    model = RetrofitLM(base.model, cfg, lookup.numpy() if lookup is not None else None, int(rec["pad_id"]),
                       allocate_tables=in_memory)
    fp = model.hasher.fingerprint() if model.hasher is not None else None
    if fp != rec["hash_fingerprint"]:
        raise RetrofitError(f"{d}: the hash rebuilt from the adapter's config has fingerprint {str(fp)[:12]}, "
                            f"the adapter records {str(rec['hash_fingerprint'])[:12]}; the adapter is corrupt")
    _load_engram_weights(model, tensors, d / WEIGHTS_FILE)
    model.base_model = base
    model = model.to(device)
    if model.hasher is None:  # LoRA only: no tables to serve
        return model.eval()
    header = open_table(table_path, model.hasher, model.cfg.engram.head_dim)
    if in_memory:
        _copy_tables(model, header, progress)
        if storage.prefetch:
            attach_tables(model, {lid: MemoryStorage(t.weight) for lid, t in model.engram_tables().items()},
                          prefetch=True)
    else:
        storages = {e.layer_id: open_layer_storage(storage, header, e.layer_id) for e in model.engram_layers}
        attach_tables(model, storages, prefetch=storage.prefetch, device=device)
    return model.eval()


def _copy_tables(model: RetrofitLM, header: Any, progress: bool) -> None:
    for lid, table in model.engram_tables().items():
        table.load_full(read_layer(header, lid, table.weight.dtype, progress=progress))


def load_adapter_into(model: RetrofitLM, adapter_dir: PathLike, progress: bool = False) -> dict[str, Any]:
    """Copy an adapter's Engram weights and tables into ``model`` (built from the same config and
    base, tables in memory); returns the adapter's config record. Used to resume training."""
    d = Path(adapter_dir)
    rec = read_adapter_config(d)
    fp = model.hasher.fingerprint() if model.hasher is not None else None
    if fp != rec["hash_fingerprint"]:
        raise RetrofitError(f"{d}: the adapter's hash fingerprint {str(rec['hash_fingerprint'])[:12]} is not the "
                            f"model's {str(fp)[:12]}; it was trained with other Engram settings")
    tensors = _load_tensors(_verify(d, rec, WEIGHTS_FILE))
    tensors.pop(_COMPRESSION_KEY, None)
    _load_engram_weights(model, tensors, d / WEIGHTS_FILE)
    if model.hasher is not None:
        header = open_table(_verify(d, rec, TABLES_FILE), model.hasher, model.cfg.engram.head_dim)
        _copy_tables(model, header, progress)
    return rec


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise RetrofitError(f"{path} cannot be read as safetensors ({e}); the adapter is corrupt") from None


def _load_engram_weights(model: RetrofitLM, tensors: dict[str, torch.Tensor], path: Path) -> None:
    expected = {k: v for k, v in engram_state(model).items()}
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    bad_shape = sorted(k for k in set(expected) & set(tensors) if expected[k].shape != tensors[k].shape)
    if missing or unexpected or bad_shape:
        raise RetrofitError(f"{path} does not fit the model built from its config (missing {missing[:4]}, "
                            f"unexpected {unexpected[:4]}, misshapen {bad_shape[:4]}); the adapter is corrupt")
    with torch.no_grad():
        lora = model.lora_state()
        for key, t in tensors.items():
            if key.startswith("lora."):
                lora[key[len("lora."):]].copy_(t)
        for lid, layer in model.engram.items():
            prefix = f"engram.{lid}."
            sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            result = layer.load_state_dict(sd, strict=False)
            left = [k for k in result.missing_keys if not k.startswith("multi_head_embedding.")]
            if left:
                raise RetrofitError(f"{path}: {left[:4]} were not loaded; the adapter is corrupt")


def load_training_state(adapter_dir: PathLike, optimizers: Mapping[str, torch.optim.Optimizer]) -> dict[str, Any]:
    """Optimizer and trainer state of an adapter saved during training (for ``--resume``)."""
    d = Path(adapter_dir)
    rec = read_adapter_config(d)
    if STATE_FILE not in rec["files"]:
        raise RetrofitError(f"{d} holds no training state ({STATE_FILE}); it cannot be resumed, start a new "
                            f"run from it instead")
    state = json.loads(_verify(d, rec, STATE_FILE).read_text())
    opt_meta = state.pop("optimizers", {})
    if optimizers:
        if OPTIMIZER_FILE not in rec["files"]:
            raise RetrofitError(f"{d} has no {OPTIMIZER_FILE}; it cannot be resumed exactly")
        sds = unflatten_optimizers(_load_tensors(_verify(d, rec, OPTIMIZER_FILE)), opt_meta,
                                        str(d / OPTIMIZER_FILE))
        if set(sds) != set(optimizers):
            raise RetrofitError(f"{d / OPTIMIZER_FILE} holds optimizers {sorted(sds)}, the trainer has "
                                f"{sorted(optimizers)}")
        for name, opt in optimizers.items():
            opt.load_state_dict(sds[name])
    if "rng" in state:
        restore_rng_state(state.pop("rng"))
    return state
