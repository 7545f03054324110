"""Input validation shared by every public entry point.

One error format everywhere::

    <function>: <argument> <problem>; expected <X>, got <Y>

``ValueError`` for bad shapes, dtypes, devices or values; ``NotImplementedError`` is raised by the
dispatchers for valid but unsupported combinations. Nothing here uses ``assert``.

This module is the bottom layer: it imports nothing from ``sparseattn`` (``layout.block_layout``
imports it; a :class:`~sparseattn.layout.BlockLayout` is recognised by its class marker).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from sparseattn.layout.block_layout import BlockLayout

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def fail(func: str, arg: str, problem: str, expected: Any, got: Any) -> ValueError:
    """Build the project's standard ``ValueError`` (returned, so callers write ``raise fail(...)``)."""
    return ValueError(f"{func}: {arg} {problem}; expected {expected}, got {got}")


def check_positive_int(func: str, name: str, value: Any, *, expected: str = "an int > 0") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise fail(func, name, "must be a positive integer", expected, repr(value))
    return value


def check_nonneg_int(func: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise fail(func, name, "must be a non-negative integer", "an int >= 0", repr(value))
    return value


def check_fraction(func: str, name: str, value: Any, *, low_open: bool = False, optional: bool = False) -> float | None:
    """Check a number in [0, 1] (or (0, 1] with ``low_open``); with ``optional``, ``None`` passes (and is returned)."""
    if optional and value is None:
        return None
    rng = "(0, 1]" if low_open else "[0, 1]"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (optional and value != value):
        raise fail(func, name, "must be a number or None" if optional else "must be a number", f"a float in {rng}",
                   repr(value))
    v = float(value)
    if not (0.0 <= v <= 1.0) or (low_open and v == 0.0) or v != v:
        raise fail(func, name, "is out of range", f"a float in {rng}", repr(value))
    return v


def check_bool(func: str, name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise fail(func, name, "must be a bool", "True or False", repr(value))
    return value


def check_version(func: str, value: Any, supported: int) -> None:
    """A config's ``version`` field: exactly ``supported``."""
    if isinstance(value, bool) or not isinstance(value, int) or value != supported:
        raise fail(func, "version", "is not supported", supported, repr(value))


def check_pv_threshold(func: str, value: Any) -> None:
    """A config's ``pv_threshold``: ``None`` or a positive finite number (a natural-log gap)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (float(value) > 0) or math.isinf(value):
        raise fail(func, "pv_threshold", "must be a positive finite number or None", "float > 0 (natural-log gap)",
                   repr(value))


def check_file_path(func: str, path: Any, example: str) -> Path:
    """A file to write: a non-empty ``str`` / ``os.PathLike`` that is not a directory; returns it expanded."""
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise fail(func, "path", "must be a file path", f"e.g. {example!r}", repr(path))
    p = Path(path).expanduser()
    if p.is_dir():
        raise fail(func, f"path {p}", "is a directory", "a file path", "a directory")
    return p


def check_token_ids_list(func: str, input_ids_list: Any) -> None:
    """A non-empty list (or tuple) of 1-D or ``(1, N)`` token-id tensors."""
    if not isinstance(input_ids_list, (list, tuple)) or not input_ids_list \
            or not all(isinstance(t, torch.Tensor) and t.dim() in (1, 2) for t in input_ids_list):
        raise fail(func, "input_ids_list", "must be a non-empty list of 1-D or (1, N) token tensors", "list[tensor]",
                   type(input_ids_list).__name__)


def check_tensor(func: str, name: str, t: Any, *, ndim: int | None = None, shape_desc: str = "") -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise fail(func, name, "must be a torch.Tensor", "torch.Tensor", type(t).__name__)
    if ndim is not None and t.dim() != ndim:
        raise fail(func, name, "has the wrong rank", f"{ndim} dims {shape_desc}".strip(), f"{name}.shape={tuple(t.shape)}")
    return t


def check_qkv(
    func: str,
    q: Any,
    k: Any,
    v: Any,
    *,
    allowed_dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES,
) -> tuple[int, int, int, int, int, int]:
    """Validate attention inputs in (B, H, N, D) layout.

    Returns:
        ``(B, H, H_kv, N_q, N_kv, D)``.

    Raises:
        ValueError: wrong type/rank, mismatched batch/head_dim/length, ``H % H_kv != 0``,
            non-float or mixed dtypes, mixed devices, empty dimensions.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(func, name, t, ndim=4, shape_desc="(B, H, N, D)")
        if t.dtype not in allowed_dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in allowed_dtypes)
            raise fail(func, f"{name}.dtype", "is not supported", f"one of {names}", str(t.dtype).replace("torch.", ""))
    if not (q.dtype == k.dtype == v.dtype):
        raise fail(func, "q/k/v dtypes", "must all be equal", "one dtype", f"q={q.dtype}, k={k.dtype}, v={v.dtype}")
    return check_kv_geometry(func, q, k, v)


def check_kv_geometry(func: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, k_name: str = "k",
                      v_name: str = "v") -> tuple[int, int, int, int, int, int]:
    """One device for q, k and v, ``v`` shaped as ``k``, then :func:`check_qk_geometry`; errors name the
    tensors ``k_name`` / ``v_name`` (e.g. ``k_cache`` / ``v_cache`` for decode)."""
    if not (q.device == k.device == v.device):
        raise fail(func, f"q/{k_name}/{v_name} devices", "must all be equal", "one device",
                   f"q={q.device}, {k_name}={k.device}, {v_name}={v.device}")
    if tuple(v.shape) != tuple(k.shape):
        raise fail(func, v_name, f"must have the same shape as {k_name}", f"{v_name}.shape={tuple(k.shape)}",
                   f"{v_name}.shape={tuple(v.shape)}")
    return check_qk_geometry(func, q, k, k_name=k_name)


def check_qk_geometry(func: str, q: torch.Tensor, k: torch.Tensor, *,
                      k_name: str = "k") -> tuple[int, int, int, int, int, int]:
    """Shape agreement of 4-D ``q (B, H, N_q, D)`` and ``k (B, H_kv, N_kv, D)``; returns ``(B, H, H_kv, N_q, N_kv, D)``.
    Errors call ``k`` ``k_name``."""
    B, H, Nq, D = q.shape
    Bk, Hkv, Nkv, Dk = k.shape
    if Bk != B:
        raise fail(func, k_name, "batch size differs from q", f"{k_name}.shape[0]={B}", f"{k_name}.shape[0]={Bk}")
    if Dk != D:
        raise fail(func, k_name, "head_dim differs from q", f"{k_name}.shape[3]={D}", f"{k_name}.shape[3]={Dk}")
    if min(B, H, Nq, D, Hkv, Nkv) <= 0:
        raise fail(func, f"q/{k_name}", "has an empty dimension", "all dims > 0",
                   f"q.shape={tuple(q.shape)}, {k_name}.shape={tuple(k.shape)}")
    if H % Hkv != 0:
        raise fail(func, k_name, "heads must divide q heads (GQA)", f"H % H_kv == 0 with H={H}", f"H_kv={Hkv}")
    return B, H, Hkv, Nq, Nkv, D


def check_scale(func: str, scale: Any) -> float | None:
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (0 < float(scale) < float("inf")):
        raise fail(func, "scale", "must be a positive finite number or None", "a finite float > 0", repr(scale))
    return float(scale)


def check_layout_for(
    func: str, layout: "BlockLayout", B: int, H: int, Nq: int, Nkv: int, device: torch.device | None = None
) -> None:
    """Check that ``layout`` was built for these shapes (never broadcast silently)."""
    if getattr(type(layout), "_IS_BLOCK_LAYOUT", False) is not True:  # isinstance(layout, BlockLayout)
        raise fail(func, "layout", "must be a BlockLayout", "BlockLayout", type(layout).__name__)
    if (layout.seqlen_q, layout.seqlen_kv) != (Nq, Nkv):
        raise fail(
            func, "layout", "was built for other sequence lengths",
            f"seqlen_q={Nq}, seqlen_kv={Nkv}", f"seqlen_q={layout.seqlen_q}, seqlen_kv={layout.seqlen_kv}",
        )
    if (layout.batch, layout.heads) != (B, H):
        raise fail(func, "layout", "was built for another batch/head count", f"(B, H)=({B}, {H})", f"({layout.batch}, {layout.heads})")
    if device is not None and layout.kv_indices.device != torch.device(device):
        raise fail(func, "layout", "is on another device than q", str(device), str(layout.kv_indices.device))


def check_sliding_window(func: str, sliding_window: Any, causal: Any) -> int | None:
    """``None`` or a positive int (not a bool), and only with ``causal=True``; returns it."""
    if sliding_window is None:
        return None
    if isinstance(sliding_window, bool) or not isinstance(sliding_window, int) or sliding_window <= 0:
        raise fail(func, "sliding_window", "must be a positive integer or None", "an int > 0 (keys per window) or None",
                   repr(sliding_window))
    if causal is not True:
        raise fail(func, "sliding_window", "needs causal=True (the window counts back from each query's diagonal key)",
                   "causal=True", f"causal={causal!r}")
    return sliding_window


def check_attention_args(
    func: str,
    q: Any,
    k: Any,
    v: Any,
    *,
    causal: Any,
    layout: "BlockLayout | None",
    scale: Any,
    pv_threshold: Any,
    sliding_window: Any = None,
) -> tuple[tuple[int, int, int, int, int, int], float]:
    """Everything an attention entry point checks before it computes (one place for all of them).

    ``sliding_window`` (``None`` = off) must be a positive int and needs ``causal=True``: query ``i``
    then attends keys ``j`` with ``i + OFF - W < j <= i + OFF`` (``OFF = N_kv - N_q``).

    Returns:
        ``((B, H, H_kv, N_q, N_kv, D), scale)`` with ``scale`` resolved to ``D ** -0.5`` when None.
    """
    dims = check_qkv(func, q, k, v)
    B, H, _, Nq, Nkv, D = dims
    checked = check_scale(func, scale)
    if not isinstance(causal, bool):
        raise fail(func, "causal", "must be a bool", "True or False", repr(causal))
    if layout is not None:
        check_layout_for(func, layout, B, H, Nq, Nkv, q.device)
    if pv_threshold is not None:
        if layout is None:
            raise fail(func, "pv_threshold", "needs a layout (its tiles are the layout's blocks)", "layout=BlockLayout",
                       "layout=None")
        if isinstance(pv_threshold, bool) or not isinstance(pv_threshold, (int, float)) or not pv_threshold > 0:
            raise fail(func, "pv_threshold", "must be a positive number", "float > 0 (inf: never skip)", repr(pv_threshold))
    check_sliding_window(func, sliding_window, causal)
    return dims, (D ** -0.5 if checked is None else checked)
