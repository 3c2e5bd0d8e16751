"""Gradient synchronisation for models that mix replicated and expert (sharded) parameters.

MoELayer tags every expert parameter with ``param._adaptmoe_expert = True``. Each expert shard
already receives, through the layer's all-to-all / reduce-scatter backward, the gradient of
the tokens of its whole expert-parallel (EP) group. What is left:
- replicated (non-expert) parameters: all-reduce over the data-parallel group ``dp_group``
  (all ranks that hold a replica, usually WORLD);
- expert parameters: all-reduce over their expert-data-parallel group ``expert_dp_group``
  (the ranks holding the same shard, e.g. the same local rank on every node when EP is
  inside a node and DP across nodes); none when every shard lives once.
With ``average=True`` both are divided by the size of ``dp_group``: the result is the gradient
of the mean of the per-rank losses, for expert and non-expert parameters alike.

Plain loop::

    loss.backward()
    sync_gradients(model, dp_group=world, expert_dp_group=env.data_group)
    optimizer.step()

DistributedDataParallel recipe: keep DDP away from expert parameters, let it average the
others, and sync the experts yourself after backward::

    ddp_ignore_expert_params(model)                    # before wrapping
    model = DistributedDataParallel(model, process_group=world)
    loss.backward()
    sync_gradients(model, dp_group=world, expert_dp_group=env.data_group, include_non_expert=False)
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["is_expert_param", "expert_parameters", "non_expert_parameters", "sync_gradients",
           "ddp_ignore_expert_params"]


def is_expert_param(param: torch.Tensor) -> bool:
    return bool(getattr(param, "_adaptmoe_expert", False) or getattr(param, "_tutel_expert", False))


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if is_expert_param(p)]


def non_expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if not is_expert_param(p)]


def _all_reduce_grads(params: Iterable[nn.Parameter], group: Any, scale: float) -> None:
    """One all-reduce per dtype over the flattened gradients (a missing grad counts as zero)."""
    by_dtype: dict[tuple, list[nn.Parameter]] = {}
    for p in params:
        if p.requires_grad:
            by_dtype.setdefault((p.dtype, p.device), []).append(p)
    for plist in by_dtype.values():
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in plist]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=group)
        if scale != 1.0:
            flat.mul_(scale)
        offset = 0
        for p in plist:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone()
            offset += n


def sync_gradients(model: nn.Module, dp_group: Any = None, expert_dp_group: Any = None, *,
                   include_non_expert: bool = True, average: bool = True) -> None:
    """All-reduce non-expert grads over ``dp_group`` (None: WORLD) and expert grads over
    ``expert_dp_group`` (None: no expert all-reduce). See the module docstring."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    scale = 1.0 / dist.get_world_size(dp_group) if average else 1.0
    if include_non_expert:
        _all_reduce_grads(non_expert_parameters(model), dp_group, scale)
    experts = expert_parameters(model)
    if expert_dp_group is not None and dist.get_world_size(expert_dp_group) > 1:
        _all_reduce_grads(experts, expert_dp_group, scale)
    elif scale != 1.0:
        for p in experts:
            if p.grad is not None:
                p.grad.mul_(scale)


def ddp_ignore_expert_params(model: nn.Module) -> list[str]:
    """Tell DistributedDataParallel to leave expert parameters alone (call before wrapping)."""
    names = [name for name, p in model.named_parameters() if is_expert_param(p)]
    existing = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
    model._ddp_params_and_buffers_to_ignore = sorted(set(existing) | set(names))
    return names
