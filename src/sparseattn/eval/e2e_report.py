"""The report of :func:`sparseattn.eval.end_to_end.evaluate`: the printed table, ``eval.md``, ``eval.json`` and
the plots (:func:`write_report`); ``EvalResult.table`` / ``to_markdown`` render through here."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from sparseattn.eval.end_to_end import EvalResult

__all__ = ["write_report", "table", "markdown"]


# --------------------------------------------------------------------------- reports
_LABELS = {
    "logits_cosine": ("logits cosine", "{:.6f}"),
    "logits_rel_l1": ("logits rel. L1", "{:.4g}"),
    "top1_agreement": ("top-1 agreement", "{:.2%}"),
    "top5_overlap": ("top-5 overlap", "{:.2%}"),
    "kl_dense_sparse": ("KL(dense‖sparse) nats", "{:.4g}"),
    "gen_prefix_len": ("greedy identical prefix (tokens)", "{:.2f}"),
    "gen_prefix_fraction": ("greedy identical prefix (fraction)", "{:.2%}"),
}


def _fmt_ms(stat: dict[str, float] | None, key: str) -> str:
    if not stat:
        return "-"
    f = _LABELS[key][1]
    return f"{f.format(stat['mean'])} ± {f.format(stat['std'])}"


def table(res: "EvalResult") -> str:
    c = res.config
    lines = [f"sparseattn eval: {c['model']} | {c['seq_len']} tokens x {c['samples']} samples | "
             f"scored last {c['score_last']} positions | {c['gen_tokens']} greedy tokens",
             f"sparse config: {c['predictor_spec'] or c['pattern'] or _tuned_label(c) or c['predictor']['name']}"
             f"{' + ' + c['quant'] + ' ' + c['quant_granularity'] if c.get('quant') else ''} | "
             f"mean density (sparse layers) {_f(c['mean_density_sparse_layers'], '{:.3f}')} | "
             f"text: {c['text_source']}"]
    w = max(len(v[0]) for v in _LABELS.values())
    lines.append(f"{'metric':<{w}}  {'sparse vs dense (mean ± std)':<34}  {'dense vs dense (self-check)':<30}")
    for key in _LABELS:
        if key not in res.summary:
            continue
        sc = _fmt_ms(res.self_check.get(key), key) if res.self_check else "-"
        lines.append(f"{_LABELS[key][0]:<{w}}  {_fmt_ms(res.summary[key], key):<34}  {sc:<30}")
    t = res.timings
    st = t.get("steady_prefill")
    lines.append((f"prefill (steady state: {st['method']}): dense {st['dense_s']:.3f} s, sparse {st['sparse_s']:.3f} s, "
                  f"dense/sparse {st['ratio']:.2f}x" if st else "prefill timing: skipped (timing_repeats=0)")
                 + (f" | peak mem dense {_f(t['dense_peak_mem_bytes'], '{:.3e}')} B, sparse {_f(t['sparse_peak_mem_bytes'], '{:.3e}')} B"
                    if t.get("dense_peak_mem_bytes") else ""))
    if res.random_comparison:
        rc = res.random_comparison
        lines.append(f"real vs random Q/K: density {rc['mean_real_density']['mean']:.3f} (real) vs "
                     f"{rc['mean_random_density']['mean']:.3f} (random); output cosine "
                     f"{rc['mean_real_output_cosine']['mean']:.5f} vs {rc['mean_random_output_cosine']['mean']:.5f}")
    v = res.verdict
    fails = [k for k, r in v["checks"].items() if not r["passed"]]
    lines.append(f"verdict: {'PASS' if v['passed'] else 'FAIL'}"
                 + (f" (failed: {', '.join(fails)})" if fails else "")
                 + ("" if v["self_check_passed"] in (None, True) else " (SELF-CHECK FAILED: dense runs differ)"))
    return "\n".join(lines)


def _tuned_label(c: Mapping[str, Any]) -> str | None:
    return f"tuned {c['tuned']}" if c.get("tuned") else None


def _f(x: Any, spec: str) -> str:
    return "-" if x is None else spec.format(x)


def markdown(res: "EvalResult", plots: Mapping[str, str] | None = None) -> str:
    c, v = res.config, res.verdict
    out = ["# sparseattn eval: dense vs sparse, end to end", "",
           f"- model: `{c['model']}` ({c['model_class']}, {c['layers']} layers, {c['heads']} q heads / "
           f"{c['kv_heads']} kv heads, head_dim {c['head_dim']}, {c['dtype']})",
           f"- sparse configuration: `{c['predictor_spec'] or c['pattern'] or _tuned_label(c)}` → {json.dumps(c['predictor'])}",
           f"- dense layers: {c['dense_layers'] or 'none'}; backend: {c['backend']}; quantized attention: "
           + (f"{c['quant']} ({c['quant_granularity']} scales; quantization inside every sparse layer call)"
              if c.get("quant") else "off"),
           f"- text: {c['text_source']}; {c['samples']} samples × {c['seq_len']} tokens; metrics over the last "
           f"{c['score_last']} positions; {c['gen_tokens']} greedy tokens per sample",
           f"- mean block density: {_f(c['mean_density_sparse_layers'], '{:.4f}')} over sparse layers, "
           f"{_f(c['mean_density_all_layers'], '{:.4f}')} over all layers",
           f"- environment: {json.dumps(res.environment)}", "",
           "## Metrics (mean ± std over samples)", "",
           "| metric | sparse vs dense | dense vs dense (self-check) |", "|---|---|---|"]
    for key in _LABELS:
        if key in res.summary:
            sc = _fmt_ms(res.self_check.get(key), key) if res.self_check else "-"
            out.append(f"| {_LABELS[key][0]} | {_fmt_ms(res.summary[key], key)} | {sc} |")
    out += ["", "## Verdict", "",
            f"**{'PASS' if v['passed'] else 'FAIL'}** — thresholds applied to the means over samples:", "",
            "| metric | value | rule | result |", "|---|---|---|---|"]
    for k, r in v["checks"].items():
        out.append(f"| {_LABELS[k][0]} | {_LABELS[k][1].format(r['value'])} | {r['op']} {r['threshold']} | "
                   f"{'pass' if r['passed'] else 'FAIL'} |")
    out.append(f"| self-check (dense twice identical) | {v['self_check_passed']} | cosine 1, 100 % agreement | "
               f"{'pass' if v['self_check_passed'] in (None, True) else 'FAIL'} |")
    t = res.timings
    st = t.get("steady_prefill")
    out += ["", "## Time and memory", "",
            ("Steady-state prefill: " + st["method"] + "." if st else "Steady-state prefill: not measured (timing_repeats=0)."),
            "First calls are the accuracy runs' own times (mean per sample; autotuning and first-call work included):",
            "they are not speed measurements.", "",
            "| | dense | sparse |", "|---|---|---|",
            (f"| prefill, steady state (median, s) | {st['dense_s']:.3f} | {st['sparse_s']:.3f} |" if st else
             "| prefill, steady state (median, s) | - | - |"),
            f"| prefill, first call (s) | {_f(t['first_call_dense_prefill_s'], '{:.3f}')} | "
            f"{_f(t['first_call_sparse_prefill_s'], '{:.3f}')} |",
            f"| {c['gen_tokens']} decode steps, first call (s) | {_f(t['first_call_dense_decode_s'], '{:.3f}')} | "
            f"{_f(t['first_call_sparse_decode_s'], '{:.3f}')} |",
            f"| GPU peak memory (bytes) | {_f(t['dense_peak_mem_bytes'], '{:.4g}')} | {_f(t['sparse_peak_mem_bytes'], '{:.4g}')} |",
            "", f"Model load {t['load_s']:.1f} s; whole run {t['total_s']:.1f} s. On CPU the sparse prefill uses the exact "
            "masked-SDPA path, whose cost is that of dense attention: CPU times say nothing about kernel speed.",
            "", "## Per-layer density actually used", "", "| layer | mode | density | sparsity | backend |", "|---|---|---|---|---|"]
    for li, r in res.layers.items():
        out.append(f"| {li} | {r['mode']} | {_f(r['density'], '{:.4f}')} | {_f(r['sparsity'], '{:.4f}')} | "
                   f"{', '.join(r.get('backends', [])) or '-'} |")
    if res.random_comparison:
        rc = res.random_comparison
        out += ["", "## Real vs random Q/K (first sample, same predictor, same shapes)", "",
                f"Mean density {rc['mean_real_density']['mean']:.4f} on real Q/K vs {rc['mean_random_density']['mean']:.4f} "
                f"on Gaussian Q/K; sparse-vs-dense output cosine {rc['mean_real_output_cosine']['mean']:.6f} vs "
                f"{rc['mean_random_output_cosine']['mean']:.6f}.", "",
                "| layer | density real | density random | out cosine real | out cosine random |", "|---|---|---|---|---|"]
        for li, r in rc["layers"].items():
            out.append(f"| {li} | {r['real_density']:.4f} | {r['random_density']:.4f} | {r['real_output_cosine']:.6f} | "
                       f"{r['random_output_cosine']:.6f} |")
    out += ["", "## Samples", "", "| # | documents | cosine | top-1 | KL | prefix | density | dense text | sparse text |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in res.samples:
        m = r["metrics"]
        docs = ", ".join(Path(d).name for d in r["documents"][:3])
        out.append(f"| {r['sample']} | {docs} | {m['logits_cosine']:.6f} | {m['top1_agreement']:.2%} | "
                   f"{m['kl_dense_sparse']:.4g} | {m.get('gen_prefix_len', '-')} | {_f(r['mean_density'], '{:.3f}')} | "
                   f"{_md_text(r.get('dense_text'))} | {_md_text(r.get('sparse_text'))} |")
    if res.attention_map:
        am = res.attention_map
        out += ["", f"Attention map: layer {am['layer']} head {am['head']} ({am['mode']}); the predictor's blocks on the "
                f"dense run's Q/K keep {_f(am['mass_recall'], '{:.2%}')} of the softmax mass."]
    if plots:
        out += ["", "## Plots", ""] + [f"![{k}]({Path(p).name})" for k, p in plots.items()]
    return "\n".join(out) + "\n"


def _md_text(s: str | None) -> str:
    if s is None:
        return "-"
    return "`" + s.replace("\n", "⏎").replace("|", "¦").replace("`", "'")[:80] + "`"


def write_report(result: "EvalResult", out_dir: str | Path, *, plots: bool = True) -> dict[str, Path]:
    """Write ``eval.json``, ``eval.md`` and (with matplotlib) PNG plots into ``out_dir``.

    Returns:
        ``{"json": path, "markdown": path, <plot name>: path, ...}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    plot_paths: dict[str, str] = {}
    if plots:
        from sparseattn.eval import plots as P

        try:
            plot_paths["per-layer sparsity"] = str(P.layer_sparsity_bars(result.layers, out / "eval_layer_sparsity.png",
                                                                          title=f"{result.config['model']} @ {result.config['seq_len']} tokens"))
            if result.attention_map is not None:
                plot_paths["attention map"] = str(P.attention_map(result.attention_map, out / "eval_attention_map.png"))
        except ImportError as exc:  # matplotlib missing: say so, write the rest
            import warnings

            warnings.warn(f"write_report: plots skipped ({exc}); pip install 'sparseattn[viz]'", RuntimeWarning, stacklevel=2)
    paths["json"] = out / "eval.json"
    paths["json"].write_text(json.dumps(result.to_dict(), indent=2, default=_json_default))
    paths["markdown"] = out / "eval.md"
    paths["markdown"].write_text(markdown(result, plot_paths))
    for k, p in plot_paths.items():
        paths[k] = Path(p)
    return paths


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    return repr(o)
