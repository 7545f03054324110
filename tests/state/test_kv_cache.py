"""MixedKVCache: recent window in the model dtype, older tokens INT8/FP8, attention through the state operator."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sparseattn.integrations.mixed_cache_attention import (ATTN_NAME_MIXED, enable_mixed_cache,  # noqa: E402
                                                           mixed_attention_forward)
from sparseattn.state.kv_cache import MixedKVCache, dequantize, quantize  # noqa: E402
from sparseattn.testing.models import tiny_gemma3, tiny_llama  # noqa: E402
from sparseattn.testing.tolerances import KV_CACHE_FP8_LOGIT_REL, KV_CACHE_INT8_LOGIT_REL  # noqa: E402

_LOGIT_REL = {"int8": KV_CACHE_INT8_LOGIT_REL, "fp8": KV_CACHE_FP8_LOGIT_REL}

pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")


def _llama(seed=0, layers=2):
    return tiny_llama(seed=seed, layers=layers)


def _gemma3():
    return tiny_gemma3(sliding_window=24)


def _ids(n, b=1, seed=1):
    return torch.randint(0, 97, (b, n), generator=torch.Generator().manual_seed(seed))


class _Count:
    """Re-register the mixed attention function with a call counter (restored on exit)."""

    def __enter__(self):
        from transformers import AttentionInterface

        self.calls = 0

        def counted(*a, **kw):
            self.calls += 1
            return mixed_attention_forward(*a, **kw)

        AttentionInterface.register(ATTN_NAME_MIXED, counted)
        return self

    def __exit__(self, *exc):
        from transformers import AttentionInterface

        AttentionInterface.register(ATTN_NAME_MIXED, mixed_attention_forward)


@torch.no_grad()
@pytest.mark.parametrize("make", [_llama, _gemma3], ids=["llama", "gemma3-sliding"])
def test_generate_exact_when_nothing_is_quantized(make):
    model = make()
    ids = _ids(40)
    ref = model.generate(ids, max_new_tokens=10, do_sample=False)
    enable_mixed_cache(model)
    cache = MixedKVCache(model.config, window=1000)
    with _Count() as c:
        out = model.generate(ids, max_new_tokens=10, do_sample=False, past_key_values=cache)
    assert c.calls > 0  # attention went through sparseattn_mixed
    assert torch.equal(out, ref)
    assert cache.memory_report()["quantized_tokens"] == 0


@torch.no_grad()
@pytest.mark.parametrize("make", [_llama, _gemma3], ids=["llama", "gemma3-sliding"])
@pytest.mark.parametrize("quant", ["int8", "fp8"])
def test_generate_with_quantized_history(make, quant):
    model = make()
    ids = _ids(48)
    ref_logits = model(torch.cat([ids, _ids(6, seed=2)], 1)).logits[:, -6:]
    enable_mixed_cache(model)
    cache = MixedKVCache(model.config, window=16, quant=quant)
    with _Count() as c:
        model(ids, past_key_values=cache, use_cache=True)
        logits = model(_ids(6, seed=2), past_key_values=cache, use_cache=True).logits
    assert c.calls == 2 * len(cache.layers)
    rep = cache.memory_report()
    # the prefill's 48 tokens: 32 left the window at the second step's update; the 6 new ones are recent
    assert rep["quantized_tokens"] == 32 * len(cache.layers) and rep["recent_tokens"] == 22 * len(cache.layers)
    assert rep["bytes_saved"] > 0 and rep["ratio"] < 1.0
    rel = float((logits - ref_logits).abs().max() / ref_logits.abs().max())
    assert rel < _LOGIT_REL[quant], rel
    # generate() runs end to end on the mixed cache
    enable_mixed_cache(model)
    out = model.generate(ids, max_new_tokens=8, do_sample=False,
                         past_key_values=MixedKVCache(model.config, window=16, quant=quant))
    assert out.shape == (1, 56)


@torch.no_grad()
def test_padded_batch_matches_reference():
    model = _llama()
    ids = _ids(30, b=2)
    am = torch.ones(2, 30, dtype=torch.long)
    am[1, :7] = 0  # left padding
    ref = model.generate(ids, attention_mask=am, max_new_tokens=6, do_sample=False)
    enable_mixed_cache(model)
    out = model.generate(ids, attention_mask=am, max_new_tokens=6, do_sample=False,
                         past_key_values=MixedKVCache(model.config, window=1000))
    assert torch.equal(out, ref)


def test_quantize_roundtrip():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 17, 16, generator=g) * 3
    for mode, rel in (("int8", 0.5 / 127), ("fp8", 2 ** -3)):
        data, scales = quantize(x, mode)
        assert scales.shape == (2, 3, 17, 1) and scales.dtype == torch.float32
        y = dequantize(data, scales, torch.float32)
        amax = x.abs().amax(-1, keepdim=True)
        assert bool(((y - x).abs() <= rel * amax + 1e-6).all()), mode


@torch.no_grad()
def test_fallback_without_mixed_attention_warns_and_is_exact():
    model = _llama()
    ids = _ids(20)
    ref = model.generate(ids, max_new_tokens=5, do_sample=False)
    cache = MixedKVCache(model.config, window=1000)
    with pytest.warns(RuntimeWarning, match="not 'sparseattn_mixed'"):
        out = model.generate(ids, max_new_tokens=5, do_sample=False, past_key_values=cache)
    assert torch.equal(out, ref)


@torch.no_grad()
def test_bad_inputs():
    model, other = _llama(), _llama(seed=1, layers=3)
    enable_mixed_cache(model)
    enable_mixed_cache(other)
    cache = MixedKVCache(model.config, window=8)
    model(_ids(12), past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match="was built for another model|layer_idx is out of range"):
        other(_ids(3), past_key_values=cache, use_cache=True)
    twin = _llama(seed=5)  # same geometry, other weights: the layers are bound to the first model's modules
    enable_mixed_cache(twin)
    with pytest.raises(ValueError, match="is used by another model than the one that filled it"):
        twin(_ids(3), past_key_values=cache, use_cache=True)
    # a quantized segment without its scales
    model(_ids(12, seed=3), past_key_values=cache, use_cache=True)
    layer = cache.layers[0]
    assert layer.n_quant > 0
    layer.qk_scale = None
    with pytest.raises(ValueError, match="MixedKVCache: key scales are missing for a quantized segment"):
        model(_ids(1), past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match="dequantize: scales are missing for a quantized segment"):
        dequantize(layer.qk, None, torch.float32)
    with pytest.raises(ValueError, match="MixedKVCache: window must be a positive integer"):
        MixedKVCache(model.config, window=0)
    with pytest.raises(ValueError, match="MixedKVCache: quant is unknown"):
        MixedKVCache(model.config, quant="int4")


@torch.no_grad()
def test_kernel_route_passes_quantized_values_and_scales(monkeypatch):
    """When the kernel runs a layer, the quantized segment goes to it undequantised, with its scales.

    On the CPU the "auto" backend is the PyTorch loop, which dequantises the same way: logits equal
    the torch-dequantised route's.
    """
    from sparseattn.integrations import mixed_cache_attention as mca

    model = _llama()
    ids, nxt = _ids(40), _ids(3, seed=4)
    enable_mixed_cache(model)
    c1 = MixedKVCache(model.config, window=8)
    model(ids, past_key_values=c1, use_cache=True)
    ref = model(nxt, past_key_values=c1, use_cache=True).logits
    assert mca.LAST_DEQUANT[0] == "torch"
    monkeypatch.setattr(mca, "_kernel_runs", lambda query, layer: True)
    c2 = MixedKVCache(model.config, window=8)
    model(ids, past_key_values=c2, use_cache=True)
    out = model(nxt, past_key_values=c2, use_cache=True).logits
    assert mca.LAST_DEQUANT[0] == "kernel"
    assert torch.equal(out, ref)


@torch.no_grad()
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernel route of the mixed cache needs CUDA")
@pytest.mark.parametrize("quant", ["int8", "fp8"])
def test_gpu_kernel_dequantises(quant):
    """On CUDA (fp16, head_dim 64) the quantized segment goes to the Triton kernel (HAS_KV_SCALE)."""
    from sparseattn.integrations import mixed_cache_attention as mca

    if quant == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 K/V need sm_89+")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                                   max_position_embeddings=1024)
    model = transformers.LlamaForCausalLM(cfg).eval().to("cuda", torch.float16)
    ids, nxt = _ids(300).cuda(), _ids(4, seed=2).cuda()
    ref = model(torch.cat([ids, nxt], 1)).logits[:, -4:].float()
    enable_mixed_cache(model)
    # a 4-token step is a decode step: by default the decode kernels (tests/ops/test_decode_quant.py); with
    # decode_backend="off" the prefill kernel with the state (HAS_KV_SCALE)
    for decode_backend, where in (("off", "kernel"), ("auto", "decode_kernel")):
        cache = MixedKVCache(model.config, window=64, quant=quant, decode_backend=decode_backend)
        model(ids, past_key_values=cache, use_cache=True)
        out = model(nxt, past_key_values=cache, use_cache=True).logits.float()
        assert mca.LAST_DEQUANT[0] == where
        rel = float((out - ref).abs().max() / ref.abs().max())
        assert rel < _LOGIT_REL[quant], (decode_backend, rel)
    gen = model.generate(ids, max_new_tokens=8, do_sample=False,
                         past_key_values=MixedKVCache(model.config, window=64, quant=quant))
    assert gen.shape == (1, 308)
