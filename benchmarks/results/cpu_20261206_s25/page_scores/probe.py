"""Exploration (twenty-fifth session, not a maintained benchmark): which cheap per-page summary ranks decode pages
closest to the oracle? Captures real decode steps of SmolLM2 (float32, CPU; the capture of
sparseattn.eval.decode_recall.measure_mass_recall) and scores the mass recall of several page scores at the same
page count, all with the first and last page forced:

* quest: the min/max bound (the library's selection, 2 summary vectors per page);
* sample2: the largest exact score among 2 keys of the page (keys 0 and page/2: the same bytes as quest's summary);
* norm2: the largest exact score among the page's 2 keys of largest norm (same bytes);
* lse_sample4: logsumexp of 4 sampled keys' exact scores (twice the bytes);
* quest+mean: quest's bound averaged with the mean-key score (3 vectors per page);
* oracle: the dense mass (the best page set at that count).

Usage: PYTHONPATH=src python3 probe.py MODEL.gguf ESSAYS_DIR [LENGTH]
"""
import json
import math
import sys

import torch

from sparseattn.eval.decode_recall import mass_recall, oracle_pages, page_mass
from sparseattn.eval.gen_check import _dynamic_cache, greedy_generate
from sparseattn.eval.texts import sample_ids
from sparseattn.integrations import patch_model
from sparseattn.models import load

model_path, essays = sys.argv[1], sys.argv[2]
N = int(sys.argv[3]) if len(sys.argv) > 3 else 4096
PS, STEPS, BUDGETS = 16, (1, 8, 24), (0.1, 0.25, 0.5)
model, tok = load(model_path)
ids_list, _, _ = sample_ids(model, tok, seq_len=N, samples=1, text_dir=essays)
caps, first = [], []


def observe(ev):
    if not first:
        first.append(ev["forward"])
    step = ev["forward"] - first[0] + 1
    if step in STEPS:
        caps.append(dict(step=step, layer=ev["layer"], q=ev["query"].clone(), k=ev["key"].clone(), scale=ev["scale"]))


with torch.no_grad(), patch_model(model, decode="sparse", decode_top_pages=1.0, decode_page_size=PS,
                                  decode_backend="reference") as h:
    h.decode_route.observer = observe
    greedy_generate(model, ids_list[0], max(STEPS) + 1, _dynamic_cache(model))


def pick(score, count):
    """The count highest pages per (b, KV head) of score (B, Hkv, P), the first and last page forced."""
    s = score.clone()
    s[..., 0] = math.inf
    s[..., -1] = math.inf
    idx = s.topk(count, -1).indices
    return idx, torch.full(s.shape[:2], count, dtype=torch.long)


def scores(q, k, scale):
    B, H, Lq, D = q.shape
    Hkv, n = k.shape[1], k.shape[2]
    G = H // Hkv
    P = -(-n // PS)
    kp = torch.nn.functional.pad(k.double(), (0, 0, 0, P * PS - n)).view(B, Hkv, P, PS, D)
    valid = torch.nn.functional.pad(torch.ones(n, dtype=torch.bool), (0, P * PS - n)).view(P, PS)
    qg = q.double().reshape(B, Hkv, G * Lq, D) * scale
    kmax = kp.masked_fill(~valid[None, None, :, :, None], -math.inf).amax(3)
    kmin = kp.masked_fill(~valid[None, None, :, :, None], math.inf).amin(3)
    kmax = torch.where(torch.isfinite(kmax), kmax, 0.0)
    kmin = torch.where(torch.isfinite(kmin), kmin, 0.0)
    bound = (qg.clamp(min=0) @ kmax.transpose(-1, -2) + qg.clamp(max=0) @ kmin.transpose(-1, -2)).amax(2)
    kmean = (kp * valid[None, None, :, :, None]).sum(3) / valid.sum(1).clamp(min=1)[None, None, :, None]
    mean = (qg @ kmean.transpose(-1, -2)).amax(2)
    exact = torch.einsum("bhrd,bhpsd->bhrps", qg, kp).masked_fill(~valid[None, None, None], -math.inf)  # (B,Hkv,R,P,PS)
    s2 = exact[..., [0, PS // 2]].amax(-1).amax(2)
    norms = kp.norm(dim=-1).masked_fill(~valid[None, None], -1.0)
    top2 = norms.topk(2, -1).indices  # (B, Hkv, P, 2)
    n2 = torch.gather(exact, -1, top2[:, :, None].expand(-1, -1, exact.shape[2], -1, -1)).amax(-1).amax(2)
    l4 = torch.logsumexp(exact[..., [0, PS // 4, PS // 2, 3 * PS // 4]], -1)
    l4 = torch.logsumexp(l4, 2)  # the group's rows summed in mass
    return {"quest": bound, "sample2": s2, "norm2": n2, "lse_sample4": l4, "quest+mean": 0.5 * (bound + mean)}


rows = []
for b in BUDGETS:
    acc: dict[str, list] = {}
    for c in caps:
        mass = page_mass(c["q"], c["k"], PS, scale=c["scale"])
        P = mass.shape[-1]
        count = max(2, math.ceil(b * P))
        for name, sc in scores(c["q"], c["k"], c["scale"]).items():
            acc.setdefault(name, []).append(mass_recall(mass, *pick(sc, count)).flatten())
        oi, on = oracle_pages(mass, count)
        acc.setdefault("oracle", []).append(mass_recall(mass, oi, on).flatten())
    row = {"budget": b}
    for name, v in acc.items():
        t = torch.cat(v)
        row[name] = (round(float(t.mean()), 4), round(float(t.min()), 4))
    rows.append(row)
    print(json.dumps(row), flush=True)
json.dump(rows, open(f"page_scores_{N}.json", "w"), indent=1)
