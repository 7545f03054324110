"""Layer graphs (integrations/layer_graphs.py): a sparse layer's prediction + kernel replayed from a CUDA graph.

CPU: the switch and its errors, and that nothing is graphed off the GPU. GPU (skipped without one):
logits, densities and counts equal to the same model patched with ``layer_graphs=False``; graphed from
the second call of a shape on; the reasons recorded for layers that are not graphed.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from sparseattn.integrations import patch_model
from sparseattn.testing.tolerances import TINY_BF16_PACKED_LOGITS_COS_MIN

transformers = pytest.importorskip("transformers")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def _tiny(device: str = "cpu", dtype: torch.dtype = torch.float32, window: int | None = None) -> torch.nn.Module:
    if window is None:
        cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=256, num_hidden_layers=3,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
        cls = transformers.LlamaForCausalLM
    else:
        cfg = transformers.Gemma3TextConfig(vocab_size=128, hidden_size=256, intermediate_size=256, num_hidden_layers=3,
                                            num_attention_heads=4, num_key_value_heads=1, head_dim=64,
                                            max_position_embeddings=4096, sliding_window=window,
                                            layer_types=["sliding_attention", "sliding_attention", "full_attention"])
        cls = transformers.Gemma3ForCausalLM
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return cls(cfg).eval().to(device=device, dtype=dtype)


def test_layer_graphs_argument_is_checked():
    model = _tiny()
    with pytest.raises(ValueError, match="patch_model: layer_graphs must be a bool or None"):
        patch_model(model, pattern="sink_window:window_blocks=2", layer_graphs="yes")


def test_layer_graphs_off_switches_and_cpu(monkeypatch):
    model = _tiny()
    with patch_model(model, pattern="sink_window:window_blocks=2", layer_graphs=False) as h:
        assert h.layer_graph_off == "layer_graphs=False"
    monkeypatch.setenv("SPARSEATTN_LAYER_GRAPHS", "0")
    with patch_model(model, pattern="sink_window:window_blocks=2") as h:
        assert h.layer_graph_off == "SPARSEATTN_LAYER_GRAPHS=0"
    monkeypatch.delenv("SPARSEATTN_LAYER_GRAPHS")
    ids = torch.randint(0, 128, (1, 200), generator=torch.Generator().manual_seed(0))
    with patch_model(model, pattern="sink_window:window_blocks=2") as h, torch.no_grad():
        assert h.layer_graph_off is None
        model(ids, use_cache=False)
        model(ids, use_cache=False)
        assert h.layer_graph_status == {}  # CPU: never graphed, nothing to report
        assert h._layer_graphs is None


def _run(model: torch.nn.Module, ids: torch.Tensor, calls: int | list[list[int]], **kw) -> tuple[list[torch.Tensor], dict]:
    """``calls`` forwards, or one packed forward per document split in ``calls`` (position_ids restarting per document)."""
    outs = []
    with patch_model(model, **kw) as h, torch.no_grad():
        for lengths in (calls if isinstance(calls, list) else [None] * calls):
            pos = None if lengths is None else torch.cat([torch.arange(n) for n in lengths])[None].to(ids.device)
            outs.append(model(ids, position_ids=pos, use_cache=False).logits.float())
        rep = h.sparsity_report()
        rep["_status"] = dict(h.layer_graph_status)
        rep["_replays"] = 0 if h._layer_graphs is None else h._layer_graphs.replays
    return outs, rep


@cuda
@pytest.mark.parametrize("spec", ["mean_sim:score=mixed,cdf_threshold=0.9,keep_local=2",
                                  "pattern:sink_window:window_blocks=2,block_m=64,block_n=64"])
def test_graphed_equals_eager(spec):
    model = _tiny("cuda", torch.bfloat16)
    ids = torch.randint(0, 128, (1, 1000), generator=torch.Generator().manual_seed(1)).cuda()
    kw = {"pattern": spec[len("pattern:"):]} if spec.startswith("pattern:") else {"predictor": spec}
    eager, rep_e = _run(model, ids, 4, layer_graphs=False, **kw)
    graphed, rep_g = _run(model, ids, 4, **kw)
    assert rep_g["_status"] == {0: "graphed", 1: "graphed", 2: "graphed"}
    # call 1 runs eagerly unless the route of these shapes is known already (the eager run above settled it)
    assert rep_g["_replays"] == 3 * 4
    assert rep_e["_status"] == {0: "layer_graphs=False", 1: "layer_graphs=False", 2: "layer_graphs=False"}
    for a, b in zip(eager, graphed):
        torch.testing.assert_close(b, a, rtol=0, atol=0)  # the same kernels on the same values
    for layer, e in rep_e["layers"].items():
        assert rep_g["layers"][layer]["density_per_head"] == e["density_per_head"]
    assert rep_g["counts"] == rep_e["counts"]


@cuda
def test_graphed_window_layers_and_new_lengths():
    model = _tiny("cuda", torch.bfloat16, window=256)
    kw = {"predictor": "mean_sim:cdf_threshold=0.9"}
    for n in (700, 1300):  # a second length: new static buffers and graphs
        ids = torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(n)).cuda()
        eager, rep_e = _run(model, ids, 3, layer_graphs=False, **kw)
        graphed, rep_g = _run(model, ids, 3, **kw)
        assert rep_g["_status"] == {0: "graphed", 1: "graphed", 2: "graphed"}
        for a, b in zip(eager, graphed):
            torch.testing.assert_close(b, a, rtol=0, atol=0)


@cuda
def test_not_graphed_reasons_are_recorded_and_warned():
    model = _tiny("cuda", torch.bfloat16)
    ids = torch.randint(0, 128, (1, 600), generator=torch.Generator().manual_seed(2)).cuda()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        _, rep = _run(model, ids, 3, predictor="mean_sim:cdf_threshold=0.9", dense_above=0.99)
    assert all(v.startswith("dense_above") for v in rep["_status"].values()) and rep["_replays"] == 0
    assert any("runs without a CUDA graph (dense_above" in str(w.message) for w in rec)
    # a whole-model capture by the caller: the layers run their eager body inside it
    with patch_model(model, pattern="sink_window:window_blocks=2,block_m=64,block_n=64") as h, torch.no_grad():
        model(ids, use_cache=False)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            model(ids, use_cache=False)
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = model(ids, use_cache=False).logits
        g.replay()
        torch.cuda.synchronize()
        assert torch.isfinite(out.float()).all()
        assert set(h.layer_graph_status.values()) == {"inside the caller's own CUDA graph capture"}


class _FakeGraphs:
    """Stands in for LayerGraphs on the CPU: its replay computes causal SDPA and records the call."""

    def __init__(self) -> None:
        self.fast: dict = {}
        self.replays = 0
        self.stats = {"direct": 0, "copy": 0, "direct_captures": 0, "direct_failed": 0, "held": 0}
        self.direct_error = None
        self.calls: list[tuple[int, ...]] = []

    def replay(self, buf, entry, q, k, v):
        self.calls.append(tuple(q.shape))
        self.replays += 1
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return o.transpose(1, 2).contiguous(), None


def test_fast_lane_is_taken_only_for_the_remembered_call(monkeypatch):
    """CPU: the fast lane's conditions (the GPU replay itself is tested below); a fake replay records its use."""
    from sparseattn.integrations.layer_graphs import FastLane

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    model = _tiny()
    ids = torch.randint(0, 128, (1, 200), generator=torch.Generator().manual_seed(0))
    with patch_model(model, pattern="sink_window:window_blocks=2,block_m=64,block_n=64") as h, torch.no_grad():
        seen: dict[int, tuple] = {}
        orig = h._forward

        def spy(module, layer, q, k, v, mask, kwargs):
            seen.setdefault(layer, (q, k, v, dict(kwargs)))
            return orig(module, layer, q, k, v, mask, kwargs)

        monkeypatch.setattr(h, "_forward", spy)
        model(ids, use_cache=False)
        fake = _FakeGraphs()
        dens = torch.full((4,), 0.5, dtype=torch.float64)
        for layer, (q, k, v, kw) in seen.items():
            fake.fast[layer] = FastLane(h._fast_check(q, k, v, kw), None, None, None, dens, None, False, "triton")
        h._layer_graphs = fake
        h.reset_stats()
        model(ids, use_cache=False)
        assert len(fake.calls) == 3 and h.counts["prefill_sparse"] == 3
        assert h.sparsity_report()["layers"]["0"]["density"] == pytest.approx(0.5)
        assert h.sparsity_report()["layers"]["0"]["backends"] == ["triton"]
        # anything else goes the general way: another length, keep_layouts, an active capture, training mode
        model(ids[:, :150], use_cache=False)
        h.keep_layouts = True
        model(ids, use_cache=False)
        h.keep_layouts = False
        with h.capture([0]):
            model(ids, use_cache=False)
        assert set(h.captured) == {0}
        model.train()
        model(ids, use_cache=False)
        model.eval()
        assert len(fake.calls) == 3  # (an active capture sends every layer the general way)
        model(ids, use_cache=False)
        assert len(fake.calls) == 6


@cuda
@torch.no_grad()  # inference: replays hand out the static output (with grad enabled, a copy: checked below)
def test_layer_graphs_direct_and_copy_replays():
    """The direct graph (no input copies) serves calls whose tensors sit where it was captured; others copy."""
    from sparseattn.integrations.layer_graphs import _MAX_DIRECT_TRIES, LayerGraphs

    def body(q, k, v, out):
        out.copy_((q * 2 + k - v).transpose(1, 2))
        return None

    lg = LayerGraphs()
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 16, device="cuda", generator=g) for _ in range(3))
    expect = lambda: (q * 2 + k - v).transpose(1, 2)  # noqa: E731
    out, _ = lg.run(("L0",), q, k, v, body, "test")
    torch.testing.assert_close(out, expect(), rtol=0, atol=0)
    assert lg.stats["direct_captures"] == 1 and lg.stats["direct"] == 1
    del out  # the output is the static buffer: a replay overwrites it only when nobody holds it
    q.add_(1.0)  # same storage, new values: the direct graph reads them
    out, _ = lg.run(("L0",), q, k, v, body, "test")
    torch.testing.assert_close(out, expect(), rtol=0, atol=0)
    assert lg.stats["direct"] == 2 and lg.stats["copy"] == 0 and lg.stats["held"] == 0
    # a caller that keeps the output (here a view of it): the next call runs eagerly, the held values stay
    kept = out.reshape(-1)
    before = kept.clone()
    del out
    q2 = q + 5.0
    out2, _ = lg.run(("L0",), q2, k, v, body, "test")
    torch.testing.assert_close(out2, (q2 * 2 + k - v).transpose(1, 2), rtol=0, atol=0)
    assert lg.stats["held"] == 1 and torch.equal(kept, before)
    del kept, out2
    with torch.enable_grad():  # autograd may keep the output: a copy, never the static buffer
        out_g, _ = lg.run(("L0",), q, k, v, body, "test")
    buf = next(iter(lg._buffers.values()))
    assert out_g.untyped_storage().data_ptr() != buf.out.untyped_storage().data_ptr()
    torch.testing.assert_close(out_g, expect(), rtol=0, atol=0)
    out_n, _ = lg.run(("L0",), q, k, v, body, "test")  # held copies do not count: the buffer is free
    assert out_n.untyped_storage().data_ptr() == buf.out.untyped_storage().data_ptr() and lg.stats["held"] == 1
    del out_g, out_n
    held = []
    for i in range(_MAX_DIRECT_TRIES + 2):  # new addresses every call: re-captured a few times, then copies
        q, k, v = (torch.randn(1, 2, 64, 16, device="cuda", generator=g) for _ in range(3))
        held.append((q, k, v))  # held, so the next tensors get new addresses
        out, _ = lg.run(("L0",), q, k, v, body, "test")
        torch.testing.assert_close(out, expect(), rtol=0, atol=0)
        del out
    assert lg.stats["direct_captures"] == _MAX_DIRECT_TRIES and lg.stats["copy"] >= 1 and lg.stats["held"] == 1
    side = torch.cuda.Stream()  # a call on another stream waits for the last one's output clone
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out_side, _ = lg.run(("L0",), q, k, v, body, "test")
        torch.testing.assert_close(out_side, expect(), rtol=0, atol=0)
    torch.cuda.current_stream().wait_stream(side)
    qv = torch.randn(1, 2, 64, 32, device="cuda", generator=g)[..., ::2]  # same shape, other strides: copy path
    out, _ = lg.run(("L0",), qv, k, v, body, "test")
    q = qv
    torch.testing.assert_close(out, expect(), rtol=0, atol=0)


@cuda
def test_fast_lane_on_the_gpu_equals_eager():
    model = _tiny("cuda", torch.bfloat16)
    ids = torch.randint(0, 128, (1, 900), generator=torch.Generator().manual_seed(3)).cuda()
    kw = {"predictor": "mean_sim:score=mixed,cdf_threshold=0.9,keep_local=2"}
    eager, rep_e = _run(model, ids, 5, layer_graphs=False, **kw)
    graphed, rep_g = _run(model, ids, 5, **kw)
    for a, b in zip(eager, graphed):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    lg = rep_g["layer_graphs"]
    assert lg["direct"] + lg["copy"] == lg["replays"] == rep_g["_replays"]
    assert rep_g["counts"] == rep_e["counts"]


def test_graph_density_accumulator_accounting():
    """CPU: a graphed predictor layer's counts are summed on the device (DensityAccumulator); the handle counts
    the calls, reports each call as their mean density and zeroes the sum in reset_stats."""
    from sparseattn.integrations.layer_graphs import DensityAccumulator

    model = _tiny()
    with patch_model(model, pattern="sink_window:window_blocks=2") as h:
        acc = DensityAccumulator()
        with pytest.raises(RuntimeError, match="^DensityAccumulator.density: no call was counted"):
            acc.density()
        acc.add(torch.tensor([[2, 4, 0, 8]]), 8)
        acc.reset()  # the capture's warm-up run is not a call
        for counts in ([[2, 4, 0, 8]], [[4, 4, 2, 8]]):
            acc.add(torch.tensor(counts), 8)
            h._count_graph_call(1, acc)
        d = h.densities[1]
        assert len(d) == 2 and d[0] is d[1] and d[0].dtype == torch.float64
        torch.testing.assert_close(d[0], torch.tensor([0.375, 0.5, 0.125, 1.0], dtype=torch.float64), rtol=0, atol=0)
        rep = h.sparsity_report()["layers"]["1"]
        assert rep["density"] == pytest.approx(0.5) and rep["density_per_head"] == [0.375, 0.5, 0.125, 1.0]
        h.reset_stats()
        assert acc.calls == 0 and int(acc.sum.abs().sum()) == 0 and h.densities == {}
        acc.add(torch.tensor([[8, 8, 8, 8]]), 8)
        h._count_graph_call(1, acc)
        assert h.densities[1][0].tolist() == [1.0, 1.0, 1.0, 1.0]


@cuda
@pytest.mark.parametrize("window,spec", [(None, "mean_sim:score=mixed,cdf_threshold=0.9,keep_local=2"),
                                         (None, "pattern:dense:block_m=64,block_n=64"),
                                         (256, "mean_sim:cdf_threshold=0.9")])
def test_packed_sequences_graphed_equal_eager(window, spec):
    model = _tiny("cuda", torch.bfloat16, window=window)
    ids = torch.randint(0, 128, (1, 1000), generator=torch.Generator().manual_seed(3)).cuda()
    packings = [[300, 450, 250], [300, 450, 250], [600, 400], [100, 200, 300, 400], [600, 400]]
    kw = {"pattern": spec[len("pattern:"):]} if spec.startswith("pattern:") else {"predictor": spec}
    eager, rep_e = _run(model, ids, packings, layer_graphs=False, **kw)
    graphed, rep_g = _run(model, ids, packings, **kw)
    # sliding-window layers with a packed mask run the model's own (exact) attention, graphed or not
    sparse = [int(i) for i, e in rep_e["layers"].items() if e["mode"] == "sparse"]
    assert len(sparse) == (1 if window else 3)
    assert rep_g["_status"] == {i: "graphed" for i in sparse}, rep_g["_status"]
    assert rep_g["_replays"] >= len(sparse) * (len(packings) - 1)
    assert rep_g["counts"] == rep_e["counts"] and rep_g["counts"]["prefill_packed"] == len(sparse) * len(packings)
    for a, b in zip(eager, graphed):
        torch.testing.assert_close(b, a, rtol=0, atol=0)  # the same kernels on the same values and documents
    for layer, e in rep_e["layers"].items():
        if e.get("density_per_head") is not None:
            assert rep_g["layers"][layer]["density_per_head"] == pytest.approx(e["density_per_head"], abs=1e-12)
    # and the eager packed path itself matches each packing's documents run alone (exact document masks)
    with torch.no_grad():
        lengths = packings[-1]
        alone = torch.cat([model(ids[:, sum(lengths[:i]):sum(lengths[:i + 1])], use_cache=False).logits.float()
                           for i in range(len(lengths))], dim=1)
    with patch_model(model, pattern="dense:block_m=64,block_n=64") as h, torch.no_grad():
        pos = torch.cat([torch.arange(n) for n in lengths])[None].cuda()
        for _ in range(2):
            got = model(ids, position_ids=pos, use_cache=False).logits.float()
        assert h.layer_graph_status == {i: "graphed" for i in sparse}
    cos = torch.nn.functional.cosine_similarity(got[0], alone[0], dim=-1)
    assert float(cos.min()) > TINY_BF16_PACKED_LOGITS_COS_MIN  # bf16 kernel vs the model's own SDPA per document


def test_run_layer_graph_accounts_the_call_on_cpu():
    """The shared accounting of a graphed call (status, counters, the graph's density accumulator), with a stand-in
    for LayerGraphs (CUDA graphs need a GPU; the GPU tests above run the real thing)."""
    from types import SimpleNamespace

    from sparseattn.integrations.layer_graphs import DensityAccumulator

    model = _tiny()
    out = torch.zeros(1, 4, 4, 64)
    with patch_model(model, pattern="sink_window:window_blocks=2") as h:
        accum = DensityAccumulator()
        body = SimpleNamespace(accum=accum)

        class Graphs:
            last = (None, SimpleNamespace(body=body))
            fail = False

            def run(self, *a):
                if self.fail:
                    return None
                accum.add(torch.tensor([[1, 2, 3, 4]]), 4)  # what a replay does on the device
                return out, None

        h._layer_graphs = Graphs()
        q = torch.zeros(1, 4, 4, 64)
        for _ in range(2):
            got, used = h._run_layer_graph(("k",), 1, q, q, q, body, "layer 1", 0.0, ("prefill_sparse", "prefill_packed"))
            assert got is out and used is accum
        assert h.layer_graph_status[1] == "graphed" and h.counts["prefill_sparse"] == 2 and h.counts["prefill_packed"] == 2
        assert accum.calls == 2 and h._density_raw[1] == [accum]  # one entry standing for both calls
        assert [x.tolist() for x in h.densities[1]] == [[0.25, 0.5, 0.75, 1.0]] * 2  # the mean density, per call
        h._layer_graphs.fail = True
        assert h._run_layer_graph(("k",), 2, q, q, q, body, "layer 2", 0.0, ("prefill_sparse",)) is None
        assert h.layer_graph_status[2] == "capture failed (see the warning)" and h.counts["prefill_sparse"] == 2
