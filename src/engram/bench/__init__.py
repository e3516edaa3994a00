"""Benchmarks that run a fast path side by side with its baseline, in one process, as ratios.

``hash`` (hashing vs the reference algorithm), ``offload`` (in-memory vs offloaded tables),
``patch`` (knowledge patches end to end), ``ngram`` (our N-gram index vs infini-gram, and the
mixture experiment).

May import every library package (``science``, ``inspect`` and below); only ``engram.cli``
imports it.
"""
