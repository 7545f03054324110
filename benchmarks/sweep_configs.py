"""Sweep fixed launch configs of the block-sparse kernel on one shape (which candidates belong in configs.py).

For ``--heads/--kv-heads/--seqlens/--head-dim`` (default: SmolLM2's layer, H=9, H_kv=3, D=64, at 4K
and 8K), bf16, causal, layouts: every causal block (``layout=None``) and a sink+window layout near
``--density``; every (BLOCK_M, BLOCK_N, num_warps, num_stages, maxnreg) that nests in the 128-blocks,
timed with ``bench_ms`` (median, warm-up first) next to SDPA's best backend and the autotuner's pick.
Writes ``sweep_configs.json`` under ``--out``; prints the five best per case last.

Usage: ``PYTHONPATH=src python3 benchmarks/sweep_configs.py [--seqlens 4096 8192] [--out DIR]``
"""

from __future__ import annotations

import argparse
import itertools
import json
import os

import torch

from sparseattn.eval.env import environment
from sparseattn.layout.patterns import pattern_at_density
from sparseattn.ops.triton_launch import block_sparse_fwd
from sparseattn.testing.timing import bench_ms, gpu_qkv, sdpa_runners


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--seqlens", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--density", type=float, default=0.3)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    H, HKV, D = args.heads, args.kv_heads, args.head_dim
    res = []
    for n in args.seqlens:
        q, k, v = gpu_qkv(1, H, HKV, n, n, D)
        sd = sdpa_runners(q, k, v, True)
        sdpa = min(bench_ms(f) for f in sd.values() if callable(f))
        lay = pattern_at_density("sink_window", n, n, density=args.density, block_m=128, block_n=128, heads=H,
                                 causal=True, device="cuda")
        for lname, layout in (("all", None), (f"sink_window~{args.density}", lay)):
            out = torch.empty_like(q)
            auto = bench_ms(lambda: block_sparse_fwd(q, k, v, layout=layout, causal=True, out=out))
            rows = []
            for bm, bn, w, s, nreg in itertools.product((64, 128), (32, 64, 128), (4, 8), (1, 2, 3, 4), (None, 128)):
                if nreg is not None and w == 4:
                    continue
                cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": s}
                if nreg:
                    cfg["maxnreg"] = nreg
                try:
                    t = bench_ms(lambda: block_sparse_fwd(q, k, v, layout=layout, causal=True, out=out, config=cfg))
                except Exception as exc:  # noqa: BLE001 - a config that does not compile is a finding
                    rows.append({"config": cfg, "error": f"{type(exc).__name__}: {str(exc)[:120]}"})
                    continue
                rows.append({"config": cfg, "ms": t})
            ok = sorted((r for r in rows if "ms" in r), key=lambda r: r["ms"])
            res.append({"seqlen": n, "layout": lname, "sdpa_ms": sdpa, "autotuned_ms": auto, "configs": rows,
                        "best": ok[:5]})
            print(json.dumps({"seqlen": n, "layout": lname, "sdpa_ms": round(sdpa, 4), "auto_ms": round(auto, 4),
                              "best": [(r["config"], round(r["ms"], 4)) for r in ok[:5]]}), flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "sweep_configs.json"), "w") as fh:
        json.dump({"shape": {"H": H, "H_kv": HKV, "D": D}, **environment("cuda"), "rows": res}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
