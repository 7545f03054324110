"""Decode attention over a KV cache: dense (split-KV "flash-decoding") and over listed pages.

Public functions:

* :func:`decode_attention` — ``Lq`` new query tokens (1..64; speculative decoding) of each sequence
  attend that sequence's cache ``k_cache[b, :, :seqlens[b]]``, bottom-right causal among the new
  tokens; GQA heads of one KV head share one kernel tile; the keys are split across programs and the
  partial states merged exactly.
* :func:`paged_decode_attention` — attention over listed pages only (the kernel reads nothing else).
  Choosing the pages (Quest-style summaries and selection, and :func:`~sparseattn.ops.pages.sparse_decode_attention` that
  chains both) lives in :mod:`sparseattn.ops.pages`.
* :func:`decode_reference` / :func:`pages_key_mask` — the pure-PyTorch ground truth (any dtype,
  float64 included), optionally restricted to a key mask.

Semantics shared by every function (the prefill kernel's, docs/ARCHITECTURE.md): natural-log float32
lse; a row that attends no key (``seqlen == 0``, or ``seqlen < Lq`` for the first tokens) has out 0
and lse ``-inf``; NaN/inf inputs reach exactly the rows that attend them. Keys at or beyond
``seqlens[b]`` are never attended and never reach the output, whatever the cache holds there.

Hot path: nothing here reads a device value on the host. ``seqlens`` stays on the device (its values
are checked only when that is free: a CPU tensor, or ``check_seqlens=True``); the kernel clamps
lengths into ``[0, N_max]`` so an out-of-range value can never read outside the cache.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any

import torch

from sparseattn._validation import check_kv_geometry, check_scale, check_tensor, fail
from sparseattn.ops.kernel_args import ordered_args
from sparseattn.state.types import AttentionState

__all__ = [
    "decode_attention",
    "paged_decode_attention",
    "pages_key_mask",
    "decode_reference",
    "decode_refusal",
    "decode_choice",
    "decode_num_splits",
    "decode_num_splits_filled",
    "quantized_kv_dtypes",
    "MAX_DECODE_QUERIES",
]

MAX_DECODE_QUERIES = 64  # Lq: new tokens per sequence (speculative decoding drafts)
SUPPORTED_HEAD_DIMS = (64, 128, 256)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_SPLITS = 128
MIN_KEYS_PER_SPLIT = 256  # the heuristic never gives a split fewer keys than this (per sequence)
_LOG2E = 1.4426950408889634
_MAX_GRID_Z = 65535
_CONFIG_KEYS = {"BLOCK_N", "num_warps", "num_stages"}
_CONFIG_OPTIONAL = {"QK", "PV", "BLOCK_M", "FULL_TILES", "CTAS_PER_SM"}  # quantized-path variants, a row-tile
# floor, loads without element masks, the split count's programs per SM (DecodeLaunchConfig)


# ---------------------------------------------------------------------------------------------- validation


def _check_seqlens(fn: str, seqlens: Any, B: int, n_max: int, device: torch.device,
                   check_seqlens: bool | None) -> torch.Tensor | None:
    """``seqlens`` as an int32 tensor on ``device`` (or None); values checked when free or asked for."""
    if seqlens is None:
        return None
    check_tensor(fn, "seqlens", seqlens, ndim=1, shape_desc="(B,)")
    if seqlens.dtype not in (torch.int32, torch.int64):
        raise fail(fn, "seqlens.dtype", "is not supported", "int32 (or int64)", str(seqlens.dtype).replace("torch.", ""))
    if seqlens.shape[0] != B:
        raise fail(fn, "seqlens", "has the wrong length", f"seqlens.shape=({B},) (one length per sequence)",
                   f"seqlens.shape={tuple(seqlens.shape)}")
    if check_seqlens is None:
        check_seqlens = seqlens.device.type == "cpu"
    if check_seqlens:
        lo, hi = (int(x) for x in torch.aminmax(seqlens))  # a host read: free on the CPU
        if lo < 0 or hi > n_max:
            raise fail(fn, "seqlens", "has values out of range", f"0 <= seqlens <= N_max = {n_max}",
                       f"min {lo}, max {hi}")
    if seqlens.device != device:
        seqlens = seqlens.to(device)
    if seqlens.dtype != torch.int32:
        seqlens = seqlens.to(torch.int32)
    return seqlens


def quantized_kv_dtypes() -> tuple[torch.dtype, ...]:
    """Storage dtypes of a quantized K/V cache the decode kernel reads (with per-key scales)."""
    fp8 = getattr(torch, "float8_e4m3fn", None)
    return (torch.int8,) if fp8 is None else (torch.int8, fp8)


def _dt(t: Any) -> str:
    d = t if isinstance(t, torch.dtype) else getattr(t, "dtype", type(t).__name__)
    return str(d).replace("torch.", "")


def _check_decode(fn: str, q: Any, k: Any, v: Any, scale: Any,
                  allowed: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32, torch.float64),
                  k_scale: Any = None, v_scale: Any = None,
                  ) -> tuple[tuple[int, int, int, int, int, int], float]:
    """Shapes/dtypes/devices of a decode call; returns ``((B, H, H_kv, Lq, N_max, D), scale)``.

    K/V may hold quantized values (int8 / float8_e4m3fn) only together with ``k_scale`` and ``v_scale``
    (checked by :func:`_check_kv_scales` after this).
    """
    qdts = quantized_kv_dtypes()
    quant = k_scale is not None or v_scale is not None or getattr(k, "dtype", None) in qdts \
        or getattr(v, "dtype", None) in qdts
    for name, t in (("q", q), ("k_cache", k), ("v_cache", v)):
        desc = "(B, H, Lq, D)" if name == "q" else "(B, H_kv, N_max, D)"
        check_tensor(fn, name, t, ndim=4, shape_desc=desc)
        if quant and name != "q":
            continue
        if t.dtype not in allowed:
            names = ", ".join(str(d).replace("torch.", "") for d in allowed)
            raise fail(fn, f"{name}.dtype", "is not supported", f"one of {names}", str(t.dtype).replace("torch.", ""))
    if quant:
        if k_scale is None or v_scale is None:
            raise fail(fn, "k_scale/v_scale", "are missing for a quantized cache (both are needed)",
                       "float32 per-key scales (B, H_kv, N_max) for k_cache and v_cache",
                       f"k_cache={_dt(k)}, v_cache={_dt(v)}, k_scale={'set' if k_scale is not None else None}, "
                       f"v_scale={'set' if v_scale is not None else None}")
        names = " or ".join(_dt(d) for d in qdts)
        for name, t in (("k_cache", k), ("v_cache", v)):
            if t.dtype not in qdts:
                raise fail(fn, f"{name}.dtype", "is not a quantized dtype (k_scale/v_scale given; K and V must both "
                           "be quantized)", names, f"k_cache={_dt(k)}, v_cache={_dt(v)}")
        if k.dtype != v.dtype:
            raise fail(fn, "k_cache/v_cache dtypes", "must be equal (one quantized format)", "one of " + names,
                       f"k_cache={_dt(k)}, v_cache={_dt(v)}")
    elif not (q.dtype == k.dtype == v.dtype):
        raise fail(fn, "q/k_cache/v_cache dtypes", "must all be equal", "one dtype",
                   f"q={q.dtype}, k_cache={k.dtype}, v_cache={v.dtype}")
    B, H, Hkv, Lq, N, D = check_kv_geometry(fn, q, k, v, k_name="k_cache", v_name="v_cache")
    if Lq > MAX_DECODE_QUERIES:
        raise fail(fn, "q", "has too many query tokens for decode (use the prefill attention)",
                   f"1 <= Lq = q.shape[2] <= {MAX_DECODE_QUERIES}", f"Lq={Lq}")
    checked = check_scale(fn, scale)
    return (B, H, Hkv, Lq, N, D), (D ** -0.5 if checked is None else checked)


def _check_kv_scales(fn: str, q: torch.Tensor, k_scale: Any, v_scale: Any, B: int, Hkv: int, N: int,
                     ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The per-key scales as ``(B, H_kv, N_max)`` float32 views (a trailing ``1`` dim is dropped; no copy)."""
    if k_scale is None and v_scale is None:
        return None, None
    out = []
    for name, sc in (("k_scale", k_scale), ("v_scale", v_scale)):
        if not isinstance(sc, torch.Tensor):
            raise fail(fn, name, "must be a tensor", f"float32 ({B}, {Hkv}, {N})", type(sc).__name__)
        if sc.dtype != torch.float32:
            raise fail(fn, f"{name}.dtype", "is not supported", "float32", _dt(sc))
        if sc.dim() == 4 and sc.shape[-1] == 1:
            sc = sc.squeeze(-1)  # state/kv_cache.quantize's (B, H_kv, N, 1)
        if tuple(sc.shape) != (B, Hkv, N):
            raise fail(fn, name, "does not match the cache (one scale per key and KV head)",
                       f"shape ({B}, {Hkv}, {N}) (or ({B}, {Hkv}, {N}, 1))", f"shape {tuple(sc.shape)}")
        if sc.device != q.device:
            raise fail(fn, name, "is on another device than q", str(q.device), str(sc.device))
        out.append(sc)
    return out[0], out[1]


# the built-in decode operators (ops/_builtin_ops.py) and the path of this module that runs each
_KERNEL_OP, _REFERENCE_OP = "decode_triton", "decode_reference"
_BUILTIN_OPS = (_KERNEL_OP, _REFERENCE_OP)


def _backend_name(op_name: str) -> str:
    """The ``backend=`` spelling of a decode operator: ``"decode_triton"`` -> ``"triton"``."""
    return op_name[len("decode_"):] if op_name.startswith("decode_") else op_name


def _decode_operators(names: tuple[str, ...] | None = None) -> tuple[Any, ...]:
    """The registry's decode operators (entry point ``"decode"``) in priority order, optionally only ``names``."""
    from sparseattn.ops.registry import operators

    ops = operators("decode", entry_point="decode")
    return ops if names is None else tuple(op for op in ops if op.name in names)


def _backend_choices(names: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """``"auto"`` and the ``backend=`` names of the registry's decode operators (only ``names`` if given)."""
    return ("auto",) + tuple(_backend_name(op.name) for op in _decode_operators(names))


def _check_backend(fn: str, backend: Any, names: tuple[str, ...] | None = None,
                   choices: tuple[str, ...] | None = None) -> str:
    if choices is None:
        choices = _backend_choices(names)
    if backend not in choices:
        quoted = [repr(c) for c in choices]
        raise fail(fn, "backend", "is not a known backend", ", ".join(quoted[:-1]) + " or " + quoted[-1], repr(backend))
    return backend


def decode_choice(q: torch.Tensor, backend: str = "auto", kv_dtype: torch.dtype | None = None, *,
                  names: tuple[str, ...] | None = None) -> tuple[Any, str | None]:
    """The decode operator ``backend`` runs for these inputs, asked of the registry (no warning, no error).

    ``backend="auto"``: the first decode operator (priority order) that accepts the inputs and is preferred
    for them (the Triton kernel only on CUDA), with the refusal of the first operator it passed over
    (``None`` if none refused). A named backend (``"triton"``, ``"reference"`` or a registered decode
    operator's name): ``(operator, None)`` if it accepts, else ``(None, its refusal)``. ``names`` restricts
    the operators considered (the paged/selection paths run the built-ins only).
    """
    from sparseattn.ops.registry import operator_refusals

    first: str | None = None
    for op in _decode_operators(names):
        if backend != "auto" and _backend_name(op.name) != backend:
            continue
        why = operator_refusals((op,), q, kv_dtype=kv_dtype)[op.name]
        if backend != "auto":
            return (op, None) if why is None else (None, why)
        if why is None and (op.preferred is None or op.preferred(q)):
            return op, first
        if first is None:
            first = why
    return None, first


def _check_bool(fn: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise fail(fn, name, "must be a bool", "True or False", repr(value))


def _check_return_lse(fn: str, return_lse: Any) -> None:
    _check_bool(fn, "return_lse", return_lse)


# ---------------------------------------------------------------------------------------------- reference


def pages_key_mask(page_indices: torch.Tensor, page_counts: torch.Tensor, page_size: int, n_max: int) -> torch.Tensor:
    """Boolean key mask ``(B, H_kv, n_max)`` of the listed pages (the first ``page_counts`` entries).

    Shapes:
        page_indices ``(B, H_kv, K)`` int, page_counts ``(B, H_kv)`` int → ``(B, H_kv, n_max)`` bool.
    """
    B, Hkv, Kp = page_indices.shape
    dev = page_indices.device
    P = -(-n_max // page_size)
    live = torch.arange(Kp, device=dev)[None, None, :] < page_counts[..., None].to(torch.int64)
    pages = torch.zeros(B, Hkv, P + 1, dtype=torch.bool, device=dev)
    idx = torch.where(live, page_indices.to(torch.int64).clamp(0, P), torch.full_like(page_indices, P, dtype=torch.int64))
    pages.scatter_(2, idx, live)
    return pages[..., :P].repeat_interleave(page_size, dim=2)[..., :n_max]


def decode_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    seqlens: torch.Tensor | None = None,
    scale: float | None = None,
    key_mask: torch.Tensor | None = None,
    upcast: bool = True,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    causal: bool = True,
) -> AttentionState:
    """Decode attention in plain PyTorch (the ground truth of the kernels; any float dtype).

    Row (head ``h``, token ``i``) of sequence ``b`` attends key ``j`` iff
    ``j < seqlens[b] - Lq + i + 1`` and (with ``key_mask``) ``key_mask[b, h // G, j]``.

    Args:
        q: ``(B, H, Lq, D)``, ``1 <= Lq <= 64``.
        k_cache: ``(B, H_kv, N_max, D)``, ``H % H_kv == 0``.
        v_cache: same shape as ``k_cache``.
        seqlens: ``(B,)`` int valid lengths (``None``: every sequence is ``N_max`` long).
        scale: softmax scale, default ``D ** -0.5``.
        key_mask: optional ``(B, H_kv, N_max)`` bool: only these keys may be attended (sparse decode's
            selected pages, see :func:`pages_key_mask`).
        upcast: compute in float32 (float64 for float64 inputs); ``False`` keeps the matmul operands in
            the input dtype (the "same dtype" yardstick of the ratio rule).
        k_scale, v_scale: a quantized cache: ``k_cache``/``v_cache`` hold int8 or float8_e4m3fn values
            and these their float32 per-key scales ``(B, H_kv, N_max)`` (or ``(..., 1)``); dequantised here
            (``value * scale`` in float32, then the computation dtype: float32 with ``upcast``, q's dtype
            without, float64 for float64 q).
        causal: ``False``: every row attends all keys ``j < seqlens[b]`` (no causal shift among the new
            tokens; a segment that lies wholly before them).

    Returns:
        ``AttentionState(out, lse)``: out ``(B, H, Lq, D)`` in q's dtype, lse ``(B, H, Lq)``
        natural-log float32 (float64 for float64 inputs). Rows that attend nothing: out 0, lse ``-inf``.
    """
    fn = "decode_reference"
    (B, H, Hkv, Lq, N, D), scale = _check_decode(fn, q, k_cache, v_cache, scale, k_scale=k_scale, v_scale=v_scale)
    ks, vs = _check_kv_scales(fn, q, k_scale, v_scale, B, Hkv, N)
    _check_bool(fn, "causal", causal)
    if ks is not None:
        kd = torch.float64 if q.dtype == torch.float64 else torch.float32
        k_cache = (k_cache.to(kd) * ks.to(kd)[..., None]).to(q.dtype if not upcast else kd)
        v_cache = (v_cache.to(kd) * vs.to(kd)[..., None]).to(q.dtype if not upcast else kd)
    seqlens = _check_seqlens(fn, seqlens, B, N, q.device, None)
    if key_mask is not None:
        check_tensor(fn, "key_mask", key_mask, ndim=3, shape_desc="(B, H_kv, N_max)")
        if tuple(key_mask.shape) != (B, Hkv, N) or key_mask.dtype != torch.bool:
            raise fail(fn, "key_mask", "has the wrong shape or dtype", f"({B}, {Hkv}, {N}) bool",
                       f"{tuple(key_mask.shape)} {key_mask.dtype}")
    G = H // Hkv
    dev = q.device
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    mm_dtype = acc_dtype if upcast else q.dtype
    qg = q.to(mm_dtype).reshape(B, Hkv, G * Lq, D)  # row r = (head g = r // Lq, token i = r % Lq)
    kf = k_cache.to(mm_dtype)
    vf = v_cache.to(mm_dtype)
    s = torch.matmul(qg, kf.transpose(-1, -2)).to(acc_dtype) * scale  # (B, Hkv, R, N)
    lens = seqlens.to(torch.int64) if seqlens is not None else torch.full((B,), N, dtype=torch.int64, device=dev)
    tok = torch.arange(G * Lq, device=dev) % Lq
    lim = lens[:, None] - Lq + tok[None, :] + 1 if causal else lens[:, None].expand(B, G * Lq)  # (B, R): keys j < lim
    allowed = torch.arange(N, device=dev)[None, None, :] < lim[:, :, None]  # (B, R, N)
    allowed = allowed[:, None].expand(B, Hkv, G * Lq, N)
    if key_mask is not None:
        allowed = allowed & key_mask.to(dev)[:, :, None, :]
    s = s.masked_fill(~allowed, -math.inf)
    has = allowed.any(-1)
    m = s.amax(-1)
    m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    p = torch.exp(s - m_safe[..., None])
    l = p.sum(-1)
    v_nonfinite = not bool(torch.isfinite(v_cache).all())
    if v_nonfinite:  # exact: masked keys never turn 0 * NaN into NaN (counted instead, as the prefill reference)
        vf = torch.where(torch.isfinite(vf), vf, torch.zeros((), dtype=vf.dtype, device=dev))
    acc = torch.matmul(p.to(mm_dtype), vf).to(acc_dtype)  # (B, Hkv, R, D)
    if v_nonfinite:
        att = allowed.to(acc_dtype)

        def count(ind: torch.Tensor) -> torch.Tensor:
            return torch.matmul(att, ind.to(acc_dtype))

        n_pos, n_neg, n_nan = count(torch.isposinf(v_cache)), count(torch.isneginf(v_cache)), count(torch.isnan(v_cache))
        acc = torch.where(n_pos > 0, torch.full_like(acc, math.inf), acc)
        acc = torch.where(n_neg > 0, torch.full_like(acc, -math.inf), acc)
        acc = torch.where((n_nan > 0) | ((n_pos > 0) & (n_neg > 0)), torch.full_like(acc, math.nan), acc)
    l_safe = torch.where(has, l, torch.ones_like(l))
    out = torch.where(has[..., None], acc / l_safe[..., None], torch.zeros_like(acc))
    lse = torch.where(has, m + torch.log(l_safe), torch.full_like(m, -math.inf))
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return AttentionState(out.reshape(B, H, Lq, D).to(q.dtype), lse.reshape(B, H, Lq).to(lse_dtype))


# ---------------------------------------------------------------------------------------------- launcher


def decode_refusal(q: torch.Tensor, kv_dtype: torch.dtype | None = None) -> str | None:
    """``None`` if the Triton decode kernels can run ``q``'s device/dtype/head_dim, else why not.

    ``kv_dtype``: the cache's storage dtype when it differs from q's (a quantized cache: int8 runs
    wherever the kernel runs; float8_e4m3fn needs compute capability >= 8.9 on a GPU).
    """
    from sparseattn.ops.triton_launch import _capability, _triton_import_error, device_refusal

    why = device_refusal(q)
    if why is not None:
        return why
    if q.dtype not in KERNEL_DTYPES:
        return f"dtype {str(q.dtype).replace('torch.', '')} is not supported (float16, bfloat16 or float32)"
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        return f"head_dim {q.shape[-1]} is not supported (one of {SUPPORTED_HEAD_DIMS})"
    if kv_dtype is not None and kv_dtype != q.dtype:
        if kv_dtype not in quantized_kv_dtypes():
            return f"K/V dtype {_dt(kv_dtype)} is not supported with q {_dt(q)} (int8 or float8_e4m3fn with scales)"
        if kv_dtype != torch.int8 and q.is_cuda:
            cap = _capability(q.device)
            if cap < (8, 9):
                return (f"float8_e4m3fn K/V need a GPU of compute capability >= 8.9 (Ada/Hopper); {q.device} has "
                        f"{cap[0]}.{cap[1]} (int8 K/V run there)")
    return _triton_import_error()


@functools.lru_cache(maxsize=64)
def _num_sms(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


def decode_num_splits(ctas: int, n_keys: int, num_sms: int = 132, *, ctas_per_sm: int = 4) -> int:
    """Key splits per sequence so that ``ctas * splits`` programs fill the GPU (flash-decoding heuristic).

    ``ctas`` programs exist without splitting (batch x KV heads x row tiles). Returns 1 when they already
    fill ``0.8 * num_sms * ctas_per_sm`` slots; otherwise the smallest split count whose wave efficiency
    (``waves / ceil(waves)``) is within 85% of the best, never giving a split fewer than
    ``MIN_KEYS_PER_SPLIT`` keys nor more than ``MAX_SPLITS`` splits.
    """
    slots = max(1, num_sms * ctas_per_sm)
    if ctas >= 0.8 * slots:
        return 1
    max_s = max(1, min(MAX_SPLITS, -(-n_keys // MIN_KEYS_PER_SPLIT)))
    effs = []
    for s in range(1, max_s + 1):
        waves = ctas * s / slots
        effs.append(waves / math.ceil(waves))
    best = max(effs)
    for s, e in enumerate(effs, start=1):
        if e >= 0.85 * best:
            return s
    return 1  # pragma: no cover


def decode_num_splits_filled(ctas: int, n_keys: int, num_sms: int, ctas_per_sm: int) -> int:
    """Key splits that fill the GPU with ``ctas_per_sm`` programs per SM, rounded down, at small batches.

    With fewer programs than SMs (``ctas < num_sms``): ``floor(ctas_per_sm * num_sms / ctas)``, at least 1, never
    giving a split fewer than ``MIN_KEYS_PER_SPLIT`` keys nor more than ``MAX_SPLITS`` splits. With at least one
    program per SM already, :func:`decode_num_splits` (the wave heuristic: its extra splits also even out
    sequences of different lengths). The rule of a launch config with ``CTAS_PER_SM`` (a tuned entry measured on
    its device: on an H100 the int8 cache was fastest at two programs per SM, 1.06-1.14x
    :func:`decode_num_splits`'s split count at batch 1-4; ``benchmarks/decode_splits_sweep.py``).
    """
    if ctas >= num_sms:
        return decode_num_splits(ctas, n_keys, num_sms)
    cap = max(1, min(MAX_SPLITS, -(-n_keys // MIN_KEYS_PER_SPLIT)))
    return max(1, min(cap, (ctas_per_sm * num_sms) // max(1, ctas)))


def _config_num_splits(cfg: dict[str, Any], ctas: int, n_keys: int, num_sms: int) -> int:
    """The launcher's split count for launch config ``cfg`` when ``num_splits`` is not given: the wave heuristic, or
    :func:`decode_num_splits_filled` where the config sets ``CTAS_PER_SM``."""
    per_sm = cfg.get("CTAS_PER_SM")
    if per_sm is None:
        return decode_num_splits(ctas, n_keys, num_sms)
    return decode_num_splits_filled(ctas, n_keys, num_sms, per_sm)


def _default_config(D: int, block_m: int, interp: bool, paged: bool = False,
                    device: str | None = None, kv: str = "none", programs: int | None = None) -> dict[str, Any]:
    """The fixed launch config: the tuned winner for ``device`` (a device name; ``None``: the shipped file's
    fallback device) from ``ops/tuned/decode.json`` where one matches, else the heuristic default.

    ``kv``: the cache's format, ``"none"`` (q's dtype), ``"int8"`` or ``"fp8"`` -- a tuned entry may match on it
    (``"match": {"kv": "int8", ...}``) to pick a quantized-path variant; entries without it match every cache.
    ``programs``: the launch's programs before splitting (batch x KV heads x row tiles) -- an entry may match on it
    (``"programs": {"max": 16}``: small batches); with ``None`` such entries never match."""
    if interp:
        return {"BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
    tuned = _tuned_decode_config(D, block_m, paged, device, kv, programs)
    if tuned is not None:
        return dict(tuned)
    if D >= 256:
        return {"BLOCK_N": 32, "num_warps": 8 if block_m >= 64 else 4, "num_stages": 3}
    return {"BLOCK_N": 64, "num_warps": 4, "num_stages": 3}


@functools.lru_cache(maxsize=256)
def _tuned_decode_config(D: int, block_m: int, paged: bool, device: str | None,
                         kv: str = "none", programs: int | None = None) -> dict[str, Any] | None:
    """The shipped tuned config (checked as a DecodeLaunchConfig), looked up once per (D, tile, paged, device, kv,
    programs)."""
    from sparseattn.ops.launch_configs import DecodeLaunchConfig
    from sparseattn.ops.registry import tuned_for

    tuned = tuned_for("decode_triton")
    if tuned is None:
        return None
    facts: dict[str, Any] = dict(head_dim=D, block_m=block_m, paged=paged, kv=kv)
    if programs is not None:
        facts["programs"] = programs
    cfg = tuned.lookup(device if device is not None else (tuned.fallback or ""), **facts)
    return None if cfg is None else DecodeLaunchConfig.from_dict(cfg).to_dict()


def _launch(fn: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqlens: torch.Tensor | None,
            page_idx: torch.Tensor | None, page_num: torch.Tensor | None, page_size: int,
            dims: tuple[int, int, int, int, int, int], scale: float, num_splits: int | None,
            config: dict[str, int] | None, n_virtual: int, k_scale: torch.Tensor | None = None,
            v_scale: torch.Tensor | None = None, causal: bool = True) -> AttentionState:
    from sparseattn.ops.triton import decode as kern
    from sparseattn.ops.triton_launch import _LAUNCH_LOCK, interpret_mode

    B, H, Hkv, Lq, N, D = dims
    G = H // Hkv
    interp = interpret_mode()
    if B * Hkv > _MAX_GRID_Z:
        raise NotImplementedError(f"{fn}: batch * kv_heads = {B * Hkv} exceeds the launch grid limit {_MAX_GRID_Z}")
    # V may be stored keys-contiguous (a (B, H_kv, D, N) buffer viewed as (B, H_kv, N, D)) or tile-blocked
    # ((B, H_kv, N / T, D, T), checked by _tile_blocked_v): read as it is (V_KEYS)
    v_tile = v.shape[-1] if v.dim() == 5 else 0
    v_keys = v_tile > 0 or (v.stride(-1) != 1 and v.stride(-2) == 1)
    q, k = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k))
    if not v_keys and v.stride(-1) != 1:
        v = v.contiguous()
    if config is not None and not isinstance(config, dict):
        from sparseattn.ops.launch_configs import DecodeLaunchConfig

        if isinstance(config, DecodeLaunchConfig):
            config = config.to_dict()
    rows = G * Lq
    block_m = min(max(16, 1 << (rows - 1).bit_length()), 64)
    quant = k_scale is not None
    kv = "none" if not quant else ("int8" if k.dtype == torch.int8 else "fp8")
    if config is None:
        dev_name = None
        if q.is_cuda:
            from sparseattn.ops.registry import device_name

            dev_name = device_name(q.device)
        cfg = _default_config(D, block_m, interp, paged=page_idx is not None, device=dev_name, kv=kv,
                              programs=B * Hkv * -(-rows // block_m))
    else:
        if not isinstance(config, dict) or not _CONFIG_KEYS <= set(config) or set(config) - _CONFIG_KEYS - _CONFIG_OPTIONAL:
            raise fail(fn, "config", "must name exactly the launch parameters",
                       f"{sorted(_CONFIG_KEYS)} and optionally {sorted(_CONFIG_OPTIONAL)}", repr(config))
        bn = config["BLOCK_N"]
        if isinstance(bn, bool) or not isinstance(bn, int) or bn < 16 or bn & (bn - 1):
            raise fail(fn, "config", "has a bad BLOCK_N", "a power of two >= 16", repr(bn))
        cfg = dict(config)
    if v_tile:
        if config is None:
            cfg["BLOCK_N"] = v_tile  # the kernel walks the cache's tiles
        elif cfg["BLOCK_N"] != v_tile:
            raise fail(fn, "config", "has a BLOCK_N other than the tile-blocked V cache's tile",
                       f"BLOCK_N = {v_tile}", f"BLOCK_N = {cfg['BLOCK_N']}")
    qk_mode, pv_mode, block_m = _variant_modes(fn, cfg, kv, q.dtype, block_m)
    m_tiles = -(-rows // block_m)
    if num_splits is None:
        sms = _num_sms(q.device.index if q.device.index is not None else torch.cuda.current_device()) if q.is_cuda else 132
        num_splits = _config_num_splits(cfg, B * Hkv * m_tiles, n_virtual, sms)
    out = torch.empty((B, H, Lq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    if num_splits > 1:
        o_part = torch.empty((B, H, Lq, num_splits, D), dtype=torch.float32, device=q.device)
        l_part = torch.empty((B, H, Lq, num_splits), dtype=torch.float32, device=q.device)
    else:
        o_part, l_part = out, lse  # unused
    paged = page_idx is not None
    pidx = page_idx if paged else lse
    pnum = page_num if paged else lse
    meta: dict[str, Any] = dict(HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=cfg["BLOCK_N"], SPLIT=num_splits > 1,
                                HAS_SEQLENS=seqlens is not None, PAGED=paged, PAGE=page_size if paged else 1,
                                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if quant:
        meta["HAS_KV_SCALE"] = True  # only when set: the default launch keeps the default kernel's cache key
        if qk_mode:
            meta["QK_MODE"] = qk_mode
        if pv_mode:
            meta["PV_MODE"] = pv_mode
        if not interp and kv == "int8" and (qk_mode == 3 or pv_mode in (1, 4)):
            meta["FAST_I8"] = True  # int8 -> fp16 by byte moves (inline PTX; the interpreter converts plainly)
        if interp and kv == "fp8" and (qk_mode in (1, 2) or pv_mode == 2):
            meta["FP8_EXACT"] = True  # the interpreter's fp32 -> e4m3 conversion mis-rounds (see the kernel)
    if not causal:
        meta["CAUSAL"] = False
    if pv_mode == 4:  # "fp16w": V read as int32 words (the plain layout, 4-byte aligned)
        if v_keys:
            raise fail(fn, "config", "asks for the int8-word P·V variant on a keys-contiguous V",
                       "PV 'fp16w' with V stored [keys, head_dim] (or another PV variant)", f"V strides {v.stride()}")
        if v.data_ptr() % 4 or any(st % 4 for st in v.stride()[:3]):
            raise fail(fn, "config", "asks for the int8-word P·V variant on a V cache not aligned to 4 bytes",
                       "a data pointer and batch / head / key strides divisible by 4",
                       f"pointer offset {v.data_ptr() % 4}, strides {v.stride()}")
    if v_keys:
        meta["V_KEYS"] = True  # only when set: the default launch keeps its kernel
    if v_tile:
        meta["V_STEP"] = D
    if cfg.get("FULL_TILES") and page_idx is None and not v_keys:  # (V_KEYS walks whole tiles unmasked anyway)
        meta["FULL_TILES"] = True  # only when set (the default launch keeps its kernel); the paged walk gathers keys
    if interp and q.dtype == torch.bfloat16:
        meta["DOT_F32"] = True  # the interpreter's bf16 tl.dot is wrong (see triton_launch)
    if q.dtype == torch.float32:
        meta["IEEE"] = True
    ks = k_scale.stride() if quant else (0, 0, 0)  # type: ignore[union-attr]
    vs = v_scale.stride() if quant else (0, 0, 0)  # type: ignore[union-attr]
    args = ordered_args(kern._decode_split_kernel, dict(
        Q=q, K=k, V=v, SeqLens=seqlens if seqlens is not None else lse, PageIdx=pidx, PageNum=pnum,
        Out=out, Lse=lse, OPart=o_part, LPart=l_part,
        KScale=k_scale if quant else lse, VScale=v_scale if quant else lse,
        stride_qb=q.stride(0), stride_qh=q.stride(1), stride_qm=q.stride(2),
        stride_kb=k.stride(0), stride_kh=k.stride(1), stride_kn=k.stride(2),
        stride_vb=v.stride(0), stride_vh=v.stride(1),
        stride_vn=v_tile if v_tile else (v.stride(3) if v_keys else v.stride(2)),
        stride_ob=out.stride(0), stride_oh=out.stride(1), stride_om=out.stride(2),
        stride_lb=lse.stride(0), stride_lh=lse.stride(1),
        stride_pb=pidx.stride(0) if paged else 0, stride_ph=pidx.stride(1) if paged else 0,
        stride_nb=pnum.stride(0) if paged else 0,
        stride_ksb=ks[0], stride_ksh=ks[1], stride_ksn=ks[2],
        stride_vsb=vs[0], stride_vsh=vs[1], stride_vsn=vs[2],
        H=H, G=G, LQ=Lq, N_MAX=N, MAX_PAGES=page_idx.shape[2] if paged else 0, NUM_SPLITS=num_splits,
        qk_scale=float(scale) * _LOG2E,
    ))
    with _LAUNCH_LOCK:  # Triton's launch path is not thread-safe (see triton_launch)
        kern._decode_split_kernel[(num_splits, m_tiles, B * Hkv)](*args, **meta)
        if num_splits > 1:
            kern._decode_merge_kernel[(B * H * Lq,)](
                o_part, l_part, out, lse,
                out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
                H, Lq, num_splits, HEAD_DIM=D, BLOCK_S=max(2, 1 << (num_splits - 1).bit_length()),
                num_warps=4, num_stages=1)
    return AttentionState(out, lse)


def _variant_modes(fn: str, cfg: dict[str, Any], kv: str, q_dtype: torch.dtype, block_m: int) -> tuple[int, int, int]:
    """``(QK_MODE, PV_MODE, BLOCK_M)`` of a launch config's optional ``QK`` / ``PV`` / ``BLOCK_M`` entries.

    The variants apply to a quantized cache (``kv`` ``"int8"``/``"fp8"``) read by fp16/bf16 q only; elsewhere
    (a float cache, float32 q) they are ignored: those launches have nothing to convert or run exact fp32.
    """
    from sparseattn.ops.launch_configs import DECODE_PV_VARIANTS, DECODE_QK_VARIANTS

    qk, pv, bm = cfg.get("QK"), cfg.get("PV"), cfg.get("BLOCK_M")
    if "FULL_TILES" in cfg and not isinstance(cfg["FULL_TILES"], bool):
        raise fail(fn, "config", "has a bad FULL_TILES", "True or False", repr(cfg["FULL_TILES"]))
    per_sm = cfg.get("CTAS_PER_SM")
    if "CTAS_PER_SM" in cfg and (isinstance(per_sm, bool) or not isinstance(per_sm, int) or not 1 <= per_sm <= 16):
        raise fail(fn, "config", "has a bad CTAS_PER_SM", "an int in 1..16", repr(per_sm))
    if qk is not None and qk not in DECODE_QK_VARIANTS:
        raise fail(fn, "config", "has an unknown QK variant", f"one of {DECODE_QK_VARIANTS}", repr(qk))
    if pv is not None and pv not in DECODE_PV_VARIANTS:
        raise fail(fn, "config", "has an unknown PV variant", f"one of {DECODE_PV_VARIANTS}", repr(pv))
    if bm is not None:
        if isinstance(bm, bool) or not isinstance(bm, int) or bm < 16 or bm > 64 or bm & (bm - 1):
            raise fail(fn, "config", "has a bad BLOCK_M", "a power of two in 16..64", repr(bm))
        block_m = max(block_m, bm)
    if kv == "none" or q_dtype not in (torch.float16, torch.bfloat16):
        return 0, 0, block_m
    if pv == "i8x2":
        if kv != "int8":
            raise fail(fn, "config", "asks for the int8 P·V variant on a float8 cache", "PV 'dequant', 'fp16' or "
                       "'fp8' (or an int8 cache)", repr(pv))
        if not 32 <= cfg["BLOCK_N"] <= 256:
            raise fail(fn, "config", "has a BLOCK_N the int8 P·V variant cannot use", "BLOCK_N in 32..256 with PV "
                       "'i8x2'", repr(cfg["BLOCK_N"]))
    if pv == "fp16w" and kv != "int8":
        raise fail(fn, "config", "asks for the int8-word P·V variant on a float8 cache", "PV 'dequant', 'fp16' or "
                   "'fp8' (or an int8 cache)", repr(pv))
    if pv == "fp8" and kv != "fp8":
        raise fail(fn, "config", "asks for the fp8 P·V variant on an int8 cache", "PV 'dequant' or 'fp16' (or a "
                   "float8_e4m3fn cache)", repr(pv))
    return (DECODE_QK_VARIANTS.index(qk) if qk else 0), (DECODE_PV_VARIANTS.index(pv) if pv else 0), block_m


def _check_num_splits(fn: str, num_splits: Any) -> int | None:
    if num_splits is None:
        return None
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or not 1 <= num_splits <= MAX_SPLITS:
        raise fail(fn, "num_splits", "must be None or an int in range", f"None or 1..{MAX_SPLITS}", repr(num_splits))
    return num_splits


def _choose(fn: str, q: torch.Tensor, backend: str, kv_dtype: torch.dtype | None = None,
            names: tuple[str, ...] | None = _BUILTIN_OPS) -> Any:
    """The decode operator to run (the registry's choice), raising or warning as the decode functions do."""
    op, reason = decode_choice(q, backend, kv_dtype, names=names)
    if op is None:
        if backend == "auto":  # every operator refused or was passed over (only with a custom registry)
            raise NotImplementedError(f"{fn}: no registered decode operator runs these inputs: {reason}")
        what = "the Triton kernel" if backend == "triton" else f"the {backend!r} decode operator"
        raise NotImplementedError(f"{fn}: {what} cannot run these inputs: {reason}")
    if reason is not None and backend == "auto" and kv_dtype is not None and kv_dtype != q.dtype and q.is_cuda:
        # a quantized cache on a GPU the kernel refuses: the reference dequantises the whole cache in
        # float32 (a full copy) -- correct but slow, so say so (once per reason)
        _warn_once(f"{fn}: the Triton decode kernel cannot read this quantized cache ({reason}); "
                   "backend='auto' runs decode_reference, which dequantises the whole cache in PyTorch")
    return op


_WARNED: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)


def _tile_blocked_v(fn: str, k: Any, v: Any) -> int:
    """The tile ``T`` of a tile-blocked V cache (a 5-D ``(B, H_kv, N_max / T, D, T)`` tensor, as
    :func:`sparseattn.state.kv_cache.tile_blocked` makes it), checked against ``k``; 0 for any other ``v`` (which
    :func:`_check_decode` checks)."""
    if not isinstance(v, torch.Tensor) or v.dim() != 5 or not isinstance(k, torch.Tensor) or k.dim() != 4:
        return 0
    B, Hkv, N, D = k.shape
    T = v.shape[-1]
    if T < 16 or T > 256 or T & (T - 1):
        raise fail(fn, "v_cache", "is tile-blocked with an unsupported tile (its last dim)",
                   "a power of two in [16, 256]", f"shape {tuple(v.shape)}")
    if N % T or tuple(v.shape) != (B, Hkv, N // T, D, T):
        raise fail(fn, "v_cache", "does not match k_cache as a tile-blocked V",
                   f"(B, H_kv, N_max / T, D, T) with N_max a multiple of T = {(B, Hkv, N // T, D, T)}",
                   f"shape {tuple(v.shape)} for k_cache {tuple(k.shape)}")
    if v.stride(-1) != 1 or v.stride(-2) != T or v.stride(-3) != T * D:
        raise fail(fn, "v_cache", "is tile-blocked with tiles that are not contiguous",
                   f"strides (..., {T * D}, {T}, 1) in the last three dims", f"strides {v.stride()}")
    if v.dtype != k.dtype or v.device != k.device:
        raise fail(fn, "v_cache", "differs from k_cache in dtype or device", f"{_dt(k)} on {k.device}",
                   f"{_dt(v)} on {v.device}")
    return T


def from_tile_blocked(v: torch.Tensor) -> torch.Tensor:
    """A tile-blocked V ``(B, H_kv, N / T, D, T)`` as ``(B, H_kv, N, D)`` (a copy)."""
    B, Hkv, nt, D, T = v.shape
    return v.transpose(-1, -2).reshape(B, Hkv, nt * T, D)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    seqlens: torch.Tensor | None = None,
    scale: float | None = None,
    num_splits: int | None = None,
    return_lse: bool = False,
    backend: str = "auto",
    check_seqlens: bool | None = None,
    config: dict[str, int] | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    causal: bool = True,
) -> torch.Tensor | AttentionState:
    """Attention of ``Lq`` new tokens per sequence over that sequence's KV cache (decode step).

    Row (head ``h``, token ``i``) of sequence ``b`` attends keys ``j < seqlens[b] - Lq + i + 1``
    (the cache already holds the new tokens' keys at ``seqlens[b] - Lq .. seqlens[b] - 1``; bottom-right
    causal among them). Query head ``h`` uses KV head ``h // (H // H_kv)`` (GQA, never copied).

    Args:
        q: ``(B, H, Lq, D)``, ``1 <= Lq <= 64``; float16/bfloat16 (float32 too; float64 reference only).
        k_cache: ``(B, H_kv, N_max, D)``, same dtype and device as ``q``; only the last dim need be contiguous.
        v_cache: same shape as ``k_cache``; or tile-blocked, ``(B, H_kv, N_max / T, D, T)`` with ``T`` a power of
            two in [16, 256] dividing ``N_max`` (:func:`sparseattn.state.kv_cache.tile_blocked`): the kernel reads
            its ``[D, T]`` tiles as they are (no transpose of an 8-bit V tile; ``BLOCK_N = T``).
        seqlens: ``(B,)`` int32 valid lengths on q's device (int64 is converted); ``None`` = all ``N_max``.
            Keys at or beyond ``seqlens[b]`` are never read.
        scale: softmax scale, default ``D ** -0.5``.
        num_splits: key splits per sequence (split-KV); ``None`` picks one from the batch, the KV heads
            and ``N_max`` to fill the GPU (:func:`decode_num_splits`). Any value gives the same result up
            to rounding.
        return_lse: also return the natural-log lse.
        backend: ``"auto"`` (the Triton kernel on CUDA when supported, else the reference),
            ``"triton"`` (raise ``NotImplementedError`` if it cannot run) or ``"reference"``.
        check_seqlens: check ``0 <= seqlens <= N_max`` on the host; ``None`` (default) checks only a CPU
            ``seqlens`` (free). A CUDA ``seqlens`` is not read on the host: out-of-range values are clamped
            into ``[0, N_max]`` by the kernel.
        config: fixed kernel config ``{"BLOCK_N", "num_warps", "num_stages"}`` (experiments, benchmarks),
            optionally with ``"QK"`` / ``"PV"`` (the quantized path's variants, see
            :class:`sparseattn.ops.launch_configs.DecodeLaunchConfig`; ignored for a float cache or float32
            q) and ``"BLOCK_M"`` (a floor on the row tile).
        k_scale, v_scale: a quantized cache: ``k_cache``/``v_cache`` hold int8 or float8_e4m3fn values
            (both the same format) and these are their float32 per-key, per-KV-head scales
            ``(B, H_kv, N_max)`` (or ``(B, H_kv, N_max, 1)``, as :func:`sparseattn.state.kv_cache.quantize`
            returns; any strides), key ``j`` being ``k_cache[..., j, :] * k_scale[..., j]``. The kernel
            reads the quantized bytes and dequantises in registers (fp32 accumulation); float8 needs
            compute capability >= 8.9. Both or neither.
        causal: ``False``: every new token attends all keys ``j < seqlens[b]`` (a segment that lies wholly
            before the new tokens, e.g. a mixed cache's quantized part, merged with the rest through
            ``return_lse`` and :func:`sparseattn.state.merge_states`).

    Returns:
        ``out`` ``(B, H, Lq, D)`` in q's dtype, or with ``return_lse`` ``AttentionState(out, lse)`` with
        lse ``(B, H, Lq)`` natural-log float32. Rows that attend no key: out 0, lse ``-inf``.

    Raises:
        ValueError: malformed inputs (shapes, dtypes, devices, ``Lq > 64``, seqlens out of range when checked,
            a quantized cache without scales or with scales of the wrong shape/dtype/device).
        NotImplementedError: ``backend="triton"`` on inputs the kernel does not support (:func:`decode_refusal`,
            e.g. float8 K/V below compute capability 8.9).
    """
    fn = "decode_attention"
    v_tile = _tile_blocked_v(fn, k_cache, v_cache)
    # a tile-blocked V has k_cache's dtype and device (checked): k_cache stands in for it in the checks below
    dims, scale = _check_decode(fn, q, k_cache, k_cache if v_tile else v_cache, scale, k_scale=k_scale,
                                v_scale=v_scale)
    B, H, Hkv, Lq, N, D = dims
    ks, vs = _check_kv_scales(fn, q, k_scale, v_scale, B, Hkv, N)
    _check_bool(fn, "causal", causal)
    seqlens = _check_seqlens(fn, seqlens, B, N, q.device, check_seqlens)
    num_splits = _check_num_splits(fn, num_splits)
    _check_return_lse(fn, return_lse)
    op = _choose(fn, q, _check_backend(fn, backend, None), k_cache.dtype, names=None)
    if v_tile and op.name != _KERNEL_OP:  # the reference and registered operators take V as (B, H_kv, N_max, D)
        v_cache = from_tile_blocked(v_cache)
    if op.name not in _BUILTIN_OPS:  # a registered decode operator: its run function, with this call's arguments
        return op.run_fn()(q, k_cache, v_cache, seqlens=seqlens, scale=scale, num_splits=num_splits,
                           return_lse=return_lse, config=config, k_scale=ks, v_scale=vs, causal=causal)
    if op.name == _KERNEL_OP:
        st = _launch(fn, q, k_cache, v_cache, seqlens, None, None, 1, dims, scale, num_splits, config, N, ks, vs,
                     causal)
    else:
        st = decode_reference(q, k_cache, v_cache, seqlens=seqlens, scale=scale, k_scale=ks, v_scale=vs,
                              causal=causal)
    return st if return_lse else st.out


# ---------------------------------------------------------------------------------------------- sparse decode


def _check_page_size(fn: str, page_size: Any) -> int:
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size <= 0:
        raise fail(fn, "page_size", "must be a positive integer", "an int > 0 (16 or 32 typical)", repr(page_size))
    return page_size


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_indices: torch.Tensor,
    page_counts: torch.Tensor,
    *,
    page_size: int,
    seqlens: torch.Tensor | None = None,
    scale: float | None = None,
    num_splits: int | None = None,
    return_lse: bool = False,
    backend: str = "auto",
    check_seqlens: bool | None = None,
    config: dict[str, int] | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor | AttentionState:
    """Decode attention over the listed pages only (per sequence and KV head); other keys are never read.

    Equal to :func:`decode_reference` with ``key_mask=pages_key_mask(page_indices, page_counts, ...)``:
    the masks of :func:`decode_attention` (seqlens, causal among the ``Lq`` new tokens) still apply
    inside the pages. Entries must be distinct valid page indices (``0 <= p < ceil(N_max / page_size)``);
    the order does not matter (ascending reads memory in order).

    Args:
        page_indices: ``(B, H_kv, K)`` int32 page indices; the first ``page_counts[b, h]`` are used.
        page_counts: ``(B, H_kv)`` int32, ``0 <= page_counts <= K``.
        page_size: keys per page.
        k_scale, v_scale: a quantized cache, as :func:`decode_attention` (the scales of the listed pages'
            keys are gathered per key, like the K/V rows).
        Others: as :func:`decode_attention`.

    Returns:
        As :func:`decode_attention`.
    """
    fn = "paged_decode_attention"
    dims, scale = _check_decode(fn, q, k_cache, v_cache, scale, k_scale=k_scale, v_scale=v_scale)
    B, H, Hkv, Lq, N, D = dims
    ks, vs = _check_kv_scales(fn, q, k_scale, v_scale, B, Hkv, N)
    _check_page_size(fn, page_size)
    check_tensor(fn, "page_indices", page_indices, ndim=3, shape_desc="(B, H_kv, K)")
    check_tensor(fn, "page_counts", page_counts, ndim=2, shape_desc="(B, H_kv)")
    for name, t in (("page_indices", page_indices), ("page_counts", page_counts)):
        if t.dtype not in (torch.int32, torch.int64):
            raise fail(fn, f"{name}.dtype", "is not supported", "int32 (or int64)", str(t.dtype).replace("torch.", ""))
        if t.device != q.device:
            raise fail(fn, name, "is on another device than q", str(q.device), str(t.device))
    if page_indices.shape[:2] != (B, Hkv) or page_indices.shape[2] < 1 or tuple(page_counts.shape) != (B, Hkv):
        raise fail(fn, "page_indices/page_counts", "have the wrong shape", f"({B}, {Hkv}, K >= 1) and ({B}, {Hkv})",
                   f"{tuple(page_indices.shape)} and {tuple(page_counts.shape)}")
    seqlens = _check_seqlens(fn, seqlens, B, N, q.device, check_seqlens)
    num_splits = _check_num_splits(fn, num_splits)
    _check_return_lse(fn, return_lse)
    if _choose(fn, q, _check_backend(fn, backend, _BUILTIN_OPS), k_cache.dtype).name == _KERNEL_OP:
        pidx = page_indices if page_indices.dtype == torch.int32 and page_indices.stride(-1) == 1 else \
            page_indices.to(torch.int32).contiguous()
        pnum = page_counts if page_counts.dtype == torch.int32 and page_counts.stride(-1) == 1 else \
            page_counts.to(torch.int32).contiguous()
        st = _launch(fn, q, k_cache, v_cache, seqlens, pidx, pnum, page_size, dims, scale, num_splits, config,
                     page_indices.shape[2] * page_size, ks, vs)
    else:
        mask = pages_key_mask(page_indices, page_counts, page_size, N)
        st = decode_reference(q, k_cache, v_cache, seqlens=seqlens, scale=scale, key_mask=mask, k_scale=ks,
                              v_scale=vs)
    return st if return_lse else st.out

