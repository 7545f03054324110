"""``sparseattn bench``: time the Triton block-sparse kernel against dense attention on this GPU.

For each sequence length and target density, builds a block pattern (``--pattern``), checks the
kernel's output against the fp32 reference on the last query rows (ratio rule), then times
(CUDA-event medians):

* sparse — the Triton kernel with the layout,
* dense — the Triton kernel with no layout, and the best PyTorch SDPA backend (cuDNN / flash),

and prints time, speedup, peak memory of the call and the layout's own size (``layout.nbytes``).
``--stress`` adds repeated calls with fresh inputs and layouts (parity, NaN and determinism checks
each time). Needs a CUDA GPU: without one it says so and exits with status 2.

The timing and baseline helpers are shared with ``benchmarks/bench_attention.py``
(:mod:`sparseattn.testing.timing`).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from sparseattn.cli._args import QUANT_GRAN_CHOICES, any_int, nonneg_int, positive_int

PATTERN_CHOICES = ("random", "local", "strided", "block_diagonal", "sink_window")
DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16"}


def _floats(text: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not vals or any(not (0.0 < v <= 1.0) for v in vals):
        raise argparse.ArgumentTypeError(f"densities must be in (0, 1], got {text!r}")
    return vals


def _ints(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or any(v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"lengths must be positive, got {text!r}")
    return vals


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("bench", help="time the block-sparse kernel vs dense attention on this GPU",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pattern", choices=PATTERN_CHOICES, default="random", help="block pattern (default random)")
    p.add_argument("--densities", type=_floats, default=[0.5, 0.2, 0.1],
                   help="comma-separated target block densities in (0, 1] (default 0.5,0.2,0.1)")
    p.add_argument("--seq-lens", type=_ints, default=[8192, 32768], help="comma-separated lengths (default 8192,32768)")
    p.add_argument("--batch", type=positive_int, default=1)
    p.add_argument("--heads", type=positive_int, default=32, help="query heads (default 32, Llama-3.1-8B)")
    p.add_argument("--kv-heads", type=positive_int, default=8, help="key/value heads (default 8)")
    p.add_argument("--head-dim", type=int, default=128, choices=(64, 128, 256))
    p.add_argument("--block-size", type=int, default=128, choices=(64, 128), help="layout block_m = block_n")
    p.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True,
                   help="causal attention (default; --no-causal for full attention)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--stress", type=nonneg_int, nargs="?", const=20, default=0, metavar="N",
                   help="also run N (default 20) calls with fresh inputs/layouts, checking parity, NaN and determinism")
    p.add_argument("--parity-rows", type=positive_int, default=512, help="query rows checked against the reference")
    p.add_argument("--seed", type=any_int, default=0)
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--quant", choices=("int8", "int8_fp8"), default=None,
                   help="also time quantized attention (INT8 Q·K^T; int8_fp8: FP8 P·V, sm_89+) with each layout, "
                        "quantization included, with its cosine / relative L1 against fp32 (docs/QUANT.md)")
    p.add_argument("--quant-gran", choices=QUANT_GRAN_CHOICES, default="per_warp",
                   help="scale granularity of --quant (default per_warp)")
    p.set_defaults(func=run)


def _quant_row(args: argparse.Namespace, q: Any, k: Any, v: Any, lay: Any) -> dict[str, Any]:
    """``--quant``: time of quantized_attention (quantization included) and its accuracy on the last rows."""
    from sparseattn.ops.quant import quantized_attention
    from sparseattn.ops.reference import reference_attention
    from sparseattn.testing import timing
    from sparseattn.testing.tolerances import quant_accuracy

    def run() -> Any:
        return quantized_attention(q, k, v, layout=lay, causal=args.causal, quant=args.quant,
                                   quant_granularity=args.quant_gran)

    out = run()
    rows = max(lay.block_m, min(args.parity_rows, q.shape[2]) // lay.block_m * lay.block_m)
    if q.shape[2] % lay.block_m:
        rows = q.shape[2]
    tail = timing._tail_layout(lay, rows) if rows < q.shape[2] else lay
    ref = reference_attention(q[:, :, -rows:].float(), k.float(), v.float(), layout=tail, causal=args.causal).out
    cos, rel = quant_accuracy(out[:, :, -rows:], ref)
    return {"ms": timing.bench_ms(run), "cos": cos, "rel_l1": rel, "granularity": args.quant_gran,
            "peak_bytes": timing.peak_memory_bytes(run)}


def _layout(pattern: str, n: int, density: float, args: argparse.Namespace, seed: int):  # noqa: ANN202
    from sparseattn.layout.block_layout import BlockLayout
    from sparseattn.layout.patterns import random_layout

    bs = args.block_size
    if pattern == "random":
        lay = random_layout(n, n, density=density, seed=seed, block_m=bs, block_n=bs, batch=args.batch,
                            heads=args.heads, causal=args.causal, keep_diagonal=True)
        return lay.to("cuda")
    one = _pattern_near_density(pattern, n, density, args.causal, bs)
    num = one.kv_num_blocks[:1, :1].contiguous().to("cuda")
    idx = one.kv_indices[:1, :1].contiguous().to("cuda")
    return BlockLayout(num.expand(args.batch, args.heads, -1), idx.expand(args.batch, args.heads, -1, -1), bs, bs, n, n,
                       validate=False)


# pattern -> (size knob, True if density grows with the knob)
_KNOBS = {"local": ("window_blocks", True), "sink_window": ("window_blocks", True),
          "block_diagonal": ("group_blocks", True), "strided": ("stride", False)}


def _pattern_near_density(pattern: str, n: int, density: float, causal: bool, bs: int):  # noqa: ANN202
    """The pattern whose density is closest to ``density``: bisection on its (monotone) size knob.

    (``pattern_at_density`` scans every knob value, which takes minutes at 32K tokens.)
    """
    from sparseattn.layout.patterns import PATTERNS

    knob, increasing = _KNOBS[pattern]
    build = PATTERNS[pattern]
    nb = -(-n // bs)
    cache: dict[int, Any] = {}

    def dens(val: int) -> float:
        if val not in cache:
            cache[val] = build(n, n, causal=causal, block_m=bs, block_n=bs, **{knob: val})
        return cache[val].density(causal)

    lo, hi = 1, nb
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if (dens(mid) < density) == increasing:
            lo = mid
        else:
            hi = mid
    best = min((lo, hi), key=lambda val: abs(dens(val) - density))
    return cache[best]


def _stress(args: argparse.Namespace, n: int, density: float, dtype: Any) -> dict[str, Any]:
    import torch

    from sparseattn.testing import timing

    fails, nans, nondet = 0, 0, 0
    for i in range(args.stress):
        q, k, v = timing.gpu_qkv(args.batch, args.heads, args.kv_heads, n, n, args.head_dim, dtype=dtype,
                                 seed=args.seed + 1000 + i)
        lay = _layout(args.pattern, n, density, args, seed=args.seed + 1000 + i)
        run = timing.kernel_runner(q, k, v, lay, args.causal)
        o1, l1 = run()
        o1, l1 = o1.clone(), l1.clone()
        o2, l2 = run()
        nondet += int(not (torch.equal(o1, o2) and torch.equal(l1, l2)))
        nans += int(bool(torch.isnan(o1).any() or torch.isnan(l1).any()))
        fails += int(not timing.tail_parity(q, k, v, lay, args.causal, o1, l1, rows=args.parity_rows)["ok"])
    return {"calls": args.stress, "parity_failures": fails, "nan_calls": nans, "nondeterministic_calls": nondet}


def run(args: argparse.Namespace) -> int:
    from sparseattn.testing import timing

    reason = timing.cuda_unavailable_reason()
    if reason is not None:
        print(f"sparseattn bench: needs a CUDA GPU to time the Triton kernel: {reason}", file=sys.stderr)
        return 2
    import torch

    from sparseattn.ops.triton_launch import block_sparse_fwd, refusal

    dtype = getattr(torch, DTYPES[args.dtype])
    if args.heads % args.kv_heads:
        print(f"sparseattn bench: --kv-heads {args.kv_heads} must divide --heads {args.heads}", file=sys.stderr)
        return 2
    rows_out: list[dict[str, Any]] = []
    ok = True
    print(f"GPU: {torch.cuda.get_device_name(0)}; B={args.batch} H={args.heads} H_kv={args.kv_heads} D={args.head_dim} "
          f"{args.dtype} {'causal' if args.causal else 'full'} pattern={args.pattern} block={args.block_size}")
    hdr = (f"{'N':>7} {'density':>8} {'sparse ms':>10} {'dense ms':>9} {'SDPA ms':>8} {'vs dense':>9} {'vs SDPA':>8} "
           f"{'peak MiB':>9} {'dense MiB':>9} {'layout KiB':>10} {'parity':>7}")
    print(hdr)
    for n in args.seq_lens:
        q, k, v = timing.gpu_qkv(args.batch, args.heads, args.kv_heads, n, n, args.head_dim, dtype=dtype, seed=args.seed)
        why = refusal(q, k=k, v=v, causal=args.causal)
        if why is not None:
            print(f"sparseattn bench: the Triton kernel refuses these inputs: {why}", file=sys.stderr)
            return 2
        dense_run = timing.kernel_runner(q, k, v, None, args.causal)
        dense_ms = timing.bench_ms(dense_run)
        dense_peak = timing.peak_memory_bytes(lambda: block_sparse_fwd(q, k, v, layout=None, causal=args.causal))
        sdpa = timing.sdpa_runners(q, k, v, args.causal)
        sdpa_ms = min((timing.bench_ms(r) for name, r in sdpa.items() if name in ("cudnn", "flash") and callable(r)),
                      default=float("nan"))
        for d in args.densities:
            lay = _layout(args.pattern, n, d, args, seed=args.seed)
            run_sparse = timing.kernel_runner(q, k, v, lay, args.causal)
            o, l = run_sparse()
            par = timing.tail_parity(q, k, v, lay, args.causal, o, l, rows=args.parity_rows)
            ok &= par["ok"]
            ms = timing.bench_ms(run_sparse)
            peak = timing.peak_memory_bytes(lambda: block_sparse_fwd(q, k, v, layout=lay, causal=args.causal))
            row = {"seqlen": n, "density_target": d, "density": lay.density(args.causal), "sparse_ms": ms,
                   "dense_ms": dense_ms, "sdpa_ms": sdpa_ms, "speedup_vs_dense": dense_ms / ms,
                   "speedup_vs_sdpa": sdpa_ms / ms, "peak_bytes": peak, "dense_peak_bytes": dense_peak,
                   "layout_nbytes": lay.nbytes, "parity": par}
            if getattr(args, "quant", None):
                row["quant"] = _quant_row(args, q, k, v, lay)
            if args.stress:
                row["stress"] = _stress(args, n, d, dtype)
                st = row["stress"]
                ok &= st["parity_failures"] == 0 and st["nan_calls"] == 0 and st["nondeterministic_calls"] == 0
            rows_out.append(row)
            print(f"{n:>7} {row['density']:>8.3f} {ms:>10.3f} {dense_ms:>9.3f} {sdpa_ms:>8.3f} {row['speedup_vs_dense']:>8.2f}x "
                  f"{row['speedup_vs_sdpa']:>7.2f}x {peak / 2**20:>9.1f} {dense_peak / 2**20:>9.1f} "
                  f"{lay.nbytes / 1024:>10.1f} {'ok' if par['ok'] else 'FAIL':>7}"
                  + (f"  stress {row['stress']}" if args.stress else "")
                  + (f"  {args.quant}/{args.quant_gran} {row['quant']['ms']:.3f} ms cos {row['quant']['cos']:.6f} "
                     f"relL1 {row['quant']['rel_l1']:.4f}" if getattr(args, "quant", None) else ""), flush=True)
        del q, k, v
        torch.cuda.empty_cache()
    print("dense = the same Triton kernel without a layout; SDPA = best of cuDNN/flash; peak = CUDA memory allocated "
          "by one call above what was allocated before it (its out and lse included)")
    if args.json:
        from sparseattn.eval.env import environment

        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "func"}, "rows": rows_out,
                       "environment": environment("cuda")}, f, indent=1, default=str)
    return 0 if ok else 1
