"""The only place tolerances live.

Parity follows flash-attention's ratio rule: a kernel's max error against a high-precision
reference (float64 on CPU / float32 on GPU) must be at most ``RATIO`` times the error of the same
reference computed in the kernel's own dtype (``reference_attention(..., upcast=False)``), plus a
rounding floor for the dtype.
"""

from __future__ import annotations

import torch

RATIO = 2.0

# absolute floor added to the ratio bound, per dtype of the kernel's inputs
ATOL_FLOOR: dict[torch.dtype, float] = {
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
    torch.float32: 1e-5,
    torch.float64: 1e-12,
}
# lse (natural log, float32) absolute floor
LSE_ATOL: dict[torch.dtype, float] = {
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
    torch.float32: 1e-5,
    torch.float64: 1e-12,
}

# MixedKVCache (tests/state/test_kv_cache.py): next-token logits of a tiny random model with its history
# quantized (per-token, per-head scales) vs the same model on the full-precision KV, max abs error
# relative to max |logit|. Quantization error only (a wrong mask or a dropped segment is O(1)); measured
# on the CPU (fp32 tiny Llama / Gemma-3, window 16 of 54 tokens): int8 1.2e-3 / 2.8e-3, fp8 e4m3
# 6.3e-3 / 9.5e-3; the bounds leave room for fp16 rounding on a GPU.
KV_CACHE_INT8_LOGIT_REL = 0.02
KV_CACHE_FP8_LOGIT_REL = 0.05
# MixedKVCache K smoothing (tests/state/test_kv_cache.py): keys with large per-channel offsets (+50 / -30 / +20
# on three channels of unit-normal keys), attention output of the quantized cache vs float attention: the error
# without smoothing over the error with it is at least this factor (without the fix it is 1; a lost lse
# correction makes the smoothed error O(1)). FP8 e4m3 keeps a relative precision per element, so the offset
# costs it less than INT8's uniform step. Measured (CPU, both routes): int8 14.0x / 15.7x (batch rows 0 / 1),
# fp8 1.8x / 6.3x; without offsets 0.76x (int8) / 0.82x (fp8). Keys without offsets: the smoothed error at most KV_CACHE_SMOOTHING_NO_OFFSET_MAX times the
# unsmoothed one.
KV_CACHE_SMOOTHING_MIN_GAIN = {"int8": 3.0, "fp8": 1.4}
KV_CACHE_SMOOTHING_NO_OFFSET_MAX = 1.5

# reference vs torch SDPA, both float64 (foundation tests)
SDPA_FP64_ATOL = 1e-10
# merging segments vs attention over the whole KV, float64
MERGE_FP64_ATOL = 1e-12
# the Triton merge (fp32 accumulation) vs the PyTorch merge / whole attention, float32 states (|out| ~ 1)
MERGE_FP32_ATOL = 1e-5
# context-parallel attention (chunk states merged) vs single-process reference, float64
CP_FP64_ATOL = 1e-12


def ratio_bound(err_lowp_ref: float, dtype: torch.dtype) -> float:
    """Allowed max error of a kernel whose same-dtype reference has max error ``err_lowp_ref``."""
    return RATIO * err_lowp_ref + ATOL_FLOOR[dtype]


def check_ratio(kernel_out: torch.Tensor, ref_hi: torch.Tensor, ref_lo: torch.Tensor, what: str = "out") -> None:
    """Raise ``AssertionError`` with numbers if the kernel breaks the ratio rule (for tests).

    Args:
        kernel_out: the kernel's output (its dtype sets the floor).
        ref_hi: reference in float32/float64.
        ref_lo: reference computed in the kernel's dtype.
    """
    hi = ref_hi.to(torch.float64)
    k_err = (kernel_out.to(torch.float64) - hi).abs()
    r_err = (ref_lo.to(torch.float64) - hi).abs()
    if bool(torch.isnan(kernel_out).any()):
        raise AssertionError(f"{what}: kernel output has {int(torch.isnan(kernel_out).sum())} NaN elements")
    finite = torch.isfinite(hi)
    if not bool(torch.equal(torch.isfinite(kernel_out.to(torch.float64)), finite)):
        raise AssertionError(f"{what}: kernel and reference disagree on which elements are infinite")
    k_max = float(k_err[finite].max()) if bool(finite.any()) else 0.0
    r_max = float(r_err[finite].max()) if bool(finite.any()) else 0.0
    bound = ratio_bound(r_max, kernel_out.dtype if kernel_out.dtype in ATOL_FLOOR else torch.float32)
    if not k_max <= bound:
        raise AssertionError(f"{what}: kernel max error {k_max:.3e} > bound {bound:.3e} "
                             f"(= {RATIO} x same-dtype reference error {r_max:.3e} + floor)")


# decode attention (sparseattn.ops.decode): two kernel results that differ only in the split-KV cut or
# in which program reads a page (num_splits, page order, all pages vs dense), compared with each other;
# per dtype of the inputs (the rounding of P to the input dtype and the merge's fp32 reordering)
DECODE_SPLITS_ATOL: dict[torch.dtype, float] = {
    torch.float16: 4e-3,
    torch.bfloat16: 3.2e-2,
    torch.float32: 1e-5,
}

# ---------------------------------------------------------------- quantized attention (docs/QUANT.md)
# Emulation (sparseattn.ops.quant_reference) against fp32 attention on Gaussian inputs: what the
# quantization itself costs. INT8 Q·Kᵀ (P·V in bf16):
QUANT_INT8_COS_MIN = 0.9995
QUANT_INT8_REL_L1_MAX = 0.02
# INT8 Q·Kᵀ + FP8 e4m3 P·V. e4m3 keeps 3 mantissa bits: each rounded value is off by up to 2**-4
# relative (rms ~3.6%), and on zero-mean Gaussian V that error does not average down relative to
# the output (measured: cos 0.99937, rel L1 0.036 at N=1024, D=128). With a per-channel V mean (as
# real V has) the output is far larger than the rounding noise and the INT8 bounds hold for FP8 too.
QUANT_FP8_ZERO_MEAN_COS_MIN = 0.999
QUANT_FP8_ZERO_MEAN_REL_L1_MAX = 0.045
QUANT_FP8_COS_MIN = 0.9995  # V with a per-channel mean (std 1 across channels)
QUANT_FP8_REL_L1_MAX = 0.02
# Kernel (interpreter) against the emulation on the same quantized operands: only summation order and
# exp2's last bit (numpy vs torch) differ; that bit can flip the bf16 rounding of one P entry (2**-8
# relative of its term), then both round the output to bf16: |kernel - emulation| <=
# QUANT_PARITY_RTOL * |emulation| + QUANT_PARITY_ATOL (measured: at most 2 bf16 ulps), lse within QUANT_LSE_ATOL.
QUANT_PARITY_RTOL = 2.0 ** -6
QUANT_PARITY_ATOL = 4e-3
QUANT_LSE_ATOL = 1e-4
# On a GPU the fused quantizer's mean and exp2 differ in the last bit, which can move an int8 value
# by one unit or flip one e4m3 rounding of P; the parity bound there (benchmarks/bench_quant.py --stress)
# is looser.
QUANT_GPU_PARITY_RTOL = 2.0 ** -5
QUANT_GPU_PARITY_ATOL = 2e-2
QUANT_GPU_LSE_ATOL = 2e-3
# A patched tiny random Llama (bf16, 2 layers, head_dim 64, sink_window pattern, 200 tokens):
# patch_model(quant=...) logits against the same model patched without quant (the bf16 kernel, same
# layout). Measured under the interpreter: int8 max |diff| / max |ref| 0.0064-0.0085, cosine 0.999986;
# int8_fp8 0.028-0.030, cosine 0.99985 (any granularity). A wrong layout (the dense one) is ~0.10 away.
QUANT_MODEL_LOGITS_REL_MAX = {"int8": 0.02, "int8_fp8": 0.06}
QUANT_MODEL_LOGITS_COS_MIN = {"int8": 0.9999, "int8_fp8": 0.999}
# fused Triton quantizer vs the PyTorch quantizer given the same smoothing mean: int8 values at most
# this many units apart (0 under the interpreter: the same IEEE operations)
QUANT_INT8_MAX_UNIT_DIFF = 1


def quant_accuracy(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """``(cosine similarity, relative L1)`` of ``out`` against ``ref`` over all elements (float64)."""
    o, r = out.to(torch.float64).flatten(), ref.to(torch.float64).flatten()
    cos = float(torch.nn.functional.cosine_similarity(o, r, dim=0))
    rel = float((o - r).abs().sum() / r.abs().sum().clamp_min(1e-300))
    return cos, rel

# patch_model(decode="kernel" | "sparse" with every page) against the unpatched model's own dense decode
# (tests/integrations/test_decode_route.py): logits of each decode step of a tiny random float32 model, max abs error
# relative to max |logit|. Only summation order differs (split-KV merge, page order); measured on the CPU
# (reference and Triton interpreter): at most 3e-7. A wrong mask, a missing key or a stale page summary
# with fewer pages is O(0.1); the sparse test with few pages asserts its error is above this bound.
DECODE_ROUTE_FP32_LOGIT_REL = 1e-4

# MixedKVCache's decode route (the split-KV decode kernel on the quantized segment and on the recent window,
# states merged) against the same cache attended by the state operator (decode_backend="off"), logits of a
# tiny random float32 model (tests/ops/test_decode_quant.py, Triton interpreter): both dequantise the same
# int8/fp8 values with the same scales; only summation order and the merge differ. Measured: at most 3e-7
# (int8 and fp8). A dropped segment or a wrong mask is O(0.1).
MIXED_DECODE_ROUTE_FP32_LOGIT_REL = 1e-4

# --------------------------------------------------------------------------- tests that compare two computations
# (values as the tests had them inline; named by what they compare)
# float64 results of the same math in another order (merges, densities, cache-carried states)
FP64_ATOL = 1e-12
# float64 lse through a skip path that drops only zero-weight tiles
FP64_LSE_ATOL = 1e-10
# float64 fraction computed two ways (a density from counts)
DENSITY_ATOL = 1e-9
# float32 results of the same math in another order (scores, sums of probabilities, masked-SDPA paths)
FP32_ATOL = 1e-5
FP32_RTOL = 1e-5
# float32 over a whole layer or a longer reduction (relative error of integration paths, row sums)
FP32_LOOSE = 1e-4
# float32 scale factors computed by one formula on two paths
FP32_SCALE_RTOL = 1e-6
# float32 row-probability mass compared with a float64 reference
FP32_PROB_ATOL = 1e-5
FP32_PROB_RTOL = 1e-4
# float32 reference vs float64 reference: output (absolute) and lse (relative to max(|lse|, 1))
REF_FP32_OUT_ATOL = 1e-4
REF_FP32_LSE_REL = 1e-5
# float32 probability mass of a test predictor path against an fp64 judge (pooled sums; rtol on mean/similarity)
FP32_POOL_RTOL = 1e-6
# fp16/bf16 attention outputs of two implementations (the same inputs; e.g. graphs vs eager, merged vs whole)
HALF_ATOL = 2e-3
HALF_RTOL = 2e-3
# fp16 model-level relative error of two attention implementations (a missing window is O(1))
HALF_MODEL_REL = 2e-2
# pv_threshold skip at its documented gap on the device: lse and output error bounds
PV_SKIP_LSE_ATOL = 1e-2
PV_SKIP_OUT_ATOL = 2e-2
# SketchWalk's sketch: an exact inner product (sketch_dim = D) and a random-projection estimate
SKETCH_EXACT_TOL = 1e-4
SKETCH_ESTIMATE_ATOL = 0.6
SKETCH_ESTIMATE_RTOL = 0.1
# gate predictor scores computed twice (same weights)
GATE_SCORES_ATOL = 1e-6

# ------------------------------------------------------------------ more tolerances the tests had inline (same values)
# float32 ratio or cosine that is 1 up to rounding (the recall of every block, the cosine of identical outputs)
FP32_UNIT_ATOL = 1e-6
# reference_attention in fp16/bf16: the upcast path rounds once at the end, so its max error is at most
# REF_UPCAST_EPS_FACTOR * eps(dtype) * max|out| + REF_UPCAST_ATOL; the same-dtype path (upcast=False) stays
# below REF_HALF_SAME_DTYPE_ERR_MAX on the test's unit-scale inputs
REF_UPCAST_EPS_FACTOR = 2.0
REF_UPCAST_ATOL = 1e-7
REF_HALF_SAME_DTYPE_ERR_MAX = 0.1
# sparse decode page selection in fp16/bf16 against fp32: a page chosen by one side only must sit at the cut,
# its upper bound within this relative distance (max(1, |cut|)) of the cut's (rounding of the bounds)
DECODE_PAGE_BOUND_TIE_REL = 0.05
# page attention mass (float64) computed two ways (eval.decode_recall vs a brute-force loop)
PAGE_MASS_FP64_ATOL = ATOL_FLOOR[torch.float64] * 1e3
# attention-mass recall of page selection when each head's mass sits on its own page (sharp scores)
SHARP_PAGE_RECALL_MIN = 0.999
# quantized attention with K smoothing: the returned lse (smoothing constant added back) against fp32 attention
QUANT_SMOOTHING_LSE_ATOL = 0.05
# tiny random bf16 models with quantized attention (patch_model(quant=...), captured Q/K/V): logits / output
# cosine against dense above QUANT_TINY_MODEL_COS_MIN, relative L1 of captured-Q/K/V outputs below QUANT_QKV_REL_L1_MAX
QUANT_TINY_MODEL_COS_MIN = 0.99
QUANT_QKV_REL_L1_MAX = 0.1
# the "dense" pattern through the patched model against the unpatched model (float32): logits cosine 1 within this
DENSE_ROUTE_LOGITS_COS_ATOL = 1e-9
# sanity floors (not accuracy claims: a wrong mask or wiring is far below them): logits cosine of a tiny random
# model with a tuned sparse layer against dense; the real default model with a static sparse pattern (logits,
# and one captured layer's output)
TINY_SPARSE_LOGITS_COS_MIN = 0.9
# a tiny random bf16 model on the GPU, packed documents with every block through the kernel, against each document
# run alone through the model's own SDPA: minimum per-position logits cosine (bf16 rounding; a document mask that
# let one document see another's keys falls far below it)
TINY_BF16_PACKED_LOGITS_COS_MIN = 0.99
REAL_MODEL_SPARSE_LOGITS_COS_MIN = 0.9
REAL_MODEL_LAYER_COS_MIN = 0.5
