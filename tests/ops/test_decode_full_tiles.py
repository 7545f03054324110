"""The decode kernel's unmasked loop over whole tiles (launch-config ``FULL_TILES``; issue 14).

With ``FULL_TILES`` the dense (not paged) split kernel loads K, V and their scales without element masks: in a
range's partial last tile the columns past the range re-read the range's last key, and their scores stay masked.
So the output must equal the masked launch's bit for bit on every input, garbage beyond the lengths included.
Under Triton's CPU interpreter without CUDA.
"""

from __future__ import annotations

import pytest
import torch

from sparseattn.ops.decode import decode_attention, decode_reference, paged_decode_attention
from sparseattn.ops.launch_configs import DecodeLaunchConfig
from sparseattn.testing.harness import (DECODE_LAYOUT_CASES, assert_same_state, decode_case_id, decode_quant_inputs,
                                        decode_tail_inputs, kernel_unavailable, node_generator)
from sparseattn.testing.tolerances import check_ratio

ON_GPU = torch.cuda.is_available()
DEV = "cuda" if ON_GPU else "cpu"
FP8_OK = (not ON_GPU) or torch.cuda.get_device_capability() >= (8, 9)
needs_kernel = pytest.mark.skipif(kernel_unavailable() is not None, reason=str(kernel_unavailable()))


def _cfg(full: bool, **kw):
    return {"BLOCK_N": 32, "num_warps": 4, "num_stages": 1, "FULL_TILES": full, **kw}




@needs_kernel
@pytest.mark.parametrize("case", DECODE_LAYOUT_CASES, ids=decode_case_id)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
def test_full_tiles_equal_the_masked_launch_and_pass_the_reference(case, dtype, request):
    B, H, Hkv, Lq, N, D, lens, splits, causal = case
    g = node_generator(request)
    q = torch.randn(B, H, Lq, D, generator=g).to(dtype).to(DEV)
    k = torch.randn(B, Hkv, N, D, generator=g).to(dtype).to(DEV)
    v = torch.randn(B, Hkv, N, D, generator=g).to(dtype).to(DEV)
    sl = None if lens is None else torch.tensor(lens, dtype=torch.int32, device=DEV)
    kw = dict(seqlens=sl, num_splits=splits, causal=causal, return_lse=True, backend="triton")
    masked = decode_attention(q, k, v, config=_cfg(False), **kw)
    full = decode_attention(q, k, v, config=_cfg(True), **kw)
    assert_same_state(full, masked)
    hd = torch.float32 if ON_GPU else torch.float64
    hi = decode_reference(q.to(hd), k.to(hd), v.to(hd), seqlens=sl, causal=causal)
    lo = decode_reference(q, k, v, seqlens=sl, causal=causal, upcast=False)
    check_ratio(full.out, hi.out, lo.out, "out")


_VARIANTS = [(None, None), ("fp16", "dequant"), ("fp16", "fp16"), ("q8x2", "i8x2"), ("q8", "dequant"), ("q8x2", "fp8"),
             ("fp16", "fp16w")]
# every variant on the cache formats it exists for (PV="i8x2", "fp16w": int8 caches only; PV="fp8": float8 only)
_QUANT_CASES = [(mode, v) for mode in ("int8", "fp8") for v in _VARIANTS
                if not ((mode == "fp8" and v[1] in ("i8x2", "fp16w")) or (mode == "int8" and v[1] == "fp8"))]


@needs_kernel
@pytest.mark.parametrize("mode,variant", _QUANT_CASES, ids=[f"{m}-qk-{v[0]}_pv-{v[1]}" for m, v in _QUANT_CASES])
def test_full_tiles_equal_the_masked_launch_on_quantized_caches(variant, mode, request):
    qk, pv = variant
    if mode == "fp8" and not FP8_OK:
        pytest.skip("float8 K/V need compute capability >= 8.9")
    q, kq, vq, ks, vs, sl = decode_quant_inputs(node_generator(request), mode, DEV)
    extra = {k: v for k, v in (("QK", qk), ("PV", pv)) if v is not None}
    kw = dict(k_scale=ks, v_scale=vs, seqlens=sl, num_splits=2, return_lse=True, backend="triton")
    masked = decode_attention(q, kq, vq, config=_cfg(False, **extra), **kw)
    full = decode_attention(q, kq, vq, config=_cfg(True, **extra), **kw)
    assert_same_state(full, masked)


@needs_kernel
@pytest.mark.parametrize("mode", [None, "int8"])
def test_full_tiles_never_read_beyond_seqlen_and_keep_nan_inside(mode, request):
    """Garbage (NaN, extremes, NaN scales) beyond each length never reaches the output; a NaN key inside a
    full tile makes its KV group's rows NaN, as in the masked launch."""
    q, k, v, ks, vs, sl, lens = decode_tail_inputs(node_generator(request), mode, DEV)
    kw = dict(k_scale=ks, v_scale=vs, seqlens=sl, num_splits=3, return_lse=True, backend="triton",
              config=_cfg(True))
    clean = decode_attention(q, k, v, **kw)
    k2, v2 = k.clone(), v.clone()
    ks2 = None if ks is None else ks.clone()
    vs2 = None if vs is None else vs.clone()
    for b, n in enumerate(lens):
        if mode is None:
            k2[b, :, n:] = float("nan")
            v2[b, :, n:] = float("inf")
        else:
            k2[b, :, n:] = -128
            v2[b, :, n:] = 127
            ks2[b, :, n:] = float("nan")
            vs2[b, :, n:] = float("inf")
    dirty = decode_attention(q, k2, v2, **dict(kw, k_scale=ks2, v_scale=vs2))
    assert torch.equal(dirty.out, clean.out) and torch.equal(dirty.lse, clean.lse)
    assert not bool(torch.isnan(dirty.out).any())
    # a NaN key at position 5 of sequence 2 (inside its first full tile): that KV head's rows are NaN
    k3 = k.clone()
    if mode is None:
        k3[2, 1, 5] = float("nan")
    else:
        ks3 = ks.clone()
        ks3[2, 1, 5] = float("nan")
        kw = dict(kw, k_scale=ks3)
    full = decode_attention(q, k3, v, **kw)
    masked = decode_attention(q, k3, v, **dict(kw, config=_cfg(False)))
    assert_same_state(full, masked)
    assert bool(torch.isnan(full.out[2, 2:]).all()) and not bool(torch.isnan(full.out[2, :2]).any())


@needs_kernel
def test_full_tiles_leave_the_paged_kernel_as_it_is(request):
    g = node_generator(request)
    q = torch.randn(2, 4, 1, 64, generator=g).to(torch.float16).to(DEV)
    k = torch.randn(2, 2, 120, 64, generator=g).to(torch.float16).to(DEV)
    v = torch.randn(2, 2, 120, 64, generator=g).to(torch.float16).to(DEV)
    pidx = torch.tensor([[[14, 0, 3, 7], [1, 2, 14, 9]], [[6, 0, 2, 1], [3, 4, 5, 6]]], dtype=torch.int32,
                        device=DEV)
    pnum = torch.tensor([[4, 3], [2, 4]], dtype=torch.int32, device=DEV)
    sl = torch.tensor([120, 50], dtype=torch.int32, device=DEV)
    kw = dict(page_size=8, seqlens=sl, num_splits=2, return_lse=True, backend="triton")
    assert_same_state(paged_decode_attention(q, k, v, pidx, pnum, config=_cfg(True), **kw),
          paged_decode_attention(q, k, v, pidx, pnum, config=_cfg(False), **kw))


@needs_kernel
def test_full_tiles_config_round_trip_and_bad_values():
    c = DecodeLaunchConfig(128, 4, 3, full_tiles=True)
    assert c.to_dict() == {"BLOCK_N": 128, "num_warps": 4, "num_stages": 3, "FULL_TILES": True}
    assert DecodeLaunchConfig.from_dict(c.to_dict()) == c
    assert "FULL_TILES" not in DecodeLaunchConfig(128, 4, 3).to_dict()
    with pytest.raises(ValueError, match="DecodeLaunchConfig: full_tiles must be a bool or None"):
        DecodeLaunchConfig(128, 4, 3, full_tiles=1)
    q = torch.zeros(1, 2, 1, 64, device=DEV)
    k = torch.zeros(1, 2, 40, 64, device=DEV)
    with pytest.raises(ValueError, match="decode_attention: config has a bad FULL_TILES"):
        decode_attention(q, k, k, backend="triton", config=_cfg("yes"))


def test_the_int8_entries_take_full_tiles_and_the_others_do_not():
    """The shipped tuned file: FULL_TILES where it was measured faster (the int8 cache on the H100 and, since the
    twenty-seventh session, on the H200) and nowhere else."""
    from sparseattn.ops.decode import _default_config

    for dev in ("NVIDIA H100 80GB HBM3", "NVIDIA H200"):
        cfg = _default_config(128, 16, False, device=dev, kv="int8")
        assert cfg.get("FULL_TILES") is True and cfg["QK"] == "fp16"
    assert "FULL_TILES" not in _default_config(128, 16, False, device="NVIDIA H200")
    assert "FULL_TILES" not in _default_config(128, 16, False, device="NVIDIA H100 80GB HBM3")
    assert "FULL_TILES" not in _default_config(128, 16, False, paged=True, device="NVIDIA H100 80GB HBM3", kv="int8")
