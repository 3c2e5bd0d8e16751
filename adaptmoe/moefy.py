"""moefy: turn the MLP blocks of any torch model into adaptmoe layers, optionally upcycled.

Legend: T tokens, D model dim, H hidden, O output dim, E experts.

A block is an MLP when it is one of:
- ``nn.Sequential(Linear, activation, Linear)`` (dropouts anywhere),
- a module whose two projections have well-known names (``c_fc``/``c_proj`` as in GPT-2, whose
  ``Conv1D`` stores weights transposed; ``fc1``/``fc2``; ``dense_h_to_4h``/``dense_4h_to_h``; ...),
- a gated MLP with ``gate_proj``/``up_proj``/``down_proj`` (Llama, Mistral, Qwen) or
  ``w1``/``w3``/``w2``: ``down(act(gate(x)) * up(x))``, built as ``gated_ffn`` experts,
- any module holding exactly two linear projections D -> H -> O and one activation.

Names and structure only propose a block: it is accepted after a probe, where the block's own
forward on a random input (eval mode, a private RNG) must equal ``fc2(act(fc1(x)))`` rebuilt
from its weights. A block that adds a residual, a norm or anything else fails the probe and is
left alone (or, when a predicate or pattern picked it, raises). Dropout modules of the block are
applied to the MoE output, which is where GPT-2 and most MLPs apply them.

Upcycling copies the dense weights into every expert (Komatsuzaki et al.); the gate starts
random. With ``num_experts=1`` and ``top_k=1`` the moefied model computes what the dense one did.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ExpertConfig, GateConfig, MoEConfig
from .layer import MoELayer

TWO_LAYER_NAMES = (("c_fc", "c_proj"), ("fc1", "fc2"), ("fc_in", "fc_out"), ("dense_h_to_4h", "dense_4h_to_h"),
                   ("wi", "wo"), ("lin1", "lin2"), ("up_proj", "down_proj"), ("w_1", "w_2"), ("fc", "proj"))
GATED_NAMES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))
ACTIVATION_ATTRS = ("act", "act_fn", "activation", "activation_fn", "act_layer", "gelu", "relu")
NAMED_ACTIVATIONS: dict[type, str] = {nn.ReLU: "relu", nn.SiLU: "silu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid",
                                      nn.Identity: "identity"}


@dataclass(frozen=True)
class MLPParts:
    """The weights of one dense MLP in ``nn.Linear`` layout (views of the block's parameters)."""

    w1_HD: Tensor
    b1_H: Tensor | None
    w2_OH: Tensor
    b2_O: Tensor | None
    w3_HD: Tensor | None            # gated MLPs: the "up" projection multiplied with act(x w1)
    activation: Callable[[Tensor], Tensor] | str
    dropouts: tuple[nn.Module, ...] = ()

    @property
    def model_dim(self) -> int:
        return self.w1_HD.shape[1]

    @property
    def hidden_size(self) -> int:
        return self.w1_HD.shape[0]

    @property
    def output_dim(self) -> int:
        return self.w2_OH.shape[0]

    @property
    def has_active_dropout(self) -> bool:
        return any(getattr(d, "p", 0.0) > 0 for d in self.dropouts)

    def expert_config(self) -> ExpertConfig:
        return ExpertConfig(kind="gated_ffn" if self.w3_HD is not None else "ffn", hidden_size=self.hidden_size,
                            activation=self.activation, has_fc1_bias=self.b1_H is not None,
                            has_fc2_bias=self.b2_O is not None,
                            output_dim=None if self.output_dim == self.model_dim else self.output_dim)

    def dense_forward(self, x: Tensor) -> Tensor:
        act = _resolve(self.activation)
        h = act(F.linear(x, self.w1_HD, self.b1_H))
        if self.w3_HD is not None:
            h = h * F.linear(x, self.w3_HD)
        return F.linear(h, self.w2_OH, self.b2_O)


def _resolve(activation):
    from .experts import resolve_activation
    return resolve_activation(activation)


def linear_like(module: nn.Module) -> tuple[Tensor, Tensor | None] | None:
    """(weight_OI, bias_O) of an ``nn.Linear`` or a GPT-2 style ``Conv1D`` (weight stored [I, O])."""
    if isinstance(module, nn.Linear):
        return module.weight, module.bias
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None:
        return module.weight.t(), module.bias
    return None


def _is_activation(module: nn.Module) -> bool:
    no_params = next(module.parameters(recurse=True), None) is None
    return no_params and not isinstance(module, (nn.Dropout, nn.Identity)) and not list(module.children())


def _activation_of(activation) -> Callable | str:
    """A name the core knows when the module is a plain one (faster, and printable), else the callable."""
    if type(activation) in NAMED_ACTIVATIONS:
        return NAMED_ACTIVATIONS[type(activation)]
    if type(activation) is nn.GELU:
        return "gelu" if activation.approximate == "none" else "gelu_tanh"
    return activation


def _dropouts(module: nn.Module) -> tuple[nn.Module, ...]:
    return tuple(m for m in module.children() if isinstance(m, nn.Dropout))


def _parts(fc1, fc2, fc3, activation, dropouts) -> MLPParts | None:
    first, second = linear_like(fc1), linear_like(fc2)
    third = linear_like(fc3) if fc3 is not None else None
    if first is None or second is None or (fc3 is not None and third is None) or activation is None:
        return None
    (w1, b1), (w2, b2) = first, second
    if w2.shape[1] != w1.shape[0]:
        return None
    if third is not None and (third[0].shape != w1.shape or third[1] is not None or b1 is not None):
        return None   # the core's gated experts carry no up/gate biases
    return MLPParts(w1, b1, w2, b2, third[0] if third else None, _activation_of(activation), dropouts)


def _sequential_parts(module: nn.Sequential) -> MLPParts | None:
    kept = [m for m in module if not isinstance(m, nn.Dropout)]
    if len(kept) != 3 or not _is_activation(kept[1]):
        return None
    return _parts(kept[0], kept[2], None, kept[1], _dropouts(module))


def _find_activation(module: nn.Module) -> Callable | None:
    for attr in ACTIVATION_ATTRS:
        value = getattr(module, attr, None)
        if isinstance(value, nn.Module):
            if _is_activation(value):
                return value
        elif callable(value):
            return value
    candidates = [m for m in module.children() if _is_activation(m)]
    return candidates[0] if len(candidates) == 1 else None


def find_mlp(module: nn.Module) -> MLPParts | None:
    """The dense MLP inside ``module`` by structure and names (no probe: see ``mlp_parts``)."""
    if isinstance(module, nn.Sequential):
        return _sequential_parts(module)
    children = dict(module.named_children())
    if len(children) == 1 and not module._parameters:
        return find_mlp(next(iter(children.values())))   # a wrapper around one MLP
    linears = [name for name, child in children.items() if linear_like(child) is not None]
    own_params = {id(p) for name in linears for p in children[name].parameters()}
    if any(id(p) not in own_params for p in module.parameters()):
        return None   # a norm, an embedding, ...: more than an MLP
    activation = _find_activation(module)
    for gate, up, down in GATED_NAMES:
        if sorted(linears) == sorted((gate, up, down)):
            return _parts(children[gate], children[down], children[up], activation, _dropouts(module))
    if len(linears) != 2:
        return None
    for fc1, fc2 in TWO_LAYER_NAMES:
        if sorted(linears) == sorted((fc1, fc2)):
            return _parts(children[fc1], children[fc2], None, activation, _dropouts(module))
    return _parts(children[linears[0]], children[linears[1]], None, activation, _dropouts(module))


def probe_matches(module: nn.Module, parts: MLPParts) -> bool:
    """Runs ``module`` in eval mode on a private random input and compares with the rebuilt MLP."""
    w = parts.w1_HD
    x = torch.randn(2, 3, parts.model_dim, generator=torch.Generator().manual_seed(0)).to(w.device, w.dtype)
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        with torch.no_grad():
            expected, rebuilt = module(x), parts.dense_forward(x)
    except Exception:   # a block that needs more arguments, or other shapes, is not an MLP block
        return False
    finally:
        for m, mode in modes.items():
            m.training = mode
    if not isinstance(expected, Tensor) or expected.shape != rebuilt.shape:
        return False
    tol = 1e-4 if w.dtype in (torch.float32, torch.float64) else 2e-2
    return torch.allclose(expected, rebuilt, rtol=tol, atol=tol)


def mlp_parts(module: nn.Module) -> MLPParts | None:
    """``find_mlp`` confirmed by ``probe_matches``: None unless the block computes exactly an MLP."""
    parts = find_mlp(module)
    return parts if parts is not None and probe_matches(module, parts) else None


def copy_mlp_weights(experts: nn.Module, parts_per_expert: list[MLPParts]) -> None:
    """Copies dense MLP weights into whole local experts of an ``FFNExperts`` (one MLPParts each)."""
    if getattr(experts, "sharded_count", 1) != 1:
        raise ValueError("copying dense weights needs whole experts on each rank (num_experts >= group size)")
    with torch.no_grad():
        for i, parts in enumerate(parts_per_expert):
            experts.batched_fc1_w[i].copy_(parts.w1_HD)
            experts.batched_fc2_w[i].copy_(parts.w2_OH.t())
            if parts.w3_HD is not None:
                experts.batched_fc3_w[i].copy_(parts.w3_HD)
            if parts.b1_H is not None:
                experts.batched_fc1_bias[i].copy_(parts.b1_H)
            if parts.b2_O is not None:
                experts.batched_fc2_bias[i, : parts.output_dim].copy_(parts.b2_O)


class MoEBlock(nn.Module):
    """Stands in for a dense MLP block: ``forward(x [..., D]) -> [..., O]``, experts inside.
    Per-call knobs of ``MoELayer.forward`` may be passed as keywords."""

    def __init__(self, moe: MoELayer, dropouts: tuple[nn.Module, ...] = ()):
        super().__init__()
        self.moe = moe
        self.dropout = nn.Sequential(*dropouts) if dropouts else None

    @property
    def l_aux(self) -> Tensor | None:
        return self.moe.l_aux

    def forward(self, x: Tensor, **knobs) -> Tensor:
        y = self.moe(x, **knobs)
        return self.dropout(y) if self.dropout is not None else y


def _gate_config(gate: str | GateConfig, top_k: int | None, capacity_factor: float | None,
                 num_experts: int) -> GateConfig:
    if isinstance(gate, str):
        base = GateConfig(kind=gate, top_k=1, capacity_factor=0.0)
    elif isinstance(gate, GateConfig):
        base = gate
    else:
        raise TypeError(f"gate must be a gate kind name (e.g. 'softmax', 'sigmoid') or a GateConfig, got {gate!r}")
    changes = {k: v for k, v in (("top_k", top_k), ("capacity_factor", capacity_factor)) if v is not None}
    config = dataclasses.replace(base, **changes)
    config.validate(num_experts)
    return config


def build_moe_block(parts: MLPParts, *, num_experts: int, gate: GateConfig, upcycle: bool,
                    group=None) -> MoEBlock:
    """One MoE block shaped like ``parts`` (on its device and dtype), experts upcycled if asked."""
    layer = MoELayer(MoEConfig(model_dim=parts.model_dim, num_experts=num_experts, gate=gate,
                               experts=parts.expert_config()), group=group)
    layer.to(device=parts.w1_HD.device, dtype=parts.w1_HD.dtype)
    if upcycle:
        copy_mlp_weights(layer.experts, [parts] * layer.num_local_experts)
    return MoEBlock(layer, parts.dropouts)


def _selected(name: str, module: nn.Module, predicate, regex) -> bool:
    if predicate is not None and not predicate(name, module):
        return False
    return regex is None or regex.search(name) is not None


def find_blocks(model: nn.Module, predicate=None, name_pattern: str | None = None) -> list[tuple[str, MLPParts]]:
    """(qualified name, parts) of every block moefy would replace, outermost first."""
    explicit = predicate is not None or name_pattern is not None
    regex = re.compile(name_pattern) if name_pattern is not None else None
    found: list[tuple[str, MLPParts]] = []
    taken: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") or prefix == "" for prefix in taken):
            continue
        if isinstance(module, (MoEBlock, MoELayer)):
            taken.append(name)
            continue
        if explicit and not _selected(name, module, predicate, regex):
            continue
        parts = mlp_parts(module)
        if parts is None:
            if explicit:
                raise ValueError(f"predicate/name_pattern selected {name or '<root>'!r} ({type(module).__name__}), "
                                 "which is not a Linear-activation-Linear or gate/up/down MLP block")
            continue
        found.append((name, parts))
        taken.append(name)
    return found


def moefy(model: nn.Module, *, num_experts: int, top_k: int | None = None, predicate=None,
          name_pattern: str | None = None, upcycle: bool = True, gate: str | GateConfig = "softmax",
          capacity_factor: float | None = None, group=None) -> nn.Module:
    """Replaces MLP blocks of ``model`` in place by ``MoEBlock``s and returns the model.

    ``predicate(name, module) -> bool`` and/or ``name_pattern`` (a regex searched in the qualified
    module name) pick the blocks; by default every block that passes the MLP probe is taken.
    ``gate`` is a gate kind or a full ``GateConfig``; ``top_k`` / ``capacity_factor`` override it
    when given (defaults for a kind name: top_k=1, capacity_factor=0.0, i.e. dropless).
    When the root module itself is the block, the new block is returned instead.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if predicate is not None and not callable(predicate):
        raise TypeError(f"predicate must be a callable (name, module) -> bool, got {predicate!r}")
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be an integer >= 1, got {num_experts!r}")
    gate_config = _gate_config(gate, top_k, capacity_factor, num_experts)
    blocks = find_blocks(model, predicate, name_pattern)
    if not blocks:
        raise ValueError(f"moefy found no MLP block in {type(model).__name__}; pass predicate= or name_pattern= "
                         "naming Linear-activation-Linear blocks")
    for name, parts in blocks:
        block = build_moe_block(parts, num_experts=num_experts, gate=gate_config, upcycle=upcycle, group=group)
        if name == "":
            return block
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, block)
    return model


def moe_layers(model: nn.Module) -> list[MoELayer]:
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def aux_loss(model: nn.Module) -> Tensor:
    """Sum of the auxiliary (balance) losses of the last forward of every adaptmoe layer in ``model``."""
    losses = [layer.l_aux for layer in moe_layers(model) if layer.l_aux is not None]
    if not losses:
        return torch.zeros(())
    return torch.stack([loss.float().reshape(()) for loss in losses]).sum()
