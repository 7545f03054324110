"""``sparseattn ruler``: RULER tasks generated offline, dense vs each sparse configuration (see :mod:`sparseattn.eval.ruler`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from sparseattn.cli._args import (any_int, check_text_source, check_tuned_file, device, device_and_dtype, int_list, optional_int_list,
                                  positive_int)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from sparseattn.eval.defaults import DEFAULT_PREDICTOR_SPEC
    from sparseattn.eval.ruler import RULER_DEFAULT_LENGTHS, TASKS

    p = subparsers.add_parser(
        "ruler", help="RULER tasks (NIAH x4, variable tracking, common/frequent words) generated offline: dense vs sparse",
        description="Generate RULER's synthetic tasks from a seed and any text folder at exact token budgets for the "
                    "model's tokenizer (niah_single, niah_multikey, niah_multivalue, niah_multiquery, vt, cwe, fwe), "
                    "run each prompt through the dense model and the model patched with each sparse configuration, "
                    "and score the greedy continuation like RULER (share of expected strings found). Writes "
                    "ruler.json, ruler.md and ruler_heatmap.png under --out. See docs/RULER.md.")
    p.add_argument("--model", default="smollm2-135m", help="'smollm2-135m' (default), a .gguf path, a model folder or an HF id")
    p.add_argument("--tasks", default="all", help=f"'all' (default) or a comma-separated subset of {','.join(TASKS)}")
    p.add_argument("--lengths", type=int_list(1, "prompt lengths"), default=",".join(str(n) for n in RULER_DEFAULT_LENGTHS),
                   help="comma-separated prompt lengths in tokens (default %(default)s)")
    p.add_argument("--samples", type=positive_int, default=2, help="prompts per task and length (default 2)")
    p.add_argument("--predictors", default=None,
                   help=f"';'-separated predictor specs, one sparse configuration each (default {DEFAULT_PREDICTOR_SPEC!r} "
                        "unless --patterns or --tuned is given)")
    p.add_argument("--patterns", default=None, help="';'-separated static patterns, e.g. 'sink_window:window_blocks=16'")
    p.add_argument("--tuned", default=None, metavar="FILE", help="a per-head tuned file from 'sparseattn tune' (one more configuration)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--text-dir", metavar="DIR", help="haystack and word source: a folder of .txt/.md files (e.g. ../shared/data/essays)")
    src.add_argument("--text-file", nargs="+", metavar="PATH", help="haystack from these files (globs allowed)")
    p.add_argument("--dense-layers", type=optional_int_list(0, "layer indices"), default=[], help="comma-separated layers kept dense")
    p.add_argument("--dense-tails", type=int_list(0, "query tokens"), default=[0],
                   help="comma-separated dense query tails: each sparse configuration runs once per value with the "
                        "last N prompt tokens on every causal block (e.g. 0,128; default 0 = as given; docs/RULER.md)")
    p.add_argument("--gen-tokens", type=positive_int, default=None,
                   help="greedy tokens for every task (default per task: niah 32-64, vt 30, cwe 120, fwe 50)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="prompts generated together (same task, length and token count only; no padding). "
                        "Default 8 on CUDA (eager decode is host-bound), 1 on the CPU")
    p.add_argument("--floor", action=argparse.BooleanOptionalAction, default=None,
                   help="also run every causal block through sparseattn's kernel (the noise floor; scores are compared "
                        "with it as well as with dense). Default: on in bfloat16/float16, off in float32")
    p.add_argument("--backend", default="auto", choices=["auto", "masked_sdpa", "attention", "reference", "triton"])
    p.add_argument("--device", type=device, default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="default float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--seed", type=any_int, default=0)
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--out", default="sparseattn-ruler", help="report folder (default ./sparseattn-ruler)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sparseattn.eval.defaults import DEFAULT_PREDICTOR_SPEC
    from sparseattn.eval.ruler import parse_configs, parse_tasks, run_ruler, write_ruler_report

    tasks = parse_tasks(args.tasks, "ruler")  # everything that can be checked fails here, before the model loads
    predictors = args.predictors
    if predictors is None and args.patterns is None and args.tuned is None:
        predictors = DEFAULT_PREDICTOR_SPEC
    parse_configs(predictors, args.patterns)
    check_tuned_file(args.tuned)
    check_text_source("ruler", args.text_file, args.text_dir)
    dev, dtype = device_and_dtype(args)
    res = run_ruler(args.model, predictors=predictors, patterns=args.patterns, tuned=args.tuned,
                    dense_layers=args.dense_layers, tasks=tasks, lengths=args.lengths, samples=args.samples,
                    text_files=args.text_file, text_dir=args.text_dir, gen_tokens=args.gen_tokens, backend=args.backend,
                    dtype=dtype, device=dev, seed=args.seed, progress=not args.quiet,
                    runs_path=Path(args.out) / "ruler_runs.jsonl", batch_size=args.batch_size,
                    floor=args.floor, dense_tails=args.dense_tails)
    paths = write_ruler_report(res, args.out, plots=not args.no_plots)
    print(res.table())
    print("report: " + ", ".join(str(p) for p in paths.values()))
    return 0
