"""Triton kernels of the sampled exact block mass (:func:`sparseattn.predictors.oracle.exact_block_mass` with
``rows_per_block``).

Every program loads the sampled query rows of one query block for every query head of one KV head (``G ·
rows_per_block`` rows, padded to a power of two ≥ 16) and scores them against key blocks:

1. the exact log-sum-exp of every row (online maximum and sum, base 2);
2. ``exp2(s − lse)`` per row, summed over the key block's columns and over each head's rows, divided by the
   number of rows sampled in the query block, and stored at ``mass[b, h, i, j]``.

``_sampled_mass_kernel`` (the walk) does both in one program per (query block, batch × KV head), walking every key
block the query block may attend twice. The split pair does the same work over a third grid axis of key-block
chunks: ``_sampled_lse_split_kernel`` stores each chunk's running maximum and sum per row, and
``_sampled_mass_split_kernel`` merges the chunks into the row's lse and writes its own chunk's mass.

Entries no program reaches (key blocks after the causal limit) stay as the zeros the launcher allocates.
Rows without any allowed key have ``lse = +inf`` and contribute 0, as in the PyTorch function. NaN inputs give NaN
mass (the selection then forces those blocks, as for the PyTorch path). ``tl.dot`` runs at ``ieee`` precision for
float32 inputs and in the input dtype (fp32 accumulation) for fp16/bf16; under the CPU interpreter bf16 operands
are widened to float32 first (its bf16 ``tl.dot`` is wrong).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _block_scores(q, K_head, skn, skd, cols, d, row, valid, Nkv, D: tl.constexpr, off, scale_log2,
                  CAUSAL: tl.constexpr, IEEE: tl.constexpr, WIDEN: tl.constexpr):
    """Base-2 scores ``[RG, BLOCK_N]`` of the packed rows against one key block, -inf where not allowed."""
    k = tl.load(K_head + cols[:, None] * skn + d[None, :] * skd, mask=(cols[:, None] < Nkv) & (d[None, :] < D),
                other=0.0)
    if WIDEN:
        k = k.to(tl.float32)
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale_log2
    else:
        s = tl.dot(q, tl.trans(k)) * scale_log2
    ok = valid[:, None] & (cols[None, :] < Nkv)
    if CAUSAL:
        ok = ok & (cols[None, :] <= row[:, None] + off)
    return tl.where(ok, s, float("-inf"))


@triton.jit
def _load_rows(Q, ROWS, b, hk, i, sqb, sqh, sqn, sqd, G: tl.constexpr, R: tl.constexpr, RG: tl.constexpr,
               D: tl.constexpr, DP: tl.constexpr, WIDEN: tl.constexpr):
    """The packed sampled rows of query block ``i`` for KV head ``hk``: ``(q [RG, DP], row, valid, g, t, d)``."""
    t = tl.arange(0, RG)
    g = t // R
    row = tl.load(ROWS + i * R + t % R, mask=t < G * R, other=-1)
    valid = (t < G * R) & (row >= 0)
    d = tl.arange(0, DP)
    q = tl.load(Q + b * sqb + (hk * G + g)[:, None] * sqh + row[:, None] * sqn + d[None, :] * sqd,
                mask=valid[:, None] & (d[None, :] < D), other=0.0)
    if WIDEN:
        q = q.to(tl.float32)
    return q, row, valid, g, t, d


@triton.jit
def _key_blocks(i, Nq, Nkv, off, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """How many key blocks query block ``i`` may attend (causal: up to its last row's limit)."""
    if CAUSAL:
        last_row = tl.minimum(i * BLOCK_M + BLOCK_M - 1, Nq - 1)
        n_keys = tl.minimum(tl.maximum(last_row + off + 1, 0), Nkv)
    else:
        n_keys = Nkv
    return tl.cdiv(n_keys, BLOCK_N)


@triton.jit
def _max_and_sum(q, K_head, skn, skd, j0, j1, d, row, valid, Nkv, D: tl.constexpr, off, scale_log2,
                 RG: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr,
                 WIDEN: tl.constexpr):
    """Every packed row's running maximum and sum of ``exp2`` over key blocks ``j0 .. j1 - 1`` (``-inf`` / 0 when
    the range is empty)."""
    cols0 = tl.arange(0, BLOCK_N)
    m = tl.full([RG], float("-inf"), tl.float32)
    l = tl.zeros([RG], tl.float32)
    for j in range(j0, j1):
        s = _block_scores(q, K_head, skn, skd, j * BLOCK_N + cols0, d, row, valid, Nkv, D, off,
                          scale_log2, CAUSAL, IEEE, WIDEN)
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l = l * tl.exp2(m - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
        m = m_new
    return m, l


@triton.jit
def _write_mass(q, K_head, skn, skd, MASS_row, smh, smn, j0, j1, lse, d, row, valid, g, t, hk, Nkv,
                D: tl.constexpr, off, scale_log2, G: tl.constexpr, R: tl.constexpr, GP: tl.constexpr,
                BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr, WIDEN: tl.constexpr):
    """``mass[b, h, i, j]`` for key blocks ``j0 .. j1 - 1``: ``exp2(s − lse)`` summed over each block's columns and
    each head's rows, divided by the rows sampled in the query block (``MASS_row`` points at ``mass[b, 0, i, 0]``)."""
    n_rows = tl.sum(tl.where(valid & (g == 0), 1.0, 0.0), 0)  # the same count for every head
    inv = 1.0 / tl.maximum(n_rows, 1.0)
    gg = tl.arange(0, GP)
    onehot = tl.where((g[:, None] == gg[None, :]) & (t[:, None] < G * R), 1.0, 0.0)  # [RG, GP]
    cols0 = tl.arange(0, BLOCK_N)
    for j in range(j0, j1):
        s = _block_scores(q, K_head, skn, skd, j * BLOCK_N + cols0, d, row, valid, Nkv, D, off,
                          scale_log2, CAUSAL, IEEE, WIDEN)
        p = tl.exp2(s - lse[:, None])  # 0 where masked (s = -inf) and in rows without keys (lse = +inf)
        per_head = tl.sum(tl.sum(p, 1)[:, None] * onehot, 0) * inv  # [GP]
        tl.store(MASS_row + (hk * G + gg) * smh + j * smn, per_head, mask=gg < G)


@triton.jit
def _lse(m, l):
    """Base-2 log-sum-exp from a running maximum and sum; ``+inf`` for rows without any allowed key."""
    has = l > 0
    return tl.where(has, m + tl.log2(tl.where(has, l, 1.0)), float("inf"))


@triton.jit
def _sampled_mass_kernel(
    Q, K, ROWS, MASS,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    smb, smh, smm, smn,
    Nq, Nkv, Hkv, off, scale_log2,
    G: tl.constexpr, R: tl.constexpr, RG: tl.constexpr, GP: tl.constexpr,
    D: tl.constexpr, DP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, IEEE: tl.constexpr, WIDEN: tl.constexpr,
):
    i = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hkv
    hk = bh % Hkv
    q, row, valid, g, t, d = _load_rows(Q, ROWS, b, hk, i, sqb, sqh, sqn, sqd, G, R, RG, D, DP, WIDEN)
    n_blocks = _key_blocks(i, Nq, Nkv, off, BLOCK_M, BLOCK_N, CAUSAL)

    K_head = K + b * skb + hk * skh  # this program's KV head
    m, l = _max_and_sum(q, K_head, skn, skd, 0, n_blocks, d, row, valid, Nkv, D, off, scale_log2,
                        RG, BLOCK_N, CAUSAL, IEEE, WIDEN)
    _write_mass(q, K_head, skn, skd, MASS + b * smb + i * smm, smh, smn, 0, n_blocks, _lse(m, l), d, row, valid,
                g, t, hk, Nkv, D, off, scale_log2, G, R, GP, BLOCK_N, CAUSAL, IEEE, WIDEN)


@triton.jit
def _sampled_lse_split_kernel(
    Q, K, ROWS, PM, PL,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    Nq, Nkv, Hkv, off, scale_log2, CH, NCH,
    G: tl.constexpr, R: tl.constexpr, RG: tl.constexpr,
    D: tl.constexpr, DP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, IEEE: tl.constexpr, WIDEN: tl.constexpr,
):
    """Split pass 1, one program per (query block, chunk of ``CH`` key blocks, batch × KV head): each packed row's
    running maximum and sum over the chunk (base 2), stored at ``PM/PL[bh, i, c, :]`` (``-inf`` / 0 for an empty
    chunk)."""
    i = tl.program_id(0)
    c = tl.program_id(1)
    bh = tl.program_id(2)
    b = bh // Hkv
    hk = bh % Hkv
    q, row, valid, g, t, d = _load_rows(Q, ROWS, b, hk, i, sqb, sqh, sqn, sqd, G, R, RG, D, DP, WIDEN)
    n_blocks = _key_blocks(i, Nq, Nkv, off, BLOCK_M, BLOCK_N, CAUSAL)
    j0 = c * CH
    m, l = _max_and_sum(q, K + b * skb + hk * skh, skn, skd, j0, tl.minimum(j0 + CH, n_blocks), d, row, valid, Nkv,
                        D, off, scale_log2, RG, BLOCK_N, CAUSAL, IEEE, WIDEN)
    base = ((bh * tl.num_programs(0) + i) * NCH + c) * RG + t
    tl.store(PM + base, m)
    tl.store(PL + base, l)


@triton.jit
def _sampled_mass_split_kernel(
    Q, K, ROWS, PM, PL, MASS,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    smb, smh, smm, smn,
    Nq, Nkv, Hkv, off, scale_log2, CH, NCH,
    G: tl.constexpr, R: tl.constexpr, RG: tl.constexpr, GP: tl.constexpr, NCHP: tl.constexpr,
    D: tl.constexpr, DP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, IEEE: tl.constexpr, WIDEN: tl.constexpr,
):
    """Split pass 2, same grid: merge the chunks' partials into each row's lse, then the mass of this chunk's key
    blocks, as pass 2 of :func:`_sampled_mass_kernel`."""
    i = tl.program_id(0)
    c = tl.program_id(1)
    bh = tl.program_id(2)
    b = bh // Hkv
    hk = bh % Hkv
    n_blocks = _key_blocks(i, Nq, Nkv, off, BLOCK_M, BLOCK_N, CAUSAL)
    j0 = c * CH
    if j0 < n_blocks:
        j1 = tl.minimum(j0 + CH, n_blocks)
        q, row, valid, g, t, d = _load_rows(Q, ROWS, b, hk, i, sqb, sqh, sqn, sqd, G, R, RG, D, DP, WIDEN)
        cc = tl.arange(0, NCHP)
        at = ((bh * tl.num_programs(0) + i) * NCH + cc[:, None]) * RG + t[None, :]  # [NCHP, RG]
        ok = cc[:, None] < NCH
        pm = tl.load(PM + at, mask=ok, other=float("-inf"))
        pl = tl.load(PL + at, mask=ok, other=0.0)
        m = tl.max(pm, 0)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        l = tl.sum(pl * tl.exp2(pm - m_safe[None, :]), 0)
        _write_mass(q, K + b * skb + hk * skh, skn, skd, MASS + b * smb + i * smm, smh, smn, j0, j1, _lse(m, l), d,
                    row, valid, g, t, hk, Nkv, D, off, scale_log2, G, R, GP, BLOCK_N, CAUSAL, IEEE, WIDEN)
