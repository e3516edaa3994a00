"""Engram on pretrained Hugging Face causal LMs: retrofit, train the memory only, ship adapters.

``base`` loads a supported base model offline and fingerprints it; ``model`` puts Engram
layers into it with hooks (``RetrofitLM``); ``adapter`` saves and loads what was trained
(JSON config, safetensors weights, an ``.engt`` table file); ``trainer`` trains the Engram
layers with the backbone frozen. Needs the ``hf`` extra (``transformers``, ``gguf``).

Layer: imports engram.training, engram.tables, engram.model, engram.hashing, engram.data and
below; never the command line, benchmarks or its siblings (patches, ngram).
"""
