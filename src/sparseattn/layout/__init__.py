"""Block layouts, static patterns and conversions."""

from sparseattn.layout.block_layout import BlockLayout, causal_block_region
from sparseattn.layout.convert import (
    layout_from_flex_block_mask,
    layout_from_mask,
    layout_from_topk,
    layout_to_flex_block_mask,
    layout_to_mask,
    layout_to_topk,
)
from sparseattn.layout.patterns import (
    PATTERNS,
    RowBounds,
    block_diagonal_layout,
    causal_layout,
    dense_layout,
    document_layout,
    document_row_bounds,
    make_pattern,
    pattern_at_density,
    prefix_lm_layout,
    prefix_lm_row_bounds,
    random_layout,
    row_bounds_layout,
    sink_window_layout,
    sliding_window_band_layout,
    sliding_window_layout,
    strided_layout,
)

__all__ = [
    "BlockLayout", "causal_block_region",
    "layout_from_mask", "layout_to_mask", "layout_from_topk", "layout_to_topk",
    "layout_to_flex_block_mask", "layout_from_flex_block_mask",
    "PATTERNS", "make_pattern", "pattern_at_density", "dense_layout", "causal_layout", "sliding_window_layout",
    "sliding_window_band_layout", "strided_layout",
    "random_layout", "block_diagonal_layout", "sink_window_layout",
    "RowBounds", "row_bounds_layout", "document_row_bounds", "document_layout", "prefix_lm_row_bounds",
    "prefix_lm_layout",
]
