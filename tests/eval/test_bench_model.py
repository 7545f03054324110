"""Whole-model prefill benchmark (sparseattn.eval.bench_model, `sparseattn bench-model`) on a tiny random Llama."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sparseattn.cli.main import main  # noqa: E402
from sparseattn.eval import bench_model as bm  # noqa: E402

N = 256


def _tiny_llama() -> torch.nn.Module:
    return bm.build_llama_stack(2, device="cpu", dtype=torch.float32, max_len=512, vocab_size=96, hidden_size=64,
                                intermediate_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=32)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    rows = bm.parse_rows("pattern:name=sink_window,window_blocks=1", "sliding_window:window_blocks=1")
    res = bm.bench_model(_tiny_llama(), rows, [N], model_name="tiny", random_ids=True, repeats=2, warmup=1,
                         score_last=128, progress=False)
    out = tmp_path_factory.mktemp("bench")
    paths = bm.write_outputs(res, out, plot=False)
    return res, paths


def test_json_rows_rounds_ratio_accuracy(result):
    res, paths = result
    data = json.loads(paths["json"].read_text())
    assert [r["kind"] for r in data["rows"]] == ["all_blocks", "predictor", "pattern"]
    for r in data["rows"]:
        assert r["seq_len"] == N
        assert len(r["dense_rounds_s"]) == len(r["sparse_rounds_s"]) == len(r["ratio_rounds"]) == 2
        assert r["ratio"] == pytest.approx(r["dense_s"] / r["sparse_s"])
        assert r["ratio_paired"] == pytest.approx(sorted(r["ratio_rounds"])[0] / 2 + sorted(r["ratio_rounds"])[1] / 2)
        assert {"logits_cosine", "top1_agreement", "kl_dense_sparse"} <= set(r["vs_dense"])
        assert r["profile"]["count"] > 0 and r["profile"]["count_kind"].startswith("cpu_ops")
        assert "sparseattn::layer_attention" in r["profile"]["ranges"]
        assert r["layer_calls"]["prefill_sparse"] == 2
    floor, *sparse = data["rows"]
    assert floor["vs_dense"]["logits_cosine"] > 1 - 1e-5
    assert floor["vs_dense"]["top1_agreement"] == 1.0
    assert floor["density"] == pytest.approx(1.0)
    assert floor["vs_all_blocks"] is None
    for r in sparse:
        assert 0 < r["density"] < 1
        assert {"logits_cosine", "top1_agreement", "kl_dense_sparse"} <= set(r["vs_all_blocks"])
    assert data["env"]["torch"] and "commit" in data["env"] and "date_utc" in data["env"]
    assert data["lengths"][0]["dense_profile"]["count"] > 0


def test_markdown_one_line_per_row(result):
    res, paths = result
    md = paths["md"].read_text()
    body = [ln for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith("| len")]
    assert len(body) == len(res["rows"]) == 3
    assert len(bm.table(res).splitlines()) == 1 + len(res["rows"])


def test_cli_in_process(tmp_path, capsys):
    model_dir = tmp_path / "tiny"
    _tiny_llama().save_pretrained(model_dir)
    out = tmp_path / "out"
    rc = main(["bench-model", "--model", str(model_dir), "--random-ids", "--lengths", "128", "--repeats", "1",
               "--patterns", "sink_window:window_blocks=1", "--score-last", "64", "--no-profile", "--no-plot",
               "--quiet", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    data = json.loads((out / "bench_model.json").read_text())
    assert [r["label"] for r in data["rows"]] == ["all blocks", "pattern sink_window:window_blocks=1"]
    assert (out / "bench_model.md").is_file()
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("128")


@pytest.mark.parametrize("argv", [
    ["--patterns", "sink_window:no_such_key=1"],
    ["--predictors", "no_such_predictor"],
    ["--text-dir", "/no/such/folder"],
])
def test_user_errors_one_line_exit_2(argv, tmp_path, capsys):
    rc = main(["bench-model", "--model", str(tmp_path / "unused"), *argv, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("sparseattn bench-model: error:")


def test_length_beyond_context_exit_2(tmp_path, capsys):
    model_dir = tmp_path / "tiny"
    _tiny_llama().save_pretrained(model_dir)
    capsys.readouterr()  # save_pretrained's progress bar
    rc = main(["bench-model", "--model", str(model_dir), "--random-ids", "--lengths", "1024", "--quiet",
               "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "max_position_embeddings" in err


def test_profile_counts_kernels_not_range_annotations():
    """A range's GPU user annotation (same name as the range) is not a kernel: it must not double the attention time."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from sparseattn.eval import bench_model as bm

    ev = [SimpleNamespace(name="_block_sparse_fwd_kernel", device_type=DeviceType.CUDA),
          SimpleNamespace(name="sparseattn::layer_attention", device_type=DeviceType.CUDA),
          SimpleNamespace(name="sparseattn::layer_attention", device_type=DeviceType.CPU),
          SimpleNamespace(name="void at::native::elementwise_kernel", device_type=DeviceType.CUDA)]
    assert [e.name for e in bm._device_kernels(ev)] == ["_block_sparse_fwd_kernel", "void at::native::elementwise_kernel"]


def test_short_text_fails_before_timing(tmp_path, capsys):
    """A text too short for the last length is refused before the first length is measured."""
    from sparseattn.testing.bad_inputs import save_tiny_llama

    model_dir = save_tiny_llama(tmp_path / "model", hidden_size=64, intermediate_size=64, heads=4, kv_heads=2,
                                head_dim=16)
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 10)  # ~450 byte tokens
    capsys.readouterr()
    rc = main(["bench-model", "--model", str(model_dir), "--text-file", str(text), "--lengths", "64,500",
               "--repeats", "1", "--no-profile", "--no-plot", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "too few tokens" in err, err
    assert "dense reference logits" not in err  # no length was measured
