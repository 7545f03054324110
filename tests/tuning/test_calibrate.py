"""Model-level calibration of a tuned file (sparseattn.tuning.calibrate): the scale knob, the bisection, the
end-to-end loop on a tiny random Llama, and bad inputs in the house format."""

from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sparseattn.testing.models import tiny_llama  # noqa: E402
from sparseattn.tuning.calibrate import Targets, bisect_scale, calibrate_tuned, scale_tuned  # noqa: E402


def _model():
    return tiny_llama()


def _ids(n=2, seq=256):
    return [torch.randint(0, 97, (seq,), generator=torch.Generator().manual_seed(s)) for s in range(n)]


@pytest.fixture(scope="module")
def tuned():
    from sparseattn.predictors.mean_similarity import MeanSimilarityConfig
    from sparseattn.tuning import tune_model

    model = _model()
    cfg = tune_model(model, _ids(), l1=0.2, base=MeanSimilarityConfig(block_m=32, block_n=32, keep_local=1),
                     progress=False, log=lambda _line: None)
    return model, cfg


def _linear(slope, at0=1.0):
    """A metric that falls linearly with the scale (monotone), and a record of the scales asked for."""
    asked = []

    def measure(s):
        asked.append(s)
        return {"top1_agreement": at0 - slope * s, "kl_dense_sparse": 0.0, "logits_cosine": 1.0, "sparsity": s / 10}

    return measure, asked


def test_bisection_goes_up_from_a_passing_file():
    measure, asked = _linear(0.02)  # passes while s <= 2.5
    scale, probes = bisect_scale(measure, Targets(top1=0.95), steps=5)
    assert asked[:3] == [1.0, 2.0, 4.0]  # probe 1 passes: doubling brackets [2, 4]
    assert 2.5 - 2.0 / 2 ** 5 <= scale <= 2.5
    assert [p["scale"] for p in probes] == asked and len(probes) == 3 + 5
    assert all(p["passed"] == (p["top1_agreement"] >= 0.95) for p in probes)
    # monotone: every pass lies at or below every fail
    assert max(p["scale"] for p in probes if p["passed"]) < min(p["scale"] for p in probes if not p["passed"])


def test_bisection_goes_down_from_a_failing_file():
    measure, asked = _linear(0.04, at0=0.96)  # passes while s <= 0.25
    scale, probes = bisect_scale(measure, Targets(top1=0.95), steps=6)
    assert asked[:2] == [1.0, 0.0]
    assert 0.25 - 1.0 / 2 ** 6 <= scale <= 0.25
    assert next(p for p in probes if p["scale"] == scale)["passed"]


def test_bisection_caps_and_gives_up():
    measure, _ = _linear(0.0)  # always passes: doubling stops at max_scale
    scale, probes = bisect_scale(measure, Targets(top1=0.5), steps=3, max_scale=4.0)
    assert scale == 4.0 and [p["scale"] for p in probes] == [1.0, 2.0, 4.0]
    measure, _ = _linear(0.0, at0=0.5)  # never passes, not even at 0
    scale, probes = bisect_scale(measure, Targets(top1=0.9), steps=3)
    assert scale is None and [p["scale"] for p in probes] == [1.0, 0.0]


def test_targets_combine_kl_and_cosine():
    t = Targets(top1=0.9, kl=0.01, cosine=0.999)
    ok = {"top1_agreement": 0.95, "kl_dense_sparse": 0.005, "logits_cosine": 0.9995}
    assert t.met(ok)
    assert not t.met({**ok, "kl_dense_sparse": 0.02})
    assert not t.met({**ok, "logits_cosine": 0.99})


def test_scale_nests_the_selected_blocks(tuned):
    """A smaller scale keeps a superset of the blocks (sparsity monotone in the scale); 1 is the file itself."""
    from sparseattn.tuning.predictor import mean_sim_stats, select_per_head

    model, cfg = tuned
    assert all(torch.equal(scale_tuned(cfg, 1.0).layers[li].cdf_threshold, hp.cdf_threshold)
               for li, hp in cfg.layers.items())
    from sparseattn.predictors.mean_similarity import MeanSimilarityConfig

    base = MeanSimilarityConfig(block_m=32, block_n=32, keep_local=1)
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 4, 256, 16, generator=g), torch.randn(1, 2, 256, 16, generator=g)
    stats = mean_sim_stats(q, k, base, causal=True)
    prev = None
    for s in (4.0, 2.0, 1.0, 0.5, 0.25, 0.0):
        hp = scale_tuned(cfg, s).layers[1]
        m = select_per_head(stats, torch.nan_to_num(hp.sim_threshold, nan=1.0),
                            torch.nan_to_num(hp.cdf_threshold, nan=1.0), hp.dense)
        if prev is not None:
            assert bool((prev & ~m).sum() == 0), f"scale {s} dropped a block kept at a larger scale"
        prev = m
    off = scale_tuned(cfg, 1.0, keep_pv=False)
    assert all(bool(torch.isinf(hp.pv_threshold[~hp.dense]).all()) for hp in off.layers.values())


def test_calibrated_file_meets_the_target_on_the_calibration_samples(tuned):
    from sparseattn.eval.end_to_end import logits_metrics
    from sparseattn.integrations.transformers_patch import patch_model

    model, cfg = tuned
    ids = _ids()
    lines = []
    out = calibrate_tuned(model, cfg, ids, target_top1=0.9, steps=3, progress=False, log=lines.append)
    cal = out.meta["calibration"]
    assert cal["met"] and len(lines) == len(cal["probes"]) and cal["chosen"]["passed"]
    assert cal["chosen"]["top1_agreement"] >= 0.9
    # re-measure the returned file independently: the same numbers, so the target holds on these samples
    with torch.no_grad():
        dense = [model(t[None], use_cache=False, logits_to_keep=128).logits[0].float() for t in ids]
        with patch_model(model, tuned=out):
            per = [logits_metrics(model(t[None], use_cache=False, logits_to_keep=128).logits[0].float(), d)
                   for t, d in zip(ids, dense)]
    top1 = sum(m["top1_agreement"] for m in per) / len(per)
    assert top1 == cal["chosen"]["top1_agreement"] and top1 >= 0.9  # same inputs, same CPU path: bitwise
    # the passes all lie at or below the fails (the bracket the bisection kept)
    passes = [p["scale"] for p in cal["probes"] if p["passed"]]
    fails = [p["scale"] for p in cal["probes"] if not p["passed"]]
    assert cal["scale"] == max(passes) and (not fails or max(passes) < min(fails))


def test_calibration_survives_save_and_load(tuned, tmp_path):
    from sparseattn.tuning.store import load_tuned, save_tuned

    model, cfg = tuned
    out = calibrate_tuned(model, cfg, _ids(1), target_top1=0.5, steps=0, progress=False)
    back = load_tuned(save_tuned(tmp_path / "c.safetensors", out), model=model)
    assert back.meta["calibration"]["scale"] == out.meta["calibration"]["scale"]
    for li, hp in out.layers.items():
        assert torch.equal(back.layers[li].cdf_threshold, hp.cdf_threshold)


@pytest.mark.parametrize("call, pattern", [
    (lambda m, c: calibrate_tuned(m, c, _ids(1), target_top1=1.5),
     r"^calibrate_tuned: target_top1 is out of range; expected a finite number in \(0, 1\], got 1\.5$"),
    (lambda m, c: calibrate_tuned(m, c, _ids(1), target_top1=None),
     r"^calibrate_tuned: targets are all None; expected at least one of target_top1, target_kl, target_cosine, got None$"),
    (lambda m, c: calibrate_tuned(m, c, _ids(1), target_top1=None, target_kl=math.inf),
     r"^calibrate_tuned: target_kl is out of range; expected a finite number > 0, got inf$"),
    (lambda m, c: calibrate_tuned(m, c, [], target_top1=0.9),
     r"^calibrate_tuned: input_ids_list must be a non-empty list of 1-D or \(1, N\) token tensors; expected list\[tensor\], got list$"),
    (lambda m, c: calibrate_tuned(m, "t.safetensors", _ids(1), target_top1=0.9),
     r"^calibrate_tuned: cfg must be a TunedConfig; expected TunedConfig, got str$"),
    (lambda m, c: calibrate_tuned(m, c, _ids(1), target_top1=0.9, score_last=0),
     r"^calibrate_tuned: score_last must be a positive integer or None; expected e\.g\. 2048, got 0$"),
    (lambda m, c: scale_tuned(c, -1.0),
     r"^scale_tuned: scale must be a finite number >= 0; expected e\.g\. 0\.5, got -1\.0$"),
    (lambda m, c: bisect_scale(lambda s: {}, Targets(top1=0.9), steps=-1),
     r"^bisect_scale: steps must be an integer >= 0; expected e\.g\. 5, got -1$"),
    (lambda m, c: bisect_scale(lambda s: {}, Targets(top1=0.9), max_scale=0.5),
     r"^bisect_scale: max_scale must be a finite number >= 1; expected e\.g\. 8, got 0\.5$"),
])
def test_bad_inputs(tuned, call, pattern):
    model, cfg = tuned
    with pytest.raises(ValueError, match=pattern):
        call(model, cfg)


def test_cli_calibrates_and_reports(tmp_path, capsys):
    """`sparseattn tune --target-top1`: the file holds the chosen scale, the report every probe; --from-file
    skips the search and gives the same calibration."""
    import json

    from sparseattn.cli.main import main
    from sparseattn.testing.bad_inputs import save_tiny_llama
    from sparseattn.tuning.store import load_tuned

    model_dir = save_tiny_llama(tmp_path / "model", hidden_size=64, intermediate_size=64, heads=4, kv_heads=2,
                                head_dim=16)
    common = ["tune", "--model", str(model_dir), "--random-ids", "--seq-len", "256", "--samples", "2", "--l1", "0.2",
              "--target-top1", "0.9", "--calibrate-samples", "1", "--calibrate-steps", "2", "--no-plot"]
    out = tmp_path / "t.safetensors"
    assert main([*common, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "calibrate: scale=1 " in err and ("met;" in err or "NOT met" in err)
    cal = load_tuned(out).meta["calibration"]
    rep = json.loads(out.with_suffix(".json").read_text())
    assert rep["meta"]["calibration"]["probes"] == json.loads(json.dumps(cal["probes"]))
    assert "## Model-level calibration" in out.with_suffix(".md").read_text()
    again = tmp_path / "again.safetensors"
    assert main([*common, "--quiet", "--from-file", str(out), "--out", str(again)]) == 0
    # starting from the calibrated file: its thresholds are the new scale-1 point, which passes
    cal2 = load_tuned(again).meta["calibration"]
    if cal["met"]:
        assert cal2["probes"][0]["passed"] and cal2["probes"][0]["top1_agreement"] == cal["chosen"]["top1_agreement"]


@pytest.mark.parametrize("argv, needle", [
    (["--target-top1", "1.5"], "--target-top1"),
    (["--target-kl", "-1"], "--target-kl"),
    (["--calibrate-steps", "-2"], "--calibrate-steps"),
    (["--from-file", "/no/such/t.safetensors"], "--from-file /no/such/t.safetensors does not exist"),
])
def test_cli_bad_calibration_arguments(argv, needle, tmp_path, capsys):
    from sparseattn.cli.main import main

    rc = main(["tune", "--random-ids", *argv, "--out", str(tmp_path / "o.safetensors")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("sparseattn tune: error:"), err
    assert needle in err, err


def test_keep_local_grid_is_sparser_within_budget_and_round_trips(tmp_path):
    """Per-head keep_local: never less sparse than the layer-wide window, every head still within l1, the
    predictor selects what the search measured, and the optional tensor survives save / load."""
    from sparseattn.predictors.mean_similarity import MeanSimilarityConfig
    from sparseattn.tuning.predictor import TunedMeanSimPredictor, mean_sim_stats, per_head_forced, select_per_head
    from sparseattn.tuning.search import tune_layer
    from sparseattn.tuning.store import load_tuned, save_tuned
    from sparseattn.tuning.types import TunedConfig

    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, h, 512, 16, generator=g) for h in (4, 2, 2))
    base = MeanSimilarityConfig(block_m=32, block_n=32, keep_local=8)
    plain = tune_layer([(q, k, v)], base=base, l1=0.3)
    grid = tune_layer([(q, k, v)], base=base, l1=0.3, keep_local_grid=(4, 2, 1, 16))
    assert plain.keep_local is None and grid.keep_local is not None
    live = ~grid.dense
    assert bool((grid.sparsity >= plain.sparsity).all()) and bool((grid.error[live] <= 0.3).all())
    assert set(grid.keep_local[live].tolist()) <= {8.0, 4.0, 2.0, 1.0}
    # the predictor's layout equals the search's mask for the stored per-head windows
    stats = mean_sim_stats(q, k, base)
    want = select_per_head(stats, torch.nan_to_num(grid.sim_threshold, nan=1.0),
                           torch.nan_to_num(grid.cdf_threshold, nan=1.0), grid.dense,
                           per_head_forced(stats, True, grid.local_blocks(8)))
    got = TunedMeanSimPredictor({0: grid}, base).predict(q, k, layer=0)
    assert torch.equal(got.to_dense_mask(), want)
    meta = {"version": 1, "model": "m", "fingerprint": {"num_hidden_layers": 1, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 16, "model_type": "llama"},
            "predictor": {"block_m": 32, "block_n": 32, "keep_sink": True, "keep_local": 8, "score": "mixed"},
            "rule": "l1", "budgets": {"l1": 0.3, "pv_l1": None, "layer_l1": ""}, "seq_len": 512, "samples": 1,
            "dense_layers": [], "seconds": 0.0, "device": "cpu", "created": "now"}
    back = load_tuned(save_tuned(tmp_path / "kl.safetensors", TunedConfig({0: grid}, meta)))
    assert torch.equal(torch.nan_to_num(back.layers[0].keep_local), torch.nan_to_num(grid.keep_local))


def test_keep_local_bad_inputs():
    from sparseattn.predictors.mean_similarity import MeanSimilarityConfig
    from sparseattn.tuning.search import tune_layer
    from sparseattn.tuning.types import HeadParams

    q, k, v = torch.randn(1, 2, 64, 16), torch.randn(1, 1, 64, 16), torch.randn(1, 1, 64, 16)
    with pytest.raises(ValueError, match=r"^tune_layer: keep_local_grid must be a sequence of integers >= 1; "
                                         r"expected e\.g\. \(4, 2, 1\), got \(0,\)$"):
        tune_layer([(q, k, v)], base=MeanSimilarityConfig(block_m=32, block_n=32), keep_local_grid=(0,))
    f = torch.zeros(2)
    with pytest.raises(ValueError, match=r"^HeadParams: keep_local is out of range for a sparse head; "
                                         r"expected integers >= 1, got \[2\.5, 1\.0\]$"):
        HeadParams(f + 0.5, f + 0.5, f + 1, torch.zeros(2, dtype=torch.bool), f, f, keep_local=torch.tensor([2.5, 1.0]))
