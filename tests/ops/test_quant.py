"""Quantized block-sparse attention (sparseattn.ops.quant): kernels under the interpreter vs the emulation,
the emulation vs fp32 attention, smoothing, top-k input, errors and non-finite inputs.

FP8 on the CPU: numpy has no fp8 and Triton's interpreter converts to fp8 wrongly (checked with triton 3.9:
NaN -> 384, plain rounding off), so under the interpreter the FP8 path runs with ``FP8_EMU``: e4m3
rounding done in fp32 arithmetic (``quantize.e4m3_round``), values kept in bf16, products in fp32.
The real fp8 conversion and FP8 MMA run only on the GPU (benchmarks/bench_quant.py).
"""

from __future__ import annotations

import pytest
import torch

from sparseattn.testing.tolerances import FP32_ATOL, FP32_RTOL, FP32_SCALE_RTOL  # noqa: E402
import triton
import triton.language as tl

from sparseattn.layout.block_layout import BlockLayout
from sparseattn.layout.convert import layout_from_topk, layout_to_topk
from sparseattn.layout.patterns import dense_layout, random_layout
from sparseattn.ops import quant as Q
from sparseattn.ops.quant_reference import (attention_from_quantized, e4m3_round_reference, emulated_quantized_attention,
                                            quantize_reference)
from sparseattn.ops.reference import reference_attention
from sparseattn.ops.triton.quantize import e4m3_round
from sparseattn.testing import tolerances as T

DEV = "cuda" if torch.cuda.is_available() else "cpu"
MODES = ("int8", "int8_fp8")
GRANS = ("per_block", "per_warp", "per_thread", "per_token")


def _qkv(B, H, Hkv, Nq, Nkv, D, seed=0, dtype=torch.bfloat16, k_shift=0.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Nq, D, generator=g)
    k = torch.randn(B, Hkv, Nkv, D, generator=g) + k_shift
    v = torch.randn(B, Hkv, Nkv, D, generator=g)
    return q.to(DEV, dtype), k.to(DEV, dtype), v.to(DEV, dtype)


def _expand(lay: BlockLayout, B: int, H: int) -> BlockLayout:
    return BlockLayout(lay.kv_num_blocks.expand(B, H, -1), lay.kv_indices.expand(B, H, -1, -1), lay.block_m, lay.block_n,
                       lay.seqlen_q, lay.seqlen_kv, validate=False)


def _close(kern: torch.Tensor, emu: torch.Tensor, rtol: float, atol: float, what: str) -> None:
    a, b = kern.double().cpu(), emu.double().cpu()
    fin = torch.isfinite(b)
    assert torch.equal(torch.isfinite(a), fin), f"{what}: finite sets differ"
    err = (a - b).abs()[fin]
    bound = (rtol * b.abs() + atol)[fin]
    assert bool((err <= bound).all()), f"{what}: max err {float(err.max()):.3e}, worst excess {float((err - bound).max()):.3e}"


# ---------------------------------------------------------------- quantizer vs emulation


@pytest.mark.parametrize("quant", MODES)
@pytest.mark.parametrize("gran", GRANS)
@pytest.mark.parametrize("shift", [0.0, 30.0])
def test_quantizer_matches_emulation(quant, gran, shift):
    # shift: a large common offset of Q and K (the means smoothing removes); the lengths leave partial groups,
    # whose rows past the end must not reach a group's max once the mean is subtracted
    q, k, v = _qkv(1, 4, 2, 150, 200, 64, seed=1, k_shift=shift)
    q = (q.float() + shift / 2).to(q.dtype)
    qq = Q.quantize_qkv(q, k, v, quant=quant, quant_granularity=gran)
    qr = quantize_reference(q, k, v, quant=quant, quant_granularity=gran, k_mean=qq.k_mean, q_mean=qq.q_mean)
    # the fused means equal the PyTorch ones up to summation order
    pr = quantize_reference(q, k, v, quant=quant, quant_granularity=gran)
    assert torch.allclose(qq.k_mean.cpu(), pr.k_mean.cpu(), atol=FP32_ATOL, rtol=FP32_RTOL)
    assert torch.allclose(qq.q_mean.cpu(), pr.q_mean.cpu(), atol=FP32_ATOL, rtol=FP32_RTOL)
    # the Q-smoothing term: mean_tokens(q) . (k - mean_tokens(k)) per query head and key, log2 units
    assert qq.k_bias.shape == (1, 4, 200) and qr.k_bias.shape == (1, 4, 200)
    bias_tol = FP32_RTOL * float(qr.k_bias.abs().max()) + FP32_ATOL
    assert float((qq.k_bias - qr.k_bias).abs().max()) <= bias_tol
    # the Q/K balancing factors come from exact channel max / min: equal given the same means
    assert qq.qk_alpha.shape == (1, 2, 64) and torch.equal(qq.qk_alpha, qr.qk_alpha)
    lim = 0 if DEV == "cpu" else T.QUANT_INT8_MAX_UNIT_DIFF
    assert int((qq.q_int8.int() - qr.q_int8.int()).abs().max()) <= lim
    assert int((qq.k_int8.int() - qr.k_int8.int()).abs().max()) <= lim
    assert torch.allclose(qq.q_scale, qr.q_scale, rtol=FP32_SCALE_RTOL, atol=0)
    assert torch.allclose(qq.k_scale, qr.k_scale, rtol=FP32_SCALE_RTOL, atol=0)
    assert torch.allclose(qq.q_row, qr.q_row, rtol=FP32_RTOL, atol=FP32_ATOL)
    assert qq.q_int8.abs().max() <= 127 and qq.k_int8.abs().max() <= 127
    # number of scale groups per head
    (qw, qt, _), (kw, kt, _) = Q.GRANULARITIES[gran]
    assert qq.q_scale.shape[-1] == -(-150 // qw) * qt and qq.k_scale.shape[-1] == -(-200 // kw) * kt
    if quant == "int8_fp8":
        assert torch.equal(qq.v[..., :200].float().cpu(), qr.v[..., :200].cpu())
        assert torch.allclose(qq.v_scale, qr.v_scale, rtol=FP32_SCALE_RTOL, atol=0)


@pytest.mark.parametrize("gran", GRANS)
def test_quantizer_matches_emulation_head_dim_256(gran):
    """At head_dim 256 the quantization programs take 64 rows where the granularity's row slice allows (all but
    per_block Q, which keeps 128) and the statistics tiles 16 rows: several programs and partial last groups here,
    the INT8 values, scales and lse terms equal the emulation's given the kernel's means."""
    (qw, qt, _), (kw, kt, _) = Q.GRANULARITIES[gran]
    assert Q._rows_per_program(256, qw) == (128 if qw == 128 else 64) and Q._rows_per_program(256, kw) == 64
    assert Q._rows_per_program(128, qw) == 128 and Q._stats_rows(256) == 16
    q, k, v = _qkv(1, 2, 1, 150, 200, 256, seed=6, k_shift=30.0)
    qq = Q.quantize_qkv(q, k, v, quant="int8", quant_granularity=gran)
    qr = quantize_reference(q, k, v, quant="int8", quant_granularity=gran, k_mean=qq.k_mean, q_mean=qq.q_mean)
    pr = quantize_reference(q, k, v, quant="int8", quant_granularity=gran)
    assert torch.allclose(qq.k_mean.cpu(), pr.k_mean.cpu(), atol=FP32_ATOL, rtol=FP32_RTOL)
    assert torch.equal(qq.qk_alpha, qr.qk_alpha)
    lim = 0 if DEV == "cpu" else T.QUANT_INT8_MAX_UNIT_DIFF
    assert int((qq.q_int8.int() - qr.q_int8.int()).abs().max()) <= lim
    assert int((qq.k_int8.int() - qr.k_int8.int()).abs().max()) <= lim
    assert qq.q_scale.shape[-1] == -(-150 // qw) * qt and qq.k_scale.shape[-1] == -(-200 // kw) * kt
    assert torch.allclose(qq.q_scale, qr.q_scale, rtol=FP32_SCALE_RTOL, atol=0)
    assert torch.allclose(qq.k_scale, qr.k_scale, rtol=FP32_SCALE_RTOL, atol=0)
    assert torch.allclose(qq.q_row, qr.q_row, rtol=FP32_RTOL, atol=FP32_ATOL)
    bias_tol = FP32_RTOL * float(qr.k_bias.abs().max()) + FP32_ATOL
    assert float((qq.k_bias - qr.k_bias).abs().max()) <= bias_tol


@pytest.mark.parametrize("quant", MODES)
def test_quantizer_statistics_over_several_tiles_per_program(quant, monkeypatch):
    """Past ``_STATS_CHUNKS`` tiles of ``_STATS_R`` rows the statistics kernel reads several tiles per program
    (``STEPS``): with small caps, 11 tiles of 32 rows per program here (2 partials per row, the last one partial at
    each length), the means, factors, INT8 values and FP8 V equal the emulation's given the kernel's means, as with
    one tile per program."""
    monkeypatch.setattr(Q, "_STATS_CHUNKS", 2)
    monkeypatch.setattr(Q, "_STATS_MIN_PROGRAMS", 1)
    assert Q._stats_steps(6, 2) == 3 and Q._stats_steps(22, 2) == 11 and Q._stats_steps(21, 1) == 11
    assert Q._stats_rows(64) == 32 and Q._stats_rows(128) == 32 and Q._stats_rows(256) == 16
    q, k, v = _qkv(1, 2, 1, 700, 650, 64, seed=4, k_shift=5.0)  # 22 and 21 tiles of 32 rows -> 2 partials of 11
    qq = Q.quantize_qkv(q, k, v, quant=quant)
    qr = quantize_reference(q, k, v, quant=quant, k_mean=qq.k_mean, q_mean=qq.q_mean)
    pr = quantize_reference(q, k, v, quant=quant)
    assert torch.allclose(qq.k_mean.cpu(), pr.k_mean.cpu(), atol=FP32_ATOL, rtol=FP32_RTOL)
    assert torch.allclose(qq.q_mean.cpu(), pr.q_mean.cpu(), atol=FP32_ATOL, rtol=FP32_RTOL)
    assert torch.equal(qq.qk_alpha, qr.qk_alpha)
    lim = 0 if DEV == "cpu" else T.QUANT_INT8_MAX_UNIT_DIFF
    assert int((qq.q_int8.int() - qr.q_int8.int()).abs().max()) <= lim
    assert int((qq.k_int8.int() - qr.k_int8.int()).abs().max()) <= lim
    if quant == "int8_fp8":
        assert torch.allclose(qq.v_scale, qr.v_scale, rtol=FP32_SCALE_RTOL, atol=0)
        assert torch.equal(qq.v[..., :650].float().cpu(), qr.v[..., :650].cpu())


def test_stats_steps_rule():
    # short inputs: one tile per program; long ones: at most _STATS_CHUNKS partials, at least _STATS_MIN_PROGRAMS
    assert Q._stats_steps(32, 8) == 1 and Q._stats_steps(1, 1) == 1
    assert Q._stats_steps(256, 32) == 8 and Q._stats_steps(256, 8) == 4 and Q._stats_steps(1024, 8) == 16


@triton.jit
def _e4m3_kernel(X, Y, N: tl.constexpr):
    o = tl.arange(0, N)
    tl.store(Y + o, e4m3_round(tl.load(X + o)))


def test_finalize_channels_rule():
    """The finishing launch keeps 32 channels per program unless a narrower program takes fewer serial steps over the
    chunk partials (``_FIN_TILE // channels`` per step), and always covers every channel."""
    assert Q._finalize_channels(64, 32, 4) == 32  # Llama shape at 32K: one step per row either way
    assert Q._finalize_channels(512, 128, 4) == 8  # Gemma-3's global layers at 32K: 16 steps -> 6
    assert Q._finalize_channels(100, 0, 4) == 16  # K only: 2 steps of 64 -> 1 of 128
    assert Q._finalize_channels(0, 0, 1) == 32
    for nk in (0, 1, 63, 64, 65, 200, 512, 4096):
        for nq in (0, 1, 64, 300):
            for g in (1, 3, 8):
                db = Q._finalize_channels(nk, nq, g)
                assert db in (8, 16, 32) and Q._FIN_TILE % db == 0 and 64 % db == 0
                steps = {d: -(-nk // (Q._FIN_TILE // d)) + g * -(-nq // (Q._FIN_TILE // d)) for d in (8, 16, 32)}
                assert steps[db] == min(steps.values()) and all(steps[d] > steps[db] for d in (8, 16, 32) if d > db)


def test_e4m3_emulated_rounding_matches_torch():
    """The interpreter's fp32 e4m3 rounding (quantize.e4m3_round) is torch's float8_e4m3fn rounding."""
    g = torch.Generator().manual_seed(3)
    x = torch.cat([torch.randn(700, generator=g) * s for s in (1e-3, 0.1, 1.0, 30.0, 200.0)] +
                  [torch.tensor([0.0, -0.0, 448.0, -448.0, 2.0 ** -9, 2.0 ** -10, 3 * 2.0 ** -10, 1.0625, 1.1875,
                                 float("nan")])])
    x = torch.nn.functional.pad(x, (0, 4096 - x.numel())).to(DEV)
    y = torch.empty_like(x)
    _e4m3_kernel[(1,)](x, y, N=4096)
    ref = e4m3_round_reference(x)
    assert torch.equal(torch.isnan(y), torch.isnan(ref))
    fin = ~torch.isnan(ref)
    assert torch.equal(y[fin], ref[fin])


# ---------------------------------------------------------------- attention kernel vs emulation (same operands)


def _kernel_vs_emulation(quant, gran, causal, B, H, Hkv, Nq, Nkv, D, layout_kind, bs=64, seed=0):
    q, k, v = _qkv(B, H, Hkv, Nq, Nkv, D, seed=seed)
    if layout_kind == "dense":
        lay = None
        lay_emu = _expand(dense_layout(Nq, Nkv, block_m=128, block_n=128, causal=causal, device=DEV), B, H)
    else:
        lay = random_layout(Nq, Nkv, density=0.5, seed=seed, block_m=bs, block_n=bs, batch=B, heads=H, causal=causal,
                            device=DEV)
        lay_emu = lay
    tele: dict = {}
    st = Q.quantized_attention(q, k, v, layout=lay, causal=causal, quant=quant, quant_granularity=gran, return_lse=True,
                               telemetry=tele)
    qq = Q.quantize_qkv(q, k, v, quant=quant, quant_granularity=gran)
    eo, el = attention_from_quantized(qq, lay_emu, causal=causal, out_dtype=q.dtype, tile_n=tele["config"]["BLOCK_N"])
    if DEV == "cpu":
        rtol, atol, latol = T.QUANT_PARITY_RTOL, T.QUANT_PARITY_ATOL, T.QUANT_LSE_ATOL
    else:  # GPU: exp2 / the fused mean differ in the last bit (tolerances.py)
        rtol, atol, latol = T.QUANT_GPU_PARITY_RTOL, T.QUANT_GPU_PARITY_ATOL, T.QUANT_GPU_LSE_ATOL
    _close(st.out, eo, rtol, atol, f"{quant}/{gran} out")
    _close(st.lse, el, 0.0, latol, f"{quant}/{gran} lse")
    return st, q, k, v, lay_emu


@pytest.mark.parametrize("quant", MODES)
@pytest.mark.parametrize("gran", GRANS)
def test_kernel_matches_emulation_causal_sparse_gqa(quant, gran):
    # bottom-right causal (Nq < Nkv), odd lengths (masked edges), GQA 2:1, 64-blocks random layout
    _kernel_vs_emulation(quant, gran, True, 1, 4, 2, 130, 201, 64, "random", bs=64, seed=2)


@pytest.mark.parametrize("quant", MODES)
def test_kernel_matches_emulation_dense_noncausal_d128(quant):
    _kernel_vs_emulation(quant, "per_warp", False, 2, 2, 1, 100, 77, 128, "dense", seed=3)


def test_kernel_matches_emulation_block128_d256():
    _kernel_vs_emulation("int8", "per_block", True, 1, 2, 2, 140, 140, 256, "random", bs=128, seed=4)


def test_empty_rows_are_zero_with_minus_inf_lse():
    B, H, N, D = 1, 2, 128, 64
    q, k, v = _qkv(B, H, 1, N, N, D)
    num = torch.zeros(B, H, 2, dtype=torch.int32)
    num[:, :, 1] = 1
    idx = torch.tensor([[0, 1], [0, 1]], dtype=torch.int32).expand(B, H, 2, 2).contiguous()
    lay = BlockLayout(num.to(DEV), idx.to(DEV), 64, 64, N, N)
    st = Q.quantized_attention(q, k, v, layout=lay, causal=True, return_lse=True)
    assert torch.equal(st.out[:, :, :64].float().cpu(), torch.zeros(B, H, 64, D))
    assert bool((st.lse[:, :, :64] == float("-inf")).all())
    ref = reference_attention(q.float(), k.float(), v.float(), layout=lay, causal=True)
    assert T.quant_accuracy(st.out[:, :, 64:], ref.out[:, :, 64:])[0] > T.QUANT_INT8_COS_MIN


@pytest.mark.parametrize("quant", MODES)
@pytest.mark.parametrize("gran", ["per_warp", "per_thread"])
@pytest.mark.parametrize("flags", [{"USE_TMA": True}, {"PREFETCH": True}, {"USE_TMA": True, "PREFETCH": True},
                                   {"USE_TMA": True, "PREFETCH": True, "TMA_QO": True}])
@pytest.mark.parametrize("bn", [64, 32])
def test_tma_and_prefetch_switches_change_no_bit(quant, gran, flags, bn):
    """USE_TMA (K/V through tensor descriptors), TMA_QO (Q and out too) and PREFETCH (next list entry read ahead) are
    load paths only:
    the same bits as the plain loads, on odd lengths (rows/keys past the end), GQA, 2 kernel tiles per layout block
    (bn 32), an empty query block and Q smoothing's key bias (on by default)."""
    B, H, Hkv, Nq, Nkv, D = 1, 4, 2, 257, 330, 64
    q, k, v = _qkv(B, H, Hkv, Nq, Nkv, D, seed=7)
    lay = random_layout(Nq, Nkv, density=0.7, seed=7, block_m=64, block_n=64, batch=B, heads=H, causal=True, device=DEV)
    assert int(lay.kv_num_blocks.max()) >= 4  # several full blocks in a row: a read-ahead slip changes the output
    num = lay.kv_num_blocks.clone()
    num[0, 1, 4] = 0  # query block 4 of head 1 attends nothing: out 0, lse -inf
    lay = BlockLayout(num, lay.kv_indices, 64, 64, Nq, Nkv)
    base = {"BLOCK_M": 64, "BLOCK_N": bn, "num_warps": 4, "num_stages": 1}
    ref = Q.quantized_attention(q, k, v, layout=lay, causal=True, quant=quant, quant_granularity=gran, return_lse=True,
                                config=base)
    got = Q.quantized_attention(q, k, v, layout=lay, causal=True, quant=quant, quant_granularity=gran, return_lse=True,
                                config={**base, **flags})
    assert bool((ref.lse[0, 1, 256:] == float("-inf")).all()) and bool(torch.isfinite(ref.lse[0, 0]).all())
    assert torch.equal(got.out, ref.out) and torch.equal(got.lse, ref.lse)


def test_launch_config_switches_are_checked():
    q, k, v = _qkv(1, 2, 1, 64, 64, 64)
    base = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 1}
    with pytest.raises(ValueError, match=r"quantized_attention: config has a bad USE_TMA; expected True or False, got 1"):
        Q.quantized_attention(q, k, v, config={**base, "USE_TMA": 1})
    with pytest.raises(ValueError, match=r"quantized_attention: config has a bad maxnreg; expected an int in \[24, 255\]"):
        Q.quantized_attention(q, k, v, config={**base, "maxnreg": 8})
    with pytest.raises(ValueError, match=r"quantized_attention: config must name exactly the launch parameters"):
        Q.quantized_attention(q, k, v, config={**base, "VEC_COUNT": True})
    with pytest.raises(ValueError, match=r"quantized_attention: config has a bad TMA_QO; expected True or False"):
        Q.quantized_attention(q, k, v, config={**base, "TMA_QO": "yes"})


# ---------------------------------------------------------------- emulation vs fp32 attention (cost of quantization)


@pytest.mark.parametrize("gran", GRANS)
def test_emulation_accuracy_gaussian(gran):
    q, k, v = (t.cpu() for t in _qkv(1, 2, 1, 1024, 1024, 128, seed=5))
    ref = reference_attention(q.float(), k.float(), v.float(), causal=True).out
    o, _ = emulated_quantized_attention(q, k, v, causal=True, quant="int8", quant_granularity=gran)
    cos, rel = T.quant_accuracy(o, ref)
    assert cos >= T.QUANT_INT8_COS_MIN and rel <= T.QUANT_INT8_REL_L1_MAX, (cos, rel)
    o, _ = emulated_quantized_attention(q, k, v, causal=True, quant="int8_fp8", quant_granularity=gran)
    cos, rel = T.quant_accuracy(o, ref)
    assert cos >= T.QUANT_FP8_ZERO_MEAN_COS_MIN and rel <= T.QUANT_FP8_ZERO_MEAN_REL_L1_MAX, (cos, rel)
    # V with a per-channel mean (as real V has): FP8 meets the INT8 bounds
    g = torch.Generator().manual_seed(6)
    v2 = (v.float() + torch.randn(1, 1, 1, 128, generator=g)).bfloat16()
    ref2 = reference_attention(q.float(), k.float(), v2.float(), causal=True).out
    o, _ = emulated_quantized_attention(q, k, v2, causal=True, quant="int8_fp8", quant_granularity=gran)
    cos, rel = T.quant_accuracy(o, ref2)
    assert cos >= T.QUANT_FP8_COS_MIN and rel <= T.QUANT_FP8_REL_L1_MAX, (cos, rel)


def test_smoothing_matters_with_outlier_channels():
    """A few K channels with a large common offset (what real K has): without smoothing the per-group
    INT8 scale is set by the offset and the other channels lose their resolution."""
    q, k, v = (t.cpu() for t in _qkv(1, 2, 1, 512, 512, 128, seed=7))
    kf = k.float()
    kf[..., :4] += 40.0  # outlier channels, shared by every token
    k = kf.bfloat16()
    ref = reference_attention(q.float(), k.float(), v.float(), causal=True)
    o_s, lse_s = emulated_quantized_attention(q, k, v, causal=True, quant_granularity="per_warp", smooth_k=True)
    o_n, _ = emulated_quantized_attention(q, k, v, causal=True, quant_granularity="per_warp", smooth_k=False)
    cos_s, rel_s = T.quant_accuracy(o_s, ref.out)
    cos_n, rel_n = T.quant_accuracy(o_n, ref.out)
    assert cos_s >= T.QUANT_INT8_COS_MIN and rel_s <= T.QUANT_INT8_REL_L1_MAX, (cos_s, rel_s)
    assert rel_n > 3 * rel_s and cos_n < cos_s, (cos_n, rel_n, cos_s, rel_s)
    # the lse gets the smoothing constant back
    assert float((lse_s - ref.lse).abs().max()) < T.QUANT_SMOOTHING_LSE_ATOL


def _option_matters(q, k, v, option, factor=2.0):
    """``option`` (a bool argument of the quantizer) on vs off on these inputs: on meets the INT8 bounds, off is
    ``factor`` times worse; the lse is the unquantized one; the kernel matches the emulation's accuracy both ways."""
    ref = reference_attention(q.float(), k.float(), v.float(), causal=True)
    rel = {}
    for on in (True, False):
        o, lse = emulated_quantized_attention(q, k, v, causal=True, quant_granularity="per_warp", **{option: on})
        cos, rel[on] = T.quant_accuracy(o, ref.out)
        if on:
            assert cos >= T.QUANT_INT8_COS_MIN and rel[on] <= T.QUANT_INT8_REL_L1_MAX, (option, cos, rel[on])
            assert float((lse - ref.lse).abs().max()) < T.QUANT_SMOOTHING_LSE_ATOL
    assert rel[False] > factor * rel[True], (option, rel)
    for on in (True, False):
        st = Q.quantized_attention(q.to(DEV), k.to(DEV), v.to(DEV), causal=True, return_lse=True, **{option: on})
        assert T.quant_accuracy(st.out.cpu(), ref.out)[1] <= 1.5 * rel[on], (option, on)


def test_q_smoothing_matters_with_outlier_channels():
    """Q channels with a large common offset (real Q has them too): without Q smoothing the per-group INT8
    scale of Q is set by the offset; with it the scores are those of the unsmoothed Q, at a finer step."""
    q, k, v = (t.cpu() for t in _qkv(1, 2, 1, 512, 512, 128, seed=11))
    qf = q.float()
    qf[..., :4] += 40.0
    q = qf.bfloat16()
    _option_matters(q, k, v, "smooth_q")
    for sq in (True, False):
        assert (Q.quantize_qkv(q.to(DEV), k.to(DEV), v.to(DEV), smooth_q=sq).k_bias is None) == (not sq)


def test_qk_balancing_matters_with_wide_key_channels():
    """A few K channels with a 30x wider spread than the rest (Gemma-3's global layers have such keys; smoothing
    removes offsets, not spread): without balancing they set every key's INT8 step; alpha = sqrt(max|q| / max|k|)
    per channel moves half of that range into Q, exactly for Q·Kᵀ."""
    q, k, v = (t.cpu() for t in _qkv(1, 2, 1, 512, 512, 64, seed=13))
    kf = k.float()
    kf[..., :3] *= 30.0
    k = kf.bfloat16()
    q = (q.float() * 0.3).bfloat16()
    _option_matters(q, k, v, "balance_qk")
    for bal in (True, False):
        assert (Q.quantize_qkv(q.to(DEV), k.to(DEV), v.to(DEV), balance_qk=bal).qk_alpha is None) == (not bal)


def test_balance_scales_guards():
    qr = torch.tensor([[[4.0, 0.0, float("inf"), 1.0], [9.0, 2.0, 1.0, 1.0]]])  # (B=1, H=2, D=4), one KV head
    kr = torch.tensor([[[1.0, 3.0, 2.0, 0.0]]])
    inv, alpha = Q.balance_scales(qr, kr)
    # channel 0: sqrt(max(4, 9) / 1) = 3; 1: sqrt(2 / 3); 2: q range not finite -> 1; 3: k range 0 -> 1
    assert torch.allclose(alpha, torch.tensor([[[3.0, (2 / 3) ** 0.5, 1.0, 1.0]]]))
    assert torch.allclose(inv * alpha, torch.ones_like(alpha))


@pytest.mark.parametrize("smooth_k,smooth_q,balance,db,ch", [
    (True, True, True, 16, 32), (True, False, True, 16, 32), (False, True, False, 16, 32), (False, False, True, 16, 32),
    (True, False, False, 16, 32),
    # launch shapes Q._finalize_channels picks (CH = _FIN_TILE // DB): 8 channels x 256 chunks, 32 x 64
    (True, True, True, 8, 256), (True, True, True, 32, 64)])
def test_stats_finishing_kernel_matches_torch_bit_for_bit(smooth_k, smooth_q, balance, db, ch):
    """``_qk_finalize_kernel`` against the PyTorch arithmetic it replaced (chunk sums over tokens, ranges from the
    channel max / min, :func:`balance_scales`) on partials with channels that have no finite entry, a zero range
    and huge values; more chunks than one step of the kernel's chunk loop takes (37 for K with 32 per step, 300 with
    256 or 64), ``D // db`` programs of ``db`` channels per row, GQA group 3, two sequences."""
    from sparseattn.ops.triton import quantize as kq

    B, Hkv, G, D, NCQ, nkv, nq = 2, 2, 3, 64, 5, 4700, 600
    NCK = 37 if ch == 32 else 300
    gen = torch.Generator().manual_seed(3)

    def parts(rows, nc):
        s = torch.randn(rows, nc, D, generator=gen) * 50
        mx = torch.rand(rows, nc, D, generator=gen) * 3
        mn = -torch.rand(rows, nc, D, generator=gen) * 3
        mx[:, :, 0], mn[:, :, 0] = float("-inf"), float("inf")  # channel 0: no finite entry anywhere
        mx[:, :, 1], mn[:, :, 1], s[:, :, 1] = 0.0, 0.0, 0.0  # channel 1: all zero (range 0)
        mx[:, :, 2] = mx[:, :, 2] * 1e30  # channel 2: huge values
        return s, mx, mn

    ks, kmx, kmn = parts(B * Hkv, NCK)
    qs, qmx, qmn = parts(B * Hkv * G, NCQ)
    out = [torch.full((B, n, D), float("nan")) for n in (Hkv, Hkv * G, Hkv, Hkv)]
    kq._qk_finalize_kernel[(B * Hkv, D // db)](ks.to(DEV), kmx.to(DEV), kmn.to(DEV), qs.to(DEV), qmx.to(DEV),
                                               qmn.to(DEV), *(o := [t.to(DEV) for t in out]), G, NCK, NCQ, nkv, nq,
                                               HEAD_DIM=D, DB=db, CH=ch, SMOOTH_K=smooth_k, SMOOTH_Q=smooth_q,
                                               BALANCE=balance)
    k_mean, q_mean, ch_q, ch_k = (t.cpu() for t in o)
    exp_k = (ks.double().sum(1) / nkv).float().view(B, Hkv, D) if smooth_k else torch.zeros(B, Hkv, D)
    # the kernel sums the chunks in its own order: equal to float64's sum within fp32 rounding
    assert torch.allclose(k_mean, exp_k, rtol=1e-6, atol=1e-6)
    if smooth_q:
        assert torch.allclose(q_mean, (qs.double().sum(1) / nq).float().view(B, Hkv * G, D), rtol=1e-6, atol=1e-6)
    if balance:  # given the kernel's means, the factors are balance_scales' bits on the ranges max |x - mean|
        def rng(mx, mn, mean):
            return torch.maximum(mx - mean, mean - mn) if mean is not None else torch.maximum(mx, -mn)

        qr = rng(qmx.amax(1).view(B, Hkv * G, D), qmn.amin(1).view(B, Hkv * G, D), q_mean if smooth_q else None)
        kr = rng(kmx.amax(1).view(B, Hkv, D), kmn.amin(1).view(B, Hkv, D), k_mean if smooth_k else None)
        inv, alpha = Q.balance_scales(qr, kr)
        assert torch.equal(ch_k, alpha) and torch.equal(ch_q, inv)
        assert bool((alpha[..., :2] == 1).all())  # no finite entry / zero range: no balancing
    else:
        assert bool(ch_k.isnan().all()) and bool(ch_q.isnan().all())  # not written


def test_per_token_scales_beat_per_warp_on_uneven_rows():
    """Query rows whose norms differ by 30x inside one 16-row group and keys likewise: a per-token scale keeps
    every row's resolution, a shared one is set by the largest row."""
    g = torch.Generator().manual_seed(12)
    q, k, v = (t.cpu() for t in _qkv(1, 2, 1, 512, 512, 64, seed=12))
    rs = torch.where(torch.rand(1, 1, 512, 1, generator=g) < 0.2, 3.0, 0.1)
    ks = torch.where(torch.rand(1, 1, 512, 1, generator=g) < 0.2, 3.0, 0.1)
    q, k = (q.float() * rs).bfloat16(), (k.float() * ks).bfloat16()
    ref = reference_attention(q.float(), k.float(), v.float(), causal=True).out
    rel = {gran: T.quant_accuracy(emulated_quantized_attention(q, k, v, causal=True, quant_granularity=gran)[0],
                                  ref)[1] for gran in ("per_warp", "per_token")}
    assert rel["per_token"] < 0.6 * rel["per_warp"], rel


def test_kernel_smoothing_lse_correction():
    q, k, v = _qkv(1, 2, 1, 96, 96, 64, seed=8, k_shift=3.0)
    st = Q.quantized_attention(q, k, v, causal=True, return_lse=True)
    ref = reference_attention(q.float(), k.float(), v.float(), causal=True)
    assert float((st.lse.float().cpu() - ref.lse.cpu()).abs().max()) < T.QUANT_SMOOTHING_LSE_ATOL
    assert T.quant_accuracy(st.out, ref.out)[0] >= T.QUANT_INT8_COS_MIN


def test_k_bias_rows_are_padded_for_the_unmasked_bias_load():
    # the kernel loads Q smoothing's bias tiles without a mask: quantize_qkv pads the rows, and a k_bias the launcher
    # cannot read that far (here an unpadded contiguous copy, as a user might build) is copied into a padded one
    import dataclasses

    q, k, v = _qkv(1, 4, 2, 130, 201, 64, seed=12)
    qq = Q.quantize_qkv(q, k, v, quant="int8", quant_granularity="per_warp")
    kb = qq.k_bias
    assert kb.shape == (1, 4, 201) and kb.stride(1) == 256 and kb.stride(2) == 1
    assert Q._kbias_for_launch(kb, 256) is kb
    tight = kb.contiguous()
    assert tight.stride(1) == 201
    padded = Q._kbias_for_launch(tight, 256)
    assert padded is not tight and padded.shape == (1, 4, 256) and torch.equal(padded[..., :201], tight)
    assert torch.equal(padded[..., 201:], torch.zeros_like(padded[..., 201:]))
    lay = random_layout(130, 201, density=0.5, seed=12, block_m=64, block_n=64, batch=1, heads=4, causal=True,
                        device=DEV)
    a = Q.quantized_attention_from(qq, lay, causal=True, out_dtype=q.dtype)
    b = Q.quantized_attention_from(dataclasses.replace(qq, k_bias=tight), lay, causal=True, out_dtype=q.dtype)
    assert torch.equal(a.out, b.out) and torch.equal(a.lse, b.lse)


# ---------------------------------------------------------------- top-k input, attention() delegate, errors


def test_topk_indices_input_and_errors():
    B, H, N, D = 1, 2, 256, 64
    q, k, v = _qkv(B, H, 1, N, N, D, seed=9)
    lay = random_layout(N, N, density=0.5, seed=1, block_m=64, block_n=64, batch=B, heads=H, causal=True, device=DEV)
    topk = layout_to_topk(lay)
    # any order is accepted
    topk = topk.flip(-1)
    a = Q.quantized_attention(q, k, v, topk_indices=topk, block_size=64, causal=True)
    b = Q.quantized_attention(q, k, v, layout=layout_from_topk(topk, block_m=64, block_n=64, seqlen_q=N, seqlen_kv=N),
                              causal=True)
    assert torch.equal(a, b)
    bad = topk.clone()
    bad[0, 0, 0, 0] = 4  # 4 key blocks: valid are 0..3
    with pytest.raises(ValueError, match=r"quantized_attention: topk_indices has a block index out of range"):
        Q.quantized_attention(q, k, v, topk_indices=bad, block_size=64, causal=True)
    bad[0, 0, 0, 0] = -5
    with pytest.raises(ValueError, match="out of range"):
        Q.quantized_attention(q, k, v, topk_indices=bad, block_size=64, causal=True)
    with pytest.raises(ValueError, match="cannot be given together"):
        Q.quantized_attention(q, k, v, topk_indices=topk, layout=lay, block_size=64)
    with pytest.raises(ValueError, match="block_size"):
        Q.quantized_attention(q, k, v, topk_indices=topk, block_size=32)


def test_attention_delegates_to_quantized():
    from sparseattn.ops.attention import attention

    q, k, v = _qkv(1, 2, 1, 96, 96, 64, seed=10)
    st = attention(q, k, v, causal=True, quant="int8", quant_granularity="per_thread")
    ref = Q.quantized_attention(q, k, v, causal=True, quant="int8", quant_granularity="per_thread", return_lse=True)
    assert torch.equal(st.out, ref.out) and torch.equal(st.lse, ref.lse)
    with pytest.raises(NotImplementedError, match="pv_threshold"):
        lay = random_layout(96, 96, density=0.5, block_m=64, block_n=64, heads=2, causal=True, device=DEV)
        attention(q, k, v, causal=True, layout=lay, quant="int8", pv_threshold=1.0)


def test_bad_arguments():
    q, k, v = _qkv(1, 2, 1, 64, 64, 64)
    with pytest.raises(ValueError, match=r"quantized_attention: quant is unknown; expected one of"):
        Q.quantized_attention(q, k, v, quant="int4")
    with pytest.raises(ValueError, match=r"quant_granularity is unknown"):
        Q.quantized_attention(q, k, v, quant_granularity="per_channel")
    with pytest.raises(ValueError, match=r"quantized_attention: smooth_q must be a bool; expected True or False, got 1"):
        Q.quantized_attention(q, k, v, smooth_q=1)
    with pytest.raises(ValueError, match=r"quantize_qkv: smooth_k must be a bool"):
        Q.quantize_qkv(q, k, v, smooth_k="yes")
    with pytest.raises(ValueError, match=r"quantized_attention: balance_qk must be a bool"):
        Q.quantized_attention(q, k, v, balance_qk=None)
    with pytest.raises(NotImplementedError, match="dtype float32 is not supported"):
        Q.quantized_attention(q.float(), k.float(), v.float())
    q96, k96, v96 = _qkv(1, 2, 1, 64, 64, 96)
    with pytest.raises(NotImplementedError, match="head_dim 96"):
        Q.quantized_attention(q96, k96, v96)
    with pytest.raises(ValueError, match="k heads must divide"):
        Q.quantized_attention(q, k[:, :1].expand(1, 3, 64, 64).contiguous(), v[:, :1].expand(1, 3, 64, 64).contiguous())


def test_gpu_capability_refusals():
    assert Q.gpu_refusal((9, 0), "int8_fp8") is None and Q.gpu_refusal((8, 9), "int8_fp8") is None
    assert Q.gpu_refusal((8, 0), "int8") is None
    assert "8.9" in Q.gpu_refusal((8, 0), "int8_fp8") and "quant='int8'" in Q.gpu_refusal((8, 6), "int8_fp8")
    assert ">= 8.0" in Q.gpu_refusal((7, 5), "int8")


def test_cpu_without_interpreter_is_refused(monkeypatch):
    if DEV != "cpu":
        pytest.skip("CPU only")
    q, k, v = _qkv(1, 2, 1, 64, 64, 64)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(NotImplementedError, match="needs CUDA tensors"):
        Q.quantized_attention(q, k, v)


# ---------------------------------------------------------------- non-finite inputs


def _attending(lay: BlockLayout, causal: bool) -> torch.Tensor:
    return lay.element_mask(causal=causal).cpu()  # (B or 1, H or 1, Nq, Nkv)


@pytest.mark.parametrize("quant", MODES)
@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("val", [float("nan"), float("inf")])
def test_nonfinite_inputs_reach_the_affected_rows(quant, where, val):
    B, H, Hkv, N, D = 1, 2, 1, 192, 64
    causal = True
    q, k, v = _qkv(B, H, Hkv, N, N, D, seed=11)
    lay = random_layout(N, N, density=0.6, seed=3, block_m=64, block_n=64, batch=B, heads=H, causal=causal, device=DEV)
    i, j, d = 100, 90, 5
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    if where == "q":
        q2[0, 1, i, d] = val
    elif where == "k":
        k2[0, 0, j, d] = val
    else:
        v2[0, 0, j, d] = val
    # the quantizers treat a non-finite entry as 0 for scales and the smoothing mean: the same inputs with
    # that entry 0 give the outputs every unaffected element must equal exactly
    q0, k0, v0 = (torch.where(torch.isfinite(t), t, torch.zeros_like(t)) for t in (q2, k2, v2))
    clean = Q.quantized_attention(q0, k0, v0, layout=lay, causal=causal, quant=quant, return_lse=True)
    tele: dict = {}
    st = Q.quantized_attention(q2, k2, v2, layout=lay, causal=causal, quant=quant, return_lse=True, telemetry=tele)
    out = st.out.float().cpu()
    att = _attending(lay, causal).expand(B, H, N, N)
    must = torch.zeros(B, H, N, D, dtype=torch.bool)
    may = torch.zeros(B, H, N, D, dtype=torch.bool)
    if where == "q":
        if bool(att[0, 1, i].any()):
            must[0, 1, i, :] = True
    elif where == "k":
        must[0, :, :, :] = att[0, :, :, j][:, :, None]
        g0 = (j // 64) * 64  # the K scale group (64 keys for per_warp) holding key j
        may[0, :, :, :] = att[0, :, :, g0:g0 + 64].any(-1)[:, :, None]
    else:
        must[0, :, :, d] = att[0, :, :, j]
        # the kernel's tile exception: rows of the kernel query tile that loads key j's tile
        tile_m = tele["config"]["BLOCK_M"]
        for h in range(H):
            for r0 in range(0, N, tile_m):
                if bool(att[0, h, r0:r0 + tile_m, j - j % 64: j - j % 64 + 64].any()):
                    may[0, h, r0:r0 + tile_m, d] = True
    may |= must
    nonfin = ~torch.isfinite(out)
    assert bool(nonfin[must].all()), "an affected output is finite"
    assert not bool((nonfin & ~may).any()), "a non-finite value reached an unaffected output"
    # never finite garbage: every finite output equals the clean run
    same = ~nonfin
    assert torch.equal(out[same], clean.out.float().cpu()[same])
    if where == "q":
        assert bool(torch.isnan(st.lse[0, 1, i])) and torch.isfinite(st.lse[0, 0, i])


def test_cli_bench_quant_options_parse():
    from sparseattn.cli.main import build_parser

    args = build_parser().parse_args(["bench", "--quant", "int8_fp8", "--quant-gran", "per_thread"])
    assert (args.quant, args.quant_gran) == ("int8_fp8", "per_thread")
    args = build_parser().parse_args(["bench"])
    assert (args.quant, args.quant_gran) == (None, "per_warp")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--quant", "int4"])


def test_cli_bench_quant_row_on_interpreter():
    """The ``--quant`` row helper of ``sparseattn bench`` runs (timing needs CUDA: patched to a wall clock)."""
    if DEV != "cpu":
        pytest.skip("the GPU runs the real command")
    import argparse

    from sparseattn.cli import bench as cb
    from sparseattn.testing import timing

    args = argparse.Namespace(causal=True, quant="int8", quant_gran="per_warp", parity_rows=64)
    q, k, v = _qkv(1, 2, 1, 128, 128, 64, seed=12)
    lay = random_layout(128, 128, density=0.5, block_m=64, block_n=64, heads=2, causal=True)
    orig = (timing.bench_ms, timing.peak_memory_bytes)
    try:
        timing.bench_ms = lambda fn, **kw: (fn(), 0.0)[1]
        timing.peak_memory_bytes = lambda fn: (fn(), 0)[1]
        row = cb._quant_row(args, q, k, v, lay)
    finally:
        timing.bench_ms, timing.peak_memory_bytes = orig
    assert row["cos"] >= T.QUANT_INT8_COS_MIN and row["rel_l1"] <= T.QUANT_INT8_REL_L1_MAX


@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_nonfinite_set_matches_the_bf16_kernel(where):
    """q and v (int8 path): the same non-finite outputs as the bf16 kernel; k: a superset (the K group)."""
    from sparseattn.ops.triton_launch import block_sparse_fwd

    B, H, Hkv, N, D = 1, 2, 1, 192, 64
    q, k, v = _qkv(B, H, Hkv, N, N, D, seed=13)
    lay = random_layout(N, N, density=0.6, seed=5, block_m=64, block_n=64, batch=B, heads=H, causal=True, device=DEV)
    t = {"q": q, "k": k, "v": v}[where]
    t[0, 0, 150 if where == "q" else 70, 3] = float("nan")
    tele: dict = {}
    ours = ~torch.isfinite(Q.quantized_attention(q, k, v, layout=lay, causal=True, quant="int8",
                                                 telemetry=tele).float().cpu())
    bf16 = ~torch.isfinite(block_sparse_fwd(q, k, v, layout=lay, causal=True,
                                            config={"BLOCK_M": tele["config"]["BLOCK_M"], "BLOCK_N": tele["config"]["BLOCK_N"],
                                                    "num_warps": 4, "num_stages": 1}).out.float().cpu())
    assert bool(bf16.any())
    if where == "k":
        assert bool((ours | ~bf16).all()) and bool(ours.sum() >= bf16.sum())
    else:
        assert torch.equal(ours, bf16)


def test_bench_quant_stress_and_table_on_interpreter():
    """benchmarks/bench_quant.py's stress checker and table run here (the full --cpu-smoke takes minutes)."""
    if DEV != "cpu":
        pytest.skip("the GPU runs the real benchmark")
    import importlib.util
    import os
    import time

    path = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "bench_quant.py")
    spec = importlib.util.spec_from_file_location("bench_quant", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cases = mod.stress_rows(2, True, time.time() + 120, seed=1)
    assert len(cases) == 2 and all(c["ok"] for c in cases), cases
    txt = mod.table([{"row": "int8/per_warp", "density": 0.1, "ms": 1.0, "cos": 0.9999, "rel_l1": 0.01},
                     {"row": "sdpa_cudnn_bf16", "density": 1.0, "error": "refused"}])
    assert txt.splitlines()[0].startswith("| row |") and "refused" in txt
