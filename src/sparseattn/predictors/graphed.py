"""CUDA-graph wrapper for predictors: one graph replay instead of ~100 small kernel launches.

On the GPU a predictor call at 8K–32K tokens is bound by kernel launches, not by bytes or FLOPs
(see ``BENCHMARKS.md`` § Predictors). :class:`GraphedPredictor` captures the wrapped predictor's
``predict`` into a :class:`torch.cuda.CUDAGraph` once per key
``(q shape/dtype, k shape/dtype, device, causal, layer)`` (for ``mean_sim`` the layer only
as "below ``dense_layers``" or not; input buffers are shared per shape) and then, per call:

1. copies ``q`` and ``k`` into the graph's static input buffers (``copy_``; this reads and writes
   both tensors once, ~0.2 ms of HBM traffic for q+k at 32K with H=32, H_kv=8, D=128, bf16);
2. replays the graph;
3. returns a :class:`BlockLayout` whose tensors are **clones** of the graph's static outputs (so a
   layout stays valid after the next call; ``clone_outputs=False`` returns the static tensors
   themselves, valid only until the next call with the same key).

Capture: a few eager warm-up calls run on a side stream first (they fill the geometry caches of
:mod:`sparseattn.predictors._common` and the allocator), then one call is captured. Tensors of the
geometry cache that exist at capture time are referenced by the graph entry, so a later cache
eviction cannot free memory the graph still reads.

Not graphed, with the reason said once (a :class:`UserWarning`):

* CPU (or other non-CUDA) tensors: the wrapped predictor runs eagerly — graphs need CUDA;
* a capture that fails (a host synchronisation inside ``predict``, say): the key falls back to the
  eager predictor for good, with the capture error in the warning.

Refused (:class:`NotImplementedError`): stateful calls — SketchWalk with ``layer`` set carries the
walk history ``W`` and the decode query pool across layers in Python-side state, which a replayed
graph would not update. SketchWalk with ``layer=None`` is stateless and is graphed.

``StaticPredictor`` is passed through eagerly: it returns a cached layout per shape and launches no
kernels, so there is nothing to graph.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from sparseattn._validation import fail
from sparseattn.layout.block_layout import BlockLayout
from sparseattn.predictors import _common
from sparseattn.predictors._common import check_qk

__all__ = ["GraphedPredictor"]

_PASS_THROUGH = ("static",)


def _end_failed_capture(device: torch.device) -> None:
    """Leave no capture state behind after a failed capture.

    When ``cudaStreamEndCapture`` fails (e.g. a host sync invalidated the capture), PyTorch raises
    before it tells the CUDA generators that capture ended, and every later ``torch.randn`` on the
    device fails with "Offset increment outside graph capture". An empty capture that succeeds runs
    the generators' prologue/epilogue again and restores them.
    """
    torch.cuda.synchronize(device)
    with torch.cuda.device(device):
        g = torch.cuda.CUDAGraph()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The CUDA Graph is empty")
            with torch.cuda.graph(g):
                pass
        del g
    torch.cuda.synchronize(device)


@dataclass
class _Entry:
    graph: Any  # torch.cuda.CUDAGraph
    q: torch.Tensor
    k: torch.Tensor
    out: BlockLayout
    keep_alive: list[torch.Tensor] = field(default_factory=list)


class GraphedPredictor:
    """Wrap a predictor so that its ``predict`` is replayed from a CUDA graph (see module docstring).

    Args:
        predictor: any predictor (``predict(q, k, *, causal, layer) -> BlockLayout``, ``reset()``,
            ``config``, ``name``).
        warmup: eager calls on a side stream before capture (>= 1).
        clone_outputs: return clones of the static outputs (default) or the static tensors
            themselves (valid only until the next call with the same key).

    ``name`` is ``"graphed:<wrapped name>"`` and ``config`` is the wrapped predictor's config (so
    ``getattr(predictor.config, "pv_threshold", None)`` keeps working).
    """

    def __init__(self, predictor: Any, *, warmup: int = 3, clone_outputs: bool = True) -> None:
        c = "GraphedPredictor"
        if not callable(getattr(predictor, "predict", None)) or not callable(getattr(predictor, "reset", None)):
            raise fail(c, "predictor", "must have predict() and reset()", "a predictor", type(predictor).__name__)
        if isinstance(predictor, GraphedPredictor):
            raise fail(c, "predictor", "is already graphed", "an eager predictor", "GraphedPredictor")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise fail(c, "warmup", "must be a positive integer", "an int >= 1", repr(warmup))
        if not isinstance(clone_outputs, bool):
            raise fail(c, "clone_outputs", "must be a bool", "True or False", repr(clone_outputs))
        self.predictor = predictor
        self.warmup = warmup
        self.clone_outputs = clone_outputs
        self.name = f"graphed:{getattr(predictor, 'name', type(predictor).__name__)}"
        self._entries: dict[tuple[Any, ...], _Entry] = {}
        self._inputs: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        self._eager_keys: dict[tuple[Any, ...], str] = {}  # key -> why capture failed
        self._warned_cpu = False

    @property
    def config(self) -> Any:
        return self.predictor.config

    @property
    def last_scores(self) -> Any:
        return getattr(self.predictor, "last_scores", None)

    def reset(self) -> None:
        """Reset the wrapped predictor (captured graphs are kept: they depend only on shapes)."""
        self.predictor.reset()

    def clear(self) -> None:
        """Drop every captured graph and its buffers."""
        self._entries.clear()
        self._inputs.clear()
        self._eager_keys.clear()

    # ------------------------------------------------------------------ helpers
    def _stateful_reason(self, layer: int | None) -> str | None:
        if getattr(self.predictor, "name", None) == "sketch_walk" and layer is not None:
            return ("SketchWalk with layer set keeps the walk history W and the decode query pool across layers "
                    "in Python-side state, which a replayed CUDA graph would not update; call with layer=None "
                    "(stateless) or use the eager predictor")
        return None

    def _layer_key(self, layer: int | None) -> Any:
        # mean_sim depends on the layer only through ``layer < dense_layers``: two graphs, not one per layer
        if getattr(self.predictor, "name", None) == "mean_sim":
            dense = layer is not None and layer < self.predictor.config.dense_layers
            return ("dense", layer) if dense else "sparse"
        return layer

    def _key(self, q: torch.Tensor, k: torch.Tensor, causal: bool, layer: int | None) -> tuple[Any, ...]:
        return (tuple(q.shape), q.dtype, tuple(k.shape), k.dtype, str(q.device), causal, self._layer_key(layer))

    def _static_inputs(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # one pair of input buffers per shape, shared by that shape's graphs
        ik = (tuple(q.shape), q.dtype, tuple(k.shape), k.dtype, str(q.device))
        bufs = self._inputs.get(ik)
        if bufs is None:
            bufs = self._inputs[ik] = (torch.empty(q.shape, dtype=q.dtype, device=q.device),
                                       torch.empty(k.shape, dtype=k.dtype, device=k.device))
        return bufs

    def _output(self, layout: BlockLayout) -> BlockLayout:
        if not self.clone_outputs:
            return layout
        return BlockLayout(layout.kv_num_blocks.clone(), layout.kv_indices.clone(), layout.block_m, layout.block_n,
                           layout.seqlen_q, layout.seqlen_kv, validate=False)

    def _capture(self, q: torch.Tensor, k: torch.Tensor, causal: bool, layer: int | None) -> _Entry:
        sq, sk = self._static_inputs(q, k)
        sq.copy_(q)
        sk.copy_(k)
        side = torch.cuda.Stream(device=q.device)
        side.wait_stream(torch.cuda.current_stream(q.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.predictor.predict(sq, sk, causal=causal, layer=layer)
        torch.cuda.current_stream(q.device).wait_stream(side)
        torch.cuda.synchronize(q.device)
        keep = list(_common._GEOM_CACHE.values())  # geometry tensors the graph may read
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.predictor.predict(sq, sk, causal=causal, layer=layer)
        if not isinstance(out, BlockLayout):
            raise fail("GraphedPredictor.predict", "predictor.predict", "did not return a BlockLayout", "BlockLayout",
                       type(out).__name__)
        return _Entry(graph, sq, sk, out, keep)

    # ------------------------------------------------------------------ predict
    def predict(self, q: torch.Tensor, k: torch.Tensor, *, causal: bool = True, layer: int | None = None) -> BlockLayout:
        fn = "GraphedPredictor.predict"
        check_qk(fn, q, k, causal)
        if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int) or layer < 0):
            raise fail(fn, "layer", "must be a non-negative int or None", "int >= 0", repr(layer))
        if q.device.type != "cuda":
            if not self._warned_cpu:
                warnings.warn(f"{fn}: CUDA graphs need CUDA tensors; running {self.name} eagerly on {q.device}",
                              UserWarning, stacklevel=2)
                self._warned_cpu = True
            return self.predictor.predict(q, k, causal=causal, layer=layer)
        if getattr(self.predictor, "name", None) in _PASS_THROUGH:
            return self.predictor.predict(q, k, causal=causal, layer=layer)
        why = self._stateful_reason(layer)
        if why is not None:
            raise NotImplementedError(f"{fn}: {why}")
        key = self._key(q, k, causal, layer)
        if key in self._eager_keys:
            return self.predictor.predict(q, k, causal=causal, layer=layer)
        entry = self._entries.get(key)
        if entry is None:
            try:
                entry = self._capture(q, k, causal, layer)
            except (ValueError, NotImplementedError):
                raise  # the wrapped predictor refused these inputs: not a capture problem
            except Exception as exc:  # noqa: BLE001 - any capture failure falls back, with the reason
                self._eager_keys[key] = f"{type(exc).__name__}: {exc}"
                warnings.warn(f"{fn}: CUDA graph capture of {self.name} failed for q{tuple(q.shape)} "
                              f"k{tuple(k.shape)} causal={causal} layer={layer} ({type(exc).__name__}: {exc}); "
                              "running it eagerly for this shape", UserWarning, stacklevel=2)
                _end_failed_capture(q.device)
                return self.predictor.predict(q, k, causal=causal, layer=layer)
            self._entries[key] = entry
        entry.q.copy_(q)
        entry.k.copy_(k)
        entry.graph.replay()
        return self._output(entry.out)

    def replay_only(self, q: torch.Tensor, k: torch.Tensor, *, causal: bool = True, layer: int | None = None) -> None:
        """Replay the captured graph for this key without copying inputs or cloning outputs (for timing)."""
        entry = self._entries.get(self._key(q, k, causal, layer))
        if entry is None:
            raise fail("GraphedPredictor.replay_only", "q/k", "have no captured graph", "a key predict() captured",
                       f"q{tuple(q.shape)} causal={causal} layer={layer}")
        entry.graph.replay()
