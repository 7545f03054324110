"""The tuned-parameter file: one safetensors file, never pickle.

Layout of a file written by :func:`save_tuned`:

* tensors ``"<layer>.<field>"`` for every tuned layer (see :meth:`HeadParams.tensors`): ``sim_threshold``,
  ``cdf_threshold``, ``pv_threshold``, ``sparsity``, ``error`` (float32 ``[H]``) and ``dense`` (bool ``[H]``);
* the header's ``__metadata__`` holds one key, :data:`META_KEY` (``"sparseattn_tuned"``), whose value
  is a JSON object: :attr:`TunedConfig.meta` plus ``"tuned_layers"`` (the sorted layer indices the
  file holds, so a missing layer is detected).
* a file tuned over a learned gate (``sparseattn tune --gate``) embeds that gate: tensors ``"gate.wq"``,
  ``"gate.wk"`` (and ``"gate.bias"``) as a gate file holds them (:mod:`sparseattn.gate.store`), metadata
  ``predictor.name`` ``"gate"`` and ``gate`` (the gate's own metadata, checked as :func:`~sparseattn.gate.store.load_gate`
  checks it). The file is then self-contained: the gate file it was tuned over is not needed to load it.
* ``rule`` is one of the search's error rules, or ``"layer_kl"`` for a file from ``sparseattn tune --allocate``
  (:mod:`sparseattn.tuning.allocate`: one threshold per layer; its ``error`` is the layer's predicted KL share).

:func:`load_tuned` checks everything it reads and raises a ``ValueError`` in the project's format
naming the file and the field: a missing, empty, truncated or corrupt file, missing metadata, a
wrong or missing ``version``, missing metadata keys, a layer with a missing tensor or a tensor of
the wrong shape or dtype, NaN thresholds of a non-dense head, and — with ``model`` — a model whose
fingerprint (layers, heads, KV heads, head size, model type) differs, or layer indices it lacks.

This module imports ``safetensors`` only inside its functions (``import sparseattn`` stays light).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from sparseattn._validation import check_file_path, fail
from sparseattn.errors import FINGERPRINT_KEYS, check_fingerprint_meta, model_fingerprint, write_safetensors_atomic
from sparseattn.tuning.types import _FIELDS, ALLOCATION_RULE, RULES, TUNED_VERSION, HeadParams, TunedConfig

__all__ = ["META_KEY", "FINGERPRINT_KEYS", "PREDICTOR_KEYS", "PREDICTOR_NAMES", "REQUIRED_META", "save_tuned", "load_tuned",
           "model_fingerprint", "check_tuned_for_model", "base_config", "make_predictor"]

#: the one ``__metadata__`` key of a tuned file (its value is a JSON object)
META_KEY = "sparseattn_tuned"
_LAYERS_KEY = "tuned_layers"
PREDICTOR_KEYS = ("block_m", "block_n", "keep_sink", "keep_local", "score")
#: metadata keys a tuned file must have (the others of :class:`TunedConfig` are informative)
REQUIRED_META = ("version", "fingerprint", "predictor", "rule", "budgets", "dense_layers")
_EXPECTED = "a tuned-parameter .safetensors file written by sparseattn tune (save_tuned)"
_GATE_PREFIX = "gate."
PREDICTOR_NAMES = ("mean_sim", "gate")  #: ``predictor.name`` values (absent: mean_sim, the files before the gate)


def _label(path: Path | str) -> str:
    return f"tuned file {path}"


# --------------------------------------------------------------------------- metadata checks
def _check_meta(fn: str, label: str, meta: Any) -> None:
    """Version, required keys and the types of the fields the predictor relies on."""
    from sparseattn.errors import check_meta_int, check_versioned_meta, require_keys

    check_versioned_meta(fn, label, meta, TUNED_VERSION, "sparseattn tune", REQUIRED_META)
    fp = check_fingerprint_meta(fn, label, meta)
    for k in FINGERPRINT_KEYS[:4]:
        check_meta_int(fn, f"{label} metadata 'fingerprint'", k, fp[k], minimum=1)
    pr = meta["predictor"]
    if not isinstance(pr, dict):
        raise fail(fn, f"{label} metadata key 'predictor'", "must be a JSON object", f"keys {list(PREDICTOR_KEYS)}",
                   type(pr).__name__)
    require_keys(fn, pr, PREDICTOR_KEYS, f"{label} metadata 'predictor'")
    _predictor_name(fn, label, meta)
    if meta["rule"] not in (*RULES, ALLOCATION_RULE):
        raise fail(fn, f"{label} metadata key 'rule'", "is unknown", f"one of {[*RULES, ALLOCATION_RULE]}",
                   repr(meta["rule"]))
    dl = meta["dense_layers"]
    if not isinstance(dl, list) or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in dl):
        raise fail(fn, f"{label} metadata key 'dense_layers'", "must be a list of layer indices", "e.g. [0, 1]",
                   repr(dl))


def _check_layers_against_fp(fn: str, label: str, layers: dict[int, HeadParams], meta: dict[str, Any]) -> None:
    fp = meta["fingerprint"]
    n_layers, n_heads = fp["num_hidden_layers"], fp["num_attention_heads"]
    bad = sorted(li for li in layers if not 0 <= li < n_layers)
    if bad:
        raise fail(fn, f"{label} layers", "are outside the fingerprint's num_hidden_layers",
                   f"indices 0..{n_layers - 1}", bad)
    for li, hp in sorted(layers.items()):
        if hp.heads != n_heads:
            raise fail(fn, f"{label} layer {li}", "has the wrong number of heads",
                       f"{n_heads} (fingerprint num_attention_heads)", hp.heads)


def _predictor_name(fn: str, label: str, meta: dict[str, Any]) -> str:
    """``meta["predictor"]["name"]`` (default ``"mean_sim"``), checked against :data:`PREDICTOR_NAMES`."""
    pr = meta.get("predictor")
    name = pr.get("name", "mean_sim") if isinstance(pr, dict) else "mean_sim"
    if name not in PREDICTOR_NAMES:
        raise fail(fn, f"{label} metadata 'predictor' key 'name'", "is not a tunable predictor",
                   f"one of {list(PREDICTOR_NAMES)}", repr(name))
    return name


def gate_for_layers(fn: str, label: str, gate: Any, layers: dict[int, HeadParams], meta: dict[str, Any]) -> None:
    """An embedded gate must fit the tuned file: the same block sizes and model shape, weights for every tuned layer."""
    if gate is None:
        return
    pr, fp = meta["predictor"], meta["fingerprint"]
    if (gate.block_m, gate.block_n) != (pr["block_m"], pr["block_n"]):
        raise fail(fn, f"{label} embedded gate", "has other block sizes than the tuned predictor",
                   f"block_m={pr['block_m']}, block_n={pr['block_n']}", f"block_m={gate.block_m}, block_n={gate.block_n}")
    if (gate.kv_heads, gate.head_dim) != (fp["num_key_value_heads"], fp["head_dim"]) or \
            (gate.heads is not None and gate.heads != fp["num_attention_heads"]):
        raise fail(fn, f"{label} embedded gate", "was trained for another model shape than the fingerprint's",
                   f"{fp['num_key_value_heads']} KV heads, head_dim {fp['head_dim']}, {fp['num_attention_heads']} heads",
                   f"{gate.kv_heads} KV heads, head_dim {gate.head_dim}, {gate.heads} heads")
    missing = sorted(li for li in layers if gate.index(li) is None)
    if missing:
        raise fail(fn, f"{label} embedded gate", "holds no weights for tuned layers", f"layers {sorted(layers)}", missing)


# --------------------------------------------------------------------------- save
def save_tuned(path: str | os.PathLike, cfg: TunedConfig) -> Path:
    """Write ``cfg`` as one safetensors file (tensors per layer, JSON metadata in the header).

    The metadata gets ``version`` = :data:`TUNED_VERSION` when it has none; it is checked as
    :func:`load_tuned` will check it, so a file that cannot be loaded is never written. The file
    is written to a temporary name next to ``path`` and renamed (no half-written file on failure);
    missing parent folders are created.

    Returns:
        The path written.

    Raises:
        ValueError: ``cfg`` is not a :class:`TunedConfig`, a layer index is not a non-negative int,
            the metadata is not JSON-serialisable or misses required keys.
    """
    fn = "save_tuned"
    if not isinstance(cfg, TunedConfig):
        raise fail(fn, "cfg", "must be a TunedConfig", "TunedConfig", type(cfg).__name__)
    p = check_file_path(fn, path, "tuned.safetensors")
    meta = dict(cfg.meta)
    meta.setdefault("version", TUNED_VERSION)
    if _LAYERS_KEY in meta:
        raise fail(fn, "cfg.meta", f"uses the reserved key {_LAYERS_KEY!r}", "other keys", sorted(meta))
    tensors: dict[str, torch.Tensor] = {}
    for li, hp in cfg.layers.items():
        if isinstance(li, bool) or not isinstance(li, int) or li < 0:
            raise fail(fn, "cfg.layers", "has a key that is not a layer index", "ints >= 0", repr(li))
        if not isinstance(hp, HeadParams):
            raise fail(fn, f"cfg.layers[{li}]", "must be a HeadParams", "HeadParams", type(hp).__name__)
        tensors.update(hp.tensors(li))
    if cfg.gate is not None:
        from sparseattn.gate.store import gate_payload

        gt, gmeta = gate_payload(fn, cfg.gate)
        tensors.update({f"{_GATE_PREFIX}{k}": v for k, v in gt.items()})
        meta["gate"] = gmeta
        meta["predictor"] = dict(meta.get("predictor") or {}, name="gate", score="gate")
    elif _predictor_name(fn, "cfg", meta) == "gate":
        raise fail(fn, "cfg.gate", "is None but the metadata names the gate predictor", "the GateWeights tuned over",
                   None)
    _check_meta(fn, "cfg", meta)
    _check_layers_against_fp(fn, "cfg", cfg.layers, meta)
    gate_for_layers(fn, "cfg", cfg.gate, cfg.layers, meta)
    try:
        text = json.dumps(dict(meta, **{_LAYERS_KEY: sorted(cfg.layers)}), sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise fail(fn, "cfg.meta", "is not JSON-serialisable", "JSON types (dict, list, str, number, bool, None)",
                   str(exc)) from None
    return write_safetensors_atomic(p, tensors, {META_KEY: text})


# --------------------------------------------------------------------------- load
def load_tuned(path: str | os.PathLike, *, model: Any = None) -> TunedConfig:
    """Read a file written by :func:`save_tuned`, checking everything (see module docstring).

    Args:
        path: the ``.safetensors`` file.
        model: optional transformers model (or its config): its fingerprint must equal the file's
            and it must have every tuned layer.

    Returns:
        The :class:`TunedConfig` (``meta`` as saved; tensors float32 / bool on the CPU).

    Raises:
        ValueError: ``load_tuned: tuned file <path> <what is wrong>; expected ..., got ...``.
    """
    from sparseattn.errors import json_metadata, load_safetensors_with_metadata

    fn = "load_tuned"
    tensors, header = load_safetensors_with_metadata(fn, path, "tuned file", expected=_EXPECTED)
    p = Path(path).expanduser()
    label = _label(p)
    meta = json_metadata(fn, label, header, META_KEY, kind="tuned file", expected=_EXPECTED)
    _check_meta(fn, label, meta)
    listed = meta.pop(_LAYERS_KEY, None)
    if not isinstance(listed, list) or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in listed):
        raise fail(fn, f"{label} metadata key {_LAYERS_KEY!r}", "is missing or not a list of layer indices",
                   "e.g. [2, 3, 4]", repr(listed))
    names = (*_FIELDS, "dense")
    expected_keys = {f"{li}.{n}" for li in listed for n in (*names, "keep_local")}  # keep_local: optional
    gate = None
    if _predictor_name(fn, label, meta) == "gate":
        from sparseattn.gate.store import gate_from_tensors

        if not isinstance(meta.get("gate"), dict):
            raise fail(fn, f"{label} metadata key 'gate'", "is missing or not a JSON object (the file names the gate "
                       "predictor)", "the embedded gate's metadata", type(meta.get("gate")).__name__)
        gt = {k[len(_GATE_PREFIX):]: v for k, v in tensors.items() if k.startswith(_GATE_PREFIX)}
        gate = gate_from_tensors(fn, f"{label} (embedded gate)", gt, meta["gate"])
        expected_keys |= {f"{_GATE_PREFIX}{k}" for k in gt}
    extra = sorted(set(tensors) - expected_keys)
    if extra:
        raise fail(fn, label, "holds tensors of no listed layer", f"only layers {listed}", extra[:8])
    H = meta["fingerprint"]["num_attention_heads"]
    layers: dict[int, HeadParams] = {}
    for li in listed:
        missing = [f"{li}.{n}" for n in names if f"{li}.{n}" not in tensors]
        if missing:
            raise fail(fn, f"{label} layer {li}", f"is missing tensor{'s' if len(missing) > 1 else ''} "
                       f"{', '.join(missing)}", f"tensors {[f'{li}.{n}' for n in names]}", "absent")
        for n in (*names, "keep_local"):
            if n == "keep_local" and f"{li}.{n}" not in tensors:
                continue
            t = tensors[f"{li}.{n}"]
            want = torch.bool if n == "dense" else torch.float32
            if t.dtype != want or tuple(t.shape) != (H,):
                raise fail(fn, f"{label} tensor '{li}.{n}'", "has the wrong shape or dtype",
                           f"[{H}] {str(want).replace('torch.', '')} (num_attention_heads {H})",
                           f"{list(t.shape)} {str(t.dtype).replace('torch.', '')}")
        try:
            layers[li] = HeadParams.from_tensors(li, tensors)
        except ValueError as exc:
            raise fail(fn, f"{label} layer {li}", f"holds invalid parameters ({exc})",
                       "valid per-head parameters", "see above") from None
    _check_layers_against_fp(fn, label, layers, meta)
    gate_for_layers(fn, label, gate, layers, meta)
    cfg = TunedConfig(layers=layers, meta=meta, gate=gate)
    if model is not None:
        check_tuned_for_model(cfg, model, label=label, func=fn)
    return cfg


# --------------------------------------------------------------------------- model checks
def check_tuned_for_model(cfg: TunedConfig, model: Any, *, label: str = "tuned config",
                          func: str = "check_tuned_for_model") -> None:
    """Raise unless ``cfg`` was tuned for a model of this shape (fingerprint equal, every layer present).

    Raises:
        ValueError: naming every differing fingerprint field, or the layer indices the model lacks.
    """
    _check_meta(func, label, cfg.meta)
    got = model_fingerprint(model)
    want = cfg.meta["fingerprint"]
    diff = [k for k in FINGERPRINT_KEYS if want.get(k) != got.get(k)]
    if diff:
        raise fail(func, f"{label}", f"was tuned for another model (fingerprint {', '.join(diff)} differ)",
                   "; ".join(f"{k}={want.get(k)!r}" for k in diff), "; ".join(f"{k}={got.get(k)!r}" for k in diff))
    indices = None
    if isinstance(model, torch.nn.Module):
        from sparseattn.models.layers import attention_layers

        indices = {i for i, _ in attention_layers(model)} or None
    if indices is None:
        indices = set(range(int(got["num_hidden_layers"] or 0)))
    bad = sorted(li for li in (*cfg.layers, *cfg.meta.get("dense_layers", ())) if li not in indices)
    if bad:
        hi = max(indices) if indices else -1
        raise fail(func, f"{label} layers", "name layers the model does not have", f"indices 0..{hi}", sorted(set(bad)))


# --------------------------------------------------------------------------- the predictor
def base_config(cfg: TunedConfig) -> Any:
    """The layer-wide :class:`MeanSimilarityConfig` of a tuned file: the project default's fields with
    the file's ``predictor`` metadata (``block_m``, ``block_n``, ``keep_sink``, ``keep_local``, ``score``)."""
    import dataclasses

    from sparseattn.eval.defaults import DEFAULT_PREDICTOR_SPEC
    from sparseattn.predictors.base import parse_predictor_spec

    default = parse_predictor_spec(DEFAULT_PREDICTOR_SPEC).config  # the project default, not a user's spec
    fields = {f.name for f in dataclasses.fields(default)}
    over = {k: v for k, v in (cfg.meta.get("predictor") or {}).items() if k in PREDICTOR_KEYS and k in fields}
    if (cfg.meta.get("predictor") or {}).get("name") == "gate":
        over.pop("score", None)  # the gate's scores replace mean_sim's; block sizes, sink and local still apply
    try:
        return dataclasses.replace(default, pv_threshold=None, dense_layers=0, **over)
    except (TypeError, ValueError) as exc:
        raise fail("base_config", "tuned metadata 'predictor'", f"is not a valid mean_sim setting ({exc})",
                   f"fields {list(PREDICTOR_KEYS)}", over) from None


def make_predictor(cfg: TunedConfig) -> Any:
    """The predictor applying ``cfg``: :class:`~sparseattn.tuning.predictor.TunedGatePredictor` for a file tuned
    over a gate, else :class:`~sparseattn.tuning.predictor.TunedMeanSimPredictor`."""
    from sparseattn.tuning.predictor import TunedGatePredictor, TunedMeanSimPredictor

    if cfg.gate is not None:
        return TunedGatePredictor(dict(cfg.layers), base_config(cfg), cfg.gate)
    return TunedMeanSimPredictor(dict(cfg.layers), base_config(cfg))

