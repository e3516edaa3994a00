"""Benchmarks that run a fast path side by side with its baseline, in one process, as ratios.

``hash`` (hashing vs the reference algorithm), ``step`` (a training step of ``engram-moe``
vs ``moe``, by phase), ``offload`` (in-memory vs offloaded tables, a table larger than RAM,
dense vs row-sparse table Adam), ``train_tiers`` (training with the tables in memory, mmap or
cached), ``patch`` (knowledge patches end to end), ``ngram`` (our N-gram index vs infini-gram,
and the mixture experiment), ``draft`` (generation with and without drafts from the N-gram
memory), ``distributed`` (row-sharded training on 1 vs W processes) and ``retrofit`` (a
retrofitted Hugging Face model against its base, and against LoRA). ``config`` holds their
settings (torch-free): ``engram bench`` builds its flags from it and the functions take their
defaults from it.

May import every library package (``science``, ``inspect`` and below); only ``engram.cli``
imports it.
"""
