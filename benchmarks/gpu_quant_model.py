"""GPU check of patch_model(quant=...) without a model download: a SmolLM2-shaped random-weight model.

Per quant mode: three prefills of ``--length`` tokens through the quantized route (the second and third
replay layer graphs when capture works), then ``handle.layer_graph_status``, the call counts, and the
logits against the same model patched without quant (same predictor) and against dense. Random weights:
the accuracy numbers say that the route runs and is close, not what a real model loses (use
``bench_model.py --quant`` / ``bench_quant.py --qkv`` for that). Prints one JSON object per mode.

Usage: ``PYTHONPATH=src python3 benchmarks/gpu_quant_model.py --length 4096 --layers 4``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

import torch  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--predictor", default="mean_sim:score=mixed,cdf_threshold=0.97,keep_local=8")
    ap.add_argument("--modes", default="int8,int8_fp8")
    args = ap.parse_args(argv)
    from sparseattn.eval.bench_model import build_random_model
    from sparseattn.eval.env import environment
    from sparseattn.integrations import patch_model

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_random_model("smollm2-135m", layers=args.layers, device=dev, dtype=torch.bfloat16)
    ids = torch.randint(0, model.config.vocab_size, (1, args.length), generator=torch.Generator().manual_seed(0)).to(dev)
    env = environment(dev)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).abs().max() / b.abs().max())

    def cos(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))

    with torch.no_grad():
        dense = model(ids, use_cache=False, logits_to_keep=256).logits.float()
        with patch_model(model, predictor=args.predictor):
            bf16 = model(ids, use_cache=False, logits_to_keep=256).logits.float()
        for mode in [m for m in args.modes.split(",") if m]:
            rec: dict = {"mode": mode, "length": args.length, "layers": args.layers, "environment": env}
            try:
                with patch_model(model, predictor=args.predictor, quant=mode) as h:
                    outs, times = [], []
                    for _ in range(3):
                        if dev == "cuda":
                            torch.cuda.synchronize()
                        t0 = time.perf_counter()
                        outs.append(model(ids, use_cache=False, logits_to_keep=256).logits.float())
                        if dev == "cuda":
                            torch.cuda.synchronize()
                        times.append(time.perf_counter() - t0)
                    rec.update(counts=dict(h.counts), layer_graph_status=dict(h.layer_graph_status),
                               backends=sorted({b for s in h.backends_used.values() for b in s}),
                               replays_equal_eager=bool(torch.equal(outs[0], outs[2])),
                               first_vs_replay_rel=rel(outs[2], outs[0]), wall_s=times,
                               vs_bf16_rel=rel(outs[2], bf16), vs_bf16_cos=cos(outs[2], bf16),
                               vs_dense_cos=cos(outs[2], dense), bf16_vs_dense_cos=cos(bf16, dense))
            except Exception as exc:  # noqa: BLE001 - report what failed
                rec["error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:500]}"
            print(json.dumps(rec), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
