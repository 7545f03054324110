"""Static patterns through the predictor interface.

``StaticPredictor`` ignores the values of q and k and returns one of the foundation's patterns
(:mod:`sparseattn.layout.patterns`) for their shapes: a baseline every data-dependent predictor
should beat, and the way to run fixed A-shape / local attention in a patched model.

Spec strings (``sparseattn ... --predictor``)::

    static:pattern=sink_window,sink_blocks=1,window_blocks=8
    static:pattern=local,window_blocks=4
    static:pattern=strided,stride=4,local_blocks=2
    static:pattern=random,density=0.25,seed=0
    static:pattern=block_diagonal,group_blocks=4
    static:pattern=dense
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparseattn._cache import BoundedCache
from sparseattn._validation import fail
from sparseattn.layout.block_layout import BlockLayout
from sparseattn.layout.patterns import PATTERNS
from sparseattn.predictors._common import check_block, check_bool, check_nonneg, check_qk, check_version, config_or_default
from sparseattn.predictors.base import register_predictor

__all__ = ["StaticConfig", "StaticPredictor"]

# pattern -> config fields it reads
_PATTERN_FIELDS: dict[str, tuple[str, ...]] = {
    "dense": (),
    "causal": (),
    "local": ("window_blocks",),
    "sliding_window": ("window_blocks",),
    "strided": ("stride", "local_blocks"),
    "random": ("density", "seed", "keep_diagonal"),
    "block_diagonal": ("group_blocks",),
    "sink_window": ("sink_blocks", "window_blocks"),
}


@dataclass(frozen=True)
class StaticConfig:
    """A fixed block pattern.

    Args:
        pattern: one of ``dense``, ``causal``, ``local`` (= ``sliding_window``), ``strided``,
            ``random``, ``block_diagonal``, ``sink_window``.
        window_blocks: local band width in blocks (``local``, ``sliding_window``, ``sink_window``).
        sink_blocks: leading key blocks always kept (``sink_window``).
        stride: keep every ``stride``-th block back from the diagonal (``strided``).
        local_blocks: local blocks kept by ``strided``.
        density: target density per row (``random``), in [0, 1].
        seed: RNG seed (``random``); the same seed gives the same layout everywhere.
        keep_diagonal: ``random`` always keeps the diagonal block.
        group_blocks: group size (``block_diagonal``).
        block_m: query rows per block.
        block_n: key columns per block.
        version: config schema version (1).
    """

    pattern: str = "sink_window"
    window_blocks: int = 4
    sink_blocks: int = 1
    stride: int = 4
    local_blocks: int = 1
    density: float = 0.5
    seed: int = 0
    keep_diagonal: bool = True
    group_blocks: int = 4
    block_m: int = 64
    block_n: int = 64
    version: int = 1

    def __post_init__(self) -> None:
        c = "StaticConfig"
        if self.pattern not in _PATTERN_FIELDS:
            raise fail(c, "pattern", "is not a known pattern", f"one of {sorted(_PATTERN_FIELDS)}", repr(self.pattern))
        for name in ("window_blocks", "stride", "group_blocks", "block_m", "block_n"):
            check_block(c, name, getattr(self, name))
        for name in ("sink_blocks", "local_blocks", "seed"):
            check_nonneg(c, name, getattr(self, name))
        if isinstance(self.density, bool) or not isinstance(self.density, (int, float)) or not (0.0 <= float(self.density) <= 1.0):
            raise fail(c, "density", "is out of range", "a float in [0, 1]", repr(self.density))
        check_bool(c, "keep_diagonal", self.keep_diagonal)
        check_version(c, self.version, 1)


@register_predictor("static", StaticConfig)
class StaticPredictor:
    """Returns a fixed pattern for the shapes of q and k (the values are not read).

    Shapes:
        q ``(B, H, N_q, D)``, k ``(B, H_kv, N_kv, D)`` → layout with ``B`` batches and ``H`` heads
        (stride-0 expanded: one pattern shared by every head, except ``random`` which draws per head).
    """

    name = "static"

    def __init__(self, config: StaticConfig | None = None) -> None:
        self.config = config_or_default("StaticPredictor", config, StaticConfig)
        self.last_scores: torch.Tensor | None = None
        self._cache: BoundedCache[tuple, BlockLayout] = BoundedCache(64)  # per-geometry layouts, thread-safe LRU

    def predict(self, q: torch.Tensor, k: torch.Tensor, *, causal: bool = True, layer: int | None = None) -> BlockLayout:
        B, H, _, Nq, Nkv, _ = check_qk("StaticPredictor.predict", q, k, causal)
        cfg = self.config
        key = (B, H, Nq, Nkv, causal, str(q.device))
        hit = self._cache.get(key)
        if hit is not None:  # a pattern depends only on the shapes: build it once per geometry
            return hit
        kwargs = {f: getattr(cfg, f) for f in _PATTERN_FIELDS[cfg.pattern]}
        geom = dict(block_m=cfg.block_m, block_n=cfg.block_n, batch=B, heads=H, device=q.device)
        if cfg.pattern == "causal":
            if not causal:
                raise fail("StaticPredictor.predict", "causal", "must be True for pattern='causal'",
                           "causal=True (or pattern='dense')", causal)
            layout = PATTERNS["causal"](Nq, Nkv, **geom)
        else:
            layout = PATTERNS[cfg.pattern](Nq, Nkv, causal=causal, **kwargs, **geom)
        self.last_scores = None
        return self._cache.get_or_build(key, lambda: layout)

    def reset(self) -> None:
        """Stateless (the per-geometry layout cache is kept: it depends only on shapes)."""
