"""The attention state: output and natural-log logsumexp (the unit that merging and segments carry).

Lives in ``state/`` (not ``ops/``) so that state code (merging, segments, KV caches) does not import the
kernels' modules; ``sparseattn.ops.reference`` re-exports it for compatibility.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["AttentionState"]


class AttentionState(NamedTuple):
    """Attention output and its natural-log logsumexp.

    Shapes:
        out: ``(B, H, N_q, D)`` in the input dtype.
        lse: ``(B, H, N_q)`` float32 (float64 for float64 inputs), natural-log
            ``logsumexp(scale * q·k)`` over the attended keys; ``-inf`` for rows that attend nothing.
    """

    out: torch.Tensor
    lse: torch.Tensor
