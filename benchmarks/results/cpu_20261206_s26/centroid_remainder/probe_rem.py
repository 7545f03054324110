"""Exploration (26th session): does estimating the skipped pages' contribution (page centroids) rescue sparse decode?

For each decode call the wrapper takes Quest's selection from the library, then computes in float64:
  none     - exact softmax over the selected pages only (what the library does)
  cent     - plus, per unselected page, log-mass log(n) + s*q.kmean and value vmean
  centvar  - cent with a diagonal-Gaussian correction: + 0.5*s^2*sum_d q_d^2 var_d
Records each variant's relative L1 output error against exact dense; returns VARIANT's output to the model.
Greedy agreement: free-running and teacher-forced against dense (float32 CPU).

Usage: PYTHONPATH=src python probe_rem.py MODEL ESSAYS LENGTH TOP_PAGES VARIANT[,VARIANT] [SAMPLES] [PAGE]
"""
import json
import math
import sys
import time

import torch

import sparseattn.ops.pages as pages_mod
from sparseattn.eval.gen_check import _dynamic_cache, greedy_generate
from sparseattn.eval.texts import sample_ids
from sparseattn.integrations import patch_model
from sparseattn.models import load

model_path, essays, N, TOP = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
VARIANTS = sys.argv[5].split(",")
SAMPLES = int(sys.argv[6]) if len(sys.argv) > 6 else 2
PS = int(sys.argv[7]) if len(sys.argv) > 7 else 16
NEW = 64
torch.manual_seed(0)
model, tok = load(model_path)
ids_list, names, _ = sample_ids(model, tok, seq_len=N, samples=SAMPLES, text_dir=essays)
orig = pages_mod.sparse_decode_attention
ERR: dict[str, list] = {}
CUR = {"v": "none"}


def wrapped(q, k, v, summ, **kw):
    res, (pidx, pnum) = orig(q, k, v, summ, **kw)
    scale = kw["scale"] if kw.get("scale") is not None else q.shape[-1] ** -0.5
    B, H, Lq, D = q.shape
    Hkv, n = k.shape[1], k.shape[2]
    G = H // Hkv
    P = -(-n // PS)
    pad = P * PS - n
    kp = torch.nn.functional.pad(k.double(), (0, 0, 0, pad)).view(B, Hkv, P, PS, D)
    vp = torch.nn.functional.pad(v.double(), (0, 0, 0, pad)).view(B, Hkv, P, PS, D)
    valid = torch.nn.functional.pad(torch.ones(n, dtype=torch.bool), (0, pad)).view(P, PS)
    cnt = valid.sum(1).double()  # (P,)
    # causal within the Lq new tokens: query row i sees keys < n - Lq + 1 + i
    pos = torch.arange(P * PS).view(P, PS)
    qg = q.double().reshape(B, Hkv, G, Lq, D) * scale
    s = torch.einsum("bhgid,bhpsd->bhgips", qg, kp)
    lim = (n - Lq + 1 + torch.arange(Lq)).view(Lq, 1, 1)
    vis = (pos[None] < lim) & valid[None]  # (Lq, P, PS)
    s = s.masked_fill(~vis[None, None, None], -math.inf)
    sel = torch.zeros(B, Hkv, P + 1, dtype=torch.bool)
    ar = torch.arange(pidx.shape[-1])
    idx = torch.where(ar[None, None] < pnum[..., None], pidx.long(), P)
    sel.scatter_(2, idx, True)
    sel = sel[..., :P]
    vsel = sel[:, :, None, None, :, None]
    dense_m = s.amax((-1, -2), keepdim=True)
    e = torch.exp(s - dense_m)
    dense = torch.einsum("bhgips,bhpsd->bhgid", e, vp) / e.sum((-1, -2))[..., None]
    # page statistics over keys visible to every row (the last page may hold this step's keys: it is always selected)
    w = valid.double()[None, None, :, :, None]
    kmean = (kp * w).sum(3) / cnt.clamp(min=1)[:, None]
    vmean = (vp * w).sum(3) / cnt.clamp(min=1)[:, None]
    kvar = ((kp - kmean[:, :, :, None]) ** 2 * w).sum(3) / cnt.clamp(min=1)[:, None]
    outs = {}
    for name in ("none", "cent", "centvar"):
        ss = s.masked_fill(~vsel, -math.inf)
        m = ss.amax((-1, -2))  # (B,Hkv,G,Lq)
        if name != "none":
            lm = torch.log(cnt.clamp(min=1e-30))[None, None, None, None] + torch.einsum("bhgid,bhpd->bhgip", qg, kmean)
            if name == "centvar":
                lm = lm + 0.5 * torch.einsum("bhgid,bhpd->bhgip", qg * qg, kvar)
            lm = lm.masked_fill(sel[:, :, None, None, :] | (cnt == 0)[None, None, None, None], -math.inf)
            m = torch.maximum(m, lm.amax(-1))
        es = torch.exp(ss - m[..., None, None])
        num = torch.einsum("bhgips,bhpsd->bhgid", es, vp)
        den = es.sum((-1, -2))
        if name != "none":
            el = torch.exp(lm - m[..., None])
            num = num + torch.einsum("bhgip,bhpd->bhgid", el, vmean)
            den = den + el.sum(-1)
        o = num / den[..., None]
        outs[name] = o
        err = ((o - dense).abs().sum(-1) / dense.abs().sum(-1)).mean()
        ERR.setdefault(name, []).append(float(err))
    out = outs[CUR["v"]].reshape(B, H, Lq, D).to(q.dtype)
    return out, (pidx, pnum)


pages_mod.sparse_decode_attention = wrapped
res = {"length": N, "top_pages": TOP, "page_size": PS, "prompts": names, "variants": {}}
dense_runs = []
with torch.no_grad():
    for ids in ids_list:
        t0 = time.time()
        toks, _, margins = greedy_generate(model, ids, NEW, _dynamic_cache(model), return_margins=True)
        dense_runs.append((toks, margins))
        print(f"dense {time.time() - t0:.0f}s", flush=True)
    for var in VARIANTS:
        CUR["v"] = var
        ERR.clear()
        rows = []
        for ids, (dt, dm) in zip(ids_list, dense_runs):
            with patch_model(model, decode="sparse", decode_top_pages=TOP, decode_page_size=PS,
                             decode_backend="reference"):
                free, _ = greedy_generate(model, ids, NEW, _dynamic_cache(model))
                forced, _ = greedy_generate(model, ids, NEW, _dynamic_cache(model), forced=dt)
            free, forced = list(map(int, free)), list(map(int, forced))
            agree = sum(a == b for a, b in zip(free, dt)) / NEW
            first = next((i for i, (a, b) in enumerate(zip(free, dt)) if a != b), None)
            mism = [i for i, (a, b) in enumerate(zip(forced, dt)) if a != b]
            rows.append(dict(free=agree, first_div=first, forced_mismatch=mism,
                             margins_at=[round(float(dm[i]), 4) for i in mism]))
            print(var, rows[-1], flush=True)
        errs = {k: round(sum(v) / len(v), 5) for k, v in ERR.items()}
        res["variants"][var] = dict(rows=rows, mean_free=sum(r["free"] for r in rows) / len(rows), rel_l1=errs)
        print(var, "mean free", res["variants"][var]["mean_free"], "rel L1 (all calls):", errs, flush=True)
json.dump(res, open(f"/tmp/s26/rem_{N}_{TOP}_{PS}_{'-'.join(VARIANTS)}.json", "w"), indent=1)
