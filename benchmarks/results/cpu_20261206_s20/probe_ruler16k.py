"""A Gemma-3-270M RULER prompt at 16K (TASK, seed 0, SAMPLES; another length or model: RULER_LENGTH=4096 and any
MODEL), teacher-forced on dense's own continuation (its first
10 tokens), per configuration: block sparsity over the predicted layers, whether every position's argmax equals
dense's token, the first position that does not, and the continuation's summed log-probability; a 'dense' SPEC also
prints dense's top-2 tokens per position (how close its choices were). CPU float32 through masked SDPA, as the GPU
runs. ../cpu_20261206_s19/probe_multikey16k.py runs it with TASK = niah_multikey.

    SPARSEATTN_TOKENIZER=.carry/gemma_tok PYTHONPATH=src python benchmarks/results/cpu_20261206_s20/probe_ruler16k.py \
        TASK MODEL.gguf ESSAYS_DIR SAMPLES SPEC [SPEC ...]
    # SPEC: 'dense', or 'predictor spec|dense_tail[|dense layers[|L=spec&L=spec...]]' (the last: per-layer predictors)
"""
import os
import sys
import time

import torch

from sparseattn.eval.niah import _sentences
from sparseattn.eval.ruler import _vocabulary, make_ruler_sample
from sparseattn.eval.texts import documents_for
from sparseattn.integrations import patch_model
from sparseattn.models.loader import load

TASK = sys.argv.pop(1)
model, tok = load(sys.argv[1])
docs = list(documents_for(None, sys.argv[2])[0])
sents, vocab = _sentences(docs), _vocabulary(text for _, text in docs)
N = 10
LENGTH = int(os.environ.get("RULER_LENGTH", "16384"))
with torch.no_grad():
    for s in [int(x) for x in sys.argv[3].split(",")]:
        smp = make_ruler_sample(tok, TASK, length=LENGTH, seed=f"0-{s}", sentences=sents, vocabulary=vocab)
        ids = smp["input_ids"]
        # dense's own continuation (greedy, N tokens), then one forward over prompt + continuation per configuration
        cont = []
        out = model(ids, use_cache=True, logits_to_keep=1)
        past, nxt = out.past_key_values, out.logits[0, -1].argmax()
        for _ in range(N):
            cont.append(int(nxt))
            o = model(nxt.view(1, 1), past_key_values=past, use_cache=True)
            past, nxt = o.past_key_values, o.logits[0, -1].argmax()
        del past
        full = torch.cat([ids, torch.tensor([cont])], 1)
        print(f"sample {s}: answers {smp['answers']} | dense continuation {tok.decode(cont)!r}", flush=True)
        for spec in sys.argv[4:]:
            t = time.time()
            pred, _, rest = spec.partition("|")
            tail, _, rest = rest.partition("|")
            dl, _, pl = rest.partition("|")
            per_layer = {int(a): b for a, _, b in (x.partition("=") for x in pl.split("&") if x)} or None
            if pred == "dense":
                lg = model(full, logits_to_keep=N + 1).logits[0, :-1].float()
                sp = 0.0
                top2 = lg.log_softmax(-1).topk(2, -1)
                print("  dense top-2 per position: " + " | ".join(
                    f"{tok.decode([int(a)])!r} {float(x):.2f} / {tok.decode([int(b)])!r} {float(y):.2f}"
                    for (x, y), (a, b) in zip(top2.values.tolist(), top2.indices.tolist())), flush=True)
            else:
                with patch_model(model, predictor=pred, backend="masked_sdpa", dense_tail=int(tail or 0),
                                 dense_layers=[int(x) for x in dl.split(",") if x], per_layer=per_layer) as h:
                    lg = model(full, logits_to_keep=N + 1).logits[0, :-1].float()
                    sp = 1 - h.sparsity_report()["mean_density_predicted"]
            tgt = torch.tensor(cont)
            am = lg.argmax(-1)
            bad = (am != tgt).nonzero()
            first = int(bad[0]) if len(bad) else -1
            lp = lg.log_softmax(-1).gather(1, tgt[:, None]).sum().item()
            print(f"  {spec:70s} | predicted-layer sparsity {sp:.3f} | all argmax = dense: {first < 0} "
                  f"(first miss {first}: {tok.decode(am[:first + 1]) if first >= 0 else ''!r}) | logp {lp:.3f} | "
                  f"{time.time() - t:.0f}s", flush=True)
