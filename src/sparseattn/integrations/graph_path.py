"""The layer-graph path of a patched layer's sparse call: graphed replays and the fast lane.

:class:`GraphPathMixin` gives :class:`~sparseattn.integrations.handle.PatchHandle` ``_graph_reason`` (why a
call cannot be replayed: options that need the host, a predictor's own refusal, a large GPU-bound call),
``_graphed`` (capture or replay the layer's call through
:class:`~sparseattn.integrations.layer_graphs.LayerGraphs`, accounting on the device) and the fast lane
(``_remember_fast`` / ``_fast_replay``: a call equal to the layer's last graphed one goes straight to the
replay). Only the Triton route (bf16 or quantized) is graphed.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import torch

from sparseattn.integrations._tracing import _compiling
from sparseattn.integrations.layer_graphs import DensityAccumulator
from sparseattn.integrations.routes import _ROUTES, _pv_for, _route_key
from sparseattn.predictors.pattern import PatternPredictor

__all__ = ["GraphPathMixin"]


class GraphPathMixin:
    """CUDA-graph replays of :class:`~sparseattn.integrations.handle.PatchHandle`'s sparse layer calls."""

    _layer_graphs: Any
    _graph_warned: bool
    layer_graph_off: str | None
    layer_graph_status: dict[int, str]

    def _graph_reason(self, layer: int, mode: str, query: torch.Tensor) -> str | None:
        """Why this sparse CUDA call cannot be replayed from a layer graph (None: it can)."""
        if self.layer_graph_off is not None:
            return self.layer_graph_off
        if torch.cuda.is_current_stream_capturing():
            return "inside the caller's own CUDA graph capture"
        if isinstance(self.dense_above, float):
            return "dense_above reads each layer's density on the host"
        if self.keep_layouts:
            return "keep_layouts keeps every call's layout object"
        if self.per_head.get(layer):
            return "per-head predictor overrides merge layouts on the host"
        if mode == "sparse":  # what the predictor itself says a replay cannot do (predictors/base.py)
            from sparseattn.predictors.base import graph_refusal

            stateful = graph_refusal(self.predictors[layer], layer)
            if stateful is not None:
                return stateful
        from sparseattn.integrations.layer_graphs import DEFAULT_MAX_NUMEL

        if query.numel() > DEFAULT_MAX_NUMEL:
            return f"large call (q has {query.numel()} elements > {DEFAULT_MAX_NUMEL}): GPU-bound, not graphed"
        return None

    def _graphed(self, module: torch.nn.Module, layer: int, mode: str, query: torch.Tensor, key: torch.Tensor,
                 value: torch.Tensor, scale: Any, win: int | None, t0: float,
                 measure: Any = None) -> tuple[torch.Tensor, None] | None:
        """The layer's sparse call replayed from a CUDA graph (see :mod:`.layer_graphs`), or None to run it eagerly.

        A key is graphed from its second call on: the first runs eagerly and settles the backend route
        (validation, backend choice); only the Triton route is graphed. ``measure``: the layer's
        ``dense_above="auto"`` state when this call measures its density (:mod:`.auto_dense`).
        """
        why = self._graph_reason(layer, mode, query)
        if why is None:
            pred = self.predictors[layer] if mode == "sparse" else None
            pv = _pv_for(pred, layer) if pred is not None else None
            rkey = _route_key(self._quant_label or self.backend, mode, query, key, value, pv, win)
            route = _ROUTES.get(rkey)
            if route is None:
                return None  # first call of this shape: eager (the route is decided there)
            if route not in ("triton", self._quant_label):
                why = f"backend route {route!r} (only the Triton kernel is graphed)"
        if why is not None:
            self._not_graphed(layer, why)
            return None
        static = mode == "window" or (isinstance(pred, PatternPredictor))
        B, H, nq, D = query.shape
        nkv = key.shape[2]
        fixed = self._band(B, H, nq, nkv, win, query) if mode == "window" else (
            self._layout(layer, query, key) if static else None)

        quant = self.quant
        accum = DensityAccumulator() if fixed is None else None

        def body(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor) -> Any:
            from sparseattn.ops import triton_launch

            layout = fixed if fixed is not None else pred.predict(q, k, causal=True, layer=layer)
            if quant is not None:  # quantization runs inside the graph too, on every replay
                from sparseattn.ops.quant import quantized_prefill

                self._quant_blocks(layer, layout, q)
                quantized_prefill(q, k, v, layout, scale=scale, quant=quant, quant_granularity=self.quant_granularity,
                                  out=out.transpose(1, 2))
            else:
                triton_launch.block_sparse_fwd(q, k, v, layout=layout, causal=True, scale=scale, pv_threshold=pv,
                                               out=out.transpose(1, 2), sliding_window=win)
            if accum is not None:  # the predicted layout's counts, summed on the device (no per-call copy)
                accum.add(layout.selected_in_region(causal=True), layout.available_blocks(causal=True))
            return None

        body.accum = accum  # type: ignore[attr-defined] - read by LayerGraphs (warm-up) and the fast lane
        gkey = (layer, mode, win, id(pred), scale, pv, self._quant_label)
        counters = ("prefill_sparse",) if quant is None else ("prefill_sparse", "prefill_quant")
        res = self._run_layer_graph(gkey, layer, query, key, value, body, f"layer {layer}", t0, counters)
        if res is None:
            return None
        out, used = res
        if used is None:
            self._density_raw.setdefault(layer, []).append(self._density(fixed, True, win))
        if measure is not None:  # dense_above="auto": the graphed calls' mean density since the last measurement
            if used is not None:
                measure.measure_accum(used)
            else:
                measure.measure_entry(self._density_raw[layer][-1])
        self.backends_used.setdefault(layer, set()).add(self._quant_label or "triton")
        return out, None

    def _not_graphed(self, layer: int, why: str) -> None:
        """Record why ``layer`` runs without a graph; warn once per handle for reasons the caller chose (options)."""
        if self.layer_graph_status.get(layer) != why:
            self.layer_graph_status[layer] = why
            optional = why.startswith(("dense_above", "keep_layouts", "per-head", "SketchWalk"))
            if optional and not self._graph_warned:
                self._graph_warned = True
                warnings.warn(f"patch_model: layer {layer} runs without a CUDA graph ({why}); each sparse layer "
                              "then pays its host work per call", UserWarning, stacklevel=6)

    def _run_layer_graph(self, gkey: tuple[Any, ...], layer: int, query: torch.Tensor, key: torch.Tensor,
                         value: torch.Tensor, body: Any, what: str, t0: float,
                         counters: tuple[str, ...]) -> tuple[torch.Tensor, Any] | None:
        """Replay (capturing first if needed) the graph of ``gkey`` running ``body`` and account the call: status,
        timing, ``counters``, and the predicted layout's device-side density sum (``body.accum``).

        Returns ``(out, the accumulator of the graph that ran or None)``, or None when the capture failed (the
        call then runs eagerly).
        """
        if self._layer_graphs is None:
            from sparseattn.integrations.layer_graphs import LayerGraphs

            self._layer_graphs = LayerGraphs()
        res = self._layer_graphs.run(gkey, query, key, value, body, what)
        if res is None:
            self.layer_graph_status[layer] = "capture failed (see the warning)"
            return None
        out, _ = res
        self.layer_graph_status[layer] = "graphed"
        self.timings[layer] = self.timings.get(layer, 0.0) + time.perf_counter() - t0
        for c in counters:
            self.counts[c] += 1
        used = getattr(self._layer_graphs.last[1].body, "accum", None)  # the accumulator of the graph that ran
        if used is not None:
            self._count_graph_call(layer, used)
        return out, used

    def _fast_check(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    kwargs: dict[str, Any]) -> tuple[Any, ...]:
        """What a fast-lane call must equal: shapes, dtypes, device and the keyword arguments the route depends on."""
        return (query.shape, key.shape, value.shape, query.dtype, key.dtype, value.dtype, query.device,
                kwargs.get("scaling"), kwargs.get("sliding_window"), kwargs.get("softcap"), kwargs.get("s_aux"))

    def _remember_fast(self, layer: int, mode: str, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       kwargs: dict[str, Any], auto: Any = None, dense_entry: Any = None) -> None:
        """Keep this graphed call as the layer's fast lane (see :class:`~.layer_graphs.FastLane`); ``dense_entry``
        (the all-blocks density): the call was a ``dense_above="auto"`` fallback."""
        from sparseattn.integrations.layer_graphs import FastLane

        lg = self._layer_graphs
        if lg is None or lg.last is None or kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
            return
        buf, entry = lg.last
        pred = self.predictors[layer] if mode == "sparse" else None
        static = mode == "window" or isinstance(pred, PatternPredictor)
        density = dense_entry
        if static:
            density = self._density_raw[layer][-1]  # the fixed layout's entry, just recorded by _graphed
        lg.fast[layer] = FastLane(self._fast_check(query, key, value, kwargs), buf, entry, pred, density,
                                  getattr(entry.body, "accum", None), self.quant is not None,
                                  self._quant_label or "triton", auto, dense_entry is not None)

    def _fast_replay(self, lg: Any, fl: Any, module: torch.nn.Module, layer: int, query: torch.Tensor,
                     key: torch.Tensor, value: torch.Tensor, kwargs: dict[str, Any]) -> tuple[torch.Tensor, None] | None:
        """The fast lane: this layer's graph replayed when the call equals the remembered one, else None.

        Every condition under which the general path would not replay this very graph sends the call
        back to it: another shape/dtype/device/scale/window, softcap or sinks, training mode, an active
        :meth:`capture`, options that need the host (a ``dense_above`` density, ``keep_layouts``, graphs
        switched off), a replaced predictor, ``torch.compile`` tracing, a caller's own CUDA-graph capture, or a
        ``dense_above="auto"`` call that measures or falls back (its state says so; a plain call is counted there).
        """
        if (_compiling() or module.training or self.capture_layers is not None or isinstance(self.dense_above, float)
                or self.keep_layouts or self.layer_graph_off is not None
                or (fl.pred is not None and self.predictors.get(layer) is not fl.pred)
                or self._fast_check(query, key, value, kwargs) != fl.check or torch.cuda.is_current_stream_capturing()
                or (fl.auto is not None and not fl.auto.fast(fl.dense))):
            return None
        t0 = time.perf_counter()
        out, _ = lg.replay(fl.buf, fl.entry, query, key, value)
        self.timings[layer] = self.timings.get(layer, 0.0) + time.perf_counter() - t0
        if fl.dense:  # a dense_above="auto" fallback: dense SDPA replayed, accounted as every block
            self.counts["prefill_dense"] += 1
            self._account_all_blocks(layer, query, fl.density)
            return out, None
        self.counts["prefill_sparse"] += 1
        if fl.quant:
            self.counts["prefill_quant"] += 1
        if fl.accum is not None:
            self._count_graph_call(layer, fl.accum)
        else:
            self._density_raw.setdefault(layer, []).append(fl.density)
        self.backends_used.setdefault(layer, set()).add(fl.backend)
        return out, None
