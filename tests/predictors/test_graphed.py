"""GraphedPredictor: CPU behaviour (eager + one warning), interface, GPU graphed-vs-eager equality."""

from __future__ import annotations

import warnings

import pytest
import torch

from sparseattn.layout.block_layout import BlockLayout
from sparseattn.predictors import Predictor, parse_predictor_spec
from sparseattn.predictors.graphed import GraphedPredictor

SPECS = ["mean_sim", "mean_sim:score=mixed,cdf_threshold=0.97,keep_local=8", "sketch_walk:walk=false",
         "sketch_walk", "static:pattern=sink_window,sink_blocks=1,window_blocks=4"]


def _qk(N: int = 512, H: int = 4, Hkv: int = 2, D: int = 32, seed: int = 0, device: str = "cpu",
        dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    walk_q = torch.cumsum(torch.randn(1, H, N, D, generator=g) * 0.1, dim=2)
    walk_k = torch.cumsum(torch.randn(1, Hkv, N, D, generator=g) * 0.1, dim=2)
    q = walk_q + 0.3 * torch.randn(1, H, N, D, generator=g)
    k = walk_k + 0.3 * torch.randn(1, Hkv, N, D, generator=g)
    return q.to(device=device, dtype=dtype), k.to(device=device, dtype=dtype)


def _same(a: BlockLayout, b: BlockLayout) -> bool:
    return (torch.equal(a.kv_num_blocks, b.kv_num_blocks) and torch.equal(a.to_dense_mask(), b.to_dense_mask())
            and (a.block_m, a.block_n, a.seqlen_q, a.seqlen_kv) == (b.block_m, b.block_n, b.seqlen_q, b.seqlen_kv))


@pytest.mark.parametrize("spec", SPECS)
def test_cpu_runs_eagerly_equal_and_warns_once(spec: str) -> None:
    q, k = _qk()
    eager = parse_predictor_spec(spec).predict(q, k, causal=True)
    gp = GraphedPredictor(parse_predictor_spec(spec))
    with pytest.warns(UserWarning, match="CUDA graphs need CUDA"):
        out = gp.predict(q, k, causal=True)
    assert _same(out, eager)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        out2 = gp.predict(q, k, causal=False)
    assert _same(out2, parse_predictor_spec(spec).predict(q, k, causal=False))


def test_interface_conformance() -> None:
    inner = parse_predictor_spec("mean_sim:pv_threshold=8.0")
    gp = GraphedPredictor(inner)
    assert isinstance(gp, Predictor)
    assert gp.name == "graphed:mean_sim"
    assert gp.config is inner.config
    assert getattr(gp.config, "pv_threshold", None) == 8.0
    gp.reset()
    q, k = _qk()
    with pytest.warns(UserWarning):
        lay = gp.predict(q, k, causal=True, layer=3)
    assert isinstance(lay, BlockLayout)
    assert gp.last_scores is inner.last_scores


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="GraphedPredictor: predictor"):
        GraphedPredictor(object())
    with pytest.raises(ValueError, match="warmup"):
        GraphedPredictor(parse_predictor_spec("mean_sim"), warmup=0)
    with pytest.raises(ValueError, match="already graphed"):
        GraphedPredictor(GraphedPredictor(parse_predictor_spec("mean_sim")))
    gp = GraphedPredictor(parse_predictor_spec("mean_sim"))
    q, k = _qk()
    with pytest.raises(ValueError, match="causal"):
        gp.predict(q, k, causal=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="layer"):
        gp.predict(q, k, layer=-1)


# --------------------------------------------------------------------------- GPU only
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


@cuda
@pytest.mark.parametrize("spec", ["mean_sim", "mean_sim:score=mixed,cdf_threshold=0.97,keep_local=8",
                                  "mean_sim:topk=0.3,cdf_threshold=none", "sketch_walk:walk=false", "sketch_walk"])
def test_gpu_graphed_equals_eager_across_replays(spec: str) -> None:
    eager = parse_predictor_spec(spec)
    gp = GraphedPredictor(parse_predictor_spec(spec))
    outs = []
    for seed in range(4):  # fresh inputs every call: the first captures, the rest replay
        q, k = _qk(N=1024, seed=seed, device="cuda", dtype=torch.bfloat16)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback warning: capture must work
            lay = gp.predict(q, k, causal=True)
        outs.append(lay)
        assert _same(lay, eager.predict(q, k, causal=True)), f"replay {seed}"
    # clones: earlier layouts are not overwritten by later replays
    q, k = _qk(N=1024, seed=0, device="cuda", dtype=torch.bfloat16)
    assert _same(outs[0], eager.predict(q, k, causal=True))
    assert len(gp._entries) == 1


@cuda
def test_gpu_sketch_walk_stateful_refused() -> None:
    gp = GraphedPredictor(parse_predictor_spec("sketch_walk"))
    q, k = _qk(N=1024, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(NotImplementedError, match="walk history"):
        gp.predict(q, k, causal=True, layer=2)


@cuda
def test_gpu_capture_failure_falls_back_with_warning() -> None:
    class Syncing:
        name = "syncing"
        config = None

        def predict(self, q, k, *, causal=True, layer=None):  # noqa: ANN001, ANN201
            inner = parse_predictor_spec("mean_sim")
            lay = inner.predict(q, k, causal=causal)
            _ = int(lay.kv_num_blocks.sum().item())  # host sync: not capturable
            return lay

        def reset(self) -> None:
            pass

    gp = GraphedPredictor(Syncing())
    q, k = _qk(N=1024, device="cuda", dtype=torch.bfloat16)
    with pytest.warns(UserWarning, match="capture .* failed"):
        lay = gp.predict(q, k, causal=True)
    assert _same(lay, parse_predictor_spec("mean_sim").predict(q, k, causal=True))
    # the failed capture must not leave the CUDA generators in capture mode
    assert torch.isfinite(torch.randn(8, device="cuda")).all()


def test_graph_capabilities_come_from_the_predictor_not_its_name() -> None:
    """CUDA-graph replays ask the predictor (graph_refusal / graph_layer_key), never branch on its name: SketchWalk
    refuses stateful (layer-set) calls, mean_sim shares one graph per dense/sparse side, others key by layer; a
    custom predictor with its own graph_refusal is refused the same way."""
    from sparseattn.predictors.base import graph_layer_key, graph_refusal

    walk = parse_predictor_spec("sketch_walk")
    msim = parse_predictor_spec("mean_sim:dense_layers=2,cdf_threshold=0.9")
    static = parse_predictor_spec("static")
    assert graph_refusal(walk, None) is None and "walk history" in graph_refusal(walk, 3)
    assert graph_refusal(msim, 3) is None and graph_refusal(static, 3) is None
    assert [graph_layer_key(msim, n) for n in (None, 0, 1, 2, 5)] == ["sparse", ("dense", 0), ("dense", 1), "sparse",
                                                                     "sparse"]
    assert graph_layer_key(static, 4) == 4 and graph_layer_key(walk, 4) == 4

    class Custom:
        name = "custom"
        config = None

        def predict(self, q, k, *, causal=True, layer=None):  # noqa: ANN001, ANN201
            return static.predict(q, k, causal=causal, layer=layer)

        def reset(self) -> None:
            pass

        def graph_refusal(self, layer):  # noqa: ANN001, ANN201
            return "custom state" if layer is not None else None

    g = GraphedPredictor(Custom())
    assert g._stateful_reason(1) == "custom state" and g._stateful_reason(None) is None
    assert GraphedPredictor(msim)._layer_key(7) == "sparse"
