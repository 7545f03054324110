#!/usr/bin/env bash
# One device call once SmolLM2's pieces are in /tmp/m/s (../shared/DEVICE.md): the layer-graph GPU tests,
# the whole-model benchmark stages "smol smol_graphs" (benchmarks/device_models.sh) and `sparseattn tune`
# on the GPU at 4K (and 8K if time is left), each with --compare. Results under $OUT (tune/, and the
# bench tarball); a summary is printed last. Run from the repository root with .carry/{essays,whl}.
# Getting SmolLM2 there: the working tree is ~10 MiB, so ../shared/tools/device_chunks.sh's 56 MiB pieces
# overflow the 64 MiB carry limit; split the GGUF in two instead (split -n 2 -d -a 2 FILE .carry/s2/part.,
# each piece in its own folder), carry one per call into /tmp/m/s/, and run this script in the second call.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT="${OUT:-./device_out}"; mkdir -p "$OUT/tune"
SMOL=/tmp/m/s/SmolLM2-135M-Instruct.Q4_1.gguf
export SMOL_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
START=$SECONDS
if [ "${LG_TESTS:-1}" = 1 ]; then
  echo "=== layer-graph tests"
  PYTHONPATH="$PWD/src" timeout 120 python3 -m pytest tests/integrations/test_layer_graphs.py -q -p no:cacheprovider 2>&1 | tail -3
fi
STAGES="${STAGES:-smol smol_graphs}" TOTAL_BUDGET="${BENCH_BUDGET:-300}" STAGE_MAX=170 bash benchmarks/device_models.sh 2>&1 | tail -32
export PYTHONPATH="/tmp/site:$PWD/src"
for n in ${TUNE_LENGTHS:-4096 8192}; do
  left=$(( ${SESSION_BUDGET:-560} - (SECONDS - START) ))
  if [ $left -lt 60 ]; then echo "=== tune $n skipped: ${left}s left"; continue; fi
  echo "=== tune $n (at most ${left}s)"
  t0=$SECONDS
  timeout $left python3 -m sparseattn.cli.main tune --model "$SMOL" --text-dir .carry/essays --samples 8 --seq-len "$n" \
    --l1 0.06 --pv-l1 0.07 --compare --no-plot --out "$OUT/tune/tuned$n.safetensors" > "$OUT/tune/tune$n.log" 2>&1
  echo "tune $n: rc=$? wall $((SECONDS - t0)) s"
  grep -iE "seconds|time|sparsity|top-1|top1|cosine|KL" "$OUT/tune/tuned$n.md" 2>/dev/null | head -20
  tail -n 5 "$OUT/tune/tune$n.log"
done
if [ -f "$OUT/tune/tuned4096.safetensors" ]; then
  left=$(( ${SESSION_BUDGET:-560} - (SECONDS - START) ))
  if [ $left -ge 45 ]; then
    echo "=== niah with the 4K tuned file (at most ${left}s)"
    timeout $left python3 -m sparseattn.cli.main niah --model "$SMOL" --tuned "$OUT/tune/tuned4096.safetensors" \
      --lengths 4096 --depths 0.1,0.5,0.9 --trials 2 --text-dir .carry/essays --no-plots --out "$OUT/tune/niah" \
      > "$OUT/tune/niah.log" 2>&1
    echo "niah rc=$?"; tail -n 12 "$OUT/tune/niah.log"
  fi
fi
tar -C "$OUT" -czf "$OUT/tune.tar.gz" tune && rm -rf "$OUT/tune"
echo "=== session done in $((SECONDS - START)) s"
