"""Learned block gate: predictor, file format, self-distillation training, CLI and the predictor sweep.

Tiny shapes only (CPU; the fused path under TRITON_INTERPRET=1)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sparseattn.testing.tolerances import FP32_ATOL, GATE_SCORES_ATOL  # noqa: E402

pytest.importorskip("safetensors")

from sparseattn.gate.model import GateWeights, gate_scores, pooled_features  # noqa: E402
from sparseattn.gate.store import load_gate, save_gate  # noqa: E402
from sparseattn.layout.block_layout import BlockLayout  # noqa: E402
from sparseattn.predictors._common import causal_region  # noqa: E402
from sparseattn.predictors.base import config_from_json, config_to_json, parse_predictor_spec  # noqa: E402
from sparseattn.predictors.gate import GateConfig, GatePredictor  # noqa: E402

B, H, HKV, D, BLK = 1, 4, 2, 16, 16
FP = {"num_hidden_layers": 2, "num_attention_heads": H, "num_key_value_heads": HKV, "head_dim": D, "model_type": "llama"}


def _weights(d_gate: int = 8, noise: float = 0.2, layers=(0, 1)) -> GateWeights:
    w = GateWeights.init(list(layers), HKV, D, d_gate, block_m=BLK, block_n=BLK, seed=3, noise=noise)
    w.meta["fingerprint"] = dict(FP)
    return w


def _bias_weights(seed: int = 5) -> GateWeights:
    from sparseattn.gate.model import BIAS_BUCKETS

    w = _weights()
    g = torch.Generator().manual_seed(seed)
    w.bias = torch.randn(len(w.layers), H, BIAS_BUCKETS, generator=g)
    return w


# the Triton paths run where the kernels do: CUDA when the machine has it, else the CPU interpreter
KDEV = "cuda" if torch.cuda.is_available() else "cpu"


def _qk(n: int = 160, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, n, D, generator=g), torch.randn(B, HKV, n, D, generator=g)


@pytest.fixture(scope="module")
def gate_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("gate") / "g.safetensors"
    save_gate(p, _weights())
    return p


# --------------------------------------------------------------------------- spec / config
def test_spec_resolves_everywhere(gate_file):
    from sparseattn.integrations.transformers_patch import resolve_predictor

    p = parse_predictor_spec(f"gate:path={gate_file},topk=0.25")
    assert isinstance(p, GatePredictor) and p.config.topk == 0.25 and p.config.cdf_threshold is None
    p2 = resolve_predictor(f"gate:path={gate_file},cdf_threshold=0.9,keep_local=2")
    assert isinstance(p2, GatePredictor) and p2.config.cdf_threshold == 0.9
    assert GateConfig().cdf_threshold == 0.95  # neither set: the default CDF
    cfg = GateConfig(path=str(gate_file), topk=0.1)
    assert config_from_json(config_to_json(cfg), GateConfig) == cfg


@pytest.mark.parametrize("spec, words", [
    ("gate:topk=0.1", "path is required"),
    ("gate:path={f},topk=0.1,cdf_threshold=0.9", "at most one"),
    ("gate:path={f},topk=1.5", "out of range"),
    ("gate:path={f},block_m=32", "not a parameter of gate"),
])
def test_bad_specs(gate_file, spec, words):
    with pytest.raises(ValueError, match=words):
        parse_predictor_spec(spec.format(f=gate_file))


# --------------------------------------------------------------------------- predictor
@pytest.mark.parametrize("kw", [{"topk": 0.3}, {"cdf_threshold": 0.8, "keep_local": 2}, {"topk": 0.2, "keep_sink": False}])
def test_layout_is_valid_causal_and_keeps_forced_blocks(kw):
    q, k = _qk()
    pred = GatePredictor(GateConfig(**kw), weights=_weights(), backend="torch")
    lay = pred.predict(q, k, causal=True, layer=1)
    # revalidate the index format with the checking constructor
    BlockLayout(lay.kv_num_blocks.clone(), lay.kv_indices.clone(), BLK, BLK, 160, 160, validate=True)
    mask = lay.to_dense_mask()
    region = causal_region(160, 160, BLK, BLK, True, q.device)
    assert not bool((mask & ~region).any()) and lay.in_region
    Mb = mask.shape[-2]
    diag = torch.arange(Mb)
    assert bool(mask[..., diag, diag].all())  # keep_local >= 1: the diagonal block
    if kw.get("keep_sink", True):
        assert bool(mask[..., 0].all())
    p = pred.last_scores
    assert p.shape == (B, H, Mb, Mb)
    assert torch.allclose(p.sum(-1), torch.ones(B, H, Mb), atol=FP32_ATOL)
    if "topk" in kw:  # at least ceil(topk * allowed) per row (plus forced)
        allowed = region.sum(-1)
        need = torch.clamp(torch.ceil(allowed * kw["topk"] - 1e-9), min=1)
        assert bool((mask.sum(-1) >= need).all())


def test_initial_gate_equals_mean_sim_mean_score():
    """Before training (d_gate = D, no noise) the gate's score is mean_sim's mean score, so its layouts agree."""
    from sparseattn.predictors.mean_similarity import MeanSimilarityConfig, MeanSimilarityPredictor

    q, k = _qk(n=192, seed=4)
    w = GateWeights.init([0], HKV, D, D, block_m=BLK, block_n=BLK, seed=1)
    g = GatePredictor(GateConfig(topk=0.3), weights=w, backend="torch")
    m = MeanSimilarityPredictor(MeanSimilarityConfig(topk=0.3, cdf_threshold=None, sim_threshold=-1.0, block_m=BLK,
                                                     block_n=BLK), backend="torch")
    lg, lm = g.predict(q, k, layer=0), m.predict(q, k, layer=0)
    assert torch.allclose(g.last_scores, m.last_scores, atol=FP32_ATOL)
    assert torch.equal(lg.to_dense_mask(), lm.to_dense_mask())


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("kw", [{"topk": 0.3}, {"cdf_threshold": 0.9, "keep_local": 2}])
def test_fused_path_matches_torch(kw, bias):
    pytest.importorskip("triton")
    q, k = (t.to(KDEV) for t in _qk(n=150, seed=2))  # partial last block
    w = _bias_weights() if bias else _weights()
    a = GatePredictor(GateConfig(**kw), weights=w, backend="torch")
    b = GatePredictor(GateConfig(**kw), weights=w, backend="triton")
    la, lb = a.predict(q, k, layer=1), b.predict(q, k, layer=1)
    assert b.last_backend == "triton"
    assert torch.equal(la.kv_num_blocks, lb.kv_num_blocks) and torch.equal(la.kv_indices, lb.kv_indices)
    assert torch.allclose(a.last_scores, b.last_scores, atol=FP32_ATOL)
    if bias:  # the bias is applied
        base = GatePredictor(GateConfig(**kw), weights=_weights(), backend="torch")
        base.predict(q, k, layer=1)
        assert not torch.allclose(base.last_scores, a.last_scores, atol=1e-3)


def test_nonfinite_block_keeps_its_row():
    q, k = _qk()
    q[0, 1, 40] = float("nan")  # query block 2 of head 1
    lay = GatePredictor(GateConfig(topk=0.1), weights=_weights(), backend="torch").predict(q, k, layer=0)
    mask = lay.to_dense_mask()
    region = causal_region(160, 160, BLK, BLK, True, q.device)
    assert torch.equal(mask[0, 1, 2], region[2])


def test_layers_dense_and_shape_checks():
    q, k = _qk()
    w = _weights(layers=(1,))
    pred = GatePredictor(GateConfig(topk=0.1), weights=w, backend="torch")
    dense = pred.predict(q, k, layer=0)  # no weights for layer 0: dense causal
    assert dense.density(causal=True) == pytest.approx(1.0)
    assert pred.predict(q, k, layer=None).density(causal=True) < 1.0  # one layer in the gate: used for layer=None
    two = GatePredictor(GateConfig(topk=0.1), weights=_weights(), backend="torch")
    with pytest.raises(ValueError, match="layer is required"):
        two.predict(q, k, layer=None)
    with pytest.raises(ValueError, match="do not match the gate's shape"):
        two.predict(torch.randn(1, 4, 64, 8), torch.randn(1, 2, 64, 8), layer=0)
    with pytest.raises(ValueError, match="path is required"):
        GatePredictor(GateConfig(topk=0.1))


# --------------------------------------------------------------------------- file format
def test_file_round_trip(gate_file):
    w = _weights()
    got = load_gate(gate_file)
    assert got.layers == [0, 1] and (got.block_m, got.block_n, got.d_gate, got.head_dim, got.kv_heads) == (BLK, BLK, 8, D, HKV)
    assert torch.equal(got.wq, w.wq) and torch.equal(got.wk, w.wk)
    assert got.meta["fingerprint"] == FP and got.meta["version"] == 1


def _rewrite(path, tensors, meta):
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"sparseattn_gate": json.dumps(meta)} if meta is not None else None)


@pytest.mark.parametrize("case, words", [
    ("truncated", "not a readable safetensors file"),
    ("empty", "is empty"),
    ("missing", "does not exist"),
    ("no_meta", "has no 'sparseattn_gate' metadata"),
    ("bad_version", "version"),
    ("missing_key", "is missing key 'd_gate'"),
    ("missing_tensor", "is missing tensor wk"),
    ("wrong_shape", "has the wrong shape or dtype"),
    ("nan", "holds NaN or infinite weights"),
    ("bad_json", "is not valid JSON"),
])
def test_bad_files_give_clear_errors(gate_file, tmp_path, case, words):
    from safetensors.torch import save_file

    good = load_gate(gate_file)
    meta = {k: v for k, v in good.meta.items()}
    tensors = {"wq": good.wq.clone(), "wk": good.wk.clone()}
    p = tmp_path / "bad.safetensors"
    if case == "truncated":
        p.write_bytes(gate_file.read_bytes()[:-100])
    elif case == "empty":
        p.write_bytes(b"")
    elif case == "missing":
        p = tmp_path / "nope.safetensors"
    elif case == "no_meta":
        _rewrite(p, tensors, None)
    elif case == "bad_version":
        _rewrite(p, tensors, dict(meta, version=99))
    elif case == "missing_key":
        meta.pop("d_gate")
        _rewrite(p, tensors, meta)
    elif case == "missing_tensor":
        _rewrite(p, {"wq": tensors["wq"]}, meta)
    elif case == "wrong_shape":
        _rewrite(p, {"wq": tensors["wq"][:1].contiguous(), "wk": tensors["wk"]}, meta)
    elif case == "nan":
        tensors["wk"][0, 0, 0, 0] = float("nan")
        _rewrite(p, tensors, meta)
    elif case == "bad_json":
        save_file(tensors, str(p), metadata={"sparseattn_gate": "{not json"})
    with pytest.raises(ValueError, match=words) as ei:
        load_gate(p)
    assert str(ei.value).startswith("load_gate: ")
    with pytest.raises(ValueError, match=words):  # the same error through the spec
        parse_predictor_spec(f"gate:path={p},topk=0.1")


def test_model_shape_is_checked(gate_file):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=1, head_dim=16)
    with pytest.raises(ValueError, match="trained for another model.*num_key_value_heads"):
        load_gate(gate_file, model=cfg)
    ok = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    assert load_gate(gate_file, model=ok).layers == [0, 1]


# --------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-layer Llama with a byte-level tokenizer (saved with save_pretrained) and two text files."""
    pytest.importorskip("transformers")
    from sparseattn.testing.bad_inputs import save_tiny_llama

    d = tmp_path_factory.mktemp("tiny_gate")
    model_dir = save_tiny_llama(d / "model", hidden_size=64, intermediate_size=64, heads=4, kv_heads=2,
                                head_dim=16)
    words = "the quick brown fox jumps over the lazy dog while seven wizards quietly box jumping frogs".split()
    g = torch.Generator().manual_seed(1)
    texts = d / "texts"
    texts.mkdir()
    for i in range(3):
        (texts / f"t{i}.txt").write_text(" ".join(words[int(j)] for j in torch.randint(0, len(words), (300,), generator=g)))
    return model_dir, texts


def test_training_lowers_the_loss_and_the_gate_runs_in_the_model(tiny, tmp_path):
    from sparseattn.gate.train import train_gate
    from sparseattn.integrations.transformers_patch import patch_model
    from sparseattn.models.loader import load

    from sparseattn.eval.texts import dir_documents, token_samples

    model, tok = load(str(tiny[0]))
    windows, _ = token_samples(dir_documents(tiny[1]), tok, seq_len=128, samples=3)
    ids, val = windows[:2], windows[2:]  # the last window is never trained on
    w, hist = train_gate(model, ids, d_gate=8, block_m=16, block_n=16, steps=30, lr=1e-2, progress=False,
                         val_ids_list=val)
    assert len(hist["loss"]) == 30 and all(math.isfinite(x) for x in hist["loss"])
    assert hist["final_loss"] < hist["initial_loss"] * 0.95, hist
    assert hist["loss"][-1] < hist["loss"][0]
    assert hist["val_final_loss"] < hist["val_initial_loss"], hist  # it generalises to an unseen sample
    assert not any(p.grad is not None for p in model.parameters())  # the model stayed frozen
    path = save_gate(tmp_path / "trained.safetensors", w)
    back = load_gate(path, model=model)
    assert torch.equal(back.wq, w.wq) and back.meta["training"]["steps"] == 30
    # the trained gate as a predictor inside the patched model
    with torch.no_grad():
        dense = model(ids[0], use_cache=False).logits
        with patch_model(model, predictor=f"gate:path={path},topk=0.5", backend="reference") as h:
            sparse = model(ids[0], use_cache=False).logits
            rep = h.sparsity_report()
    assert rep["mean_sparsity"] is not None and rep["mean_sparsity"] > 0
    assert torch.isfinite(sparse).all() and sparse.shape == dense.shape


def test_cli_train_gate(tiny, tmp_path, capsys):
    from sparseattn.cli.main import main

    out = tmp_path / "cli_gate.safetensors"
    rc = main(["train-gate", "--model", str(tiny[0]), "--text-dir", str(tiny[1]), "--seq-len", "128", "--samples", "2",
               "--steps", "5", "--d-gate", "8", "--block-m", "16", "--block-n", "16", "--quiet", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    w = load_gate(out)
    assert w.meta["training"]["steps"] == 5 and w.meta["training"]["texts"]
    rep = json.loads(out.with_suffix(".json").read_text())
    assert len(rep["history"]["loss"]) == 5
    assert (tmp_path / "cli_gate.loss.png").is_file()
    printed = capsys.readouterr().out
    assert f"gate: {out}" in printed and "held-out KL (1 samples)" in printed
    assert rep["history"]["val_samples"] == 1 and math.isfinite(rep["history"]["val_final_loss"])
    assert w.bias is not None and w.meta["version"] == 2  # the position bias is on by default
    assert [s for s, _ in rep["history"]["val_loss"]] == [0]  # --val-every 25 > 5 steps: only the initial point
    # --keep-best, --val-every, --weight-decay, --no-position-bias
    out2 = tmp_path / "cli_gate2.safetensors"
    rc = main(["train-gate", "--model", str(tiny[0]), "--text-dir", str(tiny[1]), "--seq-len", "128", "--samples", "2",
               "--steps", "6", "--d-gate", "8", "--block-m", "16", "--block-n", "16", "--quiet", "--out", str(out2),
               "--val-every", "2", "--keep-best", "--weight-decay", "0.5", "--no-position-bias", "--no-plot"])
    assert rc == 0, capsys.readouterr().err
    w2 = load_gate(out2)
    h2 = json.loads(out2.with_suffix(".json").read_text())["history"]
    assert w2.bias is None and w2.meta["version"] == 1 and [s for s, _ in h2["val_loss"]] == [0, 2, 4, 6]
    assert h2["best_step"] in (0, 2, 4, 6) and h2["weight_decay"] == 0.5
    assert f"(weights of step {h2['best_step']}, --keep-best)" in capsys.readouterr().out
    for bad, words in ((["--keep-best", "--val-samples", "0"], "--keep-best needs held-out samples"),
                       (["--weight-decay", "-1"], "--weight-decay")):
        rc = main(["train-gate", "--model", str(tiny[0]), "--random-ids", "--seq-len", "128", "--samples", "1",
                   "--steps", "1", "--quiet", "--out", str(tmp_path / "x.safetensors"), *bad])
        assert rc == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, err
    # the files used for training are dropped by the held-out helper of predictor_curves
    from sparseattn.eval.predictor_curves import held_out_files

    all_files = sorted(str(p) for p in tiny[1].glob("*.txt"))
    left = held_out_files([str(tiny[1] / "*.txt")], [str(out)])
    assert set(left) < set(all_files) and not set(left) & set(w.meta["training"]["texts"])


def test_cli_errors_are_one_line(tiny, tmp_path, capsys):
    from sparseattn.cli.main import main

    rc = main(["train-gate", "--model", str(tiny[0]), "--random-ids", "--out", str(tmp_path)])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a directory" in err


# --------------------------------------------------------------------------- comparison
def test_sweep_against_the_oracle_frontier(gate_file, tmp_path):
    from sparseattn.eval.compare import budget_specs, random_inputs, sweep_predictors, write_sweep_report

    specs = budget_specs({"mean_sim": "mean_sim:topk={budget},cdf_threshold=None,block_m=16,block_n=16",
                          "gate": f"gate:path={gate_file},topk={{budget}}"}, [0.2, 0.5])
    assert specs["gate"] == [f"gate:path={gate_file},topk=0.2", f"gate:path={gate_file},topk=0.5"]
    inputs = random_inputs([96], layers=2, heads=H, kv_heads=HKV, head_dim=D, kind="structured")
    res = sweep_predictors(specs, inputs, matched=[0.3])
    assert len(res["points"]) == 4
    for p in res["points"]:
        # the oracle at the same block budget is an upper bound on mass recall
        assert p["recall"] <= p["oracle_recall"] + 1e-9
        assert 0 <= p["jaccard"] <= 1 and p["out_cosine"] is not None
    assert set(res["matched"]["0.3"]) == {"mean_sim", "gate", "oracle"}
    paths = write_sweep_report(res, tmp_path / "sweep")
    assert (tmp_path / "sweep" / "sweep.png").is_file()
    assert "oracle" in (tmp_path / "sweep" / "sweep.md").read_text()
    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text())["points"][0]["family"] == "mean_sim"
    assert set(paths) == {"json", "markdown", "png"}


def test_cli_compare_sweep(gate_file, tmp_path, capsys):
    from sparseattn.cli.main import main

    out = tmp_path / "cmp"
    rc = main(["compare", "--sweep", "0.3", "--family", f"gate=gate:path={gate_file},topk={{budget}}",
               "--family", "mean_sim=mean_sim:topk={budget},cdf_threshold=None,block_m=16,block_n=16",
               "--lengths", "64", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--head-dim", "16",
               "--no-plots", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert (out / "sweep.md").is_file()
    rc = main(["compare", "--sweep", "0.3", "--family", "nonsense", "--lengths", "64", "--out", str(out)])
    assert rc == 2 and "must be NAME=SPEC" in capsys.readouterr().err
    rc = main(["compare", "--lengths", "64", "--out", str(out)])  # neither --a nor --sweep
    assert rc == 2 and "--a is required" in capsys.readouterr().err


# --------------------------------------------------------------------------- hot path
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_predict_makes_no_host_reads(backend):
    from torch.utils._python_dispatch import TorchDispatchMode

    if backend == "triton":
        pytest.importorskip("triton")

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            if "_local_scalar_dense" in str(func):
                self.n += 1
            return func(*args, **(kwargs or {}))

    q, k = _qk(n=128)
    q, k = q.half(), k.half()
    if backend == "triton":
        q, k = q.to(KDEV), k.to(KDEV)
    pred = GatePredictor(GateConfig(topk=0.3), weights=_weights(), backend=backend)
    pred.predict(q, k, layer=0)  # first call: weights to the device, geometry caches
    c = Count()
    with c:
        pred.predict(q, k, layer=0)
    assert pred.last_backend == backend
    assert c.n == 0


def test_patched_model_with_gate_makes_no_host_reads(tmp_path):
    pytest.importorskip("triton")
    transformers = pytest.importorskip("transformers")
    from torch.utils._python_dispatch import TorchDispatchMode

    from sparseattn.integrations import patch_model

    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval().to(device=KDEV, dtype=torch.float16)
    w = GateWeights.init([0, 1], 1, 64, 16, block_m=64, block_n=64, noise=0.1)
    from sparseattn.tuning.store import model_fingerprint

    w.meta["fingerprint"] = model_fingerprint(model)
    path = save_gate(tmp_path / "g.safetensors", w)
    ids = torch.randint(0, 128, (1, 256), generator=torch.Generator().manual_seed(1)).to(KDEV)

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            if "_local_scalar_dense" in str(func):
                self.n += 1
            return func(*args, **(kwargs or {}))

    with patch_model(model, predictor=f"gate:path={path},topk=0.3", backend="triton",
                     layer_graphs=False) as handle:  # the gate's own path, not a graph replay, is what is counted
        with torch.no_grad():
            model(ids)
        c = Count()
        with c, torch.no_grad():
            model(ids)
        assert handle.counts["prefill_sparse"] == 4, handle.counts
        rep = handle.sparsity_report()
    assert c.n == 0
    assert all(0 < e["density"] < 1 for e in rep["layers"].values() if e["mode"] == "sparse")


def test_model_level_curves_plot_gate_and_oracle_families(tmp_path):
    pytest.importorskip("matplotlib")
    from sparseattn.eval.predictor_curves import family, load_rows, markdown, plot

    rows = []
    for spec, sp, cos, top1, kl in (("mean_sim:topk=0.2,cdf_threshold=None", 0.6, 0.99, 0.96, 0.02),
                                    ("mean_sim:topk=0.1,cdf_threshold=None", 0.8, 0.97, 0.9, 0.08),
                                    ("gate:path=g.safetensors,topk=0.1", 0.8, 0.985, 0.93, 0.05),
                                    ("oracle:topk=0.1,cdf_threshold=None", 0.8, 0.995, 0.97, 0.01)):
        rows.append({"spec": spec, "seq_len": 256, "samples": 1, "sparsity": sp, "logits_cosine": cos,
                     "top1_agreement": top1, "kl": kl, "meets_targets": False})
    (tmp_path / "curve_256.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = load_rows(tmp_path)
    assert [r["family"] for r in got] == ["mean_sim (score=mean)", "mean_sim (score=mean)", "gate", "oracle"]
    assert family("gate:path=x,topk=0.1") == "gate"
    plot(got, tmp_path / "c.png")
    assert (tmp_path / "c.png").is_file()
    assert "`gate:path=g.safetensors,topk=0.1`" in markdown(got)


@pytest.mark.parametrize("bias", [False, True])
def test_training_scores_are_the_predictor_scores(bias):
    """The trainer's differentiable score (stacked layers) is the predictor's score for each layer."""
    from sparseattn.gate.model import bias_bucket_index

    q, k = _qk(n=96, seed=7)
    w = _bias_weights() if bias else _weights()
    qf, kf = pooled_features(q, k, BLK, BLK)
    b = w.bias[:, None][..., bias_bucket_index(96, 96, BLK, BLK)] if bias else None
    s = gate_scores(qf[None], kf[None], w.wq[:, None], w.wk[:, None], b)  # [L, B, H, Mb, Nb]
    region = causal_region(96, 96, BLK, BLK, True, q.device)
    for pos, layer in enumerate(w.layers):
        pred = GatePredictor(GateConfig(topk=0.5), weights=w, backend="torch")
        pred.predict(q, k, layer=layer)
        p = torch.softmax(s[pos].masked_fill(~region, float("-inf")), -1)
        assert torch.allclose(p, pred.last_scores, atol=GATE_SCORES_ATOL)
    if bias:
        with pytest.raises(ValueError, match="another number of query heads"):
            pred.predict(torch.randn(1, 2, 64, D), torch.randn(1, 2, 64, D), layer=0)


# --------------------------------------------------------------------------- position bias (version-2 files)
def test_bias_buckets_are_sink_then_block_distance():
    from sparseattn.gate.model import BIAS_BUCKETS, bias_bucket_index, distance_buckets

    d = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 11, 12, 16, 2047, 2048, 10 ** 6])
    assert distance_buckets(d).tolist() == [0, 1, 2, 3, 4, 4, 5, 5, 6, 6, 7, 8, 21, 22, 22]
    assert int(distance_buckets(torch.tensor([10 ** 9]))) == BIAS_BUCKETS - 2
    idx = bias_bucket_index(5 * BLK, 5 * BLK, BLK, BLK)
    assert idx[:, 0].tolist() == [0] * 5  # key block 0: the sink bucket
    assert idx[4, 1:].tolist() == [4, 3, 2, 1] and idx[2, 2].item() == 1  # 1 + distance
    # queries bottom-right aligned with longer keys: 2 query blocks over 5 key blocks sit at key blocks 3 and 4
    idx2 = bias_bucket_index(2 * BLK, 5 * BLK, BLK, BLK)
    assert idx2[0, 1:].tolist() == [3, 2, 1, 2] and idx2[1, 1:].tolist() == [4, 3, 2, 1]


def test_bias_steers_the_selection():
    """With zero projections the score is the bias alone: a large bias on one distance selects that block."""
    w = GateWeights.init([0], HKV, D, 8, block_m=BLK, block_n=BLK, heads=H)
    w.wq.zero_()
    w.wk.zero_()
    w.bias[0, :, 1 + 2] = 10.0  # distance 2
    q, k = _qk(n=8 * BLK, seed=1)
    lay = GatePredictor(GateConfig(topk=0.01, keep_sink=False, keep_local=0), weights=w, backend="torch").predict(
        q, k, layer=0)
    mask = lay.to_dense_mask()[0]
    for m in range(3, 8):
        assert mask[:, m].nonzero()[:, 1].tolist() == [m - 2] * H


def test_bias_file_round_trip_and_errors(tmp_path):
    w = _bias_weights()
    p = save_gate(tmp_path / "b.safetensors", w)
    got = load_gate(p)
    assert got.meta["version"] == 2 and got.meta["num_attention_heads"] == H and torch.equal(got.bias, w.bias)
    v1 = load_gate(save_gate(tmp_path / "a.safetensors", _weights()))
    assert v1.meta["version"] == 1 and v1.bias is None
    meta = dict(got.meta)
    t = {"wq": got.wq, "wk": got.wk, "bias": got.bias.clone()}
    cases = [
        ({"wq": got.wq, "wk": got.wk}, meta, "is missing tensor bias"),
        (t, dict(meta, version=1), "holds unexpected tensors"),
        (t, dict(meta, bias_buckets=7), "bias_buckets"),
        (t, {k: v for k, v in meta.items() if k != "num_attention_heads"}, "num_attention_heads"),
        (dict(t, bias=t["bias"][:, :2].contiguous()), meta, "tensor 'bias' has the wrong shape"),
        (dict(t, bias=t["bias"].clone().fill_(float("nan"))), meta, "holds NaN or infinite weights"),
    ]
    for i, (tensors, m, words) in enumerate(cases):
        bad = tmp_path / f"bad{i}.safetensors"
        _rewrite(bad, tensors, m)
        with pytest.raises(ValueError, match=words):
            load_gate(bad)


def test_fit_keeps_the_best_held_out_step_and_checks_arguments():
    from sparseattn.gate.train import fit_gate, layer_training_data

    def data(seed):
        q, k = _qk(n=128, seed=seed)
        qf, kf, tg = layer_training_data(q, k, block_m=BLK, block_n=BLK)
        return {"layers": [0], "kv_heads": HKV, "head_dim": D, "block_m": BLK, "block_n": BLK, "scale": None,
                "groups": {128: (qf[None], kf[None], tg[None])}}

    tr, va = data(1), data(2)
    w, h = fit_gate(tr, d_gate=8, steps=20, lr=0.05, progress=False, val_data=va, val_every=2, keep_best=True)
    assert w.bias is not None and tuple(w.bias.shape) == (1, H, 24) and h["position_bias"]
    steps, vals = zip(*h["val_loss"])
    assert steps[0] == 0 and steps[-1] == 20 and len(steps) == 11
    assert h["best_step"] == steps[vals.index(min(vals))]
    assert h["val_final_loss"] == pytest.approx(min(vals), rel=1e-5)  # the kept weights are the best step's
    # distance buckets past the training length take the farthest trained bucket's value (not the initial 0)
    from sparseattn.gate.model import bias_bucket_index

    last = int(bias_bucket_index(128, 128, BLK, BLK).max())
    assert h["bias_buckets_trained"] == last + 1 < 24
    assert bool((w.bias[..., last] != 0).all())
    assert torch.equal(w.bias[..., last + 1:], w.bias[..., last:last + 1].expand(-1, -1, 24 - last - 1))
    # fine-tuning a gate that already has values there (trained on longer prompts) keeps them
    import dataclasses

    longer = dataclasses.replace(w, bias=w.bias.clone())
    longer.bias[..., last + 1:] = 0.25
    w3, _ = fit_gate(tr, d_gate=8, steps=2, progress=False, init=longer)
    assert bool((w3.bias[..., last + 1:] == 0.25).all())
    w2, h2 = fit_gate(tr, d_gate=8, steps=3, progress=False, position_bias=False, weight_decay=1.0)
    assert w2.bias is None and not h2["position_bias"] and h2["best_step"] is None
    for kw, words in (({"weight_decay": -1.0}, "weight_decay"), ({"val_every": -1}, "val_every"),
                      ({"keep_best": True}, "keep_best needs held-out data")):
        with pytest.raises(ValueError, match=words):
            fit_gate(tr, d_gate=8, steps=2, progress=False, **kw)


# --------------------------------------------------------------------------- training windows
def test_pick_windows_half_offsets_lie_inside_their_two_windows():
    from sparseattn.eval.texts import pick_windows

    stream = torch.arange(100, 100 + 4 * 6)  # 4 windows of BOS + 6 body tokens
    ids = [torch.cat([torch.tensor([1]), stream[i * 6:(i + 1) * 6]])[None] for i in range(4)]
    names = [[f"d{i}"] for i in range(4)]
    out, nm, labels = pick_windows(ids, names, [0, 1, 3], half_offsets=True)
    assert labels == ["w00", "w01", "w03", "h00"]  # 1 -> 2 and 3 -> 4 are not both chosen
    assert torch.equal(out[3][0], torch.cat([torch.tensor([1]), stream[3:9]])) and nm[3] == ["d0", "d1"]
    assert all(o.shape == (1, 7) for o in out)
    out2, _, lab2 = pick_windows(ids, names, [2, 3], half_offsets=True, bos=False)  # no BOS: offset on the raw rows
    assert lab2 == ["w02", "w03", "h02"] and torch.equal(out2[2][0], torch.cat([ids[2][0, 3:], ids[3][0, :3]]))
    for bad, words in (([4], "must be window indices"), ([], "must be window indices"), ([1, 1], "repeat a window")):
        with pytest.raises(ValueError, match=words):
            pick_windows(ids, names, bad)


@pytest.mark.parametrize("text, want", [("0-3,7", [0, 1, 2, 3, 7]), ("12", [12]), ("5-5,1", [5, 1])])
def test_index_ranges(text, want):
    from sparseattn.cli._args import index_ranges

    assert index_ranges(text) == want


@pytest.mark.parametrize("text", ["3-1", "1,1", "a", "1-", "-2", ""])
def test_index_ranges_rejects(text):
    import argparse

    from sparseattn.cli._args import index_ranges

    with pytest.raises(argparse.ArgumentTypeError):
        index_ranges(text)


def test_cli_train_gate_windows(tiny, tmp_path, capsys):
    from sparseattn.cli.main import main

    out = tmp_path / "win_gate.safetensors"
    base = ["train-gate", "--model", str(tiny[0]), "--text-dir", str(tiny[1]), "--seq-len", "128", "--steps", "3",
            "--d-gate", "8", "--block-m", "16", "--block-n", "16", "--quiet", "--no-plot"]
    rc = main(base + ["--windows", "0-1,4", "--val-windows", "2", "--half-offsets", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    t = load_gate(out).meta["training"]
    assert t["windows"] == ["w00", "w01", "w04", "h00"] and t["val_windows"] == ["w02"]
    assert t["samples"] == 4 and t["val_samples"] == 1
    capsys.readouterr()
    for extra, words in ((["--windows", "0-2", "--samples", "3"], "--samples cannot be combined with --windows"),
                         (["--windows", "0-2", "--val-windows", "2"], "--val-windows overlap the training windows")):
        rc = main(base + extra + ["--out", str(tmp_path / "x.safetensors")])
        assert rc == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, err
