"""CUDA graphs of one sparse layer's attention call (prediction + kernel + accounting), for eager models.

Why: an eager model on the GPU is host-bound at small and medium sizes. SmolLM2-135M at 8K tokens
runs its whole dense prefill in ~20-30 ms of Python, and a sparse layer's host work (predictor
launches, Triton's launch dispatch, layout objects, checks) added ~0.4 ms per layer, 30 layers: the
sparse model was slower than dense although its GPU time was lower (``BENCHMARKS.md``). A replayed
graph costs one launch on the host, whatever it contains.

How (per patched model, see :class:`LayerGraphs`): the first call of a key ``(layer, q/k/v shapes
and dtypes, device, window)`` runs the layer's sparse body eagerly once on a side stream (Triton
compiles and autotunes there) and then captures it into a :class:`torch.cuda.CUDAGraph` that reads
static input buffers and writes a static output. Every later call:

1. copies ``q``, ``k``, ``v`` into the static buffers (one buffer set per shape, shared by the
   layers of that shape; three device copies, ~25 MB at 8K for SmolLM2, ~10 µs of HBM time);
2. replays the graph (predictor kernels, attention kernel, density reduction);
3. returns a clone of the static output ``(B, N, H, D)`` and of the density counts, so results stay
   valid after the next layer's replay.

A graph reads memory it does not own (the layout of a static pattern, the predictors' geometry
tables, cached bands): each graph keeps a reference to its body and to every value of the
project's named caches at capture time, so an eviction cannot free what a replay reads.

When a layer is not graphed (the body is run as before) and why:

* not CUDA, inside ``torch.compile`` or inside a caller's own CUDA-graph capture (the caller's graph
  already removes the host work);
* options that need the host per call: ``dense_above``, per-head predictor overrides,
  ``keep_layouts``, an active :meth:`PatchHandle.capture`, a stateful predictor (SketchWalk, whose
  walk history lives in Python);
* large calls, ``q.numel() > max_numel`` (default 2**26 elements: e.g. 32 heads x 16K x 128): there
  the kernel's GPU time dwarfs the host work, and the static copies would cost memory and HBM time;
* a capture that fails (a host read in a custom predictor, say): a ``UserWarning`` names the layer
  and the error once, and that key runs eagerly from then on.

Switch: ``patch_model(..., layer_graphs=False)`` or ``SPARSEATTN_LAYER_GRAPHS=0`` turns it off;
``PatchHandle.layer_graph_status`` says, per layer, ``"graphed"`` or why not.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from sparseattn._cache import BoundedCache

__all__ = ["LayerGraphs", "DEFAULT_MAX_NUMEL"]

#: largest ``q.numel()`` graphed by default (above it the GPU time dominates the host work)
DEFAULT_MAX_NUMEL = 1 << 26
_MAX_SHAPES = 4  # static buffer sets kept (least recently used shape dropped, with its graphs)
_MAX_FAILED = 512  # keys remembered as "capture failed"


@dataclass
class _Buffers:
    """Static inputs and output of one shape; one call uses them at a time, in stream order."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor  # (B, N, H, D)
    lock: threading.Lock = field(default_factory=threading.Lock)
    done: Any = None  # torch.cuda.Event after the last output clone; the next call's stream waits on it
    graphs: dict[tuple[Any, ...], "_Entry"] = field(default_factory=dict)  # this shape's graphs, by layer key


@dataclass
class _Entry:
    graph: Any
    extra: Any
    # what the graph reads but does not own: the body (and the layout its closure holds) and every
    # module-cache value at capture time (geometry tables, bands, dense layouts), so a later cache
    # eviction cannot free memory a replay still reads
    keep_alive: list[Any] = field(default_factory=list)  # the body's static side output (density counts) or None


def _clone(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, tuple):
        return tuple(_clone(t) for t in x)
    return x


class LayerGraphs:
    """Per-key CUDA graphs of a sparse layer body (see the module docstring).

    Which calls come here is the caller's choice (``PatchHandle`` sends calls with ``q.numel() <=``
    :data:`DEFAULT_MAX_NUMEL`); ``replays`` counts the replays served.
    """

    def __init__(self) -> None:
        # per shape: static buffers and that shape's graphs (dropping a shape drops its graphs too)
        self._buffers: BoundedCache[tuple[Any, ...], _Buffers] = BoundedCache(_MAX_SHAPES)
        self._failed: BoundedCache[tuple[Any, ...], str] = BoundedCache(_MAX_FAILED)
        self.replays = 0

    def clear(self) -> None:
        """Drop every graph and buffer (their memory is released when no call holds them)."""
        self._buffers.clear()
        self._failed.clear()

    def _static(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> _Buffers:
        key = (tuple(q.shape), tuple(k.shape), tuple(v.shape), q.dtype, k.dtype, str(q.device))
        B, H, N, D = q.shape

        def build() -> _Buffers:
            return _Buffers(torch.empty(q.shape, dtype=q.dtype, device=q.device),
                            torch.empty(k.shape, dtype=k.dtype, device=k.device),
                            torch.empty(v.shape, dtype=v.dtype, device=v.device),
                            torch.empty((B, N, H, D), dtype=q.dtype, device=q.device), done=torch.cuda.Event())

        return self._buffers.get_or_build(key, build)

    def run(self, key: tuple[Any, ...], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            body: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], Any],
            what: str) -> tuple[torch.Tensor, Any] | None:
        """``(out (B, N, H, D), extra)`` from the graph of ``key``, or None when this key runs eagerly.

        ``body(q, k, v, out)`` writes attention into ``out`` and returns a tensor (or None) that is
        cloned after each replay (tensors, also inside a tuple; other values are returned as they
        were at capture); it must launch GPU work only (no host reads).
        """
        from sparseattn.predictors.graphed import _CAPTURE_LOCK, _end_failed_capture

        full = (*key, tuple(q.shape), tuple(k.shape), tuple(v.shape), q.dtype, k.dtype, str(q.device))
        if self._failed.get(full) is not None:
            return None
        buf = self._static(q, k, v)
        entry = buf.graphs.get(key)
        if entry is None:
            with _CAPTURE_LOCK:
                entry = buf.graphs.get(key)  # another thread may have captured it meanwhile
                if entry is None:
                    try:
                        entry = self._capture(buf, q, k, v, body)
                    except (ValueError, NotImplementedError):
                        raise  # bad input: the eager body raises the same error, not a capture problem
                    except Exception as exc:  # noqa: BLE001 - any capture failure: eager for this key, said once
                        why = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
                        self._failed.put(full, why)
                        warnings.warn(f"patch_model: CUDA graph capture of {what} failed ({why}); "
                                      "this layer runs without a graph for these shapes", UserWarning, stacklevel=4)
                        _end_failed_capture(q.device)
                        return None
                    buf.graphs[key] = entry
        stream = torch.cuda.current_stream(q.device)
        with buf.lock:
            stream.wait_event(buf.done)
            buf.q.copy_(q)
            buf.k.copy_(k)
            buf.v.copy_(v)
            entry.graph.replay()
            out = buf.out.clone()
            extra = _clone(entry.extra)
            buf.done.record(stream)
        self.replays += 1
        return out, extra

    def _capture(self, buf: _Buffers, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 body: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], Any]) -> _Entry:
        with buf.lock:
            cur = torch.cuda.current_stream(q.device)
            cur.wait_event(buf.done)
            buf.q.copy_(q)
            buf.k.copy_(k)
            buf.v.copy_(v)
            side = torch.cuda.Stream(device=q.device)
            side.wait_stream(cur)
            with torch.cuda.stream(side):  # compile / autotune / fill caches outside the capture
                body(buf.q, buf.k, buf.v, buf.out)
            cur.wait_stream(side)
            torch.cuda.synchronize(q.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                extra = body(buf.q, buf.k, buf.v, buf.out)
            buf.done.record(cur)
        from sparseattn._cache import all_caches

        keep: list[Any] = [body]
        for cache in all_caches().values():
            keep.extend(cache.values())
        return _Entry(graph, extra, keep)
