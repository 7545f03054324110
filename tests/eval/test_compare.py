"""eval.compare and the ``sparseattn compare`` command."""

from __future__ import annotations

import json

import pytest
import torch

from sparseattn.eval.compare import compare_layouts, compare_predictors, random_inputs, safetensors_inputs, write_report
from sparseattn.predictors import make_predictor
from sparseattn.predictors.oracle import exact_block_mass
from sparseattn.testing.inputs import structured_qkv


def _small_inputs(lengths=(130, 200), layers=2):
    return random_inputs(lengths, layers=layers, heads=4, kv_heads=2, head_dim=16, kind="structured", seed=1)


def test_identical_predictors_agree_fully():
    res = compare_predictors("static:pattern=sink_window,block_m=32,block_n=32",
                             "static:pattern=sink_window,block_m=32,block_n=32", _small_inputs())
    assert len(res["records"]) == 4
    for r in res["records"]:
        assert r["jaccard"] == 1.0 and r["overlap_a_in_b"] == 1.0 and r["recall_a"] == r["recall_b"]
        assert r["out_cosine_a"] == pytest.approx(r["out_cosine_b"])
        assert r["score_corr"] is None  # static has no scores
    assert set(res["summary"]["per_length"]) == {"130", "200"}


def test_vs_density_matched_oracle():
    res = compare_predictors("mean_sim:topk=0.4,cdf_threshold=None,sim_threshold=-1,block_m=32,block_n=32", "oracle",
                             _small_inputs(lengths=(256,), layers=1))
    r = res["records"][0]
    assert r["density_a"] == pytest.approx(r["density_b"])  # same block count per head
    assert r["recall_b"] >= r["recall_a"] - 1e-9  # the oracle is the upper bound at equal budget
    assert -1.0 <= r["score_corr"] <= 1.0 and r["score_corr_b_mass"] == pytest.approx(1.0)


@pytest.mark.parametrize("spec", ["sketch_walk:block_m=32,block_n=32,dense_layers=0",
                                  "mean_sim:cdf_threshold=0.8,sim_threshold=-1,block_m=32,block_n=32",
                                  "static:pattern=sink_window,block_m=32,block_n=32"])
def test_budget_oracle_dominates_every_predictor(spec):
    res = compare_predictors(spec, "oracle", _small_inputs(lengths=(300,), layers=2), with_output=False)
    for r in res["records"]:
        assert r["recall_b"] >= r["recall_a"] - 1e-6 and r["density_b"] == pytest.approx(r["density_a"])


def test_recall_is_one_for_full_layout():
    q, k, _ = structured_qkv(1, 2, 100, 16, seed=2)
    mass = exact_block_mass(q, k, causal=True, block_m=16, block_n=16)
    full = make_predictor("static", pattern="dense", block_m=16, block_n=16).predict(q, k, causal=True)
    local = make_predictor("static", pattern="local", window_blocks=1, block_m=16, block_n=16).predict(q, k, causal=True)
    rec = compare_layouts(full, local, mass)
    assert rec["recall_a"] == pytest.approx(1.0) and rec["recall_b"] < 1.0
    assert rec["overlap_b_in_a"] == 1.0 and rec["jaccard"] == pytest.approx(rec["density_b"])
    other = make_predictor("static", pattern="dense", block_m=32, block_n=16).predict(q, k, causal=True)
    with pytest.raises(ValueError, match="compare_layouts: layout_b has another geometry"):
        compare_layouts(full, other, mass)


def test_safetensors_reader_and_report(tmp_path):
    from safetensors.torch import save_file

    q, k, v = structured_qkv(1, 4, 96, 16, kv_heads=2, seed=3)
    save_file({"layer0.q": q, "layer0.k": k, "layer0.v": v, "layer1.q": q * 0.5, "layer1.k": k.clone(), "layer1.v": v.clone()},
              str(tmp_path / "cap.safetensors"))
    items = list(safetensors_inputs(tmp_path))
    assert [i["layer"] for i in items] == [0, 1] and items[0]["length"] == 96
    res = compare_predictors("sketch_walk:block_m=16,block_n=16,dense_layers=0", "sketch_walk:block_m=16,block_n=16,walk=false,dense_layers=0",
                             items)
    paths = write_report(res, tmp_path / "out", plots=False)
    data = json.loads(open(paths["json"]).read())
    assert data["records"][0]["layer"] == 0 and "masks" not in data
    assert "| length |" in open(paths["markdown"]).read()


@pytest.mark.slow
def test_cli_compare_writes_json_markdown_png(tmp_path, capsys):
    from sparseattn.cli.main import main

    rc = main(["compare", "--a", "mean_sim:sim_threshold=-1,block_m=32,block_n=32", "--b", "oracle", "--lengths", "160",
               "--layers", "1", "--heads", "2", "--kv-heads", "1", "--head-dim", "16", "--out", str(tmp_path)])
    assert rc == 0
    assert (tmp_path / "compare.json").is_file() and (tmp_path / "compare.md").is_file()
    assert list(tmp_path.glob("masks_160_L0_*.png"))
    assert "recall_a" in capsys.readouterr().out
