"""The quantized-attention launcher returns its telemetry to the caller (``telemetry={}``) and keeps none in
module globals (kernel runs under ``TRITON_INTERPRET=1`` on the CPU)."""

from __future__ import annotations

import copy

import pytest
import torch

from sparseattn.ops.launch_configs import QuantLaunchConfig

_KEYS = {"config", "n_regs", "n_spills", "shared_bytes", "autotuned", "tune"}


def _dev(monkeypatch) -> str:
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        return "cuda"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return "cpu"


def _mutable_globals(mod) -> dict[str, str]:
    """repr of every module-level dict / list / set (what a telemetry global would be)."""
    return {k: repr(copy.deepcopy(v)) for k, v in vars(mod).items()
            if isinstance(v, (dict, list, set)) and not k.startswith("__")}


def test_no_module_global_telemetry():
    from sparseattn.ops import quant as Q
    from sparseattn.ops import triton_launch as tl

    for name in ("LAST_CONFIG", "TUNE_LOG"):
        assert not hasattr(Q, name)
        assert name not in Q.__all__
    assert not hasattr(tl, "LAST_COMPILED")


def test_quantized_attention_fills_the_callers_telemetry(monkeypatch):
    dev = _dev(monkeypatch)
    from sparseattn.ops import quant as Q

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 128, 64, generator=g).to(torch.bfloat16).to(dev) for _ in range(3))
    snap = _mutable_globals(Q)
    tel: dict = {"stale": 1}
    st = Q.quantized_attention(q, k, v, causal=True, return_lse=True, telemetry=tel)
    assert set(tel) == _KEYS  # cleared, then filled
    assert set(tel["config"]) >= {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"}
    if dev == "cpu":
        assert tel["config"] == {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 1}
        assert tel["autotuned"] is False and tel["tune"] is None
    assert _mutable_globals(Q) == snap  # nothing recorded in the module
    # the same launch again, without telemetry, from the quantized operands with the config dataclass
    qq = Q.quantize_qkv(q, k, v)
    tel2: dict = {}
    cfg = QuantLaunchConfig.from_dict(tel["config"])
    st2 = Q.quantized_attention_from(qq, Q.resolve_layout("t", q, k, None, None, 128, True), causal=True,
                                     out_dtype=q.dtype, config=cfg, telemetry=tel2)
    assert tel2["config"] == tel["config"] and tel2["autotuned"] is False
    assert torch.equal(st.out, st2.out) and torch.equal(st.lse, st2.lse)


def test_telemetry_must_be_a_dict(monkeypatch):
    dev = _dev(monkeypatch)
    from sparseattn.ops import quant as Q

    q = torch.randn(1, 1, 64, 64, dtype=torch.bfloat16, device=dev)
    with pytest.raises(ValueError, match=r"quantized_attention: telemetry must be a dict or None; expected a dict, "
                                         r"got list"):
        Q.quantized_attention(q, q, q, telemetry=[])


def test_autotune_returns_its_record_instead_of_logging(monkeypatch):
    """The autotune step returns the candidates' times (first call of a key) to the launcher; no global log."""
    pytest.importorskip("triton")
    import triton.testing

    from sparseattn.layout.patterns import dense_layout
    from sparseattn.ops import quant as Q

    times = iter([3.0, 1.0, 2.0, 5.0, 4.0, 6.0])
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: (fn(), next(times))[1])
    launched: list[dict] = []
    lay = dense_layout(256, 256, block_m=128, block_n=128)
    key = ("test_quant_telemetry", 128, 128, True, "int8", "per_warp", 8, torch.bfloat16, "NVIDIA H200")
    cache = Q._tuned_cache()
    try:
        cfg, rec = Q._autotune(key, 128, lay, launched.append)
        cands = [c for c in Q._TUNE_CANDIDATES[128] if 128 % c[0] == 0 and 128 % c[1] == 0]
        assert len(launched) == len(cands) == len(rec["times_ms"])
        assert cfg == launched[1] == rec["chosen"] and rec["errors"] == []  # the fastest (1.0 ms)
        again, rec2 = Q._autotune(key, 128, lay, launched.append)
        assert again == cfg and rec2 is None and len(launched) == len(cands)  # remembered: not re-timed
    finally:
        cache.pop(key, None)


def test_autotune_times_the_tma_candidates_only_where_usable(monkeypatch):
    """With ``tma`` the candidates add the TMA launches (USE_TMA, each with its PREFETCH choice); a TMA winner is kept."""
    pytest.importorskip("triton")
    import triton.testing

    from sparseattn.layout.patterns import dense_layout
    from sparseattn.ops import quant as Q

    plain = [c for c in Q._TUNE_CANDIDATES[128] if 128 % c[0] == 0 and 128 % c[1] == 0]
    tma = [c for c in Q._TMA_CANDIDATES[128] if 128 % c[0] == 0 and 128 % c[1] == 0]
    times = iter([5.0] * len(plain) + [4.0, 1.0] + [6.0] * (len(tma) - 2))
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: (fn(), next(times))[1])
    launched: list[dict] = []
    lay = dense_layout(256, 256, block_m=128, block_n=128)
    key = ("test_quant_telemetry_tma", 128, 128, True, "int8", "per_warp", 8, torch.bfloat16, "NVIDIA H200")
    cache = Q._tuned_cache()
    try:
        cfg, rec = Q._autotune(key, 128, lay, launched.append, tma=True)
        assert len(launched) == len(plain) + len(tma) == len(rec["times_ms"])
        assert not any("USE_TMA" in c for c in launched[:len(plain)])
        assert all(c["USE_TMA"] is True and c["PREFETCH"] is t[5] for c, t in zip(launched[len(plain):], tma))
        assert cfg == launched[len(plain) + 1] and cfg["USE_TMA"] is True
    finally:
        cache.pop(key, None)


def test_round_robin_times_every_runner_each_round_and_stops_early(monkeypatch):
    """benchmarks' shared round-robin: one bench_ms per runner per round, in order; ``stop`` ends it before a round."""
    from sparseattn.testing import timing

    calls: list[str] = []
    monkeypatch.setattr(timing, "bench_ms", lambda fn: float(len(calls.append(fn()) or calls)))
    runners = {"a": lambda: "a", "b": lambda: "b"}
    rounds = timing.round_robin_ms(runners, 3)
    assert calls == ["a", "b"] * 3 and rounds == {"a": [1.0, 3.0, 5.0], "b": [2.0, 4.0, 6.0]}
    calls.clear()
    rounds = timing.round_robin_ms(runners, 5, stop=lambda r: len(r["a"]) >= 2)
    assert calls == ["a", "b"] * 2 and len(rounds["b"]) == 2
