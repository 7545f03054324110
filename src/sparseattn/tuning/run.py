"""Tune a whole transformers model: capture post-RoPE q/k/v once per sample, then search layer by layer."""

from __future__ import annotations

import datetime
import re
import sys
import time
from typing import Any, Callable

import torch

from sparseattn._validation import check_token_ids_list, fail
from sparseattn.predictors.mean_similarity import MeanSimilarityConfig
from sparseattn.tuning.types import RULES, TUNED_VERSION, HeadParams, TunedConfig

__all__ = ["tune_model", "parse_layer_budgets", "capture_samples", "log_lines", "build_meta", "window_layers"]

_RANGE = re.compile(r"^\s*(\d+)\s*(?:(-)\s*(\d*)\s*)?:\s*([^\s,]+)\s*$")


def parse_layer_budgets(spec: str, num_layers: int | None = None) -> dict[int, float]:
    """Parse per-layer budgets ``"0-5:0.04,21-:0.08,7:0.05"`` into ``{layer: budget}``.

    Ranges are inclusive; ``"21-"`` runs to the last layer (needs ``num_layers``, else only explicit
    ends are allowed). An empty spec gives ``{}``. Raises ``ValueError`` on bad syntax, a budget that is
    not a positive finite number, ``start > end``, a layer outside ``[0, num_layers)`` or overlapping ranges.
    """
    fn = "parse_layer_budgets"
    if not isinstance(spec, str):
        raise fail(fn, "spec", "must be a string", "e.g. '0-5:0.04,21-:0.08'", type(spec).__name__)
    out: dict[int, float] = {}
    if not spec.strip():
        return out
    for part in spec.split(","):
        m = _RANGE.match(part)
        if m is None:
            raise fail(fn, "spec", f"has a malformed entry {part.strip()!r}", "'<a>:<budget>', '<a>-<b>:<budget>' or '<a>-:<budget>'",
                       repr(spec))
        a, dash, b, val = m.groups()
        try:
            budget = float(val)
        except ValueError:
            raise fail(fn, "spec", f"has a budget that is not a number in {part.strip()!r}", "a float > 0", repr(val)) from None
        if not (0.0 < budget < float("inf")):
            raise fail(fn, "spec", f"has a budget out of range in {part.strip()!r}", "a finite float > 0", repr(val))
        start = int(a)
        if dash is None:
            end = start
        elif b:
            end = int(b)
        else:
            if num_layers is None:
                raise fail(fn, "spec", f"has an open range {part.strip()!r} but the layer count is unknown",
                           "num_layers, or a closed range", None)
            end = num_layers - 1
        if start > end:
            raise fail(fn, "spec", f"has a range whose start exceeds its end in {part.strip()!r}", "start <= end",
                       f"{start} > {end}")
        if num_layers is not None and end >= num_layers:
            raise fail(fn, "spec", f"names a layer the model does not have in {part.strip()!r}",
                       f"layers 0..{num_layers - 1}", end)
        for li in range(start, end + 1):
            if li in out:
                raise fail(fn, "spec", f"has overlapping ranges at layer {li}", "disjoint ranges", repr(spec))
            out[li] = budget
    return out


def capture_samples(model: torch.nn.Module, input_ids_list: list[torch.Tensor], layers: list[int] | None = None
                    ) -> dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """One forward per sample, capturing every attention layer's post-RoPE q/k/v on the CPU as float32.

    Memory: all layers of all samples are held at once (``L·S·(H + 2·H_kv)·N·D`` floats), the price of
    running the model once per sample instead of once per (sample, layer). ``layers``: only these (all when None).
    """
    from sparseattn.integrations.capture import capture_qkv

    dev = next(model.parameters()).device
    out: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
    for ids in input_ids_list:
        ids = ids if ids.dim() == 2 else ids[None]
        with torch.no_grad(), capture_qkv(model, layers, device="cpu") as cap:
            model(ids.to(dev), use_cache=False)
        for li in sorted(cap):
            c = cap[li]
            out.setdefault(li, []).append(tuple(c[r].to(torch.float32) for r in ("q", "k", "v")))  # type: ignore[arg-type]
    return out


def log_lines(layer: int, hp: HeadParams) -> list[str]:
    """SpargeAttn-style lines ``layer.head: sim_threshold, cdf_threshold, pv_threshold, sparsity, error``."""
    lines = []
    for h in range(hp.heads):
        tag = " (dense)" if bool(hp.dense[h]) else ""
        if hp.keep_local is not None and not bool(hp.dense[h]):
            tag = f", local={int(hp.keep_local[h])}"
        lines.append(f"{layer}.{h}: sim={float(hp.sim_threshold[h]):.3f}, cdf={float(hp.cdf_threshold[h]):.4f}, "
                     f"pv={float(hp.pv_threshold[h]):.3g}, sparsity={float(hp.sparsity[h]):.3f}, "
                     f"error={float(hp.error[h]):.4f}{tag}")
    return lines


def build_meta(model: torch.nn.Module, base: MeanSimilarityConfig, *, rule: str, l1: float, pv_l1: float | None,
               layer_l1: str, seq_len: Any, samples: int, dense_layers: list[int], seconds: float) -> dict[str, Any]:
    """The ``TunedConfig.meta`` documented in :mod:`sparseattn.tuning.types`."""
    cfg = getattr(model, "config", None)
    heads = getattr(cfg, "num_attention_heads", None)
    head_dim = getattr(cfg, "head_dim", None)
    if head_dim is None and heads:
        head_dim = getattr(cfg, "hidden_size", 0) // heads
    try:
        device = str(next(model.parameters()).device)
    except StopIteration:
        device = "cpu"
    return {
        "version": TUNED_VERSION,
        "model": str(getattr(cfg, "name_or_path", "") or getattr(cfg, "_name_or_path", "") or type(model).__name__),
        "fingerprint": {"num_hidden_layers": getattr(cfg, "num_hidden_layers", None), "num_attention_heads": heads,
                        "num_key_value_heads": getattr(cfg, "num_key_value_heads", heads), "head_dim": head_dim,
                        "model_type": getattr(cfg, "model_type", None)},
        "predictor": {"block_m": base.block_m, "block_n": base.block_n, "keep_sink": base.keep_sink,
                      "keep_local": base.keep_local, "score": base.score},
        "rule": rule,
        "budgets": {"l1": float(l1), "pv_l1": None if pv_l1 is None else float(pv_l1), "layer_l1": layer_l1},
        "seq_len": seq_len,
        "samples": samples,
        "dense_layers": list(dense_layers),
        "window_layers": window_layers(model),  # exact bands at run time: not tuned, not dense
        "seconds": seconds,
        "device": device,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def tune_model(
    model: torch.nn.Module,
    input_ids_list: list[torch.Tensor],
    *,
    l1: float = 0.06,
    pv_l1: float | None = None,
    layer_l1: str = "",
    rule: str = "l1",
    dense_layers: tuple[int, ...] | list[int] = (),
    base: MeanSimilarityConfig | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    keep_local_grid: tuple[int, ...] | list[int] = (),
    gate: Any = None,
) -> TunedConfig:
    """Tune every attention layer of a transformers model under an error budget (see :func:`tune_layer`).

    The model runs once per calibration sample with every layer captured (post-RoPE q/k/v, CPU
    float32, the layers to tune held; see :func:`capture_samples`); then each layer not in ``dense_layers``
    and not a sliding-window layer (exact at run time, see :func:`window_layers`) is tuned with its budget (``layer_l1`` overrides ``l1`` per layer, e.g. ``"0-5:0.04,21-:0.08"``).

    Args:
        model: a transformers decoder (Llama, Qwen2, ...), unpatched.
        input_ids_list: calibration token ids, each ``(N,)`` or ``(1, N)``.
        l1 / pv_l1 / rule: budgets and error rule (see :func:`tune_layer`).
        layer_l1: per-layer budget overrides.
        dense_layers: layers kept dense (not tuned, absent from the result).
        base: layer-wide mean_sim choices (default ``MeanSimilarityConfig()``).
        progress: show a progress bar over layers and (when ``log`` is None) print the per-head lines.
        log: receives each per-head line ``layer.head: sim, cdf, pv, sparsity, error``.
        keep_local_grid: per-head local block counts also tried (see :func:`tune_layer`); empty: none.
        gate: :class:`~sparseattn.gate.model.GateWeights` of a learned gate (``sparseattn train-gate``) to tune
            instead of mean_sim: per head the CDF threshold (and local window) over the gate's block distribution
            (:func:`~sparseattn.tuning.predictor.gate_stats`); ``base``'s block sizes must be the gate's and the
            gate must hold weights for every layer to tune. The result embeds the gate (``TunedConfig.gate``).

    Returns:
        :class:`TunedConfig` with the meta documented in :mod:`sparseattn.tuning.types`.
    """
    from sparseattn.tuning.search import tune_layer

    t0 = time.perf_counter()
    base, budgets, dense, todo = plan_tuning("tune_model", model, input_ids_list, base=base, rule=rule,
                                             layer_l1=layer_l1, dense_layers=dense_layers)
    emit = log if log is not None else (print if progress else None)

    gate_pred = gate_predictor_for("tune_model", gate, base, todo)
    captured = capture_samples(model, list(input_ids_list), todo)  # only the layers to tune are held
    search_device = next(model.parameters()).device
    from tqdm.auto import tqdm

    out: dict[int, HeadParams] = {}
    bar = tqdm(todo, desc="tune", unit="layer", disable=not progress, file=sys.stderr)
    for li in bar:
        hp = tune_layer(captured[li], base=base, l1=budgets.get(li, l1), pv_l1=pv_l1, rule=rule,
                        device=search_device, keep_local_grid=tuple(keep_local_grid),
                        **gate_search_args(gate_pred, li))  # captures wait on the CPU; each layer's search runs on the model's device
        out[li] = hp
        captured.pop(li)
        if emit is not None:
            for line in log_lines(li, hp):
                emit(line)
        bar.set_postfix(sparsity=f"{float(hp.sparsity.mean()):.3f}")
    bar.close()
    meta = build_meta(model, base, rule=rule, l1=l1, pv_l1=pv_l1, layer_l1=layer_l1,
                      seq_len=seq_len_of(input_ids_list), samples=len(input_ids_list), dense_layers=dense,
                      seconds=time.perf_counter() - t0)
    meta["keep_local_grid"] = [int(x) for x in keep_local_grid]
    return with_gate(TunedConfig(layers=out, meta=meta), gate)


def gate_predictor_for(fn: str, gate: Any, base: MeanSimilarityConfig, todo: list[int]) -> Any:
    """Check a gate to tune over (None: mean_sim) and return a torch-path
    :class:`~sparseattn.predictors.gate.GatePredictor` on it (None without a gate)."""
    if gate is None:
        return None
    from sparseattn.gate.model import GateWeights
    from sparseattn.predictors.gate import GateConfig, GatePredictor

    if not isinstance(gate, GateWeights):
        raise fail(fn, "gate", "must be GateWeights (sparseattn.gate.store.load_gate) or None", "GateWeights",
                   type(gate).__name__)
    if (gate.block_m, gate.block_n) != (base.block_m, base.block_n):
        raise fail(fn, "base", "has other block sizes than the gate", f"block_m={gate.block_m}, block_n={gate.block_n}",
                   f"block_m={base.block_m}, block_n={base.block_n}")
    missing = [li for li in todo if gate.index(li) is None]
    if missing:
        raise fail(fn, "gate", "holds no weights for layers to tune", "a gate trained on every tuned layer (or those "
                   "layers in dense_layers)", missing)
    return GatePredictor(GateConfig(), weights=gate, backend="torch")


def gate_search_args(gate_pred: Any, layer: int) -> dict[str, Any]:
    """:func:`tune_layer` keywords for one layer: none for mean_sim; the gate's stats and ``sim_grid=(-1,)``."""
    if gate_pred is None:
        return {}
    from functools import partial

    from sparseattn.tuning.predictor import gate_stats

    return {"stats_fn": partial(gate_stats, gate_pred, layer=layer), "sim_grid": (-1.0,)}


def with_gate(cfg: TunedConfig, gate: Any) -> TunedConfig:
    """``cfg`` with the gate embedded and the metadata saying so (``predictor.name`` ``"gate"``; unchanged without)."""
    if gate is None:
        return cfg
    import dataclasses

    meta = dict(cfg.meta)
    meta["predictor"] = dict(meta["predictor"], name="gate", score="gate")
    return dataclasses.replace(cfg, meta=meta, gate=gate)


def plan_tuning(fn: str, model: torch.nn.Module, input_ids_list: Any, *, base: MeanSimilarityConfig | None, rule: str,
                layer_l1: str, dense_layers: Any) -> tuple[MeanSimilarityConfig, dict[int, float], list[int], list[int]]:
    """Check a tuning call's arguments; returns ``(base, per-layer budgets, dense layers, layers to tune)``.

    Shared by :func:`tune_model` and :func:`~sparseattn.tuning.parallel.tune_model_distributed`.
    """
    from sparseattn.models.layers import require_attention_layers

    base = MeanSimilarityConfig() if base is None else base
    if not isinstance(base, MeanSimilarityConfig):
        raise fail(fn, "base", "must be a MeanSimilarityConfig or None", "MeanSimilarityConfig", type(base).__name__)
    if rule not in RULES:
        raise fail(fn, "rule", "is not a known error rule", f"one of {list(RULES)}", repr(rule))
    check_token_ids_list(fn, input_ids_list)
    layers = require_attention_layers(fn, model)
    budgets = parse_layer_budgets(layer_l1, max(layers) + 1)
    dense = sorted({int(i) for i in dense_layers})
    for i in dense:
        if i not in layers:
            raise fail(fn, "dense_layers", "has an unknown layer index", f"ints in 0..{max(layers)}", i)
    window = set(window_layers(model))  # exact bands at run time: no blocks to choose, nothing to tune
    return base, budgets, dense, [li for li in layers if li not in dense and li not in window]


def window_layers(model: torch.nn.Module) -> list[int]:
    """The model's sliding-window attention layers (Gemma-2/3, Mistral, Qwen2 with ``use_sliding_window``).

    ``patch_model`` runs them as the exact band of their window whatever the predictor, so a tuned file
    leaves them out (they are neither tuned nor dense; the file's metadata lists them as ``window_layers``).
    """
    from sparseattn.models.layers import attention_layers

    return [i for i, mod in attention_layers(model) if getattr(mod, "sliding_window", None) is not None]


def seq_len_of(input_ids_list: Any) -> int | list[int]:
    """The calibration length for the metadata: one int, or the sorted lengths when they differ."""
    lens = sorted({int(t.shape[-1]) for t in input_ids_list})
    return lens[0] if len(lens) == 1 else lens
