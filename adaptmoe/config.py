"""Typed, validated, immutable configuration of one MoE layer.

The Tutel-style dict API (``adaptmoe.moe``) converts its dicts into these; nothing here is
ever mutated after construction (``dataclasses.replace`` makes a changed copy).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

GATE_KINDS = ("softmax", "sigmoid", "cosine", "sinkmoid", "custom")
EXPERT_KINDS = ("ffn", "gated_ffn", "custom")
LOSS_KINDS = ("gshard", "load_importance", "entropy", "z_loss", "none")
A2A_ALGOS = ("flat", "2d")
PLAN_MODES = ("fixed", "auto")
ACTIVATIONS = ("relu", "gelu", "silu", "swish", "identity", "tanh", "sigmoid", "gelu_tanh")


def _check_choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def check_capacity_factor(value: Any, name: str = "capacity_factor") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float (>0 fixed capacity, 0 dropless, <0 capped dropless), got {value!r}")
    # comparisons, not math.isfinite: torch 2.11's dynamo refuses math.isfinite on some float
    # constants (0.0), which broke torch.compile(fullgraph=True) of dropless layers
    if value != value or value in (math.inf, -math.inf):
        raise ValueError(f"{name} must be finite (>0 fixed capacity, 0 dropless, <0 capped dropless), got {value!r}")
    return float(value)


def check_positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


@dataclass(frozen=True, kw_only=True)
class GateConfig:
    """How tokens pick experts. ``top_k`` and ``capacity_factor`` are defaults a call may override."""

    kind: str = "softmax"
    top_k: int = 2
    capacity_factor: float = 1.0      # >0 fixed capacity, 0 dropless, <0 capped dropless
    fp32: bool = False                # route in fp32 even for bf16 models: ties decide experts
    noise_std: float = 0.0            # training-only logit noise, std = noise_std / E (Tutel)
    normalize_topk: bool = True       # renormalise the k kept weights to sum to 1 (k > 1)
    batch_prioritized: bool = False   # slots go to the most confident tokens first
    expert_dropout: float = 0.0       # training: drop whole experts from a token's choice
    activation_after_topk: bool = False  # sigma-MoE: score only the selected experts
    losses: tuple[str, ...] = ("gshard",)
    cosine_proj_dim: int = 256
    cosine_init_t: float = 0.5
    sinkhorn_iters: int = 3
    custom_module: Any = None         # class for kind='custom': Module(model_dim, num_experts, **custom_kwargs)
    custom_kwargs: tuple[tuple[str, Any], ...] = ()

    def validate(self, num_experts: int) -> None:
        _check_choice("gate kind", self.kind, GATE_KINDS)
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or not 1 <= self.top_k <= num_experts:
            raise ValueError(f"top_k must be an integer in [1, {num_experts}] (num_experts), got {self.top_k!r}")
        check_capacity_factor(self.capacity_factor)
        if not (self.noise_std >= 0 and math.isfinite(self.noise_std)):
            raise ValueError(f"gate noise_std must be a finite float >= 0, got {self.noise_std!r}")
        if not 0 <= self.expert_dropout < 1:
            raise ValueError(f"expert_dropout must be in [0, 1), got {self.expert_dropout!r}")
        for loss in self.losses:
            _check_choice("loss", loss, LOSS_KINDS)
        if "load_importance" in self.losses and self.noise_std <= 0:
            raise ValueError("loss 'load_importance' needs noise_std (gate_noise) > 0: it measures "
                             "the probability of staying selected under noise")
        if self.kind == "custom" and self.custom_module is None:
            raise ValueError("gate kind 'custom' needs custom_module (a torch.nn.Module class)")
        if self.kind == "sinkmoid" and self.sinkhorn_iters < 1:
            raise ValueError(f"sinkhorn_iters must be >= 1, got {self.sinkhorn_iters!r}")


@dataclass(frozen=True, kw_only=True)
class ExpertConfig:
    """The experts of one layer. Weights are stored batched, local-expert dim first."""

    kind: str = "ffn"
    hidden_size: int = 0
    activation: Any = "relu"          # a name from ACTIVATIONS or a callable Tensor -> Tensor
    has_fc1_bias: bool | None = None  # None: True for ffn, False for gated_ffn
    has_fc2_bias: bool | None = None
    output_dim: int | None = None     # defaults to model_dim
    custom_module: Any = None         # class for kind='custom' (contract in adaptmoe.experts)
    custom_kwargs: tuple[tuple[str, Any], ...] = ()

    def validate(self) -> None:
        _check_choice("expert kind", self.kind, EXPERT_KINDS)
        if self.kind == "custom":
            if self.custom_module is None:
                raise ValueError("expert kind 'custom' needs custom_module (a torch.nn.Module class)")
            return
        check_positive_int("hidden_size", self.hidden_size)
        if isinstance(self.activation, str):
            _check_choice("activation", self.activation, ACTIVATIONS)
        elif not callable(self.activation):
            raise TypeError(f"activation must be a name from {list(ACTIVATIONS)} or a callable, got {self.activation!r}")
        if self.output_dim is not None:
            check_positive_int("output_dim", self.output_dim)


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """One MoE layer: ``num_experts`` is the global count over the expert-parallel group."""

    model_dim: int
    num_experts: int
    gate: GateConfig = field(default_factory=GateConfig)
    extra_gates: tuple[GateConfig, ...] = ()   # more gates selectable per call (gate_index)
    experts: ExpertConfig = field(default_factory=lambda: ExpertConfig(hidden_size=1))
    is_postscore: bool = True          # scale by the gate at combine (True) or at dispatch
    adaptive_r: int = 1                # 0 DP, 1 EP, s MP; per-call override
    overlap_degree: int = 1            # a2a/expert pipelining chunks; per-call override
    a2a_algo: str = "flat"             # 'flat' or '2d' hierarchical; per-call override
    megablocks_size: int = 0           # accepted for Tutel parity; dropless uses grouped GEMM
    plan: str = "fixed"                # 'fixed': the knobs above; 'auto': the planner picks r/d/algo

    @property
    def gates(self) -> tuple[GateConfig, ...]:
        return (self.gate, *self.extra_gates)

    def validate(self) -> None:
        check_positive_int("model_dim", self.model_dim)
        check_positive_int("num_experts", self.num_experts)
        for gate in self.gates:
            gate.validate(self.num_experts)
        self.experts.validate()
        if isinstance(self.adaptive_r, bool) or not isinstance(self.adaptive_r, int) or self.adaptive_r < 0:
            raise ValueError(f"adaptive_r must be an integer >= 0, got {self.adaptive_r!r}")
        check_positive_int("a2a_ffn_overlap_degree", self.overlap_degree)
        _check_choice("a2a_algo", self.a2a_algo, A2A_ALGOS)
        _check_choice("plan", self.plan, PLAN_MODES)
        if isinstance(self.megablocks_size, bool) or not isinstance(self.megablocks_size, int) or self.megablocks_size < 0:
            raise ValueError(f"megablocks_size must be an integer >= 0, got {self.megablocks_size!r}")
