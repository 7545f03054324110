"""Shared, vectorised building blocks of the predictors (no Python loops over blocks or heads).

Everything here works on whole ``[B, H, Mb, Nb]`` score tensors at once so a predictor costs a few
kernel launches on the GPU: block pooling (one pass over q/k), per-row top-k / CDF selection (one
segmented sort), and a linear-time bool-mask → :class:`BlockLayout` compaction (cumsum + scatter,
no sort).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from sparseattn._cache import BoundedCache
from sparseattn._validation import (
    check_bool,
    check_fraction,
    check_nonneg_int,
    check_positive_int,
    check_pv_threshold,
    check_qk_geometry,
    check_tensor,
    check_version,
    fail,
)
from sparseattn.layout.block_layout import BlockLayout, causal_block_region, cdiv, compact_mask
from sparseattn.layout.masks import diagonal_blocks, local_block_mask

__all__ = [
    "check_qk", "check_block", "block_minmax", "check_opt_fraction", "check_bool", "check_version", "block_pool", "causal_region",
    "diagonal_blocks", "local_mask", "select_topk", "select_cdf", "mask_to_layout", "dense_predicted_layout",
    "nonfinite_block_force", "check_pv_threshold", "check_topk_or_cdf", "config_or_default", "sampled_rows",
]


# --------------------------------------------------------------------------- config validation
# the validators are _validation's (check_bool, check_version, check_pv_threshold re-exported from there);
# these two only fix the predictors' wording
def check_block(cls: str, name: str, value: Any) -> None:
    check_positive_int(cls, name, value, expected="an int > 0 (e.g. 64)")


def check_opt_fraction(cls: str, name: str, value: Any, *, low_open: bool = True) -> None:
    check_fraction(cls, name, value, low_open=low_open, optional=True)


check_nonneg = check_nonneg_int


def check_topk_or_cdf(cls: str, topk: Any, cdf_threshold: Any, *, cdf_first: bool = False) -> None:
    """Both optional fractions in (0, 1], exactly one of them set (``cdf_first``: checked and named first)."""
    items = [("topk", topk), ("cdf_threshold", cdf_threshold)]
    if cdf_first:
        items.reverse()
    for name, value in items:
        check_opt_fraction(cls, name, value)
    if (topk is None) == (cdf_threshold is None):
        raise fail(cls, "topk/cdf_threshold", "exactly one must be set", " or ".join(f"{n}=<frac>" for n, _ in items),
                   ", ".join(f"{n}={v}" for n, v in items))


def config_or_default(owner: str, config: Any, config_type: type) -> Any:
    """A predictor's ``config`` argument: ``config_type()`` for None, else an instance of ``config_type``."""
    config = config if config is not None else config_type()
    if not isinstance(config, config_type):
        name = config_type.__name__
        raise fail(owner, "config", f"must be {'an' if name[0] in 'AEIOU' else 'a'} {name}", name, type(config).__name__)
    return config


def frozen_replace(config: Any, **changes: Any) -> Any:
    return dataclasses.replace(config, **changes)


# --------------------------------------------------------------------------- inputs
def check_qk(fn: str, q: Any, k: Any, causal: Any) -> tuple[int, int, int, int, int, int]:
    """Validate predictor inputs: q ``(B, H, N_q, D)``, k ``(B, H_kv, N_kv, D)``, ``H % H_kv == 0``."""
    check_tensor(fn, "q", q, ndim=4, shape_desc="(B, H, N_q, D)")
    check_tensor(fn, "k", k, ndim=4, shape_desc="(B, H_kv, N_kv, D)")
    if not q.dtype.is_floating_point or not k.dtype.is_floating_point:
        raise fail(fn, "q/k dtype", "must be floating point", "float16, bfloat16, float32 or float64", f"{q.dtype}, {k.dtype}")
    if q.device != k.device:
        raise fail(fn, "q/k devices", "must be equal", "one device", f"q={q.device}, k={k.device}")
    dims = check_qk_geometry(fn, q, k)
    if not isinstance(causal, bool):
        raise fail(fn, "causal", "must be a bool", "True or False", repr(causal))
    return dims


# --------------------------------------------------------------------------- pooling
def _block_segments(x: torch.Tensor, block: int) -> list[torch.Tensor]:
    """``x (B, H, N, D)`` as ``(B, H, nblk, size, D)`` views: the full blocks, then the partial last block (if any)."""
    B, H, N, D = x.shape
    full = N // block
    segs = []
    for start, nblk, size in ((0, full, block), (full * block, 1 if N % block else 0, N % block)):
        if nblk:
            segs.append(x[:, :, start:start + nblk * size].reshape(B, H, nblk, size, D))
    return segs


def _cat_blocks(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def block_pool(x: torch.Tensor, block: int, *, normalized: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Per-block sums of ``x`` (and of its unit-normalised rows), in one pass over ``x``.

    Args:
        x: ``(B, H, N, D)`` in any float dtype (read once; never copied or padded as a whole).
        block: tokens per block; the last block may be partial.
        normalized: also return ``Σ x_i / ||x_i||`` per block.

    Returns:
        ``(sums, unit_sums, counts)``: float32 ``(B, H, nb, D)``, float32 ``(B, H, nb, D)`` or None,
        and float32 ``(nb,)`` token counts per block.

    Shapes:
        ``nb = ceil(N / block)``.
    """
    N = x.shape[2]
    parts_s: list[torch.Tensor] = []
    parts_u: list[torch.Tensor] = []
    for seg in _block_segments(x, block):
        if normalized:
            ndt = torch.float64 if x.dtype == torch.float64 else torch.float32
            inv = torch.linalg.vector_norm(seg, dim=-1, dtype=ndt).clamp_min(1e-12).reciprocal()
            w = torch.stack((torch.ones_like(inv), inv), dim=-2).to(x.dtype)  # [B, H, nblk, 2, size]
            both = torch.matmul(w, seg).to(torch.float32)  # [B, H, nblk, 2, D] (fp32 accumulate)
            parts_s.append(both[..., 0, :])
            parts_u.append(both[..., 1, :])
        else:
            parts_s.append(seg.sum(dim=3, dtype=torch.float32))
    sums = _cat_blocks(parts_s)
    unit = _cat_blocks(parts_u) if normalized else None
    def build() -> torch.Tensor:
        c = torch.full((cdiv(N, block),), float(block), dtype=torch.float32, device=x.device)
        if N % block:
            c[-1] = float(N % block)
        return c

    return sums, unit, cached(("counts", N, block, str(x.device)), build)


def block_minmax(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block, per-coordinate minimum and maximum of ``x`` (one pass each), float32 ``(B, H, nb, D)``."""
    segs = _block_segments(x, block)
    return (_cat_blocks([s.amin(dim=3).to(torch.float32) for s in segs]),
            _cat_blocks([s.amax(dim=3).to(torch.float32) for s in segs]))


# --------------------------------------------------------------------------- geometry
# Geometry-derived tensors (regions, local masks, block counts) depend only on the shapes, so they
# are built once per (function, shapes, device) and reused: on the GPU a predictor call is bound by
# kernel launches, and these would otherwise cost a dozen launches per call. Read-only by contract.
_GEOM_CACHE_MAX = 256
_GEOM_CACHE: BoundedCache[tuple[Any, ...], torch.Tensor] = BoundedCache(_GEOM_CACHE_MAX, name="predictors._GEOM_CACHE")


def cached(key: tuple[Any, ...], build: Any) -> torch.Tensor:
    """Return ``_GEOM_CACHE[key]``, building it with ``build()`` on first use.

    Bounded (LRU, ``_GEOM_CACHE_MAX`` entries) and thread-safe (see :class:`sparseattn._cache.BoundedCache`:
    concurrent callers of one key may both build, all get the stored value). ``key`` must hold everything
    the value depends on, the device as a string (``str(t.device)``, e.g. ``"cuda:0"``). A miss during CUDA
    graph capture builds without storing: the captured build has not run yet, so its tensor would hold
    garbage for eager callers.
    """
    hit = _GEOM_CACHE.get(key)
    if hit is not None:
        return hit
    capturing = torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()
    return _GEOM_CACHE.get_or_build(key, build, store=not capturing)


def causal_region(seqlen_q: int, seqlen_kv: int, block_m: int, block_n: int, causal: bool,
                  device: torch.device) -> torch.Tensor:
    """Bool ``[Mb, Nb]``: blocks a query block may use (the causal block region, or all when not causal). Cached; do not modify."""
    def build() -> torch.Tensor:
        if causal:
            return causal_block_region(seqlen_q, seqlen_kv, block_m, block_n, device)[0]
        return torch.ones(cdiv(seqlen_q, block_m), cdiv(seqlen_kv, block_n), dtype=torch.bool, device=device)

    return cached(("region", seqlen_q, seqlen_kv, block_m, block_n, causal, str(device)), build)


def local_mask(seqlen_q: int, seqlen_kv: int, block_m: int, block_n: int, n_blocks: int, causal: bool,
               device: torch.device) -> torch.Tensor:
    """Bool ``[Mb, Nb]``: the diagonal key block and the ``n_blocks - 1`` before it (and after, if not causal). Cached; do not modify."""
    def build() -> torch.Tensor:
        return local_block_mask(seqlen_q, seqlen_kv, block_m, block_n, n_blocks, causal, device)

    return cached(("local", seqlen_q, seqlen_kv, block_m, block_n, n_blocks, causal, str(device)), build)


def forced_blocks(seqlen_q: int, seqlen_kv: int, block_m: int, block_n: int, keep_sink: bool, keep_local: int,
                  causal: bool, device: torch.device) -> torch.Tensor:
    """Bool ``[Mb, Nb]``: the blocks a predictor always keeps, within :func:`causal_region`: key block 0 when
    ``keep_sink``, and the ``keep_local`` local blocks of :func:`local_mask` (none for 0). Cached; do not modify."""
    def build() -> torch.Tensor:
        region = causal_region(seqlen_q, seqlen_kv, block_m, block_n, causal, device)
        f = torch.zeros_like(region)
        if keep_sink:
            f[:, 0] = True
        if keep_local > 0:
            f |= local_mask(seqlen_q, seqlen_kv, block_m, block_n, keep_local, causal, device)
        return f & region

    return cached(("forced", seqlen_q, seqlen_kv, block_m, block_n, bool(keep_sink), int(keep_local), causal,
                   str(device)), build)


# --------------------------------------------------------------------------- selection
def _count(avail: torch.Tensor, fraction: float) -> torch.Tensor:
    k = torch.ceil(avail.to(torch.float64) * fraction - 1e-9).to(torch.long)
    return torch.where(avail > 0, k.clamp(min=1), torch.zeros_like(k))


def select_topk(scores: torch.Tensor, allowed: torch.Tensor, fraction: float,
                *, base: torch.Tensor | None = None) -> torch.Tensor:
    """Per row keep the ``ceil(fraction · n)`` highest-scoring allowed blocks (at least one).

    Args:
        scores: float ``[..., Nb]``.
        allowed: bool broadcastable to ``scores``: candidate blocks.
        fraction: in (0, 1].
        base: bool broadcastable to ``scores``: number of blocks the fraction is taken of
            (default: ``allowed``).

    Returns:
        bool mask like ``scores`` (a subset of ``allowed``).
    """
    allowed = allowed.expand_as(scores)
    base = allowed if base is None else base.expand_as(scores)
    k = _count(base.sum(-1), fraction).clamp(max=allowed.sum(-1))
    s = scores.masked_fill(~allowed, -math.inf)
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices
    pos = torch.arange(scores.shape[-1], device=scores.device)
    keep_sorted = pos < k.unsqueeze(-1)
    out = torch.zeros(scores.shape, dtype=torch.uint8, device=scores.device)
    out.scatter_(-1, order, keep_sorted.to(torch.uint8))  # uint8: bool scatter is not supported everywhere
    return out.bool() & allowed


def select_cdf(probs: torch.Tensor, allowed: torch.Tensor, threshold: float) -> torch.Tensor:
    """Per row keep the smallest set of allowed blocks whose mass reaches ``threshold`` of the row's mass.

    A block is kept iff the mass of the strictly larger blocks before it (descending order, ties in
    index order) is below ``threshold · total``; so at least one block is kept in every row with mass.
    """
    allowed = allowed.expand_as(probs)
    p = probs.masked_fill(~allowed, 0.0).to(torch.float32)
    srt = torch.sort(p, dim=-1, descending=True, stable=True)
    before = torch.cumsum(srt.values, dim=-1) - srt.values
    total = p.sum(-1, keepdim=True)
    keep_sorted = (before < threshold * total) & (srt.values > 0)
    out = torch.zeros(p.shape, dtype=torch.uint8, device=p.device)
    out.scatter_(-1, srt.indices, keep_sorted.to(torch.uint8))
    return out.bool() & allowed


def nonfinite_block_force(q_pooled: torch.Tensor, k_pooled: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Blocks a predictor must keep because a query or key block holds a NaN/inf value.

    ``q_pooled`` ``(B, H, Mb, D)`` / ``k_pooled`` ``(B, H_kv, Nb, D)`` are per-block sums or means (a
    non-finite element makes its block's sum non-finite). Returns bool ``[B, 1, Mb, Nb]`` (shared by
    the heads: any head's bad block counts): the whole allowed row of a bad query block and the
    allowed column of a bad key block. Keeping them sends the non-finite value through the attention
    kernel, so it reaches exactly the outputs that dense attention would make non-finite, instead of
    being dropped quietly by the selection.
    """
    bad_q = (~torch.isfinite(q_pooled).all(-1)).any(1)  # [B, Mb]: some head's block holds NaN/inf
    bad_k = (~torch.isfinite(k_pooled).all(-1)).any(1)  # [B, Nb]
    return (bad_q[:, None, :, None] | bad_k[:, None, None, :]) & region


# --------------------------------------------------------------------------- mask -> layout
def mask_to_layout(mask: torch.Tensor, *, block_m: int, block_n: int, seqlen_q: int, seqlen_kv: int,
                   batch: int | None = None, heads: int | None = None) -> BlockLayout:
    """Bool block mask ``[B', H', Mb, Nb]`` → :class:`BlockLayout` in linear time, unchecked (the hot-path
    form of :meth:`BlockLayout.from_dense_mask`; same compaction, :func:`~sparseattn.layout.block_layout.compact_mask`).

    ``batch``/``heads`` expand a mask with ``B' = 1`` / ``H' = 1`` as a stride-0 view.
    """
    B_, H_, Mb, Nb = mask.shape
    num, idx = compact_mask(mask)
    B = B_ if batch is None else batch
    H = H_ if heads is None else heads
    if (B, H) != (B_, H_):
        num = num.expand(B, H, Mb)
        idx = idx.expand(B, H, Mb, Nb)
    return BlockLayout(num, idx, block_m, block_n, seqlen_q, seqlen_kv, validate=False)


def dense_predicted_layout(B: int, H: int, seqlen_q: int, seqlen_kv: int, block_m: int, block_n: int, causal: bool,
                           device: torch.device) -> BlockLayout:
    """Every allowed block (the causal region when ``causal``), shared by all heads (stride-0)."""
    region = causal_region(seqlen_q, seqlen_kv, block_m, block_n, causal, device)
    return mask_to_layout(region[None, None], block_m=block_m, block_n=block_n, seqlen_q=seqlen_q,
                          seqlen_kv=seqlen_kv, batch=B, heads=H)


def sampled_rows(seqlen_q: int, block_m: int, rows_per_block: int, device: torch.device) -> torch.Tensor:
    """The query rows :func:`exact_block_mass` averages with ``rows_per_block``: per query block of length ``L``
    (``block_m``, or less for the last), ``min(rows_per_block, L)`` rows evenly spaced with the last one at the
    block's last row, ascending (``int64``; shape-only, cached)."""
    def build() -> torch.Tensor:
        Mb = cdiv(seqlen_q, block_m)
        starts = torch.arange(Mb, device=device) * block_m
        lens = (seqlen_q - starts).clamp(max=block_m)  # [Mb]
        n = lens.clamp(max=rows_per_block)
        j = torch.arange(rows_per_block, device=device)
        # row j of n: start + L - 1 - floor((n - 1 - j) * L / n), for j < n (evenly spaced, last = L - 1)
        off = lens[:, None] - 1 - torch.div((n[:, None] - 1 - j[None, :]).clamp(min=0) * lens[:, None], n[:, None],
                                            rounding_mode="floor")
        keep = j[None, :] < n[:, None]
        return (starts[:, None] + off)[keep]

    return cached(("sampled_rows", seqlen_q, block_m, rows_per_block, str(device)), build)
