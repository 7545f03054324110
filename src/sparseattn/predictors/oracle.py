"""Oracle predictor: exact block attention mass from full attention (the upper bound).

The exact *block mass* of query block ``i`` and key block ``j`` is the average over the block's
query rows ``r`` of the softmax probability mass row ``r`` puts on the keys of block ``j``::

    mass[i, j] = (1 / |rows(i)|) · Σ_{r ∈ rows(i)} Σ_{c ∈ cols(j), c allowed} exp(scale·q_r·k_c − lse_r)

so each row of ``mass`` sums to 1 (0 for query blocks that see no key). It is computed blockwise
in two passes over key chunks — pass 1 the exact natural-log ``lse`` per row (online logsumexp),
pass 2 the exact probabilities summed per block — never materialising ``N_q × N_kv``.

Selecting blocks by this mass (top-k fraction or CDF) is the best any block predictor can do for a
given density, which is what ``sparseattn compare`` measures other predictors against.

**Sampled mass** (``sampled``): the same exact per-row probabilities, but only for ``rows_per_block`` query rows
of each query block, evenly spaced and ending at the block's last row (the row that sees the most keys of the
diagonal block); the block's mass is their average. Every sampled row is exact (its own full softmax over all
the keys it may attend), so the only error is the sampling of rows; the cost is ``rows_per_block / block_m`` of
the oracle's (1/8 at 8 of 64 rows). Unlike the oracle it is a usable predictor (an estimate from a fraction of
the rows, in the spirit of MInference's last-query and XAttention's strided estimates); its layout adds the
forced sink and local blocks as ``mean_sim`` does. Two paths compute its mass: the PyTorch function below (two
chunked passes in a Python loop over key chunks) and the Triton mass (:mod:`sparseattn.predictors.fused_sampled`:
two launches over key-block chunks, its default ``method="split"``), which ``SampledMassPredictor(backend="auto")``
takes for CUDA tensors when it supports the call (else the PyTorch path with a warning once per reason);
``bench_predictors`` measures both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from sparseattn._validation import fail
from sparseattn.layout.block_layout import BlockLayout, cdiv
from sparseattn.layout.masks import causal_window_mask
from sparseattn.predictors._common import (
    block_pool,
    cached,
    causal_region,
    check_block,
    check_bool,
    check_nonneg,
    check_qk,
    check_topk_or_cdf,
    check_version,
    config_or_default,
    forced_blocks,
    mask_to_layout,
    nonfinite_block_force,
    sampled_rows,
    select_cdf,
    select_topk,
)
from sparseattn.predictors.base import register_predictor

__all__ = ["OracleConfig", "OraclePredictor", "exact_block_mass", "sampled_rows", "SampledMassConfig",
           "SampledMassPredictor"]

_BACKENDS = ("auto", "torch", "triton")


def exact_block_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    causal: bool = True,
    block_m: int = 64,
    block_n: int = 64,
    scale: float | None = None,
    chunk_blocks: int = 4,
    rows_per_block: int | None = None,
) -> torch.Tensor:
    """Exact block attention mass (see module docstring), computed blockwise.

    Args:
        q: ``(B, H, N_q, D)``.
        k: ``(B, H_kv, N_kv, D)``, ``H % H_kv == 0`` (never copied per head).
        causal: bottom-right aligned causal mask.
        block_m: query rows per block.
        block_n: key columns per block.
        scale: softmax scale (default ``D ** -0.5``).
        chunk_blocks: key blocks per step (memory ``O(H · N_q · chunk_blocks · block_n)``).
        rows_per_block: average only this many query rows per block (evenly spaced, the block's last row
            included; :func:`sampled_rows`) instead of all of them; ``None``: every row (the exact mass).

    Returns:
        float32 ``[B, H, Mb, Nb]``; each row sums to 1 (0 where the query block sees no key).

    Shapes:
        ``Mb = ceil(N_q / block_m)``, ``Nb = ceil(N_kv / block_n)``.
    """
    fn = "exact_block_mass"
    B, H, Hkv, Nq, Nkv, D = check_qk(fn, q, k, causal)
    check_block(fn, "block_m", block_m)
    check_block(fn, "block_n", block_n)
    check_block(fn, "chunk_blocks", chunk_blocks)
    if scale is None:
        scale = D ** -0.5
    G = H // Hkv
    dev = q.device
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    if rows_per_block is None:
        rows = torch.arange(Nq, device=dev)
        qf = q.to(acc).reshape(B, Hkv, G, Nq, D)
    else:
        check_block(fn, "rows_per_block", rows_per_block)
        rows = sampled_rows(Nq, block_m, rows_per_block, dev)
        qf = q.index_select(2, rows).to(acc).reshape(B, Hkv, G, rows.numel(), D)
    NR = rows.numel()
    kf = k.to(acc)
    off = Nkv - Nq
    step = block_n * chunk_blocks

    last_row = Nq - 1  # the largest row of ``rows`` (the sampled rows include every block's last row)
    # host copy of the (shape-only) rows, to find on the host the first row that reaches a key chunk
    rows_host = None if rows_per_block is None or not causal else sampled_rows(Nq, block_m, rows_per_block,
                                                                              torch.device("cpu"))

    def first_row(start: int) -> int:
        """Index in ``rows`` of the first row that may attend key ``start`` or later (causal: the rows before it see
        none of the chunk, so they are left out of its products; exact, as their terms are exp(-inf) = 0)."""
        if not causal:
            return 0
        if rows_host is None:
            return min(max(start - off, 0), NR)
        return int(torch.searchsorted(rows_host, start - off))

    def scores(start: int, stop: int) -> tuple[int, torch.Tensor] | None:
        if causal and start > last_row + off:  # no row reaches this chunk (host ints: no device sync)
            return None
        i0 = first_row(start)
        s = torch.einsum("bhgnd,bhcd->bhgnc", qf[..., i0:, :], kf[:, :, start:stop]) * scale
        if causal:
            cols = torch.arange(start, stop, device=dev)
            s = s.masked_fill(~causal_window_mask(rows[i0:], cols, off), -math.inf)
        return i0, s

    # pass 1: exact natural-log lse per row (online logsumexp)
    m = torch.full((B, Hkv, G, NR), -math.inf, dtype=acc, device=dev)
    l = torch.zeros((B, Hkv, G, NR), dtype=acc, device=dev)
    for start in range(0, Nkv, step):
        got = scores(start, min(start + step, Nkv))
        if got is None:
            continue
        i0, s = got
        m0, l0 = m[..., i0:], l[..., i0:]
        m_new = torch.maximum(m0, s.amax(-1))
        m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        l[..., i0:] = l0 * torch.exp(m0 - m_safe) + torch.exp(s - m_safe.unsqueeze(-1)).sum(-1)
        m[..., i0:] = m_new
    has = l > 0
    lse = torch.where(has, m + torch.log(torch.where(has, l, torch.ones_like(l))), torch.full_like(m, math.inf))

    # pass 2: exact probabilities summed per (query block, key block)
    Mb, Nb = cdiv(Nq, block_m), cdiv(Nkv, block_n)
    rowblk = rows // block_m
    # rows per query block, without bincount (on CUDA it reads its output size back to the host: a sync that also
    # breaks CUDA-graph capture of a patched layer)
    counts = torch.zeros(Mb, dtype=acc, device=dev).index_add_(0, rowblk, torch.ones(NR, dtype=acc, device=dev))
    mass = torch.zeros((B, Hkv, G, Mb, Nb), dtype=acc, device=dev)
    for start in range(0, Nkv, step):
        stop = min(start + step, Nkv)
        got = scores(start, stop)
        if got is None:
            continue
        i0, s = got
        p = torch.exp(s - lse[..., i0:].unsqueeze(-1))  # 0 for masked entries and rows without keys (lse=+inf)
        C = stop - start
        nblk = cdiv(C, block_n)
        pad = nblk * block_n - C
        if pad:
            p = torch.nn.functional.pad(p, (0, pad))
        colsum = p.reshape(B, Hkv, G, NR - i0, nblk, block_n).sum(-1)  # [B,Hkv,G,NR-i0,nblk]
        blk = torch.zeros((B, Hkv, G, Mb, nblk), dtype=acc, device=dev)
        blk.index_add_(3, rowblk[i0:], colsum)
        j0 = start // block_n
        mass[..., j0:j0 + nblk] = blk
    mass = mass / counts[:, None]
    return mass.reshape(B, H, Mb, Nb).to(torch.float32)


def _select_by_mass(mass: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cfg: Any, causal: bool,
                    forced: torch.Tensor | None = None) -> BlockLayout:
    """The oracle's and the sampled predictor's layout from their block mass: top-k or CDF per row (``cfg.topk`` /
    ``cfg.cdf_threshold``), plus ``forced`` blocks and every block holding NaN/inf (its mass is NaN, and the
    selection would drop it)."""
    Nq, Nkv = q.shape[2], k.shape[2]
    region = causal_region(Nq, Nkv, cfg.block_m, cfg.block_n, causal, q.device)
    if cfg.topk is not None:
        mask = select_topk(mass, region, cfg.topk)
    else:
        mask = select_cdf(mass, region, float(cfg.cdf_threshold))
    if forced is not None:
        mask = mask | forced
    mask = mask | nonfinite_block_force(block_pool(q, cfg.block_m)[0], block_pool(k, cfg.block_n)[0], region)
    return mask_to_layout(mask, block_m=cfg.block_m, block_n=cfg.block_n, seqlen_q=Nq, seqlen_kv=Nkv)


@dataclass(frozen=True)
class OracleConfig:
    """Exact block mass, then top-k fraction or CDF selection per (head, query block).

    Args:
        topk: keep ``ceil(topk · n)`` of the ``n`` allowed blocks per row (at least one); or None.
        cdf_threshold: keep the smallest set of blocks holding this share of the row's exact mass;
            or None. Exactly one of ``topk`` / ``cdf_threshold`` is set (default: ``cdf=0.95``).
        block_m: query rows per block.
        block_n: key columns per block.
        version: config schema version (1).
    """

    topk: float | None = None
    cdf_threshold: float | None = 0.95
    block_m: int = 64
    block_n: int = 64
    version: int = 1

    def __post_init__(self) -> None:
        c = "OracleConfig"
        check_topk_or_cdf(c, self.topk, self.cdf_threshold)
        check_block(c, "block_m", self.block_m)
        check_block(c, "block_n", self.block_n)
        check_version(c, self.version, 1)


@register_predictor("oracle", OracleConfig)
class OraclePredictor:
    """Selects blocks by their exact attention mass (costs two full attention passes: for evaluation only).

    ``last_scores`` holds the exact block mass ``[B, H, Mb, Nb]`` of the last call.

    Shapes:
        q ``(B, H, N_q, D)``, k ``(B, H_kv, N_kv, D)`` → layout with ``B`` batches and ``H`` heads.
    """

    name = "oracle"

    def __init__(self, config: OracleConfig | None = None) -> None:
        self.config = config_or_default("OraclePredictor", config, OracleConfig)
        self.last_scores: torch.Tensor | None = None

    def predict(self, q: torch.Tensor, k: torch.Tensor, *, causal: bool = True, layer: int | None = None) -> BlockLayout:
        check_qk("OraclePredictor.predict", q, k, causal)
        cfg = self.config
        mass = exact_block_mass(q, k, causal=causal, block_m=cfg.block_m, block_n=cfg.block_n)
        self.last_scores = mass  # diagnostics only: a shared instance's other thread may replace it at once
        return _select_by_mass(mass, q, k, cfg, causal)

    def reset(self) -> None:
        """Stateless: nothing to clear."""


@dataclass(frozen=True)
class SampledMassConfig:
    """Sampled exact mass (module docstring), then top-k fraction or CDF selection per (head, query block).

    Args:
        rows_per_block: query rows per block whose exact attention is computed (their mean is the estimate).
        topk / cdf_threshold: as :class:`OracleConfig` (exactly one; default ``cdf=0.95``).
        keep_sink: always keep key block 0.
        keep_local: always keep the diagonal block and the ``keep_local - 1`` blocks before it (0: none).
        block_m / block_n: block sizes.
        version: config schema version (1).
    """

    rows_per_block: int = 8
    topk: float | None = None
    cdf_threshold: float | None = 0.95
    keep_sink: bool = True
    keep_local: int = 1
    block_m: int = 64
    block_n: int = 64
    version: int = 1

    def __post_init__(self) -> None:
        c = "SampledMassConfig"
        check_block(c, "rows_per_block", self.rows_per_block)
        check_topk_or_cdf(c, self.topk, self.cdf_threshold)
        check_bool(c, "keep_sink", self.keep_sink)
        check_nonneg(c, "keep_local", self.keep_local)
        check_block(c, "block_m", self.block_m)
        check_block(c, "block_n", self.block_n)
        check_version(c, self.version, 1)


@register_predictor("sampled", SampledMassConfig)
class SampledMassPredictor:
    """Selects blocks by the exact mass of a few sampled query rows per block (a real predictor; see the module).

    ``last_scores`` holds the sampled block mass ``[B, H, Mb, Nb]`` of the last call.

    Args:
        config: the prediction parameters (default ``SampledMassConfig()``).
        backend: ``"auto"`` (the Triton mass for CUDA tensors when it supports the call, else the
            PyTorch passes; a CUDA fallback warns once per reason), ``"torch"`` or ``"triton"`` (the kernel, or
            ``NotImplementedError`` with the reason; runs on CPU under ``TRITON_INTERPRET=1``).
    """

    name = "sampled"

    def __init__(self, config: SampledMassConfig | None = None, backend: str = "auto") -> None:
        self.config = config_or_default("SampledMassPredictor", config, SampledMassConfig)
        if not isinstance(backend, str) or backend not in _BACKENDS:
            raise fail("SampledMassPredictor", "backend", "is not a known backend", f"one of {list(_BACKENDS)}",
                       repr(backend))
        self.backend = backend
        self.last_scores: torch.Tensor | None = None
        self.last_backend: str | None = None  # "torch" or "triton": the path the last predict() took
        self._warned: set[str] = set()

    def _fused(self, q: torch.Tensor, k: torch.Tensor) -> bool:
        """Whether this call takes the one-launch Triton mass (raises for ``backend="triton"`` when it cannot)."""
        if self.backend == "torch" or (self.backend == "auto" and not q.is_cuda):
            return False
        from sparseattn.predictors.fused_mean_sim import take_fused
        from sparseattn.predictors.fused_sampled import sampled_mass_refusal

        cfg = self.config
        why = sampled_mass_refusal(q, k, block_m=cfg.block_m, block_n=cfg.block_n, rows_per_block=cfg.rows_per_block)
        return take_fused("SampledMassPredictor", self.backend, why, self._warned,
                          " (a Python loop over key chunks, ~2000 small kernels per call at 32K)")

    def predict(self, q: torch.Tensor, k: torch.Tensor, *, causal: bool = True, layer: int | None = None) -> BlockLayout:
        check_qk("SampledMassPredictor.predict", q, k, causal)
        cfg = self.config
        if self._fused(q, k):
            from sparseattn.predictors.fused_sampled import launch_sampled_mass

            # checked above (check_qk) and in _fused (the refusal); the config validated its block sizes
            mass = launch_sampled_mass(q, k, causal=causal, block_m=cfg.block_m, block_n=cfg.block_n,
                                       rows_per_block=cfg.rows_per_block)
            self.last_backend = "triton"
        else:
            mass = exact_block_mass(q, k, causal=causal, block_m=cfg.block_m, block_n=cfg.block_n,
                                    rows_per_block=cfg.rows_per_block)
            self.last_backend = "torch"
        self.last_scores = mass  # diagnostics only (as the oracle's)
        forced = forced_blocks(q.shape[2], k.shape[2], cfg.block_m, cfg.block_n, cfg.keep_sink, cfg.keep_local,
                               causal, q.device)
        return _select_by_mass(mass, q, k, cfg, causal, forced)

    def reset(self) -> None:
        """Stateless: nothing to clear."""
