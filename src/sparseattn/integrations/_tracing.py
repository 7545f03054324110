"""Whether dynamo is tracing: the one check the integration's hot paths share (a leaf: imports only torch)."""

from __future__ import annotations

import torch

__all__ = ["_compiling"]


def _compiling() -> bool:
    """Whether dynamo is tracing this call (``torch.compiler.is_compiling``, when this torch has it)."""
    comp = getattr(torch, "compiler", None)
    return bool(comp is not None and hasattr(comp, "is_compiling") and comp.is_compiling())
