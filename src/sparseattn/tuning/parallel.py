"""Tune a model with its layers split across ``torch.distributed`` ranks (gloo on CPU, or NCCL hosts).

Every rank holds the same model and calibration ids, runs the model once per sample capturing only its
own layers (round-robin: layer ``l`` goes to rank ``l % world`` of the tuned layers), tunes them with
:func:`sparseattn.tuning.search.tune_layer` exactly as :func:`sparseattn.tuning.run.tune_model` does,
and the per-layer results (plain dicts of lists) are exchanged with ``all_gather_object``; every rank
returns the same :class:`TunedConfig` (the same values as the single-process run).
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import torch

from sparseattn._validation import fail
from sparseattn.predictors.mean_similarity import MeanSimilarityConfig
from sparseattn.tuning.types import HeadParams, TunedConfig

__all__ = ["tune_model_distributed"]

_F = ("sim_threshold", "cdf_threshold", "pv_threshold", "sparsity", "error")


def _to_plain(hp: HeadParams) -> dict[str, list[Any]]:
    d: dict[str, list[Any]] = {f: [float(x) for x in getattr(hp, f)] for f in _F}
    d["dense"] = [bool(x) for x in hp.dense]
    if hp.keep_local is not None:
        d["keep_local"] = [float(x) for x in hp.keep_local]
    return d


def _from_plain(d: dict[str, list[Any]]) -> HeadParams:
    kw: dict[str, torch.Tensor] = {f: torch.tensor([math.nan if x is None else x for x in d[f]], dtype=torch.float32)
                                   for f in _F}
    if d.get("keep_local") is not None:
        kw["keep_local"] = torch.tensor([math.nan if x is None else x for x in d["keep_local"]], dtype=torch.float32)
    return HeadParams(dense=torch.tensor(d["dense"], dtype=torch.bool), **kw)


def tune_model_distributed(
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
    group: Any = None,
) -> TunedConfig:
    """:func:`sparseattn.tuning.run.tune_model` with the layers split across the ranks of ``group``.

    Must be called by every rank of an initialised process group with the same arguments (``gate``: the same
    GateWeights on every rank, as for :func:`~sparseattn.tuning.run.tune_model`). Logs (the per-head lines) are
    emitted by rank 0 only, for every layer, after the gather.

    Returns:
        The same :class:`TunedConfig` on every rank (``meta["world_size"]`` added).
    """
    import torch.distributed as dist

    from sparseattn.tuning.run import (build_meta, capture_samples, gate_predictor_for, gate_search_args, log_lines,
                                       plan_tuning, seq_len_of, with_gate)
    from sparseattn.tuning.search import tune_layer

    fn = "tune_model_distributed"
    if not dist.is_available() or not dist.is_initialized():
        raise fail(fn, "group", "is not initialised", "torch.distributed.init_process_group(...) first", "no group")
    t0 = time.perf_counter()
    base, budgets, dense, todo = plan_tuning(fn, model, input_ids_list, base=base, rule=rule, layer_l1=layer_l1,
                                             dense_layers=dense_layers)
    gate_pred = gate_predictor_for(fn, gate, base, todo)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    mine = todo[rank::world]
    local: dict[int, dict[str, list[Any]]] = {}
    if mine:
        captured = capture_samples(model, list(input_ids_list), mine)
        for li in mine:
            hp = tune_layer(captured.pop(li), base=base, l1=budgets.get(li, l1), pv_l1=pv_l1, rule=rule,
                            keep_local_grid=tuple(keep_local_grid), **gate_search_args(gate_pred, li))
            local[li] = _to_plain(hp)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, local, group=group)
    out: dict[int, HeadParams] = {}
    for part in gathered:
        for li, d in part.items():
            out[int(li)] = _from_plain(d)
    out = dict(sorted(out.items()))
    emit = log if log is not None else (print if progress else None)
    if rank == 0 and emit is not None:
        for li, hp in out.items():
            for line in log_lines(li, hp):
                emit(line)
    meta = build_meta(model, base, rule=rule, l1=l1, pv_l1=pv_l1, layer_l1=layer_l1,
                      seq_len=seq_len_of(input_ids_list), samples=len(input_ids_list), dense_layers=dense,
                      seconds=time.perf_counter() - t0)
    meta["world_size"] = world
    meta["keep_local_grid"] = [int(x) for x in keep_local_grid]
    return with_gate(TunedConfig(layers=out, meta=meta), gate)
