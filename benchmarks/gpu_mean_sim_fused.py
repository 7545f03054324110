"""GPU check of the fused mean_sim predictor: parity with the torch path, launch count, timing. One device call.

What it does (each step records its result in the JSON; an exception in one case is recorded and the
script goes on):

1. **Parity** over a grid of shapes (odd lengths, GQA 1/4/8, ``N_q != N_kv``, block sizes 32/64/128,
   cdf and topk, keep_sink/keep_local variants, sim_threshold -1/0.5/1.5, fp16/bf16/fp32, a
   non-contiguous q as transformers passes it, NaN/inf in q and k, 128K tokens = 2048 key blocks; every
   block score: mean, minmax, mixed):
   ``MeanSimilarityPredictor(cfg, backend="triton")`` against ``backend="torch"`` on the same CUDA
   tensors. Exact equality is expected except where float rounding flips a decision sitting on a
   threshold (the torch path's cuBLAS/softmax/cumsum round differently from the kernel), so a case
   passes when at most ``max(2, 0.5 %)`` of the (b, h, query block) rows select a different set,
   ``last_scores`` agree within ``P_ATOL`` with NaN in the same places, and the fused layout passes
   ``BlockLayout(validate=True)``. Mismatch counts are reported either way.
2. **Launches**: kernels per ``predict()`` of the fused path with the project's default predictor
   (``score=mixed,cdf_threshold=0.97,keep_local=8``), counted with ``torch.profiler`` (expected: 3),
   and host reads (``aten::_local_scalar_dense``, expected: 0).
3. **Timing** (steady state): predictor ms, fused vs torch, bf16, causal, B=1, smooth synthetic q/k
   (a random walk plus noise, so the selection is sparse as in real models): 3 warm-up calls
   (compile, caches), ``torch.cuda.synchronize()``, then ``--reps`` (>= 5) calls each timed with CUDA
   events; the median is reported with the density. Rows: H=32, H_kv=8, D=128 at ``--lengths``
   (8K / 32K / 128K) for cdf0.9 and topk0.2 (score=mean) and the default (mixed, cdf 0.97,
   keep_local 8); the default on SmolLM2-360M's shape (D=64, H=9, H_kv=3) at 4K / 8K and on
   Gemma-3-270M's global layers (D=256, H=4, H_kv=1) at 32K. The torch path is not timed above
   ``--torch-max-n`` tokens (default 65536: at 128K it takes tens of ms per call and GBs of memory);
   those rows say so (``torch_ms`` null, ``torch_skipped``).

Prints a table last and writes ``gpu_mean_sim_fused.json`` to ``--out`` (a directory; default
``$OUT`` or ``.``). Exit status 1 if a parity case fails or the launch count is above 3.

Usage: ``PYTHONPATH=src python3 benchmarks/gpu_mean_sim_fused.py [--out DIR] [--lengths 8192 32768 131072] [--reps 10]``
(without a GPU, ``TRITON_INTERPRET=1 ... --cpu-smoke`` runs three tiny parity cases to check the script itself).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
import traceback
from typing import Any

import torch

from sparseattn.layout.block_layout import BlockLayout
from sparseattn.predictors.mean_similarity import MeanSimilarityConfig, MeanSimilarityPredictor

DEV = "cuda"  # --cpu-smoke switches to "cpu" (Triton interpreter) to check this script's own code paths
P_ATOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
DEFAULT = {"score": "mixed", "cdf_threshold": 0.97, "keep_local": 8}  # the project's default mean_sim spec

# name: (B, H, H_kv, N_q, N_kv, D, dtype, causal, config kwargs, extra)
CASES: dict[str, tuple] = {
    "1K-bf16-cdf-gqa4": (1, 8, 2, 1024, 1024, 128, BF16, True, {}, {}),
    "odd-fp16-cdf-gqa1-b2": (2, 4, 4, 1000, 1000, 64, F16, True, {"keep_local": 2}, {}),
    "odd-fp32-topk-gqa8": (1, 8, 1, 2047, 2047, 128, F32, True, {"topk": 0.2, "cdf_threshold": None}, {}),
    "nq<nkv-bf16-cdf": (1, 8, 2, 333, 4000, 128, BF16, True, {"cdf_threshold": 0.8}, {}),
    "nq>nkv-bf16-topk": (1, 8, 2, 3000, 1000, 128, BF16, True, {"topk": 0.3, "cdf_threshold": None}, {}),
    "noncausal-bf16-cdf": (1, 4, 2, 1500, 2500, 128, BF16, False, {"keep_local": 3}, {}),
    "len1-bf16": (1, 4, 1, 1, 4096, 128, BF16, True, {}, {}),
    "blocks32-bf16-sim-1": (1, 8, 2, 4000, 4000, 128, BF16, True,
                            {"block_m": 32, "block_n": 32, "sim_threshold": -1.0, "keep_sink": False,
                             "keep_local": 0}, {}),
    "blocks128-bf16-sim1.5": (1, 8, 2, 4000, 4000, 128, BF16, True,
                              {"block_m": 128, "block_n": 128, "sim_threshold": 1.5}, {}),
    "bm64-bn128-fp16-topk1": (1, 4, 2, 3001, 3001, 64, F16, True,
                              {"block_m": 64, "block_n": 128, "topk": 1.0, "cdf_threshold": None}, {}),
    "cdf1.0-bf16": (1, 8, 2, 4096, 4096, 128, BF16, True, {"cdf_threshold": 1.0, "sim_threshold": -1.0}, {}),
    "transposed-q-bf16": (1, 32, 8, 8192, 8192, 128, BF16, True, {}, {"transposed": True}),
    "nan-q-bf16": (1, 8, 2, 2048, 2048, 128, BF16, True, {}, {"poison": ("q", float("nan"))}),
    "nan-k-bf16-topk": (1, 8, 2, 2048, 2048, 128, BF16, True, {"topk": 0.2, "cdf_threshold": None},
                        {"poison": ("k", float("nan"))}),
    "inf-k-bf16": (1, 8, 2, 2048, 2048, 128, BF16, True, {}, {"poison": ("k", float("inf"))}),
    "128K-bf16-cdf": (1, 32, 8, 131072, 131072, 128, BF16, True, {}, {}),
    # minmax / mixed (the project's default predictor is score=mixed,cdf_threshold=0.97,keep_local=8)
    "default-mixed-8K-bf16": (1, 32, 8, 8192, 8192, 128, BF16, True, DEFAULT, {}),
    "mixed-odd-fp16-topk-gqa3": (1, 9, 3, 3001, 3001, 64, F16, True,
                                 {"score": "mixed", "topk": 0.2, "cdf_threshold": None}, {}),
    "minmax-fp32-cdf-noncausal": (1, 4, 2, 1500, 2500, 128, F32, False, {"score": "minmax", "keep_local": 2}, {}),
    "minmax-bf16-topk-d256": (1, 4, 1, 4000, 4000, 256, BF16, True,
                              {"score": "minmax", "topk": 0.3, "cdf_threshold": None}, {}),
    "mixed-nan-k-bf16": (1, 8, 2, 2048, 2048, 128, BF16, True, DEFAULT, {"poison": ("k", float("nan"))}),
    "mixed-inf-q-bf16": (1, 8, 2, 2048, 2048, 128, BF16, True, DEFAULT, {"poison": ("q", float("inf"))}),
    "mixed-neginf-k-bf16-sim-1": (1, 8, 2, 2048, 2048, 128, BF16, True, {**DEFAULT, "sim_threshold": -1.0},
                                  {"poison": ("k", float("-inf"))}),
    "mixed-transposed-smollm2": (1, 9, 3, 4096, 4096, 64, BF16, True, DEFAULT, {"transposed": True}),
    "128K-bf16-mixed-default": (1, 32, 8, 131072, 131072, 128, BF16, True, DEFAULT, {}),
}


def smooth(B: int, heads: int, N: int, D: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """A per-head random walk along the sequence plus noise: self-similar blocks, sparse selections."""
    walk = torch.cumsum(torch.randn(B, heads, N, D, generator=gen, device=DEV) * 0.05, dim=2)
    walk = walk / walk.std(dim=(2, 3), keepdim=True).clamp_min(1e-6)
    return (walk + 0.3 * torch.randn(B, heads, N, D, generator=gen, device=DEV)).to(dtype)


def make_qk(B, H, Hkv, Nq, Nkv, D, dtype, extra, seed):  # noqa: ANN001, ANN201
    gen = torch.Generator(device=DEV).manual_seed(seed)
    q = smooth(B, H, Nq, D, dtype, gen)
    k = smooth(B, Hkv, Nkv, D, dtype, gen)
    if extra.get("transposed"):  # (B, N, H, D) storage viewed as (B, H, N, D), as transformers hands it over
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
        k = k.transpose(1, 2).contiguous().transpose(1, 2)
    if "poison" in extra:
        where, value = extra["poison"]
        t = q if where == "q" else k
        t[0, 0, t.shape[2] // 3, 5] = value
    return q, k


def parity_case(name: str, spec: tuple) -> dict[str, Any]:
    B, H, Hkv, Nq, Nkv, D, dtype, causal, cfg_kw, extra = spec
    cfg = MeanSimilarityConfig(**cfg_kw)
    q, k = make_qk(B, H, Hkv, Nq, Nkv, D, dtype, extra, seed=len(name))
    ref_pred = MeanSimilarityPredictor(cfg, backend="torch")
    fused_pred = MeanSimilarityPredictor(cfg, backend="triton")
    ref = ref_pred.predict(q, k, causal=causal)
    got = fused_pred.predict(q, k, causal=causal)
    if DEV == "cuda":
        torch.cuda.synchronize()
    BlockLayout(got.kv_num_blocks, got.kv_indices, got.block_m, got.block_n, got.seqlen_q, got.seqlen_kv)  # validate
    m_ref, m_got = ref.to_dense_mask(), got.to_dense_mask()
    row_diff = (m_ref != m_got).any(-1)
    rows = row_diff.numel()
    n_rows_diff = int(row_diff.sum())
    n_blocks_diff = int((m_ref != m_got).sum())
    p_ref, p_got = ref_pred.last_scores, fused_pred.last_scores
    nan_same = bool(torch.equal(p_ref.isnan(), p_got.isnan()))
    p_diff = float((p_ref - p_got).abs().nan_to_num(0.0).max()) if p_ref.numel() else 0.0
    exact = bool(torch.equal(ref.kv_num_blocks, got.kv_num_blocks) and torch.equal(ref.kv_indices, got.kv_indices))
    ok = n_rows_diff <= max(2, int(0.005 * rows)) and nan_same and p_diff <= P_ATOL[dtype]
    return {"case": name, "shape": [B, H, Hkv, Nq, Nkv, D], "dtype": str(dtype).replace("torch.", ""),
            "causal": causal, "config": cfg_kw, "extra": {k_: str(v) for k_, v in extra.items()},
            "exact_layout": exact, "rows": rows, "rows_differing": n_rows_diff, "blocks_differing": n_blocks_diff,
            "p_max_abs_diff": p_diff, "p_nan_same": nan_same,
            "density_fused": float(m_got.float().mean()), "density_torch": float(m_ref.float().mean()), "ok": ok}


def launches_per_call() -> dict[str, Any]:
    """CUDA kernels and host reads in one steady-state fused predict() (8K, H=32, H_kv=8, D=128, bf16)."""
    from torch.profiler import ProfilerActivity, profile

    q, k = make_qk(1, 32, 8, 8192, 8192, 128, BF16, {}, seed=1)
    pred = MeanSimilarityPredictor(MeanSimilarityConfig(**DEFAULT), backend="triton")
    for _ in range(3):
        pred.predict(q, k, causal=True)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        pred.predict(q, k, causal=True)
        torch.cuda.synchronize()
    kernels: list[str] = []
    host_reads = 0
    for ev in prof.events():
        dev_type = str(getattr(ev, "device_type", ""))
        if dev_type.endswith("CUDA") and not ev.name.startswith(("cudaLaunch", "cuLaunch", "Memcpy", "Memset")):
            kernels.append(ev.name)
        if ev.name == "aten::_local_scalar_dense":
            host_reads += 1
    return {"kernels": len(kernels), "kernel_names": kernels, "host_reads": host_reads,
            "ok": 0 < len(kernels) <= 3 and host_reads == 0}


def time_ms(fn: Any, reps: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def timing_plan(lengths: list[int]) -> list[tuple[str, dict[str, Any], tuple[int, int, int, int]]]:
    """(config name, config kwargs, (H, H_kv, N, D)) per timing row."""
    plan = []
    for cfg_name, kw in (("cdf0.9", {}), ("topk0.2", {"topk": 0.2, "cdf_threshold": None}), ("default", DEFAULT)):
        plan += [(cfg_name, kw, (32, 8, N, 128)) for N in lengths]
    plan += [("default", DEFAULT, (9, 3, N, 64)) for N in (4096, 8192)]  # SmolLM2-360M
    plan.append(("default", DEFAULT, (4, 1, 32768, 256)))  # Gemma-3-270M, global layers
    return plan


def timing_rows(lengths: list[int], reps: int, torch_max_n: int, deadline: float) -> list[dict[str, Any]]:
    rows = []
    for cfg_name, kw, (H, Hkv, N, D) in timing_plan(lengths):
        cfg = MeanSimilarityConfig(**kw)
        row: dict[str, Any] = {"config": cfg_name, "spec": kw, "N": N, "shape": [1, H, Hkv, N, N, D],
                               "dtype": "bfloat16", "torch_ms": None}
        if time.time() > deadline:
            row["error"] = "skipped: time budget (--time-budget)"
            rows.append(row)
            continue
        try:
            q, k = make_qk(1, H, Hkv, N, N, D, BF16, {}, seed=N + D)
            for backend in ("triton", "torch"):
                if backend == "torch" and N > torch_max_n:
                    row["torch_skipped"] = f"N={N} > --torch-max-n={torch_max_n} (the torch path is slow there)"
                    continue
                call = functools.partial(MeanSimilarityPredictor(cfg, backend=backend).predict, q, k, causal=True)
                row[f"{backend}_ms"] = time_ms(call, reps)
                row[f"{backend}_density"] = float(call().density(causal=True))
                torch.cuda.empty_cache()
            if row["torch_ms"] is not None:
                row["speedup"] = row["torch_ms"] / row["triton_ms"]
        except Exception as exc:  # record and go on (e.g. out of memory in the torch path)
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        rows.append(row)
    return rows


def cpu_smoke() -> int:
    global DEV
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        print("gpu_mean_sim_fused --cpu-smoke: set TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    DEV = "cpu"
    cases = {"smoke-cdf": (1, 4, 2, 100, 130, 16, BF16, True, {"block_m": 16, "block_n": 16}, {"transposed": True}),
             "smoke-mixed-default": (1, 3, 1, 90, 90, 16, BF16, True, {**DEFAULT, "block_m": 16, "block_n": 16}, {}),
             "smoke-topk-nan": (1, 2, 1, 70, 70, 16, F32, True,
                                {"block_m": 16, "block_n": 32, "topk": 0.3, "cdf_threshold": None},
                                {"poison": ("k", float("nan"))})}
    rows = [parity_case(n, c) for n, c in cases.items()]
    print(json.dumps(rows, indent=1))
    return 0 if all(r["ok"] for r in rows) else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="directory for gpu_mean_sim_fused.json")
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--reps", type=int, default=10, help="timed calls per row (>= 5; median reported)")
    ap.add_argument("--time-budget", type=float, default=80.0,
                    help="seconds; parity cases and timing rows not started by then are recorded as skipped")
    ap.add_argument("--torch-max-n", type=int, default=65536, help="time the torch path only up to this length")
    ap.add_argument("--skip-parity", action="store_true")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="no GPU: run three tiny parity cases under TRITON_INTERPRET=1 (checks this script only)")
    args = ap.parse_args()
    if args.cpu_smoke:
        return cpu_smoke()
    if not torch.cuda.is_available():
        print("gpu_mean_sim_fused: needs a CUDA GPU", file=sys.stderr)
        return 2
    reps = max(5, args.reps)
    from sparseattn.eval.env import environment

    result: dict[str, Any] = {**environment("cuda"), "parity": [], "launches": None, "timing": []}
    failed = False
    t_start = time.time()
    if not args.skip_parity:
        for name, spec in CASES.items():
            t0 = time.time()
            if t0 - t_start > args.time_budget:
                result["parity"].append({"case": name, "ok": True, "skipped": "time budget"})
                print(f"parity {name:28s} skipped (time budget)", flush=True)
                continue
            try:
                r = parity_case(name, spec)
            except Exception as exc:
                r = {"case": name, "ok": False, "error": f"{type(exc).__name__}: {exc}",
                     "traceback": traceback.format_exc()[-2000:]}
            r["seconds"] = round(time.time() - t0, 2)
            failed |= not r["ok"]
            result["parity"].append(r)
            print(f"parity {name:28s} {'ok' if r['ok'] else 'FAIL'} "
                  + (r.get("error", "") or f"exact={r['exact_layout']} rows_diff={r['rows_differing']}/{r['rows']} "
                     f"p_diff={r['p_max_abs_diff']:.2e} density={r['density_fused']:.3f}"), flush=True)
            torch.cuda.empty_cache()
    try:
        result["launches"] = launches_per_call()
    except Exception as exc:
        result["launches"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    failed |= not result["launches"]["ok"]
    print(f"launches per fused predict(): {result['launches']}", flush=True)
    result["timing"] = timing_rows(args.lengths, reps, args.torch_max_n, t_start + args.time_budget)

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "gpu_mean_sim_fused.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)

    print(f"\nmean_sim predictor, B=1 bf16 causal, median of {reps} (ms); default = {DEFAULT}; JSON: {path}")
    print(f"{'config':8s} {'H/Hkv/D':>10s} {'N':>7s} {'fused ms':>9s} {'torch ms':>9s} {'speedup':>8s} "
          f"{'dens fused':>10s} {'dens torch':>10s}")
    for r in result["timing"]:
        _, H, Hkv, _, _, D = r["shape"]
        head = f"{r['config']:8s} {f'{H}/{Hkv}/{D}':>10s} {r['N']:7d}"
        if "error" in r:
            print(f"{head} error: {r['error']}")
            continue
        torch_ms = f"{r['torch_ms']:9.3f}" if r["torch_ms"] is not None else f"{'skipped':>9s}"
        speed = f"{r['speedup']:8.2f}" if "speedup" in r else f"{'-':>8s}"
        dens_t = f"{r['torch_density']:10.3f}" if "torch_density" in r else f"{'-':>10s}"
        print(f"{head} {r['triton_ms']:9.3f} {torch_ms} {speed} {r['triton_density']:10.3f} {dens_t}")
    n_fail = sum(not r["ok"] for r in result["parity"])
    n_skip = sum("skipped" in r for r in result["parity"])
    print(f"parity: {len(result['parity']) - n_fail - n_skip}/{len(result['parity'])} ok, {n_skip} skipped (time); "
          f"launches ok: {result['launches'].get('ok')}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
