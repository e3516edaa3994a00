"""Settings of the benchmarks, each default written once.

``engram bench`` builds its flags from these dataclasses (``engram.cli.bench``), and the
benchmark functions take their keyword defaults from them, so the command line and the library
cannot drift apart. Torch-free: the command line imports this module to build its parser.
``PatchBenchConfig`` (``engram bench patch``) lives with the patch configs in ``engram.config``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from engram.config import SERVING_LOCATIONS, CachePolicy, DraftConfig, TableLocation, TableOptimizer, setting

TABLE_DTYPES = ("fp32", "bf16", "fp16")


@dataclass
class HashBenchConfig:
    """``engram bench hash``: hashing throughput against the reference algorithm."""

    batch_size: int = setting(8)
    seq_len: int = setting(4096)
    repeats: int = setting(5, "timed repeats of every path, after the warm-up ones (the headline is their median)")
    warmup: int = setting(2, "untimed-for-the-headline repeats of every path first, reported apart (warmup_*)")
    threads: int = setting(1)
    device: str = setting("cpu", "cpu, or cuda: also time the torch path on the GPU (ids already there, "
                          "synchronized per call)", metavar="DEV")


@dataclass
class StepBenchConfig:
    """``engram bench step``: one training step of ``engram-moe`` against ``moe``, by phase."""

    rounds: int = setting(5, "timed rounds (plus one warm-up)")
    steps: int = setting(6, "steps of each model per round")
    threads: Optional[int] = setting(1)
    table_optimizer: str = setting(TableOptimizer.ADAM.value, choices=TableOptimizer.values())
    fused_adam: bool = setting(True, "one-pass Adam kernels; --no-fused-adam: torch's for-loop Adam "
                                     "(train.fused_adam=false)")


@dataclass
class TableOptimizerBenchConfig:
    """``engram bench table-optimizer``: training steps/s and table state, dense vs row-sparse Adam."""

    steps: int = setting(12, "steps per round and optimizer")
    rounds: int = setting(3, "timed rounds (plus one warm-up)")
    rows_per_head: Optional[int] = setting(None, "rows per hash head (default: the preset's; --table-rows "
                                           "is the old name)", aliases=("--table-rows",))
    batch_size: int = setting(16)
    seq_len: int = setting(128)
    threads: Optional[int] = setting(1, "torch intra-op threads (default 1)")


@dataclass
class TrainTiersBenchConfig:
    """``engram bench train-tiers``: training with the tables in memory, mmap and cached."""

    steps: int = setting(8, "steps per round and tier")
    rounds: int = setting(3, "timed rounds (plus one warm-up)")
    cache_rows: int = setting(16384, "cached tier: pool rows per table")
    rows_per_head: Optional[int] = setting(None, "rows per hash head (default: the preset's; --table-rows "
                                           "is the old name)", aliases=("--table-rows",))
    batch_size: int = setting(16)
    seq_len: int = setting(128)
    threads: Optional[int] = setting(1, "torch intra-op threads (default 1)")


@dataclass
class DistributedBenchConfig:
    """``engram bench distributed``: row-sharded training on 1 vs ``world`` processes."""

    world: int = setting(2, "processes to compare with one (default 2)")
    preset_name: str = setting("engram-moe", "model preset (default engram-moe, the demo's)", flag="--preset")
    steps: int = setting(12)
    warmup: int = setting(3, "steps left out of the step time")
    batch_size: int = setting(8, "the global batch (split over the ranks)")
    seq_len: int = setting(64)
    repeats: int = setting(3)
    table_optimizer: str = setting(TableOptimizer.SPARSE_ADAM.value, choices=TableOptimizer.values())


@dataclass
class OffloadBenchConfig:
    """``engram bench offload``: tokens/s with the tables in RAM vs in a file behind a cache."""

    batch_size: int = setting(8)
    seq_len: int = setting(256)
    rounds: int = setting(12, "timed rounds (plus one warm-up)")
    batches_per_round: int = setting(8, "batches per round and mode", flag="--batches")
    warm_batches: int = setting(200, "batches of the stream replayed into the pools first (steady state)")
    cache_rows: int = setting(1 << 20, "pool rows per layer")
    rows_per_head: int = setting(409_600, "rows per hash head (--table-rows is the old name)",
                                 aliases=("--table-rows",))
    policy: str = setting(CachePolicy.LRU.value, choices=CachePolicy.values())
    io_threads: int = setting(16)
    dtype: str = setting("fp32", choices=TABLE_DTYPES)
    cold: bool = setting(True, "drop the table file from the page cache before reading (default; "
                               "--warm or --no-cold keeps it)")
    process: bool = setting(True, "run the cached tier in a helper process (default) or on a thread",
                            flag="--fetch-process")
    threads: Optional[int] = setting(1, "torch intra-op threads for the model (default 1: the other core "
                                        "serves I/O)")
    pin: bool = setting(True, "pin the model's thread to the first CPU and all row serving to the others "
                              "(default on with 2+ CPUs)")
    workdir: Optional[str] = setting(None, "where the temporary table file goes (default: $TMPDIR)")
    repeats: int = setting(3, "blocks the timed rounds are split into (the spread)")
    device: str = setting("cpu", "where the model runs: cpu, or cuda (in_memory: tables on the GPU; the "
                          "served modes: tables in host RAM / the file, rows copied through pinned memory on "
                          "a side stream)", metavar="DEV")
    capacity_batches: int = setting(16, "batches of the serving-capacity run")
    standin_batches: int = setting(16, "batches per stand-in forward speed")
    standin_tokens_per_s: Optional[tuple[float, ...]] = setting(
        None, "stand-in forward speeds in tokens/s (default: 9031, the paper's, and 0.5x, 1x, 2x the tier's "
              "measured capacity)", flag="--standin-tps", metavar="N,N")


@dataclass
class LargeTableBenchConfig:
    """``engram bench large-table``: a table larger than RAM served from a cached tier."""

    size_gib: float = setting(32.0)
    cache_rows: int = setting(1 << 21, "pool rows per layer")
    policy: str = setting(CachePolicy.LRU.value, choices=CachePolicy.values())
    io_threads: int = setting(16)
    eval_batches: int = setting(20)
    gen_tokens: int = setting(128)
    workdir: Optional[str] = setting(None, "where the table goes (default: $TMPDIR)")
    keep: bool = setting(False, "keep the table file afterwards (a later run reuses it)")
    threads: Optional[int] = setting(1, "torch intra-op threads (default 1)")


@dataclass
class NgramBenchConfig:
    """``engram bench ngram``: the N-gram index against the infini-gram package."""

    workdir: str = setting("ngram-bench")
    out_dir: Optional[str] = setting("benchmarks/results", "where the JSON and Markdown results go",
                                     flag="--results")
    queries: int = setting(2000)
    repeats: int = setting(3)
    build_repeats: int = setting(3, "builds of both indexes timed again, alternating, after the queries")


@dataclass
class NgramMixBenchConfig:
    """``engram bench ngram-mix``: mixture perplexity (fixed vs learned lambda) + instant fact update."""

    workdir: str = setting("ngram-bench")
    out_dir: Optional[str] = setting("benchmarks/results", "where the JSON and Markdown results go",
                                     flag="--results")
    max_windows: Optional[int] = setting(None, "windows per half of val (default: all)")
    n_countries: int = setting(40, "invented countries (4 facts each)", flag="--countries")


@dataclass
class DraftBenchConfig:
    """``engram bench draft``: generation drafted from memory vs plain decoding."""

    ks: tuple[int, ...] = setting((2, 4, 8), "draft lengths K to compare (default 2,4,8)", metavar="K,K")
    fixed_ks: tuple[int, ...] = setting((), "also time these K with a fixed draft length (--draft-fixed)",
                                        metavar="K,K")
    hf_plain: bool = setting(True, "retrofitted models: also time transformers' plain greedy generate()")
    prompt_lookup: tuple[int, ...] = setting((4, 10), "retrofitted models: transformers' prompt lookup with these "
                                             "prompt_lookup_num_tokens (default 4,10)", metavar="K,K")
    prompts_file: Optional[str] = setting(None, "prompts from this file instead of val windows: one per line, or "
                                          "for .jsonl one {\"text\": ...} object per line", metavar="FILE")
    prompts: int = setting(8, "held-out prompts from the val split, or the first of --prompts-file (default 8)")
    prompt_len: int = setting(32)
    max_new_tokens: int = setting(64)
    repeats: int = setting(3, "timed rounds (default 3)")
    min_match: int = setting(DraftConfig.min_match)
    leak_tokens: int = setting(32, "refuse prompts with a run of this many tokens found in the index")
    threads: int = setting(1)
    seed: int = setting(0)
    temperature: float = setting(0.0, "0 = greedy (default; outputs compared token for token), > 0 samples")


@dataclass
class RetrofitBenchConfig:
    """``engram bench retrofit``: tokens/s of a retrofitted model vs its base (and LoRA)."""

    base: str = setting("smollm2-135m", metavar="NAME|DIR")
    layers: tuple[int, ...] = setting((1,), "Engram before these decoder layers (default 1)", metavar="L,L")
    batch_size: int = setting(4)
    seq_len: int = setting(256)
    repeats: int = setting(5)
    train_steps: int = setting(3)
    rows_per_head: int = setting(131_072, "Engram rows per hash head (--table-size is the old name)",
                                 aliases=("--table-size",))
    threads: Optional[int] = setting(None, "torch threads (default: torch's)")
    lora_rank: int = setting(0, "also time LoRA of this rank (Engram off) and LoRA + Engram against the base")


@dataclass
class OverlayBenchConfig:
    """``engram bench overlay``: requests/s and latency of the tenant server with 0, 1 and N tenants'
    patches against none, and the memory each tenant's patch holds."""

    preset: str = setting("engram-moe", "model preset (random weights; the shape is what costs)")
    vocab_size: int = setting(4096, "vocabulary of the model (the demo's BPE size)")
    tenants: int = setting(8, "tenants of the many-tenants mode, one patch each")
    patch_rows: int = setting(2048, "rows each tenant's patch changes in every Engram layer")
    requests: int = setting(32, "requests per mode and repeat")
    prompt_len: int = setting(64, "prompt tokens per request")
    max_new_tokens: int = setting(8, "greedy tokens generated per request")
    repeats: int = setting(3, "rounds; in each the modes take turns request by request")
    threads: Optional[int] = setting(1, "torch intra-op threads (default 1)")
    seed: int = setting(0)


@dataclass
class AccelBenchConfig:
    """``engram bench accel``: training steps/s with and without ``train.compile``, and bf16 against fp32."""

    preset: str = setting("moe", "demo preset of the compile measurement (moe: the smaller of the demo's two)")
    steps: int = setting(4, "training steps per side and repeat (demo preset)")
    repeats: int = setting(3, "repeats; the side that goes first alternates")
    warmup_steps: int = setting(2, "first steps of each side, timed apart (the compiled ones: compile time)")
    retrofit_data: Optional[str] = setting(None, "a dataset in SmolLM2 tokens (`engram retrofit data`): also "
                                           "measure compile on the SmolLM2-135M retrofit (default: skipped)",
                                           metavar="DIR")
    retrofit_steps: int = setting(2, "training steps per side and repeat (retrofit)")
    bf16_preset: str = setting("engram-moe", "demo preset trained in bf16 and fp32")
    bf16_steps: int = setting(100, "training steps of the bf16 / fp32 comparison")
    eval_batches: int = setting(20, "validation batches after the bf16 / fp32 training (the demo's 20)")
    threads: int = setting(1, "torch intra-op threads (default 1)")
    seed: int = setting(0)


@dataclass
class StateCacheBenchConfig:
    """``engram bench state-cache``: time to first token with and without stored prompt states
    (``--state-cache``), for prompts that share a long prefix, and the bytes per cached token."""

    preset: str = setting("engram-moe", "model preset (random weights; the shape is what costs)")
    vocab_size: int = setting(4096, "vocabulary of the model (the demo's BPE size)")
    prefix_lens: tuple[int, ...] = setting((256, 512, 1024, 2048, 4096), "lengths of the shared prefix, in tokens")
    suffix_len: int = setting(32, "tokens after the prefix, new in every prompt")
    block_tokens: int = setting(64, "prompt tokens per stored state")
    storage: str = setting("mmap", "where the states live: memory, mmap (files) or cached",
                           choices=TableLocation.values(SERVING_LOCATIONS))
    repeats: int = setting(5, "prompts per prefix length; the modes take turns, in a rotating order")
    threads: Optional[int] = setting(1, "torch intra-op threads (default 1)")
    seed: int = setting(0)



@dataclass
class TableDtypeBenchConfig:
    """``engram bench table-dtype``: fp8 table files against bf16 and fp32 - paired eval loss of an
    Engram run and/or a retrofit adapter, bytes per row, and rows/s through every storage tier."""

    workdir: str = setting("table-dtype-work", "where the converted table files are written")
    variants: tuple[str, ...] = setting(("fp32", "bf16", "fp8", "fp8-amax"),
                                        "table variants evaluated (fp8-amax: amax/448 scales, not a file format)")
    adapter_variants: tuple[str, ...] = setting(("fp32", "bf16", "fp8"), "table variants of the adapter "
                                                "(its evaluations are the slow part)")
    demo_batches: int = setting(40, "validation batches of the run (--ckpt)")
    demo_batch_size: int = setting(8)
    demo_seq_len: int = setting(128)
    adapter_batches: int = setting(40, "validation batches of the adapter (--adapter)")
    adapter_batch_size: int = setting(2)
    adapter_seq_len: int = setting(256)
    tiers: tuple[str, ...] = setting(("memory", "mmap", "mmap-cold", "cached", "cached-process"),
                                     "storage tiers timed")
    lookups: int = setting(20, "lookups per timed run")
    rows_per_lookup: int = setting(4096, "distinct random rows per lookup")
    repeats: int = setting(3, "timed runs per tier and dtype (bf16 and fp8 take turns)")
    cache_fraction: float = setting(0.25, "rows of the cached tiers' pool, as a fraction of the table")
    threads: int = setting(1, "torch intra-op threads")
    seed: int = setting(0)


@dataclass
class QueryBenchConfig:
    """``engram bench query``: latency per question with knowledge in a patch (read per request)
    or in a BM25 retriever, beside the model alone."""

    questions: int = setting(60, "held-out questions asked (round robin over the facts)")
    max_new_tokens: int = setting(8, "greedy tokens generated per question")
    k: int = setting(3, "retrieval: passages put before the question")
    distractors: int = setting(10_000, "retrieval: sentences of built-in text in the store beside the facts'")
    repeats: int = setting(3, "rounds; the methods take turns on every question in a rotating order")
    threads: Optional[int] = setting(1, "torch intra-op threads (default 1)")
