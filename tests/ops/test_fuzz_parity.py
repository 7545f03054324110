"""Property-based parity (hypothesis): reference == SDPA, Triton kernel == reference, merge == whole.

Cases come from :mod:`sparseattn.testing.fuzz` (shared with ``benchmarks/gpu_fuzz.py``): random B
(1-2), H_kv (1-4) with GQA groups 1/2/4, odd / tiny / block-crossing N_q and N_kv (1..200, either
longer), causal or not, every layout pattern (local, strided, random, block-diagonal, sink+window,
dense, causal, ``pattern_at_density`` at random densities), random per-head block masks, emptied
query blocks (rows that attend nothing: out 0, lse -inf), layouts built non-causal but used
causally, stride-0 and contiguous layouts with garbage padding entries, non-contiguous q/k/v
(``(B, N, H, D)`` storage viewed as ``(B, H, N, D)``, sliced, head-strided, non-unit last stride,
stride-0 batch), explicit scales, input magnitudes 0.25-4, and a fresh hypothesis-drawn seed per
example for every ``torch.Generator``.

Properties (examples per CI run, from ``EXAMPLES`` below):

=====================================================  ========
(a) ``reference_attention`` == SDPA with the same mask        250
    (float64: ``SDPA_FP64_ATOL``, out and lse; float32 by the ratio rule)
(b) Triton kernel (interpreter) vs reference, ratio rule      200
    (out and lse; NaN-poisoned ``out=``/``lse=`` fully written; empty rows exactly 0 / -inf)
(b') the launcher's refusals (head_dim, block size, dtype)      25
(c) ``merge_states`` of 2-5 random key splits == whole        250
    (contiguous / random block splits, any layout, causal; element-level splits by gather)
(d) ``pv_threshold``: kernel tile counts == reference's,       50
    out/lse by the ratio rule
(e) a query window (``fuzz.query_window``, what the GPU       150
    script checks on long cases) == those rows of the whole problem
-----------------------------------------------------  --------
total per CI run (``TOTAL_EXAMPLES``)                         925
=====================================================  ========

Measured on the 2-core CI machine (TRITON_INTERPRET=1): about 65 s for the module when the machine
is otherwise idle (the kernel properties take 80% of it), up to about 2.5 minutes under load.
``SPARSEATTN_FUZZ_EXAMPLES=<factor>`` multiplies every count (long local runs, e.g. 20);
``SPARSEATTN_FUZZ_RANDOM=1`` draws fresh examples instead of the derandomized CI sequence;
``SPARSEATTN_FUZZ_SHRINK=1`` draws every choice through hypothesis so that failures shrink.
"""

from __future__ import annotations

import math
import os
import random

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from sparseattn.layout.block_layout import BlockLayout, cdiv
from sparseattn.ops.reference import reference_attention, sdpa_reference
from sparseattn.state.merge import merge_states
from sparseattn.testing import fuzz
from sparseattn.testing.tolerances import MERGE_FP64_ATOL, SDPA_FP64_ATOL, check_ratio

EXAMPLES = {"reference": 250, "kernel": 200, "refusal": 25, "merge": 250, "pv": 50, "window": 150}
_FACTOR = float(os.environ.get("SPARSEATTN_FUZZ_EXAMPLES", "1") or "1")
_RANDOM = os.environ.get("SPARSEATTN_FUZZ_RANDOM", "0") not in ("", "0")
TOTAL_EXAMPLES = sum(EXAMPLES.values())
assert TOTAL_EXAMPLES == 925 >= 500  # the module docstring's table; CI must run at least 500 examples


def _settings(name: str) -> settings:
    n = max(1, int(round(EXAMPLES[name] * _FACTOR)))
    return settings(max_examples=n, deadline=None, derandomize=not _RANDOM, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class _Draws:
    """:class:`sparseattn.testing.fuzz.Source` over hypothesis draws (so failing cases shrink)."""

    def __init__(self, draw) -> None:  # noqa: ANN001
        self.draw = draw

    def integer(self, lo: int, hi: int) -> int:
        return self.draw(st.integers(lo, hi))

    def choice(self, options):  # noqa: ANN001, ANN201
        return self.draw(st.sampled_from(list(options)))

    def uniform(self, lo: float, hi: float) -> float:
        return self.draw(st.floats(lo, hi, allow_nan=False, allow_infinity=False))

    def chance(self, p: float) -> bool:
        if p == 0.5:
            return self.draw(st.booleans())
        return self.draw(st.integers(0, 99)) >= round((1.0 - p) * 100)


_SHRINK = os.environ.get("SPARSEATTN_FUZZ_SHRINK", "0") not in ("", "0")


@st.composite
def cases(draw, space: fuzz.CaseSpace, **fixed):  # noqa: ANN001, ANN201
    """A :class:`~sparseattn.testing.fuzz.FuzzCase` from ``space`` (``fixed`` pins fields).

    By default every choice comes from a ``random.Random`` that hypothesis seeds per example: the
    case distribution is the one ``fuzz.draw_case`` designs (hypothesis's own draws, with many
    choices per example, repeat the simplest values and left most examples tiny, non-causal and
    contiguous). ``SPARSEATTN_FUZZ_SHRINK=1`` draws every choice through hypothesis instead, so a
    failing case shrinks (for debugging a failure found in the default mode).
    """
    if _SHRINK:
        return fuzz.draw_case(_Draws(draw), space, **fixed)
    rng = draw(st.randoms(use_true_random=True))
    return fuzz.draw_case(fuzz.RandomSource(rng), space, **fixed)


def _kernel_available() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - triton is a Linux dependency
        return f"triton is not importable: {exc}"
    from sparseattn.ops.triton_launch import interpret_mode

    if not torch.cuda.is_available() and not interpret_mode():
        return "no CUDA and TRITON_INTERPRET is not set (tests/conftest.py sets it before triton is imported)"
    return None


needs_kernel = pytest.mark.skipif(_kernel_available() is not None, reason=str(_kernel_available()))
KDEV = "cuda" if torch.cuda.is_available() else "cpu"


def _lse_oracle(q: torch.Tensor, k: torch.Tensor, causal: bool, layout: BlockLayout | None,
                scale: float | None) -> torch.Tensor:
    """Dense masked natural-log logsumexp (N_q x N_kv), in q's dtype."""
    B, H, Nq, D = q.shape
    Nkv = k.shape[2]
    kk = k.repeat_interleave(H // k.shape[1], dim=1)
    s = torch.einsum("bhnd,bhmd->bhnm", q, kk) * (D ** -0.5 if scale is None else scale)
    if layout is not None:
        mask = layout.element_mask(causal=causal)
    else:
        mask = torch.ones(B, H, Nq, Nkv, dtype=torch.bool)
        if causal:
            mask = mask & (torch.arange(Nkv)[None, :] <= torch.arange(Nq)[:, None] + Nkv - Nq)
    return torch.logsumexp(s.masked_fill(~mask, -math.inf), dim=-1)


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


# ---------------------------------------------------------------------------------------------- (a)
@_settings("reference")
@given(case=cases(fuzz.REFERENCE_SPACE, dtype="float64"), fp32=st.booleans(), chunk=st.sampled_from([256, 1, 7, 64]))
def test_reference_matches_sdpa(case: fuzz.FuzzCase, fp32: bool, chunk: int) -> None:
    """(a) blockwise reference == SDPA with the same element mask; empty rows out 0 / lse -inf."""
    q, k, v = fuzz.make_qkv(case)
    lay = fuzz.build_layout(case)
    ref = reference_attention(q, k, v, causal=case.causal, layout=lay, scale=case.scale, chunk_size=chunk)
    empty = fuzz.expected_empty_rows(lay, case.B, case.H, case.Nq, case.Nkv, case.causal)
    assert torch.equal(torch.isneginf(ref.lse), empty), "lse is -inf exactly on the rows that attend nothing"
    assert bool((ref.out[empty] == 0).all()) and bool(torch.isfinite(ref.out).all())
    want = sdpa_reference(q, k, v, causal=case.causal, layout=lay, scale=case.scale)
    want_lse = _lse_oracle(q, k, case.causal, lay, case.scale)
    assert _max_abs(ref.out, want) <= SDPA_FP64_ATOL
    fin = ~empty
    assert _max_abs(ref.lse[fin], want_lse[fin]) <= SDPA_FP64_ATOL
    if fp32:  # the same inputs in float32: ratio rule against SDPA in float32, both judged by float64
        q32, k32, v32 = (t.float() for t in (q, k, v))
        r32 = reference_attention(q32, k32, v32, causal=case.causal, layout=lay, scale=case.scale, chunk_size=chunk)
        assert r32.out.dtype == torch.float32 and r32.lse.dtype == torch.float32
        check_ratio(r32.out, want, sdpa_reference(q32, k32, v32, causal=case.causal, layout=lay, scale=case.scale))
        check_ratio(r32.lse, want_lse, _lse_oracle(q32, k32, case.causal, lay, case.scale), "lse")


# ---------------------------------------------------------------------------------------------- (b)
_SUBTILES = [None, (64, 64), (64, 32), (128, 64)]


@needs_kernel
@_settings("kernel")
@given(case=cases(fuzz.KERNEL_CPU_SPACE), via=st.sampled_from(["launcher", "launcher", "dispatch"]),
       tiles=st.sampled_from(_SUBTILES))
def test_kernel_matches_reference(case: fuzz.FuzzCase, via: str, tiles: tuple[int, int] | None) -> None:
    """(b) Triton kernel vs the float64 reference by the ratio rule; every output element written."""
    from sparseattn.ops.attention import attention
    from sparseattn.ops.triton_launch import block_sparse_fwd

    q, k, v = fuzz.make_qkv(case, KDEV)
    lay = fuzz.build_layout(case, KDEV)
    if via == "dispatch":
        out, lse = attention(q, k, v, causal=case.causal, layout=lay, scale=case.scale, backend="triton")
    else:
        config = None
        if tiles is not None and lay is not None and lay.block_m % tiles[0] == 0 and lay.block_n % tiles[1] == 0:
            config = {"BLOCK_M": tiles[0], "BLOCK_N": tiles[1], "num_warps": 4, "num_stages": 1}
        out, lse = fuzz.poisoned_outputs(case, KDEV)
        res = block_sparse_fwd(q, k, v, layout=lay, causal=case.causal, scale=case.scale, out=out, lse=lse,
                               config=config)
        assert res.out is out and res.lse is lse
    rep = fuzz.check_kernel(q, k, v, lay, case.causal, out, lse, scale=case.scale)
    event(f"recipe {case.recipe}")
    event("has empty rows" if rep["empty_rows"] else "no empty rows")
    assert rep["ok"], f"{case.short()}: {rep['failures']}"
    assert rep["rows_checked"] + rep["empty_rows"] // (case.B * case.H) >= case.Nq or rep["empty_rows"] > 0


@needs_kernel
@_settings("refusal")
@given(case=cases(fuzz.KERNEL_CPU_SPACE, recipe="dense"), what=st.sampled_from(["head_dim", "block", "dtype"]),
       bad=st.integers(0, 3))
def test_kernel_refusals(case: fuzz.FuzzCase, what: str, bad: int) -> None:
    """(b') what the launcher does not support raises NotImplementedError naming the reason (never wrong numbers)."""
    from sparseattn.ops.attention import attention
    from sparseattn.ops.triton_launch import block_sparse_fwd, refusal

    if what == "head_dim":
        case = fuzz.FuzzCase(**{**case.to_json(), "D": (16, 32, 48, 96)[bad]})
        needle = f"head_dim {case.D}"
    elif what == "block":
        bs = (16, 32, 256, 48)[bad]
        case = fuzz.FuzzCase(**{**case.to_json(), "block_m": bs})
        needle = f"block_m={bs}"
    else:
        case = fuzz.FuzzCase(**{**case.to_json(), "dtype": ("float32", "float64")[bad % 2]})
        needle = case.dtype
    q, k, v = fuzz.make_qkv(case, KDEV)
    lay = fuzz.build_layout(case, KDEV)
    assert needle in str(refusal(q, k=k, v=v, layout=lay, causal=case.causal))
    with pytest.raises(NotImplementedError, match=needle):
        block_sparse_fwd(q, k, v, layout=lay, causal=case.causal)
    with pytest.raises(NotImplementedError, match=needle):
        attention(q, k, v, layout=lay, causal=case.causal, backend="triton")


# ---------------------------------------------------------------------------------------------- (c)
@_settings("merge")
@given(case=cases(fuzz.REFERENCE_SPACE, dtype="float64"), mode=st.sampled_from(["blocks", "random-blocks", "keys"]),
       parts=st.integers(2, 5), split_seed=st.integers(0, 2**31 - 1))
def test_merge_of_random_key_splits_equals_whole(case: fuzz.FuzzCase, mode: str, parts: int, split_seed: int) -> None:
    """(c) attention over disjoint key subsets, merged with merge_states, == attention over all keys.

    ``blocks``: contiguous runs of key blocks; ``random-blocks``: each key block to a random part
    (non-contiguous); both restrict the case's layout (any pattern, causal) per part. ``keys``:
    each key to a random part, the part's keys gathered (non-causal, no layout). Parts may be empty
    for some rows or entirely (an explicit empty state: lse -inf, out NaN garbage — the identity).
    """
    if mode == "keys":
        case = fuzz.FuzzCase(**{**case.to_json(), "recipe": "none", "causal": False, "empty_frac": 0.0,
                                "contiguous_layout": False})
    q, k, v = fuzz.make_qkv(case)
    rng = random.Random(split_seed)
    B, H, Nq, D = q.shape
    states = []
    if mode == "keys":
        whole = reference_attention(q, k, v, scale=case.scale)
        owner = torch.tensor([rng.randrange(parts) for _ in range(case.Nkv)])
        for p in range(parts):
            idx = (owner == p).nonzero().squeeze(1)
            if idx.numel() == 0:
                garbage = torch.full_like(whole.out, float("nan"))
                states.append((garbage, torch.full_like(whole.lse, -math.inf)))
                continue
            states.append(reference_attention(q, k[:, :, idx], v[:, :, idx], scale=case.scale))
    else:
        lay = fuzz.build_layout(case)
        bm, bn = case.block_m, case.block_n
        if lay is None:
            mask = torch.ones(B, H, cdiv(Nq, bm), cdiv(case.Nkv, bn), dtype=torch.bool)
        else:
            mask = lay.to_dense_mask()
        whole = reference_attention(q, k, v, causal=case.causal, layout=lay, scale=case.scale)
        Nb = mask.shape[-1]
        if mode == "blocks":
            cuts = sorted(rng.sample(range(1, Nb), min(parts - 1, Nb - 1))) if Nb > 1 else []
            bounds = [0, *cuts, Nb]
            owner = torch.zeros(Nb, dtype=torch.long)
            for p, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
                owner[a:b] = p
        else:
            owner = torch.tensor([rng.randrange(parts) for _ in range(Nb)])
        for p in range(parts):
            pm = mask & (owner == p)
            part_lay = BlockLayout.from_dense_mask(pm, block_m=bm, block_n=bn, seqlen_q=Nq, seqlen_kv=case.Nkv)
            states.append(reference_attention(q, k, v, causal=case.causal, layout=part_lay, scale=case.scale))
    rng.shuffle(states)
    merged = merge_states(states)
    assert torch.equal(torch.isneginf(merged.lse), torch.isneginf(whole.lse))
    fin = torch.isfinite(whole.lse)
    assert _max_abs(merged.lse[fin], whole.lse[fin]) <= MERGE_FP64_ATOL
    assert _max_abs(merged.out, whole.out) <= MERGE_FP64_ATOL
    assert bool((merged.out[~fin] == 0).all())


# ---------------------------------------------------------------------------------------------- (d)
@needs_kernel
@_settings("pv")
@given(case=cases(fuzz.KERNEL_CPU_SPACE, recipe="random", layout_causal=False, q_layout="contiguous"),
       thr=st.sampled_from([4.0, 2.0, 8.0]), sink=st.sampled_from([8.0, 12.0, 0.0]))
def test_kernel_pv_threshold_stats_match_reference(case: fuzz.FuzzCase, thr: float, sink: float) -> None:
    """(d) with ``pv_threshold`` the kernel skips exactly the reference's tiles (counts) and stays within the ratio rule.

    An attention sink (the first keys share a direction with every query, as in the existing
    kernel test) makes later tiles fall far below the running max, so the rule fires.
    """
    from sparseattn.ops.triton_launch import block_sparse_fwd

    if case.Nkv <= case.block_n:  # at least two key blocks, so that a tile after the sink can be skipped
        case = fuzz.FuzzCase(**{**case.to_json(), "Nkv": case.Nkv + 2 * case.block_n})
    q, k, v = fuzz.make_qkv(case, KDEV)
    if sink > 0:
        gen = torch.Generator().manual_seed(case.seed + 3)
        w = torch.randn(case.D, generator=gen)
        w = (w / w.norm() * sink * (case.D / 64) ** 0.5).to(q.dtype).to(KDEV)
        q = q + w
        k = k.clone()
        k[:, :, : min(40, case.Nkv)] += w
    lay = fuzz.build_layout(case, KDEV)
    if sink > 0:  # every query block attends the sink's key block
        mask = lay.to_dense_mask()
        mask[..., 0] = True
        lay = BlockLayout.from_dense_mask(mask, block_m=case.block_m, block_n=case.block_n, seqlen_q=case.Nq,
                                          seqlen_kv=case.Nkv)
    out, lse = fuzz.poisoned_outputs(case, KDEV)
    stats: dict = {}
    block_sparse_fwd(q, k, v, layout=lay, causal=case.causal, scale=case.scale, out=out, lse=lse, pv_threshold=thr,
                     stats=stats)
    rep = fuzz.check_kernel(q, k, v, lay, case.causal, out, lse, scale=case.scale, pv_threshold=thr, stats=stats)
    event("pv rule skipped tiles" if rep.get("stats_reference", {}).get("pv_skipped_tiles") else "pv rule skipped nothing")
    assert rep["ok"], f"{case.short()} thr={thr} sink={sink}: {rep['failures']}"
    assert rep["stats_kernel"] == rep["stats_reference"]


# ---------------------------------------------------------------------------------------------- (e)
@_settings("window")
@given(case=cases(fuzz.REFERENCE_SPACE, dtype="float64"), i0=st.integers(0, 20), width=st.integers(1, 4))
def test_query_window_is_an_exact_subproblem(case: fuzz.FuzzCase, i0: int, width: int) -> None:
    """(e) the GPU fuzz script checks long cases on windows of query blocks: a window's rows == the whole's rows."""
    q, k, v = fuzz.make_qkv(case)
    lay = fuzz.build_layout(case)
    bm = lay.block_m if lay is not None else case.block_m
    Mb = cdiv(case.Nq, bm)
    i0 = i0 % Mb
    i1 = min(Mb, i0 + width)
    whole = reference_attention(q, k, v, causal=case.causal, layout=lay, scale=case.scale)
    w = fuzz.query_window(q, k, v, lay, case.causal, i0, i1, block_m=bm)
    r0, r1 = i0 * bm, min(i1 * bm, case.Nq)
    if w is None:
        assert bool(torch.isneginf(whole.lse[:, :, r0:r1]).all())
        return
    assert (w.r0, w.r1) == (r0, r1)
    assert w.k.shape[2] <= case.Nkv
    part = reference_attention(w.q, w.k, w.v, causal=case.causal, layout=w.layout, scale=case.scale)
    assert torch.equal(torch.isneginf(part.lse), torch.isneginf(whole.lse[:, :, r0:r1]))
    fin = torch.isfinite(part.lse)
    assert _max_abs(part.lse[fin], whole.lse[:, :, r0:r1][fin]) <= SDPA_FP64_ATOL
    assert _max_abs(part.out, whole.out[:, :, r0:r1]) <= SDPA_FP64_ATOL


def test_case_json_round_trip_and_rebuild() -> None:
    """A failing case written by the GPU script rebuilds the same tensors and layout from its JSON."""
    src = fuzz.RandomSource(random.Random(5))
    for _ in range(20):
        case = fuzz.draw_case(src, fuzz.KERNEL_CPU_SPACE)
        again = fuzz.FuzzCase.from_json(case.to_json())
        assert again == case
        a, b = fuzz.make_qkv(case), fuzz.make_qkv(again)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
        la, lb = fuzz.build_layout(case), fuzz.build_layout(again)
        assert (la is None and lb is None) or la.equals(lb)
