"""Count-based N-gram memory: an exact suffix-array index mixed with any causal LM.

    from engram.ngram import NgramIndex
    index = NgramIndex.from_dataset("INDEX", "DATA")           # build (suffix array, mmap'd)
    index.count(ids); index.ntd(ctx); index.infgram_ntd(ctx); index.kn_ntd(ctx, order=5)
    index.add_texts(["New facts."], name="facts")              # instant update, no rebuild
    index.remove("facts")                                      # and back

See docs/ngram.md. Modules: :mod:`.suffix_array` (construction, search, document rule),
:mod:`.segment` (file format), :mod:`.index` (deltas, query verbs, batched estimates),
:mod:`.kn` (modified Kneser-Ney), :mod:`.mixture` (lambda gate, scoring, generation),
:mod:`.draft` + :mod:`.speculative` (generation drafted from the index, verified by the model;
docs/speculative.md).
"""

from engram.ngram.index import (
    DEFAULT_KN_ORDER,
    InfgramResult,
    LeakageError,
    NgramBatch,
    NgramIndex,
    SegmentInfo,
    UnseenContextError,
)
from engram.ngram.segment import NgramIndexError, SegmentError
from engram.ngram.suffix_array import NATIVE_KERNEL_AVAILABLE, build_suffix_array

__all__ = [
    "DEFAULT_KN_ORDER", "InfgramResult", "LeakageError", "NgramBatch", "NgramIndex", "NgramIndexError",
    "SegmentError", "SegmentInfo", "UnseenContextError", "NATIVE_KERNEL_AVAILABLE", "build_suffix_array",
]
