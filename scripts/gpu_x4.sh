#!/usr/bin/env bash
# 4-GPU run of issue 7 (one device call): NCCL parity at world 4 (2 nodes x 2), the parallel
# benchmark per (r, d, algorithm) with raw all_to_all bandwidth, and the planner sweep at W=4.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-./gpu_logs}; mkdir -p "$OUT"
cd "$(dirname "$0")/.."
{ nvidia-smi --query-gpu=name,memory.total --format=csv; nvidia-smi topo -m; git rev-parse --short HEAD; } > "$OUT/gpus4.txt" 2>&1
timeout 170 python3 -m pytest tests/gpu/test_dist_gpu4.py -q -x -p no:cacheprovider 2>&1 | tail -n 20 | tee "$OUT/gpu4_tests.log"
timeout 260 torchrun --standalone --nproc_per_node=4 -m adaptmoe.examples.bench_parallel --ds 1,2 --cfs 1.0 \
  --iters 6 --warmup 2 --bw-mib 1,16,256 2>&1 | grep -v -E "FutureWarning|return func" | tee "$OUT/bench_parallel4.log"
timeout 140 torchrun --standalone --nproc_per_node=4 -m adaptmoe.examples.bench_planner --iters 5 --warmup 2 \
  2>&1 | tee "$OUT/bench_planner4.log"
