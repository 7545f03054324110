"""The static pattern predictor: one named pattern from :data:`sparseattn.layout.PATTERNS` for every input.

Not in the predictor registry (its config names a pattern builder and that builder's arguments, not
fields of its own); :func:`sparseattn.predictors.resolve.resolve_predictor` builds it from
``"pattern:name=<pattern>,<builder option>=...,pv_threshold=..."``, and :func:`pattern_predictor`
from ``"<pattern>:<builder option>=..."`` or a dict.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

from sparseattn._validation import fail
from sparseattn.layout.block_layout import BlockLayout

__all__ = ["PatternConfig", "PatternPredictor", "pattern_predictor"]

# builder arguments PatternPredictor.predict fills in itself (never part of a pattern spec)
_FILLED_IN = ("seqlen_q", "seqlen_kv", "batch", "heads", "device", "causal")


@dataclasses.dataclass(frozen=True)
class PatternConfig:
    """A named static pattern from :data:`sparseattn.layout.PATTERNS` with its builder arguments.

    Args:
        name: pattern name (``"sink_window"``, ``"sliding_window"``, ``"strided"``, ...).
        kwargs: builder arguments as ``((key, value), ...)`` (e.g. ``(("window_blocks", 8),)``).
        pv_threshold: optional softmax-aware P·V skip passed to the attention call.
    """

    name: str = "sink_window"
    kwargs: tuple[tuple[str, Any], ...] = ()
    pv_threshold: float | None = None
    version: int = 1

    def __post_init__(self) -> None:
        from sparseattn.layout.patterns import PATTERNS

        if self.name not in PATTERNS:
            raise fail("PatternConfig", "name", "is not a known pattern", f"one of {sorted(PATTERNS)}", repr(self.name))
        for key in dict(self.kwargs):
            if key in ("batch", "heads", "device", "causal", "seqlen_q", "seqlen_kv"):
                raise fail("PatternConfig", "kwargs", "sets an argument the predictor fills in itself",
                           "builder options such as window_blocks, block_m", repr(key))


class PatternPredictor:
    """Predictor returning the same static pattern for every input (causal region only).

    Shapes:
        ``predict(q (B, H, N_q, D), k (B, H_kv, N_kv, D))`` → layout with ``B`` batch and ``H`` heads.
    """

    name = "pattern"

    def __init__(self, config: PatternConfig) -> None:
        from sparseattn._cache import BoundedCache

        self.config = config
        # the pattern depends only on the shapes: built once per (shape, device), reused by every layer and call
        self._layouts: BoundedCache[tuple[Any, ...], BlockLayout] = BoundedCache(16)

    def predict(self, q: torch.Tensor, k: torch.Tensor, *, causal: bool = True, layer: int | None = None) -> BlockLayout:
        key = (q.shape[0], q.shape[1], q.shape[2], k.shape[2], bool(causal), str(q.device))
        return self._layouts.get_or_build(key, lambda: self._build(q, k, causal))

    def _build(self, q: torch.Tensor, k: torch.Tensor, causal: bool) -> BlockLayout:
        from sparseattn.layout.patterns import make_pattern

        kw = dict(self.config.kwargs)
        if self.config.name != "causal":
            kw["causal"] = causal
        return make_pattern(self.config.name, q.shape[2], k.shape[2], batch=q.shape[0], heads=q.shape[1],
                            device=q.device, **kw)

    def reset(self) -> None:
        return None

    def __repr__(self) -> str:
        return f"PatternPredictor({self.config.name}, {dict(self.config.kwargs)})"


def pattern_predictor(spec: str | Mapping[str, Any]) -> PatternPredictor:
    """``"sink_window:sink_blocks=1,window_blocks=8"`` or ``{"name": "sink_window", ...}`` → predictor.

    The keys are checked against the pattern builder's parameters (plus ``pv_threshold``) and the
    values by building the pattern once on a small shape, so a bad spec fails here, not at the
    first forward pass.
    """
    import inspect

    from sparseattn.layout.patterns import PATTERNS
    from sparseattn.predictors.base import _parse_items

    fn = "pattern_predictor"
    if isinstance(spec, Mapping):
        kw = dict(spec)
        name = kw.pop("name", None)
    elif isinstance(spec, str) and spec.strip():
        name, _, rest = spec.strip().partition(":")
        name = name.strip()
        kw = _parse_items(rest, fn)
    else:
        raise fail(fn, "spec", "must be a pattern spec", "'name:key=value,...' or a dict", repr(spec))
    if not isinstance(name, str) or name not in PATTERNS:
        raise fail(fn, "name", "is not a known pattern", f"one of {sorted(PATTERNS)}", repr(name))
    params = inspect.signature(PATTERNS[name]).parameters
    valid = [n for n, prm in params.items() if prm.kind is inspect.Parameter.KEYWORD_ONLY and n not in _FILLED_IN]
    valid.append("pv_threshold")
    for key in kw:
        if not isinstance(key, str) or key not in valid:
            raise fail(fn, f"key {key!r}", f"is not a parameter of pattern {name!r}", f"one of {valid}", repr(key))
    pv = kw.pop("pv_threshold", None)
    if pv is not None and (isinstance(pv, bool) or not isinstance(pv, (int, float)) or not pv > 0):
        raise fail(fn, "pv_threshold", "must be a positive number or None", "float > 0 (inf: never skip)", repr(pv))
    PATTERNS[name](256, 256, **kw)  # value check (the builders raise the project's ValueError)
    return PatternPredictor(PatternConfig(name=name, kwargs=tuple(sorted(kw.items())), pv_threshold=pv))
