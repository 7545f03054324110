"""Exact structured masks as per-row key intervals: packed documents (``cu_seqlens`` / ``document_ids``) and prefix-LM.

Semantics: query ``i`` sits at key position ``p = i + N_kv - N_q``. Documents: ``i`` attends keys of ``p``'s
document (causally with ``causal=True``); prefix-LM: ``i`` attends ``j <= max(p, P - 1)``. Checked here:

* the fast, vectorised layout builders against the obvious slow one (an element mask built row by row,
  reduced to blocks), bit for bit, and ``document_ids`` against ``cu_seqlens``;
* the reference (``row_bounds=``) against a float64 dense judge over the explicit element mask;
* the Triton kernel (``HAS_ROW_BOUNDS``, interpreter on CPU) against the reference with the ratio rule:
  odd lengths, GQA, batch > 1 with different splits, single-token documents, bf16, sub-tiles, the
  binary-search prologue, a user layout (intersected), a window inside documents, empty rows, NaN inputs;
* one document is plain causal attention bitwise; prefix 0 is causal, prefix N is full attention, bitwise;
* ``attention()``'s cache and bad arguments.

Kept small: the interpreter's cost is per operation.
"""

from __future__ import annotations

import math

import pytest
import torch

from sparseattn import BlockLayout, attention, reference_attention
from sparseattn.layout.patterns import (
    RowBounds,
    document_layout,
    document_row_bounds,
    prefix_lm_layout,
    random_layout,
    row_bounds_layout,
)
from sparseattn.testing.harness import CountOps, kernel_unavailable, node_seed
from sparseattn.testing.tolerances import ATOL_FLOOR, SDPA_FP64_ATOL, check_ratio

ON_GPU = torch.cuda.is_available()
DEV = "cuda" if ON_GPU else "cpu"

needs_kernel = pytest.mark.skipif(kernel_unavailable() is not None, reason=str(kernel_unavailable()))
C64 = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 1}
_seed = node_seed


def _qkv(B, H, Hkv, Nq, Nkv, D, dtype, gen):
    def r(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).to(DEV)

    return r(B, H, Nq, D), r(B, Hkv, Nkv, D), r(B, Hkv, Nkv, D)


# ---------------------------------------------------------------------------------------------- the slow judges
def doc_mask(cu: list[int], Nq: int, causal: bool, window: int | None = None) -> torch.Tensor:
    """Bool ``[Nq, Nkv]`` written element by element: same document (and causal / inside the window)."""
    Nkv = cu[-1]
    off = Nkv - Nq
    doc = [d for d in range(len(cu) - 1) for _ in range(cu[d + 1] - cu[d])]
    m = torch.zeros(Nq, Nkv, dtype=torch.bool)
    for i in range(Nq):
        p = i + off
        for j in range(Nkv):
            ok = doc[j] == doc[p] and (not causal or j <= p) and (window is None or j > p - window)
            m[i, j] = ok
    return m


def prefix_mask(P: int, Nq: int, Nkv: int) -> torch.Tensor:
    off = Nkv - Nq
    m = torch.zeros(Nq, Nkv, dtype=torch.bool)
    for i in range(Nq):
        m[i, : max(i + off, P - 1) + 1] = True
    return m


def block_reduce(m: torch.Tensor, bm: int, bn: int) -> torch.Tensor:
    """``[..., Nq, Nkv]`` element mask -> ``[..., Mb, Nb]``: a block is selected iff it holds an allowed pair."""
    Nq, Nkv = m.shape[-2:]
    Mb, Nb = -(-Nq // bm), -(-Nkv // bn)
    pad = torch.nn.functional.pad(m, (0, Nb * bn - Nkv, 0, Mb * bm - Nq))
    return pad.reshape(*m.shape[:-2], Mb, bm, Nb, bn).any(-1).any(-2)


def judge(q, k, v, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense float64 softmax attention over ``mask`` (broadcastable to ``[B, H, Nq, Nkv]``); empty rows 0 / -inf."""
    B, H, Nq, D = q.shape
    G = H // k.shape[1]
    qd, kd, vd = q.cpu().double(), k.cpu().double().repeat_interleave(G, 1), v.cpu().double().repeat_interleave(G, 1)
    mask = mask.cpu().expand(B, H, Nq, kd.shape[2])
    s = torch.where(mask, (qd @ kd.transpose(-1, -2)) * D ** -0.5, torch.tensor(-math.inf, dtype=torch.float64))
    empty = ~mask.any(-1)
    lse = torch.logsumexp(s, -1)
    p = torch.where(mask, torch.exp(s - torch.where(empty, 0.0, lse)[..., None]), torch.zeros((), dtype=torch.float64))
    return (p @ vd).masked_fill(empty[..., None], 0.0), lse.masked_fill(empty, -math.inf)


def _mask_of(kw: dict, B: int, Nq: int, Nkv: int) -> torch.Tensor:
    """The element mask ``[B, 1, Nq, Nkv]`` of attention()'s structured-mask keywords."""
    if "prefix_len" in kw:
        P = kw["prefix_len"]
        Ps = P if isinstance(P, (list, tuple)) else [P] * B
        return torch.stack([prefix_mask(p, Nq, Nkv) for p in Ps])[:, None]
    cu = kw["cu_seqlens"]
    rows = cu if isinstance(cu[0], (list, tuple)) else [cu] * B
    return torch.stack([doc_mask(list(r), Nq, kw.get("causal", False), kw.get("sliding_window")) for r in rows])[:, None]


# ---------------------------------------------------------------------------------------------- layouts, bit for bit
LAYOUT_CASES = [  # (cu_seqlens rows, Nq, causal, window, bm, bn)
    ([[0, 1]], 1, True, None, 64, 64),
    ([[0, 5, 70, 71, 191]], 191, True, None, 64, 64),
    ([[0, 5, 70, 71, 191]], 191, False, None, 16, 32),
    ([[0, 5, 70, 71, 191], [0, 100, 191], [0, 191]], 191, True, None, 64, 128),
    ([[0, 64, 128, 192, 300]], 300, True, None, 64, 64),  # documents on block boundaries
    ([[0, 1, 2, 3, 4, 150]], 37, True, None, 16, 16),  # single-token documents, a chunk of queries
    ([[0, 40, 170, 300]], 300, True, 33, 64, 32),  # a window inside each document
    ([[0, 40, 170, 300], [0, 299, 300]], 100, False, None, 128, 64),
]


@pytest.mark.parametrize("rows,Nq,causal,W,bm,bn", LAYOUT_CASES)
def test_document_layout_is_exactly_the_blocks_holding_allowed_pairs(rows, Nq, causal, W, bm, bn):
    cu = rows[0] if len(rows) == 1 else rows
    lay, b = document_layout(cu, seqlen_q=Nq, block_m=bm, block_n=bn, heads=3, causal=causal, sliding_window=W)
    want = block_reduce(torch.stack([doc_mask(r, Nq, causal, W) for r in rows]), bm, bn)  # [Bb, Mb, Nb]
    got = lay.to_dense_mask()
    assert tuple(got.shape) == (len(rows), 3, *want.shape[1:])
    assert torch.equal(got, want[:, None].expand_as(got))
    assert lay.kv_indices.stride(1) == 0  # shared by the heads
    # the bounds are the mask, row by row
    j = torch.arange(rows[0][-1])
    elem = (j >= b.lo[..., None]) & (j <= b.hi[..., None])
    if causal:
        elem = elem & (j <= torch.arange(Nq)[:, None] + rows[0][-1] - Nq)
    assert torch.equal(elem, torch.stack([doc_mask(r, Nq, causal, W) for r in rows]))
    # document ids (runs of equal ids) give the same bounds and layout
    ids = torch.stack([torch.repeat_interleave(torch.arange(len(r) - 1) * 7 % 3, torch.tensor(r).diff()) for r in rows])
    lay2, b2 = document_layout(document_ids=ids, seqlen_q=Nq, block_m=bm, block_n=bn, heads=3, causal=causal,
                               sliding_window=W)
    assert torch.equal(b.lo, b2.lo) and torch.equal(b.hi, b2.hi)
    assert torch.equal(lay2.to_dense_mask(), got)


@pytest.mark.parametrize("P,Nq,Nkv,bm,bn", [
    (0, 191, 191, 64, 64), (1, 191, 191, 64, 64), (70, 191, 191, 64, 64), (191, 191, 191, 64, 128),
    (130, 50, 300, 16, 64), ([0, 64, 200], 200, 200, 64, 32),
])
def test_prefix_lm_layout_is_exactly_the_blocks_holding_allowed_pairs(P, Nq, Nkv, bm, bn):
    lay, b = prefix_lm_layout(P, Nq, Nkv, block_m=bm, block_n=bn, heads=2)
    Ps = P if isinstance(P, list) else [P]
    masks = torch.stack([prefix_mask(p, Nq, Nkv) for p in Ps])
    assert torch.equal(lay.to_dense_mask(), block_reduce(masks, bm, bn)[:, None].expand(len(Ps), 2, -1, -1))
    j = torch.arange(Nkv)
    assert torch.equal((j >= b.lo[..., None]) & (j <= b.hi[..., None]), masks)


def test_row_bounds_layout_matches_block_reduction_on_random_bounds():
    """Arbitrary intervals (empty rows, negative / past-the-end values, causal on and off), batch 3."""
    gen = torch.Generator().manual_seed(11)
    Nq, Nkv = 150, 230
    lo = torch.randint(-20, Nkv + 20, (3, Nq), generator=gen)
    hi = lo + torch.randint(-30, 120, (3, Nq), generator=gen)
    j = torch.arange(Nkv)
    for causal in (False, True):
        lay = row_bounds_layout(RowBounds(lo, hi), Nq, Nkv, block_m=16, block_n=32, heads=2, causal=causal)
        m = (j >= lo[..., None]) & (j <= hi[..., None])
        if causal:
            m = m & (j <= torch.arange(Nq)[:, None] + Nkv - Nq)
        assert torch.equal(lay.to_dense_mask(), block_reduce(m, 16, 32)[:, None].expand(3, 2, -1, -1))


def test_non_contiguous_ids_are_runs():
    """A document is a maximal run of equal consecutive ids: ``[0, 0, 1, 1, 0, 0]`` is three documents."""
    ids = torch.tensor([0, 0, 1, 1, 0, 0])
    b = document_row_bounds(document_ids=ids)
    assert b.lo.tolist() == [[0, 0, 2, 2, 4, 4]] and b.hi.tolist() == [[1, 1, 3, 3, 5, 5]]


def test_layout_from_document_ids_reads_no_value_on_the_host():
    ids = torch.repeat_interleave(torch.arange(5), torch.tensor([100, 1, 50, 300, 61]))[None].expand(2, -1)
    with CountOps() as c:
        b = document_row_bounds(document_ids=ids, seqlen_q=400)
        row_bounds_layout(b, 400, 512, block_m=64, block_n=64, heads=4, causal=True)
    assert c.ops["aten._local_scalar_dense.default"] == 0, c.ops


# ---------------------------------------------------------------------------------------------- the reference
REF_CASES = [  # attention() keywords, B, H, Hkv, Nq
    (dict(causal=True, cu_seqlens=[0, 5, 70, 71, 191]), 1, 2, 1, 191),
    (dict(causal=False, cu_seqlens=[[0, 5, 70, 71, 191], [0, 100, 191]]), 2, 4, 2, 191),
    (dict(causal=True, cu_seqlens=[[0, 1, 2, 3, 191], [0, 190, 191]]), 2, 2, 2, 64),
    (dict(causal=True, cu_seqlens=[0, 50, 191], sliding_window=17), 1, 2, 1, 191),
    (dict(causal=True, prefix_len=70), 1, 2, 1, 191),
    (dict(causal=True, prefix_len=[3, 191]), 2, 2, 1, 100),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kw,B,H,Hkv,Nq", REF_CASES)
def test_reference_matches_dense_judge(kw, B, H, Hkv, Nq, dtype, request):
    gen = torch.Generator().manual_seed(_seed(request))
    q, k, v = (t.cpu() for t in _qkv(B, H, Hkv, Nq, 191, 16, dtype, gen))
    out, lse = attention(q, k, v, backend="reference", **kw)
    jo, jl = judge(q, k, v, _mask_of(kw, B, Nq, 191))
    tol = SDPA_FP64_ATOL if dtype == torch.float64 else ATOL_FLOOR[torch.float32]
    torch.testing.assert_close(out.double(), jo, atol=tol, rtol=0)
    torch.testing.assert_close(lse.double(), jl, atol=tol, rtol=0)


# ---------------------------------------------------------------------------------------------- kernel parity
def _fwd(*args, **kwargs):
    from sparseattn.ops.triton_launch import block_sparse_fwd

    return block_sparse_fwd(*args, **kwargs)


def _check_kernel(q, k, v, got, **kw) -> None:
    hi_dtype = torch.float32 if ON_GPU else torch.float64
    hi = attention(q.to(hi_dtype), k.to(hi_dtype), v.to(hi_dtype), backend="reference", **kw)
    lo = reference_attention(q, k, v, upcast=False, **_as_reference(q, kw))
    check_ratio(got.out, hi.out, lo.out, "out")
    check_ratio(got.lse, hi.lse, lo.lse, "lse")


def _as_reference(q, kw: dict) -> dict:
    """attention()'s structured-mask keywords as reference_attention's (layout, causal, row_bounds)."""
    from sparseattn.ops.attention import _exact_mask

    B, H, Nq = q.shape[:3]
    Nkv = kw.get("_Nkv", Nq)
    layout, bounds, causal, W = _exact_mask(
        "test", B, H, Nq, Nkv, q.device, causal=kw.get("causal", False), layout=kw.get("layout"),
        sliding_window=kw.get("sliding_window"), pv_threshold=None, cu_seqlens=kw.get("cu_seqlens"),
        document_ids=kw.get("document_ids"), prefix_len=kw.get("prefix_len"))
    return dict(layout=layout, causal=causal, row_bounds=bounds, sliding_window=W)


KERNEL_CASES = {  # (B, H, Hkv, N, dtype, attention keywords)
    "one-token": (1, 2, 1, 1, torch.float16, dict(causal=True, cu_seqlens=[0, 1])),
    "docs-causal-gqa2": (1, 4, 2, 191, torch.float16, dict(causal=True, cu_seqlens=[0, 5, 70, 71, 191])),
    "docs-bidir-batch2": (2, 4, 2, 191, torch.float16,
                          dict(causal=False, cu_seqlens=[[0, 5, 70, 71, 191], [0, 100, 191]])),
    "single-token-docs-bf16-gqa4": (2, 4, 1, 150, torch.bfloat16,
                                    dict(causal=True, cu_seqlens=[[0, 1, 2, 3, 4, 150], [0, 149, 150]])),
    "docs-on-blocks": (1, 2, 1, 300, torch.float16, dict(causal=True, cu_seqlens=[0, 128, 256, 300])),
    "docs-window": (1, 2, 1, 300, torch.float16, dict(causal=True, cu_seqlens=[0, 40, 170, 300], sliding_window=33)),
    "document-ids": (2, 2, 1, 191, torch.float16,
                     dict(causal=True, document_ids=torch.repeat_interleave(torch.tensor([[0], [3]]) + torch.tensor(
                         [0] * 60 + [1] * 131)[None], 1, 0))),
    "prefix": (1, 4, 2, 191, torch.float16, dict(causal=True, prefix_len=70)),
    "prefix-batch-bf16": (2, 2, 1, 191, torch.bfloat16, dict(causal=True, prefix_len=[130, 5])),
}


@needs_kernel
@pytest.mark.parametrize("case", list(KERNEL_CASES), ids=list(KERNEL_CASES))
def test_kernel_matches_reference(case, request):
    B, H, Hkv, N, dtype, kw = KERNEL_CASES[case]
    if "document_ids" in kw:
        kw = {**kw, "document_ids": kw["document_ids"].to(DEV)}
    gen = torch.Generator().manual_seed(_seed(request))
    q, k, v = _qkv(B, H, Hkv, N, N, 64, dtype, gen)
    got = attention(q, k, v, backend="triton", **kw)
    _check_kernel(q, k, v, got, **kw)


@needs_kernel
@pytest.mark.parametrize("cfg", [
    C64,
    {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1},  # sub-tiles of the 128-blocks
    {**C64, "VEC_COUNT": False, "PREFETCH": False},  # binary-search prologue
    {**C64, "LIST_CHUNK": 16},
], ids=["c64", "subtiles", "binsearch", "chunk16"])
def test_kernel_configs_with_chunked_queries(cfg, request):
    """N_q < N_kv (a chunk of queries over a longer cache): bounds in key coordinates, one layout per batch row."""
    gen = torch.Generator().manual_seed(_seed(request))
    Nq, Nkv = 100, 1300
    q, k, v = _qkv(2, 2, 1, Nq, Nkv, 64, torch.float16, gen)
    bm = 128 if cfg["BLOCK_N"] == 32 else 64
    lay, b = document_layout([[0, 300, 1250, 1300], [0, 1210, 1300]], seqlen_q=Nq, block_m=bm, block_n=bm, heads=2)
    lay, b = lay.to(DEV), RowBounds(b.lo.to(DEV), b.hi.to(DEV))
    if cfg.get("LIST_CHUNK") == 16:  # bidirectional documents: long lists, several chunks in the prologue
        lay, b = document_layout([[0, 1250, 1300], [0, 1210, 1300]], seqlen_q=Nq, block_m=64, block_n=64, heads=2,
                                 causal=False)
        lay, b = lay.to(DEV), RowBounds(b.lo.to(DEV), b.hi.to(DEV))
        assert int(lay.kv_num_blocks.max()) > 16
    causal = cfg.get("LIST_CHUNK") != 16
    got = _fwd(q, k, v, layout=lay, causal=causal, row_bounds=b, config=cfg)
    hi = reference_attention(q.double() if not ON_GPU else q.float(), k.double() if not ON_GPU else k.float(),
                             v.double() if not ON_GPU else v.float(), layout=lay, causal=causal, row_bounds=b)
    lo = reference_attention(q, k, v, layout=lay, causal=causal, row_bounds=b, upcast=False)
    check_ratio(got.out, hi.out, lo.out)
    check_ratio(got.lse, hi.lse, lo.lse, "lse")


@needs_kernel
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kernel_on_random_intervals_and_layouts(seed, causal):
    """Arbitrary per-row intervals (empty, negative, past the end, straddling blocks) on a random layout, with
    64-row tiles over 128-blocks and 32-key sub-tiles: every range of the split is exercised."""
    gen = torch.Generator().manual_seed(100 + seed)
    Nq, Nkv = 150, 301
    q, k, v = _qkv(2, 4, 2, Nq, Nkv, 64, torch.float16, gen)
    lo = torch.randint(-10, Nkv, (2, Nq), generator=gen)
    hi = lo + torch.randint(-5, 200, (2, Nq), generator=gen)
    if seed == 2:  # smooth, document-like bounds: long full ranges
        lo = (torch.arange(Nq) // 40 * 40 + Nkv - Nq).repeat(2, 1) - torch.tensor([[0], [37]])
        hi = lo + 90
    b = RowBounds(lo.to(DEV), hi.to(DEV))
    lay = random_layout(Nq, Nkv, density=0.8, seed=seed, block_m=128, block_n=128, batch=2, heads=4, causal=causal,
                        device=DEV)
    cfg = {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
    got = _fwd(q, k, v, layout=lay, causal=causal, row_bounds=b, config=cfg)
    _check_kernel_rb(q, k, v, got, lay, b, causal=causal)
    j = torch.arange(Nkv)
    m = (j >= lo[..., None]) & (j <= hi[..., None])
    if causal:
        m = m & (j <= torch.arange(Nq)[:, None] + Nkv - Nq)
    m = m[:, None] & lay.element_mask().cpu()
    assert torch.equal(torch.isneginf(got.lse.cpu()), ~m.any(-1))


@needs_kernel
def test_documents_with_float_mask_and_chunked_prefix(request):
    gen = torch.Generator().manual_seed(_seed(request))
    N = 191
    q, k, v = _qkv(1, 2, 1, N, N, 64, torch.float16, gen)
    bias = torch.randn(1, 2, N, N, generator=gen).to(DEV)
    bias[..., 10:20] = -math.inf
    kw = dict(causal=True, cu_seqlens=[0, 60, N], attn_mask=bias)
    got = attention(q, k, v, backend="triton", **kw)
    hi = attention(q.double(), k.double(), v.double(), backend="reference", **kw)
    lo = reference_attention(q, k, v, upcast=False, attn_mask=bias, **_as_reference(q, kw))
    check_ratio(got.out, hi.out, lo.out)
    check_ratio(got.lse, hi.lse, lo.lse, "lse")
    # a chunk of 50 queries over 191 keys with a prefix of 160: the first rows see the whole prefix
    qc = q[:, :, -50:]
    kw = dict(causal=True, prefix_len=160, _Nkv=N)
    got = attention(qc, k, v, backend="triton", causal=True, prefix_len=160)
    hi = attention(qc.double(), k.double(), v.double(), backend="reference", causal=True, prefix_len=160)
    jo, jl = judge(qc, k, v, prefix_mask(160, 50, N))
    torch.testing.assert_close(hi.out.cpu(), jo, atol=SDPA_FP64_ATOL, rtol=0)
    lo = reference_attention(qc, k, v, upcast=False, **_as_reference(qc, kw))
    check_ratio(got.out, hi.out, lo.out)
    check_ratio(got.lse, hi.lse, lo.lse, "lse")


@needs_kernel
def test_user_layout_is_intersected(request):
    gen = torch.Generator().manual_seed(_seed(request))
    N, H = 191, 4
    q, k, v = _qkv(1, H, 2, N, N, 64, torch.float16, gen)
    user = random_layout(N, N, density=0.6, seed=5, block_m=64, block_n=64, heads=H, causal=True, device=DEV)
    kw = dict(causal=True, cu_seqlens=[0, 50, 120, 191], layout=user)
    got = attention(q, k, v, backend="triton", **kw)
    _check_kernel(q, k, v, got, **kw)
    mask = _mask_of(kw, 1, N, N) & user.element_mask(causal=True).cpu()
    assert torch.equal(torch.isneginf(got.lse.cpu()), ~mask.expand(1, H, N, N).any(-1))
    run = _as_reference(q, kw)["layout"]
    assert not bool((run.to_dense_mask() & ~user.to_dense_mask()).any())  # never more than the user selected


@needs_kernel
def test_one_document_is_the_causal_kernel_bitwise(request, monkeypatch):
    monkeypatch.setenv("SPARSEATTN_TRITON_AUTOTUNE", "0")  # one launch config on both sides (see below)
    gen = torch.Generator().manual_seed(_seed(request))
    for Nq, Nkv in ((191, 191), (70, 191)):
        q, k, v = _qkv(2, 4, 2, Nq, Nkv, 64, torch.float16, gen)
        a = attention(q, k, v, causal=True, cu_seqlens=[0, Nkv], backend="triton")
        b = attention(q, k, v, causal=True, backend="triton")
        assert torch.equal(a.out, b.out) and torch.equal(a.lse, b.lse)


@needs_kernel
def test_prefix_zero_is_causal_and_prefix_n_is_full_bitwise(request, monkeypatch):
    # bitwise only with one launch config on both sides: on a GPU the autotuner tunes the row-bounds key and the
    # plain key separately and may pick other tiles (another summation order)
    monkeypatch.setenv("SPARSEATTN_TRITON_AUTOTUNE", "0")
    gen = torch.Generator().manual_seed(_seed(request))
    N = 191
    q, k, v = _qkv(1, 2, 1, N, N, 64, torch.float16, gen)
    causal = attention(q, k, v, causal=True, backend="triton")
    full = attention(q, k, v, causal=False, backend="triton")
    for P, want in ((0, causal), (1, causal), (N, full)):
        got = attention(q, k, v, causal=True, prefix_len=P, backend="triton")
        assert torch.equal(got.out, want.out) and torch.equal(got.lse, want.lse), P


@needs_kernel
def test_empty_rows(request):
    """Rows whose interval is empty (lo > hi) or misses every selected block: out 0, lse -inf, kernel and reference."""
    gen = torch.Generator().manual_seed(_seed(request))
    N = 191
    q, k, v = _qkv(2, 2, 1, N, N, 64, torch.float16, gen)
    lo = torch.zeros(2, N, dtype=torch.int32)
    hi = torch.arange(N, dtype=torch.int32).repeat(2, 1)
    hi[0, 10:30] = -1  # empty interval
    lo[1, 100:191] = 150  # rows 100..149 of batch 1: lo above the diagonal -> nothing causal
    b = RowBounds(lo.to(DEV), hi.to(DEV))
    lay = row_bounds_layout(b, N, N, block_m=64, block_n=64, heads=2, causal=True)
    j = torch.arange(N)
    want_empty = ~(((j >= lo[..., None]) & (j <= hi[..., None]) & (j <= torch.arange(N)[:, None])).any(-1))
    assert int(want_empty.sum()) == 20 + 50
    for layout in (lay, None):
        got = _fwd(q, k, v, layout=layout, causal=True, row_bounds=b, config=C64 if layout is not None else None)
        ref = reference_attention(q, k, v, layout=layout, causal=True, row_bounds=b)
        for o, l in ((got.out, got.lse), (ref.out, ref.lse)):
            e = want_empty[:, None].expand(2, 2, N)
            assert torch.equal(torch.isneginf(l.cpu()), e)
            assert bool((o.cpu()[e] == 0).all())
        _check_kernel_rb(q, k, v, got, layout, b)
    # a user layout that misses a document's blocks leaves its rows empty through attention() too
    user = BlockLayout.from_dense_mask(torch.tensor([[[[True, False, False]] * 3] * 2]), block_m=64, block_n=64,
                                       seqlen_q=N, seqlen_kv=N).to(DEV)  # key block 0 only
    got = attention(q[:1], k[:1], v[:1], causal=False, cu_seqlens=[0, 100, N], layout=user, backend="triton")
    assert bool(torch.isneginf(got.lse[0, :, 100:]).all()) and bool((got.out[0, :, 100:] == 0).all())
    assert bool(torch.isfinite(got.lse[0, :, :100]).all())


def _check_kernel_rb(q, k, v, got, layout, b, causal=True):
    hi_dtype = torch.float32 if ON_GPU else torch.float64
    hi = reference_attention(q.to(hi_dtype), k.to(hi_dtype), v.to(hi_dtype), layout=layout, causal=causal, row_bounds=b)
    lo = reference_attention(q, k, v, layout=layout, causal=causal, row_bounds=b, upcast=False)
    check_ratio(got.out, hi.out, lo.out)
    check_ratio(got.lse, hi.lse, lo.lse, "lse")


@needs_kernel
def test_nan_key_stays_in_its_document(request):
    """A NaN key reaches exactly the rows of its document that attend it (causal): never another document."""
    gen = torch.Generator().manual_seed(_seed(request))
    N, j = 191, 75
    cu = [0, 70, 130, N]
    q, k, v = _qkv(1, 4, 2, N, N, 64, torch.float16, gen)
    k[0, 0, j, 3] = math.nan
    want = torch.zeros(1, 4, N, dtype=torch.bool)
    want[:, :2] = doc_mask(cu, N, True)[:, j]  # kv head 0 serves q heads 0, 1
    for run in (lambda: attention(q, k, v, causal=True, cu_seqlens=cu, backend="triton"),
                lambda: attention(q, k, v, causal=True, cu_seqlens=cu, backend="reference")):
        out, lse = run()
        assert torch.equal(torch.isnan(out.cpu()).any(-1), want)
        assert torch.equal(torch.isnan(lse.cpu()), want)


@needs_kernel
def test_nonfinite_v_reaches_its_document_and_only_tiles_loading_it(request):
    """``v[j, d]`` NaN: channel ``d`` of every row attending ``j`` (exact in the reference); in the kernel also, by
    the documented P·V exception, rows of a query tile that loads ``j``'s key tile in a masked range. Rows whose
    query tile never loads it (here: rows 128.., a document starting at key 128, so key block 0 is not in their
    list) and other channels stay clean."""
    gen = torch.Generator().manual_seed(_seed(request))
    N, j, d = 250, 20, 5
    cu = [0, 40, 128, N]
    q, k, v = _qkv(1, 2, 1, N, N, 64, torch.float16, gen)
    v[0, 0, j, d] = math.nan
    attends = doc_mask(cu, N, True)[:, j]
    ref = attention(q, k, v, causal=True, cu_seqlens=cu, backend="reference")
    assert torch.equal(torch.isnan(ref.out.cpu())[0, :, :, d], attends[None].expand(2, N))
    out = attention(q, k, v, causal=True, cu_seqlens=cu, backend="triton").out.cpu()[0]
    bad = torch.isnan(out[:, :, d])
    assert bool(bad[:, attends].all())
    assert not bool(bad[:, 128:].any())  # the third document's query tiles never load key block 0
    assert not bool(torch.isnan(out[..., :d]).any()) and not bool(torch.isnan(out[..., d + 1:]).any())


@needs_kernel
def test_attention_row_bounds_is_the_general_form(request):
    """``attention(row_bounds=...)`` (bounds built on the device, e.g. by an integration) gives bitwise what the
    host spec gives; a window folds into it the same way."""
    gen = torch.Generator().manual_seed(_seed(request))
    N = 191
    q, k, v = _qkv(2, 4, 2, N, N, 64, torch.float16, gen)
    cu = [[0, 5, 70, 71, N], [0, 100, N]]
    for W in (None, 20):
        b = document_row_bounds(cu, sliding_window=W, device=DEV)
        b_nowin = document_row_bounds(cu, device=DEV)
        for backend in ("triton", "reference"):
            a = attention(q, k, v, causal=True, cu_seqlens=cu, sliding_window=W, backend=backend)
            c = attention(q, k, v, causal=True, row_bounds=b, backend=backend)
            d = attention(q, k, v, causal=True, row_bounds=b_nowin, sliding_window=W, backend=backend)
            for x in (c, d):
                assert torch.equal(a.out, x.out) and torch.equal(a.lse, x.lse), (W, backend)


# ---------------------------------------------------------------------------------------------- cache
def test_exact_layout_is_built_once_per_spec():
    import sys

    mod = sys.modules["sparseattn.ops.attention"]  # the module (the package attribute is the function)
    gen = torch.Generator().manual_seed(3)
    q, k, v = (t.cpu() for t in _qkv(2, 2, 1, 100, 100, 16, torch.float64, gen))
    mod._EXACT.clear()
    a = mod._exact_mask("t", 2, 2, 100, 100, q.device, causal=True, layout=None, sliding_window=None, pv_threshold=None,
                        cu_seqlens=[0, 30, 100], document_ids=None, prefix_len=None)
    b = mod._exact_mask("t", 2, 2, 100, 100, q.device, causal=True, layout=None, sliding_window=None, pv_threshold=None,
                        cu_seqlens=torch.tensor([0, 30, 100]), document_ids=None, prefix_len=None)
    assert len(mod._EXACT) == 1
    assert a[0].kv_indices.data_ptr() == b[0].kv_indices.data_ptr() and a[1].lo.data_ptr() == b[1].lo.data_ptr()
    assert a[0].kv_indices.stride(0) == 0 and a[0].kv_indices.stride(1) == 0  # shared by batch and heads
    mod._exact_mask("t", 2, 2, 100, 100, q.device, causal=False, layout=None, sliding_window=None, pv_threshold=None,
                    cu_seqlens=[0, 30, 100], document_ids=None, prefix_len=None)
    assert len(mod._EXACT) == 2


# ---------------------------------------------------------------------------------------------- bad inputs
def _cpu_qkv(B=1, N=64, Nkv=None):
    gen = torch.Generator().manual_seed(0)
    Nkv = N if Nkv is None else Nkv
    return (torch.randn(B, 2, N, 16, generator=gen), torch.randn(B, 1, Nkv, 16, generator=gen),
            torch.randn(B, 1, Nkv, 16, generator=gen))


BAD = [  # (keywords, B, N, Nkv, message fragment)
    (dict(causal=True, cu_seqlens=[1, 64]), 1, 64, 64, "attention: cu_seqlens must start at 0; expected cu_seqlens[0] == 0, got 1"),
    (dict(causal=True, cu_seqlens=[0, 30, 30, 64]), 1, 64, 64, "attention: cu_seqlens must be strictly increasing"),
    (dict(causal=True, cu_seqlens=[0, 40, 30, 64]), 1, 64, 64, "got cu_seqlens[1:3] = [40, 30]"),
    (dict(causal=True, cu_seqlens=[0, 63]), 1, 64, 64, "attention: cu_seqlens must end at the key length; expected cu_seqlens[-1] == N_kv == 64, got 63"),
    (dict(causal=True, cu_seqlens=[[0, 64], [0, 10, 60]]), 2, 64, 64, "attention: cu_seqlens[1] must end at the key length"),
    (dict(causal=True, cu_seqlens=[[0, 64], [0, 64], [0, 64]]), 2, 64, 64, "must give one split or one per batch row; expected 1 or 2 rows, got 3"),
    (dict(causal=True, cu_seqlens=torch.tensor([0.0, 64.0])), 1, 64, 64, "attention: cu_seqlens must hold integers"),
    (dict(causal=True, cu_seqlens=torch.tensor([0, 64], device="meta")), 1, 64, 64, "attention: cu_seqlens must be host data"),
    (dict(causal=True, cu_seqlens=[0, 32.0, 64]), 1, 64, 64, "attention: cu_seqlens must be a sequence of at least two ints"),
    (dict(causal=True, cu_seqlens=[0, 64], document_ids=torch.zeros(64, dtype=torch.long)), 1, 64, 64,
     "attention: cu_seqlens/document_ids are mutually exclusive"),
    (dict(causal=True, document_ids=torch.zeros(64)), 1, 64, 64, "document_ids must hold integers"),
    (dict(causal=True, document_ids=torch.zeros(63, dtype=torch.long)), 1, 64, 64,
     "attention: document_ids has the wrong shape; expected [N_kv] or [B|1, N_kv] = [1|1, 64], got (63,)"),
    (dict(causal=True, document_ids=torch.zeros(3, 64, dtype=torch.long)), 2, 64, 64, "document_ids has the wrong shape"),
    (dict(causal=True, document_ids=torch.zeros(64, dtype=torch.long, device="meta")), 1, 64, 64,
     "attention: document_ids is on another device than q"),
    (dict(causal=True, prefix_len=65), 1, 64, 64, "attention: prefix_len is out of range; expected an int in [0, N_kv] = [0, 64], got 65"),
    (dict(causal=True, prefix_len=-1), 1, 64, 64, "prefix_len is out of range"),
    (dict(causal=True, prefix_len=True), 1, 64, 64, "attention: prefix_len must be an int or a sequence of ints"),
    (dict(causal=True, prefix_len=[3, 4, 5]), 2, 64, 64, "prefix_len must give one value or one per batch row"),
    (dict(causal=False, prefix_len=8), 1, 64, 64, "attention: prefix_len needs causal=True"),
    (dict(causal=True, prefix_len=8, sliding_window=4), 1, 64, 64, "attention: prefix_len cannot be combined with sliding_window"),
    (dict(causal=True, prefix_len=8, cu_seqlens=[0, 64]), 1, 64, 64, "attention: prefix_len cannot be combined with cu_seqlens/document_ids"),
    (dict(causal=True, cu_seqlens=[0, 64], pv_threshold=1.0, layout=random_layout(64, 64, heads=2)), 1, 64, 64, "attention: pv_threshold is not supported with cu_seqlens"),
    (dict(causal=True, cu_seqlens=[0, 64], quant="int8"), 1, 64, 64, "attention: quant cannot be combined with cu_seqlens/document_ids/prefix_len"),
    (dict(causal=True, cu_seqlens=[0, 32]), 1, 64, 32, "attention: cu_seqlens needs N_q <= N_kv"),
    (dict(causal=True, cu_seqlens=[0, 64], row_bounds=(torch.zeros(64, dtype=torch.int32),) * 2), 1, 64, 64,
     "attention: row_bounds cannot be combined with cu_seqlens/document_ids/prefix_len"),
    (dict(causal=True, row_bounds=(torch.zeros(64), torch.zeros(64))), 1, 64, 64,
     "attention: row_bounds.lo must hold integer key indices"),
    (dict(causal=True, row_bounds=(torch.zeros(64, dtype=torch.int32),) * 2, pv_threshold=1.0,
          layout=random_layout(64, 64, heads=2)), 1, 64, 64, "attention: pv_threshold is not supported with row_bounds"),
]


@pytest.mark.parametrize("kw,B,N,Nkv,msg", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_arguments(kw, B, N, Nkv, msg):
    q, k, v = _cpu_qkv(B, N, Nkv)
    with pytest.raises(ValueError) as ei:
        attention(q, k, v, backend="reference", **kw)
    assert msg in str(ei.value), str(ei.value)


def test_bad_row_bounds():
    from sparseattn.ops.triton_launch import block_sparse_fwd

    q, k, v = _cpu_qkv(1, 64)
    good = torch.zeros(1, 64, dtype=torch.int32)
    cases = [
        ((good.float(), good), "reference_attention: row_bounds.lo must hold integer key indices; expected int32 or int64, got float32"),
        ((good, good[:, :10]), "reference_attention: row_bounds.hi has the wrong shape"),
        (good, "reference_attention: row_bounds must be a RowBounds (lo, hi) pair of tensors"),
        ((good, torch.zeros(2, 64, dtype=torch.int32)), "row_bounds.hi has the wrong shape"),
    ]
    for rb, msg in cases:
        with pytest.raises(ValueError) as ei:
            reference_attention(q, k, v, row_bounds=rb)
        assert msg in str(ei.value), str(ei.value)
    with pytest.raises(ValueError, match="reference_attention: pv_threshold is not supported with row_bounds"):
        reference_attention(q, k, v, row_bounds=(good, good), pv_threshold=1.0,
                            layout=random_layout(64, 64, heads=2, device="cpu"))
    if kernel_unavailable() is None:
        qh, kh, vh = (t.half().to(DEV).repeat(1, 1, 1, 4) for t in (q, k, v))
        with pytest.raises(ValueError, match="block_sparse_fwd: pv_threshold is not supported with row_bounds"):
            block_sparse_fwd(qh, kh, vh, layout=random_layout(64, 64, heads=2, device=DEV),
                             row_bounds=(good.to(DEV), good.to(DEV)), pv_threshold=1.0)
        with pytest.raises(ValueError, match="block_sparse_fwd: row_bounds are not supported on the state path"):
            block_sparse_fwd(qh, kh, vh, layout=None, row_bounds=(good.to(DEV), good.to(DEV)), return_state=True)


def test_document_ids_layout_is_cached_per_tensor_and_version():
    """document_ids (a device tensor) builds its exact layout once per tensor object and version: the same ids
    again reuse it; an in-place change bumps the version and is seen."""
    from sparseattn import attention
    from sparseattn.testing.inputs import random_qkv

    q, k, v = random_qkv(1, 2, 100, 16, kv_heads=1, dtype=torch.float32, seed=11)
    ids = torch.tensor([0] * 40 + [1] * 60)
    a = attention(q, k, v, causal=True, document_ids=ids, backend="reference")
    b = attention(q, k, v, causal=True, document_ids=ids, backend="reference")
    assert torch.equal(a.out, b.out)
    ids[40:70] = 0  # in place: the first document now ends at 70
    c = attention(q, k, v, causal=True, document_ids=ids, backend="reference")
    fresh = attention(q, k, v, causal=True, document_ids=ids.clone(), backend="reference")
    assert torch.equal(c.out, fresh.out) and not torch.equal(c.out, a.out)
