"""Record post-RoPE Q/K/V of chosen layers during a prefill forward pass."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch

from sparseattn.integrations.transformers_patch import get_handle, patch_model

__all__ = ["capture_qkv"]


@contextlib.contextmanager
def capture_qkv(model: torch.nn.Module, layers: Iterable[int] | None = None, *,
                device: str | torch.device | None = "cpu") -> Iterator[dict[int, dict[str, torch.Tensor]]]:
    """Record the post-RoPE ``q``, ``k``, ``v`` that the attention registry receives.

    Works on a patched model (its handle records them, sparse layers stay sparse) or an unpatched
    one (patched densely for the duration, then restored exactly).

    Args:
        model: a transformers model.
        layers: layer indices to record (all when None).
        device: where the copies go (``None`` keeps the model's device).

    Yields:
        ``{layer: {"q": (B, H, N, D), "k": (B, H_kv, N, D), "v": (B, H_kv, N, D)}}``, filled by
        prefill calls (``N_q == N_kv``) made inside the block.

    Example::

        with capture_qkv(model, layers=[0, 15]) as qkv:
            model(input_ids)
        q = qkv[15]["q"]
    """
    handle = get_handle(model)
    own = handle is None
    if own:
        handle = patch_model(model)
    try:
        with handle.capture(layers, device=device) as store:
            yield store
    finally:
        if own:
            handle.unpatch()
