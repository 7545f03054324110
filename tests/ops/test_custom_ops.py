"""The torch.library custom operators (sparseattn.ops.custom_ops) and torch.compile without graph breaks."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import sparseattn
from sparseattn import BlockLayout, sliding_window_layout
from sparseattn.ops import custom_ops
from sparseattn.ops.custom_ops import attention_op
from sparseattn.testing.tolerances import ATOL_FLOOR, FP32_RTOL, LSE_ATOL

REF = torch.ops.sparseattn.block_sparse_attention_ref.default
TRITON = torch.ops.sparseattn.block_sparse_attention_triton.default


def _qkv(B=1, H=4, Hkv=2, Nq=80, Nkv=80, D=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Nq, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, Nkv, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Nkv, D, generator=g).to(dtype)
    return q, k, v


def _layout_with_empty_row(B, H, Nq, Nkv, bm=16, bn=16, seed=0):
    """Random block layout (contiguous tensors) whose query block 1 of head 0 selects nothing."""
    Mb, Nb = -(-Nq // bm), -(-Nkv // bn)
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, H, Mb, Nb, generator=g) < 0.5
    mask[..., 0] = True
    mask[0, 0, 1] = False
    return BlockLayout.from_dense_mask(mask, block_m=bm, block_n=bn, seqlen_q=Nq, seqlen_kv=Nkv)


def _op_args(q, k, v, layout, causal, scale):
    if layout is None:
        return (q, k, v, None, None, 0, 0, causal, scale)
    return (q, k, v, layout.kv_num_blocks, layout.kv_indices, layout.block_m, layout.block_n, causal, scale)


CASES = [  # (layout kind, Nq, Nkv): GQA (H=4, H_kv=2) everywhere
    ("none", 80, 80),
    ("empty_row", 80, 80),
    ("sliding", 48, 80),  # N_q != N_kv (bottom-right causal), expanded stride-0 layout tensors
]


def _make(kind, Nq, Nkv, H=4):
    if kind == "none":
        return None
    if kind == "empty_row":
        return _layout_with_empty_row(1, H, Nq, Nkv)
    return sliding_window_layout(Nq, Nkv, window_blocks=2, block_m=16, block_n=16, heads=H)


# ---------------------------------------------------------------------------------------------- reference op
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind,Nq,Nkv", CASES)
def test_opcheck_reference(dtype, causal, kind, Nq, Nkv):
    q, k, v = _qkv(Nq=Nq, Nkv=Nkv, dtype=dtype)
    layout = _make(kind, Nq, Nkv)
    args = _op_args(q, k, v, layout, causal, None if kind != "sliding" else 0.3)
    torch.library.opcheck(REF, args)  # schema, fake tensor (shapes/dtypes/strides), aot dispatch


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind,Nq,Nkv", CASES)
def test_attention_op_matches_attention(dtype, causal, kind, Nq, Nkv):
    q, k, v = _qkv(Nq=Nq, Nkv=Nkv, dtype=dtype, seed=1)
    layout = _make(kind, Nq, Nkv)
    got = attention_op(q, k, v, causal=causal, layout=layout)
    want = sparseattn.attention(q, k, v, causal=causal, layout=layout)
    assert torch.equal(got.out, want.out) and torch.equal(got.lse, want.lse)
    assert got.out.dtype == dtype and got.lse.dtype == dtype  # lse float64 for float64, float32 for float32
    if kind == "empty_row":  # query block 1 of head 0 attends nothing: out 0, lse -inf
        assert bool((got.out[0, 0, 16:32] == 0).all())
        assert bool(torch.isneginf(got.lse[0, 0, 16:32]).all())


def test_fake_tensor_propagation():
    for dtype, lse_dtype in ((torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                             (torch.float32, torch.float32), (torch.float64, torch.float64)):
        with FakeTensorMode():
            q = torch.empty(2, 6, 40, 32, dtype=dtype)
            k = torch.empty(2, 3, 70, 32, dtype=dtype)
            num = torch.empty(2, 6, 3, dtype=torch.int32)
            idx = torch.empty(2, 6, 3, 5, dtype=torch.int32)
            out, lse = REF(q, k, k, num, idx, 16, 16, True, None)
            out_d, lse_d = REF(q, k, k, None, None, 0, 0, False, 0.5)
            t_out, t_lse = TRITON(q, k, k, num, idx, 16, 16, True, None)
        for o, l in ((out, lse), (out_d, lse_d)):
            assert tuple(o.shape) == (2, 6, 40, 32) and o.dtype == dtype and o.is_contiguous()
            assert tuple(l.shape) == (2, 6, 40) and l.dtype == lse_dtype and l.is_contiguous()
        assert tuple(t_out.shape) == (2, 6, 40, 32) and t_out.dtype == dtype
        assert tuple(t_lse.shape) == (2, 6, 40) and t_lse.dtype == torch.float32


def test_nan_inputs_propagate_like_the_reference():
    q, k, v = _qkv(Nq=64, Nkv=64, dtype=torch.float64, seed=2)
    q[0, 1, 5, 3] = math.nan  # row 5 of head 1
    k[0, 0, 40, 0] = math.nan  # key 40 of kv head 0 (heads 0, 1): rows that attend it
    v[0, 1, 10, 7] = math.inf  # channel 7 of rows of heads 2, 3 that attend key 10
    layout = sliding_window_layout(64, window_blocks=2, block_m=16, block_n=16, heads=4)
    for causal, lay in ((True, layout), (False, None)):
        got = attention_op(q, k, v, causal=causal, layout=lay)
        want = sparseattn.reference_attention(q, k, v, causal=causal, layout=lay)
        assert torch.allclose(got.out, want.out, atol=0, rtol=0, equal_nan=True)
        assert torch.allclose(got.lse, want.lse, atol=0, rtol=0, equal_nan=True)
        assert bool(torch.isnan(got.out[0, 1, 5]).all())  # the NaN query row
        assert bool(torch.isnan(got.out[0, 0, 40:48]).all())  # rows of head 0 that attend key 40 (causal too)
        assert not bool(torch.isnan(got.out[0, 2:, :, :7]).any())  # other heads / channels untouched by NaN
    compiled = torch.compile(lambda a, b, c: attention_op(a, b, c, causal=True, layout=layout), fullgraph=True,
                             backend="eager")
    torch._dynamo.reset()
    got_c = compiled(q, k, v)
    want = sparseattn.reference_attention(q, k, v, causal=True, layout=layout)
    assert torch.allclose(got_c.out, want.out, atol=0, rtol=0, equal_nan=True)


def test_refusals_and_validation():
    q, k, v = _qkv()
    layout = sliding_window_layout(80, block_m=16, block_n=16, heads=4)
    with pytest.raises(NotImplementedError, match="attention_op: pv_threshold/stats"):
        attention_op(q, k, v, layout=layout, pv_threshold=1.0)
    with pytest.raises(NotImplementedError, match="attention_op: pv_threshold/stats"):
        attention_op(q, k, v, stats={})
    with pytest.raises(ValueError, match="attention_op: backend is unknown"):
        attention_op(q, k, v, backend="flash")
    with pytest.raises(ValueError, match="attention_op: layout was built for other sequence lengths"):
        attention_op(q[:, :, :40], k, v, layout=layout)
    with pytest.raises(ValueError, match="attention_op: scale"):
        attention_op(q, k, v, scale=-1.0)
    with pytest.raises(NotImplementedError, match="backend='triton' cannot run these inputs"):
        attention_op(q, k, v, backend="triton")  # float32: the kernel takes float16/bfloat16 only


# ---------------------------------------------------------------------------------------------- torch.compile
B, H, HKV, N, D = 1, 4, 2, 96, 16
E = H * D


def _weights(seed=3):
    g = torch.Generator().manual_seed(seed)
    return [tuple(torch.randn(E, n, generator=g) / 8 for n in (E, HKV * D, HKV * D)) for _ in range(2)]


W = _weights()


def two_layers(x, layout):
    """Two residual attention layers with q/k/v projections (GQA), each one attention_op call."""
    lse = None
    for wq, wk, wv in W:
        q = (x @ wq).view(B, N, H, D).transpose(1, 2)
        k = (x @ wk).view(B, N, HKV, D).transpose(1, 2)
        v = (x @ wv).view(B, N, HKV, D).transpose(1, 2)
        out, lse = attention_op(q, k, v, causal=True, layout=layout)
        x = x + out.transpose(1, 2).reshape(B, N, E)
    return x, lse


def two_layers_static(x):
    """Same, with the layout built inside the (compiled) function from a static pattern."""
    layout = sliding_window_layout(N, window_blocks=2, block_m=32, block_n=32, heads=H)
    return two_layers(x, layout)


def _x():
    return torch.randn(B, N, E, generator=torch.Generator().manual_seed(4))


def _layout():
    return sliding_window_layout(N, window_blocks=2, block_m=32, block_n=32, heads=H)


@pytest.mark.parametrize("fn,static", [(two_layers, False), (two_layers_static, True)])
def test_no_graph_breaks(fn, static):
    torch._dynamo.reset()
    args = (_x(),) if static else (_x(), _layout())
    ex = torch._dynamo.explain(fn)(*args)
    assert ex.graph_break_count == 0, ex.break_reasons
    assert ex.graph_count == 1
    ops = [str(n.target) for g in ex.graphs for n in g.graph.nodes if n.op == "call_function"]
    assert sum("block_sparse_attention_ref" in o for o in ops) == 2, ops


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("fn,static", [(two_layers, False), (two_layers_static, True)])
def test_compile_matches_eager(backend, fn, static):
    args = (_x(),) if static else (_x(), _layout())
    want = fn(*args)
    torch._dynamo.reset()
    got = torch.compile(fn, fullgraph=True, backend=backend)(*args)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_compile_inductor_cpu():
    # the default backend on CPU (about 15 s on 2 cores, C++ codegen for the projections); the ops stay opaque
    args = (_x(), _layout())
    want = two_layers(*args)
    torch._dynamo.reset()
    got = torch.compile(two_layers, fullgraph=True)(*args)
    torch.testing.assert_close(got[0], want[0], atol=ATOL_FLOOR[torch.float32], rtol=FP32_RTOL)
    torch.testing.assert_close(got[1], want[1], atol=LSE_ATOL[torch.float32], rtol=FP32_RTOL)


def test_assume_constant_marker_contract():
    # custom_ops marks its backend chooser constant without importing torch._dynamo; the official
    # decorator must still mean exactly that attribute
    import torch._dynamo

    marked = torch._dynamo.assume_constant_result(lambda: 0)
    assert marked._dynamo_marked_constant is True
    assert custom_ops._select._dynamo_marked_constant is True


def test_registration_is_lazy_and_light():
    code = (
        "import json, sys, torch, sparseattn\n"
        "before = 'sparseattn.ops.custom_ops' in sys.modules\n"
        "from sparseattn.ops import attention_op\n"
        "heavy = [m for m in ('triton', 'torch._dynamo', 'transformers', 'sparseattn.ops.triton_launch') if m in sys.modules]\n"
        "ok = hasattr(torch.ops.sparseattn, 'block_sparse_attention_ref')\n"
        "print(json.dumps({'before': before, 'heavy': heavy, 'registered': ok}))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got == {"before": False, "heavy": [], "registered": True}


# ---------------------------------------------------------------------------------------------- Triton op
def _triton_runs_here() -> bool:
    from sparseattn.ops import triton_launch

    q = torch.empty(1, 1, 1, 64, dtype=torch.float16)
    return triton_launch.refusal(q) is None


@pytest.mark.skipif(not _triton_runs_here(), reason="Triton kernel unavailable (no CUDA and no TRITON_INTERPRET=1)")
def test_triton_op_under_interpreter():
    q, k, v = _qkv(H=2, Hkv=1, Nq=80, Nkv=80, D=64, dtype=torch.float16, seed=5)
    layout = sliding_window_layout(80, window_blocks=1, block_m=64, block_n=64, heads=2)
    torch.library.opcheck(TRITON, _op_args(q, k, v, layout, True, None))
    torch.library.opcheck(TRITON, _op_args(q, k, v, None, False, 0.1))
    want = sparseattn.attention(q, k, v, causal=True, layout=layout, backend="triton")
    got = attention_op(q, k, v, causal=True, layout=layout, backend="triton")
    assert torch.equal(got.out, want.out) and torch.equal(got.lse, want.lse)

    def f(q, k, v, layout):
        o, _ = attention_op(q, k, v, causal=True, layout=layout, backend="triton")
        return attention_op(o, k, v, causal=True, layout=layout, backend="triton")

    torch._dynamo.reset()
    ex = torch._dynamo.explain(f)(q, k, v, layout)
    assert ex.graph_break_count == 0, ex.break_reasons
    ref = f(q, k, v, layout)
    torch._dynamo.reset()
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, layout)
    assert torch.equal(out.out, ref.out) and torch.equal(out.lse, ref.lse)


# ---------------------------------------------------------------------------------------------- sliding window
def test_schema_has_an_optional_int_window():
    for op in (REF, TRITON):
        arg = op._schema.arguments[-1]
        assert arg.name == "sliding_window" and str(arg.type) == "Optional[int]" and arg.default_value is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind,Nq,Nkv", CASES)
def test_opcheck_reference_with_window(dtype, kind, Nq, Nkv):
    q, k, v = _qkv(Nq=Nq, Nkv=Nkv, dtype=dtype, seed=6)
    layout = _make(kind, Nq, Nkv)
    torch.library.opcheck(REF, (*_op_args(q, k, v, layout, True, None), 7))
    got = attention_op(q, k, v, causal=True, layout=layout, sliding_window=7)
    want = sparseattn.reference_attention(q, k, v, causal=True, layout=layout, sliding_window=7)
    assert torch.equal(got.out, want.out) and torch.equal(got.lse, want.lse)


def test_fake_tensor_propagation_with_window():
    with FakeTensorMode():
        q = torch.empty(1, 4, 40, 32, dtype=torch.float16)
        k = torch.empty(1, 2, 70, 32, dtype=torch.float16)
        out, lse = REF(q, k, k, None, None, 0, 0, True, None, 16)
        t_out, t_lse = TRITON(q, k, k, None, None, 0, 0, True, None, 16)
    for o, l in ((out, lse), (t_out, t_lse)):
        assert tuple(o.shape) == (1, 4, 40, 32) and o.dtype == torch.float16
        assert tuple(l.shape) == (1, 4, 40) and l.dtype == torch.float32


def test_compile_with_window_no_graph_breaks():
    def f(x):
        q = (x @ W[0][0]).view(B, N, H, D).transpose(1, 2)
        k = (x @ W[0][1]).view(B, N, HKV, D).transpose(1, 2)
        v = (x @ W[0][2]).view(B, N, HKV, D).transpose(1, 2)
        return attention_op(q, k, v, causal=True, sliding_window=20)

    torch._dynamo.reset()
    ex = torch._dynamo.explain(f)(_x())
    assert ex.graph_break_count == 0, ex.break_reasons
    want = f(_x())
    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(_x())
    assert torch.equal(got.out, want.out) and torch.equal(got.lse, want.lse)


@pytest.mark.skipif(not _triton_runs_here(), reason="Triton kernel unavailable (no CUDA and no TRITON_INTERPRET=1)")
def test_triton_op_with_window_under_interpreter():
    q, k, v = _qkv(H=2, Hkv=1, Nq=80, Nkv=100, D=64, dtype=torch.float16, seed=7)
    layout = sliding_window_layout(80, 100, window_blocks=2, block_m=64, block_n=64, heads=2)
    torch.library.opcheck(TRITON, (*_op_args(q, k, v, layout, True, None), 9))
    torch.library.opcheck(TRITON, (*_op_args(q, k, v, None, True, 0.1), 30))
    want = sparseattn.attention(q, k, v, causal=True, layout=layout, backend="triton", sliding_window=9)
    got = attention_op(q, k, v, causal=True, layout=layout, backend="triton", sliding_window=9)
    assert torch.equal(got.out, want.out) and torch.equal(got.lse, want.lse)
