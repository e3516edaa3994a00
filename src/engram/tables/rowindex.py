"""A vectorised hash map from table row ids to slots, whose memory grows with its entries.

Both the row cache (``storage.CachedStorage``: row -> pool slot) and the sparse optimizer
(``sparse_adam.SparseRowAdam``: row -> state slot) need "where is row r?" for a few thousand
rows per step out of up to billions. A dense ``[rows]`` array would cost memory proportional to
the table; this map costs 24-48 bytes per entry instead (12 bytes per hash slot). It is open addressing with linear
probing over power-of-two arrays (load factor <= 1/2), and every operation works on a whole
batch of rows at once with torch ops, one probe round per loop iteration (a handful of rounds
at this load factor), so the Python overhead is per batch, not per row.

Deletion leaves tombstones, which keep later probe chains intact; the table is rebuilt in place
once live entries plus tombstones pass 3/4 of the slots.

Shape legend
    S slots in the hash arrays (a power of two)    U rows in one call
"""

from __future__ import annotations

from typing import Optional

import torch

from engram.errors import EngramError

_EMPTY = -1
_TOMB = -2
_MULT = -7046029254386353131  # 0x9E3779B97F4A7C15 as int64: Fibonacci hashing


class RowIndex:
    """Map int64 row ids (>= 0) to slots (values < 2^31). ``capacity``: live entries it must hold.

    ``grow=True`` lets :meth:`insert` go past ``capacity`` by doubling, up to ``limit`` entries
    if given (the sparse optimizer: at most the table's rows); a cache uses a fixed capacity.
    """

    def __init__(self, capacity: int, grow: bool = False, limit: Optional[int] = None) -> None:
        if capacity < 1:
            raise EngramError(f"capacity={capacity} must be >= 1")
        self.grow, self.limit = grow, limit
        self._alloc(capacity)

    def _alloc(self, capacity: int) -> None:
        self.capacity = int(capacity)
        bits = max(4, (2 * self.capacity - 1).bit_length())  # S >= 2 * capacity
        self.bits = bits
        self.mask = (1 << bits) - 1
        self.keys = torch.full((1 << bits,), _EMPTY, dtype=torch.int64)  # [S]
        self.vals = torch.zeros(1 << bits, dtype=torch.int32)  # [S] slots (< 2^31)
        self.count = 0
        self.tombs = 0

    def __len__(self) -> int:
        return self.count

    @property
    def nbytes(self) -> int:
        return self.keys.numel() * 12

    @staticmethod
    def nbytes_for(capacity: int) -> int:
        """Bytes of an index built for ``capacity`` entries."""
        return (1 << max(4, (2 * capacity - 1).bit_length())) * 12

    def _home(self, rows: torch.Tensor) -> torch.Tensor:
        # Multiply-shift: the top `bits` bits of rows * golden ratio, well spread even for
        # consecutive row ids. int64 multiplication wraps, which is what hashing wants.
        return ((rows * _MULT) >> (64 - self.bits)) & self.mask

    # ------------------------------------------------------------------ queries
    def find(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """rows [U] -> (values [U], positions [U]); both -1 where a row is absent."""
        rows = rows.reshape(-1)
        n = rows.numel()
        vals = torch.full((n,), -1, dtype=torch.int64)
        where = torch.full((n,), -1, dtype=torch.int64)
        if n == 0 or self.count == 0:
            return vals, where
        active = torch.arange(n)
        r = rows
        pos = self._home(rows)
        while active.numel():
            k = self.keys[pos]
            hit = k == r
            if bool(hit.any()):
                hp = pos[hit]
                vals[active[hit]] = self.vals[hp].long()
                where[active[hit]] = hp
            go = ~hit & (k != _EMPTY)  # a tombstone or another key: keep probing
            active, r, pos = active[go], r[go], (pos[go] + 1) & self.mask
        return vals, where

    # ------------------------------------------------------------------ updates
    def insert(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        """Add rows [U] (distinct, not present) with values [U]."""
        rows = rows.reshape(-1)
        values = values.reshape(-1).to(torch.int32)
        n = rows.numel()
        if n == 0:
            return
        if self.count + n > self.capacity:
            if not self.grow:
                raise EngramError(f"RowIndex is full: {self.count} + {n} rows exceed capacity "
                                 f"{self.capacity}; evict first or build it with grow=True")
            new = max(2 * self.capacity, self.count + n)
            self._rebuild(new if self.limit is None else max(min(new, self.limit), self.count + n))
        elif self.count + self.tombs + n > (3 << self.bits) // 4:
            self._rebuild(self.capacity)  # too many tombstones: probe chains get long
        self._place(rows, values)

    def _place(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        values = values.to(torch.int32)
        active = torch.arange(rows.numel())
        pos = self._home(rows)
        while active.numel():
            k = self.keys[pos]
            free = (k == _EMPTY) | (k == _TOMB)
            cand, cpos = active[free], pos[free]
            if cand.numel():
                # Several rows may race for one free slot: all write, one wins, the rest probe on.
                self.keys[cpos] = rows[cand]
                won = self.keys[cpos] == rows[cand]
                wpos = cpos[won]
                self.vals[wpos] = values[cand[won]]
                self.tombs -= int((k[free][won] == _TOMB).sum())
                self.count += int(won.sum())
                placed = torch.zeros(active.numel(), dtype=torch.bool)
                placed[torch.nonzero(free).reshape(-1)[won]] = True
            else:
                placed = torch.zeros(active.numel(), dtype=torch.bool)
            keep = ~placed
            active, pos = active[keep], (pos[keep] + 1) & self.mask

    def remove_at(self, positions: torch.Tensor) -> None:
        """Delete the entries at ``positions`` (from :meth:`find`; all must be live)."""
        positions = positions.reshape(-1)
        if positions.numel() == 0:
            return
        self.keys[positions] = _TOMB
        self.count -= positions.numel()
        self.tombs += positions.numel()

    def remove(self, rows: torch.Tensor) -> None:
        """Delete rows [U] that are present (absent ones are ignored)."""
        _, where = self.find(rows)
        self.remove_at(where[where >= 0])

    def set_values_at(self, positions: torch.Tensor, values: torch.Tensor) -> None:
        self.vals[positions] = values.to(torch.int32)

    def items(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, values) of every live entry, in slot order."""
        live = self.keys >= 0
        return self.keys[live].clone(), self.vals[live].to(torch.int64)

    def _rebuild(self, capacity: Optional[int] = None) -> None:
        rows, vals = self.items()
        self._alloc(capacity or self.capacity)
        if rows.numel():
            self._place(rows, vals)

    def clear(self) -> None:
        self.keys.fill_(_EMPTY)
        self.count = 0
        self.tombs = 0
