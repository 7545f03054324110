"""The measured density crossover (ops/crossover.py): interpolation, the file and its errors, the lookup rule."""

from __future__ import annotations

import json

import pytest

from sparseattn.ops.crossover import crossover_from_times, load_crossovers, lookup_crossover, shipped_path


def test_crossover_from_times_interpolates_the_first_crossing() -> None:
    # sparse 1, 2, 3 ms at 0.2, 0.5, 0.8; dense 2.5 ms: between 0.5 and 0.8, halfway
    assert crossover_from_times([0.2, 0.5, 0.8], [1.0, 2.0, 3.0], 2.5) == pytest.approx(0.65)
    assert crossover_from_times([0.2, 0.5, 1.0], [1.0, 2.0, 3.0], 0.5) == 0.0  # dense faster everywhere
    assert crossover_from_times([0.2, 0.5, 1.0], [1.0, 2.0, 3.0], 5.0) == 1.0  # sparse faster everywhere
    # not measured up to 1.0: the last slope extended (1 ms per 0.3 of density) to meet dense
    assert crossover_from_times([0.2, 0.5], [1.0, 2.0], 2.3) == pytest.approx(0.59)
    assert crossover_from_times([0.2, 0.5], [1.0, 2.0], 9.0) == 1.0


@pytest.mark.parametrize("args, match", [
    (([0.5, 0.2], [1.0, 2.0], 1.0), "ascending"),
    (([0.2, 1.5], [1.0, 2.0], 1.0), "ascending"),
    (([0.2], [1.0, 2.0], 1.0), "equal length"),
    (([0.2, 0.5], [1.0, float("nan")], 1.0), "positive finite"),
    (([0.2, 0.5], [1.0, 2.0], 0.0), "positive finite"),
])
def test_crossover_from_times_rejects_bad_input(args, match) -> None:
    with pytest.raises(ValueError, match=f"^crossover_from_times: .*{match}"):
        crossover_from_times(*args)


def _entry(**kw):
    e = {"dtype": "bfloat16", "heads": 9, "kv_heads": 3, "head_dim": 64, "seqlen": 4096, "crossover": 0.6}
    e.update(kw)
    return e


def _write(tmp_path, devices, version=1):
    p = tmp_path / "x.json"
    p.write_text(json.dumps({"version": version, "devices": devices}))
    return p


def test_lookup_interpolates_in_log_length_and_clamps(tmp_path) -> None:
    tab = load_crossovers(_write(tmp_path, {"GPU": [_entry(seqlen=2048, crossover=0.4), _entry(seqlen=8192, crossover=0.8),
                                                    _entry(head_dim=128, heads=32, kv_heads=8, crossover=0.9)]}))
    c, src = lookup_crossover("GPU", dtype="bfloat16", heads=9, kv_heads=3, head_dim=64, seqlen=4096, table=tab)
    assert c == pytest.approx(0.6) and "between N=2048 and N=8192" in src
    c, src = lookup_crossover("GPU", dtype="bfloat16", heads=9, kv_heads=3, head_dim=64, seqlen=2048, table=tab)
    assert c == pytest.approx(0.4) and "nearest" not in src
    c, src = lookup_crossover("GPU", dtype="bfloat16", heads=9, kv_heads=3, head_dim=64, seqlen=32768, table=tab)
    assert c == pytest.approx(0.8) and "nearest measured length to 32768" in src
    # another head count: the nearest measured one, said so
    c, src = lookup_crossover("GPU", dtype="bfloat16", heads=12, kv_heads=4, head_dim=64, seqlen=8192, table=tab)
    assert c == pytest.approx(0.8) and "nearest measured heads" in src
    # nothing measured: None and the reason, never a guess
    c, src = lookup_crossover("GPU", dtype="float16", heads=9, kv_heads=3, head_dim=64, seqlen=4096, table=tab)
    assert c is None and "dtype=float16" in src
    c, src = lookup_crossover("Other GPU", dtype="bfloat16", heads=9, kv_heads=3, head_dim=64, seqlen=4096, table=tab)
    assert c is None and "no crossover measured for 'Other GPU'" in src and "GPU" in src


@pytest.mark.parametrize("devices, version, match", [
    ({"G": [_entry(crossover=1.5)]}, 1, r"devices\['G'\]\[0\]\.crossover must be a density"),
    ({"G": [{k: v for k, v in _entry().items() if k != "seqlen"}]}, 1, r"devices\['G'\]\[0\]\.seqlen is missing"),
    ({"G": [_entry(heads=10)]}, 1, "impossible shape"),
    ({"G": {}}, 1, r"devices\['G'\] must be a list"),
    ({}, 2, "version is not supported"),
])
def test_load_crossovers_names_the_file_and_field(tmp_path, devices, version, match) -> None:
    p = _write(tmp_path, devices, version)
    with pytest.raises(ValueError, match=f"^load_crossovers: .*{match}") as ei:
        load_crossovers(p)
    assert str(p) in str(ei.value)


def test_load_crossovers_unreadable_files(tmp_path) -> None:
    with pytest.raises(ValueError, match="^load_crossovers: path cannot be read"):
        load_crossovers(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="^load_crossovers: path is not a readable JSON file"):
        load_crossovers(bad)


def test_shipped_file_loads() -> None:
    tab = load_crossovers(shipped_path())
    for dev, entries in tab.items():  # every shipped entry came from bench_crossover.py: it names its measurement
        for e in entries:
            assert e.get("dense_ms", 0) > 0 and len(e.get("densities", ())) == len(e.get("sparse_ms", ())) >= 2, dev
