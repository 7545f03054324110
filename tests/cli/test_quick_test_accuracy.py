"""``sparseattn quick-test`` and ``sparseattn accuracy`` run in-process, plus the accuracy library."""

from __future__ import annotations

import importlib
import json

import pytest
import torch

from sparseattn.cli.main import main
from sparseattn.eval import accuracy as acc
from sparseattn.layout import random_layout
from sparseattn.ops.reference import AttentionState, reference_attention
from sparseattn.testing.inputs import random_qkv

attn_mod = importlib.import_module("sparseattn.ops.attention")


def test_main_help_and_version(capsys):
    assert main([]) == 2
    assert "quick-test" in capsys.readouterr().out
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == "0.1.0"


def test_quick_test_default_passes_and_is_honest(capsys):
    rc = main(["quick-test", "--seq-len", "1024", "--causal"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "verdict  : PASS" in out
    assert "NOT model activations" in out  # says what data was used
    assert "sparse=reference" in out  # says which backend ran (CPU)
    assert "q (1, 8, 1024, 64)" in out
    assert "for contrast, the same layout on i.i.d. random q/k" in out
    sparsity = float(out.split("(sparsity ")[1].split("%")[0])
    assert sparsity > 40.0  # a real amount of sparsity, not a near-dense layout


def test_quick_test_fails_on_random_inputs(capsys):
    # near-uniform attention: dropping ~60% of the blocks cannot keep cosine > 0.95 -> FAIL, exit 1
    rc = main(["quick-test", "--seq-len", "512", "--causal", "--inputs", "random", "--heads", "2"])
    out = capsys.readouterr().out
    assert rc == 1 and "verdict  : FAIL" in out and "i.i.d. Gaussian" in out
    # the thresholds are flags: loosening them flips the verdict on the same numbers
    rc = main(["quick-test", "--seq-len", "512", "--causal", "--inputs", "random", "--heads", "2",
               "--min-cosine", "0.0", "--max-rel-l1", "10"])
    assert rc == 0 and "verdict  : PASS" in capsys.readouterr().out


def test_quick_test_dense_layout_fails_sparsity_check(capsys):
    rc = main(["quick-test", "--seq-len", "256", "--pattern", "dense", "--heads", "2"])
    out = capsys.readouterr().out
    assert rc == 1 and "sparsity > 5% [FAILED]" in out and "cosine       1.000000" in out


def test_quick_test_gqa_bf16_odd_length_benchmark(capsys):
    rc = main(["quick-test", "--seq-len", "300", "--heads", "4", "--kv-heads", "2", "--dtype", "bfloat16",
               "--density", "0.5", "--pattern", "sliding_window", "--benchmark", "--batch", "2"])
    out = capsys.readouterr().out
    assert rc in (0, 1)
    assert "k/v (2, 2, 300, 64)" in out and "bfloat16" in out and "timing (median of 5" in out


def test_quick_test_bad_pattern(capsys):
    # a user error: one line on stderr, exit status 2, no traceback (--debug re-raises it)
    assert main(["quick-test", "--seq-len", "128", "--pattern", "diagonal-ish"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sparseattn quick-test: error: --pattern is not a known pattern") and err.count("\n") == 1
    with pytest.raises(ValueError, match=r"sparseattn quick-test: --pattern is not a known pattern"):
        main(["--debug", "quick-test", "--seq-len", "128", "--pattern", "diagonal-ish"])


def test_quick_test_levels_match_accuracy_levels():
    from sparseattn.cli import quick_test

    assert quick_test.SPARSE_LEVELS == acc.SPARSE_LEVELS


def test_accuracy_quick_writes_report(tmp_path, capsys):
    rc = main(["accuracy", "--quick", "--out", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0, out
    for name in ("accuracy.json", "accuracy.md", "attention_comparison.png", "sparse_pattern.png"):
        p = tmp_path / name
        assert p.exists() and p.stat().st_size > 0, name
    assert (tmp_path / "attention_comparison.png").read_bytes()[:4] == b"\x89PNG"
    res = json.loads((tmp_path / "accuracy.json").read_text())
    sections = {c["section"] for c in res["cases"]}
    assert sections == {"sweep", "stability", "edge"}
    assert res["summary"]["correctness_fail"] == 0
    names = " | ".join(c["name"] for c in res["cases"])
    for needle in ("length 1", "not block multiples", "all blocks masked", "single block", "inputs x100", "near-constant"):
        assert needle in names
    sweep = [c for c in res["cases"] if c["section"] == "sweep"]
    assert {c["causal"] for c in sweep} == {True, False} and {(c["heads"], c["kv_heads"]) for c in sweep} == {(4, 4), (4, 1)}
    assert {c["dtype"] for c in sweep} == {"float32", "bfloat16"}
    # sparser levels keep less (on the same inputs): density and kept mass drop with the level
    by = {lv: [c for c in sweep if c["level"] == lv] for lv in ("low", "medium", "high")}
    mean = lambda lv, key: sum(c["cost"][key] for c in by[lv]) / len(by[lv])  # noqa: E731
    assert mean("low", "density") > mean("medium", "density") > mean("high", "density")
    assert mean("low", "kept_mass") > mean("high", "kept_mass")
    masked = [c for c in res["cases"] if "all blocks masked" in c["name"]]
    assert all(c["cost"]["kept_mass"] == 0.0 and c["cost"]["density"] == 0.0 for c in masked)
    md = (tmp_path / "accuracy.md").read_text()
    assert "## 1. Correctness" in md and "## 2. Cost of sparsity" in md
    assert md.index("## 1. Correctness") < md.index("## 2. Cost of sparsity")
    assert "not activations of a real model" in md


def test_run_case_detects_a_wrong_backend(monkeypatch):
    """The correctness check can fail: a backend that is off by a little is caught."""

    def refusal(q, **_):
        return None

    def broken(q, k, v, *, causal, layout, scale, pv_threshold, stats, sliding_window=None):
        o, lse = reference_attention(q, k, v, causal=causal, layout=layout, scale=scale)
        return AttentionState(o + 1e-3, lse)

    monkeypatch.setitem(attn_mod.BACKENDS, "broken", (refusal, broken))
    q, k, v = random_qkv(1, 2, 96, 16, dtype=torch.float32, seed=0)
    lay = random_layout(96, density=0.5, block_m=32, block_n=32, heads=2)
    bad = acc.run_case(q, k, v, layout=lay, causal=True, backend="broken")
    assert bad["backend"] == "broken" and bad["correctness"]["pass"] is False
    good = acc.run_case(q, k, v, layout=lay, causal=True, backend="reference")
    assert good["correctness"]["pass"] is True
    assert good["correctness"]["max_abs_err"] <= good["correctness"]["bound"]
    # cost is measured against dense: identical for the two runs up to the injected offset
    assert good["cost"]["density"] == pytest.approx(lay.density(causal=True))
    assert 0.0 < good["cost"]["kept_mass"] < 1.0


def test_run_case_flags_nan_and_wrong_empty_rows(monkeypatch):
    def nan_backend(q, k, v, *, causal, layout, scale, pv_threshold, stats, sliding_window=None):
        o, lse = reference_attention(q, k, v, causal=causal, layout=layout, scale=scale)
        return AttentionState(o, torch.where(torch.isinf(lse), torch.zeros_like(lse), lse))  # empty rows not -inf

    monkeypatch.setitem(attn_mod.BACKENDS, "noinf", (lambda q, **_: None, nan_backend))
    q, k, v = random_qkv(1, 1, 64, 8, seqlen_kv=16, dtype=torch.float32, seed=0)  # causal: 48 empty rows
    res = acc.run_case(q, k, v, layout=None, causal=True, backend="noinf")
    assert res["correctness"]["lse_empty_rows_agree"] is False and res["correctness"]["pass"] is False
    assert res["cost"]["empty_rows"] == 48


def test_accuracy_config_validation_and_json():
    cfg = acc.AccuracyConfig.quick(seq_lens=(128,))
    assert acc.AccuracyConfig.from_json(json.loads(json.dumps(cfg.to_json()))) == cfg
    assert cfg.to_json()["version"] == acc.CONFIG_VERSION
    bad = [
        (dict(levels=("extreme",)), r"AccuracyConfig: levels has an unknown level"),
        (dict(gqa=((4, 3),)), r"AccuracyConfig: gqa has heads not divisible by kv_heads"),
        (dict(dtypes=("int8",)), r"AccuracyConfig: dtypes has an unknown dtype"),
        (dict(seq_lens=()), r"AccuracyConfig: seq_lens must be a non-empty sequence"),
        (dict(seq_lens=(0,)), r"AccuracyConfig: seq_lens must be a positive integer"),
        (dict(pattern="nope"), r"AccuracyConfig: pattern is not a known pattern"),
        (dict(causal=(1,)), r"AccuracyConfig: causal must hold bools"),
        (dict(block_size=0), r"AccuracyConfig: block_size must be a positive integer"),
        (dict(version=99), r"AccuracyConfig: version is not supported"),
    ]
    for kw, match in bad:
        with pytest.raises(ValueError, match=match):
            acc.AccuracyConfig(**kw)


def test_run_case_overflowing_same_dtype_yardstick_falls_back_to_floor():
    # float16 inputs x100: the same-dtype reference's scores overflow 65504, so the ratio rule has no
    # yardstick; the bound becomes the dtype floor and the (upcasting) backend still passes it
    q, k, v = random_qkv(1, 2, 64, 16, dtype=torch.float16, seed=1, scale=100.0)
    lay = random_layout(64, density=0.5, block_m=16, block_n=16, heads=2, causal=True)
    res = acc.run_case(q, k, v, layout=lay, causal=True, backend="reference")
    c = res["correctness"]
    assert c["bound_rule"].startswith("floor") and c["pass"] is True and c["nan_count"] == 0
    ok = acc.run_case(*random_qkv(1, 2, 64, 16, dtype=torch.float16, seed=1), layout=lay, causal=True, backend="reference")
    assert ok["correctness"]["bound_rule"] == "ratio"
