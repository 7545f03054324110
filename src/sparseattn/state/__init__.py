"""Attention state (out, lse) and exact merging of states over disjoint key sets."""

from sparseattn.state.types import AttentionState
from sparseattn.state.merge import merge_state, merge_states, segmented_attention

__all__ = ["AttentionState", "merge_state", "merge_states", "segmented_attention"]
