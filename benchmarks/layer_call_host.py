"""Host time of one attention-layer call: the model's SDPA function vs sparseattn's patched call (diagnostic).

An eager model on a fast GPU is host-bound (SmolLM2-135M at 8K: ~15 ms of GPU work under ~25-50 ms of
Python), so what decides eager whole-model speed is what each layer call costs on the host. This
times, on one layer of a random-weight model of ``--arch`` (post-RoPE q/k/v of ``--len`` tokens, the
same tensors every call, as a steady-state forward sees them at the same addresses):

* ``sdpa``: transformers' ``sdpa_attention_forward`` (what the dense model runs);
* ``ours/<row>``: sparseattn's registered attention function after ``patch_model`` (layer graphs on:
  the fast lane and a direct replay; the first calls capture), for a static pattern and the default
  predictor; ``ours_eager/<row>``: the same with ``layer_graphs=False``.

Host time per call = wall time of ``--calls`` back-to-back calls with no synchronisation inside,
divided by the calls, at a length short enough that the GPU keeps up (``--len 512`` by default;
``gpu_us`` is the GPU time per call from one synchronised run, to show that). Median of 5 rounds.
Writes ``layer_call_host.json`` under ``--out`` and prints a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch


def host_us(fn, calls: int) -> tuple[float, float]:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    rounds = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        rounds.append((t1 - t0) / calls * 1e6)
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(calls):
        fn()
    b.record()
    torch.cuda.synchronize()
    return statistics.median(rounds), a.elapsed_time(b) * 1e3 / calls


def main() -> int:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from sparseattn.eval.bench_model import build_random_model
    from sparseattn.eval.defaults import DEFAULT_PREDICTOR_SPEC
    from sparseattn.eval.env import environment
    from sparseattn.integrations.transformers_patch import _attention_forward, patch_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="smollm2-135m")
    ap.add_argument("--len", type=int, default=512)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    model = build_random_model(args.arch, layers=1, device="cuda", dtype=torch.bfloat16)
    attn = model.model.layers[0].self_attn
    cfg = model.config
    H, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, H, args.len, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, Hkv, args.len, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, args.len, Hkv, D, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
    kw = {"dropout": 0.0, "scaling": attn.scaling}
    rows = []
    us, gpu = host_us(lambda: sdpa_attention_forward(attn, q, k, v, None, **kw), args.calls)
    rows.append({"row": "sdpa", "host_us": round(us, 2), "gpu_us": round(gpu, 2)})
    specs = {"pattern sink_window": {"pattern": "sink_window:window_blocks=2,block_m=64,block_n=64"},
             "default predictor": {"predictor": DEFAULT_PREDICTOR_SPEC}}
    for graphs in (True, False):
        for name, spec in specs.items():
            with patch_model(model, layer_graphs=graphs, **spec) as h, torch.no_grad():
                us, gpu = host_us(lambda: _attention_forward(attn, q, k, v, None, **kw), args.calls)
                rows.append({"row": f"{'ours' if graphs else 'ours_eager'}/{name}", "host_us": round(us, 2),
                             "gpu_us": round(gpu, 2), "layer_graphs": h.sparsity_report().get("layer_graphs")})
    with open(os.path.join(args.out, "layer_call_host.json"), "w") as fh:
        json.dump({"len": args.len, "arch": args.arch, "rows": rows, "environment": environment("cuda")}, fh, indent=1)
    print(f"| row ({args.arch}, {args.len} tokens) | host µs per call | GPU µs per call |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['row']} | {r['host_us']:.1f} | {r['gpu_us']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
