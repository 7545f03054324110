"""Model introspection shared by the integration, tuning and evaluation (imports no transformers)."""

from __future__ import annotations

import torch

from sparseattn._validation import fail

__all__ = ["attention_layers", "decoder_layers", "require_attention_layers"]


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


def decoder_layers(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """``{layer_idx: decoder layer}``: the direct parent of each attention module of :func:`attention_layers`.

    Empty when a parent is missing or shared, or when the parents do not appear in the model's module order by
    layer index (so a caller cannot assume that layer ``i`` runs before layer ``i + 1``).
    """
    attn = dict(attention_layers(model))
    owner = {id(m): i for i, m in attn.items()}
    found: dict[int, torch.nn.Module] = {}
    order: list[int] = []
    for _, mod in model.named_modules():
        for child in mod.children():
            i = owner.get(id(child))
            if i is not None and i not in found:
                found[i] = mod
                order.append(i)
    if not attn or sorted(found) != sorted(attn) or order != sorted(order) \
            or len({id(m) for m in found.values()}) != len(found):
        return {}
    return dict(sorted(found.items()))
