"""The two Gemma-3-270M RULER prompts the sparse configuration loses at 16K (niah_multikey, seed 0, samples 5 and 7;
benchmarks/results/h100_20261206_s19/ruler_gemma_16k): teacher-forced on dense's own continuation (its first 10
tokens, which hold the right answer), per configuration: block sparsity over the predicted layers, whether every
position's argmax equals dense's token, the first position that does not, and the answer's summed log-probability.
CPU float32 through masked SDPA, as the GPU run.

    SPARSEATTN_TOKENIZER=.carry/gemma_tok PYTHONPATH=src python benchmarks/results/cpu_20261206_s19/probe_multikey16k.py \
        MODEL.gguf ESSAYS_DIR SAMPLES SPEC [SPEC ...]     # SPEC: 'dense', or 'predictor spec|dense_tail[|dense layers[|L=spec&L=spec...]]' (the last: per-layer predictors)

Since the twentieth session this runs ../cpu_20261206_s20/probe_ruler16k.py with the task fixed to niah_multikey (the
same probe with the task as an argument; a 'dense' SPEC also prints dense's top-2 tokens per position).
"""
import runpy
import sys
from pathlib import Path

sys.argv.insert(1, "niah_multikey")
runpy.run_path(str(Path(__file__).resolve().parent.parent / "cpu_20261206_s20" / "probe_ruler16k.py"), run_name="__main__")
