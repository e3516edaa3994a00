"""The row-sharding rule: rank ``r`` of ``W`` owns rows ``r::W`` of every Engram table.

Hash ids are close to uniform, so modulo ownership spreads the rows, and their lookups, evenly.
:class:`engram.distributed.sharded_table.ShardedEmbedding` holds a rank's rows by this rule, the
sharded save (:mod:`engram.distributed.checkpoint`) writes them, and :func:`split_table_state`
cuts a checkpoint's whole tables (:func:`engram.model.checkpoint.read_table_state`, which also
gathers the shards of a checkpoint saved on another number of ranks) into a rank's part.

Shapes: a table and dense Adam's moments are [R, Dh] whole and [shard_rows(R, r, W), Dh] on rank
r; row-sparse Adam's state is [n] / [n, Dh] over the n rows with state, ``rows`` holding global
row ids in a checkpoint and local ids (``g // W``) on a rank.
"""

from __future__ import annotations

import torch

from engram.model.checkpoint import TABLE_OPTIMIZER, gather_table_shards


def shard_rows(num_rows: int, rank: int, world: int) -> int:
    """How many rows of a ``num_rows`` table rank ``rank`` of ``world`` owns (rows ``rank::world``)."""
    return (num_rows - rank + world - 1) // world


def split_table_state(whole: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    """The rows ``rank::world`` of whole tables and their optimizer state (``read_table_state``'s
    keys): row-sparse Adam's entries are kept for the owned rows, with ids made local."""
    sparse = {k[:-len("rows")] for k in whole if k.startswith(TABLE_OPTIMIZER + ".") and k.endswith(".rows")}
    out: dict[str, torch.Tensor] = {}
    for key, value in whole.items():
        prefix = key[:key.rfind(".") + 1]
        if prefix in sparse:
            if key.endswith(".rows"):
                keep = value % world == rank
                out[key] = value[keep] // world
                for name in ("exp_avg", "exp_avg_sq", "steps"):
                    out[prefix + name] = whole[prefix + name][keep]
        elif value.dim() == 0:
            out[key] = value  # a scalar shared by all rows (dense Adam's step)
        else:
            out[key] = value[rank::world].clone()
    return out


def reshard(sources: list[dict[str, torch.Tensor]], rank: int, world: int) -> dict[str, torch.Tensor]:
    """Rank ``rank`` of ``world``'s rows from the table files of ``len(sources)`` ranks."""
    return split_table_state(gather_table_shards(sources), rank, world)
