"""Registration with transformers: the ``"sparseattn"`` / ``"sparseattn_eager"`` attention functions of
``AttentionInterface`` and their mask builders (transformers' ``sdpa_mask`` that may skip a cache-free prefill's
causal / sliding-window mask, see :func:`_prefill_mask`). The attention function hands each call to the layer's
:class:`~sparseattn.integrations.handle.PatchHandle` (set on the module by ``patch_model``).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

__all__ = ["ATTN_NAME", "ATTN_NAME_EAGER", "register_attention"]

ATTN_NAME = "sparseattn"
ATTN_NAME_EAGER = "sparseattn_eager"
_HANDLE_ATTR = "_sparseattn_handle"
_LAYER_ATTR = "_sparseattn_layer"


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

