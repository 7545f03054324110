"""MixedKVCache: recent window in the model dtype, older tokens INT8/FP8, attention through the state operator."""

from __future__ import annotations

import re

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sparseattn.integrations.mixed_cache_attention import (ATTN_NAME_MIXED, enable_mixed_cache,  # noqa: E402
                                                           mixed_attention_forward)
from sparseattn.state.kv_cache import MixedKVCache, dequantize, quantize  # noqa: E402
from sparseattn.testing.harness import kernel_unavailable  # noqa: E402
from sparseattn.testing.models import tiny_gemma3, tiny_llama  # noqa: E402
from sparseattn.testing.tolerances import (FP32_ATOL, FP32_RTOL, FP64_ATOL, KV_CACHE_FP8_LOGIT_REL,  # noqa: E402
                                           KV_CACHE_INT8_LOGIT_REL, KV_CACHE_SMOOTHING_MIN_GAIN,
                                           KV_CACHE_SMOOTHING_NO_OFFSET_MAX, REF_FP32_OUT_ATOL)

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
    cache = MixedKVCache(model.config, window=16, quant=quant, sink_tokens=4)
    with _Count() as c:
        model(ids, past_key_values=cache, use_cache=True)
        logits = model(_ids(6, seed=2), past_key_values=cache, use_cache=True).logits
    assert c.calls == 2 * len(cache.layers)
    rep = cache.memory_report()
    # the prefill's 48 tokens: 32 left the window at the second step's update (the first 4 into the sink segment,
    # sink_tokens=4, the other 28 quantized); the 6 new ones are recent
    assert rep["sink_tokens"] == 4 * len(cache.layers) and rep["quantized_tokens"] == 28 * len(cache.layers)
    assert rep["recent_tokens"] == 22 * len(cache.layers)
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


# ---------------------------------------------------------------------------------------------- K smoothing
# The quantized segment stores k - mean (per batch row and KV head, fixed at the layer's first eviction); its
# lse gets scale·q·mean back before the merge with the recent window (state operator and decode kernel).


# the kernel route runs on CUDA when there is one (else the interpreter): these tests' tensors live there
TDEV = "cuda" if torch.cuda.is_available() else "cpu"


def _smoothing_inputs(B=2, H=4, Hkv=2, n=200, nq=6, D=64, offset=True, seed=0):
    """GQA queries/keys/values, batch rows and KV heads with different values; keys with large channel offsets."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, nq, D, generator=g)
    k = torch.randn(B, Hkv, n + nq, D, generator=g)
    v = torch.randn(B, Hkv, n + nq, D, generator=g)
    if offset:
        k[..., 3] += 50.0  # the outlier channel
        k[1, :, :, 5] -= 30.0  # another one in batch row 1 only
        k[:, 1, :, 9] += 20.0  # and on KV head 1
    return q.to(TDEV), k.to(TDEV), v.to(TDEV)


def _cache_attention(k, v, q, *, quant="int8", smooth=True, route="off", window=16, mask=None, sink=0,
                     sliding_window=None):  # smoothing / sink tests
    """The prefix, then the last N_q tokens, through one MixedKVCache layer and mixed_attention_forward."""
    model_cfg = tiny_llama(layers=1).config
    cache = MixedKVCache(model_cfg, window=window, quant=quant, smooth_keys=smooth, decode_backend=route,
                         sink_tokens=sink)
    layer = cache.layers[0]
    nq = q.shape[2]
    layer.update(k[:, :, :-nq], v[:, :, :-nq], mixed=True)
    kt, vt = layer.update(k[:, :, -nq:], v[:, :, -nq:], mixed=True)
    module = torch.nn.Module()  # no config: the geometry check is skipped
    out = mixed_attention_forward(module, q, kt, vt, mask, scaling=None, sliding_window=sliding_window)[0]
    return out.transpose(1, 2), cache


def _float_attention(q, k, v, mask=None):
    G = q.shape[1] // k.shape[1]
    nq, n = q.shape[2], k.shape[2]
    if mask is None:
        mask = torch.ones(nq, n, dtype=torch.bool, device=q.device).tril(n - nq)
    return torch.nn.functional.scaled_dot_product_attention(q.double(), k.double().repeat_interleave(G, 1),
                                                            v.double().repeat_interleave(G, 1), attn_mask=mask)


def _rel_err(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


_ROUTES = [pytest.param("off", id="state-operator"),
           pytest.param("triton", id="decode-kernel",
                        marks=pytest.mark.skipif(kernel_unavailable() is not None, reason=str(kernel_unavailable())))]


@torch.no_grad()
@pytest.mark.parametrize("route", _ROUTES)
@pytest.mark.parametrize("quant", ["int8", "fp8"])
def test_smoothing_is_exact_on_the_dequantised_smoothed_keys(route, quant):
    """(a) With smoothing, the cache's attention equals attention over the true keys it represents: the
    dequantised smoothed keys plus the mean (and the recent window), GQA and batch 2 — the correction is exact,
    only the quantization of k - mean remains. Both routes (the decode kernel under the interpreter)."""
    from sparseattn.integrations import mixed_cache_attention as mca

    q, k, v = _smoothing_inputs()
    out, cache = _cache_attention(k, v, q, quant=quant, route=route)
    layer = cache.layers[0]
    assert mca.LAST_DEQUANT[0] == ("decode_kernel" if route == "triton" else "torch")
    assert layer.k_mean is not None and layer.k_mean.shape == (2, 2, 1, 64) and layer.n_quant == 200 - 16
    # the mean is the channel mean of the keys held at the first eviction (the whole prompt here)
    torch.testing.assert_close(layer.k_mean, k[:, :, :200].mean(2, keepdim=True), rtol=FP32_RTOL, atol=FP32_ATOL)
    k_true = torch.cat([dequantize(layer.qk, layer.qk_scale, torch.float64) + layer.k_mean.double(),
                        layer.keys.double()], 2)
    v_true = torch.cat([dequantize(layer.qv, layer.qv_scale, torch.float64), layer.values.double()], 2)
    ref = _float_attention(q, k_true, v_true)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=REF_FP32_OUT_ATOL)
    # the cache's full KV (the fallback path) adds the mean back the same way
    fk, _ = layer.full_kv()
    torch.testing.assert_close(fk.double(), k_true, rtol=FP32_RTOL, atol=FP32_ATOL)


@torch.no_grad()
@pytest.mark.parametrize("route", _ROUTES)
@pytest.mark.parametrize("quant", ["int8", "fp8"])
def test_smoothing_reduces_the_error_of_offset_keys(route, quant):
    """(b)/(c) Keys with large per-channel offsets (channel 3 += 50, others per batch row / KV head): the
    per-token absmax scale is set by the offset, so without smoothing the other channels get a coarse step;
    with it the attention-output error against float attention drops by at least KV_CACHE_SMOOTHING_MIN_GAIN
    (GQA H=4 over H_kv=2, batch 2, each batch row checked on its own)."""
    q, k, v = _smoothing_inputs()
    ref = _float_attention(q, k, v)
    off, _ = _cache_attention(k, v, q, quant=quant, smooth=False, route=route)
    on, _ = _cache_attention(k, v, q, quant=quant, smooth=True, route=route)
    for b in range(2):
        e_off, e_on = _rel_err(off[b], ref[b]), _rel_err(on[b], ref[b])
        assert e_off >= KV_CACHE_SMOOTHING_MIN_GAIN[quant] * e_on, (b, e_off, e_on)
    # without offsets smoothing changes little either way (no regression beyond rounding of the quantization)
    q, k, v = _smoothing_inputs(offset=False, seed=1)
    ref = _float_attention(q, k, v)
    e_off = _rel_err(_cache_attention(k, v, q, quant=quant, smooth=False, route=route)[0], ref)
    e_on = _rel_err(_cache_attention(k, v, q, quant=quant, smooth=True, route=route)[0], ref)
    assert e_on <= KV_CACHE_SMOOTHING_NO_OFFSET_MAX * e_off, (e_off, e_on)


@torch.no_grad()
def test_smoothing_state_operator_shift_is_exact_with_masks_and_carried_state():
    """(a) The lse correction itself, without quantization (float64, lossless): segments stored as k - mean with
    ``k_means`` give the unsmoothed result (out and lse), with a float mask that masks whole rows (lse -inf
    stays -inf, out 0), causal + window, GQA, batch 2, and an incoming (out, lse) state."""
    from sparseattn.state.segmented import attention_over_segments, attention_with_state
    from sparseattn.state.types import AttentionState

    g = torch.Generator().manual_seed(3)
    B, H, Hkv, nq, D = 2, 4, 2, 5, 32
    q = torch.randn(B, H, nq, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, 70, D, generator=g, dtype=torch.float64)
    k[..., 3] += 40.0
    v = torch.randn(B, Hkv, 70, D, generator=g, dtype=torch.float64)
    mu = k[:, :, :40].mean(2, keepdim=True)
    cuts = [(0, 40), (40, 70)]
    mask = torch.zeros(B, 1, nq, 70, dtype=torch.float64)
    mask[:, :, :, 10:13] = -1.5
    mask[0, :, 1] = -float("inf")  # row 1 of batch row 0 attends nothing at all
    mask[1, :, 2, :40] = -float("inf")  # row 2 of batch row 1 attends nothing in the smoothed segment
    masks = [mask[..., a:b] for a, b in cuts]
    for kw in (dict(causal=False, attn_masks=masks), dict(causal=True, sliding_window=50)):
        ref = attention_over_segments(q, [k[:, :, a:b] for a, b in cuts], [v[:, :, a:b] for a, b in cuts], **kw)
        got = attention_over_segments(q, [k[:, :, :40] - mu, k[:, :, 40:]], [v[:, :, a:b] for a, b in cuts],
                                      k_means=[mu, None], **kw)
        torch.testing.assert_close(got.out, ref.out, rtol=0, atol=FP64_ATOL)
        torch.testing.assert_close(got.lse, ref.lse, rtol=0, atol=FP64_ATOL)
    got = attention_over_segments(q, [k[:, :, :40] - mu, k[:, :, 40:]], [v[:, :, a:b] for a, b in cuts],
                                  k_means=[mu, None], attn_masks=masks)
    assert bool(torch.isneginf(got.lse[0, :, 1]).all()) and bool((got.out[0, :, 1] == 0).all())
    # the smoothed segment last, continuing an incoming (out, lse) state; and a mean of shape (B, H_kv, D)
    first = attention_with_state(q, k[:, :, :40], v[:, :, :40], kv_len=70)
    ref = attention_with_state(q, k[:, :, 40:], v[:, :, 40:], state=AttentionState(first.out, first.lse), kv_offset=40)
    mu2 = k[:, :, 40:].mean(2)
    got = attention_with_state(q, k[:, :, 40:] - mu2[:, :, None], v[:, :, 40:],
                               state=AttentionState(first.out, first.lse), kv_offset=40, k_mean=mu2)
    torch.testing.assert_close(got.out, ref.out, rtol=0, atol=FP64_ATOL)
    torch.testing.assert_close(got.lse, ref.lse, rtol=0, atol=FP64_ATOL)


@torch.no_grad()
@pytest.mark.parametrize("route", _ROUTES)
def test_smooth_keys_false_is_the_previous_behaviour(route):
    """(e) smooth_keys=False: no mean, the keys quantized as they are, and the attention bitwise the previous
    computation (the state operator over the torch-dequantised segment) / the decode route's plain merge."""
    from sparseattn.ops.decode import decode_attention
    from sparseattn.state import merge_states
    from sparseattn.state.segmented import attention_over_segments

    q, k, v = _smoothing_inputs()
    out, cache = _cache_attention(k, v, q, smooth=False, route=route)
    layer = cache.layers[0]
    assert layer.k_mean is None and cache.memory_report()["mean_bytes"] == 0
    kq, ks = quantize(k[:, :, :200 - 16], "int8")
    vq, vs = quantize(v[:, :, :200 - 16], "int8")
    assert torch.equal(layer.qk, kq) and torch.equal(layer.qk_scale, ks)
    if route == "off":
        ref = attention_over_segments(q, [dequantize(kq, ks, torch.float32), k[:, :, 200 - 16:]],
                                      [dequantize(vq, vs, torch.float32), v[:, :, 200 - 16:]], causal=True).out
    else:
        a = decode_attention(q, kq, vq, k_scale=ks, v_scale=vs, causal=False, return_lse=True, backend="triton")
        b = decode_attention(q, k[:, :, 200 - 16:], v[:, :, 200 - 16:], return_lse=True, backend="triton")
        ref = merge_states([a, b], backend="triton").out  # the route merges with the fused kernel
    assert torch.equal(out, ref)


@torch.no_grad()
def test_smoothing_bytes_beam_ops_and_model():
    """The means are counted in memory_report (D float32 per layer, batch row and KV head), follow the batch
    through the beam helpers, and a tiny model's logits stay within the int8 bound with smoothing on."""
    q, k, v = _smoothing_inputs()
    _, cache = _cache_attention(k, v, q)
    rep = cache.memory_report()
    assert rep["smooth_keys"] is True and rep["mean_bytes"] == 2 * 2 * 64 * 4
    assert rep["bytes_used"] == rep["quantized_bytes"] + rep["scale_bytes"] + rep["mean_bytes"] + rep["recent_bytes"]
    layer = cache.layers[0]
    mu = layer.k_mean.clone()
    cache.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(layer.k_mean, mu.flip(0))
    layer.batch_select_indices(torch.tensor([1]))
    assert torch.equal(layer.k_mean, mu[:1]) and layer.qk.shape[0] == 1
    layer.k_mean = None
    with pytest.raises(ValueError, match="MixedKVCache: key mean is missing for a smoothed quantized segment"):
        layer.check_quantized()
    cache.reset()
    assert layer.k_mean is None and layer.n_quant == 0

    model = _llama()
    ids = _ids(48)
    ref_logits = model(torch.cat([ids, _ids(6, seed=2)], 1)).logits[:, -6:]
    enable_mixed_cache(model)
    cache = MixedKVCache(model.config, window=16, smooth_keys=True)
    assert cache.smooth_keys is True and MixedKVCache(model.config, window=16).smooth_keys is False  # off by default
    assert MixedKVCache(model.config, window=16).sink_tokens == 0  # no sink segment by default (docs/STATE.md: GPU agreement)
    model(ids, past_key_values=cache, use_cache=True)
    logits = model(_ids(6, seed=2), past_key_values=cache, use_cache=True).logits
    assert all(layer.k_mean is not None for layer in cache.layers)
    assert _rel_err(logits, ref_logits) < KV_CACHE_INT8_LOGIT_REL


def test_keys_contiguous_helper():
    """keys_contiguous: the same values in a (..., D, N) buffer viewed as (..., N, D); such a tensor comes back as is."""
    from sparseattn.state.kv_cache import keys_contiguous

    x = torch.randn(2, 3, 5, 4)
    y = keys_contiguous(x)
    assert torch.equal(y, x) and y.stride(-2) == 1 and y.stride(-1) == 5 and keys_contiguous(y) is y


def test_bad_smoothing_arguments():
    """(f) The project's error format for smooth_keys and k_mean."""
    from sparseattn.state.segmented import attention_with_state

    cfg = tiny_llama(layers=1).config
    for bad in (1, "yes", None):
        with pytest.raises(ValueError, match=r"^MixedKVCache: smooth_keys must be a bool; expected True or False, "
                                             rf"got {re.escape(repr(bad))}$"):
            MixedKVCache(cfg, smooth_keys=bad)
    q, k, v = torch.randn(1, 4, 2, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match=r"^attention_with_state: k_mean does not match q .*got \(1, 2, 15\)$"):
        attention_with_state(q, k, v, k_mean=torch.zeros(1, 2, 15))
    with pytest.raises(ValueError, match=r"^attention_with_state: k_mean must be a tensor; .*got float$"):
        attention_with_state(q, k, v, k_mean=1.0)
    with pytest.raises(ValueError, match=r"^attention_with_state: k_mean does not match k_seg's KV heads; "
                                         r"expected 2, got 1$"):
        attention_with_state(q, k, v, k_mean=torch.zeros(1, 1, 16))


# ---------------------------------------------------------------------------------------------- sink tokens
# The first ``sink_tokens`` tokens (the attention sink) stay in the model dtype as a third segment (sink,
# quantized, recent), attended on both routes and merged exactly; K smoothing applies only to the quantized one.


def _sink_reference(q, layer, sliding_window=None):
    """float64 attention over what the layer represents: the exact sink tokens, the dequantised quantized
    segment (+ its key mean) and the recent window."""
    ks, vs = [], []
    if layer.n_sink:
        ks.append(layer.sk.double())
        vs.append(layer.sv.double())
    if layer.n_quant:
        mu = 0.0 if layer.k_mean is None else layer.k_mean.double()
        ks.append(dequantize(layer.qk, layer.qk_scale, torch.float64) + mu)
        vs.append(dequantize(layer.qv, layer.qv_scale, torch.float64))
    k_true, v_true = torch.cat(ks + [layer.keys.double()], 2), torch.cat(vs + [layer.values.double()], 2)
    nq, n = q.shape[2], k_true.shape[2]
    mask = torch.ones(nq, n, dtype=torch.bool, device=q.device).tril(n - nq)
    if sliding_window is not None:
        mask &= ~torch.ones(nq, n, dtype=torch.bool, device=q.device).tril(n - nq - sliding_window)
    return _float_attention(q, k_true, v_true, mask=mask), k_true


@torch.no_grad()
@pytest.mark.parametrize("route", _ROUTES)
@pytest.mark.parametrize("smooth", [False, True], ids=["plain", "smoothed"])
@pytest.mark.parametrize("quant", ["int8", "fp8"])
def test_sink_segment_is_exact(route, smooth, quant):
    """The sink tokens are kept exactly (never quantized), the quantized segment holds the tokens between them and
    the recent window, and the attention equals float attention over the exact sink + dequantised old tokens
    (+ the key mean) + recent window: both routes, GQA (H=4 over H_kv=2), batch 2, with and without smoothing;
    the key mean leaves the sink tokens out."""
    from sparseattn.integrations import mixed_cache_attention as mca

    q, k, v = _smoothing_inputs()
    out, cache = _cache_attention(k, v, q, quant=quant, smooth=smooth, route=route, sink=4)
    layer = cache.layers[0]
    assert mca.LAST_DEQUANT[0] == ("decode_kernel" if route == "triton" else "torch")
    assert (layer.n_sink, layer.n_quant, layer.n_recent) == (4, 200 - 16 - 4, 16 + 6)
    assert layer.get_seq_length() == 206
    assert torch.equal(layer.sk, k[:, :, :4]) and torch.equal(layer.sv, v[:, :, :4])
    if smooth:
        torch.testing.assert_close(layer.k_mean, k[:, :, 4:200].mean(2, keepdim=True), rtol=FP32_RTOL, atol=FP32_ATOL)
    else:
        assert layer.k_mean is None
    ref, k_true = _sink_reference(q, layer)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=REF_FP32_OUT_ATOL)
    fk, fv = layer.full_kv()
    assert torch.equal(fk[:, :, :4], k[:, :, :4]) and torch.equal(fv[:, :, :4], v[:, :, :4])
    torch.testing.assert_close(fk.double(), k_true, rtol=FP32_RTOL, atol=FP32_ATOL)


@torch.no_grad()
@pytest.mark.parametrize("route", _ROUTES)
@pytest.mark.parametrize("sliding_window", [10, 30, 185, 198, 203])
def test_sink_segment_with_a_sliding_window(route, sliding_window):
    """A one-token step on a sliding-window layer: the window may end in the recent, quantized or sink segment
    (or cover everything); the routes agree with float attention over the represented keys."""
    q, k, v = _smoothing_inputs(nq=1)
    out, cache = _cache_attention(k, v, q, smooth=False, route=route, sink=4, sliding_window=sliding_window)
    layer = cache.layers[0]
    assert (layer.n_sink, layer.n_quant, layer.n_recent) == (4, 200 - 16 - 4, 17)
    ref, _ = _sink_reference(q, layer, sliding_window=sliding_window)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=REF_FP32_OUT_ATOL)


@torch.no_grad()
@pytest.mark.parametrize("route", _ROUTES)
@pytest.mark.parametrize("smooth", [False, True], ids=["plain", "smoothed"])
def test_sink_tokens_zero_is_the_previous_computation(route, smooth):
    """sink_tokens=0: no sink segment, the same quantized tokens and mean, and the attention bitwise the previous
    computation (two segments through the state operator / the decode route's two-state merge)."""
    from sparseattn.ops.decode import decode_attention
    from sparseattn.state import merge_states
    from sparseattn.state.segmented import attention_over_segments, key_mean_lse_shift
    from sparseattn.state.types import AttentionState

    q, k, v = _smoothing_inputs()
    out, cache = _cache_attention(k, v, q, smooth=smooth, route=route, sink=0)
    layer = cache.layers[0]
    assert layer.sk is None and layer.n_sink == 0 and cache.memory_report()["sink_bytes"] == 0
    mu = k[:, :, :200].to(torch.float32).mean(2, keepdim=True) if smooth else None
    if smooth:
        assert torch.equal(layer.k_mean, mu)
    old = k[:, :, :184] if mu is None else k[:, :, :184].to(torch.float32) - mu
    kq, ks = quantize(old, "int8")
    vq, vs = quantize(v[:, :, :184], "int8")
    assert torch.equal(layer.qk, kq) and torch.equal(layer.qk_scale, ks)
    if route == "off":
        ref = attention_over_segments(q, [dequantize(kq, ks, torch.float32), k[:, :, 184:]],
                                      [dequantize(vq, vs, torch.float32), v[:, :, 184:]], causal=True,
                                      k_means=[mu, None]).out
    else:
        a = decode_attention(q, kq, vq, k_scale=ks, v_scale=vs, causal=False, return_lse=True, backend="triton")
        if mu is not None:
            a = AttentionState(a.out, a.lse + key_mean_lse_shift(q, mu, None).to(a.lse.dtype))
        b = decode_attention(q, k[:, :, 184:], v[:, :, 184:], return_lse=True, backend="triton")
        ref = merge_states([a, b], backend="triton").out  # the route merges with the fused kernel
    assert torch.equal(out, ref)


@torch.no_grad()
def test_sink_larger_than_the_tokens_seen():
    """The sink segment fills from the evictions (until then its tokens are in the recent window): fed in chunks,
    it holds min(sink_tokens, tokens evicted so far) exact tokens; with a sink larger than the prompt nothing is
    quantized and the attention is float attention."""
    g = torch.Generator().manual_seed(5)
    B, Hkv, D = 2, 2, 64
    k, v = torch.randn(B, Hkv, 80, D, generator=g), torch.randn(B, Hkv, 80, D, generator=g)
    cache = MixedKVCache(tiny_llama(layers=1).config, window=16, sink_tokens=30, decode_backend="off")
    layer = cache.layers[0]
    seen = 0
    for step in (10, 10, 7, 20, 1, 32):
        evicted = max(0, seen - 16)
        layer.update(k[:, :, seen:seen + step], v[:, :, seen:seen + step], mixed=True)
        seen += step
        assert layer.n_sink == min(30, evicted) and layer.n_quant == max(0, evicted - 30), (seen, layer.n_sink)
        assert layer.get_seq_length() == seen
        if layer.n_sink:
            assert torch.equal(layer.sk, k[:, :, :layer.n_sink]) and torch.equal(layer.sv, v[:, :, :layer.n_sink])
    q = torch.randn(B, 4, 6, D, generator=g)
    out, cache = _cache_attention(k[:, :, :56], v[:, :, :56], q, sink=100, route="off")
    layer = cache.layers[0]
    assert layer.n_quant == 0 and layer.n_sink == 50 - 16 and layer.qk is None
    ref = _float_attention(q, k[:, :, :56], v[:, :, :56])
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=REF_FP32_OUT_ATOL)


@torch.no_grad()
def test_sink_bytes_beam_ops_and_reset():
    """memory_report counts the sink tokens as full-precision bytes (in bytes_used and in the unquantized
    total); the beam helpers move the sink segment with the batch; reset clears it."""
    q, k, v = _smoothing_inputs()
    _, cache = _cache_attention(k, v, q, sink=4, smooth=True)
    rep = cache.memory_report()
    assert rep["sink_tokens_max"] == 4 and rep["sink_tokens"] == 4 and rep["quantized_tokens"] == 180
    assert rep["sink_bytes"] == 2 * (2 * 2 * 4 * 64) * 4  # keys + values, B=2, H_kv=2, 4 tokens, D=64, float32
    assert rep["bytes_used"] == (rep["sink_bytes"] + rep["quantized_bytes"] + rep["scale_bytes"] + rep["mean_bytes"]
                                 + rep["recent_bytes"])
    assert rep["unquantized_bytes"] == 2 * (2 * 2 * 206 * 64) * 4
    layer = cache.layers[0]
    sk, sv = layer.sk.clone(), layer.sv.clone()
    cache.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(layer.sk, sk.flip(0)) and torch.equal(layer.sv, sv.flip(0))
    layer.batch_repeat_interleave(2)
    assert layer.sk.shape[0] == 4 and torch.equal(layer.sk[1], sk[1])
    layer.batch_select_indices(torch.tensor([3]))
    assert torch.equal(layer.sk, sk[:1]) and layer.qk.shape[0] == 1
    layer.sv = None
    with pytest.raises(ValueError, match=r"^MixedKVCache: sink segment is inconsistent"):
        layer.check_quantized()
    cache.reset()
    assert layer.sk is None and layer.sv is None and layer.n_sink == 0 and layer.get_seq_length() == 0


@torch.no_grad()
def test_sink_tokens_in_a_model_and_the_fallback():
    """A tiny model with sink_tokens: logits within the int8 bound, the sink kept exact, and the fallback path
    (another attention implementation) returns the full KV with the sink first."""
    model = _llama()
    ids = _ids(48)
    ref_logits = model(torch.cat([ids, _ids(6, seed=2)], 1)).logits[:, -6:]
    enable_mixed_cache(model)
    cache = MixedKVCache(model.config, window=16, sink_tokens=4)
    model(ids, past_key_values=cache, use_cache=True)
    logits = model(_ids(6, seed=2), past_key_values=cache, use_cache=True).logits
    assert all(layer.n_sink == 4 and layer.n_quant == 48 - 16 - 4 for layer in cache.layers)
    assert _rel_err(logits, ref_logits) < KV_CACHE_INT8_LOGIT_REL
    layer = cache.layers[0]
    fk, fv = layer.update(layer.keys[:, :, :0], layer.values[:, :, :0], mixed=False)
    assert fk.shape[2] == 54 and torch.equal(fk[:, :, :4], layer.sk) and torch.equal(fv[:, :, :4], layer.sv)


def test_bad_sink_tokens():
    """The project's error format for sink_tokens (as for window)."""
    cfg = tiny_llama(layers=1).config
    for bad in (-1, 1.5, True, "4", None):
        with pytest.raises(ValueError, match=r"^MixedKVCache: sink_tokens must be a non-negative integer; expected an "
                                             rf"int >= 0, got {re.escape(repr(bad))}$"):
            MixedKVCache(cfg, sink_tokens=bad)
    assert MixedKVCache(cfg, sink_tokens=0).sink_tokens == 0
