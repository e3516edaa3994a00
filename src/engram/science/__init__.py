"""The paper's experiments at small scale, and Engram against LoRA on a pretrained model.

``accounting`` (total / activated parameters and FLOPs per token), ``sweep`` (grids of configs
over seeds with a fixed budget, resumable, summaries and plots), ``knowledge`` (held-out fact
recall), ``retrofit`` (``engram retrofit compare``: base / Engram / LoRA / both at equal training
tokens over seeds) and ``retrofit_facts`` (``engram retrofit facts``: invented facts taught by a
tables-only patch, LoRA, the prompt and the N-gram memory). Their paired t-tests come from
``engram.stats``.

May import: ``engram.patches``, ``engram.ngram``, ``engram.retrofit`` and everything below them;
not ``engram.inspect``, ``engram.bench`` or ``engram.cli``.
"""
