"""Routing statistics of the historian expert: how often, and on which tokens, the router reads
the Engram memory (``engram.placement = "expert"``, ``engram.model.historian``).

Shape legend
    B batch   T positions   N = B*T tokens   K experts per token   E routed slots

Measured on the **test** half of the validation windows (``engram.science.evalsplit``, the
batches ``engram.science.sweep.dev_test_losses`` scores as test). For every token at every
historian layer the router's top-K is recomputed from the MoE's input (a forward hook; the
model's output is not changed):

- ``pick_rate``: share of tokens whose top-K holds the historian; a router that ignored content
  and spread load evenly would give ``uniform`` = K / E. ``ratio`` = pick_rate / uniform (the
  historian's share of top-K slots over the uniform 1 / E is the same ratio).
- ``weight``: mean router weight of the historian where it is picked (the weights of a token's
  K experts sum to ``routed_scaling_factor``).

Token classes (each token of the test windows is the last token of the N-grams the memory reads):

- word piece, from the byte-level BPE pieces: a piece *continues* a word when its text starts with
  a letter or digit and the previous piece's text ends with one. ``single`` (a one-piece word),
  ``first`` / ``middle`` / ``last`` piece of a multi-piece word (the next token, the target, says
  whether the word goes on), ``other`` (space, punctuation). The first position of a window has
  no previous piece and is left out of these classes.
- case: ``capitalised`` (a piece of a word that starts with an upper-case letter and does not
  follow a sentence end . ! ? or a line break: named-entity-like), ``sentence-initial
  capitalised``, ``lower-case word``; words that begin before the window are left out.
- frequency of the token in the training split: ``frequent`` (the most common ids, together half
  of the training tokens), ``mid`` (the next 40%), ``rare`` (the last 10%).

``expected_activated_per_token``: the account's activated count (an upper bound: K SwiGLU
experts per MoE layer and the historian's rows for every token) with, at each historian layer,
the measured pick rate: a pick swaps one SwiGLU expert for the historian's projection and rows.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from engram.config import TrainConfig
from engram.data import shards as data
from engram.fsutil import PathLike
from engram.science.evalsplit import dev_test_batches

FREQ_BANDS = (("frequent", 0.5), ("mid", 0.9), ("rare", 1.0))  # upper edges of cumulative train mass
_SENTENCE_END = (".", "!", "?", "\n")


def token_texts(tokenizer: Any, vocab_size: int) -> list[str]:
    """Each id's decoded text (byte-level pieces of a multi-byte character decode lossily)."""
    return [tokenizer.decode([i], skip_special_tokens=False) for i in range(vocab_size)]


def frequency_bands(train_tokens: np.ndarray, vocab_size: int) -> np.ndarray:
    """[V] int: the ``FREQ_BANDS`` index of every id, by its count in the training split."""
    counts = np.bincount(np.asarray(train_tokens, dtype=np.int64), minlength=vocab_size)[:vocab_size]
    order = np.argsort(-counts, kind="stable")
    before = (np.cumsum(counts[order]) - counts[order]) / max(1, counts.sum())  # train mass of commoner ids
    band_sorted = np.searchsorted([edge for _, edge in FREQ_BANDS[:-1]], before, side="right")
    band = np.empty(vocab_size, dtype=np.int64)
    band[order] = band_sorted
    return band


def _word_char(c: str) -> bool:
    return c.isalnum()


def token_classes(x: np.ndarray, y: np.ndarray, texts: list[str]) -> dict[str, np.ndarray]:
    """x, y [B,T] ids (inputs, next tokens) -> {class: [B,T] bool} (module docstring)."""
    B, T = x.shape
    starts_alnum = np.array([bool(t) and _word_char(t[0]) for t in texts])
    ends_alnum = np.array([bool(t) and _word_char(t[-1]) for t in texts])
    upper_first = np.array([bool(t) and t.lstrip()[:1].isupper() for t in texts])
    lead_text = np.array([bool(t.strip()) and _word_char(t.lstrip()[0]) for t in texts])  # a word starts here
    ends_sentence = np.array([t.rstrip(" ").endswith(_SENTENCE_END) for t in texts])
    cont = np.zeros((B, T), dtype=bool)  # x[:, t] continues the word of x[:, t-1]
    cont[:, 1:] = starts_alnum[x[:, 1:]] & ends_alnum[x[:, :-1]]
    next_cont = starts_alnum[y] & ends_alnum[x]
    known = np.ones((B, T), dtype=bool)
    known[:, 0] = False
    in_word = known & (cont | lead_text[x])
    word_start = in_word & ~cont
    out = {
        "single": word_start & ~next_cont,
        "first": word_start & next_cont,
        "middle": known & cont & next_cont,
        "last": known & cont & ~next_cont,
        "other": known & ~in_word,
    }
    # Case: walk each row, carrying the class of the current word's first piece.
    cap = np.zeros((B, T), dtype=bool)
    cap_initial = np.zeros((B, T), dtype=bool)
    lower = np.zeros((B, T), dtype=bool)
    for b in range(B):
        word_cls, after_end = None, False  # None: the word began before the window
        for t in range(1, T):
            tok = x[b, t]
            if word_start[b, t]:
                if not upper_first[tok]:
                    word_cls = "lower"
                else:
                    prev = x[b, t - 1]
                    initial = after_end or ends_sentence[prev] or texts[tok][:1] == "\n"
                    word_cls = "initial" if initial else "cap"
            elif not in_word[b, t]:
                word_cls = None
            if in_word[b, t] and word_cls is not None:
                {"cap": cap, "initial": cap_initial, "lower": lower}[word_cls][b, t] = True
            if not in_word[b, t]:
                after_end = ends_sentence[tok] or (after_end and not texts[tok].strip())
            else:
                after_end = False
    out.update({"capitalised": cap, "sentence-initial capitalised": cap_initial, "lower-case word": lower})
    return out


def _historian_moes(model) -> list[tuple[int, Any]]:
    return [(b.layer_id, b.ffn) for b in model.layers if getattr(b, "historian", None) is not None]


@torch.no_grad()
def historian_routing(model, data_dir: PathLike, tcfg: TrainConfig,
                      account: Optional[dict[str, Any]] = None) -> Optional[dict[str, Any]]:
    """Routing statistics of ``model``'s historian experts on the test windows (module docstring);
    None for a model without one."""
    moes = _historian_moes(model)
    if not moes:
        return None
    ds = data.load_dataset(data_dir)
    V = model.cfg.vocab_size
    texts = token_texts(ds.tokenizer, V)
    bands = frequency_bands(ds.train.tokens, V)
    picked: dict[int, list[torch.Tensor]] = {lid: [] for lid, _ in moes}
    weight: dict[int, list[torch.Tensor]] = {lid: [] for lid, _ in moes}
    current: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook_for(lid: int):
        def hook(moe, args, kwargs, out):
            x = args[0]
            idx, w = moe.route(x.reshape(-1, x.shape[-1]))  # [N,K]
            hit = idx == moe.historian_index
            current[lid] = (hit.any(-1), (w.float() * hit).sum(-1))
        return hook

    handles = [moe.register_forward_hook(hook_for(lid), with_kwargs=True) for lid, moe in moes]
    classes: dict[str, list[np.ndarray]] = {}
    was_training = model.training
    model.eval()
    try:
        for half, x, y in dev_test_batches(ds.val, tcfg):  # the sweep's test windows only
            if half != "test":
                continue
            model(x)
            for lid, (p, w) in current.items():
                picked[lid].append(p.reshape(x.shape))
                weight[lid].append(w.reshape(x.shape))
            xn, yn = x.numpy(), y.numpy()
            cls = token_classes(xn, yn, texts)
            for b, (name, _) in enumerate(FREQ_BANDS):
                cls[name] = bands[xn] == b
            for k, v in cls.items():
                classes.setdefault(k, []).append(v)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    masks = {k: np.concatenate(v) for k, v in classes.items()}
    K, E = model.cfg.num_experts_per_tok, model.cfg.n_routed_experts
    uniform = K / E

    def stats(p: np.ndarray, w: np.ndarray, mask: Optional[np.ndarray]) -> dict[str, Any]:
        if mask is not None:
            p, w = p[mask], w[mask]
        rate = float(p.mean()) if p.size else float("nan")
        return {"tokens": int(p.size), "pick_rate": rate, "ratio": rate / uniform,
                "weight": float(w[p].mean()) if p.any() else float("nan")}

    per_layer = {}
    all_p, all_w = [], []
    for lid, moe in moes:
        p, w = torch.cat(picked[lid]).numpy(), torch.cat(weight[lid]).numpy()
        all_p.append(p)
        all_w.append(w)
        bias = moe.expert_bias.float()
        others = torch.cat([bias[:moe.historian_index], bias[moe.historian_index + 1:]])
        per_layer[str(lid)] = {"overall": stats(p, w, None),
                               "by_class": {k: stats(p, w, m) for k, m in masks.items()},
                               "expert_bias": float(bias[moe.historian_index]),
                               "expert_bias_others_mean": float(others.mean())}
    p_all, w_all = np.concatenate(all_p), np.concatenate(all_w)
    masks_all = {k: np.concatenate([m] * len(moes)) for k, m in masks.items()}
    out: dict[str, Any] = {"split": "test", "top_k": K, "n_routed_experts": E, "uniform": uniform,
                           "overall": stats(p_all, w_all, None),
                           "by_class": {k: stats(p_all, w_all, m) for k, m in masks_all.items()},
                           "per_layer": per_layer}
    if account is not None:
        out["expected_activated_per_token"] = expected_activated(model, account, per_layer)
    return out


def expected_activated(model, account: dict[str, Any], per_layer: dict[str, Any]) -> float:
    """The account's activated count with each historian layer's measured pick rate."""
    act = float(account["activated_per_token"])
    for lid, moe in _historian_moes(model):
        rate = per_layer[str(lid)]["overall"]["pick_rate"]
        swiglu = sum(p.numel() for p in moe.experts[0].parameters())
        h = moe.historian
        proj = sum(p.numel() for p in h.value_proj.parameters())
        rows = h.cfg.num_heads_total * h.cfg.head_dim
        # upper bound: K SwiGLU + rows always; a pick swaps one SwiGLU for proj + rows
        act -= rows + rate * (swiglu - proj - rows)
    return act
