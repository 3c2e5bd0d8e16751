"""Worker bodies of the multi-process compat tests (run in each rank by tests/multiproc/harness.run_world)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from adaptmoe.compat._common import sync_gradients_fallback
from adaptmoe.compat.colossal import create_moe_groups
from adaptmoe.compat.fastmoe import DistributedGroupedDataParallel, FMoETransformerMLP


def _gather(t):
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return out


def _step(module, rank):
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(100 + rank))
    module(x).pow(2).sum().backward()


def data_parallel_case(rank, world):
    """FMoE(world_size=1): all experts on every rank; the wrapper syncs weights and averages all grads."""
    torch.manual_seed(rank)                      # different on purpose: need_sync must fix it
    fm = FMoETransformerMLP(num_expert=2, d_model=8, d_hidden=16, top_k=2)
    model = DistributedGroupedDataParallel(fm)
    flat = torch.cat([p.detach().flatten() for p in fm.parameters()])
    assert all(torch.equal(flat, other) for other in _gather(flat)), "parameters not synced from rank 0"
    _step(model, rank)
    local = {n: p.grad.clone() for n, p in fm.named_parameters()}
    model.allreduce_params()
    for name, p in fm.named_parameters():
        mean = torch.stack(_gather(local[name])).mean(0)
        torch.testing.assert_close(p.grad, mean, msg=lambda m: f"rank {rank} grad of {name}: {m}")
    for name, p in fm.named_parameters():   # the fallback used when adaptmoe.grad_sync is missing
        p.grad = local[name].clone()
    sync_gradients_fallback(fm, expert_dp_group=dist.group.WORLD)
    for name, p in fm.named_parameters():
        torch.testing.assert_close(p.grad, torch.stack(_gather(local[name])).mean(0))


def expert_parallel_case(rank, world):
    """FMoE(world_size=W): one expert per rank; gate grads averaged; an expert's grad already holds
    every rank's tokens, so it is only divided by W (the gradient of the mean per-rank loss)."""
    torch.manual_seed(0)
    fm = FMoETransformerMLP(num_expert=1, d_model=8, d_hidden=16, top_k=2, world_size=world)
    model = DistributedGroupedDataParallel(fm)
    assert model.expert_dp_group == "none" and fm.layer.num_local_experts == 1
    _step(model, rank)
    expert_grad = fm.layer.experts.batched_fc1_w.grad.clone()
    gate_grad = fm.gate.wg.weight.grad.clone()
    model.allreduce_params()
    torch.testing.assert_close(fm.layer.experts.batched_fc1_w.grad, expert_grad / world)
    torch.testing.assert_close(fm.gate.wg.weight.grad, torch.stack(_gather(gate_grad)).mean(0))


def groups_case(rank, world):
    g = create_moe_groups(world)
    assert (g.ep_size, g.dp_size, g.ep_rank) == (world, 1, rank)
    assert dist.get_world_size(g.ep_group) == world and dist.get_world_size(g.dp_group) == 1
    g = create_moe_groups(1)
    assert (g.ep_size, g.dp_size, g.ep_rank) == (1, world, 0)
    assert dist.get_world_size(g.ep_group) == 1 and dist.get_world_size(g.dp_group) == world


def all_cases(rank, world):
    data_parallel_case(rank, world)
    groups_case(rank, world)
    expert_parallel_case(rank, world)
