"""Learned block gate (SeerAttention-style): weights, self-distillation training, file format.

* :mod:`sparseattn.gate.model` — :class:`GateWeights` (per-layer projections) and the pooled
  features / block scores both the predictor and the trainer use;
* :mod:`sparseattn.gate.store` — :func:`save_gate` / :func:`load_gate` (safetensors + JSON, checked);
* :mod:`sparseattn.gate.train` — capture Q/K, exact block-mass targets, KL training.

The predictor is :class:`sparseattn.predictors.gate.GatePredictor` (spec ``gate:path=FILE,topk=0.1``).
See docs/GATE.md. Nothing heavy is imported here.
"""

from __future__ import annotations

__all__ = ["GateWeights", "save_gate", "load_gate", "train_gate"]


def __getattr__(name: str):  # lazy: keep `import sparseattn.gate` light
    if name == "GateWeights":
        from sparseattn.gate.model import GateWeights

        return GateWeights
    if name in ("save_gate", "load_gate"):
        from sparseattn.gate import store

        return getattr(store, name)
    if name == "train_gate":
        from sparseattn.gate.train import train_gate

        return train_gate
    raise AttributeError(name)
