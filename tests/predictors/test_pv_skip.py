"""The softmax-aware P·V skip rule (``pv_threshold``) as predictors hand it to the attention call.

The rule lives in :func:`sparseattn.ops.reference.reference_attention` (and the Triton kernel); these
tests check it against an independent re-derivation: which tiles are skipped, that ``lse`` stays
exact, and that the output error obeys the bound the rule implies. Per row, a skipped key ``c`` has
``s_c ≤ tile max < m_new − thr ≤ m_final − thr``, so its normalised weight ``exp(s_c − lse) <
exp(−thr)`` (``l ≥ 1`` in units of ``exp(m_final)``), hence
``|out_skip − out| ≤ (#skipped keys of the row) · exp(−thr) · max|v|``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from sparseattn.testing.tolerances import FP64_ATOL, FP64_LSE_ATOL, PV_SKIP_LSE_ATOL, PV_SKIP_OUT_ATOL  # noqa: E402

from sparseattn.layout.block_layout import causal_block_region
from sparseattn.ops.attention import attention
from sparseattn.ops.reference import reference_attention
from sparseattn.predictors import make_predictor
from sparseattn.testing.inputs import structured_qkv

F64 = torch.float64


def _brute_skips(q, k, layout, causal, thr):
    """Independent per-tile evaluation of the rule: bool [B, H, Mb, Nb] of skipped tiles, visited count."""
    B, H, Nq, D = q.shape
    Hkv, Nkv = k.shape[1], k.shape[2]
    kk = k.repeat_interleave(H // Hkv, dim=1)
    s = torch.einsum("bhnd,bhcd->bhnc", q, kk) * D ** -0.5
    if causal:
        r = torch.arange(Nq)[:, None]
        c = torch.arange(Nkv)[None, :]
        s = s.masked_fill(c > r + Nkv - Nq, -math.inf)
    bm, bn = layout.block_m, layout.block_n
    mask = layout.to_dense_mask()
    region = causal_block_region(Nq, Nkv, bm, bn)[0] if causal else torch.ones_like(mask[0, 0])
    skipped = torch.zeros_like(mask)
    visited = 0
    for b in range(B):
        for h in range(H):
            for i in range(layout.num_q_blocks):
                rows = slice(i * bm, min((i + 1) * bm, Nq))
                m = torch.full((rows.stop - rows.start,), -math.inf, dtype=s.dtype)
                for j in range(layout.num_kv_blocks):
                    if not (mask[b, h, i, j] and region[i, j]):
                        continue
                    visited += 1
                    tile_max = s[b, h, rows, j * bn:(j + 1) * bn].amax(-1)
                    m = torch.maximum(m, tile_max)
                    gap = tile_max - torch.where(torch.isinf(m), torch.zeros_like(m), m)
                    skipped[b, h, i, j] = bool((gap < -thr).all())
    return skipped, visited


@pytest.mark.parametrize("thr", [0.5, 2.0, 6.0])
@pytest.mark.parametrize("Nq,Nkv", [(150, 150), (70, 190)])
def test_reference_skip_rule_counts_exact_lse_and_error_bound(thr, Nq, Nkv):
    q, k, v = structured_qkv(1, 4, Nq, 16, kv_heads=2, seqlen_kv=Nkv, dtype=F64, seed=int(thr * 10) + Nq,
                             local_strength=6.0, sink_tokens=2, sink_strength=8.0)
    pred = make_predictor("mean_sim", cdf_threshold=0.99, sim_threshold=-1.0, pv_threshold=thr, block_m=16, block_n=16)
    layout = pred.predict(q, k, causal=True)
    base = reference_attention(q, k, v, causal=True, layout=layout)
    stats: dict = {}
    got = attention(q, k, v, causal=True, layout=layout, backend="reference",
                    pv_threshold=getattr(pred.config, "pv_threshold", None), stats=stats)
    want_skipped, visited = _brute_skips(q, k, layout, True, thr)
    assert stats["visited_tiles"] == visited
    assert stats["pv_skipped_tiles"] == int(want_skipped.sum())
    torch.testing.assert_close(got.lse, base.lse, atol=FP64_LSE_ATOL, rtol=0)
    # error bound per row: (#skipped keys) * exp(-thr) * max|v|
    bn = layout.block_n
    skipped_cols = want_skipped.repeat_interleave(layout.block_m, 2)[:, :, :Nq].repeat_interleave(bn, 3)[..., :Nkv]
    allowed = layout.element_mask(causal=True)
    n_skip = (skipped_cols & allowed).sum(-1).to(F64)  # [B, H, Nq]
    bound = n_skip * math.exp(-thr) * float(v.abs().max()) + 1e-12
    err = (got.out - base.out).abs().amax(-1)
    assert bool((err <= bound).all())
    assert bool((err[n_skip == 0] <= FP64_ATOL).all())


def test_more_threshold_fewer_skips():
    q, k, v = structured_qkv(1, 2, 256, 16, dtype=F64, seed=3, local_strength=8.0, sink_tokens=1, sink_strength=10.0)
    layout = make_predictor("static", pattern="dense", block_m=32, block_n=32).predict(q, k, causal=True)
    counts = []
    for thr in (0.25, 1.0, 4.0, 16.0, 1e6):
        st: dict = {}
        reference_attention(q, k, v, causal=True, layout=layout, pv_threshold=thr, stats=st)
        counts.append(st["pv_skipped_tiles"])
    assert counts == sorted(counts, reverse=True) and counts[0] > 0 and counts[-1] == 0


_KERNEL_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from sparseattn.ops import triton_launch
    from sparseattn.ops.reference import reference_attention
    from sparseattn.predictors import make_predictor
    from sparseattn.testing.inputs import structured_qkv
    q, k, v = structured_qkv(1, 2, 192, 64, kv_heads=1, dtype=torch.float16, seed=1, local_strength=6.0,
                             sink_tokens=2, sink_strength=10.0)
    q, k, v = (t.to(sys.argv[1]) for t in (q, k, v))
    pred = make_predictor("mean_sim", cdf_threshold=0.99, sim_threshold=-1.0, pv_threshold=2.0)
    layout = pred.predict(q, k, causal=True)
    reason = triton_launch.refusal(q, k=k, v=v, layout=layout, causal=True, pv_threshold=2.0)
    if reason is not None:
        print(json.dumps({"skip": reason})); raise SystemExit(0)
    st_k, st_r = {}, {}
    out = triton_launch.block_sparse_fwd(q, k, v, layout=layout, causal=True, pv_threshold=2.0, stats=st_k)
    ref = reference_attention(q, k, v, causal=True, layout=layout, pv_threshold=2.0, stats=st_r)
    print(json.dumps({"kernel": st_k, "reference": st_r,
                      "lse_err": float((out.lse - ref.lse).abs().max()),
                      "out_err": float((out.out.float() - ref.out.float()).abs().max())}))
    """
)


@pytest.mark.slow
def test_kernel_skip_counts_match_reference_under_interpreter():
    # the real kernel on a GPU; Triton's CPU interpreter elsewhere
    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = dict(os.environ, SPARSEATTN_TRITON_AUTOTUNE="0")
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", _KERNEL_SCRIPT, device], env=env, capture_output=True, text=True,
                          timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"kernel script failed:\n{proc.stderr[-3000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "skip" not in res, f"the Triton kernel refused inputs it must accept: {res.get('skip')}"
    assert res["reference"]["pv_skipped_tiles"] > 0  # the case exercises the rule
    assert res["kernel"]["pv_skipped_tiles"] == res["reference"]["pv_skipped_tiles"]
    assert res["kernel"]["visited_tiles"] == res["reference"]["visited_tiles"]
    assert res["lse_err"] < PV_SKIP_LSE_ATOL
    assert res["out_err"] < PV_SKIP_OUT_ATOL
