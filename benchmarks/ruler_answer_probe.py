"""Where does a sparse prefill lose RULER answers? Teacher-forced answer agreement, with and without a dense query tail.

For each RULER prompt (``sparseattn.eval.ruler.make_ruler_sample``) the dense model generates ``--gen`` greedy tokens
(the reference answer). Each configuration then prefills the prompt sparsely (the patched model; decode steps take
the model's dense attention, as ``sparseattn ruler`` runs them) and is fed dense's answer tokens one at a time.
Per configuration: the first answer token's top-1 agreement and KL (the prefill's last position), and the
teacher-forced top-1 agreement and mean KL over the answer steps.

A *dense tail* (``--tails 0,128``) keeps the last T query rows of every sparse layer on every causal block: the
question at the end of a RULER prompt then sees the whole haystack, at a cost of about ``T / N`` of the causal
blocks. It wraps the configuration's predictor (``TailPredictor`` below; layouts via masks, an experiment, not a
hot path).

    PYTHONPATH=src python benchmarks/ruler_answer_probe.py --text-dir ../shared/data/essays --length 4096 \
        --tasks niah_multikey,niah_multiquery,fwe --samples 4 --tails 0,128 --out probe.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


class TailPredictor:
    """``inner``'s layout with the last ``tail`` query rows' blocks set to their whole causal row."""

    def __init__(self, inner, tail: int) -> None:
        self.inner, self.tail = inner, tail
        self.name = f"{inner.name}+tail{tail}"
        self.config = inner.config

    def reset(self) -> None:
        self.inner.reset()

    def graph_refusal(self, layer):  # noqa: ANN001
        return "experiment wrapper"

    def predict(self, q, k, *, causal=True, layer=None):  # noqa: ANN001
        from sparseattn.layout.block_layout import causal_block_region
        from sparseattn.layout.convert import layout_from_mask, layout_to_mask

        lay = self.inner.predict(q, k, causal=causal, layer=layer)
        mask = layout_to_mask(lay).clone()
        first = max(0, (lay.seqlen_q - self.tail) // lay.block_m)
        any_allowed, _ = causal_block_region(lay.seqlen_q, lay.seqlen_kv, lay.block_m, lay.block_n, mask.device)
        mask[:, :, first:] |= any_allowed[first:]
        return layout_from_mask(mask, block_m=lay.block_m, block_n=lay.block_n, seqlen_q=lay.seqlen_q,
                                seqlen_kv=lay.seqlen_kv)


def kl(ref: torch.Tensor, other: torch.Tensor) -> float:
    p = torch.log_softmax(ref.double(), -1)
    return float((p.exp() * (p - torch.log_softmax(other.double(), -1))).sum())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/ruler_answer_probe.py")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--text-dir", default=None)
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--tasks", default="niah_single,niah_multikey,niah_multivalue,niah_multiquery,cwe,fwe")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seed", default="0")
    ap.add_argument("--gen", type=int, default=12, help="dense answer tokens (teacher-forced steps)")
    ap.add_argument("--specs", nargs="*", default=["mean_sim:score=mixed,cdf_threshold=0.97,keep_local=8"])
    ap.add_argument("--tails", default="0,128", help="dense query-tail rows, one configuration per spec and value")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--out", default="ruler_answer_probe.jsonl")
    args = ap.parse_args(argv)

    from sparseattn.eval.niah import _sentences
    from sparseattn.eval.ruler import _special_ids, _vocabulary, make_ruler_sample, parse_tasks
    from sparseattn.eval.texts import documents_for
    from sparseattn.integrations.transformers_patch import patch_model
    from sparseattn.models import load
    from sparseattn.predictors.resolve import resolve_predictor

    model, tok = load(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    dev = torch.device(args.device)
    docs = list(documents_for(None, args.text_dir)[0]) if args.text_dir else None
    sentences = _sentences(docs) if docs else None
    vocab = _vocabulary(text for _, text in docs) if docs else None
    stops = _special_ids(tok)
    tails = [int(t) for t in args.tails.split(",")]
    configs = [(f"{s} | tail {t}", s, t) for s in args.specs for t in tails]

    def step(ids, past):  # noqa: ANN001
        o = model(ids.to(dev), use_cache=True, past_key_values=past, logits_to_keep=1)
        return o.logits[0, -1].float().cpu(), o.past_key_values

    for task in parse_tasks(args.tasks):
        for s in range(args.samples):
            smp = make_ruler_sample(tok, task, length=args.length, seed=f"{args.seed}-{s}", sentences=sentences,
                                    vocabulary=vocab)
            ids = smp["input_ids"]
            t0 = time.perf_counter()
            with torch.no_grad():
                ref, past = step(ids, None)
                ref_logits, answer = [ref], [int(ref.argmax())]
                while len(answer) < args.gen and answer[-1] not in stops:
                    lg, past = step(torch.tensor([[answer[-1]]]), past)
                    ref_logits.append(lg)
                    answer.append(int(lg.argmax()))
            dense_s = time.perf_counter() - t0
            for label, spec, tail in configs:
                pred = resolve_predictor(spec)
                if tail:
                    pred = TailPredictor(pred, tail)
                t0 = time.perf_counter()
                with torch.no_grad(), patch_model(model, predictor=pred, backend=args.backend) as h:
                    lg, past = step(ids, None)
                    logits = [lg]
                    for a in answer[:-1]:
                        lg, past = step(torch.tensor([[a]]), past)
                        logits.append(lg)
                    density = h.sparsity_report()["mean_density"]
                agree = [int(x.argmax()) == a for x, a in zip(logits, answer)]
                kls = [kl(r, x) for r, x in zip(ref_logits, logits)]
                row = {"task": task, "sample": s, "length": args.length, "config": label, "spec": spec, "tail": tail,
                       "density": density, "answer_tokens": len(answer), "first_top1": agree[0], "first_kl": kls[0],
                       "tf_agreement": sum(agree) / len(agree), "tf_kl": sum(kls) / len(kls),
                       "answers": smp["answers"], "dense_answer": tok.decode(answer),
                       "seconds": round(time.perf_counter() - t0, 1), "dense_seconds": round(dense_s, 1)}
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"{task:<16} s{s} {label:<60} dens {density:.3f} first {int(agree[0])} kl {kls[0]:.4f} "
                      f"tf {row['tf_agreement']:.3f} tf_kl {row['tf_kl']:.4f} ({row['seconds']} s)", flush=True)
    rows = [json.loads(x) for x in open(args.out)]
    print("\nconfig | prompts | density | first-token top-1 | first KL | tf agreement | tf KL")
    for label, _, _ in configs:
        r = [x for x in rows if x["config"] == label]
        if r:
            n = len(r)
            print(f"{label} | {n} | {sum(x['density'] for x in r) / n:.3f} | {sum(x['first_top1'] for x in r) / n:.3f} | "
                  f"{sum(x['first_kl'] for x in r) / n:.4f} | {sum(x['tf_agreement'] for x in r) / n:.3f} | "
                  f"{sum(x['tf_kl'] for x in r) / n:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
