"""``sparseattn quick-test``: one block-sparse attention call checked against dense attention.

Runs ``sparseattn.attention(..., backend="auto")`` twice on the same seeded inputs — once with a
block layout, once dense — and prints the error of the sparse output against the dense one (the
cost of sparsity), the layout's sparsity and the softmax mass it keeps, and a PASS/FAIL verdict
against the stated thresholds (exit status 1 on FAIL).

Inputs: by default ``structured`` synthetic q/k (local bias + an attention sink, see
:mod:`sparseattn.testing.inputs`), because i.i.d. random q/k give near-uniform attention where
dropping blocks drops mass in proportion and no sparse layout can be accurate. The same layout on
random q/k is always reported next to it, so the effect of the input is visible.
"""

from __future__ import annotations

import argparse
from typing import Any

from sparseattn.cli._args import any_int, density, device, finite_float, positive_int

SPARSE_LEVELS = {"low": 0.6, "medium": 0.4, "high": 0.25}  # target density of the (causal) block region
DTYPES = ("float32", "float16", "bfloat16", "float64")


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "quick-test", help="check one block-sparse attention call against dense attention",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=positive_int, default=1024, help="query and key length (default 1024)")
    p.add_argument("--batch", type=positive_int, default=1)
    p.add_argument("--heads", type=positive_int, default=8, help="query heads (default 8)")
    p.add_argument("--kv-heads", type=positive_int, default=None, help="key/value heads for GQA (default: --heads)")
    p.add_argument("--head-dim", type=positive_int, default=64)
    p.add_argument("--block-size", type=positive_int, default=64, help="block_m = block_n (default 64)")
    p.add_argument("--causal", action="store_true", help="causal attention (bottom-right aligned)")
    p.add_argument("--pattern", default="sink_window",
                   help="static block pattern: sink_window (default), sliding_window, strided, random, block_diagonal, dense")
    lvl = p.add_mutually_exclusive_group()
    lvl.add_argument("--sparse-level", choices=sorted(SPARSE_LEVELS), default="medium",
                     help="target density of the (causal) block region: low=0.6, medium=0.4 (default), high=0.25")
    lvl.add_argument("--density", type=density, default=None, help="explicit target block density in (0, 1]")
    p.add_argument("--inputs", choices=("structured", "random"), default="structured",
                   help="q/k generator (default structured: synthetic local bias + attention sink)")
    p.add_argument("--seed", type=any_int, default=0)
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--device", type=device, default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)")
    p.add_argument("--benchmark", action="store_true", help="also time the sparse and dense calls")
    p.add_argument("--min-cosine", type=finite_float, default=0.95, help="PASS needs cosine > this (default 0.95)")
    p.add_argument("--max-rel-l1", type=finite_float, default=0.1, help="PASS needs relative L1 < this (default 0.1)")
    p.add_argument("--min-sparsity", type=finite_float, default=0.05, help="PASS needs sparsity > this (default 0.05)")
    p.set_defaults(func=run)


def _time_call(fn: Any, device: Any, repeats: int = 5) -> float:
    import time

    import torch

    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2] * 1e3


def run(args: argparse.Namespace) -> int:
    import torch

    import sparseattn
    from sparseattn._validation import fail
    from sparseattn.eval.metrics import precision_metric
    from sparseattn.layout.patterns import PATTERNS, pattern_at_density
    from sparseattn.ops.attention import select_backend
    from sparseattn.testing.inputs import make_qkv

    fn = "sparseattn quick-test"
    if args.pattern not in PATTERNS:
        raise fail(fn, "--pattern", "is not a known pattern", f"one of {sorted(PATTERNS)}", repr(args.pattern))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype)
    kv_heads = args.kv_heads or args.heads
    if args.heads % kv_heads:
        raise fail(fn, "--kv-heads", "must divide --heads (GQA)", f"a divisor of {args.heads}", kv_heads)
    target = args.density if args.density is not None else SPARSE_LEVELS[args.sparse_level]
    N = args.seq_len
    gen_kw: dict[str, Any] = dict(kv_heads=kv_heads, dtype=dtype, device=device, seed=args.seed)
    q, k, v = make_qkv(args.inputs, args.batch, args.heads, N, args.head_dim, **gen_kw)
    layout = pattern_at_density(args.pattern, N, density=target, causal=args.causal, block_m=args.block_size,
                                block_n=args.block_size, batch=args.batch, heads=args.heads, device=device)
    density = layout.density(causal=args.causal)
    sparsity = 1.0 - density

    backend = select_backend(q, k, v, layout=layout, causal=args.causal)
    dense_backend = select_backend(q, k, v, layout=None, causal=args.causal)
    sparse = sparseattn.attention(q, k, v, causal=args.causal, layout=layout, backend="auto")
    dense = sparseattn.attention(q, k, v, causal=args.causal, backend="auto")
    m = precision_metric(sparse.out, dense.out, density=density)
    finite = torch.isfinite(dense.lse)
    kept_mass = float(torch.exp((sparse.lse - dense.lse)[finite].double()).mean()) if bool(finite.any()) else 1.0

    inputs_desc = {
        "structured": "structured synthetic q/k (seeded; local bias + 1 attention-sink token; NOT model activations)",
        "random": "i.i.d. Gaussian q/k/v (seeded; near-uniform attention: the hardest case for sparsity)",
    }[args.inputs]
    print("sparseattn quick-test")
    print(f"  inputs   : {inputs_desc}")
    print(f"  shapes   : q ({args.batch}, {args.heads}, {N}, {args.head_dim})  k/v ({args.batch}, {kv_heads}, {N}, "
          f"{args.head_dim})  {args.dtype} on {device}  causal={args.causal}")
    print(f"  layout   : {args.pattern}, block {args.block_size}x{args.block_size}, target density {target:.3f} "
          f"-> density {density:.3f} (sparsity {sparsity:.1%} of the {'causal ' if args.causal else ''}block region)")
    print(f"  backend  : sparse={backend}  dense={dense_backend}  (sparseattn.attention(backend='auto'))")
    print("  sparse output vs dense output of the same op (the cost of sparsity):")
    print(f"    cosine       {m['cosine']:.6f}")
    print(f"    relative L1  {m['relative_l1']:.6f}")
    print(f"    relative L2  {m['relative_l2']:.6f}")
    print(f"    RMSE         {m['rmse']:.3e}")
    print(f"    max abs      {m['max_abs']:.3e}")
    print(f"    SQNR         {m['sqnr_db']:.2f} dB")
    print(f"    softmax mass kept by the layout (mean over rows) {kept_mass:.4f}")
    if m["nan_count"]:
        print(f"    NaN elements {m['nan_count']}")

    if args.inputs == "structured":
        qr, kr, vr = make_qkv("random", args.batch, args.heads, N, args.head_dim, **gen_kw)
        rs = sparseattn.attention(qr, kr, vr, causal=args.causal, layout=layout, backend="auto")
        rd = sparseattn.attention(qr, kr, vr, causal=args.causal, backend="auto")
        rm = precision_metric(rs.out, rd.out)
        print(f"  for contrast, the same layout on i.i.d. random q/k: cosine {rm['cosine']:.4f}, "
              f"relative L1 {rm['relative_l1']:.4f} (not part of the verdict)")

    if args.benchmark:
        t_sparse = _time_call(lambda: sparseattn.attention(q, k, v, causal=args.causal, layout=layout), device)
        t_dense = _time_call(lambda: sparseattn.attention(q, k, v, causal=args.causal), device)
        print(f"  timing (median of 5, {device}): sparse {t_sparse:.2f} ms [{backend}], dense {t_dense:.2f} ms "
              f"[{dense_backend}], ratio dense/sparse {t_dense / t_sparse:.2f}x")
        if backend == "reference":
            print("    note: the reference backend is a correctness oracle, not a fast path; timings are not kernel claims")

    checks = [
        (f"cosine > {args.min_cosine}", m["cosine"] > args.min_cosine),
        (f"relative L1 < {args.max_rel_l1}", m["relative_l1"] < args.max_rel_l1),
        (f"sparsity > {args.min_sparsity:.0%}", sparsity > args.min_sparsity),
        ("no NaN", m["nan_count"] == 0),
    ]
    ok = all(c for _, c in checks)
    print("  checks   : " + ", ".join(f"{name} [{'ok' if c else 'FAILED'}]" for name, c in checks))
    print(f"  verdict  : {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1
