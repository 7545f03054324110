"""Block predictors: decide at run time which key blocks each query block needs.

Built-in predictors register themselves on first use of :func:`make_predictor` /
:func:`parse_predictor_spec` (``static``, ``oracle``, ``mean_sim``, ``sketch_walk``); importing this
package stays light.
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

__all__ = ["Predictor", "register_predictor", "PREDICTORS", "make_predictor", "parse_predictor_spec",
           "config_to_json", "config_from_json"]
