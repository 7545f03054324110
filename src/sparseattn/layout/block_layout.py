"""BlockLayout: which key blocks each query block attends.

The one layout type of sparseattn. Everything that produces sparsity (patterns, predictors, the
tuner) returns a ``BlockLayout``; everything that consumes it (reference attention, the Triton
kernel, FlexAttention export) reads the same two tensors.

Storage (the FlexAttention / FlashInfer "BSR" convention):

* ``kv_num_blocks[b, h, i]`` — how many key blocks query block ``i`` attends (int32).
* ``kv_indices[b, h, i, :kv_num_blocks[b, h, i]]`` — those key-block indices, strictly ascending
  (int32). Entries past ``kv_num_blocks`` are padding; their values mean nothing (builders in this
  package write the unselected indices there, so the row is a permutation of ``range(Nb)``).

Causal masking is *not* encoded in the layout: a layout says which blocks may be visited, and
``causal=True`` in the attention call applies the exact element-level triangle (bottom-right
aligned when ``seqlen_q != seqlen_kv``) on top. Blocks entirely above the diagonal contribute
nothing under causal attention and are not counted by ``density(causal=True)``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch

from sparseattn._cache import BoundedCache
from sparseattn._validation import check_nonneg_int, check_positive_int, check_tensor, fail
from sparseattn.layout.masks import token_causal_mask

__all__ = ["BlockLayout", "causal_block_region", "cdiv", "region_row_limits"]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def compact_mask(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool block mask ``[B, H, Mb, Nb]`` → ``(kv_num_blocks [B, H, Mb], kv_indices [B, H, Mb, Nb])`` int32.

    Each row lists its selected blocks first in ascending order, then the unselected ones (ascending);
    linear time (cumsum + scatter, no sort). The one mask → layout compaction
    (:meth:`BlockLayout.from_dense_mask` checks its input first, the predictors' ``mask_to_layout`` does not).
    """
    B, H, Mb, Nb = mask.shape
    m = mask.to(torch.int32)
    num = m.sum(-1, dtype=torch.int32)
    pos_sel = torch.cumsum(m, -1, dtype=torch.int32) - 1
    pos_uns = num.unsqueeze(-1) + torch.cumsum(1 - m, -1, dtype=torch.int32) - 1
    pos = torch.where(mask, pos_sel, pos_uns).long()
    src = torch.arange(Nb, device=mask.device, dtype=torch.int32).expand(B, H, Mb, Nb)
    idx = torch.empty((B, H, Mb, Nb), dtype=torch.int32, device=mask.device)
    idx.scatter_(-1, pos, src)
    return num, idx


@functools.lru_cache(maxsize=256)  # pure function of ints, called per layer per forward: a Python loop over Mb
def region_row_limits(seqlen_q: int, seqlen_kv: int, block_m: int, block_n: int, causal: bool) -> tuple[int, ...]:
    """Per query block, the number of key blocks in its region (a prefix ``[0, lim)`` of the key blocks).

    Pure Python from the shapes (no tensors, no device work): ``lim_i = clamp(floor((r_last_i + off) /
    block_n) + 1, 0, Nb)`` under bottom-right causal alignment (the row of ``any_allowed`` of
    :func:`causal_block_region`), ``Nb`` for every block when not causal.
    """
    Mb, Nb = cdiv(seqlen_q, block_m), cdiv(seqlen_kv, block_n)
    if not causal:
        return (Nb,) * Mb
    off = seqlen_kv - seqlen_q
    lims = []
    for i in range(Mb):
        last_key = min((i + 1) * block_m, seqlen_q) - 1 + off
        lims.append(0 if last_key < 0 else min(last_key // block_n + 1, Nb))
    return tuple(lims)


# per (geometry, causal, device): the region limits as an int32 device tensor [Mb, 1] and the list positions
# [Nb] (shape-only data, built once)
_LIMITS: BoundedCache[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = BoundedCache(256, name="block_layout._LIMITS")
# per (query blocks, first dense-tail block, device): the rows ``with_dense_tail`` replaces, bool [Mb]
_TAIL_ROWS: BoundedCache[tuple[Any, ...], torch.Tensor] = BoundedCache(256, name="block_layout._TAIL_ROWS")


def causal_block_region(
    seqlen_q: int, seqlen_kv: int, block_m: int, block_n: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-level view of bottom-right-aligned causal attention.

    Query row ``r`` may see key ``c`` iff ``c <= r + (seqlen_kv - seqlen_q)``.

    Returns:
        ``(any_allowed, all_allowed)``: bool tensors ``[Mb, Nb]``. ``any_allowed[i, j]`` is True if at
        least one (row, key) pair of block ``(i, j)`` is allowed (the causal region);
        ``all_allowed[i, j]`` if every real pair in it is (no element mask needed).
    """
    Mb, Nb = cdiv(seqlen_q, block_m), cdiv(seqlen_kv, block_n)
    off = seqlen_kv - seqlen_q
    i = torch.arange(Mb, device=device)
    j = torch.arange(Nb, device=device)
    row_first = i * block_m
    row_last = torch.clamp((i + 1) * block_m, max=seqlen_q) - 1
    col_first = j * block_n
    col_last = torch.clamp((j + 1) * block_n, max=seqlen_kv) - 1
    any_allowed = col_first[None, :] <= (row_last[:, None] + off)
    all_allowed = col_last[None, :] <= (row_first[:, None] + off)
    return any_allowed, all_allowed


@dataclass(frozen=True, eq=False)
class BlockLayout:
    """Per (batch, head, query block) lists of key blocks to attend.

    Args:
        kv_num_blocks: int32 ``[B, H, Mb]``.
        kv_indices: int32 ``[B, H, Mb, Nb]``; the first ``kv_num_blocks`` entries of each row are
            strictly ascending key-block indices in ``[0, Nb)``.
        block_m: query rows per block (> 0).
        block_n: key columns per block (> 0).
        seqlen_q: number of query tokens the layout was built for.
        seqlen_kv: number of key tokens the layout was built for.
        validate: check ranges and ordering (one pass over the indices). Builders inside the
            package that construct valid layouts by design pass ``False`` on hot paths.

    Shapes:
        ``Mb = ceil(seqlen_q / block_m)``, ``Nb = ceil(seqlen_kv / block_n)``. The tensors may be
        expanded (stride-0) views, e.g. one pattern shared by every head.
    """

    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    block_m: int
    block_n: int
    seqlen_q: int
    seqlen_kv: int
    validate: bool = field(default=True, repr=False, compare=False)
    #: the producer guarantees every listed (selected) block lies inside the causal region (hence also
    #: the full one), so the selected-in-region count is just ``kv_num_blocks`` (one reduction instead
    #: of four element ops); set by predictors that clip to it by construction (fused mean_sim, causal)
    in_region: bool = field(default=False, repr=False, compare=False)
    # the class marker _validation.check_layout_for recognises (so _validation, the bottom layer, does not
    # import this module); not a dataclass field
    _IS_BLOCK_LAYOUT = True

    def __post_init__(self) -> None:
        fn = "BlockLayout"
        check_positive_int(fn, "block_m", self.block_m)
        check_positive_int(fn, "block_n", self.block_n)
        check_positive_int(fn, "seqlen_q", self.seqlen_q)
        check_positive_int(fn, "seqlen_kv", self.seqlen_kv)
        num = check_tensor(fn, "kv_num_blocks", self.kv_num_blocks, ndim=3, shape_desc="[B, H, Mb]")
        idx = check_tensor(fn, "kv_indices", self.kv_indices, ndim=4, shape_desc="[B, H, Mb, Nb]")
        for name, t in (("kv_num_blocks", num), ("kv_indices", idx)):
            if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
                raise fail(fn, f"{name}.dtype", "must be an integer type", "int32", str(t.dtype))
        if num.dtype != torch.int32:
            object.__setattr__(self, "kv_num_blocks", num.to(torch.int32))
        if idx.dtype != torch.int32:
            object.__setattr__(self, "kv_indices", idx.to(torch.int32))
        num, idx = self.kv_num_blocks, self.kv_indices
        if num.device != idx.device:
            raise fail(fn, "kv_num_blocks/kv_indices", "are on different devices", "one device", f"{num.device} and {idx.device}")
        Mb, Nb = self.num_q_blocks, self.num_kv_blocks
        if tuple(num.shape[2:]) != (Mb,):
            raise fail(fn, "kv_num_blocks", f"does not match seqlen_q={self.seqlen_q} and block_m={self.block_m}",
                       f"shape [B, H, {Mb}]", f"shape {list(num.shape)}")
        if tuple(idx.shape[:3]) != tuple(num.shape) or idx.shape[3] != Nb:
            raise fail(fn, "kv_indices", f"does not match kv_num_blocks and seqlen_kv={self.seqlen_kv}, block_n={self.block_n}",
                       f"shape {list(num.shape) + [Nb]}", f"shape {list(idx.shape)}")
        if self.validate:
            self._check_values()

    def _check_values(self) -> None:
        fn = "BlockLayout"
        num, idx = self.kv_num_blocks, self.kv_indices
        Nb = self.num_kv_blocks
        if num.numel() == 0:
            return
        nmin, nmax = int(num.min()), int(num.max())
        if nmin < 0 or nmax > Nb:
            raise fail(fn, "kv_num_blocks", "is out of range", f"values in [0, {Nb}]", f"min={nmin}, max={nmax}")
        pos = torch.arange(Nb, device=idx.device)
        valid = pos < num.unsqueeze(-1).long()
        vals = idx.long()
        bad = valid & ((vals < 0) | (vals >= Nb))
        if bool(bad.any()):
            where = tuple(int(x) for x in bad.nonzero()[0].tolist())
            raise fail(fn, "kv_indices", "has a block index out of range", f"indices in [0, {Nb})",
                       f"kv_indices{list(where)}={int(vals[where])}")
        if Nb > 1:
            step_valid = valid[..., 1:]
            not_ascending = step_valid & (vals[..., 1:] <= vals[..., :-1])
            if bool(not_ascending.any()):
                where = tuple(int(x) for x in not_ascending.nonzero()[0].tolist())
                raise fail(fn, "kv_indices", "must be strictly ascending within each row (sorted, no duplicates)",
                           "strictly ascending indices", f"row {list(where[:3])} = {vals[where[:3]][: int(num[where[:3]])].tolist()}")

    # ------------------------------------------------------------------ shape properties
    @property
    def batch(self) -> int:
        return int(self.kv_num_blocks.shape[0])

    @property
    def heads(self) -> int:
        return int(self.kv_num_blocks.shape[1])

    @property
    def num_q_blocks(self) -> int:
        return cdiv(self.seqlen_q, self.block_m)

    @property
    def num_kv_blocks(self) -> int:
        return cdiv(self.seqlen_kv, self.block_n)

    @property
    def device(self) -> torch.device:
        return self.kv_indices.device

    @property
    def nbytes(self) -> int:
        """Bytes of the layout's own storage (expanded views count once)."""
        total = 0
        for t in (self.kv_num_blocks, self.kv_indices):
            total += t.untyped_storage().nbytes()
        return total

    # ------------------------------------------------------------------ conversions
    def to(self, device: torch.device | str) -> "BlockLayout":
        return BlockLayout(self.kv_num_blocks.to(device), self.kv_indices.to(device), self.block_m, self.block_n,
                           self.seqlen_q, self.seqlen_kv, validate=False)

    def contiguous(self) -> "BlockLayout":
        return BlockLayout(self.kv_num_blocks.contiguous(), self.kv_indices.contiguous(), self.block_m, self.block_n,
                           self.seqlen_q, self.seqlen_kv, validate=False)

    def to_dense_mask(self) -> torch.Tensor:
        """Bool block mask ``[B, H, Mb, Nb]``: True where the block is selected."""
        B, H, Mb, Nb = self.kv_indices.shape
        pos = torch.arange(Nb, device=self.device)
        valid = pos < self.kv_num_blocks.unsqueeze(-1).long()
        # padding slots write into an extra column that is dropped; uint8 because CUDA has no bool
        # scatter_reduce (torch 2.11: "cuda_scatter_gather_base_kernel_func not implemented for 'Bool'")
        idx = torch.where(valid, self.kv_indices.long(), torch.full((), Nb, dtype=torch.long, device=self.device))
        mask = torch.zeros(B, H, Mb, Nb + 1, dtype=torch.uint8, device=self.device)
        mask.scatter_(-1, idx, 1)
        return mask[..., :Nb].bool()

    @classmethod
    def from_dense_mask(
        cls, mask: torch.Tensor, *, block_m: int, block_n: int, seqlen_q: int, seqlen_kv: int
    ) -> "BlockLayout":
        """Build a layout from a bool block mask ``[B, H, Mb, Nb]`` (no broadcasting)."""
        fn = "BlockLayout.from_dense_mask"
        check_tensor(fn, "mask", mask, ndim=4, shape_desc="[B, H, Mb, Nb]")
        if mask.dtype != torch.bool:
            raise fail(fn, "mask.dtype", "must be bool", "torch.bool", str(mask.dtype))
        check_positive_int(fn, "block_m", block_m)
        check_positive_int(fn, "block_n", block_n)
        check_positive_int(fn, "seqlen_q", seqlen_q)
        check_positive_int(fn, "seqlen_kv", seqlen_kv)
        Mb, Nb = cdiv(seqlen_q, block_m), cdiv(seqlen_kv, block_n)
        if tuple(mask.shape[2:]) != (Mb, Nb):
            raise fail(fn, "mask", "does not match the lengths and block sizes", f"shape [B, H, {Mb}, {Nb}]",
                       f"shape {list(mask.shape)}")
        num, order = compact_mask(mask)
        return cls(num, order, block_m, block_n, seqlen_q, seqlen_kv, validate=False)

    def element_mask(self, causal: bool = False) -> torch.Tensor:
        """Token-level bool mask ``[B, H, seqlen_q, seqlen_kv]`` (True = attend). For tests and plots only."""
        m = self.to_dense_mask()
        m = m.repeat_interleave(self.block_m, dim=2)[:, :, : self.seqlen_q]
        m = m.repeat_interleave(self.block_n, dim=3)[:, :, :, : self.seqlen_kv]
        if causal:
            m = m & token_causal_mask(self.seqlen_q, self.seqlen_kv, device=self.device)
        return m

    # ------------------------------------------------------------------ statistics
    def _region(self, causal: bool) -> torch.Tensor:
        any_allowed, _ = causal_block_region(self.seqlen_q, self.seqlen_kv, self.block_m, self.block_n, self.device)
        if not causal:
            any_allowed = torch.ones_like(any_allowed)
        return any_allowed

    def density_per_head(self, causal: bool = False) -> torch.Tensor:
        """Selected / available blocks per (batch, head), float64 ``[B, H]``.

        With ``causal=True`` only blocks in the causal region are counted, on both sides of the
        ratio, so a full causal layout has density 1.0.
        """
        region = self._region(causal)
        mask = self.to_dense_mask() & region
        avail = int(region.sum())
        if avail == 0:
            return torch.zeros(self.batch, self.heads, dtype=torch.float64)
        return (mask.sum(dim=(-1, -2)).to(torch.float64) / avail).cpu()

    def _limits(self, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached shape-only device data: the region limit of each query block, int32 ``[Mb, 1]``, and the
        list positions ``0 .. Nb-1``, int32 ``[Nb]`` (built once per geometry and device)."""
        Nb = self.kv_indices.shape[-1]
        key = (self.seqlen_q, self.seqlen_kv, self.block_m, self.block_n, Nb, bool(causal), str(self.device))

        def build() -> tuple[torch.Tensor, torch.Tensor]:
            lims = region_row_limits(self.seqlen_q, self.seqlen_kv, self.block_m, self.block_n, bool(causal))
            return (torch.tensor(lims, dtype=torch.int32, device=self.device)[:, None],
                    torch.arange(Nb, device=self.device, dtype=torch.int32))

        return _LIMITS.get_or_build(key, build)

    def with_dense_tail(self, rows: int, causal: bool = True) -> "BlockLayout":
        """This layout with every query block that holds one of the last ``rows`` query tokens set to its
        whole (causal) region; the other blocks are unchanged.

        For prompts that end in a question (retrieval, RULER, chat): the last positions' attention decides
        the first generated token, and their keys/values are what the decode steps read last. The cost is
        about ``rows / seqlen_q`` of the causal blocks. No host synchronisation: two ``torch.where`` over
        cached shape-only tensors (the result is a new layout; shared or expanded inputs are not written).

        Args:
            rows: query tokens at the end that attend every block of their region (0 returns ``self``).
            causal: the region is the bottom-right causal one (as the layout's consumer applies it) or,
                with ``False``, every key block.
        """
        if check_nonneg_int("BlockLayout.with_dense_tail", "rows", rows) == 0:
            return self
        Mb = self.kv_num_blocks.shape[-1]
        first = max(0, (self.seqlen_q - rows) // self.block_m)
        lim, pos = self._limits(causal)
        sel = _TAIL_ROWS.get_or_build((Mb, first, str(self.device)),
                                      lambda: (torch.arange(Mb, device=self.device) >= first))
        num = torch.where(sel, lim[:, 0], self.kv_num_blocks)
        idx = torch.where(sel[:, None], pos, self.kv_indices)
        return BlockLayout(num, idx, self.block_m, self.block_n, self.seqlen_q, self.seqlen_kv, validate=False,
                           in_region=self.in_region and bool(causal))

    def selected_in_region(self, causal: bool = False) -> torch.Tensor:
        """Selected blocks inside the (causal) region per (batch, head), int64 ``[B, H]`` on the layout's
        device, with **no host synchronisation** (for accounting in hot paths; read it when reporting).

        The region of each query block is a prefix of the key blocks (:func:`region_row_limits`) and a
        row's indices ascend, so this counts the live entries below that limit.
        """
        if self.in_region:  # every selected block is in the (causal, hence also the full) region
            return self.kv_num_blocks.sum(-1, dtype=torch.int64)
        lim, pos = self._limits(causal)
        live = (pos < self.kv_num_blocks.unsqueeze(-1)) & (self.kv_indices < lim)
        return live.sum(dim=(-1, -2))

    def available_blocks(self, causal: bool = False) -> int:
        """Blocks in the (causal) region of one (batch, head): a Python int from the shapes alone."""
        return sum(region_row_limits(self.seqlen_q, self.seqlen_kv, self.block_m, self.block_n, bool(causal)))

    def density(self, causal: bool = False) -> float:
        """Fraction of available blocks that are selected (see :meth:`density_per_head`)."""
        return float(self.density_per_head(causal).mean())

    def sparsity(self, causal: bool = False) -> float:
        """``1 - density(causal)``."""
        return 1.0 - self.density(causal)

    def restrict_causal(self) -> "BlockLayout":
        """Drop selected blocks that lie entirely above the causal diagonal (they cannot contribute)."""
        region = self._region(True)
        return BlockLayout.from_dense_mask(self.to_dense_mask() & region, block_m=self.block_m, block_n=self.block_n,
                                           seqlen_q=self.seqlen_q, seqlen_kv=self.seqlen_kv)

    def equals(self, other: "BlockLayout") -> bool:
        """Same geometry and same selected blocks (padding ignored)."""
        if not isinstance(other, BlockLayout):
            return False
        same_geom = (self.block_m, self.block_n, self.seqlen_q, self.seqlen_kv, self.batch, self.heads) == (
            other.block_m, other.block_n, other.seqlen_q, other.seqlen_kv, other.batch, other.heads)
        return same_geom and bool(torch.equal(self.to_dense_mask().cpu(), other.to_dense_mask().cpu()))

    def describe(self) -> dict[str, Any]:
        return {
            "batch": self.batch, "heads": self.heads, "block_m": self.block_m, "block_n": self.block_n,
            "seqlen_q": self.seqlen_q, "seqlen_kv": self.seqlen_kv,
            "q_blocks": self.num_q_blocks, "kv_blocks": self.num_kv_blocks,
        }

    def __repr__(self) -> str:
        d = self.describe()
        return "BlockLayout(" + ", ".join(f"{k}={v}" for k, v in d.items()) + ")"

