"""Swap the sparse-MoE blocks of Hugging Face Mixtral / Qwen2-MoE style models for adaptmoe.

Legend: T tokens, D model dim, H expert hidden, E experts, K top-k.

Recognised blocks (duck-typed, no transformers import needed): a module with a router ``gate``
and ``experts`` in either layout
- fused (transformers >= 5): ``experts.gate_up_proj`` [E, 2H, D] (gate half first, or interleaved
  when ``is_concatenated`` is False; [E, D, 2H] when ``is_transposed``), ``experts.down_proj``
  [E, D, H] ([E, H, D] transposed), ``experts.act_fn``; the router returns
  (logits, weights, indices) and the block returns only the hidden states;
- per-expert modules (transformers 4.x): ``experts`` is a ModuleList of MLPs with ``w1/w3/w2``
  (Mixtral) or ``gate_proj/up_proj/down_proj`` (Qwen2-MoE); the router is a bias-free Linear and
  the block returns (hidden_states, router_logits).
A Qwen2-MoE ``shared_expert`` with its sigmoid ``shared_expert_gate`` is kept as is and added.

The replacement keeps the original router module (so output recorders hooked on it still see
its logits), copies the expert weights once into adaptmoe's stored layout (w1 = gate, w3 = up,
w2 = down transposed: [E, H, D] each), and serves eval / no-grad calls through ``ServingMoE``
(dropless, decode path for small token counts). Replace after loading the checkpoint: the new
block's state-dict keys are adaptmoe's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ExpertConfig, GateConfig, MoEConfig
from ..layer import MoELayer
from ..serving import ServingMoE

SILU_NAMES = ("SiLU", "SiLUActivation", "SiLUActivationFunction")


class HFRouterGate(nn.Module):
    """adaptmoe custom gate over an HF router: logits in float32, as HF's routers softmax them.
    ``last_logits`` keeps the router's own logits for blocks that return them."""

    def __init__(self, model_dim: int, num_experts: int, *, router: nn.Module):
        super().__init__()
        self.router = router
        self.last_logits: Tensor | None = None

    def forward(self, x_TD: Tensor) -> Tensor:
        out = self.router(x_TD)
        logits_TE = out[0] if isinstance(out, tuple) else out
        self.last_logits = logits_TE
        return logits_TE.float()


@dataclass
class BlockSpec:
    """What a recognised HF block holds, in adaptmoe's terms."""

    router: nn.Module
    top_k: int
    normalize_topk: bool
    w1_EHD: Tensor                  # gate projection
    w3_EHD: Tensor                  # up projection
    w2_EHD: Tensor                  # down projection, transposed (input H, output D)
    activation: Any
    fused: bool                     # transformers >= 5 layout (block returns only hidden states)
    shared_expert: nn.Module | None = None
    shared_expert_gate: nn.Module | None = None
    jitter_noise: float = 0.0
    requires_grad: bool = True


def _activation(act_fn: Callable) -> Any:
    return "silu" if type(act_fn).__name__ in SILU_NAMES or act_fn is F.silu else act_fn


def _fused_weights(experts: nn.Module) -> tuple[Tensor, Tensor, Tensor]:
    if not getattr(experts, "has_gate", True) or getattr(experts, "has_bias", False):
        raise ValueError("fused HF experts must be gated and bias-free (has_gate=True, has_bias=False)")
    gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
    if getattr(experts, "is_transposed", False):
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)   # -> [E, 2H, D], [E, D, H]
    H = down.shape[2]
    if getattr(experts, "is_concatenated", True):
        w1, w3 = gate_up[:, :H], gate_up[:, H:]
    else:
        w1, w3 = gate_up[:, 0::2], gate_up[:, 1::2]
    return w1.contiguous(), w3.contiguous(), down.transpose(1, 2).contiguous()


def _listed_weights(experts: nn.ModuleList) -> tuple[Tensor, Tensor, Tensor]:
    first = experts[0]
    names = ("w1", "w3", "w2") if hasattr(first, "w1") else ("gate_proj", "up_proj", "down_proj")
    for expert in experts:
        for name in names:
            if getattr(getattr(expert, name), "bias", None) is not None:
                raise ValueError(f"expert projection {name} has a bias; adaptmoe's gated experts are bias-free")
    w1, w3, w2 = (torch.stack([getattr(e, n).weight.detach() for e in experts]) for n in names)
    return w1, w3, w2.transpose(1, 2).contiguous()    # w2: [E, D, H] -> [E, H, D]


def _first_attr(objects: tuple, name: str, default: Any) -> Any:
    for obj in objects:
        if hasattr(obj, name):
            return getattr(obj, name)
    return default


def inspect_block(block: nn.Module) -> BlockSpec | None:
    """The spec of a Mixtral / Qwen2-MoE style sparse block, or None when ``block`` is not one."""
    gate, experts = getattr(block, "gate", None), getattr(block, "experts", None)
    if not isinstance(gate, nn.Module) or not isinstance(getattr(gate, "weight", None), Tensor):
        return None
    if hasattr(experts, "gate_up_proj") and hasattr(experts, "down_proj"):
        w1, w3, w2 = _fused_weights(experts)
        act, fused, grad = experts.act_fn, True, experts.gate_up_proj.requires_grad
    elif isinstance(experts, nn.ModuleList) and len(experts) > 0 and (
            hasattr(experts[0], "w1") or hasattr(experts[0], "gate_proj")):
        w1, w3, w2 = _listed_weights(experts)
        act, fused = experts[0].act_fn, False
        grad = next(experts[0].parameters()).requires_grad
    else:
        return None
    top_k = _first_attr((block, gate), "top_k", None)
    if top_k is None:
        raise ValueError(f"{type(block).__name__}: cannot find top_k on the block or its gate")
    if gate.weight.shape[0] != w1.shape[0]:
        raise ValueError(f"{type(block).__name__}: router has {gate.weight.shape[0]} outputs but there are "
                         f"{w1.shape[0]} experts")
    normalize = bool(_first_attr((block, gate), "norm_topk_prob", True))   # Mixtral always renormalises
    return BlockSpec(router=gate, top_k=int(top_k), normalize_topk=normalize, w1_EHD=w1, w3_EHD=w3, w2_EHD=w2,
                     activation=_activation(act), fused=fused,
                     shared_expert=getattr(block, "shared_expert", None),
                     shared_expert_gate=getattr(block, "shared_expert_gate", None),
                     jitter_noise=float(getattr(block, "jitter_noise", 0.0) or 0.0), requires_grad=grad)


def _adopt(module: nn.Module, name: str, value: Tensor, requires_grad: bool) -> None:
    """Replace a (meta) parameter by ``value``, keeping the marks the layer put on it."""
    old = getattr(module, name)
    param = nn.Parameter(value, requires_grad=requires_grad)
    for mark, flag in vars(old).items():
        if mark.startswith("_") and isinstance(flag, bool):
            setattr(param, mark, flag)
    setattr(module, name, param)


def build_layer(spec: BlockSpec) -> MoELayer:
    """An adaptmoe MoELayer (dropless, no aux loss) holding ``spec``'s router and expert weights."""
    E, H, D = spec.w1_EHD.shape
    gate = GateConfig(kind="custom", top_k=spec.top_k, capacity_factor=0.0, normalize_topk=spec.normalize_topk,
                      losses=("none",), custom_module=HFRouterGate, custom_kwargs=(("router", spec.router),))
    config = MoEConfig(model_dim=D, num_experts=E, gate=gate,
                       experts=ExpertConfig(kind="gated_ffn", hidden_size=H, activation=spec.activation))
    with torch.device("meta"):   # no throw-away random init of the expert weights
        layer = MoELayer(config)
    experts = layer.experts
    _adopt(experts, "batched_fc1_w", spec.w1_EHD, spec.requires_grad)
    _adopt(experts, "batched_fc3_w", spec.w3_EHD, spec.requires_grad)
    _adopt(experts, "batched_fc2_w", spec.w2_EHD, spec.requires_grad)
    layer._num_global_experts = torch.tensor(E, device=spec.w1_EHD.device)
    return layer


class AdaptMoEBlock(nn.Module):
    """Drop-in for an HF sparse-MoE block: same input, same outputs, adaptmoe inside."""

    def __init__(self, spec: BlockSpec, *, return_router_logits: bool | None = None, **serving_kwargs: Any):
        super().__init__()
        self.moe = ServingMoE(build_layer(spec), **serving_kwargs)
        self.top_k, self.jitter_noise = spec.top_k, spec.jitter_noise
        self.shared_expert, self.shared_expert_gate = spec.shared_expert, spec.shared_expert_gate
        self.return_router_logits = (not spec.fused) if return_router_logits is None else return_router_logits

    @property
    def gate(self) -> nn.Module:
        """The original router module (its hooks still fire)."""
        return self.moe.layer.gates[0].router

    def forward(self, hidden_states: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        D = hidden_states.shape[-1]
        x_TD = hidden_states.reshape(-1, D)
        if self.training and self.jitter_noise > 0:
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        router = self.moe.layer.gates[0]
        router.last_logits = None   # a zero-token call routes nothing: no stale logits from the last call
        y_TD = self.moe(x_TD)
        if self.return_router_logits and router.last_logits is None:
            router(x_TD)
        if self.shared_expert is not None:
            shared_TD = self.shared_expert(x_TD)
            if self.shared_expert_gate is not None:
                shared_TD = torch.sigmoid(self.shared_expert_gate(x_TD)) * shared_TD
            y_TD = y_TD + shared_TD
        y = y_TD.reshape(hidden_states.shape[:-1] + y_TD.shape[-1:])
        if self.return_router_logits:
            return y, self.moe.layer.gates[0].last_logits
        return y


def replace_moe_blocks(model: nn.Module, *, return_router_logits: bool | None = None, **serving_kwargs: Any) -> int:
    """Replace every recognised sparse-MoE block of ``model`` in place; returns how many.

    ``return_router_logits``: None matches the source layout (transformers 4.x blocks return
    (hidden, logits), 5.x blocks return hidden only). ``serving_kwargs`` go to ``ServingMoE``
    (capacity_factor, kernel, planner, decode_method)."""
    targets = []
    for parent in model.modules():
        if isinstance(parent, AdaptMoEBlock):
            continue
        for name, child in parent.named_children():
            if not isinstance(child, AdaptMoEBlock):
                spec = inspect_block(child)
                if spec is not None:
                    targets.append((parent, name, child, spec))
    for parent, name, child, spec in targets:
        block = AdaptMoEBlock(spec, return_router_logits=return_router_logits, **serving_kwargs)
        block.train(child.training)
        setattr(parent, name, block)
    return len(targets)
