"""Context-parallel attention over ``torch.distributed`` (not imported by ``import sparseattn``).

* :mod:`~sparseattn.distributed.sharding` — zigzag / contiguous sequence sharding and the global
  positions each rank holds.
* :func:`context_parallel_attention` — exact attention of the local queries over the whole sharded
  sequence, by ``all_gather``, a P2P ring, or layout-aware P2P (:func:`plan_communication`).

See docs/DISTRIBUTED.md.
"""

from sparseattn.distributed.context_parallel import METHODS, CommPlan, context_parallel_attention, plan_communication
from sparseattn.distributed.sharding import (
    SHARDINGS,
    chunk_size,
    contiguous_shard,
    contiguous_unshard,
    num_chunks,
    rank_chunks,
    shard,
    shard_positions,
    unshard,
    zigzag_shard,
    zigzag_unshard,
)

__all__ = [
    "METHODS",
    "SHARDINGS",
    "CommPlan",
    "context_parallel_attention",
    "plan_communication",
    "chunk_size",
    "contiguous_shard",
    "contiguous_unshard",
    "num_chunks",
    "rank_chunks",
    "shard",
    "shard_positions",
    "unshard",
    "zigzag_shard",
    "zigzag_unshard",
]
