"""The one environment record written into every report (eval runs and benchmarks).

:func:`environment` returns the same keys everywhere; a report adds its own fields next to it, never
a second record. Package versions are read from the installed metadata (importing nothing heavy),
so writing the record costs no import of Triton or transformers.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

__all__ = ["environment", "git_commit"]


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> str:
    """``$SPARSEATTN_COMMIT``, else the checkout's short commit (``+dirty`` with uncommitted tracked changes),
    else ``"unknown"``."""
    env = os.environ.get("SPARSEATTN_COMMIT")
    if env:
        return env
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10, cwd=here)
        if out.returncode == 0 and out.stdout.strip():
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                   text=True, timeout=10, cwd=here).stdout.strip()
            return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def environment(device: Any = None) -> dict[str, Any]:
    """Date, host, versions, commit and device of this run, as a JSON-friendly dict.

    Args:
        device: the device the report measured (default: ``cuda`` when available, else ``cpu``).

    Returns:
        ``date_utc`` (ISO 8601), ``python``, ``platform``, ``host``, ``torch``, ``cuda``, ``cudnn``,
        ``triton``, ``transformers`` (``None`` when not installed), ``sparseattn``, ``commit``,
        ``device``, ``gpu`` / ``capability`` (the CUDA device's name and compute capability, else
        ``None``), ``cpu`` and ``cpu_threads``.
    """
    from sparseattn._version import __version__

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    cuda = dev.type == "cuda" and torch.cuda.is_available()
    return {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "host": platform.node(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "sparseattn": __version__,
        "commit": git_commit(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(dev) if cuda else None,
        "capability": list(torch.cuda.get_device_capability(dev)) if cuda else None,
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
    }
