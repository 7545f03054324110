"""Launcher of the fused mean-similarity predictor: three Triton launches per ``predict`` call.

The torch path of :class:`~sparseattn.predictors.mean_similarity.MeanSimilarityPredictor` costs
~60–150 small PyTorch ops per layer (pooling, softmax, a segmented sort, cumsums, scatters, the
mask → layout compaction); on a GPU those launches cost more than they compute. This path runs
:mod:`sparseattn.ops.triton.mean_sim_predict`:

1. ``_block_pool_kernel`` on q → block means ``(B, H, Mb, D)`` and self-similarities ``(B, H, Mb)``;
2. ``_block_pool_kernel`` on k → block means, written transposed ``(B, H_kv, D, Nb)``, and
   self-similarities ``(B, H_kv, Nb)``;
3. ``_score_select_kernel`` → ``kv_num_blocks`` / ``kv_indices`` of the
   :class:`~sparseattn.layout.BlockLayout` directly, and ``P`` for ``last_scores``.

No host synchronisation (no tensor value is read on the host), no dense mask, no Python loop over
heads or blocks. Shape-only data (the per-query-block table of allowed-prefix length, diagonal
block and top-k count) is built once per geometry by the bounded geometry cache of
:mod:`sparseattn.predictors._common`. What the fused path computes, and where it may differ from the
torch path (only where float rounding flips a decision sitting exactly on a threshold), is in the
docstring of :mod:`sparseattn.ops.triton.mean_sim_predict`.

Triton is imported lazily (on the first launch), never by ``import sparseattn``. On CPU tensors the
kernels run only under Triton's interpreter (``TRITON_INTERPRET=1`` set before Triton is imported).
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Any

import torch

from sparseattn.layout.block_layout import BlockLayout, cdiv, region_row_limits
from sparseattn.predictors._common import _count, cached, diagonal_blocks

__all__ = ["fused_refusal", "fused_predict", "LAUNCHES_PER_CALL", "MAX_KV_BLOCKS", "SUPPORTED_DTYPES"]

LAUNCHES_PER_CALL = 3
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_KV_BLOCKS = 8192  # the score kernel keeps a row of key blocks in registers (power of two >= Nb)
# rows per program x padded row length held in registers; with ~8 elements per thread per live
# [ROWS, RPAD] tensor, ptxas (sm_90a, triton 3.9) fits the score kernel in <= 128 registers without spills
# up to RPAD = 4096 (RPAD = 8192: ~130 bytes of spills)
_ROW_BUDGET = 4096
_MAX_ROWS = 8
_MAX_GRID_YZ = 65535


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    try:
        importlib.import_module("triton")
        importlib.import_module("triton.language")
    except Exception as exc:  # ImportError, or a broken install
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    return None


@functools.lru_cache(maxsize=None)
def _kernels() -> tuple[Any, Any]:
    """(pooling kernel, score+select kernel); imports Triton on first use."""
    from sparseattn.ops.triton import mean_sim_predict as mod

    return mod._block_pool_kernel, mod._score_select_kernel


def fused_refusal(q: Any, k: Any, config: Any) -> str | None:
    """``None`` if the fused path can run ``predict(q, k)`` with ``config``, else the reason it cannot.

    Judges support only (score, dtype, device, Triton, sizes); malformed inputs are reported by
    the predictor's own validation.
    """
    score = getattr(config, "score", None)
    if score != "mean":
        return f"score={score!r} is not supported by the fused Triton path (only score='mean')"
    if getattr(config, "topk", None) is None and getattr(config, "cdf_threshold", None) is None:
        return "neither topk nor cdf_threshold is set"
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            return f"{name} is not a 4-d torch.Tensor"
        if t.dtype not in SUPPORTED_DTYPES:
            return f"{name}.dtype={str(t.dtype).replace('torch.', '')} is not supported (float16, bfloat16 or float32)"
    if q.device.type == "cpu":
        if not _interpret_mode():
            return "q is on the CPU; the fused Triton path needs CUDA tensors (or TRITON_INTERPRET=1 for the interpreter)"
    elif q.device.type != "cuda":
        return f"q is on {q.device}; the fused Triton path needs CUDA tensors"
    nb = cdiv(int(k.shape[2]), int(config.block_n))
    if nb > MAX_KV_BLOCKS:
        return (f"{nb} key blocks (N_kv={int(k.shape[2])}, block_n={config.block_n}) exceed the fused kernel's row "
                f"limit of {MAX_KV_BLOCKS}")
    B, H, Hkv = int(q.shape[0]), int(q.shape[1]), int(k.shape[1])
    if B * Hkv > _MAX_GRID_YZ or H > _MAX_GRID_YZ or B > _MAX_GRID_YZ:
        return f"batch={B}, heads={H}, kv heads={Hkv} exceed the launch grid limit {_MAX_GRID_YZ}"
    return _triton_import_error()


def _geometry(Nq: int, Nkv: int, bm: int, bn: int, causal: bool, topk: float | None, device: torch.device) -> torch.Tensor:
    """int32 ``[Mb, 3]``: allowed prefix length, diagonal block, top-k count per query block (cached)."""
    def build() -> torch.Tensor:
        lims = torch.tensor(region_row_limits(Nq, Nkv, bm, bn, causal), dtype=torch.int64, device=device)
        diag = diagonal_blocks(Nq, Nkv, bm, bn, device).to(torch.int64)
        if topk is None:
            kk = torch.zeros_like(lims)
        else:  # select_topk's own count: ceil(fraction * n - 1e-9) in float64, at least 1, at most n
            kk = torch.minimum(_count(lims, float(topk)), lims)
        return torch.stack((lims, diag, kk), dim=1).to(torch.int32).contiguous()

    return cached(("msim_fused_geo", Nq, Nkv, bm, bn, causal, topk, str(device)), build)


def _pool_meta(block: int, D: int) -> dict[str, int]:
    d_pad = max(16, _next_pow2(D))
    return {"BLOCK": block, "D_PAD": d_pad, "ROW_CHUNK": min(_next_pow2(block), max(1, 4096 // d_pad)), "num_warps": 4}


def _select_meta(G: int, Nb: int) -> dict[str, int]:
    rpad = max(16, _next_pow2(Nb))
    rows = max(1, min(_next_pow2(G), _MAX_ROWS, _ROW_BUDGET // rpad))
    size = rows * rpad
    warps = min(16, max(1, size // 256))
    return {"ROWS": rows, "RPAD": rpad, "num_warps": warps}


def fused_predict(q: torch.Tensor, k: torch.Tensor, config: Any, *, causal: bool) -> tuple[BlockLayout, torch.Tensor]:
    """Run the fused predictor (three kernel launches; inputs already validated, :func:`fused_refusal` is None).

    Args:
        q: ``(B, H, N_q, D)`` float16/bfloat16/float32, any strides.
        k: ``(B, H_kv, N_kv, D)``, ``H % H_kv == 0``, any strides.
        config: a :class:`~sparseattn.predictors.mean_similarity.MeanSimilarityConfig` with ``score="mean"``.
        causal: bottom-right aligned causal block region (else every block is allowed).

    Returns:
        ``(layout, p)``: the layout (contiguous int32 tensors, selected blocks ascending then the rest
        ascending) and ``P`` float32 ``[B, H, Mb, Nb]`` (0 outside the allowed region; NaN over a row
        whose scores are non-finite; all 0 in a row with no allowed block).

    Shapes:
        ``Mb = ceil(N_q / block_m)``, ``Nb = ceil(N_kv / block_n)``.
    """
    B, H, Nq, D = (int(s) for s in q.shape)
    Hkv, Nkv = int(k.shape[1]), int(k.shape[2])
    G = H // Hkv
    bm, bn = int(config.block_m), int(config.block_n)
    Mb, Nb = cdiv(Nq, bm), cdiv(Nkv, bn)
    dev = q.device
    geo = _geometry(Nq, Nkv, bm, bn, causal, config.topk, dev)

    f32 = torch.float32
    q_mean = torch.empty((B, H, Mb, D), dtype=f32, device=dev)
    q_sim = torch.empty((B, H, Mb), dtype=f32, device=dev)
    k_mean_t = torch.empty((B, Hkv, D, Nb), dtype=f32, device=dev)  # transposed: coalesced rows per coordinate
    k_sim = torch.empty((B, Hkv, Nb), dtype=f32, device=dev)
    p = torch.empty((B, H, Mb, Nb), dtype=f32, device=dev)
    num = torch.empty((B, H, Mb), dtype=torch.int32, device=dev)
    idx = torch.empty((B, H, Mb, Nb), dtype=torch.int32, device=dev)

    pool, select = _kernels()
    topk = config.topk is not None
    thr = 0.0 if topk else float(config.cdf_threshold)
    sel_meta = _select_meta(G, Nb)
    qs, ks = q.stride(), k.stride()

    from sparseattn.ops.triton_launch import _LAUNCH_LOCK  # Triton's launch path is not thread-safe

    guard = torch.cuda.device(dev) if dev.type == "cuda" else _NullContext()
    with _LAUNCH_LOCK, guard:
        pool[(Mb, H, B)](q, q_mean, q_sim, qs[0], qs[1], qs[2], qs[3],
                         H * Mb * D, Mb * D, D, 1, H * Mb, Mb, Nq, D, **_pool_meta(bm, D))
        pool[(Nb, Hkv, B)](k, k_mean_t, k_sim, ks[0], ks[1], ks[2], ks[3],
                           Hkv * D * Nb, D * Nb, 1, Nb, Hkv * Nb, Nb, Nkv, D, **_pool_meta(bn, D))
        select[(Mb, B * Hkv, cdiv(G, sel_meta["ROWS"]))](
            q_mean, k_mean_t, q_sim, k_sim, geo, p, num, idx,
            H, G, Mb, Nb, D,
            float(D ** -0.5), thr, float(config.sim_threshold), int(config.keep_local),
            TOPK=topk, KEEP_SINK=bool(config.keep_sink), CAUSAL=bool(causal), **sel_meta)
    layout = BlockLayout(num, idx, bm, bn, Nq, Nkv, validate=False)
    return layout, p


class _NullContext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None
