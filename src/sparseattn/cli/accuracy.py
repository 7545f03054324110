"""``sparseattn accuracy``: the op-level accuracy suite (see :mod:`sparseattn.eval.accuracy`).

Every case reports two separate things: **correctness** (the backend vs the float64 reference of
the same sparse op; a failure is a bug, exit status 1) and the **cost of sparsity** (the sparse
output vs dense attention; informative, never a failure). Writes ``accuracy.md``,
``accuracy.json``, ``attention_comparison.png`` and ``sparse_pattern.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
from typing import Any

from sparseattn.cli._args import any_int, device, positive_int


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("accuracy", help="accuracy suite: correctness vs fp64 reference, cost of sparsity vs dense",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="sparseattn_out/accuracy", help="output directory (default sparseattn_out/accuracy)")
    p.add_argument("--quick", action="store_true", help="small grid (one length, float32 + bfloat16) for smoke runs")
    p.add_argument("--seq-lens", type=positive_int, nargs="+", default=None, help="sweep lengths (default 512 1024; quick: 384)")
    p.add_argument("--levels", nargs="+", choices=("low", "medium", "high"), default=None,
                   help="sparsity levels (default all: low=0.6, medium=0.4, high=0.25 target density)")
    p.add_argument("--dtypes", nargs="+", choices=("float32", "float16", "bfloat16", "float64"), default=None)
    p.add_argument("--pattern", default="sink_window", help="static pattern of the layouts (default sink_window)")
    p.add_argument("--inputs", choices=("structured", "random"), default="structured",
                   help="sweep inputs (default structured synthetic: local bias + attention sink)")
    p.add_argument("--head-dim", type=positive_int, default=None, help="default 64 (quick: 32)")
    p.add_argument("--block-size", type=positive_int, default=None, help="block_m = block_n (default 64; quick: 32)")
    p.add_argument("--seed", type=any_int, default=0)
    p.add_argument("--device", type=device, default=None, help="default: cuda if available, else cpu")
    p.add_argument("--backend", default="auto", help="auto (default), triton or reference")
    p.add_argument("--no-plots", action="store_true", help="skip the PNGs (no matplotlib needed)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from sparseattn.eval.accuracy import AccuracyConfig, run_accuracy_suite, write_accuracy_report

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    kw: dict[str, Any] = dict(pattern=args.pattern, inputs=args.inputs, seed=args.seed, device=device, backend=args.backend)
    for name in ("seq_lens", "levels", "dtypes", "head_dim", "block_size"):
        val = getattr(args, name)
        if val is not None:
            kw[name] = tuple(val) if isinstance(val, list) else val
    cfg = AccuracyConfig.quick(**kw) if args.quick else AccuracyConfig(**kw)
    res = run_accuracy_suite(cfg, progress=not args.no_progress)
    paths = write_accuracy_report(res, args.out, plots=not args.no_plots)
    s = res["summary"]
    print(f"sparseattn accuracy: {s['cases']} cases on {device}, backends: {', '.join(s['backends'])}, {s['seconds']:.1f} s")
    print(f"  correctness (backend vs fp64 reference of the same sparse op): {s['correctness_pass']}/{s['cases']} pass")
    fails = [r for r in res["cases"] if not r["correctness"]["pass"]]
    for r in fails[:10]:
        c = r["correctness"]
        print(f"    FAIL {r['section']}: {r['name']}: max err {c['max_abs_err']:.3e} > bound {c['bound']:.3e} "
              f"or lse err {c['lse_max_abs_err']:.3e} > {c['lse_bound']:.3e} (NaN {c['nan_count']})")
    sweep = [r for r in res["cases"] if r["section"] == "sweep"]
    if sweep:
        print("  cost of sparsity (sparse vs fp64 dense; mean over the sweep):")
        for lv in cfg.levels:
            rs = [r for r in sweep if r["level"] == lv]
            mean = lambda key: sum(r["cost"][key] for r in rs) / len(rs)  # noqa: E731
            print(f"    {lv:<6} density {mean('density'):.3f}  cosine {mean('cosine'):.5f}  rel L1 {mean('relative_l1'):.4f}"
                  f"  kept mass {mean('kept_mass'):.4f}")
    for key, p in paths.items():
        print(f"  wrote {key}: {p}")
    return 0 if not fails else 1
