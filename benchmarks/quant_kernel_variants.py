"""Quantized-kernel variant shoot-out in one device call: load paths and launch configs, timed side by side.

The quantized prefill kernel (:mod:`sparseattn.ops.triton.block_sparse_fwd_quant`) on pre-quantized operands
(the quantization is left out on purpose: it is the same for every variant; ``bench_quant.py`` times it) at
32K causal, H=32, H_kv=8, D=128 by default, dense and at density 0.1 (random 128x128 layouts keeping the
diagonal, as ``bench_quant.py``). Operand sets: ``int8`` per_warp with the default options (Q smoothing: the
per-key score bias), ``int8`` per_warp with K smoothing only (no bias), ``int8_fp8`` per_warp default.
Variants are fixed launch configs with the kernel switches
``USE_TMA`` (K/V tiles through tensor descriptors), ``TMA_QO`` (Q load and output store through them too)
and ``PREFETCH`` (next key-block index read one iteration ahead); ``auto`` is the autotuned
launch. Each variant's output is compared with the ``base`` variant (same tiles: bitwise expected) and its
accuracy against fp32 attention on the last ``--parity-rows`` query rows is recorded; compiled registers /
spills / shared memory come from the launch telemetry. Timing: ``--repeats`` round-robin rounds of
``bench_ms`` (warm-up, synchronised, median) with our bf16 kernel (autotuned) and cuDNN SDPA (dense rows) in
every round; ratios are per round, then the median.

Writes ``quant_kernel_variants.json`` under ``--out`` (default ``$OUT`` or ``.``) and prints a table last.
Usage (GPU): ``PYTHONPATH=src python3 benchmarks/quant_kernel_variants.py [--budget-s 300] [--repeats 5]``
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

from bench_quant import _Ref, _env, _layout  # noqa: E402
from kernel_variants import _median  # noqa: E402

from sparseattn.ops import quant as Q  # noqa: E402


def _cfg(bm: int, bn: int, w: int, s: int, **extra: Any) -> dict[str, Any]:
    return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": s, **extra}


VARIANTS: dict[str, dict[str, Any] | None] = {
    "base": _cfg(128, 64, 8, 2, maxnreg=128),  # the pointer-load winner of the sixteenth session
    "pf": _cfg(128, 64, 8, 2, PREFETCH=True, maxnreg=128),
    "tma": _cfg(128, 64, 8, 2, USE_TMA=True, maxnreg=128),
    "tma-pf": _cfg(128, 64, 8, 2, USE_TMA=True, PREFETCH=True, maxnreg=128),
    "tma-pf-qo": _cfg(128, 64, 8, 2, USE_TMA=True, PREFETCH=True, TMA_QO=True, maxnreg=128),
    "tma-pf-nocap": _cfg(128, 64, 8, 2, USE_TMA=True, PREFETCH=True),
    "tma-pf-s3": _cfg(128, 64, 8, 3, USE_TMA=True, PREFETCH=True, maxnreg=128),
    "tma-pf-128x128": _cfg(128, 128, 8, 2, USE_TMA=True, PREFETCH=True),
    "auto": None,
}
OPERANDS = {  # name: (quant, smooth_q, balance_qk)
    "int8_default": ("int8", True, True),
    "int8_k_only": ("int8", False, False),
    "int8_fp8_default": ("int8_fp8", True, True),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqlen", type=int, default=32768)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128, choices=(64, 128))
    ap.add_argument("--densities", default="1.0,0.1")
    ap.add_argument("--operands", default=",".join(OPERANDS), help=f"comma-separated, of {list(OPERANDS)}")
    ap.add_argument("--variants", default=None, help="comma-separated variant names (default: all)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--parity-rows", type=int, default=512)
    ap.add_argument("--budget-s", type=float, default=300.0, help="stop starting new rows after this many seconds")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args(argv)
    from sparseattn.testing import timing

    reason = timing.cuda_unavailable_reason()
    if reason:
        print(f"quant_kernel_variants: {reason}", file=sys.stderr)
        return 2
    bad_ops = [o for o in args.operands.split(",") if o not in OPERANDS]
    if bad_ops:
        print(f"quant_kernel_variants: --operands has unknown names; expected some of {list(OPERANDS)}, got {bad_ops}",
              file=sys.stderr)
        return 2
    variants = {n: c for n, c in VARIANTS.items() if not args.variants or n in args.variants.split(",")}
    t0 = time.time()
    deadline = t0 + args.budget_s
    info = _env()
    print(json.dumps(info), flush=True)
    from sparseattn.ops.triton_launch import block_sparse_fwd

    B, H, Hkv, N, D = 1, args.heads, args.kv_heads, args.seqlen, args.head_dim
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, h, N, D, generator=g, device="cuda", dtype=torch.float32).to(torch.bfloat16)
               for h in (H, Hkv, Hkv))
    ref = _Ref(q, k, v, True, args.parity_rows)
    cudnn = timing.sdpa_runners(q, k, v, True).get("cudnn")
    rows: list[dict[str, Any]] = []
    for d in (float(x) for x in args.densities.split(",")):
        lay = _layout(N, d, B, H, True, "cuda")
        full = lay if lay is not None else Q.resolve_layout("bench", q, k, None, None, 128, True)
        runners: dict[str, Any] = {"bf16": lambda lay=lay: block_sparse_fwd(q, k, v, layout=lay, causal=True)}
        if d >= 1.0 and callable(cudnn):
            runners["cudnn"] = cudnn
        row: dict[str, Any] = {"density": full.density(True), "density_target": d, "entries": {}}
        for oname in args.operands.split(","):
            quant, sq, bal = OPERANDS[oname]
            qq = Q.quantize_qkv(q, k, v, quant=quant, quant_granularity="per_warp", smooth_q=sq, balance_qk=bal)
            base_out = None
            for vname, cfg in variants.items():
                name = f"{oname}/{vname}"
                ent: dict[str, Any] = {"config": cfg}
                row["entries"][name] = ent
                if time.time() > deadline:
                    ent["skipped"] = "time budget"
                    continue
                try:
                    tele: dict[str, Any] = {}
                    run = (lambda qq=qq, cfg=cfg, tele=tele:
                           Q.quantized_attention_from(qq, full, causal=True, config=cfg, telemetry=tele))
                    out = run().out
                    torch.cuda.synchronize()
                    ent["compiled"] = {kk: tele.get(kk) for kk in ("config", "n_regs", "n_spills", "shared_bytes")}
                    if tele.get("tune") is not None:
                        ent["tune"] = tele["tune"]
                    ent.update(ref.accuracy(out, lay))
                    if base_out is None:
                        base_out = out
                    else:
                        ent["max_abs_diff_vs_first"] = float((out.float() - base_out.float()).abs().max())
                    runners[name] = run
                except Exception as exc:  # a variant that fails to compile or launch is reported, not fatal
                    ent["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
                print(json.dumps({"density": d, "name": name, **{kk: x for kk, x in ent.items() if kk != "tune"}},
                                 default=str), flush=True)
            del qq
        rounds = timing.round_robin_ms(runners, args.repeats)
        row["bf16_ms_rounds"] = rounds["bf16"]
        row["bf16_ms"] = _median(rounds["bf16"])
        if "cudnn" in rounds:
            row["cudnn_ms_rounds"] = rounds["cudnn"]
            row["cudnn_ms"] = _median(rounds["cudnn"])
        for name, ent in row["entries"].items():
            ms = rounds.get(name)
            if not ms:
                continue
            ent["ms_rounds"] = ms
            ent["ms"] = _median(ms)
            ent["vs_bf16"] = _median([b / m for b, m in zip(rounds["bf16"], ms)])
            if "cudnn" in rounds:
                ent["vs_cudnn"] = _median([c / m for c, m in zip(rounds["cudnn"], ms)])
        rows.append(row)
    doc = {"env": info, "shape": {"B": B, "H": H, "H_kv": Hkv, "N": N, "D": D, "causal": True}, "rows": rows,
           "wall_s": time.time() - t0}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "quant_kernel_variants.json"), "w") as f:
        json.dump(doc, f, indent=1, default=str)
    print(f"\nenv: {info.get('gpu')} torch {info.get('torch')} triton {info.get('triton')} commit {info.get('commit')}")
    for row in rows:
        print(f"density {row['density']:.3f}: our bf16 {row['bf16_ms']:.3f} ms"
              + (f", cuDNN {row['cudnn_ms']:.3f} ms" if "cudnn_ms" in row else ""))
        print("| variant | ms | vs our bf16 | vs cuDNN | rel L1 | cos | regs | spills | smem | diff vs first |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for name, ent in row["entries"].items():
            c = ent.get("compiled") or {}
            if "ms" not in ent:
                print(f"| {name} | {ent.get('error', ent.get('skipped', '-'))[:60]} | | | | | | | | |")
                continue
            print(f"| {name} | {ent['ms']:.3f} | {ent['vs_bf16']:.3f} | {ent.get('vs_cudnn', float('nan')):.3f} | "
                  f"{ent.get('rel_l1', float('nan')):.4f} | {ent.get('cos', float('nan')):.6f} | {c.get('n_regs')} | "
                  f"{c.get('n_spills')} | {c.get('shared_bytes')} | {ent.get('max_abs_diff_vs_first', 0.0):.2e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
