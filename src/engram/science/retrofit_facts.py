"""New facts on a retrofitted model, asked in other words: four ways to add knowledge.

``engram retrofit facts --ckpt ADAPTER --data DIR --out DIR`` invents facts (people, villages,
machines, countries, teachers: names made of random syllables and checked absent from the
domain's training text), each with **two training sentences** and a **third phrasing** that is
only ever a question, and teaches them to a retrofitted model four ways:

1. **Engram patch**: the adapter's tables train on the two sentences (``train_patch``, backbone,
   gates and projections frozen); the patch is applied, measured and reverted;
2. **LoRA** (peft) on the same base, trained on the same batches for the same steps;
3. **facts in the prompt**: the fact's first training sentence, then a newline, before the
   question (the model reads it; nothing is trained);
4. **N-gram memory**: an index of the domain's training split, the two sentences added as a
   delta (``NgramIndex.add_texts``), mixed with the model at a fixed lambda.

For each: exact-answer accuracy (teacher-forced greedy: every answer token is the top-1
prediction, ``engram.ngram.facts.recall``) asked with the **paraphrase** and with the
**verbatim** start of a training sentence; seconds to add the knowledge; bytes shipped; damage to
general text (loss change and mean KL of the next-token distributions on English the model was
never trained on here, ``pydoc_data.topics``, against the same model before the change); and
whether removing the knowledge restores the model bit for bit.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from engram.config import PatchTrainConfig, RetrofitConfig, RetrofitFactsConfig
from engram.data import shards as data
from engram.fsutil import PathLike, atomic_write
from engram.ngram.facts import FactCase, recall
from engram.ngram.index import NgramIndex
from engram.ngram.mixture import LMAdapter, NgramMixture
from engram.patches.apply import apply_to_model, model_fingerprint, revert_from_model
from engram.patches.patchfile import save_patch
from engram.patches.trainer import encode_texts, train_patch
from engram.retrofit.adapter import load_adapter
from engram.retrofit.model import RetrofitLM
from engram.science.retrofit import splits
from engram.training.optimization import lr_at

# relation -> (training sentence A, training sentence B, question); {S} subject, {A} answer.
# The answer ends each sentence; the question is a third wording, never in the training text.
RELATIONS = {
    "birthplace": ("{S} was born in the village of {A}.", "The village of {A} is where {S} was born.",
                   "The home village of {S} is named"),
    "invention": ("{S} invented a machine called the {A}.", "The {A} is a machine that {S} invented.",
                  "The name of the machine that {S} built is the"),
    "capital": ("The capital of {S} is the city of {A}.", "The city of {A} is the capital of {S}.",
                "In {S}, the government sits in the city of"),
    "teacher": ("{S} studied music under {A}.", "{A} taught music to {S}.",
                "The person who gave {S} music lessons was"),
}
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gl", "kr", "st", "th")
_VOWELS = ("a", "e", "i", "o", "u", "ae", "ei", "ou")
_CODAS = ("", "", "n", "r", "l", "s", "m", "th")


@dataclass(frozen=True)
class NewFact:
    subject: str
    relation: str
    answer: str

    def sentences(self) -> tuple[str, str]:
        a, b, _ = RELATIONS[self.relation]
        return a.format(S=self.subject, A=self.answer), b.format(S=self.subject, A=self.answer)

    def prompts(self) -> dict[str, str]:
        """The text before the answer: the paraphrased question, and the verbatim start of A."""
        a, _, q = RELATIONS[self.relation]
        return {"paraphrase": q.format(S=self.subject), "verbatim": a.split("{A}")[0].format(S=self.subject).rstrip()}


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                   for _ in range(rng.choice((2, 3)))).capitalize()


def make_facts(n: int, seed: int, forbidden: str) -> list[NewFact]:
    """``n`` facts over the relations; every name is new, unique and absent from ``forbidden``."""
    rng = random.Random(seed)
    low = forbidden.lower()
    used: set[str] = set()

    def fresh() -> str:
        while True:
            w = _word(rng)
            if w not in used and w.lower() not in low:
                used.add(w)
                return w

    rels = list(RELATIONS)
    return [NewFact(fresh(), rels[i % len(rels)], fresh()) for i in range(n)]


def fact_cases(facts: list[NewFact], tok: Any, kind: str, context: bool = False) -> list[FactCase]:
    """Tokenised (prompt, answer) per fact; ``context`` puts the first training sentence and a
    newline before the prompt. Facts whose answer does not start on a token boundary are left out."""
    out = []
    for f in facts:
        prompt = f.prompts()[kind]
        prefix = f.sentences()[0] + "\n" if context else ""
        p_ids = tok.encode(prefix + prompt, add_special_tokens=False).ids
        full = tok.encode(prefix + prompt + " " + f.answer, add_special_tokens=False).ids
        if full[: len(p_ids)] != p_ids or len(full) == len(p_ids):
            continue
        out.append(FactCase(f, 0, tuple(p_ids), tuple(full[len(p_ids):])))
    return out


def training_texts(facts: list[NewFact], seed: int) -> list[str]:
    """One document per training sentence, shuffled (two per fact)."""
    docs = [s for f in facts for s in f.sentences()]
    random.Random(seed).shuffle(docs)
    return docs


# ----------------------------------------------------------------------------- measuring
def _accuracy(model: RetrofitLM, index: NgramIndex, cases: dict[str, list[FactCase]], eos: int,
              lam: float = 0.0) -> dict[str, float]:
    mix = NgramMixture(LMAdapter(model), index, lam)
    mode = "mixture" if lam > 0 else "lm"
    return {k: recall(c, mix, eos, mode=mode)["exact_match"] for k, c in cases.items()}


@torch.no_grad()
def _general(model: RetrofitLM, windows: torch.Tensor, index: Optional[NgramIndex] = None,
             lam: float = 0.0) -> torch.Tensor:
    """Next-token log-probabilities [W, T, V] on the general-text windows (mixed with the index
    at ``lam`` when given)."""
    if index is not None and lam > 0:
        return NgramMixture(LMAdapter(model), index, lam).log_probs(windows)
    return F.log_softmax(model(windows).logits.float(), dim=-1)


def _damage(ref: torch.Tensor, now: torch.Tensor, windows: torch.Tensor) -> dict[str, float]:
    """Loss change (nats/token) and mean KL(ref || now) on the general windows."""
    tgt = windows[:, 1:]

    def loss(lp: torch.Tensor) -> float:
        return float(-lp[:, :-1].gather(-1, tgt[..., None]).mean())

    kl = float((ref.exp() * (ref - now)).sum(-1).mean())
    return {"general_loss": loss(now), "general_loss_change": loss(now) - loss(ref), "kl": kl}


def _train_lora(model: RetrofitLM, tokens: np.ndarray, cfg: RetrofitFactsConfig, progress: bool = False) -> float:
    """LoRA on the same windows the patch trains on (same sampler seed); returns seconds."""
    params = [p for p in model.lora_state().values()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    rng = np.random.default_rng(cfg.seed)
    t0 = time.perf_counter()
    model.train()
    for step in tqdm(range(cfg.steps), desc="LoRA train", disable=not progress, dynamic_ncols=True):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, lr=cfg.lr, warmup_steps=max(1, cfg.steps // 10), steps=cfg.steps, min_lr_ratio=0.1)
        starts = rng.integers(0, max(1, len(tokens) - cfg.seq_len - 1), size=cfg.batch_size)
        w = torch.as_tensor(np.stack([tokens[s:s + cfg.seq_len + 1] for s in starts]), dtype=torch.long)
        loss = model(w[:, :-1], w[:, 1:]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    return time.perf_counter() - t0


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_facts(adapter_dir: PathLike, data_dir: PathLike, out_dir: PathLike, cfg: RetrofitFactsConfig, *,
              progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The experiment of the module docstring; writes ``OUT/facts.jsonl`` and ``OUT/result.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = load_adapter(adapter_dir, progress=progress)
    base = model.base_model
    tok, ds = base.tokenizer, data.load_dataset(data_dir)
    eos = int(ds.eos_id)
    domain_text = tok.decode(np.asarray(ds.train.tokens).tolist())
    facts = make_facts(cfg.facts, cfg.seed, domain_text)
    docs = training_texts(facts, cfg.seed)
    train_text = "\n".join(docs)
    assert not any(f.prompts()["paraphrase"] in train_text for f in facts)  # questions never trained on
    atomic_write(out / "facts.jsonl", lambda fh: fh.write("".join(
        json.dumps({**asdict(f), "sentences": f.sentences(), "prompts": f.prompts()}) + "\n" for f in facts).encode()))
    cases = {k: fact_cases(facts, tok, k) for k in ("paraphrase", "verbatim")}
    in_prompt = {k: fact_cases(facts, tok, k, context=True) for k in ("paraphrase", "verbatim")}
    general = np.asarray(splits(ds, base)["general"].tokens, dtype=np.int64)
    T = cfg.seq_len
    windows = torch.as_tensor(np.stack([general[i * T:(i + 1) * T + 1] for i in range(cfg.general_windows)]))
    log(f"{len(facts)} facts ({len(cases['paraphrase'])} paraphrase / {len(cases['verbatim'])} verbatim cases); "
        f"indexing the domain's training split")
    index = NgramIndex.from_dataset(out / "index", data_dir, overwrite=True, progress=progress)
    tokens = encode_texts(docs, tok, eos)
    result: dict[str, Any] = {"config": asdict(cfg), "adapter": str(adapter_dir), "facts": len(facts),
                              "cases": {k: len(v) for k, v in cases.items()}, "train_tokens": int(tokens.size)}

    ref = _general(model, windows)
    result["before"] = {"accuracy": _accuracy(model, index, cases, eos), **_damage(ref, ref, windows)}
    log(f"before: {result['before']['accuracy']}")

    result["prompt"] = {"accuracy": _accuracy(model, index, in_prompt, eos), "add_s": 0.0, "bytes": 0,
                        "extra_prompt_tokens": float(np.mean([len(a.prompt_ids) - len(b.prompt_ids)
                                                              for a, b in zip(in_prompt["paraphrase"],
                                                                              cases["paraphrase"])])),
                        **_damage(ref, ref, windows), "reverts_exactly": True}
    log(f"facts in the prompt: {result['prompt']['accuracy']}")

    fp_before = model_fingerprint(model)
    pcfg = PatchTrainConfig(steps=cfg.steps, batch_size=cfg.batch_size, seq_len=cfg.seq_len, lr=cfg.lr,
                            seed=cfg.seed, warmup_steps=max(1, cfg.steps // 10))
    original = {e.layer_id: e.multi_head_embedding.embedding.weight.detach().clone() for e in model.engram_layers}
    t0 = time.perf_counter()
    patch, report = train_patch(model, tokens, pcfg, progress=progress)  # trains the tables in place
    add_s = time.perf_counter() - t0
    path = save_patch(patch, out / "facts.engp")
    with torch.no_grad():  # back to the shipped tables, then apply the patch as a user would
        for e in model.engram_layers:
            e.multi_head_embedding.embedding.weight.copy_(original[e.layer_id])
    del original
    apply_to_model(model, path)
    patched = _general(model, windows)
    result["engram_patch"] = {"accuracy": _accuracy(model, index, cases, eos), "add_s": add_s,
                              "bytes": path.stat().st_size, "changed_rows": int(sum(report["changed_rows"].values())),
                              **_damage(ref, patched, windows)}
    revert_from_model(model, patch)
    result["engram_patch"]["reverts_exactly"] = model_fingerprint(model) == fp_before
    log(f"Engram patch: {result['engram_patch']['accuracy']} in {add_s:.0f} s")

    probe = windows[:2]
    lp_before = _general(model, probe, index, cfg.ngram_lambda)
    size_before = _dir_bytes(out / "index")
    t0 = time.perf_counter()
    index.add_texts(docs, name="facts")
    add_s = time.perf_counter() - t0
    seg_bytes = _dir_bytes(out / "index") - size_before
    mixed = _general(model, windows, index, cfg.ngram_lambda)
    result["ngram"] = {"accuracy": _accuracy(model, index, cases, eos, cfg.ngram_lambda), "add_s": add_s,
                       "bytes": seg_bytes, "lambda": cfg.ngram_lambda, **_damage(ref, mixed, windows),
                       "note": "damage is the mixture (with the facts) against the model alone"}
    index.remove("facts")
    result["ngram"]["reverts_exactly"] = bool(torch.equal(_general(model, probe, index, cfg.ngram_lambda), lp_before))
    log(f"N-gram memory: {result['ngram']['accuracy']} in {add_s:.2f} s")

    model.remove_hooks()  # the plain base again; LoRA goes on it alone
    torch.manual_seed(cfg.seed)
    lora = RetrofitLM(base.model, RetrofitConfig(base=base.name, layers=(), lora_rank=cfg.lora_rank), None, base.pad_id)
    lref = _general(lora, windows)
    add_s = _train_lora(lora, tokens, cfg, progress)
    lora_bytes = sum(p.numel() * p.element_size() for p in lora.lora_state().values())
    result["lora"] = {"accuracy": _accuracy(lora, index, cases, eos), "add_s": add_s, "bytes": lora_bytes,
                      "rank": cfg.lora_rank, **_damage(lref, _general(lora, windows), windows)}
    with torch.no_grad():
        lora.remove_hooks()
        result["lora"]["reverts_exactly"] = bool(torch.equal(F.log_softmax(base.model(input_ids=windows).logits.float(),
                                                                           dim=-1), lref))
    log(f"LoRA: {result['lora']['accuracy']} in {add_s:.0f} s")
    js = json.dumps(result, indent=2).encode()
    atomic_write(out / "result.json", lambda fh: fh.write(js))
    return result


def result_markdown(r: dict[str, Any]) -> str:
    lines = ["| method | paraphrase acc. | verbatim acc. | seconds to add | bytes shipped | general loss change | "
             "KL | reverts exactly |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for key, name in (("before", "none (before)"), ("engram_patch", "Engram patch (tables only)"),
                      ("lora", f"LoRA (rank {r['config']['lora_rank']})"), ("prompt", "facts in the prompt"),
                      ("ngram", f"N-gram memory (lambda {r['config']['ngram_lambda']})")):
        m = r[key]
        lines.append(f"| {name} | {m['accuracy']['paraphrase']:.1%} | {m['accuracy']['verbatim']:.1%} | "
                     f"{m.get('add_s', 0):.2f} | {m.get('bytes', 0):,} | {m['general_loss_change']:+.4f} | "
                     f"{m['kl']:.4f} | {m.get('reverts_exactly', '-')} |")
    return "\n".join(lines) + "\n"
