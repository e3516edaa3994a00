"""Training and evaluation: the one training loop, its optimizers and schedule, evaluation.

``trainer`` (``train``: resumable, deterministic batches, metrics.jsonl, checkpoints),
``optimization`` (the learning-rate schedule and the clip + step that ``train`` and patch
training share), ``evaluation`` (loss / perplexity on a split, dataset-model checks),
``sparse_adam`` (row-wise lazy Adam for the tables) and ``checkpointing`` (optimizer and RNG
state in a resumable checkpoint).

May import: ``engram.tables``, ``engram.model``, ``engram.hashing``, ``engram.data`` and the base
modules.
"""
