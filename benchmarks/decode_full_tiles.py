"""The decode kernel's ``FULL_TILES`` launch (no element masks on the K/V/scale loads; issue 14) against the tuned
default launch, same process, same inputs.

bf16 and int8 caches (the general configs of ``ops/tuned/decode.json`` without ``FULL_TILES``: 128 keys, 4 warps,
2 / 3 stages, int8 with ``QK="fp16"``), H=32, H_kv=8, D=128, one new token, contexts and batches from the arguments. Per row: both
launches' medians (``bench_ms``, rounds alternated), whether the outputs are equal bit for bit, and the K/V bytes
read per second against the device's copy bandwidth. Prints a table; writes ``decode_full_tiles.json`` under --out.

    python benchmarks/decode_full_tiles.py --out DIR [--contexts 32768 131072] [--batches 1 8 32] [--rounds 3]
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

from sparseattn.ops.decode import decode_attention  # noqa: E402
from sparseattn.testing.timing import bench_ms  # noqa: E402

CFG = {"bf16": {"BLOCK_N": 128, "num_warps": 4, "num_stages": 2},
       "int8": {"BLOCK_N": 128, "num_warps": 4, "num_stages": 3, "QK": "fp16"}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--contexts", nargs="+", type=int, default=[32768, 131072])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=150.0)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("decode_full_tiles: needs a CUDA device")
    t0 = time.time()
    bw = copy_bandwidth("cuda", 1 << 29, bench_ms)["gbps_read_plus_write"]
    H, Hkv, D = 32, 8, 128
    rows = []
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  copy {bw:.0f} GB/s", flush=True)
    print(f"{'ctx':>7} {'B':>3} {'kv':>5} {'masked ms':>10} {'full ms':>8} {'masked/full':>11} {'full %bw':>8} {'equal':>6}")
    for n in a.contexts:
        for B in a.batches:
            if B * Hkv * n * D * 2 * 2 > 40 * 2**30:
                continue
            if time.time() - t0 > a.budget_s:
                print("budget reached", flush=True)
                break
            g = torch.Generator(device="cuda").manual_seed(n + B)
            q = torch.randn(B, H, 1, D, device="cuda", dtype=torch.bfloat16, generator=g)
            k = torch.randn(B, Hkv, n, D, device="cuda", dtype=torch.bfloat16, generator=g)
            v = torch.randn(B, Hkv, n, D, device="cuda", dtype=torch.bfloat16, generator=g)
            sl = torch.full((B,), n - 3, dtype=torch.int32, device="cuda")  # a partial last tile
            caches = {"bf16": (k, v, None, None)}
            kq, ks = quantize_chunked(k, "int8")
            vq, vs = quantize_chunked(v, "int8")
            caches["int8"] = (kq, vq, ks, vs)
            del k, v
            for kv, (kc, vc, ksc, vsc) in caches.items():
                def run(full, kc=kc, vc=vc, ksc=ksc, vsc=vsc, kv=kv):
                    cfg = dict(CFG[kv], FULL_TILES=True) if full else CFG[kv]
                    return decode_attention(q, kc, vc, k_scale=ksc, v_scale=vsc, seqlens=sl, return_lse=True,
                                            backend="triton", config=cfg)
                x, y = run(False), run(True)
                equal = bool(torch.equal(x.out, y.out) and torch.equal(x.lse, y.lse))
                ms = {False: [], True: []}
                for r in range(a.rounds):
                    for full in ((False, True) if r % 2 == 0 else (True, False)):
                        ms[full].append(bench_ms(lambda full=full: run(full)))
                med = {f: sorted(v)[len(v) // 2] for f, v in ms.items()}
                nbytes = kc.numel() * kc.element_size() * 2 * (n - 3) / n
                if ksc is not None:
                    nbytes += 2 * ksc.numel() * 4 * (n - 3) / n
                pct = 100.0 * nbytes / (med[True] * 1e-3) / 1e9 / bw
                rows.append(dict(ctx=n, B=B, kv=kv, masked_ms=med[False], full_ms=med[True], equal=equal,
                                 full_pct_copy_bw=pct, rounds=ms))
                print(f"{n:>7} {B:>3} {kv:>5} {med[False]:>10.4f} {med[True]:>8.4f} {med[False] / med[True]:>11.3f} "
                      f"{pct:>8.0f} {str(equal):>6}", flush=True)
            del caches, kq, vq
            torch.cuda.empty_cache()
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "decode_full_tiles.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, copy_gbps=bw, rows=rows), f,
                  indent=1)


if __name__ == "__main__":
    main()
