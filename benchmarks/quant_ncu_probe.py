"""One quantized prefill launch to profile: Nsight Compute's target for ``device_jobs.sh ncu_quant``.

Quantizes Gaussian Q/K/V (causal, dense layout) once, then launches the quantized kernel twice with one fixed
config of :data:`quant_kernel_variants.VARIANTS` (the first launch compiles; profile the second with ``ncu
--launch-skip 1 --launch-count 1 -k regex:_block_sparse_fwd_quant``). No timing: Nsight Compute measures.

    PYTHONPATH=src python3 benchmarks/quant_ncu_probe.py --variant tma --operands int8_default --seqlen 8192
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from quant_kernel_variants import OPERANDS, VARIANTS  # noqa: E402

from sparseattn.ops import quant as Q  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", required=True, choices=[n for n, c in VARIANTS.items() if c is not None])
    ap.add_argument("--operands", default="int8_default", choices=list(OPERANDS))
    ap.add_argument("--seqlen", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128, choices=(64, 128))
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("quant_ncu_probe: no CUDA device", file=sys.stderr)
        return 2
    B, H, Hkv, N, D = 1, a.heads, a.kv_heads, a.seqlen, a.head_dim
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, h, N, D, generator=g, device="cuda").to(torch.bfloat16) for h in (H, Hkv, Hkv))
    quant, sq, bal = OPERANDS[a.operands]
    qq = Q.quantize_qkv(q, k, v, quant=quant, quant_granularity="per_warp", smooth_q=sq, balance_qk=bal)
    lay = Q.resolve_layout("quant_ncu_probe", q, k, None, None, 128, True)
    for _ in range(2):
        Q.quantized_attention_from(qq, lay, causal=True, config=VARIANTS[a.variant])
    torch.cuda.synchronize()
    print(f"quant_ncu_probe: {a.variant} {a.operands} N={N} done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
