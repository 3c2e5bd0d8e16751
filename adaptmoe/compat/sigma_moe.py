"""sigma-MoE surface: ``MoE(dmodel, n_experts, expert_size, k, ...)`` whose forward returns
``(output, regularization_loss)``, as a thin adapter over adaptmoe's typed ``MoELayer``.

Legend: T tokens, D dmodel, E n_experts, H expert_size, O v_dim, K k.

What maps how:
- ``selection_mode`` softmax / sigmoid / sinkmoid -> gate kind of the same name; the k weights are
  not renormalised (sigma-MoE uses the raw scores); ``activation_after_topk`` scores only the picked
  experts; sinkmoid selects by Sinkhorn in training and by sigmoid in eval, weights are sigmoids.
- The regularization loss is the core's ``entropy`` loss: minus the entropy of the batch-mean
  softmax of the selection logits (add it times ~0.001 to the main loss). Computed over the local
  batch (sigma-MoE all-reduces it over ranks when torch.distributed is initialized).
- Weights: ``keys [E, D, H]`` is the experts' fc1 (stored [E, H, D]), ``values [E, H, O]`` is fc2
  (same layout), ``expert_sel [E, D]`` is the gate; ``bias`` -> fc1 bias, ``o_bias`` -> one
  output bias shared by all experts, added once. sigma-MoE checkpoints load through
  ``load_state_dict`` (their names are translated).
- ``dropout`` drops hidden units after the activation, as sigma-MoE's "up-projection" dropout.
- Dropless: every token reaches its k experts (capacity_factor 0).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ExpertConfig, GateConfig, MoEConfig
from ..layer import MoELayer

__all__ = ["MoE", "SELECTION_MODES"]

SELECTION_MODES = ("softmax", "sigmoid", "sinkmoid")


class ActivationDropout(nn.Module):
    """``dropout(activation(h))``; a child module of the experts, so ``train()`` / ``eval()`` reach it."""

    def __init__(self, activation: Callable[[Tensor], Tensor], p: float):
        super().__init__()
        self.activation, self.p = activation, p

    def forward(self, h: Tensor) -> Tensor:
        return F.dropout(self.activation(h), self.p, training=self.training)


def _check(dmodel, n_experts, expert_size, k, dropout, selection_mode, v_dim, expert_dropout, activation) -> None:
    for name, value in (("dmodel", dmodel), ("n_experts", n_experts), ("expert_size", expert_size), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if k > n_experts:
        raise ValueError(f"k must be in [1, {n_experts}] (n_experts), got {k!r}")
    if selection_mode not in SELECTION_MODES:
        raise ValueError(f"selection_mode must be one of {list(SELECTION_MODES)}, got {selection_mode!r}")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if not 0 <= expert_dropout < 1:
        raise ValueError(f"expert_dropout must be in [0, 1), got {expert_dropout!r}")
    if v_dim is not None and (isinstance(v_dim, bool) or not isinstance(v_dim, int) or v_dim < 1):
        raise ValueError(f"v_dim must be None or an integer >= 1, got {v_dim!r}")
    if not callable(activation):
        raise TypeError(f"activation must be a callable Tensor -> Tensor, got {activation!r}")


class MoE(nn.Module):
    """sigma-MoE's feed-forward replacement (no norm, no residual inside)."""

    def __init__(self, dmodel: int, n_experts: int, expert_size: int, k: int, dropout: float = 0,
                 selection_mode: str = "sigmoid", activation_after_topk: bool = False, activation=F.relu,
                 bias: bool = False, v_dim: int | None = None, sinkhorn_n_iters: int = 3, expert_dropout: float = 0.0,
                 weight_std_scale: float = 1.0):
        super().__init__()
        _check(dmodel, n_experts, expert_size, k, dropout, selection_mode, v_dim, expert_dropout, activation)
        self.k_dim, self.v_dim = dmodel, v_dim if v_dim is not None else dmodel
        self.n_experts, self.expert_size, self.n_heads = n_experts, expert_size, k
        self.selection_mode = selection_mode
        gate = GateConfig(kind=selection_mode, top_k=k, capacity_factor=0.0, normalize_topk=False,
                          activation_after_topk=activation_after_topk, expert_dropout=expert_dropout,
                          sinkhorn_iters=sinkhorn_n_iters, losses=("entropy",))
        act = ActivationDropout(activation, dropout) if dropout > 0 else activation
        experts = ExpertConfig(kind="ffn", hidden_size=expert_size, activation=act, has_fc1_bias=bias,
                               has_fc2_bias=False, output_dim=None if self.v_dim == dmodel else self.v_dim)
        self.layer = MoELayer(MoEConfig(model_dim=dmodel, num_experts=n_experts, gate=gate, experts=experts))
        self.o_bias = nn.Parameter(torch.zeros(self.v_dim)) if bias else None
        self.reset_parameters(weight_std_scale)
        self._register_load_state_dict_pre_hook(_translate_sigma_state, with_module=True)

    def reset_parameters(self, weight_std_scale: float = 1.0) -> None:
        """sigma-MoE's init: normal keys/values/selector, selector rows renormalised keeping the std."""
        ex = self.layer.experts
        with torch.no_grad():
            nn.init.normal_(ex.batched_fc1_w, std=self.k_dim ** -0.5 * weight_std_scale)
            nn.init.normal_(ex.batched_fc2_w, std=(self.n_experts * self.expert_size) ** -0.5 * weight_std_scale)
            sel = self.expert_sel
            nn.init.normal_(sel, std=self.k_dim ** -0.5 * weight_std_scale)
            std = sel.std()
            sel.div_(sel.norm(dim=1, keepdim=True))
            sel.mul_(std / sel.std())
            for b in (ex.batched_fc1_bias, self.o_bias):
                if b is not None:
                    b.zero_()

    @property
    def expert_sel(self) -> Tensor:
        """The selector [E, D] (the gate's weight)."""
        return self.layer.gates[0].wg.weight

    @property
    def keys(self) -> Tensor:
        """sigma-MoE's view of fc1: [E, D, H]."""
        return self.layer.experts.batched_fc1_w.transpose(1, 2)

    @property
    def values(self) -> Tensor:
        """fc2 [E, H, O], the same layout as sigma-MoE's."""
        return self.layer.experts.batched_fc2_w

    @property
    def bias(self) -> Tensor | None:
        return self.layer.experts.batched_fc1_bias

    def forward(self, input: Tensor, **knobs) -> tuple[Tensor, Tensor]:
        """``input [..., dmodel]`` -> ``(output [..., v_dim], regularization loss)``; keyword knobs go to
        ``MoELayer.forward`` (e.g. ``top_k``)."""
        y = self.layer(input, **knobs)
        if self.o_bias is not None:
            y = y + self.o_bias
        return y, self.layer.losses["entropy"]


def _translate_sigma_state(module, state_dict, prefix, *unused):
    """Loads sigma-MoE checkpoints: keys/values/expert_sel/bias -> the layer's parameters."""
    names = {"keys": "layer.experts.batched_fc1_w", "values": "layer.experts.batched_fc2_w",
             "expert_sel": "layer.gates.0.wg.weight", "bias": "layer.experts.batched_fc1_bias"}
    for theirs, ours in names.items():
        if prefix + theirs in state_dict:
            value = state_dict.pop(prefix + theirs)
            state_dict[prefix + ours] = value.transpose(1, 2) if theirs == "keys" else value
            state_dict.setdefault(prefix + "layer._num_global_experts", torch.tensor(module.n_experts))
