"""Pure-PyTorch reference attention: the ground truth every kernel is compared with.

Blockwise online softmax over key chunks, so memory stays ``O(N_q · chunk)`` per head even at long
lengths (never an ``N_q × N_kv`` matrix). Runs on CPU and GPU, in float64 when given float64.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from sparseattn._validation import check_attention_args, check_layout_for, check_positive_int, check_qkv
from sparseattn.layout.block_layout import BlockLayout, causal_block_region
from sparseattn.state.types import AttentionState  # re-exported here for compatibility

__all__ = ["AttentionState", "reference_attention", "sdpa_reference"]


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    layout: BlockLayout | None = None,
    scale: float | None = None,
    chunk_size: int = 256,
    upcast: bool = True,
    pv_threshold: float | None = None,
    stats: dict[str, Any] | None = None,
    sliding_window: int | None = None,
) -> AttentionState:
    """Dense or block-sparse attention, computed blockwise in PyTorch.

    Args:
        q: ``(B, H, N_q, D)``.
        k: ``(B, H_kv, N_kv, D)`` with ``H % H_kv == 0`` (GQA, never copied per head).
        v: same shape as ``k``.
        causal: bottom-right aligned causal mask: query ``i`` sees keys ``<= i + N_kv - N_q``.
        layout: restrict attention to the layout's selected blocks (``None`` = dense).
        scale: softmax scale, default ``D ** -0.5``.
        chunk_size: keys per step when ``layout`` is None (with a layout the step is ``block_n``).
        upcast: compute in float32 (float64 for float64 inputs). ``False`` keeps the matmul operands
            in the input dtype, like a kernel does; used as the "same dtype" yardstick of the ratio
            rule in parity tests.
        pv_threshold: softmax-aware skip. For each (query block, key block) tile visited in ascending
            key order, if every row ``r`` of the tile has ``max_c s[r, c] - m_new[r] < -pv_threshold``
            (``s`` = scaled natural-log scores, ``m_new`` = running row maximum including this tile),
            the tile's ``P·V`` product is skipped; its probability mass still enters the row sum, so
            ``lse`` stays exact. Requires ``layout`` (tiles are the layout's blocks). The Triton
            kernel implements the identical rule.
        stats: optional dict filled with ``visited_tiles`` and ``pv_skipped_tiles`` (int), counted only
            with ``pv_threshold``. A tile is visited if the layout selects it and, with ``causal``, it
            holds at least one allowed (row, key) pair (tiles above the diagonal are never visited).
            With ``sliding_window`` the window counts too: a tile entirely below every row's window
            is not visited either.
        sliding_window: ``W`` keys per query (transformers' / Mistral's ``sliding_window``), with
            ``causal=True`` only: query ``i`` attends keys ``j`` with ``i + OFF - W < j <= i + OFF``
            (``OFF = N_kv - N_q``), intersected with ``layout``. A key outside a row's window is not
            attended: its NaN/inf never reaches that row.

    Returns:
        ``AttentionState(out, lse)`` — ``lse`` is the natural-log logsumexp, float32 (float64 for
        float64 inputs). Rows with no attended key: ``out = 0``, ``lse = -inf``. NaN/inf inputs reach
        exactly the outputs that attend them (a row whose attended scores are all ``-inf`` is NaN); see
        docs/ARCHITECTURE.md, "Non-finite inputs".

    Shapes:
        q ``(B, H, N_q, D)``, k/v ``(B, H_kv, N_kv, D)`` → out ``(B, H, N_q, D)``, lse ``(B, H, N_q)``.
    """
    fn = "reference_attention"
    (B, H, Hkv, Nq, Nkv, D), scale = check_attention_args(fn, q, k, v, causal=causal, layout=layout, scale=scale,
                                                           pv_threshold=pv_threshold, sliding_window=sliding_window)
    check_positive_int(fn, "chunk_size", chunk_size)
    W = sliding_window

    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    mm_dtype = acc_dtype if upcast else q.dtype
    G = H // Hkv
    dev = q.device
    qf = q.to(mm_dtype).reshape(B, Hkv, G, Nq, D)
    kf = k.to(mm_dtype)
    vf = v.to(mm_dtype)

    m = torch.full((B, Hkv, G, Nq), -math.inf, dtype=acc_dtype, device=dev)
    l = torch.zeros((B, Hkv, G, Nq), dtype=acc_dtype, device=dev)
    attends = torch.zeros((B, Hkv, G, Nq), dtype=torch.bool, device=dev)  # row attends >= 1 key
    # Non-finite values in v: a product P·V would turn 0 · NaN (a masked key) into NaN, so the finite
    # part is multiplied with those entries zeroed and the non-finite part added by counting (see
    # _add_nonfinite_v). Checked once here; the reference is not a hot path.
    v_nonfinite = not bool(torch.isfinite(v).all())
    if v_nonfinite:
        vf = torch.where(torch.isfinite(vf), vf, torch.zeros((), dtype=vf.dtype, device=dev))
    acc = torch.zeros((B, Hkv, G, Nq, D), dtype=acc_dtype, device=dev)
    rows = torch.arange(Nq, device=dev)
    off = Nkv - Nq

    if layout is not None:
        step = layout.block_n
        block_mask = layout.to_dense_mask()  # [B, H, Mb, Nb]
        row_block = rows // layout.block_m
    else:
        step = chunk_size
        block_mask = None
        row_block = None
    visited = skipped = 0
    if pv_threshold is not None and causal:
        causal_region, _ = causal_block_region(Nq, Nkv, layout.block_m, layout.block_n, dev)  # type: ignore[union-attr]
        if W is not None:
            # a tile holds a pair inside some row's window iff its last key is above its first row's window start
            bm_, bn_ = layout.block_m, layout.block_n  # type: ignore[union-attr]
            first_row = torch.arange(layout.num_q_blocks, device=dev) * bm_  # type: ignore[union-attr]
            last_key = torch.clamp((torch.arange(layout.num_kv_blocks, device=dev) + 1) * bn_, max=Nkv) - 1  # type: ignore[union-attr]
            causal_region = causal_region & (last_key[None, :] > first_row[:, None] + off - W)

    for start in range(0, Nkv, step):
        stop = min(start + step, Nkv)
        cols = torch.arange(start, stop, device=dev)
        # Only rows that can attend a key of this chunk are computed (the query blocks that select
        # this key block, and under causal the rows that see its first key); the others would only
        # see -inf scores, which leave (m, l, acc) unchanged. Keeps the sparse reference's cost
        # proportional to the layout's density.
        row_ok = None  # bool [Nq], None = every row
        sel = None
        if block_mask is not None:
            sel = block_mask[:, :, :, start // step]  # [B, H, Mb]
            qb_any = sel.any(1).any(0)  # [Mb]
            if not bool(qb_any.any()):
                continue
            row_ok = qb_any[row_block]
        if causal:
            sees = rows + off >= start  # row sees at least this chunk's first key
            if W is not None:
                sees = sees & (rows + off - W < stop - 1)  # and its window reaches this chunk's last key
            row_ok = sees if row_ok is None else (row_ok & sees)
        ridx = None  # row indices of the subset, None = all rows
        if row_ok is not None:
            if not bool(row_ok.any()):
                continue
            if not bool(row_ok.all()):
                ridx = row_ok.nonzero().squeeze(1)
        r = rows if ridx is None else rows[ridx]
        R = int(r.numel())
        allowed = None  # broadcastable to [B, Hkv, G, R, C]
        if sel is not None:
            rb = row_block if ridx is None else row_block[ridx]  # type: ignore[index]
            allowed = sel[:, :, rb].reshape(B, Hkv, G, R, 1)
        if causal:
            cm = cols[None, :] <= r[:, None] + off  # [R, C]
            if W is not None:
                cm = cm & (cols[None, :] > r[:, None] + off - W)
            allowed = cm if allowed is None else (allowed & cm)
        qs = qf if ridx is None else qf[:, :, :, ridx]
        m_old = m if ridx is None else m[..., ridx]
        l_old = l if ridx is None else l[..., ridx]
        acc_old = acc if ridx is None else acc[..., ridx, :]
        s = torch.einsum("bhgnd,bhcd->bhgnc", qs, kf[:, :, start:stop]).to(acc_dtype) * scale
        if allowed is not None:
            s = s.masked_fill(~allowed, -math.inf)
            att = allowed.any(-1).expand(B, Hkv, G, R)
        else:
            att = torch.ones((), dtype=torch.bool, device=dev).expand(B, Hkv, G, R)
        m_new = torch.maximum(m_old, s.amax(-1))
        m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        p = torch.exp(s - m_safe.unsqueeze(-1))
        alpha = torch.exp(m_old - m_safe)
        l_new = l_old * alpha + p.sum(-1)
        acc_new = acc_old * alpha.unsqueeze(-1)
        if pv_threshold is not None:
            # per (query block) tile: skip P·V if every row's tile max is far below its running max
            Mb = layout.num_q_blocks  # type: ignore[union-attr]
            tile_gap = s.amax(-1) - m_safe  # [B, Hkv, G, R]; -inf for fully masked rows
            if ridx is not None:  # rows not computed see nothing here: gap -inf
                full_gap = torch.full((B, Hkv, G, Nq), -math.inf, dtype=acc_dtype, device=dev)
                full_gap[..., ridx] = tile_gap
                tile_gap = full_gap
            pad = Mb * layout.block_m - Nq  # type: ignore[union-attr]
            gap = torch.nn.functional.pad(tile_gap, (0, pad), value=-math.inf).reshape(B, Hkv, G, Mb, -1)
            skip_tile = (gap < -float(pv_threshold)).all(-1)  # [B, Hkv, G, Mb]
            sel_t = sel.reshape(B, Hkv, G, Mb)  # type: ignore[union-attr]
            if causal:
                sel_t = sel_t & causal_region[:, start // step]
            visited += int(sel_t.sum())
            skipped += int((skip_tile & sel_t).sum())
            keep_rows = (~skip_tile)[..., rb].unsqueeze(-1)  # [B, Hkv, G, R, 1]
            p = p * keep_rows
        acc_new = acc_new + torch.einsum("bhgnc,bhcd->bhgnd", p.to(mm_dtype), vf[:, :, start:stop]).to(acc_dtype)
        if v_nonfinite:
            acc_new = _add_nonfinite_v(acc_new, p, v[:, :, start:stop])
        if ridx is None:
            m, l, acc = m_new, l_new, acc_new
            attends = attends | att
        else:
            m[..., ridx] = m_new
            l[..., ridx] = l_new
            acc[..., ridx, :] = acc_new
            attends[..., ridx] = attends[..., ridx] | att
    if stats is not None:
        stats["visited_tiles"] = visited
        stats["pv_skipped_tiles"] = skipped

    # Empty rows (no attended key) give out 0 / lse -inf. A row that attends keys but has l == 0 (all
    # its scores -inf) or l NaN (non-finite inputs) divides through: NaN, as SDPA gives.
    has = attends
    out = torch.where(has.unsqueeze(-1), acc / torch.where(has, l, torch.ones_like(l)).unsqueeze(-1), torch.zeros_like(acc))
    lse = torch.where(has, m + torch.log(torch.where(has, l, torch.ones_like(l))), torch.full_like(m, -math.inf))
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return AttentionState(out.reshape(B, H, Nq, D).to(q.dtype), lse.reshape(B, H, Nq).to(lse_dtype))


def _add_nonfinite_v(acc: torch.Tensor, p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Add the contribution of ``v``'s non-finite entries to ``acc`` (finite part already added).

    For each (row, channel): the attended keys (``p > 0``) whose ``v`` is NaN, ``+inf`` or ``-inf``
    make the sum NaN (any NaN, or both infinities) or that infinity; masked keys (``p == 0``) never
    contribute, unlike in a plain product where ``0 · NaN = NaN``.
    """
    att = (p > 0).to(acc.dtype)  # [B, Hkv, G, R, C]

    def count(ind: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bhgnc,bhcd->bhgnd", att, ind.to(acc.dtype))

    n_pos, n_neg, n_nan = count(torch.isposinf(v)), count(torch.isneginf(v)), count(torch.isnan(v))
    acc = torch.where(n_pos > 0, torch.full_like(acc, math.inf), acc)
    acc = torch.where(n_neg > 0, torch.full_like(acc, -math.inf), acc)
    return torch.where((n_nan > 0) | ((n_pos > 0) & (n_neg > 0)), torch.full_like(acc, math.nan), acc)


def sdpa_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    layout: BlockLayout | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """``torch.nn.functional.scaled_dot_product_attention`` with the same (element-level) mask.

    Materialises the ``N_q × N_kv`` mask: for tests and small shapes only. Rows with no attended
    key are returned as 0 (SDPA itself gives NaN there).
    """
    B, H, Hkv, Nq, Nkv, D = check_qkv("sdpa_reference", q, k, v)
    G = H // Hkv
    mask = torch.ones(B, H, Nq, Nkv, dtype=torch.bool, device=q.device)
    if layout is not None:
        check_layout_for("sdpa_reference", layout, B, H, Nq, Nkv, q.device)
        mask = layout.element_mask(causal=causal)
    elif causal:
        r = torch.arange(Nq, device=q.device)[:, None]
        c = torch.arange(Nkv, device=q.device)[None, :]
        mask = mask & (c <= r + (Nkv - Nq))
    kk = k.repeat_interleave(G, dim=1)
    vv = v.repeat_interleave(G, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, scale=scale)
    empty = ~mask.any(-1, keepdim=True)
    return out.masked_fill(empty, 0.0)
