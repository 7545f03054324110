"""Model-level calibration of a tuned file: one global knob, bisected on the model's top-1 / KL / cosine.

The per-head search (:mod:`sparseattn.tuning.search`) keeps every head's *attention-output* error
within a budget (relative L1 0.06 by default). That budget does not map to a model-level number:
on SmolLM2 at 4K the default budget gives 58% block sparsity at 93.7–94.1% top-1 (docs/TUNING.md).
This module moves the whole tuned file along one monotone axis and picks the sparsest point whose
model-level metrics meet a target on calibration texts:

    cdf'_h = 1 − scale · (1 − cdf_h)          (every sparse head h of every tuned layer)

``scale`` = 1 is the file as searched, 0 keeps every block the predictor ranks (cdf 1: only blocks
with zero compressed mass are dropped), ``scale`` > 1 loosens it (cdf' is clamped to (0, 1]). The
kept CDF tail of each head is scaled, not its error budget: re-searching every head under
``scale · l1`` would cost one full tuning per probe, while a scaled tail costs one model forward per
calibration sample and reuses the per-head ranking (which head tolerates more) the search found.
The selected block set only grows as ``scale`` shrinks (CDF selection is nested in the threshold),
so sparsity is monotone in ``scale``; the model-level metrics are monotone only in tendency, and the
bisection therefore returns the largest *measured* passing scale, never an interpolated one.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import Any, Callable, Sequence

import torch

from sparseattn._validation import check_token_ids_list, fail
from sparseattn.tuning.types import HeadParams, TunedConfig

__all__ = ["scale_tuned", "bisect_scale", "calibrate_tuned", "Targets", "check_targets"]

#: the largest scale tried when the file as searched (scale 1) already meets the target
MAX_SCALE = 8.0


@dataclasses.dataclass(frozen=True)
class Targets:
    """Model-level targets on the calibration samples (None: not checked). At least one is set."""

    top1: float | None = None
    kl: float | None = None
    cosine: float | None = None

    def met(self, m: dict[str, float]) -> bool:
        return ((self.top1 is None or m["top1_agreement"] >= self.top1)
                and (self.kl is None or m["kl_dense_sparse"] <= self.kl)
                and (self.cosine is None or m["logits_cosine"] >= self.cosine))

    def as_dict(self) -> dict[str, float | None]:
        return {"top1": self.top1, "kl": self.kl, "cosine": self.cosine}


def check_targets(fn: str, top1: Any, kl: Any, cosine: Any) -> Targets:
    """Validate the three targets (``top1``/``cosine`` in (0, 1], ``kl`` > 0 finite); at least one set."""
    for name, val, hi in (("target_top1", top1, 1.0), ("target_cosine", cosine, 1.0), ("target_kl", kl, math.inf)):
        if val is None:
            continue
        if isinstance(val, bool) or not isinstance(val, (int, float)) or not (0.0 < float(val) <= hi) \
                or math.isinf(float(val)):
            raise fail(fn, name, "is out of range", "a finite number in (0, 1]" if hi == 1.0 else "a finite number > 0",
                       repr(val))
    if top1 is None and kl is None and cosine is None:
        raise fail(fn, "targets", "are all None", "at least one of target_top1, target_kl, target_cosine", None)
    return Targets(None if top1 is None else float(top1), None if kl is None else float(kl),
                   None if cosine is None else float(cosine))


def scale_tuned(cfg: TunedConfig, scale: float, *, keep_pv: bool = True) -> TunedConfig:
    """``cfg`` with every sparse head's CDF tail ``1 − cdf`` multiplied by ``scale`` (clamped to cdf ∈ (0, 1]).

    Dense heads, sim thresholds and the per-head ``sparsity`` / ``error`` fields (the search's, before
    the scale) are kept; ``keep_pv=False`` turns the P·V skip off (``pv_threshold = inf`` for sparse heads).
    """
    fn = "scale_tuned"
    if not isinstance(cfg, TunedConfig):
        raise fail(fn, "cfg", "must be a TunedConfig", "TunedConfig", type(cfg).__name__)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (0.0 <= float(scale) < math.inf):
        raise fail(fn, "scale", "must be a finite number >= 0", "e.g. 0.5", repr(scale))
    layers: dict[int, HeadParams] = {}
    for li, hp in cfg.layers.items():
        live = ~hp.dense
        cdf = (1.0 - float(scale) * (1.0 - hp.cdf_threshold)).clamp(1e-6, 1.0)
        pv = hp.pv_threshold if keep_pv else torch.where(live, torch.full_like(hp.pv_threshold, math.inf), hp.pv_threshold)
        layers[li] = dataclasses.replace(hp, cdf_threshold=torch.where(live, cdf, hp.cdf_threshold).to(torch.float32),
                                         pv_threshold=pv)
    return TunedConfig(layers=layers, meta=dict(cfg.meta), gate=cfg.gate)


def bisect_scale(measure: Callable[[float], dict[str, Any]], targets: Targets, *, steps: int = 5,
                 max_scale: float = MAX_SCALE) -> tuple[float | None, list[dict[str, Any]]]:
    """The largest measured scale whose metrics meet ``targets``, by bisection; ``(scale, probes)``.

    ``measure(scale)`` returns the model-level metrics (``top1_agreement``, ``kl_dense_sparse``,
    ``logits_cosine``, ``sparsity``). Probe 1 is ``scale = 1``. If it passes, the scale doubles until a
    probe fails or ``max_scale`` is reached, then ``steps`` bisections run between the last pass and the
    first fail; if it fails, ``scale = 0`` is probed (None is returned when even that fails) and
    ``steps`` bisections run in ``(0, 1)``. The interval ``[lo, hi]`` keeps ``lo`` = a measured pass
    and ``hi`` = a measured fail, so the answer is a probe that met the targets (a metric that is
    not monotone in the scale can make it a local, not the global, largest pass). Every probe is
    returned, in order, with its ``scale`` and ``passed``.
    """
    fn = "bisect_scale"
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise fail(fn, "steps", "must be an integer >= 0", "e.g. 5", repr(steps))
    if isinstance(max_scale, bool) or not isinstance(max_scale, (int, float)) or not (1.0 <= max_scale < math.inf):
        raise fail(fn, "max_scale", "must be a finite number >= 1", "e.g. 8", repr(max_scale))
    probes: list[dict[str, Any]] = []

    def probe(s: float) -> bool:
        m = dict(measure(s))
        m["scale"] = s
        m["passed"] = bool(targets.met(m))
        probes.append(m)
        return m["passed"]

    lo: float
    hi: float
    if probe(1.0):
        lo, hi = 1.0, math.inf
        while lo < max_scale:
            s = min(2.0 * lo, float(max_scale))
            if probe(s):
                lo = s
            else:
                hi = s
                break
        if math.isinf(hi):
            return lo, probes
    else:
        if not probe(0.0):
            return None, probes
        lo, hi = 0.0, 1.0
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        if probe(mid):
            lo = mid
        else:
            hi = mid
    return lo, probes


def calibrate_tuned(model: torch.nn.Module, cfg: TunedConfig, input_ids_list: Sequence[torch.Tensor], *,
                    target_top1: float | None = 0.95, target_kl: float | None = None,
                    target_cosine: float | None = None, steps: int = 5, max_scale: float = MAX_SCALE,
                    score_last: int | None = None, backend: str = "auto", dense_layers: Sequence[int] = (),
                    progress: bool = True, log: Callable[[str], None] | None = None) -> TunedConfig:
    """Bisect the CDF-tail scale of ``cfg`` (see module docstring) on model-level metrics; returns the scaled file.

    The dense logits of each calibration sample are computed once; each probe patches the model with
    the scaled file and runs one forward per sample (the captured q/k/v and the per-head search are
    not redone). Metrics are averaged over the samples on the last ``score_last`` positions (default
    half the length, as ``--compare`` and ``eval``), and the chosen scale meets every set target on
    them. The result's ``meta["calibration"]`` records the targets, the chosen scale, every probe and
    the seconds; when no probe passes (not even scale 0) the scale-0 file is returned with
    ``meta["calibration"]["met"] = False``.

    Args:
        model: the unpatched model the file was tuned on.
        cfg: the per-head search's result.
        input_ids_list: calibration token ids (``(N,)`` or ``(1, N)``), not held-out text.
        target_top1 / target_kl / target_cosine: targets (None: not checked; at least one set).
        steps: bisection steps after the bracket is found.
        max_scale: the largest scale tried.
        score_last / backend / dense_layers: as ``--compare``.
        progress / log: a progress bar on stderr; each probe's line goes to ``log``.
    """
    fn = "calibrate_tuned"
    targets = check_targets(fn, target_top1, target_kl, target_cosine)
    if not isinstance(cfg, TunedConfig):
        raise fail(fn, "cfg", "must be a TunedConfig", "TunedConfig", type(cfg).__name__)
    check_token_ids_list(fn, input_ids_list)
    if score_last is not None and (isinstance(score_last, bool) or not isinstance(score_last, int) or score_last < 1):
        raise fail(fn, "score_last", "must be a positive integer or None", "e.g. 2048", repr(score_last))

    from tqdm.auto import tqdm

    from sparseattn.eval.end_to_end import logits_metrics
    from sparseattn.integrations.transformers_patch import patch_model

    t0 = time.perf_counter()
    dev = next(model.parameters()).device
    ids = [(t if t.dim() == 2 else t[None]).to(dev) for t in input_ids_list]

    def logits(t: torch.Tensor, k: int) -> torch.Tensor:
        return model(t, use_cache=False, logits_to_keep=k).logits[0, -k:].float()

    ks = [min(int(t.shape[-1]), score_last or max(1, int(t.shape[-1]) // 2)) for t in ids]
    with torch.no_grad():
        dense = [logits(t, k) for t, k in zip(ids, ks)]
    bar = tqdm(desc="calibrate", unit="probe", disable=not progress, file=sys.stderr)

    def measure(scale: float) -> dict[str, Any]:
        p0 = time.perf_counter()
        per = []
        with torch.no_grad(), patch_model(model, tuned=scale_tuned(cfg, scale), backend=backend,
                                          dense_layers=list(dense_layers)) as h:
            for t, k, ref in zip(ids, ks, dense):
                per.append(logits_metrics(logits(t, k), ref))
            rep = h.sparsity_report()
        m = {key: sum(x[key] for x in per) / len(per) for key in ("top1_agreement", "kl_dense_sparse", "logits_cosine")}
        m["sparsity"] = rep["mean_sparsity"]
        m["seconds"] = round(time.perf_counter() - p0, 2)
        bar.update(1)
        bar.set_postfix(scale=f"{scale:.3g}", top1=f"{m['top1_agreement']:.4f}", sparsity=f"{m['sparsity']:.3f}")
        if log is not None:
            log(f"calibrate: scale={scale:.4g} sparsity={m['sparsity']:.4f} top1={m['top1_agreement']:.4f} "
                f"kl={m['kl_dense_sparse']:.4g} cosine={m['logits_cosine']:.6f} "
                f"{'pass' if targets.met(m) else 'fail'} ({m['seconds']} s)")
        return m

    scale, probes = bisect_scale(measure, targets, steps=steps, max_scale=max_scale)
    bar.close()
    met = scale is not None
    out = scale_tuned(cfg, 0.0 if scale is None else scale)
    chosen = next((p for p in probes if met and p["scale"] == scale), None)
    out.meta["calibration"] = {
        "knob": "cdf tail scale: cdf' = 1 - scale * (1 - cdf) per sparse head",
        "targets": targets.as_dict(), "met": met, "scale": 0.0 if scale is None else scale,
        "chosen": chosen, "probes": probes, "samples": len(ids), "scored_positions": ks,
        "steps": steps, "max_scale": max_scale, "seconds": round(time.perf_counter() - t0, 2),
        "head_fields": "per-head sparsity and error are the search's, before the scale",
    }
    return out
