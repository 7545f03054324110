"""Steady-state whole-model prefill times, dense vs sparse, in one process.

The rule the project's benchmarks follow (BENCHMARKS.md): warm up first (Triton autotuning, lazy
imports, allocator pools), synchronise CUDA around every timed call, take the **median** of at
least five timed calls, and alternate the two sides round by round so slow drift (clocks, other
load) hits both alike. A mean of cold calls measures autotuning and first-call work, not speed.

:func:`steady_prefill_times` does exactly this for one input: the model is patched once; each round
times one dense prefill (the model's own attention, :meth:`PatchHandle.suspended`) and one sparse
prefill, both ``model(ids, use_cache=False, logits_to_keep=1)``. One untimed sparse call comes first
(it settles each layer's backend route, so the warm-up round captures the layer graphs of
:mod:`sparseattn.integrations.layer_graphs` on a GPU), and caches persist from round to round as
they would in a served model. Patching and unpatching happen outside the timed region.
"""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from sparseattn._validation import check_positive_int, fail

__all__ = ["paired_rounds", "quiet_gc", "round_order", "steady_prefill_times"]

TIMING_RULES = ("Python's garbage collector collected before and disabled during the timed rounds (as timeit "
                "does), the order of the two sides swapped every round")


@contextlib.contextmanager
def quiet_gc() -> Iterator[None]:
    """Collect garbage, then keep the cyclic collector off for the block (as :mod:`timeit` does).

    A collection that lands inside one timed forward of a host-bound model adds milliseconds to that
    side only; which side it hits is chance, so it turns into noise in the dense/sparse ratio.
    """
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def round_order(r: int) -> tuple[int, int]:
    """Which side runs first in round ``r``: ``(0, 1)`` (dense first) on even rounds, ``(1, 0)`` on odd ones.

    Swapping the order every round keeps a position effect (the second call of a round finding warmer
    caches, or a host that slows down mid-round) from landing on one side only.
    """
    return (0, 1) if r % 2 == 0 else (1, 0)


def _timed(fn: Callable[[], Any], cuda: bool) -> float:
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def paired_rounds(dense: Callable[[], Any], sparse: Callable[[], Any], *, repeats: int, warmup: int, cuda: bool,
                  dense_context: Callable[[], Any] = contextlib.nullcontext) -> tuple[list[float], list[float]]:
    """Seconds of ``dense()`` and ``sparse()`` per timed round: the project's timing protocol for two sides.

    ``warmup`` untimed rounds, then ``repeats`` timed ones; each call synchronised (``cuda``), the order of
    the two sides swapped every round (:func:`round_order`), the garbage collector off (:func:`quiet_gc`).
    ``dense_context()`` is entered around each dense call, outside its timed region (e.g. a patched model's
    ``handle.suspended``).
    """
    contexts = (dense_context, contextlib.nullcontext)
    d_s: list[float] = []
    s_s: list[float] = []
    with quiet_gc():
        for r in range(warmup + repeats):
            times = [0.0, 0.0]
            for side in round_order(r):
                with contexts[side]():
                    times[side] = _timed((dense, sparse)[side], cuda)
            if r >= warmup:
                d_s.append(times[0])
                s_s.append(times[1])
    return d_s, s_s


@torch.no_grad()
def steady_prefill_times(model: Any, ids: torch.Tensor, patch_kwargs: Mapping[str, Any], *, repeats: int = 5,
                         warmup: int = 1) -> dict[str, Any]:
    """Median dense and sparse prefill times of ``model`` on ``ids`` after ``warmup`` rounds.

    Args:
        model: an unpatched transformers model.
        ids: ``(1, N)`` token ids on the model's device.
        patch_kwargs: keyword arguments of :func:`~sparseattn.integrations.patch_model` for the sparse side.
        repeats: timed rounds (>= 1; the project's rule is >= 5).
        warmup: untimed rounds before them (>= 1).

    Returns:
        ``{"dense_s", "sparse_s"`` (medians), ``"dense_rounds_s", "sparse_rounds_s"`` (every timed
        round), ``"ratio"`` (dense / sparse: > 1 means sparse is faster), ``"repeats", "warmup",
        "layer_graphs"`` (``{status: number of layers}`` of the sparse side: ``"graphed"`` or why not;
        empty off the GPU), ``"method"`` (one sentence saying how the times were taken)}.
    """
    from sparseattn.integrations.transformers_patch import patch_model

    fn = "steady_prefill_times"
    check_positive_int(fn, "repeats", repeats)
    check_positive_int(fn, "warmup", warmup)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != 1:
        raise fail(fn, "ids", "must be a (1, N) tensor of token ids", "shape (1, N)",
                   tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__)
    cuda = ids.is_cuda

    def dense() -> None:
        model(ids, use_cache=False, logits_to_keep=1)

    kw = dict(patch_kwargs)
    from sparseattn.predictors.pattern import pattern_predictor
    from sparseattn.predictors.resolve import resolve_predictor

    if isinstance(kw.get("predictor"), str):
        kw["predictor"] = resolve_predictor(kw["predictor"])
    if kw.get("pattern") is not None and kw.get("predictor") is None:
        kw["predictor"] = pattern_predictor(kw.pop("pattern"))

    handle = patch_model(model, **kw)  # once: the sparse side is timed in its steady state (caches, layer graphs)
    try:
        dense()  # untimed: settles the sparse layers' routes, so the warm-up round(s) capture the layer graphs

        # the dense side: the model's own attention (suspended patch); the sparse side: the same call, patched
        dense_s, sparse_s = paired_rounds(dense, dense, repeats=repeats, warmup=warmup, cuda=cuda,
                                          dense_context=handle.suspended)
        status = list(handle.layer_graph_status.values())
    finally:
        handle.unpatch()
    d, s = statistics.median(dense_s), statistics.median(sparse_s)
    graphs = {k: status.count(k) for k in sorted(set(status))}
    return {
        "dense_s": d, "sparse_s": s, "ratio": d / s if s > 0 else None,
        "dense_rounds_s": dense_s, "sparse_rounds_s": sparse_s, "repeats": repeats, "warmup": warmup,
        "layer_graphs": graphs,
        "method": (f"median of {repeats} prefill calls after {warmup} warm-up round(s) (the model patched once"
                   f"{'; layer graphs: ' + ', '.join(f'{v} {k}' for k, v in graphs.items()) if graphs else ''}), "
                   f"dense and sparse alternated, {TIMING_RULES}, "
                   f"{'CUDA-synchronised, ' if cuda else ''}{ids.shape[1]} tokens, one process"),
    }
