"""The decode launcher's split count from a launch config's ``CTAS_PER_SM`` (issue 14).

A config with ``CTAS_PER_SM = r`` splits the keys so that ``floor(r * SMs / programs)`` splits fill the GPU with
``r`` programs per SM where there are fewer programs than SMs (:func:`decode_num_splits_filled`); with more, and
without it, the wave heuristic (:func:`decode_num_splits`) stays. The launch must be the explicit ``num_splits``
launch of that count, bit for bit, and pass the reference. Under Triton's CPU interpreter without CUDA (the launcher
then assumes 132 SMs).
"""

from __future__ import annotations

import pytest
import torch

from sparseattn.ops.decode import (
    MAX_SPLITS,
    MIN_KEYS_PER_SPLIT,
    _default_config,
    decode_attention,
    decode_num_splits,
    decode_num_splits_filled,
    decode_reference,
)
from sparseattn.ops.launch_configs import DecodeLaunchConfig
from sparseattn.testing.harness import kernel_unavailable, node_generator
from sparseattn.testing.tolerances import check_ratio

ON_GPU = torch.cuda.is_available()
DEV = "cuda" if ON_GPU else "cpu"
needs_kernel = pytest.mark.skipif(kernel_unavailable() is not None, reason=str(kernel_unavailable()))
H100 = "NVIDIA H100 80GB HBM3"


def test_filled_split_count():
    # batch 1 / 2 / 4 / 8 x 8 KV heads on 132 SMs: one program per SM, two (the H100's int8 entry)
    assert [decode_num_splits_filled(8 * b, 131072, 132, 1) for b in (1, 2, 4, 8)] == [16, 8, 4, 2]
    assert [decode_num_splits_filled(8 * b, 131072, 132, 2) for b in (1, 2, 4, 8)] == [33, 16, 8, 4]
    assert decode_num_splits_filled(16 * 8, 131072, 132, 1) == 1  # batch 16: one program per SM already
    assert decode_num_splits_filled(16 * 8, 131072, 132, 2) == 2
    for ctas in (132, 256, 528):  # at least one program per SM: the wave heuristic
        assert decode_num_splits_filled(ctas, 131072, 132, 2) == decode_num_splits(ctas, 131072, 132)
    assert decode_num_splits_filled(1, 131072, 132, 16) == MAX_SPLITS  # capped
    assert decode_num_splits_filled(8, 3 * MIN_KEYS_PER_SPLIT - 1, 132, 1) == 3  # never below the key floor
    assert decode_num_splits_filled(8, 10, 132, 4) == 1
    # the wave heuristic is unchanged (it is what configs without CTAS_PER_SM get)
    assert decode_num_splits(8, 131072, 132) == 57


@needs_kernel
@pytest.mark.parametrize("per_sm", [1, 3])
def test_ctas_per_sm_launch_is_the_explicit_split_launch(per_sm, request):
    g = node_generator(request)
    B, H, Hkv, N, D = 16, 4, 2, 1100, 64  # 32 programs before splitting; at most 5 splits (1100 keys)
    q = torch.randn(B, H, 1, D, generator=g).to(torch.float16).to(DEV)
    k = torch.randn(B, Hkv, N, D, generator=g).to(torch.float16).to(DEV)
    v = torch.randn(B, Hkv, N, D, generator=g).to(torch.float16).to(DEV)
    sl = torch.randint(1, N + 1, (B,), generator=g).to(torch.int32).to(DEV)
    sms = torch.cuda.get_device_properties(0).multi_processor_count if ON_GPU else 132
    want = decode_num_splits_filled(B * Hkv, N, sms, per_sm)
    if not ON_GPU:
        assert want == (4 if per_sm == 1 else 5) and decode_num_splits(B * Hkv, N, sms) == 5
    base = {"BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
    st = decode_attention(q, k, v, seqlens=sl, backend="triton", return_lse=True, config=dict(base, CTAS_PER_SM=per_sm))
    ex = decode_attention(q, k, v, seqlens=sl, backend="triton", return_lse=True, config=base, num_splits=want)
    assert torch.equal(st.out, ex.out) and torch.equal(st.lse, ex.lse)
    hi = decode_reference(q, k, v, seqlens=sl)
    lo = decode_reference(q, k, v, seqlens=sl, upcast=False)
    check_ratio(st.out, hi.out, lo.out, "out")


@needs_kernel
@pytest.mark.parametrize("bad", [0, 17, True, 2.0, "2"])
def test_bad_ctas_per_sm(bad):
    q = torch.zeros(1, 2, 1, 64, device=DEV)
    k = torch.zeros(1, 2, 40, 64, device=DEV)
    with pytest.raises(ValueError, match="decode_attention: config has a bad CTAS_PER_SM"):
        decode_attention(q, k, k, backend="triton", config={"BLOCK_N": 32, "num_warps": 4, "num_stages": 1,
                                                            "CTAS_PER_SM": bad})
    with pytest.raises(ValueError, match="DecodeLaunchConfig: ctas_per_sm must be None or an int in 1..16"):
        DecodeLaunchConfig(128, 4, 2, ctas_per_sm=bad)


def test_config_round_trip():
    c = DecodeLaunchConfig(128, 4, 3, qk="fp16", full_tiles=True, ctas_per_sm=2)
    assert c.to_dict() == {"BLOCK_N": 128, "num_warps": 4, "num_stages": 3, "QK": "fp16", "FULL_TILES": True,
                           "CTAS_PER_SM": 2}
    assert DecodeLaunchConfig.from_dict(c.to_dict()) == c
    assert "CTAS_PER_SM" not in DecodeLaunchConfig(128, 4, 3).to_dict()


def test_shipped_entries_take_ctas_per_sm_only_where_measured():
    """The H100's dense int8 entry (2); not its bf16 (no clear gain) or paged entries. The H200: only its small-batch
    entries (at most 16 programs before splitting, i.e. batch 1-2 with 8 KV heads; measured there), both caches."""
    assert _default_config(128, 16, False, device=H100, kv="int8").get("CTAS_PER_SM") == 2
    assert "CTAS_PER_SM" not in _default_config(128, 16, False, device=H100)
    assert "CTAS_PER_SM" not in _default_config(128, 16, False, paged=True, device=H100)
    for kv in ("none", "int8"):
        assert "CTAS_PER_SM" not in _default_config(128, 16, False, device="NVIDIA H200", kv=kv)
        for programs in (8, 16):
            assert _default_config(128, 16, False, device="NVIDIA H200", kv=kv, programs=programs)["CTAS_PER_SM"] == 2
        assert "CTAS_PER_SM" not in _default_config(128, 16, False, device="NVIDIA H200", kv=kv, programs=32)
        assert "CTAS_PER_SM" not in _default_config(128, 16, False, paged=True, device="NVIDIA H200", kv=kv,
                                                    programs=8)
    small = _default_config(128, 16, False, device="NVIDIA H200", kv="int8", programs=8)
    assert small["FULL_TILES"] is True and small["QK"] == "fp16"


@needs_kernel
def test_the_launcher_passes_the_program_count_to_the_tuned_lookup(monkeypatch):
    """The default launch looks the config up with its programs before splitting (batch x KV heads x row tiles)."""
    import sparseattn.ops.decode as dec

    seen = []
    real = dec._default_config

    def spy(*a, **kw):
        seen.append(kw.get("programs"))
        return real(*a, **kw)

    monkeypatch.setattr(dec, "_default_config", spy)
    q = torch.randn(3, 8, 1, 64, device=DEV)
    k = torch.randn(3, 2, 40, 64, device=DEV)
    decode_attention(q, k, k, backend="triton")
    assert seen == [3 * 2 * 1]


def _run_script(name: str, *args: str):
    """``benchmarks/<name> --cpu-smoke *args`` under the interpreter (a subprocess; the repository's ``src`` first)."""
    import os
    import subprocess
    import sys

    root = os.path.join(os.path.dirname(__file__), "..", "..")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.path.join(root, "src"))
    return subprocess.run([sys.executable, os.path.join(root, "benchmarks", name), "--cpu-smoke", *args], env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_sweep_script_runs_on_the_interpreter(tmp_path):
    """benchmarks/decode_splits_sweep.py --cpu-smoke: every row (default, wave heuristic, grid) runs and passes parity."""
    if ON_GPU:
        pytest.skip("the GPU runs the real sweep")
    import json

    res = _run_script("decode_splits_sweep.py", "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr[-2000:]
    rows = json.loads((tmp_path / "decode_splits_sweep.json").read_text())["rows"]
    assert {r["kv"] for r in rows} == {"bf16", "int8"}
    for r in rows:
        assert r["parity"] == "ok" and {"default", "wave-heuristic"} <= set(r["ms"]) and len(r["ms"]) >= 4, r


@pytest.mark.parametrize("script", ["decode_b1_profile.py", "spec_decode_attn.py"])
def test_the_parity_scripts_run_on_the_interpreter(script):
    """benchmarks/<script> --cpu-smoke: decode_b1_profile.py's dense and sparse calls on two layers' caches and
    spec_decode_attn.py's exact (1 and g + 1 queries) and sparse calls pass parity."""
    if ON_GPU:
        pytest.skip("the GPU runs the real script")
    res = _run_script(script)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "parity ok" in res.stdout
