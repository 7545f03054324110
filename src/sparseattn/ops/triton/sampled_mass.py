"""Triton kernel of the sampled exact block mass (:func:`sparseattn.predictors.oracle.exact_block_mass` with
``rows_per_block``): one program per (query block, batch × KV head).

The program loads the sampled query rows of its query block for every query head of its KV head (``G ·
rows_per_block`` rows, padded to a power of two ≥ 16), then walks the key blocks the block may attend twice:

1. the exact log-sum-exp of every row (online maximum and sum, base 2);
2. ``exp2(s − lse)`` per row, summed over the key block's columns and over each head's rows, divided by the
   number of rows sampled in the query block, and stored at ``mass[b, h, i, j]``.

Entries the loop does not reach (key blocks after the causal limit) stay as the zeros the launcher allocates.
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

    t = tl.arange(0, RG)  # packed row: head g = t // R, sample s = t % R
    g = t // R
    s_idx = t % R
    row = tl.load(ROWS + i * R + s_idx, mask=t < G * R, other=-1)  # query position, -1 = no row
    valid = (t < G * R) & (row >= 0)
    d = tl.arange(0, DP)
    head = hk * G + g
    q = tl.load(Q + b * sqb + head[:, None] * sqh + row[:, None] * sqn + d[None, :] * sqd,
                mask=valid[:, None] & (d[None, :] < D), other=0.0)
    if WIDEN:  # the CPU interpreter's bf16 tl.dot is wrong: widen to fp32 (exact for bf16 values)
        q = q.to(tl.float32)

    # the key blocks this query block may attend (causal: up to its last row's limit)
    if CAUSAL:
        last_row = tl.minimum(i * BLOCK_M + BLOCK_M - 1, Nq - 1)
        n_keys = tl.minimum(tl.maximum(last_row + off + 1, 0), Nkv)
    else:
        n_keys = Nkv
    n_blocks = tl.cdiv(n_keys, BLOCK_N)

    cols0 = tl.arange(0, BLOCK_N)
    K_head = K + b * skb + hk * skh  # this program's KV head
    m = tl.full([RG], float("-inf"), tl.float32)
    l = tl.zeros([RG], tl.float32)
    for j in range(0, n_blocks):
        s = _block_scores(q, K_head, skn, skd, j * BLOCK_N + cols0, d, row, valid, Nkv, D, off,
                          scale_log2, CAUSAL, IEEE, WIDEN)
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l = l * tl.exp2(m - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
        m = m_new
    has = l > 0
    lse = tl.where(has, m + tl.log2(tl.where(has, l, 1.0)), float("inf"))

    # rows sampled in this query block (the same count for every head)
    n_rows = tl.sum(tl.where(valid & (g == 0), 1.0, 0.0), 0)
    inv = 1.0 / tl.maximum(n_rows, 1.0)
    gg = tl.arange(0, GP)
    onehot = tl.where((g[:, None] == gg[None, :]) & (t[:, None] < G * R), 1.0, 0.0)  # [RG, GP]
    out_head = hk * G + gg
    for j in range(0, n_blocks):
        s = _block_scores(q, K_head, skn, skd, j * BLOCK_N + cols0, d, row, valid, Nkv, D, off,
                          scale_log2, CAUSAL, IEEE, WIDEN)
        p = tl.exp2(s - lse[:, None])  # 0 where masked (s = -inf) and in rows without keys (lse = +inf)
        per_row = tl.sum(p, 1)  # [RG]
        per_head = tl.sum(per_row[:, None] * onehot, 0) * inv  # [GP]
        tl.store(MASS + b * smb + out_head * smh + i * smm + j * smn, per_head, mask=gg < G)
