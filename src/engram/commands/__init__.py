"""CLI command groups contributed by feature modules.

Each module listed in ``COMMAND_MODULES`` defines ``register(sub, bench)``: ``sub`` is the
top-level ``engram`` subparsers object and ``bench`` the ``engram bench`` one. A handler is
stored with ``set_defaults(fn=...)``, takes the parsed args and returns an exit status.
"""

COMMAND_MODULES: tuple[str, ...] = ()
