"""Attention operators: the reference, the public dispatching launchers, Triton kernels (lazy)."""

from sparseattn.ops.attention import attention, block_sparse_attention
from sparseattn.ops.reference import AttentionState, reference_attention

__all__ = ["attention", "block_sparse_attention", "reference_attention", "AttentionState"]
