"""The main job (``engram demo``): built-in data, an Engram model and its baseline, a sample.

Both models share the backbone of the ``moe`` preset (same layers, experts and activated FLOPs
per token); the Engram model adds hashed N-gram tables at layer 1. They see the same batches
in the same order for the same number of steps, so the validation losses compare like for like.
Torch and the library are imported inside ``run_demo`` so that ``engram --help`` stays fast.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from engram.config import TrainConfig, preset
from engram.errors import EngramError

DEMO_TRAIN = dict(batch_size=16, seq_len=128, lr=3e-3, warmup_steps=30, eval_every=100,
                  eval_batches=20, save_every=100, log_every=10)


def run_demo(workdir: str = "engram-demo", steps: int = 540, quiet: bool = False) -> dict:
    import torch

    from engram.data.shards import load_dataset, prepare_builtin
    from engram.data.tokenizer import load_tokenizer
    from engram.model.checkpoint import load_model
    from engram.model.generation import SamplingConfig, generate
    from engram.training.trainer import train

    work = Path(workdir)
    data_dir = work / "data"
    t0 = time.time()
    if not (data_dir / "meta.json").exists():
        print(f"[1/4] preparing the built-in corpus into {data_dir} ...", flush=True)
        prepare_builtin(str(data_dir), tokenizer="bpe", vocab_size=4096, progress=not quiet)
    else:
        print(f"[1/4] reusing prepared data in {data_dir}", flush=True)
    ds = load_dataset(str(data_dir))
    vocab = int(ds.meta["vocab_size"])
    unigram = float(ds.meta["train_unigram_entropy"]["nats_per_token"])

    if steps < 1:
        raise EngramError(f"steps={steps} must be >= 1")
    results = {}
    for i, name in enumerate(("moe", "engram-moe"), start=2):
        cfg = preset(name, vocab)
        tcfg = TrainConfig(steps=steps, **DEMO_TRAIN)
        print(f"[{i}/4] training {name} for {steps} steps ...", flush=True)
        # No wall-clock cap: both models must see exactly the same batches.
        summary = train(cfg, tcfg, str(data_dir), str(work / "runs" / name), resume=False,
                        progress=not quiet, overwrite=True)
        results[name] = summary

    print("[4/4] sampling from the Engram model", flush=True)
    model, _ = load_model(str(work / "runs" / "engram-moe"))
    tok = load_tokenizer(str(work / "runs" / "engram-moe" / "tokenizer.json"))
    prompt = "ROMEO. "
    ids = torch.tensor([tok.encode(prompt).ids])
    out = generate(model, ids, SamplingConfig(max_new_tokens=60, temperature=0.8, top_p=0.95, seed=0))
    sample = tok.decode(out[0].tolist())

    print()
    print(f"unigram entropy of the training data: {unigram:.3f} nats/token")
    print(f"{'model':<12} {'params':>12} {'tables':>10} {'steps':>6} {'val loss':>9} {'ppl':>8}")
    for name, s in results.items():
        pc = s["param_counts"]
        print(f"{name:<12} {pc['total']:>12,} {pc['tables']:>10,} {s['steps']:>6} "
              f"{s['final_val_loss']:>9.4f} {s['final_val_ppl']:>8.2f}")
    delta = results["engram-moe"]["final_val_loss"] - results["moe"]["final_val_loss"]
    print(f"engram-moe minus moe: {delta:+.4f} nats/token (negative = Engram helps)")
    print(f"\nsample: {sample!r}")
    print(f"\ndone in {(time.time() - t0) / 60:.1f} min; runs in {work / 'runs'}")
    report = {"unigram_entropy_nats": unigram, "results": results, "sample": sample}
    (work / "demo_result.json").write_text(json.dumps(report, indent=2, default=str))
    return report
