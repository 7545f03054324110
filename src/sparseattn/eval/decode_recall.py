"""Attention-mass recall of sparse decode's page selection, against an oracle from the dense scores.

For a decode step, :func:`page_mass` is each query row's dense softmax mass per page (float64);
:func:`mass_recall` the share of it on a selection's pages (1.0: nothing lost); :func:`oracle_pages` the
best selection one KV head's group can share at a given page count (the pages with the largest mass summed
over the group's query heads and rows, the forced sink / local pages included, as
:func:`sparseattn.ops.pages.select_pages` forces them). :func:`measure_mass_recall` captures real decode
steps of a model (``patch_model(decode="sparse")`` with every page, i.e. exact dense decode, and the route's
observer) and reports, per budget, the mean and minimum recall over layers, query heads and steps for the
Quest selection and for the oracle.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from sparseattn._validation import fail

__all__ = ["page_mass", "mass_recall", "oracle_pages", "measure_mass_recall"]


def page_mass(q: torch.Tensor, k: torch.Tensor, page_size: int, *, scale: float | None = None) -> torch.Tensor:
    """Dense softmax mass per page: ``(B, H_kv, G, Lq, P)`` float64 from ``q (B, H, Lq, D)``, ``k (B, H_kv, N, D)``.

    Row ``i`` of the ``Lq`` new tokens attends keys ``j < N - Lq + i + 1`` (the decode semantics).
    """
    fn = "page_mass"
    if q.ndim != 4 or k.ndim != 4 or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1] or q.shape[1] % k.shape[1]:
        raise fail(fn, "q/k", "have incompatible shapes", "(B, H, Lq, D) and (B, H_kv, N, D) with H % H_kv == 0",
                   f"{tuple(q.shape)} and {tuple(k.shape)}")
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size <= 0:
        raise fail(fn, "page_size", "must be a positive integer", "an int > 0", repr(page_size))
    B, H, Lq, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    G = H // Hkv
    sc = D ** -0.5 if scale is None else float(scale)
    qg = q.double().reshape(B, Hkv, G * Lq, D)
    s = sc * qg @ k.double().transpose(-1, -2)  # (B, Hkv, G*Lq, N)
    row = torch.arange(G * Lq, device=q.device) % Lq
    lim = N - Lq + row + 1
    s = s.masked_fill(torch.arange(N, device=q.device)[None, :] >= lim[:, None], -math.inf)
    p = torch.softmax(s, -1)
    P = -(-N // page_size)
    p = torch.nn.functional.pad(p, (0, P * page_size - N))
    return p.view(B, Hkv, G, Lq, P, page_size).sum(-1)


def mass_recall(mass: torch.Tensor, page_indices: torch.Tensor, page_counts: torch.Tensor) -> torch.Tensor:
    """Share of each row's mass ``(B, H_kv, G, Lq, P)`` on the first ``page_counts`` of ``page_indices`` ``(B, H_kv, K)``.

    Returns ``(B, H_kv, G, Lq)`` float64.
    """
    B, Hkv, G, Lq, P = mass.shape
    K = page_indices.shape[-1]
    live = torch.arange(K, device=mass.device)[None, None, :] < page_counts.to(mass.device)[..., None]
    sel = torch.zeros((B, Hkv, P + 1), dtype=mass.dtype, device=mass.device)
    idx = torch.where(live, page_indices.to(mass.device).long(), torch.full_like(page_indices, P, dtype=torch.long))
    sel.scatter_(2, idx, 1.0)
    return (mass * sel[:, :, None, None, :P]).sum(-1)


def oracle_pages(mass: torch.Tensor, k_pages: int, *, keep_first: int = 1, keep_last: int = 1
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k_pages`` pages per ``(b, KV head)`` with the most mass summed over the group's rows (forced pages first).

    Returns ``(page_indices (B, H_kv, K) int64, page_counts (B, H_kv) int64)`` like ``select_pages``.
    """
    B, Hkv, G, Lq, P = mass.shape
    K = max(1, min(P, int(k_pages)))
    score = mass.sum((2, 3)).clone()
    ids = torch.arange(P, device=mass.device)
    score[:, :, (ids < keep_first) | (ids >= P - keep_last)] = math.inf
    idx = score.topk(K, -1).indices
    return idx, torch.full((B, Hkv), K, dtype=torch.long, device=mass.device)


@torch.no_grad()
def measure_mass_recall(model: Any, ids: torch.Tensor, *, steps: Sequence[int] = (1, 8, 24),
                        budgets: Sequence[int | float] = (0.1, 0.25, 0.5), page_size: int = 16,
                        backend: str = "auto") -> list[dict[str, Any]]:
    """Mass recall of Quest's selection and of the oracle on real decode steps of ``model`` after ``ids (1, N)``.

    Generates ``max(steps) + 1`` greedy tokens with ``patch_model(decode="sparse", decode_top_pages=1.0)``
    (every page: exact dense decode) and captures, at decode steps ``steps`` (1 = the first step after the
    prefill), every layer's query and keys. For each budget (as ``top_pages``: an int of pages or a fraction)
    it runs :func:`sparseattn.ops.pages.select_pages` (``keep_first=1, keep_last=1``, the route's choice)
    and :func:`oracle_pages` at the same page count.

    Returns:
        One dict per budget: ``budget``, ``pages`` (mean selected pages), ``quest_recall`` / ``oracle_recall``
        (mean over steps, layers and query heads), ``quest_min`` / ``oracle_min`` (the worst (step, layer,
        head)), and ``quest_by_layer`` / ``oracle_by_layer`` (mean per layer).
    """
    from sparseattn.eval.gen_check import _dynamic_cache, greedy_generate
    from sparseattn.integrations import patch_model
    from sparseattn.ops.pages import page_summaries, select_pages

    fn = "measure_mass_recall"
    steps = sorted({int(s) for s in steps})
    if not steps or steps[0] < 1:
        raise fail(fn, "steps", "must be decode steps >= 1", "e.g. (1, 8, 24)", repr(steps))
    caps: list[dict[str, Any]] = []
    first_serial: list[int] = []

    def observe(ev: dict[str, Any]) -> None:
        if not first_serial:
            first_serial.append(ev["forward"])
        step = ev["forward"] - first_serial[0] + 1
        if step in steps:
            caps.append(dict(step=step, layer=ev["layer"], q=ev["query"].detach().clone(), k=ev["key"].detach().clone(),
                             scale=ev["scale"]))

    with patch_model(model, decode="sparse", decode_top_pages=1.0, decode_page_size=page_size,
                     decode_backend=backend) as handle:
        handle.decode_route.observer = observe
        greedy_generate(model, ids, max(steps) + 1, _dynamic_cache(model))
    out = []
    for b in budgets:
        rec_q: dict[int, list[torch.Tensor]] = {}
        rec_o: dict[int, list[torch.Tensor]] = {}
        pages = []
        for c in caps:
            mass = page_mass(c["q"], c["k"], page_size, scale=c["scale"])
            pidx, pnum = select_pages(c["q"], page_summaries(c["k"], page_size), top_pages=b, keep_first=1,
                                      keep_last=1, backend=backend)
            rq = mass_recall(mass, pidx, pnum)
            oidx, onum = oracle_pages(mass, int(pnum.max()), keep_first=1, keep_last=1)
            ro = mass_recall(mass, oidx, onum)
            rec_q.setdefault(c["layer"], []).append(rq.flatten().cpu())
            rec_o.setdefault(c["layer"], []).append(ro.flatten().cpu())
            pages.append(float(pnum.double().mean()))
        allq = torch.cat([x for v in rec_q.values() for x in v])
        allo = torch.cat([x for v in rec_o.values() for x in v])
        out.append({"budget": b, "pages": sum(pages) / max(1, len(pages)), "steps": steps,
                    "quest_recall": float(allq.mean()), "quest_min": float(allq.min()),
                    "oracle_recall": float(allo.mean()), "oracle_min": float(allo.min()),
                    "quest_by_layer": {k: float(torch.cat(v).mean()) for k, v in sorted(rec_q.items())},
                    "oracle_by_layer": {k: float(torch.cat(v).mean()) for k, v in sorted(rec_o.items())}})
    return out
