"""Model introspection shared by the integration, tuning and evaluation (imports no transformers)."""

from __future__ import annotations

import torch

from sparseattn._validation import fail

__all__ = ["attention_layers", "require_attention_layers"]


def attention_layers(model: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
    """``(layer_idx, module)`` for every attention module of a transformers model, by layer index."""
    found: dict[int, torch.nn.Module] = {}
    for _, mod in model.named_modules():
        idx = getattr(mod, "layer_idx", None)
        if isinstance(idx, int) and not isinstance(idx, bool) and type(mod).__name__.endswith("Attention") \
                and hasattr(mod, "config"):
            found.setdefault(idx, mod)
    return sorted(found.items())


def require_attention_layers(func: str, model: torch.nn.Module) -> list[int]:
    """The attention layer indices of ``model`` (:func:`attention_layers`); ``ValueError`` when it has none."""
    layers = [i for i, _ in attention_layers(model)]
    if not layers:
        raise fail(func, "model", "has no attention layers", "a transformers decoder", type(model).__name__)
    return layers
