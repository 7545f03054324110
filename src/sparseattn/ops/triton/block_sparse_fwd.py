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

Because the indices ascend, the three groups are consecutive ranges of the list.

With ``HAS_WINDOW`` (an exact causal sliding window of ``WINDOW`` keys: row ``r`` attends keys ``j``
with ``r + OFF - WINDOW < j <= r + OFF``) two more limits split off the front of the list:

* below-window blocks: entirely below the window of every row of the program — skipped, never loaded;
* lower-edge blocks: crossing the window's lower edge for some row — element mask (window and
  causal, since a narrow window's edge block can also hold the diagonal);

then full, diagonal and invisible blocks as above (a block past the lower-edge range is inside
every row's window, so those two ranges need no window mask). The lower-edge and diagonal ranges
share one ``@triton.jit`` loop, :func:`_masked_blocks`. Everything window-related is behind the
``HAS_WINDOW`` constexpr: with it off the kernel is the window-free one (checked by compiling both
for sm_90: the same PTX instructions, one of them scheduled one slot apart in some configs). In the
first lower-edge block, kernel sub-tiles (``BLOCK_N < LAYOUT_BN``) below every row's window are not
loaded either. The P·V exception for a non-finite ``v`` (docs/ARCHITECTURE.md, "Non-finite inputs")
applies at the window's lower edge as on the diagonal: ``v[j, d]`` also reaches channel ``d`` of the
rows of a query tile that loads key ``j``'s tile in a masked range without attending ``j``.

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
def _pv(p, v, acc, in_dtype: tl.constexpr, DOT_F32: tl.constexpr):
    """``acc + P·V`` with P rounded to the input dtype (as FlashAttention does)."""
    p = p.to(in_dtype)
    if DOT_F32:
        return tl.dot(p.to(tl.float32), v.to(tl.float32), acc)
    return tl.dot(p, v, acc)


@triton.jit
def _masked_blocks(
    e_lo, e_hi, t_skip, q, acc, m_i, l_i, n_skipped,
    idx_row, stride_in, num, k_base, v_base, k_desc, v_desc, stride_kn, stride_vn,
    offs_m, offs_n, offs_d, N_Q, N_KV, NUM_KV_BLOCKS, OFF, WINDOW, qk_scale, pv_thr2,
    in_dtype: tl.constexpr,
    BLOCK_N: tl.constexpr,
    LAYOUT_BN: tl.constexpr,
    SUB: tl.constexpr,
    CAUSAL: tl.constexpr,
    WIN_MASK: tl.constexpr,
    PV_SKIP: tl.constexpr,
    DOT_F32: tl.constexpr,
    USE_TMA: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    """List entries ``e_lo .. e_hi`` (``SUB`` kernel tiles each) with the element mask; returns the new state.

    The first ``t_skip`` kernel tiles of entry ``e_lo`` are left out (``0`` for the diagonal range; at
    the window's lower edge, the sub-tiles below every row's window).

    The mask keeps keys ``< N_KV``, with ``CAUSAL`` keys ``<= row + OFF`` and with ``WIN_MASK`` keys
    ``> row + OFF - WINDOW``. Inlined by Triton (a plain ``@triton.jit`` call), so the diagonal range
    compiles to the same loop as before it was factored out.
    """
    kb_nx = tl.load(idx_row + e_lo * stride_in, mask=e_hi > e_lo, other=0)
    for t in range(e_lo * SUB + t_skip, e_hi * SUB):
        if PREFETCH:
            kb = tl.minimum(tl.maximum(kb_nx, 0), NUM_KV_BLOCKS - 1)
            kb_nx = tl.load(idx_row + tl.minimum((t + 1) // SUB, num - 1) * stride_in)
        else:
            j = t // SUB
            kb = tl.load(idx_row + j * stride_in)
            kb = tl.minimum(tl.maximum(kb, 0), NUM_KV_BLOCKS - 1)
        start_n = kb * LAYOUT_BN + (t % SUB) * BLOCK_N
        cols = start_n + offs_n
        col_ok = cols < N_KV
        if USE_TMA:
            k = k_desc.load([start_n, 0]).T
        else:
            k = tl.load(k_base + start_n.to(tl.int64) * stride_kn + offs_n[None, :] * stride_kn + offs_d[:, None],
                        mask=col_ok[None, :], other=0.0)
        if DOT_F32:
            k = k.to(tl.float32)
        qk = tl.dot(q, k)
        keep = col_ok[None, :]
        if CAUSAL:
            keep = keep & (cols[None, :] <= offs_m[:, None] + OFF)
        if WIN_MASK:
            keep = keep & (cols[None, :] > offs_m[:, None] + OFF - WINDOW)
        s = tl.where(keep, qk * qk_scale, float("-inf"))
        tile_max = tl.max(s, 1)
        m_ij = tl.maximum(m_i, tile_max)
        m_safe = tl.where(m_ij == float("-inf"), 0.0, m_ij)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if PV_SKIP:
            gap = tile_max - m_safe
            skippable = (gap < -pv_thr2) | (offs_m >= N_Q)
            skip = tl.min(skippable.to(tl.int32), 0) == 1
            if skip:
                n_skipped += 1
            else:
                if USE_TMA:
                    v = v_desc.load([start_n, 0])
                else:
                    v = tl.load(v_base + start_n.to(tl.int64) * stride_vn + offs_n[:, None] * stride_vn + offs_d[None, :],
                                mask=col_ok[:, None], other=0.0)
                acc = _pv(p, v, acc, in_dtype, DOT_F32)
        else:
            if USE_TMA:
                v = v_desc.load([start_n, 0])
            else:
                v = tl.load(v_base + start_n.to(tl.int64) * stride_vn + offs_n[:, None] * stride_vn + offs_d[None, :],
                            mask=col_ok[:, None], other=0.0)
            acc = _pv(p, v, acc, in_dtype, DOT_F32)
        m_i = m_ij
    return acc, m_i, l_i, n_skipped


@triton.jit(do_not_specialize=["H", "GROUP", "N_Q", "N_KV", "NUM_KV_BLOCKS", "N_CTX_KEY", "WINDOW"])
def _block_sparse_fwd_kernel(
    Q, K, V, Out, Lse, KvNum, KvIdx, Stats,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_lb, stride_lh,
    stride_nb, stride_nh, stride_nm,
    stride_ib, stride_ih, stride_im, stride_in,
    H, GROUP, N_Q, N_KV, NUM_KV_BLOCKS,
    qk_scale, pv_thr2,
    N_CTX_KEY,  # autotune bucket only (ceil(log2(N_Q))); unused in the body
    WINDOW,  # sliding window in keys (read only with HAS_WINDOW)
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
):
    tl.static_assert(not (PV_SKIP and RESCALE_TAU > 0.0), "PV_SKIP needs the exact running max (RESCALE_TAU = 0)")
    tl.static_assert(not HAS_WINDOW or CAUSAL, "HAS_WINDOW needs CAUSAL")
    SUB: tl.constexpr = LAYOUT_BN // BLOCK_N
    num_m = tl.num_programs(0)
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = num_m - 1 - pid_m  # longest rows first: less tail imbalance
    pid_bh = tl.program_id(1)
    off_b = pid_bh // H
    off_h = pid_bh % H
    off_hk = off_h // GROUP
    OFF = N_KV - N_Q  # bottom-right causal alignment: row r sees keys <= r + OFF

    m0 = pid_m * BLOCK_M
    qb = m0 // LAYOUT_BM
    offs_r = tl.arange(0, BLOCK_M)
    offs_m = m0 + offs_r
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < N_Q

    q_base = Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
    k_base = K + off_b.to(tl.int64) * stride_kb + off_hk.to(tl.int64) * stride_kh
    v_base = V + off_b.to(tl.int64) * stride_vb + off_hk.to(tl.int64) * stride_vh
    idx_row = KvIdx + off_b.to(tl.int64) * stride_ib + off_h.to(tl.int64) * stride_ih + qb.to(tl.int64) * stride_im
    num = tl.load(KvNum + off_b.to(tl.int64) * stride_nb + off_h.to(tl.int64) * stride_nh + qb * stride_nm)
    num = tl.minimum(tl.maximum(num, 0), NUM_KV_BLOCKS)

    # key blocks j < full_lim need no element mask; blocks j >= vis_lim are invisible to every row
    row_last = tl.minimum(m0 + BLOCK_M, N_Q) - 1
    if CAUSAL:
        full_lim = tl.minimum(tl.maximum(m0 + OFF + 1, 0) // LAYOUT_BN, N_KV // LAYOUT_BN)
        last_key = row_last + OFF
        vis_lim = tl.where(last_key >= 0, last_key // LAYOUT_BN + 1, 0)
        vis_lim = tl.minimum(vis_lim, NUM_KV_BLOCKS)
    else:
        full_lim = N_KV // LAYOUT_BN
        vis_lim = NUM_KV_BLOCKS
    if HAS_WINDOW:
        # blocks j < below_lim end at or below the window start of the program's first row (so of every
        # row); blocks j < edge_lim start at or below the window start of its last row (need the mask)
        below_lim = tl.maximum(m0 + OFF - WINDOW + 1, 0) // LAYOUT_BN
        edge_key = row_last + OFF - WINDOW
        edge_lim = tl.where(edge_key >= 0, edge_key // LAYOUT_BN + 1, 0)
    if VEC_COUNT:
        # The list is ascending, so "entries < limit" is a count. The first chunk's load does not wait
        # for ``num`` (it is masked by the list width, not the count), so the program's first memory
        # round trip fetches Q, num and the list together instead of a chain of dependent probes.
        offs_c = tl.arange(0, LIST_CHUNK)
        ent = tl.load(idx_row + offs_c * stride_in, mask=offs_c < NUM_KV_BLOCKS, other=0)
        live = offs_c < num
        n_full = tl.sum((live & (ent < full_lim)).to(tl.int32), 0)
        n_vis = tl.sum((live & (ent < vis_lim)).to(tl.int32), 0)
        if HAS_WINDOW:
            n_below = tl.sum((live & (ent < below_lim)).to(tl.int32), 0)
            n_edge = tl.sum((live & (ent < edge_lim)).to(tl.int32), 0)
        for c0 in range(LIST_CHUNK, num, LIST_CHUNK):  # lists longer than one chunk (rare)
            cc = c0 + offs_c
            live = cc < num
            ent = tl.load(idx_row + cc * stride_in, mask=live, other=0)
            n_full += tl.sum((live & (ent < full_lim)).to(tl.int32), 0)
            n_vis += tl.sum((live & (ent < vis_lim)).to(tl.int32), 0)
            if HAS_WINDOW:
                n_below += tl.sum((live & (ent < below_lim)).to(tl.int32), 0)
                n_edge += tl.sum((live & (ent < edge_lim)).to(tl.int32), 0)
    else:
        n_full = _lower_bound(idx_row, stride_in, num, full_lim)
        n_vis = _lower_bound(idx_row, stride_in, num, vis_lim)
        if HAS_WINDOW:
            n_below = _lower_bound(idx_row, stride_in, num, below_lim)
            n_edge = _lower_bound(idx_row, stride_in, num, edge_lim)
    if HAS_WINDOW:
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
        k_desc = k_base  # placeholders for _masked_blocks' arguments (unused without USE_TMA)
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

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    n_skipped = num * 0

    if HAS_WINDOW:
        # ------------------------------------------------------------ lower-edge blocks: window (+ causal) mask
        # sub-tiles of the first edge block that end at or below the first row's window start are not
        # loaded either (only block below_lim can hold such sub-tiles: later blocks start above it)
        kb_first = tl.load(idx_row + n_below * stride_in, mask=n_edge > n_below, other=0)
        t_skip = tl.where(kb_first == below_lim, (m0 + OFF - WINDOW + 1 - below_lim * LAYOUT_BN) // BLOCK_N, 0)
        t_skip = tl.minimum(tl.maximum(t_skip, 0), SUB - 1)
        acc, m_i, l_i, n_skipped = _masked_blocks(
            n_below, n_edge, t_skip, q, acc, m_i, l_i, n_skipped,
            idx_row, stride_in, num, k_base, v_base, k_desc, v_desc, stride_kn, stride_vn,
            offs_m, offs_n, offs_d, N_Q, N_KV, NUM_KV_BLOCKS, OFF, WINDOW, qk_scale, pv_thr2,
            in_dtype, BLOCK_N, LAYOUT_BN, SUB, CAUSAL, True, PV_SKIP, DOT_F32, USE_TMA, PREFETCH)
        t_full = n_edge * SUB
        kb_nx = tl.load(idx_row + n_edge * stride_in, mask=n_full > n_edge, other=0)
    else:
        t_full = 0
        kb_nx = tl.load(idx_row)  # entry 0 always exists (the list width is Nb >= 1); used only if n_full > 0

    # ---------------------------------------------------------------- full blocks: no mask
    n_it = n_full * SUB
    # PREFETCH: the index of the next tile is loaded one iteration ahead and carried, so the K/V
    # addresses of an iteration do not depend on a load issued in that iteration. Measured on an H100
    # (benchmarks/kernel_variants.py): dense 32K causal 18.02 -> 17.05 ms; sparse rows within +-1.3%.
    for t in range(t_full, n_it):
        if PREFETCH:
            kb = tl.minimum(tl.maximum(kb_nx, 0), NUM_KV_BLOCKS - 1)
            kb_nx = tl.load(idx_row + tl.minimum((t + 1) // SUB, num - 1) * stride_in)
        else:
            j = t // SUB
            kb = tl.load(idx_row + j * stride_in)
            kb = tl.minimum(tl.maximum(kb, 0), NUM_KV_BLOCKS - 1)
        start_n = kb * LAYOUT_BN + (t % SUB) * BLOCK_N
        if USE_TMA:
            k = k_desc.load([start_n, 0]).T
        else:
            k = tl.load(k_base + start_n.to(tl.int64) * stride_kn + offs_n[None, :] * stride_kn + offs_d[:, None])
        if DOT_F32:
            k = k.to(tl.float32)
        qk = tl.dot(q, k)
        m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        if RESCALE_TAU > 0.0:
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
            # m_safe: a row whose scores so far are all -inf (only from infinite inputs) keeps p = 0
            # instead of exp2(-inf - -inf) = NaN, as the reference does
            m_safe = tl.where(m_ij == float("-inf"), 0.0, m_ij)
            p = tl.math.exp2(qk * qk_scale - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
        if PV_SKIP:
            gap = tl.max(qk, 1) * qk_scale - m_ij
            skippable = (gap < -pv_thr2) | (offs_m >= N_Q)
            skip = tl.min(skippable.to(tl.int32), 0) == 1
            if skip:
                n_skipped += 1
            else:
                if USE_TMA:
                    v = v_desc.load([start_n, 0])
                else:
                    v = tl.load(v_base + start_n.to(tl.int64) * stride_vn + offs_n[:, None] * stride_vn + offs_d[None, :])
                acc = _pv(p, v, acc, in_dtype, DOT_F32)
        else:
            if USE_TMA:
                v = v_desc.load([start_n, 0])
            else:
                v = tl.load(v_base + start_n.to(tl.int64) * stride_vn + offs_n[:, None] * stride_vn + offs_d[None, :])
            acc = _pv(p, v, acc, in_dtype, DOT_F32)
        m_i = m_ij

    # ---------------------------------------------------------------- blocks crossing the diagonal / the end
    acc, m_i, l_i, n_skipped = _masked_blocks(
        n_full, n_vis, 0, q, acc, m_i, l_i, n_skipped,
        idx_row, stride_in, num, k_base, v_base, k_desc, v_desc, stride_kn, stride_vn,
        offs_m, offs_n, offs_d, N_Q, N_KV, NUM_KV_BLOCKS, OFF, WINDOW, qk_scale, pv_thr2,
        in_dtype, BLOCK_N, LAYOUT_BN, SUB, CAUSAL, False, PV_SKIP, DOT_F32, USE_TMA, PREFETCH)

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
    else:
        first_kb = tl.load(idx_row)
        has = (offs_m * 0 + num) > 0
        if CAUSAL:
            has = has & (first_kb * LAYOUT_BN <= offs_m + OFF)
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
