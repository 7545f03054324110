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

import contextlib
import os
import sys
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Callable

import torch

from sparseattn._validation import fail
from sparseattn.layout.block_layout import BlockLayout
from sparseattn.models.layers import attention_layers
# the static pattern predictor and the one predictor-spec resolver live in sparseattn.predictors;
# re-exported here for existing imports
from sparseattn.predictors.pattern import PatternConfig, PatternPredictor, pattern_predictor
from sparseattn.predictors.resolve import describe_predictor, resolve_predictor, tuned_predictor

__all__ = ["ATTN_NAME", "ATTN_NAME_EAGER", "PatchHandle", "PatternConfig", "PatternPredictor", "patch_model",
           "unpatch_model", "get_handle", "attention_layers", "resolve_predictor", "register_attention",
           "tuned_predictor", "pattern_predictor", "describe_predictor"]

ATTN_NAME = "sparseattn"
ATTN_NAME_EAGER = "sparseattn_eager"
_HANDLE_ATTR = "_sparseattn_handle"
_LAYER_ATTR = "_sparseattn_layer"


def _integration_backends() -> tuple[str, ...]:
    """``patch_model(backend=...)`` names: ``"auto"``, the registry's prefill operators listed for the
    ``"integration"`` entry point (masked-SDPA, reference, Triton), and ``"attention"`` (the attention dispatcher)."""
    from sparseattn.ops.registry import operators

    names = {op.name for op in operators("prefill", entry_point="integration")}
    return ("auto", *sorted(names), "attention")


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


# --------------------------------------------------------------------------- registration
def _attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    state = getattr(module, _LAYER_ATTR, None)
    if state is None:
        raise RuntimeError(f"sparseattn: the model's attention implementation is {ATTN_NAME!r} but the layer "
                           f"{type(module).__name__} was not patched by sparseattn.integrations.patch_model; "
                           "patch the model with patch_model(model, ...) instead of setting attn_implementation by hand")
    handle, layer = state
    return handle._forward(module, layer, query, key, value, attention_mask, kwargs)


_REGISTERED = False


def register_attention() -> None:
    """Register ``"sparseattn"`` / ``"sparseattn_eager"`` with transformers (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask, sdpa_mask

    AttentionInterface.register(ATTN_NAME, _attention_forward)
    AttentionInterface.register(ATTN_NAME_EAGER, _attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_NAME, _prefill_mask(sdpa_mask))
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_NAME_EAGER, eager_mask)
    _REGISTERED = True


def _is_sliding_window(mask_function: Any, local: int) -> bool:
    """Whether a causal mask function with ``local_size=local`` is a sliding window of ``local`` keys.

    Probed at three index pairs that tell a window (``kv > q - local``) from chunked attention (same
    chunk of ``local`` tokens, Llama 4): at ``q = local`` the key ``local - 1`` is inside a window but in
    the previous chunk. Anything the probe cannot evaluate counts as "not a window" (its mask is kept).
    """
    if mask_function is None or not isinstance(local, int) or local < 2:
        return False
    def at(q: int, kv: int) -> bool:
        t = torch.tensor  # index-based mask functions take tensors (transformers' and_masks needs them)
        return bool(mask_function(t(0), t(0), t(q), t(kv)))

    try:
        return at(local, local - 1) and not at(local, 0) and at(local - 1, 0)
    except Exception:  # noqa: BLE001 - a mask function that needs tensors: keep its mask
        return False


def _prefill_mask(sdpa_mask: Callable[..., Any]) -> Callable[..., Any]:
    """transformers' ``sdpa_mask``, except that a cache-free prefill may skip a sliding-window mask too.

    transformers only calls the mask builder with ``allow_is_causal_skip=True`` for the plain causal
    or sliding-window-causal mask (any extra mask function, packing or blockwise overlay turns it
    off). ``sdpa_mask`` then returns ``None`` when no token is padded, except for a window shorter
    than the sequence (``local_size``): SDPA would need the mask; and except while tracing or
    capturing a CUDA graph, when it materialises the mask. Our attention applies the causal mask and
    the window itself (from the layer's ``sliding_window`` argument), so for a prefill with no cache
    and no padding mask this returns ``None`` (no ``N × N`` mask, nothing to read back), and with a
    padding mask it lets ``sdpa_mask`` skip the mask when no token is padded. Everything else is passed
    through unchanged (decode steps and chunked prefill keep their materialised masks).
    """

    def mask(*args: Any, **kwargs: Any) -> Any:
        if (not args and kwargs.get("allow_is_causal_skip", True)
                and isinstance(kwargs.get("q_offset", 0), int) and kwargs.get("q_offset", 0) == 0
                and kwargs.get("q_length") == kwargs.get("kv_length")):
            local = kwargs.get("local_size")
            if local is not None and not _is_sliding_window(kwargs.get("mask_function"), local):
                return sdpa_mask(*args, **kwargs)  # chunked attention (Llama 4) or another local pattern: as is
            if kwargs.get("attention_mask") is None:
                # no padding mask at all: plain causal (+ the layer's window), whatever transformers would
                # decide while tracing or capturing a CUDA graph (where it materialises the mask)
                return None
            if local is not None:
                kwargs = dict(kwargs, local_size=None)
        return sdpa_mask(*args, **kwargs)

    return mask


# --------------------------------------------------------------------------- helpers
def _is_compiled(model: torch.nn.Module) -> bool:
    if hasattr(model, "_orig_mod"):
        return True
    return getattr(model, "_compiled_call_impl", None) is not None


def get_handle(model: torch.nn.Module) -> "PatchHandle | None":
    """The active :class:`PatchHandle` of a patched model, else ``None``."""
    return getattr(model, _HANDLE_ATTR, None)


def _causal_equivalent(mask: torch.Tensor, nq: int, nkv: int, window: int | None = None) -> bool:
    """Whether ``mask`` (bool, or float with 0 = attend) is the plain causal mask (+ the sliding window)."""
    return bool(_causal_match(mask, nq, nkv, window))  # the one host read, once per mask object and forward (cached)


def _causal_match(mask: torch.Tensor, nq: int, nkv: int, window: int | None = None) -> torch.Tensor:
    """0-dim bool tensor: ``mask`` equals the plain causal mask (+ window) (no host read)."""
    m = mask[..., :nkv]
    allowed = m if m.dtype == torch.bool else (m == 0)
    r = torch.arange(nq, device=m.device)[:, None]
    c = torch.arange(nkv, device=m.device)[None, :]
    causal = c <= r + (nkv - nq)
    if window is not None:
        causal = causal & (c > r + (nkv - nq) - window)
    return (allowed == causal).all()


def _window_mask(nq: int, nkv: int, window: int, device: torch.device) -> torch.Tensor:
    """Bool ``(1, 1, N_q, N_kv)`` causal sliding-window mask (for the model's own attention on a window layer)."""
    r = torch.arange(nq, device=device)[:, None]
    c = torch.arange(nkv, device=device)[None, :]
    off = nkv - nq
    return ((c <= r + off) & (c > r + off - window))[None, None]


def _packed_documents(position_ids: Any, B: int, nq: int, nkv: int) -> torch.Tensor | None:
    """Document ids ``[B, N]`` of a packed prefill from ``position_ids`` (transformers' rule), or None.

    A new document starts wherever the position does not follow the previous one by 1 (as
    ``transformers.masking_utils.find_packed_sequence_indices`` computes it); device ops only. None
    when ``position_ids`` is not a ``(B|1, N)`` integer tensor of a cache-free prefill.
    """
    if (not isinstance(position_ids, torch.Tensor) or position_ids.dim() != 2 or nq != nkv
            or position_ids.shape[-1] != nq or position_ids.shape[0] not in (1, B)
            or position_ids.dtype in (torch.bool,) or position_ids.is_floating_point()):
        return None
    first = position_ids[:, :1] - 1
    return (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)


def _packed_match(mask: torch.Tensor, docs: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """0-dim bool tensor: ``mask`` equals causal (+ window) attention inside each packed document (no host read)."""
    nq = docs.shape[-1]
    m = mask[..., :nq]
    allowed = m if m.dtype == torch.bool else (m == 0)
    r = torch.arange(nq, device=m.device)[:, None]
    c = torch.arange(nq, device=m.device)[None, :]
    expect = (c <= r) & (docs[:, None, :, None] == docs[:, None, None, :])
    if window is not None:
        expect = expect & (c > r - window)
    return (allowed == expect).all()


def masked_sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout, *,
                          scale: float | None = None, chunk_rows: int = 1024,
                          sliding_window: int | None = None) -> torch.Tensor:
    """Exact causal block-sparse attention via SDPA with the layout's element mask (CPU fast path).

    Computes exactly what :func:`sparseattn.reference_attention` computes with ``causal=True`` and
    the same layout (rows with no selected key give 0), in query chunks of ``chunk_rows`` so memory
    stays ``O(chunk_rows · N_kv)`` per head. Used by :func:`patch_model` on CPU when no
    ``pv_threshold`` is set; the time it takes is that of dense attention, not of the layout.
    ``sliding_window`` (``W``) restricts query ``i`` further to keys ``> i + N_kv - N_q - W`` (each chunk
    then reads only the keys its rows' windows reach).

    Shapes:
        q ``(B, H, N_q, D)``, k/v ``(B, H_kv, N_kv, D)`` → out ``(B, H, N_q, D)``.
    """
    B, H, Nq, D = q.shape
    Nkv = k.shape[2]
    # one host read for the three checks (a CPU path: it reads q/k/v once more, O(N) against SDPA's O(N^2))
    if not bool(torch.isfinite(q).all() & torch.isfinite(k).all() & torch.isfinite(v).all()):
        # SDPA adds the mask to the scores (NaN + -inf = NaN) and multiplies P·V over masked keys
        # (0 · NaN = NaN), so a non-finite value would leak into rows that never attend it. The
        # reference computes the same function with exact non-finite semantics.
        warnings.warn("masked_sdpa_attention: q/k/v hold non-finite values; computing with the PyTorch reference "
                      "so they reach exactly the rows that attend them", RuntimeWarning, stacklevel=2)
        from sparseattn.ops.reference import reference_attention

        return reference_attention(q, k, v, causal=True, layout=layout, scale=scale, sliding_window=sliding_window).out
    bm, bn = layout.block_m, layout.block_n
    chunk_rows = max(bm, (chunk_rows // bm) * bm)
    num, idx = layout.kv_num_blocks, layout.kv_indices
    # a pattern shared by every (batch, head) is stored as a stride-0 view: build its mask once
    shared = num.stride(0) == 0 and num.stride(1) == 0 and idx.stride(0) == 0 and idx.stride(1) == 0
    if shared:
        one = BlockLayout(num[:1, :1], idx[:1, :1], bm, bn, layout.seqlen_q, layout.seqlen_kv, validate=False)
        block_mask = one.to_dense_mask()  # [1, 1, Mb, Nb]
    else:
        block_mask = layout.to_dense_mask()  # [B, H, Mb, Nb]
    off = Nkv - Nq
    outs = []
    for r0 in range(0, Nq, chunk_rows):
        r1 = min(Nq, r0 + chunk_rows)
        kend = max(1, min(Nkv, r1 + off))
        kbeg = 0 if sliding_window is None else min(max(0, r0 + off - sliding_window + 1), kend - 1)
        rows = torch.arange(r0, r1, device=q.device)
        cols = torch.arange(kbeg, kend, device=q.device)
        em = block_mask[:, :, rows // bm][:, :, :, cols // bn]
        em = em & (cols[None, :] <= rows[:, None] + off)
        if sliding_window is not None:
            em = em & (cols[None, :] > rows[:, None] + off - sliding_window)
        o = torch.nn.functional.scaled_dot_product_attention(q[:, :, r0:r1], k[:, :, kbeg:kend], v[:, :, kbeg:kend],
                                                             attn_mask=em, scale=scale, enable_gqa=H != k.shape[1])
        if bool(torch.isnan(o).any()):  # rows with no selected key (SDPA gives NaN there): 0, as the reference
            empty = ~em.any(-1, keepdim=True)
            o = torch.where(empty, torch.zeros((), dtype=o.dtype, device=o.device), o)
        outs.append(o)
    return torch.cat(outs, dim=2)


def _as_density(entry: Any) -> torch.Tensor:
    """A density entry of :meth:`PatchHandle._density` as the per-head float64 ``[H]`` density."""
    if isinstance(entry, torch.Tensor):
        return entry
    counts, avail = entry
    return counts.mean(0, dtype=torch.float64) / avail


def _compiling() -> bool:
    """Whether dynamo is tracing this call (``torch.compiler.is_compiling``, when this torch has it)."""
    comp = getattr(torch, "compiler", None)
    return bool(comp is not None and hasattr(comp, "is_compiling") and comp.is_compiling())


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
        self._mask_verdicts: dict[tuple[Any, ...], bool] = {}
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
        docs = _packed_documents(position_ids, B, nq, nkv)
        if docs is None:
            return None
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
            layout = self._layout(layer, query, key)
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
        if mode == "sparse" and getattr(self.predictors[layer], "name", None) == "sketch_walk":
            return "SketchWalk keeps its walk history in Python-side state"
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
            if fixed is not None:
                return None
            return layout.selected_in_region(causal=True), max(layout.available_blocks(causal=True), 1)

        if self._layer_graphs is None:
            from sparseattn.integrations.layer_graphs import LayerGraphs

            self._layer_graphs = LayerGraphs()
        gkey = (layer, mode, win, id(pred), scale, pv, self._quant_label)
        res = self._layer_graphs.run(gkey, query, key, value, body, f"layer {layer}")
        if res is None:
            self.layer_graph_status[layer] = "capture failed (see the warning)"
            return None
        out, extra = res
        density = self._density(fixed, True, win) if fixed is not None else extra
        self.layer_graph_status[layer] = "graphed"
        self.timings[layer] = self.timings.get(layer, 0.0) + time.perf_counter() - t0
        self.counts["prefill_sparse"] += 1
        if quant is not None:
            self.counts["prefill_quant"] += 1
        self._density_raw.setdefault(layer, []).append(density)
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
                                  self.quant is not None, self._quant_label or "triton")

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
        out, extra = lg.replay(fl.buf, fl.entry, query, key, value)
        self.timings[layer] = self.timings.get(layer, 0.0) + time.perf_counter() - t0
        self.counts["prefill_sparse"] += 1
        if fl.quant:
            self.counts["prefill_quant"] += 1
        self._density_raw.setdefault(layer, []).append(fl.density if fl.density is not None else extra)
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
            out[layer] = [_as_density(x) for x in items]
        return out

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
    dense_above: float | None = None,
    tuned: str | os.PathLike | Any = None,
    layer_graphs: bool | None = None,
    quant: str | None = None,
    quant_granularity: str = "per_warp",
    decode: str = "dense",
    decode_top_pages: int | float | None = None,
    decode_page_size: int | None = None,
    decode_backend: str = "auto",
    decode_layers: Iterable[int] | None = None,
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
            (default) never falls back. ``handle.dense_fallbacks`` and the report count the fallbacks.
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
        quant_granularity: ``"per_warp"`` (default), ``"per_block"`` or ``"per_thread"`` (docs/QUANT.md).
        decode: how decode steps (``1 <= N_q <= 64`` new tokens over a KV cache) run: ``"dense"`` (default:
            the model's own attention), ``"kernel"`` (:func:`sparseattn.ops.decode.decode_attention`) or
            ``"sparse"`` (:func:`sparseattn.ops.decode.sparse_decode_attention`, Quest-style pages; page
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
    from sparseattn.integrations.decode_route import DecodeRoute, make_decode_config

    decode_cfg = make_decode_config(decode, decode_top_pages, decode_page_size, decode_backend, decode_layers, indices)
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
    if dense_above is not None and (isinstance(dense_above, bool) or not isinstance(dense_above, (int, float))
                                    or not 0.0 < float(dense_above) <= 1.0):
        raise fail(fn, "dense_above", "must be a density in (0, 1] or None", "e.g. 0.8", repr(dense_above))
    _check_quant(model, layers, predictors, modes, quant, quant_granularity, backend, dense_above)
    handle = PatchHandle(model, layers, predictors, heads, modes, backend, orig, name, dense_fn, keep_layouts)
    handle.dense_above = None if dense_above is None else float(dense_above)
    handle.quant = quant
    handle.quant_granularity = quant_granularity if quant is not None else None
    handle.tuned = tuned_label
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
