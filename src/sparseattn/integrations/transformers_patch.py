"""Run a transformers model's prefill attention through sparseattn.

:func:`patch_model` registers an attention function with transformers' ``AttentionInterface``
(name ``"sparseattn"``, or ``"sparseattn_eager"`` for models loaded with eager attention) and
switches the model to it. Every attention layer then calls back into its :class:`PatchHandle`:

* **prefill** (``N_q == N_kv``, no padding): the layer's predictor picks a
  :class:`~sparseattn.layout.BlockLayout` from the post-RoPE ``q`` and the unexpanded GQA ``k``,
  and :func:`sparseattn.attention` (or the exact CPU path, see ``backend``) computes causal
  block-sparse attention;
* **decode / chunked prefill** (``N_q < N_kv`` with a KV cache): by default the model's own dense
  attention, so ``generate`` is exact given the prefill; with ``decode="kernel"`` / ``"sparse"``
  steps of 1..64 new tokens run sparseattn's dense / Quest-style sparse decode kernels
  (:mod:`sparseattn.integrations.decode_route`);
* **dense layers** (``dense_layers``, ``per_layer={i: "dense"}``): the model's own attention;
* **sliding-window layers** (Gemma-2/3, Qwen2 with ``use_sliding_window``, Mistral): exact
  windowed attention on sparseattn's path (reported as ``"window"``): on CUDA the Triton kernel over
  the band of key blocks the window touches, with the token-level window applied in the boundary
  blocks, so such a layer costs the band and not the whole causal square; on CPU the exact masked
  SDPA restricted to the band. The window is the model's (``kv > q - sliding_window``).

Masks: the model's mask builder is transformers' ``sdpa_mask`` with one change, made only for a
prefill with no cache (``q_offset == 0``, ``N_q == N_kv``) whose mask transformers allows to be
skipped (plain causal or sliding-window causal): with no padding mask it returns ``None``, and a
sliding-window mask is skipped too when no token is padded, since this module applies the causal
mask and the window itself (see :func:`_prefill_mask`). A mask that is still given (padding, packed
sequences, custom masks) is compared with the plain causal (+ window) mask once per mask object and
forward (one host read; inside a CUDA graph capture or under ``torch.compile``, where nothing can be
read, a device-side assertion in the graph); a sparse layer refuses anything else with a ``ValueError``,
a window or dense layer hands it to the model's own attention, which applies it exactly.

The hot path (per layer and prefill) does no host synchronisation: static layouts and routing are
cached per shape, accounting stays on the device, and on CUDA the kernel writes its output straight
into the ``(B, N, H, D)`` tensor transformers expects (no transpose copy).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping
from typing import Any, Callable

import torch

from sparseattn._validation import check_nonneg_int, fail
# the module's parts live by job in sparseattn.integrations.{hf_attention, masks, handle, _tracing} and
# sparseattn.ops.masked_sdpa; their names are re-exported here for existing imports
from sparseattn.integrations import hf_attention as _hf_attention
from sparseattn.integrations._tracing import _compiling
from sparseattn.integrations.decode_route import DecodeRoute, make_decode_config
from sparseattn.integrations.accounting import _STATIC_DENSITY, _as_density
from sparseattn.integrations.handle import PatchHandle, _Capture
from sparseattn.integrations.routes import (_BANDS, _QUANT_EXPECTED, _ROUTES, _bands_cache, _choose_route, _pv_for,
                                            _quant_refused, _route_key, _small_cache)
from sparseattn.integrations.hf_attention import (ATTN_NAME, ATTN_NAME_EAGER, _HANDLE_ATTR,
                                                  _LAYER_ATTR, _attention_forward, _is_sliding_window, _prefill_mask,
                                                  register_attention)
from sparseattn.integrations.masks import (_causal_equivalent, _causal_match, _packed_documents,
                                           _packed_match, _window_mask)
from sparseattn.models.layers import attention_layers
from sparseattn.ops.masked_sdpa import masked_sdpa_attention
# the static pattern predictor and the one predictor-spec resolver live in sparseattn.predictors;
# re-exported here for existing imports
from sparseattn.predictors.pattern import PatternConfig, PatternPredictor, pattern_predictor
from sparseattn.predictors.resolve import describe_predictor, resolve_predictor, tuned_predictor
from sparseattn.predictors.tail import DenseTailPredictor

__all__ = ["ATTN_NAME", "ATTN_NAME_EAGER", "PatchHandle", "PatternConfig", "PatternPredictor", "patch_model",
           "unpatch_model", "get_handle", "attention_layers", "resolve_predictor", "register_attention",
           "tuned_predictor", "pattern_predictor", "describe_predictor"]


# names that moved to the modules above, kept importable from here (tests, benchmarks and users import them)
_MOVED = (_compiling, _BANDS, _QUANT_EXPECTED, _ROUTES, _STATIC_DENSITY, _as_density, _bands_cache, _Capture,
          _choose_route, _route_key, _small_cache, _attention_forward, _is_sliding_window, _prefill_mask,
          _causal_equivalent, _causal_match, _packed_documents, _packed_match, _window_mask, masked_sdpa_attention)


def __getattr__(name: str) -> Any:
    """Module state that lives in :mod:`.hf_attention` (read there, so the value is never a stale copy)."""
    if name == "_REGISTERED":
        return _hf_attention._REGISTERED
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _integration_backends() -> tuple[str, ...]:
    """``patch_model(backend=...)`` names: ``"auto"``, the registry's prefill operators listed for the
    ``"integration"`` entry point (masked-SDPA, reference, Triton), and ``"attention"`` (the attention dispatcher)."""
    from sparseattn.ops.registry import operators

    names = {op.name for op in operators("prefill", entry_point="integration")}
    return ("auto", *sorted(names), "attention")


# --------------------------------------------------------------------------- helpers
def _is_compiled(model: torch.nn.Module) -> bool:
    if hasattr(model, "_orig_mod"):
        return True
    return getattr(model, "_compiled_call_impl", None) is not None


def get_handle(model: torch.nn.Module) -> "PatchHandle | None":
    """The active :class:`PatchHandle` of a patched model, else ``None``."""
    return getattr(model, _HANDLE_ATTR, None)


def _check_quant(model: torch.nn.Module, layers: list[tuple[int, torch.nn.Module]], predictors: dict[int, Any],
                 modes: dict[int, str], quant: Any, granularity: Any, backend: str, dense_above: Any) -> None:
    """Refuse, at patch time, every ``quant`` combination the quantized route cannot run (no silent fallback)."""
    from sparseattn.ops.quant import GRANULARITIES, QUANT_MODES, quant_choice

    fn = "patch_model"
    if quant is not None and quant not in QUANT_MODES:
        raise fail(fn, "quant", "is unknown", f"None or one of {list(QUANT_MODES)}", repr(quant))
    if granularity not in GRANULARITIES:
        raise fail(fn, "quant_granularity", "is unknown", f"one of {list(GRANULARITIES)}", repr(granularity))
    if quant is None:
        return
    if backend not in ("auto", "triton"):
        raise fail(fn, "backend", f"cannot run quant={quant!r} (the quantized kernel is its own route)",
                   "'auto' or 'triton'", repr(backend))
    if dense_above is not None:
        raise fail(fn, "dense_above", f"cannot be combined with quant={quant!r} (its fallback runs the model's "
                   "unquantized attention)", "None", repr(dense_above))
    window = sorted(i for i, m in modes.items() if m == "window")
    if window:
        raise NotImplementedError(str(fail(
            fn, f"quant={quant!r}", f"cannot run sliding-window layers {window}: the quantized kernel has no window "
            "support", f"those layers in dense_layers (dense_layers={window}) or quant=None",
            f"{len(window)} window layer{'s' if len(window) > 1 else ''}")))
    for i, _ in layers:
        if modes[i] != "sparse":
            continue
        pv = _pv_for(predictors[i], i)
        if pv is not None:
            raise fail(fn, "predictor", f"of layer {i} sets pv_threshold={pv}, which the quantized kernel does not "
                       f"implement (quant={quant!r})", "a predictor without pv_threshold", f"pv_threshold={pv}")
    params = next(iter(model.parameters()), None)
    if params is None:
        return
    for i, mod in layers:
        if modes[i] != "sparse":
            continue
        D = getattr(mod, "head_dim", None)
        if not isinstance(D, int):
            cfg = mod.config
            D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        probe = torch.empty((1, 1, 1, int(D)), dtype=params.dtype, device=params.device)
        reason = quant_choice(probe, quant=quant, names=("quant_triton",))[1]
        if reason is not None:
            raise _quant_refused(f"layer {i} of this model", reason, quant, probe)


# --------------------------------------------------------------------------- patch / unpatch
def _dense_function(model: torch.nn.Module, orig_impl: str, layers: list[tuple[int, torch.nn.Module]]) -> Callable[..., Any]:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if orig_impl == "eager":
        mod = sys.modules[type(layers[0][1]).__module__]
        eager = getattr(mod, "eager_attention_forward", None)
        if eager is None:
            raise NotImplementedError(f"patch_model: {type(model).__name__} was loaded with eager attention but "
                                      f"{mod.__name__} has no eager_attention_forward; load it with attn_implementation='sdpa'")
        return eager
    if orig_impl in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[orig_impl]
    raise NotImplementedError(f"patch_model: the model's attention implementation {orig_impl!r} is not in transformers' "
                              "AttentionInterface; load it with attn_implementation='sdpa' or 'eager'")


def _head_key(key: Any) -> tuple[int, int]:
    if isinstance(key, str) and key.count(".") == 1:
        a, b = key.split(".")
        if a.isdigit() and b.isdigit():
            return int(a), int(b)
    if isinstance(key, tuple) and len(key) == 2 and all(isinstance(x, int) for x in key):
        return key
    raise fail("patch_model", "per_head", "has a key that is not '<layer>.<head>'", "'3.5' or (3, 5)", repr(key))


def patch_model(
    model: torch.nn.Module,
    *,
    predictor: Any = None,
    pattern: str | Mapping[str, Any] | None = None,
    dense_layers: Iterable[int] = (),
    per_layer: Mapping[int, Any] | None = None,
    per_head: Mapping[Any, Any] | None = None,
    backend: str = "auto",
    keep_layouts: bool = False,
    dense_above: float | str | None = None,
    tuned: str | os.PathLike | Any = None,
    layer_graphs: bool | None = None,
    quant: str | None = None,
    quant_granularity: str = "per_warp",
    decode: str = "dense",
    decode_top_pages: int | float | None = None,
    decode_page_size: int | None = None,
    decode_backend: str = "auto",
    decode_layers: Iterable[int] | None = None,
    dense_tail: int = 0,
) -> PatchHandle:
    """Route a transformers model's prefill attention through sparseattn.

    Args:
        model: a transformers model whose attention goes through ``AttentionInterface``
            (Llama, Qwen2, Mistral, Gemma-2/3, ...), loaded with ``sdpa`` or ``eager`` attention.
        predictor: the default predictor for every layer: a predictor object, a registered spec
            ``"name:key=value,..."`` or ``"pattern:name=<pattern>,..."``. With neither
            ``predictor`` nor ``pattern`` every layer stays dense (useful for :meth:`PatchHandle.capture`).
        pattern: shorthand for a static pattern predictor, ``"sink_window:sink_blocks=1,window_blocks=8"``
            or ``{"name": "sink_window", "window_blocks": 8}``. Mutually exclusive with ``predictor``.
        dense_layers: layer indices that keep the model's own dense attention.
        per_layer: ``{layer: predictor | spec | "dense"}`` overriding the default per layer.
        per_head: ``{"<layer>.<head>": predictor | spec | "dense"}``; that head's rows of the
            layer's layout come from this predictor (run on the head's q and its KV head's k).
        backend: ``"auto"`` (CUDA or ``pv_threshold`` → :func:`sparseattn.attention`; CPU otherwise →
            exact ``"masked_sdpa"``), ``"masked_sdpa"``, ``"attention"`` (sparseattn's own dispatch),
            ``"reference"`` or ``"triton"``.
        keep_layouts: keep the last prefill's layout per layer in ``handle.layouts`` (for plots).
        dense_above: a density in (0, 1]: a sparse layer whose predicted layout keeps more than this
            share of its causal blocks runs the model's own dense attention for that call (the
            crossover where the block-sparse kernel stops paying: measure it with ``sparseattn
            bench`` / ``bench-model``, see BENCHMARKS.md). Costs one host read per predicted layer and
            call (static patterns: once), so it cannot be used inside a CUDA graph capture. ``None``
            (default) never falls back. ``"auto"``: the crossover measured for the layer's shape on this GPU
            (``sparseattn/ops/tuned/crossover.json``, ``benchmarks/bench_crossover.py``), decided without a
            host sync from each layer's measured density, one call late, re-measured every 16 calls; works
            with layer graphs (:mod:`sparseattn.integrations.auto_dense`). Where no crossover was measured
            (another GPU, dtype or head_dim; the CPU) the layers stay sparse and a warning says why.
            ``handle.dense_fallbacks`` and the report count the fallbacks (``auto_dense`` per layer).
        tuned: a per-head tuned file written by ``sparseattn tune`` (path) or a
            :class:`~sparseattn.tuning.types.TunedConfig`: checked against the model (fingerprint and
            layer indices) and used as the default predictor (a
            :class:`~sparseattn.tuning.predictor.TunedMeanSimPredictor`, its per-layer ``pv_threshold``
            passed to the attention call); the file's ``dense_layers`` are added to ``dense_layers``.
            Mutually exclusive with ``predictor`` and ``pattern``. ``sparsity_report()`` then has
            ``"tuned"``: the file (or ``"in-memory"``).
        layer_graphs: replay each sparse layer's prediction + kernel from a CUDA graph in eager CUDA
            runs (one host launch instead of the predictor's and the kernel's; see
            :mod:`sparseattn.integrations.layer_graphs` for what is not graphed and why). ``None``
            (default): on unless the environment sets ``SPARSEATTN_LAYER_GRAPHS=0``; ``False``: off.
            ``handle.layer_graph_status`` says per layer ``"graphed"`` or the reason it is not.
        quant: ``None`` (default), ``"int8"`` or ``"int8_fp8"``: the sparse prefill layers run
            :func:`sparseattn.ops.quant.quantized_prefill` (INT8 Q·Kᵀ, P·V in the model dtype or FP8;
            quantization included in every call) with the predicted layout. There is no fallback to the
            bf16 kernel: what it cannot run is refused at patch time (backend other than ``"auto"`` /
            ``"triton"``, ``dense_above``, predictors with ``pv_threshold``, sliding-window layers, a
            CPU model without ``TRITON_INTERPRET=1``, float32, head_dim not 64/128/256, FP8 below sm_89)
            or at the first call of a shape (layout blocks not 64/128, a window announced at run time,
            ``torch.compile``). Dense layers and decode steps keep the model's own attention.
            ``handle.quant`` and ``sparsity_report()["quant"]`` record it; the layers' backend is
            ``"quant:<mode>:<granularity>"`` and ``handle.counts["prefill_quant"]`` counts the calls.
        quant_granularity: ``"per_warp"`` (default), ``"per_block"``, ``"per_thread"`` or ``"per_token"`` (docs/QUANT.md).
        decode: how decode steps (``1 <= N_q <= 64`` new tokens over a KV cache) run: ``"dense"`` (default:
            the model's own attention), ``"kernel"`` (:func:`sparseattn.ops.decode.decode_attention`) or
            ``"sparse"`` (:func:`sparseattn.ops.pages.sparse_decode_attention`, Quest-style pages; page
            summaries kept on the cache object, updated incrementally). Sliding-window layers get exact dense
            decode; masks other than plain causal (padding), softcapping and attention sinks go to the model's
            attention, counted in ``handle.decode_fallbacks``. See :mod:`sparseattn.integrations.decode_route`.
        decode_top_pages: sparse decode: pages kept per sequence and KV head, an int or a fraction of the
            sequence's pages (default 0.1); the first page and the pages of the new tokens are always kept.
        decode_page_size: sparse decode: keys per page (default 16).
        decode_backend: ``"auto"`` (the Triton decode kernels on CUDA, else the PyTorch reference),
            ``"triton"`` or ``"reference"``.
        decode_layers: layers that take the decode route (default: all); the others decode with the model's
            attention. Independent of ``dense_layers`` (which is about prefill).
        dense_tail: query tokens at the end of every prefill call that attend every causal block in every
            sparse layer, whatever the predictor chose (each layer's and head's predictor is wrapped in a
            :class:`~sparseattn.predictors.tail.DenseTailPredictor`). For prompts that end in a question:
            the first generated token and the keys/values the decode steps read last are then exact. Costs
            about ``dense_tail / seqlen`` of the causal blocks; counted in the sparsity report. ``0``
            (default): off. Window layers (exact bands) are not affected.

    Returns:
        A :class:`PatchHandle`; ``handle.unpatch()`` (or ``with patch_model(...)``) restores the model.

    Raises:
        RuntimeError: the model is already patched, or was compiled (patch before ``torch.compile``).
        ValueError: bad arguments; at run time, padded batches.
    """
    fn = "patch_model"
    if not isinstance(model, torch.nn.Module):
        raise fail(fn, "model", "must be a torch.nn.Module", "a transformers PreTrainedModel", type(model).__name__)
    if _is_compiled(model):
        raise RuntimeError(f"{fn}: the model was compiled with torch.compile; patch the uncompiled model first, "
                           "then compile the patched model (handle = patch_model(model, ...); model = torch.compile(model))")
    if get_handle(model) is not None:
        raise RuntimeError(f"{fn}: the model is already patched; call handle.unpatch() (or "
                           "sparseattn.integrations.unpatch_model(model)) before patching it again")
    if not hasattr(model, "set_attn_implementation") or not hasattr(model, "config"):
        raise fail(fn, "model", "is not a transformers PreTrainedModel", "a model with set_attn_implementation",
                   type(model).__name__)
    if backend not in _integration_backends():
        raise fail(fn, "backend", "is unknown", f"one of {list(_integration_backends())}", repr(backend))
    if predictor is not None and pattern is not None:
        raise fail(fn, "predictor/pattern", "are mutually exclusive", "one of them", "both")
    if tuned is not None and (predictor is not None or pattern is not None):
        given = "predictor" if predictor is not None else "pattern"
        raise fail(fn, "tuned", f"is mutually exclusive with {given}", "tuned alone (it is the predictor)",
                   f"tuned and {given}")
    layers = attention_layers(model)
    if not layers:
        raise fail(fn, "model", "has no attention modules with a layer_idx", "a transformers decoder model",
                   type(model).__name__)
    indices = {i for i, _ in layers}
    decode_cfg = make_decode_config(decode, decode_top_pages, decode_page_size, decode_backend, decode_layers, indices)
    dense_tail = check_nonneg_int(fn, "dense_tail", dense_tail)
    tuned_label = None
    if tuned is not None:
        default, tuned_cfg, tuned_label = tuned_predictor(tuned, model)
        dense_layers = sorted(set(dense_layers) | set(tuned_cfg.meta.get("dense_layers", ())))
    else:
        default = pattern_predictor(pattern) if pattern is not None else resolve_predictor(predictor)

    dense = set()
    for i in dense_layers:
        if isinstance(i, bool) or not isinstance(i, int) or i not in indices:
            raise fail(fn, "dense_layers", "has an unknown layer index", f"ints in [0, {max(indices)}]", repr(i))
        dense.add(i)
    predictors: dict[int, Any] = {i: (None if i in dense else default) for i in indices}
    for i, spec in (per_layer or {}).items():
        if isinstance(i, bool) or not isinstance(i, int) or i not in indices:
            raise fail(fn, "per_layer", "has an unknown layer index", f"ints in [0, {max(indices)}]", repr(i))
        predictors[i] = None if (isinstance(spec, str) and spec == "dense") else resolve_predictor(spec)
    heads: dict[int, dict[int, Any]] = {}
    for key, spec in (per_head or {}).items():
        li, hi = _head_key(key)
        mod = dict(layers).get(li)
        nh = getattr(mod.config, "num_attention_heads", None) if mod is not None else None
        if li not in indices or (nh is not None and not 0 <= hi < nh):
            raise fail(fn, "per_head", "names a layer or head the model does not have", f"layers 0..{max(indices)}",
                       repr(key))
        if predictors[li] is None:
            raise fail(fn, "per_head", f"sets head {li}.{hi} of a layer that is dense", "a sparse layer", repr(key))
        heads.setdefault(li, {})[hi] = None if (isinstance(spec, str) and spec == "dense") else resolve_predictor(spec)

    modes: dict[int, str] = {}
    for i, mod in layers:
        if getattr(mod, "sliding_window", None) is not None and predictors[i] is not None:
            modes[i] = "window"
        elif predictors[i] is None:
            modes[i] = "dense"
        else:
            modes[i] = "sparse"

    register_attention()
    orig = model.config._attn_implementation
    name = ATTN_NAME_EAGER if orig == "eager" else ATTN_NAME
    dense_fn = _dense_function(model, orig, layers)
    if dense_above is not None and dense_above != "auto" and (
            isinstance(dense_above, bool) or not isinstance(dense_above, (int, float))
            or not 0.0 < float(dense_above) <= 1.0):
        raise fail(fn, "dense_above", "must be a density in (0, 1], 'auto' or None", "e.g. 0.8 or 'auto'",
                   repr(dense_above))
    _check_quant(model, layers, predictors, modes, quant, quant_granularity, backend, dense_above)
    if dense_tail:  # one wrapper per predictor object, so layers sharing a predictor still share one
        wrapped: dict[int, Any] = {}

        def tail(p: Any) -> Any:
            if p is not None and id(p) not in wrapped:
                wrapped[id(p)] = DenseTailPredictor(p, dense_tail)
            return None if p is None else wrapped[id(p)]

        predictors = {i: (tail(p) if modes[i] == "sparse" else p) for i, p in predictors.items()}
        heads = {li: {hi: tail(p) for hi, p in hs.items()} for li, hs in heads.items()}
    handle = PatchHandle(model, layers, predictors, heads, modes, backend, orig, name, dense_fn, keep_layouts)
    handle.dense_above = dense_above if dense_above in (None, "auto") else float(dense_above)  # type: ignore[arg-type]
    if dense_above == "auto":
        handle._auto = {}
    handle.quant = quant
    handle.quant_granularity = quant_granularity if quant is not None else None
    handle.tuned = tuned_label
    handle.dense_tail = dense_tail
    if layer_graphs is not None and not isinstance(layer_graphs, bool):
        raise fail(fn, "layer_graphs", "must be a bool or None", "True, False or None", repr(layer_graphs))
    if layer_graphs is False:
        handle.layer_graph_off = "layer_graphs=False"
    elif os.environ.get("SPARSEATTN_LAYER_GRAPHS", "1") == "0":
        handle.layer_graph_off = "SPARSEATTN_LAYER_GRAPHS=0"
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        model.set_attn_implementation(orig)
        raise NotImplementedError(f"{fn}: {type(model).__name__} does not accept a custom attention implementation "
                                  "(it does not use transformers' AttentionInterface)")
    from sparseattn.ops.custom_ops import register_predictor_object

    for pred in predictors.values():  # callable from the compiled path's predictor op (unregistered on unpatch)
        if pred is not None:
            register_predictor_object(pred)
    for i, mod in layers:
        setattr(mod, _LAYER_ATTR, (handle, i))
    handle._hook = model.register_forward_pre_hook(handle._on_forward)
    if decode_cfg.mode != "dense":
        handle.decode_route = DecodeRoute(decode_cfg)
        handle._decode_hook = model.register_forward_pre_hook(handle.decode_route.on_forward, with_kwargs=True)
    setattr(model, _HANDLE_ATTR, handle)
    return handle


def unpatch_model(model: torch.nn.Module) -> None:
    """Undo :func:`patch_model` (no-op with a ``ValueError`` if the model is not patched)."""
    handle = get_handle(model)
    if handle is None:
        raise fail("unpatch_model", "model", "is not patched", "a model returned patched by patch_model", "no handle")
    handle.unpatch()
