"""GPU fuzz parity: thousands of random cases, the Triton kernel against the reference (ratio rule).

Cases come from :mod:`sparseattn.testing.fuzz` (the generator behind ``tests/ops/test_fuzz_parity.py``):
N_q / N_kv from 1 to 16K (log-uniform, odd, block edges, tiny, decode-like N_q << N_kv, N_q > N_kv),
B, H, H_kv with GQA groups 1/2/4/8, head_dim 64/128/256, fp16 and bf16, causal or not, every layout
pattern and density (local, strided, random, block-diagonal, sink+window, dense, causal,
``pattern_at_density``, random per-head masks, emptied query blocks, layouts built non-causal used
causally), non-contiguous q/k/v and ``out`` buffers, explicit scales and input magnitudes, and a
share of ``pv_threshold`` cases (tile counts must equal the reference's). Every case runs on
NaN-poisoned ``out``/``lse`` buffers; every row is checked for NaN and for empty rows (out exactly 0,
lse -inf); the ratio rule against the fp32 reference (``upcast=False`` reference as the yardstick)
covers every row of short cases and, for long ones, the last query blocks plus a random window of
query blocks (``fuzz.query_window``: the exact sub-problem, only the key blocks those rows see).

Speed: no autotuning per case. Launch configs are *variants* — (head_dim, layout blocks, causal,
dtype, one of the kernel's autotune candidates incl. TMA / TMA_QO / maxnreg ones, LIST_CHUNK, lazy
rescale tau, pv) — at most ``--max-variants`` of them (default 64), passed as fixed ``config=``. Layout and lse
buffers are stored with 16-aligned row strides (``fuzz.aligned_layout``) so Triton's integer
specialization does not multiply the compiled variants by the lengths. Worker processes (``--workers``)
first compile their share of the variants (filling Triton's on-disk cache in parallel), then run
their share of the cases: the per-case cost is host-side (the blockwise reference's Python loop), so
several processes keep the GPU busy.

Finally ONE case with more than 2**31 elements in q (int64 offsets): B=1, H=32, H_kv=1, D=128,
N=525,313, bf16, causal sliding-window layout (128x128 blocks, 2 blocks), autotuned as in
production, with q/out contiguous and again with q/out in (B, N, H, D) storage (where the row offset
``row * H * D`` itself passes 2**31); sampled query blocks (first, middle, the last 15 which
straddle row 2**31 / (H * D)) against the reference on the needed key slices, all rows for NaN.

Writes ``summary.json`` (every case's shape, seed, variant and worst error / bound, grouped tables)
and ``failures.json`` (each failing case's full recipe, errors and messages; ``--replay`` reruns it)
under ``--out`` (default ``$OUT/gpu_fuzz``). Prints progress and a table; exit 1 if any case fails.

Usage::

    PYTHONPATH=src python3 benchmarks/gpu_fuzz.py                       # 10,000 cases + the 2**31 case
    PYTHONPATH=src python3 benchmarks/gpu_fuzz.py --cases 2000 --seed 7 --seconds 120
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/gpu_fuzz.py --cases 20 --small --out /tmp/fz   # CPU smoke
    PYTHONPATH=src python3 benchmarks/gpu_fuzz.py --replay $OUT/gpu_fuzz/failures.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import time
import traceback
from collections import defaultdict
from typing import Any

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.join(_ROOT, "src") not in sys.path:
    sys.path.insert(0, os.path.join(_ROOT, "src"))

import torch  # noqa: E402

BIG_N = 525_313  # 32 * 525,313 * 128 = 2,151,682,048 elements in q (> 2**31 = 2,147,483,648)
BIG_RESERVE_S = 60.0  # of --seconds, kept for the 2**31 case (its own process: CUDA start, 8.6 GB of inputs, autotune)


# ---------------------------------------------------------------------------------------------- variants
def _candidate_configs(D: int, bm: int, bn: int, cuda: bool) -> list[tuple[str, dict[str, Any]]]:
    """Fixed launch configs whose tiles nest in the layout blocks: the kernel's autotune candidates on a GPU."""
    if not cuda:  # interpreter: the launcher's default (layout tiles) and sub-tiles; no TMA / register caps
        out = [("interp-default", {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": 4, "num_stages": 1})]
        for tm, tn in ((64, 64), (64, 32)):
            if bm % tm == 0 and bn % tn == 0 and (tm, tn) != (bm, bn):
                out.append((f"interp-{tm}x{tn}", {"BLOCK_M": tm, "BLOCK_N": tn, "num_warps": 4, "num_stages": 1}))
        return out
    from sparseattn.ops.triton import configs

    out = []
    for tm, tn, w, s, tma, nreg, extra in configs._CANDIDATES[D]:
        if bm % tm or bn % tn:
            continue
        cfg: dict[str, Any] = {"BLOCK_M": tm, "BLOCK_N": tn, "num_warps": w, "num_stages": s, **dict(extra)}
        if tma:
            cfg["USE_TMA"] = True
        if nreg is not None:
            cfg["maxnreg"] = nreg
        name = f"{tm}x{tn}w{w}s{s}" + ("-tma" if tma else "") + ("-qo" if dict(extra).get("TMA_QO") else "") + \
               ("-nopf" if dict(extra).get("PREFETCH") is False else "") + (f"-r{nreg}" if nreg else "")
        out.append((name, cfg))
    return out


def build_variants(cuda: bool, max_variants: int, rng: random.Random) -> list[dict[str, Any]]:
    """Every (D, blocks, causal, dtype, config) combination, then a seeded sample of at most ``max_variants``.

    The sample keeps at least one config of every (D, blocks, causal, dtype) when the budget allows;
    about one in eight variants is a ``pv_threshold`` one (tiles = layout blocks, the rule's unit).
    """
    from sparseattn.ops.triton import configs

    plain: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    pv: list[dict[str, Any]] = []
    for D in (64, 128, 256):
        for bm in (64, 128):
            for bn in (64, 128):
                for causal in (False, True):
                    for dtype in ("bfloat16", "float16"):
                        base = {"D": D, "block_m": bm, "block_n": bn, "causal": causal, "dtype": dtype}
                        for name, cfg in _candidate_configs(D, bm, bn, cuda):
                            plain[(D, bm, bn, causal, dtype)].append({**base, "name": name, "config": cfg, "pv": False})
                        pcfg = configs.default_config(D, bm, bn, interpret=not cuda, pv_skip=True)
                        pv.append({**base, "name": "pv-" + "x".join(map(str, (pcfg["BLOCK_M"], pcfg["BLOCK_N"]))),
                                   "config": pcfg, "pv": True})
    keys = sorted(plain)
    rng.shuffle(keys)
    n_pv = max(1, max_variants // 8)
    n_plain = max(1, max_variants - n_pv)
    chosen: list[dict[str, Any]] = []
    for key in keys[:n_plain]:  # one config of each combination first
        chosen.append(dict(rng.choice(plain[key])))
    rest = [dict(v) for key in keys for v in plain[key]]
    rng.shuffle(rest)
    seen = {(v["D"], v["block_m"], v["block_n"], v["causal"], v["dtype"], v["name"]) for v in chosen}
    for v in rest:
        if len(chosen) >= n_plain:
            break
        key = (v["D"], v["block_m"], v["block_n"], v["causal"], v["dtype"], v["name"])
        if key not in seen:
            seen.add(key)
            chosen.append(v)
    rng.shuffle(pv)
    chosen.extend(dict(v) for v in pv[:n_pv])
    for v in chosen:  # per-variant kernel knobs (constexprs: one compile each, fixed per variant)
        # layout=None (the launcher's own dense 128x128 layout, whose row stride Nb Triton specializes on:
        # Nb == 1, Nb % 16 == 0, other) only for about half of the 128x128 variants: 3 more compiles each
        v["none_ok"] = not v["pv"] and (not cuda or ((v["block_m"], v["block_n"]) == (128, 128) and rng.random() < 0.5))
        v["config"] = dict(v["config"])
        v["config"]["LIST_CHUNK"] = rng.choice((16, 32, 64, 128))
        if not v["pv"] and rng.random() < 0.25:
            v["config"]["RESCALE_TAU"] = rng.choice((0.5, 8.0))
        v["id"] = (f"d{v['D']}-{v['block_m']}x{v['block_n']}-{'c' if v['causal'] else 'f'}-{v['dtype'][:2]}-{v['name']}"
                   f"-lc{v['config']['LIST_CHUNK']}" + (f"-tau{v['config']['RESCALE_TAU']:g}" if "RESCALE_TAU" in v["config"] else ""))
    return chosen


# ---------------------------------------------------------------------------------------------- cases
def make_spec(index: int, seed: int, variants: list[dict[str, Any]], small: bool) -> dict[str, Any]:
    """The ``index``-th case of run ``seed``: a variant and a case drawn for it (deterministic)."""
    from sparseattn.testing import fuzz

    rng = random.Random(f"gpu_fuzz:{seed}:{index}")
    var = variants[rng.randrange(len(variants))]
    space = fuzz.GPU_SMALL_SPACE if small else fuzz.GPU_SPACE
    recipes = tuple(r for r in space.recipes if r != "none" or var["none_ok"])
    space = dataclasses.replace(space, recipes=recipes)
    case = fuzz.draw_case(fuzz.RandomSource(rng), space, D=var["D"], block_m=var["block_m"], block_n=var["block_n"],
                          causal=var["causal"], dtype=var["dtype"])
    spec: dict[str, Any] = {"index": index, "variant": var, "case": case.to_json(), "pv": None, "sink": 0.0,
                            "check_seed": rng.randrange(2**31)}
    if var["pv"]:
        spec["pv"] = rng.choice((2.0, 4.0, 8.0))
        spec["sink"] = rng.choice((0.0, 8.0, 12.0))
    return spec


def run_spec(spec: dict[str, Any], device: str, max_rows: int | None) -> dict[str, Any]:
    """Run one case on ``device`` and check it; returns a result row (``ok``, errors, shapes, timing)."""
    from sparseattn.layout.block_layout import BlockLayout
    from sparseattn.ops.triton_launch import block_sparse_fwd
    from sparseattn.testing import fuzz

    t0 = time.perf_counter()
    case = fuzz.FuzzCase.from_json(spec["case"])
    cuda = device.startswith("cuda")
    q, k, v = fuzz.make_qkv(case, device)
    lay = fuzz.build_layout(case, device)
    thr, sink = spec.get("pv"), float(spec.get("sink") or 0.0)
    if sink > 0:  # attention sink: the first keys share a direction with every query; block 0 always attended
        gen = torch.Generator(device=device).manual_seed(case.seed + 3)
        w = torch.randn(case.D, generator=gen, device=device)
        w = (w / w.norm() * sink * (case.D / 64) ** 0.5).to(q.dtype)
        q = q + w
        k = k.clone()
        k[:, :, : min(40, case.Nkv)] += w
        mask = lay.to_dense_mask()
        mask[..., 0] = True
        lay = BlockLayout.from_dense_mask(mask, block_m=case.block_m, block_n=case.block_n, seqlen_q=case.Nq,
                                          seqlen_kv=case.Nkv)
    klay = fuzz.aligned_layout(lay) if cuda else lay
    out, lse = fuzz.poisoned_outputs(case, device, pad_lse=cuda)
    stats: dict[str, Any] = {}
    cfg = dict(spec["variant"]["config"])
    block_sparse_fwd(q, k, v, layout=klay, causal=case.causal, scale=case.scale, out=out, lse=lse, config=cfg,
                     pv_threshold=thr, stats=stats if thr is not None else None)
    if cuda:
        torch.cuda.synchronize()
    t_kernel = time.perf_counter()
    bm = lay.block_m if lay is not None else 128
    # long cases: one window of query blocks (the tail or a random one); the reference's cost is its
    # Python loop over the window's key blocks, twice (fp32 and the kernel's dtype)
    big = case.B * case.H * case.Nq * case.Nkv > (1 << 24) or case.Nq * case.Nkv > (1 << 22)
    wins = fuzz.choose_windows(case.Nq, bm, random.Random(spec["check_seed"]), max_rows if big else None, both=False)
    rep = fuzz.check_kernel(q, k, v, lay, case.causal, out, lse, scale=case.scale, windows=wins, pv_threshold=thr,
                            stats=stats if thr is not None else None)
    if thr is not None and "stats_kernel" not in rep and wins == [(0, -(-case.Nq // bm))]:
        rep["failures"].append("pv stats were not compared")  # check_kernel compares them when every row is checked
        rep["ok"] = False
    rep.update(index=spec["index"], variant=spec["variant"]["id"], case_short=case.short(), wall_s=time.perf_counter() - t0,
               kernel_s=t_kernel - t0, windows=[list(w) for w in wins])
    return rep


def _error_row(spec: dict[str, Any], exc: BaseException) -> dict[str, Any]:
    from sparseattn.testing import fuzz

    return {"index": spec["index"], "ok": False, "variant": spec["variant"]["id"],
            "case_short": fuzz.FuzzCase.from_json(spec["case"]).short(), "failures": [f"{type(exc).__name__}: {exc}"],
            "trace": traceback.format_exc()[-3000:], "worst": float("inf")}


def _fatal(exc: BaseException) -> bool:
    """A CUDA error leaves the context unusable: the worker must stop."""
    s = str(exc)
    return "CUDA error" in s or "illegal memory" in s or "an illegal instruction" in s or "unspecified launch failure" in s


# ---------------------------------------------------------------------------------------------- workers
def _warm(variant: dict[str, Any], device: str, small: bool) -> float:
    """Compile one variant with tiny cases of the same specializations (fills Triton's disk cache)."""
    from sparseattn.testing import fuzz

    t0 = time.perf_counter()
    shapes = [("mask", variant["block_n"] * 2 + 5)]
    if variant.get("none_ok"):  # layout=None: Nb == 1, Nb % 16 == 0, other
        shapes += [("none", 100), ("none", 16 * 128), ("none", 300)]
    for recipe, nkv in shapes:
        case = fuzz.FuzzCase(seed=1, B=1, H=2, Hkv=1, Nq=variant["block_m"] + 3, Nkv=nkv, D=variant["D"],
                             dtype=variant["dtype"], causal=variant["causal"], block_m=variant["block_m"],
                             block_n=variant["block_n"], recipe=recipe, knobs={"density": 0.7} if recipe == "mask" else {})
        spec = {"index": -1, "variant": variant, "case": case.to_json(), "pv": 4.0 if variant["pv"] else None,
                "sink": 0.0, "check_seed": 0}
        run_spec(spec, device, None)
    return time.perf_counter() - t0


def _compiled_count() -> int | None:
    try:
        from sparseattn.ops.triton_launch import _kernels

        plain = _kernels()[0]
        caches = getattr(plain, "device_caches", None) or getattr(plain, "cache", None)
        return int(sum(len(c[0]) if isinstance(c, tuple) else len(c) for c in caches.values()))
    except Exception:  # noqa: BLE001 - a Triton internals change: just not reported
        return None


def _run_with_oom_retry(spec: dict[str, Any], device: str, max_rows: int, tries: int = 3) -> dict[str, Any]:
    """``run_spec``, retried after a CUDA out-of-memory error of the *checker*.

    Several worker processes share one GPU and each caching allocator keeps its peak; a large case
    can then find no memory (seen on the H200 with 8 and 14 workers: 8 of 10,437 cases). The memory
    this process caches is released and the case is run again (after a pause, so another worker's
    peak can pass); an OOM on the last try is reported as the case's failure, as before.
    """
    for attempt in range(tries):
        try:
            row = run_spec(spec, device, max_rows)
        except torch.OutOfMemoryError:
            if attempt == tries - 1:
                raise
            torch.cuda.empty_cache()
            time.sleep(2.0 * (attempt + 1))
            continue
        if device.startswith("cuda") and torch.cuda.memory_reserved() > OOM_RESERVE_LIMIT:
            torch.cuda.empty_cache()  # do not sit on a large case's peak while the other workers run
        if attempt:
            row["oom_retries"] = attempt
        return row
    raise AssertionError("unreachable")


# a worker releases its cached GPU memory after a case when it holds more than this
OOM_RESERVE_LIMIT = 4 << 30


def worker(wid: int, nworkers: int, specs: list[dict[str, Any]], warm_variants: list[dict[str, Any]], device: str,
           small: bool, max_rows: int, deadline: float, queue: Any, barrier: Any) -> None:
    """Compile this worker's share of the variants, wait for the others, then run its cases."""
    try:
        torch.set_num_threads(max(1, min(4, (os.cpu_count() or 2) // max(1, nworkers))))
        t0 = time.perf_counter()
        warm_errors = []
        for var in warm_variants:
            try:
                _warm(var, device, small)
            except Exception as exc:  # noqa: BLE001 - reported, the cases of this variant will fail with it
                warm_errors.append(f"{var['id']}: {type(exc).__name__}: {str(exc)[:300]}")
                if _fatal(exc):
                    break
        queue.put(("warm", wid, time.perf_counter() - t0, warm_errors, _compiled_count(), len(warm_variants)))
        if barrier is not None:
            try:
                barrier.wait(timeout=600)
            except Exception:  # noqa: BLE001 - BrokenBarrierError: another worker died; run the cases anyway
                pass
        for spec in specs:
            if time.time() > deadline:
                queue.put(("skipped", wid, spec["index"]))
                continue
            try:
                row = _run_with_oom_retry(spec, device, max_rows)
            except Exception as exc:  # noqa: BLE001 - a crash is a failure of this case
                row = _error_row(spec, exc)
                queue.put(("row", wid, row))
                if _fatal(exc):
                    queue.put(("fatal", wid, str(exc)[:500]))
                    return
                continue
            queue.put(("row", wid, row))
        queue.put(("done", wid, _compiled_count()))
    except BaseException as exc:  # noqa: BLE001
        if barrier is not None:
            barrier.abort()  # the others must not wait for this worker
        queue.put(("fatal", wid, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-2000:]}"))


# ---------------------------------------------------------------------------------------------- the 2**31 case
def big_case(device: str, small: bool, queue: Any = None) -> dict[str, Any]:
    """One case with more than 2**31 elements in q (``--small``: the same code path at a toy size)."""
    from sparseattn.layout.patterns import sliding_window_layout
    from sparseattn.ops.triton_launch import block_sparse_fwd
    from sparseattn.testing import fuzz

    res: dict[str, Any] = {"ok": True, "parts": []}
    try:
        if small:
            B, H, Hkv, N, D, blk, dtype = 1, 2, 1, 1001, 64, 64, torch.float16
        else:
            B, H, Hkv, N, D, blk, dtype = 1, 32, 1, BIG_N, 128, 128, torch.bfloat16
        res.update(B=B, H=H, Hkv=Hkv, N=N, D=D, block=blk, dtype=str(dtype), q_elements=B * H * N * D,
                   over_2_31=B * H * N * D > 2**31)
        t0 = time.perf_counter()
        gen = torch.Generator(device=device).manual_seed(31)
        q = torch.empty(B, H, N, D, dtype=dtype, device=device)
        for h in range(H):  # head by head: no fp32 copy of the whole q (that alone would be 8.6 GB)
            q[:, h] = torch.randn(B, N, D, generator=gen, device=device, dtype=torch.float32).to(dtype)
        k = torch.randn(B, Hkv, N, D, generator=gen, device=device, dtype=torch.float32).to(dtype)
        v = torch.randn(B, Hkv, N, D, generator=gen, device=device, dtype=torch.float32).to(dtype)
        lay = sliding_window_layout(N, N, window_blocks=2, block_m=blk, block_n=blk, batch=B, heads=H, causal=True,
                                    device=device)
        res["setup_s"] = time.perf_counter() - t0
        Mb = -(-N // blk)
        mid = Mb // 2
        tail = 15 if not small else 3
        wins = [(0, 1), (mid, mid + 1), (Mb - tail, Mb)]
        from sparseattn.ops.triton import configs

        interp = not device.startswith("cuda")
        pointer_cfg = configs.default_config(D, blk, blk, interpret=interp, pv_skip=False)  # no TMA: row offsets in-kernel
        qb = None
        # autotuned (production: on an H200 the winner may load Q/K/V through TMA, whose descriptors address in
        # 64 bits) and a fixed pointer-load config (row offsets computed by the kernel's own arithmetic)
        for storage, cfg_name in (("contiguous", "autotuned"), ("contiguous", "pointer"), ("bnhd", "autotuned"),
                                  ("bnhd", "pointer")):
            t1 = time.perf_counter()
            part: dict[str, Any] = {"storage": storage, "config": cfg_name}
            if storage == "bnhd":
                if qb is None:
                    qb = q.transpose(1, 2).contiguous().transpose(1, 2)  # (B, N, H, D) storage, same values
                qs = qb
                out = torch.full((B, N, H, D), float("nan"), dtype=dtype, device=device).transpose(1, 2)
            else:
                qs = q
                out = torch.full((B, H, N, D), float("nan"), dtype=dtype, device=device)
            lse = torch.full((B, H, N), float("nan"), dtype=torch.float32, device=device)
            part["q_strides"] = list(qs.stride())
            part["max_row_offset_elements"] = (N - 1) * qs.stride(2)
            try:
                tel: dict = {}
                block_sparse_fwd(qs, k, v, layout=lay, causal=True, out=out, lse=lse,
                                 config=None if cfg_name == "autotuned" else pointer_cfg, telemetry=tel)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                part["kernel_s"] = time.perf_counter() - t1
                if cfg_name == "autotuned":
                    part["chosen_config"] = dict(tel.get("config", {}))
                rep = fuzz.check_kernel(qs, k, v, lay, True, out, lse, windows=wins)
                part.update({kk: rep[kk] for kk in ("ok", "failures", "rows_checked", "out_err", "out_bound",
                                                   "lse_err", "lse_bound", "worst")})
            except Exception as exc:  # noqa: BLE001
                part.update(ok=False, failures=[f"{type(exc).__name__}: {str(exc)[:500]}"])
                if _fatal(exc):
                    res["parts"].append(part)
                    res["ok"] = False
                    break
            part["wall_s"] = time.perf_counter() - t1
            res["parts"].append(part)
            res["ok"] = res["ok"] and part["ok"]
            del out, lse, qs
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    except Exception as exc:  # noqa: BLE001
        res.update(ok=False, error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc()[-3000:])
    if queue is not None:
        queue.put(("big", res))
    return res


def _big_in_subprocess(device: str, small: bool, timeout: float) -> dict[str, Any]:
    """The 2**31 case in its own process, so an illegal address there cannot take the main run down."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=big_case, args=(device, small, q))
    p.start()
    try:
        msg = q.get(timeout=timeout)
        res = msg[1]
    except Exception as exc:  # noqa: BLE001 - queue.Empty or a dead process
        res = {"ok": False, "error": f"no result from the 2**31 case within {timeout:.0f}s ({type(exc).__name__}); "
                                     f"exit code {p.exitcode}"}
    p.join(timeout=30)
    if p.is_alive():
        p.kill()
    return res


# ---------------------------------------------------------------------------------------------- main
def _table(rows: list[dict[str, Any]], key: Any, title: str) -> list[str]:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[key(r)].append(r)
    lines = [f"{title:<28} {'cases':>6} {'fail':>5} {'worst err/bound':>16} {'mean ms':>8}"]
    for g in sorted(groups):
        rs = groups[g]
        fails = sum(not r["ok"] for r in rs)
        worst = max((r.get("worst", 0.0) for r in rs), default=0.0)
        ms = 1e3 * sum(r.get("wall_s", 0.0) for r in rs) / max(1, len(rs))
        lines.append(f"{g:<28} {len(rs):>6} {fails:>5} {worst:>16.3f} {ms:>8.1f}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=None, help="number of random cases (default 10000; 20 with --small)")
    ap.add_argument("--seconds", type=float, default=300.0,
                    help="time budget: no new case starts after it (minus 60 s kept for the 2**31 case)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="output folder (default $OUT/gpu_fuzz, else ./gpu_fuzz_out)")
    ap.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke under TRITON_INTERPRET=1)")
    ap.add_argument("--workers", type=int, default=None, help="processes (default: 8 on CUDA, 1 on CPU)")
    ap.add_argument("--max-variants", type=int, default=None, help="compiled launch variants (default 64 on CUDA)")
    ap.add_argument("--max-rows", type=int, default=256, help="rows per checked window in long cases")
    ap.add_argument("--no-big", action="store_true", help="skip the > 2**31-element case")
    ap.add_argument("--replay", default=None, help="rerun the cases of a failures.json (in-process)")
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    if not cuda:
        from sparseattn.ops.triton_launch import interpret_mode

        if not interpret_mode():
            print("gpu_fuzz: no CUDA GPU; set TRITON_INTERPRET=1 (and use --small) to run on the CPU interpreter",
                  file=sys.stderr)
            return 2
    device = "cuda" if cuda else "cpu"
    n_cases = args.cases if args.cases is not None else (20 if args.small else 10_000)
    workers = args.workers if args.workers is not None else (8 if cuda else 1)
    max_variants = args.max_variants if args.max_variants is not None else (64 if cuda else 24)
    out_dir = args.out or (os.path.join(os.environ["OUT"], "gpu_fuzz") if os.environ.get("OUT") else "gpu_fuzz_out")
    os.makedirs(out_dir, exist_ok=True)
    t_start = time.time()
    deadline = t_start + args.seconds - (0.0 if args.no_big or not cuda else BIG_RESERVE_S)

    if args.replay:
        with open(args.replay) as f:
            specs = [r["spec"] for r in json.load(f)["failures"] if "spec" in r]
        rows = []
        for spec in specs:
            try:
                row = run_spec(spec, device, args.max_rows)
            except Exception as exc:  # noqa: BLE001
                row = _error_row(spec, exc)
            rows.append(row)
            print(f"{'PASS' if row['ok'] else 'FAIL'} #{row['index']} {row['case_short']} {row.get('failures', '')}")
        return 1 if any(not r["ok"] for r in rows) else 0

    variants = build_variants(cuda, max_variants, random.Random(f"variants:{args.seed}"))
    specs = [make_spec(i, args.seed, variants, args.small) for i in range(n_cases)]
    print(f"gpu_fuzz: {n_cases} cases, {len(variants)} launch variants, {workers} worker(s) on {device}, "
          f"seed {args.seed}, budget {args.seconds:.0f}s", flush=True)

    rows: list[dict[str, Any]] = []
    skipped = 0
    fatal: list[str] = []
    warm_info: list[Any] = []
    n_shown = 0

    def show(m: Any, done: int, failed: int) -> None:
        nonlocal n_shown
        if m[0] == "row" and not m[2]["ok"] and n_shown < 50:
            n_shown += 1
            print(f"FAIL #{m[2]['index']} {m[2]['case_short']} [{m[2]['variant']}]: "
                  f"{'; '.join(m[2].get('failures', []))[:400]}", flush=True)
        elif m[0] == "warm" and m[5]:
            print(f"  worker {m[1]} compiled its {m[5]} variants in {m[2]:.1f}s"
                  + (f" ({len(m[3])} errors: {m[3][:2]})" if m[3] else ""), flush=True)
        elif m[0] == "fatal":
            print(f"FATAL worker {m[1]}: {m[2][:1000]}", flush=True)

    if workers <= 1:
        class _Q(list):
            last = time.time()

            def put(self, item: Any) -> None:
                self.append(item)
                rows_now = [m for m in self if m[0] == "row"]
                show(item, len(rows_now), 0)
                if time.time() - self.last > 10:
                    self.last = time.time()
                    el = self.last - t_start
                    print(f"  [{el:6.0f}s] {len(rows_now)}/{n_cases} cases, {sum(not m[2]['ok'] for m in rows_now)} failed",
                          flush=True)
        q: Any = _Q()
        worker(0, 1, specs, variants if cuda else [], device, args.small, args.max_rows, deadline, q, None)
        msgs = list(q)
    else:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        barrier = ctx.Barrier(workers)
        procs = []
        for w in range(workers):
            p = ctx.Process(target=worker, args=(w, workers, specs[w::workers], variants[w::workers], device,
                                                 args.small, args.max_rows, deadline, q, barrier))
            p.start()
            procs.append(p)
        msgs = []
        finished: set[int] = set()
        last = time.time()
        n_rows = n_fail = 0
        while len(finished) < workers:
            try:
                m = q.get(timeout=5.0)
            except Exception:  # noqa: BLE001 - queue.Empty: check for dead workers
                for w, p in enumerate(procs):
                    if w not in finished and not p.is_alive():
                        finished.add(w)
                        fatal.append(f"worker {w} exited with code {p.exitcode}")
                m = None
            if m is not None:
                msgs.append(m)
                show(m, n_rows, n_fail)
                if m[0] == "row":
                    n_rows += 1
                    n_fail += not m[2]["ok"]
                elif m[0] in ("done", "fatal"):
                    finished.add(m[1])
            if time.time() - last > 10:
                last = time.time()
                el = last - t_start
                print(f"  [{el:6.0f}s] {n_rows}/{n_cases} cases, {n_fail} failed, {n_rows / max(el, 1e-9):.1f} cases/s",
                      flush=True)
        for p in procs:
            p.join(timeout=30)
    for m in msgs:
        if m[0] == "row":
            rows.append(m[2])
        elif m[0] == "skipped":
            skipped += 1
        elif m[0] == "fatal":
            fatal.append(f"worker {m[1]}: {m[2]}")
        elif m[0] == "warm":
            warm_info.append({"worker": m[1], "seconds": m[2], "errors": m[3], "compiled": m[4]})
    t_cases = time.time() - t_start

    big: dict[str, Any] | None = None
    if not args.no_big:
        print("gpu_fuzz: the > 2**31-element case" + (" (toy size: --small)" if args.small else "") + " ...", flush=True)
        big = _big_in_subprocess(device, args.small, 300.0) if cuda else big_case(device, args.small)
        for part in big.get("parts", []):
            print(f"  {'PASS' if part['ok'] else 'FAIL'} q {part['storage']:<10} {part.get('config', ''):<9} "
                  f"rows checked {part.get('rows_checked', 0)} "
                  f"out err {part.get('out_err', float('nan')):.2e} (bound {part.get('out_bound', float('nan')):.2e}) "
                  f"kernel {part.get('kernel_s', float('nan')):.2f}s {'; '.join(part.get('failures', []))[:300]}", flush=True)
        if big.get("error"):
            print(f"  FAIL {big['error']}", flush=True)

    by_spec = {s["index"]: s for s in specs}
    failures = [{**r, "spec": by_spec[r["index"]], "case": by_spec[r["index"]]["case"]} for r in rows if not r["ok"]]
    n_fail = len(failures) + (0 if big is None or big.get("ok") else 1)
    from sparseattn.eval.env import environment

    env = environment("cuda" if cuda else "cpu")
    summary = {
        "env": env, "seed": args.seed, "cases_requested": n_cases, "cases_run": len(rows), "cases_skipped_time": skipped,
        "failures": len(failures), "big_case": big, "fatal": fatal, "workers": workers, "variants": variants,
        "warm": warm_info, "wall_s": time.time() - t_start, "cases_wall_s": t_cases,
        "rows": [{kk: r.get(kk) for kk in ("index", "ok", "variant", "case_short", "worst", "out_err", "out_bound",
                                          "lse_err", "lse_bound", "rows_checked", "empty_rows", "wall_s", "kernel_s")}
                 for r in sorted(rows, key=lambda r: r["index"])],
    }
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1, default=str)
    with open(os.path.join(out_dir, "failures.json"), "w") as f:
        json.dump({"seed": args.seed, "failures": failures, "big_case": big if big and not big.get("ok") else None},
                  f, indent=1, default=str)

    def case_of(r: dict[str, Any]) -> dict[str, Any]:
        return by_spec[r["index"]]["case"]

    print()
    for line in (_table(rows, lambda r: f"{case_of(r)['dtype']} d{case_of(r)['D']}", "dtype / head_dim")
                 + [""] + _table(rows, lambda r: case_of(r)["recipe"] + (" +pv" if by_spec[r["index"]]["pv"] else ""), "layout recipe")
                 + [""] + _table(rows, lambda r: ("causal" if case_of(r)["causal"] else "full")
                                 + (" Nq>Nkv" if case_of(r)["Nq"] > case_of(r)["Nkv"] else ""), "mask")
                 + [""] + _table(rows, lambda r: ("N<=256" if max(case_of(r)["Nq"], case_of(r)["Nkv"]) <= 256 else
                                                  "N<=2K" if max(case_of(r)["Nq"], case_of(r)["Nkv"]) <= 2048 else
                                                  "N<=8K" if max(case_of(r)["Nq"], case_of(r)["Nkv"]) <= 8192 else "N>8K"),
                                 "length")):
        print(line)
    worst = max(rows, key=lambda r: r.get("worst", 0.0), default=None)
    if worst is not None:
        print(f"\nworst case: #{worst['index']} err/bound {worst.get('worst', 0.0):.3f} {worst['case_short']} [{worst['variant']}]")
    print(f"gpu_fuzz: {len(rows) - len(failures)}/{len(rows)} cases passed"
          + (f", {skipped} not run (time budget)" if skipped else "")
          + (f"; 2**31 case {'PASS' if big.get('ok') else 'FAIL'}" if big is not None else "")
          + (f"; FATAL: {fatal}" if fatal else "")
          + f" in {time.time() - t_start:.0f}s; JSON under {out_dir}")
    if fatal or n_fail:
        return 1
    return 0 if rows else 3


if __name__ == "__main__":
    sys.exit(main())
