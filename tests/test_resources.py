"""Resources: repeated calls grow no memory, every cache is bounded, concurrent callers are safe (CPU).

* 1,000 calls of ``attention`` (reference backend, with and without a layout) and of each predictor
  at a fixed shape: Python-object growth (``tracemalloc``) and RSS growth over the last 900 calls
  stay under thresholds that a deliberate leak exceeds (checked by ``test_leak_detector_*``).
* each bounded cache stays within its bound when fed more distinct keys than the bound.
* 2 and 4 threads calling ``attention`` / a shared predictor with different shapes get exactly the
  single-threaded results; the Triton launcher under the interpreter likewise (tiny shapes).

The GPU counterpart is ``benchmarks/gpu_resources.py``.
"""

from __future__ import annotations

import ctypes
import gc
import inspect
import os
import random
import sys
import threading
import tracemalloc
from collections.abc import Callable
from typing import Any

import pytest
import torch

from sparseattn.testing.tolerances import HALF_ATOL, HALF_RTOL  # noqa: E402

try:  # imported here, not inside a traced window (an import allocates Python objects)
    import psutil
except ImportError:  # pragma: no cover - /proc/self/statm is the fallback
    psutil = None

import sparseattn
from sparseattn._cache import BoundedCache, all_caches, device_key
from sparseattn.layout.block_layout import BlockLayout
from sparseattn.predictors import parse_predictor_spec
from sparseattn.testing.inputs import random_qkv, structured_qkv

CALLS = 1000  # calls per workload
BASELINE_AT = 100  # memory is measured after this many calls, then again after the rest (900)
PY_LIMIT = 32 * 1024  # bytes of Python objects over 900 calls: ~36 B/call; steady state measures < 5 KiB
RSS_LIMIT = 2 * 1024 * 1024  # bytes of resident memory over 900 calls

# (B, H, H_kv, N, D): small, so 1,000 calls of each workload take about a second on one CPU core
SHAPE = (1, 2, 1, 128, 16)

PREDICTOR_SPECS = [
    "mean_sim",
    "mean_sim:score=mixed,cdf_threshold=0.97,keep_local=8",
    "sketch_walk",
    "oracle",
    "static:pattern=sink_window,sink_blocks=1,window_blocks=2",
    "static:pattern=random,density=0.4,seed=3",
]


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    # Tiny shapes gain nothing from intra-op threads, and on a loaded 2-core machine OpenMP's spinning
    # workers make timings erratic (and oversubscribe the cores in the multi-threaded tests).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- measurement
def _rss_bytes() -> int:
    if psutil is not None:
        return int(psutil.Process().memory_info().rss)
    with open("/proc/self/statm") as f:  # pragma: no cover - without psutil
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _trim_heap() -> None:
    """Return free heap pages to the OS (glibc ``malloc_trim``), so RSS growth after this point means new
    live memory. Without it, memory freed by earlier tests is reused silently and a leak of small tensors
    can hide inside it (seen in the full suite: RSS +0 B for a 16 KiB-per-call leak)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # pragma: no cover - not glibc: RSS is then a coarser measure
        pass


def _growth(fn: Callable[[], Any], calls: int = CALLS, baseline_at: int = BASELINE_AT) -> tuple[int, int]:
    """(Python bytes, RSS bytes) grown between call ``baseline_at`` and call ``calls`` of ``fn``."""
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    try:
        for _ in range(baseline_at):  # warm-up: caches, allocator pools, lazy imports
            fn()
        gc.collect()
        _trim_heap()
        py0, rss0 = tracemalloc.get_traced_memory()[0], _rss_bytes()
        for _ in range(calls - baseline_at):
            fn()
        gc.collect()
        # trimmed at both ends: RSS then compares live memory, not how much freed memory the allocator keeps
        # cached (after the whole suite, fragmentation left 4-10 MiB of freed pages resident with no leak)
        _trim_heap()
        return tracemalloc.get_traced_memory()[0] - py0, _rss_bytes() - rss0
    finally:
        if not was_tracing:
            tracemalloc.stop()


def _assert_no_growth(what: str, fn: Callable[[], Any]) -> None:
    py, rss = _growth(fn)
    assert py < PY_LIMIT, f"{what}: Python objects grew {py} B over {CALLS - BASELINE_AT} calls (limit {PY_LIMIT})"
    assert rss < RSS_LIMIT, f"{what}: RSS grew {rss / 2**20:.2f} MiB over {CALLS - BASELINE_AT} calls (limit 2 MiB)"


def _qkv(shape=SHAPE, seed=0, dtype=torch.float32):
    B, H, Hkv, N, D = shape
    return structured_qkv(B, H, N, D, kv_heads=Hkv, seed=seed, dtype=dtype)


# --------------------------------------------------------------------------- (a) no growth
def test_leak_detector_catches_a_leak():
    """The thresholds are meaningful: a per-call leak of a small object or of one output tensor is caught."""
    q, k, v = _qkv()
    sink: list[Any] = []
    py, _ = _growth(lambda: sink.append([0.0]), calls=CALLS)  # one small list per call (~64 B)
    assert py >= PY_LIMIT, f"a 64-byte-per-call Python leak went unnoticed ({py} B)"
    sink.clear()
    out_bytes = q.numel() * q.element_size()  # 16 KiB
    _, rss = _growth(lambda: sink.append(sparseattn.attention(q, k, v, causal=True, backend="reference").out))
    assert rss >= RSS_LIMIT, f"a {out_bytes} B-per-call tensor leak went unnoticed (RSS +{rss} B)"
    sink.clear()


@pytest.mark.parametrize("with_layout", [False, True], ids=["dense", "layout"])
def test_attention_repeated_calls_grow_no_memory(with_layout):
    q, k, v = _qkv()
    B, H, _, N, _ = SHAPE
    layout = sparseattn.sliding_window_layout(N, N, window_blocks=1, block_m=64, block_n=64, batch=B, heads=H) \
        if with_layout else None
    _assert_no_growth(f"attention(layout={with_layout})",
                      lambda: sparseattn.attention(q, k, v, causal=True, layout=layout, backend="reference"))


@pytest.mark.parametrize("spec", PREDICTOR_SPECS)
def test_predictor_repeated_calls_grow_no_memory(spec):
    q, k, _ = _qkv()
    pred = parse_predictor_spec(spec)
    _assert_no_growth(spec, lambda: pred.predict(q, k, causal=True))


def test_stateful_sketch_walk_over_layers_grows_no_memory():
    """SketchWalk's cross-layer state is replaced, not accumulated: 4 layers per "forward", reset between."""
    q, k, _ = _qkv()
    pred = parse_predictor_spec("sketch_walk:dense_layers=1")
    step = iter(range(10**9))

    def call() -> None:
        layer = next(step) % 4
        if layer == 0:
            pred.reset()
        pred.predict(q, k, causal=True, layer=layer)

    _assert_no_growth("sketch_walk(layer=0..3)", call)


# --------------------------------------------------------------------------- (b) bounded caches
def test_bounded_cache_lru_and_bound():
    c: BoundedCache[int, int] = BoundedCache(3)
    for i in range(3):
        c.put(i, i * 10)
    assert c.get(0) == 0  # 0 becomes most recent: 1 is the least recently used
    c.put(3, 30)
    assert len(c) == 3 and 1 not in c and c.keys() == [2, 0, 3] and c.evictions == 1
    assert c.get_or_build(4, lambda: 40) == 40 and len(c) == 3
    assert c.get_or_build(4, lambda: 99) == 40  # a hit never rebuilds
    assert c.get_or_build(5, lambda: 50, store=False) == 50 and 5 not in c
    with pytest.raises(KeyError):
        c[123]
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="maxsize"):
            BoundedCache(bad)
    assert device_key("cpu") == "cpu" and device_key(torch.device("cpu")) == "cpu"


def test_bounded_cache_race_builds_twice_but_returns_one_value():
    """Two threads missing the same key both build; both get the first stored value (never a half-built one)."""
    c: BoundedCache[str, list[int]] = BoundedCache(4)
    both_inside = threading.Barrier(2)
    built: list[list[int]] = []
    got: list[list[int]] = [[], []]

    def build() -> list[int]:
        both_inside.wait(timeout=10)
        val = [len(built)]
        built.append(val)
        return val

    def worker(i: int) -> None:
        got[i] = c.get_or_build("k", build)

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert len(built) == 2  # both missed and built
    assert got[0] is got[1] is c.get("k")  # one value shared by every caller


def test_module_caches_are_registered_and_bounded():
    from sparseattn.ops import triton_launch as tl
    from sparseattn.predictors import _common

    caches = all_caches()
    for name, bound in (("predictors._GEOM_CACHE", _common._GEOM_CACHE_MAX), ("triton_launch._TUNED", tl._TUNED_MAX),
                        ("triton_launch._DENSE_BASE", tl._DENSE_BASE_MAX)):
        assert name in caches and caches[name].maxsize == bound
    # functools caches of the launcher: bounded, or argument-free (a single entry)
    for attr in vars(tl).values():
        info = getattr(attr, "cache_info", None)
        if callable(info):
            assert info().maxsize is not None or not inspect.signature(attr).parameters, attr


def test_geometry_cache_evicts_beyond_its_bound():
    from sparseattn.predictors import _common

    bound = _common._GEOM_CACHE.maxsize
    for n in range(1, bound + 60):
        region = _common.causal_region(n, n, 16, 16, True, torch.device("cpu"))
        assert len(_common._GEOM_CACHE) <= bound
    assert region.shape == (-(-n // 16), -(-n // 16))
    # an evicted key is rebuilt correctly
    first = _common.causal_region(1, 1, 16, 16, True, torch.device("cpu"))
    assert first.shape == (1, 1) and bool(first.all())


def test_launcher_caches_evict_beyond_their_bounds():
    from sparseattn.ops import triton_launch as tl

    bound = tl._DENSE_BASE.maxsize
    for i in range(1, bound + 10):
        num, idx = tl._dense_layout_base(64 * i, 64 * i, 64, 64, False, "cpu")
        assert len(tl._DENSE_BASE) <= bound
        assert num.shape == (1, 1, i) and idx.shape == (1, 1, i, i)
    lay = tl._dense_layout(2, 3, 200, 200, True, torch.device("cpu"))
    assert (lay.batch, lay.heads, lay.seqlen_q) == (2, 3, 200)

    fake = [("test_resources", i) for i in range(tl._TUNED.maxsize + 20)]
    try:
        for key in fake:
            tl._TUNED.put(key, {"BLOCK_M": 64})
            assert len(tl._TUNED) <= tl._TUNED.maxsize
    finally:
        for key in fake:
            tl._TUNED.pop(key, None)


def test_graphed_predictor_caches_are_bounded():
    from sparseattn.predictors.graphed import GraphedPredictor

    g = GraphedPredictor(parse_predictor_spec("mean_sim"), max_graphs=3)
    assert g._entries.maxsize == 3 and g._inputs.maxsize == 3 and g._eager_keys.maxsize >= 1
    for bad in (0, -2, True, 2.0):
        with pytest.raises(ValueError, match="max_graphs"):
            GraphedPredictor(parse_predictor_spec("mean_sim"), max_graphs=bad)
    assert "" not in all_caches()  # per-wrapper caches are not registered (they die with the wrapper)


# --------------------------------------------------------------------------- (c) threads
THREAD_SHAPES = [  # (B, H, H_kv, N, D): every thread its own shape
    (1, 2, 1, 96, 16),
    (1, 2, 2, 160, 16),
    (2, 1, 1, 64, 32),
    (1, 4, 2, 130, 16),
]


def _run_threads(n_threads: int, work: Callable[[int], None]) -> None:
    """Run ``work(i)`` in ``n_threads`` threads started together; re-raise the first exception."""
    start = threading.Barrier(n_threads)
    errors: list[BaseException] = []

    def target(i: int) -> None:
        try:
            start.wait(timeout=30)
            work(i)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    ts = [threading.Thread(target=target, args=(i,)) for i in range(n_threads)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads far more often than the default 5 ms: races show up
    try:
        for t in ts:
            t.start()
        for t in ts:
            t.join(timeout=120)
    finally:
        sys.setswitchinterval(interval)
    assert not any(t.is_alive() for t in ts), "a worker thread hung"
    if errors:
        raise errors[0]


def _layout_for(shape) -> BlockLayout:
    B, H, _, N, _ = shape
    return sparseattn.sink_window_layout(N, N, sink_blocks=1, window_blocks=1, block_m=32, block_n=32, batch=B, heads=H)


@pytest.mark.parametrize("n_threads", [2, 4])
def test_attention_threads_with_different_shapes(n_threads):
    shapes = THREAD_SHAPES[:n_threads]
    inputs = [_qkv(s, seed=i) for i, s in enumerate(shapes)]
    layouts = [_layout_for(s) if i % 2 else None for i, s in enumerate(shapes)]
    expect = [sparseattn.attention(*inputs[i], causal=True, layout=layouts[i], backend="reference")
              for i in range(n_threads)]

    def work(i: int) -> None:
        for _ in range(40):
            out, lse = sparseattn.attention(*inputs[i], causal=True, layout=layouts[i], backend="reference")
            assert torch.equal(out, expect[i].out) and torch.equal(lse, expect[i].lse), f"thread {i}: result differs"

    _run_threads(n_threads, work)


@pytest.mark.parametrize("n_threads", [2, 4])
@pytest.mark.parametrize("spec", ["mean_sim", "mean_sim:score=mixed,cdf_threshold=0.97,keep_local=8", "sketch_walk",
                                  "oracle", "sampled:rows_per_block=4,block_m=16,block_n=16",
                                  "static:pattern=sink_window,sink_blocks=1,window_blocks=2"])
def test_shared_predictor_threads_with_different_shapes(spec, n_threads):
    pred = parse_predictor_spec(spec)  # one instance shared by every thread
    shapes = THREAD_SHAPES[:n_threads]
    inputs = [_qkv(s, seed=i)[:2] for i, s in enumerate(shapes)]
    expect = [pred.predict(q, k, causal=True) for q, k in inputs]

    def work(i: int) -> None:
        q, k = inputs[i]
        for _ in range(30):
            lay = pred.predict(q, k, causal=True)
            assert lay.seqlen_q == shapes[i][3] and lay.batch == shapes[i][0], f"thread {i}: another shape's layout"
            assert torch.equal(lay.kv_num_blocks, expect[i].kv_num_blocks), f"thread {i}: kv_num_blocks differ"
            assert torch.equal(lay.kv_indices, expect[i].kv_indices), f"thread {i}: kv_indices differ"

    _run_threads(n_threads, work)


def test_geometry_cache_under_concurrent_eviction():
    """4 threads over more distinct geometries than the cache holds: every lookup returns its own key's tensor."""
    from sparseattn.predictors import _common

    cpu = torch.device("cpu")
    geoms = [(nq, nkv, bm, c) for nq in range(8, 8 * 76, 8) for nkv in (nq, nq + 40) for bm in (16, 32)
             for c in (True, False)]  # 600 geometries: most lookups miss and evict
    want = {g: _common.causal_region(g[0], g[1], g[2], g[2], g[3], cpu).clone() for g in geoms}
    assert len(geoms) * 2 > _common._GEOM_CACHE.maxsize  # regions + local masks below: eviction is certain

    def work(i: int) -> None:
        rng = random.Random(i)
        for _ in range(2000):
            g = rng.choice(geoms)
            got = _common.causal_region(g[0], g[1], g[2], g[2], g[3], cpu)
            assert torch.equal(got, want[g]), f"thread {i}: wrong region for {g}"
            loc = _common.local_mask(g[0], g[1], g[2], g[2], 2, g[3], cpu)
            assert loc.shape == got.shape, f"thread {i}: wrong local mask for {g}"

    _run_threads(4, work)
    assert len(_common._GEOM_CACHE) <= _common._GEOM_CACHE.maxsize


# --------------------------------------------------------------------------- (d) launcher under the interpreter
def _interpreter_available() -> bool:
    from sparseattn.ops.triton_launch import _triton_import_error, interpret_mode

    return interpret_mode() and _triton_import_error() is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter test; the GPU runs benchmarks/gpu_resources.py")
def test_triton_interpreter_threads_with_different_shapes():
    if not _interpreter_available():
        pytest.skip("the Triton interpreter is not available (TRITON_INTERPRET unset or triton missing)")
    # (B, H, N): tiny, the interpreter costs ~20-50 ms per launch here
    shapes = [(1, 1, 64), (1, 2, 128)]
    cases = []
    for i, (B, H, N) in enumerate(shapes):
        q, k, v = random_qkv(B, H, N, 64, seed=i, dtype=torch.float16)
        lay = None if i == 0 else sparseattn.sliding_window_layout(N, N, window_blocks=1, block_m=64, block_n=64,
                                                                    batch=B, heads=H)
        cases.append((q, k, v, lay))
    expect = [sparseattn.attention(q, k, v, causal=True, layout=lay, backend="triton") for q, k, v, lay in cases]
    ref = [sparseattn.attention(q.float(), k.float(), v.float(), causal=True, layout=lay, backend="reference")
           for q, k, v, lay in cases]
    for e, r in zip(expect, ref):
        torch.testing.assert_close(e.out.float(), r.out, atol=HALF_ATOL, rtol=HALF_RTOL)

    def work(i: int) -> None:
        q, k, v, lay = cases[i]
        for _ in range(6):
            out, lse = sparseattn.attention(q, k, v, causal=True, layout=lay, backend="triton")
            assert torch.equal(out, expect[i].out) and torch.equal(lse, expect[i].lse), f"thread {i}: result differs"

    _run_threads(2, work)


def test_launch_lock_is_reentrant_and_released():
    from sparseattn.ops import triton_launch as tl

    with tl._LAUNCH_LOCK:
        with tl._LAUNCH_LOCK:  # an autotuner hook launching again from inside a launch must not deadlock
            pass
    assert tl._LAUNCH_LOCK.acquire(blocking=False)
    tl._LAUNCH_LOCK.release()

