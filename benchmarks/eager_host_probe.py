"""Where an eager patched forward spends its host time, row by row (diagnostic for issue 10's eager target).

The eager whole-model ratio of the default predictor (0.95x at SmolLM2 8K) is below the static rows' (0.98-1.01x)
although its GPU time is lower: the host sets the time. This runs, in one process on one model and input,
for each row (all blocks, the default predictor, a static pattern):

* paired rounds (``eval/prefill_timing.paired_rounds``: GC off, order swapped every round) of the dense
  model (patch suspended) and the patched one, with the host time our layer calls took per forward
  (``PatchHandle.timings``) and the layer-graph replay statistics;
* ``cProfile`` of ``--profile-forwards`` dense and sparse forwards: total host time per forward and the
  functions whose own time differs most between the two (``tottime`` per forward).

Writes ``eager_host_probe.json`` (every round, the full difference table) under ``--out`` and prints a short
table last. Usage::

    PYTHONPATH=src python3 benchmarks/eager_host_probe.py --model smollm2-135m --text-dir ESSAYS --length 8192
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

import torch  # noqa: E402


def _per_function(prof: cProfile.Profile, forwards: int) -> dict[str, tuple[float, int]]:
    """``{"file:line(function)": (own seconds per forward, calls per forward)}``."""
    st = pstats.Stats(prof)
    out = {}
    for (path, line, name), (_cc, nc, tt, _ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        out[f"{os.path.basename(path)}:{line}({name})"] = (tt / forwards, nc // forwards)
    return out


@torch.no_grad()  # as bench_model's timing (an inference forward: no autograd graph, steady allocator addresses)
def main() -> int:
    from sparseattn.eval.bench_model import ALL_BLOCKS_SPEC, _input_ids, load_model
    from sparseattn.eval.defaults import DEFAULT_PREDICTOR_SPEC
    from sparseattn.eval.env import environment
    from sparseattn.eval.prefill_timing import paired_rounds
    from sparseattn.integrations.transformers_patch import patch_model
    from sparseattn.predictors.pattern import pattern_predictor
    from sparseattn.predictors.resolve import resolve_predictor

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--arch", default=None, help="random weights of this architecture instead of --model "
                    "(eval/bench_model.RANDOM_ARCHS, e.g. smollm2-135m); random token ids")
    ap.add_argument("--text-dir", default=None)
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--profile-forwards", type=int, default=5)
    ap.add_argument("--packed", default=None, metavar="N1,N2,...",
                    help="pack documents of these token counts into the row (position_ids restarting per document)")
    ap.add_argument("--out", default=os.environ.get("OUT", "eager_host_probe_out"))
    args = ap.parse_args()

    if args.arch:
        from sparseattn.eval.bench_model import build_random_model

        model, tok = build_random_model(args.arch, device="cuda", dtype=torch.bfloat16), None
    else:
        model, tok = load_model(args.model, dtype=torch.bfloat16, device="cuda")
    ids, source = _input_ids(tok, model, args.length, random_ids=tok is None, text_files=None,
                             text_dir=args.text_dir, seed=0)
    ids = ids.cuda()
    pos = None
    if args.packed:
        lengths = [int(x) for x in args.packed.split(",")]
        if sum(lengths) != ids.shape[1]:
            raise SystemExit(f"eager_host_probe: --packed lengths sum to {sum(lengths)}; expected --length {ids.shape[1]}")
        pos = torch.cat([torch.arange(n) for n in lengths])[None].cuda()
    rows = [("all blocks", pattern_predictor(ALL_BLOCKS_SPEC)),
            ("default", resolve_predictor(DEFAULT_PREDICTOR_SPEC)),
            ("sink_window", pattern_predictor("sink_window:window_blocks=8,block_m=128,block_n=128"))]

    def fwd() -> None:
        model(ids, position_ids=pos, use_cache=False, logits_to_keep=1)

    res = {"env": environment(), "model": args.arch and f"random {args.arch}" or args.model, "input": source, "length": args.length, "packed": args.packed,
           "rows": []}
    for label, pred in rows:
        h = patch_model(model, predictor=pred)
        try:
            for _ in range(3):
                fwd()
            torch.cuda.synchronize()
            host_in_calls: list[float] = []

            def sparse() -> None:
                t_before = sum(h.timings.values())
                fwd()
                host_in_calls.append(sum(h.timings.values()) - t_before)

            d_s, s_s = paired_rounds(fwd, sparse, repeats=args.repeats, warmup=1, cuda=True,
                                     dense_context=h.suspended)
            prof_rows = {}
            for side in ("dense", "sparse"):
                prof = cProfile.Profile()
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                if side == "dense":
                    with h.suspended():
                        prof.enable()
                        for _ in range(args.profile_forwards):
                            fwd()
                        prof.disable()
                else:
                    prof.enable()
                    for _ in range(args.profile_forwards):
                        fwd()
                    prof.disable()
                torch.cuda.synchronize()
                prof_rows[side] = (_per_function(prof, args.profile_forwards),
                                   (time.perf_counter() - t0) / args.profile_forwards)
            dense_f, sparse_f = prof_rows["dense"][0], prof_rows["sparse"][0]
            diff = []
            for name in set(dense_f) | set(sparse_f):
                a, b = dense_f.get(name, (0.0, 0)), sparse_f.get(name, (0.0, 0))
                diff.append((b[0] - a[0], name, a[0], a[1], b[0], b[1]))
            diff.sort(key=lambda x: -abs(x[0]))
            lg = h._layer_graphs
            rec = {
                "row": label, "dense_rounds_s": d_s, "sparse_rounds_s": s_s,
                "dense_ms": statistics.median(d_s) * 1e3, "sparse_ms": statistics.median(s_s) * 1e3,
                "ratio_paired": statistics.median(a / b for a, b in zip(d_s, s_s)),
                "host_ms_in_layer_calls": statistics.median(host_in_calls[-args.repeats:]) * 1e3,
                "layer_calls_per_forward": h.counts["prefill_sparse"],
                "graph_stats": dict(lg.stats) if lg is not None else None,
                "profiled_wall_ms": {k: v[1] * 1e3 for k, v in prof_rows.items()},
                "profiled_own_ms": {k: sum(x[0] for x in v[0].values()) * 1e3 for k, v in prof_rows.items()},
                "top_differences": [{"function": n, "delta_ms": d * 1e3, "dense_ms": a * 1e3, "dense_calls": ac,
                                     "sparse_ms": b * 1e3, "sparse_calls": bc} for d, n, a, ac, b, bc in diff[:40]],
            }
            res["rows"].append(rec)
        finally:
            h.unpatch()
        print(f"{label}: dense {rec['dense_ms']:.1f} ms, sparse {rec['sparse_ms']:.1f} ms, paired ratio "
              f"{rec['ratio_paired']:.3f}, host in layer calls {rec['host_ms_in_layer_calls']:.2f} ms, "
              f"graphs {rec['graph_stats']}", flush=True)
        for t in rec["top_differences"][:12]:
            print(f"   {t['delta_ms']:+7.3f} ms  {t['function'][:70]:70s} dense {t['dense_ms']:.3f} ({t['dense_calls']})"
                  f" sparse {t['sparse_ms']:.3f} ({t['sparse_calls']})", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "eager_host_probe.json"), "w") as f:
        json.dump(res, f, indent=1)
    print("| row | dense ms | sparse ms | paired ratio | host ms in our layer calls | profiled wall dense / sparse |")
    print("|---|---|---|---|---|---|")
    for r in res["rows"]:
        print(f"| {r['row']} | {r['dense_ms']:.1f} | {r['sparse_ms']:.1f} | {r['ratio_paired']:.3f} | "
              f"{r['host_ms_in_layer_calls']:.2f} | {r['profiled_wall_ms']['dense']:.1f} / "
              f"{r['profiled_wall_ms']['sparse']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
