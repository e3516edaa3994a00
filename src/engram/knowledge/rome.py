"""ROME (Meng et al. 2022): a fact written as a rank-one update of one MLP down-projection.

Shape legend
    D hidden size   F MLP inner size (the down-projection's input)   N prompts   T tokens   V vocab

In a Llama-style decoder layer the MLP ends in ``down_proj``: ``y = W k`` with ``W`` [D, F] and
``k`` [F] the gated inner activation. ROME reads ``W`` as a key -> value memory and writes one new
pair into it, keyed at the subject's last token:

1. **key** ``k*`` [F]: ``down_proj``'s input at the subject's last token of the fact's prompt,
   averaged over the prompt after a few short context prefixes (the model's own greedy
   continuations of five one-word starts, plus no prefix);
2. **value** ``v* = m + delta`` [D]: ``m`` is ``down_proj``'s output there (prompt without prefix),
   ``delta`` is optimised with Adam so that every prefixed prompt ends in the new answer, with a
   KL term that keeps the next-token distribution after "{subject} is a" (the subject's
   "essence") as it was, a weight decay ``||delta||^2 / ||m||^2`` and ``||delta|| <= clamp ||m||``;
3. **update**: ``W' = W + (v* - W k*) (C^-1 k*)^T / (k*^T C^-1 k*)`` with ``C = E[k k^T]``, the
   keys' second moment on general text (:func:`key_covariance`). Then ``W' k* = v*`` exactly,
   and a key ``k`` with ``k^T C^-1 k* = 0`` (orthogonal to ``k*`` in the ``C^-1`` metric) maps
   as before: the edit moves the keys the text rarely uses the least.

Edits are applied one after another (:class:`RomeEditor`), each computed on the model as the
earlier ones left it. An edit is stored as its two vectors, ``(D + F)`` float32 numbers; reverting
restores the weight as it was before the edit bit for bit (from the weight kept before the first
edit, re-applying the earlier edits with the same float operations).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from engram.errors import EngramError
from engram.knowledge.facts import Fact
from engram.knowledge.scoring import Case, encode_case, pad_batch
from engram.knowledge.templates import verbatim
from engram.retrofit.model import decoder_layers

CONTEXT_STARTS = ("The", "Therefore", "Because", "I", "You")  # as in the ROME paper's code


class RomeError(EngramError):
    """A ROME setting or fact that cannot be used; the message names the value and the fix."""


@dataclass(frozen=True)
class RomeConfig:
    layer: int = 4  # decoder layer whose MLP down-projection is edited (choose on dev)
    steps: int = 20  # Adam steps on delta
    lr: float = 0.5
    weight_decay: float = 0.5  # on ||delta||^2 / ||m||^2
    clamp: float = 4.0  # ||delta|| <= clamp * ||m||
    kl_weight: float = 0.0625  # the essence KL; 0 turns it off
    stop_nll: float = 0.05  # stop once the new answer's mean NLL is below this
    prefix_tokens: int = 10  # length of each generated context prefix; 0: the bare prompt only
    cov_windows: int = 64  # general-text windows for the key covariance
    cov_window_len: int = 128
    ridge: float = 1e-3  # C + ridge * mean(diag C) * I, so that C is well conditioned


@dataclass
class RomeEdit:
    """One applied edit: ``W += outer(right, left)`` on ``layer``'s down-projection."""

    fact: Fact
    layer: int
    right: torch.Tensor  # [D] (v* - W k*) / (k*^T C^-1 k*)
    left: torch.Tensor  # [F] C^-1 k*
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return (self.right.numel() + self.left.numel()) * 4


def hf_model(model: nn.Module) -> nn.Module:
    """The Hugging Face causal LM inside ``model`` (a retrofit's ``base``, or ``model`` itself)."""
    base = getattr(model, "base", None)
    return base if isinstance(base, nn.Module) else model


def down_proj(model: nn.Module, layer: int) -> nn.Linear:
    """Decoder layer ``layer``'s MLP down-projection (Llama, Mistral, Qwen2/3)."""
    layers = decoder_layers(hf_model(model))
    if not 0 <= layer < len(layers):
        raise RomeError(f"layer={layer} out of range; the model has decoder layers 0..{len(layers) - 1}")
    proj = getattr(getattr(layers[layer], "mlp", None), "down_proj", None)
    if not isinstance(proj, nn.Linear) or proj.bias is not None:
        raise RomeError(f"decoder layer {layer} has no bias-free mlp.down_proj Linear; ROME here supports "
                        f"Llama-style MLPs only")
    return proj


class _Stop(EngramError):
    """Ends a forward pass once the key is read (never leaves this module)."""


@contextlib.contextmanager
def _hook(module: nn.Module, fn: Callable, pre: bool = False) -> Iterator[None]:
    h = module.register_forward_pre_hook(fn) if pre else module.register_forward_hook(fn)
    try:
        yield
    finally:
        h.remove()


@torch.no_grad()
def key_covariance(model: nn.Module, layer: int, windows: torch.Tensor) -> torch.Tensor:
    """``C = E[k k^T]`` [F, F] (float64) over every position of ``windows`` [n, L] token ids.

    Only the layers up to ``layer`` run: the forward stops once the key is read."""
    proj = down_proj(model, layer)
    total = torch.zeros(proj.in_features, proj.in_features, dtype=torch.float64)
    count = 0

    def grab(_m: nn.Module, args: tuple) -> None:
        nonlocal total, count
        k = args[0].reshape(-1, args[0].shape[-1]).double()  # [n*L, F]
        total += k.T @ k
        count += k.shape[0]
        raise _Stop

    was = model.training
    model.eval()
    try:
        with _hook(proj, grab, pre=True):
            for w in windows:
                try:
                    model(w[None])
                except _Stop:
                    pass
    finally:
        model.train(was)
    if not count:
        raise RomeError("no text to estimate the key covariance on; give at least one window")
    return total / count


def rank_one_update(weight: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cov: torch.Tensor,
                    ridge: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(right [D], left [F]) with ``weight + outer(right, left)`` mapping ``key`` to ``value``.

    ``left = C^-1 key``, ``right = (value - weight key) / (key . left)``; computed in float64."""
    c = cov.double()
    if ridge:
        c = c + ridge * c.diagonal().mean() * torch.eye(c.shape[0], dtype=c.dtype)
    k = key.double()
    left = torch.linalg.solve(c, k)
    denom = float(k @ left)
    if not denom > 0:
        raise RomeError("the key covariance is not positive definite at this key; raise ridge")
    right = (value.double() - weight.double() @ k) / denom
    return right.float(), left.float()


def _apply(weight: torch.Tensor, edit: RomeEdit) -> None:
    weight.add_(torch.outer(edit.right, edit.left))


class RomeEditor:
    """ROME edits of ``model``, applied one after another and taken back last first.

    ``model(ids).logits`` must give [B, T, V] (a Hugging Face causal LM or a retrofit); the edited
    weights live in its Hugging Face base. ``tokenizer`` is a ``tokenizers.Tokenizer``; the
    covariance is estimated on ``cov_windows`` (token ids [n, L]) once per layer, or given."""

    def __init__(self, model: nn.Module, tokenizer: Any, cfg: RomeConfig = RomeConfig(),
                 cov_windows: Optional[torch.Tensor] = None, covariance: Optional[torch.Tensor] = None) -> None:
        self.model, self.tok, self.cfg = model, tokenizer, cfg
        self.proj = down_proj(model, cfg.layer)
        if covariance is None:
            if cov_windows is None:
                raise RomeError("RomeEditor needs general text for the key covariance: pass cov_windows "
                                "(token ids [n, L]) or a covariance")
            covariance = key_covariance(model, cfg.layer, cov_windows)
        if covariance.shape != (self.proj.in_features,) * 2:
            raise RomeError(f"covariance of shape {tuple(covariance.shape)}; layer {cfg.layer}'s keys need "
                            f"{(self.proj.in_features,) * 2}")
        self.covariance = covariance
        self.edits: list[RomeEdit] = []
        self._original: Optional[torch.Tensor] = None
        self._prefixes: Optional[list[str]] = None

    # ------------------------------------------------------------------ prompts
    def prefixes(self) -> list[str]:
        """"" and the model's greedy continuations of :data:`CONTEXT_STARTS` (made once, unedited)."""
        if self._prefixes is None:
            out = [""]
            if self.cfg.prefix_tokens > 0:
                for start in CONTEXT_STARTS:
                    ids = self.tok.encode(start, add_special_tokens=False).ids
                    with torch.no_grad():
                        for _ in range(self.cfg.prefix_tokens):
                            ids.append(int(self.model(torch.tensor([ids])).logits[0, -1].argmax()))
                    text = self.tok.decode(ids).replace("\n", " ").strip()
                    out.append(text + ". ")
            self._prefixes = out
        return self._prefixes

    def _case(self, prompt: str, answer: str, subject: str) -> tuple[Case, int]:
        c = encode_case(self.tok, prompt, answer, subject=subject)
        if c is None or not c.subject_pos:
            raise RomeError(f"cannot place {subject!r} / {answer!r} in the prompt {prompt!r}: the subject must "
                            f"occur in it and the answer start on a token boundary")
        return c, max(c.subject_pos)

    # ------------------------------------------------------------------ one edit
    def compute(self, fact: Fact, prompt: Optional[str] = None) -> RomeEdit:
        """The edit that writes ``fact`` (asked with ``prompt``, default the relation's first
        training statement up to the answer), computed on the model as it is now."""
        if prompt is None:
            prompt = verbatim(fact.relation).render(fact.subject, fact.answer)[0]
        cfg, model, proj = self.cfg, self.model, self.proj
        rewrite = [self._case(p + prompt, fact.answer, fact.subject) for p in self.prefixes()]
        essence = [self._case(f"{fact.subject} is a", "x", fact.subject)] if cfg.kl_weight > 0 else []
        cases = [c for c, _ in rewrite + essence]
        ids, ans = pad_batch(cases, 0)
        rows = torch.arange(len(cases))
        subj = torch.tensor([p for _, p in rewrite + essence])
        delta = torch.zeros(proj.out_features, requires_grad=True)

        # key k* and m: down_proj's input and output at the subject's last token, unedited
        seen: dict[str, torch.Tensor] = {}

        def read(_m: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            seen["k"], seen["m"] = args[0][rows, subj].detach(), out[rows, subj].detach()
            return out

        was = model.training
        model.eval()
        try:
            with torch.no_grad(), _hook(proj, read):
                logits0 = model(ids).logits.float()
            key = seen["k"][:len(rewrite)].mean(0)  # [F]
            m = seen["m"][0]  # [D] the bare prompt's value
            ess_pos = torch.tensor([len(c.prompt_ids) - 1 for c, _ in essence], dtype=torch.long)
            ess_rows = torch.arange(len(rewrite), len(cases))
            before_ess = F.log_softmax(logits0[ess_rows, ess_pos], -1) if essence else None
            nll0 = self._nll(logits0, rewrite, ans)

            def add(_m: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
                out = out.clone()
                out[rows, subj] = out[rows, subj] + delta
                return out

            opt = torch.optim.Adam([delta], lr=cfg.lr)
            m_norm = float(m.norm())
            nll = nll0
            steps = 0
            with _hook(proj, add):
                for steps in range(1, cfg.steps + 1):
                    logits = model(ids).logits.float()
                    nll_t = self._nll(logits, rewrite, ans, grad=True)
                    loss = nll_t + cfg.weight_decay * delta.pow(2).sum() / max(m_norm ** 2, 1e-12)
                    if before_ess is not None:
                        now = F.log_softmax(logits[ess_rows, ess_pos], -1)
                        loss = loss + cfg.kl_weight * (before_ess.exp() * (before_ess - now)).sum(-1).mean()
                    nll = float(nll_t.detach())
                    if nll < cfg.stop_nll:
                        break
                    opt.zero_grad()
                    delta.grad, = torch.autograd.grad(loss, [delta])  # the model's own weights get no .grad
                    opt.step()
                    with torch.no_grad():  # ||delta|| <= clamp ||m||
                        limit = cfg.clamp * m_norm
                        if float(delta.norm()) > limit:
                            delta.mul_(limit / float(delta.norm()))
        finally:
            model.train(was)
        value = m + delta.detach()
        right, left = rank_one_update(proj.weight.detach(), key, value, self.covariance, cfg.ridge)
        return RomeEdit(fact, cfg.layer, right, left,
                        {"nll_before": nll0, "nll_optimised": nll, "steps": steps,
                         "delta_norm": float(delta.detach().norm()), "value_norm": m_norm, "prefixes": len(rewrite)})

    @staticmethod
    def _nll(logits: torch.Tensor, rewrite: Sequence[tuple[Case, int]], ans: torch.Tensor,
             grad: bool = False) -> Any:
        """Mean over the rewrite prompts of the answer tokens' mean NLL (a tensor when ``grad``)."""
        parts = []
        for i, (c, _) in enumerate(rewrite):
            lg = logits[i][ans[i]]
            parts.append(F.cross_entropy(lg, torch.tensor(c.answer_ids)))
        out = torch.stack(parts).mean()
        return out if grad else float(out)

    # ------------------------------------------------------------------ apply / revert
    @torch.no_grad()
    def apply(self, edit: RomeEdit) -> None:
        if edit.layer != self.cfg.layer:
            raise RomeError(f"an edit of layer {edit.layer} given to the editor of layer {self.cfg.layer}")
        if self._original is None:
            self._original = self.proj.weight.detach().clone()
        _apply(self.proj.weight.data, edit)
        self.edits.append(edit)

    def edit(self, fact: Fact, prompt: Optional[str] = None) -> RomeEdit:
        """Compute ``fact``'s edit on the model as it is now and apply it."""
        e = self.compute(fact, prompt)
        self.apply(e)
        return e

    @torch.no_grad()
    def revert(self, n: int = 1) -> None:
        """Take back the last ``n`` edits: the weight becomes bit for bit what it was before them."""
        if not 0 <= n <= len(self.edits):
            raise RomeError(f"cannot revert {n} edits; {len(self.edits)} are applied")
        if n == 0:
            return
        assert self._original is not None
        del self.edits[len(self.edits) - n:]
        w = self.proj.weight.data
        w.copy_(self._original)
        for e in self.edits:  # the same float operations in the same order as when applied
            _apply(w, e)

    def revert_all(self) -> None:
        self.revert(len(self.edits))
