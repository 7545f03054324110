"""Which pipe does the int32 -> fp32 conversion use? A throughput probe for the quantized kernel's ``I2F_ADD``.

Each program keeps ``BLOCK / (32 * num_warps)`` independent chains per thread and runs ``--iters`` steps of one
mode over them (every step's input differs, so nothing folds):

* ``cvt``: ``acc += float(x + i)`` (``I2FP.F32.S32``: the INT8 kernel's conversion of each Q·Kᵀ score);
* ``add``: ``acc += magic(x + i)`` (``I2F_ADD``'s integer add and float subtract; exact for ``|x| <= 2**22``);
* ``exp``: ``y += c; acc += exp2(y)`` (``MUFU.EX2``, the softmax's unit);
* ``exp+cvt``, ``exp+add``: both in one step.

If ``exp+cvt`` takes about ``exp`` + ``cvt`` while ``exp+add`` takes about ``exp``, the conversion shares the
exp2 unit and ``I2F_ADD`` frees it. Timing: ``triton.testing.do_bench`` (warm-up, synchronised), median of
``--repeats`` runs per mode, modes interleaved round-robin; ``xu_probe.json`` under ``--out`` and a table.

    PYTHONPATH=src python3 benchmarks/xu_probe.py --out $OUT/xu
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch
import triton
import triton.language as tl

MODES = {"cvt": 0, "add": 1, "exp": 2, "exp+cvt": 3, "exp+add": 4}


@triton.jit
def _magic(x):
    return (x + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0


@triton.jit
def _probe_kernel(X, Y, ITERS: tl.constexpr, MODE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + offs)
    y = (x & 1023).to(tl.float32) * -0.0009765625
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(ITERS):
        xi = x + i
        y = y - 0.0001220703125
        if MODE == 0:
            acc += xi.to(tl.float32)
        elif MODE == 1:
            acc += _magic(xi)
        elif MODE == 2:
            acc += tl.math.exp2(y)
        elif MODE == 3:
            acc += tl.math.exp2(y) + xi.to(tl.float32)
        else:
            acc += tl.math.exp2(y) + _magic(xi)
    tl.store(Y + offs, acc)


def run(n: int, iters: int, block: int, warps: int, repeats: int, device: str) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randint(-(2 ** 21), 2 ** 21, (n,), generator=g, dtype=torch.int32).to(device)
    outs = {m: torch.empty(n, dtype=torch.float32, device=device) for m in MODES}

    def launch(m: str):
        return lambda: _probe_kernel[(n // block,)](x, outs[m], ITERS=iters, MODE=MODES[m], BLOCK=block,
                                                    num_warps=warps)

    for m in MODES:
        launch(m)()
    same = {"cvt_vs_add": bool(torch.equal(outs["cvt"], outs["add"])),
            "exp_cvt_vs_exp_add": bool(torch.equal(outs["exp+cvt"], outs["exp+add"]))}
    times: dict[str, list[float]] = {m: [] for m in MODES}
    if device == "cuda":
        from triton.testing import do_bench

        bench = lambda fn: float(do_bench(fn, warmup=10, rep=50, return_mode="median"))  # noqa: E731
    else:  # interpreter smoke test: wall time, meaningless as a measurement
        import time

        def bench(fn):
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
    for _ in range(repeats):
        for m in MODES:
            times[m].append(bench(launch(m)))
    med = {m: statistics.median(t) for m, t in times.items()}
    ops = n * iters
    return {"n": n, "iters": iters, "block": block, "num_warps": warps, "same_bits": same, "ms_rounds": times,
            "ms": med, "g_per_s": {m: ops / (med[m] * 1e-3) / 1e9 for m in MODES}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1 << 22)
    ap.add_argument("--iters", type=int, default=1024)
    ap.add_argument("--block", type=int, default=4096)
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args(argv)
    if a.n % a.block:
        print(f"xu_probe: --n must be a multiple of --block; expected a multiple of {a.block}, got {a.n}",
              file=sys.stderr)
        return 2
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        print("xu_probe: no CUDA device (TRITON_INTERPRET=1 runs it on the CPU, for a smoke test only)",
              file=sys.stderr)
        return 2
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    res = run(a.n, a.iters, a.block, a.warps, a.repeats, dev)
    res["gpu"] = torch.cuda.get_device_name() if dev == "cuda" else "cpu (interpreter)"
    res["versions"] = {"torch": torch.__version__, "triton": triton.__version__}
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "xu_probe.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(f"{res['gpu']}, n={a.n} x {a.iters} steps, same bits: {res['same_bits']}")
    print("| mode | ms (median) | G steps/s |")
    print("|---|---:|---:|")
    for m in MODES:
        print(f"| {m} | {res['ms'][m]:.3f} | {res['g_per_s'][m]:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
