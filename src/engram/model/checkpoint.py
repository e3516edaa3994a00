"""Checkpoints without pickle: safetensors for tensors, JSON for everything else.

A run directory holds one checkpoint (the latest)::

    RUN/config.json            model + train configs, hash and tokenizer fingerprints, format
                               version, and a manifest (size + sha256) of the files below
    RUN/model.safetensors      the model state dict (a tied ``lm_head.weight`` is stored once)
    RUN/optimizer.safetensors  optimizer state tensors, keys ``{optimizer}.state.{idx}.{name}``
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
loader here reads both layouts, and re-splits the rows for any number of ranks
(:func:`read_table_state`): a checkpoint saved on N ranks loads on M.

Loading validates before it trusts: config keys (unknown keys are errors), the recorded hash
fingerprint against the hasher rebuilt from the config and ``compression.npy`` (tables indexed by
another hash are garbage), file sizes and checksums, and missing / unexpected / misshapen
tensors. Every problem is a :class:`CheckpointError` naming the file and the fix.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

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

Optimizers = Union[torch.optim.Optimizer, Mapping[str, torch.optim.Optimizer], None]

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
_DEFAULT_OPTIMIZER = "optimizer"  # name used when a single optimizer (not a dict) is passed
TABLE_OPTIMIZER = "tables"  # the trainer's optimizer of the tables (state sharded with the rows)
ROOT_FILES = (COMPRESSION_FILE, TOKENIZER_FILE)  # at the run root in both layouts
SHARD_DIR_PREFIX = "shards-"  # RUN/shards-<step>-<tag>/: the files of a sharded checkpoint


def shard_rows(num_rows: int, rank: int, world: int) -> int:
    """How many rows of a ``num_rows`` table rank ``rank`` of ``world`` owns (rows ``rank::world``)."""
    return (num_rows - rank + world - 1) // world


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


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"))


# ----------------------------------------------------------------------------- RNG state
def capture_rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU and CUDA) RNG states as plain JSON."""
    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": _b64(torch.get_rng_state().numpy().tobytes()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s.numpy().tobytes()) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state` (missing entries are left alone)."""
    try:
        if "python" in state:
            version, internal, gauss = state["python"]
            random.setstate((version, tuple(internal), gauss))
        if "numpy" in state:
            name, keys, pos, has_gauss, gauss_val = state["numpy"]
            np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss_val))
        if "torch" in state:
            raw = np.frombuffer(_unb64(state["torch"]), dtype=np.uint8).copy()
            torch.set_rng_state(torch.from_numpy(raw))
        if "cuda" in state and torch.cuda.is_available():
            cuda = [torch.from_numpy(np.frombuffer(_unb64(s), dtype=np.uint8).copy()) for s in state["cuda"]]
            if len(cuda) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(cuda)
    except (TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{STATE_FILE}: the saved RNG state is malformed ({e}); re-save the "
                              f"checkpoint or delete the 'rng' entry to resume without it") from e


# ----------------------------------------------------------------------------- optimizer state
def _as_optimizer_dict(optimizer: Optimizers) -> dict[str, torch.optim.Optimizer]:
    if optimizer is None:
        return {}
    if isinstance(optimizer, torch.optim.Optimizer):
        return {_DEFAULT_OPTIMIZER: optimizer}
    out = dict(optimizer)
    bad = [k for k in out if not k or "." in k]
    if bad:
        raise CheckpointError(f"optimizer names {bad} are invalid; use non-empty names without '.'")
    return out


def flatten_optimizers(optimizers: Mapping[str, torch.optim.Optimizer]
                       ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state dicts -> (tensors for safetensors, JSON for scalars and param groups)."""
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {}
    for name, opt in optimizers.items():
        sd = opt.state_dict()
        scalars: dict[str, dict[str, Any]] = {}
        for idx, entry in sd["state"].items():
            plain: dict[str, Any] = {}
            for key, value in entry.items():
                if isinstance(value, torch.Tensor):
                    # clone: safetensors refuses tensors that share storage with anything else
                    tensors[f"{name}.state.{idx}.{key}"] = value.detach().cpu().contiguous().clone()
                else:
                    plain[key] = value
            scalars[str(idx)] = plain
        meta[name] = {"state": scalars, "param_groups": sd["param_groups"]}
    return tensors, meta


def unflatten_optimizers(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any],
                         source: str) -> dict[str, dict[str, Any]]:
    """Inverse of :func:`flatten_optimizers`: {name: torch optimizer state_dict}."""
    out: dict[str, dict[str, Any]] = {}
    for name, m in meta.items():
        try:
            state = {int(idx): dict(plain) for idx, plain in m["state"].items()}
            # JSON turned tuples (betas) into lists; torch builds them as tuples
            groups = [{k: (tuple(v) if isinstance(v, list) and k != "params" else v) for k, v in g.items()}
                      for g in m["param_groups"]]
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CheckpointError(f"{source}: optimizer {name!r} entry is malformed ({e}); "
                                  f"re-save the checkpoint") from e
        out[name] = {"state": state, "param_groups": groups}
    for key, value in tensors.items():
        parts = key.split(".", 3)
        if len(parts) != 4 or parts[1] != "state" or parts[0] not in out or not parts[2].isdigit():
            raise CheckpointError(f"{source}: unexpected tensor {key!r}; expected keys like "
                                  f"'<optimizer>.state.<param index>.<name>' for optimizers "
                                  f"{sorted(out)}")
        out[parts[0]]["state"].setdefault(int(parts[2]), {})[parts[3]] = value
    return out


def _check_state_shapes(name: str, opt: torch.optim.Optimizer, sd: Mapping[str, Any], source: str) -> None:
    """torch does not check moment shapes on load; a mismatch would only fail at the next step."""
    if getattr(opt, "row_sparse_state", False):
        return  # state covers touched rows only ([n, Dh]); SparseRowAdam.load_state_dict checks it
    params = [p for g in opt.param_groups for p in g["params"]]
    saved_ids = [i for g in sd["param_groups"] for i in g.get("params", [])]
    index = dict(zip(saved_ids, params))
    for idx, entry in sd["state"].items():
        p = index.get(idx)
        if p is None:
            raise CheckpointError(f"{source}: optimizer {name!r} has state for parameter index {idx} "
                                  f"which none of its param groups lists; re-save the checkpoint")
        for key, t in entry.items():
            if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape != p.shape:
                raise CheckpointError(
                    f"{source}: optimizer {name!r} state {idx}.{key} has shape {tuple(t.shape)} but "
                    f"the parameter has {tuple(p.shape)}; the checkpoint belongs to another model")


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


def save_checkpoint(run_dir: PathLike, model: EngramLM, optimizer: Optimizers,
                    trainer_state: Optional[Mapping[str, Any]], train_cfg: Optional[TrainConfig],
                    tokenizer_path: Optional[PathLike] = None, *,
                    tokenizer_fingerprint: Optional[str] = None) -> Path:
    """Write a checkpoint into ``run_dir`` atomically (see the module docstring); returns run_dir.

    ``optimizer`` is one optimizer, a ``{name: optimizer}`` dict, or None (weights only).
    ``trainer_state`` is plain JSON (step, best val loss, ...); the RNG states are added under
    ``"rng"`` unless already present. Files of a previous checkpoint that this one lacks
    (optimizer, trainer state, compression) are removed after the commit. Without
    ``optimizer`` and ``trainer_state`` it is a weights-only export that cannot be resumed.
    """
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    stage = run / f".tmp-{os.getpid()}"
    if stage.exists():
        shutil.rmtree(stage)  # left by an earlier crash of this same pid
    stage.mkdir()
    try:
        written = _stage_files(stage, model, _as_optimizer_dict(optimizer), trainer_state,
                               tokenizer_path)
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


def _stage_files(stage: Path, model: EngramLM, optimizers: dict[str, torch.optim.Optimizer],
                 trainer_state: Optional[Mapping[str, Any]],
                 tokenizer_path: Optional[PathLike]) -> list[str]:
    """Write every checkpoint file except config.json into ``stage``; returns their names."""
    written = []
    tensors, tied = model_tensors(model)
    save_file(tensors, str(stage / MODEL_FILE), metadata={"format": FORMAT_NAME, "tied": json.dumps(tied)})
    _fsync_file(stage / MODEL_FILE)
    written.append(MODEL_FILE)

    if trainer_state is None and not optimizers:
        written += _stage_extras(stage, model, tokenizer_path)
        return written  # a weights-only export: nothing to resume from
    state = dict(trainer_state or {})
    if optimizers:
        opt_tensors, opt_meta = flatten_optimizers(optimizers)
        save_file(opt_tensors, str(stage / OPTIMIZER_FILE), metadata={"format": FORMAT_NAME})
        _fsync_file(stage / OPTIMIZER_FILE)
        written.append(OPTIMIZER_FILE)
        state["optimizers"] = opt_meta
    state.setdefault("rng", capture_rng_state())
    _write_json(stage / STATE_FILE, state, indent=None)  # RNG and param index lists: keep it compact
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
            step = None  # reported properly by load_for_resume
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


def load_for_resume(run_dir: PathLike, model: EngramLM, optimizer: Optimizers,
                    restore_rng: bool = True, part: tuple[int, int] = (0, 1)
                    ) -> tuple[dict[str, Any], CheckpointMeta]:
    """Load weights, optimizer state and trainer state into existing objects for exact resume.

    ``model`` must have been built from the same config and compression (checked via the hash
    fingerprint and the tensor shapes). ``part=(r, W)``: the model holds only table rows
    ``r::W`` (rank r of W processes, ``engram.distributed``); the checkpoint may have been saved
    on any number of processes. Returns (trainer_state without optimizer scalars, meta).
    """
    meta = read_config(run_dir)
    if model.cfg.to_dict() != meta.model_config.to_dict():
        diff = _dict_diff(meta.model_config.to_dict(), model.cfg.to_dict())
        raise CheckpointError(f"{meta.run_dir / CONFIG_FILE}: the model config differs from the "
                              f"checkpoint's ({diff}); resume with the recorded config or use a new run dir")
    check_hash_fingerprint(model, meta)
    tables = read_table_state(meta, *part) if meta.sharded or tuple(part) != (0, 1) else None
    _load_weights(model, meta, tables)
    state = _read_trainer_state(meta)
    _load_optimizers(meta, _as_optimizer_dict(optimizer), state.pop("optimizers", {}), tables)
    if restore_rng and "rng" in state:
        restore_rng_state(state["rng"])
    return state, meta


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


def _load_optimizers(meta: CheckpointMeta, optimizers: dict[str, torch.optim.Optimizer],
                     opt_meta: Mapping[str, Any], tables: Optional[dict[str, torch.Tensor]] = None) -> None:
    if not optimizers:
        return
    path = meta.path(OPTIMIZER_FILE)
    if OPTIMIZER_FILE not in meta.files:
        raise CheckpointError(f"{meta.run_dir} has no {OPTIMIZER_FILE}; it was saved without "
                              f"optimizer state and cannot be resumed exactly")
    tensors = _load_safetensors(path, meta.files)
    if tables is not None:  # the table optimizer's state goes with the rows it belongs to
        prefix = TABLE_OPTIMIZER + "."
        tensors = {k: v for k, v in tensors.items() if not k.startswith(prefix)}
        tensors.update({k: v for k, v in tables.items() if k.startswith(prefix)})
    state_dicts = unflatten_optimizers(tensors, opt_meta, str(path))
    if set(state_dicts) != set(optimizers):
        raise CheckpointError(f"{path} holds optimizers {sorted(state_dicts)} but the trainer has "
                              f"{sorted(optimizers)}; the checkpoint comes from another training setup")
    for name, opt in optimizers.items():
        sd = state_dicts[name]
        _check_state_shapes(name, opt, sd, str(path))
        try:
            opt.load_state_dict(sd)
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"{path}: optimizer {name!r} state does not fit ({e}); the "
                                  f"checkpoint comes from another model or parameter grouping") from e


def _dict_diff(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> str:
    keys = sorted(k for k in set(recorded) | set(current) if recorded.get(k) != current.get(k))
    return ", ".join(f"{k}: recorded {recorded.get(k)!r}, given {current.get(k)!r}" for k in keys[:6])


# ----------------------------------------------------------------------------- row shards
def read_table_state(meta: CheckpointMeta, rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
    """The table weights and the table optimizer's state of a checkpoint (either layout), as the
    rows ``rank::world`` that rank ``rank`` of ``world`` owns: ``{key: tensor}`` with the model's
    table keys and ``tables.state.<i>.<name>`` keys. ``world=1`` gives the whole tables.

    Row-sharded tensors are the tables and dense Adam's moments (rows ``s::N`` in shard ``s``);
    row-sparse Adam's state is stored with *global* row ids (``rows``) and is returned with the
    ids local to ``rank`` (``g // world``). One source shard is in memory at a time.
    """
    if meta.sharded:
        n_src = int(meta.sharded["world_size"])
        sources = [_load_safetensors(meta.path(shard_file(s, n_src)), meta.files) for s in range(n_src)]
    else:  # a one-process checkpoint is a single shard
        n_src = 1
        src = {k: v for k, v in _load_safetensors(meta.path(MODEL_FILE), meta.files).items()
               if k.endswith(TABLE_KEY_SUFFIX)}
        if OPTIMIZER_FILE in meta.files:
            src.update({k: v for k, v in _load_safetensors(meta.path(OPTIMIZER_FILE), meta.files).items()
                        if k.startswith(TABLE_OPTIMIZER + ".")})
        sources = [src]
    return reshard(sources, rank, world)


def reshard(sources: list[dict[str, torch.Tensor]], rank: int, world: int) -> dict[str, torch.Tensor]:
    """Rows of rank ``rank`` of ``world`` from the shards of ``len(sources)`` ranks (see
    :func:`read_table_state`)."""
    n_src = len(sources)
    keys = list(sources[0])
    for s, src in enumerate(sources[1:], 1):
        if set(src) != set(keys):
            raise CheckpointError(f"shard {s} of {n_src} holds tensors {sorted(set(src) ^ set(keys))[:4]} "
                                  f"that shard 0 does not (or the reverse); the shards come from different saves")
    sparse_prefixes = {k[:-len("rows")] for k in keys if k.startswith(TABLE_OPTIMIZER + ".") and k.endswith(".rows")}
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        prefix = key[:key.rfind(".") + 1]
        if prefix in sparse_prefixes:
            if not key.endswith(".rows"):
                continue  # handled with its rows below
            rows = [src[key] for src in sources]
            keep = [r % world == rank for r in rows]
            out[key] = torch.cat([r[m] // world for r, m in zip(rows, keep)])
            for name in ("exp_avg", "exp_avg_sq", "steps"):
                out[prefix + name] = torch.cat([src[prefix + name][m] for src, m in zip(sources, keep)])
        elif sources[0][key].dim() == 0:
            out[key] = sources[0][key]  # a scalar shared by all rows (dense Adam's step)
        else:  # row-sharded: shard s holds global rows s::n_src
            total = sum(src[key].shape[0] for src in sources)
            first = sources[0][key]
            local = first.new_zeros(shard_rows(total, rank, world), *first.shape[1:])
            for s, src in enumerate(sources):
                g = s + n_src * torch.arange(src[key].shape[0])
                m = g % world == rank
                local[g[m] // world] = src[key][m]
            out[key] = local
    return out
