"""Conversions: top-k lists and FlexAttention BlockMask, round trips and attention parity."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sparseattn import (
    BlockLayout,
    layout_from_flex_block_mask,
    layout_from_mask,
    layout_from_topk,
    layout_to_flex_block_mask,
    layout_to_mask,
    layout_to_topk,
    random_layout,
    reference_attention,
)
from sparseattn.layout.convert import flex_attention_available
from sparseattn.testing.inputs import random_qkv
from sparseattn.testing.tolerances import SDPA_FP64_ATOL

needs_flex = pytest.mark.skipif(flex_attention_available() is not None, reason=str(flex_attention_available()))


@given(nq=st.integers(1, 120), nkv=st.integers(1, 120), bm=st.sampled_from([8, 16, 32]), bn=st.sampled_from([8, 16, 32]),
       p=st.floats(0, 1), seed=st.integers(0, 999))
def test_mask_and_topk_round_trips(nq, nkv, bm, bn, p, seed):
    lay = random_layout(nq, nkv, density=p, seed=seed, block_m=bm, block_n=bn, heads=2, batch=2, keep_diagonal=False)
    mask = layout_to_mask(lay)
    assert layout_from_mask(mask, block_m=bm, block_n=bn, seqlen_q=nq, seqlen_kv=nkv).equals(lay)
    topk = layout_to_topk(lay)
    assert topk.dtype == torch.int64 and topk.shape[:3] == lay.kv_num_blocks.shape
    assert topk.shape[3] == int(lay.kv_num_blocks.max())
    back = layout_from_topk(topk, block_m=bm, block_n=bn, seqlen_q=nq, seqlen_kv=nkv)
    assert back.equals(lay)
    # any order and extra -1 padding give the same layout
    k = topk.shape[3] + 2
    wide = layout_to_topk(lay, k=k)
    perm = torch.argsort(torch.rand(wide.shape, generator=torch.Generator().manual_seed(seed)), dim=-1)
    shuffled = torch.gather(wide, -1, perm).to(torch.int32)
    assert layout_from_topk(shuffled, block_m=bm, block_n=bn, seqlen_q=nq, seqlen_kv=nkv).equals(lay)


def test_topk_values():
    mask = torch.tensor([[[[True, False, True], [False, False, False]]]])
    lay = layout_from_mask(mask, block_m=4, block_n=4, seqlen_q=8, seqlen_kv=12)
    assert layout_to_topk(lay).tolist() == [[[[0, 2], [-1, -1]]]]
    assert layout_to_topk(lay, k=5).tolist() == [[[[0, 2, -1, -1, -1], [-1, -1, -1, -1, -1]]]]
    lay2 = layout_from_topk(torch.tensor([[[[2, -1, 0], [-1, -1, -1]]]]), block_m=4, block_n=4, seqlen_q=8, seqlen_kv=12)
    assert lay2.equals(lay)


@pytest.mark.parametrize(
    "indices,kw,match",
    [
        (torch.tensor([[[[0, 3]]]]), {}, r"layout_from_topk: indices has a block index out of range; expected values in \[0, 3\)"),
        (torch.tensor([[[[0, -2]]]]), {}, r"layout_from_topk: indices has a block index out of range"),
        (torch.tensor([[[[1, 1]]]]), {}, r"layout_from_topk: indices has duplicate block indices"),
        (torch.tensor([[[0, 1]]]), {}, r"layout_from_topk: indices has the wrong rank"),
        (torch.tensor([[[[0.0, 1.0]]]]), {}, r"layout_from_topk: indices.dtype must be an integer type"),
        (torch.tensor([[[[0], [1]]]]), {}, r"layout_from_topk: indices has the wrong number of query blocks"),
        (torch.tensor([[[[0]]]]), {"block_n": 0}, r"layout_from_topk: block_n must be a positive integer"),
    ],
)
def test_topk_bad_input(indices, kw, match):
    args = dict(block_m=8, block_n=8, seqlen_q=8, seqlen_kv=24)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        layout_from_topk(indices, **args)


def test_topk_k_too_small():
    lay = random_layout(64, density=1.0, block_m=16, block_n=16)
    with pytest.raises(ValueError, match=r"layout_to_topk: k is smaller than the number of blocks some row selects"):
        layout_to_topk(lay, k=2)
    with pytest.raises(ValueError, match=r"layout_to_topk: k must be a positive integer"):
        layout_to_topk(lay, k=0)


def _flex(flex_attention, q, k, v, bmask):
    try:
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:  # torch < 2.9
        return flex_attention(q, k, v, block_mask=bmask, enable_gqa=True, return_lse=True)
    out, aux = flex_attention(q, k, v, block_mask=bmask, enable_gqa=True, return_aux=AuxRequest(lse=True))
    return out, aux.lse


@needs_flex
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("nq,nkv,bm,bn", [(64, 64, 16, 16), (100, 77, 16, 32), (77, 100, 32, 16), (130, 130, 64, 64),
                                          (1, 40, 16, 16), (40, 1, 16, 16)])
@pytest.mark.parametrize("group", [1, 4])
def test_flex_block_mask_matches_reference(nq, nkv, bm, bn, causal, group):
    from torch.nn.attention.flex_attention import flex_attention

    H = 2 * group
    for seed, density in ((0, 0.4), (2, 0.0)):
        q, k, v = random_qkv(2, H, nq, 16, kv_heads=2, seqlen_kv=nkv, dtype=torch.float64, seed=seed)
        lay = random_layout(nq, nkv, density=density, seed=seed, block_m=bm, block_n=bn, batch=2, heads=H, causal=causal,
                            keep_diagonal=False)
        bmask = layout_to_flex_block_mask(lay, causal=causal)
        got, lse = _flex(flex_attention, q, k, v, bmask)
        want = reference_attention(q, k, v, causal=causal, layout=lay)
        assert float((got - want.out).abs().max()) <= SDPA_FP64_ATOL
        fin = torch.isfinite(want.lse)
        assert torch.equal(torch.isfinite(lse), fin)
        if bool(fin.any()):
            assert float((lse[fin] - want.lse[fin]).abs().max()) <= SDPA_FP64_ATOL
        # rows with no key: flex gives out 0 (and lse -inf), like the reference
        assert float(got[~fin].abs().sum()) == 0.0
        # round trip: causal export drops blocks above the diagonal, nothing else
        back = layout_from_flex_block_mask(bmask)
        assert back.equals(lay.restrict_causal() if causal else lay)


@needs_flex
def test_flex_full_and_partial_blocks():
    ones = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    lay = BlockLayout.from_dense_mask(ones, block_m=16, block_n=16, seqlen_q=32, seqlen_kv=32)
    bmask = layout_to_flex_block_mask(lay, causal=True)
    # diagonal blocks need the element mask (partial), (1, 0) is full, (0, 1) lies above the diagonal: dropped
    assert bmask.full_kv_num_blocks[0, 0].tolist() == [0, 1]
    assert bmask.kv_num_blocks[0, 0].tolist() == [1, 1]
    # N_kv = 30 (offset -2): row 16 only sees keys <= 14, so (1, 0) is partial too; the ragged
    # last key block is never full
    lay = BlockLayout.from_dense_mask(ones, block_m=16, block_n=16, seqlen_q=32, seqlen_kv=30)
    bmask = layout_to_flex_block_mask(lay, causal=True)
    assert bmask.full_kv_num_blocks[0, 0].tolist() == [0, 0]
    assert bmask.kv_num_blocks[0, 0].tolist() == [1, 2]
    bmask = layout_to_flex_block_mask(lay, causal=False)
    assert bmask.full_kv_num_blocks[0, 0].tolist() == [1, 1]
    assert bmask.kv_num_blocks[0, 0].tolist() == [1, 1]


def test_from_flex_rejects_other_objects():
    with pytest.raises(ValueError, match=r"layout_from_flex_block_mask: block_mask is not a FlexAttention BlockMask"):
        layout_from_flex_block_mask(object())
