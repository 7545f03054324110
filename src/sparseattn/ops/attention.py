"""Public attention entry points and backend dispatch.

``backend="auto"`` picks the fastest backend that accepts the inputs: the Triton kernel for CUDA
tensors it supports, the PyTorch reference otherwise (with a warning that names the reason when a
CUDA input could not use the kernel). ``backend="triton"`` / ``"reference"`` force one; a forced
backend that refuses the inputs raises ``NotImplementedError`` listing every backend and its reason.

``sliding_window=W`` (causal only) without a layout runs on the band layout
(:func:`~sparseattn.layout.patterns.sliding_window_band_layout`, 128×128 blocks), built once per
(lengths, W, blocks, device) and kept in ``_BAND`` (a :class:`~sparseattn._cache.BoundedCache` of
``_BAND_MAX`` entries, stride-0 over batch and heads), so its cost is the band's, not the causal square's.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch

from sparseattn._cache import BoundedCache
from sparseattn._validation import check_attention_args, fail
from sparseattn.layout.block_layout import BlockLayout
from sparseattn.ops.reference import reference_attention
from sparseattn.state.types import AttentionState

__all__ = ["attention", "block_sparse_attention", "band_layout", "BACKENDS", "backend_refusals", "select_backend"]


def _reference_refusal(q: torch.Tensor, **_: Any) -> str | None:
    return None


def _reference_run(q, k, v, *, causal, layout, scale, pv_threshold, stats, sliding_window=None,  # noqa: ANN001
                   attn_mask=None) -> AttentionState:  # noqa: ANN001
    return reference_attention(q, k, v, causal=causal, layout=layout, scale=scale, pv_threshold=pv_threshold, stats=stats,
                               sliding_window=sliding_window, attn_mask=attn_mask)


def _triton_refusal(q: torch.Tensor, **kw: Any) -> str | None:
    from sparseattn.ops import triton_launch

    return triton_launch.refusal(q, **kw)


def _triton_run(q, k, v, *, causal, layout, scale, pv_threshold, stats, sliding_window=None,  # noqa: ANN001
                attn_mask=None) -> AttentionState:  # noqa: ANN001
    from sparseattn.ops import triton_launch

    return triton_launch.block_sparse_fwd(q, k, v, layout=layout, causal=causal, scale=scale,
                                          pv_threshold=pv_threshold, stats=stats, sliding_window=sliding_window,
                                          attn_mask=attn_mask)


# name -> (refusal(q, k=, v=, layout=, causal=, pv_threshold=, sliding_window=) -> reason | None,
#          run(q, k, v, *, causal, layout, scale, pv_threshold, stats, sliding_window))
BACKENDS: dict[str, tuple[Callable[..., str | None], Callable[..., AttentionState]]] = {
    "triton": (_triton_refusal, _triton_run),
    "reference": (_reference_refusal, _reference_run),
}
_AUTO_ORDER = ("triton", "reference")


def backend_refusals(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, layout: BlockLayout | None = None,
                     causal: bool = False, pv_threshold: float | None = None,
                     sliding_window: int | None = None) -> dict[str, str | None]:
    """For each backend, ``None`` if it accepts these inputs, else the reason it refuses."""
    out: dict[str, str | None] = {}
    for name, (refusal, _) in BACKENDS.items():
        try:
            out[name] = refusal(q, k=k, v=v, layout=layout, causal=causal, pv_threshold=pv_threshold,
                                sliding_window=sliding_window)
        except Exception as exc:  # a backend that cannot even be imported refuses, with the reason
            out[name] = f"{type(exc).__name__}: {exc}"
    return out


def select_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, layout: BlockLayout | None = None,
                   causal: bool = False, pv_threshold: float | None = None, backend: str = "auto",
                   func: str = "attention", sliding_window: int | None = None) -> str:
    """Name of the backend that will run (see module docstring for the rules)."""
    if backend != "auto" and backend not in BACKENDS:
        raise fail(func, "backend", "is unknown", f"one of {['auto', *BACKENDS]}", repr(backend))
    reasons = backend_refusals(q, k, v, layout=layout, causal=causal, pv_threshold=pv_threshold,
                               sliding_window=sliding_window)
    if backend != "auto":
        if reasons[backend] is None:
            return backend
        listing = "; ".join(f"{n}: {r or 'accepts'}" for n, r in reasons.items())
        raise NotImplementedError(f"{func}: backend={backend!r} cannot run these inputs ({listing})")
    for name in _AUTO_ORDER:
        if name == "triton" and not q.is_cuda:
            continue  # on CPU the Triton interpreter (TRITON_INTERPRET=1) is a test vehicle, never the fast path
        if reasons[name] is None:
            if name == "reference" and q.is_cuda:
                warnings.warn(f"{func}: using the slow PyTorch reference on CUDA because the Triton kernel refused: "
                              f"{reasons['triton']}", RuntimeWarning, stacklevel=3)
            return name
    listing = "; ".join(f"{n}: {r}" for n, r in reasons.items())
    raise NotImplementedError(f"{func}: no backend accepts these inputs ({listing})")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    layout: BlockLayout | None = None,
    scale: float | None = None,
    backend: str = "auto",
    pv_threshold: float | None = None,
    stats: dict[str, Any] | None = None,
    sliding_window: int | None = None,
    attn_mask: torch.Tensor | None = None,
    quant: str | None = None,
    quant_granularity: str = "per_warp",
) -> AttentionState:
    """Dense (``layout=None``) or block-sparse attention with natural-log LSE.

    Args:
        q: ``(B, H, N_q, D)``; k, v: ``(B, H_kv, N_kv, D)`` with ``H % H_kv == 0``.
        causal: bottom-right aligned causal mask (query ``i`` sees keys ``<= i + N_kv - N_q``).
        layout: which key blocks each query block attends; ``None`` attends everything.
        scale: softmax scale (default ``D ** -0.5``).
        backend: ``"auto"``, ``"triton"`` or ``"reference"``.
        pv_threshold: optional softmax-aware P·V skip (see :func:`reference_attention`).
        stats: optional dict the backend fills with counters (visited / skipped tiles).
        sliding_window: exact causal sliding window of ``W`` keys (transformers' ``sliding_window``;
            ``causal=True`` only): query ``i`` attends keys ``j`` with ``i + OFF - W < j <= i + OFF``
            (``OFF = N_kv - N_q``), intersected with ``layout``. With ``layout=None`` the band layout
            is built (and cached) here, so only the band is computed.
        attn_mask: additive float mask ``(B|1, H|1, N_q, N_kv)`` (0 = attend, ``-inf`` = masked,
            finite = bias), combined with ``layout``/``causal``/``sliding_window``; a row whose keys are
            all ``-inf`` is empty (out 0, lse -inf). The Triton kernel loads it per tile (``HAS_FLOAT_MASK``).
        quant: ``None`` (exact kernels), or ``"int8"`` / ``"int8_fp8"``: run
            :func:`sparseattn.ops.quant.quantized_attention` instead (INT8 Q·Kᵀ; FP8 P·V on sm_89+;
            docs/QUANT.md). Not combinable with ``pv_threshold``, ``sliding_window``, ``attn_mask``,
            ``stats`` or ``backend="reference"``.
        quant_granularity: scale groups for ``quant``: ``"per_warp"``, ``"per_block"`` or ``"per_thread"``.

    Returns:
        ``AttentionState(out, lse)``: out ``(B, H, N_q, D)`` in q's dtype; lse ``(B, H, N_q)``
        natural-log, float32 (float64 for float64 inputs); empty rows give out 0, lse -inf. NaN/inf
        inputs reach exactly the outputs that attend them (docs/ARCHITECTURE.md, "Non-finite inputs").

    Shapes:
        q ``(B, H, N_q, D)``, k/v ``(B, H_kv, N_kv, D)``.
    """
    fn = "attention"
    (B, H, _, Nq, Nkv, _), _ = check_attention_args(fn, q, k, v, causal=causal, layout=layout, scale=scale,
                                                    pv_threshold=pv_threshold, sliding_window=sliding_window)
    if quant is not None:  # thin delegate; the quantized entry point checks its own arguments
        from sparseattn.ops.quant import attention_delegate

        return attention_delegate(q, k, v, causal=causal, layout=layout, scale=scale, backend=backend, quant=quant,
                                  quant_granularity=quant_granularity, pv_threshold=pv_threshold, stats=stats,
                                  sliding_window=sliding_window, attn_mask=attn_mask)
    if attn_mask is not None:
        from sparseattn.ops.reference import check_attn_mask

        check_attn_mask(fn, attn_mask, B, H, Nq, Nkv, q.device)
    if sliding_window is not None and sliding_window >= Nkv:
        sliding_window = None  # the window holds every causally visible key: plain causal attention
    if sliding_window is not None and layout is None:
        layout = band_layout(B, H, Nq, Nkv, sliding_window, q.device)
    name = select_backend(q, k, v, layout=layout, causal=causal, pv_threshold=pv_threshold, backend=backend, func=fn,
                          sliding_window=sliding_window)
    extra = {} if attn_mask is None else {"attn_mask": attn_mask}  # only then: backends without the keyword keep working
    return BACKENDS[name][1](q, k, v, causal=causal, layout=layout, scale=scale, pv_threshold=pv_threshold, stats=stats,
                             sliding_window=sliding_window, **extra)


_BAND_BLOCK = 128  # the blocks of the launcher's own dense layout (the kernel's fastest tiles)
_BAND_MAX = 64
_BAND: BoundedCache[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = BoundedCache(_BAND_MAX, name="attention._BAND")


def band_layout(B: int, H: int, Nq: int, Nkv: int, window: int, device: torch.device | str,
                block: int = _BAND_BLOCK) -> BlockLayout:
    """The cached sliding-window band layout (``block`` x ``block``), expanded (stride 0) to ``B x H``.

    One ``[1, 1, Mb]`` / ``[1, 1, Mb, Nb]`` pair per (lengths, window, block, device) in ``_BAND``.
    """
    from sparseattn._cache import device_key

    dev = device_key(device)

    def build() -> tuple[torch.Tensor, torch.Tensor]:
        from sparseattn.layout.patterns import sliding_window_band_layout

        lay = sliding_window_band_layout(Nq, Nkv, window=window, block_m=block, block_n=block, device=dev)
        return lay.kv_num_blocks[:1, :1].contiguous(), lay.kv_indices[:1, :1].contiguous()

    num, idx = _BAND.get_or_build((Nq, Nkv, window, block, block, dev), build)
    return BlockLayout(num.expand(B, H, -1), idx.expand(B, H, -1, -1), block, block, Nq, Nkv, validate=False)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    *,
    causal: bool = False,
    scale: float | None = None,
    backend: str = "auto",
    pv_threshold: float | None = None,
    stats: dict[str, Any] | None = None,
    sliding_window: int | None = None,
) -> AttentionState:
    """Block-sparse attention driven by ``layout`` (see :func:`attention`; returns natural-log lse).

    ``sliding_window`` (causal only) intersects the layout with an exact window of that many keys.
    """
    if layout is None:
        raise fail("block_sparse_attention", "layout", "is required", "a BlockLayout", "None")
    return attention(q, k, v, causal=causal, layout=layout, scale=scale, backend=backend, pv_threshold=pv_threshold,
                     stats=stats, sliding_window=sliding_window)
