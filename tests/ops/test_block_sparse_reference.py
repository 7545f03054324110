"""Reference attention == torch SDPA with the same mask (float64), plus its own contract."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sparseattn
from sparseattn import BlockLayout, attention, block_sparse_attention, random_layout, reference_attention
from sparseattn.layout import make_pattern
from sparseattn.ops.reference import sdpa_reference
from sparseattn.testing.inputs import random_qkv, structured_qkv
from sparseattn.testing.tolerances import (
    REF_FP32_LSE_REL,
    REF_FP32_OUT_ATOL,
    REF_HALF_SAME_DTYPE_ERR_MAX,
    REF_UPCAST_ATOL,
    REF_UPCAST_EPS_FACTOR,
    SDPA_FP64_ATOL,
)

F64 = torch.float64


def _lse_oracle(q, k, causal, layout, scale=None):
    """Dense natural-log logsumexp with the element mask, float64 (N x N; small shapes only)."""
    B, H, Nq, D = q.shape
    G = H // k.shape[1]
    kk = k.repeat_interleave(G, dim=1)
    s = torch.einsum("bhnd,bhmd->bhnm", q.double(), kk.double()) * (D ** -0.5 if scale is None else scale)
    if layout is not None:
        mask = layout.element_mask(causal=causal)
    else:
        mask = torch.ones(B, H, Nq, k.shape[2], dtype=torch.bool)
        if causal:
            r = torch.arange(Nq)[:, None]
            c = torch.arange(k.shape[2])[None, :]
            mask = mask & (c <= r + k.shape[2] - Nq)
    return torch.logsumexp(s.masked_fill(~mask, -math.inf), dim=-1)


def _check(q, k, v, *, causal, layout=None, scale=None, **kw):
    out, lse = reference_attention(q, k, v, causal=causal, layout=layout, scale=scale, **kw)
    ref = sdpa_reference(q, k, v, causal=causal, layout=layout, scale=scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert lse.shape == q.shape[:3] and lse.dtype == F64
    assert float((out - ref).abs().max()) <= SDPA_FP64_ATOL
    want = _lse_oracle(q, k, causal, layout, scale)
    assert torch.equal(torch.isinf(lse), torch.isinf(want))
    fin = torch.isfinite(want)
    if bool(fin.any()):
        assert float((lse[fin] - want[fin]).abs().max()) <= SDPA_FP64_ATOL
    return out, lse


LENGTHS = [(64, 64), (100, 100), (37, 100), (100, 37), (1, 1), (1, 77), (77, 1), (129, 130)]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("nq,nkv", LENGTHS)
@pytest.mark.parametrize("group", [1, 3, 4, 8])
def test_dense_matches_sdpa(nq, nkv, causal, group):
    q, k, v = random_qkv(2, 2 * group, nq, 16, kv_heads=2, seqlen_kv=nkv, dtype=F64, seed=nq * 1000 + nkv + group)
    _check(q, k, v, causal=causal, chunk_size=32)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("nq,nkv", LENGTHS)
@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("pattern", ["random", "sliding_window", "strided", "block_diagonal", "sink_window", "dense"])
def test_layout_matches_sdpa(nq, nkv, causal, group, pattern):
    H = 2 * group
    kw = dict(block_m=16, block_n=32, batch=2, heads=H, causal=causal)
    if pattern == "random":
        kw["density"] = 0.4
    q, k, v = random_qkv(2, H, nq, 16, kv_heads=2, seqlen_kv=nkv, dtype=F64, seed=7)
    _check(q, k, v, causal=causal, layout=make_pattern(pattern, nq, nkv, **kw))


@given(
    nq=st.integers(1, 150), nkv=st.integers(1, 150), hkv=st.sampled_from([1, 2]), group=st.sampled_from([1, 3, 4, 8]),
    d=st.sampled_from([8, 16, 24]), bm=st.sampled_from([16, 32, 64]), bn=st.sampled_from([16, 32, 64]),
    density=st.floats(0.0, 1.0), causal=st.booleans(), seed=st.integers(0, 2**16),
)
def test_random_shapes_match_sdpa(nq, nkv, hkv, group, d, bm, bn, density, causal, seed):
    H = hkv * group
    q, k, v = random_qkv(1, H, nq, d, kv_heads=hkv, seqlen_kv=nkv, dtype=F64, seed=seed)
    lay = random_layout(nq, nkv, density=density, seed=seed, block_m=bm, block_n=bn, heads=H, causal=causal,
                        keep_diagonal=seed % 2 == 0)
    _check(q, k, v, causal=causal, layout=lay)
    _check(q, k, v, causal=causal, scale=0.3)


def test_chunk_size_does_not_change_result():
    q, k, v = random_qkv(1, 2, 70, 8, seqlen_kv=201, dtype=F64, seed=1)
    base = reference_attention(q, k, v, causal=True, chunk_size=1000)
    for cs in (1, 7, 64):
        o, l = reference_attention(q, k, v, causal=True, chunk_size=cs)
        assert float((o - base.out).abs().max()) <= SDPA_FP64_ATOL
        assert float((l - base.lse).abs().max()) <= SDPA_FP64_ATOL


def test_empty_rows_out_zero_lse_neg_inf():
    q, k, v = random_qkv(1, 2, 64, 8, dtype=F64, seed=3)
    mask = torch.ones(1, 2, 4, 4, dtype=torch.bool)
    mask[0, 0, 1] = False  # query block 1 of head 0 attends nothing
    mask[0, 1] = False  # head 1 attends nothing at all
    lay = BlockLayout.from_dense_mask(mask, block_m=16, block_n=16, seqlen_q=64, seqlen_kv=64)
    out, lse = reference_attention(q, k, v, layout=lay)
    assert torch.equal(out[0, 0, 16:32], torch.zeros(16, 8, dtype=F64))
    assert bool(torch.isneginf(lse[0, 0, 16:32]).all()) and bool(torch.isneginf(lse[0, 1]).all())
    assert bool(torch.isfinite(lse[0, 0, :16]).all()) and bool(torch.isfinite(out).all())
    assert torch.equal(out[0, 1], torch.zeros(64, 8, dtype=F64))


def test_causal_nq_greater_than_nkv_first_rows_empty():
    # bottom-right alignment: query i sees keys <= i + Nkv - Nq, so the first Nq - Nkv rows see nothing
    q, k, v = random_qkv(1, 1, 10, 8, seqlen_kv=4, dtype=F64, seed=0)
    out, lse = reference_attention(q, k, v, causal=True)
    assert bool(torch.isneginf(lse[0, 0, :6]).all()) and bool(torch.isfinite(lse[0, 0, 6:]).all())
    assert float(out[0, 0, :6].abs().max()) == 0.0
    # the last row sees every key
    full = reference_attention(q[:, :, -1:], k, v)
    assert float((full.out[0, 0, 0] - out[0, 0, -1]).abs().max()) <= SDPA_FP64_ATOL


def test_causal_nq_one_sees_all_keys():
    q, k, v = random_qkv(1, 1, 1, 8, seqlen_kv=50, dtype=F64, seed=0)
    a = reference_attention(q, k, v, causal=True)
    b = reference_attention(q, k, v, causal=False)
    assert torch.equal(a.out, b.out) and torch.equal(a.lse, b.lse)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_dtypes(dtype):
    q, k, v = random_qkv(1, 4, 50, 16, kv_heads=2, dtype=dtype, seed=2)
    lay = random_layout(50, density=0.5, block_m=16, block_n=16, heads=4, seed=2)
    out, lse = reference_attention(q, k, v, causal=True, layout=lay)
    assert out.dtype == dtype and lse.dtype == torch.float32
    hi = reference_attention(q.double(), k.double(), v.double(), causal=True, layout=lay)
    lo = reference_attention(q, k, v, causal=True, layout=lay, upcast=False)
    assert lo.out.dtype == dtype and lo.lse.dtype == torch.float32
    # upcast result is rounded once at the end; same-dtype matmuls are no better than that
    e_up = float((out.double() - hi.out).abs().max())
    e_lo = float((lo.out.double() - hi.out).abs().max())
    eps = torch.finfo(dtype).eps
    assert e_up <= REF_UPCAST_EPS_FACTOR * eps * float(hi.out.abs().max()) + REF_UPCAST_ATOL
    assert e_lo >= e_up * 0.5 and e_lo < REF_HALF_SAME_DTYPE_ERR_MAX


def test_large_magnitude_inputs_are_stable():
    q, k, v = random_qkv(1, 2, 80, 16, dtype=torch.float32, seed=4, scale=100.0)
    out, lse = reference_attention(q, k, v, causal=True, chunk_size=16)
    hi = reference_attention(q.double(), k.double(), v.double(), causal=True)
    assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(lse).all())
    assert float((out.double() - hi.out).abs().max()) < REF_FP32_OUT_ATOL
    assert float(((lse.double() - hi.lse) / hi.lse.abs().clamp(min=1)).abs().max()) < REF_FP32_LSE_REL


def test_expanded_layout_views_are_accepted():
    lay = make_pattern("sliding_window", 96, block_m=32, block_n=32, heads=4, batch=2, window_blocks=2)
    assert lay.kv_indices.stride(0) == 0 and lay.kv_indices.stride(1) == 0
    q, k, v = random_qkv(2, 4, 96, 8, kv_heads=1, dtype=F64, seed=5)
    _check(q, k, v, causal=True, layout=lay)
    _check(q, k, v, causal=True, layout=lay.contiguous())


def test_pv_threshold_keeps_lse_exact_and_counts_tiles():
    # a strong sink in key block 0 makes later tiles negligible for every row
    q, k, v = structured_qkv(1, 2, 128, 16, dtype=F64, seed=6, local_strength=0.0, sink_tokens=4, sink_strength=20.0)
    lay = make_pattern("dense", 128, block_m=32, block_n=32, heads=2)
    base = reference_attention(q, k, v, causal=True, layout=lay)
    stats: dict = {}
    skip = reference_attention(q, k, v, causal=True, layout=lay, pv_threshold=1.0, stats=stats)
    assert stats["visited_tiles"] == 2 * 10  # 4 query blocks: 1 + 2 + 3 + 4 causal tiles, 2 heads
    assert 0 < stats["pv_skipped_tiles"] < stats["visited_tiles"]
    assert float((skip.lse - base.lse).abs().max()) <= SDPA_FP64_ATOL
    assert float((skip.out - base.out).abs().max()) > 0  # something was skipped
    stats2: dict = {}
    none = reference_attention(q, k, v, causal=True, layout=lay, pv_threshold=1e9, stats=stats2)
    assert stats2["pv_skipped_tiles"] == 0
    assert float((none.out - base.out).abs().max()) <= SDPA_FP64_ATOL


def test_public_attention_dispatches_to_reference_on_cpu():
    q, k, v = random_qkv(1, 4, 40, 8, kv_heads=2, dtype=F64, seed=8)
    lay = random_layout(40, density=0.5, block_m=16, block_n=16, heads=4, seed=8)
    want = reference_attention(q, k, v, causal=True, layout=lay)
    for got in (attention(q, k, v, causal=True, layout=lay, backend="reference"),
                block_sparse_attention(q, k, v, lay, causal=True, backend="reference"),
                sparseattn.attention(q, k, v, causal=True, layout=lay)):
        assert torch.equal(got.out, want.out) and torch.equal(got.lse, want.lse)


def test_unknown_backend_and_missing_layout_raise():
    q, k, v = random_qkv(1, 1, 8, 8, seed=0)
    with pytest.raises(ValueError, match=r"attention: backend is unknown"):
        attention(q, k, v, backend="cuda-magic")
    with pytest.raises(ValueError, match=r"block_sparse_attention: layout is required"):
        block_sparse_attention(q, k, v, None)  # type: ignore[arg-type]


def test_sdpa_reference_empty_rows_are_zero_not_nan():
    q, k, v = random_qkv(1, 1, 8, 4, seqlen_kv=3, dtype=F64, seed=0)
    out = sdpa_reference(q, k, v, causal=True)
    assert not bool(torch.isnan(out).any()) and float(out[0, 0, :5].abs().max()) == 0.0
