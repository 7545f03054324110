"""Every bad input raises ValueError naming the function, the argument, what was expected and given."""

from __future__ import annotations

import pytest
import torch

from sparseattn import attention, block_sparse_attention, random_layout, reference_attention
from sparseattn._validation import fail

ENTRY_POINTS = {
    "attention": lambda q, k, v, **kw: attention(q, k, v, backend="reference", **kw),
    "reference_attention": reference_attention,
}


def _qkv(B=1, H=4, Hkv=2, Nq=32, Nkv=32, D=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(B, H, Nq, D, generator=g).to(dtype), torch.randn(B, Hkv, Nkv, D, generator=g).to(dtype),
            torch.randn(B, Hkv, Nkv, D, generator=g).to(dtype))


def _case(name):
    q, k, v = _qkv()
    kw: dict = {}
    if name == "q wrong rank":
        q = q[0]
        want = r"q has the wrong rank; expected 4 dims \(B, H, N, D\), got q.shape=\(4, 32, 8\)"
    elif name == "k wrong rank":
        k = k.unsqueeze(0)
        want = r"k has the wrong rank; expected 4 dims"
    elif name == "q not a tensor":
        q = q.tolist()
        want = r"q must be a torch.Tensor; expected torch.Tensor, got list"
    elif name == "batch mismatch":
        k, v = k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1)
        want = r"k batch size differs from q; expected k.shape\[0\]=1, got k.shape\[0\]=2"
    elif name == "head_dim mismatch":
        k, v = k[..., :4], v[..., :4]
        want = r"k head_dim differs from q; expected k.shape\[3\]=8, got k.shape\[3\]=4"
    elif name == "v shape mismatch":
        v = v[:, :, :16]
        want = r"v must have the same shape as k; expected v.shape=\(1, 2, 32, 8\), got v.shape=\(1, 2, 16, 8\)"
    elif name == "gqa heads":
        q = torch.cat([q, q[:, :1]], dim=1)
        want = r"k heads must divide q heads \(GQA\); expected H % H_kv == 0 with H=5, got H_kv=2"
    elif name == "mixed dtypes":
        k = k.double()
        want = r"q/k/v dtypes must all be equal; expected one dtype, got q=torch.float32, k=torch.float64"
    elif name == "int inputs":
        q, k, v = (t.to(torch.int32) for t in (q, k, v))
        want = r"q.dtype is not supported; expected one of float16, bfloat16, float32, float64, got int32"
    elif name == "bool v":
        v = v > 0
        want = r"v.dtype is not supported"
    elif name == "empty dim":
        q = q[:, :, :0]
        want = r"q/k has an empty dimension"
    elif name == "meta device":
        k = k.to("meta")
        want = r"q/k/v devices must all be equal; expected one device, got q=cpu, k=meta"
    elif name == "layout for other lengths":
        kw["layout"] = random_layout(64, density=0.5, block_m=16, block_n=16, heads=4)
        want = r"layout was built for other sequence lengths; expected seqlen_q=32, seqlen_kv=32, got seqlen_q=64, seqlen_kv=64"
    elif name == "layout for other heads":
        kw["layout"] = random_layout(32, density=0.5, block_m=16, block_n=16, heads=2)
        want = r"layout was built for another batch/head count; expected \(B, H\)=\(1, 4\), got \(1, 2\)"
    elif name == "layout for other batch":
        kw["layout"] = random_layout(32, density=0.5, block_m=16, block_n=16, heads=4, batch=3)
        want = r"layout was built for another batch/head count"
    elif name == "layout not a layout":
        kw["layout"] = torch.ones(1, 4, 2, 2, dtype=torch.bool)
        want = r"layout must be a BlockLayout; expected BlockLayout, got Tensor"
    elif name == "layout on another device":
        kw["layout"] = random_layout(32, density=0.5, block_m=16, block_n=16, heads=4).to("meta")
        want = r"layout is on another device than q; expected cpu, got meta"
    elif name == "zero scale":
        kw["scale"] = 0.0
        want = r"scale must be a positive finite number or None"
    elif name == "inf scale":
        kw["scale"] = float("inf")
        want = r"scale must be a positive finite number or None"
    elif name == "causal not bool":
        kw["causal"] = "yes"
        want = r"causal must be a bool; expected True or False, got 'yes'"
    else:  # pragma: no cover
        raise AssertionError(name)
    return (q, k, v), kw, want


CASES = ["q wrong rank", "k wrong rank", "q not a tensor", "batch mismatch", "head_dim mismatch", "v shape mismatch",
         "gqa heads", "mixed dtypes", "int inputs", "bool v", "empty dim", "meta device", "layout for other lengths",
         "layout for other heads", "layout for other batch", "layout not a layout", "layout on another device",
         "zero scale", "inf scale", "causal not bool"]


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("case", CASES)
def test_bad_input_raises_named_value_error(entry, case):
    (q, k, v), kw, want = _case(case)
    with pytest.raises(ValueError, match=rf"^{entry}: {want}"):
        ENTRY_POINTS[entry](q, k, v, **kw)


def test_block_sparse_attention_reports_as_attention():
    q, k, v = _qkv()
    lay = random_layout(64, density=0.5, block_m=16, block_n=16, heads=4)
    with pytest.raises(ValueError, match=r"^attention: layout was built for other sequence lengths"):
        block_sparse_attention(q, k, v, lay)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(chunk_size=0), r"reference_attention: chunk_size must be a positive integer"),
        (dict(pv_threshold=1.0), r"reference_attention: pv_threshold needs a layout"),
        (dict(pv_threshold=-1.0, layout="L"), r"reference_attention: pv_threshold must be a positive number"),
    ],
)
def test_reference_specific_arguments(kw, match):
    q, k, v = _qkv()
    if kw.get("layout") == "L":
        kw["layout"] = random_layout(32, density=0.5, block_m=16, block_n=16, heads=4)
    with pytest.raises(ValueError, match=match):
        reference_attention(q, k, v, **kw)


def test_fail_format():
    e = fail("f", "x", "is bad", "good", "bad")
    assert isinstance(e, ValueError) and str(e) == "f: x is bad; expected good, got bad"
