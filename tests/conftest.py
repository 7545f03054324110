"""Shared pytest setup. Keep this small: helpers live in ``sparseattn.testing``."""

from __future__ import annotations

from hypothesis import settings

# CI runs on 2 CPU cores: no per-example deadline (first calls pay import/JIT costs), bounded examples.
settings.register_profile("sparseattn", deadline=None, max_examples=30, derandomize=True)
settings.load_profile("sparseattn")
