"""Where and in what precision a model runs: the device, bf16 autocast, compiled backbone blocks.

- ``resolve_device("cpu" | "cuda" | "cuda:N")``: a ``torch.device``, or one ``DeviceError`` line
  when CUDA is asked for and this torch build or machine has none.
- ``autocast(precision, device)``: a context for forward passes. ``fp32`` changes nothing;
  ``bf16`` is ``torch.autocast`` in bfloat16: matmuls and linear layers compute in bf16 while
  the parameters (the master weights), the Engram tables, gradients and optimizer moments stay
  float32, so the optimizer is the same code in both precisions.
- ``compile_backbone(model)``: ``torch.compile`` of the attention and dense FFN of every block
  of an ``EngramLM`` (``Block.attention_step`` / ``ffn_step``), or of every decoder layer's
  ``forward`` of a retrofitted base. A DeepSeekMoE FFN stays eager: its dispatch reads expert
  counts back to Python (a graph break, and new shapes every step). The Engram layer stays eager: hashing runs in numpy / a C kernel, the table
  gather reads rows through ``EngramTable`` whatever tier holds them (a file, a cache, another
  rank), and the retrofit adds Engram in a forward pre-hook, which runs outside the compiled
  ``forward``. Compiled and eager agree to float rounding (tests/model/test_accel.py states the
  tolerances). ``uncompile_backbone`` restores the eager functions.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterator, Union

import torch
import torch.nn as nn

from engram.config import Precision
from engram.errors import EngramError


class DeviceError(EngramError):
    """A device or precision that this machine or torch build cannot run; the message says what to use."""


def resolve_device(name: Union[str, torch.device]) -> torch.device:
    """``"cpu"``, ``"cuda"`` or ``"cuda:N"`` as a device this process can use; anything else, or CUDA
    on a machine without it, is a one-line ``DeviceError``."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise DeviceError(f"--device {name!r}: not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise DeviceError(f"--device {name!r}: engram runs on cpu or cuda; use one of them")
    if not torch.cuda.is_available():
        build = torch.__version__
        why = (f"this torch build ({build}) has no CUDA support" if torch.version.cuda is None
               else f"no CUDA device is visible to torch {build}")
        raise DeviceError(f"--device {name}: {why}; use --device cpu, or install a CUDA build of torch "
                          f"(ENGRAM_TORCH, README set-up) on a machine with a GPU")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise DeviceError(f"--device {name}: only {count} CUDA device(s) are visible (cuda:0..cuda:{count - 1})")
    return torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())


def autocast(precision: Union[str, Precision], device: Union[str, torch.device]) -> contextlib.AbstractContextManager:
    """The context forward passes run in for ``precision`` on ``device`` (nothing for fp32)."""
    precision = Precision.parse(precision, "dtype", error=DeviceError)
    if precision == Precision.FP32:
        return contextlib.nullcontext()
    if torch.device(device).type == "cpu":
        warn_if_cpu_bf16_is_slow("--dtype bf16")
    return _bf16(torch.device(device).type)


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU runs bfloat16 matmuls in hardware (on x86: AVX-512 or AMX, what oneDNN's
    bfloat16 kernels need). Without it torch emulates them, several times slower than float32."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        if check is not None:
            return bool(check())
    except RuntimeError:
        pass
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def warn_if_cpu_bf16_is_slow(flag: str) -> None:
    """One warning (per call site) that ``flag`` asks for bfloat16 on a CPU that emulates it."""
    if not cpu_has_fast_bf16():
        warnings.warn(f"{flag}: this CPU ({torch.backends.cpu.get_cpu_capability()}, no AVX-512 or AMX) emulates "
                      f"bfloat16, several times slower than float32; leave {flag} out on this machine",
                      RuntimeWarning, stacklevel=3)


@contextlib.contextmanager
def _bf16(device_type: str) -> Iterator[None]:
    with warnings.catch_warnings():
        # RMSNorm of a bf16 activation with its float32 weight takes torch's unfused path; the
        # numbers are right, and the warning would repeat for every norm.
        warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight")
        with torch.autocast(device_type, dtype=torch.bfloat16):
            yield


def _retrofit_layers(model: nn.Module) -> Any:
    """The decoder layers of a retrofitted model's base (``model.base.model.layers``), else None."""
    base = getattr(model, "base", None)
    layers = getattr(getattr(base, "model", None), "layers", None) if isinstance(base, nn.Module) else None
    return layers if isinstance(layers, nn.ModuleList) else None


_EAGER_FORWARD = "_engram_eager_forward"  # attribute of a retrofit decoder layer compiled in place


def compile_backbone(model: nn.Module, **compile_kwargs: Any) -> int:
    """Compile the backbone of ``model`` in place; returns how many modules were compiled.

    An ``EngramLM``: each block's attention step and, unless it is a DeepSeekMoE, its FFN step. A retrofitted model (a base
    with ``model.layers``): each decoder layer's ``forward``, so its Engram pre-hook stays eager.
    ``compile_kwargs`` go to ``torch.compile`` (e.g. ``backend="eager"`` in tests)."""
    layers = _retrofit_layers(model)
    if layers is not None:
        n = 0
        for layer in layers:
            if _EAGER_FORWARD not in layer.__dict__:
                setattr(layer, _EAGER_FORWARD, layer.forward)
                layer.forward = torch.compile(layer.forward, **compile_kwargs)
                n += 1
        return n
    blocks = getattr(model, "layers", None)
    if blocks is None or not all(hasattr(b, "attention_step") for b in blocks):
        raise EngramError(f"compile_backbone: {type(model).__name__} is neither an EngramLM nor a "
                          f"retrofitted model; compile it with torch.compile directly")
    n = 0
    for b in blocks:
        b.compiled_attention = torch.compile(b.attention_step, **compile_kwargs)
        n += 1
        if not _data_dependent(b.ffn):
            b.compiled_ffn = torch.compile(b.ffn_step, **compile_kwargs)
            n += 1
    return n


def _data_dependent(ffn: nn.Module) -> bool:
    """A DeepSeekMoE routes tokens to experts by counts read back to Python: each step would
    break the graph and recompile for new shapes, so it runs eager."""
    return hasattr(ffn, "experts")


def uncompile_backbone(model: nn.Module) -> None:
    """Undo ``compile_backbone``: the eager functions run again."""
    layers = _retrofit_layers(model)
    if layers is not None:
        for layer in layers:
            if _EAGER_FORWARD in layer.__dict__:
                del layer.forward  # the class's own forward again
                delattr(layer, _EAGER_FORWARD)
        return
    for b in getattr(model, "layers", ()):
        if hasattr(b, "compiled_attention"):
            b.compiled_attention = b.compiled_ffn = None
