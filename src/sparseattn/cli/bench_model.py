"""``sparseattn bench-model``: whole-model prefill, dense vs sparse rows (see :mod:`sparseattn.eval.bench_model`).

"""

from __future__ import annotations

import argparse

from sparseattn.cli._args import (add_quant_arguments, check_quant, dense_above, device, device_and_dtype, int_list,
                                  nonneg_int, optional_int_list, positive_int)

_lengths = int_list(1, "token counts")
_layers = optional_int_list(0, "layer indices")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``sparseattn bench-model`` and ``benchmarks/bench_model.py``."""
    m = p.add_mutually_exclusive_group()
    m.add_argument("--model", default=None,
                   help="'smollm2-135m' (default), a .gguf path, a model folder or an HF id")
    m.add_argument("--llama-stack", type=positive_int, default=None, metavar="LAYERS",
                   help="a Llama-3.1-8B-shaped stack of LAYERS decoder layers with random weights (use static "
                        "--patterns; its accuracy columns compare random-weight logits and mean little)")
    m.add_argument("--arch", default=None, choices=["smollm2-135m", "gemma3-270m", "llama-3.1-8b"],
                   help="a model with these shapes and random weights (no download; times, window layers and static "
                        "patterns are meaningful, accuracy columns are not); --layers trims it")
    p.add_argument("--layers", type=positive_int, default=None, help="with --arch: keep the first LAYERS decoder layers")
    p.add_argument("--lengths", type=_lengths, default=None,
                   help="comma-separated prefill lengths (default 4096,8192; 32768 with --llama-stack)")
    p.add_argument("--predictors", default=None,
                   help="';'-separated predictor specs, e.g. 'mean_sim:cdf_threshold=0.97;sketch_walk' "
                        "(default: the eval default for a real model, none for --llama-stack)")
    p.add_argument("--patterns", default=None,
                   help="';'-separated static patterns, e.g. 'sink_window:window_blocks=16' "
                        "(default for --llama-stack: 'sink_window:window_blocks=16;sink_window:window_blocks=64')")
    p.add_argument("--tuned", default=None, metavar="FILE",
                   help="a per-head tuned file from 'sparseattn tune': one row (with the all-blocks row); "
                        "not with --predictors/--patterns")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--text-dir", metavar="DIR", help="a folder of .txt/.md files (e.g. ../shared/data/essays)")
    src.add_argument("--text-file", nargs="+", metavar="PATH", help="text files (globs allowed)")
    src.add_argument("--random-ids", action="store_true", help="random token ids instead of text (no tokenizer needed)")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed rounds per row (median; default 5)")
    p.add_argument("--warmup", type=positive_int, default=1, help="untimed warm-up rounds per row (default 1)")
    p.add_argument("--score-last", type=positive_int, default=512, help="positions whose logits are compared (default 512)")
    p.add_argument("--dense-layers", type=_layers, default=[], help="comma-separated layers kept dense")
    p.add_argument("--dense-above", type=dense_above, default=None, metavar="auto|DENSITY",
                   help="sparse rows (not the all-blocks floor): a layer whose density is above this (or, 'auto', "
                        "above the crossover measured for its shape on this GPU: dense SDPA, no host sync) runs dense attention")
    p.add_argument("--backend", default="auto", choices=["auto", "masked_sdpa", "attention", "reference", "triton"])
    p.add_argument("--mode", default="eager", choices=["eager", "graphs", "compile"],
                   help="eager (default); graphs (each side's whole prefill captured in a CUDA graph and replayed; "
                        "CUDA only); compile (experimental: torch.compile on both sides, graph breaks reported)")
    p.add_argument("--device", type=device, default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default float32 on CPU, bfloat16 on CUDA or with --quant")
    add_quant_arguments(p)
    p.add_argument("--no-profile", action="store_true", help="skip the torch.profiler forward per row")
    p.add_argument("--no-plot", action="store_true", help="skip bench_model.png")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--out", default="sparseattn-bench-model", help="output folder (default ./sparseattn-bench-model)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench-model", help="whole-model prefill time: dense SDPA vs sparse predictors/patterns, with accuracy",
        description="For each length, in one process: the model's own dense attention vs one row per predictor "
                    "spec / static pattern plus an all-blocks row (noise floor): steady-state prefill time (warm-up, "
                    "alternated, median), dense/sparse ratio, logits cosine/top-1/KL vs dense and vs all-blocks, "
                    "block density, a torch.profiler breakdown. Writes bench_model.json/.md/.png under --out.")
    add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sparseattn.cli._args import check_text_source
    from sparseattn.eval import bench_model as bm
    from sparseattn.eval.defaults import DEFAULT_PREDICTOR_SPEC

    stack = args.llama_stack is not None or args.arch is not None
    preds, pats = args.predictors, args.patterns
    tuned = getattr(args, "tuned", None)
    if tuned is not None:
        from sparseattn.tuning.store import load_tuned

        if preds is not None or pats is not None:
            raise ValueError("bench-model: --tuned is mutually exclusive with --predictors/--patterns; expected "
                             f"--tuned alone, got --tuned and {'--predictors' if preds is not None else '--patterns'}")
        load_tuned(tuned)  # a bad file fails here, before the model loads
        preds = pats = ""
    if preds is None and pats is None:
        if stack:
            pats = bm.LLAMA_STACK_DEFAULT_PATTERNS
        else:
            preds = DEFAULT_PREDICTOR_SPEC
    rows = bm.parse_rows(preds, pats)  # bad specs fail here, before a model loads
    check_text_source("bench-model", args.text_file, args.text_dir)
    lengths = args.lengths or ([32768] if stack else [4096, 8192])
    dev, dtype = device_and_dtype(args, half_with_quant=True)
    gran = check_quant("bench-model", args.quant, args.quant_gran, args.backend, dev, dtype)
    if args.quant is not None and args.mode == "compile":
        raise ValueError("bench-model: --mode compile cannot run --quant (the quantized kernel has no custom op yet); "
                         "expected --mode eager or graphs, got --mode compile")
    progress = not args.quiet
    if args.llama_stack is not None:
        name = f"llama-3.1-8b-shaped stack, {args.llama_stack} layers, random weights"
        model = bm.build_llama_stack(args.llama_stack, device=dev, dtype=dtype, max_len=max(131072, max(lengths)),
                                     seed=args.seed)
        tokenizer = None
    elif args.arch is not None:
        model = bm.build_random_model(args.arch, layers=args.layers, device=dev, dtype=dtype, seed=args.seed)
        name = f"{args.arch}-shaped, {model.config.num_hidden_layers} layers, random weights"
        tokenizer = None
    else:
        name = args.model or "smollm2-135m"
        model, tokenizer = bm.load_model(name, dtype=dtype, device=dev, need_tokenizer=not args.random_ids)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and max(lengths) > limit:
        raise ValueError(f"--lengths {max(lengths)} exceeds the model's context "
                         f"(max_position_embeddings {limit})")
    dense_layers = list(args.dense_layers)
    if tuned is not None:
        from sparseattn.predictors.resolve import tuned_predictor

        pred, tcfg, label = tuned_predictor(tuned, model)  # checked against this model
        rows.append(bm.RowSpec(f"tuned {label}", "tuned", label, pred))
        dense_layers = sorted(set(dense_layers) | set(tcfg.meta.get("dense_layers", ())))
    rows = bm.with_quant(rows, args.quant, gran)  # each row followed by its quantized twin
    res = bm.bench_model(model, rows, lengths, tokenizer=tokenizer, model_name=name,
                         random_ids=args.random_ids or stack, text_files=args.text_file, text_dir=args.text_dir,
                         repeats=args.repeats, warmup=args.warmup, score_last=args.score_last,
                         dense_layers=dense_layers, backend=args.backend, mode=args.mode,
                         profile=not args.no_profile, random_weights=stack, seed=args.seed, progress=progress,
                         dense_above=args.dense_above)
    paths = bm.write_outputs(res, args.out, plot=not args.no_plot)
    print("report: " + ", ".join(str(p) for p in paths.values()))
    print(bm.table(res))
    return 0
