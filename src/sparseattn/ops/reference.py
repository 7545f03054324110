"""Pure-PyTorch reference attention: the ground truth every kernel is compared with.

Blockwise online softmax over key chunks, so memory stays ``O(N_q · chunk)`` per head even at long
lengths (never an ``N_q × N_kv`` matrix). Runs on CPU and GPU, in float64 when given float64.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from sparseattn._validation import check_attention_args, check_layout_for, check_positive_int, check_qkv, fail
from sparseattn.layout.block_layout import BlockLayout, causal_block_region
from sparseattn.layout.masks import causal_window_mask, token_causal_mask
from sparseattn.layout.patterns import check_row_bounds
from sparseattn.ops.checks import _check_kv_scales, check_attn_mask, check_raw_state, check_segment
from sparseattn.state.types import LN2, LOG2E, AttentionState, RawState  # AttentionState re-exported for compatibility

__all__ = ["AttentionState", "RawState", "reference_attention", "reference_attention_carry", "sdpa_reference",
           "check_attn_mask", "check_raw_state", "check_segment"]


def _mask5(attn_mask: torch.Tensor, H: int, Hkv: int, dtype: torch.dtype) -> torch.Tensor:
    """``(B|1, H|1, N_q, N_kv)`` → ``(B|1, H_kv|1, G|1, N_q, N_kv)`` (a view; GQA head ``h = hk·G + g``)."""
    Bm, Hm, Nq, Nkv = attn_mask.shape
    m = attn_mask.to(dtype)
    if Hm == 1:
        return m.reshape(Bm, 1, 1, Nq, Nkv)
    return m.reshape(Bm, Hkv, H // Hkv, Nq, Nkv)


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
    attn_mask: torch.Tensor | None = None,
    row_bounds: Any = None,
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
        attn_mask: additive float mask ``(B|1, H|1, N_q, N_kv)``: added to the scaled scores
            (0 = attend, ``-inf`` = masked, finite = bias), together with ``layout``/``causal``/window.
            A ``-inf`` entry counts as not attended (a row whose keys are all ``-inf`` is empty).
        row_bounds: per-row key interval :class:`~sparseattn.layout.patterns.RowBounds` ``(lo, hi)``,
            integer ``[B|1, N_q]``: row ``r`` attends key ``j`` only if ``lo[r] <= j <= hi[r]`` (packed
            documents, prefix-LM; see :func:`~sparseattn.layout.patterns.document_row_bounds`), ANDed with
            everything else. A key outside a row's interval is not attended (its NaN/inf never reaches the
            row). Not with ``pv_threshold``.

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
    bounds = check_row_bounds(fn, row_bounds, B, Nq, q.device)
    if bounds is not None and pv_threshold is not None:
        raise fail(fn, "pv_threshold", "is not supported with row_bounds (tiles are not counted per row interval)",
                   "None", repr(pv_threshold))
    if bounds is not None:
        b_lo = bounds.lo.to(torch.int64).reshape(-1, 1, 1, Nq, 1)  # [B|1, 1, 1, Nq, 1]
        b_hi = bounds.hi.to(torch.int64).reshape(-1, 1, 1, Nq, 1)
    mask5 = None
    if check_attn_mask(fn, attn_mask, B, H, Nq, Nkv, q.device) is not None:
        mask5 = _mask5(attn_mask, H, Hkv, torch.float64 if q.dtype == torch.float64 else torch.float32)  # type: ignore[arg-type]

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
        if bounds is not None:  # rows (of some batch) whose interval meets this chunk
            meets = ((b_lo[..., 0] <= stop - 1) & (b_hi[..., 0] >= start)).reshape(-1, Nq).any(0)
            row_ok = meets if row_ok is None else (row_ok & meets)
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
            cm = causal_window_mask(r, cols, off, W)  # [R, C]
            allowed = cm if allowed is None else (allowed & cm)
        if bounds is not None:
            rl = b_lo if ridx is None else b_lo[:, :, :, ridx]
            rh = b_hi if ridx is None else b_hi[:, :, :, ridx]
            bm_ = (cols >= rl) & (cols <= rh)  # [B|1, 1, 1, R, C]
            allowed = bm_ if allowed is None else (allowed & bm_)
        qs = qf if ridx is None else qf[:, :, :, ridx]
        m_old = m if ridx is None else m[..., ridx]
        l_old = l if ridx is None else l[..., ridx]
        acc_old = acc if ridx is None else acc[..., ridx, :]
        s = torch.einsum("bhgnd,bhcd->bhgnc", qs, kf[:, :, start:stop]).to(acc_dtype) * scale
        if mask5 is not None:
            mk = (mask5 if ridx is None else mask5[..., ridx, :])[..., start:stop].to(acc_dtype)
            s = s + mk
            fin = mk != -math.inf
            allowed = fin if allowed is None else (allowed & fin)
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
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``torch.nn.functional.scaled_dot_product_attention`` with the same (element-level) mask.

    Materialises the ``N_q × N_kv`` mask: for tests and small shapes only. Rows with no attended
    key are returned as 0 (SDPA itself gives NaN there). ``attn_mask``: an additive float mask
    ``(B|1, H|1, N_q, N_kv)`` combined with the layout/causal mask (``-inf`` = not attended).
    """
    B, H, Hkv, Nq, Nkv, D = check_qkv("sdpa_reference", q, k, v)
    G = H // Hkv
    mask = torch.ones(B, H, Nq, Nkv, dtype=torch.bool, device=q.device)
    if layout is not None:
        check_layout_for("sdpa_reference", layout, B, H, Nq, Nkv, q.device)
        mask = layout.element_mask(causal=causal)
    elif causal:
        mask = mask & token_causal_mask(Nq, Nkv, device=q.device)
    kk = k.repeat_interleave(G, dim=1)
    vv = v.repeat_interleave(G, dim=1)
    sdpa_mask: torch.Tensor = mask
    if check_attn_mask("sdpa_reference", attn_mask, B, H, Nq, Nkv, q.device) is not None:
        fm = attn_mask.to(q.dtype).expand(B, H, Nq, Nkv)  # type: ignore[union-attr]
        mask = mask & (fm != -math.inf)
        sdpa_mask = fm.masked_fill(~mask, -math.inf)
    out = torch.nn.functional.scaled_dot_product_attention(q, kk, vv, attn_mask=sdpa_mask, scale=scale)
    empty = ~mask.any(-1, keepdim=True)
    return out.masked_fill(empty, 0.0)


def reference_attention_carry(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    state: RawState | None = None,
    kv_offset: int = 0,
    kv_len: int | None = None,
    causal: bool = False,
    layout: BlockLayout | None = None,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    sliding_window: int | None = None,
    block_n: int = 64,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> tuple[AttentionState, RawState]:
    """The kernel's online-softmax loop in PyTorch over one key segment, carrying a :class:`RawState`.

    ``k``/``v`` hold global keys ``kv_offset .. kv_offset + N_kv - 1`` of a sequence of ``kv_len`` keys
    (default ``kv_offset + N_kv``) whose last ``N_q`` positions are the queries (``causal``: query ``i``
    sees global keys ``<= i + kv_len - N_q``). Key chunks of ``layout.block_n`` (else ``block_n``) are
    processed in order with the kernel's arithmetic (log2 units, ``exp2``, the mask pre-divided by the
    scale), in float32 (float64 for float64 inputs; the state's dtype). Carrying the state over
    segments whose boundaries are multiples of the chunk gives bitwise the one-call result. Builds
    ``N_q × chunk`` scores per step: for tests and small shapes.

    ``k_scale``/``v_scale`` (float32, ``(B, H_kv, N_kv[, 1])``): ``k``/``v`` hold quantized values
    (int8 / float8_e4m3fn), dequantised here in PyTorch (``value * scale``) in the state's dtype.

    Returns:
        ``(AttentionState(out, lse) over every key carried so far, outgoing RawState)``.
    """
    fn = "reference_attention_carry"
    if k_scale is not None or v_scale is not None:
        ks, vs = _check_kv_scales(fn, q, k, v, k_scale, v_scale)
        wide = torch.float64 if q.dtype == torch.float64 else torch.float32
        k = (k.to(wide) * ks.unsqueeze(-1)).to(q.dtype)  # type: ignore[union-attr]
        v = (v.to(wide) * vs.unsqueeze(-1)).to(q.dtype)  # type: ignore[union-attr]
    (B, H, Hkv, Nq, Nkv, D), scale = check_attention_args(fn, q, k, v, causal=causal, layout=layout, scale=scale,
                                                           pv_threshold=None, sliding_window=sliding_window)
    check_positive_int(fn, "block_n", block_n)
    total, off = check_segment(fn, kv_offset, kv_len, Nq, Nkv)
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    state = check_raw_state(fn, "state", state, B, H, Nq, D, q.device, acc_dtype)
    mask5 = None
    if check_attn_mask(fn, attn_mask, B, H, Nq, Nkv, q.device) is not None:
        mask5 = _mask5(attn_mask, H, Hkv, acc_dtype)  # type: ignore[arg-type]
    W = sliding_window if sliding_window is not None and sliding_window < total else None
    G = H // Hkv
    dev = q.device
    qk_scale = scale * LOG2E
    mask_mul = LOG2E / qk_scale
    qf = q.to(acc_dtype).reshape(B, Hkv, G, Nq, D)
    kf, vf = k.to(acc_dtype), v.to(acc_dtype)
    if state is None:
        state = RawState.empty(B, H, Nq, D, device=dev, dtype=acc_dtype)
    m = state.m.reshape(B, Hkv, G, Nq).clone()
    l = state.l.reshape(B, Hkv, G, Nq).clone()
    acc = state.acc.reshape(B, Hkv, G, Nq, D).clone()
    had = m > -math.inf
    attends = torch.zeros((B, Hkv, G, Nq), dtype=torch.bool, device=dev)
    rows = torch.arange(Nq, device=dev)
    step = layout.block_n if layout is not None else block_n
    block_mask = layout.to_dense_mask().reshape(B, Hkv, G, layout.num_q_blocks, -1) if layout is not None else None
    for start in range(0, Nkv, step):
        stop = min(start + step, Nkv)
        cols = torch.arange(start, stop, device=dev)
        qk = torch.einsum("bhgnd,bhcd->bhgnc", qf, kf[:, :, start:stop])
        allowed = torch.ones((1, 1, 1, Nq, stop - start), dtype=torch.bool, device=dev)
        if block_mask is not None:
            allowed = allowed & block_mask[:, :, :, rows // layout.block_m, start // step].unsqueeze(-1)  # type: ignore[union-attr]
        if causal:
            allowed = allowed & causal_window_mask(rows, cols, off, W)
        if mask5 is not None:
            mk = mask5[..., start:stop]
            qk = qk + mk * mask_mul
            allowed = allowed & (mk != -math.inf)
        s2 = torch.where(allowed, qk * qk_scale, torch.full((), -math.inf, dtype=acc_dtype, device=dev))
        m_new = torch.maximum(m, s2.amax(-1))
        m_safe = torch.where(m_new == -math.inf, torch.zeros_like(m_new), m_new)
        p = torch.exp2(s2 - m_safe.unsqueeze(-1))
        alpha = torch.exp2(m - m_safe)
        l = l * alpha + p.sum(-1)
        acc = acc * alpha.unsqueeze(-1) + torch.einsum("bhgnc,bhcd->bhgnd", p, vf[:, :, start:stop])
        m = m_new
        attends = attends | allowed.expand(B, Hkv, G, Nq, stop - start).any(-1)
    has = attends | had
    l_safe = torch.where(has, l, torch.ones_like(l))
    out = torch.where(has.unsqueeze(-1), acc / l_safe.unsqueeze(-1), torch.zeros_like(acc))
    lse = torch.where(has, (m + torch.log2(l_safe)) * LN2, torch.full_like(m, -math.inf))
    raw = RawState(m.reshape(B, H, Nq), l.reshape(B, H, Nq), acc.reshape(B, H, Nq, D))
    return AttentionState(out.reshape(B, H, Nq, D).to(q.dtype), lse.reshape(B, H, Nq)), raw
