"""GPU parity of the Triton block-sparse kernel with the reference, at real sizes, in one call.

The CPU tests' matrix (odd lengths, GQA 1/3/4/8, head_dim 64/128/256, causal with N_q < N_kv and
N_q > N_kv, densities 0 / 1 / random, block sizes 64/128, batch > 1 with per-head layouts, strided
inputs, empty rows, fp16 and bf16, pv_threshold skip counts) at 1K–64K tokens. Every case runs on
NaN-poisoned output buffers twice (bitwise determinism) and is compared with the fp32 reference by
the ratio rule (``sparseattn.testing.tolerances``). Long block-aligned cases check the last rows
(which see every key) against a reference over all keys; the others check every row.

Exits non-zero if any case fails. Writes ``gpu_parity.json`` under ``$OUT`` (or ``--out``).
Usage: ``PYTHONPATH=src python3 benchmarks/gpu_parity.py``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from typing import Any

import torch

from sparseattn.layout.block_layout import BlockLayout
from sparseattn.layout.patterns import dense_layout, random_layout
from sparseattn.ops.reference import reference_attention
from sparseattn.testing import timing

F16, BF16 = torch.float16, torch.bfloat16

# name: (B, H, H_kv, N_q, N_kv, D, dtype, causal, block_m, block_n, density, extra)
CASES: dict[str, tuple] = {
    "1K-fp16-full-d64-gqa1-odd": (1, 4, 4, 1000, 1100, 64, F16, False, 64, 64, 0.5, {}),
    "1K-bf16-causal-d128-gqa4-dense": (1, 8, 2, 1024, 1024, 128, BF16, True, 128, 128, 1.0, {}),
    "2K-fp16-causal-d256-gqa8": (1, 8, 1, 2048, 2048, 256, F16, True, 64, 64, 0.3, {}),
    "2K-bf16-causal-d64-gqa3-nq<nkv": (1, 6, 2, 1900, 2100, 64, BF16, True, 128, 64, 0.4, {}),
    "3K-bf16-causal-d128-nq>nkv": (1, 4, 2, 3000, 1000, 128, BF16, True, 64, 128, 0.5, {}),
    "1K-bf16-density0": (1, 4, 1, 1024, 1024, 128, BF16, True, 64, 64, 0.0, {}),
    "4K-bf16-causal-b2-strided": (2, 8, 2, 4096, 4096, 128, BF16, True, 128, 128, 0.2, {"strided": True}),
    "2K-fp16-empty-rows": (2, 4, 2, 2000, 2000, 64, F16, False, 64, 64, 0.6, {"empty_rows": True}),
    "20K-fp16-causal-odd-d128": (1, 4, 1, 20000, 20000, 128, F16, True, 128, 128, 0.3, {}),
    "20K-bf16-causal-odd-tma": (1, 4, 2, 20001, 19999, 128, BF16, True, 128, 128, 0.3,
                                {"config": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3, "USE_TMA": True}}),
    "3K-fp16-nq>nkv-strided-tma": (2, 4, 1, 3001, 1003, 64, F16, True, 128, 128, 0.6,
                                   {"strided": True, "config": {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8,
                                                                "num_stages": 3, "USE_TMA": True}}),
    # the autotuned candidates' switches at real sizes: two programs per SM (maxnreg), TMA for Q/O,
    # no index prefetch; lazy rescaling; the prologue's count loop over several list chunks
    "20K-bf16-causal-odd-2sm-tma-qo": (1, 4, 2, 20001, 19999, 128, BF16, True, 128, 128, 0.3,
                                       {"config": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2,
                                                   "USE_TMA": True, "TMA_QO": True, "PREFETCH": False, "maxnreg": 128}}),
    "3K-fp16-nq>nkv-strided-2sm-qo": (2, 4, 1, 3001, 1003, 64, F16, True, 128, 128, 0.6,
                                      {"strided": True, "config": {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8,
                                                                   "num_stages": 2, "USE_TMA": True, "TMA_QO": True,
                                                                   "maxnreg": 128}}),
    "8K-bf16-causal-lazy-rescale": (1, 8, 2, 8190, 8190, 128, BF16, True, 128, 128, 0.5,
                                    {"config": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2,
                                                "maxnreg": 128, "RESCALE_TAU": 8.0}}),
    "5K-bf16-full-list-chunks": (1, 4, 1, 5000, 5100, 128, BF16, False, 128, 128, 0.6,
                                 {"config": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2,
                                             "maxnreg": 128, "LIST_CHUNK": 16}}),
    "4K-fp16-pv-b64": (1, 4, 1, 4096, 4096, 64, F16, True, 64, 64, 0.7, {"pv": 4.0}),
    "4K-bf16-pv-b128-d128": (1, 4, 2, 4096, 4096, 128, BF16, True, 128, 128, 0.7, {"pv": 4.0}),
    "8K-bf16-llama-causal-0.1": (1, 32, 8, 8192, 8192, 128, BF16, True, 128, 128, 0.1, {}),
    "16K-bf16-causal-dense-d128": (1, 8, 2, 16384, 16384, 128, BF16, True, 128, 128, 1.0, {"tail": 1024}),
    "32K-bf16-full-d64-0.2": (1, 9, 3, 32768, 32768, 64, BF16, False, 64, 64, 0.2, {"tail": 512}),
    "64K-bf16-causal-d128-0.1": (1, 8, 2, 65536, 65536, 128, BF16, True, 128, 128, 0.1, {"tail": 512}),
    "64K-fp16-causal-d256-0.05": (1, 2, 1, 65536, 65536, 256, F16, True, 128, 128, 0.05, {"tail": 512}),
}


def build_layout(B, H, Nq, Nkv, causal, bm, bn, density, seed, extra):  # noqa: ANN001, ANN201
    if density >= 1.0:
        lay = dense_layout(Nq, Nkv, block_m=bm, block_n=bn, batch=B, heads=H, causal=causal, device="cuda")
    else:
        lay = random_layout(Nq, Nkv, density=density, seed=seed, block_m=bm, block_n=bn, batch=B, heads=H,
                            causal=causal, keep_diagonal=True)
        if extra.get("empty_rows"):
            mask = lay.to_dense_mask()
            mask[0, 0, 3] = False
            mask[-1, -1, :] = False
            lay = BlockLayout.from_dense_mask(mask, block_m=bm, block_n=bn, seqlen_q=Nq, seqlen_kv=Nkv)
        lay = lay.to("cuda")
    return lay


def run_case(name: str, spec: tuple) -> dict[str, Any]:
    from sparseattn.ops.triton_launch import block_sparse_fwd

    B, H, Hkv, Nq, Nkv, D, dtype, causal, bm, bn, density, extra = spec
    seed = sum(map(ord, name))
    q, k, v = timing.gpu_qkv(B, H, Hkv, Nq, Nkv, D, dtype=dtype, seed=seed)
    if extra.get("strided"):  # (B, N, H, D) storage viewed as (B, H, N, D)
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
        k = k.transpose(1, 2).contiguous().transpose(1, 2)
    if "pv" in extra:  # attention sink so that the skip rule fires
        gen = torch.Generator(device="cuda").manual_seed(seed)
        w = torch.randn(D, generator=gen, device="cuda")
        w = (w / w.norm() * 8.0 * (D / 64) ** 0.5).to(dtype)
        q = q + w
        k = k.clone()
        k[:, :, :64] += w
    lay = build_layout(B, H, Nq, Nkv, causal, bm, bn, density, seed, extra)
    pv = extra.get("pv")
    res: dict[str, Any] = {"case": name, "density": lay.density(causal)}
    outs = []
    for _ in range(2):
        out = torch.full((B, H, Nq, D), float("nan"), dtype=dtype, device="cuda")
        lse = torch.full((B, H, Nq), float("nan"), dtype=torch.float32, device="cuda")
        st: dict[str, Any] = {}
        block_sparse_fwd(q, k, v, layout=lay, causal=causal, out=out, lse=lse, pv_threshold=pv, stats=st,
                         config=extra.get("config"))
        torch.cuda.synchronize()
        outs.append((out, lse, st))
    (o1, l1, st1), (o2, l2, _) = outs
    res["deterministic"] = bool(torch.equal(o1, o2) and torch.equal(l1, l2))
    res["nan_out"] = int(torch.isnan(o1).sum())
    res["nan_lse"] = int(torch.isnan(l1).sum())
    if pv is not None:
        st_ref: dict[str, Any] = {}
        ref = reference_attention(q.float(), k.float(), v.float(), layout=lay, causal=causal, pv_threshold=pv, stats=st_ref)
        lo = reference_attention(q, k, v, layout=lay, causal=causal, upcast=False, pv_threshold=pv)
        res["stats_kernel"], res["stats_reference"] = st1, st_ref
        from sparseattn.testing.tolerances import check_ratio

        par: dict[str, Any] = {"ok": True, "rows_checked": Nq}
        for what, got, h, lw in (("out", o1, ref.out, lo.out), ("lse", l1, ref.lse, lo.lse)):
            try:
                check_ratio(got, h, lw, what)
            except AssertionError as exc:
                par["ok"] = False
                par.setdefault("failures", []).append(str(exc))
        res["parity"] = par
        res["ok"] = par["ok"] and st1 == st_ref and st_ref["pv_skipped_tiles"] > 0
    else:
        res["parity"] = timing.tail_parity(q, k, v, lay, causal, o1, l1, rows=extra.get("tail"))
        res["ok"] = res["parity"]["ok"]
    res["ok"] = bool(res["ok"] and res["deterministic"] and res["nan_out"] == 0 and res["nan_lse"] == 0)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--budget-s", type=float, default=240.0)
    args = ap.parse_args(argv)
    from sparseattn.ops.triton.configs import collect_autotune_failures

    failed_autotune = collect_autotune_failures()  # every autotuned launch of this run appends its failed candidates
    reason = timing.cuda_unavailable_reason()
    if reason:
        print(f"gpu_parity: {reason}", file=sys.stderr)
        return 2
    t0 = time.time()
    results = []
    for name, spec in CASES.items():
        if time.time() - t0 > args.budget_s:
            results.append({"case": name, "ok": False, "error": "not run: time budget"})
            continue
        t1 = time.time()
        try:
            res = run_case(name, spec)
        except Exception as exc:
            res = {"case": name, "ok": False, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-3000:]}
        res["wall_s"] = time.time() - t1
        results.append(res)
        p = res.get("parity", {})
        print(f"{'PASS' if res['ok'] else 'FAIL'} {name:<34} out_err {p.get('out_err', float('nan')):.2e} "
              f"(bound {p.get('out_bound', float('nan')):.2e}) lse_err {p.get('lse_err', float('nan')):.2e} "
              f"det {res.get('deterministic')} {res.get('stats_kernel', '')} {res.get('error', '')[:300]} "
              f"[{res['wall_s']:.1f}s]", flush=True)
        torch.cuda.empty_cache()
    n_fail = sum(not r["ok"] for r in results)
    print(f"autotune configs that failed to build/run (scored inf): {len(failed_autotune)} "
          f"{sorted(set(failed_autotune))[:3]}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_parity.json"), "w") as f:
        from sparseattn.eval.env import environment

        json.dump({**environment("cuda"), "results": results,
                   "failed_autotune_configs": failed_autotune,
                   "failures": n_fail, "wall_s": time.time() - t0}, f, indent=1, default=str)
    print(f"gpu_parity: {len(results) - n_fail}/{len(results)} cases passed in {time.time() - t0:.0f}s")
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
