"""ordered_args: the launchers' named kernel arguments in the kernel's parameter order."""

from __future__ import annotations

import pytest

from sparseattn.ops.kernel_args import ordered_args, runtime_params

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")


def _toy(A, B, n, scale, BLOCK: tl.constexpr, FLAG: tl.constexpr = False):  # noqa: N803 - Triton's style
    pass


class _Wrapper:  # stands in for Triton's autotune/jit wrappers, which hold the next layer in ``.fn``
    def __init__(self, fn):
        self.fn = fn


def test_orders_by_the_kernel_signature_and_skips_constexpr():
    k = _Wrapper(_Wrapper(_toy))
    assert runtime_params(k) == ("A", "B", "n", "scale")
    assert ordered_args(k, {"scale": 0.5, "n": 3, "B": "b", "A": "a"}) == ("a", "b", 3, 0.5)


@pytest.mark.parametrize("named", [
    {"A": 1, "B": 2, "n": 3},                          # missing
    {"A": 1, "B": 2, "n": 3, "scale": 4, "C": 5},      # unknown extra
    {"A": 1, "B": 2, "n": 3, "sclae": 4},              # misspelt: same count, unknown name
])
def test_a_mismatch_names_what_is_wrong(named):
    with pytest.raises(TypeError, match="ordered_args: the launch arguments do not match _toy"):
        ordered_args(_Wrapper(_toy), named)


def test_not_a_kernel():
    with pytest.raises(TypeError, match="not a Triton kernel"):
        runtime_params(object())


def test_the_package_kernels_expose_their_runtime_parameters():
    from sparseattn.ops.triton import block_sparse_fwd, block_sparse_fwd_quant, decode

    pre = runtime_params(block_sparse_fwd._block_sparse_fwd_kernel)
    assert pre[:3] == ("Q", "K", "V") and pre[-1] == "CAUSAL_OFF" and "HEAD_DIM" not in pre
    assert runtime_params(block_sparse_fwd_quant._block_sparse_fwd_quant_kernel)[-1] == "NUM_KV_BLOCKS"
    assert runtime_params(decode._decode_split_kernel)[-1] == "qk_scale"
