"""Random attention cases and their parity checks, shared by ``tests/ops/test_fuzz_parity.py`` (hypothesis,
CPU, Triton interpreter) and ``benchmarks/gpu_fuzz.py`` (thousands of cases on a GPU).

A :class:`FuzzCase` is a plain, JSON-round-trippable description of one attention call: shapes
(B, H, H_kv GQA, N_q, N_kv, D), dtype, causal, layout blocks, a layout *recipe* (every pattern of
:mod:`sparseattn.layout.patterns`, ``pattern_at_density``, random per-head block masks, optional
carved-out empty query blocks), the memory layout of q/k/v (contiguous, ``(B, N, H, D)`` storage
viewed as ``(B, H, N, D)``, sliced, head-strided, non-unit last stride, stride-0 batch for k/v), the
memory layout of the kernel's ``out`` buffer, the softmax scale, the input magnitude and a seed. The
same case rebuilds the same tensors (seeded ``torch.Generator`` on the case's device).

Cases are drawn through a tiny :class:`Source` interface (``integer`` / ``choice`` / ``uniform`` /
``chance``), so the tests feed hypothesis draws (shrinking works) and the GPU script feeds a
``random.Random`` — one generator of cases, two drivers. Nothing here imports hypothesis or triton.

Checks (:func:`check_kernel`): NaN-poisoned outputs fully written, rows that attend nothing give out
exactly 0 and lse ``-inf`` (computed independently from the block lists), and the project's ratio
rule (:func:`sparseattn.testing.tolerances.check_ratio`) against the reference in high precision,
on every row or on windows of whole query blocks (:func:`query_window` cuts an exact sub-problem:
the window's rows and only the key blocks they can see, with the causal alignment preserved).
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol, Sequence

import torch

from sparseattn.layout.block_layout import BlockLayout, cdiv
from sparseattn.layout.patterns import (
    block_diagonal_layout,
    causal_layout,
    dense_layout,
    pattern_at_density,
    random_layout,
    sink_window_layout,
    sliding_window_layout,
    strided_layout,
)
from sparseattn.ops.reference import reference_attention
from sparseattn.testing.tolerances import ATOL_FLOOR, check_ratio, ratio_bound

__all__ = [
    "DTYPES", "LAYOUT_RECIPES", "QKV_LAYOUTS", "OUT_LAYOUTS", "Source", "RandomSource", "CaseSpace", "FuzzCase",
    "REFERENCE_SPACE", "KERNEL_CPU_SPACE", "GPU_SPACE", "GPU_SMALL_SPACE",
    "draw_case", "build_layout", "make_qkv", "poisoned_outputs", "expected_empty_rows", "Window", "query_window",
    "choose_windows", "aligned_layout", "check_kernel", "ratio_numbers",
]

DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
                                  "float64": torch.float64}
# layout recipes, simplest first (hypothesis shrinks towards the first entry)
LAYOUT_RECIPES = ("none", "dense", "local", "causal", "strided", "random", "block_diagonal", "sink_window",
                  "at_density", "mask")
_AT_DENSITY_NAMES = ("sliding_window", "strided", "block_diagonal", "sink_window", "random", "dense", "causal")
# q / k,v memory layouts (all viewed as (B, H, N, D))
QKV_LAYOUTS = ("contiguous", "bnhd", "sliced", "head_strided", "d_strided", "batch_expanded")
OUT_LAYOUTS = ("contiguous", "bnhd")


class Source(Protocol):
    """Where a case's random choices come from (hypothesis draws or a ``random.Random``)."""

    def integer(self, lo: int, hi: int) -> int: ...  # inclusive bounds
    def choice(self, options: Sequence[Any]) -> Any: ...
    def uniform(self, lo: float, hi: float) -> float: ...
    def chance(self, p: float) -> bool: ...  # True with probability p (shrinks to False)


class RandomSource:
    """:class:`Source` over ``random.Random`` (the GPU script)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def integer(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def choice(self, options: Sequence[Any]) -> Any:
        return options[self.rng.randrange(len(options))]

    def uniform(self, lo: float, hi: float) -> float:
        return self.rng.uniform(lo, hi)

    def chance(self, p: float) -> bool:
        return self.rng.random() < p


@dataclass(frozen=True)
class CaseSpace:
    """The ranges a case is drawn from.

    ``max_work`` caps ``B * H * N_q * N_kv * D`` and ``max_layout_cells`` caps ``B * H * Mb * Nb``
    (the batch, then the group, then the kv heads are reduced until both fit) so that long cases
    stay affordable.
    """

    dtypes: tuple[str, ...]
    head_dims: tuple[int, ...]
    block_sizes: tuple[int, ...]
    max_len: int
    log_lengths: bool = False  # lengths log-uniform in [1, max_len] (else uniform / near block edges / tiny)
    max_batch: int = 2
    kv_heads: tuple[int, ...] = (1, 2, 3, 4)
    groups: tuple[int, ...] = (1, 2, 4)
    recipes: tuple[str, ...] = LAYOUT_RECIPES
    qkv_layouts: tuple[str, ...] = QKV_LAYOUTS
    out_layouts: tuple[str, ...] = OUT_LAYOUTS
    scales: bool = True  # sometimes an explicit softmax scale
    max_work: float = float("inf")
    max_layout_cells: float = float("inf")  # cap on B * H * Mb * Nb (per-head layouts are built on the CPU)


REFERENCE_SPACE = CaseSpace(dtypes=("float64",), head_dims=(16, 32, 64), block_sizes=(16, 32, 48, 64, 128),
                            max_len=200)
# the Triton kernel under the CPU interpreter: head_dim / block sizes the launcher accepts, tiny shapes
KERNEL_CPU_SPACE = CaseSpace(dtypes=("float16", "bfloat16"), head_dims=(64, 128, 256), block_sizes=(64, 128),
                             max_len=200, kv_heads=(1, 2, 4), max_work=2 * 8 * 200 * 200 * 64)
GPU_SPACE = CaseSpace(dtypes=("float16", "bfloat16"), head_dims=(64, 128, 256), block_sizes=(64, 128),
                      max_len=16384, log_lengths=True, max_batch=4, kv_heads=(1, 2, 4, 8), groups=(1, 2, 4, 8),
                      max_work=2.0 ** 37, max_layout_cells=2.0 ** 20)
GPU_SMALL_SPACE = replace(KERNEL_CPU_SPACE, max_len=300, kv_heads=(1, 2), groups=(1, 2, 4), max_work=2 ** 22 * 64)


@dataclass(frozen=True)
class FuzzCase:
    """One attention call, fully described (see the module docstring). ``to_json``/``from_json`` round-trip."""

    seed: int
    B: int
    H: int
    Hkv: int
    Nq: int
    Nkv: int
    D: int
    dtype: str
    causal: bool
    block_m: int
    block_n: int
    recipe: str = "none"
    knobs: dict[str, Any] = field(default_factory=dict)
    layout_causal: bool = False  # the pattern was built for causal attention (else it may hold blocks above the diagonal)
    empty_frac: float = 0.0  # fraction of (batch, head, query block) lists emptied after building
    contiguous_layout: bool = False  # copy the layout's tensors (else stride-0 expanded where the pattern is shared)
    q_layout: str = "contiguous"
    kv_layout: str = "contiguous"
    out_layout: str = "contiguous"
    scale: float | None = None
    spread: float = 1.0
    version: int = 1

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "FuzzCase":
        return cls(**d)

    def short(self) -> str:
        lay = self.recipe + (f"{self.knobs}" if self.knobs else "") + (f" empty={self.empty_frac:g}" if self.empty_frac else "")
        return (f"B{self.B} H{self.H}/{self.Hkv} Nq{self.Nq} Nkv{self.Nkv} D{self.D} {self.dtype} "
                f"{'causal' if self.causal else 'full'} blk{self.block_m}x{self.block_n} {lay} "
                f"q:{self.q_layout} kv:{self.kv_layout} out:{self.out_layout} seed{self.seed}")


# ---------------------------------------------------------------------------------------------- drawing
def _length(src: Source, space: CaseSpace, block: int) -> int:
    hi = space.max_len
    if space.log_lengths:
        mode = src.choice(("log", "edge", "tiny", "log"))
    else:
        mode = src.choice(("uniform", "edge", "tiny"))
    if mode == "tiny":
        return src.integer(1, min(8, hi))
    if mode == "edge":  # a multiple of the block, or one off either way
        top = max(1, hi // block)
        k = int(math.exp(src.uniform(0.0, math.log(top)))) if space.log_lengths and top > 1 else src.integer(1, top)
        return max(1, min(hi, k * block + src.choice((0, -1, 1))))
    if mode == "log":
        return max(1, min(hi, int(math.exp(src.uniform(0.0, math.log(hi))))))
    return src.integer(1, hi)


def draw_case(src: Source, space: CaseSpace, **fixed: Any) -> FuzzCase:
    """Draw a case from ``space``; keyword arguments fix fields (e.g. ``causal=True``, ``recipe="none"``)."""

    def pick(name: str, make: Any) -> Any:
        return fixed[name] if name in fixed else make()

    seed = pick("seed", lambda: src.integer(0, 2**31 - 1))
    dtype = pick("dtype", lambda: src.choice(space.dtypes))
    D = pick("D", lambda: src.choice(space.head_dims))
    causal = pick("causal", lambda: src.chance(0.5))
    bm = pick("block_m", lambda: src.choice(space.block_sizes))
    bn = pick("block_n", lambda: bm if src.chance(0.6) else src.choice(space.block_sizes))
    Nq = pick("Nq", lambda: _length(src, space, bm))
    if "Nkv" in fixed:
        Nkv = fixed["Nkv"]
    else:
        rel = src.choice(("equal", "free", "decode"))
        Nkv = Nq if rel == "equal" else (_length(src, space, bn) if rel == "free" else max(Nq, _length(src, space, bn)))
        if rel == "decode" and "Nq" not in fixed:
            Nq = src.choice((1, min(Nkv, src.integer(1, 16))))
    B = pick("B", lambda: src.integer(1, space.max_batch))
    Hkv = pick("Hkv", lambda: src.choice(space.kv_heads))
    G = pick("G", lambda: src.choice(space.groups))
    cells = cdiv(Nq, bm) * cdiv(Nkv, bn)
    while ((B * Hkv * G * Nq * Nkv * D > space.max_work or B * Hkv * G * cells > space.max_layout_cells)
           and (B > 1 or G > 1 or Hkv > 1)):
        if B > 1:
            B = max(1, B // 2)
        elif G > 1:
            G = max(1, G // 2)
        else:
            Hkv = max(1, Hkv // 2)
    recipe = pick("recipe", lambda: src.choice(space.recipes))
    knobs: dict[str, Any] = {}
    nb = cdiv(Nkv, bn)
    if recipe == "local":
        knobs["window_blocks"] = src.integer(1, max(1, min(nb, 6)))
    elif recipe == "strided":
        knobs["stride"] = src.integer(1, max(1, min(nb, 6)))
        knobs["local_blocks"] = src.integer(0, 2)
    elif recipe == "random":
        knobs["density"] = round(src.uniform(0.0, 1.0), 3)
        knobs["keep_diagonal"] = not src.chance(0.3)
    elif recipe == "block_diagonal":
        knobs["group_blocks"] = src.integer(1, max(1, min(nb, 4)))
    elif recipe == "sink_window":
        knobs["sink_blocks"] = src.integer(0, 2)
        knobs["window_blocks"] = src.integer(1, max(1, min(nb, 4)))
    elif recipe == "at_density":
        knobs["name"] = src.choice(_AT_DENSITY_NAMES)
        knobs["density"] = round(src.uniform(0.0, 1.0), 3)
    elif recipe == "mask":
        knobs["density"] = round(src.uniform(0.0, 1.0), 3)
    layout_causal = pick("layout_causal", lambda: causal and not src.chance(0.25))
    empty_frac = pick("empty_frac", lambda: round(src.uniform(0.05, 0.6), 3) if recipe != "none" and src.chance(0.25) else 0.0)
    contiguous_layout = pick("contiguous_layout", lambda: recipe != "none" and src.chance(0.2))
    q_layout = pick("q_layout", lambda: space.qkv_layouts[0] if src.chance(0.5) else src.choice(space.qkv_layouts))
    kv_layout = pick("kv_layout", lambda: space.qkv_layouts[0] if src.chance(0.5) else src.choice(space.qkv_layouts))
    out_layout = pick("out_layout", lambda: space.out_layouts[0] if src.chance(0.6) else src.choice(space.out_layouts))
    scale = pick("scale", lambda: round(src.uniform(0.02, 0.5), 4) if space.scales and src.chance(0.2) else None)
    spread = pick("spread", lambda: src.choice((1.0, 0.25, 2.0, 4.0)) if src.chance(0.3) else 1.0)
    if recipe == "none":
        empty_frac, contiguous_layout = 0.0, False
    return FuzzCase(seed=seed, B=B, H=Hkv * G, Hkv=Hkv, Nq=Nq, Nkv=Nkv, D=D, dtype=dtype, causal=causal, block_m=bm,
                    block_n=bn, recipe=recipe, knobs=knobs, layout_causal=bool(layout_causal), empty_frac=empty_frac,
                    contiguous_layout=bool(contiguous_layout), q_layout=q_layout, kv_layout=kv_layout,
                    out_layout=out_layout, scale=scale, spread=spread)


# ---------------------------------------------------------------------------------------------- building
def build_layout(case: FuzzCase, device: torch.device | str = "cpu") -> BlockLayout | None:
    """The case's layout (``None`` for the ``"none"`` recipe: dense attention without a layout)."""
    r = case.recipe
    if r == "none":
        return None
    Nq, Nkv = case.Nq, case.Nkv
    kw: dict[str, Any] = dict(block_m=case.block_m, block_n=case.block_n, batch=case.B, heads=case.H)
    lc, kn = case.layout_causal, case.knobs
    if r == "dense":
        lay = dense_layout(Nq, Nkv, causal=lc, **kw)
    elif r == "causal":
        lay = causal_layout(Nq, Nkv, **kw)
    elif r == "local":
        lay = sliding_window_layout(Nq, Nkv, window_blocks=kn["window_blocks"], causal=lc, **kw)
    elif r == "strided":
        lay = strided_layout(Nq, Nkv, stride=kn["stride"], local_blocks=kn["local_blocks"], causal=lc, **kw)
    elif r == "random":
        lay = random_layout(Nq, Nkv, density=kn["density"], seed=case.seed % 100003, keep_diagonal=kn["keep_diagonal"],
                            causal=lc, **kw)
    elif r == "block_diagonal":
        lay = block_diagonal_layout(Nq, Nkv, group_blocks=kn["group_blocks"], causal=lc, **kw)
    elif r == "sink_window":
        lay = sink_window_layout(Nq, Nkv, sink_blocks=kn["sink_blocks"], window_blocks=kn["window_blocks"], causal=lc, **kw)
    elif r == "at_density":
        extra = {"seed": case.seed % 100003} if kn["name"] == "random" else {}
        lay = pattern_at_density(kn["name"], Nq, Nkv, density=kn["density"], causal=lc, **kw, **extra)
    elif r == "mask":
        gen = torch.Generator().manual_seed(case.seed + 1)
        mask = torch.rand(case.B, case.H, cdiv(Nq, case.block_m), cdiv(Nkv, case.block_n), generator=gen) < kn["density"]
        lay = BlockLayout.from_dense_mask(mask, block_m=case.block_m, block_n=case.block_n, seqlen_q=Nq, seqlen_kv=Nkv)
    else:
        raise ValueError(f"build_layout: recipe {r!r} is unknown; expected one of {LAYOUT_RECIPES}")
    if case.empty_frac > 0:
        gen = torch.Generator().manual_seed(case.seed + 2)
        mask = lay.to_dense_mask().cpu().clone()
        drop = torch.rand(mask.shape[:3], generator=gen) < case.empty_frac
        mask[drop] = False
        lay = BlockLayout.from_dense_mask(mask, block_m=case.block_m, block_n=case.block_n, seqlen_q=Nq, seqlen_kv=Nkv)
    if case.contiguous_layout:
        lay = lay.contiguous()
    lay = lay.to(device)
    # padding entries are arbitrary by contract: overwrite them, so a kernel that reads past the count fails
    num, idx = lay.kv_num_blocks, lay.kv_indices
    if idx.stride(0) != 0 and idx.stride(1) != 0 and idx.shape[-1] > 1:
        pos = torch.arange(idx.shape[-1], device=idx.device)
        junk = (pos * 7 + 3) % idx.shape[-1]  # in range, but not the selected blocks
        idx = torch.where(pos < num.unsqueeze(-1), idx, junk.to(idx.dtype))
        lay = BlockLayout(num, idx, lay.block_m, lay.block_n, Nq, Nkv, validate=False)
    return lay


def aligned_layout(layout: BlockLayout | None) -> BlockLayout | None:
    """Same layout, its tensors stored with row strides padded to multiples of 16 (stride-0 dims kept).

    Triton specializes kernels on integer arguments divisible by 16 (and equal to 1); padded strides
    keep the number of compiled variants independent of the lengths (the GPU script compiles each
    variant once). The values (padding entries included) are unchanged.
    """
    if layout is None:
        return None
    num, idx = layout.kv_num_blocks, layout.kv_indices
    B, H, Mb, Nb = idx.shape
    shared = idx.stride(0) == 0 and idx.stride(1) == 0 and num.stride(0) == 0 and num.stride(1) == 0
    b0, h0 = (1, 1) if shared else (B, H)
    pad16 = lambda n: -(-n // 16) * 16  # noqa: E731
    ibuf = torch.zeros(b0, h0, pad16(Mb), pad16(Nb), dtype=torch.int32, device=idx.device)
    ibuf[:, :, :Mb, :Nb] = idx[:b0, :h0]
    nbuf = torch.zeros(b0, h0, pad16(Mb), dtype=torch.int32, device=num.device)
    nbuf[:, :, :Mb] = num[:b0, :h0]
    return BlockLayout(nbuf[:, :, :Mb].expand(B, H, Mb), ibuf[:, :, :Mb, :Nb].expand(B, H, Mb, Nb), layout.block_m,
                       layout.block_n, layout.seqlen_q, layout.seqlen_kv, validate=False)


def _tensor(mode: str, B: int, H: int, N: int, D: int, dtype: torch.dtype, spread: float, gen: torch.Generator,
            device: torch.device | str) -> torch.Tensor:
    gdt = torch.float64 if dtype == torch.float64 else torch.float32

    def rnd(*shape: int) -> torch.Tensor:
        t = torch.randn(*shape, generator=gen, device=device, dtype=gdt)
        return (t * spread).to(dtype) if spread != 1.0 else t.to(dtype)

    if mode == "contiguous":
        return rnd(B, H, N, D)
    if mode == "bnhd":  # (B, N, H, D) storage, as projections produce it
        return rnd(B, N, H, D).transpose(1, 2)
    if mode == "sliced":  # a window of a longer buffer: non-zero storage offset
        return rnd(B, H, N + 5, D)[:, :, 3:3 + N]
    if mode == "head_strided":  # every other head of a buffer with 2H heads
        return rnd(B, 2 * H, N, D)[:, ::2]
    if mode == "d_strided":  # non-unit last stride (the launcher copies it)
        return rnd(B, H, N, 2 * D)[..., ::2]
    if mode == "batch_expanded":  # one batch entry broadcast with stride 0
        return rnd(1, H, N, D).expand(B, H, N, D)
    raise ValueError(f"_tensor: mode {mode!r} is unknown; expected one of {QKV_LAYOUTS}")


def make_qkv(case: FuzzCase, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded q, k, v in the case's dtype (or ``dtype``) and memory layouts, on ``device``."""
    dt = case.torch_dtype if dtype is None else dtype
    gen = torch.Generator(device=device).manual_seed(case.seed)
    q = _tensor(case.q_layout, case.B, case.H, case.Nq, case.D, dt, case.spread, gen, device)
    k = _tensor(case.kv_layout, case.B, case.Hkv, case.Nkv, case.D, dt, case.spread, gen, device)
    v = _tensor(case.kv_layout, case.B, case.Hkv, case.Nkv, case.D, dt, 1.0, gen, device)
    return q, k, v


def poisoned_outputs(case: FuzzCase, device: torch.device | str = "cpu", *, pad_lse: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """NaN-filled ``out`` (in the case's out memory layout) and float32 ``lse`` buffers for the kernel.

    ``pad_lse`` stores lse with its row stride padded to a multiple of 16 (see :func:`aligned_layout`).
    """
    B, H, Nq, D = case.B, case.H, case.Nq, case.D
    nan = float("nan")
    if case.out_layout == "bnhd":
        out = torch.full((B, Nq, H, D), nan, dtype=case.torch_dtype, device=device).transpose(1, 2)
    else:
        out = torch.full((B, H, Nq, D), nan, dtype=case.torch_dtype, device=device)
    if pad_lse:
        lse = torch.full((B, H, -(-Nq // 16) * 16), nan, dtype=torch.float32, device=device)[:, :, :Nq]
    else:
        lse = torch.full((B, H, Nq), nan, dtype=torch.float32, device=device)
    return out, lse


# ---------------------------------------------------------------------------------------------- checking
def expected_empty_rows(layout: BlockLayout | None, B: int, H: int, Nq: int, Nkv: int, causal: bool,
                        device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool ``[B, H, Nq]``: True for rows that attend no key, from the block lists alone (no element mask).

    A row attends something iff its query block selects a block and, under bottom-right causal
    alignment, the first selected block starts at or before the row's last visible key.
    """
    rows = torch.arange(Nq, device=device)
    off = Nkv - Nq
    if layout is None:
        has = torch.ones(B, H, Nq, dtype=torch.bool, device=device)
        if causal:
            has = has & (rows + off >= 0)
        return ~has
    num = layout.kv_num_blocks.to(device).long()
    first = layout.kv_indices[..., 0].to(device).long()
    rb = rows // layout.block_m
    has = (num > 0)[..., rb]
    if causal:
        has = has & (first[..., rb] * layout.block_n <= rows + off)
    return ~has


@dataclass
class Window:
    """An exact sub-problem: rows ``[r0, r1)`` of q, keys ``[c0, c0 + k.shape[2])``, and its layout."""

    r0: int
    r1: int
    c0: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    layout: BlockLayout | None


def query_window(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout | None, causal: bool,
                 i0: int, i1: int, *, block_m: int = 128) -> Window | None:
    """Rows of query blocks ``[i0, i1)`` as a stand-alone attention problem, or ``None`` if they see no key.

    Keeps only the key blocks the window's rows may attend (from the first selected block to the
    last visible one), and sets the sub-problem's lengths so that bottom-right causal alignment
    gives every (row, key) pair the same visibility as in the full problem. ``block_m`` is the row
    block for ``layout=None``.
    """
    Nq, Nkv = q.shape[2], k.shape[2]
    bm = layout.block_m if layout is not None else block_m
    r0, r1 = i0 * bm, min(i1 * bm, Nq)
    off = Nkv - Nq
    kv_end = Nkv
    if causal:
        kv_end = min(Nkv, r1 - 1 + off + 1)
        if kv_end <= 0:
            return None
    if layout is None:
        return Window(r0, r1, 0, q[:, :, r0:r1], k[:, :, :kv_end], v[:, :, :kv_end], None)
    bn = layout.block_n
    sub = BlockLayout(layout.kv_num_blocks[:, :, i0:i1], layout.kv_indices[:, :, i0:i1], bm, bn, r1 - r0, Nkv,
                      validate=False)
    mask = sub.to_dense_mask()[..., : cdiv(kv_end, bn)]
    cols = mask.flatten(0, 2).any(0)
    sel = cols.nonzero()
    if sel.numel() == 0:
        return None
    j0 = int(sel[0])
    if not causal:
        kv_end = min(Nkv, (int(sel[-1]) + 1) * bn)
    c0 = j0 * bn
    sub_mask = mask[..., j0:cdiv(kv_end, bn)].contiguous()
    lay = BlockLayout.from_dense_mask(sub_mask, block_m=bm, block_n=bn, seqlen_q=r1 - r0, seqlen_kv=kv_end - c0)
    return Window(r0, r1, c0, q[:, :, r0:r1], k[:, :, c0:kv_end], v[:, :, c0:kv_end], lay)


def choose_windows(Nq: int, block_m: int, rng: random.Random, max_rows: int | None, *, both: bool = True
                   ) -> list[tuple[int, int]]:
    """Query-block windows to check: everything when ``max_rows`` allows, else windows of ``max_rows`` rows.

    The windows are the tail (the partial last block; under causal, the rows that see the most keys)
    and a random one; with ``both=False`` only one of the two, chosen at random.
    """
    Mb = cdiv(Nq, block_m)
    w = max(1, (max_rows or 0) // block_m)
    if max_rows is None or Mb <= w:
        return [(0, Mb)]
    i0 = rng.randrange(0, Mb - w)
    tail, inner = (Mb - w, Mb), (i0, i0 + w)
    if both:
        return [tail, inner]
    return [tail if rng.random() < 0.5 else inner]


def ratio_numbers(kernel: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor) -> tuple[float, float, float]:
    """``(kernel max error, same-dtype reference max error, bound)`` over the reference's finite elements."""
    k_err = _max_err(kernel, hi)
    r_err = _max_err(lo, hi)
    return k_err, r_err, ratio_bound(r_err, kernel.dtype if kernel.dtype in ATOL_FLOOR else torch.float32)


def _max_err(x: torch.Tensor, hi: torch.Tensor) -> float:
    """Max ``|x - hi|`` over ``hi``'s finite elements (0 if none), in float64, one batch row at a time
    (a whole-tensor float64 difference of a large case needs several GiB: it ran a GPU worker out of memory)."""
    best = 0.0
    for i in range(hi.shape[0]):
        h = hi[i].to(torch.float64)
        d = (x[i].to(torch.float64) - h).abs()
        d = torch.where(torch.isfinite(h), d, torch.zeros((), dtype=d.dtype, device=d.device))
        best = max(best, float(d.max()))
    return best


def check_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout | None, causal: bool,
                 out: torch.Tensor, lse: torch.Tensor, *, scale: float | None = None,
                 windows: Sequence[tuple[int, int]] | None = None, hi_dtype: torch.dtype | None = None,
                 pv_threshold: float | None = None, stats: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check a kernel's ``(out, lse)`` for these inputs; returns a report with ``ok`` and ``failures``.

    1. nothing left unwritten: no NaN in ``out`` / ``lse`` (pass NaN-poisoned buffers);
    2. rows that attend no key (:func:`expected_empty_rows`): out exactly 0, lse ``-inf``; other rows finite;
    3. the ratio rule (:func:`~sparseattn.testing.tolerances.check_ratio`) for out and lse against the
       reference in ``hi_dtype`` (float64 on CPU, float32 on GPU by default), with the same-dtype
       reference (``upcast=False``) as the yardstick, on ``windows`` of query blocks (all rows if None);
    4. with ``pv_threshold`` and ``stats``, when the windows cover every row: the kernel's
       visited / skipped tile counts equal the high-precision reference's.
    """
    B, H, Nq, D = q.shape
    Nkv = k.shape[2]
    dev = q.device
    if hi_dtype is None:
        hi_dtype = torch.float32 if dev.type == "cuda" else torch.float64
    rep: dict[str, Any] = {"ok": True, "failures": [], "rows_checked": 0, "out_err": 0.0, "out_bound": 0.0,
                           "out_ref_err": 0.0, "lse_err": 0.0, "lse_bound": 0.0, "lse_ref_err": 0.0, "worst": 0.0}

    def bad(msg: str) -> None:
        rep["ok"] = False
        rep["failures"].append(msg)

    n_nan_o, n_nan_l = int(torch.isnan(out).sum()), int(torch.isnan(lse).sum())
    if n_nan_o or n_nan_l:
        bad(f"NaN (unwritten or invalid) elements: out {n_nan_o}, lse {n_nan_l}")
    empty = expected_empty_rows(layout, B, H, Nq, Nkv, causal, dev)
    rep["empty_rows"] = int(empty.sum())
    if bool(empty.any()):
        if not bool((out[empty] == 0).all()):
            bad(f"rows that attend nothing have non-zero out ({int((out[empty] != 0).any(-1).sum())} rows)")
        if not bool(torch.isneginf(lse[empty]).all()):
            bad(f"rows that attend nothing have lse != -inf ({int((~torch.isneginf(lse[empty])).sum())} rows)")
    if not bool(torch.isfinite(lse[~empty]).all()):
        bad(f"rows that attend keys have a non-finite lse ({int((~torch.isfinite(lse[~empty])).sum())} rows)")
    if not bool(torch.isfinite(out[~empty]).all()):
        bad("rows that attend keys have non-finite out")
    bm = layout.block_m if layout is not None else 128
    if windows is None:
        windows = [(0, cdiv(Nq, bm))]
    full = len(windows) == 1 and tuple(windows[0]) == (0, cdiv(Nq, bm))
    hi_stats: dict[str, Any] = {"visited_tiles": 0, "pv_skipped_tiles": 0}
    for i0, i1 in windows:
        w = query_window(q, k, v, layout, causal, i0, i1, block_m=bm)
        if w is None:  # every row of the window is empty: checked above
            continue
        part: dict[str, Any] = {}
        hi = reference_attention(w.q.to(hi_dtype), w.k.to(hi_dtype), w.v.to(hi_dtype), causal=causal, layout=w.layout,
                                 scale=scale, pv_threshold=pv_threshold, stats=part)
        lo = reference_attention(w.q, w.k, w.v, causal=causal, layout=w.layout, scale=scale, upcast=False,
                                 pv_threshold=pv_threshold)
        for key in hi_stats:
            hi_stats[key] += part.get(key, 0)
        rep["rows_checked"] += w.r1 - w.r0
        for what, got, h, lw in (("out", out[:, :, w.r0:w.r1], hi.out, lo.out),
                                 ("lse", lse[:, :, w.r0:w.r1], hi.lse, lo.lse)):
            k_err, r_err, bound = ratio_numbers(got, h, lw)
            if k_err > rep[f"{what}_err"]:
                rep[f"{what}_err"], rep[f"{what}_ref_err"], rep[f"{what}_bound"] = k_err, r_err, bound
            rep["worst"] = max(rep["worst"], k_err / bound if bound > 0 else 0.0)
            try:
                check_ratio(got, h, lw, f"{what} rows [{w.r0}, {w.r1})")
            except AssertionError as exc:
                bad(str(exc))
    if pv_threshold is not None and stats is not None and full:
        rep["stats_kernel"], rep["stats_reference"] = dict(stats), hi_stats
        if dict(stats) != hi_stats:
            bad(f"pv_threshold tile counts differ: kernel {dict(stats)}, reference {hi_stats}")
    return rep

