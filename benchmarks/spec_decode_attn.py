"""Attention time per generated token of speculative decoding with sparse drafts, from measured decode calls.

One round of :func:`sparseattn.integrations.speculative.speculative_generate` runs ``g`` sparse decode steps (one
query, ``--top-pages`` of ``--page``-key pages, selection included) and one exact decode step of ``g + 1`` queries
(bottom-right causal), and emits ``E(a, g) = (1 - a^(g+1)) / (1 - a)`` tokens when each draft is accepted with
probability ``a`` independently (``g + 1`` at ``a = 1``). This script **measures** the three calls on the GPU
(H=32, H_kv=8, D=128, bf16 caches of ``--ctx`` keys, ``--batch`` sequences): each as the per-call time inside one
CUDA graph of ``--layers`` calls over as many caches (no L2 reuse between calls; replay time / L), after parity
against the float32 reference (ratio rule). It then **derives** the attention time per token,
``(g * t_sparse + t_exact(g + 1)) / E(a, g)``, against dense decode's ``t_dense`` per token, for the acceptance
rates ``--acceptance`` (e.g. those gen-check's ``sparse_spec`` measured on a model). The derivation covers the
attention calls only (not the rest of a model step).

Usage::

    python benchmarks/spec_decode_attn.py --out DIR               # GPU, ~1-2 min
    TRITON_INTERPRET=1 python benchmarks/spec_decode_attn.py --cpu-smoke   # parity of the three calls, tiny shapes

Writes ``spec_decode_attn.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from sparseattn.ops.decode import decode_attention, decode_reference, pages_key_mask  # noqa: E402
from sparseattn.ops.pages import page_summaries, sparse_decode_attention  # noqa: E402
from sparseattn.testing.tolerances import check_ratio  # noqa: E402

H, HKV, D = 32, 8, 128


def expected_tokens(a: float, g: int) -> float:
    """Tokens one round emits: accepted drafts (a geometric run, at most g) plus the exact step's own token."""
    return float(g + 1) if a >= 1.0 else (1.0 - a ** (g + 1)) / (1.0 - a)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--ctx", type=_ints, default=[32768, 131072])
    ap.add_argument("--batch", type=_ints, default=[1, 8, 32])
    ap.add_argument("--page", type=int, default=64)
    ap.add_argument("--top-pages", type=float, default=0.1)
    ap.add_argument("--drafts", type=_ints, default=[2, 4, 8])
    ap.add_argument("--acceptance", type=_floats, default=[0.5, 0.7, 0.85, 0.95])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--cpu-smoke", action="store_true")
    args = ap.parse_args(argv)
    smoke = args.cpu_smoke
    if smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("spec_decode_attn: --cpu-smoke needs TRITON_INTERPRET=1", file=sys.stderr)
            return 2
        dev, shapes, L, ps, drafts = "cpu", [(256, 1)], 1, 16, [2]
    else:
        if not torch.cuda.is_available():
            print("spec_decode_attn: needs a CUDA device", file=sys.stderr)
            return 2
        dev, L, ps, drafts = "cuda", args.layers, args.page, args.drafts
        shapes = [(n, b) for n in args.ctx for b in args.batch]
    res: dict[str, Any] = {"device": "cpu-smoke" if smoke else torch.cuda.get_device_name(), "torch": torch.__version__,
                           "page": ps, "top_pages": args.top_pages, "layers": L, "drafts": drafts,
                           "acceptance": args.acceptance, "rows": []}
    for N, B in shapes:
        torch.manual_seed(0)
        ks = [torch.randn(B, HKV, N, D, device=dev, dtype=torch.bfloat16) for _ in range(L)]
        vs = [torch.randn_like(k) for k in ks]
        sl = torch.full((B,), N, dtype=torch.int32, device=dev)
        summ = [page_summaries(k, ps, seqlens=sl) for k in ks]
        qs = {n: torch.randn(B, H, n, D, device=dev, dtype=torch.bfloat16) for n in [1] + [g + 1 for g in drafts]}

        def exact(i: int = 0, n: int = 1) -> Any:
            return decode_attention(qs[n], ks[i], vs[i], seqlens=sl, backend="triton")

        def sparse(i: int = 0) -> Any:
            return sparse_decode_attention(qs[1], ks[i], vs[i], summ[i], seqlens=sl, top_pages=args.top_pages,
                                           backend="triton")

        # parity first: the first sequence against the float32 reference (the sparse call over its selected pages)
        k1, v1 = ks[0][:1], vs[0][:1]
        for n in qs:
            out = exact(0, n)
            hi = decode_reference(qs[n][:1].float(), k1.float(), v1.float(), seqlens=sl[:1])
            lo = decode_reference(qs[n][:1], k1, v1, seqlens=sl[:1], upcast=False)
            check_ratio(out[:1], hi.out, lo.out, f"exact decode of {n} queries, ctx {N}")
        sp, (pidx, pnum) = sparse_decode_attention(qs[1], ks[0], vs[0], summ[0], seqlens=sl, top_pages=args.top_pages,
                                                   return_pages=True, backend="triton")
        mask = pages_key_mask(pidx, pnum, ps, N)[:1]
        hi = decode_reference(qs[1][:1].float(), k1.float(), v1.float(), seqlens=sl[:1], key_mask=mask)
        lo = decode_reference(qs[1][:1], k1, v1, seqlens=sl[:1], key_mask=mask, upcast=False)
        check_ratio(sp[:1], hi.out, lo.out, f"sparse decode, ctx {N}")
        del hi, lo, mask
        if smoke:
            continue
        from sparseattn.testing.timing import bench_ms, capture_graph

        def per_call(f: Any) -> float:
            return bench_ms(capture_graph(lambda: [f(i) for i in range(L)])) / L

        t_dense = per_call(lambda i: exact(i, 1))
        t_sparse = per_call(sparse)
        row: dict[str, Any] = {"ctx": N, "batch": B, "dense_ms": t_dense, "sparse_ms": t_sparse, "exact_ms": {},
                               "per_token": {}}
        for g in drafts:
            t_ex = per_call(lambda i, n=g + 1: exact(i, n))
            row["exact_ms"][g + 1] = t_ex
            for a in args.acceptance + [1.0]:
                t_tok = (g * t_sparse + t_ex) / expected_tokens(a, g)
                row["per_token"][f"g{g}_a{a}"] = {"ms": t_tok, "speedup": t_dense / t_tok}
        res["rows"].append(row)
        del ks, vs, summ, qs
        torch.cuda.empty_cache()
    res["parity"] = "ok"
    if smoke:
        print("spec_decode_attn: cpu smoke ok (parity ok)")
        return 0
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "spec_decode_attn.json"), "w") as fh:
        json.dump(res, fh, indent=1)
    acc = args.acceptance + [1.0]
    print(f"{res['device']}, per call in a graph of {L} calls (us); speedup = dense per token / speculative per token")
    print("| ctx | B | dense | sparse | exact g+1 | g | " + " | ".join(f"a={a}" for a in acc) + " |")
    print("|---|---|---|---|---|---|" + "---|" * len(acc))
    for r in res["rows"]:
        for g in drafts:
            cells = " | ".join(f"{r['per_token'][f'g{g}_a{a}']['speedup']:.2f}x" for a in acc)
            print(f"| {r['ctx']} | {r['batch']} | {r['dense_ms'] * 1e3:.1f} | {r['sparse_ms'] * 1e3:.1f} | "
                  f"{r['exact_ms'][g + 1] * 1e3:.1f} | {g} | {cells} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
