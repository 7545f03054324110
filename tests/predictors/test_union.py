"""``union:<spec>+<spec>``: the union of the members' block masks, built through the resolver; spec and layout errors."""

from __future__ import annotations

import pytest
import torch

from sparseattn.predictors.resolve import resolve_predictor
from sparseattn.predictors.union import UnionPredictor


def _qk(seed, N=320, H=4, Hkv=2, D=16):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, H, N, D, generator=g)
    k = torch.randn(1, Hkv, N, D, generator=g)
    k[..., 0] += torch.linspace(-2.0, 4.0, N)
    return q, k


@pytest.mark.parametrize("causal", [True, False])
def test_union_is_the_or_of_the_members_masks(causal):
    a_spec = "mean_sim:score=mixed,cdf_threshold=0.7,keep_local=1,sim_threshold=0"
    b_spec = "sampled:rows_per_block=4,cdf_threshold=0.7,keep_local=1"
    q, k = _qk(1)
    pred = resolve_predictor(f"union:{a_spec}+{b_spec}")
    assert isinstance(pred, UnionPredictor) and pred.config.members == (a_spec, b_spec)
    got = pred.predict(q, k, causal=causal).to_dense_mask()
    ma = resolve_predictor(a_spec).predict(q, k, causal=causal).to_dense_mask()
    mb = resolve_predictor(b_spec).predict(q, k, causal=causal).to_dense_mask()
    assert torch.equal(got, ma | mb)
    assert not torch.equal(ma, mb)  # the members differ, so the test sees the union, not a copy
    assert got.sum() > max(ma.sum(), mb.sum())


def test_union_spec_errors():
    with pytest.raises(ValueError, match="must join two or more predictor specs"):
        resolve_predictor("union:mean_sim")
    with pytest.raises(ValueError, match="must join two or more predictor specs"):
        resolve_predictor("union:mean_sim+")
    with pytest.raises(ValueError, match="unknown|not a registered|nope"):
        resolve_predictor("union:mean_sim+nope")
    with pytest.raises(ValueError, match="UnionPredictor: members must hold at least two predictors"):
        UnionPredictor([resolve_predictor("mean_sim")])
    with pytest.raises(ValueError, match=r"UnionPredictor: members\[1\] is not a predictor"):
        UnionPredictor([resolve_predictor("mean_sim"), object()])


def test_members_with_other_block_sizes_are_refused():
    q, k = _qk(2)
    pred = resolve_predictor("union:mean_sim+sampled:block_m=32,block_n=32")
    with pytest.raises(ValueError, match=r"UnionPredictor.predict: members\[1\]'s layout does not match"):
        pred.predict(q, k, causal=True)


def test_reset_reaches_every_member():
    calls = []

    class Member:
        name = "m"

        def __init__(self, i):
            self.i = i

        def predict(self, q, k, *, causal=True, layer=None):  # pragma: no cover - not called
            raise AssertionError

        def reset(self):
            calls.append(self.i)

    UnionPredictor([Member(0), Member(1), Member(2)]).reset()
    assert calls == [0, 1, 2]
