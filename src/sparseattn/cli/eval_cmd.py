"""``sparseattn eval``: dense vs sparse end to end on a real model (see :mod:`sparseattn.eval.end_to_end`)."""

from __future__ import annotations

import argparse

from sparseattn.cli._args import (add_model_and_texts, add_quant_arguments, check_model_run, check_quant, device,
                                  device_and_dtype, nonneg_int, optional_int_list, positive_int)

_int_list = optional_int_list(0, "layer indices")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from sparseattn.eval.defaults import DEFAULT_GEN_TOKENS, DEFAULT_PREDICTOR_SPEC, DEFAULT_SAMPLES, DEFAULT_SEQ_LEN

    p = subparsers.add_parser(
        "eval", help="end-to-end accuracy: dense vs sparse logits and greedy generation on a real model",
        description="Run the same texts through the model dense and with block-sparse prefill attention; report "
                    "logits cosine, relative L1, top-1/top-5 agreement, KL, greedy-generation agreement, per-layer "
                    "sparsity, a dense-vs-dense self-check and a verdict. Text: the Python standard library's "
                    "source by default, --text-file FILES or --text-dir FOLDER (e.g. ../shared/data/essays).")
    add_model_and_texts(p)
    p.add_argument("--seq-len", type=positive_int, default=DEFAULT_SEQ_LEN, help=f"tokens per sample (default {DEFAULT_SEQ_LEN})")
    p.add_argument("--samples", type=positive_int, default=DEFAULT_SAMPLES, help=f"samples (default {DEFAULT_SAMPLES})")
    p.add_argument("--gen-tokens", type=nonneg_int, default=DEFAULT_GEN_TOKENS, help=f"greedy tokens per sample (default {DEFAULT_GEN_TOKENS})")
    p.add_argument("--score-last", type=positive_int, default=None, help="compare logits of the last K positions (default seq-len/2)")
    sp = p.add_mutually_exclusive_group()
    sp.add_argument("--predictor", default=None, help=f"predictor spec 'name:key=value,...' (default {DEFAULT_PREDICTOR_SPEC!r})")
    sp.add_argument("--pattern", default=None, help="static pattern 'name:key=value,...', e.g. 'sink_window:window_blocks=8'")
    sp.add_argument("--tuned", default=None, metavar="FILE", help="a per-head tuned file from 'sparseattn tune'")
    p.add_argument("--dense-layers", type=_int_list, default=[], help="comma-separated layers kept dense, e.g. 0,1")
    p.add_argument("--compare-random", action="store_true", help="also run the predictor on random Q/K of the same shapes")
    p.add_argument("--no-self-check", action="store_true", help="skip the dense-vs-dense repeat run")
    p.add_argument("--backend", default="auto", choices=["auto", "masked_sdpa", "attention", "reference", "triton"])
    p.add_argument("--device", type=device, default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default float32 on CPU, bfloat16 on CUDA or with --quant")
    add_quant_arguments(p)
    p.add_argument("--plot-layer", type=nonneg_int, default=None, help="layer of the attention-map plot (default: middle)")
    p.add_argument("--plot-head", type=nonneg_int, default=0)
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--out", default="sparseattn-eval", help="report folder (default ./sparseattn-eval)")
    p.add_argument("--timing-repeats", type=nonneg_int, default=5,
                   help="timed rounds of the steady-state prefill timing (warm-up first, median; 0 skips it; default 5)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sparseattn.eval.defaults import DEFAULT_PREDICTOR_SPEC
    from sparseattn.eval.end_to_end import evaluate, write_report

    check_model_run("eval", args, DEFAULT_PREDICTOR_SPEC)
    device, dtype = device_and_dtype(args, half_with_quant=True)
    gran = check_quant("eval", args.quant, args.quant_gran, args.backend, device, dtype)
    res = evaluate(args.model, predictor=args.predictor or DEFAULT_PREDICTOR_SPEC, pattern=args.pattern,
                   dense_layers=args.dense_layers, tuned=args.tuned, seq_len=args.seq_len, samples=args.samples, gen_tokens=args.gen_tokens,
                   score_last=args.score_last, text_files=args.text_file, text_dir=args.text_dir,
                   compare_random=args.compare_random, self_check=not args.no_self_check, backend=args.backend,
                   dtype=dtype, device=device, plot_layer=args.plot_layer, plot_head=args.plot_head,
                   progress=not args.quiet, timing_repeats=args.timing_repeats, quant=args.quant,
                   quant_granularity=gran)
    paths = write_report(res, args.out, plots=not args.no_plots)
    print(res.table())
    print("report: " + ", ".join(str(p) for p in paths.values()))
    return 0 if res.verdict["passed"] else 1
