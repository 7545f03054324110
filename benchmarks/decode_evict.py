"""L2 eviction hints on the decode kernel's K/V tile loads (issue 14: dense decode against cuDNN): timings.

The decode split kernel streams each sequence's K/V once per step. ``EVICT`` (a launch-config entry) puts an L2
eviction policy on those loads (``evict_first``: lines of a streamed tile leave L2 before others; ``evict_last``:
the opposite), which Triton carries into the ``cp.async ... L2::cache_hint`` copies of the pipelined loop. This
script times, per context and batch, graphed (one call per CUDA graph), rounds alternated, medians: the bf16 and
int8 caches with the launcher's default config and with each policy, and cuDNN's SDPA on the bf16 cache (GQA).
A policy changes no arithmetic: its output must equal the default's bit for bit (``equal``, whole batch).

    python benchmarks/decode_evict.py --out DIR [--contexts 131072 32768] [--batches 1 8 32]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import torch  # noqa: E402

from bench_decode import copy_bandwidth, quantize_chunked  # noqa: E402  (this folder: the script's own)

from sparseattn.ops.decode import _default_config, decode_attention  # noqa: E402
from sparseattn.testing.timing import bench_ms, capture_graph  # noqa: E402

H, HKV, D = 32, 8, 128
POLICIES = ("evict_first", "evict_last")


def one_shape(n: int, B: int, bw: float, dev: str | None, rounds: int) -> dict:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = torch.Generator(device="cuda").manual_seed(n + B)
    q = torch.randn(B, H, 1, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(B, HKV, n, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(B, HKV, n, D, device="cuda", dtype=torch.bfloat16, generator=g)
    kq, ks = quantize_chunked(k, "int8")
    vq, vs = quantize_chunked(v, "int8")
    sl = torch.full((B,), n - 3, dtype=torch.int32, device="cuda")
    programs = B * HKV
    cfg_b = _default_config(D, 16, False, device=dev, kv="none", programs=programs)
    cfg_8 = _default_config(D, 16, False, device=dev, kv="int8", programs=programs)
    calls = {
        "bf16": lambda: decode_attention(q, k, v, seqlens=sl, backend="triton", config=cfg_b),
        "int8": lambda: decode_attention(q, kq, vq, k_scale=ks, v_scale=vs, seqlens=sl, backend="triton",
                                         config=cfg_8),
    }
    for pol in POLICIES:
        cb, c8 = dict(cfg_b, EVICT=pol), dict(cfg_8, EVICT=pol)
        calls[f"bf16_{pol}"] = lambda cb=cb: decode_attention(q, k, v, seqlens=sl, backend="triton", config=cb)
        calls[f"int8_{pol}"] = lambda c8=c8: decode_attention(q, kq, vq, k_scale=ks, v_scale=vs, seqlens=sl,
                                                               backend="triton", config=c8)

    def cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k[:, :, : n - 3], v[:, :, : n - 3], enable_gqa=True)
    try:
        cudnn()
        calls["cudnn"] = cudnn
    except Exception as exc:  # noqa: BLE001 - cuDNN refuses this shape: the row goes without it
        print(f"  cudnn refused: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
    outs = {nm: fn() for nm, fn in calls.items()}
    equal = {nm: bool(torch.equal(outs[nm], outs[nm.split("_")[0]])) for nm in outs if "_evict" in nm}
    del outs
    graphs = {nm: capture_graph(fn) for nm, fn in calls.items()}
    ms: dict[str, list[float]] = {nm: [] for nm in graphs}
    names = list(graphs)
    for r in range(rounds):
        for nm in (names if r % 2 == 0 else names[::-1]):
            ms[nm].append(bench_ms(graphs[nm]))
    med = {nm: sorted(x)[len(x) // 2] for nm, x in ms.items()}
    kv_bytes = {"bf16": 2 * k.numel() * 2 * (n - 3) / n, "int8": (2 * kq.numel() + 2 * ks.numel() * 4) * (n - 3) / n}
    pct = {nm: 100.0 * kv_bytes["int8" if nm.startswith("int8") else "bf16"] / (t * 1e-3) / 1e9 / bw
           for nm, t in med.items()}
    row = dict(ctx=n, B=B, ms=med, rounds=ms, pct_copy_bw=pct, equal=equal, bf16_config=cfg_b, int8_config=cfg_8,
               cudnn_over={nm: med["cudnn"] / t for nm, t in med.items() if nm.startswith("bf16")}
               if "cudnn" in med else None)
    print(f"--- ctx {n} B {B}  equal {equal}", flush=True)
    for nm in names:
        vs_c = f"  cudnn/this {med['cudnn'] / med[nm]:.3f}" if "cudnn" in med and nm.startswith("bf16") else ""
        print(f"  {nm:<18s} {med[nm] * 1e3:9.1f} us  {pct[nm]:5.0f}% copy bw{vs_c}", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--contexts", nargs="+", type=int, default=[131072, 32768])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--budget-s", type=float, default=200.0)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("decode_evict: needs a CUDA device")
    from sparseattn.ops.registry import device_name

    t0 = time.time()
    bw = copy_bandwidth("cuda", 1 << 29, bench_ms)["gbps_read_plus_write"]
    dev = device_name(torch.device("cuda"))
    rows = []
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  copy {bw:.0f} GB/s", flush=True)
    for n in a.contexts:
        for B in a.batches:
            if B * HKV * n * D * 2 * 2 * 2 > 60 * 2**30:
                continue
            if time.time() - t0 > a.budget_s:
                print("budget reached", flush=True)
                break
            rows.append(one_shape(n, B, bw, dev, a.rounds))
            torch.cuda.empty_cache()
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "decode_evict.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, copy_gbps=bw, rows=rows), f,
                  indent=1)


if __name__ == "__main__":
    main()
