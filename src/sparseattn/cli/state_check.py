"""``sparseattn state-check``: standard vs segmented (state carried) vs PyTorch SDPA, three ways.

Fixed-seed inputs with GQA, an additive float mask and causal masking; the keys are cut into 2–4
segments at multiples of 128 keys. Per dtype (float32, float16, bfloat16) and segment count it prints
max/mean differences, a PASS/FAIL per pair (standard vs SDPA and segmented vs SDPA: ratio rule;
segmented vs standard: bitwise), the carried state's M (running max) and S (running sum) ranges after
each segment and an element-wise table of the first elements. Exit status 1 if any check fails.

fp16/bf16 run the Triton kernel on CUDA, or on the CPU under Triton's interpreter (set here when
Triton has not been imported yet); float32 (which the kernel does not take) runs the PyTorch loop.
See docs/STATE.md.
"""

from __future__ import annotations

import argparse
from typing import Any

from sparseattn.cli._args import any_int, device, positive_int

DTYPES = ("float32", "float16", "bfloat16")


def _segments(text: str) -> int:
    val = positive_int(text)
    if not 2 <= val <= 4:
        raise argparse.ArgumentTypeError(f"must be 2, 3 or 4; expected 2..4 segments, got {text!r}")
    return val


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("state-check", help="three-way check: one call vs segments with carried state vs SDPA",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", type=device, default=None, help="cpu or cuda[:i] (default: cuda if available, else cpu)")
    p.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    p.add_argument("--segments", nargs="+", type=_segments, default=[2, 3, 4], help="segment counts (2..4)")
    p.add_argument("--batch", type=positive_int, default=1)
    p.add_argument("--heads", type=positive_int, default=4)
    p.add_argument("--kv-heads", type=positive_int, default=2)
    p.add_argument("--seq-q", type=positive_int, default=128)
    p.add_argument("--seq-kv", type=positive_int, default=512)
    p.add_argument("--head-dim", type=positive_int, default=64, help="64, 128 or 256 for the kernel (default 64)")
    p.add_argument("--seed", type=any_int, default=0)
    p.add_argument("--non-causal", action="store_true", help="no causal mask (the float mask only)")
    p.add_argument("--table-rows", type=int, default=128, help="elements in the element-wise table (default 128)")
    p.add_argument("--no-table", action="store_true", help="leave the element-wise table out of the printed output")
    p.add_argument("--json", default=None, help="write the full report as JSON here")
    p.add_argument("--markdown", default=None, help="write a markdown report here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    import os
    import sys

    import torch

    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev == "cpu" and "triton" not in sys.modules and "TRITON_INTERPRET" not in os.environ:
        os.environ["TRITON_INTERPRET"] = "1"  # the kernel on the CPU: Triton's interpreter (chosen before import)
    from sparseattn.eval.state_check import format_markdown, format_text, run_state_check

    report = run_state_check(dtypes=tuple(args.dtypes), device=dev, batch=args.batch, heads=args.heads,
                             kv_heads=args.kv_heads, seq_q=args.seq_q, seq_kv=args.seq_kv, head_dim=args.head_dim,
                             segments=tuple(args.segments), seed=args.seed, causal=not args.non_causal,
                             table_rows=max(0, args.table_rows))
    print(format_text(report, table=not args.no_table))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(format_markdown(report))
    return 0 if report["pass"] else 1
