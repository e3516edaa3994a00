"""Speculative decoding: memory drafts the next tokens, the model verifies them in one pass.

Shape legend
    T0 prompt length   T new positions of one call   K draft length   V vocab

The loop works against a small model protocol, ``ScoringTarget``:

    begin(max_len, max_draft)  start an empty sequence with room for max_len positions
    score(ids)  -> [T,V]       feed T new ids after everything fed so far; row i is the
                               next-token logits (or log-probabilities) after new id i
    truncate(n)                forget every position from n on (only positions of the
                               latest ``score`` call, at most ``max_draft`` of them)

``EngramTarget`` implements it for any ``LanguageModel`` (``EngramLM``, or ``RetrofitLM``: the
KV cache, conv state and hash history rolled back exactly by ``truncate_cache``),
``MixtureTarget`` for the N-gram mixture (the verified distribution is the mixture). A model
outside the library plugs in with its own three-method adapter.

One step: the token x chosen last (not yet fed) and a draft d1..dk are scored in one call
[x, d1..dk] -> k+1 rows. Row i is the model's distribution for the position of d(i+1):

- greedy: d(i+1) is accepted while it equals the argmax; the first disagreement is replaced by
  the argmax itself. Same rule as ``generate`` (``argmax``, first index on ties), so the output
  is the same token for token as long as batched and one-at-a-time scoring agree on every argmax
  (they differ only in the last bits of the logits; docs/speculative.md).
- sampling: the standard speculative-sampling rule for a deterministic draft (q = one-hot):
  accept d with probability p(d); on rejection sample from p with d removed, renormalised.
  Every emitted token is then distributed exactly as p, whatever the draft.
If all k are accepted, row k gives one more token for free. Rejected positions are truncated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Protocol, Sequence

import torch
from tqdm.auto import tqdm

from engram.config import DraftConfig, SamplingConfig
from engram.errors import EngramError
from engram.model.generation import check_prompt, filter_logits
from engram.model.protocol import LanguageModel
from engram.ngram.mixture import NgramMixture

# a generation at least this long shows a progress bar (on a terminal)
PROGRESS_MIN_TOKENS = 256


class ScoringTarget(Protocol):
    """What the speculative loop needs from a model (see the module docstring)."""

    vocab_size: int
    max_seq_len: Optional[int]

    def begin(self, max_len: int, max_draft: int) -> None: ...

    def score(self, ids: Sequence[int]) -> torch.Tensor: ...

    def truncate(self, n: int) -> None: ...


class Drafter(Protocol):
    """What the loop needs from a drafter (``NgramDrafter``): up to k tokens continuing ``seq``,
    a deterministic function of it (the sampling rule relies on that)."""

    cfg: DraftConfig  # cfg.max_len: the longest draft, the rollback the target must allow

    def propose(self, seq: Sequence[int], k: Optional[int] = None) -> list[int]: ...


class EngramTarget:
    """A ``LanguageModel`` (``EngramLM``, ``RetrofitLM``) on a KV cache that can drop its newest
    positions again."""

    def __init__(self, model: LanguageModel):
        self.model = model
        self.vocab_size, self.max_seq_len = model.cfg.vocab_size, model.cfg.max_seq_len
        self.device = model.embed.weight.device
        self.cache = None
        self.ids: list[int] = []

    def begin(self, max_len: int, max_draft: int) -> None:
        self.model.eval()
        self.cache = self.model.new_cache(1, max_len, rollback=max_draft)
        self.ids = []

    @torch.no_grad()
    def score(self, ids: Sequence[int]) -> torch.Tensor:
        x = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        self.ids.extend(int(i) for i in ids)
        return self.model(x, cache=self.cache).logits[0].float()

    def truncate(self, n: int) -> None:
        self.model.truncate_cache(self.cache, n, torch.tensor([self.ids[:n]], device=self.device))
        del self.ids[n:]


class MixtureTarget:
    """The N-gram mixture: rows are log P_mix. An EngramLM runs on a rollback-able cache; a
    callable LM is re-run on the whole sequence at each call."""

    def __init__(self, mix: NgramMixture):
        self.mix = mix
        self.vocab_size, self.max_seq_len = mix.lm.vocab_size, mix.lm.max_seq_len
        self.lm_target = EngramTarget(mix.lm.model) if mix.lm.model is not None else None
        self.ids: list[int] = []

    def begin(self, max_len: int, max_draft: int) -> None:
        if self.lm_target is not None:
            self.lm_target.begin(max_len, max_draft)
        self.ids = []

    @torch.no_grad()
    def score(self, ids: Sequence[int]) -> torch.Tensor:
        self.ids.extend(int(i) for i in ids)
        seq = torch.tensor([self.ids], dtype=torch.long)
        if self.lm_target is not None:
            new = torch.tensor([list(ids)], dtype=torch.long, device=self.mix.lm.device)
            out = self.mix.lm(new, cache=self.lm_target.cache)
            self.lm_target.ids.extend(int(i) for i in ids)
        else:
            out = self.mix.lm(seq)
        return self.mix.step(seq, out, last_n=len(ids))[0][0]

    def truncate(self, n: int) -> None:
        if self.lm_target is not None:
            self.lm_target.truncate(n)
        del self.ids[n:]


@dataclass
class SpeculativeResult:
    """The generated ids and how the drafts fared."""

    ids: torch.Tensor  # [1, T0 + n]: prompt and new tokens
    new_tokens: int = 0
    forwards: int = 0  # scoring calls, the prompt's included (plain decoding: one per new token)
    drafted: int = 0  # draft tokens scored
    accepted: int = 0  # draft tokens accepted
    accepted_lengths: list[int] = field(default_factory=list)  # per step with a non-empty draft

    @property
    def acceptance(self) -> float:
        """Accepted / drafted tokens (0 when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted(self) -> float:
        """Mean accepted draft length over the steps that had a draft."""
        return sum(self.accepted_lengths) / len(self.accepted_lengths) if self.accepted_lengths else 0.0

    def stats(self) -> dict:
        return {"new_tokens": self.new_tokens, "forwards": self.forwards, "drafted": self.drafted,
                "accepted": self.accepted, "draft_steps": len(self.accepted_lengths), "acceptance": self.acceptance,
                "mean_accepted": self.mean_accepted,
                "tokens_per_forward": self.new_tokens / max(self.forwards, 1)}


class DraftLength:
    """How many tokens to draft at each step (``DraftConfig.adaptive``): a draft that keeps failing
    should cost next to nothing. Starts at K; after a draft with a rejection, the accepted length
    + 1 (at least 1); after a fully accepted one, twice the last (at most K). A draft rejected at
    its first token also skips drafting for the next 1, 2, 4, ... steps (at most ``max_skip``),
    the run reset by any accepted token. Depends only on the outcomes so far, so every draft is
    still fixed before the step that verifies it (the sampling rule's condition)."""

    def __init__(self, K: int, adaptive: bool = True, max_skip: int = 8):
        self.K, self.adaptive, self.max_skip = K, adaptive, max_skip
        self.k, self.skip, self.misses = K, 0, 0

    def next(self) -> int:
        """The draft length for this step (0: draft nothing)."""
        if self.skip:
            self.skip -= 1
            return 0
        return self.k

    def update(self, drafted: int, accepted: int) -> None:
        if not self.adaptive or drafted == 0:
            return
        if accepted == drafted:
            self.k, self.misses = min(self.K, 2 * self.k), 0
            return
        self.k = max(1, accepted + 1)
        if accepted:
            self.misses = 0
            return
        self.skip = min(self.max_skip, 1 << self.misses) if self.max_skip else 0
        self.misses += 1


class _Chooser:
    """The sampling rule shared by plain and verified positions (as in ``generate``)."""

    def __init__(self, sampling: SamplingConfig):
        self.s = sampling
        self.gen = torch.Generator().manual_seed(sampling.seed)

    def probs(self, logits: torch.Tensor) -> torch.Tensor:  # [V] -> [V]
        s = self.s
        return filter_logits(logits[None].cpu() / s.temperature, s.top_k, s.top_p).softmax(-1)[0]

    def choose(self, logits: torch.Tensor) -> int:
        if self.s.temperature == 0:
            return int(logits.argmax())
        return int(torch.multinomial(self.probs(logits), 1, generator=self.gen))

    def verify(self, logits: torch.Tensor, draft: int) -> tuple[bool, int]:
        """(accepted, token): the draft token, or its replacement when rejected."""
        if self.s.temperature == 0:
            best = int(logits.argmax())
            return best == draft, best
        p = self.probs(logits)
        if float(torch.rand((), generator=self.gen)) < float(p[draft]):
            return True, draft
        residual = p.clone()
        residual[draft] = 0.0  # (p - q)+ for q = one-hot(draft); p[draft] < 1 here
        return False, int(torch.multinomial(residual / residual.sum(), 1, generator=self.gen))


@torch.no_grad()
def generate_speculative(target: ScoringTarget, drafter: Optional[Drafter], prompt_ids: torch.Tensor,
                         sampling: SamplingConfig, eos_id: Optional[int] = None,
                         progress: Optional[bool] = None) -> SpeculativeResult:
    """prompt_ids [T0] or [1,T0] -> SpeculativeResult (ids [1, T0 + n], draft statistics).

    ``drafter`` None drafts nothing: one token per forward, the same loop (the baseline that
    shares the verification path). ``progress`` None: a bar for long generations on a terminal.
    """
    prompt, total = check_prompt(prompt_ids.cpu(), sampling.max_new_tokens, target.max_seq_len)
    if prompt.shape[0] != 1:
        raise EngramError(f"speculative decoding takes one prompt at a time, got a batch of {prompt.shape[0]}; "
                          "generate the prompts one by one")
    seq = [int(t) for t in prompt[0]]
    res = SpeculativeResult(ids=prompt)
    max_new = sampling.max_new_tokens
    if max_new == 0:
        return res
    K = drafter.cfg.max_len if drafter is not None else 0
    length = DraftLength(K, drafter.cfg.adaptive, drafter.cfg.max_skip) if drafter is not None else None
    chooser = _Chooser(sampling)
    target.begin(total, K)
    x = chooser.choose(target.score(seq)[-1])  # the prompt in one call
    res.forwards = 1
    seq.append(x)
    show = (max_new >= PROGRESS_MIN_TOKENS) if progress is None else progress
    bar = tqdm(total=max_new, desc="generate", unit="tok", disable=None if show else True, leave=False)
    bar.update(1)
    new, done = 1, x == eos_id
    while new < max_new and not done:
        k = min(length.next(), max_new - new - 1) if length is not None else 0  # never past the budget
        draft = drafter.propose(seq, k) if k > 0 else []
        scored = len(seq) - 1  # positions the target holds before this call (x is not fed yet)
        rows = target.score([x] + draft)  # [1+k, V]
        res.forwards += 1
        n_acc = 0
        for i, d in enumerate(draft):
            ok, tok = chooser.verify(rows[i], d)
            if not ok:
                x = tok
                break
            seq.append(d)
            n_acc += 1
            if d == eos_id:
                done = True
                break
        else:
            x = chooser.choose(rows[len(draft)])  # every draft token accepted: one more for free
        if draft:
            length.update(len(draft), n_acc)
            res.drafted += len(draft)
            res.accepted += n_acc
            res.accepted_lengths.append(n_acc)
        if n_acc < len(draft):
            target.truncate(scored + 1 + n_acc)  # keep x and the accepted prefix
        if not done:
            seq.append(x)
            done = x == eos_id
        bar.update(len(seq) - prompt.shape[1] - new)
        new = len(seq) - prompt.shape[1]
    bar.close()
    res.ids = torch.tensor([seq], dtype=torch.long)
    res.new_tokens = new
    return res
