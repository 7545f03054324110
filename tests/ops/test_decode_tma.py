"""The decode kernel's K/V tiles through tensor descriptors (launch-config ``TMA``; issue 14).

With ``TMA`` the split kernel reads each K/V tile as one box of a descriptor that ends at the sequence's length: rows
at or past it come back zero-filled (as the masked pointer loads fill them) and are never read, and the paged kernel
reads one box per tile inside one page (page sizes that are multiples of ``BLOCK_N``). So the output must equal the
pointer launch's bit for bit (on the GPU) on every input, garbage beyond the lengths and bad page indices included. Under
Triton's CPU interpreter without CUDA; on an sm_90+ GPU the real descriptors.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from sparseattn.ops.decode import decode_attention, decode_reference, decode_tma_refusal, paged_decode_attention
from sparseattn.ops.launch_configs import DecodeLaunchConfig
from sparseattn.ops.triton_launch import _triton_has_descriptors
from sparseattn.state.kv_cache import quantize
from sparseattn.testing.harness import kernel_unavailable, node_generator
from sparseattn.testing.tolerances import check_ratio

ON_GPU = torch.cuda.is_available()
DEV = "cuda" if ON_GPU else "cpu"
_TMA_GPU = (not ON_GPU) or torch.cuda.get_device_capability() >= (9, 0)
needs_kernel = pytest.mark.skipif(kernel_unavailable() is not None, reason=str(kernel_unavailable()))
needs_tma = pytest.mark.skipif(not (_TMA_GPU and _triton_has_descriptors()),
                               reason="tensor descriptors need sm_90+ and a Triton that has them")


def _cfg(tma: bool, bn: int = 32, **kw):
    return {"BLOCK_N": bn, "num_warps": 4, "num_stages": 1, "TMA": tma, **kw}


def _same(a, b):
    """Bit for bit, NaN where NaN, on the GPU. Under the interpreter a tile read through a descriptor is a transposed
    view, and numpy's fp32 matmul may sum it in another order: there the last bit of a score may differ."""
    assert a.out.dtype == b.out.dtype
    assert torch.equal(torch.isnan(a.out), torch.isnan(b.out))
    assert torch.equal(torch.isnan(a.lse), torch.isnan(b.lse))
    if ON_GPU:
        assert torch.equal(torch.nan_to_num(a.out), torch.nan_to_num(b.out))
        assert torch.equal(torch.nan_to_num(a.lse), torch.nan_to_num(b.lse))
    else:
        torch.testing.assert_close(a.out, b.out, rtol=2e-6, atol=2e-6, equal_nan=True)
        torch.testing.assert_close(a.lse, b.lse, rtol=2e-6, atol=2e-6, equal_nan=True)


CASES = [
    # B, H, Hkv, Lq, N, D, lens, splits, causal
    (2, 8, 2, 1, 130, 64, [130, 37], 3, True),  # GQA 4, different lengths, a partial last tile
    (3, 4, 1, 4, 161, 64, [0, 1, 161], 2, True),  # empty / one-key sequences, Lq 4
    (2, 8, 2, 4, 96, 128, [96, 64], 1, False),  # D 128, one split, non-causal, lengths on tile boundaries
    (1, 2, 2, 3, 200, 64, None, 4, True),  # no seqlens, MHA, Lq 3
]


def _case_id(c):
    return f"B{c[0]}H{c[1]}kv{c[2]}Lq{c[3]}N{c[4]}D{c[5]}s{c[7]}{'' if c[8] else '-noncausal'}"


@needs_kernel
@needs_tma
@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_tma_equals_the_pointer_launch_and_passes_the_reference(case, dtype, request):
    B, H, Hkv, Lq, N, D, lens, splits, causal = case
    g = node_generator(request)
    q = torch.randn(B, H, Lq, D, generator=g).to(dtype).to(DEV)
    k = torch.randn(B, Hkv, N, D, generator=g).to(dtype).to(DEV)
    v = torch.randn(B, Hkv, N, D, generator=g).to(dtype).to(DEV)
    sl = None if lens is None else torch.tensor(lens, dtype=torch.int32, device=DEV)
    kw = dict(seqlens=sl, num_splits=splits, causal=causal, return_lse=True, backend="triton")
    ptr = decode_attention(q, k, v, config=_cfg(False), **kw)
    tma = decode_attention(q, k, v, config=_cfg(True), **kw)
    _same(tma, ptr)
    hd = torch.float32 if ON_GPU else torch.float64
    hi = decode_reference(q.to(hd), k.to(hd), v.to(hd), seqlens=sl, causal=causal)
    lo = decode_reference(q, k, v, seqlens=sl, causal=causal, upcast=False)
    check_ratio(tma.out, hi.out, lo.out, "out")


@needs_kernel
@needs_tma
@pytest.mark.parametrize("variant", [None, "fp16"], ids=["dequant", "qk-fp16"])
def test_tma_equals_the_pointer_launch_on_an_int8_cache(variant, request):
    g = node_generator(request)
    q = torch.randn(3, 8, 2, 64, generator=g).to(torch.bfloat16).to(DEV)
    kq, ks = quantize(torch.randn(3, 2, 150, 64, generator=g) * 1.5, "int8")
    vq, vs = quantize(torch.randn(3, 2, 150, 64, generator=g) + 0.5, "int8")
    kq, ks, vq, vs = (t.to(DEV) for t in (kq, ks, vq, vs))
    extra = {} if variant is None else {"QK": variant}
    sl = torch.tensor([150, 0, 97], dtype=torch.int32, device=DEV)
    kw = dict(k_scale=ks, v_scale=vs, seqlens=sl, num_splits=2, return_lse=True, backend="triton")
    _same(decode_attention(q, kq, vq, config=_cfg(True, **extra), **kw),
          decode_attention(q, kq, vq, config=_cfg(False, **extra), **kw))


@needs_kernel
@needs_tma
def test_tma_never_reads_beyond_seqlen_and_keeps_nan_inside(request):
    """NaN / inf beyond each length never reaches the output; a NaN key inside the sequence makes its KV group's
    rows NaN, as in the pointer launch."""
    g = node_generator(request)
    lens = [0, 33, 96, 70]
    q = torch.randn(4, 4, 2, 64, generator=g).to(torch.float16).to(DEV)
    k = torch.randn(4, 2, 96, 64, generator=g).to(torch.float16).to(DEV)
    v = torch.randn(4, 2, 96, 64, generator=g).to(torch.float16).to(DEV)
    sl = torch.tensor(lens, dtype=torch.int32, device=DEV)
    kw = dict(seqlens=sl, num_splits=3, return_lse=True, backend="triton", config=_cfg(True))
    clean = decode_attention(q, k, v, **kw)
    k2, v2 = k.clone(), v.clone()
    for b, n in enumerate(lens):
        k2[b, :, n:] = float("nan")
        v2[b, :, n:] = float("inf")
    dirty = decode_attention(q, k2, v2, **kw)
    assert torch.equal(dirty.out, clean.out) and torch.equal(dirty.lse, clean.lse)
    assert not bool(torch.isnan(dirty.out).any())
    k3 = k.clone()
    k3[2, 1, 5] = float("nan")
    _same(decode_attention(q, k3, v, **kw), decode_attention(q, k3, v, **dict(kw, config=_cfg(False))))
    assert bool(torch.isnan(decode_attention(q, k3, v, **kw).out[2, 2:]).all())


@needs_kernel
@needs_tma
@pytest.mark.parametrize("mode", [None, "int8"])
def test_tma_paged_equals_the_pointer_launch_with_bad_pages_and_garbage(mode, request):
    """Pages of 64 keys read as 32-key boxes: listed pages partly or wholly past the length, a negative index and
    one far beyond the cache read nothing; garbage past the lengths never reaches the output."""
    g = node_generator(request)
    N, D = 300, 64
    q = torch.randn(2, 4, 1, D, generator=g).to(torch.bfloat16).to(DEV)
    k = torch.randn(2, 2, N, D, generator=g)
    v = torch.randn(2, 2, N, D, generator=g)
    lens = [300, 150]
    if mode is None:
        k, v = k.to(torch.bfloat16), v.to(torch.bfloat16)
        for b, n in enumerate(lens):
            k[b, :, n:] = float("nan")
            v[b, :, n:] = float("inf")
        ks = vs = None
    else:
        (k, ks), (v, vs) = quantize(k, mode), quantize(v, mode)
        for b, n in enumerate(lens):
            ks[b, :, n:] = float("nan")
            vs[b, :, n:] = float("inf")
        ks, vs = ks.to(DEV), vs.to(DEV)
    k, v = k.to(DEV), v.to(DEV)
    pidx = torch.tensor([[[4, 0, 2, -1], [1, 3, 40, 0]], [[2, 0, 3, 1], [1, 2, 4, 0]]], dtype=torch.int32, device=DEV)
    pnum = torch.tensor([[4, 3], [4, 3]], dtype=torch.int32, device=DEV)
    sl = torch.tensor(lens, dtype=torch.int32, device=DEV)
    kw = dict(page_size=64, seqlens=sl, num_splits=2, return_lse=True, backend="triton", k_scale=ks, v_scale=vs)
    tma = paged_decode_attention(q, k, v, pidx, pnum, config=_cfg(True), **kw)
    _same(tma, paged_decode_attention(q, k, v, pidx, pnum, config=_cfg(False), **kw))
    assert not bool(torch.isnan(tma.out).any())


@needs_kernel
def test_tma_config_round_trip_refusals_and_the_tuned_fallback(monkeypatch):
    c = DecodeLaunchConfig(128, 4, 2, tma=True)
    assert c.to_dict() == {"BLOCK_N": 128, "num_warps": 4, "num_stages": 2, "TMA": True}
    assert DecodeLaunchConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="DecodeLaunchConfig: tma must be a bool or None"):
        DecodeLaunchConfig(128, 4, 3, tma="yes")
    q = torch.zeros(1, 2, 1, 64, device=DEV, dtype=torch.float16)
    k = torch.zeros(1, 2, 64, 64, device=DEV, dtype=torch.float16)
    with pytest.raises(ValueError, match="decode_attention: config has a bad TMA"):
        decode_attention(q, k, k, backend="triton", config=_cfg(1))
    # a page size that is not a multiple of BLOCK_N: refused by name for an explicit config
    pidx = torch.zeros(1, 2, 1, dtype=torch.int32, device=DEV)
    pnum = torch.ones(1, 2, dtype=torch.int32, device=DEV)
    assert decode_tma_refusal(q, k, k, 16, 32) == "page_size 16 is not a multiple of BLOCK_N 32"
    if _triton_has_descriptors() and _TMA_GPU:
        with pytest.raises(NotImplementedError, match="paged_decode_attention: config asks for TMA loads.*page_size 16"):
            paged_decode_attention(q, k, k, pidx, pnum, page_size=16, backend="triton", config=_cfg(True))
    # misaligned K rows (a 1-element offset view): refused with the reason
    kk = torch.zeros(1, 2, 65, 64, device=DEV, dtype=torch.float16).flatten()[1:1 + 2 * 64 * 64].view(1, 2, 64, 64)
    assert "16-byte aligned" in decode_tma_refusal(q, kk, kk, None, 32)
    # a tuned entry with TMA that a call cannot use: pointer loads and one warning naming the reason
    import sparseattn.ops.decode as dec

    monkeypatch.setattr(dec, "_default_config", lambda *a, **kw: _cfg(True))
    monkeypatch.setattr(dec, "_TMA_WARNED", set())
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = dec.paged_decode_attention(q, k, k, pidx, pnum, page_size=16, backend="triton")
        dec.paged_decode_attention(q, k, k, pidx, pnum, page_size=16, backend="triton")
    msgs = [str(w.message) for w in rec if "TMA" in str(w.message)]
    assert len(msgs) == 1 and "page_size 16 is not a multiple of BLOCK_N 32" in msgs[0]
    assert torch.isfinite(out).all()
