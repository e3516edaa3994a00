"""Looking inside a model: gate heatmaps (terminal, HTML, a local web page) and gate analyses.

``heatmap`` (per-token gates and the rows each head read) with its torch-free display choices
(``settings``), ``page`` (the single-file web page), ``server`` (``engram serve``: loopback
HTTP, bounded requests), ``analysis`` (gate statistics by category, token-matched and
memory-swap contrasts, ablations) and ``table_use`` (is the table used? the loss under controls
that destroy what the tables store, and its results page).

May import: ``engram.patches``, ``engram.ngram`` and everything below them; not
``engram.science``, ``engram.bench`` or ``engram.cli``.
"""
