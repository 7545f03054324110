"""Kernel-variant shoot-out in one device call: parity once per variant, then timings beside SDPA and Flex.

Shapes: Llama-3.1-8B 32K causal (H=32, H_kv=8, D=128) at densities 1.0 / 0.2 / 0.1, Llama-3.1-8B 8K
causal and full at 0.05, and SmolLM2-135M 8K causal (H=9, H_kv=3, D=64) at 0.2 / 0.05 — random
per-head 128x128 layouts that keep the diagonal, the same layouts as ``bench_attention.py``. Every
variant is a fixed launch config (tile sizes, warps, stages, the kernel switches ``USE_TMA`` /
``PREFETCH`` / ``VEC_COUNT`` and optionally ``maxnreg``) passed through
``block_sparse_fwd(config=...)``; ``auto`` is the autotuned default. Each variant's compiled
registers, spills and shared memory are recorded (they decide how many programs share an SM). (The first run, at commit
``c4230ec``, also had an ``OVERLAP`` switch — the next tile's Q·K^T issued before this tile's
softmax — which lost everywhere and was removed; its numbers are in BENCHMARKS.md.) Before timing, each
variant's output is checked against the fp32 reference (ratio rule, last 1024 query rows) at the
first density of each shape where it runs. The small shape also reports the launcher's host time per
call (no sync) and a direct launch of the compiled kernel, to separate Python overhead from GPU time.

Prints a table last and writes ``kernel_variants.json`` under ``$OUT`` (or ``--out``).
Usage: ``PYTHONPATH=src python3 benchmarks/kernel_variants.py [--budget-s 300]``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from bench_attention import env_info, layout_for  # noqa: E402
from shapes import SHAPES  # noqa: E402

from sparseattn.testing import timing  # noqa: E402


def _cfg(bm: int, bn: int, w: int, s: int, **flags: bool) -> dict[str, Any]:
    return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": s, **flags}


VARIANTS: dict[int, dict[str, dict[str, Any] | None]] = {
    # Registers / shared memory per program (offline Triton 3.6 compile for sm_90a, confirmed on the device)
    # decide how many programs fit on one SM (64K registers, 228 KB shared): "2/SM" variants fit two.
    # -qo: Q load / O store through TMA too (removes the last spills under maxnreg=128).
    128: {
        "auto": None,
        "t128x128w8s3": _cfg(128, 128, 8, 3, USE_TMA=True),                   # 251 regs, 225 KB: 1/SM
        "t128x64w8s2-r128": _cfg(128, 64, 8, 2, USE_TMA=True, maxnreg=128),   # 128 regs, 96 KB: 2/SM
        "t128x64w8s2-r128-qo": _cfg(128, 64, 8, 2, USE_TMA=True, TMA_QO=True, maxnreg=128),
        "t128x64w8s2-r128-qo-nopf": _cfg(128, 64, 8, 2, USE_TMA=True, TMA_QO=True, maxnreg=128, PREFETCH=False),
        "t128x64w8s2-r128-qo-tau8": _cfg(128, 64, 8, 2, USE_TMA=True, TMA_QO=True, maxnreg=128, RESCALE_TAU=8.0),
        "t128x64w8s2-r128-qo-tau8-nopf": _cfg(128, 64, 8, 2, USE_TMA=True, TMA_QO=True, maxnreg=128, RESCALE_TAU=8.0,
                                              PREFETCH=False),
        "p128x64w8s2-r128": _cfg(128, 64, 8, 2, maxnreg=128),
        "p64x64w4s3": _cfg(64, 64, 4, 3),                                     # short rows (8K, 5%)
        "t128x64w8s2-qo-nopf": _cfg(128, 64, 8, 2, USE_TMA=True, TMA_QO=True, PREFETCH=False),  # no cap: 1/SM
    },
    64: {
        "auto": None,
        "p128x128w8s3": _cfg(128, 128, 8, 3),                                 # 222 regs, 112 KB: 1/SM
        "t128x128w8s2-r128": _cfg(128, 128, 8, 2, USE_TMA=True, maxnreg=128),  # 128 regs, 81 KB: 2/SM
        "t128x128w8s2-r128-qo": _cfg(128, 128, 8, 2, USE_TMA=True, TMA_QO=True, maxnreg=128),
        "t128x64w8s3-r128-qo": _cfg(128, 64, 8, 3, USE_TMA=True, TMA_QO=True, maxnreg=128),  # 2/SM
        "p64x64w4s3": _cfg(64, 64, 4, 3),                                     # 156 regs, 56 KB: 3/SM
    },
}
PLAN = [("Llama-3.1-8B/32K/causal", (1.0, 0.2, 0.1)), ("Llama-3.1-8B/8K/causal", (0.05,)),
        ("Llama-3.1-8B/8K/full", (0.05,)), ("Llama-3.1-8B/32K/full", (1.0, 0.1)),
        ("SmolLM2-135M/32K/causal", (1.0, 0.1))]


def host_us_per_call(fn: Any, n: int = 200) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


def _median(xs: list[float]) -> float:
    ys = sorted(xs)
    n = len(ys)
    return ys[n // 2] if n % 2 else 0.5 * (ys[n // 2 - 1] + ys[n // 2])


def run_shape(name: str, densities: tuple[float, ...], deadline: float, parity_rows: int, repeats: int,
              only: set[str] | None) -> dict[str, Any]:
    """Per density: build and parity-check every variant once, then time Flex and all variants in
    ``repeats`` round-robin rounds (cuDNN too on dense rows); ratios are paired within a round."""
    shape = next(s for s in SHAPES if s.name == name)
    B, H, Hkv, N, D = shape.batch, shape.heads, shape.kv_heads, shape.seqlen, shape.head_dim
    q, k, v = timing.gpu_qkv(B, H, Hkv, N, N, D, dtype=torch.bfloat16, seed=N + D + H)
    sdpa = timing.sdpa_runners(q, k, v, shape.causal)
    cudnn = sdpa["cudnn"] if callable(sdpa["cudnn"]) else None
    res: dict[str, Any] = {"shape": name, "sdpa_cudnn_ms": timing.bench_ms(cudnn) if cudnn else None, "rows": []}
    for d in densities:
        lay = layout_for(shape, d, "cuda")
        row: dict[str, Any] = {"density_target": d, "density": lay.density(shape.causal), "variants": {}}
        runners: dict[str, Any] = {}
        try:
            frun = timing.flex_runner(q, k, v, lay, shape.causal)
            frun()
            runners["flex"] = frun
        except Exception as exc:  # report, never hide
            row["flex_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        if d >= 1.0 and cudnn:
            runners["cudnn"] = cudnn
        for vname, cfg in VARIANTS[D].items():
            if only and vname not in only:
                continue
            ent: dict[str, Any] = {"config": cfg}
            row["variants"][vname] = ent
            if time.time() > deadline:
                ent["skipped"] = "time budget"
                continue
            try:
                tele: dict[str, Any] = {}
                run = timing.kernel_runner(q, k, v, lay, shape.causal, config=cfg, telemetry=tele)
                o, l = run()
                torch.cuda.synchronize()
                ent["compiled"] = dict(tele)
                par = timing.tail_parity(q, k, v, lay, shape.causal, o, l, rows=parity_rows)
                ent["parity"] = {kk: par[kk] for kk in ("ok", "out_err", "out_bound", "lse_err", "lse_bound", "rows_checked")}
                if not par["ok"]:
                    ent["parity"]["failures"] = par.get("failures")
                runners[vname] = run
                del o, l
            except Exception as exc:  # a variant that fails to compile or launch is reported, not fatal
                ent["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
        rounds = timing.round_robin_ms(runners, repeats, stop=lambda r: time.time() > deadline and bool(r.get("flex")))
        row["flex_ms_rounds"] = rounds.get("flex", [])
        row["flex_ms"] = _median(rounds["flex"]) if rounds.get("flex") else None
        row["cudnn_ms_rounds"] = rounds.get("cudnn", [])
        for vname, ent in row["variants"].items():
            ms = rounds.get(vname)
            if not ms:
                continue
            ent["ms_rounds"] = ms
            ent["ms"] = _median(ms)
            if rounds.get("flex"):
                ent["vs_flex_rounds"] = [f / m for f, m in zip(rounds["flex"], ms)]
                ent["vs_flex"] = _median(ent["vs_flex_rounds"])
            if rounds.get("cudnn"):
                ent["vs_cudnn_rounds"] = [c / m for c, m in zip(rounds["cudnn"], ms)]
                ent["vs_cudnn"] = _median(ent["vs_cudnn_rounds"])
            if D == 64 and ent["ms"] < 1.0:
                ent["host_us_per_call"] = host_us_per_call(runners[vname])
        res["rows"].append(row)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-s", type=float, default=300.0)
    ap.add_argument("--parity-rows", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=1, help="round-robin timing rounds per row (medians, paired ratios)")
    ap.add_argument("--variants", default=None, help="comma-separated variant names to run (default: all)")
    ap.add_argument("--plan", default=None, help="'SHAPE:d1,d2;SHAPE:d' to replace the built-in plan")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args(argv)
    reason = timing.cuda_unavailable_reason()
    if reason:
        print(f"kernel_variants: {reason}", file=sys.stderr)
        return 2
    t0 = time.time()
    info = env_info()
    print(json.dumps(info), flush=True)
    plan = PLAN
    if args.plan:
        plan = [(part.split(":")[0], tuple(float(x) for x in part.split(":")[1].split(","))) for part in args.plan.split(";")]
    only = set(args.variants.split(",")) if args.variants else None
    results = [run_shape(name, dens, t0 + args.budget_s, args.parity_rows, args.repeats, only) for name, dens in plan]
    doc = {"env": info, "results": results, "wall_s": time.time() - t0}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "kernel_variants.json"), "w") as f:
        json.dump(doc, f, indent=1, default=str)
    print(f"\nenv: {info['gpu']} torch {info['torch']} triton {info['triton']} commit {info['commit']}")
    bad = 0
    for res in results:
        print(f"{res['shape']}  cuDNN dense {res['sdpa_cudnn_ms']:.3f} ms")
        for row in res["rows"]:
            print(f"  density {row['density']:.3f}  Flex {row.get('flex_ms') or float('nan'):.3f} ms")
            for vname, ent in row["variants"].items():
                par = ent.get("parity", {}).get("ok")
                bad += par is False
                vf = ent.get("vs_flex_rounds") or [float("nan")]
                print(f"    {vname:<30}{ent.get('ms', float('nan')):9.3f} ms  vsFlex {ent.get('vs_flex', float('nan')):5.2f} "
                      f"[{min(vf):.2f}-{max(vf):.2f}]  "
                      f"vsCuDNN {ent.get('vs_cudnn', float('nan')):5.2f}  parity {'-' if par is None else ('ok' if par else 'FAIL')}"
                      + (f"  host {ent['host_us_per_call']:.0f} us/call" if "host_us_per_call" in ent else "")
                      + (f"  regs {ent['compiled'].get('n_regs')} spills {ent['compiled'].get('n_spills')} "
                         f"smem {ent['compiled'].get('shared_bytes')}" if ent.get("compiled") else "")
                      + (f"  ERR {ent['error'][:80]}" if "error" in ent else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
