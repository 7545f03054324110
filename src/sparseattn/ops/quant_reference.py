"""PyTorch emulation of the quantized attention kernel: the same scales, rounding and tile order.

* :func:`quantize_reference` — the quantization of :mod:`sparseattn.ops.triton.quantize` in
  PyTorch (same groups, same ``div_rn``-style IEEE divisions, round half away from zero, e4m3
  rounding through ``torch.float8_e4m3fn``). Returns a :class:`~sparseattn.ops.quant.QuantizedQKV`
  in the kernel's format (FP8 V as float32 values, transposed and padded like the kernel's).
* :func:`attention_from_quantized` — the kernel's online softmax tile by tile (``tile_n`` keys per
  step, ascending, as the kernel visits them): INT8 scores exact in fp32, dequantized by the same
  products, ``exp2`` in log2 units, P rounded to the input dtype (``"int8"``) or ``P * 448`` to e4m3
  (``"int8_fp8"``), fp32 accumulation, the same epilogue (lse correction, empty rows).
  Works on operands from either quantizer, so a test can check the kernel's attention on the
  kernel's own quantized operands.
* :func:`emulated_quantized_attention` — both steps.

Only the summation order (and ``exp2``'s last bit on GPUs) differs from the kernel. The emulation is
meant for finite inputs; with a non-finite ``v`` it makes the whole channel NaN (``0 * NaN`` in
masked products), which the kernel confines to a tile.
"""

from __future__ import annotations

import torch

from sparseattn.layout.block_layout import BlockLayout, cdiv
from sparseattn.layout.masks import token_causal_mask
from sparseattn.ops.quant import _FP8_MAX, _LOG2E, GRANULARITIES, QuantizedQKV, balance_scales

__all__ = ["quantize_reference", "attention_from_quantized", "emulated_quantized_attention", "group_index",
           "e4m3_round_reference"]

_LN2 = 0.6931471805599453


def group_index(n: int, w: int, t: int, s: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Scale-group id of rows ``0..n-1``: ``(r // w) * t + (r % (t * s)) // s`` (int64 ``[n]``)."""
    r = torch.arange(n, device=device)
    return (r // w) * t + (r % (t * s)) // s


def e4m3_round_reference(x: torch.Tensor) -> torch.Tensor:
    """fp32 → nearest e4m3 (ties to even, saturating at ±448, NaN kept) → fp32."""
    return x.float().clamp(-_FP8_MAX, _FP8_MAX).to(torch.float8_e4m3fn).float().where(~torch.isnan(x), x.float())


def _quant_rows(x: torch.Tensor, gran: tuple[int, int, int], mult: float, nan_groups: bool):
    """INT8 per-group quantization of ``x`` fp32 ``(B, Hx, N, D)``: (int8, scale (B, Hx, G), xf, bad_row)."""
    B, Hx, N, D = x.shape
    w, t, s = gran
    G = cdiv(N, w) * t
    gid = group_index(N, w, t, s, x.device)
    fin = x.abs() < float("inf")
    xf = torch.where(fin, x, torch.zeros((), dtype=x.dtype, device=x.device))
    bad_row = (~fin).any(-1)  # (B, Hx, N)
    rowmax = xf.abs().amax(-1)
    amax = torch.zeros((B, Hx, G), dtype=torch.float32, device=x.device)
    amax.scatter_reduce_(2, gid.expand(B, Hx, N), rowmax, reduce="amax", include_self=True)
    amax = torch.where(amax > 0, amax, torch.ones_like(amax))
    inv = torch.full_like(amax, 127.0) / amax
    y = xf * inv[:, :, gid].unsqueeze(-1)
    y = y + torch.where(y >= 0, 0.5, -0.5)
    xq = y.clamp(-127.0, 127.0).trunc().to(torch.int8)
    scale = (amax / torch.full_like(amax, 127.0)) * torch.tensor(mult, dtype=torch.float32)
    if nan_groups:
        bad_g = torch.zeros((B, Hx, G), dtype=torch.int32, device=x.device)
        bad_g.scatter_reduce_(2, gid.expand(B, Hx, N), bad_row.to(torch.int32), reduce="amax", include_self=True)
        scale = torch.where(bad_g > 0, torch.full_like(scale, float("nan")), scale)
    return xq, scale, xf, bad_row


def quantize_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, quant: str = "int8",
                       quant_granularity: str = "per_warp", scale: float | None = None, smooth_k: bool = True,
                       k_mean: torch.Tensor | None = None, smooth_q: bool = True,
                       q_mean: torch.Tensor | None = None, balance_qk: bool = True) -> QuantizedQKV:
    """The kernels' quantization in PyTorch (see the module docstring).

    Args:
        k_mean: use this smoothing mean ``(B, H_kv, D)`` float32 instead of computing one (the
            kernel sums per 128-token chunk, so its mean can differ in the last bit; passing the
            kernel's mean makes the quantized values comparable bit for bit).
        smooth_q: quantize ``q - mean_tokens(q)`` (per query head) and return ``k_bias``, the mean's
            product with every smoothed key (``sm_scale * log2(e)`` folded in).
        q_mean: use this Q mean ``(B, H, D)`` float32 instead of computing one (as ``k_mean``).
        balance_qk: quantize ``q / alpha`` and ``k * alpha`` per channel, ``alpha`` from
            :func:`~sparseattn.ops.quant.balance_scales` on the (smoothed) ranges of the finite entries.
    """
    B, H, Nq, D = q.shape
    Hkv, Nkv = k.shape[1], k.shape[2]
    sm_scale = float(scale) if scale is not None else D ** -0.5
    qg, kg = GRANULARITIES[quant_granularity]
    kf = k.float()
    if smooth_k:
        if k_mean is None:
            kfin = torch.where(kf.abs() < float("inf"), kf, torch.zeros((), device=k.device))
            k_mean = kfin.sum(2) / Nkv
        k_mean = k_mean.float()
    else:
        k_mean = torch.zeros((B, Hkv, D), dtype=torch.float32, device=k.device)
    zero = torch.zeros((), device=q.device)
    ks_src = kf - k_mean[:, :, None, :] if smooth_k else kf  # what K quantizes (non-finite entries flag their group)
    ks_fin = torch.where(ks_src.abs() < float("inf"), ks_src, zero)
    mult = float(torch.tensor(sm_scale * _LOG2E, dtype=torch.float32))
    qf = q.float()
    q_fin = qf.abs() < float("inf")
    bad_row = (~q_fin).any(-1)
    qf = torch.where(q_fin, qf, zero)  # non-finite entries count as 0; their row is flagged by bad_row
    if smooth_q:
        if q_mean is None:
            q_mean = qf.sum(2) / Nq
        q_mean = q_mean.float()
    qs_src = torch.where(q_fin, qf - q_mean[:, :, None, :], zero) if smooth_q else qf  # what Q quantizes
    if balance_qk:
        ch_q, ch_k = balance_scales(qs_src.abs().amax(2), ks_fin.abs().amax(2))
        ks_src = ks_src * ch_k[:, :, None, :]
        qs_src = qs_src * ch_q.repeat_interleave(H // Hkv, dim=1)[:, :, None, :]
    else:
        ch_k = None
    k_int8, k_scale, _, _ = _quant_rows(ks_src, kg, 1.0, True)
    q_int8, q_scale, _, _ = _quant_rows(qs_src, qg, mult, False)
    k_bias = None
    if smooth_q:
        # the kernel's sum over D of (finite smoothed k) * q_mean, times sm_scale * log2(e)
        k_bias = (ks_fin.repeat_interleave(H // Hkv, dim=1) * q_mean[:, :, None, :]).sum(-1) * torch.tensor(
            mult, dtype=torch.float32)
    else:
        q_mean = None
    if smooth_k:
        km_h = k_mean.repeat_interleave(H // Hkv, dim=1)
        corr_mult = torch.tensor(mult, dtype=torch.float32) * torch.tensor(_LN2, dtype=torch.float32)
        q_row = (qf * km_h[:, :, None, :]).sum(-1) * corr_mult
    else:
        q_row = torch.zeros((B, H, Nq), dtype=torch.float32, device=q.device)
    q_row = torch.where(bad_row, torch.full_like(q_row, float("nan")), q_row)
    v_out, v_scale = v, None
    if quant == "int8_fp8":
        vf = v.float()
        fin = vf.abs() < float("inf")
        amax = torch.where(fin, vf.abs(), torch.zeros((), device=v.device)).amax(2)  # (B, Hkv, D)
        amax = torch.where(amax > 0, amax, torch.ones_like(amax))
        inv = torch.full_like(amax, _FP8_MAX) / amax
        y = vf * inv[:, :, None, :]
        y = torch.where(fin, y, torch.full_like(y, float("nan")))
        v8 = e4m3_round_reference(y)
        n_pad = cdiv(Nkv, 64) * 64
        v_out = torch.zeros((B, Hkv, D, n_pad), dtype=torch.float32, device=v.device)
        v_out[..., :Nkv] = v8.transpose(2, 3)
        v_scale = amax / torch.full_like(amax, _FP8_MAX)
    return QuantizedQKV(q_int8, q_scale, q_row, k_int8, k_scale, k_mean, v_out, v_scale, quant, quant_granularity,
                        sm_scale, False, q_mean, k_bias, ch_k)


def _allowed_mask(layout: BlockLayout, causal: bool, device: torch.device) -> torch.Tensor:
    """Element mask ``(B, H, N_q, N_kv)``: layout-selected, in range and (causal) at or below the diagonal."""
    Nq, Nkv = layout.seqlen_q, layout.seqlen_kv
    blk = layout.to_dense_mask().to(device)  # (B, H, Mb, Nb)
    rows_b = torch.arange(Nq, device=device) // layout.block_m
    cols_b = torch.arange(Nkv, device=device) // layout.block_n
    m = blk[:, :, rows_b][:, :, :, cols_b]
    if causal:
        m = m & token_causal_mask(Nq, Nkv, device=device)
    return m


def attention_from_quantized(qq: QuantizedQKV, layout: BlockLayout, *, causal: bool = False,
                             out_dtype: torch.dtype = torch.bfloat16, v_dtype: torch.dtype | None = None,
                             tile_n: int = 64, k_scalar: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's attention on quantized operands, in PyTorch (see the module docstring).

    Args:
        qq: operands from :func:`quantize_reference` or :func:`~sparseattn.ops.quant.quantize_qkv`.
        tile_n: the kernel's ``BLOCK_N`` (the softmax update order; P is rounded per tile).
        v_dtype: dtype P is rounded to for ``"int8"`` (default: V's dtype).
        k_scalar: the kernel's K-scale path (``qk * (qs * ks)`` vs ``qk * qs * ks``; default as the launcher picks).

    Returns:
        ``(out, lse)``: out ``(B, H, N_q, D)`` in ``out_dtype``, lse natural-log float32.
    """
    dev = qq.q_int8.device
    B, H, Nq, D = qq.q_int8.shape
    Hkv, Nkv = qq.k_int8.shape[1], qq.k_int8.shape[2]
    grp = H // Hkv
    (qw, qt, qs_), (kw, kt, ks_) = GRANULARITIES[qq.granularity]
    if k_scalar is None:
        k_scalar = kt == 1 and kw % tile_n == 0
    fp8 = qq.quant == "int8_fp8"
    qi = qq.q_int8.float()
    ki = qq.k_int8.float().repeat_interleave(grp, dim=1)
    qs_row = qq.q_scale[:, :, group_index(Nq, qw, qt, qs_, dev)]  # (B, H, Nq)
    ks_col = qq.k_scale.repeat_interleave(grp, dim=1)[:, :, group_index(Nkv, kw, kt, ks_, dev)]  # (B, H, Nkv)
    kbias = qq.k_bias  # (B, H, Nkv) or None
    if fp8:
        vv = qq.v[..., :Nkv].float().transpose(2, 3).repeat_interleave(grp, dim=1)  # (B, H, Nkv, D) e4m3 values
    else:
        vv = qq.v.repeat_interleave(grp, dim=1)
        pdt = v_dtype or vv.dtype
        vv = vv.float()
    allowed = _allowed_mask(layout, causal, dev)
    m = torch.full((B, H, Nq), float("-inf"), device=dev)
    l = torch.zeros((B, H, Nq), device=dev)
    acc = torch.zeros((B, H, Nq, D), device=dev)
    for c0 in range(0, Nkv, tile_n):
        c1 = min(c0 + tile_n, Nkv)
        qk = qi @ ki[:, :, c0:c1].transpose(-1, -2)  # exact: |sum| < 2**24
        ks = ks_col[:, :, c0:c1]
        if k_scalar:
            s = qk * (qs_row[..., None] * ks[:, :, None, :])
        else:
            s = qk * qs_row[..., None] * ks[:, :, None, :]
        if kbias is not None:
            s = s + kbias[:, :, None, c0:c1]
        s = torch.where(allowed[..., c0:c1], s, torch.full_like(s, float("-inf")))
        m_new = torch.maximum(m, s.amax(-1))
        m_safe = torch.where(m_new == float("-inf"), torch.zeros_like(m_new), m_new)
        p = torch.exp2(s - m_safe[..., None])
        alpha = torch.exp2(m - m_safe)
        l = l * alpha + p.sum(-1)
        acc = acc * alpha[..., None]
        if fp8:
            p8 = e4m3_round_reference(p * _FP8_MAX)
            acc = acc + p8 @ vv[:, :, c0:c1]
        else:
            acc = acc + p.to(pdt).float() @ vv[:, :, c0:c1]
        m = m_new
    has = allowed.any(-1)
    l_safe = torch.where(has, l, torch.ones_like(l))
    out = acc / l_safe[..., None]
    if fp8:
        vsc = (qq.v_scale / _FP8_MAX).repeat_interleave(grp, dim=1)  # (B, H, D)
        out = out * vsc[:, :, None, :]
    out = torch.where(has[..., None], out + qq.q_row[..., None] * 0.0, torch.zeros_like(out))
    lse = torch.where(has, (m + torch.log2(l_safe)) * _LN2 + qq.q_row, torch.full_like(m, float("-inf")))
    return out.to(out_dtype), lse


def emulated_quantized_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, layout: BlockLayout | None = None,
                                 causal: bool = False, scale: float | None = None, quant: str = "int8",
                                 quant_granularity: str = "per_warp", smooth_k: bool = True,
                                 tile_n: int = 64, smooth_q: bool = True,
                                 balance_qk: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_reference` then :func:`attention_from_quantized` (``layout=None``: dense)."""
    if layout is None:
        from sparseattn.layout.patterns import dense_layout

        B, H = q.shape[:2]
        base = dense_layout(q.shape[2], k.shape[2], block_m=128, block_n=128, causal=causal, device=q.device)
        layout = BlockLayout(base.kv_num_blocks[:1, :1].expand(B, H, -1), base.kv_indices[:1, :1].expand(B, H, -1, -1),
                             128, 128, q.shape[2], k.shape[2], validate=False)
    qq = quantize_reference(q, k, v, quant=quant, quant_granularity=quant_granularity, scale=scale, smooth_k=smooth_k,
                            smooth_q=smooth_q, balance_qk=balance_qk)
    return attention_from_quantized(qq, layout, causal=causal, out_dtype=q.dtype, tile_n=tile_n)
