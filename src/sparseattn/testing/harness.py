"""Scaffolding shared by the test files (not used by the library): whether the Triton kernels can run
here, per-test seeds, an operator counter for the "reads no tensor value on the host" checks, and the decode
kernel's layout tests' shared cases (launch variants that must equal another launch bit for bit)."""

from __future__ import annotations

import collections
import zlib
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["CountOps", "DECODE_LAYOUT_CASES", "assert_same_state", "decode_case_id", "decode_quant_inputs",
           "decode_tail_inputs", "kernel_unavailable", "node_generator", "node_seed"]

# decode shapes for the bit-for-bit launch comparisons: B, H, Hkv, Lq, N, D, lens, splits, causal
DECODE_LAYOUT_CASES = [
    (2, 8, 2, 1, 130, 64, [130, 37], 3, True),  # GQA 4, different lengths, splits with partial last tiles
    (3, 4, 1, 4, 161, 64, [0, 1, 161], 2, True),  # empty / one-key sequences, Lq 4: the last 3 keys masked
    (2, 8, 2, 4, 96, 128, [96, 64], 1, False),  # D 128, one split, non-causal, lengths on tile boundaries
    (1, 2, 2, 3, 200, 64, None, 4, True),  # no seqlens, MHA, Lq 3
]


def decode_case_id(c: tuple) -> str:
    """A test id for a :data:`DECODE_LAYOUT_CASES` entry."""
    return f"B{c[0]}H{c[1]}kv{c[2]}Lq{c[3]}N{c[4]}D{c[5]}s{c[7]}{'' if c[8] else '-noncausal'}"


def assert_same_state(a: Any, b: Any) -> None:
    """Two ``AttentionState`` results equal bit for bit, NaN where NaN."""
    assert a.out.dtype == b.out.dtype
    assert torch.equal(torch.isnan(a.out), torch.isnan(b.out))
    assert torch.equal(torch.nan_to_num(a.out), torch.nan_to_num(b.out))
    assert torch.equal(torch.nan_to_num(a.lse), torch.nan_to_num(b.lse))


def decode_quant_inputs(g: torch.Generator, mode: str, dev: str) -> tuple[Any, ...]:
    """``(q, k, v, k_scale, v_scale, seqlens)`` for the decode layout tests on a quantized cache: bf16 q of
    (3, 8, 2, 64) over 150 keys in ``mode`` (:func:`sparseattn.state.kv_cache.quantize`; keys scaled by 1.5, values
    shifted by 0.5), lengths 150, 0, 97."""
    from sparseattn.state.kv_cache import quantize

    q = torch.randn(3, 8, 2, 64, generator=g).to(torch.bfloat16).to(dev)
    kq, ks = quantize(torch.randn(3, 2, 150, 64, generator=g) * 1.5, mode)
    vq, vs = quantize(torch.randn(3, 2, 150, 64, generator=g) + 0.5, mode)
    sl = torch.tensor([150, 0, 97], dtype=torch.int32, device=dev)
    return q, kq.to(dev), vq.to(dev), ks.to(dev), vs.to(dev), sl


def decode_tail_inputs(g: torch.Generator, mode: str | None, dev: str) -> tuple[Any, ...]:
    """``(q, k, v, k_scale, v_scale, seqlens, lens)`` for the "never reads beyond the lengths" decode tests: fp16 q of
    (4, 4, 2, 64) over a cache of 96 keys with lengths 0, 33, 96, 70; ``mode`` ``None`` (an fp16 cache, scales
    ``None``) or a quantized format (:func:`sparseattn.state.kv_cache.quantize`)."""
    lens = [0, 33, 96, 70]
    q = torch.randn(4, 4, 2, 64, generator=g).to(torch.float16).to(dev)
    k = torch.randn(4, 2, 96, 64, generator=g)
    v = torch.randn(4, 2, 96, 64, generator=g)
    sl = torch.tensor(lens, dtype=torch.int32, device=dev)
    if mode is None:
        return q, k.to(torch.float16).to(dev), v.to(torch.float16).to(dev), None, None, sl, lens
    from sparseattn.state.kv_cache import quantize

    (k, ks), (v, vs) = quantize(k, mode), quantize(v, mode)
    return q, k.to(dev), v.to(dev), ks.to(dev), vs.to(dev), sl, lens


def kernel_unavailable() -> str | None:
    """Why the Triton kernels cannot run here, or None: they run on CUDA, or on the CPU under Triton's
    interpreter (``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` before triton is imported)."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:  # pragma: no cover - triton is a dependency on Linux
        return "triton is not installed"
    if not torch.cuda.is_available():
        from sparseattn.ops.triton_launch import interpret_mode

        if not interpret_mode():
            return "no CUDA and TRITON_INTERPRET is not set (tests/conftest.py sets it before triton is imported)"
    return None


def node_seed(request: Any) -> int:
    """A seed fixed per test id (pytest's ``request``): the same on every run, different per parametrisation."""
    return zlib.crc32(request.node.nodeid.encode())


def node_generator(request: Any) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`node_seed`."""
    return torch.Generator().manual_seed(node_seed(request))


class CountOps(TorchDispatchMode):
    """Counts every ATen operator dispatched inside the ``with`` block (``ops[str(op)]``); a host read of a
    tensor value shows as ``aten._local_scalar_dense.default``."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))
