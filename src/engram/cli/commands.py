"""CLI command groups contributed by feature modules.

Each module listed in ``COMMAND_MODULES`` defines ``register(sub, bench)``: ``sub`` is the
top-level ``engram`` subparsers object and ``bench`` the ``engram bench`` one. A handler is
stored with ``set_defaults(fn=...)``, takes the parsed args and returns an exit status.
"""

COMMAND_MODULES: tuple[str, ...] = (
    "engram.cli.inspect",  # inspect, serve, analyze {gates,zipf,ablate}
    "engram.cli.table",  # table {inspect,convert,stats}, bench {offload,large-table}
    "engram.cli.sweep",  # sweep {run,plan,summary,account}
    "engram.cli.ngram",  # ngram {build,add,remove,compact,query,stats,train-gate}, bench {ngram,ngram-mix}
    "engram.cli.patch",  # patch {train,apply,revert,list,info}, bench patch
)
