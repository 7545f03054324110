"""Patching transformers models (tiny random configs, CPU, offline): exactness, guard rails, capture."""

from __future__ import annotations

import sys

import pytest
import torch

from sparseattn.testing.tolerances import FP32_ATOL, FP32_LOOSE, FP32_RTOL, HALF_MODEL_REL  # noqa: E402

transformers = pytest.importorskip("transformers")

from sparseattn.integrations import (  # noqa: E402
    capture_qkv,
    get_handle,
    masked_sdpa_attention,
    patch_model,
    pattern_predictor,
    resolve_predictor,
    unpatch_model,
)
from sparseattn.layout import random_layout, sink_window_layout  # noqa: E402
from sparseattn.ops.reference import reference_attention  # noqa: E402
from sparseattn.testing.models import tiny_gemma3  # noqa: E402

N = 203  # not a block multiple


def _llama(attn: str = "sdpa", layers: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=96, intermediate_size=128, num_hidden_layers=layers,
                                   num_attention_heads=6, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=1024, attn_implementation=attn)
    return transformers.LlamaForCausalLM(cfg).eval()


def _ids(n: int = N, b: int = 1, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 97, (b, n), generator=g)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@torch.no_grad()
@pytest.mark.parametrize("backend", ["masked_sdpa", "reference"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_density_one_reproduces_unpatched_logits(backend: str, attn: str) -> None:
    model = _llama(attn)
    ids = _ids(b=2)
    ref = model(ids).logits
    with patch_model(model, pattern="dense:block_m=32,block_n=32", backend=backend) as h:
        out = model(ids).logits
        rep = h.sparsity_report()
    assert _rel(out, ref) <= FP32_LOOSE
    assert rep["counts"]["prefill_sparse"] == 3
    for layer in rep["layers"].values():
        assert layer["mode"] == "sparse" and layer["density"] == pytest.approx(1.0)
        assert layer["density_per_head"] == [1.0] * 6


@torch.no_grad()
def test_sparse_pattern_recorded_and_backends_agree() -> None:
    model = _llama()
    ids = _ids()
    ref = model(ids).logits
    spec = "sink_window:sink_blocks=1,window_blocks=2,block_m=32,block_n=32"
    outs = {}
    for backend in ("masked_sdpa", "reference"):
        with patch_model(model, pattern=spec, backend=backend, keep_layouts=True) as h:
            outs[backend] = model(ids).logits
            rep = h.sparsity_report()
            lay = h.layouts[1]
    expected = sink_window_layout(N, sink_blocks=1, window_blocks=2, block_m=32, block_n=32, heads=6).density(causal=True)
    assert rep["layers"]["1"]["density"] == pytest.approx(expected)
    assert lay.heads == 6 and lay.seqlen_q == N
    assert rep["layers"]["0"]["backends"] == ["reference"]
    assert _rel(outs["masked_sdpa"], outs["reference"]) <= FP32_ATOL
    assert _rel(outs["masked_sdpa"], ref) > 1e-3  # sparsity really changes the result


def test_masked_sdpa_matches_reference_with_empty_rows() -> None:
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 6, 150, 16, generator=g)
    k = torch.randn(2, 2, 150, 16, generator=g)
    v = torch.randn(2, 2, 150, 16, generator=g)
    lay = random_layout(150, density=0.3, block_m=32, block_n=32, batch=2, heads=6, causal=True, keep_diagonal=False,
                        seed=5)
    ref = reference_attention(q, k, v, causal=True, layout=lay).out
    out = masked_sdpa_attention(q, k, v, lay, chunk_rows=64)
    assert torch.allclose(out, ref, atol=FP32_ATOL, rtol=FP32_RTOL)


@torch.no_grad()
def test_generate_works_and_decode_is_dense() -> None:
    model = _llama()
    ids = _ids(60)
    ref = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with patch_model(model, pattern="dense") as h:
        out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        counts = dict(h.counts)
    assert torch.equal(out, ref)
    assert counts["prefill_sparse"] == 3 and counts["decode_dense"] == 3 * 5


def test_guard_rails() -> None:
    model = _llama()
    h = patch_model(model, pattern="dense")
    with pytest.raises(RuntimeError, match="already patched"):
        patch_model(model)
    h.unpatch()
    with pytest.raises(RuntimeError, match="torch.compile"):
        patch_model(torch.compile(model))
    with pytest.raises(ValueError, match="dense_layers"):
        patch_model(model, pattern="dense", dense_layers=[7])
    with pytest.raises(ValueError, match="mutually exclusive"):
        patch_model(model, pattern="dense", predictor="pattern:name=dense")
    with pytest.raises(ValueError, match="not patched"):
        unpatch_model(model)
    assert get_handle(model) is None


@torch.no_grad()
def test_unpatch_restores_model_exactly() -> None:
    model = _llama()
    ids = _ids()
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    before_impl = model.config._attn_implementation
    before_hooks = len(model._forward_pre_hooks)
    ref = model(ids).logits
    h = patch_model(model, pattern="sink_window:window_blocks=1,block_m=32,block_n=32")
    assert model.config._attn_implementation == "sparseattn"
    model(ids)
    h.unpatch()
    h.unpatch()  # idempotent
    assert model.config._attn_implementation == before_impl
    assert len(model._forward_pre_hooks) == before_hooks
    assert not any(hasattr(m, "_sparseattn_layer") for m in model.modules())
    assert get_handle(model) is None
    after = model.state_dict()
    assert all(torch.equal(before_state[k], after[k]) for k in before_state)
    assert torch.equal(model(ids).logits, ref)
    patch_model(model).unpatch()  # can patch again after unpatching


@torch.no_grad()
def test_padding_mask_rejected() -> None:
    model = _llama()
    ids = _ids(40, b=2)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    with patch_model(model, pattern="dense"):
        with pytest.raises(ValueError, match="attention_mask is not plain causal"):
            model(ids, attention_mask=mask)
        model(ids, attention_mask=torch.ones_like(ids))  # an all-ones mask is fine


@torch.no_grad()
def test_dense_layers_per_layer_and_per_head() -> None:
    model = _llama(layers=3)
    ids = _ids()
    spec = "sink_window:sink_blocks=1,window_blocks=1,block_m=32,block_n=32"
    with patch_model(model, pattern=spec, dense_layers=[0], per_layer={2: "dense"}, per_head={"1.4": "dense"}) as h:
        model(ids)
        rep = h.sparsity_report()
    assert [rep["layers"][str(i)]["mode"] for i in range(3)] == ["dense", "sparse", "dense"]
    ph = rep["layers"]["1"]["density_per_head"]
    assert ph[4] == pytest.approx(1.0) and ph[0] < 0.5
    assert rep["counts"]["prefill_dense"] == 2 and rep["counts"]["prefill_sparse"] == 1
    with pytest.raises(ValueError, match="per_head"):
        patch_model(model, pattern=spec, per_head={"0.9": "dense"})


@torch.no_grad()
def test_predictor_called_per_layer_and_reset_per_forward() -> None:
    calls: list = []

    class Recorder:
        name = "recorder"
        config = None

        def predict(self, q, k, *, causal=True, layer=None):
            calls.append((layer, tuple(q.shape), tuple(k.shape), causal))
            return sink_window_layout(q.shape[2], k.shape[2], heads=q.shape[1], block_m=32, block_n=32)

        def reset(self):
            calls.append("reset")

    model = _llama()
    with patch_model(model, predictor=Recorder()):
        model(_ids(70))
        model(_ids(70))
    assert calls[0] == "reset" and calls[4] == "reset"
    assert calls[1] == (0, (1, 6, 70, 16), (1, 2, 70, 16), True)  # GQA k unexpanded
    assert [c[0] for c in calls[1:4]] == [0, 1, 2]


@torch.no_grad()
def test_capture_roundtrip(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    model = _llama()
    ids = _ids(90)
    with capture_qkv(model, layers=[1]) as cap:
        ref = model(ids).logits
    assert model.config._attn_implementation == "sdpa" and get_handle(model) is None
    q, k, v = cap[1]["q"], cap[1]["k"], cap[1]["v"]
    assert q.shape == (1, 6, 90, 16) and k.shape == (1, 2, 90, 16) and v.shape == (1, 2, 90, 16)
    save_file({"layer1.q": q, "layer1.k": k, "layer1.v": v}, str(tmp_path / "s.safetensors"))
    back = load_file(str(tmp_path / "s.safetensors"))
    assert torch.equal(back["layer1.q"], q)
    # the captured tensors are what attention consumed: recomputing layer 1's attention from them matches
    attn = model.model.layers[1].self_attn
    seen = {}
    hook = attn.o_proj.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0].clone()))
    assert torch.equal(model(ids).logits, ref)
    hook.remove()
    out = reference_attention(q, k, v, causal=True, scale=attn.scaling).out
    assert torch.allclose(out.transpose(1, 2).reshape(1, 90, -1), seen["x"], atol=FP32_ATOL)


@torch.no_grad()
def test_capture_on_patched_model_keeps_sparsity() -> None:
    model = _llama()
    with patch_model(model, pattern="sink_window:window_blocks=1,block_m=32,block_n=32") as h:
        with capture_qkv(model) as cap:
            model(_ids())
        assert sorted(cap) == [0, 1, 2]
        assert h.counts["prefill_sparse"] == 3


def _qwen2_sliding():
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
                                   sliding_window=48, max_window_layers=2, max_position_embeddings=512)
    return transformers.Qwen2ForCausalLM(cfg).eval()


def _gemma3_sliding():
    return tiny_gemma3(sliding_window=48)


@torch.no_grad()
@pytest.mark.parametrize("make,sliding", [(_qwen2_sliding, [2, 3]), (_gemma3_sliding, [0, 2])])
def test_sliding_window_layers_run_exactly_on_our_path(make, sliding) -> None:
    model = make()
    ids = _ids(150)  # longer than the window (48): a layer that ignored the window would differ
    ref = model(ids).logits
    with patch_model(model, pattern="dense:block_m=32,block_n=32") as h:
        out = model(ids).logits
        rep = h.sparsity_report()
        calls = dict(h.counts)
    assert _rel(out, ref) <= FP32_LOOSE
    modes = {int(i): r["mode"] for i, r in rep["layers"].items()}
    assert [i for i, m in modes.items() if m == "window"] == sliding
    assert all(m == "sparse" for i, m in modes.items() if i not in sliding)
    assert calls["prefill_sparse"] == 4 and calls["prefill_dense"] == 0, calls
    for i in sliding:  # the band: well below the causal square at 150 tokens with a 48-token window
        assert 0 < rep["layers"][str(i)]["density"] < 0.9, rep["layers"][str(i)]
    # a window layer named in dense_layers runs the model's own attention, which gets its window mask back
    # (our mask builder skips it for the prefill): bitwise the unpatched logits
    with patch_model(model, pattern="sink_window:window_blocks=1,block_m=32,block_n=32",
                     dense_layers=list(range(4))) as h:
        assert torch.equal(model(ids).logits, ref)
        assert h.counts["prefill_sparse"] == 0 and h.counts["prefill_dense"] == 4


@torch.no_grad()
def test_window_layers_with_padding_use_the_models_attention() -> None:
    model = _gemma3_sliding()
    ids = _ids(150)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding: a window layer hands the mask to the model's own attention
    ref = model(ids, attention_mask=mask).logits
    with patch_model(model, pattern="dense:block_m=32,block_n=32", dense_layers=[1, 3]) as h:
        out = model(ids, attention_mask=mask).logits
    assert torch.equal(out, ref)
    assert h.counts["prefill_sparse"] == 0 and h.counts["prefill_dense"] == 4


def test_masked_sdpa_window_matches_an_explicit_mask() -> None:
    from sparseattn.layout.patterns import causal_layout

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 4, 150, 16, generator=g) for _ in range(3))
    k, v = k[:, :2], v[:, :2]
    lay = causal_layout(150, 150, block_m=32, block_n=32, heads=4)
    for w in (1, 7, 48, 149):
        out = masked_sdpa_attention(q, k, v, lay, sliding_window=w, chunk_rows=64)
        r = torch.arange(150)[:, None]
        c = torch.arange(150)[None, :]
        em = (c <= r) & (c > r - w)
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=em, enable_gqa=True)
        assert _rel(out, ref) <= FP32_ATOL, w


@torch.no_grad()
def test_dense_above_runs_dense_layers_above_the_crossover() -> None:
    model = _gemma3_sliding()
    ids = _ids(150)
    ref = model(ids).logits
    # every block selected (density 1) is above 0.9: the full layers run the model's attention, bitwise
    with patch_model(model, pattern="dense:block_m=32,block_n=32", dense_above=0.9) as h:
        out = model(ids).logits
        rep = h.sparsity_report()
    assert torch.equal(out, ref)
    assert h.dense_fallbacks == {1: 1, 3: 1}
    assert rep["layers"]["1"]["dense_fallbacks"] == 1 and rep["layers"]["1"]["density"] == 1.0
    # a sparse pattern below the crossover stays sparse
    with patch_model(model, pattern="sink_window:window_blocks=1,block_m=32,block_n=32", dense_above=0.9) as h:
        model(ids)
    assert h.dense_fallbacks == {} and h.counts["prefill_sparse"] == 4
    with pytest.raises(ValueError, match="dense_above"):
        patch_model(model, pattern="dense", dense_above=1.5)


def test_resolve_predictor_specs() -> None:
    p = resolve_predictor("pattern:name=sink_window,window_blocks=3,pv_threshold=5")
    assert p.config.name == "sink_window" and dict(p.config.kwargs) == {"window_blocks": 3}
    assert p.config.pv_threshold == 5
    q = pattern_predictor({"name": "sliding_window", "window_blocks": 2})
    assert q.predict(torch.zeros(1, 2, 130, 8), torch.zeros(1, 1, 130, 8)).heads == 2
    s = resolve_predictor("static:pattern=sink_window,window_blocks=8")
    assert s.predict(torch.zeros(1, 2, 130, 8), torch.zeros(1, 1, 130, 8)).heads == 2
    with pytest.raises(ValueError):
        pattern_predictor("nonexistent:window_blocks=2")


def test_integrations_import_is_light() -> None:
    import subprocess

    code = ("import sys, sparseattn.integrations, sparseattn.models, sparseattn.eval.end_to_end, sparseattn.eval.niah, "
            "sparseattn.eval.collect; print('transformers' in sys.modules, 'matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


@torch.no_grad()
def test_window_layers_on_the_triton_kernel_match_the_model() -> None:
    """The CUDA route (kernel under the interpreter here): band layout + token-level window, fp16."""
    torch.manual_seed(0)
    cfg = transformers.Gemma3TextConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                        num_attention_heads=2, num_key_value_heads=1, head_dim=64, sliding_window=48,
                                        layer_types=["sliding_attention", "full_attention"] * 2,
                                        max_position_embeddings=512)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # on CPU the kernel runs under the interpreter (conftest)
    model = transformers.Gemma3ForCausalLM(cfg).eval().to(device=dev, dtype=torch.float16)
    ids = _ids(150).to(dev)
    ref = model(ids).logits.float()
    with patch_model(model, pattern="dense:block_m=64,block_n=64", backend="triton") as h:
        out = model(ids).logits.float()
        rep = h.sparsity_report()
    assert {rep["layers"][str(i)]["mode"] for i in (0, 2)} == {"window"}
    assert all(rep["layers"][str(i)]["backends"] == ["triton"] for i in range(4))
    assert _rel(out, ref) <= HALF_MODEL_REL  # fp16 rounding of two attention implementations; a missing window is O(1)


def _tiny_llama_fp32():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return transformers.LlamaForCausalLM(cfg).eval()


@torch.no_grad()
@pytest.mark.parametrize("make,spec", [
    (_tiny_llama_fp32, "pattern:name=sink_window,window_blocks=2,block_m=32,block_n=32"),
    (_tiny_llama_fp32, "mean_sim:cdf_threshold=0.9,block_m=32,block_n=32"),
    (_gemma3_sliding, "pattern:name=dense,block_m=32,block_n=32"),  # window layers + full layers
])
def test_patched_model_compiles_fullgraph_without_breaks(make, spec) -> None:
    """torch.compile(fullgraph=True) of a patched model: predictor and attention are custom ops, no graph break."""
    import torch._dynamo

    model = make()
    ids = _ids(150)
    with patch_model(model, predictor=spec) as h:
        eager = model(ids, use_cache=False).logits
        torch._dynamo.reset()
        explained = torch._dynamo.explain(model)(ids, use_cache=False)
        assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        out = compiled(ids, use_cache=False).logits
        assert h.counts["prefill_sparse"] >= 2
    assert _rel(out, eager) <= FP32_ATOL
    torch._dynamo.reset()


def test_prefill_mask_skips_only_causal_and_sliding_windows() -> None:
    """Chunked attention (Llama 4) keeps its mask: only plain causal and true sliding windows are skipped."""
    from transformers.masking_utils import (causal_mask_function, chunked_causal_mask_function, sdpa_mask,
                                            sliding_window_causal_mask_function)

    from sparseattn.integrations.transformers_patch import _prefill_mask

    build = _prefill_mask(sdpa_mask)
    common = dict(batch_size=1, q_length=150, kv_length=150, q_offset=0, kv_offset=0, attention_mask=None,
                  allow_is_causal_skip=True, device="cpu")
    assert build(mask_function=causal_mask_function, local_size=None, **common) is None
    assert build(mask_function=sliding_window_causal_mask_function(48), local_size=48, **common) is None
    chunked = build(mask_function=chunked_causal_mask_function(48, torch.zeros(1, dtype=torch.long)), local_size=48,
                    **common)
    assert chunked is not None and not bool(chunked[0, 0, 48, 47])  # key 47 is in the previous chunk
    # a decode step is never touched
    step = dict(common, q_length=1, q_offset=149)
    assert build(mask_function=sliding_window_causal_mask_function(48), local_size=48, **step) is not None


def _packed_positions(lengths: list[int]) -> torch.Tensor:
    return torch.cat([torch.arange(n) for n in lengths])[None]


@torch.no_grad()
def test_packed_sequences_run_exact_document_masks() -> None:
    """position_ids restarting per sequence (transformers' packing, cache-free): the document mask on our path."""
    model = _llama()
    lengths = [70, 1, 52, 80]
    ids, pos = _ids(sum(lengths)), _packed_positions(lengths)
    ref = model(ids, position_ids=pos, use_cache=False).logits  # the dense model applies the packed mask itself
    with patch_model(model, pattern="dense:block_m=32,block_n=32") as h:
        got = model(ids, position_ids=pos, use_cache=False).logits
        assert h.counts["prefill_packed"] == 3 and h.counts["prefill_sparse"] == 3
    torch.testing.assert_close(got, ref, atol=FP32_LOOSE, rtol=FP32_LOOSE)
    # the document ids are computed once per forward and shared by its layers (and the exact layout with them)
    from sparseattn.integrations import packed as handle_mod  # the module whose _packed calls _packed_documents

    calls = []
    real = handle_mod._packed_documents
    with patch_model(model, pattern="dense:block_m=32,block_n=32"), \
            pytest.MonkeyPatch.context() as mp:
        mp.setattr(handle_mod, "_packed_documents", lambda *a: calls.append(1) or real(*a))
        again = model(ids, position_ids=pos, use_cache=False).logits
        assert len(calls) == 1
        model(ids, position_ids=pos, use_cache=False)
        assert len(calls) == 2  # a new forward: new ids
    torch.testing.assert_close(again, got, rtol=0, atol=0)
    # each sequence alone gives the same logits (no attention across documents)
    start = 0
    for n in lengths:
        alone = model(ids[:, start:start + n], use_cache=False).logits
        torch.testing.assert_close(got[:, start:start + n], alone, atol=FP32_LOOSE, rtol=FP32_LOOSE)
        start += n


@torch.no_grad()
def test_packed_sequences_with_a_sparse_pattern_do_not_leak_across_documents() -> None:
    model = _llama()
    lengths = [96, 107]
    ids, pos = _ids(sum(lengths)), _packed_positions(lengths)
    other = ids.clone()
    other[:, :96] = (other[:, :96] + 5) % 97  # another first document
    with patch_model(model, pattern="sink_window:window_blocks=2,block_m=32,block_n=32"):
        a = model(ids, position_ids=pos, use_cache=False).logits
        b = model(other, position_ids=pos, use_cache=False).logits
    torch.testing.assert_close(a[:, 96:], b[:, 96:], atol=0, rtol=0)  # a static layout: the second document is untouched
    assert not torch.equal(a[:, :96], b[:, :96])


def test_document_sink_blocks_give_every_document_its_own_sink() -> None:
    from sparseattn.integrations.masks import document_sink_blocks
    from sparseattn.layout.patterns import sink_window_layout

    N, bm = 200, 32  # documents [0, 70), [70, 71), [71, 200): the 3rd starts inside block 2
    docs = torch.tensor([[0] * 70 + [1] + [2] * 129])
    lay = sink_window_layout(N, sink_blocks=1, window_blocks=1, block_m=bm, block_n=bm, heads=2)
    got = document_sink_blocks(lay, docs).to_dense_mask()[0, 0]
    want = lay.to_dense_mask()[0, 0].clone()
    want[2, 2] = True  # rows 64..95 hold the starts of documents 1 (row 70) and 2 (row 71): both in block 2
    for qb in range(3, 7):
        want[qb, 71 // bm] = True  # the rows of document 2 get its first block as their sink
    assert torch.equal(got, want)
    assert torch.equal(document_sink_blocks(lay, docs).to_dense_mask()[0, 1], got)  # every head
    two = document_sink_blocks(lay, torch.cat([docs, torch.zeros_like(docs)]))  # one layout, two rows of documents
    assert two.kv_indices.shape[0] == 2 and torch.equal(two.to_dense_mask()[1], lay.to_dense_mask()[0])


@torch.no_grad()
def test_packed_documents_keep_their_sink_under_a_sparse_layout() -> None:
    """A sparse layout's sink is the row's first block; each later document gets its own (document_sink_blocks):
    with a sink + 1-block window pattern, the last document's logits equal that document run alone with it."""
    model = _llama()
    lengths = [96, 107]
    ids, pos = _ids(sum(lengths)), _packed_positions(lengths)
    pat = "sink_window:sink_blocks=1,window_blocks=1,block_m=32,block_n=32"
    with patch_model(model, pattern=pat):
        packed = model(ids, position_ids=pos, use_cache=False).logits
        alone = model(ids[:, 96:], use_cache=False).logits
    # alone, the document's sink is its first block and its window is block-aligned to its own start; packed at
    # offset 96 = 3 blocks of 32, the blocks line up, so the two runs attend to exactly the same keys
    torch.testing.assert_close(packed[:, 96:], alone, atol=FP32_LOOSE, rtol=FP32_LOOSE)


@torch.no_grad()
def test_padding_is_still_refused_with_position_ids() -> None:
    model = _llama()
    ids = _ids(40, b=2)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    with patch_model(model, pattern="dense"):
        with pytest.raises(ValueError, match="attention_mask is not plain causal"):
            model(ids, attention_mask=mask, position_ids=torch.arange(40)[None].expand(2, 40))


@torch.no_grad()
def test_packed_sequences_with_sliding_window_layers_stay_exact() -> None:
    """Packed documents in a model with sliding-window layers (Gemma-3 style): the window layers run the model's own
    attention with the packed mask, the global layers our document path; each document as if run alone."""
    model = _gemma3_sliding()  # 4 layers: 0 and 2 slide (window 48), 1 and 3 attend globally
    lengths = [90, 40, 70]  # documents longer and shorter than the window
    ids, pos = _ids(sum(lengths)), _packed_positions(lengths)
    alone = torch.cat([model(ids[:, sum(lengths[:i]):sum(lengths[:i + 1])], use_cache=False).logits
                       for i in range(len(lengths))], dim=1)
    with patch_model(model, pattern="dense:block_m=32,block_n=32") as h:
        got = model(ids, position_ids=pos, use_cache=False).logits
        assert h.counts["prefill_packed"] == 2 and h.counts["prefill_dense"] == 2  # the two window layers
        assert h.layer_modes == {0: "window", 1: "sparse", 2: "window", 3: "sparse"}
    torch.testing.assert_close(got, alone, atol=FP32_LOOSE, rtol=FP32_LOOSE)


@torch.no_grad()
def test_predicted_layer_density_leaves_out_window_layers() -> None:
    """``mean_density_predicted`` averages only the layers whose blocks the predictor chose: on a model with
    sliding-window layers their exact bands must not make the predictor look sparser than it is."""
    model = tiny_gemma3(sliding_window=24)
    with patch_model(model, pattern="dense:block_m=32,block_n=32", backend="masked_sdpa") as h:
        model(_ids(160))
        rep = h.sparsity_report()
    modes = {k: v["mode"] for k, v in rep["layers"].items()}
    assert modes == {"0": "window", "1": "sparse", "2": "window", "3": "sparse"}
    assert rep["mean_density_predicted"] == pytest.approx(1.0)  # every causal block of the full-attention layers
    window = [rep["layers"][k]["density"] for k in ("0", "2")]
    assert max(window) < 1.0  # exact bands
    assert rep["mean_density"] == pytest.approx((2.0 + sum(window)) / 4)  # they pull the all-layer mean down
    with patch_model(model, pattern="sink_window:window_blocks=1,block_m=32,block_n=32", backend="masked_sdpa") as h:
        model(_ids(160))
        rep = h.sparsity_report()
    full = [rep["layers"][k]["density"] for k in ("1", "3")]
    assert rep["mean_density_predicted"] == pytest.approx(sum(full) / 2)
    assert rep["mean_density_predicted"] < 1.0
