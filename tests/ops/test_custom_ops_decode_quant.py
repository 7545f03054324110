"""The decode and quantized-prefill custom operators (sparseattn.ops.custom_ops): fakes, opcheck, torch.compile."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from sparseattn import sliding_window_layout
from sparseattn.ops import registry as reg
from sparseattn.ops.custom_ops import decode_attention_op, quantized_attention_op
from sparseattn.ops.decode import decode_attention
from sparseattn.ops.quant_reference import emulated_quantized_attention
from sparseattn.state.kv_cache import quantize

DEC_REF = torch.ops.sparseattn.decode_attention_ref.default
DEC_TRITON = torch.ops.sparseattn.decode_attention_triton.default
Q_REF = torch.ops.sparseattn.quantized_attention_ref.default
Q_TRITON = torch.ops.sparseattn.quantized_attention_triton.default


def _decode_inputs(B=2, H=4, Hkv=2, Lq=3, N=50, D=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Lq, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, N, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, N, D, generator=g).to(dtype)
    return q, k, v, torch.tensor([N, N - 17], dtype=torch.int32)[:B]


def test_registry_names_the_custom_ops():
    for name, op in (("decode_triton", "sparseattn::decode_attention_triton"),
                     ("decode_reference", "sparseattn::decode_attention_ref"),
                     ("quant_triton", "sparseattn::quantized_attention_triton"),
                     ("quant_reference", "sparseattn::quantized_attention_ref")):
        assert reg.get_operator(name).custom_op == op
        ns, _, short = op.partition("::")
        assert hasattr(getattr(torch.ops, ns), short)
    # the emulation is listed for no dispatcher: quantized_attention never falls back to it
    assert [o.name for o in reg.operators("quant_prefill", entry_point="quant")] == ["quant_triton"]


# ---------------------------------------------------------------------------------------------- decode
def test_decode_fake_shapes():
    for dtype, lse_dtype in ((torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                             (torch.float32, torch.float32), (torch.float64, torch.float64)):
        with FakeTensorMode():
            q = torch.empty(2, 8, 3, 64, dtype=dtype)
            k = torch.empty(2, 2, 100, 64, dtype=dtype)
            sl = torch.empty(2, dtype=torch.int32)
            out, lse = DEC_REF(q, k, k, sl, 0.125, None, None, None, True)
            t_out, t_lse = DEC_TRITON(q, k, k, None, 0.125, 4, None, None, False)
            kq = torch.empty(2, 2, 100, 64, dtype=torch.int8)
            ks = torch.empty(2, 2, 100, dtype=torch.float32)
            qo, ql = DEC_REF(q, kq, kq, sl, 0.125, None, ks, ks, False)
        for o, lse_, ld in ((out, lse, lse_dtype), (t_out, t_lse, torch.float32), (qo, ql, lse_dtype)):
            assert tuple(o.shape) == (2, 8, 3, 64) and o.dtype == dtype and o.is_contiguous()
            assert tuple(lse_.shape) == (2, 8, 3) and lse_.dtype == ld and lse_.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("causal", [True, False])
def test_decode_opcheck_and_equality(dtype, causal):
    q, k, v, sl = _decode_inputs(dtype=dtype)
    torch.library.opcheck(DEC_REF, (q, k, v, sl, 0.25, None, None, None, causal))
    got = decode_attention_op(q, k, v, seqlens=sl, causal=causal)
    want = decode_attention(q, k, v, seqlens=sl, causal=causal, return_lse=True)
    assert torch.equal(got.out, want.out) and torch.equal(got.lse, want.lse)


def test_decode_op_quantized_cache():
    q, k, v, sl = _decode_inputs(dtype=torch.float32, seed=1)
    kq, ks = quantize(k, "int8")
    vq, vs = quantize(v, "int8")
    torch.library.opcheck(DEC_REF, (q, kq, vq, sl, 0.25, None, ks.squeeze(-1), vs.squeeze(-1), True))
    got = decode_attention_op(q, kq, vq, seqlens=sl, k_scale=ks, v_scale=vs)
    want = decode_attention(q, kq, vq, seqlens=sl, k_scale=ks, v_scale=vs, return_lse=True)
    assert torch.equal(got.out, want.out) and torch.equal(got.lse, want.lse)


def test_decode_op_refusals_and_validation():
    q, k, v, sl = _decode_inputs()
    with pytest.raises(ValueError, match="decode_attention_op: backend is not a known backend"):
        decode_attention_op(q, k, v, backend="flash")
    with pytest.raises(ValueError, match="decode_attention_op: seqlens has the wrong length"):
        decode_attention_op(q, k, v, seqlens=sl[:1])
    with pytest.raises(NotImplementedError, match="decode_attention_op: the Triton kernel cannot run these inputs"):
        decode_attention_op(q, k, v, backend="triton")  # head_dim 16


def _decode_step(x, k, v, sl, w):
    """A projected decode step around one decode_attention_op call (GQA)."""
    B, Lq, E = x.shape
    q = (x @ w).view(B, Lq, 4, E // 4).transpose(1, 2)
    st = decode_attention_op(q, k, v, seqlens=sl)
    return x + st.out.transpose(1, 2).reshape(B, Lq, E), st.lse


def test_decode_compile_fullgraph_cpu():
    q, k, v, sl = _decode_inputs()
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 64, generator=g)
    w = torch.randn(64, 64, generator=g) / 8
    want = _decode_step(x, k, v, sl, w)
    torch._dynamo.reset()
    ex = torch._dynamo.explain(_decode_step)(x, k, v, sl, w)
    assert ex.graph_break_count == 0, ex.break_reasons
    ops = [str(n.target) for gr in ex.graphs for n in gr.graph.nodes if n.op == "call_function"]
    assert sum("decode_attention_ref" in o for o in ops) == 1, ops
    for backend in ("eager", "aot_eager"):
        torch._dynamo.reset()
        got = torch.compile(_decode_step, fullgraph=True, backend=backend)(x, k, v, sl, w)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def _triton_decode_runs_here() -> bool:
    from sparseattn.ops.decode import decode_refusal

    return decode_refusal(torch.empty(1, 1, 1, 64, dtype=torch.float16)) is None


@pytest.mark.skipif(not _triton_decode_runs_here(), reason="Triton unavailable (no CUDA and no TRITON_INTERPRET=1)")
def test_decode_triton_op_under_interpreter():
    q, k, v, sl = _decode_inputs(B=1, H=2, Hkv=1, Lq=1, N=40, D=64, dtype=torch.float16, seed=3)
    torch.library.opcheck(DEC_TRITON, (q, k, v, sl, 0.125, 2, None, None, True))
    want = decode_attention(q, k, v, seqlens=sl, num_splits=2, backend="triton", return_lse=True)
    got = decode_attention_op(q, k, v, seqlens=sl, num_splits=2, backend="triton")
    assert torch.equal(got.out, want.out) and torch.equal(got.lse, want.lse)
    torch._dynamo.reset()
    f = torch.compile(lambda a, b, c, s: decode_attention_op(a, b, c, seqlens=s, num_splits=2, backend="triton"),
                      fullgraph=True, backend="aot_eager")
    out = f(q, k, v, sl)
    assert torch.equal(out.out, want.out) and torch.equal(out.lse, want.lse)


# ---------------------------------------------------------------------------------------------- quantized prefill
def _qkv(B=1, H=2, Hkv=1, N=128, D=64, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, h, N, D, generator=g).to(dtype) for h in (H, Hkv, Hkv))


def test_quant_fake_shapes():
    for dtype in (torch.float16, torch.bfloat16):
        with FakeTensorMode():
            q = torch.empty(2, 4, 100, 64, dtype=dtype)
            k = torch.empty(2, 2, 130, 64, dtype=dtype)
            num = torch.empty(2, 4, 1, dtype=torch.int32)
            idx = torch.empty(2, 4, 1, 2, dtype=torch.int32)
            res = [Q_REF(q, k, k, num, idx, 128, 128, True, None, "int8", "per_warp", True),
                   Q_TRITON(q, k, k, None, None, 0, 0, False, 0.1, "int8_fp8", "per_thread", False)]
        for o, lse in res:
            assert tuple(o.shape) == (2, 4, 100, 64) and o.dtype == dtype and o.is_contiguous()
            assert tuple(lse.shape) == (2, 4, 100) and lse.dtype == torch.float32 and lse.is_contiguous()


@pytest.mark.parametrize("causal", [True, False])
def test_quant_reference_opcheck_and_equality(causal):
    q, k, v = _qkv()
    lay = sliding_window_layout(128, window_blocks=1, block_m=64, block_n=64, heads=2)
    torch.library.opcheck(Q_REF, (q, k, v, lay.kv_num_blocks, lay.kv_indices, 64, 64, causal, None, "int8",
                                  "per_warp", True))
    got = quantized_attention_op(q, k, v, layout=lay, causal=causal, backend="reference")
    want = emulated_quantized_attention(q, k, v, layout=lay, causal=causal)
    assert torch.equal(got.out, want[0]) and torch.equal(got.lse, want[1])
    st = reg.get_operator("quant_reference").run_fn()(q, k, v, layout=lay, causal=causal, return_lse=True)
    assert torch.equal(st.out, want[0])


def test_quant_op_refusals_and_validation(monkeypatch):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="quantized_attention_op: backend is unknown"):
        quantized_attention_op(q, k, v, backend="flash")
    with pytest.raises(ValueError, match="quantized_attention_op: quant"):
        quantized_attention_op(q, k, v, quant="int4", backend="reference")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(NotImplementedError, match="quantized_attention_op: the quantized kernel cannot run these "
                                                  "inputs: q is on the CPU"):
        quantized_attention_op(q, k, v)
    with pytest.raises(NotImplementedError, match="quantized_attention: the quantized kernel cannot run these "
                                                  "inputs: q is on the CPU"):
        from sparseattn.ops.quant import quantized_attention

        quantized_attention(q, k, v)


def test_quant_compile_fullgraph_cpu_reference():
    q, k, v = _qkv(seed=2)
    lay = sliding_window_layout(128, window_blocks=1, block_m=64, block_n=64, heads=2)

    def f(q, k, v, lay):
        o, lse = quantized_attention_op(q, k, v, layout=lay, causal=True, backend="reference")
        return quantized_attention_op(o, k, v, layout=lay, causal=True, backend="reference"), lse

    want = f(q, k, v, lay)
    torch._dynamo.reset()
    ex = torch._dynamo.explain(f)(q, k, v, lay)
    assert ex.graph_break_count == 0, ex.break_reasons
    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, lay)
    assert torch.equal(got[0].out, want[0].out) and torch.equal(got[1], want[1])


def _quant_kernel_runs_here() -> bool:
    from sparseattn.ops.quant import quant_refusal

    return quant_refusal(torch.empty(1, 1, 1, 64, dtype=torch.bfloat16)) is None


@pytest.mark.skipif(not _quant_kernel_runs_here(), reason="Triton unavailable (no CUDA and no TRITON_INTERPRET=1)")
def test_quant_triton_op_under_interpreter():
    from sparseattn.ops.quant import quantized_attention

    q, k, v = _qkv(N=64, seed=4)
    lay = sliding_window_layout(64, window_blocks=1, block_m=64, block_n=64, heads=2)
    want = quantized_attention(q, k, v, layout=lay, causal=True, return_lse=True)
    got = quantized_attention_op(q, k, v, layout=lay, causal=True)
    assert torch.equal(got.out, want.out) and torch.equal(got.lse, want.lse)
    torch._dynamo.reset()
    out = torch.compile(lambda a, b, c, l_: quantized_attention_op(a, b, c, layout=l_, causal=True), fullgraph=True,
                        backend="aot_eager")(q, k, v, lay)
    assert torch.equal(out.out, want.out) and torch.equal(out.lse, want.lse)
