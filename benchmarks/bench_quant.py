"""Quantized block-sparse attention benchmark (INT8 Q·Kᵀ, INT8+FP8) against bf16 and cuDNN SDPA.

Main table (H200 default: 32K causal, H=32, H_kv=8, D=128, bf16 inputs, random layouts that keep the
diagonal, 128x128 blocks):

* ``sdpa_cudnn`` dense bf16; ``bf16`` our kernel dense and at density 0.1;
* ``int8`` / ``int8_fp8`` x ``per_warp`` / ``per_thread`` / ``per_block`` / ``per_token`` x dense / density 0.1, timed
  end to end through :func:`sparseattn.ops.quant.quantized_attention` — **the quantization kernels
  are inside the timed call** — plus the quantization alone (``quant_ms``) and the attention kernel
  alone on pre-quantized operands (``kernel_ms``); every row smooths Q and K and balances their channels (the
  defaults) except ``int8/per_warp/k_smoothing_only`` and ``int8_fp8/per_warp/k_smoothing_only`` (the kernel before
  2026-12-05), which give the cost of both in the same run;
* accuracy of every row: cosine and relative L1 against fp32 attention on the last ``--parity-rows``
  query rows (which see every key), and peak extra memory of one call.

Then a pattern sweep at smaller sizes (random / local / strided / block_diagonal x top-k ratios x
lengths: bf16 vs int8 vs int8_fp8, per_warp) and, with ``--stress N``, ``N`` random shapes checked
kernel-vs-emulation (:mod:`sparseattn.ops.quant_reference` on the kernel's own quantized operands,
tolerances ``QUANT_GPU_*``).

``--cpu-smoke`` runs a tiny version of everything under ``TRITON_INTERPRET=1`` (FP8 through the
in-kernel e4m3 emulation; times are interpreter wall-clock, meaningless) so the script is exercised
without a GPU.

Writes ``quant.json`` to ``--out`` (default ``$OUT`` or ``.``) and prints a markdown table last.

``--qkv PATH`` instead measures accuracy on real Q/K/V written by ``sparseattn collect`` (a collection
root, one ``len<N>`` folder or one ``.safetensors``; :mod:`sparseattn.eval.quant_accuracy`): per file
and layer, cosine / relative L1 of bf16 attention and of every ``--qkv-modes`` x ``--qkv-grans``
quantized row against fp32 attention, dense causal or with ``--qkv-predictor``'s layout, and whether
the target (cos >= 0.9995, rel L1 <= 0.02) holds. Writes ``quant_qkv.json`` / ``quant_qkv.md``; exit
status 0 (the verdict is in the files). On a CPU add ``--cpu-smoke`` (TRITON_INTERPRET=1) or, at real lengths,
``--qkv-emulate`` (the emulation). ``--qkv-smooth-q both`` / ``--qkv-balance both`` add every quantized row without
Q smoothing / without Q/K balancing.

Usage (GPU): ``PYTHONPATH=src python3 benchmarks/bench_quant.py --out $OUT [--stress 40] [--budget-s 220]``
and ``PYTHONPATH=src python3 benchmarks/bench_quant.py --qkv qkv/ --qkv-grans per_warp,per_thread --out $OUT``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Callable

if "--cpu-smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from sparseattn.layout.block_layout import BlockLayout  # noqa: E402
from sparseattn.layout.patterns import pattern_at_density, random_layout  # noqa: E402
from sparseattn.ops import quant as Q  # noqa: E402
from sparseattn.ops.quant_reference import attention_from_quantized  # noqa: E402
from sparseattn.ops.reference import reference_attention  # noqa: E402
from sparseattn.testing import tolerances as T  # noqa: E402

GRANS = ("per_warp", "per_thread", "per_block", "per_token")
_ON_OFF = {"on": (True,), "off": (False,), "both": (True, False)}  # --qkv-smooth-q / --qkv-balance


def _env() -> dict[str, Any]:
    from sparseattn.eval.env import environment

    info = environment()
    if info["gpu"] is None:
        info["gpu"] = "none (TRITON_INTERPRET=1)"
    return info


def _time_ms(fn: Callable[[], Any], cpu: bool) -> float:
    if cpu:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    from sparseattn.testing.timing import bench_ms

    return bench_ms(fn)


def _peak(fn: Callable[[], Any], cpu: bool) -> int | None:
    if cpu:
        return None
    from sparseattn.testing.timing import peak_memory_bytes

    return peak_memory_bytes(fn)


def _tail(layout: BlockLayout | None, rows: int, B: int, H: int, Nq: int, Nkv: int, causal: bool,
          dev: str) -> BlockLayout | None:
    if layout is None:
        return None
    mb = rows // layout.block_m
    return BlockLayout(layout.kv_num_blocks[:, :, -mb:], layout.kv_indices[:, :, -mb:], layout.block_m, layout.block_n,
                       rows, layout.seqlen_kv, validate=False)


class _Ref:
    """fp32 reference on the last ``rows`` query rows, per layout (cached)."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, rows: int) -> None:
        self.q, self.k, self.v, self.causal = q, k, v, causal
        self.rows = min(rows, q.shape[2]) // 128 * 128 or q.shape[2]
        self.cache: dict[int, torch.Tensor] = {}

    def accuracy(self, out: torch.Tensor, layout: BlockLayout | None) -> dict[str, float]:
        key = id(layout)
        r = self.rows
        if key not in self.cache:
            lay = _tail(layout, r, *self.q.shape[:2], self.q.shape[2], self.k.shape[2], self.causal, str(self.q.device))
            ref = reference_attention(self.q[:, :, -r:].float(), self.k.float(), self.v.float(), layout=lay,
                                      causal=self.causal).out
            self.cache[key] = ref
        cos, rel = T.quant_accuracy(out[:, :, -r:], self.cache[key])
        return {"cos": cos, "rel_l1": rel}


def _layout(N: int, density: float, B: int, H: int, causal: bool, dev: str, pattern: str = "random",
            bs: int = 128) -> BlockLayout | None:
    if density >= 1.0:
        return None
    if pattern == "random":
        return random_layout(N, N, density=density, seed=1234, block_m=bs, block_n=bs, batch=B, heads=H, causal=causal,
                             keep_diagonal=True, device=dev)
    return pattern_at_density(pattern, N, N, density=density, causal=causal, block_m=bs, block_n=bs, batch=B,
                              heads=H, device=dev)


def main_rows(args: argparse.Namespace, cpu: bool, deadline: float,
              autotune_log: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from sparseattn.ops.triton_launch import block_sparse_fwd

    dev = "cpu" if cpu else "cuda"
    B, H, Hkv, N, D = 1, args.heads, args.kv_heads, args.seqlen, args.head_dim
    causal = True
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(B, h, N, D, generator=g, device=dev, dtype=torch.float32).to(torch.bfloat16)
               for h in (H, Hkv, Hkv))
    ref = _Ref(q, k, v, causal, args.parity_rows)
    rows: list[dict[str, Any]] = []
    layouts = {d: _layout(N, d, B, H, causal, dev) for d in (1.0, 0.1)}

    def add(name: str, density: float, fn: Callable[[], Any], extra: dict[str, Any] | None = None) -> None:
        if time.time() > deadline:
            rows.append({"row": name, "density": density, "skipped": "budget"})
            return
        row: dict[str, Any] = {"row": name, "density": density}
        try:
            res = fn()
            out = res[0] if isinstance(res, tuple) else res
            row.update(ref.accuracy(out, layouts[density]))
            row["ms"] = _time_ms(fn, cpu)
            row["peak_mem_mb"] = (lambda p: None if p is None else round(p / 2**20, 1))(_peak(fn, cpu))
        except Exception as exc:  # a row that cannot run is reported, not fatal
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        if extra:
            row.update(extra)
        rows.append(row)
        print(json.dumps(row), flush=True)

    if not cpu:
        from sparseattn.testing.timing import sdpa_runners

        run = sdpa_runners(q, k, v, causal).get("cudnn")
        if callable(run):
            add("sdpa_cudnn_bf16", 1.0, run)
        else:
            rows.append({"row": "sdpa_cudnn_bf16", "density": 1.0, "error": str(run)})
    for d in (1.0, 0.1):
        add("bf16", d, lambda d=d: block_sparse_fwd(q, k, v, layout=layouts[d], causal=causal))
    # priority order: per_warp first (the budget may cut the tail), then per_warp with K smoothing only (no Q smoothing,
    # no Q/K balancing: the kernel before 2026-12-05, so the two rows give their cost in one run)
    grans = [g for g in GRANS if g in args.grans.split(",")]
    variants = [(grans[0], True), (grans[0], False)] + [(g, True) for g in grans[1:]] if grans else []
    for gran, sq in variants:
        for quant in args.modes.split(","):
            for d in (1.0, 0.1):
                lay = layouts[d]
                fn = (lambda d=d, quant=quant, gran=gran, sq=sq:
                      Q.quantized_attention(q, k, v, layout=layouts[d], causal=causal, quant=quant, quant_granularity=gran,
                                            smooth_q=sq, balance_qk=sq))
                extra: dict[str, Any] = {}
                if time.time() < deadline:
                    try:
                        qfn = lambda quant=quant, gran=gran, sq=sq: Q.quantize_qkv(  # noqa: E731
                            q, k, v, quant=quant, quant_granularity=gran, smooth_q=sq, balance_qk=sq)
                        qq = qfn()
                        full = lay if lay is not None else Q.resolve_layout("bench", q, k, None, None, 128, causal)
                        extra["quant_ms"] = _time_ms(qfn, cpu)
                        tele: dict[str, Any] = {}
                        extra["kernel_ms"] = _time_ms(lambda: Q.quantized_attention_from(qq, full, causal=causal,
                                                                                         telemetry=tele), cpu)
                        extra["config"] = dict(tele["config"])
                        if tele.get("tune") is not None:
                            autotune_log.append(tele["tune"])
                        del qq
                    except Exception as exc:
                        extra["split_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                add(f"{quant}/{gran}" + ("" if sq else "/k_smoothing_only"), d, fn, extra)
    return rows


def pattern_rows(args: argparse.Namespace, cpu: bool, deadline: float) -> list[dict[str, Any]]:
    from sparseattn.ops.triton_launch import block_sparse_fwd

    dev = "cpu" if cpu else "cuda"
    B, H, Hkv, D = 1, args.pattern_heads, max(1, args.pattern_heads // 4), args.head_dim
    lengths = [256] if cpu else [4096, 16384]
    ratios = [0.25] if cpu else [0.05, 0.1, 0.25]
    out: list[dict[str, Any]] = []
    for N in lengths:
        g = torch.Generator(device=dev).manual_seed(N)
        q, k, v = (torch.randn(B, h, N, D, generator=g, device=dev, dtype=torch.float32).to(torch.bfloat16)
                   for h in (H, Hkv, Hkv))
        ref = _Ref(q, k, v, True, args.parity_rows)
        for pattern in ("random", "local", "strided", "block_diagonal"):
            for ratio in ratios:
                if time.time() > deadline:
                    out.append({"pattern": pattern, "seqlen": N, "topk_ratio": ratio, "skipped": "budget"})
                    continue
                lay = _layout(N, ratio, B, H, True, dev, pattern, bs=64 if cpu else 128)
                row: dict[str, Any] = {"pattern": pattern, "seqlen": N, "topk_ratio": ratio,
                                       "density": round(float(lay.density(True)), 4) if lay is not None else 1.0}
                runs = {"bf16": lambda: block_sparse_fwd(q, k, v, layout=lay, causal=True).out}
                for quant in ("int8", "int8_fp8"):
                    runs[quant] = lambda quant=quant: Q.quantized_attention(q, k, v, layout=lay, causal=True, quant=quant)
                for name, fn in runs.items():
                    try:
                        o = fn()
                        acc = ref.accuracy(o, lay)
                        ref.cache.clear()  # one layout at a time
                        row[f"{name}_ms"] = _time_ms(fn, cpu)
                        row[f"{name}_cos"] = acc["cos"]
                        row[f"{name}_rel_l1"] = acc["rel_l1"]
                    except Exception as exc:
                        row[f"{name}_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                out.append(row)
                print(json.dumps(row), flush=True)
    return out


def stress_rows(n: int, cpu: bool, deadline: float, autotune_log: list[dict[str, Any]] | None = None,
                seed: int = 0) -> list[dict[str, Any]]:
    """``n`` random shapes: kernel vs the emulation on the kernel's own quantized operands."""
    dev = "cpu" if cpu else "cuda"
    rng = torch.Generator().manual_seed(seed)
    rtol = T.QUANT_PARITY_RTOL if cpu else T.QUANT_GPU_PARITY_RTOL
    atol = T.QUANT_PARITY_ATOL if cpu else T.QUANT_GPU_PARITY_ATOL
    latol = T.QUANT_LSE_ATOL if cpu else T.QUANT_GPU_LSE_ATOL
    out = []

    def pick(xs: list[Any]) -> Any:
        return xs[int(torch.randint(len(xs), (1,), generator=rng))]

    for i in range(n):
        if time.time() > deadline:
            out.append({"case": i, "skipped": "budget"})
            continue
        D = pick([64, 128] if cpu else [64, 128, 256])
        Hkv = pick([1, 2])
        H = Hkv * pick([1, 2, 4])
        Nkv = pick([64, 100, 200, 333] if cpu else [128, 1000, 2048, 4097])
        causal = bool(pick([True, False]))
        Nq = Nkv if causal and pick([0, 1]) else max(1, Nkv - pick([0, 37, 64]))
        bs = pick([64, 128])
        quant = pick(list(Q.QUANT_MODES))
        gran = pick(list(GRANS))
        density = pick([1.0, 0.5, 0.2])
        case = {"case": i, "D": D, "H": H, "H_kv": Hkv, "N_q": Nq, "N_kv": Nkv, "causal": causal, "block": bs,
                "quant": quant, "gran": gran, "density": density}
        try:
            g = torch.Generator(device=dev).manual_seed(1000 + i)
            q = torch.randn(1, H, Nq, D, generator=g, device=dev).to(torch.bfloat16)
            k = torch.randn(1, Hkv, Nkv, D, generator=g, device=dev).to(torch.bfloat16)
            v = torch.randn(1, Hkv, Nkv, D, generator=g, device=dev).to(torch.bfloat16)
            lay = random_layout(Nq, Nkv, density=density, seed=i, block_m=bs, block_n=bs, heads=H, causal=causal,
                                device=dev)
            tele: dict[str, Any] = {}
            st = Q.quantized_attention(q, k, v, layout=lay, causal=causal, quant=quant, quant_granularity=gran,
                                       return_lse=True, telemetry=tele)
            if tele.get("tune") is not None and autotune_log is not None:
                autotune_log.append(tele["tune"])
            qq = Q.quantize_qkv(q, k, v, quant=quant, quant_granularity=gran)
            eo, el = attention_from_quantized(qq, lay, causal=causal, out_dtype=torch.float32,
                                              tile_n=tele["config"]["BLOCK_N"])
            a, b = st.out.double(), eo.double()
            fin = torch.isfinite(b)
            same_fin = bool(torch.equal(torch.isfinite(a), fin))
            excess = float(((a - b).abs() - (rtol * b.abs() + atol))[fin].max()) if bool(fin.any()) else 0.0
            lfin = torch.isfinite(el)
            lerr = float((st.lse - el).abs()[lfin].max()) if bool(lfin.any()) else 0.0
            case.update({"out_max_err": float((a - b).abs()[fin].max()) if bool(fin.any()) else 0.0,
                         "lse_max_err": lerr, "ok": same_fin and excess <= 0 and lerr <= latol})
        except Exception as exc:
            case.update({"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
        out.append(case)
        print(json.dumps(case), flush=True)
    return out


def table(main: list[dict[str, Any]]) -> str:
    lines = ["| row | density | ms (incl. quant) | quant ms | kernel ms | cos | rel L1 | peak MB |",
             "|---|---|---|---|---|---|---|---|"]

    def f(x: Any, fmt: str) -> str:
        return format(x, fmt) if isinstance(x, (int, float)) else "-"

    for r in main:
        if "error" in r or "skipped" in r:
            lines.append(f"| {r['row']} | {r['density']} | {r.get('error', r.get('skipped'))[:60]} | | | | | |")
            continue
        lines.append(f"| {r['row']} | {r['density']} | {f(r.get('ms'), '.3f')} | {f(r.get('quant_ms'), '.3f')} | "
                     f"{f(r.get('kernel_ms'), '.3f')} | {f(r.get('cos'), '.6f')} | {f(r.get('rel_l1'), '.4f')} | "
                     f"{f(r.get('peak_mem_mb'), '.0f')} |")
    return "\n".join(lines)


def _csv(text: str | None, conv: Callable[[str], Any], what: str) -> list[Any] | None:
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    try:
        return [conv(t) for t in items]
    except ValueError:
        raise ValueError(f"bench_quant.py: {what} must be comma-separated integers; got {text!r}") from None


def qkv_main(args: argparse.Namespace) -> int:
    """``--qkv``: accuracy on captured Q/K/V (one line on a user error, exit 2)."""
    from sparseattn.eval.quant_accuracy import captured_quant_accuracy, quant_accuracy_table

    if (not args.cpu_smoke and not args.qkv_emulate and not torch.cuda.is_available()
            and os.environ.get("TRITON_INTERPRET") != "1"):
        print("bench_quant.py: error: --qkv needs a CUDA GPU, --qkv-emulate, or --cpu-smoke (TRITON_INTERPRET=1) on "
              "the CPU",
              file=sys.stderr)
        return 2
    try:
        res = captured_quant_accuracy(
            args.qkv, modes=[m.strip() for m in args.qkv_modes.split(",") if m.strip()],
            granularities=[g.strip() for g in args.qkv_grans.split(",") if g.strip()],
            layers=_csv(args.qkv_layers, int, "--qkv-layers"), lengths=_csv(args.qkv_lengths, int, "--qkv-lengths"),
            predictor=args.qkv_predictor, dtype=getattr(torch, args.qkv_dtype), progress=True,
            smooth_q=_ON_OFF[args.qkv_smooth_q], balance_qk=_ON_OFF[args.qkv_balance],
            backend="emulation" if args.qkv_emulate else "kernel",
            device="cpu" if args.qkv_emulate and not torch.cuda.is_available() else None)
    except (ValueError, NotImplementedError) as exc:
        print(f"bench_quant.py: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    res["env"] = _env()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "quant_qkv.json")
    with open(path, "w") as fh:
        json.dump(res, fh, indent=1, default=str)
    md = quant_accuracy_table(res)
    with open(os.path.join(args.out, "quant_qkv.md"), "w") as fh:
        fh.write(md + "\n")
    print(f"\nwrote {path} ({res['wall_s']} s)")
    print(md)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny run under TRITON_INTERPRET=1 (no GPU)")
    ap.add_argument("--stress", type=int, nargs="?", const=40, default=0, metavar="N",
                    help="also check N random shapes kernel-vs-emulation (default 40 when given)")
    ap.add_argument("--budget-s", type=float, default=230.0, help="stop starting new rows after this many seconds")
    ap.add_argument("--seqlen", type=int, default=32768)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128, choices=(64, 128, 256))
    ap.add_argument("--pattern-heads", type=int, default=8, help="query heads of the pattern sweep")
    ap.add_argument("--parity-rows", type=int, default=512)
    ap.add_argument("--modes", default="int8,int8_fp8",
                    help="comma-separated quant modes of the main table (default int8,int8_fp8)")
    ap.add_argument("--grans", default=",".join(GRANS), help="comma-separated granularities of the main table")
    ap.add_argument("--no-patterns", action="store_true")
    ap.add_argument("--qkv", default=None, metavar="PATH",
                    help="accuracy on Q/K/V captured by 'sparseattn collect' (root, len<N> folder or .safetensors) "
                         "instead of the timing tables")
    ap.add_argument("--qkv-modes", default="int8,int8_fp8", help="comma-separated quant modes (default int8,int8_fp8)")
    ap.add_argument("--qkv-grans", default="per_warp", help="comma-separated granularities (default per_warp)")
    ap.add_argument("--qkv-layers", default=None, help="comma-separated layers (default: all captured)")
    ap.add_argument("--qkv-lengths", default=None, help="comma-separated lengths (default: all captured)")
    ap.add_argument("--qkv-predictor", default=None, metavar="SPEC",
                    help="predictor spec whose layout every row uses (default: dense causal)")
    ap.add_argument("--qkv-dtype", default="bfloat16", choices=("bfloat16", "float16"))
    ap.add_argument("--qkv-smooth-q", default="on", choices=tuple(_ON_OFF),
                    help="quantized rows with Q smoothing (on, the default), without it (off) or both")
    ap.add_argument("--qkv-balance", default="on", choices=tuple(_ON_OFF),
                    help="quantized rows with per-channel Q/K balancing (on, the default), without it (off) or both")
    ap.add_argument("--qkv-emulate", action="store_true",
                    help="--qkv through the PyTorch emulation (same scales and rounding as the kernel) instead of the "
                         "kernel: runs on a CPU at real lengths")
    args = ap.parse_args(argv)
    if args.qkv is not None:
        return qkv_main(args)
    cpu = args.cpu_smoke
    if cpu:
        args.seqlen, args.heads, args.kv_heads, args.head_dim, args.pattern_heads = 256, 4, 2, 64, 4
        args.parity_rows = 128
        args.stress = args.stress or 3
    elif not torch.cuda.is_available():
        print("bench_quant: needs a CUDA GPU (or --cpu-smoke)", file=sys.stderr)
        return 2
    t0 = time.time()
    deadline = t0 + args.budget_s
    res: dict[str, Any] = {"env": _env(), "args": vars(args),
                           "note": "ms includes the quantization kernels; quant_ms = quantization alone; kernel_ms = "
                                   "attention on pre-quantized operands; accuracy vs fp32 on the last parity_rows rows"}
    autotune_log: list[dict[str, Any]] = []  # the tune records the launches returned (telemetry["tune"])
    res["main"] = main_rows(args, cpu, t0 + args.budget_s * 0.65, autotune_log)
    res["patterns"] = [] if args.no_patterns else pattern_rows(args, cpu, t0 + args.budget_s * (0.85 if args.stress else 1.0))
    res["stress"] = stress_rows(args.stress, cpu, deadline, autotune_log) if args.stress else []
    if res["stress"]:
        res["stress_summary"] = {"cases": len(res["stress"]), "ok": sum(1 for c in res["stress"] if c.get("ok")),
                                 "skipped": sum(1 for c in res["stress"] if "skipped" in c)}
    res["autotune"] = list(autotune_log)
    res["wall_s"] = round(time.time() - t0, 1)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "quant.json")
    with open(path, "w") as fh:
        json.dump(res, fh, indent=1, default=str)
    print(f"\nwrote {path} ({res['wall_s']} s)")
    if res.get("stress_summary"):
        print(f"stress: {res['stress_summary']}")
    print(table(res["main"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
