"""Steady-state prefill timing (sparseattn.eval.prefill_timing) and how `evaluate` reports it."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sparseattn.eval.prefill_timing import steady_prefill_times  # noqa: E402


def _tiny_llama() -> torch.nn.Module:
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_steady_prefill_times_medians_rounds_and_method():
    model = _tiny_llama()
    ids = torch.randint(0, 96, (1, 192), generator=torch.Generator().manual_seed(0))
    calls = {"n": 0}
    hook = model.model.register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    try:
        res = steady_prefill_times(model, ids, {"pattern": "sink_window:window_blocks=1"}, repeats=3, warmup=2)
    finally:
        hook.remove()
    # dense + sparse per round, warm-up rounds included, plus one untimed sparse call that settles the routes
    assert calls["n"] == 2 * (2 + 3) + 1
    assert len(res["dense_rounds_s"]) == len(res["sparse_rounds_s"]) == 3
    assert res["dense_s"] == sorted(res["dense_rounds_s"])[1] and res["sparse_s"] == sorted(res["sparse_rounds_s"])[1]
    assert res["ratio"] == pytest.approx(res["dense_s"] / res["sparse_s"])
    assert "median of 3" in res["method"] and "2 warm-up" in res["method"] and "192 tokens" in res["method"]
    from sparseattn.integrations import get_handle

    assert get_handle(model) is None  # the model is left unpatched


@pytest.mark.parametrize("bad", [0, -1, True, 2.5])
def test_steady_prefill_times_bad_repeats(bad):
    with pytest.raises(ValueError, match="steady_prefill_times: repeats"):
        steady_prefill_times(_tiny_llama(), torch.zeros(1, 8, dtype=torch.long), {}, repeats=bad)


def test_evaluate_reports_steady_state_prefill():
    from sparseattn.eval.end_to_end import evaluate

    model = _tiny_llama()
    ids = [torch.randint(0, 96, (1, 128), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    res = evaluate(model=model, input_ids=ids, pattern="sink_window:window_blocks=1", gen_tokens=2, progress=False,
                   timing_repeats=5, self_check=False)
    st = res.timings["steady_prefill"]
    assert len(st["dense_rounds_s"]) == 5 and st["warmup"] == 1
    assert "first_call_dense_prefill_s" in res.timings and "dense_prefill_s" not in res.timings
    assert "steady state" in res.table() and "median of 5" in res.table()
    res0 = evaluate(model=model, input_ids=ids, pattern="sink_window:window_blocks=1", gen_tokens=2, progress=False,
                    timing_repeats=0, self_check=False)
    assert res0.timings["steady_prefill"] is None and "skipped" in res0.table()


def test_quiet_gc_collects_disables_and_restores():
    import gc

    from sparseattn.eval.prefill_timing import quiet_gc

    assert gc.isenabled()
    with quiet_gc():
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with quiet_gc():
            assert not gc.isenabled()
        assert not gc.isenabled()  # a caller's disabled collector stays disabled
    finally:
        gc.enable()
    with pytest.raises(RuntimeError):
        with quiet_gc():
            raise RuntimeError("boom")
    assert gc.isenabled()  # restored on error too


def test_rounds_swap_which_side_runs_first():
    from sparseattn.eval.prefill_timing import round_order

    assert [round_order(r) for r in range(4)] == [(0, 1), (1, 0), (0, 1), (1, 0)]
    model = _tiny_llama()
    ids = torch.randint(0, 96, (1, 64), generator=torch.Generator().manual_seed(1))
    from sparseattn.integrations import get_handle

    order: list[str] = []

    def pre_hook(*_):
        h = get_handle(model)  # patched for the whole timing; the model's own attention on the dense side
        order.append("sparse" if model.config._attn_implementation == h.impl_name else "dense")

    hook = model.model.register_forward_pre_hook(pre_hook)
    try:
        res = steady_prefill_times(model, ids, {"pattern": "sink_window:window_blocks=1"}, repeats=2, warmup=1)
    finally:
        hook.remove()
    # the untimed settling call, then round 0 dense first, round 1 sparse first, round 2 dense first
    assert order == ["sparse", "dense", "sparse", "sparse", "dense", "dense", "sparse"]
    assert "garbage collector" in res["method"] and "swapped every round" in res["method"]
