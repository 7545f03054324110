"""The gate file: one safetensors file (never pickle) with JSON metadata in its header.

* tensors ``"wq"`` float32 ``[L, H_kv, D, d_gate]`` and ``"wk"`` float32 ``[L, H_kv, 3·D, d_gate]``
  (see :class:`sparseattn.gate.model.GateWeights`), and in version 2 the position bias ``"bias"``
  float32 ``[L, H, bias_buckets]`` (metadata ``num_attention_heads`` and ``bias_buckets``); version 1
  files (no bias) still load;
* ``__metadata__`` key :data:`META_KEY` (``"sparseattn_gate"``): a JSON object with ``version``
  (:data:`GATE_VERSION`), ``layers`` (model layer indices, one per first-dimension entry),
  ``block_m``, ``block_n``, ``d_gate``, ``head_dim``, ``num_key_value_heads``, ``features``,
  ``fingerprint`` (as :func:`sparseattn.errors.model_fingerprint` computes it) and the
  informative ``model``, ``training`` (texts, steps, learning rate, losses, seconds, device) and
  ``created``.

:func:`load_gate` checks everything and raises a ``ValueError`` in the project's format naming the
file: missing / empty / truncated / corrupt file, missing metadata or keys, a wrong version, a
missing tensor, tensors whose shape or dtype disagree with the metadata, NaN / inf weights, and —
with ``model`` — a model of another shape (fingerprint) or without the gate's layers.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import Any

import torch

from sparseattn._validation import check_file_path, fail
from sparseattn.gate.model import FEATURES, GateWeights

__all__ = ["META_KEY", "GATE_VERSION", "REQUIRED_META", "save_gate", "load_gate", "check_gate_for_model", "gate_meta",
           "gate_from_tensors", "gate_payload"]

META_KEY = "sparseattn_gate"
GATE_VERSION = 2  #: written when the gate has a position bias; version 1 (no bias) is written and read as before
_VERSIONS = (1, 2)
REQUIRED_META = ("version", "layers", "block_m", "block_n", "d_gate", "head_dim", "num_key_value_heads", "fingerprint")
_EXPECTED = "a gate .safetensors file written by sparseattn train-gate (save_gate)"


def gate_meta(weights: GateWeights, *, model: Any = None, training: dict[str, Any] | None = None,
              model_name: str | None = None) -> dict[str, Any]:
    """The metadata :func:`save_gate` writes for ``weights`` (fingerprint from ``model`` when given)."""
    from sparseattn.errors import model_fingerprint

    meta = dict(weights.meta)
    meta.update(_shape_meta(weights), features=FEATURES)
    if model is not None:
        meta["fingerprint"] = model_fingerprint(model)
        meta.setdefault("model", model_name or str(getattr(getattr(model, "config", None), "_name_or_path", "") or
                                                   type(model).__name__))
    if model_name is not None:
        meta["model"] = model_name
    if training is not None:
        meta["training"] = training
    meta.setdefault("created", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    return meta


def _shape_meta(weights: GateWeights) -> dict[str, Any]:
    """The metadata fields that follow from the tensors (version 2 and the bias fields only with a bias)."""
    out: dict[str, Any] = dict(version=1 if weights.bias is None else 2, layers=list(weights.layers),
                               block_m=int(weights.block_m), block_n=int(weights.block_n), d_gate=weights.d_gate,
                               head_dim=weights.head_dim, num_key_value_heads=weights.kv_heads)
    if weights.bias is not None:
        out.update(num_attention_heads=int(weights.bias.shape[1]), bias_buckets=int(weights.bias.shape[2]))
    return out


def _check_meta(fn: str, label: str, meta: Any) -> None:
    from sparseattn.errors import check_fingerprint_meta, check_meta_int, check_versioned_meta
    from sparseattn.gate.model import BIAS_BUCKETS

    v = meta.get("version") if isinstance(meta, dict) else None
    known = not isinstance(v, bool) and v in _VERSIONS
    check_versioned_meta(fn, label, meta, v if known else GATE_VERSION, "sparseattn train-gate", REQUIRED_META)
    for key in ("block_m", "block_n", "d_gate", "head_dim", "num_key_value_heads"):
        check_meta_int(fn, f"{label} metadata", key, meta[key], minimum=1)
    if v == 2:
        from sparseattn.errors import require_keys

        require_keys(fn, meta, ("num_attention_heads", "bias_buckets"), f"{label} metadata")
        check_meta_int(fn, f"{label} metadata", "num_attention_heads", meta["num_attention_heads"], minimum=1)
        if meta["num_attention_heads"] % meta["num_key_value_heads"]:
            raise fail(fn, f"{label} metadata key 'num_attention_heads'", "is not a multiple of num_key_value_heads",
                       f"a multiple of {meta['num_key_value_heads']}", meta["num_attention_heads"])
        fp = meta.get("fingerprint")
        fp_heads = fp.get("num_attention_heads") if isinstance(fp, dict) else None
        if fp_heads is not None and fp_heads != meta["num_attention_heads"]:
            raise fail(fn, f"{label} metadata key 'num_attention_heads'", "disagrees with the model fingerprint",
                       f"{fp_heads} (the fingerprint's)", meta["num_attention_heads"])
        if isinstance(meta["bias_buckets"], bool) or meta["bias_buckets"] != BIAS_BUCKETS:
            raise fail(fn, f"{label} metadata key 'bias_buckets'", "is not supported by this sparseattn",
                       f"{BIAS_BUCKETS} (re-run sparseattn train-gate)", repr(meta["bias_buckets"]))
    layers = meta["layers"]
    if not isinstance(layers, list) or not layers or \
            any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in layers) or len(set(layers)) != len(layers):
        raise fail(fn, f"{label} metadata key 'layers'", "must be a non-empty list of distinct layer indices",
                   "e.g. [0, 1, 2]", repr(layers))
    check_fingerprint_meta(fn, label, meta)


_DIMS = {"wq": "layers, num_key_value_heads, head_dim, d_gate", "wk": "layers, num_key_value_heads, 3*head_dim, d_gate",
         "bias": "layers, num_attention_heads, bias_buckets"}


def _tensor_names(meta: dict[str, Any]) -> tuple[str, ...]:
    return ("wq", "wk", "bias") if meta.get("version") == 2 else ("wq", "wk")


def _check_tensors(fn: str, label: str, tensors: dict[str, Any], meta: dict[str, Any]) -> None:
    L, Hkv, D, d = len(meta["layers"]), meta["num_key_value_heads"], meta["head_dim"], meta["d_gate"]
    shapes = {"wq": (L, Hkv, D, d), "wk": (L, Hkv, 3 * D, d)}
    if meta.get("version") == 2:
        shapes["bias"] = (L, meta["num_attention_heads"], meta["bias_buckets"])
    for name, shape in shapes.items():
        t = tensors.get(name)
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or tuple(t.shape) != shape:
            got = f"{list(t.shape)} {str(t.dtype).replace('torch.', '')}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise fail(fn, f"{label} tensor {name!r}", "has the wrong shape or dtype",
                       f"{list(shape)} float32 ({_DIMS[name]} from the metadata)", got)
        if not bool(torch.isfinite(t).all()):  # load time, not a hot path
            bad = int((~torch.isfinite(t)).sum())
            raise fail(fn, f"{label} tensor {name!r}", "holds NaN or infinite weights", "finite values",
                       f"{bad} non-finite of {t.numel()}")


def save_gate(path: str | os.PathLike, weights: GateWeights, meta: dict[str, Any] | None = None) -> Path:
    """Write ``weights`` (and ``meta``, default ``weights.meta``) as one safetensors file.

    The metadata is completed from the weights (layers, block sizes, sizes, ``version``) and checked
    as :func:`load_gate` checks it, so a file that cannot be loaded is never written; the file is
    written to a temporary name and renamed. Missing parent folders are created.

    Raises:
        ValueError: not a GateWeights, a directory path, metadata without a ``fingerprint``, non-JSON
            metadata, or tensors that disagree with it.
    """
    fn = "save_gate"
    if not isinstance(weights, GateWeights):
        raise fail(fn, "weights", "must be a GateWeights", "GateWeights", type(weights).__name__)
    p = check_file_path(fn, path, "gate.safetensors")
    tensors, full = gate_payload(fn, weights, meta)
    try:
        text = json.dumps(full, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise fail(fn, "meta", "is not JSON-serialisable (finite numbers only)", "JSON types", str(exc)) from None
    from sparseattn.errors import write_safetensors_atomic

    return write_safetensors_atomic(p, tensors, {META_KEY: text})


def load_gate(path: str | os.PathLike, *, model: Any = None) -> GateWeights:
    """Read and check a file written by :func:`save_gate` (see module docstring).

    Args:
        path: the ``.safetensors`` file.
        model: optional transformers model (or its config): its fingerprint must equal the file's
            and it must have every layer the gate holds.

    Raises:
        ValueError: ``load_gate: gate file <path> <what is wrong>; expected ..., got ...``.
    """
    from sparseattn.errors import json_metadata, load_safetensors_with_metadata

    fn = "load_gate"
    tensors, header = load_safetensors_with_metadata(fn, path, "gate file", expected=_EXPECTED)
    label = f"gate file {Path(path).expanduser()}"
    meta = json_metadata(fn, label, header, META_KEY, kind="gate file", expected=_EXPECTED)
    w = gate_from_tensors(fn, label, tensors, meta)
    if model is not None:
        check_gate_for_model(w, model, label=label, func=fn)
    return w


def gate_from_tensors(fn: str, label: str, tensors: dict[str, Any], meta: Any) -> GateWeights:
    """Check a gate's metadata and tensors (exactly ``wq``, ``wk`` and, in version 2, ``bias``) and build its
    :class:`GateWeights`; ``label`` names the source in errors. Used by :func:`load_gate` and by tuned files that
    embed the gate they were tuned over (:mod:`sparseattn.tuning.store`)."""
    _check_meta(fn, label, meta)
    names = _tensor_names(meta)
    missing = [n for n in names if n not in tensors]
    if missing:
        raise fail(fn, label, f"is missing tensor{'s' if len(missing) > 1 else ''} {', '.join(missing)}",
                   f"tensors {sorted(names)} (version {meta['version']})", f"tensors {sorted(tensors)}")
    extra = sorted(set(tensors) - set(names))
    if extra:
        raise fail(fn, label, "holds unexpected tensors", f"only {sorted(names)} (version {meta['version']})", extra[:8])
    _check_tensors(fn, label, tensors, meta)
    return GateWeights(list(meta["layers"]), tensors["wq"], tensors["wk"], int(meta["block_m"]), int(meta["block_n"]),
                       meta, tensors.get("bias"))


def gate_payload(fn: str, weights: Any, meta: dict[str, Any] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The checked ``(tensors, metadata)`` a stored gate consists of (:func:`save_gate`; tuned files embed the same):
    ``meta`` (default ``weights.meta``) completed from the weights (layers, block sizes, sizes, ``version``)."""
    if not isinstance(weights, GateWeights):
        raise fail(fn, "weights", "must be a GateWeights", "GateWeights", type(weights).__name__)
    full = dict(meta if meta is not None else weights.meta)
    for key in ("num_attention_heads", "bias_buckets"):
        full.pop(key, None)
    full.update(_shape_meta(weights))
    full.setdefault("features", FEATURES)
    _check_meta(fn, "weights", full)
    tensors = {"wq": weights.wq.detach().to("cpu", torch.float32).contiguous(),
               "wk": weights.wk.detach().to("cpu", torch.float32).contiguous()}
    if weights.bias is not None:
        if not isinstance(weights.bias, torch.Tensor):
            raise fail(fn, "weights.bias", "must be a tensor or None", "float32 [layers, heads, buckets]",
                       type(weights.bias).__name__)
        tensors["bias"] = weights.bias.detach().to("cpu", torch.float32).contiguous()
    _check_tensors(fn, "weights", tensors, full)
    return tensors, full


def check_gate_for_model(weights: GateWeights, model: Any, *, label: str = "gate", func: str = "check_gate_for_model") -> None:
    """Raise unless the gate was trained for a model of this shape (fingerprint equal, its layers present)."""
    from sparseattn.errors import FINGERPRINT_KEYS, model_fingerprint

    got = model_fingerprint(model)
    want = weights.meta.get("fingerprint") or {}
    diff = [k for k in FINGERPRINT_KEYS if want.get(k) != got.get(k)]
    if diff:
        raise fail(func, label, f"was trained for another model (fingerprint {', '.join(diff)} differ)",
                   "; ".join(f"{k}={want.get(k)!r}" for k in diff), "; ".join(f"{k}={got.get(k)!r}" for k in diff))
    n = int(got["num_hidden_layers"] or 0)
    bad = [li for li in weights.layers if li >= n]
    if bad:
        raise fail(func, f"{label} layers", "name layers the model does not have", f"indices 0..{n - 1}", bad)
