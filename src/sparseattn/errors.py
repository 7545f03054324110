"""User-facing errors and the guarded file readers that raise them.

Every error caused by what the user passed (an argument, a file, a spec) uses the project's one
format (see :func:`sparseattn._validation.fail`)::

    <function>: <argument> <problem>; expected <X>, got <Y>

Most are plain ``ValueError``. :class:`UserError` marks the few that must keep another base class
(``FetchError`` is also a ``RuntimeError``); the command line prints any of them as one line and
exits with status 2 (``sparseattn --debug ...`` shows the traceback instead).

The readers here never execute code from a file: JSON through :mod:`json`, tensors through
``safetensors`` only. Each one turns a missing path, a directory, an empty, truncated or corrupt
file and a wrong JSON type into a ``ValueError`` naming the file and what is wrong.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from sparseattn._validation import fail

__all__ = ["UserError", "FetchError", "check_input_file", "read_json_file", "load_safetensors_file", "describe_bytes",
           "require_keys", "check_versioned_meta", "check_meta_int", "check_meta_number", "load_safetensors_with_metadata",
           "FINGERPRINT_KEYS", "model_fingerprint", "check_fingerprint_meta", "write_safetensors_atomic"]


class UserError(Exception):
    """Base of errors caused by the user's input or environment (not a bug in sparseattn).

    ``ValueError`` is the usual type for bad input; subclass this for errors that must keep
    another base class. The CLI reports both as one line and exits with status 2.
    """


class FetchError(UserError, RuntimeError):
    """The default model could not be downloaded (no network, pip failed); the message says how to fill the cache by hand."""


def describe_bytes(path: Path, n: int = 16) -> str:
    """``'<size> bytes starting b"..."'`` for error messages (never the whole file)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(n)
    except OSError as exc:
        return f"an unreadable file ({exc.strerror or exc})"
    return f"{size} bytes starting {head!r}" if size else "an empty file (0 bytes)"


def check_input_file(func: str, path: str | os.PathLike, what: str, expected: str, *, arg: str | None = None) -> Path:
    """``path`` as a :class:`Path` if it is an existing, readable, non-empty regular file.

    Raises:
        ValueError: ``<func>: <what> <path> does not exist / is a directory / is empty / cannot be
            read; expected <expected>, got ...``.
    """
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise fail(func, arg or what, "must be a path", expected, repr(path))
    p = Path(path).expanduser()
    label = f"{what} {p}"
    if not p.exists():
        parent = p.parent
        hint = "" if parent.is_dir() else f" (its folder {parent} does not exist either)"
        raise fail(func, label, f"does not exist{hint}", expected, "no such file")
    if p.is_dir():
        raise fail(func, label, "is a directory, not a file", expected, "a directory")
    if not p.is_file():
        raise fail(func, label, "is not a regular file", expected, "a special file")
    if not os.access(p, os.R_OK):
        raise fail(func, label, "cannot be read (permission denied)", expected, "an unreadable file")
    if p.stat().st_size == 0:
        raise fail(func, label, "is empty", expected, "0 bytes")
    return p


def read_json_file(func: str, path: str | os.PathLike, what: str, *, expect: type = dict,
                   expected: str | None = None) -> Any:
    """Parse a JSON file and check its top-level type (``dict`` or ``list``).

    NaN / Infinity literals are accepted by the parser (they are valid Python JSON); callers that
    need finite numbers check them with :func:`check_meta_number`.

    Raises:
        ValueError: missing / directory / empty file, invalid UTF-8, invalid JSON (with line and
            column), or a top-level value of another type.
    """
    kind = "a JSON object" if expect is dict else "a JSON array" if expect is list else f"JSON {expect.__name__}"
    expected = expected or kind
    p = check_input_file(func, path, what, expected)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise fail(func, f"{what} {p}", f"is not UTF-8 text (byte {exc.start})", expected, describe_bytes(p)) from None
    except OSError as exc:
        raise fail(func, f"{what} {p}", f"cannot be read ({exc.strerror or exc})", expected, type(exc).__name__) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        what_is = "is truncated JSON" if exc.pos >= len(text.rstrip()) else "is not valid JSON"
        raise fail(func, f"{what} {p}", f"{what_is} ({exc.msg} at line {exc.lineno} column {exc.colno})", expected,
                   f"{len(text)} characters") from None
    except RecursionError:
        raise fail(func, f"{what} {p}", "is nested too deeply", expected, f"{len(text)} characters") from None
    if not isinstance(data, expect):
        raise fail(func, f"{what} {p}", "holds the wrong JSON type", kind, f"a JSON {_json_type(data)}")
    return data


def _json_type(x: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(x), type(x).__name__)


def require_keys(func: str, data: dict[str, Any], keys: tuple[str, ...] | list[str], label: str) -> None:
    """Raise if any of ``keys`` is missing from ``data`` (one error naming all missing keys)."""
    missing = [k for k in keys if k not in data]
    if missing:
        raise fail(func, label, f"is missing key{'s' if len(missing) > 1 else ''} {', '.join(repr(k) for k in missing)}",
                   f"keys {sorted(keys)}", f"keys {sorted(data)}")


def check_versioned_meta(func: str, label: str, meta: Any, version: int, rerun: str,
                         required: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """A file's JSON metadata: an object, with this ``version`` (else: re-run ``rerun``) and the ``required`` keys."""
    if not isinstance(meta, dict):
        raise fail(func, f"{label} metadata", "must be a JSON object", "an object", type(meta).__name__)
    if "version" not in meta:
        raise fail(func, f"{label} metadata", "has no 'version'", f"version {version}", f"keys {sorted(meta)}")
    v = meta["version"]
    if isinstance(v, bool) or not isinstance(v, int) or v != version:
        raise fail(func, f"{label} metadata key 'version'", "is not supported by this sparseattn",
                   f"version {version} (re-run {rerun})", repr(v))
    require_keys(func, meta, required, f"{label} metadata")
    return meta


def check_meta_int(func: str, label: str, key: str, value: Any, *, minimum: int = 0) -> int:
    """An integer metadata field (JSON numbers like ``4.0`` are not accepted; bools are not ints)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise fail(func, f"{label} key {key!r}", "must be an integer" + (f" >= {minimum}" if minimum else ""),
                   f"an int >= {minimum}", f"{value!r} ({_json_type(value)})")
    return value


def check_meta_number(func: str, label: str, key: str, value: Any, *, positive: bool = False,
                      allow_none: bool = False) -> float | None:
    """A finite (optionally positive) number; ``None`` only with ``allow_none``. NaN / inf are refused."""
    if value is None and allow_none:
        return None
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if ok and positive:
        ok = value > 0
    if not ok:
        exp = ("a finite number > 0" if positive else "a finite number") + (" or null" if allow_none else "")
        raise fail(func, f"{label} key {key!r}", "must be a finite number" + (" > 0" if positive else ""), exp,
                   f"{value!r} ({_json_type(value)})")
    return float(value)


def load_safetensors_file(func: str, path: str | os.PathLike, what: str = "tensor file", *,
                          device: str = "cpu", expected: str = "a .safetensors file written by sparseattn collect") -> dict[str, Any]:
    """``safetensors.torch.load_file`` with every failure turned into a ``ValueError`` naming the file.

    Truncated, empty, random or non-safetensors bytes give ``<func>: <what> <path> is not a readable
    safetensors file (<reason>); expected ..., got <size> bytes starting b'...'``.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = check_input_file(func, path, what, expected)
    try:
        return load_file(str(p), device=device)
    except (SafetensorError, OSError) as exc:
        raise _unreadable(func, what, p, exc, expected) from None


def _unreadable(func: str, what: str, p: Path, exc: Exception, expected: str) -> ValueError:
    """The error for a safetensors file that could not be read (both loaders word it alike)."""
    from safetensors import SafetensorError

    if isinstance(exc, SafetensorError):
        reason = str(exc).replace("Error while deserializing header: ", "").strip() or type(exc).__name__
        return fail(func, f"{what} {p}", f"is not a readable safetensors file ({reason})", expected, describe_bytes(p))
    if isinstance(exc, OSError):
        return fail(func, f"{what} {p}", f"cannot be read ({exc.strerror or exc})", expected, type(exc).__name__)
    # a header that parses but describes impossible tensors
    return fail(func, f"{what} {p}", f"is not a readable safetensors file ({type(exc).__name__}: {exc})", expected,
                describe_bytes(p))


def load_safetensors_with_metadata(func: str, path: str | os.PathLike, what: str = "tensor file", *,
                                   expected: str = "a .safetensors file") -> tuple[dict[str, Any], dict[str, str]]:
    """Every tensor of a safetensors file (on the CPU) and its header's ``__metadata__`` (``{}`` if none).

    Read through ``safetensors.safe_open`` only (no pickle). Failures are worded like
    :func:`load_safetensors_file`: a missing / empty / truncated / corrupt file raises a ``ValueError``
    naming the file and the reason.
    """
    from safetensors import SafetensorError, safe_open

    p = check_input_file(func, path, what, expected)
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError, TypeError) as exc:
        raise _unreadable(func, what, p, exc, expected) from None
    return tensors, meta


def json_metadata(func: str, label: str, header: dict[str, str], key: str, *, kind: str, expected: str) -> Any:
    """The JSON value stored under ``key`` in a safetensors header (:func:`load_safetensors_with_metadata`).

    Raises:
        ValueError: ``key`` is missing (``not a sparseattn <kind>?``) or its value is not valid JSON.
    """
    if key not in header:
        raise fail(func, label, f"has no {key!r} metadata (not a sparseattn {kind}?)", expected,
                   f"metadata keys {sorted(header)}")
    try:
        return json.loads(header[key])
    except json.JSONDecodeError as exc:
        raise fail(func, f"{label} metadata {key!r}", f"is not valid JSON ({exc.msg} at column {exc.colno})",
                   "a JSON object", f"{len(header[key])} characters") from None


# --------------------------------------------------------------------------- model files (tuned and gate stores)
#: the model shape a tuned or gate file is bound to (:func:`model_fingerprint`)
FINGERPRINT_KEYS = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "model_type")


def model_fingerprint(model: Any) -> dict[str, Any]:
    """``{num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim, model_type}`` of a model / config.

    ``num_key_value_heads`` defaults to the attention heads and ``head_dim`` to
    ``hidden_size // num_attention_heads`` when the config does not set them.
    """
    conf = getattr(model, "config", model)
    get_text = getattr(conf, "get_text_config", None)
    if callable(get_text):
        try:
            conf = get_text()
        except TypeError:  # pragma: no cover - older transformers signature
            pass
    heads = getattr(conf, "num_attention_heads", None)
    kv = getattr(conf, "num_key_value_heads", None) or heads
    hd = getattr(conf, "head_dim", None)
    if hd is None and heads:
        hidden = getattr(conf, "hidden_size", None)
        hd = hidden // heads if hidden else None
    return {"num_hidden_layers": getattr(conf, "num_hidden_layers", None), "num_attention_heads": heads,
            "num_key_value_heads": kv, "head_dim": hd, "model_type": getattr(conf, "model_type", None)}


def check_fingerprint_meta(fn: str, label: str, meta: dict[str, Any]) -> dict[str, Any]:
    """The metadata's ``fingerprint`` object (tuned and gate files): a JSON object with every fingerprint key."""
    fp = meta["fingerprint"]
    if not isinstance(fp, dict):
        raise fail(fn, f"{label} metadata key 'fingerprint'", "must be a JSON object", f"keys {list(FINGERPRINT_KEYS)}",
                   type(fp).__name__)
    require_keys(fn, fp, FINGERPRINT_KEYS, f"{label} metadata 'fingerprint'")
    return fp


def write_safetensors_atomic(p: Path, tensors: dict[str, Any], metadata: dict[str, str]) -> Path:
    """Write ``tensors`` + string ``metadata`` to ``p`` through a temporary file and ``os.replace`` (a reader never
    sees a half-written file); the temporary file is removed on failure. Used by the tuned and the gate stores."""
    from safetensors.torch import save_file

    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, p)
    finally:
        if tmp.exists():
            tmp.unlink()
    return p
