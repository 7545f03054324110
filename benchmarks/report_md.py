"""Markdown tables for BENCHMARKS.md from the JSON that the device scripts write (no GPU needed).

Usage: ``python3 benchmarks/report_md.py bench_attention.json [kernel_variants.json]``
Prints: the full table (with each row's range of paired per-round ratios vs Flex), the SDPA backends,
the host time of sub-millisecond rows, and (given the variants JSON) the shoot-out table.
"""

from __future__ import annotations

import json
import sys
from typing import Any


def bench_tables(doc: dict[str, Any]) -> str:
    out = ["| shape (model / N / mask) | density | ours ms | TFLOPS* | best SDPA ms | vs SDPA | Flex ms | vs Flex "
           "| vs Flex, per round | parity |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|:--:|"]
    host = []
    for res in doc["results"]:
        sd = res.get("sdpa_best") or {}
        for x in res["rows"]:
            if "ms" not in x:
                out.append(f"| {res['shape']} | {x['density_target']} | skipped | | | | | | | |")
                continue
            rr = x.get("speedup_vs_flex_rounds") or []
            rng = f"{min(rr):.2f}–{max(rr):.2f}" if rr else ""
            out.append(f"| {res['shape']} | {x['density']:.3f} | {x['ms']:.3f} | {x['tflops_dense_equiv']:.0f} | "
                       f"{sd.get('ms', float('nan')):.3f} ({sd.get('backend', '?')}) | {x.get('speedup_vs_sdpa', float('nan')):.2f}x | "
                       f"{x.get('flex_ms', float('nan')):.3f} | {x.get('speedup_vs_flex', float('nan')):.2f}x | {rng} | "
                       f"{'ok' if x['parity']['ok'] else 'FAIL'} |")
            if "host_us_per_call" in x:
                host.append(f"| {res['shape']} | {x['density']:.3f} | {x['ms']:.3f} | {x.get('flex_ms', float('nan')):.3f} | "
                            f"{x['host_us_per_call']:.0f} |")
    sdpa = ["| shape | cuDNN ms | flash ms |", "|---|---:|---:|"]
    for res in doc["results"]:
        s = res.get("sdpa", {})
        sdpa.append(f"| {res['shape']} | {s.get('cudnn', {}).get('ms', float('nan')):.3f} | "
                    f"{s.get('flash', {}).get('ms', float('nan')):.3f} |")
    parts = ["\n".join(out), "\n".join(sdpa)]
    if host:
        parts.append("\n".join(["| shape | density | ours ms | Flex ms | host µs / call |", "|---|---:|---:|---:|---:|"] + host))
    tg = ["| target | status | measured |", "|---|---|---|"]
    tg += [f"| {t['target']} | {t['status']} | {t.get('value', '')} |" for t in doc.get("targets", [])]
    parts.append("\n".join(tg))
    return "\n\n".join(parts)


def variants_table(doc: dict[str, Any]) -> str:
    lines = []
    for res in doc["results"]:
        rows = [r for r in res["rows"] if any("ms" in e for e in r["variants"].values())]
        if not rows:
            continue
        head = " | ".join(f"d={r['density']:.3f} ms (vs Flex)" for r in rows)
        lines += [f"**{res['shape']}** (cuDNN dense {res['sdpa_cudnn_ms']:.3f} ms)", "",
                  f"| variant | regs / spills / smem KB | {head} |", "|---|---|" + "---:|" * len(rows)]
        names = list(rows[0]["variants"])
        for n in names:
            comp = next((r["variants"][n].get("compiled") for r in rows if r["variants"].get(n, {}).get("compiled")), None)
            cres = f"{comp['n_regs']} / {comp['n_spills']} / {comp['shared_bytes'] // 1024}" if comp else ""
            cells = []
            for r in rows:
                e = r["variants"].get(n, {})
                cells.append(f"{e['ms']:.3f} ({e.get('vs_flex', float('nan')):.2f}x)" if "ms" in e else e.get("skipped", e.get("error", "")[:40]))
            lines.append(f"| {n} | {cres} | " + " | ".join(cells) + " |")
        lines.append("| Flex (same layout) | | " + " | ".join(f"{r['flex_ms']:.3f}" if r.get("flex_ms") else "" for r in rows) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        print(bench_tables(json.load(f)))
    if len(argv) > 1:
        with open(argv[1]) as f:
            print()
            print(variants_table(json.load(f)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
