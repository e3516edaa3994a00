"""Typed configuration for Engram models.

Three small dataclasses, each validated in ``__post_init__``:

- ``EngramConfig``: everything about the conditional memory (hashing and the layer).
- ``ModelConfig``: the transformer backbone, holding an optional ``EngramConfig``.
- ``TrainConfig``: the optimisation recipe.

Every config round-trips through plain dicts (``to_dict`` / ``from_dict``); ``from_dict``
refuses unknown keys so that a typo in a JSON file is an error, not a silent default.
Named presets live at the bottom (``PRESETS``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from engram.errors import ConfigError


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _from_dict(cls, data: dict[str, Any], where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"{where}: unknown config key(s) {unknown}; known keys are {sorted(known)}"
        )
    return cls(**data)


@dataclass
class EngramConfig:
    """Conditional memory: multi-head N-gram hashing plus the gated Engram layer.

    Names follow the paper and DeepSeek's reference demo. ``engram_vocab_size[i]`` is the
    target table size for N-gram order ``n = i + 2``; each head gets the next unused prime
    above it, so every head of every layer has a distinct prime size.
    """

    engram_vocab_size: tuple[int, ...] = (646400, 646400)
    max_ngram_size: int = 3
    n_embed_per_ngram: int = 512  # summed over the heads of one order
    n_head_per_ngram: int = 8
    layer_ids: tuple[int, ...] = (1, 15)
    pad_id: int = 2  # id in the *original* tokenizer; mapped through the compression
    seed: int = 0
    kernel_size: int = 4
    use_short_conv: bool = True
    conv_zero_init: bool = True  # the paper zero-initialises the conv so Engram starts as identity
    use_compression: bool = True
    use_gate: bool = True  # ablation: False uses gate = 1
    conv_norm_eps: float = 1e-5
    # DeepSeek's demo keeps nn.Embedding's N(0, 1). At small scale that swamps the residual
    # stream (250-step run, engram-moe preset: val loss 4.74 with std 1.0 vs 4.48 with 0.02),
    # so tables start at the backbone's scale. Set 1.0 to reproduce the demo's init.
    table_init_std: float = 0.02

    def __post_init__(self) -> None:
        self.engram_vocab_size = tuple(int(v) for v in self.engram_vocab_size)
        self.layer_ids = tuple(int(v) for v in self.layer_ids)
        _check(
            self.max_ngram_size >= 2,
            f"max_ngram_size={self.max_ngram_size} must be >= 2 (orders run 2..max_ngram_size)",
        )
        _check(
            len(self.engram_vocab_size) == self.max_ngram_size - 1,
            f"engram_vocab_size has {len(self.engram_vocab_size)} entries but max_ngram_size="
            f"{self.max_ngram_size} needs {self.max_ngram_size - 1} (one per order 2..{self.max_ngram_size})",
        )
        _check(
            all(v >= 2 for v in self.engram_vocab_size),
            f"engram_vocab_size={list(self.engram_vocab_size)}: every table size must be >= 2",
        )
        _check(self.n_head_per_ngram >= 1, f"n_head_per_ngram={self.n_head_per_ngram} must be >= 1")
        _check(
            self.n_embed_per_ngram % self.n_head_per_ngram == 0,
            f"n_embed_per_ngram={self.n_embed_per_ngram} must be divisible by "
            f"n_head_per_ngram={self.n_head_per_ngram}",
        )
        _check(len(self.layer_ids) >= 1, "layer_ids is empty; give at least one layer index")
        _check(
            len(set(self.layer_ids)) == len(self.layer_ids) and all(i >= 0 for i in self.layer_ids),
            f"layer_ids={list(self.layer_ids)} must be distinct non-negative layer indices",
        )
        _check(self.kernel_size >= 1, f"kernel_size={self.kernel_size} must be >= 1")
        _check(self.seed >= 0, f"seed={self.seed} must be >= 0")
        _check(self.table_init_std > 0, f"table_init_std={self.table_init_std} must be > 0")

    @property
    def head_dim(self) -> int:
        """Width of one head's embedding row."""
        return self.n_embed_per_ngram // self.n_head_per_ngram

    @property
    def num_heads_total(self) -> int:
        """Hash heads per layer: (max_ngram_size - 1) orders x n_head_per_ngram."""
        return (self.max_ngram_size - 1) * self.n_head_per_ngram

    @property
    def engram_hidden_size(self) -> int:
        """Width of the concatenated memory vector e_t."""
        return (self.max_ngram_size - 1) * self.n_embed_per_ngram

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["engram_vocab_size"] = list(self.engram_vocab_size)
        d["layer_ids"] = list(self.layer_ids)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EngramConfig":
        return _from_dict(cls, data, "EngramConfig")


INPUT_NGRAM_KINDS = ("bigram", "overencoding")


class InputNgramError(ConfigError):
    """An input N-gram baseline setting is invalid; the message names the value and the fix."""


@dataclass
class InputNgramConfig:
    """Hashed N-gram embeddings added to (``bigram``) or averaged into (``overencoding``) the input."""

    kind: str = "bigram"
    table_size: int = 8192  # rows per order (rounded up to a prime)
    max_ngram_size: int = 2  # bigram: must be 2; overencoding: orders 2..max_ngram_size
    pad_id: int = 0
    seed: int = 0
    init_std: float = 0.02
    # bigram only: modded-nanogpt starts the bigram table at zero so the model starts as the
    # plain backbone; averaging (overencoding) needs non-zero rows or it just shrinks the input.
    zero_init: bool = True

    def __post_init__(self) -> None:
        if self.kind not in INPUT_NGRAM_KINDS:
            raise InputNgramError(f"input_ngram.kind={self.kind!r}; choose one of {list(INPUT_NGRAM_KINDS)}")
        if self.table_size < 2:
            raise InputNgramError(f"input_ngram.table_size={self.table_size} must be >= 2")
        if self.max_ngram_size < 2:
            raise InputNgramError(f"input_ngram.max_ngram_size={self.max_ngram_size} must be >= 2")
        if self.kind == "bigram" and self.max_ngram_size != 2:
            raise InputNgramError(f"input_ngram.max_ngram_size={self.max_ngram_size} with kind='bigram'; "
                                  f"use 2, or kind='overencoding' for longer N-grams")
        if self.init_std <= 0:
            raise InputNgramError(f"input_ngram.init_std={self.init_std} must be > 0")

    @property
    def orders(self) -> tuple[int, ...]:
        return tuple(range(2, self.max_ngram_size + 1))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "InputNgramConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputNgramError(f"InputNgramConfig: unknown key(s) {unknown}; known keys are {sorted(known)}")
        return cls(**data)


@dataclass
class ModelConfig:
    """Decoder-only transformer backbone (RMSNorm, RoPE attention, SwiGLU or DeepSeekMoE)."""

    vocab_size: int = 4096
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    ffn: str = "dense"  # "dense" (SwiGLU) or "moe" (DeepSeekMoE)
    intermediate_size: int = 688  # dense SwiGLU width
    # DeepSeekMoE: shared experts always run, routed experts are picked top-k per token.
    n_shared_experts: int = 1
    n_routed_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 128
    first_k_dense: int = 0  # the first k layers keep a dense FFN (DeepSeek-V3 style)
    bias_update_speed: float = 1e-3  # auxiliary-loss-free balancing step (gamma)
    routed_scaling_factor: float = 1.0
    hc_mult: int = 1  # hyper-connection branches; 1 = a plain residual stream
    tie_embeddings: bool = True
    init_std: float = 0.02
    engram: Optional[EngramConfig] = None
    # Input-side N-gram baseline (bigram hash / OverEncoding); engram.model.input_ngram.
    input_ngram: Optional[InputNgramConfig] = None

    def __post_init__(self) -> None:
        if isinstance(self.engram, dict):
            self.engram = EngramConfig.from_dict(self.engram)
        if isinstance(self.input_ngram, dict):
            self.input_ngram = InputNgramConfig.from_dict(self.input_ngram)
        _check(self.vocab_size >= 2, f"vocab_size={self.vocab_size} must be >= 2")
        _check(self.num_layers >= 1, f"num_layers={self.num_layers} must be >= 1")
        _check(
            self.hidden_size % self.num_heads == 0,
            f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}",
        )
        _check(
            (self.hidden_size // self.num_heads) % 2 == 0,
            f"head dim {self.hidden_size // self.num_heads} must be even for RoPE; "
            f"change hidden_size={self.hidden_size} or num_heads={self.num_heads}",
        )
        _check(self.ffn in ("dense", "moe"), f"ffn={self.ffn!r} must be 'dense' or 'moe'")
        _check(self.max_seq_len >= 1, f"max_seq_len={self.max_seq_len} must be >= 1")
        _check(self.hc_mult >= 1, f"hc_mult={self.hc_mult} must be >= 1")
        if self.ffn == "moe":
            _check(self.n_routed_experts >= 1, f"n_routed_experts={self.n_routed_experts} must be >= 1")
            _check(
                1 <= self.num_experts_per_tok <= self.n_routed_experts,
                f"num_experts_per_tok={self.num_experts_per_tok} must be in "
                f"[1, n_routed_experts={self.n_routed_experts}]",
            )
            _check(self.n_shared_experts >= 0, f"n_shared_experts={self.n_shared_experts} must be >= 0")
        if self.engram is not None:
            bad = [i for i in self.engram.layer_ids if i >= self.num_layers]
            _check(
                not bad,
                f"engram.layer_ids={list(self.engram.layer_ids)} has {bad} outside the "
                f"{self.num_layers} layers (valid: 0..{self.num_layers - 1})",
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["engram"] = self.engram.to_dict() if self.engram is not None else None
        d["input_ngram"] = self.input_ngram.to_dict() if self.input_ngram is not None else None
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        return _from_dict(cls, data, "ModelConfig")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


@dataclass
class TrainConfig:
    """Optimisation recipe. Tables get Adam at ``table_lr_mult`` x lr and no weight decay."""

    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    table_lr_mult: float = 5.0
    table_weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 20
    save_every: int = 200
    log_every: int = 10
    seed: int = 1234
    # Engram tables: "adam" (dense, every row every step) or "sparse_adam" (row-wise lazy Adam:
    # state and updates only for touched rows; engram.training.sparse_adam). prefetch builds the next
    # batch and its row ids on a background thread (same numbers, less waiting).
    table_optimizer: str = "adam"
    prefetch: bool = False

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        _check(self.table_optimizer in ("adam", "sparse_adam"),
               f"table_optimizer={self.table_optimizer!r} must be 'adam' or 'sparse_adam'")
        _check(self.steps >= 1, f"steps={self.steps} must be >= 1")
        _check(self.batch_size >= 1, f"batch_size={self.batch_size} must be >= 1")
        _check(self.seq_len >= 2, f"seq_len={self.seq_len} must be >= 2")
        _check(self.lr > 0, f"lr={self.lr} must be > 0")
        _check(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        _check(self.warmup_steps >= 0, f"warmup_steps={self.warmup_steps} must be >= 0")
        _check(self.table_lr_mult > 0, f"table_lr_mult={self.table_lr_mult} must be > 0")
        _check(len(self.betas) == 2, f"betas={self.betas} must have two values")
        _check(self.grad_clip >= 0, f"grad_clip={self.grad_clip} must be >= 0 (0 disables)")
        for name in ("eval_every", "eval_batches", "save_every", "log_every"):
            _check(getattr(self, name) >= 1, f"{name}={getattr(self, name)} must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        return _from_dict(cls, data, "TrainConfig")


# ----------------------------------------------------------------------------- presets
# Small enough for a laptop CPU. The Engram presets keep the backbone of their baseline and add
# tables; `engram-moe` vs `moe` is the like-for-like comparison used by the main job.


def _engram_small(vocab_size: int) -> EngramConfig:
    return EngramConfig(
        engram_vocab_size=(vocab_size * 5, vocab_size * 5),
        max_ngram_size=3,
        n_embed_per_ngram=128,
        n_head_per_ngram=4,
        layer_ids=(1,),
        pad_id=0,
    )


def preset(name: str, vocab_size: int = 4096) -> ModelConfig:
    """Return a fresh ``ModelConfig`` for a named preset (see ``PRESETS``)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name](vocab_size)


PRESETS = {
    "dense": lambda v: ModelConfig(vocab_size=v, hidden_size=256, num_layers=4, num_heads=4,
                                   ffn="dense", intermediate_size=688),
    "moe": lambda v: ModelConfig(vocab_size=v, hidden_size=256, num_layers=4, num_heads=4,
                                 ffn="moe", n_shared_experts=1, n_routed_experts=8,
                                 num_experts_per_tok=2, moe_intermediate_size=176,
                                 first_k_dense=1, intermediate_size=688),
    "engram-moe": lambda v: ModelConfig(vocab_size=v, hidden_size=256, num_layers=4, num_heads=4,
                                        ffn="moe", n_shared_experts=1, n_routed_experts=8,
                                        num_experts_per_tok=2, moe_intermediate_size=176,
                                        first_k_dense=1, intermediate_size=688,
                                        engram=_engram_small(v)),
    "engram-dense": lambda v: ModelConfig(vocab_size=v, hidden_size=256, num_layers=4, num_heads=4,
                                          ffn="dense", intermediate_size=688,
                                          engram=_engram_small(v)),
    # For tests: seconds per step on one core.
    "tiny": lambda v: ModelConfig(vocab_size=v, hidden_size=64, num_layers=2, num_heads=2,
                                  max_seq_len=64, ffn="moe", n_shared_experts=1,
                                  n_routed_experts=4, num_experts_per_tok=2,
                                  moe_intermediate_size=32, intermediate_size=128,
                                  engram=EngramConfig(engram_vocab_size=(997, 1009),
                                                      n_embed_per_ngram=32, n_head_per_ngram=2,
                                                      layer_ids=(1,), pad_id=0)),
    "tiny-dense": lambda v: ModelConfig(vocab_size=v, hidden_size=64, num_layers=2, num_heads=2,
                                        max_seq_len=64, ffn="dense", intermediate_size=128),
}


# ----------------------------------------------------------------------------- resolving a run's configs
def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # bare strings such as ffn=moe


def build_configs(preset_name: str, vocab_size: int, config_file: Optional[str],
                  overrides: Sequence[str]) -> tuple[ModelConfig, TrainConfig]:
    """Preset, then a JSON file {"model": {...}, "train": {...}}, then ``--set section.key=value``."""
    model = preset(preset_name, vocab_size).to_dict()
    train = TrainConfig().to_dict()
    if config_file:
        try:
            data = json.loads(Path(config_file).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read config file {config_file}: {e}") from None
        unknown = sorted(set(data) - {"model", "train"})
        if unknown:
            raise ConfigError(f"{config_file}: unknown section(s) {unknown}; use 'model' and 'train'")
        model.update(data.get("model", {}))
        train.update(data.get("train", {}))
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or section not in ("model", "train", "engram"):
            raise ConfigError(f"--set {item!r}: expected model.KEY=VALUE, engram.KEY=VALUE or train.KEY=VALUE")
        if section == "engram":
            if model.get("engram") is None:
                raise ConfigError(f"--set {item!r}: preset {preset_name!r} has no Engram; pick an engram-* preset")
            model["engram"][name] = _parse_value(value)
        else:
            target = model if section == "model" else train
            if name not in target:
                raise ConfigError(f"--set {item!r}: unknown {section} key {name!r}; known: {sorted(target)}")
            target[name] = _parse_value(value)
    model["vocab_size"] = vocab_size
    return ModelConfig.from_dict(model), TrainConfig.from_dict(train)
