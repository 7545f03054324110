"""One resolver for Q/K/V collections: validate / compare / iter_collected accept the collection root,
a length folder or one .safetensors file, say what they found, and refuse bad paths in one line (exit 2)."""

from __future__ import annotations

import json
import shutil

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from sparseattn.cli.main import main  # noqa: E402
from sparseattn.eval.collect import describe_collection, iter_collected, resolve_collection  # noqa: E402

LAYERS = (0, 1)


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """`sparseattn collect` on a 2-layer random Llama (byte-level tokenizer): lengths 64 and 128, 2 samples each."""
    from sparseattn.testing.bad_inputs import save_tiny_llama

    d = tmp_path_factory.mktemp("collection_inputs")
    model_dir = save_tiny_llama(d / "model", hidden_size=64, intermediate_size=64, heads=4, kv_heads=2,
                                head_dim=16)
    text = d / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. Seven wizards quietly box jumping frogs. " * 40)
    root = d / "qkv"
    rc = main(["collect", "--model", str(model_dir), "--text-file", str(text), "--lengths", "64,128", "--samples", "2",
               "--layers", ",".join(map(str, LAYERS)), "--quiet", "--out", str(root)])
    assert rc == 0
    return root


def _found_line(err: str, command: str) -> str:
    lines = [x for x in err.splitlines() if x.startswith(f"{command}: found ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("which, files, found", [
    ("root", 4, "found 4 files in 2 length folders (len64, len128) under"),
    ("len", 2, "found 2 files in"),
    ("file", 1, "found 1 file ("),
])
def test_validate_accepts_root_length_folder_and_file(collection, tmp_path, capsys, which, files, found):
    path = {"root": collection, "len": collection / "len128", "file": collection / "len64" / "sample1.safetensors"}[which]
    rc = main(["validate", str(path), "--predictor", "mean_sim:cdf_threshold=0.9", "--quiet", "--out", str(tmp_path)])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert found in _found_line(cap.err, "validate")
    res = json.loads((tmp_path / "validate.json").read_text())
    assert len(res["records"]) == files * len(LAYERS)
    assert len({(r["seq_len"], r["file"]) for r in res["records"]}) == files
    want_lengths = {"root": {64, 128}, "len": {128}, "file": {64}}[which]
    assert {r["seq_len"] for r in res["records"]} == want_lengths
    assert res["found"].startswith("found ") and res["found"] in (tmp_path / "validate.md").read_text()


@pytest.mark.parametrize("which, files", [("root", 4), ("len", 2), ("file", 1)])
def test_compare_accepts_root_length_folder_and_file(collection, tmp_path, capsys, which, files):
    path = {"root": collection, "len": collection / "len64", "file": collection / "len128" / "sample0.safetensors"}[which]
    rc = main(["compare", "--a", "mean_sim:cdf_threshold=0.9", "--input", str(path), "--no-plots", "--no-output",
               "--out", str(tmp_path)])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    line = _found_line(cap.err, "compare")
    assert line.startswith(f"compare: found {files} file")
    res = json.loads((tmp_path / "compare.json").read_text())
    assert len(res["records"]) == files * len(LAYERS)
    want_lengths = {"root": {64, 128}, "len": {64}, "file": {128}}[which]
    assert {r["length"] for r in res["records"]} == want_lengths


def test_iter_collected_takes_the_same_three_forms(collection):
    n_root = len(list(iter_collected(collection)))
    n_len = len(list(iter_collected(collection / "len64")))
    n_file = len(list(iter_collected(collection / "len64" / "sample0.safetensors")))
    assert (n_root, n_len, n_file) == (4 * len(LAYERS), 2 * len(LAYERS), len(LAYERS))


def test_resolver_orders_by_length_and_sample_number(tmp_path):
    root = tmp_path / "c"
    for n in (128, 64, 1024):
        (root / f"len{n}").mkdir(parents=True)
        for i in (10, 2, 0):
            (root / f"len{n}" / f"sample{i}.safetensors").write_bytes(b"x")
    (root / "notes").mkdir()  # not a length folder: ignored
    (root / "notes" / "other.safetensors").write_bytes(b"x")
    files = resolve_collection(root)
    assert [f"{f.parent.name}/{f.stem}" for f in files] == [
        f"len{n}/sample{i}" for n in (64, 128, 1024) for i in (0, 2, 10)]
    assert describe_collection(files, root, "x") == f"x: found 9 files in 3 length folders (len64, len128, len1024) under {root}"
    one = resolve_collection(root / "len64" / "sample2.safetensors")
    assert describe_collection(one, root / "len64" / "sample2.safetensors") == f"found 1 file ({one[0]})"


def _bad_paths(collection, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text("hello")
    interrupted = tmp_path / "interrupted"
    (interrupted / "len2048").mkdir(parents=True)
    parent = tmp_path / "runs"
    parent.mkdir()
    shutil.copytree(collection / "len64", parent / "qkv" / "len64")
    other = tmp_path / "x.pt"
    other.write_bytes(b"\x80\x04not a tensor file")
    return [
        (tmp_path / "missing", "does not exist"),
        (empty, "an empty folder"),
        (texts, "holds no .safetensors file"),
        (interrupted, "interrupted"),
        (parent, f"pass one of: {parent / 'qkv'}"),
        (collection / "len64" / "sample0.json", f"pass {collection / 'len64' / 'sample0.safetensors'} instead"),
        (collection / "collection.json", f"pass {collection} instead"),
        (other, "is not a .safetensors file"),
    ]


@pytest.mark.parametrize("command", ["validate", "compare"])
def test_bad_paths_are_one_line_exit_2(collection, tmp_path, capsys, command):
    for path, words in _bad_paths(collection, tmp_path):
        argv = (["validate", str(path)] if command == "validate" else
                ["compare", "--a", "mean_sim", "--input", str(path), "--no-plots"]) + ["--out", str(tmp_path / "o")]
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc == 2, (path, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"sparseattn {command}: error: "), err
        assert "Traceback" not in err
        if command == "compare" and not path.exists():  # compare names the synthetic kinds too
            assert "neither a synthetic kind nor an existing path" in err
        else:
            assert words in err, (path, err)


def test_short_text_fails_before_capturing(tmp_path, capsys):
    """A text too short for the last length is refused before the first length is captured (nothing written)."""
    from sparseattn.testing.bad_inputs import save_tiny_llama

    model_dir = save_tiny_llama(tmp_path / "model", hidden_size=64, intermediate_size=64, heads=4, kv_heads=2,
                                head_dim=16)
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 10)  # ~450 byte tokens
    root = tmp_path / "qkv"
    rc = main(["collect", "--model", str(model_dir), "--text-file", str(text), "--lengths", "64,400", "--samples", "2",
               "--quiet", "--out", str(root)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "too few tokens" in err, err
    assert not (root / "len64").exists()
