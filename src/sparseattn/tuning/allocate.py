"""Per-layer CDF allocation by model-level sensitivity (``sparseattn tune --allocate``).

The per-head search (:mod:`sparseattn.tuning.search`) gives every head the same attention-output error budget.
On SmolLM2 that spends sparsity no better than one CDF threshold for every head (docs/TUNING.md): a head's output
error is not what the model's logits feel. This module measures that instead, per layer, and allocates:

1. **Sensitivity.** For each layer ``l`` the model runs with only ``l`` sparse, every head at the probe threshold
   ``probe`` (default 0.85), and the KL(dense ‖ sparse) of its logits is recorded: ``KL_l(probe)``. One forward per
   layer and sensitivity sample.
2. **Curves.** From the captured post-RoPE q/k of the calibration samples, for every threshold ``c`` of the grid and
   every layer: the block sparsity of the predictor's selection, and the attention mass it misses, ``miss_l(c)`` (the
   mean over heads and query rows of the exact block mass left out; :func:`~sparseattn.predictors.oracle.exact_block_mass`).
3. **Cost model.** A small output perturbation costs KL quadratically, and the output error grows with the missed
   mass, so ``KL_l(c) ≈ KL_l(probe) · (miss_l(c) / miss_l(probe))²``; layers are assumed to add up.
4. **Allocation.** Per layer the threshold maximising ``sparsity_l(c) − λ · KL_l(c)``; ``λ`` is bisected (log scale)
   for the sparsest allocation whose predicted total KL stays within ``kl_budget``.

The result is an ordinary tuned file (every head of a layer shares the layer's threshold; ``rule`` ``"layer_kl"``,
``error`` = the layer's predicted KL share), so model-level calibration (``--target-top1``: the CDF tails scaled
by one factor) and every ``--tuned`` option apply to it. Works for mean_sim (the default predictor's
``sim_threshold`` for every head) and for a learned gate (``gate=``).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
import warnings
from typing import Any, Callable, Iterator, Sequence

import torch

from sparseattn._validation import fail
from sparseattn.errors import model_fingerprint
from sparseattn.predictors.mean_similarity import MeanSimilarityConfig, mean_sim_stats
from sparseattn.tuning.types import ALLOCATION_RULE, HeadParams, TunedConfig

__all__ = ["DEFAULT_GRID", "DEFAULT_PROBE", "layer_curves", "layer_sensitivity", "allocate", "allocate_model"]

#: CDF thresholds a layer may get (descending: denser first)
DEFAULT_GRID = (0.995, 0.99, 0.98, 0.97, 0.96, 0.95, 0.94, 0.93, 0.92, 0.9, 0.88, 0.85, 0.8, 0.75, 0.7)
#: the threshold every head of the probed layer gets in the sensitivity forward
DEFAULT_PROBE = 0.85


def _check_probe_budget(fn: str, grid: list[float], probe: float, kl_budget: Any) -> None:
    """``probe`` is a grid value and ``kl_budget`` a positive finite number (shared by the two entry points)."""
    if float(probe) not in grid:
        raise fail(fn, "probe", "is not a value of the grid", f"one of {grid}", probe)
    if not (isinstance(kl_budget, (int, float)) and not isinstance(kl_budget, bool) and 0 < kl_budget < math.inf):
        raise fail(fn, "kl_budget", "must be a positive finite number", "e.g. 0.006", repr(kl_budget))


def _head_params(H: int, cdf: float, sim: float, sparsity: float = 0.0, error: float = 0.0) -> HeadParams:
    return HeadParams(sim_threshold=torch.full((H,), float(sim)), cdf_threshold=torch.full((H,), float(cdf)),
                      pv_threshold=torch.full((H,), math.inf), dense=torch.zeros(H, dtype=torch.bool),
                      sparsity=torch.full((H,), float(sparsity)), error=torch.full((H,), float(error)))


def layer_curves(samples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], stats_fn: Callable[..., Any],
                 base: MeanSimilarityConfig, grid: Sequence[float], *, sim: float,
                 scale: float | None = None) -> tuple[list[float], list[float]]:
    """One layer's ``(sparsity(c), miss(c))`` for every ``c`` of ``grid``, means over the samples.

    ``samples``: the layer's captured ``(q, k, v)`` (``(1, H, N, D)`` / ``(1, H_kv, N, D)``); ``stats_fn(q, k, base,
    causal=True)`` the predictor's threshold-independent stats (:func:`~sparseattn.predictors.mean_similarity.
    mean_sim_stats`, or :func:`~sparseattn.tuning.predictor.gate_stats` bound to the layer); ``sim``: every head's
    ``sim_threshold``. ``miss`` is the exact block attention mass the selection leaves out, averaged over heads and
    query rows.
    """
    from sparseattn.predictors.oracle import exact_block_mass
    from sparseattn.tuning.predictor import select_per_head

    S, H, dev = len(grid), samples[0][0].shape[1], samples[0][0].device
    sp = torch.zeros(S)
    miss = torch.zeros(S)
    cdf = torch.tensor([float(c) for c in grid], dtype=torch.float32, device=dev)[:, None].expand(S, H)
    sims = torch.full((S, H), float(sim), device=dev)
    for q, k, _v in samples:
        q32, k32 = q.to(torch.float32), k.to(torch.float32)
        stats = stats_fn(q32, k32, base, causal=True)
        masks = select_per_head(stats, sims, cdf)  # [S, 1, H, Mb, Nb]
        mass = exact_block_mass(q32, k32, causal=True, block_m=base.block_m, block_n=base.block_n, scale=scale)
        rows = stats.region.any(-1)  # [Mb]
        avail = stats.region.sum().to(torch.float32) * H
        kept = (masks.to(torch.float32) * mass).sum(-1)  # [S, 1, H, Mb]
        miss += (1.0 - kept[..., rows]).mean((1, 2, 3)).cpu()
        sp += (1.0 - masks.sum((1, 2, 3, 4)).to(torch.float32) / avail).cpu()
    return (sp / len(samples)).tolist(), (miss / len(samples)).tolist()


def _clone(out: Any) -> Any:
    """A decoder layer's output with every tensor cloned (a later layer may work in place on its input)."""
    from torch.utils._pytree import tree_map

    return tree_map(lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v, out)


_UNSET = object()


@contextlib.contextmanager
def _replayed(decoders: dict[int, torch.nn.Module], upto: int, outputs: dict[int, Any]) -> Iterator[None]:
    """Decoder layers ``< upto`` return their recorded dense outputs instead of running (the instance's own
    ``forward`` attribute, if any, is put back afterwards). Only the last of them feeds a running layer, so only its
    output is cloned; the others go to the next replayed layer, which ignores its input."""
    saved: dict[int, Any] = {}
    last = max((j for j in decoders if j < upto), default=None)
    try:
        for j, mod in decoders.items():
            if j < upto:
                saved[j] = mod.__dict__.get("forward", _UNSET)
                mod.forward = ((lambda *_a, _o=outputs[j], **_k: _clone(_o)) if j == last  # type: ignore[method-assign]
                               else (lambda *_a, _o=outputs[j], **_k: _o))
        yield
    finally:
        for j, prev in saved.items():
            mod = decoders[j]
            if prev is _UNSET:
                del mod.forward
            else:
                mod.forward = prev  # type: ignore[method-assign]


def layer_sensitivity(model: torch.nn.Module, ids_list: list[torch.Tensor], layers: list[int],
                      cfg_for_layer: Callable[[int], TunedConfig], *, score_last: int, backend: str = "auto",
                      progress: bool = True) -> dict[int, float]:
    """``{layer: KL(dense ‖ only this layer sparse)}``, the mean over ``ids_list`` (logits of the last
    ``score_last`` positions; one forward per layer and sample, dense logits once).

    The layers before the probed one are dense in a sensitivity forward, so they are not run again: the dense
    forward records every decoder layer's output and the probe forward replays them (exact; on SmolLM2 about half
    the work). A model whose decoder layers cannot be found (:func:`~sparseattn.models.layers.decoder_layers`) runs
    every forward whole, with a warning.
    """
    from tqdm.auto import tqdm

    from sparseattn.eval.end_to_end import logits_metrics
    from sparseattn.integrations.transformers_patch import patch_model
    from sparseattn.models.layers import decoder_layers

    dev = next(model.parameters()).device
    decoders = decoder_layers(model)
    if not decoders:
        warnings.warn("layer_sensitivity: the decoder layers of this model were not found in layer order; every "
                      "sensitivity forward runs the whole model (the dense prefix is not replayed)", stacklevel=2)

    def logits(ids: torch.Tensor) -> torch.Tensor:
        return model(ids.to(dev), use_cache=False, logits_to_keep=score_last).logits[0, -score_last:].float()

    def recorder(store: dict[int, Any], j: int) -> Callable[..., None]:
        def hook(_mod: torch.nn.Module, _args: Any, output: Any) -> None:
            store[j] = _clone(output)
        return hook

    out: dict[int, float] = {}
    with torch.no_grad():
        ids = [t if t.dim() == 2 else t[None] for t in ids_list]
        refs, recorded = [], []
        for t in ids:
            store: dict[int, Any] = {}
            hooks = [mod.register_forward_hook(recorder(store, j)) for j, mod in decoders.items()]
            try:
                refs.append(logits(t))
            finally:
                for h in hooks:
                    h.remove()
            recorded.append(store)
        bar = tqdm(layers, desc="sensitivity", unit="layer", disable=not progress, file=sys.stderr)
        for li in bar:
            kl = 0.0
            with patch_model(model, tuned=cfg_for_layer(li), backend=backend):
                for t, ref, store in zip(ids, refs, recorded):
                    with _replayed(decoders, li, store):
                        kl += logits_metrics(logits(t), ref)["kl_dense_sparse"]
            out[li] = kl / len(ids)
            bar.set_postfix(layer=li, kl=f"{out[li]:.2e}")
        bar.close()
    return out


def allocate(kl_probe: dict[int, float], curves: dict[int, tuple[list[float], list[float]]], grid: Sequence[float],
             probe: float, kl_budget: float) -> tuple[dict[int, float], dict[int, float], float, float]:
    """Per-layer thresholds under a predicted KL budget (see module docstring).

    Args:
        kl_probe: ``{layer: KL_l(probe)}`` from :func:`layer_sensitivity`.
        curves: ``{layer: (sparsity(c), miss(c))}`` over ``grid`` from :func:`layer_curves`; ``probe`` must be in ``grid``.
        kl_budget: the predicted total KL to stay within.

    Returns:
        ``(cdf per layer, predicted KL per layer, predicted total KL, predicted mean sparsity)``; when even the densest
        grid value of every layer exceeds the budget, that densest allocation.
    """
    fn = "allocate"
    grid = [float(c) for c in grid]
    _check_probe_budget(fn, grid, probe, kl_budget)
    if set(kl_probe) != set(curves):
        raise fail(fn, "curves", "must cover exactly the probed layers", sorted(kl_probe), sorted(curves))
    ip = grid.index(float(probe))
    cost: dict[int, list[float]] = {}
    for li, (_sp, miss) in curves.items():
        m0 = miss[ip]
        if m0 <= 0.0:  # the probe misses nothing: a grid value missing no more costs nothing, others the probe's KL
            cost[li] = [0.0 if m <= 0.0 else kl_probe[li] for m in miss]
        else:
            cost[li] = [kl_probe[li] * (m / m0) ** 2 for m in miss]

    def choose(lam: float) -> tuple[dict[int, int], float, float]:
        pick = {li: max(range(len(grid)), key=lambda j: (curves[li][0][j] - lam * cost[li][j], -j)) for li in curves}
        total = sum(cost[li][j] for li, j in pick.items())
        spars = sum(curves[li][0][j] for li, j in pick.items()) / max(1, len(pick))
        return pick, total, spars

    lo, hi = -8.0, 12.0  # log10 lambda: small = sparse, large = dense
    pick, total, spars = choose(10 ** hi)
    if total <= kl_budget:
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            p, t, s = choose(10 ** mid)
            if t <= kl_budget:
                hi, pick, total, spars = mid, p, t, s
            else:
                lo = mid
    return ({li: grid[j] for li, j in pick.items()}, {li: cost[li][j] for li, j in pick.items()}, total, spars)


def allocate_model(
    model: torch.nn.Module,
    input_ids_list: list[torch.Tensor],
    *,
    kl_budget: float,
    base: MeanSimilarityConfig | None = None,
    gate: Any = None,
    grid: Sequence[float] = DEFAULT_GRID,
    probe: float = DEFAULT_PROBE,
    sensitivity_samples: int = 1,
    score_last: int | None = None,
    dense_layers: tuple[int, ...] | list[int] = (),
    backend: str = "auto",
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> TunedConfig:
    """Allocate one CDF threshold per layer under a predicted KL budget (see module docstring).

    Args:
        model: a transformers decoder, unpatched.
        input_ids_list: calibration token ids; all of them give the curves, the first ``sensitivity_samples`` the
            sensitivity forwards.
        kl_budget: predicted total KL(dense ‖ sparse) of the logits.
        base: layer-wide predictor fields (block sizes, sink, local window; mean_sim's ``score`` and
            ``sim_threshold``); default ``MeanSimilarityConfig()``.
        gate: :class:`~sparseattn.gate.model.GateWeights` to allocate over instead of mean_sim (block sizes must be the
            gate's); the result embeds it.
        grid / probe: the thresholds a layer may get, and the one of the sensitivity forwards.
        score_last: logits positions scored (default half the first sample's length).
        dense_layers: layers kept dense (not allocated).

    Returns:
        A :class:`TunedConfig` (``meta["rule"]`` ``"layer_kl"``; ``meta["allocation"]`` holds the per-layer
        sensitivity, threshold, predicted KL, the grid and the totals).
    """
    from sparseattn.tuning.run import build_meta, capture_samples, gate_predictor_for, gate_search_args, plan_tuning
    from sparseattn.tuning.run import seq_len_of, with_gate

    fn = "allocate_model"
    t0 = time.perf_counter()
    grid = [float(c) for c in grid]
    if not grid or any(not 0.0 < c <= 1.0 for c in grid) or len(set(grid)) != len(grid):
        raise fail(fn, "grid", "must be distinct thresholds in (0, 1]", "e.g. (0.99, 0.95, 0.9)", grid)
    _check_probe_budget(fn, grid, probe, kl_budget)
    if isinstance(sensitivity_samples, bool) or not isinstance(sensitivity_samples, int) or sensitivity_samples < 1:
        raise fail(fn, "sensitivity_samples", "must be a positive integer", "an int >= 1", repr(sensitivity_samples))
    base, _budgets, dense, todo = plan_tuning(fn, model, input_ids_list, base=base, rule="l1", layer_l1="",
                                              dense_layers=dense_layers)
    gate_pred = gate_predictor_for(fn, gate, base, todo)
    sim = -1.0 if gate_pred is not None else float(base.sim_threshold)
    emit = log if log is not None else (print if progress else None)
    ids = [t if t.dim() == 2 else t[None] for t in input_ids_list]
    n = int(ids[0].shape[-1])
    k = min(n, score_last or max(1, n // 2))
    fp = model_fingerprint(model)
    cfg_heads = int(fp["num_attention_heads"])
    meta0 = build_meta(model, base, rule=ALLOCATION_RULE, l1=kl_budget, pv_l1=None, layer_l1="",
                       seq_len=seq_len_of(ids), samples=len(ids), dense_layers=dense, seconds=0.0)
    meta0["fingerprint"] = fp
    meta0["budgets"] = {"kl": float(kl_budget)}

    def cfg_for(layers: dict[int, HeadParams]) -> TunedConfig:
        return with_gate(TunedConfig(layers=layers, meta=dict(meta0)), gate)

    # 1. curves from the captures (cheap: the predictor's stats and the exact block mass per layer and sample)
    from tqdm.auto import tqdm

    from sparseattn.gate.train import attention_scale

    captured = capture_samples(model, ids, todo)
    dev = next(model.parameters()).device
    scale = attention_scale(model, int(fp["head_dim"]))
    curves: dict[int, tuple[list[float], list[float]]] = {}
    bar = tqdm(todo, desc="curves", unit="layer", disable=not progress, file=sys.stderr)
    for li in bar:
        stats_fn = gate_search_args(gate_pred, li).get("stats_fn", mean_sim_stats)
        curves[li] = layer_curves([tuple(t.to(dev) for t in smp) for smp in captured.pop(li)], stats_fn, base, grid,
                                  sim=sim, scale=scale)
    bar.close()
    # 2. sensitivity: one forward per layer and sensitivity sample
    # every other layer keeps the model's own attention (dense_layers), not the all-blocks sparse path: in bf16 the KL
    # is then this layer's alone, not also the rounding floor of every other layer's kernel call (and the layers
    # before it are replayed by layer_sensitivity, not run)
    def probe_cfg(li: int) -> TunedConfig:
        one = cfg_for({li: _head_params(cfg_heads, probe, sim)})
        one.meta["dense_layers"] = sorted((set(dense) | set(todo)) - {li})
        return one

    sens = layer_sensitivity(model, ids[:sensitivity_samples], todo, probe_cfg, score_last=k, backend=backend,
                             progress=progress)
    # 3. allocate
    cdf, kl_pred, total, spars = allocate(sens, curves, grid, probe, float(kl_budget))
    layers = {li: _head_params(cfg_heads, cdf[li], sim, curves[li][0][grid.index(cdf[li])], kl_pred[li]) for li in todo}
    if emit is not None:
        for li in todo:
            emit(f"{li}: sensitivity KL({probe:g})={sens[li]:.3g}, cdf={cdf[li]:g}, "
                 f"sparsity={curves[li][0][grid.index(cdf[li])]:.3f}, predicted KL={kl_pred[li]:.3g}")
        emit(f"allocation: predicted KL {total:.4g} (budget {kl_budget:g}), predicted mean sparsity {spars:.3f}")
    cfg = cfg_for(layers)
    cfg.meta["seconds"] = time.perf_counter() - t0
    cfg.meta["allocation"] = {
        "method": "per-layer CDF by model-level KL sensitivity", "probe": float(probe), "grid": grid,
        "kl_budget": float(kl_budget), "predicted_kl": total, "predicted_sparsity": spars,
        "sensitivity_samples": int(sensitivity_samples), "score_last": k,
        "layers": {str(li): {"sensitivity_kl": sens[li], "cdf": cdf[li], "predicted_kl": kl_pred[li],
                             "sparsity": curves[li][0], "miss": curves[li][1]} for li in todo}}
    return cfg

