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
2. replays the graph (predictor kernels, attention kernel, density accounting: a predictor's selected
   block counts are added on the device to a per-graph sum, :class:`DensityAccumulator`, so nothing is
   copied or read per call);
3. returns the static output ``(B, N, H, D)`` itself (under ``torch.no_grad`` / inference; with grad
   enabled, where autograd would keep it as the output projection's saved input, a clone). It is
   overwritten by the next replay of a graph of that shape, so a replay first checks that no caller still
   holds the previous output (the storage's use count, the check torch's own CUDA-graph trees make); if one
   does, this call runs the body eagerly into a new tensor instead (``stats["held"]``). A model layer hands
   its attention output to its output projection and drops it, so in an inference forward every replay
   finds the buffer free and nothing is cloned.

**Direct replays.** In a steady-state eager forward PyTorch's caching allocator hands each layer the
same addresses for its ``q``, ``k``, ``v`` call after call. So each key also gets a second graph,
captured on the call's own tensors (no static inputs): a later call whose three tensors have the
same data pointers and strides replays it without the three copies; any other call takes the copy
path above. The direct graph reads memory it does not own, which is why it runs only when all three
pointers and strides match (then that memory *is* this call's input). A key whose addresses keep
moving is re-captured at most :data:`_MAX_DIRECT_TRIES` times, then uses the copy path only.
:attr:`LayerGraphs.stats` counts direct and copy replays.

**Fast lane.** :class:`FastLane` is what :class:`~sparseattn.integrations.handle.PatchHandle`
keeps per graphed layer so that a repeated call skips the general checks: it compares the call with
the one it was made for (shapes, dtypes, device, scale, window, no mask, no capture, same predictor,
no option that needs the host) and replays, or hands the call back to the general path. Captures use
``CUDAGraph.capture_begin``/``capture_end`` directly, not ``torch.cuda.graph`` (which empties the
allocator's cache and so moves the addresses the direct graphs rely on).

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

__all__ = ["LayerGraphs", "FastLane", "DensityAccumulator", "DEFAULT_MAX_NUMEL"]

#: largest ``q.numel()`` graphed by default (above it the GPU time dominates the host work)
DEFAULT_MAX_NUMEL = 1 << 26
_MAX_SHAPES = 4  # static buffer sets kept (least recently used shape dropped, with its graphs)
_MAX_FAILED = 512  # keys remembered as "capture failed"
_MAX_DIRECT_TRIES = 3  # captures of a key's direct graph (its input addresses moved) before it keeps to copies


def _uses(t: torch.Tensor) -> int:
    """How many references the storage of ``t`` has (tensors and views of it, storage objects)."""
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


class DensityAccumulator:
    """A graphed predictor layer's selected-block counts, summed on the device over its calls.

    The layer body calls :meth:`add` with the layout's ``[B, H]`` counts (inside the graph: a replay adds
    its counts with one small kernel; no clone, no host read). The handle counts the calls (``calls``) and
    zeroes both in :meth:`reset`; ``density()`` is the mean ``[H]`` density over those calls (a host read
    only when a report asks for it).
    """

    __slots__ = ("sum", "avail", "calls")

    def __init__(self) -> None:
        self.sum: torch.Tensor | None = None
        self.avail = 1
        self.calls = 0

    def add(self, counts: torch.Tensor, avail: int) -> None:
        if self.sum is None:  # the first (eager, uncaptured) run allocates the sum outside any graph pool
            self.sum = torch.zeros(counts.shape, dtype=torch.int64, device=counts.device)
            self.avail = max(int(avail), 1)
        self.sum.add_(counts)

    def reset(self) -> None:
        """Zero the device sum (stream-ordered after the calls already queued) and the call count."""
        if self.sum is not None:
            self.sum.zero_()
        self.calls = 0

    def density(self) -> torch.Tensor:
        """Mean per-head ``[H]`` float64 density over the counted calls."""
        if self.sum is None or self.calls == 0:
            raise RuntimeError("DensityAccumulator.density: no call was counted")
        return self.sum.mean(0, dtype=torch.float64) / (self.avail * self.calls)


@dataclass
class _Buffers:
    """Static inputs and output of one shape; one call uses them at a time, in stream order."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor  # (B, N, H, D)
    base_uses: int = 0  # the storage use count of ``out`` when nothing but the buffer holds it
    lock: threading.Lock = field(default_factory=threading.Lock)
    # the stream of the last call; a call on another stream first waits for everything queued on it (the
    # readers of the last output included); calls on one stream are ordered by the stream itself
    stream: Any = None
    stream_raw: int | None = None  # ``stream.cuda_stream``
    graphs: dict[tuple[Any, ...], "_Entry"] = field(default_factory=dict)  # this shape's graphs, by layer key


@dataclass
class _Direct:
    """A graph captured on one call's own q/k/v: valid only for calls whose tensors sit at ``sig``."""

    graph: Any
    extra: Any
    sig: tuple[Any, ...]  # data pointers and strides of q, k, v at capture


@dataclass
class _Entry:
    graph: Any
    extra: Any  # the body's static side output (density counts) or None
    body: Callable[..., Any]
    # what the graph reads but does not own: the body (and the layout its closure holds) and every
    # module-cache value at capture time (geometry tables, bands, dense layouts), so a later cache
    # eviction cannot free memory a replay still reads
    keep_alive: list[Any] = field(default_factory=list)
    direct: _Direct | None = None
    direct_tries: int = 0


def _sig(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[Any, ...]:
    return (q.data_ptr(), k.data_ptr(), v.data_ptr(), q.stride(), k.stride(), v.stride())


def _capture(body: Callable[..., Any], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             out: torch.Tensor) -> tuple[Any, Any]:
    """``(graph, extra)``: ``body(q, k, v, out)`` captured on a side stream (no cache emptying, see above)."""
    cur = torch.cuda.current_stream(q.device)
    side = torch.cuda.Stream(device=q.device)
    side.wait_stream(cur)
    torch.cuda.synchronize(q.device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side):
        graph.capture_begin(capture_error_mode="thread_local")
        try:
            extra = body(q, k, v, out)
        finally:
            graph.capture_end()
    cur.wait_stream(side)
    return graph, extra


@dataclass
class FastLane:
    """One graphed layer call, remembered so that the same call again goes straight to the replay.

    ``check`` holds what the call must equal (shapes, dtypes, device, scale and window keyword
    arguments); the handle-level conditions are checked by the caller (see ``PatchHandle._forward``).
    """

    check: tuple[Any, ...]
    buf: "_Buffers"
    entry: _Entry
    pred: Any  # the layer's predictor object when the graph was made (None for static layouts)
    density: Any  # the static layout's density entry, or None: the replay's counts go to ``accum``
    accum: DensityAccumulator | None  # the graph's device-side density sum (predicted layouts)
    quant: bool
    backend: str  # what ran it, for ``PatchHandle.backends_used``
    auto: Any = None  # dense_above="auto": the layer's AutoDense state (a call it does not pass leaves the lane)
    dense: bool = False  # the lane of a dense_above="auto" fallback (SDPA graph), not of a sparse call


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
        #: ``{"direct": replays without input copies, "copy": replays through the static inputs,
        #: "direct_captures": direct graphs captured, "direct_failed": direct captures that failed}``
        #: "held": calls run eagerly because a caller still held the buffers' previous output
        self.stats = {"direct": 0, "copy": 0, "direct_captures": 0, "direct_failed": 0, "held": 0}
        #: ``{layer: FastLane}`` of the last graphed call per layer (see :class:`FastLane`)
        self.fast: dict[int, FastLane] = {}
        self.last: tuple[_Buffers, _Entry] | None = None  # buffers and entry of the last replay
        self.direct_error: str | None = None  # the last direct capture's failure, if any

    def clear(self) -> None:
        """Drop every graph and buffer (their memory is released when no call holds them)."""
        self._buffers.clear()
        self._failed.clear()
        self.fast.clear()
        self.last = None

    def _static(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> _Buffers:
        key = (tuple(q.shape), tuple(k.shape), tuple(v.shape), q.dtype, k.dtype, str(q.device))
        B, H, N, D = q.shape

        def build() -> _Buffers:
            out = torch.empty((B, N, H, D), dtype=q.dtype, device=q.device)
            return _Buffers(torch.empty(q.shape, dtype=q.dtype, device=q.device),
                            torch.empty(k.shape, dtype=k.dtype, device=k.device),
                            torch.empty(v.shape, dtype=v.dtype, device=v.device), out, _uses(out))

        return self._buffers.get_or_build(key, build)

    def run(self, key: tuple[Any, ...], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            body: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], Any],
            what: str) -> tuple[torch.Tensor, Any] | None:
        """``(out (B, N, H, D), extra)`` from the graph of ``key``, or None when this key runs eagerly.

        ``body(q, k, v, out)`` writes attention into ``out`` and returns a tensor (or None) that is
        cloned after each replay (tensors, also inside a tuple; other values are returned as they
        were at capture); it must launch GPU work only (no host reads). ``out`` is the static output
        (see the module docstring, step 3).
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
        self.last = (buf, entry)
        return self.replay(buf, entry, q, k, v)

    def replay(self, buf: _Buffers, entry: _Entry, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """``(out, extra)`` of one replay of ``entry``: its direct graph when q/k/v sit where it reads, else copies.

        ``out`` is the static output buffer; if a caller still holds its previous contents the body runs
        eagerly into a new tensor instead (the graph would overwrite what the caller holds).
        """
        if _uses(buf.out) != buf.base_uses:
            with buf.lock:
                B, H, N, D = q.shape
                out = torch.empty((B, N, H, D), dtype=q.dtype, device=q.device)
                extra = entry.body(q, k, v, out)
                self.stats["held"] += 1
            return out, extra
        sig = _sig(q, k, v)
        d = entry.direct
        if (d is None or d.sig != sig) and entry.direct_tries < _MAX_DIRECT_TRIES:
            d = self._capture_direct(buf, entry, q, k, v, sig)  # captures only: nothing runs, no buffer is written
        raw = torch._C._cuda_getCurrentRawStream(q.device.index)  # an int: cheaper than a Stream object per call
        with buf.lock:
            if raw != buf.stream_raw:  # the buffers' last user was another stream: wait for its work
                stream = torch.cuda.current_stream(q.device)
                if buf.stream is not None:
                    stream.wait_stream(buf.stream)
                buf.stream, buf.stream_raw = stream, raw
            if d is not None and d.sig == sig:
                d.graph.replay()
                extra = None if d.extra is None else _clone(d.extra)
                self.stats["direct"] += 1
            else:
                buf.q.copy_(q)
                buf.k.copy_(k)
                buf.v.copy_(v)
                entry.graph.replay()
                extra = None if entry.extra is None else _clone(entry.extra)
                self.stats["copy"] += 1
            # with grad enabled autograd may save the output (the projection's input): hand out a copy. Else a new
            # view (its own TensorImpl) rather than ``buf.out``: while the caller holds it, or any view of it, the
            # storage's use count stays above ``base_uses`` and the next replay knows
            out = buf.out.clone() if torch.is_grad_enabled() else buf.out.view(buf.out.shape)
        self.replays += 1
        return out, extra

    def _capture_direct(self, buf: _Buffers, entry: _Entry, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        sig: tuple[Any, ...]) -> _Direct | None:
        """Capture ``entry``'s body on these very tensors (see "Direct replays"); None if that fails."""
        from sparseattn.predictors.graphed import _CAPTURE_LOCK, _end_failed_capture

        entry.direct_tries += 1
        with _CAPTURE_LOCK:
            try:
                graph, extra = _capture(entry.body, q, k, v, buf.out)
            except Exception as exc:  # noqa: BLE001 - the copy graph (captured from the same body) still serves
                entry.direct_tries = _MAX_DIRECT_TRIES
                self.stats["direct_failed"] += 1
                self.direct_error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
                _end_failed_capture(q.device)
                return entry.direct
        entry.direct = _Direct(graph, extra, sig)
        self.stats["direct_captures"] += 1
        return entry.direct

    def _capture(self, buf: _Buffers, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 body: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], Any]) -> _Entry:
        with buf.lock:
            cur = torch.cuda.current_stream(q.device)
            if buf.stream is not None and buf.stream != cur:
                cur.wait_stream(buf.stream)
            buf.q.copy_(q)
            buf.k.copy_(k)
            buf.v.copy_(v)
            side = torch.cuda.Stream(device=q.device)
            side.wait_stream(cur)
            with torch.cuda.stream(side):  # compile / autotune / fill caches outside the capture
                body(buf.q, buf.k, buf.v, buf.out)
                accum = getattr(body, "accum", None)
                if accum is not None:  # the warm-up is not a call: its counts are not the caller's
                    accum.reset()
            cur.wait_stream(side)
            graph, extra = _capture(body, buf.q, buf.k, buf.v, buf.out)
            buf.stream, buf.stream_raw = cur, cur.cuda_stream
        from sparseattn._cache import all_caches

        keep: list[Any] = [body]
        for cache in all_caches().values():
            keep.extend(cache.values())
        return _Entry(graph, extra, body, keep)
