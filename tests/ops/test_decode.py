"""Decode attention (``sparseattn.ops.decode``): reference, Triton kernels, Quest-style sparse decode.

The reference is checked against float64 SDPA with an explicit mask; the kernels (under Triton's CPU
interpreter without CUDA, as in ``tests/ops/test_block_sparse_triton.py``) against the reference by the ratio
rule on fresh random inputs; sparse decode against the reference restricted to the selected pages.
"""

from __future__ import annotations

import math

import pytest
import torch

from sparseattn.ops.decode import (
    decode_attention,
    decode_num_splits,
    decode_reference,
    pages_key_mask,
    paged_decode_attention,
)
from sparseattn.ops.pages import (
    page_summaries,
    PageSummaries,
    select_pages,
    sparse_decode_attention,
    update_page_summaries,
)
from sparseattn.testing.harness import CountOps, kernel_unavailable, node_generator
from sparseattn.testing.tolerances import (
    DECODE_PAGE_BOUND_TIE_REL,
    DECODE_SPLITS_ATOL,
    FP64_ATOL,
    SDPA_FP64_ATOL,
    check_ratio,
)

ON_GPU = torch.cuda.is_available()
DEV = "cuda" if ON_GPU else "cpu"

needs_kernel = pytest.mark.skipif(kernel_unavailable() is not None, reason=str(kernel_unavailable()))
_gen = node_generator


def _inputs(B, H, Hkv, Lq, N, D, dtype, gen, spread=1.0):
    def r(*shape):
        return (torch.randn(*shape, generator=gen) * spread).to(dtype).to(DEV)

    return r(B, H, Lq, D), r(B, Hkv, N, D), r(B, Hkv, N, D)


def _refs(q, k, v, seqlens=None, scale=None, key_mask=None):
    hi_dtype = torch.float32 if ON_GPU else torch.float64
    hi = decode_reference(q.to(hi_dtype), k.to(hi_dtype), v.to(hi_dtype), seqlens=seqlens, scale=scale, key_mask=key_mask)
    lo = decode_reference(q, k, v, seqlens=seqlens, scale=scale, key_mask=key_mask, upcast=False)
    return hi, lo


def _check(st, q, k, v, seqlens=None, scale=None, key_mask=None):
    hi, lo = _refs(q, k, v, seqlens, scale, key_mask)
    check_ratio(st.out, hi.out, lo.out, "out")
    check_ratio(st.lse, hi.lse, lo.lse, "lse")


def _assert_close(a, b, tol, what):
    """Same infinities, finite entries within ``tol`` (two kernel results of one function)."""
    fa, fb = torch.isfinite(a), torch.isfinite(b)
    assert torch.equal(fa, fb), f"{what}: different non-finite entries"
    assert torch.equal(a[~fa], b[~fb]), f"{what}: different infinities"
    if bool(fa.any()):
        err = float((a[fa].double() - b[fb].double()).abs().max())
        assert err <= tol, f"{what}: max difference {err:.3e} > {tol:.3e}"


def _lens(vals):
    return torch.tensor(vals, dtype=torch.int32, device=DEV)


# ---------------------------------------------------------------------------------------------- reference


@pytest.mark.parametrize("Lq,G", [(1, 1), (1, 4), (5, 2)])
def test_reference_matches_fp64_sdpa(Lq, G, request):
    """decode_reference == fp64 SDPA with the explicit (seqlen, causal-among-new-tokens) mask."""
    gen = _gen(request)
    B, Hkv, N, D = 4, 2, 37, 16
    H = Hkv * G
    q, k, v = (t.cpu() for t in _inputs(B, H, Hkv, Lq, N, D, torch.float64, gen))
    lens = [0, 1, 20, 37] if Lq == 1 else [0, 3, 20, 37]  # 3 < Lq: the first new tokens see nothing
    sl = torch.tensor(lens, dtype=torch.int32)
    st = decode_reference(q, k, v, seqlens=sl)
    assert st.out.dtype == torch.float64 and st.lse.dtype == torch.float64
    mask = torch.zeros(B, H, Lq, N, dtype=torch.bool)
    for b in range(B):
        for i in range(Lq):
            mask[b, :, i, : max(lens[b] - Lq + i + 1, 0)] = True
    kk, vv = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)
    s = (q @ kk.transpose(-1, -2)) * D ** -0.5
    lse = torch.logsumexp(s.masked_fill(~mask, -math.inf), -1)
    has = mask.any(-1)
    assert torch.allclose(st.out[has], sdpa[has], atol=SDPA_FP64_ATOL, rtol=0)
    assert torch.allclose(st.lse[has], lse[has], atol=SDPA_FP64_ATOL, rtol=0)
    assert bool((st.out[~has] == 0).all()) and bool(torch.isneginf(st.lse[~has]).all())
    assert int((~has).sum()) > 0


def test_reference_key_mask_restricts_keys(request):
    """key_mask = the listed pages: same as attending a cache that holds only those keys."""
    gen = _gen(request)
    B, H, Hkv, Lq, N, D = 1, 2, 1, 1, 40, 8
    q, k, v = (t.cpu() for t in _inputs(B, H, Hkv, Lq, N, D, torch.float64, gen))
    pidx = torch.tensor([[[0, 3, 4]]])
    mask = pages_key_mask(pidx, torch.tensor([[2]]), 8, N)
    assert mask.shape == (1, 1, 40) and int(mask.sum()) == 16 and bool(mask[0, 0, 24:32].all())
    st = decode_reference(q, k, v, key_mask=mask)
    keys = torch.cat([torch.arange(0, 8), torch.arange(24, 32)])
    want = decode_reference(q, k[:, :, keys], v[:, :, keys])
    assert torch.allclose(st.out, want.out, atol=FP64_ATOL) and torch.allclose(st.lse, want.lse, atol=FP64_ATOL)


# ---------------------------------------------------------------------------------------------- dense kernel


# (B, H, H_kv, Lq, N_max, D, dtype, seqlens or None, num_splits)
CASES = {
    "lq1-mha": (2, 2, 2, 1, 100, 64, torch.float16, None, 1),
    "lq1-gqa4-splits": (2, 8, 2, 1, 131, 64, torch.float16, [131, 77], 3),
    "lq1-lens-0-1": (4, 4, 1, 1, 97, 64, torch.float16, [0, 1, 50, 97], 2),
    "lq3-gqa4-odd": (3, 4, 1, 3, 123, 64, torch.float16, [2, 61, 123], 4),
    "lq16-gqa4-rows64": (1, 4, 1, 16, 90, 64, torch.float16, [90], 2),
    "lq64-mha": (1, 1, 1, 64, 150, 64, torch.float16, [150], 3),
    "lq8-gqa8-two-row-tiles": (1, 8, 1, 9, 70, 64, torch.float16, [70], 2),
    "bf16": (2, 4, 1, 2, 100, 64, torch.bfloat16, [33, 100], 2),
    "fp32": (2, 4, 2, 1, 80, 64, torch.float32, [80, 5], 2),
    "d128": (1, 4, 1, 1, 100, 128, torch.float16, [99], 2),
    "d256": (1, 2, 1, 2, 70, 256, torch.float16, [70], 2),
    "many-splits": (1, 2, 1, 1, 200, 64, torch.float16, [200], 9),
    "auto-splits": (1, 2, 1, 1, 600, 64, torch.float16, [600], None),
}


@needs_kernel
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_kernel_matches_reference(case, request):
    B, H, Hkv, Lq, N, D, dtype, lens, splits = CASES[case]
    q, k, v = _inputs(B, H, Hkv, Lq, N, D, dtype, _gen(request))
    sl = _lens(lens) if lens is not None else None
    st = decode_attention(q, k, v, seqlens=sl, num_splits=splits, return_lse=True, backend="triton")
    assert st.out.dtype == dtype and st.lse.dtype == torch.float32 and st.out.shape == q.shape
    _check(st, q, k, v, sl)
    if lens is not None:
        for b, n in enumerate(lens):
            if n < Lq:  # the first Lq - n tokens see no key
                assert bool((st.out[b, :, : Lq - n] == 0).all())
                assert bool(torch.isneginf(st.lse[b, :, : Lq - n]).all())


@needs_kernel
def test_out_only_and_scale(request):
    q, k, v = _inputs(2, 4, 2, 2, 90, 64, torch.float16, _gen(request))
    sl = _lens([90, 41])
    out = decode_attention(q, k, v, seqlens=sl, scale=0.3, num_splits=2, backend="triton")
    assert isinstance(out, torch.Tensor) and out.shape == q.shape
    st = decode_attention(q, k, v, seqlens=sl, scale=0.3, num_splits=2, backend="triton", return_lse=True)
    assert torch.equal(out, st.out)
    _check(st, q, k, v, sl, scale=0.3)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_num_splits_agree(dtype, request):
    """One split and several: the same result up to the merge's rounding (and each by the ratio rule)."""
    q, k, v = _inputs(3, 8, 2, 2, 157, 64, dtype, _gen(request))
    sl = _lens([157, 1, 64])
    results = [decode_attention(q, k, v, seqlens=sl, num_splits=s, return_lse=True, backend="triton") for s in (1, 2, 5)]
    for st in results:
        _check(st, q, k, v, sl)
    tol = DECODE_SPLITS_ATOL[dtype]
    for st in results[1:]:
        _assert_close(st.out, results[0].out, tol, "out")
        _assert_close(st.lse, results[0].lse, tol, "lse")


@needs_kernel
@pytest.mark.parametrize("splits", [1, 3])
def test_cache_beyond_seqlen_is_never_read(splits, request):
    """NaN/inf garbage beyond each sequence's length does not reach the output."""
    q, k, v = _inputs(3, 4, 2, 2, 96, 64, torch.float16, _gen(request))
    lens = [0, 33, 96]
    sl = _lens(lens)
    clean = decode_attention(q, k, v, seqlens=sl, num_splits=splits, return_lse=True, backend="triton")
    k2, v2 = k.clone(), v.clone()
    for b, n in enumerate(lens):
        k2[b, :, n:] = float("nan")
        v2[b, :, n:] = float("inf")
    dirty = decode_attention(q, k2, v2, seqlens=sl, num_splits=splits, return_lse=True, backend="triton")
    assert torch.equal(dirty.out, clean.out) and torch.equal(dirty.lse, clean.lse)


@needs_kernel
@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")  # the interpreter's NaN-ignoring max
@pytest.mark.parametrize("splits", [1, 4])
def test_nan_in_q_reaches_exactly_its_row(splits, request):
    """A NaN in q makes its row NaN (out and lse) if the row attends a key, as the prefill kernel does;
    the other heads of the group and the other tokens are unaffected; an empty row stays 0 / -inf."""
    B, H, Hkv, Lq, N, D = 2, 4, 1, 3, 80, 64
    q, k, v = _inputs(B, H, Hkv, Lq, N, D, torch.float16, _gen(request))
    sl = _lens([80, 1])  # sequence 1: tokens 0 and 1 see nothing, token 2 sees key 0
    q[0, 1, 2, 5] = float("nan")
    q[1, 2, 0, 0] = float("nan")  # an empty row
    q[1, 3, 2, 7] = float("nan")  # attends key 0 only
    st = decode_attention(q, k, v, seqlens=sl, num_splits=splits, return_lse=True, backend="triton")
    ref = decode_reference(q.double(), k.double(), v.double(), seqlens=sl)
    bad = torch.zeros(B, H, Lq, dtype=torch.bool, device=DEV)
    bad[0, 1, 2] = True
    bad[1, 3, 2] = True
    assert torch.equal(torch.isnan(st.lse), bad) and torch.equal(torch.isnan(ref.lse), bad)
    assert torch.equal(torch.isnan(st.out).all(-1), bad) and torch.equal(torch.isnan(st.out).any(-1), bad)
    assert float(st.out[1, 2, 0].abs().max()) == 0.0 and bool(torch.isneginf(st.lse[1, 2, 0]))
    good = ~bad
    hi, lo = _refs(q, k, v, sl)
    check_ratio(st.out[good], hi.out[good], lo.out[good], "out")
    check_ratio(st.lse[good], hi.lse[good], lo.lse[good], "lse")


@needs_kernel
@pytest.mark.parametrize("splits", [1, 3])
def test_nonfinite_k_and_v_reach_the_rows_that_attend_them(splits, request):
    """NaN in k[j] (below every row's limit): every row of that KV head's group; NaN in v[j, d]: channel d
    of those rows. Rows of the other KV head, and the other channels, equal the clean result."""
    B, H, Hkv, Lq, N, D = 1, 4, 2, 2, 90, 64
    q, k, v = _inputs(B, H, Hkv, Lq, N, D, torch.float16, _gen(request))
    sl = _lens([77])
    clean = decode_attention(q, k, v, seqlens=sl, num_splits=splits, return_lse=True, backend="triton")
    k1 = k.clone()
    k1[0, 1, 40, 3] = float("nan")
    st = decode_attention(q, k1, v, seqlens=sl, num_splits=splits, return_lse=True, backend="triton")
    assert bool(torch.isnan(st.lse[0, 2:]).all()) and bool(torch.isnan(st.out[0, 2:]).all())
    assert torch.equal(st.out[0, :2], clean.out[0, :2]) and torch.equal(st.lse[0, :2], clean.lse[0, :2])
    v1 = v.clone()
    v1[0, 0, 10, 7] = float("nan")
    st = decode_attention(q, k, v1, seqlens=sl, num_splits=splits, return_lse=True, backend="triton")
    ref = decode_reference(q.double(), k.double(), v1.double(), seqlens=sl)
    assert torch.equal(torch.isnan(st.out), torch.isnan(ref.out))
    assert bool(torch.isnan(st.out[0, :2, :, 7]).all()) and int(torch.isnan(st.out).sum()) == 2 * Lq
    assert torch.equal(st.lse, clean.lse)


def test_auto_backend_on_cpu_is_the_reference(request):
    q, k, v = (t.cpu() for t in _inputs(2, 4, 2, 2, 50, 64, torch.float32, _gen(request)))
    sl = torch.tensor([50, 7], dtype=torch.int32)
    st = decode_attention(q, k, v, seqlens=sl, return_lse=True)
    ref = decode_reference(q, k, v, seqlens=sl)
    assert torch.equal(st.out, ref.out) and torch.equal(st.lse, ref.lse)
    ref64 = decode_attention(q.double(), k.double(), v.double(), seqlens=sl.long())  # float64: reference only
    assert ref64.dtype == torch.float64


def test_num_splits_heuristic():
    assert decode_num_splits(528, 131072, 132) == 1  # 4 programs per SM already
    assert decode_num_splits(256, 131072, 132) == 2  # B=32 x 8 KV heads: two waves' worth
    s1 = decode_num_splits(8, 131072, 132)  # B=1 x 8 KV heads: split the keys
    waves = 8 * s1 / 528
    assert 8 <= s1 <= 128 and waves / math.ceil(waves) >= 0.85
    assert decode_num_splits(8, 300, 132) <= 2  # never below MIN_KEYS_PER_SPLIT keys per split
    assert decode_num_splits(1, 10, 132) == 1


# ---------------------------------------------------------------------------------------------- page summaries


def _naive_summaries(k, ps, lens):
    B, Hkv, N, D = k.shape
    P = -(-N // ps)
    mn = torch.zeros(B, Hkv, P, D, dtype=k.dtype)
    mx = torch.zeros(B, Hkv, P, D, dtype=k.dtype)
    for b in range(B):
        n = lens[b] if lens is not None else N
        for p in range(P):
            keys = k[b, :, p * ps: min((p + 1) * ps, n)]
            if keys.shape[1] > 0:
                mn[b, :, p] = keys.amin(1)
                mx[b, :, p] = keys.amax(1)
    return mn, mx


@pytest.mark.parametrize("ps,lens", [(16, None), (8, [0, 13, 50]), (7, [50, 1, 22])])
def test_page_summaries_match_naive(ps, lens, request):
    gen = _gen(request)
    k = torch.randn(3, 2, 50, 16, generator=gen).to(torch.float16)
    s = page_summaries(k, ps, seqlens=torch.tensor(lens, dtype=torch.int32) if lens else None)
    mn, mx = _naive_summaries(k, ps, lens)
    assert isinstance(s, PageSummaries) and s.page_size == ps and s.kmin.dtype == k.dtype
    assert torch.equal(s.kmin, mn) and torch.equal(s.kmax, mx)


@pytest.mark.parametrize("ps,max_new", [(8, 1), (8, 5), (16, 20), (5, 3)])
def test_update_page_summaries_is_exact(ps, max_new, request):
    gen = _gen(request)
    B, Hkv, N, D = 3, 2, 64, 16
    k = torch.randn(B, Hkv, N, D, generator=gen)
    old = torch.tensor([0, 17, 64 - max_new], dtype=torch.int32)
    new = old + torch.tensor([max_new, max(max_new - 1, 0), max_new], dtype=torch.int32)
    garbage = k.clone()
    for b in range(B):  # the cache beyond the old lengths held other values before the append
        garbage[b, :, int(old[b]):] = 1e3
    s = page_summaries(garbage, ps, seqlens=old)
    s2 = update_page_summaries(s, k, old, new, max_new=max_new)
    assert s2.kmin is s.kmin
    want = page_summaries(k, ps, seqlens=new)
    assert torch.equal(s.kmin, want.kmin) and torch.equal(s.kmax, want.kmax)


def test_update_page_summaries_makes_no_host_tensors(monkeypatch, request):
    """The decode route calls update_page_summaries once per layer and step: it must not build a tensor from host
    values (``torch.tensor(x, device=cuda)`` is a host-to-device copy that synchronised every layer of every step on
    the GPU), and its shape-only index tensors are built once per shape."""
    from sparseattn.ops import pages

    gen = _gen(request)
    k = torch.randn(2, 2, 40, 8, generator=gen).to(torch.float16)
    old = torch.tensor([30, 31], dtype=torch.int32)
    s = page_summaries(k, 8, seqlens=old)
    update_page_summaries(s, k, old, old + 1, max_new=1)  # builds the index tensors of this shape

    def no_host_tensor(*a, **kw):
        raise AssertionError("torch.tensor called on the decode-time summary update")

    arange = torch.arange
    calls = []
    monkeypatch.setattr(torch, "tensor", no_host_tensor)
    monkeypatch.setattr(torch, "arange", lambda *a, **kw: calls.append(a) or arange(*a, **kw))
    update_page_summaries(s, k, old + 1, old + 2, max_new=1)
    monkeypatch.undo()
    assert calls == []  # the cached index tensors were reused
    want = page_summaries(k, 8, seqlens=old + 2)
    assert torch.equal(s.kmin, want.kmin) and torch.equal(s.kmax, want.kmax)
    assert pages._UPDATE_INDEX.get((2, 2, 8, "cpu")) is not None


# ---------------------------------------------------------------------------------------------- page selection


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_kernel)])
def test_select_pages_matches_brute_force(backend, request):
    gen = _gen(request)
    B, H, Hkv, Lq, N, D, ps = 2, 4, 2, 2, 96, 64, 8
    # the Triton selection runs where the kernel does (CUDA, or the CPU interpreter); the checks read on the host
    dev = DEV if backend == "triton" else "cpu"
    q, k, _ = (t.to(dev) for t in _inputs(B, H, Hkv, Lq, N, D, torch.float32, gen))
    lens = [96, 45]
    sl = torch.tensor(lens, dtype=torch.int32, device=dev)
    s = page_summaries(k, ps, seqlens=sl)
    for top in (4, 0.5):
        pidx, pnum = (t.cpu() for t in select_pages(q, s, seqlens=sl, top_pages=top, keep_first=1, keep_last=2,
                                                     backend=backend))
        assert pidx.dtype == torch.int32 and pnum.shape == (B, Hkv)
        for b in range(B):
            n_pages = -(-lens[b] // ps)
            want_n = min(max(top if isinstance(top, int) else math.ceil(top * n_pages), 3), n_pages)
            for hk in range(Hkv):
                n = int(pnum[b, hk])
                assert n == want_n
                sel = pidx[b, hk, :n].tolist()
                assert len(set(sel)) == n and all(0 <= p < n_pages for p in sel)
                assert sel == sorted(sel)  # both paths list the selection ascending
                assert {0, n_pages - 2, n_pages - 1} <= set(sel)
                qg = q[b, hk * 2:(hk + 1) * 2].reshape(-1, D).double()
                ub = torch.maximum(qg[:, None] * s.kmin[b, hk].double()[None], qg[:, None] * s.kmax[b, hk].double()[None])
                bound = ub.sum(-1).amax(0)[:n_pages]  # (pages,)
                rest = [p for p in range(1, n_pages - 2)]
                chosen = [p for p in sel if p in rest]
                dropped = [p for p in rest if p not in sel]
                if chosen and dropped:
                    assert float(bound[chosen].min()) >= float(bound[dropped].max()) - 1e-5


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_kernel)])
def test_select_pages_prefers_nan_pages(backend, request):
    """A page holding a NaN key is never dropped (its bound is NaN): the fault reaches the output."""
    gen = _gen(request)
    dev = DEV if backend == "triton" else "cpu"
    q, k, _ = (t.to(dev) for t in _inputs(1, 2, 1, 1, 64, 64, torch.float32, gen))
    k[0, 0, 29, 3] = float("nan")  # page 3 of 8
    s = page_summaries(k, 8)
    pidx, pnum = (t.cpu() for t in select_pages(q, s, top_pages=3, backend=backend))
    assert 3 in pidx[0, 0, : int(pnum[0, 0])].tolist()


@needs_kernel
@pytest.mark.parametrize("dtype,Lq,G,top", [(torch.float16, 1, 4, 0.3), (torch.bfloat16, 3, 2, 5),
                                            (torch.float16, 40, 2, 0.1)])
def test_select_kernel_matches_torch_selection(dtype, Lq, G, top, request):
    """The fused Triton scoring kernel selects the same pages as the PyTorch path (counts equal; sets equal
    where the bounds are not near-ties at the cut)."""
    gen = _gen(request)
    B, Hkv, N, D, ps = 3, 2, 300, 64, 8
    q, k, _ = _inputs(B, Hkv * G, Hkv, Lq, N, D, dtype, gen)
    sl = _lens([300, 30, 0])
    s = page_summaries(k, ps, seqlens=sl)
    pk, nk = select_pages(q, s, seqlens=sl, top_pages=top, backend="triton")
    pr, nr = select_pages(q.double(), PageSummaries(s.kmin.double(), s.kmax.double(), ps), seqlens=sl, top_pages=top,
                          backend="reference")
    assert torch.equal(nk, nr) and pk.shape == pr.shape and pk.dtype == torch.int32
    assert int(nr[2].max()) == 0 and int(nr[1, 0]) == min(max(5 if top == 5 else math.ceil(top * 4), 2), 4)
    # bound of every page in float64, to tell a real disagreement from a near-tie at the cut
    qg = q.double().reshape(B, Hkv, G * Lq, D)
    ub = (qg.clamp(min=0) @ s.kmax.double().transpose(-1, -2) + qg.clamp(max=0) @ s.kmin.double().transpose(-1, -2)).amax(2)
    lens = [300, 30, 0]
    for b in range(B):
        n_pages = -(-lens[b] // ps)
        forced = {0, n_pages - 1} if n_pages else set()
        for h in range(Hkv):
            n = int(nr[b, h])
            a, r = set(pk[b, h, :n].tolist()), set(pr[b, h, :n].tolist())
            assert forced <= a and forced <= r
            if not a ^ r:
                continue
            rest = sorted((float(ub[b, h, p]) for p in range(n_pages) if p not in forced), reverse=True)
            cut = rest[n - len(forced) - 1]
            for p in a ^ r:  # in one selection only: a near-tie at the cut (bf16/fp16 rounding of the bounds)
                assert abs(float(ub[b, h, p]) - cut) <= DECODE_PAGE_BOUND_TIE_REL * max(1.0, abs(cut)), (b, h, sorted(a), sorted(r))


@needs_kernel
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("P,block", [(5, 16), (64, 64), (129, 64), (300, 64)])
def test_page_pick_kernel_matches_stable_brute_force(P, block, bits, request):
    """The radix-select kernel takes the ``count`` highest scores, ties to the lower page, ascending, padding 0 --
    with many exact ties, +-inf (forced / invalid pages), +-BIG (NaN / infinite bounds), -0.0 next to +0.0,
    a count of 0 and of every page, in one block and in several chunks."""
    from sparseattn.ops.triton import decode as kern

    gen = _gen(request)
    B, Hkv = 2, 3
    big = torch.finfo(torch.float32).max
    score = torch.randint(-4, 4, (B, Hkv, P), generator=gen).float()  # many exact ties
    score[0, 0, :2] = math.inf
    score[1, 2, P // 2:] = -math.inf
    score[0, 1, P // 3] = big
    score[1, 1, P // 4] = -big
    score[1, 0] = torch.randn(P, generator=gen)
    score[0, 2] = torch.where(torch.arange(P) % 3 == 0, 0.0, -0.0)
    count = torch.randint(0, P + 1, (B, Hkv), generator=gen, dtype=torch.int32)
    count[0, 0], count[0, 1] = 0, P
    count[1, 2] = min(int(count[1, 2]), P - P // 2)  # never more than the valid pages
    K = P
    score, count = score.to(DEV), count.to(DEV)
    idx = torch.full((B, Hkv, K), -7, dtype=torch.int32, device=DEV)
    kern._page_pick_kernel[(B * Hkv,)](score, count, idx, score.stride(0), score.stride(1), score.stride(2),
                                       count.stride(0), idx.stride(0), idx.stride(1), Hkv, P, K, BLOCK=block,
                                       ONE_CHUNK=P <= block, BITS=bits)
    idx, score, count = idx.cpu(), score.cpu(), count.cpu()
    for b in range(B):
        for h in range(Hkv):
            c = int(count[b, h])
            want = sorted(sorted(range(P), key=lambda p: (-float(score[b, h, p]), p))[:c])
            assert idx[b, h, :c].tolist() == want, (b, h, c)
            assert idx[b, h, c:].tolist() == [0] * (K - c)


# ---------------------------------------------------------------------------------------------- sparse decode


@needs_kernel
@pytest.mark.parametrize("ps", [16, 8, 64, 5])
def test_sparse_all_pages_equals_dense(ps, request):
    B, H, Hkv, Lq, N, D = 3, 8, 2, 2, 150, 64
    q, k, v = _inputs(B, H, Hkv, Lq, N, D, torch.float16, _gen(request))
    sl = _lens([150, 0, 71])
    s = page_summaries(k, ps, seqlens=sl)
    st = sparse_decode_attention(q, k, v, s, seqlens=sl, top_pages=1.0, num_splits=3, return_lse=True, backend="triton")
    dense = decode_attention(q, k, v, seqlens=sl, num_splits=3, return_lse=True, backend="triton")
    _check(st, q, k, v, sl)
    tol = DECODE_SPLITS_ATOL[torch.float16]
    _assert_close(st.out, dense.out, tol, "out")
    _assert_close(st.lse, dense.lse, tol, "lse")


@needs_kernel
@pytest.mark.parametrize("ps,top,splits", [(16, 0.3, 1), (16, 2, 3), (8, 0.25, 2), (32, 3, 2), (5, 0.4, 4)])
def test_sparse_subset_matches_restricted_reference(ps, top, splits, request):
    B, H, Hkv, Lq, N, D = 3, 8, 2, 2, 160, 64
    q, k, v = _inputs(B, H, Hkv, Lq, N, D, torch.float16, _gen(request))
    lens = [160, 1, 99]
    sl = _lens(lens)
    s = page_summaries(k, ps, seqlens=sl)
    for b, n in enumerate(lens):  # garbage beyond the lengths must not matter
        k[b, :, n:] = float("nan")
        v[b, :, n:] = float("nan")
    st, (pidx, pnum) = sparse_decode_attention(q, k, v, s, seqlens=sl, page_size=ps, top_pages=top, num_splits=splits,
                                               return_lse=True, return_pages=True, backend="triton")
    mask = pages_key_mask(pidx, pnum, ps, N)
    n_pages = -(-160 // ps)
    assert int(pnum[0].max()) < n_pages  # a real subset for the full sequence
    _check(st, q, k, v, sl, key_mask=mask)
    # the same pages in another order: the same function
    ar = torch.arange(pidx.shape[-1], device=DEV)
    rev = torch.gather(pidx, 2, (pnum[..., None].long() - 1 - ar).clamp(min=0))  # the live entries reversed
    shifted = torch.where(ar < pnum[..., None], rev, pidx)
    st2 = paged_decode_attention(q, k, v, shifted, pnum, page_size=ps, seqlens=sl, num_splits=splits, return_lse=True,
                                 backend="triton")
    _check(st2, q, k, v, sl, key_mask=mask)


@needs_kernel
def test_paged_with_empty_lists(request):
    """A head with no listed page attends nothing: out 0, lse -inf."""
    q, k, v = _inputs(1, 2, 2, 1, 64, 64, torch.float16, _gen(request))
    pidx = torch.tensor([[[0, 2], [1, 3]]], dtype=torch.int32, device=DEV)
    pnum = torch.tensor([[2, 0]], dtype=torch.int32, device=DEV)
    st = paged_decode_attention(q, k, v, pidx, pnum, page_size=16, num_splits=2, return_lse=True, backend="triton")
    assert bool((st.out[0, 1] == 0).all()) and bool(torch.isneginf(st.lse[0, 1]).all())
    _check(st, q, k, v, key_mask=pages_key_mask(pidx, pnum, 16, 64))


def test_sparse_reference_backend_cpu(request):
    q, k, v = (t.cpu() for t in _inputs(2, 4, 1, 1, 64, 16, torch.float64, _gen(request)))
    sl = torch.tensor([64, 30], dtype=torch.int32)
    s = page_summaries(k, 8, seqlens=sl)
    st, (pidx, pnum) = sparse_decode_attention(q, k, v, s, seqlens=sl, top_pages=0.5, return_lse=True, return_pages=True)
    want = decode_reference(q, k, v, seqlens=sl, key_mask=pages_key_mask(pidx, pnum, 8, 64))
    assert torch.equal(st.out, want.out) and torch.equal(st.lse, want.lse)


# ---------------------------------------------------------------------------------------------- bad inputs


def _ok(dtype=torch.float16):
    q = torch.zeros(2, 4, 1, 64, dtype=dtype)
    k = torch.zeros(2, 2, 32, 64, dtype=dtype)
    return q, k, k.clone()


BAD = {
    "q-rank": (lambda q, k, v: decode_attention(q[0], k, v), "q has the wrong rank"),
    "v-shape": (lambda q, k, v: decode_attention(q, k, v[:, :, :16]), "v_cache must have the same shape"),
    "batch": (lambda q, k, v: decode_attention(q[:1], k, v), "batch size differs"),
    "head-dim": (lambda q, k, v: decode_attention(q[..., :32], k, v), "head_dim differs"),
    "gqa": (lambda q, k, v: decode_attention(q[:, :3], k, v), "heads must divide"),
    "lq>64": (lambda q, k, v: decode_attention(q.expand(2, 4, 65, 64), k, v), "too many query tokens"),
    "dtype-mismatch": (lambda q, k, v: decode_attention(q.float(), k, v), "dtypes must all be equal"),
    "int-dtype": (lambda q, k, v: decode_attention(q.int(), k.int(), v.int()), "q.dtype is not supported"),
    "seqlens>nmax": (lambda q, k, v: decode_attention(q, k, v, seqlens=torch.tensor([3, 33], dtype=torch.int32)),
                     "seqlens has values out of range"),
    "seqlens<0": (lambda q, k, v: decode_attention(q, k, v, seqlens=torch.tensor([-1, 3], dtype=torch.int32)),
                  "seqlens has values out of range"),
    "seqlens-len": (lambda q, k, v: decode_attention(q, k, v, seqlens=torch.tensor([3], dtype=torch.int32)),
                    "seqlens has the wrong length"),
    "seqlens-dtype": (lambda q, k, v: decode_attention(q, k, v, seqlens=torch.tensor([3.0, 4.0])),
                      "seqlens.dtype is not supported"),
    "num-splits": (lambda q, k, v: decode_attention(q, k, v, num_splits=0), "num_splits must be None"),
    "scale": (lambda q, k, v: decode_attention(q, k, v, scale=-1.0), "scale must be"),
    "backend": (lambda q, k, v: decode_attention(q, k, v, backend="cuda"), "backend is not a known backend"),
    "return-lse": (lambda q, k, v: decode_attention(q, k, v, return_lse=1), "return_lse must be a bool"),
    "page-size": (lambda q, k, v: page_summaries(k, 0), "page_size must be a positive integer"),
    "top-pages-0": (lambda q, k, v: sparse_decode_attention(q, k, v, page_summaries(k, 8), top_pages=0),
                    "top_pages must be at least 1"),
    "top-pages-frac": (lambda q, k, v: sparse_decode_attention(q, k, v, page_summaries(k, 8), top_pages=1.5),
                       "top_pages is out of range"),
    "page-size-mismatch": (lambda q, k, v: sparse_decode_attention(q, k, v, page_summaries(k, 8), page_size=16,
                                                                   top_pages=2),
                           "page_size differs"),
    "summaries-type": (lambda q, k, v: sparse_decode_attention(q, k, v, (k, k), top_pages=2),
                       "summaries must be a PageSummaries"),
    "summaries-shape": (lambda q, k, v: sparse_decode_attention(q, k, v, page_summaries(k[:, :, :16], 8), top_pages=2),
                        "summaries.kmin does not match the cache"),
    "keep-first": (lambda q, k, v: sparse_decode_attention(q, k, v, page_summaries(k, 8), top_pages=2, keep_first=-1),
                   "keep_first must be a non-negative integer"),
    "page-lists": (lambda q, k, v: paged_decode_attention(q, k, v, torch.zeros(2, 2, 3, dtype=torch.int32),
                                                          torch.zeros(2, 3, dtype=torch.int32), page_size=8),
                   "have the wrong shape"),
    "update-max-new": (lambda q, k, v: update_page_summaries(page_summaries(k, 8), k, torch.zeros(2, dtype=torch.int32),
                                                             torch.ones(2, dtype=torch.int32), max_new=-1),
                       "max_new must be a non-negative integer"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_inputs_raise_value_error(case):
    fn, msg = BAD[case]
    with pytest.raises(ValueError, match=msg) as info:
        fn(*_ok())
    text = str(info.value)
    assert "; expected " in text and ", got " in text and text.split(":")[0] in (
        "decode_attention", "page_summaries", "sparse_decode_attention", "paged_decode_attention",
        "update_page_summaries")


@needs_kernel
def test_unsupported_inputs_raise_not_implemented():
    q, k, v = _ok(torch.float64)
    with pytest.raises(NotImplementedError, match="dtype float64 is not supported"):
        decode_attention(q.to(DEV), k.to(DEV), v.to(DEV), backend="triton")
    q, k, v = (t[..., :32].to(DEV) for t in _ok())
    with pytest.raises(NotImplementedError, match="head_dim 32 is not supported"):
        decode_attention(q, k, v, backend="triton")


@needs_kernel
def test_int64_seqlens_and_strided_cache(request):
    """int64 lengths are converted on the device; a cache viewed from a (B, N, H_kv, D) buffer needs no copy."""
    B, H, Hkv, Lq, N, D = 2, 4, 2, 1, 70, 64
    q, k, v = _inputs(B, H, Hkv, Lq, N, D, torch.float16, _gen(request))
    kt, vt = k.transpose(1, 2).contiguous().transpose(1, 2), v.transpose(1, 2).contiguous().transpose(1, 2)
    assert kt.stride(-1) == 1 and not kt.is_contiguous()
    sl = _lens([70, 12])
    a = decode_attention(q, k, v, seqlens=sl, num_splits=2, return_lse=True, backend="triton")
    b = decode_attention(q, kt, vt, seqlens=sl.long(), num_splits=2, return_lse=True, backend="triton")
    assert torch.equal(a.out, b.out) and torch.equal(a.lse, b.lse)


def test_exported_from_ops():
    import sparseattn.ops as ops

    for name in ("decode_attention", "sparse_decode_attention", "paged_decode_attention", "page_summaries",
                 "update_page_summaries", "select_pages", "decode_reference", "PageSummaries"):
        assert name in ops.__all__ and getattr(ops, name) is not None


@needs_kernel
def test_hot_path_reads_nothing_on_the_host(request):
    """No ``.item()``/``bool(t)``/``.tolist()`` (``aten._local_scalar_dense``) in dense decode, sparse decode
    (selection included) or the summary update, as on a GPU with device-resident ``seqlens``
    (``check_seqlens=False`` stands in for "not on the CPU")."""

    q, k, v = _inputs(2, 4, 2, 2, 96, 64, torch.float16, _gen(request))
    old, new = _lens([60, 10]), _lens([62, 12])
    summ = page_summaries(k, 16, seqlens=old)
    for fn in (lambda: decode_attention(q, k, v, seqlens=new, num_splits=2, backend="triton", check_seqlens=False),
               lambda: update_page_summaries(summ, k, old, new, max_new=2, check_seqlens=False),
               lambda: sparse_decode_attention(q, k, v, summ, seqlens=new, top_pages=0.5, num_splits=2,
                                               backend="triton", check_seqlens=False)):
        fn()  # first call: compilation, caches
        counter = CountOps()
        with counter:
            fn()
        assert counter.ops.get("aten._local_scalar_dense.default", 0) == 0, dict(counter.ops)


def test_default_config_is_the_measured_sweep_winner_only_where_measured():
    """The H200 sweeps' winners are the defaults for the shapes they were measured at (D=128, one row tile of <= 16
    rows: dense, an int8 cache, the paged kernel); other shapes, the fp8 cache and the interpreter keep their configs."""
    from sparseattn.ops.decode import _default_config

    assert _default_config(128, 16, False) == {"BLOCK_N": 128, "num_warps": 4, "num_stages": 2}
    assert _default_config(128, 16, False, kv="int8") == {"BLOCK_N": 128, "num_warps": 4, "num_stages": 3, "QK": "fp16",
                                                          "FULL_TILES": True}
    assert _default_config(128, 16, False, kv="fp8") == {"BLOCK_N": 128, "num_warps": 4, "num_stages": 2}
    assert _default_config(128, 16, False, paged=True) == {"BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
    assert _default_config(128, 64, False, paged=True) == {"BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
    assert _default_config(128, 64, False) == {"BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
    assert _default_config(64, 16, False) == {"BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
    assert _default_config(128, 16, True) == {"BLOCK_N": 32, "num_warps": 4, "num_stages": 1}


@needs_kernel
def test_sweep_winner_config_matches_reference(request):
    """The (BLOCK_N 128, 4 warps, 2 stages) default of D=128 is exact too: odd lengths, per-sequence lengths, splits."""
    gen = _gen(request)
    q, k, v = _inputs(2, 8, 2, 1, 300, 128, torch.bfloat16, gen)
    sl = torch.tensor([300, 131], dtype=torch.int32, device=DEV)
    for splits in (1, 3):
        st = decode_attention(q, k, v, seqlens=sl, num_splits=splits, return_lse=True, backend="triton",
                              config={"BLOCK_N": 128, "num_warps": 4, "num_stages": 2})
        _check(st, q, k, v, seqlens=sl)
