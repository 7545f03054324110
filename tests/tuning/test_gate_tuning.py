"""Per-head tuning over a learned gate (``tune_model(gate=...)``, ``sparseattn tune --gate``): the gate's stats give
the gate's own selection, the budget holds, inference selects what the search measured, the tuned file embeds the
gate and round-trips, bad files and bad calls get clear errors, and two gloo ranks give the single-process result."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("safetensors")

from sparseattn.gate.model import GateWeights  # noqa: E402
from sparseattn.integrations.transformers_patch import masked_sdpa_attention  # noqa: E402
from sparseattn.predictors.gate import GateConfig, GatePredictor  # noqa: E402
from sparseattn.predictors.mean_similarity import MeanSimilarityConfig  # noqa: E402
from sparseattn.testing.inputs import structured_qkv  # noqa: E402
from sparseattn.tuning import tune_layer  # noqa: E402
from sparseattn.tuning.predictor import TunedGatePredictor, gate_stats, select_per_head  # noqa: E402
from sparseattn.tuning.search import head_errors  # noqa: E402

H, HKV, N, D = 4, 2, 512, 32
BM = 32


def _gate(layers=(0,), heads=H, kv=HKV, d=D, seed=0) -> GateWeights:
    g = GateWeights.init(list(layers), kv, d, 16, block_m=BM, block_n=BM, seed=seed, noise=0.05, heads=heads)
    gen = torch.Generator().manual_seed(seed + 1)
    g.bias = torch.randn(g.bias.shape, generator=gen)  # a non-trivial position bias
    return g


def _samples(n=2):
    return [structured_qkv(1, H, N, D, kv_heads=HKV, seed=40 + s) for s in range(n)]


def _base(local=2):
    return MeanSimilarityConfig(block_m=BM, block_n=BM, keep_local=local)


def _stats_fn(gate, layer=0):
    pred = GatePredictor(GateConfig(), weights=gate, backend="torch")
    return lambda q, k, base, causal=True: gate_stats(pred, q, k, base, causal=causal, layer=layer)


def test_gate_stats_select_what_the_gate_selects():
    gate = _gate()
    q, k, _ = _samples(1)[0]
    q = q.clone()
    q[0, 1, 70] = float("nan")  # query block 2 of head 1: kept whole by both
    for cdf, local in ((0.9, 2), (0.5, 1), (0.99, 4)):
        want = GatePredictor(GateConfig(cdf_threshold=cdf, keep_local=local), weights=gate, backend="torch") \
            .predict(q, k, layer=0).to_dense_mask()
        stats = gate_stats(GatePredictor(GateConfig(), weights=gate, backend="torch"), q, k, _base(local), layer=0)
        got = select_per_head(stats, torch.full((H,), -1.0), torch.full((H,), cdf))
        assert torch.equal(want, got), (cdf, local)
    assert bool(got[0, 1, 2][: 3].all())  # the non-finite query block keeps its causal row
    assert gate_stats(GatePredictor(GateConfig(), weights=gate, backend="torch"), q, k, _base(), layer=3) is None


@pytest.fixture(scope="module")
def tuned_gate():
    gate = _gate()
    smp = _samples(2)
    hp = tune_layer(smp, base=_base(2), l1=0.05, cdf_steps=5, sim_grid=(-1.0,), keep_local_grid=(1,),
                    stats_fn=_stats_fn(gate))
    return gate, smp, hp


def test_budget_holds_and_inference_selects_what_the_search_measured(tuned_gate):
    gate, smp, hp = tuned_gate
    assert hp.keep_local is not None and bool((hp.sim_threshold[~hp.dense] == -1.0).all())
    assert float(hp.sparsity.max()) > 0.1  # something was skipped
    pred = TunedGatePredictor({0: hp}, _base(2), gate)
    for q, k, v in smp:
        layout = pred.predict(q, k, layer=0)
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)[0]
        err = head_errors(masked_sdpa_attention(q, k, v, layout)[0], ref, "l1")
        assert bool((err <= 0.05 + 1e-4).all()), err  # the budget holds, measured by another attention path
        stats = gate_stats(pred.gate, q, k, _base(2), layer=0)
        from sparseattn.tuning.predictor import per_head_forced

        forced = per_head_forced(stats, True, hp.local_blocks(2))
        search = select_per_head(stats, torch.nan_to_num(hp.sim_threshold, nan=1.0),
                                 torch.nan_to_num(hp.cdf_threshold, nan=1.0), hp.dense, forced)
        assert torch.equal(layout.to_dense_mask(), search)
    # the tuner only moves the CDF threshold: a head at cdf c, local l selects what the gate does at (c, l)
    h = int(torch.nonzero(~hp.dense)[0])
    q, k, _ = smp[0]
    want = GatePredictor(GateConfig(cdf_threshold=float(hp.cdf_threshold[h]), keep_local=int(hp.keep_local[h])),
                         weights=gate, backend="torch").predict(q, k, layer=0).to_dense_mask()[0, h]
    assert torch.equal(pred.predict(q, k, layer=0).to_dense_mask()[0, h], want)
    assert pred.name == "tuned_gate" and "gate_layers=[0]" in repr(pred)


def test_tuned_gate_predictor_errors(tuned_gate):
    gate, _, hp = tuned_gate
    with pytest.raises(ValueError, match=r"^TunedGatePredictor: gate must be GateWeights"):
        TunedGatePredictor({0: hp}, _base(), "gate.safetensors")
    with pytest.raises(ValueError, match=r"^TunedGatePredictor: layers name layers the gate holds no weights for"):
        TunedGatePredictor({5: hp}, _base(), gate)
    with pytest.raises(ValueError, match=r"^TunedGatePredictor: base has other block sizes than the gate"):
        TunedGatePredictor({0: hp}, MeanSimilarityConfig(block_m=64, block_n=64), gate)
    with pytest.raises(ValueError, match=r"^tune_layer: stats_fn must be callable"):
        tune_layer(_samples(1), base=_base(), stats_fn="gate")


# --------------------------------------------------------------------------- whole model, file, errors
transformers = pytest.importorskip("transformers")


def _model():
    from sparseattn.testing.models import tiny_llama

    return tiny_llama(layers=2)


def _ids():
    return [torch.randint(0, 97, (128,), generator=torch.Generator().manual_seed(s)) for s in range(2)]


def _model_gate(model, layers=(0, 1)):
    from sparseattn.tuning.store import model_fingerprint

    c = model.config
    g = _gate(layers, heads=c.num_attention_heads, kv=c.num_key_value_heads, d=c.hidden_size // c.num_attention_heads)
    g.meta["fingerprint"] = model_fingerprint(model)
    return g


def _uniform(cdf, local=None, heads=H):
    from sparseattn.tuning.allocate import _head_params

    import dataclasses

    hp = _head_params(heads, cdf, -1.0)
    return hp if local is None else dataclasses.replace(hp, keep_local=torch.tensor(local, dtype=torch.float32))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_layers_with_one_threshold_go_through_the_gate_predictor(backend):
    """What --allocate writes (one CDF threshold and local window per layer) is predicted by a GatePredictor at that
    threshold (its fused path on CUDA); the layouts equal the per-head path's, NaN blocks included."""
    import dataclasses

    if backend == "triton":
        pytest.importorskip("triton")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gate = _gate(layers=(0, 1, 2, 3))
    layers = {0: _uniform(0.9), 1: _uniform(0.7, [3, 3, 3, 3]), 2: _uniform(0.9, [1, 2, 1, 1]), 3: _uniform(0.8)}
    layers[3] = dataclasses.replace(layers[3], cdf_threshold=torch.tensor([0.8, 0.6, 0.8, 0.8]))  # per-head: the per-head path
    pred = TunedGatePredictor(layers, _base(2), gate, backend=backend)
    assert sorted(pred.uniform) == [0, 1] and pred.uniform[0].config.keep_local == 2 \
        and pred.uniform[1].config.keep_local == 3 and pred.uniform[1].config.cdf_threshold == pytest.approx(0.7)
    q, k, _ = _samples(1)[0]
    q, k = q[..., :N - 37, :].clone().to(dev), k[..., :N - 37, :].clone().to(dev)  # a partial last block
    q[0, 1, 70] = float("nan")
    for li in range(4):
        got = pred.predict(q, k, layer=li)
        want = super(TunedGatePredictor, pred).predict(q, k, layer=li)  # the per-head path
        assert torch.equal(got.to_dense_mask(), want.to_dense_mask()), li
        if li in pred.uniform:
            assert pred.uniform[li].last_backend == backend
    with pytest.raises(ValueError, match="^TunedGatePredictor.predict: q has a head count that layer 0 was not tuned"):
        pred.predict(q[:, :2], k, layer=0)


@pytest.fixture(scope="module")
def tuned_file(tmp_path_factory):
    from sparseattn.tuning import tune_model
    from sparseattn.tuning.store import save_tuned

    model = _model()
    gate = _model_gate(model)
    lines: list[str] = []
    tc = tune_model(model, _ids(), l1=0.1, base=_base(2), progress=False, log=lines.append, gate=gate,
                    keep_local_grid=(1,))
    assert len(lines) == 2 * model.config.num_attention_heads and "sim=-1.000" in lines[0]
    path = save_tuned(tmp_path_factory.mktemp("tg") / "tg.safetensors", tc)
    return model, gate, tc, path


def test_tuned_gate_file_round_trips_and_patches(tuned_file):
    from sparseattn.integrations.transformers_patch import patch_model
    from sparseattn.tuning.store import load_tuned, make_predictor

    model, gate, tc, path = tuned_file
    assert tc.meta["predictor"]["name"] == "gate" and tc.meta["predictor"]["score"] == "gate"
    back = load_tuned(path, model=model)
    assert back.gate is not None and back.gate.layers == gate.layers
    for name in ("wq", "wk", "bias"):
        assert torch.equal(getattr(back.gate, name), getattr(gate, name)), name
    for li, hp in tc.layers.items():
        for key, t in hp.tensors(li).items():
            assert torch.equal(torch.nan_to_num(back.layers[li].tensors(li)[key], nan=-7.0),
                               torch.nan_to_num(t, nan=-7.0)), key
    pred = make_predictor(back)
    assert isinstance(pred, TunedGatePredictor) and pred.config.keep_local == 2
    ids = _ids()[0][None]
    with torch.no_grad(), patch_model(model, tuned=path, backend="masked_sdpa") as h:
        out = model(ids).logits
        rep = h.sparsity_report()
    assert torch.isfinite(out).all() and rep["mean_sparsity"] > 0.0
    # scale_tuned (the model-level calibration's knob) keeps the gate
    from sparseattn.tuning.calibrate import scale_tuned

    assert scale_tuned(back, 0.5).gate is back.gate


def _rewrite(src, dst, *, drop=(), meta_change=None):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from sparseattn.tuning.store import META_KEY

    with safe_open(str(src), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k not in drop}
        meta = json.loads(f.metadata()[META_KEY])
    if meta_change is not None:
        meta_change(meta)
    save_file(tensors, str(dst), metadata={META_KEY: json.dumps(meta)})
    return dst


@pytest.mark.parametrize("drop,change,needle", [
    (("gate.wk",), None, "(embedded gate) is missing tensor wk"),
    ((), lambda m: m.pop("gate"), "metadata key 'gate' is missing or not a JSON object"),
    ((), lambda m: m["predictor"].update(name="sketch"), "metadata 'predictor' key 'name' is not a tunable predictor"),
    ((), lambda m: m["gate"].update(layers=[0, 5]), "embedded gate holds no weights for tuned layers"),
    ((), lambda m: m["predictor"].update(block_m=16), "embedded gate has other block sizes"),
    ((), lambda m: m["predictor"].update(name="mean_sim"), "holds tensors of no listed layer"),
])
def test_bad_tuned_gate_files(tuned_file, tmp_path, drop, change, needle):
    from sparseattn.tuning.store import load_tuned

    bad = _rewrite(tuned_file[3], tmp_path / "bad.safetensors", drop=drop, meta_change=change)
    with pytest.raises(ValueError) as ei:
        load_tuned(bad)
    msg = str(ei.value)
    assert msg.startswith(f"load_tuned: tuned file {bad}") and needle in msg, msg


def test_bad_tune_calls(tuned_file):
    import dataclasses

    from sparseattn.tuning import tune_model
    from sparseattn.tuning.store import save_tuned

    model, gate, tc, path = tuned_file
    with pytest.raises(ValueError, match=r"^tune_model: gate holds no weights for layers to tune"):
        tune_model(model, _ids(), base=_base(), progress=False, gate=_model_gate(model, layers=(0,)))
    with pytest.raises(ValueError, match=r"^tune_model: base has other block sizes than the gate"):
        tune_model(model, _ids(), base=MeanSimilarityConfig(block_m=64, block_n=64), progress=False, gate=gate)
    with pytest.raises(ValueError, match=r"^tune_model: gate must be GateWeights"):
        tune_model(model, _ids(), base=_base(), progress=False, gate="gate.safetensors")
    with pytest.raises(ValueError, match=r"^save_tuned: cfg.gate is None but the metadata names the gate predictor"):
        save_tuned(path.with_name("x.safetensors"), dataclasses.replace(tc, gate=None))


def test_cli_tune_gate(tuned_file, tmp_path, capsys):
    from sparseattn.cli.main import main
    from sparseattn.gate.store import save_gate
    from sparseattn.testing.bad_inputs import save_tiny_llama
    from sparseattn.testing.models import write_word_text
    from sparseattn.models.loader import load
    from sparseattn.tuning.store import load_tuned, model_fingerprint

    model_dir = save_tiny_llama(tmp_path / "model", hidden_size=64, intermediate_size=64, heads=4, kv_heads=2,
                                head_dim=16)
    model, _ = load(str(model_dir))
    g = _gate((0, 1), heads=4, kv=2, d=16)
    g.meta["fingerprint"] = model_fingerprint(model)
    gate_file = save_gate(tmp_path / "gate.safetensors", g)
    text = write_word_text(tmp_path / "text.txt", 2000)
    out = tmp_path / "tg.safetensors"
    rc = main(["tune", "--model", str(model_dir), "--text-file", str(text), "--seq-len", "128", "--samples", "2",
               "--gate", str(gate_file), "--keep-local", "2", "--keep-local-grid", "1", "--l1", "0.1", "--compare",
               "--compare-samples", "1", "--no-plot", "--quiet", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    cfg = load_tuned(out, model=model)
    assert cfg.gate is not None and cfg.meta["predictor"]["keep_local"] == 2
    rows = json.loads(out.with_suffix(".json").read_text())["compare"]["rows"]
    assert list(rows) == ["default", "gate", "tuned"]
    assert rows["gate"]["spec"] == f"gate:path={gate_file},cdf_threshold=0.95,keep_local=2,keep_sink=True"
    for argv, needle in [(["--gate", str(tmp_path / "none.safetensors")], "does not exist"),
                         (["--gate", str(gate_file), "--from-file", str(out)], "cannot be combined with --from-file"),
                         (["--gate", str(text)], "is not a readable safetensors file")]:
        rc = main(["tune", "--model", str(model_dir), "--random-ids", "--seq-len", "128", "--samples", "1", *argv,
                   "--quiet", "--out", str(tmp_path / "o.safetensors")])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and needle in err, err
    assert math.isfinite(rows["tuned"]["top1_agreement"])
