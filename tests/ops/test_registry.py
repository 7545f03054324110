"""The operator registry: listings, refusals equal to the launchers' own, tuned-config JSON, errors."""

from __future__ import annotations

import json

import pytest
import torch

from sparseattn.layout.patterns import dense_layout
from sparseattn.ops import registry as reg
from sparseattn.ops.attention import BACKENDS, backend_refusals, select_backend
from sparseattn.ops.launch_configs import BlockSparseFwdConfig, DecodeLaunchConfig


def test_builtin_operators_are_listed():
    names = {op.name for op in reg.operators()}
    assert {"triton", "reference", "masked_sdpa", "decode_triton", "decode_reference", "quant_triton"} <= names
    assert [op.name for op in reg.operators("prefill", entry_point="attention")][:2] == ["triton", "reference"]
    assert [op.name for op in reg.operators("decode")][:2] == ["decode_triton", "decode_reference"]
    assert list(BACKENDS) == [op.name for op in reg.operators("prefill", entry_point="attention")]
    tri = reg.get_operator("triton")
    assert tri.config_type is BlockSparseFwdConfig and tri.custom_op == "sparseattn::block_sparse_attention_triton"
    assert reg.get_operator("decode_triton").config_type is DecodeLaunchConfig
    assert json.loads(json.dumps(tri.describe()))["dtypes"] == ["float16", "bfloat16"]


def _cases():
    lay64 = dense_layout(128, 128, block_m=64, block_n=64)
    lay32 = dense_layout(128, 128, block_m=32, block_n=32)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for d in (64, 80):
            for lay in (None, lay64, lay32):
                q = torch.randn(1, 2, 128, d, dtype=dtype)
                yield q, lay


@pytest.mark.parametrize("interp", ["0", "1"])
def test_refusals_from_the_registry_equal_the_launchers(monkeypatch, interp):
    from sparseattn.ops import triton_launch
    from sparseattn.ops.decode import decode_refusal
    from sparseattn.ops.quant import quant_refusal

    monkeypatch.setenv("TRITON_INTERPRET", interp)
    for q, lay in _cases():
        kw = dict(k=q, v=q, layout=lay, causal=True, pv_threshold=None, sliding_window=None)
        got = backend_refusals(q, **kw)
        assert got == {"triton": triton_launch.refusal(q, **kw), "reference": None}
        assert reg.operator_refusals([reg.get_operator("triton")], q, **kw)["triton"] == got["triton"]
        assert reg.get_operator("decode_triton").refusal_fn()(q) == decode_refusal(q)
        assert reg.get_operator("quant_triton").refusal_fn()(q, layout=lay) == quant_refusal(q, layout=lay)
        assert reg.get_operator("masked_sdpa").refusal_fn()(q, causal=True, pv_threshold=None) is None
        assert "pv_threshold" in reg.get_operator("masked_sdpa").refusal_fn()(q, causal=True, pv_threshold=0.1)
        assert select_backend(q, q, q, layout=lay, causal=True) == "reference"  # CPU: the reference, as before
        assert reg.get_operator("triton").not_supported_reasons(q, **kw) == ([] if got["triton"] is None
                                                                              else [got["triton"]])


def test_integration_route_lists_the_registry():
    from sparseattn.integrations.transformers_patch import _choose_route, _integration_backends

    assert _integration_backends() == ("auto", "masked_sdpa", "reference", "triton", "attention")
    q = torch.randn(1, 2, 128, 64)
    lay = dense_layout(128, 128, block_m=64, block_n=64, causal=True, heads=2)
    assert _choose_route("auto", q, q, q, lay, None, None) == "masked_sdpa"
    assert _choose_route("auto", q, q, q, lay, 0.1, None) == "reference"
    assert _choose_route("masked_sdpa", q, q, q, lay, None, None) == "masked_sdpa"
    assert _choose_route("reference", q, q, q, lay, None, None) == "reference"


def test_compat_backends_view_registers_and_unregisters():
    def refusal(q, **_):
        return None

    def run(q, k, v, **_):
        raise AssertionError

    BACKENDS["extra_test_op"] = (refusal, run)
    try:
        assert reg.get_operator("extra_test_op").kind == "prefill" and "extra_test_op" in BACKENDS
        assert BACKENDS["extra_test_op"] == (refusal, run)
    finally:
        del BACKENDS["extra_test_op"]
    assert "extra_test_op" not in BACKENDS
    with pytest.raises(ValueError, match=r"get_operator: name is not a registered operator; expected one of"):
        reg.get_operator("extra_test_op")


def test_unknown_names_and_bad_operators():
    with pytest.raises(ValueError, match=r"get_operator: name is not a registered operator; expected one of \[.*'triton'"):
        reg.get_operator("fp9")
    with pytest.raises(ValueError, match=r"unregister_operator: name is not a registered operator"):
        reg.unregister_operator("fp9")
    with pytest.raises(ValueError, match=r"operators: kind is unknown; expected one of"):
        reg.operators("sideways")
    with pytest.raises(ValueError, match=r"Operator: kind is unknown"):
        reg.Operator("x", "sideways", run=len, refusal=len)
    with pytest.raises(ValueError, match=r"register_operator: op.name is already registered"):
        reg.register_operator(reg.Operator("triton", "prefill", run=len, refusal=len))
    with pytest.raises(ValueError, match=r"attention: backend is unknown; expected one of \['auto', 'triton', 'reference'\]"):
        select_backend(torch.randn(1, 1, 8, 8), torch.randn(1, 1, 8, 8), torch.randn(1, 1, 8, 8), backend="fp9")


def test_tuned_configs_json_round_trip(tmp_path):
    tc = reg.TunedConfigs("decode_triton", {
        "NVIDIA H200": (reg.TunedEntry({"head_dim": 128, "block_m": {"max": 16}, "paged": False},
                                       {"BLOCK_N": 128, "num_warps": 4, "num_stages": 2}, "measured"),),
        "NVIDIA H100": ()}, fallback="NVIDIA H200")
    p = reg.save_tuned_configs(tmp_path / "t.json", tc)
    back = reg.load_tuned_configs(p)
    assert back == tc
    assert back.lookup("NVIDIA H200", head_dim=128, block_m=16, paged=False) == {"BLOCK_N": 128, "num_warps": 4,
                                                                                   "num_stages": 2}
    assert back.lookup("NVIDIA H200", head_dim=128, block_m=32, paged=False) is None  # out of range
    assert back.lookup("NVIDIA H200", head_dim=128, block_m=16, paged=True) is None
    assert back.lookup("NVIDIA H100", head_dim=128, block_m=16, paged=False) is None  # measured: nothing tuned
    assert back.lookup("NVIDIA A100", head_dim=128, block_m=16, paged=False) is not None  # unmeasured: the fallback
    assert "pickle" not in p.read_text() and json.loads(p.read_text())["version"] == reg.TUNED_VERSION


def test_shipped_decode_winner_is_data():
    from sparseattn.ops.decode import _default_config

    shipped = reg.tuned_for("decode_triton")
    assert shipped is not None and "NVIDIA H200" in shipped.devices
    assert reg.load_tuned_configs(reg.TUNED_DIR / "decode.json") == shipped
    assert _default_config(128, 16, False, device="NVIDIA H200") == {"BLOCK_N": 128, "num_warps": 4, "num_stages": 2}
    assert _default_config(128, 16, False, device="NVIDIA H100") == _default_config(128, 16, False)  # fallback
    assert reg.tuned_for("reference") is None


@pytest.mark.parametrize("text, match", [
    ("{not json", r"load_tuned_configs: tuned-config file .*t\.json is not valid JSON"),
    ("[]", r"load_tuned_configs: tuned-config file .* holds the wrong JSON type; expected a JSON object, got a JSON array"),
    ('{"version": 1, "operator": "x"}', r"load_tuned_configs: tuned-config file .* is missing 'devices'; expected keys"),
    ('{"version": 2, "operator": "x", "devices": {}}', r"tuned-config file .* version is not supported; expected 1, got 2"),
    ('{"version": 1, "operator": "x", "devices": {"G": {}}}',
     r"devices\['G'\] must be a list of entries; expected \[\{'match'.*got dict"),
    ('{"version": 1, "operator": "x", "devices": {"G": [{"match": {}, "config": {"a": [1]}}]}}',
     r"devices\['G'\]\[0\] config\['a'\] must be a JSON scalar; expected a number, bool or string, got \[1\]"),
    ('{"version": 1, "operator": "x", "devices": {"G": [{"match": {"d": {"lo": 1}}, "config": {"a": 1}}]}}',
     r"match\['d'\] is a bad range; expected \{'min'"),
    ('{"version": 1, "operator": "x", "devices": {}, "fallback": "G"}', r"fallback must name one of the devices"),
])
def test_malformed_tuned_file_errors(tmp_path, text, match):
    p = tmp_path / "t.json"
    p.write_text(text)
    with pytest.raises(ValueError, match=match):
        reg.load_tuned_configs(p)


def test_prefill_tuned_winners_keyed_by_device_name_round_trip(tmp_path):
    from sparseattn.ops import triton_launch as tl

    key = (True, 128, 128, 128, True, 15, torch.bfloat16, "NVIDIA H200", False, True, False, "row_bounds")
    cfg = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2, "USE_TMA": True, "maxnreg": 128}
    try:
        tl._TUNED.put(key, cfg)
        tc = tl.tuned_configs()
        assert tc.operator == "triton" and "NVIDIA H200" in tc.devices
        back = reg.load_tuned_configs(reg.save_tuned_configs(tmp_path / "p.json", tc))
        tl._TUNED.pop(key, None)
        assert tl.use_tuned_configs(back) >= 1
        assert tl._TUNED.get(key) == cfg
        with pytest.raises(ValueError, match=r"use_tuned_configs: configs.operator is another operator's"):
            tl.use_tuned_configs(reg.TunedConfigs("decode_triton", {}))
    finally:
        tl._TUNED.pop(key, None)


def test_quant_tuned_winners_keyed_by_device_name_round_trip(tmp_path):
    from sparseattn.ops import quant as Q

    key = (128, 128, 128, True, "int8", "per_warp", 14, torch.bfloat16, "NVIDIA H200")
    cfg = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2, "USE_TMA": True, "PREFETCH": False,
           "maxnreg": 128}
    cache = Q._tuned_cache()
    try:
        cache.put(key, cfg)
        tc = Q.tuned_configs()
        assert tc.operator == "quant_triton" and "NVIDIA H200" in tc.devices
        back = reg.load_tuned_configs(reg.save_tuned_configs(tmp_path / "q.json", tc))
        cache.pop(key, None)
        assert Q.use_tuned_configs(back) >= 1
        assert cache.get(key) == cfg
        with pytest.raises(ValueError, match=r"quant.use_tuned_configs: configs.operator is another operator's"):
            Q.use_tuned_configs(reg.TunedConfigs("triton", {}))
        bad = reg.TunedConfigs("quant_triton", {"G": (reg.TunedEntry({**tc.devices["NVIDIA H200"][0].match},
                                                                     {"BLOCK_M": 96, "BLOCK_N": 64, "num_warps": 4,
                                                                      "num_stages": 1}),)})
        with pytest.raises(ValueError, match=r"config is not a launch config of the quantized kernel"):
            Q.use_tuned_configs(bad)
        flag = reg.TunedConfigs("quant_triton", {"G": (reg.TunedEntry({**tc.devices["NVIDIA H200"][0].match},
                                                                      {**cfg, "USE_TMA": 1}),)})
        with pytest.raises(ValueError, match=r"config is not a launch config of the quantized kernel"):
            Q.use_tuned_configs(flag)  # a switch must be a bool
    finally:
        cache.pop(key, None)


def test_config_dataclasses():
    c = BlockSparseFwdConfig(128, 64, 8, 2, use_tma=False, maxnreg=128)
    assert BlockSparseFwdConfig.from_dict(c.to_dict()) == c
    assert BlockSparseFwdConfig.from_json(json.loads(json.dumps(c.to_json()))) == c
    with pytest.raises(ValueError, match=r"BlockSparseFwdConfig: maxnreg must be an int in \[24, 255\] or None; "
                                         r"expected 24..255, got 7"):
        BlockSparseFwdConfig(128, 64, 8, 2, maxnreg=7)
    with pytest.raises(ValueError, match=r"BlockSparseFwdConfig: block_m must be a power of two"):
        BlockSparseFwdConfig(96, 64, 8, 2)
    d = DecodeLaunchConfig(128, 4, 2)
    assert DecodeLaunchConfig.from_dict(d.to_dict()) == d


def test_launcher_takes_a_config_dataclass_and_returns_telemetry(monkeypatch):
    pytest.importorskip("triton")
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # the kernel's device (the interpreter on the CPU)
    if dev == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    from sparseattn.ops import triton_launch as tl

    q = torch.randn(1, 2, 128, 64, dtype=torch.float16, device=dev)
    tel: dict = {}
    a = tl.block_sparse_fwd(q, q, q, layout=None, causal=True, config=BlockSparseFwdConfig(128, 128, 4, 1), telemetry=tel)
    b = tl.block_sparse_fwd(q, q, q, layout=None, causal=True,
                            config={"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 4, "num_stages": 1})
    assert torch.equal(a.out, b.out) and torch.equal(a.lse, b.lse)
    assert tel["config"] == {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 4, "num_stages": 1}
    assert tel["autotuned"] is False and set(tel) == {"config", "n_regs", "n_spills", "shared_bytes", "autotuned"}
