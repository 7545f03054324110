"""Summarise an Nsight Compute report of one kernel: stall reasons and the most-stalled SASS instructions.

Reads the CSV pages that ``ncu -i REPORT --csv`` prints (written to files by ``benchmarks/device_jobs.sh
ncu_decode``): ``--raw`` (``--page raw``: one row per profiled kernel, one column per metric) and ``--source``
(``--page source --print-source sass``: one row per SASS instruction with its warp-stall samples). Prints

* the stall reasons (``smsp__average_warps_issue_stalled_<reason>_per_issue_active``: warps stalled on that reason
  per issued instruction), largest first;
* the ``--top`` instructions by stall samples, with their share of all samples, and the samples per opcode;
* with ``--pipes``: each pipeline's issue utilisation
  (``sm__inst_executed_pipe_<pipe>.avg.pct_of_peak_sustained_active``; ``xu`` runs ``exp2``), largest first, and the
  duration.

    python3 benchmarks/ncu_summary.py --raw raw.csv --source source.csv --top 30
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from collections import defaultdict


def _rows(path: str) -> list[list[str]]:
    with open(path, newline="") as f:
        lines = [ln for ln in f if ln.startswith('"')]  # ncu prints "==PROF==" lines and notes around the CSV
    return list(csv.reader(lines))


def _num(x: str) -> float | None:
    try:
        return float(x.replace(",", ""))
    except ValueError:
        return None


def stall_reasons(path: str) -> list[tuple[str, float]]:
    rows = _rows(path)
    if len(rows) < 2:
        return []
    head, last = rows[0], rows[-1]  # header, (units row,) one row per kernel: the last profiled one
    pat = re.compile(r"smsp__average_warps_issue_stalled_(\w+?)_per_issue_active\.ratio$")
    out = []
    for name, val in zip(head, last):
        m = pat.match(name)
        v = _num(val)
        if m and v is not None and v > 0:
            out.append((m.group(1), v))
    return sorted(out, key=lambda t: -t[1])


def pipe_utilisation(path: str) -> list[tuple[str, float]]:
    """``(pipe, % of peak issue rate while active)`` of the last profiled kernel in a raw page, largest first, with
    ``("duration_us", ...)`` first when the page has ``gpu__time_duration.sum``."""
    rows = _rows(path)
    if len(rows) < 2:
        return []
    head, units, last = rows[0], rows[1], rows[-1]
    pat = re.compile(r"sm__inst_executed_pipe_(\w+?)\.avg\.pct_of_peak_sustained_active$")
    out, dur = [], []
    for name, unit, val in zip(head, units, last):
        v = _num(val)
        m = pat.match(name)
        if m and v is not None:
            out.append((m.group(1), v))
        elif name == "gpu__time_duration.sum" and v is not None:
            dur.append(("duration_us", v / 1000.0 if unit.strip() in ("nsecond", "ns") else
                        v * 1000.0 if unit.strip() in ("msecond", "ms") else v))
    return dur + sorted(out, key=lambda t: -t[1])


def hot_instructions(path: str, top: int) -> tuple[list[tuple[float, str, str]], dict[str, float], float]:
    rows = _rows(path)
    start = next((i for i, r in enumerate(rows) if r and r[0] == "Address"), 0)  # after a "Kernel Name" preamble
    rows = rows[start:]
    if len(rows) < 2:
        return [], {}, 0.0
    head = rows[0]
    col = next((i for i, h in enumerate(head) if "Warp Stall Sampling (All" in h), None)
    src = next((i for i, h in enumerate(head) if h == "Source"), None)
    adr = next((i for i, h in enumerate(head) if h == "Address"), None)
    if col is None or src is None:
        print(f"ncu_summary: {path} has no stall-sampling / source column; columns: {head[:12]}", file=sys.stderr)
        return [], {}, 0.0
    items, per_op, total = [], defaultdict(float), 0.0
    for r in rows[1:]:
        if len(r) <= max(col, src):
            continue
        v = _num(r[col])
        if v is None:
            continue
        total += v
        text = r[src].strip()
        op = text.split()[0] if text else "?"
        if op.startswith("@"):
            op = text.split()[1] if len(text.split()) > 1 else op
        per_op[op.split(".")[0]] += v
        items.append((v, r[adr] if adr is not None else "", text))
    items.sort(key=lambda t: -t[0])
    return items[:top], dict(per_op), total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--raw", help="ncu --page raw --csv output")
    ap.add_argument("--source", help="ncu --page source --print-source sass --csv output")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--pipes", action="store_true", help="with --raw: pipeline utilisation and duration")
    a = ap.parse_args(argv)
    if a.raw and a.pipes:
        print("pipe utilisation (% of peak issue rate, active cycles)")
        for name, v in pipe_utilisation(a.raw)[:14]:
            print(f"  {name:<28s} {v:9.2f}")
    if a.raw:
        reasons = stall_reasons(a.raw)
        tot = sum(v for _, v in reasons)
        print("stall reason (warps stalled per issued instruction)")
        for name, v in reasons[:16]:
            print(f"  {name:<28s} {v:7.3f}  {100 * v / tot if tot else 0:5.1f}%")
    if a.source:
        items, per_op, total = hot_instructions(a.source, a.top)
        print(f"stall samples: {total:.0f}; by opcode (top 12):")
        for op, v in sorted(per_op.items(), key=lambda t: -t[1])[:12]:
            print(f"  {op:<12s} {v:9.0f}  {100 * v / total if total else 0:5.1f}%")
        print(f"top {len(items)} instructions:")
        for v, addr, text in items:
            print(f"  {100 * v / total if total else 0:5.1f}%  {addr:>8s}  {text[:90]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
