#!/usr/bin/env bash
# 2-GPU run of issue 4: NCCL parity tests, then the parallel benchmark. Logs go to $OUT (or ./gpu_logs).
# Usage on the device machine: bash scripts/gpu_dist.sh [extra bench_parallel args]
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-./gpu_logs}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpus.txt" 2>&1; nvidia-smi topo -m >> "$OUT/gpus.txt" 2>&1
python3 -c 'import torch; print(torch.__version__, torch.cuda.device_count())' | tee -a "$OUT/gpus.txt"
rc=0
timeout 200 python3 -m pytest tests/gpu/test_dist_gpu.py -q -x -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" || rc=1
timeout 360 torchrun --standalone --nproc_per_node=2 -m adaptmoe.examples.bench_parallel "$@" 2>&1 \
  | grep -v -E "FutureWarning|return func" | tee "$OUT/bench_parallel.log" || rc=1
exit $rc
