"""Learned block gate predictor (SeerAttention-style), trained by ``sparseattn train-gate``.

Per layer, the block scores come from small learned projections of pooled features (see
:mod:`sparseattn.gate.model`): the mean of each query block, and the per-coordinate max / min /
mean of each key block, projected per KV-head group (GQA: the query heads of a group share their KV
head's projections) and compared by a scaled dot product. Over the allowed (causal, block-level)
key blocks of each row::

    P = softmax(s)          s = (q̄ W_q)·([kmax, kmin, k̄] W_k) / sqrt(d_gate) + b[head, bucket]

and, like mean_sim, the row keeps the smallest set of key blocks whose cumulative ``P`` reaches
``cdf_threshold`` (or the ``ceil(topk · n)`` largest), plus ``keep_sink`` (key block 0) and
``keep_local`` (the diagonal block and the ``keep_local − 1`` before it). ``b`` is the gate's
learned position bias (version-2 files; sink and block-distance buckets,
:func:`sparseattn.gate.model.bias_bucket_index`): one gather per call from the layer's table (copied
to the device once) with a cached shape-only bucket index. A query or key block holding NaN/inf keeps
every block it touches (as mean_sim does), so non-finite values reach exactly the outputs dense
attention would make non-finite.

Spec: ``gate:path=gate.safetensors,topk=0.1`` or ``gate:path=gate.safetensors,cdf_threshold=0.95``
(exactly one of ``topk`` / ``cdf_threshold``; neither means ``cdf_threshold=0.95``). The block
sizes are the file's (the ones the gate was trained at). Layers the file holds no weights for, and
layers below ``dense_layers``, get the dense (causal) layout.

Backends (``GatePredictor(config, backend=...)``): ``"torch"``; ``"triton"`` — the fused path:
the pooling kernel of :mod:`sparseattn.ops.triton.mean_sim_predict` (one launch for q means and
key max/min/mean), the projections and scores as three batched matmuls, and mean_sim's selection
kernel (softmax, top-k / CDF, forced blocks and the layout rows written directly); no host sync,
no dense mask; ``"auto"`` (default): fused for CUDA tensors when supported, else torch. The paths
agree except where float rounding flips a decision sitting on a threshold (the kernel rounds the
block sums to the input dtype, as mean_sim's does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sparseattn._validation import fail
from sparseattn.layout.block_layout import BlockLayout, cdiv
from sparseattn.predictors._common import (
    cached,
    causal_region,
    check_bool,
    check_nonneg,
    check_opt_fraction,
    check_pv_threshold,
    check_qk,
    check_version,
    config_or_default,
    dense_predicted_layout,
    forced_blocks,
    mask_to_layout,
    select_cdf,
    select_topk,
)
from sparseattn.predictors.base import register_predictor

__all__ = ["GateConfig", "GatePredictor", "DEFAULT_CDF"]

DEFAULT_CDF = 0.95
_BACKENDS = ("auto", "torch", "triton")


@dataclass(frozen=True)
class GateConfig:
    """Learned-gate prediction (see module docstring).

    Args:
        path: the gate file written by ``sparseattn train-gate`` (or None when the predictor is built
            with in-memory weights).
        cdf_threshold: keep the smallest set of key blocks holding this share of the gate's block
            distribution per row; or None.
        topk: keep this fraction of the allowed key blocks per row instead; or None. At most one of
            the two may be set; neither means ``cdf_threshold = 0.95``.
        keep_sink: always keep key block 0.
        keep_local: always keep the diagonal key block and the ``keep_local − 1`` before it (0 = off).
        dense_layers: layers with index below this return the dense (causal) layout.
        pv_threshold: natural-log gap for the attention call's softmax-aware P·V skip; None = off.
        version: config schema version (1).
    """

    path: str | None = None
    cdf_threshold: float | None = None
    topk: float | None = None
    keep_sink: bool = True
    keep_local: int = 1
    dense_layers: int = 0
    pv_threshold: float | None = None
    version: int = 1

    def __post_init__(self) -> None:
        c = "GateConfig"
        if self.path is not None and (not isinstance(self.path, str) or not self.path.strip()):
            raise fail(c, "path", "must be a file path or None", "e.g. 'gate.safetensors'", repr(self.path))
        check_opt_fraction(c, "cdf_threshold", self.cdf_threshold)
        check_opt_fraction(c, "topk", self.topk)
        if self.topk is not None and self.cdf_threshold is not None:
            raise fail(c, "topk/cdf_threshold", "at most one may be set", "cdf_threshold=<frac> or topk=<frac>",
                       f"cdf_threshold={self.cdf_threshold}, topk={self.topk}")
        if self.topk is None and self.cdf_threshold is None:
            object.__setattr__(self, "cdf_threshold", DEFAULT_CDF)
        check_bool(c, "keep_sink", self.keep_sink)
        check_nonneg(c, "keep_local", self.keep_local)
        check_nonneg(c, "dense_layers", self.dense_layers)
        check_pv_threshold(c, self.pv_threshold)
        check_version(c, self.version, 1)


def _auto_device_ok(q: torch.Tensor) -> bool:
    return q.is_cuda


@register_predictor("gate", GateConfig)
class GatePredictor:
    """Block selection from a learned gate (see module docstring).

    ``last_scores`` holds the gate's block distribution ``P`` ``[B, H, Mb, Nb]`` of the last call.

    Args:
        config: the prediction parameters; ``config.path`` is read unless ``weights`` is given.
        weights: in-memory :class:`~sparseattn.gate.model.GateWeights` (e.g. straight from training).
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (see module docstring).
        model: optional model whose shape the file must match (checked at load).

    Raises:
        ValueError: no path and no weights, or a file :func:`sparseattn.gate.store.load_gate` rejects.
    """

    name = "gate"

    def __init__(self, config: GateConfig | None = None, weights: Any = None, backend: str = "auto",
                 model: Any = None) -> None:
        fn = "GatePredictor"
        self.config = config_or_default(fn, config, GateConfig)
        if not isinstance(backend, str) or backend not in _BACKENDS:
            raise fail(fn, "backend", "is not a known backend", f"one of {list(_BACKENDS)}", repr(backend))
        if weights is None:
            if self.config.path is None:
                raise fail(fn, "config.path", "is required (no in-memory weights given)",
                           "gate:path=<file written by sparseattn train-gate>,topk=0.1", None)
            from sparseattn.gate.store import load_gate

            weights = load_gate(self.config.path, model=model)
        else:
            from sparseattn.gate.model import GateWeights

            if not isinstance(weights, GateWeights):
                raise fail(fn, "weights", "must be GateWeights", "GateWeights", type(weights).__name__)
        self.weights = weights
        self.block_m = int(weights.block_m)
        self.block_n = int(weights.block_n)
        self.backend = backend
        self.last_scores: torch.Tensor | None = None
        self.last_backend: str | None = None
        self._dev_weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._dev_bias: dict[tuple[int, str], torch.Tensor] = {}
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ weights on the device
    def _layer_weights(self, pos: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(wq · d^-1/2, wk, wkᵀ)`` of stacked position ``pos`` on ``device`` (copied once, then cached)."""
        key = (pos, str(device))
        hit = self._dev_weights.get(key)
        if hit is None:
            d = self.weights.d_gate
            wq = (self.weights.wq[pos].to(torch.float32) * d ** -0.5).to(device).contiguous()
            wk = self.weights.wk[pos].to(device=device, dtype=torch.float32).contiguous()
            hit = (wq, wk, wk.transpose(-1, -2).contiguous())
            self._dev_weights[key] = hit
        return hit

    def _layer_bias(self, pos: int, nq: int, nkv: int, device: torch.device) -> torch.Tensor | None:
        """The position bias of stacked position ``pos`` expanded to ``[H, Mb, Nb]`` for an ``nq × nkv`` call (one
        gather: the per-layer table is copied to the device once, the bucket index is shape-only and cached);
        None for a gate without a bias."""
        if self.weights.bias is None:
            return None
        dev = str(device)
        table = self._dev_bias.get((pos, dev))
        if table is None:
            table = self.weights.bias[pos].to(device=device, dtype=torch.float32).contiguous()
            self._dev_bias[(pos, dev)] = table
        from sparseattn.gate.model import bias_bucket_index

        bm, bn = self.block_m, self.block_n
        idx = cached(("gate_bias_index", nq, nkv, bm, bn, dev), lambda: bias_bucket_index(nq, nkv, bm, bn, device))
        return table[:, idx]

    def _resolve_layer(self, fn: str, layer: int | None) -> int | None:
        w = self.weights
        if layer is None:
            if len(w.layers) == 1:
                return 0
            raise fail(fn, "layer", "is required: the gate holds weights for several layers",
                       f"one of {w.layers}", None)
        return w.index(int(layer))

    def _fused(self, q: torch.Tensor, k: torch.Tensor) -> bool:
        if self.backend == "torch" or (self.backend == "auto" and not _auto_device_ok(q)):
            return False
        from types import SimpleNamespace

        from sparseattn.predictors.fused_mean_sim import registry_refusal, take_fused

        shim = SimpleNamespace(score="minmax", topk=self.config.topk, cdf_threshold=self.config.cdf_threshold,
                               block_n=self.block_n)
        return take_fused("GatePredictor", self.backend, registry_refusal(q, k, shim), self._warned)

    def _check_shapes(self, fn: str, q: torch.Tensor, k: torch.Tensor, causal: bool) -> tuple[int, ...]:
        """``check_qk`` plus the gate's own shape: head_dim, KV heads and (with a position bias) query heads."""
        B, H, Hkv, Nq, Nkv, D = check_qk(fn, q, k, causal)
        w = self.weights
        if D != w.head_dim or Hkv != w.kv_heads:
            raise fail(fn, "q/k", "do not match the gate's shape (trained for another model?)",
                       f"head_dim {w.head_dim}, {w.kv_heads} KV heads", f"head_dim {D}, {Hkv} KV heads")
        if w.heads is not None and H != w.heads:
            raise fail(fn, "q", "has another number of query heads than the gate's position bias",
                       f"{w.heads} heads", f"{H} heads")
        return B, H, Hkv, Nq, Nkv, D

    def _probs(self, q: torch.Tensor, k: torch.Tensor, pos: int, bias: torch.Tensor | None, causal: bool
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Torch path of the block distribution: ``(P [B, H, Mb, Nb], bad_q [B, H, Mb], bad_k [B, H_kv, Nb],
        region [Mb, Nb])``; ``bad_*``: the block's pooled features hold NaN/inf."""
        from sparseattn.gate.model import pooled_features

        B, H, Nq, D = q.shape
        Hkv, Nkv = k.shape[1], k.shape[2]
        G = H // Hkv
        bm, bn = self.block_m, self.block_n
        wq, wk, _ = self._layer_weights(pos, q.device)
        q_mean, k_feat = pooled_features(q, k, bm, bn)
        Mb, Nb = q_mean.shape[2], k_feat.shape[2]
        qg = torch.matmul(q_mean.reshape(B, Hkv, G * Mb, D), wq)  # d^-1/2 folded into wq
        kg = torch.matmul(k_feat, wk)
        s = torch.matmul(qg, kg.transpose(-1, -2)).reshape(B, H, Mb, Nb)
        if bias is not None:
            s = s + bias
        dev = q.device
        region = causal_region(Nq, Nkv, bm, bn, causal, dev)
        row_has = cached(("gate_row_has", Nq, Nkv, bm, bn, causal, str(dev)), lambda: region.any(-1, keepdim=True))
        p = torch.softmax(s.masked_fill(~region, float("-inf")), dim=-1).masked_fill_(~row_has, 0.0)
        return p, ~torch.isfinite(q_mean).all(-1), ~torch.isfinite(k_feat).all(-1), region

    def block_probs(self, q: torch.Tensor, k: torch.Tensor, *, causal: bool = True, layer: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The gate's block distribution without a selection (torch path; the per-head tuner's input).

        Returns ``(P [B, H, Mb, Nb] float32, bad_q [B, H, Mb], bad_k [B, H_kv, Nb], region [Mb, Nb])`` (``bad_*``:
        blocks whose pooled features hold NaN/inf, which every selection must keep), or None for a layer the
        gate holds no weights for (or below ``config.dense_layers``): that layer is dense.
        """
        fn = "GatePredictor.block_probs"
        _B, H, _Hkv, Nq, Nkv, _D = self._check_shapes(fn, q, k, causal)
        pos = self._resolve_layer(fn, layer)
        if pos is None or (layer is not None and layer < self.config.dense_layers):
            return None
        return self._probs(q, k, pos, self._layer_bias(pos, Nq, Nkv, q.device), causal)

    # ------------------------------------------------------------------ predict
    def predict(self, q: torch.Tensor, k: torch.Tensor, *, causal: bool = True, layer: int | None = None) -> BlockLayout:
        fn = "GatePredictor.predict"
        B, H, Hkv, Nq, Nkv, _D = self._check_shapes(fn, q, k, causal)
        cfg = self.config
        bm, bn = self.block_m, self.block_n
        pos = self._resolve_layer(fn, layer)
        if pos is None or (layer is not None and layer < cfg.dense_layers):
            self.last_scores = None
            return dense_predicted_layout(B, H, Nq, Nkv, bm, bn, causal, q.device)
        wq, wk, wk_t = self._layer_weights(pos, q.device)
        bias = self._layer_bias(pos, Nq, Nkv, q.device)
        if self._fused(q, k):
            layout, p = _fused_predict(q, k, wq, wk_t, cfg, bm, bn, causal=causal, bias=bias)
            self.last_scores = p
            self.last_backend = "triton"
            return layout
        self.last_backend = "torch"
        p, bad_q, bad_k, region = self._probs(q, k, pos, bias, causal)
        if cfg.topk is not None:
            mask = select_topk(p, region, cfg.topk)
        else:
            mask = select_cdf(p, region, float(cfg.cdf_threshold))  # type: ignore[arg-type]
        forced = forced_blocks(Nq, Nkv, bm, bn, cfg.keep_sink, cfg.keep_local, causal, q.device)
        G = H // Hkv
        mask = (mask | forced | bad_q.unsqueeze(-1) | bad_k.repeat_interleave(G, dim=1).unsqueeze(-2)) & region
        self.last_scores = p
        lay = mask_to_layout(mask, block_m=bm, block_n=bn, seqlen_q=Nq, seqlen_kv=Nkv)
        return BlockLayout(lay.kv_num_blocks, lay.kv_indices, bm, bn, Nq, Nkv, validate=False, in_region=bool(causal))

    def reset(self) -> None:
        """Stateless: nothing to clear."""


def _fused_predict(q: torch.Tensor, k: torch.Tensor, wq: torch.Tensor, wk_t: torch.Tensor, cfg: GateConfig,
                   bm: int, bn: int, *, causal: bool, bias: torch.Tensor | None = None) -> tuple[BlockLayout, torch.Tensor]:
    """Pool (one Triton launch), project and score (three batched matmuls, + one add with a bias), select
    (one Triton launch).

    ``wq`` ``[H_kv, D, d]`` already scaled by ``d^-1/2``; ``wk_t`` ``[H_kv, d, 3D]``; ``bias`` the expanded
    position bias ``[H, Mb, Nb]`` or None. Returns the layout and ``P`` ``[B, H, Mb, Nb]`` float32.
    """
    from sparseattn.predictors.fused_mean_sim import _NullContext, _geometry, _kernels, _pool_meta, _select_meta, launch_config

    B, H, Nq, D = (int(s) for s in q.shape)
    Hkv, Nkv = int(k.shape[1]), int(k.shape[2])
    G = H // Hkv
    Mb, Nb = cdiv(Nq, bm), cdiv(Nkv, bn)
    dev = q.device
    f32 = torch.float32
    geo = _geometry(Nq, Nkv, bm, bn, causal, cfg.topk, dev)
    q_mean = torch.empty((B, H, Mb, D), dtype=f32, device=dev)
    q_sim = torch.empty((B, H, Mb), dtype=f32, device=dev)
    kst = torch.empty((B, Hkv, 3, D, Nb), dtype=f32, device=dev)  # [max, min, mean], transposed per feature
    k_sim = torch.empty((B, Hkv, Nb), dtype=f32, device=dev)
    num = torch.empty((B, H, Mb), dtype=torch.int32, device=dev)
    idx = torch.empty((B, H, Mb, Nb), dtype=torch.int32, device=dev)
    pool, _, select = _kernels()
    launch = launch_config(dev)  # the mean_sim_fused operator's launch config: the same pool and select kernels
    qs, ks = q.stride(), k.stride()
    topk = cfg.topk is not None
    thr = 0.0 if topk else float(cfg.cdf_threshold)  # type: ignore[arg-type]

    from sparseattn.ops.triton_launch import _LAUNCH_LOCK

    guard = torch.cuda.device(dev) if dev.type == "cuda" else _NullContext()
    with _LAUNCH_LOCK, guard:
        pool[(Mb * H + Nb * Hkv, B)](
            q, k, q_mean, q_sim, kst[:, :, 2], k_sim, kst[:, :, 1], kst[:, :, 0],
            qs[0], qs[1], qs[2], qs[3], ks[0], ks[1], ks[2], ks[3],
            H * Mb * D, Mb * D, D, 1, Hkv * 3 * D * Nb, 3 * D * Nb, 1, Nb,
            H * Mb, Mb, Hkv * Nb, Nb,
            Nq, Nkv, Mb, Nb, H, D, **_pool_meta(bm, bn, D, True, launch))
    qg = torch.matmul(q_mean.view(B, Hkv, G * Mb, D), wq)  # [B, Hkv, G*Mb, d]
    kg_t = torch.matmul(wk_t, kst.view(B, Hkv, 3 * D, Nb))  # [B, Hkv, d, Nb]
    p = torch.matmul(qg, kg_t).view(B, H, Mb, Nb)  # raw scores; the select kernel overwrites them with P
    if bias is not None:
        p.add_(bias)
    with _LAUNCH_LOCK, guard:
        # sim_threshold -2 < every finite self-similarity: only a block holding NaN/inf (similarity NaN) is
        # "untrusted", i.e. kept wherever it is touched, like the torch path's non-finite rule
        select[(Mb, H, B)](
            p, q_sim, k_sim, geo, p, num, idx,
            H, G, Mb, Nb, thr, -2.0, int(cfg.keep_local),
            TOPK=topk, KEEP_SINK=bool(cfg.keep_sink), CAUSAL=bool(causal), MIXED=False,
            **_select_meta(Nb, launch))
    return BlockLayout(num, idx, bm, bn, Nq, Nkv, validate=False, in_region=bool(causal)), p
