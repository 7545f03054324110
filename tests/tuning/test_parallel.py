"""tune_model_distributed on 2 gloo processes gives exactly tune_model's result."""

from __future__ import annotations

import datetime
import os
import traceback

import pytest
import torch
import torch.multiprocessing as mp

transformers = pytest.importorskip("transformers")

from sparseattn.testing.models import tiny_llama  # noqa: E402


def _model():
    return tiny_llama(layers=3)


def _ids():
    return [torch.randint(0, 97, (128,), generator=torch.Generator().manual_seed(s)) for s in range(2)]


def _kw(gate: bool = False):
    from sparseattn.predictors.mean_similarity import MeanSimilarityConfig

    kw = {"l1": 0.08, "pv_l1": 0.1, "layer_l1": "2-:0.1", "base": MeanSimilarityConfig(block_m=32, block_n=32),
          "progress": False, "log": lambda _line: None}
    if gate:  # a learned gate (same seed on every rank), its CDF and local window tuned per head
        from sparseattn.gate.model import GateWeights

        c = _model().config
        kw["gate"] = GateWeights.init([0, 1, 2], c.num_key_value_heads, c.hidden_size // c.num_attention_heads, 8,
                                      block_m=32, block_n=32, noise=0.05, heads=c.num_attention_heads)
        kw["keep_local_grid"] = (1,)
        kw["base"] = MeanSimilarityConfig(block_m=32, block_n=32, keep_local=2)
    return kw


def _worker(rank: int, world: int, tmp: str, gate: bool = False) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        from sparseattn.tuning import tune_model_distributed

        tc = tune_model_distributed(_model(), _ids(), **_kw(gate))
        res = {"layers": {li: hp.tensors(li) for li, hp in tc.layers.items()}, "meta": tc.meta,
               "gate": tc.gate is not None}
    except BaseException:
        res = {"error": traceback.format_exc()}
    torch.save(res, os.path.join(tmp, f"rank{rank}.pt"))
    dist.barrier()  # both ranks done with the group before either tears it down (gloo aborted once at teardown)
    dist.destroy_process_group()


@pytest.mark.parametrize("gate", [False, True], ids=["mean_sim", "gate"])
def test_distributed_equals_single_process(tmp_path, gate):
    mp.spawn(_worker, args=(2, str(tmp_path), gate), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for r, res in enumerate(results):
        assert "error" not in res, f"rank {r} failed:\n{res['error']}"
    from sparseattn.tuning import tune_model

    torch.set_num_threads(1)
    single = tune_model(_model(), _ids(), **_kw(gate))
    assert (single.gate is not None) == gate
    assert sorted(single.layers) == [0, 1, 2]
    for res in results:
        assert sorted(res["layers"]) == [0, 1, 2] and res["meta"]["world_size"] == 2 and res["gate"] == gate
        assert res["meta"]["predictor"] == single.meta["predictor"]
        for li, hp in single.layers.items():
            want = hp.tensors(li)
            got = res["layers"][li]
            assert set(got) == set(want)
            for key in want:
                assert torch.equal(torch.nan_to_num(got[key], nan=-7.0), torch.nan_to_num(want[key], nan=-7.0)), key


def test_requires_initialised_group():
    from sparseattn.tuning import tune_model_distributed

    with pytest.raises(ValueError, match=r"^tune_model_distributed: group is not initialised; expected "):
        tune_model_distributed(torch.nn.Linear(2, 2), [torch.zeros(4, dtype=torch.long)])
