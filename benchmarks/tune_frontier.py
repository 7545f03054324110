"""Model-level frontier (top-1 / KL / cosine vs block sparsity) on held-out windows, dense logits computed once.

Issue 13's feasibility question: at which block sparsity do the exact-mass oracle, the default
mean_sim predictor and a tuned file keep top-1 >= 95% on SmolLM2? Held-out windows are the ones
*after* ``--skip`` windows of ``--seq-len`` tokens (``sparseattn tune --samples 8 --seq-len 4096``
uses the first 8 × 4096 tokens, so ``--skip`` 8 at 4096 or 16 at 2048 stays off the calibration text).

    PYTHONPATH=src python benchmarks/tune_frontier.py --text-dir ../shared/data/essays --seq-len 2048 \
        --skip 16 --samples 1 --specs 'oracle:topk=0.4,cdf_threshold=None' --tuned t.safetensors \
        --tuned-scales 1,0.5 --out frontier.jsonl

``--patterns SPEC ...`` adds rows patched with a pattern instead of a predictor (``dense:block_m=128,block_n=128``:
every block through our kernel, the bf16 noise floor; the floor row is first).

``--tuned-scales a,b``: the tuned file with every sparse head's ``1 − cdf_threshold`` multiplied by
the scale (:func:`sparseattn.tuning.calibrate.scale_tuned`; 1 = the file as written).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/tune_frontier.py")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--text-dir", required=True)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--skip", type=int, default=16, help="windows skipped (the calibration ones)")
    ap.add_argument("--samples", type=int, default=1, help="held-out windows scored")
    ap.add_argument("--specs", nargs="*", default=[], help="predictor specs, one row each")
    ap.add_argument("--patterns", nargs="*", default=[],
                    help="pattern specs, one row each; 'dense:block_m=128,block_n=128' is the all-blocks floor (bf16)")
    ap.add_argument("--tuned", default=None)
    ap.add_argument("--tuned-scales", default="1")
    ap.add_argument("--pv", choices=["file", "off"], default="file", help="tuned: keep the file's P·V skip or drop it")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--positions", type=int, default=None,
                    help="scored positions per window, the last ones (default: half the window; fewer bound the logits' "
                         "memory on a large vocabulary, e.g. Gemma-3's 262K)")
    ap.add_argument("--out", default="frontier.jsonl")
    args = ap.parse_args(argv)

    from sparseattn.eval.end_to_end import logits_metrics
    from sparseattn.eval.env import environment
    from sparseattn.eval.texts import sample_ids
    from sparseattn.integrations.transformers_patch import patch_model
    from sparseattn.models import load

    model, tok = load(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    ids, names, _ = sample_ids(model, tok, seq_len=args.seq_len, samples=args.skip + args.samples, text_dir=args.text_dir)
    ids, names = ids[args.skip:], names[args.skip:]
    k = args.seq_len // 2 if args.positions is None else args.positions
    if not 0 < k <= args.seq_len:
        ap.error(f"--positions must be in [1, --seq-len]; got {k}")

    def logits(t: torch.Tensor) -> torch.Tensor:
        return model(t.to(args.device), use_cache=False, logits_to_keep=k).logits[0, -k:].float()

    t0 = time.perf_counter()
    with torch.no_grad():
        dense = [logits(t) for t in ids]
    print(f"dense: {time.perf_counter() - t0:.1f} s for {len(ids)} windows ({names})", file=sys.stderr, flush=True)

    runs: list[tuple[str, dict]] = [(f"pattern={p}", {"pattern": p}) for p in args.patterns]
    runs += [(s, {"predictor": s}) for s in args.specs]
    if args.tuned:
        from sparseattn.tuning.calibrate import scale_tuned
        from sparseattn.tuning.store import load_tuned

        cfg = load_tuned(args.tuned, model=model)
        for a in [float(x) for x in args.tuned_scales.split(",") if x]:
            runs.append((f"tuned(scale={a:g},pv={args.pv})", {"tuned": scale_tuned(cfg, a, keep_pv=args.pv == "file")}))
    for label, kw in runs:
        t0 = time.perf_counter()
        per = []
        with torch.no_grad(), patch_model(model, backend=args.backend, **kw) as h:
            for t, ref in zip(ids, dense):
                per.append(logits_metrics(logits(t), ref))
            rep = h.sparsity_report()
        row = {key: sum(m[key] for m in per) / len(per) for key in per[0]}
        sparse_layers = {i: e["sparsity"] for i, e in rep["layers"].items() if e["mode"] == "sparse"}
        row.update(spec=label, seq_len=args.seq_len, samples=len(ids), texts=names, sparsity=rep["mean_sparsity"],
                   positions=k, sparse_layer_sparsity=sparse_layers,
                   wall_s=round(time.perf_counter() - t0, 1), device=args.device, dtype=args.dtype,
                   environment=environment(args.device))
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{label:<58} sparsity {row['sparsity']:.3f}  top-1 {row['top1_agreement']:.4f}  "
              f"cos {row['logits_cosine']:.5f}  KL {row['kl_dense_sparse']:.4f}  ({row['wall_s']} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
