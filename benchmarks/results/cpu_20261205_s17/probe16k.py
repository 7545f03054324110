"""One RULER prompt (niah_single, 16384 tokens, sample 3) on the CPU in fp32: dense vs all blocks through masked SDPA
vs the default predictor (+ dense tail 128): is the GPU run's lost answer the predictor's or the path's?"""
import json, sys, time
import torch
sys.path.insert(0, "/work/main/src")
from sparseattn.eval import end_to_end
from sparseattn.eval.niah import _sentences
from sparseattn.eval.ruler import make_ruler_sample, _vocabulary, _special_ids, _continuation, string_match_all, DEFAULT_GEN_TOKENS
from sparseattn.eval.texts import documents_for
from sparseattn.eval.bench_model import ALL_BLOCKS_SPEC
from sparseattn.predictors.pattern import pattern_predictor
from sparseattn.models import model_and_tokenizer
from sparseattn.integrations.transformers_patch import patch_model
torch.set_num_threads(2)
model, tok = model_and_tokenizer("probe", "/tmp/gemma.gguf", None, None, dtype=torch.float32, device=torch.device("cpu"))
docs, _ = documents_for(None, "/work/main/.carry/essays"); docs = list(docs)
smp = make_ruler_sample(tok, "niah_single", length=16384, seed="0-3", sentences=_sentences(docs),
                        vocabulary=_vocabulary(t for _, t in docs))
ids = smp["input_ids"]; stops = _special_ids(tok); gen = DEFAULT_GEN_TOKENS["niah_single"]
print("answers", smp["answers"], "tokens", ids.shape, flush=True)
out = {}
def go(label, handle=None):
    t0 = time.time()
    with torch.no_grad():
        r = end_to_end.greedy_generate(model, ids, gen_tokens=gen, score_last=1, stop_ids=stops)
    text = _continuation(tok, r["tokens"])
    out[label] = {"score": string_match_all(text, smp["answers"]), "output": text[:80], "s": time.time() - t0,
                  "density": None if handle is None else handle.sparsity_report()["mean_density"]}
    print(label, json.dumps(out[label]), flush=True)
go("dense")
from sparseattn.eval.ruler import parse_configs
for label, pred, tail in [("all blocks (masked SDPA)", pattern_predictor(ALL_BLOCKS_SPEC), 0),
                          ("default + tail128", parse_configs("mean_sim:score=mixed,cdf_threshold=0.97,keep_local=8", None)[0][1], 128)]:
    h = patch_model(model, predictor=pred, backend="masked_sdpa", dense_tail=tail)
    try:
        go(label, h)
    finally:
        h.unpatch()
json.dump(out, open("/tmp/s17/probe/probe16k.json", "w"), indent=1)
