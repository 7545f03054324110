"""Whole-model prefill benchmark: dense (the model's own SDPA) vs sparse rows, in one process.

Run on an H200 on 2026-12-02 (BENCHMARKS.md, "Whole model"; ``benchmarks/device_models.sh``). On
a CPU the sparse path is the exact ``masked_sdpa`` one and the times say nothing about the kernel.

For one model and each length, on the same input ids:

* **rows**: one per predictor spec and per static pattern given, plus an **all-blocks** row (the
  static ``dense`` pattern through our attention path: on CUDA the Triton kernel, in bf16 the
  noise floor of everything else);
* **time**: :func:`~sparseattn.eval.prefill_timing.steady_prefill_times` per row (warm-up, dense
  and sparse alternated round by round, CUDA-synchronised, median of ``repeats``); the ratio
  dense / sparse comes from those same rounds (``ratio_rounds`` keeps the per-round ratios, and
  ``ratio_paired`` is their median: the two can differ a lot on a host whose speed drifts between
  rounds, e.g. an eager host-bound model; the table shows both);
* **accuracy**: :func:`~sparseattn.eval.end_to_end.logits_metrics` of the last ``score_last``
  positions' logits against dense and against the all-blocks row;
* **density**: mean block density of the sparse layers from ``PatchHandle.sparsity_report()``;
* **profile**: one extra forward per row (and one dense) under ``torch.profiler``: on CUDA the
  number of device kernels launched, the GPU time summed over device events and the host wall
  time; on a CPU the number of profiler CPU ops (labelled ``cpu_ops``, not kernels). The sparse
  layers' attention call (prediction included) and the predictor are wrapped in
  ``record_function`` ranges ``sparseattn::layer_attention`` and ``sparseattn::predict`` so their
  totals are identifiable by name.

Modes: ``eager``; ``graphs`` captures each side's whole prefill in a CUDA graph (after two warm-up
calls) and times replays; ``compile`` compiles the dense model and, per row, a patched copy of it with
``torch.compile`` (inductor), patched once so rounds do not re-trace, and reports the patched model's
graph-break count from ``torch._dynamo.explain`` (0 expected: under tracing the predictor and the
attention are custom ops).

Models: anything :func:`sparseattn.models.load` accepts, or :func:`build_llama_stack` — a
Llama-3.1-8B-shaped decoder stack with **random weights** for the long lengths, where the sparse
rows should be static patterns (fixed densities): the accuracy columns then compare random-weight
logits and mean little.
"""

from __future__ import annotations

import math
import os
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sparseattn._validation import check_positive_int, fail

__all__ = ["RowSpec", "parse_rows", "with_quant", "load_model", "build_llama_stack", "build_random_model", "RANDOM_ARCHS", "env_info", "bench_model", "write_outputs", "table",
           "markdown_table", "ALL_BLOCKS_SPEC", "LLAMA_STACK_DEFAULT_PATTERNS"]

ALL_BLOCKS_SPEC = "dense:block_m=128,block_n=128"  # the all-blocks row: every causal block, in the kernel's fastest tiles
LLAMA_STACK_DEFAULT_PATTERNS = "sink_window:window_blocks=16;sink_window:window_blocks=64"
_ATTN_KERNEL_RE = re.compile(r"sparse|_attn|attention|flash|fmha|sdpa|cudnn", re.IGNORECASE)


# --------------------------------------------------------------------------- rows
@dataclass
class RowSpec:
    """One sparse row: ``kind`` is ``"predictor"``, ``"pattern"`` or ``"all_blocks"``; ``quant`` (``"int8"`` /
    ``"int8_fp8"``) runs its sparse layers on the quantized kernel with ``quant_granularity`` scales."""

    label: str
    kind: str
    spec: str
    predictor: Any = field(default=None, repr=False)
    quant: str | None = None
    quant_granularity: str | None = None


def with_quant(rows: Sequence[RowSpec], quant: str | None, granularity: str = "per_warp") -> list[RowSpec]:
    """Each row followed by its quantized twin (``"<label> [int8 per_warp]"``); ``quant=None``: the rows as given.

    The all-blocks row's twin measures what quantization alone costs (every causal block, quantized);
    the bf16 all-blocks row stays the noise floor every ``vs_all_blocks`` column compares against.
    """
    if quant is None:
        return list(rows)
    from sparseattn.ops.quant import GRANULARITIES, QUANT_MODES

    if quant not in QUANT_MODES:
        raise fail("with_quant", "quant", "is unknown", f"None or one of {list(QUANT_MODES)}", repr(quant))
    if granularity not in GRANULARITIES:
        raise fail("with_quant", "granularity", "is unknown", f"one of {list(GRANULARITIES)}", repr(granularity))
    out: list[RowSpec] = []
    for r in rows:
        out.append(r)
        if r.quant is None:
            out.append(RowSpec(f"{r.label} [{quant} {granularity}]", r.kind, r.spec, r.predictor, quant, granularity))
    return out


def _split(text: str | None) -> list[str]:
    return [s.strip() for s in (text or "").split(";") if s.strip()]


def parse_rows(predictors: str | Sequence[str] | None, patterns: str | Sequence[str] | None) -> list[RowSpec]:
    """``"mean_sim:...;sketch_walk"`` and ``"sink_window:window_blocks=16"`` → rows, all-blocks row first.

    Every spec is parsed here (a bad one raises ``ValueError`` before any model loads).
    """
    from sparseattn.predictors.pattern import pattern_predictor
    from sparseattn.predictors.resolve import resolve_predictor

    preds = _split(predictors) if isinstance(predictors, (str, type(None))) else [s.strip() for s in predictors]
    pats = _split(patterns) if isinstance(patterns, (str, type(None))) else [s.strip() for s in patterns]
    rows = [RowSpec("all blocks", "all_blocks", ALL_BLOCKS_SPEC, pattern_predictor(ALL_BLOCKS_SPEC))]
    for s in preds:
        rows.append(RowSpec(s, "predictor", s, resolve_predictor(s)))
    for s in pats:
        rows.append(RowSpec(f"pattern {s}", "pattern", s, pattern_predictor(s)))
    labels = [r.label for r in rows]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise fail("parse_rows", "specs", "repeat a row", "each spec once", dup)
    return rows


# --------------------------------------------------------------------------- models and inputs
# random-weight architectures: (transformers model class, config class, config fields). The shapes are
# the real models' (attention heads, head_dim, windows, layer types); weights are random, so times and
# densities of static patterns / windows are what these are for, not accuracy.
RANDOM_ARCHS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama-3.1-8b": ("LlamaForCausalLM", "LlamaConfig", dict(
        vocab_size=128256, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        intermediate_size=14336, num_hidden_layers=32, max_position_embeddings=131072, tie_word_embeddings=False)),
    "smollm2-135m": ("LlamaForCausalLM", "LlamaConfig", dict(
        vocab_size=49152, hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
        intermediate_size=1536, num_hidden_layers=30, max_position_embeddings=8192, tie_word_embeddings=True)),
    "gemma3-270m": ("Gemma3ForCausalLM", "Gemma3TextConfig", dict(
        vocab_size=262144, hidden_size=640, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
        intermediate_size=2048, num_hidden_layers=18, max_position_embeddings=32768, sliding_window=512,
        query_pre_attn_scalar=256,
        layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 3)),
}


def build_random_model(arch: str, *, layers: int | None = None, device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.bfloat16, max_len: int | None = None, seed: int = 0,
                       **overrides: Any) -> torch.nn.Module:
    """A decoder with the shapes of ``arch`` (one of :data:`RANDOM_ARCHS`) and random weights.

    ``layers`` keeps the first ``layers`` decoder layers (their layer types too); ``max_len`` sets
    ``max_position_embeddings`` (default: the real model's); ``overrides``
    change config fields. SDPA attention, eval mode.
    """
    import transformers

    fn = "build_random_model"
    if arch not in RANDOM_ARCHS:
        raise fail(fn, "arch", "is not a known architecture", f"one of {sorted(RANDOM_ARCHS)}", repr(arch))
    model_cls, cfg_cls, fields = RANDOM_ARCHS[arch]
    cfg_kw = dict(fields)
    if layers is not None:
        check_positive_int(fn, "layers", layers)
        cfg_kw["num_hidden_layers"] = layers
        if "layer_types" in cfg_kw:
            cfg_kw["layer_types"] = list(cfg_kw["layer_types"])[:layers] + \
                ["full_attention"] * max(0, layers - len(cfg_kw["layer_types"]))
    if max_len is not None:
        cfg_kw["max_position_embeddings"] = int(max_len)
    cfg_kw.update(overrides)
    cfg = getattr(transformers, cfg_cls)(**cfg_kw)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = getattr(transformers, model_cls)(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.to(device=device, dtype=dtype).eval()


def build_llama_stack(layers: int, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
                      max_len: int = 131072, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A Llama-3.1-8B-shaped decoder stack of ``layers`` layers with random weights (see :func:`build_random_model`)."""
    check_positive_int("build_llama_stack", "layers", layers)
    return build_random_model("llama-3.1-8b", layers=layers, device=device, dtype=dtype, max_len=max_len, seed=seed,
                              **overrides)


def load_model(name_or_path: str, *, dtype: torch.dtype, device: str, need_tokenizer: bool = True) -> tuple[Any, Any]:
    """:func:`sparseattn.models.load`, except that a local model folder loads without a tokenizer
    when ``need_tokenizer`` is False (``--random-ids``: a folder from ``save_pretrained`` alone)."""
    from sparseattn.models.loader import load

    p = Path(str(name_or_path)).expanduser()
    if need_tokenizer or not p.is_dir():
        return load(name_or_path, dtype=dtype, device=device)
    import transformers

    if not (p / "config.json").is_file():
        raise fail("load", f"model {p}", "is a folder without config.json", "a transformers model folder",
                   "no config.json")
    tutils = transformers.utils.logging
    bars = tutils.is_progress_bar_enabled()
    tutils.disable_progress_bar()  # keep stderr to one line on errors
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(p), dtype=dtype, attn_implementation="sdpa")
    except (ValueError, KeyError, OSError) as exc:
        raise fail("load", f"model {p}", f"could not be loaded by transformers ({type(exc).__name__}: "
                   f"{' '.join(str(exc).split())[:300]})", "a causal LM model folder", type(exc).__name__) from exc
    finally:
        if bars:
            tutils.enable_progress_bar()
    return model.to(device).eval(), None


def _max_len(model: Any) -> int | None:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def _input_ids(tokenizer: Any, model: Any, seq_len: int, *, random_ids: bool, text_files: Sequence[str] | None,
               text_dir: str | None, seed: int) -> tuple[torch.Tensor, str]:
    if random_ids or tokenizer is None:
        vocab = int(model.config.vocab_size)
        g = torch.Generator().manual_seed(seed + seq_len)
        return torch.randint(0, vocab, (1, seq_len), generator=g), f"random token ids (seed {seed + seq_len})"
    from sparseattn.eval.texts import documents_for, token_samples

    docs, desc = documents_for(text_files, text_dir)
    ids, _ = token_samples(docs, tokenizer, seq_len=seq_len, samples=1)
    return ids[0], desc


# --------------------------------------------------------------------------- environment
def env_info() -> dict[str, Any]:
    """The run's environment record (:func:`sparseattn.eval.env.environment`; ``$SPARSEATTN_COMMIT`` wins)."""
    from sparseattn.eval.env import environment

    return environment()


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def _alternating(dense: Callable[[], Any], sparse: Callable[[], Any], *, repeats: int, warmup: int, cuda: bool,
                 seq_len: int, what: str = "torch.compile'd prefill calls") -> dict[str, Any]:
    """The same protocol as ``steady_prefill_times`` for arbitrary callables (compile and graphs modes)."""
    from sparseattn.eval.prefill_timing import TIMING_RULES, paired_rounds

    d_s, s_s = paired_rounds(dense, sparse, repeats=repeats, warmup=warmup, cuda=cuda)
    d, s = statistics.median(d_s), statistics.median(s_s)
    return {"dense_s": d, "sparse_s": s, "ratio": d / s if s > 0 else None, "dense_rounds_s": d_s,
            "sparse_rounds_s": s_s, "repeats": repeats, "warmup": warmup,
            "method": (f"median of {repeats} {what} after {warmup} warm-up round(s), dense and "
                       f"sparse alternated, {TIMING_RULES}, {'CUDA-synchronised, ' if cuda else ''}{seq_len} tokens, "
                       "one process")}


def _capture_graph(call: Callable[[], Any]) -> Callable[[], Any]:
    """Capture ``call`` (a whole forward) in a CUDA graph (:func:`sparseattn.testing.timing.capture_graph`)."""
    from sparseattn.testing.timing import capture_graph

    return capture_graph(call)


# --------------------------------------------------------------------------- profiling
_LAUNCH_RE = re.compile(r"^(cudaLaunchKernel|cuLaunchKernel|cudaLaunchKernelExC|cuLaunchKernelEx|cudaLaunchCooperativeKernel)")
def _ev_attr(evt: Any, *names: str) -> float:
    for n in names:
        v = getattr(evt, n, None)
        if v is not None:
            return float(v)
    return 0.0


def _device_kernels(events: list[Any]) -> list[Any]:
    """The profiler's CUDA kernel events. The device-side events of our ``sparseattn::`` record_function ranges are
    GPU user annotations spanning the range's kernels, not kernels: counting them doubled a sparse row's attention
    and GPU time (their names match ``_ATTN_KERNEL_RE``)."""
    from torch.autograd import DeviceType

    return [e for e in events if e.device_type == DeviceType.CUDA and not e.name.startswith("sparseattn::")]


def _profile(call: Callable[[], Any], cuda: bool) -> dict[str, Any]:
    """One forward under ``torch.profiler``: op/kernel counts, named ranges, device vs host time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    _sync(cuda)
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        call()
        _sync(cuda)
        wall = time.perf_counter() - t0
    events = list(prof.events())
    out: dict[str, Any] = {"host_wall_ms": wall * 1e3}
    ranges: dict[str, dict[str, float]] = {}
    for evt in events:
        if evt.name.startswith("sparseattn::") and evt.device_type == DeviceType.CPU:
            r = ranges.setdefault(evt.name, {"calls": 0, "cpu_total_ms": 0.0})
            r["calls"] += 1
            r["cpu_total_ms"] += _ev_attr(evt, "cpu_time_total") / 1e3
    if cuda:
        kernels = _device_kernels(events)
        dev_us = [_ev_attr(e, "self_device_time_total", "self_cuda_time_total", "device_time_total") for e in kernels]
        attn = [t for e, t in zip(kernels, dev_us) if _ATTN_KERNEL_RE.search(e.name)]
        out.update({"count_kind": "device_kernels", "count": len(kernels), "gpu_time_ms": sum(dev_us) / 1e3,
                    "attention_kernel_gpu_ms": sum(attn) / 1e3, "attention_kernel_launches": len(attn),
                    "attention_kernel_match": _ATTN_KERNEL_RE.pattern})
        for name, r in ranges.items():  # device time of the kernels launched inside each named range
            r["device_total_ms"] = sum(_ev_attr(e, "device_time_total", "cuda_time_total") for e in events
                                       if e.name == name and e.device_type == DeviceType.CPU) / 1e3
            r["launches"] = 0
        # kernel launches (runtime and driver API calls) made inside each named range: per sparse layer call
        for e in events:
            if e.device_type != DeviceType.CPU or not _LAUNCH_RE.match(e.name):
                continue
            seen: set[str] = set()
            par = getattr(e, "cpu_parent", None)
            while par is not None:
                if par.name in ranges and par.name not in seen:
                    ranges[par.name]["launches"] += 1
                    seen.add(par.name)
                par = getattr(par, "cpu_parent", None)
        for r in ranges.values():
            r["launches_per_call"] = r["launches"] / r["calls"] if r["calls"] else None
    else:
        cpu_ops = [e for e in events if e.device_type == DeviceType.CPU and not e.name.startswith("sparseattn::")]
        attn = [e for e in cpu_ops if "scaled_dot_product" in e.name or "sparseattn" in e.name.lower()]
        out.update({"count_kind": "cpu_ops (profiler CPU ops, not device kernels: no GPU here)", "count": len(cpu_ops),
                    "attention_op_self_cpu_ms": sum(_ev_attr(e, "self_cpu_time_total") for e in attn) / 1e3})
    out["ranges"] = ranges
    return out


class _Instrument:
    """Wrap a handle's layer forward and a predictor's ``predict`` in named ``record_function`` ranges."""

    def __init__(self, handle: Any, predictor: Any) -> None:
        self.handle, self.predictor = handle, predictor

    def __enter__(self) -> "_Instrument":
        from torch.profiler import record_function

        orig_fwd = self.handle._forward
        orig_pred = self.predictor.predict

        def fwd(*a: Any, **k: Any) -> Any:
            with record_function("sparseattn::layer_attention"):
                return orig_fwd(*a, **k)

        def pred(*a: Any, **k: Any) -> Any:
            with record_function("sparseattn::predict"):
                return orig_pred(*a, **k)

        self.handle._forward = fwd
        try:
            self.predictor.predict = pred
        except (AttributeError, TypeError):  # a predictor that refuses instance attributes: no predict range
            pass
        return self

    def __exit__(self, *exc: Any) -> None:
        for obj, name in ((self.handle, "_forward"), (self.predictor, "predict")):
            try:
                delattr(obj, name)
            except AttributeError:
                pass


# --------------------------------------------------------------------------- the benchmark
def _log(msg: str, progress: bool) -> None:
    if progress:
        print(f"[bench-model] {msg}", file=sys.stderr, flush=True)


def _mean_sparse_density(report: dict[str, Any], mode: str = "sparse") -> float | None:
    vals = [e["density"] for e in report.get("layers", {}).values()
            if isinstance(e, dict) and e.get("mode") == mode and e.get("density") is not None]
    return float(sum(vals) / len(vals)) if vals else None


@torch.no_grad()
def bench_model(model: Any, rows: Sequence[RowSpec], lengths: Sequence[int], *, tokenizer: Any = None,
                model_name: str = "model", random_ids: bool = False, text_files: Sequence[str] | None = None,
                text_dir: str | None = None, repeats: int = 5, warmup: int = 1, score_last: int = 512,
                dense_layers: Sequence[int] = (), backend: str = "auto", mode: str = "eager", profile: bool = True,
                random_weights: bool = False, seed: int = 0, progress: bool = True,
                dense_above: float | str | None = None) -> dict[str, Any]:
    """Run the benchmark on an already loaded (unpatched) model; returns the JSON-friendly result.

    ``dense_above`` (``"auto"`` or a density) is passed to ``patch_model`` for every row but the all-blocks
    row (the noise floor stays every block on the kernel) and the quantized rows (which refuse it); such a
    row runs one untimed forward first, so its verdicts are measured before its logits and times.

    Raises:
        ValueError: a length beyond the model's ``max_position_embeddings``, a bad mode, no rows,
            too little text.
    """
    from sparseattn.eval.end_to_end import logits_metrics
    from sparseattn.eval.prefill_timing import steady_prefill_times
    from sparseattn.integrations.transformers_patch import patch_model

    fn = "bench_model"
    if mode not in ("eager", "compile", "graphs"):
        raise fail(fn, "mode", "is unknown", "'eager', 'compile' or 'graphs'", repr(mode))
    for name, val in (("repeats", repeats), ("warmup", warmup), ("score_last", score_last)):
        check_positive_int(fn, name, val)
    if not lengths:
        raise fail(fn, "lengths", "is empty", "at least one length", list(lengths))
    for n in lengths:
        check_positive_int(fn, "length", n)
    limit = _max_len(model)
    too_long = [n for n in lengths if limit is not None and n > limit]
    if too_long:
        raise fail(fn, "lengths", "exceed the model's context (max_position_embeddings)", f"<= {limit}", too_long)
    if not rows or rows[0].kind != "all_blocks":
        raise fail(fn, "rows", "must start with the all-blocks row", "parse_rows(...)", [r.label for r in rows])
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    dtype = next(model.parameters()).dtype
    if mode == "graphs" and not cuda:
        raise fail(fn, "mode", "'graphs' captures CUDA graphs and needs a CUDA model", "a model on cuda", str(device))
    if rows[0].quant is not None:
        raise fail(fn, "rows", "must start with the unquantized all-blocks row (the noise floor)", "parse_rows(...)",
                   rows[0].label)
    quant_rows = [r for r in rows if r.quant is not None]
    if quant_rows and mode == "compile":
        raise fail(fn, "mode", "'compile' cannot run quantized rows (the quantized kernel has no custom op yet)",
                   "'eager' or 'graphs'", repr(mode))
    for r in quant_rows:  # patch-time refusals (pv_threshold, windows, device, dtype) before anything is timed
        patch_model(model, predictor=r.predictor, dense_layers=list(dense_layers), backend=backend, quant=r.quant,
                    quant_granularity=r.quant_granularity).unpatch()
    result: dict[str, Any] = {
        "tool": "sparseattn.eval.bench_model",
        "env": env_info(), "model": model_name, "random_weights": random_weights, "device": str(device),
        "dtype": str(dtype).replace("torch.", ""), "mode": mode, "backend": backend, "repeats": repeats,
        "warmup": warmup, "score_last": score_last, "dense_layers": list(dense_layers), "dense_above": dense_above,
        "rows_spec": [{"label": r.label, "kind": r.kind, "spec": r.spec, "quant": r.quant,
                       "quant_granularity": r.quant_granularity} for r in rows],
        "lengths": [], "rows": [], "notes": [],
    }
    if random_weights:
        result["notes"].append("random weights: the accuracy columns compare random-weight logits and mean little; "
                               "the times and densities are what this model is for")
    if not cuda:
        result["notes"].append("CPU run: the sparse path is the exact masked SDPA / interpreter, so times do not "
                               "measure the kernel; profile counts are profiler CPU ops, not device kernels")
    if quant_rows:
        result["notes"].append("rows labelled [<quant> <granularity>] run the sparse layers on the quantized kernel "
                               "(INT8 Q·Kᵀ; P·V in the model dtype for int8, FP8 for int8_fp8), quantization inside "
                               "every call; their vs_all_blocks compares with the unquantized all-blocks row")
    compiled_dense = None
    if mode == "compile":
        result["notes"].append("compile mode: torch.compile (inductor) of the dense model and, per row, of a patched "
                               "copy of it (patched once, so no re-tracing between rounds); graph breaks of the patched "
                               "model per row (torch._dynamo.explain)")
        compiled_dense = torch.compile(model)

    # every length's input first: a text too short for a later length fails before any timing runs
    inputs = {n: _input_ids(tokenizer, model, n, random_ids=random_ids, text_files=text_files, text_dir=text_dir,
                            seed=seed) for n in lengths}
    for n in lengths:
        ids, source = inputs[n]
        ids = ids.to(device)
        k = min(score_last, n)
        entry: dict[str, Any] = {"seq_len": n, "input": source, "scored_positions": k}
        _log(f"{model_name}: {n} tokens, dense reference logits", progress)
        fwd_dense = compiled_dense if compiled_dense is not None else model

        def logits(m: Any) -> torch.Tensor:
            return m(ids, use_cache=False, logits_to_keep=k).logits[0, -k:].float()

        dense_logits = logits(fwd_dense)
        dense_again = logits(fwd_dense)
        entry["dense_self_check"] = logits_metrics(dense_again, dense_logits)
        if profile:
            entry["dense_profile"] = _profile(lambda: fwd_dense(ids, use_cache=False, logits_to_keep=1), cuda)
        dense_replay = None
        if mode == "graphs":
            dense_replay = _capture_graph(lambda: model(ids, use_cache=False, logits_to_keep=1))
        floor_logits: torch.Tensor | None = None
        dense_rounds: list[float] = []
        for i, row in enumerate(rows):
            _log(f"{model_name}: {n} tokens, row {i + 1}/{len(rows)} {row.label!r}", progress)
            kw: dict[str, Any] = {"predictor": row.predictor, "dense_layers": list(dense_layers), "backend": backend}
            if row.quant is not None:
                kw.update(quant=row.quant, quant_granularity=row.quant_granularity)
            elif dense_above is not None and row.kind != "all_blocks":
                kw["dense_above"] = dense_above
            rec: dict[str, Any] = {"seq_len": n, "label": row.label, "kind": row.kind, "spec": row.spec,
                                   "quant": row.quant, "quant_granularity": row.quant_granularity}
            target = model
            if mode == "compile":
                import copy

                target = copy.deepcopy(model)  # its own patched copy: the dense side's compiled graph stays valid
            with patch_model(target, **kw) as h:
                if "dense_above" in kw:  # measure the layers' densities first: the verdicts hold from the next call
                    target(ids, use_cache=False, logits_to_keep=1)
                    _sync(cuda)
                fwd = torch.compile(target) if mode == "compile" else model
                if mode == "compile":
                    try:
                        ex = torch._dynamo.explain(target)(ids, use_cache=False, logits_to_keep=1)
                        rec["graph_breaks"] = int(ex.graph_break_count)
                        reasons: dict[str, int] = {}
                        for b in ex.break_reasons:
                            first = (str(getattr(b, "reason", b)).strip().splitlines() or ["?"])[0][:160]
                            reasons[first] = reasons.get(first, 0) + 1
                        rec["graph_break_reasons"] = reasons
                    except Exception as exc:  # noqa: BLE001 - experimental: report, never fail
                        rec["graph_breaks"] = None
                        rec["explain_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                h.reset_stats()
                # eager logits (the compiled graph records no per-call accounting; its logits are the same function)
                sparse_logits = logits(target)
                rep = h.sparsity_report()
                rec["density"] = _mean_sparse_density(rep)
                rec["backends"] = sorted({b for e in rep["layers"].values() for b in e.get("backends", ())})
                rec["layer_calls"] = dict(h.counts)
                if "dense_above" in kw:  # the layers the fallback ran dense in the logits forward
                    rec["dense_above"] = kw["dense_above"]
                    rec["dense_fallback_layers"] = sorted(int(i) for i, e in rep["layers"].items()
                                                          if e.get("dense_fallbacks"))
                    rec["auto_dense"] = {i: e["auto_dense"] for i, e in rep["layers"].items() if e.get("auto_dense")}
                    result["notes"].append(f"{row.label} at {n} tokens: dense_above={kw['dense_above']!r}: layers "
                                           f"{rec['dense_fallback_layers'] or 'none'} ran dense attention (the fallback)")
                if row.quant is not None and h.counts["prefill_quant"] == 0 and h.counts["prefill_sparse"]:
                    raise RuntimeError(f"bench_model: row {row.label!r} ran no quantized call")  # never silently bf16
                modes = [e["mode"] for e in rep["layers"].values()]
                rec["layer_modes"] = {m: modes.count(m) for m in sorted(set(modes))}
                rec["window_density"] = _mean_sparse_density(rep, "window")
                if profile and mode == "compile":  # no named ranges: wrapping the handle would force a re-trace
                    fwd(ids, use_cache=False, logits_to_keep=1)
                    rec["profile"] = _profile(lambda: fwd(ids, use_cache=False, logits_to_keep=1), cuda)
                elif profile:
                    if cuda:  # steady state: the layer graphs of this handle are captured before the profiled call
                        fwd(ids, use_cache=False, logits_to_keep=1)
                    with _Instrument(h, row.predictor):
                        rec["profile"] = _profile(lambda: fwd(ids, use_cache=False, logits_to_keep=1), cuda)
                t = None
                if mode == "graphs":
                    try:
                        sparse_replay = _capture_graph(lambda: model(ids, use_cache=False, logits_to_keep=1))
                        t = _alternating(dense_replay, sparse_replay, repeats=repeats, warmup=warmup, cuda=cuda,
                                         seq_len=n, what="CUDA-graph replays of whole prefills")
                        del sparse_replay
                    except Exception as exc:  # noqa: BLE001 - a finding to report, with the reason
                        rec["graphs_error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
                        _log(f"  CUDA graph capture of the patched model failed: {rec['graphs_error']}; "
                             "this row is timed eagerly (see graphs_error)", progress)
                if mode == "compile":
                    def d() -> None:
                        compiled_dense(ids, use_cache=False, logits_to_keep=1)

                    def s() -> None:
                        fwd(ids, use_cache=False, logits_to_keep=1)

                    t = _alternating(d, s, repeats=repeats, warmup=warmup, cuda=cuda, seq_len=n)
            rec["vs_dense"] = logits_metrics(sparse_logits, dense_logits)
            if row.kind == "all_blocks" and row.quant is None:
                floor_logits = sparse_logits
                rec["vs_all_blocks"] = None
            else:
                rec["vs_all_blocks"] = logits_metrics(sparse_logits, floor_logits)
            del sparse_logits
            target = fwd = None  # release the patched copy (compile mode)
            if t is None:
                t = steady_prefill_times(model, ids, kw, repeats=repeats, warmup=warmup)
            rec.update(t)
            rec["ratio_rounds"] = [a / b if b > 0 else None for a, b in zip(t["dense_rounds_s"], t["sparse_rounds_s"])]
            paired = [x for x in rec["ratio_rounds"] if x is not None]
            # the median of the per-round (paired) ratios: robust where the host's speed drifts between rounds
            rec["ratio_paired"] = statistics.median(paired) if paired else None
            dense_rounds += t["dense_rounds_s"]
            result["rows"].append(rec)
            vf = rec.get("vs_all_blocks") or {}
            # the accuracy in the progress line too, so a job stopped before the report keeps it
            _log(f"  dense {t['dense_s'] * 1e3:.1f} ms, sparse {t['sparse_s'] * 1e3:.1f} ms, ratio {t['ratio']:.3f}, "
                 f"density {rec['density']}, cosine {rec['vs_dense']['logits_cosine']:.6f}, "
                 f"top1 {rec['vs_dense']['top1_agreement']:.4f}, KL {rec['vs_dense']['kl_dense_sparse']:.2e}"
                 + (f", top1 vs all-blocks {vf['top1_agreement']:.4f}" if vf else ""), progress)
        entry["dense_s_all_rounds_median"] = statistics.median(dense_rounds) if dense_rounds else None
        dense_logits = floor_logits = dense_again = dense_replay = None  # free before the next length
        if cuda:
            torch.cuda.empty_cache()
        result["lengths"].append(entry)
    return result


# --------------------------------------------------------------------------- reporting
def _f(x: Any, fmt: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


_COLS = ("len", "row", "density", "window dens.", "dense ms", "sparse ms", "ratio", "paired ratio", "cos vs dense",
         "top1", "KL",
         "top1 vs all-blocks", "kernels/ops", "launches/layer")


def _cells(r: dict[str, Any]) -> list[str]:
    vd, vf, pr = r.get("vs_dense") or {}, r.get("vs_all_blocks") or {}, r.get("profile") or {}
    per_layer = ((pr.get("ranges") or {}).get("sparseattn::layer_attention") or {}).get("launches_per_call")
    return [str(r["seq_len"]), r["label"], _f(r.get("density"), ".3f"), _f(r.get("window_density"), ".3f"),
            _f(r["dense_s"] * 1e3, ".1f"), _f(r["sparse_s"] * 1e3, ".1f"), _f(r.get("ratio"), ".3f"),
            _f(r.get("ratio_paired"), ".3f"), _f(vd.get("logits_cosine"), ".6f"), _f(vd.get("top1_agreement"), ".3f"), _f(vd.get("kl_dense_sparse"), ".2e"),
            _f(vf.get("top1_agreement"), ".3f"), _f(pr.get("count"), "d"), _f(per_layer, ".1f")]


def markdown_table(res: dict[str, Any]) -> str:
    """One header, one line per row (per length)."""
    lines = ["| " + " | ".join(_COLS) + " |", "|" + "---|" * len(_COLS)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in res["rows"]]
    return "\n".join(lines)


def table(res: dict[str, Any]) -> str:
    """Plain-text table for the console."""
    rows = [list(_COLS)] + [_cells(r) for r in res["rows"]]
    w = [max(len(r[i]) for r in rows) for i in range(len(_COLS))]
    return "\n".join("  ".join(c.ljust(w[i]) for i, c in enumerate(r)) for r in rows)


def _markdown(res: dict[str, Any]) -> str:
    e = res["env"]
    head = [f"# Whole-model prefill: {res['model']} ({res['mode']}, {res['dtype']}, {res['device']})", "",
            f"date {e['date_utc']}; GPU {e['gpu'] or 'none (CPU)'}; torch {e['torch']}, triton {e.get('triton')}, "
            f"transformers {e.get('transformers')}; commit {e['commit']}", "",
            f"Times: {res['rows'][0]['method'] if res['rows'] else '-'} (per row; ratio = dense / sparse from the same "
            f"rounds). Accuracy: last {res['score_last']} positions' logits vs dense and vs the all-blocks row.", ""]
    head += [f"- {n}" for n in res["notes"]]
    if res["mode"] == "compile":
        head += [f"- graph breaks (patched model, torch._dynamo.explain), {r['seq_len']} {r['label']}: "
                 f"{r.get('graph_breaks', '-')}" for r in res["rows"]]
    return "\n".join(head + ["", markdown_table(res), ""])


def _plot(res: dict[str, Any], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: bench_model.png skipped"
    rows = res["rows"]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows)), 4))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["dense_s"] * 1e3 for r in rows], 0.4, label="dense (model SDPA)")
    ax.bar([x + 0.2 for x in xs], [r["sparse_s"] * 1e3 for r in rows], 0.4, label="row")
    for x, r in zip(xs, rows):
        ax.annotate(f"{r['ratio']:.2f}x", (x + 0.2, r["sparse_s"] * 1e3), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs))
    ax.set_xticklabels([f"{r['seq_len']}\n{r['label'][:24]}" for r in rows], fontsize=7)
    ax.set_ylabel("prefill ms (median)")
    ax.set_title(f"{res['model']} prefill, {res['mode']}, ratio = dense / row")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def write_outputs(res: dict[str, Any], out: str | os.PathLike, *, plot: bool = True) -> dict[str, Path]:
    """``bench_model.json``, ``bench_model.md`` and (matplotlib permitting) ``bench_model.png`` under ``out``."""
    import json

    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    paths = {"json": d / "bench_model.json", "md": d / "bench_model.md"}
    if plot:
        note = _plot(res, d / "bench_model.png")
        if note is None:
            paths["png"] = d / "bench_model.png"
        else:
            res["notes"].append(note)
            print(f"[bench-model] {note}", file=sys.stderr)
    paths["json"].write_text(json.dumps(res, indent=1, default=str) + "\n")
    paths["md"].write_text(_markdown(res))
    return paths
