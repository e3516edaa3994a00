"""The knowledge benchmark: each method on the same facts, asked with the same questions, scored
with the same scorer, one resumable JSON file per run.

Fact sets
    - ``counterfactual``: edits of capitals the model knows (:mod:`engram.knowledge.counterfact`):
      seed 0 is the file's edits, each later seed the same subjects with new answers drawn again
      (:func:`engram.knowledge.counterfact.redraw_answers`);
    - ``new``: invented facts (:func:`engram.knowledge.facts.invent_facts`, one set per seed).
    Both are checked against the same *neighbourhood*: known capitals that no edit touches.

Methods
    - ``none``: the unedited model (the floor);
    - ``oracle``: the fact's own sentence before each question (the upper bound of retrieval);
    - ``retrieval``: BM25 top-k passages before each question (:mod:`engram.knowledge.retrieval`);
    - ``rome``: ROME edits applied one after another, measured after the last, then reverted;
    - ``patch``: one Engram table patch that teaches every fact at once (the fact-edit trainer,
      :mod:`engram.knowledge.editor`, with its dev-chosen defaults; it stops on the facts' dev
      questions, never on the held-out test questions), applied, measured, reverted;
    - ``patch+retrieval``: that patch applied and BM25 passages in the prompt (the combination);
    - ``keyed-patch``: the same trainer and settings with entries keyed by N-gram
      (``FactEditConfig.keyed``): read only where their own N-gram recurs;
    - ``lora``: LoRA weights (each rank of ``lora_ranks``) trained with the patch's data, loss and
      stopping, in place of table rows (a retrofitted Hugging Face model), measured, removed.

Per run: ``efficacy`` (exact answers to the verbatim form the edit was asked in),
``generalisation`` (the held-out test questions), ``specificity`` (the neighbourhood's test
questions with their true answers), the neighbourhood unedited (``specificity_before``), the
retrieval hit rate, extra prompt tokens per question, bytes added per fact, seconds to add the
facts, the KL on neutral text (weight edits), and whether reverting restores the model bit for bit.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from engram.errors import EngramError
from engram.fsutil import PathLike, RunFiles
from engram.knowledge.counterfact import redraw_answers
from engram.knowledge.edit_config import FactEditConfig
from engram.knowledge.facts import Fact, invent_facts
from engram.knowledge.memory import FactMemory, MemoryConfig
from engram.knowledge.retrieval import FactStore, RetrievalConfig, ask, distractor_sentences
from engram.knowledge.rome import RomeConfig, RomeEditor, down_proj
from engram.knowledge.scoring import ScoredAs, fact_cases, logprobs, neutral_change, neutral_windows, score
from engram.knowledge.templates import asked, chat_format, templates
from engram.patches.apply import apply_to_model, revert_from_model
from engram.patches.patchfile import save_patch
from engram.stats import format_p, paired_t

METHODS = ("none", "oracle", "retrieval", "rome", "patch", "patch+retrieval", "keyed-patch", "lora", "ngram",
           "patch-composed", "keyed-patch-composed")
SETS = ("counterfactual", "new")


class BenchError(EngramError):
    """Bad benchmark settings; the message names the value and the fix."""


@dataclass(frozen=True)
class BenchConfig:
    methods: tuple[str, ...] = METHODS
    sets: tuple[str, ...] = SETS
    seeds: tuple[int, ...] = (0,)
    facts: int = 100  # facts per run (the counterfactual file's first ones)
    neighbours: int = 100
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    rome: RomeConfig = field(default_factory=RomeConfig)
    neutral_windows: int = 8  # windows of neutral text for the KL
    neutral_len: int = 128  # tokens per window
    edit: FactEditConfig = field(default_factory=FactEditConfig)  # the patch methods' trainer
    lora_ranks: tuple[int, ...] = (8,)  # one lora run per rank and lr (alpha = 2 x rank)
    lora_lrs: tuple[float, ...] = (1e-3,)  # the grid the page chooses from on dev questions
    rome_layers: tuple[int, ...] = ()  # one rome run per layer, chosen on dev questions; () = (rome.layer,)
    rome_curve: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)  # measure after this many edits (and the last)
    memory: MemoryConfig = field(default_factory=MemoryConfig)  # the ngram method's index and lambda grid


def _exact(model: Any, tok: Any, facts: Sequence[Fact], pad: int, split: str) -> float:
    cases = fact_cases(tok, facts, lambda f: asked(f.relation, split), chat_format(tok))
    return score(model, cases, pad)["exact"] if cases else float("nan")


class Bench:
    """The benchmark over one model; methods' shared state (the store's distractors, ROME's
    covariance, the neutral text's reference) is built once."""

    def __init__(self, model: Any, tokenizer: Any, pad_id: int, cfg: BenchConfig,
                 counterfacts: Sequence[Any], neighbours: Sequence[Fact]) -> None:
        bad = [m for m in cfg.methods if m not in METHODS] + [s for s in cfg.sets if s not in SETS]
        if bad:
            raise BenchError(f"{bad}: unknown; methods are {list(METHODS)}, fact sets {list(SETS)}")
        self.model, self.tok, self.pad, self.cfg = model, tokenizer, pad_id, cfg
        self.counterfacts = list(counterfacts)[:cfg.facts]
        self.neighbours = list(neighbours)[:cfg.neighbours]
        self._distractors: Optional[list[str]] = None
        self._rome_cov: dict[int, torch.Tensor] = {}  # per layer
        self._neutral: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self._patches: dict[tuple[str, ...], tuple[Any, float]] = {}  # one trained patch per fact list
        self._memory: Optional[FactMemory] = None

    def facts(self, fact_set: str, seed: int) -> list[Fact]:
        if fact_set == "counterfactual":
            return [c.edit for c in redraw_answers(self.counterfacts, seed)]
        return invent_facts(self.cfg.facts, seed, forbidden=" ".join(self.distractors()))

    def distractors(self) -> list[str]:
        if self._distractors is None:
            r = self.cfg.retrieval
            self._distractors = distractor_sentences(r.distractors, r.sources, r.seed)
        return self._distractors

    def neutral(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._neutral is None:
            w = neutral_windows(self.tok, "eval", self.cfg.neutral_windows, self.cfg.neutral_len)
            self._neutral = (w, logprobs(self.model, w))
        return self._neutral

    # ------------------------------------------------------------------ one run
    def run(self, fact_set: str, method: str, seed: int, lora_rank: int = 0, lora_lr: float = 0.0,
            rome_layer: Optional[int] = None) -> dict[str, Any]:
        facts = self.facts(fact_set, seed)
        m, tok, pad = self.model, self.tok, self.pad
        rec: dict[str, Any] = {"set": fact_set, "method": method, "seed": seed, "facts": len(facts),
                               "neighbours": len(self.neighbours),
                               "specificity_before": _exact(m, tok, self.neighbours, pad, "test")}
        if method == "none":
            rec.update(efficacy=_exact(m, tok, facts, pad, "verbatim"),
                       generalisation=_exact(m, tok, facts, pad, "test"),
                       specificity=rec["specificity_before"], bytes_per_fact=0, add_seconds=0.0,
                       extra_prompt_tokens=0.0, reverted_bit_for_bit=True)
        elif method in ("oracle", "retrieval"):
            t0 = time.time()
            store = FactStore(facts, self.distractors())
            k = self.cfg.retrieval.k
            eff = ask(m, tok, facts, pad, store, "verbatim", method, k)
            gen = ask(m, tok, facts, pad, store, "test", method, k)
            spec = ask(m, tok, self.neighbours, pad, store, "test", method, k)
            rec.update(efficacy=eff["exact"], generalisation=gen["exact"], specificity=spec["exact"],
                       hit_rate_verbatim=eff["hit_rate"], hit_rate=gen["hit_rate"],
                       extra_prompt_tokens=gen["extra_prompt_tokens"],
                       bytes_per_fact=sum(len(p.encode()) for p, o in zip(store.passages, store.owner) if o >= 0)
                       / max(1, len(facts)),
                       add_seconds=time.time() - t0, reverted_bit_for_bit=True, k=k if method == "retrieval" else None)
        elif method in ("patch", "patch+retrieval", "keyed-patch"):
            rec.update(self._patch_run(facts, with_retrieval=method == "patch+retrieval", keyed=method == "keyed-patch"))
        elif method in ("patch-composed", "keyed-patch-composed"):
            rec.update(self._composed_run(facts, keyed=method == "keyed-patch-composed"))
        elif method == "ngram":
            rec.update(self._ngram_run(facts, f"{fact_set}-s{seed}"))
        elif method == "lora":
            rec.update(self._lora_run(facts, lora_rank or self.cfg.lora_ranks[0], lora_lr or self.cfg.lora_lrs[0]))
        else:  # rome
            rec.update(self._rome_run(facts, self.cfg.rome.layer if rome_layer is None else rome_layer))
        return rec

    def _rome_run(self, facts: Sequence[Fact], layer: int) -> dict[str, Any]:
        """Edits applied one after another at one layer; after the counts in ``cfg.rome_curve``
        (and the last) the edits so far and the neighbours are asked again, which shows how the
        edits degrade as they accumulate. Edit time excludes these measurements."""
        m, tok, pad = self.model, self.tok, self.pad
        cfg = replace(self.cfg.rome, layer=layer)
        if layer not in self._rome_cov:
            ed = RomeEditor(m, tok, cfg, cov_windows=neutral_windows(tok, "train", cfg.cov_windows,
                                                                    cfg.cov_window_len))
            self._rome_cov[layer] = ed.covariance
        ed = RomeEditor(m, tok, cfg, covariance=self._rome_cov[layer])
        w0 = down_proj(m, layer).weight.detach().clone()
        windows, before = self.neutral()
        marks = {c for c in self.cfg.rome_curve if c < len(facts)} | {len(facts)}
        edits, curve, add_s = [], [], 0.0
        try:
            for i, f in enumerate(facts, 1):
                t0 = time.time()
                edits.append(ed.edit(f))
                add_s += time.time() - t0
                if i in marks:
                    curve.append({"edits": i, "efficacy": _exact(m, tok, facts[:i], pad, "verbatim"),
                                  "generalisation": _exact(m, tok, facts[:i], pad, "test"),
                                  "specificity": _exact(m, tok, self.neighbours, pad, "test")})
            out = {"efficacy": curve[-1]["efficacy"], "generalisation": curve[-1]["generalisation"],
                   "specificity": curve[-1]["specificity"], "dev_exact": _exact(m, tok, facts, pad, "dev"),
                   "neutral": neutral_change(m, windows, before), "add_seconds": add_s,
                   "bytes_per_fact": sum(e.nbytes for e in edits) / max(1, len(edits)),
                   "extra_prompt_tokens": 0.0, "layer": layer, "curve": curve,
                   "optimised_nll": [e.stats["nll_optimised"] for e in edits]}
        finally:
            ed.revert_all()
        out["reverted_bit_for_bit"] = bool(torch.equal(down_proj(m, layer).weight, w0))
        return out

    def _patch_run(self, facts: Sequence[Fact], with_retrieval: bool, keyed: bool = False) -> dict[str, Any]:
        from engram.knowledge.editor import edit_facts  # torch-heavy; only this method needs it

        m, tok, pad = self.model, self.tok, self.pad
        ecfg = replace(self.cfg.edit, keyed=keyed or self.cfg.edit.keyed)
        train, dev = self._train_dev(facts)
        windows, before = self.neutral()
        key = (ecfg.keyed, *(f"{f.subject}|{f.relation}|{f.answer}" for f in facts))
        if key not in self._patches:  # patch and patch+retrieval read the same patch
            t0 = time.time()
            res = edit_facts(m, tok, train, ecfg, dev_cases=dev, pad_id=pad, progress=False)
            self._patches = {k: v for k, v in self._patches.items() if k[0] != ecfg.keyed}  # one set of facts per kind
            self._patches[key] = (res, time.time() - t0)
        res, add_s = self._patches[key]
        with tempfile.TemporaryDirectory() as d:
            size = save_patch(res.patch, Path(d) / "p.engp").stat().st_size
        out: dict[str, Any] = {"add_seconds": add_s, "bytes_per_fact": size / max(1, len(facts)),
                               "steps_run": res.report["steps_run"], "best_step": res.report["best_step"],
                               "edit": json.loads(json.dumps(asdict(ecfg)))}
        apply_to_model(m, res.patch)
        try:
            if with_retrieval:
                store = FactStore(facts, self.distractors())
                k = self.cfg.retrieval.k
                eff = ask(m, tok, facts, pad, store, "verbatim", "retrieval", k)
                gen = ask(m, tok, facts, pad, store, "test", "retrieval", k)
                spec = ask(m, tok, self.neighbours, pad, store, "test", "retrieval", k)
                out.update(efficacy=eff["exact"], generalisation=gen["exact"], specificity=spec["exact"],
                           hit_rate=gen["hit_rate"], extra_prompt_tokens=gen["extra_prompt_tokens"], k=k)
            else:
                out.update(efficacy=_exact(m, tok, facts, pad, "verbatim"),
                           generalisation=_exact(m, tok, facts, pad, "test"),
                           specificity=_exact(m, tok, self.neighbours, pad, "test"), extra_prompt_tokens=0.0)
            out["neutral"] = neutral_change(m, windows, before)
        finally:
            revert_from_model(m, res.patch)
        out["reverted_bit_for_bit"] = bool(torch.equal(logprobs(m, windows[:2]), before[:2]))
        return out

    def _composed_run(self, facts: Sequence[Fact], keyed: bool) -> dict[str, Any]:
        """Two patches made independently, each on half of the facts (as two tenants would), read
        together: every fact asked with both applied, and each half with its own patch alone
        (what composing them costs)."""
        from engram.knowledge.editor import edit_facts

        m, tok, pad = self.model, self.tok, self.pad
        ecfg = replace(self.cfg.edit, keyed=keyed)
        halves = [list(facts[0::2]), list(facts[1::2])]
        if not all(halves):
            raise BenchError(f"composition needs at least 2 facts, got {len(facts)}")
        patches, secs, steps = [], 0.0, []
        for half in halves:
            train, dev = self._train_dev(half)
            t0 = time.time()
            res = edit_facts(m, tok, train, ecfg, dev_cases=dev, pad_id=pad, progress=False)
            secs += time.time() - t0
            patches.append(res.patch)
            steps.append(res.report["best_step"])
        windows, before = self.neutral()
        both = _stacked(m, patches)
        alone = [_exact(_stacked(m, [p]), tok, half, pad, "test") for p, half in zip(patches, halves)]
        shared = 0
        for lid, lp in patches[0].layers.items():
            other = patches[1].layers.get(lid)
            if other is not None:
                a, b = (lp.keys, other.keys) if keyed else (lp.rows, other.rows)
                shared += int(torch.isin(a, b).sum())
        with tempfile.TemporaryDirectory() as d:
            size = sum(save_patch(p, Path(d) / f"p{i}.engp").stat().st_size for i, p in enumerate(patches))
        out: dict[str, Any] = {
            "efficacy": _exact(both, tok, facts, pad, "verbatim"), "generalisation": _exact(both, tok, facts, pad, "test"),
            "specificity": _exact(both, tok, self.neighbours, pad, "test"), "neutral": neutral_change(both, windows, before),
            "generalisation_each_alone": alone,
            "generalisation_alone": sum(a * len(h) for a, h in zip(alone, halves)) / len(facts),
            "shared_entries": shared, "add_seconds": secs, "bytes_per_fact": size / len(facts),
            "extra_prompt_tokens": 0.0, "best_steps": steps, "edit": json.loads(json.dumps(asdict(ecfg)))}
        out["reverted_bit_for_bit"] = bool(torch.equal(logprobs(m, windows[:2]), before[:2]))  # read per call only
        return out

    def _ngram_run(self, facts: Sequence[Fact], name: str) -> dict[str, Any]:
        """The facts' sentences added to the N-gram memory; lambda chosen on the facts' dev
        questions; measured mixed; removed, after which the mixture is as before, bit for bit."""
        if self._memory is None:
            self._memory = FactMemory(self.model, self.cfg.memory)
        mem, tok, pad = self._memory, self.tok, self.pad
        windows, before = self.neutral()
        probe = mem.mixed(self.cfg.memory.lambdas[0])
        pre = logprobs(probe, windows[:2])
        added = mem.add(facts, name)
        try:
            lam, dev = mem.choose_lambda(lambda m: _exact(m, tok, facts, pad, "dev"))
            mixed = mem.mixed(self.cfg.memory.lambdas[0] if lam is None else lam)
            out: dict[str, Any] = {
                "efficacy": _exact(mixed, tok, facts, pad, "verbatim"),
                "generalisation": _exact(mixed, tok, facts, pad, "test"),
                "specificity": _exact(mixed, tok, self.neighbours, pad, "test"),
                "neutral": neutral_change(mixed, windows, before), "lambda": lam, "lambda_dev_exact": dev,
                "add_seconds": added["add_seconds"], "bytes_per_fact": added["bytes"] / max(1, len(facts)),
                "extra_prompt_tokens": 0.0, "index_build_seconds": mem.build_seconds,
                "index_tokens": mem.index.num_tokens}
        finally:
            mem.remove(name)
        out["reverted_bit_for_bit"] = bool(torch.equal(logprobs(probe, windows[:2]), pre))
        return out

    def _train_dev(self, facts: Sequence[Fact]) -> tuple[list[Any], list[Any]]:
        chat, kinds = chat_format(self.tok), self.cfg.edit.kinds
        return (fact_cases(self.tok, facts, lambda f: templates(f.relation, "train", kinds), chat, True),
                fact_cases(self.tok, facts, lambda f: templates(f.relation, "dev"), chat))

    def _lora_run(self, facts: Sequence[Fact], rank: int, lr: float) -> dict[str, Any]:
        from engram.knowledge.editor import edit_facts

        m, tok, pad, ecfg = self.model, self.tok, self.pad, self.cfg.edit
        if not hasattr(m, "add_lora"):
            raise BenchError("the lora method needs a retrofitted Hugging Face model: --ckpt a retrofit adapter")
        train, dev = self._train_dev(facts)
        windows, before = self.neutral()
        m.add_lora(rank)
        try:
            params = {n: p for n, p in m.base.named_parameters() if "lora_" in n}
            t0 = time.time()
            res = edit_facts(m, tok, train, ecfg, dev_cases=dev, pad_id=pad, progress=False, extra=params,
                             extra_lr=lr, train_tables=False)
            add_s = time.time() - t0
            with torch.no_grad():  # the weights of the best dev step
                for n, p in params.items():
                    p.copy_(res.layer_state[n])
            out: dict[str, Any] = {
                "efficacy": _exact(m, tok, facts, pad, "verbatim"), "generalisation": _exact(m, tok, facts, pad, "test"),
                "specificity": _exact(m, tok, self.neighbours, pad, "test"), "neutral": neutral_change(m, windows, before),
                "add_seconds": add_s, "extra_prompt_tokens": 0.0, "lora_rank": rank, "lora_lr": lr,
                "bytes_per_fact": 4 * sum(p.numel() for p in params.values()) / max(1, len(facts)),
                "steps_run": res.report["steps_run"], "best_step": res.report["best_step"],
                "best_dev_exact": res.report["best_dev_exact"], "answer_loss_first": res.report["answer_loss_first"],
                "answer_loss_last": res.report["answer_loss_last"]}
        finally:
            m.remove_lora()
        out["reverted_bit_for_bit"] = bool(torch.equal(logprobs(m, windows[:2]), before[:2]))
        return out

    def settings(self, method: str) -> dict[str, Any]:
        """What shapes a run of ``method`` (not which runs are asked for), as its JSON file stores
        it: the settings all methods share and the method's own (a LoRA run's rank and lr are in
        its key), so that methods can be added to a benchmark directory later."""
        cfg = json.loads(json.dumps(asdict(self.cfg)))
        cfg["rome"].pop("layer")  # a rome run's layer is in its key
        return {k: cfg[k] for k in _SHARED_SETTINGS + _METHOD_SETTINGS[method]}

    def run_all(self, out: PathLike, progress: bool = False) -> list[dict[str, Any]]:
        runs = RunFiles(Path(out) / "runs")
        recs = []
        rome_layers = self.cfg.rome_layers or (self.cfg.rome.layer,)
        grid = [(m, r, lr, layer) for m in self.cfg.methods
                for r, lr, layer in ([(r, lr, None) for r in self.cfg.lora_ranks for lr in self.cfg.lora_lrs]
                                     if m == "lora" else [(0, 0.0, la) for la in rome_layers] if m == "rome"
                                     else [(0, 0.0, None)])]
        for fact_set in self.cfg.sets:
            for seed in self.cfg.seeds:
                for method, rank, lr, layer in grid:
                    key = (f"{fact_set}-{method}" + (f"{rank}-lr{lr:g}" if rank else "")
                           + (f"-L{layer}" if layer is not None else "") + f"-s{seed}")
                    settings = self.settings(method)
                    rec = runs.get(key)
                    if rec is not None and {k: rec.get("settings", {}).get(k) for k in settings} != settings:
                        raise BenchError(f"{out}: run {key} was made with other settings; give another --out "
                                         f"or the same settings")
                    if rec is None:
                        t0 = time.time()
                        rec = self.run(fact_set, method, seed, lora_rank=rank, lora_lr=lr, rome_layer=layer)
                        rec["wall_seconds"] = time.time() - t0
                        rec["settings"] = settings
                        runs.put(key, rec)
                    if progress:
                        print(format_row(rec), flush=True)
                    recs.append(rec)
        return recs


_SHARED_SETTINGS = ("facts", "neighbours", "neutral_windows", "neutral_len")
_METHOD_SETTINGS = {"none": (), "oracle": ("retrieval",), "retrieval": ("retrieval",), "rome": ("rome",),
                    "patch": ("edit",), "patch+retrieval": ("edit", "retrieval"), "keyed-patch": ("edit",),
                    "lora": ("edit",), "ngram": ("memory",), "patch-composed": ("edit",),
                    "keyed-patch-composed": ("edit",)}

COLUMNS = ("set", "method", "seed", "facts", "efficacy", "generalisation", "specificity", "hit_rate",
           "extra_prompt_tokens", "bytes_per_fact", "add_seconds", "reverted_bit_for_bit")


def _stacked(model: Any, patches: Sequence[Any]) -> ScoredAs:
    """``model`` reading ``patches`` at every call (the serving path: nothing is written to the
    tables), scored like a model."""
    patches = list(patches)
    return ScoredAs(model, lambda ids: model(ids, patches=patches))


def format_row(rec: dict[str, Any]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, bool) or v is None:
            return "-" if v is None else ("yes" if v else "no")
        return f"{v:.3g}" if isinstance(v, float) else str(v)
    named = {**rec, "method": _name(rec)}
    return " | ".join(cell(named.get(c)) for c in COLUMNS)


def table(recs: Sequence[dict[str, Any]]) -> str:
    """The runs as a Markdown table."""
    head = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
    return head + "".join(f"| {format_row(r)} |\n" for r in recs)


_PAGE_COLUMNS = (("efficacy", "efficacy", True), ("generalisation", "held-out questions", True),
                 ("specificity", "neighbourhood answered", True), ("hit_rate", "retrieval hit rate", True),
                 ("kl", "neutral KL", False), ("extra_prompt_tokens", "extra prompt tokens", False),
                 ("bytes_per_fact", "bytes / fact", False), ("add_seconds", "seconds to add", False))


def _cell(xs: Sequence[float], pct: bool) -> str:
    if not xs:
        return "-"
    f = (lambda x: f"{100 * x:.1f}%") if pct else (lambda x: f"{x:.4g}")
    if len(xs) == 1:
        return f(xs[0])
    m = sum(xs) / len(xs)
    sd = (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5
    return f"{f(m)} ± {f(sd)} ({', '.join(f(x) for x in xs)})"


def _name(r: dict[str, Any]) -> str:
    if r.get("lora_rank"):
        return f"lora r{r['lora_rank']} lr {r['lora_lr']:g}"
    if r["method"] == "ngram":
        return "ngram memory"
    return f"rome L{r['layer']}" if r["method"] == "rome" else r["method"]


def _best_on_dev(groups: dict[str, list[dict[str, Any]]], dev_key: str) -> Optional[str]:
    """The group whose runs answer most dev questions (mean over the seeds every group ran, the
    grid's, so that a candidate later run on more seeds is compared like with like; ties: lower
    neutral KL). None when every group answers none: a tie-break among zeros is not a choice."""
    common = set.intersection(*({r["seed"] for r in rs} for rs in groups.values())) if groups else set()
    if common:
        groups = {n: [r for r in rs if r["seed"] in common] for n, rs in groups.items()}

    def mean(n: str, f: Any) -> float:  # rounded: equal fractions of questions must tie exactly
        return round(sum(f(r) for r in groups[n]) / len(groups[n]), 9)

    if not groups or all(mean(n, lambda r: r[dev_key]) == 0 for n in groups):
        return None
    return max(groups, key=lambda n: (mean(n, lambda r: r[dev_key]), -mean(n, lambda r: r["neutral"]["kl"])))


def _dev_choices(rows: Sequence[dict[str, Any]]) -> set[str]:
    """Per LoRA rank, the lr chosen on dev questions, and ROME's layer (see :func:`_best_on_dev`)."""
    out = set()
    pools = [("best_dev_exact", lambda r, rank=rank: r.get("lora_rank") == rank)
             for rank in sorted({r["lora_rank"] for r in rows if r.get("lora_rank")})]
    pools.append(("dev_exact", lambda r: r["method"] == "rome" and "dev_exact" in r))
    for dev_key, member in pools:
        by: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            if member(r):
                by.setdefault(_name(r), []).append(r)
        best = _best_on_dev(by, dev_key)
        if best is not None:
            out.add(best)
    return out


def _rome_curves(rows: Sequence[dict[str, Any]]) -> list[str]:
    """ROME's answers as its edits accumulate, one table per run."""
    lines = []
    for r in rows:
        if r["method"] != "rome" or not r.get("curve"):
            continue
        lines += [f"ROME at layer {r['layer']} (seed {r['seed']}), as edits accumulate:", "",
                  "| edits applied | efficacy (edits so far) | held-out questions (edits so far) | neighbourhood answered |",
                  "|---|---|---|---|"]
        lines += [f"| {c['edits']} | {100 * c['efficacy']:.1f}% | {100 * c['generalisation']:.1f}% | "
                  f"{100 * c['specificity']:.1f}% |" for c in r["curve"]]
        lines.append("")
    return lines


def _paired(rows: Sequence[dict[str, Any]], chosen: set[str]) -> list[str]:
    """Each Engram patch against the dev-chosen LoRA and ROME and against retrieval, and the keyed
    patch against the hashed one alone and with retrieval, paired by seed (the same facts): held-out
    answers, the neighbourhood and, between weight or table edits, the neutral KL."""
    by: dict[str, dict[int, dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(_name(r), {})[r["seed"]] = r
    lines = []
    baselines = sorted(n for n in chosen if n.startswith(("lora", "rome"))) + ["retrieval"]
    for a, others in (("keyed-patch", baselines + ["patch", "patch+retrieval"]), ("patch", baselines)):
        for b in others:
            seeds = sorted(set(by.get(a, {})) & set(by.get(b, {})))
            if len(seeds) < 2:
                continue
            keys = [("generalisation", "held-out", True), ("specificity", "neighbourhood", True)]
            keys += [("kl", "neutral KL", False)] if b.startswith(("lora", "rome")) or b == "patch" else []
            parts = []
            for key, label, pct in keys:
                x, y = ([(by[n][s].get("neutral") or {}).get("kl") if key == "kl" else by[n][s][key] for s in seeds]
                        for n in (a, b))
                show = (lambda v: f"{100 * v:.1f}%") if pct else (lambda v: f"{v:.4f}")
                parts.append(f"{label} {show(sum(x) / len(x))} against {show(sum(y) / len(y))} "
                             f"(p = {format_p(paired_t(x, y)['p'])})")
            lines.append(f"- {a} against {b}, seeds {', '.join(map(str, seeds))}: " + "; ".join(parts) + ".")
    return (["Paired by seed (the same facts; paired t-test):", "", *lines, ""]) if lines else []


def _wall_time(recs: Sequence[dict[str, Any]]) -> list[str]:
    """What the page cost to make: the runs' own wall seconds summed, per fact set and in all
    (each run from its start to its record, scoring included; runs that overlapped count each)."""
    timed = [r for r in recs if r.get("wall_seconds") is not None]
    if not timed:
        return []
    per = {fs: sum(r["wall_seconds"] for r in timed if r["set"] == fs) for fs in SETS}
    untimed = len(recs) - len(timed)
    return [f"Wall time of the runs on this page: {sum(per.values()) / 3600:.2f} hours in all, the sum of each of "
            f"{len(timed)} runs' own seconds (" + ", ".join(f"{fs} facts {v / 3600:.2f} h" for fs, v in per.items() if v)
            + "; runs that shared the machine count in full, so this is the time on one machine run one after "
            "another at the load each saw)" + (f"; {untimed} runs recorded no wall time" if untimed else "") + ".", ""]


def page_markdown(recs: Sequence[dict[str, Any]]) -> str:
    """The runs as one table per fact set, a row per method (mean ± std over seeds, every run in
    brackets), then each method's settings; every number comes from the run files."""
    lines = []
    for fact_set in SETS:
        rows = sorted((r for r in recs if r["set"] == fact_set),
                      key=lambda r: (METHODS.index(r["method"]), r.get("lora_rank", 0), r.get("lora_lr", 0),
                                     r.get("layer", 0), r["seed"]))
        if not rows:
            continue
        chosen = _dev_choices(rows)
        lines += [f"### {fact_set} facts ({rows[0]['facts']} per run, {rows[0]['neighbours']} neighbours; the unedited "
                  f"model answers {100 * rows[0]['specificity_before']:.1f}% of the neighbours' questions)", "",
                  "| method | seeds | " + " | ".join(c[1] for c in _PAGE_COLUMNS) + " | reverts bit for bit |",
                  "|---|---|" + "---|" * (len(_PAGE_COLUMNS) + 1)]
        names: list[str] = []
        for r in rows:
            if _name(r) not in names:
                names.append(_name(r))
        for name in names:
            rs = [r for r in rows if _name(r) == name]
            cells = []
            for key, _, pct in _PAGE_COLUMNS:
                xs = [(r.get("neutral") or {}).get("kl") if key == "kl" else r.get(key) for r in rs]
                cells.append(_cell([float(x) for x in xs if x is not None], pct))
            rev = "yes" if all(r.get("reverted_bit_for_bit") for r in rs) else "no"
            label = name + ((" (layer chosen on dev)" if name.startswith("rome") else " (lr chosen on dev)")
                            if name in chosen else "")
            lines.append(f"| {label} | {', '.join(str(r['seed']) for r in rs)} | " + " | ".join(cells) + f" | {rev} |")
        lines.append("")
        lines += _paired(rows, chosen)
        if any(r.get("lora_rank") for r in rows):
            lines.append("LoRA dev questions answered (the lr choice): " + "; ".join(
                f"{_name(r)} seed {r['seed']}: {100 * r['best_dev_exact']:.1f}%" for r in rows if r.get("lora_rank"))
                + ("." if any(n.startswith("lora") for n in chosen)
                   else "; none answers any, so no lr is chosen."))
            lines.append("")
        rome_dev = [r for r in rows if r["method"] == "rome" and "dev_exact" in r]
        if rome_dev:
            lines.append("ROME dev questions answered (the layer choice): " + "; ".join(
                f"{_name(r)} seed {r['seed']}: {100 * r['dev_exact']:.1f}%" for r in rome_dev)
                + ("." if any(n.startswith("rome") for n in chosen) else "; none answers any, so no layer is chosen."))
            lines.append("")
        mem = [r for r in rows if r["method"] == "ngram"]
        if mem:
            lines.append("N-gram memory, lambda chosen on dev questions (dev answered per lambda): " + "; ".join(
                f"seed {r['seed']}: " + ("none chosen, every lambda answers no dev question" if r["lambda"] is None
                                         else f"lambda {r['lambda']:g}") + " ("
                + ", ".join(f"{k}: {100 * v:.1f}%" for k, v in r["lambda_dev_exact"].items()) + ")" for r in mem)
                + f". Index: the model's training text, {mem[0]['index_tokens']:,} tokens, built once in "
                f"{mem[0]['index_build_seconds']:.1f} s; the facts' sentences are added as a delta.")
            lines.append("")
        comp = [r for r in rows if r["method"].endswith("-composed")]
        if comp:
            lines.append("Composition (two patches, each made alone on half of the facts, read together): " + "; ".join(
                f"{r['method']} seed {r['seed']}: held-out {100 * r['generalisation']:.1f}% together, "
                f"{100 * r['generalisation_alone']:.1f}% each with its own patch alone, {r['shared_entries']} "
                f"entries changed by both" for r in comp) + ".")
            lines.append("")
        lines += _rome_curves(rows)
    lines += _wall_time(recs)
    first = {r["method"]: r.get("settings", {}) for r in reversed(list(recs))}
    said = []
    for method in ("patch", "lora"):
        e = first.get(method, {}).get("edit")
        if e:
            said.append(f"{method}: {'rows' if method == 'patch' else 'weights'} trained on forms "
                        f"{'+'.join(e.get('kinds', []))}, answer loss + KL, at most {e.get('steps')} steps, "
                        f"stopping on dev questions every {e.get('eval_every')}"
                        + (f", lr {e.get('lr')}, rows {e.get('rows')}" if method == "patch" else ""))
    rome_layers = sorted({r["layer"] for r in recs if r["method"] == "rome"})
    if rome_layers:
        said.append(f"rome: layer{'s' if len(rome_layers) > 1 else ''} {', '.join(map(str, rome_layers))}, "
                    f"{first['rome']['rome'].get('steps')} steps")
    ret = first.get("retrieval", first.get("oracle", {})).get("retrieval")
    if ret:
        said.append(f"retrieval: top {ret.get('k')} of the facts' sentences and {ret.get('distractors')} distractors")
    if said:
        lines.append("Settings: " + "; ".join(said) + ".")
        # How each setting was come by, so a reader can weigh the comparison.
        how = []
        if "patch" in first:
            how.append("the patch's lr, rows and forms are the fact-edit study's choices on its own dev facts "
                       "(invented, none of these); its stopping reads the edited facts' dev questions")
        if "lora" in first:
            how.append("LoRA's lr is chosen here on the edited facts' dev questions (templates never asked "
                       "as held-out questions), the data the patch's stopping reads")
        if len(rome_layers) > 1:
            how.append("ROME's layer is chosen here on the edited facts' dev questions after all edits")
        elif rome_layers:
            how.append(f"ROME's layer ({rome_layers[0]}) was set, not chosen on dev")
        lines += ["", "How the settings were chosen: " + "; ".join(how) + "."] if how else []
    return "\n".join(lines) + "\n"


def write_page(out: PathLike, page: PathLike, command: str, machine: str) -> Path:
    """``OUT``'s runs as a results page: date, machine and command above :func:`page_markdown`."""
    recs = RunFiles(Path(out) / "runs").all()
    if not recs:
        raise BenchError(f"{out}/runs holds no runs; run the benchmark first")
    text = (f"# Knowledge edits side by side on one model\n\nDate: {time.strftime('%Y-%m-%d')}. Machine: {machine}."
            f"\n\nCommand:\n\n```bash\n{command}\n```\n\n{page_markdown(recs)}")
    data = text.encode()
    from engram.fsutil import atomic_write

    atomic_write(page, lambda f: f.write(data))
    return Path(page)
