"""Gates: modules that map tokens to logits, and the score functions that select experts.

Legend: T tokens, D model dim, E experts, K top-k. A gate knows nothing of capacity; the
selection here returns (indices_TK, weights_TK, scores_TE) and ``routing`` does the rest.
Parameter names match Tutel's (``wg``; ``cosine_projector``, ``sim_matrix``, ``temperature``)
so that Tutel checkpoints load unchanged.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from .config import GateConfig


class LinearGate(nn.Module):
    """logits = x W^T, one bias-free projection (GShard/Switch; also sigmoid and sinkmoid)."""

    def __init__(self, model_dim: int, num_experts: int, fp32: bool):
        super().__init__()
        self.wg = nn.Linear(model_dim, num_experts, bias=False)
        self.fp32 = fp32

    def forward(self, x_TD: Tensor) -> Tensor:
        weight_ED = self.wg.weight
        if (x_TD.is_cuda and not (torch.is_grad_enabled() and (x_TD.requires_grad or weight_ED.requires_grad))
                and not torch.is_autocast_enabled("cuda")):
            # the native forwards' gate (a kernel for few experts): both paths route on the same bits;
            # under autocast F.linear keeps autocast's dtype rules (no native forward runs then)
            return ops.gate_logits(x_TD, weight_ED, self.fp32)
        return ops.gate_logits_reference(x_TD, weight_ED, self.fp32)


class CosineGate(nn.Module):
    """logits = cos(proj(x), sim_e) * exp(min(tau, ln 100)) (Swin-MoE / X-MoE style)."""

    def __init__(self, model_dim: int, num_experts: int, fp32: bool, proj_dim: int, init_t: float):
        super().__init__()
        self.temperature = nn.Parameter(torch.log(torch.full([1], 1.0 / init_t)))
        self.cosine_projector = nn.Linear(model_dim, proj_dim)
        self.sim_matrix = nn.Parameter(torch.empty(proj_dim, num_experts).normal_(0, 0.01))
        self.fp32 = fp32
        self.clamp_max = math.log(100.0)

    def forward(self, x_TD: Tensor) -> Tensor:
        w_PD, b_P, sim_PE = self.cosine_projector.weight, self.cosine_projector.bias, self.sim_matrix
        if self.fp32:
            x_TD, w_PD, b_P, sim_PE = x_TD.float(), w_PD.float(), b_P.float(), sim_PE.float()
        elif x_TD.dtype != w_PD.dtype:
            x_TD = x_TD.to(w_PD.dtype)
        proj_TP = F.normalize(F.linear(x_TD, w_PD, b_P), dim=1)
        logits_TE = proj_TP @ F.normalize(sim_PE, dim=0)
        return logits_TE * self.temperature.clamp(max=self.clamp_max).exp().to(logits_TE.dtype)


def build_gate(config: GateConfig, model_dim: int, num_experts: int) -> nn.Module:
    if config.kind == "cosine":
        return CosineGate(model_dim, num_experts, config.fp32, config.cosine_proj_dim, config.cosine_init_t)
    if config.kind == "custom":
        return config.custom_module(model_dim, num_experts, **dict(config.custom_kwargs))
    return LinearGate(model_dim, num_experts, config.fp32)


def sinkhorn(logits_TE: Tensor, iters: int) -> Tensor:
    """Balanced assignment scores: alternately normalise columns and rows of exp(logits) in log space."""
    log_p = logits_TE.float()
    for _ in range(iters):
        log_p = log_p - torch.logsumexp(log_p, dim=0, keepdim=True)
        log_p = log_p - torch.logsumexp(log_p, dim=1, keepdim=True)
    return log_p


def add_noise(logits_TE: Tensor, noise_std: float, training: bool) -> Tensor:
    if not training or noise_std <= 0:
        return logits_TE
    # Tutel normalises the noise by E so that its effect does not grow with the expert count.
    return logits_TE + torch.randn_like(logits_TE) * (noise_std / logits_TE.shape[1])


def select_experts(logits_TE: Tensor, config: GateConfig, top_k: int, training: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (indices_TK, weights_TK, probs_TE) from (possibly noisy) logits. ``probs_TE`` are
    the per-token distributions the balance losses read: the softmax, or for sigmoid gates the
    sigmoid scores normalised per token."""
    if config.kind in ("sigmoid", "sinkmoid"):
        scores_TE = torch.sigmoid(logits_TE)
        probs_TE = scores_TE / scores_TE.sum(dim=1, keepdim=True).clamp(min=1e-9)
    else:
        scores_TE = probs_TE = torch.softmax(logits_TE, dim=1)
    selection_TE = _selection_scores(logits_TE, scores_TE, config, training)
    if training and config.expert_dropout > 0:
        dropped_TE = torch.rand_like(selection_TE, dtype=torch.float32) < config.expert_dropout
        selection_TE = selection_TE.masked_fill(dropped_TE, float("-inf"))
    indices_TK = torch.topk(selection_TE, top_k, dim=1).indices
    weights_TK = _topk_weights(logits_TE, scores_TE, indices_TK, config)
    return indices_TK, weights_TK, probs_TE


def _selection_scores(logits_TE: Tensor, scores_TE: Tensor, config: GateConfig, training: bool) -> Tensor:
    if config.kind == "sinkmoid" and training:
        with torch.no_grad():
            return sinkhorn(logits_TE, config.sinkhorn_iters)
    if config.activation_after_topk:
        return logits_TE.detach()  # monotone activations: same top-k, no softmax over all E needed
    return scores_TE.detach()


def _topk_weights(logits_TE: Tensor, scores_TE: Tensor, indices_TK: Tensor, config: GateConfig) -> Tensor:
    if config.activation_after_topk:
        picked_TK = logits_TE.gather(1, indices_TK)
        weights_TK = torch.sigmoid(picked_TK) if config.kind in ("sigmoid", "sinkmoid") else torch.softmax(picked_TK, dim=1)
    else:
        weights_TK = scores_TE.gather(1, indices_TK)
    if config.normalize_topk and indices_TK.shape[1] > 1:
        weights_TK = weights_TK / weights_TK.sum(dim=1, keepdim=True).clamp(min=torch.finfo(weights_TK.dtype).eps)
    return weights_TK
