"""Apply a tuning result: mean_sim prediction with per-head thresholds.

:func:`mean_sim_stats` computes everything of the mean_sim prediction that does not depend on the
thresholds (pooled q/k, block self-similarity, the compressed attention ``P``, the causal region and
the forced sink/local blocks); :func:`select_per_head` turns it into a block mask with one
``sim_threshold`` / ``cdf_threshold`` per query head (tensors ``[H]`` broadcast over blocks). The
search (:mod:`sparseattn.tuning.search`) and :class:`TunedMeanSimPredictor` call the same two
functions, so tuning and inference select identical blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sparseattn._validation import fail
from sparseattn.layout.block_layout import BlockLayout
from sparseattn.predictors._common import (
    block_minmax,
    block_pool,
    cached,
    causal_region,
    check_qk,
    dense_predicted_layout,
    local_mask,
    mask_to_layout,
    select_cdf,
)
from sparseattn.predictors.mean_similarity import MeanSimilarityConfig, block_self_similarity
from sparseattn.tuning.types import HeadParams

__all__ = ["MeanSimStats", "mean_sim_stats", "select_per_head", "TunedMeanSimPredictor"]


@dataclass(frozen=True)
class MeanSimStats:
    """Threshold-independent part of a mean_sim prediction.

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


def mean_sim_stats(q: torch.Tensor, k: torch.Tensor, base: MeanSimilarityConfig, *, causal: bool = True) -> MeanSimStats:
    """Pool q/k and score the blocks as :class:`MeanSimilarityPredictor`'s torch path does (no selection).

    Uses ``base``'s ``block_m``, ``block_n``, ``keep_sink``, ``keep_local`` and ``score``; its thresholds are ignored.

    Shapes:
        q ``(B, H, N_q, D)``, k ``(B, H_kv, N_kv, D)``.
    """
    B, H, Nq, D = q.shape
    Hkv, Nkv = k.shape[1], k.shape[2]
    G = H // Hkv
    dev = q.device
    bm, bn = base.block_m, base.block_n
    q_sum, q_unit, q_cnt = block_pool(q, bm, normalized=True)
    k_sum, k_unit, k_cnt = block_pool(k, bn, normalized=True)
    q_sim = block_self_similarity(q_unit, q_cnt)
    k_sim = block_self_similarity(k_unit, k_cnt)
    q_mean = q_sum / q_cnt[:, None]
    k_mean = k_sum / k_cnt[:, None]
    Mb, Nb = q_mean.shape[2], k_mean.shape[2]
    region = causal_region(Nq, Nkv, bm, bn, causal, dev)
    row_has = region.any(-1, keepdim=True)
    qg = q_mean.reshape(B, Hkv, G * Mb, D)
    probs = []
    if base.score in ("mean", "mixed"):
        s = torch.matmul(qg, k_mean.transpose(-1, -2)) * (D ** -0.5)
        s = s.reshape(B, Hkv, G, Mb, Nb).masked_fill(~region, float("-inf"))
        probs.append(torch.softmax(s, dim=-1).masked_fill_(~row_has, 0.0))
    if base.score in ("minmax", "mixed"):
        k_min, k_max = block_minmax(k, bn)
        s = (torch.matmul(qg.clamp(min=0), k_max.transpose(-1, -2))
             + torch.matmul(qg.clamp(max=0), k_min.transpose(-1, -2))) * (D ** -0.5)
        s = s.reshape(B, Hkv, G, Mb, Nb).masked_fill(~region, float("-inf"))
        probs.append(torch.softmax(s, dim=-1).masked_fill_(~row_has, 0.0))
    p = probs[0] if len(probs) == 1 else 0.5 * (probs[0] + probs[1])

    def build_forced() -> torch.Tensor:
        f = torch.zeros(Mb, Nb, dtype=torch.bool, device=dev)
        if base.keep_sink:
            f[:, 0] = True
        if base.keep_local > 0:
            f |= local_mask(Nq, Nkv, bm, bn, base.keep_local, causal, dev)
        return f & region

    forced = cached(("msim_forced", Nq, Nkv, bm, bn, base.keep_sink, base.keep_local, causal, str(dev)), build_forced)
    return MeanSimStats(p, q_sim, k_sim, region, forced, bm, bn, Nq, Nkv)


def select_per_head(stats: MeanSimStats, sim_threshold: torch.Tensor, cdf_threshold: torch.Tensor,
                    dense: torch.Tensor | None = None) -> torch.Tensor:
    """Block mask with per-head thresholds (the mean_sim rule; see :mod:`sparseattn.predictors.mean_similarity`).

    Args:
        stats: from :func:`mean_sim_stats`.
        sim_threshold: float ``[H]`` (or ``[S, H]`` for ``S`` settings at once).
        cdf_threshold: float ``[H]`` (or ``[S, H]``) in (0, 1].
        dense: bool ``[H]`` (or ``[S, H]``): heads that keep their whole region; None = none.

    Returns:
        bool ``[B, H, Mb, Nb]`` (``[S, B, H, Mb, Nb]`` with a leading setting dimension). No host sync.
    """
    p = stats.probs
    B, Hkv, G, Mb, Nb = p.shape
    lead = tuple(sim_threshold.shape[:-1])
    shp = (*lead, 1, Hkv, G, 1, 1)
    sim = sim_threshold.to(torch.float32).reshape(shp)
    cdf = cdf_threshold.to(torch.float32).reshape(shp)
    mask = select_cdf(p.expand(*lead, B, Hkv, G, Mb, Nb), stats.region, cdf)  # type: ignore[arg-type]
    untrusted_q = ~(stats.q_sim.reshape(B, Hkv, G, Mb, 1) >= sim)
    untrusted_k = ~(stats.k_sim.reshape(B, Hkv, 1, 1, Nb) >= sim)
    mask = (mask | stats.forced | untrusted_q | untrusted_k) & stats.region
    if dense is not None:
        mask = mask | (dense.reshape(shp) & stats.region)
    return mask.reshape(*lead, B, Hkv * G, Mb, Nb)


class TunedMeanSimPredictor:
    """mean_sim with per-(layer, head) thresholds from a tuning run.

    Args:
        layers: ``{layer: HeadParams}``; a layer absent here (or ``layer=None``) predicts every allowed block.
        base: layer-wide choices (``block_m``, ``block_n``, ``keep_sink``, ``keep_local``, ``score``);
            its thresholds are not used. ``config`` is this object.

    Shapes:
        q ``(B, H, N_q, D)``, k ``(B, H_kv, N_kv, D)`` → layout ``[B, H]`` (``H`` must equal the tuned heads).
    """

    name = "tuned_mean_sim"

    def __init__(self, layers: dict[int, HeadParams], base: MeanSimilarityConfig) -> None:
        fn = "TunedMeanSimPredictor"
        if not isinstance(base, MeanSimilarityConfig):
            raise fail(fn, "base", "must be a MeanSimilarityConfig", "MeanSimilarityConfig", type(base).__name__)
        if not isinstance(layers, dict) or not all(isinstance(v, HeadParams) for v in layers.values()):
            raise fail(fn, "layers", "must map layer indices to HeadParams", "dict[int, HeadParams]", type(layers).__name__)
        self.layers = dict(layers)
        self.config = base
        self._dev: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _params(self, layer: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        key = (layer, str(device))
        hit = self._dev.get(key)
        if hit is None:
            hp = self.layers[layer]
            sim = torch.nan_to_num(hp.sim_threshold.to(torch.float32), nan=1.0)
            cdf = torch.nan_to_num(hp.cdf_threshold.to(torch.float32), nan=1.0)
            hit = (sim.to(device), cdf.to(device), hp.dense.to(device))
            self._dev[key] = hit
        return hit

    def predict(self, q: torch.Tensor, k: torch.Tensor, *, causal: bool = True, layer: int | None = None) -> BlockLayout:
        fn = "TunedMeanSimPredictor.predict"
        B, H, _Hkv, Nq, Nkv, _D = check_qk(fn, q, k, causal)
        cfg = self.config
        if layer is None or layer not in self.layers:
            return dense_predicted_layout(B, H, Nq, Nkv, cfg.block_m, cfg.block_n, causal, q.device)
        hp = self.layers[layer]
        if hp.heads != H:
            raise fail(fn, "q", f"has a head count that layer {layer} was not tuned for", f"{hp.heads} heads",
                       f"q.shape={tuple(q.shape)}")
        sim, cdf, dense = self._params(layer, q.device)
        mask = select_per_head(mean_sim_stats(q, k, cfg, causal=causal), sim, cdf, dense)
        return mask_to_layout(mask, block_m=cfg.block_m, block_n=cfg.block_n, seqlen_q=Nq, seqlen_kv=Nkv)

    def pv_threshold_for(self, layer: int | None) -> float | None:
        """The P·V skip gap for one attention call of ``layer``: the largest among its sparse heads.

        A larger gap skips fewer tiles, so the largest is the one value every head's budget allows;
        ``None`` (no skip) when the layer is not tuned, has no sparse head, or a sparse head has ``inf`` (off).
        """
        hp = self.layers.get(layer) if layer is not None else None
        if hp is None:
            return None
        live = hp.pv_threshold[~hp.dense]
        if live.numel() == 0:
            return None
        top = float(live.max())
        return None if (math.isinf(top) or math.isnan(top)) else top

    def reset(self) -> None:
        """Nothing per forward: the per-device threshold copies are derived from fixed parameters and kept
        (clearing them here would copy host→device on every forward, which a CUDA graph capture forbids)."""
        return None

    def __repr__(self) -> str:
        return f"TunedMeanSimPredictor(layers={sorted(self.layers)}, base={self.config!r})"
