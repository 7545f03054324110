"""Accuracy of the quantized kernel on real Q/K/V captured by ``sparseattn collect`` (docs/QUANT.md).

For every (file, layer) of a collection (read through :func:`sparseattn.eval.collect.iter_collected`,
so any path :func:`~sparseattn.eval.collect.resolve_collection` accepts: the collection root, one
``len<N>`` folder or one ``sample<i>.safetensors``):

* the reference: fp32 attention (:func:`sparseattn.ops.reference.reference_attention`) of the captured
  tensors, causal, with the layer's recorded softmax scale, dense or with a predicted layout;
* ``bf16``: the same inputs rounded to ``dtype`` through :func:`sparseattn.attention` (the unquantized
  path: the Triton kernel on CUDA, the PyTorch reference on the CPU), for scale;
* one row per ``quant`` mode and granularity: :func:`sparseattn.ops.quant.quantized_attention` on the
  ``dtype`` inputs (quantization included, K smoothed), the same layout.

Each row: cosine similarity and relative L1 of the whole output against the reference
(:func:`sparseattn.testing.tolerances.quant_accuracy`) and whether it meets the issue's target
(``QUANT_INT8_*`` / ``QUANT_FP8_*`` in :mod:`sparseattn.testing.tolerances`: cos >= 0.9995, rel L1
<= 0.02). Runs on the CPU under ``TRITON_INTERPRET=1`` (FP8 through the interpreter's e4m3
emulation) on small collections; real numbers come from a GPU.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from sparseattn._validation import fail

__all__ = ["captured_quant_accuracy", "quant_accuracy_table", "QUANT_TARGETS"]


def _targets() -> dict[str, tuple[float, float]]:
    from sparseattn.testing import tolerances as T

    return {"int8": (T.QUANT_INT8_COS_MIN, T.QUANT_INT8_REL_L1_MAX),
            "int8_fp8": (T.QUANT_FP8_COS_MIN, T.QUANT_FP8_REL_L1_MAX)}


#: ``{mode: (cosine minimum, relative L1 maximum)}`` on real captured Q/K/V
QUANT_TARGETS = _targets()


@torch.no_grad()
def captured_quant_accuracy(path: Any, *, modes: Sequence[str] = ("int8", "int8_fp8"),
                            granularities: Sequence[str] = ("per_warp",), layers: Sequence[int] | None = None,
                            lengths: Sequence[int] | None = None, predictor: Any = None,
                            dtype: torch.dtype = torch.bfloat16, device: str | torch.device | None = None,
                            progress: bool = False, smooth_q: Sequence[bool] = (True,),
                            backend: str = "kernel", balance_qk: Sequence[bool] = (True,)) -> dict[str, Any]:
    """Quantized attention vs fp32 attention on every captured (file, layer); see the module docstring.

    Args:
        path: a collection root, a ``len<N>`` folder or one ``sample<i>.safetensors`` (``sparseattn collect``).
        modes: quantization modes (``"int8"``, ``"int8_fp8"``).
        granularities: scale granularities (``"per_warp"``, ``"per_block"``, ``"per_thread"``, ``"per_token"``).
        layers, lengths: restrict to these layer indices / sequence lengths (default: all in the collection).
        predictor: ``None`` (dense causal) or a predictor / spec: its layout on the ``dtype`` q/k is used by
            the reference, the bf16 row and the quantized rows alike.
        dtype: the kernels' input dtype (``bfloat16`` or ``float16``).
        device: default CUDA when available, else the CPU (needs ``TRITON_INTERPRET=1`` with ``backend="kernel"``).
        smooth_q: one quantized row per value (``(True, False)``: with and without Q smoothing; rows without it
            are labelled ``no_smooth_q``).
        balance_qk: likewise for the per-channel Q/K balancing (rows without it are labelled ``no_balance``).
        backend: ``"kernel"`` (:func:`~sparseattn.ops.quant.quantized_attention`) or ``"emulation"`` (the PyTorch
            emulation with the same scales and rounding, :mod:`sparseattn.ops.quant_reference`; any device, and
            the practical choice on a CPU at real lengths).

    Returns:
        ``{"rows": [...], "summary": {label: {"min_cos", "max_rel_l1", "passed", "n"}}, "passed", "targets", ...}``.

    Raises:
        ValueError: a bad collection (see ``iter_collected``), unknown mode / granularity, nothing selected.
        NotImplementedError: the quantized kernel cannot run here (CPU without ``TRITON_INTERPRET=1``,
            head_dim not 64/128/256, FP8 below sm_89), with the reason.
    """
    from sparseattn.eval.collect import iter_collected
    from sparseattn.ops.attention import attention
    from sparseattn.ops.quant import GRANULARITIES, QUANT_MODES, quantized_attention
    from sparseattn.ops.quant_reference import emulated_quantized_attention
    from sparseattn.ops.reference import reference_attention
    from sparseattn.testing.tolerances import quant_accuracy

    fn = "captured_quant_accuracy"
    modes, granularities = list(modes), list(granularities)
    if not modes:
        raise fail(fn, "modes", "is empty", f"some of {list(QUANT_MODES)}", "[]")
    for m in modes:
        if m not in QUANT_MODES:
            raise fail(fn, "modes", "has an unknown mode", f"some of {list(QUANT_MODES)}", repr(m))
    if not granularities:
        raise fail(fn, "granularities", "is empty", f"some of {list(GRANULARITIES)}", "[]")
    for g in granularities:
        if g not in GRANULARITIES:
            raise fail(fn, "granularities", "has an unknown granularity", f"some of {list(GRANULARITIES)}", repr(g))
    smooth_q, balance_qk = list(smooth_q), list(balance_qk)
    for name, vals in (("smooth_q", smooth_q), ("balance_qk", balance_qk)):
        if not vals or any(not isinstance(b, bool) for b in vals):
            raise fail(fn, name, "must be a non-empty sequence of bools", "e.g. (True,) or (True, False)", repr(vals))
    if backend not in ("kernel", "emulation"):
        raise fail(fn, "backend", "is unknown", "'kernel' or 'emulation'", repr(backend))
    if dtype not in (torch.bfloat16, torch.float16):
        raise fail(fn, "dtype", "is not supported by the quantized kernel", "torch.bfloat16 or torch.float16", str(dtype))
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    pred = None
    if predictor is not None:
        from sparseattn.predictors.resolve import resolve_predictor

        pred = resolve_predictor(predictor)
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for item in iter_collected(path, device="cpu", lengths=lengths, layers=layers):
        q32, k32, v32 = (item[r].to(dev, torch.float32) for r in ("q", "k", "v"))
        qb, kb, vb = (t.to(dtype) for t in (q32, k32, v32))
        scale = item["scale"]
        layout = None
        if pred is not None:
            pred.reset()
            layout = pred.predict(qb, kb, causal=True, layer=item["layer"])
        ref = reference_attention(q32, k32, v32, causal=True, layout=layout, scale=scale).out
        base = {"file": item["file"], "sample": item["sample"], "seq_len": item["seq_len"], "layer": item["layer"],
                "heads": int(q32.shape[1]), "kv_heads": int(k32.shape[1]), "head_dim": int(q32.shape[3]),
                "scale": scale, "density": None if layout is None else float(layout.density(causal=True))}
        outs: list[tuple[str, str | None, bool | None, bool | None, torch.Tensor]] = [
            ("bf16" if dtype == torch.bfloat16 else "fp16", None, None, None,
             attention(qb, kb, vb, causal=True, layout=layout, scale=scale).out)]
        for m in modes:
            for g in granularities:
                for sq in smooth_q:
                    for bal in balance_qk:
                        kw = dict(layout=layout, causal=True, scale=scale, quant=m, quant_granularity=g, smooth_q=sq,
                                  balance_qk=bal)
                        out = quantized_attention(qb, kb, vb, **kw) if backend == "kernel" else \
                            emulated_quantized_attention(qb, kb, vb, **kw)[0]
                        outs.append((m, g, sq, bal, out))
        for method, gran, sq, bal, out in outs:
            cos, rel = quant_accuracy(out, ref)
            tgt = QUANT_TARGETS.get(method)
            rows.append({**base, "method": method, "granularity": gran, "smooth_q": sq, "balance_qk": bal,
                         "cos": cos, "rel_l1": rel,
                         "passed": None if tgt is None else bool(cos >= tgt[0] and rel <= tgt[1])})
        if progress:
            print(f"[quant-qkv] {item['file']} layer {item['layer']}: " + ", ".join(
                f"{_label(r)} cos {r['cos']:.6f} rel {r['rel_l1']:.4f}" for r in rows[-len(outs):]), flush=True)
    if not rows:
        raise fail(fn, "layers/lengths", "select nothing in the collection", "layers and lengths it holds",
                   f"layers={list(layers) if layers is not None else None}, "
                   f"lengths={list(lengths) if lengths is not None else None}")
    summary: dict[str, Any] = {}
    for r in rows:
        s = summary.setdefault(_label(r), {"method": r["method"], "granularity": r["granularity"],
                                           "smooth_q": r["smooth_q"], "balance_qk": r["balance_qk"], "n": 0,
                                       "min_cos": 1.0, "max_rel_l1": 0.0, "passed": None})
        s["n"] += 1
        s["min_cos"] = min(s["min_cos"], r["cos"])
        s["max_rel_l1"] = max(s["max_rel_l1"], r["rel_l1"])
        if r["passed"] is not None:
            s["passed"] = r["passed"] if s["passed"] is None else (s["passed"] and r["passed"])
    quant_rows = [r for r in rows if r["passed"] is not None]
    return {"tool": "sparseattn.eval.quant_accuracy", "path": str(path), "device": str(dev),
            "dtype": str(dtype).replace("torch.", ""), "layout": "dense causal" if pred is None else repr(pred),
            "backend": backend,
            "targets": {m: {"cos_min": c, "rel_l1_max": r} for m, (c, r) in QUANT_TARGETS.items()},
            "rows": rows, "summary": summary, "passed": all(r["passed"] for r in quant_rows),
            "wall_s": round(time.perf_counter() - t0, 2)}


def _options(r: dict[str, Any]) -> str:
    """The switched-off quantizer options of a row: ``""``, ``" no_smooth_q"``, ``" no_smooth_q no_balance"``."""
    return (" no_smooth_q" if r.get("smooth_q") is False else "") + (" no_balance" if r.get("balance_qk") is False else "")


def _label(r: dict[str, Any]) -> str:
    """``"int8 per_warp"``, ``"int8 per_warp no_smooth_q no_balance"``, ``"bf16"``."""
    return r["method"] + (f" {r['granularity']}" if r["granularity"] else "") + _options(r)


def quant_accuracy_table(res: dict[str, Any]) -> str:
    """Markdown: one line per (length, layer, method), then the summary per method."""
    lines = [f"Quantized attention vs fp32 attention on captured Q/K/V ({res['path']}; {res['layout']}; "
             f"{res['dtype']} inputs; {res['device']}; {res.get('backend', 'kernel')})", "",
             "| len | sample | layer | method | granularity | cos | rel L1 | target |", "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        ok = "-" if r["passed"] is None else ("pass" if r["passed"] else "FAIL")
        gran = (r["granularity"] or "-") + _options(r)
        lines.append(f"| {r['seq_len']} | {r['sample']} | {r['layer']} | {r['method']} | {gran} | "
                     f"{r['cos']:.6f} | {r['rel_l1']:.4f} | {ok} |")
    lines += ["", "| method | layers x samples | min cos | max rel L1 | target |", "|---|---|---|---|---|"]
    for label, s in res["summary"].items():
        ok = "-" if s["passed"] is None else ("pass" if s["passed"] else "FAIL")
        lines.append(f"| {label} | {s['n']} | {s['min_cos']:.6f} | {s['max_rel_l1']:.4f} | {ok} |")
    t = res["targets"]
    lines += ["", "Targets: " + "; ".join(f"{m} cos >= {v['cos_min']}, rel L1 <= {v['rel_l1_max']}" for m, v in t.items())
              + f". Overall: {'PASS' if res['passed'] else 'FAIL'}."]
    return "\n".join(lines)
