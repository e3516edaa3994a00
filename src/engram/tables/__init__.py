"""Engram tables outside the model: the ``.engt`` file, storage tiers, prefetch, conversion.

``tablefile`` (the page-aligned, fingerprinted file format), ``tiers`` (``TableLocation``: MEMORY /
MMAP / CACHED behind one ``lookup``), ``process`` (file-backed tiers in a helper process),
``runtime`` (attach tiers to a model and fetch rows ahead of the layer; the training batch
prefetcher), ``trainable`` (tables that train in a working file: mmap, or a cached pool of hot
rows in front of it), ``convert`` (checkpoint <-> file), ``access`` (row-access counts, the Zipf statistic, simulated cache hit rates) and
``rowindex`` (an open-addressing map from row id to slot, shared with the sparse optimizer).

May import: ``engram.model``, ``engram.hashing``, ``engram.data`` and the base modules. Training
sits above this package so that it can train and evaluate models whose tables live in a tier.
"""
