"""INT8 vs bf16 dense decode per call inside a sequence of layers (issue 14's "INT8 >= 1.7x bf16 at 128K").

For each ``(batch, context, layers)`` case: ``L`` independent bf16 caches (one per "layer": no call finds the previous
call's bytes in L2) and their INT8 twins (:func:`sparseattn.state.kv_cache.quantize`, per token and KV head), H=32,
H_kv=8, D=128, one new token. One CUDA graph holds the ``L`` bf16 calls, another the ``L`` INT8 calls
(:func:`~sparseattn.ops.decode.decode_attention`, Triton backend); each is timed by replay
(:func:`~sparseattn.testing.timing.bench_ms`) in three alternating rounds; the per-call time is the median round's
replay divided by ``L``. This is the cost of the call in a model's decode step, without the one graph launch that a
one-call graph (``bench_decode.py``, ``decode_stage_probe.py``) adds to every number.

Usage: ``PYTHONPATH=src python3 benchmarks/decode_int8_layers.py`` (CUDA only; prints one line per case).
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from sparseattn.ops.decode import decode_attention  # noqa: E402
from sparseattn.state.kv_cache import quantize  # noqa: E402
from sparseattn.testing.timing import bench_ms, capture_graph  # noqa: E402

CASES = ((1, 131072, 8), (1, 32768, 8), (8, 131072, 4))  # (batch, context, layers)


def main() -> int:
    if not torch.cuda.is_available():
        print("decode_int8_layers: needs a CUDA device", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    for B, N, L in CASES:
        q = torch.randn(B, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
        ks = [torch.randn(B, 8, N, 128, device="cuda", dtype=torch.bfloat16) for _ in range(L)]
        vs = [torch.randn_like(k) for k in ks]
        kq = [quantize(k, "int8") for k in ks]
        vq = [quantize(v, "int8") for v in vs]

        def bf() -> list:
            return [decode_attention(q, ks[i], vs[i], backend="triton") for i in range(L)]

        def i8() -> list:
            return [decode_attention(q, kq[i][0], vq[i][0], k_scale=kq[i][1], v_scale=vq[i][1], backend="triton")
                    for i in range(L)]

        gb, gi = capture_graph(bf), capture_graph(i8)
        rounds = [(bench_ms(gb) / L, bench_ms(gi) / L) for _ in range(3)]
        tb = sorted(r[0] for r in rounds)[1]
        ti = sorted(r[1] for r in rounds)[1]
        print(f"B={B} N={N} layers={L}: bf16 {tb * 1e3:.1f} us, int8 {ti * 1e3:.1f} us per call -> int8 {tb / ti:.2f}x",
              flush=True)
        del ks, vs, kq, vq
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
