"""Decode with programmatic dependent launch (``sparseattn.ops.decode.PDL_LAUNCH``; issue 14) against the plain
launches, beside cuDNN, same process, same inputs.

H=32, H_kv=8, D=128, one new token, bf16 q; every row graphed (one call per CUDA graph, replay timed by ``bench_ms``,
rounds alternated, median). Per (context, batch): dense decode (bf16 cache, the tuned config of
``ops/tuned/decode.json``; also with ``CTAS_PER_SM`` 1), the int8 cache, and sparse decode at 10% of 64-key pages
(selection included: four kernels in a chain), each with PDL off and on; SDPA's cuDNN backend (GQA) as the reference.
At batch 1 also **per call in a sequence of ``--layers`` calls** over as many independent caches (one graph of L calls,
replay / L): the cost of the call among a model's layers, where the previous layer's kernels precede it. PDL outputs
are compared with the plain ones bit for bit (``equal``). Writes ``decode_pdl.json`` under ``--out``, prints a table.

    python benchmarks/decode_pdl.py --out DIR [--contexts 32768 131072] [--batches 1 8 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Callable

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import torch  # noqa: E402

from bench_decode import copy_bandwidth, quantize_chunked  # noqa: E402  (this folder: the script's own)

import sparseattn.ops.decode as dec  # noqa: E402
from sparseattn.ops.decode import _default_config, decode_attention  # noqa: E402
from sparseattn.ops.pages import page_summaries, sparse_decode_attention  # noqa: E402
from sparseattn.ops.registry import device_name  # noqa: E402
from sparseattn.testing.timing import bench_ms, capture_graph  # noqa: E402

H, HKV, D = 32, 8, 128
PAGE = 64


def _graph_ms(fns: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float | str]:
    """Median replay ms of each function's one-call graph, rounds alternated (order reversed every other round)."""
    graphs: dict[str, Any] = {}
    res: dict[str, Any] = {}
    for name, fn in fns.items():
        try:
            graphs[name] = capture_graph(fn)
        except Exception as exc:  # noqa: BLE001 - reported in the row (e.g. a backend that refuses the shape)
            res[name] = f"{type(exc).__name__}: {str(exc)[:160]}"
    ms: dict[str, list[float]] = {n: [] for n in graphs}
    for r in range(rounds):
        for n in (list(graphs) if r % 2 == 0 else list(reversed(graphs))):
            ms[n].append(bench_ms(graphs[n]))
    for n, v in ms.items():
        res[n] = sorted(v)[len(v) // 2]
    return res


def _with_pdl(fn: Callable[[], Any], on: bool) -> Callable[[], Any]:
    """``fn`` run with :data:`sparseattn.ops.decode.PDL_LAUNCH` set to ``on`` (a graph captures the launches as made
    during its capture, so the flag matters there and in eager runs alike)."""
    def run() -> Any:
        dec.PDL_LAUNCH = on
        try:
            return fn()
        finally:
            dec.PDL_LAUNCH = False
    return run


def _equal(a: Any, b: Any) -> bool:
    ao, bo = (a.out, b.out) if hasattr(a, "out") else (a, b)
    return bool(torch.equal(ao, bo) and (not hasattr(a, "lse") or torch.equal(a.lse, b.lse)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--contexts", nargs="+", type=int, default=[32768, 131072])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--budget-s", type=float, default=300.0)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("decode_tma: needs a CUDA device")
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    t0 = time.time()
    dev = device_name(torch.device("cuda"))
    bw = copy_bandwidth("cuda", 1 << 29, bench_ms)["gbps_read_plus_write"]
    base = {kv: _default_config(D, 16, False, device=dev, kv=kv) for kv in ("none", "int8")}
    base_paged = _default_config(D, 16, False, paged=True, device=dev)
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  copy {bw:.0f} GB/s", flush=True)
    print(f"tuned: bf16 {base['none']}  int8 {base['int8']}  paged {base_paged}", flush=True)
    rows: list[dict[str, Any]] = []
    for n in a.contexts:
        for B in a.batches:
            if time.time() - t0 > a.budget_s:
                print("budget reached", flush=True)
                break
            g = torch.Generator(device="cuda").manual_seed(n + B)
            q = torch.randn(B, H, 1, D, device="cuda", dtype=torch.bfloat16, generator=g)
            k = torch.randn(B, HKV, n, D, device="cuda", dtype=torch.bfloat16, generator=g)
            v = torch.randn(B, HKV, n, D, device="cuda", dtype=torch.bfloat16, generator=g)
            sl = torch.full((B,), n - 3, dtype=torch.int32, device="cuda")  # a partial last tile
            row: dict[str, Any] = dict(ctx=n, B=B)
            b0 = base["none"]
            i0 = base["int8"]
            kq, kss = quantize_chunked(k, "int8")
            vq, vss = quantize_chunked(v, "int8")
            summ = page_summaries(k, PAGE, seqlens=sl)

            def dense(cfg: dict[str, Any] = b0) -> Any:
                return decode_attention(q, k, v, seqlens=sl, return_lse=True, backend="triton", config=cfg)

            def int8() -> Any:
                return decode_attention(q, kq, vq, k_scale=kss, v_scale=vss, seqlens=sl, return_lse=True,
                                        backend="triton", config=i0)

            def sparse() -> Any:
                return sparse_decode_attention(q, k, v, summ, seqlens=sl, top_pages=0.1, backend="triton",
                                               config=base_paged)

            def cudnn() -> Any:
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # all n keys (3 more)

            plain = {"dense": dense, "dense 1cta": lambda: dense(dict(b0, CTAS_PER_SM=1)), "int8": int8,
                     "sparse": sparse}
            dec.PDL_LAUNCH = False
            ref = {nm: f() for nm, f in plain.items()}
            dec.PDL_LAUNCH = True
            row["equal"] = {nm: _equal(f(), ref[nm]) for nm, f in plain.items()}
            fns: dict[str, Callable[[], Any]] = {"cudnn": cudnn}
            for nm, f in plain.items():
                fns[nm] = _with_pdl(f, False)
                fns[nm + " +pdl"] = _with_pdl(f, True)
            row["graph_ms"] = _graph_ms(fns, a.rounds)
            if B == 1 and a.layers > 1:  # per call among L layers: L independent caches, one graph of L calls
                L = a.layers
                ks_ = [k] + [torch.randn_like(k) for _ in range(L - 1)]
                vs_ = [v] + [torch.randn_like(v) for _ in range(L - 1)]
                sm_ = [summ] + [page_summaries(x, PAGE, seqlens=sl) for x in ks_[1:]]

                def seq(f: Callable[[int], Any]) -> Callable[[], Any]:
                    return lambda: [f(i) for i in range(L)]

                def cud(i: int) -> Any:
                    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                        return F.scaled_dot_product_attention(q, ks_[i], vs_[i], enable_gqa=True)

                dl = seq(lambda i: decode_attention(q, ks_[i], vs_[i], seqlens=sl, backend="triton", config=b0))
                sp = seq(lambda i: sparse_decode_attention(q, ks_[i], vs_[i], sm_[i], seqlens=sl, top_pages=0.1,
                                                           backend="triton", config=base_paged))
                lf = {"dense": _with_pdl(dl, False), "dense +pdl": _with_pdl(dl, True), "cudnn": seq(cud),
                      "sparse": _with_pdl(sp, False), "sparse +pdl": _with_pdl(sp, True)}
                row["per_call_in_layers_ms"] = {nm: (x / L if isinstance(x, float) else x)
                                                for nm, x in _graph_ms(lf, a.rounds).items()}
                del ks_, vs_, sm_
            dec.PDL_LAUNCH = False
            rows.append(row)
            print(f"--- ctx {n} B {B}  pdl equal to plain: {row['equal']}", flush=True)
            for nm, x in row["graph_ms"].items():
                print(f"  {nm:<22} {x * 1e3:>10.1f} us" if isinstance(x, float) else f"  {nm:<22} {x}", flush=True)
            for nm, x in row.get("per_call_in_layers_ms", {}).items():
                print(f"  [per call in {a.layers}] {nm:<18} {x * 1e3:>8.1f} us" if isinstance(x, float)
                      else f"  [per call] {nm} {x}", flush=True)
            k = v = kq = vq = kss = vss = summ = fns = ref = None  # the row's tensors go before the next row
            torch.cuda.empty_cache()
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "decode_pdl.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, copy_gbps=bw,
                       tuned=dict(bf16=base["none"], int8=base["int8"], paged=base_paged), rows=rows), f, indent=1)
    # summary: plain / PDL (one-call graphs; per call in layers at batch 1), and against cuDNN
    print("\nctx      B | dense plain/pdl | cudnn/dense(pdl) | dense 1cta plain/pdl | int8 plain/pdl | "
          "sparse plain/pdl | dense/sparse (pdl)")
    for r in rows:
        gm = r["graph_ms"]

        def ratio(x: str, y: str, d: dict[str, Any] = gm) -> str:
            return f"{d[x] / d[y]:.3f}" if isinstance(d.get(x), float) and isinstance(d.get(y), float) else "-"
        print(f"{r['ctx']:>6} {r['B']:>3} | {ratio('dense', 'dense +pdl'):>15} | {ratio('cudnn', 'dense +pdl'):>16} | "
              f"{ratio('dense 1cta', 'dense 1cta +pdl'):>20} | {ratio('int8', 'int8 +pdl'):>14} | "
              f"{ratio('sparse', 'sparse +pdl'):>16} | {ratio('dense', 'sparse +pdl'):>18}")
        if "per_call_in_layers_ms" in r:
            d = r["per_call_in_layers_ms"]
            print(f"{'':>10} | per call in {a.layers}: dense plain/pdl {ratio('dense', 'dense +pdl', d)}, "
                  f"cudnn/dense(pdl) {ratio('cudnn', 'dense +pdl', d)}, sparse plain/pdl "
                  f"{ratio('sparse', 'sparse +pdl', d)}, dense / sparse (pdl) {ratio('dense', 'sparse +pdl', d)}")


if __name__ == "__main__":
    main()
