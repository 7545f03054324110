"""Where a decode step spends its time, per decode path, in eager generation (diagnostic for issue 14).

``gen-check`` measured SmolLM2-135M at 8128 tokens on the H200 (bf16, eager, 64 tokens): the model's dense decode
62.6 ms per token, ``kernel_decode`` 39.7, ``sparse_decode`` (50% of 16-key pages) 110.6, ``mixed_int8`` 82.4. For
each ``--modes`` entry this script prefills one prompt of ``--length`` tokens with the model's attention, then:

* times ``--steps`` single-token decode steps one by one (synchronised; the first ``--warmup`` are dropped) and
  reports the median ms per step;
* runs ``--profile-steps`` more under ``cProfile``: host seconds per step and the functions with the most own time;
* on CUDA, runs two more with ``torch.cuda.set_sync_debug_mode("warn")`` and counts the host syncs per step by the
  Python line that caused them.

Writes ``decode_host_probe.json`` under ``--out`` and prints a short table last. Usage::

    PYTHONPATH=src python3 benchmarks/decode_host_probe.py --model smollm2-135m --text-dir ESSAYS --length 8128
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

import torch  # noqa: E402

MODES = ("dense", "kernel_decode", "sparse_decode", "mixed_int8", "mixed_fp8")


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


@torch.no_grad()
def probe_mode(model, ids: torch.Tensor, mode: str, *, steps: int, warmup: int, profile_steps: int,
               top_pages: float, page_size: int) -> dict:
    from contextlib import nullcontext

    from sparseattn.eval.gen_check import _cache_kwarg, _dynamic_cache, decode_mode

    dev = ids.device
    ctx = nullcontext((_dynamic_cache(model), None)) if mode == "dense" else decode_mode(
        model, mode, top_pages=top_pages, page_size=page_size)
    row: dict = {"mode": mode}
    with ctx as (cache, _handle):
        kw = {_cache_kwarg(model): cache, "use_cache": True, "logits_to_keep": 1}
        out = model(input_ids=ids, **kw)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        times = []
        for i in range(steps):
            _sync(dev)
            t0 = time.perf_counter()
            out = model(input_ids=nxt, **kw)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            _sync(dev)
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1e3)
        row["ms_per_step_median"] = statistics.median(times)
        row["ms_per_step"] = times
        prof = cProfile.Profile()
        _sync(dev)
        t0 = time.perf_counter()
        prof.enable()
        for _ in range(profile_steps):
            out = model(input_ids=nxt, **kw)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        prof.disable()
        _sync(dev)
        row["profiled_ms_per_step"] = (time.perf_counter() - t0) * 1e3 / profile_steps
        st = pstats.Stats(prof)
        funcs = []
        for (path, line, name), (_cc, nc, tt, ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
            funcs.append((tt / profile_steps * 1e3, nc // profile_steps, ct / profile_steps * 1e3,
                          f"{os.path.basename(path)}:{line}({name})"))
        funcs.sort(reverse=True)
        row["host_ms_per_step"] = sum(f[0] for f in funcs)
        row["top_own_ms"] = [{"fn": f[3], "own_ms": f[0], "calls": f[1], "cum_ms": f[2]} for f in funcs[:25]]
        if dev.type == "cuda":
            syncs: dict[str, int] = {}
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    for _ in range(2):
                        out = model(input_ids=nxt, **kw)
                        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            finally:
                torch.cuda.set_sync_debug_mode(0)
            for w in caught:
                if "synchroniz" in str(w.message):
                    where = f"{os.path.relpath(w.filename)}:{w.lineno}"
                    syncs[where] = syncs.get(where, 0) + 1
            row["syncs_per_step"] = {k: v / 2 for k, v in sorted(syncs.items(), key=lambda kv: -kv[1])}
    return row


def main() -> int:
    from sparseattn.eval.bench_model import load_model
    from sparseattn.eval.env import environment
    from sparseattn.eval.texts import documents_for, token_samples

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--text-dir", default="../shared/data/essays")
    ap.add_argument("--length", type=int, default=8128)
    ap.add_argument("--modes", default="dense,kernel_decode,sparse_decode,mixed_int8")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--warmup", type=int, default=6)
    ap.add_argument("--profile-steps", type=int, default=8)
    ap.add_argument("--top-pages", type=float, default=0.5)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=[None, "float32", "bfloat16", "float16"])
    ap.add_argument("--out", default="decode_host_probe")
    args = ap.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad or args.steps <= args.warmup:
        print(f"decode_host_probe: --modes/--steps bad; expected modes from {MODES} and steps > warmup, got "
              f"{bad or (args.steps, args.warmup)}", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device == "cuda" else torch.float32)
    model, tok = load_model(args.model, dtype=dtype, device=args.device)
    docs, _ = documents_for(None, args.text_dir)
    ids = token_samples(docs, tok, seq_len=args.length, samples=1)[0][0].to(args.device)
    rows = []
    for mode in modes:
        r = probe_mode(model, ids, mode, steps=args.steps, warmup=args.warmup, profile_steps=args.profile_steps,
                       top_pages=args.top_pages, page_size=args.page_size)
        rows.append(r)
        print(f"--- {mode}: {r['ms_per_step_median']:.2f} ms/step (median), host {r['host_ms_per_step']:.2f} ms/step "
              f"under cProfile; syncs/step {sum((r.get('syncs_per_step') or {}).values()):g}", flush=True)
        for f in r["top_own_ms"][:12]:
            print(f"    {f['own_ms']:8.3f} ms own {f['calls']:5d} calls  {f['cum_ms']:8.3f} ms cum  {f['fn']}")
        for where, n in list((r.get("syncs_per_step") or {}).items())[:8]:
            print(f"    sync x{n:g}/step at {where}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "decode_host_probe.json"), "w", encoding="utf-8") as fh:
        json.dump({"model": args.model, "length": args.length, "top_pages": args.top_pages,
                   "page_size": args.page_size, "rows": rows, "environment": environment(args.device)}, fh, indent=1)
    print(f"\n| mode | ms/step (median of {args.steps - args.warmup}) | host ms/step (cProfile) | syncs/step |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['ms_per_step_median']:.2f} | {r['host_ms_per_step']:.2f} | "
              f"{sum((r.get('syncs_per_step') or {}).values()):g} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
