"""Scaffolding shared by the test files (not used by the library): whether the Triton kernels can run
here, per-test seeds, and an operator counter for the "reads no tensor value on the host" checks."""

from __future__ import annotations

import collections
import zlib
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["CountOps", "kernel_unavailable", "node_generator", "node_seed"]


def kernel_unavailable() -> str | None:
    """Why the Triton kernels cannot run here, or None: they run on CUDA, or on the CPU under Triton's
    interpreter (``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` before triton is imported)."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:  # pragma: no cover - triton is a dependency on Linux
        return "triton is not installed"
    if not torch.cuda.is_available():
        from sparseattn.ops.triton_launch import interpret_mode

        if not interpret_mode():
            return "no CUDA and TRITON_INTERPRET is not set (tests/conftest.py sets it before triton is imported)"
    return None


def node_seed(request: Any) -> int:
    """A seed fixed per test id (pytest's ``request``): the same on every run, different per parametrisation."""
    return zlib.crc32(request.node.nodeid.encode())


def node_generator(request: Any) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`node_seed`."""
    return torch.Generator().manual_seed(node_seed(request))


class CountOps(TorchDispatchMode):
    """Counts every ATen operator dispatched inside the ``with`` block (``ops[str(op)]``); a host read of a
    tensor value shows as ``aten._local_scalar_dense.default``."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))
