"""``sparseattn compare``: two predictors (or one vs the oracle) on the same Q/K/V.

Examples::

    sparseattn compare --a mean_sim --b oracle --lengths 1024 4096 --out runs/cmp
    sparseattn compare --a sketch_walk --b sketch_walk:walk=false --input structured --layers 4
    sparseattn compare --a mean_sim:cdf_threshold=0.95 --b sketch_walk --input captured/qkv.safetensors
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from sparseattn.cli._args import any_int, device, positive_int


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "compare", help="compare two block predictors (or one vs the oracle): sparsity, overlap, Jaccard, mass recall",
        description="Compare two block predictors on the same Q/K/V: sparsity of each, block overlap, Jaccard, "
                    "attention-mass recall (share of the exact attention mass inside the selected blocks), "
                    "correlation of block scores, output cosine vs dense; per layer and per length. Writes "
                    "compare.json, compare.md and side-by-side mask PNGs.")
    p.add_argument("--a", required=True, help="predictor spec, e.g. 'mean_sim:cdf_threshold=0.9'")
    p.add_argument("--b", default="oracle", help="predictor spec, or 'oracle' for the exact-mass upper bound at A's block budget (default)")
    p.add_argument("--input", default="structured",
                   help="'random', 'structured' (seeded synthetic), or a .safetensors file/directory from 'sparseattn collect'")
    p.add_argument("--lengths", type=positive_int, nargs="+", default=[1024, 4096], help="sequence lengths (synthetic inputs)")
    p.add_argument("--layers", type=positive_int, default=2, help="synthetic inputs per length (fed as consecutive layers)")
    p.add_argument("--heads", type=positive_int, default=8)
    p.add_argument("--kv-heads", type=positive_int, default=2)
    p.add_argument("--head-dim", type=positive_int, default=64)
    p.add_argument("--seed", type=any_int, default=0)
    p.add_argument("--no-causal", action="store_true", help="non-causal attention")
    p.add_argument("--no-output", action="store_true", help="skip the output-vs-dense comparison (faster)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--device", type=device, default="cpu")
    p.add_argument("--out", default="sparseattn-compare", help="output directory")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sparseattn.eval.compare import compare_predictors, random_inputs, safetensors_inputs, write_report

    from sparseattn._validation import fail

    if args.input in ("random", "structured"):
        if args.heads % args.kv_heads:
            raise fail("compare", "--kv-heads", "must divide --heads (GQA)", f"a divisor of {args.heads}", args.kv_heads)
        inputs = random_inputs(args.lengths, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
                               head_dim=args.head_dim, kind=args.input, seed=args.seed, device=args.device)
    else:
        if not Path(args.input).expanduser().exists():
            raise fail("compare", f"--input {args.input}", "is neither a synthetic kind nor an existing path",
                       "'random', 'structured', or a .safetensors file / folder / collection from sparseattn collect",
                       "no such file or folder")
        inputs = safetensors_inputs(args.input, device=args.device)
    result = compare_predictors(args.a, args.b, inputs, causal=not args.no_causal, with_output=not args.no_output)
    paths = write_report(result, args.out, plots=not args.no_plots)
    s = result["summary"]["overall"]
    print(f"A: {result['a']}\nB: {result['b']}")
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in s.items()}, indent=1))
    print("wrote " + ", ".join(paths.values()))
    return 0
