"""Serving one model to many tenants, each request with its own stack of patches over the shared tables.

``store`` (patch files by id from a directory: checked against the table, kept in an LRU cache
bounded in bytes, reloaded when their file changes), ``keys`` (API key -> the patch ids it may
use), ``service`` (one request: resolve its patches, run the model with them, never write the
table) and ``server`` (``engram serve --patches DIR``: the JSON API over the standard library's
``ThreadingHTTPServer``). docs/patches.md, "Serving patches per request".

May import: ``engram.inspect`` (the HTTP plumbing of ``engram serve``), ``engram.auto``,
``engram.patches`` and everything below them. Not ``engram.bench`` or ``engram.cli``.
"""
