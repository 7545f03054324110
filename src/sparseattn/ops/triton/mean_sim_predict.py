"""Fused mean-similarity predictor kernels (``@triton.jit`` code only; launcher:
:mod:`sparseattn.predictors.fused_mean_sim`).

Three launches replace the ~60–150 small PyTorch ops of the torch path of
:class:`~sparseattn.predictors.mean_similarity.MeanSimilarityPredictor`:

* :func:`_block_pool_kernel` — one program per (block, head) of q *or* k (one launch for both):
  the block's mean vector (float32) and its self-similarity ``(||Σ x̂_i||² − n) / (n (n − 1))``
  (1 when ``n == 1``); for k with ``MINMAX`` also the per-coordinate key minimum and maximum of the
  block in the same pass (:func:`~sparseattn.predictors._common.block_minmax`: exact, NaN if the
  coordinate holds a NaN). It follows :func:`~sparseattn.predictors._common.block_pool`
  (``normalized=True``) operation by operation: ``inv = 1 / max(||x_i||, 1e-12)`` in float32,
  rounded to the input dtype (so a zero row contributes 0 in float32/bfloat16 and, as in the torch
  path, makes the block NaN in float16, where ``1e12`` overflows), products accumulated in float32,
  the two block sums rounded to the input dtype (what the torch path's matmul in the input dtype
  returns). A block holding NaN/inf gets a NaN similarity (untrusted).
* :func:`_score_kernel` — a tiled GEMM, one program per (tile of query blocks × tile of key blocks,
  head, batch); tiles wholly outside the causal block region return at once. It writes the raw
  block scores of the allowed region only (``j < lim[qb]``):

  - ``mean``: ``scale · q̄·k̄`` into ``P``;
  - ``minmax``: ``scale · (relu(q̄)·kmax + min(q̄, 0)·kmin)`` into ``P`` (the two products summed
    as the torch path's two matmuls are: each accumulated, then added);
  - ``mixed``: the mean scores into ``P`` and the minmax scores, as float32 bit patterns, into the
    ``kv_indices`` buffer (scratch: the select kernel reads a row before it writes the row's indices).

  Products are IEEE float32 (``input_precision="ieee"``: TF32 would change the decisions, and its
  3-pass variant turns an infinite input into NaN instead of ``±inf``).
* :func:`_select_kernel` — one program per (query block, head, batch) row, the whole row of
  ``Nb`` key blocks in registers (a power of two ``RPAD >= Nb``): softmax over the allowed prefix
  (``mixed``: the two softmaxes averaged, ``P = (P_mean + P_minmax) / 2`` as the torch path
  computes it), selection, forced/untrusted blocks, and the
  :class:`~sparseattn.layout.BlockLayout` row itself (``kv_num_blocks`` and ``kv_indices``:
  selected blocks ascending, then the unselected ones ascending — what
  :func:`~sparseattn.predictors._common.mask_to_layout` writes), plus ``P`` for ``last_scores``.
  No dense mask is ever materialised.

Selection without a sort. Probabilities are ``>= 0``, so their float32 bit patterns (as int32)
order like the values. A bisection over the bit pattern (each step one masked reduction over the
row held in registers) finds the pivot value ``v``; it starts from the row's own range (the largest
and smallest allowed probability; for cdf a lower bound ``(total − target) / (4 n)`` below which no
pivot can lie, checked once and dropped when rounding makes it unsafe), so it takes
``ceil(log2(hi − lo + 1))`` steps — about 20–28 rather than 31:

* cdf: ``v`` = the smallest value with ``mass(p > v) < threshold · total``. A block is kept iff
  the mass of the blocks before it in descending order (ties in index order) is below
  ``threshold · total`` and ``p > 0`` — exactly :func:`~sparseattn.predictors._common.select_cdf`:
  every block above ``v`` is kept, and of the blocks equal to ``v`` those whose
  ``mass(p > v) + rank · v`` (rank = position among the ties, by index) is below the threshold.
* topk: ``v`` = the ``k``-th largest value (``k = ceil(fraction · n_allowed − 1e-9)``, at least 1,
  from a table built on the host with the torch path's own function); blocks above ``v`` are kept,
  and the first ``k − #(p > v)`` ties by index — :func:`~sparseattn.predictors._common.select_topk`.

The result equals the torch path's except where float32 summation order (the masses here are tree
reductions, the torch path's a sorted cumulative sum; the pooled sums, dot products and the softmax
differ in rounding too) flips a decision sitting on the threshold.

Non-finite rows behave as in the torch path: a row whose allowed scores hold a NaN, a ``+inf``, or
only ``-inf`` has ``P`` NaN over the whole row (the torch softmax's result; ``mixed``: if either
softmax is); cdf then selects nothing from it and topk the first ``k`` blocks (``torch.sort`` puts
NaN first); the untrusted-block rules (a NaN self-similarity) keep every block a non-finite value
touches. ``relu``/``min(·, 0)`` keep a NaN coordinate NaN (``torch.clamp`` does).

Divisions and the square root are IEEE-rounded (``div_rn``/``sqrt_rn``: Triton's ``/`` is an
approximate division on NVIDIA GPUs); ``tl.exp`` is the GPU's fast exponential (a few ulp from
``expf``), one of the float differences named above.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _round_to_input(x, DTYPE: tl.constexpr):
    """float32 ``x`` rounded to ``DTYPE`` (round to nearest even) and widened back to float32.

    bfloat16 is rounded on the bit pattern: Triton's CPU interpreter truncates on a bfloat16 cast
    (seen with triton 3.9), the GPU rounds to nearest even; this is the GPU's (and torch's) result on both.
    """
    if DTYPE == tl.bfloat16:
        b = x.to(tl.int32, bitcast=True)
        r = (b + 0x7FFF + ((b >> 16) & 1)) & -65536
        y = tl.where(x != x, x, r.to(tl.float32, bitcast=True))
    else:
        y = x.to(DTYPE).to(tl.float32)
    return y


@triton.jit
def _pool_block(
    X, Mean, Sim, KMin, KMax,
    blk, off_h, off_b,
    stride_xb, stride_xh, stride_xn, stride_xd,
    stride_mb, stride_mh, stride_mk, stride_md,
    stride_sb, stride_sh,
    N, D,
    BLOCK: tl.constexpr,
    ROW_CHUNK: tl.constexpr,
    D_PAD: tl.constexpr,
    MINMAX: tl.constexpr,
):
    """Mean, self-similarity (and with ``MINMAX`` the coordinate min/max, same strides as ``Mean``) of one block."""
    start = blk * BLOCK
    n = tl.minimum(N - start, BLOCK)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < D
    offs_r = tl.arange(0, ROW_CHUNK)
    x_base = X + off_b.to(tl.int64) * stride_xb + off_h.to(tl.int64) * stride_xh
    # per-element accumulators, reduced over the rows once after the loop: a reduction across rows
    # (warps) per chunk would cost a shared-memory round trip and barrier per accumulator and chunk
    acc_s = tl.zeros([ROW_CHUNK, D_PAD], dtype=tl.float32)
    acc_u = tl.zeros([ROW_CHUNK, D_PAD], dtype=tl.float32)
    if MINMAX:
        mn2 = tl.full([ROW_CHUNK, D_PAD], float("inf"), dtype=tl.float32)
        mx2 = tl.full([ROW_CHUNK, D_PAD], float("-inf"), dtype=tl.float32)
        nan2 = tl.zeros([ROW_CHUNK, D_PAD], dtype=tl.int32)
    for r0 in range(0, BLOCK, ROW_CHUNK):
        rows = start + r0 + offs_r
        r_ok = ((r0 + offs_r) < BLOCK) & (rows < N)
        x = tl.load(x_base + rows.to(tl.int64)[:, None] * stride_xn + offs_d[None, :] * stride_xd,
                    mask=r_ok[:, None] & d_ok[None, :], other=0.0)
        xf = x.to(tl.float32)
        nrm = tl.sqrt_rn(tl.sum(xf * xf, 1))
        # 1 / clamp_min(norm, 1e-12) (a NaN norm gives 1e12 here and NaN in the torch path: either way
        # the product with the NaN row is NaN), rounded to the input dtype like the torch path's weights
        inv = tl.div_rn(tl.full([ROW_CHUNK], 1.0, tl.float32), tl.where(nrm > 1e-12, nrm, 1e-12))
        inv = tl.where(r_ok, inv, 0.0)  # rows past the block/sequence contribute nothing
        inv = _round_to_input(inv, X.dtype.element_ty)
        acc_s += xf
        acc_u += xf * inv[:, None]
        if MINMAX:
            # the GPU's min/max drop NaN; amin/amax (the torch path) return it: tracked on the side
            mn2 = tl.minimum(mn2, tl.where(r_ok[:, None], xf, float("inf")))
            mx2 = tl.maximum(mx2, tl.where(r_ok[:, None], xf, float("-inf")))
            nan2 = tl.maximum(nan2, (r_ok[:, None] & (xf != xf)).to(tl.int32))
    acc_s = tl.sum(acc_s, 0)
    acc_u = tl.sum(acc_u, 0)
    if MINMAX:
        mn = tl.min(mn2, 0)
        mx = tl.max(mx2, 0)
        nan_any = tl.max(nan2, 0)
    # the torch path's pooling matmul returns the input dtype
    acc_s = _round_to_input(acc_s, X.dtype.element_ty)
    acc_u = _round_to_input(acc_u, X.dtype.element_ty)
    nf = n.to(tl.float32)
    mean = tl.div_rn(acc_s, tl.zeros([D_PAD], dtype=tl.float32) + nf)
    m_off = off_b.to(tl.int64) * stride_mb + off_h.to(tl.int64) * stride_mh + blk.to(tl.int64) * stride_mk \
        + offs_d * stride_md
    tl.store(Mean + m_off, mean, mask=d_ok)
    if MINMAX:
        tl.store(KMin + m_off, tl.where(nan_any > 0, float("nan"), mn), mask=d_ok)
        tl.store(KMax + m_off, tl.where(nan_any > 0, float("nan"), mx), mask=d_ok)
    sq = tl.sum(tl.where(d_ok, acc_u * acc_u, 0.0), 0)
    den = tl.maximum(nf * (nf - 1.0), 1.0)
    sim = tl.where(n > 1, tl.div_rn(sq - nf, den), sq - sq + 1.0)  # sq - sq: 0, or NaN for a non-finite block
    tl.store(Sim + off_b.to(tl.int64) * stride_sb + off_h.to(tl.int64) * stride_sh + blk, sim)


@triton.jit
def _block_pool_kernel(
    Q, K, QMean, QSim, KMean, KSim, KMin, KMax,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_qmb, stride_qmh, stride_qmk, stride_qmd,
    stride_kmb, stride_kmh, stride_kmk, stride_kmd,
    stride_qsb, stride_qsh, stride_ksb, stride_ksh,
    Nq, Nkv, Mb, Nb, H, D,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CHUNK_Q: tl.constexpr,
    CHUNK_K: tl.constexpr,
    D_PAD: tl.constexpr,
    MINMAX: tl.constexpr,
):
    """Programs ``[0, Mb·H)`` pool q blocks, the next ``Nb·H_kv`` pool k blocks (grid ``(Mb·H + Nb·H_kv, B)``).

    ``KMean``/``KMin``/``KMax`` share the strides ``stride_km*`` (the launcher writes them transposed,
    ``(B, H_kv, D, Nb)``).
    """
    pid = tl.program_id(0)
    off_b = tl.program_id(1)
    n_q = Mb * H
    if pid < n_q:
        _pool_block(Q, QMean, QSim, QMean, QMean, pid % Mb, pid // Mb, off_b,
                    stride_qb, stride_qh, stride_qn, stride_qd,
                    stride_qmb, stride_qmh, stride_qmk, stride_qmd, stride_qsb, stride_qsh,
                    Nq, D, BLOCK_M, CHUNK_Q, D_PAD, False)
    else:
        pk = pid - n_q
        _pool_block(K, KMean, KSim, KMin, KMax, pk % Nb, pk // Nb, off_b,
                    stride_kb, stride_kh, stride_kn, stride_kd,
                    stride_kmb, stride_kmh, stride_kmk, stride_kmd, stride_ksb, stride_ksh,
                    Nkv, D, BLOCK_N, CHUNK_K, D_PAD, MINMAX)


@triton.jit
def _score_kernel(
    Qm, Kt, KMinT, KMaxT, Geo, S1, S2,
    H, G, Mb, Nb, D, n_jt,
    scale,
    SCORE: tl.constexpr,
    BLOCK_QB: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
    D_PAD: tl.constexpr,
):
    """Raw block scores of one ``BLOCK_QB × BLOCK_J`` tile of one head (allowed entries only).

    ``SCORE``: 0 mean (into ``S1``), 1 minmax (into ``S1``), 2 mixed (mean into ``S1``, minmax as
    int32 bit patterns into ``S2``). Contiguous buffers: ``Qm`` (B, H, Mb, D), ``Kt``/``KMinT``/
    ``KMaxT`` (B, H_kv, D, Nb) float32; ``Geo`` int32 (Mb, 3); ``S1``/``S2`` (B, H, Mb, Nb).
    """
    pid = tl.program_id(0)
    off_h = tl.program_id(1)
    off_b = tl.program_id(2)
    qt = pid // n_jt
    jt = pid % n_jt
    qb = qt * BLOCK_QB + tl.arange(0, BLOCK_QB)
    j = jt * BLOCK_J + tl.arange(0, BLOCK_J)
    qb_ok = qb < Mb
    lim = tl.load(Geo + qb * 3, mask=qb_ok, other=0)
    if jt * BLOCK_J < tl.max(lim, 0):  # else the tile lies outside the (causal) block region
        Hkv = H // G
        off_hk = off_h // G
        j_ok = j < Nb
        q_base = Qm + ((off_b * H + off_h).to(tl.int64) * Mb + qb)[:, None] * D
        k_off = (off_b * Hkv + off_hk).to(tl.int64) * D * Nb + j[None, :]
        acc_m = tl.zeros([BLOCK_QB, BLOCK_J], dtype=tl.float32)
        acc_hi = tl.zeros([BLOCK_QB, BLOCK_J], dtype=tl.float32)
        acc_lo = tl.zeros([BLOCK_QB, BLOCK_J], dtype=tl.float32)
        for d0 in range(0, D_PAD, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            d_ok = dd < D
            qv = tl.load(q_base + dd[None, :], mask=qb_ok[:, None] & d_ok[None, :], other=0.0)
            k_mask = d_ok[:, None] & j_ok[None, :]
            k_ptr = k_off + dd.to(tl.int64)[:, None] * Nb
            if SCORE != 1:
                kv = tl.load(Kt + k_ptr, mask=k_mask, other=0.0)
                acc_m = tl.dot(qv, kv, acc_m, input_precision="ieee")
            if SCORE != 0:
                # clamp(min=0) / clamp(max=0) as torch computes them: a NaN coordinate stays NaN in both
                q_pos = tl.where(qv < 0.0, 0.0, qv)
                q_neg = tl.where(qv > 0.0, 0.0, qv)
                k_hi = tl.load(KMaxT + k_ptr, mask=k_mask, other=0.0)
                k_lo = tl.load(KMinT + k_ptr, mask=k_mask, other=0.0)
                acc_hi = tl.dot(q_pos, k_hi, acc_hi, input_precision="ieee")
                acc_lo = tl.dot(q_neg, k_lo, acc_lo, input_precision="ieee")
        ok = qb_ok[:, None] & (j[None, :] < lim[:, None])
        off = ((off_b * H + off_h).to(tl.int64) * Mb + qb)[:, None] * Nb + j[None, :]
        if SCORE == 0:
            tl.store(S1 + off, acc_m * scale, mask=ok)
        elif SCORE == 1:
            tl.store(S1 + off, (acc_hi + acc_lo) * scale, mask=ok)
        else:
            tl.store(S1 + off, acc_m * scale, mask=ok)
            tl.store(S2 + off, ((acc_hi + acc_lo) * scale).to(tl.int32, bitcast=True), mask=ok)


@triton.jit
def _softmax_row(s, allowed, lim):
    """Probabilities over the allowed entries (0 elsewhere) and whether the torch softmax gives a NaN row."""
    has_nan = tl.max((allowed & (s != s)).to(tl.int32), 0) > 0
    s_c = tl.where(allowed & (s == s), s, float("-inf"))
    m = tl.max(s_c, 0)
    # the torch softmax gives NaN over the whole row for a NaN score, a +inf maximum, or only -inf scores
    nan_row = (has_nan | (m == float("inf")) | (m == float("-inf"))) & (lim > 0)
    m_safe = tl.where((m == float("inf")) | (m == float("-inf")), 0.0, m)
    e = tl.exp(s_c - m_safe)
    e = tl.where(allowed, e, 0.0)
    denom = tl.sum(e, 0)
    denom = tl.where(denom > 0.0, denom, 1.0)
    p = tl.div_rn(e, tl.zeros_like(e) + denom)
    return p, nan_row


@triton.jit
def _select_kernel(
    S1, QSim, KSim, Geo, P, Num, Idx,
    H, G, Mb, Nb,
    cdf_threshold, sim_threshold, keep_local,
    RPAD: tl.constexpr,
    TOPK: tl.constexpr,
    KEEP_SINK: tl.constexpr,
    CAUSAL: tl.constexpr,
    MIXED: tl.constexpr,
):
    """Softmax, selection and the layout row of one (query block, head, batch) row.

    Reads the raw scores ``S1`` (B, H, Mb, Nb) (``P``'s storage: each row is read whole before it
    is overwritten) and, with ``MIXED``, the minmax scores as bit patterns from ``Idx`` (likewise);
    ``QSim`` (B, H, Mb), ``KSim`` (B, H_kv, Nb), ``Geo`` int32 (Mb, 3) = (allowed prefix length,
    diagonal block, topk count). Writes ``P`` float32, ``Num`` int32 (B, H, Mb), ``Idx`` int32.
    """
    qb = tl.program_id(0)
    off_h = tl.program_id(1)
    off_b = tl.program_id(2)
    Hkv = H // G
    off_hk = off_h // G
    row = (off_b * H + off_h).to(tl.int64) * Mb + qb
    j = tl.arange(0, RPAD)
    col_ok = j < Nb
    lim = tl.load(Geo + qb * 3)
    diag = tl.load(Geo + qb * 3 + 1)
    kcount = tl.load(Geo + qb * 3 + 2)
    allowed = j < lim
    row_ptr = row * Nb + j

    # ---------------------------------------------------------------- softmax over the allowed prefix
    s = tl.load(S1 + row_ptr, mask=allowed, other=float("-inf"))
    p, nan_row = _softmax_row(s, allowed, lim)
    if MIXED:
        s2 = tl.load(Idx + row_ptr, mask=allowed, other=0).to(tl.float32, bitcast=True)
        p2, nan2 = _softmax_row(s2, allowed, lim)
        p = 0.5 * (p + p2)  # as the torch path: 0.5 * (P_mean + P_minmax)
        nan_row = nan_row | nan2
    p = tl.where(nan_row, 0.0, p)

    # ---------------------------------------------------------------- selection: bisection on the bit pattern
    bits = p.to(tl.int32, bitcast=True)
    u = tl.where(allowed, bits, -1)  # p >= 0, so the int32 bits order like the values; -1 = not a candidate
    hi = tl.max(u, 0)
    hi = tl.maximum(hi, 0)
    if TOPK:
        # largest v with #(p >= v) >= k: the k-th largest value, in [min allowed, max allowed]
        lo = tl.min(tl.where(allowed, bits, 0x7F800000), 0)
        lo = tl.minimum(lo, hi)
        while lo < hi:
            mid = lo + (hi - lo + 1) // 2
            cnt = tl.sum((u >= mid).to(tl.int32), 0)
            ok = cnt >= kcount
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid - 1)
    else:
        total = tl.sum(p, 0)
        target = cdf_threshold * total
        # smallest v with mass(p > v) < threshold * total; no v below (total - target) / n can qualify
        # (the blocks at or below v hold at most n * v); a quarter of it leaves room for rounding, and
        # the bound is checked once (and dropped) for thresholds so close to 1 that rounding matters
        n_f = tl.maximum(lim, 1).to(tl.float32)
        bound = tl.div_rn(total - target, n_f * 4.0)
        bound = tl.where(bound > 0.0, bound, 0.0)
        lo = tl.minimum(bound.to(tl.int32, bitcast=True), hi)
        lo_ok = tl.sum(tl.where(u > lo, p, 0.0), 0) < target
        lo = tl.where(lo_ok, 0, lo)
        while lo < hi:
            mid = lo + (hi - lo) // 2
            mass = tl.sum(tl.where(u > mid, p, 0.0), 0)
            ok = mass < target
            hi = tl.where(ok, mid, hi)
            lo = tl.where(ok, lo, mid + 1)
    piv = lo
    above = u > piv
    tie = u == piv
    tie_i = tie.to(tl.int32)
    rank = tl.cumsum(tie_i, 0) - tie_i  # position among the ties, in index order
    if TOPK:
        n_above = tl.sum(above.to(tl.int32), 0)
        sel = above | (tie & (rank < (kcount - n_above)))
        sel = tl.where(nan_row, allowed & (j < kcount), sel)
    else:
        mass_above = tl.sum(tl.where(above, p, 0.0), 0)
        piv_val = piv.to(tl.float32, bitcast=True)
        tie_ok = (mass_above + rank.to(tl.float32) * piv_val) < target
        sel = (above | (tie & tie_ok)) & (u > 0)
        sel = sel & (nan_row == 0)

    # ---------------------------------------------------------------- forced and untrusted blocks
    forced = (j <= diag) & (j > diag - keep_local)  # the diagonal block and keep_local - 1 before it
    if not CAUSAL:
        forced = forced | ((j > diag) & (j < diag + keep_local))
    if KEEP_SINK:
        forced = forced | (j == 0)
    qs = tl.load(QSim + row)
    ks = tl.load(KSim + (off_b * Hkv + off_hk).to(tl.int64) * Nb + j, mask=col_ok, other=1.0)
    # not (sim >= t): a NaN similarity (non-finite block) is untrusted
    untrusted_q = (qs >= sim_threshold) == 0
    untrusted_k = (ks >= sim_threshold) == 0
    keep = (sel | forced | untrusted_q | untrusted_k) & allowed

    # ---------------------------------------------------------------- outputs
    # every store depends on whole-row reductions of the loaded row, so the row is read before it is written
    p_out = tl.where(nan_row, float("nan"), p)
    tl.store(P + row_ptr, p_out, mask=col_ok)
    keep_i = keep.to(tl.int32)
    rest_i = (col_ok & (keep == 0)).to(tl.int32)
    num = tl.sum(keep_i, 0)
    pos_sel = tl.cumsum(keep_i, 0) - 1
    pos_rest = num + tl.cumsum(rest_i, 0) - 1
    pos = tl.where(keep, pos_sel, pos_rest)
    tl.store(Num + row, num)
    tl.store(Idx + row * Nb + pos, j, mask=col_ok)
