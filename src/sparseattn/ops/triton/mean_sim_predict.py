"""Fused mean-similarity predictor kernels (``@triton.jit`` code only; launcher:
:mod:`sparseattn.predictors.fused_mean_sim`).

Two kernels replace the ~60–150 small PyTorch ops of the torch path of
:class:`~sparseattn.predictors.mean_similarity.MeanSimilarityPredictor`:

* :func:`_block_pool_kernel` — one program per (block, head, batch) of ``x`` ``(B, Hx, N, D)``
  (any strides): the block's mean vector (float32) and its self-similarity
  ``(||Σ x̂_i||² − n) / (n (n − 1))`` (1 when ``n == 1``), launched once for q and once for k.
  It follows :func:`~sparseattn.predictors._common.block_pool` (``normalized=True``) operation
  by operation: ``inv = 1 / max(||x_i||, 1e-12)`` in float32, rounded to the input dtype (so a zero
  row contributes 0 in float32/bfloat16 and, as in the torch path, makes the block NaN in float16,
  where ``1e12`` overflows), products accumulated in float32, the two block sums rounded to the
  input dtype (what the torch path's matmul in the input dtype returns). A block holding NaN/inf
  gets a NaN similarity (untrusted).
* :func:`_score_select_kernel` — one program per (query block, batch × KV head, group of query
  heads of that KV head): the rows of one program are query heads sharing a KV head (GQA), so the
  pooled keys are read once per program. Per row: scores ``scale · q̄·k̄_j`` over the allowed key
  blocks (a prefix ``j < lim[qb]`` of the row: the causal block region), softmax, selection,
  forced/untrusted blocks, and the :class:`~sparseattn.layout.BlockLayout` row itself
  (``kv_num_blocks`` and ``kv_indices``: selected blocks ascending, then the unselected ones
  ascending — what :func:`~sparseattn.predictors._common.mask_to_layout` writes), plus the
  probabilities ``P`` for ``last_scores``. No dense mask is ever materialised.

Selection without a sort. Probabilities are ``>= 0``, so their float32 bit patterns (as int32)
order like the values. A bisection over the bit pattern (31 steps, each one masked reduction over
the row held in registers) finds the pivot value ``v``:

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
only ``-inf`` has ``P`` NaN over the whole row (the torch softmax's result); cdf then selects nothing
from it and topk the first ``k`` blocks (``torch.sort`` puts NaN first); the untrusted-block rules
(a NaN self-similarity) keep every block a non-finite value touches.

Ranks (ties, layout positions) use ``tl.cumsum`` over the row; everything else is elementwise or a
plain reduction. Row length is a power-of-two ``RPAD >= Nb`` held in registers (the launcher bounds
``ROWS · RPAD``). Divisions and the square root are IEEE-rounded (``div_rn``/``sqrt_rn``: Triton's
``/`` is an approximate division on NVIDIA GPUs); ``tl.exp`` is the GPU's fast exponential (a few
ulp from ``expf``), one of the float differences named above.
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
def _block_pool_kernel(
    X, Mean, Sim,
    stride_xb, stride_xh, stride_xn, stride_xd,
    stride_mb, stride_mh, stride_mk, stride_md,
    stride_sb, stride_sh,
    N, D,
    BLOCK: tl.constexpr,
    ROW_CHUNK: tl.constexpr,
    D_PAD: tl.constexpr,
):
    blk = tl.program_id(0)
    off_h = tl.program_id(1)
    off_b = tl.program_id(2)
    start = blk * BLOCK
    n = tl.minimum(N - start, BLOCK)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < D
    offs_r = tl.arange(0, ROW_CHUNK)
    x_base = X + off_b.to(tl.int64) * stride_xb + off_h.to(tl.int64) * stride_xh
    acc_s = tl.zeros([D_PAD], dtype=tl.float32)
    acc_u = tl.zeros([D_PAD], dtype=tl.float32)
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
        acc_s += tl.sum(xf, 0)
        acc_u += tl.sum(xf * inv[:, None], 0)
    # the torch path's pooling matmul returns the input dtype
    acc_s = _round_to_input(acc_s, X.dtype.element_ty)
    acc_u = _round_to_input(acc_u, X.dtype.element_ty)
    nf = n.to(tl.float32)
    mean = tl.div_rn(acc_s, tl.zeros([D_PAD], dtype=tl.float32) + nf)
    m_base = Mean + off_b.to(tl.int64) * stride_mb + off_h.to(tl.int64) * stride_mh + blk.to(tl.int64) * stride_mk
    tl.store(m_base + offs_d * stride_md, mean, mask=d_ok)
    sq = tl.sum(tl.where(d_ok, acc_u * acc_u, 0.0), 0)
    den = tl.maximum(nf * (nf - 1.0), 1.0)
    sim = tl.where(n > 1, tl.div_rn(sq - nf, den), sq - sq + 1.0)  # sq - sq: 0, or NaN for a non-finite block
    tl.store(Sim + off_b.to(tl.int64) * stride_sb + off_h.to(tl.int64) * stride_sh + blk, sim)


@triton.jit
def _score_select_kernel(
    Qm, Kt, QSim, KSim, Geo, P, Num, Idx,
    H, G, Mb, Nb, D,
    scale, cdf_threshold, sim_threshold, keep_local,
    ROWS: tl.constexpr,
    RPAD: tl.constexpr,
    TOPK: tl.constexpr,
    KEEP_SINK: tl.constexpr,
    CAUSAL: tl.constexpr,
    D_UNROLL: tl.constexpr = 4,
):
    """Scores, softmax, selection and layout rows for ``ROWS`` query heads of one KV head and query block.

    Contiguous buffers: ``Qm`` (B, H, Mb, D) and ``Kt`` (B, H_kv, D, Nb) float32 block means (keys
    transposed so a coordinate's row over the key blocks is one coalesced load), ``QSim`` (B, H, Mb),
    ``KSim`` (B, H_kv, Nb), ``Geo`` int32 (Mb, 3) = (allowed prefix length, diagonal block, topk count);
    outputs ``P`` float32 (B, H, Mb, Nb), ``Num`` int32 (B, H, Mb), ``Idx`` int32 (B, H, Mb, Nb).
    """
    qb = tl.program_id(0)
    pid_bk = tl.program_id(1)
    g0 = tl.program_id(2) * ROWS
    Hkv = H // G
    off_b = pid_bk // Hkv
    off_hk = pid_bk % Hkv

    offs_r = tl.arange(0, ROWS)
    g = g0 + offs_r
    row_ok = g < G
    heads = off_hk * G + g
    rows = (off_b * H + heads).to(tl.int64) * Mb + qb  # [ROWS] flat (b, h, qb) row ids
    j = tl.arange(0, RPAD)
    col_ok = j < Nb

    lim = tl.load(Geo + qb * 3)
    diag = tl.load(Geo + qb * 3 + 1)
    kcount = tl.load(Geo + qb * 3 + 2)
    in_lim = j < lim
    allowed = row_ok[:, None] & in_lim[None, :]

    # ---------------------------------------------------------------- scores: rank-1 updates over D
    acc = tl.zeros([ROWS, RPAD], dtype=tl.float32)
    q_ptr = Qm + rows * D
    k_ptr = Kt + (off_b * Hkv + off_hk).to(tl.int64) * D * Nb + j
    for d0 in range(0, D, D_UNROLL):
        # D_UNROLL independent loads per iteration, so their latencies overlap
        for dd in tl.static_range(D_UNROLL):
            d = d0 + dd
            qd = tl.load(q_ptr + d, mask=row_ok & ((offs_r * 0 + d) < D), other=0.0)
            kd = tl.load(k_ptr + d * Nb, mask=in_lim & ((j * 0 + d) < D), other=0.0)
            acc += qd[:, None] * kd[None, :]
    s = acc * scale

    # ---------------------------------------------------------------- softmax over the allowed prefix
    has_nan = tl.max((allowed & (s != s)).to(tl.int32), 1) > 0
    s_c = tl.where(allowed & (s == s), s, float("-inf"))
    m = tl.max(s_c, 1)
    # the torch softmax gives NaN over the whole row for a NaN score, a +inf maximum, or only -inf scores
    nan_row = (has_nan | (m == float("inf")) | (m == float("-inf"))) & (lim > 0)
    m_safe = tl.where((m == float("inf")) | (m == float("-inf")), 0.0, m)
    e = tl.exp(s_c - m_safe[:, None])
    e = tl.where(allowed, e, 0.0)
    denom = tl.sum(e, 1)
    denom = tl.where(denom > 0.0, denom, 1.0)
    p = tl.div_rn(e, tl.zeros([ROWS, RPAD], dtype=tl.float32) + denom[:, None])
    p = tl.where(nan_row[:, None], 0.0, p)

    # ---------------------------------------------------------------- selection: bisection on the bit pattern
    bits = p.to(tl.int32, bitcast=True)
    u = tl.where(allowed, bits, -1)  # p >= 0, so the int32 bits order like the values; -1 = not a candidate
    lo = tl.zeros([ROWS], dtype=tl.int32)
    hi = tl.full([ROWS], 0x7F800000, dtype=tl.int32)  # bits of +inf: above every probability
    if TOPK:
        # largest v with #(p >= v) >= k: the k-th largest value
        for _ in range(0, 31):
            mid = lo + (hi - lo + 1) // 2
            cnt = tl.sum((u >= mid[:, None]).to(tl.int32), 1)
            ok = cnt >= kcount
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid - 1)
    else:
        total = tl.sum(p, 1)
        target = cdf_threshold * total
        # smallest v with mass(p > v) < threshold * total
        for _ in range(0, 31):
            mid = lo + (hi - lo) // 2
            mass = tl.sum(tl.where(u > mid[:, None], p, 0.0), 1)
            ok = mass < target
            hi = tl.where(ok, mid, hi)
            lo = tl.where(ok, lo, mid + 1)
    piv = lo
    above = u > piv[:, None]
    tie = u == piv[:, None]
    tie_i = tie.to(tl.int32)
    rank = tl.cumsum(tie_i, 1) - tie_i  # position among the ties, in index order
    if TOPK:
        n_above = tl.sum(above.to(tl.int32), 1)
        sel = above | (tie & (rank < (kcount - n_above)[:, None]))
        sel = tl.where(nan_row[:, None], in_lim[None, :] & (j < kcount)[None, :], sel)
    else:
        mass_above = tl.sum(tl.where(above, p, 0.0), 1)
        piv_val = piv.to(tl.float32, bitcast=True)
        tie_ok = (mass_above[:, None] + rank.to(tl.float32) * piv_val[:, None]) < target[:, None]
        sel = (above | (tie & tie_ok)) & (u > 0)
        sel = sel & (nan_row[:, None] == 0)

    # ---------------------------------------------------------------- forced and untrusted blocks
    forced = (j <= diag) & (j > diag - keep_local)  # the diagonal block and keep_local - 1 before it
    if not CAUSAL:
        forced = forced | ((j > diag) & (j < diag + keep_local))
    if KEEP_SINK:
        forced = forced | (j == 0)
    qs = tl.load(QSim + rows, mask=row_ok, other=1.0)
    ks = tl.load(KSim + (off_b * Hkv + off_hk).to(tl.int64) * Nb + j, mask=col_ok, other=1.0)
    # not (sim >= t): a NaN similarity (non-finite block) is untrusted
    untrusted_q = (qs >= sim_threshold) == 0
    untrusted_k = (ks >= sim_threshold) == 0
    keep = sel | forced[None, :] | untrusted_q[:, None] | untrusted_k[None, :]
    keep = keep & allowed

    # ---------------------------------------------------------------- outputs
    out_ok = row_ok[:, None] & col_ok[None, :]
    p_out = tl.where(nan_row[:, None], float("nan"), p)
    row_off = rows[:, None] * Nb
    tl.store(P + row_off + j[None, :], p_out, mask=out_ok)
    keep_i = keep.to(tl.int32)
    rest_i = (out_ok & (keep == 0)).to(tl.int32)
    num = tl.sum(keep_i, 1)
    pos_sel = tl.cumsum(keep_i, 1) - 1
    pos_rest = num[:, None] + tl.cumsum(rest_i, 1) - 1
    pos = tl.where(keep, pos_sel, pos_rest)
    tl.store(Num + rows, num, mask=row_ok)
    tl.store(Idx + row_off + pos, (j + 0 * pos).to(tl.int32), mask=out_ok)
