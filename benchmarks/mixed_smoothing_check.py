"""CPU check of the mixed KV cache's K smoothing: per-layer attention-output error of the quantized cache vs the
float cache, with and without smoothing (SmolLM2-135M, float32, an essay prompt).

Each layer's post-RoPE Q/K/V of the prompt are captured from one dense forward; the last ``--queries`` positions
then attend the whole prompt (a decode-like step) through ``mixed_attention_forward`` over a
``MixedKVCache(window=...)`` holding the prompt (everything older than the window quantized), against the same
queries over the float keys (torch SDPA, float64). Prints max |error| / max |ref| and the relative L2 error per
layer for ``smooth_keys=False`` and ``True`` and their ratio.

Usage: ``PYTHONPATH=src python benchmarks/mixed_smoothing_check.py [TEXT_DIR] [--length 2048] [--queries 32]
[--window 128] [--quant int8] [--route segments|decode] [--sink-tokens N]`` (default TEXT_DIR ../shared/data/essays;
``decode``: the split-KV decode kernel under TRITON_INTERPRET=1 on the CPU, slow; ``--sink-tokens``: the cache's
``sink_tokens``, the first N tokens kept in full precision, default 4 as in the cache).
"""
import argparse
import os
import time

import torch

parser = argparse.ArgumentParser()
parser.add_argument("text_dir", nargs="?", default="../shared/data/essays")
parser.add_argument("--length", type=int, default=2048)
parser.add_argument("--queries", type=int, default=32)
parser.add_argument("--window", type=int, default=128)
parser.add_argument("--quant", default="int8", choices=["int8", "fp8"])
parser.add_argument("--route", default="segments", choices=["segments", "decode"])
parser.add_argument("--sink-tokens", type=int, default=4)
args = parser.parse_args()
if args.route == "decode" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from transformers import AttentionInterface  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask  # noqa: E402

from sparseattn.eval.texts import documents_for, token_samples  # noqa: E402
from sparseattn.integrations.mixed_cache_attention import mixed_attention_forward  # noqa: E402
from sparseattn.models import load  # noqa: E402
from sparseattn.state.kv_cache import MixedKVCache  # noqa: E402

torch.set_grad_enabled(False)
t0 = time.time()
model, tok = load("smollm2-135m")
model.eval()
docs, _ = documents_for(None, args.text_dir)
ids = token_samples(docs, tok, seq_len=args.length, samples=1)[0][0]

captured = []


def capture(module, query, key, value, attention_mask, **kw):
    captured.append((module, query, key, value, kw.get("scaling")))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)


AttentionInterface.register("ksm_capture", capture)
ALL_MASK_ATTENTION_FUNCTIONS.register("ksm_capture", sdpa_mask)
model.set_attn_implementation("ksm_capture")
model(ids, use_cache=False)
print(f"model + capture: {time.time() - t0:.0f} s; {len(captured)} layers, prompt {args.length} tokens, "
      f"{args.queries} queries, window {args.window}, {args.quant}, route {args.route}, "
      f"sink_tokens {args.sink_tokens}", flush=True)

nq = args.queries
rows = []
for i, (module, q, k, v, scaling) in enumerate(captured):
    ql = q[:, :, -nq:]
    G = q.shape[1] // k.shape[1]
    ref = torch.nn.functional.scaled_dot_product_attention(
        ql.double(), k.double().repeat_interleave(G, 1), v.double().repeat_interleave(G, 1),
        attn_mask=torch.ones(nq, k.shape[2], dtype=torch.bool).tril(k.shape[2] - nq), scale=scaling)
    errs = []
    for smooth in (False, True):
        cache = MixedKVCache(model.config, window=args.window, quant=args.quant, smooth_keys=smooth,
                             sink_tokens=args.sink_tokens, decode_backend="triton" if args.route == "decode" else "off")
        layer = cache.layers[i]
        layer.update(k[:, :, :-nq], v[:, :, :-nq], mixed=True)
        kt, vt = layer.update(k[:, :, -nq:], v[:, :, -nq:], mixed=True)
        out = mixed_attention_forward(module, ql, kt, vt, None, scaling=scaling)[0].transpose(1, 2).double()
        d = out - ref
        errs.append((float(d.abs().max() / ref.abs().max()), float(d.norm() / ref.norm())))
    kc = k[0].double()
    offset = float((kc.mean(1).abs().amax(-1) / kc.std(1).mean(-1)).max())  # largest channel mean / typical std
    rows.append((i, errs[0], errs[1], offset))
    print(f"layer {i:2d}: off max {errs[0][0]:.2e} L2 {errs[0][1]:.2e} | on max {errs[1][0]:.2e} L2 {errs[1][1]:.2e} "
          f"| L2 ratio {errs[0][1] / errs[1][1]:.1f}x | max|channel mean|/std {offset:.1f}", flush=True)

mean = [sum(r[j][m] for r in rows) / len(rows) for j in (1, 2) for m in (0, 1)]
print(f"mean over layers: off max {mean[0]:.2e} L2 {mean[1]:.2e} | on max {mean[2]:.2e} L2 {mean[3]:.2e} | "
      f"L2 ratio of means {mean[1] / mean[3]:.1f}x; worst layer L2 off {max(r[1][1] for r in rows):.2e} on "
      f"{max(r[2][1] for r in rows):.2e}; {time.time() - t0:.0f} s")
