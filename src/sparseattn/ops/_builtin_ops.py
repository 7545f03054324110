"""The package's built-in operators: thin adapters over the existing launchers (no kernel code here).

:func:`builtin_operators` is handed to the registry by ``sparseattn/ops/__init__.py``
(:func:`sparseattn.ops.registry.set_builtin_loader`) and called on the registry's first use; the
registry never imports this module. Run and refusal functions
that live in modules importing Triton (or an upper layer) are named as ``"module:function"`` strings
and resolved on first call, so listing operators imports nothing heavy.
"""

from __future__ import annotations

from typing import Any

import torch

from sparseattn.ops.launch_configs import BlockSparseFwdConfig, DecodeLaunchConfig, MeanSimLaunchConfig, QuantLaunchConfig
from sparseattn.ops.registry import Operator
from sparseattn.state.types import AttentionState

_HALF = (torch.float16, torch.bfloat16)


# ------------------------------------------------------------------------- prefill (attention entry point)
def reference_refusal(q: torch.Tensor, **_: Any) -> str | None:
    return None


def reference_run(q, k, v, *, causal, layout, scale, pv_threshold, stats, sliding_window=None,  # noqa: ANN001
                  attn_mask=None, row_bounds=None) -> AttentionState:  # noqa: ANN001
    from sparseattn.ops.reference import reference_attention

    return reference_attention(q, k, v, causal=causal, layout=layout, scale=scale, pv_threshold=pv_threshold, stats=stats,
                               sliding_window=sliding_window, attn_mask=attn_mask, row_bounds=row_bounds)


def triton_refusal(q: torch.Tensor, **kw: Any) -> str | None:
    from sparseattn.ops import triton_launch

    return triton_launch.refusal(q, **kw)


def triton_run(q, k, v, *, causal, layout, scale, pv_threshold, stats, sliding_window=None,  # noqa: ANN001
               attn_mask=None, row_bounds=None) -> AttentionState:  # noqa: ANN001
    from sparseattn.ops import triton_launch

    return triton_launch.block_sparse_fwd(q, k, v, layout=layout, causal=causal, scale=scale,
                                          pv_threshold=pv_threshold, stats=stats, sliding_window=sliding_window,
                                          attn_mask=attn_mask, row_bounds=row_bounds)


def _on_cuda(q: torch.Tensor, pv_threshold: Any = None) -> bool:
    # on CPU the Triton interpreter (TRITON_INTERPRET=1) is a test vehicle, never the automatic choice
    return q.is_cuda


# ------------------------------------------------------------------------- masked SDPA (integration entry point)
def masked_sdpa_refusal(q: torch.Tensor, *, causal: bool = True, pv_threshold: Any = None, **_: Any) -> str | None:
    if pv_threshold is not None:
        return f"cannot apply pv_threshold={pv_threshold} (SDPA computes every selected key)"
    if not causal:
        return "causal attention only (the model integration's path)"
    return None


def _masked_sdpa_preferred(q: torch.Tensor, pv_threshold: Any = None) -> bool:
    # the CPU fast path of patch_model: CUDA inputs go to the kernels, pv_threshold to the reference
    return not q.is_cuda and pv_threshold is None


# ------------------------------------------------------------------------- decode
def decode_triton_refusal(q: torch.Tensor, *, kv_dtype: torch.dtype | None = None, **_: Any) -> str | None:
    from sparseattn.ops.decode import decode_refusal

    return decode_refusal(q, kv_dtype)


def decode_triton_run(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, **kw: Any) -> Any:
    from sparseattn.ops.decode import decode_attention

    return decode_attention(q, k_cache, v_cache, backend="triton", **kw)


def decode_reference_run(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, **kw: Any) -> Any:
    from sparseattn.ops.decode import decode_attention

    return decode_attention(q, k_cache, v_cache, backend="reference", **kw)


# ------------------------------------------------------------------------- quantized prefill
def quant_refusal(q: torch.Tensor, **kw: Any) -> str | None:
    from sparseattn.ops.quant import quant_refusal as refuse

    return refuse(q, **kw)


def quant_reference_run(q, k, v, *, layout=None, causal=False, scale=None, quant="int8",  # noqa: ANN001
                        quant_granularity="per_warp", smooth_k=True, return_lse=False, **_: Any) -> Any:
    """``quantized_attention``'s signature over the emulation (``topk_indices`` / ``config`` are not taken)."""
    from sparseattn.ops.quant_reference import emulated_quantized_attention

    out, lse = emulated_quantized_attention(q, k, v, layout=layout, causal=causal, scale=scale, quant=quant,
                                            quant_granularity=quant_granularity, smooth_k=smooth_k)
    return AttentionState(out, lse) if return_lse else out


# ------------------------------------------------------------------------- merging attention states
def merge_triton_refusal(q: torch.Tensor, **kw: Any) -> str | None:
    from sparseattn.state.merge import merge_triton_refusal as refuse

    return refuse(q, **kw)


def builtin_operators() -> list[Operator]:
    return [
        Operator("triton", "prefill", run=triton_run, refusal=triton_refusal, devices=("cuda",), dtypes=_HALF,
                 head_dims=(64, 128, 256), entry_points=("attention", "integration"), priority=10, preferred=_on_cuda,
                 config_type=BlockSparseFwdConfig, tuned="prefill.json",
                 custom_op="sparseattn::block_sparse_attention_triton",
                 description="Triton block-sparse prefill kernel (ops/triton/block_sparse_fwd.py, ops/triton_launch.py)"),
        Operator("reference", "prefill", run=reference_run, refusal=reference_refusal, devices=None,
                 dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64), head_dims=None,
                 entry_points=("attention", "integration"), priority=20,
                 custom_op="sparseattn::block_sparse_attention_ref",
                 description="PyTorch reference (ops/reference.py): the ground truth, any device, fp64-capable"),
        Operator("masked_sdpa", "prefill",
                 run="sparseattn.ops.masked_sdpa:masked_sdpa_attention",
                 refusal=masked_sdpa_refusal, devices=("cpu", "cuda"), dtypes=None, head_dims=None,
                 entry_points=("integration",), priority=5, preferred=_masked_sdpa_preferred,
                 description="causal layout attention as SDPA with the layout's element mask (patch_model's CPU path)"),
        Operator("decode_triton", "decode", run=decode_triton_run, refusal=decode_triton_refusal, devices=("cuda",),
                 dtypes=(torch.float16, torch.bfloat16, torch.float32), head_dims=(64, 128, 256),
                 entry_points=("decode",), priority=10, preferred=_on_cuda, config_type=DecodeLaunchConfig,
                 tuned="decode.json", custom_op="sparseattn::decode_attention_triton",
                 description="split-KV Triton decode kernel + exact merge (ops/triton/decode.py)"),
        Operator("decode_reference", "decode", run=decode_reference_run, refusal=reference_refusal, devices=None,
                 dtypes=None, head_dims=None, entry_points=("decode",), priority=20,
                 custom_op="sparseattn::decode_attention_ref",
                 description="PyTorch decode reference (ops/decode.py: decode_reference)"),
        Operator("quant_triton", "quant_prefill", run="sparseattn.ops.quant:quantized_attention", refusal=quant_refusal,
                 devices=("cuda",), dtypes=_HALF, head_dims=(64, 128, 256), entry_points=("quant",), priority=10,
                 config_type=QuantLaunchConfig, tuned="quant.json",
                 custom_op="sparseattn::quantized_attention_triton",
                 description="INT8 Q·Kᵀ / bf16 or FP8 P·V block-sparse prefill (ops/triton/block_sparse_fwd_quant.py)"),
        # the emulation is a test oracle: listed for no dispatcher (quantized_attention never falls back to it),
        # reachable by name (quantized_attention_op(backend="reference"), get_operator("quant_reference"))
        Operator("quant_reference", "quant_prefill", run=quant_reference_run, refusal=reference_refusal, devices=None,
                 dtypes=(torch.float16, torch.bfloat16, torch.float32), head_dims=None, entry_points=(), priority=20,
                 custom_op="sparseattn::quantized_attention_ref",
                 description="PyTorch emulation of the quantized kernel, same scales and rounding (ops/quant_reference.py)"),
        # run(pairs) -> AttentionState over validated (out, lse) pairs; q in refusal/preferred is the first state's out
        Operator("merge_triton", "merge", run="sparseattn.state.merge:merge_states_triton", refusal=merge_triton_refusal,
                 devices=("cuda",), dtypes=(torch.float16, torch.bfloat16, torch.float32), head_dims=None,
                 entry_points=("merge",), priority=10, preferred=_on_cuda,
                 custom_op="sparseattn::merge_states_triton",
                 description="one fused Triton kernel merging S states, fp32 accumulation (ops/triton/merge.py)"),
        Operator("merge_reference", "merge", run="sparseattn.state.merge:merge_states_reference",
                 refusal=reference_refusal, devices=None, dtypes=None, head_dims=None, entry_points=("merge",),
                 priority=20, custom_op="sparseattn::merge_states_ref",
                 description="PyTorch merge (state/merge.py), any device, float64-capable"),
        # run(q, k, config, causal=) -> (layout, p); refusal(q, k=, config=) -> str | None (predictors/fused_mean_sim.py)
        Operator("mean_sim_fused", "predict", run="sparseattn.predictors.fused_mean_sim:fused_predict",
                 refusal="sparseattn.predictors.fused_mean_sim:operator_refusal", devices=("cuda",),
                 dtypes=(torch.float16, torch.bfloat16, torch.float32), head_dims=None, entry_points=("predict",),
                 priority=10, config_type=MeanSimLaunchConfig, tuned="mean_sim.json",
                 custom_op="sparseattn::predict_layout",
                 description="the mean_sim predictor as three fused Triton kernels: pool, score, select "
                             "(ops/triton/mean_sim_predict.py); its torch path is the reference"),
    ]
