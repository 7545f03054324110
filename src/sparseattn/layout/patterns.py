"""Static block patterns. Each returns a :class:`BlockLayout` for the given lengths, blocks and heads.

Block coordinates: query block ``i`` covers rows ``[i*block_m, (i+1)*block_m)``; its *diagonal* key
block is the block holding the last key its last row may see under bottom-right causal alignment,
``(row_last + seqlen_kv - seqlen_q) // block_n`` (``i`` itself when lengths and blocks are equal).
With ``causal=True`` every pattern is intersected with the causal block region.

Patterns shared by all heads are stored once and expanded (stride 0) over batch and heads.
"""

from __future__ import annotations

import inspect

import torch

from sparseattn._validation import check_fraction, check_nonneg_int, check_positive_int, fail
from sparseattn.layout.block_layout import BlockLayout, causal_block_region, cdiv

__all__ = [
    "dense_layout",
    "causal_layout",
    "sliding_window_layout",
    "sliding_window_band_layout",
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


def _diag(seqlen_q: int, seqlen_kv: int, block_m: int, block_n: int) -> torch.Tensor:
    """Diagonal key block of every query block (may be < 0 when N_q > N_kv and the block sees nothing)."""
    Mb = cdiv(seqlen_q, block_m)
    i = torch.arange(Mb)
    row_last = torch.clamp((i + 1) * block_m, max=seqlen_q) - 1
    last_key = row_last + (seqlen_kv - seqlen_q)
    Nb = cdiv(seqlen_kv, block_n)
    return torch.clamp(torch.div(last_key, block_n, rounding_mode="floor"), max=Nb - 1)


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
    d = _diag(seqlen_q, seqlen_kv, block_m, block_n)[:, None]
    j = torch.arange(Nb)[None, :]
    mask = (j <= d) & (j > d - window_blocks)
    if not causal:
        mask = mask | ((j > d) & (j < d + window_blocks))
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


def strided_layout(seqlen_q: int, seqlen_kv: int | None = None, *, stride: int = 4, local_blocks: int = 1,
                   block_m: int = 64, block_n: int = 64, batch: int = 1, heads: int = 1, causal: bool = True,
                   device: torch.device | str | None = None) -> BlockLayout:
    """Every ``stride``-th block counting back from the diagonal, plus ``local_blocks`` local blocks."""
    fn = "strided_layout"
    seqlen_kv = seqlen_q if seqlen_kv is None else seqlen_kv
    Mb, Nb = _geometry(fn, seqlen_q, seqlen_kv, block_m, block_n, batch, heads)
    check_positive_int(fn, "stride", stride)
    check_nonneg_int(fn, "local_blocks", local_blocks)
    d = _diag(seqlen_q, seqlen_kv, block_m, block_n)[:, None]
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
    d = _diag(seqlen_q, seqlen_kv, block_m, block_n).clamp(min=0)[:, None]
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
        d = _diag(seqlen_q, seqlen_kv, block_m, block_n)
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
