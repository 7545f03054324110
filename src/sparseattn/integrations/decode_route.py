"""Decode steps of a patched model through sparseattn's decode kernels (``patch_model(..., decode=...)``).

:func:`sparseattn.integrations.patch_model` sends prefill calls (``N_q == N_kv``) to the predictor +
block-sparse kernel and, by default, decode calls (``N_q < N_kv``: new tokens over a KV cache) to the
model's own dense attention. With ``decode="kernel"`` or ``decode="sparse"`` a decode call of
``1 <= N_q <= 64`` new tokens runs instead, per layer:

* ``"kernel"`` — :func:`sparseattn.ops.decode.decode_attention` (split-KV dense decode, GQA packed,
  the layer's ``scaling``); counted as ``decode_kernel``;
* ``"sparse"`` — :func:`sparseattn.ops.pages.sparse_decode_attention` (Quest: per-page key min/max
  summaries, the ``top_pages`` pages with the highest score bound, the first page and the pages of the
  new tokens always kept); counted as ``decode_sparse``.

Sliding-window layers (Gemma-2/3, Mistral, ...) are computed exactly, never sparsified: when the window
covers every key the layer received (a sliding-window cache layer hands at most ``window`` keys to a
one-token step) or the step has one token (its keys are then the last ``window`` ones, a view) the
dense decode kernel runs over those keys (``decode_window``); otherwise (``N_q > 1`` over more keys than
the window) the model's own attention runs (``decode_dense``, fallback reason ``"sliding_window"``).

Everything the decode kernels cannot compute exactly goes to the model's own attention, counted in
``handle.counts["decode_dense"]`` and, by reason, in ``handle.decode_fallbacks``: an attention mask that
is not plain bottom-right causal (``"attention_mask"``: padding, a static cache's unused slots; the
mask is compared once per mask object and forward, one host read — transformers passes no mask for an
unpadded one-token step), logit softcapping (``"softcap"``), attention sinks (``"attention_sinks"``),
dropout in training mode (``"dropout"``), more than 64 new tokens (``"query_length"``: chunked
prefill), a window layer as above. Layers left out by ``decode_layers`` run the model's attention too
(``decode_dense``, no fallback reason). ``torch.compile`` of a model patched with a decode route is
refused (``NotImplementedError``): the route keeps per-cache state in Python.

Page summaries (sparse mode) are kept per layer **on the cache object** (attribute
``_sparseattn_page_summaries``, so they live and die with the cache) and updated incrementally with
:func:`sparseattn.ops.pages.update_page_summaries` (the pages the new keys touch, on the device): the
forward pre-hook records the cache passed to the model (``cache=`` / ``past_key_values=``) and a
forward serial number; a layer's summaries are updated when the same cache was used by the previous
forward and the layer's key count grew by exactly this step's tokens, and rebuilt from the whole cache
otherwise (first step after a prefill, a new or cropped cache, a sliding cache layer that dropped old
keys, a cache the hook could not see). ``handle.decode_stats`` counts ``summary_builds`` and
``summary_updates``. When the cache grows past the last page a zero page is appended (one copy of the
summaries every ``page_size`` tokens).

Hot path: no host reads (lengths and page counts stay on the device; no per-head Python loops).
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Iterable
from typing import Any

import torch

from sparseattn._validation import fail
from sparseattn.integrations._tracing import _compiling

__all__ = ["DECODE_MODES", "DECODE_BACKENDS", "DecodeConfig", "DecodeRoute", "make_decode_config", "SUMMARY_ATTR"]

DECODE_MODES = ("dense", "kernel", "sparse")
DECODE_BACKENDS = ("auto", "triton", "reference")
SUMMARY_ATTR = "_sparseattn_page_summaries"
DEFAULT_TOP_PAGES = 0.1
DEFAULT_PAGE_SIZE = 16


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """How a patched model's decode steps run (see the module docstring).

    Args:
        mode: ``"dense"`` (the model's own attention), ``"kernel"`` (dense decode kernel) or ``"sparse"``.
        top_pages: pages kept per (sequence, KV head) in sparse mode: an int >= 1 or a fraction in (0, 1].
        page_size: keys per page of the summaries (sparse mode).
        backend: ``"auto"`` (the Triton kernels on CUDA where they run, else the PyTorch reference),
            ``"triton"`` (raise ``NotImplementedError`` where they cannot run) or ``"reference"``.
        layers: layer indices that take the route (``None``: every layer).
    """

    mode: str = "dense"
    top_pages: int | float = DEFAULT_TOP_PAGES
    page_size: int = DEFAULT_PAGE_SIZE
    backend: str = "auto"
    layers: tuple[int, ...] | None = None
    version: int = 1

    def __post_init__(self) -> None:
        fn = "DecodeConfig"
        if self.mode not in DECODE_MODES:
            raise fail(fn, "mode", "is unknown", f"one of {list(DECODE_MODES)}", repr(self.mode))
        tp = self.top_pages
        if isinstance(tp, bool) or not isinstance(tp, (int, float)) or \
                (isinstance(tp, int) and tp < 1) or (isinstance(tp, float) and not 0.0 < tp <= 1.0):
            raise fail(fn, "top_pages", "must be a page count or a fraction", "an int >= 1 or a float in (0, 1]",
                       repr(tp))
        if isinstance(self.page_size, bool) or not isinstance(self.page_size, int) or self.page_size <= 0:
            raise fail(fn, "page_size", "must be a positive integer", "an int > 0 (16 typical)", repr(self.page_size))
        if self.backend not in DECODE_BACKENDS:
            raise fail(fn, "backend", "is unknown", f"one of {list(DECODE_BACKENDS)}", repr(self.backend))


def make_decode_config(decode: Any, top_pages: Any, page_size: Any, backend: Any, layers: Iterable[int] | None,
                       indices: set[int]) -> DecodeConfig:
    """``patch_model``'s decode arguments → :class:`DecodeConfig` (errors name ``patch_model``'s arguments)."""
    fn = "patch_model"
    if decode not in DECODE_MODES:
        raise fail(fn, "decode", "is unknown", f"one of {list(DECODE_MODES)}", repr(decode))
    if decode != "sparse":
        for name, val in (("decode_top_pages", top_pages), ("decode_page_size", page_size)):
            if val is not None:
                raise fail(fn, name, "applies to decode='sparse' only", f"{name}=None with decode={decode!r}", repr(val))
    if decode == "dense":
        if backend != "auto":
            raise fail(fn, "decode_backend", "applies to decode='kernel' or 'sparse' only",
                       "decode_backend='auto' with decode='dense'", repr(backend))
        if layers is not None:
            raise fail(fn, "decode_layers", "applies to decode='kernel' or 'sparse' only",
                       "decode_layers=None with decode='dense'", repr(layers))
    sel = None
    if layers is not None:
        sel_list = []
        for i in layers:
            if isinstance(i, bool) or not isinstance(i, int) or i not in indices:
                raise fail(fn, "decode_layers", "has an unknown layer index", f"ints in [0, {max(indices)}]", repr(i))
            sel_list.append(i)
        sel = tuple(sorted(set(sel_list)))
    try:
        return DecodeConfig(mode=decode, top_pages=DEFAULT_TOP_PAGES if top_pages is None else top_pages,
                            page_size=DEFAULT_PAGE_SIZE if page_size is None else page_size, backend=backend,
                            layers=sel)
    except ValueError as exc:  # name patch_model's argument, not the dataclass field
        msg = str(exc).replace("DecodeConfig: top_pages", "patch_model: decode_top_pages")
        msg = msg.replace("DecodeConfig: page_size", "patch_model: decode_page_size")
        msg = msg.replace("DecodeConfig: backend", "patch_model: decode_backend")
        raise ValueError(msg) from None


class _Summaries:
    """One layer's page summaries and the state they describe."""

    __slots__ = ("summ", "n", "serial", "owner", "shape")

    def __init__(self, summ: Any, n: int, serial: int, owner: int, shape: tuple[int, ...]) -> None:
        self.summ = summ
        self.n = n
        self.serial = serial
        self.owner = owner
        self.shape = shape


class DecodeRoute:
    """A patched model's decode route (created by ``patch_model`` when ``decode != "dense"``)."""

    def __init__(self, config: DecodeConfig) -> None:
        self.config = config
        self.layers = None if config.layers is None else frozenset(config.layers)
        self.serial = 0
        self._cache_ref: Any = None
        self._uses_kernel: dict[tuple[Any, ...], str] = {}
        #: summaries of a cache the forward hook could not see (rebuilt every step)
        self._orphans: dict[int, _Summaries] = {}
        #: analysis hook (e.g. :func:`sparseattn.eval.decode_recall.measure_mass_recall`): when set, called after
        #: every sparse decode call with ``dict(layer, forward, query, key, scale, pages)`` (``pages``:
        #: ``(page_indices, page_counts)`` of the selection; tensors as the layer received them)
        self.observer: Any = None
        #: verification steps of speculative decoding (:mod:`sparseattn.integrations.speculative`): while True a
        #: sparse route runs the exact dense decode kernel (counted as ``decode_verify``) and keeps the page summaries
        #: current, so the draft steps after it update them incrementally
        self.exact = False

    # ------------------------------------------------------------------ model-level hook
    def on_forward(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Forward pre-hook (``with_kwargs=True``): remember this forward's cache object and count forwards."""
        self.serial += 1
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        ref = None
        if cache is not None:
            try:
                ref = weakref.ref(cache)
            except TypeError:
                ref = None
        self._cache_ref = ref
        return None

    def _cache(self) -> Any:
        return None if self._cache_ref is None else self._cache_ref()

    # ------------------------------------------------------------------ the call
    def forward(self, handle: Any, module: torch.nn.Module, layer: int, query: torch.Tensor, key: torch.Tensor,
                value: torch.Tensor, attention_mask: torch.Tensor | None, kwargs: dict[str, Any],
                window: int | None) -> tuple[torch.Tensor, Any]:
        from sparseattn.ops.decode import MAX_DECODE_QUERIES

        nq, nkv = query.shape[2], key.shape[2]
        if self.layers is not None and layer not in self.layers:
            return handle._dense_call(module, query, key, value, attention_mask, kwargs, None, "decode_dense")
        if window is None:
            window = getattr(module, "sliding_window", None)
            window = window if isinstance(window, int) and not isinstance(window, bool) and window > 0 else None
        win = window if (window is not None and window < nkv) else None  # None: the window covers every key
        reason = None
        if nq > MAX_DECODE_QUERIES:
            reason = "query_length"
        elif win is not None and nq > 1:
            reason = "sliding_window"
        elif kwargs.get("softcap") is not None:
            reason = "softcap"
        elif kwargs.get("s_aux") is not None:
            reason = "attention_sinks"
        elif module.training and float(kwargs.get("dropout", 0.0) or 0.0) > 0:
            reason = "dropout"
        elif attention_mask is not None and not handle._mask_ok(attention_mask, nq, nkv, win):
            reason = "attention_mask"
        if reason is not None:
            handle.decode_fallbacks[reason] = handle.decode_fallbacks.get(reason, 0) + 1
            return handle._dense_call(module, query, key, value, attention_mask, kwargs, None, "decode_dense")
        if _compiling():
            raise NotImplementedError("patch_model: decode='kernel'/'sparse' is not supported under torch.compile (the "
                                      "decode route keeps per-cache page summaries in Python); patch with "
                                      "decode='dense' to compile")
        scale = kwargs.get("scaling")
        backend = self.config.backend
        if window is not None:
            from sparseattn.ops.decode import decode_attention

            # exact: one new token attends exactly the last `window` keys; with the window covering every key
            # the layer is plain causal
            k = key if win is None else key[:, :, nkv - win:]
            v = value if win is None else value[:, :, nkv - win:]
            out = decode_attention(query, k, v, scale=scale, backend=backend)
            counter = "decode_window"
        elif self.config.mode == "kernel" or self.exact:
            from sparseattn.ops.decode import decode_attention

            out = decode_attention(query, key, value, scale=scale, backend=backend)
            counter = "decode_kernel"
            if self.config.mode == "sparse":  # a verification step: exact, the summaries kept current for the drafts
                self._summaries(handle, layer, key, nq)
                counter = "decode_verify"
        else:
            from sparseattn.ops.pages import sparse_decode_attention

            summ = self._summaries(handle, layer, key, nq)
            ps = self.config.page_size
            # the last nq keys (this step's tokens) may straddle a page boundary: ceil((nq - 1) / ps) + 1 pages
            out, pages = sparse_decode_attention(query, key, value, summ, top_pages=self.config.top_pages,
                                                 keep_first=1, keep_last=1 + -(-(nq - 1) // ps), scale=scale,
                                                 backend=backend, return_pages=True)
            counter = "decode_sparse"
            if self.observer is not None:
                self.observer(dict(layer=layer, forward=self.serial, query=query, key=key, scale=scale, pages=pages))
        handle.counts[counter] += 1
        used = self._backend_used(query)
        handle.decode_backends.setdefault(layer, set()).add(used)
        return out.transpose(1, 2).contiguous(), None

    def note_crop(self, cache: Any, length: int) -> None:
        """``cache`` was cropped to its first ``length`` keys (every layer the route serves) between two forwards.

        The kept summaries of those layers stay valid for every page below the one holding key ``length``: they are
        cut to ``ceil(length / page_size)`` pages and marked as describing ``length`` keys, so the next forward that
        appends its tokens recomputes the page they start in (and the pages after it) from the cache and reuses the
        rest, instead of rebuilding everything. Call it only for a crop (keys below ``length`` unchanged); a cache
        changed otherwise must not be noted (its summaries are then rebuilt). Host-side bookkeeping only.
        """
        from sparseattn.ops.pages import PageSummaries

        fn = "DecodeRoute.note_crop"
        if isinstance(length, bool) or not isinstance(length, int) or length < 0:
            raise fail(fn, "length", "must be a non-negative integer", "the cache's key count after the crop",
                       repr(length))
        store = getattr(cache, SUMMARY_ATTR, None)
        if not isinstance(store, dict):
            return
        ps = self.config.page_size
        pages = -(-length // ps)
        for st in store.values():
            if st.owner == id(self) and st.n > length:
                st.summ = PageSummaries(st.summ.kmin[:, :, :pages], st.summ.kmax[:, :, :pages], ps)
                st.n = length

    def _backend_used(self, q: torch.Tensor) -> str:
        key = (q.device.type, q.dtype, q.shape[-1], self.config.backend)
        used = self._uses_kernel.get(key)
        if used is None:
            from sparseattn.ops.decode import decode_choice

            # the registry's choice among the built-in decode operators (the ones decode_attention and
            # sparse_decode_attention run here): the Triton kernel where it accepts q and is preferred
            op, _ = decode_choice(q, self.config.backend, names=("decode_triton", "decode_reference"))
            used = self._uses_kernel[key] = "triton" if op is not None and op.name == "decode_triton" else "reference"
        return used

    # ------------------------------------------------------------------ page summaries
    def _summaries(self, handle: Any, layer: int, key: torch.Tensor, nq: int) -> Any:
        """This layer's :class:`~sparseattn.ops.pages.PageSummaries` of ``key``, updated or rebuilt (see the module)."""
        from sparseattn.ops.pages import PageSummaries, page_summaries, update_page_summaries

        ps = self.config.page_size
        B, Hkv, N, D = key.shape
        cache = self._cache()
        store: dict[int, _Summaries] | None = None
        if cache is not None:
            store = getattr(cache, SUMMARY_ATTR, None)
            if store is None:
                try:
                    setattr(cache, SUMMARY_ATTR, {})
                    store = getattr(cache, SUMMARY_ATTR)
                except (AttributeError, TypeError):
                    store = None
        owner = id(self)
        shape = (B, Hkv, D, key.dtype, key.device)
        st = store.get(layer) if store is not None else None
        stats = handle.decode_stats
        if (st is not None and st.owner == owner and st.serial == self.serial - 1 and st.n == N - nq
                and st.shape == shape):
            summ = st.summ
            P = -(-N // ps)
            grow = P - summ.kmin.shape[2]
            if grow > 0:  # the cache grew past the last page: append zero pages (the update fills them)
                pad = torch.zeros((B, Hkv, grow, D), dtype=summ.kmin.dtype, device=summ.kmin.device)
                summ = PageSummaries(torch.cat([summ.kmin, pad], dim=2), torch.cat([summ.kmax, pad], dim=2), ps)
            old = torch.full((B,), N - nq, dtype=torch.int32, device=key.device)
            new = torch.full((B,), N, dtype=torch.int32, device=key.device)
            update_page_summaries(summ, key, old, new, max_new=nq, check_seqlens=False)
            stats["summary_updates"] = stats.get("summary_updates", 0) + 1
        else:
            summ = page_summaries(key, ps)
            stats["summary_builds"] = stats.get("summary_builds", 0) + 1
        entry = _Summaries(summ, N, self.serial, owner, shape)
        if store is not None:
            store[layer] = entry
        else:
            self._orphans[layer] = entry  # kept for inspection only: never updated incrementally
        return summ

    def describe(self) -> dict[str, Any]:
        """JSON-friendly description of the configuration."""
        c = self.config
        out: dict[str, Any] = {"mode": c.mode, "backend": c.backend,
                               "layers": None if c.layers is None else list(c.layers)}
        if c.mode == "sparse":
            out.update(top_pages=c.top_pages, page_size=c.page_size)
        return out
