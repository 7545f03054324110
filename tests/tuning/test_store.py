"""The tuned-parameter file (sparseattn.tuning.store): exact round trip and every bad-file case, and
patch_model(tuned=...)."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("safetensors")

from sparseattn.tuning.store import META_KEY, load_tuned, model_fingerprint, save_tuned  # noqa: E402
from sparseattn.tuning.types import TUNED_VERSION, HeadParams, TunedConfig  # noqa: E402
from sparseattn.testing.tolerances import TINY_SPARSE_LOGITS_COS_MIN  # noqa: E402

H = 4
FP = {"num_hidden_layers": 2, "num_attention_heads": H, "num_key_value_heads": 2, "head_dim": 16, "model_type": "llama"}


def _hp(seed: int, dense_head: int | None = 1, pv: float = math.inf) -> HeadParams:
    g = torch.Generator().manual_seed(seed)
    dense = torch.zeros(H, dtype=torch.bool)
    sim = torch.rand(H, generator=g) * 0.9
    cdf = 0.5 + 0.5 * torch.rand(H, generator=g)
    pvt = torch.full((H,), pv)
    if dense_head is not None:
        dense[dense_head] = True
        sim[dense_head] = cdf[dense_head] = pvt[dense_head] = math.nan
    return HeadParams(sim_threshold=sim, cdf_threshold=cdf, pv_threshold=pvt, dense=dense,
                      sparsity=torch.rand(H, generator=g), error=torch.rand(H, generator=g) * 0.05)


def _meta(**changes):
    m = {"version": TUNED_VERSION, "model": "tiny", "fingerprint": dict(FP),
         "predictor": {"block_m": 64, "block_n": 64, "keep_sink": True, "keep_local": 1, "score": "mixed"},
         "rule": "l1", "budgets": {"l1": 0.06, "pv_l1": None, "layer_l1": ""}, "seq_len": 128,
         "samples": ["a", "b"], "dense_layers": [], "seconds": 1.5, "device": "cpu", "created": "2025-01-01"}
    m.update(changes)
    return m


def _cfg(**meta) -> TunedConfig:
    return TunedConfig(layers={0: _hp(0), 1: _hp(1, dense_head=None)}, meta=_meta(**meta))


def _raw(path, tensors, meta):
    """A safetensors file with the given tensors and metadata (a dict is JSON-encoded under META_KEY)."""
    from safetensors.torch import save_file

    md = None if meta is None else {META_KEY: meta if isinstance(meta, str) else json.dumps(meta)}
    save_file(tensors, str(path), metadata=md)
    return path


def _good_tensors(cfg=None):
    cfg = cfg or _cfg()
    out = {}
    for li, hp in cfg.layers.items():
        out.update(hp.tensors(li))
    return out


def _good_meta(**changes):
    return dict(_meta(**changes), tuned_layers=[0, 1])


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all()) \
        if a.dtype.is_floating_point else torch.equal(a, b)


# --------------------------------------------------------------------------- round trip
def test_round_trip_is_exact(tmp_path):
    cfg = _cfg()
    p = save_tuned(tmp_path / "sub" / "t.safetensors", cfg)
    assert p.is_file() and not list(p.parent.glob(".*tmp*"))
    got = load_tuned(p)
    assert got.meta == cfg.meta
    assert sorted(got.layers) == [0, 1]
    for li, hp in cfg.layers.items():
        for f in ("sim_threshold", "cdf_threshold", "pv_threshold", "dense", "sparsity", "error"):
            assert _same(getattr(got.layers[li], f), getattr(hp, f)), (li, f)
    assert got.summary()["layers"] == cfg.summary()["layers"]
    # no pickle anywhere: the file is a plain safetensors file whose header holds the JSON metadata
    from safetensors import safe_open

    with safe_open(str(p), framework="pt") as f:
        assert set(f.metadata()) == {META_KEY}
        assert json.loads(f.metadata()[META_KEY])["tuned_layers"] == [0, 1]


def test_save_fills_version_and_refuses_bad_configs(tmp_path):
    cfg = _cfg()
    del cfg.meta["version"]
    assert load_tuned(save_tuned(tmp_path / "v.safetensors", cfg)).meta["version"] == TUNED_VERSION
    with pytest.raises(ValueError, match=r"save_tuned: cfg metadata is missing key 'rule'"):
        c = _cfg()
        del c.meta["rule"]
        save_tuned(tmp_path / "x.safetensors", c)
    with pytest.raises(ValueError, match="must be a TunedConfig"):
        save_tuned(tmp_path / "x.safetensors", {"layers": {}})
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        save_tuned(tmp_path / "x.safetensors", _cfg(extra=object()))
    assert not (tmp_path / "x.safetensors").exists()


# --------------------------------------------------------------------------- bad files
def test_missing_and_empty_file(tmp_path):
    with pytest.raises(ValueError, match=r"load_tuned: tuned file .*nope\.safetensors does not exist"):
        load_tuned(tmp_path / "nope.safetensors")
    (tmp_path / "e.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"tuned file .*e\.safetensors is empty"):
        load_tuned(tmp_path / "e.safetensors")


@pytest.mark.parametrize("kind", ["text", "truncated", "corrupt_header"])
def test_not_a_safetensors_file(tmp_path, kind):
    good = save_tuned(tmp_path / "good.safetensors", _cfg()).read_bytes()
    p = tmp_path / f"{kind}.safetensors"
    if kind == "text":
        p.write_text("this is not a tensor file\n")
    elif kind == "truncated":
        p.write_bytes(good[: len(good) - 7])
    else:  # a plausible header length followed by garbage instead of JSON
        n = int.from_bytes(good[:8], "little")
        p.write_bytes(good[:8] + b"\x00{garbage" + good[17: 8 + n] + good[8 + n:])
    with pytest.raises(ValueError, match=rf"load_tuned: tuned file .*{kind}\.safetensors is not a readable safetensors file"):
        load_tuned(p)


def test_metadata_missing_or_not_json(tmp_path):
    p = _raw(tmp_path / "m.safetensors", _good_tensors(), None)
    with pytest.raises(ValueError, match=rf"tuned file .*m\.safetensors has no '{META_KEY}' metadata"):
        load_tuned(p)
    p = _raw(tmp_path / "j.safetensors", _good_tensors(), "{not json")
    with pytest.raises(ValueError, match=rf"tuned file .*j\.safetensors metadata '{META_KEY}' is not valid JSON"):
        load_tuned(p)


def test_wrong_or_missing_version(tmp_path):
    meta = _good_meta()
    del meta["version"]
    with pytest.raises(ValueError, match=r"tuned file .*a\.safetensors metadata has no 'version'"):
        load_tuned(_raw(tmp_path / "a.safetensors", _good_tensors(), meta))
    with pytest.raises(ValueError, match=r"metadata key 'version' is not supported by this sparseattn; "
                                         r"expected version 1 .*got 99"):
        load_tuned(_raw(tmp_path / "b.safetensors", _good_tensors(), _good_meta(version=99)))


@pytest.mark.parametrize("key", ["fingerprint", "predictor", "rule", "budgets", "dense_layers"])
def test_missing_metadata_key(tmp_path, key):
    meta = _good_meta()
    del meta[key]
    with pytest.raises(ValueError, match=rf"tuned file .*k\.safetensors metadata is missing key '{key}'"):
        load_tuned(_raw(tmp_path / "k.safetensors", _good_tensors(), meta))


def test_missing_fingerprint_field_and_layer_list(tmp_path):
    meta = _good_meta()
    del meta["fingerprint"]["head_dim"]
    with pytest.raises(ValueError, match=r"metadata 'fingerprint' is missing key 'head_dim'"):
        load_tuned(_raw(tmp_path / "f.safetensors", _good_tensors(), meta))
    meta = _good_meta()
    del meta["tuned_layers"]
    with pytest.raises(ValueError, match=r"metadata key 'tuned_layers' is missing or not a list"):
        load_tuned(_raw(tmp_path / "l.safetensors", _good_tensors(), meta))


def test_layer_with_a_missing_tensor(tmp_path):
    t = _good_tensors()
    del t["1.cdf_threshold"]
    with pytest.raises(ValueError, match=r"tuned file .*t\.safetensors layer 1 is missing tensor 1\.cdf_threshold"):
        load_tuned(_raw(tmp_path / "t.safetensors", t, _good_meta()))
    t = _good_tensors()
    t["5.error"] = torch.zeros(H)
    with pytest.raises(ValueError, match=r"holds tensors of no listed layer.*5\.error"):
        load_tuned(_raw(tmp_path / "x.safetensors", t, _good_meta()))


@pytest.mark.parametrize("bad", ["shape", "dtype", "dense_dtype"])
def test_wrong_shape_or_dtype(tmp_path, bad):
    t = _good_tensors()
    if bad == "shape":
        t["0.sparsity"] = torch.zeros(H + 1)
        name, got = "0.sparsity", r"\[5\] float32"
    elif bad == "dtype":
        t["0.sim_threshold"] = t["0.sim_threshold"].to(torch.float16)
        name, got = "0.sim_threshold", r"\[4\] float16"
    else:
        t["1.dense"] = t["1.dense"].to(torch.uint8)
        name, got = "1.dense", r"\[4\] uint8"
    with pytest.raises(ValueError, match=rf"tensor '{name}' has the wrong shape or dtype; expected \[4\] .*got {got}"):
        load_tuned(_raw(tmp_path / "s.safetensors", t, _good_meta()))


def test_nan_threshold_of_a_sparse_head(tmp_path):
    t = _good_tensors()
    t["1.sim_threshold"][2] = math.nan  # head 2 of layer 1 is not dense
    with pytest.raises(ValueError, match=r"tuned file .*n\.safetensors layer 1 holds invalid parameters "
                                         r"\(HeadParams: sim_threshold is NaN for a head that is not dense"):
        load_tuned(_raw(tmp_path / "n.safetensors", t, _good_meta()))
    t = _good_tensors()
    t["0.sim_threshold"][1] = math.nan  # head 1 of layer 0 is dense: NaN is expected there
    load_tuned(_raw(tmp_path / "ok.safetensors", t, _good_meta()))


def test_heads_or_layers_disagree_with_the_fingerprint(tmp_path):
    meta = _good_meta()
    meta["fingerprint"]["num_attention_heads"] = 8
    with pytest.raises(ValueError, match=r"tensor '0\.sim_threshold' has the wrong shape or dtype; "
                                         r"expected \[8\] float32 \(num_attention_heads 8\)"):
        load_tuned(_raw(tmp_path / "h.safetensors", _good_tensors(), meta))
    meta = _good_meta()
    meta["fingerprint"]["num_hidden_layers"] = 1
    with pytest.raises(ValueError, match=r"layers are outside the fingerprint's num_hidden_layers; "
                                         r"expected indices 0\.\.0, got \[1\]"):
        load_tuned(_raw(tmp_path / "l.safetensors", _good_tensors(), meta))


# --------------------------------------------------------------------------- model checks
@pytest.fixture(scope="module")
def tiny_model():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=H, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=512)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_fingerprint_of_a_model(tiny_model):
    assert model_fingerprint(tiny_model) == FP
    assert model_fingerprint(tiny_model.config) == FP


def test_fingerprint_mismatch_names_the_fields(tmp_path, tiny_model):
    meta = _good_meta()
    meta["fingerprint"].update(num_key_value_heads=4, model_type="qwen2")
    p = _raw(tmp_path / "fp.safetensors", _good_tensors(), meta)
    load_tuned(p)  # fine without a model
    with pytest.raises(ValueError, match=r"load_tuned: tuned file .*fp\.safetensors was tuned for another model "
                                         r"\(fingerprint num_key_value_heads, model_type differ\); "
                                         r"expected num_key_value_heads=4; model_type='qwen2', "
                                         r"got num_key_value_heads=2; model_type='llama'"):
        load_tuned(p, model=tiny_model)


def test_layers_the_model_does_not_have(tmp_path, tiny_model):
    p = _raw(tmp_path / "dl.safetensors", _good_tensors(), _good_meta(dense_layers=[7]))
    with pytest.raises(ValueError, match=r"tuned file .*dl\.safetensors layers name layers the model does not have; "
                                         r"expected indices 0\.\.1, got \[7\]"):
        load_tuned(p, model=tiny_model)


# --------------------------------------------------------------------------- patch_model(tuned=...)
def test_patch_model_with_a_tuned_file(tmp_path, tiny_model):
    from sparseattn.integrations import transformers_patch as tp

    ids = torch.randint(0, 64, (1, 256), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = tiny_model(ids).logits
    p = save_tuned(tmp_path / "t.safetensors", _cfg(dense_layers=[0]))
    cfg0 = load_tuned(p)
    del cfg0.layers[0]  # layer 0 kept dense on purpose (dense_layers)
    p = save_tuned(tmp_path / "t.safetensors", cfg0)
    with tp.patch_model(tiny_model, tuned=p) as h, torch.no_grad():
        out = tiny_model(ids).logits
        rep = h.sparsity_report()
    assert rep["tuned"] == str(p)
    assert rep["layers"]["0"]["mode"] == "dense" and rep["layers"]["1"]["mode"] == "sparse"
    assert rep["layers"]["1"]["backends"] == ["masked_sdpa"]  # pv_threshold inf everywhere: no P·V skip
    assert torch.nn.functional.cosine_similarity(out.flatten(), dense.flatten(), dim=0) > TINY_SPARSE_LOGITS_COS_MIN
    # in memory, with a finite per-head pv_threshold: the handle passes pred.pv_threshold_for(layer) on
    cfg = TunedConfig(layers={1: _hp(3, pv=8.0)}, meta=_meta())
    seen = []
    from sparseattn.integrations import handle as hd  # the handle's hot path looks _pv_for up in its own module

    orig = hd._pv_for

    def spy(pred, layer):
        seen.append((layer, orig(pred, layer)))
        return seen[-1][1]

    hd._pv_for = spy
    try:
        with tp.patch_model(tiny_model, tuned=cfg) as h, torch.no_grad():
            tiny_model(ids)
            rep = h.sparsity_report()
    finally:
        hd._pv_for = orig
    assert rep["tuned"] == "in-memory"
    assert (1, 8.0) in seen and "masked_sdpa" not in rep["layers"]["1"]["backends"]
    assert "tuned" not in tp.patch_model(tiny_model, predictor="mean_sim").sparsity_report()
    tp.unpatch_model(tiny_model)


def test_patch_model_tuned_errors(tmp_path, tiny_model):
    from sparseattn.integrations import transformers_patch as tp

    p = save_tuned(tmp_path / "t.safetensors", _cfg())
    with pytest.raises(ValueError, match=r"patch_model: tuned is mutually exclusive with predictor"):
        tp.patch_model(tiny_model, tuned=p, predictor="mean_sim")
    with pytest.raises(ValueError, match=r"patch_model: tuned is mutually exclusive with pattern"):
        tp.patch_model(tiny_model, tuned=p, pattern="sink_window:window_blocks=1")
    bad = _cfg()
    bad.meta["fingerprint"] = dict(FP, head_dim=32)
    with pytest.raises(ValueError, match=r"tuned \(in-memory TunedConfig\) was tuned for another model "
                                         r"\(fingerprint head_dim differ\)"):
        tp.patch_model(tiny_model, tuned=bad)
    with pytest.raises(ValueError, match=r"load_tuned: tuned file .*missing\.safetensors does not exist"):
        tp.patch_model(tiny_model, tuned=tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match=r"patch_model: tuned must be a tuned file path or a TunedConfig"):
        tp.patch_model(tiny_model, tuned=3)
    assert tp.get_handle(tiny_model) is None
