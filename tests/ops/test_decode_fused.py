"""Fused decode launches (issue 14, batch-1 latency): the merge in the split kernel and the pick in the scoring kernel.

``FUSED_MERGE`` (a decode launch-config switch): the last program of a row tile to finish merges the tile's splits
(:func:`sparseattn.ops.triton.decode._merge_row`, the merge kernel's own code) instead of a second launch. The fused
selection (``_select_kernel(fused=True)``): the last scoring program of a (sequence, KV head) row runs the pick on it.
Both must give what the two-launch paths give (the same pages exactly; the same output and lse), pass the reference,
propagate NaN as before, and leave their arrival counters at zero. Under Triton's CPU interpreter without CUDA.
"""

from __future__ import annotations

import pytest
import torch

from sparseattn.ops import decode as decode_mod
from sparseattn.ops import pages as pages_mod
from sparseattn.ops.decode import decode_attention, decode_reference, pages_key_mask, paged_decode_attention
from sparseattn.ops.launch_configs import DecodeLaunchConfig
from sparseattn.ops.pages import page_summaries
from sparseattn.testing.harness import kernel_unavailable, node_generator
from sparseattn.testing.tolerances import check_ratio

ON_GPU = torch.cuda.is_available()
DEV = "cuda" if ON_GPU else "cpu"
needs_kernel = pytest.mark.skipif(kernel_unavailable() is not None, reason=str(kernel_unavailable()))
CFG = {"BLOCK_N": 32, "num_warps": 4, "num_stages": 1}


@pytest.fixture
def counters(monkeypatch):
    """Every arrival-counter tensor the launches allocate (to check that the kernels leave them at zero)."""
    made: list[torch.Tensor] = []
    real = decode_mod._arrival_counters

    def record(n, device):
        t = real(n, device)
        made.append(t)
        return t

    monkeypatch.setattr(decode_mod, "_arrival_counters", record)
    return made


def _inputs(g, B, H, Hkv, N, D, lq=1, dtype=torch.bfloat16):
    q = torch.randn(B, H, lq, D, generator=g).to(dtype).to(DEV)
    k = torch.randn(B, Hkv, N, D, generator=g).to(dtype).to(DEV)
    v = torch.randn(B, Hkv, N, D, generator=g).to(dtype).to(DEV)
    return q, k, v


@needs_kernel
@pytest.mark.parametrize("B,H,Hkv,N,lq,splits", [(2, 8, 2, 300, 1, 4), (1, 4, 1, 97, 3, 3), (3, 12, 3, 200, 2, 7)])
def test_fused_merge_is_the_two_launch_merge(B, H, Hkv, N, lq, splits, counters, request):
    g = node_generator(request)
    q, k, v = _inputs(g, B, H, Hkv, N, 64, lq)
    sl = torch.randint(lq, N + 1, (B,), generator=g).to(torch.int32).to(DEV)
    sl[0] = N
    two = decode_attention(q, k, v, seqlens=sl, backend="triton", num_splits=splits, config=CFG, return_lse=True)
    one = decode_attention(q, k, v, seqlens=sl, backend="triton", num_splits=splits,
                           config={**CFG, "FUSED_MERGE": True}, return_lse=True)
    assert len(counters) == 1 and int(counters[0].abs().sum()) == 0  # allocated once, left at zero
    # the same merge code on the same partial states: equal (the GPU may order the sums by its warps)
    if ON_GPU:
        torch.testing.assert_close(one.out.float(), two.out.float(), rtol=0, atol=2e-3)
        torch.testing.assert_close(one.lse, two.lse, rtol=0, atol=1e-5)
    else:
        assert torch.equal(one.out, two.out) and torch.equal(one.lse, two.lse)
    hi = decode_reference(q.float(), k.float(), v.float(), seqlens=sl)
    lo = decode_reference(q, k, v, seqlens=sl, upcast=False)
    check_ratio(one.out, hi.out, lo.out, "fused merge out")


@needs_kernel
def test_fused_merge_propagates_nan_and_empty_rows(counters, request):
    g = node_generator(request)
    B, H, Hkv, N, D = 3, 4, 2, 160, 64
    q, k, v = _inputs(g, B, H, Hkv, N, D)
    v[1, 0, 17] = float("nan")  # sequence 1, KV head 0: its rows are NaN, the others are not
    k[2, 1, 150] = float("nan")  # beyond sequence 2's length: never read
    sl = torch.tensor([N, N, 100], dtype=torch.int32, device=DEV)
    sl0 = torch.tensor([0, N, 100], dtype=torch.int32, device=DEV)  # sequence 0 attends nothing: out 0, lse -inf
    for lens in (sl, sl0):
        two = decode_attention(q, k, v, seqlens=lens, backend="triton", num_splits=5, config=CFG, return_lse=True,
                               check_seqlens=False)
        one = decode_attention(q, k, v, seqlens=lens, backend="triton", num_splits=5,
                               config={**CFG, "FUSED_MERGE": True}, return_lse=True, check_seqlens=False)
        assert torch.equal(one.out.isnan(), two.out.isnan()) and torch.equal(one.lse.isnan(), two.lse.isnan())
        assert bool(one.out[1, :2].isnan().all()) and not bool(one.out[1, 2:].isnan().any())
        assert not bool(one.out[2].isnan().any())
    assert bool((one.out[0] == 0).all()) and bool((one.lse[0] == float("-inf")).all())
    assert all(int(c.abs().sum()) == 0 for c in counters)


@needs_kernel
def test_fused_merge_one_split_is_a_plain_launch(counters, request):
    # one split: nothing to merge, no counters (the kernel writes the output directly)
    g = node_generator(request)
    q, k, v = _inputs(g, 1, 4, 1, 64, 64)
    one = decode_attention(q, k, v, backend="triton", num_splits=1, config={**CFG, "FUSED_MERGE": True})
    two = decode_attention(q, k, v, backend="triton", num_splits=1, config=CFG)
    assert torch.equal(one, two) and counters == []


@needs_kernel
@pytest.mark.parametrize("top,P_pages", [(0.3, 20), (5, 20), (0.1, 100)])  # 100 pages: rows in chunks (interpreter)
def test_fused_select_is_the_two_launch_select(top, P_pages, counters, request):
    g = node_generator(request)
    B, H, Hkv, D, ps = 3, 8, 2, 64, 16
    N = P_pages * ps
    q, k, v = _inputs(g, B, H, Hkv, N, D)
    k[0, 1, 40:56] = k[0, 1, 8:24]  # two pages with the same bounds: a tie, to the lower page
    k[1, 0, 70] = float("nan")  # a NaN key: its page ranks first
    sl = torch.tensor([N, N - 5, 37], dtype=torch.int32, device=DEV)
    summ = page_summaries(k, ps, seqlens=sl)
    k_int, frac = (top, None) if isinstance(top, int) else (None, top)
    i2, c2 = pages_mod._select_kernel(q, summ, sl, k_int, frac, 1, 1, fused=False)
    i1, c1 = pages_mod._select_kernel(q, summ, sl, k_int, frac, 1, 1, fused=True)
    assert torch.equal(i1, i2) and torch.equal(c1, c2)
    assert len(counters) == 1 and int(counters[0].abs().sum()) == 0
    ref_i, ref_c = pages_mod._select(q, summ, sl, k_int, frac, 1, 1)  # the PyTorch selection
    assert torch.equal(c1.cpu(), ref_c.cpu())
    live = torch.arange(i1.shape[-1], device=DEV)[None, None, :] < c1[:, :, None]
    assert torch.equal(torch.where(live, i1, 0).cpu(), torch.where(live, ref_i, 0).cpu())


@needs_kernel
def test_fused_sparse_decode_passes_the_reference(counters, request):
    g = node_generator(request)
    B, H, Hkv, D, ps, N = 2, 8, 2, 64, 16, 400
    q, k, v = _inputs(g, B, H, Hkv, N, D)
    sl = torch.tensor([N, 211], dtype=torch.int32, device=DEV)
    summ = page_summaries(k, ps, seqlens=sl)
    pidx, pnum = pages_mod._select_kernel(q, summ, sl, None, 0.25, 1, 1, fused=True)
    out = paged_decode_attention(q, k, v, pidx, pnum, page_size=ps, seqlens=sl, backend="triton", num_splits=3,
                                 config={**CFG, "FUSED_MERGE": True})
    mask = pages_key_mask(pidx, pnum, ps, N)
    hi = decode_reference(q.float(), k.float(), v.float(), seqlens=sl, key_mask=mask)
    lo = decode_reference(q, k, v, seqlens=sl, key_mask=mask, upcast=False)
    check_ratio(out, hi.out, lo.out, "fused sparse decode")
    assert len(counters) == 2 and all(int(c.abs().sum()) == 0 for c in counters)


def test_fused_merge_config_is_checked():
    q = torch.zeros(1, 4, 1, 64)
    k = torch.zeros(1, 1, 32, 64)
    with pytest.raises(ValueError, match="decode_attention: config has a bad FUSED_MERGE; expected True or False"):
        decode_attention(q, k, k, backend="triton", config={**CFG, "FUSED_MERGE": 1})
    with pytest.raises(ValueError, match="DecodeLaunchConfig: fused_merge must be a bool or None"):
        DecodeLaunchConfig(32, 4, 1, fused_merge="yes")  # type: ignore[arg-type]
    c = DecodeLaunchConfig(64, 4, 3, fused_merge=True)
    assert c.to_dict()["FUSED_MERGE"] is True and DecodeLaunchConfig.from_dict(c.to_dict()) == c


@needs_kernel
@pytest.mark.parametrize("ps,quant", [(32, False), (64, False), (64, True)])
def test_page_tiles_walk_is_the_per_key_gather(ps, quant, monkeypatch, request):
    # page_size % BLOCK_N == 0: the paged kernel loads one page index per tile (PAGE_TILES); the keys, tiles and
    # their order are those of the per-key gather, so the output is the same bit for bit
    g = node_generator(request)
    B, H, Hkv, D = 2, 8, 2, 64
    N = 6 * ps + 5
    q, k, v = _inputs(g, B, H, Hkv, N, D)
    sl = torch.tensor([N, 3 * ps + 7], dtype=torch.int32, device=DEV)
    pidx = torch.tensor([[[0, 2, 5, 6], [1, 3, 4, 6]], [[0, 1, 3, 0], [2, 3, 0, 0]]], dtype=torch.int32, device=DEV)
    pnum = torch.tensor([[4, 4], [3, 2]], dtype=torch.int32, device=DEV)
    kw: dict = {}
    if quant:
        from sparseattn.state.kv_cache import quantize

        k, ksc = quantize(k, "int8")
        v, vsc = quantize(v, "int8")
        kw = dict(k_scale=ksc, v_scale=vsc)
    outs = []
    for tiles in (True, False):
        monkeypatch.setattr(decode_mod, "PAGE_TILES", tiles)
        outs.append(paged_decode_attention(q, k, v, pidx, pnum, page_size=ps, seqlens=sl, backend="triton",
                                           num_splits=3, config=CFG, return_lse=True, **kw))
    assert torch.equal(outs[0].out, outs[1].out) and torch.equal(outs[0].lse, outs[1].lse)
