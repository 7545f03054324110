#!/usr/bin/env bash
# One device call: whole-model prefill benchmarks (benchmarks/bench_model.py) on real and random-weight models.
# Models arrive in pieces under /tmp/m/<tag>/ (../shared/DEVICE.md); this joins and checks them first.
#   STAGES="fused smol smol_quant smol_graphs gemma gemma_graphs llama arch"   (default: all but arch; "fused" checks the fused
#   predictor first and, if it fails, runs the rest with SPARSEATTN_FUSED_PREDICTORS=0)
#   SMOL_ARGS: extra bench_model.py flags of both SmolLM2 stages; SMOL_EAGER_ARGS: of the eager stage only (e.g. --quant int8)
#   SMOL_SHA / GEMMA_SHA: sha256 of the joined files; TEXT_DIR: essays folder (default .carry/essays)
# Everything lands under $OUT/runs/<stage>/ and is packed into $OUT/bench_model_runs.tar.gz (the device
# returns at most 8 files); the tables are printed last.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT="${OUT:-./device_out}"; mkdir -p "$OUT/runs"
STAGES="${STAGES:-fused gemma gemma_graphs smol smol_graphs llama}"
SMOL_PAT="${SMOL_PAT:-sink_window:window_blocks=8,block_m=128,block_n=128}"
TEXT_DIR="${TEXT_DIR:-.carry/essays}"
if ls .carry/whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry/whl/*.whl || exit 1
fi
export PYTHONPATH="/tmp/site:$PWD/src"
join() {  # join /tmp/m/<tag>/part.* into /tmp/m/<tag>/<name> and check its sha256
  local tag=$1 name=$2 sha=$3
  [ -f "/tmp/m/$tag/$name" ] || cat /tmp/m/$tag/part.* > "/tmp/m/$tag/$name"
  echo "$sha  /tmp/m/$tag/$name" | sha256sum -c - || { echo "device_models.sh: $tag model is incomplete"; return 1; }
}
SMOL=/tmp/m/s/SmolLM2-135M-Instruct.Q4_1.gguf
GEMMA=/tmp/m/g/gemma-3-270m-q4_k_m.gguf
DEFAULT_PRED="$(python3 -c 'from sparseattn.eval.defaults import DEFAULT_PREDICTOR_SPEC as s; print(s)')"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv | tee "$OUT/nvidia_smi.txt"
rc=0
DEADLINE=$((SECONDS + ${TOTAL_BUDGET:-520}))  # stages never run past this, so the results are always packed
STAGE_MAX="${STAGE_MAX:-200}"
bm() {  # bm <stage> <args...>
  local st=$1; shift
  local left=$((DEADLINE - SECONDS))
  if [ $left -lt 40 ]; then echo "=== $st skipped: ${left}s left of TOTAL_BUDGET"; rc=1; return; fi
  [ $left -gt $STAGE_MAX ] && left=$STAGE_MAX
  echo "=== $st $(date -u +%H:%M:%S) (at most ${left}s)"
  timeout $left python3 benchmarks/bench_model.py --out "$OUT/runs/$st" --no-plot "$@" > "$OUT/runs/$st.log" 2>&1 || { rc=1; tail -n 20 "$OUT/runs/$st.log"; }
}
for st in $STAGES; do
  case "$st" in
    fused) echo "=== fused $(date -u +%H:%M:%S)"
           timeout 110 python3 benchmarks/gpu_mean_sim_fused.py --out "$OUT/runs/fused" --time-budget 80 > "$OUT/runs/fused.log" 2>&1
           frc=$?; tail -n 30 "$OUT/runs/fused.log"
           if [ $frc -ne 0 ]; then rc=1; export SPARSEATTN_FUSED_PREDICTORS=0; echo "fused predictor check failed (rc $frc): torch path from here on"; fi ;;
    smol) join s SmolLM2-135M-Instruct.Q4_1.gguf "${SMOL_SHA}" && bm smol --model $SMOL --lengths 4096,8192 --text-dir "$TEXT_DIR" \
            --predictors "$DEFAULT_PRED" --patterns "$SMOL_PAT" ${SMOL_ARGS:-} ${SMOL_EAGER_ARGS:-} ;;
    smol_quant) join s SmolLM2-135M-Instruct.Q4_1.gguf "${SMOL_SHA}" && bm smol_quant --model $SMOL --lengths 4096,8192 --text-dir "$TEXT_DIR" \
            --predictors "$DEFAULT_PRED" --quant "${SMOL_QUANT:-int8}" ${SMOL_ARGS:-} ;;
    smol_graphs) join s SmolLM2-135M-Instruct.Q4_1.gguf "${SMOL_SHA}" && bm smol_graphs --model $SMOL --lengths 8192 --text-dir "$TEXT_DIR" \
            --mode graphs --predictors "$DEFAULT_PRED" --patterns "$SMOL_PAT" ${SMOL_ARGS:-} ;;
    gemma) join g gemma-3-270m-q4_k_m.gguf "${GEMMA_SHA}" && bm gemma --model $GEMMA --lengths 8192,16384,32000 --text-dir "$TEXT_DIR" \
            --predictors "$DEFAULT_PRED" ${GEMMA_ARGS:-} ;;
    gemma_graphs) join g gemma-3-270m-q4_k_m.gguf "${GEMMA_SHA}" && bm gemma_graphs --model $GEMMA --lengths 32000 --text-dir "$TEXT_DIR" \
            --mode graphs --predictors "$DEFAULT_PRED" ${GEMMA_ARGS:-} ;;
    llama) bm llama --llama-stack 4 --lengths 32768,65536,131072 --repeats 5 --score-last 128 \
            --patterns "random:density=0.1,block_m=128,block_n=128" \
            --predictors "mean_sim:topk=0.1,cdf_threshold=None,sim_threshold=-1,keep_local=1,block_m=128,block_n=128" ${LLAMA_ARGS:-} ;;
    arch) bm arch_smol --arch smollm2-135m --lengths 8192 --random-ids --patterns "$SMOL_PAT" --predictors "$DEFAULT_PRED" ${ARCH_ARGS:-}
          bm arch_gemma --arch gemma3-270m --lengths 32768 --random-ids --patterns "dense" --predictors "$DEFAULT_PRED" ${ARCH_ARGS:-} ;;
  esac
done
for f in "$OUT"/runs/*/bench_model.md; do echo "--- $f"; sed -n '/^| len/,$p' "$f" | cut -c1-400; done
tar -C "$OUT" -czf "$OUT/bench_model_runs.tar.gz" runs && rm -rf "$OUT/runs"
echo "=== done $(date -u +%H:%M:%S) rc=$rc"
exit $rc
