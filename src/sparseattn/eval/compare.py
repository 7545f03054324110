"""Compare two block predictors (or one against the oracle) on the same Q/K(/V).

For every input (one layer of one sequence length) both predictors build a layout and the exact
block attention mass is computed blockwise (:func:`sparseattn.predictors.oracle.exact_block_mass`).
Metrics per input, all over the causal block region when ``causal``:

* ``sparsity_a`` / ``sparsity_b`` — ``1 − density`` (selected / available blocks).
* ``overlap_a_in_b`` — share of A's selected blocks that B also selects (``|A∩B| / |A|``);
  ``overlap_b_in_a`` likewise; ``jaccard`` — ``|A∩B| / |A∪B|``.
* ``recall_a`` / ``recall_b`` — attention-mass recall: the share of the exact attention mass that
  falls inside the selected blocks, ``Σ mass·mask / Σ mass`` (every query-block row of ``mass``
  sums to 1, so rows weigh equally). 1.0 means nothing the dense attention uses was dropped.
* ``score_corr`` — Pearson correlation of the two predictors' block scores (``last_scores``) over
  the allowed blocks, per (batch, head) then averaged; ``score_corr_a_mass`` / ``score_corr_b_mass``
  — each predictor's scores against the exact mass. ``None`` for a predictor without scores
  (``static``).
* with ``v``: ``out_cosine_a`` / ``out_cosine_b`` — cosine of the sparse attention output against
  dense attention (reference backend).

``b="oracle"`` means the oracle at A's budget: per (batch, head), the same *number* of blocks as A
selected, chosen as the blocks of largest exact mass over the whole causal region (a global top-K,
not a per-row fraction). Since recall is a sum of block masses, this is the highest recall any
layout with A's block count per head can reach — the upper bound A is measured against.

Results: :func:`compare_predictors` returns a JSON-able dict (``records`` + ``summary``);
:func:`write_report` writes ``compare.json``, ``compare.md`` and side-by-side mask PNGs.

Sweep (:func:`sweep_predictors`): several predictor families (mean_sim, sketch_walk, the learned
gate, ...) each at several budgets (:func:`budget_specs` fills ``{budget}`` in a spec template),
every point against the oracle at its own block budget; the oracle's points form the frontier, and
every family is interpolated at matched sparsities. :func:`write_sweep_report` writes
``sweep.json``, ``sweep.md`` and ``sweep.png`` (mass recall and output cosine vs sparsity, a curve
per family plus the oracle frontier).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from sparseattn._validation import fail
from sparseattn.eval.metrics import cosine_similarity
from sparseattn.predictors._common import causal_region
from sparseattn.predictors.base import config_to_json
from sparseattn.predictors.oracle import exact_block_mass

__all__ = ["compare_predictors", "compare_layouts", "oracle_at_budget", "random_inputs", "safetensors_inputs", "write_report", "resolve",
           "budget_specs", "sweep_predictors", "sweep_markdown", "plot_sweep", "write_sweep_report", "SWEEP_TEMPLATES",
           "SWEEP_BUDGETS"]


def resolve(spec_or_predictor: Any) -> Any:
    """A predictor object, or a spec (``"mean_sim:cdf_threshold=0.9"``, see
    :func:`sparseattn.predictors.resolve.resolve_predictor`) resolved into one."""
    from sparseattn.predictors.resolve import resolve_predictor

    if isinstance(spec_or_predictor, (str, dict)):
        return resolve_predictor(spec_or_predictor, func="compare_predictors")
    if not hasattr(spec_or_predictor, "predict"):
        raise fail("compare_predictors", "predictor", "must be a spec string or a predictor", "'name:key=value' or object",
                   type(spec_or_predictor).__name__)
    return spec_or_predictor


def _spec_of(pred: Any) -> str:
    cfg = getattr(pred, "config", None)
    try:
        fields = json.loads(config_to_json(cfg))
    except (ValueError, TypeError):
        return getattr(pred, "name", type(pred).__name__)
    fields.pop("type", None)
    fields.pop("version", None)
    return f"{getattr(pred, 'name', '?')}:" + ",".join(f"{k}={v}" for k, v in sorted(fields.items()))


def _pearson(a: torch.Tensor, b: torch.Tensor, allowed: torch.Tensor) -> float | None:
    """Mean over leading dims of the Pearson correlation of ``a`` and ``b`` restricted to ``allowed``."""
    a = a.to(torch.float64)
    b = b.to(torch.float64)
    w = allowed.to(torch.float64).expand_as(a)
    n = w.sum((-1, -2)).clamp_min(1.0)
    ma = (a * w).sum((-1, -2)) / n
    mb = (b * w).sum((-1, -2)) / n
    da = (a - ma[..., None, None]) * w
    db = (b - mb[..., None, None]) * w
    cov = (da * db).sum((-1, -2))
    den = torch.sqrt((da * da).sum((-1, -2)) * (db * db).sum((-1, -2)))
    ok = den > 0
    if not bool(ok.any()):
        return None
    return float((cov[ok] / den[ok]).mean())


def compare_layouts(layout_a: Any, layout_b: Any, mass: torch.Tensor, *, causal: bool = True,
                    scores_a: torch.Tensor | None = None, scores_b: torch.Tensor | None = None) -> dict[str, Any]:
    """Metrics of two layouts of the same geometry against the exact block mass (see module docstring).

    Shapes:
        layouts ``[B, H, Mb, Nb]`` (as masks); mass float ``[B, H, Mb, Nb]``; scores broadcastable to it.
    """
    geo_a = (layout_a.block_m, layout_a.block_n, layout_a.seqlen_q, layout_a.seqlen_kv)
    geo_b = (layout_b.block_m, layout_b.block_n, layout_b.seqlen_q, layout_b.seqlen_kv)
    if geo_a != geo_b:
        raise fail("compare_layouts", "layout_b", "has another geometry than layout_a (block sizes must match)",
                   f"(block_m, block_n, seqlen_q, seqlen_kv)={geo_a}", geo_b)
    region = causal_region(layout_a.seqlen_q, layout_a.seqlen_kv, layout_a.block_m, layout_a.block_n, causal,
                           layout_a.device)
    ma = layout_a.to_dense_mask() & region
    mb = layout_b.to_dense_mask() & region
    inter = float((ma & mb).sum())
    union = float((ma | mb).sum())
    na, nb = float(ma.sum()), float(mb.sum())
    total = float(mass.sum())
    m64 = mass.to(torch.float64)
    rec: dict[str, Any] = {
        "density_a": layout_a.density(causal=causal),
        "density_b": layout_b.density(causal=causal),
        "overlap_a_in_b": inter / na if na else None,
        "overlap_b_in_a": inter / nb if nb else None,
        "jaccard": inter / union if union else 1.0,
        "recall_a": float((m64 * ma).sum()) / total if total > 0 else None,
        "recall_b": float((m64 * mb).sum()) / total if total > 0 else None,
    }
    rec["sparsity_a"] = 1.0 - rec["density_a"]
    rec["sparsity_b"] = 1.0 - rec["density_b"]
    rec["score_corr"] = _pearson(scores_a.expand_as(mass), scores_b.expand_as(mass), region) \
        if scores_a is not None and scores_b is not None else None
    rec["score_corr_a_mass"] = _pearson(scores_a.expand_as(mass), mass, region) if scores_a is not None else None
    rec["score_corr_b_mass"] = _pearson(scores_b.expand_as(mass), mass, region) if scores_b is not None else None
    return rec


def oracle_at_budget(mass: torch.Tensor, layout_a: Any, *, causal: bool = True) -> Any:
    """The exact-mass upper bound at ``layout_a``'s budget: per (batch, head) the same number of blocks,
    those of largest exact mass in the allowed region (global top-K). Returns a BlockLayout.

    Shapes:
        mass ``[B, H, Mb, Nb]`` (from :func:`exact_block_mass` at the layout's block sizes).
    """
    from sparseattn.predictors._common import mask_to_layout

    region = causal_region(layout_a.seqlen_q, layout_a.seqlen_kv, layout_a.block_m, layout_a.block_n, causal,
                           mass.device)
    B, H, Mb, Nb = mass.shape
    budget = (layout_a.to_dense_mask() & region).sum((-1, -2)).reshape(B, H, 1)
    flat = mass.masked_fill(~region, -1.0).reshape(B, H, Mb * Nb)
    order = torch.sort(flat, dim=-1, descending=True, stable=True).indices
    keep = (torch.arange(Mb * Nb, device=mass.device) < budget).to(torch.uint8)
    sel = torch.zeros_like(flat, dtype=torch.uint8).scatter_(-1, order, keep).bool().reshape(B, H, Mb, Nb) & region
    return mask_to_layout(sel, block_m=layout_a.block_m, block_n=layout_a.block_n, seqlen_q=layout_a.seqlen_q,
                          seqlen_kv=layout_a.seqlen_kv)


def random_inputs(lengths: Iterable[int], *, layers: int = 2, heads: int = 8, kv_heads: int = 2, head_dim: int = 64,
                  kind: str = "structured", seed: int = 0, dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu") -> Iterator[dict[str, Any]]:
    """Seeded synthetic inputs: ``layers`` different draws per length (``kind``: ``random`` or ``structured``)."""
    from sparseattn.testing.inputs import make_qkv

    for n in lengths:
        for layer in range(layers):
            q, k, v = make_qkv(kind, 1, heads, n, head_dim, kv_heads=kv_heads, seed=seed + 1000 * layer + n,
                               dtype=dtype, device=device)
            yield {"layer": layer, "length": n, "q": q, "k": k, "v": v}


def safetensors_inputs(path: str | Path, *, device: str | torch.device = "cpu") -> Iterator[dict[str, Any]]:
    """Q/K/V captured by ``sparseattn collect``: a ``.safetensors`` file, a folder of them, a ``len<N>``
    folder or a whole collection folder (its ``len<N>/*.safetensors``, by length).

    Tensors are matched by name: ``...q``/``...k``/``...v`` (or ``query``/``key``/``value``) with a layer
    number in the name (``layer3.q``, ``layers.3.k``, ``3.v`` …); shapes ``(B, H, N, D)``. A
    ``sample<i>.json`` beside a file is checked too.

    Raises:
        ValueError: a missing path, a folder without ``.safetensors``, a file that is not readable
            safetensors (empty, truncated, corrupt), a file without any Q/K pair, a layer with only
            some of its tensors, or tensors of the wrong rank, dtype or shape; the message names
            the file.
    """
    import re

    from sparseattn.errors import load_safetensors_file
    from sparseattn.eval.collect import check_qkv_group, collected_files, read_sample_meta

    fn = "safetensors_inputs"
    files = collected_files(fn, path)
    root = Path(path)
    role_of = {"q": "q", "query": "q", "k": "k", "key": "k", "v": "v", "value": "v"}
    for f in files:
        meta_path = f.with_suffix(".json")
        meta = read_sample_meta(fn, meta_path) if meta_path.exists() else None
        tensors = load_safetensors_file(fn, f, "tensor file", device=str(device),
                                        expected="a .safetensors file of Q/K/V tensors (e.g. from sparseattn collect)")
        groups: dict[int, dict[str, torch.Tensor]] = {}
        for name, t in tensors.items():
            parts = re.split(r"[._/]", name)
            role = next((role_of[x.lower()] for x in reversed(parts) if x.lower() in role_of), None)
            nums = [int(x) for x in re.findall(r"\d+", name)]
            if role is None or not nums:
                continue
            groups.setdefault(nums[0], {})[role] = t
        if not groups:
            raise fail(fn, f"tensor file {f}", "holds no Q/K tensors", "tensors named like layer<L>.q, layer<L>.k (.v)",
                       f"tensors {sorted(tensors)[:6]}{'...' if len(tensors) > 6 else ''}")
        source = str(f.relative_to(root)) if root.is_dir() and f.parent != root else f.stem
        source = source[:-len(".safetensors")] if source.endswith(".safetensors") else source
        for layer, g in sorted(groups.items()):
            if "q" not in g or "k" not in g:
                raise fail(fn, f"tensor file {f}", f"has layer {layer} without both q and k", f"layer{layer}.q and layer{layer}.k",
                           f"only {'/'.join(sorted(g))}")
            check_qkv_group(fn, f, layer, g["q"], g["k"], g.get("v"), meta)
            yield {"layer": layer, "length": int(g["q"].shape[2]), "q": g["q"], "k": g["k"], "v": g.get("v"),
                   "source": source}


def compare_predictors(a: Any, b: Any, inputs: Iterable[dict[str, Any]], *, causal: bool = True,
                       with_output: bool = True, keep_masks: int = 4,
                       cache: dict[Any, torch.Tensor] | None = None) -> dict[str, Any]:
    """Run both predictors on every input and measure them (see module docstring).

    Args:
        a: predictor or spec string.
        b: predictor, spec string, or ``"oracle"`` (the oracle at A's density).
        inputs: dicts with ``layer``, ``length``, ``q``, ``k`` and optionally ``v`` (e.g. from
            :func:`random_inputs` or :func:`safetensors_inputs`), in layer order per sequence.
        causal: bottom-right aligned causal attention.
        with_output: with ``v``, also compare each sparse output with dense attention.
        keep_masks: keep the block masks (head 0) of the first ``keep_masks`` inputs for plots.
        cache: a dict reused across calls on the same input objects (e.g. by :func:`sweep_predictors`):
            the exact block mass and the dense output of each input are computed once.

    Returns:
        ``{"a": spec, "b": spec, "causal": bool, "records": [...], "summary": {...}, "masks": [...]}``;
        ``masks`` holds tensors (dropped by :func:`write_report` from the JSON).
    """
    pa = resolve(a)
    density_matched = isinstance(b, str) and b.strip() == "oracle"
    pb = None if density_matched else resolve(b)
    records: list[dict[str, Any]] = []
    masks: list[dict[str, Any]] = []
    last_len: int | None = None
    for item in inputs:
        q, k, v = item["q"], item["k"], item.get("v")
        layer, n = int(item["layer"]), int(item["length"])
        if last_len != n or (records and layer <= records[-1]["layer"]):
            pa.reset()
            if pb is not None:
                pb.reset()
        last_len = n
        lay_a = pa.predict(q, k, causal=causal, layer=layer)
        mkey = ("mass", id(q), id(k), causal, lay_a.block_m, lay_a.block_n)
        mass = None if cache is None else cache.get(mkey)
        if mass is None:
            mass = exact_block_mass(q, k, causal=causal, block_m=lay_a.block_m, block_n=lay_a.block_n)
            if cache is not None:
                cache[mkey] = mass
        if density_matched:
            pb_now = None
            lay_b = oracle_at_budget(mass, lay_a, causal=causal)
        else:
            pb_now = pb
            lay_b = pb_now.predict(q, k, causal=causal, layer=layer)
        rec = {"layer": layer, "length": n, **({"source": item["source"]} if "source" in item else {})}
        rec.update(compare_layouts(lay_a, lay_b, mass, causal=causal, scores_a=getattr(pa, "last_scores", None),
                                   scores_b=mass if pb_now is None else getattr(pb_now, "last_scores", None)))
        if with_output and v is not None:
            from sparseattn.ops.attention import attention

            dkey = ("dense", id(q), id(k), id(v), causal)
            dense = None if cache is None else cache.get(dkey)
            if dense is None:
                dense = attention(q, k, v, causal=causal, backend="reference").out
                if cache is not None:
                    cache[dkey] = dense
            for tag, lay, pred in (("a", lay_a, pa), ("b", lay_b, pb_now or pa)):
                pv = getattr(getattr(pred, "config", None), "pv_threshold", None)
                out = attention(q, k, v, causal=causal, layout=lay, backend="reference", pv_threshold=pv).out
                rec[f"out_cosine_{tag}"] = cosine_similarity(out, dense)
        records.append(rec)
        if len(masks) < keep_masks:
            masks.append({"layer": layer, "length": n, "a": lay_a.to_dense_mask()[0, 0].cpu(),
                          "b": lay_b.to_dense_mask()[0, 0].cpu(), "mass": mass[0, 0].cpu()})
    return {"a": _spec_of(pa), "b": "oracle (A's block budget per head)" if density_matched else _spec_of(pb),
            "causal": causal, "records": records, "summary": summarize(records), "masks": masks}


_KEYS = ("sparsity_a", "sparsity_b", "overlap_a_in_b", "jaccard", "recall_a", "recall_b", "score_corr",
         "score_corr_a_mass", "score_corr_b_mass", "out_cosine_a", "out_cosine_b")


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Means of every metric per length and overall (``None`` entries skipped)."""

    def mean(rows: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {"inputs": len(rows)}
        for key in _KEYS:
            vals = [r[key] for r in rows if r.get(key) is not None and not (isinstance(r[key], float) and math.isnan(r[key]))]
            out[key] = sum(vals) / len(vals) if vals else None
        return out

    by_len: dict[str, Any] = {}
    for n in sorted({r["length"] for r in records}):
        by_len[str(n)] = mean([r for r in records if r["length"] == n])
    return {"overall": mean(records), "per_length": by_len}


def _fmt(x: Any) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.4f}"
    return str(x)


def to_markdown(result: dict[str, Any]) -> str:
    """Markdown report: the two specs, a per-length summary, and per-(length, layer) rows."""
    lines = ["# Predictor comparison", "", f"- A: `{result['a']}`", f"- B: `{result['b']}`",
             f"- causal: {result['causal']}", "",
             "Recall = share of the exact attention mass inside the selected blocks; overlap = |A∩B|/|A|.", ""]
    cols = ["length", "layer", "sparsity_a", "sparsity_b", "jaccard", "overlap_a_in_b", "recall_a", "recall_b",
            "score_corr", "out_cosine_a", "out_cosine_b"]
    lines += ["## Per length", "", "| " + " | ".join(["length", "inputs"] + cols[2:]) + " |",
              "|" + "---|" * (len(cols)) ]
    for n, row in result["summary"]["per_length"].items():
        lines.append("| " + " | ".join([n, str(row["inputs"])] + [_fmt(row.get(c)) for c in cols[2:]]) + " |")
    lines += ["", "## Per layer", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in result["records"]:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def write_report(result: dict[str, Any], out_dir: str | Path, *, plots: bool = True, device: Any = None) -> dict[str, str]:
    """Write ``compare.json``, ``compare.md`` and ``masks_<length>_L<layer>.png`` files; returns their paths.

    ``compare.json`` carries the run's ``environment`` record (:func:`sparseattn.eval.env.environment`
    of ``device``, the device the inputs were on)."""
    from sparseattn.eval.env import environment

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, str] = {}
    data = {k: v for k, v in result.items() if k != "masks"}
    data.setdefault("environment", environment(device))
    (out / "compare.json").write_text(json.dumps(data, indent=2))
    paths["json"] = str(out / "compare.json")
    (out / "compare.md").write_text(to_markdown(result))
    paths["markdown"] = str(out / "compare.md")
    if plots and result.get("masks"):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        for i, m in enumerate(result["masks"]):
            fig, axes = plt.subplots(1, 3, figsize=(12, 4.2))
            mass = m["mass"].to(torch.float64).clamp_min(1e-8).log10()
            for ax, img, title, cmap in ((axes[0], m["a"], f"A: {result['a'][:48]}", "Blues"),
                                         (axes[1], m["b"], f"B: {result['b'][:48]}", "Oranges"),
                                         (axes[2], mass, "exact block mass (log10)", "viridis")):
                ax.imshow(img.to(torch.float32).numpy(), cmap=cmap, interpolation="nearest")
                ax.set_title(title, fontsize=8)
                ax.set_xlabel("key block")
                ax.set_ylabel("query block")
            fig.suptitle(f"length {m['length']}, layer {m['layer']}, batch 0, head 0")
            fig.tight_layout()
            name = f"masks_{m['length']}_L{m['layer']}_{i}.png"
            fig.savefig(out / name, dpi=90)
            plt.close(fig)
            paths[f"png{i}"] = str(out / name)
    return paths


# --------------------------------------------------------------------------- sweep: every predictor at matched budgets
#: default budget templates of :func:`sweep_predictors` (``{budget}``: the kept fraction of the allowed blocks per row)
SWEEP_TEMPLATES = {
    "mean_sim": "mean_sim:topk={budget},cdf_threshold=None,sim_threshold=-1,keep_local=1",
    "sketch_walk": "sketch_walk:top_fraction={budget},dense_layers=0",
}
SWEEP_BUDGETS = (0.05, 0.1, 0.2, 0.3, 0.5)
_SWEEP_METRICS = ("recall_a", "jaccard", "score_corr_a_mass", "out_cosine_a")


def budget_specs(templates: dict[str, str], budgets: Iterable[float]) -> dict[str, list[str]]:
    """``{family: template with {budget}}`` × budgets → ``{family: [spec, ...]}`` (a template without
    ``{budget}`` is one fixed point)."""
    out: dict[str, list[str]] = {}
    for fam, tpl in templates.items():
        if not isinstance(tpl, str) or not tpl.strip():
            raise fail("budget_specs", f"template of {fam!r}", "must be a non-empty spec string",
                       "e.g. 'mean_sim:topk={budget},cdf_threshold=None'", repr(tpl))
        out[fam] = [tpl.replace("{budget}", f"{float(b):g}") for b in budgets] if "{budget}" in tpl else [tpl]
    return out


def _interp(points: list[tuple[float, float]], x: float) -> float | None:
    """Linear interpolation of ``y(x)`` over points sorted by x; None outside their range."""
    pts = sorted(p for p in points if p[0] is not None and p[1] is not None)
    if not pts or x < pts[0][0] - 1e-12 or x > pts[-1][0] + 1e-12:
        return None
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return pts[0][1]


def sweep_predictors(specs: dict[str, list[str]], inputs: Iterable[dict[str, Any]], *, causal: bool = True,
                     with_output: bool = True, matched: Iterable[float] | None = None,
                     progress: bool = False) -> dict[str, Any]:
    """Every predictor spec against the oracle at its own block budget, on the same inputs.

    Each spec runs through :func:`compare_predictors` with ``b="oracle"`` (so per layer and length:
    sparsity, Jaccard / overlap with the oracle's blocks at the same budget, correlation of the
    predictor's block scores with the exact mass, attention-mass recall and output cosine; the
    exact mass and dense output of each input are computed once). The oracle's own recall and output
    cosine at each point give the **oracle frontier** (the best any predictor can do at that sparsity).

    Args:
        specs: ``{family: [spec, ...]}`` (e.g. from :func:`budget_specs`); families are plotted as curves.
        inputs: as for :func:`compare_predictors`; materialised once (they are reused by every spec).
        matched: sparsities at which every family's metrics are interpolated (default: 0.5, 0.7, 0.8, 0.9).

    Returns:
        ``{"causal", "points": [...], "frontier": [...], "matched": {...}, "lengths": [...]}``; each point
        ``{family, spec, sparsity, recall, jaccard, score_corr_mass, out_cosine, oracle_recall,
        oracle_out_cosine, per_length, records}``.
    """
    items = list(inputs)
    if not items:
        raise fail("sweep_predictors", "inputs", "is empty", "at least one {layer, length, q, k} input", "nothing")
    cache: dict[Any, torch.Tensor] = {}
    points: list[dict[str, Any]] = []
    for fam, fam_specs in specs.items():
        for spec in fam_specs:
            if progress:
                import sys

                print(f"[compare] {fam}: {spec}", file=sys.stderr, flush=True)
            res = compare_predictors(spec, "oracle", items, causal=causal, with_output=with_output, keep_masks=0,
                                     cache=cache)
            o = res["summary"]["overall"]
            points.append({
                "family": fam, "spec": spec, "resolved": res["a"], "sparsity": o["sparsity_a"], "recall": o["recall_a"],
                "jaccard": o["jaccard"], "overlap": o["overlap_a_in_b"], "score_corr_mass": o["score_corr_a_mass"],
                "out_cosine": o["out_cosine_a"], "oracle_recall": o["recall_b"], "oracle_out_cosine": o["out_cosine_b"],
                "per_length": res["summary"]["per_length"], "records": res["records"]})
    frontier = sorted(({"sparsity": p["sparsity"], "recall": p["oracle_recall"], "out_cosine": p["oracle_out_cosine"],
                        "from": p["spec"]} for p in points if p["sparsity"] is not None),
                      key=lambda r: r["sparsity"])
    targets = list(matched) if matched is not None else [0.5, 0.7, 0.8, 0.9]
    fams = list(specs) + ["oracle"]
    table: dict[str, dict[str, dict[str, float | None]]] = {}
    for t in targets:
        row: dict[str, dict[str, float | None]] = {}
        for fam in fams:
            if fam == "oracle":
                src = [(r["sparsity"], r) for r in frontier]
                row[fam] = {m: _interp([(x, r[m]) for x, r in src], t) for m in ("recall", "out_cosine")}
            else:
                pts = [p for p in points if p["family"] == fam]
                row[fam] = {m: _interp([(p["sparsity"], p[m]) for p in pts], t)
                            for m in ("recall", "jaccard", "score_corr_mass", "out_cosine")}
        table[f"{t:g}"] = row
    return {"causal": causal, "points": points, "frontier": frontier, "matched": table,
            "lengths": sorted({int(it["length"]) for it in items}), "inputs": len(items)}


def sweep_markdown(result: dict[str, Any]) -> str:
    """Markdown: every point, then the families interpolated at matched sparsities."""
    lines = ["# Predictors at matched sparsity budgets", "",
             f"Inputs: {result['inputs']} (lengths {result['lengths']}), causal {result['causal']}. Each point is one "
             "spec; the oracle is the exact-mass top-K at that spec's own block budget per head (the frontier).", "",
             "| family | spec | sparsity | mass recall | oracle recall | Jaccard vs oracle | score corr (mass) "
             "| out cosine | oracle out cosine |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for p in sorted(result["points"], key=lambda p: (p["family"], p["sparsity"] or 0)):
        lines.append(f"| {p['family']} | `{p['spec'][:70]}` | {_fmt(p['sparsity'])} | {_fmt(p['recall'])} | "
                     f"{_fmt(p['oracle_recall'])} | {_fmt(p['jaccard'])} | {_fmt(p['score_corr_mass'])} | "
                     f"{_fmt(p['out_cosine'])} | {_fmt(p['oracle_out_cosine'])} |")
    lines += ["", "## Interpolated at matched sparsity", "",
              "Linear interpolation between each family's points; – where the sparsity lies outside its range.", "",
              "| sparsity | family | mass recall | Jaccard vs oracle | score corr (mass) | out cosine |",
              "|---:|---|---:|---:|---:|---:|"]
    for t, row in result["matched"].items():
        for fam, m in row.items():
            lines.append(f"| {t} | {fam} | {_fmt(m.get('recall'))} | {_fmt(m.get('jaccard'))} | "
                         f"{_fmt(m.get('score_corr_mass'))} | {_fmt(m.get('out_cosine'))} |")
    lines += ["", "## Per length", "", "| family | spec | length | sparsity | recall | Jaccard | out cosine |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for p in result["points"]:
        for n, r in p["per_length"].items():
            lines.append(f"| {p['family']} | `{p['spec'][:50]}` | {n} | {_fmt(r['sparsity_a'])} | {_fmt(r['recall_a'])} "
                         f"| {_fmt(r['jaccard'])} | {_fmt(r['out_cosine_a'])} |")
    return "\n".join(lines) + "\n"


def plot_sweep(result: dict[str, Any], path: str | Path, *, title: str = "") -> Path:
    """One PNG: mass recall and output cosine vs block sparsity, a curve per family plus the oracle frontier."""
    from sparseattn.eval.plots import _plt

    plt = _plt()
    has_out = any(p["out_cosine"] is not None for p in result["points"])
    panels = [("recall", "attention-mass recall")] + ([("out_cosine", "attention output cosine vs dense")] if has_out else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.4), squeeze=False)
    fams = list(dict.fromkeys(p["family"] for p in result["points"]))
    markers = dict(zip(fams, "osD^vP*X<>"))
    for ax, (metric, label) in zip(axes[0], panels):
        for fam in fams:
            pts = sorted((p["sparsity"], p[metric]) for p in result["points"]
                         if p["family"] == fam and p["sparsity"] is not None and p[metric] is not None)
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker=markers[fam], label=fam)
        fr = [(r["sparsity"], r[metric]) for r in result["frontier"] if r[metric] is not None]
        if fr:
            ax.plot([x for x, _ in fr], [y for _, y in fr], color="black", ls="--", lw=1.0, marker=".",
                    label="oracle frontier")
        ax.set_xlabel("block sparsity (1 - selected / causal blocks)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title or f"predictors vs the oracle, lengths {result['lengths']}", fontsize=10)
    fig.tight_layout()
    p = Path(path)
    fig.savefig(p, dpi=100)
    plt.close(fig)
    return p


def write_sweep_report(result: dict[str, Any], out_dir: str | Path, *, plots: bool = True, title: str = "",
                       device: Any = None) -> dict[str, str]:
    """Write ``sweep.json`` (with the ``environment`` record of ``device``), ``sweep.md`` and ``sweep.png``
    (accuracy vs sparsity); returns their paths."""
    from sparseattn.eval.env import environment

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": str(out / "sweep.json"), "markdown": str(out / "sweep.md")}
    data = {"environment": environment(device), **result}
    (out / "sweep.json").write_text(json.dumps(data, indent=2, default=str))
    (out / "sweep.md").write_text(sweep_markdown(result))
    if plots:
        paths["png"] = str(plot_sweep(result, out / "sweep.png", title=title))
    return paths
