"""Merging attention states over disjoint key sets is exact."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sparseattn import AttentionState, merge_state, merge_states, reference_attention, segmented_attention
from sparseattn.ops.reference import sdpa_reference
from sparseattn.testing.inputs import random_qkv
from sparseattn.testing.tolerances import ATOL_FLOOR, HALF_ATOL, MERGE_FP32_ATOL, MERGE_FP64_ATOL, SDPA_FP64_ATOL


# the Triton merge runs on CUDA when there is one, else under the interpreter (conftest sets TRITON_INTERPRET)
TDEV = "cuda" if torch.cuda.is_available() else "cpu"


def _cuts(n, parts, gen):
    inner = torch.randperm(n - 1, generator=gen)[: parts - 1] + 1
    return [0, *sorted(int(x) for x in inner), n]


@given(parts=st.integers(2, 8), nq=st.integers(1, 40), extra=st.integers(0, 60), group=st.sampled_from([1, 3, 4]),
       seed=st.integers(0, 9999))
def test_merge_of_random_segments_equals_whole(parts, nq, extra, group, seed):
    nkv = parts + extra
    q, k, v = random_qkv(2, 2 * group, nq, 8, kv_heads=2, seqlen_kv=nkv, dtype=torch.float64, seed=seed)
    cuts = _cuts(nkv, parts, torch.Generator().manual_seed(seed))
    states = [reference_attention(q, k[:, :, a:b], v[:, :, a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
    whole = reference_attention(q, k, v)
    merged = merge_states(states)
    assert float((merged.out - whole.out).abs().max()) <= MERGE_FP64_ATOL
    assert float((merged.lse - whole.lse).abs().max()) <= MERGE_FP64_ATOL
    assert float((merged.out - sdpa_reference(q, k, v)).abs().max()) <= SDPA_FP64_ATOL
    seg = segmented_attention(q, [k[:, :, a:b] for a, b in zip(cuts[:-1], cuts[1:])],
                              [v[:, :, a:b] for a, b in zip(cuts[:-1], cuts[1:])], backend="reference")
    assert float((seg.out - whole.out).abs().max()) <= MERGE_FP64_ATOL
    # pairwise left fold gives the same answer
    acc = states[0]
    for s in states[1:]:
        acc = merge_state(acc, s)
    assert float((acc.out - whole.out).abs().max()) <= MERGE_FP64_ATOL


def test_merge_of_causal_segments_equals_sdpa_with_mask():
    # split a causal op by key ranges: each segment keeps the global causal mask as a layout-free slice
    q, k, v = random_qkv(1, 2, 50, 8, seqlen_kv=90, dtype=torch.float64, seed=1)
    off = 90 - 50
    states = []
    for a, b in ((0, 30), (30, 61), (61, 90)):
        r = torch.arange(50)[:, None]
        c = torch.arange(a, b)[None, :]
        allowed = c <= r + off
        s = torch.einsum("bhnd,bhmd->bhnm", q, k[:, :, a:b]) * 8 ** -0.5
        s = s.masked_fill(~allowed, -math.inf)
        lse = torch.logsumexp(s, -1)
        p = torch.exp(s - lse.unsqueeze(-1).nan_to_num(neginf=0.0))
        out = torch.nan_to_num(p) @ v[:, :, a:b]
        states.append(AttentionState(out, lse))
    merged = merge_states(states)
    assert float((merged.out - sdpa_reference(q, k, v, causal=True)).abs().max()) <= SDPA_FP64_ATOL
    assert float((merged.lse - reference_attention(q, k, v, causal=True).lse).abs().max()) <= MERGE_FP64_ATOL


def test_empty_state_is_identity_even_with_garbage_out():
    q, k, v = random_qkv(1, 2, 16, 8, dtype=torch.float64, seed=2)
    s = reference_attention(q, k, v)
    empty = AttentionState(torch.full_like(s.out, float("nan")), torch.full_like(s.lse, -math.inf))
    for merged in (merge_state(s, empty), merge_state(empty, s), merge_states([empty, s, empty])):
        assert torch.equal(merged.out, s.out) and torch.equal(merged.lse, s.lse)
    both = merge_state(empty, empty)
    assert torch.equal(both.out, torch.zeros_like(s.out)) and bool(torch.isneginf(both.lse).all())


def test_partially_empty_rows():
    q, k, v = random_qkv(1, 1, 6, 4, seqlen_kv=3, dtype=torch.float64, seed=3)
    causal = reference_attention(q, k, v, causal=True)  # rows 0..2 empty
    assert bool(torch.isneginf(causal.lse[0, 0, :3]).all())
    m = merge_state(causal, causal)
    assert torch.equal(m.out[0, 0, :3], torch.zeros(3, 4, dtype=torch.float64))
    assert float((m.out - causal.out).abs().max()) <= MERGE_FP64_ATOL
    assert float((m.lse[0, 0, 3:] - causal.lse[0, 0, 3:] - math.log(2)).abs().max()) <= MERGE_FP64_ATOL


def test_merge_dtypes():
    q, k, v = random_qkv(1, 2, 16, 8, dtype=torch.float16, seed=4)
    a = reference_attention(q, k[:, :, :8], v[:, :, :8])
    b = reference_attention(q, k[:, :, 8:], v[:, :, 8:])
    m = merge_state(a, b)
    assert m.out.dtype == torch.float16 and m.lse.dtype == torch.float32
    whole = reference_attention(q, k, v)
    assert float((m.out.float() - whole.out.float()).abs().max()) < HALF_ATOL
    assert merge_states([a]).out.dtype == torch.float16


@pytest.mark.parametrize(
    "states,match",
    [
        ([], r"merge_states: states must be a non-empty sequence"),
        ("ab", r"merge_states: states must be a non-empty sequence"),
        ([(torch.zeros(1, 1, 2, 4),)], r"merge_states: states\[0\] must be an \(out, lse\) pair"),
        ([(torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 3))], r"merge_states: states\[0\] has inconsistent shapes"),
        ([(torch.zeros(1, 2, 4), torch.zeros(1, 2))], r"merge_states: states\[0\] has inconsistent shapes"),
        ([(torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2)), (torch.zeros(1, 1, 3, 4), torch.zeros(1, 1, 3))],
         r"merge_states: states\[1\] has different shapes from states\[0\]"),
        ([(torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, dtype=torch.int64))], r"merge_states: states\[0\] must hold floating"),
    ],
)
def test_merge_bad_input(states, match):
    with pytest.raises(ValueError, match=match):
        merge_states(states)


def test_segmented_attention_bad_input():
    q, k, v = random_qkv(1, 2, 8, 4, seed=0)
    with pytest.raises(ValueError, match=r"segmented_attention: k_segments/v_segments must be non-empty and of equal length"):
        segmented_attention(q, [k], [])
    with pytest.raises(ValueError, match=r"segmented_attention\[segment 1\]: k head_dim differs from q"):
        segmented_attention(q, [k, k[..., :2]], [v, v[..., :2]])


# --------------------------------------------------------------------------- the Triton merge (kernel vs reference)
def _states(S, B, H, N, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(B, H, N, D, generator=g).to(dtype).to(TDEV) for _ in range(S)]
    lse = [(torch.randn(B, H, N, generator=g) * 4).to(TDEV) for _ in range(S)]
    return out, lse


@pytest.mark.parametrize("S", [1, 2, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [8, 24, 64])
def test_triton_merge_matches_the_reference(S, dtype, D):
    out, lse = _states(S, 2, 3, 37, D, dtype, seed=S * 100 + D)
    lse[0][0, 1, :5] = -math.inf  # some rows with an empty first state
    for s in range(S):
        lse[s][1, 2, 7] = -math.inf  # a row empty in every state: out 0, lse -inf
        out[s][1, 2, 7] = float("nan")  # ... whatever the dead states' out holds
    states = list(zip(out, lse))
    ref = merge_states(states)
    got = merge_states(states, backend="triton")
    assert got.out.dtype == ref.out.dtype and got.lse.dtype == ref.lse.dtype == torch.float32
    # both round the fp32 sum to the output dtype: equal, or one unit apart where the sums straddle a rounding point
    tol = ATOL_FLOOR[dtype] if dtype != torch.float32 else MERGE_FP32_ATOL
    torch.testing.assert_close(got.out.float(), ref.out.float(), atol=tol, rtol=0 if dtype == torch.float32 else tol)
    torch.testing.assert_close(got.lse, ref.lse, atol=MERGE_FP32_ATOL, rtol=0)
    assert float(got.out[1, 2, 7].abs().max()) == 0.0 and got.lse[1, 2, 7] == -math.inf


def test_triton_merge_non_finite_semantics_match_the_reference():
    out, lse = _states(3, 1, 2, 9, 16, torch.float32, seed=7)
    lse[1][0, 0, 0] = float("nan")  # NaN lse: out and lse NaN
    lse[2][0, 0, 1] = math.inf  # +inf lse: out NaN, lse +inf (as logsumexp)
    out[0][0, 1, 2, 3] = float("nan")  # NaN out of a live state: reaches the merged out
    lse[1][0, 1, 4] = -math.inf
    out[1][0, 1, 4] = float("inf")  # inf out of a dead state: ignored
    states = list(zip(out, lse))
    ref, got = merge_states(states), merge_states(states, backend="triton")
    torch.testing.assert_close(got.out, ref.out, atol=MERGE_FP32_ATOL, rtol=0, equal_nan=True)
    torch.testing.assert_close(got.lse, ref.lse, atol=MERGE_FP32_ATOL, rtol=0, equal_nan=True)
    assert torch.isnan(got.out[0, 0, 0]).all() and torch.isnan(got.lse[0, 0, 0])
    assert torch.isnan(got.out[0, 0, 1]).all() and got.lse[0, 0, 1] == math.inf
    assert torch.isnan(got.out[0, 1, 2, 3]) and torch.isfinite(got.out[0, 1, 2, :3]).all()
    assert torch.isfinite(got.out[0, 1, 4]).all()


def test_triton_merge_of_segments_equals_whole_attention():
    q, k, v = (t.to(TDEV) for t in random_qkv(1, 4, 33, 16, kv_heads=2, seqlen_kv=90, dtype=torch.float32, seed=3))
    states = [reference_attention(q, k[:, :, a:b], v[:, :, a:b]) for a, b in ((0, 20), (20, 21), (21, 90))]
    whole = reference_attention(q, k, v)
    got = merge_states(states, backend="triton")
    torch.testing.assert_close(got.out, whole.out, atol=MERGE_FP32_ATOL, rtol=0)
    torch.testing.assert_close(got.lse, whole.lse, atol=MERGE_FP32_ATOL, rtol=0)


def test_triton_merge_bad_input():
    out, lse = _states(2, 1, 1, 4, 8, torch.float64, seed=1)
    with pytest.raises(ValueError, match=r"^merge_states: states hold float64 tensors"):
        merge_states(list(zip(out, [t.double() for t in lse])), backend="triton")
    with pytest.raises(ValueError, match=r"^merge_states: backend is not a merge backend; expected one of \['auto', 'triton', 'reference'\], got 'cuda'$"):
        merge_states(list(zip(out, lse)), backend="cuda")


# --------------------------------------------------------------------------- the merge as registered operators
def test_merge_operators_are_registered_and_dispatched():
    from sparseattn.ops.registry import get_operator, operators
    from sparseattn.state.merge import merge_backends

    assert [op.name for op in operators("merge", entry_point="merge")] == ["merge_triton", "merge_reference"]
    assert merge_backends() == ("auto", "triton", "reference")
    kernel = get_operator("merge_triton")
    assert kernel.custom_op == "sparseattn::merge_states_triton" and kernel.describe()["kind"] == "merge"
    out, lse = _states(3, 2, 3, 11, 16, torch.float32, seed=4)
    states = list(zip(out, lse))
    ref = merge_states(states)
    # auto: the kernel where it is preferred (CUDA), else the reference (the interpreter is never the automatic choice)
    auto = merge_states(states, backend="auto")
    if TDEV == "cpu":
        assert torch.equal(auto.out, ref.out) and torch.equal(auto.lse, ref.lse)
    else:
        torch.testing.assert_close(auto.out, merge_states(states, backend="triton").out, rtol=0, atol=0)
    refused = kernel.refusal_fn()(out[0].double())
    assert refused == "float64 states (the kernel accumulates in float32)"
    # float64 states: auto takes the reference (the kernel refuses them)
    st64 = [(o.double(), l.double()) for o, l in states]
    assert merge_states(st64, backend="auto").lse.dtype == torch.float64


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_merge_custom_ops(backend):
    """The merge as torch.library ops: opcheck (schema, fake, aot dispatch), equal to merge_states, compiled
    with fullgraph=True (reference) without a graph break."""
    from sparseattn.ops.custom_ops import MERGE_REF_OP, MERGE_TRITON_OP, merge_states_op

    out, lse = _states(3, 1, 2, 9, 16, torch.float32, seed=8)
    op = torch.ops.sparseattn.merge_states_ref if backend == "reference" else torch.ops.sparseattn.merge_states_triton
    assert {MERGE_REF_OP, MERGE_TRITON_OP} == {"sparseattn::merge_states_ref", "sparseattn::merge_states_triton"}
    torch.library.opcheck(op, (out, lse))
    got = merge_states_op(list(zip(out, lse)), backend=backend)
    ref = merge_states(list(zip(out, lse)), backend=backend)
    assert torch.equal(got.out, ref.out) and torch.equal(got.lse, ref.lse)
    if backend == "reference":
        compiled = torch.compile(lambda o, l: merge_states_op(list(zip(o, l)), backend="reference").out,
                                 fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(out, lse), ref.out, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"^merge_states_op: backend is unknown; expected one of "
                                         r"\['auto', 'triton', 'reference'\], got 'x'$"):
        merge_states_op(list(zip(out, lse)), backend="x")
    with pytest.raises(ValueError, match=r"^merge_states_op: states must be a non-empty sequence"):
        merge_states_op([], backend=backend)
