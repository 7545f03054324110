"""Invariants shared by every predictor: layout validity, causality, GQA, odd lengths, determinism, configs."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from sparseattn.layout.block_layout import causal_block_region
from sparseattn.predictors import PREDICTORS, config_from_json, config_to_json, make_predictor, parse_predictor_spec
from sparseattn.predictors.mean_similarity import MeanSimilarityConfig
from sparseattn.predictors.oracle import OracleConfig
from sparseattn.predictors.sketch_walk import SketchWalkConfig
from sparseattn.predictors.static import StaticConfig
from sparseattn.testing.inputs import random_qkv, structured_qkv

SPECS = [
    "static:pattern=dense",
    "static:pattern=causal",
    "static:pattern=local,window_blocks=2",
    "static:pattern=sliding_window,window_blocks=3",
    "static:pattern=strided,stride=3,local_blocks=1",
    "static:pattern=random,density=0.4,seed=3",
    "static:pattern=block_diagonal,group_blocks=2",
    "static:pattern=sink_window,sink_blocks=1,window_blocks=2",
    "oracle",
    "oracle:topk=0.3,cdf_threshold=None",
    "sampled",
    "sampled:rows_per_block=3,topk=0.3,cdf_threshold=None,keep_sink=false,keep_local=0",
    "mean_sim",
    "mean_sim:topk=0.3,cdf_threshold=None,sim_threshold=-1,keep_sink=false,keep_local=0",
    "mean_sim:cdf_threshold=0.5,sim_threshold=-1",
    "sketch_walk",
    "sketch_walk:walk=false,dense_layers=0",
    "sketch_walk:sketch_dim=8,beta=0.5,depth=2,top_fraction=0.3",
    "sketch_walk:per_head=true,top_fraction=0.2",
]

# (B, H, H_kv, N_q, N_kv, D, block_m, block_n)
SHAPES = [
    (1, 2, 2, 256, 256, 32, 32, 32),  # block multiples
    (2, 6, 2, 203, 203, 16, 32, 32),  # odd length, GQA 3
    (1, 4, 1, 77, 301, 16, 16, 32),  # N_q < N_kv (chunked prefill), GQA 4, block_m != block_n
    (1, 2, 1, 1, 150, 16, 16, 16),  # decode-like
]


def _spec_with_blocks(spec: str, bm: int, bn: int) -> str:
    sep = "," if ":" in spec else ":"
    return f"{spec}{sep}block_m={bm},block_n={bn}"


def _inputs(shape, seed, kind="structured"):
    B, H, Hkv, Nq, Nkv, D, _, _ = shape
    gen = structured_qkv if kind == "structured" else random_qkv
    q, k, _ = gen(B, H, Nq, D, kv_heads=Hkv, seqlen_kv=Nkv, seed=seed)
    return q, k


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_layout_valid_causal_and_shaped(spec, shape, causal):
    B, H, Hkv, Nq, Nkv, D, bm, bn = shape
    if spec == "static:pattern=causal" and not causal:
        pytest.skip("pattern=causal needs causal=True (tested separately)")
    q, k = _inputs(shape, seed=hash((spec, shape)) % 1000)
    pred = parse_predictor_spec(_spec_with_blocks(spec, bm, bn))
    layout = pred.predict(q, k, causal=causal, layer=3)
    layout._check_values()  # ranges + strictly ascending
    assert (layout.batch, layout.heads) == (B, H)
    assert (layout.seqlen_q, layout.seqlen_kv, layout.block_m, layout.block_n) == (Nq, Nkv, bm, bn)
    mask = layout.to_dense_mask()
    if causal:
        region, _ = causal_block_region(Nq, Nkv, bm, bn)
        assert not bool((mask & ~region).any()), "selected a block outside the causal region"
    d = layout.density(causal=causal)
    assert 0.0 < d <= 1.0


@pytest.mark.parametrize("spec", SPECS)
def test_deterministic(spec):
    shape = (1, 4, 2, 190, 190, 16, 32, 32)
    q, k = _inputs(shape, seed=11)
    a = parse_predictor_spec(_spec_with_blocks(spec, 32, 32)).predict(q, k, causal=True, layer=2)
    b = parse_predictor_spec(_spec_with_blocks(spec, 32, 32)).predict(q.clone(), k.clone(), causal=True, layer=2)
    assert a.equals(b)


def test_static_causal_pattern_requires_causal():
    q, k = _inputs((1, 2, 2, 64, 64, 16, 16, 16), 0)
    with pytest.raises(ValueError, match="StaticPredictor.predict: causal must be True"):
        make_predictor("static", pattern="causal").predict(q, k, causal=False)


def test_static_dense_full_density_and_matches_patterns():
    from sparseattn.layout.patterns import sink_window_layout

    q, k = _inputs((1, 3, 1, 300, 300, 16, 32, 32), 0)
    assert make_predictor("static", pattern="dense", block_m=32, block_n=32).predict(q, k, causal=True).density(True) == 1.0
    lay = make_predictor("static", pattern="sink_window", sink_blocks=2, window_blocks=3, block_m=32,
                         block_n=32).predict(q, k, causal=True)
    ref = sink_window_layout(300, 300, sink_blocks=2, window_blocks=3, block_m=32, block_n=32, heads=3)
    assert lay.equals(ref)


def test_registry_and_spec_parsing():
    make_predictor("static")  # triggers registration
    assert {"static", "oracle", "mean_sim", "sketch_walk"} <= set(PREDICTORS)
    p = parse_predictor_spec("mean_sim:cdf_threshold=0.8,sim_threshold=0.3,keep_local=2,pv_threshold=4")
    assert p.config == MeanSimilarityConfig(cdf_threshold=0.8, sim_threshold=0.3, keep_local=2, pv_threshold=4)
    with pytest.raises(ValueError, match="make_predictor: name is not a registered predictor"):
        parse_predictor_spec("nope")


CONFIGS = [StaticConfig(pattern="random", density=0.3, seed=5), OracleConfig(topk=0.2, cdf_threshold=None),
           MeanSimilarityConfig(pv_threshold=5.0, keep_local=2), SketchWalkConfig(beta=0.5, walk=False)]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: type(c).__name__)
def test_config_json_round_trip(cfg):
    text = config_to_json(cfg)
    data = json.loads(text)
    assert data["version"] == 1 and data["type"] == type(cfg).__name__
    assert config_from_json(text, type(cfg)) == cfg
    with pytest.raises(ValueError, match="is not supported"):
        dataclasses.replace(cfg, version=99)


BAD = [
    (StaticConfig, {"pattern": "zigzag"}, "StaticConfig: pattern is not a known pattern"),
    (StaticConfig, {"window_blocks": 0}, "StaticConfig: window_blocks must be a positive integer"),
    (StaticConfig, {"density": 1.5}, "StaticConfig: density is out of range"),
    (StaticConfig, {"block_m": 32.0}, "StaticConfig: block_m must be a positive integer"),
    (OracleConfig, {"topk": 0.2}, "OracleConfig: topk/cdf_threshold exactly one must be set"),
    (OracleConfig, {"cdf_threshold": 0.0}, "OracleConfig: cdf_threshold is out of range"),
    (OracleConfig, {"cdf_threshold": None}, "OracleConfig: topk/cdf_threshold exactly one must be set"),
    (MeanSimilarityConfig, {"sim_threshold": 3.0}, "MeanSimilarityConfig: sim_threshold is out of range"),
    (MeanSimilarityConfig, {"keep_sink": 1}, "MeanSimilarityConfig: keep_sink must be a bool"),
    (MeanSimilarityConfig, {"keep_local": -1}, "MeanSimilarityConfig: keep_local must be a non-negative integer"),
    (MeanSimilarityConfig, {"pv_threshold": 0.0}, "MeanSimilarityConfig: pv_threshold must be a positive"),
    (MeanSimilarityConfig, {"cdf_threshold": 1.2}, "MeanSimilarityConfig: cdf_threshold is out of range"),
    (SketchWalkConfig, {"beta": 1.0}, "SketchWalkConfig: beta is out of range"),
    (SketchWalkConfig, {"depth": 0}, "SketchWalkConfig: depth must be a positive integer"),
    (SketchWalkConfig, {"top_fraction": -0.1}, "SketchWalkConfig: top_fraction is out of range"),
    (SketchWalkConfig, {"sketch_dim": 0}, "SketchWalkConfig: sketch_dim must be a positive integer"),
    (SketchWalkConfig, {"walk": "yes"}, "SketchWalkConfig: walk must be a bool"),
    (SketchWalkConfig, {"dense_layers": -1}, "SketchWalkConfig: dense_layers must be a non-negative integer"),
]


@pytest.mark.parametrize("cls,kwargs,msg", BAD, ids=[f"{c.__name__}-{next(iter(k))}" for c, k, _ in BAD])
def test_config_validation(cls, kwargs, msg):
    with pytest.raises(ValueError, match=msg.replace("(", r"\(")) as exc:
        cls(**kwargs)
    assert "; expected " in str(exc.value) and ", got " in str(exc.value)


@pytest.mark.parametrize("name", ["static", "oracle", "sampled", "mean_sim", "sketch_walk"])
def test_bad_inputs(name):
    pred = make_predictor(name)
    q = torch.randn(1, 4, 64, 16)
    with pytest.raises(ValueError, match="heads must divide q heads"):
        pred.predict(q, torch.randn(1, 3, 64, 16))
    with pytest.raises(ValueError, match="head_dim differs from q"):
        pred.predict(q, torch.randn(1, 4, 64, 8))
    with pytest.raises(ValueError, match="has the wrong rank"):
        pred.predict(q[0], torch.randn(1, 4, 64, 16))
    with pytest.raises(ValueError, match="causal must be a bool"):
        pred.predict(q, torch.randn(1, 4, 64, 16), causal=1)
