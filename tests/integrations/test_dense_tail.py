"""The dense query tail: ``BlockLayout.with_dense_tail``, ``DenseTailPredictor`` and ``patch_model(dense_tail=...)``."""

from __future__ import annotations

import pytest
import torch

from sparseattn.layout.block_layout import BlockLayout, causal_block_region
from sparseattn.layout.convert import layout_from_mask, layout_to_mask
from sparseattn.predictors.tail import DenseTailPredictor


def _random_layout(nq: int, nkv: int, bm: int, bn: int, seed: int = 0, causal: bool = True) -> tuple[BlockLayout, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    Mb, Nb = -(-nq // bm), -(-nkv // bn)
    region = causal_block_region(nq, nkv, bm, bn)[0] if causal else torch.ones(Mb, Nb, dtype=torch.bool)
    mask = (torch.rand(2, 3, Mb, Nb, generator=g) < 0.3) & region
    return layout_from_mask(mask, block_m=bm, block_n=bn, seqlen_q=nq, seqlen_kv=nkv), mask


@pytest.mark.parametrize("nq,nkv,bm,bn,rows", [
    (203, 203, 32, 32, 1),      # the last (partial) block only
    (203, 203, 32, 32, 40),     # reaches into the block before
    (203, 203, 32, 16, 203),    # every row
    (96, 203, 32, 32, 33),      # bottom-right: queries are the last 96 of 203 keys
    (203, 203, 64, 64, 5000),   # more rows than queries
    (7, 203, 64, 64, 3),        # one query block
])
@pytest.mark.parametrize("causal", [True, False])
def test_with_dense_tail_sets_exactly_the_tail_blocks_to_their_region(nq, nkv, bm, bn, rows, causal) -> None:
    lay, mask = _random_layout(nq, nkv, bm, bn, seed=rows, causal=causal)
    out = lay.with_dense_tail(rows, causal=causal)
    first = max(0, (nq - rows) // bm)
    region = causal_block_region(nq, nkv, bm, bn)[0] if causal else torch.ones_like(mask[0, 0])
    want = mask.clone()
    want[:, :, first:] = region[first:]
    assert torch.equal(layout_to_mask(out), want)
    assert first == 0 or torch.equal(layout_to_mask(out)[:, :, :first], mask[:, :, :first])
    # a valid layout (ascending indices inside the first kv_num_blocks entries), the input untouched
    BlockLayout(out.kv_num_blocks, out.kv_indices, bm, bn, nq, nkv, validate=True)
    assert torch.equal(layout_to_mask(lay), mask)


def test_with_dense_tail_leaves_shared_views_alone_and_counts_the_new_blocks() -> None:
    lay, mask = _random_layout(203, 203, 32, 32)
    shared = BlockLayout(lay.kv_num_blocks[:, :1].expand(2, 4, -1), lay.kv_indices[:, :1].expand(2, 4, -1, -1), 32, 32,
                         203, 203, in_region=True)
    before = shared.kv_indices.clone()
    out = shared.with_dense_tail(64)
    assert torch.equal(shared.kv_indices, before)
    assert out.in_region  # the tail rows are the causal region itself
    assert not shared.with_dense_tail(64, causal=False).in_region
    region = causal_block_region(203, 203, 32, 32)[0]
    want = layout_to_mask(shared).clone()
    want[:, :, (203 - 64) // 32:] = region[(203 - 64) // 32:]
    assert torch.equal(out.selected_in_region(causal=True), want.sum((-1, -2)))
    assert shared.with_dense_tail(0) is shared


@pytest.mark.parametrize("rows", [-1, 1.5, True, "8"])
def test_with_dense_tail_rejects_bad_rows(rows) -> None:
    lay, _ = _random_layout(64, 64, 32, 32)
    with pytest.raises(ValueError, match=r"BlockLayout.with_dense_tail: rows must be a non-negative int"):
        lay.with_dense_tail(rows)
    with pytest.raises(ValueError, match=r"DenseTailPredictor: rows must be a non-negative int"):
        DenseTailPredictor(object(), rows)


def test_dense_tail_predictor_delegates_everything_but_the_layout() -> None:
    class Inner:
        name = "inner"
        config = {"k": 1}

        def __init__(self) -> None:
            self.resets = 0

        def predict(self, q, k, *, causal=True, layer=None):
            lay, _ = _random_layout(q.shape[2], k.shape[2], 32, 32, seed=layer or 0)
            return BlockLayout(lay.kv_num_blocks[:1, :1].expand(q.shape[0], q.shape[1], -1),
                               lay.kv_indices[:1, :1].expand(q.shape[0], q.shape[1], -1, -1), 32, 32,
                               q.shape[2], k.shape[2])

        def reset(self) -> None:
            self.resets += 1

        def pv_threshold_for(self, layer):
            return 0.01 * layer

        def graph_refusal(self, layer):
            return "no" if layer == 3 else None

        def graph_layer_key(self, layer):
            return ("key", layer % 2)

    inner = Inner()
    p = DenseTailPredictor(inner, 40)
    assert (p.name, p.config, p.pv_threshold_for(2)) == ("inner", {"k": 1}, 0.02)
    assert (p.graph_refusal(3), p.graph_refusal(1), p.graph_layer_key(5)) == ("no", None, ("key", 1))
    p.reset()
    assert inner.resets == 1
    q, k = torch.randn(1, 4, 203, 8), torch.randn(1, 2, 203, 8)
    got = layout_to_mask(p.predict(q, k, layer=1))
    assert torch.equal(got, layout_to_mask(inner.predict(q, k, layer=1).with_dense_tail(40)))
    assert got[..., -2:, :].sum() > layout_to_mask(inner.predict(q, k, layer=1))[..., -2:, :].sum()
    with pytest.raises(ValueError, match="already a DenseTailPredictor"):
        DenseTailPredictor(p, 8)


def _llama(layers: int = 2):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=96, intermediate_size=128, num_hidden_layers=layers,
                                   num_attention_heads=6, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=1024, attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(cfg).eval()


@torch.no_grad()
def test_patch_model_dense_tail_makes_the_last_positions_exact_in_the_first_layer() -> None:
    from sparseattn.integrations import patch_model, pattern_predictor

    model = _llama(layers=1)
    ids = torch.randint(0, 97, (1, 203), generator=torch.Generator().manual_seed(1))
    dense = model(ids).logits
    spec = "sink_window:sink_blocks=1,window_blocks=1,block_m=32,block_n=32"
    with patch_model(model, pattern=spec, keep_layouts=True) as h:
        sparse = model(ids).logits
        rep0 = h.sparsity_report()
    with patch_model(model, pattern=spec, dense_tail=40, keep_layouts=True, per_head={"0.4": pattern_predictor(spec)}) as h:
        tail = model(ids).logits
        rep = h.sparsity_report()
        lay = h.layouts[0]
    # one layer: every position whose query block is on its whole causal row gets dense attention, so exact logits
    first = (203 - 40) // 32 * 32
    assert (sparse[0, first:] - dense[0, first:]).abs().max() > 1e-3  # the pattern alone is not exact there
    torch.testing.assert_close(tail[0, first:], dense[0, first:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tail[0, :first], sparse[0, :first], rtol=1e-6, atol=1e-6)
    assert rep["dense_tail"] == 40 and rep0["dense_tail"] == 0
    assert rep["layers"]["0"]["density"] > rep0["layers"]["0"]["density"]
    region = causal_block_region(203, 203, 32, 32)[0]
    assert bool((layout_to_mask(lay)[0, :, first // 32:] == region[first // 32:]).all())  # the per-head override too


def test_patch_model_rejects_a_bad_dense_tail() -> None:
    from sparseattn.integrations import patch_model

    model = _llama(layers=1)
    with pytest.raises(ValueError, match=r"patch_model: dense_tail must be a non-negative int"):
        patch_model(model, predictor="mean_sim", dense_tail=-4)
    assert model.config._attn_implementation == "sdpa"  # nothing patched


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA: the Triton kernel and layer graphs")
@torch.no_grad()
def test_dense_tail_on_cuda_matches_the_all_blocks_rows() -> None:
    """bf16 on the GPU (layer graphs on): in a one-layer model the tail rows equal the all-blocks kernel's rows."""
    from sparseattn.integrations import patch_model

    model = _llama(layers=1).to("cuda", torch.bfloat16)
    ids = torch.randint(0, 97, (1, 1000), generator=torch.Generator().manual_seed(2)).cuda()
    spec = "sink_window:sink_blocks=1,window_blocks=1,block_m=64,block_n=64"
    with patch_model(model, pattern="dense:block_m=64,block_n=64"):
        full = model(ids).logits.float()
    first = (1000 - 100) // 64 * 64
    with patch_model(model, pattern=spec, dense_tail=100) as h:
        for _ in range(3):  # eager, then the layer graph's capture and replay (one handle keeps its graphs)
            tail = model(ids).logits.float()
            torch.testing.assert_close(tail[0, first:], full[0, first:], rtol=0, atol=2e-2)
        rep = h.sparsity_report()
    assert rep["dense_tail"] == 100 and rep["layers"]["0"]["density"] < 0.5
