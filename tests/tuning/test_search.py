"""Per-head tuning: budgets hold on every sample, looser budgets are sparser, hard heads go dense,
tuning and inference select identically, per-layer budget specs, tune_model on a tiny Llama."""

from __future__ import annotations

import math

import pytest
import torch

from sparseattn.integrations.transformers_patch import masked_sdpa_attention
from sparseattn.ops.reference import reference_attention
from sparseattn.predictors._common import causal_region
from sparseattn.predictors.mean_similarity import MeanSimilarityConfig
from sparseattn.testing.inputs import structured_qkv
from sparseattn.testing.tolerances import ATOL_FLOOR, check_ratio
from sparseattn.tuning import TunedMeanSimPredictor, parse_layer_budgets, tune_layer
from sparseattn.tuning.predictor import mean_sim_stats, select_per_head
from sparseattn.tuning.search import head_errors, tile_attention, tile_states
from sparseattn.tuning.types import HeadParams

H, HKV, N, D = 4, 2, 512, 32
BASE = MeanSimilarityConfig(block_m=32, block_n=32)


def _samples(n: int = 3, hard_head: int | None = None):
    out = []
    for s in range(n):
        q, k, v = structured_qkv(1, H, N, D, kv_heads=HKV, seed=10 + s)
        if hard_head is not None:  # uniform attention over the causal prefix: every block matters
            q = q.clone()
            q[:, hard_head] = 0.0
        out.append((q, k, v))
    return out


@pytest.fixture(scope="module")
def samples():
    return _samples(3, hard_head=3)


def _adversarial(seed: int):
    """Head 0: structured. Head 1: every key block but the first alternates +u/-u, so its mean is 0 and the
    compressed score underflows next to the sink block (+u), while the real attention spreads over half the
    keys: no cdf (not even 1.0) with every block trusted keeps them."""
    q, k, v = structured_qkv(1, 2, 256, D, kv_heads=2, seed=seed)
    u = torch.nn.functional.normalize(torch.randn(D, generator=torch.Generator().manual_seed(seed)), dim=0)
    q[:, 1] = 60.0 * u
    sign = torch.where(torch.arange(256) % 2 == 0, 1.0, -1.0)
    sign[:32] = 1.0
    k[:, 1] = 60.0 * sign[:, None] * u
    return q, k, v


@pytest.fixture(scope="module")
def tuned(samples):
    return tune_layer(samples, base=BASE, l1=0.06, cdf_steps=5)


def _independent_errors(q, k, v, hp: HeadParams, pv: float | None = None):
    """Per-head error of the tuned predictor's layout, computed by the library's attention paths."""
    layout = TunedMeanSimPredictor({0: hp}, BASE).predict(q, k, layer=0)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)[0]
    if pv is None:
        out = masked_sdpa_attention(q, k, v, layout)[0]
    else:
        out = reference_attention(q, k, v, causal=True, layout=layout, pv_threshold=pv).out[0]
    return head_errors(out, ref, "l1"), layout


def test_tile_attention_matches_reference():
    q, k, v = structured_qkv(1, 3, 200, 16, kv_heads=1, seed=4)
    q = q * 3
    st = tile_states(q[0], k[0], v[0], block_m=32, block_n=64)
    region = causal_region(200, 200, 32, 64, True, q.device)
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(3, *region.shape, generator=g) < 0.6) & region
    from sparseattn.predictors._common import mask_to_layout

    layout = mask_to_layout(mask[None], block_m=32, block_n=64, seqlen_q=200, seqlen_kv=200)
    hi = reference_attention(q.double(), k.double(), v.double(), causal=True).out[0]
    check_ratio(st.ref, hi, reference_attention(q, k, v, causal=True).out[0], "dense")
    for pv in (None, 0.5, 3.0):
        stats: dict = {}
        hi = reference_attention(q.double(), k.double(), v.double(), causal=True, layout=layout, pv_threshold=pv).out[0]
        lo = reference_attention(q, k, v, causal=True, layout=layout, pv_threshold=pv, stats=stats).out[0]
        got = tile_attention(st, mask, None if pv is None else torch.full((3,), pv))
        check_ratio(got, hi, lo, f"pv={pv}")


def test_budget_holds_on_every_sample(samples, tuned):
    assert tuned.heads == H
    assert not bool(tuned.dense.any())
    for q, k, v in samples:
        err, _ = _independent_errors(q, k, v, tuned)
        live = ~tuned.dense
        assert bool((err[live] <= 0.06 + ATOL_FLOOR[torch.float32]).all()), err
    assert bool((tuned.error[~tuned.dense] <= 0.06).all())
    assert bool((tuned.sparsity[:3] > 0.1).all()), tuned.sparsity
    assert float(tuned.sparsity[3]) < float(tuned.sparsity[:3].min())  # uniform head: almost nothing to drop


def test_hard_head_is_dense():
    hp = tune_layer([_adversarial(s) for s in range(2)], base=BASE, l1=0.06, cdf_steps=4, sim_grid=(-1.0,))
    assert hp.dense.tolist() == [False, True]
    h = 1
    tuned = hp
    assert math.isnan(float(tuned.sim_threshold[h])) and math.isnan(float(tuned.cdf_threshold[h]))
    assert math.isnan(float(tuned.pv_threshold[h]))
    assert float(tuned.sparsity[h]) == 0.0 and float(tuned.error[h]) == 0.0


def test_heads_get_different_thresholds(tuned):
    live = ~tuned.dense
    pairs = {(float(s), float(c)) for s, c in zip(tuned.sim_threshold[live], tuned.cdf_threshold[live])}
    assert len(pairs) > 1, pairs


def test_looser_budget_is_sparser(samples, tuned):
    loose = tune_layer(samples, base=BASE, l1=0.15, cdf_steps=5)
    assert bool((loose.sparsity >= tuned.sparsity - 1e-6).all()), (loose.sparsity, tuned.sparsity)
    assert float(loose.sparsity.mean()) > float(tuned.sparsity.mean())


def test_predictor_equals_search_selection(samples, tuned):
    q, k, _ = samples[0]
    pred = TunedMeanSimPredictor({5: tuned}, BASE)
    layout = pred.predict(q, k, layer=5)
    sim = torch.nan_to_num(tuned.sim_threshold, nan=1.0)
    cdf = torch.nan_to_num(tuned.cdf_threshold, nan=1.0)
    search_mask = select_per_head(mean_sim_stats(q.float(), k.float(), BASE), sim, cdf, tuned.dense)
    assert torch.equal(layout.to_dense_mask(), search_mask)
    region = causal_region(N, N, 32, 32, True, q.device)
    dense_hp = HeadParams(**{**{f: getattr(tuned, f) for f in ("sim_threshold", "cdf_threshold", "pv_threshold",
                                                                  "sparsity", "error")},
                             "dense": torch.tensor([False, False, False, True])})
    m = TunedMeanSimPredictor({5: dense_hp}, BASE).predict(q, k, layer=5).to_dense_mask()
    assert torch.equal(m[0, 3], region) and torch.equal(m[0, :3], layout.to_dense_mask()[0, :3])  # dense head: whole row
    # untuned layer / layer=None: every causal block
    for lay in (pred.predict(q, k, layer=1), pred.predict(q, k)):
        assert torch.equal(lay.to_dense_mask()[0], region.expand(H, -1, -1))
    assert pred.name == "tuned_mean_sim" and pred.config is BASE
    with pytest.raises(ValueError, match=r"^TunedMeanSimPredictor.predict: q has a head count"):
        pred.predict(q[:, :2], k[:, :1], layer=5)
    pred.reset()


def test_select_per_head_equals_mean_sim_predictor(samples):
    from sparseattn.predictors.mean_similarity import MeanSimilarityPredictor

    q, k, _ = samples[1]
    for sim, cdf in ((0.3, 0.8), (-1.0, 0.5)):
        cfg = MeanSimilarityConfig(block_m=32, block_n=32, sim_threshold=sim, cdf_threshold=cdf)
        want = MeanSimilarityPredictor(cfg, backend="torch").predict(q, k).to_dense_mask()
        got = select_per_head(mean_sim_stats(q, k, cfg), torch.full((H,), sim), torch.full((H,), cdf))
        assert torch.equal(want, got)


def test_pv_search_meets_pv_budget(samples):
    s2 = [(q * 2.5, k, v) for q, k, v in samples[:2]]  # peakier attention: the P·V skip has work to do
    hp = tune_layer(s2, base=BASE, l1=0.05, pv_l1=0.07, cdf_steps=5)
    live = ~hp.dense
    assert bool(torch.isfinite(hp.pv_threshold[live]).any()), hp.pv_threshold
    for h in range(H):
        if bool(hp.dense[h]) or math.isinf(float(hp.pv_threshold[h])):
            continue
        for q, k, v in s2:
            err, _ = _independent_errors(q, k, v, hp, pv=float(hp.pv_threshold[h]))
            assert float(err[h]) <= 0.07 + ATOL_FLOOR[torch.float32], (h, err)
    pred = TunedMeanSimPredictor({0: hp}, BASE)
    fin = hp.pv_threshold[live]
    want = None if bool(torch.isinf(fin).any()) else float(fin.max())
    assert pred.pv_threshold_for(0) == want and pred.pv_threshold_for(9) is None


def test_callback_and_errors(samples):
    seen = []
    tune_layer(samples[:1], base=BASE, cdf_steps=1, sim_grid=(0.0,), callback=seen.append)
    assert seen[-1]["step"] == seen[-1]["total"] == 1 + 2
    with pytest.raises(ValueError, match=r"^tune_layer: rule is not a known error rule; expected "):
        tune_layer(samples, base=BASE, rule="l2")
    with pytest.raises(ValueError, match=r"^tune_layer: l1 must be a positive finite number; expected "):
        tune_layer(samples, base=BASE, l1=0)
    with pytest.raises(ValueError, match=r"^tune_layer: samples must be a non-empty list"):
        tune_layer([], base=BASE)
    q, k, v = samples[0]
    with pytest.raises(ValueError, match=r"^tune_layer: samples\[0\] has inconsistent shapes"):
        tune_layer([(q, k[:, :, :-1], v)], base=BASE)


@pytest.mark.parametrize("rule", ["cosine", "rmse"])
def test_other_rules(samples, rule):
    hp = tune_layer(samples[:1], base=BASE, l1=0.01, rule=rule, cdf_steps=4, sim_grid=(0.0, 0.5))
    assert bool((hp.error[~hp.dense] <= 0.01).all())


def test_parse_layer_budgets():
    assert parse_layer_budgets("", 4) == {}
    assert parse_layer_budgets("0-1:0.04, 3-:0.08", 5) == {0: 0.04, 1: 0.04, 3: 0.08, 4: 0.08}
    assert parse_layer_budgets("2:0.1", 3) == {2: 0.1}
    for bad, frag in (("0-3:0.1,2:0.2", "overlapping"), ("3-1:0.1", "start exceeds"), ("a:0.1", "malformed"),
                      ("0:x", "not a number"), ("0:-1", "out of range"), ("0-9:0.1", "does not have"),
                      ("1", "malformed")):
        with pytest.raises(ValueError, match=rf"^parse_layer_budgets: spec .*{frag}.*; expected "):
            parse_layer_budgets(bad, 5)


def test_tune_model_tiny_llama():
    transformers = pytest.importorskip("transformers")
    from sparseattn.tuning import tune_model

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = [torch.randint(0, 97, (256,), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    lines: list[str] = []
    base = MeanSimilarityConfig(block_m=32, block_n=32)
    tc = tune_model(model, ids, l1=0.08, layer_l1="1-:0.1", base=base, progress=False, log=lines.append)
    assert sorted(tc.layers) == [0, 1] and all(hp.heads == 4 for hp in tc.layers.values())
    assert len(lines) == 8 and lines[0].startswith("0.0: sim=")
    for key in ("version", "model", "fingerprint", "predictor", "rule", "budgets", "seq_len", "samples",
                "dense_layers", "seconds", "device", "created"):
        assert key in tc.meta, key
    assert set(tc.meta["fingerprint"]) == {"num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                           "head_dim", "model_type"}
    assert tc.meta["budgets"] == {"l1": 0.08, "pv_l1": None, "layer_l1": "1-:0.1"}
    assert tc.meta["seq_len"] == 256 and tc.meta["samples"] == 2
    assert set(tc.meta["predictor"]) == {"block_m", "block_n", "keep_sink", "keep_local", "score"}
    tc2 = tune_model(model, ids[:1], dense_layers=(0,), base=base, progress=False, log=lines.append)
    assert sorted(tc2.layers) == [1] and tc2.meta["dense_layers"] == [0]
    assert not hasattr(model, "_sparseattn_handle") or model._sparseattn_handle is None


def test_tune_model_leaves_sliding_window_layers_to_their_exact_band():
    """Gemma-3-style models: the window layers run as exact bands whatever the predictor, so the tuner neither
    tunes them nor marks them dense; the file lists them and a patched model still runs them as windows."""
    transformers = pytest.importorskip("transformers")
    from sparseattn.integrations import patch_model
    from sparseattn.tuning import tune_model

    torch.manual_seed(0)
    cfg = transformers.Gemma3TextConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=48,
                                        layer_types=["sliding_attention", "full_attention"] * 2,
                                        max_position_embeddings=512)
    model = transformers.Gemma3ForCausalLM(cfg).eval()
    ids = [torch.randint(0, 97, (256,), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    tc = tune_model(model, ids, base=MeanSimilarityConfig(block_m=32, block_n=32), progress=False, log=lambda _: None)
    assert sorted(tc.layers) == [1, 3] and tc.meta["window_layers"] == [0, 2] and tc.meta["dense_layers"] == []
    with torch.no_grad(), patch_model(model, tuned=tc) as h:
        model(ids[0][None])
        modes = {i: h.sparsity_report()["layers"][str(i)]["mode"] for i in range(4)}
    assert modes == {0: "window", 1: "sparse", 2: "window", 3: "sparse"}


def test_sim_values_that_untrust_nothing_new_are_skipped_exactly(samples, monkeypatch):
    """A sim threshold that untrusts the same blocks as the previous evaluated one is skipped (no probe runs):
    the result equals a search without it, exactly, and the progress still reaches its total."""
    import sparseattn.tuning.search as search
    from sparseattn.predictors.mean_similarity import mean_sim_stats

    sims = [mean_sim_stats(q, k, BASE) for q, k, _ in samples]
    lowest = min(min(float(torch.nan_to_num(st.q_sim, nan=9).min()), float(torch.nan_to_num(st.k_sim, nan=9).min()))
                 for st in sims)
    below = (lowest - 1.0) / 2  # between -1 and every self-similarity: untrusts nothing, like -1
    assert -1.0 < below < lowest
    probes = {"n": 0}
    real = search.tile_attention

    def counting(*a, **k):  # noqa: ANN002, ANN003, ANN202
        probes["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(search, "tile_attention", counting)
    seen = []
    with_dup = tune_layer(samples, base=BASE, cdf_steps=3, sim_grid=(-1.0, below), callback=seen.append)
    n_dup = probes["n"]
    alone = tune_layer(samples, base=BASE, cdf_steps=3, sim_grid=(-1.0,))
    assert n_dup == probes["n"] - n_dup  # the second sim value ran no probe
    for f in ("sim_threshold", "cdf_threshold", "sparsity", "error", "dense"):
        a, b = getattr(with_dup, f), getattr(alone, f)
        assert torch.equal(torch.nan_to_num(a.float(), nan=-7.0), torch.nan_to_num(b.float(), nan=-7.0)), f
    assert seen[-1]["step"] == seen[-1]["total"] == len(samples) + 2 * (3 + 1)
