"""The ``engram`` command line: one module per command group, built from the configs.

``main`` (the parser, ``train / eval / generate / data / tokenizer / demo``, the command
groups, and the error handling), ``demo`` (the main job), ``flags`` (flags generated from the
config dataclasses, the shared ``--json --quiet --data --ckpt --out``, one-line usage errors),
one module per group (``inspect``, ``table``, ``sweep``, ``ngram``, ``patch``, ``retrofit``) that
registers its subcommands, and ``bench``, which registers every ``engram bench`` subcommand.

The top layer: may import every package; nothing imports it. Handlers import the heavy
library modules inside the function so that ``engram --help`` does not load torch.
"""
