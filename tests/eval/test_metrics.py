"""Op-level metrics: known values and edge cases."""

from __future__ import annotations

import math

import pytest
import torch

from sparseattn import precision_metric
from sparseattn.eval.metrics import cosine_similarity, max_abs_error, relative_l1, relative_l2, rmse, sqnr_db


def test_known_values():
    ref = torch.tensor([3.0, 4.0, 0.0, 0.0])
    out = torch.tensor([3.0, 4.0, 1.0, -1.0])
    assert relative_l1(out, ref) == pytest.approx(2 / 7)
    assert relative_l2(out, ref) == pytest.approx(math.sqrt(2) / 5)
    assert rmse(out, ref) == pytest.approx(math.sqrt(2 / 4))
    assert max_abs_error(out, ref) == 1.0
    assert cosine_similarity(out, ref) == pytest.approx(25 / (5 * math.sqrt(27)))
    assert sqnr_db(out, ref) == pytest.approx(10 * math.log10(25 / 2))
    assert cosine_similarity(-ref, ref) == pytest.approx(-1.0)


def test_exact_and_zero_cases():
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    z = torch.zeros(3, 5)
    m = precision_metric(x, x)
    assert (m["cosine"], m["relative_l1"], m["relative_l2"], m["rmse"], m["max_abs"]) == (pytest.approx(1.0), 0, 0, 0, 0)
    assert m["sqnr_db"] == math.inf and m["nan_count"] == 0 and "sparsity" not in m
    assert cosine_similarity(z, z) == 1.0 and cosine_similarity(x, z) == 0.0
    assert relative_l1(x, z) == math.inf and relative_l2(x, z) == math.inf and sqnr_db(x, z) == -math.inf
    assert relative_l1(z, z) == 0.0


def test_precision_metric_density_and_nan():
    ref = torch.ones(2, 3, dtype=torch.bfloat16)
    out = ref.clone()
    out[0, 0] = float("nan")
    m = precision_metric(out, ref, density=0.25)
    assert m["nan_count"] == 1 and m["density"] == 0.25 and m["sparsity"] == 0.75
    assert math.isnan(m["cosine"])  # NaN is never hidden


def test_metrics_bad_input():
    with pytest.raises(ValueError, match=r"relative_l1: out shape differs from ref; expected shape \(3,\), got shape \(2,\)"):
        relative_l1(torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match=r"precision_metric: out/ref must be tensors"):
        precision_metric([1.0], torch.zeros(1))  # type: ignore[arg-type]
