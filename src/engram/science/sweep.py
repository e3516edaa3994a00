"""Experiment sweeps: grids of configs x seeds, budgets held fixed by construction, paired stats.

A sweep is a :class:`SweepSpec`: a base model (a preset name or a full ``ModelConfig`` dict), a
train recipe, seeds, and a list of :class:`ConfigSpec` that override the base. It can be written
as JSON (``engram sweep run --spec my.json``) or taken from the built-in named sweeps:

- ``rho``: the allocation law. Fixed total sparse budget P_sparse = routed-expert params + table
  params. rho = share of P_sparse kept in routed experts. rho = 1 is the pure MoE; for rho < 1
  the number of routed experts is cut to round(E * rho) (expert width and top-k unchanged, so
  the routed FLOPs and activated routed params per token are identical) and the freed params
  minus Engram's own projections go to table rows, so the *total* is equal (within the prime
  rounding of table sizes, asserted <= 0.5%). Engram's projections/gate/conv are the only
  activated-parameter difference; the accountant prints it.
- ``table-size``: the memory scaling law. The rho = 1 MoE backbone is fixed and an Engram
  module with 2^k table slots per hash head is added (loss vs log(slots)).
- ``baselines``: one fixed total budget (the rho = 1 MoE's), every model filled to it:
  MoE, Engram+MoE at rho = 0.75, bigram hash embedding, OverEncoding and Engram ablations (no
  gate, no conv, no compression, hc_mult = 4, +4-gram, placement); plus a dense model at the
  MoE's *activated* size (it cannot match both budgets).
- ``bigram``: the modded-nanogpt bigram baseline in its own form (a table of 5x the vocabulary,
  its row added before every block) with a table learning-rate sweep, against Engram filled to
  the same total on the same backbone.
- ``historian``: Engram as a routed expert (``engram.placement = "expert"``, the "historian"):
  the last of 12 routed slots at layer 1 reads the memory, the router picks it per token; tables
  filled to the MoE's total, table lr 5x or 1x chosen on dev; against ``moe`` and ``engram``.
- ``smoke``: tiny, a few steps; used by the test suite.

A config with ``"fill_to": "reference"`` (or an int) gets its table size computed so that its
total parameter count equals the reference config's (or that int).

Runs live in ``<runs_root>/<key>`` where ``key`` hashes the full model and train config (the
seed included), so identical runs are shared between sweeps (the rho = 1 MoE is the ``moe``
reference of the other two) and a changed config never reuses an old directory. A run is finished when ``result.json`` exists; a run with a checkpoint but no
result is resumed with ``train(resume=True)``. Every run writes ``metrics.jsonl`` (train()).

Dev and test: after training, every run is evaluated on the validation windows split in two
(first half of the text = dev, second half = test). Choices between settings (a ``group`` of
configs, e.g. learning rates) are made on mean dev loss; tables report test loss.

Statistics: mean +- sample std over seeds; each config against the reference is a paired t-test
over seeds (the same seed means the same initial RNG and the same batches), two-sided, with the
Student-t CDF computed exactly for integer degrees of freedom (``engram.stats``).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import multiprocessing as mp
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

from engram.config import PRESETS, ModelConfig, TrainConfig, canonical_model_dict, preset
from engram.data import shards as data
from engram.data.shards import load_dataset
from engram.errors import EngramError
from engram.fsutil import PathLike
from engram.model.checkpoint import load_model
from engram.science.accounting import account, check_budget, format_account
from engram.science.evalsplit import dev_test_batches, eval_batch_count
from engram.science.knowledge import FactSet, build_fact_set, evaluate_facts
from engram.science.routing import historian_routing
from engram.stats import format_p, mean_std, paired_t
from engram.training.trainer import train

RESULT_FILE = "result.json"
BUDGET_TOL = 0.005  # relative: prime table sizes make totals land a few rows off


class SweepError(EngramError):
    """A sweep spec or run directory is invalid; the message names the value and the fix."""


# ----------------------------------------------------------------------------- specs
@dataclass
class ConfigSpec:
    """One point of the grid. ``model`` holds overrides merged into the sweep's base model."""

    name: str
    model: dict[str, Any] = field(default_factory=dict)
    x: Optional[float] = None  # the sweep's abscissa (rho, log2 slots, ...)
    fill_to: Union[None, str, int] = None  # "reference", a config name, or a parameter count
    note: str = ""
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig overrides for this config
    # Configs sharing a group are settings of one method (e.g. its learning rates): the summary
    # marks the one with the lowest mean *dev* loss as the group's choice; test loss is reported.
    group: str = ""

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise SweepError(f"config name {self.name!r} must be non-empty, without '/' or a leading '.'")
        if not isinstance(self.model, dict):
            raise SweepError(f"config {self.name!r}: 'model' must be an object of ModelConfig overrides")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ConfigSpec":
        known = {"name", "model", "x", "fill_to", "note", "train", "group"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise SweepError(f"config {d.get('name')!r}: unknown key(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


@dataclass
class SweepSpec:
    name: str
    configs: list[ConfigSpec]
    base: Union[str, dict[str, Any]] = "moe"
    train: dict[str, Any] = field(default_factory=dict)
    seeds: tuple[int, ...] = (0, 1, 2)
    reference: Optional[str] = None  # the config every other one is compared with
    kind: str = "custom"  # rho | table-size | baselines | custom: picks the plots
    vocab_size: int = 4096
    fact_per_relation: int = 40  # 0 disables the knowledge benchmark

    def __post_init__(self) -> None:
        self.seeds = tuple(int(s) for s in self.seeds)
        self.configs = [c if isinstance(c, ConfigSpec) else ConfigSpec.from_dict(c) for c in self.configs]
        if not self.configs:
            raise SweepError(f"sweep {self.name!r} has no configs; add at least one to 'configs'")
        names = [c.name for c in self.configs]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise SweepError(f"sweep {self.name!r}: duplicate config names {dup}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
            raise SweepError(f"seeds={list(self.seeds)} must be distinct non-negative ints (>= 1 of them)")
        self.reference = self.reference or self.configs[0].name
        if self.reference not in names:
            raise SweepError(f"reference={self.reference!r} is not a config; choose one of {names}")
        if self.kind not in ("rho", "table-size", "baselines", "custom"):
            raise SweepError(f"kind={self.kind!r}; choose rho, table-size, baselines or custom")
        if self.fact_per_relation < 0:
            raise SweepError(f"fact_per_relation={self.fact_per_relation} must be >= 0")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SweepSpec":
        known = {"name", "configs", "base", "train", "seeds", "reference", "kind", "vocab_size",
                 "fact_per_relation"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise SweepError(f"sweep spec: unknown key(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "base": self.base, "train": self.train,
                "seeds": list(self.seeds), "reference": self.reference, "vocab_size": self.vocab_size,
                "fact_per_relation": self.fact_per_relation,
                "configs": [{"name": c.name, "model": c.model, "x": c.x, "fill_to": c.fill_to,
                             "note": c.note, "train": c.train, "group": c.group} for c in self.configs]}


def load_spec(path: PathLike) -> SweepSpec:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise SweepError(f"cannot read sweep spec {path}: {e}") from None
    return SweepSpec.from_dict(data)


# ----------------------------------------------------------------------------- resolution
def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def base_model(spec: SweepSpec) -> dict[str, Any]:
    if isinstance(spec.base, str):
        return preset(spec.base, spec.vocab_size).to_dict() if spec.base in _PRESET_NAMES() \
            else _BACKBONES[spec.base](spec.vocab_size)
    return ModelConfig.from_dict({**spec.base, "vocab_size": spec.vocab_size}).to_dict()


def _PRESET_NAMES():
    return PRESETS


def fill_tables(model: dict[str, Any], target_total: int) -> dict[str, Any]:
    """Size the tables (Engram and/or input N-gram) so that the total equals ``target_total``."""
    model = copy.deepcopy(model)
    eng, inp = model.get("engram"), model.get("input_ngram")
    if eng is None and inp is None:
        raise SweepError("fill_to needs a config with 'engram' or 'input_ngram' tables to size")
    if eng is not None and inp is not None:
        raise SweepError("fill_to sizes one kind of table; give either 'engram' or 'input_ngram'")

    def with_rows(rows_per_head: int) -> ModelConfig:
        cfg = ModelConfig.from_dict(copy.deepcopy(model))
        if cfg.engram is not None:
            return dataclasses.replace(cfg, engram=dataclasses.replace(
                cfg.engram, rows_per_head=(rows_per_head,) * (cfg.engram.max_ngram_size - 1)))
        return dataclasses.replace(cfg, input_ngram=dataclasses.replace(cfg.input_ngram, rows_per_head=rows_per_head))

    def total_with(rows_per_head: int) -> tuple[int, int]:
        acc = account(with_rows(rows_per_head))
        return acc["total"], acc["table_params"]

    probe = 64
    tot, tab = total_with(probe)
    rest = tot - tab
    cfg = with_rows(probe)
    if cfg.engram is not None:  # heads of every Engram layer, each row head_dim wide
        dh, heads = cfg.engram.head_dim, cfg.engram.num_heads_total * len(cfg.engram.layer_ids)
    else:  # one table per order, rows as wide as the residual stream
        dh, heads = cfg.hidden_size, len(cfg.input_ngram.orders)
    per_head = (target_total - rest) // (dh * heads)
    if per_head < 2:
        raise SweepError(f"target total {target_total:,} leaves {target_total - rest:,} params for tables "
                         f"(non-table params {rest:,}); raise the budget or shrink the non-table part")
    tot, _ = total_with(per_head)
    per_head -= max(0, (tot - target_total)) // (dh * heads)  # undo the prime rounding overshoot
    return with_rows(per_head).to_dict()


@dataclass
class ResolvedConfig:
    name: str
    model: dict[str, Any]
    x: Optional[float]
    note: str
    account: dict[str, Any]
    train: dict[str, Any] = field(default_factory=dict)
    group: str = ""


def resolve(spec: SweepSpec) -> list[ResolvedConfig]:
    """Full model dicts for every config, with tables filled to their budgets and accounted."""
    base = base_model(spec)
    merged = {c.name: ModelConfig.from_dict(_merge(base, canonical_model_dict(c.model))).to_dict()
              for c in spec.configs}
    totals: dict[str, int] = {}
    out = []
    order = sorted(spec.configs, key=lambda c: c.fill_to is not None)  # budgets before fillers
    for c in order:
        m = merged[c.name]
        if c.fill_to is not None:
            ref = spec.reference if c.fill_to == "reference" else c.fill_to
            if isinstance(ref, str):
                if ref not in totals:
                    raise SweepError(f"config {c.name!r}: fill_to={c.fill_to!r} names {ref!r}, which "
                                     f"must be a config without fill_to")
                target = totals[ref]
            else:
                target = int(ref)
            m = fill_tables(m, target)
            acc = account(ModelConfig.from_dict(m))
            check_budget(f"{c.name} total", acc["total"], target, BUDGET_TOL)
        acc = account(ModelConfig.from_dict(m))
        totals[c.name] = acc["total"]
        out.append(ResolvedConfig(c.name, m, c.x, c.note, acc, dict(c.train), c.group))
    rank = {c.name: i for i, c in enumerate(spec.configs)}
    return sorted(out, key=lambda r: rank[r.name])


def train_config(spec: SweepSpec, seed: int, overrides: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    return TrainConfig.from_dict({**TrainConfig().to_dict(), **spec.train, **(overrides or {}),
                                  "seed": seed}).to_dict()


def run_key(model: dict[str, Any], train: dict[str, Any]) -> str:
    """The run directory's name: a hash of the configs. Keys renamed since (``rows_per_head``) are
    hashed under their old spelling, so runs made before the rename are found again."""
    model = copy.deepcopy(model)
    for section, old in (("engram", "engram_vocab_size"), ("input_ngram", "table_size")):
        if isinstance(model.get(section), dict) and "rows_per_head" in model[section]:
            model[section][old] = model[section].pop("rows_per_head")
    blob = json.dumps({"model": model, "train": train}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


@dataclass
class RunPlan:
    config: str
    seed: int
    model: dict[str, Any]
    train: dict[str, Any]
    run_dir: Path

    @property
    def done(self) -> bool:
        return (self.run_dir / RESULT_FILE).is_file()

    @property
    def started(self) -> bool:
        return (self.run_dir / "config.json").is_file()


def plan(spec: SweepSpec, runs_root: PathLike) -> tuple[list[ResolvedConfig], list[RunPlan]]:
    resolved = resolve(spec)
    plans = []
    for seed in spec.seeds:  # seed-major: a partial sweep has whole seeds for paired tests
        for r in resolved:
            tr = train_config(spec, seed, r.train)
            plans.append(RunPlan(r.name, seed, r.model, tr,
                                 Path(runs_root) / run_key(r.model, tr)))
    return resolved, plans


# ----------------------------------------------------------------------------- execution
def _execute(plan_d: dict[str, Any], data_dir: str, facts: Optional[dict[str, Any]],
             threads: int, max_seconds: Optional[float]) -> dict[str, Any]:
    """Train (or resume) one run, evaluate facts, write result.json. Runs in a worker process."""
    torch.set_num_threads(threads)
    run_dir = Path(plan_d["run_dir"])
    mcfg, tcfg = ModelConfig.from_dict(plan_d["model"]), TrainConfig.from_dict(plan_d["train"])
    resume = (run_dir / "config.json").is_file()
    summary = train(mcfg, tcfg, data_dir, run_dir, resume=resume, progress=False,
                    max_seconds=max_seconds, overwrite=not resume)
    if summary["stopped_early"]:
        return {"config": plan_d["config"], "seed": plan_d["seed"], "finished": False}
    result = {"config": plan_d["config"], "seed": plan_d["seed"], "final_val_loss": summary["final_val_loss"],
              "best_val_loss": summary["best_val_loss"], "steps": summary["steps"],
              "train_s": summary["train_s"], "tokens_per_s": summary["tokens_per_s"],
              "param_counts": summary["param_counts"], "resumed_from": summary["resumed_from"],
              "account": account(mcfg, tcfg.seq_len)}
    model, _ = load_model(run_dir)
    result.update(dev_test_losses(model, data_dir, tcfg))
    routing = historian_routing(model, data_dir, tcfg, result["account"])
    if routing is not None:  # a model with a historian expert: how the router uses it, on test
        result["routing"] = routing
    if facts is not None:
        result["facts"] = evaluate_facts(model, FactSet.from_dict(facts))
        gates = _gate_stats(model, data_dir, tcfg)
        if gates:
            result["gates"] = gates
    tmp = run_dir / f".{RESULT_FILE}.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, run_dir / RESULT_FILE)
    result["finished"] = True
    return result


def dev_test_losses(model, data_dir: PathLike, tcfg: TrainConfig) -> dict[str, float]:
    """Mean loss on the validation windows split in two: the first half of the split's text is
    **dev** (for choices between configs, e.g. a learning rate), the second half **test** (what
    tables report). Same windows as the trainer's final evaluation (``eval_batches``)."""
    ds = data.load_dataset(data_dir)
    n = eval_batch_count(ds.val, tcfg)  # a small validation split gives fewer than eval_batches
    if n < 2:
        raise SweepError(f"{n} evaluation batch(es) of {tcfg.batch_size} x {tcfg.seq_len} tokens (train.eval_batches="
                         f"{tcfg.eval_batches}, validation split of {data_dir}): a dev/test split needs >= 2; "
                         f"raise eval_batches or give more validation text")
    sums = {"dev_loss": [0.0, 0], "test_loss": [0.0, 0]}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for half, x, y in dev_test_batches(ds.val, tcfg):
                acc = sums[f"{half}_loss"]
                acc[0] += float(model(x, y).loss) * y.numel()
                acc[1] += y.numel()
    finally:
        model.train(was_training)
    return {k: total / count for k, (total, count) in sums.items()}


def _gate_stats(model, data_dir: str, tcfg: TrainConfig) -> Optional[dict[str, float]]:
    """Mean gate and share of saturated gates (< 0.05 or > 0.95) on a few validation batches."""
    layers = model.engram_layers
    if not layers or not layers[0].cfg.use_gate:
        return None
    ds = data.load_dataset(data_dir)
    vals = []
    with torch.no_grad():
        model.eval()
        for x, _ in data.iter_eval_batches(ds.val, tcfg.batch_size, tcfg.seq_len, 4):
            gates = model(x, output_gates=True).gates
            vals.append(torch.cat([gates[e.layer_id].flatten() for e in layers]))
    g = torch.cat(vals)
    return {"mean": float(g.mean()), "std": float(g.std()),
            "saturated_low": float((g < 0.05).float().mean()),
            "saturated_high": float((g > 0.95).float().mean())}


def run_sweep(spec: SweepSpec, data_dir: PathLike, runs_root: PathLike, workers: int = 1,
              threads: int = 1, max_seconds: Optional[float] = None, progress: bool = True,
              log: Callable[[str], None] = print, only: Optional[Sequence[str]] = None) -> list[RunPlan]:
    """Run every unfinished (config, seed); returns the plans. ``max_seconds`` caps the session
    (runs still going are stopped, saved and resumed next time)."""
    t0 = time.perf_counter()
    resolved, plans = plan(spec, runs_root)
    if only:
        plans = [p for p in plans if p.config in set(only)]
    ref = next(r for r in resolved if r.name == spec.reference)
    log(f"sweep {spec.name}: {len(resolved)} configs x {len(spec.seeds)} seeds; budgets:")
    for r in resolved:
        d_act = r.account["activated_per_token"] / ref.account["activated_per_token"] - 1
        log(f"  {r.name:<22} {format_account(r.account)} | activated vs {spec.reference}: {d_act:+.1%}")
    todo = [p for p in plans if not p.done]
    log(f"  {len(plans) - len(todo)} runs finished, {sum(p.started for p in todo)} to resume, "
        f"{sum(not p.started for p in todo)} to start")
    facts = None
    if spec.fact_per_relation and todo:
        facts = _fact_set(data_dir, runs_root, spec.fact_per_relation)
    Path(runs_root).mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(todo), desc=f"sweep {spec.name}", disable=not progress)

    def remaining() -> Optional[float]:
        return None if max_seconds is None else max(1.0, max_seconds - (time.perf_counter() - t0))

    def report(res: dict[str, Any]) -> None:
        bar.update(1)
        if res.get("finished"):
            log(f"  done {res['config']} seed {res['seed']}: dev {res['dev_loss']:.4f}, test {res['test_loss']:.4f}"
                + (f", facts {res['facts']['accuracy']:.3f}" if "facts" in res else ""))
        else:
            log(f"  paused {res['config']} seed {res['seed']} (time budget); rerun to resume")

    args = lambda p: ({"config": p.config, "seed": p.seed, "model": p.model, "train": p.train,
                       "run_dir": str(p.run_dir)}, str(data_dir), facts, threads)
    try:
        if workers <= 1:
            for p in todo:
                if max_seconds is not None and time.perf_counter() - t0 >= max_seconds:
                    break
                report(_execute(*args(p), remaining()))
        else:
            with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
                futs = [ex.submit(_execute, *args(p), None if max_seconds is None else max_seconds) for p in todo]
                for f in as_completed(futs):
                    report(f.result())
    finally:
        bar.close()
    return plans


def _fact_set(data_dir: PathLike, runs_root: PathLike, per_relation: int) -> dict[str, Any]:
    """The tokenized fact sample, cached beside the runs (keyed by tokenizer and sample size)."""
    ds = load_dataset(data_dir)
    path = Path(runs_root) / f"facts_{ds.meta['tokenizer_fingerprint'][:12]}_{per_relation}.json"
    if path.is_file():
        return json.loads(path.read_text())
    # Only facts from corpus sources the dataset holds (a countries-only dataset has no cities).
    srcs = sorted(set(ds.meta.get("tokens_per_source", {}).get("train", {})) & {"countries", "cities"})
    fs = build_fact_set(ds.tokenizer, float(ds.meta.get("val_fraction", 0.05)), int(ds.meta.get("seed", 0)),
                        per_relation, sources=srcs or None).to_dict()
    Path(runs_root).mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(fs))
    return fs


# ----------------------------------------------------------------------------- summary
def collect(spec: SweepSpec, runs_root: PathLike) -> dict[str, Any]:
    """Read every finished run of ``spec``: per-config stats, paired tests, curves."""
    resolved, plans = plan(spec, runs_root)
    by_cfg: dict[str, dict[int, dict[str, Any]]] = {r.name: {} for r in resolved}
    curves: dict[str, dict[int, list[tuple[int, float]]]] = {r.name: {} for r in resolved}
    for p in plans:
        if not p.done:
            continue
        by_cfg[p.config][p.seed] = json.loads((p.run_dir / RESULT_FILE).read_text())
        pts = []
        for line in (p.run_dir / "metrics.jsonl").read_text().splitlines():
            rec = json.loads(line)
            if "val_loss" in rec:
                pts.append((rec["step"], rec["val_loss"]))
        curves[p.config][p.seed] = pts
    ref = spec.reference

    def test(run: dict[str, Any]) -> float:  # runs from before the dev/test split: whole val
        return run.get("test_loss", run["final_val_loss"])

    rows = []
    for r in resolved:
        runs = by_cfg[r.name]
        seeds = sorted(runs)
        acc = [runs[s]["facts"]["accuracy"] for s in seeds if "facts" in runs[s]]
        bits = [runs[s]["facts"]["stored_bits_est"] for s in seeds if "facts" in runs[s]]
        row = {"config": r.name, "x": r.x, "note": r.note, "group": r.group, "account": r.account,
               "seeds": seeds, "test_loss": [test(runs[s]) for s in seeds],
               "dev_loss": [runs[s]["dev_loss"] for s in seeds if "dev_loss" in runs[s]],
               "fact_acc": acc, "stored_bits": bits,
               "gates": [runs[s]["gates"] for s in seeds if "gates" in runs[s]],
               "routing": {str(s): runs[s]["routing"] for s in seeds if "routing" in runs[s]},
               "tokens_per_s": [runs[s]["tokens_per_s"] for s in seeds]}
        if any("test_loss" not in runs[s] for s in seeds):
            row["split_note"] = "some runs predate the dev/test split: their whole validation loss is used"
        row["test_loss_mean"], row["test_loss_std"] = mean_std(row["test_loss"])
        row["dev_loss_mean"], _ = mean_std(row["dev_loss"])
        row["fact_acc_mean"], row["fact_acc_std"] = mean_std(acc)
        row["bits_per_param"] = (mean_std(bits)[0] / r.account["total"]) if bits else float("nan")
        common = sorted(set(runs) & set(by_cfg[ref]))
        if r.name != ref and len(common) >= 2:
            row["vs_ref_loss"] = paired_t([test(runs[s]) for s in common],
                                          [test(by_cfg[ref][s]) for s in common])
            if all("facts" in runs[s] and "facts" in by_cfg[ref][s] for s in common):
                row["vs_ref_facts"] = paired_t([runs[s]["facts"]["accuracy"] for s in common],
                                               [by_cfg[ref][s]["facts"]["accuracy"] for s in common])
        rows.append(row)
    _choose_in_groups(rows, len(spec.seeds))
    return {"spec": spec.to_dict(), "reference": ref, "rows": rows,
            "runs_total": len(plans), "runs_done": sum(p.done for p in plans),
            "missing": [f"{p.config} seed {p.seed}" for p in plans if not p.done],
            "curves": {k: {str(s): v for s, v in c.items()} for k, c in curves.items()}}


def _choose_in_groups(rows: list[dict[str, Any]], n_seeds: int) -> None:
    """Per group, mark the config with the lowest mean dev loss (``chosen``). A group is decided
    only when every member has all its seeds (a partial sweep marks nothing)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        r["chosen"] = None
        if r["group"]:
            groups.setdefault(r["group"], []).append(r)
    for members in groups.values():
        if all(len(m["dev_loss"]) == n_seeds for m in members):
            best = min(members, key=lambda m: m["dev_loss_mean"])
            for m in members:
                m["chosen"] = m is best


def summary_table(summary: dict[str, Any]) -> str:
    """Markdown: config, x, total / activated params, dev and test loss, paired test-loss
    difference vs the reference. In a group of settings, the dev loss's choice is marked."""
    ref = summary["reference"]
    lines = [f"| config | x | total params | activated/token | tables | dev loss | test loss (mean ± std) | "
             f"Δ test vs {ref} (p) | fact acc | Δacc vs {ref} (p) | seeds |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        a = r["account"]
        loss = (f"{r['test_loss_mean']:.4f} ± {r['test_loss_std']:.4f}" if r["test_loss"] else "—")
        dev = f"{r['dev_loss_mean']:.4f}" if r["dev_loss"] else "—"
        d = r.get("vs_ref_loss")
        dl = f"{d['mean_diff']:+.4f} ({format_p(d['p'])})" if d else ("ref" if r["config"] == ref else "—")
        fa = f"{r['fact_acc_mean']:.3f}" if r["fact_acc"] else "—"
        df = r.get("vs_ref_facts")
        dfa = f"{df['mean_diff']:+.3f} ({format_p(df['p'])})" if df else ("ref" if r["config"] == ref else "—")
        x = "" if r["x"] is None else f"{r['x']:g}"
        name = r["config"] + (" **(chosen on dev)**" if r.get("chosen") else "")
        lines.append(f"| {name} | {x} | {a['total']:,} | {a['activated_per_token']:,} | "
                     f"{a['table_params']:,} | {dev} | {loss} | {dl} | {fa} | {dfa} | {len(r['seeds'])} |")
    return "\n".join(lines)


def plot(summary: dict[str, Any], out_dir: PathLike) -> list[Path]:
    """PNG plots: the sweep's curve (loss vs rho or vs log2 slots) and the training curves."""
    import matplotlib  # local: ~0.5 s to import, and only the plots need it

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name, kind = summary["spec"]["name"], summary["spec"]["kind"]
    files = []
    rows = [r for r in summary["rows"] if r["test_loss"]]
    pts = [r for r in rows if r["x"] is not None]
    if kind in ("rho", "table-size") and pts:
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [r["x"] for r in pts]
        ax.errorbar(xs, [r["test_loss_mean"] for r in pts], yerr=[r["test_loss_std"] for r in pts],
                    marker="o", capsize=3, label="mean ± std over seeds")
        for r in pts:
            ax.scatter([r["x"]] * len(r["test_loss"]), r["test_loss"], s=8, color="gray", alpha=0.6)
        if kind == "rho":
            ax.set_xlabel("ρ = share of the sparse budget in routed experts (1 = pure MoE)")
            a = pts[0]["account"]
            act = [r["account"]["activated_per_token"] / 1e6 for r in pts]
            ax.set_title(f"{name}: total {a['total'] / 1e6:.2f}M fixed, "
                         f"activated/token {min(act):.3f}-{max(act):.3f}M", fontsize=10)
        else:
            ax.set_xlabel("log2(table slots per hash head)")
            ax.set_title(f"{name}: fixed backbone")
            ref = next((r for r in rows if r["x"] is None), None)
            if ref:
                ax.axhline(ref["test_loss_mean"], ls="--", color="red", label=f"{ref['config']} (no tables)")
        ax.set_ylabel("test loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        p = out / f"{name}_loss.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        files.append(p)
    if kind == "baselines" and rows:
        fig, ax = plt.subplots(figsize=(7, 0.4 * len(rows) + 1.5))
        ys = list(range(len(rows)))
        ax.barh(ys, [r["test_loss_mean"] for r in rows], xerr=[r["test_loss_std"] for r in rows],
                color=["tab:red" if r["config"] == summary["reference"] else "tab:blue" for r in rows])
        ax.set_yticks(ys, [r["config"] for r in rows])
        lo = min(r["test_loss_mean"] for r in rows)
        hi = max(r["test_loss_mean"] for r in rows)
        ax.set_xlim(lo - 0.1 * (hi - lo + 0.05), hi + 0.1 * (hi - lo + 0.05))
        ax.set_xlabel("test loss (nats/token), mean ± std over seeds")
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
        fig.tight_layout()
        p = out / f"{name}_loss.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        files.append(p)
    if any(summary["curves"][r["config"]] for r in rows):
        fig, ax = plt.subplots(figsize=(6, 4))
        for i, r in enumerate(rows):
            curves = summary["curves"][r["config"]]
            steps = sorted({s for c in curves.values() for s, _ in c})
            mean = [sum(dict(c).get(s, float("nan")) for c in curves.values()) / len(curves) for s in steps]
            ax.plot(steps, mean, marker=".", label=r["config"], color=plt.cm.viridis(i / max(1, len(rows) - 1)))
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss (mean over seeds)")
        ax.set_title(f"{name}: training curves")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        p = out / f"{name}_curves.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        files.append(p)
    return files


def write_summary(spec: SweepSpec, runs_root: PathLike, out_dir: PathLike,
                  plots: bool = True) -> dict[str, Any]:
    """summary JSON + markdown table (+ PNG plots) into ``out_dir``; returns the summary."""
    s = collect(spec, runs_root)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{spec.name}_summary.json").write_text(json.dumps(s, indent=1))
    (out / f"{spec.name}_table.md").write_text(summary_table(s) + "\n")
    s["plots"] = [str(p) for p in plot(s, out)] if plots else []
    return s


# ----------------------------------------------------------------------------- built-in sweeps
def science_backbone(vocab_size: int) -> dict[str, Any]:
    """The small MoE used by the built-in sweeps (CPU-sized; see docs/science.md)."""
    return ModelConfig(vocab_size=vocab_size, hidden_size=128, num_layers=3, num_heads=4,
                       max_seq_len=64, ffn="moe", n_shared_experts=1, n_routed_experts=16,
                       num_experts_per_tok=2, moe_intermediate_size=64, first_k_dense=0,
                       intermediate_size=192).to_dict()


def _tiny_backbone(vocab_size: int) -> dict[str, Any]:
    return ModelConfig(vocab_size=vocab_size, hidden_size=32, num_layers=2, num_heads=2,
                       max_seq_len=32, ffn="moe", n_shared_experts=1, n_routed_experts=4,
                       num_experts_per_tok=1, moe_intermediate_size=16, first_k_dense=0).to_dict()


_BACKBONES: dict[str, Callable[[int], dict[str, Any]]] = {"science": science_backbone, "tiny-moe": _tiny_backbone}

# Engram at this scale: 2- and 3-grams, 4 heads per order of 16 dims, at layer 1 of 3.
SCIENCE_ENGRAM = {"rows_per_head": [2053, 2053], "max_ngram_size": 3, "n_embed_per_ngram": 64,
                  "n_head_per_ngram": 4, "layer_ids": [1], "pad_id": 0}
LR_MULTS = (1.0, 5.0, 25.0)  # table lr multipliers swept for the bigram baseline
SCIENCE_TRAIN = {"steps": 250, "batch_size": 16, "seq_len": 64, "lr": 3e-3, "warmup_steps": 25,
                 "eval_every": 50, "eval_batches": 40, "save_every": 125, "log_every": 10}


def _rho_configs(n_experts: int, rhos: Sequence[float], engram: dict[str, Any]) -> list[ConfigSpec]:
    out = []
    for rho in rhos:
        e = round(n_experts * rho)
        if rho >= 1.0:
            out.append(ConfigSpec("rho=1.00", {}, x=1.0, note=f"{n_experts} routed experts, no tables"))
        else:
            out.append(ConfigSpec(f"rho={rho:.3f}".rstrip("0"), {"n_routed_experts": e, "engram": engram},
                                  x=e / n_experts, fill_to="reference",
                                  note=f"{e} routed experts + Engram tables"))
    return out


def builtin_sweep(name: str, vocab_size: int = 4096, seeds: Optional[Sequence[int]] = None,
                  steps: Optional[int] = None) -> SweepSpec:
    """``rho``, ``table-size``, ``baselines`` or ``smoke`` (see the module docstring)."""
    train = dict(SCIENCE_TRAIN)
    if steps:
        train["steps"] = steps
    given = tuple(seeds) if seeds else None
    seeds = given or (0, 1, 2)
    eng = dict(SCIENCE_ENGRAM)
    if name == "rho":
        cfgs = _rho_configs(16, (1.0, 0.875, 0.75, 0.625, 0.5), eng)
        return SweepSpec("rho", cfgs, base="science", train=train, seeds=seeds, reference="rho=1.00",
                         kind="rho", vocab_size=vocab_size)
    if name == "table-size":
        cfgs = [ConfigSpec("moe", {}, note="backbone alone")]
        for k in (9, 11, 13, 15):  # slots per hash head; 8 heads at 16 dims
            cfgs.append(ConfigSpec(f"slots=2^{k}", {"engram": {**eng, "rows_per_head": [2 ** k, 2 ** k]}},
                                   x=float(k)))
        return SweepSpec("table-size", cfgs, base="science", train=train, seeds=seeds,
                         reference="moe", kind="table-size", vocab_size=vocab_size)
    if name == "baselines":
        e12 = {"n_routed_experts": 12}
        cfgs = [
            ConfigSpec("moe", {}, note="16 routed experts (rho=1): the budget"),
            ConfigSpec("engram", {**e12, "engram": eng}, fill_to="reference", group="engram",
                       note="rho=0.75, gated Engram at layer 1"),
            ConfigSpec("bigram-hash", {**e12, "input_ngram": {"kind": "bigram"}}, fill_to="reference",
                       group="bigram-hash", note="rho=0.75, hashed (prev, cur) embedding added to the input, no gate"),
            ConfigSpec("overencoding", {**e12, "input_ngram": {"kind": "overencoding", "max_ngram_size": 3}},
                       fill_to="reference", group="overencoding",
                       note="rho=0.75, 2/3-gram embeddings averaged into the input"),
            ConfigSpec("bigram-hash-lr1", {**e12, "input_ngram": {"kind": "bigram"}}, fill_to="reference",
                       train={"table_lr_mult": 1.0}, group="bigram-hash",
                       note="bigram-hash with the table at the backbone lr"),
            ConfigSpec("overencoding-lr1", {**e12, "input_ngram": {"kind": "overencoding", "max_ngram_size": 3}},
                       fill_to="reference", train={"table_lr_mult": 1.0}, group="overencoding",
                       note="overencoding, table at backbone lr"),
            ConfigSpec("engram-lr1", {**e12, "engram": eng}, fill_to="reference", train={"table_lr_mult": 1.0},
                       group="engram", note="Engram, tables at the backbone lr (default 5x)"),
            ConfigSpec("engram-no-gate", {**e12, "engram": {**eng, "use_gate": False}}, fill_to="reference"),
            ConfigSpec("engram-no-conv", {**e12, "engram": {**eng, "use_short_conv": False}}, fill_to="reference"),
            ConfigSpec("engram-no-compression", {**e12, "engram": {**eng, "use_compression": False}},
                       fill_to="reference"),
            ConfigSpec("engram-hc4", {**e12, "hc_mult": 4, "engram": eng}, fill_to="reference",
                       note="4 hyper-connection branches"),
            ConfigSpec("engram-4gram", {**e12, "engram": {**eng, "max_ngram_size": 4,
                                                          "rows_per_head": [2053] * 3}},
                       fill_to="reference"),
            ConfigSpec("engram-layer0", {**e12, "engram": {**eng, "layer_ids": [0]}}, fill_to="reference"),
            ConfigSpec("dense-iso-active", {"ffn": "dense", "intermediate_size": 192},
                       note="SwiGLU of the MoE's activated FFN width (shared + top-2); fewer total params"),
        ]
        return SweepSpec("baselines", cfgs, base="science", train=train, seeds=seeds, reference="moe",
                         kind="baselines", vocab_size=vocab_size)
    if name == "bigram":
        # The modded-nanogpt form: a hashed (prev, cur) table of about 5x the vocabulary whose
        # row is added before every block with a learned per-block scale, on the full MoE. Its
        # table lr is swept (x1, x5, x25 the backbone's); Engram gets the same total, filled
        # into its tables, and the same lr choice made on dev.
        big = {"input_ngram": {"kind": "bigram", "every_layer": True, "rows_per_head": 5 * vocab_size}}
        cfgs = [ConfigSpec("moe", {}, note="16 routed experts, no tables")]
        for m in LR_MULTS:
            cfgs.append(ConfigSpec(f"bigram-5v-lr{m:g}", big, train={"table_lr_mult": m}, group="bigram-5v",
                                   note=f"table {5 * vocab_size:,} rows (5x vocab), every block, table lr x{m:g}"))
        for m in LR_MULTS[1:]:  # Engram's x1 is known worse (baselines sweep)
            cfgs.append(ConfigSpec(f"engram-iso-lr{m:g}", {"engram": eng}, fill_to=f"bigram-5v-lr{LR_MULTS[0]:g}",
                                   train={"table_lr_mult": m}, group="engram-iso",
                                   note=f"Engram tables filled to the bigram's total, table lr x{m:g}"))
        return SweepSpec("bigram", cfgs, base="science", train=train, seeds=seeds, reference="moe",
                         kind="baselines", vocab_size=vocab_size)
    if name == "historian":
        e12 = {"n_routed_experts": 12}
        hist = {**eng, "placement": "expert"}
        cfgs = [ConfigSpec("moe", {}, note="16 routed experts (rho=1): the budget"),
                ConfigSpec("engram", {**e12, "engram": eng}, fill_to="reference",
                           note="rho=0.75, gated Engram layer before attention at layer 1 (table lr 5x)"),
                ConfigSpec("historian", {**e12, "engram": hist}, fill_to="reference", group="historian",
                           note="12 routed slots; at layer 1 the last is the Engram memory (table lr 5x)"),
                ConfigSpec("historian-lr1", {**e12, "engram": hist}, fill_to="reference", group="historian",
                           train={"table_lr_mult": 1.0}, note="historian, table at the backbone lr")]
        return SweepSpec("historian", cfgs, base="science", train=train, seeds=seeds, reference="moe",
                         kind="baselines", vocab_size=vocab_size)
    if name == "smoke":
        tiny_eng = {"rows_per_head": [101, 101], "max_ngram_size": 3, "n_embed_per_ngram": 16,
                    "n_head_per_ngram": 2, "layer_ids": [1], "pad_id": 0}
        cfgs = [ConfigSpec("moe", {}, x=1.0),
                ConfigSpec("engram", {"n_routed_experts": 2, "engram": tiny_eng}, x=0.5, fill_to="reference"),
                ConfigSpec("bigram", {"n_routed_experts": 2, "input_ngram": {"kind": "bigram"}}, x=0.5,
                           fill_to="reference")]
        tr = {"steps": steps or 6, "batch_size": 4, "seq_len": 16, "warmup_steps": 1, "eval_every": 3,
              "eval_batches": 2, "save_every": 3, "log_every": 1}
        return SweepSpec("smoke", cfgs, base="tiny-moe", train=tr, seeds=given or (0, 1),
                         reference="moe", kind="rho", vocab_size=vocab_size, fact_per_relation=0)
    raise SweepError(f"unknown built-in sweep {name!r}; choose one of {', '.join(BUILTIN_SWEEPS)}, "
                     f"or pass --spec FILE.json")


BUILTIN_SWEEPS = ("rho", "table-size", "baselines", "bigram", "historian", "smoke")
