"""Pieces the compatibility surfaces share: prebuilt gates and experts handed to the core's custom
contracts, per-expert user modules, single-rank groups and plain gradient all-reduce.

Legend: T tokens, D model dim, E experts, e local experts, C rows per expert, O output dim.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..moefy import MLPParts, mlp_parts


def prebuilt_gate(model_dim: int, num_experts: int, module: nn.Module) -> nn.Module:
    """``GateConfig(kind='custom', custom_module=prebuilt_gate, custom_kwargs=(('module', m),))``
    makes the layer use the gate module ``m`` a surface already built."""
    return module


def prebuilt_experts(*, model_dim: int, num_local_experts: int, sharded_count: int, module: nn.Module) -> nn.Module:
    """The custom-expert contract's constructor for an expert bank a surface already built."""
    have = getattr(module, "num_local_experts", num_local_experts)
    if have != num_local_experts or sharded_count != 1:
        raise ValueError(f"the expert bank holds {have} local expert(s) but the layer places {num_local_experts} "
                         f"whole expert(s) on this rank ({sharded_count} shard(s) each); check num_experts and the "
                         "expert-parallel group size")
    return module


class LinearLogitsGate(nn.Module):
    """logits = x W^T (+ b), with an optional training-only ``noise_fn(logits)``, in fp32 if asked."""

    def __init__(self, model_dim: int, num_experts: int, *, bias: bool = False, fp32: bool = False,
                 noise_fn: Callable[[Tensor], Tensor] | None = None):
        super().__init__()
        self.wg = nn.Linear(model_dim, num_experts, bias=bias)   # the core's gate name (Tutel's)
        self.fp32 = fp32
        self.noise_fn = noise_fn

    @property
    def gate(self) -> nn.Linear:
        """FastMoE's name of the projection."""
        return self.wg

    def logits(self, x_TD: Tensor) -> Tensor:
        weight, bias = self.wg.weight, self.wg.bias
        if self.fp32:
            x_TD, weight = x_TD.float(), weight.float()
            bias = bias.float() if bias is not None else None
        elif x_TD.dtype != weight.dtype:
            x_TD = x_TD.to(weight.dtype)
        return F.linear(x_TD, weight, bias)

    def add_noise(self, logits_TE: Tensor) -> Tensor:
        return self.noise_fn(logits_TE) if self.noise_fn is not None else logits_TE

    def forward(self, x_TD: Tensor) -> Tensor:
        logits_TE = self.logits(x_TD)
        return self.add_noise(logits_TE) if self.training else logits_TE


def _takes_count(module: nn.Module) -> bool:
    """FastMoE calls experts as ``expert(x, fwd_expert_count)``; plain modules take ``x`` only."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)


class ExpertList(nn.Module):
    """Arbitrary per-expert modules behind the custom-expert contract: ``forward(x_eCD) -> [e, C, O]``.
    Padded rows are zeros and their outputs are discarded by combine."""

    def __init__(self, modules: Iterable[nn.Module]):
        super().__init__()
        self.experts = nn.ModuleList(modules)
        self.num_local_experts = len(self.experts)
        self._with_count = [_takes_count(m) for m in self.experts]

    def forward(self, x_eCD: Tensor) -> Tensor:
        outputs = []
        for i, expert in enumerate(self.experts):
            x_CD = x_eCD[i]
            if self._with_count[i]:
                outputs.append(expert(x_CD, torch.tensor([x_CD.shape[0]])))
            else:
                outputs.append(expert(x_CD))
        return torch.stack(outputs, dim=0)


def _same_activation(a, b) -> bool:
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    return type(a) is type(b) and repr(a) == repr(b)


def _shape_config(parts: MLPParts):
    return dataclasses.replace(parts.expert_config(), activation="identity"), parts.model_dim


def dense_parts(instances: list[nn.Module]) -> list[MLPParts] | None:
    """MLP weights of every expert instance when all are plain, alike MLPs without active dropout
    (then they can run as batched ``ffn`` experts with copied weights); else None."""
    found = []
    for module in instances:
        parts = mlp_parts(module)
        if parts is None or parts.has_active_dropout:
            return None
        found.append(parts)
    first = found[0]
    for parts in found[1:]:
        same_shape = _shape_config(parts) == _shape_config(first)
        if not (same_shape and _same_activation(parts.activation, first.activation)):
            return None
    return found


_SINGLE_RANK_GROUP: list[Any] = []


def single_rank_group():
    """A process group holding only this rank (created once, by this rank alone)."""
    import torch.distributed as dist
    if not _SINGLE_RANK_GROUP:
        _SINGLE_RANK_GROUP.append(dist.new_group([dist.get_rank()], use_local_synchronization=True))
    return _SINGLE_RANK_GROUP[0]


def dist_ready() -> bool:
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized()


def allreduce_scaled(tensors: list[Tensor], group, scale: float) -> None:
    """Sums ``tensors`` in place over ``group`` (one flat buffer per dtype), then multiplies by ``scale``."""
    import torch.distributed as dist
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for same in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in same])
        dist.all_reduce(flat, group=group)
        flat *= scale
        offset = 0
        for t in same:
            t.copy_(flat[offset: offset + t.numel()].view_as(t))
            offset += t.numel()


def sync_gradients_fallback(model: nn.Module, dp_group=None, expert_dp_group=None, *, average: bool = True) -> None:
    """``adaptmoe.grad_sync.sync_gradients``'s rule for when that helper is not installed: non-expert
    grads summed over ``dp_group``, expert grads over ``expert_dp_group`` (None: not reduced), both
    divided by the size of ``dp_group`` when averaging."""
    import torch.distributed as dist
    scale = 1.0 / dist.get_world_size(dp_group) if average else 1.0
    grads = [(p.grad, bool(getattr(p, "_adaptmoe_expert", False))) for p in model.parameters() if p.grad is not None]
    allreduce_scaled([g for g, expert in grads if not expert], dp_group, scale)
    expert_grads = [g for g, expert in grads if expert]
    if expert_dp_group is not None:
        allreduce_scaled(expert_grads, expert_dp_group, scale)
    else:
        for g in expert_grads:
            g.mul_(scale)


def broadcast_from_first(tensors: list[Tensor], group) -> None:
    """Overwrites ``tensors`` with the values of the group's first rank."""
    import torch.distributed as dist
    if not tensors:
        return
    src = dist.get_global_rank(group, 0) if group is not None else 0
    for t in tensors:
        dist.broadcast(t.data, src=src, group=group)
