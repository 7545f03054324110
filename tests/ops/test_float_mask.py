"""Additive float masks (0 attend, -inf masked, finite = bias): reference, kernel (HAS_FLOAT_MASK), attention()."""

from __future__ import annotations

import math

import pytest
import torch

from sparseattn import attention, reference_attention
from sparseattn.layout.patterns import random_layout
from sparseattn.ops.reference import sdpa_reference
from sparseattn.testing.tolerances import SDPA_FP64_ATOL, check_ratio

ON_GPU = torch.cuda.is_available()
DEV = "cuda" if ON_GPU else "cpu"


def _qkv(B, H, Hkv, Nq, Nkv, D, dtype, seed, dev=DEV):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype).to(dev)  # noqa: E731
    return r(B, H, Nq, D), r(B, Hkv, Nkv, D), r(B, Hkv, Nkv, D)


def _mask(shape, seed, p_inf=0.25, dev=DEV, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(*shape, generator=g) * 2
    m[torch.rand(*shape, generator=g) < p_inf] = -math.inf
    return m.to(dtype).to(dev)


@pytest.mark.parametrize("mshape", ["11", "B1", "1H", "BH"])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_reference_matches_sdpa_fp64(mshape, causal):
    B, H, Hkv, Nq, Nkv = 2, 4, 2, 33, 57
    q, k, v = _qkv(B, H, Hkv, Nq, Nkv, 8, torch.float64, 1, dev="cpu")
    shape = (B if mshape[0] == "B" else 1, H if mshape[1] == "H" else 1, Nq, Nkv)
    mask = _mask(shape, 2, dev="cpu", dtype=torch.float64)
    mask[..., 3, :] = -math.inf  # a fully masked row
    lay = random_layout(Nq, Nkv, density=0.7, seed=1, block_m=16, block_n=16, batch=B, heads=H, causal=causal)
    for layout in (None, lay):
        ref = reference_attention(q, k, v, causal=causal, layout=layout, attn_mask=mask, chunk_size=16)
        sd = sdpa_reference(q, k, v, causal=causal, layout=layout, attn_mask=mask)
        assert float((ref.out - sd).abs().max()) <= SDPA_FP64_ATOL
        assert bool((ref.lse[..., 3] == -math.inf).all()) and bool((ref.out[..., 3, :] == 0).all())


def test_zero_mask_is_no_mask_and_bias_shifts():
    q, k, v = _qkv(1, 2, 1, 20, 30, 8, torch.float64, 3, dev="cpu")
    plain = reference_attention(q, k, v, causal=True)
    zero = reference_attention(q, k, v, causal=True, attn_mask=torch.zeros(1, 1, 20, 30, dtype=torch.float64))
    assert torch.equal(plain.out, zero.out)
    const = reference_attention(q, k, v, causal=True, attn_mask=torch.full((1, 1, 20, 30), 1.5, dtype=torch.float64))
    assert float((const.out - plain.out).abs().max()) <= SDPA_FP64_ATOL  # a constant bias cancels in softmax
    assert float((const.lse - plain.lse - 1.5).abs().max()) <= SDPA_FP64_ATOL


triton = pytest.importorskip("triton", reason="triton is not installed")
if not ON_GPU:
    from sparseattn.ops.triton_launch import interpret_mode

    _interp = interpret_mode()
else:
    _interp = True
needs_kernel = pytest.mark.skipif(not _interp, reason="no CUDA and TRITON_INTERPRET is not set")


def _check_kernel(q, k, v, mask, layout, causal, **kw):
    from sparseattn.ops.triton_launch import block_sparse_fwd

    out, lse = block_sparse_fwd(q, k, v, layout=layout, causal=causal, attn_mask=mask, **kw)
    hi_dt = torch.float32 if ON_GPU else torch.float64
    hi = reference_attention(q.to(hi_dt), k.to(hi_dt), v.to(hi_dt), layout=layout, causal=causal,
                             attn_mask=mask.to(hi_dt), sliding_window=kw.get("sliding_window"))
    lo = reference_attention(q, k, v, layout=layout, causal=causal, attn_mask=mask, upcast=False,
                             sliding_window=kw.get("sliding_window"))
    check_ratio(out, hi.out, lo.out, "out")
    check_ratio(lse, hi.lse, lo.lse, "lse")
    return out, lse


@needs_kernel
@pytest.mark.parametrize("mshape", ["11", "B1", "1H", "BH"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_kernel_mask_broadcast(mshape, dtype):
    B, H, Hkv, Nq, Nkv = 2, 4, 2, 90, 150
    q, k, v = _qkv(B, H, Hkv, Nq, Nkv, 64, dtype, 4)
    shape = (B if mshape[0] == "B" else 1, H if mshape[1] == "H" else 1, Nq, Nkv)
    mask = _mask(shape, 5)
    mask[..., 7, :] = -math.inf
    out, lse = _check_kernel(q, k, v, mask, None, causal=False)
    assert bool((lse[..., 7] == -math.inf).all()) and bool((out[..., 7, :] == 0).all())


@needs_kernel
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_kernel_mask_with_layout_causal_window(causal):
    B, H, Hkv, Nq, Nkv = 1, 2, 1, 130, 200
    q, k, v = _qkv(B, H, Hkv, Nq, Nkv, 64, torch.float16, 6)
    lay = random_layout(Nq, Nkv, density=0.6, seed=2, block_m=64, block_n=64, heads=H, causal=causal, device=DEV)
    mask = _mask((1, H, Nq, Nkv), 7, dtype=torch.float16)
    _check_kernel(q, k, v, mask, lay, causal)
    if causal:
        _check_kernel(q, k, v, mask, lay, causal, sliding_window=90)
    # a non-contiguous mask (transposed storage) is read through its strides
    mt = mask.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not mt.is_contiguous()
    _check_kernel(q, k, v, mt, lay, causal)


@needs_kernel
def test_attention_dispatch_with_mask():
    q, k, v = _qkv(1, 2, 2, 64, 96, 64, torch.float16, 8)
    mask = _mask((1, 1, 64, 96), 9)
    a = attention(q, k, v, causal=True, attn_mask=mask, backend="triton")
    b = attention(q, k, v, causal=True, attn_mask=mask, backend="reference")
    hi = reference_attention(q.double(), k.double(), v.double(), causal=True, attn_mask=mask.double())
    lo = reference_attention(q, k, v, causal=True, attn_mask=mask, upcast=False)
    check_ratio(a.out, hi.out, lo.out, "out")
    check_ratio(b.out, hi.out, lo.out, "out (reference backend)")


def test_bad_masks():
    q, k, v = _qkv(2, 4, 2, 10, 12, 8, torch.float32, 10, dev="cpu")
    with pytest.raises(ValueError, match=r"attention: attn_mask has the wrong shape; expected \(B\|1, H\|1, N_q, N_kv\)"):
        attention(q, k, v, attn_mask=torch.zeros(2, 4, 10, 11))
    with pytest.raises(ValueError, match="attn_mask has the wrong shape"):
        attention(q, k, v, attn_mask=torch.zeros(3, 1, 10, 12))
    with pytest.raises(ValueError, match="attn_mask has the wrong shape"):
        reference_attention(q, k, v, attn_mask=torch.zeros(10, 12))
    with pytest.raises(ValueError, match="attn_mask must be an additive float mask"):
        attention(q, k, v, attn_mask=torch.ones(1, 1, 10, 12, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask must be a torch.Tensor or None"):
        reference_attention(q, k, v, attn_mask=[[0.0]])
