"""Quantized K/V in the decode kernel (``k_scale`` / ``v_scale``) and the mixed cache's decode route.

The kernel (under Triton's CPU interpreter without CUDA; float8 e4m3 runs there too) is checked against
:func:`decode_reference` given the same quantized cache and scales (it dequantises in float32 / float64)
by the ratio rule; the reference against the plain reference on the dequantised cache (exact).
"""

from __future__ import annotations

import re
import types

import pytest
import torch

from sparseattn.ops.decode import (
    decode_attention,
    decode_refusal,
    decode_reference,
    pages_key_mask,
    paged_decode_attention,
)
from sparseattn.ops.pages import (
    page_summaries,
    sparse_decode_attention,
)
from sparseattn.state import merge_states
from sparseattn.state.kv_cache import quantize
from sparseattn.testing.harness import CountOps, kernel_unavailable, node_generator
from sparseattn.testing.tolerances import DECODE_SPLITS_ATOL, FP64_ATOL, MIXED_DECODE_ROUTE_FP32_LOGIT_REL, check_ratio

ON_GPU = torch.cuda.is_available()
DEV = "cuda" if ON_GPU else "cpu"
FP8_GPU_OK = (not ON_GPU) or torch.cuda.get_device_capability() >= (8, 9)


needs_kernel = pytest.mark.skipif(kernel_unavailable() is not None, reason=str(kernel_unavailable()))
_gen = node_generator


def _skip_fp8(mode):
    if mode == "fp8" and not FP8_GPU_OK:
        pytest.skip("float8 K/V need compute capability >= 8.9")


def _quant_inputs(B, H, Hkv, Lq, N, D, dtype, mode, gen):
    q = torch.randn(B, H, Lq, D, generator=gen).to(dtype).to(DEV)
    k = torch.randn(B, Hkv, N, D, generator=gen) * 1.5
    v = torch.randn(B, Hkv, N, D, generator=gen) + 0.5
    kq, ks = quantize(k, mode)
    vq, vs = quantize(v, mode)
    return q, kq.to(DEV), vq.to(DEV), ks.to(DEV), vs.to(DEV)


def _lens(xs):
    return torch.tensor(xs, dtype=torch.int32, device=DEV)


def _check(st, q, kq, vq, ks, vs, seqlens=None, causal=True, key_mask=None):
    hi_dtype = torch.float32 if ON_GPU else torch.float64
    hi = decode_reference(q.to(hi_dtype), kq, vq, k_scale=ks, v_scale=vs, seqlens=seqlens, causal=causal,
                          key_mask=key_mask)
    lo = decode_reference(q, kq, vq, k_scale=ks, v_scale=vs, seqlens=seqlens, causal=causal, key_mask=key_mask,
                          upcast=False)
    check_ratio(st.out, hi.out, lo.out, "out")
    check_ratio(st.lse, hi.lse.float(), lo.lse, "lse")


# ---------------------------------------------------------------------------------------------- reference


@pytest.mark.parametrize("mode", ["int8", "fp8"])
@pytest.mark.parametrize("causal", [True, False])
def test_reference_dequantises_exactly(mode, causal, request):
    """decode_reference with scales == decode_reference on the cache dequantised in float64 by hand."""
    q, kq, vq, ks, vs = (t.cpu() for t in _quant_inputs(2, 4, 2, 3, 40, 16, torch.float64, mode, _gen(request)))
    sl = torch.tensor([40, 9], dtype=torch.int32)
    st = decode_reference(q, kq, vq, k_scale=ks, v_scale=vs, seqlens=sl, causal=causal)
    kd, vd = kq.double() * ks.double(), vq.double() * vs.double()
    ref = decode_reference(q, kd, vd, seqlens=sl, causal=causal)
    assert torch.equal(st.out, ref.out) and torch.equal(st.lse, ref.lse)
    # (B, H_kv, N) scales are the same as (B, H_kv, N, 1)
    st2 = decode_reference(q, kq, vq, k_scale=ks.squeeze(-1), v_scale=vs.squeeze(-1), seqlens=sl, causal=causal)
    assert torch.equal(st2.out, st.out)


def test_reference_noncausal_rows_see_every_key(request):
    """causal=False: each of the Lq tokens attends all seqlen keys (the same row repeated for equal q)."""
    g = _gen(request)
    q1 = torch.randn(1, 2, 1, 16, generator=g, dtype=torch.float64)
    q = q1.expand(1, 2, 3, 16).contiguous()
    k, v = torch.randn(1, 1, 20, 16, generator=g, dtype=torch.float64), torch.randn(1, 1, 20, 16, generator=g,
                                                                                     dtype=torch.float64)
    st = decode_reference(q, k, v, causal=False)
    one = decode_reference(q1, k, v)
    assert torch.allclose(st.out, one.out.expand_as(st.out), rtol=0, atol=FP64_ATOL)


# ---------------------------------------------------------------------------------------------- kernel


CASES = [
    # B, H, Hkv, Lq, N, D, lens, splits, causal
    (1, 4, 4, 1, 96, 64, None, 1, True),
    (2, 8, 2, 1, 130, 64, [130, 37], 3, True),
    (2, 8, 2, 4, 100, 64, [100, 5], 1, True),
    (3, 4, 1, 4, 90, 64, [0, 1, 90], 2, True),
    (2, 8, 2, 4, 70, 128, [70, 33], 2, False),
    (1, 16, 1, 4, 64, 64, [64], 5, True),  # G*Lq = 64 rows: one full tile
]


@needs_kernel
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}H{c[1]}kv{c[2]}Lq{c[3]}N{c[4]}D{c[5]}s{c[7]}"
                         f"{'' if c[8] else '-noncausal'}")
@pytest.mark.parametrize("mode", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_kernel_matches_reference(case, mode, dtype, request):
    _skip_fp8(mode)
    B, H, Hkv, Lq, N, D, lens, splits, causal = case
    q, kq, vq, ks, vs = _quant_inputs(B, H, Hkv, Lq, N, D, dtype, mode, _gen(request))
    sl = None if lens is None else _lens(lens)
    st = decode_attention(q, kq, vq, k_scale=ks, v_scale=vs, seqlens=sl, num_splits=splits, causal=causal,
                          return_lse=True, backend="triton")
    assert st.out.dtype == dtype and st.lse.dtype == torch.float32
    _check(st, q, kq, vq, ks, vs, sl, causal)


@needs_kernel
@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_splits_agree_and_fp32_queries(mode, request):
    _skip_fp8(mode)
    q, kq, vq, ks, vs = _quant_inputs(2, 4, 2, 2, 150, 64, torch.float16, mode, _gen(request))
    sl = _lens([150, 61])
    one = decode_attention(q, kq, vq, k_scale=ks, v_scale=vs, seqlens=sl, num_splits=1, return_lse=True,
                           backend="triton")
    for s in (2, 5):
        st = decode_attention(q, kq, vq, k_scale=ks, v_scale=vs, seqlens=sl, num_splits=s, return_lse=True,
                              backend="triton")
        fin = torch.isfinite(one.lse)
        assert torch.equal(fin, torch.isfinite(st.lse))
        assert float((st.out.double() - one.out.double()).abs().max()) <= DECODE_SPLITS_ATOL[torch.float16]
    q32 = q.float()
    st = decode_attention(q32, kq, vq, k_scale=ks, v_scale=vs, seqlens=sl, num_splits=2, return_lse=True,
                          backend="triton")
    _check(st, q32, kq, vq, ks, vs, sl)


@needs_kernel
@pytest.mark.parametrize("mode", ["int8", "fp8"])
@pytest.mark.parametrize("splits", [1, 3])
def test_garbage_beyond_seqlen_is_never_read(mode, splits, request):
    """NaN scales (and, for fp8, NaN values) beyond each sequence's length never reach the output."""
    _skip_fp8(mode)
    q, kq, vq, ks, vs = _quant_inputs(3, 4, 2, 2, 96, 64, torch.float16, mode, _gen(request))
    lens = [0, 33, 96]
    sl = _lens(lens)
    clean = decode_attention(q, kq, vq, k_scale=ks, v_scale=vs, seqlens=sl, num_splits=splits, return_lse=True,
                             backend="triton")
    kq2, vq2, ks2, vs2 = kq.clone(), vq.clone(), ks.clone(), vs.clone()
    for b, n in enumerate(lens):
        ks2[b, :, n:] = float("nan")
        vs2[b, :, n:] = float("inf")
        if mode == "fp8":
            kq2[b, :, n:] = float("nan")
            vq2[b, :, n:] = float("nan")
        else:
            kq2[b, :, n:] = -128
            vq2[b, :, n:] = 127
    dirty = decode_attention(q, kq2, vq2, k_scale=ks2, v_scale=vs2, seqlens=sl, num_splits=splits, return_lse=True,
                             backend="triton")
    assert torch.equal(dirty.out, clean.out) and torch.equal(dirty.lse, clean.lse)
    assert not bool(torch.isnan(dirty.out).any())


@needs_kernel
def test_nan_fp8_value_inside_reaches_its_rows(request):
    """A NaN fp8 key inside the sequence makes its KV head's rows NaN (the other KV head is unaffected)."""
    _skip_fp8("fp8")
    if not ON_GPU:
        pytest.skip("Triton's interpreter converts the e4m3 NaN pattern to 480.0 (a GPU's cvt keeps NaN): GPU only")
    q, kq, vq, ks, vs = _quant_inputs(1, 4, 2, 1, 80, 64, torch.float16, "fp8", _gen(request))
    clean = decode_attention(q, kq, vq, k_scale=ks, v_scale=vs, num_splits=2, return_lse=True, backend="triton")
    kq2 = kq.clone()
    kq2[0, 1, 40, 3] = float("nan")
    st = decode_attention(q, kq2, vq, k_scale=ks, v_scale=vs, num_splits=2, return_lse=True, backend="triton")
    assert bool(torch.isnan(st.lse[0, 2:]).all()) and bool(torch.isnan(st.out[0, 2:]).all())
    assert torch.equal(st.out[0, :2], clean.out[0, :2])


@needs_kernel
@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_segments_merge_to_the_whole_cache(mode, request):
    """The mixed cache's decode math: quantized old keys (causal=False) + recent keys (causal), merged,
    equals decode over the concatenated, dequantised cache."""
    _skip_fp8(mode)
    g = _gen(request)
    B, H, Hkv, Lq, n_old, n_new, D = 2, 8, 2, 3, 70, 20, 64
    q = torch.randn(B, H, Lq, D, generator=g).half().to(DEV)
    k_old, v_old = torch.randn(B, Hkv, n_old, D, generator=g), torch.randn(B, Hkv, n_old, D, generator=g)
    kq, ks = quantize(k_old, mode)
    vq, vs = quantize(v_old, mode)
    kr = torch.randn(B, Hkv, n_new, D, generator=g).half().to(DEV)
    vr = torch.randn(B, Hkv, n_new, D, generator=g).half().to(DEV)
    kq, vq, ks, vs = kq.to(DEV), vq.to(DEV), ks.to(DEV), vs.to(DEV)
    a = decode_attention(q, kq, vq, k_scale=ks, v_scale=vs, causal=False, return_lse=True, backend="triton",
                         num_splits=2)
    b = decode_attention(q, kr, vr, return_lse=True, backend="triton")
    st = merge_states([a, b])
    hi_dtype = torch.float32 if ON_GPU else torch.float64
    kd, vd = (kq.to(hi_dtype) * ks.to(hi_dtype)), (vq.to(hi_dtype) * vs.to(hi_dtype))
    k_all, v_all = torch.cat([kd, kr.to(hi_dtype)], 2), torch.cat([vd, vr.to(hi_dtype)], 2)
    hi = decode_reference(q.to(hi_dtype), k_all, v_all)
    lo = decode_reference(q, k_all.half(), v_all.half(), upcast=False)
    check_ratio(st.out, hi.out, lo.out, "merged out")
    check_ratio(st.lse, hi.lse.float(), lo.lse, "merged lse")


@needs_kernel
@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_paged_quantized_matches_restricted_reference(mode, request):
    _skip_fp8(mode)
    q, kq, vq, ks, vs = _quant_inputs(2, 4, 2, 2, 120, 64, torch.float16, mode, _gen(request))
    sl = _lens([120, 50])
    ps = 8
    pidx = torch.tensor([[[14, 0, 3, 7], [1, 2, 14, 9]], [[6, 0, 2, 1], [3, 4, 5, 6]]], dtype=torch.int32,
                        device=DEV)
    pnum = torch.tensor([[4, 3], [2, 4]], dtype=torch.int32, device=DEV)
    st = paged_decode_attention(q, kq, vq, pidx, pnum, page_size=ps, seqlens=sl, k_scale=ks, v_scale=vs,
                                num_splits=2, return_lse=True, backend="triton")
    mask = pages_key_mask(pidx, pnum, ps, kq.shape[2])
    _check(st, q, kq, vq, ks, vs, sl, key_mask=mask)


@needs_kernel
def test_hot_path_reads_nothing_on_the_host(request):

    q, kq, vq, ks, vs = _quant_inputs(2, 4, 2, 2, 96, 64, torch.float16, "int8", _gen(request))
    sl = _lens([60, 10])

    def fn():
        return decode_attention(q, kq, vq, k_scale=ks, v_scale=vs, seqlens=sl, num_splits=2, backend="triton",
                                check_seqlens=False, causal=False)

    fn()
    counter = CountOps()
    with counter:
        fn()
    assert counter.ops.get("aten._local_scalar_dense.default", 0) == 0, dict(counter.ops)
    # no dequantised copy: a dequantisation needs a multiply and a dtype conversion; neither runs (the
    # interpreter's own copy_/set_ move the kernel's arguments to and from host buffers)
    assert not any(op.startswith(("aten.mul", "aten._to_copy", "aten.to")) for op in counter.ops), dict(counter.ops)


# ---------------------------------------------------------------------------------------------- bad inputs


def _bad_cases():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 1, 64, generator=g).half()
    k = torch.randn(1, 2, 32, 64, generator=g)
    kq, ks = quantize(k, "int8")
    vq, vs = quantize(k, "int8")
    kf, vf = quantize(k, "fp8")[0], quantize(k, "fp8")[0]
    return [
        ("missing scales", dict(q=q, k=kq, v=vq), "k_scale/v_scale are missing for a quantized cache"),
        ("one scale", dict(q=q, k=kq, v=vq, k_scale=ks), "k_scale/v_scale are missing for a quantized cache"),
        ("int8 K, fp16 V", dict(q=q, k=kq, v=k.half(), k_scale=ks, v_scale=vs), "v_cache.dtype is not a quantized dtype"),
        ("fp16 K with scales", dict(q=q, k=k.half(), v=k.half(), k_scale=ks, v_scale=vs),
         "k_cache.dtype is not a quantized dtype"),
        ("int8 K, fp8 V", dict(q=q, k=kq, v=vf, k_scale=ks, v_scale=vs), "k_cache/v_cache dtypes must be equal"),
        ("scale shape", dict(q=q, k=kq, v=vq, k_scale=ks[:, :, :5], v_scale=vs), "k_scale does not match the cache"),
        ("scale heads", dict(q=q, k=kq, v=vq, k_scale=ks, v_scale=vs[:, :1]), "v_scale does not match the cache"),
        ("scale dtype", dict(q=q, k=kq, v=vq, k_scale=ks.half(), v_scale=vs), "k_scale.dtype is not supported"),
        ("scale not a tensor", dict(q=q, k=kf, v=kf, k_scale=1.0, v_scale=vs), "k_scale must be a tensor"),
        ("int8 q", dict(q=q.to(torch.int8), k=kq, v=vq, k_scale=ks, v_scale=vs), "q.dtype is not supported"),
        ("causal", dict(q=q, k=kq, v=vq, k_scale=ks, v_scale=vs, causal=1), "causal must be a bool"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
@pytest.mark.parametrize("fn", ["decode_attention", "decode_reference"])
def test_bad_inputs_raise_value_error(case, fn):
    _, kw, msg = case
    kw = dict(kw)
    q, k, v = kw.pop("q"), kw.pop("k"), kw.pop("v")
    f = decode_attention if fn == "decode_attention" else decode_reference
    with pytest.raises(ValueError, match=f"^{fn}: " + re.escape(msg)):
        f(q, k, v, **kw)


def test_paged_bad_scales_and_sparse_refuses_quantized():
    q = torch.randn(1, 4, 1, 64).half()
    kq, ks = quantize(torch.randn(1, 2, 32, 64), "int8")
    pidx = torch.zeros(1, 2, 1, dtype=torch.int32)
    pnum = torch.ones(1, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="^paged_decode_attention: k_scale/v_scale are missing"):
        paged_decode_attention(q, kq, kq, pidx, pnum, page_size=8)
    with pytest.raises(ValueError, match="^paged_decode_attention: v_scale does not match the cache"):
        paged_decode_attention(q, kq, kq, pidx, pnum, page_size=8, k_scale=ks, v_scale=ks[:, :, :3])
    summ = page_summaries(torch.randn(1, 2, 32, 64).half(), 8)
    with pytest.raises(ValueError, match="^sparse_decode_attention: k_cache holds quantized values"):
        sparse_decode_attention(q, kq, kq, summ, top_pages=2)


def test_fp8_refused_below_sm89(monkeypatch):
    """float8 K/V on a GPU below compute capability 8.9: decode_refusal names the reason; backend='triton'
    raises NotImplementedError with it (int8 stays allowed). A stand-in CUDA query (no GPU needed)."""
    from sparseattn.ops import triton_launch

    monkeypatch.setattr(triton_launch, "device_refusal", lambda q, what="": None)
    monkeypatch.setattr(triton_launch, "_capability", lambda dev: (8, 0))
    fake_q = types.SimpleNamespace(dtype=torch.bfloat16, shape=(1, 4, 1, 128), is_cuda=True,
                                   device=torch.device("cpu"))
    why = decode_refusal(fake_q, torch.float8_e4m3fn)
    assert why is not None and "compute capability >= 8.9" in why and "8.0" in why
    assert decode_refusal(fake_q, torch.int8) is None
    assert decode_refusal(fake_q) is None


# ---------------------------------------------------------------------------------------------- the mixed cache

transformers = pytest.importorskip("transformers")


def _llama64(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                   max_position_embeddings=512)
    return transformers.LlamaForCausalLM(cfg).eval()


def _gemma64():
    torch.manual_seed(0)
    cfg = transformers.Gemma3TextConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, head_dim=64, sliding_window=20,
                                        layer_types=["sliding_attention", "full_attention"],
                                        max_position_embeddings=512)
    return transformers.Gemma3ForCausalLM(cfg).eval()


def _ids(n, b=1, seed=1):
    return torch.randint(0, 97, (b, n), generator=torch.Generator().manual_seed(seed))


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@needs_kernel
@torch.no_grad()
@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
@pytest.mark.filterwarnings("ignore:sparseattn_mixed. a decode step did not take:RuntimeWarning")  # gemma's window
@pytest.mark.parametrize("make", [_llama64, _gemma64], ids=["llama", "gemma3-sliding"])
@pytest.mark.parametrize("quant", ["int8", "fp8"])
@pytest.mark.parametrize("sink", [0, 4], ids=["no-sink", "sink4"])
def test_mixed_cache_decode_route_same_tokens(make, quant, sink):
    """Greedy generation through the decode route (the decode kernels, interpreter on the CPU) gives the tokens
    of the state-operator path (decode_backend='off', the behaviour before the route existed); the route is
    taken for every decode step; a 3-token step with transformers' causal mask takes it too, logits within
    MIXED_DECODE_ROUTE_FP32_LOGIT_REL. With ``sink_tokens=4`` the route attends the sink segment too (three
    states merged)."""
    from sparseattn.integrations import mixed_cache_attention as mca
    from sparseattn.integrations.mixed_cache_attention import enable_mixed_cache
    from sparseattn.state.kv_cache import MixedKVCache

    if ON_GPU:
        pytest.skip("CPU test (float32 tiny model; the GPU route is covered by tests/state/test_kv_cache.py)")
    model = make()
    enable_mixed_cache(model)
    ids, nxt = _ids(44), _ids(3, seed=2)
    res = {}
    for be in ("off", "triton"):
        cache = MixedKVCache(model.config, window=8, quant=quant, decode_backend=be, sink_tokens=sink)
        out = model.generate(ids, max_new_tokens=6, do_sample=False, past_key_values=cache)
        steps = dict(cache.attention_counts)
        logits = model(nxt, past_key_values=cache, use_cache=True).logits
        res[be] = (out, logits, steps, dict(cache.attention_counts), dict(cache.decode_fallbacks))
        if be == "triton":
            assert mca.LAST_DEQUANT[0] == "decode_kernel"
        assert all(layer.n_sink == sink for layer in cache.layers)
    off, on = res["off"], res["triton"]
    assert torch.equal(on[0], off[0])
    n_layers = model.config.num_hidden_layers
    assert off[2] == {"decode_kernel": 0, "segments": 6 * n_layers}
    assert on[2] == {"decode_kernel": 5 * n_layers, "segments": n_layers}  # the prefill keeps the state operator
    if make is _llama64:  # the 3-token step too (transformers' mask is plain causal)
        assert on[3]["decode_kernel"] == 6 * n_layers and on[4] == {}, on
    else:  # the 3-token step on the sliding layer (window 20 < 53 keys) falls back, the full layer takes the route
        assert on[3]["decode_kernel"] == 5 * n_layers + 1, on
        assert list(on[4].values()) == [1] and next(iter(on[4])).startswith("sliding_window"), on
    assert _rel(on[1], off[1]) < MIXED_DECODE_ROUTE_FP32_LOGIT_REL


@needs_kernel
@torch.no_grad()
@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
def test_mixed_cache_auto_on_cpu_and_padding_fallback():
    """'auto' on the CPU keeps the state operator (unchanged behaviour); a padded batch's decode steps with
    decode_backend='triton' fall back (counted, warned once) and still give the reference tokens."""
    from sparseattn.integrations import mixed_cache_attention as mca
    from sparseattn.integrations.mixed_cache_attention import enable_mixed_cache
    from sparseattn.state.kv_cache import MixedKVCache

    if ON_GPU:
        pytest.skip("CPU test")
    model = _llama64()
    ids = _ids(30, b=2)
    am = torch.ones(2, 30, dtype=torch.long)
    am[1, :7] = 0
    ref = model.generate(ids, attention_mask=am, max_new_tokens=4, do_sample=False)
    enable_mixed_cache(model)
    cache = MixedKVCache(model.config, window=1000)
    out = model.generate(ids, attention_mask=am, max_new_tokens=4, do_sample=False, past_key_values=cache)
    assert torch.equal(out, ref) and cache.attention_counts["decode_kernel"] == 0
    mca._WARNED.clear()
    cache = MixedKVCache(model.config, window=1000, decode_backend="triton")
    with pytest.warns(RuntimeWarning, match="did not take the decode-kernel route .attention_mask"):
        out = model.generate(ids, attention_mask=am, max_new_tokens=4, do_sample=False, past_key_values=cache)
    assert torch.equal(out, ref)
    assert cache.attention_counts["decode_kernel"] == 0
    assert sum(cache.decode_fallbacks.values()) == 3 * model.config.num_hidden_layers, cache.decode_fallbacks
    with pytest.raises(ValueError, match="MixedKVCache: decode_backend is unknown"):
        MixedKVCache(model.config, decode_backend="cuda")


@needs_kernel
@torch.no_grad()
@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
def test_mixed_cache_decode_route_reads_nothing_on_the_host(monkeypatch):
    """A one-token decode step's route (both decode calls and the merge) makes no host read."""

    from sparseattn.integrations import mixed_cache_attention as mca
    from sparseattn.integrations.mixed_cache_attention import enable_mixed_cache
    from sparseattn.state.kv_cache import MixedKVCache

    if ON_GPU:
        pytest.skip("CPU test")

    model = _llama64()
    enable_mixed_cache(model)
    cache = MixedKVCache(model.config, window=8, quant="int8", decode_backend="triton")
    model(_ids(30), past_key_values=cache, use_cache=True)
    model(_ids(1, seed=3), past_key_values=cache, use_cache=True)  # compiles / warms up the route
    counter = CountOps()
    orig = mca._decode_step
    results = []

    def counted(*a, **kw):
        with counter:
            out = orig(*a, **kw)
        results.append(out is not None)
        return out

    monkeypatch.setattr(mca, "_decode_step", counted)
    model(_ids(1, seed=4), past_key_values=cache, use_cache=True)
    assert results == [True] * model.config.num_hidden_layers
    assert counter.ops.get("aten._local_scalar_dense.default", 0) == 0, dict(counter.ops)
