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
* ``K_equalized_full``: the same with ``max_t |k[t, c]|`` itself;
* ``K_channel_gG`` (G = 32, 64, 128): KIVI-style per-channel K quantization: the quantized keys are split, per batch
  and KV head, into consecutive groups of G tokens (starting at the first quantized position) and each group uses a
  symmetric per-channel scale ``s_c = max_t |k[t, c]| / 127`` over its own tokens; V per token as ``base``;
* ``K_channel_asym_gG`` (same G): per-channel asymmetric within each group, zero point ``z_c = (max + min) / 2``
  and scale ``(max - min) / 2 / 127`` over the group's tokens, round trip ``round((k - z) / s) * s + z`` with the
  integer clamped to [-127, 127]; V per token;
* ``K_smooth_token``: the per-channel mean of the quantized keys (over all of them) is subtracted before the
  per-token quantization and added back after; V per token.

In the grouped variants, quantized keys at the end of the quantized range that do not fill a whole group of G
tokens are left in full precision (a real cache would keep such a partial group unquantized until it fills). With
the default window, ``--length`` 2048 or 4096 and no sink tokens the quantized range (1920 / 3968 tokens) is a
multiple of 128, so no such tail arises there.

Usage: ``PYTHONPATH=src python benchmarks/mixed_kv_error_split.py [TEXT_DIR] [--length 2048] [--queries 32]
[--window 128] [--sink-tokens 0]`` (the default model; about 1.5 minutes at 2048 tokens and 2 minutes at
4096 on 2 CPU cores).
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


def quant_channel_grouped(x: torch.Tensor, group: int, asym: bool = False) -> torch.Tensor:
    """Per-channel INT8 round trip of ``x`` ``(B, H, N, D)`` in consecutive groups of ``group`` tokens.

    Symmetric: ``s_c = max_t |x[t, c]| / 127`` per group; asymmetric: ``z_c = (max + min) / 2``,
    ``s_c = (max - min) / 2 / 127``. Tokens of a trailing partial group are returned unchanged (full precision).
    """
    B, H, N, D = x.shape
    full = (N // group) * group
    out = x.clone()
    if full == 0:
        return out
    g = x[:, :, :full].reshape(B, H, full // group, group, D)
    if asym:
        hi, lo = g.amax(3, keepdim=True), g.amin(3, keepdim=True)
        z, s = (hi + lo) / 2, (hi - lo) / 2 / 127
    else:
        z, s = torch.zeros_like(g[:, :, :, :1]), g.abs().amax(3, keepdim=True) / 127
    s = torch.where(s > 0, s, torch.ones_like(s))
    out[:, :, :full] = (torch.round((g - z) / s).clamp(-127, 127) * s + z).reshape(B, H, full, D)
    return out


def quant_smooth_token(x: torch.Tensor) -> torch.Tensor:
    """Per-token INT8 round trip of ``x`` minus its per-channel mean over the tokens, the mean added back."""
    mu = x.mean(2, keepdim=True)
    return quant_token(x - mu) + mu


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
    for g in (32, 64, 128):
        variants[f"K_channel_g{g}"] = (lambda x, g=g: quant_channel_grouped(x, g), quant_token)
    for g in (32, 64, 128):
        variants[f"K_channel_asym_g{g}"] = (lambda x, g=g: quant_channel_grouped(x, g, asym=True), quant_token)
    variants["K_smooth_token"] = (quant_smooth_token, quant_token)
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
