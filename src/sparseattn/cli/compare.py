"""``sparseattn compare``: two predictors (or one vs the oracle) on the same Q/K/V.

Examples::

    sparseattn compare --a mean_sim --b oracle --lengths 1024 4096 --out runs/cmp
    sparseattn compare --a sketch_walk --b sketch_walk:walk=false --input structured --layers 4
    sparseattn compare --a mean_sim:cdf_threshold=0.95 --b sketch_walk --input captured/qkv.safetensors
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from sparseattn.cli._args import any_int, device, positive_float, positive_int


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "compare", help="compare two block predictors (or one vs the oracle): sparsity, overlap, Jaccard, mass recall",
        description="Compare two block predictors on the same Q/K/V: sparsity of each, block overlap, Jaccard, "
                    "attention-mass recall (share of the exact attention mass inside the selected blocks), "
                    "correlation of block scores, output cosine vs dense; per layer and per length. Writes "
                    "compare.json, compare.md and side-by-side mask PNGs.")
    p.add_argument("--a", default=None, help="predictor spec, e.g. 'mean_sim:cdf_threshold=0.9' (required unless --sweep)")
    p.add_argument("--b", default="oracle", help="predictor spec, or 'oracle' for the exact-mass upper bound at A's block budget (default)")
    p.add_argument("--input", default="structured",
                   help="'random', 'structured' (seeded synthetic), or Q/K/V from 'sparseattn collect': the collection "
                        "folder, one len<N> folder or one .safetensors file (what was found is printed on stderr)")
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
    p.add_argument("--sweep", type=positive_float, nargs="+", default=None, metavar="BUDGET",
                   help="sweep mode: every --family at these budgets (kept fraction of blocks per row), each against the "
                        "oracle at its own budget; writes sweep.json/.md/.png (accuracy vs sparsity, oracle frontier)")
    p.add_argument("--family", action="append", default=None, metavar="NAME=SPEC",
                   help="--sweep: a curve, NAME=spec template with {budget}, e.g. "
                        "'gate=gate:path=gate.safetensors,topk={budget}' (repeatable; default: mean_sim and sketch_walk "
                        "templates of sparseattn.eval.compare.SWEEP_TEMPLATES)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sparseattn.eval.compare import compare_predictors, random_inputs, safetensors_inputs, write_report

    from sparseattn._validation import fail

    found = None
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
        from sparseattn.eval.collect import describe_collection, resolve_collection

        # a bad path fails here, in one line; what was found is said once every file has been read
        found = describe_collection(resolve_collection(args.input, "compare"), args.input, "compare")
        inputs = safetensors_inputs(args.input, device=args.device)
    if args.sweep is not None:  # every family at matched budgets (see _run_sweep)
        return _run_sweep(args, inputs)
    if args.a is None:
        raise fail("compare", "--a", "is required (unless --sweep)", "a predictor spec such as 'mean_sim'", None)
    result = compare_predictors(args.a, args.b, inputs, causal=not args.no_causal, with_output=not args.no_output)
    paths = write_report(result, args.out, plots=not args.no_plots, device=args.device)
    s = result["summary"]["overall"]
    print(f"A: {result['a']}\nB: {result['b']}")
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in s.items()}, indent=1))
    print("wrote " + ", ".join(paths.values()))
    if found:  # on stderr, after the run: an error before this point stays the only line there
        print(found, file=sys.stderr)
    return 0


def _run_sweep(args: argparse.Namespace, inputs: Any) -> int:
    """``--sweep``: :func:`sparseattn.eval.compare.sweep_predictors` over the --family templates."""
    from sparseattn._validation import fail
    from sparseattn.eval.compare import SWEEP_TEMPLATES, budget_specs, sweep_predictors, write_sweep_report

    templates: dict[str, str] = {}
    for item in args.family or []:
        name, eq, tpl = item.partition("=")
        if not eq or not name.strip() or not tpl.strip():
            raise fail("compare", "--family", "must be NAME=SPEC", "e.g. 'gate=gate:path=g.safetensors,topk={budget}'",
                       repr(item))
        if name.strip() in templates:
            raise fail("compare", "--family", f"names {name.strip()!r} twice", "each NAME once", repr(item))
        templates[name.strip()] = tpl.strip()
    if not templates:
        templates = dict(SWEEP_TEMPLATES)
    for b in args.sweep:
        if not 0 < b <= 1:
            raise fail("compare", "--sweep", "has a budget out of range", "fractions in (0, 1]", b)
    result = sweep_predictors(budget_specs(templates, args.sweep), inputs, causal=not args.no_causal,
                              with_output=not args.no_output, progress=True)
    paths = write_sweep_report(result, args.out, plots=not args.no_plots, device=args.device)
    for fam, row in result["matched"].items():
        print(f"sparsity {fam}: " + "; ".join(f"{f} recall={m.get('recall')!s:.6} cos={m.get('out_cosine')!s:.6}"
                                             for f, m in row.items()))
    print("wrote " + ", ".join(paths.values()))
    return 0
