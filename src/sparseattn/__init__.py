"""sparseattn — block-sparse attention that is fast and says what it costs.

The top-level import is light: no Triton kernel, transformers or matplotlib is imported and CUDA
is not initialised until a function that needs it runs.
"""

from sparseattn.eval.metrics import precision_metric
from sparseattn.layout import (
    BlockLayout,
    RowBounds,
    block_diagonal_layout,
    causal_layout,
    dense_layout,
    document_layout,
    layout_from_flex_block_mask,
    layout_from_mask,
    layout_from_topk,
    layout_to_flex_block_mask,
    layout_to_mask,
    layout_to_topk,
    make_pattern,
    prefix_lm_layout,
    random_layout,
    sink_window_layout,
    sliding_window_band_layout,
    sliding_window_layout,
    strided_layout,
)
from sparseattn.ops.attention import attention, block_sparse_attention
from sparseattn.ops.reference import reference_attention
from sparseattn.state.types import AttentionState
from sparseattn.state.merge import merge_state, merge_states, segmented_attention

from sparseattn._version import __version__

__all__ = [
    "__version__",
    "AttentionState",
    "BlockLayout",
    "attention",
    "block_sparse_attention",
    "reference_attention",
    "merge_state",
    "merge_states",
    "segmented_attention",
    "precision_metric",
    "make_pattern",
    "dense_layout",
    "causal_layout",
    "sliding_window_layout",
    "sliding_window_band_layout",
    "strided_layout",
    "random_layout",
    "block_diagonal_layout",
    "sink_window_layout",
    "RowBounds",
    "document_layout",
    "prefix_lm_layout",
    "layout_from_mask",
    "layout_to_mask",
    "layout_from_topk",
    "layout_to_topk",
    "layout_to_flex_block_mask",
    "layout_from_flex_block_mask",
]
