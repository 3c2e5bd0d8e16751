#!/usr/bin/env bash
# Serving on one GPU: the GPU tests of tests/serving, then the serving benchmark (Mixtral layer
# shapes, bf16: mixed request stream, decode floors for T in 1,4,16,64, prefill floors), then the
# decode floors again with 2-matrix experts (the convention of anchor-figures' Tutel decode rows).
# Logs and JSON go to $OUT. Every step runs even if an earlier one fails; the exit code is the
# first failure's.
#   SKIP_TESTS=1 BENCH_ARGS="--requests 50" bash scripts/gpu_serving.sh
#   DEVICE=cpu BENCH_ARGS="--requests 10 --iters 2" FLOOR_ARGS="--iters 2" bash scripts/gpu_serving.sh   # CPU dry run
set -uo pipefail
OUT=${OUT:-/tmp/adaptmoe_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}   # DEVICE=cpu: dry run of every step on a machine without a GPU
status=0
step() {   # step NAME TIMEOUT_S LOG CMD...: run, tee to the log, remember the first failure
  local name=$1 limit=$2 log=$3; shift 3
  echo "=== $name ($(date +%T)) ==="
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc ===" | tee -a "$OUT/$log"
  if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$rc; fi
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name(), torch.cuda.is_available() and torch.cuda.get_device_capability())"
  git rev-parse --short HEAD 2>/dev/null; } 2>&1 | tee "$OUT/serving_env.log"

if [ -z "${SKIP_TESTS:-}" ]; then
  step "serving gpu tests" "${TEST_TIMEOUT:-240}" serving_gpu_tests.log \
    "$PY" -m pytest -m gpu tests/serving -q -p no:cacheprovider -rs ${TEST_ARGS:-}
fi
if [ -z "${SKIP_BENCH:-}" ]; then
  step "serving benchmark (gated_ffn, Mixtral shapes)" "${BENCH_TIMEOUT:-240}" serving_bench.log \
    "$PY" -m adaptmoe.examples.serve --device "$DEVICE" --json "$OUT/serving_bench.json" ${BENCH_ARGS:-}
  step "decode floors (2-matrix ffn, anchor convention)" "${FLOOR_TIMEOUT:-100}" serving_bench_ffn.log \
    "$PY" -m adaptmoe.examples.serve --device "$DEVICE" --expert-kind ffn --skip-stream \
    --strategies "adaptive,adaptive+graphs,fixed grouped" --prefill-floor-tokens 8192 \
    --json "$OUT/serving_bench_ffn.json" ${FLOOR_ARGS:-}
fi
echo "gpu_serving.sh: exit $status"
exit "$status"
