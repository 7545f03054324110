"""Quantized (INT8 / FP8 e4m3) decode variants against bf16 decode and copy bandwidth (issue 14).

Usage (one device call, about 3-4 minutes on an H200; run from the repo root with ``PYTHONPATH=$PWD/src``)::

    python benchmarks/decode_int8_sweep.py                # JSON to $OUT/decode_int8_sweep.json (OUT default ./out)
    python benchmarks/decode_int8_sweep.py --cpu-smoke    # tiny shapes under TRITON_INTERPRET=1 (keeps it from rotting)

Shapes: bf16 q, H=32, H_kv=8, D=128, one new token, context 32K / 128K, batch 1 / 8 / 32 (every sequence the
full context). K/V are Gaussian bf16, quantized per token and KV head (:func:`sparseattn.state.kv_cache.quantize`);
the bf16 rows run on the int8 cache dequantised to bf16 (the same bytes a bf16 cache holds, so the bf16 output
is the quantized kernels' yardstick "on the same dequantised inputs").

Phases (each prints progress; a time budget, ``--budget-s``, cuts the grid and the remaining shapes short):

1. screen (128K, B=8): every variant -- INT8: ``QK`` in dequant/q8/q8x2/fp16 x ``PV`` in dequant/fp16/i8x2; FP8: the
   same ``QK`` x ``PV`` in dequant/fp16/fp8 -- at the tuned default tile (BLOCK_N 128, 4 warps, 2 stages).
2. grid (128K, B=8): the two fastest variants per format that pass parity, and the fastest overall, over
   BLOCK_N 64/128/256 x num_warps 4/8 x num_stages 2/3/4 (promising configs first), plus ``BLOCK_M`` 64 (the
   wgmma-sized row tile) for the fastest.
3. shapes: at every (context, batch): the bf16 decode (default config), the copy bandwidth of the bf16 K+V
   (``torch.empty_like(k).copy_(k)``, same run), the default INT8 and FP8 launches (the current path), and
   the three best (variant, config) per format from the grid, each at the launcher's split count and twice it.
4. sparse (128K, B=32, the largest batch run): :func:`sparse_decode_attention` reading 10% of the pages at
   page size 16 / 32 / 64, selection included, and the selection alone (:func:`select_pages`), against the
   dense bf16 decode of that shape.
5. accuracy (B=1, 4K keys): every variant's cosine / relative L1 against float32 attention on the original
   float inputs and on the dequantised inputs, Gaussian and with outlier channels (4 channels x20 in q and K).

Parity of every timed quantized launch, on sequence 0 of its batch (the whole context): the ratio rule of
:mod:`sparseattn.testing.tolerances` (``check_ratio``) against :func:`decode_reference` on the same quantized
cache (float32 and bf16-without-upcast references; the rule of tests/test_decode_quant.py), and the max |diff|
and relative L1 to the bf16 kernel on the dequantised cache. ``best`` picks only launches that pass the ratio
rule; the fastest regardless is reported next to it.

Timing: CUDA events around 5 back-to-back calls, 20 such samples after a warm-up, the median per call,
``torch.cuda.synchronize`` around each. ``%bw`` = bytes read (quantized K+V + fp32 scales; bf16 K+V) / time,
over the copy's (read + written bytes) / time, the definition of benchmarks/bench_decode.py.
"""

from __future__ import annotations

import sys

if "--cpu-smoke" in sys.argv:  # the interpreter must be chosen before triton is imported
    import os as _os

    _os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse
import json
import os
import statistics
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

from sparseattn.eval.env import environment
from sparseattn.ops.decode import (
    decode_attention,
    decode_num_splits,
    decode_reference,
)
from sparseattn.ops.pages import (
    page_summaries,
    select_pages,
    sparse_decode_attention,
)
from sparseattn.state.kv_cache import quantize
from sparseattn.testing.tolerances import check_ratio, quant_accuracy

QK = ("dequant", "q8", "q8x2", "fp16")
PV = {"int8": ("dequant", "fp16", "i8x2"), "fp8": ("dequant", "fp16", "fp8")}
DEFAULT_TILE = {"BLOCK_N": 128, "num_warps": 4, "num_stages": 2}
GRID_ORDER = [(128, 4, 2), (256, 4, 2), (256, 8, 2), (128, 8, 2), (64, 4, 2), (128, 4, 3), (256, 4, 3),
              (256, 8, 3), (64, 4, 3), (128, 8, 3), (128, 4, 4), (256, 8, 4), (64, 8, 2), (256, 4, 4),
              (64, 4, 4), (128, 8, 4), (64, 8, 3), (64, 8, 4)]


class Sweep:
    def __init__(self, smoke: bool, budget_s: float) -> None:
        self.smoke = smoke
        self.t0 = time.perf_counter()
        self.budget_s = budget_s
        self.dev = "cpu" if smoke else "cuda"
        self.H, self.Hkv, self.D = (8, 2, 64) if smoke else (32, 8, 128)
        self.sms = 132 if smoke else torch.cuda.get_device_properties(0).multi_processor_count

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def log(self, msg: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {msg}", flush=True)

    # ------------------------------------------------------------------ timing
    def time_ms(self, fn: Callable[[], Any], samples: int = 20, reps: int = 5) -> float:
        if self.smoke:
            fn()
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(samples):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(reps):
                fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / reps)
        return statistics.median(times)

    # ------------------------------------------------------------------ inputs
    def inputs(self, B: int, N: int, gen_seed: int = 0) -> dict[str, Any]:
        torch.manual_seed(gen_seed)
        H, Hkv, D, dev = self.H, self.Hkv, self.D, self.dev
        q = torch.randn(B, H, 1, D, device=dev, dtype=torch.bfloat16)
        k = torch.randn(B, Hkv, N, D, device=dev, dtype=torch.bfloat16)
        v = torch.randn(B, Hkv, N, D, device=dev, dtype=torch.bfloat16)
        v.add_(0.5)  # a per-channel-free mean: the output is not pure rounding noise
        out: dict[str, Any] = {"q": q, "seqlens": torch.full((B,), N, dtype=torch.int32, device=dev)}
        for mode in ("int8", "fp8"):
            kq = torch.empty(k.shape, dtype=torch.int8 if mode == "int8" else torch.float8_e4m3fn, device=dev)
            vq = torch.empty_like(kq)
            ks = torch.empty(B, Hkv, N, 1, dtype=torch.float32, device=dev)
            vs = torch.empty_like(ks)
            for b in range(B):  # chunked: quantize's float32 temporaries stay small
                kq[b:b + 1], ks[b:b + 1] = quantize(k[b:b + 1], mode)
                vq[b:b + 1], vs[b:b + 1] = quantize(v[b:b + 1], mode)
            out[mode] = (kq, vq, ks, vs)
        kq, vq, ks, vs = out["int8"]
        for b in range(B):  # the bf16 cache = the int8 cache dequantised (same values the int8 kernels see)
            k[b:b + 1] = (kq[b:b + 1].float() * ks[b:b + 1]).to(torch.bfloat16)
            v[b:b + 1] = (vq[b:b + 1].float() * vs[b:b + 1]).to(torch.bfloat16)
        out["bf16"] = (k, v)
        return out

    # ------------------------------------------------------------------ parity (sequence 0)
    def parity_refs(self, inp: dict[str, Any]) -> dict[str, Any]:
        q0 = inp["q"][:1]
        refs: dict[str, Any] = {}
        for mode in ("int8", "fp8"):
            kq, vq, ks, vs = (t[:1] for t in inp[mode])
            hi = decode_reference(q0.float(), kq, vq, k_scale=ks, v_scale=vs)
            lo = decode_reference(q0, kq, vq, k_scale=ks, v_scale=vs, upcast=False)
            kd = (kq.float() * ks).to(torch.bfloat16)
            vd = (vq.float() * vs).to(torch.bfloat16)
            bf = decode_attention(q0, kd, vd, backend="triton")
            refs[mode] = (hi.out, lo.out, bf)
        return refs

    @staticmethod
    def parity(out0: torch.Tensor, ref: Any) -> dict[str, Any]:
        hi, lo, bf = ref
        rec: dict[str, Any] = {}
        try:
            check_ratio(out0, hi, lo, "out")
            rec["ok"] = True
        except AssertionError as exc:
            rec["ok"] = False
            rec["error"] = str(exc)[:160]
        cos, rel = quant_accuracy(out0, hi)
        rec["rel_l1_vs_fp32"] = rel
        rec["cos_vs_fp32"] = cos
        rec["max_abs_vs_bf16_kernel"] = float((out0.double() - bf.double()).abs().max())
        rec["rel_l1_vs_bf16_kernel"] = quant_accuracy(out0, bf)[1]
        return rec

    # ------------------------------------------------------------------ one quantized launch
    def run_quant(self, inp: dict[str, Any], refs: dict[str, Any], mode: str, cfg: dict[str, Any] | None,
                  splits: int | None, nbytes: int, copy_gbps: float) -> dict[str, Any]:
        kq, vq, ks, vs = inp[mode]
        q, sl = inp["q"], inp["seqlens"]
        rec: dict[str, Any] = {"mode": mode, "config": cfg, "splits": splits}
        try:
            def fn() -> torch.Tensor:
                return decode_attention(q, kq, vq, seqlens=sl, k_scale=ks, v_scale=vs, num_splits=splits, config=cfg,
                                        backend="triton")

            out = fn()
            rec["parity"] = self.parity(out[:1], refs[mode])
            ms = self.time_ms(fn)
            rec["ms"] = ms
            rec["gbps"] = nbytes / (ms * 1e-3) / 1e9
            rec["pct_bw"] = 100.0 * rec["gbps"] / copy_gbps
        except Exception as exc:  # noqa: BLE001 - record (out of shared memory, an unsupported dot, ...) and go on
            rec["ms"] = None
            rec["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            rec["traceback"] = traceback.format_exc()[-1500:]
        return rec


def _label(cfg: dict[str, Any] | None) -> str:
    if cfg is None:
        return "default"
    s = f"qk={cfg.get('QK', 'dequant')},pv={cfg.get('PV', 'dequant')} n{cfg['BLOCK_N']}w{cfg['num_warps']}s{cfg['num_stages']}"
    return s + (f"m{cfg['BLOCK_M']}" if "BLOCK_M" in cfg else "")


def _variant(cfg: dict[str, Any] | None) -> tuple[str, str]:
    return ("default", "") if cfg is None else (cfg.get("QK", "dequant"), cfg.get("PV", "dequant"))


def _ok(r: dict[str, Any]) -> bool:
    return isinstance(r.get("ms"), float) and bool(r.get("parity", {}).get("ok"))


def accuracy_section(sw: Sweep, N: int) -> list[dict[str, Any]]:
    """Every variant's error vs float32 attention (original and dequantised inputs), Gaussian and outliers."""
    res = []
    H, Hkv, D, dev = sw.H, sw.Hkv, sw.D, sw.dev
    g = torch.Generator(device=dev).manual_seed(1)
    q = torch.randn(1, H, 1, D, device=dev, generator=g)
    k = torch.randn(1, Hkv, N, D, device=dev, generator=g)
    v = torch.randn(1, Hkv, N, D, device=dev, generator=g) + 0.5
    chans = [3, 17, D // 2 + 5, D - 9]
    tile = {"BLOCK_N": 32, "num_warps": 4, "num_stages": 1} if sw.smoke else dict(DEFAULT_TILE)
    for kind in ("gaussian", "outliers_x20"):
        qq, kk = q.clone(), k.clone()
        if kind != "gaussian":
            qq[..., chans] *= 20.0
            kk[..., chans] *= 20.0
        qb = qq.to(torch.bfloat16)
        ref_orig = decode_reference(qb.float(), kk, v).out
        for mode in ("int8", "fp8"):
            kq, ks = quantize(kk, mode)
            vq, vs = quantize(v, mode)
            ref_deq = decode_reference(qb.float(), kq, vq, k_scale=ks, v_scale=vs).out
            lo = decode_reference(qb, kq, vq, k_scale=ks, v_scale=vs, upcast=False).out
            for qk in QK:
                for pv in PV[mode]:
                    rec: dict[str, Any] = {"inputs": kind, "mode": mode, "qk": qk, "pv": pv}
                    try:
                        out = decode_attention(qb, kq, vq, k_scale=ks, v_scale=vs, backend="triton",
                                               config={**tile, "QK": qk, "PV": pv})
                        rec["cos_vs_fp32_orig"], rec["rel_l1_vs_fp32_orig"] = quant_accuracy(out, ref_orig)
                        rec["cos_vs_fp32_deq"], rec["rel_l1_vs_fp32_deq"] = quant_accuracy(out, ref_deq)
                        try:
                            check_ratio(out, ref_deq, lo, "out")
                            rec["ratio_rule_ok"] = True
                        except AssertionError as exc:
                            rec["ratio_rule_ok"] = False
                            rec["ratio_rule_error"] = str(exc)[:160]
                    except Exception as exc:  # noqa: BLE001
                        rec["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                    res.append(rec)
    base = {(r["inputs"], r["mode"]): r.get("rel_l1_vs_fp32_deq") for r in res if r["qk"] == "dequant" and r["pv"] == "dequant"}
    print("\naccuracy (bf16 q; rel L1 vs fp32 attention on the dequantised inputs | on the original inputs; x = / current path)")
    for r in res:
        b = base.get((r["inputs"], r["mode"]))
        rel = r.get("rel_l1_vs_fp32_deq")
        if rel is None:
            print(f"  {r['inputs']:12s} {r['mode']:4s} qk={r['qk']:7s} pv={r['pv']:7s} FAILED {r.get('error')}")
            continue
        x = rel / b if b else float("nan")
        r["rel_l1_vs_current"] = x
        print(f"  {r['inputs']:12s} {r['mode']:4s} qk={r['qk']:7s} pv={r['pv']:7s} {rel:.2e} | "
              f"{r['rel_l1_vs_fp32_orig']:.2e}  x{x:.2f}  ratio-rule {'ok' if r.get('ratio_rule_ok') else 'FAIL'}")
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "./out"))
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU under TRITON_INTERPRET=1")
    ap.add_argument("--contexts", default=None, help="comma-separated (default 32768,131072)")
    ap.add_argument("--batches", default=None, help="comma-separated (default 1,8,32)")
    ap.add_argument("--budget-s", type=float, default=200.0, help="stop starting new work after this")
    ap.add_argument("--grid-budget-s", type=float, default=110.0, help="stop the config grid after this (elapsed)")
    ap.add_argument("--no-sparse", action="store_true")
    args = ap.parse_args(argv)
    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        print("needs a CUDA GPU (or --cpu-smoke)")
        return 2
    sw = Sweep(smoke, args.budget_s)
    ctxs = [int(x) for x in (args.contexts or ("96" if smoke else "32768,131072")).split(",")]
    batches = [int(x) for x in (args.batches or ("1,2" if smoke else "1,8,32")).split(",")]
    screen = (max(ctxs), 2 if smoke else (8 if 8 in batches else batches[0]))
    shapes = [screen] + [(n, b) for n in ctxs for b in batches if (n, b) != screen]
    sparse_shape = (max(ctxs), max(batches))
    if sparse_shape != screen:  # the sparse section's shape last (its cache is still there for it)
        shapes = [s for s in shapes if s != sparse_shape] + [sparse_shape]
    tile = {"BLOCK_N": 32, "num_warps": 4, "num_stages": 1} if smoke else dict(DEFAULT_TILE)
    grid = [(32, 4, 1), (16, 4, 1)] if smoke else GRID_ORDER
    result: dict[str, Any] = {"device": "cpu (interpreter)" if smoke else torch.cuda.get_device_name(),
                              "environment": environment(sw.dev), "H": sw.H, "H_kv": sw.Hkv, "D": sw.D,
                              "shapes": [], "screen": [], "grid": [], "sparse": []}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    candidates: dict[str, list[dict[str, Any]]] = {"int8": [], "fp8": []}

    for si, (N, B) in enumerate(shapes):
        if si > 0 and sw.elapsed() > args.budget_s:
            result["shapes"].append({"ctx": N, "B": B, "skipped": f"time budget {args.budget_s}s spent"})
            sw.log(f"skip ctx={N} B={B}: budget spent")
            continue
        sw.log(f"shape ctx={N} B={B}: inputs")
        row: dict[str, Any] = {"ctx": N, "B": B}
        try:
            inp = sw.inputs(B, N)
            k, v = inp["bf16"]
            q, sl = inp["q"], inp["seqlens"]
            bf16_bytes = 2 * k.numel() * k.element_size()
            kq, _, ks, _ = inp["int8"]
            q_bytes = 2 * kq.numel() * kq.element_size() + 2 * ks.numel() * ks.element_size()
            dst = [torch.empty_like(k), torch.empty_like(v)]
            cms = sw.time_ms(lambda: (dst[0].copy_(k), dst[1].copy_(v)))
            copy_gbps = 2 * bf16_bytes / (cms * 1e-3) / 1e9
            dst.clear()
            row["copy"] = {"ms": cms, "gbps_read_plus_write": copy_gbps}
            bms = sw.time_ms(lambda: decode_attention(q, k, v, seqlens=sl, backend="triton"))
            row["bf16"] = {"ms": bms, "pct_bw": 100.0 * bf16_bytes / (bms * 1e-3) / 1e9 / copy_gbps}
            ns = decode_num_splits(B * sw.Hkv, N, sw.sms)
            row["launcher_splits"] = ns
            refs = sw.parity_refs(inp)
            sw.log(f"  copy {cms:.3f} ms ({copy_gbps:.0f} GB/s r+w), bf16 {bms:.3f} ms, splits {ns}")
            runs: list[dict[str, Any]] = []

            def go(mode: str, cfg: dict[str, Any] | None, splits: int | None, phase: str) -> dict[str, Any]:
                r = sw.run_quant(inp, refs, mode, cfg, splits, q_bytes, copy_gbps)
                r["phase"] = phase
                r["label"] = _label(cfg) + (f" splits{splits}" if splits else "")
                r["x_vs_bf16"] = bms / r["ms"] if isinstance(r.get("ms"), float) else None
                runs.append(r)
                par = r.get("parity", {})
                msg = f"{r['ms']:.3f} ms x{r['x_vs_bf16']:.2f} parity {'ok' if par.get('ok') else 'FAIL'}" \
                    if isinstance(r.get("ms"), float) else r.get("error", "")[:120]
                sw.log(f"  {phase:6s} {mode:4s} {r['label']:44s} {msg}")
                return r

            for mode in ("int8", "fp8"):
                go(mode, None, None, "default")
            if (N, B) == screen:
                # ---------------------------------------------------------------- phase 1: screen
                for mode in ("int8", "fp8"):
                    for qk in QK:
                        for pv in PV[mode]:
                            result["screen"].append(go(mode, {**tile, "QK": qk, "PV": pv}, None, "screen"))
                # ---------------------------------------------------------------- phase 2: grid
                picks: dict[str, list[tuple[str, str]]] = {}
                for mode in ("int8", "fp8"):
                    scr = [r for r in result["screen"] if r["mode"] == mode and isinstance(r.get("ms"), float)]
                    good = sorted((r for r in scr if _ok(r)), key=lambda r: r["ms"])[:2]
                    fastest = sorted(scr, key=lambda r: r["ms"])[:1]
                    sel = []
                    for r in good + fastest:
                        vt = _variant(r["config"])
                        if vt not in sel:
                            sel.append(vt)
                    picks[mode] = sel
                result["grid_variants"] = {m: [list(x) for x in p] for m, p in picks.items()}
                for bn, w, st in grid:
                    if sw.elapsed() > args.grid_budget_s:
                        result["grid_cut"] = f"grid stopped at {sw.elapsed():.0f}s (--grid-budget-s)"
                        sw.log("  grid: budget spent, stopping")
                        break
                    for mode in ("int8", "fp8"):
                        for qk, pv in picks[mode]:
                            cfg = {"BLOCK_N": bn, "num_warps": w, "num_stages": st, "QK": qk, "PV": pv}
                            if cfg == {**tile, "QK": qk, "PV": pv}:
                                continue  # timed in the screen
                            result["grid"].append(go(mode, cfg, None, "grid"))
                for mode in ("int8", "fp8"):
                    if picks[mode]:
                        qk, pv = picks[mode][0]
                        result["grid"].append(go(mode, {**tile, "QK": qk, "PV": pv, "BLOCK_M": 64}, None, "grid"))
                for mode in ("int8", "fp8"):
                    pool = [r for r in result["screen"] + result["grid"] if r["mode"] == mode and _ok(r)]
                    pool.sort(key=lambda r: r["ms"])
                    seen: list[dict[str, Any]] = []
                    for r in pool:
                        if r["config"] not in seen:
                            seen.append(r["config"])
                        if len(seen) == 3:
                            break
                    candidates[mode] = seen
                result["candidates"] = candidates
            # ---------------------------------------------------------------- phase 3: candidates x splits
            for mode in ("int8", "fp8"):
                for cfg in candidates[mode]:
                    for sp in sorted({ns, min(128, 2 * ns)}):
                        go(mode, cfg, sp, "shape")
            row["runs"] = runs
            for mode in ("int8", "fp8"):
                timed = [r for r in runs if r["mode"] == mode and isinstance(r.get("ms"), float)]
                good = [r for r in timed if _ok(r)]
                if good:
                    b = min(good, key=lambda r: r["ms"])
                    row[f"best_{mode}"] = {k2: b.get(k2) for k2 in ("label", "config", "splits", "ms", "pct_bw", "x_vs_bf16")}
                if timed:
                    f = min(timed, key=lambda r: r["ms"])
                    row[f"fastest_any_{mode}"] = {k2: f.get(k2) for k2 in ("label", "ms", "x_vs_bf16")}
                    row[f"fastest_any_{mode}"]["parity_ok"] = _ok(f)
            # ---------------------------------------------------------------- phase 4: sparse decode
            if (N, B) == sparse_shape and not args.no_sparse and sw.elapsed() < args.budget_s + 20:
                dense_ms = bms
                for ps in ((16, 32) if smoke else (16, 32, 64)):
                    rec: dict[str, Any] = {"ctx": N, "B": B, "page_size": ps, "top_pages": 0.1, "dense_bf16_ms": dense_ms}
                    try:
                        summ = page_summaries(k, ps, seqlens=sl)
                        rec["select_ms"] = sw.time_ms(lambda: select_pages(q, summ, seqlens=sl, top_pages=0.1,
                                                                           backend="triton"))
                        rec["total_ms"] = sw.time_ms(lambda: sparse_decode_attention(
                            q, k, v, summ, seqlens=sl, top_pages=0.1, backend="triton"))
                        rec["attention_ms_est"] = rec["total_ms"] - rec["select_ms"]
                        rec["x_vs_dense"] = dense_ms / rec["total_ms"]
                        sw.log(f"  sparse page {ps}: select {rec['select_ms']:.3f} ms, total {rec['total_ms']:.3f} ms, "
                               f"x{rec['x_vs_dense']:.2f} vs dense {dense_ms:.3f} ms")
                        del summ
                    except Exception as exc:  # noqa: BLE001
                        rec["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                        sw.log(f"  sparse page {ps}: {rec['error'][:120]}")
                    result["sparse"].append(rec)
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory: record and go on
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            row["traceback"] = traceback.format_exc()[-2000:]
            sw.log(f"  shape failed: {row['error'][:160]}")
        finally:
            inp = refs = k = v = q = None  # noqa: F841
            if not smoke:
                torch.cuda.empty_cache()
        result["shapes"].append(row)
        (out_dir / "decode_int8_sweep.json").write_text(json.dumps(result, indent=1, default=str))

    # ---------------------------------------------------------------- phase 5: accuracy
    if sw.elapsed() < args.budget_s + 30:
        try:
            result["accuracy"] = accuracy_section(sw, 96 if smoke else 4096)
        except Exception as exc:  # noqa: BLE001
            result["accuracy_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    else:
        result["accuracy_error"] = "skipped: time budget spent"

    # ---------------------------------------------------------------- tables
    print("\nall timed launches (variant, config, ms, %bw, bf16/quant)")
    print(f"{'ctx':>7} {'B':>3} {'mode':4} {'launch':54} {'ms':>8} {'%bw':>5} {'x':>5} parity")
    for row in result["shapes"]:
        for r in sorted(row.get("runs", []), key=lambda r: (r["mode"], r["ms"] if isinstance(r.get("ms"), float) else 1e9)):
            if isinstance(r.get("ms"), float):
                print(f"{row['ctx']:>7} {row['B']:>3} {r['mode']:4} {r['label']:54} {r['ms']:8.3f} {r['pct_bw']:5.0f} "
                      f"{r['x_vs_bf16']:5.2f} {'ok' if _ok(r) else 'FAIL'}")
            else:
                print(f"{row['ctx']:>7} {row['B']:>3} {r['mode']:4} {r['label']:54} failed: {r.get('error', '')[:60]}")
    if result["sparse"]:
        print("\nsparse decode (10% of pages, selection included)")
        for r in result["sparse"]:
            if "total_ms" in r:
                print(f"  ctx {r['ctx']} B {r['B']} page {r['page_size']:3d}: select {r['select_ms']:.3f} ms, total "
                      f"{r['total_ms']:.3f} ms, dense bf16 {r['dense_bf16_ms']:.3f} ms, x{r['x_vs_dense']:.2f}")
            else:
                print(f"  page {r['page_size']}: {r.get('error')}")
    print("\nbest per (ctx, B) (parity ok only; 'any' = fastest regardless of parity)")
    print(f"{'ctx':>7} {'B':>3} {'bf16 ms':>8} {'bf16 %bw':>8} | {'int8 best':60} {'ms':>7} {'%bw':>4} {'x':>5} "
          f"| {'fp8 best':60} {'ms':>7} {'x':>5} | any int8 x | any fp8 x")
    for row in result["shapes"]:
        if "bf16" not in row:
            print(f"{row['ctx']:>7} {row['B']:>3} {row.get('skipped') or row.get('error', '')[:100]}")
            continue
        bi, bf = row.get("best_int8", {}), row.get("best_fp8", {})
        ai, af = row.get("fastest_any_int8", {}), row.get("fastest_any_fp8", {})

        def fx(d: dict[str, Any], key: str, fmt: str) -> str:
            val = d.get(key)
            return format(val, fmt) if isinstance(val, float) else "-"

        print(f"{row['ctx']:>7} {row['B']:>3} {row['bf16']['ms']:8.3f} {row['bf16']['pct_bw']:8.0f} | "
              f"{str(bi.get('label', '-')):60} {fx(bi, 'ms', '7.3f')} {fx(bi, 'pct_bw', '4.0f')} {fx(bi, 'x_vs_bf16', '5.2f')} | "
              f"{str(bf.get('label', '-')):60} {fx(bf, 'ms', '7.3f')} {fx(bf, 'x_vs_bf16', '5.2f')} | "
              f"{fx(ai, 'x_vs_bf16', '5.2f')} | {fx(af, 'x_vs_bf16', '5.2f')}")
    result["elapsed_s"] = sw.elapsed()
    (out_dir / "decode_int8_sweep.json").write_text(json.dumps(result, indent=1, default=str))
    print(f"\nwrote {out_dir / 'decode_int8_sweep.json'} in {sw.elapsed():.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
