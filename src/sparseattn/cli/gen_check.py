"""``sparseattn gen-check``: greedy generation with sparse / kernel decode and the mixed KV cache vs dense
(see :mod:`sparseattn.eval.gen_check`)."""

from __future__ import annotations

import argparse

from sparseattn.cli._args import (add_model_and_texts, any_int, check_spec, check_text_source, check_tuned_file, device,
                                  device_and_dtype, int_list, nonneg_int, optional_int_list, positive_int)


def _top_pages(text: str) -> int | float:
    """An int >= 1 (pages) or a fraction in (0, 1]."""
    t = str(text).strip()
    try:
        val: int | float = int(t)
    except ValueError:
        try:
            val = float(t)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number; expected an int >= 1 or a fraction in (0, 1], "
                                             f"got {text!r}") from None
    if (isinstance(val, int) and val < 1) or (isinstance(val, float) and not 0.0 < val <= 1.0):
        raise argparse.ArgumentTypeError(f"is out of range; expected an int >= 1 or a fraction in (0, 1], got {text!r}")
    return val


def _modes(text: str) -> list[str]:
    from sparseattn.eval.gen_check import GEN_CHECK_MODES

    parts = [x.strip() for x in str(text).split(",") if x.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"must not be empty; expected some of {','.join(GEN_CHECK_MODES)}, got {text!r}")
    for x in parts:
        if x not in GEN_CHECK_MODES:
            raise argparse.ArgumentTypeError(f"has an unknown mode {x!r}; expected some of {','.join(GEN_CHECK_MODES)}, "
                                             f"got {text!r}")
    return parts


def _share(text: str) -> float:
    try:
        val = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number; expected a share in [0, 1], got {text!r}") from None
    if not 0.0 <= val <= 1.0:
        raise argparse.ArgumentTypeError(f"is out of range; expected a share in [0, 1], got {text!r}")
    return val


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from sparseattn.eval.defaults import GEN_CHECK_DEFAULT_LENGTHS, GEN_CHECK_DEFAULT_MODES, GEN_CHECK_TARGET

    p = subparsers.add_parser(
        "gen-check", help="greedy generation: sparse/kernel decode and the mixed-precision KV cache vs dense",
        description="Generate --new-tokens greedy tokens from prompts of --lengths tokens with the model's own dense "
                    "attention, then with each of --modes (kernel_decode, sparse_decode: patch_model(decode=...); "
                    "sparse_spec: sparse decode drafting --draft-tokens tokens per round for one exact check step, "
                    "lossless speculative decoding; "
                    "sparse_prefill: --predictor with dense decode; mixed_int8 / mixed_fp8: MixedKVCache); report per "
                    "mode and length the share of positions whose token equals dense's, the first divergence, the "
                    "teacher-forced agreement (each step fed dense's tokens), the "
                    "KV bytes the mixed cache saves and ms per token; PASS when the mean agreement is >= --target. "
                    "Writes gen_check.json and gen_check.md into --out. See docs/DECODE.md.")
    add_model_and_texts(p, random_ids_help="random token ids (no tokenizer needed; smoke tests)")
    p.add_argument("--lengths", type=int_list(2, "prompt lengths"), default=",".join(str(n) for n in GEN_CHECK_DEFAULT_LENGTHS),
                   help="comma-separated prompt lengths in tokens (default %(default)s; prompt + new tokens must fit "
                        "the model's context)")
    p.add_argument("--new-tokens", type=positive_int, default=64, help="greedy tokens per prompt (default 64)")
    p.add_argument("--modes", type=_modes, default=",".join(GEN_CHECK_DEFAULT_MODES),
                   help="comma-separated modes (default %(default)s; also sparse_prefill with a predictor)")
    bud = p.add_mutually_exclusive_group()
    bud.add_argument("--top-pages", type=_top_pages, default=None,
                     help="sparse_decode: pages kept per sequence and KV head, an int or a fraction (default 0.1)")
    bud.add_argument("--token-budget", type=positive_int, default=None,
                     help="sparse_decode: keys kept per sequence and KV head (Quest's fixed budget, e.g. 1024): "
                          "ceil(budget / page size) pages")
    p.add_argument("--page-size", type=positive_int, default=16, help="sparse_decode: keys per page (default 16)")
    p.add_argument("--mixed-window", type=positive_int, default=128,
                   help="mixed_*: recent tokens kept in the model dtype (default 128)")
    p.add_argument("--smooth-keys", action="store_true",
                   help="mixed_*: K smoothing (quantize k - its channel mean, lse corrected exactly; off by default: "
                        "it hurt SmolLM2, see docs/STATE.md)")
    p.add_argument("--mixed-sink-tokens", type=nonneg_int, default=None, metavar="N",
                   help="mixed_*: the first N tokens (the attention sink) kept in the model dtype, never quantized "
                        "(default: MixedKVCache's default)")
    sp = p.add_mutually_exclusive_group()
    sp.add_argument("--predictor", default=None,
                    help="sparse prefill for kernel_decode / sparse_decode / sparse_prefill (default: dense prefill)")
    sp.add_argument("--pattern", default=None, help="static pattern 'name:key=value,...' as the sparse prefill")
    sp.add_argument("--tuned", default=None, metavar="FILE", help="a per-head tuned file as the sparse prefill")
    p.add_argument("--decode-backend", default="auto", choices=["auto", "triton", "reference"],
                   help="decode kernels: auto (Triton on CUDA, else the PyTorch reference), triton or reference")
    p.add_argument("--decode-layers", type=optional_int_list(0, "layer indices"), default=None,
                   help="layers that take the decode route (default: all)")
    p.add_argument("--draft-tokens", type=positive_int, default=4,
                   help="sparse_spec: sparse draft steps per round, 1..63 (default 4)")
    p.add_argument("--samples", type=positive_int, default=1, help="prompts per length (default 1)")
    p.add_argument("--target", type=_share, default=GEN_CHECK_TARGET,
                   help=f"PASS threshold on the mean agreement (default {GEN_CHECK_TARGET})")
    p.add_argument("--device", type=device, default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="model dtype (default float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--seed", type=any_int, default=0, help="seed of --random-ids")
    p.add_argument("--no-teacher-forced", action="store_true",
                   help="skip the teacher-forced agreement (a second generation per mode that diverged)")
    p.add_argument("--out", default="sparseattn-gen-check", help="report folder (default ./sparseattn-gen-check)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sparseattn._validation import fail
    from sparseattn.eval.gen_check import run_gen_check, write_gen_check_report

    fn = "gen-check"
    if args.predictor is not None or args.pattern is not None:
        check_spec(args.predictor, args.pattern, args.predictor or "")
    check_tuned_file(args.tuned)
    if "sparse_prefill" in args.modes and args.predictor is None and args.pattern is None and args.tuned is None:
        raise fail(fn, "--modes", "has sparse_prefill without a sparse prefill", "--predictor, --pattern or --tuned",
                   "none given")
    check_text_source(fn, args.text_file, args.text_dir)
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise fail(fn, f"--out {out}", "is a file", "a folder for gen_check.json / gen_check.md", "a file")
    dev, dtype = device_and_dtype(args)
    res = run_gen_check(args.model, lengths=args.lengths, new_tokens=args.new_tokens, modes=args.modes,
                        top_pages=args.top_pages, token_budget=args.token_budget, page_size=args.page_size,
                        mixed_window=args.mixed_window, mixed_smooth_keys=args.smooth_keys,
                        mixed_sink_tokens=args.mixed_sink_tokens,
                        teacher_forced=not args.no_teacher_forced,
                        predictor=args.predictor, pattern=args.pattern, tuned=args.tuned,
                        decode_backend=args.decode_backend, decode_layers=args.decode_layers,
                        draft_tokens=args.draft_tokens, text_files=args.text_file, text_dir=args.text_dir,
                        random_ids=args.random_ids,
                        samples=args.samples, seed=args.seed, target=args.target, dtype=dtype, device=dev,
                        progress=not args.quiet)
    paths = write_gen_check_report(res, out)
    print(res.table())
    print(f"verdict: {'PASS' if res.passed else 'FAIL'} (target {res.config['target']:.0%} agreement)")
    print("report: " + ", ".join(str(p) for p in paths.values()))
    return 0 if res.passed else 1
