# Exploration script used for docs/predictors.md ("What we learned"). capture_qk_4096.py writes /tmp/exp/cap4k.pt (Q/K of layers 3,10,17,24 at 4K);
# estimator_recall.py and compare_real.py read it. Run from the repository root with the package installed.
import torch, math
from sparseattn.predictors.oracle import exact_block_mass
from sparseattn.predictors._common import select_topk, causal_region, block_pool, local_mask
torch.set_num_threads(1)
CAP=torch.load('/tmp/exp/cap4k.pt')
bs=64
def scores(q,k,kind):
    B,H,N,D=q.shape; Hkv=k.shape[1]; G=H//Hkv
    qs,_,qc=block_pool(q,bs); ks,_,kc=block_pool(k,bs)
    qm=qs/qc[:,None]; km=(ks/kc[:,None]).repeat_interleave(G,1)
    reg=causal_region(N,N,bs,bs,True,q.device)
    if kind=="mean":
        s=qm@km.transpose(-1,-2)*D**-0.5
    elif kind=="quest":
        kb=k.reshape(B,Hkv,N//bs,bs,D); kmax=kb.amax(3).repeat_interleave(G,1); kmin=kb.amin(3).repeat_interleave(G,1)
        s=torch.maximum(qm[...,:,None,:]*kmax[...,None,:,:], qm[...,:,None,:]*kmin[...,None,:,:]).sum(-1)*D**-0.5
    elif kind=="qtok":  # each query token vs key-block means, softmax per token (with log count), avg over block rows
        st=q@km.transpose(-1,-2)*D**-0.5  # B,H,N,Nb
        r=torch.arange(N)[:,None]//bs; c=torch.arange(N//bs)[None,:]
        st=st.masked_fill(c>r, -math.inf)
        p=torch.softmax(st,-1).reshape(B,H,N//bs,bs,-1).mean(3); return p
    elif kind=="qtokmax": # max over query tokens of q_i . kmax-ish: use token scores vs key means, take max over rows
        st=q@km.transpose(-1,-2)*D**-0.5
        s=st.reshape(B,H,N//bs,bs,-1).amax(3)
    elif kind=="local":
        i=torch.arange(N//bs)[:,None]; j=torch.arange(N//bs)[None,:]
        s=(-(i-j).abs()).float().expand(B,H,-1,-1)
    s=s.masked_fill(~reg,-math.inf)
    return torch.softmax(s,-1)
for L,(q,k) in sorted(CAP.items()):
    q=q.float(); k=k.float(); N=q.shape[2]
    mass=exact_block_mass(q,k,causal=True,block_m=bs,block_n=bs)
    reg=causal_region(N,N,bs,bs,True,q.device)
    forced=local_mask(N,N,bs,bs,1,True,q.device); forced[:,0]=True
    res={}
    for kind in ["local","mean","quest","qtok","qtokmax"]:
        s=scores(q,k,kind)
        for f in (0.2,0.35,0.5):
            m=select_topk(s.masked_fill(forced,1e9),reg,f)
            rec=(mass*m).sum(-1)  # per row recall
            res[(kind,f)]=(round(float(rec[...,32:].mean()),4), round(float(rec[...,32:].amin(-1).mean()),3))
        # hybrid: local window 8 + topk of rest
        w=local_mask(N,N,bs,bs,8,True,q.device)|forced
        m=select_topk(s.masked_fill(w,1e9),reg,0.35)
        res[(kind,"w8+0.35")]=round(float((mass*m).sum(-1)[...,32:].mean()),4)
    # oracle
    for f in (0.2,0.35,0.5):
        m=select_topk(mass,reg,f); res[("oracle",f)]=round(float((mass*m).sum(-1)[...,32:].mean()),4)
    print(L, res, flush=True)
