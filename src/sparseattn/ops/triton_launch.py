"""Launcher for the Triton block-sparse forward kernel (validate → allocate → grid → kernel).

Placeholder until the Triton kernel lands: it refuses every input and says so, so the dispatcher
falls back to the reference with a warning on CUDA and ``backend="triton"`` raises with this reason.
"""

from __future__ import annotations

from typing import Any

import torch


def refusal(q: torch.Tensor, **_: Any) -> str | None:
    return "the Triton block-sparse kernel is not implemented yet"


def block_sparse_fwd(*args: Any, **kwargs: Any):  # noqa: ANN201
    raise NotImplementedError("block_sparse_fwd: the Triton block-sparse kernel is not implemented yet")
