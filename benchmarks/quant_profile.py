"""Where the quantized prefill's quantization time goes: host (Python, launches) or device (the kernels).

Issue 15 counts the fused quantization of Q/K/V in every benchmark. ``bench_quant.py`` reported 0.6-0.7 ms for it at
every shape from 4K to 32K (H=32, H_kv=8, D=128; BENCHMARKS.md, H200), which reads as a host-bound call. This script
separates the two, per option set (the defaults; K smoothing only), same process:

* ``host_us``: Python time of one eager ``quantize_qkv`` call (``perf_counter`` over ``--calls`` calls issued back to
  back, no synchronisation inside the loop; the GPU queue is drained before and after);
* ``eager_ms``: ``bench_ms`` of the eager call (CUDA events, median) -- what ``bench_quant.py`` reports as ``quant_ms``;
* ``graph_ms``: ``bench_ms`` of the same call replayed from a CUDA graph (device time, no host work);
* per-kernel device time (``torch.profiler``, CUDA activity, mean over ``--calls`` calls), largest first;
* the whole ``quantized_attention`` call at density 1.0 and 0.1, eager and graphed (a graph capture that fails means a
  host synchronisation inside the call; the error is printed).

    PYTHONPATH=src python3 benchmarks/quant_profile.py --seqlens 4096 32768 --out /tmp/qp

``--warps 4:8 8:8 ...`` times instead the default ``quantize_qkv`` graphed per (statistics, quantization) ``num_warps``
pair (``ops.quant._STATS_WARPS`` / ``_ROWS_WARPS``), with its per-kernel device times and whether every output equals
the first pair's bit for bit (``quant_warps.json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from kernel_variants import host_us_per_call  # noqa: E402

from sparseattn.layout.patterns import random_layout  # noqa: E402
from sparseattn.ops import quant as Q  # noqa: E402
from sparseattn.testing.timing import bench_ms, capture_graph  # noqa: E402

OPTIONS = {"default": (True, True), "k_only": (False, False)}  # (smooth_q, balance_qk); K smoothing always on


def kernel_times(fn: Callable[[], Any], calls: int) -> list[tuple[str, float, int]]:
    """(kernel name, mean device µs per call, launches per call) from ``torch.profiler``, largest first."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        dev = getattr(ev, "device_time_total", None)
        if dev is None:
            dev = getattr(ev, "cuda_time_total", 0.0)
        if dev and ev.count:
            rows.append((ev.key[:70], dev / calls, round(ev.count / calls)))
    rows.sort(key=lambda r: -r[1])
    return rows


def timed(name: str, fn: Callable[[], Any], calls: int) -> dict[str, Any]:
    rec: dict[str, Any] = {"row": name}
    fn()
    rec["host_us"] = round(host_us_per_call(fn, calls), 1)
    rec["eager_ms"] = round(bench_ms(fn), 4)
    try:
        rec["graph_ms"] = round(bench_ms(capture_graph(fn)), 4)
    except Exception as exc:  # a capture error means a host read inside the call
        rec["graph_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    return rec


def inputs(N: int, a: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded bf16 q, k, v of one sequence of ``N`` tokens at the script's head counts and head_dim."""
    g = torch.Generator(device="cuda").manual_seed(0)
    return tuple(torch.randn(1, h, N, a.head_dim, generator=g, device="cuda").to(torch.bfloat16)  # type: ignore[return-value]
                 for h in (a.heads, a.kv_heads, a.kv_heads))


def run_seqlen(N: int, a: argparse.Namespace) -> list[dict[str, Any]]:
    q, k, v = inputs(N, a)
    lays = {1.0: None, 0.1: random_layout(N, N, density=0.1, seed=1234, block_m=128, block_n=128, batch=1,
                                          heads=a.heads, causal=True, device="cuda")}
    rows: list[dict[str, Any]] = []
    for opt, (sq, bal) in OPTIONS.items():
        def quant(sq: bool = sq, bal: bool = bal) -> Any:
            return Q.quantize_qkv(q, k, v, smooth_q=sq, balance_qk=bal)

        rec = timed("quantize_qkv", quant, a.calls)
        rec.update(seqlen=N, options=opt, kernels=kernel_times(quant, a.calls))
        rows.append(rec)
        print(json.dumps({kk: vv for kk, vv in rec.items() if kk != "kernels"}), flush=True)
        for name, us, n in rec["kernels"][:12]:
            print(f"    {us:9.1f} us  x{n}  {name}", flush=True)
        for dens, lay in lays.items():
            def attn(lay: Any = lay, sq: bool = sq, bal: bool = bal) -> Any:
                return Q.quantized_attention(q, k, v, layout=lay, causal=True, smooth_q=sq, balance_qk=bal)

            rec = timed("quantized_attention", attn, max(3, a.calls // 4))
            rec.update(seqlen=N, options=opt, density=dens)
            rows.append(rec)
            print(json.dumps(rec), flush=True)
    return rows


def warps_sweep(N: int, pairs: list[str], a: argparse.Namespace) -> list[dict[str, Any]]:
    """``quantize_qkv`` (default options) graphed, per (statistics warps, quantization warps) pair, same inputs;
    every pair's outputs must equal the first pair's bit for bit (the warps change no arithmetic)."""
    q, k, v = inputs(N, a)
    saved = (Q._STATS_WARPS, Q._ROWS_WARPS)
    rows, first = [], None
    try:
        for pair in pairs:
            Q._STATS_WARPS, Q._ROWS_WARPS = (int(x) for x in pair.split(":"))

            def quant() -> Any:
                return Q.quantize_qkv(q, k, v)

            out = quant()
            ts = [t for t in (getattr(out, f.name) for f in dataclasses.fields(out)) if isinstance(t, torch.Tensor)]
            same = None if first is None else all(torch.equal(x, y) for x, y in zip(first, ts))
            first = first or ts
            rec = {"row": "quantize_qkv", "seqlen": N, "warps": pair, "equal_to_first": same,
                   "graph_ms": round(bench_ms(capture_graph(quant)), 4),
                   "kernels": kernel_times(quant, a.calls)}
            rows.append(rec)
            ks = ", ".join(f"{nm.split('(')[0][:24]} {us:.1f}" for nm, us, _ in rec["kernels"][:4])
            print(f"warps {pair:>6}  graph {rec['graph_ms']:.4f} ms  equal {same}  | {ks}", flush=True)
    finally:
        Q._STATS_WARPS, Q._ROWS_WARPS = saved
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqlens", nargs="+", type=int, default=[4096, 32768])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--warps", nargs="+", default=None, metavar="S:R",
                    help="instead of the profile: time quantize_qkv per (statistics, quantization) num_warps pair")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("quant_profile: no CUDA device", file=sys.stderr)
        return 2
    os.makedirs(a.out, exist_ok=True)
    print(f"quant_profile: {torch.cuda.get_device_name()} torch {torch.__version__}", flush=True)
    rows: list[dict[str, Any]] = []
    if a.warps:
        for N in a.seqlens:
            rows += warps_sweep(N, a.warps, a)
        with open(os.path.join(a.out, "quant_warps.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)
        return 0
    for N in a.seqlens:
        rows += run_seqlen(N, a)
        torch.cuda.empty_cache()
    with open(os.path.join(a.out, "quant_profile.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)
    print("| seqlen | options | call | density | host µs | eager ms | graph ms |")
    print("|---:|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['seqlen']} | {r['options']} | {r['row']} | {r.get('density', '-')} | {r['host_us']} | "
              f"{r['eager_ms']} | {r.get('graph_ms', r.get('graph_error', '-'))} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
