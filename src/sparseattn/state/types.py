"""The attention state: output and natural-log logsumexp (the unit that merging and segments carry).

Lives in ``state/`` (not ``ops/``) so that state code (merging, segments, KV caches) does not import the
kernels' modules; ``sparseattn.ops.reference`` re-exports it for compatibility.

Two forms:

* :class:`AttentionState` ``(out, lse)`` — the public, normalised form; states over disjoint key sets
  merge exactly (:func:`sparseattn.state.merge_states`).
* :class:`RawState` ``(m, l, acc)`` — the online-softmax loop's own variables (float32): running max
  ``m`` of the scaled scores **in log2 units** (``scale * log2(e) * q·k``), running sum
  ``l = sum 2**(s - m)`` and the unnormalised accumulator ``acc = sum 2**(s - m) v``. Carrying it from
  one key segment to the next reproduces the kernel's loop exactly (bitwise at key-block-aligned
  segment boundaries); :meth:`RawState.finalize` gives ``(out, lse)``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = ["AttentionState", "RawState", "LOG2E", "LN2"]

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


class AttentionState(NamedTuple):
    """Attention output and its natural-log logsumexp.

    Shapes:
        out: ``(B, H, N_q, D)`` in the input dtype.
        lse: ``(B, H, N_q)`` float32 (float64 for float64 inputs), natural-log
            ``logsumexp(scale * q·k)`` over the attended keys; ``-inf`` for rows that attend nothing.
    """

    out: torch.Tensor
    lse: torch.Tensor


class RawState(NamedTuple):
    """Raw online-softmax state carried between key segments (see the module docstring).

    Shapes:
        m: ``(B, H, N_q)`` float32 (float64 on the float64 reference), log2 units; ``-inf`` = no key yet.
        l: ``(B, H, N_q)`` same dtype; ``0`` = no key yet.
        acc: ``(B, H, N_q, D)`` same dtype, unnormalised.
    """

    m: torch.Tensor
    l: torch.Tensor
    acc: torch.Tensor

    @staticmethod
    def empty(B: int, H: int, N_q: int, D: int, *, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32) -> "RawState":
        """The empty state (no key attended): ``m = -inf``, ``l = 0``, ``acc = 0``."""
        return RawState(torch.full((B, H, N_q), -math.inf, dtype=dtype, device=device),
                        torch.zeros((B, H, N_q), dtype=dtype, device=device),
                        torch.zeros((B, H, N_q, D), dtype=dtype, device=device))

    @staticmethod
    def from_attention_state(state: AttentionState, dtype: torch.dtype = torch.float32) -> "RawState":
        """``(out, lse)`` → ``(m = lse·log2(e), l = 1, acc = out)``; empty rows (lse ``-inf``) stay empty.

        Exact as a state (same function of the keys) but not bitwise the loop's own ``(m, l, acc)``.
        """
        out, lse = state
        m = lse.to(dtype) * LOG2E
        empty = lse == -math.inf
        l = torch.where(empty, torch.zeros_like(m), torch.ones_like(m))
        acc = torch.where(empty.unsqueeze(-1), torch.zeros((), dtype=dtype, device=out.device), out.to(dtype))
        return RawState(m, l, acc)

    def finalize(self, out_dtype: torch.dtype) -> AttentionState:
        """``(out = acc / l, lse = (m + log2 l)·ln 2)``; rows with no key (``m = -inf``) give out 0, lse ``-inf``.

        The same arithmetic as the kernel's epilogue.
        """
        has = self.m > -math.inf
        l_safe = torch.where(has, self.l, torch.ones_like(self.l))
        out = torch.where(has.unsqueeze(-1), self.acc / l_safe.unsqueeze(-1), torch.zeros_like(self.acc))
        lse = torch.where(has, (self.m + torch.log2(l_safe)) * LN2, torch.full_like(self.m, -math.inf))
        return AttentionState(out.to(out_dtype), lse)
