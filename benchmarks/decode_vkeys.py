"""Keys-contiguous V for the decode kernel (``V_KEYS``; issue 14, INT8 on the H200): timings against the plain layout.

An 8-bit V tile stored ``[keys, head_dim]`` must be transposed byte by byte to become the P·V product's operand (the
compiled loop loads it from shared memory one byte per instruction: 128 ``LDS.U8`` per thread and tile, the int8
loop's largest cost, ``benchmarks/ptx_compare.py``-style SASS counts in docs/DECODE.md). Stored keys-contiguous (a
``(B, H_kv, D, N)`` buffer viewed as ``(B, H_kv, N, D)``), the operand is read with vector loads and the kernel walks
whole tiles without load masks. This script times, per context and batch, graphed (one call per CUDA graph), rounds
alternated, medians:

* ``bf16`` / ``bf16_vk``: the bf16 cache, plain and keys-contiguous V, the launcher's default config;
* ``int8`` / ``int8_vk``: the int8 cache (per-token scales), plain and keys-contiguous V, default config;
* ``int8_vk_<variant>``: keys-contiguous V with other quantized-path variants (``QK``/``PV`` of the launch config);
* ``bf16_vt`` / ``int8_vt`` / ``int8_vt_<variant>``: V tile-blocked (``tile_blocked``: each 128-key tile's V one
  contiguous ``[D, 128]`` block, keys contiguous inside it: no byte transposes and the plain layout's DRAM locality);
* ``int8_fp16w`` / ``int8_q8x2_fp16w``: the plain layout with ``PV="fp16w"`` (V loaded as int32 words and converted
  to fp16 in registers), with ``QK="fp16"`` / ``"q8x2"``;
* ``cudnn``: ``scaled_dot_product_attention`` on the bf16 cache (cuDNN backend, GQA).

Outputs: plain vs keys-contiguous and tile-blocked with the same config must be equal bit for bit (``equal``, the
whole batch); every variant is checked against :func:`decode_reference` by the ratio rule on the first sequence (the
reference dequantises / upcasts the whole cache it is given). Prints a table; writes ``decode_vkeys.json`` under --out.

    python benchmarks/decode_vkeys.py --out DIR [--contexts 131072 32768] [--batches 1 8 32]
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

from sparseattn.ops.decode import _default_config, decode_attention, decode_reference  # noqa: E402
from sparseattn.state.kv_cache import keys_contiguous, tile_blocked  # noqa: E402
from sparseattn.testing.timing import bench_ms, capture_graph  # noqa: E402

H, HKV, D = 32, 8, 128
VARIANTS = {  # name -> config changes on top of the default int8 config
    "q8x2_i8x2": {"QK": "q8x2", "PV": "i8x2"},
    "fp16_pvfp16": {"QK": "fp16", "PV": "fp16"},
    "fp16_s4": {"QK": "fp16", "num_stages": 4},
    "q8x2": {"QK": "q8x2"},
}


TILED_VARIANTS = {  # name -> config changes on top of the default int8 config, tile-blocked V
    "q8x2": {"QK": "q8x2"},
    "q8x2_i8x2": {"QK": "q8x2", "PV": "i8x2"},
}


PLAIN_VARIANTS = {  # name -> config changes on top of the default int8 config, plain V layout
    "fp16w": {"QK": "fp16", "PV": "fp16w"},
    "q8x2_fp16w": {"QK": "q8x2", "PV": "fp16w"},
}


def one_shape(n: int, B: int, bw: float, dev: str | None, rounds: int) -> dict:
    """Every call of the module docstring at context ``n`` and batch ``B``: parity, graphed medians, the row."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from sparseattn.testing.tolerances import check_ratio

    g = torch.Generator(device="cuda").manual_seed(n + B)
    q = torch.randn(B, H, 1, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(B, HKV, n, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(B, HKV, n, D, device="cuda", dtype=torch.bfloat16, generator=g)
    kq, ks = quantize_chunked(k, "int8")
    vq, vs = quantize_chunked(v, "int8")
    sl = torch.full((B,), n - 3, dtype=torch.int32, device="cuda")  # a partial last tile
    programs = B * HKV
    cfg8 = _default_config(D, 16, False, device=dev, kv="int8", programs=programs)
    calls = {
        "bf16": lambda: decode_attention(q, k, v, seqlens=sl, backend="triton"),
        "int8": lambda: decode_attention(q, kq, vq, k_scale=ks, v_scale=vs, seqlens=sl, backend="triton"),
    }
    vk_bf = keys_contiguous(v)
    calls["bf16_vk"] = lambda: decode_attention(q, k, vk_bf, seqlens=sl, backend="triton")
    vk8 = keys_contiguous(vq)
    calls["int8_vk"] = lambda: decode_attention(q, kq, vk8, k_scale=ks, v_scale=vs, seqlens=sl,
                                                backend="triton")
    # tile-blocked V: 128-key tiles, each one contiguous [D, 128] block (the launch's BLOCK_N is the tile)
    vt_bf = tile_blocked(v, cfg8["BLOCK_N"])
    calls["bf16_vt"] = lambda: decode_attention(q, k, vt_bf, seqlens=sl, backend="triton")
    vt8 = tile_blocked(vq, cfg8["BLOCK_N"])
    calls["int8_vt"] = lambda: decode_attention(q, kq, vt8, k_scale=ks, v_scale=vs, seqlens=sl, backend="triton")
    for name, ch in TILED_VARIANTS.items():
        cfg = dict(cfg8, **ch)
        calls[f"int8_vt_{name}"] = (lambda cfg=cfg: decode_attention(
            q, kq, vt8, k_scale=ks, v_scale=vs, seqlens=sl, backend="triton", config=cfg))
    for name, ch in PLAIN_VARIANTS.items():  # the plain layout with V read as int32 words (PV="fp16w")
        cfg = dict(cfg8, **ch)
        calls[f"int8_{name}"] = (lambda cfg=cfg: decode_attention(
            q, kq, vq, k_scale=ks, v_scale=vs, seqlens=sl, backend="triton", config=cfg))
    for name, ch in VARIANTS.items():
        cfg = {kk: vv for kk, vv in dict(cfg8, **ch).items()}
        calls[f"int8_vk_{name}"] = (lambda cfg=cfg: decode_attention(
            q, kq, vk8, k_scale=ks, v_scale=vs, seqlens=sl, backend="triton", config=cfg))

    def cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k[:, :, : n - 3], v[:, :, : n - 3], enable_gqa=True)
    try:
        cudnn()
        calls["cudnn"] = cudnn
    except Exception as exc:  # noqa: BLE001 - cuDNN refuses this shape: the row goes without it
        print(f"  cudnn refused: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
    # parity: plain vs keys-contiguous / tile-blocked bit for bit; every row against the reference (ratio rule)
    outs = {nm: fn() for nm, fn in calls.items()}
    equal = {"bf16": bool(torch.equal(outs["bf16"], outs["bf16_vk"])),
             "int8": bool(torch.equal(outs["int8"], outs["int8_vk"])),
             "bf16_vt": bool(torch.equal(outs["bf16"], outs["bf16_vt"])),
             "int8_vt": bool(torch.equal(outs["int8"], outs["int8_vt"]))}
    refs = {}
    # the reference on the first sequence only (memory: it dequantises / upcasts the whole cache it is given)
    one = {"bf16": (k[:1], v[:1], {}), "int8": (kq[:1], vq[:1], dict(k_scale=ks[:1], v_scale=vs[:1]))}
    for kind, (kc, vc, kw) in one.items():
        hi_, lo_ = (decode_reference(q[:1], kc, vc, seqlens=sl[:1], upcast=up, **kw) for up in (True, False))
        refs[kind] = (getattr(hi_, "out", hi_), getattr(lo_, "out", lo_))
    parity = {}
    for nm, o in outs.items():
        if nm == "cudnn":
            continue
        r_hi, r_lo = refs["int8" if nm.startswith("int8") else "bf16"]
        try:
            check_ratio(o[:1], r_hi, r_lo, what=nm)
            parity[nm] = "ok"
        except AssertionError as exc:  # the ratio rule's report
            parity[nm] = f"FAIL {str(exc)[:120]}"
    del refs
    del outs
    graphs = {nm: capture_graph(fn) for nm, fn in calls.items()}
    ms: dict[str, list[float]] = {nm: [] for nm in graphs}
    names = list(graphs)
    for r in range(rounds):
        for nm in (names if r % 2 == 0 else names[::-1]):
            ms[nm].append(bench_ms(graphs[nm]))
    med = {nm: sorted(x)[len(x) // 2] for nm, x in ms.items()}
    kv_bytes = {"bf16": 2 * k.numel() * 2 * (n - 3) / n, "int8": (2 * kq.numel() + 2 * ks.numel() * 4) * (n - 3) / n}
    pct = {nm: 100.0 * kv_bytes["int8" if nm.startswith("int8") else "bf16"] / (t * 1e-3) / 1e9 / bw
           for nm, t in med.items()}
    best8 = min((t, nm) for nm, t in med.items() if nm.startswith("int8"))
    row = dict(ctx=n, B=B, ms=med, rounds=ms, pct_copy_bw=pct, equal=equal, parity=parity,
               int8_config=cfg8, best_int8=best8[1], int8_best_vs_bf16=med["bf16"] / best8[0],
               int8_default_vs_bf16=med["bf16"] / med["int8"],
               bf16_vs_cudnn=med["cudnn"] / med["bf16"] if "cudnn" in med else None,
               bf16_vk_vs_cudnn=med["cudnn"] / med["bf16_vk"] if "cudnn" in med else None)
    print(f"--- ctx {n} B {B}  equal {equal}  parity {sorted(set(parity.values()))}", flush=True)
    for nm in names:
        print(f"  {nm:<22s} {med[nm] * 1e3:9.1f} us  {pct[nm]:5.0f}% copy bw", flush=True)
    print(f"  int8 best ({best8[1]}) / bf16: {row['int8_best_vs_bf16']:.2f}x; int8 default / bf16: "
          f"{row['int8_default_vs_bf16']:.2f}x; cudnn/bf16 {row['bf16_vs_cudnn']}, cudnn/bf16_vk "
          f"{row['bf16_vk_vs_cudnn']}", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--contexts", nargs="+", type=int, default=[131072, 32768])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=200.0)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("decode_vkeys: needs a CUDA device")
    from sparseattn.ops.registry import device_name

    t0 = time.time()
    bw = copy_bandwidth("cuda", 1 << 29, bench_ms)["gbps_read_plus_write"]
    dev = device_name(torch.device("cuda"))
    rows = []
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  copy {bw:.0f} GB/s", flush=True)
    for n in a.contexts:
        for B in a.batches:
            if B * HKV * n * D * 12 > 0.75 * torch.cuda.get_device_properties(0).total_memory:
                print(f"ctx {n} B {B}: skipped (its caches, 12 bytes per element, need more than 75% of the GPU)",
                      flush=True)
                continue
            if time.time() - t0 > a.budget_s:
                print("budget reached", flush=True)
                break
            rows.append(one_shape(n, B, bw, dev, a.rounds))
            torch.cuda.empty_cache()
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "decode_vkeys.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, copy_gbps=bw, rows=rows), f,
                  indent=1)
    print("summary (ctx, B, int8 default / bf16, int8 best / bf16, best)")
    for r in rows:
        print(f"  {r['ctx']:>7} {r['B']:>3} {r['int8_default_vs_bf16']:.2f}x {r['int8_best_vs_bf16']:.2f}x "
              f"{r['best_int8']}")


if __name__ == "__main__":
    main()
