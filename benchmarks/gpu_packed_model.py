"""Packed sequences through a real patched model (position_ids restarting per sequence), on the GPU.

Several documents of different lengths are packed into one row of ``--total`` tokens; transformers
turns restarting ``position_ids`` into a block-diagonal (document) causal mask. The dense model runs
SDPA with that mask materialised; a patched model runs each sparse layer on our kernel with the exact
document mask (``document_ids``) intersected with the layer's layout.

Rows (same token ids, same process):

* ``dense packed``: the model's own attention on the packed row (the reference of the timing);
* ``all blocks``: patched with every causal block selected — exact, so its logits must match each
  document run alone (the bf16 noise floor of the packed path);
* ``default``: patched with the project's default predictor.

Accuracy per row: logits of every packed position against each document run alone through the dense
model (cosine, top-1 agreement), i.e. whether anything leaks across documents. Timing: warm-up,
CUDA-synchronised, median of ``--repeats`` rounds, the two sides alternated with the order swapped
every round and the garbage collector off (``sparseattn.eval.prefill_timing``). Writes
``packed_model.json`` under ``--out`` and prints a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch


def packed_inputs(model, tok, text_dir: str, lengths: list[int], dev: torch.device):
    """``(ids, position_ids, alone)``: documents of ``lengths`` tokens (a different text each) packed in one row,
    position_ids restarting per document, and the dense model's logits of each document run alone (float32)."""
    from sparseattn.eval.texts import documents_for, token_samples

    docs, _ = documents_for(None, text_dir)
    windows, _ = token_samples(docs, tok, seq_len=max(lengths), samples=len(lengths))
    pieces = [w[:, :n] for w, n in zip(windows, lengths)]
    ids = torch.cat(pieces, dim=1).to(dev)
    pos = torch.cat([torch.arange(n) for n in lengths])[None].to(dev)
    alone = torch.cat([model(p.to(dev), use_cache=False).logits[0].float() for p in pieces])
    return ids, pos, alone


def against_alone(logits: torch.Tensor, alone: torch.Tensor, lengths: list[int]) -> dict:
    """Logits cosine (mean, min) and top-1 agreement of a packed forward against each document run alone."""
    cos = torch.nn.functional.cosine_similarity(logits, alone, dim=-1)
    same = (logits.argmax(-1) == alone.argmax(-1)).float()
    return {"cos_mean": float(cos.mean()), "cos_min": float(cos.min()), "top1": float(same.mean()),
            "top1_per_doc": [float(x.mean()) for x in same.split(lengths)]}


@torch.no_grad()
def main() -> int:
    from sparseattn.eval.defaults import DEFAULT_PREDICTOR_SPEC
    from sparseattn.eval.env import environment
    from sparseattn.eval.prefill_timing import TIMING_RULES, paired_rounds
    from sparseattn.integrations.transformers_patch import patch_model
    from sparseattn.models import load

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--text-dir", required=True)
    ap.add_argument("--lengths", default="3000,1500,2500,1192", help="document lengths packed into one row")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (a smoke run, fp32)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    dev = torch.device(args.device)
    model, tok = load(args.model, dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32, device=dev)
    ids, pos, alone = packed_inputs(model, tok, args.text_dir, lengths, dev)

    def fwd():
        return model(ids, position_ids=pos, use_cache=False).logits[0].float()

    def metrics(logits: torch.Tensor) -> dict:
        return against_alone(logits, alone, lengths)

    rows = [{"row": "dense packed", **metrics(fwd())}]
    for name, kw in (("all blocks", {"pattern": "dense"}), ("default", {"predictor": DEFAULT_PREDICTOR_SPEC})):
        with patch_model(model, **kw) as h:
            got = fwd()
            fwd()  # settle routes and layer graphs before timing
            counts = dict(h.counts)
            density = h.sparsity_report().get("mean_density")
            d_s, s_s = paired_rounds(fwd, fwd, repeats=args.repeats, warmup=1, cuda=dev.type == "cuda",
                                     dense_context=h.suspended)
        d, s = statistics.median(d_s), statistics.median(s_s)
        rows.append({"row": name, **metrics(got), "density": density, "prefill_packed_calls": counts.get("prefill_packed"),
                     "dense_ms": d * 1e3, "sparse_ms": s * 1e3, "ratio": d / s,
                     "ratio_paired": statistics.median(a / b for a, b in zip(d_s, s_s))})
    res = {"lengths": lengths, "total": sum(lengths), "rows": rows, "environment": environment(dev),
           "method": f"median of {args.repeats} rounds after 1 warm-up, {TIMING_RULES}, CUDA-synchronised"}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "packed_model.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(f"packed {lengths} = {sum(lengths)} tokens; accuracy vs each document alone (dense)")
    print("| row | density | packed calls | cos mean (min) | top-1 | dense ms | sparse ms | ratio (paired) |")
    for r in rows:
        print(f"| {r['row']} | {r.get('density', '-')} | {r.get('prefill_packed_calls', '-')} | {r['cos_mean']:.5f} "
              f"({r['cos_min']:.4f}) | {100 * r['top1']:.2f}% | {r.get('dense_ms', float('nan')):.1f} | "
              f"{r.get('sparse_ms', float('nan')):.1f} | {r.get('ratio', float('nan')):.2f} ({r.get('ratio_paired', float('nan')):.2f}) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
