#!/usr/bin/env bash
# One device call with the real SmolLM2 (last piece in .carry/s2/c1, the first already in /tmp/m/s):
#   1. issue 10 record: whole-model eager rows at 4K/8K and the graphs row at 8K (device_models.sh stages);
#   2. issue 17: train the gate on the first 15 essays (docs/GATE.md GPU runbook), layer-level sweep vs the
#      oracle on held-out Q/K/V at 4K, model-level curves on held-out text, plot;
#   3. issue 17: RULER at 4K/8K, dense vs the default predictor, the gate and SketchWalk.
# Each stage has a time limit; everything lands in $OUT/smol_all.tar.gz plus the bench tarball.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT="${OUT:-./device_out}"; mkdir -p "$OUT"
mkdir -p /tmp/m/s && cp .carry/s2/c1/* /tmp/m/s/ 2>/dev/null
python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry/whl/*.whl 2>/dev/null || exit 1
export PYTHONPATH="/tmp/site:$PWD/src"
SMOL=/tmp/m/s/SmolLM2-135M-Instruct.Q4_1.gguf; [ -f $SMOL ] || cat /tmp/m/s/part.* > $SMOL
echo "${SMOL_SHA}  $SMOL" | sha256sum -c - || exit 1
T0=$SECONDS
STAGES="${BENCH_STAGES:-smol smol_graphs}" TOTAL_BUDGET="${BENCH_BUDGET:-170}" STAGE_MAX=110 SMOL_SHA=$SMOL_SHA \
  bash benchmarks/device_models.sh 2>&1 | grep -v "^WARNING" | tail -n 14
G=$OUT/g; mkdir -p $G
mapfile -t ESSAYS < <(ls .carry/essays/*.txt); TRAIN=("${ESSAYS[@]:0:15}"); HELD=("${ESSAYS[@]:15}")
M="python3 -m sparseattn.cli.main"
st() { echo "=== $1 $(date -u +%H:%M:%S) (t=$((SECONDS-T0))s)"; }
st gate
timeout ${GATE_S:-120} $M train-gate --model $SMOL --text-file "${TRAIN[@]}" --samples 8 --val-samples 1 --seq-len 4096 \
  --steps 300 --d-gate 64 --device cuda --quiet --out $G/smol_gate.safetensors > $G/train.log 2>&1; tail -n 4 $G/train.log
[ "${SKIP_SWEEP:-0}" = 1 ] || { st sweep
timeout 90 $M collect --model $SMOL --lengths 4096 --layers $(seq -s, 0 29) --samples 1 --text-file "${HELD[@]}" \
  --device cuda --out $G/qkv4k > $G/collect.log 2>&1 && \
timeout 120 $M compare --input $G/qkv4k --device cuda --sweep 0.05 0.1 0.2 0.3 0.5 \
  --family 'mean_sim=mean_sim:topk={budget},cdf_threshold=None,sim_threshold=-1,keep_local=1' \
  --family 'sketch_walk=sketch_walk:top_fraction={budget},dense_layers=0' \
  --family "gate=gate:path=$G/smol_gate.safetensors,topk={budget}" --out $G/sweep4k > $G/sweep.log 2>&1; tail -n 12 $G/sweep.log; }
st curves
S=(); for f in 0.1 0.2 0.3 0.5; do S+=("gate:path=$G/smol_gate.safetensors,topk=$f" "mean_sim:topk=$f,cdf_threshold=None,sim_threshold=-1" \
  "oracle:topk=$f,cdf_threshold=None"); done
S+=("mean_sim:score=mixed,cdf_threshold=0.97,keep_local=8")
timeout ${CURVES_S:-120} python3 -m sparseattn.eval.predictor_curves --model $SMOL --device cuda --dtype bfloat16 --seq-len 4096 --samples 2 \
  --text-files "${ESSAYS[@]}" --exclude-gate-texts $G/smol_gate.safetensors --out $G/curves --specs "${S[@]}" > $G/curves.log 2>&1
python3 -m sparseattn.eval.predictor_curves --plot --out $G/curves >> $G/curves.log 2>&1; tail -n 20 $G/curves.log
st ruler
timeout ${RULER_S:-150} $M ruler --model $SMOL --text-dir .carry/essays --lengths 4096,8192 --samples 3 --device cuda --quiet \
  --predictors "mean_sim:score=mixed,cdf_threshold=0.97,keep_local=8;gate:path=$G/smol_gate.safetensors,cdf_threshold=0.9;sketch_walk" \
  --out $G/ruler > $G/ruler.log 2>&1; tail -n 25 $G/ruler.log
rm -rf $G/qkv4k
tar -C "$OUT" -czf "$OUT/smol_all.tar.gz" g && rm -rf "$G"
st done
