"""The one predictor resolver: a spec (string, dict, JSON, tuned file) → a predictor.

Every caller that takes a predictor from a user (``patch_model``, the CLI, ``eval``, ``compare``,
the benchmarks) goes through :func:`resolve_predictor`; :func:`select_predictor` adds the
``predictor`` / ``pattern`` / ``tuned`` choice the model-level entry points share. Accepted specs:

* a predictor object (anything with ``predict`` and ``reset``): returned as is; ``None``: ``None``;
* ``"name:key=value,..."``: a registered predictor (:func:`~sparseattn.predictors.base.parse_predictor_spec`);
* ``"pattern:name=<pattern>,<builder option>=...,pv_threshold=..."``: a static
  :class:`~sparseattn.predictors.pattern.PatternPredictor`;
* ``"tuned:path=FILE"`` or a :class:`~sparseattn.tuning.types.TunedConfig`: the tuned mean_sim predictor;
* ``"union:<spec>+<spec>[+...]"``: a :class:`~sparseattn.predictors.union.UnionPredictor` keeping the blocks any
  member keeps (members are any of these specs without ``+`` in them);
* a dict ``{"name": <predictor>, <field>: value, ...}`` (for ``"pattern"``, ``"pattern"`` names the
  static pattern), or its JSON text;
* the JSON of a config (:func:`~sparseattn.predictors.base.config_to_json`, ``{"type": "<Name>Config", ...}``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

from sparseattn._validation import fail

__all__ = ["resolve_predictor", "select_predictor", "tuned_predictor", "describe_predictor"]


def _is_predictor(obj: Any) -> bool:
    return hasattr(obj, "predict") and hasattr(obj, "reset")


def resolve_predictor(spec: Any, *, func: str = "resolve_predictor") -> Any:
    """Turn a predictor spec (see the module docstring) into a predictor; ``None`` stays ``None``.

    Args:
        spec: a predictor, a spec string, a dict, JSON text, or a ``TunedConfig``.
        func: the function named in error messages.

    Raises:
        ValueError: anything else, an unknown predictor or pattern, an unknown key (the valid keys
            are listed) or a bad value.
    """
    if spec is None:
        return None
    if _is_predictor(spec):
        return spec
    from sparseattn.tuning.types import TunedConfig

    if isinstance(spec, TunedConfig):
        return tuned_predictor(spec)[0]
    if isinstance(spec, Mapping):
        return _from_mapping(dict(spec), func)
    if not isinstance(spec, str) or not spec.strip():
        raise fail(func, "spec", "must be a predictor or a spec string", "'name:key=value,...'", repr(spec))
    text = spec.strip()
    if text.startswith("{"):
        return _from_json(text, func)
    from sparseattn.predictors.base import PREDICTORS, _ensure_registered, _parse_items, parse_predictor_spec

    name, _, rest = text.partition(":")
    name = name.strip()
    _ensure_registered()
    if name == "pattern" and "pattern" not in PREDICTORS:
        from sparseattn.predictors.pattern import pattern_predictor

        return pattern_predictor(_parse_items(rest, func))  # its "name" key is the pattern's
    if name == "tuned" and "tuned" not in PREDICTORS:
        return _tuned_from_items(_parse_items(rest, func), func)
    if name == "union" and "union" not in PREDICTORS:
        from sparseattn.predictors.union import UnionPredictor, split_union_spec

        parts = split_union_spec(rest, func)
        return UnionPredictor([resolve_predictor(p, func=func) for p in parts], specs=parts)
    return parse_predictor_spec(spec)


def _tuned_from_items(kw: dict[str, Any], func: str) -> Any:
    if sorted(kw) != ["path"]:
        raise fail(func, "tuned spec", "must name the tuned file and nothing else", "'tuned:path=FILE'",
                   repr(sorted(kw)))
    return tuned_predictor(str(kw["path"]), func=func)[0]


def _from_mapping(kw: dict[str, Any], func: str) -> Any:
    """``{"name": <predictor>, fields...}`` → predictor (for ``"pattern"``, the ``"pattern"`` key names the pattern)."""
    from sparseattn.predictors.base import PREDICTORS, _ensure_registered, make_predictor
    from sparseattn.predictors.pattern import pattern_predictor

    name = kw.pop("name", None)
    _ensure_registered()
    if name == "pattern" and "pattern" not in PREDICTORS:
        if "pattern" in kw:
            kw["name"] = kw.pop("pattern")
        return pattern_predictor(kw)
    if name == "tuned" and "tuned" not in PREDICTORS:
        return _tuned_from_items(kw, func)
    if not isinstance(name, str):
        raise fail(func, "spec", "has no predictor name", "{'name': <predictor>, ...}", repr(name))
    return make_predictor(name, **kw)


def _from_json(text: str, func: str) -> Any:
    """JSON text: a ``{"name": ...}`` spec object or a config's JSON (``{"type": "<Name>Config", ...}``)."""
    from sparseattn.predictors.base import PREDICTORS, _ensure_registered, config_from_json
    from sparseattn.predictors.pattern import PatternConfig, pattern_predictor

    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise fail(func, "spec", f"is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})",
                   "a JSON object", f"{len(text)} characters") from None
    if not isinstance(data, dict):
        raise fail(func, "spec", "holds the wrong JSON type", "a JSON object", f"a JSON {type(data).__name__}")
    typ = data.get("type")
    if typ is None:
        return _from_mapping(data, func)
    if typ == PatternConfig.__name__:
        kw = {k: v for k, v in data.items() if k not in ("type", "name", "version", "kwargs", "pv_threshold")}
        if kw:
            raise fail(func, f"key {sorted(kw)[0]!r}", "is not a field of PatternConfig",
                       "name, kwargs, pv_threshold, version", repr(sorted(kw)[0]))
        items = {str(k): v for k, v in (data.get("kwargs") or [])}
        return pattern_predictor({"name": data.get("name"), **items, "pv_threshold": data.get("pv_threshold")})
    _ensure_registered()
    for cls, cfg_cls in PREDICTORS.values():
        if cfg_cls.__name__ == typ:
            return cls(config_from_json(text, cfg_cls))
    known = sorted([c.__name__ for _, c in PREDICTORS.values()] + [PatternConfig.__name__])
    raise fail(func, "spec", "names an unknown config type", f"one of {known}", repr(typ))


def tuned_predictor(tuned: Any, model: Any = None, *, func: str = "patch_model") -> tuple[Any, Any, str]:
    """A tuned file (path) or :class:`~sparseattn.tuning.types.TunedConfig` → ``(predictor, config, label)``.

    A path is read with :func:`sparseattn.tuning.store.load_tuned` (checked against ``model`` when
    given); an in-memory config is checked against ``model`` too. ``label`` is the file's path or
    ``"in-memory"``. The predictor is a :class:`~sparseattn.tuning.predictor.TunedMeanSimPredictor`.
    """
    from sparseattn.tuning.store import check_tuned_for_model, load_tuned, make_predictor
    from sparseattn.tuning.types import TunedConfig

    if isinstance(tuned, TunedConfig):
        if model is not None:
            check_tuned_for_model(tuned, model, label="tuned (in-memory TunedConfig)", func=func)
        cfg, label = tuned, "in-memory"
    elif isinstance(tuned, (str, os.PathLike)) and str(tuned):
        cfg, label = load_tuned(tuned, model=model), str(tuned)
    else:
        raise fail(func, "tuned", "must be a tuned file path or a TunedConfig",
                   "'tuned.safetensors' or TunedConfig", type(tuned).__name__)
    return make_predictor(cfg), cfg, label


@dataclasses.dataclass(frozen=True)
class Selected:
    """What :func:`select_predictor` chose: the predictor, and the tuned config and its label (or ``None``)."""

    predictor: Any
    tuned_config: Any = None
    tuned_label: str | None = None

    def dense_layers(self, dense_layers: Any) -> list[int]:
        """``dense_layers`` plus the tuned file's own dense layers, sorted."""
        extra = self.tuned_config.meta.get("dense_layers", ()) if self.tuned_config is not None else ()
        return sorted(set(dense_layers) | set(extra))


def select_predictor(*, predictor: Any = None, pattern: Any = None, tuned: Any = None, model: Any = None,
                     func: str) -> Selected:
    """The ``predictor`` / ``pattern`` / ``tuned`` choice of a model-level entry point.

    ``tuned`` (checked against ``model``) wins over ``predictor`` and is refused with ``pattern``;
    else ``pattern`` (a :func:`~sparseattn.predictors.pattern.pattern_predictor` spec) wins over
    ``predictor`` (a :func:`resolve_predictor` spec).
    """
    from sparseattn.predictors.pattern import pattern_predictor

    if tuned is not None:
        if pattern is not None:
            raise fail(func, "tuned", "is mutually exclusive with pattern", "tuned alone", "tuned and pattern")
        pred, cfg, label = tuned_predictor(tuned, model)
        return Selected(pred, cfg, label)
    return Selected(pattern_predictor(pattern) if pattern is not None else resolve_predictor(predictor))


def describe_predictor(pred: Any) -> dict[str, Any]:
    """JSON-friendly description of a predictor (name, class and config fields)."""
    if pred is None:
        return {"name": "dense"}
    cfg = getattr(pred, "config", None)
    if dataclasses.is_dataclass(cfg):
        fields = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}
    else:
        fields = repr(cfg)
    return {"name": getattr(pred, "name", type(pred).__name__), "class": type(pred).__name__, "config": fields}
