"""engram-lm: conditional memory (hashed N-gram tables) for language models."""

__version__ = "0.1.0"
