"""The network: the Engram layer inside a transformer backbone, its generation loop and checkpoints.

``layer`` (``EngramLayer``: multi-head table, context-aware gate, value projection, short conv),
``attention`` (RoPE + KV cache), ``moe`` (SwiGLU, DeepSeekMoE), ``input_ngram`` (the bigram /
OverEncoding baselines), ``lm`` (``EngramLM`` with hyper-connection branches), ``protocol``
(``LanguageModel``: what every model offers, ``EngramLM`` and ``RetrofitLM`` alike), ``generation``
(sampling with the KV cache and incremental hashing) and ``checkpoint`` (the run directory:
safetensors + JSON, never pickle). Checkpoints live here, not in ``training``, because every
tool that loads a model (table tiers, inspection, the N-gram mixture) needs them.

May import: ``engram.hashing``, ``engram.data``, and the base modules (``config``, ``errors``,
``fsutil``).
"""
