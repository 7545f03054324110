"""Triton kernel: exact merge of attention states over disjoint key sets (``@triton.jit`` code only).

``S`` states ``(out_s, lse_s)`` of the same rows, stacked as ``O[S, R, D]`` and ``L[S, R]`` (natural-log
lse): ``lse = log Σ_s exp(lse_s)`` and ``out = Σ_s exp(lse_s − lse) · out_s`` — the rule of
:func:`sparseattn.state.merge.merge_states`, whose PyTorch path is the reference. Semantics kept equal to
it: a state with ``lse = −inf`` attended no key and is ignored whatever its ``out`` holds (all states
empty: ``out = 0``, ``lse = −inf``); a NaN lse makes the row's ``out`` and ``lse`` NaN, a ``+inf`` lse its
``out`` NaN and its ``lse`` ``+inf`` (as ``logsumexp``); a NaN/inf ``out`` of a live state reaches the merged
``out``.

One program handles ``BLOCK_R`` rows × ``BLOCK_D`` columns (``BLOCK_D`` ≥ D, a power of two) in two
passes over ``S``: the rows' maximum live lse, then the weighted sum — fp32 accumulation, one read of
each ``out`` element (memory-bound: ``S·R·D`` reads, ``R·D`` writes).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _merge_states_kernel(
    O, L, Out, Lse,
    S, R, D,
    stride_os, stride_or, stride_ls,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < R
    cell_ok = row_ok[:, None] & (cols[None, :] < D)
    rows64 = rows.to(tl.int64)
    # pass 1: the largest live lse per row; any NaN / +inf lse poisons the row
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    has_nan = tl.zeros([BLOCK_R], tl.int32)
    has_inf = tl.zeros([BLOCK_R], tl.int32)
    for s in range(0, S):
        lse = tl.load(L + s * stride_ls + rows64, mask=row_ok, other=float("-inf")).to(tl.float32)
        has_nan = has_nan | (lse != lse).to(tl.int32)
        has_inf = has_inf | (lse == float("inf")).to(tl.int32)
        m = tl.maximum(m, tl.where((lse == lse) & (lse != float("inf")), lse, float("-inf")))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    # pass 2: weights exp(lse_s - m) of the live states; dead states (lse = -inf) add exactly nothing
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    den = tl.zeros([BLOCK_R], tl.float32)
    for s in range(0, S):
        lse = tl.load(L + s * stride_ls + rows64, mask=row_ok, other=float("-inf")).to(tl.float32)
        live = lse != float("-inf")
        w = tl.where(live, tl.exp(lse - m_safe), 0.0)
        o = tl.load(O + s * stride_os + rows64[:, None] * stride_or + cols[None, :], mask=cell_ok, other=0.0)
        acc += tl.where(live[:, None], w[:, None] * o.to(tl.float32), 0.0)
        den += w
    empty = m == float("-inf")
    out = acc / tl.where(empty, 1.0, den)[:, None]
    lse_out = tl.where(empty, float("-inf"), m_safe + tl.log(tl.where(empty, 1.0, den)))
    # as logsumexp: a NaN lse gives NaN, else a +inf lse gives +inf; either way the weights are NaN
    poisoned = (has_nan | has_inf) != 0
    out = tl.where(poisoned[:, None], float("nan"), tl.where(empty[:, None], 0.0, out))
    lse_out = tl.where(has_nan != 0, float("nan"), tl.where(has_inf != 0, float("inf"), lse_out))
    tl.store(Out + rows64[:, None] * D + cols[None, :], out.to(Out.dtype.element_ty), mask=cell_ok)
    tl.store(Lse + rows64, lse_out, mask=row_ok)
