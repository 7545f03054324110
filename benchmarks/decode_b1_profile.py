"""Decode at batch 1 on the GPU: each kernel's own duration, and the cost of a call inside a sequence of layers.

Two views of the same calls (H=32, H_kv=8, D=128, bf16 cache of ``--ctx`` keys, one new token, ``--batch``):

* **kernels**: ``torch.profiler`` (CUPTI) device time of every kernel of a dense decode call
  (:func:`decode_attention`) and of a sparse one (:func:`sparse_decode_attention`, ``--top-pages`` of
  ``--page``-key pages, selection included), ``--reps`` eager calls each after a warm-up: the mean per call of each
  kernel name, their sum, and the span of one eager call on the device (first kernel start to last kernel end:
  host launch gaps included, so for a call of several small kernels it measures the host, not the GPU).
* **layers**: ``--layers`` L independent caches (one per "layer", so no call finds the previous call's bytes in L2),
  one CUDA graph holding the L calls in a row, timed by replay (:func:`~sparseattn.testing.timing.bench_ms`); the
  per-call time is the replay divided by L. Next to it, the one-call graph of the same call (what
  ``decode_stage_probe.py`` and ``bench_decode.py`` report, one graph launch included).

Parity of both calls against :func:`decode_reference` (ratio rule, the sparse one over its selected pages) is checked
first. Writes ``b1_profile.json`` under ``--out`` and prints a table. ``--cpu-smoke`` runs the parity checks on tiny
shapes under ``TRITON_INTERPRET=1`` (no profiler, no timing).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from typing import Any, Callable

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from sparseattn.ops.decode import decode_attention, decode_reference, pages_key_mask  # noqa: E402
from sparseattn.ops.pages import page_summaries, sparse_decode_attention  # noqa: E402
from sparseattn.testing.tolerances import check_ratio  # noqa: E402

H, HKV, D = 32, 8, 128


def kernel_profile(fn: Callable[[], Any], reps: int) -> dict[str, Any]:
    """Mean device microseconds per call of each kernel name, and the median device span of one eager call."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
            torch.cuda.synchronize()
    evs = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    per: dict[str, float] = defaultdict(float)
    for e in evs:
        per[e.name] += e.device_time / reps  # microseconds
    # spans: kernels sorted by start; a call's kernels are back to back and calls are separated by a sync
    starts = sorted((e.time_range.start, e.time_range.end) for e in evs)
    n_per_call = max(1, len(starts) // reps)
    spans = [starts[i + n_per_call - 1][1] - starts[i][0] for i in range(0, len(starts) - n_per_call + 1, n_per_call)]
    spans.sort()
    return {"kernels_us": dict(per), "sum_us": sum(per.values()), "kernels_per_call": n_per_call,
            "span_us_median": spans[len(spans) // 2] if spans else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--ctx", type=int, default=131072)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--page", type=int, default=64)
    ap.add_argument("--top-pages", type=float, default=0.1)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--cpu-smoke", action="store_true")
    args = ap.parse_args(argv)
    smoke = args.cpu_smoke
    if smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("decode_b1_profile: --cpu-smoke needs TRITON_INTERPRET=1", file=sys.stderr)
            return 2
        dev, N, L = "cpu", 256, 2
    else:
        if not torch.cuda.is_available():
            print("decode_b1_profile: needs a CUDA device", file=sys.stderr)
            return 2
        dev, N, L = "cuda", args.ctx, args.layers
    B, ps = args.batch, args.page if not smoke else 16
    torch.manual_seed(0)
    q = torch.randn(B, H, 1, D, device=dev, dtype=torch.bfloat16)
    ks = [torch.randn(B, HKV, N, D, device=dev, dtype=torch.bfloat16) for _ in range(L)]
    vs = [torch.randn_like(k) for k in ks]
    sl = torch.full((B,), N, dtype=torch.int32, device=dev)
    summ = [page_summaries(k, ps, seqlens=sl) for k in ks]

    def dense(i: int = 0) -> Any:
        return decode_attention(q, ks[i], vs[i], seqlens=sl, backend="triton")

    def sparse(i: int = 0) -> Any:
        return sparse_decode_attention(q, ks[i], vs[i], summ[i], seqlens=sl, top_pages=args.top_pages,
                                       backend="triton")

    res: dict[str, Any] = {"device": "cpu-smoke" if smoke else torch.cuda.get_device_name(), "torch": torch.__version__,
                           "ctx": N, "batch": B, "page": ps, "top_pages": args.top_pages, "layers": L}
    # parity before timing (ratio rule against the fp32 reference over the same keys), first and last layer, the
    # first sequence (the fp32 reference of a whole 128K x 32 batch would not fit)
    for i in (0, L - 1):
        k1, v1 = ks[i][:1], vs[i][:1]
        out = dense(i)
        hi = decode_reference(q[:1].float(), k1.float(), v1.float(), seqlens=sl[:1])
        lo = decode_reference(q[:1], k1, v1, seqlens=sl[:1], upcast=False)
        check_ratio(out[:1], hi.out, lo.out, f"dense out, layer {i}")
        sp, (pidx, pnum) = sparse_decode_attention(q, ks[i], vs[i], summ[i], seqlens=sl, top_pages=args.top_pages,
                                                   return_pages=True, backend="triton")
        mask = pages_key_mask(pidx, pnum, ps, N)[:1]
        hi = decode_reference(q[:1].float(), k1.float(), v1.float(), seqlens=sl[:1], key_mask=mask)
        lo = decode_reference(q[:1], k1, v1, seqlens=sl[:1], key_mask=mask, upcast=False)
        check_ratio(sp[:1], hi.out, lo.out, f"sparse out, layer {i}")
        del hi, lo, mask
    res["parity"] = "ok"
    if smoke:
        print("decode_b1_profile: cpu smoke ok (parity ok)")
        return 0
    from sparseattn.testing.timing import bench_ms, capture_graph

    for name, f in (("dense", dense), ("sparse", sparse)):
        prof = kernel_profile(f, args.reps)
        one = bench_ms(capture_graph(f))
        seq = bench_ms(capture_graph(lambda f=f: [f(i) for i in range(L)])) / L
        res[name] = {"profile": prof, "graph_one_call_ms": one, "graph_per_call_in_layers_ms": seq}
    one_floor = torch.zeros(1, device=dev)
    res["launch_floor_ms"] = bench_ms(capture_graph(lambda: one_floor.add_(1)))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "b1_profile.json"), "w") as fh:
        json.dump(res, fh, indent=1)
    for name in ("dense", "sparse"):
        p = res[name]["profile"]
        ker = ", ".join(f"{k[:40]} {v:.1f}" for k, v in sorted(p["kernels_us"].items(), key=lambda kv: -kv[1]))
        print(f"{name}: kernels (us/call) {ker} | sum {p['sum_us']:.1f} us, eager span {p['span_us_median']:.1f} us | "
              f"graph one call {res[name]['graph_one_call_ms'] * 1e3:.1f} us, per call in {L} layers "
              f"{res[name]['graph_per_call_in_layers_ms'] * 1e3:.1f} us")
    x1 = res["dense"]["graph_one_call_ms"] / res["sparse"]["graph_one_call_ms"]
    xl = res["dense"]["graph_per_call_in_layers_ms"] / res["sparse"]["graph_per_call_in_layers_ms"]
    print(f"dense / sparse: one-call graphs {x1:.2f}x, in {L} layers {xl:.2f}x | launch floor "
          f"{res['launch_floor_ms'] * 1e3:.1f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
