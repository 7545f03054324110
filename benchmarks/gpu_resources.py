"""Resources on the device: repeated calls grow no memory; concurrent threads get exact results.

1. **Repeated calls** (``--calls``, default 1,000) at a fixed shape of: ``attention`` on the Triton
   backend (bf16, B=1, H=8, N=4096, D=128, causal; without and with a layout), each predictor, and
   a CUDA-graphed predictor. After ``--warmup`` calls (autotuning, caches, allocator pools) the
   script records ``torch.cuda.memory_allocated()``, the host RSS and the traced Python memory, runs
   the remaining calls and checks the growth against limits that a per-call leak of one 512-byte
   block (GPU) / ~70 bytes of Python objects would exceed.
2. **Threads**: 2 and 4 threads call the kernel with different shapes (dtype, head_dim, causal,
   layout or none, batch, GQA), each on its own CUDA stream and then all on the default stream,
   ``--iters`` (default 200) calls each. The launcher's remembered autotune choices are cleared
   first, so the threads' first calls go through the (lock-serialised) autotuner dispatch. Every
   result is compared *bitwise* with a single-threaded result computed beforehand (the kernel is
   deterministic for a fixed config).
3. **Graphed predictor under threads** (CUDA only): one shared ``GraphedPredictor`` called by 2 and
   4 threads with different shapes (each its own stream) matches the eager predictor bitwise; with
   ``max_graphs=2`` and 3 shapes the graph cache stays at 2 and results stay correct.

Prints a table, writes ``gpu_resources.json`` under ``--out`` (default ``$OUT/gpu_resources``) and
exits non-zero on any failure. Meant to finish in under 2 minutes on an H200.

``--small`` runs tiny shapes and few calls; with ``TRITON_INTERPRET=1`` on a CPU-only machine it
smoke-tests the script through Triton's interpreter (the graphed section needs CUDA and is skipped).

Usage: ``PYTHONPATH=src python3 benchmarks/gpu_resources.py`` (``--small`` on CPU).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import threading
import time
import traceback
import tracemalloc
from collections.abc import Callable
from typing import Any

if "--small" in sys.argv and "TRITON_INTERPRET" not in os.environ:
    try:
        import torch as _t

        if not _t.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"  # must precede the first triton import
    except ImportError:  # pragma: no cover
        pass

import torch

try:  # imported here, not inside a traced window (an import allocates Python objects)
    import psutil
except ImportError:  # pragma: no cover - /proc/self/statm is the fallback
    psutil = None

import sparseattn
from sparseattn.layout.patterns import random_layout, sliding_window_layout
from sparseattn.ops import triton_launch as tl
from sparseattn.predictors.resolve import resolve_predictor

GPU_LIMIT = 256 * 1024  # bytes of torch.cuda.memory_allocated growth (a leaked 512 B block per call: 450 KiB)
RSS_LIMIT = 8 * 1024 * 1024  # bytes of host RSS growth
PY_LIMIT = 64 * 1024  # bytes of traced Python memory growth

PREDICTOR_SPECS = [
    "mean_sim",
    "mean_sim:score=mixed,cdf_threshold=0.97,keep_local=8",
    "sketch_walk",
    "oracle",
    "static:pattern=sink_window,sink_blocks=1,window_blocks=8",
]


def _rss() -> int:
    if psutil is not None:
        return int(psutil.Process().memory_info().rss)
    with open("/proc/self/statm") as f:  # without psutil
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _qkv(B: int, H: int, Hkv: int, N: int, D: int, dtype: torch.dtype, dev: torch.device, seed: int):
    g = torch.Generator(device="cpu").manual_seed(seed)
    mk = lambda h: torch.randn(B, h, N, D, generator=g).to(device=dev, dtype=dtype)  # noqa: E731
    return mk(H), mk(Hkv), mk(Hkv)


# --------------------------------------------------------------------------- 1. repeated calls
def measure_growth(name: str, fn: Callable[[], Any], calls: int, warmup: int, dev: torch.device) -> dict[str, Any]:
    for _ in range(warmup):
        fn()
    _sync(dev)
    gc.collect()
    tracemalloc.start()
    try:
        settle = min(20, (calls - warmup) // 4)
        for _ in range(settle):  # a few traced calls first: one-time traced objects settle
            fn()
        _sync(dev)
        gc.collect()
        gpu0 = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
        res0 = torch.cuda.memory_reserved(dev) if dev.type == "cuda" else 0
        py0, rss0 = tracemalloc.get_traced_memory()[0], _rss()
        n = calls - warmup - settle
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        _sync(dev)
        dt = time.perf_counter() - t0
        gc.collect()
        gpu = (torch.cuda.memory_allocated(dev) - gpu0) if dev.type == "cuda" else 0
        reserved = (torch.cuda.memory_reserved(dev) - res0) if dev.type == "cuda" else 0
        py, rss = tracemalloc.get_traced_memory()[0] - py0, _rss() - rss0
    finally:
        tracemalloc.stop()
    ok = gpu < GPU_LIMIT and rss < RSS_LIMIT and py < PY_LIMIT
    return {"name": name, "calls": calls, "measured_calls": n, "ms_per_call": 1e3 * dt / max(n, 1),
            "gpu_alloc_growth_B": gpu, "gpu_reserved_growth_B": reserved, "rss_growth_B": rss,
            "py_growth_B": py, "ok": ok}


def repeated_calls(args: argparse.Namespace, dev: torch.device) -> list[dict[str, Any]]:
    B, H, Hkv, N, D = (1, 8, 8, 4096, 128) if not args.small else (1, 2, 2, 128, 64)
    dtype = torch.bfloat16
    bs = 128 if not args.small else 64
    q, k, v = _qkv(B, H, Hkv, N, D, dtype, dev, seed=0)
    lay = random_layout(N, N, density=0.3, seed=1, block_m=bs, block_n=bs, batch=B, heads=H, causal=True,
                        keep_diagonal=True, device=dev)
    calls, warmup = args.calls, args.warmup
    rows = []
    work: list[tuple[str, Callable[[], Any], int]] = [
        (f"attention triton {tuple(q.shape)} causal", lambda: sparseattn.attention(q, k, v, causal=True, backend="triton"),
         calls),
        ("attention triton + layout d=0.3", lambda: sparseattn.attention(q, k, v, causal=True, layout=lay,
                                                                          backend="triton"), calls),
    ]
    # predictors read q/k only; on CPU (interpreter smoke run) they use the same small tensors
    pq, pk = q, k
    for spec in PREDICTOR_SPECS:
        pred = resolve_predictor(spec)
        work.append((f"predictor {spec}", (lambda p=pred: p.predict(pq, pk, causal=True)), args.pred_calls))
    if dev.type == "cuda":
        from sparseattn.predictors.graphed import GraphedPredictor

        gp = GraphedPredictor(resolve_predictor("mean_sim"))
        work.append(("graphed mean_sim", lambda: gp.predict(pq, pk, causal=True), args.pred_calls))
    for name, fn, n in work:
        t0 = time.time()
        try:
            row = measure_growth(name, fn, n, min(warmup, n // 2), dev)
        except Exception as exc:  # noqa: BLE001 - reported as a failed row
            traceback.print_exc()
            row = {"name": name, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
        row["wall_s"] = time.time() - t0
        rows.append(row)
        _print_growth(row)
    return rows


def _print_growth(r: dict[str, Any]) -> None:
    if "error" in r:
        print(f"  FAIL {r['name']:<58} {r['error']}", flush=True)
        return
    print(f"  {'ok  ' if r['ok'] else 'FAIL'} {r['name']:<58} {r['measured_calls']:5d} calls {r['ms_per_call']:7.3f} ms/call"
          f"  gpu {r['gpu_alloc_growth_B']:+9d} B  reserved {r['gpu_reserved_growth_B'] / 2**20:+6.1f} MiB"
          f"  rss {r['rss_growth_B'] / 2**20:+6.2f} MiB  py {r['py_growth_B']:+7d} B  ({r['wall_s']:.1f} s)", flush=True)


# --------------------------------------------------------------------------- 2. threads through the kernel
def thread_cases(small: bool, dev: torch.device) -> list[dict[str, Any]]:
    """Different shapes per thread: dtype, head_dim, causal, layout blocks, batch, GQA, length."""
    bf, f16 = torch.bfloat16, torch.float16
    if small:  # (B, H, H_kv, N, D, dtype, causal, layout)
        specs = [(1, 1, 1, 64, 64, f16, True, None), (1, 2, 1, 128, 64, bf, False, ("sw", 64)),
                 (2, 1, 1, 96, 64, f16, True, ("rand", 64)), (1, 2, 2, 128, 128, f16, True, None)]
    else:
        specs = [(1, 8, 2, 4096, 128, bf, True, None), (2, 4, 4, 2000, 128, bf, False, ("rand", 128)),
                 (1, 16, 4, 1024, 128, f16, True, ("sw", 128)), (1, 8, 8, 3000, 64, bf, True, ("rand", 64))]
    cases = []
    for i, (B, H, Hkv, N, D, dt, causal, lay) in enumerate(specs):
        q, k, v = _qkv(B, H, Hkv, N, D, dt, dev, seed=10 + i)
        layout = None
        if lay is not None:
            kind, bs = lay
            if kind == "sw":
                layout = sliding_window_layout(N, N, window_blocks=4, block_m=bs, block_n=bs, batch=B, heads=H,
                                               causal=causal, device=dev)
            else:
                layout = random_layout(N, N, density=0.4, seed=i, block_m=bs, block_n=bs, batch=B, heads=H,
                                       causal=causal, keep_diagonal=True, device=dev)
        cases.append({"shape": (B, H, Hkv, N, D), "dtype": str(dt).replace("torch.", ""), "causal": causal,
                      "layout": None if lay is None else f"{lay[0]}{lay[1]}", "q": q, "k": k, "v": v, "lay": layout})
    return cases


def _run(case: dict[str, Any]):
    return sparseattn.attention(case["q"], case["k"], case["v"], causal=case["causal"], layout=case["lay"],
                                backend="triton")


def run_threads(n_threads: int, iters: int, work: Callable[[int, int], None], streams: list[Any] | None) -> list[str]:
    """``work(thread, iteration)`` in ``n_threads`` threads (each on ``streams[i]`` if given); the errors."""
    errors: list[str] = []
    start = threading.Barrier(n_threads)

    def target(i: int) -> None:
        try:
            start.wait(timeout=60)
            ctx = torch.cuda.stream(streams[i]) if streams else _Null()
            with ctx:
                for it in range(iters):
                    work(i, it)
                if streams:
                    streams[i].synchronize()
        except BaseException as exc:  # noqa: BLE001
            errors.append(f"thread {i}: {type(exc).__name__}: {str(exc)[:300]}")

    ts = [threading.Thread(target=target, args=(i,)) for i in range(n_threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=300)
    if any(t.is_alive() for t in ts):
        errors.append("a thread hung (no exit within 300 s)")
    return errors


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> bool:
        return False


def kernel_threads(args: argparse.Namespace, dev: torch.device) -> list[dict[str, Any]]:
    cases = thread_cases(args.small, dev)
    t0 = time.time()
    expect = []
    for c in cases:  # single-threaded results (autotunes each key once)
        st = _run(c)
        expect.append((st.out.clone(), st.lse.clone()))
        again = _run(c)
        if not (torch.equal(again.out, expect[-1][0]) and torch.equal(again.lse, expect[-1][1])):
            raise RuntimeError(f"kernel not deterministic single-threaded for {c['shape']}")
    _sync(dev)
    print(f"  single-threaded references: {len(cases)} shapes in {time.time() - t0:.1f} s", flush=True)
    rows = []
    for n_threads in (2, 4):
        for mode in (("own", "default") if dev.type == "cuda" else ("default",)):
            tl._TUNED.clear()  # the threads' first calls go through the autotuner dispatch again
            streams = [torch.cuda.Stream(device=dev) for _ in range(n_threads)] if mode == "own" else None
            mismatches = [0] * n_threads
            checked = [0] * n_threads

            def work(i: int, it: int) -> None:
                c = cases[i % len(cases)]
                st = _run(c)
                ok = torch.equal(st.out, expect[i % len(cases)][0]) and torch.equal(st.lse, expect[i % len(cases)][1])
                checked[i] += 1
                if not ok:
                    mismatches[i] += 1

            t1 = time.time()
            errors = run_threads(n_threads, args.iters, work, streams)
            _sync(dev)
            row = {"threads": n_threads, "streams": mode, "iters": args.iters, "checked": sum(checked),
                   "mismatches": sum(mismatches), "errors": errors, "wall_s": time.time() - t1,
                   "shapes": [dict(shape=c["shape"], dtype=c["dtype"], causal=c["causal"], layout=c["layout"])
                              for c in cases[:n_threads]]}
            row["ok"] = not errors and row["mismatches"] == 0 and row["checked"] == n_threads * args.iters
            rows.append(row)
            print(f"  {'ok  ' if row['ok'] else 'FAIL'} kernel {n_threads} threads, {mode:7s} streams: "
                  f"{row['checked']} calls checked bitwise, {row['mismatches']} mismatches, {len(errors)} errors "
                  f"({row['wall_s']:.1f} s)" + (f"  first error: {errors[0]}" if errors else ""), flush=True)
    return rows


# --------------------------------------------------------------------------- 3. graphed predictor under threads
def graphed_threads(args: argparse.Namespace, dev: torch.device) -> list[dict[str, Any]]:
    from sparseattn.predictors.graphed import GraphedPredictor

    shapes = [(1, 8, 2, 4096, 128), (1, 4, 4, 2048, 128), (2, 8, 8, 1024, 64), (1, 16, 4, 3000, 128)]
    ins = [_qkv(*s, torch.bfloat16, dev, seed=30 + i)[:2] for i, s in enumerate(shapes)]
    eager = resolve_predictor("mean_sim")
    want = [eager.predict(q, k, causal=True) for q, k in ins]
    rows = []
    for n_threads, max_graphs in ((2, 64), (4, 64), (3, 2)):
        gp = GraphedPredictor(resolve_predictor("mean_sim"), max_graphs=max_graphs)
        streams = [torch.cuda.Stream(device=dev) for _ in range(n_threads)]
        bad = [0] * n_threads
        sizes: list[int] = []

        def work(i: int, it: int) -> None:
            q, k = ins[i]
            lay = gp.predict(q, k, causal=True)
            if not (torch.equal(lay.kv_num_blocks, want[i].kv_num_blocks) and torch.equal(lay.kv_indices, want[i].kv_indices)):
                bad[i] += 1
            sizes.append(len(gp._entries))

        iters = max(1, args.iters // 2)
        t1 = time.time()
        errors = run_threads(n_threads, iters, work, streams)
        _sync(dev)
        row = {"section": "graphed", "threads": n_threads, "max_graphs": max_graphs, "iters": iters,
               "mismatches": sum(bad), "errors": errors, "max_graphs_held": max(sizes or [0]), "wall_s": time.time() - t1}
        row["ok"] = not errors and row["mismatches"] == 0 and row["max_graphs_held"] <= max_graphs
        rows.append(row)
        print(f"  {'ok  ' if row['ok'] else 'FAIL'} graphed mean_sim {n_threads} threads, max_graphs={max_graphs}: "
              f"{sum(bad)} mismatches, {len(errors)} errors, at most {row['max_graphs_held']} graphs held "
              f"({row['wall_s']:.1f} s)" + (f"  first error: {errors[0]}" if errors else ""), flush=True)
    return rows


# --------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_out = os.path.join(os.environ["OUT"], "gpu_resources") if os.environ.get("OUT") else "device_out/gpu_resources"
    ap.add_argument("--out", default=default_out, help="folder for gpu_resources.json")
    ap.add_argument("--small", action="store_true", help="tiny shapes and few calls (CPU smoke run under TRITON_INTERPRET=1)")
    ap.add_argument("--calls", type=int, default=None, help="attention calls per workload (default 1000; --small 40)")
    ap.add_argument("--pred-calls", type=int, default=None, help="predictor calls per workload (default 1000; --small 200)")
    ap.add_argument("--warmup", type=int, default=100, help="calls before the memory baseline")
    ap.add_argument("--iters", type=int, default=None, help="calls per thread (default 200; --small 4)")
    args = ap.parse_args()
    args.calls = args.calls or (40 if args.small else 1000)
    args.pred_calls = args.pred_calls or (200 if args.small else 1000)
    args.iters = args.iters or (4 if args.small else 200)
    if args.small:
        args.warmup = min(args.warmup, 20)
        torch.set_num_threads(1)

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        dev = torch.device("cuda", torch.cuda.current_device())
    elif not tl.interpret_mode():
        print("no CUDA and TRITON_INTERPRET is not set: run with --small (sets it) or TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    from sparseattn.eval.env import environment

    # the one environment record; "device" keeps this report's wording (the GPU's name)
    info = {**environment(dev), "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (Triton interpreter)",
            "small": args.small,
            "limits": {"gpu_alloc_growth_B": GPU_LIMIT, "rss_growth_B": RSS_LIMIT, "py_growth_B": PY_LIMIT}}
    print(f"gpu_resources: {info['device']}, torch {info['torch']}, triton {info['triton']}"
          f"{' (--small)' if args.small else ''}", flush=True)
    t_all = time.time()
    result: dict[str, Any] = {"info": info}
    failed = False
    for section, fn in (("repeated_calls", repeated_calls), ("kernel_threads", kernel_threads),
                        ("graphed_threads", graphed_threads)):
        print(f"== {section}", flush=True)
        if section == "graphed_threads" and dev.type != "cuda":
            print("  skipped: CUDA graphs need CUDA", flush=True)
            result[section] = "skipped (no CUDA)"
            continue
        t0 = time.time()
        try:
            rows = fn(args, dev)
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            rows = [{"ok": False, "error": f"{type(exc).__name__}: {exc}"}]
        result[section] = rows
        failed |= not all(r.get("ok") for r in rows)
        print(f"  ({section}: {time.time() - t0:.1f} s)", flush=True)
    caches = {name: {"size": len(c), "maxsize": c.maxsize, "evictions": c.evictions}
              for name, c in __import__("sparseattn._cache", fromlist=["all_caches"]).all_caches().items()}
    over = [n for n, c in caches.items() if c["size"] > c["maxsize"]]
    failed |= bool(over)
    result["caches"] = caches
    result["wall_s"] = time.time() - t_all
    result["ok"] = not failed
    print("== caches: " + ", ".join(f"{n} {c['size']}/{c['maxsize']}" for n, c in caches.items()), flush=True)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "gpu_resources.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(f"== {'PASS' if not failed else 'FAIL'} in {result['wall_s']:.1f} s; wrote {path}", flush=True)
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
