"""Shared pytest setup. Keep this small: helpers live in ``sparseattn.testing``."""

from __future__ import annotations

import os

from hypothesis import settings

# Without CUDA, the Triton kernel is tested under Triton's CPU interpreter, which must be chosen before
# triton is first imported (its own @jit helpers are bound at import). backend="auto" still picks the
# reference for CPU tensors; only backend="triton" (or triton_launch directly) runs the interpreter.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

# CI runs on 2 CPU cores: no per-example deadline (first calls pay import/JIT costs), bounded examples.
settings.register_profile("sparseattn", deadline=None, max_examples=30, derandomize=True)
settings.load_profile("sparseattn")
