"""Seeded attention inputs shared by tests, CLIs and benchmarks.

Two generators, both returning ``(q, k, v)`` in ``(B, H, N, D)`` layout (k/v with ``kv_heads``):

* :func:`random_qkv` — i.i.d. Gaussian q/k/v. Attention over random q/k is close to uniform, so
  dropping key blocks drops probability mass roughly in proportion: the *worst case* for block
  sparsity and the right input for exactness tests (kernel vs reference on the same layout).
* :func:`structured_qkv` — synthetic q/k with the two structures real LLM heads show most often:
  a **local bias** (scores decay with the query–key distance, made with RoPE-style rotary
  position features) and **attention sinks** (the first ``sink_tokens`` keys score high for every
  query). It is *synthetic*: it is not captured from a model, and results on it say how a layout
  behaves on attention of that shape, not on any particular model. Capture real Q/K/V for that.

Everything is generated on the CPU with a ``torch.Generator`` seeded by ``seed`` and then moved, so
the same call gives the same tensors on every machine and device.
"""

from __future__ import annotations

import math

import torch

from sparseattn._validation import check_nonneg_int, check_positive_int, fail

__all__ = ["random_qkv", "structured_qkv", "INPUT_KINDS", "make_qkv"]


def _common(fn: str, batch: int, heads: int, seqlen_q: int, head_dim: int, kv_heads: int | None,
            seqlen_kv: int | None) -> tuple[int, int]:
    for name, val in (("batch", batch), ("heads", heads), ("seqlen_q", seqlen_q), ("head_dim", head_dim)):
        check_positive_int(fn, name, val)
    kv_heads = heads if kv_heads is None else check_positive_int(fn, "kv_heads", kv_heads)
    seqlen_kv = seqlen_q if seqlen_kv is None else check_positive_int(fn, "seqlen_kv", seqlen_kv)
    if heads % kv_heads:
        raise fail(fn, "kv_heads", "must divide heads (GQA)", f"a divisor of heads={heads}", kv_heads)
    return kv_heads, seqlen_kv


def random_qkv(batch: int, heads: int, seqlen_q: int, head_dim: int, *, kv_heads: int | None = None,
               seqlen_kv: int | None = None, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu", seed: int = 0, scale: float = 1.0
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """I.i.d. standard-normal q, k, v (times ``scale``), seeded.

    Shapes:
        q ``(batch, heads, seqlen_q, head_dim)``; k, v ``(batch, kv_heads, seqlen_kv, head_dim)``.
    """
    kv_heads, seqlen_kv = _common("random_qkv", batch, heads, seqlen_q, head_dim, kv_heads, seqlen_kv)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, seqlen_q, head_dim, generator=g, dtype=torch.float64) * scale
    k = torch.randn(batch, kv_heads, seqlen_kv, head_dim, generator=g, dtype=torch.float64) * scale
    v = torch.randn(batch, kv_heads, seqlen_kv, head_dim, generator=g, dtype=torch.float64)
    return q.to(device=device, dtype=dtype), k.to(device=device, dtype=dtype), v.to(device=device, dtype=dtype)


def _rotary(positions: torch.Tensor, head_dim: int, base: float) -> torch.Tensor:
    """RoPE-style features ``[N, D]`` whose dot products ``sum_f cos(theta_f * (i - j))`` decay with distance."""
    half = head_dim // 2
    theta = base ** (-torch.arange(half, dtype=torch.float64) / max(half, 1))
    ang = positions.to(torch.float64)[:, None] * theta[None, :]
    feat = torch.cat([torch.cos(ang), torch.sin(ang)], dim=-1)
    if feat.shape[-1] < head_dim:
        feat = torch.nn.functional.pad(feat, (0, head_dim - feat.shape[-1]))
    return feat / math.sqrt(max(half, 1))


def structured_qkv(batch: int, heads: int, seqlen_q: int, head_dim: int, *, kv_heads: int | None = None,
                   seqlen_kv: int | None = None, local_strength: float = 8.0, sink_tokens: int = 1,
                   sink_strength: float = 5.0, rope_base: float = 500.0, dtype: torch.dtype = torch.float32,
                   device: torch.device | str = "cpu", seed: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Synthetic q/k with a local bias and attention sinks (see the module docstring), seeded.

    The pre-softmax score of query ``i`` and key ``j`` is, up to Gaussian noise of unit scale,
    ``local_strength * mean_f cos(theta_f * (i' - j)) + sink_strength * [j < sink_tokens]`` with
    ``i' = i + seqlen_kv - seqlen_q`` (queries are the last ``seqlen_q`` positions, as in decoding
    and bottom-right causal attention) and ``theta_f = rope_base ** (-f / (D/2))``. Each head gets
    its own strengths, drawn in ``[0.5, 1.5]`` times the given ones, so heads differ.

    Args:
        local_strength: peak logit bonus for nearby keys (0 disables the local bias).
        sink_tokens: number of leading keys that act as sinks (0 disables sinks).
        sink_strength: logit bonus of the sink keys.
        rope_base: larger values make the local bias decay more slowly with distance.

    Shapes:
        q ``(batch, heads, seqlen_q, head_dim)``; k, v ``(batch, kv_heads, seqlen_kv, head_dim)``.
    """
    fn = "structured_qkv"
    kv_heads, seqlen_kv = _common(fn, batch, heads, seqlen_q, head_dim, kv_heads, seqlen_kv)
    check_nonneg_int(fn, "sink_tokens", sink_tokens)
    for name, val in (("local_strength", local_strength), ("sink_strength", sink_strength)):
        if isinstance(val, bool) or not isinstance(val, (int, float)) or not (0 <= val < math.inf):
            raise fail(fn, name, "must be a finite number >= 0", "float >= 0", repr(val))
    if isinstance(rope_base, bool) or not isinstance(rope_base, (int, float)) or not (1 < rope_base < math.inf):
        raise fail(fn, "rope_base", "must be a finite number > 1", "float > 1", repr(rope_base))
    if head_dim < 4:
        raise fail(fn, "head_dim", "is too small for position features", "head_dim >= 4", head_dim)
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    D = head_dim
    G = heads // kv_heads
    # scores are computed with the default softmax scale D**-0.5; features are built so that
    # scale * q.k has the stated magnitudes. Noise: unit-variance logits.
    sqrt_d = math.sqrt(D)
    noise_q = torch.randn(batch, heads, seqlen_q, D, generator=g, dtype=f64)
    noise_k = torch.randn(batch, kv_heads, seqlen_kv, D, generator=g, dtype=f64)
    v = torch.randn(batch, kv_heads, seqlen_kv, D, generator=g, dtype=f64)
    h_local = local_strength * (0.5 + torch.rand(heads, generator=g, dtype=f64))
    h_sink = sink_strength * (0.5 + torch.rand(heads, generator=g, dtype=f64))

    # local bias: q_i gets a * rot(i'), k_j gets a * rot(j), with a^2 * D**-0.5 * |rot|^2 = strength.
    # The noise part of q.k (scaled) has variance ~1; position features use the first D-1 dims and
    # the sink the last one, so they do not interfere.
    Dp = D - 1 if (D - 1) % 2 == 0 else D - 2
    pos_q = _rotary(torch.arange(seqlen_q) + (seqlen_kv - seqlen_q), Dp, rope_base)  # [Nq, Dp]
    pos_k = _rotary(torch.arange(seqlen_kv), Dp, rope_base)  # [Nkv, Dp]
    q = noise_q.clone()
    k = noise_k.clone()
    # k's local amplitude is shared by the heads of a KV group; q's carries the per-head strength.
    a_k = math.sqrt(sqrt_d)
    a_q = h_local * sqrt_d / a_k  # [H]  ->  scale * a_q * a_k * mean cos = h_local * mean cos
    q[..., :Dp] = q[..., :Dp] * 0.5 + a_q[None, :, None, None] * pos_q[None, None]
    k[..., :Dp] = k[..., :Dp] * 0.5 + a_k * pos_k[None, None]
    # sinks: every query has component c_h on the last dim; sink keys have component s there.
    if sink_tokens > 0:
        n = min(sink_tokens, seqlen_kv)
        s_amp = math.sqrt(sqrt_d)
        q[..., D - 1] = h_sink[None, :, None] * sqrt_d / s_amp
        k[..., D - 1] = 0.0
        k[:, :, :n, D - 1] = s_amp
    else:
        q[..., D - 1] = 0.0
    del G
    return q.to(device=device, dtype=dtype), k.to(device=device, dtype=dtype), v.to(device=device, dtype=dtype)


INPUT_KINDS = {"random": random_qkv, "structured": structured_qkv}


def make_qkv(kind: str, batch: int, heads: int, seqlen_q: int, head_dim: int, **kwargs
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``random_qkv`` or ``structured_qkv`` by name (``INPUT_KINDS`` lists them); ``kwargs`` pass through."""
    if kind not in INPUT_KINDS:
        raise fail("make_qkv", "kind", "is not a known input kind", f"one of {sorted(INPUT_KINDS)}", repr(kind))
    return INPUT_KINDS[kind](batch, heads, seqlen_q, head_dim, **kwargs)
