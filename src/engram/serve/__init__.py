"""Serving one model to many tenants, each request with its own stack of patches over the shared tables.

``store`` (patch files by id from a directory: checked against the table, kept in an LRU cache
bounded in bytes, reloaded when their file changes), ``keys`` (API key -> the patch ids it may
use), ``service`` (one request: resolve its patches, run the model with them, never write the
table) and ``server`` (``engram serve --patches DIR``: the JSON API over the standard library's
``ThreadingHTTPServer``). docs/patches.md, "Serving patches per request".
``state_store`` and ``state_cache``: prompt states stored per block of tokens, so that a prompt
whose prefix was seen loads its state instead of reading it (``--state-cache DIR`` of
``engram generate`` and ``engram serve``; docs/state-cache.md).

May import: ``engram.inspect`` (the HTTP plumbing of ``engram serve``), ``engram.auto``,
``engram.patches`` and everything below them. Not ``engram.bench`` or ``engram.cli``.
"""
