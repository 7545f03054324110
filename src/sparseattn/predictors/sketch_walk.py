"""SketchWalk: sketch block attention cheaply, then walk it across layers.

After "Scout Before You Attend: Sketch-and-Walk Sparse Attention" (ICML 2026); this is our own
implementation of the idea as described in the sparseattn design notes, not a port.

**Sketch** (per layer). Per head, block means ``q̄`` (``block_m`` rows) and ``k̄`` (``block_n``
keys) are projected by a seeded subsampled randomized Hadamard transform (SRHT)
``S = sqrt(1/m) · P · H · diag(σ)`` to ``m = sketch_dim`` coordinates (``H`` the unnormalised
Sylvester–Hadamard matrix of size ``D' = 2^⌈log2 D⌉``, ``σ`` random signs, ``P`` ``m`` random
coordinates), which keeps inner products unbiased: ``E<S q̄, S k̄> = <q̄, k̄>`` (exact when
``m ≥ D'``). Block scores ``scale · <S q̄, S k̄>`` go through a softmax over the allowed key blocks
(block-level causal mask) and are averaged over all query heads into one row-stochastic block
matrix ``A_l`` ``[Mb, Nb]`` per layer (per batch element).

**Walk** (across layers, stateful within one forward pass). With ``β = beta``, ``d = depth``::

    W_l = (1 − β) (A_l + β A_l² + … + β^{d−1} A_l^d) + β^d · W_{l−1} · A_l^d

Every term is row-stochastic, and the coefficients sum to ``(1 − β^d) + β^d = 1``, so ``W_l`` is
row-stochastic too. *First layer* (no ``W_{l−1}``, or ``layer=None``): the series alone,
renormalised to keep rows stochastic — ``W = (1 − β)/(1 − β^d) · Σ_j β^{j−1} A^j``. The powers need
a square block graph (``N_q == N_kv`` and ``block_m == block_n``); for rectangular calls (chunked
prefill, decode) the walk is the first-order recurrence ``W_l = (1 − β) A_l + β W_{l−1}`` when the
previous layer had the same geometry, else ``W_l = A_l``.

State: the walk history is kept from one layer to the next and cleared by :meth:`reset` (the model
integration calls it before each forward pass); it is also cleared automatically when the layer
index does not increase (a new pass began) or the geometry changes. ``layer=None`` calls neither
read nor write it.

**Selection** per query-block row with ``n`` allowed blocks: the first ``max(min_sink_blocks,
⌈sink_fraction·n⌉)`` (sinks), the diagonal block and the ones before it up to
``max(min_window_blocks, ⌈window_fraction·n⌉)`` (recent window), and the top
``⌈top_fraction · r⌉`` of the ``r`` remaining blocks by ``W_l`` — about 2.5 + 5 + 12.5 ≈ 20 % density
at long lengths by default. One layout per layer, shared by all heads (stride-0). Layers with
index ``< dense_layers`` return the dense (causal) layout but still feed the walk.

**Decode variant**: a call whose queries fit in one query block while there are more keys
(``N_q ≤ block_m < N_kv``) pools the last ``decode_window`` queries of this layer (kept from the
previous calls of the same sequence, including the prefill's last queries, and dropped when
``N_kv`` does not continue them) instead of the current queries only, which steadies the one-row
``A_l`` of a single token.

``walk=False`` selects on ``A_l`` alone (the same sketch without the walk): the ablation.

Spec: ``sketch_walk:top_fraction=0.125,beta=0.25,depth=3,dense_layers=2``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sparseattn._cache import BoundedCache
from sparseattn._validation import fail
from sparseattn.layout.block_layout import BlockLayout, cdiv
from sparseattn.predictors._common import (
    block_pool,
    cached,
    causal_region,
    check_block,
    check_bool,
    check_nonneg,
    check_opt_fraction,
    check_pv_threshold,
    check_qk,
    check_version,
    config_or_default,
    dense_predicted_layout,
    diagonal_blocks,
    mask_to_layout,
    nonfinite_block_force,
    select_topk,
)
from sparseattn.predictors.base import register_predictor

__all__ = ["SketchWalkConfig", "SketchWalkPredictor", "srht_sketch"]

_HADAMARD: BoundedCache[tuple[int, str], torch.Tensor] = BoundedCache(16, name="sketch_walk._HADAMARD")


def _hadamard(n: int, device: torch.device) -> torch.Tensor:
    def build() -> torch.Tensor:
        h = torch.ones(1, 1)
        while h.shape[0] < n:
            h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
        return h.to(device=device, dtype=torch.float32)

    return _HADAMARD.get_or_build((n, str(device)), build)


def srht_sketch(x: torch.Tensor, sketch_dim: int, seed: int) -> torch.Tensor:
    """Subsampled randomized Hadamard transform of the last dimension (inner products unbiased).

    Args:
        x: float ``(..., D)``.
        sketch_dim: output width ``m``; ``m ≥ D'`` (next power of two) keeps all coordinates (exact).
        seed: seeds the signs and the sampled coordinates (CPU generator: same on every machine).

    Returns:
        float32 ``(..., min(m, D'))`` with ``E<S x, S y> = <x, y>``.
    """
    D = x.shape[-1]
    Dp = 1 << max(0, (D - 1).bit_length())
    m = min(int(sketch_dim), Dp)

    def build() -> torch.Tensor:
        gen = torch.Generator().manual_seed(int(seed))
        signs = (torch.randint(0, 2, (D,), generator=gen) * 2 - 1).to(torch.float32)
        cols = torch.randperm(Dp, generator=gen)[:m].sort().values
        return (_hadamard(Dp, x.device)[:D, :] * signs.to(x.device)[:, None])[:, cols.to(x.device)] * (m ** -0.5)

    proj = cached(("srht", D, m, int(seed), str(x.device)), build)  # [D, m], built once per device
    return torch.matmul(x.to(torch.float32), proj)


@dataclass(frozen=True)
class SketchWalkConfig:
    """SketchWalk settings (see module docstring).

    Args:
        sketch_dim: SRHT width ``m`` per head.
        beta: walk decay ``β`` in [0, 1).
        depth: walk depth ``d`` (powers of ``A_l``), >= 1.
        walk: use the walk (False: select on ``A_l`` alone — the ablation).
        per_head: keep one block matrix (and walk) per query head instead of averaging the heads;
            the layout then differs per head (costs ``H`` small matrix powers instead of one).
        sink_fraction: share of each row's allowed blocks kept from its start.
        window_fraction: share kept as the recent window (diagonal block and before).
        top_fraction: share of the remaining allowed blocks kept by ``W_l``.
        min_sink_blocks: at least this many sink blocks.
        min_window_blocks: at least this many window blocks.
        dense_layers: layers with index below this stay dense.
        decode_window: queries pooled by the decode variant.
        seed: SRHT seed.
        pv_threshold: natural-log gap for the attention call's P·V skip; None = off.
        block_m: query rows per block.
        block_n: key columns per block.
        version: config schema version (1).
    """

    sketch_dim: int = 64
    beta: float = 0.25
    depth: int = 3
    walk: bool = True
    per_head: bool = False
    sink_fraction: float = 0.025
    window_fraction: float = 0.05
    top_fraction: float = 0.125
    min_sink_blocks: int = 1
    min_window_blocks: int = 1
    dense_layers: int = 2
    decode_window: int = 16
    seed: int = 0
    pv_threshold: float | None = None
    block_m: int = 64
    block_n: int = 64
    version: int = 1

    def __post_init__(self) -> None:
        c = "SketchWalkConfig"
        check_block(c, "sketch_dim", self.sketch_dim)
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not (0.0 <= float(self.beta) < 1.0):
            raise fail(c, "beta", "is out of range", "a float in [0, 1)", repr(self.beta))
        check_block(c, "depth", self.depth)
        check_bool(c, "walk", self.walk)
        check_bool(c, "per_head", self.per_head)
        for name in ("sink_fraction", "window_fraction", "top_fraction"):
            check_opt_fraction(c, name, getattr(self, name), low_open=False)
            if getattr(self, name) is None:
                raise fail(c, name, "must be a number", "a float in [0, 1]", "None")
        for name in ("min_sink_blocks", "min_window_blocks", "dense_layers", "seed"):
            check_nonneg(c, name, getattr(self, name))
        check_block(c, "decode_window", self.decode_window)
        check_pv_threshold(c, self.pv_threshold)
        check_block(c, "block_m", self.block_m)
        check_block(c, "block_n", self.block_n)
        check_version(c, self.version, 1)


@register_predictor("sketch_walk", SketchWalkConfig)
class SketchWalkPredictor:
    """Sketched block attention walked across layers; one layout per layer shared by all heads.

    Attributes:
        last_scores: ``W_l`` (or ``A_l`` with ``walk=False``) of the last call, ``[B, 1, Mb, Nb]``
            (``[B, H, Mb, Nb]`` with ``per_head``).

    Shapes:
        q ``(B, H, N_q, D)``, k ``(B, H_kv, N_kv, D)`` → layout with ``B`` batches and ``H`` heads
        (stride-0 over heads).
    """

    name = "sketch_walk"

    def __init__(self, config: SketchWalkConfig | None = None) -> None:
        self.config = config_or_default("SketchWalkPredictor", config, SketchWalkConfig)
        self.last_scores: torch.Tensor | None = None
        self._W: torch.Tensor | None = None
        self._geom: tuple[Any, ...] | None = None
        self._last_layer: int | None = None
        self._pool: dict[int, tuple[torch.Tensor, int]] = {}

    # ------------------------------------------------------------------ state
    def graph_refusal(self, layer: int | None) -> str | None:
        """Why a call cannot be replayed from a CUDA graph: with ``layer`` set the walk is stateful."""
        if layer is None:
            return None
        return ("SketchWalk with layer set keeps the walk history W and the decode query pool across layers "
                "in Python-side state, which a replayed CUDA graph would not update; call with layer=None "
                "(stateless) or use the eager predictor")

    def reset(self) -> None:
        """Clear the walk history (call before each forward pass; the decode query pool survives)."""
        self._W = None
        self._geom = None
        self._last_layer = None

    def reset_sequence(self) -> None:
        """Clear everything, the decode query pool included (a new sequence)."""
        self.reset()
        self._pool.clear()

    @property
    def state(self) -> dict[str, Any]:
        """Introspection for tests: last layer seen and whether a walk history is held."""
        return {"last_layer": self._last_layer, "has_history": self._W is not None, "pooled_layers": sorted(self._pool)}

    # ------------------------------------------------------------------ sketch
    def block_matrix(self, q: torch.Tensor, k: torch.Tensor, *, causal: bool = True) -> torch.Tensor:
        """The per-layer sketch ``A_l``: float32 ``[B, Mb, Nb]`` (``[B, H, Mb, Nb]`` with ``per_head``), rows sum to 1 (0 for rows with no allowed block)."""
        B, H, Hkv, Nq, Nkv, D = check_qk("SketchWalkPredictor.block_matrix", q, k, causal)
        return self._sketch(q, k, causal, B, H, Hkv, Nq, Nkv, D)[0]

    def _sketch(self, q: torch.Tensor, k: torch.Tensor, causal: bool, B: int, H: int, Hkv: int, Nq: int, Nkv: int,
                D: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, force)``: the block matrix (see :meth:`block_matrix`) and the blocks holding NaN/inf
        that must be kept (bool ``[B, 1, Mb, Nb]``, see ``nonfinite_block_force``)."""
        cfg = self.config
        G = H // Hkv
        q_sum, _, q_cnt = block_pool(q, cfg.block_m)
        k_sum, _, k_cnt = block_pool(k, cfg.block_n)
        qs = srht_sketch(q_sum / q_cnt[:, None], cfg.sketch_dim, cfg.seed)  # [B, H, Mb, m]
        ks = srht_sketch(k_sum / k_cnt[:, None], cfg.sketch_dim, cfg.seed)  # [B, Hkv, Nb, m]
        Mb, Nb = qs.shape[2], ks.shape[2]
        s = torch.matmul(qs.reshape(B, Hkv, G * Mb, -1), ks.transpose(-1, -2)) * (D ** -0.5)
        region = causal_region(Nq, Nkv, cfg.block_m, cfg.block_n, causal, q.device)
        s = s.reshape(B, Hkv, G, Mb, Nb).masked_fill(~region, float("-inf"))
        # rows without an allowed block -> 0; NaN from non-finite q/k stays in the scores
        p = torch.softmax(s, dim=-1).masked_fill_(~region.any(-1, keepdim=True), 0.0)
        force = nonfinite_block_force(q_sum, k_sum, region)  # returned, not stored: predict stays thread-safe
        if cfg.per_head:
            return p.reshape(B, H, Mb, Nb), force
        return p.mean(dim=(1, 2)), force  # [B, Mb, Nb]

    def _decode_queries(self, q: torch.Tensor, Nq: int, Nkv: int, layer: int | None) -> torch.Tensor:
        """Queries the sketch pools: the last ``decode_window`` of this layer's sequence in decode mode."""
        cfg = self.config
        W = min(cfg.decode_window, cfg.block_m)
        if layer is None:
            return q
        decode = Nq <= cfg.block_m and Nq < Nkv
        prev = self._pool.get(layer)
        if decode and prev is not None and prev[1] + Nq == Nkv and prev[0].shape[:2] == q.shape[:2] \
                and prev[0].device == q.device:
            pooled = torch.cat((prev[0].to(q.dtype), q), dim=2)[:, :, -W:]
        else:
            pooled = q[:, :, -W:]
        self._pool[layer] = (pooled.detach(), Nkv)
        return pooled if decode else q

    # ------------------------------------------------------------------ walk
    def _series(self, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Σ_{j=1..d} β^{j−1} A^j, A^d)`` for a square ``A``."""
        beta, d = float(self.config.beta), self.config.depth
        power = A
        total = A.clone()
        for j in range(2, d + 1):
            power = torch.matmul(power, A)
            total = total + (beta ** (j - 1)) * power
        return total, power

    def _walk(self, A: torch.Tensor, geom: tuple[Any, ...], square: bool, stateful: bool) -> torch.Tensor:
        beta, d = float(self.config.beta), self.config.depth
        prev = self._W if (stateful and self._geom == geom) else None
        if square:
            series, Ad = self._series(A)
            if prev is None:
                norm = (1.0 - beta) / (1.0 - beta ** d) if beta > 0 else 1.0
                return norm * series
            return (1.0 - beta) * series + (beta ** d) * torch.matmul(prev, Ad)
        if prev is None:
            return A
        return (1.0 - beta) * A + beta * prev

    # ------------------------------------------------------------------ predict
    def predict(self, q: torch.Tensor, k: torch.Tensor, *, causal: bool = True, layer: int | None = None) -> BlockLayout:
        fn = "SketchWalkPredictor.predict"
        B, H, Hkv, Nq, Nkv, D = check_qk(fn, q, k, causal)
        if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int) or layer < 0):
            raise fail(fn, "layer", "must be a non-negative int or None", "int >= 0", repr(layer))
        cfg = self.config
        dev = q.device
        stateful = layer is not None
        if stateful and self._last_layer is not None and layer <= self._last_layer:  # type: ignore[operator]
            self.reset()  # a new forward pass began
        q_used = self._decode_queries(q, Nq, Nkv, layer)
        Nq_used = q_used.shape[2]
        if Nq_used != Nq:  # decode: one pooled query block, aligned to the end of the keys
            A, force = self._sketch(q_used, k, causal, B, H, Hkv, Nq_used, Nkv, D)
        else:
            A, force = self._sketch(q, k, causal, B, H, Hkv, Nq, Nkv, D)
        Mb, Nb = cdiv(Nq, cfg.block_m), cdiv(Nkv, cfg.block_n)
        square = Nq == Nkv and cfg.block_m == cfg.block_n
        geom = (B, H if cfg.per_head else 1, Mb, Nb, Nq, Nkv, causal, str(dev))
        W = self._walk(A, geom, square, stateful) if cfg.walk else A
        if stateful:
            self._W, self._geom, self._last_layer = W, geom, layer
        Wh = W if cfg.per_head else W.unsqueeze(1)  # [B, H or 1, Mb, Nb]
        self.last_scores = Wh
        if stateful and layer < cfg.dense_layers:  # type: ignore[operator]
            return dense_predicted_layout(B, H, Nq, Nkv, cfg.block_m, cfg.block_n, causal, dev)
        mask = self._select(Wh, Nq, Nkv, causal, dev) | force  # [B, H or 1, Mb, Nb]
        return mask_to_layout(mask, block_m=cfg.block_m, block_n=cfg.block_n, seqlen_q=Nq,
                              seqlen_kv=Nkv, batch=B, heads=H)

    def _select(self, W: torch.Tensor, Nq: int, Nkv: int, causal: bool, dev: torch.device) -> torch.Tensor:
        cfg = self.config
        region = causal_region(Nq, Nkv, cfg.block_m, cfg.block_n, causal, dev)  # [Mb, Nb]
        key = ("sw_forced", Nq, Nkv, cfg.block_m, cfg.block_n, cfg.sink_fraction, cfg.window_fraction,
               cfg.min_sink_blocks, cfg.min_window_blocks, causal, str(dev))
        forced = cached(key, lambda: self._forced(region, Nq, Nkv, causal, dev))
        remaining = cached(key + ("remaining",), lambda: region & ~forced)
        if cfg.top_fraction > 0:
            top = select_topk(W, remaining, cfg.top_fraction)
            return top | forced
        return forced.expand_as(W)

    def _forced(self, region: torch.Tensor, Nq: int, Nkv: int, causal: bool, dev: torch.device) -> torch.Tensor:
        """Sink and recent-window blocks of every row, ``[Mb, Nb]`` (within ``region``)."""
        cfg = self.config
        Mb, Nb = region.shape
        avail = region.sum(-1).to(torch.float64)  # [Mb]
        n_sink = torch.maximum(torch.ceil(avail * cfg.sink_fraction - 1e-9),
                               torch.full_like(avail, cfg.min_sink_blocks)).long()
        n_win = torch.maximum(torch.ceil(avail * cfg.window_fraction - 1e-9),
                              torch.full_like(avail, cfg.min_window_blocks)).long()
        j = torch.arange(Nb, device=dev)[None, :]
        d = diagonal_blocks(Nq, Nkv, cfg.block_m, cfg.block_n, dev)[:, None]
        sink = j < n_sink[:, None]
        win = (j <= d) & (j > d - n_win[:, None])
        if not causal:
            win = win | ((j > d) & (j < d + n_win[:, None]))
        return (sink | win) & region
