"""Greedy-generation agreement: dense decode vs sparse / kernel decode and the mixed-precision KV cache.

``sparseattn gen-check`` (issue 14's accuracy target): for each prompt length, the same prompt is
generated greedily for ``new_tokens`` tokens by the unpatched model (its own attention, a
``DynamicCache``: the reference) and by each mode:

* ``kernel_decode`` — ``patch_model(decode="kernel")``: decode steps on sparseattn's dense decode kernel;
* ``sparse_decode`` — ``patch_model(decode="sparse", decode_top_pages=..., decode_page_size=...)``: Quest-style;
* ``sparse_spec`` — sparse decode as the draft of lossless speculative decoding
  (:func:`~sparseattn.integrations.speculative.speculative_generate`, ``draft_tokens`` per round, one exact
  step checks them): the tokens are dense greedy decoding's by construction; the rows add how many drafts were
  accepted (no teacher-forced run: it has no meaning there);
* ``sparse_prefill`` — ``patch_model(predictor=...)`` with the model's dense decode (needs a predictor);
* ``mixed_int8`` / ``mixed_fp8`` — :class:`~sparseattn.state.kv_cache.MixedKVCache` (recent ``window`` tokens
  in the model dtype, the rest INT8 / FP8) with ``enable_mixed_cache`` (prefill dense: the cache quantizes
  tokens after they leave the window).

With a predictor (``predictor`` / ``pattern`` / ``tuned``) the ``kernel_decode`` and ``sparse_decode`` modes
use sparse prefill too. Each mode's greedy tokens are compared position by position with the reference's:
``agreement`` is the share of the ``new_tokens`` positions with the same token, ``first_divergence`` the
first position that differs (``None``: identical). Generation is free-running (each run feeds back its own
tokens), so one early divergence usually changes the rest. A mode passes a length when its mean agreement
over the samples is at least ``target`` (default :data:`~sparseattn.eval.defaults.GEN_CHECK_TARGET`).

A second metric (``teacher_forced=True``, the default): **teacher-forced agreement**, the share of steps whose
argmax equals the reference's token when the mode is fed the *reference's* tokens (step ``i`` sees the dense
model's tokens ``0 .. i-1``). It measures each step's decision without the compounding after the first
divergence; the verdict stays on the free-running agreement (issue 14's metric). A mode whose free-running
tokens all equal the reference's has fed itself exactly the reference's tokens, so its teacher-forced
agreement is 1 without a second run.

**Near ties and the floor.** The dense run also records each step's logit margin (top-1 minus top-2 logit).
Every teacher-forced mismatch is reported with dense's margin at that step (``tf_mismatch_margins``), and
the summary gives the largest such margin and the share of all dense steps at or below it: a mode whose
mismatches all sit on near-ties that are common among dense's own steps flips on rounding-sized
differences. With ``kernel_decode`` among the modes and a dense prefill, its teacher-forced mismatches are
the **floor** (:data:`FLOOR_MODE`: exact attention through our decode kernel, which differs from the
model's SDPA by rounding only), given beside every mode's count (``floor_tf_mismatches``). In half precision
greedy decoding flips on such ties at long contexts, so free-running agreement can miss the target even
for the exact path (Gemma-3-270M at 16K, BENCHMARKS.md); read the modes against the floor.

Sparse-decode budget: ``top_pages`` (an int: pages, a fixed budget; a fraction: of the sequence's pages) or
``token_budget`` (keys; Quest's fixed token budget, applied as ``ceil(token_budget / page_size)`` pages).

Timing (a bonus): milliseconds per generated token over the decode steps after ``_TIMING_WARMUP`` (one
host sync before and after the timed steps; the first steps compile kernels and build page summaries).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from sparseattn._validation import fail
from sparseattn.integrations.speculative import cache_kwarg as _cache_kwarg
from sparseattn.integrations.speculative import check_draft_tokens
from sparseattn.integrations.speculative import cuda_sync as _sync
from sparseattn.integrations.speculative import dynamic_cache as _dynamic_cache

__all__ = ["GEN_CHECK_MODES", "GenCheckResult", "run_gen_check", "write_gen_check_report", "greedy_generate",
           "token_agreement"]

GEN_CHECK_MODES = ("kernel_decode", "sparse_decode", "sparse_spec", "sparse_prefill", "mixed_int8", "mixed_fp8")
FLOOR_MODE = "kernel_decode"  # exact attention through our decode kernel: with dense prefill, the rounding floor
_TIMING_WARMUP = 8


def token_agreement(ref: Sequence[int], got: Sequence[int]) -> tuple[float, int | None]:
    """``(share of positions with the same token, first differing position or None)`` over ``len(ref)`` positions."""
    n = len(ref)
    if n == 0:
        return 1.0, None
    same = [i < len(got) and got[i] == ref[i] for i in range(n)]
    first = next((i for i, s in enumerate(same) if not s), None)
    return sum(same) / n, first


@torch.no_grad()
def greedy_generate(model: Any, ids: torch.Tensor, new_tokens: int, cache: Any,
                    forced: Sequence[int] | None = None, *, return_margins: bool = False) -> Any:
    """Greedy tokens after ``ids (1, N)`` with ``cache`` (no EOS stop, no logits processors).

    ``forced``: teacher forcing — step ``i >= 1`` is fed ``forced[i - 1]`` (e.g. the dense model's tokens)
    instead of the previous step's argmax; the returned tokens are still each step's argmax.
    ``return_margins``: also return each step's **logit margin**, the top-1 logit minus the top-2 logit (float,
    read once at the end with the tokens): how close the step's greedy choice was to a tie.

    Returns:
        ``(tokens, ms_per_token)``: ``new_tokens`` ints (one host read at the end) and the mean time of the
        decode steps after the first ``_TIMING_WARMUP`` (``None`` when there are none); with ``return_margins``
        ``(tokens, ms_per_token, margins)``.
    """
    kw: dict[str, Any] = {_cache_kwarg(model): cache, "use_cache": True}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kw["logits_to_keep"] = 1  # no (N, vocab) logits for the prompt
    if forced is not None and len(forced) < new_tokens - 1:
        raise fail("greedy_generate", "forced", "is too short", f">= {new_tokens - 1} tokens", str(len(forced)))
    fed = None if forced is None else torch.tensor([list(forced)], dtype=ids.dtype, device=ids.device)
    margins: list[torch.Tensor] = []

    def pick(logits: torch.Tensor) -> torch.Tensor:
        if return_margins:
            top2 = logits.float().topk(2, dim=-1).values
            margins.append(top2[:, 0] - top2[:, 1])
        return logits.argmax(-1, keepdim=True)

    out = model(input_ids=ids, **kw)
    nxt = pick(out.logits[:, -1])
    toks = [nxt]
    t0 = None
    for i in range(1, new_tokens):
        if i == _TIMING_WARMUP:
            _sync(ids.device)
            t0 = time.perf_counter()
        out = model(input_ids=nxt if fed is None else fed[:, i - 1:i], **kw)
        nxt = pick(out.logits[:, -1])
        toks.append(nxt)
    ms = None
    if t0 is not None:
        _sync(ids.device)
        ms = (time.perf_counter() - t0) * 1e3 / (new_tokens - _TIMING_WARMUP)
    tokens = [int(x) for x in torch.cat(toks, dim=1)[0].tolist()]
    if return_margins:
        return tokens, ms, [float(m) for m in torch.cat(margins).tolist()]
    return tokens, ms


@dataclasses.dataclass
class GenCheckResult:
    """What :func:`run_gen_check` measured: ``config``, per-sample ``rows``, per (mode, length) ``summary``,
    and the run's ``environment`` record (:func:`sparseattn.eval.env.environment`)."""

    config: dict[str, Any]
    rows: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    passed: bool
    environment: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config, "summary": self.summary, "rows": self.rows, "passed": self.passed,
                "environment": self.environment}

    def table(self) -> str:
        """Markdown table of the summary (one row per mode and length)."""
        head = ["| mode | length | agreement (mean) | min | first divergence | teacher-forced (mean) | "
                "teacher-forced mismatches (floor) | largest dense margin at a mismatch | "
                "ms/token (mode / dense) | KV bytes saved | verdict |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        lines = []
        for s in self.summary:
            fd = "none" if s["first_divergence"] is None else str(s["first_divergence"])
            ms = "n/a" if s["ms_per_token"] is None else f"{s['ms_per_token']:.2f} / {s['dense_ms_per_token']:.2f}"
            saved = "" if s.get("bytes_saved") is None else f"{s['bytes_saved']:,} ({s['bytes_ratio']:.3f} of fp)"
            tf = "n/a" if s.get("tf_agreement") is None else f"{s['tf_agreement']:.1%}"
            mm = "n/a"
            if s.get("tf_mismatches") is not None:
                fl = s.get("floor_tf_mismatches")
                mm = f"{s['tf_mismatches']} of {s['tf_steps']}" + ("" if fl is None else f" ({fl})")
            mg = "" if s.get("tf_mismatch_margin_max") is None else (
                f"{s['tf_mismatch_margin_max']:.3g} ({s['dense_share_at_or_below']:.1%} of dense steps at or below)")
            lines.append(f"| {s['mode']} | {s['length']} | {s['agreement']:.1%} | {s['min_agreement']:.1%} | {fd} | "
                         f"{tf} | {mm} | {mg} | {ms} | {saved} | {'PASS' if s['passed'] else 'FAIL'} |")
        return "\n".join(head + lines)


def _near_tie_summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Teacher-forced mismatches of ``rows`` (one mode and length) and how near a tie the dense step was there.

    ``tf_mismatches`` / ``tf_steps``: mismatched steps over all samples; ``tf_mismatch_margin_max``: the largest
    dense logit margin (top-1 minus top-2) at a mismatch (``None`` without mismatches); ``dense_share_at_or_below``:
    the share of all dense steps of these samples whose margin is at most that value (how rare such near-ties are).
    """
    steps = sum(len(r["dense_margins"]) for r in rows)
    miss = [m for r in rows for m in r["tf_mismatch_margins"]]
    out: dict[str, Any] = {"tf_mismatches": len(miss), "tf_steps": steps, "tf_mismatch_margin_max": None,
                           "dense_share_at_or_below": None}
    if miss and steps:
        top = max(miss)
        out["tf_mismatch_margin_max"] = top
        out["dense_share_at_or_below"] = sum(m <= top for r in rows for m in r["dense_margins"]) / steps
    return out


def _log(msg: str, on: bool) -> None:
    if on:
        print(f"[gen-check] {msg}", file=sys.stderr, flush=True)


def _check_modes(modes: Sequence[str], has_predictor: bool) -> list[str]:
    fn = "gen_check"
    if not modes:
        raise fail(fn, "modes", "is empty", f"some of {list(GEN_CHECK_MODES)}", repr(list(modes)))
    out = []
    for m in modes:
        if m not in GEN_CHECK_MODES:
            raise fail(fn, "modes", f"has an unknown mode {m!r}", f"some of {list(GEN_CHECK_MODES)}", repr(list(modes)))
        if m not in out:
            out.append(m)
    if "sparse_prefill" in out and not has_predictor:
        raise fail(fn, "modes", "has sparse_prefill without a predictor", "--predictor, --pattern or --tuned with it",
                   "no predictor")
    return out


@contextlib.contextmanager
def decode_mode(model: Any, mode: str, *, patch_kw: dict[str, Any] | None = None, top_pages: int | float = 0.1,
                page_size: int = 16, mixed_window: int = 128, decode_backend: str = "auto",
                decode_layers: list[int] | None = None, mixed_smooth_keys: bool = False,
                mixed_sink_tokens: int | None = None) -> Iterator[tuple[Any, Any]]:
    """The model set up for one of :data:`GEN_CHECK_MODES`: yields ``(cache, handle)``, the cache to generate with
    and the ``patch_model`` handle (``None`` for the mixed modes, whose cache is also their report). The model is
    left as it was found on exit. ``patch_kw``: the sparse prefill (``predictor`` / ``pattern`` / ``tuned``)."""
    if mode.startswith("mixed_"):
        from sparseattn.integrations.mixed_cache_attention import enable_mixed_cache
        from sparseattn.state.kv_cache import MixedKVCache

        cache = MixedKVCache(model.config, window=mixed_window, quant=mode.split("_", 1)[1],
                             smooth_keys=mixed_smooth_keys,
                             **({} if mixed_sink_tokens is None else {"sink_tokens": mixed_sink_tokens}))
        prev = enable_mixed_cache(model)
        try:
            yield cache, None
        finally:
            model.set_attn_implementation(prev)
        return
    from sparseattn.integrations import patch_model

    kw = dict(patch_kw or {})
    if mode == "kernel_decode":
        kw.update(decode="kernel", decode_backend=decode_backend, decode_layers=decode_layers)
    elif mode in ("sparse_decode", "sparse_spec"):
        kw.update(decode="sparse", decode_top_pages=top_pages, decode_page_size=page_size,
                  decode_backend=decode_backend, decode_layers=decode_layers)
    with patch_model(model, **kw) as handle:
        yield _dynamic_cache(model), handle


def _run_mode(model: Any, mode: str, ids: torch.Tensor, new_tokens: int, *, forced: Sequence[int] | None = None,
              draft_tokens: int = 4, **opts: Any) -> dict[str, Any]:
    """One generation in ``mode`` (teacher-forced with ``forced``; ``opts``: :func:`decode_mode`'s)."""
    spec = None
    with decode_mode(model, mode, **opts) as (cache, handle):
        if mode == "sparse_spec":
            from sparseattn.integrations.speculative import speculative_generate

            r = speculative_generate(model, ids, new_tokens, draft_tokens=draft_tokens, cache=cache,
                                     time_after=_TIMING_WARMUP if new_tokens > _TIMING_WARMUP else None)
            toks, ms = r.tokens, r.ms_per_token
            spec = {"draft_tokens": draft_tokens, "rounds": r.rounds, "drafted": r.drafted, "accepted": r.accepted,
                    "acceptance": r.acceptance, "tokens_per_round": r.tokens_per_round}
        else:
            toks, ms = greedy_generate(model, ids, new_tokens, cache, forced)
        if handle is not None:
            rep = handle.sparsity_report()
    if handle is None:
        mem = cache.memory_report()
        mem.pop("per_layer", None)
        # layer calls per route (decode steps on the decode kernels, or the state operator) and why a decode
        # step did not take the decode route
        return {"tokens": toks, "ms_per_token": ms, "memory": mem, "counts": dict(cache.attention_counts),
                "mixed_decode_fallbacks": dict(cache.decode_fallbacks)}
    res = {"tokens": toks, "ms_per_token": ms, "counts": rep["counts"], "decode": rep["decode"],
           "prefill_density": rep["mean_density"]}
    if spec is not None:
        res["speculative"] = spec
    return res


def run_gen_check(
    model_name: str = "smollm2-135m",
    *,
    lengths: Sequence[int] = (4096, 8192),
    new_tokens: int = 64,
    modes: Sequence[str] = ("sparse_decode", "kernel_decode", "mixed_int8", "mixed_fp8"),
    top_pages: int | float | None = None,
    token_budget: int | None = None,
    page_size: int = 16,
    mixed_window: int = 128,
    mixed_smooth_keys: bool = False,
    mixed_sink_tokens: int | None = None,
    predictor: str | None = None,
    pattern: str | None = None,
    tuned: str | None = None,
    decode_backend: str = "auto",
    decode_layers: Sequence[int] | None = None,
    draft_tokens: int = 4,
    text_files: Sequence[str] | None = None,
    text_dir: str | None = None,
    random_ids: bool = False,
    samples: int = 1,
    seed: int = 0,
    target: float | None = None,
    teacher_forced: bool = True,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    progress: bool = True,
    model: Any = None,
    tokenizer: Any = None,
) -> GenCheckResult:
    """Generate ``new_tokens`` greedy tokens per prompt dense and in each mode; compare (see the module).

    ``model`` / ``tokenizer``: an already loaded model (then ``model_name`` is only a label).
    ``top_pages`` (default 0.1) or ``token_budget`` (keys, ``ceil(token_budget / page_size)`` pages), not both.
    ``teacher_forced``: also measure the teacher-forced agreement (a second run per mode that diverged;
    never for ``sparse_spec``). ``draft_tokens``: ``sparse_spec``'s sparse steps per round.
    ``mixed_smooth_keys``: the mixed cache's K smoothing (``MixedKVCache(smooth_keys=...)``; ``False``: the
    behaviour before it, for comparisons). ``mixed_sink_tokens``: the mixed cache's ``sink_tokens`` (the first
    tokens kept in the model dtype); ``None``: the cache's default.

    Raises:
        ValueError: an unknown mode, ``sparse_prefill`` without a predictor, a bad ``top_pages`` /
            ``page_size`` / ``mixed_window``, a prompt + new tokens beyond the model's context, too little text.
    """
    from sparseattn.eval.defaults import GEN_CHECK_TARGET
    from sparseattn.integrations.decode_route import DecodeConfig

    fn = "gen_check"
    has_pred = predictor is not None or pattern is not None or tuned is not None
    modes = _check_modes(modes, has_pred)
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 1:
        raise fail(fn, "new_tokens", "must be a positive integer", "an int >= 1 (64 for the issue's target)",
                   repr(new_tokens))
    if isinstance(mixed_window, bool) or not isinstance(mixed_window, int) or mixed_window < 1:
        raise fail(fn, "mixed_window", "must be a positive integer", "an int >= 1 (recent tokens kept)",
                   repr(mixed_window))
    if token_budget is not None:
        if top_pages is not None:
            raise fail(fn, "token_budget", "and top_pages are both given", "one sparse-decode budget",
                       f"token_budget={token_budget!r}, top_pages={top_pages!r}")
        if isinstance(token_budget, bool) or not isinstance(token_budget, int) or token_budget < 1:
            raise fail(fn, "token_budget", "must be a positive integer", "an int >= 1 (keys per KV head, e.g. 1024)",
                       repr(token_budget))
        if isinstance(page_size, int) and not isinstance(page_size, bool) and page_size > 0:
            top_pages = -(-token_budget // page_size)
    if top_pages is None:
        top_pages = 0.1
    if not isinstance(teacher_forced, bool):
        raise fail(fn, "teacher_forced", "must be a bool", "True or False", repr(teacher_forced))
    if not isinstance(mixed_smooth_keys, bool):
        raise fail(fn, "mixed_smooth_keys", "must be a bool", "True or False", repr(mixed_smooth_keys))
    if mixed_sink_tokens is not None and (isinstance(mixed_sink_tokens, bool) or not isinstance(mixed_sink_tokens, int)
                                          or mixed_sink_tokens < 0):
        raise fail(fn, "mixed_sink_tokens", "must be a non-negative integer", "an int >= 0 or None (the cache's default)",
                   repr(mixed_sink_tokens))
    if mixed_sink_tokens is None:
        import inspect

        from sparseattn.state.kv_cache import MixedKVCache

        mixed_sink_tokens = inspect.signature(MixedKVCache.__init__).parameters["sink_tokens"].default
    DecodeConfig(mode="sparse", top_pages=top_pages, page_size=page_size, backend=decode_backend)  # value checks
    check_draft_tokens(fn, draft_tokens)
    target = GEN_CHECK_TARGET if target is None else float(target)
    if not 0.0 <= target <= 1.0:
        raise fail(fn, "target", "is out of range", "a share in [0, 1]", repr(target))
    lengths = [int(n) for n in lengths]
    if not lengths or min(lengths) < 2:
        raise fail(fn, "lengths", "must be prompt lengths >= 2", "e.g. 4096,8192", repr(lengths))

    t_start = time.perf_counter()
    if model is None:
        from sparseattn.eval.bench_model import load_model

        _log(f"loading {model_name} ({str(dtype).replace('torch.', '')}, {device})", progress)
        model, tokenizer = load_model(model_name, dtype=dtype, device=device, need_tokenizer=not random_ids)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and max(lengths) + new_tokens > limit:
        raise fail(fn, "lengths", "plus new_tokens exceed the model's context (max_position_embeddings)",
                   f"length + {new_tokens} <= {limit}, i.e. lengths <= {limit - new_tokens}",
                   f"{max(lengths)} + {new_tokens}")
    patch_kw: dict[str, Any] = {}
    if tuned is not None:
        patch_kw["tuned"] = tuned
    elif pattern is not None:
        patch_kw["pattern"] = pattern
    elif predictor is not None:
        patch_kw["predictor"] = predictor
    from sparseattn.eval.texts import sample_ids

    dev = torch.device(device)
    rows: list[dict[str, Any]] = []
    source = None
    # every length's prompts first: a source too short for a later length fails before any generation runs
    prompts = []
    for n in lengths:
        ids_list, names, source = sample_ids(model, tokenizer, seq_len=n, samples=samples, text_files=text_files,
                                             text_dir=text_dir, random_ids=random_ids or tokenizer is None, seed=seed)
        prompts.append((n, ids_list, names))
    for n, ids_list, names in prompts:
        for si, ids in enumerate(ids_list):
            ids = ids.to(dev)
            t0 = time.perf_counter()
            ref, ref_ms, ref_margins = greedy_generate(model, ids, new_tokens, _dynamic_cache(model),
                                                       return_margins=True)
            _log(f"length {n} sample {si}: dense {new_tokens} tokens in {time.perf_counter() - t0:.1f} s", progress)
            for mode in modes:
                t0 = time.perf_counter()
                res = _run_mode(model, mode, ids, new_tokens, patch_kw=patch_kw, top_pages=top_pages,
                                page_size=page_size, mixed_window=mixed_window, decode_backend=decode_backend,
                                decode_layers=None if decode_layers is None else list(decode_layers),
                                mixed_smooth_keys=mixed_smooth_keys, mixed_sink_tokens=mixed_sink_tokens,
                                draft_tokens=draft_tokens)
                agree, first = token_agreement(ref, res["tokens"])
                tf_agree: float | None = None
                tf_tokens: list[int] | None = None
                if teacher_forced and mode != "sparse_spec":  # speculation's tokens are the exact step's: no forcing
                    if first is None:  # identical tokens: the free run was fed exactly the reference's tokens
                        tf_agree, tf_tokens = 1.0, list(res["tokens"])
                    else:
                        tf = _run_mode(model, mode, ids, new_tokens, patch_kw=patch_kw, top_pages=top_pages,
                                       page_size=page_size, mixed_window=mixed_window, decode_backend=decode_backend,
                                       decode_layers=None if decode_layers is None else list(decode_layers),
                                       forced=ref, mixed_smooth_keys=mixed_smooth_keys,
                                       mixed_sink_tokens=mixed_sink_tokens)
                        tf_tokens = tf["tokens"]
                        tf_agree = token_agreement(ref, tf_tokens)[0]
                tf_miss = None if tf_tokens is None else [i for i, t in enumerate(ref) if tf_tokens[i] != t]
                row = {"mode": mode, "length": n, "sample": si, "documents": names[si], "agreement": agree,
                       "first_divergence": first, "tf_agreement": tf_agree, "tf_tokens": tf_tokens,
                       "tf_mismatches": tf_miss,
                       "tf_mismatch_margins": None if tf_miss is None else [ref_margins[i] for i in tf_miss],
                       "dense_margins": ref_margins,
                       "ms_per_token": res["ms_per_token"], "dense_ms_per_token": ref_ms,
                       "tokens": res["tokens"], "dense_tokens": ref,
                       **{k: v for k, v in res.items() if k not in ("tokens", "ms_per_token")}}
                if tokenizer is not None:
                    row["text"] = tokenizer.decode(res["tokens"])
                    row["dense_text"] = tokenizer.decode(ref)
                rows.append(row)
                tf_s = "" if tf_agree is None else f", teacher-forced {tf_agree:.1%}"
                _log(f"length {n} sample {si}: {mode} agreement {agree:.1%} (first divergence "
                     f"{'none' if first is None else first}{tf_s}) in {time.perf_counter() - t0:.1f} s", progress)
            del ids
    summary = []
    for mode in modes:
        for n in lengths:
            rs = [r for r in rows if r["mode"] == mode and r["length"] == n]
            ag = [r["agreement"] for r in rs]
            firsts = [r["first_divergence"] for r in rs if r["first_divergence"] is not None]
            ms = [r["ms_per_token"] for r in rs if r["ms_per_token"] is not None]
            dms = [r["dense_ms_per_token"] for r in rs if r["dense_ms_per_token"] is not None]
            s: dict[str, Any] = {"mode": mode, "length": n, "samples": len(rs), "agreement": sum(ag) / len(ag),
                                 "min_agreement": min(ag), "first_divergence": min(firsts) if firsts else None,
                                 "ms_per_token": sum(ms) / len(ms) if ms else None,
                                 "tf_agreement": None, "tf_min_agreement": None,
                                 "dense_ms_per_token": sum(dms) / len(dms) if dms else None}
            tfs = [r["tf_agreement"] for r in rs if r["tf_agreement"] is not None]
            if tfs:
                s["tf_agreement"], s["tf_min_agreement"] = sum(tfs) / len(tfs), min(tfs)
                s.update(_near_tie_summary([r for r in rs if r["tf_mismatches"] is not None]))
            mem = [r["memory"] for r in rs if "memory" in r]
            if mem:
                s["bytes_saved"] = mem[-1]["bytes_saved"]
                s["bytes_ratio"] = mem[-1]["ratio"]
            fb: dict[str, int] = {}
            for r in rs:
                for k, v in (r.get("decode") or {}).get("fallbacks", {}).items():
                    fb[k] = fb.get(k, 0) + v
            if fb:
                s["decode_fallbacks"] = fb
            sp = [r["speculative"] for r in rs if "speculative" in r]
            if sp:
                drafted = sum(x["drafted"] for x in sp)
                s["speculative"] = {"draft_tokens": sp[0]["draft_tokens"], "drafted": drafted,
                                    "accepted": sum(x["accepted"] for x in sp),
                                    "acceptance": sum(x["accepted"] for x in sp) / drafted if drafted else None,
                                    "tokens_per_round": (sum(len(r["tokens"]) - 1 for r in rs)
                                                         / max(1, sum(x["rounds"] for x in sp)))}
            s["passed"] = s["agreement"] >= target
            summary.append(s)
    floor_mode = FLOOR_MODE if (FLOOR_MODE in modes and not patch_kw) else None
    for s in summary:  # the same length's exact-attention decode (our kernel, dense prefill): the bf16 floor
        fl = next((f for f in summary if f["mode"] == floor_mode and f["length"] == s["length"]), None)
        s["floor_mode"] = floor_mode
        s["floor_tf_mismatches"] = None if fl is None else fl.get("tf_mismatches")
    config = {"model": model_name, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
              "lengths": lengths, "new_tokens": new_tokens, "modes": modes, "samples": samples, "seed": seed,
              "top_pages": top_pages, "token_budget": token_budget, "page_size": page_size,
              "mixed_window": mixed_window, "mixed_smooth_keys": mixed_smooth_keys,
              "mixed_sink_tokens": mixed_sink_tokens, "teacher_forced": teacher_forced,
              "decode_backend": decode_backend, "decode_layers": None if decode_layers is None else list(decode_layers),
              "draft_tokens": draft_tokens,
              "prefill": patch_kw or "dense", "source": source, "target": target,
              "timing": f"ms per generated token over decode steps {_TIMING_WARMUP}..{new_tokens - 1} (free-running)",
              "seconds": time.perf_counter() - t_start}
    from sparseattn.eval.env import environment

    return GenCheckResult(config=config, rows=rows, summary=summary, passed=all(s["passed"] for s in summary),
                          environment=environment(device))


def write_gen_check_report(res: GenCheckResult, out_dir: str | Path) -> dict[str, Path]:
    """Write ``gen_check.json`` and ``gen_check.md`` into ``out_dir``."""
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "gen_check.json", "md": out / "gen_check.md"}
    paths["json"].write_text(json.dumps(res.to_dict(), indent=2))
    c = res.config
    md = ["# sparseattn gen-check: greedy generation vs dense", "",
          f"- model `{c['model']}` ({c['dtype']}, {c['device']}); prompts: {c['source']}; {c['samples']} sample(s) per "
          f"length; {c['new_tokens']} new tokens, greedy, free-running (the verdict); teacher-forced agreement "
          f"(each step fed the dense tokens): {'measured' if c.get('teacher_forced') else 'not measured'}",
          f"- prefill: {c['prefill']}; sparse decode: top_pages {c['top_pages']}"
          f"{'' if c.get('token_budget') is None else ' (token budget ' + str(c['token_budget']) + ')'}, "
          f"page size {c['page_size']}; decode "
          f"backend {c['decode_backend']}; decode layers {c['decode_layers'] or 'all'}; mixed cache window {c['mixed_window']}"
          f"{'' if c.get('mixed_smooth_keys', True) else ' (K smoothing off)'}"
          f"{'' if c.get('mixed_sink_tokens') is None else ', sink tokens ' + str(c['mixed_sink_tokens'])}",
          f"- target: agreement >= {c['target']:.0%} of positions (mean over samples); overall "
          f"**{'PASS' if res.passed else 'FAIL'}**; run {c['seconds']:.0f} s",
          f"- timing: {c['timing']}",
          "- teacher-forced mismatches: steps whose argmax differs from dense's when fed dense's tokens, over all "
          "samples; in parentheses the floor's count"
          + ("" if not res.summary or res.summary[0].get("floor_mode") is None else
             f" ({res.summary[0]['floor_mode']}: exact attention through our decode kernel, dense prefill)")
          + "; the margin column is dense's top-1 minus top-2 logit at the mismatched steps (its largest) and the "
          "share of dense's own steps with a margin at or below it", "", res.table(), ""]
    sp = [s for s in res.summary if s.get("speculative")]
    if sp:
        md += ["Speculative decoding (`sparse_spec`: sparse decode drafts, one exact step checks them):", ""]
        for s in sp:
            x = s["speculative"]
            acc = "n/a" if x["acceptance"] is None else f"{x['acceptance']:.1%}"
            md.append(f"- {s['length']}: {x['accepted']} of {x['drafted']} drafts accepted ({acc}), "
                      f"{x['tokens_per_round']:.2f} tokens per round of {x['draft_tokens']} drafts + 1 exact step")
        md.append("")
    fb = [s for s in res.summary if s.get("decode_fallbacks")]
    if fb:
        md += ["Decode calls handed to the model's own attention (by reason):", ""]
        md += [f"- {s['mode']} @ {s['length']}: {s['decode_fallbacks']}" for s in fb]
        md.append("")
    md += ["| mode | length | sample | agreement | first divergence | teacher-forced | route counts |",
           "|---|---|---|---|---|---|---|"]
    for r in res.rows:
        counts = r.get("counts")
        cs = "" if counts is None else ", ".join(f"{k} {v}" for k, v in counts.items() if v)
        tf = "n/a" if r.get("tf_agreement") is None else f"{r['tf_agreement']:.1%}"
        md.append(f"| {r['mode']} | {r['length']} | {r['sample']} | {r['agreement']:.1%} | "
                  f"{'none' if r['first_divergence'] is None else r['first_divergence']} | {tf} | {cs} |")
    paths["md"].write_text("\n".join(md) + "\n")
    return paths
