"""Where the fused mean_sim predictor's GPU time goes, per kernel and per score (diagnostic).

For each predictor spec (``--specs``, ';'-separated) at the Llama-3.1-8B attention shape (B=1, H=32,
H_kv=8, D=128, bf16, causal; smooth synthetic inputs as in ``bench_predictors.py``): ``predict`` timed
with CUDA events (median of ``--repeats`` after warm-up), and a ``torch.profiler`` pass that sums
each kernel's device time (pool / score / select). ``--score-tiles`` also times the minmax/mixed
score kernel with other tile sizes (``TILE:WARPS``, comma-separated) by overriding the launcher's
tile choice, checking that the layout is unchanged. Writes ``profile_predictor.json`` under ``--out``
and prints a table last. The measurements of record come from ``gpu_mean_sim_fused.py``.

Usage: ``PYTHONPATH=src python3 benchmarks/profile_predictor.py [--len 32768] [--out DIR]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from typing import Any

import torch

SPECS = "mean_sim:cdf_threshold=0.9;mean_sim:score=mixed,cdf_threshold=0.97,keep_local=8;" \
        "mean_sim:score=minmax,cdf_threshold=0.97,keep_local=8;mean_sim:score=mean,cdf_threshold=0.97,keep_local=8"


def smooth(B: int, H: int, N: int, D: int, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    walk = torch.randn(B, H, N, D, device="cuda", generator=g).mul_(0.05).cumsum(2)
    return (walk / walk.std() + 0.5 * torch.randn(B, H, N, D, device="cuda", generator=g)).to(torch.bfloat16)


def time_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def kernel_times(fn, n: int = 10) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    out: dict[str, float] = {}
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)
        if t and e.key.startswith("_"):
            out[e.key] = round(t / n / 1e3, 4)  # ms per predict
    return out


def main() -> int:
    from sparseattn.eval.env import environment
    from sparseattn.predictors import fused_mean_sim as fm
    from sparseattn.integrations.transformers_patch import resolve_predictor

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--len", type=int, default=32768)
    ap.add_argument("--specs", default=SPECS)
    ap.add_argument("--score-tiles", default="64:8,64:4,32:4,32:2")
    ap.add_argument("--pool", default="4096:8,2048:4,2048:8,8192:8",
                    help="pool kernel variants ELEMENTS:WARPS (a chunk of ELEMENTS // D_PAD rows), timed per spec")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    q, k = smooth(1, 32, args.len, 128, 0), smooth(1, 8, args.len, 128, 1)
    rows = []
    orig_meta = fm._score_meta
    for spec in args.specs.split(";"):
        pred = resolve_predictor(spec)
        call = lambda: pred.predict(q, k, causal=True)  # noqa: E731
        ref = call()
        dens = float(ref.density(causal=True)) if hasattr(ref, "density") else None
        base = {"spec": spec, "ms": round(time_ms(call, args.repeats), 4), "kernels": kernel_times(call), "density": dens}
        rows.append(base)
        print(json.dumps(base), flush=True)
        orig_pool = fm._pool_meta

        def variant(kind: str, label: str, attr: str, meta: Any) -> None:
            """Time ``call`` with ``fm.<attr>`` replaced by ``meta``; record it under ``kind`` = ``label``."""
            orig = getattr(fm, attr)
            setattr(fm, attr, meta)
            try:
                got = call()
                same = bool(torch.equal(got.kv_num_blocks, ref.kv_num_blocks) and torch.equal(got.kv_indices, ref.kv_indices))
                r = {"spec": spec, kind: label, "ms": round(time_ms(call, args.repeats), 4),
                     "kernels": kernel_times(call), "same_layout": same}
            except Exception as exc:  # noqa: BLE001 - a variant that does not compile is reported
                r = {"spec": spec, kind: label, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            finally:
                setattr(fm, attr, orig)
            rows.append(r)
            print(json.dumps(r), flush=True)

        for ew in args.pool.split(","):
            elems, warps = (int(x) for x in ew.split(":"))

            def pmeta(bm, bn, D, minmax, _e=elems, _w=warps):  # noqa: ANN001
                m = orig_pool(bm, bn, D, minmax)
                chunk = max(1, _e // m["D_PAD"])
                m.update(CHUNK_Q=min(chunk, fm._next_pow2(bm)), CHUNK_K=min(chunk, fm._next_pow2(bn)), num_warps=_w)
                return m

            variant("pool", ew, "_pool_meta", pmeta)
        if "score=m" not in spec:
            continue
        for tw in args.score_tiles.split(","):
            tile, warps = (int(x) for x in tw.split(":"))

            def smeta(B, H, Mb, Nb, D, score, _t=tile, _w=warps):  # noqa: ANN001
                m = orig_meta(B, H, Mb, Nb, D, score)
                m.update(BLOCK_QB=_t, BLOCK_J=_t, num_warps=_w)
                return m

            variant("score_tile", tw, "_score_meta", smeta)
    with open(os.path.join(args.out, "profile_predictor.json"), "w") as fh:
        json.dump({"rows": rows, "environment": environment("cuda")}, fh, indent=1)
    print("| spec | variant | ms | pool | score | select | same layout |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ks = r.get("kernels", {})
        pick = lambda name: next((f"{v:.3f}" for key, v in ks.items() if name in key), "-")  # noqa: E731
        print(f"| {r['spec'][9:60]} | {r.get('score_tile') or (('pool ' + r['pool']) if 'pool' in r else 'default')} | {r.get('ms', r.get('error', ''))} | "
              f"{pick('pool')} | {pick('score')} | {pick('select')} | {r.get('same_layout', '-')} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
