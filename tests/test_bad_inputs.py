"""Every bad-input class of ``sparseattn.testing.bad_inputs`` is refused the way the project promises.

(a) API / loader cases raise the project's ``ValueError`` (``<function>: <argument> <problem>;
expected X, got Y``) or an intended ``NotImplementedError`` naming each backend's reason — never a
raw ``TypeError`` / ``struct.error`` / ``KeyError`` / ``AttributeError``. (b) CLI cases exit with
status 2 and print one line on stderr without a traceback. Offline, CPU only: files are written
on the fly and the model cases use a tiny Llama saved in a temporary folder.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from sparseattn.cli.main import main
from sparseattn.testing import bad_inputs as bi

CASES = bi.all_cases()
API_CASES = [c for c in CASES if c.kind != "cli"]
CLI_CASES = [c for c in CASES if c.kind == "cli"]


def _id(case: bi.Case) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", case.cls).strip("-")[:60]


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> bi.Fixtures:
    return bi.Fixtures(tmp_path_factory.mktemp("bad_inputs"))


def test_table_is_large_and_distinct() -> None:
    assert len(CASES) >= 30
    assert len({c.cls for c in CASES}) == len(CASES), "every case is a distinct class"
    assert {c.kind for c in CASES} == {"api", "file", "cli"}


@pytest.mark.parametrize("case", API_CASES, ids=_id)
def test_api_and_file_cases_raise_project_errors(case: bi.Case, fx: bi.Fixtures) -> None:
    if case.needs:
        pytest.importorskip(case.needs)
    rec = bi.run_case(case, fx)
    assert rec["error_type"] not in bi.RAW_TYPES, rec
    assert bi.check(rec) == [], rec
    if case.expect == "ValueError":
        assert bi.PROJECT_FORMAT.match(rec["error"]), rec["error"]
    assert rec["lines"] == 1, "one-line messages"


@pytest.mark.parametrize("case", CLI_CASES, ids=_id)
def test_cli_cases_exit_2_with_one_line(case: bi.Case, fx: bi.Fixtures, capsys) -> None:
    if case.needs:
        pytest.importorskip(case.needs)
    argv = case.run(fx)
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, (rc, err)
    assert len(lines) == 1, err
    assert "Traceback" not in err and "Traceback" not in out
    assert bi.CLI_LINE.match(lines[0]), lines[0]
    if case.contains:
        assert case.contains in lines[0]


# --------------------------------------------------------------------------- the three original defects
def test_truncated_gguf_is_a_one_line_error(fx: bi.Fixtures, capsys) -> None:
    from sparseattn.models import load

    path = fx.write("defect_trunc.gguf", fx.gguf_bytes()[:100])
    with pytest.raises(ValueError, match=r"^load: model .*defect_trunc\.gguf is not a readable GGUF file \(.+\); "
                                         r"expected a GGUF v2/v3 model file .*, got 100 bytes"):
        load(str(path))
    assert main(["eval", "--model", str(path), "--out", str(fx.root / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sparseattn eval: error: load: model ")
    assert "struct.error" not in err and "Traceback" not in err


def test_unknown_predictor_key_lists_valid_keys() -> None:
    from sparseattn.predictors import parse_predictor_spec

    with pytest.raises(ValueError) as ei:
        parse_predictor_spec("mean_sim:cdf=0.9")
    msg = str(ei.value)
    assert msg.startswith("make_predictor: key 'cdf' is not a parameter of mean_sim; expected one of [")
    assert "'cdf_threshold'" in msg and msg.endswith("got 'cdf'")
    # the good spelling still works, and so do the predictors' own value checks
    assert parse_predictor_spec("mean_sim:cdf_threshold=0.9").config.cdf_threshold == 0.9


def test_compare_on_a_collection_root_reads_every_length(fx: bi.Fixtures, capsys) -> None:
    root = fx.sample("root_ok", n=64)
    fx.sample("root_ok", n=96)
    (root / "collection.json").write_text("{}")
    rc = main(["compare", "--a", "static:pattern=sink_window,block_m=32,block_n=32", "--input", str(root),
               "--no-plots", "--no-output", "--out", str(fx.root / "cmp")])
    assert rc == 0, capsys.readouterr().err
    data = json.loads((fx.root / "cmp" / "compare.json").read_text())
    assert sorted(r["length"] for r in data["records"]) == [64, 96]
    assert {r["source"] for r in data["records"]} == {"len64/sample0", "len96/sample0"}


# --------------------------------------------------------------------------- CLI behaviour
def test_debug_flag_shows_the_traceback(fx: bi.Fixtures) -> None:
    with pytest.raises(ValueError, match="key 'cdf' is not a parameter of mean_sim"):
        main(["--debug", "compare", "--a", "mean_sim:cdf=0.9", "--out", str(fx.root / "o")])
    with pytest.raises(ValueError, match="key 'cdf'"):  # after the subcommand too
        main(["compare", "--debug", "--a", "mean_sim:cdf=0.9", "--out", str(fx.root / "o")])


def test_internal_bugs_are_not_turned_into_exit_2(monkeypatch) -> None:
    from sparseattn.cli import compare as compare_cmd

    def broken(args):
        raise TypeError("unsupported operand type(s) for +: 'NoneType' and 'int'")

    monkeypatch.setattr(compare_cmd, "run", broken)
    with pytest.raises(TypeError):
        main(["compare", "--a", "mean_sim"])

    def broken_rt(args):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(compare_cmd, "run", broken_rt)
    with pytest.raises(RuntimeError):
        main(["compare", "--a", "mean_sim"])


def test_file_not_found_from_a_subcommand_is_one_line(monkeypatch, capsys) -> None:
    from sparseattn.cli import compare as compare_cmd

    def missing(args):
        open("/nonexistent/sparseattn/file.json")

    monkeypatch.setattr(compare_cmd, "run", missing)
    assert main(["compare", "--a", "mean_sim"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "FileNotFoundError" in err and "/nonexistent/sparseattn/file.json" in err


def test_help_and_good_runs_are_unaffected(capsys) -> None:
    assert main(["--help"]) == 0
    assert "--debug" in capsys.readouterr().out
    assert main(["quick-test", "--help"]) == 0
    capsys.readouterr()


# --------------------------------------------------------------------------- loaders and parsers
def test_valid_files_still_load(fx: bi.Fixtures) -> None:
    from sparseattn.eval.collect import iter_collected
    from sparseattn.eval.compare import safetensors_inputs
    from sparseattn.models.loader import check_gguf

    assert check_gguf(fx.write("ok.gguf", fx.gguf_bytes())).name == "ok.gguf"
    root = fx.sample("valid_again")
    items = list(iter_collected(root))
    assert [(it["layer"], it["seq_len"], it["scale"]) for it in items] == [(0, 64, 0.25)]
    # a sample without its .json is read from the tensors alone
    (root / "len64" / "sample0.json").unlink()
    assert [it["layer"] for it in iter_collected(root)] == [0]
    assert [it["layer"] for it in safetensors_inputs(root / "len64" / "sample0.safetensors")] == [0]


def test_config_from_json_round_trip_and_defaults() -> None:
    from sparseattn.predictors import config_from_json, config_to_json
    from sparseattn.predictors.mean_similarity import MeanSimilarityConfig

    cfg = MeanSimilarityConfig(cdf_threshold=0.8, keep_local=2)
    assert config_from_json(config_to_json(cfg), MeanSimilarityConfig) == cfg
    assert config_from_json(config_to_json(cfg).encode(), MeanSimilarityConfig) == cfg
    assert config_from_json('{"keep_local": 2}', MeanSimilarityConfig) == MeanSimilarityConfig(keep_local=2)
    with pytest.raises(ValueError, match=r"^config_from_json: text holds the wrong JSON type"):
        config_from_json('"mean_sim"', MeanSimilarityConfig)
    with pytest.raises(ValueError, match=r"^config_from_json: text must be JSON text"):
        config_from_json(None, MeanSimilarityConfig)


def test_pattern_specs_check_keys_and_values_up_front() -> None:
    from sparseattn.integrations.transformers_patch import pattern_predictor

    p = pattern_predictor("sink_window:sink_blocks=1,window_blocks=2,pv_threshold=4")
    assert dict(p.config.kwargs) == {"sink_blocks": 1, "window_blocks": 2} and p.config.pv_threshold == 4
    assert pattern_predictor({"name": "random", "density": 0.3, "seed": 2}).config.name == "random"
    with pytest.raises(ValueError, match=r"key 'causal' is not a parameter of pattern 'local'"):
        pattern_predictor("local:causal=false")
    with pytest.raises(ValueError, match=r"pattern_predictor: pv_threshold must be a positive number"):
        pattern_predictor("local:pv_threshold=-2")
    with pytest.raises(ValueError, match=r"pattern_predictor: name is not a known pattern"):
        pattern_predictor({"window_blocks": 2})


def test_cli_converters_give_project_messages() -> None:
    import argparse

    from sparseattn.cli import _args

    assert _args.int_list(1)("1, 2,3") == [1, 2, 3] and _args.optional_int_list(0)("") == []
    assert _args.float_list(0.0, 1.0)("0,0.5,1") == [0.0, 0.5, 1.0]
    for conv, text in ((_args.positive_int, "0"), (_args.nonneg_int, "-1"), (_args.density, "nan"),
                       (_args.finite_float, "inf"), (_args.int_list(1), ","), (_args.float_list(0, 1), "x")):
        with pytest.raises(argparse.ArgumentTypeError, match=r"; expected .+, got "):
            conv(text)


def test_doc_lists_every_case() -> None:
    doc = Path(__file__).resolve().parents[1] / "docs" / "BAD_INPUTS.md"
    text = doc.read_text()
    assert f"| {len(CASES)} |" in text and f"| {len(CASES) + 1} |" not in text, \
        "docs/BAD_INPUTS.md is stale: run python benchmarks/bad_inputs.py"
    assert "not**" not in text  # every case refused as promised when the doc was written


def test_records_are_json_friendly(fx: bi.Fixtures) -> None:
    rec = bi.run_case(API_CASES[0], fx)
    json.dumps(rec)
    assert torch.is_tensor(fx.qkv()[0])
