"""What a resumable checkpoint holds besides the weights: optimizer states and RNG states.

:mod:`engram.model.checkpoint` writes and reads the files (``optimizer.safetensors`` as a flat
group of named tensors, ``trainer_state.json`` as plain JSON) without knowing what they hold.
This module decides that: :func:`flatten_optimizers` turns torch optimizer state dicts into
tensors ``{optimizer}.state.{param index}.{name}`` plus JSON for the scalars and param groups
(stored under ``"optimizers"`` in the trainer state), and :func:`capture_rng_state` the Python,
numpy and torch RNGs into JSON (``"rng"``). :func:`save_training_checkpoint` and
:func:`load_for_resume` are what the training loop (and the sharded save) call.
"""

from __future__ import annotations

import base64
import random
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

import numpy as np
import torch

from engram.config import TrainConfig
from engram.fsutil import PathLike
from engram.model import checkpoint as ckpt
from engram.model.checkpoint import CheckpointError, CheckpointMeta
from engram.model.lm import EngramLM

Optimizers = Union[torch.optim.Optimizer, Mapping[str, torch.optim.Optimizer], None]
_DEFAULT_OPTIMIZER = "optimizer"  # name used when a single optimizer (not a dict) is passed


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
        raise CheckpointError(f"{ckpt.STATE_FILE}: the saved RNG state is malformed ({e}); re-save the "
                              f"checkpoint or delete the 'rng' entry to resume without it") from e


# ----------------------------------------------------------------------------- optimizer state
def as_optimizer_dict(optimizer: Optimizers) -> dict[str, torch.optim.Optimizer]:
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


# ----------------------------------------------------------------------------- save and resume
def save_training_checkpoint(run_dir: PathLike, model: EngramLM, optimizer: Optimizers,
                             trainer_state: Mapping[str, Any], train_cfg: Optional[TrainConfig],
                             tokenizer_path: Optional[PathLike] = None, *,
                             tokenizer_fingerprint: Optional[str] = None) -> Path:
    """A resumable checkpoint: the weights, ``optimizer``'s state (one optimizer, a ``{name:
    optimizer}`` dict, or None) and ``trainer_state`` (plain JSON: step, best val loss, ...) with
    the RNG states added under ``"rng"`` unless already present."""
    state = dict(trainer_state)
    tensors = None
    optimizers = as_optimizer_dict(optimizer)
    if optimizers:
        tensors, state["optimizers"] = flatten_optimizers(optimizers)
    state.setdefault("rng", capture_rng_state())
    return ckpt.save_checkpoint(run_dir, model, tensors, state, train_cfg, tokenizer_path,
                                tokenizer_fingerprint=tokenizer_fingerprint)


def load_for_resume(run_dir: PathLike, model: EngramLM, optimizer: Optimizers, restore_rng: bool = True,
                    select_rows: Optional[Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]] = None
                    ) -> tuple[dict[str, Any], CheckpointMeta]:
    """Load weights, optimizer state and trainer state into existing objects for exact resume.

    ``model`` must have been built from the same config and compression. ``select_rows``: the
    model holds only some table rows (a rank of several, :mod:`engram.distributed`); see
    :func:`engram.model.checkpoint.read_resume_state`. Returns (trainer_state without optimizer
    scalars, meta).
    """
    state, meta, tensors = ckpt.read_resume_state(run_dir, model, select_rows)
    optimizers = as_optimizer_dict(optimizer)
    opt_meta = state.pop("optimizers", {})
    if optimizers:
        source = str(meta.path(ckpt.OPTIMIZER_FILE))
        if tensors is None:
            raise CheckpointError(f"{meta.run_dir} has no {ckpt.OPTIMIZER_FILE}; it was saved without "
                                  f"optimizer state and cannot be resumed exactly")
        load_optimizers(optimizers, tensors, opt_meta, source)
    if restore_rng and "rng" in state:
        restore_rng_state(state["rng"])
    return state, meta


def load_optimizers(optimizers: Mapping[str, torch.optim.Optimizer], tensors: Mapping[str, torch.Tensor],
                    opt_meta: Mapping[str, Any], source: str) -> None:
    """Load the flattened states (:func:`flatten_optimizers`) into ``optimizers``, checked."""
    state_dicts = unflatten_optimizers(tensors, opt_meta, source)
    if set(state_dicts) != set(optimizers):
        raise CheckpointError(f"{source} holds optimizers {sorted(state_dicts)} but the trainer has "
                              f"{sorted(optimizers)}; the checkpoint comes from another training setup")
    for name, opt in optimizers.items():
        sd = state_dicts[name]
        _check_state_shapes(name, opt, sd, source)
        try:
            opt.load_state_dict(sd)
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"{source}: optimizer {name!r} state does not fit ({e}); the "
                                  f"checkpoint comes from another model or parameter grouping") from e
