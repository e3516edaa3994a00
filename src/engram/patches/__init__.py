"""Knowledge patches: train only the tables on new text, ship the changed rows, apply and revert.

``patchfile`` (the ``.engp`` format), ``apply`` (apply / revert / list on a table file or a loaded
model, bit-exact revert) and ``trainer`` (tables-only training on new text with rehearsal).

May import: ``engram.training``, ``engram.tables``, ``engram.model`` and everything below them.
Not ``engram.ngram``, ``engram.inspect``, ``engram.science``, ``engram.bench`` or ``engram.cli``.
"""
