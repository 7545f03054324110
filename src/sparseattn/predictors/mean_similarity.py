"""Mean-similarity predictor (the idea of SpargeAttn, Zhang et al. 2025), per query head.

Per block of ``n`` tokens with unit-normalised rows ``x̂_i = x_i / ||x_i||``:

* mean-pooled vector ``x̄ = (1/n) Σ x_i``;
* self-similarity, the mean pairwise cosine similarity of the block's tokens::

      sim = (1 / (n (n−1))) Σ_{i≠j} x̂_i·x̂_j = (||Σ_i x̂_i||² − n) / (n (n−1))      (sim = 1 when n = 1)

  computed from one extra pooled sum, never the ``n × n`` Gram matrix. ``sim`` is in
  ``[−1/(n−1), 1]``; 1 means every token points the same way, so the mean stands for the block.

A block whose ``sim < sim_threshold`` is *not trusted* (its mean does not represent its tokens):
a dissimilar query block keeps its whole (causal) row, a dissimilar key block is kept for every
query block of its head. For the rest, the compressed attention over key blocks::

    P = softmax(scale · q̄ k̄ᵀ)   over the allowed key blocks (block-level causal mask when causal)

selects per row the smallest set of key blocks whose cumulative ``P`` reaches ``cdf_threshold``
(or the ``ceil(topk · n)`` largest). ``keep_sink`` adds the first key block and ``keep_local`` the
diagonal block and the ``keep_local − 1`` blocks before it. GQA: each query head is predicted
with its KV head's pooled keys (never copied per head).

``pv_threshold`` is not used by the predictor; the model integration passes
``getattr(predictor.config, "pv_threshold", None)`` to the attention call, which then skips the
``P·V`` product of tiles whose scores sit far below the running row maximum (see
:func:`sparseattn.ops.reference.reference_attention`).

``score`` picks the block score behind ``P`` (an extension; ``"mean"`` is SpargeAttn's):

* ``"mean"`` — ``scale · q̄·k̄`` (mean-pooled keys);
* ``"minmax"`` — the Quest-style upper bound of ``scale · q̄·k`` over the keys of the block,
  ``Σ_d max(q̄_d·kmin_d, q̄_d·kmax_d) = relu(q̄)·kmax + min(q̄, 0)·kmin`` with per-coordinate key
  minima/maxima per block (two small products): it does not average a single strong key away;
* ``"mixed"`` — ``P = (P_mean + P_minmax) / 2``.

Spec: ``mean_sim:cdf_threshold=0.9,sim_threshold=0.5,keep_local=1`` (or ``topk=0.3``).

Backends (``MeanSimilarityPredictor(config, backend=...)``; not a config field, so configs stay
backend-neutral): ``"torch"`` runs the PyTorch ops below; ``"triton"`` runs the fused path of
:mod:`sparseattn.predictors.fused_mean_sim` (three kernel launches, the layout written directly, no
host sync; every ``score``) or raises ``NotImplementedError`` naming the reason; ``"auto"``
(default) takes the fused path for CUDA tensors when it supports the call, else the torch path, with
a warning (once per predictor and reason) when a CUDA call falls back. Both give the same layout
except where float rounding flips a decision sitting exactly on a threshold (see
:mod:`sparseattn.ops.triton.mean_sim_predict`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sparseattn._validation import fail
from sparseattn.layout.block_layout import BlockLayout
from sparseattn.predictors._common import (
    block_minmax,
    block_pool,
    cached,
    causal_region,
    check_block,
    check_bool,
    check_nonneg,
    check_pv_threshold,
    check_qk,
    check_topk_or_cdf,
    check_version,
    config_or_default,
    dense_predicted_layout,
    forced_blocks,
    mask_to_layout,
    select_cdf,
    select_topk,
)
from sparseattn.predictors.base import register_predictor

__all__ = ["MeanSimilarityConfig", "MeanSimilarityPredictor", "MeanSimStats", "block_self_similarity",
           "mean_sim_stats"]

_SCORES = ("mean", "minmax", "mixed")
_BACKENDS = ("auto", "torch", "triton")


def _auto_device_ok(q: torch.Tensor) -> bool:
    """Whether ``backend="auto"`` considers the fused path for ``q`` (CUDA tensors; a hook for tests)."""
    return q.is_cuda


def block_self_similarity(unit_sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Mean pairwise cosine similarity per block from ``Σ x̂_i`` and the token count ``n``.

    Returns ``(||Σ x̂||² − n) / (n (n − 1))`` (1 for single-token blocks), float32, shape of
    ``unit_sums`` without its last dimension; NaN for a block holding a NaN/inf value (its unit sum
    is non-finite), so that block is never trusted.
    """
    sq = (unit_sums.to(torch.float32) ** 2).sum(-1)
    n = counts.to(torch.float32)
    den = (n * (n - 1)).clamp_min(1.0)
    return torch.where(n > 1, (sq - n) / den, sq - sq + 1.0)  # sq - sq: 0, or NaN for non-finite


@dataclass(frozen=True)
class MeanSimStats:
    """Threshold-independent part of a mean_sim prediction (shared by the predictor's torch path and the tuner).

    Shapes:
        probs ``[B, H_kv, G, Mb, Nb]`` (compressed attention, 0 outside the region), q_sim ``[B, H, Mb]``,
        k_sim ``[B, H_kv, Nb]``, region / forced ``[Mb, Nb]`` bool.
    """

    probs: torch.Tensor
    q_sim: torch.Tensor
    k_sim: torch.Tensor
    region: torch.Tensor
    forced: torch.Tensor
    block_m: int
    block_n: int
    seqlen_q: int
    seqlen_kv: int


def mean_sim_stats(q: torch.Tensor, k: torch.Tensor, cfg: "MeanSimilarityConfig", *, causal: bool = True) -> MeanSimStats:
    """Pool q/k, score the blocks and build the forced blocks of a mean_sim prediction (no selection).

    Uses ``cfg``'s ``block_m``, ``block_n``, ``keep_sink``, ``keep_local`` and ``score``; its thresholds
    are not read. Shape-only tensors (region row masks, forced blocks) are cached per shape.

    Shapes:
        q ``(B, H, N_q, D)``, k ``(B, H_kv, N_kv, D)``.
    """
    B, H, Nq, D = q.shape
    Hkv, Nkv = k.shape[1], k.shape[2]
    G = H // Hkv
    dev = q.device
    bm, bn = cfg.block_m, cfg.block_n
    q_sum, q_unit, q_cnt = block_pool(q, bm, normalized=True)
    k_sum, k_unit, k_cnt = block_pool(k, bn, normalized=True)
    q_sim = block_self_similarity(q_unit, q_cnt)  # [B, H, Mb]
    k_sim = block_self_similarity(k_unit, k_cnt)  # [B, Hkv, Nb]
    q_mean = q_sum / q_cnt[:, None]
    k_mean = k_sum / k_cnt[:, None]
    Mb, Nb = q_mean.shape[2], k_mean.shape[2]

    region = causal_region(Nq, Nkv, bm, bn, causal, dev)  # [Mb, Nb]
    row_has = cached(("msim_row_has", Nq, Nkv, bm, bn, causal, str(dev)),
                     lambda: region.any(-1, keepdim=True))  # [Mb, 1]
    qg = q_mean.reshape(B, Hkv, G * Mb, D)
    probs = []
    if cfg.score in ("mean", "mixed"):
        s = torch.matmul(qg, k_mean.transpose(-1, -2)) * (D ** -0.5)
        s = s.reshape(B, Hkv, G, Mb, Nb).masked_fill(~region, float("-inf"))
        # rows without an allowed block -> 0; NaN from non-finite q/k stays in the scores
        probs.append(torch.softmax(s, dim=-1).masked_fill_(~row_has, 0.0))
    if cfg.score in ("minmax", "mixed"):
        k_min, k_max = block_minmax(k, bn)
        s = (torch.matmul(qg.clamp(min=0), k_max.transpose(-1, -2))
             + torch.matmul(qg.clamp(max=0), k_min.transpose(-1, -2))) * (D ** -0.5)
        s = s.reshape(B, Hkv, G, Mb, Nb).masked_fill(~region, float("-inf"))
        probs.append(torch.softmax(s, dim=-1).masked_fill_(~row_has, 0.0))
    p = probs[0] if len(probs) == 1 else 0.5 * (probs[0] + probs[1])
    forced = forced_blocks(Nq, Nkv, bm, bn, cfg.keep_sink, cfg.keep_local, causal, dev)
    return MeanSimStats(p, q_sim, k_sim, region, forced, bm, bn, Nq, Nkv)


@dataclass(frozen=True)
class MeanSimilarityConfig:
    """SpargeAttn-style prediction (see module docstring).

    Args:
        cdf_threshold: keep the smallest set of key blocks holding this share of the compressed
            attention mass per row; or None.
        topk: keep this fraction of the allowed key blocks per row instead; or None. Exactly one of
            ``cdf_threshold`` / ``topk`` is set.
        sim_threshold: blocks with self-similarity below this are not trusted (``-1`` trusts
            every block, ``> 1`` trusts none, i.e. dense).
        keep_sink: always keep key block 0.
        keep_local: always keep the diagonal key block and the ``keep_local − 1`` before it (0 = off).
        score: ``"mean"`` (SpargeAttn), ``"minmax"`` (Quest-style bound) or ``"mixed"`` (see module docstring).
        dense_layers: layers with index below this return the dense (causal) layout (``layer=None``
            calls are never dense).
        pv_threshold: natural-log gap for the attention call's softmax-aware P·V skip; None = off.
        block_m: query rows per block.
        block_n: key columns per block.
        version: config schema version (1).
    """

    cdf_threshold: float | None = 0.9
    topk: float | None = None
    sim_threshold: float = 0.5
    keep_sink: bool = True
    keep_local: int = 1
    score: str = "mean"
    dense_layers: int = 0
    pv_threshold: float | None = None
    block_m: int = 64
    block_n: int = 64
    version: int = 1

    def __post_init__(self) -> None:
        c = "MeanSimilarityConfig"
        check_topk_or_cdf(c, self.topk, self.cdf_threshold, cdf_first=True)
        if isinstance(self.sim_threshold, bool) or not isinstance(self.sim_threshold, (int, float)) \
                or not (-1.0 <= float(self.sim_threshold) <= 2.0):
            raise fail(c, "sim_threshold", "is out of range", "a float in [-1, 2]", repr(self.sim_threshold))
        check_bool(c, "keep_sink", self.keep_sink)
        check_nonneg(c, "keep_local", self.keep_local)
        check_nonneg(c, "dense_layers", self.dense_layers)
        if self.score not in _SCORES:
            raise fail(c, "score", "is not a known block score", f"one of {list(_SCORES)}", repr(self.score))
        check_pv_threshold(c, self.pv_threshold)
        check_block(c, "block_m", self.block_m)
        check_block(c, "block_n", self.block_n)
        check_version(c, self.version, 1)


@register_predictor("mean_sim", MeanSimilarityConfig)
class MeanSimilarityPredictor:
    """Per-head block selection from mean-pooled q/k and block self-similarity.

    ``last_scores`` holds the compressed attention ``P`` ``[B, H, Mb, Nb]`` of the last call.

    Args:
        config: the prediction parameters (default ``MeanSimilarityConfig()``).
        backend: ``"auto"`` (fused Triton path for CUDA tensors when supported, else torch; a
            fallback on CUDA warns once per reason), ``"torch"`` or ``"triton"`` (fused path, or
            ``NotImplementedError`` with the reason; runs on CPU under ``TRITON_INTERPRET=1``).

    Shapes:
        q ``(B, H, N_q, D)``, k ``(B, H_kv, N_kv, D)`` → layout with ``B`` batches and ``H`` heads.
    """

    name = "mean_sim"

    def __init__(self, config: MeanSimilarityConfig | None = None, backend: str = "auto") -> None:
        self.config = config_or_default("MeanSimilarityPredictor", config, MeanSimilarityConfig)
        if not isinstance(backend, str) or backend not in _BACKENDS:
            raise fail("MeanSimilarityPredictor", "backend", "is not a known backend", f"one of {list(_BACKENDS)}",
                       repr(backend))
        self.backend = backend
        self.last_scores: torch.Tensor | None = None
        self.last_backend: str | None = None  # "torch" or "triton": the path the last predict() took
        self._warned: set[str] = set()

    def _fused(self, q: torch.Tensor, k: torch.Tensor) -> bool:
        """Whether this call takes the fused Triton path (raises for ``backend="triton"`` when it cannot)."""
        if self.backend == "torch" or (self.backend == "auto" and not _auto_device_ok(q)):
            return False
        from sparseattn.predictors.fused_mean_sim import registry_refusal, take_fused

        return take_fused("MeanSimilarityPredictor", self.backend, registry_refusal(q, k, self.config), self._warned,
                          " (~100 small kernels per call)")

    def predict(self, q: torch.Tensor, k: torch.Tensor, *, causal: bool = True, layer: int | None = None) -> BlockLayout:
        fn = "MeanSimilarityPredictor.predict"
        B, H, Hkv, Nq, Nkv, D = check_qk(fn, q, k, causal)
        cfg = self.config
        G = H // Hkv
        dev = q.device
        if layer is not None and layer < cfg.dense_layers:
            self.last_scores = None
            return dense_predicted_layout(B, H, Nq, Nkv, cfg.block_m, cfg.block_n, causal, dev)
        if self._fused(q, k):
            from sparseattn.predictors.fused_mean_sim import OPERATOR
            from sparseattn.ops.registry import get_operator

            layout, p_fused = get_operator(OPERATOR).run_fn()(q, k, cfg, causal=causal)  # the registered kernels
            self.last_scores = p_fused
            self.last_backend = "triton"
            return layout
        self.last_backend = "torch"
        st = mean_sim_stats(q, k, cfg, causal=causal)
        p, region = st.probs, st.region
        if cfg.topk is not None:
            mask = select_topk(p, region, cfg.topk)
        else:
            mask = select_cdf(p, region, float(cfg.cdf_threshold))  # type: ignore[arg-type]
        # ~(sim >= t) rather than sim < t: a block holding NaN/inf has sim NaN and is untrusted, so every
        # block it touches is kept and the non-finite value reaches exactly the outputs dense attention
        # would give (a predictor must not drop such a block quietly)
        Mb, Nb = p.shape[-2], p.shape[-1]
        untrusted_q = (~(st.q_sim >= cfg.sim_threshold)).reshape(B, Hkv, G, Mb, 1)
        untrusted_k = (~(st.k_sim >= cfg.sim_threshold)).reshape(B, Hkv, 1, 1, Nb)
        mask = (mask | st.forced | untrusted_q | untrusted_k) & region
        self.last_scores = p.reshape(B, H, Mb, Nb)
        return mask_to_layout(mask.reshape(B, H, Mb, Nb), block_m=cfg.block_m, block_n=cfg.block_n,
                              seqlen_q=Nq, seqlen_kv=Nkv)

    def graph_layer_key(self, layer: int | None) -> Any:
        """The prediction depends on ``layer`` only through ``layer < dense_layers``: two graphs, not one per layer."""
        dense = layer is not None and layer < self.config.dense_layers
        return ("dense", layer) if dense else "sparse"

    def reset(self) -> None:
        """Stateless: nothing to clear."""
