"""Launch configurations for the block-sparse forward kernel (autotuning space and fixed fallbacks).

Kernel tiles must nest inside layout blocks: ``BLOCK_M`` divides the layout's ``block_m`` and
``BLOCK_N`` divides its ``block_n`` (both are 64 or 128), so one program reads one key-block list.
"""

from __future__ import annotations

from typing import Any

import triton

# (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates per head_dim, Hopper-first.
_CANDIDATES: dict[int, list[tuple[int, int, int, int]]] = {
    64: [(128, 128, 8, 3), (128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 128, 4, 3)],
    128: [(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (64, 128, 4, 2)],
    256: [(128, 64, 8, 2), (128, 32, 8, 2), (64, 64, 4, 2), (64, 32, 4, 3)],
}

AUTOTUNE_KEY = ["HEAD_DIM", "LAYOUT_BM", "LAYOUT_BN", "CAUSAL", "N_CTX_KEY"]


def autotune_configs() -> list[triton.Config]:
    """Every candidate for every head_dim; :func:`prune` keeps those that fit the call."""
    seen: set[tuple[int, int, int, int]] = set()
    out = []
    for cands in _CANDIDATES.values():
        for bm, bn, w, s in cands:
            if (bm, bn, w, s) in seen:
                continue
            seen.add((bm, bn, w, s))
            out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s))
    return out


def _fits(bm: int, bn: int, w: int, s: int, head_dim: int, layout_bm: int, layout_bn: int) -> bool:
    return (bm, bn, w, s) in _CANDIDATES.get(head_dim, []) and layout_bm % bm == 0 and layout_bn % bn == 0


def prune(configs: list[triton.Config], named_args: dict[str, Any], **kwargs: Any) -> list[triton.Config]:
    """Keep the candidates of this head_dim whose tiles nest in the layout blocks."""
    allargs = {**named_args, **kwargs}
    d, lbm, lbn = int(allargs["HEAD_DIM"]), int(allargs["LAYOUT_BM"]), int(allargs["LAYOUT_BN"])
    kept = [c for c in configs
            if _fits(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages, d, lbm, lbn)]
    return kept or [c for c in configs if lbm % c.kwargs["BLOCK_M"] == 0 and lbn % c.kwargs["BLOCK_N"] == 0][:1]


def default_config(head_dim: int, layout_bm: int, layout_bn: int, *, interpret: bool, pv_skip: bool) -> dict[str, int]:
    """A fixed config (no autotuning): for the CPU interpreter, the pv-skip path, or autotune off.

    ``pv_skip`` forces kernel tiles equal to layout tiles (the rule's unit).
    """
    if pv_skip:
        bm, bn = layout_bm, layout_bn
        if head_dim == 256 and bm * bn > 64 * 128:
            warps, stages = 8, 1
        else:
            warps, stages = (8 if bm == 128 else 4), 2
        return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages}
    if interpret:
        # fewest programs and iterations: the interpreter's cost is per operation, not per element
        return {"BLOCK_M": layout_bm, "BLOCK_N": layout_bn, "num_warps": 4, "num_stages": 1}
    for bm, bn, w, s in _CANDIDATES[head_dim]:
        if layout_bm % bm == 0 and layout_bn % bn == 0:
            return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": s}
    return {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}  # pragma: no cover
