"""Sparsity-vs-accuracy curves of predictor configurations on a real model.

Runs :func:`sparseattn.eval.end_to_end.evaluate` (dense vs sparse prefill on the same real text)
for each predictor spec at one length, loading the model once, and appends one JSON line per
configuration to ``<out>/curve_<seq_len>.jsonl`` (so an interrupted sweep keeps what it measured).
``--plot`` turns every ``curve_*.jsonl`` in ``<out>`` into ``predictor_curves.png`` and a markdown
table (``predictor_curves.md``).

Usage::

    python -m sparseattn.eval.predictor_curves --seq-len 4096 --samples 2 \\
        --text-files '/path/to/essays/*.txt' --out docs/predictor_curves \\
        --specs 'mean_sim:cdf_threshold=0.9' 'sketch_walk'
    python -m sparseattn.eval.predictor_curves --plot --out docs/predictor_curves

Learned gate (docs/GATE.md): add ``'gate:path=gate.safetensors,topk=0.1'`` specs and
``--exclude-gate-texts gate.safetensors`` so that files the gate was trained on are dropped from
``--text-files`` (model-level numbers on unseen text); ``'oracle:topk=0.1,cdf_threshold=None'``
specs give the oracle frontier. ``--device cuda --dtype bfloat16`` for a GPU run.

Per configuration: mean block sparsity over *all* patched layers (dense layers count as 0),
logits cosine, top-1 agreement and KL over the last ``seq_len // 2`` positions (``evaluate``'s
defaults), and whether the targets (cosine >= 0.99, top-1 >= 0.95, sparsity >= 0.5) are met.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from sparseattn._validation import fail

TARGETS = {"logits_cosine": 0.99, "top1_agreement": 0.95, "sparsity": 0.50}


def family(spec: str) -> str:
    name = spec.split(":", 1)[0]
    if name == "sketch_walk" and "walk=false" in spec.lower():
        return "sketch_walk (walk=False)"
    if name == "sketch_walk" and "per_head=true" in spec.lower():
        return "sketch_walk (per_head)"
    if name == "static":
        return "static"
    if name in ("gate", "oracle"):
        return name
    if name == "mean_sim":
        low = spec.lower()
        score = "mixed" if "score=mixed" in low else "minmax" if "score=minmax" in low else "mean"
        return f"mean_sim (score={score})"
    return name


def held_out_files(text_files: list[str], gate_files: list[str]) -> list[str]:
    """The files of ``text_files`` (paths / globs, expanded and sorted per pattern) that none of the gate
    files was trained on (their metadata ``training.texts``), so model-level numbers use unseen text.

    Raises:
        ValueError: a pattern matching no file, an unreadable gate file, or no file left.
    """
    import glob
    import os

    from sparseattn.gate.store import load_gate

    seen: set[str] = set()
    for g in gate_files:
        texts = (load_gate(g).meta.get("training") or {}).get("texts") or []
        seen |= {os.path.realpath(t) for t in texts if isinstance(t, str)}
    out: list[str] = []
    for pat in text_files:
        files = [f for f in sorted(glob.glob(os.path.expanduser(pat), recursive=True)) if os.path.isfile(f)]
        if not files:
            raise fail("held_out_files", "text file", "matches no file", "an existing path or glob", repr(pat))
        out += [f for f in files if os.path.realpath(f) not in seen]
    if not out:
        raise fail("held_out_files", "text_files", "are all training texts of the gate", "some held-out text files",
                   f"{len(seen)} training texts")
    return out


def run_specs(specs: list[str], *, seq_len: int, samples: int, text_files: list[str], out: Path,
              model_name: str = "smollm2-135m", device: str = "cpu", dtype: str = "float32",
              dense_layers: list[int] | None = None) -> list[dict[str, Any]]:
    import torch

    from sparseattn.eval.end_to_end import evaluate
    from sparseattn.eval.env import environment
    from sparseattn.models import load

    torch.manual_seed(0)
    model, tok = load(model_name, dtype=getattr(torch, dtype), device=device)
    out.mkdir(parents=True, exist_ok=True)
    env = environment(device)
    rows = []
    for spec in specs:
        t0 = time.perf_counter()
        res = evaluate(model=model, tokenizer=tok, predictor=spec, seq_len=seq_len, samples=samples, gen_tokens=0,
                       self_check=False, text_files=text_files, progress=False, timing_repeats=0,
                       dense_layers=dense_layers or ())
        s = res.summary
        dens_all = res.config.get("mean_density_all_layers")
        row = {"spec": spec, "family": family(spec), "seq_len": seq_len, "samples": samples, "model": model_name,
               "sparsity": None if dens_all is None else 1.0 - dens_all,
               "sparsity_sparse_layers": None if res.config.get("mean_density_sparse_layers") is None
               else 1.0 - res.config["mean_density_sparse_layers"],
               "logits_cosine": s["logits_cosine"]["mean"], "top1_agreement": s["top1_agreement"]["mean"],
               "top5_overlap": s["top5_overlap"]["mean"], "kl": s["kl_dense_sparse"]["mean"],
               "wall_s": time.perf_counter() - t0}
        row["meets_targets"] = bool(row["sparsity"] is not None and row["sparsity"] >= TARGETS["sparsity"]
                                    and row["logits_cosine"] >= TARGETS["logits_cosine"]
                                    and row["top1_agreement"] >= TARGETS["top1_agreement"])
        rows.append(row)
        with open(out / f"curve_{seq_len}.jsonl", "a") as f:
            f.write(json.dumps({**row, "environment": env}) + "\n")
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    return rows


def load_rows(out: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for p in sorted(out.glob("curve_*.jsonl")):
        for n, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise fail("load_rows", f"curve file {p}", f"line {n} is not valid JSON ({exc.msg})",
                               "one JSON object per line", repr(line[:40])) from None
                if not isinstance(row, dict) or not isinstance(row.get("spec"), str):
                    raise fail("load_rows", f"curve file {p}", f"line {n} is not a row object with a 'spec' string",
                               "{'spec': ..., 'seq_len': ..., ...}", type(row).__name__)
                row["family"] = family(row["spec"])
                rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| length | predictor spec | sparsity (all layers) | logits cosine | top-1 | KL | meets targets |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["seq_len"], r["family"], -(r["sparsity"] or 0))):
        lines.append(f"| {r['seq_len']} | `{r['spec']}` | {r['sparsity']:.3f} | {r['logits_cosine']:.4f} | "
                     f"{r['top1_agreement']:.4f} | {r['kl']:.4f} | {'yes' if r['meets_targets'] else 'no'} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["seq_len"] for r in rows})
    metrics = (("logits_cosine", 0.99), ("top1_agreement", 0.95), ("kl", None))
    fig, axes = plt.subplots(len(metrics), len(lengths), figsize=(5.5 * len(lengths), 11), squeeze=False)
    fams = sorted({r["family"] for r in rows})
    markers = dict(zip(fams, "osD^vP*X"))
    for c, n in enumerate(lengths):
        for r_i, (metric, target) in enumerate(metrics):
            ax = axes[r_i][c]
            for fam in fams:
                pts = sorted((r["sparsity"], r[metric]) for r in rows if r["seq_len"] == n and r["family"] == fam)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers[fam], label=fam)
            if target is not None:
                ax.axhline(target, color="gray", ls="--", lw=0.8)
            else:
                ax.set_yscale("log")
            ax.axvline(0.5, color="gray", ls=":", lw=0.8)
            ax.set_xlabel("block sparsity (all patched layers)")
            ax.set_ylabel("KL(dense || sparse), nats" if metric == "kl" else metric.replace("_", " "))
            ax.set_title(f"{rows[0].get('model', 'SmolLM2-135M')}, {n} tokens")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sparseattn.eval.predictor_curves")
    ap.add_argument("--specs", nargs="*", default=[])
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--text-files", nargs="*", default=[])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", default="predictor-curves")
    ap.add_argument("--plot", action="store_true", help="plot + markdown from every curve_*.jsonl in --out")
    ap.add_argument("--exclude-gate-texts", nargs="*", default=[], metavar="GATE",
                    help="drop from --text-files every file these gate files were trained on (held-out evaluation)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--dense-layers", type=int, nargs="*", default=[], help="layers kept dense for every spec")
    args = ap.parse_args(argv)
    out = Path(args.out)
    text_files = args.text_files
    if args.exclude_gate_texts:
        text_files = held_out_files(text_files, args.exclude_gate_texts)
        print(f"held-out text files: {len(text_files)}", file=sys.stderr)
    if args.specs:
        run_specs(args.specs, seq_len=args.seq_len, samples=args.samples, text_files=text_files, out=out,
                  model_name=args.model, device=args.device, dtype=args.dtype, dense_layers=args.dense_layers)
    if args.plot:
        rows = load_rows(out)
        plot(rows, out / "predictor_curves.png")
        (out / "predictor_curves.md").write_text(markdown(rows))
        print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
