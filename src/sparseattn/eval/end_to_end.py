"""End-to-end accuracy: the same model and inputs, dense vs sparse prefill attention.

:func:`evaluate` is the library behind ``sparseattn eval``. For each sample (``seq_len`` tokens of
real text) it runs

1. the unpatched model (dense attention) — prefill logits, then greedy generation with the cache;
2. the same again (self-check: must give cosine 1.0 and 100 % agreement, else the pipeline is
   non-deterministic and no other number in the report means anything);
3. the model patched with the sparse configuration (:func:`sparseattn.integrations.patch_model`) —
   prefill is block-sparse, decode steps are dense over the cache;

and compares the prefill logits over the last ``score_last`` positions (logits cosine, relative
L1, top-1 agreement, top-5 overlap, KL(dense‖sparse) in nats) and the greedy continuations
(identical-prefix length over ``gen_tokens`` new tokens). The verdict applies
:data:`sparseattn.eval.defaults.EVAL_THRESHOLDS` to the means over samples.

``compare_random=True`` also runs the predictor on the first sample's captured Q/K of every
sparse layer and on Gaussian tensors of the same shapes (same mean / std), reporting the
density each gets and the attention-output error: structure in real attention is what lets a
data-dependent predictor skip blocks.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from sparseattn._validation import check_positive_int, fail
from sparseattn.eval.env import environment
from sparseattn.eval.defaults import DEFAULT_GEN_TOKENS, DEFAULT_PREDICTOR_SPEC, DEFAULT_SAMPLES, DEFAULT_SEQ_LEN, \
    EVAL_THRESHOLDS

__all__ = ["EvalResult", "evaluate", "write_report", "logits_metrics", "greedy_generate", "prefix_agreement"]

_METRICS = ("logits_cosine", "logits_rel_l1", "top1_agreement", "top5_overlap", "kl_dense_sparse",
            "gen_prefix_len", "gen_prefix_fraction")


# --------------------------------------------------------------------------- metrics
@torch.no_grad()
def logits_metrics(sparse: torch.Tensor, dense: torch.Tensor, *, chunk: int = 256) -> dict[str, float]:
    """Compare two logits tensors ``(N, V)`` position by position (in float64, chunked).

    Returns:
        ``logits_cosine`` (flattened), ``logits_rel_l1`` (sum|s-d| / sum|d|), ``top1_agreement``,
        ``top5_overlap`` (mean |top5(s) ∩ top5(d)| / 5), ``kl_dense_sparse`` (mean over positions of
        KL(softmax(d) ‖ softmax(s)), nats).
    """
    if sparse.shape != dense.shape or sparse.dim() != 2:
        raise fail("logits_metrics", "sparse", "must match dense and be (N, V)", f"shape {tuple(dense.shape)}",
                   f"shape {tuple(sparse.shape)}")
    dot = ns = nd = l1 = l1d = kl = 0.0
    top1 = top5 = 0.0
    n = sparse.shape[0]
    for lo in range(0, n, chunk):
        s = sparse[lo:lo + chunk].to(torch.float64)
        d = dense[lo:lo + chunk].to(torch.float64)
        dot += float((s * d).sum())
        ns += float((s * s).sum())
        nd += float((d * d).sum())
        l1 += float((s - d).abs().sum())
        l1d += float(d.abs().sum())
        ld, ls = torch.log_softmax(d, -1), torch.log_softmax(s, -1)
        kl += float((ld.exp() * (ld - ls)).sum(-1).clamp(min=0).sum())
        top1 += float((s.argmax(-1) == d.argmax(-1)).sum())
        ts, td = s.topk(5, -1).indices, d.topk(5, -1).indices
        top5 += float((ts[:, :, None] == td[:, None, :]).any(-1).sum(-1).to(torch.float64).sum() / 5)
    cos = 1.0 if ns == 0 and nd == 0 else (dot / math.sqrt(ns * nd) if ns > 0 and nd > 0 else 0.0)
    return {"logits_cosine": cos, "logits_rel_l1": (l1 / l1d) if l1d > 0 else (0.0 if l1 == 0 else math.inf),
            "top1_agreement": top1 / n, "top5_overlap": top5 / n, "kl_dense_sparse": kl / n}


def prefix_agreement(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the identical prefix of two token sequences."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@torch.no_grad()
def _cache_name(out: Any) -> str:
    """The output's (and the forward's) cache name: transformers >= 5.24 says ``cache`` (``past_key_values`` warns
    there), older ones ``past_key_values``."""
    return "cache" if "cache" in getattr(out, "keys", lambda: ())() or hasattr(type(out), "cache") else "past_key_values"


def greedy_generate(model: Any, ids: torch.Tensor, *, gen_tokens: int, score_last: int,
                    stop_ids: Collection[int] = ()) -> dict[str, Any]:
    """Prefill ``ids`` (logits of the last ``score_last`` positions kept), then ``gen_tokens`` greedy steps.

    With ``stop_ids`` (e.g. the tokenizer's EOS and other special tokens) generation ends once one of them
    is produced (the loop reads each token on the host anyway); without them exactly ``gen_tokens``.

    Returns:
        ``{"logits": (score_last, V) float32 on CPU, "tokens": [int], "prefill_s", "decode_s",
        "peak_mem_bytes" (CUDA only, else None)}``.
    """
    cuda = ids.is_cuda
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = model(ids, use_cache=True, logits_to_keep=score_last)
    logits = out.logits[0].float()
    if cuda:
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    peak = torch.cuda.max_memory_allocated() if cuda else None
    name = _cache_name(out)
    past = getattr(out, name)
    tok = logits[-1].argmax()
    tokens = [int(tok)]
    for _ in range(gen_tokens - 1):
        if tokens[-1] in stop_ids:
            break
        o = model(tok.view(1, 1).to(ids.device), use_cache=True, **{name: past})
        past = getattr(o, name)
        tok = o.logits[0, -1].argmax()
        tokens.append(int(tok))
    if cuda:
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    return {"logits": logits.cpu(), "tokens": tokens, "prefill_s": t1 - t0, "decode_s": t2 - t1, "peak_mem_bytes": peak}


def greedy_generate_batch(model: Any, ids: torch.Tensor, *, gen_tokens: int,
                          stop_ids: Collection[int] = ()) -> dict[str, Any]:
    """:func:`greedy_generate` for a batch of prompts of one length ``ids`` ``(B, T)`` (no padding, no mask).

    Every row decodes greedily; a row's tokens end with (and include) its first token in ``stop_ids``, like
    :func:`greedy_generate`'s; the loop ends when every row has stopped or after ``gen_tokens`` tokens. A stopped
    row keeps being fed its last token so the batch stays rectangular; those tokens are dropped. One host read per
    step for the whole batch (the loop needs the tokens to know when to stop), so a host-bound decode costs about
    what one prompt costs.

    Returns:
        ``{"tokens": [[int]] (one list per row), "prefill_s", "decode_s"}`` (times of the whole batch).
    """
    fn = "greedy_generate_batch"
    if ids.dim() != 2 or ids.shape[0] < 1 or ids.shape[1] < 1:
        raise fail(fn, "ids", "must be a non-empty 2-D batch of token ids", "shape (B, T)", tuple(ids.shape))
    check_positive_int(fn, "gen_tokens", gen_tokens)
    cuda = ids.is_cuda
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = model(ids, use_cache=True, logits_to_keep=1)
    if cuda:
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    name = _cache_name(out)
    past = getattr(out, name)
    tok = out.logits[:, -1].argmax(-1)
    rows: list[list[int]] = [[t] for t in tok.tolist()]
    stops = frozenset(stop_ids)
    done = [r[-1] in stops for r in rows]
    for _ in range(gen_tokens - 1):
        if all(done):
            break
        o = model(tok.view(-1, 1), use_cache=True, **{name: past})
        past = getattr(o, name)
        tok = o.logits[:, -1].argmax(-1)
        for i, t in enumerate(tok.tolist()):
            if not done[i]:
                rows[i].append(t)
                done[i] = t in stops
    if cuda:
        torch.cuda.synchronize()
    return {"tokens": rows, "prefill_s": t1 - t0, "decode_s": time.perf_counter() - t1}


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    vals = [float(v) for v in values]
    if not vals:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    m = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return {"mean": m, "std": sd, "n": len(vals)}


# --------------------------------------------------------------------------- result
@dataclasses.dataclass
class EvalResult:
    """Everything :func:`evaluate` measured (JSON-friendly via :meth:`to_dict`).

    Attributes:
        config: the arguments, model description, text source, predictor description.
        samples: per-sample metrics, timings and generated tokens.
        summary: ``{metric: {"mean", "std", "n"}}`` sparse vs dense.
        self_check: the same for dense vs dense (repeat run).
        layers: per-layer mode and density actually used (averaged over samples).
        verdict: thresholds, per-metric pass/fail and ``passed``.
        random_comparison: per-layer density / output error on real vs random Q/K (or None).
        timings: mean wall times (and GPU peak memory) of dense and sparse.
        environment: versions, device, date.
        attention_map: block-mass maps for the plot (not written to JSON).
    """

    config: dict[str, Any]
    samples: list[dict[str, Any]]
    summary: dict[str, dict[str, float]]
    self_check: dict[str, dict[str, float]] | None
    layers: dict[str, Any]
    verdict: dict[str, Any]
    random_comparison: dict[str, Any] | None
    timings: dict[str, Any]
    environment: dict[str, Any]
    attention_map: dict[str, Any] | None = dataclasses.field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("attention_map", None)
        if self.attention_map is not None:
            d["attention_map"] = {k: v for k, v in self.attention_map.items() if not isinstance(v, torch.Tensor)}
        return d

    def to_markdown(self) -> str:
        from sparseattn.eval.e2e_report import markdown

        return markdown(self)

    def table(self) -> str:
        """The metric table (plain text) that ``sparseattn eval`` prints."""
        from sparseattn.eval.e2e_report import table

        return table(self)


# --------------------------------------------------------------------------- attention map / random comparison
def _block_mass(q: torch.Tensor, k: torch.Tensor, head: int, block: int, scale: float | None) -> torch.Tensor:
    """Softmax probability mass per (query block, key block) of one head, causal. ``[Mb, Nb]`` float32.

    :func:`~sparseattn.predictors.oracle.exact_block_mass` in float64 on batch 0, ``head`` (and its KV head).
    """
    from sparseattn.predictors.oracle import exact_block_mass

    kv_head = head // (q.shape[1] // k.shape[1])
    qh = q[:1, head:head + 1].double()
    kh = k[:1, kv_head:kv_head + 1].double()
    return exact_block_mass(qh, kh, causal=True, block_m=block, block_n=block, scale=scale)[0, 0].float().cpu()


@torch.no_grad()
def _random_comparison(pred: Any, captured: dict[int, dict[str, torch.Tensor]], modes: dict[int, str],
                       scale_of: dict[int, float | None], seed: int) -> dict[str, Any]:
    from sparseattn.ops.masked_sdpa import masked_sdpa_attention
    from sparseattn.eval.metrics import cosine_similarity

    gen = torch.Generator().manual_seed(seed)
    rows: dict[str, Any] = {}
    for kind in ("real", "random"):
        pred.reset()
        for layer in sorted(captured):
            if modes.get(layer) != "sparse":
                continue
            q, k, v = (captured[layer][n] for n in ("q", "k", "v"))
            if kind == "random":
                q, k, v = (torch.randn(t.shape, generator=gen, dtype=torch.float32).to(t.dtype) * t.float().std()
                           + t.float().mean() for t in (q, k, v))
            layout = pred.predict(q, k, causal=True, layer=layer)
            sc = scale_of.get(layer)
            dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=sc,
                                                                     enable_gqa=q.shape[1] != k.shape[1])
            sparse = masked_sdpa_attention(q, k, v, layout, scale=sc)
            r = rows.setdefault(str(layer), {})
            r[f"{kind}_density"] = layout.density(causal=True)
            r[f"{kind}_output_cosine"] = cosine_similarity(sparse, dense)
    dens_real = [r["real_density"] for r in rows.values()]
    dens_rand = [r["random_density"] for r in rows.values()]
    return {"layers": rows, "mean_real_density": _mean_std(dens_real), "mean_random_density": _mean_std(dens_rand),
            "mean_real_output_cosine": _mean_std([r["real_output_cosine"] for r in rows.values()]),
            "mean_random_output_cosine": _mean_std([r["random_output_cosine"] for r in rows.values()])}


# --------------------------------------------------------------------------- evaluate
# --------------------------------------------------------------------------- evaluate: the steps
def _check_arguments(fn: str, seq_len: Any, samples: Any, gen_tokens: Any, timing_repeats: Any,
                     thresholds: Mapping[str, float] | None) -> dict[str, float]:
    """Check the plain arguments; returns the thresholds (:data:`EVAL_THRESHOLDS` with ``thresholds`` applied)."""
    check_positive_int(fn, "seq_len", seq_len)
    check_positive_int(fn, "samples", samples)
    if isinstance(gen_tokens, bool) or not isinstance(gen_tokens, int) or gen_tokens < 0:
        raise fail(fn, "gen_tokens", "must be a non-negative integer", "an int >= 0", repr(gen_tokens))
    if isinstance(timing_repeats, bool) or not isinstance(timing_repeats, int) or timing_repeats < 0:
        raise fail(fn, "timing_repeats", "must be a non-negative integer", "an int >= 0 (0: no timing)",
                   repr(timing_repeats))
    thr = dict(EVAL_THRESHOLDS)
    for key, val in (thresholds or {}).items():
        if key not in thr:
            raise fail(fn, "thresholds", "has an unknown key", f"keys of {sorted(thr)}", repr(key))
        thr[key] = float(val)
    return thr


def _input_samples(fn: str, input_ids: Any, tokenizer: Any, text_files: Any, text_dir: Any, seq_len: int,
                   samples: int) -> tuple[list[torch.Tensor], list[list[str]], str, int]:
    """The token samples: ``(ids_list [(1, N)], document names per sample, text source, N)``."""
    if input_ids is not None:
        ids_list = [t.reshape(1, -1).to(torch.long) for t in input_ids]
        if not ids_list:
            raise fail(fn, "input_ids", "is empty", "at least one sample", "[]")
        names = [["input_ids"] for _ in ids_list]
        seq_len = int(ids_list[0].shape[1])
        if any(int(t.shape[1]) != seq_len for t in ids_list):
            raise fail(fn, "input_ids", "samples differ in length", f"all {seq_len}", [int(t.shape[1]) for t in ids_list])
        return ids_list, names, "explicit input_ids", seq_len
    from sparseattn.eval.texts import documents_for, token_samples

    docs, source = documents_for(text_files, text_dir)
    ids_list, names = token_samples(docs, tokenizer, seq_len=seq_len, samples=samples)
    return ids_list, names, source, seq_len


@dataclasses.dataclass
class _Runs:
    """What the dense/sparse runs over the samples collected (see :func:`_run_samples`)."""

    per_sample: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    densities: dict[int, list[torch.Tensor]] = dataclasses.field(default_factory=dict)
    modes: dict[int, str] = dataclasses.field(default_factory=dict)
    backends: dict[int, set[str]] = dataclasses.field(default_factory=dict)
    sparse_layer_s: dict[int, float] = dataclasses.field(default_factory=dict)
    random_comparison: dict[str, Any] | None = None
    attention_map: dict[str, Any] | None = None


def _attention_map(pred: Any, handle: Any, captured: dict[int, Any], modes: dict[int, str], p_layer: int,
                   plot_head: int, scale: float | None) -> dict[str, Any]:
    """Block mass of the dense run's ``p_layer`` (one head) and the blocks the predictor selects there."""
    c = captured[p_layer]
    head = min(plot_head, c["q"].shape[1] - 1)
    lay = handle.layouts.get(p_layer)
    pred.reset()
    if modes.get(p_layer) == "sparse" and hasattr(pred, "predict"):
        # the predictor on the dense run's q/k of this layer (what it would choose there)
        # (stateful predictors see this layer without the preceding ones: noted in the report)
        lay = pred.predict(c["q"], c["k"], causal=True, layer=p_layer)
    block = lay.block_m if lay is not None else 64
    mass = _block_mass(c["q"], c["k"], head, block, scale)
    sel = lay.to_dense_mask()[0, head].float() if lay is not None else None
    recall = float((mass * sel[: mass.shape[0], : mass.shape[1]]).sum() / mass.sum()) if sel is not None else None
    return {"layer": p_layer, "head": head, "block": block, "mass": mass, "selected": sel,
            "mass_recall": recall, "mode": modes.get(p_layer)}


def _run_samples(model: Any, ids_list: list[torch.Tensor], names: list[list[str]], tokenizer: Any, pred: Any,
                 patch_kw: dict[str, Any], *, gen_tokens: int, n_score: int, self_check: bool, compare_random: bool,
                 p_layer: int, plot_head: int, scale_of: dict[int, Any], seed: int, progress: bool,
                 seq_len: int) -> _Runs:
    """Per sample: the dense run (twice with ``self_check``), then the patched sparse run, and their metrics.

    The first sample also captures Q/K/V (of ``p_layer``, or every layer with ``compare_random``) for
    the attention map and the random-layout comparison.
    """
    from tqdm.auto import tqdm

    from sparseattn.integrations.capture import capture_qkv
    from sparseattn.integrations.transformers_patch import patch_model

    dev = next(model.parameters()).device
    runs = _Runs()
    stages = 3 if self_check else 2
    bar = tqdm(total=len(ids_list) * stages, desc=f"eval {seq_len} tok", disable=not progress, unit="run")
    with torch.no_grad():
        for si, ids in enumerate(ids_list):
            ids = ids.to(dev)
            rec: dict[str, Any] = {"sample": si, "documents": names[si][:5], "seq_len": int(ids.shape[1])}
            first = si == 0
            cap_layers = None if compare_random else [p_layer]
            if first:
                with capture_qkv(model, cap_layers) as captured:
                    dense = greedy_generate(model, ids, gen_tokens=max(gen_tokens, 1), score_last=n_score)
                captured = dict(captured)
            else:
                dense = greedy_generate(model, ids, gen_tokens=max(gen_tokens, 1), score_last=n_score)
            bar.update(1)
            if self_check:
                dense2 = greedy_generate(model, ids, gen_tokens=max(gen_tokens, 1), score_last=n_score)
                sc = logits_metrics(dense2["logits"], dense["logits"])
                if gen_tokens:
                    pl = prefix_agreement(dense2["tokens"], dense["tokens"])
                    sc.update(gen_prefix_len=pl, gen_prefix_fraction=pl / gen_tokens)
                rec["self_check"] = sc
                bar.update(1)
            handle = patch_model(model, predictor=pred, keep_layouts=first, **patch_kw)
            try:
                sparse = greedy_generate(model, ids, gen_tokens=max(gen_tokens, 1), score_last=n_score)
            finally:
                handle.unpatch()
            bar.update(1)
            for li, dl in handle.densities.items():
                runs.densities.setdefault(li, []).extend(dl)
            for li, b in handle.backends_used.items():
                runs.backends.setdefault(li, set()).update(b)
            for li, s in handle.timings.items():
                runs.sparse_layer_s[li] = runs.sparse_layer_s.get(li, 0.0) + s
            runs.modes = dict(handle.layer_modes)
            m = logits_metrics(sparse["logits"], dense["logits"])
            if gen_tokens:
                pl = prefix_agreement(sparse["tokens"], dense["tokens"])
                m.update(gen_prefix_len=pl, gen_prefix_fraction=pl / gen_tokens)
                rec["dense_tokens"] = dense["tokens"][:gen_tokens]
                rec["sparse_tokens"] = sparse["tokens"][:gen_tokens]
                if tokenizer is not None:
                    rec["dense_text"] = tokenizer.decode(dense["tokens"][:gen_tokens])
                    rec["sparse_text"] = tokenizer.decode(sparse["tokens"][:gen_tokens])
            rec["metrics"] = m
            rec["timings"] = {"dense_prefill_s": dense["prefill_s"], "sparse_prefill_s": sparse["prefill_s"],
                              "dense_decode_s": dense["decode_s"], "sparse_decode_s": sparse["decode_s"],
                              "dense_peak_mem_bytes": dense["peak_mem_bytes"],
                              "sparse_peak_mem_bytes": sparse["peak_mem_bytes"]}
            rec["mean_density"] = float(torch.stack([handle.densities[li][-1].mean() for li in handle.densities]).mean()) \
                if handle.densities else None
            if first:
                if p_layer in captured:
                    runs.attention_map = _attention_map(pred, handle, captured, runs.modes, p_layer, plot_head,
                                                        scale_of.get(p_layer))
                if compare_random and hasattr(pred, "predict"):
                    runs.random_comparison = _random_comparison(pred, captured, runs.modes, scale_of, seed)
                del captured
            runs.per_sample.append(rec)
    bar.close()
    return runs


def _layer_rows(layers: list[tuple[int, Any]], runs: _Runs) -> dict[str, Any]:
    """Per layer: its mode, and for sparse layers the mean density (per head too), backends and attention time."""
    layer_rows: dict[str, Any] = {}
    for li, _ in layers:
        mode = runs.modes.get(li, "dense")
        row: dict[str, Any] = {"mode": mode}
        if runs.densities.get(li):
            ph = torch.stack(runs.densities[li]).mean(0)
            row.update(density=float(ph.mean()), sparsity=1 - float(ph.mean()),
                       density_per_head=[round(float(x), 6) for x in ph], backends=sorted(runs.backends.get(li, ())),
                       sparse_attention_s=runs.sparse_layer_s.get(li, 0.0) / len(runs.per_sample))
        else:
            row.update(density=1.0 if mode == "dense" else None, sparsity=0.0 if mode == "dense" else None)
        layer_rows[str(li)] = row
    return layer_rows


def _verdict(summary: dict[str, Any], self_sum: dict[str, Any] | None, thr: dict[str, float]) -> dict[str, Any]:
    """Each summary metric against its threshold, the self-check, and the overall pass."""
    checks = {
        "logits_cosine": ("logits_cosine_min", ">="),
        "top1_agreement": ("top1_agreement_min", ">="),
        "top5_overlap": ("top5_overlap_min", ">="),
        "kl_dense_sparse": ("kl_max", "<="),
        "gen_prefix_fraction": ("gen_prefix_fraction_min", ">="),
    }
    verdict_rows = {}
    for metric, (tkey, op) in checks.items():
        if metric not in summary:
            continue
        val = summary[metric]["mean"]
        ok = val >= thr[tkey] if op == ">=" else val <= thr[tkey]
        verdict_rows[metric] = {"value": val, "threshold": thr[tkey], "op": op, "passed": bool(ok)}
    self_ok = None
    if self_sum is not None:
        self_ok = bool(self_sum["logits_cosine"]["mean"] >= 1 - 1e-9 and self_sum["top1_agreement"]["mean"] == 1.0
                       and self_sum.get("gen_prefix_fraction", {"mean": 1.0})["mean"] == 1.0)
    return {"thresholds": thr, "checks": verdict_rows, "self_check_passed": self_ok,
            "passed": bool(all(r["passed"] for r in verdict_rows.values()) and self_ok is not False)}


def _timings(per_sample: list[dict[str, Any]], steady: Any, load_s: float, t_start: float) -> dict[str, Any]:
    """Mean first-call times and peak memory over the samples, the steady-state prefill, load and total time."""
    def _avg(key: str) -> float | None:
        vals = [r["timings"][key] for r in per_sample if r["timings"][key] is not None]
        return sum(vals) / len(vals) if vals else None

    # the accuracy runs' times are first calls per sample (autotuning, lazy work included): kept as such
    timings = {f"first_call_{k}": _avg(k) for k in ("dense_prefill_s", "sparse_prefill_s", "dense_decode_s",
                                                    "sparse_decode_s")}
    timings.update({k: _avg(k) for k in ("dense_peak_mem_bytes", "sparse_peak_mem_bytes")})
    timings["steady_prefill"] = steady  # medians after warm-up (None with timing_repeats=0)
    timings["load_s"] = load_s
    timings["total_s"] = time.perf_counter() - t_start
    return timings


def evaluate(
    model_name: str = "smollm2-135m",
    *,
    model: Any = None,
    tokenizer: Any = None,
    predictor: Any = DEFAULT_PREDICTOR_SPEC,
    pattern: str | Mapping[str, Any] | None = None,
    dense_layers: Sequence[int] = (),
    per_layer: Mapping[int, Any] | None = None,
    per_head: Mapping[Any, Any] | None = None,
    seq_len: int = DEFAULT_SEQ_LEN,
    samples: int = DEFAULT_SAMPLES,
    gen_tokens: int = DEFAULT_GEN_TOKENS,
    score_last: int | None = None,
    text_files: Sequence[str] | None = None,
    text_dir: str | None = None,
    input_ids: Sequence[torch.Tensor] | None = None,
    compare_random: bool = False,
    self_check: bool = True,
    backend: str = "auto",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    plot_layer: int | None = None,
    plot_head: int = 0,
    thresholds: Mapping[str, float] | None = None,
    progress: bool = True,
    seed: int = 0,
    timing_repeats: int = 5,
    tuned: Any = None,
    quant: str | None = None,
    quant_granularity: str = "per_warp",
) -> EvalResult:
    """Dense vs sparse on the same inputs; returns an :class:`EvalResult` (see module docstring).

    This signature is stable: other tools (tuning, predictor accuracy targets) call it.

    Args:
        model_name: what :func:`sparseattn.models.load` loads when ``model`` is not given.
        model, tokenizer: an already loaded transformers model (unpatched) and tokenizer.
        predictor: predictor object or spec (``"name:key=value,..."``); default
            :data:`~sparseattn.eval.defaults.DEFAULT_PREDICTOR_SPEC`. Ignored when ``pattern`` is set.
        pattern: static pattern shorthand (``"sink_window:window_blocks=8"``), see ``patch_model``.
        dense_layers, per_layer, per_head, backend: passed to :func:`~sparseattn.integrations.patch_model`.
        seq_len: tokens per sample (prompt length, BOS included).
        samples: number of samples (non-overlapping windows of the text source).
        gen_tokens: greedy tokens generated after each prompt (0 skips generation metrics).
        score_last: logits positions compared (the last ones); default ``seq_len // 2``.
        text_files: paths / globs of text files; text_dir: a folder of ``.txt``/``.md`` files.
            Neither: the Python standard library's source files.
        input_ids: explicit samples instead of a text source (each ``(1, N)``).
        compare_random: add the real-vs-random Q/K comparison (first sample).
        self_check: run dense twice and report dense-vs-dense.
        dtype, device: model dtype and device when loading.
        tuned: a tuned file from ``sparseattn tune`` (path) or a ``TunedConfig``: its predictor replaces
            ``predictor`` (``pattern`` must be None), checked against the model; its dense layers are
            added to ``dense_layers``.
        quant, quant_granularity: passed to :func:`~sparseattn.integrations.patch_model`: the sparse
            side's sparse layers run the quantized kernel (``"int8"`` / ``"int8_fp8"``; docs/QUANT.md),
            so every metric is quantized + sparse vs dense. Recorded in the report's config.
        plot_layer, plot_head: layer/head of the attention-map plot (default: middle layer, head 0).
        thresholds: override :data:`~sparseattn.eval.defaults.EVAL_THRESHOLDS` entries.
        progress: tqdm progress bars.
        seed: seed for the random comparison.
        timing_repeats: timed rounds of the steady-state prefill timing on the first sample
            (:func:`~sparseattn.eval.prefill_timing.steady_prefill_times`: warm-up first, dense and
            sparse alternated, median); 0 skips it. The per-sample ``prefill_s`` of the accuracy
            runs are first calls (autotuning included) and are kept in the JSON only as such.

    Returns:
        :class:`EvalResult`.
    """
    from sparseattn.integrations.transformers_patch import patch_model
    from sparseattn.models.layers import attention_layers
    from sparseattn.predictors.resolve import describe_predictor, select_predictor

    fn = "evaluate"
    thr = _check_arguments(fn, seq_len, samples, gen_tokens, timing_repeats, thresholds)

    t_start = time.perf_counter()
    model_desc = model_name if model is None else str(getattr(model.config, "_name_or_path", "") or type(model).__name__)
    if model is None:
        from sparseattn.models import load

        model, tokenizer = load(model_name, dtype=dtype, device=device)
    elif tokenizer is None and input_ids is None:
        raise fail(fn, "tokenizer", "is required with a model and no input_ids", "a tokenizer", None)
    dev = next(model.parameters()).device
    load_s = time.perf_counter() - t_start

    ids_list, names, source, seq_len = _input_samples(fn, input_ids, tokenizer, text_files, text_dir, seq_len, samples)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and seq_len + gen_tokens > max_pos:
        raise fail(fn, "seq_len", "plus gen_tokens exceeds the model's max_position_embeddings",
                   f"<= {max_pos}", seq_len + gen_tokens)
    n_score = seq_len // 2 if score_last is None else int(score_last)
    if not 1 <= n_score <= seq_len:
        raise fail(fn, "score_last", "is out of range", f"1..{seq_len}", n_score)

    chosen = select_predictor(predictor=predictor, pattern=pattern, tuned=tuned, model=model, func=fn)
    pred, tuned_label = chosen.predictor, chosen.tuned_label
    if tuned is not None:
        dense_layers = chosen.dense_layers(dense_layers)
        predictor = None
    layers = attention_layers(model)
    n_layers = len(layers)
    p_layer = n_layers // 2 if plot_layer is None else int(plot_layer)
    if not 0 <= p_layer < n_layers:
        raise fail(fn, "plot_layer", "is out of range", f"0..{n_layers - 1}", p_layer)
    scale_of = {i: getattr(m, "scaling", None) for i, m in layers}

    if quant is not None:  # patch-time refusals (pv_threshold, windows, device, dtype) before any dense run
        patch_model(model, predictor=pred, dense_layers=dense_layers, per_layer=per_layer, per_head=per_head,
                    backend=backend, quant=quant, quant_granularity=quant_granularity).unpatch()

    runs = _run_samples(model, ids_list, names, tokenizer, pred, dict(
        dense_layers=dense_layers, per_layer=per_layer, per_head=per_head, backend=backend, quant=quant,
        quant_granularity=quant_granularity), gen_tokens=gen_tokens, n_score=n_score, self_check=self_check,
        compare_random=compare_random, p_layer=p_layer, plot_head=plot_head, scale_of=scale_of, seed=seed,
        progress=progress, seq_len=seq_len)
    per_sample = runs.per_sample

    steady = None
    if timing_repeats:
        from sparseattn.eval.prefill_timing import steady_prefill_times

        if progress:
            print(f"timing prefill: {1 + int(dev.type == 'cuda')} warm-up + {timing_repeats} rounds, dense and sparse",
                  file=sys.stderr, flush=True)
        steady = steady_prefill_times(
            model, ids_list[0].to(dev), dict(predictor=pred, dense_layers=dense_layers, per_layer=per_layer,
                                             per_head=per_head, backend=backend, quant=quant,
                                             quant_granularity=quant_granularity),
            repeats=timing_repeats, warmup=2 if dev.type == "cuda" else 1)

    summary = {k: _mean_std([r["metrics"][k] for r in per_sample if k in r["metrics"]])
               for k in _METRICS if any(k in r["metrics"] for r in per_sample)}
    self_sum = ({k: _mean_std([r["self_check"][k] for r in per_sample if k in r["self_check"]])
                 for k in _METRICS if any(k in r["self_check"] for r in per_sample)} if self_check else None)
    layer_rows = _layer_rows(layers, runs)
    dens_all = [r["density"] for r in layer_rows.values() if r["density"] is not None]
    sparse_dens = [r["density"] for r in layer_rows.values() if r["mode"] == "sparse" and r["density"] is not None]
    verdict = _verdict(summary, self_sum, thr)
    timings = _timings(per_sample, steady, load_s, t_start)
    cfg = {
        "model": model_desc,
        "model_class": type(model).__name__,
        "layers": n_layers,
        "heads": getattr(model.config, "num_attention_heads", None),
        "kv_heads": getattr(model.config, "num_key_value_heads", None),
        "head_dim": getattr(model.config, "head_dim", None),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "predictor_spec": None if pattern is not None else (predictor if isinstance(predictor, str) else None),
        "pattern": pattern if isinstance(pattern, (str, type(None))) else dict(pattern),
        "tuned": tuned_label,
        "predictor": describe_predictor(pred),
        "dense_layers": sorted(dense_layers),
        "per_layer": {str(k): (v if isinstance(v, str) else describe_predictor(v)) for k, v in (per_layer or {}).items()},
        "per_head": {str(k): (v if isinstance(v, str) else describe_predictor(v)) for k, v in (per_head or {}).items()},
        "backend": backend,
        "quant": quant,
        "quant_granularity": quant_granularity if quant is not None else None,
        "seq_len": seq_len,
        "samples": len(per_sample),
        "gen_tokens": gen_tokens,
        "score_last": n_score,
        "text_source": source,
        "compare_random": compare_random,
        "mean_density_all_layers": sum(dens_all) / len(dens_all) if dens_all else None,
        "mean_density_sparse_layers": sum(sparse_dens) / len(sparse_dens) if sparse_dens else None,
    }
    return EvalResult(config=cfg, samples=per_sample, summary=summary, self_check=self_sum, layers=layer_rows,
                      verdict=verdict, random_comparison=runs.random_comparison, timings=timings,
                      environment=environment(dev), attention_map=runs.attention_map)


def write_report(result: EvalResult, out_dir: str | Path, *, plots: bool = True) -> dict[str, Path]:
    """Write ``eval.json``, ``eval.md`` and (with matplotlib) PNG plots into ``out_dir``
    (:func:`sparseattn.eval.e2e_report.write_report`)."""
    from sparseattn.eval.e2e_report import write_report as write

    return write(result, out_dir, plots=plots)
