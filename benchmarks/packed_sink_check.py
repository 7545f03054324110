"""CPU check of document sinks in packed sequences: each document of a packed row against it run alone, with and
without integrations.masks.document_sink_mask (the default predictor, SmolLM2, float32).

Usage: ``PYTHONPATH=src python benchmarks/packed_sink_check.py [TEXT_DIR]`` (default ../shared/data/essays).
Packing and the metrics are ``gpu_packed_model.py``'s.
"""

from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gpu_packed_model import against_alone, packed_inputs  # noqa: E402

import sparseattn.integrations.packed as handle_mod  # noqa: E402 (the module that calls document_sink_mask)
from sparseattn.eval.defaults import DEFAULT_PREDICTOR_SPEC  # noqa: E402
from sparseattn.integrations.transformers_patch import patch_model  # noqa: E402
from sparseattn.models import load  # noqa: E402

LENGTHS = [900, 400, 700, 500]


@torch.no_grad()
def main() -> int:
    text_dir = sys.argv[1] if len(sys.argv) > 1 else "../shared/data/essays"
    model, tok = load("smollm2-135m")
    ids, pos, alone = packed_inputs(model, tok, text_dir, LENGTHS, torch.device("cpu"))
    real = handle_mod.document_sink_mask
    try:
        for name, fn in (("without document sinks", lambda *a: real(*a) & False), ("with document sinks", real)):
            handle_mod.document_sink_mask = fn
            t = time.time()
            with patch_model(model, predictor=DEFAULT_PREDICTOR_SPEC) as h:
                got = model(ids, position_ids=pos, use_cache=False).logits[0].float()
                dens = h.sparsity_report()["mean_density"]
            m = against_alone(got, alone, LENGTHS)
            print(f"{name}: density {dens:.3f} top-1 {m['top1']:.4f} per doc {[round(x, 4) for x in m['top1_per_doc']]} "
                  f"cos mean {m['cos_mean']:.5f} min {m['cos_min']:.4f} ({time.time() - t:.0f}s)", flush=True)
    finally:
        handle_mod.document_sink_mask = real
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
