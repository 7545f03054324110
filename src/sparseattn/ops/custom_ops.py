"""Attention as PyTorch custom operators, for ``torch.compile(fullgraph=True)`` without graph breaks.

Registered when this module is imported (``import sparseattn`` does not import it; the cost is a
few ``torch.library`` registrations, no Triton import):

* ``sparseattn::block_sparse_attention_ref`` — :func:`~sparseattn.ops.reference.reference_attention`.
* ``sparseattn::block_sparse_attention_triton`` — :func:`~sparseattn.ops.triton_launch.block_sparse_fwd`
  wrapped with ``torch.library.custom_op`` (an opaque op: the compiler never looks inside the
  launcher, which autotunes, caches and takes a lock; Triton is imported on the first call). It is
  checked on the CPU under Triton's interpreter only: **not yet verified on a GPU** (CUDA graphs,
  inductor on CUDA, the autotuned path). A ``torch.library.triton_op`` version, which would let
  inductor see the kernel, is not done.

The decode, quantized-prefill and state-merge operators follow below the same way
(``sparseattn::decode_attention_*``, ``sparseattn::quantized_attention_*``, ``sparseattn::merge_states_*``
with :func:`decode_attention_op`, :func:`quantized_attention_op`, :func:`merge_states_op`).

The two prefill ops take only tensors and plain scalars::

    (q, k, v, kv_num_blocks: Tensor?, kv_indices: Tensor?, block_m: int, block_n: int,
     causal: bool, scale: float?, sliding_window: int? = None) -> (out, lse)

The layout is passed as its two tensors plus its block sizes (``None`` tensors = dense; the block
sizes are then ignored); ``seqlen_q`` / ``seqlen_kv`` are the lengths of ``q`` / ``k``;
``sliding_window`` is the exact causal window in keys (``None`` = off; a plain ``int``, not a
``SymInt``: it is a model constant, never a traced size). The ops do no
validation: :func:`attention_op` validates (as :func:`~sparseattn.ops.attention.attention` does)
before it calls them. Their fake (meta) implementations give ``out (B, H, N_q, D)`` in q's dtype and
``lse (B, H, N_q)`` float32 (float64 for float64 inputs on the reference op), both contiguous, which
is what the real implementations return (checked with ``torch.library.opcheck``).

``pv_threshold`` / ``stats`` are not supported here (the stats are host-side counters): use
:func:`~sparseattn.ops.attention.attention` for them. No autograd formula is registered (forward
only, like the Triton kernel).
"""

from __future__ import annotations

from typing import Any

import torch

from sparseattn._validation import check_attention_args, fail
from sparseattn.layout.block_layout import BlockLayout
from sparseattn.ops.reference import reference_attention
from sparseattn.state.types import AttentionState

__all__ = ["attention_op", "REF_OP", "TRITON_OP", "PREDICT_OP", "predict_layout_op", "register_predictor_object",
           "unregister_predictor_object", "predictor_blocks", "decode_attention_op", "DECODE_REF_OP", "DECODE_TRITON_OP",
           "quantized_attention_op", "QUANT_REF_OP", "QUANT_TRITON_OP", "merge_states_op", "MERGE_REF_OP",
           "MERGE_TRITON_OP"]

REF_OP = "sparseattn::block_sparse_attention_ref"
TRITON_OP = "sparseattn::block_sparse_attention_triton"
# written out (not inferred) so the window is ``int?`` with a default: calls without it keep working
_SCHEMA = ("(Tensor q, Tensor k, Tensor v, Tensor? kv_num_blocks, Tensor? kv_indices, SymInt block_m, SymInt block_n, "
           "bool causal, float? scale, int? sliding_window=None) -> (Tensor, Tensor)")


def _layout_from(q: torch.Tensor, k: torch.Tensor, kv_num_blocks: torch.Tensor | None, kv_indices: torch.Tensor | None,
                 block_m: int, block_n: int) -> BlockLayout | None:
    if kv_num_blocks is None or kv_indices is None:
        return None
    return BlockLayout(kv_num_blocks, kv_indices, block_m, block_n, q.shape[2], k.shape[2], validate=False)


def _fake_outputs(q: torch.Tensor, lse_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, Nq, D = q.shape
    out = q.new_empty((B, H, Nq, D))
    lse = q.new_empty((B, H, Nq), dtype=lse_dtype)
    return out, lse


@torch.library.custom_op(REF_OP, mutates_args=(), schema=_SCHEMA)
def _block_sparse_attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_num_blocks: torch.Tensor | None,
    kv_indices: torch.Tensor | None, block_m: int, block_n: int, causal: bool, scale: float | None,
    sliding_window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    layout = _layout_from(q, k, kv_num_blocks, kv_indices, block_m, block_n)
    out, lse = reference_attention(q, k, v, causal=causal, layout=layout, scale=scale, sliding_window=sliding_window)
    # custom ops may not return (views of) their inputs; the reference always builds new tensors,
    # but make it explicit and contiguous, as the fake promises
    return out.contiguous(), lse.contiguous()


@_block_sparse_attention_ref.register_fake
def _(q, k, v, kv_num_blocks, kv_indices, block_m, block_n, causal, scale, sliding_window=None):  # noqa: ANN001, ANN202
    return _fake_outputs(q, torch.float64 if q.dtype == torch.float64 else torch.float32)


@torch.library.custom_op(TRITON_OP, mutates_args=(), schema=_SCHEMA)
def _block_sparse_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_num_blocks: torch.Tensor | None,
    kv_indices: torch.Tensor | None, block_m: int, block_n: int, causal: bool, scale: float | None,
    sliding_window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton kernel (opaque). Verified on the CPU interpreter only; not yet on a GPU."""
    from sparseattn.ops import triton_launch

    layout = _layout_from(q, k, kv_num_blocks, kv_indices, block_m, block_n)
    out, lse = triton_launch.block_sparse_fwd(q, k, v, layout=layout, causal=causal, scale=scale,
                                              sliding_window=sliding_window)
    return out, lse


@_block_sparse_attention_triton.register_fake
def _(q, k, v, kv_num_blocks, kv_indices, block_m, block_n, causal, scale, sliding_window=None):  # noqa: ANN001, ANN202
    return _fake_outputs(q, torch.float32)  # the kernel takes float16/bfloat16 only; lse is float32


def _assume_constant_result(fn: Any) -> Any:
    """``torch.compiler.assume_constant_result`` without importing ``torch._dynamo`` here.

    That import costs about a second and pulls in Triton; the decorator only sets this attribute
    (torch 2.13; tests/ops/test_custom_ops.py checks that it still does).
    """
    fn._dynamo_marked_constant = True
    return fn


@_assume_constant_result
def _select(backend: str, device: str, dtype: torch.dtype, q_shape: tuple[int, ...], k_shape: tuple[int, ...],
            blocks: tuple[int, int, int, int] | None, causal: bool, sliding_window: int | None = None) -> str:
    """Backend name for inputs described by constants (evaluated once per compile, not traced).

    Runs :func:`~sparseattn.ops.attention.select_backend` on stand-in tensors of the same device,
    dtype and shape (stride 0: one element each), so the rules and messages are that function's.
    """
    from sparseattn.ops.attention import select_backend

    def stand_in(shape: tuple[int, ...], dt: torch.dtype) -> torch.Tensor:
        return torch.empty_strided(shape, (0,) * len(shape), dtype=dt, device=device)

    q = stand_in(q_shape, dtype)
    k = stand_in(k_shape, dtype)
    layout = None
    if blocks is not None:
        bm, bn, Mb, Nb = blocks
        layout = BlockLayout(stand_in((q_shape[0], q_shape[1], Mb), torch.int32),
                             stand_in((q_shape[0], q_shape[1], Mb, Nb), torch.int32), bm, bn, q_shape[2], k_shape[2],
                             validate=False)
    return select_backend(q, k, k, layout=layout, causal=causal, backend=backend, func="attention_op",
                          sliding_window=sliding_window)


def attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    layout: BlockLayout | None = None,
    scale: float | None = None,
    backend: str = "auto",
    pv_threshold: float | None = None,
    stats: dict[str, Any] | None = None,
    sliding_window: int | None = None,
) -> AttentionState:
    """:func:`~sparseattn.ops.attention.attention` through the registered custom operators.

    Same arguments, validation, backend choice and results as ``attention()`` (natural-log lse), but
    traceable by ``torch.compile(fullgraph=True)``: the computation is one opaque op per call.
    ``backend="auto"`` on CPU tensors is the reference; on CUDA the Triton kernel when it accepts the
    inputs (the choice is made once per compile, from devices, dtypes, shapes and block sizes).

    ``pv_threshold`` and ``stats`` are refused (``NotImplementedError``): the skip statistics are
    host-side counters; call :func:`~sparseattn.ops.attention.attention` for them.

    ``sliding_window`` (causal only) is passed to the op as a plain int; with ``layout=None`` the op
    itself bounds the work (the Triton launcher runs the band layout, the reference skips the rows a
    key chunk's window misses), so no layout is built in the traced graph.

    Shapes:
        q ``(B, H, N_q, D)``, k/v ``(B, H_kv, N_kv, D)`` → out ``(B, H, N_q, D)``, lse ``(B, H, N_q)``.
    """
    fn = "attention_op"
    if pv_threshold is not None or stats is not None:
        raise NotImplementedError(f"{fn}: pv_threshold/stats are not supported through the custom op (their counters "
                                  "are host-side); use sparseattn.attention(...) for them")
    if backend != "auto" and backend not in ("triton", "reference"):
        raise fail(fn, "backend", "is unknown", "one of ['auto', 'triton', 'reference']", repr(backend))
    (_, _, _, _, Nkv, _), _ = check_attention_args(fn, q, k, v, causal=causal, layout=layout, scale=scale,
                                                  pv_threshold=None, sliding_window=sliding_window)
    win = None if sliding_window is None or sliding_window >= Nkv else int(sliding_window)
    blocks = None
    if layout is not None:
        blocks = (layout.block_m, layout.block_n, layout.num_q_blocks, layout.num_kv_blocks)
    if backend == "reference" or (backend == "auto" and not q.is_cuda):
        name = "reference"  # the reference accepts every valid input; auto on CPU never picks the interpreter
    else:
        name = _select(backend, str(q.device), q.dtype, tuple(q.shape), tuple(k.shape), blocks, causal, win)
    op = torch.ops.sparseattn.block_sparse_attention_triton if name == "triton" else \
        torch.ops.sparseattn.block_sparse_attention_ref
    sc = None if scale is None else float(scale)
    if win is None:  # the window-free call has the original arity (the schema's default fills the window)
        if layout is None:
            out, lse = op(q, k, v, None, None, 0, 0, causal, sc)
        else:
            out, lse = op(q, k, v, layout.kv_num_blocks, layout.kv_indices, layout.block_m, layout.block_n, causal, sc)
    elif layout is None:
        out, lse = op(q, k, v, None, None, 0, 0, causal, sc, win)
    else:
        out, lse = op(q, k, v, layout.kv_num_blocks, layout.kv_indices, layout.block_m, layout.block_n, causal, sc, win)
    return AttentionState(out, lse)


# --------------------------------------------------------------------------- predictors as an operator
PREDICT_OP = "sparseattn::predict_layout"
# predictor objects by the id the traced graph carries (an int constant of the compiled graph); a registry
# entry lives as long as the PatchHandle (or caller) that registered it keeps it (see register_predictor_object)
_PREDICTORS: dict[int, Any] = {}


def register_predictor_object(predictor: Any) -> int:
    """Make ``predictor`` callable from :data:`PREDICT_OP`; returns the id to pass (idempotent)."""
    pid = id(predictor)
    _PREDICTORS[pid] = predictor
    return pid


def unregister_predictor_object(pid: int) -> None:
    """Forget a predictor registered with :func:`register_predictor_object` (no error if absent)."""
    _PREDICTORS.pop(pid, None)


def predictor_blocks(predictor: Any) -> tuple[int, int]:
    """``(block_m, block_n)`` of the layouts a predictor returns, from its config (patterns: their kwargs)."""
    cfg = getattr(predictor, "config", None)
    kwargs = dict(getattr(cfg, "kwargs", ()) or ())
    bm = kwargs.get("block_m", getattr(cfg, "block_m", None))
    bn = kwargs.get("block_n", getattr(cfg, "block_n", None))
    if bm is None or bn is None:
        if hasattr(cfg, "name") and isinstance(getattr(cfg, "name"), str):  # a static pattern: the builders' default
            return int(kwargs.get("block_m", 64)), int(kwargs.get("block_n", 64))
        raise fail("predict_layout", "predictor", "does not state its block sizes in its config",
                   "a predictor whose config has block_m and block_n", type(predictor).__name__)
    return int(bm), int(bn)


@torch.library.custom_op(PREDICT_OP, mutates_args=(),
                         schema="(Tensor q, Tensor k, int predictor_id, int? layer, bool causal) -> (Tensor, Tensor)")
def _predict_layout(q: torch.Tensor, k: torch.Tensor, predictor_id: int, layer: int | None,
                    causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    pred = _PREDICTORS.get(predictor_id)
    if pred is None:
        raise RuntimeError(f"{PREDICT_OP}: no predictor is registered under id {predictor_id} (its PatchHandle was "
                           "unpatched); re-patch the model and compile it again")
    lay = pred.predict(q, k, causal=causal, layer=layer)
    B, H = q.shape[0], q.shape[1]
    # contiguous copies: an op's outputs may not alias its inputs or cached tensors
    return (lay.kv_num_blocks.expand(B, H, -1).clone(memory_format=torch.contiguous_format),
            lay.kv_indices.expand(B, H, -1, -1).clone(memory_format=torch.contiguous_format))


@_predict_layout.register_fake
def _(q, k, predictor_id, layer, causal):  # noqa: ANN001, ANN202
    pred = _PREDICTORS.get(predictor_id)
    if pred is None:
        raise RuntimeError(f"{PREDICT_OP}: no predictor is registered under id {predictor_id}")
    bm, bn = predictor_blocks(pred)
    B, H, Nq = q.shape[0], q.shape[1], q.shape[2]
    Nkv = k.shape[2]
    Mb, Nb = -(-Nq // bm), -(-Nkv // bn)
    return (q.new_empty((B, H, Mb), dtype=torch.int32), q.new_empty((B, H, Mb, Nb), dtype=torch.int32))


def predict_layout_op(predictor: Any, q: torch.Tensor, k: torch.Tensor, *, layer: int | None = None,
                      causal: bool = True) -> BlockLayout:
    """``predictor.predict(q, k)`` through :data:`PREDICT_OP` (one opaque op a compiled graph can hold).

    The predictor must state its block sizes in its config. Under ``torch.compile`` it must be
    registered (:func:`register_predictor_object`) before tracing (:func:`~sparseattn.integrations.patch_model`
    does this for its predictors); eagerly, this registers it. The layout comes back as fresh
    ``(B, H, ...)`` tensors.
    """
    pid = id(predictor)
    if _PREDICTORS.get(pid) is not predictor:  # register before compiling: a traced registration is deferred
        register_predictor_object(predictor)
    bm, bn = predictor_blocks(predictor)
    num, idx = torch.ops.sparseattn.predict_layout(q, k, pid, layer, causal)
    return BlockLayout(num, idx, bm, bn, q.shape[2], k.shape[2], validate=False)


# --------------------------------------------------------------------------- decode as an operator
DECODE_REF_OP = "sparseattn::decode_attention_ref"
DECODE_TRITON_OP = "sparseattn::decode_attention_triton"
# the scale is resolved by decode_attention_op (a plain float); seqlens/k_scale/v_scale already checked and
# normalised there (int32 seqlens on q's device; (B, H_kv, N_max) float32 scales)
_DECODE_SCHEMA = ("(Tensor q, Tensor k_cache, Tensor v_cache, Tensor? seqlens, float scale, int? num_splits, "
                  "Tensor? k_scale, Tensor? v_scale, bool causal) -> (Tensor, Tensor)")


def _decode_fake(q: torch.Tensor, lse_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, Lq, D = q.shape
    return q.new_empty((B, H, Lq, D)), q.new_empty((B, H, Lq), dtype=lse_dtype)


@torch.library.custom_op(DECODE_REF_OP, mutates_args=(), schema=_DECODE_SCHEMA)
def _decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seqlens: torch.Tensor | None,
                          scale: float, num_splits: int | None, k_scale: torch.Tensor | None,
                          v_scale: torch.Tensor | None, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from sparseattn.ops.decode import decode_reference

    st = decode_reference(q, k_cache, v_cache, seqlens=seqlens, scale=scale, k_scale=k_scale, v_scale=v_scale,
                          causal=causal)
    return st.out.contiguous(), st.lse.contiguous()  # fresh tensors (the reference never returns its inputs)


@_decode_attention_ref.register_fake
def _(q, k_cache, v_cache, seqlens, scale, num_splits, k_scale, v_scale, causal):  # noqa: ANN001, ANN202
    return _decode_fake(q, torch.float64 if q.dtype == torch.float64 else torch.float32)


@torch.library.custom_op(DECODE_TRITON_OP, mutates_args=(), schema=_DECODE_SCHEMA)
def _decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                             seqlens: torch.Tensor | None, scale: float, num_splits: int | None,
                             k_scale: torch.Tensor | None, v_scale: torch.Tensor | None,
                             causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The split-KV Triton decode kernel (opaque). Verified on the CPU interpreter only; not yet on a GPU."""
    from sparseattn.ops.decode import decode_attention

    st = decode_attention(q, k_cache, v_cache, seqlens=seqlens, scale=scale, num_splits=num_splits, return_lse=True,
                          backend="triton", check_seqlens=False, k_scale=k_scale, v_scale=v_scale, causal=causal)
    return st.out.contiguous(), st.lse.contiguous()


@_decode_attention_triton.register_fake
def _(q, k_cache, v_cache, seqlens, scale, num_splits, k_scale, v_scale, causal):  # noqa: ANN001, ANN202
    return _decode_fake(q, torch.float32)  # the kernel takes float16/bfloat16/float32; lse is float32


def _stand_in(shape: tuple[int, ...], dt: torch.dtype, device: str) -> torch.Tensor:
    return torch.empty_strided(shape, (0,) * len(shape), dtype=dt, device=device)


@_assume_constant_result
def _decode_backends() -> tuple[str, ...]:
    """The decode backend names the op offers (the registry's built-in decode operators), once per compile."""
    from sparseattn.ops.decode import _BUILTIN_OPS, _backend_choices

    return _backend_choices(_BUILTIN_OPS)


@_assume_constant_result
def _select_decode(backend: str, device: str, dtype: torch.dtype, q_shape: tuple[int, ...],
                   kv_dtype: torch.dtype) -> str:
    """The decode operator's name for inputs described by constants (evaluated once per compile, not traced).

    The registry's choice (:func:`~sparseattn.ops.decode.decode_choice`) on a stand-in ``q``; raises the
    decode functions' ``NotImplementedError`` for a named backend that refuses.
    """
    from sparseattn.ops.decode import _BUILTIN_OPS, _choose

    return _choose("decode_attention_op", _stand_in(q_shape, dtype, device), backend, kv_dtype, _BUILTIN_OPS).name


def decode_attention_op(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    seqlens: torch.Tensor | None = None,
    scale: float | None = None,
    num_splits: int | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    causal: bool = True,
    backend: str = "auto",
) -> AttentionState:
    """:func:`~sparseattn.ops.decode.decode_attention` (with ``return_lse=True``) through a registered custom op.

    Same arguments, shape/dtype validation, backend choice (the registry's decode operators: on CPU
    tensors ``"auto"`` is the reference) and results, traceable by ``torch.compile(fullgraph=True)``:
    one opaque op per call. ``seqlens`` values are never read on the host (no check, no sync; the kernel
    clamps them into ``[0, N_max]``). ``config`` is not offered (experiments: call ``decode_attention``).

    Shapes:
        q ``(B, H, Lq, D)``, k_cache/v_cache ``(B, H_kv, N_max, D)`` → out ``(B, H, Lq, D)`` in q's dtype,
        lse ``(B, H, Lq)`` float32 (float64 for float64 on the reference).
    """
    from sparseattn.ops import decode as dec

    fn = "decode_attention_op"
    dims, sc = dec._check_decode(fn, q, k_cache, v_cache, scale, k_scale=k_scale, v_scale=v_scale)
    B, H, Hkv, Lq, N, D = dims
    ks, vs = dec._check_kv_scales(fn, q, k_scale, v_scale, B, Hkv, N)
    dec._check_bool(fn, "causal", causal)
    seqlens = dec._check_seqlens(fn, seqlens, B, N, q.device, False)
    num_splits = dec._check_num_splits(fn, num_splits)
    backend = dec._check_backend(fn, backend, choices=_decode_backends())
    if backend == "reference" or (backend == "auto" and not q.is_cuda):
        name = dec._REFERENCE_OP  # the reference accepts every valid input; auto on CPU never picks the interpreter
    else:
        name = _select_decode(backend, str(q.device), q.dtype, tuple(q.shape), k_cache.dtype)
    op = torch.ops.sparseattn.decode_attention_triton if name == dec._KERNEL_OP else \
        torch.ops.sparseattn.decode_attention_ref
    out, lse = op(q, k_cache, v_cache, seqlens, float(sc), num_splits, ks, vs, bool(causal))
    return AttentionState(out, lse)


# --------------------------------------------------------------------------- quantized prefill as an operator
QUANT_REF_OP = "sparseattn::quantized_attention_ref"
QUANT_TRITON_OP = "sparseattn::quantized_attention_triton"
_QUANT_SCHEMA = ("(Tensor q, Tensor k, Tensor v, Tensor? kv_num_blocks, Tensor? kv_indices, SymInt block_m, "
                 "SymInt block_n, bool causal, float? scale, str quant, str quant_granularity, bool smooth_k, "
                 "bool smooth_q=True, bool balance_qk=True) "
                 "-> (Tensor, Tensor)")


@torch.library.custom_op(QUANT_REF_OP, mutates_args=(), schema=_QUANT_SCHEMA)
def _quantized_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_num_blocks: torch.Tensor | None,
                             kv_indices: torch.Tensor | None, block_m: int, block_n: int, causal: bool,
                             scale: float | None, quant: str, quant_granularity: str,
                             smooth_k: bool, smooth_q: bool = True, balance_qk: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The PyTorch emulation of the quantized kernel (same scales and rounding; ops/quant_reference.py)."""
    from sparseattn.ops.quant_reference import emulated_quantized_attention

    layout = _layout_from(q, k, kv_num_blocks, kv_indices, block_m, block_n)
    out, lse = emulated_quantized_attention(q, k, v, layout=layout, causal=causal, scale=scale, quant=quant,
                                            quant_granularity=quant_granularity, smooth_k=smooth_k,
                                            smooth_q=smooth_q, balance_qk=balance_qk)
    return out.contiguous(), lse.to(torch.float32).contiguous()


@_quantized_attention_ref.register_fake
def _(q, k, v, kv_num_blocks, kv_indices, block_m, block_n, causal, scale, quant, quant_granularity,  # noqa: ANN001
      smooth_k, smooth_q=True, balance_qk=True):  # noqa: ANN001, ANN202
    return _fake_outputs(q, torch.float32)


@torch.library.custom_op(QUANT_TRITON_OP, mutates_args=(), schema=_QUANT_SCHEMA)
def _quantized_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_num_blocks: torch.Tensor | None,
                                kv_indices: torch.Tensor | None, block_m: int, block_n: int, causal: bool,
                                scale: float | None, quant: str, quant_granularity: str,
                                smooth_k: bool, smooth_q: bool = True, balance_qk: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The quantized Triton kernel (opaque): :func:`~sparseattn.ops.quant.quantized_attention` with the lse."""
    from sparseattn.ops.quant import quantized_attention

    layout = _layout_from(q, k, kv_num_blocks, kv_indices, block_m, block_n)
    st = quantized_attention(q, k, v, layout=layout, causal=causal, scale=scale, quant=quant,
                             quant_granularity=quant_granularity, smooth_k=smooth_k, smooth_q=smooth_q,
                             balance_qk=balance_qk, return_lse=True)
    return st.out.contiguous(), st.lse.contiguous()


@_quantized_attention_triton.register_fake
def _(q, k, v, kv_num_blocks, kv_indices, block_m, block_n, causal, scale, quant, quant_granularity,  # noqa: ANN001
      smooth_k, smooth_q=True, balance_qk=True):  # noqa: ANN001, ANN202
    return _fake_outputs(q, torch.float32)  # float16/bfloat16 inputs only; lse is float32


@_assume_constant_result
def _select_quant(device: str, dtype: torch.dtype, q_shape: tuple[int, ...], blocks: tuple[int, int] | None,
                  quant: str) -> str | None:
    """The refusal of the registry's quantized operator for inputs described by constants (once per compile)."""
    from sparseattn.ops.quant import _KERNEL_OP, quant_choice

    q = _stand_in(q_shape, dtype, device)
    layout = None
    if blocks is not None:  # only the block sizes matter to the refusal
        layout = BlockLayout(_stand_in((q_shape[0], q_shape[1], 1), torch.int32, device),
                             _stand_in((q_shape[0], q_shape[1], 1, 1), torch.int32, device), blocks[0], blocks[1],
                             blocks[0], blocks[1], validate=False)
    return quant_choice(q, quant=quant, layout=layout, names=(_KERNEL_OP,))[1]


def quantized_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    layout: BlockLayout | None = None,
    causal: bool = False,
    scale: float | None = None,
    quant: str = "int8",
    quant_granularity: str = "per_warp",
    smooth_k: bool = True,
    backend: str = "auto",
    smooth_q: bool = True,
    balance_qk: bool = True,
) -> AttentionState:
    """:func:`~sparseattn.ops.quant.quantized_attention` (``return_lse=True``) through a registered custom op.

    Same validation and refusals (``NotImplementedError`` with the registry operator's reason), traceable
    by ``torch.compile(fullgraph=True)``. ``backend``: ``"auto"`` / ``"triton"`` (the quantized kernel:
    CUDA, or the CPU under ``TRITON_INTERPRET=1``) or ``"reference"`` (the PyTorch emulation with the same
    scales and rounding, :func:`~sparseattn.ops.quant_reference.emulated_quantized_attention`: any device).
    ``topk_indices`` / ``config`` are not offered (build the layout first).

    Shapes:
        q ``(B, H, N_q, D)``, k/v ``(B, H_kv, N_kv, D)`` → out ``(B, H, N_q, D)`` in q's dtype, lse ``(B, H, N_q)``
        float32.
    """
    from sparseattn.ops import quant as Q

    fn = "quantized_attention_op"
    if backend not in ("auto", "triton", "reference"):
        raise fail(fn, "backend", "is unknown", "one of ['auto', 'triton', 'reference']", repr(backend))
    Q._check_modes(fn, quant, quant_granularity)
    check_attention_args(fn, q, k, v, causal=causal, layout=layout, scale=scale, pv_threshold=None)
    Q._check_smoothing(fn, smooth_k, smooth_q, balance_qk)
    if backend != "reference":
        blocks = None if layout is None else (layout.block_m, layout.block_n)
        reason = _select_quant(str(q.device), q.dtype, tuple(q.shape), blocks, quant)
        if reason is not None:
            raise NotImplementedError(f"{fn}: the quantized kernel cannot run these inputs: {reason}")
    op = torch.ops.sparseattn.quantized_attention_ref if backend == "reference" else \
        torch.ops.sparseattn.quantized_attention_triton
    sc = None if scale is None else float(scale)
    if layout is None:
        out, lse = op(q, k, v, None, None, 0, 0, causal, sc, quant, quant_granularity, smooth_k, smooth_q,
                      balance_qk)
    else:
        out, lse = op(q, k, v, layout.kv_num_blocks, layout.kv_indices, layout.block_m, layout.block_n, causal, sc,
                      quant, quant_granularity, smooth_k, smooth_q, balance_qk)
    return AttentionState(out, lse)


# --------------------------------------------------------------------------- merging states as an operator
MERGE_REF_OP = "sparseattn::merge_states_ref"
MERGE_TRITON_OP = "sparseattn::merge_states_triton"
_MERGE_SCHEMA = "(Tensor[] outs, Tensor[] lses) -> (Tensor, Tensor)"


def _merge_fake(outs: list[torch.Tensor], lse_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    o = outs[0]
    return o.new_empty(o.shape), o.new_empty(o.shape[:3], dtype=lse_dtype)


@torch.library.custom_op(MERGE_REF_OP, mutates_args=(), schema=_MERGE_SCHEMA)
def _merge_states_ref(outs: list[torch.Tensor], lses: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    from sparseattn.state.merge import merge_states_reference

    st = merge_states_reference(list(zip(outs, lses)))
    return st.out.contiguous(), st.lse.contiguous()  # fresh tensors (the merge never returns its inputs)


@_merge_states_ref.register_fake
def _(outs, lses):  # noqa: ANN001, ANN202
    from sparseattn.state.merge import merge_dtype

    return _merge_fake(outs, merge_dtype(lses))


@torch.library.custom_op(MERGE_TRITON_OP, mutates_args=(), schema=_MERGE_SCHEMA)
def _merge_states_triton(outs: list[torch.Tensor], lses: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    from sparseattn.state.merge import merge_states_triton

    st = merge_states_triton(list(zip(outs, lses)))
    return st.out.contiguous(), st.lse.contiguous()


@_merge_states_triton.register_fake
def _(outs, lses):  # noqa: ANN001, ANN202
    return _merge_fake(outs, torch.float32)


def merge_states_op(states: Any, *, backend: str = "auto") -> AttentionState:
    """:func:`~sparseattn.state.merge.merge_states` through a registered custom op (``torch.compile``-traceable).

    Same validation and results; ``backend``: ``"auto"`` (the Triton merge on CUDA, else the reference),
    ``"triton"`` or ``"reference"``. ``out`` in the first state's dtype, ``lse`` float32 (float64 for float64
    lse on the reference).
    """
    from sparseattn.state.merge import check_states, merge_dtype, merge_triton_refusal

    fn = "merge_states_op"
    if backend not in ("auto", "triton", "reference"):
        raise fail(fn, "backend", "is unknown", "one of ['auto', 'triton', 'reference']", repr(backend))
    pairs = check_states(fn, states)
    outs, lses = [o for o, _ in pairs], [l for _, l in pairs]
    out0 = outs[0]
    lse_dtype = merge_dtype(lses)
    name = "reference"
    if backend == "triton" or (backend == "auto" and out0.is_cuda):
        reason = merge_triton_refusal(out0, lse_dtype=lse_dtype)
        if reason is None:
            name = "triton"
        elif backend == "triton":
            raise NotImplementedError(f"{fn}: the Triton merge cannot run these states: {reason}")
    op = torch.ops.sparseattn.merge_states_triton if name == "triton" else torch.ops.sparseattn.merge_states_ref
    out, lse = op(outs, lses)
    return AttentionState(out, lse)
