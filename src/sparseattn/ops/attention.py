"""Public attention entry points and backend dispatch.

``backend="auto"`` picks the fastest backend that accepts the inputs: the Triton kernel for CUDA
tensors it supports, the PyTorch reference otherwise (with a warning that names the reason when a
CUDA input could not use the kernel). ``backend="triton"`` / ``"reference"`` force one; a forced
backend that refuses the inputs raises ``NotImplementedError`` listing every backend and its reason.

``sliding_window=W`` (causal only) without a layout runs on the band layout
(:func:`~sparseattn.layout.patterns.sliding_window_band_layout`, 128×128 blocks), built once per
(lengths, W, blocks, device) and kept in ``_BAND`` (a :class:`~sparseattn._cache.BoundedCache` of
``_BAND_MAX`` entries, stride-0 over batch and heads), so its cost is the band's, not the causal square's.

Exact structured masks (``cu_seqlens`` / ``document_ids`` for packed documents, ``prefix_len`` for
prefix-LM) run as per-row key intervals (:class:`~sparseattn.layout.patterns.RowBounds`, the kernel's
``HAS_ROW_BOUNDS``) on their exact block layout. For host specs (``cu_seqlens``, ``prefix_len``) the
layout and bounds are built once per (spec, lengths, causal, window, blocks, device) and kept in
``_EXACT`` (``_EXACT_MAX`` entries; stride 0 over heads, and over batch when the spec is shared);
``document_ids`` (a device tensor, never read on the host) builds them with device ops only, cached per
tensor object and version (the entry holds the tensor, so its id is not reused while cached; an in-place
change bumps the version): the layers of one packed forward share the build.
A user ``layout`` is intersected with the exact one.
"""

from __future__ import annotations

import warnings
from collections.abc import MutableMapping
from typing import Any, Callable, Iterator

import torch

from sparseattn._cache import BoundedCache
from sparseattn._validation import check_attention_args, fail
from sparseattn.layout.block_layout import BlockLayout
from sparseattn.ops import registry as _registry
from sparseattn.state.types import AttentionState

__all__ = ["attention", "block_sparse_attention", "band_layout", "BACKENDS", "backend_refusals", "select_backend"]


class _BackendsView(MutableMapping):  # type: ignore[type-arg]
    """Compatibility view of the registry: ``name -> (refusal, run)`` of the operators ``attention()`` lists.

    Deprecated: list operators with :func:`sparseattn.ops.registry.operators`. Setting an item registers
    a prefill operator for the ``"attention"`` entry point (after the built-ins in ``"auto"`` order);
    deleting one unregisters it.
    """

    def _ops(self) -> tuple[Any, ...]:
        return _registry.operators("prefill", entry_point="attention")

    def __getitem__(self, name: str) -> tuple[Callable[..., str | None], Callable[..., AttentionState]]:
        for op in self._ops():
            if op.name == name:
                return op.refusal_fn(), op.run_fn()
        raise KeyError(name)

    def __setitem__(self, name: str, pair: tuple[Callable[..., str | None], Callable[..., AttentionState]]) -> None:
        refusal, run = pair
        _registry.register_operator(_registry.Operator(name, "prefill", run=run, refusal=refusal,
                                                       entry_points=("attention",), priority=1000),
                                    replace=name in self)

    def __delitem__(self, name: str) -> None:
        if name not in self:
            raise KeyError(name)
        _registry.unregister_operator(name)

    def __iter__(self) -> Iterator[str]:
        return iter([op.name for op in self._ops()])

    def __len__(self) -> int:
        return len(self._ops())

    def __contains__(self, name: object) -> bool:
        return any(op.name == name for op in self._ops())

    def __repr__(self) -> str:
        return f"BACKENDS({list(self)})"


# name -> (refusal(q, k=, v=, layout=, causal=, pv_threshold=, sliding_window=) -> reason | None,
#          run(q, k, v, *, causal, layout, scale, pv_threshold, stats, sliding_window)): a view of the registry
BACKENDS = _BackendsView()


def _attention_operators() -> tuple[Any, ...]:
    return _registry.operators("prefill", entry_point="attention")


def backend_refusals(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, layout: BlockLayout | None = None,
                     causal: bool = False, pv_threshold: float | None = None,
                     sliding_window: int | None = None) -> dict[str, str | None]:
    """For each backend (the registry's prefill operators for ``attention``), ``None`` if it accepts these inputs,
    else the reason it refuses."""
    return _registry.operator_refusals(_attention_operators(), q, k=k, v=v, layout=layout, causal=causal,
                                       pv_threshold=pv_threshold, sliding_window=sliding_window)


def select_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, layout: BlockLayout | None = None,
                   causal: bool = False, pv_threshold: float | None = None, backend: str = "auto",
                   func: str = "attention", sliding_window: int | None = None) -> str:
    """Name of the backend that will run (see module docstring for the rules).

    Lists the registry's prefill operators for the ``"attention"`` entry point in priority order; ``"auto"``
    takes the first that accepts the inputs and is ``preferred`` for them.
    """
    ops = _attention_operators()
    names = [op.name for op in ops]
    if backend != "auto" and backend not in names:
        raise fail(func, "backend", "is unknown", f"one of {['auto', *names]}", repr(backend))
    reasons = _registry.operator_refusals(ops, q, k=k, v=v, layout=layout, causal=causal, pv_threshold=pv_threshold,
                                          sliding_window=sliding_window)
    if backend != "auto":
        if reasons[backend] is None:
            return backend
        listing = "; ".join(f"{n}: {r or 'accepts'}" for n, r in reasons.items())
        raise NotImplementedError(f"{func}: backend={backend!r} cannot run these inputs ({listing})")
    refused_fast = None
    for op in ops:
        if op.preferred is not None and not op.preferred(q, pv_threshold):
            continue
        if reasons[op.name] is None:
            if op.name == "reference" and refused_fast is not None and q.is_cuda:
                warnings.warn(f"{func}: using the slow PyTorch reference on CUDA because the Triton kernel refused: "
                              f"{reasons[refused_fast]}", RuntimeWarning, stacklevel=3)
            return op.name
        if refused_fast is None:
            refused_fast = op.name
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
    cu_seqlens: Any = None,
    document_ids: torch.Tensor | None = None,
    prefix_len: Any = None,
    row_bounds: Any = None,
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
        quant_granularity: scale groups for ``quant``: ``"per_warp"``, ``"per_block"``, ``"per_thread"`` or ``"per_token"``.
        cu_seqlens: packed documents (exact document mask): boundaries ``[0, n_1, n_1 + n_2, ..., N_kv]``
            as host ints (a list, or a CPU int tensor), shared by the batch, or one such list per batch
            row (document counts may differ). Query ``i`` (position ``i + N_kv - N_q``) attends only keys
            of its own document; with ``causal=True`` causally inside it, with ``causal=False``
            bidirectionally. Combines with ``sliding_window`` (a window inside each document),
            ``layout`` (intersected) and ``attn_mask``; needs ``N_q <= N_kv``; not with ``pv_threshold``
            or ``quant``. A CUDA tensor is refused (reading it would sync): use ``document_ids``.
        document_ids: packed documents given as ids per key, an integer tensor ``[N_kv]`` or
            ``[B, N_kv]`` on q's device; a document is a maximal run of equal consecutive ids. Same
            rules as ``cu_seqlens`` (exclusive with it); the exact layout is rebuilt per call on the device
            (no host sync, no cache).
        prefix_len: prefix-LM (``causal=True`` required): keys ``< prefix_len`` are seen by every query
            (bidirectional prefix), later keys causally: query ``i`` attends ``j <= max(i + N_kv - N_q,
            prefix_len - 1)``. An int in ``[0, N_kv]`` or one per batch row (host ints). ``0``/``1`` is
            plain causal attention. Not with ``cu_seqlens``/``document_ids``, ``sliding_window``,
            ``pv_threshold`` or ``quant``.
        row_bounds: the general form of the two above, for masks built on the device (e.g. from
            ``position_ids`` / ``token_type_ids``): :class:`~sparseattn.layout.patterns.RowBounds`
            ``(lo, hi)``, integer ``[B|1, N_q]`` key indices; query ``i`` attends key ``j`` only if
            ``lo[i] <= j <= hi[i]`` (ANDed with ``causal``, ``sliding_window``, ``layout``, ``attn_mask``).
            The exact layout is built per call on the device (no cache, no host read). Exclusive with
            the three above; not with ``pv_threshold`` or ``quant``.

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
    exact = cu_seqlens is not None or document_ids is not None or prefix_len is not None or row_bounds is not None
    if exact and quant is not None:
        raise fail(fn, "quant", "cannot be combined with cu_seqlens/document_ids/prefix_len/row_bounds", "quant=None",
                   repr(quant))
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
    bounds = None
    if exact:
        layout, bounds, causal, sliding_window = _exact_mask(
            fn, B, H, Nq, Nkv, q.device, causal=causal, layout=layout, sliding_window=sliding_window,
            pv_threshold=pv_threshold, cu_seqlens=cu_seqlens, document_ids=document_ids, prefix_len=prefix_len,
            row_bounds=row_bounds)
    if sliding_window is not None and layout is None:
        layout = band_layout(B, H, Nq, Nkv, sliding_window, q.device)
    name = select_backend(q, k, v, layout=layout, causal=causal, pv_threshold=pv_threshold, backend=backend, func=fn,
                          sliding_window=sliding_window)
    extra: dict[str, Any] = {} if attn_mask is None else {"attn_mask": attn_mask}  # only then: backends without the keyword keep working
    if bounds is not None:
        extra["row_bounds"] = bounds
    return _registry.get_operator(name).run_fn()(q, k, v, causal=causal, layout=layout, scale=scale, pv_threshold=pv_threshold, stats=stats,
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


_EXACT_MAX = 64
_EXACT: BoundedCache[tuple[Any, ...], tuple[Any, ...]] = BoundedCache(
    _EXACT_MAX, name="attention._EXACT")


def _exact_mask(fn: str, B: int, H: int, Nq: int, Nkv: int, device: torch.device, *, causal: bool,
                layout: BlockLayout | None, sliding_window: int | None, pv_threshold: float | None, cu_seqlens: Any,
                document_ids: Any, prefix_len: Any, row_bounds: Any = None,
                blocks: tuple[int, int] | None = None) -> tuple[BlockLayout | None, Any, bool, int | None]:
    """Check the structured-mask arguments; return ``(layout, row bounds, causal, sliding_window)`` to run.

    The returned layout is the exact one (intersected with ``layout`` if given); the window, if any, is
    folded into the bounds (so ``None`` is returned for it); prefix-LM runs ``causal=False`` with bounds.
    ``blocks`` (block_m, block_n) sets the exact layout's blocks when no ``layout`` is given (default 128).
    """
    from sparseattn._cache import device_key
    from sparseattn.layout.patterns import (
        RowBounds,
        check_cu_seqlens,
        check_document_ids,
        check_row_bounds,
        check_prefix_len,
        document_row_bounds,
        prefix_lm_row_bounds,
        row_bounds_layout,
    )

    if cu_seqlens is not None and document_ids is not None:
        raise fail(fn, "cu_seqlens/document_ids", "are mutually exclusive (two ways to give the documents)",
                   "at most one of them", "both")
    if prefix_len is not None and (cu_seqlens is not None or document_ids is not None):
        raise fail(fn, "prefix_len", "cannot be combined with cu_seqlens/document_ids", "one structured mask",
                   "prefix_len and documents")
    if row_bounds is not None and (cu_seqlens is not None or document_ids is not None or prefix_len is not None):
        raise fail(fn, "row_bounds", "cannot be combined with cu_seqlens/document_ids/prefix_len", "one structured mask",
                   "row_bounds and another")
    what = "prefix_len" if prefix_len is not None else ("cu_seqlens" if cu_seqlens is not None else "document_ids")
    what = "row_bounds" if row_bounds is not None else what
    if pv_threshold is not None:
        raise fail(fn, "pv_threshold", f"is not supported with {what}", "None", repr(pv_threshold))
    if row_bounds is not None:  # device bounds: checked (not read), the window folded in, the layout built per call
        rb = check_row_bounds(fn, row_bounds, B, Nq, device)
        lo = rb.lo  # type: ignore[union-attr]
        if sliding_window is not None:
            first = torch.arange(Nq, device=device, dtype=torch.int32) + (Nkv - Nq - sliding_window + 1)
            lo = torch.maximum(lo, first[None]).contiguous()
        rb = RowBounds(lo, rb.hi)  # type: ignore[union-attr]
        bm_ = layout.block_m if layout is not None else _BAND_BLOCK
        bn_ = layout.block_n if layout is not None else _BAND_BLOCK
        lay = row_bounds_layout(rb, Nq, Nkv, block_m=bm_, block_n=bn_, batch=B, heads=H, causal=bool(causal))
        if layout is not None:
            lay = BlockLayout.from_dense_mask(layout.to_dense_mask() & lay.to_dense_mask(), block_m=bm_, block_n=bn_,
                                              seqlen_q=Nq, seqlen_kv=Nkv)
        return lay, rb, bool(causal), None
    if Nq > Nkv:
        raise fail(fn, what, "needs N_q <= N_kv (the queries are the last N_q key positions)", f"N_q <= {Nkv}",
                   f"N_q={Nq}")
    bm = layout.block_m if layout is not None else (blocks[0] if blocks else _BAND_BLOCK)
    bn = layout.block_n if layout is not None else (blocks[1] if blocks else _BAND_BLOCK)
    dev = device_key(device)
    if prefix_len is not None:
        if causal is not True:
            raise fail(fn, "prefix_len", "needs causal=True (prefix-LM is causal attention with a bidirectional "
                       "prefix)", "causal=True", f"causal={causal!r}")
        if sliding_window is not None:
            raise fail(fn, "prefix_len", "cannot be combined with sliding_window", "sliding_window=None",
                       f"sliding_window={sliding_window}")
        vals = check_prefix_len(fn, prefix_len, Nkv)
        if len(vals) not in (1, B):
            raise fail(fn, "prefix_len", "must give one value or one per batch row", f"1 or {B} values", len(vals))
        if max(vals) <= 1:
            return layout, None, True, None  # no bidirectional pair: plain causal attention
        key: tuple[Any, ...] = ("prefix", vals, Nq, Nkv, bm, bn, dev)
        run_causal = False

        def build() -> tuple[torch.Tensor, torch.Tensor, Any]:
            b = prefix_lm_row_bounds(list(vals), Nq, Nkv, device=dev)
            lay = row_bounds_layout(b, Nq, Nkv, block_m=bm, block_n=bn, heads=1, causal=False)
            return lay.kv_num_blocks.contiguous(), lay.kv_indices.contiguous(), b
    else:
        run_causal = bool(causal)
        if cu_seqlens is not None:
            rows = check_cu_seqlens(fn, cu_seqlens, Nkv)
            if len(rows) not in (1, B):
                raise fail(fn, "cu_seqlens", "must give one split or one per batch row", f"1 or {B} rows", len(rows))
            key = ("docs", rows, Nq, Nkv, run_causal, sliding_window, bm, bn, dev)
            spec: Any = [list(r) for r in rows]
        else:
            ids = document_ids
            check_document_ids(fn, ids)
            if ids.device != device:
                raise fail(fn, "document_ids", "is on another device than q", str(device), str(ids.device))
            if ids.dim() not in (1, 2) or ids.shape[-1] != Nkv or (ids.dim() == 2 and ids.shape[0] not in (1, B)):
                raise fail(fn, "document_ids", "has the wrong shape", f"[N_kv] or [B|1, N_kv] = [{B}|1, {Nkv}]",
                           tuple(ids.shape))
            # device values, never read: cached by the tensor object and its version (the entry keeps the tensor
            # alive, so no other tensor takes its id while the entry exists; an in-place write bumps _version)
            key = () if torch.compiler.is_compiling() else (  # traced: no data pointer, built in the graph
                "docids", id(ids), ids.data_ptr(), ids._version, tuple(ids.shape), Nq, Nkv, run_causal,
                sliding_window, bm, bn, dev)
            spec = None

        def build() -> tuple[Any, ...]:
            b = document_row_bounds(spec, document_ids=document_ids if spec is None else None, seqlen_q=Nq,
                                    seqlen_kv=Nkv, sliding_window=sliding_window, device=dev)
            lay = row_bounds_layout(b, Nq, Nkv, block_m=bm, block_n=bn, heads=1, causal=run_causal)
            return lay.kv_num_blocks.contiguous(), lay.kv_indices.contiguous(), b, document_ids

    num, idx, bounds = (_EXACT.get_or_build(key, build) if key else build())[:3]
    Bb = num.shape[0]
    if Bb == 1 and B > 1:
        num, idx = num.expand(B, 1, -1), idx.expand(B, 1, -1, -1)
    exact_lay = BlockLayout(num.expand(B, H, -1), idx.expand(B, H, -1, -1), bm, bn, Nq, Nkv, validate=False)
    if layout is not None:  # only blocks both select
        both = layout.to_dense_mask() & exact_lay.to_dense_mask()
        exact_lay = BlockLayout.from_dense_mask(both, block_m=bm, block_n=bn, seqlen_q=Nq, seqlen_kv=Nkv)
    return exact_lay, RowBounds(bounds.lo, bounds.hi), run_causal, None


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
