"""``sparseattn tune``: per-(layer, head) mean_sim (or learned-gate) parameters under an error budget (docs/TUNING.md).

Runs :func:`sparseattn.tuning.run.tune_model` on ``--samples`` calibration samples, writes the tuned
file (:func:`sparseattn.tuning.store.save_tuned`), reads it back with the model check, and writes a
report next to it: ``<out>.md``, ``<out>.json`` and ``<out>.heads.png`` (per-layer × per-head
sparsity; skipped with a note when matplotlib is missing). ``--compare`` then runs the untuned
default predictor and the tuned file on ``--compare-samples`` further samples (never the calibration
ones) and reports sparsity, logits cosine, top-1 agreement and KL against the dense model for both.
``--gate FILE`` tunes the learned gate's per-head CDF threshold (and local window) instead of mean_sim's
thresholds; the tuned file embeds the gate, and ``--compare`` adds the untuned gate as a row.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from sparseattn.cli._args import (add_model_and_texts, any_int, check_out_file, check_text_source, density, device,
                                  device_and_dtype, layer_budgets, load_model_for, nonneg_int, optional_int_list,
                                  positive_float, positive_int)


#: the layer-wide local window of a gate tuning run unless --keep-local says otherwise (docs/GATE.md: the v2 gate's
#: frontier is closest to the oracle with 4 local blocks)
GATE_KEEP_LOCAL = 4


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "tune", help="tune mean_sim (or a learned gate) per head under an error budget, or per layer by KL "
                     "sensitivity (--allocate); writes a .safetensors file + report",
        description="Search, per layer and head, the sparsest mean_sim setting (sim/cdf thresholds, optional P·V "
                    "skip) whose attention output stays within the error budget on calibration samples; heads no "
                    "setting keeps under the budget stay dense. --gate FILE searches a learned gate instead; "
                    "--allocate --kl-budget F gives each layer one threshold by its model-level KL sensitivity. "
                    "Writes --out (safetensors, no pickle) and "
                    "<out>.md / <out>.json / <out>.heads.png. Use the file with patch_model(tuned=...) or "
                    "--tuned of eval, niah and bench-model. See docs/TUNING.md.")
    add_model_and_texts(p, random_ids_help="random token ids instead of text (no tokenizer needed; for smoke tests, "
                                           "not for real tuning)")
    p.add_argument("--samples", type=positive_int, default=8, help="calibration samples (default 8)")
    p.add_argument("--seq-len", type=positive_int, default=4096, help="tokens per sample (default 4096)")
    p.add_argument("--l1", type=positive_float, default=None,
                   help="error budget per head under --rule (default 0.06: relative L1 of the attention output)")
    p.add_argument("--pv-l1", type=positive_float, default=None,
                   help="budget for adding the P·V skip on top of the block selection (default: no P·V skip)")
    p.add_argument("--layer-l1", type=layer_budgets, default="",
                   help="per-layer budgets overriding --l1, e.g. '0-5:0.04,21-:0.08'")
    p.add_argument("--keep-local-grid", type=optional_int_list(1, "local block counts"), default=[],
                   help="per-head local block counts also tried after the sim/cdf search, e.g. 4,2,1 "
                        "(values below the default predictor's keep_local; default: none, one value per layer)")
    p.add_argument("--rule", default="l1", choices=["l1", "cosine", "rmse"],
                   help="error rule between the sparse and the dense attention output of a head (default l1)")
    p.add_argument("--dense-layers", type=optional_int_list(0, "layer indices"), default=[],
                   help="comma-separated layers kept dense (not tuned), e.g. 0,1")
    p.add_argument("--gate", metavar="FILE", default=None,
                   help="tune a learned gate (a file from sparseattn train-gate) instead of mean_sim: per head its CDF "
                        "threshold (and with --keep-local-grid its local window); the tuned file embeds the gate")
    p.add_argument("--keep-local", type=positive_int, default=None,
                   help="layer-wide local blocks (the diagonal block and the N-1 before it) every head keeps; "
                        f"default: the default predictor's for mean_sim, {GATE_KEEP_LOCAL} with --gate")
    al = p.add_argument_group(
        "per-layer allocation", "instead of the per-head search: one CDF threshold per layer, chosen from each layer's "
        "model-level KL sensitivity (one forward per layer with only that layer sparse) and its sparsity / missed-mass "
        "curves, under a predicted KL budget (docs/TUNING.md)")
    al.add_argument("--allocate", action="store_true", help="allocate per-layer thresholds (needs --kl-budget)")
    al.add_argument("--kl-budget", type=positive_float, default=None,
                    help="predicted total KL(dense || sparse) of the logits, e.g. 0.006")
    al.add_argument("--probe-cdf", type=density, default=None,
                    help="threshold of the sensitivity forwards (default 0.85; must be a grid value)")
    al.add_argument("--sensitivity-samples", type=positive_int, default=1,
                    help="calibration samples the sensitivity forwards run on (the first ones; default 1)")
    cal = p.add_argument_group(
        "model-level calibration", "after the per-head search, bisect one global knob (each sparse head's CDF tail "
        "1 - cdf scaled by s) for the sparsest setting whose model-level metrics meet the targets on the first "
        "--calibrate-samples calibration samples (never the --compare ones); each probe is one forward per sample")
    cal.add_argument("--target-top1", type=density, default=None,
                     help="top-1 agreement with the dense model to reach, e.g. 0.95 (enables calibration)")
    cal.add_argument("--target-kl", type=positive_float, default=None, help="KL(dense || sparse) to stay under")
    cal.add_argument("--target-cosine", type=density, default=None, help="logits cosine to reach")
    cal.add_argument("--calibrate-samples", type=positive_int, default=2,
                     help="calibration samples scored per probe (the first ones; default 2)")
    cal.add_argument("--from-file", metavar="FILE", default=None,
                     help="skip the per-head search and start from this tuned file (tuned on the same first "
                          "--samples windows): calibrate and/or --compare only")
    cal.add_argument("--calibrate-steps", type=nonneg_int, default=5, help="bisection steps (default 5)")
    p.add_argument("--out", default="tuned.safetensors", help="the tuned file (default ./tuned.safetensors)")
    p.add_argument("--compare", action="store_true",
                   help="after tuning, compare the untuned default predictor with the tuned file on held-out samples")
    p.add_argument("--compare-samples", type=positive_int, default=2,
                   help="held-out samples for --compare (taken after the calibration ones; default 2)")
    p.add_argument("--score-last", type=positive_int, default=None,
                   help="--compare: logits positions compared (the last ones; default seq-len/2)")
    p.add_argument("--backend", default="auto", choices=["auto", "masked_sdpa", "attention", "reference", "triton"],
                   help="--compare: patch_model backend (default auto)")
    p.add_argument("--device", type=device, default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="model dtype (default float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--seed", type=any_int, default=0, help="seed of --random-ids")
    p.add_argument("--no-plot", action="store_true", help="skip the heatmap PNG")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=run)


def _log(msg: str, on: bool) -> None:
    if on:
        print(f"[tune] {msg}", file=sys.stderr, flush=True)


def report_paths(out: Path) -> dict[str, Path]:
    """``<out>.md``, ``<out>.json`` and ``<out>.heads.png`` (``out``'s suffix replaced)."""
    stem = out.with_suffix("") if out.suffix else out
    return {"md": Path(f"{stem}.md"), "json": Path(f"{stem}.json"), "png": Path(f"{stem}.heads.png")}


def run(args: argparse.Namespace) -> int:
    import dataclasses
    import time

    import torch

    from sparseattn._validation import fail

    fn = "tune"
    progress = not args.quiet
    check_text_source(fn, args.text_file, args.text_dir)
    if args.from_file is not None and not Path(args.from_file).expanduser().is_file():
        raise fail(fn, f"--from-file {args.from_file}", "does not exist", "a tuned .safetensors file", "no such file")
    if args.gate is not None and args.from_file is not None:
        raise fail(fn, "--gate", "cannot be combined with --from-file (the tuned file already holds its gate)",
                   "--gate FILE or --from-file FILE", "both")
    if args.allocate:
        if args.kl_budget is None:
            raise fail(fn, "--allocate", "needs --kl-budget", "--allocate --kl-budget F (e.g. 0.006)", "no budget")
        for flag, given in (("--l1", args.l1 is not None), ("--pv-l1", args.pv_l1 is not None),
                            ("--layer-l1", bool(args.layer_l1)), ("--keep-local-grid", bool(args.keep_local_grid)),
                            ("--rule", args.rule != "l1"), ("--from-file", args.from_file is not None)):
            if given:
                raise fail(fn, flag, "does not apply to --allocate (the per-head search's option)",
                           "--allocate --kl-budget F [--probe-cdf C] [--sensitivity-samples N]", flag)
    elif args.kl_budget is not None or args.probe_cdf is not None:
        raise fail(fn, "--kl-budget/--probe-cdf", "need --allocate", "--allocate --kl-budget F", "no --allocate")
    if args.l1 is None:
        args.l1 = 0.06
    gate = None
    if args.gate is not None:
        from sparseattn.gate.store import load_gate

        if not Path(args.gate).expanduser().is_file():
            raise fail(fn, f"--gate {args.gate}", "does not exist", "a gate .safetensors file from sparseattn train-gate",
                       "no such file")
        gate = load_gate(args.gate)  # a bad file fails here, before the model loads
    out = check_out_file(fn, args.out, "tuned.safetensors", (".md", ".json", ".png"))
    dev, dtype = device_and_dtype(args)

    t0 = time.perf_counter()
    model, tokenizer = load_model_for(fn, args, dev, dtype, lambda line: _log(line, progress))
    n_cmp = args.compare_samples if args.compare else 0
    from sparseattn.eval.texts import sample_ids

    ids, names, source = sample_ids(model, tokenizer, seq_len=args.seq_len, samples=args.samples + n_cmp,
                                      text_files=args.text_file, text_dir=args.text_dir,
                                      random_ids=args.random_ids, seed=args.seed)
    tune_ids, cmp_ids = ids[:args.samples], ids[args.samples:]
    _log(f"{len(tune_ids)} calibration samples x {args.seq_len} tokens from {source}"
         + (f"; {len(cmp_ids)} held out for --compare" if cmp_ids else ""), progress)

    from sparseattn.tuning.run import tune_model
    from sparseattn.tuning.store import load_tuned, model_fingerprint, save_tuned

    from sparseattn.eval.defaults import DEFAULT_PREDICTOR_SPEC
    from sparseattn.predictors.resolve import resolve_predictor

    # the layer-wide fields (blocks, sink, local, score) of the project default: --compare is then like for like
    base = resolve_predictor(DEFAULT_PREDICTOR_SPEC).config
    if gate is not None:
        from sparseattn.gate.store import check_gate_for_model

        check_gate_for_model(gate, model, label=f"gate file {args.gate}", func=fn)
        base = dataclasses.replace(base, block_m=gate.block_m, block_n=gate.block_n,
                                   keep_local=args.keep_local or GATE_KEEP_LOCAL)
    elif args.keep_local is not None:
        base = dataclasses.replace(base, keep_local=args.keep_local)
    if args.from_file:
        # no search: calibrate / compare an existing file (its calibration texts must be these first samples)
        cfg = load_tuned(args.from_file, model=model)
        cfg.meta.pop("calibration", None)
        _log(f"per-head search skipped: starting from {args.from_file}", progress)
    else:
        if args.allocate:
            from sparseattn.tuning.allocate import DEFAULT_PROBE, allocate_model

            cfg = allocate_model(model, [t.to(dev) for t in tune_ids], kl_budget=args.kl_budget, base=base, gate=gate,
                                 probe=DEFAULT_PROBE if args.probe_cdf is None else args.probe_cdf,
                                 sensitivity_samples=min(args.sensitivity_samples, len(tune_ids)),
                                 score_last=args.score_last, dense_layers=tuple(args.dense_layers),
                                 backend=args.backend, progress=progress,
                                 log=(lambda line: _log(line, True)) if progress else None)
        else:
            with torch.no_grad():
                cfg = tune_model(model, [t.to(dev) for t in tune_ids], l1=args.l1, pv_l1=args.pv_l1,
                                 layer_l1=args.layer_l1, rule=args.rule, dense_layers=tuple(args.dense_layers),
                                 base=base, progress=progress,
                                 log=(lambda line: _log(line, True)) if progress else None,
                                 keep_local_grid=tuple(args.keep_local_grid), gate=gate)
    calibrating = any(x is not None for x in (args.target_top1, args.target_kl, args.target_cosine))
    if calibrating:
        from sparseattn.tuning.calibrate import calibrate_tuned

        n_cal = min(args.calibrate_samples, len(tune_ids))
        _log(f"calibrate: {n_cal} calibration samples, targets top1={args.target_top1} kl={args.target_kl} "
             f"cosine={args.target_cosine}", progress)
        cfg = calibrate_tuned(model, cfg, [t.to(dev) for t in tune_ids[:n_cal]], target_top1=args.target_top1,
                              target_kl=args.target_kl, target_cosine=args.target_cosine,
                              steps=args.calibrate_steps, score_last=args.score_last, backend=args.backend,
                              dense_layers=tuple(args.dense_layers), progress=progress,
                              log=lambda line: _log(line, True))
        cfg.meta["calibration"]["sample_names"] = [", ".join(n) for n in names[:n_cal]]
        cal = cfg.meta["calibration"]
        _log(f"calibrate: {'met' if cal['met'] else 'NOT met (even scale 0)'}; scale {cal['scale']:.4g} "
             f"after {len(cal['probes'])} probes, {cal['seconds']:.1f} s", progress)
    cfg.meta["model"] = args.model
    cfg.meta["fingerprint"] = model_fingerprint(model)  # the exact check load_tuned(model=...) applies
    cfg.meta["samples"] = [", ".join(n) for n in names[:args.samples]]
    cfg.meta["text_source"] = source
    path = save_tuned(out, cfg)
    cfg = load_tuned(path, model=model)  # what every later user reads: checked now
    tune_s = time.perf_counter() - t0
    _log(f"wrote {path} ({tune_s:.1f} s so far)", progress)

    comparison = None
    if args.compare:
        comparison = _compare(model, path, cmp_ids, [", ".join(n) for n in names[args.samples:]], args, dev, progress,
                              untuned=_untuned_spec(cfg) if args.gate else None)

    from sparseattn.eval.env import environment

    paths = report_paths(path)
    report = {
        "tool": "sparseattn tune", "tuned_file": str(path), "model": args.model, "device": dev,
        "dtype": str(dtype).replace("torch.", ""), "text_source": source,
        "arguments": {"samples": args.samples, "seq_len": args.seq_len, "l1": args.l1, "pv_l1": args.pv_l1,
                      "layer_l1": args.layer_l1, "rule": args.rule, "dense_layers": list(args.dense_layers),
                      "keep_local_grid": list(args.keep_local_grid), "gate": args.gate, "keep_local": args.keep_local,
                      "allocate": args.allocate, "kl_budget": args.kl_budget, "probe_cdf": args.probe_cdf,
                      "sensitivity_samples": args.sensitivity_samples,
                      "target_top1": args.target_top1, "target_kl": args.target_kl,
                      "target_cosine": args.target_cosine, "calibrate_samples": args.calibrate_samples,
                      "calibrate_steps": args.calibrate_steps},
        "calibration_samples": cfg.meta["samples"], "summary": cfg.summary(), "meta": cfg.meta,
        "heads": {str(li): {"sparsity": [round(float(x), 6) for x in hp.sparsity],
                            "error": [round(float(x), 6) for x in hp.error],
                            "dense": [bool(x) for x in hp.dense]} for li, hp in sorted(cfg.layers.items())},
        "compare": comparison, "seconds": time.perf_counter() - t0, "environment": environment(dev),
    }
    plot_note = None
    if args.no_plot:
        plot_note = "heatmap skipped (--no-plot)"
    else:
        try:
            what = f"KL budget {args.kl_budget:g}, per layer" if args.allocate else f"{args.rule} <= {args.l1:g}"
            heatmap(cfg, paths["png"], title=f"{args.model}: tuned block sparsity per head ({what})")
        except ImportError as exc:
            plot_note = f"heatmap skipped: {exc}"
    report["plot"] = None if plot_note else paths["png"].name
    report["plot_note"] = plot_note
    _write_json(paths["json"], report)
    paths["md"].write_text(markdown(report), encoding="utf-8")
    print(_table(report))
    print("tuned: " + str(path))
    print("report: " + ", ".join(str(paths[k]) for k in ("md", "json", "png") if k != "png" or not plot_note))
    return 0


def _untuned_spec(cfg: Any) -> str | None:
    """For a gate-tuned file: the untuned gate's spec fields (the gate's default CDF with the file's sink and
    local window); None for mean_sim."""
    if cfg.gate is None:
        return None
    from sparseattn.predictors.gate import DEFAULT_CDF

    pr = cfg.meta["predictor"]
    return f"cdf_threshold={DEFAULT_CDF},keep_local={int(pr['keep_local'])},keep_sink={bool(pr['keep_sink'])}"


def _compare(model: Any, path: Path, ids_list: list[Any], names: list[str], args: argparse.Namespace, dev: str,
             progress: bool, untuned: str | None = None) -> dict[str, Any]:
    """Dense vs the untuned default predictor vs the tuned file on held-out samples (same settings otherwise);
    ``untuned`` (a gate-tuned file): the untuned gate's spec fields, one more row (``gate``) between them."""
    import torch

    from sparseattn.eval.defaults import DEFAULT_PREDICTOR_SPEC
    from sparseattn.eval.end_to_end import logits_metrics
    from sparseattn.integrations.transformers_patch import patch_model

    k = args.score_last or max(1, args.seq_len // 2)
    k = min(k, args.seq_len)

    def logits(ids: Any) -> torch.Tensor:
        return model(ids, use_cache=False, logits_to_keep=k).logits[0, -k:].float()

    _log(f"compare: dense logits on {len(ids_list)} held-out samples", progress)
    with torch.no_grad():
        dense = [logits(t.to(dev)) for t in ids_list]
        sides: dict[str, Any] = {"default": {"spec": DEFAULT_PREDICTOR_SPEC, "kw": {"predictor": DEFAULT_PREDICTOR_SPEC}}}
        if untuned is not None:
            spec = f"gate:path={args.gate},{untuned}"
            sides["gate"] = {"spec": spec, "kw": {"predictor": spec}}
        sides["tuned"] = {"spec": str(path), "kw": {"tuned": path}}
        res: dict[str, Any] = {"samples": names, "scored_positions": k, "backend": args.backend,
                               "dense_layers": list(args.dense_layers), "rows": {}}
        for side, d in sides.items():
            _log(f"compare: {side} ({d['spec']})", progress)
            per = []
            with patch_model(model, dense_layers=list(args.dense_layers), backend=args.backend, **d["kw"]) as h:
                for t, ref in zip(ids_list, dense):
                    per.append(logits_metrics(logits(t.to(dev)), ref))
                rep = h.sparsity_report()
            sparse_layers = [e["sparsity"] for e in rep["layers"].values()
                             if e["mode"] == "sparse" and e["sparsity"] is not None]
            row = {key: sum(m[key] for m in per) / len(per) for key in per[0]}
            row.update(spec=d["spec"], sparsity=rep["mean_sparsity"],
                       sparsity_sparse_layers=(sum(sparse_layers) / len(sparse_layers)) if sparse_layers else None,
                       per_sample=per)
            res["rows"][side] = row
    return res


def heatmap(cfg: Any, path: Path, *, title: str = "") -> Path:
    """Layers × heads image of the tuned block sparsity; dense heads marked ``D``, untuned layers blank."""
    import torch

    from sparseattn.eval.plots import _plt

    plt = _plt()
    n_layers = int(cfg.meta["fingerprint"]["num_hidden_layers"])
    n_heads = int(cfg.meta["fingerprint"]["num_attention_heads"])
    grid = torch.full((n_layers, n_heads), float("nan"))
    for li, hp in cfg.layers.items():
        grid[li] = torch.where(hp.dense, torch.zeros_like(hp.sparsity), hp.sparsity.float())
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * n_heads + 2.2), max(3.0, 0.22 * n_layers + 1.4)))
    im = ax.imshow(grid.numpy(), cmap="viridis", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    for li, hp in cfg.layers.items():
        for h in torch.nonzero(hp.dense).flatten().tolist():
            ax.text(h, li, "D", ha="center", va="center", fontsize=7, color="white")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    fig.colorbar(im, ax=ax, fraction=0.046, label="block sparsity (calibration mean)")
    ax.set_title(title or "tuned block sparsity per head", fontsize=9)
    fig.text(0.01, 0.01, "D: dense head; blank: layer not tuned (dense)", fontsize=7)
    fig.tight_layout()
    p = Path(path)
    fig.savefig(p, dpi=120)
    plt.close(fig)
    return p


def _write_json(path: Path, data: Any) -> None:
    import json
    import math

    def default(o: Any) -> Any:
        return str(o)

    def clean(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    path.write_text(json.dumps(clean(data), indent=2, default=default) + "\n", encoding="utf-8")


def _f(x: Any, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def _table(rep: dict[str, Any]) -> str:
    s = rep["summary"]
    lines = [f"tuned {len(s['layers'])} layers of {rep['meta']['fingerprint']['num_hidden_layers']}; "
             f"mean block sparsity (calibration) {_f(s['mean_sparsity'], '.3f')}"]
    cmp = rep.get("compare")
    if cmp:
        lines.append("side     sparsity  cosine    top-1    KL")
        for side, r in cmp["rows"].items():
            lines.append(f"{side:<8} {_f(r['sparsity'], '.3f'):>8}  {r['logits_cosine']:.6f}  "
                         f"{r['top1_agreement']:.2%}  {r['kl_dense_sparse']:.4g}")
    return "\n".join(lines)


def markdown(rep: dict[str, Any]) -> str:
    """The ``<out>.md`` report."""
    a = rep["arguments"]
    meta = rep["meta"]
    out = [f"# sparseattn tune: {rep['model']}", "",
           f"- tuned file: `{rep['tuned_file']}` (load with `patch_model(model, tuned=...)` or `--tuned`)",
           (f"- per-layer allocation: predicted KL budget {a['kl_budget']:g}, probe cdf "
            f"{meta['allocation']['probe']:g}, {a['sensitivity_samples']} sensitivity sample(s); per-layer error = the "
            "layer's predicted KL share" if a.get("allocate") else
            f"- rule `{a['rule']}`, budget l1 = {a['l1']:g}" + (f", pv_l1 = {a['pv_l1']:g}" if a['pv_l1'] else "")
            + (f", per layer `{a['layer_l1']}`" if a['layer_l1'] else "")),
           f"- {a['samples']} calibration samples × {a['seq_len']} tokens from {rep['text_source']}",
           f"- dense layers (not tuned): {a['dense_layers'] or 'none'}",
           f"- device {rep['device']}, dtype {rep['dtype']}, tuning time {_f(meta.get('seconds'), '.1f')} s, "
           f"total {rep['seconds']:.1f} s",
           f"- layer-wide predictor fields: `{meta.get('predictor')}`", "",
           "## Per layer (calibration samples)", "",
           "| layer | mean sparsity | worst error | dense heads |", "|---:|---:|---:|---:|"]
    for li, r in rep["summary"]["layers"].items():
        out.append(f"| {li} | {r['sparsity']:.3f} | {r['max_error']:.4g} | {r['dense_heads']} |")
    out += ["", f"Mean block sparsity over tuned layers: {_f(rep['summary']['mean_sparsity'], '.3f')}", ""]
    cal = meta.get("calibration")
    if cal:
        out += ["## Model-level calibration (calibration samples)", "",
                f"Knob: {cal['knob']}. Targets {cal['targets']} on {cal['samples']} calibration samples "
                f"({'; '.join(cal.get('sample_names') or [])}); chosen scale **{cal['scale']:.4g}** "
                f"({'met' if cal['met'] else 'not met, even at scale 0'}), {cal['seconds']:.1f} s.", "",
                "| probe | scale | sparsity | top-1 | KL | cosine | pass | s |", "|---:|---:|---:|---:|---:|---:|---|---:|"]
        for i, pr in enumerate(cal["probes"]):
            out.append(f"| {i + 1} | {pr['scale']:.4g} | {_f(pr['sparsity'], '.4f')} | {pr['top1_agreement']:.4f} "
                       f"| {pr['kl_dense_sparse']:.4g} | {pr['logits_cosine']:.6f} | {'yes' if pr['passed'] else 'no'} "
                       f"| {pr['seconds']} |")
        out.append("")
    if rep.get("plot"):
        out += [f"![per-head sparsity]({rep['plot']})", ""]
    elif rep.get("plot_note"):
        out += [f"_{rep['plot_note']}_", ""]
    cmp = rep.get("compare")
    if cmp:
        out += ["## Untuned default vs tuned (held-out samples)", "",
                f"Samples not used for tuning: {'; '.join(cmp['samples'])}. Logits of the last "
                f"{cmp['scored_positions']} positions against the dense model; backend `{cmp['backend']}`, dense "
                f"layers {cmp['dense_layers'] or 'none'} on both sides.", "",
                "| predictor | sparsity (all layers) | sparsity (sparse layers) | logits cosine | top-1 | KL (nats) |",
                "|---|---:|---:|---:|---:|---:|"]
        for side, r in cmp["rows"].items():
            out.append(f"| {side} `{r['spec']}` | {_f(r['sparsity'], '.3f')} | {_f(r['sparsity_sparse_layers'], '.3f')} "
                       f"| {r['logits_cosine']:.6f} | {r['top1_agreement']:.2%} | {r['kl_dense_sparse']:.4g} |")
        out.append("")
    return "\n".join(out)
