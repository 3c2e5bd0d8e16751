"""Plain-data records the planner exchanges with the runtime: Plan, LayerSignature, Candidate.

Everything here is a frozen dataclass of ints, floats, strings and lists, so that the runtime can
broadcast it between ranks and the cache can store it with msgpack (`to_dict` / `from_dict`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

A2A_ALGOS = ("flat", "2d")
EXPERT_KERNELS = ("bmm", "grouped", "decode")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
EXPERT_TYPES = ("ffn", "gated_ffn", "custom")
# Weight matrices per expert: ffn = (D x H, H x D); gated ffn adds the gate projection (D x H).
# A custom expert is costed like an ffn: the planner cannot see inside a user module.
MATRICES_PER_EXPERT = {"ffn": 2, "gated_ffn": 3, "custom": 2}


def _check_choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


@dataclass(frozen=True)
class Plan:
    """How one MoE layer call runs; changing it between calls moves no stored state."""

    adaptive_r: int = 1           # 0 = data parallel, 1 = expert parallel, r>1 = r-way replication
    overlap_degree: int = 1       # d: chunks of the capacity dim pipelined against all-to-all
    a2a_algo: str = "flat"        # 'flat' or '2d' (hierarchical: intra-node then inter-node)
    expert_kernel: str = "bmm"    # 'bmm' (capacity padded), 'grouped' (routed rows), 'decode'

    def __post_init__(self) -> None:
        if not isinstance(self.adaptive_r, int) or self.adaptive_r < 0:
            raise ValueError(f"adaptive_r must be an int >= 0, got {self.adaptive_r!r}")
        if not isinstance(self.overlap_degree, int) or self.overlap_degree < 1:
            raise ValueError(f"overlap_degree must be an int >= 1, got {self.overlap_degree!r}")
        _check_choice("a2a_algo", self.a2a_algo, A2A_ALGOS)
        _check_choice("expert_kernel", self.expert_kernel, EXPERT_KERNELS)

    def label(self) -> str:
        return f"r={self.adaptive_r} d={self.overlap_degree} {self.a2a_algo} {self.expert_kernel}"

    def to_dict(self) -> dict[str, Any]:
        return {"adaptive_r": self.adaptive_r, "overlap_degree": self.overlap_degree,
                "a2a_algo": self.a2a_algo, "expert_kernel": self.expert_kernel}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        return cls(adaptive_r=int(data["adaptive_r"]), overlap_degree=int(data["overlap_degree"]),
                   a2a_algo=str(data["a2a_algo"]), expert_kernel=str(data["expert_kernel"]))


@dataclass(frozen=True)
class LayerSignature:
    """What the planner needs to know about one MoE layer, independent of the batch size."""

    model_dim: int
    hidden: int
    num_experts: int
    top_k: int
    dtype: str = "bfloat16"
    expert_type: str = "ffn"
    training: bool = True
    capacity_factor: float = 1.0   # >0 fixed capacity, 0 dropless, <0 dropless capped at -cf

    def __post_init__(self) -> None:
        for name in ("model_dim", "hidden", "num_experts", "top_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k must be in [1, {self.num_experts}] (num_experts), "
                             f"got {self.top_k}")
        _check_choice("dtype", self.dtype, tuple(DTYPE_BYTES))
        _check_choice("expert_type", self.expert_type, EXPERT_TYPES)

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def matrices_per_expert(self) -> int:
        return MATRICES_PER_EXPERT[self.expert_type]

    @property
    def expert_weight_bytes(self) -> int:
        """Bytes of one whole expert's weights (biases are negligible and ignored)."""
        return self.matrices_per_expert * self.model_dim * self.hidden * self.dtype_bytes

    @cached_property
    def _key(self) -> str:
        mode = "train" if self.training else "infer"
        return (f"D{self.model_dim}-H{self.hidden}-E{self.num_experts}-k{self.top_k}-"
                f"{self.dtype}-{self.expert_type}-{mode}-cf{float(self.capacity_factor):g}")

    def key(self) -> str:
        """Stable cache-key string; computed once per instance (the runtime looks it up per call)."""
        return self._key

    def to_dict(self) -> dict[str, Any]:
        return {"model_dim": self.model_dim, "hidden": self.hidden,
                "num_experts": self.num_experts, "top_k": self.top_k, "dtype": self.dtype,
                "expert_type": self.expert_type, "training": self.training,
                "capacity_factor": float(self.capacity_factor)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerSignature:
        return cls(model_dim=int(data["model_dim"]), hidden=int(data["hidden"]),
                   num_experts=int(data["num_experts"]), top_k=int(data["top_k"]),
                   dtype=str(data["dtype"]), expert_type=str(data["expert_type"]),
                   training=bool(data["training"]),
                   capacity_factor=float(data["capacity_factor"]))


@dataclass(frozen=True)
class Candidate:
    """One plan with its predicted cost, or the reasons it cannot run (then predicted_ms is None)."""

    plan: Plan
    predicted_ms: float | None
    rejected: list[str] = field(default_factory=list)
    breakdown: dict[str, float] = field(default_factory=dict)   # component -> ms

    @property
    def feasible(self) -> bool:
        return not self.rejected

    def to_dict(self) -> dict[str, Any]:
        return {"plan": self.plan.to_dict(), "predicted_ms": self.predicted_ms,
                "rejected": list(self.rejected), "breakdown": dict(self.breakdown)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Candidate:
        ms = data.get("predicted_ms")
        return cls(plan=Plan.from_dict(data["plan"]),
                   predicted_ms=None if ms is None else float(ms),
                   rejected=[str(r) for r in data.get("rejected", [])],
                   breakdown={str(k): float(v) for k, v in data.get("breakdown", {}).items()})
