"""Whole-model cost of INT8 attention on the CPU, through the quantized kernel's PyTorch emulation.

Every attention layer of the model runs, in turn:

* ``dense``: the model's own fp32 attention (the reference);
* ``bf16``: q/k/v rounded to bfloat16, exact attention in fp32, output rounded to bfloat16 (what the bf16
  kernel's inputs and output alone cost: the floor the quantized rows sit on);
* one row per ``--configs`` entry ``mode/granularity[/no_smooth_q][/no_balance]``: the emulation of the quantized kernel
  (:func:`sparseattn.ops.quant_reference.emulated_quantized_attention`: the kernel's scales, rounding and tile
  order) on the bfloat16 q/k/v, dense causal.

For each row: top-1 agreement of the next-token prediction with ``dense`` over the last ``--positions``
positions of every window, the mean KL(dense || row) there, and the cosine of the logits. Without ``--predictor``
this is the quantization alone (dense causal). With ``--predictor SPEC`` every layer's block layout comes from that
predictor on the bfloat16 q/k (the layout the bf16 path would use), one more row ``sparse bf16`` runs exact attention
on that layout (the sparsity alone), and every quantized row runs on it: the issue's "quantized + sparse" end to end,
read against fp32 dense. The GPU rows are in BENCHMARKS.md (``bench_model.py --quant``).

Usage: ``python benchmarks/quant_model_emulated.py --model smollm2-135m --text-dir ../shared/data/essays
--seq-len 4096 --samples 2 --out DIR`` (about a minute per quantized forward of SmolLM2 at 4K on two cores).
Writes ``quant_model.json`` and prints a markdown table last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import torch

ATTN_NAME = "sparseattn_quant_emulated"
_STATE: dict[str, Any] = {"mode": "dense"}


def _attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any,
               scaling: float | None = None, dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers AttentionInterface function: ``(B, H, N, D)`` in, ``(B, N, H, D)`` out, causal, no padding."""
    from sparseattn.ops.quant_reference import emulated_quantized_attention
    from sparseattn.ops.reference import reference_attention

    mode = _STATE["mode"]
    pred = _STATE.get("predictor")
    layout = None
    if pred is not None and mode != "bf16":
        qb, kb = query.to(torch.bfloat16), key.to(torch.bfloat16)
        layout = pred.predict(qb, kb, causal=True, layer=getattr(module, "layer_idx", None))
        _STATE["density"].append(float(layout.density(causal=True)))
    if mode == "bf16":
        q, k, v = (t.to(torch.bfloat16).float() for t in (query, key, value))
        out = reference_attention(q, k, v, causal=True, scale=scaling).out.to(torch.bfloat16)
    elif mode == "sparse_bf16":  # exact attention on the layout (masked SDPA computes the reference's function)
        from sparseattn.ops.masked_sdpa import masked_sdpa_attention

        q, k, v = (t.to(torch.bfloat16).float() for t in (query, key, value))
        out = masked_sdpa_attention(q, k, v, layout, scale=scaling).to(torch.bfloat16)
    else:
        quant, gran, smooth_q, balance_qk = mode
        q, k, v = (t.to(torch.bfloat16) for t in (query, key, value))
        out = emulated_quantized_attention(q, k, v, layout=layout, causal=True, scale=scaling, quant=quant,
                                           quant_granularity=gran, smooth_q=smooth_q, balance_qk=balance_qk)[0]
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def _parse_config(text: str) -> tuple[str, str, bool, bool]:
    from sparseattn.ops.quant import GRANULARITIES, QUANT_MODES

    parts = text.split("/")
    flags = parts[2:]
    ok = len(parts) >= 2 and parts[0] in QUANT_MODES and parts[1] in GRANULARITIES and len(set(flags)) == len(flags) \
        and all(f in ("no_smooth_q", "no_balance") for f in flags)
    if not ok:
        raise ValueError(f"quant_model_emulated.py: --configs entry {text!r} is not "
                         f"mode/granularity[/no_smooth_q][/no_balance]; expected e.g. int8/per_warp or "
                         f"int8/per_token/no_smooth_q/no_balance")
    return parts[0], parts[1], "no_smooth_q" not in flags, "no_balance" not in flags


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--text-dir", default=None)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--positions", type=int, default=1024, help="last positions of each window scored")
    ap.add_argument("--configs", default="int8/per_warp/no_smooth_q/no_balance,int8/per_warp,int8/per_token",
                    help="comma-separated mode/granularity[/no_smooth_q][/no_balance]")
    ap.add_argument("--predictor", default=None, metavar="SPEC",
                    help="block predictor for every layer (e.g. mean_sim:score=mixed,cdf_threshold=0.97,keep_local=8); "
                         "default: dense causal")
    ap.add_argument("--out", default=".")
    args = ap.parse_args(argv)
    try:
        from sparseattn.predictors.base import parse_predictor_spec

        # set on every call (None without --predictor): a second main() in one process must not keep the first's
        _STATE["predictor"] = None if args.predictor is None else parse_predictor_spec(args.predictor)
        configs = [_parse_config(c.strip()) for c in args.configs.split(",") if c.strip()]
        if args.seq_len < 2 or args.samples < 1 or args.positions < 1:
            raise ValueError("quant_model_emulated.py: --seq-len, --samples and --positions must be positive; "
                             f"got {args.seq_len}, {args.samples}, {args.positions}")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from transformers import AttentionInterface

    from sparseattn.eval.texts import sample_ids
    from sparseattn.models.loader import load

    AttentionInterface.register(ATTN_NAME, _attention)
    model, tok = load(args.model, dtype=torch.float32, device="cpu")
    ids, names, source = sample_ids(model, tok, seq_len=args.seq_len, samples=args.samples, text_dir=args.text_dir)
    rows: dict[str, dict[str, Any]] = {}
    sparse = ["sparse_bf16"] if args.predictor is not None else []
    labels = ["bf16"] + sparse + ["/".join([c[0], c[1]] + ([] if c[2] else ["no_smooth_q"]) + ([] if c[3] else ["no_balance"]))
                         for c in configs]
    modes: list[Any] = ["bf16"] + sparse + configs
    P = min(args.positions, args.seq_len - 1)
    for w, x in enumerate(ids):
        t0 = time.perf_counter()
        model.set_attn_implementation("sdpa")
        with torch.no_grad():
            ref = model(x).logits[0, -P:].double()
        print(f"[window {w}] dense {time.perf_counter() - t0:.1f} s", flush=True)
        model.set_attn_implementation(ATTN_NAME)
        for label, mode in zip(labels, modes):
            t0 = time.perf_counter()
            _STATE["mode"] = mode
            _STATE["density"] = []
            with torch.no_grad():
                lg = model(x).logits[0, -P:].double()
            lp, lq = torch.log_softmax(ref, -1), torch.log_softmax(lg, -1)
            r = rows.setdefault(label, {"agree": 0, "n": 0, "kl_sum": 0.0, "cos": [], "density": []})
            if _STATE["density"]:
                r["density"].append(sum(_STATE["density"]) / len(_STATE["density"]))
            r["agree"] += int((ref.argmax(-1) == lg.argmax(-1)).sum())
            r["n"] += P
            r["kl_sum"] += float((lp.exp() * (lp - lq)).sum(-1).sum())
            r["cos"].append(float(torch.nn.functional.cosine_similarity(ref.flatten(), lg.flatten(), 0)))
            print(f"[window {w}] {label}: {time.perf_counter() - t0:.1f} s, top-1 so far {r['agree'] / r['n']:.4f}",
                  flush=True)
    model.set_attn_implementation("sdpa")
    table = {k: {"top1": v["agree"] / v["n"], "kl": v["kl_sum"] / v["n"], "logits_cos_min": min(v["cos"]),
                 "positions": v["n"],
                 "block_density": sum(v["density"]) / len(v["density"]) if v["density"] else 1.0}
             for k, v in rows.items()}
    res = {"tool": "benchmarks/quant_model_emulated.py", "model": args.model, "source": source, "windows": names,
           "seq_len": args.seq_len, "positions_per_window": P, "predictor": args.predictor, "rows": table,
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "quant_model.json"), "w") as fh:
        json.dump(res, fh, indent=1)
    print("\n| attention | block density | top-1 vs dense fp32 | KL | min logits cosine |\n|---|---:|---:|---:|---:|")
    for k, v in table.items():
        print(f"| {k} | {v['block_density']:.3f} | {100 * v['top1']:.2f}% | {v['kl']:.5f} | {v['logits_cos_min']:.6f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
