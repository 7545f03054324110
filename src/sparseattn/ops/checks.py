"""The launchers' shared argument checks (a leaf of ``ops``: imports only ``_validation`` and ``state.types``).

``check_attn_mask`` / ``check_segment`` / ``check_raw_state`` (the reference and the Triton launcher take
the same float masks, key segments and carried states), ``_check_kv_scales`` (quantized K/V with per-key
scales) and the GPU compute capability, looked up once per GPU index (``_capability_of``: one entry per index).
Both :mod:`sparseattn.ops.reference` and :mod:`sparseattn.ops.triton_launch` import them from here (and
re-export them), so neither imports the other for a check.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from sparseattn._validation import fail
from sparseattn.state.types import AttentionState, RawState

__all__ = ["check_attn_mask", "check_raw_state", "check_segment"]


def check_attn_mask(func: str, attn_mask: Any, B: int, H: int, Nq: int, Nkv: int,
                    device: torch.device) -> torch.Tensor | None:
    """Validate an additive float mask ``(B|1, H|1, N_q, N_kv)`` (0 attend, ``-inf`` masked, finite = bias).

    Values are not read (no host sync); NaN / ``+inf`` entries are the caller's responsibility.
    """
    if attn_mask is None:
        return None
    if not isinstance(attn_mask, torch.Tensor):
        raise fail(func, "attn_mask", "must be a torch.Tensor or None", "a float tensor (B|1, H|1, N_q, N_kv)",
                   type(attn_mask).__name__)
    if not attn_mask.dtype.is_floating_point:
        raise fail(func, "attn_mask", "must be an additive float mask (0 attend, -inf masked)",
                   "a floating-point dtype", str(attn_mask.dtype).replace("torch.", ""))
    shp = tuple(attn_mask.shape)
    if (attn_mask.dim() != 4 or shp[0] not in (1, B) or shp[1] not in (1, H) or shp[2:] != (Nq, Nkv)):
        raise fail(func, "attn_mask", "has the wrong shape", f"(B|1, H|1, N_q, N_kv) = ({B}|1, {H}|1, {Nq}, {Nkv})",
                   f"{shp}")
    if attn_mask.device != device:
        raise fail(func, "attn_mask", "is on another device than q", str(device), str(attn_mask.device))
    return attn_mask


def check_segment(func: str, kv_offset: Any, kv_len: Any, Nq: int, Nkv: int) -> tuple[int, int]:
    """Check a key segment's position; returns ``(kv_len, causal offset of the segment)``.

    The segment holds global keys ``kv_offset .. kv_offset + N_kv - 1`` of a sequence of ``kv_len``
    keys whose last ``N_q`` positions are the queries: query ``i`` sees local keys ``<= i + OFF`` with
    ``OFF = kv_len - N_q - kv_offset``.
    """
    if isinstance(kv_offset, bool) or not isinstance(kv_offset, int) or kv_offset < 0:
        raise fail(func, "kv_offset", "must be a non-negative integer", "an int >= 0", repr(kv_offset))
    if kv_len is None:
        kv_len = kv_offset + Nkv
    if isinstance(kv_len, bool) or not isinstance(kv_len, int):
        raise fail(func, "kv_len", "must be an integer or None", "an int >= kv_offset + N_kv", repr(kv_len))
    if kv_offset + Nkv > kv_len:
        raise fail(func, "k", "segment runs past the end of the cache (kv_offset + N_kv > kv_len)",
                   f"kv_offset + N_kv <= kv_len = {kv_len}", f"kv_offset={kv_offset}, N_kv={Nkv}")
    return kv_len, kv_len - Nq - kv_offset


def check_raw_state(func: str, name: str, state: Any, B: int, H: int, Nq: int, D: int, device: torch.device,
                    dtype: torch.dtype) -> RawState | None:
    """Check an incoming :class:`RawState` against the call's shapes, dtype and device (``None`` passes)."""
    if state is None:
        return None
    if isinstance(state, AttentionState) or not (isinstance(state, tuple) and len(state) == 3
                                                 and all(isinstance(t, torch.Tensor) for t in state)):
        raise fail(func, name, "must be a RawState (m, l, acc) of tensors", "RawState(m, l, acc)", type(state).__name__)
    m, l, acc = state
    want = {"m": (B, H, Nq), "l": (B, H, Nq), "acc": (B, H, Nq, D)}
    for part, t in (("m", m), ("l", l), ("acc", acc)):
        if tuple(t.shape) != want[part]:
            raise fail(func, f"{name}.{part}", "has the wrong shape", want[part], tuple(t.shape))
        if t.dtype != dtype:
            raise fail(func, f"{name}.{part}", "has the wrong dtype", str(dtype).replace("torch.", ""),
                       str(t.dtype).replace("torch.", ""))
        if t.device != device:
            raise fail(func, f"{name}.{part}", "is on another device than q", str(device), str(t.device))
    return RawState(m, l, acc)


@functools.lru_cache(maxsize=64)  # one entry per GPU index
def _capability_of(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _capability(device: torch.device) -> tuple[int, int]:
    """Compute capability, looked up once per device (this runs on every call)."""
    return _capability_of(device.index if device.index is not None else torch.cuda.current_device())


def _check_kv_scales(fn: str, q: torch.Tensor, k: Any, v: Any, k_scale: Any,
                     v_scale: Any) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Quantized K/V: int8 / float8_e4m3fn values with float32 per-key scales; returns contiguous ``(B, H_kv, N)`` scales."""
    if k_scale is None and v_scale is None:
        return None, None
    if k_scale is None or v_scale is None:
        raise fail(fn, "k_scale/v_scale", "must be given together (quantized K and V)", "both or neither",
                   f"k_scale={'set' if k_scale is not None else None}, v_scale={'set' if v_scale is not None else None}")
    qdt = [torch.int8] + ([torch.float8_e4m3fn] if hasattr(torch, "float8_e4m3fn") else [])
    out = []
    for name, t, sc in (("k", k, k_scale), ("v", v, v_scale)):
        if not isinstance(t, torch.Tensor) or t.dtype not in qdt:
            raise fail(fn, name, "must hold quantized values with k_scale/v_scale", "int8 or float8_e4m3fn",
                       getattr(t, "dtype", type(t).__name__))
        if not isinstance(sc, torch.Tensor) or sc.dtype != torch.float32:
            raise fail(fn, f"{name}_scale", "must be a float32 tensor", "float32 (B, H_kv, N_kv)",
                       getattr(sc, "dtype", type(sc).__name__))
        if t.dim() == 4 and sc.dim() == 4 and sc.shape[-1] == 1:
            sc = sc.squeeze(-1)
        if t.dim() != 4 or tuple(sc.shape) != tuple(t.shape[:3]):
            raise fail(fn, f"{name}_scale", "does not match the quantized tensor (one scale per key and head)",
                       tuple(t.shape[:3]) if t.dim() == 4 else "(B, H_kv, N_kv)", tuple(sc.shape))
        if sc.device != q.device:
            raise fail(fn, f"{name}_scale", "is on another device than q", str(q.device), str(sc.device))
        out.append(sc.contiguous())
    if k.dtype != v.dtype:
        raise fail(fn, "k/v dtypes", "must be equal", "one quantized dtype", f"k={k.dtype}, v={v.dtype}")
    if k.dtype != torch.int8 and q.is_cuda and _capability(q.device) < (8, 9):
        raise NotImplementedError(f"{fn}: float8 K/V need a GPU of compute capability >= 8.9")
    return out[0], out[1]
