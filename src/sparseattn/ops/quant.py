"""Quantized block-sparse attention (SageAttention-style INT8 Q·Kᵀ, optional FP8 P·V).

API:

* :func:`quantized_attention` — ``quant="int8"`` (INT8 Q·Kᵀ, P·V in the input dtype) or
  ``"int8_fp8"`` (INT8 Q·Kᵀ, FP8 e4m3 P·V, sm_89+), any :class:`~sparseattn.layout.BlockLayout` or
  top-k indices ``[B, H, q_blocks, top_k]``, bottom-right causal, GQA. Quantization runs on the GPU
  in fused Triton kernels on every call (its time is part of the call).
* :func:`quantize_qkv` — the quantization alone (returns a :class:`QuantizedQKV`).
* :func:`quant_refusal` — why the quantized kernel cannot run some inputs (``None`` if it can).
* :func:`quant_choice` — the registry's quantized-prefill operator for some inputs (or the refusal).

Scale granularities (``quant_granularity``), as SageAttention defines them for the MMA fragment
layout (``m16n8k32`` INT8 MMA; on Hopper a warp owns 16 rows of a 64-row warpgroup tile):

=============  =====================================================  ==============================================
granularity    Q: one scale per                                       K: one scale per
=============  =====================================================  ==============================================
``per_block``  128 consecutive rows                                   64 consecutive keys
``per_warp``   16 consecutive rows (one warp's rows)                  64 consecutive keys
``per_thread`` rows ``r`` of one 16-row slice with equal ``r % 8``    keys ``c`` of one 64-key block with equal
               (8 groups of 2 rows: what one thread's fragment holds) ``(c % 8) // 2`` (4 groups of 16 keys)
``per_token``  row (query token)                                      key
=============  =====================================================  ==============================================

``per_token`` is not one of SageAttention's (its CUDA kernels keep one scale per MMA fragment). The Triton
kernel gathers a Q scale per row for every granularity, and a K scale per key of a tile for ``per_thread``, so
per-token scales take the same loads as ``per_thread`` and ``N`` floats per head for each of Q and K. It is the
finest, and the most accurate on real Q/K/V (docs/QUANT.md); its GPU speed is not measured yet.

Groups are counted from row / key 0 of each head and never cross a 64-key layout block. K is
smoothed first (``smooth_k=True``): the per-channel mean of K over all tokens of each (batch, kv
head) is subtracted before quantizing. That is exact for the output (a per-row constant
``q·mean`` shifts every score of a row; softmax is shift-invariant) and the returned lse gets the
constant back, computed from the unquantized ``q``. Q is smoothed too (``smooth_q=True``): its per-channel
token mean (per query head) is subtracted, and the mean's fp32 product with every smoothed key (``k_bias``)
is added to that key's scores in the kernel, so the scores are the unsmoothed ones. Then the channels are
balanced (``balance_qk=True``): ``q / alpha`` and ``k * alpha`` are quantized with ``alpha =
sqrt(max|q| / max|k|)`` per channel and KV head (:func:`balance_scales`), which leaves ``q·k`` unchanged and
gives both the same range per channel.

Numerics and non-finite inputs: see :mod:`sparseattn.ops.triton.quantize` and
:mod:`sparseattn.ops.triton.block_sparse_fwd_quant`; the PyTorch emulation with the same scales and
rounding is :mod:`sparseattn.ops.quant_reference`. docs/QUANT.md has the accuracy measurements.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from sparseattn._validation import check_attention_args, fail
from sparseattn.layout.block_layout import BlockLayout, cdiv
from sparseattn.ops.kernel_args import ordered_args
from sparseattn.ops.launch_configs import QuantLaunchConfig
from sparseattn.state.types import AttentionState

__all__ = ["quantized_attention", "quantized_prefill", "quantize_qkv", "quant_refusal", "quant_choice", "tuned_configs",
           "use_tuned_configs", "QuantizedQKV", "QUANT_MODES", "GRANULARITIES"]

QUANT_MODES = ("int8", "int8_fp8")
# name -> ((Q rows per slice W, groups per slice T, consecutive rows per group period S), (same for K))
GRANULARITIES: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "per_block": ((128, 1, 1), (64, 1, 1)),
    "per_warp": ((16, 1, 1), (64, 1, 1)),
    "per_thread": ((16, 8, 1), (64, 4, 2)),
    "per_token": ((1, 1, 1), (1, 1, 1)),
}
SUPPORTED_HEAD_DIMS = (64, 128, 256)
SUPPORTED_BLOCK_SIZES = (64, 128)
_LOG2E = 1.4426950408889634
_R = 128  # rows per quantization program (a multiple of every group span)
_FP8_MAX = 448.0
_FIN_TILE = 2048  # partial values per load of the statistics' finishing kernel ([chunks, channels] per step)
_STATS_CHUNKS = 32  # at most this many statistics partials per row: longer inputs give each program more R-row tiles
_STATS_MIN_PROGRAMS = 512  # ... unless that leaves the statistics launch with fewer programs than this
_STATS_R = 32  # rows per tile of the statistics kernel up to head_dim 128 (its [R, D] accumulators stay in
# registers; head_dim 256 takes half as many rows, the same registers: _stats_rows)
_STATS_WARPS = 4  # num_warps of the statistics launches (_kv_stats_kernel)
_ROWS_WARPS = 8  # num_warps of the INT8 quantization launches (_quant_rows_kernel; 4 warps: 1.35x its time at 32K)
_KBIAS_PAD = 256  # k_bias rows are allocated to a multiple of this many keys (covers every SUPPORTED_BLOCK_SIZES block)
_MAX_GRID_Y = 65535


@dataclass(frozen=True)
class QuantizedQKV:
    """Quantized operands for the quantized attention kernel (all on q's device).

    Shapes:
        q_int8 ``(B, H, N_q, D)`` int8; q_scale ``(B, H, G_q)`` float32 (``sm_scale * log2(e)``
        folded in); q_row ``(B, H, N_q)`` float32 (``sm_scale * q·k_mean``, NaN for a non-finite row);
        k_int8 ``(B, H_kv, N_kv, D)`` int8 of the smoothed K; k_scale ``(B, H_kv, G_k)`` float32 (NaN
        for a group holding a non-finite entry); k_mean ``(B, H_kv, D)`` float32 (zeros without
        smoothing); v: the input V (``quant="int8"``) or e4m3 values stored transposed ``(B, H_kv, D,
        N_pad)`` (float8_e4m3fn; bfloat16 holding e4m3 values when ``fp8_emulated``); v_scale
        ``(B, H_kv, D)`` float32 per-channel scale (``amax_d / 448``) or ``None``; q_mean ``(B, H, D)``
        float32, the per-channel token mean of Q subtracted before quantizing (``None`` without Q smoothing);
        k_bias ``(B, H, N_kv)`` float32, ``sm_scale * log2(e) * q_mean · (k - k_mean)`` per query head and key,
        added to every score of that key (``None`` without Q smoothing); qk_alpha ``(B, H_kv, D)`` float32, the
        per-channel balancing factor (Q quantized as ``q / alpha``, K as ``k * alpha``; ``None`` without it).
    """

    q_int8: torch.Tensor
    q_scale: torch.Tensor
    q_row: torch.Tensor
    k_int8: torch.Tensor
    k_scale: torch.Tensor
    k_mean: torch.Tensor
    v: torch.Tensor
    v_scale: torch.Tensor | None
    quant: str
    granularity: str
    sm_scale: float
    fp8_emulated: bool
    q_mean: torch.Tensor | None = None
    k_bias: torch.Tensor | None = None
    qk_alpha: torch.Tensor | None = None


def _interpret() -> bool:
    from sparseattn.ops.triton_launch import interpret_mode

    return interpret_mode()


@functools.lru_cache(maxsize=64)
def _capability_of(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def gpu_refusal(capability: tuple[int, int], quant: str, device: str = "cuda") -> str | None:
    """Why a GPU of this compute capability cannot run ``quant`` (``None`` if it can)."""
    major, minor = capability
    if (major, minor) < (8, 0):
        return f"INT8 tensor-core attention needs compute capability >= 8.0; {device} has {major}.{minor}"
    if quant == "int8_fp8" and (major, minor) < (8, 9):
        return (f"quant='int8_fp8' needs FP8 (e4m3) tensor cores, compute capability >= 8.9 (Ada/Hopper); "
                f"{device} has {major}.{minor}: use quant='int8'")
    return None


def quant_refusal(q: Any, *, quant: str = "int8", layout: BlockLayout | None = None, **_: Any) -> str | None:
    """``None`` if the quantized kernel supports these inputs, else the reason (device, dtype, head_dim, GPU)."""
    if not isinstance(q, torch.Tensor):
        return f"q is a {type(q).__name__}, not a torch.Tensor"
    if q.device.type == "cuda":
        idx = q.device.index if q.device.index is not None else torch.cuda.current_device()
        reason = gpu_refusal(_capability_of(idx), quant, str(q.device))
        if reason is not None:
            return reason
    elif q.device.type == "cpu":
        if not _interpret():
            return "q is on the CPU; the quantized kernel needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter)"
    else:
        return f"q is on {q.device}; the quantized kernel needs CUDA tensors"
    from sparseattn.ops.triton_launch import support_refusal

    return support_refusal(q, layout, (torch.float16, torch.bfloat16), SUPPORTED_HEAD_DIMS, SUPPORTED_BLOCK_SIZES,
                           _MAX_GRID_Y, " by the quantized kernel")


_KERNEL_OP = "quant_triton"  # the built-in quantized operator (ops/_builtin_ops.py): this module's kernel


def quant_choice(q: Any, *, quant: str = "int8", layout: BlockLayout | None = None,
                 names: tuple[str, ...] | None = None) -> tuple[Any, str | None]:
    """The quantized-prefill operator that runs these inputs, asked of the registry (no error raised).

    Lists the ``"quant_prefill"`` operators of the ``"quant"`` entry point in priority order (only
    ``names`` if given) and returns ``(operator, None)`` for the first that accepts, else ``(None, the
    first operator's refusal)`` (:func:`quant_refusal` for the built-in kernel).
    """
    from sparseattn.ops.registry import operator_refusals, operators

    first: str | None = None
    for op in operators("quant_prefill", entry_point="quant"):
        if names is not None and op.name not in names:
            continue
        why = operator_refusals((op,), q, quant=quant, layout=layout)[op.name]
        if why is None:
            return op, None
        if first is None:
            first = why
    return None, first if first is not None else "no quantized prefill operator is registered"


def _kernel_refusal(q: Any, quant: str, layout: BlockLayout | None = None) -> str | None:
    """The built-in quantized operator's refusal, from the registry (``quantize_qkv`` runs its kernels only)."""
    return quant_choice(q, quant=quant, layout=layout, names=(_KERNEL_OP,))[1]


def _check_modes(fn: str, quant: Any, granularity: Any) -> None:
    if quant not in QUANT_MODES:
        raise fail(fn, "quant", "is unknown", f"one of {list(QUANT_MODES)}", repr(quant))
    if granularity not in GRANULARITIES:
        raise fail(fn, "quant_granularity", "is unknown", f"one of {list(GRANULARITIES)}", repr(granularity))


def _fp8_storage(device: torch.device) -> tuple[torch.dtype, bool]:
    """(dtype of the stored e4m3 values, emulated?): bf16 under the interpreter (numpy has no fp8)."""
    if device.type == "cpu":
        return torch.bfloat16, True
    return torch.float8_e4m3fn, False


def quantize_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, quant: str = "int8",
                 quant_granularity: str = "per_warp", scale: float | None = None, smooth_k: bool = True,
                 smooth_q: bool = True, balance_qk: bool = True) -> QuantizedQKV:
    """Quantize ``q``, ``k`` (both smoothed) and, for ``"int8_fp8"``, ``v`` with the fused Triton kernels.

    Args:
        q: ``(B, H, N_q, D)`` bf16/fp16; k, v: ``(B, H_kv, N_kv, D)``.
        quant: ``"int8"`` or ``"int8_fp8"``.
        quant_granularity: ``"per_block"``, ``"per_warp"``, ``"per_thread"`` or ``"per_token"`` (module docstring).
        scale: softmax scale (default ``D ** -0.5``), folded into the Q scales.
        smooth_k: subtract the per-channel token mean of K before quantizing.
        smooth_q: subtract the per-channel token mean of Q (per query head) before quantizing; its product
            with every (smoothed) key is computed in fp32 (``k_bias``) and added to that key's scores.
        balance_qk: quantize ``q / alpha`` and ``k * alpha`` per channel (:func:`balance_scales`; exact for Q·Kᵀ).

    Returns:
        :class:`QuantizedQKV`.
    """
    fn = "quantize_qkv"
    _check_modes(fn, quant, quant_granularity)
    _check_smoothing(fn, smooth_k, smooth_q, balance_qk)
    (B, H, Hkv, Nq, Nkv, D), sm_scale = check_attention_args(fn, q, k, v, causal=False, layout=None, scale=scale,
                                                              pv_threshold=None)
    reason = _kernel_refusal(q, quant)
    if reason is not None:
        raise NotImplementedError(f"{fn}: the quantized kernel cannot run these inputs: {reason}")
    return _quantize(q, k, v, quant, quant_granularity, sm_scale, smooth_k, smooth_q, balance_qk)


def _check_smoothing(fn: str, smooth_k: Any, smooth_q: Any, balance_qk: Any = True) -> None:
    for name, val in (("smooth_k", smooth_k), ("smooth_q", smooth_q), ("balance_qk", balance_qk)):
        if not isinstance(val, bool):
            raise fail(fn, name, "must be a bool", "True or False", repr(val))


def balance_scales(q_range: torch.Tensor, k_range: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel Q/K balancing (SmoothQuant's migration, strength 1/2, applied to Q·Kᵀ): ``alpha_d =
    sqrt(max|q_d| / max|k_d|)``, ``q_d / alpha_d`` and ``k_d * alpha_d`` are quantized, so their product is
    unchanged and both carry the same range per channel.

    Args:
        q_range: ``(B, H, D)`` float32, the (smoothed) query range per head and channel; the KV head's
            ``alpha`` uses the largest over its query heads.
        k_range: ``(B, H_kv, D)`` float32, the (smoothed) key range.

    Returns:
        ``(1 / alpha, alpha)``, both ``(B, H_kv, D)`` float32; ``alpha = 1`` where a range is 0 or not finite.
    """
    B, H, D = q_range.shape
    Hkv = k_range.shape[1]
    qr = q_range.reshape(B, Hkv, H // Hkv, D).amax(2)
    ok = (qr > 0) & (k_range > 0) & torch.isfinite(qr) & torch.isfinite(k_range)
    one = torch.ones_like(qr)
    # the square root of the fp32 quotient, correctly rounded as the kernel's sqrt_rn (some CPU builds of torch.sqrt
    # on float32 are not; float64 then one rounding to float32 is)
    ratio = torch.where(ok, qr, one) / torch.where(ok, k_range, one)
    alpha = torch.where(ok, torch.sqrt(ratio.double()).float(), one)
    return one / alpha, alpha


def _rows_per_program(head_dim: int, slice_rows: int) -> int:
    """Rows per program of the INT8 quantization launches: ``_R`` (128), or 64 at head_dim 256 where the
    granularity's row slice divides 64 (all but ``per_block`` Q). Compiled offline for sm_90a (ptxas 13.4, 8 warps),
    128 rows at head_dim 256 spill 1.3-1.4 KB per thread (K and Q); 64 rows spill 0 / 8 bytes. On an H100 (thirty-second
    session, Gemma-3's global-layer shape at 32K) the quantization kernels took 88.8 µs against 108.7 with 128 rows."""
    return 64 if head_dim >= 256 and 64 % slice_rows == 0 else _R


def _stats_rows(head_dim: int) -> int:
    """Rows per tile of the statistics kernel: ``_STATS_R``, halved for head_dim 256 so that its three ``[rows, D]``
    register accumulators hold as many values per thread as at head_dim 128 (on an H100 at head_dim 256 and 32K:
    68.5 µs against 78.3 with 32 rows, thirty-second session)."""
    return _STATS_R * 128 // max(head_dim, 128)


def _stats_steps(n_tiles: int, rows: int) -> int:
    """Row tiles (:func:`_stats_rows`) per program of the statistics kernel for ``rows`` (batch, head) rows of ``n_tiles``
    tiles: enough that a row leaves at most ``_STATS_CHUNKS`` partials for the finishing kernel (whose few programs
    read them all; with one tile per program it took 252 µs at 32K on an H100), but never so many that the launch has
    fewer than ``_STATS_MIN_PROGRAMS`` programs."""
    return max(1, min(cdiv(n_tiles, _STATS_CHUNKS), (n_tiles * rows) // _STATS_MIN_PROGRAMS))


def _finalize_channels(nc_k: int, nc_q: int, group: int) -> int:
    """Channels per program of the statistics' finishing kernel: 32, or 16 / 8 where that takes fewer serial steps.

    A program walks K's ``nc_k`` chunk partials and then, for each of the ``group`` query heads of its KV head, Q's
    ``nc_q``, loading ``_FIN_TILE // channels`` partials per step. Narrower programs take fewer, wider steps (and
    there are more of them). Measured on an H100 (thirty-second session): Gemma-3's global layers (one KV head,
    head_dim 256, 512 + 4 x 128 partials at 32K) 33 -> 14.5 µs with 8 channels; the Llama shape at 32K (64 + 4 x 32
    partials, one step each either way) 13.0 µs with 32 channels, 13.7 with 8 — so the width narrows only when that
    saves steps."""
    def steps(db: int) -> int:
        ch = _FIN_TILE // db
        return cdiv(nc_k, ch) + group * cdiv(nc_q, ch)

    return min((32, 16, 8), key=steps)  # the widest of the fewest steps (min keeps the first)


def _quantize(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, quant: str, gran: str, sm_scale: float,
              smooth_k: bool, smooth_q: bool = True, balance_qk: bool = True) -> QuantizedQKV:
    from sparseattn.ops.triton import quantize as kq

    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    B, H, Nq, D = q.shape
    Hkv, Nkv = k.shape[1], k.shape[2]
    dev = q.device
    fp8 = quant == "int8_fp8"
    (qw, qt, qs_), (kw, kt, ks_) = GRANULARITIES[gran]
    n_chunks = cdiv(Nkv, _R)  # R-row tiles of the FP8 V kernel
    rs = _stats_rows(D)  # rows per tile of the statistics kernel
    k_steps = _stats_steps(cdiv(Nkv, rs), B * Hkv)
    nk_stats = cdiv(cdiv(Nkv, rs), k_steps)

    f32 = dict(dtype=torch.float32, device=dev)
    ksum = vmax = kmax = kmin = None
    need_k = smooth_k or balance_qk
    need_q = smooth_q or balance_qk
    if need_k or fp8:
        ksum = torch.empty((B * Hkv, nk_stats, D), **f32) if need_k else None
        vmax = torch.empty((B * Hkv, nk_stats, D), **f32) if fp8 else None
        if balance_qk:
            kmax, kmin = torch.empty((B * Hkv, nk_stats, D), **f32), torch.empty((B * Hkv, nk_stats, D), **f32)
        dummy = ksum if ksum is not None else vmax
        kq._kv_stats_kernel[(nk_stats, B * Hkv)](
            k, v, ksum if ksum is not None else dummy, vmax if vmax is not None else dummy,
            kmax if kmax is not None else dummy, kmin if kmin is not None else dummy,
            k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
            Hkv, Nkv, nk_stats, k_steps, HEAD_DIM=D, R=rs, NEED_K=need_k, NEED_V=fp8, NEED_RANGE=balance_qk,
            num_warps=_STATS_WARPS)
    # written by the finishing kernel below when it runs (zeros without K smoothing)
    k_mean = torch.empty((B, Hkv, D), **f32) if (need_k or need_q) else torch.zeros((B, Hkv, D), **f32)
    mult = float(sm_scale) * _LOG2E
    q_mean = k_bias = None
    ch_q = ch_k = None
    q_steps = _stats_steps(cdiv(Nq, rs), B * H)
    nq_chunks = cdiv(cdiv(Nq, rs), q_steps)
    qsum = qmax = qmin = None
    if need_q:  # per-channel statistics of the finite entries of Q per query head (the same kernel)
        qsum = torch.empty((B * H, nq_chunks, D), **f32)
        qmax = torch.empty((B * H, nq_chunks, D), **f32) if balance_qk else qsum
        qmin = torch.empty((B * H, nq_chunks, D), **f32) if balance_qk else qsum
        kq._kv_stats_kernel[(nq_chunks, B * H)](
            q, q, qsum, qsum, qmax, qmin, q.stride(0), q.stride(1), q.stride(2), q.stride(0), q.stride(1), q.stride(2),
            H, Nq, nq_chunks, q_steps, HEAD_DIM=D, R=rs, NEED_K=True, NEED_V=False, NEED_RANGE=balance_qk,
            num_warps=_STATS_WARPS)
        if smooth_q:
            q_mean = torch.empty((B, H, D), **f32)
            # rows padded to a multiple of _KBIAS_PAD keys: the kernel reads bias tiles unmasked (_kbias_for_launch)
            kb_cols = cdiv(Nkv, _KBIAS_PAD) * _KBIAS_PAD
            k_bias = torch.empty((B, H, kb_cols), **f32)
            if kb_cols > Nkv:
                k_bias[..., Nkv:].zero_()
            k_bias = k_bias[..., :Nkv]
        if balance_qk:
            ch_q, ch_k = torch.empty((B, Hkv, D), **f32), torch.empty((B, Hkv, D), **f32)
    if need_k or need_q:
        # means, ranges and balancing factors from the chunk partials, one launch (balance_scales' arithmetic)
        nc_k, nc_q = (nk_stats if need_k else 0), (nq_chunks if need_q else 0)
        fin_db = _finalize_channels(nc_k, nc_q, H // Hkv)
        kq._qk_finalize_kernel[(B * Hkv, D // fin_db)](
            ksum if ksum is not None else k_mean, kmax if kmax is not None else k_mean,
            kmin if kmin is not None else k_mean, qsum if qsum is not None else k_mean,
            qmax if qmax is not None else k_mean, qmin if qmin is not None else k_mean, k_mean,
            q_mean if q_mean is not None else k_mean, ch_q if ch_q is not None else k_mean,
            ch_k if ch_k is not None else k_mean, H // Hkv, nc_k, nc_q,
            Nkv, Nq, HEAD_DIM=D, DB=fin_db, CH=_FIN_TILE // fin_db, SMOOTH_K=smooth_k, SMOOTH_Q=smooth_q, BALANCE=balance_qk)

    # K (with Q smoothing, also k_bias = mult * q_mean . (k - k_mean) for each query head of the KV head)
    nkg = cdiv(Nkv, kw) * kt
    k_int8 = torch.empty((B, Hkv, Nkv, D), dtype=torch.int8, device=dev)
    k_scale = torch.empty((B, Hkv, nkg), dtype=torch.float32, device=dev)
    qm_t = q_mean if q_mean is not None else k_mean
    kb_t = k_bias if k_bias is not None else k_scale
    chk_t = ch_k if ch_k is not None else k_mean
    chq_t = ch_q if ch_q is not None else k_mean
    rk = _rows_per_program(D, kw)
    kq._quant_rows_kernel[(cdiv(Nkv, rk), B * Hkv)](
        k, k_int8, k_scale, k_mean, k_scale, qm_t, kb_t, chk_t,
        k.stride(0), k.stride(1), k.stride(2), k_int8.stride(0), k_int8.stride(1), k_int8.stride(2),
        k_scale.stride(0), k_scale.stride(1), k_mean.stride(0), k_mean.stride(1), k_scale.stride(0), k_scale.stride(1),
        qm_t.stride(0), qm_t.stride(1), kb_t.stride(0), kb_t.stride(1), chk_t.stride(0), chk_t.stride(1),
        Hkv, 1, H // Hkv, Nkv, nkg, 1.0, mult,
        HEAD_DIM=D, R=rk, W=kw, T=kt, S=ks_, IS_Q=False, HAS_MEAN=smooth_k, HAS_QMEAN=smooth_q, HAS_CH=balance_qk,
        num_warps=_ROWS_WARPS)
    # Q
    nqg = cdiv(Nq, qw) * qt
    q_int8 = torch.empty((B, H, Nq, D), dtype=torch.int8, device=dev)
    q_scale = torch.empty((B, H, nqg), dtype=torch.float32, device=dev)
    q_row = torch.empty((B, H, Nq), dtype=torch.float32, device=dev)
    rq = _rows_per_program(D, qw)
    kq._quant_rows_kernel[(cdiv(Nq, rq), B * H)](
        q, q_int8, q_scale, k_mean, q_row, qm_t, q_row, chq_t,
        q.stride(0), q.stride(1), q.stride(2), q_int8.stride(0), q_int8.stride(1), q_int8.stride(2),
        q_scale.stride(0), q_scale.stride(1), k_mean.stride(0), k_mean.stride(1), q_row.stride(0), q_row.stride(1),
        qm_t.stride(0), qm_t.stride(1), q_row.stride(0), q_row.stride(1), chq_t.stride(0), chq_t.stride(1),
        H, H // Hkv, 1, Nq, nqg, mult, 1.0,
        HEAD_DIM=D, R=rq, W=qw, T=qt, S=qs_, IS_Q=True, HAS_MEAN=smooth_k, HAS_QMEAN=smooth_q, HAS_CH=balance_qk,
        num_warps=_ROWS_WARPS)
    # V
    v_scale = None
    emulated = False
    vq = v
    if fp8:
        amax = vmax.amax(1)  # (B*Hkv, D), finite entries only
        amax = torch.where(amax > 0, amax, torch.ones_like(amax))
        v_scale = (amax / _FP8_MAX).view(B, Hkv, D)
        inv = (torch.full_like(amax, _FP8_MAX) / amax).contiguous()  # not 448 / amax: that is reciprocal * 448
        store, emulated = _fp8_storage(dev)
        n_pad = cdiv(Nkv, 64) * 64
        vq = torch.empty((B, Hkv, D, n_pad), dtype=store, device=dev)
        kq._quant_v_fp8_kernel[(n_chunks, B * Hkv)](
            v, vq, inv, v.stride(0), v.stride(1), v.stride(2), vq.stride(0), vq.stride(1), vq.stride(2),
            Hkv, Nkv, HEAD_DIM=D, R=_R, FP8_EMU=emulated)
    return QuantizedQKV(q_int8, q_scale, q_row, k_int8, k_scale, k_mean, vq, v_scale, quant, gran, float(sm_scale), emulated,
                        q_mean, k_bias, ch_k)


def default_quant_config(head_dim: int, layout_bm: int, layout_bn: int, *, interpret: bool,
                         device: str | None = None) -> dict[str, int]:
    """The fixed launch config of the quantized kernel (tiles nest in the layout blocks).

    On a GPU: the shipped per-device choice for ``(head_dim, layout block_m)`` (``ops/tuned/quant.json``
    through the registry; ``device`` a device name, ``None`` = the file's fallback device), else a small
    config that nests in every layout.
    """
    if interpret:
        return {"BLOCK_M": layout_bm, "BLOCK_N": 64, "num_warps": 4, "num_stages": 1}
    cfg = _shipped_quant_config(head_dim, layout_bm, layout_bn, device)
    if cfg is not None:
        return dict(cfg)
    return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}


@functools.lru_cache(maxsize=256)
def _shipped_quant_config(head_dim: int, layout_bm: int, layout_bn: int, device: str | None) -> dict[str, int] | None:
    """The shipped fixed config (checked as a QuantLaunchConfig), looked up once per (shape, device)."""
    from sparseattn.ops.registry import tuned_config

    cfg = tuned_config(_KERNEL_OP, device, head_dim=head_dim, layout_block_m=layout_bm, layout_block_n=layout_bn)
    if cfg is None or layout_bm % cfg["BLOCK_M"] or layout_bn % cfg["BLOCK_N"]:
        return None
    return QuantLaunchConfig.from_dict(cfg).to_dict()


# Autotune candidates per head_dim (CUDA only): (BLOCK_M, BLOCK_N, num_warps, num_stages, maxnreg or None).
# The first call of a key (head_dim, layout blocks, causal, quant, granularity, length bucket, dtype,
# device) times each candidate that nests in the layout blocks (do_bench) and keeps the fastest;
# SPARSEATTN_QUANT_AUTOTUNE=0 uses default_quant_config instead. Where the inputs can use tensor
# descriptors (sm_90+), _TMA_CANDIDATES are timed too: (BLOCK_M, BLOCK_N, num_warps, num_stages, maxnreg, PREFETCH),
# all with USE_TMA. Measured on an H100 (2026-12-05, benchmarks/quant_kernel_variants.py, 32K causal, D=128): TMA
# loads take the default int8 launch from 20.9 to 18.1 ms; PREFETCH slows it (19.3 ms, and int8_fp8 too), so only
# the 128x128 tile keeps a PREFETCH twin; 128x128 with TMA is the int8_fp8 winner (21.0 ms; 35.0 for 128x64 pointers).
_TUNE_CANDIDATES: dict[int, list[tuple[int, int, int, int, int | None]]] = {
    64: [(128, 64, 8, 2, None), (128, 64, 8, 2, 128), (128, 128, 8, 2, None), (64, 64, 4, 3, None)],
    128: [(128, 64, 8, 2, None), (128, 64, 8, 2, 128), (128, 128, 8, 2, None), (64, 64, 4, 3, None)],
    256: [(64, 64, 4, 2, None), (128, 64, 8, 2, None), (64, 32, 4, 2, None)],
}
_TMA_CANDIDATES: dict[int, list[tuple[int, int, int, int, int | None, bool]]] = {
    64: [(128, 64, 8, 2, 128, False), (128, 128, 8, 2, None, False), (128, 128, 8, 2, None, True)],
    128: [(128, 64, 8, 2, 128, False), (128, 64, 8, 3, 128, False), (128, 128, 8, 2, None, False),
          (128, 128, 8, 2, None, True)],
    256: [(64, 64, 4, 2, None, False)],
}
_TUNED_MAX = 128
_TUNED: Any = None  # BoundedCache keyed by launch facts and the device *name* (as the prefill launcher's)
# The remembered winners as data: TunedConfigs entries per device name (ops/registry.py), JSON on disk.
_KEY_FIELDS = ("head_dim", "layout_block_m", "layout_block_n", "causal", "quant", "granularity", "n_ctx_log2", "dtype",
               "device")
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
_CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")
_NO_TMA_WARNED: list[bool] = []  # the TMA-less launch of a remembered TMA winner warns once per process
_SWITCHES = ("USE_TMA", "PREFETCH", "TMA_QO")  # the kernel's boolean load-path switches
_CONFIG_OPTIONAL = _SWITCHES + ("maxnreg",)  # and the compiler's register cap


def _tuned_cache() -> Any:
    global _TUNED
    if _TUNED is None:
        from sparseattn._cache import BoundedCache

        _TUNED = BoundedCache(_TUNED_MAX, name="quant._TUNED")
    return _TUNED


def _device_name(dev: torch.device) -> str:
    from sparseattn.ops.registry import device_name

    return device_name(dev)


def _tune_key(D: int, layout: BlockLayout, causal: bool, quant: str, gran: str, n_key: int, dtype: torch.dtype,
              dev: torch.device) -> tuple[Any, ...]:
    name = _device_name(dev)
    _seed_shipped(name)
    return (D, layout.block_m, layout.block_n, causal, quant, gran, n_key, dtype, name)


def tuned_configs() -> Any:
    """The quantized kernel's autotune winners remembered so far, per device name (a
    :class:`~sparseattn.ops.registry.TunedConfigs` of operator ``"quant_triton"``; save it with
    :func:`~sparseattn.ops.registry.save_tuned_configs`)."""
    from sparseattn.ops.registry import TunedConfigs, TunedEntry

    cache = _tuned_cache()
    devices: dict[str, list[Any]] = {}
    for key in cache.keys():
        cfg = cache.get(key)
        if cfg is None or not isinstance(key, tuple) or len(key) != len(_KEY_FIELDS):
            continue
        m = dict(zip(_KEY_FIELDS, key))
        dev = m.pop("device")
        m["dtype"] = str(m["dtype"]).replace("torch.", "")
        devices.setdefault(dev, []).append(TunedEntry(m, dict(cfg)))
    return TunedConfigs(_KERNEL_OP, {d: tuple(e) for d, e in devices.items()})


def use_tuned_configs(configs: Any) -> int:
    """Seed the quantized kernel's remembered winners from ``configs`` (operator ``"quant_triton"``); returns the count.

    A seeded key launches its config directly (no autotuning) on GPUs of that device name.
    """
    from sparseattn.ops.registry import check_tuned_configs

    fn = "quant.use_tuned_configs"
    check_tuned_configs(fn, configs, _KERNEL_OP)
    fields = [f for f in _KEY_FIELDS if f != "device"]
    todo: list[tuple[tuple[Any, ...], dict[str, int]]] = []
    for dev, entries in configs.devices.items():
        for i, e in enumerate(entries):
            m = e.match
            if sorted(m) != sorted(fields) or m.get("dtype") not in _DTYPES or m.get("quant") not in QUANT_MODES \
                    or m.get("granularity") not in GRANULARITIES:
                raise fail(fn, f"configs.devices[{dev!r}][{i}].match", "is not a launch key of the quantized kernel",
                           f"keys {fields} (dtype float16/bfloat16, quant in {list(QUANT_MODES)})", repr(m))
            c = e.config
            ok = set(_CONFIG_KEYS) <= set(c) <= set(_CONFIG_KEYS) | set(_CONFIG_OPTIONAL) and all(
                isinstance(x, bool) if f in _SWITCHES else (isinstance(x, int) and not isinstance(x, bool) and x > 0)
                for f, x in c.items())
            if not ok or m["layout_block_m"] % c["BLOCK_M"] or m["layout_block_n"] % c["BLOCK_N"]:
                raise fail(fn, f"configs.devices[{dev!r}][{i}].config", "is not a launch config of the quantized kernel",
                           f"positive ints {list(_CONFIG_KEYS)} (and maxnreg; bools {list(_SWITCHES)}), tiles "
                           "dividing the layout blocks", repr(c))
            key = (int(m["head_dim"]), int(m["layout_block_m"]), int(m["layout_block_n"]), bool(m["causal"]), m["quant"],
                   m["granularity"], int(m["n_ctx_log2"]), _DTYPES[m["dtype"]], dev)
            todo.append((key, dict(c)))
    cache = _tuned_cache()
    for key, cfg in todo:  # all checked first: a bad entry seeds nothing
        cache.put(key, cfg)
    return len(todo)


@functools.lru_cache(maxsize=64)
def _seed_shipped(dev_name: str) -> None:
    """Seed the autotune winners the package ships for this device name (ops/tuned/quant.json, once per name).

    Only entries keyed by a whole launch key are autotune winners (none shipped yet); the file's entries
    keyed by (head_dim, layout block_m) are the fixed config (:func:`default_quant_config`).
    """
    from sparseattn.ops.registry import shipped_launch_winners

    winners = shipped_launch_winners(_KERNEL_OP, dev_name, [f for f in _KEY_FIELDS if f != "device"])
    if winners is not None:
        use_tuned_configs(winners)


def _autotune(key: tuple[Any, ...], D: int, layout: BlockLayout, launch: Any,
              tma: bool | Callable[[], bool] = False) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The remembered winner of ``key``, else time every candidate that nests in the layout and keep the fastest.

    ``tma``: whether the TMA candidates are timed too (a callable is asked only when this call benchmarks).

    Returns ``(config, tune record)``; the record (``times_ms`` per candidate, ``errors`` of candidates that
    failed) only when this call benchmarked, else ``None``.
    """
    cache = _tuned_cache()
    cfg = cache.get(key)
    if cfg is not None:
        return cfg, None
    from triton.testing import do_bench

    best: tuple[float, dict[str, Any]] | None = None
    times: dict[str, float] = {}
    errors: list[dict[str, Any]] = []
    cands: list[tuple[tuple[int, int, int, int, int | None], dict[str, bool]]] = [
        (c, {}) for c in _TUNE_CANDIDATES.get(D, _TUNE_CANDIDATES[128])]
    if tma() if callable(tma) else tma:
        cands += [(c[:5], {"USE_TMA": True, "PREFETCH": c[5]}) for c in _TMA_CANDIDATES.get(D, _TMA_CANDIDATES[128])]
    for (bm, bn, w, st, nreg), flags in cands:
        if layout.block_m % bm or layout.block_n % bn:
            continue
        cand: dict[str, Any] = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": st, **flags}
        if nreg is not None:
            cand["maxnreg"] = nreg
        try:
            ms = float(do_bench(lambda cand=cand: launch(cand), warmup=5, rep=25, return_mode="median"))
        except Exception as exc:  # a config that does not compile or launch here
            ms = float("inf")
            errors.append({"config": cand, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
        times[repr(cand)] = ms
        if best is None or ms < best[0]:
            best = (ms, cand)
    if best is None or best[0] == float("inf"):
        best = (float("nan"), default_quant_config(D, layout.block_m, layout.block_n, interpret=False,
                                                   device=key[-1]))
    cache.put(key, best[1])
    return best[1], {"key": repr(key), "times_ms": times, "errors": errors, "chosen": dict(best[1])}


@functools.lru_cache(maxsize=None)
def _kernel() -> Any:
    from sparseattn.ops.triton import block_sparse_fwd_quant as mod

    return mod._block_sparse_fwd_quant_kernel


def _kbias_for_launch(k_bias: torch.Tensor, cols: int) -> torch.Tensor:
    """``k_bias`` as the kernel reads it: every ``(b, h)`` row readable for ``cols`` keys from its start, unit key
    stride. The kernel loads bias tiles without a mask, up to the layout's rounded key count. ``quantize_qkv``
    allocates the rows padded, so this returns its tensor unchanged; any other tensor (a user's, or a
    layout with larger blocks than the padding) is copied into a padded one. Reads only shapes and strides: no sync.
    """
    B, H, N = k_bias.shape
    end = k_bias.storage_offset() + (B - 1) * k_bias.stride(0) + (H - 1) * k_bias.stride(1) + cols
    if k_bias.stride(2) == 1 and end <= k_bias.untyped_storage().nbytes() // k_bias.element_size():
        return k_bias
    padded = torch.zeros((B, H, max(cols, N)), dtype=k_bias.dtype, device=k_bias.device)
    padded[..., :N] = k_bias
    return padded


def _run_kernel(qq: QuantizedQKV, layout: BlockLayout, causal: bool, out_dtype: torch.dtype,
                config: dict[str, int] | None, out: torch.Tensor | None = None,
                telemetry: dict[str, Any] | None = None) -> AttentionState:
    """Launch the quantized kernel; ``telemetry`` (a dict, optional) is filled with the launch record
    (see :func:`quantized_attention`)."""
    from sparseattn.ops.triton_launch import _LAUNCH_LOCK

    B, H, Nq, D = qq.q_int8.shape
    Hkv, Nkv = qq.k_int8.shape[1], qq.k_int8.shape[2]
    dev = qq.q_int8.device
    interp = _interpret()
    if isinstance(config, QuantLaunchConfig):
        config = config.to_dict()
    if config is not None:
        need = {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"}
        if not isinstance(config, dict) or not need <= set(config) <= need | set(_CONFIG_OPTIONAL):
            raise fail("quantized_attention", "config", "must name exactly the launch parameters",
                       sorted(need) + [f"({o})" for o in _CONFIG_OPTIONAL], repr(config))
        if layout.block_m % config["BLOCK_M"] or layout.block_n % config["BLOCK_N"]:
            raise fail("quantized_attention", "config", "tiles must divide the layout blocks",
                       f"divisors of ({layout.block_m}, {layout.block_n})", f"({config['BLOCK_M']}, {config['BLOCK_N']})")
        for f in _SWITCHES:
            if f in config and not isinstance(config[f], bool):
                raise fail("quantized_attention", "config", f"has a bad {f}", "True or False", repr(config[f]))
        nreg = config.get("maxnreg")
        if nreg is not None and (isinstance(nreg, bool) or not isinstance(nreg, int) or not 24 <= nreg <= 255):
            raise fail("quantized_attention", "config", "has a bad maxnreg", "an int in [24, 255] or None", repr(nreg))
        if config.get("USE_TMA") and not _quant_tma_usable(qq):
            raise fail("quantized_attention", "config", "asks for TMA loads these inputs cannot use",
                       "CUDA sm_90+ (or the interpreter), 16-byte aligned K/V rows and heads, Triton with tensor "
                       "descriptors", repr(config))
    (qw, qt, qs_), (kw, kt, ks_) = GRANULARITIES[qq.granularity]
    fp8 = qq.quant == "int8_fp8"
    if out is None:
        out = torch.empty((B, H, Nq, D), dtype=out_dtype, device=dev)
    if config is not None and config.get("TMA_QO") and not _quant_tma_usable(qq, qq.q_int8, out):
        raise fail("quantized_attention", "config", "asks for TMA Q/O transfers these inputs cannot use",
                   "CUDA sm_90+ (or the interpreter), 16-byte aligned Q, K, V and out rows and heads, Triton with tensor "
                   "descriptors", repr(config))
    lse = torch.empty((B, H, Nq), dtype=torch.float32, device=dev)
    v = qq.v
    if fp8:
        sv = (v.stride(0), v.stride(1), v.stride(2))  # [B, Hkv, D, N_pad]: the D stride
        vsc = (qq.v_scale / _FP8_MAX).reshape(B * Hkv, D).contiguous()
    else:
        sv = (v.stride(0), v.stride(1), v.stride(2))  # [B, Hkv, N, D]: the token stride
        vsc = lse  # unused
    num_t, idx_t = layout.kv_num_blocks, layout.kv_indices
    list_chunk = min(max(16, 1 << (layout.num_kv_blocks - 1).bit_length()), 1024)
    meta = dict(HEAD_DIM=D, LAYOUT_BM=layout.block_m, LAYOUT_BN=layout.block_n, CAUSAL=causal, QW=qw, QT=qt, QS=qs_,
                KW=kw, KT=kt, KS=ks_, PV_FP8=fp8, FP8_EMU=qq.fp8_emulated,
                DOT_F32=bool(interp and v.dtype == torch.bfloat16 and not fp8), LIST_CHUNK=list_chunk,
                HAS_KBIAS=qq.k_bias is not None)
    kbias = (_kbias_for_launch(qq.k_bias, layout.num_kv_blocks * layout.block_n) if qq.k_bias is not None
             else lse)  # lse: unused without Q smoothing
    args = ordered_args(_kernel(), dict(
        Q=qq.q_int8, K=qq.k_int8, V=v, Out=out, Lse=lse, QScale=qq.q_scale, KScale=qq.k_scale, QRow=qq.q_row,
        VScale=vsc, KvNum=num_t, KvIdx=idx_t, KBias=kbias,
        stride_qb=qq.q_int8.stride(0), stride_qh=qq.q_int8.stride(1), stride_qm=qq.q_int8.stride(2),
        stride_kb=qq.k_int8.stride(0), stride_kh=qq.k_int8.stride(1), stride_kn=qq.k_int8.stride(2),
        stride_vb=sv[0], stride_vh=sv[1], stride_v2=sv[2],
        stride_ob=out.stride(0), stride_oh=out.stride(1), stride_om=out.stride(2),
        stride_lb=lse.stride(0), stride_lh=lse.stride(1),
        stride_qsb=qq.q_scale.stride(0), stride_qsh=qq.q_scale.stride(1),
        stride_ksb=qq.k_scale.stride(0), stride_ksh=qq.k_scale.stride(1),
        stride_rb=qq.q_row.stride(0), stride_rh=qq.q_row.stride(1),
        stride_kbb=kbias.stride(0), stride_kbh=kbias.stride(1),
        stride_nb=num_t.stride(0), stride_nh=num_t.stride(1), stride_nm=num_t.stride(2),
        stride_ib=idx_t.stride(0), stride_ih=idx_t.stride(1), stride_im=idx_t.stride(2), stride_in=idx_t.stride(3),
        H=H, GROUP=H // Hkv, N_Q=Nq, N_KV=Nkv, NUM_KV_BLOCKS=layout.num_kv_blocks,
    ))

    def launch(c: dict[str, int]) -> Any:
        opts = {"maxnreg": int(c["maxnreg"])} if c.get("maxnreg") is not None else {}
        flags = {f: c[f] for f in _SWITCHES if f in c}  # Python bools, checked where the config came in
        if (flags.get("USE_TMA") or flags.get("TMA_QO")) and dev.type == "cuda":
            from sparseattn.ops.triton_launch import _set_tma_allocator

            _set_tma_allocator(dev)
        return _kernel()[(cdiv(Nq, c["BLOCK_M"]), B * H)](
            *args, **meta, **flags, BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"],
            K_SCALAR=(kt == 1 and kw % c["BLOCK_N"] == 0), num_warps=c["num_warps"], num_stages=c["num_stages"], **opts)

    tune: dict[str, Any] | None = None
    autotuned = False
    with _LAUNCH_LOCK:
        if config is not None:
            cfg = dict(config)
        elif interp or os.environ.get("SPARSEATTN_QUANT_AUTOTUNE", "1") == "0":
            cfg = default_quant_config(D, layout.block_m, layout.block_n, interpret=interp,
                                       device=_device_name(dev) if dev.type == "cuda" else None)
        else:
            n_key = int(math.ceil(math.log2(max(Nq, Nkv, 2))))
            key = _tune_key(D, layout, causal, qq.quant, qq.granularity, n_key, out_dtype, dev)
            cfg, tune = _autotune(key, D, layout, launch, lambda: _quant_tma_usable(qq))
            autotuned = True
            drop = {"USE_TMA"} if cfg.get("USE_TMA") and not _quant_tma_usable(qq) else set()
            if cfg.get("TMA_QO") and not _quant_tma_usable(qq, qq.q_int8, out):  # a seeded winner may set it
                drop.add("TMA_QO")
            if drop:  # a winner remembered for inputs that could use descriptors
                cfg = {f: x for f, x in cfg.items() if f not in drop}
                if not _NO_TMA_WARNED:
                    _NO_TMA_WARNED.append(True)
                    warnings.warn(f"quantized_attention: the remembered launch config uses TMA transfers ({sorted(drop)}) "
                                  "these inputs cannot use (CUDA sm_90+, 16-byte aligned Q/K/V/out rows and heads, "
                                  "SPARSEATTN_TRITON_TMA unset); using pointer loads there", RuntimeWarning, stacklevel=3)
        kern = launch(cfg)
    if telemetry is not None:  # cheap attribute reads of the compiled kernel (no sync)
        md = getattr(kern, "metadata", None)
        telemetry.clear()
        telemetry.update({"config": dict(cfg), "n_regs": getattr(kern, "n_regs", None),
                          "n_spills": getattr(kern, "n_spills", None), "shared_bytes": getattr(md, "shared", None),
                          "autotuned": autotuned, "tune": tune})
    return AttentionState(out, lse)


def _quant_tma_usable(qq: QuantizedQKV, *more: torch.Tensor) -> bool:
    """K/V tiles through tensor descriptors: the interpreter, or CUDA sm_90+ with a Triton that has them, and 16-byte
    aligned K/V (and ``more``) rows and heads (``SPARSEATTN_TRITON_TMA=0`` turns them off on a GPU, as for the bf16
    kernel)."""
    from sparseattn.ops.triton_launch import _triton_has_descriptors

    if not _triton_has_descriptors():
        return False
    if not _interpret():
        if qq.k_int8.device.type != "cuda" or os.environ.get("SPARSEATTN_TRITON_TMA", "1") == "0":
            return False
        d = qq.k_int8.device
        if _capability_of(d.index if d.index is not None else torch.cuda.current_device())[0] < 9:
            return False
    for t in (qq.k_int8, qq.v, *more):
        es = t.element_size()
        if t.data_ptr() % 16 or any((st * es) % 16 for st in t.stride()[:3]):
            return False
    return True


def _dense(B: int, H: int, Nq: int, Nkv: int, causal: bool, device: torch.device) -> BlockLayout:
    from sparseattn.ops.triton_launch import _dense_layout

    return _dense_layout(B, H, Nq, Nkv, causal, device)


def resolve_layout(fn: str, q: torch.Tensor, k: torch.Tensor, layout: BlockLayout | None, topk_indices: Any,
                   block_size: int, causal: bool) -> BlockLayout:
    """The layout to run: ``layout``, or built from ``topk_indices`` (``[B, H, q_blocks, top_k]``), or dense."""
    B, H, Nq, _ = q.shape
    Nkv = k.shape[2]
    if topk_indices is not None:
        if layout is not None:
            raise fail(fn, "topk_indices", "cannot be given together with layout", "one of layout / topk_indices",
                       "both")
        if block_size not in SUPPORTED_BLOCK_SIZES:
            raise fail(fn, "block_size", "is not supported", f"one of {SUPPORTED_BLOCK_SIZES}", repr(block_size))
        from sparseattn.layout.convert import layout_from_topk

        if isinstance(topk_indices, torch.Tensor) and topk_indices.device != q.device:
            raise fail(fn, "topk_indices", "is on another device than q", str(q.device), str(topk_indices.device))
        try:
            lay = layout_from_topk(topk_indices, block_m=block_size, block_n=block_size, seqlen_q=Nq, seqlen_kv=Nkv)
        except ValueError as exc:  # re-raise under this function's name (same format)
            rest = str(exc).split(": ", 1)[-1]
            rest = rest[len("indices "):] if rest.startswith("indices ") else rest
            raise ValueError(f"{fn}: topk_indices {rest}") from None
        if (lay.batch, lay.heads) != (B, H):
            raise fail(fn, "topk_indices", "was built for another batch/head count", f"(B, H)=({B}, {H})",
                       f"({lay.batch}, {lay.heads})")
        return lay
    if layout is None:
        return _dense(B, H, Nq, Nkv, causal, q.device)
    return layout


def quantized_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    layout: BlockLayout | None = None,
    causal: bool = False,
    scale: float | None = None,
    quant: str = "int8",
    quant_granularity: str = "per_warp",
    topk_indices: torch.Tensor | None = None,
    block_size: int = 128,
    smooth_k: bool = True,
    return_lse: bool = False,
    config: "dict[str, int] | QuantLaunchConfig | None" = None,
    telemetry: dict[str, Any] | None = None,
    smooth_q: bool = True,
    balance_qk: bool = True,
) -> torch.Tensor | AttentionState:
    """Block-sparse attention with INT8 Q·Kᵀ (and FP8 P·V with ``quant="int8_fp8"``); see the module docstring.

    Args:
        q: ``(B, H, N_q, D)`` bfloat16/float16 on a CUDA GPU (sm_80+; sm_89+ for ``"int8_fp8"``),
            or on the CPU under ``TRITON_INTERPRET=1``. ``D`` in 64, 128, 256.
        k, v: ``(B, H_kv, N_kv, D)``, ``H % H_kv == 0`` (GQA).
        layout: key blocks per query block (block sizes 64 or 128); ``None`` (and no
            ``topk_indices``) = dense.
        causal: bottom-right aligned causal mask (query ``i`` sees keys ``<= i + N_kv - N_q``).
        scale: softmax scale, default ``D ** -0.5``.
        quant: ``"int8"`` or ``"int8_fp8"``.
        quant_granularity: ``"per_block"``, ``"per_warp"`` (default), ``"per_thread"`` or ``"per_token"``.
        topk_indices: instead of ``layout``: integer ``[B, H, ceil(N_q / block_size), top_k]`` key-block
            indices (any order, ``-1`` = none), converted by
            :func:`~sparseattn.layout.convert.layout_from_topk`; out-of-range entries are an error.
        block_size: the block size of ``topk_indices`` (64 or 128).
        smooth_k: subtract K's per-channel token mean before quantizing (exact; recommended).
        smooth_q: subtract Q's per-channel token mean (per query head) before quantizing and add the mean's
            fp32 product with each key to that key's scores (exact up to fp32 rounding; recommended: it
            shrinks the INT8 error on real Q/K/V, docs/QUANT.md).
        balance_qk: per-channel Q/K balancing before quantizing: ``q / alpha`` and ``k * alpha`` with ``alpha =
            sqrt(max|q| / max|k|)`` per channel (exact for Q·Kᵀ; recommended: keys with a few huge channels, as
            Gemma-3 has, otherwise set the INT8 step of every other channel; docs/QUANT.md).
        return_lse: also return the natural-log lse.
        config: fixed launch config, a :class:`~sparseattn.ops.launch_configs.QuantLaunchConfig` or the dict
            ``{"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"}`` (optionally ``maxnreg``), instead of the
            shipped / autotuned choice (tests, experiments).
        telemetry: if given (a dict), filled with this launch's record: ``config`` (the launch parameters
            used), ``n_regs``, ``n_spills``, ``shared_bytes`` (of the compiled kernel; ``None`` under the
            interpreter), ``autotuned`` (the config came from autotuning, now or remembered) and ``tune``
            (when this call benchmarked the candidates: ``times_ms`` per candidate, ``errors``, ``chosen``;
            else ``None``). Nothing is kept in module globals.

    Returns:
        out ``(B, H, N_q, D)`` in q's dtype, or ``AttentionState(out, lse)`` with ``return_lse``
        (lse natural-log float32 ``(B, H, N_q)``; rows attending nothing: out 0, lse ``-inf``).

    Shapes:
        q ``(B, H, N_q, D)``, k/v ``(B, H_kv, N_kv, D)``, topk_indices ``[B, H, q_blocks, top_k]``.

    Raises:
        ValueError: malformed inputs (shapes, dtypes, unknown ``quant`` / ``quant_granularity``,
            out-of-range or duplicate top-k indices, a layout for other shapes).
        NotImplementedError: valid inputs the quantized kernel does not support, with the reason
            (e.g. ``"int8_fp8"`` on a GPU below sm_89, float32 inputs, head_dim 96).
    """
    fn = "quantized_attention"
    _check_modes(fn, quant, quant_granularity)
    (B, H, Hkv, Nq, Nkv, D), sm_scale = check_attention_args(fn, q, k, v, causal=causal, layout=layout, scale=scale,
                                                              pv_threshold=None)
    _check_smoothing(fn, smooth_k, smooth_q, balance_qk)
    op, reason = quant_choice(q, quant=quant, layout=layout)
    if op is None:
        raise NotImplementedError(f"{fn}: the quantized kernel cannot run these inputs: {reason}")
    if op.name != _KERNEL_OP:  # a registered quantized operator: its run function, with this call's arguments
        return op.run_fn()(q, k, v, layout=layout, causal=causal, scale=scale, quant=quant,
                           quant_granularity=quant_granularity, topk_indices=topk_indices, block_size=block_size,
                           smooth_k=smooth_k, smooth_q=smooth_q, balance_qk=balance_qk, return_lse=return_lse,
                           config=config,
                           **({} if telemetry is None else {"telemetry": telemetry}))
    if telemetry is not None and not isinstance(telemetry, dict):
        raise fail(fn, "telemetry", "must be a dict or None", "a dict", type(telemetry).__name__)
    lay = resolve_layout(fn, q, k, layout, topk_indices, block_size, causal)
    qq = _quantize(q, k, v, quant, quant_granularity, sm_scale, smooth_k, smooth_q, balance_qk)
    st = _run_kernel(qq, lay, causal, q.dtype, config, telemetry=telemetry)
    return st if return_lse else st.out


def quantized_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout, *, scale: float | None,
                      quant: str, quant_granularity: str, out: torch.Tensor) -> None:
    """The model integration's hot path: quantize (every call) and run the kernel into ``out``; no checks.

    The caller validated the inputs once per shape (:func:`quantized_attention` does the same checks)
    and guarantees ``out`` is ``(B, H, N_q, D)`` in q's dtype with unit last stride (e.g. a transposed
    view of the ``(B, N, H, D)`` tensor transformers expects). Causal, K and Q smoothed and balanced, natural-log lse
    dropped.
    No host reads: it can be captured in a CUDA graph once the launch config is chosen.
    """
    sm_scale = float(scale) if scale is not None else q.shape[-1] ** -0.5
    qq = _quantize(q, k, v, quant, quant_granularity, sm_scale, True, True, True)
    _run_kernel(qq, layout, True, q.dtype, None, out=out)


def quantized_attention_from(qq: QuantizedQKV, layout: BlockLayout, *, causal: bool = False,
                             out_dtype: torch.dtype = torch.bfloat16,
                             config: "dict[str, int] | QuantLaunchConfig | None" = None,
                             telemetry: dict[str, Any] | None = None) -> AttentionState:
    """Run the quantized kernel on already quantized operands (tests, benchmarks of the kernel alone);
    ``config`` / ``telemetry`` as in :func:`quantized_attention`."""
    return _run_kernel(qq, layout, causal, out_dtype, config, telemetry=telemetry)


def attention_delegate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, layout: BlockLayout | None,
                       scale: float | None, backend: str, quant: str, quant_granularity: str, pv_threshold: Any,
                       stats: Any, sliding_window: Any, attn_mask: Any) -> AttentionState:
    """``attention(..., quant=...)``: refuse what the quantized kernel does not do, else run it (returns out and lse)."""
    fn = "attention"
    unsupported = [name for name, val in (("pv_threshold", pv_threshold), ("sliding_window", sliding_window),
                                          ("attn_mask", attn_mask), ("stats", stats)) if val is not None]
    if backend not in ("auto", "triton"):
        unsupported.append(f"backend={backend!r}")
    if unsupported:
        raise NotImplementedError(f"{fn}: quant={quant!r} cannot be combined with {', '.join(unsupported)} "
                                  "(the quantized kernel supports layout, causal, scale and GQA only)")
    if quant not in QUANT_MODES:
        raise fail(fn, "quant", "is unknown", f"None or one of {list(QUANT_MODES)}", repr(quant))
    st = quantized_attention(q, k, v, layout=layout, causal=causal, scale=scale, quant=quant,
                             quant_granularity=quant_granularity, return_lse=True)
    return st  # type: ignore[return-value]
