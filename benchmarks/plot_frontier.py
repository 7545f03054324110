"""Plot top-1 agreement against block sparsity from ``tune_frontier.py`` JSONL files (one curve per predictor family).

A family is a row's spec with its ``cdf_threshold`` / ``topk`` removed, so the thresholds of one predictor form a
curve. ``--point LABEL=SPARSITY,TOP1`` adds a measured point from elsewhere (say where in the caption). Usage::

    python benchmarks/plot_frontier.py --inputs a.jsonl b.jsonl --out frontier.png --title "SmolLM2 4K, held-out"
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict


def family(spec: str) -> str:
    name, _, rest = spec.partition(":")
    keep = [kv for kv in rest.split(",") if kv and not re.match(r"(cdf_threshold|topk)=", kv)]
    return name + (":" + ",".join(keep) if keep else "")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inputs", nargs="+", required=True)
    ap.add_argument("--point", action="append", default=[], help="LABEL=SPARSITY,TOP1 (fractions)")
    ap.add_argument("--target", type=float, default=None, help="draw a horizontal line at this top-1")
    ap.add_argument("--title", default="")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    curves: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for path in args.inputs:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    r = json.loads(line)
                    if "sparsity" in r and "top1_agreement" in r:
                        curves[family(r["spec"])].append((r["sparsity"], r["top1_agreement"]))
    points = []
    for p in args.point:
        label, _, vals = p.partition("=")
        try:
            sp, t1 = (float(x) for x in vals.split(","))
        except ValueError:
            print(f"plot_frontier: --point {p!r} is malformed; expected LABEL=SPARSITY,TOP1, got {p!r}", file=sys.stderr)
            return 2
        points.append((label, sp, t1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for fam, pts in sorted(curves.items()):
        pts.sort()
        ax.plot([100 * s for s, _ in pts], [100 * t for _, t in pts], marker="o", label=fam)
    for label, sp, t1 in points:
        ax.scatter([100 * sp], [100 * t1], marker="*", s=120, zorder=5, label=label)
    if args.target is not None:
        ax.axhline(100 * args.target, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("block sparsity (%)")
    ax.set_ylabel("top-1 agreement with dense (%)")
    ax.set_title(args.title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
