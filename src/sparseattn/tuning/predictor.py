"""Apply a tuning result: mean_sim (or learned-gate) prediction with per-head thresholds.

:func:`~sparseattn.predictors.mean_similarity.mean_sim_stats` (shared with the predictor's torch
path) computes everything of the mean_sim prediction that does not depend on the thresholds (pooled q/k, block self-similarity, the compressed attention ``P``, the causal region and
the forced sink/local blocks); :func:`select_per_head` turns it into a block mask with one
``sim_threshold`` / ``cdf_threshold`` per query head (tensors ``[H]`` broadcast over blocks). The
search (:mod:`sparseattn.tuning.search`) and :class:`TunedMeanSimPredictor` call the same two
functions, so tuning and inference select identical blocks.

A file tuned over a learned gate (``sparseattn tune --gate FILE``) uses the same selection on the gate's block
distribution: :func:`gate_stats` puts the gate's ``P`` where mean_sim's compressed attention goes, every block
trusted (``sim_threshold`` -1) except those whose pooled features hold NaN/inf, which are kept as the gate keeps
them; :class:`TunedGatePredictor` applies such a file.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from sparseattn._validation import fail
from sparseattn.layout.block_layout import BlockLayout
from sparseattn.predictors._common import check_qk, dense_predicted_layout, forced_blocks, mask_to_layout, select_cdf
from sparseattn.predictors.mean_similarity import MeanSimilarityConfig, MeanSimStats, mean_sim_stats
from sparseattn.tuning.types import HeadParams

__all__ = ["MeanSimStats", "mean_sim_stats", "select_per_head", "per_head_forced", "gate_stats",
           "TunedMeanSimPredictor", "TunedGatePredictor"]


def per_head_forced(stats: MeanSimStats, keep_sink: bool, local_blocks: list[int], causal: bool = True) -> torch.Tensor:
    """Bool ``[H, Mb, Nb]``: each head's forced blocks (the sink column when ``keep_sink``, and its own
    ``local_blocks[h]`` local blocks), within the region — the per-head form of ``stats.forced``."""
    masks = {n: forced_blocks(stats.seqlen_q, stats.seqlen_kv, stats.block_m, stats.block_n, keep_sink, n, causal,
                              stats.region.device) for n in sorted(set(local_blocks))}
    return torch.stack([masks[n] for n in local_blocks])


def select_per_head(stats: MeanSimStats, sim_threshold: torch.Tensor, cdf_threshold: torch.Tensor,
                    dense: torch.Tensor | None = None, forced: torch.Tensor | None = None) -> torch.Tensor:
    """Block mask with per-head thresholds (the mean_sim rule; see :mod:`sparseattn.predictors.mean_similarity`).

    Args:
        stats: from :func:`mean_sim_stats`.
        sim_threshold: float ``[H]`` (or ``[S, H]`` for ``S`` settings at once).
        cdf_threshold: float ``[H]`` (or ``[S, H]``) in (0, 1].
        dense: bool ``[H]`` (or ``[S, H]``): heads that keep their whole region; None = none.
        forced: bool ``[H, Mb, Nb]`` per-head forced blocks (:func:`per_head_forced`) replacing
            ``stats.forced``; None = ``stats.forced`` for every head.

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
    f = stats.forced if forced is None else forced.reshape(Hkv, G, Mb, Nb)
    mask = (mask | f | untrusted_q | untrusted_k) & stats.region
    if dense is not None:
        mask = mask | (dense.reshape(shp) & stats.region)
    return mask.reshape(*lead, B, Hkv * G, Mb, Nb)


def gate_stats(gate: Any, q: torch.Tensor, k: torch.Tensor, base: MeanSimilarityConfig, *, causal: bool = True,
               layer: int | None = None) -> MeanSimStats | None:
    """The threshold-independent part of a learned-gate prediction in :class:`MeanSimStats` form.

    ``probs`` is the gate's block distribution (:meth:`~sparseattn.predictors.gate.GatePredictor.block_probs`),
    ``q_sim`` / ``k_sim`` are 1 (every block trusted at ``sim_threshold`` -1) and NaN for blocks whose pooled
    features hold NaN/inf (never trusted, so kept: the gate's own non-finite rule); the forced blocks are
    ``base``'s sink and local window. None when the gate holds no weights for ``layer``.
    """
    out = gate.block_probs(q, k, causal=causal, layer=layer)
    if out is None:
        return None
    p, bad_q, bad_k, region = out
    B, H, Mb, Nb = p.shape
    Hkv = k.shape[1]
    one = torch.ones((), dtype=torch.float32, device=p.device)
    nan = torch.full((), float("nan"), dtype=torch.float32, device=p.device)
    Nq, Nkv = q.shape[2], k.shape[2]
    forced = forced_blocks(Nq, Nkv, base.block_m, base.block_n, base.keep_sink, base.keep_local, causal, p.device)
    return MeanSimStats(p.reshape(B, Hkv, H // Hkv, Mb, Nb), torch.where(bad_q, nan, one), torch.where(bad_k, nan, one),
                        region, forced, base.block_m, base.block_n, Nq, Nkv)


def _check_heads(fn: str, hp: HeadParams, q: torch.Tensor, layer: int) -> None:
    if q.shape[1] != hp.heads:
        raise fail(fn, "q", f"has a head count that layer {layer} was not tuned for", f"{hp.heads} heads",
                   f"q.shape={tuple(q.shape)}")


class _TunedBase:
    """Per-head thresholds applied to a predictor's threshold-independent stats (see the subclasses)."""

    name = "tuned"

    def __init__(self, layers: dict[int, HeadParams], base: MeanSimilarityConfig) -> None:
        fn = type(self).__name__
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

    def _stats(self, q: torch.Tensor, k: torch.Tensor, causal: bool, layer: int) -> MeanSimStats | None:
        raise NotImplementedError

    def predict(self, q: torch.Tensor, k: torch.Tensor, *, causal: bool = True, layer: int | None = None) -> BlockLayout:
        fn = f"{type(self).__name__}.predict"
        B, H, _Hkv, Nq, Nkv, _D = check_qk(fn, q, k, causal)
        cfg = self.config
        if layer is None or layer not in self.layers:
            return dense_predicted_layout(B, H, Nq, Nkv, cfg.block_m, cfg.block_n, causal, q.device)
        hp = self.layers[layer]
        _check_heads(fn, hp, q, layer)
        sim, cdf, dense = self._params(layer, q.device)
        stats = self._stats(q, k, causal, layer)
        if stats is None:  # pragma: no cover - load_tuned checks that the gate covers every tuned layer
            raise fail(fn, "layer", "has tuned thresholds but no predictor weights", "a layer the gate holds", layer)
        forced = None
        if hp.keep_local is not None:
            forced = per_head_forced(stats, cfg.keep_sink, hp.local_blocks(cfg.keep_local), causal)
        mask = select_per_head(stats, sim, cdf, dense, forced)
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


class TunedMeanSimPredictor(_TunedBase):
    """mean_sim with per-(layer, head) thresholds from a tuning run.

    Args:
        layers: ``{layer: HeadParams}``; a layer absent here (or ``layer=None``) predicts every allowed block.
        base: layer-wide choices (``block_m``, ``block_n``, ``keep_sink``, ``keep_local``, ``score``);
            its thresholds are not used. ``config`` is this object.

    Shapes:
        q ``(B, H, N_q, D)``, k ``(B, H_kv, N_kv, D)`` → layout ``[B, H]`` (``H`` must equal the tuned heads).
    """

    name = "tuned_mean_sim"

    def _stats(self, q: torch.Tensor, k: torch.Tensor, causal: bool, layer: int) -> MeanSimStats | None:
        return mean_sim_stats(q, k, self.config, causal=causal)

    def __repr__(self) -> str:
        return f"TunedMeanSimPredictor(layers={sorted(self.layers)}, base={self.config!r})"


def _uniform_gate_key(hp: HeadParams, keep_local: int) -> tuple[float, int] | None:
    """``(cdf, keep_local)`` when every head of ``hp`` is sparse with the same finite CDF threshold in (0, 1], every
    block trusted (``sim_threshold`` -1) and the same local window; else None."""
    cdf = hp.cdf_threshold
    if bool(hp.dense.any()) or not bool((hp.sim_threshold == -1.0).all()) or not bool((cdf == cdf[0]).all()):
        return None
    c = float(cdf[0])
    if not 0.0 < c <= 1.0:
        return None
    local = hp.local_blocks(keep_local)
    if len(set(local)) != 1:
        return None
    return c, local[0]


class TunedGatePredictor(_TunedBase):
    """A learned gate with per-(layer, head) CDF thresholds (and local windows) from a tuning run over it.

    Args:
        layers: ``{layer: HeadParams}`` (``sim_threshold`` -1: every block trusted); a layer absent here predicts
            every allowed block.
        base: layer-wide choices (``block_m`` / ``block_n`` = the gate's, ``keep_sink``, ``keep_local``).
        gate: the :class:`~sparseattn.gate.model.GateWeights` the file was tuned over (a tuned file embeds them).

    Shapes:
        q ``(B, H, N_q, D)``, k ``(B, H_kv, N_kv, D)`` → layout ``[B, H]``.
    """

    name = "tuned_gate"

    def __init__(self, layers: dict[int, HeadParams], base: MeanSimilarityConfig, gate: Any,
                 backend: str = "auto") -> None:
        super().__init__(layers, base)
        from sparseattn.gate.model import GateWeights
        from sparseattn.predictors.gate import GateConfig, GatePredictor

        fn = "TunedGatePredictor"
        if not isinstance(gate, GateWeights):
            raise fail(fn, "gate", "must be GateWeights", "GateWeights", type(gate).__name__)
        if (gate.block_m, gate.block_n) != (base.block_m, base.block_n):
            raise fail(fn, "base", "has other block sizes than the gate", f"{gate.block_m}x{gate.block_n}",
                       f"{base.block_m}x{base.block_n}")
        missing = sorted(li for li in self.layers if gate.index(li) is None)
        if missing:
            raise fail(fn, "layers", "name layers the gate holds no weights for", f"layers of {gate.layers}", missing)
        self.gate = GatePredictor(GateConfig(keep_sink=base.keep_sink, keep_local=base.keep_local), weights=gate,
                                  backend="torch")
        # layers whose heads share one CDF threshold and local window (what --allocate writes) select exactly what the
        # gate itself selects at that threshold: they go through a GatePredictor, whose fused path runs on CUDA
        self.uniform: dict[int, Any] = {}
        by_cfg: dict[tuple[float, int], Any] = {}
        for li, hp in self.layers.items():
            key = _uniform_gate_key(hp, base.keep_local)
            if key is not None:
                if key not in by_cfg:
                    by_cfg[key] = GatePredictor(GateConfig(cdf_threshold=key[0], keep_sink=base.keep_sink,
                                                           keep_local=key[1]), weights=gate, backend=backend)
                self.uniform[li] = by_cfg[key]

    def predict(self, q: torch.Tensor, k: torch.Tensor, *, causal: bool = True, layer: int | None = None) -> BlockLayout:
        one = self.uniform.get(layer) if layer is not None else None
        if one is None:
            return super().predict(q, k, causal=causal, layer=layer)
        if q.dim() == 4:  # other shapes: the gate's own check names them
            _check_heads(f"{type(self).__name__}.predict", self.layers[layer], q, layer)  # type: ignore[index]
        return one.predict(q, k, causal=causal, layer=layer)

    def _stats(self, q: torch.Tensor, k: torch.Tensor, causal: bool, layer: int) -> MeanSimStats | None:
        return gate_stats(self.gate, q, k, self.config, causal=causal, layer=layer)

    def __repr__(self) -> str:
        return f"TunedGatePredictor(layers={sorted(self.layers)}, base={self.config!r}, gate_layers={self.gate.weights.layers})"
