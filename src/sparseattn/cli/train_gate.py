"""``sparseattn train-gate``: train the learned block gate by self-distillation (see docs/GATE.md).

Loads the model (frozen), captures post-RoPE Q/K of every attention layer on ``--samples`` windows
of ``--seq-len`` tokens, fits the gate to the exact block attention mass
(:func:`sparseattn.gate.train.train_gate`), writes ``--out`` (safetensors + JSON metadata), reads it
back with the model check, and writes ``<out>.loss.png`` (loss curve) and ``<out>.json`` (history).
Use the file as ``--predictor gate:path=<out>,topk=0.1`` (or ``cdf_threshold=0.95``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from sparseattn.cli._args import (add_model_and_texts, any_int, check_out_file, check_text_source, device, device_and_dtype,
                                  index_ranges, load_model_for, nonneg_float, optional_int_list, positive_float,
                                  positive_int)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train-gate", help="train a learned block gate (SeerAttention-style) by self-distillation; writes .safetensors",
        description="Train small per-layer projections of pooled Q/K block features so that their block scores match "
                    "the frozen model's exact block attention mass (KL), on text samples. Writes --out (safetensors "
                    "+ JSON metadata, no pickle), <out>.loss.png and <out>.json. Use it as "
                    "--predictor gate:path=<out>,topk=0.1. See docs/GATE.md.")
    add_model_and_texts(p, text_dir_help="a folder of .txt/.md files", random_ids_help="random token ids (smoke tests only)")
    p.add_argument("--samples", type=positive_int, default=None,
                   help="training samples: the first N windows of the text (default 8; not with --windows)")
    p.add_argument("--val-samples", type=any_int, default=1,
                   help="held-out samples after the training ones: their KL is reported before/after (default 1; 0 = none)")
    p.add_argument("--windows", type=index_ranges, default=None,
                   help="train on these windows of --seq-len tokens of the text instead, e.g. 0-7,12-16 (leaving "
                        "windows 8-11 for a held-out evaluation)")
    p.add_argument("--val-windows", type=index_ranges, default=None,
                   help="held-out windows, e.g. 17,18 (default: the --val-samples windows after the last training one)")
    p.add_argument("--half-offsets", action="store_true",
                   help="also train on the windows starting half a window after each training window whose successor "
                        "is a training window too (about twice the windows from the same text)")
    p.add_argument("--seq-len", type=positive_int, default=4096, help="tokens per sample (default 4096)")
    p.add_argument("--steps", type=positive_int, default=300, help="Adam steps (default 300)")
    p.add_argument("--lr", type=positive_float, default=3e-3, help="learning rate (default 3e-3)")
    p.add_argument("--batch", type=positive_int, default=4, help="samples per step (default 4)")
    p.add_argument("--d-gate", type=positive_int, default=64, help="projection size d_gate (default 64)")
    p.add_argument("--block-m", type=positive_int, default=64, help="query rows per block (default 64)")
    p.add_argument("--block-n", type=positive_int, default=64, help="key columns per block (default 64)")
    p.add_argument("--no-position-bias", action="store_true",
                   help="no learned sink / block-distance bias (a version-1 file, as before the bias existed)")
    p.add_argument("--weight-decay", type=nonneg_float, default=50.0,
                   help="L2 pull of the projections toward the initial mean_sim-like score (default 50; 0 = off)")
    p.add_argument("--val-every", type=any_int, default=25,
                   help="held-out KL every N steps, in the report and the plot (default 25; 0 = before/after only)")
    p.add_argument("--keep-best", action="store_true",
                   help="keep the weights of the step with the lowest held-out KL (early stopping; needs --val-samples)")
    p.add_argument("--layers", type=optional_int_list(0, "layer indices"), default=[],
                   help="comma-separated layers to train (default: every attention layer)")
    p.add_argument("--out", default="gate.safetensors", help="the gate file (default ./gate.safetensors)")
    p.add_argument("--device", type=device, default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="model dtype (default float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--seed", type=any_int, default=0, help="initialisation / sampling seed (and --random-ids)")
    p.add_argument("--no-plot", action="store_true", help="skip the loss-curve PNG")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=run)


def _log(msg: str, on: bool) -> None:
    if on:
        print(f"[train-gate] {msg}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    import json
    import time

    from sparseattn._validation import fail

    fn = "train-gate"
    progress = not args.quiet
    check_text_source(fn, args.text_file, args.text_dir)
    out = check_out_file(fn, args.out, "gate.safetensors", (".json", ".png"))
    dev, dtype = device_and_dtype(args)

    if args.windows is not None and args.samples is not None:
        raise fail(fn, "--samples", "cannot be combined with --windows", "one of --samples N or --windows LIST",
                   f"--samples {args.samples} --windows {','.join(map(str, args.windows))}")
    if args.val_samples < 0:
        raise fail(fn, "--val-samples", "must be >= 0", "an int >= 0", args.val_samples)
    train_idx = args.windows if args.windows is not None else list(range(args.samples or 8))
    last = max(train_idx)
    val_idx = args.val_windows if args.val_windows is not None else list(range(last + 1, last + 1 + args.val_samples))
    clash = sorted(set(val_idx) & set(train_idx))  # a half-offset window lies inside two training windows
    if clash:
        raise fail(fn, "--val-windows", "overlap the training windows", "held-out windows that are not training windows",
                   clash)
    if args.val_every < 0:
        raise fail(fn, "--val-every", "must be >= 0", "an int >= 0", args.val_every)
    if args.keep_best and (not val_idx or args.val_every == 0):
        raise fail(fn, "--keep-best", "needs held-out samples evaluated during training",
                   "--val-samples >= 1 (or --val-windows) and --val-every >= 1",
                   f"{len(val_idx)} held-out windows, --val-every {args.val_every}")

    t0 = time.perf_counter()
    model, tokenizer = load_model_for(fn, args, dev, dtype, lambda line: _log(line, progress))
    from sparseattn.eval.texts import pick_windows, sample_ids

    n = max(train_idx + val_idx) + 1
    all_ids, all_names, source = sample_ids(model, tokenizer, seq_len=args.seq_len, samples=n,
                                            text_files=args.text_file, text_dir=args.text_dir,
                                            random_ids=args.random_ids, seed=args.seed)
    has_bos = not args.random_ids and tokenizer is not None and getattr(tokenizer, "bos_token_id", None) is not None
    ids, names, labels = pick_windows(all_ids, all_names, train_idx, half_offsets=args.half_offsets, bos=has_bos)
    val_ids = [all_ids[i] for i in val_idx]
    _log(f"{len(ids)} training + {len(val_ids)} held-out samples x {args.seq_len} tokens from {source}"
         + (f" (windows {' '.join(labels)}; held out {' '.join(f'w{i:02d}' for i in val_idx)})"
            if args.windows is not None or args.val_windows is not None or args.half_offsets else ""), progress)

    from sparseattn.eval.env import environment
    from sparseattn.gate.store import load_gate, save_gate
    from sparseattn.gate.train import plot_loss, train_gate

    weights, hist = train_gate(model, ids, layers=args.layers or None, d_gate=args.d_gate, block_m=args.block_m,
                               block_n=args.block_n, steps=args.steps, lr=args.lr, batch=args.batch, seed=args.seed,
                               progress=progress, val_ids_list=val_ids or None,
                               position_bias=not args.no_position_bias, weight_decay=args.weight_decay,
                               val_every=args.val_every if val_ids else 0, keep_best=args.keep_best)
    import os

    # absolute paths: held-out evaluation (predictor_curves --exclude-gate-texts) matches files by path
    texts = sorted({os.path.abspath(n) if os.path.isfile(n) else n for group in names for n in group})
    weights.meta["model"] = args.model
    weights.meta["training"].update(texts=texts, text_source=source, dtype=str(dtype).replace("torch.", ""),
                                    total_seconds=time.perf_counter() - t0, windows=labels,
                                    val_windows=[f"w{i:02d}" for i in val_idx])
    path = save_gate(out, weights)
    load_gate(path, model=model)  # what every later user reads: checked now
    stem = out.with_suffix("") if out.suffix else out
    png, js = Path(f"{stem}.loss.png"), Path(f"{stem}.json")
    plot_note = None
    if args.no_plot:
        plot_note = "skipped (--no-plot)"
    else:
        try:
            plot_loss(hist, png, title=f"{args.model}: gate KL, {len(ids)} x {args.seq_len} tokens, d_gate {args.d_gate}")
        except ImportError as exc:
            plot_note = f"skipped: {exc}"
    report: dict[str, Any] = {"tool": "sparseattn train-gate", "gate_file": str(path), "model": args.model,
                              "device": dev, "text_source": source, "texts": texts, "history": hist,
                              "plot": None if plot_note else str(png), "plot_note": plot_note,
                              "seconds": time.perf_counter() - t0, "environment": environment(dev)}
    js.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"layers {len(weights.layers)}, d_gate {weights.d_gate}, blocks {weights.block_m}x{weights.block_n}; "
          f"KL {hist['initial_loss']:.4f} (initial, mean_sim-like) -> {hist['final_loss']:.4f} after {args.steps} steps; "
          f"capture {hist['capture_seconds']:.1f} s, training {hist['seconds']:.1f} s")
    if "val_final_loss" in hist:
        best = f" (weights of step {hist['best_step']}, --keep-best)" if hist.get("best_step") is not None else ""
        print(f"held-out KL ({len(val_ids)} samples): {hist['val_initial_loss']:.4f} -> {hist['val_final_loss']:.4f}{best}")
    print("gate: " + str(path))
    print("report: " + str(js) + ("" if plot_note else f", {png}"))
    print(f"use: --predictor gate:path={path},topk=0.1")
    return 0
