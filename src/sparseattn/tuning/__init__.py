"""Per-(layer, head) tuning of the mean_sim predictor under an error budget.

Lazy: ``import sparseattn.tuning`` loads nothing heavy; the names below import their module on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["tune_layer", "tune_model", "TunedMeanSimPredictor", "TunedGatePredictor", "parse_layer_budgets",
           "tune_model_distributed", "allocate_model"]

_WHERE = {
    "tune_layer": "sparseattn.tuning.search",
    "tune_model": "sparseattn.tuning.run",
    "parse_layer_budgets": "sparseattn.tuning.run",
    "TunedMeanSimPredictor": "sparseattn.tuning.predictor",
    "tune_model_distributed": "sparseattn.tuning.parallel",
    "TunedGatePredictor": "sparseattn.tuning.predictor",
    "allocate_model": "sparseattn.tuning.allocate",
}


def __getattr__(name: str) -> Any:
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module 'sparseattn.tuning' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(mod), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
