"""Triton quantization kernels for :mod:`sparseattn.ops.quant` (``@triton.jit`` code only).

Four kernels; the three that read the bf16/fp16 inputs read them once:

* :func:`_kv_stats_kernel` — per chunk of ``STEPS * R`` tokens of one (batch, kv head): the sum over tokens of
  the *finite* entries of K per channel (for the smoothing mean) and, for the FP8 P·V path, the max
  of ``|v|`` over the finite entries of V per channel. Partial results per chunk, added up by the next kernel
  (deterministic, no atomics); long inputs give each program several ``R``-row tiles (``STEPS``).
* :func:`_qk_finalize_kernel` — one program per (batch, kv head) and 32, 16 or 8 channels finishes what the chunks left: K's
  and Q's means, and the Q/K balancing factors from the channel ranges (:func:`sparseattn.ops.quant.balance_scales`'s
  arithmetic, with IEEE division and square root), in one launch instead of a few dozen small PyTorch operations.
* :func:`_quant_rows_kernel` — INT8 quantization of (smoothed) Q or (smoothed) K with one scale per *group*
  of rows (see :mod:`sparseattn.ops.quant` for the groups: block, warp, thread, token). ``R`` rows of one
  head are loaded as a ``[G, M, D]`` tile whose first axis *is* the group (rows gathered by index), so a
  group's max is a plain reduction and interleaved (per-thread) groups need no reshape. With Q smoothing
  (``HAS_QMEAN``) the K launch also writes, per key and query head of the KV head, the fp32 product of
  Q's token mean with the smoothed key (``k_bias``, in the scores' log2 units), and the Q launch
  quantizes ``q - mean``. With Q/K balancing (``HAS_CH``) both launches multiply what they quantize by a
  per-channel factor (``1 / alpha`` for Q, ``alpha`` for K). The means, and the channel max / min the
  factors come from, are :func:`_kv_stats_kernel`'s (run on Q as well).
* :func:`_quant_v_fp8_kernel` — V scaled per channel into FP8 e4m3, stored transposed
  (``[D, N_pad]`` per head, tokens contiguous: the K-major B operand FP8 MMAs want).

Rounding (mirrored exactly by :mod:`sparseattn.ops.quant_reference`):

* INT8: ``inv = div_rn(127, amax)`` (IEEE division), ``y = x * inv``, ``q = trunc(y + 0.5 * sign(y))``
  clamped to ``[-127, 127]`` (round half away from zero); the stored scale is ``amax / 127``
  (IEEE division), for Q multiplied by ``sm_scale * log2(e)``. ``amax`` is over finite entries;
  an all-zero group gets ``amax = 1``.
* FP8: ``x * div_rn(448, amax_d)`` rounded to e4m3 (nearest even, saturating at 448); scale
  ``amax_d / 448``. Under the interpreter (``FP8_EMU``) the e4m3 rounding is done in fp32
  arithmetic (:func:`e4m3_round`) and stored in a bf16 buffer (every e4m3 value is a bf16 value).

Non-finite inputs: a non-finite entry is quantized as 0 and flagged. Q: the row's ``qrow`` entry
(``q·k_mean * sm_scale``, added to the lse) becomes NaN, which the attention kernel turns into a
NaN row. K: the group's scale becomes NaN (every score of that group is NaN). V (FP8): the entry
becomes an FP8 NaN.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def e4m3_round(x):
    """Round fp32 ``x`` to the nearest FP8 e4m3 (fn) value, ties to even, saturating at ±448; NaN stays NaN.

    Pure fp32/int32 arithmetic (exponent from the bit pattern; ``+/- 1.5 * 2**23`` rounds to the
    nearest integer, ties to even), so it runs in the interpreter and matches ``torch.float8_e4m3fn``
    conversion for every finite ``|x| <= 448``.
    """
    bits = x.to(tl.int32, bitcast=True)
    e = (bits >> 23) & 0xFF  # biased exponent
    e = tl.maximum(e, 127 - 6)  # subnormal range of e4m3: quantum 2**-9
    # quantum = 2**(e - 127 - 3), built from bits
    quantum = ((e - 3) << 23).to(tl.float32, bitcast=True)
    y = x / quantum  # exact: division by a power of two
    magic = 12582912.0  # 1.5 * 2**23
    r = (y + magic) - magic
    r = r * quantum
    r = tl.minimum(tl.maximum(r, -448.0), 448.0)
    return tl.where(x != x, x, r)


@triton.jit
def _kv_stats_kernel(
    K, V, KSum, VMax, KMax, KMin,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    HKV, N, N_CHUNKS, STEPS,
    HEAD_DIM: tl.constexpr, R: tl.constexpr, NEED_K: tl.constexpr, NEED_V: tl.constexpr,
    NEED_RANGE: tl.constexpr = False,
):
    """Partial per-channel sums of finite K and max |finite V| over ``STEPS * R`` tokens (``STEPS`` tiles of ``R``
    rows, one after the other): ``[B*HKV, N_CHUNKS, D]``; with ``NEED_RANGE`` also the max and min of the finite K
    entries (``-inf`` / ``+inf`` where a chunk has none). The tiles are folded element-wise into ``[R, D]``
    accumulators and reduced over the rows once at the end: a reduction per tile (across warps, through shared
    memory) made the kernel run at about 40% of an H100's bandwidth."""
    pid_c = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HKV
    h = pid_bh % HKV
    offs_d = tl.arange(0, HEAD_DIM)
    out_off = (pid_bh.to(tl.int64) * N_CHUNKS + pid_c) * HEAD_DIM + offs_d
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    ksum = tl.zeros([R, HEAD_DIM], dtype=tl.float32)
    kmax = tl.full([R, HEAD_DIM], float("-inf"), tl.float32)
    kmin = tl.full([R, HEAD_DIM], float("inf"), tl.float32)
    vmax = tl.zeros([R, HEAD_DIM], dtype=tl.float32)
    for step in range(0, STEPS):
        rows = (pid_c * STEPS + step) * R + tl.arange(0, R)
        ok = rows[:, None] < N
        if NEED_K:
            k = tl.load(k_base + rows[:, None].to(tl.int64) * stride_kn + offs_d[None, :], mask=ok,
                        other=0.0).to(tl.float32)
            fin = tl.abs(k) < float("inf")  # False for NaN and +-inf
            ksum += tl.where(fin, k, 0.0)
            if NEED_RANGE:
                live = fin & ok
                kmax = tl.maximum(kmax, tl.where(live, k, float("-inf")))
                kmin = tl.minimum(kmin, tl.where(live, k, float("inf")))
        if NEED_V:
            v = tl.load(v_base + rows[:, None].to(tl.int64) * stride_vn + offs_d[None, :], mask=ok,
                        other=0.0).to(tl.float32)
            av = tl.abs(v)
            vmax = tl.maximum(vmax, tl.where(av < float("inf"), av, 0.0))
    if NEED_K:
        tl.store(KSum + out_off, tl.sum(ksum, 0))
        if NEED_RANGE:
            tl.store(KMax + out_off, tl.max(kmax, 0))
            tl.store(KMin + out_off, tl.min(kmin, 0))
    if NEED_V:
        tl.store(VMax + out_off, tl.max(vmax, 0))


@triton.jit
def _chunk_stats(Sum, Max, Min, row, NC, offs_d, HEAD_DIM: tl.constexpr, DB: tl.constexpr, CH: tl.constexpr,
                 NEED_SUM: tl.constexpr, NEED_RANGE: tl.constexpr):
    """Per channel ``offs_d`` (``DB`` of them) over the ``NC`` chunk partials of one row of ``[rows, NC, HEAD_DIM]``:
    the sum (``NEED_SUM``) and the max / min (``NEED_RANGE``; ``-inf`` / ``+inf`` where no chunk has a finite
    entry)."""
    offs_c = tl.arange(0, CH)
    base = row.to(tl.int64) * NC * HEAD_DIM
    tot = tl.zeros([DB], dtype=tl.float32)
    mx = tl.full([DB], float("-inf"), tl.float32)
    mn = tl.full([DB], float("inf"), tl.float32)
    for c0 in range(0, NC, CH):
        ok = (c0 + offs_c)[:, None] < NC
        off = base + (c0 + offs_c)[:, None].to(tl.int64) * HEAD_DIM + offs_d[None, :]
        if NEED_SUM:
            tot += tl.sum(tl.load(Sum + off, mask=ok, other=0.0), 0)
        if NEED_RANGE:
            mx = tl.maximum(mx, tl.max(tl.load(Max + off, mask=ok, other=float("-inf")), 0))
            mn = tl.minimum(mn, tl.min(tl.load(Min + off, mask=ok, other=float("inf")), 0))
    return tot, mx, mn


@triton.jit
def _channel_range(mx, mn, mean, SMOOTH: tl.constexpr):
    """``max |x - mean|`` over the finite entries from their max and min (``max |x|`` without smoothing)."""
    if SMOOTH:
        return tl.maximum(mx - mean, mean - mn)
    return tl.maximum(mx, -mn)


@triton.jit
def _qk_finalize_kernel(
    KSum, KMax, KMin, QSum, QMax, QMin, KMean, QMean, ChQ, ChK,
    GROUP, NC_K, NC_Q, n_kv, n_q,
    HEAD_DIM: tl.constexpr, DB: tl.constexpr, CH: tl.constexpr,
    SMOOTH_K: tl.constexpr, SMOOTH_Q: tl.constexpr, BALANCE: tl.constexpr,
):
    """Per (batch, kv head): the statistics :func:`_kv_stats_kernel` left per chunk, finished in one launch.

    ``KMean = sum(KSum) / n_kv`` (zeros without ``SMOOTH_K``), ``QMean[h] = sum(QSum[h]) / n_q`` for the ``GROUP`` query
    heads of this KV head (``SMOOTH_Q``), and with ``BALANCE`` the channel factors of
    :func:`sparseattn.ops.quant.balance_scales` from the (smoothed) ranges ``max(max - mean, mean - min)``:
    ``alpha = sqrt_rn(div_rn(max_h qrange_h, krange))`` where both ranges are finite and positive, else 1;
    ``ChQ = div_rn(1, alpha)``, ``ChK = alpha`` (IEEE division and square root: the same bits as the PyTorch ops).
    Chunk partials are ``[rows, NC, HEAD_DIM]`` float32, rows ``b * H_kv + h`` for K and ``b * H + h`` for Q. Grid
    ``(B * H_kv, HEAD_DIM // DB)``: each program finishes ``DB`` channels.
    """
    pid = tl.program_id(0)  # b * H_kv + h
    offs_d = tl.program_id(1) * DB + tl.arange(0, DB)
    inf = float("inf")
    one = tl.full([DB], 1.0, tl.float32)
    ksum, kmax, kmin = _chunk_stats(KSum, KMax, KMin, pid, NC_K, offs_d, HEAD_DIM, DB, CH, SMOOTH_K, BALANCE)
    kmean = tl.math.div_rn(ksum, one * n_kv) if SMOOTH_K else tl.zeros([DB], dtype=tl.float32)
    tl.store(KMean + pid.to(tl.int64) * HEAD_DIM + offs_d, kmean)
    # a sum that overflowed makes a mean infinite: PyTorch's ranges are then NaN, which its isfinite test refuses;
    # tl.maximum may drop a NaN, so the finite means are required explicitly
    means_ok = tl.abs(kmean) < inf
    qr = tl.full([DB], float("-inf"), tl.float32)
    for g in range(0, GROUP):
        hq = pid * GROUP + g  # = b * H + h_kv * GROUP + g
        qsum, qmax, qmin = _chunk_stats(QSum, QMax, QMin, hq, NC_Q, offs_d, HEAD_DIM, DB, CH, SMOOTH_Q, BALANCE)
        qmean = tl.math.div_rn(qsum, one * n_q)
        if SMOOTH_Q:
            tl.store(QMean + hq.to(tl.int64) * HEAD_DIM + offs_d, qmean)
            means_ok = means_ok & (tl.abs(qmean) < inf)
        qr = tl.maximum(qr, _channel_range(qmax, qmin, qmean, SMOOTH_Q))
    if BALANCE:
        kr = _channel_range(kmax, kmin, kmean, SMOOTH_K)
        ok = means_ok & (qr > 0.0) & (kr > 0.0) & (tl.abs(qr) < inf) & (tl.abs(kr) < inf)
        alpha = tl.where(ok, tl.math.sqrt_rn(tl.math.div_rn(tl.where(ok, qr, one), tl.where(ok, kr, one))), one)
        tl.store(ChQ + pid.to(tl.int64) * HEAD_DIM + offs_d, tl.math.div_rn(one, alpha))
        tl.store(ChK + pid.to(tl.int64) * HEAD_DIM + offs_d, alpha)


@triton.jit
def _quant_rows_kernel(
    X, Xq, Scale, Mean, RowOut, QMean, KBias, ChScale,
    stride_xb, stride_xh, stride_xn,
    stride_ob, stride_oh, stride_on,
    stride_sb, stride_sh,
    stride_mb, stride_mh,
    stride_rb, stride_rh,
    stride_qmb, stride_qmh,
    stride_kbb, stride_kbh,
    stride_cb, stride_ch,
    H, GROUP, GROUP_Q, N, N_GROUPS, out_mult, bias_mult,
    HEAD_DIM: tl.constexpr,
    R: tl.constexpr,  # rows per program (a multiple of W)
    W: tl.constexpr,  # rows per slice (block / warp)
    T: tl.constexpr,  # groups per slice (1, or interleaved per-thread groups)
    S: tl.constexpr,  # consecutive rows of one group within a period of T * S rows
    IS_Q: tl.constexpr,  # Q: write RowOut = sm_scale * q.mean (NaN for a non-finite row); K: subtract Mean
    HAS_MEAN: tl.constexpr,
    HAS_QMEAN: tl.constexpr = False,  # Q smoothing: Q quantizes q - QMean[h]; K writes KBias for its GROUP_Q heads
    HAS_CH: tl.constexpr = False,  # Q/K channel balancing: multiply what is quantized by ChScale[b, h // GROUP, :]
):
    """INT8 per-group quantization of ``R`` rows of one head of ``X`` (see the module docstring)."""
    G: tl.constexpr = (R // W) * T  # groups in this program
    M: tl.constexpr = W // T  # rows per group
    pid_c = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    g = tl.arange(0, G)
    i = tl.arange(0, M)
    slc = g // T
    t = g % T
    # row of member i of group g (within this program's R rows)
    local = slc[:, None] * W + (i[None, :] // S) * (T * S) + t[:, None] * S + (i[None, :] % S)
    rows = pid_c * R + local  # [G, M]
    offs_d = tl.arange(0, HEAD_DIM)
    ok = rows < N
    rows3 = rows[:, :, None].to(tl.int64)
    x = tl.load(X + b.to(tl.int64) * stride_xb + h.to(tl.int64) * stride_xh + rows3 * stride_xn + offs_d[None, None, :],
                mask=ok[:, :, None], other=0.0).to(tl.float32)
    if HAS_MEAN:
        hm = h // GROUP  # kv head of this head (K: GROUP = 1)
        mean = tl.load(Mean + b.to(tl.int64) * stride_mb + hm.to(tl.int64) * stride_mh + offs_d)
        if not IS_Q:
            x = x - mean[None, None, :]
    fin = tl.abs(x) < float("inf")
    # rows past N (loaded as 0, then shifted by a mean) must not reach a group's max
    xf = tl.where(fin & ok[:, :, None], x, 0.0)
    bad_row = tl.sum((~fin).to(tl.int32), 2) > 0  # [G, M]
    xs = xf  # what is quantized
    if HAS_QMEAN:
        if IS_Q:  # Q smoothing: quantize q - mean_tokens(q) (non-finite entries stay 0; their row is flagged)
            qm = tl.load(QMean + b.to(tl.int64) * stride_qmb + h.to(tl.int64) * stride_qmh + offs_d)
            xs = tl.where(fin & ok[:, :, None], x - qm[None, None, :], 0.0)
        else:  # the smoothed Q's mean times each (smoothed) key, for every query head of this KV head
            for gq in range(0, GROUP_Q):
                hq = h * GROUP_Q + gq
                qm = tl.load(QMean + b.to(tl.int64) * stride_qmb + hq.to(tl.int64) * stride_qmh + offs_d)
                kbias = tl.sum(xf * qm[None, None, :], 2) * bias_mult
                tl.store(KBias + b.to(tl.int64) * stride_kbb + hq.to(tl.int64) * stride_kbh + rows, kbias, mask=ok)
    if HAS_CH:  # Q: 1 / alpha, K: alpha per channel (exact for q . k); kbias and the lse term use unscaled values
        chs = tl.load(ChScale + b.to(tl.int64) * stride_cb + (h // GROUP).to(tl.int64) * stride_ch + offs_d)
        xs = xs * chs[None, None, :]
    amax = tl.max(tl.max(tl.abs(xs), 2), 1)  # [G]
    amax = tl.where(amax > 0.0, amax, 1.0)
    inv = tl.math.div_rn(tl.full([G], 127.0, tl.float32), amax)
    y = xs * inv[:, None, None]
    y = y + tl.where(y >= 0.0, 0.5, -0.5)
    y = tl.minimum(tl.maximum(y, -127.0), 127.0)
    xq = y.to(tl.int8)  # truncation toward zero
    tl.store(Xq + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + rows3 * stride_on + offs_d[None, None, :], xq,
             mask=ok[:, :, None])
    scale = tl.math.div_rn(amax, tl.full([G], 127.0, tl.float32)) * out_mult
    if not IS_Q:
        bad_g = tl.max(bad_row.to(tl.int32), 1) > 0
        scale = tl.where(bad_g, float("nan"), scale)
    gid = pid_c * G + g
    tl.store(Scale + b.to(tl.int64) * stride_sb + h.to(tl.int64) * stride_sh + gid, scale, mask=gid < N_GROUPS)
    if IS_Q:
        # natural-log lse correction of the smoothing: sm_scale * q_i . k_mean (0 without smoothing);
        # NaN marks a row with a non-finite entry (the attention kernel makes that row NaN)
        if HAS_MEAN:
            corr = tl.sum(xf * mean[None, None, :], 2) * (out_mult * 0.6931471805599453)
        else:
            corr = tl.zeros([G, M], dtype=tl.float32)
        corr = tl.where(bad_row, float("nan"), corr)
        tl.store(RowOut + b.to(tl.int64) * stride_rb + h.to(tl.int64) * stride_rh + rows, corr, mask=ok)


@triton.jit
def _quant_v_fp8_kernel(
    V, Vq, VScaleInv,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_od,
    HKV, N,
    HEAD_DIM: tl.constexpr, R: tl.constexpr, FP8_EMU: tl.constexpr,
):
    """``Vq[b, h, d, n] = e4m3(v[b, h, n, d] * inv_d)`` (NaN for a non-finite entry), transposed store."""
    pid_c = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HKV
    h = pid_bh % HKV
    rows = pid_c * R + tl.arange(0, R)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = rows[:, None] < N
    v = tl.load(V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh + rows[:, None].to(tl.int64) * stride_vn
                + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
    inv = tl.load(VScaleInv + pid_bh.to(tl.int64) * HEAD_DIM + offs_d)
    y = v * inv[None, :]
    y = tl.where(tl.abs(v) < float("inf"), y, float("nan"))
    if FP8_EMU:
        yq = e4m3_round(y)
    else:
        y = tl.minimum(tl.maximum(y, -448.0), 448.0)
        yq = tl.where(tl.abs(v) < float("inf"), y, float("nan"))  # min/max may drop a NaN: set it again
    tl.store(Vq + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + offs_d[None, :].to(tl.int64) * stride_od
             + rows[:, None], yq.to(Vq.dtype.element_ty), mask=ok)
