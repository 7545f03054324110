"""Public attention entry points and backend dispatch.

``backend="auto"`` picks the fastest backend that accepts the inputs: the Triton kernel for CUDA
tensors it supports, the PyTorch reference otherwise (with a warning that names the reason when a
CUDA input could not use the kernel). ``backend="triton"`` / ``"reference"`` force one; a forced
backend that refuses the inputs raises ``NotImplementedError`` listing every backend and its reason.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch

from sparseattn._validation import check_attention_args, fail
from sparseattn.layout.block_layout import BlockLayout
from sparseattn.ops.reference import reference_attention
from sparseattn.state.types import AttentionState

__all__ = ["attention", "block_sparse_attention", "BACKENDS", "backend_refusals", "select_backend"]


def _reference_refusal(q: torch.Tensor, **_: Any) -> str | None:
    return None


def _reference_run(q, k, v, *, causal, layout, scale, pv_threshold, stats) -> AttentionState:  # noqa: ANN001
    return reference_attention(q, k, v, causal=causal, layout=layout, scale=scale, pv_threshold=pv_threshold, stats=stats)


def _triton_refusal(q: torch.Tensor, **kw: Any) -> str | None:
    from sparseattn.ops import triton_launch

    return triton_launch.refusal(q, **kw)


def _triton_run(q, k, v, *, causal, layout, scale, pv_threshold, stats) -> AttentionState:  # noqa: ANN001
    from sparseattn.ops import triton_launch

    return triton_launch.block_sparse_fwd(q, k, v, layout=layout, causal=causal, scale=scale,
                                          pv_threshold=pv_threshold, stats=stats)


# name -> (refusal(q, k=, v=, layout=, causal=, pv_threshold=) -> reason | None, run)
BACKENDS: dict[str, tuple[Callable[..., str | None], Callable[..., AttentionState]]] = {
    "triton": (_triton_refusal, _triton_run),
    "reference": (_reference_refusal, _reference_run),
}
_AUTO_ORDER = ("triton", "reference")


def backend_refusals(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, layout: BlockLayout | None = None,
                     causal: bool = False, pv_threshold: float | None = None) -> dict[str, str | None]:
    """For each backend, ``None`` if it accepts these inputs, else the reason it refuses."""
    out: dict[str, str | None] = {}
    for name, (refusal, _) in BACKENDS.items():
        try:
            out[name] = refusal(q, k=k, v=v, layout=layout, causal=causal, pv_threshold=pv_threshold)
        except Exception as exc:  # a backend that cannot even be imported refuses, with the reason
            out[name] = f"{type(exc).__name__}: {exc}"
    return out


def select_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, layout: BlockLayout | None = None,
                   causal: bool = False, pv_threshold: float | None = None, backend: str = "auto",
                   func: str = "attention") -> str:
    """Name of the backend that will run (see module docstring for the rules)."""
    if backend != "auto" and backend not in BACKENDS:
        raise fail(func, "backend", "is unknown", f"one of {['auto', *BACKENDS]}", repr(backend))
    reasons = backend_refusals(q, k, v, layout=layout, causal=causal, pv_threshold=pv_threshold)
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

    Returns:
        ``AttentionState(out, lse)``: out ``(B, H, N_q, D)`` in q's dtype; lse ``(B, H, N_q)``
        natural-log, float32 (float64 for float64 inputs); empty rows give out 0, lse -inf. NaN/inf
        inputs reach exactly the outputs that attend them (docs/ARCHITECTURE.md, "Non-finite inputs").

    Shapes:
        q ``(B, H, N_q, D)``, k/v ``(B, H_kv, N_kv, D)``.
    """
    fn = "attention"
    check_attention_args(fn, q, k, v, causal=causal, layout=layout, scale=scale, pv_threshold=pv_threshold)
    name = select_backend(q, k, v, layout=layout, causal=causal, pv_threshold=pv_threshold, backend=backend, func=fn)
    return BACKENDS[name][1](q, k, v, causal=causal, layout=layout, scale=scale, pv_threshold=pv_threshold, stats=stats)


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
) -> AttentionState:
    """Block-sparse attention driven by ``layout`` (see :func:`attention`; returns natural-log lse)."""
    if layout is None:
        raise fail("block_sparse_attention", "layout", "is required", "a BlockLayout", "None")
    return attention(q, k, v, causal=causal, layout=layout, scale=scale, backend=backend, pv_threshold=pv_threshold,
                     stats=stats)
