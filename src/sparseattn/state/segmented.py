"""Attention over a KV cache given as key segments, carrying the online-softmax state between them.

:func:`attention_with_state` computes one segment and returns the outgoing state, so a caller can
walk a KV cache segment by segment (a paged or mixed-precision cache, chunked prefill, a sparse
layout per segment) and get the same result as one call over the whole KV:

* the carried state is the kernel's own :class:`~sparseattn.state.types.RawState` ``(m, l, acc)``
  (float32, ``m`` in log2 units). The Triton kernel (``HAS_STATE``) loads it before its loop and
  stores it after, so with segment boundaries on multiples of the layout's ``block_n`` (128 for
  ``layout=None``) and one fixed launch ``config`` the carried result is **bitwise** the one-call
  result (the loop visits the same tiles in the same order with the same arithmetic);
* ``(out, lse)`` states (:class:`~sparseattn.state.types.AttentionState`) are accepted too (converted
  with :meth:`RawState.from_attention_state`: exact as a function, not bitwise);
* causal masking is bottom-right relative to the *whole* KV: the queries are the last ``N_q`` of
  ``kv_len`` positions, the segment starts at ``kv_offset``.

On the CPU (or ``backend="reference"``) :func:`sparseattn.ops.reference.reference_attention_carry`
runs the same loop in PyTorch.

**Smoothed key segments** (``k_mean``): a segment may store its keys minus a per-(batch, KV head)
channel mean ``μ`` (K smoothing before quantization, as :class:`~sparseattn.state.kv_cache.MixedKVCache`
does). Its scores are then ``scale·q·(k - μ) = scale·q·k - c`` with ``c = scale·q·μ`` one constant per
query row and head (query head ``h`` uses KV head ``h // G``), so the segment's normalised output is
unchanged and only its log-sum-exp is ``c`` too low. :func:`attention_with_state` corrects that exactly:
the incoming state's ``m`` is lowered by ``c`` (log2 units) before the segment, so the loop combines
both on the segment's shifted scale, and the outgoing ``m`` / ``lse`` are raised by ``c`` after it. Masks,
causality and windows act per key, the shift per row, so they commute; a row with no key (``m = -inf``)
stays ``-inf``. No kernel change: the kernel and the PyTorch loop run on the smoothed keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from sparseattn._validation import check_qkv, fail
from sparseattn.state.types import LOG2E, AttentionState, RawState

__all__ = ["SegmentOutput", "attention_with_state", "attention_over_segments", "key_mean_lse_shift"]


class SegmentOutput(NamedTuple):
    """Result of one segment: ``out``/``lse`` over every key carried so far, and the state to carry on."""

    out: torch.Tensor
    lse: torch.Tensor
    state: RawState

    @property
    def attention_state(self) -> AttentionState:
        return AttentionState(self.out, self.lse)


def _as_raw(fn: str, state: Any, q: torch.Tensor) -> RawState | None:
    if state is None:
        return None
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if isinstance(state, AttentionState):
        B, H, Nq, D = q.shape
        out, lse = state
        if tuple(out.shape) != (B, H, Nq, D) or tuple(lse.shape) != (B, H, Nq):
            raise fail(fn, "state", "has the wrong shape", f"out {(B, H, Nq, D)}, lse {(B, H, Nq)}",
                       f"out {tuple(out.shape)}, lse {tuple(lse.shape)}")
        if out.device != q.device or lse.device != q.device:
            raise fail(fn, "state", "is on another device than q", str(q.device), f"{out.device}/{lse.device}")
        return RawState.from_attention_state(state, dtype)
    if isinstance(state, RawState) or (isinstance(state, tuple) and len(state) == 3):
        return RawState(*state)
    raise fail(fn, "state", "must be None, an AttentionState (out, lse) or a RawState (m, l, acc)",
               "AttentionState or RawState", type(state).__name__)


def key_mean_lse_shift(q: torch.Tensor, k_mean: torch.Tensor, scale: float | None = None, *,
                       fn: str = "key_mean_lse_shift") -> torch.Tensor:
    """``scale · q·μ`` per query row and head: what a segment of keys stored as ``k - μ`` lacks in its lse.

    Args:
        q: ``(B, H, N_q, D)``.
        k_mean: ``(B, H_kv, D)`` or ``(B, H_kv, 1, D)`` floating point; query head ``h`` uses KV head
            ``h // (H // H_kv)`` (GQA).
        scale: the softmax scale the attention uses (default ``D ** -0.5``).

    Returns:
        ``(B, H, N_q)`` in float32 (float64 for float64 ``q``), natural-log units.
    """
    if not isinstance(k_mean, torch.Tensor):
        raise fail(fn, "k_mean", "must be a tensor", "a float tensor (B, H_kv, D)", type(k_mean).__name__)
    if q.dim() != 4:
        raise fail(fn, "q", "has the wrong rank", "4 dims (B, H, N_q, D)", tuple(q.shape))
    B, H, _, D = q.shape
    mu = k_mean.squeeze(2) if k_mean.dim() == 4 and k_mean.shape[2] == 1 else k_mean
    if mu.dim() != 3 or mu.shape[0] != B or mu.shape[2] != D or mu.shape[1] < 1 or H % mu.shape[1] != 0:
        raise fail(fn, "k_mean", "does not match q (one mean per batch row and KV head)",
                   f"(B, H_kv, D) or (B, H_kv, 1, D) with B={B}, D={D}, H_kv dividing H={H}", tuple(k_mean.shape))
    if not mu.dtype.is_floating_point:
        raise fail(fn, "k_mean", "must be floating point", "float32", mu.dtype)
    if mu.device != q.device:
        raise fail(fn, "k_mean", "is on another device than q", str(q.device), str(mu.device))
    wide = torch.float64 if q.dtype == torch.float64 else torch.float32
    if scale is None:
        scale = D ** -0.5
    G = H // mu.shape[1]
    qf = q.to(wide).reshape(B, mu.shape[1], G, q.shape[2], D)
    c = torch.einsum("bkgnd,bkd->bkgn", qf, mu.to(wide))
    return (c * scale).reshape(B, H, q.shape[2])


def _shift_raw(raw: RawState, c_log2: torch.Tensor) -> RawState:
    """``m + c`` (log2 units); ``-inf`` stays ``-inf``."""
    return RawState(raw.m + c_log2.to(raw.m.dtype), raw.l, raw.acc)


def attention_with_state(
    q: torch.Tensor,
    k_seg: torch.Tensor,
    v_seg: torch.Tensor,
    *,
    state: RawState | AttentionState | None = None,
    kv_offset: int = 0,
    kv_len: int | None = None,
    causal: bool = False,
    layout: Any = None,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    sliding_window: int | None = None,
    backend: str = "auto",
    config: dict[str, Any] | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    k_mean: torch.Tensor | None = None,
) -> SegmentOutput:
    """Attention of ``q`` over one key segment, continuing ``state``; returns the new state.

    Args:
        q: ``(B, H, N_q, D)``; the last ``N_q`` positions of a sequence of ``kv_len`` keys.
        k_seg, v_seg: ``(B, H_kv, N_seg, D)``, global keys ``kv_offset .. kv_offset + N_seg - 1``.
        state: incoming state over earlier segments (``None`` = none yet): a :class:`RawState`
            (bitwise carry) or an :class:`AttentionState` ``(out, lse)``.
        kv_offset: global position of the segment's first key.
        kv_len: total key length (default ``kv_offset + N_seg``, i.e. this is the last segment).
        causal: bottom-right causal over the whole KV: query ``i`` sees global keys ``<= i + kv_len - N_q``.
        layout: block layout over ``(N_q, N_seg)`` (the segment's keys), ``None`` = dense.
        attn_mask: additive float mask over the segment's keys ``(B|1, H|1, N_q, N_seg)``.
        scale: softmax scale (default ``D ** -0.5``).
        sliding_window: causal window in keys (relative to global positions).
        backend: ``"auto"`` (Triton kernel for CUDA tensors it supports, else the PyTorch loop),
            ``"triton"`` or ``"reference"``.
        config: fixed kernel launch config (see :func:`~sparseattn.ops.triton_launch.block_sparse_fwd`);
            use the same one for every segment and for a one-call comparison to get bitwise equality
            (autotuning may pick other tiles per length).
        k_scale, v_scale: a quantized segment: ``k_seg``/``v_seg`` hold int8 / float8_e4m3fn values and
            these their float32 per-key scales ``(B, H_kv, N_seg[, 1])``. The Triton kernel dequantises
            them in registers (``HAS_KV_SCALE``); the PyTorch loop dequantises in PyTorch first.
        k_mean: the segment's keys are stored smoothed, ``k_seg = k - k_mean`` (float, ``(B, H_kv, D)`` or
            ``(B, H_kv, 1, D)``): the result is attention over the true keys ``k_seg + k_mean``, exact up to
            rounding (the segment's lse gets ``scale·q·k_mean`` back, see the module docstring).

    Returns:
        :class:`SegmentOutput` ``(out, lse, state)``.
    """
    fn = "attention_with_state"
    quantized = k_scale is not None or v_scale is not None
    if quantized:
        from sparseattn.ops.checks import _check_kv_scales

        _check_kv_scales(fn, q, k_seg, v_seg, k_scale, v_scale)
        check_qkv(fn, q, torch.zeros((), dtype=q.dtype, device=k_seg.device).expand(k_seg.shape),
                  torch.zeros((), dtype=q.dtype, device=v_seg.device).expand(v_seg.shape))
    else:
        check_qkv(fn, q, k_seg, v_seg)
    raw = _as_raw(fn, state, q)
    shift = None
    if k_mean is not None:
        shift = key_mean_lse_shift(q, k_mean, scale, fn=fn)
        if int(k_mean.shape[1]) != int(k_seg.shape[1]):
            raise fail(fn, "k_mean", "does not match k_seg's KV heads", int(k_seg.shape[1]), int(k_mean.shape[1]))
        if raw is not None:
            raw = _shift_raw(raw, -shift * LOG2E)
    if backend not in ("auto", "triton", "reference"):
        raise fail(fn, "backend", "is unknown", "one of ['auto', 'triton', 'reference']", repr(backend))
    use = backend
    if backend != "reference":
        from sparseattn.ops import triton_launch

        reason = triton_launch.refusal(q, k=k_seg, v=v_seg, layout=layout, causal=causal)
        if reason is None and quantized and k_seg.dtype != torch.int8 and q.is_cuda \
                and torch.cuda.get_device_capability(q.device) < (8, 9):
            reason = "float8 K/V need a GPU of compute capability >= 8.9"
        if backend == "triton" and reason is not None:
            raise NotImplementedError(f"{fn}: backend='triton' cannot run these inputs ({reason})")
        use = "triton" if reason is None and (backend == "triton" or q.is_cuda) else "reference"
        if use == "reference" and q.is_cuda:
            import warnings

            warnings.warn(f"{fn}: using the slow PyTorch loop on CUDA because the Triton kernel refused: {reason}",
                          RuntimeWarning, stacklevel=2)
    if use == "triton":
        from sparseattn.ops.triton_launch import block_sparse_fwd

        st, new = block_sparse_fwd(q, k_seg, v_seg, layout=layout, causal=causal, scale=scale,
                                   sliding_window=sliding_window, attn_mask=attn_mask, state_in=raw,
                                   return_state=True, kv_offset=kv_offset, kv_len=kv_len, config=config,
                                   k_scale=k_scale, v_scale=v_scale)
        return _unshift(SegmentOutput(st.out, st.lse, new), shift)
    from sparseattn.ops.reference import reference_attention_carry

    block_n = layout.block_n if layout is not None else 128
    st, new = reference_attention_carry(q, k_seg, v_seg, state=raw, kv_offset=kv_offset, kv_len=kv_len, causal=causal,
                                        layout=layout, attn_mask=attn_mask, scale=scale,
                                        sliding_window=sliding_window, block_n=block_n, k_scale=k_scale,
                                        v_scale=v_scale)
    return _unshift(SegmentOutput(st.out, st.lse, new), shift)


def _unshift(res: SegmentOutput, shift: torch.Tensor | None) -> SegmentOutput:
    """Give a smoothed segment's result its lse back (``+ shift``; ``-inf`` rows stay ``-inf``)."""
    if shift is None:
        return res
    return SegmentOutput(res.out, res.lse + shift.to(res.lse.dtype), _shift_raw(res.state, shift * LOG2E))


def attention_over_segments(
    q: torch.Tensor,
    k_segments: Sequence[torch.Tensor],
    v_segments: Sequence[torch.Tensor],
    *,
    causal: bool = False,
    layouts: Sequence[Any] | None = None,
    attn_masks: Sequence[torch.Tensor | None] | None = None,
    scale: float | None = None,
    sliding_window: int | None = None,
    backend: str = "auto",
    config: dict[str, Any] | None = None,
    state: RawState | AttentionState | None = None,
    kv_offset: int = 0,
    kv_scales: Sequence[tuple[torch.Tensor, torch.Tensor] | None] | None = None,
    k_means: Sequence[torch.Tensor | None] | None = None,
) -> SegmentOutput:
    """Carry the state through consecutive segments (``kv_offset`` = position of the first one).

    The total length is ``kv_offset + sum of the segment lengths``; ``layouts`` / ``attn_masks`` /
    ``kv_scales`` (``(k_scale, v_scale)`` of a quantized segment) / ``k_means`` (the key mean of a smoothed
    segment, see :func:`attention_with_state`) give one entry (or ``None``) per segment.
    """
    fn = "attention_over_segments"
    n = len(k_segments)
    if n == 0 or n != len(v_segments):
        raise fail(fn, "k_segments/v_segments", "must be non-empty and of equal length", "equal non-zero counts",
                   f"{len(k_segments)} and {len(v_segments)}")
    for name, seq in (("layouts", layouts), ("attn_masks", attn_masks), ("kv_scales", kv_scales),
                      ("k_means", k_means)):
        if seq is not None and len(seq) != n:
            raise fail(fn, name, "must give one entry per segment", n, len(seq))
    total = kv_offset + sum(int(k.shape[2]) for k in k_segments)
    pos = kv_offset
    res: SegmentOutput | None = None
    for i, (k, v) in enumerate(zip(k_segments, v_segments)):
        res = attention_with_state(q, k, v, state=state if res is None else res.state, kv_offset=pos, kv_len=total,
                                   causal=causal, layout=None if layouts is None else layouts[i],
                                   attn_mask=None if attn_masks is None else attn_masks[i], scale=scale,
                                   sliding_window=sliding_window, backend=backend, config=config,
                                   k_mean=None if k_means is None else k_means[i],
                                   **_scales(None if kv_scales is None else kv_scales[i]))
        pos += int(k.shape[2])
    return res  # type: ignore[return-value]  # n > 0 (checked above)


def _scales(sc: Any) -> dict[str, Any]:
    if sc is None:
        return {}
    if not (isinstance(sc, tuple) and len(sc) == 2):
        raise fail("attention_over_segments", "kv_scales", "must hold (k_scale, v_scale) pairs or None",
                   "(k_scale, v_scale)", type(sc).__name__)
    return {"k_scale": sc[0], "v_scale": sc[1]}
