# Exploration script used for docs/predictors.md ("What we learned"). capture_qk_4096.py writes /tmp/exp/cap4k.pt (Q/K of layers 3,10,17,24 at 4K);
# estimator_recall.py and compare_real.py read it. Run from the repository root with the package installed.
import sys, glob, math, torch
from transformers import AttentionInterface
from sparseattn.models import load
from sparseattn.predictors.oracle import exact_block_mass
from sparseattn.predictors._common import select_topk, causal_region, block_pool, local_mask
torch.set_num_threads(1)
N=4096; LAYERS=[3,10,17,24]
model, tok = load()
text = "\n\n".join(open(f).read() for f in sorted(glob.glob('/work/shared/data/essays/*.txt')))
ids = tok(text, return_tensors='pt').input_ids[:, :N]
CAP={}
def probe(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
    if module.layer_idx in LAYERS: CAP[module.layer_idx]=(query.clone(), key.clone())
    G=query.shape[1]//key.shape[1]
    out=torch.nn.functional.scaled_dot_product_attention(query,key.repeat_interleave(G,1),value.repeat_interleave(G,1),is_causal=True,scale=scaling)
    return out.transpose(1,2).contiguous(), None
AttentionInterface.register("probe", probe); model.set_attn_implementation("probe")
with torch.no_grad(): model(ids)
torch.save(CAP, '/tmp/exp/cap4k.pt')
print("saved")
