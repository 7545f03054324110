"""Attention-mask checks of the model integration: is transformers' mask plain causal (+ window), or the
packed-sequence (document) mask of ``position_ids``? And the window mask the model's own attention needs when
our mask builder skipped it. Device ops only; the callers decide where the one host read happens.
"""

from __future__ import annotations

from typing import Any

import torch

from sparseattn.layout.block_layout import BlockLayout
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


def document_sink_mask(docs: torch.Tensor, num_q_blocks: int, num_kv_blocks: int, block_m: int,
                       block_n: int) -> torch.Tensor:
    """``[B, 1, Mb, Nb]`` bool: for every query block, the key block holding the first token of each document in it.

    Depends on the documents and the block geometry only, so a packed forward builds it once and every
    sparse layer ORs it into its predicted layout (:func:`document_sink_blocks`). Device ops only.
    """
    B, N = docs.shape
    pos = torch.arange(N, device=docs.device)
    new = torch.ones_like(docs, dtype=torch.bool)
    new[:, 1:] = docs[:, 1:] != docs[:, :-1]
    start = torch.cummax(torch.where(new, pos, torch.zeros_like(pos)), dim=-1).values  # first token of each row's doc
    add = torch.zeros(B, num_q_blocks, num_kv_blocks, dtype=torch.bool, device=docs.device)
    add[torch.arange(B, device=docs.device)[:, None], pos[None, :] // block_m, start // block_n] = True
    return add[:, None]


def document_sink_blocks(layout: BlockLayout, docs: torch.Tensor) -> BlockLayout:
    """``layout`` plus, for every query block, the key block holding the first token of each document in it.

    A predictor sees a packed row as one sequence: its forced sink is the row's first block, which the
    document mask then removes for every document but the first, so later documents lose the attention
    sink their rows put most weight on (SmolLM2, 4 documents in 8K: top-1 89.7% against each document run
    alone, one position at logits cosine 0.03; the exact all-blocks path 97.5%). Each document's own first
    block is its sink; adding it keeps the layout inside the causal region (a start is never after its rows).
    Device ops only; the layout's block geometry is kept.
    """
    B = docs.shape[0]
    mask = layout.to_dense_mask()  # (B or 1, H, Mb, Nb)
    add = document_sink_mask(docs, mask.shape[-2], mask.shape[-1], layout.block_m, layout.block_n)
    if mask.shape[0] == 1 and B > 1:  # one layout for the batch, documents per row: one layout per row
        mask = mask.expand(B, *mask.shape[1:])
    mask = mask | add  # (docs of one row broadcast over a batched layout)
    return BlockLayout.from_dense_mask(mask, block_m=layout.block_m, block_n=layout.block_n,
                                       seqlen_q=layout.seqlen_q, seqlen_kv=layout.seqlen_kv)


def _packed_match(mask: torch.Tensor, docs: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """0-dim bool tensor: ``mask`` equals causal (+ window) attention inside each packed document (no host read)."""
    nq = docs.shape[-1]
    m = mask[..., :nq]
    allowed = m if m.dtype == torch.bool else (m == 0)
    expect = token_causal_mask(nq, nq, window, m.device) & (docs[:, None, :, None] == docs[:, None, None, :])
    return (allowed == expect).all()

