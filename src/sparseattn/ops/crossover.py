"""The measured density crossover: where the block-sparse path stops being faster than the best dense attention.

For one attention shape (heads, KV heads, head_dim, sequence length, dtype) on one GPU, the sparse path costs
``predictor + kernel(density)`` and dense attention costs the fastest SDPA backend. The *crossover* is the
density at which both take the same time: below it a sparse call wins, above it the dense call does.
``benchmarks/bench_crossover.py`` measures it (steady state, same process, median of several runs) and
writes ``sparseattn/ops/tuned/crossover.json``; ``patch_model(dense_above="auto")`` reads it here, so the
"never slower than dense" fallback uses a measurement, not a guess. A GPU, dtype or head_dim the file does
not cover has no crossover: the caller says so (the lookup returns the reason) instead of guessing.

File format (JSON, version 1)::

    {"version": 1, "devices": {"NVIDIA H200": [
        {"dtype": "bfloat16", "heads": 9, "kv_heads": 3, "head_dim": 64, "seqlen": 8192,
         "crossover": 0.71, "dense_ms": 0.21, "predictor": "...", "predictor_ms": 0.03,
         "densities": [0.1, ...], "sparse_ms": [...], "note": "..."}, ...]}}

``SPARSEATTN_CROSSOVER=<path>`` replaces the shipped file (e.g. one measured on another GPU with
``bench_crossover.py --out``).
"""

from __future__ import annotations

import bisect
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sparseattn._validation import fail

__all__ = ["crossover_from_times", "load_crossovers", "lookup_crossover", "CROSSOVER_VERSION", "shipped_path"]

CROSSOVER_VERSION = 1
_FIELDS = {"dtype": str, "heads": int, "kv_heads": int, "head_dim": int, "seqlen": int, "crossover": float}
_CACHE: dict[str, Any] = {}


def shipped_path() -> Path:
    """The crossover file the package ships (``sparseattn/ops/tuned/crossover.json``)."""
    return Path(__file__).resolve().parent / "tuned" / "crossover.json"


def crossover_from_times(densities: Sequence[float], sparse_ms: Sequence[float], dense_ms: float) -> float:
    """The density where the sparse time (predictor included) meets ``dense_ms``, by linear interpolation.

    ``densities`` ascending in (0, 1] with ``sparse_ms`` measured at each. If the sparse path is faster at the
    largest measured density the crossover is that density's value extended to 1.0 (the sparse path never
    loses there: 1.0); if it is slower already at the smallest, 0.0 (dense always wins at this shape).
    """
    fn = "crossover_from_times"
    if len(densities) != len(sparse_ms) or not densities:
        raise fail(fn, "densities/sparse_ms", "must be non-empty and of equal length", "one time per density",
                   f"{len(densities)} densities, {len(sparse_ms)} times")
    d = [float(x) for x in densities]
    t = [float(x) for x in sparse_ms]
    if any(not 0.0 < x <= 1.0 for x in d) or any(b <= a for a, b in zip(d, d[1:])):
        raise fail(fn, "densities", "must be ascending values in (0, 1]", "e.g. [0.1, 0.5, 1.0]", repr(densities))
    if not all(math.isfinite(x) and x > 0 for x in t) or not (math.isfinite(dense_ms) and dense_ms > 0):
        raise fail(fn, "sparse_ms/dense_ms", "must be positive finite times", "milliseconds > 0",
                   f"{sparse_ms!r}, {dense_ms!r}")
    if t[0] >= dense_ms:
        return 0.0
    for (d0, t0), (d1, t1) in zip(zip(d, t), zip(d[1:], t[1:])):
        if t1 >= dense_ms:  # first crossing: t0 < dense <= t1
            return d0 + (d1 - d0) * (dense_ms - t0) / (t1 - t0)
    if d[-1] >= 1.0:
        return 1.0
    if len(d) >= 2 and t[-1] > t[-2]:  # extend the last segment's slope to find where it meets dense (<= 1.0)
        slope = (t[-1] - t[-2]) / (d[-1] - d[-2])
        return min(1.0, d[-1] + (dense_ms - t[-1]) / slope)
    return 1.0


def _check_entry(path: str, dev: str, i: int, e: Any) -> dict[str, Any]:
    where = f"{path}: devices[{dev!r}][{i}]"
    if not isinstance(e, dict):
        raise fail("load_crossovers", where, "must be an object", "{dtype, heads, kv_heads, head_dim, seqlen, crossover}",
                   type(e).__name__)
    for name, typ in _FIELDS.items():
        val = e.get(name)
        ok = isinstance(val, (int, float)) and not isinstance(val, bool) if typ is float else \
            isinstance(val, typ) and not isinstance(val, bool)
        if not ok:
            raise fail("load_crossovers", f"{where}.{name}", "is missing or of the wrong type", typ.__name__, repr(val))
    if not (math.isfinite(e["crossover"]) and 0.0 <= e["crossover"] <= 1.0):
        raise fail("load_crossovers", f"{where}.crossover", "must be a density in [0, 1]", "0..1", repr(e["crossover"]))
    if min(e["heads"], e["kv_heads"], e["head_dim"], e["seqlen"]) < 1 or e["heads"] % e["kv_heads"]:
        raise fail("load_crossovers", where, "has an impossible shape", "heads a multiple of kv_heads, all >= 1",
                   f"heads={e['heads']}, kv_heads={e['kv_heads']}, head_dim={e['head_dim']}, seqlen={e['seqlen']}")
    return e


def load_crossovers(path: str | os.PathLike | None = None) -> dict[str, list[dict[str, Any]]]:
    """``{device name: [entries]}`` from ``path`` (default: ``$SPARSEATTN_CROSSOVER`` or the shipped file), checked.

    Raises:
        ValueError: unreadable JSON, another version, a malformed entry (naming the file and the field).
    """
    p = str(path if path is not None else os.environ.get("SPARSEATTN_CROSSOVER") or shipped_path())
    try:
        st = os.stat(p)
        mtime = (st.st_mtime_ns, st.st_size)
    except OSError as exc:
        raise fail("load_crossovers", "path", f"cannot be read ({exc.strerror})", "an existing JSON file", p) from None
    hit = _CACHE.get(p)
    if hit is not None and hit[0] == mtime:
        return hit[1]
    try:
        with open(p, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise fail("load_crossovers", "path", f"is not a readable JSON file ({exc})", "crossover JSON", p) from None
    if not isinstance(data, dict) or data.get("version") != CROSSOVER_VERSION:
        raise fail("load_crossovers", f"{p}: version", "is not supported", CROSSOVER_VERSION,
                   repr(data.get("version") if isinstance(data, dict) else type(data).__name__))
    devices = data.get("devices")
    if not isinstance(devices, dict):
        raise fail("load_crossovers", f"{p}: devices", "must be an object", "{device name: [entries]}",
                   type(devices).__name__)
    out: dict[str, list[dict[str, Any]]] = {}
    for dev, entries in devices.items():
        if not isinstance(entries, list):
            raise fail("load_crossovers", f"{p}: devices[{dev!r}]", "must be a list", "[entries]", type(entries).__name__)
        out[dev] = [_check_entry(p, dev, i, e) for i, e in enumerate(entries)]
    _CACHE[p] = (mtime, out)
    return out


def lookup_crossover(device_name: str, *, dtype: str, heads: int, kv_heads: int, head_dim: int, seqlen: int,
                     table: dict[str, list[dict[str, Any]]] | None = None) -> tuple[float | None, str]:
    """The measured crossover for this shape, or ``(None, why there is none)``.

    Rule: entries of the same device name, dtype and head_dim; of those, the (heads, kv_heads) measured
    (exact, else the nearest head count); the crossover interpolated linearly in log2(seqlen) between the
    two measured lengths around ``seqlen`` (clamped to the nearest measured length outside their range,
    which the description says).
    """
    tab = load_crossovers() if table is None else table
    entries = tab.get(device_name)
    if not entries:
        have = sorted(tab) or ["none"]
        return None, (f"no crossover measured for {device_name!r} (measured: {', '.join(have)}; run "
                      "benchmarks/bench_crossover.py there and point SPARSEATTN_CROSSOVER at its file)")
    same = [e for e in entries if e["dtype"] == dtype and e["head_dim"] == head_dim]
    if not same:
        have = sorted({(e["dtype"], e["head_dim"]) for e in entries})
        return None, (f"no crossover measured on {device_name!r} for dtype={dtype}, head_dim={head_dim} "
                      f"(measured: {have})")
    shapes = {(e["heads"], e["kv_heads"]) for e in same}
    shape = (heads, kv_heads) if (heads, kv_heads) in shapes else min(
        shapes, key=lambda s: (abs(math.log2(s[0] / heads)), abs(math.log2((s[0] // s[1]) / max(heads // kv_heads, 1)))))
    rows = sorted((e["seqlen"], e["crossover"]) for e in same if (e["heads"], e["kv_heads"]) == shape)
    what = f"{device_name}, {dtype}, H={shape[0]}, H_kv={shape[1]}, D={head_dim}"
    if shape != (heads, kv_heads):
        what += f" (nearest measured heads to H={heads}, H_kv={kv_heads})"
    if seqlen <= rows[0][0] or seqlen >= rows[-1][0]:
        n, c = rows[0] if seqlen <= rows[0][0] else rows[-1]
        exact = n == seqlen
        return c, f"{what}, N={n}" + ("" if exact else f" (nearest measured length to {seqlen})")
    i = bisect.bisect_right([n for n, _ in rows], seqlen)  # rows[i - 1][0] <= seqlen < rows[i][0]
    (n0, c0), (n1, c1) = rows[i - 1], rows[i]
    if n0 == seqlen:
        return c0, f"{what}, N={n0}"
    w = (math.log2(seqlen) - math.log2(n0)) / (math.log2(n1) - math.log2(n0))
    return c0 + w * (c1 - c0), f"{what}, between N={n0} and N={n1}"
