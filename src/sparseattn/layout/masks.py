"""The one home of the causal / sliding-window masks: token level and block level (a leaf: imports only torch).

Token level: query row ``r`` may attend key ``c`` iff ``c <= r + OFF`` (``OFF = N_kv - N_q``, bottom-right
aligned causal), and with a sliding window ``W`` also ``c > r + OFF - W`` (transformers' ``kv > q - W``).
Block level: the diagonal key block of each query block and the local band of ``n`` blocks around it.
Every caller that needs one of these masks (the reference, the masked-SDPA path, the layout's element
mask, the static patterns, the predictors' local masks, the model integration's mask checks) builds it here.
"""

from __future__ import annotations

import torch

__all__ = ["causal_window_mask", "token_causal_mask", "diagonal_blocks", "local_block_mask"]


def causal_window_mask(rows: torch.Tensor, cols: torch.Tensor, offset: int, window: int | None = None) -> torch.Tensor:
    """Bool ``[len(rows), len(cols)]``: ``cols <= rows + offset`` (and ``cols > rows + offset - window``).

    ``rows`` / ``cols`` are 1-D integer index tensors (any sub-range: a chunk of rows, a chunk of keys).
    """
    m = cols[None, :] <= rows[:, None] + offset
    if window is not None:
        m = m & (cols[None, :] > rows[:, None] + offset - window)
    return m


def token_causal_mask(seqlen_q: int, seqlen_kv: int, window: int | None = None,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """Bool ``[seqlen_q, seqlen_kv]``: the whole bottom-right aligned causal (+ sliding-window) mask."""
    r = torch.arange(seqlen_q, device=device)
    c = torch.arange(seqlen_kv, device=device)
    return causal_window_mask(r, c, seqlen_kv - seqlen_q, window)


def diagonal_blocks(seqlen_q: int, seqlen_kv: int, block_m: int, block_n: int,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """Key block holding the last key each query block's last row may see (bottom-right aligned), ``[Mb]``.

    Negative when the whole query block sees no key (``N_q > N_kv``).
    """
    Mb, Nb = -(-seqlen_q // block_m), -(-seqlen_kv // block_n)
    i = torch.arange(Mb, device=device)
    row_last = torch.clamp((i + 1) * block_m, max=seqlen_q) - 1
    last_key = row_last + (seqlen_kv - seqlen_q)
    return torch.clamp(torch.div(last_key, block_n, rounding_mode="floor"), max=Nb - 1)


def local_block_mask(seqlen_q: int, seqlen_kv: int, block_m: int, block_n: int, n_blocks: int, causal: bool,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """Bool ``[Mb, Nb]``: the diagonal key block and the ``n_blocks - 1`` before it (and after it, if not causal)."""
    Nb = -(-seqlen_kv // block_n)
    d = diagonal_blocks(seqlen_q, seqlen_kv, block_m, block_n, device)[:, None]
    j = torch.arange(Nb, device=device)[None, :]
    m = (j <= d) & (j > d - n_blocks)
    if not causal:
        m = m | ((j > d) & (j < d + n_blocks))
    return m
