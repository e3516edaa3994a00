"""Corpus-level views of Engram: gate statistics, Zipf statistics of table accesses, ablation.

``gate_statistics``
    Mean gate per Engram layer and branch over categories of text: fact sentences; only the
    entity tokens in them (subject and answer spans); only the first / last token of subject
    names split into 2+ tokens, and of any word split into 2+ tokens in fact and narrative
    text (the paper's gates peak at the *end* of stereotyped spans); narrative lines
    (Shakespeare, Bible); the fact sentences with their words, or their very tokens,
    shuffled (same unigram content, broken n-grams); uniformly random token ids, and (given the
    training unigram counts) ids drawn from the unigram distribution. Every
    sample starts after an eos token (a document boundary, as in training); that eos position
    is not counted.

``token_matched_contrast``
    The gate of a token id in one category minus that same id's gate in another, averaged over
    ids: the context's effect with the token's own gate level held fixed.

``memory_swap_contrast``
    The gate each position gets with the memory vector it retrieved, minus the gate the same
    position (same hidden state, hence same token and left context) gets with the memory vector
    retrieved at another, randomly chosen position of the same category. It isolates the part
    of the gate that reads the memory: does the key recognise the N-gram memory that belongs to
    this context better than someone else's?

``facts_vs_random``
    One verdict row per layer, branch, random-token control and measure, answering "are gates
    higher on fact sentences than on random-token text?" three ways: raw means, token-matched,
    and the memory swap of facts minus that of the control. "higher" / "lower" needs the
    difference to exceed twice its standard error; otherwise "no difference".

``gate_by_frequency``
    Mean gate binned by how often the n-gram ending at each position occurred in the training
    split: does the model reach for memory more on stereotyped (frequent) n-grams?

``zipf_statistics``
    Hash every position of a shard and count (a) distinct n-grams per order and (b) accesses per
    table row per layer and order. Rank-frequency curves, the Zipf exponent (fitted as
    ``engram table stats`` fits it: :func:`engram.tables.access.zipf_exponent`), and the share
    of accesses that the most-accessed k% of rows receive. A shard is hashed in chunks; each
    chunk starts from pad history, which touches at most ``max_ngram_size - 1`` positions per
    chunk.

``ablation``
    Loss and next-token accuracy per category of held-out text with every Engram layer on, then
    with all of them zeroed (``model(ids, ablate_engram=True)``). Two "retained" fractions, as in the
    paper's Fig. 6 (there: ablated score / full score on benchmarks):

        retained_accuracy = acc_ablated / acc_full
        retained_loss     = (U - L_ablated) / (U - L_full)

    where ``U`` is the category's cross-entropy under the training split's unigram distribution
    (a model with no context). ``retained_loss`` is the share of the full model's improvement
    over that context-free baseline which survives without Engram: 1 = Engram unused, 0 = as bad
    as unigram, below 0 = worse than unigram.
"""

from __future__ import annotations

import math
import random
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from engram.data.corpus import Document, Fact, builtin_documents, fact_records
from engram.data.tokenizer import special_ids
from engram.errors import EngramError
from engram.fsutil import PathLike
from engram.model.lm import EngramLM
from engram.tables.access import ZIPF_EXPONENT_DEFINITION, row_access_counts, zipf_exponent

NARRATIVE_SOURCES = ("shakespeare", "bible")
FACT_SOURCES = ("countries", "cities")


class AnalysisError(EngramError):
    """Inputs an analysis cannot use; the message names the value and the fix."""


def _need_engram(model: EngramLM) -> None:
    if not model.engram_layers:
        raise AnalysisError("the model has no Engram layers; analyse a run trained with an "
                            "engram-* preset")


# ----------------------------------------------------------------------------- samples
@dataclass(frozen=True)
class Sample:
    """Token ids and which of them count (``mask``); ids[0] is usually the eos boundary."""

    ids: tuple[int, ...]
    mask: tuple[bool, ...]

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.mask):
            raise AnalysisError(f"Sample has {len(self.ids)} ids but {len(self.mask)} mask entries; "
                                f"give one mask flag per id")
        if not self.ids:
            raise AnalysisError("Sample has no ids; skip empty texts")


def _span_tokens(offsets: Sequence[tuple[int, int]], span: tuple[int, int]) -> list[int]:
    """Indices of the tokens overlapping the character span [start, end)."""
    s, e = span
    return [i for i, (a, b) in enumerate(offsets) if a < e and s < b]


def _text_sample(tok: Tokenizer, eos: int, text: str,
                 spans: Optional[Sequence[tuple[int, int]]] = None, part: str = "all") -> Sample:
    """eos + tokens of ``text``. With ``spans`` only tokens of those char spans count:
    ``part`` = "all" of them, or only the "first" / "last" token of spans of 2+ tokens."""
    enc = tok.encode(text, add_special_tokens=False)
    if spans is None:
        mask = [True] * len(enc.ids)
    else:
        mask = [False] * len(enc.ids)
        for span in spans:
            idx = _span_tokens(enc.offsets, span)
            keep = idx if part == "all" else ([] if len(idx) < 2 else [idx[0] if part == "first" else idx[-1]])
            for i in keep:
                mask[i] = True
    return Sample((eos, *enc.ids), (False, *mask))


def _facts_sample(facts: Sequence[Fact], n: int, seed: int) -> list[Fact]:
    rng = random.Random(seed)
    facts = list(facts)
    return rng.sample(facts, min(n, len(facts)))


def gate_categories(tok: Tokenizer, n: int = 300, seed: int = 0,
                    facts: Optional[Sequence[Fact]] = None,
                    narrative: Optional[Sequence[str]] = None,
                    unigram: Optional[np.ndarray] = None) -> dict[str, list[Sample]]:
    """The default categories of :func:`gate_statistics` (see the module docstring).

    ``unigram`` (token counts or probabilities, [V]) adds "unigram random tokens": ids drawn
    independently from that distribution, so common and rare tokens appear at their natural
    rates (uniform ids are nearly all rare word pieces).
    """
    if n < 1:
        raise AnalysisError(f"n={n} must be >= 1 samples per category")
    _, eos = special_ids(tok)
    facts = _facts_sample(facts if facts is not None else fact_records(), n, seed)
    if narrative is None:
        narrative = narrative_lines(n, seed)
    rng = random.Random(seed + 1)
    cats: dict[str, list[Sample]] = {
        "fact sentences": [], "fact entities": [], "name first tokens": [],
        "name last tokens": [], "narrative": [], "word first pieces": [], "word last pieces": [],
        "shuffled fact words": [], "shuffled fact tokens": [], "random tokens": []}
    vocab = tok.get_vocab_size()
    specials = set(special_ids(tok))
    for f in facts:
        s = f.sentence
        subj = s.find(f.subject)
        spans = [(f.answer_start, f.answer_start + len(f.answer))]
        if subj >= 0:
            spans.append((subj, subj + len(f.subject)))
        whole = _text_sample(tok, eos, s)
        cats["fact sentences"].append(whole)
        cats["fact entities"].append(_text_sample(tok, eos, s, spans))
        if subj >= 0:  # the subject is a name (country, city); answers are often numbers
            name = [(subj, subj + len(f.subject))]
            cats["name first tokens"].append(_text_sample(tok, eos, s, name, part="first"))
            cats["name last tokens"].append(_text_sample(tok, eos, s, name, part="last"))
        words = s.split()
        rng.shuffle(words)
        cats["shuffled fact words"].append(_text_sample(tok, eos, " ".join(words)))
        perm = list(whole.ids[1:])  # exactly the sentence's tokens, in random order
        rng.shuffle(perm)
        cats["shuffled fact tokens"].append(Sample((eos, *perm), whole.mask))
        k = len(whole.ids) - 1  # same length as the sentence, ids uniform over the vocabulary
        ids = []
        while len(ids) < k:
            i = rng.randrange(vocab)
            if i not in specials:
                ids.append(i)
        cats["random tokens"].append(Sample((eos, *ids), (False,) + (True,) * k))
    if unigram is not None:
        p = np.asarray(unigram, dtype=np.float64).copy()
        if p.shape != (vocab,) or (p < 0).any():
            raise AnalysisError(f"unigram has shape {p.shape} (or negative entries); give {vocab} "
                                f"non-negative counts, one per token id")
        p[list(specials)] = 0.0
        if p.sum() <= 0:
            raise AnalysisError("unigram has no mass outside the special tokens")
        draw = np.random.default_rng(seed + 2)
        cats["unigram random tokens"] = [
            Sample((eos, *map(int, draw.choice(vocab, size=len(w.ids) - 1, p=p / p.sum()))),
                   (False,) + (True,) * (len(w.ids) - 1))
            for w in cats["fact sentences"]]
    cats["narrative"] = [_text_sample(tok, eos, line) for line in narrative]
    for text in [f.sentence for f in facts] + list(narrative):  # words split into 2+ tokens
        words = [m.span() for m in _WORD.finditer(text)]
        cats["word first pieces"].append(_text_sample(tok, eos, text, words, part="first"))
        cats["word last pieces"].append(_text_sample(tok, eos, text, words, part="last"))
    return cats


_WORD = re.compile(r"[^\W\d_]+")  # a run of letters


def narrative_lines(n: int, seed: int = 0, min_chars: int = 30, max_chars: int = 160) -> list[str]:
    """``n`` lines from Shakespeare and the Bible, half each, of fact-sentence length."""
    docs = builtin_documents(NARRATIVE_SOURCES)
    out = []
    for source in NARRATIVE_SOURCES:
        lines = [ln.strip() for d in docs if d.source == source for ln in d.text.splitlines()
                 if min_chars <= len(ln.strip()) <= max_chars]
        k = n // 2 if source == NARRATIVE_SOURCES[0] else n - n // 2
        out += random.Random(seed).sample(lines, min(k, len(lines)))
    return out


# ----------------------------------------------------------------------------- gates
def _batches(samples: Sequence[Sample], batch_size: int) -> Iterable[list[int]]:
    """Indices of samples of similar length together (little padding)."""
    order = sorted(range(len(samples)), key=lambda i: len(samples[i].ids))
    for b in range(0, len(order), batch_size):
        yield order[b:b + batch_size]


@contextmanager
def _read_only_pass(model: EngramLM) -> Iterator[None]:
    """No autograd and eval mode for passes that only read gates; the mode is restored
    afterwards, also on error."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _padded_batches(model: EngramLM, samples: Sequence[Sample], pad_id: int, batch_size: int
                    ) -> Iterable[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """(sample indices, ids [b, T], counted-position mask [b, T]) per batch, right-padded and
    cut at ``max_seq_len``; the model is causal, so padding after a sample cannot change it."""
    cap = model.cfg.max_seq_len
    for batch in _batches(samples, batch_size):
        T = min(cap, max(len(samples[j].ids) for j in batch))
        x = torch.full((len(batch), T), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), T), dtype=torch.bool)
        for i, j in enumerate(batch):
            k = min(T, len(samples[j].ids))
            x[i, :k] = torch.tensor(samples[j].ids[:k])
            mask[i, :k] = torch.tensor(samples[j].mask[:k])
        yield batch, x, mask


def sample_gates(model: EngramLM, samples: Sequence[Sample], pad_id: int = 0,
                 batch_size: int = 32) -> dict[int, np.ndarray]:
    """Gates of the counted positions of all samples, in sample order: {layer_id: [N, M]}.

    Samples are right-padded into batches; the model is causal, so padding after a sample
    cannot change its gates. Positions past ``max_seq_len`` are not evaluated.
    """
    _need_engram(model)
    layers = model.engram_layers
    per_sample: dict[int, list[Optional[np.ndarray]]] = {l.layer_id: [None] * len(samples) for l in layers}
    with _read_only_pass(model):
        for batch, x, mask in _padded_batches(model, samples, pad_id, batch_size):
            gates = model(x.to(model.embed.weight.device), output_gates=True).gates
            for l in layers:
                g = gates[l.layer_id].cpu()
                for i, j in enumerate(batch):
                    per_sample[l.layer_id][j] = g[i][mask[i]].numpy()
    M = model.cfg.hc_mult
    return {lid: (np.concatenate(v) if v else np.zeros((0, M))) for lid, v in per_sample.items()}


def gate_statistics(model: EngramLM, categories: dict[str, list[Sample]], pad_id: int = 0
                    ) -> list[dict[str, Any]]:
    """Rows {category, layer_id, branch, count, mean, std, sem, median}."""
    rows = []
    for name, samples in categories.items():
        for lid, g in sample_gates(model, samples, pad_id).items():
            for m in range(g.shape[1]):
                v = g[:, m].astype(np.float64)
                n = int(v.size)
                std = float(v.std(ddof=1)) if n > 1 else 0.0
                rows.append({"category": name, "layer_id": lid, "branch": m, "count": n,
                             "samples": len(samples),
                             "mean": float(v.mean()) if n else float("nan"), "std": std,
                             "sem": std / math.sqrt(n) if n else float("nan"),
                             "median": float(np.median(v)) if n else float("nan")})
    return rows


def _masked_ids(samples: Sequence[Sample], cap: int) -> np.ndarray:
    """Token ids of the counted positions, in the order :func:`sample_gates` returns gates."""
    out = [np.asarray(s.ids[:cap], dtype=np.int64)[np.asarray(s.mask[:cap], dtype=bool)] for s in samples]
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def token_matched_contrast(model: EngramLM, a: Sequence[Sample], b: Sequence[Sample],
                           min_count: int = 1) -> list[dict[str, Any]]:
    """Mean gate of a token in ``a`` minus the mean gate of the *same token id* in ``b``.

    Gate levels differ a lot from token to token (punctuation low, word endings high), so two
    categories with different token mixes can differ for that reason alone. Here each token id
    seen at least ``min_count`` times in both categories contributes its own difference of
    means; the result is the average over those ids, with a standard error across ids. Only the
    context around the token differs between the two sides of each difference.
    Rows {layer_id, branch, tokens (ids compared), mean_diff, sem, positive_fraction}.
    """
    cap = model.cfg.max_seq_len
    ids_a, ids_b = _masked_ids(a, cap), _masked_ids(b, cap)
    ga, gb = sample_gates(model, a), sample_gates(model, b)
    rows = []
    for lid in ga:
        for m in range(ga[lid].shape[1]):
            diffs = []
            for t in np.intersect1d(ids_a, ids_b):
                va, vb = ga[lid][ids_a == t, m], gb[lid][ids_b == t, m]
                if va.size >= min_count and vb.size >= min_count:
                    diffs.append(float(va.mean()) - float(vb.mean()))
            d = np.asarray(diffs, dtype=np.float64)
            k = int(d.size)
            rows.append({"layer_id": lid, "branch": m, "tokens": k,
                         "mean_diff": float(d.mean()) if k else float("nan"),
                         "sem": float(d.std(ddof=1) / math.sqrt(k)) if k > 1 else float("nan"),
                         "positive_fraction": float((d > 0).mean()) if k else float("nan")})
    return rows


def _gate_inputs(model: EngramLM, samples: Sequence[Sample], pad_id: int = 0, batch_size: int = 32
                 ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """The gate's inputs at the counted positions: {layer_id: (hidden [N, M, D], memory e [N, E])}."""
    _need_engram(model)
    layers = model.engram_layers
    hs: dict[int, list[torch.Tensor]] = {l.layer_id: [] for l in layers}
    es: dict[int, list[torch.Tensor]] = {l.layer_id: [] for l in layers}
    with _read_only_pass(model):
        for _, x, mask in _padded_batches(model, samples, pad_id, batch_size):
            inputs = model(x.to(model.embed.weight.device), output_gate_inputs=True).gate_inputs
            for l in layers:
                h, e = inputs[l.layer_id]
                m = mask.to(h.device)
                hs[l.layer_id].append(h[m].cpu())
                es[l.layer_id].append(e[m].cpu())
    return {lid: (torch.cat(hs[lid]), torch.cat(es[lid])) for lid in hs if hs[lid]}


def memory_swap_contrast(model: EngramLM, samples: Sequence[Sample], pad_id: int = 0,
                         seed: int = 0) -> list[dict[str, Any]]:
    """Gate with the position's own memory minus the gate with another position's memory.

    For the N counted positions of ``samples``, each keeps its hidden state and gets the memory
    vector ``e`` of position ``perm[i] != i`` (a random derangement over the N positions, fixed
    by ``seed``). The difference is 0 for a gate that ignores the memory (its key reads only the
    bias), and positive where the key recognises the memory that belongs to this context.
    ``gate_no_memory`` is the mean gate with ``e = 0`` (the key is its bias alone): the level
    the hidden state sets by itself.
    Rows {layer_id, branch, tokens, gate, gate_swapped, gate_no_memory, mean_diff, sem,
    positive_fraction}.
    """
    rows = []
    layers = {l.layer_id: l for l in model.engram_layers}
    for lid, (h, e) in _gate_inputs(model, samples, pad_id).items():
        n = h.shape[0]
        if n < 2:
            raise AnalysisError(f"memory_swap_contrast needs at least 2 counted positions, got {n}; "
                                f"pass more samples")
        order = np.random.default_rng(seed).permutation(n)
        perm = np.empty(n, dtype=np.int64)
        perm[order] = np.roll(order, 1)  # a single cycle: no position keeps its own memory
        layer = layers[lid]
        dev = next(layer.parameters()).device
        with torch.no_grad():
            own = layer.gates(h[None].to(dev), e[None].to(dev))[0].double().cpu()  # [N, M]
            other = layer.gates(h[None].to(dev), e[torch.from_numpy(perm)][None].to(dev))[0].double().cpu()
            blank = layer.gates(h[None].to(dev), torch.zeros_like(e)[None].to(dev))[0].double().cpu()
        for m in range(own.shape[1]):
            d = (own[:, m] - other[:, m]).numpy()
            rows.append({"layer_id": lid, "branch": m, "tokens": n,
                         "gate": float(own[:, m].mean()), "gate_swapped": float(other[:, m].mean()),
                         "gate_no_memory": float(blank[:, m].mean()),
                         "mean_diff": float(d.mean()), "sem": float(d.std(ddof=1) / math.sqrt(n)),
                         "positive_fraction": float((d > 0).mean())})
    return rows


RANDOM_CONTROLS = ("random tokens", "unigram random tokens")


def _verdict(diff: float, se: float, z: float) -> str:
    if diff > z * se:
        return "higher"
    if diff < -z * se:
        return "lower"
    return "no difference"


def facts_vs_random(rows: Sequence[dict[str, Any]], token_matched: Sequence[dict[str, Any]] = (),
                    memory_swap: Sequence[dict[str, Any]] = (), facts: str = "fact sentences",
                    controls: Sequence[str] = RANDOM_CONTROLS, z: float = 2.0) -> list[dict[str, Any]]:
    """Facts against each random-token control, per layer and branch, by three measures.

    Inputs are the rows of :func:`gate_statistics`, :func:`token_matched_contrast` (with keys
    ``a``/``b`` naming the categories) and :func:`memory_swap_contrast` (with ``category``).
    ``raw``: mean gate of facts minus the control's, s.e. sqrt(sem_a^2 + sem_b^2).
    ``token-matched``: as computed, facts minus control for the same ids.
    ``memory swap``: the facts' own-minus-swapped difference minus the control's.
    A measure whose inputs are missing is left out. Rows {layer_id, branch, control, measure,
    difference, se, verdict}.
    """
    if z <= 0:
        raise AnalysisError(f"z={z} must be > 0 (the verdict threshold, in standard errors)")
    means = {(r["category"], r["layer_id"], r["branch"]): r for r in rows}
    matched = {(r["b"], r["layer_id"], r["branch"]): r for r in token_matched if r.get("a") == facts}
    swaps = {(r["category"], r["layer_id"], r["branch"]): r for r in memory_swap}
    out = []
    for (cat, lid, m), a in sorted(means.items(), key=lambda kv: (kv[0][1], kv[0][2])):
        if cat != facts:
            continue
        for control in controls:
            measures = []
            b = means.get((control, lid, m))
            if b is not None:
                measures.append(("raw", a["mean"] - b["mean"], math.hypot(a["sem"], b["sem"])))
            t = matched.get((control, lid, m))
            if t is not None:
                measures.append(("token-matched", t["mean_diff"], t["sem"]))
            sa, sb = swaps.get((facts, lid, m)), swaps.get((control, lid, m))
            if sa is not None and sb is not None:
                measures.append(("memory swap", sa["mean_diff"] - sb["mean_diff"],
                                 math.hypot(sa["sem"], sb["sem"])))
            for name, diff, se in measures:
                out.append({"layer_id": lid, "branch": m, "control": control, "measure": name,
                            "difference": float(diff), "se": float(se),
                            "verdict": _verdict(diff, se, z)})
    return out


FREQ_BINS: tuple[tuple[int, Optional[int]], ...] = (
    (0, 0), (1, 1), (2, 4), (5, 16), (17, 64), (65, 256), (257, None))


def _ngram_keys(c: np.ndarray, n: int, base: int) -> np.ndarray:
    """One int64 per n-gram: key[i] encodes c[i : i + n]."""
    if base ** n >= 2 ** 62:
        raise AnalysisError(f"{n}-grams over {base:,} compressed ids do not fit an int64 key; "
                            f"use a smaller n")
    key = np.zeros(c.size - n + 1, dtype=np.int64)
    for k in range(n):
        key = key * base + c[k:c.size - n + 1 + k]
    return key


def gate_by_frequency(model: EngramLM, eval_tokens: np.ndarray, train_tokens: np.ndarray,
                      n: Optional[int] = None, window: int = 128,
                      bins: Sequence[tuple[int, Optional[int]]] = FREQ_BINS) -> list[dict[str, Any]]:
    """Mean gate per bin of the training count of the n-gram ending at each evaluated position.

    ``eval_tokens`` are cut into windows of ``window + 1``; a position counts when its whole
    n-gram lies inside its window (so the model saw the same n tokens that were counted).
    n-grams are compared as the hash sees them (compressed ids); ``n`` defaults to max_ngram_size.
    """
    _need_engram(model)
    n = n or model.cfg.engram.max_ngram_size
    if n < 1 or window < n:
        raise AnalysisError(f"n={n} must be >= 1 and window={window} >= n")
    if window + 1 > model.cfg.max_seq_len:  # a window is window + 1 tokens (one of context)
        raise AnalysisError(f"window={window} needs sequences of {window + 1} tokens but the model "
                            f"takes at most max_seq_len={model.cfg.max_seq_len}; pass "
                            f"window <= {model.cfg.max_seq_len - 1}")
    train_c = np.asarray(model.hasher.compress(np.asarray(train_tokens, dtype=np.int64)))
    eval_c = np.asarray(model.hasher.compress(np.asarray(eval_tokens, dtype=np.int64)))
    base = int(max(train_c.max(initial=0), eval_c.max(initial=0))) + 1
    keys, counts = np.unique(_ngram_keys(train_c, n, base), return_counts=True)
    samples, freq = [], []
    ids = np.asarray(eval_tokens, dtype=np.int64)
    for a in range(0, ids.size - window, window):
        w = ids[a:a + window + 1]
        first = max(1, n - 1)  # index 0 is context only; earlier n-grams would reach before w
        samples.append(Sample(tuple(w.tolist()), tuple(i >= first for i in range(w.size))))
        k = _ngram_keys(eval_c[a:a + window + 1], n, base)[first - (n - 1):]  # key j ends at j+n-1
        j = np.clip(np.searchsorted(keys, k), 0, keys.size - 1)
        freq.append(np.where(keys[j] == k, counts[j], 0))
    if not samples:
        raise AnalysisError(f"{ids.size} evaluation tokens make no window of {window + 1}")
    f = np.concatenate(freq)  # same order as the masked positions (windows are equal length)
    rows = []
    for lid, g in sample_gates(model, samples).items():
        for lo, hi in bins:
            sel = (f >= lo) & (f <= (hi if hi is not None else np.iinfo(np.int64).max))
            for m in range(g.shape[1]):
                v = g[sel, m].astype(np.float64)
                k = int(v.size)
                std = float(v.std(ddof=1)) if k > 1 else 0.0
                rows.append({"n": n, "bin": f"{lo}" if lo == hi else f"{lo}+" if hi is None else f"{lo}-{hi}",
                             "layer_id": lid, "branch": m, "count": k,
                             "mean": float(v.mean()) if k else float("nan"),
                             "sem": std / math.sqrt(k) if k else float("nan")})
    return rows


# ----------------------------------------------------------------------------- Zipf
@dataclass
class ZipfResult:
    tokens: int
    ngram_counts: dict[int, np.ndarray]  # order n -> counts of distinct n-grams, descending
    row_counts: dict[int, dict[int, np.ndarray]]  # layer -> order -> per-row counts, descending
    table_rows: dict[int, dict[int, int]]  # layer -> order -> rows in the tables of that order
    top_percents: tuple[float, ...] = (0.1, 1.0, 10.0)
    summary: dict[str, Any] = field(default_factory=dict)


def top_share(counts: np.ndarray, total_rows: int, percent: float) -> float:
    """Share of all accesses that go to the most-accessed ``percent``% of ``total_rows`` rows."""
    k = max(1, int(round(total_rows * percent / 100.0)))
    s = counts.sum()
    return float(counts[:k].sum() / s) if s else float("nan")


def zipf_statistics(model: EngramLM, tokens: np.ndarray, compress: Optional[Callable] = None,
                    top_percents: Sequence[float] = (0.1, 1.0, 10.0),
                    chunk: int = 1 << 18) -> ZipfResult:
    """Count n-grams and table-row accesses over ``tokens`` (1-D ids of the run's tokenizer)."""
    _need_engram(model)
    if any(not 0 < p <= 100 for p in top_percents):
        raise AnalysisError(f"top_percents={list(top_percents)} must be in (0, 100]")
    tokens = np.asarray(tokens, dtype=np.int64).ravel()
    if tokens.size < model.cfg.engram.max_ngram_size:
        raise AnalysisError(f"{tokens.size} tokens are too few; give at least "
                            f"{model.cfg.engram.max_ngram_size}")
    hasher = model.hasher
    cfg = model.cfg.engram
    K = cfg.n_head_per_ngram
    layers = model.engram_layers
    row_counts = row_access_counts(model, tokens, chunk)
    per_order: dict[int, dict[int, np.ndarray]] = {}
    order_rows: dict[int, dict[int, int]] = {}
    for l in layers:
        offs = l.multi_head_embedding.offsets.tolist() + [l.multi_head_embedding.num_rows]
        per_order[l.layer_id], order_rows[l.layer_id] = {}, {}
        for o, n in enumerate(range(2, cfg.max_ngram_size + 1)):
            lo, hi = offs[o * K], offs[(o + 1) * K]
            per_order[l.layer_id][n] = np.sort(row_counts[l.layer_id][lo:hi])[::-1]
            order_rows[l.layer_id][n] = hi - lo
    c = np.asarray(hasher.compress(tokens))  # n-grams as the hash sees them (compressed ids)
    ngram_counts = {}
    for n in range(2, cfg.max_ngram_size + 1):
        win = np.lib.stride_tricks.sliding_window_view(c, n)
        _, counts = np.unique(win, axis=0, return_counts=True)
        ngram_counts[n] = np.sort(counts)[::-1]
    res = ZipfResult(tokens=int(tokens.size), ngram_counts=ngram_counts, row_counts=per_order,
                     table_rows=order_rows, top_percents=tuple(top_percents))
    res.summary = _zipf_summary(res, K)
    return res


def _zipf_summary(res: ZipfResult, heads_per_order: int) -> dict[str, Any]:
    ngrams = {str(n): {"distinct": int(c.size), "occurrences": int(c.sum()),
                       "zipf_exponent": zipf_exponent(c),
                       "top_share": {f"{p:g}%": top_share(c, c.size, p) for p in res.top_percents}}
              for n, c in res.ngram_counts.items()}
    rows: dict[str, Any] = {}
    for lid, orders in res.row_counts.items():
        rows[str(lid)] = {}
        for n, c in orders.items():
            total = res.table_rows[lid][n]
            rows[str(lid)][str(n)] = {
                "table_rows": total, "heads": heads_per_order, "accesses": int(c.sum()),
                "rows_touched": int((c > 0).sum()), "fraction_touched": float((c > 0).sum() / total),
                "zipf_exponent": zipf_exponent(c),
                "top_share": {f"{p:g}%": top_share(c, total, p) for p in res.top_percents}}
    return {"tokens": res.tokens, "ngrams": ngrams, "rows": rows,
            "zipf_exponent_definition": ZIPF_EXPONENT_DEFINITION,
            "top_share_definition": "share of accesses (n-gram occurrences) received by the most "
                                    "accessed k% of all table rows (of all distinct n-grams)"}


def plot_zipf(res: ZipfResult, path: PathLike, title: str = "") -> None:
    """Log-log rank-frequency PNG: distinct n-grams (left), table rows per layer (right)."""
    import matplotlib  # local: ~0.5 s to import, and only the plots need it

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), constrained_layout=True)
    for n, c in res.ngram_counts.items():
        r = np.arange(1, c.size + 1)
        axes[0].loglog(r, c, label=f"{n}-grams ({c.size:,} distinct)", lw=1.6)
    if res.ngram_counts:
        c0 = next(iter(res.ngram_counts.values()))
        r = np.arange(1, c0.size + 1)
        axes[0].loglog(r, c0[0] / r, "k--", lw=0.8, label="Zipf s = 1")
    axes[0].set(xlabel="rank", ylabel="occurrences", title="n-grams in the shard")
    for lid, orders in res.row_counts.items():
        for n, c in orders.items():
            c = c[c > 0]
            axes[1].loglog(np.arange(1, c.size + 1), c, lw=1.6,
                           label=f"layer {lid}, n={n} ({c.size:,}/{res.table_rows[lid][n]:,} rows hit)")
    axes[1].set(xlabel="rank", ylabel="accesses", title="Engram table rows")
    for ax in axes:
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title or f"Rank-frequency over {res.tokens:,} tokens", fontsize=11)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- ablation
@dataclass(frozen=True)
class Scored:
    """Per-token loss and top-1 correctness over the counted targets of some samples."""

    loss: float
    accuracy: float
    tokens: int


@torch.no_grad()
def score_samples(model: EngramLM, samples: Sequence[Sample], pad_id: int = 0,
                  batch_size: int = 16, ablate_engram: bool = False) -> Scored:
    """Mean next-token loss and accuracy, counting target ``t`` where ``mask[t]`` (t >= 1);
    ``ablate_engram`` scores the model with every Engram layer's output zeroed."""
    total_loss, correct, count = 0.0, 0, 0
    was_training = model.training
    model.eval()
    try:
        for idx in _batches(samples, batch_size):
            batch = [samples[j] for j in idx]
            T = max(len(s.ids) for s in batch)
            if T > model.cfg.max_seq_len + 1:
                raise AnalysisError(f"a sample has {T} tokens; the model takes "
                                    f"{model.cfg.max_seq_len + 1} (inputs + 1 target): split it")
            x = torch.full((len(batch), T), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), T), dtype=torch.bool)
            for i, s in enumerate(batch):
                x[i, :len(s.ids)] = torch.tensor(s.ids)
                mask[i, :len(s.ids)] = torch.tensor(s.mask)
            inp, tgt, m = x[:, :-1], x[:, 1:], mask[:, 1:]
            if not m.any():
                continue
            logits = model(inp.to(model.embed.weight.device), ablate_engram=ablate_engram).logits.float().cpu()
            lp = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                 reduction="none").reshape(tgt.shape)
            total_loss += float(lp[m].sum())
            correct += int((logits.argmax(-1) == tgt)[m].sum())
            count += int(m.sum())
    finally:
        model.train(was_training)
    if not count:
        raise AnalysisError("no counted target tokens; check the samples' masks")
    return Scored(total_loss / count, correct / count, count)


def unigram_cross_entropy(samples: Sequence[Sample], unigram_logp: np.ndarray) -> float:
    """Mean -log p_unigram over the counted targets (positions >= 1)."""
    vals = [unigram_logp[i] for s in samples for i, keep in zip(s.ids[1:], s.mask[1:]) if keep]
    if not vals:
        raise AnalysisError("no counted target tokens for the unigram baseline")
    return float(-np.mean(vals))


def unigram_logprobs(train_tokens: np.ndarray, vocab_size: int, smoothing: float = 0.5) -> np.ndarray:
    """log p(token) on the training split, add-``smoothing`` so unseen ids stay finite."""
    counts = np.bincount(np.asarray(train_tokens, dtype=np.int64), minlength=vocab_size).astype(np.float64)
    counts += smoothing
    return np.log(counts / counts.sum())


def stream_samples(docs: Sequence[Document], tok: Tokenizer, window: int, max_tokens: int
                   ) -> list[Sample]:
    """Documents as the data pipeline lays them out (each followed by eos), cut into windows of
    ``window + 1`` tokens; the first token of each window is context only."""
    if window < 1 or max_tokens < 1:
        raise AnalysisError(f"window={window} and max_tokens={max_tokens} must be >= 1")
    _, eos = special_ids(tok)
    stream: list[int] = [eos]
    for d in docs:
        stream += tok.encode(d.text, add_special_tokens=False).ids + [eos]
        if len(stream) > max_tokens + 1:
            break
    stream = stream[:max_tokens + 1]
    out = []
    for a in range(0, len(stream) - 1, window):
        ids = tuple(stream[a:a + window + 1])
        if len(ids) >= 2:
            out.append(Sample(ids, (False,) + (True,) * (len(ids) - 1)))
    return out


def answer_samples(facts: Sequence[Fact], tok: Tokenizer) -> list[Sample]:
    """eos + fact sentence; only the answer's tokens count as targets."""
    _, eos = special_ids(tok)
    return [_text_sample(tok, eos, f.sentence, [(f.answer_start, f.answer_start + len(f.answer))])
            for f in facts]


def ablation_categories(tok: Tokenizer, val_titles: Sequence[str], window: int, max_tokens: int,
                        max_facts: int = 500, seed: int = 0) -> dict[str, list[Sample]]:
    """Held-out (validation-split) documents of the built-in corpus, by kind of text."""
    titles = set(val_titles)
    docs = [d for d in builtin_documents() if d.title in titles]
    if not docs:
        raise AnalysisError("none of the dataset's validation documents is in the built-in corpus; "
                            "prepare the data with `engram data prepare` (built-in corpus)")
    cats = {
        "facts (countries, cities)": stream_samples([d for d in docs if d.source in FACT_SOURCES],
                                                    tok, window, max_tokens),
        "narrative (Shakespeare, Bible)": stream_samples(
            [d for d in docs if d.source in NARRATIVE_SOURCES], tok, window, max_tokens),
    }
    facts = [f for f in fact_records() if f.doc_title in titles]
    if facts:
        cats["fact answers only"] = answer_samples(_facts_sample(facts, max_facts, seed), tok)
    return {k: v for k, v in cats.items() if v}


def ablation(model: EngramLM, categories: dict[str, list[Sample]], unigram_logp: np.ndarray,
             pad_id: int = 0) -> list[dict[str, Any]]:
    """Score each category with Engram on and off; rows with both retained fractions."""
    _need_engram(model)
    rows = []
    for name, samples in categories.items():
        full = score_samples(model, samples, pad_id)
        off = score_samples(model, samples, pad_id, ablate_engram=True)
        u = unigram_cross_entropy(samples, unigram_logp)
        gain = u - full.loss
        rows.append({
            "category": name, "tokens": full.tokens,
            "unigram_loss": u, "loss_full": full.loss, "loss_ablated": off.loss,
            "accuracy_full": full.accuracy, "accuracy_ablated": off.accuracy,
            "retained_loss": (u - off.loss) / gain if gain > 0 else float("nan"),
            "retained_accuracy": off.accuracy / full.accuracy if full.accuracy > 0 else float("nan"),
        })
    return rows
