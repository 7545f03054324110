"""Decode with K/V tiles through tensor descriptors (launch-config ``TMA``; issue 14) against the tuned pointer launch,
beside cuDNN, same process, same inputs.

H=32, H_kv=8, D=128, one new token, bf16 q; every row graphed (one call per CUDA graph, replay timed by ``bench_ms``,
rounds alternated, median). Per (context, batch):

* dense bf16 cache: the tuned config of ``ops/tuned/decode.json`` for this GPU, the same with ``TMA``, and a few TMA
  variants (tile, stages; ``CTAS_PER_SM``); SDPA's cuDNN backend (GQA) as the reference;
* int8 cache (per-token scales): the tuned int8 config and the same with ``TMA``;
* sparse decode at 10% of 64-key pages, selection included: the tuned paged config and the same with ``TMA``.

At batch 1 also **per call in a sequence of ``--layers`` calls** over as many independent caches (one graph of L
calls, replay / L): the cost of the call among a model's layers. Each TMA launch's output is compared with its
pointer launch's bit for bit (``equal``). Writes ``decode_tma.json`` under ``--out`` and prints a table.

    python benchmarks/decode_tma.py --out DIR [--contexts 32768 131072] [--batches 1 8 32] [--rounds 3]
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
            dense_cfgs = {"tuned": b0, "tuned+tma": dict(b0, TMA=True),
                          "n128s3+tma": dict(b0, BLOCK_N=128, num_stages=3, TMA=True),
                          "n64s4+tma": dict(b0, BLOCK_N=64, num_stages=4, TMA=True),
                          "tuned+tma+1cta": dict(b0, TMA=True, CTAS_PER_SM=1),
                          "tuned+tma+2cta": dict(b0, TMA=True, CTAS_PER_SM=2)}

            def dec(cfg: dict[str, Any], kc: torch.Tensor = k, vc: torch.Tensor = v, ks: Any = None,
                    vs: Any = None) -> Any:
                return decode_attention(q, kc, vc, k_scale=ks, v_scale=vs, seqlens=sl, return_lse=True,
                                        backend="triton", config=cfg)

            ref = dec(b0)
            row["dense_equal"] = {name: _equal(dec(c), ref) for name, c in dense_cfgs.items() if "tma" in name}

            def cudnn() -> Any:
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # all n keys (3 more)

            fns: dict[str, Callable[[], Any]] = {f"dense {nm}": (lambda c=c: dec(c)) for nm, c in dense_cfgs.items()}
            fns["cudnn"] = cudnn
            kq, kss = quantize_chunked(k, "int8")
            vq, vss = quantize_chunked(v, "int8")
            i0 = base["int8"]
            row["int8_equal"] = _equal(dec(dict(i0, TMA=True), kq, vq, kss, vss), dec(i0, kq, vq, kss, vss))
            fns["int8 tuned"] = lambda: dec(i0, kq, vq, kss, vss)
            fns["int8 tuned+tma"] = lambda: dec(dict(i0, TMA=True), kq, vq, kss, vss)
            summ = page_summaries(k, PAGE, seqlens=sl)

            def sparse(cfg: dict[str, Any]) -> Any:
                return sparse_decode_attention(q, k, v, summ, seqlens=sl, top_pages=0.1, backend="triton",
                                               config=cfg)

            row["sparse_equal"] = _equal(sparse(dict(base_paged, TMA=True)), sparse(base_paged))
            fns["sparse tuned"] = lambda: sparse(base_paged)
            fns["sparse tuned+tma"] = lambda: sparse(dict(base_paged, TMA=True))
            fns["sparse n64s3+tma"] = lambda: sparse(dict(base_paged, num_stages=3, TMA=True))
            row["graph_ms"] = _graph_ms(fns, a.rounds)
            try:  # cuDNN eager too, in case its graph capture is refused
                row["cudnn_eager_ms"] = bench_ms(cudnn)
            except Exception as exc:  # noqa: BLE001
                row["cudnn_eager_ms"] = f"{type(exc).__name__}: {str(exc)[:160]}"
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

                lf = {"dense tuned": seq(lambda i: decode_attention(q, ks_[i], vs_[i], seqlens=sl, backend="triton",
                                                                    config=b0)),
                      "dense tuned+tma": seq(lambda i: decode_attention(q, ks_[i], vs_[i], seqlens=sl,
                                                                        backend="triton", config=dict(b0, TMA=True))),
                      "cudnn": seq(cud),
                      "sparse tuned": seq(lambda i: sparse_decode_attention(
                          q, ks_[i], vs_[i], sm_[i], seqlens=sl, top_pages=0.1, backend="triton", config=base_paged)),
                      "sparse tuned+tma": seq(lambda i: sparse_decode_attention(
                          q, ks_[i], vs_[i], sm_[i], seqlens=sl, top_pages=0.1, backend="triton",
                          config=dict(base_paged, TMA=True)))}
                row["per_call_in_layers_ms"] = {nm: (x / L if isinstance(x, float) else x)
                                                for nm, x in _graph_ms(lf, a.rounds).items()}
                del ks_, vs_, sm_
            nbytes = 2 * B * HKV * (n - 3) * D * 2
            gm = row["graph_ms"]
            row["dense_tma_pct_copy_bw"] = (100.0 * nbytes / (gm["dense tuned+tma"] * 1e-3) / 1e9 / bw
                                            if isinstance(gm.get("dense tuned+tma"), float) else None)
            rows.append(row)
            print(f"--- ctx {n} B {B}  equal: dense {row['dense_equal']} int8 {row['int8_equal']} "
                  f"sparse {row['sparse_equal']}", flush=True)
            for nm, x in gm.items():
                print(f"  {nm:<22} {x * 1e3:>10.1f} us" if isinstance(x, float) else f"  {nm:<22} {x}", flush=True)
            for nm, x in row.get("per_call_in_layers_ms", {}).items():
                print(f"  [per call in {a.layers}] {nm:<18} {x * 1e3:>8.1f} us" if isinstance(x, float)
                      else f"  [per call] {nm} {x}", flush=True)
            k = v = kq = vq = kss = vss = summ = fns = None  # the row's tensors go before the next row
            torch.cuda.empty_cache()
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "decode_tma.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, copy_gbps=bw,
                       tuned=dict(bf16=base["none"], int8=base["int8"], paged=base_paged), rows=rows), f, indent=1)
    # summary: ratios against the tuned pointer launch and cuDNN (one-call graphs; per call in layers at batch 1)
    print("\nctx      B | tma/tuned dense | dense tma vs cudnn | int8 tuned/tma | bf16/int8(tma) | sparse tuned/tma | "
          "dense/sparse(tma)")
    for r in rows:
        gm = r["graph_ms"]

        def ratio(x: str, y: str, d: dict[str, Any] = gm) -> str:
            return f"{d[x] / d[y]:.3f}" if isinstance(d.get(x), float) and isinstance(d.get(y), float) else "-"
        print(f"{r['ctx']:>6} {r['B']:>3} | {ratio('dense tuned', 'dense tuned+tma'):>15} | "
              f"{ratio('cudnn', 'dense tuned+tma'):>18} | {ratio('int8 tuned', 'int8 tuned+tma'):>14} | "
              f"{ratio('dense tuned', 'int8 tuned+tma'):>14} | {ratio('sparse tuned', 'sparse tuned+tma'):>16} | "
              f"{ratio('dense tuned', 'sparse tuned+tma'):>17}")
        if "per_call_in_layers_ms" in r:
            d = r["per_call_in_layers_ms"]
            print(f"{'':>10} | per call in {a.layers}: tuned/tma {ratio('dense tuned', 'dense tuned+tma', d)}, "
                  f"cudnn/tma {ratio('cudnn', 'dense tuned+tma', d)}, sparse tuned/tma "
                  f"{ratio('sparse tuned', 'sparse tuned+tma', d)}, dense tuned / sparse tma "
                  f"{ratio('dense tuned', 'sparse tuned+tma', d)}")


if __name__ == "__main__":
    main()
