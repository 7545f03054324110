"""Programmatic dependent launch of the decode kernels (``sparseattn.ops.decode.PDL_LAUNCH``; issue 14).

Each decode-path kernel (split, merge, page score, page pick) launched with ``launch_pdl`` lets the next one launch
at its start and waits for the previous one before any memory access, so the outputs must equal the plain launches'
bit for bit. On the CPU (the interpreter) the switch must do nothing at all.
"""

from __future__ import annotations

import pytest
import torch

import sparseattn.ops.decode as dec
from sparseattn.ops.decode import decode_attention, pdl_meta
from sparseattn.ops.pages import page_summaries, sparse_decode_attention
from sparseattn.state.kv_cache import quantize
from sparseattn.testing.harness import kernel_unavailable, node_generator

ON_GPU = torch.cuda.is_available()
DEV = "cuda" if ON_GPU else "cpu"
needs_kernel = pytest.mark.skipif(kernel_unavailable() is not None, reason=str(kernel_unavailable()))
needs_pdl_gpu = pytest.mark.skipif(not (ON_GPU and torch.cuda.get_device_capability() >= (9, 0)),
                                   reason="programmatic dependent launch needs an sm_90+ GPU")


def test_pdl_meta_is_empty_off_the_gpu_and_when_off(monkeypatch):
    monkeypatch.setattr(dec, "PDL_LAUNCH", True)
    assert pdl_meta(torch.device("cpu")) == {}
    monkeypatch.setattr(dec, "PDL_LAUNCH", False)
    assert pdl_meta(torch.device("cuda", 0)) == {}


@needs_kernel
@needs_pdl_gpu
@pytest.mark.parametrize("kv", ["bf16", "int8"])
def test_pdl_launches_equal_the_plain_ones(kv, monkeypatch, request):
    g = node_generator(request)
    B, H, Hkv, N, D = 3, 16, 4, 3000, 128
    q = torch.randn(B, H, 1, D, generator=g).to(torch.bfloat16).to(DEV)
    k = torch.randn(B, Hkv, N, D, generator=g).to(torch.bfloat16).to(DEV)
    v = torch.randn(B, Hkv, N, D, generator=g).to(torch.bfloat16).to(DEV)
    sl = torch.tensor([3000, 1, 1777], dtype=torch.int32, device=DEV)
    ks = vs = None
    if kv == "int8":
        (k, ks), (v, vs) = quantize(k, "int8"), quantize(v, "int8")
    summ = page_summaries(k, 64, seqlens=sl) if kv == "bf16" else None  # sparse decode: float caches

    def run():
        d = decode_attention(q, k, v, k_scale=ks, v_scale=vs, seqlens=sl, return_lse=True, backend="triton")
        s = None
        if summ is not None:
            s = sparse_decode_attention(q, k, v, summ, seqlens=sl, top_pages=0.1, backend="triton",
                                        return_pages=True)
        torch.cuda.synchronize()
        return d, s

    monkeypatch.setattr(dec, "PDL_LAUNCH", False)
    d0, s0 = run()
    monkeypatch.setattr(dec, "PDL_LAUNCH", True)
    assert pdl_meta(q.device) == {"PDL": True, "launch_pdl": True}
    for _ in range(3):  # the same inputs again and again: any race would show as a changed bit
        d1, s1 = run()
        assert torch.equal(d1.out, d0.out) and torch.equal(d1.lse, d0.lse)
        if s0 is not None:
            assert torch.equal(s1[0], s0[0]) and torch.equal(s1[1][0], s0[1][0]) and torch.equal(s1[1][1], s0[1][1])
