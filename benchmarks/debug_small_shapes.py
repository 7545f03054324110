"""Device diagnostics for whole-model work (one call): (1) which launch configs suit 64×64 layout blocks at
small head dims (the default model's shape: H=9, H_kv=3, D=64), against SDPA on the same inputs; (2) CUDA
graph capture of the patched-model pieces, reporting the first failing step with its full error.

    PYTHONPATH=src python3 benchmarks/debug_small_shapes.py --out DIR
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))


def _time(fn, reps=10):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def configs_part(res):
    from sparseattn.layout.patterns import causal_layout, sink_window_layout
    from sparseattn.ops import triton_launch

    rows = []
    for (H, Hkv, D, N) in [(9, 3, 64, 8192), (9, 3, 64, 4096), (32, 8, 128, 8192)]:
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(1, H, N, D, device="cuda", dtype=torch.bfloat16, generator=g)
        k = torch.randn(1, Hkv, N, D, device="cuda", dtype=torch.bfloat16, generator=g)
        v = torch.randn(1, Hkv, N, D, device="cuda", dtype=torch.bfloat16, generator=g)
        sdpa = _time(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
        for blk in (64, 128):
            for name, lay in (("causal", causal_layout(N, N, block_m=blk, block_n=blk, heads=H, device="cuda")),
                              ("sink_window16", sink_window_layout(N, N, window_blocks=16 * 64 // blk, block_m=blk,
                                                                   block_n=blk, heads=H, device="cuda"))):
                auto = _time(lambda: triton_launch.block_sparse_fwd(q, k, v, layout=lay, causal=True))
                best = dict(triton_launch._TUNED._data) if hasattr(triton_launch._TUNED, "_data") else {}
                cand = []
                for bm, bn, w, s, nreg, tma in [(64, 64, 4, 2, None, False), (64, 64, 4, 3, None, False),
                                                (64, 64, 4, 4, None, False), (64, 64, 4, 3, None, True),
                                                (64, 64, 8, 3, None, False), (64, 32, 4, 3, None, False),
                                                (64, 64, 4, 3, 128, False), (128, 64, 8, 2, 128, False),
                                                (128, 128, 8, 2, 128, True), (128, 64, 8, 3, None, False)]:
                    if blk % bm or blk % bn:
                        continue
                    cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": s, "USE_TMA": tma}
                    if nreg:
                        cfg["maxnreg"] = nreg
                    try:
                        t = _time(lambda: triton_launch.block_sparse_fwd(q, k, v, layout=lay, causal=True, config=cfg))
                    except Exception as exc:  # noqa: BLE001
                        t = f"{type(exc).__name__}: {str(exc)[:120]}"
                    cand.append({"cfg": cfg, "ms": t})
                row = {"H": H, "Hkv": Hkv, "D": D, "N": N, "block": blk, "layout": name,
                       "density": lay.density(causal=True), "sdpa_ms": sdpa, "auto_ms": auto, "configs": cand,
                       "tuned": {str(k_): v_ for k_, v_ in best.items()}}
                rows.append(row)
                fin = [c for c in cand if isinstance(c["ms"], float)]
                b = min(fin, key=lambda c: c["ms"]) if fin else None
                print(f"H={H} D={D} N={N} blk={blk} {name:14s} dens={row['density']:.3f} sdpa={sdpa:.3f} "
                      f"auto={auto:.3f} best={b['ms'] if b else '-':.3f} {b['cfg'] if b else ''}", flush=True)
    res["configs"] = rows


def graphs_part(res):
    from sparseattn.eval.bench_model import build_random_model
    from sparseattn.integrations import patch_model
    from sparseattn.layout.patterns import causal_layout
    from sparseattn.ops import triton_launch

    steps = []

    def attempt(name, fn, mode="global"):
        try:
            fn()
            torch.cuda.synchronize()
            from sparseattn.testing.timing import capture_graph

            capture_graph(fn, capture_error_mode=mode)()
            torch.cuda.synchronize()
            steps.append({"step": name, "mode": mode, "ok": True})
            print(f"capture {name} ({mode}): ok", flush=True)
        except Exception as exc:  # noqa: BLE001
            tb = traceback.format_exc()
            steps.append({"step": name, "mode": mode, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000],
                          "traceback": tb[-4000:]})
            print(f"capture {name} ({mode}): FAILED {type(exc).__name__}: {str(exc)[:300]}\n{tb[-2500:]}", flush=True)
            torch.cuda.synchronize()

    q = torch.randn(1, 9, 2048, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 3, 2048, 64, device="cuda", dtype=torch.bfloat16)
    lay = causal_layout(2048, 2048, block_m=64, block_n=64, heads=9, device="cuda")
    attempt("kernel_autotuned", lambda: triton_launch.block_sparse_fwd(q, k, k, layout=lay, causal=True))
    attempt("kernel_fixed_cfg", lambda: triton_launch.block_sparse_fwd(
        q, k, k, layout=lay, causal=True, config={"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}))
    attempt("kernel_window", lambda: triton_launch.block_sparse_fwd(q, k, k, layout=None, causal=True, sliding_window=512))
    model = build_random_model("smollm2-135m", layers=2, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, 1000, (1, 2048), device="cuda")
    with torch.no_grad():
        attempt("dense_model", lambda: model(ids, use_cache=False, logits_to_keep=1))
        with patch_model(model, pattern="dense"):
            attempt("patched_model_pattern", lambda: model(ids, use_cache=False, logits_to_keep=1))
            attempt("patched_model_pattern_relaxed", lambda: model(ids, use_cache=False, logits_to_keep=1), "relaxed")
        with patch_model(model, predictor="mean_sim:cdf_threshold=0.9"):
            attempt("patched_model_fused_mean_sim", lambda: model(ids, use_cache=False, logits_to_keep=1))
    res["graphs"] = steps


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--skip-configs", action="store_true")
    a = p.parse_args()
    res = {}
    try:
        graphs_part(res)
    finally:
        if not a.skip_configs:
            configs_part(res)
        os.makedirs(a.out, exist_ok=True)
        from sparseattn.eval.env import environment

        res["environment"] = environment("cuda" if torch.cuda.is_available() else "cpu")
        with open(os.path.join(a.out, "debug_small_shapes.json"), "w") as f:
            json.dump(res, f, indent=1, default=str)


if __name__ == "__main__":
    main()
