"""Open any saved model by its path: ``load`` picks the kind from what is on disk, ``save`` writes it back.

``loader`` holds ``load`` / ``save`` (also ``engram.load`` / ``engram.save``), the kinds of model
directory (a training run, a retrofit adapter) and ``LoadedFrom``, what a loaded model records
about its directory. The command line, the inspect server and the studies open models through it.

Layer: above ``retrofit`` (it opens adapters), ``patches``, ``ngram`` and ``distributed``; below
``inspect``, ``science``, ``bench`` and ``cli``. ``transformers`` is imported only when an adapter
is opened.
"""
