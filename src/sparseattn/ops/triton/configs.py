"""Launch configurations for the block-sparse forward kernel (autotuning space and fixed fallbacks).

Kernel tiles must nest inside layout blocks: ``BLOCK_M`` divides the layout's ``block_m`` and
``BLOCK_N`` divides its ``block_n`` (both are 64 or 128), so one program reads one key-block list.
"""

from __future__ import annotations

from typing import Any

import triton

# (BLOCK_M, BLOCK_N, num_warps, num_stages, USE_TMA) candidates per head_dim, Hopper-first. The
# pointer-load candidates are the ones measured best on an H100 (benchmarks/, first run); the TMA
# ones load K/V tiles through device-side tensor descriptors and are tried only where the launcher
# can use TMA (sm_90+, 16-byte aligned K/V rows).
_CANDIDATES: dict[int, list[tuple[int, int, int, int, bool]]] = {
    64: [(128, 128, 8, 3, False), (128, 64, 4, 3, False), (64, 64, 4, 3, False),
         (128, 128, 8, 3, True), (128, 64, 4, 3, True), (64, 64, 4, 3, True)],
    128: [(128, 128, 8, 3, False), (128, 64, 8, 3, False), (64, 64, 4, 3, False),
          (128, 128, 8, 3, True), (128, 128, 8, 2, True), (128, 64, 8, 3, True), (64, 64, 4, 3, True)],
    256: [(128, 64, 8, 2, False), (64, 64, 4, 2, False), (64, 32, 4, 3, False),
          (128, 64, 8, 2, True), (64, 64, 4, 2, True)],
}

AUTOTUNE_KEY = ["HEAD_DIM", "LAYOUT_BM", "LAYOUT_BN", "CAUSAL", "N_CTX_KEY"]


def autotune_configs(tma: bool) -> list[triton.Config]:
    """Every candidate for every head_dim (TMA ones only with ``tma``); :func:`prune` keeps those that fit."""
    seen: set[tuple[int, int, int, int, bool]] = set()
    out = []
    for cands in _CANDIDATES.values():
        for cand in cands:
            bm, bn, w, s, use_tma = cand
            if cand in seen or (use_tma and not tma):
                continue
            seen.add(cand)
            out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "USE_TMA": use_tma}, num_warps=w, num_stages=s))
    return out


def _key(c: triton.Config) -> tuple[int, int, int, int, bool]:
    return (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages, bool(c.kwargs.get("USE_TMA", False)))


def prune(configs: list[triton.Config], named_args: dict[str, Any], **kwargs: Any) -> list[triton.Config]:
    """Keep the candidates of this head_dim whose tiles nest in the layout blocks."""
    allargs = {**named_args, **kwargs}
    d, lbm, lbn = int(allargs["HEAD_DIM"]), int(allargs["LAYOUT_BM"]), int(allargs["LAYOUT_BN"])
    cands = set(_CANDIDATES.get(d, []))
    kept = [c for c in configs if _key(c) in cands and lbm % c.kwargs["BLOCK_M"] == 0 and lbn % c.kwargs["BLOCK_N"] == 0]
    return kept or [c for c in configs if lbm % c.kwargs["BLOCK_M"] == 0 and lbn % c.kwargs["BLOCK_N"] == 0][:1]


def safe_bench(kernel_call: Any, quantiles: Any = None, **kwargs: Any) -> Any:
    """Autotuning benchmark that scores a config which fails to compile or launch as infinitely slow."""
    from triton.testing import do_bench

    try:
        return do_bench(kernel_call, quantiles=quantiles, **kwargs)
    except Exception as exc:  # e.g. a TMA config an older Triton cannot lower
        FAILED_CONFIGS.append(f"{type(exc).__name__}: {str(exc)[:200]}")
        n = len(quantiles) if quantiles else 1
        return [float("inf")] * n if quantiles else float("inf")


FAILED_CONFIGS: list[str] = []


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
    for bm, bn, w, s, use_tma in _CANDIDATES[head_dim]:
        if not use_tma and layout_bm % bm == 0 and layout_bn % bn == 0:
            return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": s}
    return {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}  # pragma: no cover
