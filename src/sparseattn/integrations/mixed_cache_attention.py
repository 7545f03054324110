"""The ``"sparseattn_mixed"`` attention implementation: transformers attention over a :class:`MixedKVCache`.

:func:`enable_mixed_cache` registers the function with transformers' ``AttentionInterface`` (mask
builder: transformers' ``sdpa_mask``, a bool mask or ``None``) and switches the model to it. In every
attention layer the function receives the key/value tensors ``MixedKVCache.update`` returned (the
recent window, tagged with its cache layer) and computes attention through the state operator
(:func:`sparseattn.state.segmented.attention_over_segments`):

0. the sink segment (the cache's ``sink_tokens`` first tokens, model dtype, ``kv_offset=0``) if it holds any,
   its raw state carried into
1. the quantized segment (old tokens), attended with ``kv_offset = n_sink``: when the Triton kernel runs the
   layer (CUDA, fp16/bf16 queries, head_dim 64/128/256; fp8 on sm_89+) its int8/fp8 values and scales
   go to the kernel, which **dequantises in registers** (``HAS_KV_SCALE``); otherwise they are
   **dequantised in PyTorch** to the model dtype right before the PyTorch loop. With K smoothing the
   segment's keys are ``k - μ`` and its ``k_means`` entry (``μ``) makes the state operator add
   ``scale·q·μ`` back to the segment's state (exact). Its raw state ``(m, l, acc)`` is carried into
2. the recent segment (model dtype, ``kv_offset = n_sink + n_quantized``), which finalises ``(out, lse)``.

**Decode steps** (1..64 new tokens over a non-empty cache, no mask or a plain bottom-right causal one;
on a sliding-window layer one token) take the decode route instead, where the cache's
``decode_backend`` allows (``"auto"``: CUDA and the registry choosing the Triton decode operator,
:func:`sparseattn.ops.decode.decode_choice`, whose refusal is :func:`~sparseattn.ops.decode.decode_refusal`;
``"triton"``: always; ``"off"``: never): the quantized segment goes to the split-KV decode kernel
(:func:`sparseattn.ops.decode.decode_attention` with ``k_scale``/``v_scale``, ``causal=False`` — every
new token attends every old one — ``return_lse``), which reads the int8/fp8 bytes and dequantises in
registers (with K smoothing its lse gets ``scale·q·μ`` added, per query row and head); the sink segment (if
any) goes to the same kernel (float, ``causal=False``) and the recent window too (bottom-right causal); the
two or three ``(out, lse)`` are merged exactly (:func:`sparseattn.state.merge_states`). Prefill and chunked-prefill calls (more than 64
queries, or no cache yet) keep the state-operator path above. A decode step that cannot take the
route (a padding mask, a multi-token step on a sliding-window layer that does not cover the cache, the
kernel refusing the inputs on CUDA) is counted per reason in the cache's ``decode_fallbacks`` and,
on CUDA or with ``decode_backend="triton"``, warned about once per reason.

``LAST_DEQUANT`` records where the last call dequantised (``"kernel"``: the prefill kernel,
``"decode_kernel"``: the decode kernel, ``"torch"``: PyTorch, or ``None``: no quantized tokens attended)
— for tests and reports.

Masks: with no mask (``sdpa_mask`` skipped it) the queries are the last ``N_q`` positions (causal,
bottom-right) and the layer's ``sliding_window`` is applied; a given bool mask ``(B, 1, N_q, N_kv)``
becomes an additive float mask, sliced per segment. On CUDA fp16/bf16 with a supported head_dim the
Triton kernel runs each segment (``HAS_STATE``, ``HAS_FLOAT_MASK``); otherwise the PyTorch loop.
Key/value tensors without the tag (another cache, or no cache) are attended as one segment.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from sparseattn._validation import fail

__all__ = ["ATTN_NAME_MIXED", "mixed_attention_forward", "register_mixed_attention", "enable_mixed_cache"]

ATTN_NAME_MIXED = "sparseattn_mixed"
_REGISTERED = False
LAST_DEQUANT: list[str | None] = [None]  # overwritten (never grown) by each call
_WARNED: set[str] = set()
_MASK_VERDICTS: dict[tuple[Any, ...], tuple[bool, torch.Tensor]] = {}  # (mask identity, geometry) -> (plain causal?, mask)
_MASK_VERDICTS_MAX = 16


def _float_mask(mask: torch.Tensor, total: int, dtype: torch.dtype) -> torch.Tensor:
    if mask.dim() != 4:
        raise fail("sparseattn_mixed", "attention_mask", "has the wrong rank", "4 dims (B, 1|H, N_q, N_kv)",
                   tuple(mask.shape))
    if mask.shape[-1] < total:
        raise fail("sparseattn_mixed", "attention_mask", "covers fewer keys than the cache holds", f">= {total} keys",
                   mask.shape[-1])
    mask = mask[..., :total]
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, -math.inf)
    return mask.to(dtype)


def mixed_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                            sliding_window: int | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function: ``query (B, H, N_q, D)`` → ``(out (B, N_q, H, D), None)``."""
    from sparseattn.state.kv_cache import MIXED_TAG
    from sparseattn.state.segmented import attention_over_segments

    if getattr(getattr(module, "config", None), "attn_logit_softcapping", None) is not None:
        raise NotImplementedError("sparseattn_mixed: attention logit soft-capping is not supported")
    if dropout and module.training:
        raise NotImplementedError("sparseattn_mixed: attention dropout (training) is not supported")
    layer = getattr(key, MIXED_TAG, None)
    if layer is not None:
        cache = getattr(layer, "_cache", None)
        if cache is not None:
            cache.check_model(module)
        layer.bind(module)
        out = _decode_step(module, query, key, value, layer, cache, attention_mask, scaling, sliding_window, kwargs)
        if out is not None:
            return out, None
        if cache is not None:
            cache.attention_counts["segments"] = cache.attention_counts.get("segments", 0) + 1
        segs = layer.segments(key, value, dequant=not _kernel_runs(query, layer))
    else:
        segs = [(key, value, None, None)]
    if layer is None or layer.n_quant == 0:
        LAST_DEQUANT[0] = None
    else:
        LAST_DEQUANT[0] = "kernel" if any(sc is not None for _, _, sc, _ in segs) else "torch"
    scales = [sc for _, _, sc, _ in segs]
    means = [mu for _, _, _, mu in segs]  # K smoothing: the quantized segment's key mean (its lse is corrected)
    ks, vs = [k for k, _, _, _ in segs], [v for _, v, _, _ in segs]
    total = sum(int(k.shape[2]) for k in ks)
    if attention_mask is not None:
        fm = _float_mask(attention_mask, total, query.dtype if query.dtype != torch.float64 else torch.float64)
        masks, pos = [], 0
        for k in ks:
            masks.append(fm[..., pos:pos + int(k.shape[2])])
            pos += int(k.shape[2])
        res = attention_over_segments(query, ks, vs, causal=False, attn_masks=masks, scale=scaling, kv_scales=scales,
                                      k_means=means)
    else:
        window = sliding_window if isinstance(sliding_window, int) and sliding_window > 0 else None
        res = attention_over_segments(query, ks, vs, causal=True, scale=scaling, sliding_window=window,
                                      kv_scales=scales, k_means=means)
    return res.out.transpose(1, 2).contiguous(), None


def _plain_causal(mask: torch.Tensor, nq: int, nkv: int, window: int | None) -> bool:
    """Whether ``mask`` (bool, or float with 0 = attend; ``(B, 1|H, N_q, >= N_kv)``) is the plain bottom-right
    causal mask (+ window) over ``nkv`` keys. One host read per mask object (cached while the object lives:
    transformers builds one mask per forward and shares it across layers)."""
    if mask.dim() != 4 or mask.shape[-2] != nq or mask.shape[-1] < nkv:
        return False
    key = (id(mask), mask.data_ptr(), mask._version, tuple(mask.shape), nq, nkv, window)
    hit = _MASK_VERDICTS.get(key)
    if hit is not None and hit[1] is mask:
        return hit[0]
    from sparseattn.integrations.masks import _causal_equivalent

    verdict = _causal_equivalent(mask, nq, nkv, window)  # the one host read
    if len(_MASK_VERDICTS) >= _MASK_VERDICTS_MAX:
        _MASK_VERDICTS.clear()
    _MASK_VERDICTS[key] = (verdict, mask)  # holding the mask keeps its id from being reused while cached
    return verdict


def _decode_fallback(cache: Any, reason: str, loud: bool) -> None:
    if cache is not None:
        cache.decode_fallbacks[reason] = cache.decode_fallbacks.get(reason, 0) + 1
    if loud and reason not in _WARNED:
        _WARNED.add(reason)
        warnings.warn(f"sparseattn_mixed: a decode step did not take the decode-kernel route ({reason}); it runs "
                      "through the state operator (the prefill path) instead", RuntimeWarning, stacklevel=4)


def _decode_step(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer: Any, cache: Any,
                 attention_mask: torch.Tensor | None, scaling: float | None, sliding_window: Any,
                 kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The decode route (see the module docstring): ``(B, N_q, H, D)`` output, or ``None`` for the other path."""
    from sparseattn.ops.decode import MAX_DECODE_QUERIES, decode_attention, decode_choice

    mode = getattr(cache, "decode_backend", "auto") if cache is not None else "auto"
    if mode == "off":
        return None
    nq, n_r, n_q, n_s = int(query.shape[2]), int(key.shape[2]), layer.n_quant, layer.n_sink
    total = n_s + n_q + n_r
    if nq > MAX_DECODE_QUERIES or nq >= total:
        return None  # prefill / chunked prefill (or the first call on an empty cache): the state operator
    forced = mode == "triton"
    loud = forced or query.is_cuda
    if not forced:
        if not query.is_cuda:
            return None  # "auto" off CUDA: the state operator (its PyTorch loop), as before
        op, why = decode_choice(query, "auto", layer.qk.dtype if n_q else None,
                                names=("decode_triton", "decode_reference"))
        if op is None or op.name != "decode_triton":  # the registry passed the kernel over: why is its refusal
            _decode_fallback(cache, f"kernel refused: {why}", loud)
            return None
    window = sliding_window if isinstance(sliding_window, int) and not isinstance(sliding_window, bool) \
        and sliding_window > 0 and sliding_window < total else None
    if window is not None and nq > 1:
        _decode_fallback(cache, "sliding_window (a multi-token step on a window layer)", loud)
        return None
    if kwargs.get("s_aux") is not None:
        _decode_fallback(cache, "attention_sinks", loud)
        return None
    if attention_mask is not None:
        if query.is_cuda and torch.cuda.is_current_stream_capturing():
            _decode_fallback(cache, "attention_mask (cannot be checked during a CUDA graph capture)", loud)
            return None
        if not _plain_causal(attention_mask, nq, total, window):
            _decode_fallback(cache, "attention_mask (not plain causal: padding or a custom mask)", loud)
            return None
    backend = "triton" if forced else "auto"
    states = []
    n_old = n_q if window is None else min(n_q, max(0, window - n_r))  # quantized keys attended (the newest ones)
    n_sink = n_s if window is None else min(n_s, max(0, window - n_r - n_q))  # sink keys attended (the newest ones)
    if n_sink > 0:  # the sink tokens (model dtype): every new token attends them
        states.append(decode_attention(query, layer.sk[:, :, n_s - n_sink:], layer.sv[:, :, n_s - n_sink:],
                                       scale=scaling, causal=False, return_lse=True, backend=backend))
    rk, rv = (key, value) if window is None or window >= n_r else (key[:, :, n_r - window:], value[:, :, n_r - window:])
    if n_old > 0:
        layer.check_quantized()
        a = n_q - n_old
        st = decode_attention(query, layer.qk[:, :, a:], layer.qv[:, :, a:], k_scale=layer.qk_scale[:, :, a:],
                              v_scale=layer.qv_scale[:, :, a:], scale=scaling, causal=False,
                              return_lse=True, backend=backend)
        if layer.k_mean is not None:  # smoothed keys (k - mean): the segment's lse lacks scale·q·mean
            from sparseattn.state.segmented import key_mean_lse_shift
            from sparseattn.state.types import AttentionState

            st = AttentionState(st.out, st.lse + key_mean_lse_shift(query, layer.k_mean, scaling).to(st.lse.dtype))
        states.append(st)
    states.append(decode_attention(query, rk, rv, scale=scaling, return_lse=True, backend=backend))
    if len(states) == 1:
        out = states[0].out
    else:
        from sparseattn.state.merge import merge_states

        out = merge_states(states, backend=backend).out  # "auto": the fused Triton merge on CUDA
    LAST_DEQUANT[0] = "decode_kernel" if n_old > 0 else None
    if cache is not None:
        cache.attention_counts["decode_kernel"] = cache.attention_counts.get("decode_kernel", 0) + 1
    return out.transpose(1, 2).contiguous()


def _kernel_runs(query: torch.Tensor, layer: Any) -> bool:
    """Whether attention_with_state's "auto" backend will run the Triton kernel (it then dequantises)."""
    if not query.is_cuda:
        return False
    from sparseattn.ops import triton_launch

    if triton_launch.refusal(query, causal=True) is not None:
        return False
    return layer.quant == "int8" or torch.cuda.get_device_capability(query.device) >= (8, 9)


def register_mixed_attention() -> None:
    """Register ``"sparseattn_mixed"`` with transformers (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTN_NAME_MIXED, mixed_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_NAME_MIXED, sdpa_mask)
    _REGISTERED = True


def enable_mixed_cache(model: Any) -> str:
    """Register and switch ``model`` to ``"sparseattn_mixed"``; returns the previous implementation name."""
    if not hasattr(model, "set_attn_implementation") or not hasattr(model, "config"):
        raise fail("enable_mixed_cache", "model", "is not a transformers PreTrainedModel",
                   "a model with set_attn_implementation", type(model).__name__)
    register_mixed_attention()
    prev = model.config._attn_implementation
    model.set_attn_implementation(ATTN_NAME_MIXED)
    return prev
