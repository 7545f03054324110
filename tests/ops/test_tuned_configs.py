"""The prefill and quantized kernels' shipped tuned configs (ops/tuned/prefill.json, quant.json): data that
round-trips through the registry's JSON functions and gives exactly the configs the launchers chose
when they were hard-coded in Python (b809532)."""

from __future__ import annotations

import json

import pytest

from sparseattn.ops import registry as reg
from sparseattn.ops.launch_configs import BlockSparseFwdConfig, QuantLaunchConfig

# What ops/triton/configs.py:default_config returned on a GPU (no pv skip), per (head_dim, layout block_m,
# layout block_n), before the choice moved to ops/tuned/prefill.json.
_W2 = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2, "maxnreg": 128}
PREFILL_BEFORE = {
    (64, 128, 128): _W2, (64, 128, 64): _W2,
    (64, 64, 128): {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3},
    (64, 64, 64): {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
    (128, 128, 128): _W2, (128, 128, 64): _W2,
    (128, 64, 128): {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
    (128, 64, 64): {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
    (256, 128, 128): {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2},
    (256, 128, 64): {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2},
    (256, 64, 128): {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
    (256, 64, 64): {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
}


def _quant_before(head_dim: int, layout_bm: int) -> dict[str, int]:
    """ops/quant.py:default_quant_config on a GPU before the choice moved to ops/tuned/quant.json."""
    if head_dim == 256:
        return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
    bm = 128 if layout_bm % 128 == 0 else 64
    return {"BLOCK_M": bm, "BLOCK_N": 64, "num_warps": 8 if bm == 128 else 4, "num_stages": 2}


# None: the file's fallback device; a listed device; an unlisted one (gets the fallback's entries)
DEVICES = (None, "NVIDIA H200", "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB")


@pytest.mark.parametrize("operator, filename, config_type", [
    ("triton", "prefill.json", BlockSparseFwdConfig),
    ("quant_triton", "quant.json", QuantLaunchConfig),
    ("decode_triton", "decode.json", None),
])
def test_shipped_file_round_trips_and_is_the_operators(tmp_path, operator, filename, config_type):
    op = reg.get_operator(operator)
    assert op.tuned == filename
    if config_type is not None:
        assert op.config_type is config_type
    shipped = reg.tuned_for(operator)
    assert shipped is not None and shipped.operator == operator
    assert (reg.TUNED_DIR / filename).is_file()
    assert reg.load_tuned_configs(reg.TUNED_DIR / filename) == shipped
    back = reg.load_tuned_configs(reg.save_tuned_configs(tmp_path / filename, shipped))
    assert back == shipped and back.to_json() == json.loads(json.dumps(shipped.to_json()))
    assert shipped.fallback in shipped.devices
    if config_type is not None:  # every shipped config is a valid launch of the operator's kernel
        for entries in shipped.devices.values():
            for e in entries:
                assert config_type.from_dict(dict(e.config)).to_dict() == e.config


def test_package_data_ships_the_tuned_json():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert '"ops/tuned/*.json"' in text


@pytest.mark.parametrize("device", DEVICES)
def test_prefill_fixed_config_is_what_was_hard_coded(device):
    from sparseattn.ops.triton import configs

    for (d, bm, bn), want in PREFILL_BEFORE.items():
        assert configs.default_config(d, bm, bn, interpret=False, pv_skip=False, device=device) == want
    # the rules that are not tuned data stay as they were
    assert configs.default_config(128, 64, 128, interpret=True, pv_skip=False, device=device) == {
        "BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 1}
    assert configs.default_config(256, 128, 128, interpret=False, pv_skip=True, device=device) == {
        "BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 1}


@pytest.mark.parametrize("device", DEVICES)
def test_quant_fixed_config_is_what_was_hard_coded(device):
    from sparseattn.ops import quant as Q

    for d in (64, 128, 256):
        for bm in (64, 128):
            for bn in (64, 128):
                assert Q.default_quant_config(d, bm, bn, interpret=False, device=device) == _quant_before(d, bm)
    assert Q.default_quant_config(128, 64, 128, interpret=True) == {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4,
                                                                    "num_stages": 1}


def test_tuned_config_lookup_falls_back_per_entry():
    """A device listed with other entries still gets the fallback device's fixed config."""
    cfg = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
    assert reg.tuned_config("triton", "NVIDIA H200", head_dim=128, layout_block_m=64, layout_block_n=64) == cfg
    assert reg.tuned_config("triton", "some GPU", head_dim=128, layout_block_m=64, layout_block_n=64) == cfg
    assert reg.tuned_config("triton", None, head_dim=96, layout_block_m=64, layout_block_n=64) is None
    assert reg.tuned_config("reference", None, head_dim=128) is None  # ships no file


def test_shipped_fixed_entries_seed_no_autotune_winners():
    """The fixed-config entries are not launch keys: seeding a device from the shipped files adds nothing."""
    from sparseattn.ops import quant as Q
    from sparseattn.ops import triton_launch as tl

    before_p = len(list(tl._TUNED.keys()))
    tl._seed_shipped.__wrapped__("NVIDIA H200")
    assert len(list(tl._TUNED.keys())) == before_p
    cache = Q._tuned_cache()
    before_q = len(list(cache.keys()))
    Q._seed_shipped.__wrapped__("NVIDIA H200")
    assert len(list(cache.keys())) == before_q
    assert reg.shipped_launch_winners("triton", "NVIDIA H200", ["tma", "head_dim", "causal"]) is None
    assert reg.shipped_launch_winners("quant_triton", "NVIDIA H200", ["head_dim", "quant"]) is None
    fixed = reg.shipped_launch_winners("triton", "NVIDIA H200", ["head_dim", "layout_block_m"])
    assert fixed is not None and len(fixed.devices["NVIDIA H200"]) == 12


def test_quant_launch_config_dataclass():
    c = QuantLaunchConfig(128, 64, 8, 2, maxnreg=128)
    assert c.to_dict() == {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2, "maxnreg": 128}
    assert QuantLaunchConfig.from_dict(c.to_dict()) == c
    assert QuantLaunchConfig.from_json(json.loads(json.dumps(c.to_json()))) == c
    with pytest.raises(ValueError, match=r"QuantLaunchConfig: block_n must be a power of two; expected a power of two "
                                         r">= 16, got 48"):
        QuantLaunchConfig(128, 48, 8, 2)
    with pytest.raises(ValueError, match=r"QuantLaunchConfig.from_dict: d must name the launch parameters"):
        QuantLaunchConfig.from_dict({"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2, "VEC_COUNT": True})
    t = QuantLaunchConfig.from_dict({"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2, "USE_TMA": True,
                                     "PREFETCH": False})
    assert t.use_tma is True and t.prefetch is False and t.to_dict()["PREFETCH"] is False
    with pytest.raises(ValueError, match=r"QuantLaunchConfig: use_tma must be a bool or None; expected True, False or "
                                         r"None, got 1"):
        QuantLaunchConfig(128, 64, 8, 2, use_tma=1)
    with pytest.raises(ValueError, match=r"QuantLaunchConfig.from_json: version is not supported; expected 1, got 9"):
        QuantLaunchConfig.from_json({"version": 9})
