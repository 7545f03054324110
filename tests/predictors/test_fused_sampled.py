"""The one-launch Triton sampled block mass (``sparseattn.predictors.fused_sampled``) against the PyTorch
``exact_block_mass(..., rows_per_block=...)``, and ``SampledMassPredictor``'s backend choice.

Without CUDA the kernel runs under Triton's CPU interpreter (``tests/conftest.py`` sets ``TRITON_INTERPRET=1``
before triton is imported): short sequences, few heads. The reference is float64 where the kernel runs float32
(``ieee`` products), so the mass agrees to float32 rounding; fp16/bf16 inputs are exact in float32, so the same
tolerance holds for them.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from sparseattn.predictors.fused_sampled import sampled_block_mass, sampled_mass_refusal
from sparseattn.predictors.oracle import SampledMassConfig, SampledMassPredictor, exact_block_mass
from sparseattn.testing.harness import kernel_unavailable

pytest.importorskip("triton", reason="triton is not installed")
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")]
if kernel_unavailable() is not None:
    pytest.skip(kernel_unavailable(), allow_module_level=True)

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _qk(B, H, Hkv, Nq, Nkv, D, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Nq, D, generator=g)
    k = torch.randn(B, Hkv, Nkv, D, generator=g)
    k[..., 0] += torch.linspace(-2.0, 4.0, Nkv)  # a peaked, uneven mass
    q[..., 0] += 2.0
    return q.to(dtype).to(DEV), k.to(dtype).to(DEV)


@pytest.mark.parametrize("B,H,Hkv,Nq,Nkv,D,rpb,causal,bm,bn", [
    (1, 4, 1, 200, 200, 64, 8, True, 64, 64),     # Gemma-like GQA 4:1, a short last block
    (2, 6, 2, 130, 190, 32, 4, True, 64, 64),     # N_kv > N_q (bottom-right causal), batch 2
    (1, 3, 3, 97, 97, 48, 16, False, 32, 32),     # no GQA, non-causal, odd length, other block sizes
    (1, 2, 1, 100, 40, 16, 64, True, 64, 32),     # N_kv < N_q: the first rows see no key; every row sampled
    (1, 2, 1, 70, 70, 24, 1, True, 64, 16),       # one row per block; D not a power of two
])
@pytest.mark.parametrize("method", ["split", "walk"])
def test_kernel_matches_the_pytorch_sampled_mass(B, H, Hkv, Nq, Nkv, D, rpb, causal, bm, bn, method):
    q, k = _qk(B, H, Hkv, Nq, Nkv, D, seed=Nq * 7 + D)
    ref = exact_block_mass(q.double(), k.double(), causal=causal, block_m=bm, block_n=bn, rows_per_block=rpb)
    got = sampled_block_mass(q, k, causal=causal, block_m=bm, block_n=bn, rows_per_block=rpb, method=method)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    torch.testing.assert_close(got.cpu(), ref.float().cpu(), atol=2e-6, rtol=1e-5)
    sums = got.sum(-1)
    assert torch.all((sums - 1).abs() < 1e-5) or causal and Nkv < Nq  # rows with keys sum to 1


@pytest.mark.parametrize("method", ["split", "walk"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_match_the_float32_reference(dtype, method):
    q, k = _qk(1, 4, 1, 150, 150, 64, seed=3, dtype=dtype)
    ref = exact_block_mass(q.float(), k.float(), causal=True, block_m=64, block_n=64, rows_per_block=8)
    got = sampled_block_mass(q, k, causal=True, block_m=64, block_n=64, rows_per_block=8, method=method)
    torch.testing.assert_close(got.cpu(), ref.cpu(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["split", "walk"])
def test_rows_without_keys_have_zero_mass(method):
    q, k = _qk(1, 2, 1, 128, 32, 16, seed=5)  # bottom-right causal: rows 0..95 see no key
    got = sampled_block_mass(q, k, causal=True, block_m=32, block_n=32, rows_per_block=4, method=method)
    assert torch.equal(got[:, :, :3].cpu(), torch.zeros_like(got[:, :, :3]).cpu())
    assert torch.allclose(got[:, :, 3].sum(-1).cpu(), torch.ones(1, 2))


@pytest.mark.parametrize("causal", [True, False])
def test_predictor_backends_give_the_same_layout(causal):
    q, k = _qk(1, 4, 2, 600, 600, 32, seed=11)
    cfg = SampledMassConfig(rows_per_block=8, cdf_threshold=0.8, keep_local=1)
    a = SampledMassPredictor(cfg, backend="torch")
    b = SampledMassPredictor(cfg, backend="triton")
    la, lb = a.predict(q, k, causal=causal), b.predict(q, k, causal=causal)
    assert a.last_backend == "torch" and b.last_backend == "triton"
    assert torch.equal(la.to_dense_mask(), lb.to_dense_mask())
    assert 0.0 < lb.density(causal=causal) < 1.0
    torch.testing.assert_close(b.last_scores, a.last_scores, atol=2e-6, rtol=1e-5)


def test_nan_inputs_force_their_blocks_on_both_paths():
    q, k = _qk(1, 2, 1, 192, 192, 16, seed=13)
    k[0, 0, 70, 3] = float("nan")  # key block 1
    cfg = SampledMassConfig(rows_per_block=4, cdf_threshold=0.5, keep_local=1)
    la = SampledMassPredictor(cfg, backend="torch").predict(q, k, causal=True)
    lb = SampledMassPredictor(cfg, backend="triton").predict(q, k, causal=True)
    ma, mb = la.to_dense_mask(), lb.to_dense_mask()
    assert torch.equal(ma, mb)
    assert bool(mb[0, :, 1:, 1].all())  # every query block that may see key block 1 keeps it


def test_refusal_reasons_and_backend_errors():
    q, k = _qk(1, 2, 1, 64, 64, 16, seed=1)
    assert sampled_mass_refusal(q, k, block_m=64, block_n=64, rows_per_block=8) is None
    assert "power of two" in sampled_mass_refusal(q, k, block_m=64, block_n=48, rows_per_block=8)
    assert "float64" in sampled_mass_refusal(q.double(), k.double(), block_m=64, block_n=64, rows_per_block=8)
    big_q = torch.zeros(1, 2, 4, 320, device=DEV)
    assert "head_dim=320" in sampled_mass_refusal(big_q, big_q[:, :1], block_m=64, block_n=64, rows_per_block=8)
    many = torch.zeros(1, 40, 4, 16, device=DEV)
    assert "exceed the kernel's tile" in sampled_mass_refusal(many, many[:, :1], block_m=64, block_n=64,
                                                              rows_per_block=8)
    pred = SampledMassPredictor(SampledMassConfig(block_n=48), backend="triton")
    with pytest.raises(NotImplementedError, match="block_n=48"):
        pred.predict(q, k, causal=True)
    with pytest.raises(NotImplementedError, match="sampled_block_mass: block_n=48"):
        sampled_block_mass(q, k, causal=True, block_m=64, block_n=48, rows_per_block=8)
    with pytest.raises(ValueError, match="sampled_block_mass"):
        sampled_block_mass(q, k[:, :, :, :8], causal=True, block_m=64, block_n=64, rows_per_block=8)
    with pytest.raises(ValueError, match="sampled_block_mass: rows_per_block"):
        sampled_block_mass(q, k, causal=True, block_m=64, block_n=64, rows_per_block=0)
    with pytest.raises(ValueError, match="sampled_block_mass: method is not known"):
        sampled_block_mass(q, k, causal=True, block_m=64, block_n=64, rows_per_block=8, method="fast")
    with pytest.raises(ValueError, match="SampledMassPredictor: backend is not a known backend"):
        SampledMassPredictor(backend="cuda")


def test_auto_backend_on_cpu_tensors_takes_the_torch_path_silently():
    q, k = _qk(1, 2, 1, 64, 64, 16, seed=2)
    pred = SampledMassPredictor(SampledMassConfig(rows_per_block=4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pred.predict(q.cpu(), k.cpu(), causal=True)
    assert pred.last_backend == "torch"


def test_shared_memory_plan_steps_down_then_refuses():
    from sparseattn.predictors.fused_sampled import smem_stages

    # Gemma-3's global layers in float32 with 32 rows per block: 3 stages need 262 KB (the H100 refused it at
    # launch, 232448 bytes), 2 stages fit; in bf16 3 stages fit
    assert smem_stages(128, 256, 64, 4, 232448) == 2
    assert smem_stages(128, 256, 64, 2, 232448) == 3
    assert smem_stages(256, 256, 64, 4, 232448) is None  # 8 heads x 32 rows in float32: no depth fits
    assert smem_stages(256, 256, 64, 4, None) == 3  # the interpreter has no limit


def test_refusal_names_the_shared_memory_shortfall(monkeypatch):
    import sparseattn.predictors.fused_sampled as fs

    q, k = _qk(1, 4, 1, 64, 64, 256, seed=3)
    monkeypatch.setattr(fs, "_device_smem_limit", lambda t: 100_000)
    why = sampled_mass_refusal(q, k, block_m=64, block_n=64, rows_per_block=32)
    assert why is not None and "shared memory" in why and "100000 bytes" in why
    assert sampled_mass_refusal(q, k, block_m=64, block_n=64, rows_per_block=4) is None  # a 16-row tile fits
    pred = SampledMassPredictor(SampledMassConfig(rows_per_block=32), backend="triton")
    with pytest.raises(NotImplementedError, match="shared memory"):
        pred.predict(q, k, causal=True)


def test_split_chunks_cover_every_key_block():
    from sparseattn.predictors.fused_sampled import split_chunks

    for nb in [1, 2, 3, 4, 5, 7, 16, 63, 64, 65, 255, 256, 2048]:
        n, ch = split_chunks(nb)
        assert 1 <= n <= 16 and n * ch >= nb and (n - 1) * ch < nb  # every chunk non-empty, all blocks covered
        assert ch >= min(4, nb)


def test_split_with_many_chunks_matches_the_walk():
    # 40 key blocks of 16: 10 chunks of 4, causal with N_kv > N_q, GQA 3:1, a NaN key in block 17
    q, k = _qk(1, 6, 2, 500, 640, 16, seed=17)
    k[0, 1, 17 * 16 + 5, 2] = float("nan")
    kw = dict(causal=True, block_m=32, block_n=16, rows_per_block=4)
    a = sampled_block_mass(q, k, method="split", **kw)
    b = sampled_block_mass(q, k, method="walk", **kw)
    assert torch.equal(torch.isnan(a), torch.isnan(b))
    # KV head 1's query heads (3..5) get NaN mass for key block 17 from query block 4 on (bottom-right causal: block
    # 3's last row sees keys up to 32 * 3 + 31 + 140 = 267 < 272); KV head 0's heads never
    assert bool(torch.isnan(a[0, 3:, 4:, 17]).all()) and not bool(torch.isnan(a[0, 3:, :4]).any())
    assert not bool(torch.isnan(a[0, :3]).any())
    torch.testing.assert_close(torch.nan_to_num(a).cpu(), torch.nan_to_num(b).cpu(), atol=2e-6, rtol=1e-5)
