"""Oracle block mass and mean-similarity specifics."""

from __future__ import annotations

import math

import pytest
import torch

from sparseattn.testing.tolerances import (  # noqa: E402
    FP32_ATOL,
    FP32_LOOSE,
    FP32_PROB_ATOL,
    FP32_PROB_RTOL,
    FP32_UNIT_ATOL,
)

from sparseattn.layout.block_layout import causal_block_region
from sparseattn.predictors import make_predictor
from sparseattn.predictors._common import block_pool, mask_to_layout, select_cdf, select_topk
from sparseattn.predictors.mean_similarity import block_self_similarity
from sparseattn.predictors.oracle import exact_block_mass
from sparseattn.testing.inputs import random_qkv, structured_qkv


def _brute_mass(q, k, causal, bm, bn):
    B, H, Nq, D = q.shape
    Hkv, Nkv = k.shape[1], k.shape[2]
    kk = k.double().repeat_interleave(H // Hkv, dim=1)
    s = torch.einsum("bhnd,bhcd->bhnc", q.double(), kk) * D ** -0.5
    if causal:
        r = torch.arange(Nq)[:, None]
        c = torch.arange(Nkv)[None, :]
        s = s.masked_fill(c > r + Nkv - Nq, -math.inf)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    Mb, Nb = -(-Nq // bm), -(-Nkv // bn)
    p = torch.nn.functional.pad(p, (0, Nb * bn - Nkv, 0, Mb * bm - Nq))
    cnt = torch.bincount(torch.arange(Nq) // bm, minlength=Mb).double()
    return p.reshape(B, H, Mb, bm, Nb, bn).sum((3, 5)) / cnt[:, None]


def test_sampled_rows_are_evenly_spaced_and_end_each_block():
    from sparseattn.predictors.oracle import sampled_rows

    rows = sampled_rows(150, 64, 8, torch.device("cpu")).tolist()
    assert rows[:8] == [7, 15, 23, 31, 39, 47, 55, 63] and rows[8:16] == [71, 79, 87, 95, 103, 111, 119, 127]
    assert rows[16:] == [130, 133, 136, 138, 141, 144, 147, 149]  # the last block has 22 rows: 8 of them, 149 last
    assert sampled_rows(10, 4, 8, torch.device("cpu")).tolist() == list(range(10))  # more samples than rows: all
    assert sampled_rows(64, 64, 1, torch.device("cpu")).tolist() == [63]


@pytest.mark.parametrize("Nq,Nkv,causal,rpb", [(150, 150, True, 5), (70, 201, True, 3), (99, 130, False, 8),
                                                (40, 40, True, 1)])
def test_sampled_block_mass_is_the_exact_mass_of_the_sampled_rows(Nq, Nkv, causal, rpb):
    """Every sampled row's probabilities are exact (float64 brute force over all its keys); a block's estimate is
    their mean; with every row sampled it is the exact mass, bitwise."""
    from sparseattn.predictors.oracle import sampled_rows

    q, k, _ = random_qkv(2, 6, Nq, 16, kv_heads=2, seqlen_kv=Nkv, seed=Nq + rpb)
    bm, bn = 32, 16
    got = exact_block_mass(q, k, causal=causal, block_m=bm, block_n=bn, chunk_blocks=3, rows_per_block=rpb)
    B, H, D = 2, 6, 16
    kk = k.double().repeat_interleave(3, dim=1)
    s = torch.einsum("bhnd,bhcd->bhnc", q.double(), kk) * D ** -0.5
    if causal:
        s = s.masked_fill(torch.arange(Nkv)[None, :] > torch.arange(Nq)[:, None] + Nkv - Nq, -math.inf)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    rows = sampled_rows(Nq, bm, rpb, torch.device("cpu"))
    Mb, Nb = -(-Nq // bm), -(-Nkv // bn)
    pc = torch.nn.functional.pad(p[:, :, rows], (0, Nb * bn - Nkv)).reshape(B, H, rows.numel(), Nb, bn).sum(-1)
    ref = torch.zeros(B, H, Mb, Nb, dtype=torch.float64).index_add_(2, rows // bm, pc)
    ref = ref / torch.bincount(rows // bm, minlength=Mb).double()[:, None]
    torch.testing.assert_close(got.double(), ref, atol=FP32_PROB_ATOL, rtol=FP32_PROB_RTOL)
    full = exact_block_mass(q, k, causal=causal, block_m=bm, block_n=bn, chunk_blocks=3, rows_per_block=bm)
    assert torch.equal(full, exact_block_mass(q, k, causal=causal, block_m=bm, block_n=bn, chunk_blocks=3))


def test_sampled_predictor_forced_blocks_and_oracle_limit():
    """All rows sampled, no forced blocks: the oracle's layout; the sink and local blocks are always kept; a
    block holding NaN is kept; a bad config names the field."""
    q, k, _ = structured_qkv(1, 4, 200, 16, kv_heads=2, seed=4)
    sampled = make_predictor("sampled", rows_per_block=32, cdf_threshold=0.8, keep_sink=False, keep_local=0,
                             block_m=32, block_n=32).predict(q, k, causal=True)
    oracle = make_predictor("oracle", cdf_threshold=0.8, block_m=32, block_n=32).predict(q, k, causal=True)
    assert torch.equal(sampled.to_dense_mask(), oracle.to_dense_mask())
    lay = make_predictor("sampled", rows_per_block=2, cdf_threshold=0.3, keep_local=2, block_m=32,
                         block_n=32).predict(q, k, causal=True)
    m = lay.to_dense_mask()
    Mb = m.shape[-2]
    assert m[..., :, 0].all()  # the sink
    idx = torch.arange(Mb)
    assert m[..., idx, idx].all() and m[..., idx[1:], idx[1:] - 1].all()  # the diagonal and the block before it
    qn = q.clone()
    qn[0, 1, 70] = float("nan")
    mn = make_predictor("sampled", rows_per_block=1, cdf_threshold=0.3, block_m=32, block_n=32).predict(
        qn, k, causal=True).to_dense_mask()
    assert mn[0, 1, 70 // 32, : 70 // 32 + 1].all()  # the NaN query block keeps every block it may attend
    with pytest.raises(ValueError, match=r"^SampledMassConfig: rows_per_block"):
        make_predictor("sampled", rows_per_block=0)


@pytest.mark.parametrize("Nq,Nkv,causal", [(150, 150, True), (70, 201, True), (99, 130, False), (40, 40, True)])
def test_exact_block_mass_matches_brute_force(Nq, Nkv, causal):
    q, k, _ = random_qkv(2, 6, Nq, 16, kv_heads=2, seqlen_kv=Nkv, seed=Nq)
    got = exact_block_mass(q, k, causal=causal, block_m=32, block_n=16, chunk_blocks=3)
    ref = _brute_mass(q, k, causal, 32, 16)
    torch.testing.assert_close(got.double(), ref, atol=FP32_PROB_ATOL, rtol=FP32_PROB_RTOL)
    assert torch.allclose(got.sum(-1), torch.ones(()), atol=FP32_LOOSE)


def test_oracle_recall_one_at_full_density_and_cdf_reaches_threshold():
    q, k, _ = structured_qkv(1, 4, 260, 16, kv_heads=2, seed=4)
    mass = exact_block_mass(q, k, causal=True, block_m=32, block_n=32)
    full = make_predictor("oracle", topk=1.0, cdf_threshold=None, block_m=32, block_n=32).predict(q, k, causal=True)
    region, _ = causal_block_region(260, 260, 32, 32)
    assert torch.equal(full.to_dense_mask()[0, 0], region)
    recall = float((mass * full.to_dense_mask()).sum() / mass.sum())
    assert recall == pytest.approx(1.0, abs=FP32_UNIT_ATOL)
    for thr in (0.5, 0.8, 0.95):
        lay = make_predictor("oracle", cdf_threshold=thr, block_m=32, block_n=32).predict(q, k, causal=True)
        kept = (mass * lay.to_dense_mask()).sum(-1)
        assert bool((kept >= thr - 1e-5).all())
        # minimal: dropping the smallest kept block of a row falls below the threshold
        smallest = mass.masked_fill(~lay.to_dense_mask(), math.inf).amin(-1)
        assert bool((kept - smallest < thr + 1e-5).all())


def test_topk_and_cdf_selection_counts():
    scores = torch.tensor([[[[0.1, 0.5, 0.2, 0.2, 0.0]]]])
    allowed = torch.tensor([[True, True, True, True, False]])
    assert select_topk(scores, allowed, 0.5).tolist() == [[[[False, True, True, False, False]]]]  # ceil(0.5*4)=2, ties by index
    assert select_cdf(scores, allowed, 0.5).tolist() == [[[[False, True, False, False, False]]]]
    assert select_cdf(scores, allowed, 0.51).sum() == 2


def test_mask_to_layout_matches_from_dense_mask():
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(2, 3, 7, 9, generator=g) < 0.4
    a = mask_to_layout(mask, block_m=16, block_n=16, seqlen_q=100, seqlen_kv=130)
    a._check_values()
    from sparseattn.layout.block_layout import BlockLayout

    b = BlockLayout.from_dense_mask(mask, block_m=16, block_n=16, seqlen_q=100, seqlen_kv=130)
    assert torch.equal(a.kv_indices, b.kv_indices) and torch.equal(a.kv_num_blocks, b.kv_num_blocks)


def test_self_similarity_formula_matches_pairwise_cosine():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, 45, 8, generator=g) + torch.linspace(0, 2, 8)  # partial last block (45 = 2*16 + 13)
    _, unit, cnt = block_pool(x, 16, normalized=True)
    sim = block_self_similarity(unit, cnt)
    for b in range(3):
        blk = x[0, 1, b * 16:(b + 1) * 16]
        xn = torch.nn.functional.normalize(blk.double(), dim=-1)
        gram = xn @ xn.T
        n = blk.shape[0]
        ref = (gram.sum() - n) / (n * (n - 1))
        assert float(sim[0, 1, b]) == pytest.approx(float(ref), abs=FP32_LOOSE)
    one = block_self_similarity(torch.randn(1, 1, 1, 8), torch.tensor([1.0]))
    assert float(one) == 1.0


def test_mean_sim_untrusted_blocks_and_forced_blocks():
    B, H, N, D, bs = 1, 2, 256, 16, 32
    g = torch.Generator().manual_seed(2)
    base = torch.randn(D, generator=g)
    q = base + 0.05 * torch.randn(B, H, N, D, generator=g)  # every block highly self-similar
    k = base + 0.05 * torch.randn(B, 1, N, D, generator=g)
    q[0, 1, 96:128] = torch.randn(32, D, generator=g)  # head 1, query block 3: dissimilar
    k[0, 0, 32:64] = torch.randn(32, D, generator=g)  # key block 1: dissimilar (for both query heads)
    pred = make_predictor("mean_sim", topk=0.01, cdf_threshold=None, sim_threshold=0.5, keep_sink=True, keep_local=1,
                          block_m=bs, block_n=bs)
    mask = pred.predict(q, k, causal=True).to_dense_mask()[0]
    region, _ = causal_block_region(N, N, bs, bs)
    assert torch.equal(mask[1, 3], region[3])  # dissimilar query block keeps its whole causal row
    assert bool(mask[:, 1:, 1].all())  # dissimilar key block kept by every query block that may see it
    assert bool(mask[:, :, 0].all())  # sink
    assert bool(mask[:, torch.arange(8), torch.arange(8)].all())  # local (diagonal)
    dense = make_predictor("mean_sim", sim_threshold=1.5, block_m=bs, block_n=bs).predict(q, k, causal=True)
    assert dense.density(causal=True) == 1.0


def test_mean_sim_gqa_equals_expanded_keys():
    q, k, _ = structured_qkv(1, 6, 200, 16, kv_heads=2, seed=9)
    pred = make_predictor("mean_sim", cdf_threshold=0.7, sim_threshold=0.0, block_m=32, block_n=32)
    a = pred.predict(q, k, causal=True)
    b = pred.predict(q, k.repeat_interleave(3, dim=1), causal=True)
    assert a.equals(b)
    assert a.density(causal=True) < 1.0


def test_mean_sim_density_monotone_in_cdf():
    q, k, _ = structured_qkv(1, 4, 512, 32, kv_heads=2, seed=3)
    dens = [make_predictor("mean_sim", cdf_threshold=t, sim_threshold=-1.0, keep_sink=False, keep_local=0,
                           block_m=32, block_n=32).predict(q, k, causal=True).density(causal=True)
            for t in (0.3, 0.6, 0.9, 1.0)]
    assert dens == sorted(dens) and dens[0] < dens[-1]


def test_minmax_score_is_an_upper_bound_of_block_scores():
    from sparseattn.predictors._common import block_minmax

    q, k, _ = random_qkv(1, 2, 100, 8, kv_heads=1, seed=5)
    kmin, kmax = block_minmax(k, 16)
    qbar = q[0, 0, :16].mean(0)
    bound = qbar.clamp(min=0) @ kmax[0, 0].T + qbar.clamp(max=0) @ kmin[0, 0].T  # [Nb]
    exact = torch.stack([(k[0, 0, j * 16:(j + 1) * 16] @ qbar).max() for j in range(7)])
    assert bool((bound >= exact - 1e-5).all())
    assert torch.equal(kmax[0, 0, -1], k[0, 0, 96:].amax(0))  # partial last block


@pytest.mark.parametrize("score", ["mean", "minmax", "mixed"])
def test_mean_sim_scores_valid_and_distribution(score):
    q, k, _ = structured_qkv(1, 4, 300, 16, kv_heads=2, seed=6)
    pred = make_predictor("mean_sim", score=score, sim_threshold=-1.0, block_m=32, block_n=32)
    lay = pred.predict(q, k, causal=True)
    lay._check_values()
    torch.testing.assert_close(pred.last_scores.sum(-1), torch.ones(1, 4, 10), atol=FP32_ATOL, rtol=0)
    with pytest.raises(ValueError, match="MeanSimilarityConfig: score is not a known block score"):
        make_predictor("mean_sim", score="max")


def test_mean_sim_dense_layers():
    q, k, _ = structured_qkv(1, 2, 256, 16, seed=7)
    pred = make_predictor("mean_sim", dense_layers=2, sim_threshold=-1.0, cdf_threshold=0.5, block_m=32, block_n=32)
    assert pred.predict(q, k, causal=True, layer=1).density(causal=True) == 1.0
    assert pred.predict(q, k, causal=True, layer=2).density(causal=True) < 1.0
    assert pred.predict(q, k, causal=True, layer=None).density(causal=True) < 1.0
