# Exploration harness (all positions, masked SDPA): python docs/predictor_curves/explore_e2e.py <N> <spec> [<spec> ...]
# Metrics over ALL prompt positions (evaluate() scores only the last N/2); one sample (first N tokens of the essays).
import sys, time, glob, math, json
import torch
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from sparseattn.models import load
from sparseattn.predictors import parse_predictor_spec
torch.set_num_threads(2)
N = int(sys.argv[1]); specs = sys.argv[2:]
model, tok = load()
text = "\n\n".join(open(f).read() for f in sorted(glob.glob('/work/shared/data/essays/*.txt')))
ids = tok(text, return_tensors='pt').input_ids[:, :N]
STATE = {"pred": None, "dens": [], "layer": 0}
def sparse_attn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
    # query (B,H,N,D), key (B,Hkv,N,D)
    layer = module.layer_idx
    pred = STATE["pred"]
    lay = pred.predict(query, key, causal=True, layer=layer)
    STATE["dens"].append(lay.density(causal=True))
    m = lay.element_mask(causal=True)
    G = query.shape[1] // key.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(query, key.repeat_interleave(G,1), value.repeat_interleave(G,1), attn_mask=m, scale=scaling)
    return out.transpose(1, 2).contiguous(), None
AttentionInterface.register("probe_sparse", sparse_attn)
with torch.no_grad():
    t=time.time(); model.config._attn_implementation = "sdpa"; model.set_attn_implementation("sdpa")
    ref = model(ids).logits[0].float(); print("dense", time.time()-t, flush=True)
    for spec in specs:
        pred = parse_predictor_spec(spec); STATE.update(pred=pred, dens=[]); pred.reset()
        model.set_attn_implementation("probe_sparse")
        t=time.time(); out = model(ids).logits[0].float(); dt=time.time()-t
        cos = torch.nn.functional.cosine_similarity(out, ref, dim=-1).mean().item()
        top1 = (out.argmax(-1)==ref.argmax(-1)).float().mean().item()
        print(json.dumps(dict(N=N, spec=spec, sparsity=round(1-sum(STATE["dens"])/len(STATE["dens"]),4), cos=round(cos,5), top1=round(top1,4), s=round(dt,1))), flush=True)
