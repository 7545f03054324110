"""Per-head search of mean_sim thresholds under an error budget (SpargeAttn's tuning), one layer at a time.

How a probe is cheap: per calibration sample the dense attention is computed once, blockwise in
float32, and kept as *tile states*: for every (head, query block ``i``, key block ``j``) tile, the
dense-normalised contribution ``A_ij = Σ_{c∈j} exp(s_rc − lse_r) v_c`` ``[bm, D]``, its mass
``L_ij = Σ_{c∈j} exp(s_rc − lse_r)`` ``[bm]`` and its row maximum score ``S_ij`` ``[bm]``. Attention
restricted to a block mask ``M`` is then exactly::

    o_r = Σ_j M_ij A_ij[r] / Σ_j M_ij L_ij[r]

(one batched matrix product over the key blocks, ``H·Mb·Nb·bm·D`` multiply-adds instead of the
attention's ``H·N²·D``), and the P·V skip of :func:`sparseattn.ops.reference.reference_attention` is
reproduced per head from ``S`` (running maximum = cumulative max over the selected tiles in ascending
key order; a selected tile whose every row has ``S_ij − running max < −pv_threshold[h]`` drops out of
the numerator but stays in the denominator). So every probe evaluates all heads at once with per-head
thresholds, on every sample, without recomputing attention. The dense reference ``o_ref`` is the
same sum over all tiles (the fp32 dense attention). Memory: ``H·N·ceil(N/bn)·(D+2)`` float32 per
sample without causality (N=4096, H=9, D=64, bn=64: 0.6 GB), kept for the whole layer; causal layers
store only the key blocks left of each chunk of query blocks' diagonal (about 56% of that), and
every probe reads only those.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch

from sparseattn._validation import fail
from sparseattn.layout.block_layout import cdiv
from sparseattn.layout.masks import causal_window_mask
from sparseattn.predictors.mean_similarity import MeanSimilarityConfig
from sparseattn.tuning.predictor import MeanSimStats, mean_sim_stats, per_head_forced, select_per_head
from sparseattn.tuning.types import RULES, HeadParams

__all__ = ["tune_layer", "TileStates", "tile_states", "tile_attention", "head_errors", "DEFAULT_SIM_GRID"]

#: sim_threshold values tried per head (-1 trusts every block; 0.9 keeps most blocks of noisy heads)
DEFAULT_SIM_GRID = (-1.0, 0.0, 0.2, 0.4, 0.6, 0.8)
#: the P·V gap (natural log) is bisected on a log scale between these
PV_RANGE = (0.25, 64.0)
#: ``stats_fn(q, k, base, causal=...)`` → :class:`MeanSimStats`: the predictor whose thresholds are searched
#: (default :func:`mean_sim_stats`; a learned gate: :func:`sparseattn.tuning.predictor.gate_stats` bound to its layer)
StatsFn = Callable[..., MeanSimStats]


class TileStates:
    """Dense attention of one sample split into (query block, key block) tiles (see module docstring).

    Stored in causal chunks of query blocks: chunk ``c`` covers query blocks ``i0:i1`` and only the
    key blocks ``0:nkb`` some row of it can see (all ``Nb`` when not causal), so the tiles above the
    diagonal are neither stored nor read by a probe (about half of them).

    Shapes (per chunk): A ``[H, i1-i0, nkb, bm, D]``, L / S ``[H, i1-i0, nkb, bm]``; ref ``[H, N, D]``;
    all float32.
    """

    def __init__(self, chunks: list[tuple[int, int, int, torch.Tensor, torch.Tensor, torch.Tensor]], seqlen: int,
                 heads: int, mb: int, nb: int, bm: int, d: int) -> None:
        self.chunks, self.seqlen = chunks, seqlen
        self.H, self.Mb, self.Nb, self.bm, self.D = heads, mb, nb, bm, d
        self.ref = _combine(self, torch.ones(heads, mb, nb, dtype=torch.bool, device=chunks[0][3].device), None)


def tile_states(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_m: int, block_n: int,
                causal: bool = True, scale: float | None = None) -> TileStates:
    """Dense float32 attention of one sequence, kept per tile.

    Shapes:
        q ``(H, N, D)``, k/v ``(H_kv, N, D)`` (one batch element; ``N_q == N_kv``).
    """
    H, N, D = q.shape
    Hkv = k.shape[0]
    G = H // Hkv
    scale = D ** -0.5 if scale is None else scale
    bm, bn = block_m, block_n
    Mb, Nb = cdiv(N, bm), cdiv(N, bn)
    q = q.to(torch.float32)
    kp = torch.nn.functional.pad(k.to(torch.float32), (0, 0, 0, Nb * bn - N))
    vp = torch.nn.functional.pad(v.to(torch.float32), (0, 0, 0, Nb * bn - N)).reshape(Hkv, Nb, bn, D)
    chunks: list[tuple[int, int, int, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    per = max(1, (1 << 25) // max(1, H * Nb * bn * bm))  # query blocks per chunk (~128 MB of scores)
    if causal:
        per = min(per, cdiv(Mb, 8))  # >= 8 chunks: the stored tiles approach the causal half
    dev = q.device
    cols = torch.arange(Nb * bn, device=dev)
    for i0 in range(0, Mb, per):
        i1 = min(Mb, i0 + per)
        r0, r1 = i0 * bm, min(N, i1 * bm)
        R = (i1 - i0) * bm
        nkb = min(Nb, cdiv(r1, bn)) if causal else Nb  # key blocks any row of the chunk sees
        qs = torch.nn.functional.pad(q[:, r0:r1], (0, 0, 0, R - (r1 - r0))).reshape(Hkv, G, R, D)
        s = torch.einsum("hgrd,hcd->hgrc", qs * scale, kp[:, :nkb * bn])
        rows = torch.arange(r0, r0 + R, device=dev)
        ok = (cols[None, :nkb * bn] < N) & (rows[:, None] < N)
        if causal:
            ok = ok & causal_window_mask(rows, cols[:nkb * bn], 0)
        s.masked_fill_(~ok, -math.inf)
        s5 = s.reshape(Hkv, G, R, nkb, bn)
        smax = s5.amax(-1)  # [Hkv, G, R, nkb]
        m = smax.amax(-1, keepdim=True)
        p5 = s5.sub(torch.where(torch.isinf(m), torch.zeros_like(m), m).unsqueeze(-1)).exp_()
        lt = p5.sum(-1)  # [Hkv, G, R, nkb]
        inv = 1.0 / lt.sum(-1, keepdim=True).clamp_min(1e-38)  # rows with no key (padding): 0 everywhere
        # [Hkv, nkb, G*R, bn] @ [Hkv, nkb, bn, D]: one batched product per (kv head, key block)
        a = torch.matmul(p5.permute(0, 3, 1, 2, 4).reshape(Hkv, nkb, G * R, bn), vp[:, :nkb])
        a = a.reshape(Hkv, nkb, G, i1 - i0, bm, D) * inv.reshape(Hkv, 1, G, i1 - i0, bm, 1)
        chunks.append((i0, i1, nkb, a.permute(0, 2, 3, 1, 4, 5).reshape(H, i1 - i0, nkb, bm, D).contiguous(),
                       (lt * inv).reshape(H, i1 - i0, bm, nkb).permute(0, 1, 3, 2).contiguous(),
                       smax.reshape(H, i1 - i0, bm, nkb).permute(0, 1, 3, 2).contiguous()))
    return TileStates(chunks, N, H, Mb, Nb, bm, D)


def _combine(st: "TileStates", mask: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """``Σ_j keep·A / Σ_j mask·L`` over ``st``'s chunks → ``[H, N, D]`` (``keep`` defaults to ``mask``; empty rows give 0)."""
    H, bm, D = st.H, st.bm, st.D
    out = torch.empty(H, st.Mb * bm, D, device=st.chunks[0][3].device)
    for i0, i1, nkb, A, L, _ in st.chunks:
        w = mask[:, i0:i1, :nkb].to(torch.float32)
        wn = w if keep is None else keep[:, i0:i1, :nkb].to(torch.float32)
        mb = i1 - i0
        num = torch.bmm(wn.reshape(H * mb, 1, nkb), A.reshape(H * mb, nkb, bm * D)).reshape(H, mb, bm, D)
        den = torch.einsum("hij,hijr->hir", w, L)
        out[:, i0 * bm:i1 * bm] = (num / torch.where(den > 0, den, torch.ones_like(den)).unsqueeze(-1)).reshape(H, mb * bm, D)
    return out[:, :st.seqlen]


def tile_attention(st: TileStates, mask: torch.Tensor, pv_threshold: torch.Tensor | None = None) -> torch.Tensor:
    """Attention restricted to a per-head block mask, with an optional per-head P·V skip.

    Args:
        st: the sample's tile states.
        mask: bool ``[H, Mb, Nb]`` (within the causal region).
        pv_threshold: float ``[H]`` natural-log gaps (``inf``: no skip), or None.

    Returns:
        float32 ``[H, N, D]``: what ``reference_attention(..., layout=mask, pv_threshold=...)`` returns.
    """
    keep = None
    if pv_threshold is not None:
        gap_limit = -pv_threshold.to(torch.float32).reshape(-1, 1, 1, 1)
        keep = mask.clone()
        for i0, i1, nkb, _, _, S in st.chunks:
            m = mask[:, i0:i1, :nkb]
            sm = S.masked_fill(~m.unsqueeze(-1), -math.inf)
            run = torch.cummax(sm, dim=2).values
            run = torch.where(torch.isinf(run), torch.zeros_like(run), run)
            skip = ((sm - run) < gap_limit).all(-1) & m
            keep[:, i0:i1, :nkb] = m & ~skip
    return _combine(st, mask, keep)


def head_errors(out: torch.Tensor, ref: torch.Tensor, rule: str) -> torch.Tensor:
    """Per-head error ``[H]`` of ``out`` against ``ref`` (both ``[H, N, D]``) under ``rule``.

    ``l1``: ``‖o − o_ref‖₁ / ‖o_ref‖₁``; ``cosine``: ``1 − cos(o, o_ref)`` (flattened per head);
    ``rmse``: ``sqrt(mean((o − o_ref)²))`` (absolute).
    """
    o, r = out.to(torch.float32).flatten(1), ref.to(torch.float32).flatten(1)
    if rule == "l1":
        return (o - r).abs().sum(-1) / r.abs().sum(-1).clamp_min(1e-30)
    if rule == "cosine":
        return 1.0 - torch.nn.functional.cosine_similarity(o, r, dim=-1, eps=1e-30)
    if rule == "rmse":
        return ((o - r) ** 2).mean(-1).sqrt()
    raise fail("head_errors", "rule", "is not a known error rule", f"one of {list(RULES)}", repr(rule))


def _check(fn: str, samples: Any, base: Any, l1: Any, pv_l1: Any, rule: Any, sim_grid: Any, cdf_steps: Any,
           device: Any = None) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    if not isinstance(base, MeanSimilarityConfig):
        raise fail(fn, "base", "must be a MeanSimilarityConfig", "MeanSimilarityConfig", type(base).__name__)
    for name, val, opt in (("l1", l1, False), ("pv_l1", pv_l1, True)):
        if val is None and opt:
            continue
        if isinstance(val, bool) or not isinstance(val, (int, float)) or not (0 < float(val) < math.inf):
            raise fail(fn, name, "must be a positive finite number", "e.g. 0.06", repr(val))
    if rule not in RULES:
        raise fail(fn, "rule", "is not a known error rule", f"one of {list(RULES)}", repr(rule))
    if isinstance(cdf_steps, bool) or not isinstance(cdf_steps, int) or cdf_steps < 1:
        raise fail(fn, "cdf_steps", "must be a positive integer", "an int >= 1 (e.g. 8)", repr(cdf_steps))
    grid = list(sim_grid) if isinstance(sim_grid, (list, tuple)) else None
    if not grid or any(isinstance(s, bool) or not isinstance(s, (int, float)) or not -1.0 <= s <= 2.0 for s in grid):
        raise fail(fn, "sim_grid", "must be a non-empty sequence of numbers in [-1, 2]", "e.g. (-1, 0, 0.5, 0.8)",
                   repr(sim_grid))
    if not isinstance(samples, (list, tuple)) or not samples:
        raise fail(fn, "samples", "must be a non-empty list of (q, k, v)", "list[tuple[q, k, v]]", type(samples).__name__)
    out = []
    shape = None
    for i, smp in enumerate(samples):
        if not isinstance(smp, (list, tuple)) or len(smp) != 3 or not all(isinstance(t, torch.Tensor) for t in smp):
            raise fail(fn, f"samples[{i}]", "must be a (q, k, v) tuple of tensors", "(q, k, v)", type(smp).__name__)
        q, k, v = smp
        if q.dim() != 4 or k.dim() != 4 or tuple(k.shape) != tuple(v.shape) or q.shape[0] != k.shape[0] \
                or q.shape[2] != k.shape[2] or q.shape[3] != k.shape[3] or k.shape[1] == 0 or q.shape[1] % k.shape[1]:
            raise fail(fn, f"samples[{i}]", "has inconsistent shapes", "q (B, H, N, D), k/v (B, H_kv, N, D), H % H_kv == 0",
                       f"q={tuple(q.shape)}, k={tuple(k.shape)}, v={tuple(v.shape)}")
        heads = (q.shape[1], k.shape[1], q.shape[3])
        if shape is not None and heads != shape:
            raise fail(fn, f"samples[{i}]", "has other head counts than samples[0]", f"(H, H_kv, D) = {shape}", heads)
        shape = heads
        dev = q.device if device is None else device
        for b in range(q.shape[0]):  # each batch element is one sample
            out.append((q[b].detach().to(dev, torch.float32), k[b].detach().to(dev, torch.float32),
                        v[b].detach().to(dev, torch.float32)))
    return out


class _Sample:
    """Everything a probe needs of one sample, computed once: tile states, the dense reference, pooled q/k."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, base: MeanSimilarityConfig, causal: bool,
                 stats_fn: StatsFn | None = None) -> None:
        self.tiles = tile_states(q, k, v, block_m=base.block_m, block_n=base.block_n, causal=causal)
        fn = mean_sim_stats if stats_fn is None else stats_fn
        self.stats: MeanSimStats = fn(q[None], k[None], base, causal=causal)
        self.available = self.stats.region.sum().to(torch.float32)

    def mask(self, sim: torch.Tensor, cdf: torch.Tensor, forced: torch.Tensor | None = None) -> torch.Tensor:
        return select_per_head(self.stats, sim, cdf, None, forced)[0]  # [H, Mb, Nb]


def tune_layer(
    samples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    *,
    base: MeanSimilarityConfig,
    l1: float = 0.06,
    pv_l1: float | None = None,
    rule: str = "l1",
    sim_grid: Sequence[float] = DEFAULT_SIM_GRID,
    cdf_steps: int = 8,
    causal: bool = True,
    callback: Callable[[dict[str, Any]], None] | None = None,
    device: str | torch.device | None = None,
    keep_local_grid: Sequence[int] = (),
    stats_fn: StatsFn | None = None,
) -> HeadParams:
    """Tune one layer's per-head mean_sim thresholds under an error budget (SpargeAttn-style).

    For every head at once (the bisection state is a tensor ``[H]``; one probe evaluates every head,
    each with its own thresholds, see the module docstring):

    1. for each ``sim_threshold`` of ``sim_grid``, bisect ``cdf_threshold`` in (0, 1] (``cdf_steps``
       halvings after a check of 1.0) for the smallest value whose error stays ``<= l1`` on **every**
       calibration sample — the error of a setting is the **maximum over the samples**, because the
       budget is a guarantee on the calibration set, not an average (a sim value that untrusts
       exactly the blocks of the previous evaluated one gives the same masks, so it is skipped);
    2. keep, per head, the (sim, cdf) with the highest block sparsity (mean over samples of
       ``1 − selected / available`` blocks of the causal region; ties: the lower error);
    2b. with ``keep_local_grid`` (e.g. ``(4, 2, 1)``), for each value smaller than ``base.keep_local``,
       keep every sparse head's chosen ``sim_threshold``, replace its local blocks by that many and
       bisect ``cdf_threshold`` again; a head takes the value when it is sparser within ``l1``
       (``keep_local`` of the result: per head; heads whose sparsity is set by the forced local
       window — cdf at the bisection floor — gain most);
    3. with ``pv_l1``, bisect ``pv_threshold`` (natural-log gap, log scale in ``[0.25, 64]``) for the
       smallest value whose error *with* the P·V skip stays ``<= pv_l1`` on every sample; ``inf``
       (off) when even 64 breaks it or ``pv_l1`` is None.

    The per-head P·V skip is evaluated by :func:`tile_attention` (the reference's rule, with one gap
    per head), not by ``reference_attention``, which takes one scalar per call: that would need one
    attention call per distinct threshold and probe, i.e. ``H`` calls per bisection step.

    A head for which no setting meets ``l1`` (even cdf = 1.0 at every sim) is **dense**: ``dense``
    True, ``sim_threshold``/``cdf_threshold``/``pv_threshold`` NaN, ``sparsity`` 0, ``error`` 0 (dense
    attention is the reference). Otherwise ``error`` is the worst sample's error of the stored setting
    (with the P·V skip when ``pv_threshold`` is finite).

    Args:
        samples: ``[(q, k, v), ...]`` post-RoPE tensors of one layer, q ``(B, H, N, D)``, k/v
            ``(B, H_kv, N, D)`` (every batch element is a sample; lengths may differ across samples).
            Any float dtype; errors are computed in float32 against the float32 dense attention.
        base: layer-wide mean_sim choices (``block_m``, ``block_n``, ``keep_sink``, ``keep_local``, ``score``).
        l1: error budget of the block selection under ``rule``.
        pv_l1: error budget including the P·V skip (None: no skip is tuned, pv = inf).
        rule: ``"l1"`` (relative L1), ``"cosine"`` (``1 − cos``) or ``"rmse"`` (see :func:`head_errors`).
        sim_grid: sim_threshold values tried.
        cdf_steps: bisection steps (for cdf, and for pv).
        causal: causal attention (the region the sparsity is counted in).
        callback: called after each probe with ``{"phase": "prepare"|"cdf"|"keep_local"|"pv", "step": int,
            "total": int}``.
        device: where the search runs (default: the first sample's device); the samples are moved
            there, and the returned HeadParams are on the CPU.
        keep_local_grid: per-head local block counts tried (integers >= 1; values >= ``base.keep_local``
            are ignored); empty: the layer-wide ``base.keep_local`` for every head (``keep_local`` None).
        stats_fn: the threshold-independent part of the prediction, ``stats_fn(q, k, base, causal=...)`` →
            :class:`MeanSimStats` (default :func:`mean_sim_stats`). A learned gate passes
            :func:`~sparseattn.tuning.predictor.gate_stats` bound to its layer, with ``sim_grid=(-1.0,)`` (the gate
            has no self-similarity rule: only its non-finite blocks are untrusted).

    Returns:
        :class:`HeadParams` with ``[H]`` CPU tensors.

    Shapes:
        q ``(B, H, N, D)``, k/v ``(B, H_kv, N, D)`` → HeadParams of ``H`` heads.
    """
    fn = "tune_layer"
    flat = _check(fn, samples, base, l1, pv_l1, rule, sim_grid, cdf_steps, device)
    if not isinstance(causal, bool):
        raise fail(fn, "causal", "must be a bool", "True or False", repr(causal))
    if not isinstance(keep_local_grid, (list, tuple)) or any(
            isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in keep_local_grid):
        raise fail(fn, "keep_local_grid", "must be a sequence of integers >= 1", "e.g. (4, 2, 1)", repr(keep_local_grid))
    if stats_fn is not None and not callable(stats_fn):
        raise fail(fn, "stats_fn", "must be callable or None", "stats_fn(q, k, base, causal=...) -> MeanSimStats",
                   type(stats_fn).__name__)
    kl_grid = sorted({int(x) for x in keep_local_grid if x < base.keep_local}, reverse=True)
    grid = [float(s) for s in sim_grid]
    H = flat[0][0].shape[0]
    dev = flat[0][0].device
    n_pv = (cdf_steps + 1) if pv_l1 is not None else 0
    total = len(flat) + (len(grid) + len(kl_grid)) * (cdf_steps + 1) + n_pv
    done = 0

    def tick(phase: str) -> None:
        nonlocal done
        done += 1
        if callback is not None:
            callback({"phase": phase, "step": done, "total": total})

    prepared: list[_Sample] = []
    for q, k, v in flat:
        prepared.append(_Sample(q, k, v, base, causal, stats_fn))
        tick("prepare")

    def evaluate(sim: torch.Tensor, cdf: torch.Tensor, pv: torch.Tensor | None = None,
                 masks: list[torch.Tensor] | None = None,
                 forced: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Worst error over the samples and mean sparsity, per head."""
        err = torch.zeros(H, device=dev)
        spars = torch.zeros(H, device=dev)
        for si, smp in enumerate(prepared):
            m = masks[si] if masks is not None else smp.mask(sim, cdf, None if forced is None else forced[si])
            e = head_errors(tile_attention(smp.tiles, m, pv), smp.tiles.ref, rule)
            err = torch.maximum(err, torch.nan_to_num(e, nan=math.inf))
            spars += 1.0 - m.sum((1, 2)).to(torch.float32) / smp.available
        return err, spars / len(prepared)

    def bisect(lo: torch.Tensor, hi: torch.Tensor, probe: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
               budget: float, phase: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per head, ``cdf_steps`` bisection steps from ``hi`` towards ``lo`` while ``probe``'s error stays
        within ``budget``: ``(value, its error, its sparsity, feasible)`` (feasible: ``hi`` itself is within)."""
        err_hi, sp_hi = probe(hi)
        feasible = err_hi <= budget
        tick(phase)
        for _ in range(cdf_steps):
            mid = 0.5 * (lo + hi)
            err, sp = probe(mid)
            ok = err <= budget
            hi = torch.where(ok, mid, hi)
            lo = torch.where(ok, lo, mid)
            err_hi = torch.where(ok, err, err_hi)
            sp_hi = torch.where(ok, sp, sp_hi)
            tick(phase)
        return hi, err_hi, sp_hi, feasible

    best_sp = torch.full((H,), -1.0, device=dev)
    best_err = torch.full((H,), math.inf, device=dev)
    best_sim = torch.full((H,), math.nan, device=dev)
    best_cdf = torch.full((H,), math.nan, device=dev)
    last_sig: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    for s in grid:
        # the sim threshold acts only through which blocks are untrusted (self-similarity below it): a value
        # that untrusts exactly the blocks the last evaluated one did gives the same masks on every probe,
        # hence the same errors and sparsities, which cannot be "better" — skipped, results unchanged
        sig = [(smp.stats.q_sim >= s, smp.stats.k_sim >= s) for smp in prepared]
        if last_sig is not None and all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(sig, last_sig)):
            for _ in range(cdf_steps + 1):
                tick("cdf")
            continue
        last_sig = sig
        sim = torch.full((H,), s, device=dev)
        hi, err_hi, sp_hi, feasible = bisect(torch.zeros(H, device=dev), torch.ones(H, device=dev),
                                             lambda x: evaluate(sim, x), l1, "cdf")
        better = feasible & ((sp_hi > best_sp) | ((sp_hi == best_sp) & (err_hi < best_err)))
        best_sp = torch.where(better, sp_hi, best_sp)
        best_err = torch.where(better, err_hi, best_err)
        best_sim = torch.where(better, sim, best_sim)
        best_cdf = torch.where(better, hi, best_cdf)

    dense = torch.isnan(best_sim)
    sim_f = torch.nan_to_num(best_sim, nan=1.0)
    best_kl = torch.full((H,), float(base.keep_local), device=dev)
    for kl in kl_grid:
        # the chosen sim per head stays; only the local window shrinks and cdf is bisected again
        forced = [per_head_forced(smp.stats, base.keep_sink, [kl] * H, causal) for smp in prepared]
        hi, err_hi, sp_hi, feasible = bisect(torch.zeros(H, device=dev), torch.ones(H, device=dev),
                                             lambda x: evaluate(sim_f, x, forced=forced), l1, "keep_local")
        better = feasible & ~dense & (sp_hi > best_sp)
        best_sp = torch.where(better, sp_hi, best_sp)
        best_err = torch.where(better, err_hi, best_err)
        best_cdf = torch.where(better, hi, best_cdf)
        best_kl = torch.where(better, torch.full_like(best_kl, float(kl)), best_kl)
    cdf_f = torch.nan_to_num(best_cdf, nan=1.0)
    kl_list = [int(x) for x in best_kl.tolist()]
    head_forced = [per_head_forced(smp.stats, base.keep_sink, kl_list, causal) for smp in prepared] if kl_grid else None
    pv = torch.full((H,), math.inf, device=dev)
    if pv_l1 is not None:
        masks = [select_per_head(smp.stats, sim_f, cdf_f, dense, None if head_forced is None else head_forced[si])[0]
                 for si, smp in enumerate(prepared)]
        hi, err_hi, _, feasible = bisect(torch.full((H,), math.log(PV_RANGE[0]), device=dev),
                                         torch.full((H,), math.log(PV_RANGE[1]), device=dev),
                                         lambda x: evaluate(sim_f, cdf_f, x.exp(), masks), pv_l1, "pv")
        feasible = feasible & ~dense
        pv = torch.where(feasible, hi.exp(), pv)
        best_err = torch.where(feasible, err_hi, best_err)

    nan = torch.full((H,), math.nan, device=dev)
    zero = torch.zeros(H, device=dev)
    return HeadParams(
        sim_threshold=torch.where(dense, nan, best_sim).to("cpu", torch.float32),
        cdf_threshold=torch.where(dense, nan, best_cdf).to("cpu", torch.float32),
        pv_threshold=torch.where(dense, nan, pv).to("cpu", torch.float32),
        dense=dense.cpu(),
        sparsity=torch.where(dense, zero, best_sp.clamp_min(0.0)).to("cpu", torch.float32),
        error=torch.where(dense, zero, best_err).to("cpu", torch.float32),
        keep_local=torch.where(dense, nan, best_kl).to("cpu", torch.float32) if kl_grid else None,
    )
