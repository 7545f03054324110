"""``sparseattn collect``: save post-RoPE Q/K/V of chosen layers for real texts (see :mod:`sparseattn.eval.collect`)."""

from __future__ import annotations

import argparse

from sparseattn.cli._args import check_text_source, device, int_list, positive_int


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "collect", help="capture post-RoPE Q/K/V of chosen layers on real text (safetensors + JSON metadata)",
        description="Run the dense model on text samples and save Q, K, V of the chosen layers per sample and length: "
                    "<out>/len<N>/sample<i>.safetensors (tensors layer<L>.q/k/v), sample<i>.json metadata, summary.json.")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--layers", type=int_list(0, "layer indices"), default=None, help="comma-separated layer indices (default: first, middle, last)")
    p.add_argument("--lengths", type=int_list(1, "lengths"), default="512", help="comma-separated sequence lengths (default 512)")
    p.add_argument("--samples", type=positive_int, default=1, help="samples per length (default 1)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--text-file", nargs="+", metavar="PATH", help="text files (globs allowed)")
    src.add_argument("--text-dir", metavar="DIR", help="a folder of .txt/.md files (e.g. ../shared/data/essays)")
    p.add_argument("--save-dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--device", type=device, default=None)
    p.add_argument("--out", default="sparseattn-qkv", help="collection folder (default ./sparseattn-qkv)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    import torch

    from sparseattn.eval.collect import collect_qkv

    check_text_source("collect", args.text_file, args.text_dir)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    summary = collect_qkv(args.out, model_name=args.model,
                          layers=args.layers, lengths=args.lengths, samples=args.samples,
                          text_files=args.text_file, text_dir=args.text_dir, save_dtype=getattr(torch, args.save_dtype),
                          device=device, progress=not args.quiet)
    print(json.dumps(summary, indent=2))
    print(f"collection: {args.out}/collection.json")
    return 0
