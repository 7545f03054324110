"""Exact causal sliding-window attention (Gemma-2/3, Mistral ``sliding_window``).

Semantics (transformers'): query ``i`` attends keys ``j`` with ``i + OFF - W < j <= i + OFF``,
``OFF = N_kv - N_q`` (bottom-right alignment), intersected with the layout. Checked here:

* the reference against a float64 dense judge built from an explicit element mask (written here);
* the Triton kernel (interpreter on CPU) against the reference with the ratio rule, on fresh random
  inputs: odd lengths, windows of 1 key to more than the keys, windows that are not block multiples,
  N_q != N_kv, GQA, fp16/bf16, random layouts combined with the window, sub-tiled configs, empty rows,
  non-finite keys outside the window, pv_threshold with the window;
* the band layout (exactly the blocks some row's window touches) and ``attention()``'s cached use of it;
* bad arguments.

Kept small: the interpreter's cost is per operation (about a minute on 2 cores in all).
"""

from __future__ import annotations

import math

import pytest
import torch

import sparseattn
from sparseattn import BlockLayout, attention, reference_attention, sliding_window_band_layout
from sparseattn.layout.patterns import random_layout
from sparseattn.testing.harness import kernel_unavailable, node_seed
from sparseattn.testing.tolerances import ATOL_FLOOR, FP64_ATOL, SDPA_FP64_ATOL, check_ratio

ON_GPU = torch.cuda.is_available()
DEV = "cuda" if ON_GPU else "cpu"

needs_kernel = pytest.mark.skipif(kernel_unavailable() is not None, reason=str(kernel_unavailable()))
_seed = node_seed


def _qkv(B, H, Hkv, Nq, Nkv, D, dtype, gen, spread=1.0):
    def r(*shape):
        return (torch.randn(*shape, generator=gen) * spread).to(dtype).to(DEV)

    return r(B, H, Nq, D), r(B, Hkv, Nkv, D), r(B, Hkv, Nkv, D)


# ---------------------------------------------------------------------------------------------- the judge
def window_mask(Nq: int, Nkv: int, W: int) -> torch.Tensor:
    """Bool ``[Nq, Nkv]``: row ``i`` sees key ``j`` iff ``i + OFF - W < j <= i + OFF`` (built element by element)."""
    off = Nkv - Nq
    m = torch.zeros(Nq, Nkv, dtype=torch.bool)
    for i in range(Nq):
        lo, hi = max(i + off - W + 1, 0), min(i + off, Nkv - 1)
        if lo <= hi:
            m[i, lo:hi + 1] = True
    return m


def judge(q, k, v, mask: torch.Tensor, scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense float64 softmax attention over ``mask`` (``[B, H, Nq, Nkv]`` or broadcastable); empty rows 0 / -inf.

    The mask is applied by selection (``where``), so a NaN score of an excluded key cannot leak in.
    """
    B, H, Nq, D = q.shape
    G = H // k.shape[1]
    qd, kd, vd = q.cpu().double(), k.cpu().double().repeat_interleave(G, 1), v.cpu().double().repeat_interleave(G, 1)
    mask = mask.cpu().expand(B, H, Nq, kd.shape[2])
    sc = D ** -0.5 if scale is None else scale
    s = torch.where(mask, (qd @ kd.transpose(-1, -2)) * sc, torch.tensor(-math.inf, dtype=torch.float64))
    empty = ~mask.any(-1)
    lse = torch.logsumexp(s, -1)
    p = torch.where(mask, torch.exp(s - torch.where(empty, 0.0, lse)[..., None]), torch.zeros((), dtype=torch.float64))
    out = p @ vd
    out = out.masked_fill(empty[..., None], 0.0)
    return out, lse.masked_fill(empty, -math.inf)


REF_CASES = [  # (H, Hkv, Nq, Nkv, W)
    (2, 1, 1, 1, 1),
    (2, 2, 17, 17, 5),
    (4, 2, 100, 100, 16),
    (4, 1, 191, 191, 33),
    (2, 1, 191, 191, 64),
    (2, 1, 100, 100, 100),
    (2, 1, 100, 100, 1000),
    (4, 2, 17, 191, 33),    # a chunk of queries over a longer cache
    (2, 1, 100, 191, 1),
    (2, 1, 191, 100, 16),   # N_q > N_kv: the first rows see nothing
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("use_layout", [False, True], ids=["dense", "layout"])
@pytest.mark.parametrize("H,Hkv,Nq,Nkv,W", REF_CASES)
def test_reference_matches_dense_judge(H, Hkv, Nq, Nkv, W, use_layout, dtype, request):
    gen = torch.Generator().manual_seed(_seed(request))
    q, k, v = (t.cpu() for t in _qkv(2, H, Hkv, Nq, Nkv, 16, dtype, gen))
    mask = window_mask(Nq, Nkv, W)[None, None]
    lay = None
    if use_layout:
        lay = random_layout(Nq, Nkv, density=0.6, seed=_seed(request) % 997, block_m=16, block_n=16, batch=2, heads=H,
                            causal=True)
        mask = mask & lay.element_mask(causal=True)
    out, lse = reference_attention(q, k, v, causal=True, layout=lay, sliding_window=W, chunk_size=32)
    jo, jl = judge(q, k, v, mask)
    tol = SDPA_FP64_ATOL if dtype == torch.float64 else ATOL_FLOOR[torch.float32]
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), jo, atol=tol, rtol=0)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(jl))
    fin = torch.isfinite(jl)
    torch.testing.assert_close(lse.double()[fin], jl[fin], atol=tol, rtol=0)


def test_reference_window_at_least_keys_is_causal(request):
    gen = torch.Generator().manual_seed(_seed(request))
    q, k, v = (t.cpu() for t in _qkv(1, 2, 1, 50, 70, 16, torch.float64, gen))
    a = reference_attention(q, k, v, causal=True, sliding_window=70)
    b = reference_attention(q, k, v, causal=True)
    assert torch.equal(a.out, b.out) and torch.equal(a.lse, b.lse)


def test_reference_nan_key_outside_window_does_not_reach_rows():
    Nq = Nkv = 60
    W = 8
    q, k, v = (t.cpu() for t in _qkv(1, 2, 1, Nq, Nkv, 16, torch.float64, torch.Generator().manual_seed(3)))
    k[0, 0, 10, 2] = math.nan
    v[0, 0, 30, 5] = math.inf
    out, lse = reference_attention(q, k, v, causal=True, sliding_window=W, chunk_size=16)
    rows_k = torch.arange(Nq)
    sees10 = (rows_k >= 10) & (rows_k < 10 + W)
    sees30 = (rows_k >= 30) & (rows_k < 30 + W)
    assert bool(torch.isnan(out[0, :, sees10]).all())
    assert bool(torch.isfinite(out[0, :, ~sees10 & ~sees30]).all())
    assert bool(torch.isfinite(lse[0, :, ~sees10]).all())
    # v[30, 5] = +inf: channel 5 of the rows that attend key 30, nothing else
    assert bool(torch.isposinf(out[0, :, sees30, 5]).all())
    others = torch.ones(Nq, 16, dtype=torch.bool)
    others[sees30, 5] = False
    others[sees10] = False
    assert bool(torch.isfinite(out[0, :][:, others]).all())


# ---------------------------------------------------------------------------------------------- kernel parity
def _fwd(*args, **kwargs):
    from sparseattn.ops.triton_launch import block_sparse_fwd

    return block_sparse_fwd(*args, **kwargs)


def _refs(q, k, v, layout, W, pv_threshold=None):
    hi_dtype = torch.float32 if ON_GPU else torch.float64
    hi_stats: dict = {}
    hi = reference_attention(q.to(hi_dtype), k.to(hi_dtype), v.to(hi_dtype), layout=layout, causal=True,
                             sliding_window=W, pv_threshold=pv_threshold, stats=hi_stats)
    lo = reference_attention(q, k, v, layout=layout, causal=True, sliding_window=W, upcast=False,
                             pv_threshold=pv_threshold)
    return hi, lo, hi_stats


def _check(q, k, v, layout, W, **kw):
    out, lse = _fwd(q, k, v, layout=layout, causal=True, sliding_window=W, **kw)
    hi, lo, _ = _refs(q, k, v, layout, W)
    check_ratio(out, hi.out, lo.out, "out")
    check_ratio(lse, hi.lse, lo.lse, "lse")
    return out, lse


C64 = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 1}
KERNEL_CASES = {  # (H, Hkv, Nq, Nkv, dtype, W, layout: None | (density, block_m, block_n), config)
    "n1-w1": (2, 1, 1, 1, torch.float16, 1, None, None),
    "n17-w5": (4, 2, 17, 17, torch.float16, 5, None, None),
    "n100-w16-gqa2": (4, 2, 100, 100, torch.float16, 16, None, None),
    "n191-w33-gqa4": (4, 1, 191, 191, torch.float16, 33, None, None),
    "n191-w64-bf16": (4, 2, 191, 191, torch.bfloat16, 64, None, None),
    "n191-w100": (2, 1, 191, 191, torch.float16, 100, None, None),
    "n100-w-ge-n": (2, 1, 100, 100, torch.float16, 100, None, None),
    "chunk17-over191-w33": (4, 2, 17, 191, torch.float16, 33, None, None),
    "chunk100-over191-w1-bf16": (2, 1, 100, 191, torch.bfloat16, 1, None, None),
    "nq>nkv-w16": (2, 1, 191, 100, torch.float16, 16, None, None),
    "rand-w5-b64": (4, 2, 191, 191, torch.float16, 5, (0.6, 64, 64), C64),
    "rand-w33-b64-bf16": (4, 1, 191, 191, torch.bfloat16, 33, (0.6, 64, 64), C64),
    "rand-w100-chunk": (4, 2, 100, 191, torch.float16, 100, (0.7, 64, 64), C64),
    "rand-w16-b128x64": (2, 1, 191, 191, torch.float16, 16, (0.7, 128, 64), None),
    "rand-w64-subtiles": (2, 1, 191, 191, torch.float16, 64, (0.8, 128, 128),
                          {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}),
    "rand-w33-binsearch-noprefetch": (2, 1, 191, 191, torch.float16, 33, (0.8, 64, 64),
                                      {**C64, "VEC_COUNT": False, "PREFETCH": False}),
}


@needs_kernel
@pytest.mark.parametrize("case", list(KERNEL_CASES), ids=list(KERNEL_CASES))
def test_kernel_matches_reference(case, request):
    H, Hkv, Nq, Nkv, dtype, W, lay_spec, cfg = KERNEL_CASES[case]
    gen = torch.Generator().manual_seed(_seed(request))
    q, k, v = _qkv(1, H, Hkv, Nq, Nkv, 64, dtype, gen)
    lay = None
    if lay_spec is not None:
        density, bm, bn = lay_spec
        lay = random_layout(Nq, Nkv, density=density, seed=_seed(request) % 997, block_m=bm, block_n=bn, heads=H,
                            causal=True, device=DEV)
    out, lse = _check(q, k, v, lay, W, config=cfg)
    # and the reference itself is the judge's function (fp64, explicit element mask)
    mask = window_mask(Nq, Nkv, W)[None, None]
    if lay is not None:
        mask = mask & lay.element_mask(causal=True).cpu()
    assert torch.equal(torch.isneginf(lse.cpu()), ~mask.expand(1, H, Nq, Nkv).any(-1))


@needs_kernel
def test_kernel_long_list_several_chunks(request):
    """Lists longer than one LIST_CHUNK: the prologue's four counts run over several chunks."""
    gen = torch.Generator().manual_seed(_seed(request))
    Nq, Nkv, W = 130, 1300, 200
    q, k, v = _qkv(1, 2, 1, Nq, Nkv, 64, torch.float16, gen)
    lay = random_layout(Nq, Nkv, density=0.9, seed=7, heads=2, causal=True, device=DEV)
    assert int(lay.kv_num_blocks.max()) > 16
    for vec in (True, False):
        _check(q, k, v, lay, W, config={**C64, "VEC_COUNT": vec, "LIST_CHUNK": 16})


@needs_kernel
def test_kernel_window_covering_all_keys_is_the_causal_kernel(request):
    gen = torch.Generator().manual_seed(_seed(request))
    q, k, v = _qkv(1, 2, 1, 100, 150, 64, torch.float16, gen)
    a = _fwd(q, k, v, layout=None, causal=True, sliding_window=150)
    b = _fwd(q, k, v, layout=None, causal=True)
    assert torch.equal(a.out, b.out) and torch.equal(a.lse, b.lse)


@needs_kernel
def test_empty_rows_outside_the_window(request):
    """Layout rows whose selected blocks all lie below their window attend nothing: out 0, lse -inf.

    N = 192, blocks of 64, W = 40. Query block 1 (rows 64..127) selects only key block 0 (keys 0..63):
    row r sees key 63 iff r < 103, so rows 64..102 attend and rows 103..127 are empty (a per-row edge
    inside one program). Query block 2 selects only block 0: entirely below its window (skipped).
    """
    gen = torch.Generator().manual_seed(_seed(request))
    N, W = 192, 40
    q, k, v = _qkv(1, 2, 1, N, N, 64, torch.float16, gen)
    mask = torch.zeros(1, 2, 3, 3, dtype=torch.bool)
    mask[:, :, 0, 0] = True
    mask[:, :, 1, 0] = True
    mask[:, :, 2, 0] = True
    mask[:, 1, 2, 2] = True  # head 1: block 2 also has its diagonal block
    lay = BlockLayout.from_dense_mask(mask, block_m=64, block_n=64, seqlen_q=N, seqlen_kv=N).to(DEV)
    for run in (lambda: _fwd(q, k, v, layout=lay, causal=True, sliding_window=W, config=C64),
                lambda: reference_attention(q, k, v, layout=lay, causal=True, sliding_window=W)):
        out, lse = run()
        out, lse = out.cpu(), lse.cpu()
        assert bool(torch.isfinite(lse[:, :, 64:103]).all())
        assert bool((out[:, :, 103:128] == 0).all()) and bool(torch.isneginf(lse[:, :, 103:128]).all())
        assert bool((out[:, 0, 128:] == 0).all()) and bool(torch.isneginf(lse[:, 0, 128:]).all())
        assert bool(torch.isfinite(lse[:, 1, 128:]).all())
    _check(q, k, v, lay, W, config=C64)
    stats: dict = {}
    _fwd(q, k, v, layout=lay, causal=True, sliding_window=W, pv_threshold=math.inf, stats=stats)
    hi_stats: dict = {}
    reference_attention(q.float(), k.float(), v.float(), layout=lay, causal=True, sliding_window=W,
                        pv_threshold=math.inf, stats=hi_stats)
    assert stats == hi_stats == {"visited_tiles": 2 + 2 + 1, "pv_skipped_tiles": 0}  # the below-window tiles are not visited


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_nan_key_outside_window_does_not_reach_rows(dtype, request):
    """A NaN key reaches exactly the rows whose window (and layout) holds it: not the rows past it."""
    gen = torch.Generator().manual_seed(_seed(request))
    N, W, j = 191, 33, 70
    q, k, v = _qkv(1, 4, 2, N, N, 64, dtype, gen)
    k[0, 0, j, 3] = math.nan
    lay = random_layout(N, N, density=0.8, seed=3, heads=4, causal=True, device=DEV)
    for layout in (None, lay):
        out, lse = _fwd(q, k, v, layout=layout, causal=True, sliding_window=W, config=C64)
        ref = reference_attention(q, k, v, layout=layout, causal=True, sliding_window=W)
        mask = window_mask(N, N, W)[None, None].expand(1, 4, N, N)
        if layout is not None:
            mask = mask & layout.element_mask(causal=True).cpu()
        want_bad = torch.zeros(1, 4, N, dtype=torch.bool)
        want_bad[:, :2] = mask[:, :2, :, j]  # kv head 0 serves q heads 0, 1
        for o, l in ((out, lse), (ref.out, ref.lse)):
            bad = torch.isnan(o.cpu()).any(-1)
            assert torch.equal(bad, want_bad)
            assert torch.equal(torch.isnan(l.cpu()), want_bad)
        assert bool(want_bad.any()) and bool((~want_bad[:, :2] & mask[:, :2].any(-1)).any())


@needs_kernel
def test_nonfinite_v_reaches_attending_rows_and_only_tiles_loading_it(request):
    """``v[j, d]`` non-finite: channel ``d`` of every row attending ``j`` (exact in the reference). The kernel
    adds its documented P·V exception (0 · NaN inside a masked tile): rows of a query tile (128-row aligned,
    as in tests/test_nonfinite.py) that loads key ``j``'s tile. No other row, no other channel.

    N = 250, W = 20, key 10: rows 10..29 attend it. layout=None runs the 128-block band with 64 x 64 kernel
    tiles. Rows 128..249 have block 0 (keys 0..127) at their window's lower edge, but the sub-tile of keys
    0..63 lies below the window of every row of those programs, so it is never loaded: they stay clean.
    """
    gen = torch.Generator().manual_seed(_seed(request))
    N, W, j, d = 250, 20, 10, 5
    q, k, v = _qkv(1, 2, 1, N, N, 64, torch.float16, gen)
    v[0, 0, j, d] = math.nan
    out, _ = _fwd(q, k, v, layout=None, causal=True, sliding_window=W, config=C64)
    ref = reference_attention(q, k, v, causal=True, sliding_window=W)
    attends = window_mask(N, N, W)[:, j]
    ref_bad = torch.isnan(ref.out.cpu())[0]
    assert torch.equal(ref_bad[:, :, d], attends[None].expand(2, N)) and not bool(ref_bad[..., :d].any())
    bad = torch.isnan(out.cpu()[0, :, :, d])
    assert bool(bad[:, attends].all())
    assert not bool(bad[:, 128:].any())  # the below-window sub-tile is skipped
    assert not bool(torch.isnan(out.cpu()[..., :d]).any()) and not bool(torch.isnan(out.cpu()[..., d + 1:]).any())


@needs_kernel
def test_pv_threshold_with_window_matches_reference_rule(request):
    gen = torch.Generator().manual_seed(_seed(request))
    N, W = 300, 120
    q, k, v = _qkv(1, 2, 1, N, N, 64, torch.float16, gen)
    # strong keys 128..191 (key block 2): every row of query blocks 3 and 4 holds some of them in its window
    # and visits them before key blocks 3/4, which then fall far below the running max and are skipped;
    # key blocks 0, 1 lie below the window of every row of query block 4 (not visited at all)
    w = torch.randn(64, generator=gen)
    w = (w / w.norm() * 8.0).to(q.dtype).to(DEV)
    q = q + w
    k[:, :, 128:192] += w
    lay = random_layout(N, N, density=0.9, seed=4, heads=2, causal=True, device=DEV)
    thr = 3.0
    stats: dict = {}
    out, lse = _fwd(q, k, v, layout=lay, causal=True, sliding_window=W, pv_threshold=thr, stats=stats)
    hi, lo, hi_stats = _refs(q, k, v, lay, W, pv_threshold=thr)
    assert hi_stats["pv_skipped_tiles"] > 0, "test data should make the rule skip something"
    assert stats == hi_stats
    no_win: dict = {}
    reference_attention(q, k, v, layout=lay, causal=True, pv_threshold=thr, stats=no_win)
    assert hi_stats["visited_tiles"] < no_win["visited_tiles"]  # tiles below every row's window are not visited
    check_ratio(out, hi.out, lo.out)
    check_ratio(lse, hi.lse, lo.lse, "lse")


@needs_kernel
def test_attention_and_attention_op_use_the_kernel_with_window(request):
    gen = torch.Generator().manual_seed(_seed(request))
    q, k, v = _qkv(1, 4, 2, 100, 191, 64, torch.float16, gen)
    W = 33
    got = attention(q, k, v, causal=True, sliding_window=W, backend="triton")
    hi, lo, _ = _refs(q, k, v, None, W)
    check_ratio(got.out, hi.out, lo.out)
    check_ratio(got.lse, hi.lse, lo.lse, "lse")
    from sparseattn.ops.custom_ops import attention_op

    via_op = attention_op(q, k, v, causal=True, sliding_window=W, backend="triton")
    check_ratio(via_op.out, hi.out, lo.out)
    lay = random_layout(100, 191, density=0.6, seed=2, heads=4, causal=True, device=DEV)
    a = sparseattn.block_sparse_attention(q, k, v, lay, causal=True, sliding_window=W, backend="triton")
    b = attention_op(q, k, v, causal=True, layout=lay, sliding_window=W, backend="triton")
    assert torch.equal(a.out, b.out) and torch.equal(a.lse, b.lse)


# ---------------------------------------------------------------------------------------------- band layout
@pytest.mark.parametrize("Nq,Nkv,W,bm,bn", [
    (1, 1, 1, 64, 64), (191, 191, 33, 64, 64), (191, 191, 1, 64, 64), (100, 191, 100, 64, 128),
    (191, 100, 16, 128, 64), (1000, 1000, 64, 64, 64), (1000, 1000, 2000, 128, 128), (17, 300, 5, 16, 16),
])
def test_band_layout_is_exactly_the_blocks_the_window_touches(Nq, Nkv, W, bm, bn):
    lay = sliding_window_band_layout(Nq, Nkv, window=W, block_m=bm, block_n=bn, batch=2, heads=3)
    m = window_mask(Nq, Nkv, W)
    Mb, Nb = -(-Nq // bm), -(-Nkv // bn)
    pad = torch.nn.functional.pad(m, (0, Nb * bn - Nkv, 0, Mb * bm - Nq))
    want = pad.reshape(Mb, bm, Nb, bn).any(3).any(1)
    got = lay.to_dense_mask()
    assert tuple(got.shape) == (2, 3, Mb, Nb)
    assert torch.equal(got[0, 0], want) and bool((got == want).all())
    assert lay.kv_indices.stride(0) == 0 and lay.kv_indices.stride(1) == 0  # shared, stride 0 over batch/heads
    assert lay.batch == 2 and lay.heads == 3


def test_band_layout_density():
    """Per query block: at most ceil((W - 1 + block_m) / block_n) + 1 key blocks, whatever the length."""
    N, W, b = 4096, 512, 128
    lay = sliding_window_band_layout(N, window=W, block_m=b, block_n=b)
    per_row = lay.kv_num_blocks[0, 0]
    assert int(per_row.max()) <= -(-(W - 1 + b) // b) + 1
    causal_blocks = sum(i + 1 for i in range(N // b))
    assert abs(lay.density(True) - float(per_row.sum()) / causal_blocks) < FP64_ATOL
    # query block i (rows 128 i .. 128 i + 127) needs keys 128 i - 511 .. 128 i + 127: blocks i - 4 .. i
    assert per_row.tolist() == [min(i + 1, 5) for i in range(N // b)]
    assert lay.density(True) < 0.3  # against 1.0 for the causal square
    full = sliding_window_band_layout(N, window=N, block_m=b, block_n=b)
    assert full.density(True) == 1.0


def test_attention_builds_and_caches_the_band(request):
    import importlib

    att_mod = importlib.import_module("sparseattn.ops.attention")  # the module (sparseattn.ops.attention is the function)

    gen = torch.Generator().manual_seed(_seed(request))
    q, k, v = (t.cpu() for t in _qkv(2, 4, 2, 150, 260, 16, torch.float64, gen))
    W = 45
    att_mod._BAND.clear()
    got = attention(q, k, v, causal=True, sliding_window=W)
    assert len(att_mod._BAND) == 1
    (key,) = att_mod._BAND.keys()
    num1 = att_mod._BAND[key][0]
    again = attention(q, k, v, causal=True, sliding_window=W)
    assert len(att_mod._BAND) == 1 and att_mod._BAND[key][0] is num1  # reused, not rebuilt
    assert torch.equal(got.out, again.out)
    jo, jl = judge(q, k, v, window_mask(150, 260, W)[None, None])
    torch.testing.assert_close(got.out, jo, atol=SDPA_FP64_ATOL, rtol=0)
    torch.testing.assert_close(got.lse, jl, atol=SDPA_FP64_ATOL, rtol=0)
    attention(q, k, v, causal=True, sliding_window=260)  # covers every key: plain causal, no band built
    assert len(att_mod._BAND) == 1
    lay = att_mod.band_layout(2, 4, 150, 260, W, "cpu")
    assert lay.block_m == lay.block_n == 128 and lay.kv_num_blocks.stride(0) == 0


def test_attention_op_reference_with_window(request):
    from sparseattn.ops.custom_ops import attention_op

    gen = torch.Generator().manual_seed(_seed(request))
    q, k, v = (t.cpu() for t in _qkv(1, 4, 2, 60, 80, 16, torch.float64, gen))
    got = attention_op(q, k, v, causal=True, sliding_window=7)
    want = reference_attention(q, k, v, causal=True, sliding_window=7)
    assert torch.equal(got.out, want.out) and torch.equal(got.lse, want.lse)


# ---------------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("bad", [0, -3, True, 2.5, "8"], ids=["zero", "negative", "bool", "float", "str"])
def test_bad_window_values(bad):
    q, k, v = (t.cpu() for t in _qkv(1, 2, 1, 16, 16, 16, torch.float32, torch.Generator().manual_seed(0)))
    for fn, call in (("attention", lambda: attention(q, k, v, causal=True, sliding_window=bad)),
                     ("reference_attention", lambda: reference_attention(q, k, v, causal=True, sliding_window=bad)),
                     ("sliding_window_band_layout", lambda: sliding_window_band_layout(16, window=bad))):
        with pytest.raises(ValueError, match=f"^{fn}: (sliding_window|window) must be a positive integer"):
            call()


def test_window_needs_causal():
    q, k, v = (t.cpu() for t in _qkv(1, 2, 1, 16, 16, 16, torch.float32, torch.Generator().manual_seed(0)))
    msg = r"sliding_window needs causal=True .*; expected causal=True, got causal=False"
    with pytest.raises(ValueError, match="^attention: " + msg):
        attention(q, k, v, sliding_window=4)
    with pytest.raises(ValueError, match="^reference_attention: " + msg):
        reference_attention(q, k, v, causal=False, sliding_window=4)
    from sparseattn.ops.custom_ops import attention_op

    with pytest.raises(ValueError, match="^attention_op: " + msg):
        attention_op(q, k, v, sliding_window=4)


@needs_kernel
def test_kernel_launcher_validates_window():
    q, k, v = _qkv(1, 2, 1, 64, 64, 64, torch.float16, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="^block_sparse_fwd: sliding_window needs causal=True"):
        _fwd(q, k, v, layout=None, causal=False, sliding_window=8)
    with pytest.raises(ValueError, match="^block_sparse_fwd: sliding_window must be a positive integer"):
        _fwd(q, k, v, layout=None, causal=True, sliding_window=0)
