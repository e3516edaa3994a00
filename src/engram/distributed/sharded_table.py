"""An Engram table split by rows over the ranks of a process group, looked up with all-to-all.

Ownership: global row ``g`` lives on rank ``g % W`` at local index ``g // W``
(:func:`engram.distributed.sharding.shard_rows`). Hash ids are close to uniform, so modulo ownership
spreads every head's rows evenly over the ranks without a lookup table.

One lookup (forward), on every rank at once:
    1. the distinct global rows the rank needs, grouped by owner          [U]
    2. all_to_all_single: counts, then the row ids, to their owners       -> [S] requests
    3. each owner gathers its requested rows from its shard               [S, Dh]
    4. all_to_all_single: the rows back to the requesters                 -> [U, Dh]
    5. expanded to the positions that asked for them                      [B,T,H,Dh]
Backward sends the summed gradient of each distinct row back along the same route (step 4
reversed); the owner turns what it receives into a (sparse or dense) gradient of its shard,
so the row-sparse optimizer state of a row exists on its owner only.

The values returned are the owner's rows, copied and never combined, so a sharded lookup equals
the one-process ``nn.Embedding`` lookup bit for bit (``tests/distributed``).

Shape legend
    B batch    T positions    H hash heads    Dh row width    W ranks
    U distinct rows this rank needs    S rows other ranks (and this one) request from this shard
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from engram.config import TableLocation
from engram.distributed.sharding import shard_rows
from engram.model.table import EngramTable


@dataclass
class ExchangeStats:
    """Bytes this rank sent to other ranks (its own rows never leave the process)."""

    id_bytes: int = 0  # row ids sent to owners
    row_bytes: int = 0  # rows sent back to requesters
    grad_bytes: int = 0  # row gradients sent back to owners
    lookups: int = 0

    @property
    def total(self) -> int:
        return self.id_bytes + self.row_bytes + self.grad_bytes

    def reset(self) -> None:
        self.id_bytes = self.row_bytes = self.grad_bytes = self.lookups = 0


class _Route:
    """Who asks whom for which rows in one lookup; kept for the backward pass."""

    def __init__(self, rows: torch.Tensor, world: int, group: Optional[dist.ProcessGroup]):
        flat = rows.reshape(-1)
        uniq, self.inverse = torch.unique(flat, return_inverse=True)  # [U], [B*T*H]
        owner = uniq % world
        self.order = torch.argsort(owner, stable=True)  # requests grouped by owner
        want = uniq[self.order]
        self.send_counts = torch.bincount(owner, minlength=world)  # [W] rows asked of each owner
        self.recv_counts = torch.empty_like(self.send_counts)
        dist.all_to_all_single(self.recv_counts, self.send_counts, group=group)
        self.send_splits = self.send_counts.tolist()
        self.recv_splits = self.recv_counts.tolist()
        requested = want.new_empty(sum(self.recv_splits))  # [S] global rows others want from us
        dist.all_to_all_single(requested, want, self.recv_splits, self.send_splits, group=group)
        self.local = requested // world  # [S] indices into this rank's shard
        self.n_uniq = uniq.numel()

    def remote(self, splits: list[int], rank: int) -> int:
        return sum(splits) - splits[rank]


class _ShardedLookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, shard: torch.Tensor, rows: torch.Tensor, module: "ShardedEmbedding"):  # noqa: ANN001
        route = _Route(rows.cpu() if module.group_on_cpu else rows, module.world, module.group)
        local = route.local.to(shard.device)
        served = module.tier.read(local) if module.tier is not None else shard.index_select(0, local)  # [S, Dh]
        got = served.new_empty(route.n_uniq, shard.shape[1])  # [U, Dh] in owner order
        dist.all_to_all_single(got, served, route.send_splits, route.recv_splits, group=module.group)
        uniq_rows = torch.empty_like(got)
        uniq_rows[route.order.to(got.device)] = got
        st, dh, el = module.stats, shard.shape[1], shard.element_size()
        st.lookups += 1
        st.id_bytes += route.remote(route.send_splits, module.rank) * 8
        st.row_bytes += route.remote(route.recv_splits, module.rank) * dh * el
        ctx.route, ctx.module, ctx.shard_shape = route, module, shard.shape
        ctx.out_shape = (*rows.shape, dh)
        return uniq_rows[route.inverse.to(got.device)].reshape(ctx.out_shape)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # noqa: ANN001
        route, module = ctx.route, ctx.module
        dh = grad_out.shape[-1]
        g = grad_out.reshape(-1, dh)
        per_row = g.new_zeros(route.n_uniq, dh).index_add_(0, route.inverse.to(g.device), g)  # [U, Dh]
        send = per_row[route.order.to(g.device)]
        recv = send.new_empty(len(route.local), dh)  # [S, Dh] gradients of our rows
        dist.all_to_all_single(recv, send, route.recv_splits, route.send_splits, group=module.group)
        module.stats.grad_bytes += route.remote(route.send_splits, module.rank) * dh * g.element_size()
        if module.grad_scale != 1.0:  # the ranks' local-mean gradients, averaged
            recv = recv * module.grad_scale
        local = route.local.to(recv.device)
        if module.sparse:  # duplicates (a row asked by several ranks) are summed by coalesce()
            grad = torch.sparse_coo_tensor(local[None], recv, ctx.shard_shape)
        else:
            grad = recv.new_zeros(ctx.shard_shape).index_add_(0, local, recv)
        return grad, None, None


class ShardedEmbedding(EngramTable):
    """An Engram layer's table split over ranks: this rank holds rows ``rank::world`` of a
    ``num_embeddings x embedding_dim`` table in ``weight``; ``lookup`` takes global rows.

    Every rank must look up (and call ``full`` / ``load_full``) the same number of times in the
    same order: they are collectives. ``sparse`` selects sparse shard gradients (``SparseRowAdam``).
    An overlay applies after the exchange, so every rank may pass its own.
    """

    location = TableLocation.SHARDED

    def __init__(self, num_embeddings: int, embedding_dim: int, rank: int, world: int,
                 group: Optional[dist.ProcessGroup] = None, weight: Optional[torch.Tensor] = None):
        super().__init__(num_embeddings, embedding_dim)
        self.rank, self.world, self.group = rank, world, group
        n = shard_rows(num_embeddings, rank, world)
        data = weight if weight is not None else torch.empty(n, embedding_dim)
        if tuple(data.shape) != (n, embedding_dim):
            raise ValueError(f"shard of rank {rank}/{world} must be {n} x {embedding_dim}, got {tuple(data.shape)}")
        self.weight = nn.Parameter(data)
        self.tier = None  # a file-backed working tier (engram.tables.trainable.place_tables) or RAM
        self.grad_scale = 1.0  # applied by the owner to the row gradients it receives
        self.stats = ExchangeStats()
        # gloo exchanges CPU tensors; NCCL exchanges device tensors.
        self.group_on_cpu = dist.get_backend(group) == "gloo"

    @classmethod
    def from_table(cls, table: EngramTable, rank: int, world: int,
                   group: Optional[dist.ProcessGroup] = None) -> "ShardedEmbedding":
        """The rows ``rank::world`` of a full table (copied)."""
        shard = table.full()[rank::world].clone()
        out = cls(table.num_embeddings, table.embedding_dim, rank, world, group, shard)
        out.sparse = bool(table.sparse)
        return out

    def use_tier(self, tier) -> None:  # noqa: ANN001 - engram.tables.trainable.TrainableTier
        """Keep this shard's rows in a file-backed working tier (``place_tables``)."""
        self.weight = nn.Parameter(tier.table)
        self.tier = tier

    def lookup(self, rows: torch.Tensor) -> torch.Tensor:  # [B,T,H] global rows -> [B,T,H,Dh]
        return _ShardedLookup.apply(self.weight, rows, self)

    def _local(self) -> torch.Tensor:
        if self.tier is not None:
            self.tier.flush()
            return self.tier.table
        return self.weight.detach()

    def full(self) -> torch.Tensor:
        """Every row, gathered from all ranks (a collective)."""
        local = self._local()
        n = shard_rows(self.num_embeddings, 0, self.world)  # rank 0 holds the most rows
        padded = local.new_zeros(n, self.embedding_dim)
        padded[:local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded, group=self.group)
        out = local.new_empty(self.num_embeddings, self.embedding_dim)
        for r, part in enumerate(parts):
            out[r::self.world] = part[:shard_rows(self.num_embeddings, r, self.world)]
        return out

    @torch.no_grad()
    def load_full(self, table: torch.Tensor) -> None:
        self._check_full(table)
        mine = table[self.rank::self.world].to(self.weight.device, self.weight.dtype)
        if self.tier is not None:
            self.tier.write(torch.arange(mine.shape[0]), mine)
        else:
            self.weight.copy_(mine)

    def prefetch(self, rows: torch.Tensor) -> None:
        """Warm the working tier with the rows of ``rows`` this rank owns (no communication)."""
        if self.tier is None:
            return
        rows = torch.unique(rows.reshape(-1))
        self.tier.warm(rows[rows % self.world == self.rank] // self.world)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, rows {self.rank}::{self.world} "
                f"({self.weight.shape[0]} local), sparse={self.sparse}, tier={getattr(self.tier, 'kind', 'memory')}")
