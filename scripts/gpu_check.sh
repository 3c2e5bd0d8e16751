#!/usr/bin/env bash
# One device call: build the native extension (just in time, as users get it), run the GPU
# tests, run the layer benchmark. Logs go to $OUT (the device tool brings them back).
#   BENCH_ARGS="--configs fine64 --quick" SKIP_TESTS=1 bash scripts/gpu_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/adaptmoe_out}
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/adaptmoe_ext}
cd "$(dirname "$0")/.."

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
  nvcc --version | tail -1; } 2>&1 | tee "$OUT/env.log"

echo "=== build ==="
start=$(date +%s)
python3 - <<'PY' 2>&1 | tee "$OUT/build.log"
import adaptmoe.ops as ops
print("native_available:", ops.native_available())
print("native_status:", ops.native_status())
PY
echo "build+load: $(( $(date +%s) - start )) s" | tee -a "$OUT/build.log"

if [ -z "${SKIP_TESTS:-}" ]; then
  echo "=== gpu tests ==="
  timeout ${TEST_TIMEOUT:-240} python3 -m pytest -m gpu tests/gpu -q --maxfail=15 -p no:cacheprovider ${TEST_ARGS:-} 2>&1 | tail -n 60 | tee "$OUT/gpu_tests.log"
fi

if [ -z "${SKIP_OPS:-}" ]; then
  echo "=== op micro-benchmark ==="
  python3 scripts/bench_ops.py 2>&1 | tee "$OUT/bench_ops.log"
fi

if [ -z "${SKIP_BENCH:-}" ]; then
  echo "=== bench ==="
  timeout ${BENCH_TIMEOUT:-300} python3 -m adaptmoe.examples.bench_layer ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | grep -v "^ " | tail -n 400
fi
