# Exploration script used for docs/predictors.md ("What we learned"). capture_qk_4096.py writes /tmp/exp/cap4k.pt (Q/K of layers 3,10,17,24 at 4K);
# estimator_recall.py and compare_real.py read it. Run from the repository root with the package installed.
import torch, json
from sparseattn.eval.compare import compare_predictors, write_report
torch.set_num_threads(1)
CAP=torch.load('/tmp/exp/cap4k.pt')
items=[{"layer":L,"length":q.shape[2],"q":q.float(),"k":k.float()} for L,(q,k) in sorted(CAP.items())]
for a,b in [("sketch_walk:dense_layers=0","sketch_walk:walk=false,dense_layers=0"),
            ("sketch_walk:dense_layers=0","oracle"),
            ("mean_sim:score=mixed,cdf_threshold=0.97,keep_local=8","oracle"),
            ("mean_sim","oracle")]:
    res=compare_predictors(a,b,items,with_output=False,keep_masks=2)
    print(a,"|",b); 
    for r in res["records"]: print("  L%d sp_a=%.3f sp_b=%.3f jac=%.3f rec_a=%.4f rec_b=%.4f corr_a_mass=%s" % (r["layer"],r["sparsity_a"],r["sparsity_b"],r["jaccard"],r["recall_a"],r["recall_b"], None if r["score_corr_a_mass"] is None else round(r["score_corr_a_mass"],3)))
    if b=="oracle" and a.startswith("mean_sim:score"): write_report(res, "docs/predictor_curves/compare_real_4096", plots=True)
