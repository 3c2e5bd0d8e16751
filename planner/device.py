"""Per-GPU compute and memory model: GEMM throughput, memory bandwidth, capacity, fixed overheads.

Presets come from shared/reference/anchor-figures.md (H100: 784-790 TFLOP/s dense bf16, ~650 for
balanced expert bmm at Mixtral/fine-grained shapes, ~3.0 TB/s copy). `from_measurement` builds one
from the runtime's own probe, which is what the planner should use on real hardware.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DeviceModel:
    name: str
    gemm_tflops: float              # dense matmul throughput at large shapes, TFLOP/s
    mem_bw_gbps: float              # device memory bandwidth, GB/s (bytes read + written)
    memory_gib: float               # usable device memory, GiB
    rows_half: float = 128.0        # GEMM rows at which efficiency is half (small GEMMs waste SMs)
    expert_fraction: float = 0.88   # balanced expert bmm vs dense peak (650 / 790 at 2k rows)
    grouped_fraction: float = 0.93  # grouped GEMM vs bmm at equal rows (anchor: 545..658 vs 610..654)
    gemm_stream_fraction: float = 0.8  # bandwidth GEMM kernels reach streaming weights at few
                                    # rows; a dedicated decode (GEMV) kernel reaches the copy rate
    launch_us: float = 5.0          # host + launch cost of one eager kernel
    collective_call_us: float = 150.0  # runtime cost of one collective call beyond the link's
                                    # alpha-beta (Python, splits, permutes): measured on 4 x H200,
                                    # where overlap chunks lost to d=1 though links alone predict gains
    overlap_contention: float = 0.10  # compute slowdown while NCCL kernels share the SMs
    call_overhead_us: float = 0.0   # the shortest a layer call can take however little work it
    train_call_overhead_us: float = 0.0  # has (host code, launches, small collectives); the runtime
                                    # times a tiny call, forward and forward + backward, to set them
    chunk_overhead_us: float = 0.0  # what each overlap chunk beyond the first adds to a call
    train_chunk_overhead_us: float = 0.0  # (its own collective calls, permutes and launches, in
                                    # series with the call); the runtime times a tiny call at d=2
                                    # against d=1. 2 x H200: d=2 lost ~1 ms per step where links
                                    # and GEMMs alone predicted a gain
    host_exposed_fraction: float = 0.3  # one process: share of the shorter of host time and device
                                    # work that the longer does not hide (autograd's host work
                                    # between backward kernels); fitted on the 1 x H100 sweep, 0 with
                                    # collectives in the call (2 x H200 sweep)

    def __post_init__(self) -> None:
        for name in ("gemm_tflops", "mem_bw_gbps", "memory_gib", "rows_half"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("call_overhead_us", "train_call_overhead_us", "chunk_overhead_us", "train_chunk_overhead_us"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0.0 <= self.host_exposed_fraction <= 1.0:
            raise ValueError(f"host_exposed_fraction must be in [0, 1], got {self.host_exposed_fraction!r}")

    @classmethod
    def preset(cls, name: str) -> DeviceModel:
        try:
            return PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown device {name!r}; presets: {sorted(PRESETS)}") from None

    @classmethod
    def from_measurement(cls, gemm_tflops: float, mem_bw: float, *, name: str = "measured",
                         memory_gib: float = 80.0, rows_half: float = 128.0) -> DeviceModel:
        """gemm_tflops: measured throughput of a large balanced expert bmm (so expert_fraction=1);
        mem_bw: measured device copy bandwidth in GB/s."""
        return cls(name=name, gemm_tflops=gemm_tflops, mem_bw_gbps=mem_bw,
                   memory_gib=memory_gib, rows_half=rows_half, expert_fraction=1.0)

    def gemm_efficiency(self, rows: float) -> float:
        """Fraction of peak a GEMM with `rows` rows per matrix reaches: rows / (rows + rows_half)."""
        return rows / (rows + self.rows_half) if rows > 0 else 0.0

    def expert_gemm_seconds(self, flops: float, rows_per_matrix: float, kernel: str) -> float:
        """Seconds for expert GEMMs of `flops` total, each matrix seeing `rows_per_matrix` rows."""
        if flops <= 0:
            return 0.0
        fraction = self.expert_fraction * (self.grouped_fraction if kernel == "grouped" else 1.0)
        flops_per_s = self.gemm_tflops * 1e12 * fraction * self.gemm_efficiency(rows_per_matrix)
        return flops / flops_per_s

    def memory_seconds(self, bytes_moved: float) -> float:
        """Seconds for a memory-bound pass touching `bytes_moved` bytes (reads + writes)."""
        return bytes_moved / (self.mem_bw_gbps * 1e9)


PRESETS: dict[str, DeviceModel] = {
    "H100": DeviceModel(name="H100", gemm_tflops=790.0, mem_bw_gbps=3000.0, memory_gib=80.0),
    "H200": DeviceModel(name="H200", gemm_tflops=790.0, mem_bw_gbps=4300.0, memory_gib=141.0),
    # A 2-core CPU: anchor-figures measured ~0.14 TFLOP/s fp32 for Tutel's README layer.
    "cpu": DeviceModel(name="cpu", gemm_tflops=0.2, mem_bw_gbps=20.0, memory_gib=16.0,
                       rows_half=16.0, expert_fraction=0.7, launch_us=20.0,
                       overlap_contention=0.0),
}
