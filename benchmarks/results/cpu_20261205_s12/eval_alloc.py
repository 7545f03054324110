"""Evaluate per-layer CDF allocations of the gate (all heads of a layer share one cdf) on held-out windows."""
import sys, json, time, math, torch
from sparseattn.models import load
from sparseattn.eval.texts import sample_ids
from sparseattn.eval.end_to_end import logits_metrics
from sparseattn.integrations.transformers_patch import patch_model
from sparseattn.gate.store import load_gate
from sparseattn.tuning.types import HeadParams, TunedConfig
from sparseattn.tuning.store import model_fingerprint, save_tuned
torch.set_num_threads(2)
alloc = json.load(open(sys.argv[1])); targets = [float(x) for x in sys.argv[2].split(',')]
seq, skip, n = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]); gate_path = sys.argv[6]; out = sys.argv[7]
m, t = load('smollm2-135m', dtype=torch.float32, device='cpu')
ids, names, _ = sample_ids(m, t, seq_len=seq, samples=skip + n, text_dir='../shared/data/essays')
ids = ids[skip:]
gate = load_gate(gate_path, model=m)
H = m.config.num_attention_heads; k = seq // 2
with torch.no_grad():
    refs = [m(x, use_cache=False, logits_to_keep=k).logits[0, -k:].float() for x in ids]
def cfg_for(cdfs):
    z = torch.zeros(H)
    layers = {li: HeadParams(sim_threshold=torch.full((H,), -1.0), cdf_threshold=torch.full((H,), float(c)),
                             pv_threshold=torch.full((H,), math.inf), dense=torch.zeros(H, dtype=torch.bool), sparsity=z.clone(), error=z.clone())
              for li, c in enumerate(cdfs)}
    meta = {"version": 1, "model": "smollm2-135m", "fingerprint": model_fingerprint(m),
            "predictor": {"block_m": 64, "block_n": 64, "keep_sink": True, "keep_local": 4, "score": "gate", "name": "gate"},
            "rule": "l1", "budgets": {"l1": 0.06, "pv_l1": None, "layer_l1": ""}, "dense_layers": [],
            "allocation": "per-layer cdf from one-layer KL sensitivity (window 11) and the gate's per-layer mass curves (w17/w18)"}
    return TunedConfig(layers=layers, meta=meta, gate=gate)
rows = []
for tg in targets:
    a = min(alloc, key=lambda r: abs(r["kl"] - tg))
    cfg = cfg_for(a["cdf"])
    t0 = time.time(); per = []
    with torch.no_grad(), patch_model(m, tuned=cfg) as h:
        for x, ref in zip(ids, refs):
            per.append(logits_metrics(m(x, use_cache=False, logits_to_keep=k).logits[0, -k:].float(), ref))
        rep = h.sparsity_report()
    row = {key: sum(p[key] for p in per) / len(per) for key in per[0]}
    row.update(pred_kl=a["kl"], pred_sparsity=a["sparsity"], cdf=a["cdf"], sparsity=rep["mean_sparsity"], seq_len=seq,
               windows=list(range(skip, skip + n)), gate=gate_path, s=round(time.time() - t0, 1))
    rows.append(row)
    print(f"pred KL {a['kl']:.4f} pred sp {a['sparsity']:.3f} -> sparsity {row['sparsity']:.4f} top-1 {row['top1_agreement']:.4f} cos {row['logits_cosine']:.5f} KL {row['kl_dense_sparse']:.4f} ({row['s']} s)", flush=True)
    save_tuned(out.replace('.jsonl', f'_{tg:g}.safetensors'), cfg)
with open(out, 'w') as f:
    for r in rows: f.write(json.dumps(r) + '\n')
