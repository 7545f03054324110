"""``sparseattn state-check``: standard vs segmented vs SDPA (CPU: reference loop + interpreted kernel)."""

from __future__ import annotations

import json

import pytest

from sparseattn.cli.main import main
from sparseattn.eval.state_check import format_markdown, format_text, run_state_check


def _kernel_runs() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    from sparseattn.ops.triton_launch import interpret_mode

    return interpret_mode()  # the report below runs on the CPU: the kernel only under the interpreter


def test_report_passes_and_is_complete():
    rep = run_state_check(dtypes=("float32", "float16", "bfloat16"), seq_q=64, seq_kv=384, heads=2, kv_heads=1,
                          segments=(2, 3), table_rows=128)
    assert rep["pass"] is True
    assert [(r["dtype"], r["segments"]) for r in rep["results"]] == [
        ("float32", 2), ("float32", 3), ("float16", 2), ("float16", 3), ("bfloat16", 2), ("bfloat16", 3)]
    for r in rep["results"]:
        assert set(r["pairs"]) == {"standard_vs_sdpa", "segmented_vs_standard", "segmented_vs_sdpa"}
        assert r["pairs"]["segmented_vs_standard"]["max"] == 0.0  # bitwise at block-aligned cuts
        assert len(r["table"]) == 128 and len(r["state"]) == r["segments"]
        assert all(c % 128 == 0 for c in r["cuts"][:-1])
        assert r["state"][-1]["empty_rows"] == 2  # the fully masked row, in each of the 2 heads
        if r["dtype"] != "float32" and _kernel_runs():
            assert r["engine"].startswith("triton kernel")
    text = format_text(rep)
    assert "segmented_vs_standard" in text and "overall: PASS" in text and "M [" in text
    md = format_markdown(rep)
    assert md.startswith("# state-check") and "| float16 | 2 | segmented_vs_standard |" in md
    json.dumps(rep)  # serialisable


def test_cli_writes_reports(tmp_path, capsys):
    js, mdp = tmp_path / "r.json", tmp_path / "r.md"
    rc = main(["state-check", "--dtypes", "float32", "--segments", "2", "4", "--seq-q", "32", "--seq-kv", "512",
               "--head-dim", "64", "--heads", "2", "--kv-heads", "1", "--no-table", "--json", str(js),
               "--markdown", str(mdp)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "overall: PASS" in out
    rep = json.loads(js.read_text())
    assert rep["pass"] and len(rep["results"]) == 2
    assert "first 128 elements" in mdp.read_text()


@pytest.mark.parametrize("argv,msg", [
    (["state-check", "--segments", "5"], "must be 2, 3 or 4"),
    (["state-check", "--heads", "4", "--kv-heads", "3", "--dtypes", "float32"], "kv_heads must divide heads"),
    (["state-check", "--seq-kv", "128", "--segments", "2", "--dtypes", "float32"], "needs at least one key block"),
])
def test_cli_bad_input(argv, msg, capsys):
    assert main(argv) == 2
    assert msg in capsys.readouterr().err
