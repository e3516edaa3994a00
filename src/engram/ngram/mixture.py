"""Mixing a language model with the N-gram index: P = (1 - lambda) * P_model + lambda * P_ngram.

Shape legend
    B batch   T positions   V vocabulary   D LM hidden size   F gate features   N scored tokens

``P_ngram`` is the Kneser-Ney estimate (``estimator="kn"``), the infinity-gram (``"infgram"``), or
(``"both"``, the default) ``mu * P_infgram + (1 - mu) * P_kn``: KN is smooth and never zero, the
infinity-gram sees an arbitrarily long context (a rare name ten tokens back), so both matter.

``lambda`` (and ``mu``) are either fixed or given per position by :class:`LambdaGate`, a small
MLP over features of the distributions — the infinity-gram suffix length, its count and number
of distinct continuations, entropies and peak probabilities of the infinity-gram, Kneser-Ney and
LM distributions — and, optionally, the LM's final hidden state (see :class:`GateConfig` for why
that is not the default). It is trained on held-out text with the LM frozen (only the gate's
few thousand parameters learn), by minimising the mixture's cross-entropy.

Any causal LM works through :class:`LMAdapter`: an :class:`~engram.model.EngramLM` (logits and
the final hidden state, read with a forward hook) or a plain callable ``ids [B,T] -> logits
[B,T,V]`` (no hidden state; the gate then uses the features only).

No leakage, by construction and by check: the N-gram estimate for target ``x[t+1]`` reads only
``x[:t+1]`` (:meth:`NgramIndex.batch`), and :func:`collect` refuses to score text that is itself
in the index (:meth:`NgramIndex.check_not_indexed`), since the index would then contain the very
tokens being predicted. Gates are saved as safetensors + JSON (no pickle).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from engram.config import (  # torch-free: the CLI builds flags from them
    DEFAULT_KN_ORDER,
    FEATURES,
    GateConfig,
    MixtureError,
)
from engram.fsutil import PathLike, atomic_write
from engram.model.generation import check_prompt, filter_logits
from engram.model.lm import EngramLM
from engram.ngram.index import NgramBatch, NgramIndex

GATE_FORMAT = "engram-ngram-gate"
GATE_VERSION = 1
GATE_WEIGHTS, GATE_CONFIG = "gate.safetensors", "gate.json"
_EPS = 1e-12
LAMBDA_MARGIN = 1e-4


# ----------------------------------------------------------------------------- LM adapters
@dataclass
class LMOutput:
    logits: torch.Tensor  # [B,T,V]
    hidden: Optional[torch.Tensor] = None  # [B,T,D] final hidden state (the LM head's input)


class LMAdapter:
    """Uniform view of a causal LM: ``adapter(ids [B,T]) -> LMOutput``.

    ``LMAdapter(model)`` for an EngramLM (hidden state included, KV-cached generation);
    ``LMAdapter(fn, vocab_size=V, max_seq_len=T)`` for any callable returning logits. A callable
    with a ``cfg`` holding ``vocab_size`` / ``max_seq_len`` (a retrofitted Hugging Face model)
    needs neither argument.
    """

    def __init__(self, lm: Any, vocab_size: Optional[int] = None, max_seq_len: Optional[int] = None,
                 name: str = ""):
        self.model: Optional[EngramLM] = lm if isinstance(lm, EngramLM) else None
        self.fn: Callable[[torch.Tensor], Any] = lm
        self.name = name
        if self.model is not None:
            self.vocab_size = self.model.cfg.vocab_size
            self.max_seq_len = self.model.cfg.max_seq_len
            self.hidden_size: Optional[int] = self.model.cfg.hidden_size
        else:
            if not callable(lm):
                raise MixtureError(f"lm must be an EngramLM or a callable ids -> logits, got {type(lm).__name__}")
            cfg = getattr(lm, "cfg", None)
            vocab_size = vocab_size if vocab_size is not None else getattr(cfg, "vocab_size", None)
            max_seq_len = max_seq_len if max_seq_len is not None else getattr(cfg, "max_seq_len", None)
            if vocab_size is None:
                raise MixtureError("a callable LM needs vocab_size=V (the logits' last dimension)")
            self.vocab_size = int(vocab_size)
            self.max_seq_len = int(max_seq_len) if max_seq_len else None
            self.hidden_size = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device if self.model is not None else torch.device("cpu")

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, cache: Any = None) -> LMOutput:
        if self.model is None:
            out = self.fn(ids)
            logits = out.logits if hasattr(out, "logits") else out
            if logits.shape[-1] != self.vocab_size:
                raise MixtureError(f"the LM returned {logits.shape[-1]} logits, expected vocab_size={self.vocab_size}")
            return LMOutput(logits=logits.float())
        captured: list[torch.Tensor] = []
        handle = self.model.norm.register_forward_hook(lambda m, i, o: captured.append(o))
        try:
            logits = self.model(ids, cache=cache).logits
        finally:
            handle.remove()
        return LMOutput(logits=logits.float(), hidden=captured[-1].float())


# ----------------------------------------------------------------------------- configuration
class LambdaGate(nn.Module):
    """lambda = sigmoid(MLP([standardised features, projection of the LM hidden state]))[0].

    With estimator "both" a second output gives mu, the infinity-gram's share of P_ngram.
    """

    def __init__(self, cfg: GateConfig):
        super().__init__()
        self.cfg = cfg
        F_ = len(cfg.features)
        self.register_buffer("feat_mean", torch.zeros(F_))
        self.register_buffer("feat_std", torch.ones(F_))
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_proj) if cfg.hidden_size else None
        self.bounded = bool(cfg.hidden_size and cfg.hidden_bound > 0)
        d_in = F_ + (cfg.hidden_proj if cfg.hidden_size and not self.bounded else 0)
        self.outputs = 2 if cfg.estimator == "both" else 1
        self.mlp = nn.Sequential(nn.Linear(d_in, cfg.width), nn.GELU(), nn.Linear(cfg.width, self.outputs))
        self.hidden_head = nn.Linear(cfg.hidden_proj, self.outputs) if self.bounded else None
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)
        with torch.no_grad():
            self.mlp[2].bias[0] = -1.5  # start near lambda = 0.18 (and mu = 0.5)

    def logits(self, features: torch.Tensor, hidden: Optional[torch.Tensor] = None) -> torch.Tensor:
        """features [...,F], hidden [...,D] -> gate logits [...,1 or 2] (sigmoid -> lambda, mu)."""
        z = (features - self.feat_mean) / self.feat_std
        if self.proj is not None:
            if hidden is None:
                raise MixtureError("this gate was trained with the LM's hidden state; use an EngramLM "
                                   "adapter, or train a features-only gate (hidden_size=0)")
            if self.bounded:
                return self.mlp(z) + self.cfg.hidden_bound * torch.tanh(self.hidden_head(self.proj(hidden)))
            z = torch.cat([z, self.proj(hidden)], dim=-1)
        return self.mlp(z)

    def weights(self, features: torch.Tensor, hidden: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(lambda [...], mu [...]); mu is 0 for "kn" and 1 for "infgram"."""
        z = self.logits(features, hidden)
        # The LM keeps at least LAMBDA_MARGIN of the mass: no token ever gets probability zero.
        lam = torch.sigmoid(z[..., 0]).clamp(LAMBDA_MARGIN, 1 - LAMBDA_MARGIN)
        if self.outputs == 2:
            return lam, torch.sigmoid(z[..., 1])
        return lam, torch.full_like(lam, 1.0 if self.cfg.estimator == "infgram" else 0.0)

    def forward(self, features: torch.Tensor, hidden: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.weights(features, hidden)[0]


# ----------------------------------------------------------------------------- features & mixing
def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * torch.log(p.clamp_min(_EPS))).sum(-1)


def gate_features(nb: NgramBatch, lm_logp: torch.Tensor) -> torch.Tensor:
    """[B,T,F] features (all of FEATURES, in order) from N-gram estimates and LM log-probs."""
    lm_p = lm_logp.exp()
    inf, knp = nb.infgram, nb.kn
    inf_arg = inf.argmax(-1, keepdim=True)
    cols = {
        "log_suffix_len": torch.log1p(nb.suffix_len.float()),
        "no_match": (nb.suffix_len == 0).float(),
        "log_count": torch.log1p(nb.count),
        "log_distinct": torch.log1p(nb.distinct),
        "inf_entropy": _entropy(inf),
        "inf_max": inf.max(-1).values,
        "kn_entropy": _entropy(knp),
        "kn_max": knp.max(-1).values,
        "lm_entropy": _entropy(lm_p),
        "lm_max": lm_p.max(-1).values,
        "lm_mass_on_inf": (lm_p * inf).sum(-1),
        "lm_mass_on_kn": (lm_p * knp).sum(-1),
        "lm_logp_of_inf_argmax": lm_logp.gather(-1, inf_arg).squeeze(-1),
    }
    return torch.stack([cols[f].float() for f in FEATURES], dim=-1)


def select_features(features: torch.Tensor, names: tuple[str, ...]) -> torch.Tensor:
    idx = [FEATURES.index(n) for n in names]
    return features[..., idx]


def fixed_mu(estimator: str, mu: float = 0.5) -> float:
    """The infinity-gram share for a fixed mixture: 0 for "kn", 1 for "infgram", ``mu`` for "both"."""
    return {"kn": 0.0, "infgram": 1.0}.get(estimator, float(mu))


def blend(p_inf: torch.Tensor, p_kn: torch.Tensor, mu) -> torch.Tensor:
    """P_ngram = mu * P_infgram + (1 - mu) * P_kn; mu a float or [...] (broadcast over V)."""
    mu = torch.as_tensor(mu, dtype=p_kn.dtype)
    if mu.dim() and mu.dim() < p_kn.dim():
        mu = mu[..., None]
    return mu * p_inf + (1 - mu) * p_kn


def mix_logprobs(lm_logp: torch.Tensor, p_ngram: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """log((1 - lam) P_lm + lam P_ngram) for [...,V] inputs and lam [...] (or a float)."""
    lam = torch.as_tensor(lam, dtype=lm_logp.dtype)
    if lam.dim():
        lam = lam[..., None]
    lam = lam.clamp(1e-6, 1 - 1e-6)
    return torch.logaddexp(torch.log1p(-lam) + lm_logp, torch.log(lam) + torch.log(p_ngram.clamp_min(0)))


# ----------------------------------------------------------------------------- the mixture
class NgramMixture:
    """An LM, an index and a lambda (a trained :class:`LambdaGate` or a fixed float)."""

    def __init__(self, lm: LMAdapter, index: NgramIndex, lam: Union[LambdaGate, float],
                 cfg: Optional[GateConfig] = None, mu: float = 0.5):
        if lm.vocab_size != index.vocab_size:
            raise MixtureError(f"the LM has vocab_size={lm.vocab_size} but the index has "
                               f"{index.vocab_size}; build the index with the LM's tokenizer")
        if isinstance(lam, LambdaGate):
            cfg = lam.cfg
            if cfg.hidden_size and cfg.hidden_size != (lm.hidden_size or 0):
                raise MixtureError(f"the gate expects an LM hidden size of {cfg.hidden_size}, this LM has "
                                   f"{lm.hidden_size}; train a gate for this model (`engram ngram train-gate`)")
        else:
            lam = float(lam)
            if not 0.0 <= lam < 1.0:
                raise MixtureError(f"fixed lambda={lam} must be in [0, 1); 1 would drop the LM entirely")
            cfg = cfg or GateConfig()
            if not 0.0 <= mu <= 1.0:
                raise MixtureError(f"mu={mu} (the infinity-gram share of the N-gram side) must be in [0, 1]")
        self.lm, self.index, self.lam, self.cfg = lm, index, lam, cfg
        self.mu = fixed_mu(cfg.estimator, mu)

    def step(self, ids: torch.Tensor, out: LMOutput, last_only: bool = False,
             last_n: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(log P_mix [B,T,V], lambda [B,T]) for LM output on ``ids`` [B,T]; ``last_only`` /
        ``last_n``: only the last 1 / n positions (the LM output may cover just those)."""
        n = 1 if last_only else last_n
        logits = out.logits[:, -n:] if n else out.logits
        hidden = out.hidden[:, -n:] if (n and out.hidden is not None) else out.hidden
        nb = self.index.batch(ids.cpu().numpy(), kn_order=self.cfg.kn_order, last_n=n)
        lm_logp = torch.log_softmax(logits.float().cpu(), dim=-1)
        if isinstance(self.lam, LambdaGate):
            feats = select_features(gate_features(nb, lm_logp), self.cfg.features)
            with torch.no_grad():
                lam, mu = self.lam.weights(feats, hidden.cpu() if hidden is not None else None)
        else:
            lam = torch.full(lm_logp.shape[:-1], self.lam)
            mu = self.mu
        return mix_logprobs(lm_logp, blend(nb.infgram, nb.kn, mu), lam), lam

    @torch.no_grad()
    def log_probs(self, ids: torch.Tensor) -> torch.Tensor:
        """[B,T,V] mixture log-probabilities of the token after each position of ids [B,T]."""
        return self.step(ids, self.lm(ids.to(self.lm.device)))[0]


# ----------------------------------------------------------------------------- held-out collection
@dataclass
class Collected:
    """Per scored token: what gate training and scoring need (N tokens)."""

    features: torch.Tensor  # [N,F] all FEATURES
    hidden: Optional[torch.Tensor]  # [N,D]
    lm_logp: torch.Tensor  # [N] log P_lm(target)
    inf_p: torch.Tensor  # [N] P_infgram(target)
    kn_p: torch.Tensor  # [N] P_kn(target)
    lm_top1: torch.Tensor  # [N] bool, argmax of the LM is the target
    window: torch.Tensor  # [N] int64 window index (for the even/odd split)
    seconds: dict[str, float] = field(default_factory=dict)

    def subset(self, mask: torch.Tensor) -> "Collected":
        return Collected(self.features[mask], self.hidden[mask] if self.hidden is not None else None,
                         self.lm_logp[mask], self.inf_p[mask], self.kn_p[mask], self.lm_top1[mask],
                         self.window[mask], dict(self.seconds))

    def ngram_p(self, estimator: str, mu: Union[float, torch.Tensor] = 0.5) -> torch.Tensor:
        """[N] P_ngram(target) for an estimator ("both": mu * infgram + (1 - mu) * KN)."""
        if estimator == "both":
            return blend(self.inf_p, self.kn_p, mu)
        return self.inf_p if estimator == "infgram" else self.kn_p

    def __len__(self) -> int:
        return int(self.lm_logp.numel())


def eval_windows(num_tokens: int, seq_len: int, parity: str = "all", max_windows: Optional[int] = None) -> np.ndarray:
    """Indices w of the non-overlapping windows (targets w*T+1 .. w*T+T) to score.

    parity "even"/"odd" splits them for gate fitting / reporting; ``max_windows`` spreads a
    subset evenly over the shard, as :func:`engram.data.iter_eval_batches` does.
    """
    if parity not in ("all", "even", "odd"):
        raise MixtureError(f"parity={parity!r}; choose 'all', 'even' or 'odd'")
    total = (num_tokens - 1) // seq_len
    w = np.arange(total)
    if parity != "all":
        w = w[w % 2 == (0 if parity == "even" else 1)]
    if max_windows is not None and max_windows < w.size:
        w = w[(np.arange(max_windows) * w.size) // max_windows]
    return w


@torch.no_grad()
def collect(lm: LMAdapter, index: NgramIndex, tokens: Any, *, seq_len: int, batch_size: int = 16,
            parity: str = "all", max_windows: Optional[int] = None, kn_order: int = DEFAULT_KN_ORDER,
            allow_indexed: bool = False, progress: bool = True, what: str = "the scored text") -> Collected:
    """Run the LM and the index over held-out ``tokens`` and keep per-token gate inputs.

    Refuses (:class:`~engram.ngram.index.LeakageError`) text that is in the index unless
    ``allow_indexed``.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    if not allow_indexed:
        index.check_not_indexed(tokens, what)
    if lm.max_seq_len is not None and seq_len > lm.max_seq_len:
        raise MixtureError(f"seq_len={seq_len} exceeds the LM's max_seq_len={lm.max_seq_len}")
    wins = eval_windows(tokens.size, seq_len, parity, max_windows)
    if wins.size == 0:
        raise MixtureError(f"{tokens.size} tokens give no window of {seq_len}+1 tokens; use a smaller seq_len")
    offs = np.arange(seq_len + 1)
    acc: dict[str, list[torch.Tensor]] = {k: [] for k in ("features", "hidden", "lm_logp", "inf_p", "kn_p", "lm_top1", "window")}
    t_lm = t_ng = 0.0
    for b0 in tqdm(range(0, wins.size, batch_size), desc="n-gram mixture", disable=not progress, leave=False):
        w = wins[b0:b0 + batch_size]
        buf = torch.from_numpy(tokens[(w * seq_len)[:, None] + offs])
        x, y = buf[:, :-1], buf[:, 1:]
        t0 = time.perf_counter()
        out = lm(x.to(lm.device))
        lm_logp = torch.log_softmax(out.logits.float().cpu(), dim=-1)
        t1 = time.perf_counter()
        nb = index.batch(x.numpy(), kn_order=kn_order)
        t2 = time.perf_counter()
        t_lm, t_ng = t_lm + t1 - t0, t_ng + t2 - t1
        yi = y[..., None]
        acc["features"].append(gate_features(nb, lm_logp).reshape(-1, len(FEATURES)))
        if out.hidden is not None:
            acc["hidden"].append(out.hidden.cpu().reshape(-1, out.hidden.shape[-1]))
        acc["lm_logp"].append(lm_logp.gather(-1, yi).reshape(-1))
        acc["inf_p"].append(nb.infgram.gather(-1, yi).reshape(-1))
        acc["kn_p"].append(nb.kn.gather(-1, yi).reshape(-1))
        acc["lm_top1"].append((lm_logp.argmax(-1) == y).reshape(-1))
        acc["window"].append(torch.from_numpy(np.repeat(w, seq_len)))
    cat = {k: (torch.cat(v) if v else None) for k, v in acc.items()}
    return Collected(features=cat["features"], hidden=cat["hidden"], lm_logp=cat["lm_logp"],
                     inf_p=cat["inf_p"], kn_p=cat["kn_p"], lm_top1=cat["lm_top1"], window=cat["window"],
                     seconds={"lm": t_lm, "ngram": t_ng})


def mixture_nll(c: Collected, estimator: str, lam: Union[float, torch.Tensor],
                mu: Union[float, torch.Tensor] = 0.5) -> torch.Tensor:
    """[N] negative log-likelihood of each target under the mixture."""
    lam = torch.as_tensor(lam, dtype=torch.float32).clamp(1e-6, 1 - 1e-6)
    p = c.ngram_p(estimator, mu).float()
    return -torch.logaddexp(torch.log1p(-lam) + c.lm_logp, torch.log(lam) + torch.log(p.clamp_min(0)))


LAMBDA_GRID = np.round(np.arange(0.0, 0.99, 0.02), 2)
MU_GRID = np.round(np.arange(0.0, 1.01, 0.1), 1)


def fixed_lambda_sweep(c: Collected, estimator: str, grid: Optional[np.ndarray] = None,
                       mu: float = 0.5) -> dict[float, float]:
    """Mean NLL for each fixed lambda of ``grid`` (default 0.00, 0.02, ..., 0.98) at a fixed mu."""
    grid = LAMBDA_GRID if grid is None else grid
    return {float(l): float(mixture_nll(c, estimator, float(l), mu).mean()) for l in grid}


def best_fixed(c: Collected, estimator: str) -> tuple[float, float, float]:
    """(lambda, mu, mean NLL) of the best constant weights on a grid (mu searched for "both")."""
    mus = MU_GRID if estimator == "both" else [fixed_mu(estimator)]
    best = (0.0, 0.0, math.inf)
    for mu in mus:
        for lam, loss in fixed_lambda_sweep(c, estimator, mu=float(mu)).items():
            if loss < best[2]:
                best = (lam, float(mu), loss)
    return best


def gate_weights(gate: LambdaGate, c: Collected, chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """([N] lambda, [N] mu) of a trained gate on collected data."""
    feats = select_features(c.features, gate.cfg.features)
    lams, mus = [], []
    with torch.no_grad():
        for i in range(0, feats.shape[0], chunk):
            h = c.hidden[i:i + chunk] if (gate.proj is not None and c.hidden is not None) else None
            lam, mu = gate.weights(feats[i:i + chunk], h)
            lams.append(lam)
            mus.append(mu)
    return torch.cat(lams), torch.cat(mus)


def gate_lambda(gate: LambdaGate, c: Collected) -> torch.Tensor:
    """[N] lambda of a trained gate on collected data."""
    return gate_weights(gate, c)[0]


def gate_nll(gate: LambdaGate, c: Collected) -> torch.Tensor:
    """[N] mixture NLL with a trained gate's lambda and mu."""
    lam, mu = gate_weights(gate, c)
    return mixture_nll(c, gate.cfg.estimator, lam, mu)


def train_gate(c: Collected, cfg: GateConfig, steps: int = 400, lr: float = 1e-2, seed: int = 0,
               holdout: float = 0.1, progress: bool = True) -> tuple[LambdaGate, dict[str, Any]]:
    """Fit a gate on collected held-out data (LM frozen: only gate parameters learn).

    Full-batch Adam on the mixture's NLL; ``holdout`` of the windows is kept aside and the
    parameters with the lowest holdout loss are returned (early stopping).
    """
    if cfg.hidden_size and c.hidden is None:
        raise MixtureError("hidden_size > 0 but no hidden states were collected (callable LM?); "
                           "use hidden_size=0")
    if cfg.hidden_size and c.hidden is not None and c.hidden.shape[-1] != cfg.hidden_size:
        raise MixtureError(f"hidden_size={cfg.hidden_size} but the collected states have {c.hidden.shape[-1]}")
    if steps < 1:
        raise MixtureError(f"steps={steps} must be >= 1")
    torch.manual_seed(seed)
    gate = LambdaGate(cfg)
    feats = select_features(c.features, cfg.features)
    wins = torch.unique(c.window)
    g = torch.Generator().manual_seed(seed)
    held = wins[torch.randperm(wins.numel(), generator=g)[: max(1, int(holdout * wins.numel()))]]
    is_held = torch.isin(c.window, held)
    gate.feat_mean.copy_(feats[~is_held].mean(0))
    gate.feat_std.copy_(feats[~is_held].std(0).clamp_min(1e-3))
    hid = c.hidden if cfg.hidden_size else None
    inf_p, kn_p = c.inf_p.float(), c.kn_p.float()

    def loss_on(mask: torch.Tensor) -> torch.Tensor:
        z = gate.logits(feats[mask], hid[mask] if hid is not None else None)
        if gate.outputs == 2:
            p_ng = blend(inf_p[mask], kn_p[mask], torch.sigmoid(z[:, 1]))
        else:
            p_ng = c.ngram_p(cfg.estimator)[mask].float()
        zl = z[:, 0]
        return -torch.logaddexp(F.logsigmoid(-zl) + c.lm_logp[mask],
                                F.logsigmoid(zl) + torch.log(p_ng.clamp_min(0))).mean()

    opt = torch.optim.Adam(gate.parameters(), lr=lr)
    best = (math.inf, None, 0)
    history = []
    fit = ~is_held
    for step in tqdm(range(steps), desc="train gate", disable=not progress, leave=False):
        opt.zero_grad()
        loss = loss_on(fit)
        loss.backward()
        opt.step()
        if step % 10 == 9 or step == steps - 1:
            with torch.no_grad():
                hl = float(loss_on(is_held))
            history.append({"step": step + 1, "fit_loss": loss.item(), "holdout_loss": hl})
            if hl < best[0]:
                best = (hl, {k: v.detach().clone() for k, v in gate.state_dict().items()}, step + 1)
    gate.load_state_dict(best[1])
    gate.eval()
    return gate, {"best_step": best[2], "holdout_loss": best[0], "history": history,
                  "fit_tokens": int(fit.sum()), "holdout_tokens": int(is_held.sum())}


# ----------------------------------------------------------------------------- save / load
def save_gate(gate: LambdaGate, out_dir: PathLike, meta: Optional[dict[str, Any]] = None) -> Path:
    """Write ``gate.safetensors`` and ``gate.json`` (config + provenance) atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in gate.state_dict().items()}
    tmp = out / f".{GATE_WEIGHTS}.tmp"
    save_file(tensors, str(tmp))
    data = tmp.read_bytes()
    tmp.unlink()
    atomic_write(out / GATE_WEIGHTS, lambda f: f.write(data))
    record = {"format": GATE_FORMAT, "format_version": GATE_VERSION, "config": gate.cfg.to_dict(),
              "tensors": {k: list(v.shape) for k, v in tensors.items()}, "meta": meta or {}}
    text = json.dumps(record, indent=2, sort_keys=True, allow_nan=False) + "\n"
    atomic_write(out / GATE_CONFIG, lambda f: f.write(text.encode("utf-8")))
    return out


def load_gate(path: PathLike) -> tuple[LambdaGate, dict[str, Any]]:
    """Read a gate directory written by :func:`save_gate`, validating config and tensor shapes."""
    d = Path(path)
    cfg_path, w_path = d / GATE_CONFIG, d / GATE_WEIGHTS
    if not cfg_path.is_file() or not w_path.is_file():
        raise MixtureError(f"no gate in {d} ({GATE_CONFIG} + {GATE_WEIGHTS}); train one with "
                           "`engram ngram train-gate`")
    try:
        record = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MixtureError(f"{cfg_path} is not valid JSON ({e}); retrain the gate") from e
    if record.get("format") != GATE_FORMAT or record.get("format_version") != GATE_VERSION:
        raise MixtureError(f"{cfg_path} is not an engram N-gram gate of version {GATE_VERSION}; retrain it")
    try:
        cfg = GateConfig(**record["config"])
    except TypeError as e:
        raise MixtureError(f"{cfg_path}: bad gate config ({e}); retrain the gate") from e
    gate = LambdaGate(cfg)
    try:
        tensors = load_file(str(w_path))
    except Exception as e:  # safetensors raises its own error type on corrupt files
        raise MixtureError(f"{w_path} is not a readable safetensors file ({e}); retrain the gate") from e
    expected = {k: tuple(v.shape) for k, v in gate.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if expected != got:
        raise MixtureError(f"{w_path} tensors {got} do not match the config's gate {expected}; retrain the gate")
    gate.load_state_dict(tensors)
    gate.eval()
    return gate, record.get("meta", {})


# ----------------------------------------------------------------------------- generation
@torch.no_grad()
def generate_mixed(mix: NgramMixture, prompt_ids: torch.Tensor, sampling, eos_id: Optional[int] = None,
                   return_lambdas: bool = False):
    """Sample from the mixture. prompt_ids [B,T0] -> [B,T0+n] (and lambda per new token).

    With an EngramLM the LM side runs on a KV cache; a callable LM is re-run on the whole
    sequence each step. The N-gram side reads the whole history (cut at its last eos).
    """
    prompt_ids, total = check_prompt(prompt_ids, sampling.max_new_tokens, mix.lm.max_seq_len)
    B, T0 = prompt_ids.shape
    gen = torch.Generator().manual_seed(sampling.seed)
    model = mix.lm.model
    if model is not None:
        model.eval()
        cache = model.new_cache(B, total)
        out = mix.lm(prompt_ids.to(mix.lm.device), cache=cache)
    else:
        cache = None
        out = mix.lm(prompt_ids)
    seq = prompt_ids.cpu()
    lams: list[torch.Tensor] = []
    done = torch.zeros(B, dtype=torch.bool)
    for _ in range(sampling.max_new_tokens):
        logp, lam = mix.step(seq, out, last_only=True)
        logp, lam = logp[:, -1], lam[:, -1]
        lams.append(lam)
        if sampling.temperature == 0:
            nxt = logp.argmax(-1)
        else:
            probs = filter_logits(logp / sampling.temperature, sampling.top_k, sampling.top_p).softmax(-1)
            nxt = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        if eos_id is not None:
            done |= nxt == eos_id
            if bool(done.all()):
                break
        if model is not None:
            out = mix.lm(nxt[:, None].to(mix.lm.device), cache=cache)
        else:
            out = mix.lm(seq)
    if return_lambdas:
        return seq, (torch.stack(lams, dim=1) if lams else torch.zeros(B, 0))
    return seq


def score_ids(mix: NgramMixture, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-position diagnostics for ids [B,T]: log P_mix, log P_lm and lambda of each next token."""
    out = mix.lm(ids.to(mix.lm.device))
    logp, lam = mix.step(ids, out)
    return {"logp": logp, "lm_logp": torch.log_softmax(out.logits.float().cpu(), -1), "lambda": lam}

