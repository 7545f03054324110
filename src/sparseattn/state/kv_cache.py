"""``MixedKVCache``: a transformers ``Cache`` with a recent window in the model dtype and older tokens quantized.

Per layer the cache holds up to three key segments, in position order:

* **sink** — the first ``sink_tokens`` tokens (the attention sink; off by default, ``sink_tokens=4`` keeps four),
  never quantized: in the model's dtype, moved here from the recent window when they leave it;
* **quantized** — every other token older than the recent window, as INT8 (symmetric, one float32 scale per
  token and KV head: ``scale = max|x| / 127``) or FP8 e4m3 (``scale = max|x| / 448``);
* **recent** — the last ``window`` tokens (plus the tokens of the current step) in the model's dtype.

**K smoothing** (``smooth_keys=True``; off by default, see below): keys often carry large per-channel offsets (outlier
channels), which set a per-token absmax scale and leave the other channels a coarse step. At a layer's
first eviction the cache takes the channel mean ``μ`` of the keys it holds (per batch row and KV head,
float32 ``(B, H_kv, 1, D)``, kept fixed afterwards) and quantizes ``k - μ`` instead of ``k``. Over that
segment the scores are ``q·k - q·μ``, a constant per query row, so the segment's normalised output is
unchanged and only its lse lacks ``scale·q·μ``; the attention adds it back before the exact merge with the
recent window (the state operator's ``k_means``; the decode route's lse). ``full_kv`` adds ``μ`` back to
the dequantised keys. Values are not smoothed. ``μ`` costs ``D`` float32 per layer, batch row and KV head
(``memory_report()["mean_bytes"]``, counted in ``bytes_used``). Off by default: on SmolLM2-135M (CPU,
fp32, 2048 tokens, int8, window 128) it *doubles* the mean per-layer attention error (4.6e-3 → 8.5e-3,
worse in 24 of 30 layers) because the attention-sink token, which takes 75–89% of the attention in some
layers, has small keys far from ``μ``: its quantization error grows about 7×. A simulation that kept the
sink token in full precision gave 2.4e-3 off and 2.0e-3 on (docs/STATE.md); built as ``sink_tokens`` (measured:
2.31e-3 off, 1.98e-3 on with ``sink_tokens=4``; it was the default until the GPU's greedy-generation check on
SmolLM2 in bf16 came out worse with it than without, docs/STATE.md). With a sink segment ``μ`` is the mean of the
non-sink keys held at the first quantization, and the sink keys are stored as they are.

Tokens move from the recent window to the quantized segment at the *start* of the next ``update``
(so the step that adds a token attends it in full precision). Attention over the cache goes through
the state operator (:func:`sparseattn.state.segmented.attention_over_segments`) and the raw
online-softmax state is carried exactly through the segments (sink, quantized, recent). Where the
quantized segment is dequantised: **inside the Triton kernel** (``HAS_KV_SCALE``: int8/fp8 tiles
converted in registers, the key scale applied to the scores, the value scale folded into P) when the
kernel runs the layer (CUDA, fp16/bf16, head_dim 64/128/256; fp8 needs sm_89+); otherwise **in PyTorch
right before the attention call** (:func:`dequantize`, then the PyTorch loop). Decode steps (1..64 new
tokens) instead go to the split-KV decode kernel (``decode_backend``, see :class:`MixedKVCache`): the
quantized segment with its scales (dequantised in registers), the sink segment and the recent window, merged
exactly. This needs the model
to use the ``"sparseattn_mixed"`` attention implementation
(:func:`sparseattn.integrations.mixed_cache_attention.enable_mixed_cache`); with any other
implementation ``update`` returns the whole dequantised KV (correct attention, no state operator;
warned once).

transformers is imported lazily (``import sparseattn`` stays light): the class is built on first
access of ``sparseattn.state.kv_cache.MixedKVCache``. Works with the ``Cache`` / ``DynamicLayer`` API of
transformers 5.x (checked with 5.24; only ``update``, ``get_seq_length``, ``get_mask_sizes`` via
``DynamicLayer`` and ``reorder_cache`` are relied on).
"""

from __future__ import annotations

import math
import warnings
import weakref
from typing import Any

import torch

from sparseattn._validation import fail

__all__ = ["MixedKVCache", "quantize", "dequantize", "keys_contiguous", "tile_blocked", "model_fingerprint",
           "QUANT_MODES"]

QUANT_MODES = ("int8", "fp8")
DECODE_BACKENDS = ("auto", "triton", "off")
_QMAX = {"int8": 127.0, "fp8": 448.0}
MIXED_TAG = "_sparseattn_mixed"  # attribute set on the key tensor ``update`` returns in mixed mode
ATTN_NAME_MIXED = "sparseattn_mixed"


def _fp8_dtype() -> torch.dtype:
    dt = getattr(torch, "float8_e4m3fn", None)
    if dt is None:  # pragma: no cover - torch without float8
        raise NotImplementedError("MixedKVCache: quant='fp8' needs torch.float8_e4m3fn (torch >= 2.1)")
    return dt


def quantize(x: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token, per-head symmetric quantization of ``x (B, H_kv, N, D)``: ``(data, scales (B, H_kv, N, 1) fp32)``."""
    if mode not in QUANT_MODES:
        raise fail("quantize", "mode", "is unknown", f"one of {QUANT_MODES}", repr(mode))
    xf = x.to(torch.float32)
    amax = xf.abs().amax(-1, keepdim=True)
    scale = torch.where(amax > 0, amax / _QMAX[mode], torch.ones_like(amax))
    y = xf / scale
    if mode == "int8":
        return torch.round(y).clamp_(-127, 127).to(torch.int8), scale
    return y.clamp_(-448.0, 448.0).to(_fp8_dtype()), scale


def keys_contiguous(x: torch.Tensor) -> torch.Tensor:
    """``x`` (..., N, D) with its keys contiguous: a (..., D, N) buffer viewed as (..., N, D) (``x`` itself when it is
    one already). The decode kernel reads a V cache stored this way without transposing 8-bit tiles byte by byte
    (:func:`sparseattn.ops.decode.decode_attention`); the values are the same."""
    if x.dim() >= 2 and x.stride(-2) == 1 and x.shape[-1] > 1:
        return x
    return x.transpose(-1, -2).contiguous().transpose(-1, -2)


def tile_blocked(x: torch.Tensor, tile: int = 128) -> torch.Tensor:
    """``x`` (..., N, D) as ``tile``-key blocks with their keys contiguous: (..., N / tile, D, tile), a copy
    (``N`` must be a multiple of ``tile``). The decode kernel reads a V cache stored this way tile by tile
    (:func:`sparseattn.ops.decode.decode_attention`, ``BLOCK_N = tile``) without transposing 8-bit tiles byte by byte,
    and each tile's V is one contiguous block of memory (a keys-contiguous ``(..., D, N)`` buffer spreads it over
    ``D`` rows ``N`` elements apart); :func:`sparseattn.ops.decode.from_tile_blocked` undoes it."""
    fn = "tile_blocked"
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise fail(fn, "x", "must be a tensor (..., N, D)", "a tensor of at least 2 dims", type(x).__name__
                   if not isinstance(x, torch.Tensor) else f"shape {tuple(x.shape)}")
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 16 or tile > 256 or tile & (tile - 1):
        raise fail(fn, "tile", "must be a power of two in [16, 256]", "16, 32, 64, 128 or 256", repr(tile))
    n, d = x.shape[-2:]
    if n % tile:
        raise fail(fn, "x", "has a key count that is not a multiple of the tile", f"N % {tile} == 0", f"N = {n}")
    return x.reshape(*x.shape[:-2], n // tile, tile, d).transpose(-1, -2).contiguous()


def dequantize(data: torch.Tensor | None, scales: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``data * scales`` in ``dtype``; checks that the scales exist and match (one per token and head)."""
    fn = "dequantize"
    if data is None:
        raise fail(fn, "data", "is missing", "a quantized tensor (B, H_kv, N, D)", "None")
    if scales is None:
        raise fail(fn, "scales", "are missing for a quantized segment", f"a float32 tensor {tuple(data.shape[:3]) + (1,)}",
                   "None")
    if not isinstance(scales, torch.Tensor) or tuple(scales.shape) != tuple(data.shape[:3]) + (1,):
        raise fail(fn, "scales", "do not match the quantized segment (one per token and head)",
                   tuple(data.shape[:3]) + (1,), tuple(getattr(scales, "shape", ())) or type(scales).__name__)
    return (data.to(torch.float32) * scales).to(dtype)


def model_fingerprint(config: Any) -> tuple[Any, ...]:
    """What identifies a model's KV geometry: type, layers, KV heads, head_dim, hidden size, vocabulary."""
    cfg = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads = getattr(cfg, "num_attention_heads", None)
    hidden = getattr(cfg, "hidden_size", None)
    head_dim = getattr(cfg, "head_dim", None) or (hidden // heads if hidden and heads else None)
    return (getattr(cfg, "model_type", None), getattr(cfg, "num_hidden_layers", None),
            getattr(cfg, "num_key_value_heads", heads), head_dim, hidden, getattr(cfg, "vocab_size", None))


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _build_classes() -> tuple[type, type]:
    from transformers.cache_utils import Cache, DynamicLayer

    class MixedLayer(DynamicLayer):
        """One layer: quantized old tokens (``qk``/``qv`` + scales) and the recent window (``keys``/``values``)."""

        is_sliding = False  # every token is kept; a sliding-window layer's window is applied by the attention
        is_croppable = False

        def __init__(self, window: int, quant: str, smooth_keys: bool = False, sink_tokens: int = 0) -> None:
            super().__init__()
            self.window = window
            self.quant = quant
            self.smooth_keys = smooth_keys
            self.sink_tokens = sink_tokens
            # the attention-sink segment: the first ``sink_tokens`` tokens, never quantized (model dtype); filled
            # by the evictions (until then those tokens are still in the recent window)
            self.sk: torch.Tensor | None = None
            self.sv: torch.Tensor | None = None
            # K smoothing: the per-(batch, KV head) channel mean of the keys, float32 (B, H_kv, 1, D), fixed at
            # the first eviction; the quantized segment stores ``k - k_mean`` (None: not smoothed)
            self.k_mean: torch.Tensor | None = None
            self.qk: torch.Tensor | None = None
            self.qv: torch.Tensor | None = None
            self.qk_scale: torch.Tensor | None = None
            self.qv_scale: torch.Tensor | None = None
            self._owner: Any = None  # weakref to the attention module that first used this layer
            self._cache: Any = None  # weak proxy to the MixedKVCache holding this layer

        # ------------------------------------------------------------------ storage
        @property
        def n_quant(self) -> int:
            return 0 if self.qk is None else int(self.qk.shape[2])

        @property
        def n_sink(self) -> int:
            return 0 if self.sk is None else int(self.sk.shape[2])

        @property
        def n_recent(self) -> int:
            return 0 if (not self.is_initialized or self.keys is None or self.keys.numel() == 0) else int(self.keys.shape[2])

        def check_quantized(self) -> None:
            """Raise if the quantized segment lacks its scales (or they do not match it)."""
            for data, scales, name in ((self.qk, self.qk_scale, "key"), (self.qv, self.qv_scale, "value")):
                if data is None and scales is None:
                    continue
                want = None if data is None else tuple(data.shape[:3]) + (1,)
                if data is None or scales is None or tuple(scales.shape) != want:
                    raise fail("MixedKVCache", f"{name} scales", "are missing for a quantized segment (or do not match it)",
                               f"float32 scales of shape {want}",
                               "None" if scales is None else f"shape {tuple(scales.shape)}")
            if (self.sk is None) != (self.sv is None) or (self.sk is not None and (
                    self.sk.shape != self.sv.shape or self.sk.shape[2] > self.sink_tokens)):  # type: ignore[union-attr]
                raise fail("MixedKVCache", "sink segment", "is inconsistent (keys and values must match)",
                           f"keys and values of equal shape with at most {self.sink_tokens} tokens",
                           f"{None if self.sk is None else tuple(self.sk.shape)} and "
                           f"{None if self.sv is None else tuple(self.sv.shape)}")
            if self.k_mean is not None:
                want = None if self.qk is None else (self.qk.shape[0], self.qk.shape[1], 1, self.qk.shape[3])
                if want is None or tuple(self.k_mean.shape) != want or self.k_mean.dtype != torch.float32:
                    raise fail("MixedKVCache", "key mean", "does not match the quantized segment (K smoothing)",
                               f"float32 of shape {want}", f"{self.k_mean.dtype} of shape {tuple(self.k_mean.shape)}")
            elif self.smooth_keys and self.qk is not None:
                raise fail("MixedKVCache", "key mean", "is missing for a smoothed quantized segment",
                           "a float32 tensor (B, H_kv, 1, D)", "None")

        def _evict(self) -> None:
            self.check_quantized()
            over = self.n_recent - self.window
            if over <= 0:
                return
            take = min(over, self.sink_tokens - self.n_sink)  # the first tokens leaving go to the sink segment
            if take > 0:
                tk, tv = self.keys[:, :, :take], self.values[:, :, :take]
                if self.sk is None:
                    self.sk, self.sv = tk.contiguous(), tv.contiguous()
                else:
                    self.sk, self.sv = torch.cat([self.sk, tk], 2), torch.cat([self.sv, tv], 2)
            else:
                take = 0
            if take < over:
                self._quantize_old(take, over)
            self.keys = self.keys[:, :, over:].contiguous()
            self.values = self.values[:, :, over:].contiguous()

        def _quantize_old(self, a: int, b: int) -> None:
            """Quantize the recent window's tokens ``a:b`` (leaving it) onto the quantized segment."""
            if a == 0:
                old_k, old_v = self.keys[:, :, :b], self.values[:, :, :b]
            else:
                old_k, old_v = self.keys[:, :, a:b], self.values[:, :, a:b]
            if self.smooth_keys:
                if self.k_mean is None:  # first quantization: the mean of every non-sink key held now (leaving + staying)
                    held = self.keys if a == 0 else self.keys[:, :, a:]
                    self.k_mean = held.to(torch.float32).mean(2, keepdim=True)
                old_k = old_k.to(torch.float32) - self.k_mean
            if old_k.shape == old_v.shape and old_k.dtype == old_v.dtype:  # one quantize call for both (fewer launches)
                d2, s2 = quantize(torch.stack([old_k, old_v]), self.quant)
                dk, dv, sk, sv = d2[0], d2[1], s2[0], s2[1]
            else:
                dk, sk = quantize(old_k, self.quant)
                dv, sv = quantize(old_v, self.quant)
            # the values stay [keys, head_dim] (a keys-contiguous V, the kernel's V_KEYS walk, was 2-3% slower on an
            # H100: docs/DECODE.md "Keys-contiguous V on the GPU")
            if self.qk is None:
                self.qk, self.qv, self.qk_scale, self.qv_scale = dk, dv, sk, sv
            else:
                self.qk = torch.cat([self.qk, dk], 2)
                self.qv = torch.cat([self.qv, dv], 2)
                self.qk_scale = torch.cat([self.qk_scale, sk], 2)  # type: ignore[list-item]
                self.qv_scale = torch.cat([self.qv_scale, sv], 2)  # type: ignore[list-item]

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, mixed: bool = False,
                   **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            fn = "MixedKVCache.update"
            if self.is_initialized and self.n_recent > 0:
                want = (self.keys.shape[0], self.keys.shape[1], self.keys.shape[3])
                got = (key_states.shape[0], key_states.shape[1], key_states.shape[3])
                if want != got or key_states.dtype != self.keys.dtype:
                    raise fail(fn, "key_states", "do not match the cached keys (a cache used across models?)",
                               f"(B, H_kv, D)={want} {self.keys.dtype}", f"{got} {key_states.dtype}")
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            self._evict()
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
            if mixed:
                k, v = self.keys, self.values
                k = k.view_as(k)  # a fresh tensor object, so the tag does not stick to the stored one
                setattr(k, MIXED_TAG, self)
                return k, v
            return self.full_kv()

        def get_seq_length(self) -> int:
            return self.n_sink + self.n_quant + self.n_recent

        def full_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
            """The whole cache (sink, quantized part dequantised with the key mean added back, recent) (fallback
            path, tests)."""
            ks, vs = ([self.sk], [self.sv]) if self.n_sink else ([], [])
            if self.n_quant:
                dk, dv = self.dequantized(add_mean=True)
                ks.append(dk)
                vs.append(dv)
            if not ks:
                return self.keys, self.values
            return torch.cat(ks + [self.keys], 2), torch.cat(vs + [self.values], 2)

        def dequantized(self, *, add_mean: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
            """The quantized segment dequantised (in PyTorch) to the model dtype.

            The keys are the smoothed ones (``k - k_mean``) unless ``add_mean`` (then the mean is added back
            in float32 before the cast).
            """
            if add_mean and self.k_mean is not None:
                self.check_quantized()
                dk = (dequantize(self.qk, self.qk_scale, torch.float32) + self.k_mean).to(self.keys.dtype)
            else:
                dk = dequantize(self.qk, self.qk_scale, self.keys.dtype)
            return dk, dequantize(self.qv, self.qv_scale, self.values.dtype)

        def segments(self, recent_k: torch.Tensor, recent_v: torch.Tensor, *, dequant: bool = True,
                     ) -> list[tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None,
                                     torch.Tensor | None]]:
            """Key segments in order ``(k, v, scales, k_mean)``: the sink tokens (if any, model dtype), the old
            tokens (if any), then the recent window.

            ``dequant=True``: the old tokens dequantised in PyTorch (``scales`` None); ``False``: their
            quantized values with ``(k_scale, v_scale)``, for the kernel to dequantise (``HAS_KV_SCALE``).
            ``k_mean``: with K smoothing, the old tokens' keys are ``k - k_mean`` (float32 ``(B, H_kv, 1, D)``)
            and the attention must add ``scale * q·k_mean`` to that segment's lse (the state operator's
            ``k_means``); ``None`` otherwise (and always for the recent window).
            """
            self.check_quantized()
            segs: list[Any] = [(self.sk, self.sv, None, None)] if self.n_sink else []
            if self.n_quant == 0:
                return segs + [(recent_k, recent_v, None, None)]
            if dequant:
                dk, dv = self.dequantized()
                return segs + [(dk, dv, None, self.k_mean), (recent_k, recent_v, None, None)]
            return segs + [(self.qk, self.qv, (self.qk_scale, self.qv_scale), self.k_mean),
                           (recent_k, recent_v, None, None)]

        def bind(self, module: Any) -> None:
            """Tie the layer to the first attention module that reads it (a cache used across models fails)."""
            owner = self._owner() if self._owner is not None else None
            if owner is None:
                self._owner = weakref.ref(module)
            elif owner is not module:
                raise fail("MixedKVCache", "cache", "is used by another model than the one that filled it",
                           f"the module {type(owner).__name__} at 0x{id(owner):x}",
                           f"{type(module).__name__} at 0x{id(module):x}")

        # ------------------------------------------------------------------ generate() helpers
        def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
            for name in ("keys", "values", "sk", "sv", "qk", "qv", "qk_scale", "qv_scale", "k_mean"):
                t = getattr(self, name)
                if t is not None and t.numel() > 0:
                    setattr(self, name, t.index_select(0, beam_idx.to(t.device)))

        def batch_repeat_interleave(self, repeats: int) -> None:
            for name in ("keys", "values", "sk", "sv", "qk", "qv", "qk_scale", "qv_scale", "k_mean"):
                t = getattr(self, name)
                if t is not None and t.numel() > 0:
                    setattr(self, name, t.repeat_interleave(repeats, dim=0))

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            for name in ("keys", "values", "sk", "sv", "qk", "qv", "qk_scale", "qv_scale", "k_mean"):
                t = getattr(self, name)
                if t is not None and t.numel() > 0:
                    setattr(self, name, t[indices, ...])

        def reset(self) -> None:
            super().reset()
            # dropped, not zeroed: some transformers versions' DynamicLayer.reset zeroes the recent keys in place,
            # which would leave their length counted by get_seq_length
            self.keys = self.values = None
            self.is_initialized = False
            self.qk = self.qv = self.qk_scale = self.qv_scale = self.k_mean = None
            self.sk = self.sv = None

        def memory(self) -> dict[str, int]:
            n_s, n_q, n_r = self.n_sink, self.n_quant, self.n_recent
            sink_bytes = _nbytes(self.sk) + _nbytes(self.sv)
            quant_bytes = _nbytes(self.qk) + _nbytes(self.qv)
            scale_bytes = _nbytes(self.qk_scale) + _nbytes(self.qv_scale)
            mean_bytes = _nbytes(self.k_mean)
            recent_bytes = _nbytes(self.keys) + _nbytes(self.values) if n_r else 0
            per_token = (recent_bytes // n_r) if n_r else (sink_bytes // n_s) if n_s else (
                0 if self.qk is None else 2 * self.qk[:, :, :1].numel() * 2)
            return {"sink_tokens": n_s, "quantized_tokens": n_q, "recent_tokens": n_r, "sink_bytes": sink_bytes,
                    "quantized_bytes": quant_bytes, "scale_bytes": scale_bytes, "mean_bytes": mean_bytes,
                    "recent_bytes": recent_bytes, "unquantized_bytes": per_token * (n_s + n_q + n_r)}

    class MixedKVCache(Cache):
        """KV cache: recent ``window`` tokens in the model dtype, older tokens INT8 or FP8 (see the module docstring).

        Args:
            config: the model's config (its text config gives the layer count; its geometry is the
                fingerprint every attention call is checked against).
            window: recent tokens kept unquantized per layer (> 0).
            quant: ``"int8"`` or ``"fp8"`` (e4m3).
            smooth_keys: K smoothing (see the module docstring): quantize ``k - mean`` and correct the
                segment's lse exactly; ``False`` quantizes the keys as they are (the behaviour before it).
            sink_tokens: the first tokens of each layer kept in the model dtype, never quantized (a third
                segment, attended on both routes and merged exactly; >= 0, default 0 (none): on SmolLM2 4 halves
                the per-layer attention error in fp32 on the CPU but lowered greedy agreement on the GPU in bf16,
                docs/STATE.md); ``0`` is bitwise the behaviour before it.
            decode_backend: how decode steps (1..64 new tokens over the cache, no mask or a plain causal
                one) are attended: ``"auto"`` (default) — the split-KV decode kernel reads the quantized
                segment (dequantising in registers, ``return_lse``) and the recent window, merged exactly,
                on CUDA where :func:`sparseattn.ops.decode.decode_refusal` allows (elsewhere the state
                operator as for prefill; a refusal on CUDA warns once); ``"triton"`` — always the decode
                kernels for decode steps (the CPU interpreter under ``TRITON_INTERPRET=1``; a refusal
                raises); ``"off"`` — never (every call through the state operator).

        ``attention_counts`` counts the layer calls per route (``"decode_kernel"``: the decode route;
        ``"segments"``: the state operator) and ``decode_fallbacks`` the decode steps that did not take the
        decode route, per reason.

        Use with ``model.generate(..., past_key_values=MixedKVCache(model.config, ...))`` after
        :func:`~sparseattn.integrations.mixed_cache_attention.enable_mixed_cache` (model).
        """

        def __init__(self, config: Any, *, window: int = 128, quant: str = "int8", decode_backend: str = "auto",
                     smooth_keys: bool = False, sink_tokens: int = 0) -> None:
            fn = "MixedKVCache"
            if config is None or not hasattr(config, "num_hidden_layers") and not hasattr(config, "get_text_config"):
                raise fail(fn, "config", "must be the model's config", "a transformers PretrainedConfig",
                           type(config).__name__)
            if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
                raise fail(fn, "window", "must be a positive integer", "an int > 0 (recent tokens kept)", repr(window))
            if isinstance(sink_tokens, bool) or not isinstance(sink_tokens, int) or sink_tokens < 0:
                raise fail(fn, "sink_tokens", "must be a non-negative integer", "an int >= 0", repr(sink_tokens))
            if quant not in QUANT_MODES:
                raise fail(fn, "quant", "is unknown", f"one of {QUANT_MODES}", repr(quant))
            if quant == "fp8":
                _fp8_dtype()
            if decode_backend not in DECODE_BACKENDS:
                raise fail(fn, "decode_backend", "is unknown", f"one of {DECODE_BACKENDS}", repr(decode_backend))
            if not isinstance(smooth_keys, bool):
                raise fail(fn, "smooth_keys", "must be a bool", "True or False", repr(smooth_keys))
            self.smooth_keys = smooth_keys
            self.sink_tokens = sink_tokens
            self.decode_backend = decode_backend
            self.attention_counts: dict[str, int] = {"decode_kernel": 0, "segments": 0}
            self.decode_fallbacks: dict[str, int] = {}
            self.fingerprint = model_fingerprint(config)
            self._config = config
            self.window = window
            self.quant = quant
            n_layers = self.fingerprint[1]
            if not isinstance(n_layers, int) or n_layers <= 0:
                raise fail(fn, "config", "has no num_hidden_layers", "a positive layer count", repr(n_layers))
            layers = [MixedLayer(window, quant, smooth_keys, sink_tokens) for _ in range(n_layers)]
            for layer in layers:
                layer._cache = weakref.proxy(self)
            super().__init__(layers=layers)
            self._warned = False

        def _mixed_mode(self) -> bool:
            impl = getattr(self._config, "_attn_implementation", None)
            if impl == ATTN_NAME_MIXED:
                return True
            if not self._warned:
                self._warned = True
                warnings.warn(f"MixedKVCache: the model's attention implementation is {impl!r}, not "
                              f"{ATTN_NAME_MIXED!r}: update() returns the whole dequantised KV and the model's own "
                              "attention reads it (no state operator). Call "
                              "sparseattn.integrations.mixed_cache_attention.enable_mixed_cache(model) first.",
                              RuntimeWarning, stacklevel=3)
            return False

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
                   **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or not 0 <= layer_idx < len(self.layers):
                raise fail("MixedKVCache.update", "layer_idx", "is out of range (a cache used across models?)",
                           f"0 <= layer_idx < {len(self.layers)}", repr(layer_idx))
            return self.layers[layer_idx].update(key_states, value_states, mixed=self._mixed_mode())

        def check_model(self, module: Any) -> None:
            """Raise if ``module`` (an attention layer) belongs to a model of another geometry."""
            cfg = getattr(module, "config", None)
            if cfg is not None and model_fingerprint(cfg) != self.fingerprint:
                raise fail("MixedKVCache", "cache", "was built for another model",
                           f"fingerprint {self.fingerprint}", f"{model_fingerprint(cfg)}")

        def memory_report(self) -> dict[str, Any]:
            """Token counts and bytes: quantized data + scales (+ the key means) vs the same tokens in the model dtype."""
            per = [layer.memory() for layer in self.layers]
            tot = {k: sum(p[k] for p in per) for k in per[0]} if per else {}
            used = (tot.get("sink_bytes", 0) + tot.get("quantized_bytes", 0) + tot.get("scale_bytes", 0) + tot.get("mean_bytes", 0)
                    + tot.get("recent_bytes", 0))
            full = tot.get("unquantized_bytes", 0)
            return {"quant": self.quant, "window": self.window, "smooth_keys": self.smooth_keys,
                    "sink_tokens_max": self.sink_tokens, "layers": len(per),
                    **tot, "bytes_used": used,
                    "bytes_saved": full - used, "ratio": (used / full) if full else math.nan, "per_layer": per}

    return MixedLayer, MixedKVCache


_CLASSES: tuple[type, type] | None = None


def __getattr__(name: str) -> Any:  # lazy: transformers is imported on first access
    global _CLASSES
    if name in ("MixedKVCache", "MixedLayer"):
        if _CLASSES is None:
            _CLASSES = _build_classes()
        return _CLASSES[0] if name == "MixedLayer" else _CLASSES[1]
    raise AttributeError(name)
