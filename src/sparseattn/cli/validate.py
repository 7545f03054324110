"""``sparseattn validate``: run a predictor on collected Q/K/V and report accuracy, sparsity and timings."""

from __future__ import annotations

import argparse

from sparseattn.cli._args import device, int_list, positive_int


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from sparseattn.eval.defaults import DEFAULT_PREDICTOR_SPEC

    p = subparsers.add_parser(
        "validate", help="run a predictor on Q/K/V saved by 'sparseattn collect': cosine, MSE, sparsity, timings (JSON)",
        description="For every collected (sample, layer): the predictor's layout, sparse vs dense attention output "
                    "(cosine, MSE, max error), actual vs target sparsity, blocks selected/total, and wall times.")
    p.add_argument("path", help="Q/K/V from 'sparseattn collect': the collection folder, one len<N> folder or one "
                                "sample .safetensors file (what was found is printed on stderr)")
    p.add_argument("--predictor", default=DEFAULT_PREDICTOR_SPEC, help=f"predictor spec (default {DEFAULT_PREDICTOR_SPEC!r})")
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "reference"])
    p.add_argument("--device", type=device, default=None)
    p.add_argument("--repeats", type=positive_int, default=1, help="timing repeats (best of)")
    p.add_argument("--lengths", type=int_list(1, "lengths"), default=None, help="only these lengths (comma-separated)")
    p.add_argument("--layers", type=int_list(0, "layer indices"), default=None, help="only these layers (comma-separated)")
    p.add_argument("--out", default=None, help="write validate.json and validate.md here (default: print JSON only)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    import sys
    from pathlib import Path

    import torch

    from sparseattn.eval.collect import describe_collection, resolve_collection, validate_predictor, validation_markdown

    # a bad path fails here, in one line; what was found is said after the run (an error stays the only stderr line)
    found = describe_collection(resolve_collection(args.path, "validate"), args.path, "validate")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    res = validate_predictor(args.predictor, args.path, backend=args.backend, device=device, repeats=args.repeats,
                             lengths=args.lengths, layers=args.layers,
                             progress=not args.quiet)
    text = json.dumps(res, indent=2)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "validate.json").write_text(text)
        (out / "validate.md").write_text(validation_markdown(res))
        print(json.dumps({"summary": res["summary"], "target": res["target"]}, indent=2))
        print(f"report: {out / 'validate.json'}, {out / 'validate.md'}")
    else:
        print(text)
    print(found, file=sys.stderr)
    return 0
