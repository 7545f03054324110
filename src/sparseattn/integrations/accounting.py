"""Accounting of a patched model's sparse calls, kept on the device: densities, counts, timings, the report.

Per layer and call :class:`AccountingMixin` records a finished ``[H]`` float64 density (static layouts,
cached with the layout), raw counts (one reduction per call, divided when read) or a layer graph's
:class:`~sparseattn.integrations.layer_graphs.DensityAccumulator` (summed inside the graph; the handle
counts the calls). Nothing is read on the host until :meth:`AccountingMixin.sparsity_report` or
``dense_above`` asks.
"""

from __future__ import annotations

from typing import Any

import torch

from sparseattn.integrations.layer_graphs import DensityAccumulator
from sparseattn.integrations.routes import _small_cache
from sparseattn.layout.block_layout import BlockLayout

__all__ = ["AccountingMixin"]

# the density of static layouts, shared by every handle (held with the layout, so an id is never reused while cached)
_STATIC_DENSITY = _small_cache("integrations.static_density", 64)


def _as_density(entry: Any) -> torch.Tensor:
    """A density entry of :meth:`PatchHandle._density` (or a layer graph's accumulator) as the per-head
    float64 ``[H]`` density."""
    if isinstance(entry, torch.Tensor):
        return entry
    if isinstance(entry, DensityAccumulator):  # a layer graph's device-side sum: the mean over its calls
        return entry.density()
    counts, avail = entry
    return counts.mean(0, dtype=torch.float64) / avail


class AccountingMixin:
    """Densities, counters and the sparsity report of :class:`~sparseattn.integrations.handle.PatchHandle`."""

    _density_raw: dict[int, list[Any]]
    dense_above: float | str | None
    dense_tail: int
    _auto: Any

    def reset_stats(self) -> None:
        """Forget recorded densities, timings, counters, layouts and captures."""
        for items in self._density_raw.values():
            for item in items:
                if isinstance(item, DensityAccumulator):  # a layer graph's device-side density sum
                    item.reset()
        self._density_raw.clear()
        self.backends_used.clear()
        self.timings.clear()
        self.dense_fallbacks.clear()
        self.layouts.clear()
        self.captured.clear()
        self.counts = {k: 0 for k in self.counts}
        self.decode_fallbacks.clear()
        self.decode_backends.clear()
        self.decode_stats.clear()

    def sparsity_report(self) -> dict[str, Any]:
        """Per-layer mode, mean density / sparsity and per-head density actually used (JSON-friendly)."""
        layers: dict[str, Any] = {}
        dens_lists = self.densities
        for idx, _ in self._layers:
            mode = self.layer_modes[idx]
            entry: dict[str, Any] = {"mode": mode}
            if dens_lists.get(idx):
                per_head = torch.stack(dens_lists[idx]).mean(0).cpu()  # the one host read, at report time
                entry["density"] = float(per_head.mean())
                entry["sparsity"] = 1.0 - entry["density"]
                entry["density_per_head"] = [round(float(x), 6) for x in per_head]
                entry["backends"] = sorted(self.backends_used.get(idx, ()))
            elif mode == "dense":
                entry["density"] = 1.0
                entry["sparsity"] = 0.0
            else:
                entry["density"] = None
                entry["sparsity"] = None
            if idx in self.timings:
                entry["seconds"] = self.timings[idx]
            if self.dense_fallbacks.get(idx):
                entry["dense_fallbacks"] = self.dense_fallbacks[idx]
            if self._auto is not None and mode == "sparse":  # dense_above="auto": verdict per call shape
                entry["auto_dense"] = self._auto_report(idx)
            if idx in self.layer_graph_status:
                entry["layer_graph"] = self.layer_graph_status[idx]
            layers[str(idx)] = entry
        dens = [e["density"] for e in layers.values() if e["density"] is not None]
        # the layers whose blocks a predictor (or pattern / tuned entry) chose: exact window bands and dense layers
        # left out, so a model with sliding-window layers does not read as sparser than its predictor makes it
        pred = [e["density"] for e in layers.values() if e["mode"] == "sparse" and e["density"] is not None]
        extra = {} if self.tuned is None else {"tuned": self.tuned}
        extra["dense_above"] = self.dense_above
        extra["dense_tail"] = self.dense_tail
        extra["quant"] = None if self.quant is None else {"mode": self.quant, "granularity": self.quant_granularity}
        lg = self._layer_graphs
        if lg is not None:  # replays without input copies ("direct") and through the static buffers ("copy")
            extra["layer_graphs"] = {"replays": lg.replays, **lg.stats,
                                     **({"direct_error": lg.direct_error} if lg.direct_error else {})}
        return {
            "layers": layers,
            "mean_density": (sum(dens) / len(dens)) if dens else None,
            "mean_sparsity": (1.0 - sum(dens) / len(dens)) if dens else None,
            "mean_density_predicted": (sum(pred) / len(pred)) if pred else None,
            "counts": dict(self.counts),
            "backend": self.backend,
            "attn_implementation": self.impl_name,
            "original_attn_implementation": self.orig_impl,
            "decode": self._decode_report(),
            **extra,
        }

    def _decode_report(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": "dense"} if self.decode_route is None else self.decode_route.describe()
        out["fallbacks"] = dict(self.decode_fallbacks)
        out["backends"] = {str(k): sorted(v) for k, v in sorted(self.decode_backends.items())}
        out.update(self.decode_stats)
        return out

    def _too_dense(self, layout: BlockLayout, static: bool, density: Any) -> bool:
        """Whether ``density`` (this call's entry) is above ``dense_above`` (a host read; cached for static layouts)."""
        key = ("too_dense", id(layout), self.dense_above)
        if static:
            hit = _STATIC_DENSITY.get(key)
            if hit is not None and hit[0] is layout:
                return hit[1]
        if layout.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("patch_model: dense_above reads each predicted layer's density on the host, which a CUDA "
                               "graph capture cannot do; capture with dense_above=None (or a static pattern)")
        verdict = bool(_as_density(density).mean() > self.dense_above)  # the one host read of this call
        if static:
            _STATIC_DENSITY.put(key, (layout, verdict))
        return verdict

    @property
    def densities(self) -> dict[int, list[torch.Tensor]]:
        """``{layer: [float64 tensor[H] per prefill call]}``: block density actually used per head (on the device)."""
        out: dict[int, list[torch.Tensor]] = {}
        for layer, items in self._density_raw.items():
            dens: list[torch.Tensor] = []
            for x in items:  # a layer graph's accumulator stands for its calls: each gets their mean density
                dens.extend([_as_density(x)] * x.calls if isinstance(x, DensityAccumulator) else [_as_density(x)])
            out[layer] = dens
        return out

    def _count_graph_call(self, layer: int, accum: Any) -> None:
        """Account one graphed call of a predicted layer: its counts are already in ``accum`` (on the device)."""
        if accum.calls == 0:  # first call since the accumulator was created or reset: it joins the layer's entries
            self._density_raw.setdefault(layer, []).append(accum)
        accum.calls += 1

    def _density(self, layout: BlockLayout, static: bool, window: int | None) -> Any:
        """This call's density entry: a cached ``[H]`` tensor (static layouts) or raw counts (one reduction)."""
        def raw() -> tuple[torch.Tensor, int]:
            return layout.selected_in_region(causal=True), max(layout.available_blocks(causal=True), 1)

        if not static:
            return raw()
        key = (id(layout), layout.seqlen_q, layout.seqlen_kv, window)
        hit = _STATIC_DENSITY.get(key)
        if hit is None or hit[0] is not layout:
            hit = (layout, _as_density(raw()))
            _STATIC_DENSITY.put(key, hit)
        return hit[1]
