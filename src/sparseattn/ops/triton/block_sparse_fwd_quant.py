"""Quantized Triton block-sparse attention forward (``@triton.jit`` code only).

Same structure, index format and semantics as :mod:`sparseattn.ops.triton.block_sparse_fwd` (one
program = ``BLOCK_M`` query rows of one (batch, head) inside one layout query block; its ascending
key-block list split into full blocks (no element mask), masked blocks (diagonal / end of keys) and
invisible blocks (never loaded); bottom-right causal; GQA by index; natural-log lse; rows that
attend nothing get out 0 / lse ``-inf``), with quantized operands:

* S = Q·Kᵀ in INT8 with int32 accumulation (``tl.dot`` on int8), dequantized by ``q_scale[row] *
  k_scale[col]``. The Q scale (``sm_scale * log2(e)`` folded in) is gathered per row once per
  program from its group (``(row // QW) * QT + (row % (QT * QS)) // QS``), so every Q granularity
  is the same code; the K scale is one scalar per kernel tile when a K group holds whole tiles
  (per-block / per-warp), else a per-column gather (per-thread).
* P·V either in the input dtype (``PV_FP8=False``: P rounded to bf16/fp16, fp32 accumulation, as the
  bf16 kernel) or in FP8 e4m3 (``PV_FP8=True``): ``P * 448`` rounded to e4m3, V pre-scaled per
  channel into e4m3 and stored transposed (``[D, N]``: K-major for the MMA); each tile's product is
  accumulated from zero and added to the fp32 accumulator (two-level accumulation: Hopper's FP8 MMA
  accumulates in reduced precision), and the output is multiplied by ``v_scale[d] / 448`` at the end.
  ``FP8_EMU`` (interpreter only) rounds to e4m3 in fp32 arithmetic and multiplies in fp32.
* The K smoothing (``K - mean_tokens(K)``) is exact for the output; the lse gets ``QRow[row] =
  sm_scale * q_row · mean`` added back. With Q smoothing (``HAS_KBIAS``) Q holds ``q - mean_tokens(q)`` and
  every score gets its key's ``KBias`` (``mean_tokens(q) · (k - mean_tokens(k))`` in fp32, log2 units) added
  before the mask, so the scores are those of the unsmoothed Q. ``QRow`` is NaN for a row of ``q`` with a non-finite entry:
  such a row's out and lse become NaN (when it attends any key).

Load paths (compile-time switches, the same bits either way): ``USE_TMA`` reads the K/V tiles through Hopper tensor
descriptors (rows past the end come back zero-filled and are masked like the pointer loads'), ``TMA_QO`` the Q tile
and the output store too, ``PREFETCH`` reads the next tile's key-block index one iteration ahead. Measured on an
H100 (BENCHMARKS.md, 2026-12-05): ``USE_TMA`` helps, the other two do not.

Non-finite ``k``: the K group's scale is NaN (set by the quantizer), so every row attending *any* key
of that group (<= 64 keys inside one layout block) is NaN — the rows attending the key itself plus, on
the causal diagonal, rows of the group that precede it (the same shape as the bf16 kernel's ``v``
exception). Non-finite ``v``: as the bf16 kernel (channel ``d`` of every row of a tile that loads it).
"""

from __future__ import annotations

import triton
import triton.language as tl

from sparseattn.ops.triton.block_sparse_fwd import (_block_list, _causal_limits, _head_bases, _kv_load,
                                                  _program_ids, _row_tile)
from sparseattn.ops.triton.common import online_softmax_update
from sparseattn.ops.triton.quantize import e4m3_round


@triton.jit
def _bf16_rne(x):
    """fp32 ``x`` (finite, >= 0 here: P) rounded to the nearest bf16 value, ties to even, kept in fp32."""
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _q_tile(
    q, qs, acc, m_i, l_i, kb, t_sub,
    k_base, v_base, k_desc, v_desc, ks_base, kb_base, stride_kn, stride_v2,
    offs_m, offs_n, offs_d, N_KV, OFF,
    BLOCK_N: tl.constexpr, LAYOUT_BN: tl.constexpr, KW: tl.constexpr, KT: tl.constexpr, KS: tl.constexpr,
    K_SCALAR: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr, PV_FP8: tl.constexpr, FP8_EMU: tl.constexpr, DOT_F32: tl.constexpr,
    HAS_KBIAS: tl.constexpr, USE_TMA: tl.constexpr,
):
    """One kernel tile of keys: online-softmax update of ``(acc, m_i, l_i)``."""
    start_n = kb * LAYOUT_BN + t_sub * BLOCK_N
    cols = start_n + offs_n
    col_ok = cols < N_KV
    if HAS_KBIAS:  # issued before the K load and the MMA so its latency hides behind them
        # unmasked: the launcher makes every KBias row readable up to the layout's rounded key count, and columns
        # past N_KV sit in MASK tiles (their scores become -inf below). The masked load cost ~300 PTX instructions
        # of selects and per-element copies, and register spills (benchmarks/ptx_compare.py --resources)
        kbias = tl.load(kb_base + cols)
    if USE_TMA:  # rows past N_KV come back zero-filled (their scores are masked below)
        k = k_desc.load([start_n, 0]).T
    else:
        k = _kv_load(k_base + start_n.to(tl.int64) * stride_kn + offs_n[None, :] * stride_kn + offs_d[:, None],
                     col_ok, MASK, 1)
    qk = tl.dot(q, k).to(tl.float32)  # int8 x int8 -> int32: exact
    if K_SCALAR:
        ks = tl.load(ks_base + start_n // KW)
        s = qk * (qs * ks)[:, None]
    else:
        kg = (cols // KW) * KT + (cols % (KT * KS)) // KS
        ks = tl.load(ks_base + kg, mask=col_ok, other=0.0)
        s = qk * qs[:, None] * ks[None, :]
    if HAS_KBIAS:  # Q smoothing: mean_tokens(q) . k of each key, fp32 (log2 units)
        s = s + kbias[None, :]
    if MASK:
        keep = col_ok[None, :]
        if CAUSAL:
            keep = keep & (cols[None, :] <= offs_m[:, None] + OFF)
        s = tl.where(keep, s, float("-inf"))
    p, m_ij, l_i, acc = online_softmax_update(s, m_i, l_i, acc)
    if PV_FP8:
        # V stored transposed [D, N]: load a [D, BLOCK_N] tile (tokens contiguous), use its transpose
        if USE_TMA:
            vt = v_desc.load([0, start_n])
        else:
            vt = _kv_load(v_base + offs_d[:, None].to(tl.int64) * stride_v2 + cols[None, :], col_ok, MASK, 1)
        if FP8_EMU:
            p8 = e4m3_round(p * 448.0)
            acc += tl.dot(p8, tl.trans(vt.to(tl.float32)))
        else:
            p8 = (p * 448.0).to(tl.float8e4nv)
            acc += tl.dot(p8, tl.trans(vt))
    else:
        if USE_TMA:
            v = v_desc.load([start_n, 0])
        else:
            v = _kv_load(v_base + start_n.to(tl.int64) * stride_v2 + offs_n[:, None] * stride_v2 + offs_d[None, :],
                         col_ok, MASK, 0)
        if DOT_F32:
            # interpreter (bf16 only): its fp32 -> bf16 cast truncates; round to nearest even as GPUs do
            acc = tl.dot(_bf16_rne(p), v.to(tl.float32), acc)
        else:
            acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, m_ij, l_i


@triton.jit
def _q_tiles(
    t_lo, t_hi, kb_nx, idx_row, stride_in, num, NUM_KV_BLOCKS, q, qs, acc, m_i, l_i,
    k_base, v_base, k_desc, v_desc, ks_base, kb_base, stride_kn, stride_v2, offs_m, offs_n, offs_d, N_KV, OFF,
    SUB: tl.constexpr, BLOCK_N: tl.constexpr, LAYOUT_BN: tl.constexpr, KW: tl.constexpr, KT: tl.constexpr,
    KS: tl.constexpr, K_SCALAR: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr, PV_FP8: tl.constexpr,
    FP8_EMU: tl.constexpr, DOT_F32: tl.constexpr, HAS_KBIAS: tl.constexpr, USE_TMA: tl.constexpr, PREFETCH: tl.constexpr,
):
    """Kernel tiles ``t_lo .. t_hi`` of the list (``SUB`` per entry) folded into ``(acc, m_i, l_i)``.

    ``kb_nx``: the list entry of tile ``t_lo``. With ``PREFETCH`` it is carried one iteration ahead, so the K/V
    addresses of an iteration do not wait on a load issued in that iteration (as the bf16 kernel; measured slower
    here on an H100, so off by default). Triton inlines this call: each ``MASK`` value compiles to its own loop.
    """
    for t in range(t_lo, t_hi):
        if PREFETCH:
            kb = tl.minimum(tl.maximum(kb_nx, 0), NUM_KV_BLOCKS - 1)
            kb_nx = tl.load(idx_row + tl.minimum((t + 1) // SUB, num - 1) * stride_in)
        else:
            kb = tl.load(idx_row + (t // SUB) * stride_in)
            kb = tl.minimum(tl.maximum(kb, 0), NUM_KV_BLOCKS - 1)
        acc, m_i, l_i = _q_tile(q, qs, acc, m_i, l_i, kb, t % SUB, k_base, v_base, k_desc, v_desc, ks_base, kb_base,
                                stride_kn, stride_v2, offs_m, offs_n, offs_d, N_KV, OFF, BLOCK_N, LAYOUT_BN, KW, KT, KS,
                                K_SCALAR, MASK, CAUSAL, PV_FP8, FP8_EMU, DOT_F32, HAS_KBIAS, USE_TMA)
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["H", "GROUP", "N_Q", "N_KV", "NUM_KV_BLOCKS"])
def _block_sparse_fwd_quant_kernel(
    Q, K, V, Out, Lse, QScale, KScale, QRow, VScale, KvNum, KvIdx, KBias,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_v2,
    stride_ob, stride_oh, stride_om,
    stride_lb, stride_lh,
    stride_qsb, stride_qsh,
    stride_ksb, stride_ksh,
    stride_rb, stride_rh,
    stride_kbb, stride_kbh,
    stride_nb, stride_nh, stride_nm,
    stride_ib, stride_ih, stride_im, stride_in,
    H, GROUP, N_Q, N_KV, NUM_KV_BLOCKS,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    LAYOUT_BM: tl.constexpr,
    LAYOUT_BN: tl.constexpr,
    CAUSAL: tl.constexpr,
    QW: tl.constexpr, QT: tl.constexpr, QS: tl.constexpr,  # Q scale groups (see module docstring)
    KW: tl.constexpr, KT: tl.constexpr, KS: tl.constexpr,  # K scale groups
    K_SCALAR: tl.constexpr,  # one K group holds whole kernel tiles (KT == 1 and KW % BLOCK_N == 0)
    PV_FP8: tl.constexpr,
    FP8_EMU: tl.constexpr = False,  # interpreter: e4m3 rounding in fp32 arithmetic
    DOT_F32: tl.constexpr = False,  # interpreter: widen bf16 P·V operands (its bf16 dot is wrong)
    LIST_CHUNK: tl.constexpr = 64,
    HAS_KBIAS: tl.constexpr = False,  # Q smoothing's per-key score term (KBias, per query head)
    USE_TMA: tl.constexpr = False,  # K/V tiles through device-side tensor descriptors (Hopper TMA)
    PREFETCH: tl.constexpr = False,  # read the next tile's key-block index one iteration ahead
    TMA_QO: tl.constexpr = False,  # Q load and O store through tensor descriptors too (fewer address registers)
):
    SUB: tl.constexpr = LAYOUT_BN // BLOCK_N
    num_m, pid_m, pid_bh, off_b, off_h, off_hk = _program_ids(H, GROUP, CAUSAL)
    OFF = N_KV - N_Q
    m0, qb, offs_r, offs_m, offs_n, offs_d, row_ok = _row_tile(pid_m, N_Q, HEAD_DIM, BLOCK_M, BLOCK_N, LAYOUT_BM)

    q_base, k_base, v_base = _head_bases(Q, K, V, off_b, off_h, off_hk, stride_qb, stride_qh, stride_kb, stride_kh,
                                         stride_vb, stride_vh)
    ks_base = KScale + off_b.to(tl.int64) * stride_ksb + off_hk.to(tl.int64) * stride_ksh
    kb_base = KBias + off_b.to(tl.int64) * stride_kbb + off_h.to(tl.int64) * stride_kbh
    idx_row, num = _block_list(KvNum, KvIdx, off_b, off_h, qb, stride_nb, stride_nh, stride_nm, stride_ib, stride_ih,
                               stride_im, NUM_KV_BLOCKS)
    row_last, full_lim, vis_lim = _causal_limits(m0, N_Q, N_KV, NUM_KV_BLOCKS, OFF, BLOCK_M, LAYOUT_BN, CAUSAL)
    # ascending list: "entries < limit" is a count
    offs_c = tl.arange(0, LIST_CHUNK)
    n_full = num * 0
    n_vis = num * 0
    for c0 in range(0, num, LIST_CHUNK):
        cc = c0 + offs_c
        live = cc < num
        ent = tl.load(idx_row + cc * stride_in, mask=live, other=0)
        n_full += tl.sum((live & (ent < full_lim)).to(tl.int32), 0)
        n_vis += tl.sum((live & (ent < vis_lim)).to(tl.int32), 0)

    if TMA_QO:  # rows past N_Q are zero-filled on load and clipped on store by the copy engine
        q_desc = tl.make_tensor_descriptor(q_base, shape=[N_Q, HEAD_DIM], strides=[stride_qm, 1],
                                           block_shape=[BLOCK_M, HEAD_DIM])
        q = q_desc.load([m0, 0])
    else:
        q = tl.load(q_base + m0.to(tl.int64) * stride_qm + offs_r[:, None] * stride_qm + offs_d[None, :],
                    mask=row_ok[:, None], other=0)
    qg = (offs_m // QW) * QT + (offs_m % (QT * QS)) // QS
    qs = tl.load(QScale + off_b.to(tl.int64) * stride_qsb + off_h.to(tl.int64) * stride_qsh + qg, mask=row_ok, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    if USE_TMA:
        k_desc = tl.make_tensor_descriptor(k_base, shape=[N_KV, HEAD_DIM], strides=[stride_kn, 1],
                                           block_shape=[BLOCK_N, HEAD_DIM])
        if PV_FP8:  # V stored transposed [D, N_pad]
            v_desc = tl.make_tensor_descriptor(v_base, shape=[HEAD_DIM, N_KV], strides=[stride_v2, 1],
                                               block_shape=[HEAD_DIM, BLOCK_N])
        else:
            v_desc = tl.make_tensor_descriptor(v_base, shape=[N_KV, HEAD_DIM], strides=[stride_v2, 1],
                                               block_shape=[BLOCK_N, HEAD_DIM])
    else:
        k_desc = k_base  # placeholders (unused without USE_TMA)
        v_desc = v_base

    # full blocks (no element mask), then the blocks crossing the diagonal / the end of the keys
    kb_nx = tl.load(idx_row)  # entry 0 always exists (the list width is >= 1); used only if n_full > 0
    acc, m_i, l_i = _q_tiles(0, n_full * SUB, kb_nx, idx_row, stride_in, num, NUM_KV_BLOCKS, q, qs, acc, m_i, l_i,
                             k_base, v_base, k_desc, v_desc, ks_base, kb_base, stride_kn, stride_v2, offs_m, offs_n,
                             offs_d, N_KV, OFF, SUB, BLOCK_N, LAYOUT_BN, KW, KT, KS, K_SCALAR, False, CAUSAL, PV_FP8,
                             FP8_EMU, DOT_F32, HAS_KBIAS, USE_TMA, PREFETCH)
    kb_nx = tl.load(idx_row + n_full * stride_in, mask=n_vis > n_full, other=0)
    acc, m_i, l_i = _q_tiles(n_full * SUB, n_vis * SUB, kb_nx, idx_row, stride_in, num, NUM_KV_BLOCKS, q, qs, acc, m_i,
                             l_i, k_base, v_base, k_desc, v_desc, ks_base, kb_base, stride_kn, stride_v2, offs_m, offs_n,
                             offs_d, N_KV, OFF, SUB, BLOCK_N, LAYOUT_BN, KW, KT, KS, K_SCALAR, True, CAUSAL, PV_FP8,
                             FP8_EMU, DOT_F32, HAS_KBIAS, USE_TMA, PREFETCH)

    # epilogue (as the bf16 kernel): a row attends a key iff its list is non-empty and (causal) the
    # first selected block starts at or below its last visible key
    first_kb = tl.load(idx_row)
    has = (offs_m * 0 + num) > 0
    if CAUSAL:
        has = has & (first_kb * LAYOUT_BN <= offs_m + OFF)
    l_safe = tl.where(has, l_i, 1.0)
    out = acc / l_safe[:, None]
    if PV_FP8:
        vsc = tl.load(VScale + pid_bh.to(tl.int64) // GROUP * HEAD_DIM + offs_d)  # v_scale[d] / 448, per kv head
        out = out * vsc[None, :]
    qrow = tl.load(QRow + off_b.to(tl.int64) * stride_rb + off_h.to(tl.int64) * stride_rh + offs_m, mask=row_ok, other=0.0)
    out = tl.where(has[:, None], out + qrow[:, None] * 0.0, 0.0)  # NaN rows of q stay NaN
    lse = tl.where(has, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453 + qrow, float("-inf"))
    o_base = Out + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh
    if TMA_QO:
        o_desc = tl.make_tensor_descriptor(o_base, shape=[N_Q, HEAD_DIM], strides=[stride_om, 1],
                                           block_shape=[BLOCK_M, HEAD_DIM])
        o_desc.store([m0, 0], out.to(Out.dtype.element_ty))
    else:
        tl.store(o_base + m0.to(tl.int64) * stride_om + offs_r[:, None] * stride_om + offs_d[None, :],
                 out.to(Out.dtype.element_ty), mask=row_ok[:, None])
    l_base = Lse + off_b.to(tl.int64) * stride_lb + off_h.to(tl.int64) * stride_lh
    tl.store(l_base + offs_m, lse, mask=row_ok)
