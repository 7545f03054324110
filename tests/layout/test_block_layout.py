"""BlockLayout: construction checks, mask round trips, density, helpers."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sparseattn import BlockLayout
from sparseattn.layout import causal_block_region, make_pattern, random_layout


def _layout(num, idx, bm=16, bn=16, nq=48, nkv=48, **kw):
    return BlockLayout(torch.tensor(num, dtype=torch.int32), torch.tensor(idx, dtype=torch.int32), bm, bn, nq, nkv, **kw)


def test_valid_layout_and_properties():
    lay = _layout([[[1, 2, 3]]], [[[[0, 1, 2], [0, 2, 1], [0, 1, 2]]]])
    assert (lay.batch, lay.heads, lay.num_q_blocks, lay.num_kv_blocks) == (1, 1, 3, 3)
    assert lay.to_dense_mask()[0, 0].tolist() == [[True, False, False], [True, False, True], [True, True, True]]
    assert lay.density() == pytest.approx(6 / 9)
    assert lay.density(causal=True) == pytest.approx(5 / 6)  # block (1, 2) lies above the diagonal
    assert lay.restrict_causal().to_dense_mask()[0, 0, 1].tolist() == [True, False, False]
    assert lay.sparsity() == pytest.approx(1 - 6 / 9)
    assert "seqlen_q=48" in repr(lay)


def test_int64_inputs_are_converted_to_int32():
    lay = BlockLayout(torch.ones(1, 1, 2, dtype=torch.int64), torch.zeros(1, 1, 2, 1, dtype=torch.int64), 8, 8, 16, 8)
    assert lay.kv_num_blocks.dtype == torch.int32 and lay.kv_indices.dtype == torch.int32


@pytest.mark.parametrize(
    "num,idx,match",
    [
        ([[[1, 1, 4]]], [[[[0, 1, 2], [0, 1, 2], [0, 1, 2]]]], r"BlockLayout: kv_num_blocks is out of range"),
        ([[[1, 1, -1]]], [[[[0, 1, 2], [0, 1, 2], [0, 1, 2]]]], r"BlockLayout: kv_num_blocks is out of range"),
        ([[[1, 1, 1]]], [[[[0, 1, 2], [3, 1, 2], [0, 1, 2]]]], r"BlockLayout: kv_indices has a block index out of range"),
        ([[[1, 1, 1]]], [[[[-1, 1, 2], [0, 1, 2], [0, 1, 2]]]], r"BlockLayout: kv_indices has a block index out of range"),
        ([[[2, 1, 1]]], [[[[1, 0, 2], [0, 1, 2], [0, 1, 2]]]], r"BlockLayout: kv_indices must be strictly ascending"),
        ([[[2, 1, 1]]], [[[[1, 1, 2], [0, 1, 2], [0, 1, 2]]]], r"BlockLayout: kv_indices must be strictly ascending"),
    ],
)
def test_invalid_values_raise(num, idx, match):
    with pytest.raises(ValueError, match=match):
        _layout(num, idx)
    _layout(num, idx, validate=False)  # hot paths may skip the value pass; shapes are still checked


def test_padding_past_num_blocks_is_not_checked():
    lay = _layout([[[1, 0, 2]]], [[[[2, 2, 2], [0, 0, 0], [0, 2, 1]]]])
    assert lay.to_dense_mask()[0, 0].tolist() == [[False, False, True], [False, False, False], [True, False, True]]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(kv_num_blocks=torch.ones(1, 3, dtype=torch.int32)), r"BlockLayout: kv_num_blocks has the wrong rank"),
        (dict(kv_indices=torch.zeros(1, 1, 3, dtype=torch.int32)), r"BlockLayout: kv_indices has the wrong rank"),
        (dict(kv_indices=torch.zeros(1, 1, 3, 3)), r"BlockLayout: kv_indices.dtype must be an integer type"),
        (dict(kv_num_blocks=torch.ones(1, 1, 3, dtype=torch.bool)), r"BlockLayout: kv_num_blocks.dtype must be an integer"),
        (dict(kv_num_blocks=torch.ones(1, 1, 4, dtype=torch.int32)), r"BlockLayout: kv_num_blocks does not match seqlen_q"),
        (dict(kv_indices=torch.zeros(1, 1, 3, 4, dtype=torch.int32)), r"BlockLayout: kv_indices does not match"),
        (dict(kv_indices=torch.zeros(1, 2, 3, 3, dtype=torch.int32)), r"BlockLayout: kv_indices does not match"),
        (dict(block_m=0), r"BlockLayout: block_m must be a positive integer"),
        (dict(block_n=-16), r"BlockLayout: block_n must be a positive integer"),
        (dict(block_n=16.0), r"BlockLayout: block_n must be a positive integer"),
        (dict(seqlen_q=0), r"BlockLayout: seqlen_q must be a positive integer"),
        (dict(kv_indices=[[[[0]]]]), r"BlockLayout: kv_indices must be a torch.Tensor"),
    ],
)
def test_invalid_construction_raises(kwargs, match):
    base = dict(kv_num_blocks=torch.ones(1, 1, 3, dtype=torch.int32), kv_indices=torch.zeros(1, 1, 3, 3, dtype=torch.int32),
                block_m=16, block_n=16, seqlen_q=48, seqlen_kv=48)
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        BlockLayout(**base)


@given(
    b=st.integers(1, 2), h=st.integers(1, 3), nq=st.integers(1, 100), nkv=st.integers(1, 100),
    bm=st.sampled_from([1, 8, 16, 33]), bn=st.sampled_from([1, 8, 16, 33]), p=st.floats(0, 1), seed=st.integers(0, 999),
)
def test_mask_round_trip_is_exact(b, h, nq, nkv, bm, bn, p, seed):
    Mb, Nb = -(-nq // bm), -(-nkv // bn)
    mask = torch.rand(b, h, Mb, Nb, generator=torch.Generator().manual_seed(seed)) < p
    lay = BlockLayout.from_dense_mask(mask, block_m=bm, block_n=bn, seqlen_q=nq, seqlen_kv=nkv)
    lay._check_values()  # builders produce valid layouts
    assert torch.equal(lay.to_dense_mask(), mask)
    assert torch.equal(lay.kv_num_blocks, mask.sum(-1).to(torch.int32))
    # padding rows are a permutation of range(Nb): selected ascending first, then the rest ascending
    assert torch.equal(lay.kv_indices.sort(-1).values, torch.arange(Nb, dtype=torch.int32).expand(b, h, Mb, Nb))
    again = BlockLayout.from_dense_mask(lay.to_dense_mask(), block_m=bm, block_n=bn, seqlen_q=nq, seqlen_kv=nkv)
    assert torch.equal(again.kv_indices, lay.kv_indices) and again.equals(lay)
    assert lay.density() == pytest.approx(float(mask.double().mean()))


def test_from_dense_mask_errors():
    f = BlockLayout.from_dense_mask
    with pytest.raises(ValueError, match=r"from_dense_mask: mask.dtype must be bool"):
        f(torch.ones(1, 1, 2, 2), block_m=8, block_n=8, seqlen_q=16, seqlen_kv=16)
    with pytest.raises(ValueError, match=r"from_dense_mask: mask has the wrong rank"):
        f(torch.ones(2, 2, dtype=torch.bool), block_m=8, block_n=8, seqlen_q=16, seqlen_kv=16)
    with pytest.raises(ValueError, match=r"from_dense_mask: mask does not match the lengths and block sizes; expected shape \[B, H, 2, 3\]"):
        f(torch.ones(1, 1, 2, 2, dtype=torch.bool), block_m=8, block_n=8, seqlen_q=16, seqlen_kv=17)


def test_element_mask_and_causal():
    mask = torch.tensor([[[[True, False], [False, True]]]])
    lay = BlockLayout.from_dense_mask(mask, block_m=2, block_n=3, seqlen_q=3, seqlen_kv=5)
    em = lay.element_mask()
    assert em.shape == (1, 1, 3, 5)
    assert em[0, 0].tolist() == [[True, True, True, False, False], [True, True, True, False, False],
                                 [False, False, False, True, True]]
    emc = lay.element_mask(causal=True)  # offset 2: row r sees keys <= r + 2
    assert emc[0, 0].tolist() == [[True, True, True, False, False], [True, True, True, False, False],
                                  [False, False, False, True, True]]
    lay2 = BlockLayout.from_dense_mask(torch.ones(1, 1, 2, 2, dtype=torch.bool), block_m=2, block_n=3, seqlen_q=3, seqlen_kv=5)
    assert lay2.element_mask(causal=True)[0, 0, 0].tolist() == [True, True, True, False, False]


@pytest.mark.parametrize("nq,nkv,bm,bn", [(64, 64, 16, 16), (40, 100, 16, 32), (100, 40, 32, 16), (1, 7, 4, 4), (7, 1, 4, 4)])
def test_causal_block_region_matches_element_mask(nq, nkv, bm, bn):
    any_ok, all_ok = causal_block_region(nq, nkv, bm, bn)
    r = torch.arange(nq)[:, None]
    c = torch.arange(nkv)[None, :]
    allowed = c <= r + (nkv - nq)
    Mb, Nb = any_ok.shape
    for i in range(Mb):
        for j in range(Nb):
            tile = allowed[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn]
            assert bool(any_ok[i, j]) == bool(tile.any())
            assert bool(all_ok[i, j]) == bool(tile.all())


def test_density_causal_counts_only_causal_region():
    full = make_pattern("causal", 256, block_m=64, block_n=64, heads=2)
    assert full.density(causal=True) == 1.0
    assert full.density(causal=False) == pytest.approx(10 / 16)
    dense = make_pattern("dense", 256, block_m=64, block_n=64)
    assert dense.density(causal=True) == 1.0  # blocks above the diagonal are not counted on either side
    per = random_layout(256, density=0.5, heads=3, block_m=64, block_n=64, causal=True).density_per_head(causal=True)
    assert per.shape == (1, 3) and per.dtype == torch.float64


def test_equals_to_contiguous_nbytes():
    lay = make_pattern("sliding_window", 512, block_m=64, block_n=64, heads=8, batch=4)
    assert lay.nbytes == (8 + 64) * 4  # stride-0 views: the pattern is stored once
    c = lay.contiguous()
    assert c.equals(lay) and c.nbytes == 32 * (8 + 64) * 4
    assert lay.to("cpu").equals(lay)
    assert not lay.equals(make_pattern("sliding_window", 512, block_m=64, block_n=64, heads=8, batch=4, window_blocks=2))
    assert not lay.equals(make_pattern("sliding_window", 512, block_m=64, block_n=64, heads=4, batch=4))
    assert not lay.equals("not a layout")  # type: ignore[arg-type]
    d = lay.describe()
    assert (d["q_blocks"], d["kv_blocks"], d["heads"], d["batch"]) == (8, 8, 8, 4)
