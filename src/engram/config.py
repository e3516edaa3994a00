"""Typed configuration: every settings dataclass of engram-lm, torch-free.

Each config is a dataclass validated in ``__post_init__``; this module imports nothing heavy so
that the command line can build its flags from these classes without loading torch:

- ``EngramConfig``, ``InputNgramConfig``, ``ModelConfig``: the model (conditional memory,
  input N-gram baseline, transformer backbone). ``TrainConfig``: the optimisation recipe.
- ``StorageConfig``: where a model's table rows come from (``engram.tables``).
- ``PatchTrainConfig``, ``PatchBenchConfig``: knowledge patches (``engram.patches``, ``engram.bench``).
- ``SamplingConfig`` (generation), ``GateConfig`` (the N-gram mixture's lambda gate),
  ``ServeLimits`` (``engram serve``).
- ``RetrofitConfig``: Engram added to a pretrained Hugging Face model (``engram.retrofit``).

The model and train configs round-trip through plain dicts (``to_dict`` / ``from_dict``);
``from_dict`` refuses unknown keys and values of the wrong type (``check_types``: ints must be
ints, bools must be bools, floats accept ints, tuples accept lists), so a typo in a JSON file is
an error, not a silent default or a TypeError later. A field's ``metadata`` (see ``setting``)
holds its command-line help and, where it differs from ``--field-name``, its flag; the CLI
generates its flags from it (``engram.cli.flags``). Named presets and ``build_configs`` (preset,
then JSON file, then ``--set`` overrides) live at the bottom.

The feature errors these configs raise while validating (``StorageError``, ``PatchError``,
``MixtureError``, ``ServeConfigError``, ``RetrofitError``, ``InputNgramError``) are defined here,
beside the config that raises them: every feature package sits above this module, so a class
defined there could not be raised here. The features import them from here. Constants that only
a feature reads live in that feature (``engram.inspect.settings``, ``engram.retrofit.base``).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import numbers
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Mapping, Optional, Sequence, Union

from engram.errors import ConfigError, EngramError


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def setting(default: Any, help: str = "", **cli: Any) -> Any:
    """A dataclass field with command-line metadata: ``help``, and optionally ``flag`` (when not
    ``--field-name``), ``aliases`` (old flags that still work), ``metavar``, ``choices`` and
    ``action`` (read by ``engram.cli.flags``)."""
    return field(default=default, metadata={"help": help, **cli})


# ----------------------------------------------------------------------------- type checks
@functools.lru_cache(maxsize=None)
def field_types(cls: type) -> dict[str, Any]:
    """{field name: resolved type hint} of a config dataclass."""
    return typing.get_type_hints(cls)


_PLURAL = {int: "integers", float: "numbers", bool: "true/false values", str: "strings"}
_SINGULAR = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
             type(None): "null"}


def _fits(hint: Any, value: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_fits(a, value) for a in args)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_fits(args[0], v) for v in value)
        return len(value) == len(args) and all(_fits(a, v) for a, v in zip(args, value))
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:  # a bool is an int in Python, but true is not a count (numpy ints are)
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:  # an int is a fine float (lr=1); true is not
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if dataclasses.is_dataclass(hint):
        return isinstance(value, (hint, dict))
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(dict.fromkeys(_describe(a) for a in args if not isinstance(a, type) or
                                         not issubclass(a, enum.Enum)))
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_PLURAL.get(args[0], args[0])}"
        if len(set(args)) == 1:
            return f"a list of {len(args)} {_PLURAL.get(args[0], args[0])}"
        return f"a list [{', '.join(_describe(a) for a in args)}]"
    if dataclasses.is_dataclass(hint):
        return "a JSON object"
    return _SINGULAR.get(hint, getattr(hint, "__name__", str(hint)))


def check_value(hint: Any, value: Any, where: str, error: type = ConfigError) -> None:
    """Raise ``error("where=value: expected ...")`` unless ``value`` fits the type ``hint``;
    a dict for a nested config (``model.engram``) is checked key by key."""
    if not _fits(hint, value):
        raise error(f"{where}={value!r}: expected {_describe(hint)}")
    nested = [a for a in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(a)]
    if nested and isinstance(value, dict):
        check_types(nested[0], value, where, error)


def check_types(cls: type, data: Mapping[str, Any], where: str, error: type = ConfigError) -> None:
    """Check every known key of ``data`` against the type of ``cls``'s field (unknown keys are
    left to ``from_dict``, which names the known ones; old names are checked as their new ones)."""
    data = _renamed(cls, data, where, error)
    hints = field_types(cls)
    for key, value in data.items():
        if key in hints:
            check_value(hints[key], value, f"{where}.{key}", error)


# Old spellings of renamed keys, still read from config.json files, adapters, --config files
# and --set (README, "Using it"). One quantity has one name: the number of rows of one hash
# head's table is ``rows_per_head`` everywhere (it was also engram_vocab_size, after DeepSeek's
# demo, and table_size).
KEY_ALIASES: dict[str, dict[str, str]] = {
    "EngramConfig": {"engram_vocab_size": "rows_per_head"},
    "InputNgramConfig": {"table_size": "rows_per_head"},
    "RetrofitConfig": {"table_size": "rows_per_head"},
}


def canonical_key(cls: type, key: str) -> str:
    """The current name of config key ``key`` of ``cls`` (``key`` itself unless it is an alias)."""
    return KEY_ALIASES.get(cls.__name__, {}).get(key, key)


def _renamed(cls: type, data: dict[str, Any], where: str, error: type) -> dict[str, Any]:
    """``data`` with aliased keys under their current names (an alias beside its name is an error)."""
    aliases = KEY_ALIASES.get(cls.__name__, {})
    if not any(k in aliases for k in data):
        return data
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = aliases.get(key, key)
        if name in out or (name != key and name in data):
            raise error(f"{where}: {key!r} is the old name of {name!r}; give only {name!r}")
        out[name] = value
    return out


def canonical_model_dict(model: Mapping[str, Any]) -> dict[str, Any]:
    """A (partial) model config dict with the old key names of its ``engram`` and ``input_ngram``
    sections replaced by the current ones, e.g. before merging it over a current dict."""
    out = dict(model)
    for key, cls in (("engram", EngramConfig), ("input_ngram", InputNgramConfig)):
        if isinstance(out.get(key), dict):
            out[key] = _renamed(cls, out[key], f"model.{key}", ConfigError)
    return out


def _from_dict(cls, data: dict[str, Any], where: str, error: type = ConfigError):
    if not isinstance(data, dict):
        raise error(f"{where}: expected a JSON object, got {type(data).__name__}")
    data = _renamed(cls, data, where, error)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise error(
            f"{where}: unknown config key(s) {unknown}; known keys are {sorted(known)}"
        )
    check_types(cls, data, where, error)
    return cls(**data)


ENGRAM_PLACEMENTS = ("layer", "expert")  # EngramConfig.placement


@dataclass
class EngramConfig:
    """Conditional memory: multi-head N-gram hashing plus the gated Engram layer.

    Names follow the paper and DeepSeek's reference demo, except ``rows_per_head`` (the demo's
    ``engram_vocab_size``, still accepted in files and ``--set``): ``rows_per_head[i]`` is the
    target table size of each hash head of N-gram order ``n = i + 2``; each head gets the next
    unused prime above it, so every head of every layer has a distinct prime size.
    """

    rows_per_head: tuple[int, ...] = (646400, 646400)
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
    # Where the memory sits at each layer of ``layer_ids``. "layer": the gated Engram layer
    # before attention (the paper). "expert": the "historian", one routed expert of that layer's
    # DeepSeekMoE whose output is the memory read (``engram.model.historian``); the router decides
    # per token whether to consult it. Needs ffn="moe" (checked by ModelConfig).
    placement: str = "layer"

    def __post_init__(self) -> None:
        self.rows_per_head = tuple(int(v) for v in self.rows_per_head)
        self.layer_ids = tuple(int(v) for v in self.layer_ids)
        _check(
            self.max_ngram_size >= 2,
            f"max_ngram_size={self.max_ngram_size} must be >= 2 (orders run 2..max_ngram_size)",
        )
        _check(
            len(self.rows_per_head) == self.max_ngram_size - 1,
            f"rows_per_head has {len(self.rows_per_head)} entries but max_ngram_size="
            f"{self.max_ngram_size} needs {self.max_ngram_size - 1} (one per order 2..{self.max_ngram_size})",
        )
        _check(
            all(v >= 2 for v in self.rows_per_head),
            f"rows_per_head={list(self.rows_per_head)}: every head needs >= 2 rows",
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
        _check(self.placement in ENGRAM_PLACEMENTS,
               f"engram.placement={self.placement!r}; choose one of {list(ENGRAM_PLACEMENTS)}")

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
        d["rows_per_head"] = list(self.rows_per_head)
        d["layer_ids"] = list(self.layer_ids)
        if self.placement == "layer":  # written only when set: configs, checkpoints and sweep run
            del d["placement"]  # keys (hashes of these dicts) from before the option stay the same
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
    rows_per_head: int = 8192  # one head per order: rows per order (rounded up to a prime)
    max_ngram_size: int = 2  # bigram: must be 2; overencoding: orders 2..max_ngram_size
    pad_id: int = 0
    seed: int = 0
    init_std: float = 0.02
    # bigram only: modded-nanogpt starts the bigram table at zero so the model starts as the
    # plain backbone; averaging (overencoding) needs non-zero rows or it just shrinks the input.
    zero_init: bool = True
    # bigram only: add the row to the residual stream before every block, each block with its
    # own learned scale (init 1), instead of once to the input embedding: the form of the
    # modded-nanogpt record (there with a table of about 5x the vocabulary).
    every_layer: bool = False

    def __post_init__(self) -> None:
        if self.kind not in INPUT_NGRAM_KINDS:
            raise InputNgramError(f"input_ngram.kind={self.kind!r}; choose one of {list(INPUT_NGRAM_KINDS)}")
        if self.rows_per_head < 2:
            raise InputNgramError(f"input_ngram.rows_per_head={self.rows_per_head} must be >= 2")
        if self.max_ngram_size < 2:
            raise InputNgramError(f"input_ngram.max_ngram_size={self.max_ngram_size} must be >= 2")
        if self.kind == "bigram" and self.max_ngram_size != 2:
            raise InputNgramError(f"input_ngram.max_ngram_size={self.max_ngram_size} with kind='bigram'; "
                                  f"use 2, or kind='overencoding' for longer N-grams")
        if self.init_std <= 0:
            raise InputNgramError(f"input_ngram.init_std={self.init_std} must be > 0")
        if self.every_layer and self.kind != "bigram":
            raise InputNgramError(f"input_ngram.every_layer=True with kind={self.kind!r}; every-layer "
                                  f"injection is the bigram form, use kind='bigram'")

    @property
    def orders(self) -> tuple[int, ...]:
        return tuple(range(2, self.max_ngram_size + 1))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "InputNgramConfig":
        return _from_dict(cls, data, "InputNgramConfig", InputNgramError)


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
            if self.engram.placement == "expert":
                _check(self.ffn == "moe", f"engram.placement='expert' makes the memory a routed expert, but "
                                          f"ffn={self.ffn!r} has no experts; set ffn='moe' or placement='layer'")
                dense = [i for i in self.engram.layer_ids if i < self.first_k_dense]
                _check(not dense, f"engram.placement='expert': engram.layer_ids {dense} are dense layers "
                                  f"(first_k_dense={self.first_k_dense}); choose MoE layers or lower first_k_dense")
                _check(self.n_routed_experts >= 2, f"engram.placement='expert' needs n_routed_experts >= 2 "
                                                   f"(the memory takes one slot), got {self.n_routed_experts}")

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


# ----------------------------------------------------------------------------- table vocabulary
# One vocabulary for where table rows live and how a cache evicts, shared by training, serving and
# sharding (torchrec's EmbeddingLocation / CacheAlgorithm). The values are the strings configs on
# disk and command-line flags have always used, so both keep working.
class StorageError(EngramError):
    """A storage setting or request is invalid; the message names the value and the fix."""


class _Choice(str, enum.Enum):
    """A config value from a fixed set; parses its own string value, refuses others in one line."""

    @classmethod
    def parse(cls, value: Any, name: str, allowed: Optional[Sequence[Any]] = None,
              error: type = ConfigError) -> Any:
        allowed = tuple(cls) if allowed is None else tuple(allowed)
        try:
            member = cls(value)
        except ValueError:
            member = None
        if member not in allowed:
            raise error(f"{name}={getattr(value, 'value', value)!r}; choose one of {[a.value for a in allowed]}")
        return member

    @classmethod
    def values(cls, members: Optional[Sequence[Any]] = None) -> tuple[str, ...]:
        """The spellings (CLI choices) of ``members`` (default: all)."""
        return tuple(m.value for m in (cls if members is None else members))

    def __str__(self) -> str:  # f-strings and messages print the spelling, not the class
        return self.value


class TableLocation(_Choice):
    """Where an Engram table's rows live (``EngramTable.location``)."""

    MEMORY = "memory"  # ordinary tensors in RAM (or on the model's device)
    MMAP = "mmap"  # a mapped file: a served table file, or a writable working file while training
    CACHED = "cached"  # a pool of hot rows in RAM in front of such a file
    PROCESS = "process"  # a mmap / cached tier run by a helper process (serving)
    SHARDED = "sharded"  # rows r::W on each of W ranks (engram.distributed)


# What each user picks from (the other locations follow from other settings: --fetch-process, --nproc).
SERVING_LOCATIONS = (TableLocation.MEMORY, TableLocation.MMAP, TableLocation.CACHED)
TRAINING_LOCATIONS = (TableLocation.MEMORY, TableLocation.MMAP, TableLocation.CACHED)
StorageKind = TableLocation  # the name serving used before the two vocabularies became one


class CachePolicy(_Choice):
    """Which resident row a full cache evicts."""

    LRU = "lru"  # least recently used
    LFU = "lfu"  # least frequently used


class TableOptimizer(_Choice):
    """How the Engram tables train."""

    ADAM = "adam"  # dense: every row, every step
    SPARSE_ADAM = "sparse_adam"  # row-wise lazy Adam: touched rows only (engram.training.sparse_adam)


class Precision(_Choice):
    """The precision forward passes compute in (``engram.model.accel``)."""

    FP32 = "fp32"  # everything in float32
    BF16 = "bf16"  # bfloat16 autocast; weights, tables and optimizer state stay float32




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
    table_optimizer: Union[str, TableOptimizer] = setting(TableOptimizer.ADAM,
                                                          choices=TableOptimizer.values())
    # One-pass Adam kernels (torch's ``fused=True``) for the backbone's AdamW and the tables' dense
    # Adam: the same update up to float rounding, without the for-loop implementation's
    # table-sized temporaries (on the demo's 5.3M-entry table 5.5 ms instead of 43 ms per step).
    fused_adam: bool = setting(True, "one-pass (fused) Adam kernels; false: torch's for-loop Adam "
                                     "(differs in the last float bits)")
    prefetch: bool = setting(False, "build the next batch and its row ids on a background thread "
                                    "(sets train.prefetch)")
    # Where the Engram tables (each rank's shard) live while training (engram.tables.trainable):
    # memory, or a working file per table mapped writable (mmap), or a pool of hot rows in front
    # of that file (cached). The numbers are the same in all three; the file tiers need the
    # row-sparse optimizer, whose moments then live in working files too.
    table_storage: Union[str, TableLocation] = setting(TableLocation.MEMORY, "where the tables train: memory; mmap: a working file per "
                                 "table (and rank), mapped; cached: a pool of --table-cache-rows hot rows "
                                 "in front of that file (needs train.table_optimizer=sparse_adam)",
                                 choices=TableLocation.values(TRAINING_LOCATIONS))
    table_cache_rows: int = setting(1 << 16, "rows per Engram table (per rank) in the cached tier's pool "
                                    "(default 65,536)")
    table_dir: Optional[str] = setting(None, "directory of the working files of mmap/cached tables "
                                       "(default: RUN/table-work)", metavar="DIR")
    # Precision and compilation (engram.model.accel). bf16 is autocast: matmuls run in bfloat16,
    # the master weights, the tables, the gradients and Adam's moments stay float32. compile runs
    # torch.compile on each block's attention and FFN; the Engram layer (hashing, table gather,
    # gate) stays eager, since its row lookups and tiers break graphs.
    dtype: Union[str, Precision] = setting(Precision.FP32, "precision of the forward passes: fp32, or bf16 "
                                           "(autocast; float32 master weights)", choices=Precision.values())
    compile: bool = setting(False, "torch.compile each block's attention and FFN (the Engram layer stays eager)")

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        self.table_optimizer = TableOptimizer.parse(self.table_optimizer, "table_optimizer")
        self.dtype = Precision.parse(self.dtype, "dtype")
        self.table_storage = TableLocation.parse(self.table_storage, "table_storage", TRAINING_LOCATIONS)
        _check(self.table_storage == TableLocation.MEMORY or self.table_optimizer == TableOptimizer.SPARSE_ADAM,
               f"table_storage={self.table_storage.value!r} trains with the row-sparse optimizer only (dense "
               f"Adam keeps two table-sized moments in RAM): add --set train.table_optimizer=sparse_adam "
               f"or use --table-storage memory")
        _check(self.table_cache_rows >= 1, f"table_cache_rows={self.table_cache_rows} must be >= 1 "
               f"(rows per Engram table)")
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
        d["table_optimizer"], d["table_storage"] = self.table_optimizer.value, self.table_storage.value
        d["dtype"] = self.dtype.value
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        return _from_dict(cls, data, "TrainConfig")


# ----------------------------------------------------------------------------- presets
# Small enough for a laptop CPU. The Engram presets keep the backbone of their baseline and add
# tables; `engram-moe` vs `moe` is the like-for-like comparison used by the main job.


def _engram_small(vocab_size: int) -> EngramConfig:
    return EngramConfig(
        rows_per_head=(vocab_size * 5, vocab_size * 5),
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
                                  engram=EngramConfig(rows_per_head=(997, 1009),
                                                      n_embed_per_ngram=32, n_head_per_ngram=2,
                                                      layer_ids=(1,), pad_id=0)),
    "tiny-dense": lambda v: ModelConfig(vocab_size=v, hidden_size=64, num_layers=2, num_heads=2,
                                        max_seq_len=64, ffn="dense", intermediate_size=128),
}


# ----------------------------------------------------------------------------- many processes
DIST_BACKENDS = ("auto", "gloo", "nccl")


@dataclass
class DistributedConfig:
    """How ``engram train`` runs on several processes (``engram.distributed``, docs/distributed.md).

    ``nproc``: processes to launch on this machine with torchrun (``engram train --nproc N``);
    under an existing torchrun launch the world comes from its environment instead.
    ``backend``: auto = NCCL when CUDA is available, else gloo. ``timeout_s``: how long a
    collective waits for the other ranks before the run fails (a rank that died, or hangs).
    """

    nproc: int = setting(1, "processes to launch on this machine with torchrun (1: no launch)")
    backend: str = setting("auto", "torch.distributed backend: auto (nccl with CUDA, else gloo), gloo or "
                           "nccl", flag="--dist-backend", choices=DIST_BACKENDS)
    timeout_s: float = setting(300.0, "seconds a collective waits for the other ranks before the run "
                               "fails (default 300)", flag="--dist-timeout", metavar="SECONDS")

    def __post_init__(self) -> None:
        _check(isinstance(self.nproc, int) and self.nproc >= 1,
               f"nproc={self.nproc!r} must be an integer >= 1 (the number of training processes)")
        _check(self.backend in DIST_BACKENDS, f"backend={self.backend!r} must be one of {DIST_BACKENDS}")
        _check(self.timeout_s > 0, f"timeout_s={self.timeout_s} must be > 0 seconds; try 300")


# ----------------------------------------------------------------------------- table storage
# Used by engram.tables; defined here because the tiers need torch and the CLI flags must not.
# StorageError, TableLocation and CachePolicy are above, with the table vocabulary.


@dataclass
class StorageConfig:
    """How an Engram model gets its table rows (the ``--table/--storage/...`` CLI switches).

    ``path``: a table file (``engram table convert``); None keeps the checkpoint's tables.
    ``kind``: memory | mmap | cached. ``cache_rows``: pool size per Engram layer for ``cached``.
    ``prefetch``: fetch rows on a background thread ahead of the layer that needs them.
    ``io_threads``: parallel reads from a mapped file. ``cold``: drop the file's pages from the
    page cache after every read (honest cold-storage benchmarks; slow for real use).
    ``process``: run file-backed tiers in a helper process (``engram.tables.process``) so their
    bookkeeping does not contend with the model for the GIL (see docs/storage.md).
    """

    path: Optional[str] = setting(None, "serve the Engram tables from this table file "
                                  "(`engram table convert RUN FILE`) instead of the checkpoint",
                                  flag="--table", metavar="FILE")
    kind: Union[str, TableLocation] = setting(
        TableLocation.MEMORY, "memory: load the tables into RAM; mmap: map the file; cached: a pool of hot "
        "rows in front of the mapped file (default with --table: cached)",
        flag="--storage", choices=TableLocation.values(SERVING_LOCATIONS))
    cache_rows: int = setting(1 << 20, "rows per Engram layer in the cached tier's pool (default 1,048,576)")
    cache_policy: Union[str, CachePolicy] = setting(CachePolicy.LRU, choices=CachePolicy.values())
    prefetch: bool = setting(True, "fetch rows on a background thread ahead of the layer (default: on with "
                             "--table/--storage, off otherwise)")
    io_threads: int = setting(8, "parallel reads from the file (default 8)")
    cold: bool = setting(False, "drop the file's pages from the page cache after every read (benchmarks)")
    process: bool = setting(True, "serve mmap/cached tiers from a helper process, off the model's GIL "
                            "(default on)", flag="--fetch-process")

    def __post_init__(self) -> None:
        self.kind = TableLocation.parse(self.kind, "storage", SERVING_LOCATIONS, StorageError)
        if self.cache_rows < 1:
            raise StorageError(f"cache_rows={self.cache_rows} must be >= 1 (rows per Engram layer)")
        self.cache_policy = CachePolicy.parse(self.cache_policy, "cache_policy", error=StorageError)
        if self.io_threads < 1:
            raise StorageError(f"io_threads={self.io_threads} must be >= 1")
        if self.kind in (TableLocation.MMAP, TableLocation.CACHED) and self.path is None:
            raise StorageError(f"storage={self.kind.value!r} reads a table file: pass its path "
                               f"(--table FILE; export one with `engram table convert RUN FILE`)")
        if self.path is not None:
            self.path = str(self.path)

    @property
    def is_default(self) -> bool:
        """True when nothing differs from the plain in-memory model."""
        return self.path is None and self.kind == TableLocation.MEMORY and not self.prefetch

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["kind"], d["cache_policy"] = self.kind.value, self.cache_policy.value
        return d


# ----------------------------------------------------------------------------- knowledge patches
# Used by engram.patches and engram.bench.patch; torch-free for the CLI flags.
class PatchError(EngramError):
    """A patch cannot be made, read, applied or reverted; the message names the value and the fix."""


QUANTIZATIONS = ("none", "bf16", "int8")
DEFAULT_PROTECT_MIN_COUNT = 0  # off: it lost to rehearsal on held-out facts (docs/patches.md)
DEFAULT_REHEARSAL = 1.0  # used whenever the original corpus is given (rehearsal=None)


@dataclass
class PatchTrainConfig:
    """How a patch is trained (``engram patch train``); validated on construction."""

    steps: int = setting(1000)
    batch_size: int = setting(8)
    seq_len: int = setting(128)
    # the base lr; the tables train at lr * table_lr_mult (as in `engram train`)
    lr: float = setting(3e-3, "base lr; tables train at lr x --table-lr-mult")
    table_lr_mult: float = setting(5.0)
    warmup_steps: int = setting(10)
    min_lr_ratio: float = setting(0.1, "the lr decays (cosine) to this fraction of --lr after warm-up")
    grad_clip: float = setting(1.0, "clip the gradient norm of the trained parameters to this (0 disables)")
    train_gates: bool = setting(False, "also train the Engram gate/value projections (reported; not in the patch)")
    anchor: float = setting(0.0, "L2 pull of changed rows towards their old values")
    # rows the original corpus reads at least this often are frozen (0 disables); takes effect
    # only when the original corpus is given (--original-data), see engram.patches.trainer
    protect_min_count: int = setting(
        DEFAULT_PROTECT_MIN_COUNT, "with --original-data: freeze rows the original corpus reads at least this "
        f"often (0 disables; default {DEFAULT_PROTECT_MIN_COUNT}; rehearsal works better, docs/patches.md)")
    # beta: loss_new + beta * loss_orig; None = DEFAULT_REHEARSAL when the original corpus is
    # given (--original-data), else 0; 0 disables
    rehearsal: Optional[float] = setting(
        None, "add BETA x the loss on original-corpus batches (only rows the new text touches still move); "
        f"default {DEFAULT_REHEARSAL} with --original-data, else 0; 0 disables")
    # original-corpus windows per step; 0 = batch_size
    rehearsal_batch_size: int = setting(0, "original-corpus windows per step (0 = --batch-size)")
    quantization: str = setting("none", "store the new values quantised (old values stay exact)",
                                flag="--quantize", choices=QUANTIZATIONS)
    seed: int = setting(0)

    def __post_init__(self) -> None:
        checks = [
            (self.steps >= 1, f"steps={self.steps} must be >= 1"),
            (self.batch_size >= 1, f"batch_size={self.batch_size} must be >= 1"),
            (self.seq_len >= 2, f"seq_len={self.seq_len} must be >= 2"),
            (self.lr > 0, f"lr={self.lr} must be > 0"),
            (self.table_lr_mult > 0, f"table_lr_mult={self.table_lr_mult} must be > 0"),
            (self.warmup_steps >= 0, f"warmup_steps={self.warmup_steps} must be >= 0"),
            (0 <= self.min_lr_ratio <= 1, f"min_lr_ratio={self.min_lr_ratio} must be in [0, 1]"),
            (self.grad_clip >= 0, f"grad_clip={self.grad_clip} must be >= 0 (0 disables)"),
            (self.anchor >= 0, f"anchor={self.anchor} must be >= 0 (0 disables)"),
            (isinstance(self.protect_min_count, int) and self.protect_min_count >= 0,
             f"protect_min_count={self.protect_min_count!r} must be an integer >= 0 "
             f"(0 disables row protection; e.g. --protect-min-count {DEFAULT_PROTECT_MIN_COUNT})"),
            (self.rehearsal is None or self.rehearsal >= 0,
             f"rehearsal={self.rehearsal} must be >= 0 (0 disables; e.g. --rehearsal 1.0) or None (automatic)"),
            (self.rehearsal_batch_size >= 0,
             f"rehearsal_batch_size={self.rehearsal_batch_size} must be >= 0 (0 = batch_size)"),
            (self.quantization in QUANTIZATIONS,
             f"quantization={self.quantization!r}; choose one of {list(QUANTIZATIONS)}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise PatchError(msg)


_VARIANT_KEYS = {"steps", "lr", "table_lr_mult", "batch_size", "anchor", "protect_min_count", "rehearsal",
                 "rehearsal_batch_size", "warmup_steps", "min_lr_ratio", "seed"}


@dataclass
class PatchBenchConfig:
    """The held-out-facts experiment (``engram bench patch``, ``engram.bench.patch``)."""

    workdir: str = setting("patch-bench", "data, run, table and patch go here")
    held_out: int = setting(40, "countries whose documents are held out")
    base_steps: int = setting(400)
    patch_steps: int = setting(1000)
    patch_lr: float = setting(3e-3)
    patch_batch_size: int = setting(8, "batch size of patch training")
    table_lr_mult: float = setting(5.0)
    anchor: float = setting(0.0)
    # rows the original corpus reads >= this often are frozen
    protect_min_count: int = setting(DEFAULT_PROTECT_MIN_COUNT, "freeze rows the original corpus (the bench's "
                                     "training split) reads this often; 0 disables")
    rehearsal: float = setting(DEFAULT_REHEARSAL, "beta x original-corpus loss during patch training (0 disables)")
    # extra patch settings "key=value,key=value" (PatchTrainConfig fields)
    variants: tuple[str, ...] = setting((), "also train and measure a patch with these settings (e.g. "
                                        "steps=600,rehearsal=1); repeatable",
                                        flag="--variant", action="append", metavar="K=V,...")
    ngram_lambda: float = setting(0.5)
    preset: str = setting("engram-moe", "model preset of the base run", choices=tuple(sorted(PRESETS)))
    vocab_size: int = setting(4096, "BPE vocabulary size of the bench's data")
    batch_size: int = setting(16, "batch size of the base run and of evaluation")
    seq_len: int = setting(128, "sequence length of the base run, patch training and evaluation")
    eval_batches: int = setting(40, "batches per loss evaluation")
    trained_facts: int = setting(300, "facts the base run was trained on, scored as a damage check")
    threads: int = setting(1)

    def __post_init__(self) -> None:
        if self.held_out < 1:
            raise PatchError(f"held_out={self.held_out} must be >= 1")
        if self.base_steps < 1 or self.patch_steps < 1:
            raise PatchError("base_steps and patch_steps must be >= 1")
        if not 0 <= self.ngram_lambda < 1:
            raise PatchError(f"ngram_lambda={self.ngram_lambda} must be in [0, 1)")
        self.variants = tuple(self.variants)
        for v in self.variants:
            parse_variant(v)
        self.patch_config()  # validates the patch settings

    def patch_config(self, **overrides: Any) -> PatchTrainConfig:
        kw = dict(steps=self.patch_steps, batch_size=self.patch_batch_size, seq_len=self.seq_len,
                  lr=self.patch_lr, table_lr_mult=self.table_lr_mult, anchor=self.anchor,
                  protect_min_count=self.protect_min_count, rehearsal=self.rehearsal)
        return PatchTrainConfig(**{**kw, **overrides})

    def base_key(self) -> dict[str, Any]:
        """The settings the data and base run depend on (the base-run cache key)."""
        return {"held_out": self.held_out, "base_steps": self.base_steps, "preset": self.preset,
                "vocab_size": self.vocab_size, "batch_size": self.batch_size, "seq_len": self.seq_len}


def parse_variant(text: str) -> dict[str, Any]:
    """``"steps=600,rehearsal=1"`` -> {"steps": 600, "rehearsal": 1.0} (PatchTrainConfig fields)."""
    out: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, eq, val = part.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or key not in _VARIANT_KEYS:
            raise PatchError(f"variant {text!r}: {part!r} is not KEY=VALUE with KEY one of {sorted(_VARIANT_KEYS)}; "
                             f"e.g. --variant steps=600,rehearsal=1")
        typ = int if field_types(PatchTrainConfig)[key] is int else float  # Optional[float] -> float
        try:
            out[key] = typ(val)
        except ValueError:
            raise PatchError(f"variant {text!r}: {key}={val!r} must be {'an integer' if typ is int else 'a number'}; "
                             f"e.g. --variant {key}={'600' if typ is int else '1.0'}") from None
    if not out:
        raise PatchError(f"variant {text!r} sets nothing; e.g. --variant steps=600,rehearsal=1")
    return out


# ----------------------------------------------------------------------------- generation
# Used by engram.model.generation; torch-free for the CLI flags.
@dataclass
class SamplingConfig:
    max_new_tokens: int = setting(100)
    temperature: float = setting(0.8, "0 = greedy")
    top_k: int = setting(0, "sample from the k most likely tokens (0 = off)")
    top_p: float = setting(1.0, "sample from the smallest set of tokens holding this probability (1.0 = off)")
    seed: int = setting(0)

    def __post_init__(self) -> None:
        _check(self.max_new_tokens >= 0, f"max_new_tokens={self.max_new_tokens} must be >= 0")
        _check(self.temperature >= 0, f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        _check(self.top_k >= 0, f"top_k={self.top_k} must be >= 0 (0 disables it)")
        _check(0 < self.top_p <= 1, f"top_p={self.top_p} must be in (0, 1]")


# ----------------------------------------------------------------------------- speculative drafting
# Used by engram.ngram.draft and .speculative; torch-free for the CLI flags.
DRAFT_METHODS = ("ngram",)
DRAFT_SOURCES = ("both", "index", "text")


@dataclass
class DraftConfig:
    """Drafts copied from memory for speculative decoding (``engram generate --draft ngram:K``).

    Each draft token continues the longest suffix of the context found in the N-gram index of
    the corpus (seen at least ``min_count`` times) and in the text of this generation (prompt +
    output); a match shorter than ``min_match`` tokens, or an index continuation with a share
    below ``min_prob``, ends the draft. ``source`` limits where matches are looked up. The
    defaults were chosen on held-out prompts other than the benchmark's (docs/speculative.md).
    """

    method: str = setting("ngram", "how drafts are made (ngram: suffix matches in memory)", choices=DRAFT_METHODS)
    max_len: int = setting(4, "K: at most this many draft tokens per verification step")
    min_match: int = setting(2, "shortest suffix match (tokens) that may propose a draft token")
    min_count: int = setting(8, "index matches: the longest suffix seen at least this often (1: the longest at all)")
    min_prob: float = setting(0.2, "index matches: stop when the most frequent continuation has a smaller share")
    context: int = setting(32, "longest suffix (tokens) looked up; longer matches continue the same way")
    source: str = setting("both", "where matches are looked up: the index, the generation's own text, or both",
                          choices=DRAFT_SOURCES)
    adaptive: bool = setting(True, "adapt the draft length: after a rejection draft the accepted length + 1, "
                             "after a full acceptance twice as many (up to K); after drafts rejected at their "
                             "first token, draft nothing for 1, 2, 4, ... (at most max_skip) steps")
    max_skip: int = setting(8, "adaptive: the most steps without drafts after repeated first-token rejections")

    def __post_init__(self) -> None:
        _check(self.method in DRAFT_METHODS, f"draft method {self.method!r}; choose one of {DRAFT_METHODS}")
        _check(1 <= self.max_len <= 64, f"draft max_len={self.max_len} must be in 1..64 (ngram:K with K >= 1)")
        _check(self.min_match >= 1, f"draft min_match={self.min_match} must be >= 1")
        _check(self.min_count >= 1, f"draft min_count={self.min_count} must be >= 1")
        _check(0.0 <= self.min_prob <= 1.0, f"draft min_prob={self.min_prob} must be in [0, 1]")
        _check(self.context >= self.min_match,
               f"draft context={self.context} must be >= min_match={self.min_match}")
        _check(self.source in DRAFT_SOURCES, f"draft source={self.source!r}; choose one of {DRAFT_SOURCES}")
        _check(self.max_skip >= 0, f"draft max_skip={self.max_skip} must be >= 0")

    @classmethod
    def parse(cls, spec: str, **kw: Any) -> "DraftConfig":
        """``"ngram"`` or ``"ngram:K"`` (K = maximum draft length) -> DraftConfig."""
        method, _, k = spec.partition(":")
        if method not in DRAFT_METHODS or (k and not k.isdigit()):
            raise ConfigError(f"--draft {spec!r} is not understood; use ngram or ngram:K with K a positive integer")
        return cls(method=method, **({"max_len": int(k)} if k else {}), **kw)


# ----------------------------------------------------------------------------- N-gram mixture gate
# Used by engram.ngram.mixture and .index; torch-free for the CLI flags.
class MixtureError(EngramError):
    """Bad mixture settings or a gate that does not fit the model / index; names the fix."""


DEFAULT_KN_ORDER = 5
ESTIMATORS = ("both", "kn", "infgram")
FEATURES = (
    "log_suffix_len", "no_match", "log_count", "log_distinct",
    "inf_entropy", "inf_max", "kn_entropy", "kn_max", "lm_entropy", "lm_max",
    "lm_mass_on_inf", "lm_mass_on_kn", "lm_logp_of_inf_argmax",
)
# The default leaves out how much the LM agrees with the N-gram: on held-out text disagreement
# predicts N-gram errors, but newly indexed knowledge is exactly what the LM disagrees with.
AGREEMENT_FEATURES = ("lm_mass_on_inf", "lm_mass_on_kn", "lm_logp_of_inf_argmax")
DEFAULT_FEATURES = tuple(f for f in FEATURES if f not in AGREEMENT_FEATURES)


@dataclass
class GateConfig:
    """What the gate mixes and sees.

    ``hidden_size`` 0: features only (the default, and the only choice for a callable LM). With
    the LM hidden state, ``hidden_bound`` > 0 caps how far it can move each gate logit
    (``bound * tanh(.)``); 0 lets it enter the MLP freely. The hidden state buys held-out
    perplexity but learns topic-wise distrust that also overrides newly indexed facts
    (docs/ngram.md, "Which gate").
    """

    # the N-gram side: "both" (gated blend), "kn" or "infgram"
    estimator: str = setting("both", "N-gram side: both = gated blend of infgram and KN (default), or one of them",
                             choices=ESTIMATORS)
    kn_order: int = setting(DEFAULT_KN_ORDER)
    # on the command line `--hidden` sets this to the LM's hidden size
    hidden_size: int = setting(0, "also feed the LM's hidden state (better perplexity, weaker recall of new facts)",
                               flag="--hidden", action="store_true")
    hidden_proj: int = setting(16, "with --hidden: width of the hidden state's projection")
    hidden_bound: float = setting(0.0, "with --hidden: max shift of a gate logit by the hidden state (0 = unbounded)")
    width: int = setting(32, "hidden units of the gate's MLP")
    features: tuple[str, ...] = setting(DEFAULT_FEATURES, "the gate's input features (default: all but the "
                                        "LM-agreement ones)", choices=FEATURES)

    def __post_init__(self) -> None:
        self.features = tuple(self.features)
        if self.estimator not in ESTIMATORS:
            raise MixtureError(f"estimator={self.estimator!r}; choose one of {ESTIMATORS}")
        if self.kn_order < 1:
            raise MixtureError(f"kn_order={self.kn_order} must be >= 1")
        if self.hidden_bound < 0:
            raise MixtureError(f"hidden_bound={self.hidden_bound} must be >= 0 (0 = unbounded)")
        for name in ("hidden_size", "hidden_proj", "width"):
            if getattr(self, name) < 0 or (name == "width" and self.width < 1):
                raise MixtureError(f"{name}={getattr(self, name)} must be >= {1 if name == 'width' else 0}")
        unknown = sorted(set(self.features) - set(FEATURES))
        if unknown or not self.features:
            raise MixtureError(f"features {unknown or '[]'} invalid; choose a non-empty subset of {FEATURES}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["features"] = list(self.features)
        return d


# ----------------------------------------------------------------------------- serve
# Used by engram.inspect.server; torch-free for the CLI flags. The heatmap's choices (colour
# modes, scales) are engram.inspect.settings.
class ServeConfigError(EngramError):
    """Invalid server settings; the message names the value and the fix."""


@dataclass(frozen=True)
class ServeLimits:
    max_body_bytes: int = setting(64 * 1024, "largest request body accepted")
    max_chars: int = setting(2000, "longest text accepted")
    max_inflight: int = setting(8, "concurrent requests before 503")  # requests being answered at once
    queue_wait_s: float = setting(2.0, "how long one more request waits for a free slot before its 503")
    socket_timeout_s: float = setting(10.0, "a client that stops sending is dropped after this many seconds")
    # recent texts: typing revisits prefixes (backspace)
    cache_entries: int = setting(256, "recently inspected texts kept (0 disables the cache)")

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_chars", "max_inflight"):
            if getattr(self, name) < 1:
                raise ServeConfigError(f"{name}={getattr(self, name)} must be >= 1")
        if self.socket_timeout_s <= 0:
            raise ServeConfigError(f"socket_timeout_s={self.socket_timeout_s} must be > 0")
        if self.queue_wait_s < 0:
            raise ServeConfigError(f"queue_wait_s={self.queue_wait_s} must be >= 0 (0: refuse at once)")
        if self.cache_entries < 0:
            raise ServeConfigError(f"cache_entries={self.cache_entries} must be >= 0 (0 disables)")


@dataclass(frozen=True)
class PatchServeConfig:
    """``engram serve --patches DIR``: the tenant server's own settings (ServeLimits apply too)."""

    patch_cache_mb: float = setting(256.0, "MiB of loaded patches kept (least recently used dropped first)")
    max_stack: int = setting(16, "most patches one request may name")
    max_new_tokens: int = setting(256, "longest generation one request may ask for")

    def __post_init__(self) -> None:
        if not self.patch_cache_mb > 0:
            raise ServeConfigError(f"patch_cache_mb={self.patch_cache_mb} must be > 0")
        for name in ("max_stack", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ServeConfigError(f"{name}={getattr(self, name)} must be >= 1")

    @property
    def cache_bytes(self) -> int:
        return int(self.patch_cache_mb * 2**20)


class StateCacheError(EngramError):
    """A state cache setting, or a stored generation state, that cannot be used."""


@dataclass(frozen=True)
class StateCacheConfig:
    """``--state-cache DIR``: generation states of prompt prefixes, stored per block of tokens
    (``engram.serve.state_cache``). ``storage`` reuses the tables' vocabulary: memory (RAM only,
    this process), mmap (files in DIR, mapped when read) or cached (a RAM pool in front of DIR)."""

    path: Optional[str] = setting(None, "keep the generation state after every block of prompt tokens in this "
                                  "directory and start from the deepest stored one", flag="--state-cache",
                                  metavar="DIR")
    block_tokens: int = setting(64, "prompt tokens per stored state (default 64)", flag="--state-block")
    storage: Union[str, TableLocation] = setting(
        TableLocation.MMAP, "memory: states in RAM for this process only; mmap: files in DIR (default); "
        "cached: a RAM pool in front of DIR", flag="--state-storage", choices=TableLocation.values(SERVING_LOCATIONS))
    max_mb: float = setting(1024.0, "MiB of states kept (least recently used dropped first; default 1024)",
                            flag="--state-cache-mb")
    memory_mb: float = setting(256.0, "MiB of the RAM pool of --state-storage cached (default 256)",
                               flag="--state-memory-mb")

    def __post_init__(self) -> None:
        object.__setattr__(self, "storage", TableLocation.parse(self.storage, "state_storage", SERVING_LOCATIONS,
                                                                 StateCacheError))
        if self.block_tokens < 1:
            raise StateCacheError(f"block_tokens={self.block_tokens} must be >= 1 (tokens per stored state)")
        for name in ("max_mb", "memory_mb"):
            if not getattr(self, name) > 0:
                raise StateCacheError(f"{name}={getattr(self, name)} must be > 0 (MiB)")
        if self.storage != TableLocation.MEMORY and self.path is None:
            raise StateCacheError(f"state_storage={self.storage.value!r} keeps states in a directory: pass "
                                  f"--state-cache DIR (or --state-storage memory)")
        if self.path is not None:
            object.__setattr__(self, "path", str(self.path))

    @property
    def max_bytes(self) -> int:
        return int(self.max_mb * 2**20)

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_mb * 2**20)


# ----------------------------------------------------------------------------- retrofit
# Used by engram.retrofit: Engram layers added to a pretrained Hugging Face causal LM.
class RetrofitError(EngramError):
    """A base model, adapter or retrofit setting that cannot work; the message names the fix."""


@dataclass
class RetrofitConfig:
    """Where Engram goes in the base model and how big its memory is.

    ``layers`` are decoder-layer indices of the base: Engram's output is added to the residual
    stream right before that decoder layer runs. ``rows_per_head`` is the target rows of each hash
    head, the same for every N-gram order (``EngramConfig.rows_per_head`` has one per order); every
    head gets its own prime above it. Adapters saved with the old key ``table_size`` still load.
    """

    base: str = setting("smollm2-135m", "a named base (smollm2-135m) or a local Hugging Face model directory",
                        metavar="NAME|DIR")
    layers: tuple[int, ...] = setting((1,), "decoder layers that get an Engram layer before them (e.g. 1 or 1,10)",
                                      metavar="L[,L...]")
    rows_per_head: int = setting(131_072, "rows per hash head (target; the next unused prime is used)",
                                 aliases=("--table-size",))
    max_ngram_size: int = setting(3, "longest N-gram hashed (orders 2..N)")
    n_head_per_ngram: int = setting(4, "hash heads per N-gram order")
    n_embed_per_ngram: int = setting(256, "memory width per order, summed over its heads")
    hash_seed: int = setting(0, "seed of the hash multipliers")
    # LoRA (peft) on the base's projections, alone (layers=()) or beside Engram: the baseline that
    # retrofit results are compared against, trained and shipped by the same commands.
    lora_rank: int = setting(0, "LoRA rank on the base's --lora-targets (0: no LoRA; needs peft)")
    lora_alpha: float = setting(16.0, "LoRA scaling numerator (the update is scaled by alpha / rank)")
    lora_targets: tuple[str, ...] = setting(("q_proj", "k_proj", "v_proj", "o_proj"),
                                            "module names that get LoRA", metavar="NAME")

    def __post_init__(self) -> None:
        self.layers = tuple(int(v) for v in self.layers)
        self.lora_targets = tuple(str(v) for v in self.lora_targets)
        _check(bool(self.base), "base is empty; give smollm2-135m or a Hugging Face model directory")
        _check(len(set(self.layers)) == len(self.layers) and all(v >= 0 for v in self.layers),
               f"layers={list(self.layers)} must be distinct non-negative decoder-layer indices")
        _check(self.lora_rank >= 0, f"lora_rank={self.lora_rank} must be >= 0 (0: no LoRA)")
        _check(bool(self.layers) or self.lora_rank > 0,
               "layers is empty and lora_rank=0: nothing to train; give --layers or --lora-rank")
        _check(self.lora_rank == 0 or bool(self.lora_targets), "lora_targets is empty; name modules, e.g. q_proj")
        _check(self.rows_per_head >= 2, f"rows_per_head={self.rows_per_head} must be >= 2")
        # Every other field is validated by the EngramConfig it builds.
        if self.layers:
            self.engram_config(pad_id=0)

    def engram_config(self, pad_id: int) -> EngramConfig:
        """The Engram layers' config; ``pad_id`` is the base tokenizer's padding (or eos) id."""
        return EngramConfig(rows_per_head=(self.rows_per_head,) * (self.max_ngram_size - 1),
                            max_ngram_size=self.max_ngram_size, n_embed_per_ngram=self.n_embed_per_ngram,
                            n_head_per_ngram=self.n_head_per_ngram, layer_ids=self.layers,
                            pad_id=pad_id, seed=self.hash_seed)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layers"], d["lora_targets"] = list(self.layers), list(self.lora_targets)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "retrofit config") -> "RetrofitConfig":
        return _from_dict(cls, data, where, RetrofitError)


RETROFIT_VARIANTS = ("base", "engram", "lora", "both")


@dataclass
class RetrofitCompareConfig:
    """``engram retrofit compare``: base / Engram / LoRA / LoRA + Engram at equal training tokens.

    Every trained variant gets the same steps x batch x seq_len tokens and the same seeds. With
    several ``lrs``, each variant's learning rate is chosen on the dev split (first seed), then
    every seed runs at that rate and is reported on the test split (never used for choices).
    """

    base: str = setting("smollm2-135m", "named base or Hugging Face model directory", metavar="NAME|DIR")
    variants: tuple[str, ...] = setting(RETROFIT_VARIANTS, "which of base, engram, lora, both", metavar="V")
    seeds: tuple[int, ...] = setting((0, 1, 2), "training seeds (data order and initialisation)", metavar="S")
    steps: int = setting(100, "optimizer steps per run")
    batch_size: int = setting(4)
    seq_len: int = setting(256)
    lrs: tuple[float, ...] = setting((1e-3,), "learning rates to choose from on the dev split", metavar="LR")
    layers: tuple[int, ...] = setting((1,), "Engram before these decoder layers", metavar="L")
    rows_per_head: int = setting(131_072, "Engram rows per hash head", aliases=("--table-size",))
    lora_rank: int = setting(8, "LoRA rank (lora and both)")
    eval_batches: int = setting(20, "batches of each evaluation (dev, test, general text)")

    def __post_init__(self) -> None:
        self.variants = tuple(str(v) for v in self.variants)
        self.seeds = tuple(int(v) for v in self.seeds)
        self.lrs = tuple(float(v) for v in self.lrs)
        self.layers = tuple(int(v) for v in self.layers)
        bad = sorted(set(self.variants) - set(RETROFIT_VARIANTS))
        _check(not bad and len(self.variants) > 0,
               f"variants={list(self.variants)}: choose among {list(RETROFIT_VARIANTS)}")
        _check(len(self.seeds) >= 1 and len(set(self.seeds)) == len(self.seeds),
               f"seeds={list(self.seeds)} must be distinct")
        _check(len(self.lrs) >= 1 and all(v > 0 for v in self.lrs), f"lrs={list(self.lrs)} must be positive")
        for name in ("steps", "batch_size", "seq_len", "lora_rank", "eval_batches"):
            _check(getattr(self, name) >= 1, f"{name}={getattr(self, name)} must be >= 1")


@dataclass
class RetrofitFactsConfig:
    """``engram retrofit facts``: invented facts taught five ways, asked verbatim and in other words."""

    facts: int = setting(300, "invented facts per seed (spread over the relations)")
    steps: int = setting(60, "optimizer steps of the Engram patch and of LoRA (batches of the same shape)")
    batch_size: int = setting(8)
    seq_len: int = setting(64)
    patch_lrs: tuple[float, ...] = setting((3e-3, 3e-2, 3e-1), "the Engram patch's lr grid (tables train at "
                                           "5x); the first seed's best on the dev facts is kept", metavar="LR")
    lora_lrs: tuple[float, ...] = setting((1e-4, 3e-4, 1e-3), "LoRA's lr grid; the first seed's best on the "
                                          "dev facts is kept", metavar="LR")
    dev_facts: int = setting(100, "the first N facts' questions choose the lrs; the others are reported (test)")
    seeds: tuple[int, ...] = setting((0, 1, 2), "each seed invents new facts and draws new batches", metavar="S")
    lora_rank: int = setting(8)
    lora_targets: tuple[str, ...] = setting(("q_proj", "k_proj", "v_proj", "o_proj"),
                                            "modules LoRA wraps (add gate_proj up_proj down_proj for the MLPs)",
                                            metavar="NAME")
    ngram_lambda: float = setting(0.5, "fixed mixture weight of the N-gram memory")
    general_windows: int = setting(16, "general-text windows for the loss change and KL")

    def __post_init__(self) -> None:
        self.lora_targets = tuple(str(v) for v in self.lora_targets)
        _check(bool(self.lora_targets), "lora_targets is empty; name modules, e.g. q_proj")
        self.patch_lrs = tuple(float(v) for v in self.patch_lrs)
        self.lora_lrs = tuple(float(v) for v in self.lora_lrs)
        self.seeds = tuple(int(v) for v in self.seeds)
        for name in ("facts", "steps", "batch_size", "seq_len", "lora_rank", "general_windows", "dev_facts"):
            _check(getattr(self, name) >= 1, f"{name}={getattr(self, name)} must be >= 1")
        _check(self.dev_facts < self.facts, f"dev_facts={self.dev_facts} must be below facts={self.facts} "
               f"(the rest are the test questions)")
        for name in ("patch_lrs", "lora_lrs"):
            v = getattr(self, name)
            _check(len(v) >= 1 and all(x > 0 for x in v) and len(set(v)) == len(v),
                   f"{name}={list(v)} must be distinct values > 0")
        _check(len(self.seeds) >= 1 and len(set(self.seeds)) == len(self.seeds) and min(self.seeds) >= 0,
               f"seeds={list(self.seeds)} must be distinct non-negative ints")
        _check(0 <= self.ngram_lambda < 1, f"ngram_lambda={self.ngram_lambda} must be in [0, 1)")


# ----------------------------------------------------------------------------- resolving a run's configs
def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # bare strings such as ffn=moe


def build_configs(preset_name: str, vocab_size: int, config_file: Optional[str],
                  overrides: Sequence[str]) -> tuple[ModelConfig, TrainConfig]:
    """Preset, then a JSON file {"model": {...}, "train": {...}}, then ``--set section.key=value``.

    Every value is type-checked where it comes in, so the error names its source: the file and
    ``train.steps=5.5``, or ``--set`` and ``train.steps='abc'``."""
    model = preset(preset_name, vocab_size).to_dict()
    train = TrainConfig().to_dict()
    apply_config_sources(model, train, config_file, overrides, f"preset {preset_name!r}")
    model["vocab_size"] = vocab_size
    return ModelConfig.from_dict(model), TrainConfig.from_dict(train)


def apply_config_sources(model: dict[str, Any], train: dict[str, Any], config_file: Optional[str],
                         overrides: Sequence[str], owner: str) -> None:
    """Apply a JSON file {"model": {...}, "train": {...}}, then ``--set section.key=value`` items,
    to the config dicts ``model`` and ``train`` in place. ``owner`` names where ``model`` came
    from (a preset, a run) in the error for ``engram.*`` on a model without Engram."""
    if config_file:
        try:
            data = json.loads(Path(config_file).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read config file {config_file}: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{config_file}: expected a JSON object with 'model' and/or 'train' sections")
        unknown = sorted(set(data) - {"model", "train"})
        if unknown:
            raise ConfigError(f"{config_file}: unknown section(s) {unknown}; use 'model' and 'train'")
        for section, cls in (("model", ModelConfig), ("train", TrainConfig)):
            values = data.get(section, {})
            if not isinstance(values, dict):
                raise ConfigError(f"{config_file}: section {section!r} must be a JSON object, "
                                  f"got {type(values).__name__}")
            check_types(cls, values, f"{config_file}: {section}")
        model.update(data.get("model", {}))
        train.update(data.get("train", {}))
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or section not in ("model", "train", "engram"):
            raise ConfigError(f"--set {item!r}: expected model.KEY=VALUE, engram.KEY=VALUE or train.KEY=VALUE")
        parsed = _parse_value(value)
        if section == "engram":
            if model.get("engram") is None:
                raise ConfigError(f"--set {item!r}: {owner} has no Engram; pick an engram-* preset")
            name = canonical_key(EngramConfig, name)  # engram.engram_vocab_size=... still works
            check_types(EngramConfig, {name: parsed}, "engram")
            model["engram"][name] = parsed
        else:
            target, cls = (model, ModelConfig) if section == "model" else (train, TrainConfig)
            if name not in target:
                raise ConfigError(f"--set {item!r}: unknown {section} key {name!r}; known: {sorted(target)}")
            check_types(cls, {name: parsed}, section)
            target[name] = parsed


def _flat_keys(model: Mapping[str, Any], train: Mapping[str, Any], model_section: str) -> dict[str, Any]:
    """{"model.KEY" / "engram.KEY" / "train.KEY": value}: the names ``--set`` uses."""
    flat = {f"train.{k}": v for k, v in train.items()}
    for k, v in model.items():
        if k == "engram" and isinstance(v, Mapping):
            flat.update({f"engram.{ek}": ev for ek, ev in v.items()})
        else:
            flat[f"{model_section}.{k}"] = v
    return flat


def resume_changes(recorded: tuple[Mapping[str, Any], Mapping[str, Any]],
                   given: tuple[Mapping[str, Any], Mapping[str, Any]], mutable: Collection[str],
                   where: str, model_section: str = "model") -> dict[str, tuple[Any, Any]]:
    """What a resumed run changes of its recorded (model, train) config dicts:
    ``{"train.steps": (recorded, given)}``. Only train keys in ``mutable`` may change; any other
    difference is a ConfigError naming the key (``model_section``: the model dict's name in it)."""
    old, new = _flat_keys(*recorded, model_section), _flat_keys(*given, model_section)
    changes = {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}
    for key, (was, now) in changes.items():
        if not (key.startswith("train.") and key[len("train."):] in mutable):
            raise ConfigError(
                f"{key}={now!r} cannot change when resuming {where} (it recorded {was!r}); only "
                f"{', '.join('train.' + k for k in sorted(mutable))} may. Drop it, or start a new run "
                f"with another --out")
    return changes
