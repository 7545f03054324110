"""Which operator a patched layer's sparse call runs on: the route, decided once per shape and cached.

:func:`_choose_route` asks the registry (the integration's own masked-SDPA operator first, then the attention
dispatcher); :class:`RoutesMixin` gives :class:`~sparseattn.integrations.handle.PatchHandle` the cached
lookups (``_route``, the quantized route ``_quant_route`` and its refusals) and the exact sliding-window
bands (``_band``). The caches are module state shared by every handle: a benchmark patches and unpatches
per round and keeps its routes.
"""

from __future__ import annotations

from typing import Any

import torch

from sparseattn._cache import BoundedCache
from sparseattn._validation import fail
from sparseattn.layout.block_layout import BlockLayout

__all__ = ["RoutesMixin"]


def _choose_route(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout,
                  pv: float | None, window: int | None) -> str:
    """The operator a sparse call runs on (called once per shape by ``PatchHandle._route``).

    ``"auto"``: the first integration-only operator of the registry (the masked-SDPA path) that is
    preferred for these inputs and accepts them, else the attention dispatcher's choice among its operators
    (:func:`sparseattn.ops.attention.select_backend`). A named integration-only operator is taken as given
    (it reports what it cannot run when it runs); any other name goes through the attention dispatcher.
    """
    from sparseattn.ops.registry import operators

    own = [op for op in operators("prefill", entry_point="integration") if "attention" not in op.entry_points]
    if backend == "auto":
        for op in own:
            if (op.preferred is None or op.preferred(q, pv)) and \
                    op.refusal_fn()(q, k=k, v=v, layout=layout, causal=True, pv_threshold=pv, sliding_window=window) is None:
                return op.name
        backend = "attention"
    if any(op.name == backend for op in own):
        return backend
    from sparseattn._validation import check_attention_args
    from sparseattn.ops.attention import select_backend

    check_attention_args("patch_model", q, k, v, causal=True, layout=layout, scale=None, pv_threshold=pv)
    return select_backend(q, k, v, layout=layout, causal=True, pv_threshold=pv,
                          backend="auto" if backend == "attention" else backend, sliding_window=window)


def _bands_cache() -> Any:
    return BoundedCache(32, name="integrations.window_bands")


def _small_cache(name: str, size: int) -> Any:
    return BoundedCache(size, name=name)


_BANDS = _bands_cache()  # exact sliding-window band layouts, per (B, H, N_q, N_kv, window, block, device)
# the backend chosen per shape (shared by every handle)
_ROUTES = _small_cache("integrations.routes", 256)


def _pv_for(pred: Any, layer: int) -> float | None:
    """The attention call's ``pv_threshold`` for ``layer``: ``pred.pv_threshold_for(layer)`` when the
    predictor has it (tuned predictors), else its config's ``pv_threshold``."""
    per_layer = getattr(pred, "pv_threshold_for", None)
    if per_layer is not None:
        return per_layer(layer)
    return getattr(getattr(pred, "config", None), "pv_threshold", None)


def _route_key(backend: str, mode: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pv: float | None,
               window: int | None) -> tuple[Any, ...]:
    """The key of :data:`_ROUTES`: what the backend choice of a sparse call depends on."""
    return (backend, mode, tuple(q.shape), tuple(k.shape), tuple(v.shape), q.dtype, k.dtype, v.dtype,
            str(q.device), q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1, pv is not None, window)


_QUANT_EXPECTED = ("CUDA tensors (sm_80+; sm_89+ for int8_fp8) or TRITON_INTERPRET=1 on the CPU, bfloat16/float16, "
                   "head_dim 64/128/256, layout blocks 64/128")


def _quant_refused(where: str, reason: str, quant: str | None, q: Any, layout: BlockLayout | None = None) -> NotImplementedError:
    """The error for inputs the quantized kernel cannot run (project format, ``NotImplementedError``)."""
    got = "?"
    if isinstance(q, torch.Tensor):
        got = f"{q.device}, {str(q.dtype).replace('torch.', '')}, head_dim {q.shape[-1]}"
        if layout is not None:
            got += f", layout blocks {layout.block_m}x{layout.block_n}"
    return NotImplementedError(str(fail("patch_model", f"quant={quant!r}", f"cannot run {where}: {reason}",
                                        _QUANT_EXPECTED, got)))


class RoutesMixin:
    """The route lookups of :class:`~sparseattn.integrations.handle.PatchHandle` (uses its ``backend``,
    ``quant`` and ``quant_granularity``)."""

    backend: str
    quant: str | None
    quant_granularity: str | None

    def _route(self, mode: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout,
               pv: float | None, window: int | None) -> str:
        """The backend for this call: decided (and the inputs validated) once per shape, then cached.

        Later calls with the same shapes only check the layout's geometry (attribute reads, no sync).
        """
        key = _route_key(self.backend, mode, q, k, v, pv, window)
        used = _ROUTES.get(key)
        if used is None:
            used = _choose_route(self.backend, q, k, v, layout, pv, window)
            _ROUTES.put(key, used)
        elif (layout.seqlen_q, layout.seqlen_kv, layout.batch, layout.heads) != (q.shape[2], k.shape[2], q.shape[0], q.shape[1]) \
                or layout.device != q.device:
            from sparseattn._validation import check_layout_for

            check_layout_for("patch_model", layout, q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.device)
        return used

    @property
    def _quant_label(self) -> str | None:
        """The backend name of the quantized route (``"quant:int8:per_warp"``), None without quant."""
        return None if self.quant is None else f"quant:{self.quant}:{self.quant_granularity}"

    def _quant_blocks(self, layer: int, layout: BlockLayout, q: torch.Tensor) -> None:
        """Refuse a layout whose block sizes the quantized kernel does not take (attribute reads only)."""
        from sparseattn.ops.quant import SUPPORTED_BLOCK_SIZES

        if layout.block_m not in SUPPORTED_BLOCK_SIZES or layout.block_n not in SUPPORTED_BLOCK_SIZES:
            raise _quant_refused(f"layer {layer}", f"its predictor's layout blocks {layout.block_m}x{layout.block_n} "
                                 f"are not supported by the quantized kernel (one of {SUPPORTED_BLOCK_SIZES})",
                                 self.quant, q, layout)

    def _quant_route(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout) -> str:
        """The quantized route: inputs validated and the kernel's refusals checked once per shape, then cached.

        Never falls back to the bf16 kernel: inputs the quantized kernel cannot run raise
        ``NotImplementedError`` naming the layer and the reason.
        """
        label = self._quant_label
        key = _route_key(label, "sparse", q, k, v, None, None)
        self._quant_blocks(layer, layout, q)
        if _ROUTES.get(key) is None:
            from sparseattn._validation import check_attention_args
            from sparseattn.ops.quant import quant_choice

            check_attention_args("patch_model", q, k, v, causal=True, layout=layout, scale=None, pv_threshold=None)
            # the registry's refusal of the quantized operator this route runs (quantized_prefill: the built-in kernel)
            reason = quant_choice(q, quant=self.quant, layout=layout, names=("quant_triton",))[1]
            if reason is not None:
                raise _quant_refused(f"layer {layer}", reason, self.quant, q, layout)
            _ROUTES.put(key, label)
        elif (layout.seqlen_q, layout.seqlen_kv, layout.batch, layout.heads) != (q.shape[2], k.shape[2], q.shape[0], q.shape[1]) \
                or layout.device != q.device:
            from sparseattn._validation import check_layout_for

            check_layout_for("patch_model", layout, q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.device)
        return label

    def _band(self, B: int, H: int, nq: int, nkv: int, window: int | None, q: torch.Tensor) -> BlockLayout:
        """The exact band of a sliding-window layer (every causal block when ``window`` is None), cached per shape."""
        blk = 128 if q.is_cuda else 64
        key = (B, H, nq, nkv, window, blk, str(q.device))

        def build() -> BlockLayout:
            if window is None:
                from sparseattn.layout.patterns import causal_layout

                return causal_layout(nq, nkv, block_m=blk, block_n=blk, batch=B, heads=H, device=q.device)
            from sparseattn.layout.patterns import sliding_window_band_layout

            return sliding_window_band_layout(nq, nkv, window=window, block_m=blk, block_n=blk, batch=B, heads=H,
                                              device=q.device)

        return _BANDS.get_or_build(key, build)
