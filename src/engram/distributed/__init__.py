"""Training across processes: row-sharded Engram tables, data-parallel backbone (torch.distributed).

- :mod:`engram.distributed.world`: process-group set-up from torchrun's environment, the
  collective timeout, and the start-up check that every rank has the same config and hash.
- :mod:`engram.distributed.sharding`: the row-sharding rule (rank r of W owns rows r::W) and
  the cut of a checkpoint's whole tables into one rank's rows.
- :mod:`engram.distributed.checkpoint`: the sharded save (every rank its rows, one commit).
- :mod:`engram.distributed.sharded_table`: :class:`ShardedEmbedding`, the table of one Engram
  layer split by rows over the ranks, looked up and trained with all-to-all exchanges.
- :mod:`engram.distributed.parallel`: the training loop's hooks for many processes (DDP for the
  backbone, the global batch split by rank, sharded checkpoints).
- :mod:`engram.distributed.launch`: ``engram train --nproc N`` runs torchrun.

``docs/distributed.md`` describes the design, the checkpoint layout and the measurements.
"""
