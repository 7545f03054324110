"""Block predictors: decide at run time which key blocks each query block needs.

Built-in predictors register themselves on first use of :func:`make_predictor` /
:func:`parse_predictor_spec` (``static``, ``oracle``, ``mean_sim``, ``sketch_walk``, ``gate``); importing
this package stays light. :func:`sparseattn.predictors.resolve.resolve_predictor` is the one entry point
from a user's spec (string, dict, JSON, tuned file) to a predictor, the static ``pattern`` predictor
included (not re-exported here: it reaches up to ``tuning`` for tuned files).
"""

from sparseattn.predictors.base import (
    PREDICTORS,
    Predictor,
    config_from_json,
    config_to_json,
    make_predictor,
    parse_predictor_spec,
    register_predictor,
)
from sparseattn.predictors.pattern import PatternConfig, PatternPredictor, pattern_predictor

__all__ = ["Predictor", "register_predictor", "PREDICTORS", "make_predictor", "parse_predictor_spec",
           "config_to_json", "config_from_json", "PatternConfig", "PatternPredictor", "pattern_predictor"]
