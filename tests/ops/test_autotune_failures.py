"""Failed autotune candidates are reported to the caller (a scoped list), never kept in a module-level list."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("triton")


def _boom() -> None:
    raise RuntimeError("this candidate cannot be built")


def test_failed_candidates_go_to_the_current_collector_only():
    from sparseattn.ops.triton import configs

    assert configs.safe_bench(_boom) == math.inf  # no collector: scored as infinitely slow, nothing kept
    with configs.autotune_failures() as outer:
        with configs.autotune_failures() as inner:  # the launcher opens one per autotuned launch
            assert configs.safe_bench(_boom, quantiles=[0.5, 0.2]) == [math.inf, math.inf]
        assert len(inner) == 1 and outer == inner  # nested lists also report to the enclosing one
        configs.safe_bench(_boom)
        assert len(outer) == 2 and len(inner) == 1
    with configs.autotune_failures() as later:
        assert later == []  # a new scope starts empty
    assert not hasattr(configs, "FAILED_CONFIGS")  # the former module-level log is gone


def test_an_autotuned_launch_returns_its_failed_candidates():
    """The launcher's autotune branch with a stand-in autotuner (the real one needs a GPU): the candidates that
    failed during this launch come back in its telemetry, and the winner is remembered."""
    from types import SimpleNamespace

    import torch

    from sparseattn.ops import triton_launch as tl
    from sparseattn.ops.triton import configs

    class Tuner:
        best_config = SimpleNamespace(kwargs={"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2, maxnreg=None)

        def __getitem__(self, grid):
            def launch(*args, **meta):
                assert grid({"BLOCK_M": 64}) == (2, 6)  # ceil(100 / 64) programs per row, B * H
                configs.safe_bench(_boom)  # one candidate fails while tuning
                return SimpleNamespace(n_regs=96, n_spills=0, metadata=SimpleNamespace(shared=1024))
            return launch

    q = torch.zeros(1, 6, 100, 64)
    key = ("test-key", object())
    try:
        rec = tl._launch(None, Tuner(), Tuner(), None, key, (), {}, q, q, q, q, 1, 6, 100, "test")
        assert len(rec["failed_configs"]) == 1 and rec["n_regs"] == 96
        assert rec["config"]["BLOCK_M"] == 64 and tl._TUNED.get(key)["num_warps"] == 4
    finally:
        tl._TUNED.pop(key)
