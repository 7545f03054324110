"""The patched model's state and per-call hot path: :class:`PatchHandle`.

Every attention call of a patched layer lands in :meth:`PatchHandle._forward`, which decides what runs it:
the fast lane and layer graphs (:mod:`.graph_path`), mask checks and packed sequences (:mod:`.packed`), the
route (:mod:`.routes`: backend decided once per shape), the ``torch.compile`` path (custom ops, here) and the
device-side accounting (:mod:`.accounting`). Each of those jobs is a mixin in its own module; this module keeps
the handle's state, its lifecycle (unpatch, suspend, capture) and the per-call decision. Built by
:func:`sparseattn.integrations.transformers_patch.patch_model`.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, Callable

import torch

from sparseattn._validation import fail
from sparseattn.integrations._tracing import _compiling
from sparseattn.integrations.hf_attention import _HANDLE_ATTR, _LAYER_ATTR
from sparseattn.integrations.accounting import _STATIC_DENSITY, AccountingMixin
from sparseattn.integrations.auto_dense import DENSE, MEASURE, AutoDenseMixin
from sparseattn.integrations.graph_path import GraphPathMixin
from sparseattn.integrations.masks import _window_mask
from sparseattn.integrations.packed import PackedMixin
from sparseattn.integrations.routes import RoutesMixin, _pv_for
from sparseattn.layout.block_layout import BlockLayout
from sparseattn.ops.masked_sdpa import masked_sdpa_attention
from sparseattn.predictors.pattern import PatternPredictor

__all__ = ["PatchHandle"]


class PatchHandle(AccountingMixin, RoutesMixin, PackedMixin, GraphPathMixin, AutoDenseMixin):
    """State of one patched model; returned by :func:`patch_model`.

    Attributes:
        layer_modes: ``{layer: "sparse" | "window" | "dense" | "model_window"}`` (``"window"``: exact
            sliding-window attention on sparseattn's path; ``"model_window"``: a window layer the model
            runs itself because it uses a feature sparseattn lacks, e.g. logit softcapping).
        densities: ``{layer: [tensor[H] per prefill call]}`` — block density actually used per
            head (selected / available blocks of the causal region, averaged over the batch), float64
            on the model's device: recorded without a host sync, read by :meth:`sparsity_report`.
        backends_used: ``{layer: set of backend names that ran the sparse prefill}``.
        counts: number of ``prefill_sparse``, ``prefill_dense``, ``decode_dense`` (the model's own attention),
            ``decode_kernel``, ``decode_sparse``, ``decode_window`` (a sliding-window layer's exact dense
            decode on sparseattn's kernel) and ``decode_verify`` (a sparse route's exact verification step of
            speculative decoding) layer calls.
        decode_fallbacks: ``{reason: count}`` of decode calls a ``decode="kernel"/"sparse"`` route handed to the
            model's own attention (``"attention_mask"``, ``"sliding_window"``, ``"softcap"``, ...; see
            :mod:`sparseattn.integrations.decode_route`).
        decode_backends: ``{layer: {"triton" | "reference"}}`` that ran the decode route.
        decode_stats: ``{"summary_builds", "summary_updates"}``: page summaries built from the whole cache /
            updated incrementally (sparse decode).
        captured: ``{layer: {"q", "k", "v"}}`` post-RoPE tensors ``(B, H|H_kv, N, D)`` when
            :meth:`capture` is active (prefill calls only; the last one wins).
        layouts: ``{layer: BlockLayout}`` of the last prefill when ``keep_layouts`` is True.
        dense_above: density above which a sparse layer runs the model's dense attention instead
            (``None``: never; ``"auto"``: the measured crossover of the layer's shape, see
            :mod:`sparseattn.integrations.auto_dense`); ``dense_fallbacks`` counts those calls per layer.
        timings: ``{layer: seconds}`` summed over prefill calls (prediction + attention).

    Use as a context manager to unpatch on exit.
    """

    def __init__(self, model: torch.nn.Module, layers: list[tuple[int, torch.nn.Module]], predictors: dict[int, Any],
                 per_head: dict[int, dict[int, Any]], layer_modes: dict[int, str], backend: str,
                 orig_impl: str, name: str, dense_fn: Callable[..., Any], keep_layouts: bool) -> None:
        self.model = model
        self._layers = layers
        self.predictors = predictors
        self.per_head = per_head
        self.layer_modes = layer_modes
        self.backend = backend
        self.orig_impl = orig_impl
        self.impl_name = name
        self._dense_fn = dense_fn
        self.keep_layouts = keep_layouts
        self.dense_above: float | str | None = None
        self.dense_fallbacks: dict[int, int] = {}
        self._auto: dict[tuple[Any, ...], Any] | None = None  # dense_above="auto": AutoDense per (layer, shape)
        self._auto_warned: set[str] = set()
        self.capture_layers: set[int] | None = None
        self.capture_device: str | torch.device | None = None
        self.captured: dict[int, dict[str, torch.Tensor]] = {}
        self.layouts: dict[int, BlockLayout] = {}
        # per layer and call: a finished [H] float64 density, or (selected counts [B, H] int64, available blocks)
        # divided when read (one reduction per call on the hot path); see the ``densities`` property
        self._density_raw: dict[int, list[Any]] = {}
        self.backends_used: dict[int, set[str]] = {}
        self.timings: dict[int, float] = {}
        # prefill_quant: sparse prefill calls that ran the quantized kernel (also counted in prefill_sparse);
        # prefill_packed: sparse prefill calls of packed sequences (document masks; also in prefill_sparse)
        self.counts = {"prefill_sparse": 0, "prefill_dense": 0, "decode_dense": 0, "decode_kernel": 0,
                       "decode_sparse": 0, "decode_window": 0, "decode_verify": 0,
                       "prefill_quant": 0, "prefill_packed": 0}
        #: the decode route (``patch_model(decode="kernel"|"sparse")``), None for the model's own dense decode
        self.decode_route: Any = None
        self.decode_fallbacks: dict[str, int] = {}
        self.decode_backends: dict[int, set[str]] = {}
        self.decode_stats: dict[str, int] = {}
        self._decode_hook: Any = None
        self._hook: Any = None
        self.active = True
        # mask verdicts of the current forward (see _mask_ok); routes and static densities are module caches
        self._mask_verdicts: dict[tuple[Any, ...], Any] = {}  # per forward: mask verdicts, packed document ids
        self._mask_refs: list[torch.Tensor] = []
        # packed sequences (integrations/packed.py): per-geometry static document buffers read by the packed layer
        # graphs, and each predicted layer's block sizes (so a graphed call need not predict on the host first)
        self._packed_static: dict[tuple[Any, ...], tuple[torch.Tensor, ...]] = {}
        self._packed_blocks: dict[int, tuple[int, int]] = {}
        #: the tuned file the default predictor comes from (``"in-memory"`` for a TunedConfig), else None
        self.tuned: str | None = None
        #: query tokens at the end of each prefill call kept on every causal block (patch_model(dense_tail=...))
        self.dense_tail = 0
        #: why layer graphs are off for the whole model (None: on where a layer allows them)
        self.layer_graph_off: str | None = None
        #: ``{layer: "graphed" | reason}`` for the sparse CUDA calls seen so far
        self.layer_graph_status: dict[int, str] = {}
        self._layer_graphs: Any = None  # LayerGraphs, created on the first graphed call
        self._graph_warned = False
        #: ``"int8"`` / ``"int8_fp8"`` when the sparse prefill layers run the quantized kernel, else None
        self.quant: str | None = None
        #: the quantized kernel's scale granularity (meaningful only with ``quant``)
        self.quant_granularity: str | None = None

    # ---------------------------------------------------------------- lifecycle
    def _on_forward(self, *_: Any, **__: Any) -> None:
        self._mask_verdicts.clear()  # masks are built per forward: verdicts hold for one forward only
        self._mask_refs.clear()
        seen: set[int] = set()
        for pred in list(self.predictors.values()) + [p for d in self.per_head.values() for p in d.values()]:
            if pred is not None and id(pred) not in seen:
                seen.add(id(pred))
                pred.reset()

    def unpatch(self) -> None:
        """Restore the model exactly: attention implementation, hooks, attributes."""
        if not self.active:
            return
        if self._hook is not None:
            self._hook.remove()
        if self._decode_hook is not None:
            self._decode_hook.remove()
        self._layer_graphs = None  # frees the graphs and their static buffers
        self._packed_static.clear()
        ops = sys.modules.get("sparseattn.ops.custom_ops")
        if ops is not None:  # predictors registered for the compiled path (predict_layout_op)
            for pred in list(self.predictors.values()):
                if pred is not None:
                    ops.unregister_predictor_object(id(pred))
        for _, mod in self._layers:
            if hasattr(mod, _LAYER_ATTR):
                delattr(mod, _LAYER_ATTR)
        self.model.set_attn_implementation(self.orig_impl)
        if self.model.config._attn_implementation != self.orig_impl:  # pragma: no cover - defensive
            raise RuntimeError(f"unpatch: could not restore attn_implementation={self.orig_impl!r}")
        if getattr(self.model, _HANDLE_ATTR, None) is self:
            delattr(self.model, _HANDLE_ATTR)
        self.active = False

    def __enter__(self) -> "PatchHandle":
        return self

    @contextlib.contextmanager
    def suspended(self) -> Iterator["PatchHandle"]:
        """Run the model's own attention inside the block (e.g. the dense side of a benchmark), patched again after.

        Caches, layer graphs and recorded statistics are kept; only the attention implementation is switched.
        """
        if not self.active:
            raise RuntimeError("PatchHandle.suspended: the model is no longer patched (unpatch() was called)")
        self.model.set_attn_implementation(self.orig_impl)
        try:
            yield self
        finally:
            self.model.set_attn_implementation(self.impl_name)

    def __exit__(self, *exc: Any) -> None:
        self.unpatch()

    # ---------------------------------------------------------------- capture
    def capture(self, layers: Iterable[int] | None = None, *, device: str | torch.device | None = "cpu") -> "_Capture":
        """Context manager recording post-RoPE q/k/v of ``layers`` (all when None) on prefill calls."""
        return _Capture(self, layers, device)


    # ---------------------------------------------------------------- the attention call

    def _dense_call(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, kwargs: dict[str, Any], window: int | None,
                    counter: str) -> tuple[torch.Tensor, Any]:
        self.counts[counter] += 1
        if attention_mask is None and window is not None and query.shape[2] > 1:
            # our mask builder skipped this window mask (see _prefill_mask): the model's attention needs it
            attention_mask = _window_mask(query.shape[2], key.shape[2], window, query.device)
        return self._dense_fn(module, query, key, value, attention_mask, **kwargs)

    def _forward(self, module: torch.nn.Module, layer: int, query: torch.Tensor, key: torch.Tensor,
                 value: torch.Tensor, attention_mask: torch.Tensor | None, kwargs: dict[str, Any]) -> tuple[torch.Tensor, None]:
        lg = self._layer_graphs
        if lg is not None and attention_mask is None:
            fl = lg.fast.get(layer)
            if fl is not None:  # the same call as this layer's last graphed one: straight to the replay
                res = self._fast_replay(lg, fl, module, layer, query, key, value, kwargs)
                if res is not None:
                    return res
        nq, nkv = query.shape[2], key.shape[2]
        prefill = nq == nkv
        if prefill and self.capture_layers is not None and (not self.capture_layers or layer in self.capture_layers):
            dev = self.capture_device if self.capture_device is not None else query.device
            self.captured[layer] = {n: t.detach().to(dev, copy=True).contiguous()
                                    for n, t in (("q", query), ("k", key), ("v", value))}
        window = kwargs.get("sliding_window")
        if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
            window = None
        mode = self.layer_modes[layer]
        if window is not None and mode == "sparse":  # a window the layer announces at run time (Mistral)
            mode = self.layer_modes[layer] = "window"
        if not prefill:
            if self.decode_route is not None:
                return self.decode_route.forward(self, module, layer, query, key, value, attention_mask, kwargs, window)
            return self._dense_call(module, query, key, value, attention_mask, kwargs, None, "decode_dense")
        # a window as long as the keys restricts nothing: plain causal
        win = window if (window is not None and window < nkv) else None
        ok = attention_mask is None or self._mask_ok(attention_mask, nq, nkv, win)
        if self.quant is not None and win is not None and mode in ("sparse", "window"):
            raise NotImplementedError(str(fail(
                "patch_model", f"quant={self.quant!r}", f"cannot run layer {layer}: it is a sliding-window layer "
                f"(window {win}) and the quantized kernel has no window support",
                f"that layer in dense_layers (dense_layers=[{layer}, ...]) or quant=None", f"sliding_window={win}")))
        if mode in ("dense", "model_window") or (mode == "window" and not ok):
            return self._dense_call(module, query, key, value, attention_mask, kwargs, win, "prefill_dense")

        fn = "patch_model"
        if not ok:
            docs = self._packed(attention_mask, kwargs.get("position_ids"), query.shape[0], nq, nkv, win)
            if docs is not None:  # packed sequences: exact document masks on the kernel (not graphed)
                return self._packed_call(layer, mode, query, key, value, kwargs, win, docs)
            raise fail(fn, "attention_mask", "is not plain causal (padding or a custom mask); sparse prefill "
                       "supports unpadded causal inputs and packed sequences (position_ids restarting per "
                       "sequence) only", "no padding (run one sequence per batch or equal lengths)",
                       f"a mask of shape {tuple(attention_mask.shape)} with masked-out positions")
        unsupported = None
        if kwargs.get("softcap") is not None:
            unsupported = f"attention logit softcapping (softcap={kwargs['softcap']})"
        elif kwargs.get("s_aux") is not None:
            unsupported = "attention sinks (s_aux)"
        elif module.training and float(kwargs.get("dropout", 0.0) or 0.0) > 0:
            unsupported = "attention dropout in training mode (call model.eval())"
        if unsupported is not None:
            if mode == "window":  # the model's own windowed attention stays exact
                self.layer_modes[layer] = "model_window"
                return self._dense_call(module, query, key, value, attention_mask, kwargs, win, "prefill_dense")
            raise NotImplementedError(f"{fn}: layer {layer} uses {unsupported}, which no sparseattn backend "
                                      f"implements; keep it dense with dense_layers=[{layer}, ...]")

        auto = act = None
        if self._auto is not None and mode == "sparse":  # dense_above="auto": the measured verdict of this layer
            auto = self._auto_state(layer, query, key)
            act = auto.action(_compiling() or (query.is_cuda and torch.cuda.is_current_stream_capturing()))
            if act == DENSE:
                return self._sdpa_fallback(layer, query, key, value, kwargs, time.perf_counter(),
                                           auto if attention_mask is None else None)
        if _compiling():
            return self._forward_traced(layer, query, key, value, kwargs, mode, win)
        t0 = time.perf_counter()
        scale = kwargs.get("scaling")
        B, H, _, D = query.shape
        if query.is_cuda:
            res = self._graphed(module, layer, mode, query, key, value, scale, win, t0,
                                auto if act == MEASURE else None)
            if res is not None:
                if attention_mask is None:
                    self._remember_fast(layer, mode, query, key, value, kwargs, auto)
                return res
        if mode == "window":
            layout, pv, static = self._band(B, H, nq, nkv, win, query), None, True
        else:
            pred = self.predictors[layer]
            layout = self._layout(layer, query, key)
            pv = _pv_for(pred, layer)
            static = isinstance(pred, PatternPredictor) and not self.per_head.get(layer)
        density = self._density(layout, static, win)  # this call's accounting entry, computed once
        if act == MEASURE:
            auto.measure_entry(density)  # type: ignore[union-attr]
        if isinstance(self.dense_above, float) and mode == "sparse" and self._too_dense(layout, static, density):
            return self._fallback(module, layer, query, key, value, attention_mask, kwargs, t0)
        used = self._route(mode, query, key, value, layout, pv, win) if self.quant is None else \
            self._quant_route(layer, query, key, value, layout)
        if self.quant is not None:
            from sparseattn.ops.quant import quantized_prefill

            # quantization + the quantized kernel, written straight into the (B, N, H, D) tensor transformers expects
            out = torch.empty((B, nq, H, D), dtype=query.dtype, device=query.device)
            quantized_prefill(query, key, value, layout, scale=scale, quant=self.quant,
                              quant_granularity=self.quant_granularity, out=out.transpose(1, 2))
            self.counts["prefill_quant"] += 1
        elif used == "masked_sdpa":
            if pv is not None:
                raise NotImplementedError(f"{fn}: backend='masked_sdpa' cannot apply pv_threshold={pv}; use "
                                          "backend='auto', 'reference' or 'triton'")
            out = masked_sdpa_attention(query, key, value, layout, scale=scale, sliding_window=win).transpose(1, 2)
        elif used == "triton":
            from sparseattn.ops import triton_launch

            # the kernel writes (B, N, H, D) directly through a transposed view: no copy afterwards
            out = torch.empty((B, nq, H, D), dtype=query.dtype, device=query.device)
            triton_launch.block_sparse_fwd(query, key, value, layout=layout, causal=True, scale=scale,
                                           pv_threshold=pv, out=out.transpose(1, 2), sliding_window=win)
        else:
            from sparseattn.ops.attention import attention

            out = attention(query, key, value, causal=True, layout=layout, scale=scale, backend=used,
                            pv_threshold=pv, sliding_window=win).out.transpose(1, 2)
        self.timings[layer] = self.timings.get(layer, 0.0) + time.perf_counter() - t0
        self.counts["prefill_sparse"] += 1
        self._density_raw.setdefault(layer, []).append(density)
        self.backends_used.setdefault(layer, set()).add(used)
        if self.keep_layouts:
            self.layouts[layer] = layout
        return (out if out.is_contiguous() else out.contiguous()), None

    def _account_all_blocks(self, layer: int, query: torch.Tensor, ones: torch.Tensor | None = None) -> torch.Tensor:
        """Count a dense fallback of ``layer`` and record its density as every block; returns that ``[H]`` entry
        (``ones``: the entry already at hand, e.g. a fast lane's)."""
        self.dense_fallbacks[layer] = self.dense_fallbacks.get(layer, 0) + 1
        if ones is None:
            H = query.shape[1]
            ones = _STATIC_DENSITY.get_or_build(("ones", H, str(query.device)),
                                                lambda: (None, torch.ones(H, dtype=torch.float64, device=query.device)))[1]
        self._density_raw.setdefault(layer, []).append(ones)  # the layer ran every block
        return ones

    def _fallback(self, module: torch.nn.Module, layer: int, query: torch.Tensor, key: torch.Tensor,
                  value: torch.Tensor, attention_mask: torch.Tensor | None, kwargs: dict[str, Any],
                  t0: float) -> tuple[torch.Tensor, Any]:
        """A sparse layer's call run by the model's dense attention (``dense_above``), accounted as every block."""
        self._account_all_blocks(layer, query)
        res = self._dense_call(module, query, key, value, attention_mask, kwargs, None, "prefill_dense")
        self.timings[layer] = self.timings.get(layer, 0.0) + time.perf_counter() - t0
        return res

    def _sdpa_fallback(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       kwargs: dict[str, Any], t0: float, lane: Any = None) -> tuple[torch.Tensor, None]:
        """``dense_above="auto"``'s dense call: the fastest dense attention, which the crossover is measured against.

        ``F.scaled_dot_product_attention(is_causal=True, enable_gqa=...)`` on the call's q/k/v (no ``repeat_kv``
        copies, PyTorch's backend choice: cuDNN / flash on a GPU), replayed from a layer graph where the layer's
        sparse calls would be (an eager forward is host-bound: the model's own attention call costs more host
        time than a replay), else run eagerly; exact dense attention either way, accounted as every block.
        ``lane``: the layer's auto state when the call had no mask: a graphed fallback becomes the layer's fast lane.
        """
        import torch.nn.functional as F

        ones = self._account_all_blocks(layer, query)
        B, H, nq, D = query.shape
        scale = kwargs.get("scaling")
        gqa = H != key.shape[1]

        def body(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor) -> None:
            out.copy_(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa).transpose(1, 2))

        if query.is_cuda and not _compiling() and self._graph_reason(layer, "dense", query) is None:
            res = self._run_layer_graph((layer, "sdpa", scale, gqa), layer, query, key, value, body,
                                        f"layer {layer} (dense fallback)", t0, ("prefill_dense",))
            if res is not None:
                if lane is not None:
                    self._remember_fast(layer, "dense", query, key, value, kwargs, lane, ones)
                return res[0], None
        self.counts["prefill_dense"] += 1
        out = torch.empty((B, nq, H, D), dtype=query.dtype, device=query.device)
        body(query, key, value, out)
        self.timings[layer] = self.timings.get(layer, 0.0) + time.perf_counter() - t0
        return out, None

    def _forward_traced(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        kwargs: dict[str, Any], mode: str, win: int | None) -> tuple[torch.Tensor, None]:
        """The sparse / window path while ``torch.compile`` traces the model: custom ops only.

        The predictor runs as ``sparseattn::predict_layout`` and attention as the attention custom op,
        so dynamo keeps the whole forward in one graph (no caches behind locks, no host reads). Per-call
        accounting (densities, timings, backends) is not recorded here: a compiled graph does not run
        this Python on later calls. ``pv_threshold`` and per-head predictors are refused.
        """
        from sparseattn.ops.custom_ops import attention_op, predict_layout_op

        fn = "patch_model"
        if self.quant is not None:
            raise NotImplementedError(str(fail(
                fn, f"quant={self.quant!r}", "is not supported under torch.compile (the quantized kernel has no "
                "custom op yet)", "an eager model (layer graphs replay it on CUDA) or quant=None", "torch.compile")))
        layout = None
        pv = None
        if mode != "window":
            if self.per_head.get(layer):
                raise NotImplementedError(f"{fn}: per-head predictors (layer {layer}) are not supported under "
                                          "torch.compile; compile a model patched without per_head")
            pred = self.predictors[layer]
            pv = _pv_for(pred, layer)
            if pv is not None:
                raise NotImplementedError(f"{fn}: pv_threshold (layer {layer}) is not supported under torch.compile "
                                          "(its skip counters are host-side); compile without pv_threshold")
            layout = predict_layout_op(pred, query, key, layer=layer, causal=True)
        backend = {"auto": "auto", "triton": "triton", "reference": "reference", "attention": "auto",
                   "masked_sdpa": "reference"}[self.backend]
        out = attention_op(query, key, value, causal=True, layout=layout, scale=kwargs.get("scaling"),
                           backend=backend, sliding_window=win).out
        return out.transpose(1, 2).contiguous(), None

    def _layout(self, layer: int, q: torch.Tensor, k: torch.Tensor) -> BlockLayout:
        pred = self.predictors[layer]
        layout = pred.predict(q, k, causal=True, layer=layer)
        if not isinstance(layout, BlockLayout):
            raise fail("patch_model", "predictor.predict", "must return a BlockLayout", "BlockLayout", type(layout).__name__)
        overrides = self.per_head.get(layer)
        if not overrides:
            return layout
        H, Hkv = q.shape[1], k.shape[1]
        G = H // Hkv
        mask = layout.to_dense_mask().clone()
        for h, hp in overrides.items():
            if hp is None:  # dense head
                from sparseattn.layout.block_layout import causal_block_region

                region, _ = causal_block_region(q.shape[2], k.shape[2], layout.block_m, layout.block_n, q.device)
                mask[:, h] = region
                continue
            sub = hp.predict(q[:, h:h + 1], k[:, h // G:h // G + 1], causal=True, layer=layer)
            if (sub.block_m, sub.block_n) != (layout.block_m, layout.block_n):
                raise fail("patch_model", "per_head", f"predictor of head {layer}.{h} uses other block sizes than "
                           "the layer's predictor", f"block_m={layout.block_m}, block_n={layout.block_n}",
                           f"block_m={sub.block_m}, block_n={sub.block_n}")
            mask[:, h] = sub.to_dense_mask()[:, 0]
        return BlockLayout.from_dense_mask(mask, block_m=layout.block_m, block_n=layout.block_n,
                                           seqlen_q=layout.seqlen_q, seqlen_kv=layout.seqlen_kv)


class _Capture:
    def __init__(self, handle: PatchHandle, layers: Iterable[int] | None, device: Any) -> None:
        self.handle = handle
        self.layers = set() if layers is None else {int(x) for x in layers}
        self.device = device

    def __enter__(self) -> dict[int, dict[str, torch.Tensor]]:
        self.handle.captured.clear()
        self.handle.capture_layers = self.layers
        self.handle.capture_device = self.device
        return self.handle.captured

    def __exit__(self, *exc: Any) -> None:
        self.handle.capture_layers = None

