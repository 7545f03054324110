"""Triton decode-attention kernels (split-KV "flash-decoding", ``@triton.jit`` code only).

:func:`_decode_split_kernel` — one program computes ``BLOCK_M`` rows of one (batch, KV head): the
``G * LQ`` query rows of the KV head's ``G`` query heads (``G = H // H_kv``) and ``LQ`` new tokens are
packed into one tile, row ``r`` = (head ``hkv * G + r // LQ``, token ``r % LQ``), so each K/V tile is
read once for the whole group. The keys of one sequence are cut into ``NUM_SPLITS`` consecutive
ranges (per sequence: the cut follows that sequence's own length), one range per program along grid
axis 0 (``NUM_SPLITS`` is a runtime argument: changing it does not recompile). A program writes its
range's partial state — fp32 ``out`` and natural-log ``lse`` — and :func:`_decode_merge_kernel`
merges the ranges exactly (the rule of :func:`sparseattn.state.merge_states`). With ``NUM_SPLITS == 1``
the split kernel writes the final output (in q's dtype) and lse directly (``SPLIT=False``) and no
merge runs.

``PAGED`` (sparse decode): the keys a program walks are the concatenation of the selected pages
``PageIdx[b, hkv, :PageNum[b, hkv]]`` (``PAGE`` keys each); position ``t`` of that virtual sequence is
key ``PageIdx[t // PAGE] * PAGE + t % PAGE``. K/V rows are gathered per key (pointer loads); pages
that are not listed are never read.

Masking: row (head, token ``i``) attends key ``j`` iff ``j < seqlen - LQ + i + 1`` (bottom-right
causal among the ``LQ`` new tokens; keys at or beyond ``seqlen`` are never attended). K/V loads are
masked to ``j < seqlen`` with zero fill, so whatever the cache holds beyond a sequence's length
(garbage, NaN) never reaches the output. A non-finite ``v[j]`` for one of the last ``LQ - 1`` keys
reaches the rows of the same tile that do not attend ``j`` (``0 * NaN`` in the P·V product), the
exception the prefill kernel documents for its diagonal tile (docs/ARCHITECTURE.md, "Non-finite
inputs").

``HAS_KV_SCALE`` (quantized cache): K and V hold int8 or float8 e4m3 values with one float32 scale per
key (``KScale``/``VScale``, ``(B, H_kv, N_max)`` through their strides; the convention of
``state/kv_cache.quantize`` and the prefill kernel's ``HAS_KV_SCALE``). A K tile is converted to q's
dtype in registers (exact: int8 and e4m3 values are representable in fp16 and bf16) and its scores are
multiplied by the keys' scales (``q·(s_j k_j) = s_j (q·k_j)``); the value scales are folded into P
before P is rounded to q's dtype for the P·V product. The kernel reads the quantized bytes (plus 4 bytes
of scale per key and tensor) and nothing else; no dequantised copy exists. Scale loads are masked like
the K/V loads (a NaN scale beyond ``seqlen`` is never read). ``FULL_TILES`` (not paged) drops the load
masks: in a range's partial last tile the columns past the range read the range's last key again (a key
below ``seqlen``), and their scores are masked as before, so the output is the same bit for bit. With
``HAS_KV_SCALE`` off (the default) the kernel is unchanged apart from the unused pointer/stride parameters.

Variants of the quantized path (``HAS_KV_SCALE``; constexprs, chosen per launch config so the fastest can
be picked by measurement; ``0`` is the path above, the default):

* ``QK_MODE`` — how Q·Kᵀ meets the 8-bit keys. ``1`` ("q8"): each query row is quantized in the kernel
  to the cache's format (int8: ``round(q / s_q)``, ``s_q = max|q_row| / 127``; e4m3: ``q / s_q`` rounded to
  e4m3, ``s_q = max|q_row| / 448``) and ``tl.dot`` runs on the 8-bit operands (int8 x int8 -> int32,
  e4m3 x e4m3 -> fp32): the K tile is never converted; scores = dot * s_q * s_k. Changes the numerics (q
  carries 8-bit precision). ``2`` ("q8x2"): q and its rounding residual (scaled into the format's range)
  as two 8-bit dots, combined exactly in int32 (int8) / fp32 (e4m3): q carries ~15 (int8) / ~7 (e4m3)
  bits, still no K conversion. ``3`` ("fp16"): the K tile is converted to fp16 (exact for int8 and e4m3;
  the cheaper conversion on NVIDIA GPUs) and q to fp16 after multiplying each row by a power of two that
  puts its largest |value| in [2**13, 2**14) (exact: no overflow, bf16 values keep every bit unless
  2**27 times smaller than the row's max). With a non-finite value in a query row, modes 1 and 2 give
  that row NaN scores (the 8-bit q cannot carry it); mode 3 propagates it as the default does.
* ``PV_MODE`` — how P·V meets the 8-bit values. ``1`` ("fp16"): V converted to fp16; ``P * s_v`` divided by
  the tile's largest ``s_v`` (so it lies in [0, 1]) and rounded to fp16 (finer than bf16's P), the
  product multiplied back by that scale. ``2`` ("fp8", e4m3 cache only): the same normalised P times 256
  rounded to e4m3 and ``tl.dot`` on e4m3 x e4m3 (no V conversion; P carries 3 mantissa bits). ``3`` ("i8x2",
  int8 cache only): the normalised P times 127 as an int8 ``hi`` (rounded) plus its residual times 254 as an int8
  ``lo``, two int8 x int8 -> int32 dots combined exactly in int32 (P to 1/64516 of the tile's largest P * s_v,
  absolute: finer than bf16's P above about 1% of that maximum, coarser below, where the terms are small); no V
  conversion at all. A non-finite P * s_v makes its row NaN. ``BLOCK_N`` 32..256. ``4`` ("fp16w", int8 cache stored
  ``[keys, head_dim]``): the arithmetic of ``1``, but V is loaded as int32 words of four values and converted to
  fp16 in registers (:func:`_words_to_f16`) before the compiler stages it for the product, so the operand reaches
  the tensor cores through a transposing 16-bit shared-memory load; an int8 V tile taken to the operand directly
  is gathered from shared memory one byte per instruction (the ``[keys, head_dim]`` tile must be transposed).

``CAUSAL=False``: every row attends all keys ``j < seqlen`` (a segment that lies wholly before the new
tokens, e.g. the quantized part of a mixed cache); the default ``True`` is the bottom-right rule below.

Numerics as in :mod:`sparseattn.ops.triton.block_sparse_fwd`: fp32 accumulation, scores in log2 units
(``exp2``), natural-log lse at the end; rows that attend no key get out 0 and lse ``-inf``; a row
that attends keys but whose sum is NaN (non-finite inputs) stays NaN. No atomics: deterministic.
"""

from __future__ import annotations

import triton
import triton.language as tl

from sparseattn.ops.triton.common import online_softmax_update


@triton.jit
def _i8_to_f16(x, FAST: tl.constexpr):
    """int8 ``x`` to fp16 (exact: |x| <= 128). ``FAST`` (a CUDA GPU): four values per 32-bit register with
    integer byte moves and one packed fp16 subtraction per pair -- ``x ^ 0x80`` is ``x + 128`` as a byte,
    placed under the exponent of 1024.0 (``0x64``) it reads ``1024 + x + 128`` in fp16, exact, and
    subtracting 1152.0 leaves ``x`` (the trick of fast int8 GEMM dequantisers) -- instead of one
    int-to-float conversion per value, a quarter-rate instruction that capped the INT8 decode's bandwidth.
    Bitwise the same values as ``x.to(tl.float16)`` (tested on the GPU)."""
    if FAST:
        return tl.inline_asm_elementwise(
            """{
            .reg .b32 u, m;
            xor.b32 u, $2, 0x80808080;
            prmt.b32 $0, u, 0x64646464, 0x4140;
            prmt.b32 $1, u, 0x64646464, 0x4342;
            mov.b32 m, 0x64806480;
            sub.f16x2 $0, $0, m;
            sub.f16x2 $1, $1, m;
            }""",
            "=r,=r,r", [x], dtype=tl.float16, is_pure=True, pack=4)
    else:
        return x.to(tl.float16)


@triton.jit
def _words_to_f16(w, FAST: tl.constexpr):
    """int32 words holding four int8 values each (byte 0 the lowest column) -> fp16 ``[rows, 4 * cols]``, exact.
    ``FAST`` (a CUDA GPU): byte moves as in :func:`_i8_to_f16`; else shifts and plain conversions."""
    if FAST:
        a, b, c, d = tl.inline_asm_elementwise(
            """{
            .reg .b32 u, m, lo, hi;
            xor.b32 u, $4, 0x80808080;
            prmt.b32 lo, u, 0x64646464, 0x4140;
            prmt.b32 hi, u, 0x64646464, 0x4342;
            mov.b32 m, 0x64806480;
            sub.f16x2 lo, lo, m;
            sub.f16x2 hi, hi, m;
            mov.b32 {$0, $1}, lo;
            mov.b32 {$2, $3}, hi;
            }""",
            "=h,=h,=h,=h,r", [w], dtype=(tl.float16, tl.float16, tl.float16, tl.float16), is_pure=True, pack=1)
    else:
        a = ((w << 24) >> 24).to(tl.float16)
        b = ((w << 16) >> 24).to(tl.float16)
        c = ((w << 8) >> 24).to(tl.float16)
        d = (w >> 24).to(tl.float16)
    x = tl.join(tl.join(a, c), tl.join(b, d))  # join appends its axis: [.., j, i] = (a, c)[j] if i == 0 else (b, d)[j]
    return tl.reshape(x, [w.shape[0], w.shape[1] * 4])


@triton.jit
def _to_e4m3(x, EXACT: tl.constexpr):
    """fp32 ``x`` (within e4m3's range) to float8 e4m3, round to nearest even. ``EXACT`` (the interpreter,
    whose conversion mis-rounds values just below a power of two, e.g. 31.97 -> 16): round the fp32 bits to
    3 mantissa bits first, so the conversion only has exactly representable normal values to convert."""
    if EXACT:
        b = x.to(tl.int32, bitcast=True)
        b = (b + 0x7FFFF + ((b >> 20) & 1)) & -0x100000
        x = b.to(tl.float32, bitcast=True)
    return x.to(tl.float8e4nv)


@triton.jit
def _attend_tile(q, q_lp, q_lo, row_mul, k, v, ks, vs, key, key_ok, lim, m_i, l_i, acc, qk_scale,
                 in_dtype: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr, HAS_KV_SCALE: tl.constexpr,
                 QK_MODE: tl.constexpr, PV_MODE: tl.constexpr, FAST_I8: tl.constexpr, FP8_EXACT: tl.constexpr):
    """One loaded K/V tile into the running state ``(m_i, l_i, acc)`` of :func:`_decode_split_kernel`: the scores
    in the launch's Q·K mode, masked to ``-inf`` for keys outside ``key_ok`` or at/after a row's limit ``lim``, the
    online softmax, the P·V product in its P·V mode. ``q_lp`` / ``q_lo`` / ``row_mul``: the 8-bit query and its
    scale (``QK_MODE != 0``; placeholders otherwise). ``in_dtype``: q's dtype before any widening (``DOT_F32``)."""
    if HAS_KV_SCALE and QK_MODE == 1:  # 8-bit q x 8-bit K: no conversion of the K tile
        if k.dtype == tl.int8:
            qk = tl.dot(q_lp, k, out_dtype=tl.int32).to(tl.float32)
        else:
            qk = tl.dot(q_lp, k)
    elif HAS_KV_SCALE and QK_MODE == 2:  # q's residual as a second 8-bit dot
        if k.dtype == tl.int8:  # |hi . k| * 254 + |lo . k| < 2**31 for head_dim <= 256
            qk = (tl.dot(q_lp, k, out_dtype=tl.int32) * 254 + tl.dot(q_lo, k, out_dtype=tl.int32)).to(tl.float32)
        else:
            qk = tl.dot(q_lp, k) + tl.dot(q_lo, k) * 0.0625
    elif HAS_KV_SCALE and QK_MODE == 3:  # fp16 K (exact) against the power-of-two-scaled fp16 q
        if DOT_F32:
            qk = tl.dot(q_lp.to(tl.float32), k.to(tl.float16).to(tl.float32))
        else:
            qk = tl.dot(q_lp, _i8_to_f16(k, FAST_I8) if k.dtype == tl.int8 else k.to(tl.float16))
    else:
        if HAS_KV_SCALE:
            # int8 (|x| <= 127) and fp8 e4m3 values are exact in fp16 and bf16 (DOT_F32, the interpreter:
            # straight to fp32, the same values; its int8 -> bf16 conversion is wrong)
            k = k.to(tl.float32 if DOT_F32 else in_dtype)
            if PV_MODE == 0:  # V converted with K, as before the variants existed
                v = v.to(tl.float32 if DOT_F32 else in_dtype)
        if DOT_F32:
            k = k.to(tl.float32)
        if IEEE:
            qk = tl.dot(q, k, input_precision="ieee")
        else:
            qk = tl.dot(q, k)
    if HAS_KV_SCALE:  # per-key scale of the quantized K: q·(s_j k_j) = s_j (q·k_j)
        qk = qk * ks[None, :]
    keep = key_ok[None, :] & (key[None, :] < lim[:, None])
    if HAS_KV_SCALE and QK_MODE != 0:
        s = tl.where(keep, qk * row_mul[:, None], float("-inf"))
    else:
        s = tl.where(keep, qk * qk_scale, float("-inf"))
    p, m_ij, l_i, acc = online_softmax_update(s, m_i, l_i, acc)  # a row all -inf so far keeps p = 0
    if HAS_KV_SCALE and PV_MODE != 0:
        # P * s_v divided by the tile's largest s_v lies in [0, 1] (padding keys have s_v = 0); the
        # product is multiplied back (a NaN s_v still reaches P; tl.max skips it)
        c = tl.max(vs, 0)
        c = tl.where(c > 0, c, 1.0)
        if PV_MODE == 1 or PV_MODE == 4:
            p16 = (p * (vs / c)[None, :]).to(tl.float16)
            if PV_MODE == 4:  # V already fp16 (converted from int32 words at the load, in registers)
                acc += tl.dot(p16, v) * c
            elif DOT_F32:
                acc += tl.dot(p16.to(tl.float32), v.to(tl.float16).to(tl.float32)) * c
            else:
                acc += tl.dot(p16, _i8_to_f16(v, FAST_I8) if v.dtype == tl.int8 else v.to(tl.float16)) * c
        elif PV_MODE == 2:
            p8 = _to_e4m3(p * (vs * (256.0 / c))[None, :], FP8_EXACT)
            acc += tl.dot(p8, v) * (c * 0.00390625)
        else:  # PV_MODE 3, int8 cache: P * s_v in 127ths as two int8 dots (hi + residual), V never converted
            x = p * (vs * (127.0 / c))[None, :]  # in [0, 127]; NaN / inf where a scale or P is
            ok = x < float("inf")  # False for NaN and +inf
            xs = tl.where(ok, x, 0.0)
            p_hi = (xs + 0.5).to(tl.int8)  # x >= 0: round half up
            r = (xs - p_hi.to(tl.float32)) * 254.0  # the residual, in [-127, 127]
            p_lo = tl.where(r >= 0, r + 0.5, r - 0.5).to(tl.int8)
            # |hi . v| * 254 + |lo . v| <= 127 * 127 * BLOCK_N * 255 < 2**31 for BLOCK_N <= 256
            part = (tl.dot(p_hi, v, out_dtype=tl.int32) * 254 + tl.dot(p_lo, v, out_dtype=tl.int32)).to(tl.float32)
            bad = tl.max(tl.where(ok, 0.0, 1.0), 1) > 0  # a row that met a non-finite P * s_v: NaN
            acc += tl.where(bad[:, None], float("nan"), part * (c / 32258.0))
    else:
        if HAS_KV_SCALE:  # per-key scale of the quantized V folded into P: sum_j p_j (s_j v_j)
            p = p * vs[None, :]
            if QK_MODE != 0:  # (QK_MODE 0 converted V with K)
                v = v.to(tl.float32 if DOT_F32 else in_dtype)
        p = p.to(in_dtype)  # P rounded to the input dtype, as FlashAttention does
        if DOT_F32:
            acc = tl.dot(p.to(tl.float32), v.to(tl.float32), acc)
        elif IEEE:
            acc = tl.dot(p, v, acc, input_precision="ieee")
        else:
            acc = tl.dot(p, v, acc)
    return m_ij, l_i, acc


@triton.jit
def _vkeys_tile(q, q_lp, q_lo, row_mul, k_lo, v_lo, ks_base, vs_base, t0, lo, hi, offs_n, stride_kn, stride_ksn,
                stride_vsn, lim, m_i, l_i, acc, qk_scale, in_dtype: tl.constexpr, DOT_F32: tl.constexpr,
                IEEE: tl.constexpr, HAS_KV_SCALE: tl.constexpr, QK_MODE: tl.constexpr, PV_MODE: tl.constexpr,
                FAST_I8: tl.constexpr, FP8_EXACT: tl.constexpr, MASKED: tl.constexpr, V_STEP: tl.constexpr):
    """The ``V_KEYS`` walk's tile at offset ``t0`` of the range ``[lo, hi)`` (V keys-contiguous: ``v_lo`` steps
    ``V_STEP`` elements per key of ``t0``, 1 for a ``(D, N)`` buffer, ``HEAD_DIM`` for a tile-blocked V): loaded
    without element masks for a whole tile, with them for the range's partial last tile (``MASKED``), then
    :func:`_attend_tile`."""
    pos = lo + t0 + offs_n
    key_ok = pos < hi
    if MASKED:
        k = tl.load(k_lo + t0 * stride_kn, mask=key_ok[None, :], other=0.0)
        v = tl.load(v_lo + t0 * V_STEP, mask=key_ok[:, None], other=0.0)
    else:
        k = tl.load(k_lo + t0 * stride_kn)
        v = tl.load(v_lo + t0 * V_STEP)
    if HAS_KV_SCALE:
        if MASKED:
            ks = tl.load(ks_base + pos * stride_ksn, mask=key_ok, other=0.0)
            vs = tl.load(vs_base + pos * stride_vsn, mask=key_ok, other=0.0)
        else:
            ks = tl.load(ks_base + pos * stride_ksn)
            vs = tl.load(vs_base + pos * stride_vsn)
    else:
        ks = pos  # unused placeholders
        vs = pos
    return _attend_tile(q, q_lp, q_lo, row_mul, k, v, ks, vs, pos, key_ok, lim, m_i, l_i, acc, qk_scale, in_dtype,
                        DOT_F32, IEEE, HAS_KV_SCALE, QK_MODE, PV_MODE, FAST_I8, FP8_EXACT)


@triton.jit(do_not_specialize=["H", "G", "LQ", "N_MAX", "MAX_PAGES", "NUM_SPLITS"])
def _decode_split_kernel(
    Q, K, V, SeqLens, PageIdx, PageNum, Out, Lse, OPart, LPart,
    KScale, VScale,  # read only with HAS_KV_SCALE: fp32 per-key scales (B, H_kv, N_max) through the strides below
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_lb, stride_lh,
    stride_pb, stride_ph,
    stride_nb,
    stride_ksb, stride_ksh, stride_ksn,
    stride_vsb, stride_vsh, stride_vsn,
    H, G, LQ, N_MAX, MAX_PAGES, NUM_SPLITS,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr,  # NUM_SPLITS > 1: write partial states for the merge kernel
    HAS_SEQLENS: tl.constexpr,
    PAGED: tl.constexpr,
    PAGE: tl.constexpr,
    DOT_F32: tl.constexpr = False,  # interpreter only: widen operands before tl.dot (exact products)
    IEEE: tl.constexpr = False,  # fp32 inputs: full-precision dot (no tf32)
    HAS_KV_SCALE: tl.constexpr = False,  # K/V hold int8/fp8 values with one fp32 scale per key (dequantised here)
    CAUSAL: tl.constexpr = True,  # False: every row attends all keys below seqlen (no causal shift)
    QK_MODE: tl.constexpr = 0,  # HAS_KV_SCALE: 0 dequant K, 1 8-bit q dot, 2 8-bit q + residual dots, 3 fp16 K
    PV_MODE: tl.constexpr = 0,  # HAS_KV_SCALE: 0 dequant V, 1 fp16 V and normalised fp16 P, 2 e4m3 P x e4m3 V,
    #                             3 int8 P (hi + residual) x int8 V, 4 as 1 with V loaded as int32 words (int8, plain)
    FAST_I8: tl.constexpr = False,  # int8 K/V to fp16 by byte moves (QK_MODE 3 / PV_MODE 1; CUDA only)
    FP8_EXACT: tl.constexpr = False,  # interpreter only: exact rounding to e4m3 (see _to_e4m3)
    FULL_TILES: tl.constexpr = False,  # not PAGED: K/V/scale loads without element masks (see the loop)
    V_KEYS: tl.constexpr = False,  # V stored keys-contiguous: ``stride_vn`` is then the stride of head_dim (see below)
    V_STEP: tl.constexpr = 1,  # V_KEYS, not PAGED: HEAD_DIM for a tile-blocked V (see below), else 1
):
    pid_s = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_bk = tl.program_id(2)
    H_KV = H // G
    off_b = pid_bk // H_KV
    off_hk = pid_bk % H_KV

    if HAS_SEQLENS:
        seqlen = tl.load(SeqLens + off_b)
        seqlen = tl.minimum(tl.maximum(seqlen, 0), N_MAX)  # out-of-range lengths can never read out of bounds
    else:
        seqlen = N_MAX

    # ---------------------------------------------------------------- rows: (head, token) pairs of the group
    offs_r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_r < G * LQ
    g = offs_r // LQ
    tok = offs_r % LQ
    head = off_hk * G + g
    # row attends keys j < lim (bottom-right causal among the LQ new tokens); padded rows attend nothing
    if CAUSAL:
        lim = tl.where(row_ok, seqlen - LQ + tok + 1, 0)
    else:
        lim = tl.where(row_ok, seqlen, 0)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)

    q_ptr = (Q + off_b.to(tl.int64) * stride_qb + head.to(tl.int64)[:, None] * stride_qh
             + tok[:, None] * stride_qm + offs_d[None, :])
    q = tl.load(q_ptr, mask=row_ok[:, None], other=0.0)
    in_dtype = q.dtype
    q_lp = q  # placeholders: the 8-bit query, its residual and scale exist only with HAS_KV_SCALE and QK_MODE != 0
    q_lo = q
    row_mul = qk_scale
    if HAS_KV_SCALE and QK_MODE != 0:
        # per-row multiplier of the raw scores: qk_scale / (the row's q scale)
        row_mul = tl.full([BLOCK_M], 1.0, dtype=tl.float32) * qk_scale
        qf = q.to(tl.float32)
        fin = tl.abs(qf) < float("inf")  # False for NaN and +-inf
        amax = tl.max(tl.where(fin, tl.abs(qf), 0.0), 1)
        if QK_MODE == 3:
            # a power of two puts the row's max |q| in [2**13, 2**14): exact, far from fp16's overflow
            e = (amax.to(tl.int32, bitcast=True) >> 23) & 0xFF
            mul = (tl.minimum(267 - e, 253) << 23).to(tl.float32, bitcast=True)
            q_lp = (qf * mul[:, None]).to(tl.float16)
            row_mul = row_mul / mul
        else:
            if K.dtype.element_ty == tl.int8:
                s_q = tl.where(amax > 0, amax / 127.0, 1.0)
                x = tl.where(fin, qf / s_q[:, None], 0.0)
                q_lp = tl.where(x >= 0, x + 0.5, x - 0.5).to(tl.int8)
                if QK_MODE == 2:  # residual in [-1/2, 1/2] times 254: q = s_q * (hi + lo / 254) to ~2**-15
                    r = (x - q_lp.to(tl.float32)) * 254.0
                    q_lo = tl.where(r >= 0, r + 0.5, r - 0.5).to(tl.int8)
                    row_mul = row_mul * (s_q / 254.0)
                else:
                    row_mul = row_mul * s_q
            else:
                s_q = tl.where(amax > 0, amax / 448.0, 1.0)
                x = tl.where(fin, qf / s_q[:, None], 0.0)
                q_lp = _to_e4m3(x, FP8_EXACT)
                if QK_MODE == 2:  # |residual| <= half an e4m3 ulp of 448 = 16: times 16 stays in range
                    q_lo = _to_e4m3((x - q_lp.to(tl.float32)) * 16.0, FP8_EXACT)
                row_mul = row_mul * s_q
            # a non-finite q value cannot be carried by the 8-bit q: the row's scores become NaN
            row_bad = tl.min(fin.to(tl.int32), 1) == 0
            row_mul = tl.where(row_bad, float("nan"), row_mul)
    if DOT_F32:
        q = q.to(tl.float32)

    k_base = K + off_b.to(tl.int64) * stride_kb + off_hk.to(tl.int64) * stride_kh
    v_base = V + off_b.to(tl.int64) * stride_vb + off_hk.to(tl.int64) * stride_vh
    if HAS_KV_SCALE:
        ks_base = KScale + off_b.to(tl.int64) * stride_ksb + off_hk.to(tl.int64) * stride_ksh
        vs_base = VScale + off_b.to(tl.int64) * stride_vsb + off_hk.to(tl.int64) * stride_vsh
    else:  # placeholders, never loaded from
        ks_base = KScale
        vs_base = VScale

    # ---------------------------------------------------------------- this program's range of the (virtual) keys
    if PAGED:
        idx_row = PageIdx + off_b.to(tl.int64) * stride_pb + off_hk.to(tl.int64) * stride_ph
        n_pages = tl.load(PageNum + off_b.to(tl.int64) * stride_nb + off_hk)
        n_pages = tl.minimum(tl.maximum(n_pages, 0), MAX_PAGES)
        total = n_pages * PAGE
    else:
        total = seqlen
    chunk = tl.cdiv(tl.cdiv(total, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = pid_s * chunk
    hi = tl.minimum(lo + chunk, total)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    first_key = N_MAX  # smallest key this program reads (PAGED: decides which rows attend anything)
    if not PAGED:  # row pointers of the range's first tile (64-bit base); tiles add a 32-bit offset
        k_lo = k_base + lo.to(tl.int64) * stride_kn + offs_n[None, :] * stride_kn + offs_d[:, None]
        if V_KEYS:  # lo is a multiple of BLOCK_N (chunk is): whole tiles start 16-byte aligned along the keys.
            # Key lo + j, dim d at lo * V_STEP + j + d * stride_vn: a (D, N) buffer (V_STEP 1, stride_vn N) or a
            # tile-blocked V, [HEAD_DIM, BLOCK_N] blocks one after another (V_STEP HEAD_DIM, stride_vn BLOCK_N)
            v_lo = (v_base + tl.multiple_of(lo, 16).to(tl.int64) * V_STEP + offs_n[:, None]
                    + offs_d[None, :] * stride_vn)
        else:
            v_lo = v_base + lo.to(tl.int64) * stride_vn + offs_n[:, None] * stride_vn + offs_d[None, :]
        if PV_MODE == 4:  # V as int32 words of four int8 values (head_dim / 4 per key)
            vw_lo = (v_base.to(tl.pointer_type(tl.int32)) + lo.to(tl.int64) * (stride_vn // 4)
                     + offs_n[:, None] * (stride_vn // 4) + tl.arange(0, HEAD_DIM // 4)[None, :])

    if V_KEYS and not PAGED:
        # keys-contiguous V (the P·V operand then needs no byte-wise transpose of an 8-bit tile): the range's whole
        # tiles without load masks, so every K/V/scale load is a vector load, then its partial last tile masked
        n_whole = tl.maximum(hi - lo, 0) // BLOCK_N * BLOCK_N
        for t0 in range(0, n_whole, BLOCK_N):
            t0 = tl.multiple_of(t0, BLOCK_N)
            m_i, l_i, acc = _vkeys_tile(q, q_lp, q_lo, row_mul, k_lo, v_lo, ks_base, vs_base, t0, lo, hi, offs_n,
                                        stride_kn, stride_ksn, stride_vsn, lim, m_i, l_i, acc, qk_scale, in_dtype,
                                        DOT_F32, IEEE, HAS_KV_SCALE, QK_MODE, PV_MODE, FAST_I8, FP8_EXACT, False, V_STEP)
        if lo + n_whole < hi:
            m_i, l_i, acc = _vkeys_tile(q, q_lp, q_lo, row_mul, k_lo, v_lo, ks_base, vs_base, n_whole, lo, hi, offs_n,
                                        stride_kn, stride_ksn, stride_vsn, lim, m_i, l_i, acc, qk_scale, in_dtype,
                                        DOT_F32, IEEE, HAS_KV_SCALE, QK_MODE, PV_MODE, FAST_I8, FP8_EXACT, True, V_STEP)
        loop_hi = lo  # the loop below has nothing left to do
    else:
        loop_hi = hi

    for start in range(lo, loop_hi, BLOCK_N):
        pos = start + offs_n
        in_rng = pos < hi
        if PAGED:
            ent = pos // PAGE
            pg = tl.load(idx_row + ent, mask=in_rng, other=0)
            key = pg * PAGE + pos % PAGE
            key_ok = in_rng & (key >= 0) & (key < seqlen)
            first_key = tl.minimum(first_key, tl.min(tl.where(key_ok, key, N_MAX), 0))
            k_off = key.to(tl.int64)
            k = tl.load(k_base + k_off[None, :] * stride_kn + offs_d[:, None], mask=key_ok[None, :], other=0.0)
            if PV_MODE == 4:  # int32 words of four int8 values, converted to fp16 in registers
                vw = tl.load(v_base.to(tl.pointer_type(tl.int32)) + k_off[:, None] * (stride_vn // 4)
                             + tl.arange(0, HEAD_DIM // 4)[None, :], mask=key_ok[:, None], other=0)
                v = _words_to_f16(vw, FAST_I8)
            elif V_KEYS:
                v = tl.load(v_base + k_off[:, None] + offs_d[None, :] * stride_vn, mask=key_ok[:, None], other=0.0)
            else:
                v = tl.load(v_base + k_off[:, None] * stride_vn + offs_d[None, :], mask=key_ok[:, None], other=0.0)
            if HAS_KV_SCALE:
                ks = tl.load(ks_base + k_off * stride_ksn, mask=key_ok, other=0.0)
                vs = tl.load(vs_base + k_off * stride_vsn, mask=key_ok, other=0.0)
        else:
            key = pos
            key_ok = in_rng
            if FULL_TILES:
                # no load masks: columns past the range read the range's last key again (a real key of this
                # sequence; its score is masked to -inf below, so its P is 0)
                dn = tl.minimum(offs_n, hi - 1 - start) - offs_n  # 0 but in a range's partial last tile
                k = tl.load(k_lo + (start - lo) * stride_kn + dn[None, :] * stride_kn)
                if PV_MODE == 4:
                    v = _words_to_f16(tl.load(vw_lo + (start - lo + dn[:, None]) * (stride_vn // 4)), FAST_I8)
                else:
                    v = tl.load(v_lo + (start - lo) * stride_vn + dn[:, None] * stride_vn)
                if HAS_KV_SCALE:
                    ks = tl.load(ks_base + (pos + dn) * stride_ksn)
                    vs = tl.load(vs_base + (pos + dn) * stride_vsn)
            else:
                k = tl.load(k_lo + (start - lo) * stride_kn, mask=key_ok[None, :], other=0.0)
                # V is requested with K (before the Q·K product): both tiles are in flight together, so a
                # program keeps twice the bytes outstanding when the compiler does not pipeline the loop
                if PV_MODE == 4:
                    v = _words_to_f16(tl.load(vw_lo + (start - lo) * (stride_vn // 4), mask=key_ok[:, None], other=0),
                                      FAST_I8)
                else:
                    v = tl.load(v_lo + (start - lo) * stride_vn, mask=key_ok[:, None], other=0.0)
                if HAS_KV_SCALE:
                    ks = tl.load(ks_base + pos * stride_ksn, mask=key_ok, other=0.0)
                    vs = tl.load(vs_base + pos * stride_vsn, mask=key_ok, other=0.0)
        if not HAS_KV_SCALE:
            ks = pos  # unused placeholders
            vs = pos
        m_i, l_i, acc = _attend_tile(q, q_lp, q_lo, row_mul, k, v, ks, vs, key, key_ok, lim, m_i, l_i, acc,
                                     qk_scale, in_dtype, DOT_F32, IEEE, HAS_KV_SCALE, QK_MODE, PV_MODE, FAST_I8,
                                     FP8_EXACT)

    # ---------------------------------------------------------------- epilogue
    # a row attends some key of this range iff the range's smallest key is below its limit (exact: the
    # decision is by position, so a row whose scores are NaN or all -inf is NaN, not "empty")
    if PAGED:
        has = (lim > first_key) & (hi > lo)
    else:
        has = (tl.minimum(lim, hi) > lo) & (hi > lo)
    l_safe = tl.where(has, l_i, 1.0)
    out = acc / l_safe[:, None]
    out = tl.where(has[:, None], out, 0.0)
    lse = tl.where(has, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    if not SPLIT:
        o_ptr = (Out + off_b.to(tl.int64) * stride_ob + head.to(tl.int64)[:, None] * stride_oh
                 + tok[:, None] * stride_om + offs_d[None, :])
        tl.store(o_ptr, out.to(Out.dtype.element_ty), mask=row_ok[:, None])
        tl.store(Lse + off_b.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh + tok, lse, mask=row_ok)
    else:
        # partial buffers: contiguous (B, H, LQ, NUM_SPLITS[, HEAD_DIM]) fp32
        flat = ((off_b * H + head).to(tl.int64) * LQ + tok) * NUM_SPLITS + pid_s
        tl.store(OPart + flat[:, None] * HEAD_DIM + offs_d[None, :], out, mask=row_ok[:, None])
        tl.store(LPart + flat, lse, mask=row_ok)


@triton.jit(do_not_specialize=["H", "LQ", "NUM_SPLITS"])
def _decode_merge_kernel(
    OPart, LPart, Out, Lse,
    stride_ob, stride_oh, stride_om,
    stride_lb, stride_lh,
    H, LQ, NUM_SPLITS,
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Exact merge of the ``NUM_SPLITS`` partial states of one (batch, head, token) row.

    ``lse = logsumexp_s lse_s``, ``out = sum_s exp(lse_s - lse) * out_s``. A split with lse ``-inf``
    (no key) has weight 0 (its out is 0 by construction); every split ``-inf`` gives out 0 and lse
    ``-inf``; a NaN lse or out makes the row NaN.
    """
    row = tl.program_id(0).to(tl.int64)  # flat (b, h, token)
    tok = row % LQ
    bh = row // LQ
    off_h = bh % H
    off_b = bh // H
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    s_ok = offs_s < NUM_SPLITS
    lse_s = tl.load(LPart + row * NUM_SPLITS + offs_s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse_s, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse_s - m_safe)
    w = tl.where(lse_s == float("-inf"), 0.0, w)
    o = tl.load(OPart + (row * NUM_SPLITS + offs_s)[:, None] * HEAD_DIM + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    num = tl.sum(w[:, None] * o, 0)
    den = tl.sum(w, 0)
    empty = m == float("-inf")
    den_safe = tl.where(empty, 1.0, den)
    out = tl.where(empty, 0.0, num / den_safe)
    lse = tl.where(empty, float("-inf"), m_safe + tl.log(den_safe))
    # tl.max ignores NaN (the GPU's max.f32; the interpreter mimics it): [NaN, -inf] would look empty.
    # A NaN split lse (a row whose scores or sum are NaN) makes the whole row NaN, as one pass would.
    any_nan = tl.max((lse_s != lse_s).to(tl.int32), 0) > 0
    out = tl.where(any_nan, float("nan"), out)
    lse = tl.where(any_nan, float("nan"), lse)
    tl.store(Out + off_b * stride_ob + off_h * stride_oh + tok * stride_om + offs_d, out.to(Out.dtype.element_ty))
    tl.store(Lse + off_b * stride_lb + off_h * stride_lh + tok, lse)


@triton.jit(do_not_specialize=["H", "G", "LQ", "P", "N_MAX", "K_SEL", "K_INT", "FRAC_NUM", "FRAC_DEN", "FLOOR",
                               "KEEP_FIRST", "KEEP_LAST"])
def _page_score_kernel(
    Q, KMin, KMax, SeqLens, Score, Count,
    stride_qb, stride_qh, stride_qm,
    stride_sb, stride_sh, stride_sp,
    stride_cb,
    H, G, LQ, P, N_MAX, K_SEL, K_INT, FRAC_NUM, FRAC_DEN, FLOOR, KEEP_FIRST, KEEP_LAST,
    PAGE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_P: tl.constexpr,
    HAS_SEQLENS: tl.constexpr,
    DOT_F32: tl.constexpr = False,
    IEEE: tl.constexpr = False,
):
    """Quest page scores of one (batch, KV head) for ``BLOCK_P`` pages, and (program 0) the page count.

    ``Score[b, hkv, p]`` (fp32) = ``max_r sum_d max(q[r, d] * kmin[p, d], q[r, d] * kmax[p, d])`` over the
    group's ``G * LQ`` rows, computed as ``q+ · kmax + q- · kmin`` (two dots, fp32 accumulation); a NaN
    bound and ``+inf`` become ``BIG`` (the largest finite fp32), ``-inf`` becomes ``-BIG``; forced pages
    (the first ``KEEP_FIRST`` and last ``KEEP_LAST`` valid ones) get ``+inf`` and pages past the
    sequence ``-inf``. ``Count[b, hkv]`` = pages to keep: ``K_INT`` if > 0, else
    ``ceil(n * FRAC_NUM / FRAC_DEN)``, at least ``FLOOR``, at most ``n`` valid pages and ``K_SEL``.
    Summaries are contiguous ``(B, H_kv, P, HEAD_DIM)``.
    """
    pid_p = tl.program_id(0)
    pid_bk = tl.program_id(1)
    H_KV = H // G
    off_b = pid_bk // H_KV
    off_hk = pid_bk % H_KV
    if HAS_SEQLENS:
        seqlen = tl.minimum(tl.maximum(tl.load(SeqLens + off_b), 0), N_MAX)
    else:
        seqlen = N_MAX
    n_valid = (seqlen + PAGE - 1) // PAGE

    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = offs_p < P
    offs_d = tl.arange(0, HEAD_DIM)
    s_base = pid_bk.to(tl.int64) * P * HEAD_DIM  # contiguous summaries: (b * H_kv + hkv) * P * D
    # loaded transposed, (HEAD_DIM, BLOCK_P): the right operand of q (BLOCK_R, HEAD_DIM) · summaries
    mn = tl.load(KMin + s_base + offs_p[None, :].to(tl.int64) * HEAD_DIM + offs_d[:, None], mask=p_ok[None, :], other=0.0)
    mx = tl.load(KMax + s_base + offs_p[None, :].to(tl.int64) * HEAD_DIM + offs_d[:, None], mask=p_ok[None, :], other=0.0)
    if DOT_F32:
        mn = mn.to(tl.float32)
        mx = mx.to(tl.float32)

    best = tl.full([BLOCK_P], float("-inf"), dtype=tl.float32)
    any_nan = tl.zeros([BLOCK_P], dtype=tl.int32)
    for r0 in range(0, G * LQ, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_ok = offs_r < G * LQ
        head = off_hk * G + offs_r // LQ
        tok = offs_r % LQ
        q = tl.load(Q + off_b.to(tl.int64) * stride_qb + head.to(tl.int64)[:, None] * stride_qh
                    + tok[:, None] * stride_qm + offs_d[None, :], mask=r_ok[:, None], other=0.0)
        if DOT_F32:
            q = q.to(tl.float32)
        qp = tl.where(q > 0, q, 0.0).to(q.dtype)
        qn = tl.where(q < 0, q, 0.0).to(q.dtype)
        qp = tl.where(q != q, q, qp)  # a NaN in q stays NaN in the bound
        if IEEE:
            ub = tl.dot(qp, mx, input_precision="ieee") + tl.dot(qn, mn, input_precision="ieee")
        else:
            ub = tl.dot(qp, mx) + tl.dot(qn, mn)
        ub_nan = (ub != ub) & r_ok[:, None]
        any_nan = any_nan | tl.max(ub_nan.to(tl.int32), 0)
        best = tl.maximum(best, tl.max(tl.where(r_ok[:, None], ub, float("-inf")), 0))

    BIG: tl.constexpr = 3.4028234663852886e38
    score = tl.minimum(tl.maximum(best, -BIG), BIG)
    score = tl.where(any_nan > 0, BIG, score)
    valid = offs_p < n_valid
    forced = valid & ((offs_p < KEEP_FIRST) | (offs_p >= n_valid - KEEP_LAST))
    score = tl.where(forced, float("inf"), score)
    score = tl.where(valid, score, float("-inf"))
    tl.store(Score + off_b.to(tl.int64) * stride_sb + off_hk * stride_sh + offs_p * stride_sp, score, mask=p_ok)
    if pid_p == 0:
        if K_INT > 0:
            want = n_valid * 0 + K_INT
        else:
            want = ((n_valid.to(tl.int64) * FRAC_NUM + FRAC_DEN - 1) // FRAC_DEN).to(tl.int32)
        want = tl.maximum(want, FLOOR)
        cnt = tl.minimum(tl.minimum(want, n_valid), K_SEL)
        tl.store(Count + off_b.to(tl.int64) * stride_cb + off_hk, cnt)


@triton.jit
def _order_key(x):
    """fp32 ``x`` (no NaN) as a uint32 with the same order (``-inf`` lowest, ``+inf`` highest; ``-0.0`` equal to
    ``+0.0``): the sign bit flipped for positive values, every bit flipped for negative ones."""
    bits = tl.where(x == 0.0, 0.0, x).to(tl.int32, bitcast=True)
    flip = (bits >> 31) | -2147483648  # arithmetic shift: all ones for negative values, else only the sign bit
    return (bits ^ flip).to(tl.uint32, bitcast=True)


@triton.jit
def _digit_hist(s_row, stride_sp, P, prefix, offs, SHIFT: tl.constexpr, BLOCK: tl.constexpr, ONE_CHUNK: tl.constexpr,
                key_one, BITS: tl.constexpr = 4):
    """Histogram (``2 ** (BITS + 1)`` bins; bins ``0 .. 2 ** BITS - 1`` used) of key bits ``SHIFT .. SHIFT + BITS - 1``
    over the keys whose bits above them equal ``prefix``; other keys (and padding) go to bin ``2 ** BITS``."""
    NB: tl.constexpr = 1 << BITS
    if ONE_CHUNK:
        key = key_one
        ok = offs < P
        if SHIFT + BITS < 32:
            ok = ok & ((key >> (SHIFT + BITS)) == prefix)
        dig = tl.where(ok, ((key >> SHIFT) & (NB - 1)).to(tl.int32), NB)
        hist = tl.histogram(dig, 2 * NB)
    else:
        hist = tl.zeros([2 * NB], dtype=tl.int32)
        for p0 in range(0, P, BLOCK):
            pp = p0 + offs
            key = _order_key(tl.load(s_row + pp * stride_sp, mask=pp < P, other=0.0))
            ok = pp < P
            if SHIFT + BITS < 32:
                ok = ok & ((key >> (SHIFT + BITS)) == prefix)
            dig = tl.where(ok, ((key >> SHIFT) & (NB - 1)).to(tl.int32), NB)
            hist += tl.histogram(dig, 2 * NB)
    return hist


@triton.jit(do_not_specialize=["H_KV", "P", "K_SEL"])
def _page_pick_kernel(
    Score, Count, Idx,
    stride_sb, stride_sh, stride_sp,
    stride_cb,
    stride_ib, stride_ih,
    H_KV, P, K_SEL,
    BLOCK: tl.constexpr,
    ONE_CHUNK: tl.constexpr,
    BITS: tl.constexpr = 4,
):
    """The ``Count[b, hkv]`` highest of ``Score[b, hkv, :P]`` (as :func:`_page_score_kernel` writes them: no
    NaN), their page indices **ascending** in ``Idx[b, hkv, :Count]``; ``Idx[b, hkv, Count:K_SEL]`` = 0.

    One program per (batch, KV head). Radix select on the scores' order-preserving 32-bit keys, ``BITS`` (4 or 8)
    bits per pass (``32 / BITS`` passes, each one histogram over the keys that still match the prefix; the
    suffix counts by a reversed cumulative sum): the threshold ``T`` is
    the largest key with ``#(key >= T) >= Count``. Every key above ``T`` is taken, then keys equal to ``T``
    by increasing page index until ``Count`` (ties go to the lower page). A cumulative sum of the taken
    mask gives each page its slot, so the indices come out sorted and no sort runs. The row is held in
    registers when it fits one ``BLOCK`` (``ONE_CHUNK``), else re-read per pass (from L2). Replaces
    ``torch.topk`` (a sort) on the selection's hot path.
    """
    pid = tl.program_id(0)
    off_b = pid // H_KV
    off_hk = pid % H_KV
    s_row = Score + off_b.to(tl.int64) * stride_sb + off_hk.to(tl.int64) * stride_sh
    i_row = Idx + off_b.to(tl.int64) * stride_ib + off_hk.to(tl.int64) * stride_ih
    c = tl.load(Count + off_b.to(tl.int64) * stride_cb + off_hk)
    offs = tl.arange(0, BLOCK)
    NB: tl.constexpr = 1 << BITS
    bins = tl.arange(0, 2 * NB)
    key_one = _order_key(tl.load(s_row + offs * stride_sp, mask=offs < P, other=0.0))

    prefix = tl.zeros([], dtype=tl.uint32)
    need = c  # keys still to take among those matching the prefix
    for i in tl.static_range(32 // BITS):
        hist = _digit_hist(s_row, stride_sp, P, prefix, offs, 32 - BITS * (i + 1), BLOCK, ONE_CHUNK, key_one, BITS)
        h = tl.where(bins < NB, hist, 0)
        suffix = tl.cumsum(h, 0, reverse=True)  # keys with digit >= j
        d = tl.max(tl.where((suffix >= need) & (bins < NB), bins, 0), 0)
        s_d = tl.sum(tl.where(bins == d, suffix, 0), 0)
        h_d = tl.sum(tl.where(bins == d, h, 0), 0)
        need -= s_d - h_d  # keys with a higher digit are all taken
        prefix = (prefix << BITS) | d.to(tl.uint32)
    thr = prefix
    ties = need  # keys equal to the threshold still to take, in page order

    slot0 = tl.zeros([], dtype=tl.int32)
    tie0 = tl.zeros([], dtype=tl.int32)
    for p0 in range(0, P, BLOCK):
        pp = p0 + offs
        key = _order_key(tl.load(s_row + pp * stride_sp, mask=pp < P, other=0.0))
        live = pp < P
        eq = live & (key == thr)
        tie_rank = tl.cumsum(eq.to(tl.int32), 0) + tie0  # 1-based among the ties so far
        take = (live & (key > thr)) | (eq & (tie_rank <= ties))
        slot = tl.cumsum(take.to(tl.int32), 0) - 1 + slot0
        tl.store(i_row + slot, pp, mask=take & (slot < c))
        slot0 += tl.sum(take.to(tl.int32), 0)
        tie0 += tl.sum(eq.to(tl.int32), 0)
    for k0 in range(0, K_SEL, BLOCK):
        kk = k0 + offs
        tl.store(i_row + kk, kk * 0, mask=(kk >= c) & (kk < K_SEL))
