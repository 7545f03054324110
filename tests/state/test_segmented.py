"""State in the kernel: carrying the raw (m, l, acc) state over key segments equals one call.

Bitwise at key-block-aligned segment boundaries (the kernel visits the same tiles in the same order
with the same arithmetic); the PyTorch carry (``reference_attention_carry``) is checked with the ratio
rule against the float64 reference. Runs the kernel under TRITON_INTERPRET on the CPU (tests/conftest.py).
"""

from __future__ import annotations

import math

import pytest
import torch

from sparseattn import reference_attention
from sparseattn.layout.block_layout import BlockLayout
from sparseattn.layout.patterns import random_layout
from sparseattn.ops.reference import reference_attention_carry
from sparseattn.state import (AttentionState, RawState, attention_over_segments, attention_with_state,
                              segmented_attention)
from sparseattn.testing.harness import kernel_unavailable
from sparseattn.testing.tolerances import LSE_ATOL, MERGE_FP64_ATOL, check_ratio

pytest.importorskip("triton", reason="triton is not installed")
ON_GPU = torch.cuda.is_available()
DEV = "cuda" if ON_GPU else "cpu"
if kernel_unavailable() is not None:
    pytest.skip(kernel_unavailable(), allow_module_level=True)

CFG = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 1}


def _qkv(B, H, Hkv, Nq, Nkv, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype).to(DEV)  # noqa: E731
    return r(B, H, Nq, D), r(B, Hkv, Nkv, D), r(B, Hkv, Nkv, D)


def _fwd(*a, **kw):
    from sparseattn.ops.triton_launch import block_sparse_fwd

    return block_sparse_fwd(*a, **kw)


def _slice_layout(lay: BlockLayout, a: int, b: int) -> BlockLayout:
    """The layout's columns for keys ``a:b`` (``a`` a multiple of block_n)."""
    bn = lay.block_n
    dm = lay.to_dense_mask()[..., a // bn: -(-b // bn)].contiguous()
    return BlockLayout.from_dense_mask(dm, block_m=lay.block_m, block_n=bn, seqlen_q=lay.seqlen_q, seqlen_kv=b - a)


def _segments(k, v, cuts):
    return [k[:, :, a:b] for a, b in zip(cuts[:-1], cuts[1:])], [v[:, :, a:b] for a, b in zip(cuts[:-1], cuts[1:])]


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_dense_carry_is_bitwise(causal, dtype):
    q, k, v = _qkv(1, 4, 2, 100, 384, 64, dtype, seed=1)  # GQA 2, N_q not a block multiple
    whole = _fwd(q, k, v, layout=None, causal=causal, config=CFG)
    cuts = [0, 128, 256, 384]  # layout=None: 128-key blocks
    ks, vs = _segments(k, v, cuts)
    seg = attention_over_segments(q, ks, vs, causal=causal, backend="triton", config=CFG)
    assert torch.equal(seg.out, whole.out) and torch.equal(seg.lse, whole.lse)
    hi = reference_attention(q.double(), k.double(), v.double(), causal=causal)
    lo = reference_attention(q, k, v, causal=causal, upcast=False)
    check_ratio(seg.out, hi.out, lo.out, "out")


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_layout_per_segment_with_mask_is_bitwise(causal):
    B, H, Hkv, Nq, Nkv, D = 1, 2, 1, 130, 320, 64
    q, k, v = _qkv(B, H, Hkv, Nq, Nkv, D, torch.float16, seed=2)
    lay = random_layout(Nq, Nkv, density=0.6, seed=4, block_m=64, block_n=64, heads=H, causal=causal, device=DEV)
    g = torch.Generator().manual_seed(5)
    mask = torch.randn(1, H, Nq, Nkv, generator=g)
    mask[torch.rand(1, H, Nq, Nkv, generator=g) < 0.2] = -math.inf
    mask = mask.to(DEV)
    whole = _fwd(q, k, v, layout=lay, causal=causal, attn_mask=mask, config=CFG)
    cuts = [0, 64, 192, 320]
    ks, vs = _segments(k, v, cuts)
    lays = [_slice_layout(lay, a, b) for a, b in zip(cuts[:-1], cuts[1:])]
    masks = [mask[..., a:b] for a, b in zip(cuts[:-1], cuts[1:])]
    seg = attention_over_segments(q, ks, vs, causal=causal, layouts=lays, attn_masks=masks, backend="triton",
                                  config=CFG)
    assert torch.equal(seg.out, whole.out) and torch.equal(seg.lse, whole.lse)
    # and the state path with no incoming state gives the plain kernel's result
    plain = _fwd(q, k, v, layout=lay, causal=causal, attn_mask=mask, config=CFG)
    st, raw = _fwd(q, k, v, layout=lay, causal=causal, attn_mask=mask, config=CFG, return_state=True)
    assert torch.equal(st.out, plain.out) and torch.equal(st.lse, plain.lse)
    assert raw.m.dtype == raw.l.dtype == raw.acc.dtype == torch.float32


def test_chunked_prefill_is_bitwise():
    """A chunk of 64 new queries over 192 cached keys plus its own 64 keys (causal, bottom-right)."""
    q, k, v = _qkv(1, 2, 2, 64, 256, 64, torch.float16, seed=3)
    lay = random_layout(64, 256, density=1.0, seed=0, block_m=64, block_n=64, heads=2, causal=True, device=DEV)
    whole = _fwd(q, k, v, layout=lay, causal=True, config=CFG)
    cache = attention_with_state(q, k[:, :, :192], v[:, :, :192], kv_offset=0, kv_len=256, causal=True,
                                 layout=_slice_layout(lay, 0, 192), backend="triton", config=CFG)
    last = attention_with_state(q, k[:, :, 192:], v[:, :, 192:], state=cache.state, kv_offset=192, causal=True,
                                layout=_slice_layout(lay, 192, 256), backend="triton", config=CFG)
    assert torch.equal(last.out, whole.out) and torch.equal(last.lse, whole.lse)
    hi = reference_attention(q.double(), k.double(), v.double(), causal=True)
    lo = reference_attention(q, k, v, causal=True, upcast=False)
    check_ratio(last.out, hi.out, lo.out, "out")
    check_ratio(last.lse, hi.lse, lo.lse, "lse")


def test_sliding_window_carry_is_bitwise():
    q, k, v = _qkv(1, 2, 1, 64, 256, 64, torch.float16, seed=6)
    whole, _ = _fwd(q, k, v, layout=None, causal=True, sliding_window=100, config=CFG, return_state=True)
    ks, vs = _segments(k, v, [0, 128, 256])
    seg = attention_over_segments(q, ks, vs, causal=True, sliding_window=100, backend="triton", config=CFG)
    assert torch.equal(seg.out, whole.out) and torch.equal(seg.lse, whole.lse)
    hi = reference_attention(q.double(), k.double(), v.double(), causal=True, sliding_window=100)
    lo = reference_attention(q, k, v, causal=True, sliding_window=100, upcast=False)
    check_ratio(seg.out, hi.out, lo.out, "out")


def test_kernel_carry_matches_torch_carry():
    q, k, v = _qkv(2, 2, 1, 70, 256, 64, torch.float16, seed=7)
    ks, vs = _segments(k, v, [0, 128, 256])
    kern = attention_over_segments(q, ks, vs, causal=True, backend="triton", config=CFG)
    ref = attention_over_segments(q.double(), [x.double() for x in ks], [x.double() for x in vs], causal=True,
                                  backend="reference")
    lo = reference_attention(q, k, v, causal=True, upcast=False)
    check_ratio(kern.out, ref.out, lo.out, "out")
    check_ratio(kern.lse, ref.lse, lo.lse, "lse")
    # raw states agree as functions: finalize() of the carried state is the result
    fin = kern.state.finalize(q.dtype)
    assert torch.equal(fin.out, kern.out)
    assert float((fin.lse - kern.lse).abs().max()) <= LSE_ATOL[torch.float32]  # torch's log2 vs the kernel's: an ulp


def test_torch_carry_bitwise_and_exact_fp64():
    q, k, v = (t.cpu() for t in _qkv(1, 3, 1, 40, 200, 16, torch.float64, seed=8))
    whole, raw_whole = reference_attention_carry(q, k, v, causal=True, block_n=40)
    st = None
    pos = 0
    for a, b in ((0, 80), (80, 120), (120, 200)):
        res, st = reference_attention_carry(q, k[:, :, a:b], v[:, :, a:b], state=st, kv_offset=a, kv_len=200,
                                            causal=True, block_n=40)
        pos = b
    assert pos == 200 and torch.equal(res.out, whole.out) and torch.equal(st.acc, raw_whole.acc)
    ref = reference_attention(q, k, v, causal=True)
    assert float((res.out - ref.out).abs().max()) <= MERGE_FP64_ATOL
    assert float((res.lse - ref.lse).abs().max()) <= MERGE_FP64_ATOL


def test_attention_state_in_and_causal_segmented_attention():
    q, k, v = (t.cpu() for t in _qkv(1, 2, 2, 30, 90, 8, torch.float64, seed=9))
    ref = reference_attention(q, k, v, causal=True)
    first = reference_attention(q, k[:, :, :50], v[:, :, :50], causal=False)  # keys 0..49 are visible to every row
    last = attention_with_state(q, k[:, :, 50:], v[:, :, 50:], state=AttentionState(*first), kv_offset=50,
                                causal=True, backend="reference")
    assert float((last.out - ref.out).abs().max()) <= MERGE_FP64_ATOL
    seg = segmented_attention(q, [k[:, :, :20], k[:, :, 20:71], k[:, :, 71:]],
                              [v[:, :, :20], v[:, :, 20:71], v[:, :, 71:]], causal=True, backend="reference")
    assert float((seg.out - ref.out).abs().max()) <= MERGE_FP64_ATOL
    assert float((seg.lse - ref.lse).abs().max()) <= MERGE_FP64_ATOL


def test_empty_rows_carry():
    """Rows that see no key in any segment: out 0, lse -inf; rows that saw keys earlier keep them."""
    q, k, v = _qkv(1, 1, 1, 64, 128, 64, torch.float16, seed=10)
    mask = torch.zeros(1, 1, 64, 128, device=DEV)
    mask[:, :, :5] = -math.inf  # rows 0..4 fully masked
    res = attention_over_segments(q, [k[:, :, :64], k[:, :, 64:]], [v[:, :, :64], v[:, :, 64:]],
                                  attn_masks=[mask[..., :64], mask[..., 64:]], backend="triton", config=CFG)
    assert bool((res.lse[0, 0, :5] == -math.inf).all()) and bool((res.out[0, 0, :5] == 0).all())
    assert bool(torch.isfinite(res.lse[0, 0, 5:]).all())


def test_bad_states_and_segments():
    q, k, v = _qkv(1, 2, 1, 64, 128, 64, torch.float16, seed=11)
    good = RawState.empty(1, 2, 64, 64, device=DEV)
    with pytest.raises(ValueError, match=r"block_sparse_fwd: state_in.m has the wrong shape; expected \(1, 2, 64\)"):
        _fwd(q, k, v, layout=None, state_in=RawState(good.m[:, :1], good.l, good.acc), return_state=True)
    with pytest.raises(ValueError, match="state_in.acc has the wrong dtype; expected float32, got float16"):
        _fwd(q, k, v, layout=None, state_in=RawState(good.m, good.l, good.acc.half()), return_state=True)
    with pytest.raises(ValueError, match="segment runs past the end of the cache"):
        _fwd(q, k, v, layout=None, kv_offset=10, kv_len=100, return_state=True)
    with pytest.raises(ValueError, match="segment runs past the end of the cache"):
        attention_with_state(q, k, v, kv_offset=0, kv_len=64, backend="reference")
    with pytest.raises(ValueError, match="pv_threshold is not supported on the state path"):
        lay = random_layout(64, 128, density=1.0, heads=2, device=DEV)
        _fwd(q, k, v, layout=lay, pv_threshold=1.0, return_state=True)
    with pytest.raises(ValueError, match="attention_with_state: state has the wrong shape"):
        attention_with_state(q, k, v, state=AttentionState(q[:, :, :3], q.new_zeros(1, 2, 3, dtype=torch.float32)),
                             backend="reference")
    with pytest.raises(ValueError, match="attention_with_state: state must be None, an AttentionState"):
        attention_with_state(q, k, v, state="nope", backend="reference")
    with pytest.raises(ValueError, match="kv_offset must be a non-negative integer"):
        attention_with_state(q, k, v, kv_offset=-1, backend="reference")
    with pytest.raises(ValueError, match="reference_attention_carry: state.l has the wrong dtype"):
        attention_with_state(q, k, v, state=RawState(good.m, good.l.double(), good.acc), backend="reference")


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_quantized_segment_dequantised_in_kernel(mode):
    """Old tokens int8/fp8 (+ per-key scales) dequantised by the kernel, carried into a recent fp16 segment."""
    from sparseattn.state.kv_cache import dequantize, quantize

    q, k, v = _qkv(1, 4, 2, 64, 320, 64, torch.float16, seed=12)
    kq, ks = quantize(k[:, :, :192], mode)
    vq, vs = quantize(v[:, :, :192], mode)
    kd, vd = dequantize(kq, ks, torch.float16), dequantize(vq, vs, torch.float16)
    k_full, v_full = torch.cat([kd, k[:, :, 192:]], 2), torch.cat([vd, v[:, :, 192:]], 2)
    mask = torch.zeros(1, 1, 64, 320, device=DEV)
    mask[..., 5:40] = -math.inf
    for backend in ("triton", "reference"):
        res = attention_over_segments(q, [kq, k[:, :, 192:]], [vq, v[:, :, 192:]], causal=True,
                                      attn_masks=[mask[..., :192], mask[..., 192:]],
                                      kv_scales=[(ks, vs), None], backend=backend, config=CFG)
        hi = reference_attention(q.double(), k_full.double(), v_full.double(), causal=True, attn_mask=mask.double())
        lo = reference_attention(q, k_full, v_full, causal=True, attn_mask=mask, upcast=False)
        check_ratio(res.out, hi.out, lo.out, f"out ({backend})")
        check_ratio(res.lse, hi.lse, lo.lse, f"lse ({backend})")


def test_bad_kv_scales():
    from sparseattn.state.kv_cache import quantize

    q, k, v = _qkv(1, 2, 1, 64, 128, 64, torch.float16, seed=13)
    kq, ks = quantize(k, "int8")
    vq, vs = quantize(v, "int8")
    with pytest.raises(ValueError, match="k_scale/v_scale must be given together"):
        _fwd(q, kq, vq, layout=None, k_scale=ks)
    with pytest.raises(ValueError, match="k must hold quantized values with k_scale/v_scale"):
        _fwd(q, k, v, layout=None, k_scale=ks, v_scale=vs)
    with pytest.raises(ValueError, match="v_scale does not match the quantized tensor"):
        _fwd(q, kq, vq, layout=None, k_scale=ks, v_scale=vs[:, :, :5])
    with pytest.raises(ValueError, match="k_scale must be a float32 tensor"):
        attention_with_state(q, kq, vq, k_scale=ks.half(), v_scale=vs, backend="reference")
    with pytest.raises(ValueError, match="cannot use TMA with quantized K/V"):
        _fwd(q, kq, vq, layout=None, k_scale=ks, v_scale=vs, config={**CFG, "USE_TMA": True})
