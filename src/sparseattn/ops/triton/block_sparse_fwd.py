"""Triton block-sparse attention forward kernel (FlashAttention-2 style, ``@triton.jit`` code only).

One program computes ``BLOCK_M`` query rows of one (batch, head). Its rows lie inside one layout
query block, whose key-block list (``kv_indices[b, h, qb, :kv_num_blocks[b, h, qb]]``, strictly
ascending) drives the loop. Each layout key block is processed as ``LAYOUT_BN // BLOCK_N`` kernel
tiles.

The list is split into three consecutive ranges (by counting entries below two limits, one vector
load per ``LIST_CHUNK`` entries; or, with ``VEC_COUNT=False``, two binary searches):

* full blocks: every key is in range and (causal) at or below the diagonal for *all* rows of the
  program — no element mask, no ``-inf`` guard;
* masked blocks: crossing the diagonal or the end of the keys — element mask applied;
* invisible blocks: entirely above the diagonal — never loaded.

Because the indices ascend, the three groups are consecutive ranges of the list. Every range runs the
one ``@triton.jit`` inner loop :func:`_attn_inner` (as the Triton fused-attention tutorial's
``_attn_fwd_inner`` with ``STAGE``): ``MASKED=False`` for the full blocks, ``MASKED=True`` (with the
window / row-bound masks as constexprs) for the masked ranges. Triton inlines the call and drops the
other ``MASKED`` value's branches, so each range compiles to the loop it had when they were written out
separately (checked with ``benchmarks/ptx_compare.py``: the same sm_90 PTX, Triton 3.9, up to the
placement of the accumulator's zero-initialising moves before a lower-edge range). The prologue helpers
(:func:`_program_ids`, :func:`_row_tile`, :func:`_head_bases`, :func:`_block_list`,
:func:`_causal_limits`) and :func:`_kv_load` are shared with the quantized kernel.

With ``HAS_WINDOW`` (an exact causal sliding window of ``WINDOW`` keys: row ``r`` attends keys ``j``
with ``r + OFF - WINDOW < j <= r + OFF``) two more limits split off the front of the list:

* below-window blocks: entirely below the window of every row of the program — skipped, never loaded;
* lower-edge blocks: crossing the window's lower edge for some row — element mask (window and
  causal, since a narrow window's edge block can also hold the diagonal);

then full, diagonal and invisible blocks as above (a block past the lower-edge range is inside
every row's window, so those two ranges need no window mask). Everything window-related is behind the
``HAS_WINDOW`` constexpr: with it off the kernel is the window-free one (checked by compiling both
for sm_90: the same PTX instructions, one of them scheduled one slot apart in some configs). In the
first lower-edge block, kernel sub-tiles (``BLOCK_N < LAYOUT_BN``) below every row's window are not
loaded either. The P·V exception for a non-finite ``v`` (docs/ARCHITECTURE.md, "Non-finite inputs")
applies at the window's lower edge as on the diagonal: ``v[j, d]`` also reaches channel ``d`` of the
rows of a query tile that loads key ``j``'s tile in a masked range without attending ``j``.

With ``HAS_ROW_BOUNDS`` every query row ``r`` carries its own key interval: it may attend key ``j`` only
if ``RowLo[b, r] <= j <= RowHi[b, r]`` (int32 ``[B, N_Q]``, batch stride 0 allowed), ANDed with the causal
rule and ``j < N_KV``. That is the exact mask of packed documents (``lo`` = the row's document start,
``hi`` = its document end; causal or not) and of prefix-LM (``lo = 0``, ``hi = max(r, prefix - 1)``,
non-causal kernel); a sliding window folds into ``lo`` (so it is not combined with ``HAS_WINDOW``).
The program reduces its rows' bounds once (``min``/``max`` of ``lo`` and ``hi``) and splits the list
with the same five ranges as the window: blocks ending below every row's ``lo`` are skipped, blocks
starting below some row's ``lo`` take the element mask (lower edge), blocks inside every row's interval
(and below the causal diagonal) take the unmasked loop, blocks crossing some row's ``hi`` (or the
diagonal, or the end of the keys) take the element mask, blocks above every row's ``hi`` are never
loaded. A program inside one document therefore masks only its edge and diagonal blocks, like a
causal one. A row attends something iff a full block exists or a masked-range block meets its
interval (checked per entry in the epilogue); else out 0, lse ``-inf``. Not with ``PV_SKIP`` or
``HAS_STATE`` (static asserts; the launcher refuses those combinations). Adding the switch left the
flag-off kernel's sm_90 PTX (Triton 3.9, compiled without a GPU) with the same instruction multiset
for causal / non-causal / window / TMA configs; only the order of a few parameter loads moved.

With ``HAS_STATE`` (docs/STATE.md) the program loads an incoming raw state ``(m, l, acc)`` (fp32,
contiguous ``[B*H, N_Q(, HEAD_DIM)]``; ``m`` in the kernel's log2 units) from ``SmIn/SlIn/SaccIn``
instead of starting empty, stores the outgoing one to ``SmOut/SlOut/SaccOut`` (separate buffers,
so a launch is idempotent, as autotuning needs) and takes the causal offset from ``CAUSAL_OFF``
(a key segment of a longer KV) instead of ``N_KV - N_Q``; a row that attended a key in an earlier
segment (``m > -inf``) is not empty. Since the loop visits key blocks in ascending order,
carrying the state over segments cut at multiples of ``LAYOUT_BN`` repeats the one-call loop
exactly (same tiles, same ranges, same arithmetic): bitwise equal results with one launch config.

With ``HAS_FLOAT_MASK`` an additive mask is loaded per tile through its strides (0 for broadcast
batch/head dims) and added to the raw dot product pre-divided by the score scale
(``qk + mask * log2(e) / qk_scale``), so the rest of the loop is unchanged; ``-inf`` entries are
masked keys, and a row whose running max is still ``-inf`` at the end is empty (out 0, lse ``-inf``).
The lazy rescale (``RESCALE_TAU``) is off with a mask (a fully masked tile would make its test NaN).
With ``HAS_KV_SCALE`` K and V hold quantized values (int8, or float8 e4m3 on sm_89+) with one float32
scale per key (``KScale``/``VScale``, contiguous ``[B, H_kv, N_KV]``): a K tile is converted to q's
dtype (exact for both formats) and its scores multiplied by the keys' scales; the value scales are
folded into P before the P·V product (``_pv_scaled``). Pointer loads only (no TMA).

All these flags default to ``False``: the default kernel's instructions are unchanged (its
parameter list holds the new, unused pointer/stride arguments). Checked by compiling the kernel
before and after for sm_90 with Triton 3.9 (no GPU needed): the same PTX instructions up to the
placement of the parameter loads, for causal / non-causal / window / TMA / lazy-rescale configs.

Numerics: fp16/bf16 operands, fp32 accumulation; scores are kept in log2 units (``log2(e)`` folded
into the scale) so the softmax uses ``exp2``; the natural-log lse is written at the end. Rows that
attend nothing get out 0 and lse ``-inf``. No atomics: every output element is written once by one
program, so results are deterministic.

``PV_SKIP`` implements the softmax-aware rule of :func:`sparseattn.ops.reference.reference_attention`
exactly; it requires ``BLOCK_M == LAYOUT_BM`` and ``BLOCK_N == LAYOUT_BN`` so a kernel tile *is* a
layout tile, and writes per-program ``(visited, skipped)`` counters to ``Stats``.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _lower_bound(idx_row, stride_in, num, limit):
    """Number of entries of the ascending list ``idx_row[:num]`` that are ``< limit``."""
    lo = num * 0
    hi = num
    while lo < hi:
        mid = (lo + hi) // 2
        val = tl.load(idx_row + mid * stride_in)
        go_right = val < limit
        lo = tl.where(go_right, mid + 1, lo)
        hi = tl.where(go_right, hi, mid)
    return lo


@triton.jit
def _program_ids(H, GROUP, CAUSAL: tl.constexpr):
    """``(num_m, pid_m, pid_bh, off_b, off_h, off_hk)``: this program's row tile, (batch, head) and kv head (GQA)."""
    num_m = tl.num_programs(0)
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = num_m - 1 - pid_m  # longest rows first: less tail imbalance
    pid_bh = tl.program_id(1)
    off_b = pid_bh // H
    off_h = pid_bh % H
    off_hk = off_h // GROUP
    return num_m, pid_m, pid_bh, off_b, off_h, off_hk


@triton.jit
def _row_tile(pid_m, N_Q, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              LAYOUT_BM: tl.constexpr):
    """``(m0, qb, offs_r, offs_m, offs_n, offs_d, row_ok)``: the tile's first row, layout query block and offsets."""
    m0 = pid_m * BLOCK_M
    qb = m0 // LAYOUT_BM
    offs_r = tl.arange(0, BLOCK_M)
    offs_m = m0 + offs_r
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < N_Q
    return m0, qb, offs_r, offs_m, offs_n, offs_d, row_ok


@triton.jit
def _head_bases(Q, K, V, off_b, off_h, off_hk, stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh):
    """``(q_base, k_base, v_base)``: the program's head of q and its kv head (GQA) of k and v."""
    q_base = Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
    k_base = K + off_b.to(tl.int64) * stride_kb + off_hk.to(tl.int64) * stride_kh
    v_base = V + off_b.to(tl.int64) * stride_vb + off_hk.to(tl.int64) * stride_vh
    return q_base, k_base, v_base


@triton.jit
def _block_list(KvNum, KvIdx, off_b, off_h, qb, stride_nb, stride_nh, stride_nm, stride_ib, stride_ih, stride_im,
                NUM_KV_BLOCKS):
    """``(idx_row, num)``: the program's key-block list (a pointer to its first entry) and its length."""
    idx_row = KvIdx + off_b.to(tl.int64) * stride_ib + off_h.to(tl.int64) * stride_ih + qb.to(tl.int64) * stride_im
    num = tl.load(KvNum + off_b.to(tl.int64) * stride_nb + off_h.to(tl.int64) * stride_nh + qb * stride_nm)
    num = tl.minimum(tl.maximum(num, 0), NUM_KV_BLOCKS)
    return idx_row, num


@triton.jit
def _causal_limits(m0, N_Q, N_KV, NUM_KV_BLOCKS, OFF, BLOCK_M: tl.constexpr, LAYOUT_BN: tl.constexpr,
                   CAUSAL: tl.constexpr):
    """``(row_last, full_lim, vis_lim)``: key blocks ``j < full_lim`` need no element mask for any row of
    the program (in range and, causal, at or below every row's diagonal); blocks ``j >= vis_lim`` are
    invisible to every row."""
    row_last = tl.minimum(m0 + BLOCK_M, N_Q) - 1
    if CAUSAL:
        full_lim = tl.minimum(tl.maximum(m0 + OFF + 1, 0) // LAYOUT_BN, N_KV // LAYOUT_BN)
        last_key = row_last + OFF
        vis_lim = tl.where(last_key >= 0, last_key // LAYOUT_BN + 1, 0)
        vis_lim = tl.minimum(vis_lim, NUM_KV_BLOCKS)
    else:
        full_lim = N_KV // LAYOUT_BN
        vis_lim = NUM_KV_BLOCKS
    return row_last, full_lim, vis_lim


@triton.jit
def _pv(p, v, acc, in_dtype: tl.constexpr, DOT_F32: tl.constexpr):
    """``acc + P·V`` with P rounded to the input dtype (as FlashAttention does)."""
    p = p.to(in_dtype)
    if DOT_F32:
        return tl.dot(p.to(tl.float32), v.to(tl.float32), acc)
    return tl.dot(p, v, acc)


@triton.jit
def _kv_load(ptrs, col_ok, MASKED: tl.constexpr, KEY_AXIS: tl.constexpr):
    """Load a K/V tile whose keys run along ``KEY_AXIS``; in a masked range keys with ``col_ok`` False read 0."""
    if MASKED:
        if KEY_AXIS == 0:
            x = tl.load(ptrs, mask=col_ok[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=col_ok[None, :], other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _v_tile_pv(p, acc, v_base, v_desc, vs_base, start_n, cols, col_ok, offs_n, offs_d, stride_vn,
               in_dtype: tl.constexpr, MASKED: tl.constexpr, USE_TMA: tl.constexpr, HAS_KV_SCALE: tl.constexpr,
               DOT_F32: tl.constexpr):
    """Load the V tile at key ``start_n`` and return ``acc + P·V`` (quantized V: ``(P·diag(vs))·V``)."""
    if USE_TMA:
        v = v_desc.load([start_n, 0])
    else:
        v = _kv_load(v_base + start_n.to(tl.int64) * stride_vn + offs_n[:, None] * stride_vn + offs_d[None, :],
                     col_ok, MASKED, 0)
    if HAS_KV_SCALE:  # one scale per key, folded into P; the int8/fp8 values are exact in q's dtype
        if MASKED:
            vs = tl.load(vs_base + cols, mask=col_ok, other=0.0)
        else:
            vs = tl.load(vs_base + start_n + offs_n)
        acc = _pv(p * vs[None, :], v.to(in_dtype), acc, in_dtype, DOT_F32)
    else:
        acc = _pv(p, v, acc, in_dtype, DOT_F32)
    return acc


@triton.jit
def _attn_inner(
    t_lo, t_hi, q, m_i, l_i, acc, n_skipped, kb_nx,
    idx_row, stride_in, num, k_base, v_base, k_desc, v_desc, stride_kn, stride_vn,
    offs_m, offs_n, offs_d, row_ok, N_Q, N_KV, NUM_KV_BLOCKS, OFF, WINDOW, qk_scale, pv_thr2,
    mask_base, stride_mm, stride_mn, mask_mul, ks_base, vs_base, row_lo, row_hi,
    in_dtype: tl.constexpr,
    BLOCK_N: tl.constexpr,
    LAYOUT_BN: tl.constexpr,
    SUB: tl.constexpr,
    CAUSAL: tl.constexpr,
    PV_SKIP: tl.constexpr,
    DOT_F32: tl.constexpr,
    USE_TMA: tl.constexpr,
    PREFETCH: tl.constexpr,
    HAS_FLOAT_MASK: tl.constexpr,
    HAS_KV_SCALE: tl.constexpr,
    MASKED: tl.constexpr,
    WIN_MASK: tl.constexpr = False,
    BOUNDS_MASK: tl.constexpr = False,
    RESCALE_TAU: tl.constexpr = 0.0,
):
    """Kernel tiles ``t_lo .. t_hi`` of the list (``SUB`` per entry) folded into ``(acc, m_i, l_i)``; returns the new state.

    ``kb_nx``: the list entry of tile ``t_lo`` (read ahead with ``PREFETCH``). ``MASKED=False``: the full
    blocks (no element mask, no ``-inf`` guard on the scores; lazy rescaling with ``RESCALE_TAU > 0``).
    ``MASKED=True``: the element mask keeps keys ``< N_KV``, with ``CAUSAL`` keys ``<= row + OFF``, with
    ``WIN_MASK`` keys ``> row + OFF - WINDOW`` and with ``BOUNDS_MASK`` keys ``row_lo[row] <= j <= row_hi[row]``.
    A plain ``@triton.jit`` call: Triton inlines it and drops the branches of the other ``MASKED`` value,
    so each range compiles to the loop it had when the two were written out separately.
    """
    # PREFETCH: the index of the next tile is loaded one iteration ahead and carried, so the K/V
    # addresses of an iteration do not depend on a load issued in that iteration. Measured on an H100
    # (benchmarks/kernel_variants.py): dense 32K causal 18.02 -> 17.05 ms; sparse rows within +-1.3%.
    for t in range(t_lo, t_hi):
        if PREFETCH:
            kb = tl.minimum(tl.maximum(kb_nx, 0), NUM_KV_BLOCKS - 1)
            kb_nx = tl.load(idx_row + tl.minimum((t + 1) // SUB, num - 1) * stride_in)
        else:
            j = t // SUB
            kb = tl.load(idx_row + j * stride_in)
            kb = tl.minimum(tl.maximum(kb, 0), NUM_KV_BLOCKS - 1)
        start_n = kb * LAYOUT_BN + (t % SUB) * BLOCK_N
        if MASKED:
            cols = start_n + offs_n
            col_ok = cols < N_KV
        else:  # full blocks: no column mask; the columns are formed where a load needs them
            cols = None
            col_ok = None
        if USE_TMA:
            k = k_desc.load([start_n, 0]).T
        else:
            k = _kv_load(k_base + start_n.to(tl.int64) * stride_kn + offs_n[None, :] * stride_kn + offs_d[:, None],
                         col_ok, MASKED, 1)
        if HAS_KV_SCALE:
            k = k.to(in_dtype)  # int8 (|x| <= 127) and fp8 e4m3 values are exact in fp16 and bf16
        if DOT_F32:
            k = k.to(tl.float32)
        qk = tl.dot(q, k)
        if HAS_KV_SCALE:  # per-key scale of the quantized K: q·(s_j k_j) = s_j (q·k_j)
            if MASKED:
                qk = qk * tl.load(ks_base + cols, mask=col_ok, other=0.0)[None, :]
            else:
                qk = qk * tl.load(ks_base + start_n + offs_n)[None, :]
        if HAS_FLOAT_MASK:  # additive mask, pre-divided by the score scale (see the kernel)
            if MASKED:
                bias_ok = row_ok[:, None] & col_ok[None, :]
            else:
                cols = start_n + offs_n
                bias_ok = row_ok[:, None]
            bias = tl.load(mask_base + offs_m[:, None] * stride_mm + cols[None, :] * stride_mn, mask=bias_ok, other=0.0)
            qk = qk + bias.to(tl.float32) * mask_mul
        if MASKED:
            keep = col_ok[None, :]
            if CAUSAL:
                keep = keep & (cols[None, :] <= offs_m[:, None] + OFF)
            if WIN_MASK:
                keep = keep & (cols[None, :] > offs_m[:, None] + OFF - WINDOW)
            if BOUNDS_MASK:
                keep = keep & (cols[None, :] >= row_lo[:, None]) & (cols[None, :] <= row_hi[:, None])
            s = tl.where(keep, qk * qk_scale, float("-inf"))
            tile_max = tl.max(s, 1)
        else:
            tile_max = tl.max(qk, 1) * qk_scale
        m_ij = tl.maximum(m_i, tile_max)
        if RESCALE_TAU > 0.0 and not HAS_FLOAT_MASK and not MASKED:  # (a masked row's -inf max: NaN test)
            # Lazy rescaling (FlashAttention-4's trick): keep the reference max m_i unless some row's max
            # grew by more than RESCALE_TAU; then p <= 2**RESCALE_TAU, and (m_i, l_i, acc) stay one
            # consistent scaled state, so the result is the same function (only rounding differs). Once
            # the running max settles, most tiles skip the accumulator rescale (BLOCK_M * HEAD_DIM
            # multiplies) — the branch is uniform over the program.
            if tl.max(m_ij - m_i, 0) > RESCALE_TAU:
                alpha = tl.math.exp2(m_i - m_ij)
                acc = acc * alpha[:, None]
                l_i = l_i * alpha
                m_i = m_ij
            p = tl.math.exp2(qk * qk_scale - m_i[:, None])
            l_i = l_i + tl.sum(p, 1)
            m_ij = m_i
        else:
            # m_safe: a row whose scores so far are all -inf (masked, or from infinite inputs) keeps p = 0
            # instead of exp2(-inf - -inf) = NaN, as the reference does
            m_safe = tl.where(m_ij == float("-inf"), 0.0, m_ij)
            if not MASKED:
                s = qk * qk_scale
            p = tl.math.exp2(s - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
        if PV_SKIP:
            if MASKED:
                gap = tile_max - m_safe
            else:
                gap = tile_max - m_ij
            skippable = (gap < -pv_thr2) | (offs_m >= N_Q)
            skip = tl.min(skippable.to(tl.int32), 0) == 1
            if skip:
                n_skipped += 1
            else:
                acc = _v_tile_pv(p, acc, v_base, v_desc, vs_base, start_n, cols, col_ok, offs_n, offs_d, stride_vn,
                                 in_dtype, MASKED, USE_TMA, HAS_KV_SCALE, DOT_F32)
        else:
            acc = _v_tile_pv(p, acc, v_base, v_desc, vs_base, start_n, cols, col_ok, offs_n, offs_d, stride_vn,
                             in_dtype, MASKED, USE_TMA, HAS_KV_SCALE, DOT_F32)
        m_i = m_ij
    return m_i, l_i, acc, n_skipped


@triton.jit(do_not_specialize=["H", "GROUP", "N_Q", "N_KV", "NUM_KV_BLOCKS", "N_CTX_KEY", "WINDOW", "CAUSAL_OFF"])
def _block_sparse_fwd_kernel(
    Q, K, V, Out, Lse, KvNum, KvIdx, Stats,
    Mask, SmIn, SlIn, SaccIn, SmOut, SlOut, SaccOut,  # read only with HAS_FLOAT_MASK / HAS_STATE
    KScale, VScale,  # read only with HAS_KV_SCALE: contiguous [B, H_kv, N_KV] fp32 per-key scales
    RowLo, RowHi,  # read only with HAS_ROW_BOUNDS: int32 [B, N_Q] (unit row stride), per-row key interval
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_lb, stride_lh,
    stride_nb, stride_nh, stride_nm,
    stride_ib, stride_ih, stride_im, stride_in,
    stride_mb, stride_mh, stride_mm, stride_mn,  # float mask strides (0 for broadcast dims)
    stride_rb,  # row-bound batch stride (0: one pair of bounds for every batch)
    H, GROUP, N_Q, N_KV, NUM_KV_BLOCKS,
    qk_scale, pv_thr2,
    N_CTX_KEY,  # autotune bucket only (ceil(log2(N_Q))); unused in the body
    WINDOW,  # sliding window in keys (read only with HAS_WINDOW)
    CAUSAL_OFF,  # with HAS_STATE: the causal offset of this key segment (else N_KV - N_Q)
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    LAYOUT_BM: tl.constexpr,
    LAYOUT_BN: tl.constexpr,
    CAUSAL: tl.constexpr,
    PV_SKIP: tl.constexpr,
    DOT_F32: tl.constexpr = False,  # interpreter only: widen operands before tl.dot (exact products)
    USE_TMA: tl.constexpr = False,  # K/V tiles through device-side tensor descriptors (Hopper TMA)
    PREFETCH: tl.constexpr = True,  # carry the next key-block index through the loop (see below)
    VEC_COUNT: tl.constexpr = True,  # split the list by counting a vector load (else two binary searches)
    LIST_CHUNK: tl.constexpr = 64,  # power of two >= 16: entries counted per vector load (launcher: ~next_pow2(Nb))
    RESCALE_TAU: tl.constexpr = 0.0,  # > 0: lazy rescaling in the unmasked loop (see below), log2 units
    TMA_QO: tl.constexpr = False,  # Q load and O store through tensor descriptors too (fewer address registers)
    HAS_WINDOW: tl.constexpr = False,  # exact causal sliding window of WINDOW keys (see the module docstring)
    HAS_STATE: tl.constexpr = False,  # carry a raw (m, l, acc) state in and out (see the module docstring)
    HAS_FLOAT_MASK: tl.constexpr = False,  # additive float mask, loaded per tile through strides
    HAS_KV_SCALE: tl.constexpr = False,  # K/V hold int8/fp8 values with one fp32 scale per key (dequantised here)
    HAS_ROW_BOUNDS: tl.constexpr = False,  # row r attends keys RowLo[r] <= j <= RowHi[r] only (see the module docstring)
):
    tl.static_assert(not (PV_SKIP and RESCALE_TAU > 0.0), "PV_SKIP needs the exact running max (RESCALE_TAU = 0)")
    tl.static_assert(not HAS_WINDOW or CAUSAL, "HAS_WINDOW needs CAUSAL")
    tl.static_assert(not (HAS_KV_SCALE and USE_TMA), "HAS_KV_SCALE loads K/V through pointers (USE_TMA off)")
    tl.static_assert(not (HAS_ROW_BOUNDS and HAS_WINDOW), "HAS_ROW_BOUNDS: fold the window into RowLo instead")
    tl.static_assert(not (HAS_ROW_BOUNDS and PV_SKIP), "HAS_ROW_BOUNDS does not count PV_SKIP tiles")
    tl.static_assert(not (HAS_ROW_BOUNDS and HAS_STATE), "HAS_ROW_BOUNDS is not carried over key segments")
    SUB: tl.constexpr = LAYOUT_BN // BLOCK_N
    num_m, pid_m, pid_bh, off_b, off_h, off_hk = _program_ids(H, GROUP, CAUSAL)
    if HAS_STATE:
        OFF = CAUSAL_OFF  # a key segment: row r sees local keys <= r + OFF (global bottom-right alignment)
    else:
        OFF = N_KV - N_Q  # bottom-right causal alignment: row r sees keys <= r + OFF
    m0, qb, offs_r, offs_m, offs_n, offs_d, row_ok = _row_tile(pid_m, N_Q, HEAD_DIM, BLOCK_M, BLOCK_N, LAYOUT_BM)

    q_base, k_base, v_base = _head_bases(Q, K, V, off_b, off_h, off_hk, stride_qb, stride_qh, stride_kb, stride_kh,
                                         stride_vb, stride_vh)
    idx_row, num = _block_list(KvNum, KvIdx, off_b, off_h, qb, stride_nb, stride_nh, stride_nm, stride_ib, stride_ih,
                               stride_im, NUM_KV_BLOCKS)
    # key blocks j < full_lim need no element mask; blocks j >= vis_lim are invisible to every row
    row_last, full_lim, vis_lim = _causal_limits(m0, N_Q, N_KV, NUM_KV_BLOCKS, OFF, BLOCK_M, LAYOUT_BN, CAUSAL)
    if HAS_WINDOW:
        # blocks j < below_lim end at or below the window start of the program's first row (so of every
        # row); blocks j < edge_lim start at or below the window start of its last row (need the mask)
        below_lim = tl.maximum(m0 + OFF - WINDOW + 1, 0) // LAYOUT_BN
        edge_key = row_last + OFF - WINDOW
        edge_lim = tl.where(edge_key >= 0, edge_key // LAYOUT_BN + 1, 0)
    if HAS_ROW_BOUNDS:
        # per-row key interval [lo, hi], reduced once over the program's rows (rows past N_Q: neutral).
        # Blocks j < below_lim end below every row's lo (skipped); blocks j < edge_lim start below some
        # row's lo (lower-edge range: element mask); blocks past hi_min need the mask (the "diagonal"
        # range, so full_lim drops to it) and blocks past hi_max are invisible.
        rb_ptr = off_b.to(tl.int64) * stride_rb + offs_m
        row_lo = tl.load(RowLo + rb_ptr, mask=row_ok, other=0)
        row_hi = tl.load(RowHi + rb_ptr, mask=row_ok, other=-1)
        lo_min = tl.maximum(tl.min(tl.where(row_ok, row_lo, N_KV), 0), 0)
        lo_max = tl.maximum(tl.max(tl.where(row_ok, row_lo, 0), 0), 0)
        hi_min = tl.min(tl.where(row_ok, row_hi, N_KV), 0)
        hi_max = tl.max(tl.where(row_ok, row_hi, -1), 0)
        below_lim = lo_min // LAYOUT_BN
        edge_lim = (lo_max + LAYOUT_BN - 1) // LAYOUT_BN
        full_lim = tl.minimum(full_lim, tl.maximum(hi_min + 1, 0) // LAYOUT_BN)
        vis_lim = tl.minimum(vis_lim, tl.where(hi_max >= 0, hi_max // LAYOUT_BN + 1, 0))
    else:
        row_lo = offs_m  # placeholders for _attn_inner's arguments (unused without HAS_ROW_BOUNDS)
        row_hi = offs_m
    if VEC_COUNT:
        # The list is ascending, so "entries < limit" is a count. The first chunk's load does not wait
        # for ``num`` (it is masked by the list width, not the count), so the program's first memory
        # round trip fetches Q, num and the list together instead of a chain of dependent probes.
        offs_c = tl.arange(0, LIST_CHUNK)
        ent = tl.load(idx_row + offs_c * stride_in, mask=offs_c < NUM_KV_BLOCKS, other=0)
        live = offs_c < num
        n_full = tl.sum((live & (ent < full_lim)).to(tl.int32), 0)
        n_vis = tl.sum((live & (ent < vis_lim)).to(tl.int32), 0)
        if HAS_WINDOW or HAS_ROW_BOUNDS:
            n_below = tl.sum((live & (ent < below_lim)).to(tl.int32), 0)
            n_edge = tl.sum((live & (ent < edge_lim)).to(tl.int32), 0)
        for c0 in range(LIST_CHUNK, num, LIST_CHUNK):  # lists longer than one chunk (rare)
            cc = c0 + offs_c
            live = cc < num
            ent = tl.load(idx_row + cc * stride_in, mask=live, other=0)
            n_full += tl.sum((live & (ent < full_lim)).to(tl.int32), 0)
            n_vis += tl.sum((live & (ent < vis_lim)).to(tl.int32), 0)
            if HAS_WINDOW or HAS_ROW_BOUNDS:
                n_below += tl.sum((live & (ent < below_lim)).to(tl.int32), 0)
                n_edge += tl.sum((live & (ent < edge_lim)).to(tl.int32), 0)
    else:
        n_full = _lower_bound(idx_row, stride_in, num, full_lim)
        n_vis = _lower_bound(idx_row, stride_in, num, vis_lim)
        if HAS_WINDOW or HAS_ROW_BOUNDS:
            n_below = _lower_bound(idx_row, stride_in, num, below_lim)
            n_edge = _lower_bound(idx_row, stride_in, num, edge_lim)
    if HAS_WINDOW or HAS_ROW_BOUNDS:
        # list ranges: [0, n_below) skipped, [n_below, n_edge) lower edge, [n_edge, n_full) full,
        # [n_full, n_vis) diagonal, [n_vis, num) invisible. A narrow window's edge blocks may also cross
        # the diagonal (edge_lim > full_lim): the edge loop applies the causal mask too.
        n_edge = tl.minimum(n_edge, n_vis)
        n_below = tl.minimum(n_below, n_edge)
        n_full = tl.maximum(n_full, n_edge)

    if USE_TMA:
        # rows past N_KV are zero-filled by the copy engine; the masked loop masks their scores anyway
        k_desc = tl.make_tensor_descriptor(k_base, shape=[N_KV, HEAD_DIM], strides=[stride_kn, 1],
                                           block_shape=[BLOCK_N, HEAD_DIM])
        v_desc = tl.make_tensor_descriptor(v_base, shape=[N_KV, HEAD_DIM], strides=[stride_vn, 1],
                                           block_shape=[BLOCK_N, HEAD_DIM])
    else:
        k_desc = k_base  # placeholders for _attn_inner's arguments (unused without USE_TMA)
        v_desc = v_base

    o_base = Out + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh
    if TMA_QO:
        # rows past N_Q are zero-filled on load and clipped on store by the copy engine
        q_desc = tl.make_tensor_descriptor(q_base, shape=[N_Q, HEAD_DIM], strides=[stride_qm, 1],
                                           block_shape=[BLOCK_M, HEAD_DIM])
        q = q_desc.load([m0, 0])
    else:
        q = tl.load(q_base + m0.to(tl.int64) * stride_qm + offs_r[:, None] * stride_qm + offs_d[None, :], mask=row_ok[:, None],
                    other=0.0)
    in_dtype = q.dtype
    if DOT_F32:
        q = q.to(tl.float32)

    if HAS_STATE:
        # incoming raw state (contiguous [B*H, N_Q] / [B*H, N_Q, HEAD_DIM] fp32; rows past N_Q: empty)
        s_row = pid_bh.to(tl.int64) * N_Q + offs_m
        m_i = tl.load(SmIn + s_row, mask=row_ok, other=float("-inf"))
        l_i = tl.load(SlIn + s_row, mask=row_ok, other=0.0)
        acc = tl.load(SaccIn + s_row[:, None] * HEAD_DIM + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        had = m_i > float("-inf")  # the row attended a key in an earlier segment
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    n_skipped = num * 0
    if HAS_FLOAT_MASK:
        # the mask is added to the raw dot product, divided by the score scale: s = (qk + mask / scale) * scale
        mask_base = Mask + off_b.to(tl.int64) * stride_mb + off_h.to(tl.int64) * stride_mh
        mask_mul = 1.4426950408889634 / qk_scale
    else:
        mask_base = Lse  # placeholders (unused without HAS_FLOAT_MASK)
        mask_mul = qk_scale
    if HAS_KV_SCALE:
        sc_off = (off_b.to(tl.int64) * (H // GROUP) + off_hk) * N_KV
        ks_base = KScale + sc_off
        vs_base = VScale + sc_off
    else:
        ks_base = Lse  # placeholders (unused without HAS_KV_SCALE)
        vs_base = Lse

    if HAS_WINDOW or HAS_ROW_BOUNDS:
        # ------------------------------------------------------------ lower-edge blocks: window / bounds (+ causal) mask
        # sub-tiles of the first edge block that end below the smallest key any row may attend (the first
        # row's window start; the smallest lo) are not loaded either (only block below_lim can hold such
        # sub-tiles: later blocks start above it)
        if HAS_WINDOW:
            lo_start = m0 + OFF - WINDOW + 1
        else:
            lo_start = lo_min
        kb_first = tl.load(idx_row + n_below * stride_in, mask=n_edge > n_below, other=0)
        t_skip = tl.where(kb_first == below_lim, (lo_start - below_lim * LAYOUT_BN) // BLOCK_N, 0)
        t_skip = tl.minimum(tl.maximum(t_skip, 0), SUB - 1)
        kb_nx = tl.load(idx_row + n_below * stride_in, mask=n_edge > n_below, other=0)
        m_i, l_i, acc, n_skipped = _attn_inner(
            n_below * SUB + t_skip, n_edge * SUB, q, m_i, l_i, acc, n_skipped, kb_nx,
            idx_row, stride_in, num, k_base, v_base, k_desc, v_desc, stride_kn, stride_vn,
            offs_m, offs_n, offs_d, row_ok, N_Q, N_KV, NUM_KV_BLOCKS, OFF, WINDOW, qk_scale, pv_thr2,
            mask_base, stride_mm, stride_mn, mask_mul, ks_base, vs_base, row_lo, row_hi,
            in_dtype, BLOCK_N, LAYOUT_BN, SUB, CAUSAL, PV_SKIP, DOT_F32, USE_TMA, PREFETCH, HAS_FLOAT_MASK,
            HAS_KV_SCALE, MASKED=True, WIN_MASK=HAS_WINDOW, BOUNDS_MASK=HAS_ROW_BOUNDS)
        t_full = n_edge * SUB
        kb_nx = tl.load(idx_row + n_edge * stride_in, mask=n_full > n_edge, other=0)
    else:
        t_full = 0
        kb_nx = tl.load(idx_row)  # entry 0 always exists (the list width is Nb >= 1); used only if n_full > 0

    # ---------------------------------------------------------------- full blocks: no mask
    m_i, l_i, acc, n_skipped = _attn_inner(
        t_full, n_full * SUB, q, m_i, l_i, acc, n_skipped, kb_nx,
        idx_row, stride_in, num, k_base, v_base, k_desc, v_desc, stride_kn, stride_vn,
        offs_m, offs_n, offs_d, row_ok, N_Q, N_KV, NUM_KV_BLOCKS, OFF, WINDOW, qk_scale, pv_thr2,
        mask_base, stride_mm, stride_mn, mask_mul, ks_base, vs_base, row_lo, row_hi,
        in_dtype, BLOCK_N, LAYOUT_BN, SUB, CAUSAL, PV_SKIP, DOT_F32, USE_TMA, PREFETCH, HAS_FLOAT_MASK,
        HAS_KV_SCALE, MASKED=False, RESCALE_TAU=RESCALE_TAU)

    # ---------------------------------------------------------------- blocks crossing the diagonal / the end
    kb_nx = tl.load(idx_row + n_full * stride_in, mask=n_vis > n_full, other=0)
    m_i, l_i, acc, n_skipped = _attn_inner(
        n_full * SUB, n_vis * SUB, q, m_i, l_i, acc, n_skipped, kb_nx,
        idx_row, stride_in, num, k_base, v_base, k_desc, v_desc, stride_kn, stride_vn,
        offs_m, offs_n, offs_d, row_ok, N_Q, N_KV, NUM_KV_BLOCKS, OFF, WINDOW, qk_scale, pv_thr2,
        mask_base, stride_mm, stride_mn, mask_mul, ks_base, vs_base, row_lo, row_hi,
        in_dtype, BLOCK_N, LAYOUT_BN, SUB, CAUSAL, PV_SKIP, DOT_F32, USE_TMA, PREFETCH, HAS_FLOAT_MASK,
        HAS_KV_SCALE, MASKED=True, BOUNDS_MASK=HAS_ROW_BOUNDS)

    # ---------------------------------------------------------------- epilogue
    # A row attends some key iff its list is non-empty and (causal) the first (smallest) selected block
    # starts at or below the row's last visible key. Only such rows are "empty" -> out 0, lse -inf; a
    # row that attends keys but whose l is 0 or NaN (non-finite inputs) divides through and gives NaN,
    # as SDPA does, instead of looking like a masked row.
    if HAS_WINDOW:
        # with a window: a row attends a lower-edge block iff the block meets its window (checked per
        # entry; the edge range is a few blocks), or the first later block (inside every row's window)
        # starts at or below its diagonal. Below-window blocks are attended by no row.
        has = offs_m < 0
        for e in range(n_below, n_edge):
            kb_e = tl.load(idx_row + e * stride_in)
            has = has | ((kb_e * LAYOUT_BN <= offs_m + OFF) & (kb_e * LAYOUT_BN + LAYOUT_BN - 1 > offs_m + OFF - WINDOW))
        first_kb = tl.load(idx_row + n_edge * stride_in, mask=n_vis > n_edge, other=0)
        has = has | (((offs_m * 0 + n_vis) > n_edge) & (first_kb * LAYOUT_BN <= offs_m + OFF))
    elif HAS_ROW_BOUNDS:
        # with row bounds: every row attends every key of a full block; otherwise a row attends a masked
        # block iff the block meets its interval [lo, last] (checked per entry of the two masked ranges)
        last = tl.minimum(row_hi, N_KV - 1)
        if CAUSAL:
            last = tl.minimum(last, offs_m + OFF)
        some = row_lo <= last
        has = (offs_m * 0 + n_full) > n_edge
        for e in range(n_below, n_edge):
            kb_e = tl.load(idx_row + e * stride_in)
            has = has | (some & (kb_e * LAYOUT_BN <= last) & (kb_e * LAYOUT_BN + LAYOUT_BN - 1 >= row_lo))
        for e in range(n_full, n_vis):
            kb_e = tl.load(idx_row + e * stride_in)
            has = has | (some & (kb_e * LAYOUT_BN <= last) & (kb_e * LAYOUT_BN + LAYOUT_BN - 1 >= row_lo))
    else:
        first_kb = tl.load(idx_row)
        has = (offs_m * 0 + num) > 0
        if CAUSAL:
            has = has & (first_kb * LAYOUT_BN <= offs_m + OFF)
    if HAS_FLOAT_MASK:
        has = has & (m_i > float("-inf"))  # every attended key masked with -inf: an empty row
    if HAS_STATE:
        has = has | had
        tl.store(SmOut + s_row, m_i, mask=row_ok)
        tl.store(SlOut + s_row, l_i, mask=row_ok)
        tl.store(SaccOut + s_row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=row_ok[:, None])
    l_safe = tl.where(has, l_i, 1.0)
    out = acc / l_safe[:, None]
    out = tl.where(has[:, None], out, 0.0)
    # natural-log lse = (m2 + log2(l)) * ln(2), m2 in log2 units
    lse = tl.where(has, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    if TMA_QO:
        o_desc = tl.make_tensor_descriptor(o_base, shape=[N_Q, HEAD_DIM], strides=[stride_om, 1],
                                           block_shape=[BLOCK_M, HEAD_DIM])
        o_desc.store([m0, 0], out.to(Out.dtype.element_ty))
    else:
        tl.store(o_base + m0.to(tl.int64) * stride_om + offs_r[:, None] * stride_om + offs_d[None, :], out.to(Out.dtype.element_ty),
                 mask=row_ok[:, None])
    l_base = Lse + off_b.to(tl.int64) * stride_lb + off_h.to(tl.int64) * stride_lh
    tl.store(l_base + offs_m, lse, mask=row_ok)
    if PV_SKIP:
        # as in the reference, tiles entirely above the diagonal are neither visited nor skipped
        pid_flat = (pid_bh * num_m + pid_m).to(tl.int64)
        if HAS_WINDOW:  # below-window blocks hold no allowed pair: not visited either
            tl.store(Stats + pid_flat * 2, n_vis - n_below)
        else:
            tl.store(Stats + pid_flat * 2, n_vis)
        tl.store(Stats + pid_flat * 2 + 1, n_skipped)
