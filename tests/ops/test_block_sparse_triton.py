"""Parity of the Triton block-sparse forward kernel with the reference (ratio rule).

Without CUDA the kernel runs under Triton's CPU interpreter: ``tests/conftest.py`` sets
``TRITON_INTERPRET=1`` before triton is imported; ``backend="auto"`` still uses the reference for CPU
tensors, so only these tests (``backend="triton"`` / the launcher) run the interpreter.

bf16 under the interpreter: Triton's interpreter computes bf16 ``tl.dot`` wrongly, so the launcher
widens bf16 operands to fp32 there (exact products, fp32 accumulation — what the GPU's bf16 MMA
computes up to summation order). The native bf16 path is covered by ``benchmarks/gpu_parity.py``.
"""

from __future__ import annotations

import math

import pytest
import torch

from sparseattn.layout.block_layout import BlockLayout
from sparseattn.layout.patterns import causal_layout, dense_layout, random_layout
from sparseattn.ops.reference import reference_attention
from sparseattn.testing.harness import kernel_unavailable, node_seed
from sparseattn.testing.tolerances import check_ratio

pytest.importorskip("triton", reason="triton is not installed")

ON_GPU = torch.cuda.is_available()
DEV = "cuda" if ON_GPU else "cpu"
if kernel_unavailable() is not None:
    pytest.skip(kernel_unavailable(), allow_module_level=True)


def _fwd(*args, **kwargs):
    from sparseattn.ops.triton_launch import block_sparse_fwd

    return block_sparse_fwd(*args, **kwargs)
_seed = node_seed


def _qkv(B, H, Hkv, Nq, Nkv, D, dtype, gen, spread=1.0):
    def r(*shape):
        return (torch.randn(*shape, generator=gen) * spread).to(dtype).to(DEV)

    return r(B, H, Nq, D), r(B, Hkv, Nkv, D), r(B, Hkv, Nkv, D)


def _refs(q, k, v, layout, causal, scale=None, pv_threshold=None):
    hi_dtype = torch.float32 if ON_GPU else torch.float64
    hi_stats, lo_stats = {}, {}
    hi = reference_attention(q.to(hi_dtype), k.to(hi_dtype), v.to(hi_dtype), layout=layout, causal=causal, scale=scale,
                             pv_threshold=pv_threshold, stats=hi_stats)
    lo = reference_attention(q, k, v, layout=layout, causal=causal, scale=scale, upcast=False,
                             pv_threshold=pv_threshold, stats=lo_stats)
    return hi, lo, hi_stats


def _check(q, k, v, layout, causal, **kw):
    out, lse = _fwd(q, k, v, layout=layout, causal=causal, **kw)
    hi, lo, _ = _refs(q, k, v, layout, causal, scale=kw.get("scale"))
    check_ratio(out, hi.out, lo.out, "out")
    check_ratio(lse, hi.lse, lo.lse, "lse")
    return out, lse


# (B, H, H_kv, N_q, N_kv, D, dtype, causal, block_m, block_n, density)
CASES = {
    "fp16-noncausal-odd": (2, 4, 2, 150, 200, 64, torch.float16, False, 64, 64, 0.5),
    "fp16-causal-odd": (2, 4, 2, 150, 150, 64, torch.float16, True, 64, 64, 0.5),
    "bf16-noncausal": (1, 4, 2, 130, 190, 64, torch.bfloat16, False, 64, 64, 0.5),
    "bf16-causal": (1, 4, 2, 190, 190, 64, torch.bfloat16, True, 64, 64, 0.6),
    "gqa1": (1, 2, 2, 100, 100, 64, torch.float16, True, 64, 64, 0.7),
    "gqa3": (1, 3, 1, 100, 140, 64, torch.float16, False, 64, 64, 0.7),
    "gqa4": (1, 4, 1, 120, 120, 64, torch.float16, True, 64, 64, 0.7),
    "gqa8": (1, 8, 1, 70, 90, 64, torch.float16, True, 64, 64, 0.7),
    "causal-nq<nkv": (1, 2, 1, 70, 300, 64, torch.float16, True, 64, 64, 0.6),
    "causal-nq>nkv": (1, 2, 1, 300, 70, 64, torch.float16, True, 64, 64, 1.0),
    "d128": (1, 2, 1, 100, 130, 128, torch.float16, True, 64, 64, 0.7),
    "d256": (1, 2, 1, 100, 130, 256, torch.float16, True, 64, 64, 0.7),
    "d256-bf16": (1, 2, 2, 90, 100, 256, torch.bfloat16, False, 64, 64, 0.7),
    "density0": (1, 2, 1, 100, 100, 64, torch.float16, True, 64, 64, 0.0),
    "density1-noncausal": (2, 2, 1, 100, 170, 64, torch.float16, False, 64, 64, 1.0),
    "blocks128": (1, 2, 1, 300, 300, 64, torch.float16, True, 128, 128, 0.6),
    "blocks128x64": (1, 2, 1, 300, 250, 64, torch.float16, True, 128, 64, 0.6),
    "blocks64x128": (1, 2, 1, 250, 300, 64, torch.bfloat16, False, 64, 128, 0.6),
    "long-causal": (1, 1, 1, 640, 700, 64, torch.float16, True, 64, 64, 0.4),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_parity_random_layouts(case, request):
    B, H, Hkv, Nq, Nkv, D, dtype, causal, bm, bn, density = CASES[case]
    gen = torch.Generator().manual_seed(_seed(request))
    q, k, v = _qkv(B, H, Hkv, Nq, Nkv, D, dtype, gen)
    lay = random_layout(Nq, Nkv, density=density, seed=_seed(request) % 1000, block_m=bm, block_n=bn, batch=B,
                        heads=H, causal=causal, device=DEV)
    _check(q, k, v, lay, causal)


@pytest.mark.parametrize("config", [
    {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 1},
    {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 1},
    {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1},
    {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 1, "USE_TMA": True},
    {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 1, "PREFETCH": False},
    {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 4, "num_stages": 1, "PREFETCH": False},
    {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 1, "USE_TMA": True, "TMA_QO": True},
    {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 1, "VEC_COUNT": False},
    {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 4, "num_stages": 1, "VEC_COUNT": False, "PREFETCH": False},
], ids=["m64n64", "m128n64", "m64n32", "m128n64-tma", "m64n64-noprefetch", "m128n128-noprefetch",
        "m128n64-tma-qo", "m64n64-binary-search", "m128n128-binary-search-noprefetch"])
def test_subtiled_configs(config, request):
    """Kernel tiles smaller than layout blocks (BLOCK_M < block_m, several BLOCK_N per block); TMA loads."""
    gen = torch.Generator().manual_seed(_seed(request))
    B, H, Hkv, Nq, Nkv, D = 1, 2, 1, 280, 330, 64
    q, k, v = _qkv(B, H, Hkv, Nq, Nkv, D, torch.float16, gen)
    for causal in (True, False):
        lay = random_layout(Nq, Nkv, density=0.6, seed=3, block_m=128, block_n=128, heads=H, causal=causal, device=DEV)
        _check(q, k, v, lay, causal, config=config)


@pytest.mark.parametrize("vec_count", [True, False], ids=["vector-count", "binary-search"])
def test_long_lists_split_over_several_chunks(vec_count, request):
    """Lists longer than one LIST_CHUNK (the prologue's count loop runs several chunks) and odd lengths.

    Block 64 with 1300 keys gives Nb = 21 key blocks; chunks of 16 make the count loop run twice.
    Dense and random rows, causal (masked diagonal) and not, N_q != N_kv.
    """
    gen = torch.Generator().manual_seed(_seed(request))
    B, H, Hkv, Nq, Nkv, D = 1, 2, 1, 1000, 1300, 64
    q, k, v = _qkv(B, H, Hkv, Nq, Nkv, D, torch.float16, gen)
    cfg = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 1, "VEC_COUNT": vec_count, "LIST_CHUNK": 16}
    for causal in (True, False):
        for density in (1.0, 0.8):
            lay = random_layout(Nq, Nkv, density=density, seed=7, block_m=64, block_n=64, heads=H, causal=causal,
                                device=DEV)
            assert int(lay.kv_num_blocks.max()) > 16
            _check(q, k, v, lay, causal, config=cfg)


@pytest.mark.parametrize("tau", [0.5, 8.0])
def test_lazy_rescale_matches_reference(tau, request):
    """RESCALE_TAU > 0 keeps a stale reference max (p <= 2**tau): the same function up to rounding.

    Large score spread (x4) and rows whose max keeps growing (a ramp added to later keys) make both
    branches run: tiles that rescale and tiles that skip it; tau 0.5 rescales often, 8 rarely.
    """
    gen = torch.Generator().manual_seed(_seed(request))
    B, H, Hkv, Nq, Nkv, D = 1, 2, 1, 300, 420, 64
    q, k, v = _qkv(B, H, Hkv, Nq, Nkv, D, torch.float16, gen, spread=2.0)
    ramp = torch.linspace(0, 3, Nkv).to(k.dtype).to(DEV)[None, None, :, None]
    k = (k + ramp * q.mean(dim=(1, 2), keepdim=True)[:, :Hkv]).to(k.dtype)
    cfg = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 1, "RESCALE_TAU": tau}
    for causal in (True, False):
        for density in (1.0, 0.5):
            lay = random_layout(Nq, Nkv, density=density, seed=11, block_m=64, block_n=64, heads=H, causal=causal,
                                device=DEV)
            _check(q, k, v, lay, causal, config=cfg)


def test_empty_rows_and_non_causal_layout_under_causal(request):
    """Rows with no blocks give out 0 / lse -inf; blocks above the diagonal contribute nothing."""
    gen = torch.Generator().manual_seed(_seed(request))
    B, H, Hkv, Nq, Nkv, D = 2, 2, 1, 200, 200, 64
    q, k, v = _qkv(B, H, Hkv, Nq, Nkv, D, torch.float16, gen)
    mask = torch.rand(B, H, 4, 4, generator=gen) < 0.6
    mask[0, 0, 1] = False
    mask[1, 1, :] = False
    mask[0, 1, 2] = True
    lay = BlockLayout.from_dense_mask(mask, block_m=64, block_n=64, seqlen_q=Nq, seqlen_kv=Nkv).to(DEV)
    for causal in (False, True):
        out, lse = _check(q, k, v, lay, causal)
        assert bool((out[1, 1] == 0).all()) and bool(torch.isneginf(lse[1, 1]).all())
        assert bool((out[0, 0, 64:128] == 0).all()) and bool(torch.isneginf(lse[0, 0, 64:128]).all())


def test_poisoned_outputs_are_fully_written(request):
    gen = torch.Generator().manual_seed(_seed(request))
    B, H, Hkv, Nq, Nkv, D = 1, 4, 2, 170, 130, 64
    q, k, v = _qkv(B, H, Hkv, Nq, Nkv, D, torch.float16, gen)
    lay = random_layout(Nq, Nkv, density=0.5, seed=5, heads=H, causal=True, device=DEV)
    out = torch.full((B, H, Nq, D), float("nan"), dtype=q.dtype, device=DEV)
    lse = torch.full((B, H, Nq), float("nan"), dtype=torch.float32, device=DEV)
    res = _fwd(q, k, v, layout=lay, causal=True, out=out, lse=lse)
    assert res.out is out and res.lse is lse
    assert not bool(torch.isnan(out).any()) and not bool(torch.isnan(lse).any())
    hi, lo, _ = _refs(q, k, v, lay, True)
    check_ratio(out, hi.out, lo.out)
    check_ratio(lse, hi.lse, lo.lse, "lse")


def test_deterministic(request):
    gen = torch.Generator().manual_seed(_seed(request))
    q, k, v = _qkv(1, 2, 1, 150, 150, 64, torch.float16, gen)
    lay = random_layout(150, 150, density=0.7, seed=1, heads=2, causal=True, device=DEV)
    a = _fwd(q, k, v, layout=lay, causal=True)
    b = _fwd(q, k, v, layout=lay, causal=True)
    assert torch.equal(a.out, b.out) and torch.equal(a.lse, b.lse)


def test_dense_layout_none_matches_causal_layout(request):
    gen = torch.Generator().manual_seed(_seed(request))
    q, k, v = _qkv(1, 2, 1, 150, 170, 64, torch.float16, gen)
    for causal in (True, False):
        out, lse = _fwd(q, k, v, layout=None, causal=causal)
        hi, lo, _ = _refs(q, k, v, None, causal)
        check_ratio(out, hi.out, lo.out)
        check_ratio(lse, hi.lse, lo.lse, "lse")
    lay = causal_layout(150, 170, heads=2, device=DEV)
    _check(q, k, v, lay, True)


def test_strided_inputs_and_scale(request):
    """(B, N, H, D) storage viewed as (B, H, N, D); a non-unit last-dim stride is copied once."""
    gen = torch.Generator().manual_seed(_seed(request))
    B, H, Hkv, N, D = 1, 4, 2, 140, 64
    qs = torch.randn(B, N, H, D, generator=gen).half().to(DEV)
    ks = torch.randn(B, N, Hkv, D, generator=gen).half().to(DEV)
    vs = torch.randn(B, Hkv, D, N, generator=gen).half().to(DEV)
    q, k, v = qs.transpose(1, 2), ks.transpose(1, 2), vs.transpose(2, 3)
    assert not q.is_contiguous() and v.stride(-1) != 1
    lay = random_layout(N, N, density=0.6, seed=2, heads=H, causal=True, device=DEV)
    _check(q, k, v, lay, True, scale=0.05)


def test_dispatcher_uses_kernel(request):
    from sparseattn.ops.attention import block_sparse_attention, select_backend

    gen = torch.Generator().manual_seed(_seed(request))
    q, k, v = _qkv(1, 2, 1, 100, 100, 64, torch.float16, gen)
    lay = random_layout(100, 100, density=0.6, seed=2, heads=2, causal=True, device=DEV)
    assert select_backend(q, k, v, layout=lay, causal=True, backend="triton") == "triton"
    out, lse = block_sparse_attention(q, k, v, lay, causal=True, backend="triton")
    hi, lo, _ = _refs(q, k, v, lay, True)
    check_ratio(out, hi.out, lo.out)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("blocks", [(64, 64), (128, 64)], ids=["b64", "b128x64"])
def test_pv_threshold_matches_reference_rule(causal, blocks, request):
    """Same skipped-tile count as the reference, and parity of the (approximate) output."""
    gen = torch.Generator().manual_seed(_seed(request))
    bm, bn = blocks
    B, H, Hkv, Nq, Nkv, D = 1, 2, 1, 300, 330, 64
    # attention sink: the first 40 keys share a direction with every query, so later tiles fall far
    # below the running max (some tiles still cross the threshold)
    q, k, v = _qkv(B, H, Hkv, Nq, Nkv, D, torch.float16, gen, spread=1.0)
    w = torch.randn(D, generator=gen)
    w = (w / w.norm() * 8.0).to(q.dtype).to(DEV)
    q = q + w
    k[:, :, :40] += w
    lay = random_layout(Nq, Nkv, density=0.8, seed=4, block_m=bm, block_n=bn, heads=H, causal=False, device=DEV)
    thr = 4.0
    stats: dict = {}
    out, lse = _fwd(q, k, v, layout=lay, causal=causal, pv_threshold=thr, stats=stats)
    hi, lo, hi_stats = _refs(q, k, v, lay, causal, pv_threshold=thr)
    assert hi_stats["pv_skipped_tiles"] > 0, "test data should make the rule skip something"
    assert stats == hi_stats
    check_ratio(out, hi.out, lo.out)
    check_ratio(lse, hi.lse, lo.lse, "lse")


def test_stats_without_threshold(request):
    gen = torch.Generator().manual_seed(_seed(request))
    q, k, v = _qkv(1, 2, 1, 100, 100, 64, torch.float16, gen)
    lay = random_layout(100, 100, density=0.5, seed=2, heads=2, causal=True, device=DEV)
    stats: dict = {}
    _fwd(q, k, v, layout=lay, causal=True, stats=stats)
    assert stats == {"visited_tiles": 0, "pv_skipped_tiles": 0}  # counted only with pv_threshold, as the reference


# ---------------------------------------------------------------------------------------------- errors
def test_refusals_and_bad_inputs():
    from sparseattn.ops.triton_launch import refusal

    q = torch.randn(1, 2, 64, 64, dtype=torch.float16, device=DEV)
    k = v = torch.randn(1, 1, 64, 64, dtype=torch.float16, device=DEV)
    lay = dense_layout(64, 64, heads=2, device=DEV)
    assert refusal(q, k=k, v=v, layout=lay) is None
    assert "float32" in refusal(q.float(), k=k.float(), v=v.float(), layout=lay)
    assert "head_dim 96" in refusal(torch.randn(1, 2, 64, 96, dtype=torch.float16, device=DEV))
    lay32 = dense_layout(64, 64, block_m=32, block_n=32, heads=2, device=DEV)
    assert "block_m=32" in refusal(q, k=k, v=v, layout=lay32)
    with pytest.raises(NotImplementedError, match="block_m=32"):
        _fwd(q, k, v, layout=lay32)
    with pytest.raises(NotImplementedError, match="float32"):
        _fwd(q.float(), k.float(), v.float(), layout=lay)
    with pytest.raises(ValueError, match="other sequence lengths"):
        _fwd(q, k, v, layout=dense_layout(128, 64, heads=2, device=DEV))
    with pytest.raises(ValueError, match="batch/head"):
        _fwd(q, k, v, layout=dense_layout(64, 64, heads=3, device=DEV))
    with pytest.raises(ValueError, match="dtype"):
        _fwd(q.to(torch.int32), k.to(torch.int32), v.to(torch.int32), layout=lay)
    with pytest.raises(ValueError, match="pv_threshold"):
        _fwd(q, k, v, layout=lay, pv_threshold=-1.0)
    with pytest.raises(ValueError, match="pv_threshold"):
        _fwd(q, k, v, layout=None, pv_threshold=1.0)
    with pytest.raises(ValueError, match="out"):
        _fwd(q, k, v, layout=lay, out=torch.empty(1, 2, 64, 32, dtype=torch.float16, device=DEV))
    with pytest.raises(ValueError, match="config"):
        _fwd(q, k, v, layout=lay, config={"BLOCK_M": 64})
    base = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 1}
    with pytest.raises(ValueError, match="LIST_CHUNK"):
        _fwd(q, k, v, layout=lay, config={**base, "LIST_CHUNK": 24})
    with pytest.raises(ValueError, match="maxnreg"):
        _fwd(q, k, v, layout=lay, config={**base, "maxnreg": 1000})
    with pytest.raises(ValueError, match="RESCALE_TAU"):
        _fwd(q, k, v, layout=lay, config={**base, "RESCALE_TAU": -1.0})
    with pytest.raises(ValueError, match="RESCALE_TAU"):
        _fwd(q, k, v, layout=lay, pv_threshold=1.0, config={**base, "RESCALE_TAU": 8.0})
    with pytest.raises(ValueError, match="kv_indices"):  # out-of-range indices never reach a launch
        BlockLayout(torch.ones(1, 2, 1, dtype=torch.int32), torch.full((1, 2, 1, 1), 5, dtype=torch.int32), 64, 64, 64, 64)


def test_cpu_without_interpreter_is_refused(monkeypatch):
    if ON_GPU:
        pytest.skip("CPU refusal is only meaningful without CUDA")
    from sparseattn.ops.attention import block_sparse_attention
    from sparseattn.ops.triton_launch import refusal

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(1, 1, 64, 64, dtype=torch.float16)
    lay = dense_layout(64, 64)
    assert "CPU" in refusal(q, k=q, v=q, layout=lay)
    with pytest.raises(NotImplementedError, match="triton"):
        block_sparse_attention(q, q, q, lay, backend="triton")
    out, _ = block_sparse_attention(q, q, q, lay, backend="auto")  # reference, no warning on CPU
    assert not bool(torch.isnan(out).any()) and math.isfinite(float(out.float().abs().max()))


def test_autotuned_choice_is_remembered():
    """After the first autotuned call of a key, the launcher reuses the chosen config (no autotuner dispatch)."""
    import triton

    from sparseattn.ops import triton_launch as tlaunch

    class _Tuned:
        best_config = triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "USE_TMA": True}, num_warps=8, num_stages=3)

    key = ("test-key",)
    try:
        tlaunch._remember(key, _Tuned())
        assert tlaunch._TUNED[key] == {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3, "USE_TMA": True}
        tlaunch._remember(None, _Tuned())  # no key (fixed config): nothing stored
        assert None not in tlaunch._TUNED
    finally:
        tlaunch._TUNED.pop(key, None)
