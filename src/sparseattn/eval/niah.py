"""Needle in a haystack (RULER "niah_single" style), dense vs sparse.

A key-value fact — "One of the special magic numbers for {key} is: {value}." — is inserted at a
chosen depth of a haystack (RULER's repeated filler sentences, or sentences of real text), the
instruct model is asked for the number through its chat template (with RULER's answer prefix),
and the greedy output is scored by substring match of the 7-digit value. Everything is generated
offline from a seed. The same prompt runs through the dense model and the patched sparse model.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from sparseattn._validation import check_nonneg_int, check_positive_int, fail
from sparseattn.eval.defaults import DEFAULT_PREDICTOR_SPEC, NIAH_DEFAULT_DEPTHS, NIAH_DEFAULT_LENGTHS
from sparseattn.eval.texts import chat_text, trim_haystack

__all__ = ["NiahResult", "make_niah_prompt", "run_niah", "check_decode_modes", "write_niah_report", "FILLER"]

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
_TASK = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
         "I will quiz you about the numbers afterwards.\n{context}\n"
         "What is the special magic number for {key} mentioned in the provided text?")
_ANSWER_PREFIX = "The special magic number for {key} mentioned in the provided text is"
_NEEDLE = "One of the special magic numbers for {key} is: {value}."
_WORDS = ("amber", "brisk", "cedar", "dune", "ember", "fjord", "glade", "harbor", "iris", "jade", "kelp", "lumen",
          "maple", "nectar", "onyx", "prism", "quartz", "raven", "sable", "tundra", "umber", "velvet", "willow",
          "zephyr", "apple", "river", "falcon", "meadow", "lantern", "copper", "orchid", "summit")


def _sentences(documents: Iterable[tuple[str, str]] | None) -> list[str]:
    if documents is None:
        return [s.strip() + "." for s in FILLER.split(".") if s.strip()]
    out: list[str] = []
    for _, text in documents:
        for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())):
            if s:
                out.append(s)
    if not out:
        raise fail("make_niah_prompt", "haystack", "has no sentences", "non-empty text", "nothing")
    return out


def _chat_parts(tokenizer: Any, key: str) -> tuple[list[int], list[int]]:
    marker = "\u0000CONTEXT\u0000"
    content = _TASK.format(context=marker, key=key)
    text = chat_text(tokenizer, content) + _ANSWER_PREFIX.format(key=key)
    before, _, after = text.partition(marker)
    pre = tokenizer(before, add_special_tokens=False)["input_ids"]
    post = tokenizer(after, add_special_tokens=False)["input_ids"]
    return pre, post


def make_niah_prompt(tokenizer: Any, *, length: int, depth: float, seed: int = 0,
                     documents: Iterable[tuple[str, str]] | None = None,
                     sentences: Sequence[str] | None = None) -> dict[str, Any]:
    """Build one prompt of exactly ``length`` tokens with the needle at ``depth`` of the haystack.

    Args:
        tokenizer: the model's tokenizer (its chat template is used when it has one).
        length: total prompt tokens.
        depth: 0.0 (needle first) … 1.0 (needle last), as a fraction of the haystack sentences.
        seed: picks the key and the 7-digit value (and the start sentence of a real-text haystack).
        documents: ``(name, text)`` documents for a real-text haystack; None = RULER filler.
        sentences: pre-split haystack sentences (overrides ``documents``).

    Returns:
        ``{"input_ids": (1, length), "key", "value", "needle_token", "depth", "length"}``.
    """
    fn = "make_niah_prompt"
    check_positive_int(fn, "length", length)
    if isinstance(depth, bool) or not isinstance(depth, (int, float)) or not 0.0 <= float(depth) <= 1.0:
        raise fail(fn, "depth", "is out of range", "a float in [0, 1]", repr(depth))
    rng = random.Random(seed)
    key = f"{rng.choice(_WORDS)}-{rng.choice(_WORDS)}"
    value = str(rng.randint(1_000_000, 9_999_999))
    sents = list(sentences) if sentences is not None else _sentences(documents)
    pre, post = _chat_parts(tokenizer, key)
    bos = getattr(tokenizer, "bos_token_id", None)
    head = ([bos] if bos is not None and (not pre or pre[0] != bos) else []) + pre
    needle_ids = tokenizer(" " + _NEEDLE.format(key=key, value=value), add_special_tokens=False)["input_ids"]
    budget = length - len(head) - len(post) - len(needle_ids)
    if budget < 1:
        raise fail(fn, "length", "is too short for the question and the needle",
                   f"> {len(head) + len(post) + len(needle_ids)}", length)
    # haystack sentences (cycled, from a seeded start for real text) until the budget is filled
    start = 0 if documents is None and sentences is None else rng.randrange(len(sents))
    hay: list[list[int]] = []
    total, i = 0, start
    while total < budget:
        ids = tokenizer(" " + sents[i % len(sents)], add_special_tokens=False)["input_ids"]
        hay.append(ids)
        total += len(ids)
        i += 1
    trim_haystack(hay, total, budget)  # the last sentence cut so the haystack is exactly the budget
    at = round(float(depth) * len(hay))
    before = [t for s in hay[:at] for t in s]
    after = [t for s in hay[at:] for t in s]
    ids = head + before + needle_ids + after + post
    return {"input_ids": torch.tensor([ids], dtype=torch.long), "key": key, "value": value,
            "needle_token": len(head) + len(before), "depth": float(depth), "length": len(ids)}


@dataclasses.dataclass
class NiahResult:
    """Per-case records and accuracy grids ``{"dense"|"sparse": [depth][length]}``."""

    config: dict[str, Any]
    lengths: list[int]
    depths: list[float]
    grid: dict[str, list[list[float]]]
    cases: list[dict[str, Any]]
    summary: dict[str, Any]
    environment: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def table(self) -> str:
        lines = [f"sparseattn niah: {self.config['model']} | sparse: {self.config['sparse_config']} | "
                 f"{self.config['trials']} trial(s) per cell | haystack: {self.config['haystack']}"]
        head = "depth \\ length".ljust(16) + "".join(f"{n:>18}" for n in self.lengths)
        lines.append(head)
        for di, d in enumerate(self.depths):
            cells = "".join(f"{'d ' + format(self.grid['dense'][di][li], '.0%') + ' / s ' + format(self.grid['sparse'][di][li], '.0%'):>18}"
                            for li in range(len(self.lengths)))
            lines.append(f"{d:<16.2f}{cells}")
        s = self.summary
        lines.append(f"accuracy: dense {s['dense_accuracy']:.1%}, sparse {s['sparse_accuracy']:.1%}; "
                     f"mean sparse density per length: " + ", ".join(
                         f"{n}: {s['sparse_density_by_length'].get(str(n), float('nan')):.3f}" for n in self.lengths))
        for m, acc in s.get("mode_accuracy", {}).items():
            lines.append(f"decode mode {m}: accuracy {acc:.1%}, same outcome as dense in {s['mode_agreement'][m]:.1%}")
        return "\n".join(lines)


def check_decode_modes(func: str, name: str, modes: Sequence[str]) -> list[str]:
    """``modes`` without repeats, each a decode path of :mod:`sparseattn.eval.gen_check` (not ``sparse_prefill``,
    which is the NIAH run's own sparse side); raises the project's error naming ``func`` and ``name`` otherwise."""
    from sparseattn.eval.gen_check import GEN_CHECK_MODES

    for m in modes:
        if m not in GEN_CHECK_MODES or m == "sparse_prefill":
            raise fail(func, name, f"has an unknown mode {m!r}", "some of kernel_decode, sparse_decode, mixed_int8, "
                       "mixed_fp8", repr(list(modes)))
    return list(dict.fromkeys(modes))


def run_niah(
    model_name: str = "smollm2-135m",
    *,
    model: Any = None,
    tokenizer: Any = None,
    predictor: Any = DEFAULT_PREDICTOR_SPEC,
    pattern: str | Mapping[str, Any] | None = None,
    dense_layers: Sequence[int] = (),
    lengths: Sequence[int] = NIAH_DEFAULT_LENGTHS,
    depths: Sequence[float] = NIAH_DEFAULT_DEPTHS,
    trials: int = 1,
    text_files: Sequence[str] | None = None,
    text_dir: str | None = None,
    gen_tokens: int = 12,
    backend: str = "auto",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = True,
    tuned: Any = None,
    decode_modes: Sequence[str] = (),
    top_pages: int | float = 0.1,
    page_size: int = 16,
    mixed_window: int = 128,
    decode_backend: str = "auto",
    dense_tail: int = 0,
) -> NiahResult:
    """Needle-in-a-haystack accuracy, dense and sparse, for every length × depth (× trials).

    The haystack is RULER's filler unless ``text_files`` / ``text_dir`` give real text. Each trial
    uses a different seeded key/value (the same for dense and sparse). ``tuned`` (a file from
    ``sparseattn tune`` or a ``TunedConfig``) replaces ``predictor``/``pattern``, checked against the model.

    ``decode_modes``: decode paths also run on every prompt, each after a dense prefill, scored the same way
    (``sparse_decode``: Quest-style pages, ``top_pages`` per KV head of ``page_size`` keys; ``kernel_decode``: the
    dense decode kernel; ``mixed_int8`` / ``mixed_fp8``: :class:`~sparseattn.state.kv_cache.MixedKVCache` with
    ``mixed_window`` recent tokens in the model dtype) — the generations of :mod:`sparseattn.eval.gen_check`,
    ``gen_tokens`` greedy tokens without an EOS stop.

    ``dense_tail``: the sparse prefill keeps the last ``dense_tail`` prompt tokens on every causal block
    (``patch_model(dense_tail=...)``; 0 = off).
    """
    from sparseattn.eval.end_to_end import greedy_generate
    from sparseattn.eval.env import environment
    from sparseattn.eval.gen_check import _run_mode
    from sparseattn.integrations.transformers_patch import patch_model
    from sparseattn.predictors.resolve import describe_predictor, select_predictor

    fn = "run_niah"
    modes = check_decode_modes(fn, "decode_modes", decode_modes)
    check_nonneg_int(fn, "dense_tail", dense_tail)
    lengths = [check_positive_int(fn, "lengths", int(n)) for n in lengths]
    depths = [float(d) for d in depths]
    check_positive_int(fn, "trials", trials)
    check_positive_int(fn, "gen_tokens", gen_tokens)
    if not lengths or not depths:
        raise fail(fn, "lengths/depths", "must be non-empty", "at least one each", (lengths, depths))
    t0 = time.perf_counter()
    from sparseattn.models import model_and_tokenizer

    model, tokenizer = model_and_tokenizer(fn, model_name, model, tokenizer, dtype=dtype, device=device)
    dev = next(model.parameters()).device
    sentences = None
    haystack = "RULER filler"
    if text_files or text_dir:
        from sparseattn.eval.texts import documents_for

        docs, haystack = documents_for(text_files, text_dir)
        sentences = _sentences(docs)
    chosen = select_predictor(predictor=predictor, pattern=pattern, tuned=tuned, model=model, func=fn)
    pred, tuned_label = chosen.predictor, chosen.tuned_label
    if tuned is not None:
        dense_layers = chosen.dense_layers(dense_layers)
        predictor = f"tuned {tuned_label}"
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and max(lengths) + gen_tokens > max_pos:
        raise fail(fn, "lengths", "exceed the model's max_position_embeddings", f"<= {max_pos - gen_tokens}", max(lengths))

    from tqdm.auto import tqdm

    cases: list[dict[str, Any]] = []
    bar = tqdm(total=len(lengths) * len(depths) * trials, desc="niah", unit="case", disable=not progress)
    with torch.no_grad():
        for n in lengths:
            for di, d in enumerate(depths):
                for t in range(trials):
                    # a different needle per (length, depth, trial), the same for dense and sparse
                    pr = make_niah_prompt(tokenizer, length=n, depth=d, seed=seed * 100_003 + t * 7919 + di * 131 + n,
                                          sentences=sentences)
                    ids = pr["input_ids"].to(dev)
                    dense = greedy_generate(model, ids, gen_tokens=gen_tokens, score_last=1)
                    handle = patch_model(model, predictor=pred, dense_layers=dense_layers, backend=backend,
                                         dense_tail=dense_tail)
                    try:
                        sparse = greedy_generate(model, ids, gen_tokens=gen_tokens, score_last=1)
                    finally:
                        handle.unpatch()
                    rep = handle.sparsity_report()
                    mode_out: dict[str, str] = {}
                    for m in modes:  # each decode path after a dense prefill (gen_check's runs)
                        r = _run_mode(model, m, ids, gen_tokens, patch_kw={}, top_pages=top_pages, page_size=page_size,
                                      mixed_window=mixed_window, decode_backend=decode_backend, decode_layers=None)
                        mode_out[m] = tokenizer.decode(r["tokens"], skip_special_tokens=True)
                    d_txt = tokenizer.decode(dense["tokens"], skip_special_tokens=True)
                    s_txt = tokenizer.decode(sparse["tokens"], skip_special_tokens=True)
                    cases.append({"length": n, "depth": d, "trial": t, "key": pr["key"], "value": pr["value"],
                                  "needle_token": pr["needle_token"], "dense_output": d_txt, "sparse_output": s_txt,
                                  "dense_correct": pr["value"] in d_txt, "sparse_correct": pr["value"] in s_txt,
                                  "sparse_density": rep["mean_density"], "dense_prefill_s": dense["prefill_s"],
                                  "sparse_prefill_s": sparse["prefill_s"],
                                  "mode_output": mode_out, "mode_correct": {m: pr["value"] in t for m, t in mode_out.items()}})
                    bar.update(1)
    bar.close()
    grid: dict[str, list[list[float]]] = {"dense": [], "sparse": []}
    for name in grid:
        for d in depths:
            row = []
            for n in lengths:
                cs = [c[f"{name}_correct"] for c in cases if c["length"] == n and c["depth"] == d]
                row.append(sum(cs) / len(cs))
            grid[name].append(row)
    dens_by_len = {}
    for n in lengths:
        ds = [c["sparse_density"] for c in cases if c["length"] == n and c["sparse_density"] is not None]
        dens_by_len[str(n)] = sum(ds) / len(ds) if ds else float("nan")
    summary = {
        "dense_accuracy": sum(c["dense_correct"] for c in cases) / len(cases),
        "sparse_accuracy": sum(c["sparse_correct"] for c in cases) / len(cases),
        "agreement": sum(c["dense_correct"] == c["sparse_correct"] for c in cases) / len(cases),
        "sparse_density_by_length": dens_by_len,
        # per decode mode: accuracy, and the share of cases with dense's outcome
        "mode_accuracy": {m: sum(c["mode_correct"][m] for c in cases) / len(cases) for m in modes},
        "mode_agreement": {m: sum(c["mode_correct"][m] == c["dense_correct"] for c in cases) / len(cases) for m in modes},
        "total_s": time.perf_counter() - t0,
    }
    cfg = {"model": model_name, "sparse_config": (pattern if pattern is not None else
                                                 (predictor if isinstance(predictor, str) else describe_predictor(pred)["name"])),
           "predictor": describe_predictor(pred), "tuned": tuned_label, "dense_layers": sorted(dense_layers), "dense_tail": dense_tail, "trials": trials,
           "gen_tokens": gen_tokens, "haystack": haystack, "backend": backend, "seed": seed,
           "needle": _NEEDLE, "question": _TASK.split("\n")[-1], "answer_prefix": _ANSWER_PREFIX,
           "decode_modes": modes, "top_pages": top_pages, "page_size": page_size, "mixed_window": mixed_window,
           "decode_backend": decode_backend}
    return NiahResult(config=cfg, lengths=lengths, depths=depths, grid=grid, cases=cases, summary=summary,
                      environment=environment(dev))


def write_niah_report(res: NiahResult, out_dir: str | Path, *, plots: bool = True) -> dict[str, Path]:
    """Write ``niah.json``, ``niah.md`` and ``niah_heatmap.png`` into ``out_dir``."""
    from sparseattn.eval.plots import niah_heatmap, report_dir

    out, paths = report_dir("write_niah_report", out_dir, plots,
                            lambda d: niah_heatmap(res.grid, res.lengths, res.depths, d / "niah_heatmap.png",
                                                   title=f"NIAH {res.config['model']}: dense vs {res.config['sparse_config']}"))
    paths["json"] = out / "niah.json"
    paths["json"].write_text(json.dumps(res.to_dict(), indent=2))
    s = res.summary
    md = ["# sparseattn niah: dense vs sparse", "",
          f"- model `{res.config['model']}`; sparse `{res.config['sparse_config']}`; dense layers "
          f"{res.config['dense_layers'] or 'none'}"
          + (f"; dense query tail {res.config['dense_tail']} tokens" if res.config.get("dense_tail") else "")
          + f"; haystack: {res.config['haystack']}; {res.config['trials']} trial(s) per cell",
          f"- needle: \"{res.config['needle']}\"; scored by substring match of the value in {res.config['gen_tokens']} greedy tokens",
          f"- accuracy: dense **{s['dense_accuracy']:.1%}**, sparse **{s['sparse_accuracy']:.1%}**, same outcome in "
          f"{s['agreement']:.1%} of cases; run {s['total_s']:.0f} s", "",
          "| depth \\ length | " + " | ".join(str(n) for n in res.lengths) + " |",
          "|---|" + "---|" * len(res.lengths)]
    for di, d in enumerate(res.depths):
        md.append(f"| {d:.0%} | " + " | ".join(f"dense {res.grid['dense'][di][li]:.0%} / sparse {res.grid['sparse'][di][li]:.0%}"
                                                for li in range(len(res.lengths))) + " |")
    if s.get("mode_accuracy"):
        c0 = res.config
        md += ["", f"Decode modes (dense prefill; sparse_decode {c0['top_pages']} of the {c0['page_size']}-key pages, "
               f"mixed window {c0['mixed_window']}):", "", "| mode | accuracy | same outcome as dense | "
               + " | ".join(f"{n}" for n in res.lengths) + " |", "|---|---|---|" + "---|" * len(res.lengths)]
        for m, acc in s["mode_accuracy"].items():
            per = [[c["mode_correct"][m] for c in res.cases if c["length"] == n] for n in res.lengths]
            md.append(f"| {m} | {acc:.1%} | {s['mode_agreement'][m]:.1%} | "
                      + " | ".join(f"{sum(v) / len(v):.0%}" for v in per) + " |")
        md += ["", "| length | depth | trial | " + " | ".join(s["mode_accuracy"]) + " |",
               "|---|---|---|" + "---|" * len(s["mode_accuracy"])]
        for c in res.cases:
            md.append(f"| {c['length']} | {c['depth']:.2f} | {c['trial']} | " + " | ".join(
                f"{'✔' if c['mode_correct'][m] else '✘'} `{_clean(c['mode_output'][m])}`" for m in s["mode_accuracy"]) + " |")
    md += ["", "Mean sparse block density per length: " + ", ".join(f"{k}: {v:.3f}" for k, v in s["sparse_density_by_length"].items()),
           "", "| length | depth | trial | value | dense output | sparse output |", "|---|---|---|---|---|---|"]
    for c in res.cases:
        md.append(f"| {c['length']} | {c['depth']:.2f} | {c['trial']} | {c['value']} | "
                  f"{'✔' if c['dense_correct'] else '✘'} `{_clean(c['dense_output'])}` | "
                  f"{'✔' if c['sparse_correct'] else '✘'} `{_clean(c['sparse_output'])}` |")
    if "heatmap" in paths:
        md += ["", f"![NIAH heatmap]({paths['heatmap'].name})"]
    paths["markdown"] = out / "niah.md"
    paths["markdown"].write_text("\n".join(md) + "\n")
    return paths


def _clean(s: str) -> str:
    return s.replace("\n", "⏎").replace("|", "¦").replace("`", "'")[:60]
