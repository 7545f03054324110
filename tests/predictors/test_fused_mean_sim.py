"""The fused Triton mean_sim predictor (three launches, layout written directly) against the torch path,
for every block score (mean, minmax, mixed).

Without CUDA the kernels run under Triton's CPU interpreter (``tests/conftest.py`` sets
``TRITON_INTERPRET=1`` before triton is imported). The interpreter is slow (~50–100 ms per program),
so every case is a few programs: short sequences, small head_dim, few heads.

Equality is exact on the layout (``kv_num_blocks`` and all of ``kv_indices``, selected prefix and the
ascending rest) and close on ``last_scores`` (NaN in the same places). The fused kernels round like
the torch path (pooled sums in the input dtype, bfloat16 rounded to nearest even), so the only
allowed difference — a decision flipped by float summation order exactly on a threshold — does not
occur on these seeded inputs.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from sparseattn.layout.block_layout import BlockLayout
from sparseattn.predictors import mean_similarity as ms
from sparseattn.predictors._common import block_pool, causal_region
from sparseattn.predictors.mean_similarity import MeanSimilarityConfig, MeanSimilarityPredictor, block_self_similarity
from sparseattn.testing.harness import CountOps, kernel_unavailable, node_generator
from sparseattn.testing.tolerances import ATOL_FLOOR, FP32_POOL_RTOL

pytest.importorskip("triton", reason="triton is not installed")

# the CPU interpreter evaluates with numpy, which warns on NaN/inf arithmetic these tests make on purpose
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")]

ON_GPU = torch.cuda.is_available()
DEV = "cuda" if ON_GPU else "cpu"
if kernel_unavailable() is not None:
    pytest.skip(kernel_unavailable(), allow_module_level=True)
_gen = node_generator


def _structured(B, H, Hkv, Nq, Nkv, D, gen, dtype=torch.float32):
    """Random q/k plus a shared direction whose strength grows along the keys and a few hot key spans,
    so the compressed attention is peaked and the selection is neither empty nor everything."""
    q = torch.randn(B, H, Nq, D, generator=gen)
    k = torch.randn(B, Hkv, Nkv, D, generator=gen)
    q[..., 0] += 3.0
    k[..., 0] += torch.linspace(-3.0, 5.0, Nkv)
    hot = torch.randint(0, Nkv, (3,), generator=gen)
    for h in hot.tolist():
        k[:, :, h:h + 8, 0] += 6.0
    return q.to(dtype).to(DEV), k.to(dtype).to(DEV)


def _both(q, k, causal, cfg):
    torch_pred = MeanSimilarityPredictor(cfg, backend="torch")
    fused_pred = MeanSimilarityPredictor(cfg, backend="triton")
    ref = torch_pred.predict(q, k, causal=causal)
    got = fused_pred.predict(q, k, causal=causal)
    assert fused_pred.last_backend == "triton" and torch_pred.last_backend == "torch"
    return ref, got, torch_pred.last_scores, fused_pred.last_scores


def _assert_same(ref: BlockLayout, got: BlockLayout, p_ref, p_got, dtype=torch.float32):
    assert isinstance(got, BlockLayout)
    assert got.kv_num_blocks.dtype == torch.int32 and got.kv_indices.dtype == torch.int32
    assert (got.block_m, got.block_n, got.seqlen_q, got.seqlen_kv) == (ref.block_m, ref.block_n, ref.seqlen_q,
                                                                        ref.seqlen_kv)
    assert torch.equal(got.kv_num_blocks, ref.kv_num_blocks), (got.kv_num_blocks - ref.kv_num_blocks).nonzero()[:5]
    assert torch.equal(got.kv_indices, ref.kv_indices)  # selected prefix ascending, then the rest ascending
    # validate=True checks ranges and the ascending prefix independently of the torch path
    BlockLayout(got.kv_num_blocks, got.kv_indices, got.block_m, got.block_n, got.seqlen_q, got.seqlen_kv)
    assert p_got.shape == p_ref.shape and p_got.dtype == torch.float32
    torch.testing.assert_close(p_got, p_ref, atol=ATOL_FLOOR[dtype], rtol=0, equal_nan=True)


# (B, H, H_kv, N_q, N_kv, D, causal, config)
CASES = {
    "cdf-gqa2-odd": (1, 4, 2, 65, 65, 16, True, dict(block_m=16, block_n=16)),
    "cdf-b2-nq-ne-nkv": (2, 2, 1, 63, 200, 16, True, dict(block_m=32, block_n=32, cdf_threshold=0.8)),
    "cdf-nq-gt-nkv": (1, 2, 2, 200, 63, 8, True, dict(block_m=32, block_n=16, keep_sink=False, keep_local=0)),
    "cdf-noncausal": (1, 4, 1, 100, 333, 8, False, dict(block_m=64, block_n=32, keep_local=2)),
    "cdf-len1": (1, 2, 1, 1, 200, 8, True, dict(block_m=16, block_n=16, cdf_threshold=0.5)),
    "cdf-thr1-trust-all": (1, 2, 1, 64, 64, 8, True, dict(block_m=16, block_n=16, cdf_threshold=1.0, sim_threshold=-1)),
    "cdf-sim-high": (1, 2, 2, 65, 65, 8, True, dict(block_m=16, block_n=16, sim_threshold=1.5)),
    "cdf-local3": (1, 2, 1, 150, 150, 8, True, dict(block_m=16, block_n=32, keep_local=3, keep_sink=False)),
    "topk-gqa1": (1, 4, 1, 100, 100, 16, True, dict(block_m=16, block_n=16, topk=0.3, cdf_threshold=None)),
    "topk-b2-noncausal": (2, 2, 2, 65, 130, 8, False, dict(block_m=32, block_n=16, topk=0.2, cdf_threshold=None,
                                                           keep_sink=False, keep_local=0, sim_threshold=-1)),
    "topk-nq-ne-nkv": (1, 3, 1, 63, 333, 8, True, dict(block_m=64, block_n=32, topk=0.5, cdf_threshold=None,
                                                       keep_local=2)),
    # minmax / mixed: the pooling pass adds per-block key minima/maxima, the score kernel a second product
    "mixed-default-gqa3": (1, 3, 1, 130, 130, 16, True, dict(block_m=16, block_n=16, score="mixed", cdf_threshold=0.97,
                                                             keep_local=8)),
    "mixed-topk-odd": (1, 4, 2, 99, 99, 8, True, dict(block_m=16, block_n=16, score="mixed", topk=0.3,
                                                      cdf_threshold=None)),
    "mixed-noncausal-nq-ne-nkv": (2, 2, 1, 70, 150, 8, False, dict(block_m=32, block_n=16, score="mixed",
                                                                    keep_local=2, sim_threshold=-1)),
    "minmax-cdf-gqa2": (1, 4, 2, 65, 65, 16, True, dict(block_m=16, block_n=16, score="minmax", cdf_threshold=0.8)),
    "minmax-topk-nq-gt-nkv": (1, 2, 1, 200, 63, 8, True, dict(block_m=32, block_n=16, score="minmax", topk=0.4,
                                                             cdf_threshold=None, keep_sink=False, keep_local=0)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fused_layout_equals_torch_path(request, case):
    B, H, Hkv, Nq, Nkv, D, causal, cfg = CASES[case]
    q, k = _structured(B, H, Hkv, Nq, Nkv, D, _gen(request))
    ref, got, p_ref, p_got = _both(q, k, causal, MeanSimilarityConfig(**cfg))
    _assert_same(ref, got, p_ref, p_got)
    # the fused layout says its blocks lie in the causal region (one-op accounting): check that claim
    assert got.in_region == causal
    unflagged = BlockLayout(got.kv_num_blocks, got.kv_indices, got.block_m, got.block_n, got.seqlen_q,
                            got.seqlen_kv, validate=False)
    for c in (True, False):
        assert torch.equal(got.selected_in_region(causal=c), unflagged.selected_in_region(causal=c))


def test_selection_is_not_trivial(request):
    # the structured inputs must make the selection do something: some rows keep only part of their region
    cfg = MeanSimilarityConfig(block_m=16, block_n=16, cdf_threshold=0.7, sim_threshold=-1, keep_sink=False,
                               keep_local=0)
    q, k = _structured(1, 2, 1, 128, 128, 16, _gen(request))
    ref, got, p_ref, p_got = _both(q, k, True, cfg)
    _assert_same(ref, got, p_ref, p_got)
    lims = causal_region(128, 128, 16, 16, True, q.device).sum(-1).to(torch.int32)
    num = got.kv_num_blocks
    assert bool((num >= 1).all())
    assert bool((num < lims).any()), num


@pytest.mark.parametrize("dtype,score", [(torch.float16, "mean"), (torch.bfloat16, "mean"), (torch.bfloat16, "mixed"),
                                         (torch.float16, "minmax")])
def test_fused_half_precision_inputs(request, dtype, score):
    cfg = MeanSimilarityConfig(block_m=16, block_n=32, cdf_threshold=0.9, keep_local=1, score=score)
    q, k = _structured(1, 2, 1, 100, 100, 16, _gen(request), dtype=dtype)
    ref, got, p_ref, p_got = _both(q, k, True, cfg)
    _assert_same(ref, got, p_ref, p_got, dtype=dtype)


def test_fused_noncontiguous_q(request):
    # transformers hands q as a (B, N, H, D) tensor viewed as (B, H, N, D)
    cfg = MeanSimilarityConfig(block_m=16, block_n=16, topk=0.4, cdf_threshold=None, score="mixed")
    q, k = _structured(1, 4, 2, 65, 65, 8, _gen(request))
    q_view = q.transpose(1, 2).contiguous().transpose(1, 2)
    k_view = k.transpose(1, 2).contiguous().transpose(1, 2)
    assert not q_view.is_contiguous()
    ref, got, p_ref, p_got = _both(q_view, k_view, True, cfg)
    _assert_same(ref, got, p_ref, p_got)


@pytest.mark.parametrize("where,value,spec", [
    ("q", float("nan"), dict(cdf_threshold=0.9)),
    ("k", float("nan"), dict(cdf_threshold=0.9)),
    ("k", float("inf"), dict(topk=0.3, cdf_threshold=None)),
    ("q", float("-inf"), dict(topk=0.3, cdf_threshold=None)),
    ("k", float("-inf"), dict(cdf_threshold=0.5, sim_threshold=-1)),
    ("q", float("nan"), dict(cdf_threshold=0.97, score="mixed", keep_local=2)),
    ("k", float("nan"), dict(topk=0.3, cdf_threshold=None, score="mixed")),
    ("k", float("inf"), dict(cdf_threshold=0.9, score="mixed", sim_threshold=-1)),
    ("k", float("-inf"), dict(cdf_threshold=0.5, score="minmax", sim_threshold=-1)),
    ("q", float("inf"), dict(topk=0.3, cdf_threshold=None, score="minmax", sim_threshold=-1)),
    ("q", float("-inf"), dict(cdf_threshold=0.9, score="mixed")),
])
def test_fused_nonfinite_keeps_what_torch_keeps(request, where, value, spec):
    cfg = MeanSimilarityConfig(block_m=16, block_n=16, **{"keep_local": 1, **spec})
    q, k = _structured(1, 2, 1, 80, 80, 8, _gen(request))
    if where == "q":
        q[0, 1, 37, 3] = value
    else:
        k[0, 0, 21, 2] = value
    ref, got, p_ref, p_got = _both(q, k, True, cfg)
    _assert_same(ref, got, p_ref, p_got)
    if value != value:  # NaN: the block holding it is untrusted, so every allowed block it touches is kept
        mask = got.to_dense_mask()
        region = causal_region(80, 80, 16, 16, True, q.device)
        if where == "q":
            assert torch.equal(mask[0, 1, 2], region[2])
        else:
            assert bool(mask[0, :, :, 1][region[:, 1].expand(2, -1)].all())


def _launch_pool(q, k, block_m, block_n, minmax):
    """The pooling launch alone (q and k in one grid): q means/sims, k means/sims/min/max (k buffers untransposed)."""
    from sparseattn.ops.launch_configs import MeanSimLaunchConfig
    from sparseattn.predictors.fused_mean_sim import _kernels, _pool_meta

    B, H, Nq, D = q.shape
    Hkv, Nkv = k.shape[1], k.shape[2]
    Mb, Nb = -(-Nq // block_m), -(-Nkv // block_n)
    qm = torch.empty(B, H, Mb, D, device=DEV)
    qsim = torch.empty(B, H, Mb, device=DEV)
    km, kmin, kmax = (torch.empty(B, Hkv, D, Nb, device=DEV) for _ in range(3))
    ksim = torch.empty(B, Hkv, Nb, device=DEV)
    pool = _kernels()[0]
    pool[(Mb * H + Nb * Hkv, B)](q, k, qm, qsim, km, ksim, kmin, kmax, *q.stride(), *k.stride(), *qm.stride(),
                                 *km.transpose(-1, -2).stride(), *qsim.stride()[:2], *ksim.stride()[:2], Nq, Nkv, Mb, Nb, H, D,
                                 **_pool_meta(block_m, block_n, D, minmax, MeanSimLaunchConfig()))
    return qm, qsim, km.transpose(-1, -2), ksim, kmin.transpose(-1, -2), kmax.transpose(-1, -2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_pool_kernel_matches_block_pool_and_minmax(dtype):
    from sparseattn.predictors._common import block_minmax

    gen = torch.Generator().manual_seed(7)
    B, H, N, D, block = 1, 2, 45, 12, 16  # partial last block, D not a power of two
    x = torch.randn(B, H, N, D, generator=gen)
    x[0, 0, 3] = 0.0  # a zero row: contributes 0 (float32) / makes the block NaN (float16), as block_pool does
    x[0, 1, 40:] = x[0, 1, 40]  # identical rows: similarity 1 in the last (partial) block
    xk = x.clone()
    xk[0, 1, 20, 5] = float("nan")  # min/max of that block's coordinate 5: NaN (amin/amax propagate it)
    xk[0, 0, 33, 2] = float("inf")
    xk[0, 0, 34, 2] = float("-inf")
    x, xk = x.to(dtype).to(DEV), xk.to(dtype).to(DEV)
    qm, qsim, km, ksim, kmin, kmax = _launch_pool(x, xk, block, block, True)
    for t, mean, sim in ((x, qm, qsim), (xk, km, ksim)):
        sums, unit, cnt = block_pool(t, block, normalized=True)
        torch.testing.assert_close(mean, sums / cnt[:, None], atol=ATOL_FLOOR[torch.float32], rtol=FP32_POOL_RTOL, equal_nan=True)
        torch.testing.assert_close(sim, block_self_similarity(unit, cnt), atol=ATOL_FLOOR[torch.float32], rtol=FP32_POOL_RTOL,
                                   equal_nan=True)
    assert bool(qsim[0, 0, 0].isnan()) == (dtype == torch.float16)
    ref_min, ref_max = block_minmax(xk, block)
    assert torch.equal(kmin.isnan(), ref_min.isnan()) and torch.equal(kmax.isnan(), ref_max.isnan())
    assert torch.equal(kmin.nan_to_num(0.0, 7.0, -7.0), ref_min.nan_to_num(0.0, 7.0, -7.0))  # exact, infinities too
    assert torch.equal(kmax.nan_to_num(0.0, 7.0, -7.0), ref_max.nan_to_num(0.0, 7.0, -7.0))
    assert bool(kmin[0, 1, 1, 5].isnan()) and float(kmin[0, 0, 2, 2]) == float("-inf")


@pytest.mark.parametrize("causal,topk,score", [(True, None, "mean"), (False, 0.1, "mean"), (True, None, "mixed")])
def test_select_kernel_long_rows(causal, topk, score):
    # 2100 key blocks (a 4096-wide register row): the score and select kernels on given block statistics,
    # against the torch path's scoring and selection code on the same statistics (pooling is too slow here)
    from sparseattn.predictors._common import local_mask, mask_to_layout, select_cdf, select_topk
    from sparseattn.ops.launch_configs import MeanSimLaunchConfig
    from sparseattn.predictors.fused_mean_sim import _SCORES, _geometry, _kernels, _score_meta, _select_meta

    gen = torch.Generator().manual_seed(11)
    B, H, Hkv, D, bm, bn, Nq, Nkv = 1, 2, 1, 8, 64, 16, 100, 2100 * 16 - 5
    Mb, Nb, G = 2, 2100, 2
    # as MeanSimilarityConfig(block_m=64, block_n=16, keep_local=2, sim_threshold=0.5, cdf_threshold=0.9 or topk)
    q_mean = torch.randn(B, H, Mb, D, generator=gen)
    k_mean = torch.randn(B, Hkv, Nb, D, generator=gen)
    k_mean[..., 0] += torch.linspace(-4.0, 8.0, Nb)
    q_mean[..., 0] += 2.0
    spread = torch.rand(B, Hkv, Nb, D, generator=gen)
    k_min, k_max = k_mean - spread, k_mean + 2.0 * spread
    q_sim = torch.tensor([[[0.9, 0.2], [0.7, 0.8]]])
    k_sim = torch.rand(B, Hkv, Nb, generator=gen) * 0.6 + 0.45  # a few untrusted key blocks
    q_mean, k_mean, k_min, k_max, q_sim, k_sim = (t.to(DEV) for t in (q_mean, k_mean, k_min, k_max, q_sim, k_sim))

    region = causal_region(Nq, Nkv, bm, bn, causal, q_mean.device)
    qg = q_mean.reshape(B, Hkv, G * Mb, D)
    probs = []
    for s in ([torch.matmul(qg, k_mean.transpose(-1, -2))] if score != "minmax" else []) + \
             ([torch.matmul(qg.clamp(min=0), k_max.transpose(-1, -2))
               + torch.matmul(qg.clamp(max=0), k_min.transpose(-1, -2))] if score != "mean" else []):
        s = (s * (D ** -0.5)).reshape(B, Hkv, G, Mb, Nb).masked_fill(~region, float("-inf"))
        probs.append(torch.softmax(s, dim=-1).masked_fill_(~region.any(-1, keepdim=True), 0.0))
    p_ref = probs[0] if len(probs) == 1 else 0.5 * (probs[0] + probs[1])
    sel = select_topk(p_ref, region, topk) if topk else select_cdf(p_ref, region, 0.9)
    forced = (local_mask(Nq, Nkv, bm, bn, 2, causal, q_mean.device) | (torch.arange(Nb, device=DEV) == 0)) & region
    mask = (sel | forced | (~(q_sim >= 0.5)).reshape(B, Hkv, G, Mb, 1) | (~(k_sim >= 0.5)).reshape(B, Hkv, 1, 1, Nb))
    ref = mask_to_layout((mask & region).reshape(B, H, Mb, Nb), block_m=bm, block_n=bn, seqlen_q=Nq, seqlen_kv=Nkv)

    p = torch.empty(B, H, Mb, Nb, device=DEV)
    num = torch.empty(B, H, Mb, dtype=torch.int32, device=DEV)
    idx = torch.empty(B, H, Mb, Nb, dtype=torch.int32, device=DEV)
    geo = _geometry(Nq, Nkv, bm, bn, causal, topk, q_mean.device)
    launch = MeanSimLaunchConfig()
    meta = _select_meta(Nb, launch)
    assert meta["RPAD"] == 4096
    sc = _score_meta(B, H, Mb, Nb, D, _SCORES[score], launch)
    n_jt = -(-Nb // sc["BLOCK_J"])
    _, score_k, select = _kernels()
    kt = [t.transpose(-1, -2).contiguous() for t in (k_mean, k_min, k_max)]
    score_k[(-(-Mb // sc["BLOCK_QB"]) * n_jt, H, B)](q_mean, *kt, geo, p, idx, H, G, Mb, Nb, D, n_jt, float(D ** -0.5),
                                                     **sc)
    select[(Mb, H, B)](p, q_sim, k_sim, geo, p, num, idx, H, G, Mb, Nb, 0.0 if topk else 0.9, 0.5, 2,
                       TOPK=topk is not None, KEEP_SINK=True, CAUSAL=causal, MIXED=score == "mixed", **meta)
    got = BlockLayout(num, idx, bm, bn, Nq, Nkv)
    _assert_same(ref, got, p_ref.reshape(B, H, Mb, Nb), p)
    assert bool((num < region.sum(-1)).any())  # the selection dropped blocks


@pytest.mark.parametrize("topk", [None, 0.25])
def test_select_ties_and_flat_rows(topk):
    # equal scores: ties resolved by index like the torch path's stable sort (flat rows, repeated key blocks)
    cfg = MeanSimilarityConfig(block_m=16, block_n=16, sim_threshold=-1, keep_sink=False, keep_local=0,
                               **({"topk": topk, "cdf_threshold": None} if topk else {"cdf_threshold": 0.6}))
    q = torch.zeros(1, 2, 128, 8)
    q[:, 1, :, 0] = 1.0
    k = torch.randn(1, 1, 16, 8, generator=torch.Generator().manual_seed(3)).repeat(1, 1, 8, 1)  # 8 equal pairs
    ref, got, p_ref, p_got = _both(q.to(DEV), k.to(DEV), True, cfg)
    _assert_same(ref, got, p_ref, p_got)


# ------------------------------------------------------------------------------------------ host side

class _FakeKernel:
    """Records launches instead of running (the launcher's own host work is what is measured)."""

    def __init__(self, log: list) -> None:
        self.log = log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append(grid)
        return launch


def test_fused_predict_is_three_launches_and_few_host_ops(monkeypatch):
    from sparseattn.predictors import fused_mean_sim as fm

    log: list = []
    monkeypatch.setattr(fm, "_kernels", lambda: (_FakeKernel(log), _FakeKernel(log), _FakeKernel(log)))
    pred = MeanSimilarityPredictor(MeanSimilarityConfig(block_m=16, block_n=16, score="mixed"), backend="triton")
    q = torch.randn(1, 4, 200, 16, device=DEV).transpose(1, 2).contiguous().transpose(1, 2)
    k = torch.randn(1, 2, 200, 16, device=DEV)
    pred.predict(q, k, causal=True)  # first call builds the cached geometry table
    log.clear()
    counter = CountOps()
    with counter:
        pred.predict(q, k, causal=True)
    assert len(log) == fm.LAUNCHES_PER_CALL == 3
    ops = dict(counter.ops)
    assert ops.get("aten._local_scalar_dense.default", 0) == 0, ops
    assert sum(ops.values()) <= 12, ops  # the output/workspace allocations, nothing per head or block
    assert set(ops) <= {"aten.empty.memory_format"}, ops


def test_fused_predict_makes_no_host_reads(request):
    # the real kernels (interpreter on CPU): nothing reads a tensor value on the host
    pred = MeanSimilarityPredictor(MeanSimilarityConfig(block_m=32, block_n=32, topk=0.5, cdf_threshold=None),
                                   backend="triton")
    q, k = _structured(1, 2, 1, 64, 64, 8, _gen(request))
    pred.predict(q, k, causal=True)
    counter = CountOps()
    with counter:
        pred.predict(q, k, causal=True)
    assert counter.ops.get("aten._local_scalar_dense.default", 0) == 0, dict(counter.ops)


def test_backend_argument_and_refusals(monkeypatch):
    with pytest.raises(ValueError, match=r"^MeanSimilarityPredictor: backend is not a known backend; expected"):
        MeanSimilarityPredictor(backend="cuda")
    q = torch.randn(1, 2, 40, 8, device=DEV)
    k = torch.randn(1, 1, 40, 8, device=DEV)
    from sparseattn.predictors.fused_mean_sim import fused_refusal

    for score in ("mean", "minmax", "mixed"):
        assert fused_refusal(q, k, MeanSimilarityConfig(score=score)) is None
    with pytest.raises(NotImplementedError, match="float64 is not supported"):
        MeanSimilarityPredictor(MeanSimilarityConfig(block_m=16, block_n=16), backend="triton").predict(
            q.double(), k.double())

    # "auto" on a device the fused path would take (CUDA; faked here for the CPU interpreter): an unsupported
    # dtype falls back to the torch path with one warning per predictor, never silently
    monkeypatch.setattr(ms, "_auto_device_ok", lambda t: True)
    auto = MeanSimilarityPredictor(MeanSimilarityConfig(score="mixed", block_m=16, block_n=16))
    q, k = q.double(), k.double()
    with pytest.warns(RuntimeWarning, match="float64 is not supported"):
        auto.predict(q, k)
    assert auto.last_backend == "torch" and auto.last_scores is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        auto.predict(q, k)  # warned once already
    fused_auto = MeanSimilarityPredictor(MeanSimilarityConfig(block_m=16, block_n=16, score="mixed"))
    fused_auto.predict(q.float(), k.float())
    assert fused_auto.last_backend == "triton"  # the default score runs fused, without a warning


def test_dense_layers_unchanged_on_fused_backend():
    cfg = MeanSimilarityConfig(block_m=16, block_n=16, dense_layers=2)
    q = torch.randn(1, 2, 40, 8, device=DEV)
    k = torch.randn(1, 1, 40, 8, device=DEV)
    fused = MeanSimilarityPredictor(cfg, backend="triton")
    ref = MeanSimilarityPredictor(cfg, backend="torch").predict(q, k, causal=True, layer=1)
    got = fused.predict(q, k, causal=True, layer=1)
    assert fused.last_scores is None
    assert torch.equal(got.kv_num_blocks, ref.kv_num_blocks) and torch.equal(got.kv_indices, ref.kv_indices)


def test_launch_config_is_the_registered_operators_tuned_data():
    """The fused kernels' launch parameters come from the operator's tuned file (configuration as data): the
    registry lists mean_sim_fused with its config type and file; the shipped H200 entry is what the kernels
    were measured with; other devices use it as the fallback; a bad config is refused clearly."""
    from sparseattn.ops.launch_configs import MeanSimLaunchConfig
    from sparseattn.ops.registry import get_operator, operators, tuned_config
    from sparseattn.predictors.fused_mean_sim import OPERATOR, launch_config, operator_refusal, registry_refusal

    op = get_operator(OPERATOR)
    assert op in operators("predict", entry_point="predict") and op.config_type is MeanSimLaunchConfig
    assert op.tuned == "mean_sim.json" and op.custom_op == "sparseattn::predict_layout"
    shipped = MeanSimLaunchConfig.from_dict(tuned_config(OPERATOR, "NVIDIA H200"))
    assert shipped == MeanSimLaunchConfig(1024, 2, 64, 8, 4, 256)
    assert launch_config(torch.device("cpu")) == shipped  # no entry for the CPU: the fallback device's
    assert MeanSimLaunchConfig.from_json(shipped.to_json()) == shipped
    with pytest.raises(ValueError, match=r"^MeanSimLaunchConfig: score_tile is not a supported tile"):
        MeanSimLaunchConfig(score_tile=48)
    with pytest.raises(ValueError, match=r"^MeanSimLaunchConfig.from_dict: d must name exactly the launch parameters"):
        MeanSimLaunchConfig.from_dict({"POOL_ELEMS": 1024})
    cfg = MeanSimilarityConfig(score="mean", cdf_threshold=0.9)
    q = torch.randn(1, 2, 64, 16)
    assert registry_refusal(q, q, cfg) == operator_refusal(q, k=q, config=cfg)
