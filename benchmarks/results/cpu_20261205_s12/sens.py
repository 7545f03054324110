"""Per-layer model-level sensitivity of the gate: only layer l sparse (gate cdf C, local 4), KL/top-1 vs dense on one window."""
import sys, json, time, math, torch
from sparseattn.models import load
from sparseattn.eval.texts import sample_ids
from sparseattn.eval.end_to_end import logits_metrics
from sparseattn.integrations.transformers_patch import patch_model
from sparseattn.gate.store import load_gate
from sparseattn.tuning.types import HeadParams, TunedConfig
from sparseattn.tuning.store import model_fingerprint
torch.set_num_threads(2)
C = float(sys.argv[1]); win = int(sys.argv[2]); out = sys.argv[3]
m, t = load('smollm2-135m', dtype=torch.float32, device='cpu')
ids, names, _ = sample_ids(m, t, seq_len=4096, samples=win + 1, text_dir='../shared/data/essays')
x = ids[win]
gate = load_gate('/tmp/gd/cli/gate_cli.safetensors', model=m)
H = m.config.num_attention_heads
k = 2048
with torch.no_grad():
    ref = m(x, use_cache=False, logits_to_keep=k).logits[0, -k:].float()
def hp(c):
    z = torch.zeros(H)
    return HeadParams(sim_threshold=torch.full((H,), -1.0), cdf_threshold=torch.full((H,), c), pv_threshold=torch.full((H,), math.inf),
                      dense=torch.zeros(H, dtype=torch.bool), sparsity=z, error=z)
meta = {"version": 1, "model": "smollm2", "fingerprint": model_fingerprint(m),
        "predictor": {"block_m": 64, "block_n": 64, "keep_sink": True, "keep_local": 4, "score": "gate", "name": "gate"},
        "rule": "l1", "budgets": {"l1": 0.06, "pv_l1": None, "layer_l1": ""}, "dense_layers": []}
res = []
for li in range(30):
    cfg = TunedConfig(layers={li: hp(C)}, meta=dict(meta), gate=gate)
    t0 = time.time()
    with torch.no_grad(), patch_model(m, tuned=cfg) as h:
        lg = m(x, use_cache=False, logits_to_keep=k).logits[0, -k:].float()
        rep = h.sparsity_report()
    mt = logits_metrics(lg, ref)
    sp = rep["layers"][str(li)]["sparsity"] if str(li) in rep["layers"] else rep["layers"][li]["sparsity"]
    r = {"layer": li, "cdf": C, "kl": mt["kl_dense_sparse"], "top1": mt["top1_agreement"], "sparsity": sp, "s": round(time.time() - t0, 1)}
    res.append(r); print(r, flush=True)
json.dump(res, open(out, "w"), indent=1)
