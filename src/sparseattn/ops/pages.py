"""Quest-style sparse decode: per-page key summaries, page selection, attention over the chosen pages.

Public functions (the dense and paged decode kernels they build on are :mod:`sparseattn.ops.decode`):

* :func:`page_summaries` / :func:`update_page_summaries` — per page of ``page_size`` keys and per KV
  head, the elementwise min and max of the keys (Quest's page metadata), built once and kept up to
  date as tokens are appended.
* :func:`select_pages` — per KV head, Quest's upper bound of each page's best score,
  ``sum_d max(q_d * min_d, q_d * max_d)``, maximised over the group's query rows; the top pages plus the
  first (sink) and last (local) pages. On the device, no host sync; where the decode operator choice
  allows, two Triton kernels: the scoring (:func:`sparseattn.ops.triton.decode._page_score_kernel`) and a
  radix select of the top pages (:func:`sparseattn.ops.triton.decode._page_pick_kernel`, no sort).
* :func:`sparse_decode_attention` — :func:`select_pages` then
  :func:`~sparseattn.ops.decode.paged_decode_attention`.

Semantics are :mod:`sparseattn.ops.decode`'s (natural-log float32 lse, empty rows out 0 / lse ``-inf``,
keys beyond ``seqlens`` never read, no host reads of device values).
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any, NamedTuple

import torch

from sparseattn._cache import BoundedCache
from sparseattn._validation import check_tensor, fail
from sparseattn.ops.decode import (
    _BUILTIN_OPS,
    _KERNEL_OP,
    _check_backend,
    _check_decode,
    _check_page_size,
    _check_seqlens,
    _choose,
    _dt,
    paged_decode_attention,
    quantized_kv_dtypes,
)

__all__ = ["PageSummaries", "page_summaries", "update_page_summaries", "select_pages", "sparse_decode_attention"]


class PageSummaries(NamedTuple):
    """Per-page key statistics for Quest-style page selection.

    Shapes:
        kmin, kmax: ``(B, H_kv, P, D)`` in the cache's dtype, ``P = ceil(N_max / page_size)``:
        elementwise min/max of the keys of each page (only keys below ``seqlens`` when given; a page
        with no such key holds 0). A NaN key makes its page's entries NaN.
    """

    kmin: torch.Tensor
    kmax: torch.Tensor
    page_size: int


def page_summaries(k_cache: torch.Tensor, page_size: int, *, seqlens: torch.Tensor | None = None) -> PageSummaries:
    """Per-page, per-KV-head elementwise min and max of the keys (Quest's page metadata).

    Args:
        k_cache: ``(B, H_kv, N_max, D)``.
        page_size: keys per page (the last page may be partial).
        seqlens: ``(B,)`` valid lengths; keys at or beyond them are left out (a page with no valid
            key holds 0). ``None``: every key counts.

    Returns:
        :class:`PageSummaries` with ``kmin``/``kmax`` ``(B, H_kv, ceil(N_max / page_size), D)`` in the
        cache's dtype. Computed in chunks of pages (bounded temporary memory).
    """
    fn = "page_summaries"
    check_tensor(fn, "k_cache", k_cache, ndim=4, shape_desc="(B, H_kv, N_max, D)")
    _check_page_size(fn, page_size)
    B, Hkv, N, D = k_cache.shape
    seqlens = _check_seqlens(fn, seqlens, B, N, k_cache.device, None)
    P = -(-N // page_size)
    kmin = torch.empty((B, Hkv, P, D), dtype=k_cache.dtype, device=k_cache.device)
    kmax = torch.empty_like(kmin)
    per_chunk = max(1, (1 << 26) // max(1, B * Hkv * page_size * D))  # ~64M elements of temporaries
    for p0 in range(0, P, per_chunk):
        p1 = min(P, p0 + per_chunk)
        pos = torch.arange(p0 * page_size, p1 * page_size, device=k_cache.device)
        _page_minmax(k_cache, pos.view(1, p1 - p0, page_size).expand(B, -1, -1), seqlens, kmin[:, :, p0:p1],
                     kmax[:, :, p0:p1])
    return PageSummaries(kmin, kmax, page_size)


# shape-only index tensors of update_page_summaries, per (B, pages touched, page size, device): built once
_UPDATE_INDEX: BoundedCache[tuple[int, int, int, str], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = \
    BoundedCache(64, name="pages.update_index")


def _update_index(B: int, T: int, ps: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(arange(T) (1, T), arange(ps) (1, 1, ps), arange(B) (B, 1))`` on ``device``, cached by shape."""
    return _UPDATE_INDEX.get_or_build(
        (B, T, ps, str(device)),
        lambda: (torch.arange(T, device=device)[None, :], torch.arange(ps, device=device)[None, None, :],
                 torch.arange(B, device=device)[:, None]))


def _page_minmax(k: torch.Tensor, pos: torch.Tensor, seqlens: torch.Tensor | None,
                 out_min: torch.Tensor, out_max: torch.Tensor, b_index: torch.Tensor | None = None) -> None:
    """Min/max over the keys at ``pos`` ``(B, T, page)``, masked to ``< seqlens`` and ``< N_max``, into ``(B, H_kv, T, D)``.

    A page with no valid key gets 0. ``b_index``: ``arange(B)`` as ``(B, 1)`` (built here if not given). No host
    sync and no host-to-device copy (the fills are scalars).
    """
    B, Hkv, N, D = k.shape
    valid = pos < N
    if seqlens is not None:
        valid = valid & (pos < seqlens.to(torch.int64)[:, None, None])
    b = (torch.arange(B, device=k.device)[:, None] if b_index is None else b_index)[:, :, None]
    g = k[b, :, pos.clamp(max=N - 1)]  # (B, T, page, H_kv, D)
    g = g.permute(0, 3, 1, 2, 4)  # (B, H_kv, T, page, D)
    invalid = ~valid[:, None, :, :, None]
    mn = g.masked_fill(invalid, math.inf).amin(3)
    mx = g.masked_fill(invalid, -math.inf).amax(3)
    none_valid = ~valid.any(-1)[:, None, :, None]  # (B, 1, T, 1)
    out_min.copy_(mn.masked_fill_(none_valid, 0))
    out_max.copy_(mx.masked_fill_(none_valid, 0))


def update_page_summaries(summaries: PageSummaries, k_cache: torch.Tensor, old_seqlens: torch.Tensor,
                          new_seqlens: torch.Tensor, *, max_new: int, check_seqlens: bool | None = None) -> PageSummaries:
    """Update ``summaries`` in place after keys ``old_seqlens[b] .. new_seqlens[b] - 1`` were appended.

    Recomputes every page those keys touch from the cache (exact; the same values as
    :func:`page_summaries` with ``seqlens=new_seqlens``). No host sync: the pages are found on the
    device; ``max_new`` (a host int >= every ``new_seqlens[b] - old_seqlens[b]``, e.g. the tokens of
    this step) bounds how many pages are touched. ``check_seqlens`` as in :func:`decode_attention`
    (default: the lengths are checked only when they are CPU tensors).

    Returns:
        ``summaries`` (the same tensors, updated).
    """
    fn = "update_page_summaries"
    if not isinstance(summaries, PageSummaries):
        raise fail(fn, "summaries", "must be a PageSummaries", "page_summaries(...)", type(summaries).__name__)
    check_tensor(fn, "k_cache", k_cache, ndim=4, shape_desc="(B, H_kv, N_max, D)")
    B, Hkv, N, D = k_cache.shape
    ps = summaries.page_size
    P = -(-N // ps)
    if tuple(summaries.kmin.shape) != (B, Hkv, P, D) or tuple(summaries.kmax.shape) != (B, Hkv, P, D):
        raise fail(fn, "summaries", "does not match k_cache", f"kmin/kmax shape {(B, Hkv, P, D)}",
                   f"{tuple(summaries.kmin.shape)}")
    if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 0:
        raise fail(fn, "max_new", "must be a non-negative integer", "an int >= 0", repr(max_new))
    old = _check_seqlens(fn, old_seqlens, B, N, k_cache.device, check_seqlens)
    new = _check_seqlens(fn, new_seqlens, B, N, k_cache.device, check_seqlens)
    if max_new == 0:
        return summaries
    T = -(-max_new // ps) + 1  # pages a run of max_new keys can touch
    t_idx, p_idx, b = _update_index(B, T, ps, k_cache.device)
    first = old.to(torch.int64) // ps
    pid = (first[:, None] + t_idx).clamp(max=P - 1)  # (B, T)
    pos = pid[:, :, None] * ps + p_idx
    mn = torch.empty((B, Hkv, T, D), dtype=k_cache.dtype, device=k_cache.device)
    mx = torch.empty_like(mn)
    _page_minmax(k_cache, pos, new, mn, mx, b)
    # clamped duplicates of page P-1 carry identical values, so the order of the writes does not matter
    summaries.kmin[b, :, pid] = mn.permute(0, 2, 1, 3)
    summaries.kmax[b, :, pid] = mx.permute(0, 2, 1, 3)
    return summaries


def _check_summaries(fn: str, summaries: Any, B: int, Hkv: int, N: int, D: int, device: torch.device,
                     page_size: Any) -> int:
    if not isinstance(summaries, PageSummaries):
        raise fail(fn, "summaries", "must be a PageSummaries", "page_summaries(k_cache, page_size)",
                   type(summaries).__name__)
    ps = _check_page_size(fn, summaries.page_size)
    if page_size is not None and _check_page_size(fn, page_size) != ps:
        raise fail(fn, "page_size", "differs from the summaries' page size", f"page_size={ps}", f"page_size={page_size}")
    P = -(-N // ps)
    for name, t in (("summaries.kmin", summaries.kmin), ("summaries.kmax", summaries.kmax)):
        check_tensor(fn, name, t, ndim=4, shape_desc="(B, H_kv, P, D)")
        if tuple(t.shape) != (B, Hkv, P, D):
            raise fail(fn, name, "does not match the cache", f"shape {(B, Hkv, P, D)}", f"shape {tuple(t.shape)}")
        if t.device != device:
            raise fail(fn, name, "is on another device than q", str(device), str(t.device))
    return ps


def _resolve_top(fn: str, top_pages: Any, keep_first: Any, keep_last: Any) -> tuple[int | None, float | None]:
    for name, val in (("keep_first", keep_first), ("keep_last", keep_last)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 0:
            raise fail(fn, name, "must be a non-negative integer", "an int >= 0", repr(val))
    if isinstance(top_pages, bool) or not isinstance(top_pages, (int, float)):
        raise fail(fn, "top_pages", "must be a page count or a fraction", "an int >= 1 or a float in (0, 1]",
                   repr(top_pages))
    if isinstance(top_pages, int):
        if top_pages < 1:
            raise fail(fn, "top_pages", "must be at least 1", "an int >= 1 or a float in (0, 1]", repr(top_pages))
        return top_pages, None
    if not 0.0 < top_pages <= 1.0:
        raise fail(fn, "top_pages", "is out of range", "an int >= 1 or a float in (0, 1]", repr(top_pages))
    return None, float(top_pages)


def select_pages(
    q: torch.Tensor,
    summaries: PageSummaries,
    *,
    seqlens: torch.Tensor | None = None,
    top_pages: int | float,
    keep_first: int = 1,
    keep_last: int = 1,
    check_seqlens: bool | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quest page selection per (sequence, KV head), on the device.

    The bound of page ``p`` is ``max_r sum_d max(q[r, d] * kmin[p, d], q[r, d] * kmax[p, d])`` over the
    group's ``G * Lq`` query rows (an upper bound of every attended score in the page, up to ``scale``).
    Of a sequence's ``n = ceil(seqlens[b] / page_size)`` valid pages the first ``keep_first`` and the
    last ``keep_last`` are always kept, then the highest bounds up to ``k`` pages in all:
    ``k = top_pages`` (int) or ``ceil(top_pages * n)`` (fraction), at least ``keep_first + keep_last``,
    at most ``n`` (a fraction is applied exactly: ``ceil(n * num / den)`` with ``top_pages`` as the
    nearest fraction of denominator <= 10**6). A page whose bound is NaN (a NaN key, or NaN in q) ranks
    above every finite bound.

    ``backend``: ``"auto"``/``"triton"`` compute the bounds, masks and counts in one Triton kernel
    (:func:`sparseattn.ops.triton.decode._page_score_kernel`, q's dtype, fp32 accumulation) followed by
    a radix select of the top pages (:func:`sparseattn.ops.triton.decode._page_pick_kernel`; ties go to the
    lower page), where :func:`decode_refusal` allows (``"auto"``: CUDA only); ``"reference"`` (and
    ``"auto"`` elsewhere) does the same in PyTorch ops (fp32, fp64 for fp64 inputs).

    Returns:
        ``(page_indices, page_counts)``: ``(B, H_kv, K)`` int32 page indices whose first
        ``page_counts[b, h]`` entries are the selection (distinct, ascending on both paths; the rest is
        padding: 0 on the Triton path), and
        ``(B, H_kv)`` int32. ``K`` is fixed by the shapes and ``top_pages`` alone (no host sync).
    """
    fn = "select_pages"
    check_tensor(fn, "q", q, ndim=4, shape_desc="(B, H, Lq, D)")
    B, H, Lq, D = q.shape
    if not isinstance(summaries, PageSummaries):
        raise fail(fn, "summaries", "must be a PageSummaries", "page_summaries(k_cache, page_size)",
                   type(summaries).__name__)
    check_tensor(fn, "summaries.kmin", summaries.kmin, ndim=4, shape_desc="(B, H_kv, P, D)")
    Hkv, P = summaries.kmin.shape[1], summaries.kmin.shape[2]
    ps = _check_page_size(fn, summaries.page_size)
    N = P * ps
    if Hkv <= 0 or H % Hkv:
        raise fail(fn, "summaries", "heads must divide q heads (GQA)", f"H % H_kv == 0 with H={H}", f"H_kv={Hkv}")
    _check_summaries(fn, summaries, B, Hkv, N, D, q.device, None)
    k_int, frac = _resolve_top(fn, top_pages, keep_first, keep_last)
    seqlens = _check_seqlens(fn, seqlens, B, N, q.device, check_seqlens)
    if _choose(fn, q, _check_backend(fn, backend, _BUILTIN_OPS)).name == _KERNEL_OP:
        return _select_kernel(q, summaries, seqlens, k_int, frac, keep_first, keep_last)
    return _select(q, summaries, seqlens, k_int, frac, keep_first, keep_last)


def _frac(frac: float) -> tuple[int, int]:
    f = Fraction(frac).limit_denominator(10 ** 6)
    return f.numerator, f.denominator


def _k_sel(P: int, k_int: int | None, frac: float | None, floor: int) -> int:
    """The fixed width ``K`` of the selection (host ints only)."""
    if k_int is not None:
        return min(P, max(k_int, floor))
    num, den = _frac(frac)  # type: ignore[arg-type]
    return min(P, max(-(-P * num // den), floor))


# radix bits per pass of the pick kernel (4: 8 passes of 16 bins, 8: 4 passes of 256 bins); fixed by measurement
PICK_BITS = 4


def _select_kernel(q: torch.Tensor, summaries: PageSummaries, seqlens: torch.Tensor | None, k_int: int | None,
                   frac: float | None, keep_first: int, keep_last: int, *,
                   pick_bits: int | None = None, pick_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton selection: :func:`_score_kernel`, then :func:`_pick_kernel` (``pick_bits`` / ``pick_warps``:
    its radix width and warps, for measurements)."""
    score, count, K = _score_kernel(q, summaries, seqlens, k_int, frac, keep_first, keep_last)
    return _pick_kernel(score, count, K, bits=pick_bits, warps=pick_warps), count


def _score_kernel(q: torch.Tensor, summaries: PageSummaries, seqlens: torch.Tensor | None, k_int: int | None,
                  frac: float | None, keep_first: int, keep_last: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(score (B, H_kv, P) fp32, count (B, H_kv) int32, K)``: the page bounds with forced / invalid pages marked,
    the pages to keep per row, and the selection's fixed width (``_page_score_kernel``)."""
    from sparseattn.ops.triton import decode as kern
    from sparseattn.ops.triton_launch import _LAUNCH_LOCK, interpret_mode

    B, H, Lq, D = q.shape
    Hkv, P = summaries.kmin.shape[1], summaries.kmin.shape[2]
    G = H // Hkv
    ps = summaries.page_size
    floor = keep_first + keep_last
    K = _k_sel(P, k_int, frac, floor)
    num, den = _frac(frac) if frac is not None else (0, 1)
    q = q if q.stride(-1) == 1 else q.contiguous()
    kmin = summaries.kmin.to(q.dtype).contiguous()  # no-ops for summaries of the same cache
    kmax = summaries.kmax.to(q.dtype).contiguous()
    score = torch.empty((B, Hkv, P), dtype=torch.float32, device=q.device)
    count = torch.empty((B, Hkv), dtype=torch.int32, device=q.device)
    rows = G * Lq
    block_r = min(max(16, 1 << (rows - 1).bit_length()), 64)
    block_p = 32 if interpret_mode() else 64
    meta: dict[str, Any] = dict(PAGE=ps, HEAD_DIM=D, BLOCK_R=block_r, BLOCK_P=block_p, HAS_SEQLENS=seqlens is not None,
                                num_warps=4, num_stages=1)
    if interpret_mode() and q.dtype == torch.bfloat16:
        meta["DOT_F32"] = True
    if q.dtype == torch.float32:
        meta["IEEE"] = True
    with _LAUNCH_LOCK:
        kern._page_score_kernel[(-(-P // block_p), B * Hkv)](
            q, kmin, kmax, seqlens if seqlens is not None else count, score, count,
            q.stride(0), q.stride(1), q.stride(2), score.stride(0), score.stride(1), score.stride(2), count.stride(0),
            H, G, Lq, P, P * ps, K, k_int if k_int is not None else 0, num, den, floor, keep_first, keep_last,
            **meta)
    return score, count, K


def _pick_kernel(score: torch.Tensor, count: torch.Tensor, K: int, *, bits: int | None = None,
                 warps: int | None = None) -> torch.Tensor:
    """``(B, H_kv, K)`` int32: the ``count`` highest pages of ``score`` per row, ascending (``_page_pick_kernel``;
    ``bits``: default :data:`PICK_BITS`; ``warps``: default 8 for rows of >= 2048 pages, else 4)."""
    from sparseattn.ops.triton import decode as kern
    from sparseattn.ops.triton_launch import _LAUNCH_LOCK, interpret_mode

    B, Hkv, P = score.shape
    idx = torch.empty((B, Hkv, K), dtype=torch.int32, device=score.device)
    block = min(max(16, 1 << (P - 1).bit_length()), 64 if interpret_mode() else 4096)
    with _LAUNCH_LOCK:
        kern._page_pick_kernel[(B * Hkv,)](
            score, count, idx, score.stride(0), score.stride(1), score.stride(2), count.stride(0),
            idx.stride(0), idx.stride(1), Hkv, P, K, BLOCK=block, ONE_CHUNK=P <= block,
            BITS=PICK_BITS if bits is None else bits,
            num_warps=(8 if block >= 2048 else 4) if warps is None else warps, num_stages=1)
    return idx


def _select(q: torch.Tensor, summaries: PageSummaries, seqlens: torch.Tensor | None, k_int: int | None,
            frac: float | None, keep_first: int, keep_last: int) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, Lq, D = q.shape
    Hkv, P = summaries.kmin.shape[1], summaries.kmin.shape[2]
    ps = summaries.page_size
    G = H // Hkv
    dev = q.device
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        mm = q.dtype
    else:
        mm = torch.float64 if q.dtype == torch.float64 else torch.float32
    qg = q.reshape(B, Hkv, G * Lq, D)
    qp = qg.clamp(min=0).to(mm)
    qn = qg.clamp(max=0).to(mm)
    # max(q*mn, q*mx) = q+ * mx + q- * mn elementwise, so the bound is two matmuls
    ub = (torch.matmul(qp, summaries.kmax.to(mm).transpose(-1, -2))
          + torch.matmul(qn, summaries.kmin.to(mm).transpose(-1, -2)))
    ub = ub.float() if mm != torch.float64 else ub
    ub = ub.amax(2)  # (B, Hkv, P)
    big = torch.finfo(ub.dtype).max
    ids = torch.arange(P, device=dev)
    if seqlens is None:
        n_valid = torch.full((B,), P, dtype=torch.int64, device=dev)
    else:
        n_valid = (seqlens.to(torch.int64) + ps - 1) // ps
    nv = n_valid[:, None, None]
    valid = ids[None, None, :] < nv
    forced = valid & ((ids[None, None, :] < keep_first) | (ids[None, None, :] >= nv - keep_last))
    score = torch.nan_to_num(ub, nan=big, posinf=big, neginf=-big)
    score = torch.where(forced, torch.full_like(score, math.inf), score)
    score = torch.where(valid, score, torch.full_like(score, -math.inf))
    floor = keep_first + keep_last
    K = _k_sel(P, k_int, frac, floor)
    if k_int is not None:
        count = torch.clamp(n_valid, max=K)
    else:
        num, den = _frac(frac)  # type: ignore[arg-type]
        want = ((n_valid * num + den - 1) // den).clamp(min=floor)
        count = torch.minimum(want, n_valid).clamp(max=K)
    _, idx = torch.topk(score, K, dim=-1, sorted=True)
    live = torch.arange(K, device=dev)[None, None, :] < count[:, None, None]
    idx = torch.where(live, idx, torch.full_like(idx, P))
    idx, _ = torch.sort(idx, dim=-1)
    counts = count[:, None].expand(B, Hkv).to(torch.int32).contiguous()
    return idx.clamp(max=P - 1).to(torch.int32).contiguous(), counts


def sparse_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    summaries: PageSummaries,
    *,
    seqlens: torch.Tensor | None = None,
    page_size: int | None = None,
    top_pages: int | float,
    keep_first: int = 1,
    keep_last: int = 1,
    scale: float | None = None,
    num_splits: int | None = None,
    return_lse: bool = False,
    return_pages: bool = False,
    backend: str = "auto",
    check_seqlens: bool | None = None,
    config: dict[str, int] | None = None,
) -> Any:
    """Quest-style sparse decode: :func:`select_pages`, then attention over the selected pages only.

    Args:
        summaries: :func:`page_summaries` of ``k_cache`` (kept current with :func:`update_page_summaries`).
        page_size: optional; must equal ``summaries.page_size``.
        top_pages: pages kept per (sequence, KV head): an int, or a fraction of the sequence's pages.
        keep_first / keep_last: sink and local pages always kept.
        return_pages: also return ``(page_indices, page_counts)``.
        Others: as :func:`decode_attention`.

    Returns:
        ``out`` (or ``AttentionState`` with ``return_lse``); with ``return_pages`` a tuple
        ``(result, (page_indices, page_counts))``. Selecting every page gives dense decode.
    """
    fn = "sparse_decode_attention"
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if getattr(t, "dtype", None) in quantized_kv_dtypes():
            raise fail(fn, name, "holds quantized values (not supported: page summaries need the dequantised keys)",
                       "a float cache (or paged_decode_attention with k_scale/v_scale on pages chosen by select_pages "
                       "over summaries of the dequantised keys)", _dt(t))
    dims, scale = _check_decode(fn, q, k_cache, v_cache, scale)
    B, H, Hkv, Lq, N, D = dims
    ps = _check_summaries(fn, summaries, B, Hkv, N, D, q.device, page_size)
    k_int, frac = _resolve_top(fn, top_pages, keep_first, keep_last)
    if not isinstance(return_pages, bool):
        raise fail(fn, "return_pages", "must be a bool", "True or False", repr(return_pages))
    seqlens = _check_seqlens(fn, seqlens, B, N, q.device, check_seqlens)
    if _choose(fn, q, _check_backend(fn, backend, _BUILTIN_OPS)).name == _KERNEL_OP:
        pidx, pnum = _select_kernel(q, summaries, seqlens, k_int, frac, keep_first, keep_last)
    else:
        pidx, pnum = _select(q, summaries, seqlens, k_int, frac, keep_first, keep_last)
    res = paged_decode_attention(q, k_cache, v_cache, pidx, pnum, page_size=ps, seqlens=seqlens, scale=scale,
                                 num_splits=num_splits, return_lse=return_lse, backend=backend, check_seqlens=False,
                                 config=config)
    return (res, (pidx, pnum)) if return_pages else res
