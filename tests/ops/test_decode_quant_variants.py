"""Variants of the quantized decode path (launch-config ``QK`` / ``PV``; issue 14).

Under Triton's CPU interpreter without CUDA (float8 e4m3 runs there too). The exact variants
(``QK`` in dequant / q8x2 / fp16, ``PV`` in dequant / fp16) are held to the quantized decode parity rule
of tests/test_decode_quant.py (the ratio rule against :func:`decode_reference` on the same quantized
cache); the lossy ones (``QK="q8"``: q itself quantized to 8 bits; ``PV="fp8"``: P in e4m3) to the
quantization-cost bounds of :mod:`sparseattn.testing.tolerances` (cosine and relative L1 against the
float32 reference), plus everything structural (masks, splits, garbage beyond the lengths, NaN rows).
"""

from __future__ import annotations

import zlib

import pytest
import torch

from sparseattn.ops.decode import decode_attention, decode_reference, paged_decode_attention, pages_key_mask
from sparseattn.ops.launch_configs import DECODE_PV_VARIANTS, DECODE_QK_VARIANTS, DecodeLaunchConfig
from sparseattn.state.kv_cache import quantize
from sparseattn.testing.tolerances import (
    DECODE_SPLITS_ATOL,
    QUANT_FP8_ZERO_MEAN_COS_MIN,
    QUANT_FP8_ZERO_MEAN_REL_L1_MAX,
    QUANT_INT8_COS_MIN,
    QUANT_INT8_REL_L1_MAX,
    check_ratio,
    quant_accuracy,
)

ON_GPU = torch.cuda.is_available()
DEV = "cuda" if ON_GPU else "cpu"
FP8_GPU_OK = (not ON_GPU) or torch.cuda.get_device_capability() >= (8, 9)


def _kernel_available() -> str | None:
    import importlib.util

    if importlib.util.find_spec("triton") is None:  # pragma: no cover
        return "triton is not installed"
    if not ON_GPU:
        from sparseattn.ops.triton_launch import interpret_mode

        if not interpret_mode():
            return "no CUDA and TRITON_INTERPRET is not set (tests/conftest.py sets it before triton is imported)"
    return None


needs_kernel = pytest.mark.skipif(_kernel_available() is not None, reason=str(_kernel_available()))

EXACT = [("q8x2", "dequant"), ("fp16", "dequant"), ("dequant", "fp16"), ("q8x2", "fp16"), ("fp16", "fp16"),
         ("dequant", "i8x2"), ("q8x2", "i8x2"), ("fp16", "fp16w")]
LOSSY = [("q8", "dequant", "int8"), ("q8", "fp16", "int8"), ("q8", "dequant", "fp8"), ("q8x2", "fp8", "fp8"),
         ("dequant", "fp8", "fp8"), ("q8x2", "dequant", "fp8")]


def _gen(request) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def _skip_fp8(mode, pv=None):
    if mode == "fp8" and pv in ("i8x2", "fp16w"):
        pytest.skip(f"PV={pv!r} is for int8 caches (a float8 cache is refused: "
                    "test_int8_pv_variant_refuses_a_float8_cache, test_word_loaded_v_refusals)")
    if mode == "fp8" and not FP8_GPU_OK:
        pytest.skip("float8 K/V need compute capability >= 8.9")


def _cfg(qk, pv, **kw):
    return {"BLOCK_N": 32, "num_warps": 4, "num_stages": 1, "QK": qk, "PV": pv, **kw}


def _quant_inputs(B, H, Hkv, Lq, N, D, dtype, mode, gen):
    q = torch.randn(B, H, Lq, D, generator=gen).to(dtype).to(DEV)
    k = torch.randn(B, Hkv, N, D, generator=gen) * 1.5
    v = torch.randn(B, Hkv, N, D, generator=gen) + 0.5
    kq, ks = quantize(k, mode)
    vq, vs = quantize(v, mode)
    return q, kq.to(DEV), vq.to(DEV), ks.to(DEV), vs.to(DEV)


def _lens(xs):
    return torch.tensor(xs, dtype=torch.int32, device=DEV)


def _refs(q, kq, vq, ks, vs, seqlens=None, causal=True, key_mask=None):
    hi_dtype = torch.float32 if ON_GPU else torch.float64
    hi = decode_reference(q.to(hi_dtype), kq, vq, k_scale=ks, v_scale=vs, seqlens=seqlens, causal=causal,
                          key_mask=key_mask)
    lo = decode_reference(q, kq, vq, k_scale=ks, v_scale=vs, seqlens=seqlens, causal=causal, key_mask=key_mask,
                          upcast=False)
    return hi, lo


def _check_exact(st, q, kq, vq, ks, vs, seqlens=None, causal=True, key_mask=None):
    hi, lo = _refs(q, kq, vq, ks, vs, seqlens, causal, key_mask)
    check_ratio(st.out, hi.out, lo.out, "out")
    check_ratio(st.lse, hi.lse.float(), lo.lse, "lse")


CASES = [
    # B, H, Hkv, Lq, N, D, lens, splits, causal
    (2, 8, 2, 1, 130, 64, [130, 37], 3, True),  # GQA 4, B > 1 with different lengths, splits
    (3, 4, 1, 4, 90, 64, [0, 1, 90], 2, True),  # empty / one-key sequences, Lq 4 (causal among new tokens)
    (2, 8, 2, 4, 70, 128, [70, 33], 1, False),  # D 128, one split (no merge), non-causal
]


def _case_id(c):
    return f"B{c[0]}H{c[1]}kv{c[2]}Lq{c[3]}N{c[4]}D{c[5]}s{c[7]}{'' if c[8] else '-noncausal'}"


@needs_kernel
@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("variant", EXACT, ids=lambda v: f"qk-{v[0]}_pv-{v[1]}")
@pytest.mark.parametrize("mode", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_exact_variants_match_reference(case, variant, mode, dtype, request):
    _skip_fp8(mode, variant[1])
    if mode == "fp8" and variant[0] == "q8x2" and dtype == torch.float16:
        # two e4m3 dots carry ~8 bits of q: bf16's precision, not fp16's (the lossy test covers it)
        pytest.skip("QK='q8x2' on a float8 cache is exact to bf16 q only")
    B, H, Hkv, Lq, N, D, lens, splits, causal = case
    q, kq, vq, ks, vs = _quant_inputs(B, H, Hkv, Lq, N, D, dtype, mode, _gen(request))
    sl = _lens(lens)
    st = decode_attention(q, kq, vq, k_scale=ks, v_scale=vs, seqlens=sl, num_splits=splits, causal=causal,
                          return_lse=True, backend="triton", config=_cfg(*variant))
    assert st.out.dtype == dtype and st.lse.dtype == torch.float32
    _check_exact(st, q, kq, vq, ks, vs, sl, causal)


@needs_kernel
@pytest.mark.parametrize("variant", LOSSY, ids=lambda v: f"{v[2]}_qk-{v[0]}_pv-{v[1]}")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_lossy_variants_within_quantization_bounds(variant, dtype, request):
    """8-bit q (QK="q8") or e4m3 P (PV="fp8"): within what quantization costs (the emulation bounds)."""
    qk, pv, mode = variant
    _skip_fp8(mode)
    q, kq, vq, ks, vs = _quant_inputs(2, 8, 2, 2, 150, 64, dtype, mode, _gen(request))
    sl = _lens([150, 0])
    st = decode_attention(q, kq, vq, k_scale=ks, v_scale=vs, seqlens=sl, num_splits=2, return_lse=True,
                          backend="triton", config=_cfg(qk, pv))
    hi, _ = _refs(q, kq, vq, ks, vs, sl)
    # structure exact: the empty sequence has out 0 and lse -inf, the other rows are finite
    assert torch.equal(torch.isfinite(st.lse), torch.isfinite(hi.lse))
    assert bool((st.out[1] == 0).all())
    cos, rel = quant_accuracy(st.out[0], hi.out[0])
    cos_min, rel_max = ((QUANT_INT8_COS_MIN, QUANT_INT8_REL_L1_MAX) if mode == "int8" and pv != "fp8"
                        else (QUANT_FP8_ZERO_MEAN_COS_MIN, QUANT_FP8_ZERO_MEAN_REL_L1_MAX))
    assert cos >= cos_min and rel <= rel_max, (cos, rel)


@needs_kernel
@pytest.mark.parametrize("variant", EXACT + [v[:2] for v in LOSSY if v[2] == "int8"], ids=lambda v: f"qk-{v[0]}_pv-{v[1]}")
@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_variant_splits_agree(variant, mode, request):
    _skip_fp8(mode, variant[1])
    q, kq, vq, ks, vs = _quant_inputs(2, 4, 2, 2, 150, 64, torch.float16, mode, _gen(request))
    sl = _lens([150, 61])
    run = [decode_attention(q, kq, vq, k_scale=ks, v_scale=vs, seqlens=sl, num_splits=s, return_lse=True,
                            backend="triton", config=_cfg(*variant)) for s in (1, 4)]
    assert torch.equal(torch.isfinite(run[0].lse), torch.isfinite(run[1].lse))
    assert float((run[0].out.double() - run[1].out.double()).abs().max()) <= DECODE_SPLITS_ATOL[torch.float16]


@needs_kernel
@pytest.mark.parametrize("variant", [("q8", "dequant"), ("q8x2", "fp16"), ("fp16", "fp16"), ("q8x2", "fp8"),
                                     ("q8x2", "i8x2")], ids=lambda v: f"qk-{v[0]}_pv-{v[1]}")
@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_variant_never_reads_beyond_seqlen(variant, mode, request):
    """NaN/inf scales and extreme or NaN values beyond each sequence's length never reach the output."""
    _skip_fp8(mode, variant[1])
    if variant[1] == "fp8" and mode == "int8":
        pytest.skip("PV='fp8' is for float8 caches")
    q, kq, vq, ks, vs = _quant_inputs(3, 4, 2, 2, 96, 64, torch.bfloat16, mode, _gen(request))
    lens = [0, 33, 96]
    sl = _lens(lens)
    kw = dict(seqlens=sl, num_splits=3, return_lse=True, backend="triton", config=_cfg(*variant))
    clean = decode_attention(q, kq, vq, k_scale=ks, v_scale=vs, **kw)
    kq2, vq2, ks2, vs2 = kq.clone(), vq.clone(), ks.clone(), vs.clone()
    for b, n in enumerate(lens):
        ks2[b, :, n:] = float("nan")
        vs2[b, :, n:] = float("inf")
        if mode == "fp8":
            kq2[b, :, n:] = float("nan")
            vq2[b, :, n:] = float("nan")
        else:
            kq2[b, :, n:] = -128
            vq2[b, :, n:] = 127
    dirty = decode_attention(q, kq2, vq2, k_scale=ks2, v_scale=vs2, **kw)
    assert torch.equal(dirty.out, clean.out) and torch.equal(dirty.lse, clean.lse)
    assert not bool(torch.isnan(dirty.out).any())


@needs_kernel
@pytest.mark.parametrize("qk", ["q8", "q8x2", "fp16"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nonfinite_query_row_is_nan_and_stays_in_its_row(qk, bad, request):
    """A NaN/inf in one query row makes that row NaN; the other rows of its KV group are unchanged."""
    q, kq, vq, ks, vs = _quant_inputs(1, 4, 1, 1, 80, 64, torch.float16, "int8", _gen(request))
    kw = dict(k_scale=ks, v_scale=vs, num_splits=2, return_lse=True, backend="triton", config=_cfg(qk, "dequant"))
    clean = decode_attention(q, kq, vq, **kw)
    q2 = q.clone()
    q2[0, 1, 0, 5] = bad
    st = decode_attention(q2, kq, vq, **kw)
    if bad != bad or qk != "fp16":  # fp16: an inf q value meets keys of both signs (NaN), or one sign (inf)
        assert bool(torch.isnan(st.out[0, 1]).all()) and bool(torch.isnan(st.lse[0, 1]).all())
    for h in (0, 2, 3):
        assert torch.equal(st.out[0, h], clean.out[0, h]) and torch.equal(st.lse[0, h], clean.lse[0, h])


@needs_kernel
@pytest.mark.parametrize("variant", [("q8x2", "fp16"), ("fp16", "dequant"), ("q8x2", "i8x2")],
                         ids=lambda v: f"qk-{v[0]}_pv-{v[1]}")
@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_paged_variant_matches_restricted_reference(variant, mode, request):
    _skip_fp8(mode, variant[1])
    q, kq, vq, ks, vs = _quant_inputs(2, 4, 2, 2, 120, 64, torch.float16, mode, _gen(request))
    sl = _lens([120, 50])
    ps = 8
    pidx = torch.tensor([[[14, 0, 3, 7], [1, 2, 14, 9]], [[6, 0, 2, 1], [3, 4, 5, 6]]], dtype=torch.int32,
                        device=DEV)
    pnum = torch.tensor([[4, 3], [2, 4]], dtype=torch.int32, device=DEV)
    st = paged_decode_attention(q, kq, vq, pidx, pnum, page_size=ps, seqlens=sl, k_scale=ks, v_scale=vs,
                                num_splits=2, return_lse=True, backend="triton", config=_cfg(*variant))
    _check_exact(st, q, kq, vq, ks, vs, sl, key_mask=pages_key_mask(pidx, pnum, ps, kq.shape[2]))


@needs_kernel
def test_block_m_floor_and_config_object(request):
    """``BLOCK_M`` (a row-tile floor) and a DecodeLaunchConfig with variants give the same numbers."""
    q, kq, vq, ks, vs = _quant_inputs(2, 8, 2, 1, 100, 64, torch.float16, "int8", _gen(request))
    sl = _lens([100, 40])
    cfg = DecodeLaunchConfig(32, 4, 1, qk="q8x2", pv="fp16", block_m=64)
    st = decode_attention(q, kq, vq, k_scale=ks, v_scale=vs, seqlens=sl, num_splits=2, return_lse=True,
                          backend="triton", config=cfg)
    _check_exact(st, q, kq, vq, ks, vs, sl)
    ref = decode_attention(q, kq, vq, k_scale=ks, v_scale=vs, seqlens=sl, num_splits=2, return_lse=True,
                           backend="triton", config=_cfg("q8x2", "fp16"))
    assert float((st.out.double() - ref.out.double()).abs().max()) <= DECODE_SPLITS_ATOL[torch.float16]


@needs_kernel
def test_variants_are_ignored_without_a_quantized_cache_or_with_fp32_q(request):
    g = _gen(request)
    q = torch.randn(1, 4, 1, 64, generator=g).half().to(DEV)
    k, v = (torch.randn(1, 2, 64, 64, generator=g).half().to(DEV) for _ in range(2))
    base = dict(backend="triton", num_splits=2, return_lse=True)
    plain = decode_attention(q, k, v, config=_cfg("dequant", "dequant"), **base)
    var = decode_attention(q, k, v, config=_cfg("q8", "fp16"), **base)
    assert torch.equal(plain.out, var.out) and torch.equal(plain.lse, var.lse)
    _, kq, vq, ks, vs = _quant_inputs(1, 4, 2, 1, 64, 64, torch.float16, "int8", g)
    q32 = q.float()
    a = decode_attention(q32, kq, vq, k_scale=ks, v_scale=vs, config=_cfg("dequant", "dequant"), **base)
    b = decode_attention(q32, kq, vq, k_scale=ks, v_scale=vs, config=_cfg("q8", "fp16"), **base)
    assert torch.equal(a.out, b.out) and torch.equal(a.lse, b.lse)


def test_bad_variant_configs_raise():
    q = torch.randn(1, 4, 1, 64).half().to(DEV)
    kq, ks = quantize(torch.randn(1, 2, 32, 64).to(DEV), "int8")
    kw = dict(k_scale=ks, v_scale=ks, backend="triton")
    base = {"BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
    for extra, msg in (({"QK": "int4"}, "decode_attention: config has an unknown QK variant"),
                       ({"PV": "bf8"}, "decode_attention: config has an unknown PV variant"),
                       ({"BLOCK_M": 24}, "decode_attention: config has a bad BLOCK_M"),
                       ({"PV": "fp8"}, "decode_attention: config asks for the fp8 P·V variant on an int8 cache"),
                       ({"PV": "i8x2", "BLOCK_N": 16}, "decode_attention: config has a BLOCK_N the int8 P·V variant"),
                       ({"PV": "i8x2", "BLOCK_N": 512}, "decode_attention: config has a BLOCK_N the int8 P·V variant"),
                       ({"XX": 1}, "decode_attention: config must name exactly the launch parameters")):
        if _kernel_available() is not None and "exactly" not in msg:
            continue
        with pytest.raises(ValueError, match="^" + msg):
            decode_attention(q, kq, kq, config={**base, **extra}, **kw)
    for kwargs, msg in ((dict(qk="int4"), "DecodeLaunchConfig: qk is not a known"),
                        (dict(pv="x"), "DecodeLaunchConfig: pv is not a known"),
                        (dict(block_m=128), "DecodeLaunchConfig: block_m is too large")):
        with pytest.raises(ValueError, match="^" + msg):
            DecodeLaunchConfig(64, 4, 2, **kwargs)


def test_int8_pv_variant_refuses_a_float8_cache():
    q = torch.randn(1, 4, 1, 64).half().to(DEV)
    kq, ks = quantize(torch.randn(1, 2, 32, 64), "fp8")
    with pytest.raises(ValueError, match="^decode_attention: config asks for the int8 P·V variant on a float8 cache"):
        decode_attention(q, kq.to(DEV), kq.to(DEV), k_scale=ks.to(DEV), v_scale=ks.to(DEV), backend="triton",
                         config=_cfg("dequant", "i8x2"))


@needs_kernel
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_int8_pv_variant_nonfinite_scale_is_nan_in_the_rows_that_attend_it(bad, request):
    """A NaN / inf value scale of an attended key makes exactly the rows that attend it NaN (the int8 P cannot
    carry it; it is not turned into a finite number); the other KV head's rows are unchanged."""
    q, kq, vq, ks, vs = _quant_inputs(1, 4, 2, 1, 80, 64, torch.bfloat16, "int8", _gen(request))
    kw = dict(k_scale=ks, num_splits=2, return_lse=True, backend="triton", config=_cfg("q8x2", "i8x2"))
    clean = decode_attention(q, kq, vq, v_scale=vs, **kw)
    vs2 = vs.clone()
    vs2[0, 0, 40] = bad
    st = decode_attention(q, kq, vq, v_scale=vs2, **kw)
    assert bool(torch.isnan(st.out[0, :2]).all())  # KV head 0's two query heads attend key 40
    assert torch.equal(st.out[0, 2:], clean.out[0, 2:]) and torch.equal(st.lse, clean.lse)


def test_launch_config_round_trip_with_variants():
    for c in (DecodeLaunchConfig(128, 4, 2), DecodeLaunchConfig(256, 8, 3, qk="q8x2", pv="fp16", block_m=32)):
        assert DecodeLaunchConfig.from_dict(c.to_dict()) == c
    assert DecodeLaunchConfig(128, 4, 2).to_dict() == {"BLOCK_N": 128, "num_warps": 4, "num_stages": 2}
    assert set(DECODE_QK_VARIANTS) >= {"dequant", "q8", "q8x2", "fp16"}
    assert set(DECODE_PV_VARIANTS) >= {"dequant", "fp16", "fp8", "i8x2", "fp16w"}
    with pytest.raises(ValueError, match="^DecodeLaunchConfig.from_dict: d must name exactly"):
        DecodeLaunchConfig.from_dict({"BLOCK_N": 64, "num_warps": 4})


@pytest.mark.skipif(not ON_GPU, reason="the byte-move conversion is inline PTX: CUDA only (the interpreter converts plainly)")
def test_fast_int8_to_fp16_is_exact_for_every_value():
    """``_i8_to_f16(x, FAST=True)`` (the QK='fp16' / PV='fp16' int8 path on a GPU) gives bitwise the fp16 value of
    every int8, in every position of its 4-value register."""
    import triton
    import triton.language as tl

    from sparseattn.ops.triton.decode import _i8_to_f16

    @triton.jit
    def _conv(X, Y, N: tl.constexpr):
        offs = tl.arange(0, N)
        tl.store(Y + offs, _i8_to_f16(tl.load(X + offs), True))

    x = torch.arange(-128, 128, dtype=torch.int16).to(torch.int8)
    x = torch.cat([x, x.roll(1), x.roll(2), x.roll(3)]).cuda()  # each value at every offset mod 4
    y = torch.empty(x.shape, dtype=torch.float16, device="cuda")
    _conv[(1,)](x, y, N=x.numel())
    assert torch.equal(y.view(torch.int16), x.to(torch.float16).view(torch.int16))


@needs_kernel
@pytest.mark.parametrize("qk", ["dequant", "fp16", "q8x2"])
@pytest.mark.parametrize("paged", [False, True], ids=["dense", "paged"])
def test_word_loaded_v_equals_the_fp16_variant(qk, paged, request):
    """PV='fp16w' (V loaded as int32 words and converted to fp16 in registers) computes what PV='fp16' computes:
    the same output bit for bit, dense and paged, with garbage beyond the lengths never read."""
    g = _gen(request)
    q, kq, vq, ks, vs = _quant_inputs(3, 8, 2, 2, 150, 64, torch.bfloat16, "int8", g)
    sl = _lens([150, 0, 97])
    vq2 = vq.clone()
    vq2[2, :, 97:] = 127
    vs2 = vs.clone()
    vs2[2, :, 97:] = float("nan")
    if paged:
        from sparseattn.ops.decode import paged_decode_attention

        pidx = torch.tensor([[[0, 7, 3, 9], [8, 1, 2, 0]], [[0, 1, 2, 3], [4, 5, 6, 7]], [[6, 0, 5, 2], [1, 3, 4, 0]]],
                            dtype=torch.int32, device=DEV)
        pnum = torch.tensor([[4, 3], [2, 0], [4, 2]], dtype=torch.int32, device=DEV)

        def run(v, vsc, pv):
            return paged_decode_attention(q, kq, v, pidx, pnum, page_size=16, seqlens=sl, k_scale=ks, v_scale=vsc,
                                          num_splits=2, return_lse=True, backend="triton", config=_cfg(qk, pv))
    else:
        def run(v, vsc, pv):
            return decode_attention(q, kq, v, k_scale=ks, v_scale=vsc, seqlens=sl, num_splits=3, return_lse=True,
                                    backend="triton", config=_cfg(qk, pv))
    a, b = run(vq, vs, "fp16"), run(vq2, vs2, "fp16w")
    assert torch.equal(a.out, b.out) and torch.equal(torch.nan_to_num(a.lse), torch.nan_to_num(b.lse))
    assert not bool(torch.isnan(b.out).any())


@needs_kernel
def test_word_loaded_v_refusals(request):
    q, kq, vq, ks, vs = _quant_inputs(1, 4, 1, 1, 64, 64, torch.bfloat16, "int8", _gen(request))
    kw = dict(k_scale=ks, v_scale=vs, backend="triton", config=_cfg("fp16", "fp16w"))
    with pytest.raises(ValueError, match="decode_attention: config asks for the int8-word P·V variant on a float8"):
        qf, kf, vf, ksf, vsf = _quant_inputs(1, 4, 1, 1, 64, 64, torch.bfloat16, "fp8", _gen(request))
        decode_attention(qf, kf, vf, k_scale=ksf, v_scale=vsf, backend="triton", config=_cfg("fp16", "fp16w"))
    from sparseattn.state.kv_cache import keys_contiguous

    with pytest.raises(ValueError, match="decode_attention: config asks for the int8-word P·V variant on a keys-cont"):
        decode_attention(q, kq, keys_contiguous(vq), **kw)
    buf = torch.zeros(1, 1, 64 * 64 + 1, dtype=torch.int8, device=DEV)
    odd = buf[0, 0, 1:].view(1, 1, 64, 64)  # one byte off a 4-byte boundary
    odd.copy_(vq)
    with pytest.raises(ValueError, match="decode_attention: config asks for the int8-word P·V variant on a V cache "
                                         "not aligned"):
        decode_attention(q, kq, odd, **kw)
