"""Where the mixed KV cache's INT8 error comes from (issue 14), offline on captured SmolLM2 Q/K/V (CPU, float64).

One dense forward of an essay prompt captures every layer's post-RoPE Q/K/V. The last ``--queries`` positions then
attend the whole prompt with the keys/values older than the recent ``--window`` (and after the first
``--sink-tokens``) replaced by their per-token INT8 round trip (``max|x| / 127`` per token and KV head, the cache's
quantizer), against the same attention on the float keys. Printed per variant: the relative L2 error of the
attention output averaged over the layers, the worst layer, and in how many layers the variant is worse than
``base``:

* ``base``: K and V quantized (what the cache does);
* ``K_only`` / ``V_only``: only K / only V quantized (which side dominates);
* ``K_equalized``: K divided per channel by ``sqrt(max_t |k[t, c]|)`` over the quantized keys before the per-token
  quantization and multiplied back after (a per-channel factor that could be folded into q exactly), V as ``base``;
* ``K_equalized_full``: the same with ``max_t |k[t, c]|`` itself.

Usage: ``PYTHONPATH=src python benchmarks/mixed_kv_error_split.py [TEXT_DIR] [--length 2048] [--queries 32]
[--window 128] [--sink-tokens 0]`` (the default model; about a minute on 2 CPU cores).
"""
import argparse

import torch

from sparseattn.eval.texts import documents_for, token_samples
from sparseattn.integrations.capture import capture_qkv
from sparseattn.models import load


def quant_token(x: torch.Tensor) -> torch.Tensor:
    """Per-token INT8 round trip of ``x`` ``(B, H, N, D)``: ``round(x / s) * s`` with ``s = max|x| / 127``."""
    s = x.abs().amax(-1, keepdim=True) / 127
    s = torch.where(s > 0, s, torch.ones_like(s))
    return torch.round(x / s).clamp(-127, 127) * s


def quant_equalized(x: torch.Tensor, power: float) -> torch.Tensor:
    m = x.abs().amax(2, keepdim=True).clamp(min=1e-6) ** power
    return quant_token(x / m) * m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("text_dir", nargs="?", default="../shared/data/essays")
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--queries", type=int, default=32)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--sink-tokens", type=int, default=0)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    model, tok = load("smollm2-135m")
    model.eval()
    docs, _ = documents_for(None, args.text_dir)
    ids = token_samples(docs, tok, seq_len=args.length, samples=1)[0][0]
    with capture_qkv(model) as qkv:  # post-RoPE q/k/v of every layer (the model runs densely meanwhile)
        model(ids, use_cache=False)
    layers = model.model.layers
    captured = [(qkv[i]["q"], qkv[i]["k"], qkv[i]["v"],
                 getattr(layers[i].self_attn, "scaling", qkv[i]["q"].shape[-1] ** -0.5)) for i in sorted(qkv)]

    ident = lambda x: x  # noqa: E731
    variants = {"base": (quant_token, quant_token), "K_only": (quant_token, ident), "V_only": (ident, quant_token),
                "K_equalized": (lambda x: quant_equalized(x, 0.5), quant_token),
                "K_equalized_full": (lambda x: quant_equalized(x, 1.0), quant_token)}
    errs: dict[str, list[float]] = {name: [] for name in variants}
    for q, k, v, scale in captured:
        q, k, v = q.double(), k.double(), v.double()
        N = q.shape[2]
        G = q.shape[1] // k.shape[1]
        qq = q[:, :, -args.queries:]
        mask = torch.arange(N)[None, :] <= torch.arange(N - args.queries, N)[:, None]

        def attn(kk, vv):
            s = (qq @ kk.repeat_interleave(G, 1).transpose(-1, -2)) * scale
            return torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ vv.repeat_interleave(G, 1)

        ref = attn(k, v)
        old = slice(args.sink_tokens, N - args.window)
        for name, (fk, fv) in variants.items():
            kk, vv = k.clone(), v.clone()
            kk[:, :, old] = fk(k[:, :, old])
            vv[:, :, old] = fv(v[:, :, old])
            errs[name].append(float((attn(kk, vv) - ref).norm() / ref.norm()))
    base = torch.tensor(errs["base"])
    print(f"{len(captured)} layers, {args.length} tokens, last {args.queries} queries, window {args.window}, "
          f"sink {args.sink_tokens}; relative L2 error of the attention output")
    print("| variant | mean | worst layer | layers worse than base |")
    print("|---|---|---|---|")
    for name, e in errs.items():
        t = torch.tensor(e)
        print(f"| {name} | {t.mean():.2e} | {t.max():.2e} | {int((t > base).sum())} |")


if __name__ == "__main__":
    main()
