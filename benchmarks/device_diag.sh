#!/usr/bin/env bash
# One device call (issue 10 diagnostics, no model file): GPU tests of the touched paths, predictor kernel profile
# and same-run overhead vs SDPA at 32K, layer-call host times, host profile of the SmolLM2-shaped model,
# and the SmolLM2-shaped eager whole-model rows (random weights). Outputs packed in $OUT/diag.tar.gz.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src"
OUT="${OUT:-./device_out}"; D="$OUT/diag"; mkdir -p "$D"
git log --oneline -1 > "$D/commit.txt" 2>/dev/null
echo "=== tests $(date -u +%H:%M:%S)"
timeout 240 python3 -m pytest -q -x -p no:cacheprovider ${TESTS:-tests/test_layer_graphs.py tests/test_mean_sim_fused.py tests/test_document_masks.py} > "$D/pytest.log" 2>&1; tail -n 3 "$D/pytest.log"
echo "=== predictor $(date -u +%H:%M:%S)"
timeout 120 python3 benchmarks/profile_predictor.py --out "$D" > "$D/pred.log" 2>&1; tail -n 26 "$D/pred.log"
timeout 100 python3 benchmarks/bench_predictors.py --lengths 32768 --predictors "mean_sim:score=mixed,cdf_threshold=0.97,keep_local=8" "mean_sim:cdf_threshold=0.9" --budget-s 80 --out "$D" > "$D/bench_pred.log" 2>&1; tail -n 6 "$D/bench_pred.log"
echo "=== documents $(date -u +%H:%M:%S)"
timeout 100 python3 benchmarks/gpu_sliding_window.py --suite documents --out "$D" > "$D/docs.log" 2>&1; tail -n 8 "$D/docs.log"
echo "=== layer call $(date -u +%H:%M:%S)"
timeout 90 python3 benchmarks/layer_call_host.py --out "$D" > "$D/call.log" 2>&1; tail -n 8 "$D/call.log"
echo "=== host $(date -u +%H:%M:%S)"
timeout 120 python3 benchmarks/profile_host.py --out "$D/host" > "$D/host.log" 2>&1; tail -n 5 "$D/host.log"
echo "=== arch $(date -u +%H:%M:%S)"
timeout 150 python3 benchmarks/bench_model.py --arch smollm2-135m --random-ids --lengths 8192 --repeats 7 --out "$D/arch" --no-plot \
  --patterns "sink_window:window_blocks=8,block_m=128,block_n=128" > "$D/arch.log" 2>&1; sed -n '/^| len/,$p' "$D/arch/bench_model.md" | cut -c1-300
tar -C "$OUT" -czf "$OUT/diag.tar.gz" diag && rm -rf "$D"
echo "=== done $(date -u +%H:%M:%S)"
