"""``@triton.jit`` helpers shared by several kernels (inlined into each; the generated code is unchanged)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def online_softmax_update(s, m_i, l_i, acc):
    """One tile of the online softmax in base 2, from the tile's scores ``s`` (``[M, N]``, ``-inf`` masked).

    Returns ``(p, m_ij, l_i, acc)``: the tile's unnormalised probabilities, the new running row max, and the
    row sums and accumulator rescaled to it (``acc`` still lacks this tile's ``p @ v``). A row whose scores
    so far are all ``-inf`` keeps ``p = 0`` (``m_safe``) instead of ``exp2(-inf - -inf) = NaN``.
    """
    m_ij = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_ij == float("-inf"), 0.0, m_ij)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    return p, m_ij, l_i, acc
