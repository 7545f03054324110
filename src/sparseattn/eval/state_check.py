"""Three-way check of the state operator: standard (one call) vs segmented (state carried) vs PyTorch SDPA.

For each dtype, on fixed-seed inputs with GQA, an additive float mask (random finite bias plus
``-inf`` entries and one fully masked row) and causal masking, the keys are cut into 2–4 segments at
multiples of the key block (128: the kernel's dense layout), and three results are compared:

* **standard** — one call over the whole KV: the Triton kernel (fp16/bf16 where it runs: CUDA, or
  the CPU interpreter) with a fixed launch config; otherwise (fp32, or no kernel) the PyTorch loop
  :func:`~sparseattn.ops.reference.reference_attention_carry` in one call;
* **segmented** — the same engine, segment by segment, carrying the raw ``(m, l, acc)`` state
  (:func:`~sparseattn.state.segmented.attention_over_segments`);
* **sdpa** — ``torch.nn.functional.scaled_dot_product_attention`` with the same combined mask, in
  high precision (float64 on CPU, float32 on CUDA) and in the input dtype.

Verdicts: standard vs SDPA by the ratio rule (:func:`sparseattn.testing.tolerances.ratio_bound`:
error against the high-precision SDPA at most ``RATIO`` x the same-dtype SDPA's error plus the dtype
floor); segmented vs standard **bitwise** (block-aligned boundaries); segmented vs SDPA by the ratio
rule. The report holds an element-wise table of the first elements, max/mean differences and the
ranges of the carried state after each segment (M = running max in natural-log units, S = running sum).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from sparseattn._validation import fail

__all__ = ["run_state_check", "format_text", "format_markdown", "DTYPES"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
BLOCK = 128  # the kernel's dense layout blocks: segment boundaries at multiples of this are bitwise


def _cuts(nkv: int, parts: int, block: int) -> list[int]:
    nblocks = -(-nkv // block)
    if parts > nblocks:
        raise fail("state_check", "segments", "needs at least one key block per segment",
                   f"<= {nblocks} segments for {nkv} keys", parts)
    bounds = [round(i * nblocks / parts) * block for i in range(parts)] + [nkv]
    return bounds


def _kernel_available(q: torch.Tensor) -> str | None:
    from sparseattn.ops import triton_launch

    return triton_launch.refusal(q, causal=True)


def _diff(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    fin = torch.isfinite(a64) & torch.isfinite(b64)
    d = (a64 - b64).abs()[fin]
    same_inf = bool(torch.equal(torch.isfinite(a64), torch.isfinite(b64)))
    return {"max": float(d.max()) if d.numel() else 0.0, "mean": float(d.mean()) if d.numel() else 0.0,
            "same_nonfinite_pattern": same_inf}


def _ratio_verdict(x: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor, dtype: torch.dtype) -> dict[str, Any]:
    from sparseattn.testing.tolerances import RATIO, ratio_bound

    ex = _diff(x, hi)
    er = _diff(lo, hi)
    bound = ratio_bound(er["max"], dtype)
    ok = ex["max"] <= bound and ex["same_nonfinite_pattern"]
    return {"rule": f"ratio (<= {RATIO} x same-dtype SDPA error + floor)", "max": ex["max"], "mean": ex["mean"],
            "same_dtype_sdpa_max": er["max"], "bound": bound, "pass": bool(ok)}


def _stats(raw: Any) -> dict[str, float]:
    m = raw.m[torch.isfinite(raw.m)].to(torch.float64) * math.log(2.0)
    s = raw.l.to(torch.float64)
    return {"M_min": float(m.min()) if m.numel() else -math.inf, "M_max": float(m.max()) if m.numel() else -math.inf,
            "S_min": float(s.min()), "S_max": float(s.max()),
            "empty_rows": int((~torch.isfinite(raw.m)).sum())}


def run_state_check(
    *,
    dtypes: tuple[str, ...] = ("float32", "float16", "bfloat16"),
    device: str = "cpu",
    batch: int = 1,
    heads: int = 4,
    kv_heads: int = 2,
    seq_q: int = 128,
    seq_kv: int = 512,
    head_dim: int = 64,
    segments: tuple[int, ...] = (2, 3, 4),
    seed: int = 0,
    causal: bool = True,
    table_rows: int = 128,
) -> dict[str, Any]:
    """Run the three-way check; returns a JSON-serialisable report (``report["pass"]`` overall, ``report["environment"]``
    the run's :func:`sparseattn.eval.env.environment` record)."""
    from sparseattn.eval.env import environment
    from sparseattn.ops.reference import reference_attention_carry, sdpa_reference
    from sparseattn.state.segmented import attention_with_state

    fn = "state_check"
    for name, val in (("batch", batch), ("heads", heads), ("kv_heads", kv_heads), ("seq_q", seq_q),
                      ("seq_kv", seq_kv), ("head_dim", head_dim)):
        if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
            raise fail(fn, name, "must be a positive integer", "an int > 0", repr(val))
    if heads % kv_heads:
        raise fail(fn, "kv_heads", "must divide heads (GQA)", f"a divisor of {heads}", kv_heads)
    for d in dtypes:
        if d not in DTYPES:
            raise fail(fn, "dtypes", "has an unknown dtype", f"some of {sorted(DTYPES)}", repr(d))
    for p in segments:
        if not 2 <= p <= 4:
            raise fail(fn, "segments", "must be between 2 and 4", "2, 3 or 4", p)
    dev = torch.device(device)
    hi_dtype = torch.float32 if dev.type == "cuda" else torch.float64
    g = torch.Generator().manual_seed(seed)
    q0 = torch.randn(batch, heads, seq_q, head_dim, generator=g)
    k0 = torch.randn(batch, kv_heads, seq_kv, head_dim, generator=g)
    v0 = torch.randn(batch, kv_heads, seq_kv, head_dim, generator=g)
    mask0 = torch.randn(1, heads, seq_q, seq_kv, generator=g)
    mask0[torch.rand(1, heads, seq_q, seq_kv, generator=g) < 0.15] = -math.inf
    mask0[:, :, min(5, seq_q - 1), :] = -math.inf  # one fully masked row: out 0, lse -inf everywhere
    report: dict[str, Any] = {"device": str(dev), "shape": {"batch": batch, "heads": heads, "kv_heads": kv_heads,
                                                             "seq_q": seq_q, "seq_kv": seq_kv, "head_dim": head_dim},
                              "seed": seed, "causal": causal, "mask": "additive float (1, H, N_q, N_kv), 15% -inf",
                              "block": BLOCK, "results": []}
    q_hi, k_hi, v_hi = (t.to(hi_dtype).to(dev) for t in (q0, k0, v0))
    m_hi = mask0.to(hi_dtype).to(dev)
    sdpa_hi = sdpa_reference(q_hi, k_hi, v_hi, causal=causal, attn_mask=m_hi)
    all_ok = True
    for dname in dtypes:
        dt = DTYPES[dname]
        q, k, v = (t.to(dt).to(dev) for t in (q0, k0, v0))
        mask = mask0.to(dev)
        sdpa_lo = sdpa_reference(q, k, v, causal=causal, attn_mask=mask.to(dt))
        reason = _kernel_available(q)
        if reason is None:
            from sparseattn.ops.triton import configs
            from sparseattn.ops.triton_launch import block_sparse_fwd, interpret_mode

            cfg = configs.default_config(head_dim, BLOCK, BLOCK, interpret=interpret_mode(), pv_skip=False)
            engine = f"triton kernel (config {cfg})"
            std = block_sparse_fwd(q, k, v, layout=None, causal=causal, attn_mask=mask, config=cfg)
            backend = "triton"
        else:
            cfg = None
            engine = f"PyTorch loop (reference_attention_carry; kernel: {reason})"
            std, _ = reference_attention_carry(q, k, v, causal=causal, attn_mask=mask, block_n=BLOCK)
            backend = "reference"
        for parts in segments:
            cuts = _cuts(seq_kv, parts, BLOCK)
            ks = [k[:, :, a:b] for a, b in zip(cuts[:-1], cuts[1:])]
            vs = [v[:, :, a:b] for a, b in zip(cuts[:-1], cuts[1:])]
            ms = [mask[..., a:b] for a, b in zip(cuts[:-1], cuts[1:])]
            seg_stats = []
            st = None
            for i in range(parts):  # segment by segment, carrying the raw state
                out_i = attention_with_state(q, ks[i], vs[i], state=st, kv_offset=cuts[i], kv_len=seq_kv,
                                             causal=causal, attn_mask=ms[i], backend=backend, config=cfg)
                st = out_i.state
                seg_stats.append({"segment": i, "keys": [cuts[i], cuts[i + 1]], **_stats(st)})
            seg_out, seg_lse = out_i.out, out_i.lse
            bitwise = bool(torch.equal(seg_out, std.out)) and bool(torch.equal(seg_lse, std.lse))
            v_std = _ratio_verdict(std.out, sdpa_hi, sdpa_lo, dt)
            v_seg = _ratio_verdict(seg_out, sdpa_hi, sdpa_lo, dt)
            d_ss = _diff(seg_out, std.out)
            pairs = {
                "standard_vs_sdpa": v_std,
                "segmented_vs_standard": {"rule": "bitwise (block-aligned boundaries)", "max": d_ss["max"],
                                          "mean": d_ss["mean"], "lse_bitwise": bool(torch.equal(seg_lse, std.lse)),
                                          "pass": bitwise},
                "segmented_vs_sdpa": v_seg,
            }
            ok = all(p["pass"] for p in pairs.values())
            all_ok = all_ok and ok
            n = min(table_rows, std.out.numel())
            a, b, c = (t.flatten()[:n].to(torch.float64).cpu() for t in (std.out, seg_out, sdpa_hi))
            table = [{"i": i, "standard": float(a[i]), "segmented": float(b[i]), "sdpa": float(c[i]),
                      "std_minus_sdpa": float(a[i] - c[i]), "seg_minus_std": float(b[i] - a[i])} for i in range(n)]
            report["results"].append({"dtype": dname, "segments": parts, "cuts": cuts, "engine": engine,
                                      "pairs": pairs, "state": seg_stats, "pass": ok, "table": table})
    report["pass"] = all_ok
    report["environment"] = environment(dev)
    return report


def format_text(report: dict[str, Any], *, table: bool = True) -> str:
    lines = [f"state-check on {report['device']}: shape {report['shape']}, seed {report['seed']}, "
             f"causal={report['causal']}, mask {report['mask']}"]
    for r in report["results"]:
        lines.append(f"\n== {r['dtype']}, {r['segments']} segments, cuts {r['cuts']}  [{r['engine']}]")
        for name, p in r["pairs"].items():
            extra = f", bound {p['bound']:.3e} (same-dtype SDPA {p['same_dtype_sdpa_max']:.3e})" if "bound" in p else ""
            lines.append(f"  {name:<22} max {p['max']:.3e}  mean {p['mean']:.3e}{extra}  [{p['rule']}]  "
                         f"{'PASS' if p['pass'] else 'FAIL'}")
        for s in r["state"]:
            lines.append(f"  state after segment {s['segment']} (keys {s['keys'][0]}:{s['keys'][1]}): "
                         f"M [{s['M_min']:.4f}, {s['M_max']:.4f}]  S [{s['S_min']:.4f}, {s['S_max']:.4f}]  "
                         f"empty rows {s['empty_rows']}")
        if table and r["table"]:
            lines.append(f"  {'i':>4} {'standard':>14} {'segmented':>14} {'sdpa':>14} {'std-sdpa':>11} {'seg-std':>11}")
            for t in r["table"]:
                lines.append(f"  {t['i']:>4} {t['standard']:>14.7f} {t['segmented']:>14.7f} {t['sdpa']:>14.7f} "
                             f"{t['std_minus_sdpa']:>11.3e} {t['seg_minus_std']:>11.3e}")
        lines.append(f"  verdict: {'PASS' if r['pass'] else 'FAIL'}")
    lines.append(f"\noverall: {'PASS' if report['pass'] else 'FAIL'}")
    return "\n".join(lines)


def format_markdown(report: dict[str, Any]) -> str:
    out = [f"# state-check ({report['device']})", "",
           f"shape {report['shape']}, seed {report['seed']}, causal={report['causal']}, mask: {report['mask']}", "",
           "| dtype | segments | pair | max | mean | rule | verdict |", "|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        for name, p in r["pairs"].items():
            out.append(f"| {r['dtype']} | {r['segments']} | {name} | {p['max']:.3e} | {p['mean']:.3e} | {p['rule']} | "
                       f"{'PASS' if p['pass'] else 'FAIL'} |")
    out += ["", "## carried state (M natural-log running max, S running sum)", "",
            "| dtype | segments | after segment | keys | M range | S range | empty rows |", "|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        for s in r["state"]:
            out.append(f"| {r['dtype']} | {r['segments']} | {s['segment']} | {s['keys'][0]}:{s['keys'][1]} | "
                       f"[{s['M_min']:.4f}, {s['M_max']:.4f}] | [{s['S_min']:.4f}, {s['S_max']:.4f}] | {s['empty_rows']} |")
    for r in report["results"]:
        out += ["", f"## {r['dtype']}, {r['segments']} segments: first {len(r['table'])} elements ({r['engine']})", "",
                "| i | standard | segmented | sdpa | std-sdpa | seg-std |", "|---|---|---|---|---|---|"]
        out += [f"| {t['i']} | {t['standard']:.7f} | {t['segmented']:.7f} | {t['sdpa']:.7f} | {t['std_minus_sdpa']:.3e} | "
                f"{t['seg_minus_std']:.3e} |" for t in r["table"]]
    out += ["", f"**overall: {'PASS' if report['pass'] else 'FAIL'}**", ""]
    return "\n".join(out)
