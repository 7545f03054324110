"""Decode at small batches: the split count and launch config against the launcher's heuristic (issue 14).

At batch 1 a decode step has only ``B * H_kv`` = 8 (batch, KV head) programs, so the key splits of
:func:`sparseattn.ops.decode.decode_num_splits` decide how full the GPU is. The heuristic assumes 4 resident
programs per SM for every cache format; this sweep measures whether that holds for the bf16 and the int8 cache.

Per (context, batch, cache): the launcher's default (its tuned config and split rule: ``CTAS_PER_SM`` where the
config has it), the same config under the wave heuristic (``wave-heuristic``: without ``CTAS_PER_SM``) and every
(config, splits) pair of the grid (``--configs``, ``--splits``), each captured in a CUDA graph and timed by replay
(``bench_ms``: warm-up, median), rounds alternated. The fastest pair's output is checked against
:func:`decode_reference` on sequence 0 (the ratio rule of :mod:`sparseattn.testing.tolerances`). ``%bw``: the K/V
(and scale) bytes read per second over the device's copy bandwidth (read + written bytes of a 512 MiB copy, same
process). bf16 q, H=32, H_kv=8, D=128, one new token, every sequence the full context; the int8 cache is the bf16
one quantized per token (:func:`bench_decode.quantize_chunked`).

    python benchmarks/decode_splits_sweep.py --out DIR [--contexts 32768 131072] [--batches 1 2 4] [--budget-s 150]
        [--splits 16 32 33] [--configs n128w4s3f]
    TRITON_INTERPRET=1 python benchmarks/decode_splits_sweep.py --cpu-smoke   # tiny shapes, no timing
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import torch  # noqa: E402

from bench_decode import copy_bandwidth, quantize_chunked  # noqa: E402  (this folder: the script's own)

from sparseattn.ops.decode import (  # noqa: E402
    MAX_SPLITS,
    _config_num_splits,
    _default_config,
    decode_attention,
    decode_num_splits,
    decode_reference,
)
from sparseattn.testing.tolerances import check_ratio  # noqa: E402

H, HKV, D = 32, 8, 128
# (name, config); the int8 configs read K as fp16 by byte moves (the tuned int8 variant)
CONFIGS = {
    "bf16": [("n128w4s2", {"BLOCK_N": 128, "num_warps": 4, "num_stages": 2}),
             ("n64w4s3", {"BLOCK_N": 64, "num_warps": 4, "num_stages": 3}),
             ("n128w8s2", {"BLOCK_N": 128, "num_warps": 8, "num_stages": 2})],
    "int8": [("n128w4s3f", {"BLOCK_N": 128, "num_warps": 4, "num_stages": 3, "QK": "fp16", "FULL_TILES": True}),
             ("n128w4s3", {"BLOCK_N": 128, "num_warps": 4, "num_stages": 3, "QK": "fp16"}),
             ("n64w4s3f", {"BLOCK_N": 64, "num_warps": 4, "num_stages": 3, "QK": "fp16", "FULL_TILES": True}),
             ("n128w4s4f", {"BLOCK_N": 128, "num_warps": 4, "num_stages": 4, "QK": "fp16", "FULL_TILES": True}),
             ("n256w8s2f", {"BLOCK_N": 256, "num_warps": 8, "num_stages": 2, "QK": "fp16", "FULL_TILES": True})],
}
SPLITS = [16, 24, 32, 48, 64, 80, 96, 112, 128]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--contexts", nargs="+", type=int, default=[32768, 131072])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--splits", nargs="+", type=int, default=SPLITS, help="split counts of the grid")
    ap.add_argument("--configs", nargs="+", default=None, help="config names of the grid (default: all)")
    ap.add_argument("--budget-s", type=float, default=150.0)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes under TRITON_INTERPRET=1, no timing")
    a = ap.parse_args()
    smoke = a.cpu_smoke
    if smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("decode_splits_sweep: --cpu-smoke needs TRITON_INTERPRET=1", file=sys.stderr)
            return 2
        dev, contexts, batches, splits, rounds = "cpu", [300], [1], [2, 3], 1
        configs = {kv: [(n, dict(c, BLOCK_N=32)) for n, c in cs[:1]] for kv, cs in CONFIGS.items()}
    else:
        if not torch.cuda.is_available():
            print("decode_splits_sweep: needs a CUDA device", file=sys.stderr)
            return 2
        dev, contexts, batches, splits, rounds = "cuda", a.contexts, a.batches, a.splits, a.rounds
        configs = {kv: [(cn, c) for cn, c in cs if a.configs is None or cn in a.configs] for kv, cs in CONFIGS.items()}
    if not splits or min(splits) < 1 or max(splits) > MAX_SPLITS:
        print(f"decode_splits_sweep: --splits must be ints in 1..{MAX_SPLITS}; got {splits}", file=sys.stderr)
        return 2
    t0 = time.time()
    if smoke:
        bw, timed = float("nan"), (lambda fn: (fn(), 0.0)[1])
    else:
        from sparseattn.testing.timing import bench_ms, capture_graph

        bw = copy_bandwidth("cuda", 1 << 29, bench_ms)["gbps_read_plus_write"]

        def timed(fn):
            return bench_ms(capture_graph(fn))
    name = "cpu-smoke" if smoke else torch.cuda.get_device_name()
    print(f"{name}  torch {torch.__version__}  copy {bw:.0f} GB/s", flush=True)
    print(f"{'ctx':>7} {'B':>3} {'kv':>5} {'heur S':>6} {'heur ms':>8} {'def S':>5} {'default ms':>10} {'heur/def':>8} "
          f"{'best':>18} {'best ms':>8} {'def/best':>8} {'best %bw':>8} parity", flush=True)
    rows = []
    stop = False
    sms = 132 if smoke else torch.cuda.get_device_properties(0).multi_processor_count
    for n in contexts:
        for B in batches:
            if stop or time.time() - t0 > a.budget_s:
                stop = True
                break
            g = torch.Generator(device=dev).manual_seed(n + B)
            q = torch.randn(B, H, 1, D, device=dev, dtype=torch.bfloat16, generator=g)
            k = torch.randn(B, HKV, n, D, device=dev, dtype=torch.bfloat16, generator=g)
            v = torch.randn(B, HKV, n, D, device=dev, dtype=torch.bfloat16, generator=g)
            caches = {"bf16": (k, v, None, None)}
            kq, ks = quantize_chunked(k, "int8")
            vq, vs = quantize_chunked(v, "int8")
            caches["int8"] = (kq, vq, ks, vs)
            for kv, (kc, vc, ksc, vsc) in caches.items():
                def run(cfg=None, S=None, kc=kc, vc=vc, ksc=ksc, vsc=vsc):
                    return decode_attention(q, kc, vc, k_scale=ksc, v_scale=vsc, backend="triton", config=cfg,
                                            num_splits=S, return_lse=True)
                heur = decode_num_splits(B * HKV, n, sms)
                # the launcher's default (tuned config and its split rule) and the same config under the wave
                # heuristic (without CTAS_PER_SM), then the grid
                tuned = _default_config(D, 16, smoke, device=None if smoke else name,
                                        kv="int8" if ksc is not None else "none")
                old = {kk: vv for kk, vv in tuned.items() if kk != "CTAS_PER_SM"}
                keys = [("default", None, None), ("wave-heuristic", old, None)] + [
                    (f"{cn}/S{S}", c, S) for cn, c in configs[kv] for S in splits]
                ms: dict[str, list[float]] = {kk: [] for kk, _, _ in keys}
                for r in range(rounds):
                    for kk, c, S in (keys if r % 2 == 0 else keys[::-1]):
                        if time.time() - t0 > a.budget_s and r > 0:
                            continue
                        try:
                            ms[kk].append(timed(lambda c=c, S=S: run(c, S)))
                        except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory: recorded, not fatal
                            ms[kk].append(float("nan"))
                            print(f"  {kk}: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
                med = {kk: sorted(vv)[len(vv) // 2] for kk, vv in ms.items() if vv}
                ok = {kk: vv for kk, vv in med.items() if vv == vv}
                best = min(ok, key=ok.get)
                bc, bS = next((c, S) for kk, c, S in keys if kk == best)
                st = run(bc, bS)
                kw = {} if ksc is None else dict(k_scale=ksc[:1], v_scale=vsc[:1])
                ref_hi = decode_reference(q[:1], kc[:1], vc[:1], **kw)  # float32 (the cache dequantised there)
                ref_lo = decode_reference(q[:1], kc[:1], vc[:1], upcast=False, **kw)
                try:
                    check_ratio(st.out[:1], ref_hi.out, ref_lo.out, "decode out")
                    parity = "ok"
                except AssertionError as exc:
                    parity = str(exc)[:160]
                nbytes = kc.numel() * kc.element_size() * 2 + (0 if ksc is None else 2 * ksc.numel() * 4)
                pct = 100.0 * nbytes / (ok[best] * 1e-3) / 1e9 / bw if not smoke else float("nan")
                dflt = _config_num_splits(tuned, B * HKV, n, sms)  # the launcher's own rule
                rows.append(dict(ctx=n, B=B, kv=kv, heuristic_splits=heur, default_splits=dflt, default_config=tuned,
                                 wave_heuristic_ms=med.get("wave-heuristic"), default_ms=med.get("default"),
                                 best=best, best_ms=ok[best], best_pct_copy_bw=pct, parity=parity, ms=ms))
                d, hm = med.get("default", float("nan")), med.get("wave-heuristic", float("nan"))
                ratio = (hm / d) if d else float("nan")
                print(f"{n:>7} {B:>3} {kv:>5} {heur:>6} {hm:>8.4f} {dflt:>5} {d:>10.4f} {ratio:>8.3f} "
                      f"{best:>18} {ok[best]:>8.4f} {(d / ok[best]) if ok[best] else float('nan'):>8.3f} {pct:>8.0f} "
                      f"{parity}", flush=True)
            del caches, kq, vq, k, v
            if not smoke:
                torch.cuda.empty_cache()
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "decode_splits_sweep.json"), "w") as f:
        json.dump(dict(device=name, torch=torch.__version__, copy_gbps=bw, rows=rows), f, indent=1)
    # the int8 / bf16 ratio per shape, each at its default and at its best
    for n in contexts:
        for B in batches:
            r = {x["kv"]: x for x in rows if x["ctx"] == n and x["B"] == B}
            if len(r) == 2 and r["int8"]["best_ms"]:
                print(f"int8 vs bf16 at {n} x {B}: default {r['bf16']['default_ms'] / r['int8']['default_ms']:.2f}x "
                      f"(wave heuristic {r['bf16']['wave_heuristic_ms'] / r['int8']['wave_heuristic_ms']:.2f}x), "
                      f"best {r['bf16']['best_ms'] / r['int8']['best_ms']:.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
