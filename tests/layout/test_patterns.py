"""Static patterns: shapes, structure, causal containment, seeding, density targets."""

from __future__ import annotations

import pytest
import torch

from sparseattn.testing.tolerances import DENSITY_ATOL  # noqa: E402

from sparseattn.layout import (
    PATTERNS,
    block_diagonal_layout,
    causal_block_region,
    causal_layout,
    dense_layout,
    make_pattern,
    pattern_at_density,
    random_layout,
    sink_window_layout,
    sliding_window_layout,
    strided_layout,
)


def _m(lay):
    return lay.to_dense_mask()[0, 0].int().tolist()


GEOMS = [(256, 256, 64, 64), (200, 300, 32, 64), (300, 200, 64, 32), (1, 50, 16, 16), (50, 1, 16, 16), (65, 65, 64, 64)]


@pytest.mark.parametrize("name", sorted(PATTERNS))
@pytest.mark.parametrize("nq,nkv,bm,bn", GEOMS)
@pytest.mark.parametrize("causal", [False, True])
def test_every_pattern_is_valid_and_respects_causal(name, nq, nkv, bm, bn, causal):
    kw = dict(block_m=bm, block_n=bn, batch=2, heads=3)
    if name != "causal":
        kw["causal"] = causal
    lay = make_pattern(name, nq, nkv, **kw)
    lay._check_values()
    assert (lay.batch, lay.heads, lay.seqlen_q, lay.seqlen_kv) == (2, 3, nq, nkv)
    assert lay.kv_indices.shape == (2, 3, -(-nq // bm), -(-nkv // bn))
    if causal or name == "causal":
        region, _ = causal_block_region(nq, nkv, bm, bn)
        assert not bool((lay.to_dense_mask() & ~region).any()), "selected a block above the causal diagonal"


def test_dense_and_causal():
    assert _m(dense_layout(128, block_m=64, block_n=64)) == [[1, 1], [1, 1]]
    assert _m(causal_layout(128, block_m=64, block_n=64)) == [[1, 0], [1, 1]]
    # bottom-right alignment: with Nkv > Nq the single query block sees everything
    assert _m(causal_layout(64, 192, block_m=64, block_n=64)) == [[1, 1, 1]]
    assert _m(causal_layout(192, 64, block_m=64, block_n=64)) == [[0], [0], [1]]


def test_sliding_window():
    assert _m(sliding_window_layout(256, window_blocks=2, block_m=64, block_n=64)) == [
        [1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
    assert _m(sliding_window_layout(256, window_blocks=2, block_m=64, block_n=64, causal=False)) == [
        [1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1], [0, 0, 1, 1]]


def test_strided():
    assert _m(strided_layout(320, stride=2, local_blocks=1, block_m=64, block_n=64)) == [
        [1, 0, 0, 0, 0], [0, 1, 0, 0, 0], [1, 0, 1, 0, 0], [0, 1, 0, 1, 0], [1, 0, 1, 0, 1]]
    assert _m(strided_layout(192, stride=3, local_blocks=2, block_m=64, block_n=64)) == [
        [1, 0, 0], [1, 1, 0], [0, 1, 1]]


def test_block_diagonal():
    assert _m(block_diagonal_layout(256, group_blocks=2, block_m=64, block_n=64)) == [
        [1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]
    assert _m(block_diagonal_layout(256, group_blocks=2, block_m=64, block_n=64, causal=True)) == [
        [1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]


def test_sink_window():
    assert _m(sink_window_layout(320, sink_blocks=1, window_blocks=2, block_m=64, block_n=64)) == [
        [1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 1, 1, 0], [1, 0, 0, 1, 1]]
    assert _m(sink_window_layout(128, sink_blocks=0, window_blocks=1, block_m=64, block_n=64)) == [[1, 0], [0, 1]]


def test_random_is_seeded_and_hits_target_density():
    a = random_layout(1024, density=0.3, seed=5, heads=4, batch=2, causal=True)
    b = random_layout(1024, density=0.3, seed=5, heads=4, batch=2, causal=True)
    c = random_layout(1024, density=0.3, seed=6, heads=4, batch=2, causal=True)
    assert a.equals(b) and not a.equals(c)
    assert abs(a.density(causal=True) - 0.3) < 0.05
    # heads differ (per-head draws) and every row keeps its diagonal block
    m = a.to_dense_mask()
    assert not torch.equal(m[0, 0], m[0, 1])
    assert bool(m[..., torch.arange(16), torch.arange(16)].all())
    nd = random_layout(1024, density=0.5, seed=1, keep_diagonal=False)
    assert abs(nd.density() - 0.5) < DENSITY_ATOL  # round(0.5 * 16) = 8 of 16 per row, exactly


def test_random_density_extremes():
    assert random_layout(256, density=0.0, block_m=64, block_n=64).density() == 0.0
    assert random_layout(256, density=1.0, block_m=64, block_n=64, causal=True).density(causal=True) == 1.0
    # a tiny density still keeps one block per row where any is available
    lay = random_layout(256, density=0.01, block_m=64, block_n=64, causal=True)
    assert lay.kv_num_blocks.min() == 1 and lay.kv_num_blocks.max() == 1


@pytest.mark.parametrize("name", ["sliding_window", "sink_window", "strided", "block_diagonal", "random"])
@pytest.mark.parametrize("target", [0.2, 0.5])
def test_pattern_at_density_gets_close(name, target):
    lay = pattern_at_density(name, 2048, density=target, causal=True, block_m=64, block_n=64, heads=2)
    assert abs(lay.density(causal=True) - target) < 0.1
    dense = pattern_at_density("dense", 256, density=0.1, causal=True)
    assert dense.density(causal=True) == 1.0


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: make_pattern("nope", 64), r"make_pattern: name is not a known pattern"),
        (lambda: random_layout(64, density=1.5), r"random_layout: density is out of range"),
        (lambda: random_layout(64, density=float("nan")), r"random_layout: density is out of range"),
        (lambda: random_layout(64, seed=1.0), r"random_layout: seed must be an int"),
        (lambda: sliding_window_layout(64, window_blocks=0), r"sliding_window_layout: window_blocks must be a positive"),
        (lambda: strided_layout(64, stride=0), r"strided_layout: stride must be a positive integer"),
        (lambda: strided_layout(64, local_blocks=-1), r"strided_layout: local_blocks must be a non-negative"),
        (lambda: block_diagonal_layout(64, group_blocks=-2), r"block_diagonal_layout: group_blocks must be a positive"),
        (lambda: sink_window_layout(64, sink_blocks=-1), r"sink_window_layout: sink_blocks must be a non-negative"),
        (lambda: dense_layout(0), r"dense_layout: seqlen_q must be a positive integer"),
        (lambda: dense_layout(64, block_m=0), r"dense_layout: block_m must be a positive integer"),
        (lambda: dense_layout(64, block_n=-64), r"dense_layout: block_n must be a positive integer"),
        (lambda: dense_layout(64, heads=0), r"dense_layout: heads must be a positive integer"),
        (lambda: pattern_at_density("strided", 64, density=0.5, stride=2), r"pattern_at_density: stride is chosen"),
        (lambda: pattern_at_density("nope", 64, density=0.5), r"pattern_at_density: name is not a known pattern"),
    ],
)
def test_pattern_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("name", ["sliding_window", "sink_window", "block_diagonal", "strided"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("target", [0.05, 0.3, 0.61, 0.9])
def test_pattern_at_density_search_matches_brute_force(name, causal, target):
    knob = {"sliding_window": "window_blocks", "sink_window": "window_blocks", "block_diagonal": "group_blocks",
            "strided": "stride"}[name]
    kw = dict(block_m=16, block_n=16)
    got = pattern_at_density(name, 400, 330, density=target, causal=causal, **kw).density(causal)
    best = min(abs(make_pattern(name, 400, 330, causal=causal, **{knob: v}, **kw).density(causal) - target)
               for v in range(1, 22))
    assert abs(got - target) <= best + 1e-12
