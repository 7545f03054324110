"""The ``"sparseattn_mixed"`` attention implementation: transformers attention over a :class:`MixedKVCache`.

:func:`enable_mixed_cache` registers the function with transformers' ``AttentionInterface`` (mask
builder: transformers' ``sdpa_mask``, a bool mask or ``None``) and switches the model to it. In every
attention layer the function receives the key/value tensors ``MixedKVCache.update`` returned (the
recent window, tagged with its cache layer) and computes attention through the state operator
(:func:`sparseattn.state.segmented.attention_over_segments`):

1. the quantized segment (old tokens), attended with ``kv_offset=0``: when the Triton kernel runs the
   layer (CUDA, fp16/bf16 queries, head_dim 64/128/256; fp8 on sm_89+) its int8/fp8 values and scales
   go to the kernel, which **dequantises in registers** (``HAS_KV_SCALE``); otherwise they are
   **dequantised in PyTorch** to the model dtype right before the PyTorch loop. Its raw state
   ``(m, l, acc)`` is carried into
2. the recent segment (model dtype, ``kv_offset = n_quantized``), which finalises ``(out, lse)``.

``LAST_DEQUANT`` records where the last call dequantised (``"kernel"``, ``"torch"`` or ``None``: no
quantized tokens) — for tests and reports.

Masks: with no mask (``sdpa_mask`` skipped it) the queries are the last ``N_q`` positions (causal,
bottom-right) and the layer's ``sliding_window`` is applied; a given bool mask ``(B, 1, N_q, N_kv)``
becomes an additive float mask, sliced per segment. On CUDA fp16/bf16 with a supported head_dim the
Triton kernel runs each segment (``HAS_STATE``, ``HAS_FLOAT_MASK``); otherwise the PyTorch loop.
Key/value tensors without the tag (another cache, or no cache) are attended as one segment.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from sparseattn._validation import fail

__all__ = ["ATTN_NAME_MIXED", "mixed_attention_forward", "register_mixed_attention", "enable_mixed_cache"]

ATTN_NAME_MIXED = "sparseattn_mixed"
_REGISTERED = False
LAST_DEQUANT: list[str | None] = [None]  # overwritten (never grown) by each call


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
        segs = layer.segments(key, value, dequant=not _kernel_runs(query, layer))
    else:
        segs = [(key, value, None)]
    LAST_DEQUANT[0] = (None if len(segs) == 1 else ("torch" if segs[0][2] is None else "kernel"))
    scales = [sc for _, _, sc in segs]
    total = sum(int(k.shape[2]) for k, _, _ in segs)
    if attention_mask is not None:
        fm = _float_mask(attention_mask, total, query.dtype if query.dtype != torch.float64 else torch.float64)
        masks, pos = [], 0
        for k, _, _ in segs:
            masks.append(fm[..., pos:pos + int(k.shape[2])])
            pos += int(k.shape[2])
        res = attention_over_segments(query, [k for k, _, _ in segs], [v for _, v, _ in segs], causal=False,
                                      attn_masks=masks, scale=scaling, kv_scales=scales)
    else:
        window = sliding_window if isinstance(sliding_window, int) and sliding_window > 0 else None
        res = attention_over_segments(query, [k for k, _, _ in segs], [v for _, v, _ in segs], causal=True,
                                      scale=scaling, sliding_window=window, kv_scales=scales)
    return res.out.transpose(1, 2).contiguous(), None


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
