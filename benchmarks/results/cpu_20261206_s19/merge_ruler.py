"""Merge `sparseattn ruler` runs (ruler_runs.jsonl of several seeds / lengths) into one table per task and length.

Usage: python merge_ruler.py RUNS.jsonl[:TAG] ... (TAG tells runs of different seeds apart; default the file's folder).
Prints, per task and length: prompts, dense score, each sparse configuration's score, the difference in points, how
many prompts scored differently (better / worse), and the mean block sparsity over the predicted layers.
"""
import json
import sys
from collections import defaultdict
from pathlib import Path


def main(args: list[str]) -> None:
    rows = []
    for arg in args:
        path, _, tag = arg.partition(":")
        tag = tag or Path(path).parent.name
        for line in Path(path).read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                r["prompt"] = (tag, r["sample"])
                rows.append(r)
    by = defaultdict(dict)  # (length, task, config) -> {prompt: row}
    for r in rows:
        by[(r["length"], r["task"], r["config"])][r["prompt"]] = r
    configs = sorted({r["config"] for r in rows if r["config"] != "dense"})
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    for cfg in configs:
        print(f"\nconfiguration: {cfg}\n")
        print("| length | task | prompts | dense | sparse | sparse − dense (points) | scored differently (better / worse) "
              "| sparsity, predicted layers |")
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        for length in sorted({r["length"] for r in rows}):
            for task in tasks:
                d, s = by.get((length, task, "dense"), {}), by.get((length, task, cfg), {})
                both = sorted(set(d) & set(s))
                if not both:
                    continue
                ds = [d[p]["score"] for p in both]
                ss = [s[p]["score"] for p in both]
                better = sum(b > a for a, b in zip(ds, ss))
                worse = sum(b < a for a, b in zip(ds, ss))
                sp = 1 - sum(s[p]["density_predicted"] for p in both) / len(both)
                dm, sm = 100 * sum(ds) / len(ds), 100 * sum(ss) / len(ss)
                print(f"| {length} | {task} | {len(both)} | {dm:.1f} | {sm:.1f} | {sm - dm:+.1f} | {better} / {worse} "
                      f"| {100 * sp:.1f}% |")


if __name__ == "__main__":
    main(sys.argv[1:])
