"""The sparse prefill path of a patched model reads no tensor value on the host.

A host read (``.item()``, ``bool(t)``, ``int(t)``, ``.tolist()``) dispatches ``aten._local_scalar_dense``;
on a GPU each one stalls the CPU until the GPU catches up, so the model becomes host-bound. These
tests count that op (a ``TorchDispatchMode``, which works on CPU) during a whole patched forward that
takes the path a GPU takes: the Triton kernel (under the interpreter here), the predictor, the
integration glue and its accounting.
"""

from __future__ import annotations

import pytest
import torch

from sparseattn.layout.block_layout import region_row_limits
from sparseattn.layout.patterns import random_layout
from sparseattn.testing.harness import CountOps

transformers = pytest.importorskip("transformers")


def _tiny_llama() -> torch.nn.Module:
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval().to(torch.float16)


@pytest.mark.parametrize("spec", ["mean_sim:score=mixed,cdf_threshold=0.97,keep_local=8", "sketch_walk",
                                  "static:pattern=sink_window,sink_blocks=1,window_blocks=2"])
def test_patched_sparse_prefill_makes_no_host_reads(spec):
    from sparseattn.integrations import patch_model

    model = _tiny_llama()
    ids = torch.randint(0, 128, (1, 256), generator=torch.Generator().manual_seed(1))
    with patch_model(model, predictor=spec, backend="triton") as handle:
        with torch.no_grad():
            model(ids)  # first call: caches, autotuning choices
        counter = CountOps()
        with counter, torch.no_grad():
            model(ids)
        assert handle.counts["prefill_sparse"] == 4, handle.counts
        report = handle.sparsity_report()  # reading the accounting is where the host read happens
    assert counter.ops.get("aten._local_scalar_dense.default", 0) == 0, dict(counter.ops)
    dens = [e["density"] for e in report["layers"].values() if e["mode"] == "sparse"]
    assert len(dens) == 2 and all(0 < d <= 1 for d in dens), report


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("nq,nkv", [(256, 256), (100, 300), (300, 300), (200, 130)])
def test_selected_in_region_matches_density(causal, nq, nkv):
    lay = random_layout(nq, nkv, density=0.4, block_m=64, block_n=32, batch=2, heads=3, seed=5, causal=False)
    sel = lay.selected_in_region(causal=causal)
    avail = lay.available_blocks(causal=causal)
    region = lay._region(causal)
    assert avail == int(region.sum())
    expected = (lay.to_dense_mask() & region).sum(dim=(-1, -2))
    assert torch.equal(sel, expected)
    if avail:
        assert torch.allclose(sel.double() / avail, lay.density_per_head(causal=causal))


@pytest.mark.parametrize("nq,nkv,bm,bn", [(256, 256, 64, 64), (100, 300, 64, 32), (300, 100, 32, 64), (1, 513, 64, 64)])
def test_region_row_limits_is_the_causal_region(nq, nkv, bm, bn):
    from sparseattn.layout.block_layout import causal_block_region

    any_allowed, _ = causal_block_region(nq, nkv, bm, bn)
    lims = torch.tensor(region_row_limits(nq, nkv, bm, bn, True))
    j = torch.arange(any_allowed.shape[1])
    assert torch.equal(j[None, :] < lims[:, None], any_allowed)


def test_in_region_layouts_count_with_one_reduction():
    """A layout its producer clips to the causal region (the fused predictor) is counted by one op."""
    from sparseattn.layout.block_layout import BlockLayout, causal_block_region

    lay = random_layout(300, 300, density=0.5, block_m=64, block_n=64, batch=2, heads=3, seed=1, causal=True)
    region, _ = causal_block_region(300, 300, 64, 64)
    clipped = BlockLayout.from_dense_mask(lay.to_dense_mask() & region, block_m=64, block_n=64, seqlen_q=300,
                                          seqlen_kv=300)
    flagged = BlockLayout(clipped.kv_num_blocks, clipped.kv_indices, 64, 64, 300, 300, validate=False, in_region=True)
    assert torch.equal(flagged.selected_in_region(causal=True), clipped.selected_in_region(causal=True))
    counter = CountOps()
    with counter:
        flagged.selected_in_region(causal=True)
    assert sum(counter.ops.values()) == 1, dict(counter.ops)
