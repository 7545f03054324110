"""Whole-model prefill benchmark: dense (the model's own SDPA) vs sparse predictor / pattern rows.

Run on an H200 (BENCHMARKS.md, "Whole model"). The work lives in :mod:`sparseattn.eval.bench_model` (also behind
``sparseattn bench-model``, same options); this script is the device-call entry point. Per length,
in one process: steady-state prefill time per row (warm-up, dense/sparse alternated,
CUDA-synchronised, median of ``--repeats``), the dense/sparse ratio from the same rounds, logits
cosine / top-1 / KL of the last ``--score-last`` positions vs dense and vs the all-blocks row
(static ``dense`` pattern through our kernel: the bf16 noise floor), mean block density, and a
``torch.profiler`` breakdown of one extra forward. Writes ``bench_model.json``, ``bench_model.md``
and ``bench_model.png`` under ``--out`` (default ``$OUT`` when set) and prints a table last.

Usage::

    PYTHONPATH=src python3 benchmarks/bench_model.py --model smollm2-135m --lengths 4096,8192 \\
        --text-dir ../shared/data/essays --predictors "mean_sim:score=mixed,cdf_threshold=0.97,keep_local=8;sketch_walk" \\
        --patterns "sink_window:window_blocks=16"
    PYTHONPATH=src python3 benchmarks/bench_model.py --llama-stack 4 --lengths 32768,65536,131072
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

from sparseattn.cli.bench_model import add_arguments, run  # noqa: E402
from sparseattn.cli.main import USER_ERRORS, one_line  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_model.py", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    if os.environ.get("OUT"):
        p.set_defaults(out=os.environ["OUT"])
    args = p.parse_args(argv)
    try:
        return run(args)
    except USER_ERRORS as exc:
        print(f"bench_model.py: error: {one_line(str(exc))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
