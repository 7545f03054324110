"""Non-finite inputs reach exactly the outputs they affect, on every path.

The rule (docs/TESTING.md, "Non-finite inputs"): a NaN/inf in ``q[i]`` makes row ``i`` non-finite;
in ``k[j]``, every row that attends key ``j``; in ``v[j, d]``, channel ``d`` of every row that attends
key ``j``. "Attends" means allowed by the causal mask *and* the layout. Rows that attend nothing stay
out 0 / lse -inf (the one defined exception). Every other output equals the clean result.

The expected pattern is built from the element mask, independently of the code under test, and
checked against the reference (float64), fp64 SDPA (math), the Triton kernel under the interpreter,
the masked-SDPA path of the integration, the merge functions and the predictors.
"""

from __future__ import annotations

import math

import pytest
import torch

from sparseattn.testing.tolerances import FP32_ATOL, SDPA_FP64_ATOL  # noqa: E402

import sparseattn
from sparseattn import BlockLayout, merge_states, reference_attention
from sparseattn.integrations.transformers_patch import masked_sdpa_attention
from sparseattn.predictors import parse_predictor_spec

INTERP = not torch.cuda.is_available()
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _element_mask(B: int, H: int, Nq: int, Nkv: int, causal: bool, layout: BlockLayout | None) -> torch.Tensor:
    if layout is not None:
        return layout.element_mask(causal=causal).expand(B, H, Nq, Nkv).cpu()
    m = torch.ones(B, H, Nq, Nkv, dtype=torch.bool)
    if causal:
        r = torch.arange(Nq)[:, None]
        c = torch.arange(Nkv)[None, :]
        m = m & (c <= r + Nkv - Nq)
    return m


def _expected_bad(where: str, pos: tuple[int, ...], mask: torch.Tensor, D: int, G: int) -> torch.Tensor:
    """Bool ``(B, H, Nq, D)``: outputs a non-finite value at ``pos`` must reach."""
    B, H, Nq, Nkv = mask.shape
    bad = torch.zeros(B, H, Nq, D, dtype=torch.bool)
    if where == "q":
        b, h, i, _ = pos
        if bool(mask[b, h, i].any()):
            bad[b, h, i, :] = True
    elif where == "k":
        b, hk, j, _ = pos
        for h in range(hk * G, (hk + 1) * G):
            bad[b, h, :, :] = mask[b, h, :, j][:, None].expand(Nq, D)
    else:  # v
        b, hk, j, d = pos
        for h in range(hk * G, (hk + 1) * G):
            bad[b, h, :, d] = mask[b, h, :, j]
    return bad


def _judge_bad(where: str, pos: tuple[int, ...], q, k, v, mask: torch.Tensor) -> torch.Tensor:
    """Outputs that must be non-finite: dense fp64 softmax attention with the element mask for q/k
    faults (an infinite score may be +inf -> NaN or -inf -> weight 0, so the sign decides); for v
    faults, where a product leaks 0·NaN into masked rows, the constructed pattern (scores are finite,
    so every attended key has p > 0)."""
    return _judge(where, pos, q, k, v, mask)[0]


def _judge(where: str, pos: tuple[int, ...], q, k, v, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(outputs that must be non-finite, fp64 dense values of the others); see :func:`_judge_bad`."""
    B, H, Nq, Nkv = mask.shape
    G = H // k.shape[1]
    # dense math in fp64 with the mask applied by selection (SDPA adds the mask, and NaN + -inf = NaN
    # would leak a masked NaN score into the row)
    qd, kd, vd = q.cpu().double(), k.cpu().double().repeat_interleave(G, 1), v.cpu().double().repeat_interleave(G, 1)
    s = torch.where(mask, (qd @ kd.transpose(-1, -2)) * qd.shape[-1] ** -0.5, torch.tensor(-math.inf, dtype=torch.float64))
    empty = ~mask.any(-1, keepdim=True)
    p = torch.softmax(s, dim=-1)
    if where == "v":  # finite part by product, non-finite pattern by construction
        bad = _expected_bad(where, pos, mask, q.shape[-1], G)
        o = p @ torch.where(torch.isfinite(vd), vd, torch.zeros((), dtype=torch.float64))
        return bad, o.masked_fill(empty, 0.0)
    o = (p @ vd).masked_fill(empty, 0.0)
    return ~torch.isfinite(o), o


def _inputs(B, H, Hkv, Nq, Nkv, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Nq, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, Nkv, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, Nkv, D, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _poison(t: torch.Tensor, pos: tuple[int, ...], value: float) -> torch.Tensor:
    t = t.clone()
    t[pos] = value
    return t


def _check_pattern(out: torch.Tensor, clean: torch.Tensor, bad: torch.Tensor, atol: float, what: str) -> None:
    out = out.detach().cpu().to(torch.float64)
    clean = clean.detach().cpu().to(torch.float64)
    got_bad = ~torch.isfinite(out)
    if not torch.equal(got_bad, bad):
        extra = (got_bad & ~bad).nonzero()[:3].tolist()
        missing = (bad & ~got_bad).nonzero()[:3].tolist()
        raise AssertionError(f"{what}: non-finite pattern differs: {int((got_bad & ~bad).sum())} unexpected "
                             f"(e.g. {extra}), {int((bad & ~got_bad).sum())} missing (e.g. {missing})")
    ok = ~bad
    err = float((out[ok] - clean[ok]).abs().max()) if bool(ok.any()) else 0.0
    assert err <= atol, f"{what}: unaffected outputs changed by {err:.3e} > {atol:.1e}"


# (where, position, value) on shapes B=1, H=4, H_kv=2, Nq=Nkv=150, D=16; block 64 (partial last block)
CASES = [
    ("q", (0, 1, 70, 3), math.nan),
    ("q", (0, 2, 0, 0), math.inf),
    ("k", (0, 0, 65, 5), math.nan),   # inside a diagonal block: rows < 65 of that block must stay clean
    ("k", (0, 1, 149, 2), -math.inf),  # last (partial) block
    ("v", (0, 1, 100, 7), math.nan),  # one channel only, diagonal block
    ("v", (0, 0, 3, 1), math.inf),
    ("v", (0, 0, 130, 4), -math.inf),
]


def _layout_with_gap(B, H, N, causal):
    # query block 2 skips key block 1; head 3 of query block 1 selects nothing (empty rows)
    Mb = (N + 63) // 64
    m = torch.ones(B, H, Mb, Mb, dtype=torch.bool)
    if causal:
        m = m & torch.tril(torch.ones(Mb, Mb, dtype=torch.bool))
    m[:, :, 2, 1] = False
    m[:, 3, 1, :] = False
    return BlockLayout.from_dense_mask(m, block_m=64, block_n=64, seqlen_q=N, seqlen_kv=N)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("use_layout", [False, True])
@pytest.mark.parametrize("where,pos,value", CASES)
def test_reference_nonfinite_reaches_exactly_affected_outputs(where, pos, value, causal, use_layout):
    B, H, Hkv, N, D = 1, 4, 2, 150, 16
    q, k, v = _inputs(B, H, Hkv, N, N, D, torch.float64, seed=1)
    layout = _layout_with_gap(B, H, N, causal) if use_layout else None
    clean = reference_attention(q, k, v, causal=causal, layout=layout)
    qq, kk, vv = q, k, v
    if where == "q":
        qq = _poison(q, pos, value)
    elif where == "k":
        kk = _poison(k, pos, value)
    else:
        vv = _poison(v, pos, value)
    got = reference_attention(qq, kk, vv, causal=causal, layout=layout)
    mask = _element_mask(B, H, N, N, causal, layout)
    bad, dense = _judge(where, pos, qq, kk, vv, mask)
    if math.isnan(value) or where == "v":  # the constructed pattern, independent of the dense judge
        assert torch.equal(bad, _expected_bad(where, pos, mask, D, H // Hkv))
        assert bad.any(), "the fault must reach some output (else the case tests nothing)"
    _check_pattern(got.out, dense, bad, 1e-10, "reference")
    touched = _expected_bad(where, pos, mask, D, H // Hkv)
    assert torch.equal(got.out[~touched], clean.out[~touched]), "outputs that never see the fault changed"
    # lse: non-finite exactly on rows whose every channel is bad through q/k (v never touches lse)
    empty = ~mask.any(-1)
    assert torch.all(got.lse[empty] == -math.inf) and torch.all(got.out[empty] == 0)
    if where != "v":
        row_bad = bad.all(-1)
        assert torch.equal(torch.isnan(got.lse) | torch.isinf(got.lse) & ~empty, row_bad)
    else:
        assert torch.equal(got.lse, clean.lse)


@pytest.mark.parametrize("where,pos,value", CASES)
def test_reference_matches_sdpa_math_nonfinite_rows(where, pos, value):
    """Without masks (non-causal, dense) SDPA's math path has no 0·NaN leak, so it is the judge."""
    B, H, Hkv, N, D = 1, 4, 2, 150, 16
    q, k, v = _inputs(B, H, Hkv, N, N, D, torch.float64, seed=2)
    t = {"q": q, "k": k, "v": v}
    t[where] = _poison(t[where], pos, value)
    ours = reference_attention(t["q"], t["k"], t["v"]).out
    G = H // Hkv
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        sdpa = torch.nn.functional.scaled_dot_product_attention(
            t["q"], t["k"].repeat_interleave(G, 1), t["v"].repeat_interleave(G, 1))
    assert torch.equal(torch.isfinite(ours), torch.isfinite(sdpa))
    fin = torch.isfinite(sdpa)
    assert float((ours[fin] - sdpa[fin]).abs().max()) < SDPA_FP64_ATOL


def test_all_minus_inf_scores_are_nan_not_empty():
    """A row that attends keys whose scores are all -inf (from infinite inputs) is NaN, not 'empty'.

    Deliberate: recent PyTorch SDPA uses a "safe softmax" and returns 0 here, which cannot be told
    apart from a masked row; an infinite input is a fault, so sparseattn keeps it visible (0/0).
    """
    q, k, v = _inputs(1, 1, 1, 4, 4, 8, torch.float64, seed=3)
    q[0, 0, 2] = 0.0
    q[0, 0, 2, 0] = math.inf
    k[0, 0, :, 0] = -1.0  # q·k = -inf for every key of row 2
    ours = reference_attention(q, k, v)
    assert torch.isnan(ours.out[0, 0, 2]).all() and ours.lse[0, 0, 2] == -math.inf
    assert torch.isfinite(ours.out[0, 0, [0, 1, 3]]).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("where,pos,value", CASES)
def test_kernel_nonfinite_matches_reference_pattern(where, pos, value, causal, dtype):
    from sparseattn.ops import triton_launch

    if INTERP and dtype == torch.bfloat16 and where != "v":
        pytest.skip("interpreter: one dtype for q/k cases is enough (bf16 covered for v)")
    B, H, Hkv, N, D = 1, 4, 2, 150, 64  # the kernel's smallest head_dim
    q, k, v = _inputs(B, H, Hkv, N, N, D, dtype, seed=4)
    layout = _layout_with_gap(B, H, N, causal)
    q, k, v = q.to(DEV), k.to(DEV), v.to(DEV)
    layout = layout.to(DEV) if hasattr(layout, "to") else layout
    clean = triton_launch.block_sparse_fwd(q, k, v, layout=layout, causal=causal)
    t = {"q": q, "k": k, "v": v}
    t[where] = _poison(t[where], pos, value)
    got = triton_launch.block_sparse_fwd(t["q"], t["k"], t["v"], layout=layout, causal=causal)
    mask = _element_mask(B, H, N, N, causal, layout)
    bad = _judge_bad(where, pos, t["q"], t["k"], t["v"], mask)
    touched = _expected_bad(where, pos, mask, D, H // Hkv)
    got_bad = ~torch.isfinite(got.out.cpu())
    if where == "v":
        # the kernel's documented superset: channel d of the rows of a 128-row-aligned query tile that holds
        # a row attending key j (0 * NaN in that tile's P·V product); nothing else
        tile = _tile_superset(touched)
        assert torch.equal(got_bad & bad, bad), f"kernel {dtype}: a row that attends the bad key is finite"
        assert not bool((got_bad & ~tile).any()), f"kernel {dtype}: NaN outside the diagonal tile of the bad key"
        touched = tile
    else:
        assert torch.equal(got_bad, bad), f"kernel {dtype}: non-finite pattern differs"
    # outputs that never see the fault: bitwise equal to the clean run
    assert torch.equal(got.out.cpu()[~touched], clean.out.cpu()[~touched])
    empty = ~mask.any(-1)
    assert torch.all(got.out.cpu()[empty] == 0) and torch.all(got.lse.cpu()[empty] == -math.inf)
    ref = reference_attention(t["q"].double(), t["k"].double(), t["v"].double(), causal=causal, layout=layout)
    assert torch.equal(torch.isfinite(ref.out).cpu(), ~bad)
    assert torch.equal(torch.isfinite(got.lse).cpu() | empty, torch.isfinite(ref.lse).cpu() | empty)


def _tile_superset(touched: torch.Tensor, tile: int = 128) -> torch.Tensor:
    """``touched`` widened to whole ``tile``-row aligned query tiles (per batch, head, channel)."""
    B, H, N, D = touched.shape
    pad = (-N) % tile
    t = torch.nn.functional.pad(touched, (0, 0, 0, pad)).reshape(B, H, -1, tile, D)
    return t.any(3, keepdim=True).expand_as(t).reshape(B, H, -1, D)[:, :, :N]


def test_kernel_all_minus_inf_first_tile_then_finite():
    """Full (unmasked) tiles: a row whose first tile scores are all -inf continues with later tiles."""
    from sparseattn.ops import triton_launch

    B, H, N, D = 1, 1, 128, 64
    q, k, v = _inputs(B, H, H, N, N, D, torch.float16, seed=5)
    q = q.to(DEV)
    k, v = k.to(DEV), v.to(DEV)
    q[0, 0, :, 0] = math.inf
    q[0, 0, :, 1:] = 0
    k[0, 0, :64, 0] = -1.0  # keys of block 0: score -inf for every row
    k[0, 0, 64:, 0] = 0.0   # keys of block 1: inf * 0 = NaN -> every row NaN in SDPA too
    got = triton_launch.block_sparse_fwd(q, k, v, layout=None, causal=False)
    ref = reference_attention(q.double(), k.double(), v.double())
    assert torch.equal(torch.isfinite(got.out), torch.isfinite(ref.out))


def test_masked_sdpa_path_nonfinite_matches_reference():
    B, H, Hkv, N, D = 1, 4, 2, 150, 16
    layout = _layout_with_gap(B, H, N, True)
    for where, pos, value in CASES:
        q, k, v = _inputs(B, H, Hkv, N, N, D, torch.float32, seed=6)
        t = {"q": q, "k": k, "v": v}
        t[where] = _poison(t[where], pos, value)
        with pytest.warns(RuntimeWarning, match="non-finite"):
            got = masked_sdpa_attention(t["q"], t["k"], t["v"], layout)
        ref = reference_attention(t["q"], t["k"], t["v"], causal=True, layout=layout).out
        assert torch.equal(torch.isfinite(got), torch.isfinite(ref)), (where, pos)
        fin = torch.isfinite(ref)
        assert float((got[fin] - ref[fin]).abs().max()) < FP32_ATOL


def test_merge_propagates_nonfinite_and_ignores_empty_states():
    g = torch.Generator().manual_seed(7)
    o1, o2 = torch.randn(1, 2, 5, 4, generator=g), torch.randn(1, 2, 5, 4, generator=g)
    l1, l2 = torch.randn(1, 2, 5, generator=g), torch.randn(1, 2, 5, generator=g)
    o1n = o1.clone()
    o1n[0, 0, 1, 2] = math.nan
    got = merge_states([(o1n, l1), (o2, l2)])
    assert torch.isnan(got.out[0, 0, 1, 2]) and int(torch.isnan(got.out).sum()) == 1
    l1n = l1.clone()
    l1n[0, 1, 3] = math.nan
    got = merge_states([(o1, l1n), (o2, l2)])
    assert torch.isnan(got.out[0, 1, 3]).all() and torch.isnan(got.lse[0, 1, 3])
    assert int(torch.isnan(got.out).sum()) == 4 and int(torch.isnan(got.lse).sum()) == 1
    l1i = l1.clone()
    l1i[0, 0, 0] = math.inf
    got = merge_states([(o1, l1i), (o2, l2)])
    assert not torch.isfinite(got.out[0, 0, 0]).any() and not torch.isfinite(got.lse[0, 0, 0])
    # a far weaker state (weight underflows to 0) holding NaN still poisons the row: it attended keys
    l1w = l1.clone()
    l1w[0, 0, 1] = -1e4
    got = merge_states([(o1n, l1w), (o2, l2)])
    assert torch.isnan(got.out[0, 0, 1, 2])
    # an empty state (lse -inf) is the identity even if its out holds NaN/inf
    oe = torch.full_like(o1, math.nan)
    le = torch.full_like(l1, -math.inf)
    got = merge_states([(oe, le), (o2, l2)])
    assert torch.allclose(got.out, o2) and torch.allclose(got.lse, l2)
    got = merge_states([(oe, le), (oe, le)])
    assert torch.all(got.out == 0) and torch.all(got.lse == -math.inf)


PREDICTORS = ["mean_sim", "mean_sim:score=mixed,cdf_threshold=0.97,keep_local=8", "mean_sim:topk=0.2,cdf_threshold=None,keep_local=0",
              "sketch_walk", "oracle:cdf_threshold=0.5"]


@pytest.mark.parametrize("spec", PREDICTORS)
@pytest.mark.parametrize("where", ["q", "k"])
def test_predictors_keep_nonfinite_blocks(spec, where):
    """A predictor never drops a block holding NaN: sparse attention is non-finite where dense is."""
    B, H, Hkv, N, D = 1, 4, 2, 64 * 8, 32
    q, k, v = _inputs(B, H, Hkv, N, N, D, torch.float32, seed=8)
    # a key block far from the diagonal (not kept by local/sink rules), and a query row mid-sequence
    pos = (0, 1, 200, 3) if where == "q" else (0, 1, 140, 3)
    t = {"q": q, "k": k, "v": v}
    t[where] = _poison(t[where], pos, math.nan)
    pred = parse_predictor_spec(spec)
    layout = pred.predict(t["q"], t["k"], causal=True)
    out = sparseattn.attention(t["q"], t["k"], t["v"], causal=True, layout=layout).out
    dense = reference_attention(t["q"], t["k"], t["v"], causal=True).out
    assert torch.equal(torch.isfinite(out), torch.isfinite(dense)), spec
    if where == "k" and spec.startswith("mean_sim"):
        assert torch.isnan(pred.last_scores).any(), "the non-finite value must show in the scores"
