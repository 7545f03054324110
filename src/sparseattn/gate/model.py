"""The learned block gate: pooled features, per-layer projections and block scores.

Per layer and KV head ``h`` (GQA: the query heads of a group share their KV head's projections):

* query block feature ``q̄`` — the mean of the block's (post-RoPE) query rows, ``D`` values;
* key block feature ``k̃ = [max, min, mean]`` — per-coordinate maximum, minimum and mean of the
  block's keys, concatenated (``3·D`` values, in this order);
* score ``s = (q̄ W_q[h]) · (k̃ W_k[h]) / sqrt(d_gate) + b[h', bucket(i, j)]`` with ``W_q[h]``
  ``(D, d_gate)`` and ``W_k[h]`` ``(3·D, d_gate)``; the optional **position bias** ``b`` (one
  learned value per query head ``h'`` and bucket) depends only on where the key block lies: bucket 0
  is key block 0 (the attention sink), buckets ``1 …`` the block distance between query and key
  block, exact up to 3 and in half-octaves beyond (:func:`distance_buckets`). Pooling over 64 rows
  washes RoPE's high frequencies out of ``q̄`` and ``k̃``, so without ``b`` the gate can hardly tell a
  near block from a far one; ``b`` gives it the recency and sink priors directly. The predictor
  takes the softmax over the allowed (causal) key blocks of a row as its block distribution.

All heads and blocks are scored with three batched matmuls (query projection, key projection,
scores); nothing loops over heads or blocks. Initialisation (:meth:`GateWeights.init`) makes the
gate start from mean_sim's ``"mean"`` score (``q̄·k̄ / sqrt(D)``, exactly when ``d_gate == D``),
so training starts from the training-free predictor and moves away from it only where that helps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from sparseattn._validation import fail

__all__ = ["GateWeights", "pooled_features", "gate_scores", "FEATURES", "BIAS_BUCKETS", "distance_buckets",
           "bias_bucket_index"]

#: human-readable description of the features (stored in the file's metadata)
FEATURES = "q: mean over the query block; k: [max, min, mean] over the key block (concatenated, 3*D)"

#: number of position-bias buckets: 0 = key block 0 (sink), 1 + distance_buckets(d) otherwise
BIAS_BUCKETS = 24
_EXACT = 4  # distances 0..3 get a bucket each; half-octaves beyond


def distance_buckets(d: torch.Tensor) -> torch.Tensor:
    """Bucket ``0 … BIAS_BUCKETS − 2`` of a block distance ``|d|``: ``|d|`` itself below 4, then
    ``4 + floor(2·log2(|d| / 4))`` (half-octaves), capped at the last bucket (distances ≥ 2048 blocks share it)."""
    a = d.abs().to(torch.float64)
    far = _EXACT + torch.floor(2.0 * torch.log2(a.clamp_min(_EXACT) / _EXACT))
    b = torch.where(a < _EXACT, a, far)
    return b.clamp_max(BIAS_BUCKETS - 2).to(torch.long)


def bias_bucket_index(nq: int, nkv: int, block_m: int, block_n: int, device: Any = None) -> torch.Tensor:
    """The bias bucket ``[Mb, Nb]`` (long) of every (query block, key block) pair of an ``nq × nkv`` call.

    Query positions are bottom-right aligned with the keys (query row ``r`` sits at key position
    ``r + nkv − nq``, as causal masking assumes); the distance is the key block holding a query block's
    first row minus the key block. Key block 0 is bucket 0 (sink); every other pair ``1 + distance_buckets``.
    Shape-only: callers cache it.
    """
    from sparseattn.layout.block_layout import cdiv

    mb, nb = cdiv(nq, block_m), cdiv(nkv, block_n)
    first = torch.arange(mb, dtype=torch.long) * block_m + (nkv - nq)
    qblk = torch.div(first, block_n, rounding_mode="floor")
    dist = qblk[:, None] - torch.arange(nb, dtype=torch.long)[None, :]
    idx = 1 + distance_buckets(dist)
    idx[:, 0] = 0
    return idx.to(device) if device is not None else idx


def extend_bias(bias: torch.Tensor, last: int) -> torch.Tensor:
    """``bias`` ``[..., BIAS_BUCKETS]`` with every bucket after ``last`` set to bucket ``last``'s value.

    Training sees the distance buckets up to the longest training sequence only; the later ones would keep their
    initial value (0) and, next to a learned negative far-distance bias, make the farthest blocks of a longer prompt
    look *more* likely than nearer ones. Carrying the farthest trained bucket forward keeps the bias monotone past
    the training length. Returns a new tensor (``bias`` is not modified).
    """
    out = bias.clone()
    if last + 1 < out.shape[-1]:
        out[..., last + 1:] = out[..., last:last + 1]
    return out


@dataclass
class GateWeights:
    """Projections of every trained layer, stacked.

    Attributes:
        layers: model layer indices, in the order of the first dimension of ``wq`` / ``wk``.
        wq: float32 ``[L, H_kv, D, d_gate]``.
        wk: float32 ``[L, H_kv, 3·D, d_gate]`` (rows: max, min, mean features).
        block_m / block_n: the block sizes the gate was trained at (the predictor's block sizes).
        bias: float32 ``[L, H, BIAS_BUCKETS]`` position bias per query head, or None (no bias).
        meta: JSON metadata (fingerprint, training details, ...); see :mod:`sparseattn.gate.store`.
    """

    layers: list[int]
    wq: torch.Tensor
    wk: torch.Tensor
    block_m: int = 64
    block_n: int = 64
    meta: dict[str, Any] = field(default_factory=dict)
    bias: torch.Tensor | None = None

    @property
    def kv_heads(self) -> int:
        return int(self.wq.shape[1])

    @property
    def head_dim(self) -> int:
        return int(self.wq.shape[2])

    @property
    def d_gate(self) -> int:
        return int(self.wq.shape[3])

    def index(self, layer: int) -> int | None:
        """Position of model layer ``layer`` in the stacked tensors (None when the gate has no weights for it)."""
        try:
            return self.layers.index(layer)
        except ValueError:
            return None

    @property
    def heads(self) -> int | None:
        """Query heads (known only when the gate has a position bias)."""
        return None if self.bias is None else int(self.bias.shape[1])

    @staticmethod
    def init(layers: list[int], kv_heads: int, head_dim: int, d_gate: int, *, block_m: int = 64, block_n: int = 64,
             seed: int = 0, noise: float = 0.0, heads: int | None = None) -> "GateWeights":
        """Weights whose score equals mean_sim's mean score ``q̄·k̄/sqrt(D)`` (up to a random rotation when
        ``d_gate != D``): ``W_q = R``, the mean rows of ``W_k`` = ``R`` and the max/min rows 0, with
        ``R R^T = sqrt(d_gate / D) · I`` (a random orthogonal ``R`` of that scale; a projection when
        ``d_gate < D``). ``noise`` adds Gaussian noise of that std to every weight. ``heads`` (query
        heads): add a zero position bias ``[L, heads, BIAS_BUCKETS]`` (the score is unchanged)."""
        fn = "GateWeights.init"
        for name, v in (("kv_heads", kv_heads), ("head_dim", head_dim), ("d_gate", d_gate)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise fail(fn, name, "must be a positive integer", "an int > 0", repr(v))
        if not layers:
            raise fail(fn, "layers", "is empty", "at least one layer index", repr(layers))
        if heads is not None and (isinstance(heads, bool) or not isinstance(heads, int) or heads <= 0
                                  or heads % kv_heads):
            raise fail(fn, "heads", "must be a positive multiple of kv_heads (or None)", f"a multiple of {kv_heads}",
                       repr(heads))
        g = torch.Generator().manual_seed(seed)
        L, D = len(layers), head_dim
        scale = (d_gate / D) ** 0.25
        r = torch.empty(L, kv_heads, D, d_gate)
        for i in range(L * kv_heads):  # one-off initialisation, not a hot path
            m = torch.randn(max(D, d_gate), max(D, d_gate), generator=g)
            qm, _ = torch.linalg.qr(m)
            r.view(-1, D, d_gate)[i] = qm[:D, :d_gate] * scale
        wq = r.clone()
        wk = torch.zeros(L, kv_heads, 3 * D, d_gate)
        wk[:, :, 2 * D:] = r
        if noise > 0:
            wq += noise * torch.randn(wq.shape, generator=g)
            wk += noise * torch.randn(wk.shape, generator=g)
        bias = None if heads is None else torch.zeros(L, heads, BIAS_BUCKETS)
        return GateWeights(list(layers), wq, wk, block_m, block_n, {}, bias)


def pooled_features(q: torch.Tensor, k: torch.Tensor, block_m: int, block_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block features of the gate: ``(q̄ [B, H, Mb, D], k̃ [B, H_kv, Nb, 3·D])``, float32 (torch path).

    ``k̃`` is ``[max, min, mean]`` per coordinate. A partial last block pools its own rows only.
    """
    from sparseattn.predictors._common import block_minmax, block_pool

    q_sum, _, q_cnt = block_pool(q, block_m)
    k_sum, _, k_cnt = block_pool(k, block_n)
    k_min, k_max = block_minmax(k, block_n)
    q_mean = q_sum / q_cnt[:, None]
    k_mean = k_sum / k_cnt[:, None]
    return q_mean, torch.cat((k_max, k_min, k_mean), dim=-1)


def gate_scores(q_mean: torch.Tensor, k_feat: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """Raw block scores ``(q̄ W_q)·(k̃ W_k) / sqrt(d_gate) [+ bias]`` ``[..., H, Mb, Nb]`` (differentiable).

    Shapes:
        q_mean ``[..., H, Mb, D]``, k_feat ``[..., H_kv, Nb, 3D]``, wq ``[..., H_kv, D, d]``,
        wk ``[..., H_kv, 3D, d]`` (leading dims broadcast, e.g. a layer dimension for training);
        ``bias``: the position bias already expanded to ``[..., H, Mb, Nb]`` (e.g.
        ``b[..., bias_bucket_index(...)]``), or None.
    """
    *lead, H, Mb, D = q_mean.shape
    Hkv, Nb = k_feat.shape[-3], k_feat.shape[-2]
    G = H // Hkv
    d = wq.shape[-1]
    qg = torch.matmul(q_mean.reshape(*lead, Hkv, G * Mb, D), wq)  # [..., Hkv, G*Mb, d]
    kg = torch.matmul(k_feat, wk)  # [..., Hkv, Nb, d]
    s = torch.matmul(qg, kg.transpose(-1, -2)) * (1.0 / math.sqrt(d))
    s = s.reshape(*s.shape[:-3], H, Mb, Nb)  # leading dims after broadcasting with the weights
    return s if bias is None else s + bias
