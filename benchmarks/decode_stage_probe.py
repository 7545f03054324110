"""Sparse decode on the GPU, stage by stage: where the time of one decode step goes (issue 14, batch 1).

Every stage is captured in its own CUDA graph and timed by replay (:func:`sparseattn.testing.timing.bench_ms`:
warm-up, then the median), on a bf16 cache of H=32, H_kv=8, D=128 (``--ctx``, ``--batch``):

* ``launch_floor``: a graph of one one-element kernel (what a graph replay costs by itself);
* ``dense``: :func:`decode_attention` over the whole cache;
* ``score``: the page-score kernel alone; ``pick/b{bits}w{warps}``: the radix pick alone (its radix width and
  warps); ``select``: :func:`select_pages` (both);
* ``paged/n{BLOCK_N}w{warps}s{stages}/splits{S}``: the paged attention over the selected pages (split kernel
  plus merge), a sweep of launch configs and split counts (``splits0``: the heuristic);
* ``sparse``: :func:`sparse_decode_attention` (selection included), and ``x = dense / sparse``.

Parity of the sparse result against :func:`decode_reference` over the same pages (ratio rule) is checked before
timing. Writes ``stage_probe.json`` under ``--out`` and prints a table. ``--ncu KIND`` (``bf16`` / ``int8`` /
``int8vk``: keys-contiguous V) instead runs the dense decode kernel twice on a cache of that kind (``--ctx``, the
first ``--batch``), for Nsight Compute
(``ncu -k regex:_decode_split --launch-skip 1 --launch-count 1``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from sparseattn.ops import pages as pages_mod  # noqa: E402
from sparseattn.ops.decode import decode_attention, decode_reference, paged_decode_attention, pages_key_mask  # noqa: E402
from sparseattn.ops.pages import page_summaries, select_pages, sparse_decode_attention  # noqa: E402
from sparseattn.testing.tolerances import check_ratio  # noqa: E402

H, HKV, D = 32, 8, 128
PAGED_CONFIGS = [(64, 4, 2), (32, 4, 2), (64, 4, 3), (128, 4, 2), (64, 8, 2)]
SPLITS = [0, 16, 32, 64, 96, 128]


SMOKE = False  # --cpu-smoke: every stage runs once on the CPU (Triton interpreter), timings are 0


def timed(fn) -> float:
    if SMOKE:
        fn()
        return 0.0
    from sparseattn.testing.timing import bench_ms, capture_graph

    return bench_ms(capture_graph(fn))


def ncu_run(kind: str, batch: int = 8, ctx: int = 131072) -> int:
    from sparseattn.state.kv_cache import quantize

    torch.manual_seed(0)
    B, N = batch, ctx
    q = torch.randn(B, H, 1, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, HKV, N, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    kw: dict[str, Any] = {}
    if kind in ("int8", "int8vk"):
        kq, ks = quantize(k, "int8")
        vq, vs = quantize(v, "int8")
        if kind == "int8vk":  # V stored keys-contiguous (the kernel's V_KEYS walk)
            from sparseattn.state.kv_cache import keys_contiguous

            vq = keys_contiguous(vq)
        k, v, kw = kq, vq, dict(k_scale=ks, v_scale=vs)
    for _ in range(2):
        decode_attention(q, k, v, backend="triton", **kw)
    torch.cuda.synchronize()
    print(f"ncu {kind} {B}x{N}: two launches done")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--ctx", type=int, default=131072)
    ap.add_argument("--batch", default="1,8", help="batch sizes (--ncu: the first; give it alone, e.g. 8)")
    ap.add_argument("--pages", default="64,32")
    ap.add_argument("--ncu", choices=["bf16", "int8", "int8vk"])
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="run every stage once on tiny shapes under TRITON_INTERPRET=1 (checks the script, no timing)")
    args = ap.parse_args(argv)
    global SMOKE, PAGED_CONFIGS, SPLITS
    dev = "cuda"
    if args.cpu_smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("decode_stage_probe: --cpu-smoke needs TRITON_INTERPRET=1", file=sys.stderr)
            return 2
        SMOKE, dev = True, "cpu"
        PAGED_CONFIGS, SPLITS = PAGED_CONFIGS[:2], [0, 4]
    elif not torch.cuda.is_available():
        print("decode_stage_probe: needs a CUDA device", file=sys.stderr)
        return 2
    if args.ncu:
        return ncu_run(args.ncu, int(args.batch.split(",")[0]), args.ctx)
    os.makedirs(args.out, exist_ok=True)
    res: dict[str, Any] = {"device": "cpu-smoke" if SMOKE else torch.cuda.get_device_name(), "torch": torch.__version__,
                           "rows": []}
    one = torch.zeros(1, device=dev)
    res["launch_floor"] = timed(lambda: one.add_(1))
    for B in (int(b) for b in args.batch.split(",")):
        torch.manual_seed(0)
        N = args.ctx
        q = torch.randn(B, H, 1, D, device=dev, dtype=torch.bfloat16)
        k = torch.randn(B, HKV, N, D, device=dev, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        sl = torch.full((B,), N, dtype=torch.int32, device=dev)
        dense = timed(lambda: decode_attention(q, k, v, seqlens=sl, backend="triton"))
        for ps in (int(p) for p in args.pages.split(",")):
            row: dict[str, Any] = {"B": B, "ctx": N, "page": ps, "dense": dense}
            summ = page_summaries(k, ps, seqlens=sl)
            sp, (pidx, pnum) = sparse_decode_attention(q, k, v, summ, seqlens=sl, top_pages=0.1, return_lse=True,
                                                       return_pages=True, backend="triton")
            mask = pages_key_mask(pidx, pnum, ps, N)
            hi = decode_reference(q[:1].float(), k[:1].float(), v[:1].float(), seqlens=sl[:1], key_mask=mask[:1])
            lo = decode_reference(q[:1], k[:1], v[:1], seqlens=sl[:1], key_mask=mask[:1], upcast=False)
            try:
                check_ratio(sp.out[:1], hi.out, lo.out, "sparse out")
                row["parity"] = "ok"
            except AssertionError as exc:
                row["parity"] = str(exc)[:200]
            del hi, lo, mask
            row["select"] = timed(lambda: select_pages(q, summ, seqlens=sl, top_pages=0.1, backend="triton"))
            # the pick alone, on the score kernel's own bounds and counts
            sc, cn, K = pages_mod._score_kernel(q, summ, sl, None, 0.1, 1, 1)
            picks = {}
            for bits in (4, 8):
                for warps in (4, 8, 16):
                    try:
                        picks[f"b{bits}w{warps}"] = timed(
                            lambda bits=bits, warps=warps: pages_mod._pick_kernel(sc, cn, K, bits=bits, warps=warps))
                    except Exception as exc:  # noqa: BLE001 - e.g. out of resources
                        picks[f"b{bits}w{warps}"] = f"{type(exc).__name__}: {str(exc)[:100]}"
            row["pick"] = picks
            # every radix width must pick what the selection picked (same scores)
            row["pick_agree"] = {f"b{bits}": bool(torch.equal(pages_mod._pick_kernel(sc, cn, K, bits=bits), pidx))
                                 for bits in (4, 8)}
            row["select_bits8"] = timed(lambda: pages_mod._select_kernel(q, summ, sl, None, 0.1, 1, 1, pick_bits=8))
            paged: dict[str, Any] = {}
            for bn, w, s in PAGED_CONFIGS:
                for S in SPLITS:
                    key = f"n{bn}w{w}s{s}/splits{S}"
                    cfg = {"BLOCK_N": bn, "num_warps": w, "num_stages": s}
                    try:
                        paged[key] = timed(lambda cfg=cfg, S=S: paged_decode_attention(
                            q, k, v, pidx, pnum, page_size=ps, seqlens=sl, num_splits=S or None, config=cfg,
                            backend="triton", check_seqlens=False))
                    except Exception as exc:  # noqa: BLE001
                        paged[key] = f"{type(exc).__name__}: {str(exc)[:100]}"
            row["paged"] = paged
            row["paged_default"] = timed(lambda: paged_decode_attention(
                q, k, v, pidx, pnum, page_size=ps, seqlens=sl, backend="triton", check_seqlens=False))
            row["sparse"] = timed(lambda: sparse_decode_attention(q, k, v, summ, seqlens=sl, top_pages=0.1,
                                                                  backend="triton"))
            row["x"] = dense / row["sparse"] if row["sparse"] > 0 else float("nan")
            res["rows"].append(row)
            fl = {kk: vv for kk, vv in paged.items() if isinstance(vv, float)}
            best = min(fl, key=fl.get) if fl else None
            pk = {kk: vv for kk, vv in picks.items() if isinstance(vv, float)}
            print(f"B={B} page={ps} parity={row['parity']} dense {dense:.4f} | select {row['select']:.4f} "
                  f"(bits8 {row['select_bits8']:.4f}) | picks {json.dumps({a: round(b, 4) for a, b in pk.items()})} "
                  f"agree {row['pick_agree']} | paged default {row['paged_default']:.4f} best {best} "
                  f"{fl.get(best, float('nan')):.4f} | sparse {row['sparse']:.4f} x{row['x']:.2f}", flush=True)
        q = k = v = summ = None  # free the cache before the next batch size
        if not SMOKE:
            torch.cuda.empty_cache()
    with open(os.path.join(args.out, "stage_probe.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(f"launch floor (one tiny kernel, graphed): {res['launch_floor']:.4f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
