"""patch_model(decode="kernel" | "sparse"): decode steps of a patched model through sparseattn's decode kernels.

Tiny random float32 models on the CPU (on CUDA when the machine has it); ``decode_backend="triton"`` runs the
Triton decode kernels (under the interpreter on the CPU: tests/conftest.py sets TRITON_INTERPRET), ``"reference"``
the PyTorch reference. The cache goes in as ``past_key_values`` (``cache`` only exists from transformers 5.24).
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sparseattn.integrations import get_handle, patch_model  # noqa: E402
from sparseattn.integrations.decode_route import SUMMARY_ATTR  # noqa: E402
from sparseattn.ops.pages import page_summaries  # noqa: E402
from sparseattn.testing.harness import CountOps  # noqa: E402
from sparseattn.testing.models import tiny_gemma3  # noqa: E402
from sparseattn.testing.tolerances import DECODE_ROUTE_FP32_LOGIT_REL as TOL  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")

LAYERS = 2
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _llama(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=128, intermediate_size=128, num_hidden_layers=LAYERS,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                   max_position_embeddings=1024)
    return transformers.LlamaForCausalLM(cfg).eval().to(DEV)


def _gemma3():
    return tiny_gemma3(sliding_window=24).to(DEV)


def _ids(n: int, b: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 97, (b, n), generator=torch.Generator().manual_seed(seed)).to(DEV)


def _cache(model):
    return transformers.DynamicCache(config=model.config)


@torch.no_grad()
def _steps(model, prompt: int = 150, steps: int = 4, cache=None):
    """Prefill, ``steps`` one-token greedy steps, then a 4-token and a 3-token step (a causal mask is given)."""
    ids = _ids(prompt)
    cache = _cache(model) if cache is None else cache
    logits = []
    out = model(ids, past_key_values=cache)
    for _ in range(steps):
        out = model(out.logits[:, -1:].argmax(-1), past_key_values=cache)
        logits.append(out.logits[:, -1])
    for n in (4, 3):
        out = model(ids[:, :n], past_key_values=cache)
        logits.append(out.logits)
    return logits, cache


def _rel(got: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    return max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(got, ref))


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("mode", ["kernel", "sparse"])
def test_decode_route_matches_dense_decode(mode, backend):
    model = _llama()
    ref, _ = _steps(model)
    kw = {"decode_top_pages": 1.0} if mode == "sparse" else {}
    with patch_model(model, decode=mode, decode_backend=backend, **kw) as h:
        got, cache = _steps(model)
        rep = h.sparsity_report()
    assert _rel(got, ref) <= TOL
    calls = LAYERS * 6
    assert h.counts[f"decode_{mode}"] == calls and h.counts["decode_dense"] == 0, h.counts
    assert h.decode_fallbacks == {}
    assert rep["decode"]["mode"] == mode and rep["decode"]["backends"] == {"0": [backend], "1": [backend]}
    if mode == "sparse":
        # one build after the prefill, then incremental updates; the kept summaries equal a fresh computation
        assert h.decode_stats == {"summary_builds": LAYERS, "summary_updates": LAYERS * 5}
        store = getattr(cache, SUMMARY_ATTR)
        for layer in range(LAYERS):
            keys = cache.layers[layer].keys
            fresh = page_summaries(keys, 16)
            assert torch.equal(store[layer].summ.kmin, fresh.kmin) and torch.equal(store[layer].summ.kmax, fresh.kmax)
            assert store[layer].n == keys.shape[2] == 150 + 4 + 4 + 3


def test_sparse_decode_with_few_pages_changes_the_result():
    model = _llama()
    ref, _ = _steps(model, prompt=300)
    with patch_model(model, decode="sparse", decode_top_pages=2, decode_backend="reference") as h:
        got, _ = _steps(model, prompt=300)
    assert h.counts["decode_sparse"] == LAYERS * 6
    assert _rel(got, ref) > TOL  # 2 of 19+ pages: the route really attends a subset


def test_sparse_summaries_are_rebuilt_for_a_new_or_cropped_cache():
    model = _llama()

    def crop_step(cache):
        cache.crop(-5)  # same cache object, 5 keys fewer
        with torch.no_grad():
            return model(_ids(1, seed=3), past_key_values=cache).logits

    _, ref_cache = _steps(model, steps=2)
    ref = crop_step(ref_cache)
    with patch_model(model, decode="sparse", decode_top_pages=1.0, decode_backend="reference") as h:
        _, cache = _steps(model, steps=2)
        assert h.decode_stats == {"summary_builds": LAYERS, "summary_updates": LAYERS * 3}
        _steps(model, steps=2)  # a new cache: built again
        assert h.decode_stats["summary_builds"] == 2 * LAYERS
        got = crop_step(cache)  # the old cache, cropped: its summaries must not be reused
        assert h.decode_stats["summary_builds"] == 3 * LAYERS
        store = getattr(cache, SUMMARY_ATTR)
        fresh = page_summaries(cache.layers[0].keys, 16)
        assert torch.equal(store[0].summ.kmin, fresh.kmin) and torch.equal(store[0].summ.kmax, fresh.kmax)
    assert _rel([got], [ref]) <= TOL


def test_default_keeps_the_models_dense_decode():
    model = _llama()
    with patch_model(model) as h:
        _steps(model, steps=2)
        rep = h.sparsity_report()
    assert h.counts["decode_dense"] == LAYERS * 4 and h.counts["decode_kernel"] == h.counts["decode_sparse"] == 0
    assert rep["decode"] == {"mode": "dense", "fallbacks": {}, "backends": {}}
    assert h.decode_route is None


def test_decode_layers_subset():
    model = _llama()
    ref, _ = _steps(model, steps=2)
    with patch_model(model, decode="kernel", decode_layers=[1], decode_backend="reference") as h:
        got, _ = _steps(model, steps=2)
    assert h.counts["decode_kernel"] == 4 and h.counts["decode_dense"] == 4
    assert set(h.decode_backends) == {1}
    assert _rel(got, ref) <= TOL


@torch.no_grad()
def test_padding_mask_goes_to_the_models_attention():
    model = _llama()
    ids = _ids(40, b=2)
    mask = torch.ones(2, 40, dtype=torch.long, device=DEV)
    mask[1, :7] = 0  # left padding in the second sequence

    def run():
        cache = _cache(model)
        out = model(ids, attention_mask=mask, past_key_values=cache)
        m = torch.cat([mask, torch.ones(2, 1, dtype=torch.long, device=DEV)], dim=1)
        out = model(out.logits[:, -1:].argmax(-1), attention_mask=m, past_key_values=cache)
        return out.logits

    ref = run()
    with patch_model(model, decode="sparse", decode_top_pages=1, decode_backend="reference") as h:
        got = run()
    assert h.decode_fallbacks == {"attention_mask": LAYERS} and h.counts["decode_sparse"] == 0
    assert h.counts["decode_dense"] == LAYERS
    assert torch.equal(got, ref)


@pytest.mark.parametrize("mode", ["kernel", "sparse"])
def test_gemma3_window_layers_run_exact_dense_decode(mode):
    model = _gemma3()
    ref, _ = _steps(model, prompt=60)
    kw = {"decode_top_pages": 1.0} if mode == "sparse" else {}
    with patch_model(model, decode=mode, **kw) as h:
        got, _ = _steps(model, prompt=60)
    assert _rel(got, ref) <= TOL
    # 2 window layers x 4 one-token steps on the kernel; the multi-token steps over more keys than the window go
    # to the model's attention; the 2 full layers take the route on every step
    assert h.counts["decode_window"] == 2 * 4, h.counts
    assert h.decode_fallbacks == {"sliding_window": 2 * 2}
    assert h.counts[f"decode_{mode}"] == 2 * 6


@pytest.mark.parametrize("kwargs, match", [
    ({"decode": "fast"}, "decode is unknown"),
    ({"decode": "sparse", "decode_top_pages": 0}, "decode_top_pages must be a page count or a fraction"),
    ({"decode": "sparse", "decode_top_pages": 1.5}, "decode_top_pages"),
    ({"decode": "sparse", "decode_page_size": 0}, "decode_page_size must be a positive integer"),
    ({"decode": "kernel", "decode_top_pages": 0.1}, "applies to decode='sparse' only"),
    ({"decode": "kernel", "decode_backend": "cuda"}, "decode_backend is unknown"),
    ({"decode": "dense", "decode_backend": "triton"}, "applies to decode='kernel' or 'sparse' only"),
    ({"decode": "kernel", "decode_layers": [0, 7]}, "decode_layers has an unknown layer index"),
])
def test_bad_decode_arguments(kwargs, match):
    model = _llama()
    with pytest.raises(ValueError, match=match):
        patch_model(model, **kwargs)
    assert get_handle(model) is None and model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("mode", ["kernel", "sparse"])
def test_decode_steps_make_no_host_reads(mode):
    """A decode step of the patched model (Triton kernels, summary update included) reads nothing on the host."""
    model = _llama()
    ids = _ids(150)
    kw = {"decode_top_pages": 0.3} if mode == "sparse" else {}
    with patch_model(model, decode=mode, decode_backend="triton", **kw) as h, torch.no_grad():
        cache = _cache(model)
        model(ids, past_key_values=cache)
        model(ids[:, :1], past_key_values=cache)  # first step: summaries built, kernels compiled
        counter = CountOps()
        with counter:
            model(ids[:, 1:2], past_key_values=cache)
        assert h.counts[f"decode_{mode}"] == 2 * LAYERS
    assert counter.ops.get("aten._local_scalar_dense.default", 0) == 0, dict(counter.ops)
    if mode == "sparse":
        assert h.decode_stats["summary_updates"] == LAYERS


@torch.no_grad()
def test_sparse_step_keeps_every_page_of_its_new_tokens():
    """A 4-token step after 30 cached tokens straddles pages 1 and 2 (page size 16): both stay selected with page 0,
    so with the minimum budget all 3 pages are read and the step equals dense decode."""
    model = _llama()
    ids = _ids(34)

    def run():
        cache = _cache(model)
        model(ids[:, :30], past_key_values=cache)
        return model(ids[:, 30:], past_key_values=cache).logits

    ref = run()
    with patch_model(model, decode="sparse", decode_top_pages=1, decode_backend="reference") as h:
        got = run()
    assert h.counts["decode_sparse"] == LAYERS
    assert _rel([got], [ref]) <= TOL
