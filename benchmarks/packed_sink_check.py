"""CPU check of document sinks in packed sequences: each document of a packed row against it run alone, with and
without integrations.masks.document_sink_blocks (the default predictor, SmolLM2).

Usage: ``PYTHONPATH=src python benchmarks/packed_sink_check.py [TEXT_DIR]`` (default ../shared/data/essays).
"""
import sys
import time

import torch

import sparseattn.integrations.handle as H
from sparseattn.eval.defaults import DEFAULT_PREDICTOR_SPEC
from sparseattn.eval.texts import documents_for, token_samples
from sparseattn.integrations.transformers_patch import patch_model
from sparseattn.models import load
torch.set_grad_enabled(False)
lengths=[900,400,700,500]
model, tok = load("smollm2-135m")
docs,_ = documents_for(None, sys.argv[1] if len(sys.argv) > 1 else "../shared/data/essays")
w,_ = token_samples(docs, tok, seq_len=max(lengths), samples=len(lengths))
pieces=[x[:, :n] for x,n in zip(w,lengths)]
ids=torch.cat(pieces,1); pos=torch.cat([torch.arange(n) for n in lengths])[None]
alone=torch.cat([model(p,use_cache=False).logits[0] for p in pieces])
real=H.document_sink_blocks
for name, fn in (("without document sinks", lambda lay, d: lay), ("with document sinks", real)):
    H.document_sink_blocks = fn
    t=time.time()
    with patch_model(model, predictor=DEFAULT_PREDICTOR_SPEC) as h:
        got=model(ids, position_ids=pos, use_cache=False).logits[0]
        dens=h.sparsity_report()["mean_density"]
    cos=torch.nn.functional.cosine_similarity(got, alone, dim=-1)
    per=[]; s=0
    for n in lengths:
        per.append(round(float((got[s:s+n].argmax(-1)==alone[s:s+n].argmax(-1)).float().mean()),4)); s+=n
    print(f"{name}: density {dens:.3f} top-1 {float((got.argmax(-1)==alone.argmax(-1)).float().mean()):.4f} per doc {per} cos mean {float(cos.mean()):.5f} min {float(cos.min()):.4f} ({time.time()-t:.0f}s)", flush=True)
