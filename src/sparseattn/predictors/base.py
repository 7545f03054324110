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
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Protocol, runtime_checkable

import torch

from sparseattn._validation import fail
from sparseattn.layout.block_layout import BlockLayout

__all__ = ["Predictor", "register_predictor", "PREDICTORS", "make_predictor", "parse_predictor_spec",
           "config_to_json", "config_from_json"]


@runtime_checkable
class Predictor(Protocol):
    name: str
    config: Any

    def predict(self, q: torch.Tensor, k: torch.Tensor, *, causal: bool = True, layer: int | None = None) -> BlockLayout:
        ...

    def reset(self) -> None:
        ...


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

    for mod in ("static", "oracle", "mean_similarity", "sketch_walk"):
        try:
            importlib.import_module(f"sparseattn.predictors.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name != f"sparseattn.predictors.{mod}":
                raise


def make_predictor(name: str, **kwargs: Any):
    """Build a registered predictor from its name and config fields."""
    _ensure_registered()
    if name not in PREDICTORS:
        raise fail("make_predictor", "name", "is not a registered predictor", f"one of {sorted(PREDICTORS)}", repr(name))
    cls, cfg_cls = PREDICTORS[name]
    return cls(cfg_cls(**kwargs))


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
    kwargs: dict[str, Any] = {}
    if rest:
        for item in rest.split(","):
            key, eq, val = item.partition("=")
            if not eq or not key.strip():
                raise fail("parse_predictor_spec", "spec", "has an item that is not key=value", "'key=value'", repr(item))
            kwargs[key.strip()] = _parse_value(val.strip())
    return make_predictor(name.strip(), **kwargs)


def config_to_json(config: Any) -> str:
    """Frozen dataclass config → JSON text with its class name and ``version``."""
    if not dataclasses.is_dataclass(config):
        raise fail("config_to_json", "config", "must be a dataclass instance", "a <Name>Config", type(config).__name__)
    return json.dumps({"type": type(config).__name__, **dataclasses.asdict(config)}, sort_keys=True)


def config_from_json(text: str, config_cls: type) -> Any:
    """Inverse of :func:`config_to_json` for a known config class (never executes code)."""
    data = json.loads(text)
    if data.pop("type", config_cls.__name__) != config_cls.__name__:
        raise fail("config_from_json", "text", "holds another config type", config_cls.__name__, data.get("type"))
    return config_cls(**data)
