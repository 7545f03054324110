"""Where the host time of an eager patched forward goes (SmolLM2 shapes, random weights, one GPU).

For dense and each row (``--rows``, ';'-separated predictor specs or ``pattern:`` specs): eager
whole-model prefill time (median of ``--repeats`` after warm-up, CUDA-synchronised), the host time
of one forward with the GPU kept busy ahead (``torch.cuda.synchronize`` only at the end), and a
``cProfile`` of one forward (top functions by own time) written to ``--out/<row>.prof.txt``.
Prints a table last. Diagnostic only: the measurements of record come from ``bench_model.py``.

Usage: ``PYTHONPATH=src python3 benchmarks/profile_host.py [--arch smollm2-135m] [--len 8192] [--out DIR]``
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import time

import torch

from sparseattn.eval.bench_model import build_random_model
from sparseattn.eval.env import environment
from sparseattn.integrations.transformers_patch import patch_model

ROWS = "dense;pattern:sink_window:window_blocks=8,block_m=128,block_n=128;mean_sim:score=mixed,cdf_threshold=0.97,keep_local=8"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="smollm2-135m")
    ap.add_argument("--len", type=int, default=8192)
    ap.add_argument("--rows", default=ROWS)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    model = build_random_model(args.arch, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, model.config.vocab_size, (1, args.len), device="cuda")
    results = []
    for spec in args.rows.split(";"):
        handle = None
        if spec != "dense":
            if spec.startswith("pattern:"):
                handle = patch_model(model, pattern=spec[len("pattern:"):])
            else:
                handle = patch_model(model, predictor=spec)

        def fwd() -> None:
            with torch.no_grad():
                model(input_ids=ids, use_cache=False, logits_to_keep=1)

        for _ in range(3):
            fwd()
        torch.cuda.synchronize()
        times, hosts = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fwd()
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            t2 = time.perf_counter()
            hosts.append((t1 - t0) * 1e3)
            times.append((t2 - t0) * 1e3)
        prof = cProfile.Profile()
        prof.enable()
        fwd()
        torch.cuda.synchronize()
        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(45)
        name = spec.replace(":", "_").replace(",", "_").replace("=", "")[:60]
        with open(os.path.join(args.out, f"{name}.prof.txt"), "w") as fh:
            fh.write(buf.getvalue())
        buf2 = io.StringIO()
        pstats.Stats(prof, stream=buf2).sort_stats("cumulative").print_stats(60)
        with open(os.path.join(args.out, f"{name}.cum.txt"), "w") as fh:
            fh.write(buf2.getvalue())
        results.append({"row": spec, "ms": statistics.median(times), "host_ms": statistics.median(hosts),
                        "layer_graphs": None if handle is None else handle.sparsity_report().get("layer_graphs")})
        print(json.dumps(results[-1]), flush=True)
        if handle is not None:
            handle.unpatch()
    with open(os.path.join(args.out, "profile_host.json"), "w") as fh:
        json.dump({"rows": results, "environment": environment("cuda")}, fh, indent=1)
    print("| row | forward ms (median) | host ms until the last launch |")
    print("|---|---|---|")
    for r in results:
        print(f"| {r['row'][:60]} | {r['ms']:.1f} | {r['host_ms']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
