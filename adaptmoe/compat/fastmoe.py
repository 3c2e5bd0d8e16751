"""FastMoE surface: ``FMoE``, ``FMoETransformerMLP``, its gates, ``DistributedGroupedDataParallel``
and ``fmoefy``, as thin adapters that build adaptmoe's typed ``MoEConfig`` / ``MoELayer``.

Legend: T tokens, D model dim, E global experts (num_expert x world_size), K top-k.

What maps how (FastMoE name -> adaptmoe):
- ``num_expert`` is per worker, as in FastMoE: E = num_expert * world_size over ``moe_group``.
- Gates compute logits with FastMoE's ``gate`` Linear (bias on by default, ``gate_bias``) and hand
  selection, capacity and losses to the core: NaiveGate -> softmax top-k renormalised over the k
  picked (the same numbers as FastMoE's softmax of the top-k logits), dropless, no loss;
  GShardGate -> the same plus GShard loss and capacity (train, eval) = ``capacity``;
  SwitchGate -> top-1, uniform jitter of +-``switch_eps`` on the logits in training, fp32 softmax,
  capacity, balance loss; NoisyGate -> Shazeer's noisy top-k with the importance+load loss, with a
  fixed noise std (``noise_std`` per logit) instead of FastMoE's learned ``w_noise``.
- Capacity follows adaptmoe's rule (k * floor(cf * ceil(T/E)) slots per expert), close to but not
  bit-equal with FastMoE's; GShard's ``random_routing`` of the second expert is not done.
- The balance loss is on the layer (``layer.get_loss()``, ``layer.l_aux``) and, as in FastMoE, on
  the gate (``layer.gate.get_loss()``).
- Expert classes are called as ``expert(d_model)``; instances that are plain Linear-act-Linear MLPs
  become batched experts with their weights copied, anything else runs per expert.
- Not supported (raise): ``slice_group``/``mp_group`` of size > 1 (use adaptmoe's ``adaptive_r``),
  ``mask``/``mask_dict``, nested (tree) inputs.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..config import ExpertConfig, GateConfig, MoEConfig
from ..layer import MoELayer
from ..moefy import copy_mlp_weights, moefy
from ._common import (ExpertList, LinearLogitsGate, broadcast_from_first, dense_parts, dist_ready, prebuilt_experts,
                      prebuilt_gate, single_rank_group, sync_gradients_fallback)

__all__ = ["FMoE", "FMoETransformerMLP", "BaseGate", "NaiveGate", "NoisyGate", "GShardGate", "SwitchGate",
           "GATES", "DistributedGroupedDataParallel", "fmoefy"]


class BaseGate(LinearLogitsGate):
    """A FastMoE gate: owns the logits projection and describes its routing as a ``GateConfig``."""

    losses: tuple[str, ...] = ("none",)

    def __init__(self, d_model: int, num_expert: int, world_size: int, top_k: int = 2, *, gate_bias: bool = True,
                 fp32: bool = False, noise_fn: Callable | None = None, capacity: tuple[float, float] | None = None):
        _check_int("d_model", d_model)
        _check_int("num_expert", num_expert)
        _check_int("world_size", world_size)
        super().__init__(d_model, num_expert * world_size, bias=gate_bias, fp32=fp32, noise_fn=noise_fn)
        self.num_expert, self.world_size, self.top_k = num_expert, world_size, top_k
        self.tot_expert = num_expert * world_size
        if capacity is not None and (len(capacity) != 2 or min(capacity) <= 0):
            raise ValueError(f"capacity must be a pair (train, eval) of factors > 0, got {capacity!r}")
        self.capacity = capacity
        self.loss: Tensor | None = None

    def gate_config(self) -> GateConfig:
        return GateConfig(kind="custom", custom_module=prebuilt_gate, custom_kwargs=(("module", self),),
                          top_k=self.top_k, capacity_factor=0.0, losses=self.losses, **self.extra_config())

    def extra_config(self) -> dict[str, Any]:
        return {}

    def capacity_factor(self, training: bool) -> float | None:
        """The per-call capacity factor, or None for the gate config's (dropless) default."""
        return None if self.capacity is None else float(self.capacity[0 if training else 1])

    def set_loss(self, loss: Tensor | None) -> None:
        self.loss = loss

    def get_loss(self, clear: bool = True) -> Tensor | None:
        loss = self.loss
        if clear:
            self.loss = None
        return loss

    @property
    def has_loss(self) -> bool:
        return self.loss is not None


class NaiveGate(BaseGate):
    """Top-k of the gate logits, softmax over the k picked; dropless; no balance loss."""

    def __init__(self, d_model, num_expert, world_size, top_k=2, gate_bias=True):
        super().__init__(d_model, num_expert, world_size, top_k, gate_bias=gate_bias)


class NoisyGate(BaseGate):
    """Noisy top-k (Shazeer et al.) with the importance+load loss; bias-free like FastMoE's.
    ``noise_std`` is the per-logit noise std in training (FastMoE learns it; it starts near 0.7)."""

    losses = ("load_importance",)

    def __init__(self, d_model, num_expert, world_size, top_k=2, gate_bias=False, noise_std: float = 0.7):
        if not noise_std > 0:
            raise ValueError(f"noise_std must be > 0 (the importance+load loss needs noise), got {noise_std!r}")
        super().__init__(d_model, num_expert, world_size, top_k, gate_bias=False)
        self.noise_std = float(noise_std)
        nn.init.zeros_(self.gate.weight)   # FastMoE starts its noisy gate at zero

    def extra_config(self) -> dict[str, Any]:
        return {"noise_std": self.noise_std * self.tot_expert}   # the core divides by E


class GShardGate(BaseGate):
    """Top-2 (``topk``) softmax with the GShard balance loss and capacity (train, eval)."""

    losses = ("gshard",)

    def __init__(self, d_model, num_expert, world_size, topk=2, capacity=(1.2, 2.4), random_routing=True,
                 gate_bias=True):
        super().__init__(d_model, num_expert, world_size, topk, gate_bias=gate_bias, capacity=capacity)
        self.random_routing = random_routing   # accepted; the second expert is always kept


class SwitchGate(BaseGate):
    """Top-1 with uniform jitter of +-``switch_eps`` on the logits (training), fp32 softmax, capacity
    (train, eval) and the Switch balance loss."""

    losses = ("gshard",)

    def __init__(self, d_model, num_expert, world_size, topk=1, switch_eps=0.1, capacity=(1.2, 2.4),
                 gate_bias=True):
        if topk != 1:
            raise ValueError(f"top_k must be 1 for SwitchGate, got {topk!r}")
        if not switch_eps >= 0:
            raise ValueError(f"switch_eps must be >= 0, got {switch_eps!r}")
        super().__init__(d_model, num_expert, world_size, 1, gate_bias=gate_bias, fp32=True, capacity=capacity)
        self.switch_eps = float(switch_eps)

    def add_noise(self, logits_TE: Tensor) -> Tensor:
        return logits_TE + (torch.rand_like(logits_TE) * 2 - 1) * self.switch_eps


GATES: dict[str, type[BaseGate]] = {"naive": NaiveGate, "noisy": NoisyGate, "gshard": GShardGate,
                                    "switch": SwitchGate}


def _check_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def _make_gate(gate, d_model: int, num_expert: int, world_size: int, top_k: int, gate_bias: bool) -> BaseGate:
    gate_cls = GATES.get(gate.lower()) if isinstance(gate, str) else gate
    if isinstance(gate_cls, type) and not issubclass(gate_cls, BaseGate):
        raise TypeError(f"gate must be a gate class from adaptmoe.compat.fastmoe ({', '.join(GATES)}), "
                        f"got {gate_cls.__name__}; for other gates use adaptmoe.MoELayer with a GateConfig")
    if not callable(gate_cls):
        raise ValueError(f"gate must be one of {list(GATES)} or a gate class from adaptmoe.compat.fastmoe, "
                         f"got {gate!r}")
    if gate_cls is SwitchGate and top_k != 1:
        raise ValueError(f"top_k must be 1 with SwitchGate, got {top_k!r}")
    instance = gate_cls(d_model, num_expert, world_size, top_k, gate_bias=gate_bias)
    if not isinstance(instance, BaseGate):
        names = ", ".join(c.__name__ for c in GATES.values())
        raise TypeError(f"gate must build an adaptmoe.compat.fastmoe gate ({names}), got {type(instance).__name__}; "
                        "for other gates use adaptmoe.MoELayer with a GateConfig")
    return instance


def _expert_group(world_size: int, moe_group):
    _check_int("world_size", world_size)
    if not dist_ready():
        if world_size != 1 or moe_group is not None:
            raise ValueError(f"world_size={world_size} / moe_group need torch.distributed initialized "
                             "(launch with torchrun and call init_process_group)")
        return None
    if world_size == 1:
        return single_rank_group()   # FastMoE data parallel: every rank holds all experts
    import torch.distributed as dist
    size = dist.get_world_size(moe_group)
    if size != world_size:
        raise ValueError(f"world_size must equal the size of moe_group (or of the default group), {size}; "
                         f"got {world_size}")
    return moe_group


def _expert_setup(expert, d_model: int, num_expert: int) -> tuple[ExpertConfig, list | None, int]:
    """(expert config, dense weights to copy or None, local expert count) for FastMoE's ``expert``."""
    if isinstance(expert, (list, tuple)):
        classes = list(expert)
    elif callable(expert):
        classes = [expert] * num_expert
    else:
        raise TypeError(f"expert must be a module class called as expert(d_model), or a list of them, got {expert!r}")
    instances = [cls(d_model) for cls in classes]
    if not instances or not all(isinstance(m, nn.Module) for m in instances):
        raise TypeError("expert must build torch.nn.Module instances (called as expert(d_model))")
    parts = dense_parts(instances)
    if parts is not None:
        return parts[0].expert_config(), parts, len(instances)
    bank = ExpertList(instances)
    config = ExpertConfig(kind="custom", custom_module=prebuilt_experts, custom_kwargs=(("module", bank),))
    return config, None, len(instances)


class FMoE(nn.Module):
    """FastMoE's general MoE layer over ``num_expert`` experts per worker (``expert`` class or list)."""

    def __init__(self, num_expert=32, d_model=1024, world_size=1, mp_group=None, slice_group=None, moe_group=None,
                 top_k=2, gate=NaiveGate, expert=None, gate_hook=None, mask=None, mask_dict=None, gate_bias=True,
                 *, expert_config: ExpertConfig | None = None):
        super().__init__()
        _check_int("num_expert", num_expert)
        _check_int("d_model", d_model)
        _reject_unsupported(mp_group, slice_group, mask, mask_dict)
        group = _expert_group(world_size, moe_group)
        parts = None
        if expert_config is None:
            if expert is None:
                raise TypeError("expert must be a module class called as expert(d_model), or a list of them; got None")
            expert_config, parts, num_expert = _expert_setup(expert, d_model, num_expert)
        gate_module = _make_gate(gate, d_model, num_expert, world_size, top_k, gate_bias)
        self.num_expert, self.d_model, self.world_size, self.top_k = num_expert, d_model, world_size, top_k
        self.gate_hook, self.moe_group = gate_hook, moe_group
        self.layer = MoELayer(MoEConfig(model_dim=d_model, num_experts=num_expert * world_size,
                                        gate=gate_module.gate_config(), experts=expert_config), group=group)
        if parts is not None:
            copy_mlp_weights(self.layer.experts, parts)

    @property
    def gate(self) -> BaseGate:
        return self.layer.gates[0]

    @property
    def experts(self) -> nn.Module:
        return self.layer.experts

    @property
    def l_aux(self) -> Tensor | None:
        return self.layer.l_aux

    def get_loss(self, clear: bool = True) -> Tensor | None:
        """The balance loss of the last forward (unscaled), as FastMoE's ``gate.get_loss()``."""
        return self.gate.get_loss(clear)

    def mark_parallel_comm(self, expert_dp_comm: str = "none") -> None:
        """Tags parameters the way FastMoE does (``dp_comm``); adaptmoe itself reads ``_adaptmoe_expert``."""
        for p in self.layer.experts.parameters():
            p.dp_comm = expert_dp_comm
        for p in self.gate.parameters():
            p.dp_comm = "gate"

    def forward(self, moe_inp: Tensor, **knobs) -> Tensor:
        """``moe_inp [..., d_model]``; keyword knobs go to ``MoELayer.forward`` (top_k, capacity_factor, ...)."""
        if not isinstance(moe_inp, Tensor):
            raise TypeError(f"moe_inp must be a tensor [tokens, d_model], got {type(moe_inp).__name__} "
                            "(nested inputs are not supported)")
        if knobs.get("capacity_factor") is None:
            knobs["capacity_factor"] = self.gate.capacity_factor(self.training)
        y = self.layer(moe_inp, **knobs)
        if self.gate_hook is not None:
            routing = self.layer.last_routing
            self.gate_hook(routing.indices_TK, routing.weights_TK, None)
        self.gate.set_loss(self.layer.l_aux)
        return y


def _reject_unsupported(mp_group, slice_group, mask, mask_dict) -> None:
    for name, group in (("mp_group", mp_group), ("slice_group", slice_group)):
        if group is not None and group.size() > 1:
            raise ValueError(f"{name} with more than one rank is not supported; adaptmoe shards experts "
                             "per call instead (MoELayer adaptive_r)")
    if mask is not None or mask_dict is not None:
        raise ValueError("mask / mask_dict are not supported; drop masked tokens before the layer")


class FMoETransformerMLP(FMoE):
    """FastMoE's MoE MLP: ``num_expert`` experts of ``activation(x W1 + b1) W2 + b2`` per worker."""

    def __init__(self, num_expert=32, d_model=1024, d_hidden=4096, activation=torch.nn.GELU(), expert_dp_comm="none",
                 expert_rank=0, **kwargs):
        _check_int("d_hidden", d_hidden)
        if not callable(activation):
            raise TypeError(f"activation must be a callable or a module, got {activation!r}")
        config = ExpertConfig(kind="ffn", hidden_size=d_hidden, activation=activation, has_fc1_bias=True,
                              has_fc2_bias=True)
        super().__init__(num_expert=num_expert, d_model=d_model, expert_config=config, **kwargs)
        self.d_hidden = d_hidden
        self.mark_parallel_comm(expert_dp_comm)

    def forward(self, inp: Tensor, **knobs) -> Tensor:
        shape = inp.shape
        return super().forward(inp.reshape(-1, self.d_model), **knobs).reshape(shape)


def fmoefy(model: nn.Module, num_experts: int | None = None, distributed_experts: bool = True,
           hidden_hidden_size: int | None = None, top_k: int | None = None, gate=None, **moefy_kwargs) -> nn.Module:
    """FastMoE's ``fmoefy`` for any torch model: MLP blocks become MoE blocks with ``num_experts``
    experts per worker (times the world size when ``distributed_experts``), top-2 dropless softmax by
    default. Experts start from the dense weights only with ``upcycle=True`` (FastMoE starts fresh)."""
    if num_experts is None:
        raise ValueError("num_experts must be given (experts per worker)")
    if hidden_hidden_size is not None:
        raise ValueError("hidden_hidden_size is not supported: experts keep the dense block's hidden size")
    world = 1
    if distributed_experts and dist_ready():
        import torch.distributed as dist
        world = dist.get_world_size()
    if isinstance(gate, type) or isinstance(gate, BaseGate):
        raise TypeError("fmoefy's gate must be a gate kind name ('softmax', 'sigmoid', ...) or a GateConfig: every "
                        f"replaced block needs its own gate, so a FastMoE gate class ({gate!r}) works with FMoE only")
    gate_config = GateConfig(kind="softmax", top_k=2 if top_k is None else top_k, capacity_factor=0.0,
                             losses=("gshard",)) if gate is None else gate
    moefy_kwargs.setdefault("upcycle", False)
    return moefy(model, num_experts=num_experts * world, gate=gate_config, top_k=top_k, **moefy_kwargs)


class DistributedGroupedDataParallel(nn.Module):
    """FastMoE's DDP replacement: call ``allreduce_params()`` after ``backward()``.

    Built on ``adaptmoe.grad_sync.sync_gradients``: non-expert gradients are averaged over
    ``dp_group`` (default: all ranks); expert gradients are summed over ``expert_dp_group`` and
    divided by the size of ``dp_group``, so every gradient is that of the mean per-rank loss.
    ``expert_dp_group`` defaults to all ranks when every MoE layer keeps all its experts on each
    rank (``world_size=1``) and to ``'none'`` (no reduction: each expert's gradient already holds
    all ranks' tokens) when the layers spread experts over all ranks. ``need_sync`` broadcasts
    parameters from the first rank of each group at construction.
    """

    GROUP_KEYS = ("dp_group", "expert_dp_group", "world_group", "gate_group", "moe_group")

    def __init__(self, module: nn.Module, auto_allreduce: bool = False, need_sync: bool = True, **groups):
        super().__init__()
        if auto_allreduce:
            raise ValueError("auto_allreduce=True is not supported (FastMoE neither); call allreduce_params()")
        unknown = sorted(set(groups) - set(self.GROUP_KEYS))
        if unknown:
            raise ValueError(f"unknown group argument(s) {unknown}; known: {list(self.GROUP_KEYS)}")
        if not dist_ready():
            raise ValueError("DistributedGroupedDataParallel needs torch.distributed initialized")
        self.module = module
        self.dp_group = groups.get("dp_group")
        self.expert_dp_group = groups.get("expert_dp_group", _default_expert_dp_group(module, self.dp_group))
        if need_sync:
            with torch.no_grad():
                self._sync_params()

    def _sync_params(self) -> None:
        dense, expert = [], []
        for p in self.module.parameters():
            (expert if getattr(p, "_adaptmoe_expert", False) else dense).append(p.data)
        broadcast_from_first(dense, self.dp_group)
        if self.expert_dp_group != "none":
            broadcast_from_first(expert, self.expert_dp_group)

    def allreduce_params(self, no_scale: bool = False, reduce_after: bool = False, fp32_allreduce: bool = False):
        """Averages gradients with ``adaptmoe.grad_sync.sync_gradients`` (sums with ``no_scale``).
        ``reduce_after`` and ``fp32_allreduce`` are accepted for FastMoE code; gradients are reduced
        in their own dtype."""
        try:
            from ..grad_sync import sync_gradients
        except ImportError:
            sync_gradients = sync_gradients_fallback
        import torch.distributed as dist
        expert_group = None
        if self.expert_dp_group != "none":
            expert_group = self.expert_dp_group if self.expert_dp_group is not None else dist.group.WORLD
        sync_gradients(self.module, dp_group=self.dp_group, expert_dp_group=expert_group, average=not no_scale)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def _default_expert_dp_group(module: nn.Module, dp_group):
    import torch.distributed as dist
    spans = {layer.layout.world_size for layer in module.modules() if isinstance(layer, MoELayer)}
    if not spans or spans == {1}:
        return dp_group
    if spans == {dist.get_world_size(dp_group)}:
        return "none"
    raise ValueError(f"MoE layers spread experts over {sorted(spans)} ranks; pass expert_dp_group (the ranks "
                     "holding the same experts) or 'none'")
