"""Checkpoints without pickle: safetensors for tensors, JSON for everything else.

A run directory holds one checkpoint (the latest)::

    RUN/config.json            model + train configs, hash and tokenizer fingerprints, format
                               version, and a manifest (size + sha256) of the files below
    RUN/model.safetensors      the model state dict (a tied ``lm_head.weight`` is stored once)
    RUN/optimizer.safetensors  optimizer state tensors (``engram.training.checkpointing``)
    RUN/trainer_state.json     step, RNG states, best val loss, data seed, optimizer scalars
    RUN/compression.npy        the tokenizer compression lookup, when the hasher uses one
    RUN/tokenizer.json         a copy of the dataset's tokenizer
    RUN/metrics.jsonl          written by ``train`` (not part of the checkpoint)

Saving is atomic per file and ordered: every file is first written and fsynced in
``RUN/.tmp-<pid>/``, then moved into place with ``os.replace``, ``config.json`` last. A crash
while writing leaves the previous checkpoint untouched; a crash between two renames leaves files
whose checksums disagree with ``config.json``'s manifest, which loading reports instead of
silently mixing two checkpoints.

A checkpoint saved by training on W processes (``engram.distributed``) is *sharded*: everything
but ``compression.npy`` and ``tokenizer.json`` lives in ``RUN/shards-<step>/``, where each rank
``r`` wrote ``tables-<r>-of-<W>.safetensors`` (its table rows ``r::W`` and their optimizer state)
and rank 0 the backbone (``model.safetensors`` without the tables, ``optimizer.safetensors``,
``trainer_state.json``). ``config.json`` names the directory (``"sharded"``) and lists every file
in its manifest, so replacing it is the single atomic commit of the whole checkpoint. Every
loader here reads both layouts (:func:`read_table_state` gathers the shards into whole tables);
a caller that holds only one rank's rows passes ``select_rows``
(:func:`engram.distributed.sharding.split_table_state`), so a checkpoint saved on N ranks loads on M.

The optimizer file and the trainer state are opaque here (named tensors and JSON):
:mod:`engram.training.checkpointing` flattens optimizer states and RNG states into them.

Loading validates before it trusts: config keys (unknown keys are errors), the recorded hash
fingerprint against the hasher rebuilt from the config and ``compression.npy`` (tables indexed by
another hash are garbage), file sizes and checksums, and missing / unexpected / misshapen
tensors. Every problem is a :class:`CheckpointError` naming the file and the fix.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from engram import __version__
from engram.config import ConfigError, ModelConfig, TrainConfig
from engram.errors import EngramError
from engram.fsutil import PathLike, file_sha256, fsync_dir
from engram.model.lm import EngramLM
from engram.model.table import TABLE_KEY_SUFFIX  # noqa: F401 - re-exported: the state-dict key suffix of Engram tables

FORMAT_NAME = "engram-lm-checkpoint"
FORMAT_VERSION = 1

CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
COMPRESSION_FILE = "compression.npy"
TOKENIZER_FILE = "tokenizer.json"
CHECKPOINT_FILES = (MODEL_FILE, OPTIMIZER_FILE, STATE_FILE, COMPRESSION_FILE, TOKENIZER_FILE)
STALE_FILES = (OPTIMIZER_FILE, STATE_FILE, COMPRESSION_FILE)  # a kept tokenizer.json is harmless

_REQUIRED_KEYS = {"format", "format_version", "model", "hash_fingerprint", "files"}
_OPTIONAL_KEYS = {"train", "tokenizer_fingerprint", "hasher", "param_counts", "tied_keys", "sharded",
                  "engram_lm_version"}
TABLE_OPTIMIZER = "tables"  # optimizer tensors "tables.*" are row-aligned with the tables (sharded with them)
ROOT_FILES = (COMPRESSION_FILE, TOKENIZER_FILE)  # at the run root in both layouts
SHARD_DIR_PREFIX = "shards-"  # RUN/shards-<step>-<tag>/: the files of a sharded checkpoint


def shard_file(rank: int, world: int) -> str:
    return f"tables-{rank:05d}-of-{world:05d}.safetensors"


class CheckpointError(EngramError):
    """A checkpoint is missing, incomplete, corrupt or inconsistent; the message names the fix."""


@dataclass
class CheckpointMeta:
    """What ``config.json`` records about a checkpoint (plus the trainer step, when saved)."""

    run_dir: Path
    model_config: ModelConfig
    train_config: Optional[TrainConfig]
    hash_fingerprint: Optional[str]
    tokenizer_fingerprint: Optional[str]
    format_version: int
    files: dict[str, dict[str, Any]]
    step: Optional[int] = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def sharded(self) -> Optional[dict[str, Any]]:
        """``{"world_size": W, "dir": "shards-..."}`` for a checkpoint saved on W ranks, else None."""
        return self.raw.get("sharded")

    def path(self, name: str) -> Path:
        """Where checkpoint file ``name`` lives (in the shard directory of a sharded checkpoint)."""
        if self.sharded and name not in ROOT_FILES:
            return self.run_dir / self.sharded["dir"] / name
        return self.run_dir / name


# ----------------------------------------------------------------------------- small file helpers
def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _write_json(path: Path, data: Any, indent: Optional[int] = 2) -> None:
    try:
        text = json.dumps(data, indent=indent, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"cannot write {path.name}: value is not plain JSON ({e})") from e
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")
        f.flush()
        os.fsync(f.fileno())


def _file_digest(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path} not found; is {path.parent} a run directory written by "
                              f"engram-lm (train or save_checkpoint)?")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the file is damaged, restore it "
                              f"or re-save the checkpoint") from e


# ----------------------------------------------------------------------------- model state
def _tied_keys(model: torch.nn.Module) -> dict[str, str]:
    """{alias: kept key} for state-dict entries that are the same tensor (tied embeddings)."""
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    tied: dict[str, str] = {}
    for key, t in model.state_dict(keep_vars=True).items():
        ident = (t.data_ptr(), t.storage_offset(), tuple(t.shape))
        if t.numel() and ident in seen:
            tied[key] = seen[ident]
        else:
            seen[ident] = key
    return tied


def model_tensors(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict ready for safetensors (tied aliases dropped) and the {alias: kept} map."""
    tied = _tied_keys(model)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k not in tied}
    return tensors, tied


def _load_safetensors(path: Path, manifest: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    _verify_file(path, manifest)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} is not a complete safetensors file ({e}); the file is truncated "
                              f"or damaged: restore it or re-save the checkpoint") from e


def _verify_file(path: Path, manifest: Mapping[str, Any]) -> None:
    """Size and checksum against config.json's manifest (when the manifest lists the file)."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; config.json lists it, so the checkpoint is "
                              f"incomplete: restore the file or re-save the checkpoint")
    want = manifest.get(path.name)
    if not want:
        return
    size = path.stat().st_size
    if size != want.get("bytes"):
        raise CheckpointError(
            f"{path} is {size} bytes but config.json records {want.get('bytes')}: the file is "
            f"truncated or was replaced by another save; restore it or re-save the checkpoint")
    got = _file_digest(path)["sha256"]
    if got != want.get("sha256"):
        raise CheckpointError(
            f"{path} has sha256 {got[:16]}... but config.json records {str(want.get('sha256'))[:16]}...: "
            f"the file is damaged or comes from another save; restore it or re-save the checkpoint")


def load_state_into(model: EngramLM, tensors: dict[str, torch.Tensor], tied: Mapping[str, str],
                    source: str) -> None:
    """Copy ``tensors`` into ``model``, naming missing, unexpected and misshapen entries."""
    expected = model.state_dict()
    model_tied = _tied_keys(model)
    for alias, kept in {**dict(tied), **model_tied}.items():
        if alias not in tensors and kept in tensors:
            tensors[alias] = tensors[kept]  # re-tie: the alias was not stored
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not match the model built from config.json: missing keys {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''}, unexpected keys {unexpected[:10]}"
            f"{' ...' if len(unexpected) > 10 else ''}; the weights and config.json come from "
            f"different models, re-save the checkpoint")
    bad = [f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(v.shape)}"
           for k, v in expected.items() if tuple(tensors[k].shape) != tuple(v.shape)]
    if bad:
        raise CheckpointError(f"{source}: tensor shapes differ from the model built from config.json "
                              f"({'; '.join(bad[:5])}); the weights belong to another config")
    model.load_state_dict(tensors, strict=True)


# ----------------------------------------------------------------------------- save
def _model_compression(model: EngramLM) -> Optional[np.ndarray]:
    hasher = model.hasher
    return None if hasher is None else getattr(hasher, "lookup", None)


def save_checkpoint(run_dir: PathLike, model: EngramLM, optimizer_tensors: Optional[Mapping[str, torch.Tensor]],
                    trainer_state: Optional[Mapping[str, Any]], train_cfg: Optional[TrainConfig],
                    tokenizer_path: Optional[PathLike] = None, *,
                    tokenizer_fingerprint: Optional[str] = None) -> Path:
    """Write a checkpoint into ``run_dir`` atomically (see the module docstring); returns run_dir.

    ``optimizer_tensors`` (``optimizer.safetensors``) and ``trainer_state`` (``trainer_state.json``,
    plain JSON) are opaque here: :mod:`engram.training.checkpointing` decides how optimizers and
    RNG states are flattened into them (and saves through it). Files of a previous checkpoint that
    this one lacks (optimizer, trainer state, compression) are removed after the commit. Without
    both it is a weights-only export that cannot be resumed.
    """
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    stage = run / f".tmp-{os.getpid()}"
    if stage.exists():
        shutil.rmtree(stage)  # left by an earlier crash of this same pid
    stage.mkdir()
    try:
        written = _stage_files(stage, model, optimizer_tensors, trainer_state, tokenizer_path)
        manifest = {name: _file_digest(stage / name) for name in written}
        _write_json(stage / CONFIG_FILE, _config_record(model, train_cfg, tokenizer_fingerprint, manifest))
        for name in [*written, CONFIG_FILE]:  # config.json last: it commits the manifest
            os.replace(stage / name, run / name)
        fsync_dir(run)
        for name in STALE_FILES:  # left by an older checkpoint, they would contradict this one
            if name not in written and (run / name).exists():
                (run / name).unlink()
        for old in run.glob(SHARD_DIR_PREFIX + "*"):  # a sharded checkpoint this one replaces
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return run


def _stage_files(stage: Path, model: EngramLM, optimizer_tensors: Optional[Mapping[str, torch.Tensor]],
                 trainer_state: Optional[Mapping[str, Any]],
                 tokenizer_path: Optional[PathLike]) -> list[str]:
    """Write every checkpoint file except config.json into ``stage``; returns their names."""
    written = []
    tensors, tied = model_tensors(model)
    save_file(tensors, str(stage / MODEL_FILE), metadata={"format": FORMAT_NAME, "tied": json.dumps(tied)})
    _fsync_file(stage / MODEL_FILE)
    written.append(MODEL_FILE)

    if trainer_state is None and optimizer_tensors is None:
        written += _stage_extras(stage, model, tokenizer_path)
        return written  # a weights-only export: nothing to resume from
    if optimizer_tensors is not None:
        save_file(dict(optimizer_tensors), str(stage / OPTIMIZER_FILE), metadata={"format": FORMAT_NAME})
        _fsync_file(stage / OPTIMIZER_FILE)
        written.append(OPTIMIZER_FILE)
    _write_json(stage / STATE_FILE, dict(trainer_state or {}), indent=None)  # RNG and param index lists: keep it compact
    written.append(STATE_FILE)
    return written + _stage_extras(stage, model, tokenizer_path)


def _stage_extras(stage: Path, model: EngramLM, tokenizer_path: Optional[PathLike]) -> list[str]:
    """compression.npy and tokenizer.json, when there are any."""
    written = []
    lookup = _model_compression(model)
    if lookup is not None:
        with open(stage / COMPRESSION_FILE, "wb") as f:
            np.save(f, np.ascontiguousarray(lookup, dtype=np.int64), allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        written.append(COMPRESSION_FILE)

    if tokenizer_path is not None:
        src = Path(tokenizer_path)
        if not src.is_file():
            raise CheckpointError(f"tokenizer_path={str(src)!r} is not a file; pass the dataset's "
                                  f"tokenizer.json or None")
        shutil.copyfile(src, stage / TOKENIZER_FILE)
        _fsync_file(stage / TOKENIZER_FILE)
        written.append(TOKENIZER_FILE)
    return written


def _config_record(model: EngramLM, train_cfg: Optional[TrainConfig],
                   tokenizer_fingerprint: Optional[str], manifest: dict[str, Any]) -> dict[str, Any]:
    hasher = model.hasher
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "engram_lm_version": __version__,
        "model": model.cfg.to_dict(),
        "train": train_cfg.to_dict() if train_cfg is not None else None,
        "hash_fingerprint": hasher.fingerprint() if hasher is not None else None,
        "hasher": hasher.describe() if hasher is not None else None,
        "tokenizer_fingerprint": tokenizer_fingerprint,
        "param_counts": model.param_counts(),
        "tied_keys": _tied_keys(model),
        "files": manifest,
    }


# ----------------------------------------------------------------------------- load
def read_config(run_dir: PathLike) -> CheckpointMeta:
    """Parse and validate ``RUN/config.json`` (no tensors are read)."""
    run = Path(run_dir)
    path = run / CONFIG_FILE
    raw = _read_json(path)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - _REQUIRED_KEYS - _OPTIONAL_KEYS)
    missing = sorted(_REQUIRED_KEYS - set(raw))
    if unknown or missing:
        raise CheckpointError(
            f"{path}: unknown key(s) {unknown}, missing key(s) {missing}; known keys are "
            f"{sorted(_REQUIRED_KEYS | _OPTIONAL_KEYS)}. Fix the file or re-save the checkpoint")
    if raw["format"] != FORMAT_NAME:
        raise CheckpointError(f"{path}: format {raw['format']!r} is not {FORMAT_NAME!r}; "
                              f"this directory was not written by engram-lm")
    version = raw["format_version"]
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version={version!r}; this engram-lm reads versions "
                              f"1..{FORMAT_VERSION}, upgrade engram-lm to read newer checkpoints")
    try:
        model_cfg = ModelConfig.from_dict(raw["model"])
        train_cfg = TrainConfig.from_dict(raw["train"]) if raw.get("train") is not None else None
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{path}: {e}; fix the value in the file or re-save the checkpoint") from e
    files = raw["files"]
    if not isinstance(files, dict):
        raise CheckpointError(f"{path}: 'files' must be an object of file name -> size and sha256")
    sharded = raw.get("sharded")
    if sharded is not None and not (isinstance(sharded, dict) and isinstance(sharded.get("world_size"), int)
                                    and sharded["world_size"] >= 1 and isinstance(sharded.get("dir"), str)
                                    and "/" not in sharded["dir"] and not sharded["dir"].startswith(".")):
        raise CheckpointError(f"{path}: 'sharded' must be {{\"world_size\": int >= 1, \"dir\": name}}, got "
                              f"{sharded!r}; fix the file or re-save the checkpoint")
    step = None
    state_path = run / sharded["dir"] / STATE_FILE if sharded else run / STATE_FILE
    if state_path.is_file():
        try:
            step = int(json.loads(state_path.read_text(encoding="utf-8")).get("step"))
        except (ValueError, TypeError, AttributeError, json.JSONDecodeError):
            step = None  # reported properly by read_resume_state
    return CheckpointMeta(run_dir=run, model_config=model_cfg, train_config=train_cfg,
                          hash_fingerprint=raw["hash_fingerprint"],
                          tokenizer_fingerprint=raw.get("tokenizer_fingerprint"),
                          format_version=version, files=files, step=step, raw=raw)


def load_compression_file(run_dir: PathLike, meta: Optional[CheckpointMeta] = None) -> Optional[np.ndarray]:
    """``RUN/compression.npy`` as int64, or None when the checkpoint has none."""
    path = Path(run_dir) / COMPRESSION_FILE
    listed = meta is not None and COMPRESSION_FILE in meta.files
    if not path.is_file():
        if listed:
            raise CheckpointError(f"{path} is missing but config.json lists it; restore the file "
                                  f"or re-save the checkpoint")
        return None
    if meta is not None:
        _verify_file(path, meta.files)
    try:
        lookup = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise CheckpointError(f"{path} is not a valid .npy compression lookup ({e}); restore it "
                              f"or re-save the checkpoint") from e
    if lookup.ndim != 1 or not np.issubdtype(lookup.dtype, np.integer):
        raise CheckpointError(f"{path}: expected a 1-D integer lookup, got shape {lookup.shape} "
                              f"dtype {lookup.dtype}")
    return lookup.astype(np.int64, copy=False)


def check_hash_fingerprint(model: EngramLM, meta: CheckpointMeta) -> None:
    """The tables are only meaningful under the hash they were trained with."""
    rebuilt = model.hasher.fingerprint() if model.hasher is not None else None
    if rebuilt != meta.hash_fingerprint:
        raise CheckpointError(
            f"checkpoint hash config differs from the model's: recorded {meta.hash_fingerprint}, "
            f"rebuilt {rebuilt} (from {meta.run_dir / CONFIG_FILE} 'model.engram' and "
            f"{COMPRESSION_FILE}). The Engram tables are indexed by the recorded hash; restore the "
            f"original engram settings (seed, pad_id, table sizes, layer_ids) and compression.npy, "
            f"or retrain")


def build_model(meta: CheckpointMeta, device: Union[str, torch.device] = "cpu") -> EngramLM:
    """An untrained model for ``meta`` (compression included), hash fingerprint checked."""
    compression = load_compression_file(meta.run_dir, meta)
    try:
        model = EngramLM(meta.model_config, compression)
    except ValueError as e:
        raise CheckpointError(f"{meta.run_dir / CONFIG_FILE}: cannot build the model ({e})") from e
    check_hash_fingerprint(model, meta)
    return model.to(device)


def load_model(run_dir: PathLike, device: Union[str, torch.device] = "cpu"
               ) -> tuple[EngramLM, CheckpointMeta]:
    """Rebuild the model from ``RUN/config.json`` and load its weights; returns (model in eval mode, meta)."""
    meta = read_config(run_dir)
    model = build_model(meta, "cpu")
    _load_weights(model, meta)
    return model.to(device).eval(), meta


def _load_weights(model: EngramLM, meta: CheckpointMeta,
                  tables: Optional[dict[str, torch.Tensor]] = None) -> None:
    """``tables``: the table rows to load instead of the model file's (a rank's shard)."""
    if MODEL_FILE not in meta.files:
        raise CheckpointError(f"{meta.run_dir / CONFIG_FILE} lists no {MODEL_FILE}; re-save the checkpoint")
    path = meta.path(MODEL_FILE)
    tensors = _load_safetensors(path, meta.files)
    if tables is None and meta.sharded:  # the backbone file has no tables: gather them from the shards
        tables = read_table_state(meta)
    if tables is not None:
        tensors = {k: v for k, v in tensors.items() if not k.endswith(TABLE_KEY_SUFFIX)}
        tensors.update({k: v for k, v in tables.items() if k.endswith(TABLE_KEY_SUFFIX)})
    load_state_into(model, tensors, meta.raw.get("tied_keys") or {}, str(path))


def read_resume_state(run_dir: PathLike, model: EngramLM,
                      select_rows: Optional[Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]] = None
                      ) -> tuple[dict[str, Any], CheckpointMeta, Optional[dict[str, torch.Tensor]]]:
    """Load the weights into ``model`` (built from the same config and compression: checked via the
    hash fingerprint and the tensor shapes) and read what resuming needs besides them.

    Returns (trainer state, meta, optimizer tensors or None when the checkpoint has none); the
    optimizer tensors' ``tables.*`` entries are those of the rows the model holds.
    :func:`engram.training.checkpointing.load_for_resume` turns them back into optimizer states.
    ``select_rows``: the model holds only some table rows (one rank of several); it maps the whole
    tables and their optimizer state (:func:`read_table_state`) to those rows. The checkpoint may
    have been saved on any number of processes.
    """
    meta = read_config(run_dir)
    if model.cfg.to_dict() != meta.model_config.to_dict():
        diff = _dict_diff(meta.model_config.to_dict(), model.cfg.to_dict())
        raise CheckpointError(f"{meta.run_dir / CONFIG_FILE}: the model config differs from the "
                              f"checkpoint's ({diff}); resume with the recorded config or use a new run dir")
    check_hash_fingerprint(model, meta)
    tables = read_table_state(meta) if meta.sharded or select_rows is not None else None
    if select_rows is not None:
        tables = select_rows(tables)
    _load_weights(model, meta, tables)
    state = _read_trainer_state(meta)
    return state, meta, _read_optimizer_tensors(meta, tables)


def _read_trainer_state(meta: CheckpointMeta) -> dict[str, Any]:
    path = meta.path(STATE_FILE)
    if STATE_FILE not in meta.files:
        raise CheckpointError(f"{meta.run_dir} holds weights only (no {STATE_FILE}); it cannot be "
                              f"resumed, start a new run from it instead")
    _verify_file(path, meta.files)
    state = _read_json(path)
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{path}: expected an object with an integer 'step'; re-save the checkpoint")
    return state


def _read_optimizer_tensors(meta: CheckpointMeta, tables: Optional[dict[str, torch.Tensor]]
                            ) -> Optional[dict[str, torch.Tensor]]:
    if OPTIMIZER_FILE not in meta.files:
        return None
    tensors = _load_safetensors(meta.path(OPTIMIZER_FILE), meta.files)
    if tables is not None:  # the table optimizer's state goes with the rows it belongs to
        prefix = TABLE_OPTIMIZER + "."
        tensors = {k: v for k, v in tensors.items() if not k.startswith(prefix)}
        tensors.update({k: v for k, v in tables.items() if k.startswith(prefix)})
    return tensors


def _dict_diff(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> str:
    keys = sorted(k for k in set(recorded) | set(current) if recorded.get(k) != current.get(k))
    return ", ".join(f"{k}: recorded {recorded.get(k)!r}, given {current.get(k)!r}" for k in keys[:6])


# ----------------------------------------------------------------------------- row shards
def read_table_state(meta: CheckpointMeta) -> dict[str, torch.Tensor]:
    """The whole table weights and the table optimizer's state of a checkpoint (either layout):
    ``{key: tensor}`` with the model's table keys and ``tables.state.<i>.<name>`` keys."""
    if meta.sharded:
        n_src = int(meta.sharded["world_size"])
        return gather_table_shards([_load_safetensors(meta.path(shard_file(s, n_src)), meta.files)
                                    for s in range(n_src)])
    src = {k: v for k, v in _load_safetensors(meta.path(MODEL_FILE), meta.files).items()
           if k.endswith(TABLE_KEY_SUFFIX)}
    if OPTIMIZER_FILE in meta.files:
        src.update({k: v for k, v in _load_safetensors(meta.path(OPTIMIZER_FILE), meta.files).items()
                    if k.startswith(TABLE_OPTIMIZER + ".")})
    return src  # a one-process checkpoint is a single shard


def gather_table_shards(sources: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The whole tables from the table files of a checkpoint saved on ``len(sources)`` ranks.

    This is the inverse of the row-sharding rule (:mod:`engram.distributed.sharding`), kept here
    because every one-process reader of a sharded checkpoint needs it: shard ``s`` of ``N`` holds
    global rows ``s::N`` of the tables and of dense Adam's moments; row-sparse Adam's state is
    stored under global row ids (``rows``), so it is concatenated.
    """
    n_src = len(sources)
    keys = list(sources[0])
    for s, src in enumerate(sources[1:], 1):
        if set(src) != set(keys):
            raise CheckpointError(f"shard {s} of {n_src} holds tensors {sorted(set(src) ^ set(keys))[:4]} "
                                  f"that shard 0 does not (or the reverse); the shards come from different saves")
    sparse = {k[:-len("rows")] for k in keys if k.startswith(TABLE_OPTIMIZER + ".") and k.endswith(".rows")}
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        first = sources[0][key]
        if key[:key.rfind(".") + 1] in sparse:
            out[key] = torch.cat([src[key] for src in sources])
        elif first.dim() == 0:
            out[key] = first  # a scalar shared by all rows (dense Adam's step)
        else:
            out[key] = whole = first.new_zeros(sum(src[key].shape[0] for src in sources), *first.shape[1:])
            for s, src in enumerate(sources):
                whole[s::n_src] = src[key]
    return out
