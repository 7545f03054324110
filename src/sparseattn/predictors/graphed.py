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

Bounds and threads: at most ``max_graphs`` (default 64) graphs are kept per wrapper, least recently
used dropped first (with their input buffers; a dropped key is captured again on its next call),
and at most 256 keys remembered as "capture failed". Captures are serialised by one process-wide
lock and use ``capture_error_mode="thread_local"``, so other threads' eager CUDA work does not
invalidate a capture. Two threads may call one wrapper, with the same or different shapes: the
input copy → replay → output clone of a call runs under the lock of its shape's static input
buffers, and the next caller's stream waits for the previous caller's (a CUDA event, no host
sync), so static buffers are never used by two calls in flight.

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

import threading
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from sparseattn._cache import BoundedCache
from sparseattn._validation import fail
from sparseattn.layout.block_layout import BlockLayout
from sparseattn.predictors import _common
from sparseattn.predictors.base import graph_layer_key, graph_refusal
from sparseattn.predictors._common import check_qk

__all__ = ["GraphedPredictor"]

_PASS_THROUGH = ("static",)
_MAX_EAGER_KEYS = 256  # keys remembered as "capture failed, run eagerly"
# One capture at a time in the process: concurrent captures would share the caching allocator's capture
# state and the warm-up/synchronise sequence of _capture.
_CAPTURE_LOCK = threading.Lock()


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
class _Inputs:
    """Static input buffers of one shape, shared by that shape's graphs, used by one call at a time."""

    q: torch.Tensor
    k: torch.Tensor
    lock: threading.Lock = field(default_factory=threading.Lock)  # held from the input copy to the output clone
    done: Any = None  # torch.cuda.Event recorded after the last use; the next user's stream waits on it


@dataclass
class _Entry:
    graph: Any  # torch.cuda.CUDAGraph
    inputs: _Inputs
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
        max_graphs: most graphs kept (least recently used dropped first), >= 1.

    ``name`` is ``"graphed:<wrapped name>"`` and ``config`` is the wrapped predictor's config (so
    ``getattr(predictor.config, "pv_threshold", None)`` keeps working).
    """

    def __init__(self, predictor: Any, *, warmup: int = 3, clone_outputs: bool = True, max_graphs: int = 64) -> None:
        c = "GraphedPredictor"
        if not callable(getattr(predictor, "predict", None)) or not callable(getattr(predictor, "reset", None)):
            raise fail(c, "predictor", "must have predict() and reset()", "a predictor", type(predictor).__name__)
        if isinstance(predictor, GraphedPredictor):
            raise fail(c, "predictor", "is already graphed", "an eager predictor", "GraphedPredictor")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise fail(c, "warmup", "must be a positive integer", "an int >= 1", repr(warmup))
        if not isinstance(clone_outputs, bool):
            raise fail(c, "clone_outputs", "must be a bool", "True or False", repr(clone_outputs))
        if isinstance(max_graphs, bool) or not isinstance(max_graphs, int) or max_graphs < 1:
            raise fail(c, "max_graphs", "must be a positive integer", "an int >= 1", repr(max_graphs))
        self.predictor = predictor
        self.warmup = warmup
        self.clone_outputs = clone_outputs
        self.name = f"graphed:{getattr(predictor, 'name', type(predictor).__name__)}"
        self.max_graphs = max_graphs
        # per-wrapper caches (unnamed: not registered globally, freed with the wrapper)
        self._entries: BoundedCache[tuple[Any, ...], _Entry] = BoundedCache(max_graphs)
        self._inputs: BoundedCache[tuple[Any, ...], _Inputs] = BoundedCache(max_graphs)
        self._eager_keys: BoundedCache[tuple[Any, ...], str] = BoundedCache(_MAX_EAGER_KEYS)  # key -> why capture failed
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
        return graph_refusal(self.predictor, layer)  # the predictor says what a replay cannot do (base.py)

    def _layer_key(self, layer: int | None) -> Any:
        return graph_layer_key(self.predictor, layer)

    def _key(self, q: torch.Tensor, k: torch.Tensor, causal: bool, layer: int | None) -> tuple[Any, ...]:
        return (tuple(q.shape), q.dtype, tuple(k.shape), k.dtype, str(q.device), causal, self._layer_key(layer))

    def _static_inputs(self, q: torch.Tensor, k: torch.Tensor) -> _Inputs:
        # one pair of input buffers per shape, shared by that shape's graphs
        ik = (tuple(q.shape), q.dtype, tuple(k.shape), k.dtype, str(q.device))
        return self._inputs.get_or_build(ik, lambda: _Inputs(torch.empty(q.shape, dtype=q.dtype, device=q.device),
                                                             torch.empty(k.shape, dtype=k.dtype, device=k.device),
                                                             done=torch.cuda.Event()))

    def _output(self, layout: BlockLayout) -> BlockLayout:
        if not self.clone_outputs:
            return layout
        return BlockLayout(layout.kv_num_blocks.clone(), layout.kv_indices.clone(), layout.block_m, layout.block_n,
                           layout.seqlen_q, layout.seqlen_kv, validate=False)

    def _capture(self, q: torch.Tensor, k: torch.Tensor, causal: bool, layer: int | None) -> _Entry:
        inp = self._static_inputs(q, k)
        sq, sk = inp.q, inp.k
        with inp.lock:  # another graph of this shape may be replaying from these buffers
            cur = torch.cuda.current_stream(q.device)
            cur.wait_event(inp.done)
            sq.copy_(q)
            sk.copy_(k)
            side = torch.cuda.Stream(device=q.device)
            side.wait_stream(cur)
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    self.predictor.predict(sq, sk, causal=causal, layer=layer)
            cur.wait_stream(side)
            torch.cuda.synchronize(q.device)
        keep = _common._GEOM_CACHE.values()  # geometry tensors the graph may read (snapshot)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            out = self.predictor.predict(sq, sk, causal=causal, layer=layer)
        if not isinstance(out, BlockLayout):
            raise fail("GraphedPredictor.predict", "predictor.predict", "did not return a BlockLayout", "BlockLayout",
                       type(out).__name__)
        seen = {id(t) for t in keep}  # and any another thread stored while we captured
        keep += [t for t in _common._GEOM_CACHE.values() if id(t) not in seen]
        return _Entry(graph, inp, out, keep)

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
            with _CAPTURE_LOCK:
                entry = self._entries.get(key)  # another thread may have captured this key meanwhile
                if entry is None and key not in self._eager_keys:
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
                    else:
                        self._entries[key] = entry
            if entry is None:
                return self.predictor.predict(q, k, causal=causal, layer=layer)
        inp = entry.inputs
        stream = torch.cuda.current_stream(q.device)
        with inp.lock:  # the static buffers serve one call at a time, in stream order
            stream.wait_event(inp.done)  # the previous call (maybe another thread's stream) is done with them
            inp.q.copy_(q)
            inp.k.copy_(k)
            entry.graph.replay()
            res = self._output(entry.out)
            inp.done.record(stream)
        return res

    def replay_only(self, q: torch.Tensor, k: torch.Tensor, *, causal: bool = True, layer: int | None = None) -> None:
        """Replay the captured graph for this key without copying inputs or cloning outputs (for timing)."""
        entry = self._entries.get(self._key(q, k, causal, layer))
        if entry is None:
            raise fail("GraphedPredictor.replay_only", "q/k", "have no captured graph", "a key predict() captured",
                       f"q{tuple(q.shape)} causal={causal} layer={layer}")
        with entry.inputs.lock:
            entry.graph.replay()
