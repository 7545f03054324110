import torch, json
from safetensors.torch import load_file
from sparseattn.gate.store import load_gate
from sparseattn.gate.model import gate_scores, bias_bucket_index
from sparseattn.predictors._common import select_cdf, forced_blocks, causal_region
torch.set_num_threads(1)
w = load_gate('/tmp/gd/cli/gate_cli.safetensors')
grid = [0.995, 0.99, 0.98, 0.97, 0.96, 0.95, 0.94, 0.93, 0.92, 0.9, 0.88, 0.85, 0.8, 0.75, 0.7]
out = {c: [0.0] * 30 for c in grid}
miss = {c: [0.0] * 30 for c in grid}
wins = ['w17', 'w18']
for name in wins:
    d = load_file(f'/tmp/gd/data/{name}.safetensors')
    qf, kf, tg = d['qf'], d['kf'], d['tg']
    L, S, H, Mb, D = qf.shape; N = Mb * 64
    region = causal_region(N, N, 64, 64, True, torch.device('cpu'))
    forced = forced_blocks(N, N, 64, 64, True, 4, True, torch.device('cpu'))
    idx = bias_bucket_index(N, N, 64, 64); nreg = region.sum().item()
    for li in range(L):
        p = torch.softmax(gate_scores(qf[li], kf[li], w.wq[li], w.wk[li], w.bias[li][:, idx]).masked_fill(~region, float('-inf')), -1)
        for c in grid:
            m = (select_cdf(p, region, c) | forced) & region
            out[c][li] += (1 - m.sum().item() / (nreg * H)) / len(wins)
            miss[c][li] += (1 - (tg[li] * m).sum(-1).mean().item()) / len(wins)
json.dump({'sparsity': {str(c): v for c, v in out.items()}, 'miss': {str(c): v for c, v in miss.items()}}, open('/tmp/s12/curves.json', 'w'))
print({c: round(sum(v) / 30, 4) for c, v in out.items()})
