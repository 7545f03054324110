"""Lossless speculative decoding with sparse decode as the draft (self-speculation).

Sparse decode (``patch_model(..., decode="sparse")``, Quest's page selection) reads a fraction of the KV cache
per step, but its greedy tokens drift from dense ones: one near-tie flipped in a long generation and the rest
diverges (docs/DECODE.md). :func:`speculative_generate` keeps sparse decode's cheap steps and dense decode's
tokens: the same model drafts ``draft_tokens`` greedy tokens with sparse decode, then **one** forward of the
draft (its ``draft_tokens + 1`` tokens as one multi-token decode step, exact attention through the dense
decode kernel) checks them; the longest prefix the exact model would have produced is kept, plus the exact
model's own next token, and the cache is rolled back to those. Every emitted token is the exact model's
greedy choice given the tokens before it, so the output is dense greedy decoding's, whatever the sparse
budget; the budget only changes how many drafts are accepted.

Cost per round: ``draft_tokens`` sparse steps plus one exact step of ``draft_tokens + 1`` queries (decode is
memory-bound: about one dense step's K/V reads), for ``accepted + 1`` tokens. It pays where attention over a
long cache dominates a step (long contexts, large batches, large models on the GPU); for a small model whose
eager decode step is host-bound it costs more forwards than it saves (measured: docs/DECODE.md).

Cache handling: a ``transformers`` ``DynamicCache`` (its ``DynamicLayer`` / ``DynamicSlidingWindowLayer``
layers, whose updates concatenate into new tensors). Before the drafts each layer's key/value tensors (and a
sliding layer's token count) are kept by reference; after them they are put back, so the exact step appends
to the cache as it was; after the exact step the rejected drafts' entries are dropped (a full layer's last
entries; a sliding layer is rebuilt from the kept tensors plus the accepted new entries, cut to its window).
The cache therefore stays in the state one-token decoding would leave it (no past recording, masks as usual),
and the decode route is told of each rollback (:meth:`DecodeRoute.note_crop`) so the page summaries are
updated, not rebuilt. One host read per round (how many drafts were accepted, with the exact tokens: the rollback
needs the count) and one after the prefill; none inside a step. ``eos_token_id`` stops after an end token.

Exactness holds as far as the exact step computes what one-token dense decode computes: in float32 the
multi-token step and single steps agree to rounding (~1e-6); in bfloat16, as any change of kernel does, they
can differ at near-ties.
"""

from __future__ import annotations

import dataclasses
import inspect
import time
from collections.abc import Sequence
from typing import Any

import torch

from sparseattn._validation import fail

__all__ = ["SpeculativeResult", "speculative_generate", "cache_kwarg", "check_draft_tokens", "cuda_sync",
           "dynamic_cache"]


@dataclasses.dataclass(frozen=True)
class SpeculativeResult:
    """What :func:`speculative_generate` produced.

    Attributes:
        tokens: the greedy tokens (ints): ``new_tokens`` of them, fewer when an ``eos_token_id`` stopped it.
        rounds: draft-and-verify rounds run (the first token comes from the prefill, outside any round).
        drafted: draft tokens proposed by sparse decode, over all rounds.
        accepted: draft tokens the exact step confirmed.
        ms_per_token: with ``time_after=n``: wall time per token of the rounds that started after ``n`` tokens
            (synchronised at both ends; ``None`` otherwise or when no round started there).
    """

    tokens: list[int]
    rounds: int
    drafted: int
    accepted: int
    ms_per_token: float | None = None

    @property
    def acceptance(self) -> float | None:
        """``accepted / drafted`` (``None`` when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else None

    @property
    def tokens_per_round(self) -> float | None:
        """Tokens emitted per round (accepted drafts + the exact step's own token); ``None`` without rounds."""
        return (len(self.tokens) - 1) / self.rounds if self.rounds else None


def cache_kwarg(model: Any) -> str:
    """The model forward's cache argument: ``cache`` (transformers >= 5.24) or ``past_key_values``."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - unusual wrappers
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def dynamic_cache(model: Any) -> Any:
    """A fresh ``transformers.DynamicCache`` for ``model`` (sliding-window layers where its config has them)."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # pragma: no cover - older transformers
        return DynamicCache()


def check_draft_tokens(fn: str, draft_tokens: Any) -> int:
    """``draft_tokens`` checked: an int in ``[1, MAX_DECODE_QUERIES - 1]`` (the exact step takes one more query)."""
    from sparseattn.ops.decode import MAX_DECODE_QUERIES

    if isinstance(draft_tokens, bool) or not isinstance(draft_tokens, int) or \
            not 1 <= draft_tokens <= MAX_DECODE_QUERIES - 1:
        raise fail(fn, "draft_tokens", "is out of range (the exact step checks draft_tokens + 1 tokens at once)",
                   f"an int in [1, {MAX_DECODE_QUERIES - 1}]", repr(draft_tokens))
    return draft_tokens


def _check(model: Any, input_ids: Any, new_tokens: Any, draft_tokens: Any, cache: Any) -> Any:
    from sparseattn.integrations.transformers_patch import get_handle

    fn = "speculative_generate"
    handle = get_handle(model)
    route = None if handle is None else handle.decode_route
    if route is None or route.config.mode != "sparse":
        got = "an unpatched model" if handle is None else \
            f"decode={'dense' if route is None else route.config.mode!r}"
        raise fail(fn, "model", "has no sparse decode route", "a model inside patch_model(model, decode='sparse', ...)",
                   got)
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.dtype.is_floating_point \
            or input_ids.dtype == torch.bool:
        got = type(input_ids).__name__ if not isinstance(input_ids, torch.Tensor) else \
            f"{tuple(input_ids.shape)} {input_ids.dtype}"
        raise fail(fn, "input_ids", "must be a 2-D integer tensor", "(1, N) token ids", got)
    if input_ids.shape[0] != 1 or input_ids.shape[1] < 1:
        raise fail(fn, "input_ids", "must hold one non-empty sequence (batch 1: the rounds roll back per sequence)",
                   "shape (1, N) with N >= 1", str(tuple(input_ids.shape)))
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 1:
        raise fail(fn, "new_tokens", "must be a positive integer", "an int >= 1", repr(new_tokens))
    check_draft_tokens(fn, draft_tokens)
    if cache is not None and not isinstance(getattr(cache, "layers", None), list):
        raise fail(fn, "cache", "has no per-layer storage to roll back (the rounds drop rejected drafts)",
                   "a transformers DynamicCache (or None: a fresh one)", type(cache).__name__)
    if cache is not None and cache.get_seq_length() != 0:
        raise fail(fn, "cache", "is not empty (the prompt is prefilled into it)", "an empty cache",
                   f"{cache.get_seq_length()} cached tokens")
    return route


def _layer_kinds(cache: Any) -> list[bool]:
    """Per cache layer: True for a sliding-window layer; refuses layer types the rollback does not know."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    kinds = []
    for layer in cache.layers:
        if type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer):
            raise fail("speculative_generate", "cache", "holds a layer type the rollback does not know",
                       "DynamicLayer / DynamicSlidingWindowLayer layers (a transformers DynamicCache)",
                       type(layer).__name__)
        kinds.append(type(layer) is DynamicSlidingWindowLayer)
    return kinds


def _snapshot(cache: Any) -> list[tuple[Any, Any, Any]]:
    return [(layer.keys, layer.values, getattr(layer, "cumulative_length", None)) for layer in cache.layers]


def _restore(cache: Any, snap: list[tuple[Any, Any, Any]]) -> None:
    for layer, (k, v, n) in zip(cache.layers, snap):
        layer.keys, layer.values = k, v
        if n is not None:
            layer.cumulative_length = n


def _drop_rejected(cache: Any, snap: list[tuple[Any, Any, Any]], sliding: list[bool], fed: int, keep: int) -> None:
    """After an exact step of ``fed`` tokens over the cache ``snap`` describes, keep only its first ``keep``."""
    if keep == fed:
        return
    for layer, (k0, v0, n0), slid in zip(cache.layers, snap, sliding):
        if not slid:
            layer.keys = layer.keys[..., : layer.keys.shape[-2] - (fed - keep), :]
            layer.values = layer.values[..., : layer.values.shape[-2] - (fed - keep), :]
            continue
        w = layer.sliding_window - 1  # what a sliding layer stores (transformers: the last window - 1 entries)
        if layer.keys.shape[-2] < fed:
            raise RuntimeError(f"speculative_generate: a sliding-window layer keeps {layer.keys.shape[-2]} entries, "
                               f"fewer than the {fed} tokens of an exact step; use draft_tokens < {w}")
        nk = layer.keys[..., layer.keys.shape[-2] - fed:, :][..., :keep, :]
        nv = layer.values[..., layer.values.shape[-2] - fed:, :][..., :keep, :]
        layer.keys = torch.cat([k0, nk], dim=-2)[..., -w:, :]
        layer.values = torch.cat([v0, nv], dim=-2)[..., -w:, :]
        layer.cumulative_length = n0 + keep


def _check_length(cache: Any, length: int) -> None:
    if cache.get_seq_length() != length:  # host ints only
        raise RuntimeError(f"speculative_generate: the cache holds {cache.get_seq_length()} tokens after a rollback; "
                           f"expected {length}")


@torch.no_grad()
def speculative_generate(model: Any, input_ids: torch.Tensor, new_tokens: int, *, draft_tokens: int = 4,
                         cache: Any = None, eos_token_id: int | Sequence[int] | None = None,
                         time_after: int | None = None) -> SpeculativeResult:
    """Greedy generation that equals dense greedy decoding, drafted by sparse decode (see the module).

    Args:
        model: a causal LM inside ``patch_model(model, decode="sparse", ...)`` (its page budget, page size,
            backend and layers are the draft's); prefill runs as the patch says (sparse prefill included).
        input_ids: ``(1, N)`` prompt ids (batch 1).
        new_tokens: tokens to generate at most.
        eos_token_id: stop after the first emitted token among these ids (it is included); ``None``: no stop.
        draft_tokens: sparse steps per round (``1 .. 63``); the exact step checks ``draft_tokens + 1`` tokens.
        cache: an empty ``DynamicCache`` (default: a fresh one); left holding prompt + tokens except the last.
        time_after: time the rounds that start once this many tokens exist (``ms_per_token``; two syncs).

    Returns:
        :class:`SpeculativeResult` (tokens, rounds, drafted, accepted).
    """
    route = _check(model, input_ids, new_tokens, draft_tokens, cache)
    eos = _check_eos(eos_token_id)
    if time_after is not None and (isinstance(time_after, bool) or not isinstance(time_after, int) or time_after < 1):
        raise fail("speculative_generate", "time_after", "must be a positive integer or None",
                   "tokens before the timed rounds, e.g. 8", repr(time_after))
    if cache is None:
        cache = dynamic_cache(model)
    kw: dict[str, Any] = {cache_kwarg(model): cache, "use_cache": True}
    keep_arg = "logits_to_keep" in inspect.signature(model.forward).parameters
    if keep_arg:
        kw["logits_to_keep"] = 1
    out = model(input_ids=input_ids, **kw)
    last = out.logits[:, -1].argmax(-1, keepdim=True)  # (1, 1): emitted, not yet in the cache
    length = input_ids.shape[1]
    sliding = _layer_kinds(cache)
    _check_length(cache, length)
    tokens = [int(last)]  # host copies of the emitted tokens: one read here, then one per round
    count, rounds, drafted, accepted = 1, 0, 0, 0
    t0, timed_from = None, 0
    stop = tokens[0] in eos
    while count < new_tokens and not stop:
        if time_after is not None and t0 is None and count >= time_after:
            cuda_sync(input_ids.device)
            t0, timed_from = time.perf_counter(), count
        g = min(draft_tokens, new_tokens - count - 1)  # a round emits at most g + 1 tokens
        drafts = []
        x = last
        snap = _snapshot(cache)
        for _ in range(g):
            x = model(input_ids=x, **kw).logits[:, -1].argmax(-1, keepdim=True)
            drafts.append(x)
        if g:
            _restore(cache, snap)
            route.note_crop(cache, length)
        feed = torch.cat([last, *drafts], dim=1)  # (1, g + 1)
        if keep_arg:
            kw["logits_to_keep"] = g + 1
        route.exact = True
        try:
            logits = model(input_ids=feed, **kw).logits
        finally:
            route.exact = False
            if keep_arg:
                kw["logits_to_keep"] = 1
        target = logits[0, -(g + 1):].argmax(-1)  # target[i]: the exact next token after feed[0, i]
        ok = (feed[0, 1:] == target[:g]).to(target.dtype).cumprod(0).sum().view(1)
        got = torch.cat([ok, target]).tolist()  # the round's one host read: accepted count and the exact tokens
        j, new = got[0], got[1: got[0] + 2]
        hit = next((i for i, t in enumerate(new) if t in eos), None)
        if hit is not None:
            new, stop = new[: hit + 1], True
        tokens.extend(new)
        _drop_rejected(cache, snap, sliding, g + 1, j + 1)
        length += j + 1
        _check_length(cache, length)
        route.note_crop(cache, length)
        last = target[j: j + 1][None]
        count += j + 1
        rounds += 1
        drafted += g
        accepted += j
    ms = None
    if t0 is not None:
        cuda_sync(input_ids.device)
        ms = (time.perf_counter() - t0) * 1e3 / (count - timed_from)
    tokens = tokens[:new_tokens]
    return SpeculativeResult(tokens=tokens, rounds=rounds, drafted=drafted, accepted=accepted, ms_per_token=ms)


def _check_eos(eos_token_id: Any) -> frozenset[int]:
    if eos_token_id is None:
        return frozenset()
    ids = [eos_token_id] if isinstance(eos_token_id, int) else eos_token_id
    if isinstance(eos_token_id, bool) or not isinstance(ids, (list, tuple, set, frozenset)) or not ids or \
            any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in ids):
        raise fail("speculative_generate", "eos_token_id", "must be a token id or a non-empty list of them",
                   "an int >= 0, a list of such ints, or None", repr(eos_token_id))
    return frozenset(ids)


def cuda_sync(device: torch.device) -> None:
    """Synchronise ``device`` when it is a CUDA device (timing boundaries only)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
