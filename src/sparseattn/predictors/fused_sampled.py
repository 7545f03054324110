"""Launcher of the sampled exact block mass on the GPU (:mod:`sparseattn.ops.triton.sampled_mass`).

The PyTorch :func:`~sparseattn.predictors.oracle.exact_block_mass` walks the keys in chunks of 256 in a Python loop,
twice (``2 · N_kv / 256`` iterations of several small ops each: about 2000 launches per layer at 32K). This path
computes the same ``[B, H, Mb, Nb]`` float32 mass in two launches (``method="split"``, the default: the key blocks
of each query block split into up to 16 chunks, partial log-sum-exps first, then the mass) or one
(``method="walk"``: one program per query block and KV head walks all its key blocks twice), plus the zeroed output;
every query head of a KV head sits in the same tile (K read once per KV head and chunk). No host synchronisation;
the sampled-row table is shape-only and cached.

It computes the same quantity as the PyTorch function up to float rounding (base-2 exponentials, tensor-core
products in the input dtype for fp16/bf16); the tests compare both methods with it on fresh random inputs under
``TRITON_INTERPRET=1``. The selection after it (CDF or top-k) is :func:`~sparseattn.predictors.oracle._select_by_mass`,
shared with the PyTorch path.

Triton is imported lazily (first launch), never by ``import sparseattn``.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from sparseattn.layout.block_layout import cdiv
from sparseattn.predictors._common import cached, check_block, check_qk, sampled_rows
from sparseattn.predictors.fused_mean_sim import (
    _MAX_GRID_YZ,
    SUPPORTED_DTYPES,
    _next_pow2,
    _triton_import_error,
    qk_tensor_refusal,
)

__all__ = ["sampled_mass_refusal", "sampled_block_mass", "launch_sampled_mass", "split_chunks", "MAX_PACKED_ROWS",
           "METHODS", "SUPPORTED_DTYPES"]

MAX_PACKED_ROWS = 256  # query heads per KV head x rows_per_block, in one tile
MAX_HEAD_DIM = 256
_SMEM_SLACK = 1024  # bytes for the kernel's small buffers beside its Q and K tiles


def _tiles(q: torch.Tensor, k: torch.Tensor, rows_per_block: int, block_m: int) -> tuple[int, int, int]:
    """``(G, RG, DP)``: query heads per KV head, the packed row tile and the padded head dim of the launch."""
    G = int(q.shape[1]) // max(int(k.shape[1]), 1)
    return G, max(16, _next_pow2(G * min(rows_per_block, block_m))), max(16, _next_pow2(int(q.shape[-1])))


def smem_stages(rg: int, dp: int, block_n: int, itemsize: int, limit: int | None) -> int | None:
    """The software-pipelining depth (``num_stages``) whose shared memory fits ``limit`` bytes, or None.

    The kernel keeps its ``rg x dp`` query tile and ``num_stages - 1`` key tiles of ``block_n x dp`` in shared memory
    (at least one); 3 stages when they fit, else 2. ``limit=None`` (the interpreter) asks for 3. Example: Gemma-3's
    global layers in float32 with 32 rows per block (4 heads x 32 rows x 256 dims, 64-key blocks) need 262 KB with 3
    stages, over an H100's 227 KB, and 197 KB with 2.
    """
    for stages in (3, 2):
        need = (rg * dp + max(1, stages - 1) * block_n * dp) * itemsize + _SMEM_SLACK
        if limit is None or need <= limit:
            return stages
    return None


@functools.lru_cache(maxsize=None)
def _smem_limit(device_index: int) -> int:
    """Shared memory one program may use on this CUDA device, as Triton checks it at launch."""
    from triton.runtime import driver

    return int(driver.active.utils.get_device_properties(device_index)["max_shared_mem"])


def _device_smem_limit(q: torch.Tensor) -> int | None:
    if q.device.type != "cuda":
        return None  # the interpreter has no shared memory
    return _smem_limit(q.device.index if q.device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _kernel() -> Any:
    from sparseattn.ops.triton.sampled_mass import _sampled_mass_kernel

    return _sampled_mass_kernel


@functools.lru_cache(maxsize=None)
def _split_kernels() -> tuple[Any, Any]:
    from sparseattn.ops.triton.sampled_mass import _sampled_lse_split_kernel, _sampled_mass_split_kernel

    return _sampled_lse_split_kernel, _sampled_mass_split_kernel


METHODS = ("split", "walk")
MAX_CHUNKS = 16  # key-block chunks per query block in the split method


def split_chunks(Nb: int, max_chunks: int = MAX_CHUNKS) -> tuple[int, int]:
    """``(chunks, blocks per chunk)`` of the split method: up to ``max_chunks`` chunks of at least 4 key blocks
    (fewer, longer chunks where there are few key blocks), covering all ``Nb``."""
    n = max(1, min(max_chunks, Nb // 4))
    ch = -(-Nb // n)
    return -(-Nb // ch), ch


def sampled_mass_refusal(q: Any, k: Any, *, block_m: int, block_n: int, rows_per_block: int) -> str | None:
    """``None`` if :func:`sampled_block_mass` can run on ``(q, k)``, else the reason it cannot (support only: shapes
    are validated by the caller)."""
    why = qk_tensor_refusal(q, k, "the Triton sampled-mass kernel")
    if why is not None:
        return why
    if block_n < 16 or block_n & (block_n - 1):
        return f"block_n={block_n} is not a power of two >= 16 (the kernel's key tile is one key block)"
    D = int(q.shape[-1])
    if D > MAX_HEAD_DIM:
        return f"head_dim={D} exceeds the kernel's {MAX_HEAD_DIM}"
    G, RG, DP = _tiles(q, k, rows_per_block, block_m)
    rows = min(rows_per_block, block_m)
    if G * rows > MAX_PACKED_ROWS:
        return (f"{G} query heads per KV head x {rows} rows per block = {G * rows} rows exceed the kernel's tile of "
                f"{MAX_PACKED_ROWS}")
    if int(q.shape[0]) * int(k.shape[1]) > _MAX_GRID_YZ:
        return f"batch x kv heads = {int(q.shape[0]) * int(k.shape[1])} exceeds the launch grid limit {_MAX_GRID_YZ}"
    why = _triton_import_error()
    if why is not None:
        return why
    limit = _device_smem_limit(q)
    if smem_stages(RG, DP, block_n, q.element_size(), limit) is None:
        return (f"a {RG}-row x {DP} query tile ({G} heads x {rows} rows, {q.dtype}) and a {block_n}-key tile need "
                f"more shared memory than the device's {limit} bytes (fewer rows_per_block or a 16-bit dtype fit)")
    return None


def _row_table(Nq: int, block_m: int, rows_per_block: int, device: torch.device) -> torch.Tensor:
    """int32 ``[Mb, R]``: the sampled query rows of each query block (``sampled_rows``), -1 where a short last
    block has fewer (shape-only, cached)."""
    R = min(rows_per_block, block_m)

    def build() -> torch.Tensor:
        Mb = cdiv(Nq, block_m)
        rows = sampled_rows(Nq, block_m, rows_per_block, device)
        blk = torch.div(rows, block_m, rounding_mode="floor")
        first = torch.zeros(Mb + 1, dtype=torch.int64, device=device)
        first[1:] = torch.cumsum(torch.zeros(Mb, dtype=torch.int64, device=device).index_add_(
            0, blk, torch.ones_like(blk)), 0)
        slot = torch.arange(rows.numel(), device=device) - first[blk]
        table = torch.full((Mb, R), -1, dtype=torch.int32, device=device)
        table[blk, slot] = rows.to(torch.int32)
        return table

    return cached(("sampled_mass_rows", Nq, block_m, R, str(device)), build)


def sampled_block_mass(q: torch.Tensor, k: torch.Tensor, *, causal: bool, block_m: int, block_n: int,
                       rows_per_block: int, scale: float | None = None, method: str = "split") -> torch.Tensor:
    """:func:`~sparseattn.predictors.oracle.exact_block_mass` with ``rows_per_block`` in one or two Triton launches.

    ``method="split"`` (default) splits each query block's key blocks into up to 16 chunks: a first launch stores
    every chunk's running maximum and sum per sampled row, a second merges them into the row's log-sum-exp and
    writes its chunk's mass (two launches, ``Mb x chunks x B·H_kv`` programs, a scratch of ``2 · B·H_kv · Mb ·
    chunks · rows`` floats): more programs where one KV head gives few. ``method="walk"`` is one launch of ``Mb
    x B·H_kv`` programs, each walking all its key blocks twice. On an H100 at Gemma-3-270M's global-layer shape
    (16K) the split took 1.25-2.57x less time than the walk in every row measured (8/16/32 rows, bf16 and
    float32; BENCHMARKS.md, twenty-second session). Both compute the same values up to the order of float
    additions.

    Args:
        q: ``(B, H, N_q, D)`` fp16/bf16/fp32, CUDA (or CPU under ``TRITON_INTERPRET=1``).
        k: ``(B, H_kv, N_kv, D)``, same dtype, ``H % H_kv == 0``.
        causal: bottom-right aligned causal mask.
        block_m / block_n: block sizes (``block_n`` a power of two ≥ 16).
        rows_per_block: query rows sampled per block (evenly spaced, the last row included).
        scale: softmax scale (default ``D ** -0.5``).
        method: ``"split"`` or ``"walk"`` (above).

    Returns:
        float32 ``[B, H, Mb, Nb]``, each row summing to 1 (0 where the query block sees no key).

    Raises:
        ValueError: malformed q/k (shapes, dtypes, devices, GQA ratio) or block sizes, as the PyTorch function; an
            unknown ``method``.
        NotImplementedError: the kernel cannot run this call (:func:`sampled_mass_refusal`'s reason).
    """
    check_qk("sampled_block_mass", q, k, causal)
    if method not in METHODS:
        raise ValueError(f"sampled_block_mass: method is not known; expected one of {list(METHODS)}, got {method!r}")
    for name, val in (("block_m", block_m), ("block_n", block_n), ("rows_per_block", rows_per_block)):
        check_block("sampled_block_mass", name, val)
    why = sampled_mass_refusal(q, k, block_m=block_m, block_n=block_n, rows_per_block=rows_per_block)
    if why is not None:
        raise NotImplementedError(f"sampled_block_mass: {why}")
    return launch_sampled_mass(q, k, causal=causal, block_m=block_m, block_n=block_n, rows_per_block=rows_per_block,
                               scale=scale, method=method)


def launch_sampled_mass(q: torch.Tensor, k: torch.Tensor, *, causal: bool, block_m: int, block_n: int,
                        rows_per_block: int, scale: float | None = None, method: str = "split") -> torch.Tensor:
    """:func:`sampled_block_mass` without its checks, for a caller that has validated ``q``, ``k``, ``causal`` and
    the block sizes and found :func:`sampled_mass_refusal` ``None`` (``SampledMassPredictor``: once per call, not
    twice)."""
    B, H, Nq, D = (int(x) for x in q.shape)
    Hkv, Nkv = int(k.shape[1]), int(k.shape[2])
    G = H // Hkv
    R = min(rows_per_block, block_m)
    Mb, Nb = cdiv(Nq, block_m), cdiv(Nkv, block_n)
    if scale is None:
        scale = D ** -0.5
    rows = _row_table(Nq, block_m, rows_per_block, q.device)
    mass = torch.zeros((B, H, Mb, Nb), dtype=torch.float32, device=q.device)
    if Mb == 0 or Nb == 0:
        return mass
    widen = q.device.type == "cpu" and q.dtype == torch.bfloat16  # the interpreter's bf16 tl.dot is wrong
    _, RG, DP = _tiles(q, k, rows_per_block, block_m)
    stages = smem_stages(RG, DP, block_n, q.element_size(), _device_smem_limit(q))
    consts = dict(G=G, R=R, RG=RG, D=D, DP=DP, BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=causal,
                  IEEE=widen or q.dtype == torch.float32, WIDEN=widen,
                  num_warps=4 if RG * DP <= 64 * 128 else 8, num_stages=stages)
    scale_log2 = float(scale) * math.log2(math.e)
    if method == "walk":
        _kernel()[(Mb, B * Hkv)](
            q, k, rows, mass, *q.stride(), *k.stride(), *mass.stride(),
            Nq, Nkv, Hkv, Nkv - Nq, scale_log2, GP=max(2, _next_pow2(G)), **consts)
        return mass
    nch, ch = split_chunks(Nb)
    pm = torch.empty((B * Hkv, Mb, nch, RG), dtype=torch.float32, device=q.device)
    pl = torch.empty_like(pm)
    lse_kernel, mass_kernel = _split_kernels()
    grid = (Mb, nch, B * Hkv)
    lse_kernel[grid](q, k, rows, pm, pl, *q.stride(), *k.stride(), Nq, Nkv, Hkv, Nkv - Nq, scale_log2, ch, nch,
                     **consts)
    mass_kernel[grid](q, k, rows, pm, pl, mass, *q.stride(), *k.stride(), *mass.stride(),
                      Nq, Nkv, Hkv, Nkv - Nq, scale_log2, ch, nch,
                      GP=max(2, _next_pow2(G)), NCHP=max(2, _next_pow2(nch)), **consts)
    return mass
