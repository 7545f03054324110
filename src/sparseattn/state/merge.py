"""Exact merging of attention states computed over disjoint key sets.

If ``(o_a, lse_a)`` is attention over key set A and ``(o_b, lse_b)`` over a disjoint set B (both
natural-log lse), attention over A ∪ B is::

    lse = logaddexp(lse_a, lse_b)
    out = exp(lse_a - lse) * o_a + exp(lse_b - lse) * o_b

A state with ``lse = -inf`` (no keys) is the identity of this operation, whatever its ``out`` holds.
Any other non-finite value (NaN/inf in ``out``, NaN or ``+inf`` in ``lse``) propagates to the merged
rows it belongs to.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from sparseattn._validation import check_qkv, fail
from sparseattn.state.types import AttentionState

__all__ = ["check_states", "merge_backends", "merge_dtype", "merge_state", "merge_states", "merge_states_reference", "merge_states_triton",
           "merge_triton_refusal", "segmented_attention"]


def _check_state(fn: str, name: str, s: object) -> tuple[torch.Tensor, torch.Tensor]:
    if not (isinstance(s, tuple) and len(s) == 2 and all(isinstance(t, torch.Tensor) for t in s)):
        raise fail(fn, name, "must be an (out, lse) pair of tensors", "AttentionState(out, lse)", type(s).__name__)
    out, lse = s  # type: ignore[misc]
    if out.dim() != 4 or tuple(lse.shape) != tuple(out.shape[:3]):
        raise fail(fn, name, "has inconsistent shapes", "out (B, H, N, D) and lse (B, H, N)",
                   f"out {tuple(out.shape)}, lse {tuple(lse.shape)}")
    if not (out.dtype.is_floating_point and lse.dtype.is_floating_point):
        raise fail(fn, name, "must hold floating-point tensors", "float out and lse",
                   f"out {out.dtype}, lse {lse.dtype}")
    if lse.device != out.device:
        raise fail(fn, name, "has out and lse on different devices", "one device", f"out {out.device}, lse {lse.device}")
    return out, lse


def _merge_operators() -> tuple:
    """The registry's merge operators (entry point ``"merge"``) in priority order."""
    from sparseattn.ops.registry import operators

    return operators("merge", entry_point="merge")


def _backend_name(op_name: str) -> str:
    """The ``backend=`` spelling of a merge operator: ``"merge_triton"`` -> ``"triton"``."""
    return op_name[len("merge_"):] if op_name.startswith("merge_") else op_name


def merge_backends() -> tuple[str, ...]:
    """``backend=`` values of :func:`merge_states`: ``"auto"`` and the registered merge operators' names."""
    return ("auto",) + tuple(_backend_name(op.name) for op in _merge_operators())


def merge_dtype(lses: Sequence[torch.Tensor]) -> torch.dtype:
    """The merge's accumulation and lse dtype: float64 if any state's lse is float64, else float32."""
    return torch.float64 if any(l.dtype == torch.float64 for l in lses) else torch.float32


def merge_triton_refusal(q: torch.Tensor, *, lse_dtype: torch.dtype | None = None, **_: object) -> str | None:
    """Why the Triton merge cannot take states whose first ``out`` is ``q`` (None: it can)."""
    if q.dtype == torch.float64 or lse_dtype == torch.float64:
        return "float64 states (the kernel accumulates in float32)"
    from sparseattn.ops.triton_launch import interpret_mode

    if not q.is_cuda and not interpret_mode():
        return f"states on {q.device} (the kernel needs CUDA, or TRITON_INTERPRET=1 on the CPU)"
    return None


def merge_state(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor], *,
                backend: str = "reference") -> AttentionState:
    """Merge two attention states over disjoint key sets (exact; ``-inf`` lse is the identity).

    Shapes:
        out ``(B, H, N, D)``, lse ``(B, H, N)`` natural-log; both states the same shapes.
    """
    return merge_states([a, b], backend=backend)


def merge_states(states: Sequence[tuple[torch.Tensor, torch.Tensor]], *, backend: str = "reference") -> AttentionState:
    """Merge any number of states over disjoint key sets in one pass (numerically stable).

    Args:
        states: ``(out, lse)`` pairs of the same rows.
        backend: a registered merge operator (``sparseattn.ops.registry``, kind ``"merge"``) by its
            ``backend=`` name: ``"reference"`` (PyTorch, any device, float64-capable; the default) or
            ``"triton"`` (one fused kernel, :mod:`sparseattn.ops.triton.merge`: CUDA, or the CPU interpreter
            under ``TRITON_INTERPRET=1``; fp32 accumulation, so float64 states are refused); or ``"auto"``:
            the first operator in priority order that takes these states and is preferred for them (the
            kernel on CUDA, the reference elsewhere). :func:`merge_backends` lists them.

    Returns:
        ``AttentionState(out, lse)``; ``out`` in the first state's dtype, ``lse`` natural-log in
        float32 (float64 if the inputs' lse are float64).
    """
    fn = "merge_states"
    if backend != "reference":  # the default needs no registry lookup
        choices = merge_backends()
        if backend not in choices:
            raise fail(fn, "backend", "is not a merge backend", f"one of {list(choices)}", repr(backend))
    pairs = check_states(fn, states)
    out0 = pairs[0][0]
    if backend == "reference":
        return merge_states_reference(pairs)
    ops = {_backend_name(op.name): op for op in _merge_operators()}
    if backend == "auto":  # the first operator (priority order) that takes these states and is preferred for them
        lse_dtype = merge_dtype([l for _, l in pairs])
        for op in ops.values():
            if op.refusal_fn()(out0, lse_dtype=lse_dtype) is None and (op.preferred is None or op.preferred(out0, None)):
                return op.run_fn()(pairs)
        return merge_states_reference(pairs)  # pragma: no cover - the reference is registered and takes everything
    return ops[backend].run_fn()(pairs)  # a named operator: its own errors if it cannot take these states


def check_states(fn: str, states: object) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``states`` as validated ``(out, lse)`` pairs of one shape and device (``ValueError`` naming ``fn`` else)."""
    if not isinstance(states, (list, tuple)) or len(states) == 0:
        raise fail(fn, "states", "must be a non-empty sequence of (out, lse)", ">= 1 state", repr(type(states).__name__))
    pairs = [_check_state(fn, f"states[{i}]", s) for i, s in enumerate(states)]
    out0, lse0 = pairs[0]
    for i, (o, l) in enumerate(pairs[1:], start=1):
        if o.shape != out0.shape or l.shape != lse0.shape:
            raise fail(fn, f"states[{i}]", "has different shapes from states[0]", f"out {tuple(out0.shape)}",
                       f"out {tuple(o.shape)}")
        if o.device != out0.device:
            raise fail(fn, f"states[{i}]", "is on another device", str(out0.device), str(o.device))
    return pairs


def merge_states_reference(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> AttentionState:
    """The PyTorch merge of validated ``(out, lse)`` pairs (the ``"reference"`` merge operator's run function)."""
    out0 = pairs[0][0]
    acc_dtype = merge_dtype([l for _, l in pairs])
    lses = torch.stack([l.to(acc_dtype) for _, l in pairs])  # [S, B, H, N]
    lse = torch.logsumexp(lses, dim=0)
    empty = lse == -math.inf  # every state empty: the identity, out 0
    safe = torch.where(empty, torch.zeros_like(lse), lse)
    w = torch.exp(lses - safe)  # exp(-inf) = 0 for empty states; NaN if an lse is NaN or +inf
    # A state with lse = -inf attended no key: its out is ignored even if it holds NaN/inf (the one
    # defined exception). Every other non-finite value propagates: a NaN/inf out, or a NaN/+inf lse
    # (w NaN), makes the merged row non-finite, as attention over the union would be.
    live = (lses != -math.inf).unsqueeze(-1)
    out = sum(torch.where(live[i], w[i].unsqueeze(-1) * o.to(acc_dtype), torch.zeros((), dtype=acc_dtype, device=o.device))
              for i, (o, _) in enumerate(pairs))
    out = torch.where(empty.unsqueeze(-1), torch.zeros_like(out), out)
    lse_dtype = torch.float64 if acc_dtype == torch.float64 else torch.float32
    return AttentionState(out.to(out0.dtype), lse.to(lse_dtype))


def merge_states_triton(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> AttentionState:
    """The fused Triton merge of validated ``(out, lse)`` pairs (the ``"triton"`` merge operator's run function);
    the stacked copies are the kernel's only extra traffic."""
    fn = "merge_states"
    out0 = pairs[0][0]
    if any(l.dtype == torch.float64 for _, l in pairs) or any(o.dtype == torch.float64 for o, _ in pairs):
        raise fail(fn, "states", "hold float64 tensors, which the Triton merge (fp32 accumulation) does not take",
                   "float32/float16/bfloat16 states, or backend='reference'", "float64")
    from sparseattn.ops.triton_launch import _LAUNCH_LOCK, interpret_mode

    if not out0.is_cuda and not interpret_mode():
        raise fail(fn, "backend", "'triton' needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU)",
                   "CUDA states or backend='reference'", str(out0.device))
    import triton

    from sparseattn.ops.triton.merge import _merge_states_kernel

    B, H, N, D = out0.shape
    R, S = B * H * N, len(pairs)
    O = torch.stack([o.to(out0.dtype).reshape(R, D) for o, _ in pairs])  # [S, R, D]
    L = torch.stack([l.to(torch.float32).reshape(R) for _, l in pairs])  # [S, R]
    out = torch.empty(R, D, dtype=out0.dtype, device=out0.device)
    lse = torch.empty(R, dtype=torch.float32, device=out0.device)
    if R > 0 and D > 0:
        block_d = triton.next_power_of_2(D)
        block_r = max(1, min(64, 4096 // block_d))
        with _LAUNCH_LOCK:
            _merge_states_kernel[(triton.cdiv(R, block_r),)](O, L, out, lse, S, R, D, O.stride(0), O.stride(1),
                                                             L.stride(0), BLOCK_R=block_r, BLOCK_D=block_d)
    return AttentionState(out.reshape(B, H, N, D), lse.reshape(B, H, N))


def segmented_attention(
    q: torch.Tensor,
    k_segments: Sequence[torch.Tensor],
    v_segments: Sequence[torch.Tensor],
    *,
    scale: float | None = None,
    backend: str = "auto",
    causal: bool = False,
) -> AttentionState:
    """Attention of ``q`` over KV given as consecutive segments: one ``(out, lse)`` per segment, merged exactly.

    Equal to attention over ``torch.cat(k_segments, dim=2)`` (up to rounding). With ``causal`` the mask
    is bottom-right aligned to the whole KV (query ``i`` sees global keys ``<= i + N_kv_total - N_q``);
    each segment is computed with its global key offset
    (:func:`~sparseattn.state.segmented.attention_with_state`, no carried state) before the merge.
    For the bitwise carry of the raw state see :func:`~sparseattn.state.segmented.attention_over_segments`.

    Shapes:
        q ``(B, H, N_q, D)``; each segment ``(B, H_kv, N_i, D)``.
    """
    fn = "segmented_attention"
    if len(k_segments) == 0 or len(k_segments) != len(v_segments):
        raise fail(fn, "k_segments/v_segments", "must be non-empty and of equal length", "equal non-zero counts",
                   f"{len(k_segments)} and {len(v_segments)}")
    if not isinstance(causal, bool):
        raise fail(fn, "causal", "must be a bool", "True or False", repr(causal))
    for i, (k, v) in enumerate(zip(k_segments, v_segments)):
        check_qkv(f"{fn}[segment {i}]", q, k, v)
    states = []
    if causal:
        from sparseattn.state.segmented import attention_with_state

        total = sum(int(k.shape[2]) for k in k_segments)
        pos = 0
        for k, v in zip(k_segments, v_segments):
            res = attention_with_state(q, k, v, kv_offset=pos, kv_len=total, causal=True, scale=scale, backend=backend)
            states.append(AttentionState(res.out, res.lse))
            pos += int(k.shape[2])
        return merge_states(states)
    from sparseattn.ops.attention import attention

    for k, v in zip(k_segments, v_segments):
        states.append(attention(q, k, v, scale=scale, backend=backend))
    return merge_states(states)
