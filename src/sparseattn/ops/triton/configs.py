"""Launch configurations for the block-sparse forward kernel: the autotuning space and the fixed config.

The fixed config's per-device choices are data, ``ops/tuned/prefill.json`` (operator ``"triton"``),
read through :mod:`sparseattn.ops.registry`.

Kernel tiles must nest inside layout blocks: ``BLOCK_M`` divides the layout's ``block_m`` and
``BLOCK_N`` divides its ``block_n`` (both are 64 or 128), so one program reads one key-block list.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator
from typing import Any

import triton

# Candidates per head_dim: (BLOCK_M, BLOCK_N, num_warps, num_stages, USE_TMA, maxnreg, extra kernel switches).
# Chosen from device shoot-outs on an H100 (benchmarks/kernel_variants.py) and re-measured on an
# H200 (BENCHMARKS.md, "What was tried": the same config without the register cap is 15% slower).
# The winners fit *two programs per SM*: 8 warps capped at 128 registers (maxnreg) with tiles
# small enough for two copies in shared memory, so one program's softmax, prologue and epilogue
# overlap the other's matmuls — something a single 255-register program per SM cannot do in
# Triton 3.6. TMA candidates (tensor descriptors; "TMA_QO" also for Q/O) are tried only where the
# launcher can use TMA (sm_90+, 16-byte aligned Q/K/V/out rows); the others use pointer loads.
_Cand = tuple[int, int, int, int, bool, "int | None", tuple[tuple[str, bool], ...]]
_NOPF_QO = (("TMA_QO", True), ("PREFETCH", False))
_CANDIDATES: dict[int, list[_Cand]] = {
    64: [(128, 128, 8, 2, True, 128, ()),         # 2/SM, best at 32K
         (128, 64, 8, 2, False, 128, ()),         # 2/SM, pointer loads
         (64, 128, 4, 3, False, None, ()),        # every causal block at 4K-8K, H=9 (sweep_configs.py, H200)
         (64, 64, 4, 3, False, None, ()),         # 3/SM, short rows; also 64-blocks
         (128, 128, 8, 3, False, None, ())],
    128: [(128, 64, 8, 2, True, 128, _NOPF_QO),   # 2/SM, best at 32K
          (128, 64, 8, 2, False, 128, ()),        # 2/SM, pointer loads; best at 8K
          (64, 64, 4, 3, False, None, ())],       # 64-blocks
    256: [(128, 64, 8, 2, False, None, ()), (64, 64, 4, 2, False, None, ()), (64, 32, 4, 3, False, None, ()),
          (128, 64, 8, 2, True, None, ()), (64, 64, 4, 2, True, None, ())],
}

AUTOTUNE_KEY = ["HEAD_DIM", "LAYOUT_BM", "LAYOUT_BN", "CAUSAL", "N_CTX_KEY"]


def _config_of(cand: _Cand) -> triton.Config:
    bm, bn, w, s, use_tma, nreg, extra = cand
    kw: dict[str, Any] = {"BLOCK_M": bm, "BLOCK_N": bn, "USE_TMA": use_tma, **dict(extra)}
    return triton.Config(kw, num_warps=w, num_stages=s, maxnreg=nreg)


def autotune_configs(tma: bool) -> list[triton.Config]:
    """Every candidate for every head_dim (TMA ones only with ``tma``); :func:`prune` keeps those that fit."""
    seen: set[_Cand] = set()
    out = []
    for cands in _CANDIDATES.values():
        for cand in cands:
            if cand in seen or (cand[4] and not tma):
                continue
            seen.add(cand)
            out.append(_config_of(cand))
    return out


def _key(c: triton.Config) -> _Cand:
    kw = c.kwargs
    extra = tuple((f, bool(kw[f])) for f in ("TMA_QO", "PREFETCH") if f in kw)
    return (kw["BLOCK_M"], kw["BLOCK_N"], c.num_warps, c.num_stages, bool(kw.get("USE_TMA", False)),
            getattr(c, "maxnreg", None), extra)


def prune(configs: list[triton.Config], named_args: dict[str, Any], **kwargs: Any) -> list[triton.Config]:
    """Keep the candidates of this head_dim whose tiles nest in the layout blocks."""
    allargs = {**named_args, **kwargs}
    d, lbm, lbn = int(allargs["HEAD_DIM"]), int(allargs["LAYOUT_BM"]), int(allargs["LAYOUT_BN"])
    cands = set(_CANDIDATES.get(d, []))
    kept = [c for c in configs if _key(c) in cands and lbm % c.kwargs["BLOCK_M"] == 0 and lbn % c.kwargs["BLOCK_N"] == 0]
    return kept or [c for c in configs if lbm % c.kwargs["BLOCK_M"] == 0 and lbn % c.kwargs["BLOCK_N"] == 0][:1]


# Where safe_bench records the candidates that failed: the list of the current context (the launcher sets one per
# autotuned launch and returns it as telemetry; a caller may collect across launches with autotune_failures()).
# Nothing is kept in a module-level list.
_FAILURES: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("sparseattn_autotune_failures",
                                                                             default=None)


def safe_bench(kernel_call: Any, quantiles: Any = None, **kwargs: Any) -> Any:
    """Autotuning benchmark that scores a config which fails to compile or launch as infinitely slow
    (the failure is appended to the current :func:`autotune_failures` list, if any)."""
    from triton.testing import do_bench

    try:
        return do_bench(kernel_call, quantiles=quantiles, **kwargs)
    except Exception as exc:  # e.g. a TMA config an older Triton cannot lower
        failures = _FAILURES.get()
        if failures is not None:
            failures.append(f"{type(exc).__name__}: {str(exc)[:200]}")
        n = len(quantiles) if quantiles else 1
        return [float("inf")] * n if quantiles else float("inf")


def collect_autotune_failures() -> list[str]:
    """From now on in this context (a script's main thread), append failed autotune candidates to the returned list
    (benchmark scripts report them; :func:`autotune_failures` is the scoped form)."""
    failures: list[str] = []
    _FAILURES.set(failures)
    return failures


@contextlib.contextmanager
def autotune_failures() -> Iterator[list[str]]:
    """Collect, into the yielded list, the autotune candidates that failed to build or run in this block.

    Nested uses (the launcher opens one per autotuned launch for its telemetry) also report to the outer list.
    """
    outer = _FAILURES.get()
    mine: list[str] = []
    token = _FAILURES.set(mine)
    try:
        yield mine
    finally:
        _FAILURES.reset(token)
        if outer is not None:
            outer.extend(mine)


def default_config(head_dim: int, layout_bm: int, layout_bn: int, *, interpret: bool, pv_skip: bool,
                   device: str | None = None) -> dict[str, Any]:
    """A fixed config (no autotuning): for the CPU interpreter, the pv-skip path, or autotune off.

    ``pv_skip`` forces kernel tiles equal to layout tiles (the rule's unit). Otherwise, on a GPU, the
    shipped per-device choice for ``(head_dim, layout blocks)`` (``ops/tuned/prefill.json`` through the
    registry; ``device`` is a device name, ``None`` = the file's fallback device), else a small config
    that nests in every layout.
    """
    if pv_skip:
        bm, bn = layout_bm, layout_bn
        if head_dim == 256 and bm * bn > 64 * 128:
            warps, stages = 8, 1
        else:
            warps, stages = (8 if bm == 128 else 4), 2
        return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages}
    if interpret:
        # fewest programs and iterations: the interpreter's cost is per operation, not per element
        return {"BLOCK_M": layout_bm, "BLOCK_N": layout_bn, "num_warps": 4, "num_stages": 1}
    cfg = shipped_config(head_dim, layout_bm, layout_bn, device)
    if cfg is not None:
        return dict(cfg)
    return {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}  # nests in 64/128 layout blocks


@functools.lru_cache(maxsize=256)
def shipped_config(head_dim: int, layout_bm: int, layout_bn: int, device: str | None) -> dict[str, Any] | None:
    """The shipped fixed config (checked as a BlockSparseFwdConfig), looked up once per (shape, device)."""
    from sparseattn.ops.launch_configs import BlockSparseFwdConfig
    from sparseattn.ops.registry import tuned_config

    cfg = tuned_config("triton", device, head_dim=head_dim, layout_block_m=layout_bm, layout_block_n=layout_bn)
    if cfg is None or layout_bm % cfg["BLOCK_M"] or layout_bn % cfg["BLOCK_N"]:
        return None
    return BlockSparseFwdConfig.from_dict(cfg).to_dict()
