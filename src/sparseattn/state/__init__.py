"""Attention state (out, lse), the raw online-softmax state, exact merging and segment-wise attention.

``MixedKVCache`` (``sparseattn.state.kv_cache``) is not imported here: it needs transformers.
"""

from sparseattn.state.types import AttentionState, RawState
from sparseattn.state.merge import merge_state, merge_states, segmented_attention
from sparseattn.state.segmented import SegmentOutput, attention_over_segments, attention_with_state

__all__ = ["AttentionState", "RawState", "merge_state", "merge_states", "segmented_attention", "SegmentOutput",
           "attention_with_state", "attention_over_segments"]
