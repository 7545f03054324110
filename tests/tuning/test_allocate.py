"""Per-layer allocation by model-level KL sensitivity (sparseattn.tuning.allocate, ``sparseattn tune --allocate``)."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("safetensors")

from sparseattn.predictors.mean_similarity import MeanSimilarityConfig, mean_sim_stats  # noqa: E402
from sparseattn.testing.inputs import structured_qkv  # noqa: E402
from sparseattn.tuning.allocate import allocate, layer_curves  # noqa: E402

GRID = (0.99, 0.95, 0.9, 0.8)


def _curves():
    # layer 0: cheap to sparsify; layer 1: sensitive; layer 2: its probe misses nothing
    return {0: ([0.1, 0.4, 0.6, 0.8], [0.01, 0.05, 0.1, 0.2]),
            1: ([0.1, 0.4, 0.6, 0.8], [0.01, 0.05, 0.1, 0.2]),
            2: ([0.0, 0.0, 0.2, 0.3], [0.0, 0.0, 0.0, 0.1])}


def test_allocate_respects_the_budget_and_spends_it_where_it_is_cheap():
    sens = {0: 1e-4, 1: 1e-2, 2: 5e-3}  # probe 0.9
    cdf, kl, total, spars = allocate(sens, _curves(), GRID, 0.9, 2e-3)
    assert total <= 2e-3 and total == pytest.approx(sum(kl.values()))
    assert cdf[0] <= cdf[1]  # the insensitive layer gets the lower threshold (sparser)
    assert cdf[2] == 0.9 and kl[2] == 0.0  # missing nothing at the probe costs nothing: its sparsity is free
    # cost model: KL_l(c) = KL_l(probe) * (miss(c) / miss(probe))^2
    j = GRID.index(cdf[1])
    assert kl[1] == pytest.approx(1e-2 * (_curves()[1][1][j] / 0.1) ** 2)
    assert spars == pytest.approx(sum(_curves()[li][0][GRID.index(c)] for li, c in cdf.items()) / 3)
    # a larger budget is never denser
    prev = -1.0
    for budget in (1e-4, 1e-3, 1e-2, 1.0):
        *_, s = allocate(sens, _curves(), GRID, 0.9, budget)
        assert s >= prev - 1e-12
        prev = s
    # a budget below the densest allocation: the densest one is returned (and says its cost)
    cdf, _, total, _ = allocate({0: 1.0, 1: 1.0, 2: 1.0}, _curves(), GRID, 0.9, 1e-9)
    assert cdf == {0: 0.99, 1: 0.99, 2: 0.9} and total > 1e-9  # layer 2's 0.9 is free (it misses nothing)


@pytest.mark.parametrize("kw,needle", [({"probe": 0.5}, "probe is not a value of the grid"),
                                       ({"kl_budget": 0.0}, "kl_budget must be a positive finite number"),
                                       ({"kl_budget": math.nan}, "kl_budget must be a positive finite number")])
def test_allocate_errors(kw, needle):
    args = {"probe": 0.9, "kl_budget": 1e-3, **kw}
    with pytest.raises(ValueError, match=needle):
        allocate({0: 1e-3, 1: 1e-3, 2: 1e-3}, _curves(), GRID, args["probe"], args["kl_budget"])
    with pytest.raises(ValueError, match="must cover exactly the probed layers"):
        allocate({0: 1e-3}, _curves(), GRID, 0.9, 1e-3)


def test_layer_curves_are_monotone_and_exact_at_cdf_one():
    base = MeanSimilarityConfig(block_m=32, block_n=32, keep_local=1)
    smp = [structured_qkv(1, 4, 384, 32, kv_heads=2, seed=s) for s in (1, 2)]
    grid = (1.0, 0.97, 0.9, 0.7, 0.4)
    sp, miss = layer_curves(smp, mean_sim_stats, base, grid, sim=-1.0)
    assert miss[0] == pytest.approx(0.0, abs=1e-6)  # cdf 1 keeps every block the softmax gives mass
    assert all(a <= b + 1e-9 for a, b in zip(sp, sp[1:])) and all(a <= b + 1e-9 for a, b in zip(miss, miss[1:]))
    assert sp[-1] > 0.2 and 0.0 < miss[-1] < 1.0
    # the same numbers by hand for one threshold: the mean_sim predictor's own layout and the oracle's exact mass
    from sparseattn.predictors.mean_similarity import MeanSimilarityPredictor
    from sparseattn.predictors.oracle import exact_block_mass

    want_sp, want_miss = 0.0, 0.0
    for q, k, _ in smp:
        m = MeanSimilarityPredictor(MeanSimilarityConfig(block_m=32, block_n=32, keep_local=1, sim_threshold=-1.0,
                                                         cdf_threshold=0.7), backend="torch").predict(q, k).to_dense_mask()
        mass = exact_block_mass(q, k, causal=True, block_m=32, block_n=32)
        region = torch.ones(12, 12, dtype=torch.bool).tril()
        want_sp += (1 - m.sum().item() / (region.sum().item() * 4)) / 2
        want_miss += (1 - (mass * m).sum(-1).mean().item()) / 2
    assert sp[3] == pytest.approx(want_sp, abs=1e-6) and miss[3] == pytest.approx(want_miss, abs=1e-5)


transformers = pytest.importorskip("transformers")


def test_allocate_model_with_a_gate_round_trips_and_measures_what_it_says(tmp_path):
    from sparseattn.eval.end_to_end import logits_metrics
    from sparseattn.gate.model import GateWeights
    from sparseattn.integrations.transformers_patch import patch_model
    from sparseattn.testing.models import tiny_llama
    from sparseattn.tuning import allocate_model
    from sparseattn.tuning.predictor import TunedGatePredictor
    from sparseattn.tuning.store import load_tuned, make_predictor, model_fingerprint, save_tuned

    model = tiny_llama(layers=3)
    c = model.config
    gate = GateWeights.init([0, 1, 2], c.num_key_value_heads, c.hidden_size // c.num_attention_heads, 8, block_m=32,
                            block_n=32, heads=c.num_attention_heads, noise=0.05)
    gate.meta["fingerprint"] = model_fingerprint(model)
    ids = [torch.randint(0, 97, (256,), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    base = MeanSimilarityConfig(block_m=32, block_n=32, keep_local=2)
    lines: list[str] = []
    cfg = allocate_model(model, ids, kl_budget=2e-4, base=base, gate=gate, grid=(0.99, 0.9, 0.7, 0.5), probe=0.7,
                         progress=False, log=lines.append, dense_layers=(0,))
    al = cfg.meta["allocation"]
    assert sorted(cfg.layers) == [1, 2] and cfg.meta["rule"] == "layer_kl" and cfg.meta["budgets"] == {"kl": 2e-4}
    assert al["predicted_kl"] <= 2e-4 and len(lines) == 3 and lines[-1].startswith("allocation: predicted KL")
    for li, hp in cfg.layers.items():
        assert torch.equal(hp.cdf_threshold, torch.full_like(hp.cdf_threshold, al["layers"][str(li)]["cdf"]))
        assert bool((hp.sim_threshold == -1.0).all())
    # the recorded sensitivity is the KL of the model with only that layer sparse at the probe threshold and every
    # other layer on the model's own attention
    from sparseattn.tuning.allocate import _head_params
    import dataclasses

    one = dataclasses.replace(cfg, layers={2: _head_params(c.num_attention_heads, 0.7, -1.0)})
    with torch.no_grad():
        ref = model(ids[0][None], use_cache=False, logits_to_keep=128).logits[0, -128:].float()
        with patch_model(model, tuned=one, dense_layers=[0, 1]):
            got = model(ids[0][None], use_cache=False, logits_to_keep=128).logits[0, -128:].float()
    assert al["layers"]["2"]["sensitivity_kl"] == pytest.approx(logits_metrics(got, ref)["kl_dense_sparse"], rel=1e-5)
    path = save_tuned(tmp_path / "al.safetensors", cfg)
    back = load_tuned(path, model=model)
    assert back.meta["allocation"]["layers"] == json.loads(json.dumps(al["layers"]))
    assert isinstance(make_predictor(back), TunedGatePredictor)
    with pytest.raises(ValueError, match="^allocate_model: kl_budget must be a positive finite number"):
        allocate_model(model, ids, kl_budget=-1.0, base=base, gate=gate, progress=False)
    with pytest.raises(ValueError, match="^allocate_model: probe is not a value of the grid"):
        allocate_model(model, ids, kl_budget=1e-3, base=base, gate=gate, grid=(0.9, 0.5), progress=False)


def test_sensitivity_forwards_run_only_the_probed_layer_through_sparseattn(monkeypatch):
    """Every other layer keeps the model's own attention in a sensitivity forward: in bf16 the all-blocks kernel of 29
    other layers would add their rounding floor to each layer's KL (measured on the H200: 2.0e-3 for SmolLM2's layer 0
    against 7.1e-5 in fp32), and on the CPU they ran through the masked-SDPA path for nothing."""
    import sparseattn.integrations.transformers_patch as tp
    from sparseattn.testing.models import tiny_llama
    from sparseattn.tuning import allocate_model

    model = tiny_llama(layers=3)
    ids = [torch.randint(0, 97, (256,), generator=torch.Generator().manual_seed(3))]
    real, seen = tp.patch_model, []

    def spy(m, **kw):
        h = real(m, **kw)
        seen.append((sorted(kw["tuned"].layers), sorted(kw["tuned"].meta["dense_layers"]), h))
        return h

    monkeypatch.setattr(tp, "patch_model", spy)
    allocate_model(model, ids, kl_budget=1e-3, base=MeanSimilarityConfig(block_m=32, block_n=32, keep_local=2),
                   grid=(0.99, 0.9, 0.7), probe=0.9, progress=False, dense_layers=(1,))
    assert [(layers, dense) for layers, dense, _ in seen] == [([0], [1, 2]), ([2], [0, 1])]
    for layers, _, h in seen:  # the handle's report: the probed layer sparse, every other one the model's own attention
        modes = {int(li): r["mode"] for li, r in h.sparsity_report()["layers"].items()}
        assert modes == {li: "sparse" if li in layers else "dense" for li in range(3)}
        # the layers before the probed one are replayed from the dense forward, not run: only those after it run dense
        assert h.counts["prefill_sparse"] == 1 and h.counts["prefill_dense"] == 2 - layers[0]
    assert not any("forward" in mod.__dict__ for mod in model.model.layers)  # the replay is undone


def test_sensitivity_replay_equals_whole_forwards_and_warns_without_decoder_layers(monkeypatch):
    import sparseattn.models.layers as ml
    from sparseattn.testing.models import tiny_llama
    from sparseattn.tuning.allocate import _head_params, layer_sensitivity
    from sparseattn.tuning.run import build_meta
    from sparseattn.tuning.store import model_fingerprint
    from sparseattn.tuning.types import ALLOCATION_RULE, TunedConfig

    model = tiny_llama(layers=4)
    h = model.config.num_attention_heads
    ids = [torch.randint(0, 97, (192,), generator=torch.Generator().manual_seed(s)) for s in (5, 6)]

    base = MeanSimilarityConfig(block_m=32, block_n=32, keep_local=1)
    meta = build_meta(model, base, rule=ALLOCATION_RULE, l1=1e-3, pv_l1=None, layer_l1="", seq_len=192, samples=2,
                      dense_layers=[], seconds=0.0)
    meta["fingerprint"] = model_fingerprint(model)

    def cfg(li):
        return TunedConfig(layers={li: _head_params(h, 0.6, -1.0)},
                           meta=dict(meta, dense_layers=[j for j in range(4) if j != li]))

    kw = dict(score_last=96, progress=False)
    replayed = layer_sensitivity(model, ids, [0, 1, 3], cfg, **kw)
    monkeypatch.setattr(ml, "decoder_layers", lambda m: {})
    with pytest.warns(UserWarning, match="^layer_sensitivity: the decoder layers of this model were not found"):
        whole = layer_sensitivity(model, ids, [0, 1, 3], cfg, **kw)
    assert set(replayed) == {0, 1, 3} and all(v > 0 for v in whole.values())
    for li in whole:
        assert replayed[li] == pytest.approx(whole[li], rel=1e-6, abs=1e-12)


def test_cli_tune_allocate(tmp_path, capsys):
    from sparseattn.cli.main import main
    from sparseattn.testing.bad_inputs import save_tiny_llama
    from sparseattn.tuning.store import load_tuned

    model_dir = save_tiny_llama(tmp_path / "model", hidden_size=64, intermediate_size=64, heads=4, kv_heads=2,
                                head_dim=16)
    out = tmp_path / "al.safetensors"
    rc = main(["tune", "--model", str(model_dir), "--random-ids", "--seq-len", "128", "--samples", "1", "--allocate",
               "--kl-budget", "0.001", "--no-plot", "--quiet", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    cfg = load_tuned(out)
    assert cfg.meta["rule"] == "layer_kl" and "allocation" in cfg.meta
    assert "per-layer allocation: predicted KL budget 0.001" in out.with_suffix(".md").read_text()
    for argv, needle in [(["--allocate"], "--allocate needs --kl-budget"),
                         (["--allocate", "--kl-budget", "0.01", "--pv-l1", "0.1"], "--pv-l1 does not apply to --allocate"),
                         (["--allocate", "--kl-budget", "0.01", "--l1", "0.1"], "--l1 does not apply to --allocate"),
                         (["--kl-budget", "0.01"], "need --allocate")]:
        rc = main(["tune", "--model", str(model_dir), "--random-ids", "--seq-len", "128", "--samples", "1", *argv,
                   "--quiet", "--out", str(tmp_path / "o.safetensors")])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and needle in err, err
