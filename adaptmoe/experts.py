"""Experts: the one stored layout of expert weights, and the modules that compute with it.

Legend: e local experts, s shards of one expert (ranks sharing it), D model dim, H hidden,
O output dim, C rows per expert. Each rank stores its e experts, or a 1/s hidden slice of one
expert when s > 1; this never changes after construction (adaptive_r only changes what is
gathered per call). Parameter names and layouts match Tutel's ``ffn`` so checkpoints load.

Custom expert contract (``ExpertConfig(kind='custom', custom_module=Cls)``):
``Cls(model_dim=D, num_local_experts=e, sharded_count=s, **custom_kwargs)`` builds the module;
``forward(x_eCD)`` takes ``[e, C, D]`` (tokens of each local expert, padded rows are zeros) and
returns ``[e, C, *out]``, same leading dims. Custom experts run only with adaptive_r = 1 on
whole experts (s = 1) unless they implement sharding themselves.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ExpertConfig
from .expert_compute import FFNWeights, ffn_dense, ffn_grouped, ffn_padded, ffn_slotted
from .routing import OverflowSlots, capacity_for

ACTIVATION_FNS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "identity": lambda x: x,
}


def resolve_activation(activation) -> Callable[[Tensor], Tensor]:
    return ACTIVATION_FNS[activation] if isinstance(activation, str) else activation


# FFNWeights' order: w1, w2, b1, b2, w3.
_FFN_WEIGHT_NAMES = ("batched_fc1_w", "batched_fc2_w", "batched_fc1_bias", "batched_fc2_bias", "batched_fc3_w")


def _param(module: nn.Module, name: str, *default):
    """``module.name`` in one dict read when it is a registered parameter: nn.Module.__getattr__
    costs ~1 us of host time per read, and stored_weights runs on every call. Anything else
    (an absent weight kept as None, a tensor swapped in by a functional call) the usual way,
    ``getattr(module, name, *default)``."""
    value = module._parameters.get(name)
    return value if value is not None else getattr(module, name, *default)


def _uniform_(tensor: Tensor, bound: float) -> None:
    with torch.no_grad():
        tensor.uniform_(-bound, bound)


class FFNExperts(nn.Module):
    """act(x W1^T + b1) W2 + b2 per expert; ``gated=True`` adds the llama/SwiGLU up projection
    (act(x W1^T) * (x W3^T)) W2 and has no biases by default."""

    def __init__(self, config: ExpertConfig, model_dim: int, num_local_experts: int, sharded_count: int = 1,
                 gated: bool = False):
        super().__init__()
        if config.hidden_size % sharded_count:
            raise ValueError(f"hidden_size ({config.hidden_size}) must be divisible by the {sharded_count} "
                             "ranks that share one expert")
        self.model_dim, self.num_local_experts, self.sharded_count = model_dim, num_local_experts, sharded_count
        self.hidden_size, self.gated = config.hidden_size, gated
        self.output_dim = config.output_dim or model_dim
        self.activation = resolve_activation(config.activation)
        e, h, out = num_local_experts, config.hidden_size // sharded_count, self.output_dim
        self.batched_fc1_w = nn.Parameter(torch.empty(e, h, model_dim))
        self.batched_fc2_w = nn.Parameter(torch.empty(e, h, out))
        self.batched_fc3_w = nn.Parameter(torch.empty(e, h, model_dim)) if gated else None
        fc1_bias = config.has_fc1_bias if config.has_fc1_bias is not None else not gated
        fc2_bias = config.has_fc2_bias if config.has_fc2_bias is not None else not gated
        self.batched_fc1_bias = nn.Parameter(torch.empty(e, h)) if fc1_bias else None
        # The output bias is split over the s shards too (ceil), and gathered when used.
        self.batched_fc2_bias = nn.Parameter(torch.empty(e, -(-out // sharded_count))) if fc2_bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's init, computed with the full expert's fan-in (not the shard's)."""
        bound1 = 1 / math.sqrt(self.model_dim)
        bound2 = 1 / math.sqrt(self.hidden_size)
        _uniform_(self.batched_fc1_w, bound1)
        _uniform_(self.batched_fc2_w, bound2)
        if self.batched_fc3_w is not None:
            _uniform_(self.batched_fc3_w, bound1)
        if self.batched_fc1_bias is not None:
            _uniform_(self.batched_fc1_bias, bound1)
        if self.batched_fc2_bias is not None:
            _uniform_(self.batched_fc2_bias, bound2)

    def stored_weights(self) -> FFNWeights:
        w1, w2, b1, b2, w3 = (_param(self, name) for name in _FFN_WEIGHT_NAMES)
        if b2 is not None and b2.shape[1] != self.output_dim:
            b2 = b2[:, : self.output_dim]
        return FFNWeights(w1, w2, b1, b2, w3)

    def forward(self, x_eCD: Tensor, weights: FFNWeights | None = None) -> Tensor:
        return ffn_padded(x_eCD, weights or self.stored_weights(), self.activation)

    def forward_grouped(self, x_RD: Tensor, counts_e: Tensor, weights: FFNWeights | None = None,
                        max_rows_per_expert: int | None = None) -> Tensor:
        return ffn_grouped(x_RD, counts_e, weights or self.stored_weights(), self.activation, max_rows_per_expert)

    def forward_dense(self, x_TD: Tensor) -> Tensor:
        """Every expert over every token: [E, T, O] (``expert_compute.ffn_dense``)."""
        return ffn_dense(x_TD, self.stored_weights(), self.activation)

    def slot_layout(self, x_TD: Tensor, routing) -> OverflowSlots | None:
        """The capacity-slot layout for a dropless training call of these experts on one process
        (``ops._triton_slotted``), or None where grouped_mm serves: no gradient, a call too small
        to repay the path's host time, a blocker, or the layer's last call would have needed
        fix-ups on too many experts."""
        from .ops import _triton_slotted   # lazy: ops imports this module's users
        if not (_triton_slotted.is_enabled() and torch.is_grad_enabled() and routing.dropless):
            return None
        w = self.stored_weights()
        weights = (w.w1_eHD, w.w2_eHO) + (() if w.w3_eHD is None else (w.w3_eHD,))
        T, K = routing.indices_TK.shape
        if T == 0 or not _triton_slotted.worth_it(T * K, self.model_dim, w.w1_eHD.shape[1]):
            return None
        if _triton_slotted.blocker(x_TD, weights, (w.b1_eH, w.b2_eO)) is not None:
            return None
        capacity = capacity_for(1.0, T, self.num_local_experts, K)
        monitor = self.__dict__.setdefault("_overflow_monitor", _triton_slotted.OverflowMonitor())
        prefer = monitor.prefer_slots(self.num_local_experts)
        if not prefer and not monitor.measure_off_slots():
            return None
        layout, _ = _triton_slotted.layout_on_gpu(routing, capacity, monitor)   # measured when not taken too
        return layout if prefer else None

    def forward_slotted(self, x_SD: Tensor, layout: OverflowSlots) -> Tensor:
        return ffn_slotted(x_SD, layout, self.stored_weights(), self.activation)

    def extra_repr(self) -> str:
        kind = "gated_ffn" if self.gated else "ffn"
        return (f"{kind}, model_dim={self.model_dim}, hidden={self.hidden_size}, output_dim={self.output_dim}, "
                f"local_experts={self.num_local_experts}, shards={self.sharded_count}")


class CustomExperts(nn.Module):
    """Adapts a user module with the padded contract; the grouped path pads per expert."""

    def __init__(self, config: ExpertConfig, model_dim: int, num_local_experts: int, sharded_count: int = 1):
        super().__init__()
        self.model_dim, self.num_local_experts, self.sharded_count = model_dim, num_local_experts, sharded_count
        self.module = config.custom_module(model_dim=model_dim, num_local_experts=num_local_experts,
                                           sharded_count=sharded_count, **dict(config.custom_kwargs))

    def forward(self, x_eCD: Tensor, weights=None) -> Tensor:
        return self.module(x_eCD)

    def forward_grouped(self, x_RD: Tensor, counts_e: Tensor, weights=None,
                        max_rows_per_expert: int | None = None) -> Tensor:
        e, R = counts_e.numel(), x_RD.shape[0]
        if max_rows_per_expert is not None and R > 0 and e * max_rows_per_expert == R:
            # every count equals the bound (top_k == num_experts): already padded, no host sync
            return self.module(x_RD.view(e, max_rows_per_expert, x_RD.shape[1])).reshape(R, -1)
        counts = counts_e.tolist()
        width = max(counts, default=0)
        padded_eCD = x_RD.new_zeros(len(counts), width, x_RD.shape[1])
        starts = [0]
        for n in counts:
            starts.append(starts[-1] + n)
        for i, n in enumerate(counts):
            padded_eCD[i, :n] = x_RD[starts[i]:starts[i + 1]]
        y_eCO = self.module(padded_eCD).reshape(len(counts), width, -1)
        return torch.cat([y_eCO[i, :n] for i, n in enumerate(counts)], dim=0) if counts else y_eCO.reshape(0, 0)


def build_experts(config: ExpertConfig, model_dim: int, num_local_experts: int, sharded_count: int = 1) -> nn.Module:
    if config.kind == "custom":
        return CustomExperts(config, model_dim, num_local_experts, sharded_count)
    return FFNExperts(config, model_dim, num_local_experts, sharded_count, gated=config.kind == "gated_ffn")
