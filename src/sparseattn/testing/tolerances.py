"""The only place tolerances live.

Parity follows flash-attention's ratio rule: a kernel's max error against a high-precision
reference (float64 on CPU / float32 on GPU) must be at most ``RATIO`` times the error of the same
reference computed in the kernel's own dtype (``reference_attention(..., upcast=False)``), plus a
rounding floor for the dtype.
"""

from __future__ import annotations

import torch

RATIO = 2.0

# absolute floor added to the ratio bound, per dtype of the kernel's inputs
ATOL_FLOOR: dict[torch.dtype, float] = {
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
    torch.float32: 1e-5,
    torch.float64: 1e-12,
}
# lse (natural log, float32) absolute floor
LSE_ATOL: dict[torch.dtype, float] = {
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
    torch.float32: 1e-5,
    torch.float64: 1e-12,
}

# reference vs torch SDPA, both float64 (foundation tests)
SDPA_FP64_ATOL = 1e-10
# merging segments vs attention over the whole KV, float64
MERGE_FP64_ATOL = 1e-12
# context-parallel attention (chunk states merged) vs single-process reference, float64
CP_FP64_ATOL = 1e-12


def ratio_bound(err_lowp_ref: float, dtype: torch.dtype) -> float:
    """Allowed max error of a kernel whose same-dtype reference has max error ``err_lowp_ref``."""
    return RATIO * err_lowp_ref + ATOL_FLOOR[dtype]


def check_ratio(kernel_out: torch.Tensor, ref_hi: torch.Tensor, ref_lo: torch.Tensor, what: str = "out") -> None:
    """Raise ``AssertionError`` with numbers if the kernel breaks the ratio rule (for tests).

    Args:
        kernel_out: the kernel's output (its dtype sets the floor).
        ref_hi: reference in float32/float64.
        ref_lo: reference computed in the kernel's dtype.
    """
    hi = ref_hi.to(torch.float64)
    k_err = (kernel_out.to(torch.float64) - hi).abs()
    r_err = (ref_lo.to(torch.float64) - hi).abs()
    if bool(torch.isnan(kernel_out).any()):
        raise AssertionError(f"{what}: kernel output has {int(torch.isnan(kernel_out).sum())} NaN elements")
    finite = torch.isfinite(hi)
    if not bool(torch.equal(torch.isfinite(kernel_out.to(torch.float64)), finite)):
        raise AssertionError(f"{what}: kernel and reference disagree on which elements are infinite")
    k_max = float(k_err[finite].max()) if bool(finite.any()) else 0.0
    r_max = float(r_err[finite].max()) if bool(finite.any()) else 0.0
    bound = ratio_bound(r_max, kernel_out.dtype if kernel_out.dtype in ATOL_FLOOR else torch.float32)
    if not k_max <= bound:
        raise AssertionError(f"{what}: kernel max error {k_max:.3e} > bound {bound:.3e} "
                             f"(= {RATIO} x same-dtype reference error {r_max:.3e} + floor)")
