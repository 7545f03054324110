"""`sparseattn tune` end to end on a tiny random Llama (2 layers), and --tuned of eval / bench-model."""

from __future__ import annotations

import json

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from sparseattn.cli.main import main  # noqa: E402
from sparseattn.testing.models import write_word_text  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-layer Llama with a byte-level tokenizer, saved with save_pretrained, and a text file."""
    from sparseattn.testing.bad_inputs import save_tiny_llama

    d = tmp_path_factory.mktemp("tiny_tune")
    model_dir = save_tiny_llama(d / "model", hidden_size=64, intermediate_size=64, heads=4, kv_heads=2,
                                head_dim=16)
    text = write_word_text(d / "text.txt", 2000)
    return model_dir, text


@pytest.fixture(scope="module")
def tuned(tiny, tmp_path_factory):
    model_dir, text = tiny
    out = tmp_path_factory.mktemp("tuned") / "t.safetensors"
    rc = main(["tune", "--model", str(model_dir), "--text-file", str(text), "--seq-len", "128", "--samples", "2",
               "--l1", "0.1", "--dense-layers", "0", "--compare", "--compare-samples", "1", "--quiet",
               "--out", str(out)])
    assert rc == 0
    return out


def test_tune_writes_a_loadable_file_and_report(tiny, tuned):
    from sparseattn.models.loader import load
    from sparseattn.tuning.store import load_tuned

    model, _ = load(str(tiny[0]))
    cfg = load_tuned(tuned, model=model)
    assert cfg.meta["dense_layers"] == [0] and 0 not in cfg.layers and 1 in cfg.layers
    assert cfg.meta["rule"] == "l1" and len(cfg.meta["samples"]) == 2
    rep = json.loads(tuned.with_suffix(".json").read_text())
    assert rep["tuned_file"] == str(tuned)
    rows = rep["compare"]["rows"]
    assert set(rows) == {"default", "tuned"}
    for r in rows.values():
        assert {"sparsity", "logits_cosine", "top1_agreement", "kl_dense_sparse"} <= set(r)
    # the held-out sample is not a calibration sample
    assert len(rep["compare"]["samples"]) == 1
    md = tuned.with_suffix(".md").read_text()
    assert "Untuned default vs tuned" in md and "Samples not used for tuning" in md
    png = tuned.with_name("t.heads.png")
    assert png.is_file() or "heatmap skipped" in md


def test_tune_random_ids(tiny, tmp_path, capsys):
    out = tmp_path / "r.safetensors"
    rc = main(["tune", "--model", str(tiny[0]), "--random-ids", "--seq-len", "128", "--samples", "1",
               "--rule", "cosine", "--layer-l1", "1-:0.2", "--no-plot", "--quiet", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert out.is_file() and out.with_suffix(".md").is_file()
    assert capsys.readouterr().out.strip().splitlines()[-2] == f"tuned: {out}"


def test_eval_and_bench_model_accept_tuned(tiny, tuned, tmp_path, capsys):
    model_dir, text = tiny
    rc = main(["eval", "--model", str(model_dir), "--tuned", str(tuned), "--text-file", str(text), "--seq-len", "128",
               "--samples", "1", "--gen-tokens", "0", "--no-self-check", "--timing-repeats", "0", "--no-plots",
               "--quiet", "--out", str(tmp_path / "ev")])
    assert rc in (0, 1), capsys.readouterr().err  # 1 = the verdict on a random model; not an error
    data = json.loads((tmp_path / "ev" / "eval.json").read_text()) if (tmp_path / "ev" / "eval.json").is_file() \
        else json.loads(next((tmp_path / "ev").glob("*.json")).read_text())
    assert data["config"]["tuned"] == str(tuned)
    assert data["config"]["layers"] == 2
    rc = main(["bench-model", "--model", str(model_dir), "--random-ids", "--tuned", str(tuned), "--lengths", "128",
               "--repeats", "1", "--score-last", "64", "--no-profile", "--no-plot", "--quiet",
               "--out", str(tmp_path / "bm")])
    assert rc == 0, capsys.readouterr().err
    rows = json.loads((tmp_path / "bm" / "bench_model.json").read_text())["rows"]
    assert [r["kind"] for r in rows] == ["all_blocks", "tuned"]


@pytest.mark.parametrize("argv,needle", [
    (["tune", "--l1", "0"], "--l1"),
    (["tune", "--pv-l1", "nan"], "--pv-l1"),
    (["tune", "--layer-l1", "0-5"], "--layer-l1"),
    (["tune", "--layer-l1", "5-2:0.1"], "--layer-l1"),
    (["tune", "--rule", "kl"], "--rule"),
    (["tune", "--text-dir", "/no/such/folder"], "does not exist"),
    (["tune", "--samples", "0"], "--samples"),
    (["eval", "--tuned", "x.safetensors", "--pattern", "sink_window"], "not allowed with"),
    (["niah", "--tuned", "x.safetensors", "--predictor", "mean_sim"], "not allowed with"),
    (["bench-model", "--tuned", "x.safetensors", "--patterns", "sink_window"], "mutually exclusive"),
    (["eval", "--tuned", "/no/such/t.safetensors"], "does not exist"),
    (["bench-model", "--tuned", "/no/such/t.safetensors"], "does not exist"),
    (["bench-model", "--dense-above", "2"], "must be 'auto' or a density"),
    (["bench-model", "--dense-above", "always"], "must be 'auto' or a density"),
])
def test_user_errors_one_line_exit_2(argv, needle, tmp_path, capsys):
    rc = main([*argv, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith(f"sparseattn {argv[0]}: error:"), err
    assert needle in err


def test_dense_above_argument_accepts_auto_and_densities():
    from sparseattn.cli._args import dense_above

    assert dense_above("auto") == "auto" and dense_above("0.8") == 0.8


def test_tune_user_errors_after_loading(tiny, tmp_path, capsys):
    model_dir, text = tiny
    for argv, needle in [
        (["--text-file", str(text), "--seq-len", "1024"], "max_position_embeddings"),
        (["--text-file", str(text), "--seq-len", "512", "--samples", "50"], "too few tokens"),
        (["--random-ids", "--seq-len", "128", "--samples", "1", "--dense-layers", "0,9"], "9"),
    ]:
        rc = main(["tune", "--model", str(model_dir), *argv, "--quiet", "--out", str(tmp_path / "o.safetensors")])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and needle in err, err
    bad = tmp_path / "bad.safetensors"
    bad.write_text("not tensors")
    rc = main(["eval", "--model", str(model_dir), "--tuned", str(bad), "--quiet", "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "is not a readable safetensors file" in err, err
