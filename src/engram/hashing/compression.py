"""Tokenizer compression: collapse token ids whose text differs only superficially.

Engram keys its N-gram tables on *compressed* ids so that, e.g., ``"Apple"``, ``" apple"`` and
``"APPLE"`` share memory slots. The recipe follows DeepSeek's reference ``CompressedTokenizer``:

1. decode every id on its own (special tokens kept);
2. if the text contains U+FFFD (a partial UTF-8 byte sequence), key it by the raw vocabulary
   string, which keeps distinct byte fragments distinct;
3. otherwise normalise: NFKC, NFD, strip accents, lowercase, collapse whitespace runs to one
   space, strip — except that a token that is *only* whitespace keeps a single space (it is
   protected by a private-use sentinel through ``Strip``);
4. an empty normalised key falls back to the decoded text;
5. new ids are handed out in first-seen order (id 0 upwards).

On DeepSeek-V3's 129,280-id tokenizer this gives 99,092 compressed ids, which the conformance
data in ``shared/conformance`` pins down exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, normalizers
from tokenizers.normalizers import NFD, NFKC, Lowercase, Replace, Strip, StripAccents

from engram.errors import EngramError
from engram.fsutil import PathLike, atomic_write

REPLACEMENT_CHAR = "\ufffd"
_SENTINEL = "\ue000"  # private-use char: survives Strip, so a lone space stays " "


def _normalizer() -> normalizers.Normalizer:
    return normalizers.Sequence(
        [
            NFKC(),
            NFD(),
            StripAccents(),
            Lowercase(),
            Replace(Regex(r"[ \t\r\n]+"), " "),
            Replace(Regex(r"^ $"), _SENTINEL),
            Strip(),
            Replace(_SENTINEL, " "),
        ]
    )


def compression_key(text: str, raw_token: str, normalizer: normalizers.Normalizer) -> str:
    """The grouping key of one token, given its decoded text and raw vocabulary string."""
    if REPLACEMENT_CHAR in text:
        return raw_token
    key = normalizer.normalize_str(text)
    return key if key else text


@dataclass
class CompressionMap:
    """Old id -> compressed id. ``keys[new_id]`` is the normalised text of that group.

    ``keys`` is empty for a map read back with :meth:`load` (the .npy holds only the lookup).
    """

    lookup: np.ndarray  # int64 [vocab_size]
    num_compressed: int
    keys: list[str] = field(default_factory=list)
    _device_cache: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        _validate_lookup(self.lookup, where="CompressionMap")
        n = int(self.lookup.max()) + 1 if self.lookup.size else 0
        if n != self.num_compressed:
            raise EngramError(
                f"num_compressed={self.num_compressed} but the lookup uses ids 0..{n - 1}; "
                f"pass num_compressed={n}"
            )
        if self.keys and len(self.keys) != n:
            raise EngramError(f"keys has {len(self.keys)} entries, expected {n} (one per compressed id)")

    @property
    def vocab_size(self) -> int:
        return int(self.lookup.shape[0])

    @property
    def reduction(self) -> float:
        """Fraction of ids removed, e.g. 0.2335 for DeepSeek-V3."""
        return 1.0 - self.num_compressed / self.vocab_size if self.vocab_size else 0.0

    def group_sizes(self) -> np.ndarray:
        return np.bincount(self.lookup, minlength=self.num_compressed)

    def largest_groups(self, k: int = 10) -> list[tuple[str, int]]:
        """The ``k`` biggest groups as (key, size), largest first, ties in first-seen order."""
        sizes = self.group_sizes()
        order = np.argsort(-sizes, kind="stable")[: max(k, 0)]
        return [(self.keys[i] if self.keys else f"#{i}", int(sizes[i])) for i in order]

    def apply(self, ids: Any) -> Any:
        """Map original ids (numpy array, torch tensor, list or int) to compressed ids."""
        if isinstance(ids, torch.Tensor):
            return self._apply_torch(ids)
        arr = np.asarray(ids)
        if not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"token ids must be integers, got dtype {arr.dtype}")
        self._check_range(arr)
        out = self.lookup[arr]
        return int(out) if np.ndim(ids) == 0 and not isinstance(ids, np.ndarray) else out

    def _apply_torch(self, ids: "torch.Tensor") -> "torch.Tensor":
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise TypeError(f"token ids must be an integer tensor, got {ids.dtype}")
        if ids.numel():
            lo, hi = int(ids.min()), int(ids.max())
            self._check_bounds(lo, hi)
        table = self._device_cache.get(ids.device)
        if table is None:  # one host->device copy per device, not per call
            table = torch.from_numpy(self.lookup).to(ids.device)
            self._device_cache[ids.device] = table
        return table[ids.long()]

    def _check_range(self, arr: np.ndarray) -> None:
        if arr.size:
            self._check_bounds(int(arr.min()), int(arr.max()))

    def _check_bounds(self, lo: int, hi: int) -> None:
        # Negative ids would silently wrap around in numpy/torch indexing.
        if lo < 0 or hi >= self.vocab_size:
            bad = lo if lo < 0 else hi
            raise EngramError(
                f"token id {bad} is outside the tokenizer vocabulary [0, {self.vocab_size}); "
                "was the compression built for a different tokenizer?"
            )

    def save(self, path: PathLike) -> None:
        """Write the lookup as a .npy file, atomically (no half-written file on failure)."""
        lookup = np.ascontiguousarray(self.lookup, dtype=np.int64)
        atomic_write(path, lambda f: np.save(f, lookup, allow_pickle=False))

    @classmethod
    def load(cls, path: PathLike) -> "CompressionMap":
        """Read a lookup written by :meth:`save`, checking it is a valid dense map."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no compression map at {path}; build one with build_compression()")
        try:
            lookup = np.load(path, allow_pickle=False)
        except ValueError as e:
            raise EngramError(f"{path} is not a valid .npy compression map: {e}") from e
        _validate_lookup(lookup, where=str(path))
        n = int(lookup.max()) + 1 if lookup.size else 0
        return cls(lookup=lookup, num_compressed=n, keys=[])


def _validate_lookup(lookup: Any, where: str) -> None:
    if not isinstance(lookup, np.ndarray):
        raise TypeError(f"{where}: lookup must be a numpy array, got {type(lookup).__name__}")
    if lookup.ndim != 1:
        raise EngramError(f"{where}: lookup must be 1-D [vocab_size], got shape {lookup.shape}")
    if lookup.dtype != np.int64:
        raise EngramError(f"{where}: lookup must be int64, got {lookup.dtype}")
    if lookup.size == 0:
        raise EngramError(f"{where}: lookup is empty; a tokenizer has at least one id")
    lo, hi = int(lookup.min()), int(lookup.max())
    if lo < 0:
        raise EngramError(f"{where}: lookup contains negative id {lo}")
    if hi >= lookup.size:
        raise EngramError(f"{where}: lookup value {hi} >= vocab size {lookup.size}")
    used = np.zeros(hi + 1, dtype=bool)
    used[lookup] = True
    if not used.all():
        missing = int(np.flatnonzero(~used)[0])
        raise EngramError(
            f"{where}: compressed ids are not dense 0..{hi}: id {missing} is never used"
        )


def decode_each(tok: Tokenizer) -> list[str]:
    """Every id decoded on its own, special tokens included."""
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    # One batch call instead of 129k Python->Rust round trips; results equal per-id decode().
    return tok.decode_batch([[i] for i in range(vocab_size)], skip_special_tokens=False)


def build_compression(tok: Tokenizer) -> CompressionMap:
    """Build the compression map of ``tok`` (DeepSeek's recipe, see the module docstring)."""
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    texts = decode_each(tok)
    norm = _normalizer()
    new_id: dict[str, int] = {}
    keys: list[str] = []
    lookup = np.empty(vocab_size, dtype=np.int64)
    for i, text in enumerate(texts):
        raw = tok.id_to_token(i)
        if raw is None:  # a hole in the id space: keep it as its own group
            raw = text = f"<unused id {i}>"
        key = compression_key(text, raw, norm)
        j = new_id.get(key)
        if j is None:
            j = new_id[key] = len(keys)
            keys.append(key)
        lookup[i] = j
    return CompressionMap(lookup=lookup, num_compressed=len(keys), keys=keys)


def report(tok: Tokenizer, k: int = 10) -> dict[str, Any]:
    """Summary for ``engram tokenizer report``."""
    cmap = build_compression(tok)
    return {
        "vocab_size": cmap.vocab_size,
        "compressed_size": cmap.num_compressed,
        "reduction": cmap.reduction,
        "largest_groups": [list(g) for g in cmap.largest_groups(k)],
    }


def group_members(cmap: CompressionMap, tok: Tokenizer, new_id: int, limit: int = 20) -> list[str]:
    """Decoded texts of (up to ``limit``) original ids in compressed group ``new_id``; for inspection."""
    ids = np.flatnonzero(cmap.lookup == new_id)[:limit]
    return [tok.decode([int(i)], skip_special_tokens=False) for i in ids]


# Re-exported for callers that prefer a function to the classmethod.
load_compression = CompressionMap.load
