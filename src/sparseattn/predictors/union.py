"""Union of predictors: a block is kept when any member keeps it.

Spec: ``union:<spec>+<spec>[+...]``, each member any spec :func:`~sparseattn.predictors.resolve.resolve_predictor`
takes (for instance ``union:mean_sim:score=mixed,cdf_threshold=0.9,keep_local=8,sim_threshold=0+sampled:
rows_per_block=16,cdf_threshold=0.93,keep_local=8``). Two block scores that err on different blocks cover each
other; the price is the blocks only one of them wanted (the union is at most as sparse as its densest member).

The members' layouts must share batch, heads, block sizes and lengths (checked on every call: a clear error, never a
silently misaligned mask). The union goes through the dense block mask (``[B, H, Mb, Nb]`` booleans) and back, with
no host synchronisation. ``last_scores`` is ``None`` (the members keep theirs); ``reset`` resets every member.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sparseattn._validation import fail
from sparseattn.layout.block_layout import BlockLayout
from sparseattn.predictors._common import mask_to_layout

__all__ = ["UnionConfig", "UnionPredictor", "split_union_spec"]


@dataclass(frozen=True)
class UnionConfig:
    """The member specs (as given), for reports; ``pv_threshold`` is never set by a union."""

    members: tuple[str, ...]
    version: int = 1


class UnionPredictor:
    """Keeps a block when any of ``members`` keeps it.

    Args:
        members: two or more predictors (objects with ``predict`` and ``reset``).
        specs: their spec strings, for :attr:`config` (default: the members' names).
    """

    name = "union"

    def __init__(self, members: list[Any] | tuple[Any, ...], specs: list[str] | tuple[str, ...] | None = None) -> None:
        fn = "UnionPredictor"
        if not isinstance(members, (list, tuple)) or len(members) < 2:
            raise fail(fn, "members", "must hold at least two predictors", "a list of >= 2 predictors",
                       repr(members))
        for i, m in enumerate(members):
            if not (hasattr(m, "predict") and hasattr(m, "reset")):
                raise fail(fn, f"members[{i}]", "is not a predictor", "an object with predict() and reset()",
                           type(m).__name__)
        self.members = tuple(members)
        names = tuple(specs) if specs is not None else tuple(getattr(m, "name", type(m).__name__) for m in members)
        self.config = UnionConfig(members=names)
        self.last_scores: torch.Tensor | None = None

    def predict(self, q: torch.Tensor, k: torch.Tensor, *, causal: bool = True, layer: int | None = None) -> BlockLayout:
        layouts = [m.predict(q, k, causal=causal, layer=layer) for m in self.members]
        first = layouts[0]
        key = (first.batch, first.heads, first.block_m, first.block_n, first.seqlen_q, first.seqlen_kv)
        mask = first.to_dense_mask()
        for i, lay in enumerate(layouts[1:], start=1):
            other = (lay.batch, lay.heads, lay.block_m, lay.block_n, lay.seqlen_q, lay.seqlen_kv)
            if other != key:
                raise fail("UnionPredictor.predict", f"members[{i}]'s layout",
                           "does not match the first member's (batch, heads, block_m, block_n, seqlen_q, seqlen_kv)",
                           key, other)
            mask = mask | lay.to_dense_mask()
        return mask_to_layout(mask, block_m=first.block_m, block_n=first.block_n, seqlen_q=first.seqlen_q,
                              seqlen_kv=first.seqlen_kv)

    def reset(self) -> None:
        for m in self.members:
            m.reset()


def split_union_spec(rest: str, func: str) -> list[str]:
    """The member specs of ``union:<spec>+<spec>...`` (``rest`` is the text after ``union:``); the resolver turns each
    into a predictor (this module does not import it: no import cycle)."""
    parts = [p.strip() for p in rest.split("+")]
    if len(parts) < 2 or any(not p for p in parts):
        raise fail(func, "union spec", "must join two or more predictor specs with '+'",
                   "'union:<spec>+<spec>'", repr("union:" + rest))
    return parts
