"""Issue 17's RULER target in one picture: sparse − dense per task, model and length, for each predictor family.

Reads the per-prompt rows (`ruler_runs.jsonl`) of the runs recorded under `benchmarks/results/` (the list below,
one entry per file: the family it belongs to, the model, the seed its prompts came from, the configuration's label
prefix, and optionally the tasks to take from it). A prompt is (model, length, seed, task, sample); a prompt run twice
for one family (a GPU rerun of a CPU prompt) counts once, the later file winning. Per cell: the paired difference
in points (mean over prompts of sparse − dense), the number of prompts, and the mean block sparsity over the layers
the configuration predicted (runs older than that field: the block sparsity over every layer, the same thing for
SmolLM2, whose every layer is predicted).

Writes `docs/ruler_summary.md` (one table per family) and `docs/ruler_summary.png` (one heatmap panel per family:
cells coloured by the difference from −10 (red) to +10 points (green), the value in bold where it is below −2 or the
sparsity below 50%, grey where nothing was run).

Usage: python benchmarks/ruler_summary.py [--out-dir docs]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

R = Path(__file__).resolve().parent / "results"
TASKS = ["niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe"]
MEAN_SIM_SMOL = "mean_sim:score=mixed,cdf_threshold=0.95,keep_local=8 + dense tail 128"
MEAN_SIM_GEMMA = "mean_sim:score=mixed,cdf_threshold=0.9,keep_local=8,sim_threshold=0 + dense tail 128"
SAMPLED32 = "sampled:rows_per_block=32,cdf_threshold=0.9"  # cdf 0.93 (0.92 at Gemma 8K): the label says which
MEAN_SIM_GEMMA95 = "mean_sim:score=mixed,cdf_threshold=0.95,keep_local=8,sim_threshold=0 + dense tail 128"

FAMILIES = {
    "mean_sim (SmolLM2: cdf 0.95; Gemma: cdf 0.9, sim_threshold 0), tail 128": [
        ("SmolLM2-135M", "cpu_20261205_s15/ruler4k/ruler_runs_niah.jsonl", 0, MEAN_SIM_SMOL, TASKS[:4]),
        ("SmolLM2-135M", "cpu_20261205_s15/ruler4k/ruler_runs_vt_cwe_fwe.jsonl", 0, MEAN_SIM_SMOL, None),
        ("SmolLM2-135M", "cpu_20261205_s16/ruler8k/ruler_runs.jsonl", 0, MEAN_SIM_SMOL, None),
        ("Gemma-3-270M", "h100_20261206_s19/ruler_gemma_8k/ruler_runs.jsonl", 0, MEAN_SIM_GEMMA, None),
        ("Gemma-3-270M", "h100_20261206_s19/ruler_gemma_16k/ruler_runs.jsonl", 0, MEAN_SIM_GEMMA, None),
        ("Gemma-3-270M", "cpu_20261206_s19/ruler_gemma_16k_seed1_cpu/ruler_runs.jsonl", 1, MEAN_SIM_GEMMA, None),
        ("Gemma-3-270M", "h100_20261206_s19/ruler_gemma_16k_multikey_seed1/ruler_runs.jsonl", 1, MEAN_SIM_GEMMA, None),
        ("Gemma-3-270M", "h100_20261206_s19/ruler_gemma_32k/ruler_runs.jsonl", 0, MEAN_SIM_GEMMA, None),
    ],
    "sampled, 32 rows per block (cdf 0.93; Gemma 8K: 0.92), keep_local 8, tail 128": [
        ("SmolLM2-135M", "cpu_20261206_s21/ruler_smol4k_r32c93/ruler_runs.jsonl", 0, SAMPLED32, None),
        ("Gemma-3-270M", "h100_20261206_s21/s18_ruler_gemma/len8192_r32c92/ruler_runs.jsonl", 0, SAMPLED32, None),
        ("Gemma-3-270M", "h100_20261206_s21/s18_ruler_gemma/len16384_r32c93/ruler_runs.jsonl", 0, SAMPLED32, None),
        ("Gemma-3-270M", "h100_20261206_s21/s18_ruler_gemma/len16384_mk_s1/ruler_runs.jsonl", 1, SAMPLED32, None),
        # stopped by its time limit after the NIAH tasks and vt (8 prompts each) and 1 of 8 cwe prompts: cwe left out
        ("Gemma-3-270M", "h100_20261206_s21/s18_ruler_gemma/len32000_r32c93/ruler_runs.jsonl", 0, SAMPLED32, TASKS[:5]),
        ("Gemma-3-270M", "h100_20261206_s22/len32000_r32c93_cwe_fwe/ruler_runs.jsonl", 0, SAMPLED32, None),
        ("SmolLM2-135M", "h100_20261206_s22/smol8k_r32c93/ruler_runs.jsonl", 0, SAMPLED32, None),
    ],
    # twenty-second session: the union of both scores, a single-configuration candidate (CPU, SmolLM2 4K only)
    "union of mean_sim (cdf 0.9, sim_threshold 0) and sampled 32 rows (cdf 0.93), tail 128": [
        ("SmolLM2-135M", "cpu_20261206_s22/ruler_smol4k_union_r32/ruler_runs.jsonl", 0, "union:", None),
    ],
    # twenty-second session: does a higher cdf save mean_sim's two lost Gemma 16K multikey prompts? (one column)
    "mean_sim (Gemma: cdf 0.95, sim_threshold 0), tail 128": [
        ("Gemma-3-270M", "h100_20261206_s22/len16384_ms095/ruler_runs.jsonl", 0, MEAN_SIM_GEMMA95, None),
    ],
    # twenty-third session: sampled 32 rows on SmolLM2 4K at higher cdfs (one column each; 10 prompts per task, GPU)
    "sampled, 32 rows (SmolLM2: cdf 0.95), keep_local 8, tail 128": [
        ("SmolLM2-135M", "h100_20261206_s23/smol4k_r32c95c96/ruler_runs.jsonl", 0,
         "sampled:rows_per_block=32,cdf_threshold=0.95,", None),
    ],
    "sampled, 32 rows (SmolLM2: cdf 0.96), keep_local 8, tail 128": [
        ("SmolLM2-135M", "h100_20261206_s23/smol4k_r32c95c96/ruler_runs.jsonl", 0,
         "sampled:rows_per_block=32,cdf_threshold=0.96,", None),
    ],
    # thirty-first session: a fixed budget instead of a cdf (one configuration for every model and length; CPU)
    "sampled, 32 rows, top-k 0.35 of each row's blocks, keep_local 8, tail 128": [
        ("SmolLM2-135M", "cpu_20261207_s31/ruler_smol4k_r32_topk035/ruler_runs.jsonl", 0,
         "sampled:rows_per_block=32,topk=0.35,", None),
    ],
}
# the lengths the issue names for each model (a column is drawn, grey if not run)
COLUMNS = [("SmolLM2-135M", 4096), ("SmolLM2-135M", 8000), ("Gemma-3-270M", 8192), ("Gemma-3-270M", 16384),
           ("Gemma-3-270M", 32000)]


def prompt_pairs(entries: list) -> dict:
    """``{(model, length, task): [(sparse score − dense score, sparsity), ...]}``, one pair per prompt, for one
    family (scores in [0, 1])."""
    dense: dict = {}
    sparse: dict = {}
    for model, rel, seed, prefix, tasks in entries:
        path = R / rel
        if not path.exists():
            print(f"ruler_summary: {rel} is missing; its cells stay empty")
            continue
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            r = json.loads(line)
            if tasks is not None and r["task"] not in tasks:
                continue
            key = (model, r["length"], seed, r["task"], r["sample"])
            if r["config"] == "dense":
                dense[key] = r
            elif r["config"].startswith(prefix):
                sparse[key] = r
    out: dict = defaultdict(list)
    for key in sorted(set(dense) & set(sparse)):
        model, length, _, task, _ = key
        out[(model, length, task)].append((sparse[key]["score"] - dense[key]["score"],
                                           1.0 - sparse[key].get("density_predicted", sparse[key]["density"])))
    return out


def cells(entries: list) -> dict:
    """``{(model, length, task): (points, prompts, sparsity)}`` for one family."""
    out = prompt_pairs(entries)
    return {k: (100.0 * sum(d for d, _ in v) / len(v), len(v), sum(s for _, s in v) / len(v)) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", default=str(Path(__file__).resolve().parent.parent / "docs"))
    args = ap.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fams = {name: cells(entries) for name, entries in FAMILIES.items()}

    md = ["# RULER: sparse − dense per task, model and length (generated by `benchmarks/ruler_summary.py`)", "",
          "Points = mean over prompts of (sparse score − dense score) × 100, paired on the same prompts; n = prompts; "
          "sparsity = block sparsity over the layers the configuration predicted (Gemma: its 3 global layers). "
          "Float32 (CPU or GPU masked SDPA), dense tail 128, essays haystack. Target: every cell ≥ −2 points at ≥ 50% "
          "sparsity. \"not run\": no recorded prompt pairs for that cell. Details: [RULER.md](RULER.md).", "", "![RULER summary](ruler_summary.png)"]
    for name, c in fams.items():
        md += ["", f"## {name}", "", "| task | " + " | ".join(f"{m} {n}" for m, n in COLUMNS) + " |",
               "|---|" + "---:|" * len(COLUMNS)]
        for task in TASKS:
            row = []
            for m, n in COLUMNS:
                v = c.get((m, n, task))
                row.append("not run" if v is None else f"{v[0]:+.1f} (n={v[1]}, {100 * v[2]:.0f}%"
                           + (", **below 50%**)" if v[2] < 0.5 else ")"))
            md.append(f"| {task} | " + " | ".join(row) + " |")
    (out / "ruler_summary.md").write_text("\n".join(md) + "\n")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ncols = min(3, len(fams))
    nrows = -(-len(fams) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.2 * ncols, 4.6 * nrows), squeeze=False)
    for ax in axes.flat[len(fams):]:
        ax.axis("off")
    for ax, (name, c) in zip(axes.flat, fams.items()):
        grid = np.full((len(TASKS), len(COLUMNS)), np.nan)
        for i, task in enumerate(TASKS):
            for j, (m, n) in enumerate(COLUMNS):
                v = c.get((m, n, task))
                if v is not None:
                    grid[i, j] = v[0]
        cmap = matplotlib.colormaps["RdYlGn"].copy()
        cmap.set_bad("#d0d0d0")
        ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=-10, vmax=10, aspect="auto")
        for i, task in enumerate(TASKS):
            for j, (m, n) in enumerate(COLUMNS):
                v = c.get((m, n, task))
                txt = "not run" if v is None else f"{v[0]:+.1f}\nn={v[1]}, {100 * v[2]:.0f}%"
                if v is not None and v[2] < 0.5:
                    txt += " (<50%)"
                bad = v is not None and (v[0] < -2.0 or v[2] < 0.5)
                ax.text(j, i, txt, ha="center", va="center", fontsize=7, fontweight="bold" if bad else "normal")
        ax.set_xticks(range(len(COLUMNS)), [f"{m.split('-')[0]}\n{n}" for m, n in COLUMNS], fontsize=8)
        ax.set_yticks(range(len(TASKS)), TASKS, fontsize=8)
        ax.set_title(name, fontsize=8)
    fig.suptitle("RULER, sparse − dense (points; n prompts, sparsity of the predicted layers); target ≥ −2 at ≥ 50%",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "ruler_summary.png", dpi=130)
    print(f"wrote {out / 'ruler_summary.md'} and {out / 'ruler_summary.png'}")


if __name__ == "__main__":
    main()
