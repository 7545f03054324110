"""The data a tuning run produces: per-(layer, head) predictor parameters and the run's metadata.

This module is the contract between the search (:mod:`sparseattn.tuning.search`), the store
(:mod:`sparseattn.tuning.store`: safetensors + JSON, never pickle) and the predictor that applies the
result (:mod:`sparseattn.tuning.predictor`). It imports neither Triton nor transformers.

A tuned head is a mean_sim setting (SpargeAttn's per-head tuning): ``sim_threshold``,
``cdf_threshold`` and ``pv_threshold`` per head, on top of layer-wide choices kept in the metadata
(``block_m``, ``block_n``, ``keep_sink``, ``keep_local``, ``score``). A head that no setting keeps
under the budget is ``dense`` (its whole causal row is attended; its three thresholds are then
meaningless and stored as NaN).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from sparseattn._validation import fail

__all__ = ["TUNED_VERSION", "RULES", "ALLOCATION_RULE", "HeadParams", "TunedConfig"]

TUNED_VERSION = 1
#: error rules between the sparse and the dense (fp32 reference) attention output of one head
RULES = ("l1", "cosine", "rmse")
#: the ``rule`` of a file from :mod:`sparseattn.tuning.allocate` (per-layer thresholds by model-level KL sensitivity;
#: ``error`` holds each layer's predicted KL share, ``budgets`` ``{"kl": float}``)
ALLOCATION_RULE = "layer_kl"
_FIELDS = ("sim_threshold", "cdf_threshold", "pv_threshold", "sparsity", "error")


@dataclass(frozen=True)
class HeadParams:
    """One layer's tuned parameters, one entry per query head (all tensors ``[H]``, on the CPU).

    Args:
        sim_threshold: float32; blocks with self-similarity below it are not trusted (kept).
        cdf_threshold: float32 in (0, 1]; share of the compressed attention mass kept per row.
        pv_threshold: float32 > 0; the attention call's P·V skip (natural-log gap); ``inf`` = off.
        dense: bool; the head keeps every causal block (its thresholds are NaN).
        sparsity: float32 in [0, 1]; block sparsity the setting reached on the calibration samples (mean).
        error: float32 >= 0; the worst error under the rule over the calibration samples
            (for ``cosine`` the stored error is ``1 - cosine``).
        keep_local: optional float32 ``[H]``: per-head local blocks (the diagonal block and the
            ``keep_local - 1`` before it), an integer >= 1 for sparse heads (NaN for dense ones),
            replacing the layer-wide ``keep_local`` of the metadata; None: the layer-wide value.
    """

    sim_threshold: torch.Tensor
    cdf_threshold: torch.Tensor
    pv_threshold: torch.Tensor
    dense: torch.Tensor
    sparsity: torch.Tensor
    error: torch.Tensor
    keep_local: torch.Tensor | None = None

    def __post_init__(self) -> None:
        fn = "HeadParams"
        if not isinstance(self.dense, torch.Tensor) or self.dense.dim() != 1 or self.dense.dtype != torch.bool:
            raise fail(fn, "dense", "must be a 1-D bool tensor", "tensor[H] bool",
                       getattr(self.dense, "shape", type(self.dense).__name__))
        H = self.dense.shape[0]
        for name in _FIELDS:
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != (H,) or not t.dtype.is_floating_point:
                raise fail(fn, name, "must be a float tensor with one entry per head", f"tensor[{H}] float32",
                           f"{type(t).__name__} {tuple(getattr(t, 'shape', ()))} {getattr(t, 'dtype', '')}")
        live = ~self.dense
        for name in ("sim_threshold", "cdf_threshold"):
            t = getattr(self, name)
            if bool(torch.isnan(t[live]).any()):
                raise fail(fn, name, "is NaN for a head that is not dense", "finite values for sparse heads",
                           [int(i) for i in torch.nonzero(live & torch.isnan(t)).flatten()])
        cdf = self.cdf_threshold[live]
        if bool(((cdf <= 0) | (cdf > 1)).any()):
            raise fail(fn, "cdf_threshold", "is out of range", "values in (0, 1]", cdf.tolist())
        pv = self.pv_threshold[live]
        if bool((torch.isnan(pv) | (pv <= 0)).any()):
            raise fail(fn, "pv_threshold", "is out of range", "values > 0 (inf: no skip)", pv.tolist())
        kl = self.keep_local
        if kl is not None:
            if not isinstance(kl, torch.Tensor) or tuple(kl.shape) != (H,) or not kl.dtype.is_floating_point:
                raise fail(fn, "keep_local", "must be a float tensor with one entry per head or None",
                           f"tensor[{H}] float32", f"{type(kl).__name__} {tuple(getattr(kl, 'shape', ()))}")
            v = kl[live]
            if bool((torch.isnan(v) | (v < 1) | (v != torch.round(v)) | torch.isinf(v)).any()):
                raise fail(fn, "keep_local", "is out of range for a sparse head", "integers >= 1", v.tolist())

    @property
    def heads(self) -> int:
        return int(self.dense.shape[0])

    def tensors(self, layer: int) -> dict[str, torch.Tensor]:
        """The safetensors entries of this layer: ``"<layer>.<field>"`` → contiguous CPU tensor."""
        out = {f"{layer}.{name}": getattr(self, name).detach().to("cpu", torch.float32).contiguous() for name in _FIELDS}
        out[f"{layer}.dense"] = self.dense.detach().to("cpu").contiguous()
        if self.keep_local is not None:
            out[f"{layer}.keep_local"] = self.keep_local.detach().to("cpu", torch.float32).contiguous()
        return out

    @staticmethod
    def from_tensors(layer: int, tensors: dict[str, torch.Tensor]) -> "HeadParams":
        """Inverse of :meth:`tensors` (a missing key raises ``KeyError`` naming it; the store words the error)."""
        kw = {name: tensors[f"{layer}.{name}"] for name in (*_FIELDS, "dense")}
        return HeadParams(**kw, keep_local=tensors.get(f"{layer}.keep_local"))

    def local_blocks(self, default: int) -> list[int]:
        """Per-head local block counts (``default`` where none is stored, and for dense heads)."""
        if self.keep_local is None:
            return [int(default)] * self.heads
        return [int(default) if (bool(d) or math.isnan(float(v))) else int(v)
                for v, d in zip(self.keep_local.tolist(), self.dense.tolist())]


@dataclass
class TunedConfig:
    """A whole model's tuning result.

    Args:
        layers: ``{layer index: HeadParams}`` for every tuned layer (layers absent here are dense
            or were not tuned; ``meta["dense_layers"]`` lists the ones kept dense on purpose,
            ``meta["window_layers"]`` the sliding-window layers, which run as exact bands).
        meta: JSON-friendly metadata. Keys written by the tuner: ``version`` (int, this module's
            :data:`TUNED_VERSION`), ``model`` (name or path), ``fingerprint`` (``{"num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "model_type"}``), ``predictor``
            (the layer-wide mean_sim fields: ``block_m``, ``block_n``, ``keep_sink``, ``keep_local``,
            ``score``), ``rule``, ``budgets`` (``{"l1": float, "pv_l1": float | None, "layer_l1": str}``),
            ``seq_len``, ``samples`` (calibration texts: names), ``dense_layers`` (list), ``window_layers`` (list; files
            written before it existed lack it), ``seconds``
            (tuning wall time), ``device``, ``created`` (UTC ISO date). A file tuned over a learned gate has
            ``predictor["name"] == "gate"`` (and ``score`` ``"gate"``) and ``gate`` (the gate file's metadata).
        gate: the :class:`~sparseattn.gate.model.GateWeights` a gate-tuned file was tuned over (embedded in the
            file), or None for mean_sim.
    """

    layers: dict[int, HeadParams]
    meta: dict[str, Any] = field(default_factory=dict)
    gate: Any = None

    def summary(self) -> dict[str, Any]:
        """Per-layer mean sparsity and worst error, and the overall mean sparsity (JSON-friendly)."""
        per: dict[str, Any] = {}
        for li in sorted(self.layers):
            hp = self.layers[li]
            per[str(li)] = {"sparsity": float(hp.sparsity.mean()), "max_error": float(hp.error.max()),
                            "dense_heads": int(hp.dense.sum())}
        vals = [v["sparsity"] for v in per.values()]
        return {"layers": per, "mean_sparsity": (sum(vals) / len(vals)) if vals else math.nan}
