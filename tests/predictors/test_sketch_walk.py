"""SketchWalk: SRHT, walk algebra, selection budget, reset semantics, decode pooling."""

from __future__ import annotations

import pytest
import torch

from sparseattn.testing.tolerances import FP32_ATOL, FP32_RTOL, SKETCH_ESTIMATE_ATOL, SKETCH_ESTIMATE_RTOL, SKETCH_EXACT_TOL  # noqa: E402

from sparseattn.layout.block_layout import causal_block_region
from sparseattn.predictors import make_predictor
from sparseattn.predictors.sketch_walk import SketchWalkPredictor, srht_sketch
from sparseattn.testing.inputs import structured_qkv


def _qk(seed, N=512, H=4, Hkv=2, D=32, Nkv=None):
    q, k, _ = structured_qkv(1, H, N, D, kv_heads=Hkv, seqlen_kv=Nkv, seed=seed)
    return q, k


def test_srht_exact_at_full_width_and_unbiased():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 24, generator=g), torch.randn(5, 24, generator=g)
    sx, sy = srht_sketch(x, 64, seed=3), srht_sketch(y, 64, seed=3)  # D'=32 <= 64: full width, exact
    torch.testing.assert_close((sx * sy).sum(-1), (x * y).sum(-1), atol=SKETCH_EXACT_TOL, rtol=SKETCH_EXACT_TOL)
    est = torch.stack([(srht_sketch(x, 8, seed=s) * srht_sketch(y, 8, seed=s)).sum(-1) for s in range(400)]).mean(0)
    torch.testing.assert_close(est, (x * y).sum(-1), atol=SKETCH_ESTIMATE_ATOL, rtol=SKETCH_ESTIMATE_RTOL)


def test_block_matrix_row_stochastic_and_causal():
    q, k = _qk(1)
    A = SketchWalkPredictor().block_matrix(q, k, causal=True)
    assert A.shape == (1, 8, 8)
    torch.testing.assert_close(A.sum(-1), torch.ones(1, 8))
    region, _ = causal_block_region(512, 512, 64, 64)
    assert float(A[:, ~region].abs().max()) == 0.0


def test_walk_is_row_stochastic_and_depth1_first_layer_equals_sketch():
    q, k = _qk(2)
    p = make_predictor("sketch_walk", block_m=32, block_n=32, dense_layers=0)
    for layer in range(3):
        p.predict(q, k, causal=True, layer=layer)
        torch.testing.assert_close(p.last_scores.sum(-1), torch.ones(1, 1, 16), atol=FP32_ATOL, rtol=0)
    d1 = make_predictor("sketch_walk", depth=1, block_m=32, block_n=32)
    nowalk = make_predictor("sketch_walk", walk=False, block_m=32, block_n=32)
    a = d1.predict(q, k, causal=True)
    b = nowalk.predict(q, k, causal=True)
    torch.testing.assert_close(d1.last_scores, nowalk.last_scores)
    assert a.equals(b)


def test_walk_formula_second_layer():
    q0, k0 = _qk(3)
    q1, k1 = _qk(4)
    beta, d = 0.25, 3
    p = make_predictor("sketch_walk", block_m=32, block_n=32, beta=beta, depth=d, dense_layers=0)
    p.predict(q0, k0, causal=True, layer=0)
    W0 = p.last_scores[:, 0]
    p.predict(q1, k1, causal=True, layer=1)
    A = p.block_matrix(q1, k1, causal=True)
    A2, A3 = A @ A, A @ A @ A
    expect = (1 - beta) * (A + beta * A2 + beta ** 2 * A3) + beta ** d * (W0 @ A3)
    torch.testing.assert_close(p.last_scores[:, 0], expect, atol=FP32_ATOL, rtol=FP32_RTOL)
    A0 = p.block_matrix(q0, k0, causal=True)
    first = (1 - beta) / (1 - beta ** d) * (A0 + beta * A0 @ A0 + beta ** 2 * A0 @ A0 @ A0)
    torch.testing.assert_close(W0, first, atol=FP32_ATOL, rtol=FP32_RTOL)


def test_reset_semantics():
    layers = [_qk(10 + i) for i in range(4)]
    p = make_predictor("sketch_walk", block_m=32, block_n=32, dense_layers=1)

    def run(pred):
        return [pred.predict(q, k, causal=True, layer=i) for i, (q, k) in enumerate(layers)]

    first = run(p)
    assert p.state["last_layer"] == 3 and p.state["has_history"]
    p.reset()
    assert p.state["last_layer"] is None and not p.state["has_history"]
    second = run(p)
    assert all(a.equals(b) for a, b in zip(first, second))
    # a new pass (layer index goes back) resets automatically: same as a fresh predictor
    third = run(p)
    assert all(a.equals(b) for a, b in zip(first, third))
    # state carries within a pass: layer 1 depends on what layer 0 saw
    other = make_predictor("sketch_walk", block_m=32, block_n=32, dense_layers=1, top_fraction=0.1)
    other.predict(*layers[0], causal=True, layer=0)
    other.predict(*layers[1], causal=True, layer=1)
    s_with = other.last_scores.clone()
    other.reset()
    other.predict(*layers[3], causal=True, layer=0)
    other.predict(*layers[1], causal=True, layer=1)
    assert not torch.allclose(s_with, other.last_scores)
    # layer=None neither reads nor writes the walk history
    other.reset()
    other.predict(*layers[0], causal=True, layer=None)
    assert other.state["last_layer"] is None and not other.state["has_history"]


def test_dense_layers_and_budget():
    q, k = _qk(5, N=4096, H=2, Hkv=1, D=16)
    p = make_predictor("sketch_walk", dense_layers=2)
    assert p.predict(q, k, causal=True, layer=0).density(causal=True) == 1.0
    assert p.predict(q, k, causal=True, layer=1).density(causal=True) == 1.0
    lay = p.predict(q, k, causal=True, layer=2)
    mask = lay.to_dense_mask()[0, 0]
    # 64 blocks: row 63 has 64 allowed -> 2 sinks + 4 window + ceil(0.125*58)=8 top = 14
    assert int(mask[63].sum()) == 14
    assert bool(mask[:, 0].all()) and bool(mask[torch.arange(64), torch.arange(64)].all())
    assert 0.2 < lay.density(causal=True) < 0.45
    assert torch.equal(lay.to_dense_mask()[0, 0], lay.to_dense_mask()[0, 1])  # shared by heads


def test_decode_pools_last_queries():
    N = 300
    q, k = _qk(6, N=N, H=2, Hkv=1, D=16)
    p = make_predictor("sketch_walk", block_m=16, block_n=16, dense_layers=0, decode_window=8)
    p.predict(q[:, :, :N - 2], k[:, :, :N - 2], causal=True, layer=0)  # prefill
    assert p.state["pooled_layers"] == [0]
    p.reset()  # per-pass reset keeps the decode pool
    p.predict(q[:, :, N - 2:N - 1], k[:, :, :N - 1], causal=True, layer=0)  # decode step 1
    lay = p.predict(q[:, :, N - 1:], k, causal=True, layer=0)  # decode step 2 (new pass: auto reset)
    assert lay.kv_num_blocks.shape == (1, 2, 1)
    pooled = p.block_matrix(q[:, :, N - 8:], k, causal=True)
    torch.testing.assert_close(p.last_scores[:, 0], pooled)  # first layer of the pass: A from pooled queries
    # a break in continuity (a fresh sequence) uses only the current query
    p.reset_sequence()
    p.predict(q[:, :, N - 1:], k, causal=True, layer=0)
    torch.testing.assert_close(p.last_scores[:, 0], p.block_matrix(q[:, :, N - 1:], k, causal=True))


def test_per_head_walk_row_stochastic_and_heads_differ():
    q, k = _qk(8, N=1024, H=4, Hkv=2, D=32)
    p = make_predictor("sketch_walk", per_head=True, dense_layers=0, top_fraction=0.2)
    for layer in range(2):
        lay = p.predict(q, k, causal=True, layer=layer)
        assert p.last_scores.shape == (1, 4, 16, 16)
        torch.testing.assert_close(p.last_scores.sum(-1), torch.ones(1, 4, 16), atol=FP32_ATOL, rtol=0)
    shared = make_predictor("sketch_walk", dense_layers=0, top_fraction=0.2).predict(q, k, causal=True, layer=0)
    assert lay.density(causal=True) == pytest.approx(shared.density(causal=True))  # same budget per row
    m = lay.to_dense_mask()[0]
    assert any(not torch.equal(m[0], m[h]) for h in range(1, 4))
