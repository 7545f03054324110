#!/usr/bin/env bash
# One device call (no model file): GPU tests of the paths changed this session, predictor kernel profile and
# same-run overhead vs SDPA at 32K, packed-document rows, layer-call host times, quantized decode rows.
# Outputs packed in $OUT/diag.tar.gz; short tables printed.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src"
OUT="${OUT:-./device_out}"; D="$OUT/diag"; mkdir -p "$D"
git log --oneline -1 > "$D/commit.txt" 2>/dev/null
st() { echo "=== $1 $(date -u +%H:%M:%S)"; }
st tests
timeout 150 python3 -m pytest -q -x -p no:cacheprovider ${TESTS:-tests/integrations/test_layer_graphs.py tests/ops/test_decode_quant.py tests/ops/test_document_masks.py tests/predictors/test_fused_mean_sim.py} > "$D/pytest.log" 2>&1; tail -n 4 "$D/pytest.log"
st predictor
timeout 60 python3 benchmarks/profile_predictor.py --out "$D" --pool 4096:8,2048:4,4096:4 --score-tiles 64:4,32:4 --repeats 10 \
  --specs "mean_sim:cdf_threshold=0.9;mean_sim:score=mixed,cdf_threshold=0.97,keep_local=8" > "$D/pred.log" 2>&1; tail -n 9 "$D/pred.log"
timeout 80 python3 benchmarks/bench_predictors.py --lengths 32768 --predictors "mean_sim:score=mixed,cdf_threshold=0.97,keep_local=8" "mean_sim:cdf_threshold=0.9" --budget-s 60 --out "$D" > "$D/bench_pred.log" 2>&1; tail -n 5 "$D/bench_pred.log"
st documents
timeout 80 python3 benchmarks/gpu_sliding_window.py --suite documents --out "$D" > "$D/docs.log" 2>&1; tail -n 8 "$D/docs.log"
st layer_call
timeout 60 python3 benchmarks/layer_call_host.py --out "$D" > "$D/call.log" 2>&1; tail -n 7 "$D/call.log"
st decode
timeout 120 python3 benchmarks/bench_decode.py --contexts 32768,131072 --batches 1,8 --no-flex --budget-s 95 --out "$D" > "$D/decode.log" 2>&1; tail -n 14 "$D/decode.log"
tar -C "$OUT" -czf "$OUT/diag.tar.gz" diag && rm -rf "$D"
st done
