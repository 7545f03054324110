"""How a sequence is split across the ranks of a context-parallel group.

The sequence of ``N`` tokens is cut into equal *chunks*:

* ``"zigzag"`` (load-balanced causal split, as in Megatron-LM / ring-flash-attention): ``2 * world``
  chunks; rank ``r`` holds chunks ``r`` and ``2 * world - 1 - r``, in that order. Under causal
  attention every rank then holds one early and one late chunk, so the work is balanced.
* ``"contiguous"``: ``world`` chunks; rank ``r`` holds chunk ``r``.

Remainders are not handled: ``N`` must be divisible by the number of chunks (pad the sequence
otherwise). :func:`~sparseattn.distributed.context_parallel_attention` additionally needs every chunk
to be a whole number of layout blocks, i.e. ``N % (num_chunks * block) == 0`` for ``block_m`` and
``block_n`` (with ``layout=None`` only the chunk divisibility applies).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sparseattn._validation import check_nonneg_int, check_positive_int, check_tensor, fail

__all__ = [
    "SHARDINGS",
    "num_chunks",
    "rank_chunks",
    "chunk_size",
    "shard_positions",
    "shard",
    "unshard",
    "zigzag_shard",
    "zigzag_unshard",
    "contiguous_shard",
    "contiguous_unshard",
]

SHARDINGS = ("zigzag", "contiguous")


def _check_sharding(fn: str, sharding: object) -> str:
    if sharding not in SHARDINGS:
        raise fail(fn, "sharding", "is unknown", f"one of {list(SHARDINGS)}", repr(sharding))
    return sharding  # type: ignore[return-value]


def _check_rank(fn: str, rank: object, world: object) -> None:
    check_positive_int(fn, "world", world)
    check_nonneg_int(fn, "rank", rank)
    if rank >= world:  # type: ignore[operator]
        raise fail(fn, "rank", "is out of range", f"0 <= rank < world={world}", repr(rank))


def num_chunks(world: int, sharding: str = "zigzag") -> int:
    """Chunks the sequence is cut into: ``2 * world`` (zigzag) or ``world`` (contiguous)."""
    fn = "num_chunks"
    check_positive_int(fn, "world", world)
    return 2 * world if _check_sharding(fn, sharding) == "zigzag" else world


def rank_chunks(rank: int, world: int, sharding: str = "zigzag") -> tuple[int, ...]:
    """Global chunk ids rank ``rank`` holds, in the order they are stored locally."""
    fn = "rank_chunks"
    _check_rank(fn, rank, world)
    if _check_sharding(fn, sharding) == "zigzag":
        return (rank, 2 * world - 1 - rank)
    return (rank,)


def chunk_size(seqlen: int, world: int, sharding: str = "zigzag", *, func: str = "chunk_size") -> int:
    """Tokens per chunk; raises if ``seqlen`` is not divisible by the number of chunks."""
    check_positive_int(func, "seqlen", seqlen)
    nc = num_chunks(world, sharding)
    if seqlen % nc:
        raise fail(func, "seqlen", f"is not divisible by the {nc} chunks of {sharding} sharding over world={world} "
                   "(remainders are not handled: pad the sequence)", f"a multiple of {nc}", seqlen)
    return seqlen // nc


def shard_positions(seqlen: int, rank: int, world: int, sharding: str = "zigzag") -> torch.Tensor:
    """Global token positions (int64, ascending within each chunk) held by ``rank``, in local order."""
    fn = "shard_positions"
    _check_rank(fn, rank, world)
    c = chunk_size(seqlen, world, sharding, func=fn)
    return torch.cat([torch.arange(i * c, (i + 1) * c) for i in rank_chunks(rank, world, sharding)])


def shard(x: torch.Tensor, rank: int, world: int, sharding: str = "zigzag", dim: int = 2) -> torch.Tensor:
    """This rank's part of ``x`` along ``dim`` (a new contiguous tensor)."""
    fn = f"{sharding}_shard" if sharding in SHARDINGS else "shard"
    check_tensor(fn, "x", x)
    _check_rank(fn, rank, world)
    _check_sharding(fn, sharding)
    if not -x.dim() <= dim < x.dim():
        raise fail(fn, "dim", "is out of range", f"-{x.dim()} <= dim < {x.dim()}", dim)
    c = chunk_size(x.shape[dim], world, sharding, func=fn)
    parts = [x.narrow(dim, i * c, c) for i in rank_chunks(rank, world, sharding)]
    return torch.cat(parts, dim=dim).contiguous()


def unshard(parts: Sequence[torch.Tensor], world: int, sharding: str = "zigzag", dim: int = 2) -> torch.Tensor:
    """Inverse of :func:`shard`: ``parts[r]`` is rank ``r``'s part; returns the whole sequence."""
    fn = f"{sharding}_unshard" if sharding in SHARDINGS else "unshard"
    check_positive_int(fn, "world", world)
    _check_sharding(fn, sharding)
    if not isinstance(parts, (list, tuple)) or len(parts) != world:
        raise fail(fn, "parts", "must hold one tensor per rank", f"a list of {world} tensors",
                   f"{type(parts).__name__} of length {len(parts) if hasattr(parts, '__len__') else '?'}")
    for r, p in enumerate(parts):
        check_tensor(fn, f"parts[{r}]", p)
        if p.shape != parts[0].shape:
            raise fail(fn, f"parts[{r}]", "has a different shape from parts[0]", tuple(parts[0].shape), tuple(p.shape))
    per_rank = 2 if sharding == "zigzag" else 1
    local = parts[0].shape[dim]
    if local % per_rank:
        raise fail(fn, "parts[0]", f"length along dim {dim} is not divisible by the {per_rank} chunks per rank",
                   f"a multiple of {per_rank}", local)
    c = local // per_rank
    chunks: dict[int, torch.Tensor] = {}
    for r, p in enumerate(parts):
        for j, cid in enumerate(rank_chunks(r, world, sharding)):
            chunks[cid] = p.narrow(dim, j * c, c)
    return torch.cat([chunks[i] for i in range(len(chunks))], dim=dim)


def zigzag_shard(x: torch.Tensor, rank: int, world: int, dim: int = 2) -> torch.Tensor:
    """Chunks ``rank`` and ``2 * world - 1 - rank`` of ``2 * world`` along ``dim`` (N divisible by ``2 * world``)."""
    return shard(x, rank, world, "zigzag", dim)


def zigzag_unshard(parts: Sequence[torch.Tensor], world: int, dim: int = 2) -> torch.Tensor:
    """Inverse of :func:`zigzag_shard` (``parts`` indexed by rank)."""
    return unshard(parts, world, "zigzag", dim)


def contiguous_shard(x: torch.Tensor, rank: int, world: int, dim: int = 2) -> torch.Tensor:
    """Chunk ``rank`` of ``world`` equal chunks along ``dim`` (N divisible by ``world``)."""
    return shard(x, rank, world, "contiguous", dim)


def contiguous_unshard(parts: Sequence[torch.Tensor], world: int, dim: int = 2) -> torch.Tensor:
    """Inverse of :func:`contiguous_shard` (``parts`` indexed by rank)."""
    return unshard(parts, world, "contiguous", dim)
