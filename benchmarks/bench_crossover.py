"""The density crossover per attention shape: where predictor + block-sparse kernel meets the model's dense SDPA.

For each shape ``H,H_kv,D`` and length (B=1, causal, bf16 by default) it times, on the GPU and in the same process:

* ``dense_ms`` — ``F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=...)`` with PyTorch's
  default backend choice: what a transformers model's ``sdpa`` attention (the fallback of
  ``patch_model(dense_above="auto")``) runs; cuDNN and flash are timed too, for the record;
* ``predictor_ms`` — the predictor (default: the package's default ``mean_sim`` spec) on the same q/k;
* ``kernel_ms`` at each density — the Triton kernel on a seeded random causal layout at that density with the
  predictor's block sizes;

each as the GPU time of a CUDA graph holding ``--graph-reps`` back-to-back calls, replayed after warm-up
(median of ``triton.testing.do_bench``), divided by the calls: the host is taken out, as layer graphs take it
out of a patched model. A shape whose capture fails is timed eagerly and marked ``"timing": "eager"``.
``crossover`` is :func:`sparseattn.ops.crossover.crossover_from_times` of ``predictor_ms + kernel_ms`` against
``dense_ms``. Writes ``crossover.json`` (the format ``sparseattn/ops/tuned/crossover.json`` ships; merge with
``--merge-into``) and prints a table last.

Usage::

    PYTHONPATH=src python3 benchmarks/bench_crossover.py --shapes 9,3,64 4,1,256 32,8,128 \
        --lengths 2048 4096 8192 --out $OUT [--merge-into src/sparseattn/ops/tuned/crossover.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Callable

import torch

DEFAULT_PRED = "mean_sim:score=mixed,cdf_threshold=0.97,keep_local=8"
DENSITIES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def graph_ms(fn: Callable[[], Any], reps: int) -> tuple[float, str]:
    """GPU milliseconds per call of ``fn``: a CUDA graph of ``reps`` calls, replayed (eager if capture fails)."""
    from sparseattn.eval.bench_model import _capture_graph
    from sparseattn.testing.timing import bench_ms

    try:
        replay = _capture_graph(lambda: [fn() for _ in range(reps)])
        return bench_ms(replay) / reps, "graph"
    except Exception as exc:  # noqa: BLE001 - report and time eagerly
        print(f"  capture failed ({type(exc).__name__}: {str(exc)[:120]}); timing eagerly", flush=True)
        torch.cuda.synchronize()
        return bench_ms(fn), "eager"


def measure(H: int, Hkv: int, D: int, N: int, *, dtype: torch.dtype, predictor: str, reps: int,
            densities: tuple[float, ...]) -> dict[str, Any]:
    import torch.nn.functional as F

    from sparseattn.layout import random_layout
    from sparseattn.ops.crossover import crossover_from_times
    from sparseattn.predictors.resolve import resolve_predictor
    from sparseattn.testing.timing import gpu_qkv, kernel_runner, sdpa_runners

    q, k, v = gpu_qkv(1, H, Hkv, N, N, D, dtype=dtype, seed=N + H)
    gqa = {"enable_gqa": True} if H != Hkv else {}
    rec: dict[str, Any] = {"dtype": str(dtype).replace("torch.", ""), "heads": H, "kv_heads": Hkv, "head_dim": D,
                           "seqlen": N, "predictor": predictor}
    rec["dense_ms"], rec["timing"] = graph_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa), reps)
    for name, run in sdpa_runners(q, k, v, True).items():
        if callable(run):
            rec[f"{name}_ms"] = graph_ms(run, reps)[0]
    pred = resolve_predictor(predictor)
    layout0 = pred.predict(q, k, causal=True)
    bm, bn = layout0.block_m, layout0.block_n
    rec["block_m"], rec["block_n"] = bm, bn
    rec["predictor_ms"], how = graph_ms(lambda: pred.predict(q, k, causal=True), reps)
    rec["predictor_timing"] = how
    kms = []
    for d in densities:
        lay = random_layout(N, N, density=d, seed=1, block_m=bm, block_n=bn, heads=H, causal=True, device="cuda")
        kms.append(graph_ms(kernel_runner(q, k, v, lay, True), reps)[0])
    rec["densities"] = list(densities)
    rec["kernel_ms"] = kms
    rec["sparse_ms"] = [rec["predictor_ms"] + x for x in kms]
    rec["crossover"] = round(crossover_from_times(densities, rec["sparse_ms"], rec["dense_ms"]), 4)
    return rec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["9,3,64"], help="H,H_kv,D per shape")
    ap.add_argument("--lengths", nargs="+", type=int, default=[2048, 4096, 8192])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--predictor", default=DEFAULT_PRED)
    ap.add_argument("--graph-reps", type=int, default=10)
    ap.add_argument("--budget-s", type=float, default=1e9, help="stop starting new shapes after this many seconds")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--merge-into", default=None, help="a crossover JSON to add this GPU's entries to (replacing "
                    "entries of the same device, dtype, shape and length)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_crossover: needs a CUDA GPU (the crossover is a GPU measurement)", file=sys.stderr)
        return 2
    shapes = []
    for s in args.shapes:
        try:
            H, Hkv, D = (int(x) for x in s.split(","))
        except ValueError:
            print(f"bench_crossover: --shapes entry {s!r} is not H,H_kv,D; expected e.g. 9,3,64", file=sys.stderr)
            return 2
        shapes.append((H, Hkv, D))
    dtype = getattr(torch, args.dtype)
    dev = torch.cuda.get_device_name()
    t0 = time.time()
    rows = []
    for H, Hkv, D in shapes:
        for N in args.lengths:
            if time.time() - t0 > args.budget_s:
                print(f"budget reached: skipping H={H} H_kv={Hkv} D={D} N={N}", flush=True)
                continue
            print(f"H={H} H_kv={Hkv} D={D} N={N} ...", flush=True)
            rec = measure(H, Hkv, D, N, dtype=dtype, predictor=args.predictor, reps=args.graph_reps,
                          densities=DENSITIES)
            rows.append(rec)
            print(f"  dense {rec['dense_ms']:.4f} ms, predictor {rec['predictor_ms']:.4f} ms, kernel@1.0 "
                  f"{rec['kernel_ms'][-1]:.4f} ms -> crossover {rec['crossover']}", flush=True)
    from sparseattn.eval.env import environment

    meta = environment()
    note = (f"benchmarks/bench_crossover.py, {meta['date_utc'][:10]}, {dev}, torch {meta['torch']}, triton "
            f"{meta['triton']}, commit {meta['commit']}: CUDA-graph GPU time per call, median")
    for r in rows:
        r["note"] = note
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "crossover.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"version": 1, "meta": meta, "devices": {dev: rows}}, f, indent=1)
    if args.merge_into:
        with open(args.merge_into, encoding="utf-8") as f:
            data = json.load(f)
        old = data.setdefault("devices", {}).get(dev, [])
        keys = {(r["dtype"], r["heads"], r["kv_heads"], r["head_dim"], r["seqlen"]) for r in rows}
        kept = [e for e in old if (e["dtype"], e["heads"], e["kv_heads"], e["head_dim"], e["seqlen"]) not in keys]
        data["devices"][dev] = kept + rows
        with open(args.merge_into, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
    print(f"\nwrote {path}")
    print(f"{'H':>3} {'Hkv':>3} {'D':>4} {'N':>6} {'dense ms':>9} {'pred ms':>8} {'k@0.1':>8} {'k@0.5':>8} "
          f"{'k@1.0':>8} {'crossover':>9}")
    for r in rows:
        km = dict(zip(r["densities"], r["kernel_ms"]))
        print(f"{r['heads']:>3} {r['kv_heads']:>3} {r['head_dim']:>4} {r['seqlen']:>6} {r['dense_ms']:>9.4f} "
              f"{r['predictor_ms']:>8.4f} {km[0.1]:>8.4f} {km[0.5]:>8.4f} {km[1.0]:>8.4f} {r['crossover']:>9.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
