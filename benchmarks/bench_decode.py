"""Decode attention speed on the GPU: our split-KV kernel, SDPA, FlexAttention, Quest-style sparse decode.

Usage (one device call, about 3-4 minutes on an H200)::

    python benchmarks/bench_decode.py --out $OUT
    python benchmarks/bench_decode.py --cpu-smoke --out /tmp/decode_smoke   # tiny shapes, Triton interpreter

Shapes: bf16, H=32, H_kv=8 (GQA 4), D=128, one new token (Lq=1), context 32K and 128K, batch 1/8/32,
every sequence the full context (``seqlens`` given, all equal). A combination whose K+V cache exceeds
``--mem-limit-gib`` is skipped (recorded). Rows per shape:

* ``ours``: :func:`sparseattn.ops.decode.decode_attention` (Triton, split-KV + merge; ``num_splits``
  from the heuristic, recorded). Also in the JSON: ``ours_lq4`` (4 new tokens per sequence, the
  verify step of speculative decoding) and, for B > 1, ``ours_varlen`` (lengths uniform in
  ``[N/8, N]``, with its own ``%`` of copy bandwidth over the bytes those lengths need). With ``--sweep`` (default on) a few fixed kernel configs and split
  counts are timed too and the best is recorded next to the default.
* ``ours_int8`` / ``ours_fp8``: the same call on the cache quantized per token and KV head
  (:func:`sparseattn.state.kv_cache.quantize`, done once outside the timing, in chunks; ``--quant-v-layout keys``
  stores V keys-contiguous, the kernel's ``V_KEYS`` walk) with
  ``k_scale``/``v_scale``: the kernel reads the int8 / float8 e4m3 bytes and the fp32 scales and
  dequantises in registers (issue 14's target: INT8 >= 1.7x faster than bf16 at 128K). Bytes read =
  quantized K+V + scales; ``x_int8`` = ``ours / ours_int8``. ``ours_fp8`` only where the GPU has FP8
  (compute capability >= 8.9; the reason is recorded otherwise). With the sweep on, ``ours_int8_best``
  over a few configs (a quantized tile is half the bytes, so wider key tiles may pay).
* ``sdpa_<backend>``: ``F.scaled_dot_product_attention`` under ``sdpa_kernel(flash / efficient / cudnn /
  math)``, GQA through ``enable_gqa=True`` or, where a backend refuses that, K/V expanded once outside
  the timed region (only if it fits the memory limit); the mode or the refusal is recorded;
  ``sdpa_best`` is the fastest that ran.
* ``flex``: ``torch.compile(flex_attention)`` with ``enable_gqa=True`` and no mask (its decode path);
  compiled once per shape outside the timing; the reason is recorded if it does not run, and shapes
  are skipped once ``--flex-budget-s`` of compile time is spent.
* ``sparse10``: :func:`sparse_decode_attention` with ``top_pages=0.1`` (page size ``--page-size``),
  *selection included* (bounds, top pages, kernel); the summaries are built outside the timing (they
  are maintained incrementally by :func:`update_page_summaries` in a real decode loop).
  ``select`` times the selection alone (the Triton scoring kernel + the radix-select pick kernel).
  ``--page-sizes 16,32,64`` times every page size (``sparse_by_page`` in the JSON, a second table).

Bandwidth: the device's copy bandwidth is measured once (``y.copy_(x)`` on a 4 GiB buffer; bytes read +
written / time). Each row reports ``kv_gbps`` = bytes of K/V the method must read / time and
``pct_copy_bw`` = that / copy bandwidth (sparse: the selected pages plus the summaries it reads).

Parity before timing, on every shape with B=1: ours and sparse10 against :func:`decode_reference` in
float32, ours_int8 / ours_fp8 against :func:`decode_reference` on the same quantized cache (it dequantises
in float32) by the ratio rule (:mod:`sparseattn.testing.tolerances`). Timing: :func:`sparseattn.testing.timing.bench_ms`
(warm-up, CUDA-synchronised, median). JSON goes to ``--out/decode.json``; a markdown table is printed last.
"""

from __future__ import annotations

import sys

if "--cpu-smoke" in sys.argv:  # the interpreter must be chosen before triton is imported
    import os as _os

    _os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse
import json
import math
import os
import statistics
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

from sparseattn.ops.decode import (
    decode_attention,
    decode_num_splits,
    decode_reference,
    pages_key_mask,
)
from sparseattn.ops.pages import (
    page_summaries,
    select_pages,
    sparse_decode_attention,
)
from sparseattn.state.kv_cache import quantize
from sparseattn.testing.tolerances import check_ratio

GIB = 1024 ** 3


def _timer(smoke: bool) -> Callable[[Callable[[], Any]], float]:
    if not smoke:
        from sparseattn.testing.timing import bench_ms

        return bench_ms

    def cpu_ms(fn: Callable[[], Any]) -> float:
        fn()
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return cpu_ms


def copy_bandwidth(dev: str, nbytes: int, timer) -> dict[str, Any]:
    x = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    x.fill_(1)
    ms = timer(lambda: y.copy_(x))
    return {"bytes": nbytes, "ms": ms, "gbps_read_plus_write": 2 * nbytes / (ms * 1e-3) / 1e9}


def graphed(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` captured in a CUDA graph (warmed up on a side stream first); returns the replay."""
    from sparseattn.testing.timing import capture_graph

    return capture_graph(fn)


def sdpa_rows(q, k, v, timer, mem_limit: int, smoke: bool) -> dict[str, Any]:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    G = q.shape[1] // k.shape[1]
    res: dict[str, Any] = {}
    backends = [("math", SDPBackend.MATH)] if smoke else [
        ("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
        ("cudnn", SDPBackend.CUDNN_ATTENTION), ("math", SDPBackend.MATH)]
    kv_bytes = 2 * k.numel() * k.element_size()
    expanded: list[tuple[torch.Tensor, torch.Tensor]] = []
    for name, be in backends:
        errors = []
        if name == "math" and not smoke and G * kv_bytes > mem_limit:
            res[f"sdpa_{name}"] = None
            res[f"sdpa_{name}_note"] = f"skipped: math expands K/V ({G * kv_bytes / GIB:.1f} GiB) over the memory limit"
            continue
        for mode in ("gqa", "expanded"):
            if mode == "expanded":
                if (G + 1) * kv_bytes > mem_limit:
                    errors.append(f"expanded: skipped, K/V x{G} = {G * kv_bytes / GIB:.1f} GiB over the memory limit")
                    continue
                if not expanded:
                    expanded.append((k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)))
                kk, vv, extra = expanded[0][0], expanded[0][1], {}
            else:
                kk, vv, extra = k, v, {"enable_gqa": True}

            def run(kk=kk, vv=vv, extra=extra, be=be):  # noqa: ANN001, ANN202
                with sdpa_kernel(be):
                    return F.scaled_dot_product_attention(q, kk, vv, **extra)

            try:
                run()
                if not smoke:
                    torch.cuda.synchronize()
                ms = timer(run)
            except Exception as exc:  # noqa: BLE001 - the backend refuses this shape/dtype/GQA mode
                msg = str(exc).splitlines()[0][:160] if str(exc) else ""
                errors.append(f"{mode}: {type(exc).__name__}: {msg}")
                if not smoke:
                    torch.cuda.empty_cache()
                continue
            res[f"sdpa_{name}"] = ms
            res[f"sdpa_{name}_mode"] = mode
            break
        if f"sdpa_{name}" not in res:
            res[f"sdpa_{name}"] = None
            res[f"sdpa_{name}_note"] = "; ".join(errors) or "refused"
    expanded.clear()
    ran = {n: res[f"sdpa_{n}"] for n, _ in backends if res.get(f"sdpa_{n}") is not None}
    if ran:
        best = min(ran, key=ran.get)  # type: ignore[arg-type]
        res["sdpa_best"] = ran[best]
        res["sdpa_best_backend"] = f"{best} ({res[f'sdpa_{best}_mode']})"
    else:
        res["sdpa_best"] = None
    return res


_FLEX: dict[str, Any] = {}


def flex_row(q, k, v, timer) -> tuple[float | None, str | None, float]:
    t0 = time.time()
    try:
        from torch.nn.attention.flex_attention import flex_attention

        if "fn" not in _FLEX:
            import torch._dynamo as dynamo  # "import torch._dynamo" would make torch a local name of this function

            dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 64)
            _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
        fn = _FLEX["fn"]
        run = lambda: fn(q, k, v, enable_gqa=True)  # noqa: E731
        run()
        torch.cuda.synchronize()
        compile_s = time.time() - t0
        return timer(run), None, compile_s
    except Exception as exc:  # noqa: BLE001
        msg = str(exc).splitlines()[0][:200] if str(exc) else ""
        return None, f"{type(exc).__name__}: {msg}", time.time() - t0


def parity(q, k, v, sl, page_size: int) -> dict[str, Any]:
    rec: dict[str, Any] = {"ok": True}
    try:
        st = decode_attention(q, k, v, seqlens=sl, return_lse=True, backend="triton")
        hi = decode_reference(q.float(), k.float(), v.float(), seqlens=sl)
        lo = decode_reference(q, k, v, seqlens=sl, upcast=False)
        check_ratio(st.out, hi.out, lo.out, "dense out")
        check_ratio(st.lse, hi.lse, lo.lse, "dense lse")
        summ = page_summaries(k, page_size, seqlens=sl)
        sp, (pidx, pnum) = sparse_decode_attention(q, k, v, summ, seqlens=sl, top_pages=0.1, return_lse=True,
                                                   return_pages=True, backend="triton")
        mask = pages_key_mask(pidx, pnum, page_size, k.shape[2])
        hi = decode_reference(q.float(), k.float(), v.float(), seqlens=sl, key_mask=mask)
        lo = decode_reference(q, k, v, seqlens=sl, key_mask=mask, upcast=False)
        check_ratio(sp.out, hi.out, lo.out, "sparse out")
        check_ratio(sp.lse, hi.lse, lo.lse, "sparse lse")
    except AssertionError as exc:
        rec["ok"] = False
        rec["error"] = str(exc)
    return rec


def quantize_chunked(x: torch.Tensor, mode: str, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize` over key chunks (bounded fp32 temporaries at 128K x 32); scales ``(B, H_kv, N)``."""
    B, Hkv, N, D = x.shape
    data = None
    scales = torch.empty((B, Hkv, N), dtype=torch.float32, device=x.device)
    for a in range(0, N, chunk):
        d, sc = quantize(x[:, :, a:a + chunk], mode)
        if data is None:
            data = torch.empty((B, Hkv, N, D), dtype=d.dtype, device=x.device)
        data[:, :, a:a + chunk] = d
        scales[:, :, a:a + chunk] = sc.squeeze(-1)
    return data, scales  # type: ignore[return-value]


def quant_parity(q, kq, vq, ks, vs, sl, config: dict[str, Any] | None = None) -> dict[str, Any]:
    rec: dict[str, Any] = {"ok": True}
    try:
        st = decode_attention(q, kq, vq, seqlens=sl, k_scale=ks, v_scale=vs, return_lse=True, backend="triton",
                              config=config)
        hi = decode_reference(q.float(), kq, vq, seqlens=sl, k_scale=ks, v_scale=vs)
        lo = decode_reference(q, kq, vq, seqlens=sl, k_scale=ks, v_scale=vs, upcast=False)
        check_ratio(st.out, hi.out, lo.out, "out")
        check_ratio(st.lse, hi.lse, lo.lse, "lse")
    except AssertionError as exc:
        rec["ok"] = False
        rec["error"] = str(exc)
    return rec


def fp8_refusal(dev: str) -> str | None:
    if getattr(torch, "float8_e4m3fn", None) is None:
        return "torch has no float8_e4m3fn"
    if dev == "cuda" and torch.cuda.get_device_capability() < (8, 9):
        cap = torch.cuda.get_device_capability()
        return f"float8 K/V need compute capability >= 8.9; this GPU has {cap[0]}.{cap[1]}"
    return None


def sparse_rows(q, k, v, sl, page_size: int, timer, smoke: bool, copy_gbps: float,
                sweep: bool = False) -> dict[str, Any]:
    """Sparse decode at 10% of the pages of ``page_size`` keys: the selection alone, the whole call (selection
    included) eager and CUDA-graphed, the bytes it must read and their share of the copy bandwidth."""
    B, Hkv, N, D = k.shape
    r: dict[str, Any] = {"page_size": page_size}
    summ = page_summaries(k, page_size, seqlens=sl)
    r["select"] = timer(lambda: select_pages(q, summ, seqlens=sl, top_pages=0.1, backend="triton"))
    call = lambda: sparse_decode_attention(q, k, v, summ, seqlens=sl, top_pages=0.1, backend="triton")  # noqa: E731
    r["sparse10"] = timer(call)
    if not smoke:
        for name, fn in (("sparse10_graph", call), ("select_graph", lambda: select_pages(
                q, summ, seqlens=sl, top_pages=0.1, backend="triton"))):
            try:
                r[name] = timer(graphed(fn))
            except Exception as exc:  # noqa: BLE001
                r[name] = None
                r[f"{name}_note"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        if sweep:  # the paged kernel's launch config (the tuned default came from this sweep): graphed
            res: dict[str, Any] = {}
            for cfg in ({"BLOCK_N": 128, "num_warps": 4, "num_stages": 2}, {"BLOCK_N": 128, "num_warps": 4, "num_stages": 3},
                        {"BLOCK_N": 32, "num_warps": 4, "num_stages": 4}, {"BLOCK_N": 64, "num_warps": 4, "num_stages": 2}):
                key = f"n{cfg['BLOCK_N']}w{cfg['num_warps']}s{cfg['num_stages']}"
                try:
                    res[key] = timer(graphed(lambda cfg=cfg: sparse_decode_attention(
                        q, k, v, summ, seqlens=sl, top_pages=0.1, backend="triton", config=cfg)))
                except Exception as exc:  # noqa: BLE001
                    res[key] = f"{type(exc).__name__}: {str(exc)[:120]}"
            r["sparse10_graph_sweep"] = res
    P = summ.kmin.shape[2]
    n_sel = min(P, max(math.ceil(0.1 * P), 2))
    r["sparse_pages_selected"] = n_sel
    summ_bytes = 2 * summ.kmin.numel() * summ.kmin.element_size()
    r["sparse_bytes"] = 2 * B * Hkv * n_sel * page_size * D * k.element_size() + summ_bytes
    gbps = r["sparse_bytes"] / (r["sparse10"] * 1e-3) / 1e9
    r["sparse10_gbps"] = gbps
    r["sparse10_pct_copy_bw"] = 100.0 * gbps / copy_gbps
    return r


def quant_rows(q, k, v, sl, timer, row: dict[str, Any], *, dev: str, smoke: bool, sweep: bool,
               sweep_cfgs: list[dict[str, int]], copy_gbps: float, v_layout: str = "plain") -> None:
    """``ours_int8`` / ``ours_fp8`` (+ parity at B=1, bytes, %bw, the ratio to ``ours``) into ``row``; ``v_layout``:
    how the quantized V is stored (``"plain"``: [keys, head_dim]; ``"keys"``: keys-contiguous)."""
    B, Hkv, N, D = k.shape
    for mode in ("int8", "fp8"):
        name = f"ours_{mode}"
        why = fp8_refusal(dev) if mode == "fp8" else None
        if why is not None:
            row[name], row[f"{name}_note"] = None, why
            continue
        try:
            kq, ks = quantize_chunked(k, mode)
            vq, vs = quantize_chunked(v, mode)
            if v_layout == "keys":  # keys-contiguous V (the kernel's V_KEYS walk; docs/DECODE.md)
                from sparseattn.state.kv_cache import keys_contiguous

                vq = keys_contiguous(vq)
            row[f"{name}_v_layout"] = v_layout
            if B == 1:
                row[f"{name}_parity"] = quant_parity(q, kq, vq, ks, vs, sl)
            row[f"{name}_bytes"] = 2 * kq.numel() * kq.element_size() + 2 * ks.numel() * ks.element_size()
            row[name] = timer(lambda: decode_attention(q, kq, vq, seqlens=sl, k_scale=ks, v_scale=vs, backend="triton"))
            if sweep and mode == "int8":
                res = {}
                ns = row["num_splits"]
                splits = [1, 2] if smoke else sorted({ns, max(1, ns // 2), min(128, ns * 2)})
                cfgs = sweep_cfgs if smoke else sweep_cfgs + [{"BLOCK_N": 256, "num_warps": 4, "num_stages": 2},
                                                              {"BLOCK_N": 256, "num_warps": 8, "num_stages": 2},
                                                              {"BLOCK_N": 128, "num_warps": 4, "num_stages": 3},
                                                              {"BLOCK_N": 128, "num_warps": 4, "num_stages": 4},
                                                              {"BLOCK_N": 128, "num_warps": 8, "num_stages": 4},
                                                              {"BLOCK_N": 64, "num_warps": 4, "num_stages": 5}]
                # the exact variants: fp16 (int8 -> fp16 by byte moves on the GPU), i8x2 (no conversion: int8 P
                # hi + residual against int8 V, q8x2's two int8 Q·K dots) and fp16w (V read as int32 words and
                # converted in registers; the plain layout only): docs/DECODE.md "Variants"
                var_cfgs = sweep_cfgs[:1] if smoke else [{"BLOCK_N": 128, "num_warps": 4, "num_stages": 3},
                                                         {"BLOCK_N": 128, "num_warps": 4, "num_stages": 4}]
                cfgs = cfgs + [dict(c, QK=qk, PV=pv) for c in var_cfgs
                               for qk, pv in (("fp16", "fp16"), ("fp16", "dequant"), ("dequant", "fp16"),
                                              ("q8x2", "i8x2"), ("fp16", "i8x2"), ("fp16", "fp16w"),
                                              ("q8x2", "fp16w"))]
                key_cfg: dict[str, dict[str, Any]] = {}
                for cfg in cfgs:
                    for sp in splits:
                        key = f"n{cfg['BLOCK_N']}w{cfg['num_warps']}s{cfg['num_stages']}/splits{sp}"
                        if "QK" in cfg:
                            key = f"qk={cfg['QK']},pv={cfg['PV']} " + key
                        key_cfg[key] = cfg
                        try:
                            res[key] = timer(lambda cfg=cfg, sp=sp: decode_attention(
                                q, kq, vq, seqlens=sl, k_scale=ks, v_scale=vs, num_splits=sp, config=cfg,
                                backend="triton"))
                        except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory
                            res[key] = f"{type(exc).__name__}: {str(exc)[:120]}"
                timed = {kk: vv for kk, vv in res.items() if isinstance(vv, float)}
                row[f"{name}_sweep"] = res
                if timed:
                    best = min(timed, key=timed.get)  # type: ignore[arg-type]
                    row[f"{name}_best"], row[f"{name}_best_config"] = timed[best], best
                    # the winner's parity on sequence 0 (the whole context), every batch size
                    row[f"{name}_best_parity"] = quant_parity(q[:1], kq[:1], vq[:1], ks[:1], vs[:1], sl[:1],
                                                              key_cfg[best])
            for key in (name, f"{name}_best"):
                ms = row.get(key)
                if isinstance(ms, float):
                    gbps = row[f"{name}_bytes"] / (ms * 1e-3) / 1e9
                    row[f"{key}_gbps"] = gbps
                    row[f"{key}_pct_copy_bw"] = 100.0 * gbps / copy_gbps
            if isinstance(row.get("ours"), float) and isinstance(row.get(name), float):
                row[f"x_{mode}"] = row["ours"] / row[name]  # > 1: the quantized cache is faster
        except Exception as exc:  # noqa: BLE001 - record and keep going
            row[name] = None
            row[f"{name}_note"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        finally:
            kq = vq = ks = vs = None
            if not smoke:
                torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU under TRITON_INTERPRET=1")
    ap.add_argument("--contexts", default="32768,131072")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--page-size", type=int, default=16, help="page size of the main sparse10 columns")
    ap.add_argument("--page-sizes", default=None,
                    help="comma-separated page sizes for the sparse rows (default: --page-size); the first one fills "
                         "the main sparse10 columns, every one is in the JSON's sparse_by_page")
    ap.add_argument("--mem-limit-gib", type=float, default=64.0, help="skip what needs more device memory than this")
    ap.add_argument("--no-sweep", action="store_true", help="time only the default kernel config")
    ap.add_argument("--sparse-sweep", action="store_true", help="also sweep the paged kernel's launch config (graphed)")
    ap.add_argument("--only-sparse", action="store_true", help="time only ours (eager, graphed) and the sparse rows")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--quant-v-layout", choices=["plain", "keys"], default="plain",
                    help="the quantized V cache's storage: plain (B, H_kv, N, D), as MixedKVCache keeps it "
                         "(default), or keys-contiguous (the kernel's V_KEYS walk)")
    ap.add_argument("--flex-budget-s", type=float, default=100.0, help="stop compiling FlexAttention after this")
    ap.add_argument("--budget-s", type=float, default=210.0, help="skip the remaining shapes after this")
    args = ap.parse_args(argv)
    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        print("bench_decode: needs a CUDA GPU (or --cpu-smoke)", file=sys.stderr)
        return 2
    dev = "cpu" if smoke else "cuda"
    dtype = torch.float16 if smoke else torch.bfloat16
    H, Hkv, D = (4, 2, 64) if smoke else (32, 8, 128)
    contexts = [96, 200] if smoke else [int(x) for x in args.contexts.split(",")]
    batches = [1, 2] if smoke else [int(x) for x in args.batches.split(",")]
    page_size = 8 if smoke else args.page_size
    page_sizes = [page_size] if smoke or not args.page_sizes else [int(x) for x in args.page_sizes.split(",")]
    page_size = page_sizes[0]
    mem_limit = int(args.mem_limit_gib * GIB)
    timer = _timer(smoke)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    from sparseattn.eval.env import environment

    # the one environment record; "device" keeps this report's wording (the GPU's name)
    meta: dict[str, Any] = {**environment("cpu" if smoke else "cuda"),
                            "device": "cpu (interpreter smoke)" if smoke else torch.cuda.get_device_name(),
                            "dtype": str(dtype).replace("torch.", ""), "H": H, "H_kv": Hkv,
                            "D": D, "Lq": 1, "page_size": page_size, "sparse_fraction": 0.1}
    sms = 132 if smoke else torch.cuda.get_device_properties(0).multi_processor_count
    meta["sms"] = sms
    bw = copy_bandwidth(dev, (1 << 20) if smoke else 4 * GIB, timer)
    meta["copy_bandwidth"] = bw
    copy_gbps = bw["gbps_read_plus_write"]
    print(json.dumps({"copy_bandwidth": bw}), flush=True)

    sweep_cfgs = [{"BLOCK_N": 64, "num_warps": 4, "num_stages": 3}, {"BLOCK_N": 128, "num_warps": 4, "num_stages": 2},
                  {"BLOCK_N": 32, "num_warps": 4, "num_stages": 4}, {"BLOCK_N": 64, "num_warps": 8, "num_stages": 4}]
    if smoke:
        sweep_cfgs = [{"BLOCK_N": 32, "num_warps": 4, "num_stages": 1}]
    rows: list[dict[str, Any]] = []
    flex_spent = 0.0
    for N in contexts:
        for B in batches:
            row: dict[str, Any] = {"context": N, "batch": B}
            kv_bytes = 2 * B * Hkv * N * D * torch.finfo(dtype).bits // 8
            row["kv_bytes"] = kv_bytes
            if kv_bytes > mem_limit:
                row["skipped"] = f"K+V cache {kv_bytes / GIB:.1f} GiB over --mem-limit-gib {args.mem_limit_gib}"
                rows.append(row)
                print(json.dumps(row), flush=True)
                continue
            if time.time() - t_start > args.budget_s:
                row["skipped"] = f"time budget --budget-s {args.budget_s} spent"
                rows.append(row)
                print(json.dumps(row), flush=True)
                continue
            try:
                g = torch.Generator(device=dev).manual_seed(N + B)
                q = torch.randn(B, H, 1, D, device=dev, dtype=dtype, generator=g)
                k = torch.randn(B, Hkv, N, D, device=dev, dtype=dtype, generator=g)
                v = torch.randn(B, Hkv, N, D, device=dev, dtype=dtype, generator=g)
                sl = torch.full((B,), N, dtype=torch.int32, device=dev)
                if B == 1:
                    row["parity"] = parity(q, k, v, sl, page_size)
                row["num_splits"] = decode_num_splits(B * Hkv, N, sms)
                row["ours"] = timer(lambda: decode_attention(q, k, v, seqlens=sl, backend="triton"))
                if not args.only_sparse:
                    quant_rows(q, k, v, sl, timer, row, dev=dev, smoke=smoke, sweep=not args.no_sweep,
                               sweep_cfgs=sweep_cfgs, copy_gbps=copy_gbps, v_layout=args.quant_v_layout)
                    # speculative decoding's verify step: 4 new tokens per sequence (16 rows per KV-head tile)
                    q4 = torch.randn(B, H, 4, D, device=dev, dtype=dtype, generator=g)
                    row["ours_lq4"] = timer(lambda: decode_attention(q4, k, v, seqlens=sl, backend="triton"))
                    q4 = None
                    if B > 1:  # a batch of different lengths, uniform in [N/8, N]: per-sequence splits
                        sl_var = torch.randint(N // 8, N + 1, (B,), device=dev, generator=g, dtype=torch.int64).to(torch.int32)
                        row["varlen_kv_bytes"] = int(2 * Hkv * D * 2 * int(sl_var.sum()))
                        row["ours_varlen"] = timer(lambda: decode_attention(q, k, v, seqlens=sl_var, backend="triton"))
                        row["ours_varlen_pct_copy_bw"] = 100.0 * row["varlen_kv_bytes"] / (row["ours_varlen"] * 1e-3) / 1e9 / copy_gbps
                    if not args.no_sweep:
                        sweep = {}
                        ns = row["num_splits"]
                        splits = [1, 2] if smoke else sorted({ns, max(1, ns // 2), min(128, ns * 2)})
                        for cfg in sweep_cfgs:
                            for s in splits:
                                key = f"n{cfg['BLOCK_N']}w{cfg['num_warps']}s{cfg['num_stages']}/splits{s}"
                                try:
                                    sweep[key] = timer(lambda cfg=cfg, s=s: decode_attention(
                                        q, k, v, seqlens=sl, num_splits=s, config=cfg, backend="triton"))
                                except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory
                                    sweep[key] = f"{type(exc).__name__}: {str(exc)[:120]}"
                        timed = {kk: vv for kk, vv in sweep.items() if isinstance(vv, float)}
                        row["sweep"] = sweep
                        if timed:
                            best = min(timed, key=timed.get)  # type: ignore[arg-type]
                            row["ours_best"], row["ours_best_config"] = timed[best], best
                if not smoke:  # no host sync anywhere: the call can be captured in a CUDA graph
                    try:
                        row["ours_graph"] = timer(graphed(lambda: decode_attention(q, k, v, seqlens=sl, backend="triton")))
                    except Exception as exc:  # noqa: BLE001
                        row["ours_graph"] = None
                        row["ours_graph_note"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                if not args.only_sparse:
                    row.update(sdpa_rows(q, k, v, timer, mem_limit, smoke))
                    if smoke or args.no_flex:
                        row["flex"], row["flex_note"] = None, "cpu smoke: not compiled" if smoke else "--no-flex"
                    elif flex_spent > args.flex_budget_s:
                        row["flex"] = None
                        row["flex_note"] = f"skipped: --flex-budget-s {args.flex_budget_s} of compile time spent"
                    else:
                        ms, why, spent = flex_row(q, k, v, timer)
                        flex_spent += spent
                        row["flex"] = ms
                        row["flex_compile_s"] = spent
                        if why:
                            row["flex_note"] = why
                by_page: dict[str, Any] = {}
                for ps in page_sizes:  # the first page size fills the main sparse10 columns
                    pr = sparse_rows(q, k, v, sl, ps, timer, smoke, copy_gbps, sweep=args.sparse_sweep)
                    by_page[str(ps)] = pr
                    if ps == page_sizes[0]:
                        row.update({kk: vv for kk, vv in pr.items() if kk != "page_size"})
                    if isinstance(row.get("ours"), float) and isinstance(pr.get("sparse10"), float):
                        pr["x_vs_ours"] = row["ours"] / pr["sparse10"]
                        if isinstance(row.get("ours_graph"), float) and isinstance(pr.get("sparse10_graph"), float):
                            pr["x_vs_ours_graph"] = row["ours_graph"] / pr["sparse10_graph"]
                row["sparse_by_page"] = by_page
                for name in ("ours", "ours_best", "sdpa_best", "flex"):
                    ms = row.get(name)
                    if isinstance(ms, float):
                        gbps = kv_bytes / (ms * 1e-3) / 1e9
                        row[f"{name}_kv_gbps"] = gbps
                        row[f"{name}_pct_copy_bw"] = 100.0 * gbps / copy_gbps
                q = k = v = None  # free the cache before the next shape
            except Exception as exc:  # noqa: BLE001 - record and keep going
                row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                row["traceback"] = traceback.format_exc()[-2000:]
            rows.append(row)
            print(json.dumps({kk: vv for kk, vv in row.items() if kk not in ("traceback", "sweep", "ours_int8_sweep")}),
                  flush=True)
            if not smoke:
                torch.cuda.empty_cache()
    meta["seconds"] = time.time() - t_start
    (out_dir / "decode.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))

    def f(x: Any, nd: int = 3) -> str:
        return "-" if not isinstance(x, (int, float)) or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"

    print(f"\ncopy bandwidth (read+write) {copy_gbps:.0f} GB/s; times in ms (median); "
          f"%bw = K/V bytes read / time / copy bandwidth\n")
    print("| ctx | B | splits | parity | ours | ours graph | %bw | ours best (config) | sdpa best (backend) | %bw | flex | "
          "sparse10 (select) | sparse10 graph | sparse %bw | x sdpa | x flex | int8 | int8 %bw | int8 best (config) "
          "| ours / int8 | fp8 | fp8 %bw | ours / fp8 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    bad = 0
    for r in rows:
        if "skipped" in r or "error" in r:
            bad += "error" in r
            print(f"| {r['context']} | {r['batch']} | {r.get('skipped') or 'ERROR ' + r['error'][:80]} |")
            continue
        pars = [r.get(k, {}).get("ok") for k in ("parity", "ours_int8_parity", "ours_fp8_parity")]
        par = None if all(p is None for p in pars) else all(p is not False for p in pars)
        bad += par is False
        xs = r["sdpa_best"] / r["ours"] if r.get("sdpa_best") else None
        xf = r["flex"] / r["ours"] if r.get("flex") else None
        print(f"| {r['context']} | {r['batch']} | {r['num_splits']} | {'-' if par is None else ('ok' if par else 'FAIL')} "
              f"| {f(r['ours'])} | {f(r.get('ours_graph'))} | {f(r.get('ours_pct_copy_bw'), 0)} | {f(r.get('ours_best'))} ({r.get('ours_best_config', '-')}) "
              f"| {f(r.get('sdpa_best'))} ({r.get('sdpa_best_backend', '-')}) | {f(r.get('sdpa_best_pct_copy_bw'), 0)} "
              f"| {f(r.get('flex'))} | {f(r['sparse10'])} ({f(r['select'])}) | {f(r.get('sparse10_graph'))} "
              f"| {f(r.get('sparse10_pct_copy_bw'), 0)} "
              f"| {f(xs, 2)} | {f(xf, 2)} "
              f"| {f(r.get('ours_int8'))} | {f(r.get('ours_int8_pct_copy_bw'), 0)} "
              f"| {f(r.get('ours_int8_best'))} ({r.get('ours_int8_best_config', '-')}) | {f(r.get('x_int8'), 2)} "
              f"| {f(r.get('ours_fp8'))} | {f(r.get('ours_fp8_pct_copy_bw'), 0)} | {f(r.get('x_fp8'), 2)} |")
    notes = sorted({f"{n}: {r[n + '_note']}" for r in rows for n in ("flex", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn",
                                                                      "sdpa_math", "ours_graph", "sparse10_graph",
                                                                      "ours_int8", "ours_fp8")
                    if r.get(n + "_note")})
    for n in notes:
        print(f"- {n[:240]}")
    print("\nSparse decode at 10% of the pages, selection included, by page size (x = ours / sparse, eager and "
          "both graphed)\n")
    print("| ctx | B | page | select | select graphed | sparse10 | graphed | %bw | x eager | x graphed | best swept graphed |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        for ps, pr in (r.get("sparse_by_page") or {}).items():
            sw = {kk: vv for kk, vv in (pr.get("sparse10_graph_sweep") or {}).items() if isinstance(vv, float)}
            bs = min(sw, key=sw.get) if sw else None  # type: ignore[arg-type]
            print(f"| {r['context']} | {r['batch']} | {ps} | {f(pr.get('select'))} | {f(pr.get('select_graph'))} "
                  f"| {f(pr.get('sparse10'))} | {f(pr.get('sparse10_graph'))} | {f(pr.get('sparse10_pct_copy_bw'), 0)} "
                  f"| {f(pr.get('x_vs_ours'), 2)} | {f(pr.get('x_vs_ours_graph'), 2)} "
                  f"| {f(sw.get(bs)) if bs else '-'} ({bs or '-'}) |")
    print(f"\n{len(rows)} shapes, {bad} failed, {time.time() - t_start:.0f} s; JSON: {out_dir / 'decode.json'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
