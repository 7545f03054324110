"""Sliding-window and packed-document attention on the GPU: parity, then timing against what models run today.

Usage (one device call)::

    python benchmarks/gpu_sliding_window.py --out $OUT [--quick] [--reps 10] [--suite window|documents|all]

1. Parity, once per shape before any timing: the Triton kernel (``attention(..., causal=True,
   sliding_window=W)``, layout=None, i.e. the cached band layout) against the PyTorch reference in
   float32 (bf16 inputs upcast), with the ratio rule of :mod:`sparseattn.testing.tolerances`.
2. Timing (bf16, B=1), median of ``--reps`` (>= 5) CUDA-event timings after warm-up, each call
   bracketed by ``torch.cuda.synchronize()``:

   * ``ours``: our kernel with the window (band only);
   * ``sdpa_mask``: SDPA with the equivalent boolean ``[N, N]`` mask (what an explicit-mask path runs;
     PyTorch picks cuDNN / efficient / math by itself);
   * ``sdpa_causal``: SDPA ``is_causal=True`` dense, what transformers' sdpa path effectively costs
     (it computes the whole causal square);
   * ``flex``: FlexAttention with a sliding-window ``mask_mod`` (block mask built once, outside the
     timing; compiled), if importable.

Grid: N in 4096 / 8192 / 32768, W in 512 / 4096, D in 128 / 256, (H, H_kv) in (8, 1) / (32, 8).
``sdpa_mask`` is skipped where the mask would exceed ``--max-mask-gib``. A table is printed last;
JSON goes to ``--out/gpu_sliding_window.json``.

Packed documents (``--suite documents`` or ``all``, the default): causal attention over ``N`` tokens
packed from several documents, exact document mask (``attention(..., causal=True, cu_seqlens=cu)``:
the kernel's ``HAS_ROW_BOUNDS`` on the cached exact layout), bf16, D=128, (H, H_kv) = (32, 8):
8 documents of 4096 at N=32768 (the headline row), 4 x 2048 at N=8192, and uneven documents
(lengths 1, 511, 7000, 300, 16956, 8000 at N=32768). Against ``sdpa_mask`` (cuDNN SDPA, forced with
``sdpa_kernel(CUDNN_ATTENTION)``, with the equivalent boolean ``[N, N]`` mask; if cuDNN refuses the
mask, PyTorch's own choice, named in ``sdpa_mask_backend``), ``sdpa_causal`` (dense causal, what
ignoring the documents costs) and ``flex`` (FlexAttention with the same document ``mask_mod``).
Parity as above (the last 1024 queries at N=32768). JSON: ``--out/gpu_documents.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

from sparseattn import attention, reference_attention
from sparseattn.testing.tolerances import check_ratio


def _environment() -> dict:
    """The one environment record (:func:`sparseattn.eval.env.environment`); "device" keeps this report's
    wording (the GPU's name)."""
    from sparseattn.eval.env import environment

    return {**environment("cuda"), "device": torch.cuda.get_device_name()}


def window_mask(Nq: int, Nkv: int, W: int, device: str) -> torch.Tensor:
    i = torch.arange(Nq, device=device)[:, None] + (Nkv - Nq)
    j = torch.arange(Nkv, device=device)[None, :]
    return (j <= i) & (j > i - W)


def time_ms(fn, reps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def window_flops(N: int, W: int, H: int, D: int) -> float:
    """Multiply-adds of QK^T and PV over the attended pairs only (x2 for FLOPs, x2 for the two matmuls)."""
    pairs = sum(min(i + 1, W) for i in range(N)) if N <= 65536 else N * W
    return 4.0 * pairs * H * D


def flex_fn(q, k, v, W: int):
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except Exception as exc:  # noqa: BLE001
        return None, f"flex_attention not importable: {type(exc).__name__}: {exc}"
    N = q.shape[2]
    off = k.shape[2] - N

    def mask_mod(b, h, qi, kj):
        return (kj <= qi + off) & (kj > qi + off - W)

    try:
        bm = create_block_mask(mask_mod, None, None, N, k.shape[2], device=q.device)
        compiled = torch.compile(flex_attention)
        G = q.shape[1] // k.shape[1]
        fn = lambda: compiled(q, k, v, block_mask=bm, enable_gqa=G > 1)  # noqa: E731
        fn()
        return fn, None
    except Exception as exc:  # noqa: BLE001
        return None, f"flex failed: {type(exc).__name__}: {str(exc)[:200]}"


def time_sdpa(q, k, v, W: int, reps: int, max_mask_gib: float) -> dict:
    """SDPA dense causal (what transformers' sdpa path costs) and SDPA with the window as a boolean mask."""
    N, Nkv = q.shape[2], k.shape[2]
    G = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    rec: dict = {"sdpa_causal_ms": time_ms(lambda: sdpa(q, kk, vv, is_causal=True), reps)}
    if N * Nkv / 2**30 <= max_mask_gib:
        mask = window_mask(N, Nkv, W, str(q.device))
        rec["sdpa_mask_ms"] = time_ms(lambda: sdpa(q, kk, vv, attn_mask=mask), reps)
    else:
        rec["sdpa_mask_ms"] = None
        rec["sdpa_mask_note"] = f"mask of {N * Nkv / 2**30:.1f} GiB skipped"
    return rec


def parity(q, k, v, W: int) -> dict:
    got = attention(q, k, v, causal=True, sliding_window=W, backend="triton")
    hi = reference_attention(q.float(), k.float(), v.float(), causal=True, sliding_window=W)
    lo = reference_attention(q, k, v, causal=True, sliding_window=W, upcast=False)
    rec = {"max_err_out": float((got.out.float() - hi.out).abs().max()),
           "ref_lowp_err_out": float((lo.out.float() - hi.out).abs().max())}
    try:
        check_ratio(got.out, hi.out, lo.out, "out")
        check_ratio(got.lse, hi.lse, lo.lse, "lse")
        rec["ok"] = True
    except AssertionError as exc:
        rec["ok"] = False
        rec["error"] = str(exc)
    return rec


# ---------------------------------------------------------------------------------------------- packed documents
DOC_CASES = [  # (name, N, document lengths); --quick keeps the first two
    ("8x4096", 32768, [4096] * 8),
    ("4x2048", 8192, [2048] * 4),
    ("uneven", 32768, [1, 511, 7000, 300, 16956, 8000]),
]


def doc_ids(lengths: list[int], device: str) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))


def doc_mask(lengths: list[int], Nq: int, device: str) -> torch.Tensor:
    """Bool ``[Nq, N]``: same document and causal (the queries are the last ``Nq`` positions)."""
    ids = doc_ids(lengths, device)
    N = ids.numel()
    i = torch.arange(N - Nq, N, device=device)
    return (ids[i][:, None] == ids[None, :]) & (torch.arange(N, device=device)[None, :] <= i[:, None])


def doc_flops(lengths: list[int], H: int, D: int) -> float:
    return 4.0 * sum(n * (n + 1) // 2 for n in lengths) * H * D


def flex_doc_fn(q, k, v, lengths: list[int]):
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except Exception as exc:  # noqa: BLE001
        return None, f"flex_attention not importable: {type(exc).__name__}: {exc}"
    ids = doc_ids(lengths, str(q.device))

    def mask_mod(b, h, qi, kj):
        return (ids[qi] == ids[kj]) & (kj <= qi)

    try:
        N = q.shape[2]
        bm = create_block_mask(mask_mod, None, None, N, N, device=q.device)
        compiled = torch.compile(flex_attention)
        G = q.shape[1] // k.shape[1]
        fn = lambda: compiled(q, k, v, block_mask=bm, enable_gqa=G > 1)  # noqa: E731
        fn()
        return fn, None
    except Exception as exc:  # noqa: BLE001
        return None, f"flex failed: {type(exc).__name__}: {str(exc)[:200]}"


def time_sdpa_docs(q, k, v, lengths: list[int], reps: int, max_mask_gib: float) -> dict:
    N = q.shape[2]
    G = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    rec: dict = {"sdpa_causal_ms": time_ms(lambda: sdpa(q, kk, vv, is_causal=True), reps)}
    if N * N / 2**30 > max_mask_gib:
        rec["sdpa_mask_ms"] = None
        rec["sdpa_mask_note"] = f"mask of {N * N / 2**30:.1f} GiB skipped"
        return rec
    mask = doc_mask(lengths, N, str(q.device))
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def cudnn():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return sdpa(q, kk, vv, attn_mask=mask)

        cudnn()
        rec["sdpa_mask_ms"] = time_ms(cudnn, reps)
        rec["sdpa_mask_backend"] = "cudnn"
    except Exception as exc:  # noqa: BLE001 - cuDNN may refuse a boolean mask: PyTorch's own choice then
        rec["sdpa_mask_note"] = f"cuDNN refused: {type(exc).__name__}: {str(exc)[:160]}"
        rec["sdpa_mask_ms"] = time_ms(lambda: sdpa(q, kk, vv, attn_mask=mask), reps)
        rec["sdpa_mask_backend"] = "auto"
    return rec


def doc_parity(q, k, v, cu: list[int]) -> dict:
    got = attention(q, k, v, causal=True, cu_seqlens=cu, backend="triton")
    hi = attention(q.float(), k.float(), v.float(), causal=True, cu_seqlens=cu, backend="reference")
    rec = {"max_err_out": float((got.out.float() - hi.out).abs().max())}
    try:
        # the same-dtype yardstick of the ratio rule (upcast=False is a reference_attention argument)
        lo = reference_attention(q, k, v, upcast=False, **_doc_ref_kwargs(q, k, cu))
        check_ratio(got.out, hi.out, lo.out, "out")
        check_ratio(got.lse, hi.lse, lo.lse, "lse")
        rec["ok"] = True
    except AssertionError as exc:
        rec["ok"] = False
        rec["error"] = str(exc)
    return rec


def _doc_ref_kwargs(q, k, cu: list[int]) -> dict:
    from sparseattn.layout.patterns import document_layout

    B, H, Nq = q.shape[:3]
    lay, b = document_layout(cu, seqlen_q=Nq, seqlen_kv=k.shape[2], heads=H, causal=True, device=q.device)
    return {"layout": lay, "causal": True, "row_bounds": b}


def run_documents(args: argparse.Namespace, reps: int, out_dir: Path) -> int:
    dev = "cuda"
    H, Hkv, D = 32, 8, 128
    cases = DOC_CASES[:2] if args.quick else DOC_CASES
    rows = []
    t_start = time.time()
    for name, N, lengths in cases:
        cu = [0]
        for n in lengths:
            cu.append(cu[-1] + n)
        g = torch.Generator(device=dev).manual_seed(N + len(lengths))
        q = torch.randn(1, H, N, D, device=dev, dtype=torch.bfloat16, generator=g)
        k = torch.randn(1, Hkv, N, D, device=dev, dtype=torch.bfloat16, generator=g)
        v = torch.randn(1, Hkv, N, D, device=dev, dtype=torch.bfloat16, generator=g)
        row: dict = {"case": name, "N": N, "docs": len(lengths), "D": D, "H": H, "H_kv": Hkv, "dtype": "bfloat16"}
        try:
            if N <= args.parity_max_n:
                row["parity"] = doc_parity(q, k, v, cu)
            else:
                row["parity"] = doc_parity(q[:, :, -1024:], k, v, cu)
                row["parity"]["note"] = "last 1024 queries over all keys"
            ours = lambda: attention(q, k, v, causal=True, cu_seqlens=cu, backend="triton")  # noqa: E731
            row["ours_ms"] = time_ms(ours, reps)
            row.update(time_sdpa_docs(q, k, v, lengths, reps, args.max_mask_gib))
            fn, why = flex_doc_fn(q, k, v, lengths)
            row["flex_ms"] = time_ms(fn, reps) if fn is not None else None
            if why:
                row["flex_note"] = why
            row["doc_tflops_ours"] = doc_flops(lengths, H, D) / (row["ours_ms"] * 1e9)
        except Exception as exc:  # noqa: BLE001 - record and keep going
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            row["traceback"] = traceback.format_exc()[-2000:]
        rows.append(row)
        print(json.dumps({k_: v_ for k_, v_ in row.items() if k_ != "traceback"}), flush=True)
        torch.cuda.empty_cache()
    meta = {**_environment(), "seconds": time.time() - t_start}
    (out_dir / "gpu_documents.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))

    def f(x):
        return "-" if x is None else f"{x:.3f}"

    hdr = f"{'case':>8} {'N':>6} {'docs':>4} {'parity':>6} {'ours':>8} {'sdpa_mask':>9} {'sdpa_causal':>11} {'flex':>8} {'TFLOPS':>7}"
    print("\n" + hdr)
    print("-" * len(hdr))
    bad = 0
    for r in rows:
        if "error" in r:
            bad += 1
            print(f"{r['case']:>8} {r['N']:>6} {r['docs']:>4} ERROR {r['error'][:80]}")
            continue
        ok = r["parity"]["ok"]
        bad += not ok
        print(f"{r['case']:>8} {r['N']:>6} {r['docs']:>4} {'ok' if ok else 'FAIL':>6} {f(r['ours_ms']):>8} "
              f"{f(r.get('sdpa_mask_ms')):>9} {f(r['sdpa_causal_ms']):>11} {f(r.get('flex_ms')):>8} "
              f"{r['doc_tflops_ours']:>7.1f}")
    print(f"\nms = median of {reps}; TFLOPS over the documents' causal pairs only. JSON: {out_dir / 'gpu_documents.json'}")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="N in 4096/8192 only, D=128 only")
    ap.add_argument("--max-mask-gib", type=float, default=4.0)
    ap.add_argument("--parity-max-n", type=int, default=8192, help="the fp32 reference is slow: parity up to this N")
    ap.add_argument("--suite", choices=("window", "documents", "all"), default="all",
                    help="sliding-window rows, packed-document rows, or both")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_sliding_window: needs a CUDA GPU", file=sys.stderr)
        return 2
    reps = max(5, args.reps)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    bad = 0
    if args.suite in ("window", "all"):
        bad += run_window(args, reps, out_dir)
    if args.suite in ("documents", "all"):
        bad += run_documents(args, reps, out_dir)
    return 1 if bad else 0


def run_window(args: argparse.Namespace, reps: int, out_dir: Path) -> int:
    dev = "cuda"
    Ns = (4096, 8192) if args.quick else (4096, 8192, 32768)
    Ds = (128,) if args.quick else (128, 256)
    rows = []
    t_start = time.time()
    for N in Ns:
        for W in (512, 4096):
            for D in Ds:
                for H, Hkv in ((8, 1), (32, 8)):
                    g = torch.Generator(device=dev).manual_seed(N * 7 + W + D + H)
                    q = torch.randn(1, H, N, D, device=dev, dtype=torch.bfloat16, generator=g)
                    k = torch.randn(1, Hkv, N, D, device=dev, dtype=torch.bfloat16, generator=g)
                    v = torch.randn(1, Hkv, N, D, device=dev, dtype=torch.bfloat16, generator=g)
                    row: dict = {"N": N, "W": W, "D": D, "H": H, "H_kv": Hkv, "dtype": "bfloat16"}
                    try:
                        if N <= args.parity_max_n:
                            row["parity"] = parity(q, k, v, W)
                        else:
                            # long rows: parity on the last 1024 queries (a chunk over the full keys)
                            row["parity"] = parity(q[:, :, -1024:], k, v, W)
                            row["parity"]["note"] = "last 1024 queries over all keys"
                        ours = lambda: attention(q, k, v, causal=True, sliding_window=W, backend="triton")  # noqa: E731
                        row["ours_ms"] = time_ms(ours, reps)
                        row.update(time_sdpa(q, k, v, W, reps, args.max_mask_gib))
                        fn, why = flex_fn(q, k, v, W)
                        row["flex_ms"] = time_ms(fn, reps) if fn is not None else None
                        if why:
                            row["flex_note"] = why
                        row["window_tflops_ours"] = window_flops(N, W, H, D) / (row["ours_ms"] * 1e9)
                    except Exception as exc:  # noqa: BLE001 - record and keep going
                        row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                        row["traceback"] = traceback.format_exc()[-2000:]
                    rows.append(row)
                    print(json.dumps({k_: v_ for k_, v_ in row.items() if k_ != "traceback"}), flush=True)
                    torch.cuda.empty_cache()
    meta = {**_environment(), "seconds": time.time() - t_start}
    (out_dir / "gpu_sliding_window.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))

    def f(x):
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"

    hdr = f"{'N':>6} {'W':>5} {'D':>4} {'H/Hkv':>6} {'parity':>6} {'ours':>8} {'sdpa_mask':>9} {'sdpa_causal':>11} {'flex':>8} " \
          f"{'x causal':>8} {'x flex':>7} {'TFLOPS':>7}"
    print("\n" + hdr)
    print("-" * len(hdr))
    bad = 0
    for r in rows:
        if "error" in r:
            bad += 1
            print(f"{r['N']:>6} {r['W']:>5} {r['D']:>4} {r['H']:>3}/{r['H_kv']:<2} ERROR {r['error'][:80]}")
            continue
        ok = r["parity"]["ok"]
        bad += not ok
        sc = r["sdpa_causal_ms"] / r["ours_ms"]
        fx = (r["flex_ms"] / r["ours_ms"]) if r.get("flex_ms") else None
        print(f"{r['N']:>6} {r['W']:>5} {r['D']:>4} {r['H']:>3}/{r['H_kv']:<2} {'ok' if ok else 'FAIL':>6} {f(r['ours_ms']):>8} "
              f"{f(r['sdpa_mask_ms']):>9} {f(r['sdpa_causal_ms']):>11} {f(r.get('flex_ms')):>8} {sc:>7.2f}x "
              f"{(f'{fx:.2f}x' if fx else '-'):>7} {r['window_tflops_ours']:>7.1f}")
    print(f"\nms = median of {reps}; 'x causal' = SDPA causal dense / ours; 'x flex' = FlexAttention / ours; "
          f"TFLOPS over the window's pairs only. JSON: {out_dir / 'gpu_sliding_window.json'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
