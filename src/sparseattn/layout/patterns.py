"""Static block patterns. Each returns a :class:`BlockLayout` for the given lengths, blocks and heads.

Block coordinates: query block ``i`` covers rows ``[i*block_m, (i+1)*block_m)``; its *diagonal* key
block is the block holding the last key its last row may see under bottom-right causal alignment,
``(row_last + seqlen_kv - seqlen_q) // block_n`` (``i`` itself when lengths and blocks are equal).
With ``causal=True`` every pattern is intersected with the causal block region.

Patterns shared by all heads are stored once and expanded (stride 0) over batch and heads.
"""

from __future__ import annotations

import inspect
from typing import Any, NamedTuple

import torch

from sparseattn._validation import check_fraction, check_nonneg_int, check_positive_int, fail
from sparseattn.layout.block_layout import BlockLayout, causal_block_region, cdiv
from sparseattn.layout.masks import diagonal_blocks, local_block_mask

__all__ = [
    "dense_layout",
    "causal_layout",
    "sliding_window_layout",
    "sliding_window_band_layout",
    "RowBounds",
    "check_row_bounds",
    "row_bounds_layout",
    "document_row_bounds",
    "document_layout",
    "prefix_lm_row_bounds",
    "prefix_lm_layout",
    "check_cu_seqlens",
    "check_prefix_len",
    "strided_layout",
    "random_layout",
    "block_diagonal_layout",
    "sink_window_layout",
    "make_pattern",
    "pattern_at_density",
    "PATTERNS",
]


def _geometry(fn: str, seqlen_q: int, seqlen_kv: int, block_m: int, block_n: int, batch: int, heads: int) -> tuple[int, int]:
    for name, val in (("seqlen_q", seqlen_q), ("seqlen_kv", seqlen_kv), ("block_m", block_m), ("block_n", block_n),
                      ("batch", batch), ("heads", heads)):
        check_positive_int(fn, name, val)
    return cdiv(seqlen_q, block_m), cdiv(seqlen_kv, block_n)


def _shared(mask2d: torch.Tensor, seqlen_q: int, seqlen_kv: int, block_m: int, block_n: int, batch: int, heads: int,
            causal: bool, device: torch.device | str | None) -> BlockLayout:
    if causal:
        region, _ = causal_block_region(seqlen_q, seqlen_kv, block_m, block_n)
        mask2d = mask2d & region
    one = BlockLayout.from_dense_mask(mask2d[None, None], block_m=block_m, block_n=block_n, seqlen_q=seqlen_q, seqlen_kv=seqlen_kv)
    Mb, Nb = mask2d.shape
    num = one.kv_num_blocks.to(device).expand(batch, heads, Mb)
    idx = one.kv_indices.to(device).expand(batch, heads, Mb, Nb)
    return BlockLayout(num, idx, block_m, block_n, seqlen_q, seqlen_kv, validate=False)


def dense_layout(seqlen_q: int, seqlen_kv: int | None = None, *, block_m: int = 64, block_n: int = 64, batch: int = 1,
                 heads: int = 1, causal: bool = False, device: torch.device | str | None = None) -> BlockLayout:
    """Every block (with ``causal=True``: every block of the causal region)."""
    seqlen_kv = seqlen_q if seqlen_kv is None else seqlen_kv
    Mb, Nb = _geometry("dense_layout", seqlen_q, seqlen_kv, block_m, block_n, batch, heads)
    return _shared(torch.ones(Mb, Nb, dtype=torch.bool), seqlen_q, seqlen_kv, block_m, block_n, batch, heads, causal, device)


def causal_layout(seqlen_q: int, seqlen_kv: int | None = None, *, block_m: int = 64, block_n: int = 64, batch: int = 1,
                  heads: int = 1, device: torch.device | str | None = None) -> BlockLayout:
    """All blocks of the (bottom-right aligned) causal region: dense causal attention as a layout."""
    return dense_layout(seqlen_q, seqlen_kv, block_m=block_m, block_n=block_n, batch=batch, heads=heads, causal=True,
                        device=device)


def sliding_window_layout(seqlen_q: int, seqlen_kv: int | None = None, *, window_blocks: int = 4, block_m: int = 64,
                          block_n: int = 64, batch: int = 1, heads: int = 1, causal: bool = True,
                          device: torch.device | str | None = None) -> BlockLayout:
    """Local band: the diagonal key block and ``window_blocks - 1`` blocks before it (and after it if not causal)."""
    fn = "sliding_window_layout"
    seqlen_kv = seqlen_q if seqlen_kv is None else seqlen_kv
    Mb, Nb = _geometry(fn, seqlen_q, seqlen_kv, block_m, block_n, batch, heads)
    check_positive_int(fn, "window_blocks", window_blocks)
    mask = local_block_mask(seqlen_q, seqlen_kv, block_m, block_n, window_blocks, causal)
    return _shared(mask, seqlen_q, seqlen_kv, block_m, block_n, batch, heads, causal, device)


def sliding_window_band_layout(seqlen_q: int, seqlen_kv: int | None = None, *, window: int, block_m: int = 64,
                               block_n: int = 64, batch: int = 1, heads: int = 1,
                               device: torch.device | str | None = None) -> BlockLayout:
    """The key blocks an exact causal sliding window of ``window`` keys (tokens) needs, and no more.

    Query row ``i`` attends keys ``j`` with ``i + OFF - window < j <= i + OFF`` (``OFF = seqlen_kv -
    seqlen_q``, bottom-right alignment; transformers' / Mistral's ``sliding_window``). Query block
    ``qb`` selects exactly the key blocks holding at least one key of some row's window: the union of
    its rows' windows is the contiguous key range ``(first_row + OFF - window, last_row + OFF]``. Pair
    it with ``attention(..., causal=True, sliding_window=window)`` for exact results (the element mask
    is applied by the attention call; this layout only bounds the work). Unlike
    :func:`sliding_window_layout` (whose width is counted in blocks) it is causal by construction.
    Shared by all batches and heads (stride 0).

    Shapes:
        ``kv_num_blocks [batch, heads, ceil(seqlen_q / block_m)]``, ``kv_indices [..., ceil(seqlen_kv / block_n)]``.
    """
    fn = "sliding_window_band_layout"
    seqlen_kv = seqlen_q if seqlen_kv is None else seqlen_kv
    Mb, Nb = _geometry(fn, seqlen_q, seqlen_kv, block_m, block_n, batch, heads)
    check_positive_int(fn, "window", window)
    off = seqlen_kv - seqlen_q
    i = torch.arange(Mb)
    row_first = i * block_m
    row_last = torch.clamp((i + 1) * block_m, max=seqlen_q) - 1
    j = torch.arange(Nb)
    col_first = j * block_n
    col_last = torch.clamp((j + 1) * block_n, max=seqlen_kv) - 1
    mask = (col_first[None, :] <= row_last[:, None] + off) & (col_last[None, :] > row_first[:, None] + off - window)
    return _shared(mask, seqlen_q, seqlen_kv, block_m, block_n, batch, heads, False, device)


# ---------------------------------------------------------------------------------------------- exact structured masks
class RowBounds(NamedTuple):
    """Per-query-row key interval: row ``r`` of batch ``b`` may attend key ``j`` iff ``lo[b, r] <= j <= hi[b, r]``.

    ``lo``/``hi``: int32 ``[B|1, N_q]`` (one row of bounds for every batch when the first dim is 1), key
    indices of the call (``0 .. N_kv - 1``); values outside that range are allowed and simply clip.
    ANDed with ``causal``, the layout and any other mask. Packed documents: ``lo`` = the row's document
    start, ``hi`` = its document end (:func:`document_row_bounds`); prefix-LM: ``lo = 0``,
    ``hi = max(position, prefix_len - 1)`` with ``causal=False`` (:func:`prefix_lm_row_bounds`).
    """

    lo: torch.Tensor
    hi: torch.Tensor


def check_row_bounds(func: str, row_bounds: Any, B: int, Nq: int, device: torch.device) -> RowBounds | None:
    """Check ``row_bounds`` (``None`` passes): a pair of integer tensors ``[B|1, N_q]`` (or ``[N_q]``) on ``device``.

    Returns contiguous int32 tensors ``[B|1, N_q]`` (int64 input is clamped into int32 range first,
    which keeps its meaning). Values are not read (no host sync).
    """
    if row_bounds is None:
        return None
    if not (isinstance(row_bounds, tuple) and len(row_bounds) == 2):
        raise fail(func, "row_bounds", "must be a RowBounds (lo, hi) pair of tensors", "RowBounds(lo, hi)",
                   type(row_bounds).__name__)
    out = []
    for name, t in (("lo", row_bounds[0]), ("hi", row_bounds[1])):
        if not isinstance(t, torch.Tensor):
            raise fail(func, f"row_bounds.{name}", "must be a torch.Tensor", "an int32 tensor [B|1, N_q]",
                       type(t).__name__)
        if t.dtype not in (torch.int32, torch.int64):
            raise fail(func, f"row_bounds.{name}", "must hold integer key indices", "int32 or int64",
                       str(t.dtype).replace("torch.", ""))
        if t.dim() == 1:
            t = t[None]
        if t.dim() != 2 or t.shape[0] not in (1, B) or t.shape[1] != Nq:
            raise fail(func, f"row_bounds.{name}", "has the wrong shape", f"[B|1, N_q] = [{B}|1, {Nq}] or [{Nq}]",
                       tuple(t.shape))
        if t.device != device:
            raise fail(func, f"row_bounds.{name}", "is on another device than q", str(device), str(t.device))
        if t.dtype == torch.int64:
            t = t.clamp(-(2 ** 31), 2 ** 31 - 1).to(torch.int32)
        out.append(t.contiguous())  # one batch stride for lo and hi (a no-op when already contiguous)
    if out[0].shape[0] != out[1].shape[0]:
        raise fail(func, "row_bounds", "lo and hi have different batch dims", "equal (1 or B)",
                   f"lo {tuple(out[0].shape)}, hi {tuple(out[1].shape)}")
    return RowBounds(out[0], out[1])


def row_bounds_layout(row_bounds: RowBounds, seqlen_q: int, seqlen_kv: int | None = None, *, block_m: int = 128,
                      block_n: int = 128, batch: int | None = None, heads: int = 1, causal: bool = False) -> BlockLayout:
    """The exact block layout of ``row_bounds``: block ``(qb, kb)`` is selected iff it holds an allowed pair.

    A pair ``(r, j)`` is allowed iff ``lo[r] <= j <= hi[r]``, ``0 <= j < seqlen_kv`` and, with ``causal``,
    ``j <= r + seqlen_kv - seqlen_q``. Built on the bounds' device with no host sync and no Python loop
    over blocks: each row's allowed keys form one interval, i.e. one run of key blocks; the runs of a
    query block's rows are added into a difference array (``scatter_add``) whose running sum over key
    blocks counts the rows touching each block. Shared by the heads (stride 0); batch ``batch`` (default:
    the bounds' batch dim; bounds of batch 1 are expanded, stride 0).
    """
    fn = "row_bounds_layout"
    seqlen_kv = seqlen_q if seqlen_kv is None else seqlen_kv
    lo_t = row_bounds[0] if isinstance(row_bounds, tuple) and len(row_bounds) == 2 else None
    if not isinstance(lo_t, torch.Tensor):
        raise fail(fn, "row_bounds", "must be a RowBounds (lo, hi) pair of tensors", "RowBounds(lo, hi)",
                   type(row_bounds).__name__)
    Bb = lo_t.shape[0] if lo_t.dim() == 2 else 1
    batch = Bb if batch is None else batch
    Mb, Nb = _geometry(fn, seqlen_q, seqlen_kv, block_m, block_n, batch, heads)
    bounds = check_row_bounds(fn, row_bounds, batch, seqlen_q, lo_t.device)
    lo, hi = bounds  # type: ignore[misc]
    dev = lo.device
    r = torch.arange(seqlen_q, device=dev)
    s = lo.to(torch.int64).clamp(min=0)
    e = hi.to(torch.int64).clamp(max=seqlen_kv - 1)
    if causal:
        e = torch.minimum(e, r + (seqlen_kv - seqlen_q))
    ok = s <= e  # [Bb, Nq]: the row attends some key
    first = torch.where(ok, s // block_n, 0)
    stop = torch.where(ok, e // block_n + 1, 0)
    base = (r // block_m) * (Nb + 1)
    one = ok.to(torch.int32)
    cnt = torch.zeros((lo.shape[0], Mb * (Nb + 1)), dtype=torch.int32, device=dev)
    cnt.scatter_add_(1, base + first, one)
    cnt.scatter_add_(1, base + stop, -one)
    sel = cnt.view(-1, Mb, Nb + 1).cumsum(-1)[..., :Nb] > 0  # [Bb, Mb, Nb]
    one_lay = BlockLayout.from_dense_mask(sel[:, None], block_m=block_m, block_n=block_n, seqlen_q=seqlen_q,
                                          seqlen_kv=seqlen_kv)
    num = one_lay.kv_num_blocks.expand(batch, heads, Mb)
    idx = one_lay.kv_indices.expand(batch, heads, Mb, Nb)
    return BlockLayout(num, idx, block_m, block_n, seqlen_q, seqlen_kv, validate=False)


def check_document_ids(func: str, document_ids: Any) -> None:
    """Raise the house-format error unless ``document_ids`` is an integer tensor (shape is the caller's check)."""
    if not isinstance(document_ids, torch.Tensor):
        raise fail(func, "document_ids", "must be a torch.Tensor", "an integer tensor [N_kv] or [B, N_kv]",
                   type(document_ids).__name__)
    if document_ids.dtype.is_floating_point or document_ids.dtype == torch.bool or document_ids.is_complex():
        raise fail(func, "document_ids", "must hold integers", "an integer dtype",
                   str(document_ids.dtype).replace("torch.", ""))


def check_cu_seqlens(func: str, cu_seqlens: Any, seqlen_kv: int) -> tuple[tuple[int, ...], ...]:
    """Host-side ``cu_seqlens`` → one tuple of document boundaries per batch row (a single tuple: shared).

    Accepted: a sequence of ints ``[0, n_1, n_1 + n_2, ..., seqlen_kv]`` (shared by the batch), a
    sequence of such sequences (one per batch row, document counts may differ), or a CPU integer tensor
    1-D / 2-D. Must start at 0, strictly increase (no empty document) and end at ``seqlen_kv``. A CUDA
    tensor is refused (reading it would sync the device): pass ``document_ids`` for device-resident ids.
    """
    if isinstance(cu_seqlens, torch.Tensor):
        if cu_seqlens.device.type != "cpu":
            raise fail(func, "cu_seqlens", "must be host data (its values are checked and key a cache)",
                       "a list of ints or a CPU tensor (use document_ids for ids on the GPU)", str(cu_seqlens.device))
        if cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype == torch.bool or cu_seqlens.is_complex():
            raise fail(func, "cu_seqlens", "must hold integers", "an integer dtype",
                       str(cu_seqlens.dtype).replace("torch.", ""))
        if cu_seqlens.dim() not in (1, 2):
            raise fail(func, "cu_seqlens", "has the wrong rank", "1-D [n_docs + 1] or 2-D [B, n_docs + 1]",
                       tuple(cu_seqlens.shape))
        cu_seqlens = cu_seqlens.tolist()  # a CPU tensor: no device sync
    if not isinstance(cu_seqlens, (list, tuple)) or len(cu_seqlens) == 0:
        raise fail(func, "cu_seqlens", "must be a non-empty sequence of ints (or of int sequences, one per batch row)",
                   f"[0, ..., {seqlen_kv}]", repr(cu_seqlens)[:80])
    rows = cu_seqlens if isinstance(cu_seqlens[0], (list, tuple)) else [cu_seqlens]
    out = []
    for b, row in enumerate(rows):
        name = "cu_seqlens" if len(rows) == 1 and rows[0] is cu_seqlens else f"cu_seqlens[{b}]"
        if not isinstance(row, (list, tuple)) or len(row) < 2 or any(
                isinstance(x, bool) or not isinstance(x, int) for x in row):
            raise fail(func, name, "must be a sequence of at least two ints", f"[0, ..., {seqlen_kv}]", repr(row)[:80])
        if row[0] != 0:
            raise fail(func, name, "must start at 0", "cu_seqlens[0] == 0", row[0])
        if row[-1] != seqlen_kv:
            raise fail(func, name, "must end at the key length", f"cu_seqlens[-1] == N_kv == {seqlen_kv}", row[-1])
        bad = [i for i in range(1, len(row)) if row[i] <= row[i - 1]]
        if bad:
            i = bad[0]
            raise fail(func, name, "must be strictly increasing (documents of at least one token)",
                       "cu_seqlens[i] > cu_seqlens[i - 1]", f"cu_seqlens[{i - 1}:{i + 1}] = {list(row[i - 1:i + 1])}")
        out.append(tuple(int(x) for x in row))
    return tuple(out)


def check_prefix_len(func: str, prefix_len: Any, seqlen_kv: int) -> tuple[int, ...]:
    """``prefix_len``: an int (shared) or a sequence / CPU tensor of ints (one per batch row), each in ``[0, seqlen_kv]``."""
    if isinstance(prefix_len, torch.Tensor):
        if prefix_len.device.type != "cpu" or prefix_len.dim() > 1 or prefix_len.dtype.is_floating_point \
                or prefix_len.dtype == torch.bool:
            raise fail(func, "prefix_len", "must be host ints", "an int, a sequence of ints or a 1-D CPU int tensor",
                       f"{str(prefix_len.dtype).replace('torch.', '')} tensor {tuple(prefix_len.shape)} on {prefix_len.device}")
        prefix_len = prefix_len.tolist()  # a CPU tensor: no device sync
    vals = list(prefix_len) if isinstance(prefix_len, (list, tuple)) else [prefix_len]
    if not vals:
        raise fail(func, "prefix_len", "must not be empty", "an int or one int per batch row", repr(prefix_len))
    for x in vals:
        if isinstance(x, bool) or not isinstance(x, int):
            raise fail(func, "prefix_len", "must be an int or a sequence of ints", f"ints in [0, {seqlen_kv}]",
                       repr(prefix_len)[:80])
        if not 0 <= x <= seqlen_kv:
            raise fail(func, "prefix_len", "is out of range", f"an int in [0, N_kv] = [0, {seqlen_kv}]", x)
    return tuple(vals)


def _query_positions(fn: str, seqlen_q: int, seqlen_kv: int, device: torch.device | str | None) -> torch.Tensor:
    if seqlen_q > seqlen_kv:
        raise fail(fn, "seqlen_q", "must not exceed seqlen_kv (the queries are the last N_q key positions)",
                   f"N_q <= N_kv = {seqlen_kv}", seqlen_q)
    return torch.arange(seqlen_q, device=device) + (seqlen_kv - seqlen_q)


def _window_lo(lo: torch.Tensor, pos: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    if sliding_window is None:
        return lo
    return torch.maximum(lo, pos - sliding_window + 1)


def document_row_bounds(cu_seqlens: Any = None, *, document_ids: torch.Tensor | None = None,
                        seqlen_q: int | None = None, seqlen_kv: int | None = None, sliding_window: int | None = None,
                        device: torch.device | str | None = None) -> RowBounds:
    """Row bounds of packed documents: each query attends only keys of its own document.

    Give exactly one of:

    * ``cu_seqlens`` (host ints, see :func:`check_cu_seqlens`): document ``d`` holds keys
      ``cu_seqlens[d] .. cu_seqlens[d + 1] - 1``;
    * ``document_ids``: an integer tensor ``[N_kv]`` or ``[B, N_kv]`` (any device; values not read on
      the host). A document is a maximal run of equal consecutive ids (packed sequences are
      contiguous; transformers derives them from ``position_ids`` resets).

    The queries are the last ``seqlen_q`` key positions (default all: ``seqlen_q = seqlen_kv``);
    query ``r`` sits at position ``p = r + seqlen_kv - seqlen_q``, and ``lo[r]`` / ``hi[r]`` are the first
    / last key of ``p``'s document. Pass ``causal=True`` to the attention call for causal documents
    (the causal rule is applied there). ``sliding_window=W`` also cuts ``lo`` to ``p - W + 1`` (an
    exact causal window inside each document). Built with device ops only (``cummax`` / ``cummin``
    over run starts and ends).

    Returns:
        :class:`RowBounds` ``(lo, hi)`` int32 ``[B|1, seqlen_q]``.
    """
    fn = "document_row_bounds"
    if (cu_seqlens is None) == (document_ids is None):
        raise fail(fn, "cu_seqlens/document_ids", "must be given exactly one of", "one of the two",
                   f"cu_seqlens={'set' if cu_seqlens is not None else None}, "
                   f"document_ids={'set' if document_ids is not None else None}")
    if sliding_window is not None:
        check_positive_int(fn, "sliding_window", sliding_window)
    if cu_seqlens is not None:
        if seqlen_kv is None:
            seqlen_kv = _cu_last(fn, cu_seqlens)
        check_positive_int(fn, "seqlen_kv", seqlen_kv)
        seqlen_q = seqlen_kv if seqlen_q is None else seqlen_q
        check_positive_int(fn, "seqlen_q", seqlen_q)
        rows = check_cu_seqlens(fn, cu_seqlens, seqlen_kv)
        pos = _query_positions(fn, seqlen_q, seqlen_kv, device)
        los, his = [], []
        for row in rows:  # one tiny host->device copy per batch row (cached by attention())
            cu = torch.tensor(row, dtype=torch.int64, device=device)
            doc = torch.bucketize(pos, cu[1:], right=True)
            los.append(cu[doc])
            his.append(cu[doc + 1] - 1)
        lo, hi = torch.stack(los), torch.stack(his)
    else:
        ids = document_ids
        check_document_ids(fn, ids)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise fail(fn, "document_ids", "has the wrong shape", "[N_kv] or [B, N_kv]", tuple(document_ids.shape))
        if seqlen_kv is None:
            seqlen_kv = ids.shape[1]
        if ids.shape[1] != seqlen_kv:
            raise fail(fn, "document_ids", "must hold one id per key", f"[B|1, N_kv = {seqlen_kv}]", tuple(ids.shape))
        seqlen_q = seqlen_kv if seqlen_q is None else seqlen_q
        check_positive_int(fn, "seqlen_q", seqlen_q)
        if device is not None and torch.device(device) != ids.device:
            ids = ids.to(device)
        dev = ids.device
        pos = _query_positions(fn, seqlen_q, seqlen_kv, dev)
        n = ids.shape[1]
        j = torch.arange(n, device=dev).expand(ids.shape[0], n)
        change = ids[:, 1:] != ids[:, :-1]
        is_start = torch.cat([torch.ones_like(ids[:, :1], dtype=torch.bool), change], 1)
        is_end = torch.cat([change, torch.ones_like(ids[:, :1], dtype=torch.bool)], 1)
        start = torch.where(is_start, j, 0).cummax(1).values
        end = torch.where(is_end, j, n - 1).flip(1).cummin(1).values.flip(1)
        lo, hi = start[:, pos], end[:, pos]
    lo = _window_lo(lo, pos, sliding_window)
    return RowBounds(lo.to(torch.int32).contiguous(), hi.to(torch.int32).contiguous())


def document_layout(cu_seqlens: Any = None, *, document_ids: torch.Tensor | None = None, seqlen_q: int | None = None,
                    seqlen_kv: int | None = None, block_m: int = 128, block_n: int = 128, batch: int | None = None,
                    heads: int = 1, causal: bool = True, sliding_window: int | None = None,
                    device: torch.device | str | None = None) -> tuple[BlockLayout, RowBounds]:
    """The exact block layout of packed documents (plus its row bounds, for the attention call).

    Block ``(qb, kb)`` is selected iff some query of ``qb`` may attend some key of ``kb`` in its own
    document (causally with ``causal=True``; inside its window with ``sliding_window``). Arguments as
    in :func:`document_row_bounds`; ``batch`` defaults to the number of document splits (1 if shared).
    Use both results: ``attention(q, k, v, causal=causal, layout=layout)`` alone would attend whole
    blocks; ``sparseattn.attention(..., cu_seqlens=...)`` / ``document_ids=...`` does it for you.

    Returns:
        ``(layout, RowBounds(lo, hi))``; the layout is shared by the heads (stride 0).
    """
    if sliding_window is not None and not causal:
        raise fail("document_layout", "sliding_window", "needs causal=True (the window counts back from each "
                   "query's diagonal key)", "causal=True", f"causal={causal!r}")
    bounds = document_row_bounds(cu_seqlens, document_ids=document_ids, seqlen_q=seqlen_q, seqlen_kv=seqlen_kv,
                                 sliding_window=sliding_window, device=device)
    Nkv = seqlen_kv
    if Nkv is None:
        Nkv = document_ids.shape[-1] if document_ids is not None else _cu_last("document_layout", cu_seqlens)
    Nq = bounds.lo.shape[1]
    lay = row_bounds_layout(bounds, Nq, Nkv, block_m=block_m, block_n=block_n, batch=batch, heads=heads, causal=causal)
    return lay, bounds


def _cu_last(fn: str, cu_seqlens: Any) -> int:
    """The key length a host ``cu_seqlens`` ends at (its first row's last entry; checked afterwards)."""
    try:
        if isinstance(cu_seqlens, torch.Tensor):
            if cu_seqlens.device.type != "cpu":
                raise TypeError
            return int(cu_seqlens.reshape(-1, cu_seqlens.shape[-1])[0, -1])
        first = cu_seqlens[0]
        last = first[-1] if isinstance(first, (list, tuple)) else cu_seqlens[-1]
        if isinstance(last, bool) or not isinstance(last, int):
            raise TypeError
        return last
    except (TypeError, IndexError, RuntimeError, KeyError):
        raise fail(fn, "cu_seqlens", "must be host ints ending at the key length",
                   "a list of ints [0, ..., N_kv] (or one per batch row) or a CPU int tensor",
                   repr(cu_seqlens)[:80]) from None


def prefix_lm_row_bounds(prefix_len: Any, seqlen_q: int, seqlen_kv: int | None = None, *,
                         device: torch.device | str | None = None) -> RowBounds:
    """Row bounds of prefix-LM attention: bidirectional over the first ``prefix_len`` keys, causal after.

    Query ``r`` (position ``p = r + seqlen_kv - seqlen_q``) attends keys ``j <= max(p, prefix_len - 1)``:
    ``lo = 0``, ``hi = max(p, prefix_len - 1)``. Run with ``causal=False`` (the bounds hold the causal
    part; the prefix is not causal). ``prefix_len``: an int or one per batch row
    (:func:`check_prefix_len`); 0 (or 1) is plain causal attention.

    Returns:
        :class:`RowBounds` ``(lo, hi)`` int32 ``[B|1, seqlen_q]``.
    """
    fn = "prefix_lm_row_bounds"
    seqlen_kv = seqlen_q if seqlen_kv is None else seqlen_kv
    check_positive_int(fn, "seqlen_q", seqlen_q)
    check_positive_int(fn, "seqlen_kv", seqlen_kv)
    vals = check_prefix_len(fn, prefix_len, seqlen_kv)
    pos = _query_positions(fn, seqlen_q, seqlen_kv, device)
    pref = torch.tensor(vals, dtype=torch.int64, device=device)[:, None]
    hi = torch.maximum(pos[None, :], pref - 1)
    lo = torch.zeros_like(hi)
    return RowBounds(lo.to(torch.int32).contiguous(), hi.to(torch.int32).contiguous())


def prefix_lm_layout(prefix_len: Any, seqlen_q: int, seqlen_kv: int | None = None, *, block_m: int = 128,
                     block_n: int = 128, batch: int | None = None, heads: int = 1,
                     device: torch.device | str | None = None) -> tuple[BlockLayout, RowBounds]:
    """The exact block layout of prefix-LM attention (plus its row bounds; see :func:`prefix_lm_row_bounds`).

    Block ``(qb, kb)`` is selected iff it starts at or below the largest key some row of ``qb`` attends
    (``max(p, prefix_len - 1)``). Run it with ``causal=False`` and the bounds (``attention(...,
    causal=True, prefix_len=P)`` does it for you).

    Returns:
        ``(layout, RowBounds(lo, hi))``; the layout is shared by the heads (stride 0).
    """
    seqlen_kv = seqlen_q if seqlen_kv is None else seqlen_kv
    bounds = prefix_lm_row_bounds(prefix_len, seqlen_q, seqlen_kv, device=device)
    lay = row_bounds_layout(bounds, seqlen_q, seqlen_kv, block_m=block_m, block_n=block_n, batch=batch, heads=heads,
                            causal=False)
    return lay, bounds


def strided_layout(seqlen_q: int, seqlen_kv: int | None = None, *, stride: int = 4, local_blocks: int = 1,
                   block_m: int = 64, block_n: int = 64, batch: int = 1, heads: int = 1, causal: bool = True,
                   device: torch.device | str | None = None) -> BlockLayout:
    """Every ``stride``-th block counting back from the diagonal, plus ``local_blocks`` local blocks."""
    fn = "strided_layout"
    seqlen_kv = seqlen_q if seqlen_kv is None else seqlen_kv
    Mb, Nb = _geometry(fn, seqlen_q, seqlen_kv, block_m, block_n, batch, heads)
    check_positive_int(fn, "stride", stride)
    check_nonneg_int(fn, "local_blocks", local_blocks)
    d = diagonal_blocks(seqlen_q, seqlen_kv, block_m, block_n)[:, None]
    j = torch.arange(Nb)[None, :]
    dist = d - j
    mask = (torch.remainder(dist, stride) == 0) | ((dist >= 0) & (dist < local_blocks))
    if not causal:
        mask = mask | ((dist < 0) & (-dist < local_blocks))
    return _shared(mask, seqlen_q, seqlen_kv, block_m, block_n, batch, heads, causal, device)


def block_diagonal_layout(seqlen_q: int, seqlen_kv: int | None = None, *, group_blocks: int = 4, block_m: int = 64,
                          block_n: int = 64, batch: int = 1, heads: int = 1, causal: bool = False,
                          device: torch.device | str | None = None) -> BlockLayout:
    """Independent groups: query block ``i`` attends the key blocks of its diagonal block's group of ``group_blocks``."""
    fn = "block_diagonal_layout"
    seqlen_kv = seqlen_q if seqlen_kv is None else seqlen_kv
    Mb, Nb = _geometry(fn, seqlen_q, seqlen_kv, block_m, block_n, batch, heads)
    check_positive_int(fn, "group_blocks", group_blocks)
    d = diagonal_blocks(seqlen_q, seqlen_kv, block_m, block_n).clamp(min=0)[:, None]
    j = torch.arange(Nb)[None, :]
    mask = torch.div(j, group_blocks, rounding_mode="floor") == torch.div(d, group_blocks, rounding_mode="floor")
    return _shared(mask, seqlen_q, seqlen_kv, block_m, block_n, batch, heads, causal, device)


def sink_window_layout(seqlen_q: int, seqlen_kv: int | None = None, *, sink_blocks: int = 1, window_blocks: int = 4,
                       block_m: int = 64, block_n: int = 64, batch: int = 1, heads: int = 1, causal: bool = True,
                       device: torch.device | str | None = None) -> BlockLayout:
    """A-shape / StreamingLLM: the first ``sink_blocks`` key blocks plus a local window."""
    fn = "sink_window_layout"
    seqlen_kv = seqlen_q if seqlen_kv is None else seqlen_kv
    check_nonneg_int(fn, "sink_blocks", sink_blocks)
    win = sliding_window_layout(seqlen_q, seqlen_kv, window_blocks=window_blocks, block_m=block_m, block_n=block_n,
                                causal=causal)
    mask = win.to_dense_mask()[0, 0]
    mask[:, :sink_blocks] = True
    return _shared(mask, seqlen_q, seqlen_kv, block_m, block_n, batch, heads, causal, device)


def random_layout(seqlen_q: int, seqlen_kv: int | None = None, *, density: float = 0.5, seed: int = 0,
                  block_m: int = 64, block_n: int = 64, batch: int = 1, heads: int = 1, causal: bool = False,
                  keep_diagonal: bool = True, device: torch.device | str | None = None) -> BlockLayout:
    """Random blocks per (batch, head, query block), seeded, at a target density.

    Each row keeps ``round(density * available)`` blocks (at least one where any is available),
    chosen uniformly among its available blocks (the causal region when ``causal``); with
    ``keep_diagonal`` the diagonal block is always one of them, as FlexAttention's benchmarks do.
    The same seed gives the same layout on every machine (CPU generator).
    """
    fn = "random_layout"
    seqlen_kv = seqlen_q if seqlen_kv is None else seqlen_kv
    Mb, Nb = _geometry(fn, seqlen_q, seqlen_kv, block_m, block_n, batch, heads)
    density = check_fraction(fn, "density", density)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise fail(fn, "seed", "must be an int", "int", repr(seed))
    gen = torch.Generator().manual_seed(seed)
    if causal:
        region, _ = causal_block_region(seqlen_q, seqlen_kv, block_m, block_n)
    else:
        region = torch.ones(Mb, Nb, dtype=torch.bool)
    avail = region.sum(-1)  # [Mb]
    target = torch.round(avail.to(torch.float64) * density).to(torch.long)
    target = torch.where((avail > 0) & (density > 0), target.clamp(min=1), target)
    score = torch.rand(batch, heads, Mb, Nb, generator=gen)
    score = score.masked_fill(~region, -1.0)
    if keep_diagonal:
        d = diagonal_blocks(seqlen_q, seqlen_kv, block_m, block_n)
        rows = torch.arange(Mb)[d >= 0]
        dd = d[d >= 0]
        score[:, :, rows, dd] = torch.where(target[rows] > 0, 2.0, score[:, :, rows, dd])
    rank = torch.argsort(torch.argsort(score, dim=-1, descending=True), dim=-1)
    mask = (rank < target[None, None, :, None]) & region
    return BlockLayout.from_dense_mask(mask, block_m=block_m, block_n=block_n, seqlen_q=seqlen_q,
                                       seqlen_kv=seqlen_kv).to(device if device is not None else "cpu")


PATTERNS = {
    "dense": dense_layout,
    "causal": causal_layout,
    "local": sliding_window_layout,
    "sliding_window": sliding_window_layout,
    "strided": strided_layout,
    "random": random_layout,
    "block_diagonal": block_diagonal_layout,
    "sink_window": sink_window_layout,
}


def make_pattern(name: str, seqlen_q: int, seqlen_kv: int | None = None, **kwargs) -> BlockLayout:
    """Build a named pattern (``PATTERNS`` lists the names); ``kwargs`` go to the builder."""
    if name not in PATTERNS:
        raise fail("make_pattern", "name", "is not a known pattern", f"one of {sorted(PATTERNS)}", repr(name))
    builder = PATTERNS[name]
    params = inspect.signature(builder).parameters
    valid = [p for p, v in params.items() if v.kind == v.KEYWORD_ONLY or (v.kind == v.POSITIONAL_OR_KEYWORD
                                                                       and p not in ("seqlen_q", "seqlen_kv"))]
    for key in kwargs:
        if key not in valid:
            raise fail("make_pattern", f"key {key!r}", f"is not a parameter of pattern {name!r}", f"one of {valid}",
                       repr(key))
    return builder(seqlen_q, seqlen_kv, **kwargs)


# the integer knob of each pattern that trades density for coverage, and its direction
_DENSITY_KNOB = {
    "sliding_window": "window_blocks",
    "local": "window_blocks",
    "sink_window": "window_blocks",
    "strided": "stride",
    "block_diagonal": "group_blocks",
}


def pattern_at_density(name: str, seqlen_q: int, seqlen_kv: int | None = None, *, density: float,
                       causal: bool = True, **kwargs) -> BlockLayout:
    """Build pattern ``name`` with its size knob chosen so its density is closest to ``density``.

    ``density`` is measured as :meth:`BlockLayout.density` does (over the causal region when
    ``causal``). The knob is ``window_blocks`` (sliding_window, sink_window), ``stride`` (strided)
    or ``group_blocks`` (block_diagonal); ``random`` takes ``density`` directly; ``dense`` and
    ``causal`` ignore it. Ties go to the denser layout. The achieved density is
    ``layout.density(causal)`` — patterns are discrete, so it can differ from the target.
    """
    fn = "pattern_at_density"
    density = check_fraction(fn, "density", density)
    if name not in PATTERNS:
        raise fail(fn, "name", "is not a known pattern", f"one of {sorted(PATTERNS)}", repr(name))
    if name == "random":
        return random_layout(seqlen_q, seqlen_kv, density=density, causal=causal, **kwargs)
    if name in ("dense", "causal"):
        if name == "dense":
            return dense_layout(seqlen_q, seqlen_kv, causal=causal, **kwargs)
        return causal_layout(seqlen_q, seqlen_kv, **kwargs)
    knob = _DENSITY_KNOB[name]
    if knob in kwargs:
        raise fail(fn, knob, "is chosen from density; do not pass it", "no explicit " + knob, kwargs[knob])
    seqlen_kv = seqlen_q if seqlen_kv is None else seqlen_kv
    nb = cdiv(seqlen_kv, kwargs.get("block_n", 64))
    cache: dict[int, BlockLayout] = {}

    def build(val: int) -> BlockLayout:
        if val not in cache:
            cache[val] = PATTERNS[name](seqlen_q, seqlen_kv, causal=causal, **{knob: val}, **kwargs)
        return cache[val]

    def dens(val: int) -> float:
        return build(val).density(causal)

    # density grows with window_blocks / group_blocks and shrinks with stride: binary search for the
    # first knob value on the far side of the target, then take the closer of it and its neighbour
    increasing = knob != "stride"
    lo, hi = 1, nb
    while lo < hi:
        mid = (lo + hi) // 2
        beyond = dens(mid) >= density if increasing else dens(mid) <= density
        if beyond:
            hi = mid
        else:
            lo = mid + 1
    best: tuple[float, BlockLayout] | None = None
    for val in (lo - 1, lo, lo + 1):
        if 1 <= val <= nb:
            lay = build(val)
            gap = abs(lay.density(causal) - density)
            if best is None or gap < best[0] - 1e-12 or (abs(gap - best[0]) <= 1e-12 and lay.density(causal) > best[1].density(causal)):
                best = (gap, lay)
    return best[1]  # type: ignore[index]  # nb >= 1, so the loop ran
