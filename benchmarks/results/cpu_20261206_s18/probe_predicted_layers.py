"""Gemma-3-270M, one 8192-token window of the last 10 essays (the ones a gate trained on the first 15 never sees),
float32 on the CPU through masked SDPA, dense tail 128: per predictor spec, block sparsity over all layers and over
the predicted (global) layers 5 / 11 / 17, top-1 agreement and KL vs dense on the last 2048 positions.

    SPARSEATTN_TOKENIZER=.carry/gemma_tok PYTHONPATH=src python benchmarks/results/cpu_20261206_s18/probe_predicted_layers.py \
        MODEL.gguf ESSAYS_DIR SPEC [SPEC ...]

(eighteenth session; the numbers are in probe_predicted_layers.log.)
"""
import glob
import sys
import time

import torch

from sparseattn.integrations import patch_model
from sparseattn.models.loader import load

model, tok = load(sys.argv[1])  # the tokenizer: SPARSEATTN_TOKENIZER (transformers < 5.25 builds Gemma-3's wrongly)
text = " ".join(open(f).read() for f in sorted(glob.glob(f"{sys.argv[2]}/*.txt"))[15:])
ids = tok(text, return_tensors="pt")["input_ids"][:, :8192]
print("tokens", tuple(ids.shape), flush=True)
with torch.no_grad():
    ref = model(ids, logits_to_keep=2048).logits[0].float()
    for spec in sys.argv[3:]:
        t = time.time()
        with patch_model(model, predictor=spec, backend="masked_sdpa", dense_tail=128) as h:
            out = model(ids, logits_to_keep=2048).logits[0].float()
            rep = h.sparsity_report()
        top1 = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
        kl = torch.nn.functional.kl_div(out.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                        reduction="batchmean").item()
        per = {k: round(1 - v["density"], 3) for k, v in rep["layers"].items() if v["mode"] == "sparse"}
        print(f"{spec} | all {1 - rep['mean_density']:.3f} | predicted {1 - rep['mean_density_predicted']:.3f} {per} | "
              f"top1 {top1:.4f} kl {kl:.4f} | {time.time() - t:.0f}s", flush=True)
