"""GPU timing helpers shared by ``benchmarks/`` and ``sparseattn bench``.

Everything here needs CUDA except :func:`attention_flops` and :func:`cuda_unavailable_reason`.
Timings are medians of CUDA-event measurements (``triton.testing.do_bench``), after warm-up.
Baselines: PyTorch SDPA per backend (cuDNN, flash; GQA through ``enable_gqa`` or, where a backend
refuses that, K/V expanded once outside the timed region) and FlexAttention compiled once per
shape with the *same* layout (:func:`sparseattn.layout.convert.layout_to_flex_block_mask`).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from sparseattn.layout.block_layout import BlockLayout

__all__ = [
    "cuda_unavailable_reason",
    "bench_ms",
    "round_robin_ms",
    "attention_flops",
    "causal_pairs",
    "gpu_qkv",
    "sdpa_runners",
    "flex_runner",
    "kernel_runner",
    "tail_parity",
    "peak_memory_bytes",
]


def cuda_unavailable_reason() -> str | None:
    """``None`` when a CUDA GPU is usable, else why not."""
    if not torch.cuda.is_available():
        return f"no CUDA GPU is available (torch {torch.__version__}, cuda build: {torch.version.cuda})"
    return None


def bench_ms(fn: Callable[[], Any], *, warmup_ms: float = 25.0, rep_ms: float = 100.0, min_reps: int = 5) -> float:
    """Median milliseconds of ``fn()`` (CUDA events via ``triton.testing.do_bench``).

    ``rep_ms`` is stretched so that at least ``min_reps`` timed runs happen for slow calls.
    """
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    est = max(start.elapsed_time(end), 1e-3)
    rep = max(rep_ms, est * min_reps)
    try:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup_ms, rep=rep, return_mode="median"))
    except ImportError:  # pragma: no cover - triton is a dependency on Linux
        times = []
        for _ in range(max(min_reps, int(rep / est))):
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        times.sort()
        return float(times[len(times) // 2])


def round_robin_ms(runners: dict[str, Callable[[], Any]], repeats: int,
                   stop: Callable[[dict[str, list[float]]], bool] | None = None) -> dict[str, list[float]]:
    """``repeats`` rounds of :func:`bench_ms` over every runner in turn (ratios paired within a round: device
    drift between rounds cancels out); ``stop(rounds so far)``, checked before each round, ends early."""
    rounds: dict[str, list[float]] = {n: [] for n in runners}
    for _ in range(repeats):
        if stop is not None and stop(rounds):
            break
        for n, fn in runners.items():
            rounds[n].append(bench_ms(fn))
    return rounds


def capture_graph(fn: Callable[[], Any], *, capture_error_mode: str = "global") -> Callable[[], Any]:
    """``fn`` captured in a CUDA graph after two warm-up calls on a side stream; returns the graph's replay.
    ``capture_error_mode``: as :class:`torch.cuda.graph`'s."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode=capture_error_mode):
        fn()
    return graph.replay


def causal_pairs(seqlen_q: int, seqlen_kv: int) -> int:
    """Allowed (query, key) pairs under bottom-right causal alignment."""
    off = seqlen_kv - seqlen_q
    total = 0
    # rows r see min(max(r + off + 1, 0), seqlen_kv) keys: sum in closed form over the three ranges
    r0 = max(0, -off)  # first row that sees anything
    r_full = max(r0, min(seqlen_q, seqlen_kv - off))  # rows >= r_full see every key
    # rows in [r0, r_full) see r + off + 1 keys
    n = r_full - r0
    if n > 0:
        total += n * (r0 + off + 1) + n * (n - 1) // 2
    total += (seqlen_q - r_full) * seqlen_kv
    return total


def attention_flops(batch: int, heads: int, seqlen_q: int, seqlen_kv: int, head_dim: int, causal: bool) -> float:
    """Dense attention FLOPs (two matmuls, 2 FLOPs per multiply-add) over the allowed pairs."""
    pairs = causal_pairs(seqlen_q, seqlen_kv) if causal else seqlen_q * seqlen_kv
    return 4.0 * batch * heads * pairs * head_dim


def gpu_qkv(batch: int, heads: int, kv_heads: int, seqlen_q: int, seqlen_kv: int, head_dim: int, *,
            dtype: torch.dtype = torch.bfloat16, seed: int = 0, device: str = "cuda") -> tuple[torch.Tensor, ...]:
    """Seeded Gaussian q, k, v generated on the GPU (fast at long lengths)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(batch, heads, seqlen_q, head_dim, generator=gen, device=device, dtype=torch.float32).to(dtype)
    k = torch.randn(batch, kv_heads, seqlen_kv, head_dim, generator=gen, device=device, dtype=torch.float32).to(dtype)
    v = torch.randn(batch, kv_heads, seqlen_kv, head_dim, generator=gen, device=device, dtype=torch.float32).to(dtype)
    return q, k, v


def sdpa_runners(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> dict[str, Callable[[], Any] | str]:
    """SDPA callables per backend (``"cudnn"``, ``"flash"``), or the reason a backend cannot run.

    Causal SDPA is top-left aligned, so causal baselines are only offered for ``N_q == N_kv``.
    """
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out: dict[str, Callable[[], Any] | str] = {}
    if causal and q.shape[2] != k.shape[2]:
        return {"cudnn": "causal with N_q != N_kv (SDPA aligns top-left)", "flash": "same"}
    G = q.shape[1] // k.shape[1]
    expanded: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _expanded() -> tuple[torch.Tensor, torch.Tensor]:
        if not expanded:
            expanded.append((k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)))
        return expanded[0]

    for name, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        errors = []
        for mode in ["gqa"] + (["expanded"] if G > 1 else []):
            if mode == "gqa":
                kk, vv, extra = k, v, ({"enable_gqa": True} if G > 1 else {})
            else:
                (kk, vv), extra = _expanded(), {}

            def run(kk=kk, vv=vv, extra=extra, be=be):  # noqa: ANN001, ANN202
                with sdpa_kernel(be):
                    return F.scaled_dot_product_attention(q, kk, vv, is_causal=causal, **extra)

            try:
                run()
                torch.cuda.synchronize()
            except Exception as exc:  # the backend refuses this shape/dtype/GQA mode
                msg = str(exc).splitlines()[0][:160] if str(exc) else ""
                errors.append(f"{mode}: {type(exc).__name__}: {msg}")
                continue
            out[name] = run
            out[name + "_mode"] = mode  # type: ignore[assignment]
            break
        if name not in out:
            out[name] = "; ".join(errors) or "refused"
    return out


_FLEX: dict[str, Any] = {}


def flex_runner(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout, causal: bool) -> Callable[[], Any]:
    """FlexAttention (``torch.compile``d once per process, recompiled per shape) with the layout's BlockMask."""
    from torch.nn.attention.flex_attention import flex_attention

    from sparseattn.layout.convert import layout_to_flex_block_mask

    if "fn" not in _FLEX:
        import torch._dynamo

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    block_mask = layout_to_flex_block_mask(layout, causal=causal)
    gqa = q.shape[1] != k.shape[1]
    fn = _FLEX["fn"]
    return lambda: fn(q, k, v, block_mask=block_mask, enable_gqa=gqa)


def kernel_runner(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout | None, causal: bool,
                  **kw: Any) -> Callable[[], Any]:
    """The Triton kernel with preallocated outputs (what the timed region runs)."""
    from sparseattn.ops.triton_launch import block_sparse_fwd

    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    return lambda: block_sparse_fwd(q, k, v, layout=layout, causal=causal, out=out, lse=lse, **kw)


def _tail_layout(layout: BlockLayout, rows: int) -> BlockLayout:
    mb = rows // layout.block_m
    return BlockLayout(layout.kv_num_blocks[:, :, -mb:], layout.kv_indices[:, :, -mb:], layout.block_m, layout.block_n,
                       rows, layout.seqlen_kv, validate=False)


def tail_parity(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout | None, causal: bool,
                out: torch.Tensor, lse: torch.Tensor, *, rows: int | None = None) -> dict[str, Any]:
    """Ratio-rule check of ``(out, lse)`` against the fp32 reference on the last ``rows`` query rows.

    The last rows see every key under bottom-right causal alignment, so checking them against a
    reference over *all* keys exercises the whole key range at a fraction of the reference's cost.
    ``rows=None`` checks everything. Returns the errors, the bounds and ``ok``.
    """
    from sparseattn.ops.reference import reference_attention
    from sparseattn.testing.tolerances import ATOL_FLOOR, RATIO, check_ratio

    Nq = q.shape[2]
    if rows is not None and rows < Nq:
        bm = layout.block_m if layout is not None else 128
        rows = max(bm, rows // bm * bm)
        if Nq % bm:
            rows = None  # slicing must start on a block boundary
    if rows is not None and rows < Nq:
        qs, outs, lses = q[:, :, -rows:], out[:, :, -rows:], lse[:, :, -rows:]
        lay = _tail_layout(layout, rows) if layout is not None else None
    else:
        qs, outs, lses, lay = q, out, lse, layout
        rows = Nq
    hi = reference_attention(qs.float(), k.float(), v.float(), layout=lay, causal=causal)
    lo = reference_attention(qs, k, v, layout=lay, causal=causal, upcast=False)
    res: dict[str, Any] = {"rows_checked": rows, "ok": True}
    for what, got, h, l in (("out", outs, hi.out, lo.out), ("lse", lses, hi.lse, lo.lse)):
        fin = torch.isfinite(h)
        k_err = float((got.double() - h.double()).abs()[fin].max()) if bool(fin.any()) else 0.0
        r_err = float((l.double() - h.double()).abs()[fin].max()) if bool(fin.any()) else 0.0
        res[f"{what}_err"] = k_err
        res[f"{what}_ref_lowp_err"] = r_err
        res[f"{what}_bound"] = RATIO * r_err + ATOL_FLOOR.get(got.dtype, ATOL_FLOOR[torch.float32])
        try:
            check_ratio(got, h, l, what)
        except AssertionError as exc:
            res["ok"] = False
            res.setdefault("failures", []).append(str(exc))
    return res


def peak_memory_bytes(fn: Callable[[], Any]) -> int:
    """Peak CUDA memory allocated while ``fn()`` runs, above what was allocated before."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - base)


def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12 if ms > 0 and math.isfinite(ms) else float("nan")
