"""Exact context-parallel (sequence-parallel) attention over ``torch.distributed``.

Every rank of the group holds a shard of the sequence (see :mod:`sparseattn.distributed.sharding`):
its queries and the keys/values of the same positions. :func:`context_parallel_attention` returns the
attention of the local queries over the *whole* sequence, equal (up to float rounding of the merge)
to single-process attention restricted to this rank's query rows.

Algorithm. The shard of each rank is made of contiguous chunks of ``C`` tokens. For every pair
(local query chunk ``a``, key chunk ``b`` of some source rank) the causal relation is block-uniform:
``a > b`` fully visible, ``a == b`` the causal diagonal (a square causal call), ``a < b`` invisible.
Each visible pair whose sub-layout (the layout's blocks of that chunk pair, restricted to the
causal region) selects at least one block is one :func:`~sparseattn.ops.attention.attention` call;
the partial states are merged with :func:`~sparseattn.state.merge.merge_states` in a fixed order —
by source rank, then by the source's chunk — so the result does not depend on the communication
method or on arrival order: ``"allgather"``, ``"ring"`` and ``"p2p"`` give bitwise-identical results.

Communication (K and V travel with ``H_kv`` heads, stacked into one message per source):

* ``"allgather"`` — one ``all_gather``; every rank receives every shard, needed or not.
* ``"ring"`` — ``world - 1`` steps of ``batch_isend_irecv`` to the next / from the previous rank; the
  next transfer overlaps the current step's compute. Every shard visits every rank (a shard is
  forwarded even where its receiver does not need it), so nothing is skipped.
* ``"p2p"`` — layout-aware: :func:`plan_communication` says which (destination, source) pairs need K/V
  (causality and the layout); only those shards are sent, by ``isend``/``irecv`` posted in one batch
  while the local shard is computed. Every rank derives the same plan from the global layout, so
  senders and receivers agree without extra messages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from sparseattn._validation import FLOAT_DTYPES, check_qkv, check_scale, fail
from sparseattn.distributed.sharding import SHARDINGS, num_chunks, rank_chunks
from sparseattn.layout.block_layout import BlockLayout, causal_block_region
from sparseattn.state.types import AttentionState

__all__ = ["CommPlan", "METHODS", "plan_communication", "context_parallel_attention"]

METHODS = ("allgather", "ring", "p2p")


# ---------------------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class CommPlan:
    """Which K/V shards must travel, derived from causality and the global layout.

    Attributes:
        world, sharding, causal: the setting the plan was made for.
        chunk_visible: bool ``[num_chunks, num_chunks]``; ``[a, b]`` is True if query chunk ``a`` attends at
            least one key of chunk ``b`` (causal relation and layout, any batch/head).
        need: bool ``[world, world]``; ``need[dst, src]`` is True if rank ``dst`` needs rank ``src``'s
            K/V shard (``dst != src``; the diagonal, the local shard, is always False).
    """

    world: int
    sharding: str
    causal: bool
    chunk_visible: torch.Tensor
    need: torch.Tensor

    @property
    def pairs_needed(self) -> int:
        return int(self.need.sum())

    @property
    def pairs_dense(self) -> int:
        return self.world * (self.world - 1)

    @property
    def pairs_skipped(self) -> int:
        return self.pairs_dense - self.pairs_needed

    def sources(self, rank: int) -> list[int]:
        """Ranks whose shard ``rank`` receives (ascending)."""
        return [s for s in range(self.world) if bool(self.need[rank, s])]

    def destinations(self, rank: int) -> list[int]:
        """Ranks ``rank`` sends its shard to (ascending)."""
        return [d for d in range(self.world) if bool(self.need[d, rank])]

    def bytes(self, shard_bytes: int) -> dict[str, int]:
        """Bytes sent in the whole group: ``bytes_needed`` (p2p), ``bytes_dense`` (every shard to every rank)."""
        return {"bytes_needed": self.pairs_needed * shard_bytes, "bytes_dense": self.pairs_dense * shard_bytes,
                "pairs_needed": self.pairs_needed, "pairs_skipped": self.pairs_skipped}


def _check_layout_geometry(fn: str, layout: BlockLayout, world: int, sharding: str) -> int:
    """Global layout agrees with the sharding; returns the chunk size in tokens."""
    if not isinstance(layout, BlockLayout):
        raise fail(fn, "layout", "must be a BlockLayout or None", "BlockLayout", type(layout).__name__)
    if layout.seqlen_q != layout.seqlen_kv:
        raise fail(fn, "layout", "must be a self-attention layout over the global sequence", "seqlen_q == seqlen_kv",
                   f"seqlen_q={layout.seqlen_q}, seqlen_kv={layout.seqlen_kv}")
    nc = num_chunks(world, sharding)
    n = layout.seqlen_q
    if n % nc or (n // nc) % layout.block_m or (n // nc) % layout.block_n:
        raise fail(fn, "layout", f"block boundaries do not align with the {nc} {sharding} chunks (world={world})",
                   f"seqlen divisible by {nc} * block (block_m={layout.block_m}, block_n={layout.block_n})",
                   f"seqlen={n} (chunk {n / nc:g} tokens)")
    return n // nc


def _block_mask(layout: BlockLayout, causal: bool) -> torch.Tensor:
    """Selected blocks ``[B, H, Mb, Nb]``, restricted to the causal region when ``causal``."""
    mask = layout.to_dense_mask()
    if causal:
        region, _ = causal_block_region(layout.seqlen_q, layout.seqlen_kv, layout.block_m, layout.block_n, mask.device)
        mask = mask & region
    return mask


def _chunk_visible(mask: torch.Tensor | None, layout: BlockLayout | None, nc: int, causal: bool) -> torch.Tensor:
    if mask is None:
        vis = torch.ones(nc, nc, dtype=torch.bool)
        return torch.tril(vis) if causal else vis
    assert layout is not None
    any_bh = mask.any(dim=1).any(dim=0)  # [Mb, Nb]
    mb, nb = any_bh.shape
    return any_bh.reshape(nc, mb // nc, nc, nb // nc).any(dim=3).any(dim=1).cpu()


def _plan(world: int, sharding: str, causal: bool, chunk_visible: torch.Tensor) -> CommPlan:
    need = torch.zeros(world, world, dtype=torch.bool)
    for dst in range(world):
        for src in range(world):
            if dst != src:
                need[dst, src] = any(bool(chunk_visible[a, b]) for a in rank_chunks(dst, world, sharding)
                                     for b in rank_chunks(src, world, sharding))
    return CommPlan(world, sharding, causal, chunk_visible, need)


def plan_communication(layout: BlockLayout | None, world: int, sharding: str = "zigzag", *,
                       causal: bool = True) -> CommPlan:
    """Which ranks need which K/V shards, from causality and the global ``layout`` (``None`` = dense).

    A rank needs a source's shard iff one of its query chunks attends (causal relation and layout,
    any batch or head) at least one key block of one of the source's chunks.

    Example: ``plan_communication(layout, 4, "contiguous").bytes(shard_bytes)`` gives
    ``bytes_needed`` / ``bytes_dense`` / ``pairs_skipped``.
    """
    fn = "plan_communication"
    if isinstance(world, bool) or not isinstance(world, int) or world <= 0:
        raise fail(fn, "world", "must be a positive integer", "an int > 0", repr(world))
    if sharding not in SHARDINGS:
        raise fail(fn, "sharding", "is unknown", f"one of {list(SHARDINGS)}", repr(sharding))
    if not isinstance(causal, bool):
        raise fail(fn, "causal", "must be a bool", "True or False", repr(causal))
    nc = num_chunks(world, sharding)
    mask = None
    if layout is not None:
        _check_layout_geometry(fn, layout, world, sharding)
        mask = _block_mask(layout, causal)
    return _plan(world, sharding, causal, _chunk_visible(mask, layout, nc, causal))


# ------------------------------------------------------------------------------------- validation
def _dist() -> Any:
    import torch.distributed as dist

    return dist


def _signature(q: Any, k: Any, v: Any, causal: Any, layout: Any, scale: Any, method: Any, sharding: Any,
               device: torch.device) -> torch.Tensor:
    """What every rank must agree on, as float64 numbers (-1 where an argument is not even well-typed)."""
    vals: list[float] = []
    for t in (q, k, v):
        if isinstance(t, torch.Tensor) and t.dim() == 4:
            vals += [float(s) for s in t.shape]
            vals.append(float(FLOAT_DTYPES.index(t.dtype)) if t.dtype in FLOAT_DTYPES else -2.0)
        else:
            vals += [-1.0] * 5
    vals.append(float(causal) if isinstance(causal, bool) else -1.0)
    vals.append(float(scale) if isinstance(scale, (int, float)) and not isinstance(scale, bool) else -1.0)
    vals.append(float(METHODS.index(method)) if method in METHODS else -1.0)
    vals.append(float(SHARDINGS.index(sharding)) if sharding in SHARDINGS else -1.0)
    if isinstance(layout, BlockLayout):
        vals += [float(layout.block_m), float(layout.block_n), float(layout.seqlen_q), float(layout.seqlen_kv),
                 float(layout.batch), float(layout.heads), float(layout.kv_num_blocks.sum())]
    else:
        vals += [-1.0] * 7
    return torch.tensor(vals, dtype=torch.float64, device=device)


def _describe_signature(sig: list[float]) -> str:
    return (f"q={tuple(int(x) for x in sig[0:4])}, k={tuple(int(x) for x in sig[5:9])}, "
            f"v={tuple(int(x) for x in sig[10:14])}, causal={sig[15]:g}, scale={sig[16]:g}, method#{sig[17]:g}, "
            f"sharding#{sig[18]:g}, layout={tuple(int(x) for x in sig[19:26])}")


def _check_ranks_agree(fn: str, sig: torch.Tensor, world: int, group: Any) -> None:
    dist = _dist()
    got = [torch.empty_like(sig) for _ in range(world)]
    dist.all_gather(got, sig, group=group)
    rows = [g.cpu().tolist() for g in got]
    for r, row in enumerate(rows):
        if row != rows[0]:
            raise fail(fn, "q/k/v/causal/scale/method/sharding/layout",
                       f"differ across ranks (rank 0 and rank {r}); every rank must pass the same global settings "
                       "and equal-size shards", _describe_signature(rows[0]), _describe_signature(row))


def _empty_state(q: torch.Tensor) -> AttentionState:
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return AttentionState(torch.zeros_like(q), torch.full(q.shape[:3], -math.inf, dtype=lse_dtype, device=q.device))


# ------------------------------------------------------------------------------------- main entry
def context_parallel_attention(
    q_local: torch.Tensor,
    k_local: torch.Tensor,
    v_local: torch.Tensor,
    *,
    causal: bool = True,
    layout: BlockLayout | None = None,
    scale: float | None = None,
    group: Any = None,
    method: str = "allgather",
    sharding: str = "zigzag",
    backend: str = "auto",
    stats: dict[str, Any] | None = None,
) -> AttentionState:
    """Attention of this rank's queries over the whole (sharded) sequence; exact.

    Args:
        q_local: ``(B, H, n, D)`` this rank's queries, in the local order of ``sharding``
            (see :func:`~sparseattn.distributed.sharding.shard`); ``n * world`` is the global length ``N``.
        k_local, v_local: ``(B, H_kv, n, D)``: keys/values of the same positions (GQA: ``H % H_kv == 0``).
        causal: causal attention over global positions.
        layout: the *global* ``BlockLayout`` over ``N`` x ``N`` (the same on every rank), or ``None`` (dense).
            Each shard chunk must be a whole number of ``block_m`` and ``block_n`` blocks.
        scale: softmax scale (default ``D ** -0.5``).
        group: the process group (default: the world group); must be initialised.
        method: ``"allgather"``, ``"ring"`` or ``"p2p"`` (module docstring); results are bitwise equal.
        sharding: ``"zigzag"`` or ``"contiguous"`` — how the sequence was split.
        backend: passed to :func:`~sparseattn.ops.attention.attention` for every chunk pair.
        stats: optional dict filled with ``method``, ``world``, ``rank``, ``pairs_computed`` (attention calls),
            ``pairs_skipped_compute`` (chunk pairs invisible or with no selected block), ``bytes_needed`` /
            ``bytes_dense`` / ``pairs_skipped`` (whole group, from :func:`plan_communication`),
            ``bytes_sent_total`` (what this method sends in the whole group), ``bytes_sent`` /
            ``bytes_received`` (this rank).

    Returns:
        ``AttentionState(out, lse)`` for the local queries: out ``(B, H, n, D)`` in q's dtype, lse
        ``(B, H, n)`` natural-log (float32, float64 for float64 inputs); rows attending nothing: out 0,
        lse -inf.

    Raises:
        ValueError: group not initialised, unknown method/sharding, bad q/k/v, lengths not divisible
            into the chunks, a layout not over the global sequence or not aligned with the chunks, or
            settings/shapes that differ across ranks (every rank raises the same error).

    Shapes:
        q_local ``(B, H, n, D)``, k_local/v_local ``(B, H_kv, n, D)`` → out ``(B, H, n, D)``, lse ``(B, H, n)``.
    """
    fn = "context_parallel_attention"
    dist = _dist()
    if not (dist.is_available() and dist.is_initialized()):
        raise fail(fn, "group", "is not initialised", "torch.distributed.init_process_group(...) called first",
                   "no default process group")
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    if rank < 0:
        raise fail(fn, "group", "does not contain this process", "a group this rank belongs to", f"rank {rank}")
    sig_device = q_local.device if isinstance(q_local, torch.Tensor) and q_local.is_cuda else torch.device("cpu")
    # collective first, so that an error seen by one rank only is raised by every rank (no hang)
    _check_ranks_agree(fn, _signature(q_local, k_local, v_local, causal, layout, scale, method, sharding, sig_device),
                       world, group)
    if method not in METHODS:
        raise fail(fn, "method", "is unknown", f"one of {list(METHODS)}", repr(method))
    if sharding not in SHARDINGS:
        raise fail(fn, "sharding", "is unknown", f"one of {list(SHARDINGS)}", repr(sharding))
    if not isinstance(causal, bool):
        raise fail(fn, "causal", "must be a bool", "True or False", repr(causal))
    check_scale(fn, scale)
    B, H, Hkv, n, nkv, D = check_qkv(fn, q_local, k_local, v_local)
    if nkv != n:
        raise fail(fn, "k_local", "must cover the same positions as q_local", f"k_local.shape[2]={n}",
                   f"k_local.shape[2]={nkv}")
    per_rank = len(rank_chunks(0, world, sharding))
    if n % per_rank:
        raise fail(fn, "q_local", f"length is not divisible by the {per_rank} {sharding} chunks per rank",
                   f"a multiple of {per_rank}", f"q_local.shape[2]={n}")
    C = n // per_rank
    N = n * world
    nc = num_chunks(world, sharding)
    mask = None
    if layout is not None:
        if not isinstance(layout, BlockLayout):
            raise fail(fn, "layout", "must be a BlockLayout or None", "BlockLayout", type(layout).__name__)
        if (layout.seqlen_q, layout.seqlen_kv) != (N, N):
            raise fail(fn, "layout", f"does not cover the global sequence (local length {n} x world {world})",
                       f"seqlen_q=seqlen_kv={N}", f"seqlen_q={layout.seqlen_q}, seqlen_kv={layout.seqlen_kv}")
        if (layout.batch, layout.heads) != (B, H):
            raise fail(fn, "layout", "was built for another batch/head count", f"(B, H)=({B}, {H})",
                       f"({layout.batch}, {layout.heads})")
        if layout.device != q_local.device:
            raise fail(fn, "layout", "is on another device than q_local", str(q_local.device), str(layout.device))
        _check_layout_geometry(fn, layout, world, sharding)
        mask = _block_mask(layout, causal)
    plan = _plan(world, sharding, causal, _chunk_visible(mask, layout, nc, causal))

    from sparseattn.ops.attention import attention
    from sparseattn.state.merge import merge_states

    my_chunks = rank_chunks(rank, world, sharding)
    q_chunks = [q_local.narrow(2, i * C, C) for i in range(per_rank)]
    states: list[dict[tuple[int, int], AttentionState]] = [{} for _ in range(per_rank)]
    counters = {"pairs_computed": 0, "pairs_skipped_compute": 0}
    if mask is not None:
        bm, bn = C // layout.block_m, C // layout.block_n  # type: ignore[union-attr]

    def compute(src: int, k_src: torch.Tensor, v_src: torch.Tensor) -> None:
        for j, b in enumerate(rank_chunks(src, world, sharding)):
            kb, vb = k_src.narrow(2, j * C, C), v_src.narrow(2, j * C, C)
            for i, a in enumerate(my_chunks):
                if not bool(plan.chunk_visible[a, b]):
                    counters["pairs_skipped_compute"] += 1
                    continue
                diag = causal and a == b
                sub_layout = None
                if mask is not None:
                    sub = mask[:, :, a * bm:(a + 1) * bm, b * bn:(b + 1) * bn]
                    if not bool(sub.any()):  # this batch/head set selects nothing here
                        counters["pairs_skipped_compute"] += 1
                        continue
                    full = (causal_block_region(C, C, layout.block_m, layout.block_n, sub.device)[0]  # type: ignore[union-attr]
                            if diag else torch.ones_like(sub[0, 0]))
                    if not bool(torch.equal(sub, full.expand_as(sub))):
                        sub_layout = BlockLayout.from_dense_mask(sub.contiguous(), block_m=layout.block_m,  # type: ignore[union-attr]
                                                                 block_n=layout.block_n, seqlen_q=C, seqlen_kv=C)
                states[i][(src, j)] = attention(q_chunks[i], kb, vb, causal=diag, layout=sub_layout, scale=scale,
                                                backend=backend)
                counters["pairs_computed"] += 1

    shard_bytes = 2 * k_local.numel() * k_local.element_size()
    sent = received = 0
    if world == 1:
        compute(rank, k_local, v_local)
        sent_total = 0
    elif method == "allgather":
        kv = torch.stack([k_local, v_local])
        gathered = [torch.empty_like(kv) for _ in range(world)]
        dist.all_gather(gathered, kv, group=group)
        for src in range(world):
            if src == rank:
                compute(src, k_local, v_local)
            else:
                compute(src, gathered[src][0], gathered[src][1])
        sent, received = (world - 1) * shard_bytes, (world - 1) * shard_bytes
        sent_total = plan.pairs_dense * shard_bytes
    elif method == "ring":
        nxt_rank, prv_rank = _global_rank(group, (rank + 1) % world), _global_rank(group, (rank - 1) % world)
        cur = torch.stack([k_local, v_local])
        src = rank
        for step in range(world):
            reqs = []
            if step < world - 1:
                nxt = torch.empty_like(cur)
                reqs = dist.batch_isend_irecv([dist.P2POp(dist.isend, cur, nxt_rank, group),
                                               dist.P2POp(dist.irecv, nxt, prv_rank, group)])
            compute(src, cur[0], cur[1])
            if reqs:
                for r in reqs:
                    r.wait()
                cur, src = nxt, (src - 1) % world
        sent, received = (world - 1) * shard_bytes, (world - 1) * shard_bytes
        sent_total = plan.pairs_dense * shard_bytes
    else:  # p2p
        kv = torch.stack([k_local, v_local])
        bufs: dict[int, torch.Tensor] = {}
        ops = []
        for src in plan.sources(rank):
            bufs[src] = torch.empty_like(kv)
            ops.append(dist.P2POp(dist.irecv, bufs[src], _global_rank(group, src), group))
        for dst in plan.destinations(rank):
            ops.append(dist.P2POp(dist.isend, kv, _global_rank(group, dst), group))
        reqs = dist.batch_isend_irecv(ops) if ops else []
        compute(rank, k_local, v_local)
        for r in reqs:
            r.wait()
        for src in sorted(bufs):
            compute(src, bufs[src][0], bufs[src][1])
        sent, received = len(plan.destinations(rank)) * shard_bytes, len(bufs) * shard_bytes
        sent_total = plan.pairs_needed * shard_bytes

    outs, lses = [], []
    for i in range(per_rank):
        ordered = [states[i][key] for key in sorted(states[i])]  # fixed order: source rank, then its chunk
        st = merge_states(ordered) if ordered else _empty_state(q_chunks[i])
        outs.append(st.out)
        lses.append(st.lse)
    result = AttentionState(torch.cat(outs, dim=2), torch.cat(lses, dim=2))
    if stats is not None:
        stats.update({"method": method, "sharding": sharding, "world": world, "rank": rank, **counters,
                      **plan.bytes(shard_bytes), "bytes_sent_total": sent_total, "bytes_sent": sent,
                      "bytes_received": received, "shard_bytes": shard_bytes})
    return result


def _global_rank(group: Any, r: int) -> int:
    dist = _dist()
    if group is None or group is dist.GroupMember.WORLD:
        return r
    return dist.get_global_rank(group, r)
