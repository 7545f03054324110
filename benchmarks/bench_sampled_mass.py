"""The sampled block mass (the `sampled` predictor's scores) on the GPU: the split method (two launches, key blocks
split into chunks) against the walk (one launch, one program per query block and KV head), beside cuDNN/flash dense
attention of the same shape in the same process.

Per shape, length, dtype and rows per block: both methods' medians (CUDA events after warm-up, `bench_ms`, rounds
alternated), the split/walk agreement (max abs difference of the mass; NaN-free inputs), and the dense SDPA time. Causal,
B=1, random normal inputs (the cost does not depend on the values). Writes `sampled_mass.json` under --out and prints a
table.

    python benchmarks/bench_sampled_mass.py --out DIR [--shapes 4,1,256 32,8,128] [--lengths 16384 32768]
        [--rows 8 16 32] [--dtypes bfloat16 float32] [--repeats 5] [--budget-s 150]
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

from sparseattn.predictors.fused_sampled import sampled_block_mass, sampled_mass_refusal  # noqa: E402
from sparseattn.testing import timing  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", nargs="+", default=["4,1,256", "32,8,128"], help="H,H_kv,D per shape")
    ap.add_argument("--lengths", nargs="+", type=int, default=[16384, 32768])
    ap.add_argument("--rows", nargs="+", type=int, default=[8, 16, 32])
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--budget-s", type=float, default=150.0, help="stop starting new rows after this many seconds")
    args = ap.parse_args()
    why = timing.cuda_unavailable_reason()
    if why is not None:
        print(f"bench_sampled_mass: {why}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    rows: list[dict[str, Any]] = []
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}")
    print(f"{'shape':>10} {'N':>6} {'dtype':>8} {'rows':>4} {'walk ms':>8} {'split ms':>8} {'walk/split':>10} "
          f"{'SDPA ms':>8} {'max|diff|':>9}")
    for shape in args.shapes:
        H, Hkv, D = (int(x) for x in shape.split(","))
        for N in args.lengths:
            for dt in args.dtypes:
                dtype = getattr(torch, dt)
                gen = torch.Generator(device="cuda").manual_seed(N + H)
                q = torch.randn(1, H, N, D, generator=gen, device="cuda").to(dtype)
                k = torch.randn(1, Hkv, N, D, generator=gen, device="cuda").to(dtype)
                v = torch.randn(1, Hkv, N, D, generator=gen, device="cuda").to(dtype)
                sdpa = timing.sdpa_runners(q.to(torch.bfloat16), k.to(torch.bfloat16), v.to(torch.bfloat16),
                                           causal=True)
                for r in args.rows:
                    if time.time() - t0 > args.budget_s:
                        print(f"bench_sampled_mass: --budget-s {args.budget_s} reached; later rows not run")
                        break
                    why = sampled_mass_refusal(q, k, block_m=64, block_n=64, rows_per_block=r)
                    if why is not None:
                        rows.append(dict(shape=shape, N=N, dtype=dt, rows=r, refused=why))
                        print(f"{shape:>10} {N:>6} {dt:>8} {r:>4} refused: {why}")
                        continue
                    kw = dict(causal=True, block_m=64, block_n=64, rows_per_block=r)
                    a = sampled_block_mass(q, k, method="walk", **kw)
                    b = sampled_block_mass(q, k, method="split", **kw)
                    diff = float((a - b).abs().max())
                    runners = {"walk": lambda: sampled_block_mass(q, k, method="walk", **kw),
                               "split": lambda: sampled_block_mass(q, k, method="split", **kw)}
                    runners.update({f"sdpa_{n}": fn for n, fn in sdpa.items() if callable(fn)})
                    rr = timing.round_robin_ms(runners, args.repeats)
                    med = {n: sorted(v)[len(v) // 2] for n, v in rr.items() if v}
                    sd = min([(ms, n) for n, ms in med.items() if n.startswith("sdpa_")] or [(float("nan"), "none")])
                    row = dict(shape=shape, N=N, dtype=dt, rows=r, walk_ms=med["walk"], split_ms=med["split"],
                               sdpa_ms=sd[0], sdpa_backend=sd[1], max_abs_diff=diff, rounds=rr)
                    rows.append(row)
                    print(f"{shape:>10} {N:>6} {dt:>8} {r:>4} {med['walk']:>8.3f} {med['split']:>8.3f} "
                          f"{med['walk'] / med['split']:>10.2f} {sd[0]:>8.3f} {diff:>9.2e}")
                del q, k, v
                torch.cuda.empty_cache()
    with open(os.path.join(args.out, "sampled_mass.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
