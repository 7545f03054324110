#!/usr/bin/env bash
# One device call (issue 10, eager host time): predictor kernel profile at 32K, host profile of the SmolLM2-shaped
# model at 8K, then the real SmolLM2 eager whole-model rows (device_models.sh's "smol" stage). The SmolLM2 pieces
# must already be in /tmp/m/s except the last one, carried in .carry/s2/c1 (../shared/DEVICE.md).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT="${OUT:-./device_out}"; mkdir -p "$OUT"
mkdir -p /tmp/m/s && cp .carry/s2/c1/* /tmp/m/s/ 2>/dev/null
python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry/whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD/src"
git log --oneline -1 > "$OUT/commit.txt" 2>/dev/null
echo "=== predictor $(date -u +%H:%M:%S)"
timeout 150 python3 benchmarks/profile_predictor.py --out "$OUT/pred" > "$OUT/pred.log" 2>&1; tail -n 14 "$OUT/pred.log"
echo "=== host $(date -u +%H:%M:%S)"
timeout 150 python3 benchmarks/profile_host.py --out "$OUT/host" > "$OUT/host.log" 2>&1; tail -n 6 "$OUT/host.log"
tar -C "$OUT" -czf "$OUT/profiles.tar.gz" pred host && rm -rf "$OUT/pred" "$OUT/host"
STAGES="${STAGES:-smol}" TOTAL_BUDGET="${TOTAL_BUDGET:-260}" bash benchmarks/device_models.sh
