"""Token ids -> table rows: tokenizer compression and multi-head N-gram hashing.

``compression`` collapses a tokenizer's ids that normalise to the same text (DeepSeek's recipe),
``primes`` gives every hash head its own prime table size, ``hasher`` (``NgramHasher``) turns
compressed ids into per-head row ids on three bit-identical paths (numpy reference, torch, the
native kernel ``_hashkernel.c``), plus the one-token ``hash_step`` used while generating.

May import: ``engram.config``, ``engram.errors``, ``engram.fsutil``. Nothing else of the package.
"""
