"""Attention operators: the reference, the public dispatching launchers, Triton kernels (lazy)."""

# the built-in operator table (ops/_builtin_ops.py, which imports the registry) is handed to the registry here,
# before any other module of the package runs: the registry itself imports no operator module (no import cycle)
from sparseattn.ops import _builtin_ops as _builtins
from sparseattn.ops import registry as _registry

_registry.set_builtin_loader(_builtins.builtin_operators)
from sparseattn.ops.attention import attention, block_sparse_attention
from sparseattn.ops.reference import reference_attention
from sparseattn.state.types import AttentionState

__all__ = ["attention", "attention_op", "decode_attention_op", "quantized_attention_op", "merge_states_op", "block_sparse_attention", "reference_attention", "AttentionState"]
# decode attention (sparseattn.ops.decode) and Quest-style page selection (sparseattn.ops.pages), docs/DECODE.md:
# imported on first use
_DECODE = ("decode_attention", "paged_decode_attention", "decode_reference")
_PAGES = ("sparse_decode_attention", "page_summaries", "update_page_summaries", "select_pages", "PageSummaries")
__all__ += list(_DECODE) + list(_PAGES)


def __getattr__(name: str):  # noqa: ANN202
    # attention_op lives in custom_ops, whose import registers the torch.library operators: on first use only
    if name in ("attention_op", "decode_attention_op", "quantized_attention_op", "merge_states_op"):
        from sparseattn.ops import custom_ops

        return getattr(custom_ops, name)
    if name in _DECODE:
        from sparseattn.ops import decode

        return getattr(decode, name)
    if name in _PAGES:
        from sparseattn.ops import pages

        return getattr(pages, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
