"""Conversions: dense bool block mask ⇄ BlockLayout ⇄ top-k index lists ⇄ FlexAttention ``BlockMask``."""

from __future__ import annotations

from typing import Any

import torch

from sparseattn._validation import check_positive_int, check_tensor, fail
from sparseattn.layout.block_layout import BlockLayout, causal_block_region, cdiv

__all__ = [
    "layout_from_mask",
    "layout_to_mask",
    "layout_from_topk",
    "layout_to_topk",
    "layout_to_flex_block_mask",
    "layout_from_flex_block_mask",
    "flex_attention_available",
]


def layout_from_mask(mask: torch.Tensor, *, block_m: int, block_n: int, seqlen_q: int, seqlen_kv: int) -> BlockLayout:
    """Bool block mask ``[B, H, Mb, Nb]`` → layout (see :meth:`BlockLayout.from_dense_mask`)."""
    return BlockLayout.from_dense_mask(mask, block_m=block_m, block_n=block_n, seqlen_q=seqlen_q, seqlen_kv=seqlen_kv)


def layout_to_mask(layout: BlockLayout) -> torch.Tensor:
    """Layout → bool block mask ``[B, H, Mb, Nb]``."""
    return layout.to_dense_mask()


def layout_from_topk(indices: torch.Tensor, *, block_m: int, block_n: int, seqlen_q: int, seqlen_kv: int) -> BlockLayout:
    """Top-k key-block lists → layout.

    Args:
        indices: integer ``[B, H, Mb, k]``; entries may come in any order; ``-1`` marks "no block"
            (rows may select fewer than ``k``). Duplicates within a row are an error.

    Shapes:
        indices ``[B, H, Mb, k]`` with ``Mb = ceil(seqlen_q / block_m)``.
    """
    fn = "layout_from_topk"
    check_tensor(fn, "indices", indices, ndim=4, shape_desc="[B, H, q_blocks, k]")
    if indices.dtype.is_floating_point or indices.dtype == torch.bool or indices.dtype.is_complex:
        raise fail(fn, "indices.dtype", "must be an integer type", "int32 or int64", str(indices.dtype))
    for name, val in (("block_m", block_m), ("block_n", block_n), ("seqlen_q", seqlen_q), ("seqlen_kv", seqlen_kv)):
        check_positive_int(fn, name, val)
    Mb, Nb = cdiv(seqlen_q, block_m), cdiv(seqlen_kv, block_n)
    if indices.shape[2] != Mb:
        raise fail(fn, "indices", "has the wrong number of query blocks", f"shape[2] == {Mb}", f"indices.shape={tuple(indices.shape)}")
    idx = indices.long()
    if idx.numel() and (int(idx.min()) < -1 or int(idx.max()) >= Nb):
        raise fail(fn, "indices", "has a block index out of range", f"values in [0, {Nb}) or -1 for padding",
                   f"min={int(idx.min())}, max={int(idx.max())}")
    srt = torch.sort(idx, dim=-1).values
    dup = (srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)
    if bool(dup.any()):
        where = [int(x) for x in dup.nonzero()[0].tolist()[:3]]
        raise fail(fn, "indices", "has duplicate block indices in a row", "distinct indices per row", f"row {where}")
    B, H = idx.shape[:2]
    mask = torch.zeros(B, H, Mb, Nb + 1, dtype=torch.bool, device=idx.device)
    mask.scatter_(-1, torch.where(idx < 0, Nb, idx), True)
    return BlockLayout.from_dense_mask(mask[..., :Nb].contiguous(), block_m=block_m, block_n=block_n, seqlen_q=seqlen_q,
                                       seqlen_kv=seqlen_kv)


def layout_to_topk(layout: BlockLayout, k: int | None = None) -> torch.Tensor:
    """Layout → ``[B, H, Mb, k]`` int64 ascending index lists padded with ``-1``.

    ``k`` defaults to the largest row count; a smaller ``k`` than some row needs is an error.
    """
    fn = "layout_to_topk"
    kmax = int(layout.kv_num_blocks.max()) if layout.kv_num_blocks.numel() else 0
    if k is None:
        k = kmax
    else:
        check_positive_int(fn, "k", k)
        if k < kmax:
            raise fail(fn, "k", "is smaller than the number of blocks some row selects", f"k >= {kmax}", k)
    Nb = layout.num_kv_blocks
    width = min(k, Nb)
    idx = layout.kv_indices[..., :width].long()
    pos = torch.arange(width, device=idx.device)
    idx = torch.where(pos < layout.kv_num_blocks.unsqueeze(-1).long(), idx, torch.full_like(idx, -1))
    if k > width:
        idx = torch.nn.functional.pad(idx, (0, k - width), value=-1)
    return idx


def flex_attention_available() -> str | None:
    """``None`` if ``torch.nn.attention.flex_attention`` can be imported, else the reason it cannot."""
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the torch build
        return f"torch {torch.__version__} has no usable flex_attention ({type(exc).__name__}: {exc})"
    return None


def layout_to_flex_block_mask(layout: BlockLayout, *, causal: bool = False) -> Any:
    """Layout → FlexAttention ``BlockMask`` with the same selected blocks.

    Selected blocks that need no element mask (inside the sequence bounds and, with ``causal``,
    entirely below the diagonal) are exported as *full* blocks; the rest as partial blocks. The
    ``mask_mod`` applies the block selection, the sequence bounds and, with ``causal=True``, the
    bottom-right causal triangle, so
    ``flex_attention(q, k, v, block_mask=...)`` computes exactly ``attention(..., layout=layout,
    causal=causal)``. GQA: call ``flex_attention(..., enable_gqa=True)``.
    """
    reason = flex_attention_available()
    if reason is not None:
        raise NotImplementedError(f"layout_to_flex_block_mask: FlexAttention unavailable: {reason}")
    from torch.nn.attention.flex_attention import BlockMask

    Nq, Nkv = layout.seqlen_q, layout.seqlen_kv
    bm, bn = layout.block_m, layout.block_n
    off = Nkv - Nq
    selected = layout.to_dense_mask()  # [B, H, Mb, Nb]
    any_allowed, all_allowed = causal_block_region(Nq, Nkv, bm, bn, layout.device)
    Mb, Nb = layout.num_q_blocks, layout.num_kv_blocks
    inside = torch.ones(Mb, Nb, dtype=torch.bool, device=layout.device)
    if Nq % bm:
        inside[-1, :] = False
    if Nkv % bn:
        inside[:, -1] = False
    if causal:
        selected = selected & any_allowed
        full = selected & all_allowed & inside
    else:
        full = selected & inside
    partial = selected & ~full

    # FlexAttention's mask_mod is the ground truth (its eager mode ignores the block lists), so it
    # looks the block up too; compiled kernels only call it on partial blocks.
    if causal:
        def mask_mod(b, h, q_idx, kv_idx):  # noqa: ANN001
            return selected[b, h, q_idx // bm, kv_idx // bn] & (kv_idx <= q_idx + off) & (q_idx < Nq) & (kv_idx < Nkv)
    else:
        def mask_mod(b, h, q_idx, kv_idx):  # noqa: ANN001
            return selected[b, h, q_idx // bm, kv_idx // bn] & (q_idx < Nq) & (kv_idx < Nkv)

    p_lay = BlockLayout.from_dense_mask(partial.contiguous(), block_m=bm, block_n=bn, seqlen_q=Nq, seqlen_kv=Nkv)
    f_lay = BlockLayout.from_dense_mask(full.contiguous(), block_m=bm, block_n=bn, seqlen_q=Nq, seqlen_kv=Nkv)
    return BlockMask.from_kv_blocks(
        p_lay.kv_num_blocks,
        p_lay.kv_indices,
        f_lay.kv_num_blocks,
        f_lay.kv_indices,
        BLOCK_SIZE=(bm, bn),
        mask_mod=mask_mod,
        seq_lengths=(Nq, Nkv),
    )


def layout_from_flex_block_mask(block_mask: Any, *, seqlen_q: int | None = None, seqlen_kv: int | None = None) -> BlockLayout:
    """FlexAttention ``BlockMask`` → layout; partial and full blocks both count as selected."""
    fn = "layout_from_flex_block_mask"
    for attr in ("kv_num_blocks", "kv_indices", "BLOCK_SIZE"):
        if not hasattr(block_mask, attr):
            raise fail(fn, "block_mask", "is not a FlexAttention BlockMask", "BlockMask", type(block_mask).__name__)
    bm, bn = (int(x) for x in block_mask.BLOCK_SIZE)
    lens = getattr(block_mask, "seq_lengths", None)
    Nq = seqlen_q if seqlen_q is not None else int(lens[0])
    Nkv = seqlen_kv if seqlen_kv is not None else int(lens[1])
    Mb, Nb = cdiv(Nq, bm), cdiv(Nkv, bn)

    def to_mask(num: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        num = num[..., :Mb]
        idx = idx[..., :Mb, :].long()
        width = idx.shape[-1]
        pos = torch.arange(width, device=idx.device)
        valid = pos < num.unsqueeze(-1).long()
        m = torch.zeros(*idx.shape[:3], max(Nb, width) + 1, dtype=torch.bool, device=idx.device)
        m.scatter_(-1, torch.where(valid, idx, torch.full_like(idx, m.shape[-1] - 1)), True)
        return m[..., :Nb]

    mask = to_mask(block_mask.kv_num_blocks, block_mask.kv_indices)
    if getattr(block_mask, "full_kv_num_blocks", None) is not None:
        mask = mask | to_mask(block_mask.full_kv_num_blocks, block_mask.full_kv_indices)
    return BlockLayout.from_dense_mask(mask.contiguous(), block_m=bm, block_n=bn, seqlen_q=Nq, seqlen_kv=Nkv)
