"""The one predictor resolver: every spec form gives the same predictor as the spec string."""

import pytest

from sparseattn.predictors import config_to_json, parse_predictor_spec
from sparseattn.predictors.pattern import PatternPredictor
from sparseattn.predictors.resolve import describe_predictor, resolve_predictor, select_predictor


def test_string_dict_and_json_forms_agree() -> None:
    ref = parse_predictor_spec("mean_sim:cdf_threshold=0.8,keep_local=2")
    as_dict = resolve_predictor({"name": "mean_sim", "cdf_threshold": 0.8, "keep_local": 2})
    as_json = resolve_predictor('{"name": "mean_sim", "cdf_threshold": 0.8, "keep_local": 2}')
    as_cfg_json = resolve_predictor(config_to_json(ref.config))
    for p in (as_dict, as_json, as_cfg_json):
        assert type(p) is type(ref) and p.config == ref.config


def test_pattern_forms_agree() -> None:
    ref = resolve_predictor("pattern:name=sink_window,window_blocks=3,pv_threshold=5")
    assert isinstance(ref, PatternPredictor)
    for p in (resolve_predictor({"name": "pattern", "pattern": "sink_window", "window_blocks": 3, "pv_threshold": 5}),
              resolve_predictor(config_to_json(ref.config)),
              select_predictor(pattern="sink_window:window_blocks=3,pv_threshold=5", func="t").predictor):
        assert p.config == ref.config


def test_objects_none_and_errors() -> None:
    p = parse_predictor_spec("static")
    assert resolve_predictor(p) is p and resolve_predictor(None) is None
    assert describe_predictor(None) == {"name": "dense"}
    with pytest.raises(ValueError, match=r"resolve_predictor: spec must be a predictor or a spec string"):
        resolve_predictor(3)
    with pytest.raises(ValueError, match=r"resolve_predictor: spec is not valid JSON"):
        resolve_predictor("{nope")
    with pytest.raises(ValueError, match=r"resolve_predictor: spec names an unknown config type"):
        resolve_predictor('{"type": "NopeConfig"}')
    with pytest.raises(ValueError, match=r"resolve_predictor: tuned spec must name the tuned file"):
        resolve_predictor("tuned:file=x")
    with pytest.raises(ValueError, match=r"t: tuned is mutually exclusive with pattern"):
        select_predictor(pattern="local", tuned="x.safetensors", func="t")


def test_topk_alone_in_a_spec_selects_by_topk() -> None:
    from sparseattn.predictors.base import make_predictor, parse_predictor_spec

    for name in ("sampled", "oracle", "mean_sim"):
        pred = parse_predictor_spec(f"{name}:topk=0.2")
        assert pred.config.topk == 0.2 and pred.config.cdf_threshold is None, name
        assert make_predictor(name).config.cdf_threshold is not None  # the default selection is unchanged
    with pytest.raises(ValueError, match="topk/cdf_threshold exactly one must be set"):
        make_predictor("sampled", topk=0.2, cdf_threshold=0.9)  # naming both is still an error
