"""The patched model's state and per-call hot path: :class:`PatchHandle`.

Every attention call of a patched layer lands in :meth:`PatchHandle._forward`: the fast lane (a layer
graph replayed when the call equals the last graphed one), mask checks, the route (backend decided once
per shape, cached in ``_ROUTES``), the layer-graph path (:mod:`sparseattn.integrations.layer_graphs`), the
packed-sequence path, the ``torch.compile`` path (custom ops) and device-side accounting. Built by
:func:`sparseattn.integrations.transformers_patch.patch_model`.
"""

from __future__ import annotations

import contextlib
import sys
import time
import warnings
from collections.abc import Iterable, Iterator
from typing import Any, Callable

import torch

from sparseattn._validation import fail
from sparseattn.integrations._tracing import _compiling
from sparseattn.integrations.hf_attention import _HANDLE_ATTR, _LAYER_ATTR
from sparseattn.integrations.layer_graphs import DensityAccumulator
from sparseattn.integrations.masks import (_causal_equivalent, _causal_match, _packed_documents, _packed_match,
                                           _window_mask, document_sink_blocks)
from sparseattn.layout.block_layout import BlockLayout
from sparseattn.ops.masked_sdpa import masked_sdpa_attention
from sparseattn.predictors.pattern import PatternPredictor

__all__ = ["PatchHandle"]


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
    from sparseattn._cache import BoundedCache

    return BoundedCache(32, name="integrations.window_bands")


_BANDS = _bands_cache()  # exact sliding-window band layouts, per (B, H, N_q, N_kv, window, block, device)


def _small_cache(name: str, size: int) -> Any:
    from sparseattn._cache import BoundedCache

    return BoundedCache(size, name=name)


# shared by every handle (a benchmark patches and unpatches per round): the backend chosen per shape, and
# the density of static layouts (held with the layout, so an id is never reused while cached)
_ROUTES = _small_cache("integrations.routes", 256)
_STATIC_DENSITY = _small_cache("integrations.static_density", 64)


# --------------------------------------------------------------------------- predictors
def _pv_for(pred: Any, layer: int) -> float | None:
    """The attention call's ``pv_threshold`` for ``layer``: ``pred.pv_threshold_for(layer)`` when the
    predictor has it (tuned predictors), else its config's ``pv_threshold``."""
    per_layer = getattr(pred, "pv_threshold_for", None)
    if per_layer is not None:
        return per_layer(layer)
    return getattr(getattr(pred, "config", None), "pv_threshold", None)


def _as_density(entry: Any) -> torch.Tensor:
    """A density entry of :meth:`PatchHandle._density` (or a layer graph's accumulator) as the per-head
    float64 ``[H]`` density."""
    if isinstance(entry, torch.Tensor):
        return entry
    if isinstance(entry, DensityAccumulator):  # a layer graph's device-side sum: the mean over its calls
        return entry.density()
    counts, avail = entry
    return counts.mean(0, dtype=torch.float64) / avail

# --------------------------------------------------------------------------- the handle
class PatchHandle:
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
            ``decode_kernel``, ``decode_sparse`` and ``decode_window`` (a sliding-window layer's exact dense
            decode on sparseattn's kernel) layer calls.
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
            (``None``: never); ``dense_fallbacks`` counts those calls per layer.
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
        self.dense_above: float | None = None
        self.dense_fallbacks: dict[int, int] = {}
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
                       "decode_sparse": 0, "decode_window": 0,
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
        #: the tuned file the default predictor comes from (``"in-memory"`` for a TunedConfig), else None
        self.tuned: str | None = None
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

    def reset_stats(self) -> None:
        """Forget recorded densities, timings, counters, layouts and captures."""
        for items in self._density_raw.values():
            for item in items:
                if isinstance(item, DensityAccumulator):  # a layer graph's device-side density sum
                    item.reset()
        self._density_raw.clear()
        self.backends_used.clear()
        self.timings.clear()
        self.dense_fallbacks.clear()
        self.layouts.clear()
        self.captured.clear()
        self.counts = {k: 0 for k in self.counts}
        self.decode_fallbacks.clear()
        self.decode_backends.clear()
        self.decode_stats.clear()

    # ---------------------------------------------------------------- capture
    def capture(self, layers: Iterable[int] | None = None, *, device: str | torch.device | None = "cpu") -> "_Capture":
        """Context manager recording post-RoPE q/k/v of ``layers`` (all when None) on prefill calls."""
        return _Capture(self, layers, device)

    # ---------------------------------------------------------------- reporting
    def sparsity_report(self) -> dict[str, Any]:
        """Per-layer mode, mean density / sparsity and per-head density actually used (JSON-friendly)."""
        layers: dict[str, Any] = {}
        dens_lists = self.densities
        for idx, _ in self._layers:
            mode = self.layer_modes[idx]
            entry: dict[str, Any] = {"mode": mode}
            if dens_lists.get(idx):
                per_head = torch.stack(dens_lists[idx]).mean(0).cpu()  # the one host read, at report time
                entry["density"] = float(per_head.mean())
                entry["sparsity"] = 1.0 - entry["density"]
                entry["density_per_head"] = [round(float(x), 6) for x in per_head]
                entry["backends"] = sorted(self.backends_used.get(idx, ()))
            elif mode == "dense":
                entry["density"] = 1.0
                entry["sparsity"] = 0.0
            else:
                entry["density"] = None
                entry["sparsity"] = None
            if idx in self.timings:
                entry["seconds"] = self.timings[idx]
            if self.dense_fallbacks.get(idx):
                entry["dense_fallbacks"] = self.dense_fallbacks[idx]
            if idx in self.layer_graph_status:
                entry["layer_graph"] = self.layer_graph_status[idx]
            layers[str(idx)] = entry
        dens = [e["density"] for e in layers.values() if e["density"] is not None]
        extra = {} if self.tuned is None else {"tuned": self.tuned}
        extra["quant"] = None if self.quant is None else {"mode": self.quant, "granularity": self.quant_granularity}
        lg = self._layer_graphs
        if lg is not None:  # replays without input copies ("direct") and through the static buffers ("copy")
            extra["layer_graphs"] = {"replays": lg.replays, **lg.stats,
                                     **({"direct_error": lg.direct_error} if lg.direct_error else {})}
        return {
            "layers": layers,
            "mean_density": (sum(dens) / len(dens)) if dens else None,
            "mean_sparsity": (1.0 - sum(dens) / len(dens)) if dens else None,
            "counts": dict(self.counts),
            "backend": self.backend,
            "attn_implementation": self.impl_name,
            "original_attn_implementation": self.orig_impl,
            "decode": self._decode_report(),
            **extra,
        }

    def _decode_report(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": "dense"} if self.decode_route is None else self.decode_route.describe()
        out["fallbacks"] = dict(self.decode_fallbacks)
        out["backends"] = {str(k): sorted(v) for k, v in sorted(self.decode_backends.items())}
        out.update(self.decode_stats)
        return out

    # ---------------------------------------------------------------- the attention call
    def _mask_ok(self, mask: torch.Tensor, nq: int, nkv: int, window: int | None) -> bool:
        """Whether ``mask`` is plain causal (+ window); one host read per mask object, cached for the forward."""
        if _compiling():
            # dynamo cannot read the mask without breaking the graph (transformers materialises one while tracing,
            # e.g. for its packed-sequence check): assert on the device instead. A mask that is not plain causal
            # (+ window) stops the run with a device-side assertion, never a wrong answer.
            torch._assert_async(_causal_match(mask, nq, nkv, window),
                                "patch_model: the attention mask of a compiled sparse layer is not plain causal (padding "
                                "or a custom mask); sparse prefill supports unpadded causal inputs only")
            return True
        key = (id(mask), mask.data_ptr(), mask._version, tuple(mask.shape), nq, nkv, window)
        verdict = self._mask_verdicts.get(key)
        if verdict is None:
            if mask.is_cuda and torch.cuda.is_current_stream_capturing():
                # a capture cannot read the mask (transformers materialises one while capturing, e.g. for its
                # packed-sequence check): the graph asserts on the device, once per mask object and forward, and
                # every replay re-checks it; a mask that is not plain causal (+ window) stops the run
                torch._assert_async(_causal_match(mask, nq, nkv, window),
                                    "patch_model: the attention mask of a captured sparse layer is not plain causal "
                                    "(padding or a custom mask); sparse prefill supports unpadded causal inputs only")
                verdict = True
            else:
                verdict = _causal_equivalent(mask, nq, nkv, window)
            self._mask_verdicts[key] = verdict
            self._mask_refs.append(mask)  # keeps the object alive, so its id is not reused within the forward
        return verdict

    def _packed(self, mask: torch.Tensor, position_ids: Any, B: int, nq: int, nkv: int,
                window: int | None) -> torch.Tensor | None:
        """Document ids when ``mask`` is exactly the packed-sequence mask of ``position_ids``, else None.

        One host read per mask object and forward (cached with the causal verdicts); inside a capture or
        ``torch.compile`` a device-side assertion instead, as for plain causal masks.
        """
        # the document ids of a forward's position_ids: computed once and shared by its layers (the per-forward dict)
        pkey = None
        if isinstance(position_ids, torch.Tensor) and not _compiling():
            pkey = ("docs", id(position_ids), position_ids.data_ptr(), position_ids._version, B, nq, nkv)
        docs = self._mask_verdicts.get(pkey) if pkey is not None else None
        if docs is None:
            docs = _packed_documents(position_ids, B, nq, nkv)
            if docs is None:
                return None
            if pkey is not None:
                self._mask_verdicts[pkey] = docs
                self._mask_refs.append(position_ids)
        if _compiling() or (mask.is_cuda and torch.cuda.is_current_stream_capturing()):
            torch._assert_async(_packed_match(mask, docs, window),
                                "patch_model: the attention mask of a sparse layer is neither plain causal nor the "
                                "packed-sequence mask of position_ids; sparse prefill supports neither padding nor "
                                "custom masks")
            return docs
        key = ("packed", id(mask), mask.data_ptr(), mask._version, tuple(mask.shape), id(position_ids),
               position_ids.data_ptr(), position_ids._version, window)
        verdict = self._mask_verdicts.get(key)
        if verdict is None:
            verdict = bool(_packed_match(mask, docs, window))  # the one host read
            self._mask_verdicts[key] = verdict
            self._mask_refs.extend((mask, position_ids))
        return docs if verdict else None

    def _packed_call(self, layer: int, mode: str, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     kwargs: dict[str, Any], win: int | None, docs: torch.Tensor) -> tuple[torch.Tensor, None]:
        """Sparse prefill of packed sequences: the layer's layout intersected with the exact document mask."""
        from sparseattn.ops.attention import attention

        fn = "patch_model"
        if self.quant is not None:
            raise NotImplementedError(str(fail(fn, f"quant={self.quant!r}", "cannot run packed sequences (the quantized "
                                               "kernel has no document masks)", "quant=None", "packed position_ids")))
        t0 = time.perf_counter()
        B, H, nq, D = query.shape
        if mode == "window":
            layout, pv, static = None, None, True
        else:
            pred = self.predictors[layer]
            layout = document_sink_blocks(self._layout(layer, query, key), docs)  # each document keeps its sink
            pv = _pv_for(pred, layer)
            static = isinstance(pred, PatternPredictor) and not self.per_head.get(layer)
        if pv is not None:
            raise NotImplementedError(f"{fn}: layer {layer} has pv_threshold={pv}, which packed sequences (document "
                                      "masks) do not support; patch without pv_threshold")
        backend = {"triton": "triton", "reference": "reference"}.get(self.backend, "auto")
        out = attention(query, key, value, causal=True, layout=layout, scale=kwargs.get("scaling"), backend=backend,
                        sliding_window=win, document_ids=docs).out.transpose(1, 2)
        density = self._density(layout, static, win) if layout is not None else None
        self.timings[layer] = self.timings.get(layer, 0.0) + time.perf_counter() - t0
        self.counts["prefill_sparse"] += 1
        self.counts["prefill_packed"] += 1
        if density is not None:
            self._density_raw.setdefault(layer, []).append(density)
        self.backends_used.setdefault(layer, set()).add("packed:" + ("triton" if query.is_cuda else "reference"))
        return out.contiguous(), None

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

        if _compiling():
            return self._forward_traced(layer, query, key, value, kwargs, mode, win)
        t0 = time.perf_counter()
        scale = kwargs.get("scaling")
        B, H, _, D = query.shape
        if query.is_cuda:
            res = self._graphed(module, layer, mode, query, key, value, scale, win, t0)
            if res is not None:
                if attention_mask is None:
                    self._remember_fast(layer, mode, query, key, value, kwargs)
                return res
        if mode == "window":
            layout, pv, static = self._band(B, H, nq, nkv, win, query), None, True
        else:
            pred = self.predictors[layer]
            layout = self._layout(layer, query, key)
            pv = _pv_for(pred, layer)
            static = isinstance(pred, PatternPredictor) and not self.per_head.get(layer)
        density = self._density(layout, static, win)  # this call's accounting entry, computed once
        if self.dense_above is not None and mode == "sparse" and self._too_dense(layout, static, density):
            self.dense_fallbacks[layer] = self.dense_fallbacks.get(layer, 0) + 1
            self.timings[layer] = self.timings.get(layer, 0.0) + time.perf_counter() - t0
            ones = _STATIC_DENSITY.get_or_build(("ones", H, str(query.device)),
                                                lambda: (None, torch.ones(H, dtype=torch.float64, device=query.device)))
            self._density_raw.setdefault(layer, []).append(ones[1])  # the layer ran every block
            return self._dense_call(module, query, key, value, attention_mask, kwargs, None, "prefill_dense")
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

    def _graph_reason(self, layer: int, mode: str, query: torch.Tensor) -> str | None:
        """Why this sparse CUDA call cannot be replayed from a layer graph (None: it can)."""
        if self.layer_graph_off is not None:
            return self.layer_graph_off
        if torch.cuda.is_current_stream_capturing():
            return "inside the caller's own CUDA graph capture"
        if self.dense_above is not None:
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
                 value: torch.Tensor, scale: Any, win: int | None, t0: float) -> tuple[torch.Tensor, None] | None:
        """The layer's sparse call replayed from a CUDA graph (see :mod:`.layer_graphs`), or None to run it eagerly.

        A key is graphed from its second call on: the first runs eagerly and settles the backend route
        (validation, backend choice); only the Triton route is graphed.
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
            if self.layer_graph_status.get(layer) != why:
                self.layer_graph_status[layer] = why
                optional = why.startswith(("dense_above", "keep_layouts", "per-head", "SketchWalk"))
                if optional and not self._graph_warned:
                    self._graph_warned = True
                    warnings.warn(f"patch_model: layer {layer} runs without a CUDA graph ({why}); each sparse layer "
                                  "then pays its host work per call", UserWarning, stacklevel=5)
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
        if self._layer_graphs is None:
            from sparseattn.integrations.layer_graphs import LayerGraphs

            self._layer_graphs = LayerGraphs()
        gkey = (layer, mode, win, id(pred), scale, pv, self._quant_label)
        res = self._layer_graphs.run(gkey, query, key, value, body, f"layer {layer}")
        if res is None:
            self.layer_graph_status[layer] = "capture failed (see the warning)"
            return None
        out, _ = res
        self.layer_graph_status[layer] = "graphed"
        self.timings[layer] = self.timings.get(layer, 0.0) + time.perf_counter() - t0
        self.counts["prefill_sparse"] += 1
        if quant is not None:
            self.counts["prefill_quant"] += 1
        used = getattr(self._layer_graphs.last[1].body, "accum", None)  # the accumulator of the graph that ran
        if used is not None:
            self._count_graph_call(layer, used)
        else:
            self._density_raw.setdefault(layer, []).append(self._density(fixed, True, win))
        self.backends_used.setdefault(layer, set()).add(self._quant_label or "triton")
        return out, None

    def _fast_check(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    kwargs: dict[str, Any]) -> tuple[Any, ...]:
        """What a fast-lane call must equal: shapes, dtypes, device and the keyword arguments the route depends on."""
        return (query.shape, key.shape, value.shape, query.dtype, key.dtype, value.dtype, query.device,
                kwargs.get("scaling"), kwargs.get("sliding_window"), kwargs.get("softcap"), kwargs.get("s_aux"))

    def _remember_fast(self, layer: int, mode: str, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       kwargs: dict[str, Any]) -> None:
        """Keep this graphed call as the layer's fast lane (see :class:`~.layer_graphs.FastLane`)."""
        from sparseattn.integrations.layer_graphs import FastLane

        lg = self._layer_graphs
        if lg is None or lg.last is None or kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
            return
        buf, entry = lg.last
        pred = self.predictors[layer] if mode == "sparse" else None
        static = mode == "window" or isinstance(pred, PatternPredictor)
        density = None
        if static:
            density = self._density_raw[layer][-1]  # the fixed layout's entry, just recorded by _graphed
        lg.fast[layer] = FastLane(self._fast_check(query, key, value, kwargs), buf, entry, pred, density,
                                  getattr(entry.body, "accum", None), self.quant is not None,
                                  self._quant_label or "triton")

    def _fast_replay(self, lg: Any, fl: Any, module: torch.nn.Module, layer: int, query: torch.Tensor,
                     key: torch.Tensor, value: torch.Tensor, kwargs: dict[str, Any]) -> tuple[torch.Tensor, None] | None:
        """The fast lane: this layer's graph replayed when the call equals the remembered one, else None.

        Every condition under which the general path would not replay this very graph sends the call
        back to it: another shape/dtype/device/scale/window, softcap or sinks, training mode, an active
        :meth:`capture`, options that need the host (``dense_above``, ``keep_layouts``, graphs switched
        off), a replaced predictor, ``torch.compile`` tracing or a caller's own CUDA-graph capture.
        """
        if (_compiling() or module.training or self.capture_layers is not None or self.dense_above is not None
                or self.keep_layouts or self.layer_graph_off is not None
                or (fl.pred is not None and self.predictors.get(layer) is not fl.pred)
                or self._fast_check(query, key, value, kwargs) != fl.check or torch.cuda.is_current_stream_capturing()):
            return None
        t0 = time.perf_counter()
        out, _ = lg.replay(fl.buf, fl.entry, query, key, value)
        self.timings[layer] = self.timings.get(layer, 0.0) + time.perf_counter() - t0
        self.counts["prefill_sparse"] += 1
        if fl.quant:
            self.counts["prefill_quant"] += 1
        if fl.accum is not None:
            self._count_graph_call(layer, fl.accum)
        else:
            self._density_raw.setdefault(layer, []).append(fl.density)
        self.backends_used.setdefault(layer, set()).add(fl.backend)
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

    def _too_dense(self, layout: BlockLayout, static: bool, density: Any) -> bool:
        """Whether ``density`` (this call's entry) is above ``dense_above`` (a host read; cached for static layouts)."""
        key = ("too_dense", id(layout), self.dense_above)
        if static:
            hit = _STATIC_DENSITY.get(key)
            if hit is not None and hit[0] is layout:
                return hit[1]
        if layout.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("patch_model: dense_above reads each predicted layer's density on the host, which a CUDA "
                               "graph capture cannot do; capture with dense_above=None (or a static pattern)")
        verdict = bool(_as_density(density).mean() > self.dense_above)  # the one host read of this call
        if static:
            _STATIC_DENSITY.put(key, (layout, verdict))
        return verdict

    @property
    def densities(self) -> dict[int, list[torch.Tensor]]:
        """``{layer: [float64 tensor[H] per prefill call]}``: block density actually used per head (on the device)."""
        out: dict[int, list[torch.Tensor]] = {}
        for layer, items in self._density_raw.items():
            dens: list[torch.Tensor] = []
            for x in items:  # a layer graph's accumulator stands for its calls: each gets their mean density
                dens.extend([_as_density(x)] * x.calls if isinstance(x, DensityAccumulator) else [_as_density(x)])
            out[layer] = dens
        return out

    def _count_graph_call(self, layer: int, accum: Any) -> None:
        """Account one graphed call of a predicted layer: its counts are already in ``accum`` (on the device)."""
        if accum.calls == 0:  # first call since the accumulator was created or reset: it joins the layer's entries
            self._density_raw.setdefault(layer, []).append(accum)
        accum.calls += 1

    def _density(self, layout: BlockLayout, static: bool, window: int | None) -> Any:
        """This call's density entry: a cached ``[H]`` tensor (static layouts) or raw counts (one reduction)."""
        def raw() -> tuple[torch.Tensor, int]:
            return layout.selected_in_region(causal=True), max(layout.available_blocks(causal=True), 1)

        if not static:
            return raw()
        key = (id(layout), layout.seqlen_q, layout.seqlen_kv, window)
        hit = _STATIC_DENSITY.get(key)
        if hit is None or hit[0] is not layout:
            hit = (layout, _as_density(raw()))
            _STATIC_DENSITY.put(key, hit)
        return hit[1]

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

