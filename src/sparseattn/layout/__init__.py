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
    block_diagonal_layout,
    causal_layout,
    dense_layout,
    make_pattern,
    pattern_at_density,
    random_layout,
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
]
