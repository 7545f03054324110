"""``patch_model(dense_above="auto")``: a sparse layer runs dense SDPA where its measured density is above the
crossover measured for its shape, without a host sync.

The crossover is the density at which ``predictor + kernel`` takes as long as the fastest dense attention for
the layer's shape on this GPU (:mod:`sparseattn.ops.crossover`, measured by ``benchmarks/bench_crossover.py``).
Per (layer, call shape) an :class:`AutoDense` state keeps a verdict, ``"sparse"`` or ``"dense"``:

* the density a verdict rests on is *measured*, never read synchronously: every :data:`AUTO_RECHECK`-th call
  of a (layer, shape) (the first included) is a measuring call; it runs sparse (predictor + kernel), and its
  density (eager calls: that call's; graphed calls: the mean of the layer graph's calls since the last
  measurement, from its device-side sum) is copied to pinned host memory with ``non_blocking=True`` behind a
  CUDA event. A later call reads it once the event has completed (``Event.query()``, no wait) and sets the
  verdict: ``dense`` when the density is above the crossover.
* a ``dense`` verdict skips the predictor and the kernel: the call runs the fastest dense attention, PyTorch's
  ``scaled_dot_product_attention(is_causal=True, enable_gqa=...)`` (what ``bench_crossover.py`` measures as
  dense; the model's own ``sdpa`` path adds ``repeat_kv`` copies), replayed from a layer graph like the sparse
  calls (``PatchHandle._sdpa_fallback``); it is counted in ``handle.dense_fallbacks`` and accounted as density
  1.0. It is re-measured every :data:`AUTO_RECHECK` calls (one sparse call), so a layer whose inputs become sparser returns to the kernel.
* so the verdict lags its measurement by at least one call of the layer and shape; the first call of a shape
  always runs sparse.

No crossover for the GPU / dtype / head_dim (the file has none; CPU models look up the device name ``"cpu"``,
which the shipped file does not measure: the CPU path is masked SDPA): the layer always runs sparse,
the report says why (``auto_dense``) and a ``UserWarning`` names the reason once per handle. Inside a caller's
CUDA-graph capture or ``torch.compile`` tracing nothing is measured: the verdict known then is used (and so
baked into the caller's graph).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from sparseattn.integrations.layer_graphs import DensityAccumulator

__all__ = ["AutoDense", "AutoDenseMixin", "AUTO_RECHECK", "SPARSE", "MEASURE", "DENSE"]

#: calls of one (layer, shape) between two density measurements
AUTO_RECHECK = 16
SPARSE, MEASURE, DENSE = 0, 1, 2


class AutoDense:
    """The fallback verdict of one (layer, call shape) and its pending density measurement."""

    __slots__ = ("threshold", "source", "verdict", "calls", "density", "fallbacks", "_event", "_host", "_read",
                 "_snap")

    def __init__(self, threshold: float | None, source: str) -> None:
        self.threshold = threshold
        self.source = source  # the crossover's provenance, or why there is none
        self.verdict: str | None = None  # "sparse" | "dense" once a measurement was read
        self.calls = 0
        self.density: float | None = None  # the last measured density
        self.fallbacks = 0
        self._event: Any = None  # a measurement in flight: its CUDA event (True on the CPU: already done)
        self._host: torch.Tensor | None = None
        self._read: Any = None  # how the finished host copy becomes a density
        self._snap: tuple[int, int] | None = None  # graphed: (summed block count, calls) of the last snapshot

    def poll(self) -> None:
        """Read a finished measurement (no wait) and update the verdict."""
        ev = self._event
        if ev is None or (ev is not True and not ev.query()):
            return
        self._event = None
        d = self._read(self._host)
        if d is None:  # a baseline snapshot only (the accumulator was reset in between)
            return
        self.density = d
        self.verdict = "dense" if (self.threshold is not None and d > self.threshold) else "sparse"

    def _due(self) -> bool:
        """Whether the next call measures: every :data:`AUTO_RECHECK`-th, when none is in flight and a crossover exists."""
        return self.calls % AUTO_RECHECK == 0 and self._event is None and self.threshold is not None

    def action(self, capturing: bool) -> int:
        """What this call does: :data:`SPARSE`, :data:`MEASURE` (sparse, and measure its density) or :data:`DENSE`."""
        if capturing:  # a caller's CUDA graph or torch.compile: the verdict known now, nothing measured
            return DENSE if self.verdict == "dense" else SPARSE
        self.poll()
        due = self._due()
        self.calls += 1
        if due:
            return MEASURE
        if self.verdict == "dense":
            self.fallbacks += 1
            return DENSE
        return SPARSE

    def fast(self, dense: bool) -> bool:
        """Whether the next call takes the fast lane of a graphed sparse (``dense=False``) or fallback (``True``)
        call: it does when the call is not a measuring one and the verdict matches; it is then counted here."""
        self.poll()
        if (self.verdict == "dense") != dense or self._due():
            return False
        self.calls += 1
        self.fallbacks += dense
        return True

    def _start(self, src: torch.Tensor, read: Any) -> None:
        if self._host is None or self._host.shape != src.shape or self._host.dtype != src.dtype:
            self._host = torch.empty(src.shape, dtype=src.dtype, pin_memory=src.is_cuda)
        self._host.copy_(src, non_blocking=src.is_cuda)
        self._read = read
        if src.is_cuda:
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._event = True  # a CPU copy is done when copy_ returns

    def measure_entry(self, entry: Any) -> None:
        """Measure an eager call from its density entry (``PatchHandle._density``)."""
        from sparseattn.integrations.accounting import _as_density

        self._start(_as_density(entry).mean().reshape(1), lambda h: float(h[0]))

    def measure_accum(self, accum: DensityAccumulator) -> None:
        """Measure a graphed layer: its accumulator's sum now against the last snapshot (the mean of the calls between)."""
        if accum.sum is None:
            return
        calls, avail, n = accum.calls, accum.avail, accum.sum.numel()

        def read(h: torch.Tensor) -> float | None:
            total = int(h.sum())
            prev, self._snap = self._snap, (total, calls)
            if prev is None or prev[1] >= calls or prev[0] > total:  # first snapshot, or a reset in between
                return total / (n * avail * calls) if calls and prev is None else None
            return (total - prev[0]) / (n * avail * (calls - prev[1]))

        self._start(accum.sum, read)

    def describe(self) -> dict[str, Any]:
        return {"crossover": self.threshold, "source": self.source, "verdict": self.verdict,
                "last_density": self.density, "calls": self.calls, "dense_calls": self.fallbacks}


class AutoDenseMixin:
    """The ``dense_above="auto"`` states of :class:`~sparseattn.integrations.handle.PatchHandle`."""

    _auto: dict[tuple[Any, ...], AutoDense] | None
    _auto_warned: set[str]

    def _auto_state(self, layer: int, query: torch.Tensor, key: torch.Tensor) -> AutoDense:
        """The state of this (layer, shape), created with its crossover on the first call."""
        B, H, nq, D = query.shape
        k = (layer, B, H, key.shape[1], nq, key.shape[2], D, query.dtype, query.device)
        st = self._auto.get(k)  # type: ignore[union-attr]
        if st is None:
            from sparseattn.ops.crossover import lookup_crossover

            name = torch.cuda.get_device_name(query.device) if query.is_cuda else query.device.type
            thr, src = lookup_crossover(name, dtype=str(query.dtype).replace("torch.", ""), heads=H,
                                        kv_heads=key.shape[1], head_dim=D, seqlen=key.shape[2])
            if thr is None and src not in self._auto_warned:
                self._auto_warned.add(src)
                warnings.warn(f"patch_model: dense_above='auto' has no crossover for layer {layer}: {src}; such "
                              "layers always run sparse", UserWarning, stacklevel=5)
            st = self._auto[k] = AutoDense(thr, src)  # type: ignore[index]
        return st

    def _auto_report(self, layer: int) -> list[dict[str, Any]]:
        return [{"seq_len": k[4], **st.describe()} for k, st in (self._auto or {}).items() if k[0] == layer]

