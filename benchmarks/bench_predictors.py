"""Predictor overhead benchmark: predictor alone, predictor + Triton kernel, vs SDPA dense.

One device call. Shapes: Llama-3.1-8B attention (B=1, H=32, H_kv=8, D=128, bf16, causal; ``--shape`` for
others) at 8K/16K/32K/64K tokens. Inputs are synthetic and *smooth* (a per-head random walk along the sequence
plus Gaussian noise, generated on the GPU, seeded) so that blocks are self-similar as in real
models and the predictors return sparse layouts; the density each predictor reached is reported
with its time. For each (length, predictor):

* ``pred_ms`` — ``predictor.predict(q, k)`` alone (CUDA-event median; SketchWalk: mean of two
  consecutive layers after ``reset()``, so the walk's history term is included);
* ``kernel_ms`` — the Triton kernel on that layout (preallocated outputs);
* ``total_ms`` — both, back to back, as a patched model runs them;
* ``overhead_pct`` — ``pred_ms / sdpa_dense_ms``; the target is <= 10 % at 32K;
* ``cos_vs_dense`` — cosine of the sparse output against SDPA dense (accuracy on these inputs).

``graphed:<spec>`` rows wrap the predictor in :class:`~sparseattn.predictors.graphed.GraphedPredictor`
(one CUDA graph per shape; ``pred_ms`` includes the input ``copy_`` and the output clones;
``replay_ms`` is the bare ``graph.replay()``; ``capture_s`` the first call, warm-up + capture).
Before timing, the graphed layout is checked equal to the eager one on two inputs
(``graphed_equal``); a mismatch is reported and the row still timed.

SDPA dense is the faster of the cuDNN and flash backends in the same run. A parity check of the
kernel against the fp32 reference on the last rows runs once per length (``tail_parity``).
Prints a table last and writes ``bench_predictors.json`` under ``$OUT`` (or ``--out``).

Usage: ``PYTHONPATH=src python3 benchmarks/bench_predictors.py [--lengths 8192 16384 32768 65536] [--budget-s 480]``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from sparseattn.predictors.resolve import resolve_predictor  # noqa: E402
from sparseattn.predictors.graphed import GraphedPredictor  # noqa: E402
from sparseattn.testing import timing  # noqa: E402

PREDICTORS = [
    "static:pattern=sink_window,sink_blocks=1,window_blocks=16",
    "mean_sim",
    "mean_sim:score=mixed,cdf_threshold=0.97,keep_local=8",
    "sketch_walk",
    "sketch_walk:walk=false",
    "graphed:mean_sim",
    "graphed:mean_sim:score=mixed,cdf_threshold=0.97,keep_local=8",
    "graphed:sketch_walk:walk=false",
]


def smooth_qkv(B: int, H: int, Hkv: int, N: int, D: int, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def one(heads: int) -> torch.Tensor:
        walk = torch.cumsum(torch.randn(B, heads, N, D, generator=gen, device="cuda") * 0.05, dim=2)
        walk = walk / walk.std(dim=(2, 3), keepdim=True).clamp_min(1e-6)
        return (walk + 0.3 * torch.randn(B, heads, N, D, generator=gen, device="cuda")).to(torch.bfloat16)

    return one(H), one(Hkv), torch.randn(B, Hkv, N, D, generator=gen, device="cuda").to(torch.bfloat16)


def env_info() -> dict[str, Any]:
    from sparseattn.eval.env import environment

    return environment("cuda")


def make(spec: str) -> Any:
    if spec.startswith("graphed:"):
        return GraphedPredictor(resolve_predictor(spec[len("graphed:"):]))
    return resolve_predictor(spec)


def same_layout(a: Any, b: Any) -> bool:
    return bool(torch.equal(a.kv_num_blocks, b.kv_num_blocks) and torch.equal(a.to_dense_mask(), b.to_dense_mask()))


def graphed_check(pred: Any, spec: str, q: torch.Tensor, k: torch.Tensor) -> dict[str, Any]:
    """First call (warm-up + capture), then graphed vs eager layouts on (q, k) and on flipped inputs."""
    t = time.time()
    pred.predict(q, k, causal=True)
    torch.cuda.synchronize()
    out: dict[str, Any] = {"capture_s": time.time() - t, "graphed": bool(pred._entries)}
    eager = resolve_predictor(spec[len("graphed:"):])
    ok = same_layout(pred.predict(q, k, causal=True), eager.predict(q, k, causal=True))
    q2, k2 = q.flip(2).contiguous(), k.flip(2).contiguous()
    ok = ok and same_layout(pred.predict(q2, k2, causal=True), eager.predict(q2, k2, causal=True))
    del q2, k2
    out["graphed_equal"] = ok
    if pred._entries:
        out["replay_ms"] = timing.bench_ms(lambda: pred.replay_only(q, k, causal=True))
    return out


def predict_fn(pred: Any, q: torch.Tensor, k: torch.Tensor):  # noqa: ANN201
    if pred.name == "sketch_walk":
        def two_layers():  # noqa: ANN202
            pred.reset()
            pred.predict(q, k, causal=True, layer=pred.config.dense_layers)
            return pred.predict(q, k, causal=True, layer=pred.config.dense_layers + 1)
        return two_layers, 2
    return (lambda: pred.predict(q, k, causal=True)), 1


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    ap.add_argument("--predictors", nargs="+", default=PREDICTORS)
    ap.add_argument("--budget-s", type=float, default=480.0)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--shape", default="32,8,128",
                    help="heads,kv_heads,head_dim (default Llama-3.1-8B's 32,8,128; Gemma-3-270M's global layers: 4,1,256)")
    args = ap.parse_args()
    try:
        H, Hkv, D = (int(x) for x in args.shape.split(","))
    except ValueError:
        print(f"bench_predictors: --shape must be three integers heads,kv_heads,head_dim; got {args.shape!r}")
        return 2
    if H < 1 or Hkv < 1 or H % Hkv:
        print(f"bench_predictors: --shape heads must be a positive multiple of kv_heads; got {args.shape!r}")
        return 2
    reason = timing.cuda_unavailable_reason()
    if reason:
        print(f"bench_predictors: {reason}")
        return 2
    from sparseattn.ops.triton_launch import refusal

    t0 = time.time()
    B = 1
    info = env_info()
    results: dict[str, Any] = {"env": info, "shape": {"batch": B, "heads": H, "kv_heads": Hkv, "head_dim": D,
                                                      "dtype": "bfloat16", "causal": True}, "rows": [], "skipped": []}
    for N in args.lengths:
        if time.time() - t0 > args.budget_s:
            results["skipped"].append({"length": N, "why": "out of time budget"})
            continue
        q, k, v = smooth_qkv(B, H, Hkv, N, D, seed=N)
        sdpa = timing.sdpa_runners(q, k, v, True)
        sd = {n: timing.bench_ms(sdpa[n]) for n in ("cudnn", "flash") if callable(sdpa.get(n))}
        best = min(sd, key=sd.get)
        dense_out = sdpa[best]()
        flops = timing.attention_flops(B, H, N, N, D, True)
        parity_done = False
        for spec in args.predictors:
            if time.time() - t0 > args.budget_s:
                results["skipped"].append({"length": N, "predictor": spec, "why": "out of time budget"})
                continue
            pred = make(spec)
            extra = graphed_check(pred, spec, q, k) if spec.startswith("graphed:") else {}
            fn, calls = predict_fn(pred, q, k)
            layout = fn()
            torch.cuda.synchronize()
            pred_ms = timing.bench_ms(fn) / calls
            row: dict[str, Any] = {"length": N, "predictor": spec, "density": layout.density(causal=True),
                                   "pred_ms": pred_ms, "sdpa_ms": sd[best], "sdpa_backend": best,
                                   "sdpa_tflops": timing.tflops(flops, sd[best]),
                                   "overhead_pct": 100.0 * pred_ms / sd[best], **extra}
            why = refusal(q, k=k, v=v, layout=layout, causal=True)
            if why is None:
                run_k = timing.kernel_runner(q, k, v, layout, True)
                run_k()
                torch.cuda.synchronize()
                if not parity_done:
                    from sparseattn.ops.triton_launch import block_sparse_fwd

                    st = block_sparse_fwd(q, k, v, layout=layout, causal=True)
                    row["parity"] = timing.tail_parity(q, k, v, layout, True, st.out, st.lse, rows=512)
                    parity_done = True
                kernel_ms = timing.bench_ms(run_k)

                def total(fn=fn, v=v):  # noqa: ANN001, ANN202
                    from sparseattn.ops.triton_launch import block_sparse_fwd

                    lay = fn()
                    return block_sparse_fwd(q, k, v, layout=lay, causal=True)

                total_ms = timing.bench_ms(total) if calls == 1 else pred_ms + kernel_ms
                from sparseattn.ops.triton_launch import block_sparse_fwd

                out = block_sparse_fwd(q, k, v, layout=layout, causal=True).out
                cos = torch.nn.functional.cosine_similarity(out.float().flatten(), dense_out.float().flatten(), dim=0)
                row.update(kernel_ms=kernel_ms, total_ms=total_ms, speedup_vs_sdpa=sd[best] / total_ms,
                           cos_vs_dense=float(cos))
            else:
                row["kernel"] = f"refused: {why}"
            results["rows"].append(row)
            print(json.dumps({k_: (round(v_, 4) if isinstance(v_, float) else v_) for k_, v_ in row.items()
                              if k_ != "parity"}), flush=True)
            os.makedirs(args.out, exist_ok=True)  # partial results survive a timeout
            with open(os.path.join(args.out, "bench_predictors.json"), "w") as f:
                json.dump(results, f, indent=2)
        del q, k, v, dense_out
        torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_predictors.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(f"\n{info['gpu']}  torch {info['torch']}  triton {info['triton']}  {info['date_utc']}")
    print(f"{'N':>6} {'predictor':58} {'dens':>5} {'pred ms':>8} {'ovh %':>6} {'kern ms':>8} {'tot ms':>8} "
          f"{'SDPA ms':>8} {'x SDPA':>6} {'cos':>7}")
    for r in results["rows"]:
        def g(key: str, fmt: str) -> str:
            val = r.get(key)
            return format(val, fmt) if isinstance(val, (int, float)) else "-"
        print(f"{r['length']:>6} {r['predictor'][:58]:58} {r['density']:5.2f} {g('pred_ms', '8.3f')} "
              f"{g('overhead_pct', '6.1f')} {g('kernel_ms', '8.3f')} {g('total_ms', '8.3f')} {g('sdpa_ms', '8.3f')} "
              f"{g('speedup_vs_sdpa', '6.2f')} {g('cos_vs_dense', '7.4f')}")
    for s in results["skipped"]:
        print("skipped:", s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
