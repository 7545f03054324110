"""Keys-contiguous V caches in the decode kernel (``V_KEYS``; issue 14).

A V cache whose keys are contiguous -- a ``(B, H_kv, D, N)`` buffer viewed as ``(B, H_kv, N, D)``, so
``v.stride(-2) == 1`` -- is read as it is (no copy): the dense walk takes the range's whole tiles without load masks
and its partial last tile masked; the paged walk gathers keys along the contiguous axis. The output must equal the
plain layout's bit for bit on every input (same launch config), garbage beyond the lengths included. So must a
tile-blocked V (``kv_cache.tile_blocked``: ``(B, H_kv, N / T, D, T)``, read by the same walk tile by tile). Under
Triton's CPU interpreter without CUDA.
"""

from __future__ import annotations

import pytest
import torch

from sparseattn.ops.decode import decode_attention, decode_reference, paged_decode_attention
from sparseattn.state import kv_cache
from sparseattn.state.kv_cache import quantize
from sparseattn.testing.harness import (DECODE_LAYOUT_CASES, assert_same_state, decode_case_id, decode_quant_inputs,
                                        decode_tail_inputs, kernel_unavailable, node_generator)
from sparseattn.testing.tolerances import check_ratio

ON_GPU = torch.cuda.is_available()
DEV = "cuda" if ON_GPU else "cpu"
FP8_OK = (not ON_GPU) or torch.cuda.get_device_capability() >= (8, 9)
needs_kernel = pytest.mark.skipif(kernel_unavailable() is not None, reason=str(kernel_unavailable()))


def keys_contiguous(x: torch.Tensor) -> torch.Tensor:
    """The library's keys_contiguous, checked: keys contiguous, the same values."""
    y = kv_cache.keys_contiguous(x)
    assert y.stride(-2) == 1 and y.stride(-1) == x.shape[-2] and torch.equal(y, x)
    return y


def _cfg(**kw):
    return {"BLOCK_N": 32, "num_warps": 4, "num_stages": 1, **kw}




@needs_kernel
@pytest.mark.parametrize("case", DECODE_LAYOUT_CASES, ids=decode_case_id)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_keys_contiguous_v_equals_the_plain_layout_and_passes_the_reference(case, dtype, request):
    B, H, Hkv, Lq, N, D, lens, splits, causal = case
    g = node_generator(request)
    q = torch.randn(B, H, Lq, D, generator=g).to(dtype).to(DEV)
    k = torch.randn(B, Hkv, N, D, generator=g).to(dtype).to(DEV)
    v = torch.randn(B, Hkv, N, D, generator=g).to(dtype).to(DEV)
    sl = None if lens is None else torch.tensor(lens, dtype=torch.int32, device=DEV)
    kw = dict(seqlens=sl, num_splits=splits, causal=causal, return_lse=True, backend="triton", config=_cfg())
    plain = decode_attention(q, k, v, **kw)
    vk = decode_attention(q, k, keys_contiguous(v), **kw)
    assert_same_state(vk, plain)
    hd = torch.float32 if ON_GPU else torch.float64
    hi = decode_reference(q.to(hd), k.to(hd), v.to(hd), seqlens=sl, causal=causal)
    lo = decode_reference(q, k, v, seqlens=sl, causal=causal, upcast=False)
    check_ratio(vk.out, hi.out, lo.out, "out")


_VARIANTS = [(None, None), ("fp16", "dequant"), ("fp16", "fp16"), ("q8x2", "i8x2"), ("q8x2", "fp8")]
_QUANT_CASES = [(mode, v) for mode in ("int8", "fp8") for v in _VARIANTS
                if not ((mode == "fp8" and v[1] == "i8x2") or (mode == "int8" and v[1] == "fp8"))]


@needs_kernel
@pytest.mark.parametrize("mode,variant", _QUANT_CASES, ids=[f"{m}-qk-{v[0]}_pv-{v[1]}" for m, v in _QUANT_CASES])
def test_keys_contiguous_and_tile_blocked_v_on_quantized_caches(variant, mode, request):
    qk, pv = variant
    if mode == "fp8" and not FP8_OK:
        pytest.skip("float8 K/V need compute capability >= 8.9")
    q, kq, vq, ks, vs, sl = decode_quant_inputs(node_generator(request), mode, DEV)
    extra = {k: v for k, v in (("QK", qk), ("PV", pv)) if v is not None}
    kw = dict(k_scale=ks, v_scale=vs, seqlens=sl, num_splits=2, return_lse=True, backend="triton",
              config=_cfg(**extra))
    assert_same_state(decode_attention(q, kq, keys_contiguous(vq), **kw), decode_attention(q, kq, vq, **kw))
    # FULL_TILES in the config changes nothing for a keys-contiguous V (it walks whole tiles unmasked anyway)
    assert_same_state(decode_attention(q, kq, keys_contiguous(vq), **dict(kw, config=_cfg(FULL_TILES=True, **extra))),
          decode_attention(q, kq, vq, **kw))
    # tile-blocked V (below), the cache padded to whole tiles: 150 -> 160 keys, beyond every length
    kq, vq = _pad_keys(kq, 32), _pad_keys(vq, 32)
    ks, vs = (_pad_keys(t.reshape(*t.shape[:3], 1), 32, 1.0) for t in (ks, vs))
    kw = dict(kw, k_scale=ks, v_scale=vs)
    assert_same_state(decode_attention(q, kq, tile_blocked(vq, 32), **kw), decode_attention(q, kq, vq, **kw))


@needs_kernel
@pytest.mark.parametrize("mode", [None, "int8"])
def test_keys_contiguous_v_never_reads_beyond_seqlen(mode, request):
    """Garbage (NaN, inf, extremes, NaN scales) beyond each length never reaches the output; a NaN value inside a
    whole tile makes its KV group's rows NaN, as with the plain layout."""
    q, k, v, ks, vs, sl, lens = decode_tail_inputs(node_generator(request), mode, DEV)
    kw = dict(k_scale=ks, v_scale=vs, seqlens=sl, num_splits=3, return_lse=True, backend="triton", config=_cfg())
    clean = decode_attention(q, k, v, **kw)
    v2 = keys_contiguous(v)
    k2 = k.clone()
    vs2 = None if vs is None else vs.clone()
    for b, n in enumerate(lens):
        v2[b, :, n:] = float("nan") if mode is None else 127
        k2[b, :, n:] = float("inf") if mode is None else -128
        if vs2 is not None:
            vs2[b, :, n:] = float("nan")
    dirty = decode_attention(q, k2, v2, **dict(kw, v_scale=vs2))
    assert_same_state(dirty, clean)
    assert not bool(torch.isnan(dirty.out).any())
    v3 = keys_contiguous(v)
    v3[2, 1, 5] = float("nan") if mode is None else v3[2, 1, 5]
    if mode is not None:
        vs3 = vs.clone()
        vs3[2, 1, 5] = float("nan")
        kw = dict(kw, v_scale=vs3)
    assert_same_state(decode_attention(q, k, v3, **kw), decode_attention(q, k, v3.contiguous(), **kw))
    assert bool(torch.isnan(decode_attention(q, k, v3, **kw).out[2, 2:]).all())


@needs_kernel
@pytest.mark.parametrize("mode", [None, "int8"])
def test_keys_contiguous_v_in_the_paged_walk(mode, request):
    g = node_generator(request)
    q = torch.randn(2, 4, 1, 64, generator=g).to(torch.bfloat16).to(DEV)
    k = torch.randn(2, 2, 120, 64, generator=g)
    v = torch.randn(2, 2, 120, 64, generator=g)
    if mode is None:
        k, v = k.to(torch.bfloat16).to(DEV), v.to(torch.bfloat16).to(DEV)
        extra = {}
    else:
        (k, ks), (v, vs) = quantize(k, mode), quantize(v, mode)
        k, ks, v, vs = (t.to(DEV) for t in (k, ks, v, vs))
        extra = dict(k_scale=ks, v_scale=vs)
    pidx = torch.tensor([[[14, 0, 3, 7], [1, 2, 14, 9]], [[6, 0, 2, 1], [3, 4, 5, 6]]], dtype=torch.int32,
                        device=DEV)
    pnum = torch.tensor([[4, 3], [2, 4]], dtype=torch.int32, device=DEV)
    sl = torch.tensor([120, 50], dtype=torch.int32, device=DEV)
    kw = dict(page_size=8, seqlens=sl, num_splits=2, return_lse=True, backend="triton", config=_cfg(), **extra)
    assert_same_state(paged_decode_attention(q, k, keys_contiguous(v), pidx, pnum, **kw),
          paged_decode_attention(q, k, v, pidx, pnum, **kw))


# ------------------------------------------------------------------------- tile-blocked V: (B, H_kv, N / T, D, T)


def _pad_keys(x: torch.Tensor, tile: int, fill: float = 0.0) -> torch.Tensor:
    """``x`` (..., N, D) with ``fill`` keys appended up to a multiple of ``tile``."""
    n = x.shape[-2]
    extra = -n % tile
    if not extra:
        return x
    pad = torch.full((*x.shape[:-2], extra, x.shape[-1]), fill, dtype=x.dtype, device=x.device)
    return torch.cat([x, pad], dim=-2)


def tile_blocked(x: torch.Tensor, tile: int) -> torch.Tensor:
    """The library's tile_blocked, checked: key j, dim d of tile i at x[..., i * tile + j, d]; undone exactly."""
    from sparseattn.ops.decode import from_tile_blocked

    y = kv_cache.tile_blocked(x, tile)
    assert y.shape == (*x.shape[:-2], x.shape[-2] // tile, x.shape[-1], tile) and y.is_contiguous()
    torch.testing.assert_close(y[..., 1, 3, 5], x[..., tile + 5, 3], rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(from_tile_blocked(y), x, rtol=0, atol=0, equal_nan=True)
    return y


@needs_kernel
@pytest.mark.parametrize("case", DECODE_LAYOUT_CASES, ids=decode_case_id)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_tile_blocked_v_equals_the_plain_layout_and_passes_the_reference(case, dtype, request):
    """Padded to whole tiles (the padding past the lengths, or past N with explicit lengths), the tile-blocked V gives
    the plain layout's result bit for bit, and the reference backend reads it too."""
    B, H, Hkv, Lq, N, D, lens, splits, causal = case
    g = node_generator(request)
    q = torch.randn(B, H, Lq, D, generator=g).to(dtype).to(DEV)
    k = _pad_keys(torch.randn(B, Hkv, N, D, generator=g).to(dtype).to(DEV), 32, float("inf"))
    v = _pad_keys(torch.randn(B, Hkv, N, D, generator=g).to(dtype).to(DEV), 32, float("nan"))
    sl = torch.tensor(lens if lens is not None else [N] * B, dtype=torch.int32, device=DEV)
    kw = dict(seqlens=sl, num_splits=splits, causal=causal, return_lse=True, config=_cfg())
    plain = decode_attention(q, k, v, backend="triton", **kw)
    vt = tile_blocked(v, 32)
    assert_same_state(decode_attention(q, k, vt, backend="triton", **kw), plain)
    assert not bool(torch.isnan(plain.out).any())
    kw.pop("config")
    assert_same_state(decode_attention(q, k, vt, backend="reference", **kw),
                      decode_attention(q, k, v, backend="reference", **kw))
    hd = torch.float32 if ON_GPU else torch.float64
    hi = decode_reference(q.to(hd), k.to(hd), v.to(hd), seqlens=sl, causal=causal)
    lo = decode_reference(q, k, v, seqlens=sl, causal=causal, upcast=False)
    check_ratio(plain.out, hi.out, lo.out, "out")


@needs_kernel
def test_tile_blocked_v_takes_the_default_config_and_its_tile_as_block_n(request):
    """Without a config the launch walks the cache's tile (here 16, below any default BLOCK_N)."""
    q, k, v, _, _, sl, _ = decode_tail_inputs(node_generator(request), None, DEV)
    kw = dict(seqlens=sl, num_splits=2, return_lse=True, backend="triton")
    assert_same_state(decode_attention(q, k, tile_blocked(v, 16), **kw),
                      decode_attention(q, k, v, **dict(kw, config=dict(_cfg(), BLOCK_N=16))))


def test_tile_blocked_v_bad_input():
    q = torch.randn(1, 4, 1, 64, dtype=torch.bfloat16)
    k = torch.randn(1, 2, 64, 64, dtype=torch.bfloat16)
    v = torch.randn(1, 2, 64, 64, dtype=torch.bfloat16)
    vt = kv_cache.tile_blocked(v, 32)
    with pytest.raises(ValueError, match="tile_blocked: x has a key count that is not a multiple of the tile"):
        kv_cache.tile_blocked(v[:, :, :50], 32)
    with pytest.raises(ValueError, match="tile_blocked: tile must be a power of two"):
        kv_cache.tile_blocked(v, 48)
    with pytest.raises(ValueError, match="decode_attention: v_cache does not match k_cache as a tile-blocked V"):
        decode_attention(q, k[:, :, :32], vt, backend="reference")
    with pytest.raises(ValueError, match="decode_attention: v_cache is tile-blocked with an unsupported tile"):
        decode_attention(q, k, torch.zeros(1, 2, 8, 64, 8, dtype=torch.bfloat16), backend="reference")
    with pytest.raises(ValueError, match="decode_attention: v_cache is tile-blocked with tiles that are not contiguous"):
        decode_attention(q, k, vt.transpose(-1, -2).contiguous().transpose(-1, -2), backend="reference")
    with pytest.raises(ValueError, match="decode_attention: v_cache differs from k_cache in dtype or device"):
        decode_attention(q, k, vt.half(), backend="reference")
    if kernel_unavailable() is None:
        with pytest.raises(ValueError, match="decode_attention: config has a BLOCK_N other than the tile-blocked"):
            decode_attention(q.to(DEV), k.to(DEV), vt.to(DEV), backend="triton", config=_cfg(BLOCK_N=64))
    with pytest.raises(ValueError, match="paged_decode_attention: v_cache has the wrong rank"):  # dense walk only
        paged_decode_attention(q, k, vt, torch.zeros(1, 2, 1, dtype=torch.int32),
                               torch.ones(1, 2, dtype=torch.int32), page_size=32, backend="reference")
