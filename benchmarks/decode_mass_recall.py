"""Attention-mass recall of sparse decode's page selection on a real model (issue 14's accuracy study).

For a prompt of ``--length`` tokens, generates a few greedy tokens with exact (all-page) decode and, at decode
steps ``--steps``, compares per layer and query head the share of the dense attention mass that Quest's
selection keeps at each budget with the best shared selection (the oracle, from the dense scores): see
:mod:`sparseattn.eval.decode_recall`. Budgets: a fraction of the pages (``0.1``) or a page count (``64``);
``--token-budgets`` adds key budgets (pages = ceil(keys / page size)).

Usage::

    python benchmarks/decode_mass_recall.py --text-dir ../shared/data/essays --length 4096 --out DIR
    (GPU: add --device cuda --dtype bfloat16)

Writes ``mass_recall.json`` and prints a markdown table.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--text-dir", default=None)
    src.add_argument("--random-ids", action="store_true")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--steps", default="1,8,24", help="decode steps to capture (1 = first after the prefill)")
    ap.add_argument("--budgets", default="0.1,0.25,0.5", help="fractions of the pages or page counts")
    ap.add_argument("--token-budgets", default="512,1024,2048", help="key budgets (empty: none)")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--decode-backend", default="auto", choices=["auto", "triton", "reference"])
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    from sparseattn.eval.bench_model import load_model
    from sparseattn.eval.decode_recall import measure_mass_recall
    from sparseattn.eval.env import environment
    from sparseattn.eval.texts import sample_ids

    budgets: list[int | float] = [float(x) if "." in x else int(x) for x in a.budgets.split(",") if x.strip()]
    tok_b = [int(x) for x in a.token_budgets.split(",") if x.strip()]
    budgets += [-(-t // a.page_size) for t in tok_b]
    t0 = time.perf_counter()
    model, tok = load_model(a.model, dtype=getattr(torch, a.dtype), device=a.device, need_tokenizer=not a.random_ids)
    ids_list, names, source = sample_ids(model, tok, seq_len=a.length, samples=1, text_dir=a.text_dir,
                                         random_ids=a.random_ids or tok is None)
    ids = ids_list[0].to(a.device)
    steps = [int(s) for s in a.steps.split(",")]
    rows = measure_mass_recall(model, ids, steps=steps, budgets=budgets, page_size=a.page_size,
                               backend=a.decode_backend)
    P = -(-(a.length + max(steps)) // a.page_size)
    lines = [f"model {a.model}, {a.dtype} on {a.device}, prompt {a.length} tokens ({source}), page size {a.page_size}, "
             f"steps {steps}", "",
             "| budget | pages (mean) | keys | Quest recall (mean / min) | oracle recall (mean / min) |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['budget']} | {r['pages']:.1f} of ~{P} | {r['pages'] * a.page_size:.0f} | "
                     f"{r['quest_recall']:.3f} / {r['quest_min']:.3f} | {r['oracle_recall']:.3f} / {r['oracle_min']:.3f} |")
    print("\n".join(lines))
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "mass_recall.json").write_text(json.dumps(
            {"config": vars(a) | {"documents": names[0], "source": source, "seconds": time.perf_counter() - t0},
             "rows": rows, "environment": environment(a.device)}, indent=2))
        (out / "mass_recall.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
