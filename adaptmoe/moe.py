"""Tutel-compatible surface: ``moe_layer(gate_type=..., model_dim=..., experts=...)``.

A thin adapter: it reads Tutel's dicts (copying, never popping), reports unknown keys by name,
and builds the typed ``MoEConfig`` / ``MoELayer``. Differences from Tutel, all deliberate:
per-call knobs never stick to the layer; ``capacity_factor=0`` / ``top_k`` given per call are
honoured (Tutel's ``x or default`` drops 0); ``k`` larger than the expert count is an error
instead of a silent clamp; no environment variable changes behaviour.
"""
from __future__ import annotations

import re
import warnings
from typing import Any, Callable

import torch
from torch import Tensor

from .config import ExpertConfig, GateConfig, MoEConfig
from .layer import MoELayer
from .routing import build_routing
from .topology import group_size_and_rank, split_experts, valid_adaptive_rs

GATE_TYPES = {"top": "softmax", "cosine_top": "cosine", "sigmoid_top": "sigmoid", "sinkmoid": "sinkmoid",
              "custom": "custom"}
GATE_KEYS = ("type", "k", "capacity_factor", "gate_noise", "fp32_gate", "proj_dim", "init_t", "module")
FFN_KEYS = ("type", "count_per_node", "num_experts_per_device", "hidden_size_per_expert", "activation_fn",
            "activation_fn_with_self", "output_dim", "has_fc1_bias", "has_fc2_bias")
EXPERT_TYPES = {"ffn": "ffn", "llama_ffn": "gated_ffn", "gated_ffn": "gated_ffn", "custom": "custom"}


def _reject_unknown(what: str, given: dict, known: tuple) -> None:
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ValueError(f"unknown {what} key(s) {unknown}; known keys: {list(known)}")


def gate_config_from_dict(gate: dict | str, *, normalize_gate: bool, batch_prioritized: bool,
                          is_gshard_loss: bool) -> GateConfig:
    if isinstance(gate, str):
        match = re.fullmatch(r"Top(\d+)Gate", gate)
        if not match:
            raise ValueError(f"gate_type string must look like 'Top<k>Gate', got {gate!r}")
        warnings.warn("gate_type as a string is deprecated; pass {'type': 'top', 'k': k}", DeprecationWarning)
        gate = {"type": "top", "k": int(match.group(1))}
    if not isinstance(gate, dict):
        raise TypeError(f"gate_type must be a dict, a list of dicts or 'Top<k>Gate', got {type(gate).__name__}")
    kind = gate.get("type")
    if kind not in GATE_TYPES:
        raise ValueError(f"gate type must be one of {list(GATE_TYPES)}, got {kind!r}")
    custom_kwargs: tuple = ()
    if kind == "custom":
        if "module" not in gate:
            raise ValueError("gate type 'custom' needs 'module' (a torch.nn.Module class)")
        custom_kwargs = tuple((key, value) for key, value in gate.items() if key not in ("type", "module",
                                                                                           "capacity_factor", "gate_noise"))
    else:
        _reject_unknown(f"gate_type (type {kind!r})", gate, GATE_KEYS)
    noise = float(gate.get("gate_noise", 0.0))
    return GateConfig(
        kind=GATE_TYPES[kind], top_k=gate.get("k", 1), capacity_factor=gate.get("capacity_factor", 1.0),
        fp32=bool(gate.get("fp32_gate", False)), noise_std=noise, normalize_topk=normalize_gate,
        batch_prioritized=batch_prioritized, losses=("gshard",) if is_gshard_loss else ("load_importance",),
        cosine_proj_dim=gate.get("proj_dim", 256), cosine_init_t=gate.get("init_t", 0.5),
        custom_module=gate.get("module"), custom_kwargs=custom_kwargs)


def global_expert_count(num_experts_per_device: float, world_size: int) -> int:
    """n>0: n experts per rank; n<0: -n ranks share one expert; 0<n<1 (e.g. 0.5): 1/n ranks share one."""
    n = num_experts_per_device
    if isinstance(n, float) and 0 < n < 1:
        n = -round(1 / n)   # Tutel's formula maps 0.5 to "not sharded" and then crashes
    if isinstance(n, bool) or n == 0 or (isinstance(n, float) and not n.is_integer()):
        raise ValueError(f"num_experts_per_device must be a non-zero integer (negative -n: n ranks share one "
                         f"expert) or 1/n, got {num_experts_per_device!r}")
    n = int(n)
    if n > 0:
        return n * world_size
    if world_size % -n:
        raise ValueError(f"num_experts_per_device={n} needs the group size ({world_size}) divisible by {-n}")
    return world_size // -n


def expert_config_from_dict(experts: dict) -> tuple[ExpertConfig, float]:
    if not isinstance(experts, dict):
        raise TypeError(f"experts must be a dict, got {type(experts).__name__}")
    kind = experts.get("type")
    if kind not in EXPERT_TYPES:
        raise ValueError(f"experts type must be one of {list(EXPERT_TYPES)}, got {kind!r}")
    per_device = experts.get("num_experts_per_device", experts.get("count_per_node", 1))
    if kind == "custom":
        if "module" not in experts:
            raise ValueError("experts type 'custom' needs 'module' (a torch.nn.Module class)")
        extra = {k: v for k, v in experts.items() if k not in ("type", "module", "count_per_node",
                                                              "num_experts_per_device")}
        shim_kwargs = (("tutel_module", experts["module"]), ("tutel_kwargs", tuple(extra.items())))
        return ExpertConfig(kind="custom", custom_module=TutelCustomExpert, custom_kwargs=shim_kwargs), per_device
    _reject_unknown(f"experts (type {kind!r})", experts, FFN_KEYS)
    if "hidden_size_per_expert" not in experts:
        raise ValueError("experts dict needs 'hidden_size_per_expert'")
    activation = _activation_from_dict(experts, default="relu" if kind == "ffn" else "silu")
    return ExpertConfig(kind=EXPERT_TYPES[kind], hidden_size=experts["hidden_size_per_expert"], activation=activation,
                        has_fc1_bias=experts.get("has_fc1_bias"), has_fc2_bias=experts.get("has_fc2_bias"),
                        output_dim=experts.get("output_dim")), per_device


def _activation_from_dict(experts: dict, default: str):
    fn, fn_with_self = experts.get("activation_fn"), experts.get("activation_fn_with_self")
    if fn is not None and fn_with_self is not None:
        raise ValueError("give only one of activation_fn and activation_fn_with_self")
    if fn_with_self is not None:
        # The expert module is passed as None: our built-in experts carry no per-call state.
        return lambda x: fn_with_self(x, None)
    return fn if fn is not None else default


class TutelCustomExpert(torch.nn.Module):
    """Runs a Tutel-style custom expert (constructor gets num_experts_per_device, forward(x, ctx))."""

    def __init__(self, model_dim: int, num_local_experts: int, sharded_count: int, tutel_module, tutel_kwargs=()):
        super().__init__()
        self.inner = tutel_module(model_dim=model_dim, num_experts_per_device=num_local_experts,
                                  sharded_count=sharded_count, **dict(tutel_kwargs))
        object.__setattr__(self, "ctx", None)   # the layer, set by TutelMoELayer

    def forward(self, x_eCD: Tensor) -> Tensor:
        return self.inner(x_eCD, self.ctx)


def parse_parallel_type(parallel_type: str, sharded_count: int) -> int | str:
    if not isinstance(parallel_type, str):
        raise TypeError(f"parallel_type must be a string ('adaptive:<r>', 'data', 'model', 'auto'), got {parallel_type!r}")
    if parallel_type.startswith("adaptive:"):
        value = parallel_type.split(":", 1)[1]
        if not value.lstrip("-").isdigit():
            raise ValueError(f"parallel_type 'adaptive:<r>' needs an integer r, got {parallel_type!r}")
        return int(value)
    choices = {"data": 1, "model": sharded_count, "auto": "auto"}
    if parallel_type not in choices:
        raise ValueError(f"parallel_type must be 'adaptive:<r>', 'data', 'model' or 'auto', got {parallel_type!r}")
    return choices[parallel_type]


class TutelMoELayer(MoELayer):
    """``MoELayer`` with Tutel's constructor and positional ``forward`` signature."""

    def __init__(self, gate_type, model_dim: int, experts: dict | None = None, scan_expert_func: Callable | None = None,
                 result_func: Callable | None = None, group: Any = None, seeds: tuple | None = None,
                 a2a_ffn_overlap_degree: int = 1, is_postscore: bool = True, batch_prioritized_routing: bool = False,
                 normalize_gate: bool = True, is_gshard_loss: bool = True, parallel_type: str = "adaptive:1",
                 use_2dh: bool = False, **kwargs):
        _check_deprecated_kwargs(kwargs)
        if experts is None:
            raise ValueError("experts must be given, e.g. {'type': 'ffn', 'num_experts_per_device': 2, "
                             "'hidden_size_per_expert': 2048}")
        config = _config_from_tutel(
            gate_type, model_dim, experts, group, a2a_ffn_overlap_degree=a2a_ffn_overlap_degree,
            is_postscore=is_postscore, batch_prioritized_routing=batch_prioritized_routing,
            normalize_gate=normalize_gate, is_gshard_loss=is_gshard_loss, parallel_type=parallel_type, use_2dh=use_2dh)
        super().__init__(config, group=group, scan_expert_func=scan_expert_func, result_func=result_func, seeds=seeds)
        self.parallel_type = parallel_type
        shim = getattr(self.experts, "module", None)
        if isinstance(shim, TutelCustomExpert):
            # A plain reference, not a submodule: registering the layer inside itself would recurse.
            object.__setattr__(shim, "ctx", self)

    # Tutel attribute names, read by Tutel-era training scripts and custom experts.
    @property
    def adaptive_degree(self) -> int:
        return self.config.adaptive_r

    @property
    def a2a_ffn_overlap_degree(self) -> int:
        return self.config.overlap_degree

    @property
    def model_dim(self) -> int:
        return self.config.model_dim

    @staticmethod
    def global_expert_count(num_local_experts, group=None) -> int:
        return global_expert_count(num_local_experts, group_size_and_rank(group)[0])

    def get_parameter_iterator(self, param_type: str):
        if param_type == "gate":
            return self.gates.named_parameters()
        if param_type == "local_experts":
            return self.experts.named_parameters()
        raise ValueError(f"param_type must be 'gate' or 'local_experts', got {param_type!r}")

    def forward(self, input: Tensor, gate_index: int = 0, capacity_factor: float | None = None,
                top_k: int | None = None, a2a_ffn_overlap_degree: int | None = None, reserve_dims: int = 1,
                inequivalent_tokens: bool = False, adaptive_r: int | None = None, megablocks_size: int | None = None,
                plan: str | None = None):
        return super().forward(input, gate_index=gate_index, capacity_factor=capacity_factor, top_k=top_k,
                               adaptive_r=adaptive_r, a2a_ffn_overlap_degree=a2a_ffn_overlap_degree,
                               megablocks_size=megablocks_size, reserve_dims=reserve_dims,
                               inequivalent_tokens=inequivalent_tokens, plan=plan)


def _check_deprecated_kwargs(kwargs: dict) -> None:
    for key in kwargs:
        if key != "pad_samples":
            raise TypeError(f"moe_layer got an unexpected argument {key!r}; known: gate_type, model_dim, experts, "
                            "scan_expert_func, result_func, group, seeds, a2a_ffn_overlap_degree, is_postscore, "
                            "batch_prioritized_routing, normalize_gate, is_gshard_loss, parallel_type, use_2dh, "
                            "pad_samples (deprecated)")
    if "pad_samples" in kwargs:
        warnings.warn("pad_samples is deprecated and ignored", DeprecationWarning)


def _config_from_tutel(gate_type, model_dim, experts, group, *, a2a_ffn_overlap_degree, is_postscore,
                       batch_prioritized_routing, normalize_gate, is_gshard_loss, parallel_type, use_2dh):
    gates = gate_type if isinstance(gate_type, (list, tuple)) else [gate_type]
    if not gates:
        raise ValueError("gate_type must hold at least one gate dict")
    gate_configs = [gate_config_from_dict(g, normalize_gate=normalize_gate, batch_prioritized=batch_prioritized_routing,
                                          is_gshard_loss=is_gshard_loss) for g in gates]
    expert_config, per_device = expert_config_from_dict(experts)
    world_size = group_size_and_rank(group)[0]
    num_experts = global_expert_count(per_device, world_size)
    sharded_count = split_experts(num_experts, world_size)[1]
    requested = parse_parallel_type(parallel_type, sharded_count)
    valid_rs = valid_adaptive_rs(sharded_count)
    if requested != "auto" and requested not in valid_rs:
        raise ValueError(f"parallel_type {parallel_type!r} gives adaptive_r={requested}, which must be one of "
                         f"{valid_rs} for {num_experts} experts over {world_size} rank(s)")
    # 'auto' starts from expert parallelism; the planner refines it per call.
    adaptive_r = 1 if requested == "auto" else requested
    config = MoEConfig(model_dim=model_dim, num_experts=num_experts, gate=gate_configs[0],
                       extra_gates=tuple(gate_configs[1:]), experts=expert_config, is_postscore=is_postscore,
                       adaptive_r=adaptive_r,
                       overlap_degree=a2a_ffn_overlap_degree, a2a_algo="2d" if use_2dh else "flat",
                       plan="auto" if requested == "auto" else "fixed")
    return config


def moe_layer(gate_type, model_dim: int, experts: dict | None = None, **kwargs) -> TutelMoELayer:
    """Tutel's ``tutel.moe.moe_layer``; see ``TutelMoELayer`` for the keyword arguments."""
    return TutelMoELayer(gate_type, model_dim, experts, **kwargs)


MOELayer = TutelMoELayer


def top_k_routing(scores_TE: Tensor, top_k: int, capacity_factor: float = 1.0, batch_prioritized_routing: bool = False,
                  normalize_gate: bool = True):
    """Routing from softmax scores, as Tutel's ``extract_critical``: returns a ``Routing`` record."""
    indices_TK = torch.topk(scores_TE, top_k, dim=1).indices
    weights_TK = scores_TE.gather(1, indices_TK)
    if normalize_gate and top_k > 1:
        weights_TK = weights_TK / weights_TK.sum(dim=1, keepdim=True).clamp(min=torch.finfo(weights_TK.dtype).eps)
    priority_T = None
    if batch_prioritized_routing:
        from .routing import confidence_rank
        priority_T = confidence_rank(scores_TE)
    return build_routing(indices_TK, weights_TK, scores_TE.shape[1], capacity_factor, priority_T)
