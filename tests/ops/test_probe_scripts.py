"""The measurement helpers of the twenty-ninth session run here: ``benchmarks/xu_probe.py`` (its modes agree bit
for bit; on the CPU under the interpreter, where its timing is meaningless) and ``benchmarks/ncu_summary.py``'s pipe
table on a small raw page shaped like Nsight Compute's CSV."""

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
