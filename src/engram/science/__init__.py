"""The paper's experiments at small scale: iso-parameter sweeps, accounting, fact recall, statistics.

``accounting`` (total / activated parameters and FLOPs per token), ``sweep`` (grids of configs
over seeds with a fixed budget, resumable, summaries and plots) and ``knowledge`` (held-out fact
recall).

May import: ``engram.patches``, ``engram.ngram`` and everything below them; not
``engram.inspect``, ``engram.bench`` or ``engram.cli``.
"""
