"""The ``masked_sdpa`` operator: exact causal block-sparse attention as SDPA with the layout's element mask.

Registered in :mod:`sparseattn.ops._builtin_ops` (entry point ``"integration"``: ``patch_model``'s CPU path).
"""

from __future__ import annotations

import warnings

import torch

from sparseattn.layout.block_layout import BlockLayout
from sparseattn.layout.masks import causal_window_mask

__all__ = ["masked_sdpa_attention"]


def masked_sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout, *,
                          scale: float | None = None, chunk_rows: int = 1024,
                          sliding_window: int | None = None) -> torch.Tensor:
    """Exact causal block-sparse attention via SDPA with the layout's element mask (CPU fast path).

    Computes exactly what :func:`sparseattn.reference_attention` computes with ``causal=True`` and
    the same layout (rows with no selected key give 0), in query chunks of ``chunk_rows`` so memory
    stays ``O(chunk_rows · N_kv)`` per head. Used by :func:`patch_model` on CPU when no
    ``pv_threshold`` is set; the time it takes is that of dense attention, not of the layout.
    ``sliding_window`` (``W``) restricts query ``i`` further to keys ``> i + N_kv - N_q - W`` (each chunk
    then reads only the keys its rows' windows reach).

    Shapes:
        q ``(B, H, N_q, D)``, k/v ``(B, H_kv, N_kv, D)`` → out ``(B, H, N_q, D)``.
    """
    B, H, Nq, D = q.shape
    Nkv = k.shape[2]
    # one host read for the three checks (a CPU path: it reads q/k/v once more, O(N) against SDPA's O(N^2))
    if not bool(torch.isfinite(q).all() & torch.isfinite(k).all() & torch.isfinite(v).all()):
        # SDPA adds the mask to the scores (NaN + -inf = NaN) and multiplies P·V over masked keys
        # (0 · NaN = NaN), so a non-finite value would leak into rows that never attend it. The
        # reference computes the same function with exact non-finite semantics.
        warnings.warn("masked_sdpa_attention: q/k/v hold non-finite values; computing with the PyTorch reference "
                      "so they reach exactly the rows that attend them", RuntimeWarning, stacklevel=2)
        from sparseattn.ops.reference import reference_attention

        return reference_attention(q, k, v, causal=True, layout=layout, scale=scale, sliding_window=sliding_window).out
    bm, bn = layout.block_m, layout.block_n
    chunk_rows = max(bm, (chunk_rows // bm) * bm)
    num, idx = layout.kv_num_blocks, layout.kv_indices
    # a pattern shared by every (batch, head) is stored as a stride-0 view: build its mask once
    shared = num.stride(0) == 0 and num.stride(1) == 0 and idx.stride(0) == 0 and idx.stride(1) == 0
    if shared:
        one = BlockLayout(num[:1, :1], idx[:1, :1], bm, bn, layout.seqlen_q, layout.seqlen_kv, validate=False)
        block_mask = one.to_dense_mask()  # [1, 1, Mb, Nb]
    else:
        block_mask = layout.to_dense_mask()  # [B, H, Mb, Nb]
    off = Nkv - Nq
    outs = []
    for r0 in range(0, Nq, chunk_rows):
        r1 = min(Nq, r0 + chunk_rows)
        kend = max(1, min(Nkv, r1 + off))
        kbeg = 0 if sliding_window is None else min(max(0, r0 + off - sliding_window + 1), kend - 1)
        rows = torch.arange(r0, r1, device=q.device)
        cols = torch.arange(kbeg, kend, device=q.device)
        em = block_mask[:, :, rows // bm][:, :, :, cols // bn]
        em = em & causal_window_mask(rows, cols, off, sliding_window)
        o = torch.nn.functional.scaled_dot_product_attention(q[:, :, r0:r1], k[:, :, kbeg:kend], v[:, :, kbeg:kend],
                                                             attn_mask=em, scale=scale, enable_gqa=H != k.shape[1])
        if bool(torch.isnan(o).any()):  # rows with no selected key (SDPA gives NaN there): 0, as the reference
            empty = ~em.any(-1, keepdim=True)
            o = torch.where(empty, torch.zeros((), dtype=o.dtype, device=o.device), o)
        outs.append(o)
    return torch.cat(outs, dim=2)
