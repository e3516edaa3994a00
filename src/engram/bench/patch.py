"""The knowledge-patch experiment: held-out facts, a patch, and the two cheaper alternatives.

    engram bench patch --workdir patch-bench [--held-out 40 --base-steps 400 --patch-steps 1000]

1. Data: the built-in corpus with both documents ("profile" and "almanac") of ``held_out``
   countries removed (chosen by a stable hash of the name), so their capital, currency,
   population, ... are never seen in training; the cities documents stay (a held-out country's
   *name* is known, its facts are not). The removed documents are the patch's new text.
2. A small base model (``engram-moe``) trains ``base_steps`` steps on the rest; its tables are
   exported to a table file.
3. Before: exact-answer accuracy (``engram.science.knowledge``: greedy decoding reproduces the answer)
   on the held-out facts and on a sample of trained facts; validation loss on the original
   corpus (its validation split).
4. A patch trains on the held-out documents (tables only, backbone frozen); after applying it:
   the same three numbers, patch size against the table, apply / revert time, and the
   bit-exact revert check.
5. Alternatives on the base model: (a) facts in the prompt, oracle retrieval (the sentence
   stating the fact, then a newline, before the question); (b) the count-based N-gram memory
   (``engram.ngram``): an index of the training split plus the held-out documents added as a
   delta, mixed with a *fixed* lambda (a learned gate would need its own training run).

Every stage reuses its output when it is already in ``workdir`` (the base run, the table).
"""

from __future__ import annotations

import functools
import hashlib
import json
import platform
import shutil
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from engram.config import PatchBenchConfig, TrainConfig, parse_variant, preset
from engram.data import shards as data
from engram.data.corpus import builtin_documents, fact_records
from engram.data.tokenizer import train_bpe
from engram.fsutil import file_sha256
from engram.model import checkpoint as ckpt
from engram.ngram.facts import recall, tokenize_cases
from engram.ngram.index import NgramIndex
from engram.ngram.mixture import GateConfig, LMAdapter, NgramMixture, collect, mixture_nll
from engram.patches.apply import apply_patch, apply_to_model, revert_from_model, revert_patch
from engram.patches.patchfile import load_patch, make_patch, save_patch
from engram.patches.trainer import protected_masks, train_patch_from_run
from engram.science.knowledge import FactItem, FactSet, evaluate_facts
from engram.tables.access import row_access_counts
from engram.tables.convert import export_checkpoint_tables
from engram.tables.runtime import load_tables_into
from engram.training.evaluation import evaluate
from engram.training.trainer import train


def _stable(s: str) -> int:
    return int.from_bytes(hashlib.sha256(s.encode()).digest()[:8], "little")


@dataclass
class _Split:
    """The built-in corpus split for the experiment (``_split_corpus``)."""
    rest: list[Any]  # every document but the held-out countries' (the base run's corpus)
    held_docs: list[Any]  # the held-out countries' documents: the patch's new text
    held_facts: list[Any]  # the facts those documents state
    all_facts: list[Any]
    held_names: list[str]  # the held-out countries


def _split_corpus(cfg: PatchBenchConfig) -> _Split:
    """Hold out ``cfg.held_out`` countries (a stable hash of the name picks them): their documents and facts."""
    docs = builtin_documents()
    countries = sorted({d.title.rsplit(" (", 1)[0] for d in docs if d.source == "countries"}, key=_stable)
    held = set(countries[:cfg.held_out])
    is_held = lambda d: d.source == "countries" and d.title.rsplit(" (", 1)[0] in held  # noqa: E731
    held_docs = [d for d in docs if is_held(d)]
    rest = [d for d in docs if not is_held(d)]
    held_titles = {d.title for d in held_docs}
    facts = fact_records()
    held_facts = [f for f in facts if f.doc_title in held_titles]
    return _Split(rest, held_docs, held_facts, facts, sorted(held))


def _items(tok: Any, facts: Sequence[Any], context: bool = False, in_train: bool = True) -> list[FactItem]:
    """Tokenised facts (as ``knowledge.build_fact_set``); ``context`` prepends the fact's sentence."""
    out = []
    for f in facts:
        p_ids = tok.encode(f.prompt.rstrip(" ")).ids
        full = tok.encode(f.sentence[: f.answer_start + len(f.answer)]).ids
        if not p_ids or full[: len(p_ids)] != p_ids or len(full) == len(p_ids):
            continue
        ctx = tuple(tok.encode(f.sentence + "\n").ids) if context else ()
        out.append(FactItem(f.relation, ctx + tuple(p_ids), tuple(full[len(p_ids):]), 0.0, in_train))
    return out


def _acc_by_relation(model: Any, items: list[FactItem]) -> tuple[float, dict[str, float]]:
    r = evaluate_facts(model, FactSet(items, {"train": len(items)}, 0))
    return float(r["accuracy"]), {k: float(v) for k, v in r["accuracy_by_relation"].items()}


def _acc(model: Any, items: list[FactItem]) -> float:
    return _acc_by_relation(model, items)[0]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """Record the seconds the ``with`` block took as ``timings[key]``."""
    t0 = time.perf_counter()
    yield
    timings[key] = time.perf_counter() - t0


@dataclass(frozen=True)
class _Paths:
    """Where the stages read and write, all under ``workdir`` (kept between runs for reuse)."""
    wd: Path
    data_dir: Path  # the dataset without the held-out countries
    run: Path  # the base run
    table: Path  # the base run's tables, exported
    new_text: Path  # the held-out documents: the patch's training text
    patch: Path  # the trained patch

    @classmethod
    def under(cls, wd: Path) -> "_Paths":
        return cls(wd, wd / "data", wd / "base-run", wd / "base.engt", wd / "new_facts.jsonl", wd / "facts.engp")


@dataclass
class _FactSets:
    """The tokenised facts every model is scored on."""
    held: list[FactItem]  # the held-out facts (never in training)
    trained: list[FactItem]  # a sample of trained facts (the damage check)
    held_in_context: list[FactItem]  # the held-out facts, each after the sentence stating it


def run_bench(cfg: PatchBenchConfig, progress: bool = True) -> dict[str, Any]:
    """The experiment of the module docstring (its steps numbered in the comments), stage by stage;
    returns the report ``engram bench patch`` prints."""
    torch.set_num_threads(cfg.threads)
    t_start = time.perf_counter()
    paths = _Paths.under(Path(cfg.workdir))
    paths.wd.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    with _timed(timings, "data_s"):  # 1.
        split = _split_corpus(cfg)
        ds, data_reused = _prepare_data(cfg, split, paths, progress)
    with _timed(timings, "base_train_s"):  # 2.
        base_reused = _train_base(cfg, ds, data_reused, paths, progress)
    model_sha = _export_base_table(cfg, paths, base_reused)
    facts = _fact_sets(cfg, ds, split)
    measure = functools.partial(_measure, cfg, ds, facts)
    with _timed(timings, "row_count_s"):
        model, row_counts = _load_base_and_count_rows(paths, ds)

    before = measure(model)  # 3.
    with _timed(timings, "patch_train_s"):  # 4.
        trained_patch = _train_patch(cfg, paths, row_counts, progress)
    on_file = _patch_the_table_file(paths, measure)
    scratch, base_tables, on_model = _patch_a_loaded_model(paths)  # scratch: a base model, patched and reverted
    int8 = _int8_patch(paths, scratch, base_tables, measure)
    variants = _variants(cfg, paths, scratch, row_counts, before, measure, progress)

    with _timed(timings, "prompt_s"):  # 5a.
        in_prompt = _facts_in_prompt(model, facts)
    with _timed(timings, "ngram_s"):  # 5b.
        ngram = _ngram_memory(cfg, model, ds, paths, split, model_sha)
    return _report(cfg, paths, split, facts, base_reused=base_reused, row_counts=row_counts, before=before,
                   trained_patch=trained_patch, on_file=on_file, on_model=on_model, int8=int8, variants=variants,
                   in_prompt=in_prompt, ngram=ngram, timings={**timings, "total_s": time.perf_counter() - t_start})


def _prepare_data(cfg: PatchBenchConfig, split: _Split, paths: _Paths, progress: bool) -> tuple[Any, bool]:
    """Write the held-out documents (the patch's new text) and prepare the dataset of the rest.

    The dataset in ``workdir`` is reused when it was prepared for the same held-out countries and
    vocabulary size. Returns (the dataset, whether it was reused).
    """
    paths.new_text.write_text("".join(json.dumps({"title": d.title, "text": d.text}) + "\n"
                                      for d in split.held_docs))
    meta = _read_json(paths.data_dir / "meta.json") or {}
    reused = meta.get("held_out_countries") == split.held_names and meta.get("vocab_size") == cfg.vocab_size
    if not reused:
        shutil.rmtree(paths.data_dir, ignore_errors=True)
        train_docs, _ = data.split_documents([d for d in split.rest if d.text.strip()], 0.05, 0)
        tok = train_bpe((d.text for d in train_docs), cfg.vocab_size)
        data.prepare_dataset(paths.data_dir, split.rest, tok, 0.05, 0, progress=progress,
                             extra_meta={"held_out_countries": split.held_names})
    return data.load_dataset(paths.data_dir), reused


def _train_base(cfg: PatchBenchConfig, ds: Any, data_reused: bool, paths: _Paths, progress: bool) -> bool:
    """Train the base model on the dataset, unless the run in ``workdir`` was trained with exactly
    these settings on this very dataset. Returns whether the run was reused."""
    mcfg = preset(cfg.preset, ds.vocab_size)
    tcfg = TrainConfig(steps=cfg.base_steps, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                       eval_every=cfg.base_steps, save_every=cfg.base_steps, eval_batches=10)
    if data_reused and (paths.run / ckpt.CONFIG_FILE).is_file():
        try:
            rmeta = ckpt.read_config(paths.run)
            if (rmeta.step == cfg.base_steps and rmeta.model_config.to_dict() == mcfg.to_dict()
                    and rmeta.train_config is not None and rmeta.train_config.to_dict() == tcfg.to_dict()
                    and rmeta.tokenizer_fingerprint == ds.meta.get("tokenizer_fingerprint")):
                return True
        except Exception:  # an unreadable run is retrained
            pass
    train(mcfg, tcfg, paths.data_dir, paths.run, progress=progress, overwrite=True)
    return False


def _export_base_table(cfg: PatchBenchConfig, paths: _Paths, base_reused: bool) -> str:
    """Export the base run's tables to the table file, unless the file in ``workdir`` was exported
    from these very weights (``base-cache.json`` records both hashes; a retrained run always
    re-exports). Returns the sha256 of the run's model file."""
    cache_path = paths.wd / "base-cache.json"
    cache = (_read_json(cache_path) or {}) if base_reused else {}
    model_sha = ckpt.read_config(paths.run).files[ckpt.MODEL_FILE]["sha256"]
    if (cache.get("model_sha256") != model_sha or not paths.table.is_file()
            or cache.get("table_sha256") != file_sha256(paths.table)):
        export_checkpoint_tables(paths.run, paths.table)
        cache = {"model_sha256": model_sha, "table_sha256": file_sha256(paths.table)}
    cache["base_key"] = cfg.base_key()
    cache_path.write_text(json.dumps(cache, indent=2) + "\n")
    return model_sha


def _fact_sets(cfg: PatchBenchConfig, ds: Any, split: _Split) -> _FactSets:
    """Tokenise the held-out facts (also with their sentence in the prompt) and a stable sample of
    ``cfg.trained_facts`` facts from training documents (not the validation split's)."""
    val_titles = set(ds.meta.get("val_titles", []))
    held_titles = {d.title for d in split.held_docs}
    trained = sorted((f for f in split.all_facts if f.doc_title not in held_titles and f.doc_title not in val_titles),
                     key=lambda f: _stable(f"{f.relation}/{f.subject}/{f.doc_title}"))[:cfg.trained_facts]
    tok = ds.tokenizer
    return _FactSets(_items(tok, split.held_facts), _items(tok, trained), _items(tok, split.held_facts, context=True))


def _measure(cfg: PatchBenchConfig, ds: Any, facts: _FactSets, model: Any) -> dict[str, Any]:
    """Validation loss and exact-answer accuracy (held-out facts, also by relation; trained facts) of ``model``."""
    t = time.perf_counter()
    val = evaluate(model, ds.val, cfg.batch_size, cfg.seq_len, cfg.eval_batches)["loss"]
    acc, by_rel = _acc_by_relation(model, facts.held)
    return {"held_out_accuracy": acc, "held_out_by_relation": by_rel,
            "trained_accuracy": _acc(model, facts.trained), "val_loss": val, "seconds": time.perf_counter() - t}


def _load_base_and_count_rows(paths: _Paths, ds: Any) -> tuple[Any, dict[int, np.ndarray]]:
    """Load the base model and count how often the original corpus (the training split) reads each
    table row, once: every patch below protects rows by these counts. Returns (model, counts)."""
    model, _ = ckpt.load_model(paths.run)
    return model, row_access_counts(model, np.asarray(ds.train.tokens))


def _train_patch(cfg: PatchBenchConfig, paths: _Paths, row_counts: dict[int, np.ndarray], progress: bool) -> dict[str, Any]:
    """Train the patch on the held-out documents (tables only, backbone frozen) and write it;
    returns the trainer's report."""
    return train_patch_from_run(paths.run, [paths.new_text], paths.patch, cfg.patch_config(), table=paths.table,
                                name="held-out-facts", original_data=paths.data_dir, row_counts=row_counts,
                                progress=progress)


def _patch_the_table_file(paths: _Paths, measure: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
    """Apply the patch to a copy of the table file, revert it, apply it again and measure the base
    model with that table. Returns the measurement ("after"), the apply / revert / re-apply
    seconds and whether the revert restored the file bit for bit ("bit_exact")."""
    patched = paths.wd / "patched.engt"
    shutil.copyfile(paths.table, patched)
    original = paths.table.read_bytes()
    ap = apply_patch(patched, paths.patch)
    rv = revert_patch(patched, paths.patch)
    bit_exact = patched.read_bytes() == original
    ap2 = apply_patch(patched, paths.patch)
    model, _ = ckpt.load_model(paths.run)
    load_tables_into(model, patched)
    return {"after": measure(model), "apply_s": ap["seconds"], "revert_s": rv["seconds"],
            "reapply_s": ap2["seconds"], "bit_exact": bit_exact}


def _patch_a_loaded_model(paths: _Paths) -> tuple[Any, dict[int, torch.Tensor], dict[str, Any]]:
    """Apply the patch to a loaded base model and revert it. Returns the model (reverted: the
    variants reuse it), a copy of its original tables {layer_id: weight} and the apply / revert
    seconds with whether the revert restored the tables bit for bit ("bit_exact")."""
    model, _ = ckpt.load_model(paths.run)
    tables = {e.layer_id: e.table.weight.detach().clone() for e in model.engram_layers}
    am = apply_to_model(model, paths.patch)
    rm = revert_from_model(model, paths.patch)
    bit_exact = all(torch.equal(tables[e.layer_id], e.table.weight)
                    for e in model.engram_layers)
    return model, tables, {"apply_model_s": am["seconds"], "revert_model_s": rm["seconds"], "bit_exact": bit_exact}


def _int8_patch(paths: _Paths, model: Any, tables: dict[int, torch.Tensor],
                measure: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
    """Save the same patch with int8 new values, apply it to a copy of the table file and measure
    the base model with it (measured, not estimated). Returns the measurement ("after"), the
    patch file's size ("bytes") and the apply seconds ("apply_s")."""
    fp32_patch = load_patch(paths.patch)
    new_tables = {lid: w.clone() for lid, w in tables.items()}
    for lid, lp in fp32_patch.layers.items():
        new_tables[lid][lp.rows] = lp.new_values(torch.float32)
    int8_path = save_patch(make_patch(tables, new_tables, hash_fingerprint=model.hasher.fingerprint(),
                                      hasher=model.hasher.describe(), dtype="fp32", quantization="int8",
                                      name="held-out-facts-int8", provenance=fp32_patch.meta["provenance"]),
                           paths.wd / "facts-int8.engp")
    patched = paths.wd / "patched-int8.engt"
    shutil.copyfile(paths.table, patched)
    ap = apply_patch(patched, int8_path)
    model_8, _ = ckpt.load_model(paths.run)
    load_tables_into(model_8, patched)
    return {"after": measure(model_8), "bytes": int8_path.stat().st_size, "apply_s": ap["seconds"]}


def _variants(cfg: PatchBenchConfig, paths: _Paths, model: Any, row_counts: dict[int, np.ndarray],
              before: dict[str, Any], measure: Callable[[Any], dict[str, Any]], progress: bool) -> list[dict[str, Any]]:
    """Train a patch for each ``cfg.variants`` setting on the same base, apply it to ``model``,
    measure and revert. Returns one record per variant."""
    out = []
    for v in cfg.variants:
        over = parse_variant(v)
        t0 = time.perf_counter()
        vpath = paths.wd / "variant.engp"
        rep = train_patch_from_run(paths.run, [paths.new_text], vpath, cfg.patch_config(**over), table=paths.table,
                                   name=f"variant {v}", original_data=paths.data_dir, row_counts=row_counts,
                                   progress=progress)
        apply_to_model(model, vpath)
        m = measure(model)
        revert_from_model(model, vpath)
        out.append({"variant": v, "settings": {**asdict(cfg.patch_config(**over))},
                    "held_out_accuracy": m["held_out_accuracy"], "held_out_by_relation": m["held_out_by_relation"],
                    "trained_accuracy": m["trained_accuracy"], "val_loss": m["val_loss"],
                    "val_loss_rel_change": (m["val_loss"] - before["val_loss"]) / before["val_loss"],
                    "changed_rows": rep["changed_rows"], "patch_bytes": rep["patch_bytes"],
                    "loss_first": rep["loss_first"], "loss_last": rep["loss_last"],
                    "train_s": rep["train_s"], "seconds": time.perf_counter() - t0})
    return out


def _facts_in_prompt(model: Any, facts: _FactSets) -> dict[str, Any]:
    """Alternative (a): the base model's held-out accuracy with each fact's sentence in the prompt
    (oracle retrieval), and how many prompt tokens that adds on average."""
    acc = _acc(model, facts.held_in_context)
    extra_tokens = float(np.mean([len(a.prompt_ids) - len(b.prompt_ids)
                                  for a, b in zip(facts.held_in_context, facts.held)]))
    return {"held_out_accuracy": acc, "extra_prompt_tokens": extra_tokens,
            "context": "oracle: the sentence stating the fact + newline"}


def _ngram_memory(cfg: PatchBenchConfig, model: Any, ds: Any, paths: _Paths, split: _Split, model_sha: str) -> dict[str, Any]:
    """Alternative (b), the N-gram memory (``_ngram_alternative``). It depends on the base run and
    lambda only, so the result in ``workdir`` is reused when those match (marked
    ``reused_from_workdir``)."""
    key = {"model_sha256": model_sha, "lambda": cfg.ngram_lambda, "eval_batches": cfg.eval_batches, **cfg.base_key()}
    result_path = paths.wd / "ngram-result.json"
    cached = _read_json(result_path) or {}
    if cached.get("key") == key:
        return {**cached["result"], "reused_from_workdir": True}
    result = _ngram_alternative(cfg, model, ds, paths, split)
    result_path.write_text(json.dumps({"key": key, "result": result}, indent=2) + "\n")
    return result


def _ngram_alternative(cfg: PatchBenchConfig, model: Any, ds: Any, paths: _Paths, split: _Split) -> dict[str, Any]:
    """Index the training split, add the held-out documents as a delta, and score the base model
    mixed with the index at a fixed lambda before and after the addition."""
    idx_dir = paths.wd / "ngram-index"
    if idx_dir.exists():
        shutil.rmtree(idx_dir)
    index = NgramIndex.from_dataset(idx_dir, paths.data_dir)
    lm = LMAdapter(model)
    lam = cfg.ngram_lambda
    cases = tokenize_cases(split.held_facts, ds.tokenizer, phrasing=0)
    val = np.asarray(ds.val.tokens)
    windows = cfg.eval_batches * cfg.batch_size

    def score() -> dict[str, float]:
        mix = NgramMixture(lm, index, lam, GateConfig(estimator="both"))
        r = recall(cases, mix, ds.eos_id, mode="mixture")
        c = collect(lm, index, val, seq_len=cfg.seq_len, batch_size=cfg.batch_size, max_windows=windows,
                    progress=False)
        return {"held_out_accuracy": r["exact_match"], "val_loss": float(mixture_nll(c, "both", lam).mean()),
                "lm_val_loss_same_windows": float((-c.lm_logp).mean())}

    before = score()
    t0 = time.perf_counter()
    index.add_texts([d.text for d in split.held_docs], name="held-out-facts")
    add_s = time.perf_counter() - t0
    after = score()
    return {"lambda": lam, "estimator": "both (infini-gram + KN, mu 0.5)", "gate": "fixed lambda (no learned gate)",
            "facts": len(cases), "before_add": before, "after_add": after, "add_s": add_s,
            "val_loss_rel_change": (after["val_loss"] - before["val_loss"]) / before["val_loss"]}


def _report(cfg: PatchBenchConfig, paths: _Paths, split: _Split, facts: _FactSets, *, base_reused: bool,
            row_counts: dict[int, np.ndarray], before: dict[str, Any], trained_patch: dict[str, Any],
            on_file: dict[str, Any], on_model: dict[str, Any], int8: dict[str, Any],
            variants: list[dict[str, Any]], in_prompt: dict[str, Any], ngram: dict[str, Any],
            timings: dict[str, float]) -> dict[str, Any]:
    """The stages' results as the benchmark's JSON report (machine, config, every number)."""
    after, after_int8 = on_file["after"], int8["after"]
    protect_stats = {str(lid): {"rows": int(c.size), "rows_read": int((c > 0).sum()),
                                "protected_at_min_count": int(protected_masks({lid: c}, cfg.protect_min_count)[lid].sum())}
                     for lid, c in row_counts.items()}
    return {
        "bench": "patch", "date": time.strftime("%Y-%m-%d"), "machine": {
            "cpu": platform.processor() or platform.machine(), "threads": cfg.threads,
            "torch": torch.__version__, "gpu": torch.cuda.is_available()},
        "config": asdict(cfg), "held_out_countries": len(split.held_names),
        "held_out_facts": len(facts.held),
        "held_out_facts_by_relation": dict(sorted(Counter(i.relation for i in facts.held).items())),
        "trained_facts": len(facts.trained),
        "new_text_tokens": trained_patch["tokens"], "base_run_reused": base_reused,
        "original_corpus_rows": protect_stats,
        "before": before, "after_patch": after,
        "val_loss_rel_change": (after["val_loss"] - before["val_loss"]) / before["val_loss"],
        "patch": {**{k: trained_patch[k] for k in ("patch_id", "changed_rows", "table_rows", "patch_bytes",
                                                   "table_bytes", "size_ratio", "steps", "train_s",
                                                   "loss_first", "loss_last", "trainable_table_params",
                                                   "trainable_gate_params", "backbone_unchanged",
                                                   "protect_min_count", "protected_rows", "rehearsal")},
                  **{k: trained_patch[k] for k in ("touched_rows", "touched_protected_rows", "loss_orig_first",
                                                   "loss_orig_last") if k in trained_patch},
                  "settings": asdict(cfg.patch_config())},
        "after_int8_patch": after_int8,
        "int8_val_loss_rel_change": (after_int8["val_loss"] - before["val_loss"]) / before["val_loss"],
        "int8_patch_bytes": int8["bytes"], "int8_apply_s": int8["apply_s"],
        "variants": variants,
        "table_file_bytes": paths.table.stat().st_size,
        "apply_s": on_file["apply_s"], "revert_s": on_file["revert_s"], "reapply_s": on_file["reapply_s"],
        "apply_model_s": on_model["apply_model_s"], "revert_model_s": on_model["revert_model_s"],
        "revert_bit_exact_file": on_file["bit_exact"], "revert_bit_exact_model": on_model["bit_exact"],
        "facts_in_prompt": in_prompt,
        "ngram_memory": ngram, "timings": timings,
    }
