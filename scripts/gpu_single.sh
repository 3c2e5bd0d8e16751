#!/usr/bin/env bash
# One-GPU device calls (each fits the 10-minute limit); logs go to $OUT.
#   bash scripts/gpu_single.sh tests   # build + every GPU test + the layer benchmark
#   bash scripts/gpu_single.sh bench   # serving benchmark + planner sweep
#   bash scripts/gpu_single.sh train   # dropless training-step A/B (slots / grouped_mm / Triton FFN), host costs
set -uo pipefail
OUT=${OUT:-/tmp/adaptmoe_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 TORCH_EXTENSIONS_DIR=/tmp/adaptmoe_ext
cd "$(dirname "$0")/.."
export ADAPTMOE_COMMIT=${ADAPTMOE_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
case "${1:-tests}" in
  tests)
    SKIP_OPS=1 TEST_TIMEOUT=200 BENCH_TIMEOUT=260 bash scripts/gpu_check.sh
    timeout 120 python3 -m pytest -m gpu tests/serving tests/test_*.py -q -p no:cacheprovider 2>&1 | tail -n 30 | tee "$OUT/gpu_tests_serving.log"
    ;;
  train)
    timeout 200 python3 scripts/ab_dropless_train.py fine64 dsv3 mixtral --iters 15 2>&1 | tee "$OUT/ab_dropless_train.log"
    timeout 60 python3 scripts/host_cost_slots.py fine64 dsv3 2>&1 | tee "$OUT/host_cost_slots.log"
    ;;
  bench)
    SKIP_TESTS=1 BENCH_TIMEOUT=220 FLOOR_TIMEOUT=90 bash scripts/gpu_serving.sh
    timeout 200 python3 -m adaptmoe.examples.bench_planner --iters 10 --warmup 3 2>&1 | tee "$OUT/bench_planner.log"
    ;;
esac
# Note: the device machine's copy of .git can be stale; pass ADAPTMOE_COMMIT=<hash> from the
# checkout that launched the run (the benchmarks print it).
