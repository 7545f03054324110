"""Op-level error metrics between an output and its reference."""

from __future__ import annotations

import math
from typing import Any

import torch

from sparseattn._validation import fail

__all__ = ["cosine_similarity", "relative_l1", "relative_l2", "rmse", "max_abs_error", "sqnr_db", "precision_metric"]


def _pair(fn: str, out: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(out, torch.Tensor) or not isinstance(ref, torch.Tensor):
        raise fail(fn, "out/ref", "must be tensors", "torch.Tensor", f"{type(out).__name__}, {type(ref).__name__}")
    if out.shape != ref.shape:
        raise fail(fn, "out", "shape differs from ref", f"shape {tuple(ref.shape)}", f"shape {tuple(out.shape)}")
    return out.detach().to(torch.float64).flatten(), ref.detach().to(torch.float64).flatten()


def cosine_similarity(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Cosine of the angle between the flattened tensors (1.0 when both are all-zero)."""
    a, b = _pair("cosine_similarity", out, ref)
    na, nb = a.norm(), b.norm()
    if float(na) == 0.0 and float(nb) == 0.0:
        return 1.0
    if float(na) == 0.0 or float(nb) == 0.0:
        return 0.0
    return float((a @ b) / (na * nb))


def relative_l1(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``sum|out - ref| / sum|ref|`` (0 when both are zero, inf when only ref is)."""
    a, b = _pair("relative_l1", out, ref)
    num, den = float((a - b).abs().sum()), float(b.abs().sum())
    return 0.0 if num == 0.0 else (num / den if den > 0 else math.inf)


def relative_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref||_2 / ||ref||_2``."""
    a, b = _pair("relative_l2", out, ref)
    num, den = float((a - b).norm()), float(b.norm())
    return 0.0 if num == 0.0 else (num / den if den > 0 else math.inf)


def rmse(out: torch.Tensor, ref: torch.Tensor) -> float:
    a, b = _pair("rmse", out, ref)
    return float(((a - b) ** 2).mean().sqrt()) if a.numel() else 0.0


def max_abs_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    a, b = _pair("max_abs_error", out, ref)
    return float((a - b).abs().max()) if a.numel() else 0.0


def sqnr_db(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Signal-to-quantisation-noise ratio ``10 log10(||ref||² / ||out - ref||²)`` in dB (inf if exact)."""
    a, b = _pair("sqnr_db", out, ref)
    noise = float(((a - b) ** 2).sum())
    sig = float((b ** 2).sum())
    if noise == 0.0:
        return math.inf
    if sig == 0.0:
        return -math.inf
    return 10.0 * math.log10(sig / noise)


def precision_metric(out: torch.Tensor, ref: torch.Tensor, *, density: float | None = None) -> dict[str, Any]:
    """All op-level metrics of ``out`` against ``ref`` in one dict.

    Keys: ``cosine``, ``relative_l1``, ``relative_l2``, ``rmse``, ``max_abs``, ``sqnr_db``, ``nan_count``,
    and, when ``density`` is given, ``density`` and ``sparsity``.
    """
    a, b = _pair("precision_metric", out, ref)
    res: dict[str, Any] = {
        "cosine": cosine_similarity(out, ref),
        "relative_l1": relative_l1(out, ref),
        "relative_l2": relative_l2(out, ref),
        "rmse": rmse(out, ref),
        "max_abs": max_abs_error(out, ref),
        "sqnr_db": sqnr_db(out, ref),
        "nan_count": int(torch.isnan(a).sum()),
    }
    if density is not None:
        res["density"] = float(density)
        res["sparsity"] = 1.0 - float(density)
    return res
