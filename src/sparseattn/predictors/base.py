"""Predictor protocol and registry.

A predictor decides at run time which key blocks each query block needs and returns a
:class:`~sparseattn.layout.BlockLayout`. Every predictor is a ``<Name>Predictor`` built from a
frozen ``<Name>Config`` dataclass (validated in ``__post_init__``, JSON round-trippable with a
``version`` field).

Contract of ``predict``:

* ``q`` is ``(B, H, N_q, D)``, ``k`` is ``(B, H_kv, N_kv, D)`` (GQA: each query head uses its KV
  head's keys); the layout has ``H`` heads (one per query head).
* ``causal`` is bottom-right aligned; the predictor never selects blocks outside the causal region
  when ``causal`` is True (exact element masking inside diagonal blocks is the kernel's job).
* ``layer`` is the transformer layer index when called from a patched model (``None`` for a
  standalone call). Stateful predictors (SketchWalk) keep per-sequence state across layers and
  clear it in ``reset()``, which the model integration calls before each forward pass.

Optional capabilities (read with :func:`graph_refusal` / :func:`graph_layer_key`, which give the defaults for a
predictor that does not define them), so that CUDA-graph replays never branch on a predictor's name:

* ``graph_refusal(layer) -> str | None``: why a call with this ``layer`` cannot be replayed from a CUDA graph
  (state kept in Python that a replay would not update), ``None`` if it can (the default);
* ``graph_layer_key(layer)``: what the prediction depends on in ``layer``, so calls of equal keys share one
  graph (default: ``layer`` itself).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Protocol, runtime_checkable

import torch

from sparseattn._validation import fail
from sparseattn.layout.block_layout import BlockLayout

__all__ = ["Predictor", "register_predictor", "PREDICTORS", "make_predictor", "parse_predictor_spec",
           "config_to_json", "config_from_json", "graph_refusal", "graph_layer_key"]


@runtime_checkable
class Predictor(Protocol):
    name: str
    config: Any

    def predict(self, q: torch.Tensor, k: torch.Tensor, *, causal: bool = True, layer: int | None = None) -> BlockLayout:
        ...

    def reset(self) -> None:
        ...


def graph_refusal(predictor: Any, layer: int | None) -> str | None:
    """The predictor's own ``graph_refusal(layer)`` (see the module docstring), ``None`` if it has none."""
    fn = getattr(predictor, "graph_refusal", None)
    return None if fn is None else fn(layer)


def graph_layer_key(predictor: Any, layer: int | None) -> Any:
    """The predictor's own ``graph_layer_key(layer)`` (see the module docstring), else ``layer``."""
    fn = getattr(predictor, "graph_layer_key", None)
    return layer if fn is None else fn(layer)


# name -> (predictor class, config class)
PREDICTORS: dict[str, tuple[type, type]] = {}


def register_predictor(name: str, config_cls: type):
    """Class decorator: ``@register_predictor("mean_sim", MeanSimilarityConfig)``."""

    def deco(cls: type) -> type:
        PREDICTORS[name] = (cls, config_cls)
        cls.name = name
        return cls

    return deco


def _ensure_registered() -> None:
    # import the built-in predictor modules so they register themselves
    import importlib

    for mod in ("static", "oracle", "mean_similarity", "sketch_walk", "gate"):
        try:
            importlib.import_module(f"sparseattn.predictors.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name != f"sparseattn.predictors.{mod}":
                raise


def _config_keys(cfg_cls: type) -> list[str]:
    """The keyword arguments a config class accepts (its ``init`` dataclass fields), in declaration order."""
    return [f.name for f in dataclasses.fields(cfg_cls) if f.init]


def make_predictor(name: str, **kwargs: Any):
    """Build a registered predictor from its name and config fields.

    Where a config selects by ``topk`` or ``cdf_threshold`` (exactly one) and defaults the latter, naming ``topk``
    alone selects by top-k: ``make_predictor("sampled", topk=0.2)`` is ``cdf_threshold=None, topk=0.2``. Naming both
    is still an error.

    Raises:
        ValueError: an unknown name, a key that is not a field of the predictor's config (the
            message lists the valid keys), or a value the config rejects.
    """
    fn = "make_predictor"
    _ensure_registered()
    if not isinstance(name, str) or name not in PREDICTORS:
        raise fail(fn, "name", "is not a registered predictor", f"one of {sorted(PREDICTORS)}", repr(name))
    cls, cfg_cls = PREDICTORS[name]
    if dataclasses.is_dataclass(cfg_cls):
        valid = _config_keys(cfg_cls)
        for key in kwargs:
            if key not in valid:
                raise fail(fn, f"key {key!r}", f"is not a parameter of {name}", f"one of {valid}", repr(key))
        if kwargs.get("topk") is not None and "cdf_threshold" not in kwargs and "cdf_threshold" in valid:
            kwargs = {**kwargs, "cdf_threshold": None}
    try:
        cfg = cfg_cls(**kwargs)
    except TypeError as exc:  # a config that compares or converts a value of the wrong type
        raise fail(fn, f"parameters of {name}", f"were rejected by {cfg_cls.__name__} ({exc})",
                   "values of the documented types", repr(kwargs)) from exc
    return cls(cfg)


def _parse_value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def parse_predictor_spec(spec: str):
    """``"name"`` or ``"name:key=value,key=value"`` → predictor (the CLI's ``--predictor`` syntax)."""
    if not isinstance(spec, str) or not spec.strip():
        raise fail("parse_predictor_spec", "spec", "must be a non-empty string", "'name:key=value,...'", repr(spec))
    name, _, rest = spec.strip().partition(":")
    return make_predictor(name.strip(), **_parse_items(rest, "parse_predictor_spec"))


def _parse_items(rest: str, func: str) -> dict[str, Any]:
    """``"key=value,key=value"`` → dict (values through :func:`_parse_value`); an empty string → ``{}``.

    Raises:
        ValueError: an item without ``=`` or without a key, or a key given twice.
    """
    kwargs: dict[str, Any] = {}
    if not rest.strip():
        return kwargs
    for item in rest.split(","):
        key, eq, val = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise fail(func, "spec", "has an item that is not key=value", "'key=value'", repr(item))
        if key in kwargs:
            raise fail(func, f"key {key!r}", "is given twice", "each key once", f"{kwargs[key]!r} and {val.strip()!r}")
        kwargs[key] = _parse_value(val.strip())
    return kwargs


def config_to_json(config: Any) -> str:
    """Frozen dataclass config → JSON text with its class name and ``version``."""
    if not dataclasses.is_dataclass(config):
        raise fail("config_to_json", "config", "must be a dataclass instance", "a <Name>Config", type(config).__name__)
    return json.dumps({"type": type(config).__name__, **dataclasses.asdict(config)}, sort_keys=True)


def config_from_json(text: str | bytes, config_cls: type) -> Any:
    """Inverse of :func:`config_to_json` for a known config class (never executes code).

    Keys missing from the JSON take the field's default (a field without a default is required).

    Raises:
        ValueError: text that is not JSON or not a JSON object, another config ``type``, a key
            that is not a field of ``config_cls`` (the valid keys are listed), a missing required
            field, or a value the config rejects.
    """
    fn = "config_from_json"
    if not (isinstance(config_cls, type) and dataclasses.is_dataclass(config_cls)):
        raise fail(fn, "config_cls", "must be a dataclass config class", "a <Name>Config class", repr(config_cls))
    if isinstance(text, (bytes, bytearray)):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise fail(fn, "text", "is not UTF-8", "JSON text", f"{len(text)} bytes") from None
    if not isinstance(text, str):
        raise fail(fn, "text", "must be JSON text", "a str", type(text).__name__)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise fail(fn, "text", f"is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})",
                   f"a JSON object of {config_cls.__name__}", f"{len(text)} characters") from None
    if not isinstance(data, dict):
        raise fail(fn, "text", "holds the wrong JSON type", f"a JSON object of {config_cls.__name__}",
                   f"a JSON {type(data).__name__}")
    typ = data.pop("type", config_cls.__name__)
    if typ != config_cls.__name__:
        raise fail(fn, "text", "holds another config type", config_cls.__name__, repr(typ))
    fields = {f.name: f for f in dataclasses.fields(config_cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise fail(fn, f"key {unknown[0]!r}", f"is not a field of {config_cls.__name__}", f"one of {list(fields)}",
                   repr(unknown[0]))
    missing = [n for n, f in fields.items()
               if n not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise fail(fn, "text", f"is missing required field(s) of {config_cls.__name__}", f"keys {missing}",
                   f"keys {sorted(data)}")
    try:
        return config_cls(**data)
    except TypeError as exc:
        raise fail(fn, "text", f"has values {config_cls.__name__} rejects ({exc})", "values of the documented types",
                   repr(data)) from exc
