"""ColossalAI MoE surface (the legacy ``colossalai.nn.layer.moe`` API): routers, noise generators,
``Experts``, ``MoeLayer``, ``MoeLoss``, ``moe_set_seed`` and MoE parallel groups, as thin adapters
that build adaptmoe's typed ``MoEConfig`` / ``MoELayer``.

Legend: T tokens, D dim_model, E num_experts, K top-k (1 or 2), C capacity.

What maps how:
- Routers select by softmax of fp32 gate logits; noise generators perturb the logits in training
  (NormalNoiseGenerator: + N(0, 1/E^2); UniformNoiseGenerator: x U(1-eps, 1+eps)). Top-2 weights are
  the raw probabilities (not renormalised), as in ColossalAI.
- Capacity is ColossalAI's: floor(k * cf * T / E), rounded up to even, at least ``min_capacity``;
  adaptmoe gets it as a per-call capacity factor that yields exactly that many slots (rounded up to
  a multiple of k). ``drop_tks=False`` makes evaluation dropless. Overflow keeps first choices
  before second choices, in token order (``select_policy='first'``).
- The balance loss is the core's GShard loss (E * sum_e mean prob x top-1 fraction); for top-2
  ColossalAI counts both choices, so values differ there. Each training forward hands its loss to
  ``MOE_CONTEXT`` and ``MoeLoss`` adds ``aux_weight`` x the pending losses, then clears them.
- ``MOE_CONTEXT.setup(seed, moe_model_parallel_size)`` (or ``create_moe_groups``) makes the expert-
  parallel groups; ``Experts`` places ``num_experts / ep_size`` experts on each rank, seeded per rank
  (``moe_set_seed``). An ``Experts`` object may be shared by several ``MoeLayer`` (WideNet).
"""
from __future__ import annotations

import dataclasses
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..config import ExpertConfig, GateConfig, MoEConfig
from ..experts import build_experts
from ..layer import MoELayer
from ..moefy import copy_mlp_weights
from ._common import ExpertList, LinearLogitsGate, dense_parts, dist_ready, prebuilt_experts, prebuilt_gate

__all__ = ["NormalNoiseGenerator", "UniformNoiseGenerator", "Top1Router", "Top2Router", "Experts", "MoeLayer",
           "MoeLoss", "moe_set_seed", "MOE_CONTEXT", "moe_env", "MoeGroups", "create_moe_groups"]


class NormalNoiseGenerator:
    """Adds N(0, 1/E^2) noise to the logits."""

    def __init__(self, num_experts: int):
        _check_int("num_experts", num_experts)
        self.std = 1.0 / num_experts ** 2

    def __call__(self, inputs: Tensor) -> Tensor:
        return inputs + torch.randn_like(inputs) * self.std


class UniformNoiseGenerator:
    """Multiplies the logits by U(1 - eps, 1 + eps) (mesh-tensorflow style jitter)."""

    def __init__(self, eps: float = 1e-2):
        if not 0 <= eps < 1:
            raise ValueError(f"eps must be in [0, 1), got {eps!r}")
        self.eps = eps

    def __call__(self, inputs: Tensor) -> Tensor:
        return inputs * (1 - self.eps + 2 * self.eps * torch.rand_like(inputs))


def _check_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


class _Router(nn.Module):
    """Top-k routing settings; the gate weight lives in ``MoeLayer`` (as in ColossalAI)."""

    def __init__(self, k: int, capacity_factor_train: float, capacity_factor_eval: float, min_capacity: int,
                 noisy_func: Callable | None, drop_tks: bool):
        super().__init__()
        factors = (("capacity_factor_train", capacity_factor_train), ("capacity_factor_eval", capacity_factor_eval))
        for name, cf in factors:
            if isinstance(cf, bool) or not isinstance(cf, (int, float)) or not cf > 0:
                raise ValueError(f"{name} must be a number > 0, got {cf!r}")
        _check_int("min_capacity", min_capacity, minimum=0)
        if noisy_func is not None and not callable(noisy_func):
            raise TypeError(f"noisy_func must be a callable (e.g. NormalNoiseGenerator), got {noisy_func!r}")
        self.k_value = k
        self.capacity_factor_train = float(capacity_factor_train)
        self.capacity_factor_eval = float(capacity_factor_eval)
        self.min_capacity, self.noisy_func, self.drop_tks = min_capacity, noisy_func, drop_tks

    def get_capacity(self, num_tokens: int, num_experts: int) -> int:
        """ColossalAI's slots per expert for this call."""
        cf = self.capacity_factor_train if self.training else self.capacity_factor_eval
        capacity = math.floor(self.k_value * cf * num_tokens / num_experts)
        capacity += capacity % 2
        return max(capacity, self.min_capacity)

    def capacity_factor(self, num_tokens: int, num_experts: int) -> float:
        """The adaptmoe capacity factor giving ``get_capacity`` slots (0: dropless)."""
        if not self.training and not self.drop_tks:
            return 0.0
        per_choice = -(-self.get_capacity(num_tokens, num_experts) // self.k_value)
        tokens_per_expert = max(math.ceil(num_tokens / num_experts), 1)
        return (per_choice + 0.5) / tokens_per_expert   # floor(cf * ceil(T/E)) == per_choice

    def gate_config(self) -> GateConfig:
        return GateConfig(kind="custom", top_k=self.k_value, capacity_factor=1.0, normalize_topk=False,
                          losses=("gshard",))


class Top1Router(_Router):
    def __init__(self, capacity_factor_train: float = 1.25, capacity_factor_eval: float = 2.0, min_capacity: int = 4,
                 select_policy: str = "first", noisy_func: Callable | None = None, drop_tks: bool = True):
        if select_policy != "first":
            raise ValueError(f"select_policy must be one of ['first'], got {select_policy!r}")
        super().__init__(1, capacity_factor_train, capacity_factor_eval, min_capacity, noisy_func, drop_tks)
        self.select_policy = select_policy


class Top2Router(_Router):
    def __init__(self, capacity_factor_train: float = 1.25, capacity_factor_eval: float = 2.0, min_capacity: int = 4,
                 noisy_func: Callable | None = None, drop_tks: bool = True):
        super().__init__(2, capacity_factor_train, capacity_factor_eval, min_capacity, noisy_func, drop_tks)


@dataclass(frozen=True)
class MoeGroups:
    """Expert-parallel (``ep``) and expert-data-parallel (``dp``) groups of this rank."""

    ep_size: int
    dp_size: int
    ep_rank: int
    ep_group: Any = None
    dp_group: Any = None


def create_moe_groups(moe_model_parallel_size: int) -> MoeGroups:
    """Consecutive ranks form an expert-parallel group of ``moe_model_parallel_size``; ranks at the
    same position in different groups form the expert-data-parallel group (collective call)."""
    _check_int("moe_model_parallel_size", moe_model_parallel_size)
    if not dist_ready():
        if moe_model_parallel_size != 1:
            raise ValueError(f"moe_model_parallel_size={moe_model_parallel_size} needs torch.distributed initialized")
        return MoeGroups(1, 1, 0)
    import torch.distributed as dist
    world, rank, size = dist.get_world_size(), dist.get_rank(), moe_model_parallel_size
    if world % size:
        raise ValueError(f"moe_model_parallel_size must divide the world size {world}, got {size}")
    ep_group = dp_group = None
    for start in range(0, world, size):
        group = dist.new_group(list(range(start, start + size)))
        ep_group = group if start <= rank < start + size else ep_group
    for offset in range(size):
        group = dist.new_group(list(range(offset, world, size)))
        dp_group = group if rank % size == offset else dp_group
    return MoeGroups(size, world // size, rank % size, ep_group, dp_group)


class MoeContext:
    """ColossalAI's MoE context: groups, the seed experts start from, and pending aux losses."""

    def __init__(self):
        self.groups = MoeGroups(1, 1, 0)
        self.seed: int | None = None
        self._losses: list[Tensor] = []

    def setup(self, seed: int | None = None, moe_model_parallel_size: int = 1) -> None:
        self.groups = create_moe_groups(moe_model_parallel_size)
        if seed is not None:
            moe_set_seed(seed)

    def get_info(self, num_experts: int) -> tuple[int, MoeGroups]:
        _check_int("num_experts", num_experts)
        if num_experts % self.groups.ep_size:
            raise ValueError(f"num_experts must be a multiple of the MoE model-parallel size {self.groups.ep_size}, "
                             f"got {num_experts}")
        return num_experts // self.groups.ep_size, self.groups

    def add_loss(self, loss: Tensor) -> None:
        self._losses.append(loss)

    def get_loss(self) -> Tensor:
        return torch.stack([l.float() for l in self._losses]).sum() if self._losses else torch.zeros(())

    def reset_loss(self) -> None:
        self._losses = []

    def pop_loss(self) -> Tensor:
        loss = self.get_loss()
        self.reset_loss()
        return loss


MOE_CONTEXT = MoeContext()
moe_env = MOE_CONTEXT   # colossalai.global_variables.moe_env


def moe_set_seed(seed: int) -> None:
    """Seeds this process with ``seed`` (shared layers equal on all ranks); experts built afterwards
    use ``seed + ep_rank``, so each rank of an expert-parallel group starts different experts."""
    _check_int("seed", seed, minimum=0)
    MOE_CONTEXT.seed = seed
    torch.manual_seed(seed)


@contextmanager
def _expert_seed():
    if MOE_CONTEXT.seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(MOE_CONTEXT.seed + 1 + MOE_CONTEXT.groups.ep_rank)
        yield


class Experts(nn.Module):
    """``num_experts / ep_size`` instances of ``expert_cls(**expert_args)`` on this rank. Plain MLP
    instances are stored as batched experts (weights copied); others run one by one."""

    def __init__(self, expert_cls: type | None = None, num_experts: int | None = None, **expert_args):
        super().__init__()
        expert_cls = expert_args.pop("expert", None) if expert_cls is None else expert_cls
        if not callable(expert_cls):
            raise TypeError(f"expert_cls must be a module class, got {expert_cls!r}")
        self.num_local_experts, _ = MOE_CONTEXT.get_info(num_experts)
        self.num_total_experts = num_experts
        with _expert_seed():
            instances = [expert_cls(**expert_args) for _ in range(self.num_local_experts)]
        parts = dense_parts(instances)
        if parts is None:
            self.bank = ExpertList(instances)
        else:
            self.bank = build_experts(parts[0].expert_config(), parts[0].model_dim, len(instances))
            copy_mlp_weights(self.bank, parts)

    def forward(self, x_eCD: Tensor) -> Tensor:
        return self.bank(x_eCD)


class MoeLayer(nn.Module):
    """``MoeLayer(dim_model, num_experts, router, experts)``: forward(x [..., D]) -> [..., D]."""

    def __init__(self, dim_model: int, num_experts: int, router: _Router, experts: Experts):
        super().__init__()
        _check_int("dim_model", dim_model)
        if not isinstance(router, _Router):
            raise TypeError(f"router must be a Top1Router or Top2Router, got {type(router).__name__}")
        if not isinstance(experts, Experts):
            raise TypeError(f"experts must be an adaptmoe.compat.colossal.Experts, got {type(experts).__name__}")
        if experts.num_total_experts != num_experts:
            raise ValueError(f"num_experts must equal the Experts' count {experts.num_total_experts}, "
                             f"got {num_experts}")
        self.d_model, self.num_experts, self.router = dim_model, num_experts, router
        gate = LinearLogitsGate(dim_model, num_experts, fp32=True, noise_fn=router.noisy_func)
        nn.init.trunc_normal_(gate.gate.weight, std=math.sqrt(0.1 / dim_model))
        gate_config = dataclasses.replace(router.gate_config(), custom_module=prebuilt_gate,
                                          custom_kwargs=(("module", gate),))
        expert_config = ExpertConfig(kind="custom", custom_module=prebuilt_experts,
                                     custom_kwargs=(("module", experts),))
        self.layer = MoELayer(MoEConfig(model_dim=dim_model, num_experts=num_experts, gate=gate_config,
                                        experts=expert_config), group=MOE_CONTEXT.groups.ep_group)

    @property
    def gate_weight(self) -> Tensor:
        return self.layer.gates[0].gate.weight

    @property
    def l_aux(self) -> Tensor | None:
        return self.layer.l_aux

    def forward(self, inputs: Tensor, **knobs) -> Tensor:
        if inputs.shape[-1] != self.d_model:
            raise ValueError(f"inputs' last dim must be dim_model={self.d_model}, got {tuple(inputs.shape)}")
        if knobs.get("capacity_factor") is None:
            tokens = inputs.numel() // self.d_model
            knobs["capacity_factor"] = self.router.capacity_factor(tokens, self.num_experts)
        y = self.layer(inputs, **knobs)
        if self.training and torch.is_grad_enabled():
            MOE_CONTEXT.add_loss(self.layer.l_aux)
        return y


class MoeLoss(nn.Module):
    """``loss_fn(*args, **kwargs)(*inputs) + aux_weight * (aux losses of the forwards since the last call)``."""

    def __init__(self, aux_weight: float, loss_fn, *args, **kwargs):
        super().__init__()
        if isinstance(aux_weight, bool) or not isinstance(aux_weight, (int, float)) or aux_weight < 0:
            raise ValueError(f"aux_weight must be a number >= 0, got {aux_weight!r}")
        if isinstance(loss_fn, type):
            loss_fn = loss_fn(*args, **kwargs)
        elif args or kwargs:
            raise TypeError("extra arguments are for a loss_fn class; loss_fn is already an instance")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be a loss class or callable, got {loss_fn!r}")
        self.loss_fn, self.aux_weight = loss_fn, float(aux_weight)

    def forward(self, *args) -> Tensor:
        main = self.loss_fn(*args)
        return main + self.aux_weight * MOE_CONTEXT.pop_loss().to(main.device)
