"""``sparseattn niah``: needle-in-a-haystack accuracy, dense vs sparse (see :mod:`sparseattn.eval.niah`)."""

from __future__ import annotations

import argparse

from sparseattn.cli._args import any_int, check_model_run, device, float_list, int_list, optional_int_list, positive_int
from sparseattn.cli.gen_check import _top_pages


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from sparseattn.eval.defaults import DEFAULT_PREDICTOR_SPEC, NIAH_DEFAULT_DEPTHS, NIAH_DEFAULT_LENGTHS

    p = subparsers.add_parser(
        "niah", help="needle in a haystack (RULER style): dense vs sparse retrieval accuracy per length x depth",
        description="Insert a key-value needle at chosen depths of a haystack (RULER filler, or real text with "
                    "--text-file/--text-dir), ask the instruct model for the value, score greedy output by substring "
                    "match; dense and sparse side by side, with a heatmap.")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--lengths", type=int_list(1, "prompt lengths"), default=",".join(str(n) for n in NIAH_DEFAULT_LENGTHS),
                   help="comma-separated prompt lengths in tokens")
    p.add_argument("--depths", type=float_list(0.0, 1.0, "depths"), default=",".join(str(d) for d in NIAH_DEFAULT_DEPTHS),
                   help="comma-separated needle depths in [0, 1]")
    p.add_argument("--trials", type=positive_int, default=1, help="different needles per cell")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--text-file", nargs="+", metavar="PATH", help="real-text haystack from these files (globs allowed)")
    src.add_argument("--text-dir", metavar="DIR", help="real-text haystack from a folder of .txt/.md files")
    sp = p.add_mutually_exclusive_group()
    sp.add_argument("--predictor", default=None, help=f"predictor spec (default {DEFAULT_PREDICTOR_SPEC!r})")
    sp.add_argument("--pattern", default=None, help="static pattern 'name:key=value,...'")
    sp.add_argument("--tuned", default=None, metavar="FILE", help="a per-head tuned file from 'sparseattn tune'")
    p.add_argument("--dense-layers", type=optional_int_list(0, "layer indices"), default="", help="comma-separated layers kept dense")
    p.add_argument("--dense-tail", type=any_int, default=0, metavar="N",
                   help="the sparse prefill keeps the last N prompt tokens on every causal block (default 0; docs/RULER.md)")
    p.add_argument("--gen-tokens", type=positive_int, default=12)
    p.add_argument("--decode-modes", default="", help="comma-separated decode paths also run on every prompt after a dense "
                   "prefill: sparse_decode, sparse_spec (sparse drafts, 4 per round, checked by an exact step), kernel_decode, "
                   "mixed_int8, mixed_fp8 (see 'sparseattn gen-check')")
    p.add_argument("--top-pages", type=_top_pages, default=0.1, help="sparse_decode: pages kept per KV head, a fraction "
                   "(< 1) or a count (default 0.1)")
    p.add_argument("--page-size", type=positive_int, default=16, help="sparse_decode: keys per page (default 16)")
    p.add_argument("--mixed-window", type=positive_int, default=128, help="mixed_*: recent tokens kept in the model dtype")
    p.add_argument("--backend", default="auto", choices=["auto", "masked_sdpa", "attention", "reference", "triton"])
    p.add_argument("--device", type=device, default=None)
    p.add_argument("--seed", type=any_int, default=0)
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--out", default="sparseattn-niah")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from sparseattn.eval.defaults import DEFAULT_PREDICTOR_SPEC
    from sparseattn.eval.niah import check_decode_modes, run_niah, write_niah_report

    check_model_run("niah", args, DEFAULT_PREDICTOR_SPEC)
    modes = check_decode_modes("niah", "--decode-modes", [m.strip() for m in args.decode_modes.split(",") if m.strip()])
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    res = run_niah(args.model, predictor=args.predictor or DEFAULT_PREDICTOR_SPEC, pattern=args.pattern,
                   dense_layers=args.dense_layers, tuned=args.tuned, lengths=args.lengths, depths=args.depths, trials=args.trials,
                   text_files=args.text_file, text_dir=args.text_dir, gen_tokens=args.gen_tokens,
                   backend=args.backend, dtype=dtype, device=device, seed=args.seed, progress=not args.quiet,
                   decode_modes=modes, top_pages=args.top_pages,
                   page_size=args.page_size, mixed_window=args.mixed_window, dense_tail=args.dense_tail)
    paths = write_niah_report(res, args.out, plots=not args.no_plots)
    print(res.table())
    print("report: " + ", ".join(str(p) for p in paths.values()))
    return 0
