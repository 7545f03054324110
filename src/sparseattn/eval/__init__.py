"""Evaluation: metrics (light), suites, reports (import submodules explicitly; they may need extras)."""

from sparseattn.eval.metrics import (
    cosine_similarity,
    max_abs_error,
    precision_metric,
    relative_l1,
    relative_l2,
    rmse,
    sqnr_db,
)

__all__ = ["cosine_similarity", "max_abs_error", "precision_metric", "relative_l1", "relative_l2", "rmse", "sqnr_db"]
