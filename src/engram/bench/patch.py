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

import hashlib
import json
import platform
import shutil
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from engram.config import PatchBenchConfig as BenchConfig  # re-exported
from engram.config import TrainConfig, parse_variant, preset
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


def _split_corpus(cfg: BenchConfig):
    docs = builtin_documents()
    countries = sorted({d.title.rsplit(" (", 1)[0] for d in docs if d.source == "countries"}, key=_stable)
    held = set(countries[:cfg.held_out])
    is_held = lambda d: d.source == "countries" and d.title.rsplit(" (", 1)[0] in held  # noqa: E731
    held_docs = [d for d in docs if is_held(d)]
    rest = [d for d in docs if not is_held(d)]
    held_titles = {d.title for d in held_docs}
    facts = fact_records()
    held_facts = [f for f in facts if f.doc_title in held_titles]
    return rest, held_docs, held_facts, facts, sorted(held)


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


def run_bench(cfg: BenchConfig, progress: bool = True) -> dict[str, Any]:
    torch.set_num_threads(cfg.threads)
    t_start = time.perf_counter()
    wd = Path(cfg.workdir)
    wd.mkdir(parents=True, exist_ok=True)
    data_dir, run, table = wd / "data", wd / "base-run", wd / "base.engt"
    timings: dict[str, float] = {}

    # 1. data with held-out countries
    t0 = time.perf_counter()
    rest, held_docs, held_facts, all_facts, held_names = _split_corpus(cfg)
    new_text = wd / "new_facts.jsonl"
    new_text.write_text("".join(json.dumps({"title": d.title, "text": d.text}) + "\n" for d in held_docs))
    cache_path = wd / "base-cache.json"
    cache = _read_json(cache_path) or {}
    data_meta = _read_json(data_dir / "meta.json") or {}
    data_ok = (data_meta.get("held_out_countries") == held_names and data_meta.get("vocab_size") == cfg.vocab_size)
    if not data_ok:
        shutil.rmtree(data_dir, ignore_errors=True)
        cache = {}
        train_docs, _ = data.split_documents([d for d in rest if d.text.strip()], 0.05, 0)
        tok = train_bpe((d.text for d in train_docs), cfg.vocab_size)
        data.prepare_dataset(data_dir, rest, tok, 0.05, 0, progress=progress,
                             extra_meta={"held_out_countries": held_names})
    ds = data.load_dataset(data_dir)
    tok = ds.tokenizer
    timings["data_s"] = time.perf_counter() - t0

    # 2. base model: reused when the run in workdir was trained with exactly these settings
    t0 = time.perf_counter()
    mcfg = preset(cfg.preset, ds.vocab_size)
    tcfg = TrainConfig(steps=cfg.base_steps, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                       eval_every=cfg.base_steps, save_every=cfg.base_steps, eval_batches=10)
    base_reused = False
    if data_ok and (run / ckpt.CONFIG_FILE).is_file():
        try:
            rmeta = ckpt.read_config(run)
            base_reused = (rmeta.step == cfg.base_steps and rmeta.model_config.to_dict() == mcfg.to_dict()
                           and rmeta.train_config is not None and rmeta.train_config.to_dict() == tcfg.to_dict()
                           and rmeta.tokenizer_fingerprint == ds.meta.get("tokenizer_fingerprint"))
        except Exception:  # an unreadable run is retrained
            base_reused = False
    if not base_reused:
        cache = {}
        train(mcfg, tcfg, data_dir, run, progress=progress, overwrite=True)
    timings["base_train_s"] = time.perf_counter() - t0
    model_sha = ckpt.read_config(run).files[ckpt.MODEL_FILE]["sha256"]
    if cache.get("model_sha256") != model_sha or not table.is_file() or cache.get("table_sha256") != file_sha256(table):
        export_checkpoint_tables(run, table)  # a retrained run needs its table re-exported
        cache = {"model_sha256": model_sha, "table_sha256": file_sha256(table)}
    cache["base_key"] = cfg.base_key()
    cache_path.write_text(json.dumps(cache, indent=2) + "\n")

    # fact sets: held out (never in training) and a sample of trained facts (damage check)
    val_titles = set(ds.meta.get("val_titles", []))
    held_set = {d.title for d in held_docs}
    trained = sorted((f for f in all_facts if f.doc_title not in held_set and f.doc_title not in val_titles),
                     key=lambda f: _stable(f"{f.relation}/{f.subject}/{f.doc_title}"))[:cfg.trained_facts]
    held_items, trained_items = _items(tok, held_facts), _items(tok, trained)
    ctx_items = _items(tok, held_facts, context=True)

    def measure(model: Any) -> dict[str, Any]:
        t = time.perf_counter()
        val = evaluate(model, ds.val, cfg.batch_size, cfg.seq_len, cfg.eval_batches)["loss"]
        acc, by_rel = _acc_by_relation(model, held_items)
        return {"held_out_accuracy": acc, "held_out_by_relation": by_rel,
                "trained_accuracy": _acc(model, trained_items), "val_loss": val, "seconds": time.perf_counter() - t}


    relation_counts = dict(sorted(Counter(i.relation for i in held_items).items()))
    # the original corpus's row reads, once (row protection for every patch below)
    t0 = time.perf_counter()
    model, _ = ckpt.load_model(run)

    row_counts = row_access_counts(model, np.asarray(ds.train.tokens))
    timings["row_count_s"] = time.perf_counter() - t0
    protect_stats = {str(lid): {"rows": int(c.size), "rows_read": int((c > 0).sum()),
                                "protected_at_min_count": int(protected_masks({lid: c}, cfg.protect_min_count)[lid].sum())}
                     for lid, c in row_counts.items()}

    # 3. before
    before = measure(model)

    # 4. the patch
    t0 = time.perf_counter()
    patch_path = wd / "facts.engp"
    pcfg = cfg.patch_config()
    trained_patch = train_patch_from_run(run, [new_text], patch_path, pcfg, table=table, name="held-out-facts",
                                         original_data=data_dir, row_counts=row_counts, progress=progress)
    timings["patch_train_s"] = time.perf_counter() - t0
    patched = wd / "patched.engt"
    shutil.copyfile(table, patched)
    original = table.read_bytes()
    ap = apply_patch(patched, patch_path)
    rv = revert_patch(patched, patch_path)
    bit_exact_file = patched.read_bytes() == original
    ap2 = apply_patch(patched, patch_path)
    model_p, _ = ckpt.load_model(run)
    load_tables_into(model_p, patched)
    after = measure(model_p)
    # the same patch on a loaded model, and back
    model_m, _ = ckpt.load_model(run)
    ref = {e.layer_id: e.multi_head_embedding.embedding.weight.detach().clone() for e in model_m.engram_layers}
    am = apply_to_model(model_m, patch_path)
    rm = revert_from_model(model_m, patch_path)
    bit_exact_model = all(torch.equal(ref[e.layer_id], e.multi_head_embedding.embedding.weight)
                          for e in model_m.engram_layers)

    # 4b. the same patch with int8 new values: measured, not estimated

    fp32_patch = load_patch(patch_path)
    newt = {lid: w.clone() for lid, w in ref.items()}
    for lid, lp in fp32_patch.layers.items():
        newt[lid][lp.rows] = lp.new_values(torch.float32)
    int8_path = save_patch(make_patch(ref, newt, hash_fingerprint=model_m.hasher.fingerprint(),
                                      hasher=model_m.hasher.describe(), dtype="fp32", quantization="int8",
                                      name="held-out-facts-int8", provenance=fp32_patch.meta["provenance"]),
                           wd / "facts-int8.engp")
    patched8 = wd / "patched-int8.engt"
    shutil.copyfile(table, patched8)
    ap8 = apply_patch(patched8, int8_path)
    model_8, _ = ckpt.load_model(run)
    load_tables_into(model_8, patched8)
    after_int8 = measure(model_8)
    del model_8

    # 4c. variants: other patch settings on the same base (on a loaded model, then reverted)
    variants = []
    for v in cfg.variants:
        over = parse_variant(v)
        t0 = time.perf_counter()
        vpath = wd / "variant.engp"
        rep = train_patch_from_run(run, [new_text], vpath, cfg.patch_config(**over), table=table,
                                   name=f"variant {v}", original_data=data_dir, row_counts=row_counts,
                                   progress=progress)
        apply_to_model(model_m, vpath)
        m = measure(model_m)
        revert_from_model(model_m, vpath)
        variants.append({"variant": v, "settings": {**asdict(cfg.patch_config(**over))},
                         "held_out_accuracy": m["held_out_accuracy"], "held_out_by_relation": m["held_out_by_relation"],
                         "trained_accuracy": m["trained_accuracy"], "val_loss": m["val_loss"],
                         "val_loss_rel_change": (m["val_loss"] - before["val_loss"]) / before["val_loss"],
                         "changed_rows": rep["changed_rows"], "patch_bytes": rep["patch_bytes"],
                         "loss_first": rep["loss_first"], "loss_last": rep["loss_last"],
                         "train_s": rep["train_s"], "seconds": time.perf_counter() - t0})

    # 5a. facts in the prompt (oracle retrieval), base model
    t0 = time.perf_counter()
    prompt_acc = _acc(model, ctx_items)
    extra_tokens = float(np.mean([len(a.prompt_ids) - len(b.prompt_ids) for a, b in zip(ctx_items, held_items)]))
    timings["prompt_s"] = time.perf_counter() - t0

    # 5b. N-gram memory with the held-out documents added, fixed lambda (depends on the base run
    # and lambda only: reused from workdir when those match)
    t0 = time.perf_counter()
    ngram_key = {"model_sha256": model_sha, "lambda": cfg.ngram_lambda, "eval_batches": cfg.eval_batches,
                 **cfg.base_key()}
    cached = _read_json(wd / "ngram-result.json") or {}
    if cached.get("key") == ngram_key:
        ngram = {**cached["result"], "reused_from_workdir": True}
    else:
        ngram = _ngram_alternative(cfg, model, ds, data_dir, wd, held_docs, held_facts, tok)
        (wd / "ngram-result.json").write_text(json.dumps({"key": ngram_key, "result": ngram}, indent=2) + "\n")
    timings["ngram_s"] = time.perf_counter() - t0

    table_bytes = table.stat().st_size
    res = {
        "bench": "patch", "date": time.strftime("%Y-%m-%d"), "machine": {
            "cpu": platform.processor() or platform.machine(), "threads": cfg.threads,
            "torch": torch.__version__, "gpu": torch.cuda.is_available()},
        "config": asdict(cfg), "held_out_countries": len(held_names),
        "held_out_facts": len(held_items), "held_out_facts_by_relation": relation_counts,
        "trained_facts": len(trained_items),
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
                  "settings": asdict(pcfg)},
        "after_int8_patch": after_int8,
        "int8_val_loss_rel_change": (after_int8["val_loss"] - before["val_loss"]) / before["val_loss"],
        "int8_patch_bytes": int8_path.stat().st_size, "int8_apply_s": ap8["seconds"],
        "variants": variants,
        "table_file_bytes": table_bytes,
        "apply_s": ap["seconds"], "revert_s": rv["seconds"], "reapply_s": ap2["seconds"],
        "apply_model_s": am["seconds"], "revert_model_s": rm["seconds"],
        "revert_bit_exact_file": bit_exact_file, "revert_bit_exact_model": bit_exact_model,
        "facts_in_prompt": {"held_out_accuracy": prompt_acc, "extra_prompt_tokens": extra_tokens,
                            "context": "oracle: the sentence stating the fact + newline"},
        "ngram_memory": ngram, "timings": {**timings, "total_s": time.perf_counter() - t_start},
    }
    return res


def _ngram_alternative(cfg: BenchConfig, model: Any, ds: Any, data_dir: Path, wd: Path,
                       held_docs: Sequence[Any], held_facts: Sequence[Any], tok: Any) -> dict[str, Any]:
    idx_dir = wd / "ngram-index"
    if idx_dir.exists():
        shutil.rmtree(idx_dir)
    index = NgramIndex.from_dataset(idx_dir, data_dir)
    lm = LMAdapter(model)
    lam = cfg.ngram_lambda
    cases = tokenize_cases(held_facts, tok, phrasing=0)
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
    index.add_texts([d.text for d in held_docs], name="held-out-facts")
    add_s = time.perf_counter() - t0
    after = score()
    return {"lambda": lam, "estimator": "both (infini-gram + KN, mu 0.5)", "gate": "fixed lambda (no learned gate)",
            "facts": len(cases), "before_add": before, "after_add": after, "add_s": add_s,
            "val_loss_rel_change": (after["val_loss"] - before["val_loss"]) / before["val_loss"]}
