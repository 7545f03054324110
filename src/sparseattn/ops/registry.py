"""The operator registry: every attention kernel (and its reference) described once, by itself.

An :class:`Operator` declares what it is (``name``, ``kind``), what it can run (``devices``,
``dtypes``, ``head_dims``, and a ``refusal`` function that gives the precise reason for everything
else), how to run it (``run``), how it is configured (``config_type``, ``tuned``: the per-device
tuned-config JSON shipped in ``sparseattn/ops/tuned/``) and, where one exists, its
``torch.library`` custom op. Dispatchers only list operators:

- :func:`sparseattn.ops.attention.select_backend` asks the ``"prefill"`` operators listed for the
  ``"attention"`` entry point, in ``priority`` order;
- the model integration (``patch_model``) asks the ``"prefill"`` operators listed for
  ``"integration"`` (the masked-SDPA path is one of them) and then the attention dispatcher.

Adding a kernel (decode, FP8, a state-carrying variant) is adding an operator: write the kernel and
its launcher, then :func:`register_operator` an :class:`Operator` whose ``refusal`` says what it does
not run. ``run``/``refusal`` may be given as ``"module:function"`` strings, resolved on first use, so
registering never imports Triton (``import sparseattn`` stays light).

Tuned configs are data: :class:`TunedConfigs` (one operator, entries per device *name* such as
``"NVIDIA H200"``), read and written as JSON by :func:`load_tuned_configs` / :func:`save_tuned_configs`
(never pickle); :func:`tuned_for` reads an operator's shipped file once and :func:`tuned_config` looks a
launch up in it.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import os
import threading
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from sparseattn._validation import fail

__all__ = ["Operator", "register_operator", "unregister_operator", "set_builtin_loader", "operators", "get_operator", "operator_refusals",
           "KINDS", "TunedEntry", "TunedConfigs", "load_tuned_configs", "save_tuned_configs", "tuned_for", "tuned_config",
           "shipped_launch_winners", "check_tuned_configs",
           "device_name", "TUNED_DIR", "TUNED_VERSION"]

KINDS = ("prefill", "decode", "quant_prefill", "merge", "predict")
ENTRY_POINTS = ("attention", "integration", "decode", "quant", "merge", "predict")
TUNED_DIR = Path(__file__).with_name("tuned")
TUNED_VERSION = 1


def _resolve(fn: Callable[..., Any] | str) -> Callable[..., Any]:
    if callable(fn):
        return fn
    mod, _, attr = fn.partition(":")
    return getattr(importlib.import_module(mod), attr)


@dataclasses.dataclass(frozen=True, eq=False)
class Operator:
    """One kernel (or reference) as the dispatchers see it.

    Attributes:
        name: unique; the ``backend=`` name users pass (``"triton"``, ``"reference"``, ``"masked_sdpa"``, ...).
        kind: ``"prefill"`` (attention over a layout), ``"decode"``, ``"quant_prefill"``, ...
        run: the function that computes it, or ``"module:function"`` (resolved on first use).
        refusal: ``refusal(q, **inputs) -> str | None``: ``None`` if it runs these inputs, else why not
            (device, dtype, head_dim, blocks, Triton availability). Support only: malformed inputs are
            the run function's ``ValueError``. A string is resolved like ``run``.
        devices / dtypes / head_dims: declared capabilities (documentation and quick filters; ``None`` =
            any). ``refusal`` is the authority: it gives the reason for each of them.
        entry_points: the dispatchers that list it (``"attention"``: ``attention(backend=...)``;
            ``"integration"``: ``patch_model(backend=...)``; ``"decode"``; ``"quant"``; ``"merge"``:
            ``merge_states(backend=...)``; ``"predict"``: the predictors' fused path).
        priority: order in ``backend="auto"`` (lower first).
        preferred: ``preferred(q, pv_threshold) -> bool``: whether ``"auto"`` may pick it for these inputs
            even though it accepts them (the Triton kernel under the CPU interpreter is a test vehicle,
            never the automatic choice). ``None`` = always.
        config_type: the dataclass of its launch parameters (``None``: no tunable launch).
        tuned: file name in ``sparseattn/ops/tuned/`` holding its per-device tuned configs, or ``None``.
        custom_op: qualified name of its ``torch.library`` op (with a fake), or ``None``.
        description: one line for listings and errors.
    """

    name: str
    kind: str
    run: Callable[..., Any] | str
    refusal: Callable[..., str | None] | str
    devices: tuple[str, ...] | None = None
    dtypes: tuple[torch.dtype, ...] | None = None
    head_dims: tuple[int, ...] | None = None
    entry_points: tuple[str, ...] = ()
    priority: int = 100
    preferred: Callable[[torch.Tensor, Any], bool] | None = None
    config_type: type | None = None
    tuned: str | None = None
    custom_op: str | None = None
    description: str = ""

    def __post_init__(self) -> None:
        fn = "Operator"
        if not isinstance(self.name, str) or not self.name or ":" in self.name:
            raise fail(fn, "name", "must be a non-empty string without ':'", "e.g. 'triton'", repr(self.name))
        if self.kind not in KINDS:
            raise fail(fn, "kind", "is unknown", f"one of {list(KINDS)}", repr(self.kind))
        bad = [e for e in self.entry_points if e not in ENTRY_POINTS]
        if bad or not isinstance(self.entry_points, tuple):
            raise fail(fn, "entry_points", "names an unknown dispatcher", f"a tuple of {list(ENTRY_POINTS)}",
                       repr(self.entry_points))
        for what in ("run", "refusal"):
            val = getattr(self, what)
            if not callable(val) and not (isinstance(val, str) and ":" in val):
                raise fail(fn, what, "must be callable or 'module:function'", "a function", repr(val))

    def run_fn(self) -> Callable[..., Any]:
        """The run function (a ``"module:function"`` string is imported now)."""
        return _resolve(self.run)

    def refusal_fn(self) -> Callable[..., str | None]:
        return _resolve(self.refusal)

    def not_supported_reasons(self, q: torch.Tensor, **inputs: Any) -> list[str]:
        """xFormers' spelling: the reasons it refuses (empty: it runs these inputs)."""
        why = self.refusal_fn()(q, **inputs)
        return [] if why is None else [why]

    def describe(self) -> dict[str, Any]:
        """A JSON-ready description (listings, reports)."""
        return {"name": self.name, "kind": self.kind, "entry_points": list(self.entry_points),
                "priority": self.priority,
                "devices": None if self.devices is None else list(self.devices),
                "dtypes": None if self.dtypes is None else [str(d).replace("torch.", "") for d in self.dtypes],
                "head_dims": None if self.head_dims is None else list(self.head_dims),
                "config_type": None if self.config_type is None else self.config_type.__name__,
                "tuned": self.tuned, "custom_op": self.custom_op, "description": self.description}


_LOCK = threading.Lock()
_OPERATORS: dict[str, Operator] = {}
_VERSION = [0]  # bumped on every change: listings are cached per version
_BUILTINS_DONE = [False]
# the built-in operator table's loader, installed by sparseattn/ops/__init__.py (which imports both this module
# and ops/_builtin_ops.py): the registry imports none of the modules whose operators it lists
_BUILTIN_LOADER: list[Callable[[], Iterable[Operator]] | None] = [None]


def set_builtin_loader(loader: Callable[[], Iterable[Operator]]) -> None:
    """Install the function that returns the built-in operators, called once on the registry's first use.

    ``sparseattn.ops`` (the package, imported before any of its modules) installs
    :func:`sparseattn.ops._builtin_ops.builtin_operators`; operators registered before the first use of
    the registry never shadow a built-in name silently (:func:`register_operator` loads the built-ins first).
    """
    if not callable(loader):
        raise fail("set_builtin_loader", "loader", "must be callable", "a function returning Operators",
                   type(loader).__name__)
    with _LOCK:
        _BUILTIN_LOADER[0] = loader


def register_operator(op: Operator, *, replace: bool = False) -> Operator:
    """Add ``op`` to the registry (``replace=True`` to overwrite an operator of the same name)."""
    if not isinstance(op, Operator):
        raise fail("register_operator", "op", "must be an Operator", "an Operator", type(op).__name__)
    _ensure_builtins()
    with _LOCK:
        if op.name in _OPERATORS and not replace:
            raise fail("register_operator", "op.name", "is already registered", "a new name or replace=True",
                       repr(op.name))
        _OPERATORS[op.name] = op
        _VERSION[0] += 1
    return op


def unregister_operator(name: str) -> Operator:
    """Remove and return the operator called ``name``."""
    _ensure_builtins()
    with _LOCK:
        if name not in _OPERATORS:
            raise _unknown("unregister_operator", name)
        op = _OPERATORS.pop(name)
        _VERSION[0] += 1
    return op


def _unknown(fn: str, name: Any) -> ValueError:
    return fail(fn, "name", "is not a registered operator", f"one of {sorted(_OPERATORS)}", repr(name))


def get_operator(name: str) -> Operator:
    """The registered operator called ``name`` (``ValueError`` in the house format for an unknown name)."""
    _ensure_builtins()
    op = _OPERATORS.get(name)
    if op is None:
        raise _unknown("get_operator", name)
    return op


def operators(kind: str | None = None, *, entry_point: str | None = None) -> tuple[Operator, ...]:
    """Registered operators of ``kind`` (all kinds if ``None``) listed for ``entry_point``, in priority order.

    Cached per registry version: a call costs one dict lookup.
    """
    _ensure_builtins()
    return _listing(kind, entry_point, _VERSION[0])


@functools.lru_cache(maxsize=64)
def _listing(kind: str | None, entry_point: str | None, version: int) -> tuple[Operator, ...]:
    if kind is not None and kind not in KINDS:
        raise fail("operators", "kind", "is unknown", f"one of {list(KINDS)}", repr(kind))
    with _LOCK:
        ops = list(_OPERATORS.values())
    keep = [o for o in ops if (kind is None or o.kind == kind) and (entry_point is None or entry_point in o.entry_points)]
    return tuple(sorted(keep, key=lambda o: o.priority))  # stable: registration order breaks ties


def operator_refusals(ops: Iterable[Operator], q: torch.Tensor, **inputs: Any) -> dict[str, str | None]:
    """For each operator, ``None`` if it accepts these inputs, else the reason (an import failure is a reason)."""
    out: dict[str, str | None] = {}
    for op in ops:
        try:
            out[op.name] = op.refusal_fn()(q, **inputs)
        except Exception as exc:  # an operator that cannot even be imported refuses, with the reason
            out[op.name] = f"{type(exc).__name__}: {exc}"
    return out


# ------------------------------------------------------------------------------------------ device names
@functools.lru_cache(maxsize=64)
def _cuda_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def device_name(device: torch.device | str) -> str:
    """The name tuned configs are keyed by: the GPU's marketing name (``"NVIDIA H200"``), or ``"cpu"``.

    Looked up once per GPU index (no sync).
    """
    dev = torch.device(device)
    if dev.type != "cuda":
        return dev.type
    return _cuda_name(dev.index if dev.index is not None else torch.cuda.current_device())


# ------------------------------------------------------------------------------------------ tuned configs
def _check_match_value(fn: str, where: str, val: Any) -> None:
    if isinstance(val, dict):
        if not val or set(val) - {"min", "max"} or any(isinstance(x, bool) or not isinstance(x, (int, float))
                                                       for x in val.values()):
            raise fail(fn, where, "is a bad range", "{'min': number, 'max': number} (either or both)", repr(val))
    elif val is not None and not isinstance(val, (bool, int, float, str)):
        raise fail(fn, where, "must be a JSON scalar or a range", "a string, number, bool, null or {'min', 'max'}",
                   repr(val))


def _matches(match: dict[str, Any], facts: dict[str, Any]) -> bool:
    for key, want in match.items():
        if key not in facts:
            return False
        got = facts[key]
        if isinstance(want, dict):
            if isinstance(got, bool) or not isinstance(got, (int, float)):
                return False
            if ("min" in want and got < want["min"]) or ("max" in want and got > want["max"]):
                return False
        elif got != want or type(got) is bool and type(want) is not bool:
            return False
    return True


@dataclasses.dataclass(frozen=True)
class TunedEntry:
    """One tuned choice: ``config`` applies where every item of ``match`` holds.

    ``match`` maps a fact of the launch (``"head_dim"``, ``"paged"``, ...) to a value, or to a range
    ``{"min": a, "max": b}`` (inclusive, either bound optional). ``note`` records where it was measured.
    """

    match: dict[str, Any]
    config: dict[str, Any]
    note: str = ""


@dataclasses.dataclass(frozen=True)
class TunedConfigs:
    """An operator's tuned launch configs per device name (first matching entry wins).

    ``fallback`` names the device whose entries other devices use until they are measured
    (``None``: other devices get no tuned config and keep the operator's defaults).
    """

    operator: str
    devices: dict[str, tuple[TunedEntry, ...]]
    fallback: str | None = None
    version: int = TUNED_VERSION

    def lookup(self, device: str, **facts: Any) -> dict[str, Any] | None:
        """The config of the first entry of ``device`` (or the fallback device) matching ``facts``, else ``None``."""
        entries = self.devices.get(device)
        if entries is None and self.fallback is not None:
            entries = self.devices.get(self.fallback)
        for e in entries or ():
            if _matches(e.match, facts):
                return dict(e.config)
        return None

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "operator": self.operator, "fallback": self.fallback,
                "devices": {d: [{"match": dict(e.match), "config": dict(e.config), **({"note": e.note} if e.note else {})}
                                for e in ents] for d, ents in self.devices.items()}}

    @classmethod
    def from_json(cls, data: Any, *, func: str = "TunedConfigs.from_json", label: str = "tuned configs") -> "TunedConfigs":
        """Check and build (errors in the house format, naming ``label`` and the bad field)."""
        if not isinstance(data, dict):
            raise fail(func, label, "must be a JSON object", "an object", type(data).__name__)
        missing = [k for k in ("version", "operator", "devices") if k not in data]
        if missing:
            raise fail(func, label, f"is missing {', '.join(repr(k) for k in missing)}",
                       "keys ['devices', 'operator', 'version'] (and optionally 'fallback')", f"keys {sorted(data)}")
        extra = sorted(set(data) - {"version", "operator", "devices", "fallback"})
        if extra:
            raise fail(func, label, f"has unknown key{'s' if len(extra) > 1 else ''} {', '.join(map(repr, extra))}",
                       "keys version, operator, devices, fallback", f"keys {sorted(data)}")
        if data["version"] != TUNED_VERSION or isinstance(data["version"], bool):
            raise fail(func, f"{label} version", "is not supported", TUNED_VERSION, repr(data["version"]))
        if not isinstance(data["operator"], str) or not data["operator"]:
            raise fail(func, f"{label} operator", "must be a non-empty string", "an operator name", repr(data["operator"]))
        fallback = data.get("fallback")
        devs = data["devices"]
        if not isinstance(devs, dict):
            raise fail(func, f"{label} devices", "must be an object of device name -> entries",
                       "{'NVIDIA H200': [...]}", type(devs).__name__)
        if fallback is not None and fallback not in devs:
            raise fail(func, f"{label} fallback", "must name one of the devices (or be null)", sorted(devs),
                       repr(fallback))
        out: dict[str, tuple[TunedEntry, ...]] = {}
        for dname, ents in devs.items():
            where = f"{label} devices[{dname!r}]"
            if not isinstance(ents, list):
                raise fail(func, where, "must be a list of entries", "[{'match': {...}, 'config': {...}}]",
                           type(ents).__name__)
            row = []
            for i, e in enumerate(ents):
                w = f"{where}[{i}]"
                if not isinstance(e, dict) or not {"match", "config"} <= set(e) or set(e) - {"match", "config", "note"}:
                    raise fail(func, w, "must be an object with 'match' and 'config' (and optionally 'note')",
                               "{'match': {...}, 'config': {...}}", repr(e))
                if not isinstance(e["match"], dict):
                    raise fail(func, f"{w} match", "must be an object", "{'fact': value}", type(e["match"]).__name__)
                for key, val in e["match"].items():
                    _check_match_value(func, f"{w} match[{key!r}]", val)
                cfg = e["config"]
                if not isinstance(cfg, dict) or not cfg:
                    raise fail(func, f"{w} config", "must be a non-empty object", "{'BLOCK_N': 64, ...}", repr(cfg))
                for key, val in cfg.items():
                    if val is not None and not isinstance(val, (bool, int, float, str)):
                        raise fail(func, f"{w} config[{key!r}]", "must be a JSON scalar", "a number, bool or string",
                                   repr(val))
                note = e.get("note", "")
                if not isinstance(note, str):
                    raise fail(func, f"{w} note", "must be a string", "a string", type(note).__name__)
                row.append(TunedEntry(dict(e["match"]), dict(cfg), note))
            out[dname] = tuple(row)
        return cls(operator=data["operator"], devices=out, fallback=fallback)


def load_tuned_configs(path: str | os.PathLike) -> TunedConfigs:
    """Read a tuned-config JSON file (checked; a malformed file raises ``ValueError`` naming the file and field)."""
    from sparseattn.errors import read_json_file

    data = read_json_file("load_tuned_configs", path, "tuned-config file")
    return TunedConfigs.from_json(data, func="load_tuned_configs", label=f"tuned-config file {os.fspath(path)}")


def check_tuned_configs(func: str, configs: Any, operator: str | None = None) -> TunedConfigs:
    """``configs`` must be a :class:`TunedConfigs` (of ``operator``, when given)."""
    if not isinstance(configs, TunedConfigs):
        raise fail(func, "configs", "must be a TunedConfigs", "a TunedConfigs", type(configs).__name__)
    if operator is not None and configs.operator != operator:
        raise fail(func, "configs.operator", "is another operator's", repr(operator), repr(configs.operator))
    return configs


def save_tuned_configs(path: str | os.PathLike, configs: TunedConfigs) -> Path:
    """Write ``configs`` as JSON (validated by a round trip first, so a file written here always loads)."""
    check_tuned_configs("save_tuned_configs", configs)
    data = configs.to_json()
    TunedConfigs.from_json(json.loads(json.dumps(data)), func="save_tuned_configs", label="configs")
    p = Path(path)
    p.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return p


@functools.lru_cache(maxsize=32)
def _shipped(filename: str) -> TunedConfigs | None:
    p = TUNED_DIR / filename
    return load_tuned_configs(p) if p.is_file() else None


def tuned_for(operator: str) -> TunedConfigs | None:
    """The shipped tuned configs of a registered operator (read once), ``None`` if it ships none."""
    op = get_operator(operator)
    return None if op.tuned is None else _shipped(op.tuned)


def shipped_launch_winners(operator: str, device: str, key_fields: Iterable[str]) -> TunedConfigs | None:
    """The entries of ``operator``'s shipped file for ``device`` whose match names every one of ``key_fields``
    (a whole launch key: remembered autotune winners, to seed a launcher's cache), ``None`` if there are none.
    Entries keyed by fewer facts (a fixed config per shape) are left out."""
    shipped = tuned_for(operator)
    if shipped is None or device not in shipped.devices:
        return None
    fields = tuple(key_fields)
    winners = tuple(e for e in shipped.devices[device] if all(f in e.match for f in fields))
    return TunedConfigs(operator, {device: winners}) if winners else None


def tuned_config(operator: str, device: str | None, **facts: Any) -> dict[str, Any] | None:
    """The shipped config of ``operator`` for ``device`` (a :func:`device_name`; ``None``: the file's fallback
    device) whose entry matches ``facts``; where none of the device's entries matches, the fallback device's.
    ``None`` when the operator ships no file or nothing matches."""
    shipped = tuned_for(operator)
    if shipped is None:
        return None
    fb = shipped.fallback
    cfg = shipped.lookup(device if device is not None else (fb or ""), **facts)
    if cfg is None and fb is not None and device != fb:
        cfg = shipped.lookup(fb, **facts)
    return cfg


# ------------------------------------------------------------------------------------------ built-ins
def _ensure_builtins() -> None:
    if _BUILTINS_DONE[0]:
        return
    with _LOCK:
        if _BUILTINS_DONE[0] or _BUILTIN_LOADER[0] is None:
            return
        _BUILTINS_DONE[0] = True
        for op in _BUILTIN_LOADER[0]():
            _OPERATORS.setdefault(op.name, op)
        _VERSION[0] += 1
