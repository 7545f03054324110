"""Attention-mask checks of the model integration: is transformers' mask plain causal (+ window), or the
packed-sequence (document) mask of ``position_ids``? And the window mask the model's own attention needs when
our mask builder skipped it. Device ops only; the callers decide where the one host read happens.
"""

from __future__ import annotations

from typing import Any

import torch

from sparseattn.layout.masks import token_causal_mask

__all__ = ["_causal_equivalent", "_causal_match", "_window_mask", "_packed_documents", "_packed_match"]


def _causal_equivalent(mask: torch.Tensor, nq: int, nkv: int, window: int | None = None) -> bool:
    """Whether ``mask`` (bool, or float with 0 = attend) is the plain causal mask (+ the sliding window)."""
    return bool(_causal_match(mask, nq, nkv, window))  # the one host read, once per mask object and forward (cached)


def _causal_match(mask: torch.Tensor, nq: int, nkv: int, window: int | None = None) -> torch.Tensor:
    """0-dim bool tensor: ``mask`` equals the plain causal mask (+ window) (no host read)."""
    m = mask[..., :nkv]
    allowed = m if m.dtype == torch.bool else (m == 0)
    causal = token_causal_mask(nq, nkv, window, m.device)
    return (allowed == causal).all()


def _window_mask(nq: int, nkv: int, window: int, device: torch.device) -> torch.Tensor:
    """Bool ``(1, 1, N_q, N_kv)`` causal sliding-window mask (for the model's own attention on a window layer)."""
    return token_causal_mask(nq, nkv, window, device)[None, None]


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
    expect = token_causal_mask(nq, nq, window, m.device) & (docs[:, None, :, None] == docs[:, None, None, :])
    return (allowed == expect).all()

