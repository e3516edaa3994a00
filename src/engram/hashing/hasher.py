"""Multi-head N-gram hashing: token ids -> per-head rows of Engram's prime-sized tables.

Bit-exact with DeepSeek's reference (``NgramHashMapping`` in deepseek-ai/Engram), checked by
``tests/hashing/test_hasher.py`` against ``tests/conformance/hash_vectors.json``:

- ids are first mapped through the tokenizer compression ``lookup`` (old id -> new id);
- each layer gets odd multipliers ``m = 2 r + 1``, ``r`` drawn from
  ``numpy.random.default_rng(seed + 10007 * layer_id)`` below ``(int64_max // Vc) // 2``;
- ``mix_n(t) = XOR_{k<n} c[t-k] * m[k]`` (positions before 0 hold the compressed pad id), and
  head ``j`` of order ``n`` reads row ``mix_n(t) mod p[layer][n-2][j]``, where every head of the
  model has its own prime ``p`` just above ``rows_per_head[n-2]``.

Padding: with an ``attention_mask`` (1 = real token, 0 = padding), every masked position reads
as the pad id, like the positions before 0. A left-padded row therefore hashes exactly as its
unpadded prompt does (the N-grams of its real tokens never see the pad tokens); the ids at the
padded positions themselves are well defined but meaningless. Without a mask, or with one of all
ones, nothing changes.

Because ``m[k] < int64_max // Vc``, every product and XOR stays in ``[0, 2^63)``: no overflow.

Hash ids are int32 whenever every head's table has fewer than 2^31 rows (``id_dtype``; all
real configurations), int64 otherwise: the native kernel is bound by the bytes it writes (H ids
per token per layer against one id read), so half-width ids halve its memory traffic. Values
do not depend on the dtype, and embedding lookups accept both; ``hash(..., dtype=torch.int64)``
gives the wide form. ``hash_reference`` keeps int64, as in the reference.

Three paths produce identical ids: ``hash_reference`` (plain numpy, mirrors the reference;
for tests and the benchmark baseline), the vectorised torch path (any device), and an optional
native CPU kernel (``_hashkernel.c``, Barrett reduction instead of 64-bit division; on CPUs
with AVX-512, or else AVX2, and eight heads per order, the eight remainders of one mix at once,
through a double-precision quotient corrected to the exact remainder) that ``hash`` picks
automatically for CPU input when it was built. ``_hashkernel.VECTOR`` names the vector path it
takes ("AVX-512", "AVX2" or ""; AVX2's takes tables below 2^30 rows per head). A caller that
hashes batch after batch can give ``hash`` one buffer from ``empty_output`` (``out=``) instead
of a fresh output per call.

Shape legend:
    B batch    T positions    L Engram layers    N max_ngram_size    O = N - 1 orders (n = 2..N)
    K n_head_per_ngram    H = O * K heads per layer, order-major (all heads of n=2, then n=3, ...)
    V tokenizer vocab    Vc compressed vocab
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from engram.config import EngramConfig
from engram.errors import EngramError
from engram.hashing.primes import find_table_sizes

try:  # built by setup.py when a C compiler is available; optional by design
    from engram.hashing import _hashkernel as _native
except ImportError:  # pragma: no cover - depends on the build environment
    _native = None

NATIVE_KERNEL_AVAILABLE: bool = _native is not None
"""True when the native CPU kernel was built and imported."""

BACKENDS = ("auto", "torch", "native")
PRIME_LAYER_STRIDE = 10007  # seed offset per layer id, as in the reference
_INT64_MAX = int(np.iinfo(np.int64).max)
_INT32_LIMIT = 1 << 31  # ids of a table with fewer rows fit int32
ID_DTYPES = (torch.int32, torch.int64)
_FORMAT = "engram.ngram-hash/1"  # bump if the hashing algorithm ever changes

ArrayLike = Union[np.ndarray, torch.Tensor]


def layer_multipliers(cfg: EngramConfig, compressed_vocab_size: int) -> dict[int, np.ndarray]:
    """Odd per-position multipliers ``[N]`` of every layer, small enough that ``id * m`` fits int64."""
    half_bound = max(1, (_INT64_MAX // compressed_vocab_size) // 2)
    out = {}
    for layer_id in cfg.layer_ids:
        rng = np.random.default_rng(cfg.seed + PRIME_LAYER_STRIDE * layer_id)
        r = rng.integers(0, half_bound, size=cfg.max_ngram_size, dtype=np.int64)
        out[layer_id] = r * 2 + 1
    return out


def head_offsets(head_sizes: Sequence[int]) -> list[int]:
    """Start row of each head in a table that concatenates the heads' tables in order:
    ``[0, N_0, N_0 + N_1, ...]``; head h owns rows ``[offset_h, offset_h + N_h)``."""
    offsets, start = [], 0
    for n in head_sizes:
        offsets.append(start)
        start += int(n)
    return offsets


# ----------------------------------------------------------------------------- hasher
class NgramHasher:
    """Maps token ids to the hash ids of every Engram layer (see the module docstring).

    ``compression`` is the tokenizer's old->new id map (int64 ``[V]``); it is ignored when
    ``cfg.use_compression`` is False. An identity map is treated as no compression.
    """

    def __init__(self, cfg: EngramConfig, tokenizer_vocab_size: int,
                 compression: Optional[np.ndarray] = None) -> None:
        tokenizer_vocab_size = int(tokenizer_vocab_size)
        if tokenizer_vocab_size < 1:
            raise EngramError(f"tokenizer_vocab_size={tokenizer_vocab_size} must be >= 1")
        if not 0 <= cfg.pad_id < tokenizer_vocab_size:
            raise EngramError(
                f"pad_id={cfg.pad_id} is outside the tokenizer vocabulary [0, {tokenizer_vocab_size}); "
                f"set EngramConfig.pad_id to the tokenizer's padding id")
        self.cfg = cfg
        self.tokenizer_vocab_size = tokenizer_vocab_size
        self.lookup: Optional[np.ndarray] = None
        if cfg.use_compression and compression is not None:
            lookup = _validate_lookup(compression, tokenizer_vocab_size)
            if not np.array_equal(lookup, np.arange(tokenizer_vocab_size, dtype=np.int64)):
                self.lookup = lookup
        self.compressed_vocab_size: int = (int(self.lookup.max()) + 1 if self.lookup is not None
                                           else tokenizer_vocab_size)
        self.compressed_pad_id: int = (int(self.lookup[cfg.pad_id]) if self.lookup is not None
                                       else cfg.pad_id)
        self.layer_multipliers: dict[int, np.ndarray] = layer_multipliers(cfg, self.compressed_vocab_size)
        self.table_sizes: dict[int, list[list[int]]] = find_table_sizes(cfg)

        self.max_ngram_size = cfg.max_ngram_size
        self.num_heads = cfg.num_heads_total
        largest = max(p for sizes in self.table_sizes.values() for order in sizes for p in order)
        self.id_dtype: torch.dtype = torch.int32 if largest < _INT32_LIMIT else torch.int64
        """dtype of the hash ids ``hash`` and ``hash_step`` return: int32 when every table fits."""
        # Kernel operands, stacked over layers in cfg.layer_ids order.
        self._mult_np = np.stack([self.layer_multipliers[l] for l in cfg.layer_ids])  # [L,N]
        self._primes_np = np.array([self.table_sizes[l] for l in cfg.layer_ids], dtype=np.int64)  # [L,O,K]
        self._device_cache: dict[str, tuple[Optional[torch.Tensor], torch.Tensor]] = {}
        self._fingerprint: Optional[str] = None

    # ------------------------------------------------------------------ small helpers
    def head_sizes(self, layer_id: int) -> list[int]:
        """Table size of each of the layer's H heads, order-major."""
        if layer_id not in self.table_sizes:
            raise EngramError(f"layer_id={layer_id} has no Engram tables; Engram layers are "
                             f"{list(self.cfg.layer_ids)}")
        return [p for order in self.table_sizes[layer_id] for p in order]

    def head_offsets(self, layer_id: int) -> list[int]:
        """Start row of each of the layer's H heads in its concatenated table."""
        return head_offsets(self.head_sizes(layer_id))

    def _tensors(self, device: torch.device) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        """(lookup [V] or None, primes [L,O,K]) on ``device``, built once per device."""
        key = str(device)
        if key not in self._device_cache:
            lookup = torch.tensor(self.lookup, device=device) if self.lookup is not None else None
            self._device_cache[key] = (lookup, torch.tensor(self._primes_np, device=device))
        return self._device_cache[key]

    def _check_range(self, ids: ArrayLike, what: str = "input_ids") -> None:
        """ValueError naming the first id outside [0, V) and where it is."""
        V = self.tokenizer_vocab_size
        if isinstance(ids, torch.Tensor):
            if ids.numel() == 0:
                return
            lo, hi = torch.aminmax(ids)
            if int(lo) >= 0 and int(hi) < V:
                return
            bad = ((ids < 0) | (ids >= V)).nonzero()[0].tolist()
        else:
            if ids.size == 0 or (int(ids.min()) >= 0 and int(ids.max()) < V):
                return
            bad = [int(i) for i in np.argwhere((ids < 0) | (ids >= V))[0]]
        self._raise_bad_id(ids, tuple(bad), what)

    def _raise_bad_id(self, ids: ArrayLike, pos: tuple[int, ...], what: str) -> None:
        value = int(ids[pos])
        raise EngramError(
            f"{what}[{', '.join(map(str, pos))}] = {value} is outside the tokenizer vocabulary "
            f"[0, {self.tokenizer_vocab_size}); tokenize with the tokenizer this hasher was built "
            f"for (tokenizer_vocab_size={self.tokenizer_vocab_size})")

    def _check_state(self, state: torch.Tensor) -> None:
        want = self.max_ngram_size - 1
        if not isinstance(state, torch.Tensor) or state.dim() != 2 or state.shape[1] != want \
                or state.dtype != torch.int64:
            got = (f"{type(state).__name__} {tuple(state.shape)} {state.dtype}"
                   if isinstance(state, torch.Tensor) else type(state).__name__)
            raise EngramError(f"state must be an int64 tensor [B, {want}] from init_state or "
                             f"state_from_ids, got {got}")
        if state.numel():
            lo, hi = torch.aminmax(state)
            if int(lo) < 0 or int(hi) >= self.compressed_vocab_size:
                raise EngramError(f"state holds compressed ids outside [0, {self.compressed_vocab_size}) "
                                 f"(min {int(lo)}, max {int(hi)}); build it with init_state or "
                                 f"state_from_ids of this hasher")

    # ------------------------------------------------------------------ compression
    def compress(self, ids: ArrayLike) -> ArrayLike:
        """Original ids -> compressed ids, same type (and device) as the input, int64.

        Without compression the ids are returned as int64 (possibly the same object).
        """
        if isinstance(ids, torch.Tensor):
            ids = _as_int64_tensor(ids, "ids")
            self._check_range(ids, "ids")
            lookup, _ = self._tensors(ids.device)
            return lookup[ids] if lookup is not None else ids
        arr = _as_int64_array(ids, "ids")
        self._check_range(arr, "ids")
        return self.lookup[arr] if self.lookup is not None else arr

    # ------------------------------------------------------------------ padding
    def mask_ids(self, input_ids: torch.Tensor, attention_mask: Optional[ArrayLike]) -> torch.Tensor:
        """input_ids [B,T] int64 with the positions where ``attention_mask`` [B,T] is 0 replaced by
        ``cfg.pad_id`` (compressed: the pad id every position before 0 holds). The same tensor
        when the mask is None."""
        if attention_mask is None:
            return input_ids
        mask = padding_mask(attention_mask, input_ids.shape, input_ids.device)
        return input_ids.masked_fill(~mask, self.cfg.pad_id)

    # ------------------------------------------------------------------ batch hashing
    def hash(self, input_ids: ArrayLike, backend: str = "auto",
             check_range: bool = True, dtype: Optional[torch.dtype] = None,
             attention_mask: Optional[ArrayLike] = None,
             out: Optional[torch.Tensor] = None) -> dict[int, torch.Tensor]:
        """input_ids [B,T] (torch, any device, or numpy) -> {layer_id: [B,T,H]} of ``id_dtype``
        (or of ``dtype``: int32 or int64; int32 only when every table has fewer than 2^31 rows).

        ``out`` [L,B,T,H] (from ``empty_output``; contiguous, on the ids' device): the ids are
        written there and the returned tensors are its views ``out[i]``, one per layer in
        ``cfg.layer_ids`` order, so a caller that hashes batch after batch reuses one buffer
        instead of allocating (and page-faulting) a fresh one per call. The next call into the
        same buffer overwrites what an earlier one returned, and one refused for a bad id leaves it
        partly written. Its dtype is the ids' dtype.

        ``attention_mask`` [B,T] (1 real, 0 padding; None: all real): padded positions read as
        the pad id (module docstring), so a left-padded row hashes as its unpadded prompt.

        ``backend``: "auto" uses the native kernel for CPU input when it is available and the
        torch path otherwise; "torch" and "native" force a path. ``check_range=False`` skips
        the torch path's id range check, which costs a device sync on GPUs: only for ids already
        known valid (with compression a bad id would then fail inside the lookup gather). The
        native kernel always checks, at no cost.
        """
        if backend not in BACKENDS:
            raise EngramError(f"backend={backend!r}; choose one of {BACKENDS}")
        ids = _as_int64_tensor(input_ids, "input_ids")
        if ids.dim() != 2:
            raise EngramError(f"input_ids must be [batch, time], got shape {tuple(ids.shape)}; "
                             f"add a batch dimension with ids[None]")
        out_dtype = self._out_dtype(dtype) if out is None else self._check_out(out, ids, dtype)
        ids = self.mask_ids(ids, attention_mask)
        if self._use_native(ids, backend):
            return self._hash_native(ids, None, out_dtype=out_dtype, out=out)
        if check_range:
            self._check_range(ids)
        lookup, _ = self._tensors(ids.device)
        c = lookup[ids] if lookup is not None else ids
        prefix = torch.full((ids.shape[0], self.max_ngram_size - 1), self.compressed_pad_id,
                            dtype=torch.int64, device=ids.device)
        return self._hash_torch(c, prefix, out_dtype, out)

    def empty_output(self, batch_size: int, seq_len: int, dtype: Optional[torch.dtype] = None,
                     device: Union[str, torch.device] = "cpu") -> torch.Tensor:
        """An uninitialised [L,B,T,H] buffer of ``dtype`` (default ``id_dtype``) for ``hash(..., out=)``."""
        if batch_size < 0 or seq_len < 0:
            raise EngramError(f"batch_size={batch_size}, seq_len={seq_len}; both must be >= 0")
        return torch.empty(self._output_shape(batch_size, seq_len), dtype=self._out_dtype(dtype), device=device)

    def _output_shape(self, batch_size: int, seq_len: int) -> tuple[int, int, int, int]:
        """[L,B,T,H]: every layer's ids in one buffer, layer-major (``hash`` returns its views)."""
        return (len(self.cfg.layer_ids), batch_size, seq_len, self.num_heads)

    def _check_out(self, out: Any, ids: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.dtype:
        """The ids' dtype for a caller's ``out`` buffer, after checking it fits ``ids`` [B,T]."""
        want = self._output_shape(*ids.shape)
        fix = f"allocate it with hasher.empty_output({ids.shape[0]}, {ids.shape[1]})"
        if not isinstance(out, torch.Tensor):
            raise EngramError(f"out is a {type(out).__name__}, not a torch.Tensor; {fix}")
        if tuple(out.shape) != want:
            raise EngramError(f"out has shape {tuple(out.shape)} but these ids need {want} "
                              f"[layers, batch, time, heads]; {fix}")
        if out.dtype not in ID_DTYPES:
            raise EngramError(f"out has dtype {out.dtype}; hash ids are torch.int32 or torch.int64: {fix}")
        if dtype is not None and dtype != out.dtype:
            raise EngramError(f"out has dtype {out.dtype} but dtype={dtype} was asked for; "
                              f"pass one of them only, or make them agree")
        out_dtype = self._out_dtype(out.dtype)  # refuses int32 for tables of 2^31 rows or more
        if out.device != ids.device:
            raise EngramError(f"out is on {out.device} but input_ids on {ids.device}; put both on one device")
        if not out.is_contiguous():
            raise EngramError(f"out is not contiguous (strides {out.stride()}); {fix}")
        return out_dtype

    def _out_dtype(self, dtype: Optional[torch.dtype]) -> torch.dtype:
        if dtype is None:
            return self.id_dtype
        if dtype not in ID_DTYPES:
            raise EngramError(f"dtype={dtype}; hash ids are torch.int32 or torch.int64")
        if dtype == torch.int32 and self.id_dtype != torch.int32:
            raise EngramError("dtype=torch.int32 but a table has 2^31 rows or more; use torch.int64")
        return dtype

    def _use_native(self, ids: torch.Tensor, backend: str) -> bool:
        usable = (NATIVE_KERNEL_AVAILABLE and ids.device.type == "cpu"
                  and self.max_ngram_size <= _native.MAX_NGRAM)
        if backend == "native" and not usable:
            why = ("the native kernel was not built (install a C compiler and reinstall engram-lm)"
                   if not NATIVE_KERNEL_AVAILABLE else
                   f"input is on {ids.device}, the kernel is CPU-only"
                   if ids.device.type != "cpu" else
                   f"max_ngram_size={self.max_ngram_size} exceeds the kernel's {_native.MAX_NGRAM}")
            raise EngramError(f"backend='native' is unavailable: {why}; use backend='auto' or 'torch'")
        return backend != "torch" and usable

    def _hash_native(self, ids: torch.Tensor, prefix: Optional[torch.Tensor],
                     what: str = "input_ids", out_dtype: Optional[torch.dtype] = None,
                     out: Optional[torch.Tensor] = None) -> dict[int, torch.Tensor]:
        """ids [B,T] CPU int64, prefix [B,O] compressed history or None (pad) -> {layer: [B,T,H]},
        views of ``out`` [L,B,T,H] (checked by the caller) or of a fresh buffer."""
        ids = ids.contiguous()
        B, T = ids.shape
        if out is None:
            out = torch.empty(self._output_shape(B, T), dtype=out_dtype or self.id_dtype)
        bad = _native.hash_ids(ids.numpy(), self.lookup, self.tokenizer_vocab_size,
                               self.compressed_pad_id,
                               None if prefix is None else prefix.contiguous().numpy(),
                               self._mult_np, self._primes_np, out.numpy())
        if bad >= 0:
            pos = (bad // T, bad % T) if what == "input_ids" else (bad // T,)
            self._raise_bad_id(ids.reshape(B, T) if what == "input_ids" else ids.reshape(-1), pos, what)
        return {layer_id: out[i] for i, layer_id in enumerate(self.cfg.layer_ids)}

    def _hash_torch(self, c: torch.Tensor, prefix: torch.Tensor, out_dtype: Optional[torch.dtype] = None,
                    buf: Optional[torch.Tensor] = None) -> dict[int, torch.Tensor]:
        """Compressed ids c [B,T] after compressed history prefix [B,O] -> {layer: [B,T,H]}, written
        into ``buf`` [L,B,T,H] (checked by the caller) and returned as its views when given."""
        B, T = c.shape
        P = self.max_ngram_size - 1
        x = torch.cat([prefix, c], dim=1)  # [B, P+T]; x[:, P+t] is position t
        shifted = [x[:, P - k:P - k + T] for k in range(self.max_ngram_size)]  # c[t-k], [B,T]
        _, primes = self._tensors(c.device)
        out = {}
        for i, layer_id in enumerate(self.cfg.layer_ids):
            m = [int(v) for v in self.layer_multipliers[layer_id]]  # python ints: no device copy
            mix = shifted[0] * m[0]
            mixes = []
            for k in range(1, self.max_ngram_size):
                mix = mix ^ (shifted[k] * m[k])
                mixes.append(mix)
            # One broadcast remainder for all heads of all orders: [B,T,O,1] % [O,K] -> [B,T,O,K].
            ids = torch.remainder(torch.stack(mixes, dim=-1).unsqueeze(-1), primes[i])
            ids = ids.reshape(B, T, self.num_heads)
            out[layer_id] = ids.to(out_dtype or self.id_dtype) if buf is None else buf[i].copy_(ids)
        return out

    # ------------------------------------------------------------------ reference
    def hash_reference(self, input_ids: np.ndarray) -> dict[int, np.ndarray]:
        """Straightforward numpy version of the reference algorithm: {layer_id: int64 [B,T,H]}.

        Slow on purpose (one pass per head): it is the oracle for tests and the benchmark baseline.
        """
        x = _as_int64_array(input_ids, "input_ids")
        if x.ndim != 2:
            raise EngramError(f"input_ids must be [batch, time], got shape {x.shape}")
        self._check_range(x)
        c = self.lookup[x] if self.lookup is not None else x
        T = c.shape[1]

        def shift(k: int) -> np.ndarray:  # c[t-k], pad-filled before position 0
            if k == 0:
                return c
            return np.pad(c, ((0, 0), (k, 0)), constant_values=self.compressed_pad_id)[:, :T]

        tokens = [shift(k) for k in range(self.max_ngram_size)]
        out = {}
        for layer_id in self.cfg.layer_ids:
            m = self.layer_multipliers[layer_id]
            heads = []
            for n in range(2, self.max_ngram_size + 1):
                mix = tokens[0] * m[0]
                for k in range(1, n):
                    mix = np.bitwise_xor(mix, tokens[k] * m[k])
                for p in self.table_sizes[layer_id][n - 2]:
                    heads.append(mix % np.int64(p))
            out[layer_id] = np.stack(heads, axis=2)
        return out

    # ------------------------------------------------------------------ incremental
    def init_state(self, batch_size: int, device: Optional[Union[str, torch.device]] = None) -> torch.Tensor:
        """Empty history [B, N-1] of compressed pad ids, oldest first."""
        return torch.full((batch_size, self.max_ngram_size - 1), self.compressed_pad_id,
                          dtype=torch.int64, device=device)

    def state_from_ids(self, input_ids: ArrayLike, attention_mask: Optional[ArrayLike] = None) -> torch.Tensor:
        """History [B, N-1] after consuming input_ids [B,T] from an empty state (padded positions,
        where ``attention_mask`` is 0, as the pad id: see ``hash``)."""
        ids = _as_int64_tensor(input_ids, "input_ids")
        if ids.dim() != 2:
            raise EngramError(f"input_ids must be [batch, time], got shape {tuple(ids.shape)}")
        c = self.compress(self.mask_ids(ids, attention_mask))
        x = torch.cat([self.init_state(ids.shape[0], ids.device), c], dim=1)
        return x[:, x.shape[1] - (self.max_ngram_size - 1):].contiguous()

    def hash_step(self, state: torch.Tensor, new_ids: ArrayLike, backend: str = "auto",
                  attention_mask: Optional[ArrayLike] = None) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """Hash one new token per row: new_ids [B] -> ({layer_id: [B,H]} of ``id_dtype``, new
        state [B, N-1] int64). ``attention_mask`` [B]: 0 marks a row's token as padding.

        Equals ``hash`` of the whole sequence (with the same mask) at its last position.
        """
        if backend not in BACKENDS:
            raise EngramError(f"backend={backend!r}; choose one of {BACKENDS}")
        self._check_state(state)
        ids = _as_int64_tensor(new_ids, "new_ids").to(state.device)
        if ids.dim() != 1 or ids.shape[0] != state.shape[0]:
            raise EngramError(f"new_ids must be [B] with B={state.shape[0]} (one token per state row), "
                             f"got shape {tuple(ids.shape)}")
        if attention_mask is not None:
            ids = self.mask_ids(ids[:, None], _as_tensor(attention_mask).reshape(-1, 1))[:, 0]
        native = self._use_native(ids, backend)
        if not native:
            self._check_range(ids, "new_ids")  # the kernel checks by itself
        ids = ids[:, None]  # [B,1]
        lookup, _ = self._tensors(ids.device)
        out = self._hash_native(ids, state, what="new_ids") if native else None
        c = lookup[ids] if lookup is not None else ids  # ids are known valid from here
        if out is None:
            out = self._hash_torch(c, state)
        new_state = torch.cat([state[:, 1:], c], dim=1)
        return {layer_id: v[:, 0] for layer_id, v in out.items()}, new_state

    # ------------------------------------------------------------------ identity
    def _canonical(self) -> dict[str, Any]:
        c = self.cfg
        lookup_sha = (hashlib.sha256(self.lookup.astype("<i8").tobytes()).hexdigest()
                      if self.lookup is not None else None)
        return {
            "format": _FORMAT,
            "config": {
                "max_ngram_size": c.max_ngram_size,
                "n_head_per_ngram": c.n_head_per_ngram,
                # the key keeps its old spelling: it is part of every recorded fingerprint
                "engram_vocab_size": list(c.rows_per_head),
                "layer_ids": list(c.layer_ids),
                "pad_id": c.pad_id,
                "seed": c.seed,
                "use_compression": c.use_compression,
            },
            "tokenizer_vocab_size": self.tokenizer_vocab_size,
            "compressed_vocab_size": self.compressed_vocab_size,
            "compressed_pad_id": self.compressed_pad_id,
            "compression_sha256": lookup_sha,
            "layer_multipliers": {str(l): [int(v) for v in m] for l, m in self.layer_multipliers.items()},
            "table_sizes": {str(l): s for l, s in self.table_sizes.items()},
        }

    def fingerprint(self) -> str:
        """sha256 hex of everything that determines the hash ids (store it with the tables)."""
        if self._fingerprint is None:
            blob = json.dumps(self._canonical(), sort_keys=True, separators=(",", ":"))
            self._fingerprint = hashlib.sha256(blob.encode("utf-8")).hexdigest()
        return self._fingerprint

    def describe(self) -> dict[str, Any]:
        """JSON-able summary for checkpoint / table headers, with its fingerprint."""
        return {**self._canonical(), "fingerprint": self.fingerprint()}

    def __repr__(self) -> str:
        return (f"NgramHasher(layers={list(self.cfg.layer_ids)}, orders=2..{self.max_ngram_size}, "
                f"heads/order={self.cfg.n_head_per_ngram}, V={self.tokenizer_vocab_size}, "
                f"Vc={self.compressed_vocab_size}, native={NATIVE_KERNEL_AVAILABLE})")


# ----------------------------------------------------------------------------- input helpers
def _validate_lookup(compression: Any, vocab: int) -> np.ndarray:
    arr = compression.cpu().numpy() if isinstance(compression, torch.Tensor) else np.asarray(compression)
    if arr.ndim != 1 or arr.shape[0] != vocab:
        raise EngramError(f"compression lookup has shape {arr.shape}, expected ({vocab},) "
                         f"(one new id per tokenizer id); rebuild it for this tokenizer")
    if not np.issubdtype(arr.dtype, np.integer):
        raise EngramError(f"compression lookup has dtype {arr.dtype}, expected int64; "
                         f"pass lookup.astype(numpy.int64)")
    arr = np.ascontiguousarray(arr, dtype=np.int64)
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= vocab:
        bad = int(np.argmax((arr < 0) | (arr >= vocab)))
        raise EngramError(f"compression lookup[{bad}] = {int(arr[bad])} is outside [0, {vocab}) "
                         f"(min {lo}, max {hi}); compressed ids must be valid indices below the "
                         f"tokenizer vocab size")
    arr.setflags(write=False)  # shared with every call; guard against accidental edits
    return arr


def _as_int64_tensor(ids: Any, what: str) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor):
        arr = _as_int64_array(ids, what)
        # torch.from_numpy needs a writable, native-order, contiguous buffer.
        if not (arr.flags.writeable and arr.flags.c_contiguous and arr.dtype.isnative):
            arr = np.array(arr, dtype=np.int64, order="C")
        return torch.from_numpy(arr)
    if ids.dtype == torch.int64:
        return ids
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"{what} must hold integer token ids, got dtype {ids.dtype}; "
                        f"convert with .long()")
    return ids.to(torch.int64)


def _as_tensor(x: Any) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))


def padding_mask(attention_mask: Any, shape: torch.Size, device: torch.device) -> torch.Tensor:
    """attention_mask (1 real, 0 padding; bool or integer) of ``shape`` -> bool tensor on ``device``."""
    mask = _as_tensor(attention_mask)
    if tuple(mask.shape) != tuple(shape):
        raise EngramError(f"attention_mask has shape {tuple(mask.shape)} but input_ids {tuple(shape)}; "
                          f"give one 1 (real) or 0 (padding) per token")
    if mask.dtype != torch.bool:
        if mask.dtype.is_floating_point or mask.dtype.is_complex:
            raise EngramError(f"attention_mask has dtype {mask.dtype}; give 0/1 integers or booleans")
        if mask.numel() and not bool(((mask == 0) | (mask == 1)).all()):
            raise EngramError("attention_mask holds values other than 0 and 1; give 1 for real tokens "
                              "and 0 for padding")
        mask = mask != 0
    return mask.to(device)


def _as_int64_array(ids: Any, what: str) -> np.ndarray:
    arr = ids.cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
    if not np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_:
        raise TypeError(f"{what} must hold integer token ids, got dtype {arr.dtype}; "
                        f"convert with .astype(numpy.int64)")
    return arr.astype(np.int64, copy=False)
