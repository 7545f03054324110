"""The measurement helpers of the twenty-ninth and thirtieth sessions run here: ``benchmarks/xu_probe.py`` (its modes
agree bit for bit; on the CPU under the interpreter, where its timing is meaningless), ``benchmarks/ncu_summary.py``'s
pipe table on a small raw page shaped like Nsight Compute's CSV, and ``benchmarks/quant_profile.py`` (a tiny run on a
GPU, its refusal without one)."""

from __future__ import annotations

import importlib.util
import os

import torch

_BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(_BENCH, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_xu_probe_modes_agree_bit_for_bit(monkeypatch):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    mod = _load("xu_probe")
    res = mod.run(n=256, iters=3, block=128, warps=4, repeats=1, device=dev)
    assert res["same_bits"] == {"cvt_vs_add": True, "exp_cvt_vs_exp_add": True}
    assert set(res["ms"]) == set(mod.MODES)


def test_xu_probe_refuses_a_partial_block(capsys):
    mod = _load("xu_probe")
    assert mod.main(["--n", "100", "--block", "64"]) == 2
    assert "xu_probe: --n must be a multiple of --block; expected a multiple of 64, got 100" in capsys.readouterr().err


def test_ncu_summary_pipe_table(tmp_path):
    mod = _load("ncu_summary")
    raw = tmp_path / "raw.csv"
    raw.write_text('==PROF== noise\n'
                   '"ID","gpu__time_duration.sum","sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active",'
                   '"sm__inst_executed_pipe_alu.avg.pct_of_peak_sustained_active","other"\n'
                   '"","usecond","%","%",""\n'
                   '"0","1,161.95","28.81","27.36","x"\n')
    rows = mod.pipe_utilisation(str(raw))
    assert rows == [("duration_us", 1161.95), ("xu", 28.81), ("alu", 27.36)]


def test_quant_profile_runs_or_names_why_not(tmp_path, capsys):
    """``benchmarks/quant_profile.py`` (thirtieth session): on a GPU a tiny run writes every row with its eager and
    graphed times; without one it refuses with exit status 2 and says why."""
    mod = _load("quant_profile")
    argv = ["--seqlens", "256", "--heads", "2", "--kv-heads", "1", "--calls", "2", "--out", str(tmp_path)]
    if not torch.cuda.is_available():
        assert mod.main(argv) == 2
        assert "quant_profile: no CUDA device" in capsys.readouterr().err
        return
    assert mod.main(argv) == 0
    import json

    rows = json.load(open(tmp_path / "quant_profile.json"))["rows"]
    assert len(rows) == 2 * 3  # (quantize_qkv + the call at two densities) x two option sets
    assert all(r["eager_ms"] > 0 and r["host_us"] > 0 and ("graph_ms" in r or "graph_error" in r) for r in rows)
