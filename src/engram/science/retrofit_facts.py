"""New facts on a retrofitted model, asked in other words: four ways to add knowledge.

``engram retrofit facts --ckpt ADAPTER --data DIR --out DIR`` invents facts (people, villages,
machines, countries, teachers: names made of random syllables and checked absent from the
domain's training text), each with **two training sentences** and a **third phrasing** that is
only ever a question, and teaches them to a retrofitted model four ways:

1. **Engram patch**: the adapter's tables train on the two sentences (``train_patch``, backbone,
   gates and projections frozen); the patch is applied, measured and reverted;
2. **LoRA** (peft) on the same base (Engram switched off), trained for the same steps on
   batches of the same shape from the same text (random windows of its own sampler, seeded
   with the same seed; not the patch's windows);
3. **LoRA + Engram patch**: the patch applied, LoRA trained on top of it (both shipped);
4. **facts in the prompt**: the fact's first training sentence, then a newline, before the
   question (the model reads it; nothing is trained);
5. **N-gram memory**: an index of the domain's training split, the two sentences added as a
   delta (``NgramIndex.add_texts``), mixed with the model at a fixed lambda.

**Choices on dev, report on test.** The questions of the first ``dev_facts`` facts are the dev
set, the rest the test set (every fact is trained on; only the questions are split). With the
first seed, the patch and LoRA train at every learning rate of their grids and the rate with
the best dev accuracy (paraphrase + verbatim; ties: the smaller KL) is kept for the other seeds
and for the combination. Each seed invents new facts and draws new batches. Every measurement
is a JSON file under ``OUT/runs``: a rerun skips what is there (resumable).

For each: exact-answer accuracy (teacher-forced greedy: every answer token is the top-1
prediction, ``engram.ngram.facts.recall``) asked with the **paraphrase** and with the
**verbatim** start of a training sentence; seconds to add the knowledge; bytes shipped; damage to
general text (loss change and mean KL of the next-token distributions on English the model was
never trained on here, ``pydoc_data.topics``, against the same model before the change); and
whether removing the knowledge restores the model bit for bit.
"""

from __future__ import annotations

import contextlib
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

from engram.config import PatchTrainConfig, RetrofitFactsConfig
from engram.data import shards as data
from engram.data.names import PERSON_SYLLABLES, NameGenerator
from engram.fsutil import PathLike, atomic_write
from engram.ngram.facts import FactCase, recall
from engram.ngram.index import NgramIndex
from engram.ngram.mixture import LMAdapter, NgramMixture
from engram.patches.apply import apply_to_model, model_fingerprint, revert_from_model
from engram.patches.patchfile import save_patch
from engram.patches.trainer import encode_texts, train_patch
from engram.retrofit.adapter import load_adapter
from engram.retrofit.model import RetrofitLM
from engram.science.retrofit import claim_out_dir, splits
from engram.stats import mean_std, paired_t
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


def make_facts(n: int, seed: int, forbidden: str) -> list[NewFact]:
    """``n`` facts over the relations; every name is new, unique and absent from ``forbidden``."""
    low = forbidden.lower()
    names = NameGenerator(random.Random(seed), PERSON_SYLLABLES, is_new=lambda w: w.lower() not in low)
    rels = list(RELATIONS)
    return [NewFact(names.fresh((2, 3)), rels[i % len(rels)], names.fresh((2, 3))) for i in range(n)]


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
SPLITS, KINDS = ("dev", "test"), ("paraphrase", "verbatim")
TRAINED = ("engram_patch", "lora", "both")
METHODS = ("before", "engram_patch", "lora", "both", "prompt", "ngram")
NAMES = {"before": "none (the retrofit before)", "engram_patch": "Engram patch (tables only)", "lora": "LoRA",
         "both": "LoRA + Engram patch", "prompt": "facts in the prompt", "ngram": "N-gram memory"}


def _accuracy(model: RetrofitLM, index: NgramIndex, cases: dict[str, list[FactCase]], dev: set[str], eos: int,
              lam: float = 0.0) -> dict[str, dict[str, float]]:
    """Exact-answer accuracy {split: {kind: acc}} (dev = facts whose subject is in ``dev``) and
    the share of first answer tokens that are the top-1 ({split: {kind + "_first": acc}})."""
    mix = NgramMixture(LMAdapter(model), index, lam)
    out: dict[str, dict[str, float]] = {sp: {} for sp in SPLITS}
    for kind, cs in cases.items():
        r = recall(cs, mix, eos, mode="mixture" if lam > 0 else "lm")
        for sp in SPLITS:
            pick = [i for i, c in enumerate(cs) if (c.fact.subject in dev) == (sp == "dev")]
            out[sp][kind] = float(np.mean([r["per_fact_exact"][i] for i in pick]))
            out[sp][kind + "_first"] = float(np.mean([r["per_fact_top1"][i] for i in pick]))
    return out


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


def _train_lora(model: RetrofitLM, tokens: np.ndarray, cfg: RetrofitFactsConfig, lr: float, seed: int,
                progress: bool = False) -> float:
    """LoRA for ``cfg.steps`` steps of random ``batch_size`` x ``seq_len`` windows of ``tokens``
    (numpy's generator seeded with ``seed``: the patch's shape and text, not its windows, which
    torch's generator draws); returns seconds."""
    params = list(model.lora_state().values())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    model.train()
    for step in tqdm(range(cfg.steps), desc=f"LoRA lr {lr:g}", disable=not progress, dynamic_ncols=True):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, lr=lr, warmup_steps=max(1, cfg.steps // 10), steps=cfg.steps, min_lr_ratio=0.1)
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


def _dev_score(m: dict[str, Any]) -> tuple[float, float]:
    """Learning-rate choice: dev accuracy (paraphrase + verbatim), then the smaller KL."""
    return m["accuracy"]["dev"]["paraphrase"] + m["accuracy"]["dev"]["verbatim"], -m["kl"]


class _Cached:
    """One JSON file per measurement under ``OUT/runs``: computed once, read on a rerun."""

    def __init__(self, root: Path, log: Callable[[str], None]) -> None:
        self.root, self.log = root, log
        root.mkdir(parents=True, exist_ok=True)

    def __call__(self, key: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        path = self.root / f"{key}.json"
        if path.is_file():
            return json.loads(path.read_text())
        res = fn()
        js = json.dumps(res, indent=1).encode()
        atomic_write(path, lambda fh: fh.write(js))
        acc = res["accuracy"]["test"]
        self.log(f"  {key}: test paraphrase {acc['paraphrase']:.1%}, verbatim {acc['verbatim']:.1%}; "
                 f"dev {res['accuracy']['dev']['paraphrase']:.1%} / {res['accuracy']['dev']['verbatim']:.1%}"
                 + (f"; {res['add_s']:.0f} s" if res.get("add_s") else ""))
        return res


def run_facts(adapter_dir: PathLike, data_dir: PathLike, out_dir: PathLike, cfg: RetrofitFactsConfig, *,
              progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The experiment of the module docstring; writes ``OUT/runs/*.json``, ``OUT/facts-s*.jsonl``
    and the summary ``OUT/result.json``; returns the summary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    claim_out_dir(out, {**asdict(cfg), "adapter": str(Path(adapter_dir).resolve())}, "facts run")
    cached = _Cached(out / "runs", log)
    model = load_adapter(adapter_dir, progress=progress)
    base = model.base_model
    tok, ds = base.tokenizer, data.load_dataset(data_dir)
    eos = int(ds.eos_id)
    domain_text = tok.decode(np.asarray(ds.train.tokens).tolist())
    general = np.asarray(splits(ds, base)["general"].tokens, dtype=np.int64)
    T = cfg.seq_len
    windows = torch.as_tensor(np.stack([general[i * T:(i + 1) * T + 1] for i in range(cfg.general_windows)]))
    log("indexing the domain's training split (N-gram memory)")
    index = NgramIndex.from_dataset(out / "index", data_dir, overwrite=True, progress=progress)
    ref = _general(model, windows)  # the retrofit as shipped
    with model.without_engram():
        base_ref = _general(model, windows)  # the plain base: LoRA's starting point
    fp_before = model_fingerprint(model)
    original = {e.layer_id: e.table.weight.detach().clone() for e in model.engram_layers}
    chosen: dict[str, float] = {}

    for i, seed in enumerate(cfg.seeds):
        facts = make_facts(cfg.facts, seed, domain_text)
        docs = training_texts(facts, seed)
        train_text = "\n".join(docs)
        assert not any(f.prompts()["paraphrase"] in train_text for f in facts)  # questions never trained on
        atomic_write(out / f"facts-s{seed}.jsonl", lambda fh: fh.write("".join(
            json.dumps({**asdict(f), "sentences": f.sentences(), "prompts": f.prompts(),
                        "split": "dev" if j < cfg.dev_facts else "test"}) + "\n"
            for j, f in enumerate(facts)).encode()))
        dev = {f.subject for f in facts[:cfg.dev_facts]}
        cases = {k: fact_cases(facts, tok, k) for k in KINDS}
        in_prompt = {k: fact_cases(facts, tok, k, context=True) for k in KINDS}
        tokens = encode_texts(docs, tok, eos)
        log(f"seed {seed}: {len(facts)} facts ({cfg.dev_facts} dev), {tokens.size:,} training tokens")

        def acc(cs: dict[str, list[FactCase]], lam: float = 0.0) -> dict[str, dict[str, float]]:
            return _accuracy(model, index, cs, dev, eos, lam)

        cached(f"before-s{seed}", lambda: {"accuracy": acc(cases), **_damage(ref, ref, windows)})
        cached(f"prompt-s{seed}", lambda: {
            "accuracy": acc(in_prompt), "add_s": 0.0, "bytes": 0, **_damage(ref, ref, windows),
            "extra_prompt_tokens": float(np.mean([len(a.prompt_ids) - len(b.prompt_ids)
                                                  for a, b in zip(in_prompt["paraphrase"], cases["paraphrase"])])),
            "reverts_exactly": True})

        def ngram() -> dict[str, Any]:
            probe = windows[:2]
            lp_before = _general(model, probe, index, cfg.ngram_lambda)
            size_before = _dir_bytes(out / "index")
            t0 = time.perf_counter()
            index.add_texts(docs, name="facts")
            add_s = time.perf_counter() - t0
            res = {"add_s": add_s, "bytes": _dir_bytes(out / "index") - size_before, "lambda": cfg.ngram_lambda}
            try:
                res.update(accuracy=acc(cases, cfg.ngram_lambda),
                           **_damage(ref, _general(model, windows, index, cfg.ngram_lambda), windows),
                           note="damage is the mixture (with the facts) against the model alone")
            finally:
                index.remove("facts")
            res["reverts_exactly"] = bool(torch.equal(_general(model, probe, index, cfg.ngram_lambda), lp_before))
            return res

        cached(f"ngram-s{seed}", ngram)

        def patch_run(lr: float) -> dict[str, Any]:
            pcfg = PatchTrainConfig(steps=cfg.steps, batch_size=cfg.batch_size, seq_len=cfg.seq_len, lr=lr,
                                    seed=seed, warmup_steps=max(1, cfg.steps // 10))
            t0 = time.perf_counter()
            patch, report = train_patch(model, tokens, pcfg, progress=progress)  # trains the tables in place
            add_s = time.perf_counter() - t0
            path = save_patch(patch, out / "runs" / f"engram_patch-lr{lr:g}-s{seed}.engp")
            _restore(model, original)  # back to the shipped tables, then apply as a user would
            apply_to_model(model, path)
            try:
                res = {"lr": lr, "table_lr": lr * pcfg.table_lr_mult, "accuracy": acc(cases), "add_s": add_s,
                       "bytes": path.stat().st_size, "changed_rows": int(sum(report["changed_rows"].values())),
                       **_damage(ref, _general(model, windows), windows)}
            finally:
                revert_from_model(model, patch)
            res["reverts_exactly"] = model_fingerprint(model) == fp_before and torch.equal(_general(model, windows), ref)
            return res

        def lora_run(lr: float, patch_lr: Optional[float] = None) -> dict[str, Any]:
            """LoRA alone (Engram off), or with ``patch_lr`` on top of that seed's applied patch."""
            patch = None
            if patch_lr is not None:
                patch = out / "runs" / f"engram_patch-lr{patch_lr:g}-s{seed}.engp"
                apply_to_model(model, patch)
            torch.manual_seed(seed)
            model.add_lora(cfg.lora_rank, targets=cfg.lora_targets)
            try:
                with contextlib.ExitStack() as stack:
                    if patch is None:
                        stack.enter_context(model.without_engram())
                    add_s = _train_lora(model, tokens, cfg, lr, seed, progress)
                    res = {"lr": lr, "accuracy": acc(cases), "add_s": add_s, "rank": cfg.lora_rank,
                           "targets": list(cfg.lora_targets),
                           "bytes": sum(p.numel() * p.element_size() for p in model.lora_state().values()),
                           **_damage(base_ref if patch is None else ref, _general(model, windows), windows)}
            finally:
                model.remove_lora()
                if patch is not None:
                    revert_from_model(model, patch)
            if patch is not None:
                patch_res = json.loads((out / "runs" / f"engram_patch-lr{patch_lr:g}-s{seed}.json").read_text())
                res.update(patch_lr=patch_lr, add_s=res["add_s"] + patch_res["add_s"],
                           bytes=res["bytes"] + patch_res["bytes"])
            res["reverts_exactly"] = model_fingerprint(model) == fp_before and torch.equal(_general(model, windows), ref)
            return res

        grids = {"engram_patch": cfg.patch_lrs, "lora": cfg.lora_lrs}
        for method, run in (("engram_patch", patch_run), ("lora", lora_run)):
            lrs = grids[method] if i == 0 else (chosen[method],)
            runs = {lr: cached(f"{method}-lr{lr:g}-s{seed}", lambda lr=lr: run(lr)) for lr in lrs}
            if i == 0:
                chosen[method] = max(runs, key=lambda lr: _dev_score(runs[lr]))
                log(f"  {method}: lr {chosen[method]:g} chosen on the dev facts")
        cached(f"both-s{seed}", lambda: lora_run(chosen["lora"], chosen["engram_patch"]))

    summary = summarize_facts(out, cfg, chosen)
    js = json.dumps(summary, indent=2).encode()
    atomic_write(out / "result.json", lambda fh: fh.write(js))
    return summary


@torch.no_grad()
def _restore(model: RetrofitLM, original: dict[int, torch.Tensor]) -> None:
    for e in model.engram_layers:
        e.table.weight.copy_(original[e.layer_id])


def _run_file(out: Path, method: str, seed: int, chosen: dict[str, float]) -> Path:
    lr = f"-lr{chosen[method]:g}" if method in ("engram_patch", "lora") else ""
    return out / "runs" / f"{method}{lr}-s{seed}.json"


def summarize_facts(out: PathLike, cfg: RetrofitFactsConfig, chosen: dict[str, float]) -> dict[str, Any]:
    """Per method: test accuracy over seeds (mean, std, per seed), cost, damage, revert; the
    learning-rate grid of the first seed with its dev and test numbers; paired tests."""
    out = Path(out)
    seeds = list(cfg.seeds)
    runs = {m: {s: json.loads(_run_file(out, m, s, chosen).read_text()) for s in seeds} for m in METHODS}
    methods: dict[str, Any] = {}
    for m, per in runs.items():
        row: dict[str, Any] = {"name": NAMES[m], "lr": chosen.get(m if m != "both" else "lora")}
        if m == "both":
            row["patch_lr"] = chosen.get("engram_patch")
        for kind in (*KINDS, "paraphrase_first", "verbatim_first"):
            vals = [per[s]["accuracy"]["test"][kind] for s in seeds]
            row[kind] = {"mean": mean_std(vals)[0], "std": mean_std(vals)[1], "per_seed": vals}
        for k in ("add_s", "bytes", "general_loss_change", "kl"):
            row[k] = mean_std([float(per[s].get(k, 0.0)) for s in seeds])[0]
        row["reverts_exactly"] = all(per[s].get("reverts_exactly", True) for s in seeds)
        methods[m] = row
    grid = {m: [{k: v for k, v in json.loads(p.read_text()).items() if k != "note"}
                for p in sorted((out / "runs").glob(f"{m}-lr*-s{seeds[0]}.json"))] for m in ("engram_patch", "lora")}
    paired = {}
    if len(seeds) >= 2:
        for a, b in (("engram_patch", "lora"), ("both", "lora"), ("engram_patch", "before"),
                     ("lora", "before"), ("ngram", "prompt")):
            paired[f"{a} - {b}"] = {k: paired_t(methods[a][k]["per_seed"], methods[b][k]["per_seed"]) for k in KINDS}
    return {"config": asdict(cfg), "seeds": seeds, "chosen_lr": chosen, "methods": methods, "grid": grid,
            "paired": paired}


def result_markdown(r: dict[str, Any]) -> str:
    n = len(r["seeds"])
    lines = [f"| method | lr (chosen on dev) | paraphrase acc. (test, {n} seed{'s' if n > 1 else ''}) | verbatim acc. | "
             "seconds to add | bytes shipped | general loss change | KL | reverts exactly |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for m in METHODS:
        row = r["methods"][m]
        lr = f"{row['lr']:g}" if m in TRAINED and row["lr"] is not None else ""
        if m == "both" and lr:
            lr = f"{row['patch_lr']:g} (patch), {lr} (LoRA)"
        acc = {k: f"{row[k]['mean']:.1%}" + (f" ± {row[k]['std']:.1%}" if n > 1 else "") for k in KINDS}
        lines.append(f"| {row['name']} | {lr} | {acc['paraphrase']} | {acc['verbatim']} | {row['add_s']:.1f} | "
                     f"{row['bytes']:,.0f} | {row['general_loss_change']:+.4f} | {row['kl']:.4f} | "
                     f"{row['reverts_exactly']} |")
    return "\n".join(lines) + "\n"
