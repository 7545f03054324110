"""A dense query tail over any predictor: the last query tokens of every prediction attend every causal block.

``patch_model(..., dense_tail=N)`` wraps each sparse layer's predictor (per-head ones included) in
:class:`DenseTailPredictor`. A prompt that ends in a question (retrieval, RULER, chat) has its first answer token
decided by the last position's attention, and the decode steps read the tail's keys and values last; a sparse
prefill that is exact there loses far less of the answer than its block sparsity suggests (docs/RULER.md, "Dense
tail"). The cost is about ``N / seqlen`` of the causal blocks per call.
"""

from __future__ import annotations

from typing import Any

import torch

from sparseattn._validation import check_nonneg_int, fail
from sparseattn.layout.block_layout import BlockLayout
from sparseattn.predictors.base import graph_layer_key, graph_refusal

__all__ = ["DenseTailPredictor"]


class DenseTailPredictor:
    """``inner``'s layouts with the query blocks holding the last ``rows`` query tokens on their whole causal row.

    Everything else (``name``, ``config``, ``pv_threshold_for``, the graph capabilities, a tuned predictor's
    attributes) is ``inner``'s, so routes and reports treat the wrapped predictor as the one it wraps.
    """

    def __init__(self, inner: Any, rows: int) -> None:
        if isinstance(inner, DenseTailPredictor):
            raise fail("DenseTailPredictor", "inner", "is already a DenseTailPredictor", "a predictor",
                       f"DenseTailPredictor(rows={inner.rows})")
        self.inner = inner
        self.rows = check_nonneg_int("DenseTailPredictor", "rows", rows)

    def __getattr__(self, name: str) -> Any:  # only reached for attributes this wrapper does not define
        if name == "inner":  # not set yet (copy / unpickle): no recursion through self.inner
            raise AttributeError(name)
        return getattr(self.inner, name)

    def predict(self, q: torch.Tensor, k: torch.Tensor, *, causal: bool = True, layer: int | None = None) -> BlockLayout:
        layout = self.inner.predict(q, k, causal=causal, layer=layer)
        if not isinstance(layout, BlockLayout):  # the caller's check names predictor.predict
            return layout
        return layout.with_dense_tail(self.rows, causal=causal)

    def reset(self) -> None:
        self.inner.reset()

    def graph_refusal(self, layer: int | None) -> str | None:
        return graph_refusal(self.inner, layer)

    def graph_layer_key(self, layer: int | None) -> Any:
        return graph_layer_key(self.inner, layer)

    def __repr__(self) -> str:
        return f"DenseTailPredictor({self.inner!r}, rows={self.rows})"
