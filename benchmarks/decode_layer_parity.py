"""Per-layer parity of one decode step on a real model: the model's own attention vs sparseattn's decode paths.

Answers "does our decode path differ from the model's attention beyond rounding?" (issue 14: on Gemma-3-270M in
bf16 at 16K `kernel_decode` agreed with dense on only 28% of 64 free-running tokens). The model runs a prompt of
``--length`` tokens (prefill, dense), then one decode step with a capturing attention function that records every
layer's query / keys / values, scale and sliding window and returns the model's SDPA result. For each layer the
step's attention is then recomputed

* in float64 over exactly the keys the layer attends (the last ``window`` keys on a sliding-window layer): the
  reference;
* by the model's SDPA in the run's dtype (what dense generation uses);
* by :func:`sparseattn.ops.decode.decode_attention` with ``--backends`` (``triton`` needs CUDA or
  ``TRITON_INTERPRET=1``; ``reference`` is the PyTorch decode),

and the relative L2 error of each against float64 is printed per layer, with the max over heads. A decode path
whose error is of the order of SDPA's differs by rounding only.

Run it on the GPU for the GPU's numerics. Under ``TRITON_INTERPRET=1`` (triton 3.9 on the CPU) a float32 → bfloat16
cast in a kernel truncates instead of rounding to nearest, so the interpreted kernel's bf16 output carries about
twice the rounding error of a correctly rounded one (Gemma-3-270M at 2048 tokens: 4.5–6.9e-3 against SDPA's
1.7–2.3e-3, every layer; on random inputs the same kernel in fp16, where the cast rounds, is within rounding of
float64). The script says so when that applies.

Usage: ``TRITON_INTERPRET=1 PYTHONPATH=src python benchmarks/decode_layer_parity.py --model PATH.gguf
--text-dir ../shared/data/essays --length 2048 --dtype bfloat16 [--backends triton,reference] [--device cpu]``.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--text-dir", default="../shared/data/essays")
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backends", default="triton,reference")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args()
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from sparseattn.eval.texts import documents_for, token_samples
    from sparseattn.models import load
    from sparseattn.ops.decode import decode_attention

    torch.set_grad_enabled(False)
    dtype = getattr(torch, args.dtype)
    model, tok = load(args.model, dtype=dtype, device=args.device)
    model.eval()
    docs, _ = documents_for(None, args.text_dir)
    ids = token_samples(docs, tok, seq_len=args.length + 1, samples=1)[0][0].to(args.device)
    rec: list[dict] = []

    def capture(module, query, key, value, attention_mask, **kw):
        out, w = sdpa_attention_forward(module, query, key, value, attention_mask, **kw)
        if query.shape[2] == 1:  # the decode step only
            win = kw.get("sliding_window", getattr(module, "sliding_window", None))
            rec.append({"layer": getattr(module, "layer_idx", len(rec)), "q": query, "k": key, "v": value,
                        "scale": kw.get("scaling", query.shape[-1] ** -0.5),
                        "window": win if isinstance(win, int) and not isinstance(win, bool) and win > 0 else None,
                        "sdpa": out.transpose(1, 2)})  # (B, H, 1, D)
        return out, w

    AttentionInterface.register("sparseattn_capture", capture)
    model.set_attn_implementation("sparseattn_capture")
    out = model(ids[:, :-1], use_cache=True)
    model(ids[:, -1:], past_key_values=out.past_key_values, use_cache=True)

    backends = [b for b in args.backends.split(",") if b]
    from sparseattn.ops.triton_launch import interpret_mode

    if interpret_mode() and dtype == torch.bfloat16 and "triton" in backends:
        print("note: TRITON_INTERPRET=1 truncates float32 -> bfloat16 casts, so the triton column carries about twice "
              "the rounding error it has on a GPU", file=sys.stderr)
    rows = []
    print(f"{'layer':>5} {'window':>6} {'keys':>6}  {'sdpa':>9}" + "".join(f" {b:>10}" for b in backends)
          + "   (relative L2 error vs float64, max over heads)")
    for r in rec:
        q, k, v = r["q"], r["k"], r["v"]
        n = k.shape[2]
        if r["window"] is not None and r["window"] < n:
            k, v = k[:, :, n - r["window"]:], v[:, :, n - r["window"]:]
        g = q.shape[1] // k.shape[1]
        kk = k.double().repeat_interleave(g, 1)
        vv = v.double().repeat_interleave(g, 1)
        ref = torch.softmax((q.double() @ kk.transpose(-1, -2)) * r["scale"], -1) @ vv

        def err(x: torch.Tensor) -> float:
            d = (x.double() - ref).flatten(2).norm(dim=-1) / ref.flatten(2).norm(dim=-1).clamp_min(1e-30)
            return float(d.max())

        row = {"layer": r["layer"], "window": r["window"], "keys": int(k.shape[2]), "sdpa": err(r["sdpa"])}
        for b in backends:
            try:
                row[b] = err(decode_attention(q, k.contiguous(), v.contiguous(), scale=r["scale"], backend=b))
            except NotImplementedError as e:
                row[b] = None
                print(f"layer {r['layer']}: backend {b} unavailable ({e})", file=sys.stderr)
        rows.append(row)
        print(f"{row['layer']:>5} {str(row['window']):>6} {row['keys']:>6}  {row['sdpa']:>9.2e}"
              + "".join(f" {row[b]:>10.2e}" if row[b] is not None else f" {'n/a':>10}" for b in backends))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"model": args.model, "length": args.length, "dtype": args.dtype, "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
