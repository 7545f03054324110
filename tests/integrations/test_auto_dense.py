"""patch_model(dense_above="auto"): a sparse layer above its measured crossover runs the model's dense attention.

On the CPU the lookup uses the device name ``"cpu"``; these tests point ``SPARSEATTN_CROSSOVER`` at a file
that measures it, so the decision logic (measure, lag, fall back, re-measure) runs without a GPU.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sparseattn.integrations import patch_model  # noqa: E402
from sparseattn.integrations.auto_dense import AUTO_RECHECK  # noqa: E402
from sparseattn.testing.tolerances import FP32_ATOL, FP32_RTOL, HALF_MODEL_REL  # noqa: E402


def _llama(layers: int = 2):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=96, intermediate_size=128, num_hidden_layers=layers,
                                   num_attention_heads=6, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=1024, attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(cfg).eval()


def _table(tmp_path, monkeypatch, crossover: float, **kw):
    e = {"dtype": "float32", "heads": 6, "kv_heads": 2, "head_dim": 16, "seqlen": 256, "crossover": crossover,
         "dense_ms": 1.0, "densities": [0.5, 1.0], "sparse_ms": [0.5, 1.0]}
    e.update(kw)
    p = tmp_path / "cross.json"
    p.write_text(json.dumps({"version": 1, "devices": {"cpu": [e]}}))
    monkeypatch.setenv("SPARSEATTN_CROSSOVER", str(p))


@torch.no_grad()
def test_auto_falls_back_one_call_late_and_remeasures(tmp_path, monkeypatch) -> None:
    _table(tmp_path, monkeypatch, 0.9)
    model = _llama()
    ids = torch.randint(0, 97, (1, 256), generator=torch.Generator().manual_seed(1))
    ref = model(ids).logits
    # every block (density 1.0 > 0.9): the first call measures and runs sparse, the later ones run the model's SDPA
    with patch_model(model, pattern="dense:block_m=32,block_n=32", dense_above="auto") as h:
        model(ids)
        assert h.dense_fallbacks == {} and h.counts["prefill_sparse"] == 2
        out = model(ids).logits
        assert h.dense_fallbacks == {0: 1, 1: 1}
        torch.testing.assert_close(out, ref, atol=FP32_ATOL, rtol=FP32_RTOL)  # exact dense attention (SDPA, GQA)
        for _ in range(AUTO_RECHECK - 2):
            model(ids)
        assert h.counts["prefill_sparse"] == 2
        model(ids)  # call AUTO_RECHECK + 1 of each layer measures again: sparse once
        assert h.counts["prefill_sparse"] == 4 and h.dense_fallbacks == {0: AUTO_RECHECK - 1, 1: AUTO_RECHECK - 1}
        rep = h.sparsity_report()
    assert rep["dense_above"] == "auto"
    auto = rep["layers"]["0"]["auto_dense"]
    assert len(auto) == 1 and auto[0]["verdict"] == "dense" and auto[0]["crossover"] == pytest.approx(0.9)
    assert auto[0]["last_density"] == pytest.approx(1.0) and auto[0]["dense_calls"] == AUTO_RECHECK - 1
    assert rep["layers"]["0"]["dense_fallbacks"] == AUTO_RECHECK - 1 and rep["layers"]["0"]["density"] == 1.0


@torch.no_grad()
def test_auto_keeps_layers_below_the_crossover_sparse(tmp_path, monkeypatch) -> None:
    _table(tmp_path, monkeypatch, 0.9)
    model = _llama()
    ids = torch.randint(0, 97, (1, 256), generator=torch.Generator().manual_seed(2))
    with patch_model(model, pattern="sink_window:window_blocks=1,block_m=32,block_n=32", dense_above="auto") as h:
        for _ in range(3):
            model(ids)
        rep = h.sparsity_report()
    assert h.dense_fallbacks == {} and h.counts["prefill_sparse"] == 6
    auto = rep["layers"]["1"]["auto_dense"][0]
    assert auto["verdict"] == "sparse" and auto["last_density"] < 0.9


@torch.no_grad()
def test_auto_without_a_measured_crossover_warns_and_stays_sparse(tmp_path, monkeypatch) -> None:
    _table(tmp_path, monkeypatch, 0.5, head_dim=64)  # measured for another head_dim only
    model = _llama()
    ids = torch.randint(0, 97, (1, 256), generator=torch.Generator().manual_seed(3))
    with pytest.warns(UserWarning, match="dense_above='auto' has no crossover .*head_dim=16"):
        with patch_model(model, pattern="dense:block_m=32,block_n=32", dense_above="auto") as h:
            model(ids)
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # warned once per reason, not per call
                model(ids)
            rep = h.sparsity_report()
    assert h.dense_fallbacks == {} and h.counts["prefill_sparse"] == 4
    assert rep["layers"]["0"]["auto_dense"][0]["crossover"] is None


def test_auto_argument_errors() -> None:
    model = _llama()
    with pytest.raises(ValueError, match=r"^patch_model: dense_above must be a density in \(0, 1\], 'auto' or None"):
        patch_model(model, pattern="dense", dense_above="always")


def _gpu_table(tmp_path, monkeypatch, crossover: float) -> None:
    e = {"dtype": "bfloat16", "heads": 6, "kv_heads": 2, "head_dim": 64, "seqlen": 1024, "crossover": crossover,
         "dense_ms": 1.0, "densities": [0.5, 1.0], "sparse_ms": [0.5, 1.0]}
    p = tmp_path / "cross.json"
    p.write_text(json.dumps({"version": 1, "devices": {torch.cuda.get_device_name(): [e]}}))
    monkeypatch.setenv("SPARSEATTN_CROSSOVER", str(p))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="layer graphs and pinned-memory measurements need CUDA")
@torch.no_grad()
def test_auto_on_cuda_with_layer_graphs(tmp_path, monkeypatch) -> None:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=384, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=6, num_key_value_heads=2, head_dim=64,
                                   max_position_embeddings=2048, attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    ids = torch.randint(0, 97, (1, 1024), generator=torch.Generator().manual_seed(4)).cuda()
    ref = model(ids).logits
    _gpu_table(tmp_path, monkeypatch, 0.9)
    # every block: measured once on the kernel, then dense SDPA from layer graphs (the unpatched logits within bf16)
    with patch_model(model, pattern="dense:block_m=128,block_n=128", dense_above="auto") as h:
        model(ids)
        torch.cuda.synchronize()
        outs = [model(ids).logits for _ in range(3)]
        assert h.dense_fallbacks == {0: 3, 1: 3} and h.layer_graph_status == {0: "graphed", 1: "graphed"}
        assert h.counts["prefill_dense"] == 6 and h._layer_graphs.replays >= 4
        assert all(fl.dense for fl in h._layer_graphs.fast.values()) and len(h._layer_graphs.fast) == 2
        assert h.sparsity_report()["layers"]["0"]["density"] == 1.0
    for out in outs:
        assert torch.equal(out, outs[0])  # replays of one graph: identical
        assert float((out - ref).abs().max() / ref.abs().max()) <= HALF_MODEL_REL
    # a sparse predictor below the crossover: graphed, measured from the graph's device-side sum, never dense
    spec = "mean_sim:topk=0.2,cdf_threshold=none,sim_threshold=-1,block_m=128,block_n=128"  # ~2/3 of 36 blocks
    with patch_model(model, predictor=spec, dense_above="auto") as h:
        for _ in range(2 * AUTO_RECHECK + 2):
            model(ids)
            torch.cuda.synchronize()
        rep = h.sparsity_report()
    assert h.dense_fallbacks == {}
    assert all(v == "graphed" for v in h.layer_graph_status.values()), h.layer_graph_status
    for i in ("0", "1"):
        auto = rep["layers"][i]["auto_dense"][0]
        assert auto["verdict"] == "sparse" and auto["calls"] == 2 * AUTO_RECHECK + 2
        # the same inputs every call: the measured mean equals the report's mean density
        assert auto["last_density"] == pytest.approx(rep["layers"][i]["density"], rel=1e-6)
    # the same predictor with a crossover below its density: the graphed layers fall back after a measurement
    _gpu_table(tmp_path, monkeypatch, 0.01)
    with patch_model(model, predictor=spec, dense_above="auto") as h:
        for _ in range(4):
            model(ids)
            torch.cuda.synchronize()
        out = model(ids).logits
    assert h.dense_fallbacks == {0: 4, 1: 4} and torch.equal(out, outs[0])
