"""The fact-edit trainer's settings, torch-free so that the command line can build its flags
without importing torch (:mod:`engram.knowledge.editor` uses them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engram.errors import EngramError
from engram.knowledge.templates import DEFAULT_KINDS, KINDS


class FactEditError(EngramError):
    """Bad settings or a model the fact-edit trainer cannot edit; the message names the fix."""


def _f(name: str, default: Any, help: str, **meta: Any) -> Any:
    """A field whose flag is ``--edit-NAME``, beside ``engram patch train``'s text-patch flags."""
    return field(default=default, metadata={"flag": "--edit-" + name, "help": help, **meta})


ROW_CHOICES = ("all", "subject")
AUTOCAST_CHOICES = ("off", "bf16")


@dataclass(frozen=True)
class FactEditConfig:
    """Settings of one fact edit. The defaults of lr, rows, kinds and neutral windows are the ones
    the study chose on dev facts for SmolLM2-135M with Engram at layer 10 (docs/knowledge.md);
    steps, batch, KL weights and stopping were set, not tuned."""

    lr: float = _f("lr", 9.0, "Adam learning rate of the trained rows")
    steps: int = _f("steps", 1200, "at most this many steps (training stops earlier when dev questions stop improving)")
    batch_size: int = _f("batch-size", 16, "training sentences per step")
    kl_weight: float = _f("kl-weight", 1.0, "KL to the unedited model on the sentences' non-answer tokens")
    neutral_kl_weight: float = _f("neutral-kl-weight", 1.0, "KL to the unedited model on neutral text")
    neutral_windows: int = _f("neutral-windows", 512, "neutral text windows of the KL term (two per step, cycled)")
    neutral_len: int = _f("neutral-len", 64, "tokens per neutral window")
    eval_every: int = _f("eval-every", 25, "steps between dev evaluations")
    patience: int = _f("patience", 3, "dev evaluations without a gain before stopping")
    max_seconds: float = _f("max-seconds", 0.0, "stop training after this wall-clock budget (seconds of training "
                            "steps and dev evaluations; 0: no budget), scoring the dev questions once more at the "
                            "step it stops and keeping the best step as usual")
    dev_questions: int = _f("dev-questions", 0, "score at most this many dev questions at each evaluation, a fixed "
                            "sample drawn with the seed (0: every one; a large edit's dev questions can cost more "
                            "than its training steps)")
    kinds: tuple[str, ...] = _f("kinds", DEFAULT_KINDS, f"training forms to use, of {' '.join(KINDS)}")
    seed: int = _f("seed", 0, "seed of the sentence order")
    rows: str = _f("rows", "subject", "which rows the sentences read are trained: all, or subject (only those read at the "
                   "subject's and the answer's positions, so the edit cannot key on one phrasing's words)", choices=ROW_CHOICES)
    keyed: bool = _f("keyed", False, "train N-gram-keyed entries instead of hashed rows: an entry is read only where the "
                     "whole N-gram it was trained on recurs, so other text that hashes to the same rows is untouched "
                     "(the patch is then served as an overlay or applied to a loaded model, not written into a table file)")
    kl_topk: int = _f("kl-topk", 64, "the unedited model's distribution on the sentences and the neutral text is computed "
                      "once and kept as its top-k tokens plus the rest's mass (0: kept or recomputed in full, slower)")
    autocast: str = _f("autocast", "off", "compute the training forwards and the unedited model's cached distribution in "
                       "bfloat16 (about 1.4x faster on a CPU with AVX-512 BF16; dev questions are still scored in "
                       "float32, and the patch is float32)", choices=AUTOCAST_CHOICES)
    # Positive control only: also train the Engram layers' gates, projections, norms and conv at
    # this lr (0: tables only). Those weights are not in the patch; see EditResult.layer_state.
    layer_lr: float = _f("layer-lr", 0.0, "control only: lr of the Engram layers' own weights (not in the patch)")

    def __post_init__(self) -> None:
        for name in ("lr", "steps", "batch_size", "eval_every", "patience", "neutral_windows", "neutral_len"):
            if not getattr(self, name) > 0:
                raise FactEditError(f"{name}={getattr(self, name)} must be > 0")
        if self.rows not in ROW_CHOICES:
            raise FactEditError(f"rows={self.rows!r}: choose one of {list(ROW_CHOICES)}")
        if self.autocast not in AUTOCAST_CHOICES:
            raise FactEditError(f"autocast={self.autocast!r}: choose one of {list(AUTOCAST_CHOICES)}")
        for name in ("kl_weight", "neutral_kl_weight", "layer_lr", "kl_topk", "dev_questions", "max_seconds"):
            if getattr(self, name) < 0:
                raise FactEditError(f"{name}={getattr(self, name)} must be >= 0")
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds:
            raise FactEditError(f"kinds={list(self.kinds)}: choose one or more of {list(KINDS)}")
